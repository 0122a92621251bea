"""End-to-end tests of `crossdock mirror` against real docker-registry instances.

crossdock is driven exactly as a user would drive it (a subprocess; the
binary is $CROSSDOCK_BIN, by default build/tools/crossdock); what ends up on
the target registries is checked independently, through the registry HTTP
API (check.py) and skopeo.

Registries are cheap (they start in well under a second): one shared source
registry holds the default corpus for every test that only reads from it,
and each test gets fresh target registries.
"""

import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import check  # noqa: E402
import corpus  # noqa: E402
from proxy import VanishingProxy  # noqa: E402
from registry import Registry, start_filled  # noqa: E402

CROSSDOCK = os.environ.get("CROSSDOCK_BIN") or os.path.join(
    HERE, "..", "..", "build", "tools", "crossdock")
RUN_TIMEOUT = 180          # seconds for one crossdock invocation
SRC_NS = "src-ns"

SUMMARY_KEYS = ("dry_run", "repositories", "copied", "skipped", "failed",
                "bytes_copied", "blobs_uploaded", "blobs_mounted",
                "blobs_existing", "items")
AUTH_WORDS = ("401", "unauthorized", "authentication", "credentials", "denied")
ITEM_KEYS = ("target", "repository", "tag", "digest", "type", "action",
             "reason", "bytes")

# --------------------------------------------------------------------------
# Running crossdock
# --------------------------------------------------------------------------

import cdenv  # noqa: E402
from cdenv import base_env  # noqa: E402


class Run:
    """Outcome of one crossdock invocation."""

    def __init__(self, args, proc):
        self.args = args
        self.returncode = proc.returncode
        self.stdout = proc.stdout.decode("utf-8", "replace")
        self.stderr = proc.stderr.decode("utf-8", "replace")
        self._summary = None

    @property
    def output(self):
        return self.stdout + "\n" + self.stderr

    def describe(self):
        return (f"\n$ crossdock {' '.join(self.args)}\nexit {self.returncode}\n"
                f"--- stdout ---\n{self.stdout[-6000:]}\n"
                f"--- stderr ---\n{self.stderr[-6000:]}")

    @property
    def summary(self):
        if self._summary is None:
            try:
                self._summary = json.loads(self.stdout)
            except ValueError as e:
                raise AssertionError(f"--json output is not one JSON object ({e})"
                                     + self.describe()) from None
            if not isinstance(self._summary, dict):
                raise AssertionError("--json output is not a JSON object" + self.describe())
        return self._summary

    @property
    def items(self):
        return self.summary.get("items", [])

    def item_map(self):
        """{(target, repository, tag): item}"""
        return {(i.get("target"), i.get("repository"), i.get("tag")): i for i in self.items}

    def by_repo_tag(self, target=None):
        """{(repository, tag): item} (optionally only for one target)."""
        return {(i.get("repository"), i.get("tag")): i for i in self.items
                if target is None or i.get("target") == target}


def crossdock(*args, env=None, timeout=RUN_TIMEOUT):
    args = [str(a) for a in args]
    try:
        p = subprocess.run([CROSSDOCK] + args, stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           env=env or base_env(), timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"crossdock {' '.join(args)} did not finish within "
                             f"{timeout}s; stderr so far:\n"
                             f"{(e.stderr or b'').decode(errors='replace')[-4000:]}")
    return Run(args, p)


def tpath(tns, rel):
    return f"{tns}/{rel}" if tns else rel


# --------------------------------------------------------------------------
# Shared source registry (read-only for the tests that use it)
# --------------------------------------------------------------------------

SOURCE = None
CORPUS = None


def setUpModule():
    global SOURCE, CORPUS
    if not (os.path.isfile(CROSSDOCK) and os.access(CROSSDOCK, os.X_OK)):
        raise RuntimeError(f"crossdock binary not found at {CROSSDOCK} "
                           "(build it, or set CROSSDOCK_BIN)")
    SOURCE, CORPUS = start_filled("src", lambda client: corpus.push_corpus(client, SRC_NS))


def tearDownModule():
    if SOURCE is not None:
        SOURCE.stop()
    cdenv.remove_empty_docker_config()


# --------------------------------------------------------------------------
# Assertions
# --------------------------------------------------------------------------

class MirrorTestCase(unittest.TestCase):
    maxDiff = None

    def start_registry(self, **kw):
        reg = Registry(**kw)
        reg.start()
        self.addCleanup(reg.stop)
        return reg

    @property
    def src(self):
        return f"{SOURCE.host}/{SRC_NS}"

    def assertExit(self, run, code):
        self.assertEqual(run.returncode, code,
                         f"expected exit {code}" + run.describe())

    def assertSummaryShape(self, run, dry_run=False):
        s = run.summary
        for k in SUMMARY_KEYS:
            self.assertIn(k, s, f"summary lacks {k!r}" + run.describe())
        self.assertIs(s["dry_run"], dry_run, run.describe())
        for k in SUMMARY_KEYS[1:-1]:
            self.assertIsInstance(s[k], int, f"{k} is not an integer" + run.describe())
            self.assertGreaterEqual(s[k], 0, run.describe())
        self.assertIsInstance(s["items"], list, run.describe())
        for it in s["items"]:
            for k in ITEM_KEYS:
                self.assertIn(k, it, f"item lacks {k!r}: {it}" + run.describe())
            self.assertIn(it["action"], ("copied", "skipped", "failed", "would-copy"),
                          f"odd action in {it}" + run.describe())
            # A vanished or failed artifact may be of unknown type.
            types = ("image", "helm") if it["action"] in ("copied", "would-copy") \
                else ("image", "helm", "")
            self.assertIn(it["type"], types, f"odd type in {it}" + run.describe())
        if not dry_run:
            for action in ("copied", "skipped", "failed"):
                n = sum(1 for it in s["items"] if it["action"] == action)
                self.assertEqual(s[action], n, f"summary {action} count != items"
                                 + run.describe())
        return s

    def assertItems(self, run, target, entries, action, reason=None, exact=True,
                    check_digest=True):
        """Every entry appears for ``target`` with ``action`` (and reason), with
        the source digest and the right type; if exact, no other items for it."""
        got = run.by_repo_tag(target)
        want = {(e.relative, e.tag): e for e in entries}
        for key, e in want.items():
            self.assertIn(key, got, f"no item for {target} {key}" + run.describe())
            it = got[key]
            self.assertEqual(it["action"], action, f"{key}: {it}" + run.describe())
            if reason is not None:
                self.assertEqual(it["reason"], reason, f"{key}: {it}" + run.describe())
            if check_digest:
                self.assertEqual(it["digest"], e.digest, f"{key}: {it}" + run.describe())
                self.assertEqual(it["type"], e.type, f"{key}: {it}" + run.describe())
        if exact:
            self.assertEqual(sorted(got), sorted(want),
                             f"unexpected items for {target}" + run.describe())

    def assertItemBytes(self, run, c):
        """bytes > 0 for every item that brings new content, and never more than
        the artifact's whole content.  A tag that merely aliases a manifest
        already handled in the same repository (latest = v2, 1.0.0 = v1) may
        report 0: its content was counted with the first tag."""
        seen = set()
        for it in sorted(run.items, key=lambda i: (i["target"], i["repository"], i["tag"])):
            e = c.entry(it["repository"], it["tag"])
            key = (it["target"], e.relative, e.digest)
            alias = key in seen or any(
                o.relative == e.relative and o.digest == e.digest and o.tag != e.tag
                for o in c.in_namespace())
            seen.add(key)
            if not alias:
                self.assertGreater(it["bytes"], 0, f"{it}" + run.describe())
            self.assertLessEqual(it["bytes"], e.manifest.total_bytes(), f"{it}" + run.describe())
        self.assertGreater(sum(it["bytes"] for it in run.items), 0, run.describe())

    def assertMirrored(self, reg, tns, entries, client=None):
        """Each entry's tag exists on ``reg`` under ``tns`` with the source
        digest, and every child manifest and blob it references is there."""
        client = client or reg.client()
        for e in entries:
            repo = tpath(tns, e.relative)
            info = check.manifest(client, repo, e.tag)
            self.assertIsNotNone(info, f"{reg.host}/{repo}:{e.tag} missing on target")
            self.assertEqual(info.digest, e.digest, f"{reg.host}/{repo}:{e.tag} digest")
            self.assertEqual(info.media_type, e.media_type, f"{reg.host}/{repo}:{e.tag}")
            self.assertEqual(check.missing_content(client, repo, e.tag), [],
                             f"{reg.host}/{repo}:{e.tag} incomplete")

    def assertCatalog(self, reg, tns, relatives, client=None):
        client = client or reg.client()
        want = sorted(tpath(tns, r) for r in relatives)
        self.assertEqual(sorted(check.catalog(client, page_size=3)), want,
                         f"catalog of {reg.host}")

    def assertTags(self, reg, tns, entries, client=None):
        client = client or reg.client()
        want = {}
        for e in entries:
            want.setdefault(e.relative, set()).add(e.tag)
        for rel, tags in want.items():
            self.assertEqual(check.tags(client, tpath(tns, rel)), sorted(tags),
                             f"tags of {reg.host}/{tpath(tns, rel)}")

    def assertNothingWritten(self, reg):
        self.assertEqual(reg.write_requests(), [],
                         f"{reg.host} received write requests")
        self.assertEqual(check.catalog(reg.client()), [], f"catalog of {reg.host}")


# --------------------------------------------------------------------------
# (1) full namespace mirror, with a ~20 MiB layer to exercise streaming
# --------------------------------------------------------------------------

class FullMirrorTest(MirrorTestCase):
    @classmethod
    def setUpClass(cls):
        cls.source = Registry(name="src-big")
        cls.source.start()
        try:
            cls.corpus = corpus.push_corpus(cls.source.client(), SRC_NS, big=True)
        except BaseException:
            cls.source.stop()
            raise

    @classmethod
    def tearDownClass(cls):
        cls.source.stop()

    def test_full_namespace_mirror(self):
        tgt = self.start_registry(name="tgt")
        c = self.corpus
        run = crossdock("mirror", f"{self.source.host}/{SRC_NS}", f"{tgt.host}/dst-ns",
                        "--insecure", "--json")
        self.assertExit(run, 0)
        s = self.assertSummaryShape(run)
        entries = c.in_namespace()
        self.assertEqual(s["failed"], 0, run.describe())
        self.assertEqual(s["copied"], len(entries), run.describe())
        self.assertEqual(s["repositories"], len(c.repositories()), run.describe())
        self.assertItems(run, f"{tgt.host}/dst-ns", entries, "copied")
        self.assertItemBytes(run, c)
        self.assertGreaterEqual(s["bytes_copied"], c.big_layer.size, run.describe())
        self.assertGreater(s["blobs_uploaded"], 0, run.describe())

        # Registry API: exactly the namespace's repositories and tags, right digests.
        self.assertCatalog(tgt, "dst-ns", c.repositories())
        self.assertTags(tgt, "dst-ns", entries)
        self.assertMirrored(tgt, "dst-ns", entries)
        cl = tgt.client()
        for repo in check.catalog(cl):
            self.assertNotIn("other", repo.split("/"), "repository outside namespace copied")

        # The big layer arrived intact.
        self.assertTrue(cl.blob_exists("dst-ns/team-a/web", c.big_layer.digest))

        # Index children present by digest, with their platform-specific content.
        multi = c.entry("team-b/worker", "multi")
        self.assertEqual(len(multi.manifest.children), 2)
        for child in multi.manifest.children:
            info = check.manifest(cl, "dst-ns/team-b/worker", child.digest)
            self.assertIsNotNone(info, f"index child {child.digest} missing")
            self.assertEqual(info.body, child.body)
        lst = c.entry("legacy/app", "list")
        for child in lst.manifest.children:
            info = check.manifest(cl, "dst-ns/legacy/app", child.digest)
            self.assertIsNotNone(info, f"manifest list child {child.digest} missing")
            self.assertEqual(info.media_type, corpus.DOCKER_MANIFEST)

        # Helm chart: manifest, config and chart content.
        chart = c.entry("charts/mychart", "0.1.0")
        self.assertEqual(run.by_repo_tag()[("charts/mychart", "0.1.0")]["type"], "helm")
        info = check.manifest(cl, "dst-ns/charts/mychart", "0.1.0")
        self.assertEqual(info.json()["config"]["mediaType"], corpus.HELM_CONFIG)
        for b in chart.manifest.blobs:
            self.assertEqual(cl.get_blob("dst-ns/charts/mychart", b.digest), b.data)

        # Docker schema2 kept as is (no conversion).
        info = check.manifest(cl, "dst-ns/legacy/app", "v2")
        self.assertEqual(info.media_type, corpus.DOCKER_MANIFEST)

        # skopeo as a second, independent client.
        for rel, tag in (("team-a/web", "v1"), ("team-b/worker", "multi"),
                         ("legacy/app", "v2"), ("charts/mychart", "0.1.0")):
            self.assertEqual(check.skopeo_raw_digest(tgt.host, f"dst-ns/{rel}", tag),
                             c.entry(rel, tag).digest, f"skopeo --raw {rel}:{tag}")
        meta = check.skopeo_inspect(tgt.host, "dst-ns/team-a/web", "v2")
        self.assertIn(c.big_layer.digest, meta["Layers"])
        check.skopeo_copy_verify(tgt.host, "dst-ns/team-b/worker", "multi")
        check.skopeo_copy_verify(tgt.host, "dst-ns/team-a/web", "v2")


# --------------------------------------------------------------------------
# (2) filters
# --------------------------------------------------------------------------

class FilterTest(MirrorTestCase):
    def mirror_filtered(self, *flags, repo_re=None, tag_re=None, type_=None):
        tgt = self.start_registry(name="tgt")
        run = crossdock("mirror", self.src, f"{tgt.host}/dst", "--insecure", "--json", *flags)
        self.assertExit(run, 0)
        self.assertSummaryShape(run)
        want = CORPUS.select(repo_re, tag_re, type_)
        self.assertTrue(want, "filter selects nothing: test is wrong")
        self.assertItems(run, f"{tgt.host}/dst", want, "copied")
        self.assertCatalog(tgt, "dst", CORPUS.repositories(want))
        self.assertTags(tgt, "dst", want)
        self.assertMirrored(tgt, "dst", want)
        return run, want

    def test_repo_filter(self):
        _, want = self.mirror_filtered("--repo", "team-a/.*", repo_re="team-a/.*")
        self.assertEqual(CORPUS.repositories(want), ["team-a/api", "team-a/web"])

    def test_tag_filter(self):
        _, want = self.mirror_filtered("--tag", "v[0-9]+", tag_re="v[0-9]+")
        self.assertNotIn("charts/mychart", CORPUS.repositories(want))

    def test_filters_are_full_matches(self):
        # Partial matching would also pick team-a/api, team-b/worker, 1.0.0 ...
        _, want = self.mirror_filtered("--repo", "team-a/web|team", "--tag", r"v1|1\.0",
                                       repo_re="team-a/web|team", tag_re=r"v1|1\.0")
        self.assertEqual([(e.relative, e.tag) for e in want], [("team-a/web", "v1")])

    def test_type_helm(self):
        _, want = self.mirror_filtered("--type", "helm", type_="helm")
        self.assertEqual([(e.relative, e.tag) for e in want], [("charts/mychart", "0.1.0")])

    def test_type_image(self):
        _, want = self.mirror_filtered("--type", "image", type_="image")
        self.assertNotIn("charts/mychart", CORPUS.repositories(want))
        self.assertIn("team-b/worker", CORPUS.repositories(want))

    def test_type_all(self):
        run, want = self.mirror_filtered("--type", "all")
        self.assertEqual(len(want), len(CORPUS.in_namespace()))


# --------------------------------------------------------------------------
# (3) overwrite, (4) re-run, (10) dry-run, (11) mounting
# --------------------------------------------------------------------------

class TargetStateTest(MirrorTestCase):
    def test_overwrite_off_then_on(self):
        tgt = self.start_registry(name="tgt")
        other = corpus.push_image(tgt.client(), "dst/team-a/web", "v1", "squatter", seed=7)
        src_v1 = CORPUS.entry("team-a/web", "v1")
        self.assertNotEqual(other.digest, src_v1.digest)
        target = f"{tgt.host}/dst"
        web = CORPUS.select(repo_re="team-a/web")

        run = crossdock("mirror", self.src, target, "--insecure", "--json", "--repo", "team-a/web")
        self.assertExit(run, 0)
        self.assertSummaryShape(run)
        self.assertItems(run, target, [src_v1], "skipped", reason="exists", exact=False)
        self.assertItems(run, target, [e for e in web if e.tag != "v1"], "copied", exact=False)
        self.assertEqual(run.summary["failed"], 0, run.describe())
        self.assertEqual(check.manifest_digest(tgt.client(), "dst/team-a/web", "v1"),
                         other.digest, "existing target tag was overwritten without --overwrite")
        self.assertMirrored(tgt, "dst", [e for e in web if e.tag != "v1"])

        run = crossdock("mirror", self.src, target, "--insecure", "--json", "--repo", "team-a/web",
                        "--overwrite")
        self.assertExit(run, 0)
        self.assertSummaryShape(run)
        self.assertItems(run, target, [src_v1], "copied", exact=False)
        self.assertMirrored(tgt, "dst", web)

    def test_rerun_is_noop(self):
        tgt = self.start_registry(name="tgt")
        target = f"{tgt.host}/dst"
        entries = CORPUS.in_namespace()
        first = crossdock("mirror", self.src, target, "--insecure", "--json")
        self.assertExit(first, 0)
        self.assertItems(first, target, entries, "copied")
        writes_before = len(tgt.write_requests())

        run = crossdock("mirror", self.src, target, "--insecure", "--json")
        self.assertExit(run, 0)
        s = self.assertSummaryShape(run)
        self.assertItems(run, target, entries, "skipped", reason="same digest")
        self.assertEqual(s["copied"], 0, run.describe())
        self.assertEqual(s["failed"], 0, run.describe())
        self.assertEqual(s["skipped"], len(entries), run.describe())
        self.assertEqual(s["blobs_uploaded"], 0, run.describe())
        self.assertEqual(s["bytes_copied"], 0, run.describe())
        self.assertEqual(tgt.write_requests()[writes_before:], [],
                         "second run wrote to the target")
        self.assertMirrored(tgt, "dst", entries)

    def test_dry_run_writes_nothing(self):
        tgt = self.start_registry(name="tgt")
        target = f"{tgt.host}/dst"
        entries = CORPUS.in_namespace()
        run = crossdock("mirror", self.src, target, "--insecure", "--json", "--dry-run")
        self.assertExit(run, 0)
        self.assertSummaryShape(run, dry_run=True)
        self.assertItems(run, target, entries, "would-copy")
        self.assertItemBytes(run, CORPUS)
        self.assertNothingWritten(tgt)

    def test_dry_run_after_partial_mirror(self):
        tgt = self.start_registry(name="tgt")
        target = f"{tgt.host}/dst"
        done = CORPUS.select(repo_re="team-a/.*")
        run = crossdock("mirror", self.src, target, "--insecure", "--json", "--repo", "team-a/.*")
        self.assertExit(run, 0)
        writes_before = len(tgt.write_requests())

        run = crossdock("mirror", self.src, target, "--insecure", "--json", "--dry-run")
        self.assertExit(run, 0)
        self.assertSummaryShape(run, dry_run=True)
        todo = [e for e in CORPUS.in_namespace() if e not in done]
        self.assertItems(run, target, done, "skipped", reason="same digest", exact=False)
        self.assertItems(run, target, todo, "would-copy", exact=False)
        self.assertEqual(len(run.items), len(done) + len(todo), run.describe())
        self.assertEqual(tgt.write_requests()[writes_before:], [], "dry run wrote")
        self.assertCatalog(tgt, "dst", CORPUS.repositories(done))

    def test_shared_base_layer_is_mounted(self):
        tgt = self.start_registry(name="tgt")
        target = f"{tgt.host}/dst"
        entries = CORPUS.in_namespace()
        run = crossdock("mirror", self.src, target, "--insecure", "--json", "--jobs", "1")
        self.assertExit(run, 0)
        s = self.assertSummaryShape(run)
        self.assertGreater(s["blobs_mounted"], 0, run.describe())
        distinct = CORPUS.all_blobs(entries)
        self.assertLessEqual(s["blobs_uploaded"], len(distinct),
                             "a blob was uploaded more than once" + run.describe())
        self.assertMirrored(tgt, "dst", entries)
        # Independent evidence in the registry's access log: successful mounts.
        mounts = [e for e in tgt.write_requests()
                  if e[0] == "POST" and "mount=" in e[1] and e[2] == 201]
        self.assertTrue(mounts, "no successful cross-repository mount in the access log")
        base = CORPUS.base_layer.digest
        cl = tgt.client()
        for rel in CORPUS.repositories():
            if rel != "charts/mychart":
                self.assertTrue(cl.blob_exists(f"dst/{rel}", base), f"base missing in {rel}")
        uploads_of_base = [e for e in tgt.write_requests()
                           if e[0] in ("POST", "PUT") and base.split(":")[1] in e[1]
                           and "mount=" not in e[1] and e[2] == 201]
        self.assertLessEqual(len(uploads_of_base), 1,
                             "base layer uploaded more than once: " + repr(uploads_of_base))


# --------------------------------------------------------------------------
# (6) target namespace, whole-registry SOURCE/TARGET; (7) two targets
# --------------------------------------------------------------------------

class TargetLayoutTest(MirrorTestCase):
    def test_target_namespace_overrides(self):
        tgt = self.start_registry(name="tgt")
        entries = CORPUS.select(repo_re="team-.*")
        run = crossdock("mirror", self.src, f"{tgt.host}/ignored", "--insecure", "--json",
                        "--repo", "team-.*", "--target-namespace", "renamed/deep")
        self.assertExit(run, 0)
        self.assertSummaryShape(run)
        got = run.by_repo_tag()
        self.assertEqual(sorted(got), sorted((e.relative, e.tag) for e in entries), run.describe())
        for it in run.items:
            self.assertEqual(it["action"], "copied", it)
            self.assertIn(it["target"], (f"{tgt.host}/renamed/deep", f"{tgt.host}/ignored"), it)
        self.assertCatalog(tgt, "renamed/deep", CORPUS.repositories(entries))
        self.assertMirrored(tgt, "renamed/deep", entries)

    def test_whole_registry_target(self):
        tgt = self.start_registry(name="tgt")
        entries = CORPUS.select(repo_re="team-a/.*|charts/.*")
        run = crossdock("mirror", self.src, tgt.host, "--insecure", "--json",
                        "--repo", "team-a/.*|charts/.*")
        self.assertExit(run, 0)
        self.assertSummaryShape(run)
        self.assertCatalog(tgt, "", CORPUS.repositories(entries))
        self.assertMirrored(tgt, "", entries)

    def test_whole_registry_source(self):
        tgt = self.start_registry(name="tgt")
        thing = CORPUS.outside()[0]
        run = crossdock("mirror", SOURCE.host, f"{tgt.host}/all", "--insecure", "--json",
                        "--repo", "other/.*")
        self.assertExit(run, 0)
        self.assertSummaryShape(run)
        got = run.by_repo_tag()
        self.assertEqual(sorted(got), [("other/thing", "v1")], run.describe())
        self.assertEqual(got[("other/thing", "v1")]["digest"], thing.digest)
        self.assertEqual(check.catalog(tgt.client()), ["all/other/thing"])
        self.assertEqual(check.manifest_digest(tgt.client(), "all/other/thing", "v1"),
                         thing.digest)

    def test_two_targets(self):
        t1 = self.start_registry(name="tgt1")
        t2 = self.start_registry(name="tgt2")
        entries = CORPUS.in_namespace()
        run = crossdock("mirror", self.src, f"{t1.host}/one", f"{t2.host}/two/nested",
                        "--insecure", "--json", "--jobs", "4")
        self.assertExit(run, 0)
        s = self.assertSummaryShape(run)
        self.assertEqual(s["failed"], 0, run.describe())
        self.assertEqual(s["copied"], 2 * len(entries), run.describe())
        self.assertItems(run, f"{t1.host}/one", entries, "copied")
        self.assertItems(run, f"{t2.host}/two/nested", entries, "copied")
        self.assertCatalog(t1, "one", CORPUS.repositories())
        self.assertCatalog(t2, "two/nested", CORPUS.repositories())
        self.assertMirrored(t1, "one", entries)
        self.assertMirrored(t2, "two/nested", entries)


# --------------------------------------------------------------------------
# (8) a tag that vanishes between listing and copying
# --------------------------------------------------------------------------

class VanishTest(MirrorTestCase):
    def test_tag_vanishes_mid_run(self):
        src = self.start_registry(name="src-vanish")
        c = corpus.push_corpus(src.client(), SRC_NS, outside=False)
        gone = c.entry("team-a/web", "v1")
        # v1 must not share its digest with another tag, or DELETE takes both.
        self.assertEqual([e for e in c.entries if e.digest == gone.digest], [gone])
        tgt = self.start_registry(name="tgt")
        target = f"{tgt.host}/dst"
        with VanishingProxy(src, repo=f"{SRC_NS}/team-a/web", tag="v1") as px:
            run = crossdock("mirror", f"{px.host}/{SRC_NS}", target, "--insecure", "--json")
        self.assertIsNone(px.error, f"proxy could not delete the tag: {px.error}")
        self.assertTrue(px.vanished.is_set(),
                        "crossdock never listed the tags of team-a/web through the proxy"
                        + run.describe())
        self.assertExit(run, 0)
        s = self.assertSummaryShape(run)
        rest = [e for e in c.in_namespace() if e is not gone]
        self.assertItems(run, target, [gone], "skipped", reason="vanished", exact=False,
                         check_digest=False)   # the digest cannot be known any more
        self.assertItems(run, target, rest, "copied", exact=False)
        self.assertEqual(len(run.items), len(rest) + 1, run.describe())
        self.assertEqual(s["failed"], 0, run.describe())
        self.assertMirrored(tgt, "dst", rest)
        self.assertNotIn("v1", check.tags(tgt.client(), "dst/team-a/web"))


# --------------------------------------------------------------------------
# (9) usage errors
# --------------------------------------------------------------------------

class UsageErrorTest(MirrorTestCase):
    def test_invalid_regex_is_usage_error(self):
        tgt = self.start_registry(name="tgt")
        cases = [("--repo", "team-(a"), ("--tag", "[z-a]"),
                 ("--repo", "(?<=team)-a"),         # valid for Python, not for RE2
                 ("--tag", "v1", "--repo", "*oops")]
        for flags in cases:
            with self.subTest(flags=flags):
                run = crossdock("mirror", self.src, f"{tgt.host}/dst", "--insecure",
                                "--json", *flags)
                self.assertExit(run, 2)
                low = run.output.lower()
                self.assertTrue("regex" in low or "regular expression" in low,
                                "error does not mention the regex" + run.describe())
        self.assertNothingWritten(tgt)

    def test_bad_flags_are_usage_errors(self):
        tgt = self.start_registry(name="tgt")
        for args in (["--no-such-flag"], ["--type", "bogus"], ["--jobs", "many"]):
            with self.subTest(args=args):
                run = crossdock("mirror", self.src, f"{tgt.host}/dst", "--insecure", *args)
                self.assertExit(run, 2)
                self.assertTrue(run.stderr.strip(), "no error message" + run.describe())
        run = crossdock("mirror", self.src, "--insecure")   # no TARGET
        self.assertExit(run, 2)
        self.assertNothingWritten(tgt)


# --------------------------------------------------------------------------
# (5) htpasswd auth + TLS
# --------------------------------------------------------------------------

class AuthTlsTest(MirrorTestCase):
    @classmethod
    def setUpClass(cls):
        cls.source = Registry(auth=True, tls=True, username="srcuser",
                              password="src-Pa55-word", name="src-auth")
        cls.target = Registry(auth=True, tls=True, username="dstuser",
                              password="dst-Pa55-word", name="tgt-auth")
        try:
            cls.source.start()
            cls.target.start()
            cls.corpus = corpus.push_corpus(cls.source.client(), SRC_NS, outside=False)
        except BaseException:
            cls.source.stop()
            cls.target.stop()
            raise
        assert cls.source.ca_file == cls.target.ca_file  # one CA for the whole run

    @classmethod
    def tearDownClass(cls):
        cls.source.stop()
        cls.target.stop()

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="crossdock-authtest-")
        self.addCleanup(shutil.rmtree, self.tmp, True)

    @property
    def src(self):
        return f"{self.source.host}/{SRC_NS}"

    def authfile(self, name, target_password=None):
        auths = {}
        for reg, pw in ((self.source, None), (self.target, target_password)):
            token = base64.b64encode(f"{reg.username}:{pw or reg.password}".encode()).decode()
            auths[reg.host] = {"auth": token}
        path = os.path.join(self.tmp, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump({"auths": auths}, f)
        return path

    def check_mirrored(self, run, tns, entries):
        self.assertExit(run, 0)
        self.assertSummaryShape(run)
        self.assertItems(run, f"{self.target.host}/{tns}", entries, "copied")
        self.assertMirrored(self.target, tns, entries)

    def test_creds_flags_and_ca_file(self):
        entries = self.corpus.in_namespace()
        run = crossdock("mirror", self.src, f"{self.target.host}/flags",
                        "--ca-file", self.source.ca_file,
                        "--src-creds", self.source.creds, "--dest-creds", self.target.creds,
                        "--json")
        self.check_mirrored(run, "flags", entries)
        self.assertNotIn(self.source.password, run.output)
        self.assertNotIn(self.target.password, run.output)
        # skopeo with real TLS verification against the same CA, and credentials.
        for rel, tag in (("team-a/web", "v1"), ("team-b/worker", "multi")):
            self.assertEqual(
                check.skopeo_raw_digest(self.target.host, f"flags/{rel}", tag,
                                        creds=self.target.creds,
                                        cert_dir=self.target.cert_dir),
                self.corpus.entry(rel, tag).digest)

    def test_authfile_flag(self):
        entries = self.corpus.select(repo_re="team-.*")
        run = crossdock("mirror", self.src, f"{self.target.host}/authfile",
                        "--ca-file", self.source.ca_file, "--repo", "team-.*",
                        "--authfile", self.authfile("auth.json"), "--json")
        self.check_mirrored(run, "authfile", entries)

    def test_registry_auth_file_env(self):
        entries = self.corpus.select(repo_re="team-a/api")
        env = base_env(REGISTRY_AUTH_FILE=self.authfile("env/auth.json"))
        run = crossdock("mirror", self.src, f"{self.target.host}/envauth",
                        "--ca-file", self.source.ca_file, "--repo", "team-a/api", "--json",
                        env=env)
        self.check_mirrored(run, "envauth", entries)

    def test_docker_config_env(self):
        entries = self.corpus.select(repo_re="team-a/api")
        path = self.authfile("docker/config.json")
        env = base_env(DOCKER_CONFIG=os.path.dirname(path))
        run = crossdock("mirror", self.src, f"{self.target.host}/dockercfg",
                        "--ca-file", self.source.ca_file, "--repo", "team-a/api", "--json",
                        env=env)
        self.check_mirrored(run, "dockercfg", entries)

    def test_insecure_skips_tls_verification(self):
        entries = self.corpus.select(repo_re="charts/.*")
        run = crossdock("mirror", self.src, f"{self.target.host}/insecure", "--insecure",
                        "--src-creds", self.source.creds, "--dest-creds", self.target.creds,
                        "--repo", "charts/.*", "--json")
        self.check_mirrored(run, "insecure", entries)

    def _target_repos(self, tns):
        return [r for r in check.catalog(self.target.client()) if r.startswith(tns + "/")]

    def test_wrong_dest_password(self):
        bad = "Wr0ng-dest-PASSWORD-42"
        run = crossdock("mirror", self.src, f"{self.target.host}/wrongdst",
                        "--ca-file", self.source.ca_file, "--repo", "team-a/api",
                        "--src-creds", self.source.creds,
                        "--dest-creds", f"{self.target.username}:{bad}")
        self.assertExit(run, 1)
        self.assertNotIn(bad, run.output, "password leaked into output")
        low = run.output.lower()
        self.assertTrue(any(w in low for w in AUTH_WORDS),
                        "no clear authentication error" + run.describe())
        self.assertEqual(self._target_repos("wrongdst"), [])

    def test_wrong_dest_password_in_authfile(self):
        bad = "Wr0ng-authfile-PASSWORD-43"
        run = crossdock("mirror", self.src, f"{self.target.host}/wrongauthfile",
                        "--ca-file", self.source.ca_file, "--repo", "team-a/api",
                        "--authfile", self.authfile("bad.json", target_password=bad),
                        "--json")
        self.assertExit(run, 1)
        self.assertNotIn(bad, run.output, "password leaked into output")
        self.assertNotIn(base64.b64encode(f"{self.target.username}:{bad}".encode()).decode(),
                         run.output, "auth token leaked into output")
        s = self.assertSummaryShape(run)
        # The summary must name the failure: failed items (each with a reason),
        # or - if the target was refused before any artifact was tried - a
        # run-level entry in "errors".
        errors = s.get("errors") or []
        self.assertTrue(s["failed"] > 0 or errors,
                        "summary names no failure" + run.describe())
        for it in run.items:
            self.assertEqual(it["action"], "failed", it)
            self.assertTrue(it["reason"], f"failed item without a reason: {it}")
        named = json.dumps([it["reason"] for it in run.items] + list(errors)).lower()
        self.assertTrue(any(w in named for w in AUTH_WORDS),
                        "failure reason does not say it is about authentication"
                        + run.describe())
        self.assertEqual(self._target_repos("wrongauthfile"), [])

    def test_wrong_src_password(self):
        bad = "Wr0ng-src-PASSWORD-44"
        run = crossdock("mirror", self.src, f"{self.target.host}/wrongsrc",
                        "--ca-file", self.source.ca_file,
                        "--src-creds", f"{self.source.username}:{bad}",
                        "--dest-creds", self.target.creds)
        self.assertExit(run, 1)
        self.assertNotIn(bad, run.output, "password leaked into output")
        low = run.output.lower()
        self.assertTrue(any(w in low for w in AUTH_WORDS),
                        "no clear authentication error" + run.describe())
        self.assertEqual(self._target_repos("wrongsrc"), [])

    def test_untrusted_certificate_fails(self):
        run = crossdock("mirror", self.src, f"{self.target.host}/untrusted",
                        "--src-creds", self.source.creds, "--dest-creds", self.target.creds,
                        "--repo", "team-a/api")
        self.assertExit(run, 1)
        low = run.output.lower()
        self.assertTrue(any(w in low for w in ("certificate", "ssl", "tls", "verify")),
                        "no clear TLS error" + run.describe())
        self.assertEqual(self._target_repos("untrusted"), [])


if __name__ == "__main__":
    unittest.main(verbosity=2)
