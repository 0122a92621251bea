"""End-to-end tests of the daemon's events: webhooks in, notifications out, replication groups.

`crossdock serve` runs as a subprocess (daemonenv.Daemon) with ``--listen 127.0.0.1:0``; its
TCP port serves ``POST /v1/webhooks/{registry}``.  Events come from real docker-registry
(distribution 2.8) instances configured to send notifications to that port (registry.py's
``notify_url``), or are POSTed by the tests (distribution envelopes, Harbor payloads).  What
the daemon's tasks did is checked on the registries themselves (check.py: manifest digests,
completeness, catalogs), not only by the daemon's word.

What is tested:

1. A real registry notifying the daemon: a push to it reaches the target of a sync-on-push rule
   without any trigger call (a task with trigger "event" and the tag in its "scope"); the event
   is listed as processed with its task; a push outside the rule's namespace triggers nothing.
2. Webhook refusals: no Authorization, a wrong secret (Bearer and bare), a registry without a
   webhook_secret -> 401; an unknown registry -> 404; a body that is not JSON or not an event
   payload -> 400; each refusal logged; nothing stored.  The secret is never echoed.
3. Redelivery (the same event id) is stored once ("new": 0), also after a daemon restart, and
   makes one task; a burst of ten events for one tag (its content changing between them) makes
   exactly one task with the tag once in its scope, and the target ends at the source's latest.
4. A Harbor PUSH_ARTIFACT payload (bare secret in Authorization) makes an event task that
   copies the image.
5. Notifications out: one POST with the documented summary after a manual run; a URL that
   answers 500 twice is delivered on the 3rd attempt, with a growing back-off; a URL that
   refuses connections is given up after 5 attempts; notify_on "failure" / "success" filter.
6. A replication group (a notifying primary, three replicas): a push to the primary reaches
   every replica in one event task (one item per replica), status InSync, `where` present and
   same_as_primary, then present false on a replica where the image was deleted by hand; with
   replicate_deletes a manifest deleted on the primary is deleted on the replicas; a replica
   that is down fails that replica only (status Failing with last_error, the others InSync).
7. A manual trigger of a group copies everything the primary holds to every replica.
8. The CLI: `crossdock replication status` and `where` (skipped when the CLI has no
   `replication` command).

Rules here get ``"schedule": "24h"``: a sync-on-push rule without a schedule also reconciles
(a full scan) as soon as it is created, which would copy what the events are meant to copy.

Every wait is bounded in time and in iterations; all traffic stays on 127.0.0.1; every
process is stopped at the end of its test.  Python 3 standard library only.
"""

import datetime
import http.client
import itertools
import json
import os
import signal
import sqlite3
import re
import subprocess
import sys
import time
import unittest
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import cdenv  # noqa: E402
import check  # noqa: E402
import corpus  # noqa: E402
import daemonenv  # noqa: E402
from cdenv import base_env  # noqa: E402
from daemonenv import CROSSDOCK, KiB, POLL  # noqa: E402
from hookserver import HookServer  # noqa: E402
from registry import free_port  # noqa: E402

ENVELOPE_V1 = "application/vnd.docker.distribution.events.v1+json"
ENVELOPE_V2 = "application/vnd.docker.distribution.events.v2+json"

SECRET = "wh-s3cret-Qz7-hook"      # the webhook secret of the registries that send events
WRONG_SECRET = "wh-wr0ng-Qz7-hook"

SYNC_WAIT = 20.0          # seconds from a push until the target must have the image
QUIET = 1.6               # seconds after which no event is still being coalesced (max hold 1 s)
WEBHOOK_TIMEOUT = 10.0    # socket timeout of one webhook POST
CLI_TIMEOUT = 30.0
LONG_SCHEDULE = "24h"     # keeps a sync-on-push rule from reconciling during a test

DELIVERY_KEYS = {"event", "rule", "task_id", "trigger", "status", "reason", "started", "finished",
                 "duration_ms", "repositories", "artifacts", "bytes", "failures"}

_event_ids = itertools.count(1)


def setUpModule():
    if not (os.path.isfile(CROSSDOCK) and os.access(CROSSDOCK, os.X_OK)):
        raise RuntimeError(f"crossdock binary not found at {CROSSDOCK} "
                           "(build it, or set CROSSDOCK_BIN)")


def tearDownModule():
    cdenv.remove_empty_docker_config()


# --------------------------------------------------------------------------
# Webhooks sent by the tests
# --------------------------------------------------------------------------

class WebhookResponse:
    def __init__(self, path, status, headers, body, sent):
        self.path, self.status, self.headers, self.sent = path, status, headers, sent
        self.text = body.decode("utf-8", "replace")
        try:
            self.json = json.loads(self.text) if self.text.strip() else None
        except ValueError:
            self.json = None

    def describe(self):
        return (f"\nPOST {self.path} {self.sent[:300].decode('utf-8', 'replace')}\n"
                f"-> HTTP {self.status}\n{self.text[:2000]}")


def post_webhook(port, registry, body, authorization=None, content_type=ENVELOPE_V1):
    """POSTs ``body`` (bytes, or an object sent as JSON) to ``registry``'s webhook on ``port``."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {}
    if content_type:
        headers["Content-Type"] = content_type
    if authorization is not None:
        headers["Authorization"] = authorization
    path = f"/v1/webhooks/{registry}"
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WEBHOOK_TIMEOUT)
    try:
        conn.request("POST", path, body=data, headers=headers)
        resp = conn.getresponse()
        return WebhookResponse(path, resp.status, resp.getheaders(), resp.read(), data)
    finally:
        conn.close()


def _now_rfc3339():
    return datetime.datetime.now(datetime.timezone.utc).isoformat().replace("+00:00", "Z")


def manifest_event(host, repo, tag, digest, event_id=None, media_type=corpus.OCI_MANIFEST,
                   size=0):
    """One push event as distribution 2.8 sends it for a manifest PUT by tag to ``host``."""
    return {
        "id": event_id or f"test-{os.getpid()}-{next(_event_ids)}",
        "timestamp": _now_rfc3339(),
        "action": "push",
        "target": {"mediaType": media_type, "size": size, "digest": digest, "length": size,
                   "repository": repo, "url": f"http://{host}/v2/{repo}/manifests/{digest}",
                   "tag": tag},
        "request": {"id": "req-1", "addr": "127.0.0.1:1", "host": host, "method": "PUT",
                    "useragent": "crossdock-integration-test"},
        "actor": {},
        "source": {"addr": host, "instanceID": "test-instance"},
    }


def envelope(*events):
    return {"events": list(events)}


def harbor_push(repo_full_name, tag, digest, occur_at):
    ns, _, name = repo_full_name.rpartition("/")
    return {"type": "PUSH_ARTIFACT", "occur_at": occur_at, "operator": "admin",
            "event_data": {"resources": [{"digest": digest, "tag": tag, "resource_url":
                                          f"harbor.example/{repo_full_name}:{tag}"}],
                           "repository": {"date_created": occur_at, "name": name, "namespace": ns,
                                          "repo_full_name": repo_full_name,
                                          "repo_type": "private"}}}


# --------------------------------------------------------------------------
# Test base
# --------------------------------------------------------------------------

class EventsTestCase(daemonenv.DaemonTestCase):
    def webhook(self, d, registry, body, authorization=f"Bearer {SECRET}",
                content_type=ENVELOPE_V1):
        return post_webhook(d.port, registry, body, authorization, content_type)

    def accepted(self, d, registry, body, n, new, **kw):
        r = self.webhook(d, registry, body, **kw)
        self.assertEqual(r.status, 200, r.describe())
        self.assertEqual(r.json, {"events": n, "new": new}, r.describe())
        return r

    def wait_until(self, fn, what, timeout=SYNC_WAIT, interval=POLL):
        """Polls ``fn`` until it returns something truthy (bounded); returns that."""
        deadline = time.monotonic() + timeout
        last = None
        for _ in range(int(timeout / interval) + 20):
            last = fn()
            if last:
                return last
            if time.monotonic() >= deadline:
                break
            time.sleep(interval)
        self.fail(f"{what}: not within {timeout}s (last seen: {last!r})")

    def events(self, api):
        return self.expect(api.get("/v1/events?limit=1000"), 200)["events"]

    def deliveries(self, api, task_id):
        return self.expect(api.get(f"/v1/tasks/{task_id}/deliveries"), 200)["deliveries"]

    def group_tasks(self, api, group):
        q = urllib.parse.quote(group)
        return self.expect(api.get(f"/v1/tasks?group={q}&limit=1000"), 200)["tasks"]

    def add_source(self, api, name, url, secret=SECRET, **kw):
        if secret is not None:
            kw["webhook_secret"] = secret
        reg = self.add_registry(api, name, url, **kw)
        self.assertIs(reg.get("has_webhook_secret"), secret is not None and secret != "", reg)
        self.assertNotIn("webhook_secret", reg)
        return reg

    def sync_rule(self, api, name, source, source_ns, target, target_ns, **kw):
        kw.setdefault("sync_on_push", True)
        kw.setdefault("schedule", LONG_SCHEDULE)
        rule = self.add_rule(api, name, source, source_ns, target, target_ns, **kw)
        self.assertIs(rule["sync_on_push"], kw["sync_on_push"], rule)
        return rule

    def wait_rule_task(self, api, rule, timeout=SYNC_WAIT):
        """Waits for the first task of ``rule``, then for its end; returns it."""
        tasks = self.wait_until(lambda: self.tasks_of(api, rule), f"a task of rule {rule}",
                                timeout)
        return self.wait_task(api, min(t["id"] for t in tasks))

    def notifying_registry(self, d, daemon_name, name):
        """A registry that sends its notifications to ``d``'s webhook for ``daemon_name``."""
        return self.start_registry(
            name=name, notify_url=f"http://127.0.0.1:{d.port}/v1/webhooks/{daemon_name}",
            notify_headers={"Authorization": f"Bearer {SECRET}"})

    def assertDigest(self, reg, repo, ref, digest, what=""):
        got = check.manifest_digest(reg.client(), repo, ref)
        self.assertEqual(got, digest, f"{reg.host}/{repo}:{ref} {what}")

    def scope_keys(self, task):
        return [(s["repository"], s["tag"]) for s in task["scope"]]


def digest_gone(reg, repo, digest):
    return check.manifest(reg.client(), repo, digest) is None


# --------------------------------------------------------------------------
# 1. A real registry notifying the daemon
# --------------------------------------------------------------------------

class RealNotificationTest(EventsTestCase):
    def test_push_syncs_without_trigger(self):
        d = self.start_daemon()
        api = d.api
        tgt = self.start_registry(name="ev1-tgt")
        src = self.notifying_registry(d, "n-src", "ev1-src")
        self.add_source(api, "n-src", src.url)
        self.add_registry(api, "n-dst", tgt.url)
        self.sync_rule(api, "n1", "n-src", "apps", "n-dst", "mirror")

        # Outside the namespace first: stored, processed, no task, nothing copied.
        other = corpus.push_image(src.client(), "other/thing", "v1", "ev1-other")
        ev = self.wait_until(
            lambda: [e for e in self.events(api)
                     if e["repository"] == "other/thing" and e["processed"]],
            "the registry's event for other/thing:v1, processed")
        self.assertEqual([(e["tag"], e["digest"], e["task_ids"]) for e in ev],
                         [("v1", other.digest, [])], ev)
        self.assertEqual(self.tasks_of(api, "n1"), [], "a push outside the namespace")

        # The push the rule is about: no trigger call, the target gets it.
        t0 = time.monotonic()
        m = corpus.push_image(src.client(), "apps/web", "v1", "ev1-web")
        self.wait_until(lambda: check.manifest_digest(tgt.client(), "mirror/web", "v1"),
                        "mirror/web:v1 on the target after the push")
        took = time.monotonic() - t0
        self.assertImageOnTarget(tgt, "mirror/web", "v1", m.digest)

        tasks = self.tasks_of(api, "n1")
        self.assertEqual(len(tasks), 1, tasks)
        task = self.wait_task(api, tasks[0]["id"])
        self.assertEqual((task["trigger"], task["status"]), ("event", "Succeeded"), task)
        self.assertEqual(self.scope_keys(task), [("apps/web", "v1")], task)
        self.assertEqual(task["scope"][0]["digest"], m.digest, task)
        self.assertIs(task["scope"][0]["remove"], False, task)
        items = self.items(api, task["id"])
        self.assertEqual([(i["repository"], i["tag"], i["action"], i["digest"]) for i in items],
                         [("web", "v1", "copied", m.digest)], items)
        self.assertEqual((task["copied"], task["failed"]), (1, 0), task)

        # The events: manifest pushes only (no blob events), processed, naming the task.
        evs = self.events(api)
        web = [e for e in evs if e["repository"] == "apps/web"]
        self.assertEqual([(e["action"], e["tag"], e["digest"], e["registry"]) for e in web],
                         [("push", "v1", m.digest, "n-src")], evs)
        self.assertIs(web[0]["processed"], True, web)
        self.assertEqual(web[0]["task_ids"], [task["id"]], web)
        self.assertTrue(all(e["digest"] in (m.digest, other.digest) for e in evs), evs)
        self.assertRegex(d.log_text(), r"webhook from registry n-src: 1 manifest event")
        self.assertLess(took, SYNC_WAIT)


# --------------------------------------------------------------------------
# 2-4. Webhooks in: refusals, redelivery, bursts, Harbor
# --------------------------------------------------------------------------

class WebhookInTest(EventsTestCase):
    def test_refusals(self):
        d = self.start_daemon()
        api = d.api
        self.add_source(api, "a-sec", "http://127.0.0.1:9")
        self.add_source(api, "a-none", "http://127.0.0.1:9", secret=None)
        self.sync_rule(api, "a1", "a-sec", "ns", "a-none", "copy")
        fake = "127.0.0.1:9"                    # never contacted: no rule copies anything here
        body = envelope(manifest_event(fake, "ns/app", "v1", "sha256:" + "a" * 64))

        cases = [
            ("no Authorization", "a-sec", body, None, ENVELOPE_V1, 401, r"a-sec refused"),
            ("a wrong Bearer secret", "a-sec", body, f"Bearer {WRONG_SECRET}", ENVELOPE_V1,
             401, r"a-sec refused"),
            ("a wrong bare secret", "a-sec", body, WRONG_SECRET, ENVELOPE_V1, 401,
             r"a-sec refused"),
            ("a prefix of the secret", "a-sec", body, f"Bearer {SECRET[:-1]}", ENVELOPE_V1,
             401, r"a-sec refused"),
            ("Basic instead of Bearer", "a-sec", body, f"Basic {SECRET}", ENVELOPE_V1, 401,
             r"a-sec refused"),
            ("a registry without a webhook_secret", "a-none", body, f"Bearer {SECRET}",
             ENVELOPE_V1, 401, r"a-none refused"),
            ("the same, no Authorization", "a-none", body, None, ENVELOPE_V1, 401,
             r"a-none refused"),
            ("an unknown registry", "no-such-reg", body, f"Bearer {SECRET}", ENVELOPE_V1, 404,
             r"no-such-reg\W* refused"),
            ("a body that is not JSON", "a-sec", b"{this is not json", f"Bearer {SECRET}",
             ENVELOPE_V1, 400, r"a-sec refused"),
            ("JSON that is no event payload", "a-sec", {"hello": "world"}, f"Bearer {SECRET}",
             "application/json", 400, r"a-sec refused"),
            ("an envelope without an events array", "a-sec", {"events": "none"},
             f"Bearer {SECRET}", ENVELOPE_V1, 400, r"a-sec refused"),
        ]
        for what, reg, b, auth, ct, status, log_re in cases:
            with self.subTest(what):
                before = d.log_text()
                r = post_webhook(d.port, reg, b, auth, ct)
                self.assertEqual(r.status, status, f"{what}: {r.describe()}")
                self.assertIsInstance(r.json, dict, r.describe())
                self.assertTrue(r.json.get("message"), r.describe())
                self.assertNotIn(SECRET, r.text + "".join(v for _, v in r.headers))
                new_log = self.wait_until(lambda: d.log_text()[len(before):],
                                          f"a log line for {what}", timeout=5)
                self.assertRegex(new_log, log_re, f"the daemon's log for {what}")
        # Nothing was stored and nothing runs.
        self.assertEqual(self.events(api), [], "refused webhooks stored events")
        time.sleep(QUIET)
        self.assertEqual(self.tasks_of(api, "a1"), [])
        # A webhook on the TCP port only: GET is not a webhook; the control API is not there.
        conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=WEBHOOK_TIMEOUT)
        try:
            conn.request("GET", "/v1/webhooks/a-sec")
            self.assertEqual(conn.getresponse().status, 405)
        finally:
            conn.close()

        # The positive controls: the right secret, as Bearer and bare, is accepted and stored.
        self.accepted(d, "a-sec", body, 1, 1)
        other = envelope(manifest_event(fake, "elsewhere/app", "v2", "sha256:" + "b" * 64))
        self.accepted(d, "a-sec", other, 1, 1, authorization=SECRET, content_type=ENVELOPE_V2)
        self.assertEqual(sorted((e["repository"], e["tag"]) for e in self.events(api)),
                         [("elsewhere/app", "v2"), ("ns/app", "v1")])
        # The secret is write-only: never in an answer of the control API, nor in the log.
        self.expect(api.get("/v1/registries/a-sec"), 200)
        self.expect(api.get("/v1/registries"), 200)
        for r in api.transcript:
            self.assertNoLeak(r.text + r.raw_headers(), f"{r.method} {r.path}", [SECRET])
        self.assertNoLeak(d.log_text(), "the daemon's log", [SECRET, WRONG_SECRET])
        # Removing the secret refuses the registry's webhooks again.
        self.expect(api.patch("/v1/registries/a-sec", {"webhook_secret": ""}), 200)
        r = post_webhook(d.port, "a-sec", body, f"Bearer {SECRET}")
        self.assertEqual(r.status, 401, r.describe())

    def test_redelivery_stored_once(self):
        d = self.start_daemon()
        api = d.api
        src = self.start_registry(name="ev3-src")
        tgt = self.start_registry(name="ev3-tgt")
        self.add_source(api, "d-src", src.url)
        self.add_registry(api, "d-dst", tgt.url)
        self.sync_rule(api, "d1", "d-src", "dd", "d-dst", "dd-copy")
        m = corpus.push_image(src.client(), "dd/app", "v1", "ev3-app")
        body = envelope(manifest_event(src.host, "dd/app", "v1", m.digest, event_id="dup-1"))

        self.accepted(d, "d-src", body, 1, 1)
        self.accepted(d, "d-src", body, 1, 0)         # redelivered at once
        task = self.wait_rule_task(api, "d1")
        self.assertEqual((task["trigger"], task["status"]), ("event", "Succeeded"), task)
        self.assertImageOnTarget(tgt, "dd-copy/app", "v1", m.digest)
        self.accepted(d, "d-src", body, 1, 0)         # redelivered after it was processed
        time.sleep(QUIET)
        self.assertEqual([t["id"] for t in self.tasks_of(api, "d1")], [task["id"]])
        evs = self.events(api)
        self.assertEqual([(e["event_id"], e["processed"], e["task_ids"]) for e in evs],
                         [("dup-1", True, [task["id"]])], evs)

        # Durable: a restarted daemon still knows the event.
        self.assertEqual(d.stop(), 0, d.describe())
        d2 = self.start_daemon()
        api = d2.api
        self.accepted(d2, "d-src", body, 1, 0)
        time.sleep(QUIET)
        self.assertEqual([t["id"] for t in self.tasks_of(api, "d1")], [task["id"]])
        self.assertEqual(len(self.events(api)), 1)

    def test_burst_coalesced(self):
        d = self.start_daemon()
        api = d.api
        src = self.start_registry(name="ev3b-src")
        tgt = self.start_registry(name="ev3b-tgt")
        self.add_source(api, "b-src", src.url)
        self.add_registry(api, "b-dst", tgt.url)
        self.sync_rule(api, "b1", "b-src", "burst", "b-dst", "burst-copy")
        cl = src.client()
        b = corpus.Builder(seed=777, min_size=4 * KiB, max_size=16 * KiB)
        images = [b.image(f"burst-{i}", ["burst-base", f"burst-{i}"]) for i in range(10)]
        self.assertEqual(len({m.digest for m in images}), 10)
        for m in images:                      # the blobs first: the burst is manifests only
            for blob in m.blobs:
                cl.push_blob("burst/app", blob.data, blob.digest)

        t0 = time.monotonic()
        for i, m in enumerate(images):        # the tag moves ten times, an event each time
            cl.put_manifest("burst/app", "v1", m.body, m.media_type)
            self.accepted(d, "b-src", envelope(manifest_event(src.host, "burst/app", "v1", m.digest,
                                                              event_id=f"burst-{i}")), 1, 1)
        span = time.monotonic() - t0
        self.assertLess(span, 0.9, "the burst took too long to be one burst (max hold 1 s)")
        latest = images[-1].digest
        self.assertDigest(src, "burst/app", "v1", latest, "(the source's current content)")

        task = self.wait_rule_task(api, "b1")
        time.sleep(QUIET)
        tasks = self.tasks_of(api, "b1")
        self.assertEqual([t["id"] for t in tasks], [task["id"]], "one task for the burst")
        self.assertEqual((task["trigger"], task["status"]), ("event", "Succeeded"), task)
        self.assertEqual(self.scope_keys(task), [("burst/app", "v1")], task)
        self.assertEqual(task["scope"][0]["digest"], latest, task)
        items = self.items(api, task["id"])
        self.assertEqual([(i["tag"], i["action"], i["digest"]) for i in items],
                         [("v1", "copied", latest)], items)
        self.assertImageOnTarget(tgt, "burst-copy/app", "v1", latest)
        evs = self.events(api)
        self.assertEqual(len(evs), 10, evs)
        for e in evs:
            self.assertEqual((e["processed"], e["task_ids"]), (True, [task["id"]]), e)

    def test_harbor_payload(self):
        d = self.start_daemon()
        api = d.api
        src = self.start_registry(name="ev4-src")
        tgt = self.start_registry(name="ev4-tgt")
        self.add_source(api, "h-src", src.url)
        self.add_registry(api, "h-dst", tgt.url)
        self.sync_rule(api, "h1", "h-src", "proj", "h-dst", "from-harbor")
        m = corpus.push_image(src.client(), "proj/api", "2.0", "ev4-api")
        occur = int(time.time())
        payload = harbor_push("proj/api", "2.0", m.digest, occur)

        # Harbor sends its auth_header as is, with Content-Type application/json.
        self.accepted(d, "h-src", payload, 1, 1, authorization=SECRET,
                      content_type="application/json")
        task = self.wait_rule_task(api, "h1")
        self.assertEqual((task["trigger"], task["status"]), ("event", "Succeeded"), task)
        self.assertEqual(self.scope_keys(task), [("proj/api", "2.0")], task)
        self.assertImageOnTarget(tgt, "from-harbor/api", "2.0", m.digest)
        items = self.items(api, task["id"])
        self.assertEqual([(i["repository"], i["tag"], i["action"]) for i in items],
                         [("api", "2.0", "copied")], items)
        # The same payload again (Harbor retries): nothing new; other Harbor events: ignored.
        self.accepted(d, "h-src", payload, 1, 0, authorization=SECRET,
                      content_type="application/json")
        scan = {"type": "SCANNING_COMPLETED", "occur_at": occur, "event_data": {}}
        self.accepted(d, "h-src", scan, 0, 0, authorization=SECRET,
                      content_type="application/json")
        time.sleep(QUIET)
        self.assertEqual(len(self.tasks_of(api, "h1")), 1)
        evs = self.events(api)
        self.assertEqual([(e["repository"], e["tag"], e["digest"], e["processed"]) for e in evs],
                         [("proj/api", "2.0", m.digest, True)], evs)


# --------------------------------------------------------------------------
# 5. Notifications out
# --------------------------------------------------------------------------

class NotifyOutTest(EventsTestCase):
    def setUp(self):
        super().setUp()
        self.hooks = HookServer({"/flaky": [500, 500, 200]}).start()
        self.addCleanup(self.hooks.stop)

    def setup_rule(self, api, src, tgt, name, ns_image, **kw):
        self.add_registry(api, f"{name}-src", src.url)
        self.add_registry(api, f"{name}-dst", tgt.url)
        return self.add_rule(api, name, f"{name}-src", ns_image, f"{name}-dst", f"{name}-copy",
                             **kw)

    def wait_delivery(self, api, task_id, url, statuses, timeout):
        def done():
            ds = [x for x in self.deliveries(api, task_id) if x["url"] == url]
            return ds if ds and ds[0]["status"] in statuses else None
        return self.wait_until(done, f"delivery to {url} {'/'.join(statuses)}", timeout)[0]

    def test_success_posts_summary(self):
        d = self.start_daemon()
        api = d.api
        src = self.start_registry(name="ev5-src")
        tgt = self.start_registry(name="ev5-tgt")
        m = corpus.push_image(src.client(), "nt/app", "v1", "ev5-app")
        url = self.hooks.url("/ok")
        rule = self.setup_rule(api, src, tgt, "nt1", "nt", notify_urls=[url])
        self.assertEqual((rule["notify_urls"], rule["notify_on"]), ([url], "always"), rule)

        task, _ = self.run_task(api, "nt1")
        self.assertEqual(task["status"], "Succeeded", task)
        self.assertImageOnTarget(tgt, "nt1-copy/app", "v1", m.digest)
        got = self.hooks.wait_posts("/ok", 1, timeout=10)
        time.sleep(1.0)                       # nothing more comes
        got = self.hooks.posts("/ok")
        self.assertEqual(len(got), 1, got)
        h = got[0]
        self.assertEqual(h.method, "POST")
        self.assertTrue(h.headers.get("content-type", "").startswith("application/json"),
                        h.headers)
        body = h.json()
        self.assertEqual(set(body), DELIVERY_KEYS, body)
        self.assertEqual((body["event"], body["rule"], body["task_id"], body["trigger"],
                          body["status"], body["reason"]),
                         ("task.finished", "nt1", task["id"], "manual", "Succeeded", ""), body)
        self.assertEqual(body["artifacts"], {"copied": 1, "skipped": 0, "failed": 0}, body)
        self.assertEqual((body["repositories"], body["bytes"], body["failures"]),
                         (1, task["bytes"], []), body)
        self.assertGreater(body["bytes"], 0, body)
        self.assertEqual((body["started"], body["finished"], body["duration_ms"]),
                         (task["started"], task["finished"], task["duration_ms"]), body)

        dl = self.wait_delivery(api, task["id"], url, ("delivered",), 10)
        self.assertEqual((dl["status"], dl["attempts"], dl["last_status"], dl["last_error"]),
                         ("delivered", 1, 200, ""), dl)
        self.assertEqual(len(self.deliveries(api, task["id"])), 1)

    def test_retries_and_gives_up(self):
        d = self.start_daemon()
        api = d.api
        src = self.start_registry(name="ev5r-src")
        tgt = self.start_registry(name="ev5r-tgt")
        corpus.push_image(src.client(), "nr/app", "v1", "ev5r-app")
        flaky = self.hooks.url("/flaky")
        refused = f"http://127.0.0.1:{free_port()}/hook"     # nothing listens there
        self.setup_rule(api, src, tgt, "nr1", "nr", notify_urls=[flaky, refused])

        task, _ = self.run_task(api, "nr1")
        self.assertEqual(task["status"], "Succeeded", task)
        # 500, 500, 200: delivered on the 3rd attempt, 1 s then 2 s apart.
        got = self.hooks.wait_posts("/flaky", 3, timeout=15)
        self.assertEqual([h.status for h in got], [500, 500, 200], got)
        gaps = [b.t - a.t for a, b in zip(got, got[1:])]
        self.assertGreater(gaps[0], 0.8, f"the first retry came too early: {gaps}")
        self.assertGreater(gaps[1], 1.6, f"the back-off did not grow: {gaps}")
        self.assertGreater(gaps[1], gaps[0] * 1.5, f"the back-off did not double: {gaps}")
        self.assertEqual(len({h.body for h in got}), 1, "the attempts sent different bodies")
        self.assertEqual(got[0].json()["task_id"], task["id"])
        dl = self.wait_delivery(api, task["id"], flaky, ("delivered",), 10)
        self.assertEqual((dl["attempts"], dl["last_status"], dl["last_error"]),
                         (3, 200, ""), dl)
        time.sleep(0.5)
        self.assertEqual(len(self.hooks.posts("/flaky")), 3, "delivered, yet sent again")

        # Connection refused every time: failed after 5 attempts (1+2+4+8 s of back-off).
        dl = self.wait_delivery(api, task["id"], refused, ("failed",), 30)
        self.assertEqual((dl["status"], dl["attempts"], dl["last_status"]),
                         ("failed", 5, 0), dl)
        self.assertTrue(dl["last_error"], dl)
        self.assertIsNotNone(dl["finished"], dl)
        self.assertRegex(d.log_text(),
                         r"notification to \S*127\.0\.0\.1\S* failed after 5 attempts")
        self.assertEqual(len(self.deliveries(api, task["id"])), 2)

    def test_notify_on_filters(self):
        d = self.start_daemon()
        api = d.api
        src = self.start_registry(name="ev5f-src")
        tgt = self.start_registry(name="ev5f-tgt")
        corpus.push_image(src.client(), "nf/app", "v1", "ev5f-app")
        dead = f"http://127.0.0.1:{free_port()}"                 # a source that is down
        # "failure": nothing for a success, a POST for a failure.
        self.setup_rule(api, src, tgt, "nf-ok", "nf", notify_urls=[self.hooks.url("/f-ok")],
                        notify_on="failure")
        self.add_registry(api, "nf-dead", dead)
        self.add_rule(api, "nf-bad", "nf-dead", "nf", "nf-ok-dst", "nf-bad",
                      notify_urls=[self.hooks.url("/f-bad")], notify_on="failure")
        # "success": nothing for a failure.
        self.add_rule(api, "ns-bad", "nf-dead", "nf", "nf-ok-dst", "ns-bad",
                      notify_urls=[self.hooks.url("/s-bad")], notify_on="success")

        ok, _ = self.run_task(api, "nf-ok")
        bad, _ = self.run_task(api, "nf-bad")
        sbad, _ = self.run_task(api, "ns-bad")
        self.assertEqual(ok["status"], "Succeeded", ok)
        self.assertEqual(bad["status"], "Failed", bad)
        self.assertEqual(sbad["status"], "Failed", sbad)
        got = self.hooks.wait_posts("/f-bad", 1, timeout=10)
        self.assertEqual(len(got), 1, got)
        body = got[0].json()
        self.assertEqual((body["rule"], body["task_id"], body["status"]),
                         ("nf-bad", bad["id"], "Failed"), body)
        self.assertEqual(body["reason"], bad["reason"], body)
        self.assertTrue(body["reason"], body)
        time.sleep(1.5)
        self.assertEqual(self.hooks.posts("/f-ok"), [], "notify_on failure, yet a success POSTed")
        self.assertEqual(self.hooks.posts("/s-bad"), [], "notify_on success, yet a failure POSTed")
        self.assertEqual(self.deliveries(api, ok["id"]), [])
        self.assertEqual(self.deliveries(api, sbad["id"]), [])


# --------------------------------------------------------------------------
# 6-8. Replication groups
# --------------------------------------------------------------------------

class ReplicationGroupTest(EventsTestCase):
    REPLICAS = 3

    def setup_group(self, d, prefix, notify=True, **kw):
        """A primary (notifying ``d`` when ``notify``) and REPLICAS replicas, registered, and a
        group over them; returns (primary, [replica Registry], [replica names])."""
        api = d.api
        pname = f"{prefix}-p"
        primary = (self.notifying_registry(d, pname, f"{prefix}-p") if notify
                   else self.start_registry(name=f"{prefix}-p"))
        replicas = [self.start_registry(name=f"{prefix}-r{i}") for i in range(1, self.REPLICAS + 1)]
        names = [f"{prefix}-r{i}" for i in range(1, self.REPLICAS + 1)]
        self.add_source(api, pname, primary.url)
        for n, reg in zip(names, replicas):
            self.add_registry(api, n, reg.url)
        body = {"name": prefix, "primary": pname, "replicas": names,
                "replicate_deletes": kw.get("replicate_deletes", False),
                "schedule": kw.get("schedule", "1h")}
        r = api.post("/v1/replications", body)
        g = self.expect(r, 201, "create the replication group")
        self.assertEqual(r.header("Location"), f"/v1/replications/{g['id']}", r.describe())
        self.assertEqual((g["name"], g["primary"], g["replicas"], g["replicate_deletes"]),
                         (prefix, pname, names, body["replicate_deletes"]), g)
        return primary, replicas, names

    def status(self, api, group):
        return self.expect(api.get(f"/v1/replications/{group}/status"), 200, "group status")

    def states(self, api, group):
        st = self.status(api, group)
        return {r["registry"]: r["state"] for r in st["replicas"]}, st

    def where(self, api, group, image):
        q = urllib.parse.quote(image)
        return self.expect(api.get(f"/v1/replications/{group}/where?image={q}"), 200,
                           f"where {image}")

    def wait_group_task(self, api, group, after_id=0, timeout=SYNC_WAIT):
        """The first group task with an id above ``after_id``, once it has ended."""
        tasks = self.wait_until(
            lambda: [t for t in self.group_tasks(api, group) if t["id"] > after_id],
            f"a task of replication group {group}", timeout)
        return self.wait_task(api, min(t["id"] for t in tasks))

    def replicate(self, api, group, primary, names, replicas, repo, tag, label, after_id=0):
        """Pushes ``repo:tag`` to the primary and waits for its event task; checks it."""
        m = corpus.push_image(primary.client(), repo, tag, label)
        task = self.wait_group_task(api, group, after_id)
        self.assertEqual((task["trigger"], task["status"], task["group_name"]),
                         ("event", "Succeeded", group), task)
        self.assertEqual(self.scope_keys(task), [(repo, tag)], task)
        items = self.items(api, task["id"])
        self.assertEqual(sorted((i["target"], i["repository"], i["tag"], i["action"], i["digest"])
                                for i in items),
                         sorted((n, repo, tag, "copied", m.digest) for n in names), items)
        for reg in replicas:
            self.assertImageOnTarget(reg, repo, tag, m.digest)
        return m, task

    def test_push_replicates_to_all_and_where(self):
        d = self.start_daemon()
        api = d.api
        primary, replicas, names = self.setup_group(d, "g6")
        states, st = self.states(api, "g6")
        self.assertEqual(states, {n: "Unknown" for n in names}, st)
        self.assertEqual(st["tasks"], [], st)

        m, task = self.replicate(api, "g6", primary, names, replicas, "team/app", "v1", "g6-app")
        self.assertEqual(len(self.group_tasks(api, "g6")), 1)
        time.sleep(QUIET)
        states, st = self.states(api, "g6")
        self.assertEqual(states, {n: "InSync" for n in names}, st)
        self.assertEqual([t["id"] for t in st["tasks"]], [task["id"]], st)
        for r in st["replicas"]:
            self.assertNotIn("last_error", r, st)
            self.assertEqual(r.get("last_task", {}).get("id"), task["id"], st)
        evs = [e for e in self.events(api) if e["repository"] == "team/app"]
        self.assertEqual([(e["tag"], e["processed"], e["task_ids"]) for e in evs],
                         [("v1", True, [task["id"]])], evs)

        w = self.where(api, "g6", "team/app:v1")
        self.assertEqual(w["primary"]["digest"], m.digest, w)
        self.assertEqual([(r["registry"], r["digest"], r["present"], r["same_as_primary"])
                          for r in w["replicas"]],
                         [(n, m.digest, True, True) for n in names], w)

        # Deleted by hand on one replica: `where` says so for that one only.
        replicas[1].client().delete_manifest("team/app", m.digest)
        self.assertIsNone(check.manifest(replicas[1].client(), "team/app", "v1"))
        w = self.where(api, "g6", "team/app:v1")
        self.assertEqual([(r["registry"], r["present"], r["same_as_primary"])
                          for r in w["replicas"]],
                         [(names[0], True, True), (names[1], False, False),
                          (names[2], True, True)], w)
        self.assertIsNone(w["replicas"][1]["digest"], w)
        # By digest too; an unknown image is nowhere; an unknown group is 404.
        w = self.where(api, "g6", f"team/app@{m.digest}")
        self.assertEqual([r["present"] for r in w["replicas"]], [True, False, True], w)
        w = self.where(api, "g6", "team/nothing:v9")
        self.assertIsNone(w["primary"]["digest"], w)
        self.assertEqual([r["present"] for r in w["replicas"]], [False] * 3, w)
        self.expect(api.get("/v1/replications/nope/where?image=team/app:v1"), 404)

    def test_replicate_deletes(self):
        d = self.start_daemon()
        api = d.api
        primary, replicas, names = self.setup_group(d, "g6d", replicate_deletes=True)
        m1, t1 = self.replicate(api, "g6d", primary, names, replicas, "del/app", "v1", "g6d-1")
        m2, t2 = self.replicate(api, "g6d", primary, names, replicas, "del/app", "v2", "g6d-2",
                                after_id=t1["id"])

        # distribution 2.8 sends a delete event for a manifest DELETE by digest.
        primary.client().delete_manifest("del/app", m1.digest)
        task = self.wait_group_task(api, "g6d", after_id=t2["id"])
        self.assertEqual(task["trigger"], "event", task)
        self.assertEqual([(s["repository"], s["digest"], s["remove"]) for s in task["scope"]],
                         [("del/app", m1.digest, True)], task)
        # The replicas themselves: v1's manifest gone, v2 untouched.
        for n, reg in zip(names, replicas):
            self.assertTrue(digest_gone(reg, "del/app", m1.digest),
                            f"{n}: del/app@{m1.digest} still there after the delete")
            self.assertEqual(check.tags(reg.client(), "del/app"), ["v2"], n)
            self.assertImageOnTarget(reg, "del/app", "v2", m2.digest)
        # What the daemon says about it (each part reported on its own).
        items = self.items(api, task["id"])
        with self.subTest("one item per replica: deleted, none failed"):
            self.assertEqual([i for i in items if i["action"] == "failed"], [],
                             "a replicated delete logged as failed")
            self.assertEqual(sorted((i["target"], i["repository"], i["action"], i["digest"])
                                    for i in items),
                             [(n, "del/app", "deleted", m1.digest) for n in sorted(names)], items)
        with self.subTest("the task succeeded"):
            self.assertEqual(task["status"], "Succeeded", task)
        with self.subTest("the replicas are InSync"):
            time.sleep(QUIET)
            states, st = self.states(api, "g6d")
            self.assertEqual(states, {n: "InSync" for n in names}, st)

    def test_replica_down_fails_for_it_only(self):
        d = self.start_daemon()
        api = d.api
        primary, replicas, names = self.setup_group(d, "g6x")
        _, t1 = self.replicate(api, "g6x", primary, names, replicas, "down/app", "v1", "g6x-1")
        replicas[2].stop()

        m2 = corpus.push_image(primary.client(), "down/app", "v2", "g6x-2")
        task = self.wait_group_task(api, "g6x", after_id=t1["id"], timeout=90)
        self.assertEqual(task["trigger"], "event", task)
        items = self.items(api, task["id"])
        by_target = {i["target"]: i for i in items}
        # Each part reported on its own: the replicas that are up, the items, the task, the status.
        with self.subTest("the replicas that are up got v2"):
            for n, reg in zip(names[:2], replicas[:2]):
                self.assertEqual(check.manifest_digest(reg.client(), "down/app", "v2"),
                                 m2.digest, f"{n}: down/app:v2 (task: {task})")
                self.assertEqual(check.missing_content(reg.client(), "down/app", "v2"), [], n)
        with self.subTest("items: copied to the replicas up, failed for the one down"):
            self.assertEqual(sorted(by_target), sorted(names), items)
            for n in names[:2]:
                self.assertEqual((by_target[n]["action"], by_target[n]["digest"]),
                                 ("copied", m2.digest), items)
            self.assertEqual(by_target[names[2]]["action"], "failed", items)
            self.assertTrue(by_target[names[2]]["reason"], items)
        with self.subTest("the task partially failed"):
            self.assertEqual(task["status"], "PartiallyFailed", task)
        with self.subTest("status: Failing for the replica down only"):
            states, st = self.states(api, "g6x")
            self.assertEqual(states, {names[0]: "InSync", names[1]: "InSync",
                                      names[2]: "Failing"}, st)
            bad = [r for r in st["replicas"] if r["registry"] == names[2]][0]
            self.assertTrue(bad.get("last_error"), st)
            for r in st["replicas"]:
                if r["registry"] != names[2]:
                    self.assertNotIn("last_error", r, st)

    def test_manual_trigger_reconciles(self):
        d = self.start_daemon()
        api = d.api
        primary, replicas, names = self.setup_group(d, "g7", notify=False)
        c = corpus.push_corpus(primary.client(), "all", max_size=64 * KiB, base_size=32 * KiB)
        self.assertEqual(self.group_tasks(api, "g7"), [], "a task before any trigger")

        r = api.post("/v1/replications/g7/trigger")
        queued = self.expect(r, 202, "trigger the group")
        self.assertEqual(r.header("Location"), f"/v1/tasks/{queued['id']}", r.describe())
        self.assertEqual((queued["trigger"], queued["scope"], queued["group_name"]),
                         ("manual", [], "g7"), queued)
        task = self.wait_task(api, queued["id"])
        self.assertEqual(task["status"], "Succeeded", task)

        want = sorted((e.repository, e.tag) for e in c.entries)
        self.assertEqual(sorted(check.catalog(primary.client())),
                         sorted({e.repository for e in c.entries}))
        for n, reg in zip(names, replicas):
            cl = reg.client()
            self.assertEqual(sorted(check.catalog(cl)), sorted({e.repository for e in c.entries}),
                             n)
            for e in c.entries:
                self.assertEqual(check.manifest_digest(cl, e.repository, e.tag), e.digest,
                                 f"{n}: {e.repository}:{e.tag}")
                self.assertEqual(check.missing_content(cl, e.repository, e.tag), [], n)
        items = self.items(api, task["id"])
        for n in names:
            got = sorted((i["repository"], i["tag"]) for i in items if i["target"] == n)
            self.assertEqual(got, want, f"items for {n}")
        self.assertEqual(task["copied"], len(want) * len(names), task)
        states, st = self.states(api, "g7")
        self.assertEqual(states, {n: "InSync" for n in names}, st)

        # A disabled group cannot be triggered.
        self.expect(api.post("/v1/replications/g7/disable"), 200)
        self.expect(api.post("/v1/replications/g7/trigger"), 409, "trigger a disabled group")

    def test_group_task_survives_a_restart(self):
        """A group task left Queued or InProgress by a daemon killed with SIGKILL is continued by
        the next daemon (not failed as if its owner were gone: group tasks have no rule)."""
        state = self.state_dir()
        d1 = self.start_daemon(state_dir=state)
        api = d1.api
        primary, replicas, names = self.setup_group(d1, "g9", notify=False)
        c = corpus.push_corpus(primary.client(), "all", max_size=64 * KiB, base_size=32 * KiB)
        queued = self.expect(api.post("/v1/replications/g9/trigger"), 202, "trigger the group")
        d1.send(signal.SIGKILL)             # at once: the task is Queued or just started
        self.assertEqual(d1.wait(10), -signal.SIGKILL, d1.describe())
        d1.kill()
        # What the dead daemon left, read from its database (the state file is SQLite).
        with sqlite3.connect(f"file:{os.path.join(state, 'state.db')}?mode=ro", uri=True) as db:
            (left,) = db.execute("SELECT status FROM tasks WHERE id = ?", (queued["id"],)).fetchone()
        if left not in ("Queued", "InProgress"):
            self.skipTest(f"the task ended ({left}) before the kill: nothing was left to continue")
        d2 = self.start_daemon(state_dir=state)
        api = d2.api
        task = self.wait_task(api, queued["id"])
        self.assertEqual(task["status"], "Succeeded", task)
        for n, reg in zip(names, replicas):
            for e in c.entries:
                self.assertEqual(check.manifest_digest(reg.client(), e.repository, e.tag), e.digest,
                                 f"{n}: {e.repository}:{e.tag}")

    def test_status_lagging_while_a_task_runs(self):
        """While a group task is under way the replicas are Lagging (a full scan pending, bytes
        behind counted from the running task), and InSync once it has finished."""
        from pipeproxy import PipeProxy
        from test_daemon import push_big_image
        d = self.start_daemon()
        api = d.api
        primary = self.start_registry(name="g10-p")
        replicas = [self.start_registry(name=f"g10-r{i}") for i in (1, 2)]
        big = push_big_image(primary.client(), "big/app", "v1", 24 * 1024 * KiB)
        with PipeProxy(primary, rate=4 * 1024 * KiB) as px:   # ~6 s for the layer
            self.add_registry(api, "g10-p", px.url)
            for i, reg in enumerate(replicas, 1):
                self.add_registry(api, f"g10-r{i}", reg.url)
            self.expect(api.post("/v1/replications", {"name": "g10", "primary": "g10-p",
                                                      "replicas": ["g10-r1", "g10-r2"], "schedule": ""}), 201)
            queued = self.expect(api.post("/v1/replications/g10/trigger"), 202, "trigger")
            seen = None
            deadline = time.monotonic() + SYNC_WAIT
            for _ in range(int(SYNC_WAIT / 0.1) + 10):
                states, st = self.states(api, "g10")
                reps = {r["registry"]: r for r in st["replicas"]}
                if all(r["state"] == "Lagging" and r.get("full_scan_pending") and r.get("bytes_behind", 0) > 0
                       for r in reps.values()):
                    seen = st
                    break
                if self.get_task(api, queued["id"])["status"] not in ("Queued", "InProgress"):
                    break
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.1)
            self.assertIsNotNone(seen, "the replicas were never reported Lagging with bytes behind "
                                       "while the task ran")
            self.assertIn(queued["id"], [t["id"] for t in seen["tasks"]], seen)
            task = self.wait_task(api, queued["id"])
            self.assertEqual(task["status"], "Succeeded", task)
        states, st = self.states(api, "g10")
        self.assertEqual(states, {"g10-r1": "InSync", "g10-r2": "InSync"}, st)
        for reg in replicas:
            self.assertImageOnTarget(reg, "big/app", "v1", big.digest)

    def test_cli_status_and_where(self):
        r = subprocess.run([CROSSDOCK, "--help"], stdin=subprocess.DEVNULL, capture_output=True,
                           text=True, timeout=CLI_TIMEOUT, env=base_env())
        if not re.search(r"^\s+replication\s", r.stdout, re.M):
            self.skipTest("this crossdock has no `replication` command")
        d = self.start_daemon()
        api = d.api
        primary, replicas, names = self.setup_group(d, "g8")
        m, _ = self.replicate(api, "g8", primary, names, replicas, "cli/app", "v1", "g8-app")
        env = base_env(CROSSDOCK_SOCKET=d.socket_path)

        def cli(*args):
            p = subprocess.run([CROSSDOCK, "replication", *args], stdin=subprocess.DEVNULL,
                               capture_output=True, text=True, timeout=CLI_TIMEOUT, env=env)
            return p.returncode, p.stdout, p.stderr

        rc, out, err = cli("status", "g8")
        self.assertEqual(rc, 0, out + err)
        for n in names:
            self.assertIn(n, out, out)
        self.assertIn("InSync", out, out)
        rc, out, err = cli("where", "g8", "cli/app:v1")
        self.assertEqual(rc, 0, "every replica in sync: exit 0\n" + out + err)
        for n in names:
            self.assertIn(n, out, out)
        self.assertIn(m.digest[:len("sha256:") + 12], out, out)
        rc, out, err = cli("where", "g8", "cli/app:v1", "--json")
        self.assertEqual(rc, 0, out + err)
        w = json.loads(out)
        self.assertEqual([(r["registry"], r["same_as_primary"]) for r in w["replicas"]],
                         [(n, True) for n in names], out)
        # One replica without the image: exit 1, and still every replica listed.
        replicas[0].client().delete_manifest("cli/app", m.digest)
        rc, out, err = cli("where", "g8", "cli/app:v1")
        self.assertEqual(rc, 1, "a replica without the image: exit 1\n" + out + err)
        for n in names:
            self.assertIn(n, out, out)
        rc, out, err = cli("status", "no-such-group")
        self.assertNotEqual(rc, 0, out + err)


if __name__ == "__main__":
    unittest.main()
