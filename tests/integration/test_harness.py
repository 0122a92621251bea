"""Self-tests of the integration harness (no crossdock needed).

Checks that the registry harness, the corpus pusher, the independent checks
and the vanishing proxy do what the crossdock tests rely on, cross-checked
with skopeo.
"""

import os
import socket
import subprocess
import sys
import time
import unittest
from unittest import mock

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import check  # noqa: E402
import corpus  # noqa: E402
import registry  # noqa: E402
from hookserver import HookServer  # noqa: E402
from proxy import VanishingProxy  # noqa: E402
from registry import Registry  # noqa: E402

NS = "src-ns"


class RegistryHarnessTest(unittest.TestCase):
    def test_start_stop_cleans_up(self):
        reg = Registry()
        with reg:
            proc, tmp = reg.proc, reg.tmpdir
            self.assertEqual(reg.client().ping(), 200)
            self.assertTrue(os.path.isfile(reg.log_path))
            self.assertIn("delete:\n    enabled: true", open(reg.config_path).read())
        self.assertIsNotNone(proc.poll(), "registry still running after stop()")
        self.assertFalse(os.path.exists(tmp), "temp dir left behind")

    def test_port_race_is_retried(self):
        # Hand the harness a port that is already taken: it must retry on another.
        busy = socket.socket()
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        taken = busy.getsockname()[1]
        real = registry.free_port
        ports = iter([taken])
        with mock.patch.object(registry, "free_port", lambda: next(ports, None) or real()):
            try:
                with Registry() as reg:
                    self.assertNotEqual(reg.port, taken)
                    self.assertEqual(reg.client().ping(), 200)
                    self.assertIn("address already in use", reg.log_text().lower())
            finally:
                busy.close()

    def test_auth_tls_variant(self):
        with Registry(auth=True, tls=True) as reg:
            self.assertTrue(reg.url.startswith("https://127.0.0.1:"))
            self.assertTrue(os.path.isfile(reg.ca_file))
            self.assertEqual(reg.client().ping(), 200)
            anon = corpus.RegistryClient(reg.url, ca_file=reg.ca_file)
            with self.assertRaises(corpus.RegistryError) as cm:
                anon.ping()
            self.assertEqual(cm.exception.status, 401)
            with self.assertRaises(corpus.RegistryError) as cm:
                reg.client(username=reg.username, password="wrong").ping()
            self.assertEqual(cm.exception.status, 401)
            # Without the CA the certificate is not trusted.
            with self.assertRaises(Exception):
                corpus.RegistryClient(reg.url, reg.username, reg.password).ping()
            # openssl agrees that the chain verifies for IP 127.0.0.1.
            r = subprocess.run(["openssl", "verify", "-CAfile", reg.ca_file,
                                "-verify_ip", "127.0.0.1", reg.cert_path],
                               capture_output=True, text=True, timeout=30)
            self.assertEqual(r.returncode, 0, r.stdout + r.stderr)

    def test_notifications(self):
        # A registry with notify_url POSTs distribution's envelopes there, with the headers given.
        with HookServer() as hooks, \
                Registry(name="notifying", notify_url=hooks.url("/hook/x"),
                         notify_headers={"Authorization": "Bearer t0ken"}) as reg:
            m = corpus.push_image(reg.client(), "ns/app", "v1", "notified", seed=5)
            deadline = time.monotonic() + 10
            for _ in range(200):      # the registry sends from a queue: wait (bounded)
                pushes = [(e["target"].get("tag"), e["target"].get("digest"))
                          for h in hooks.posts("/hook/x") for e in h.json().get("events", [])
                          if e.get("action") == "push"
                          and "/manifests/" in e["target"].get("url", "")]
                if pushes or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            self.assertEqual(pushes, [("v1", m.digest)], hooks.posts())
            h = hooks.posts("/hook/x")[0]
            self.assertEqual(h.headers.get("authorization"), "Bearer t0ken")
            self.assertEqual(h.headers.get("content-type"),
                             "application/vnd.docker.distribution.events.v1+json")

    def test_auth_plain_http_variant(self):
        with Registry(auth=True) as reg:
            self.assertTrue(reg.url.startswith("http://"))
            self.assertEqual(reg.client().ping(), 200)
            with self.assertRaises(corpus.RegistryError):
                corpus.RegistryClient(reg.url).ping()


class CorpusTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.reg = Registry(name="corpus")
        cls.reg.start()
        try:
            cls.corpus = corpus.push_corpus(cls.reg.client(), NS)
        except BaseException:
            cls.reg.stop()
            raise

    @classmethod
    def tearDownClass(cls):
        cls.reg.stop()

    def test_deterministic(self):
        a = corpus.build_corpus(NS).to_dict()
        self.assertEqual(a, self.corpus.to_dict())
        b = corpus.build_corpus(NS, seed=1).to_dict()
        self.assertNotEqual([t["digest"] for t in a["tags"]], [t["digest"] for t in b["tags"]])

    def test_layout(self):
        c = self.corpus
        self.assertEqual(c.repositories(), ["charts/mychart", "legacy/app", "team-a/api",
                                            "team-a/web", "team-b/worker"])
        self.assertEqual(c.tags("team-a/web"), ["latest", "v1", "v2"])
        self.assertEqual([e.repository for e in c.outside()], ["other/thing"])
        self.assertEqual(c.entry("team-b/worker", "multi").media_type, corpus.OCI_INDEX)
        self.assertEqual(c.entry("legacy/app", "v2").media_type, corpus.DOCKER_MANIFEST)
        self.assertEqual(c.entry("legacy/app", "list").media_type, corpus.DOCKER_LIST)
        self.assertEqual(c.entry("charts/mychart", "0.1.0").type, "helm")
        users = [e for e in c.entries if any(b.digest == c.base_layer.digest
                                             for b in e.manifest.all_blobs())]
        self.assertGreaterEqual(len({e.repository for e in users}), 4)

    def test_registry_holds_corpus(self):
        cl = self.reg.client()
        self.assertEqual(check.catalog(cl, page_size=1), check.catalog(cl))
        self.assertEqual(sorted(check.catalog(cl)),
                         sorted({e.repository for e in self.corpus.entries}))
        for e in self.corpus.entries:
            with self.subTest(repo=e.repository, tag=e.tag):
                info = check.manifest(cl, e.repository, e.tag)
                self.assertEqual(info.digest, e.digest)
                self.assertEqual(info.media_type, e.media_type)
                self.assertEqual(check.missing_content(cl, e.repository, e.tag), [])
        self.assertEqual(check.tags(cl, f"{NS}/team-a/web", page_size=1),
                         ["latest", "v1", "v2"])
        self.assertEqual(check.tags(cl, "no/such/repo"), [])
        self.assertIsNone(check.manifest(cl, f"{NS}/team-a/web", "nope"))

    def test_skopeo_agrees(self):
        h = self.reg.host
        for e in self.corpus.entries:
            with self.subTest(repo=e.repository, tag=e.tag):
                self.assertEqual(check.skopeo_raw_digest(h, e.repository, e.tag), e.digest)
                check.skopeo_copy_verify(h, e.repository, e.tag)
        meta = check.skopeo_inspect(h, f"{NS}/team-a/web", "v1")
        self.assertEqual(meta["Digest"], self.corpus.entry("team-a/web", "v1").digest)
        self.assertEqual(meta["Architecture"], "amd64")
        self.assertIn(self.corpus.base_layer.digest, meta["Layers"])

    def test_push_image_differs(self):
        with Registry(name="scratch") as reg:
            m = corpus.push_image(reg.client(), "scratch/one", "v1", "squatter", seed=7)
            self.assertEqual(check.manifest_digest(reg.client(), "scratch/one", "v1"), m.digest)
        self.assertNotIn(m.digest, {e.digest for e in self.corpus.entries})

    def test_cli(self):
        with Registry(name="cli") as reg:
            r = subprocess.run([sys.executable, os.path.join(HERE, "corpus.py"),
                                "--registry", reg.host, "--namespace", "cli-ns", "--json"],
                               capture_output=True, text=True, timeout=120)
            self.assertEqual(r.returncode, 0, r.stderr)
            import json
            desc = json.loads(r.stdout)
            self.assertEqual(desc["namespace"], "cli-ns")
            for t in desc["tags"]:
                self.assertEqual(check.manifest_digest(reg.client(), t["repository"], t["tag"]),
                                 t["digest"])


class AuthCorpusTest(unittest.TestCase):
    def test_push_with_basic_auth_and_ca(self):
        with Registry(auth=True, tls=True) as reg:
            c = corpus.push_corpus(reg.client(), NS, max_size=64 * 1024)
            e = c.entry("team-b/worker", "multi")
            self.assertEqual(check.skopeo_raw_digest(reg.host, e.repository, e.tag,
                                                     creds=reg.creds, cert_dir=reg.cert_dir),
                             e.digest)
            check.skopeo_copy_verify(reg.host, e.repository, e.tag,
                                     creds=reg.creds, cert_dir=reg.cert_dir)


class ProxyTest(unittest.TestCase):
    def test_vanish_and_pass_through(self):
        with Registry(name="proxied") as reg:
            c = corpus.push_corpus(reg.client(), NS, max_size=64 * 1024, outside=False)
            repo = f"{NS}/team-a/web"
            with VanishingProxy(reg, repo=repo, tag="v1") as px:
                pc = corpus.RegistryClient(px.url)
                # Unrelated listings do not trigger anything.
                self.assertEqual(check.tags(pc, f"{NS}/team-a/api"), ["1.0.0", "v1"])
                self.assertFalse(px.vanished.is_set())
                # The listing still shows v1, but it is gone right after.
                self.assertEqual(check.tags(pc, repo), ["latest", "v1", "v2"])
                self.assertTrue(px.vanished.is_set(), px.error)
                self.assertEqual(px.vanished_digest, c.entry("team-a/web", "v1").digest)
                self.assertIsNone(check.manifest(pc, repo, "v1"))
                self.assertEqual(check.tags(pc, repo), ["latest", "v2"])
                self.assertEqual(check.manifest_digest(pc, repo, "v2"),
                                 c.entry("team-a/web", "v2").digest)
                # Catalog pagination (Link) and skopeo work through the proxy.
                self.assertEqual(check.catalog(pc, page_size=2), check.catalog(reg.client()))
                self.assertEqual(check.skopeo_raw_digest(px.host, repo, "v2"),
                                 c.entry("team-a/web", "v2").digest)
                check.skopeo_copy_verify(px.host, f"{NS}/team-b/worker", "multi")
                # Uploads (POST + PUT to a Location pointing at the proxy) pass too.
                m = corpus.push_image(pc, "via/proxy", "v1", "proxied", seed=3)
                self.assertEqual(check.manifest_digest(reg.client(), "via/proxy", "v1"),
                                 m.digest)
                self.assertTrue(any(p[0] == "PUT" for p in px.requests))


if __name__ == "__main__":
    unittest.main(verbosity=2)
