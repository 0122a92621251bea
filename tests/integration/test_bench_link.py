"""Integration tests of `crossdock bench-link SOURCE TARGET`.

crossdock runs as a subprocess against real docker-registry 2.8 instances on
127.0.0.1 (deletes enabled, except where a test needs them refused), with
small sizes (--size 8 --streams 1,2 --chunk-sizes 5) so a run takes a few
seconds.  What is checked, independently of crossdock's own report:

- the report: exit 0, the table, the recommended `crossdock mirror` line,
  --json with the documented keys and positive throughputs, --plot an SVG
  that parses as XML with one line per series;
- safety: every write request either registry saw (POST/PUT/PATCH/DELETE in
  its access log) is inside the scratch repository; afterwards its tag list
  is empty and every blob bench-link uploaded (digests taken from the access
  log) answers 404;
- refusal: a scratch repository that already has a tag (on the source or on
  the target), or that is in the catalog with untagged content, is refused
  with exit 2 before anything is written; with --force the run goes ahead and
  deletes only its own blobs;
- a registry that refuses deletes (405 UNSUPPORTED): exit 0, the report says
  so and lists what was left, and that is exactly what is still there;
- SIGINT in the middle of a run: exit 1 and nothing left behind;
- usage errors: exit 2 before any request.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.parse
import xml.etree.ElementTree as ET

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import check  # noqa: E402
import corpus  # noqa: E402
from registry import Registry  # noqa: E402

CROSSDOCK = os.environ.get("CROSSDOCK_BIN") or os.path.join(
    HERE, "..", "..", "build", "tools", "crossdock")
RUN_TIMEOUT = 180          # seconds for one crossdock invocation
MiB = 1024 * 1024
SRC_NS = "src-ns"
DST_NS = "dst-ns"
SMALL = ["--size", "8", "--streams", "1,2", "--chunk-sizes", "5", "--rtt-samples", "5"]
WRITE_METHODS = ("POST", "PUT", "PATCH", "DELETE")
SVG_NS = "{http://www.w3.org/2000/svg}"

from cdenv import base_env  # noqa: E402


class Run:
    def __init__(self, args, returncode, stdout, stderr):
        self.args = args
        self.returncode = returncode
        self.stdout = stdout.decode("utf-8", "replace") if isinstance(stdout, bytes) else stdout
        self.stderr = stderr.decode("utf-8", "replace") if isinstance(stderr, bytes) else stderr

    @property
    def output(self):
        return self.stdout + "\n" + self.stderr

    def describe(self):
        return (f"\n$ crossdock {' '.join(self.args)}\nexit {self.returncode}\n"
                f"--- stdout ---\n{self.stdout[-6000:]}\n"
                f"--- stderr ---\n{self.stderr[-4000:]}")


def crossdock(*args, timeout=RUN_TIMEOUT):
    args = [str(a) for a in args]
    try:
        p = subprocess.run([CROSSDOCK] + args, stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           env=base_env(), timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"crossdock {' '.join(args)} did not finish within "
                             f"{timeout}s; stderr so far:\n"
                             f"{(e.stderr or b'').decode(errors='replace')[-4000:]}")
    return Run(args, p.returncode, p.stdout, p.stderr)


class NoDeleteRegistry(Registry):
    """A registry with storage.delete.enabled false: DELETE answers 405 UNSUPPORTED."""

    def _config_yaml(self):
        text = super()._config_yaml()
        on = "  delete:\n    enabled: true\n"
        assert on in text, "registry.py's config changed: update NoDeleteRegistry"
        return text.replace(on, "  delete:\n    enabled: false\n")


def writes_since(reg, mark):
    """(method, path, status) write requests in reg's access log after position mark."""
    return [e for e in reg.access_log()[mark:] if e[0] in WRITE_METHODS]


def uploaded_digests(entries):
    """{(repo, digest)} finalised by a PUT ...?digest= (status 201) in these log entries."""
    out = set()
    for method, path, status in entries:
        if method != "PUT" or status != 201:
            continue
        u = urllib.parse.urlsplit(path)
        m = re.match(r"^/v2/(.+)/blobs/uploads/[^/]+$", u.path)
        digest = urllib.parse.parse_qs(u.query).get("digest", [None])[0]
        if m and digest:
            out.add((m.group(1), digest))
    return out


class BenchLinkTestCase(unittest.TestCase):
    maxDiff = None

    @classmethod
    def setUpClass(cls):
        if not (os.path.isfile(CROSSDOCK) and os.access(CROSSDOCK, os.X_OK)):
            raise RuntimeError(f"crossdock binary not found at {CROSSDOCK} "
                               "(build it, or set CROSSDOCK_BIN)")
        cls.src = Registry(name="bench-src").start()
        try:
            cls.dst = Registry(name="bench-dst").start()
        except BaseException:
            cls.src.stop()
            raise

    @classmethod
    def tearDownClass(cls):
        cls.dst.stop()
        cls.src.stop()

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="crossdock-bench-link-test-")
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def marks(self, *regs):
        return [len(r.access_log()) for r in regs]

    def assert_writes_inside(self, reg, mark, repo, run):
        """Every write request since mark targets /v2/<repo>/..."""
        prefix = f"/v2/{repo}/"
        outside = [e for e in writes_since(reg, mark) if not e[1].startswith(prefix)]
        self.assertEqual(outside, [], f"writes outside {repo} on {reg.host}" + run.describe())

    def assert_gone(self, reg, repo, digests, run):
        client = reg.client()
        self.assertEqual(check.tags(client, repo), [], f"{reg.host}/{repo} has tags" + run.describe())
        still = sorted(d for r, d in digests if r == repo and client.blob_exists(r, d))
        self.assertEqual(still, [], f"blobs left in {reg.host}/{repo}" + run.describe())


class ReportTest(BenchLinkTestCase):
    def test_report_json_plot_and_cleanup(self):
        json_path = os.path.join(self.tmp, "link.json")
        svg_path = os.path.join(self.tmp, "link.svg")
        ms, md = self.marks(self.src, self.dst)
        src_ref, dst_ref = f"{self.src.host}/{SRC_NS}", f"{self.dst.host}/{DST_NS}"
        run = crossdock("bench-link", src_ref, dst_ref, "--insecure", *SMALL,
                        "--json", json_path, "--plot", svg_path)
        self.assertEqual(run.returncode, 0, run.describe())

        # --- the text report
        out = run.stdout
        self.assertRegex(out, r"(?m)^\s+streams\s+GET\s+PUT 5 MiB\s+PUT mono\s*$", run.describe())
        for n in (1, 2):
            self.assertRegex(out, rf"(?m)^\s+{n}(\s+\d+\.\d\*?){{3}}\s*$", run.describe())
        self.assertRegex(out, r"round trip, GET /v2/ \(5 samples\)")
        self.assertIn("recommended settings", out)
        m = re.search(r"(?m)^\s+(crossdock mirror \S+ \S+ .*)$", out)
        self.assertIsNotNone(m, run.describe())
        command = m.group(1)
        self.assertRegex(command, rf"^crossdock mirror {re.escape(src_ref)} {re.escape(dst_ref)} --insecure "
                                  r"--streams [12] --jobs (1[6-9]|[2-5]\d|6[0-4]) --chunk-size 5$")
        self.assertRegex(out, r"--bandwidth [1-9]\d*MiB/s +to share the link")
        self.assertRegex(out, r"cleanup: (\d+) of \1 blob\(s\) bench-link uploaded deleted\n")

        # --- the JSON report
        with open(json_path) as f:
            j = json.load(f)
        for key in ("source", "target", "source_repository", "target_repository", "blob_bytes", "rtt_ms",
                    "get", "put", "source_ignores_range", "recommended", "cleanup", "notes"):
            self.assertIn(key, j)
        self.assertEqual(j["source"], src_ref)
        self.assertEqual(j["target"], dst_ref)
        self.assertEqual(j["blob_bytes"], 8 * MiB)
        self.assertRegex(j["source_repository"], rf"^{SRC_NS}/crossdock-bench-link/[0-9a-f]{{8}}$")
        self.assertEqual(j["target_repository"], DST_NS + j["source_repository"][len(SRC_NS):])
        for side in ("source", "target"):
            rtt = j["rtt_ms"][side]
            self.assertEqual(len(rtt["samples"]), 5)
            self.assertGreater(rtt["median"], 0)
            self.assertGreaterEqual(rtt["p90"], rtt["median"])
        self.assertFalse(j["source_ignores_range"])
        self.assertEqual([g["streams"] for g in j["get"]], [1, 2])
        for g in j["get"]:
            self.assertGreater(g["mib_per_s"], 0)
            self.assertGreaterEqual(g["passes"], 1)
            self.assertEqual(g["bytes"], g["passes"] * 8 * MiB)
        self.assertEqual([(p["chunk_size_bytes"], p["monolithic"]) for p in j["put"]],
                         [(5 * MiB, False), (0, True)])
        for p in j["put"]:
            self.assertEqual([r["streams"] for r in p["runs"]], [1, 2])
            for r in p["runs"]:
                self.assertGreater(r["mib_per_s"], 0)
                self.assertEqual(r["upload_bytes"], 8 * MiB // r["streams"])
                self.assertEqual(r["bytes"], r["passes"] * 8 * MiB)
        # 8 MiB in one upload is chunked at 5 MiB; 4 MiB uploads fit in one PUT.
        self.assertEqual([r["single_put"] for r in j["put"][0]["runs"]], [False, True])
        rec = j["recommended"]
        self.assertTrue(rec["valid"])
        self.assertIn(rec["streams"], (1, 2))
        self.assertEqual(rec["chunk_size_mib"], 5)
        self.assertEqual(rec["chunk_size_bytes"], 5 * MiB)
        self.assertGreater(rec["capacity_mib_per_s"], 0)
        self.assertEqual(rec["bandwidth"], f"{rec['bandwidth_mib_per_s']}MiB/s")
        self.assertLessEqual(rec["bandwidth_mib_per_s"], max(1, rec["capacity_mib_per_s"]))
        self.assertEqual(rec["command"], command)
        c = j["cleanup"]
        self.assertGreater(c["blobs_created"], 0)
        self.assertEqual(c["blobs_deleted"], c["blobs_created"])
        self.assertEqual(c["left"], [])
        self.assertFalse(c["deletes_unsupported"])

        # --- the plot
        tree = ET.parse(svg_path)
        root = tree.getroot()
        self.assertEqual(root.tag, SVG_NS + "svg")
        self.assertEqual(len(root.findall(f".//{SVG_NS}polyline")), 3)  # GET, PUT 5 MiB, PUT monolithic
        texts = " ".join("".join(t.itertext()) for t in root.iter(SVG_NS + "text"))
        for word in ("GET", "PUT, 5 MiB chunks", "PUT, monolithic", "parallel streams", "MiB/s"):
            self.assertIn(word, texts)

        # --- the registries: writes only in the scratch repository, nothing left there
        src_repo, dst_repo = j["source_repository"], j["target_repository"]
        self.assert_writes_inside(self.src, ms, src_repo, run)
        self.assert_writes_inside(self.dst, md, dst_repo, run)
        src_blobs = uploaded_digests(self.src.access_log()[ms:])
        dst_blobs = uploaded_digests(self.dst.access_log()[md:])
        self.assertEqual(len(src_blobs), 1, run.describe())             # the GET test blob
        self.assertGreaterEqual(len(dst_blobs), 1 + 2 + 1, run.describe())  # warm-up + 1 + 2 uploads
        self.assertEqual(len(src_blobs) + len(dst_blobs), c["blobs_created"])
        self.assert_gone(self.src, src_repo, src_blobs, run)
        self.assert_gone(self.dst, dst_repo, dst_blobs, run)
        deletes = [e for e in writes_since(self.dst, md) if e[0] == "DELETE" and "/blobs/sha256:" in e[1]]
        self.assertEqual(len(deletes), len(dst_blobs))
        self.assertTrue(all(e[2] == 202 for e in deletes), deletes)


class RefusalTest(BenchLinkTestCase):
    def run_refused(self, repo, *extra):
        ms, md = self.marks(self.src, self.dst)
        run = crossdock("bench-link", f"{self.src.host}/{SRC_NS}", f"{self.dst.host}/{DST_NS}", "--insecure",
                        *SMALL, "--repo", repo, *extra)
        self.assertEqual(run.returncode, 2, run.describe())
        self.assertIn("refusing", run.stderr)
        self.assertIn("--force", run.stderr)
        self.assertEqual(writes_since(self.src, ms), [], "bench-link wrote to the source" + run.describe())
        self.assertEqual(writes_since(self.dst, md), [], "bench-link wrote to the target" + run.describe())
        return run

    def test_source_repo_with_a_tag_is_refused(self):
        client = self.src.client()
        image = corpus.push_image(client, f"{SRC_NS}/taken", "v1", "taken-src")
        run = self.run_refused("taken")
        self.assertIn(f"{self.src.host}/{SRC_NS}/taken", run.stderr)
        self.assertIn("v1", run.stderr)
        # Nothing was deleted: the tag and all its blobs are still there.
        self.assertEqual(check.tags(client, f"{SRC_NS}/taken"), ["v1"])
        self.assertEqual(check.missing_content(client, f"{SRC_NS}/taken", "v1"), [])
        self.assertTrue(all(client.blob_exists(f"{SRC_NS}/taken", b.digest) for b in image.all_blobs()))

    def test_target_repo_with_a_tag_is_refused(self):
        client = self.dst.client()
        corpus.push_image(client, f"{DST_NS}/taken-dst", "keep", "taken-dst")
        run = self.run_refused("taken-dst")
        self.assertIn(f"{self.dst.host}/{DST_NS}/taken-dst", run.stderr)
        self.assertEqual(check.tags(client, f"{DST_NS}/taken-dst"), ["keep"])
        self.assertEqual(check.missing_content(client, f"{DST_NS}/taken-dst", "keep"), [])

    def test_untagged_repo_is_refused_and_force_deletes_only_its_own(self):
        client = self.src.client()
        repo = f"{SRC_NS}/blobs-only"
        theirs = client.push_blob(repo, b"someone else's blob, not bench-link's\n" * 100)
        run = self.run_refused("blobs-only")
        self.assertIn("catalog", run.stderr)
        self.assertTrue(client.blob_exists(repo, theirs))

        ms = len(self.src.access_log())
        run = crossdock("bench-link", f"{self.src.host}/{SRC_NS}", f"{self.dst.host}/{DST_NS}", "--insecure",
                        *SMALL, "--repo", "blobs-only", "--force")
        self.assertEqual(run.returncode, 0, run.describe())
        self.assertIn("--force", run.stdout)
        self.assertTrue(client.blob_exists(repo, theirs), "bench-link --force deleted a blob it did not upload")
        deleted = [e for e in writes_since(self.src, ms) if e[0] == "DELETE"]
        self.assertNotIn(theirs, " ".join(e[1] for e in deleted))
        ours = uploaded_digests(self.src.access_log()[ms:])
        self.assertEqual(len(ours), 1)
        self.assert_gone(self.src, repo, ours, run)


class DeletesRefusedTest(BenchLinkTestCase):
    def test_left_blobs_are_reported(self):
        nodelete = NoDeleteRegistry(name="bench-nodelete").start()
        self.addCleanup(nodelete.stop)
        json_path = os.path.join(self.tmp, "link.json")
        ms = len(self.src.access_log())
        run = crossdock("bench-link", f"{self.src.host}/{SRC_NS}", f"{nodelete.host}/{DST_NS}", "--insecure",
                        *SMALL, "--json", json_path)
        self.assertEqual(run.returncode, 0, run.describe())
        self.assertIn("refuses deletes", run.stdout)
        self.assertIn("storage.delete.enabled", run.stdout)
        with open(json_path) as f:
            j = json.load(f)
        c = j["cleanup"]
        self.assertTrue(c["deletes_unsupported"])
        on_target = uploaded_digests(nodelete.access_log())
        # The source's blob was deleted; every target blob is listed as left, and is still there.
        expect_left = sorted(f"{nodelete.host}/{r}@{d}" for r, d in on_target)
        self.assertEqual(sorted(c["left"]), expect_left)
        self.assertEqual(c["blobs_deleted"], 1)
        self.assertEqual(c["blobs_created"], 1 + len(on_target))
        client = nodelete.client()
        self.assertTrue(all(client.blob_exists(r, d) for r, d in on_target))
        for left in expect_left[:5]:
            self.assertIn(left, run.stdout)
        # bench-link stops asking a registry after its first 405: at most the batch in flight then.
        refused = [e for e in nodelete.access_log() if e[0] == "DELETE"]
        self.assertLessEqual(len(refused), 8, refused)
        self.assertTrue(all(e[2] == 405 for e in refused), refused)
        self.assert_gone(self.src, j["source_repository"], uploaded_digests(self.src.access_log()[ms:]), run)


class InterruptTest(BenchLinkTestCase):
    def test_sigint_cleans_up(self):
        ms, md = self.marks(self.src, self.dst)
        args = ["bench-link", f"{self.src.host}/{SRC_NS}", f"{self.dst.host}/{DST_NS}", "--insecure",
                "--size", "64", "--streams", "1,2,4,8,16", "--chunk-sizes", "5,8,16"]
        p = subprocess.Popen([CROSSDOCK] + args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=base_env())
        err_lines = []
        seen_get = threading.Event()

        def read_stderr():
            for raw in p.stderr:
                line = raw.decode("utf-8", "replace")
                err_lines.append(line)
                if "GET " in line and "stream(s)" in line:
                    seen_get.set()

        reader = threading.Thread(target=read_stderr, daemon=True)
        reader.start()
        try:
            deadline = time.monotonic() + 60
            while not seen_get.wait(0.1) and p.poll() is None and time.monotonic() < deadline:
                pass
            self.assertTrue(seen_get.is_set(), f"no GET measurement within 60 s (exit {p.poll()}):\n"
                            + "".join(err_lines))
            p.send_signal(signal.SIGINT)
            stdout = p.stdout.read()
            p.wait(timeout=RUN_TIMEOUT)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        reader.join(10)
        run = Run(args, p.returncode, stdout, "".join(err_lines))
        self.assertEqual(run.returncode, 1, run.describe())
        self.assertIn("interrupted", run.stderr)
        src_blobs = uploaded_digests(self.src.access_log()[ms:])
        dst_blobs = uploaded_digests(self.dst.access_log()[md:])
        self.assertEqual(len(src_blobs), 1, run.describe())
        (src_repo, _), = src_blobs
        dst_repo = DST_NS + src_repo[len(SRC_NS):]
        self.assert_writes_inside(self.src, ms, src_repo, run)
        self.assert_writes_inside(self.dst, md, dst_repo, run)
        self.assert_gone(self.src, src_repo, src_blobs, run)
        self.assert_gone(self.dst, dst_repo, dst_blobs, run)


class AuthTest(unittest.TestCase):
    """htpasswd + TLS (--ca-file, --src-creds/--dest-creds), and bearer tokens: distribution 2.8
    wants the "*" action for DELETE, which a pull,push token does not grant."""

    def setUp(self):
        if not (os.path.isfile(CROSSDOCK) and os.access(CROSSDOCK, os.X_OK)):
            self.skipTest(f"no crossdock at {CROSSDOCK}")

    def check_clean_run(self, src, dst, args, src_client, dst_client):
        ms, md = len(src.access_log()), len(dst.access_log())
        run = crossdock("bench-link", f"{src.host}/{SRC_NS}", f"{dst.host}/{DST_NS}", *SMALL, *args)
        self.assertEqual(run.returncode, 0, run.describe())
        self.assertRegex(run.stdout, r"cleanup: (\d+) of \1 blob\(s\) bench-link uploaded deleted\n", run.describe())
        for secret in ("s3cret-Pa55", "src-T0ken-Pa55", "dst-T0ken-Pa55"):
            self.assertNotIn(secret, run.output)
        src_blobs = uploaded_digests(src.access_log()[ms:])
        dst_blobs = uploaded_digests(dst.access_log()[md:])
        self.assertEqual(len(src_blobs), 1, run.describe())
        self.assertGreater(len(dst_blobs), 1, run.describe())
        for client, blobs in ((src_client, src_blobs), (dst_client, dst_blobs)):
            for repo, digest in blobs:
                self.assertFalse(client.blob_exists(repo, digest), f"{repo}@{digest} left" + run.describe())
        return run

    def test_htpasswd_tls(self):
        src = Registry(auth=True, tls=True, name="bench-auth-src").start()
        self.addCleanup(src.stop)
        dst = Registry(auth=True, tls=True, name="bench-auth-dst", username="other", password="0ther-s3cret-Pa55").start()
        self.addCleanup(dst.stop)
        self.check_clean_run(src, dst, ["--ca-file", src.ca_file, "--src-creds", src.creds, "--dest-creds", dst.creds],
                             src.client(), dst.client())

    def test_bearer_tokens(self):
        from tokenserver import TokenRegistry, TokenServer
        regs = []
        for name, user in (("bench-tok-src", ("srcuser", "src-T0ken-Pa55")),
                           ("bench-tok-dst", ("dstuser", "dst-T0ken-Pa55"))):
            ts = TokenServer(dict([("harness", "h4rness-Pa55"), user]), name=f"{name}-token")
            ts.start()
            self.addCleanup(ts.stop)
            reg = TokenRegistry(ts, name=name)
            reg.start()
            self.addCleanup(reg.stop)
            regs.append((ts, reg))
        (sts, src), (dts, dst) = regs
        self.check_clean_run(src, dst, ["--insecure", "--src-creds", "srcuser:src-T0ken-Pa55",
                                        "--dest-creds", "dstuser:dst-T0ken-Pa55"],
                             src.client("harness", "h4rness-Pa55"), dst.client("harness", "h4rness-Pa55"))
        scopes = [s for r in dts.requests("dstuser") if r.granted for s in r.scopes]
        self.assertTrue(any(re.fullmatch(r"repository:.+:\*", s) for s in scopes), scopes)


class UsageErrorTest(unittest.TestCase):
    def test_usage_errors_exit_2(self):
        if not (os.path.isfile(CROSSDOCK) and os.access(CROSSDOCK, os.X_OK)):
            self.skipTest(f"no crossdock at {CROSSDOCK}")
        cases = [
            ["bench-link", "127.0.0.1:1/a"],                                        # one reference
            ["bench-link", "127.0.0.1:1/a", "127.0.0.1:1/b", "--streams", "0"],
            ["bench-link", "127.0.0.1:1/a", "127.0.0.1:1/b", "--streams", "1,65"],
            ["bench-link", "127.0.0.1:1/a", "127.0.0.1:1/b", "--chunk-sizes", "4"],
            ["bench-link", "127.0.0.1:1/a", "127.0.0.1:1/b", "--size", "0"],
            ["bench-link", "https://127.0.0.1:1/a", "127.0.0.1:1/b"],               # a scheme is not a reference
            ["bench-link", "127.0.0.1:1/a", "127.0.0.1:1/b", "--repo", "Not_Valid"],
            ["bench-link", "127.0.0.1:1/a", "127.0.0.1:1/b", "--src-creds", "nocolon"],
        ]
        for args in cases:
            with self.subTest(args=args):
                run = crossdock(*args, timeout=30)
                self.assertEqual(run.returncode, 2, run.describe())

    def test_unreachable_registry_exits_1(self):
        if not (os.path.isfile(CROSSDOCK) and os.access(CROSSDOCK, os.X_OK)):
            self.skipTest(f"no crossdock at {CROSSDOCK}")
        from registry import free_port
        port = free_port()
        run = crossdock("bench-link", f"127.0.0.1:{port}/a", f"127.0.0.1:{port}/b", "--insecure", *SMALL, timeout=120)
        self.assertEqual(run.returncode, 1, run.describe())
        self.assertIn(f"127.0.0.1:{port}", run.stderr)


if __name__ == "__main__":
    unittest.main()
