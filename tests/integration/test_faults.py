"""Fault injection: `crossdock mirror` against registries that misbehave.

A FaultProxy (proxy.py) sits in front of the SOURCE or of the TARGET
registry and answers some requests wrongly: retryable statuses (503, 429 with
Retry-After, 500), a connection cut mid-body, a corrupted blob, a blob longer
or shorter than its descriptor, a malformed manifest.  crossdock must retry
what is transient and fail cleanly - per artifact, with a reason, exit 1 -
what is not, never tagging anything that references bad content.  The
chunked-upload test checks the target's access log for PATCH chunks.

Every test starts its own registries and pushes its own corpus (about a
second); what lands on the target is checked directly on the registry, never
through the proxy.  Each test also checks that its fault really was injected
(``Fault.hits``), so a test cannot pass because the fault missed.

``FaultProxySelfTest`` checks the proxy's fault modes with a plain HTTP
client; it does not need crossdock.
"""

import hashlib
import http.client
import json
import math
import os
import re
import subprocess
import sys
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import check  # noqa: E402
import corpus  # noqa: E402
from proxy import Fault, FaultProxy  # noqa: E402
from registry import Registry  # noqa: E402
from test_mirror import CROSSDOCK, MirrorTestCase, crossdock, tpath  # noqa: E402

SRC_NS = "src-ns"
DST_NS = "dst"
MiB = 1024 * 1024

# Request targets (query string included, as the proxy matches them).
BLOB_GET = r"^/v2/.+/blobs/sha256:[0-9a-f]{64}(\?|$)"
MANIFEST = r"^/v2/.+/manifests/[^/?]+(\?|$)"
UPLOAD_PUT = r"^/v2/.+/blobs/uploads/[^/?]+\?.*\bdigest=sha256(%3A|:)[0-9a-f]{64}"
UPLOAD_POST = r"^/v2/.+/blobs/uploads/(\?(?!.*\bmount=).*)?$"   # a new upload, not a mount
INTERNAL_ERROR_WORDS = ("internal error", "segmentation fault", "terminate called")


def blob_path(digest):
    return rf"/blobs/{re.escape(digest)}(\?|$)"


def manifest_path(repo, ref):
    return rf"^/v2/{re.escape(repo)}/manifests/{re.escape(ref)}(\?|$)"


def users_of(c, digest):
    """In-namespace entries whose manifest (or an index child) references the blob."""
    return [e for e in c.in_namespace()
            if any(b.digest == digest for b in e.manifest.all_blobs())]


def blob_by_label(c, label):
    for b in c.all_blobs().values():
        if b.label == label:
            return b
    raise KeyError(label)


def digest_hex(d):
    return d.split(":", 1)[1]


class FaultTestCase(MirrorTestCase):
    """Helpers: fresh source (with corpus) and target per test, proxies, checks."""

    @classmethod
    def setUpClass(cls):
        if not (os.path.isfile(CROSSDOCK) and os.access(CROSSDOCK, os.X_OK)):
            raise RuntimeError(f"crossdock binary not found at {CROSSDOCK} "
                               "(build it, or set CROSSDOCK_BIN)")

    def source(self, big=False):
        src = self.start_registry(name="src")
        c = corpus.push_corpus(src.client(), SRC_NS, big=big, outside=False)
        return src, c

    def proxy(self, upstream, *rules):
        px = FaultProxy(upstream, rules)
        px.start()
        self.addCleanup(px.stop)
        return px

    def mirror(self, src_host, tgt_host, *flags):
        return crossdock("mirror", f"{src_host}/{SRC_NS}", f"{tgt_host}/{DST_NS}",
                         "--insecure", "--json", *flags)

    # -- assertions ----------------------------------------------------------
    def assertInjected(self, rule, run, px, exactly=None):
        msg = (f"fault {rule.name!r} injected {rule.hits} times (matched {rule.matched}); "
               f"proxy saw:\n" + "\n".join(map(repr, px.log[-60:])) + run.describe())
        if exactly is None:
            self.assertGreater(rule.hits, 0, msg)
        else:
            self.assertEqual(rule.hits, exactly, msg)

    def assertNoCrash(self, run):
        self.assertGreaterEqual(run.returncode, 0, "crossdock was killed by a signal"
                                + run.describe())
        low = run.output.lower()
        for w in INTERNAL_ERROR_WORDS:
            self.assertNotIn(w, low, f"crossdock reports {w!r}" + run.describe())

    def assertAllCopied(self, run, tgt, c, target_label):
        self.assertNoCrash(run)
        self.assertExit(run, 0)
        s = self.assertSummaryShape(run)
        entries = c.in_namespace()
        self.assertEqual(s["failed"], 0, run.describe())
        self.assertItems(run, target_label, entries, "copied")
        self.assertMirrored(tgt, DST_NS, entries)
        return s

    def assertRetriedLater(self, px, fault_event, status_ok, run, method=None, path=None):
        """After the faulty answer, the same request came again and succeeded."""
        method = method or fault_event.method
        path = re.escape(fault_event.path) + "$" if path is None else path
        later = [e for e in px.events(method, path)
                 if e.t_start >= fault_event.t and e.fault is None]
        self.assertTrue(any(e.status in status_ok for e in later),
                        f"{fault_event!r} was never retried successfully; later: {later}"
                        + run.describe())
        return later

    def assertPartialFailure(self, run, tgt, c, failed, reason_checks, target_label):
        """``failed`` entries are failed items (reason passes every check), every
        other entry is copied; exit 1; failed tags absent on the target."""
        self.assertNoCrash(run)
        self.assertExit(run, 1)
        s = self.assertSummaryShape(run)
        rest = [e for e in c.in_namespace() if e not in failed]
        self.assertTrue(failed and rest, "test is wrong: nothing or everything fails")
        self.assertItems(run, target_label, failed, "failed", exact=False, check_digest=False)
        got = run.by_repo_tag(target_label)
        for e in failed:
            reason = got[(e.relative, e.tag)]["reason"]
            self.assertTrue(reason, f"failed item without a reason: {got[(e.relative, e.tag)]}"
                            + run.describe())
            for label, pred in reason_checks:
                self.assertTrue(pred(reason), f"reason of {e.relative}:{e.tag} does not "
                                f"{label}: {reason!r}" + run.describe())
        self.assertItems(run, target_label, rest, "copied", exact=False)
        self.assertEqual(len(run.items), len(c.in_namespace()),
                         "unexpected items" + run.describe())
        self.assertEqual(s["failed"], len(failed), run.describe())
        self.assertEqual(s["copied"], len(rest), run.describe())
        self.assertMirrored(tgt, DST_NS, rest)
        cl = tgt.client()
        for e in failed:
            repo = tpath(DST_NS, e.relative)
            self.assertNotIn(e.tag, check.tags(cl, repo),
                             f"{repo}:{e.tag} is tagged on the target although it failed"
                             + run.describe())
            self.assertIsNone(check.manifest(cl, repo, e.digest),
                              f"{repo}@{e.digest} is on the target although it failed")
        return s

    def assertBlobNowhere(self, tgt, c, digest, run):
        cl = tgt.client()
        for rel in c.repositories():
            self.assertFalse(cl.blob_exists(tpath(DST_NS, rel), digest),
                             f"bad blob {digest} finalised in {DST_NS}/{rel}" + run.describe())


# --------------------------------------------------------------------------
# A. faults on the source
# --------------------------------------------------------------------------

class SourceTransientFaultTest(FaultTestCase):
    def test_blob_get_503_is_retried(self):
        src, c = self.source()
        tgt = self.start_registry(name="tgt")
        rule = Fault("GET", BLOB_GET, "respond", times=2, status=503, name="blob-503")
        px = self.proxy(src, rule)
        run = self.mirror(px.host, tgt.host)
        self.assertInjected(rule, run, px, exactly=2)
        self.assertAllCopied(run, tgt, c, f"{tgt.host}/{DST_NS}")
        for ev in px.events("GET", BLOB_GET):
            if ev.fault:
                self.assertRetriedLater(px, ev, (200,), run)

    def test_manifest_429_retry_after_is_honoured(self):
        src, c = self.source()
        tgt = self.start_registry(name="tgt")
        rule = Fault("GET", MANIFEST, "respond", times=1, status=429,
                     headers={"Retry-After": "2"}, name="manifest-429")
        px = self.proxy(src, rule)
        t0 = time.monotonic()
        run = self.mirror(px.host, tgt.host)
        elapsed = time.monotonic() - t0
        self.assertInjected(rule, run, px, exactly=1)
        self.assertAllCopied(run, tgt, c, f"{tgt.host}/{DST_NS}")
        self.assertGreaterEqual(elapsed, 1.9, f"run took {elapsed:.2f}s: Retry-After: 2 "
                                "was not honoured" + run.describe())
        ev = next(e for e in px.log if e.fault)
        later = self.assertRetriedLater(px, ev, (200,), run)
        gap = min(e.t_start for e in later) - ev.t
        self.assertGreaterEqual(gap, 1.9, f"{ev.path} was asked again {gap:.2f}s after the "
                                "429 with Retry-After: 2" + run.describe())

    def test_429_without_retry_after_slows_the_whole_registry(self):
        # A 429 pauses every request to that registry (about 1 s, doubling), not just the one
        # that drew it: no request to the source starts inside the pause.
        src, c = self.source()
        tgt = self.start_registry(name="tgt")
        rule = Fault("GET", BLOB_GET, "respond", times=1, status=429, name="blob-429")
        px = self.proxy(src, rule)
        run = self.mirror(px.host, tgt.host)
        self.assertInjected(rule, run, px, exactly=1)
        self.assertAllCopied(run, tgt, c, f"{tgt.host}/{DST_NS}")
        ev = next(e for e in px.log if e.fault)
        # Requests already on their way when the 429 left the proxy (a few ms) are not paused.
        inside = [e for e in px.log if not e.fault and ev.t + 0.05 < e.t_start < ev.t + 0.8]
        self.assertEqual(inside, [], "requests to the source started inside the pause after a "
                         "429: the registry was not slowed down" + run.describe())
        self.assertTrue([e for e in px.log if e.t_start > ev.t + 0.8],
                        "nothing was asked after the pause" + run.describe())

    def test_connection_cut_mid_blob_is_refetched(self):
        src, c = self.source(big=True)
        tgt = self.start_registry(name="tgt")
        big = c.big_layer
        rule = Fault("GET", blob_path(big.digest), "cut", times=1, name="cut-big-blob")
        px = self.proxy(src, rule)
        run = self.mirror(px.host, tgt.host)
        self.assertInjected(rule, run, px, exactly=1)
        cut = next(e for e in px.log if e.fault)
        self.assertLess(cut.sent, big.size, "the proxy did not cut the body")
        self.assertAllCopied(run, tgt, c, f"{tgt.host}/{DST_NS}")
        # Fetched again, whole or from where it broke (a ranged GET).
        self.assertRetriedLater(px, cut, (200, 206), run)
        data = tgt.client().get_blob(f"{DST_NS}/team-a/web", big.digest)
        self.assertEqual(corpus.sha256_digest(data), big.digest, "big blob corrupted on target")


class SourceBadContentTest(FaultTestCase):
    def _bad_blob(self, label, action, **kw):
        src, c = self.source()
        tgt = self.start_registry(name="tgt")
        blob = blob_by_label(c, label)
        failed = users_of(c, blob.digest)
        rule = Fault("GET", blob_path(blob.digest), action, times=None,
                     name=f"{action}-{label}", **kw)
        px = self.proxy(src, rule)
        run = self.mirror(px.host, tgt.host)
        self.assertInjected(rule, run, px)
        return src, tgt, c, blob, failed, run, px

    def test_corrupted_blob_fails_its_image(self):
        src, tgt, c, blob, failed, run, px = self._bad_blob("web-app-v1", "corrupt")
        self.assertEqual([(e.relative, e.tag) for e in failed], [("team-a/web", "v1")])
        hexd = digest_hex(blob.digest)
        self.assertPartialFailure(run, tgt, c, failed, [
            ("mention 'digest'", lambda r: "digest" in r.lower()),
            (f"name the blob {blob.digest}", lambda r: hexd[:12] in r),
        ], f"{tgt.host}/{DST_NS}")
        self.assertBlobNowhere(tgt, c, blob.digest, run)

    def test_corrupted_blob_in_index_child_fails_the_index(self):
        src, tgt, c, blob, failed, run, px = self._bad_blob("worker-arm64", "corrupt")
        self.assertEqual([(e.relative, e.tag) for e in failed], [("team-b/worker", "multi")])
        hexd = digest_hex(blob.digest)
        self.assertPartialFailure(run, tgt, c, failed, [
            ("mention 'digest'", lambda r: "digest" in r.lower()),
            (f"name the blob {blob.digest}", lambda r: hexd[:12] in r),
        ], f"{tgt.host}/{DST_NS}")
        self.assertBlobNowhere(tgt, c, blob.digest, run)
        # The child manifest that references the bad blob is not on the target either.
        arm = [m for m in failed[0].manifest.children
               if any(b.digest == blob.digest for b in m.blobs)]
        self.assertEqual(len(arm), 1)
        self.assertIsNone(check.manifest(tgt.client(), f"{DST_NS}/team-b/worker", arm[0].digest),
                          "index child referencing the bad blob was pushed")

    def _size_words(self, r):
        low = r.lower()
        return any(w in low for w in ("size", "bytes", "length", "declare", "short", "long"))

    def test_source_sends_more_bytes_than_declared(self):
        src, tgt, c, blob, failed, run, px = self._bad_blob("api-app-v1", "extend", extra=4096)
        self.assertEqual(sorted((e.relative, e.tag) for e in failed),
                         [("team-a/api", "1.0.0"), ("team-a/api", "v1")])
        hexd = digest_hex(blob.digest)
        self.assertPartialFailure(run, tgt, c, failed, [
            (f"name the blob {blob.digest}", lambda r: hexd[:12] in r),
            ("say the size is wrong", self._size_words),
        ], f"{tgt.host}/{DST_NS}")
        self.assertBlobNowhere(tgt, c, blob.digest, run)

    def test_source_sends_fewer_bytes_than_declared(self):
        # Content-Length matches the short body and the connection closes cleanly.
        src, tgt, c, blob, failed, run, px = self._bad_blob("legacy-app", "truncate")
        self.assertEqual([(e.relative, e.tag) for e in failed], [("legacy/app", "v2")])
        hexd = digest_hex(blob.digest)
        self.assertPartialFailure(run, tgt, c, failed, [
            (f"name the blob {blob.digest}", lambda r: hexd[:12] in r),
            ("say the size is wrong", self._size_words),
        ], f"{tgt.host}/{DST_NS}")
        self.assertBlobNowhere(tgt, c, blob.digest, run)


class SourceMalformedManifestTest(FaultTestCase):
    def _malformed(self, rel, tag, replace):
        src, c = self.source()
        tgt = self.start_registry(name="tgt")
        e = c.entry(rel, tag)
        rule = Fault("GET|HEAD", manifest_path(f"{SRC_NS}/{rel}", tag), "replace",
                     replace=replace, name=f"malformed-{rel}:{tag}")
        px = self.proxy(src, rule)
        run = self.mirror(px.host, tgt.host)
        self.assertInjected(rule, run, px)
        self.assertPartialFailure(run, tgt, c, [e], [
            ("mention 'manifest'", lambda r: "manifest" in r.lower()),
        ], f"{tgt.host}/{DST_NS}")
        return run

    def test_invalid_json_manifest(self):
        self._malformed("team-a/web", "v1",
                        b'{"schemaVersion": 2, "mediaType": '
                        b'"application/vnd.oci.image.manifest.v1+json", "config": {"dig')

    def test_manifest_without_layers(self):
        def drop_layers(body):
            doc = json.loads(body)
            del doc["layers"]
            return json.dumps(doc, indent=3).encode()
        self._malformed("team-b/worker", "v1", drop_layers)


    def test_fail_fast_stops_at_the_first_failure(self):
        # Every manifest of the namespace is malformed: without --fail-fast every tag is tried and
        # reported; with it, crossdock stops starting new artifacts after the first failure.
        src, c = self.source()
        rule = Fault("GET", r"/v2/.*/manifests/.*", "replace", replace=b"not json", name="all-malformed")
        px = self.proxy(src, rule)
        tgt = self.start_registry(name="tgt")
        every = self.mirror(px.host, tgt.host, "--jobs", "1")
        self.assertEqual(every.returncode, 1, every.describe())
        tried = every.summary["failed"]
        self.assertGreaterEqual(tried, 8, every.describe())
        tgt2 = self.start_registry(name="tgt2")
        fast = self.mirror(px.host, tgt2.host, "--jobs", "1", "--fail-fast")
        self.assertEqual(fast.returncode, 1, fast.describe())
        self.assertGreaterEqual(fast.summary["failed"], 1, fast.describe())
        # At most the artifacts already in flight (8 per job) finish after the first failure.
        self.assertLessEqual(fast.summary["failed"], 8, fast.describe())
        self.assertLess(fast.summary["failed"], tried, fast.describe())


# --------------------------------------------------------------------------
# B. faults on the target
# --------------------------------------------------------------------------

class TargetTransientFaultTest(FaultTestCase):
    def _target_fault(self, rule):
        src, c = self.source()
        tgt = self.start_registry(name="tgt")
        px = self.proxy(tgt, rule)
        run = self.mirror(src.host, px.host)
        self.assertInjected(rule, run, px, exactly=1)
        self.assertAllCopied(run, tgt, c, f"{px.host}/{DST_NS}")
        return run, px, next(e for e in px.log if e.fault)

    def test_blob_upload_put_500_is_retried(self):
        rule = Fault("PUT", UPLOAD_PUT, "respond", times=1, status=500, name="upload-put-500")
        run, px, ev = self._target_fault(rule)
        digest = re.search(r"digest=(sha256(?:%3A|:)[0-9a-f]{64})", ev.path).group(1)
        digest = digest.replace("%3A", ":")
        ok = [e for e in px.events("PUT", UPLOAD_PUT)
              if e.t_start >= ev.t and e.status == 201
              and digest_hex(digest) in e.path]
        self.assertTrue(ok, f"upload of {digest} was not retried successfully"
                        + run.describe())

    def test_blob_upload_post_500_is_retried(self):
        rule = Fault("POST", UPLOAD_POST, "respond", times=1, status=500, name="upload-post-500")
        run, px, ev = self._target_fault(rule)
        repo = re.match(r"^/v2/(.+)/blobs/uploads/", ev.path).group(1)
        self.assertRetriedLater(px, ev, (202,), run,
                                path=rf"^/v2/{re.escape(repo)}/blobs/uploads/")

    def test_manifest_put_503_is_retried(self):
        rule = Fault("PUT", MANIFEST, "respond", times=1, status=503, name="manifest-put-503")
        run, px, ev = self._target_fault(rule)
        self.assertRetriedLater(px, ev, (201,), run)


# --------------------------------------------------------------------------
# C. chunked uploads
# --------------------------------------------------------------------------

_UPLOAD_RE = re.compile(r"^/v2/(?P<repo>.+)/blobs/uploads/(?P<uuid>[0-9a-fA-F-]{36})(?:\?(?P<q>.*))?$")


class ChunkedUploadTest(FaultTestCase):
    """--chunk-size N: blobs above N MiB go up as PATCH chunks of N MiB, each
    upload session finished by a PUT ?digest= (seen in the target's access log)."""

    def _chunked(self, chunk_mib):
        chunk = chunk_mib * MiB
        src, c = self.source(big=True)
        tgt = self.start_registry(name="tgt")
        run = self.mirror(src.host, tgt.host, "--chunk-size", str(chunk_mib))
        self.assertAllCopied(run, tgt, c, f"{tgt.host}/{DST_NS}")
        big = c.big_layer
        data = tgt.client().get_blob(f"{DST_NS}/team-a/web", big.digest)
        self.assertEqual(corpus.sha256_digest(data), big.digest)

        # Upload sessions in the target's access log, by UUID, in order.
        sessions = {}
        for method, path, status in tgt.access_log():
            m = _UPLOAD_RE.match(path)
            if m:
                sessions.setdefault(m.group("uuid"), []).append((method, status, m.group("q") or ""))

        def finished_digest(reqs):
            for method, status, q in reqs:
                d = re.search(r"\bdigest=(sha256(?:%3A|:)[0-9a-f]{64})", q)
                if method == "PUT" and status == 201 and d:
                    return d.group(1).replace("%3A", ":")
            return None

        blobs = c.all_blobs()
        log_excerpt = "\n".join(f"{u}: {[(m, s) for m, s, _ in r]}" for u, r in sessions.items())
        by_digest = {}
        for uuid, reqs in sessions.items():
            d = finished_digest(reqs)
            if d:
                by_digest.setdefault(d, []).append(reqs)
            patches = [r for r in reqs if r[0] == "PATCH"]
            if patches:
                # Each chunked upload ends with a PUT (201) that names the digest.
                self.assertEqual(reqs[-1][0], "PUT", f"upload {uuid} does not end with a PUT: "
                                 f"{[(m, s) for m, s, _ in reqs]}" + run.describe())
                self.assertEqual(reqs[-1][1], 201, f"upload {uuid}: final PUT failed"
                                 + run.describe())
                self.assertTrue(all(s == 202 for _, s, _ in patches),
                                f"upload {uuid}: a PATCH failed: {patches}")

        self.assertIn(big.digest, by_digest, "no finished upload of the big blob in the "
                      "target's access log:\n" + log_excerpt + run.describe())
        for d, uploads in by_digest.items():
            size = blobs[d].size if d in blobs else None
            if size is None or size <= chunk:
                continue
            want = math.ceil(size / chunk)
            for reqs in uploads:
                n = sum(1 for r in reqs if r[0] == "PATCH")
                self.assertEqual(n, want, f"blob {d} ({size} bytes) uploaded in {n} PATCH "
                                 f"chunks, expected {want} of {chunk_mib} MiB:\n"
                                 + log_excerpt + run.describe())
        return run

    def test_chunk_size_under_five_mib_is_a_usage_error(self):
        # Registries on S3-like storage require chunks of at least 5 MiB (but the last).
        r = subprocess.run([os.environ["CROSSDOCK_BIN"], "mirror", "127.0.0.1:1/a", "127.0.0.1:2/b",
                            "--insecure", "--chunk-size", "1"], capture_output=True, text=True, timeout=60)
        self.assertEqual(r.returncode, 2, r.stderr)
        self.assertIn("--chunk-size", r.stderr)

    def test_chunk_size_five_mib(self):
        self._chunked(5)


# --------------------------------------------------------------------------
# Self-test of the fault proxy (no crossdock needed)
# --------------------------------------------------------------------------

class FaultProxySelfTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.reg = Registry(name="proxy-selftest")
        cls.reg.start()
        try:
            cls.corpus = corpus.push_corpus(cls.reg.client(), SRC_NS, outside=False)
        except BaseException:
            cls.reg.stop()
            raise

    @classmethod
    def tearDownClass(cls):
        cls.reg.stop()

    def _get(self, px, path, method="GET"):
        conn = http.client.HTTPConnection("127.0.0.1", int(px.host.split(":")[1]), timeout=30)
        try:
            conn.request(method, path, headers={"Accept": corpus.ACCEPT_ALL})
            r = conn.getresponse()
            return r.status, dict(r.getheaders()), r.read()
        finally:
            conn.close()

    def test_fault_modes(self):
        c = self.corpus
        blob = blob_by_label(c, "web-app-v1")
        e = c.entry("team-a/web", "v1")
        bpath = f"/v2/{SRC_NS}/team-a/web/blobs/{blob.digest}"
        mpath = f"/v2/{SRC_NS}/team-a/web/manifests/v1"
        cases = {
            "respond": Fault("GET", blob_path(blob.digest), "respond", times=1, status=503,
                             headers={"Retry-After": "2"}),
            "corrupt": Fault("GET", blob_path(blob.digest), "corrupt", times=1),
            "truncate": Fault("GET", blob_path(blob.digest), "truncate", times=1),
            "extend": Fault("GET", blob_path(blob.digest), "extend", times=1, extra=100),
            "replace": Fault("GET|HEAD", manifest_path(f"{SRC_NS}/team-a/web", "v1"), "replace",
                             replace=b"not json"),
        }
        for name, rule in cases.items():
            with self.subTest(mode=name), FaultProxy(self.reg, [rule]) as px:
                if name == "respond":
                    st, h, body = self._get(px, bpath)
                    self.assertEqual((st, h.get("Retry-After")), (503, "2"))
                    self.assertEqual(self._get(px, bpath)[0], 200)   # times=1
                elif name == "corrupt":
                    st, h, body = self._get(px, bpath)
                    self.assertEqual(len(body), blob.size)
                    self.assertNotEqual(corpus.sha256_digest(body), blob.digest)
                    self.assertEqual(sum(a != b for a, b in zip(body, blob.data)), 1)
                elif name == "truncate":
                    st, h, body = self._get(px, bpath)
                    self.assertEqual(body, blob.data[:blob.size // 2])
                    self.assertEqual(int(h["Content-Length"]), blob.size // 2)
                elif name == "extend":
                    st, h, body = self._get(px, bpath)
                    self.assertEqual(body[:blob.size], blob.data)
                    self.assertEqual(len(body), blob.size + 100)
                else:
                    st, h, body = self._get(px, mpath)
                    self.assertEqual(body, b"not json")
                    self.assertEqual(h["Docker-Content-Digest"], corpus.sha256_digest(b"not json"))
                    st, h, _ = self._get(px, mpath, "HEAD")
                    self.assertEqual(int(h["Content-Length"]), len(b"not json"))
                    # Other tags pass unchanged.
                    st, h, body = self._get(px, f"/v2/{SRC_NS}/team-a/web/manifests/v2")
                    self.assertEqual(corpus.sha256_digest(body), c.entry("team-a/web", "v2").digest)
                self.assertEqual(rule.hits, 1 if name != "replace" else 2)
        self.assertEqual(e.digest, check.manifest_digest(self.reg.client(), f"{SRC_NS}/team-a/web", "v1"))

    def test_object_faults_serve_ranges_from_the_fake_object(self):
        blob = blob_by_label(self.corpus, "web-app-v1")
        path = f"/v2/{SRC_NS}/team-a/web/blobs/{blob.digest}"
        half = blob.size // 2

        def get(px, rng):
            conn = http.client.HTTPConnection("127.0.0.1", int(px.host.split(":")[1]), timeout=30)
            try:
                conn.request("GET", path, headers={"Range": rng})
                r = conn.getresponse()
                return r.status, dict(r.getheaders()), r.read()
            finally:
                conn.close()

        with FaultProxy(self.reg, [Fault("GET", blob_path(blob.digest), "truncate")]) as px:
            st, h, body = get(px, f"bytes={half}-")
            self.assertEqual(st, 416)
            self.assertEqual(h["Content-Range"], f"bytes */{half}")
            st, h, body = get(px, "bytes=0-9")
            self.assertEqual((st, body), (206, blob.data[:10]))
            self.assertEqual(h["Content-Range"], f"bytes 0-9/{half}")
        with FaultProxy(self.reg, [Fault("GET", blob_path(blob.digest), "corrupt")]) as px:
            st, h, body = get(px, f"bytes={half - 1}-{half + 1}")
            self.assertEqual(st, 206)
            self.assertEqual(body, bytes([blob.data[half - 1], blob.data[half] ^ 0xFF,
                                          blob.data[half + 1]]))
        with FaultProxy(self.reg, [Fault("GET", blob_path(blob.digest), "extend", extra=10)]) as px:
            st, h, body = get(px, "bytes=-12")
            self.assertEqual(st, 206)
            self.assertEqual(body[:2], blob.data[-2:])
            self.assertEqual(h["Content-Range"],
                             f"bytes {blob.size - 2}-{blob.size + 9}/{blob.size + 10}")
        # cut applies to ranged answers as they come from the registry.
        rule = Fault("GET", blob_path(blob.digest), "cut", times=1)
        with FaultProxy(self.reg, [rule]) as px:
            with self.assertRaises(http.client.IncompleteRead):
                get(px, "bytes=100-")
            st, h, body = get(px, "bytes=100-")
            self.assertEqual((st, body), (206, blob.data[100:]))
        self.assertEqual(rule.hits, 1)

    def test_cut_breaks_the_transfer(self):
        blob = blob_by_label(self.corpus, "base")
        rule = Fault("GET", blob_path(blob.digest), "cut", times=1)
        with FaultProxy(self.reg, [rule]) as px:
            with self.assertRaises(http.client.IncompleteRead) as cm:
                self._get(px, f"/v2/{SRC_NS}/team-a/web/blobs/{blob.digest}")
            self.assertEqual(len(cm.exception.partial), blob.size // 2)
            st, h, body = self._get(px, f"/v2/{SRC_NS}/team-a/web/blobs/{blob.digest}")
            self.assertEqual(hashlib.sha256(body).hexdigest(), digest_hex(blob.digest))
        self.assertEqual(rule.hits, 1)

    def test_target_rules_pass_uploads_after_the_fault(self):
        tgt = Registry(name="proxy-selftest-tgt")
        with tgt:
            rule = Fault("PUT", UPLOAD_PUT, "respond", times=1, status=500)
            with FaultProxy(tgt, [rule]) as px:
                cl = corpus.RegistryClient(px.url)
                with self.assertRaises(corpus.RegistryError) as cm:
                    cl.push_blob("x/y", b"hello")
                self.assertEqual(cm.exception.status, 500)
                cl.push_blob("x/y", b"hello")
                self.assertTrue(tgt.client().blob_exists("x/y", corpus.sha256_digest(b"hello")))
            self.assertEqual(rule.hits, 1)


if __name__ == "__main__":
    unittest.main(verbosity=2)
