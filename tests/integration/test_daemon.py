"""End-to-end tests of the sidecar daemon, `crossdock serve`.

The daemon runs as a subprocess (``$CROSSDOCK_BIN serve --state DIR``) in a
fresh temporary state directory per test; the tests drive it through its
control API (HTTP/1.1 + JSON on the Unix socket, engine/api.h) and its
loopback /healthz and /metrics port, exactly as a client would (the client,
the daemon fixture and the test base are in daemonenv.py).  What the
daemon's tasks did is checked independently against real docker-registry
instances (check.py: manifest digests, completeness, catalogs and tags), not
only by the daemon's word.

What is tested:

- rules over the socket: create / list / show / PATCH / disable / enable /
  delete, 201 + Location, unique names (409), unknown rule (404);
- a manual trigger: Queued -> Succeeded, every tag of the namespace on the
  target with the source digest, counters and items that agree; a second
  trigger logs everything as "skipped: same digest" and writes nothing;
- overwrite off ("skipped: exists", target untouched) and on ("copied");
- repo_filter / tag_filter, and RE2 errors answered 400 with field + position;
- schedules: an enabled rule with "10s" gets a task (trigger "schedule")
  without any trigger call; a disabled one gets none;
- a disabled rule refuses a manual trigger (409) and gets no task;
- credentials are never echoed (API responses, errors, the daemon's log);
  state dir 0700, state.db 0600, socket 0600;
- bad input: not JSON (400), over 1 MiB (413), unknown / missing field (400
  naming it), unknown task (404); the daemon still answers afterwards;
- cancel of a running task (a ~300 MiB blob behind a throttled proxy): 202,
  then Stopped within a bounded time;
- kill -9 mid-blob: a new daemon on the same state resumes the same task id,
  which ends Succeeded with the image intact on the target (one item, once);
- SIGTERM mid-task: exit 0 within stop-timeout + a few seconds; after a
  restart the task completes;
- /healthz and /metrics (crossdock_tasks_finished_total by status);
- a second daemon on the same state directory is refused.

Registries: one shared source (small corpora in their own namespaces plus
one big image, pushed once) and one shared target for the tests that only
add to their own namespace; the big-blob tests get fresh targets and, through
``pipeproxy.PipeProxy``, a throttled path to the source so that the daemon is
reliably caught in the middle of the blob.

Every wait is bounded in time and in iterations; all traffic stays on
127.0.0.1.  Python 3 standard library only.
"""

import base64
import hashlib
import json
import os
import random
import re
import signal
import stat
import subprocess
import sys
import time
import unittest
import urllib.error
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import cdenv  # noqa: E402
import check  # noqa: E402
import corpus  # noqa: E402
from cdenv import base_env  # noqa: E402
from pipeproxy import PipeProxy  # noqa: E402
from registry import Registry, no_proxy_opener  # noqa: E402
import daemonenv  # noqa: E402
from daemonenv import CROSSDOCK, KiB, MiB, STOP_TIMEOUT  # noqa: E402

PASSWORD = "s3cr3t-Pa55-xyz"       # a registry's (correct) password
WRONG_PASSWORD = "wr0ng-Pa55-xyz"  # a rule's (wrong) target password

SRC_NS = "src-ns"           # the default corpus (small layers)
OW_NS = "ow"                # ow/app:v1, for the overwrite test
SMALL_NS = "small"          # small/app:v1, one small image for quick tasks
BIG_NS = "big"              # big/app:v1 = config + one BIG_SIZE layer
BIG_SIZE = 300 * MiB
BIG_CHUNK = 16 * MiB        # PATCH size when pushing the big layer

SOURCE = None     # registry.Registry, shared, read-only for the tests
TARGET = None     # registry.Registry, shared; each test writes its own namespaces only
CORPUS = None     # corpus.Corpus pushed under SRC_NS
OW_SRC = None     # corpus.Manifest of ow/app:v1
SMALL = None      # corpus.Manifest of small/app:v1
BIG = None        # BigImage


# --------------------------------------------------------------------------
# Source content
# --------------------------------------------------------------------------

class BigImage:
    def __init__(self, repo, tag, digest, layer_digest, layer_size, config_digest, total):
        self.repo, self.tag, self.digest = repo, tag, digest
        self.layer_digest, self.layer_size = layer_digest, layer_size
        self.config_digest = config_digest
        self.total = total


def push_big_image(client, repo, tag, size, seed=4242):
    """An OCI image whose only layer is ``size`` pseudo-random (incompressible) bytes,
    pushed as a chunked upload (PATCH per BIG_CHUNK) so it never sits whole in memory."""
    rng = random.Random(seed)
    h = hashlib.sha256()
    base = client.base_url + "/"
    r = client.request("POST", f"/v2/{repo}/blobs/uploads/", ok=(202,))
    loc = urllib.parse.urljoin(base, r.headers["Location"])
    off = 0
    for _ in range(size // BIG_CHUNK + 2):
        if off >= size:
            break
        n = min(BIG_CHUNK, size - off)
        data = rng.randbytes(n)
        h.update(data)
        r = client.request("PATCH", loc, data=data,
                           headers={"Content-Type": "application/octet-stream",
                                    "Content-Range": f"{off}-{off + n - 1}"}, ok=(202,))
        loc = urllib.parse.urljoin(base, r.headers["Location"])
        off += n
    layer_digest = "sha256:" + h.hexdigest()
    sep = "&" if "?" in loc else "?"
    client.request("PUT", f"{loc}{sep}digest={urllib.parse.quote(layer_digest, safe=':')}",
                   data=b"", ok=(201,))
    cfg = json.dumps({"created": "2024-01-01T00:00:00Z", "architecture": "amd64", "os": "linux",
                      "config": {"Labels": {"org.crossdock.test": "daemon-big"}},
                      "rootfs": {"type": "layers", "diff_ids": [layer_digest]}}).encode()
    cfg_digest = client.push_blob(repo, cfg)
    doc = {"schemaVersion": 2, "mediaType": corpus.OCI_MANIFEST,
           "config": {"mediaType": corpus.OCI_CONFIG, "digest": cfg_digest, "size": len(cfg)},
           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                       "digest": layer_digest, "size": size}]}
    body = (json.dumps(doc, indent=2) + "\n").encode()
    digest = client.put_manifest(repo, tag, body, corpus.OCI_MANIFEST)
    return BigImage(repo, tag, digest, layer_digest, size, cfg_digest, size + len(cfg) + len(body))


def blob_sha256(reg, repo, digest):
    """sha256 of a blob as the registry serves it (streamed), or None on 404."""
    opener = no_proxy_opener()
    h = hashlib.sha256()
    try:
        with opener.open(f"{reg.url}/v2/{repo}/blobs/{digest}", timeout=120) as r:
            for _ in range(1 << 20):
                b = r.read(1 * MiB)
                if not b:
                    break
                h.update(b)
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise
    return "sha256:" + h.hexdigest()


def setUpModule():
    global SOURCE, TARGET, CORPUS, OW_SRC, SMALL, BIG
    if not (os.path.isfile(CROSSDOCK) and os.access(CROSSDOCK, os.X_OK)):
        raise RuntimeError(f"crossdock binary not found at {CROSSDOCK} "
                           "(build it, or set CROSSDOCK_BIN)")
    SOURCE = Registry(name="dmn-src")
    TARGET = Registry(name="dmn-tgt")
    try:
        SOURCE.start()
        TARGET.start()
        client = SOURCE.client()
        CORPUS = corpus.push_corpus(client, SRC_NS, max_size=256 * KiB, base_size=128 * KiB)
        OW_SRC = corpus.push_image(client, f"{OW_NS}/app", "v1", "ow-src")
        SMALL = corpus.push_image(client, f"{SMALL_NS}/app", "v1", "small-src")
        BIG = push_big_image(client, f"{BIG_NS}/app", "v1", BIG_SIZE)
    except BaseException:
        tearDownModule()
        raise


def tearDownModule():
    for reg in (SOURCE, TARGET):
        if reg is not None:
            reg.stop()
    cdenv.remove_empty_docker_config()


# --------------------------------------------------------------------------
# Test base: daemonenv's, with the shared registries
# --------------------------------------------------------------------------

def _prom_samples(text):
    """{'name{labels}': float} of a Prometheus text exposition; raises on a bad line."""
    out = {}
    sample = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^}]*\})?)\s+(\S+)$')
    for line in text.splitlines():
        if not line.strip():
            continue
        if line.startswith("#"):
            if not re.match(r"^# (HELP|TYPE) [a-zA-Z_:][a-zA-Z0-9_:]* ", line):
                raise ValueError(f"bad comment line {line!r}")
            continue
        m = sample.match(line)
        if not m:
            raise ValueError(f"bad sample line {line!r}")
        out[m.group(1)] = float(m.group(2))
    return out


class DaemonTestCase(daemonenv.DaemonTestCase):
    """daemonenv.DaemonTestCase with this module's shared source and target."""

    def setup_pair(self, api, source_url=None, target_url=None, prefix="r"):
        """Registers the source and target registries; returns their names."""
        src, dst = f"{prefix}-src", f"{prefix}-dst"
        self.add_registry(api, src, source_url or SOURCE.url)
        self.add_registry(api, dst, target_url or TARGET.url)
        return src, dst


# --------------------------------------------------------------------------
# 1. Rules and registries over the socket
# --------------------------------------------------------------------------

class RuleApiTest(DaemonTestCase):
    def test_rule_lifecycle(self):
        d = self.start_daemon()
        api = d.api

        v = self.expect(api.get("/v1/version"), 200)
        self.assertEqual(v.get("api_version"), "v1", v)

        # Registries: 201 + Location that resolves; names unique.
        r = api.post("/v1/registries", {"name": "lc-src", "url": SOURCE.url, "region": "eu"})
        src = self.expect(r, 201)
        self.assertEqual(r.header("Location"), f"/v1/registries/{src['id']}", r.describe())
        self.assertEqual((src["name"], src["url"], src["region"]), ("lc-src", SOURCE.url, "eu"),
                         r.describe())
        got = self.expect(api.get(r.header("Location")), 200)
        self.assertEqual(got["name"], "lc-src")
        self.expect(api.post("/v1/registries", {"name": "lc-src", "url": TARGET.url}), 409,
                    "duplicate registry name")
        self.add_registry(api, "lc-dst", TARGET.url)
        names = [x["name"] for x in self.expect(api.get("/v1/registries"), 200)["registries"]]
        self.assertEqual(sorted(names), ["lc-dst", "lc-src"])

        # A rule naming an unknown registry is refused, naming the field.
        r = api.post("/v1/rules", {"name": "lc-bad", "source_registry": "nope",
                                   "source_namespace": SRC_NS, "target_registry": "lc-dst"})
        self.expect(r, 400, "unknown source registry")
        self.assertIn("source_registry", r.error_fields(), r.describe())

        # Create: 201 + Location; defaults filled in.
        body = {"name": "lc-rule", "source_registry": "lc-src", "source_namespace": SRC_NS,
                "target_registry": "lc-dst", "target_namespace": "lc-ns"}
        r = api.post("/v1/rules", body)
        rule = self.expect(r, 201)
        rid = rule["id"]
        self.assertEqual(r.header("Location"), f"/v1/rules/{rid}", r.describe())
        for k, want in (("name", "lc-rule"), ("source_registry", "lc-src"),
                        ("source_namespace", SRC_NS), ("target_registry", "lc-dst"),
                        ("target_namespace", "lc-ns"), ("repo_filter", ""), ("tag_filter", ""),
                        ("type", "all"), ("overwrite", False), ("enabled", True),
                        ("schedule", ""), ("has_target_credentials", False)):
            self.assertEqual(rule.get(k), want, f"{k}: {r.describe()}")

        # Show by Location, id and name; list.
        for ref in (r.header("Location"), f"/v1/rules/{rid}", "/v1/rules/lc-rule"):
            got = self.expect(api.get(ref), 200, ref)
            self.assertEqual((got["id"], got["name"]), (rid, "lc-rule"), ref)
        listed = self.expect(api.get("/v1/rules"), 200)["rules"]
        self.assertEqual([x["name"] for x in listed], ["lc-rule"])

        # Unique names: 409, nothing added.
        self.expect(api.post("/v1/rules", body), 409, "duplicate rule name")
        self.assertEqual(len(self.expect(api.get("/v1/rules"), 200)["rules"]), 1)

        # PATCH: only the given fields change, and the change is persisted.
        r = api.patch("/v1/rules/lc-rule", {"description": "patched", "tag_filter": "v.*",
                                            "overwrite": True, "schedule": "1h"})
        p = self.expect(r, 200, "PATCH rule")
        self.assertEqual((p["description"], p["tag_filter"], p["overwrite"], p["schedule"]),
                         ("patched", "v.*", True, "1h"), r.describe())
        self.assertEqual((p["source_namespace"], p["target_namespace"], p["enabled"]),
                         (SRC_NS, "lc-ns", True), r.describe())
        self.assertIsNotNone(p["next_fire"], "a scheduled rule has a next_fire" + r.describe())
        got = self.expect(api.get(f"/v1/rules/{rid}"), 200)
        self.assertEqual((got["description"], got["tag_filter"], got["overwrite"]),
                         ("patched", "v.*", True))
        # A GET document can be sent back as it is (read-only fields ignored).
        self.expect(api.patch(f"/v1/rules/{rid}", got), 200, "PATCH with a GET document")
        # Renaming: the old name is gone, the id stays.
        self.expect(api.patch("/v1/rules/lc-rule", {"name": "lc-rule2"}), 200, "rename")
        self.expect(api.get("/v1/rules/lc-rule"), 404, "old name after rename")
        self.assertEqual(self.expect(api.get("/v1/rules/lc-rule2"), 200)["id"], rid)

        # Disable / enable (idempotent).
        for action, want in (("disable", False), ("disable", False), ("enable", True)):
            r = api.post(f"/v1/rules/lc-rule2/{action}")
            self.assertEqual(self.expect(r, 200, action)["enabled"], want, r.describe())
            self.assertEqual(self.expect(api.get(f"/v1/rules/{rid}"), 200)["enabled"], want)

        # A registry in use cannot be deleted.
        self.expect(api.delete("/v1/registries/lc-dst"), 409, "delete a registry in use")

        # Persisted across a restart of the daemon.
        self.assertEqual(d.stop(), 0, d.describe())
        d = self.start_daemon()
        api = d.api
        got = self.expect(api.get("/v1/rules/lc-rule2"), 200, "rule after a restart")
        self.assertEqual((got["id"], got["description"], got["overwrite"]), (rid, "patched", True))

        # Delete: 204, then 404 everywhere.
        self.expect(api.delete("/v1/rules/lc-rule2"), 204, "delete rule")
        self.expect(api.get(f"/v1/rules/{rid}"), 404, "deleted rule")
        self.expect(api.delete(f"/v1/rules/{rid}"), 404, "delete twice")
        self.assertEqual(self.expect(api.get("/v1/rules"), 200)["rules"], [])
        self.expect(api.delete("/v1/registries/lc-dst"), 204, "delete an unused registry")

        # Unknown rules: 404 with a JSON message, for every route under /v1/rules/{ref}.
        for method, path, b in (("GET", "/v1/rules/no-such-rule", None),
                                ("GET", "/v1/rules/987654", None),
                                ("PATCH", "/v1/rules/no-such-rule", {"description": "x"}),
                                ("DELETE", "/v1/rules/no-such-rule", None),
                                ("POST", "/v1/rules/no-such-rule/trigger", None),
                                ("POST", "/v1/rules/no-such-rule/enable", None)):
            r = api.request(method, path, b)
            self.expect(r, 404, f"{method} {path}")
            self.assertIsInstance(r.json, dict, r.describe())
            self.assertTrue(r.json.get("message"), r.describe())


# --------------------------------------------------------------------------
# 2-4, 6. Tasks: manual trigger, overwrite, filters, disabled rules
# --------------------------------------------------------------------------

class TaskTest(DaemonTestCase):
    def _alias(self, e):
        """Another tag of the same repository holds the same manifest."""
        return any(o.relative == e.relative and o.digest == e.digest and o.tag != e.tag
                   for o in CORPUS.in_namespace())

    def test_manual_trigger_copies_namespace(self):
        d = self.start_daemon()
        api = d.api
        src, dst = self.setup_pair(api)
        tns = "t2-ns"
        self.add_rule(api, "t2", src, SRC_NS, dst, tns)
        entries = CORPUS.in_namespace()
        want_keys = sorted((e.relative, e.tag) for e in entries)

        task = self.trigger(api, "t2")
        self.assertIsNone(task["started"], task)
        done = self.wait_task(api, task["id"])
        self.assertEqual(done["status"], "Succeeded", done)
        self.assertEqual(done["reason"], "", done)
        self.assertIsNotNone(done["started"], done)
        self.assertIsNotNone(done["finished"], done)
        self.assertNotIn("progress", done, "a finished task has no live progress")

        # The target, independently: exactly the namespace's repositories and tags,
        # with the source digests and complete content; nothing from outside it.
        cl = TARGET.client()
        self.assertEqual(sorted(r for r in check.catalog(cl) if r.startswith(tns + "/")),
                         sorted(f"{tns}/{r}" for r in CORPUS.repositories()))
        for rel in CORPUS.repositories():
            self.assertEqual(check.tags(cl, f"{tns}/{rel}"), CORPUS.tags(rel), rel)
        for e in entries:
            self.assertImageOnTarget(TARGET, f"{tns}/{e.relative}", e.tag, e.digest, cl)
        self.assertEqual(check.tags(cl, f"{tns}/other/thing"), [])
        self.assertEqual(check.tags(cl, "other/thing"), [])

        # Items: one per tag, "copied", the source digest, bytes for new content.
        items = self.items(api, task["id"])
        self.assertEqual(sorted((i["repository"], i["tag"]) for i in items), want_keys, items)
        for i in items:
            e = CORPUS.entry(i["repository"], i["tag"])
            self.assertEqual(i["action"], "copied", i)
            self.assertEqual(i["digest"], e.digest, i)
            self.assertEqual(i["task_id"], task["id"], i)
            self.assertLessEqual(i["bytes"], e.manifest.total_bytes(), i)
            if not self._alias(e):
                self.assertGreater(i["bytes"], 0, f"a copied image with no bytes: {i}")
        # Counters agree with the items and the corpus.
        self.assertEqual(done["copied"], len(entries), done)
        self.assertEqual((done["skipped"], done["failed"]), (0, 0), done)
        self.assertEqual(done["repositories"], len(CORPUS.repositories()), done)
        self.assertEqual(done["bytes"], sum(i["bytes"] for i in items), done)
        self.assertGreater(done["bytes"], 0, done)
        self.assertEqual(done["success_ratio"], 1, done)

        # Again: every artifact "skipped: same digest", no bytes, nothing written.
        writes_before = len(TARGET.write_requests())
        again, items2 = self.run_task(api, "t2")
        self.assertEqual(again["status"], "Succeeded", again)
        self.assertNotEqual(again["id"], task["id"])
        self.assertEqual(sorted((i["repository"], i["tag"]) for i in items2), want_keys, items2)
        for i in items2:
            self.assertEqual(i["action"], "skipped: same digest", i)
            self.assertEqual(i["bytes"], 0, i)
            self.assertEqual(i["digest"], CORPUS.entry(i["repository"], i["tag"]).digest, i)
        self.assertEqual((again["copied"], again["skipped"], again["failed"], again["bytes"]),
                         (0, len(entries), 0, 0), again)
        self.assertEqual(TARGET.write_requests()[writes_before:], [],
                         "the second task wrote to the target")
        for e in entries:
            self.assertEqual(check.manifest_digest(cl, f"{tns}/{e.relative}", e.tag), e.digest)

        # Both tasks are listed for the rule, newest first or oldest first, but both.
        ids = sorted(t["id"] for t in self.tasks_of(api, "t2"))
        self.assertEqual(ids, sorted([task["id"], again["id"]]))
        # The action filter of the items endpoint.
        q = urllib.parse.quote("skipped: same digest")
        page = self.expect(api.get(f"/v1/tasks/{again['id']}/items?action={q}"), 200)
        self.assertEqual(len(page["items"]), len(entries), page)
        page = self.expect(api.get(f"/v1/tasks/{again['id']}/items?action=copied"), 200)
        self.assertEqual(page["items"], [], page)

    def test_overwrite_semantics(self):
        d = self.start_daemon()
        api = d.api
        src, dst = self.setup_pair(api)
        tns = "t3-ow"
        cl = TARGET.client()
        other = corpus.push_image(cl, f"{tns}/app", "v1", "ow-other-content")
        self.assertNotEqual(other.digest, OW_SRC.digest)
        self.add_rule(api, "t3", src, OW_NS, dst, tns, overwrite=False)

        done, items = self.run_task(api, "t3")
        self.assertEqual(done["status"], "Succeeded", done)
        self.assertEqual(len(items), 1, items)
        it = items[0]
        self.assertEqual((it["repository"], it["tag"], it["action"]),
                         ("app", "v1", "skipped: exists"), it)
        self.assertTrue(it["reason"], f"a skipped-exists item without a reason: {it}")
        self.assertEqual((done["copied"], done["skipped"], done["bytes"]), (0, 1, 0), done)
        self.assertEqual(check.manifest_digest(cl, f"{tns}/app", "v1"), other.digest,
                         "the target's tag changed although overwrite is off")

        r = api.patch("/v1/rules/t3", {"overwrite": True})
        self.assertIs(self.expect(r, 200, "PATCH overwrite")["overwrite"], True, r.describe())
        done, items = self.run_task(api, "t3")
        self.assertEqual(done["status"], "Succeeded", done)
        self.assertEqual(len(items), 1, items)
        self.assertEqual((items[0]["action"], items[0]["digest"]), ("copied", OW_SRC.digest),
                         items)
        self.assertEqual((done["copied"], done["skipped"]), (1, 0), done)
        self.assertImageOnTarget(TARGET, f"{tns}/app", "v1", OW_SRC.digest, cl)

    def test_filters(self):
        d = self.start_daemon()
        api = d.api
        src, dst = self.setup_pair(api)
        tns = "t4-ns"
        repo_re, tag_re = r"team-a/.*|legacy/app", r"v[0-9]+"
        self.add_rule(api, "t4", src, SRC_NS, dst, tns, repo_filter=repo_re, tag_filter=tag_re)
        want = CORPUS.select(repo_re, tag_re)
        self.assertTrue(0 < len(want) < len(CORPUS.in_namespace()))

        done, items = self.run_task(api, "t4")
        self.assertEqual(done["status"], "Succeeded", done)
        self.assertEqual(sorted((i["repository"], i["tag"]) for i in items),
                         sorted((e.relative, e.tag) for e in want), items)
        self.assertTrue(all(i["action"] == "copied" for i in items), items)
        self.assertEqual(done["copied"], len(want), done)

        cl = TARGET.client()
        self.assertEqual(sorted(r for r in check.catalog(cl) if r.startswith(tns + "/")),
                         sorted(f"{tns}/{r}" for r in CORPUS.repositories(want)))
        tags = {}
        for e in want:
            tags.setdefault(e.relative, set()).add(e.tag)
        for rel, ts in tags.items():
            self.assertEqual(check.tags(cl, f"{tns}/{rel}"), sorted(ts), rel)
        for e in want:
            self.assertImageOnTarget(TARGET, f"{tns}/{e.relative}", e.tag, e.digest, cl)

        # Invalid regular expressions: 400 naming the field and the position.
        base = {"name": "t4-bad", "source_registry": src, "source_namespace": SRC_NS,
                "target_registry": dst, "target_namespace": "t4-bad"}
        for field, pattern, pos in (("repo_filter", "a**", 2), ("tag_filter", "v(1", 4)):
            r = api.post("/v1/rules", dict(base, **{field: pattern}))
            self.expect(r, 400, f"{field} {pattern!r}")
            self.assertIn(field, r.error_fields(), r.describe())
            msg = r.error_for(field)
            self.assertRegex(msg, rf"\bposition {pos}\b", r.describe())
        self.expect(api.get("/v1/rules/t4-bad"), 404, "a refused rule was created")
        # PATCH with a bad filter: 400, the rule unchanged.
        r = api.patch("/v1/rules/t4", {"repo_filter": "team-(a"})
        self.expect(r, 400, "PATCH a bad repo_filter")
        self.assertIn("repo_filter", r.error_fields(), r.describe())
        self.assertRegex(r.error_for("repo_filter"), r"\bposition \d+", r.describe())
        self.assertEqual(self.expect(api.get("/v1/rules/t4"), 200)["repo_filter"], repo_re)

    def test_disabled_rule_trigger_refused(self):
        d = self.start_daemon()
        api = d.api
        src, dst = self.setup_pair(api)
        tns = "t6-ns"
        self.add_rule(api, "t6", src, SMALL_NS, dst, tns, enabled=False)
        r = api.post("/v1/rules/t6/trigger")
        self.expect(r, 409, "trigger a disabled rule")
        self.assertIn("disabled", (r.json or {}).get("message", ""), r.describe())
        self.assertEqual(self.tasks_of(api, "t6"), [])
        all_tasks = self.expect(api.get("/v1/tasks"), 200)["tasks"]
        self.assertEqual(all_tasks, [], "a task exists after a refused trigger")
        # Disabling an enabled rule has the same effect.
        self.expect(api.post("/v1/rules/t6/enable"), 200)
        self.expect(api.post("/v1/rules/t6/disable"), 200)
        self.expect(api.post("/v1/rules/t6/trigger"), 409, "trigger after disable")
        time.sleep(1.5)        # more than a scheduling tick: nothing runs behind our back
        self.assertEqual(self.tasks_of(api, "t6"), [])
        self.assertEqual(check.tags(TARGET.client(), f"{tns}/app"), [],
                         "the disabled rule copied something")


# --------------------------------------------------------------------------
# 5. Schedules
# --------------------------------------------------------------------------

class ScheduleTest(DaemonTestCase):
    WAIT = 25.0

    def test_scheduled_trigger(self):
        d = self.start_daemon()
        api = d.api
        src, dst = self.setup_pair(api)
        t0 = time.monotonic()
        on = self.add_rule(api, "t5-on", src, SMALL_NS, dst, "t5-on", schedule="10s")
        off = self.add_rule(api, "t5-off", src, SMALL_NS, dst, "t5-off", schedule="10s",
                            enabled=False)
        self.assertIsNotNone(on["next_fire"], on)
        self.assertFalse(off["enabled"], off)

        # The enabled rule gets a task without any trigger call.
        first = None
        for _ in range(int(self.WAIT / 0.25) + 10):
            tasks = self.tasks_of(api, "t5-on")
            if tasks:
                first = min(tasks, key=lambda t: t["id"])
                break
            if time.monotonic() - t0 >= self.WAIT:
                break
            time.sleep(0.25)
        self.assertIsNotNone(first, f"no scheduled task for t5-on within {self.WAIT}s")
        elapsed = time.monotonic() - t0
        self.assertGreaterEqual(elapsed, 9.0, f"the schedule fired after {elapsed:.1f}s, not ~10s")
        self.assertEqual(first["trigger"], "schedule", first)
        self.assertEqual(first["rule_name"], "t5-on", first)
        done = self.wait_task(api, first["id"])
        self.assertEqual(done["status"], "Succeeded", done)
        self.assertImageOnTarget(TARGET, "t5-on/app", "v1", SMALL.digest)

        # The disabled rule: nothing, after the same time (two of its intervals).
        for _ in range(int(self.WAIT / 0.5) + 10):
            if time.monotonic() - t0 >= self.WAIT:
                break
            time.sleep(0.5)
        self.assertEqual(self.tasks_of(api, "t5-off"), [], "the disabled rule got a task")
        self.assertEqual(check.tags(TARGET.client(), "t5-off/app"), [])
        for t in self.tasks_of(api, "t5-on"):
            self.assertEqual(t["trigger"], "schedule", t)


# --------------------------------------------------------------------------
# 7. Credentials and file modes
# --------------------------------------------------------------------------

class CredentialsTest(DaemonTestCase):
    def test_credentials_never_echoed(self):
        auth = self.start_registry(auth=True, password=PASSWORD, name="dmn-auth")
        d = self.start_daemon()
        api = d.api
        secrets = [PASSWORD, WRONG_PASSWORD,
                   base64.b64encode(f"{auth.username}:{PASSWORD}".encode()).decode(),
                   base64.b64encode(f"{auth.username}:{WRONG_PASSWORD}".encode()).decode()]

        self.add_registry(api, "c-src", SOURCE.url)
        reg = self.add_registry(api, "c-dst", auth.url, username=auth.username,
                                password=PASSWORD)
        self.assertIs(reg["has_credentials"], True, reg)
        self.assertNotIn("password", reg)
        # Good credentials (the registry's): the task succeeds, so they were stored and used.
        self.add_rule(api, "c-good", "c-src", SMALL_NS, "c-dst", "t7-good")
        good, good_items = self.run_task(api, "c-good")
        self.assertEqual(good["status"], "Succeeded", good)
        self.assertImageOnTarget(auth, "t7-good/app", "v1", SMALL.digest)
        # Wrong credentials on the rule: the task fails with 401s, which are reported.
        bad_rule = self.add_rule(api, "c-bad", "c-src", SMALL_NS, "c-dst", "t7-bad",
                                 target_username=auth.username, target_password=WRONG_PASSWORD)
        self.assertIs(bad_rule["has_target_credentials"], True, bad_rule)
        bad, bad_items = self.run_task(api, "c-bad")
        self.assertIn(bad["status"], ("Failed", "PartiallyFailed"), bad)
        self.assertTrue(bad["reason"] or any(i["reason"] for i in bad_items), (bad, bad_items))

        # Reads of everything that could carry a credential.
        for path in ("/v1/registries", "/v1/registries/c-dst", "/v1/rules", "/v1/rules/c-bad",
                     "/v1/rules/c-good", "/v1/tasks", f"/v1/tasks/{good['id']}",
                     f"/v1/tasks/{bad['id']}", f"/v1/tasks/{bad['id']}/items",
                     f"/v1/tasks/{good['id']}/items"):
            self.expect(api.get(path), 200, path)
        # Bad writes that carry a credential: the errors must not quote it.
        for method, path, body, data in (
                ("PATCH", "/v1/registries/c-dst", {"password": PASSWORD}, None),
                ("PATCH", "/v1/registries/c-dst",
                 {"url": f"http://{auth.username}:{PASSWORD}@127.0.0.1:1"}, None),
                ("PATCH", "/v1/registries/c-dst", {"username": 7, "password": PASSWORD}, None),
                ("PATCH", "/v1/registries/c-dst", None,
                 f'{{"username": "u", "password": "{PASSWORD}",'.encode()),
                ("PATCH", "/v1/rules/c-bad", None,
                 f'{{"target_password": "{WRONG_PASSWORD}" "x"}}'.encode()),
                ("PATCH", "/v1/rules/c-bad", {"target_password": WRONG_PASSWORD}, None),
                ("POST", "/v1/registries", {"name": "Bad Name!", "url": "ftp://x",
                                            "username": "u", "password": PASSWORD}, None),
                ("POST", "/v1/rules", {"name": "c-x", "source_registry": "c-src",
                                       "source_namespace": "BAD NS", "target_registry": "c-dst",
                                       "target_username": "u",
                                       "target_password": WRONG_PASSWORD}, None)):
            r = api.request(method, path, body, data=data)
            self.assertEqual(r.status, 400, f"expected 400 for a bad {method}" + r.describe())
        # The stored credentials survived the refused PATCHes.
        self.assertIs(self.expect(api.get("/v1/registries/c-dst"), 200)["has_credentials"], True)

        self.assertGreater(len(api.transcript), 20)
        for r in api.transcript:
            self.assertNoLeak(r.text + "\n" + r.raw_headers(),
                              f"the answer to {r.method} {r.path}", secrets)

        # File modes, while the daemon runs.
        st = os.stat(d.socket_path)
        self.assertTrue(stat.S_ISSOCK(st.st_mode))
        self.assertEqual(oct(stat.S_IMODE(st.st_mode)), oct(0o600), "socket mode")
        self.assertEqual(oct(stat.S_IMODE(os.stat(d.state_dir).st_mode)), oct(0o700),
                         "state dir mode")
        db = os.path.join(d.state_dir, "state.db")
        self.assertEqual(oct(stat.S_IMODE(os.stat(db).st_mode)), oct(0o600), "state.db mode")
        for suffix in ("-wal", "-shm"):
            if os.path.exists(db + suffix):
                self.assertEqual(oct(stat.S_IMODE(os.stat(db + suffix).st_mode)), oct(0o600),
                                 f"state.db{suffix} mode")

        # The daemon's log, after a clean stop.
        self.assertEqual(d.stop(), 0, d.describe())
        log = d.log_text()
        self.assertIn("task", log)
        self.assertNoLeak(log, "the daemon's log", secrets)


# --------------------------------------------------------------------------
# 8. Bad input
# --------------------------------------------------------------------------

class BadInputTest(DaemonTestCase):
    def test_bad_input(self):
        d = self.start_daemon()
        api = d.api
        self.setup_pair(api, prefix="b")

        r = api.post("/v1/rules", data=b"{not json", content_type="application/json")
        self.expect(r, 400, "body not JSON")
        self.assertIn("not valid JSON", r.json.get("message", ""), r.describe())
        r = api.post("/v1/registries", data=b"", content_type="application/json")
        self.expect(r, 400, "empty body")
        r = api.post("/v1/registries", data=b"[1, 2]", content_type="application/json")
        self.expect(r, 400, "body not an object")

        big = json.dumps({"name": "big", "url": SOURCE.url,
                          "region": "x" * (1 << 20)}).encode()
        self.assertGreater(len(big), 1 << 20)
        r = api.raw_post("/v1/registries", big)
        self.assertEqual(r.status, 413, "body over 1 MiB" + r.describe())
        self.expect(api.get("/v1/registries/big"), 404, "an over-long body created something")

        r = api.post("/v1/registries", {"name": "b-x", "url": SOURCE.url, "colour": "red"})
        self.expect(r, 400, "unknown field")
        self.assertIn("colour", r.error_fields(), r.describe())
        self.assertIn("unknown", r.error_for("colour"), r.describe())
        r = api.patch("/v1/rules/nope", {"colour": "red"})
        self.assertIn(r.status, (400, 404), r.describe())

        r = api.post("/v1/rules", {"name": "b-r", "source_registry": "b-src",
                                   "target_registry": "b-dst"})
        self.expect(r, 400, "missing source_namespace")
        self.assertEqual(r.error_fields(), ["source_namespace"], r.describe())
        r = api.post("/v1/registries", {"url": SOURCE.url})
        self.expect(r, 400, "missing name")
        self.assertIn("name", r.error_fields(), r.describe())
        r = api.post("/v1/rules", {"name": "b-r", "source_registry": "b-src",
                                   "source_namespace": SRC_NS, "target_registry": "b-dst",
                                   "overwrite": "yes"})
        self.expect(r, 400, "wrong type")
        self.assertIn("overwrite", r.error_fields(), r.describe())
        r = api.post("/v1/rules", {"name": "b-r", "source_registry": "b-src",
                                   "source_namespace": SRC_NS, "target_registry": "b-dst",
                                   "schedule": "1s"})
        self.expect(r, 400, "schedule under 10s")
        self.assertIn("schedule", r.error_fields(), r.describe())

        r = api.post("/v1/registries", data=b'{"name": "b-y"}', content_type="text/plain")
        self.expect(r, 415, "wrong Content-Type")

        for method, path in (("GET", "/v1/tasks/987654"), ("GET", "/v1/tasks/987654/items"),
                             ("POST", "/v1/tasks/987654/cancel"), ("GET", "/v1/tasks/abc"),
                             ("GET", "/v1/nothing-here")):
            r = api.request(method, path)
            self.expect(r, 404, f"{method} {path}")
        r = api.request("DELETE", "/v1/version")
        self.expect(r, 405, "wrong method")
        self.assertIn("GET", r.header("Allow") or "", r.describe())
        r = api.get("/v1/tasks?status=Bogus")
        self.expect(r, 400, "bad status filter")
        self.assertIn("status", r.error_fields(), r.describe())

        # Nothing was created by any of it; the daemon is alive and answers.
        self.assertEqual(self.expect(api.get("/v1/rules"), 200)["rules"], [])
        self.assertEqual(sorted(x["name"] for x in
                                self.expect(api.get("/v1/registries"), 200)["registries"]),
                         ["b-dst", "b-src"])
        self.assertTrue(d.running(), d.describe())
        v = self.expect(api.get("/v1/version"), 200, "version after bad input")
        self.assertTrue(v.get("version"), v)


# --------------------------------------------------------------------------
# 9-11. Long tasks: cancel, kill -9, SIGTERM
# --------------------------------------------------------------------------

class LongTaskTest(DaemonTestCase):
    def big_setup(self, api, px, rule, tns, target):
        self.setup_pair(api, source_url=px.url, target_url=target.url, prefix=rule)
        self.add_rule(api, rule, f"{rule}-src", BIG_NS, f"{rule}-dst", tns)

    def assertBigOnTarget(self, target, tns):
        repo = f"{tns}/app"
        self.assertImageOnTarget(target, repo, "v1", BIG.digest)
        self.assertEqual(blob_sha256(target, repo, BIG.layer_digest), BIG.layer_digest,
                         "the big layer's bytes on the target")

    def test_cancel_running_task(self):
        tgt = self.start_registry(name="dmn-tgt9")
        # 10 MiB/s: the whole blob would take ~30 s, more than the cancel may take.
        with PipeProxy(SOURCE, rate=10 * MiB) as px:
            d = self.start_daemon()
            api = d.api
            self.big_setup(api, px, "t9", "t9", tgt)
            task = self.trigger(api, "t9")
            self.wait_mid_blob(api, task["id"], BIG.layer_size, 0.02)
            # A second task of the same rule waits (one task per rule at a time); cancelling a
            # Queued task stops it at once: 200, Stopped, never started.
            queued = self.trigger(api, "t9")
            self.assertEqual(self.get_task(api, queued["id"])["status"], "Queued")
            r = api.post(f"/v1/tasks/{queued['id']}/cancel")
            q = self.expect(r, 200, "cancel a queued task")
            self.assertEqual(q["status"], "Stopped", r.describe())

            t_cancel = time.monotonic()
            r = api.post(f"/v1/tasks/{task['id']}/cancel")
            c = self.expect(r, 202, "cancel a running task")
            self.assertIs(c["cancel_requested"], True, r.describe())
            done = self.wait_task(api, task["id"], timeout=20)
            took = time.monotonic() - t_cancel
            self.assertEqual(done["status"], "Stopped", done)
            self.assertTrue(done["reason"], done)
            self.assertIsNotNone(done["finished"], done)
            self.assertLess(took, 20)

            items = self.items(api, task["id"])
            self.assertEqual([i for i in items if i["action"] == "copied"], [], items)
            self.assertIsNone(check.manifest(tgt.client(), "t9/app", "v1"),
                              "the cancelled task still tagged the image")
            # A finished task cannot be cancelled again; the daemon still answers.
            self.expect(api.post(f"/v1/tasks/{task['id']}/cancel"), 409, "cancel twice")
            self.expect(api.get("/v1/version"), 200)
            q = self.get_task(api, queued["id"])
            self.assertEqual((q["status"], q["started"]), ("Stopped", None), q)
            self.assertEqual(self.items(api, queued["id"]), [])

    def test_kill9_resumes_same_task(self):
        tgt = self.start_registry(name="dmn-tgt10")
        with PipeProxy(SOURCE, rate=40 * MiB) as px:
            d1 = self.start_daemon()
            api = d1.api
            self.big_setup(api, px, "t10", "t10", tgt)
            task = self.trigger(api, "t10")
            tid = task["id"]
            seen = self.wait_mid_blob(api, tid, BIG.layer_size, 0.25)
            d1.send(signal.SIGKILL)
            rc = d1.wait(10)
            self.assertEqual(rc, -signal.SIGKILL, d1.describe())
            d1.kill()         # keeps its log
            read_before = seen["progress"]["bytes_read"]
            self.assertIsNone(check.manifest(tgt.client(), "t10/app", "v1"),
                              "the image was complete before the kill: nothing to resume")

            px.bucket.rate = 1024 * MiB          # the rest may go fast
            t_restart = time.time()
            d2 = self.start_daemon()
            api = d2.api
            done = self.wait_task(api, tid, timeout=90)
            self.assertEqual(done["status"], "Succeeded", done)
            self.assertNotIn("fail", done["reason"].lower(), done)
            self.assertRegex(d2.log_text(), rf"task {tid}\b[^\n]*resum",
                             "the second daemon does not say it resumed the task")

            # The same task, not a new one; one item for the tag, copied once.
            tasks = self.tasks_of(api, "t10")
            self.assertEqual([t["id"] for t in tasks], [tid], tasks)
            items = self.items(api, tid)
            self.assertEqual([(i["repository"], i["tag"], i["action"]) for i in items],
                             [("app", "v1", "copied")], items)
            self.assertEqual(items[0]["digest"], BIG.digest, items)
            self.assertEqual((done["copied"], done["skipped"], done["failed"]), (1, 0, 0), done)

            # The target, independently: the manifest, its blobs, the layer's bytes.
            self.assertBigOnTarget(tgt, "t10")

            # The partial blob was resumed from the cache, not read again whole.
            after = [e for e in px.timeline("GET", re.escape(BIG.layer_digest))
                     if e.t_start >= t_restart]
            reread = sum(e.body_bytes for e in after)
            self.assertLess(reread, BIG.layer_size,
                            f"after the restart the whole layer was read again ({reread} bytes;"
                            f" {read_before} had been read before the kill)")

    def test_sigterm_checkpoints_and_resumes(self):
        tgt = self.start_registry(name="dmn-tgt11")
        with PipeProxy(SOURCE, rate=40 * MiB) as px:
            d1 = self.start_daemon()
            api = d1.api
            self.big_setup(api, px, "t11", "t11", tgt)
            task = self.trigger(api, "t11")
            tid = task["id"]
            self.wait_mid_blob(api, tid, BIG.layer_size, 0.1)

            t0 = time.monotonic()
            d1.send(signal.SIGTERM)
            rc = d1.wait(STOP_TIMEOUT + 5)
            took = time.monotonic() - t0
            self.assertIsNotNone(rc, f"the daemon did not exit within {STOP_TIMEOUT + 5}s "
                                     "of SIGTERM" + d1.describe())
            self.assertEqual(rc, 0, d1.describe())
            d1.stop()          # keeps its log
            log1 = d1.log_text()
            self.assertIn("received SIGTERM", log1)
            self.assertRegex(log1, rf"task {tid}\b[^\n]*checkpointed")
            self.assertIsNone(check.manifest(tgt.client(), "t11/app", "v1"),
                              f"the image was complete after {took:.1f}s: nothing to resume")

            px.bucket.rate = 1024 * MiB
            d2 = self.start_daemon()
            api = d2.api
            mid = self.get_task(api, tid)
            self.assertIn(mid["status"], ("Queued", "InProgress", "Succeeded"), mid)
            done = self.wait_task(api, tid, timeout=90)
            self.assertEqual(done["status"], "Succeeded", done)
            self.assertEqual([t["id"] for t in self.tasks_of(api, "t11")], [tid])
            items = self.items(api, tid)
            self.assertEqual([(i["repository"], i["tag"], i["action"]) for i in items],
                             [("app", "v1", "copied")], items)
            self.assertBigOnTarget(tgt, "t11")


# --------------------------------------------------------------------------
# 12-13. /healthz, /metrics; one daemon per state directory
# --------------------------------------------------------------------------

class ServiceTest(DaemonTestCase):
    def http_get(self, d, path):
        opener = no_proxy_opener()
        try:
            with opener.open(f"{d.base_url}{path}", timeout=10) as r:
                return r.status, dict(r.headers), r.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read().decode("utf-8", "replace")

    def metrics(self, d):
        status, headers, text = self.http_get(d, "/metrics")
        self.assertEqual(status, 200, text)
        ct = {k.lower(): v for k, v in headers.items()}.get("content-type", "")
        self.assertTrue(ct.startswith("text/plain"), ct)
        try:
            return _prom_samples(text), text
        except ValueError as e:
            self.fail(f"/metrics is not Prometheus text: {e}\n{text}")

    def test_healthz_and_metrics(self):
        d = self.start_daemon()
        api = d.api
        self.assertIsNotNone(d.port)
        status, _, text = self.http_get(d, "/healthz")
        self.assertEqual(status, 200, text)
        self.assertEqual(json.loads(text).get("status"), "ok", text)

        ok = 'crossdock_tasks_finished_total{status="Succeeded"}'
        m, text = self.metrics(d)
        self.assertEqual(m.get(ok), 0, text)
        self.assertIn("# TYPE crossdock_tasks_finished_total counter", text)

        src, dst = self.setup_pair(api)
        self.add_rule(api, "t12", src, SMALL_NS, dst, "t12")
        done, _ = self.run_task(api, "t12")
        self.assertEqual(done["status"], "Succeeded", done)
        self.assertImageOnTarget(TARGET, "t12/app", "v1", SMALL.digest)
        m, text = self.metrics(d)
        self.assertEqual(m.get(ok), 1, text)
        for st in ("Failed", "PartiallyFailed", "Stopped"):
            self.assertEqual(m.get(f'crossdock_tasks_finished_total{{status="{st}"}}'), 0, text)
        self.assertEqual(m.get("crossdock_tasks_started_total"), 1, text)
        self.assertEqual(m.get('crossdock_artifacts_total{action="copied"}'), 1, text)
        self.assertEqual(m.get("crossdock_tasks_running"), 0, text)

        done, _ = self.run_task(api, "t12")
        self.assertEqual(done["status"], "Succeeded", done)
        m, text = self.metrics(d)
        self.assertEqual(m.get(ok), 2, text)
        self.assertEqual(m.get('crossdock_artifacts_total{action="skipped: same digest"}'), 1, text)

        status, _, text = self.http_get(d, "/healthz")
        self.assertEqual(status, 200, text)
        self.assertEqual(json.loads(text).get("status"), "ok", text)
        status, _, _ = self.http_get(d, "/v1/rules")
        self.assertEqual(status, 404, "the TCP port serves the control API")

    def test_second_daemon_refused(self):
        d = self.start_daemon()
        self.expect(d.api.get("/v1/version"), 200)
        for extra in ([], ["--socket", os.path.join(self.tmp, "other.sock")]):
            args = [CROSSDOCK, "serve", "--state", d.state_dir, "--listen", "127.0.0.1:0"] + extra
            try:
                p = subprocess.run(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, env=base_env(), timeout=15)
            except subprocess.TimeoutExpired as e:
                self.fail(f"a second daemon on the same state kept running: {' '.join(args)}\n"
                          f"{(e.stderr or b'').decode(errors='replace')}")
            err = p.stderr.decode("utf-8", "replace")
            self.assertNotEqual(p.returncode, 0, f"{' '.join(args)}\n{err}")
            self.assertIn("in use by another crossdock process", err, err)
            self.assertNotIn("serving", err, err)
        # The first one is unharmed: same socket, still answering.
        self.assertTrue(d.running(), d.describe())
        self.assertTrue(stat.S_ISSOCK(os.stat(d.socket_path).st_mode))
        self.expect(d.api.get("/v1/version"), 200, "first daemon after the refused second")
        self.assertFalse(os.path.exists(os.path.join(self.tmp, "other.sock")))


if __name__ == "__main__":
    unittest.main()
