"""Integration tests of crossdock's streaming blob pipeline.

What is tested (crossdock as a subprocess, real docker-registry 2.8 on
127.0.0.1, results checked through the registry API and the registries' own
logs; proxies from pipeproxy.py / proxy.py where a behaviour has to be
forced):

- a big blob (>= 32 MiB) is fetched by several ranged GETs that together read
  it exactly once, and is uploaded to every target as PATCH chunks of
  --chunk-size followed by one final PUT ?digest=;
- uploads overlap the download: with a throttled source, a target has
  PATCHed chunks before the source has sent the blob's last byte, and the
  final PUT comes only after it;
- a source that ignores Range (answers 200, whole body) still works;
- --cache DIR: a later run to a new target reads nothing from the source;
- a run killed (SIGKILL) in the middle of a blob resumes from the cache's
  partial: the next run reads fewer bytes than the blob from the source;
- a target that refuses PATCH (405) gets a monolithic PUT;
- a download that fails verification leaves no upload session (and no tag)
  on the targets;
- with three targets, the source is read once: bytes_read_source equals the
  unique blob bytes;
- ``--streams auto`` through the WAN emulator (tests/tools/wanem): the stream
  tuner raises the stream count while large blobs download and the workers it
  adds join a blob that is already being fetched; every tag arrives, nothing
  fails, and the source is still read once (a regression test for a worker
  that took a piece from an emptied queue: garbage ranges, re-reads, SIGSEGV).

Registry logs: besides the access log, distribution writes a logrus line
'msg="response completed"' (or "response completed with error") when it
has sent an answer, with a nanosecond
timestamp, the method, URI, status and http.response.written (body bytes);
``completed()`` parses those.  A proxy that buffers the upstream answer (all
of proxy.py's do) makes the *source registry's* timestamps meaningless for
what crossdock received, so timing checks use the proxy's own wall-clock
record (pipeproxy.PipeProxy.timeline) on the source side.
"""

import calendar
import hashlib
import json
import math
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import check  # noqa: E402
import corpus  # noqa: E402
from pipeproxy import PipeProxy  # noqa: E402
from proxy import Fault, FaultProxy  # noqa: E402
from registry import Registry, no_proxy_opener, start_filled  # noqa: E402
import wanemproc  # noqa: E402

CROSSDOCK = os.environ.get("CROSSDOCK_BIN") or os.path.join(
    HERE, "..", "..", "build", "tools", "crossdock")
RUN_TIMEOUT = 180          # seconds for one crossdock invocation
BENCH = os.path.join(HERE, "..", "..", "bench")   # bigcorpus.py: big layers streamed to a registry
MiB = 1024 * 1024

DEFAULT_STREAMS = 4        # crossdock's --streams default
DEFAULT_CHUNK = 64 * MiB   # crossdock's --chunk-size default
RANGE_THRESHOLD = 32 * MiB  # blobs from this size are fetched by ranged streams
CAS_CHUNK = 4 * MiB        # cache chunk: one .meta record per verified chunk
META_HEADER = 32
META_RECORD = 24

BIG_SIZE = 96 * MiB        # payload of the "one" image's layer
KILL_SIZE = 128 * MiB      # payload of the "kill" image's layer
CORP_BIG_SIZE = 40 * MiB   # big layer of the default corpus in "corp"

VERBOSE = os.environ.get("CROSSDOCK_PIPE_VERBOSE") == "1"


def note(msg):
    """Measurements worth seeing when tuning (CROSSDOCK_PIPE_VERBOSE=1)."""
    if VERBOSE:
        print(f"\n    [pipeline] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Running crossdock
# --------------------------------------------------------------------------

import cdenv  # noqa: E402
from cdenv import base_env  # noqa: E402


class Run:
    def __init__(self, args, returncode, stdout, stderr, seconds):
        self.args = args
        self.returncode = returncode
        self.stdout = stdout.decode("utf-8", "replace")
        self.stderr = stderr.decode("utf-8", "replace")
        self.seconds = seconds
        self._summary = None

    def describe(self):
        return (f"\n$ crossdock {' '.join(self.args)}\nexit {self.returncode} "
                f"after {self.seconds:.1f}s\n"
                f"--- stdout ---\n{self.stdout[-6000:]}\n"
                f"--- stderr ---\n{self.stderr[-4000:]}")

    @property
    def summary(self):
        if self._summary is None:
            try:
                self._summary = json.loads(self.stdout)
            except ValueError as e:
                raise AssertionError(f"--json output is not JSON ({e})"
                                     + self.describe()) from None
        return self._summary


def wanem_binary():
    """The WAN emulator (tests/tools/wanem): $WANEM_BIN (set by meson), else next to the
    crossdock under test in its build tree, else in this checkout's build/; None if none is
    executable."""
    cands = [os.environ.get("WANEM_BIN"),
             os.path.join(os.path.dirname(os.path.abspath(CROSSDOCK)), "..", "tests", "tools",
                          "wanem"),
             os.path.join(HERE, "..", "..", "build", "tests", "tools", "wanem")]
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return os.path.normpath(c)
    return None


class Wanem:
    """One wanem process in front of ``upstream`` (host:port): ``wanem --listen 127.0.0.1:0
    --upstream HOST:PORT [args]`` prints "listening 127.0.0.1:PORT" once it accepts."""

    def __init__(self, binary, upstream, args):
        self.cmd = [binary, "--listen", "127.0.0.1:0", "--upstream", upstream] + list(args)
        self.proc = None
        self.host = None

    def start(self, timeout=10.0):
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        self.host = wanemproc.listening_address(self.proc, timeout)
        if self.host is None:
            err = self.stop()
            raise RuntimeError(f"wanem did not start ({' '.join(self.cmd)}): stderr {err[-500:]!r}")
        return self

    def stop(self):
        """SIGTERM (SIGKILL after 5 s); returns what wanem wrote on stderr."""
        p, self.proc = self.proc, None
        if p is None:
            return ""
        if p.poll() is None:
            p.terminate()
        try:
            _, err = p.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate(timeout=5)
        return (err or b"").decode("utf-8", "replace")


def crossdock(*args, timeout=RUN_TIMEOUT):
    args = [str(a) for a in args]
    t0 = time.monotonic()
    try:
        p = subprocess.run([CROSSDOCK] + args, stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           env=base_env(), timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"crossdock {' '.join(args)} did not finish within "
                             f"{timeout}s; stderr so far:\n"
                             f"{(e.stderr or b'').decode(errors='replace')[-4000:]}")
    return Run(args, p.returncode, p.stdout, p.stderr, time.monotonic() - t0)


# --------------------------------------------------------------------------
# Registry logs and storage
# --------------------------------------------------------------------------

_KV_RE = re.compile(r'([A-Za-z_][\w.]*)=("(?:[^"\\]|\\.)*"|\S*)')
_UPLOAD_RE = re.compile(r"/blobs/uploads/([0-9a-fA-F-]{36})")


class Completed:
    """One 'response completed' line of a registry log."""

    __slots__ = ("t", "method", "uri", "status", "written", "start")

    def __init__(self, t, method, uri, status, written, duration=0.0):
        self.t, self.method, self.uri = t, method, uri
        self.status, self.written = status, written
        self.start = t - duration   # the log line is written when the response ends

    @property
    def session(self):
        m = _UPLOAD_RE.search(self.uri)
        return m.group(1) if m else None

    def __repr__(self):
        return f"{self.method} {self.uri[:100]} -> {self.status} {self.written}B @{self.t:.3f}"


def _unquote(v):
    if v.startswith('"') and v.endswith('"') and len(v) >= 2:
        return re.sub(r'\\(.)', r'\1', v[1:-1])
    return v


def _go_duration(s):
    """A Go duration ('1.5s', '850.2µs', '1m2.3s') in seconds; 0 if absent."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "µs": 1e-6, "us": 1e-6, "ns": 1e-9}
    return sum(float(v) * units[u] for v, u in re.findall(r"([\d.]+)(ms|µs|us|ns|h|m|s)", s or ""))


def _parse_time(s):
    """'2026-11-23T12:31:56.80657754Z' -> epoch seconds (float)."""
    s = s.rstrip("Z")
    base, _, frac = s.partition(".")
    t = calendar.timegm(time.strptime(base, "%Y-%m-%dT%H:%M:%S"))
    return t + (float("0." + frac) if frac else 0.0)


def log_mark(reg):
    """A position in ``reg``'s log: what completed() reads after it."""
    reg.settle_log()
    return len(reg.log_text())


def completed(reg, since=0):
    """[Completed] of the requests ``reg`` answered after log position ``since``."""
    reg.settle_log()
    out = []
    for line in reg.log_text()[since:].splitlines():
        if 'msg="response completed' not in line:   # "... completed" or "... completed with error"
            continue
        kv = {k: _unquote(v) for k, v in _KV_RE.findall(line)}
        try:
            out.append(Completed(_parse_time(kv["time"]), kv["http.request.method"],
                                 kv["http.request.uri"], int(kv["http.response.status"]),
                                 int(kv.get("http.response.written") or 0),
                                 _go_duration(kv.get("http.response.duration"))))
        except (KeyError, ValueError):
            continue
    return out


def blob_gets(entries, digest):
    return [e for e in entries if e.method == "GET" and f"/blobs/{digest}" in e.uri
            and "/uploads/" not in e.uri]


def upload_sessions(reg):
    """Upload sessions still open in a registry's storage: the
    repositories/**/_uploads/<uuid> entries that hold a ``startedat`` or a
    ``data`` file (relative paths, sorted).

    distribution 2.8 removes ``data`` and ``startedat`` when a session is
    cancelled (DELETE) or completed, but its request epilogue closes the
    writer once more and that re-creates ``_uploads/<uuid>/hashstates/...``
    (see distribution/distribution#4524 and #1697).  Such a husk is not a
    session any more (Resume needs ``startedat``: the registry answers
    BLOB_UPLOAD_UNKNOWN), so it is not counted; ``upload_husks`` lists them."""
    return [p for p, files in _upload_entries(reg) if {"startedat", "data"} & files]


def upload_husks(reg):
    return [p for p, files in _upload_entries(reg) if not {"startedat", "data"} & files]


def _upload_entries(reg):
    root = os.path.join(reg.storage_dir, "docker", "registry", "v2", "repositories")
    out = []
    for dirpath, dirnames, _ in os.walk(root):
        if os.path.basename(dirpath) != "_uploads":
            continue
        for name in sorted(os.listdir(dirpath)):
            full = os.path.join(dirpath, name)
            files = set(os.listdir(full)) if os.path.isdir(full) else {name}
            out.append((os.path.relpath(full, root), files))
        dirnames[:] = []
    return sorted(out)


def blob_sha256(reg, repo, digest):
    """Stream a blob from the registry and hash it: 'sha256:...' (or None if 404)."""
    import urllib.error
    opener = no_proxy_opener(reg.ssl_context())
    h = hashlib.sha256()
    try:
        with opener.open(f"{reg.url}/v2/{repo}/blobs/{digest}", timeout=60) as r:
            while True:
                b = r.read(1 << 20)
                if not b:
                    break
                h.update(b)
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise
    return "sha256:" + h.hexdigest()


# --------------------------------------------------------------------------
# Shared source registry (read-only for every test)
# --------------------------------------------------------------------------

SOURCE = None
ONE = None       # namespace "one": app:v1 = config + one ~96 MiB layer
KILL = None      # namespace "kill": app:v1 = config + one ~128 MiB layer
CORP = None      # namespace "corp": the default corpus with a ~40 MiB layer


class Image:
    """A single-image namespace on the source: NS/app:v1."""

    def __init__(self, ns, manifest, big):
        self.ns = ns
        self.relative = "app"
        self.tag = "v1"
        self.repository = f"{ns}/app"
        self.digest = manifest.digest
        self.media_type = manifest.media_type
        self.blobs = {b.digest: b.size for b in manifest.blobs}
        self.big_digest = big.digest
        self.big_size = big.size
        self.unique_bytes = sum(self.blobs.values())


def _push_image(client, builder, ns, label, size):
    m = builder.image(label, [label + "-layer"], sizes={label + "-layer": size})
    corpus.push_manifest_tree(client, f"{ns}/app", m, "v1")
    big = m.blobs[1]
    img = Image(ns, m, big)
    for b in m.blobs:          # drop the bytes: the tests only need digests and sizes
        b.data = None
    return img


def setUpModule():
    global SOURCE, ONE, KILL, CORP
    if not (os.path.isfile(CROSSDOCK) and os.access(CROSSDOCK, os.X_OK)):
        raise RuntimeError(f"crossdock binary not found at {CROSSDOCK} "
                           "(build it, or set CROSSDOCK_BIN)")
    def fill(client):
        b = corpus.Builder(seed=777)
        one = _push_image(client, b, "one", "one", BIG_SIZE)
        kill = _push_image(client, b, "kill", "kill", KILL_SIZE)
        b._layers.clear()
        corp = corpus.build_corpus("corp", big=True, big_size=CORP_BIG_SIZE, outside=False)
        corp.push(client)
        return one, kill, corp

    SOURCE, (ONE, KILL, CORP) = start_filled("pipe-src", fill)


def tearDownModule():
    if SOURCE is not None:
        SOURCE.stop()
    cdenv.remove_empty_docker_config()


# --------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------

class PipelineTest(unittest.TestCase):
    maxDiff = None

    # -- fixtures ----------------------------------------------------------
    def start_registry(self, name="tgt"):
        reg = Registry(name=name)
        reg.start()
        self.addCleanup(reg.stop)
        return reg

    def tempdir(self, prefix):
        d = tempfile.mkdtemp(prefix=prefix)
        self.addCleanup(shutil.rmtree, d, True)
        return d

    # -- assertions --------------------------------------------------------
    def assertExit(self, run, code):
        self.assertEqual(run.returncode, code, f"expected exit {code}" + run.describe())

    def assertImageMirrored(self, reg, tns, img, run):
        """NS/app:v1 is on ``reg`` under ``tns`` with the source digest, complete,
        and the big layer's bytes hash to its digest."""
        cl = reg.client()
        repo = f"{tns}/{img.relative}"
        info = check.manifest(cl, repo, img.tag)
        self.assertIsNotNone(info, f"{reg.host}/{repo}:{img.tag} missing" + run.describe())
        self.assertEqual(info.digest, img.digest, f"{reg.host}/{repo}:{img.tag}" + run.describe())
        self.assertEqual(check.missing_content(cl, repo, img.tag), [], run.describe())
        self.assertEqual(blob_sha256(reg, repo, img.big_digest), img.big_digest,
                         f"big layer on {reg.host}/{repo} does not hash to its digest"
                         + run.describe())

    def assertCorpusMirrored(self, reg, tns, c, run):
        cl = reg.client()
        for e in c.in_namespace():
            repo = f"{tns}/{e.relative}"
            info = check.manifest(cl, repo, e.tag)
            self.assertIsNotNone(info, f"{reg.host}/{repo}:{e.tag} missing" + run.describe())
            self.assertEqual(info.digest, e.digest, f"{reg.host}/{repo}:{e.tag}" + run.describe())
            self.assertEqual(check.missing_content(cl, repo, e.tag), [],
                             f"{reg.host}/{repo}:{e.tag}" + run.describe())

    def assertChunkedUpload(self, reg, entries, img, chunk, run):
        """The big blob reached ``reg`` as PATCHes of one session (as many as
        chunks) and exactly one final PUT ?digest= after them.  Returns
        (patches, put)."""
        d = img.big_digest
        puts = [e for e in entries if e.method == "PUT" and f"digest={d}" in e.uri.replace("%3A", ":")]
        self.assertEqual(len(puts), 1, f"{reg.host}: final PUTs of {d}: {puts}" + run.describe())
        put = puts[0]
        self.assertEqual(put.status, 201, f"{reg.host}: {put}" + run.describe())
        sess = put.session
        self.assertIsNotNone(sess, f"{reg.host}: PUT not on an upload session: {put}")
        patches = [e for e in entries if e.method == "PATCH" and e.session == sess]
        want = math.ceil(img.big_size / chunk)
        self.assertEqual(len(patches), want,
                         f"{reg.host}: {len(patches)} PATCHes on the session of {d} "
                         f"({img.big_size} bytes, chunk {chunk}), expected {want}: "
                         f"{patches}" + run.describe())
        for p in patches:
            self.assertEqual(p.status, 202, f"{reg.host}: {p}" + run.describe())
            self.assertLessEqual(p.t, put.t, f"{reg.host}: PATCH after the final PUT: {p} / {put}")
        return patches, put

    # -- 1 -----------------------------------------------------------------
    def test_big_blob_ranged_read_once_chunked_to_two_targets(self):
        ta = self.start_registry("tgt-a")
        tb = self.start_registry("tgt-b")
        src_mark = log_mark(SOURCE)
        run = crossdock("mirror", f"{SOURCE.host}/one", f"{ta.host}/dst", f"{tb.host}/dst",
                        "--insecure", "--json")
        self.assertExit(run, 0)
        s = run.summary
        self.assertEqual(s["failed"], 0, run.describe())
        self.assertEqual(s["copied"], 2, run.describe())
        for reg in (ta, tb):
            self.assertImageMirrored(reg, "dst", ONE, run)

        # Source: several 206 ranged GETs for the blob, together exactly its bytes.
        gets = blob_gets(completed(SOURCE, src_mark), ONE.big_digest)
        self.assertGreaterEqual(len(gets), 2, f"source GETs of the big blob: {gets}" + run.describe())
        self.assertTrue(all(g.status == 206 for g in gets),
                        f"not all ranged (206): {gets}" + run.describe())
        # The blob is cut into ranged pieces pulled in order by --streams workers (so the verified
        # prefix, which uploads follow, advances at the aggregate rate): at least one per stream.
        self.assertGreaterEqual(len(gets), DEFAULT_STREAMS,
                                f"expected at least {DEFAULT_STREAMS} ranged GETs (--streams default): {gets}")
        # The layer is a round size plus a few KiB of framing: that remainder rides with the last
        # piece instead of costing a request of its own after the other streams are done.
        self.assertGreaterEqual(min(g.written for g in gets), max(g.written for g in gets) // 4,
                                f"a short ranged GET on its own: {[(g.status, g.written) for g in gets]}"
                                + run.describe())
        self.assertEqual(sum(g.written for g in gets), ONE.big_size,
                         f"source GETs of the big blob sum to "
                         f"{sum(g.written for g in gets)}, blob is {ONE.big_size}: {gets}"
                         + run.describe())
        self.assertEqual(s["bytes_read_source"], ONE.unique_bytes, run.describe())
        note(f"source GETs of the big blob: {[(g.status, g.written) for g in gets]}")

        # Targets: PATCH chunks in one session, then one final PUT each.
        for reg in (ta, tb):
            self.assertChunkedUpload(reg, completed(reg), ONE, DEFAULT_CHUNK, run)
            self.assertEqual(upload_sessions(reg), [], f"upload sessions left on {reg.host}")

        if check.skopeo_available():   # an independent client pulls it, verifying every blob
            check.skopeo_copy_verify(ta.host, "dst/app", "v1")

    # -- 2 -----------------------------------------------------------------
    def test_uploads_overlap_throttled_download(self):
        rate = 12 * MiB       # ~8 s for the ~96 MiB layer
        tgt = self.start_registry("tgt")
        with PipeProxy(SOURCE, rate=rate) as px:
            run = crossdock("mirror", f"{px.host}/one", f"{tgt.host}/dst", "--insecure", "--json")
        self.assertExit(run, 0)
        self.assertEqual(px.handler_errors, [])
        self.assertImageMirrored(tgt, "dst", ONE, run)

        gets = px.timeline("GET", re.escape(ONE.big_digest))
        self.assertTrue(gets, "no GET of the big blob went through the proxy" + run.describe())
        self.assertEqual(sum(g.body_bytes for g in gets), ONE.big_size, f"{gets}" + run.describe())
        first = min(g.t_start for g in gets)
        last = max(g.t_end for g in gets)
        self.assertGreater(last - first, 4.0,
                           f"the throttled download took only {last - first:.1f}s: {gets}")

        patches, put = self.assertChunkedUpload(tgt, completed(tgt), ONE, DEFAULT_CHUNK, run)
        rel = [round(p.t - first, 2) for p in patches]
        early = [p for p in patches if p.t < last - 1.0]
        note(f"download {last - first:.2f}s; PATCHes done at {rel}; final PUT at "
             f"+{put.t - first:.2f}s; crossdock {run.seconds:.1f}s")
        self.assertTrue(early,
                        f"no PATCH completed (on the target) at least 1 s before the source's "
                        f"last GET of the blob completed (at +{last - first:.2f}s): PATCHes at "
                        f"{rel} s after the first GET started" + run.describe())
        self.assertGreater(put.t, last,
                           f"final PUT at +{put.t - first:.2f}s, before the download ended "
                           f"(+{last - first:.2f}s)" + run.describe())

    # -- 3 -----------------------------------------------------------------
    def test_source_ignoring_range(self):
        tgt = self.start_registry("tgt")
        with PipeProxy(SOURCE, strip_range=True) as px:
            run = crossdock("mirror", f"{px.host}/one", f"{tgt.host}/dst", "--insecure", "--json")
        self.assertExit(run, 0)
        self.assertEqual(px.handler_errors, [])
        self.assertImageMirrored(tgt, "dst", ONE, run)
        self.assertGreaterEqual(px.ranges_stripped, 1, "crossdock sent no Range header at all")
        gets = px.timeline("GET", re.escape(ONE.big_digest))
        self.assertTrue(gets, run.describe())
        self.assertTrue(all(g.status == 200 for g in gets), f"{gets}")
        self.assertTrue(any(g.body_bytes == ONE.big_size for g in gets),
                        f"no GET delivered the whole blob: {gets}" + run.describe())
        self.assertEqual(run.summary["bytes_read_source"], ONE.unique_bytes, run.describe())

    # -- 4 -----------------------------------------------------------------
    def test_cache_reused_for_new_target(self):
        cache = self.tempdir("crossdock-pipe-cache-")
        ta = self.start_registry("tgt-a")
        tb = self.start_registry("tgt-b")
        unique = CORP.all_blobs(CORP.in_namespace())

        run1 = crossdock("mirror", f"{SOURCE.host}/corp", f"{ta.host}/dst",
                         "--insecure", "--json", "--cache", cache)
        self.assertExit(run1, 0)
        self.assertEqual(run1.summary["bytes_read_source"], sum(b.size for b in unique.values()),
                         run1.describe())
        cached = set(os.listdir(os.path.join(cache, "blobs", "sha256")))
        self.assertEqual(cached, {d.split(":", 1)[1] for d in unique},
                         "cache content after run 1")

        src_mark = log_mark(SOURCE)
        run2 = crossdock("mirror", f"{SOURCE.host}/corp", f"{tb.host}/dst",
                         "--insecure", "--json", "--cache", cache)
        self.assertExit(run2, 0)
        s = run2.summary
        self.assertEqual(s["failed"], 0, run2.describe())
        self.assertEqual(s["bytes_read_source"], 0, run2.describe())
        self.assertGreater(s["blobs_from_cache"], 0, run2.describe())
        self.assertEqual(s["blobs_from_cache"], s["blobs_uploaded"], run2.describe())
        src_blob_gets = [e for e in completed(SOURCE, src_mark)
                         if e.method == "GET" and "/blobs/" in e.uri]
        self.assertEqual(src_blob_gets, [], "run 2 read blobs from the source" + run2.describe())
        self.assertCorpusMirrored(tb, "dst", CORP, run2)

    # -- 5 -----------------------------------------------------------------
    def test_killed_run_resumes_from_partial(self):
        cache = self.tempdir("crossdock-pipe-cache-")
        tgt = self.start_registry("tgt")
        hexd = KILL.big_digest.split(":", 1)[1]
        meta_path = os.path.join(cache, "partial", hexd + ".meta")
        data_path = os.path.join(cache, "partial", hexd + ".data")
        chunks = math.ceil(KILL.big_size / CAS_CHUNK)
        need = math.ceil(0.4 * chunks)

        args = ["mirror", None, f"{tgt.host}/dst", "--insecure", "--json", "--cache", cache]
        with PipeProxy(SOURCE, rate=16 * MiB) as px:    # ~8 s for the ~128 MiB layer
            args[1] = f"{px.host}/kill"
            p = subprocess.Popen([CROSSDOCK] + args, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=base_env())
            meta = b""
            try:
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline and p.poll() is None:
                    try:
                        with open(meta_path, "rb") as f:
                            meta = f.read()
                    except FileNotFoundError:
                        meta = b""
                    if (len(meta) - META_HEADER) // META_RECORD >= need:
                        break
                    time.sleep(0.05)
            finally:
                exited = p.poll()
                if exited is None:
                    p.send_signal(signal.SIGKILL)
                out, err = p.communicate(timeout=30)
        killed = Run(["(killed)"] + args, p.returncode, out, err, 0)
        self.assertIsNone(exited, "crossdock finished before it could be killed mid-blob"
                          + killed.describe())
        self.assertEqual(p.returncode, -signal.SIGKILL, killed.describe())
        records = (len(meta) - META_HEADER) // META_RECORD
        self.assertGreaterEqual(records, need,
                                f"only {records}/{chunks} chunks verified in the cache within 60 s"
                                + killed.describe())
        self.assertTrue(os.path.exists(data_path), "the partial .data is gone after the kill")
        self.assertTrue(os.path.exists(meta_path), "the partial .meta is gone after the kill")
        self.assertFalse(os.path.exists(os.path.join(cache, "blobs", "sha256", hexd)),
                         "the blob was committed before the kill: nothing to resume")
        # Bytes the polled .meta says are verified (chunk indexes; the last chunk may be short).
        idx = {struct.unpack_from("<Q", meta, META_HEADER + i * META_RECORD)[0]
               for i in range(records)}
        verified = sum(min(CAS_CHUNK, KILL.big_size - i * CAS_CHUNK) for i in idx if i < chunks)
        on_disk = os.stat(data_path).st_blocks * 512

        src_mark = log_mark(SOURCE)
        run = crossdock("mirror", f"{SOURCE.host}/kill", f"{tgt.host}/dst",
                        "--insecure", "--json", "--cache", cache)
        self.assertExit(run, 0)
        self.assertImageMirrored(tgt, "dst", KILL, run)
        read = run.summary["bytes_read_source"]
        note(f"killed at {records}/{chunks} verified chunks ({verified} bytes, {on_disk} "
             f"allocated); resumed run read {read} of {KILL.big_size} bytes")
        ctx = (f"\nblob {KILL.big_size} bytes; at the kill {records}/{chunks} chunks "
               f"({verified} bytes) were recorded verified, {on_disk} bytes allocated")
        self.assertLess(read, KILL.big_size, "the resumed run re-read the whole blob" + ctx
                        + run.describe())
        self.assertLessEqual(read, KILL.unique_bytes - verified,
                             "the resumed run re-read chunks the cache had verified" + ctx
                             + run.describe())
        gets = blob_gets(completed(SOURCE, src_mark), KILL.big_digest)
        self.assertLess(sum(g.written for g in gets), KILL.big_size, f"{gets}" + ctx)
        self.assertFalse(os.path.exists(data_path), "partial .data left after the commit")

    # -- 6 -----------------------------------------------------------------
    def test_target_refusing_patch_gets_monolithic_put(self):
        tgt = self.start_registry("tgt")
        refuse = Fault("PATCH", r"/blobs/uploads/", "respond", status=405,
                       name="refuse PATCH")
        with FaultProxy(tgt, [refuse]) as tpx:
            run = crossdock("mirror", f"{SOURCE.host}/one", f"{tpx.host}/dst",
                            "--insecure", "--json")
        self.assertExit(run, 0)
        self.assertIsNone(tpx.error)
        self.assertGreaterEqual(refuse.hits, 1, "crossdock never tried PATCH" + run.describe())
        self.assertImageMirrored(tgt, "dst", ONE, run)
        entries = completed(tgt)
        self.assertEqual([e for e in entries if e.method == "PATCH"], [])
        d = ONE.big_digest
        puts = [e for e in entries if e.method == "PUT" and f"digest={d}" in e.uri.replace("%3A", ":")]
        self.assertEqual([p.status for p in puts], [201], f"{puts}" + run.describe())
        self.assertEqual(upload_sessions(tgt), [], "upload sessions left on the target"
                         + run.describe())

    # -- 7 -----------------------------------------------------------------
    def test_failed_download_leaves_no_upload_sessions(self):
        ta = self.start_registry("tgt-a")
        tb = self.start_registry("tgt-b")
        with PipeProxy(SOURCE, corrupt=re.escape(ONE.big_digest)) as px:
            run = crossdock("mirror", f"{px.host}/one", f"{ta.host}/dst", f"{tb.host}/dst",
                            "--insecure", "--json")
        self.assertGreaterEqual(px.corrupted, 1, "the proxy corrupted nothing" + run.describe())
        with self.subTest("exit status"):   # the target checks below run whatever it was
            self.assertExit(run, 1)
        for reg in (ta, tb):
            with self.subTest(target=reg.host):
                cl = reg.client()
                entries = completed(reg)
                self.assertIsNone(check.manifest(cl, "dst/app", "v1"),
                                  f"tag published on {reg.host}" + run.describe())
                self.assertFalse(cl.blob_exists("dst/app", ONE.big_digest),
                                 f"corrupt blob finalised on {reg.host}")
                patched = sorted({e.session for e in entries if e.method == "PATCH"})
                self.assertTrue(patched, f"{reg.host} saw no PATCH: the upload never started, "
                                "nothing to clean up" + run.describe())
                deleted = sorted({e.session for e in entries if e.method == "DELETE"})
                trace = "\n".join(repr(e) for e in entries if e.method in ("POST", "PATCH", "PUT", "DELETE"))
                self.assertEqual(upload_sessions(reg), [],
                                 f"upload sessions left open on {reg.host}; PATCHed sessions "
                                 f"{patched}, DELETEd {deleted}; target writes:\n{trace}"
                                 + run.describe())
        with self.subTest("summary"):
            s = run.summary
            self.assertEqual(s["failed"], 2, run.describe())
            for it in s["items"]:
                self.assertEqual(it["action"], "failed", run.describe())
                self.assertTrue(it["reason"].isprintable(),
                                f"reason is not text: {it['reason']!r}" + run.describe())
                self.assertIn(ONE.big_digest, it["reason"], run.describe())
                self.assertIn("does not match its digest", it["reason"], run.describe())

    # -- 8 -----------------------------------------------------------------
    def test_three_targets_read_once(self):
        tgts = [self.start_registry(f"tgt-{i}") for i in range(3)]
        src_mark = log_mark(SOURCE)
        run = crossdock("mirror", f"{SOURCE.host}/corp", *[f"{t.host}/dst" for t in tgts],
                        "--insecure", "--json")
        self.assertExit(run, 0)
        s = run.summary
        self.assertEqual(s["failed"], 0, run.describe())
        for t in tgts:
            self.assertCorpusMirrored(t, "dst", CORP, run)
        unique = CORP.all_blobs(CORP.in_namespace())
        total = sum(b.size for b in unique.values())
        self.assertEqual(s["bytes_read_source"], total,
                         f"unique blob bytes {total} in {len(unique)} blobs" + run.describe())
        entries = completed(SOURCE, src_mark)
        for d, b in unique.items():
            gets = blob_gets(entries, d)
            self.assertEqual(sum(g.written for g in gets), b.size,
                             f"source GETs of {d} ({b.label}, {b.size} bytes): {gets}")
        stray = [e for e in entries if e.method == "GET" and "/blobs/sha256:" in e.uri
                 and not any(d in e.uri for d in unique)]
        self.assertEqual(stray, [])
        big = blob_gets(entries, CORP.big_layer.digest)
        self.assertTrue(all(g.status == 206 for g in big) and len(big) >= 2,
                        f"the {CORP.big_layer.size}-byte layer was not fetched by ranges: {big}")

    # -- 9 -----------------------------------------------------------------
    def test_streams_auto_adds_streams_mid_blob(self):
        """--streams auto through a WAN: streams are added to large blobs being fetched.

        The source sits behind wanem (20 ms each way, 100 Mbit/s per connection, 1 Gbit/s in
        all, as bench/wan.py); one stream cannot fill that link, so the tuner (sampled every
        250 ms) starts at 4 streams and doubles while the aggregate grows.  With --jobs 1 the
        downloads run one at a time, so the tuned total goes to the one large blob being
        fetched, and it grows between and within blobs.  The two 40 MiB layers are cut into
        three ranged pieces each (16, 16, 8 MiB): fewer than the streams the tuner asks for.
        A worker that wants more streams starts them, and they run at once, each taking a
        piece; the worker must then find the queue empty.  The old code took a piece from the
        emptied queue anyway: garbage ranges ("range 8319115473763449460-... still
        incomplete"), ranges read again, or SIGSEGV (exit -11).  (Pieces are 4 MiB now, ten
        per layer; the queue still empties at each layer's end while the tuner adds streams.)

        This shape (about 96 MiB; 5 s with the fix) is the smallest found that made the old
        build (21fbdbd) fail every time (17 of 17 runs): SIGSEGV in 8 of them, and the
        others exited 0 having read the source 1.4 to 4.3 times over (the read-once check
        below).  Four 40 MiB layers crash it more often (7 of 10) but take twice as long; one
        40 MiB layer, or the downloads in parallel (default --jobs, each large blob then gets
        a share of the tuned total), failed in only some runs."""
        wanem = wanem_binary()
        if wanem is None:
            self.skipTest("the WAN emulator is not built (tests/tools/wanem; set WANEM_BIN)")
        if BENCH not in sys.path:
            sys.path.insert(0, BENCH)
        import bigcorpus  # noqa: E402  (bench/bigcorpus.py streams layers; corpus.py holds them)

        src = self.start_registry("auto-src")
        tgt = self.start_registry("auto-tgt")
        # 2 repositories, one tag each (+ latest): a 40 MiB base layer each (ranged: >= 32 MiB),
        # an 8 MiB runtime layer each, small layers and configs.
        spec = bigcorpus.Spec(repos=2, bases=2, base_size=40 * MiB, runtimes=2,
                              runtime_size=8 * MiB, app_size=0, namespace="auto", tags=("v1",))
        desc = bigcorpus.generate(src.client(), spec)
        big = [b for b in desc["blobs"].values() if b["size"] >= RANGE_THRESHOLD]
        self.assertEqual(len(big), spec.bases, f"large blobs in the corpus: {big}")

        wan = Wanem(wanem, src.host, ["--delay-ms", "20", "--conn-rate", "100Mbit",
                                      "--total-rate", "1Gbit"]).start()
        self.addCleanup(wan.stop)
        run = crossdock("mirror", f"{wan.host}/auto", f"{tgt.host}/dst", "--insecure", "--json",
                        "--streams", "auto", "--jobs", "1", timeout=120)
        note(f"--streams auto through wanem: exit {run.returncode} in {run.seconds:.1f}s")
        self.assertExit(run, 0)
        failed = [ln for ln in run.stderr.splitlines() if re.match(r"\s*failed\b", ln)]
        self.assertEqual(failed, [], "failed lines" + run.describe())
        self.assertNotIn("still incomplete", run.stderr, run.describe())
        s = run.summary
        self.assertEqual((s["failed"], s["errors"]), (0, []), run.describe())
        self.assertEqual(s["copied"], len(desc["tags"]), run.describe())

        cl = tgt.client()
        for t in desc["tags"]:
            repo = f"dst/{t['relative']}"
            self.assertEqual(check.manifest_digest(cl, repo, t["tag"]), t["digest"],
                             f"{tgt.host}/{repo}:{t['tag']}" + run.describe())
            self.assertEqual(check.missing_content(cl, repo, t["tag"]), [],
                             f"{tgt.host}/{repo}:{t['tag']}" + run.describe())
        # Each piece is fetched by one stream: the source is read once, however many streams
        # joined (a worker that took a stale piece from an emptied queue read ranges again).
        self.assertEqual(s["bytes_read_source"], desc["unique_blob_bytes"],
                         f"bytes read from the source vs the corpus' unique blob bytes "
                         f"({desc['unique_blobs']} blobs)" + run.describe())

    # -- 10 ----------------------------------------------------------------
    def test_registries_reached_at_once(self):
        """The start-up pings of the source and every target go out together, not one after
        another: two targets, each behind its own wanem at 250 ms one way, receive their
        `GET /v2/` within 250 ms of each other (one after the other, the second would come a
        round trip, 500 ms, after the first)."""
        wanem = wanem_binary()
        if wanem is None:
            self.skipTest("the WAN emulator is not built (tests/tools/wanem; set WANEM_BIN)")
        regs = [self.start_registry(f"far-{i}") for i in range(2)]
        far = []
        for reg in regs:
            w = Wanem(wanem, reg.host, ["--delay-ms", "250"]).start()
            self.addCleanup(w.stop)
            far.append(w)
        marks = [log_mark(r) for r in regs]
        run = crossdock("mirror", f"{SOURCE.host}/one", f"{far[0].host}/dst", f"{far[1].host}/dst",
                        "--insecure", "--dry-run", "--json", timeout=120)
        self.assertExit(run, 0)
        pings = []
        for reg, mark in zip(regs, marks):
            got = [e for e in completed(reg, mark) if e.method == "GET" and e.uri == "/v2/"]
            self.assertTrue(got, f"{reg.host} saw no GET /v2/" + run.describe())
            pings.append(min(e.t for e in got))
        note(f"GET /v2/ at the two targets {abs(pings[0] - pings[1]) * 1000:.0f} ms apart")
        self.assertLess(abs(pings[0] - pings[1]), 0.25,
                        f"the targets' GET /v2/ came {abs(pings[0] - pings[1]):.3f} s apart" + run.describe())

    # -- 11 ----------------------------------------------------------------
    def test_small_blobs_do_not_hold_up_a_large_one(self):
        """Small blobs (configs, small layers) download with permits of their own: with
        `--jobs 1` through a 30 ms link, an 8 MiB layer is fetched while the image's 12 small
        layers are (one download permit for all would run the 13 blobs one after another,
        smallest first, so no two GETs would overlap)."""
        wanem = wanem_binary()
        if wanem is None:
            self.skipTest("the WAN emulator is not built (tests/tools/wanem; set WANEM_BIN)")
        src = self.start_registry("mix-src")
        tgt = self.start_registry("mix-tgt")
        b = corpus.Builder(seed=4242, min_size=2048, max_size=4096)
        small = [f"mix-small-{i}" for i in range(12)]
        m = b.image("mix", small + ["mix-big"], sizes={"mix-big": 8 * MiB})
        corpus.push_manifest_tree(src.client(), "mix/app", m, "v1")
        big = next(x for x in m.blobs if len(x.data) >= 8 * MiB)
        wan = Wanem(wanem, src.host, ["--delay-ms", "30", "--conn-rate", "100Mbit"]).start()
        self.addCleanup(wan.stop)
        mark = log_mark(src)
        run = crossdock("mirror", f"{wan.host}/mix", f"{tgt.host}/dst", "--insecure", "--json",
                        "--jobs", "1", timeout=120)
        self.assertExit(run, 0)
        self.assertEqual((run.summary["copied"], run.summary["failed"]), (1, 0), run.describe())
        self.assertEqual(check.missing_content(tgt.client(), "dst/app", "v1"), [], run.describe())
        # The registry logs a request when it ends, with how long it took: [start, end] of each GET.
        gets = [e for e in completed(src, mark) if e.method == "GET" and "/blobs/sha256:" in e.uri]
        big_gets = [e for e in gets if big.digest in e.uri]
        small_gets = [e for e in gets if big.digest not in e.uri]
        self.assertEqual(len(big_gets), 1, f"GETs of the 8 MiB layer: {big_gets}")
        self.assertGreaterEqual(len(small_gets), 12, f"GETs of the small blobs: {small_gets}")
        g = big_gets[0]
        overlapping = [e for e in small_gets if e.start < g.t and e.t > g.start]
        note(f"8 MiB layer fetched over {g.t - g.start:.2f} s; {len(overlapping)} of "
             f"{len(small_gets)} small blob GETs overlapped it")
        self.assertTrue(overlapping, f"no small blob was fetched while the 8 MiB layer was: big {g.start:.3f}-{g.t:.3f}, "
                        f"small {[(round(e.start, 3), round(e.t, 3)) for e in small_gets]}" + run.describe())

    # -- 12 ----------------------------------------------------------------
    def _large_layer_order(self, name, *args):
        """Mirrors an image of 2, 3, 4 and 5 MiB layers with `--jobs 1` through a 30 ms link
        (so they are fetched one at a time); returns the layer sizes in the order fetched."""
        wanem = wanem_binary()
        if wanem is None:
            self.skipTest("the WAN emulator is not built (tests/tools/wanem; set WANEM_BIN)")
        src = self.start_registry(f"{name}-src")
        tgt = self.start_registry(f"{name}-tgt")
        b = corpus.Builder(seed=4343)
        sizes = {f"{name}-{n}": n * MiB for n in (2, 3, 4, 5)}
        m = b.image(name, list(sizes), sizes=sizes)
        corpus.push_manifest_tree(src.client(), f"{name}/app", m, "v1")
        size_of = {x.digest: len(x.data) for x in m.blobs}
        wan = Wanem(wanem, src.host, ["--delay-ms", "30", "--conn-rate", "100Mbit"]).start()
        self.addCleanup(wan.stop)
        mark = log_mark(src)
        run = crossdock("mirror", f"{wan.host}/{name}", f"{tgt.host}/dst", "--insecure", "--json",
                        "--jobs", "1", *args, timeout=120)
        self.assertExit(run, 0)
        self.assertEqual(check.missing_content(tgt.client(), "dst/app", "v1"), [], run.describe())
        gets = sorted((e for e in completed(src, mark) if e.method == "GET" and "/blobs/sha256:" in e.uri),
                      key=lambda e: e.start)
        large = [size_of[d] for e in gets for d in size_of if d in e.uri and size_of[d] >= MiB]
        self.assertEqual(sorted(large), sorted(v for v in size_of.values() if v >= MiB),
                         f"GETs of the large layers: {gets}")
        return large, run

    def test_large_blobs_fetched_largest_first(self):
        """Large blobs wait for a download permit largest first, so a run does not end on a big
        blob fetched alone: after the first (whichever asked first) they come in decreasing size."""
        large, run = self._large_layer_order("lpt")
        self.assertEqual(large[1:], sorted(large[1:], reverse=True),
                         f"large layers fetched in the order {[round(x / MiB, 1) for x in large]} MiB" + run.describe())

    def test_capped_source_fetches_smallest_first(self):
        """Under --bandwidth the cap sets the pace, and smallest first keeps fewer multi-stream
        downloads open (less data in flight past a pause): after the first, increasing size."""
        large, run = self._large_layer_order("capped", "--bandwidth", "400Mbit")
        self.assertEqual(large[1:], sorted(large[1:]),
                         f"large layers fetched in the order {[round(x / MiB, 1) for x in large]} MiB" + run.describe())

if __name__ == "__main__":
    unittest.main()
