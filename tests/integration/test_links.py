"""One cap means one cap: a link cap in `crossdock serve` holds for all the tasks on the link.

Two real registries with regions (the source "eu", the target "us") and a cap on the link
between them (``PUT /v1/links/eu/us {"rate_bytes_per_s": RATE}``).  Two rules on that link copy
two namespaces of the source of about the same size (bench/bigcorpus.py: two 40 MiB layers, a
16 MiB and two 4 MiB ones, small layers and configs each; different seeds, so they share no
blob), and their tasks run at the same time.  While they run, ``GET /v1/tasks/{id}`` is sampled
every 0.2 s for each; ``"progress".bytes_read`` (bytes read from the source) against the time
of the sample gives each task's download rate, a least-squares slope over the window in which
both tasks were moving bytes (their first and last second left out: start-up and the last
blobs draining).

1. Two manual triggers: together the tasks read at the cap, not above it (sum of the slopes
   <= RATE * 1.05; also their bytes over the whole time from the first task's start to the last
   one's finish, from the tasks' own timestamps) and not far below it (>= 0.8 RATE: loopback
   is many times faster, so the cap is what limits them); each gets half (within 15% of 50/50).
2. An event-triggered task (a webhook naming the namespace's tags, weight 8) against a manual
   one (weight 2): the event task gets at least twice the manual one's rate while both run,
   and together they still hold the cap.

Each test runs its own daemon (a fresh cache, so every blob crosses the link) and target
registry; the source and its corpus are made once for the module.  What arrived is checked on
the target (check.py: every tag with the source's digest, nothing missing).  Set
CROSSDOCK_LINKS_VERBOSE=1 to print the measured rates.

Every wait is bounded in time and in iterations; all traffic stays on 127.0.0.1.  Python 3
standard library only.
"""

import calendar
import datetime
import http.client
import json
import os
import sys
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
BENCH = os.path.join(HERE, "..", "..", "bench")
sys.path.insert(0, BENCH)

import bigcorpus  # noqa: E402  (bench/: layers streamed to the registry, not held in memory)
import cdenv  # noqa: E402
import check  # noqa: E402
import daemonenv  # noqa: E402
from daemonenv import CROSSDOCK, TERMINAL, MiB  # noqa: E402
from registry import start_filled  # noqa: E402

RATE = 20 * MiB            # the link cap, bytes/s
SAMPLE = 0.2               # seconds between progress samples
EDGE = 1.0                 # seconds left out at each end of the window where both tasks move bytes
MIN_WINDOW = 3.0           # seconds: shorter windows say too little
RUN_TIMEOUT = 45.0         # seconds for both tasks (about 10 s at the cap)
SECRET = "links-wh-s3cret-9Kq"
ENVELOPE_V1 = "application/vnd.docker.distribution.events.v1+json"

VERBOSE = os.environ.get("CROSSDOCK_LINKS_VERBOSE") == "1"

SOURCE = None
CORPORA = {}               # namespace -> bigcorpus description


def note(msg):
    if VERBOSE:
        print(f"\n    [links] {msg}", file=sys.stderr, flush=True)


def spec(namespace, seed):
    # ~105 MiB: 2 x 40 MiB (ranged) + 16 MiB + 2 x 4 MiB layers, small layers and configs.
    return bigcorpus.Spec(repos=2, bases=2, base_size=40 * MiB, runtimes=1,
                          runtime_size=16 * MiB, app_size=4 * MiB, namespace=namespace,
                          seed=seed, tags=("v1",))


def setUpModule():
    global SOURCE
    if not (os.path.isfile(CROSSDOCK) and os.access(CROSSDOCK, os.X_OK)):
        raise RuntimeError(f"crossdock binary not found at {CROSSDOCK} "
                           "(build it, or set CROSSDOCK_BIN)")
    SOURCE, made = start_filled("links-src", lambda client: {
        ns: bigcorpus.generate(client, spec(ns, seed)) for ns, seed in (("la", 101), ("lb", 202))})
    CORPORA.update(made)


def tearDownModule():
    if SOURCE is not None:
        SOURCE.stop()
    cdenv.remove_empty_docker_config()


def parse_time(s):
    """'2026-11-23T12:31:56.806Z' -> epoch seconds."""
    base, _, frac = s.rstrip("Z").partition(".")
    return calendar.timegm(time.strptime(base, "%Y-%m-%dT%H:%M:%S")) + float("0." + (frac or "0"))


def slope(points):
    """Least-squares slope of [(t, y)] (y per second)."""
    n = len(points)
    mt = sum(t for t, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    return sum((t - mt) * (y - my) for t, y in points) / var


def mib(x):
    return f"{x / MiB:.1f} MiB/s"


def manifest_event(host, repo, tag, digest, event_id):
    """One push event as distribution 2.8 sends it for a manifest PUT by tag."""
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat().replace("+00:00", "Z")
    return {"id": event_id, "timestamp": stamp, "action": "push",
            "target": {"mediaType": bigcorpus.OCI_MANIFEST, "size": 0, "digest": digest,
                       "length": 0, "repository": repo,
                       "url": f"http://{host}/v2/{repo}/manifests/{digest}", "tag": tag},
            "request": {"id": "req-1", "addr": "127.0.0.1:1", "host": host, "method": "PUT",
                        "useragent": "crossdock-integration-test"},
            "actor": {}, "source": {"addr": host, "instanceID": "test-instance"}}


class LinkCapTest(daemonenv.DaemonTestCase):
    # -- set-up ------------------------------------------------------------
    def capped_link(self):
        """A daemon, a fresh target registry, the registries with regions, the capped link."""
        d = self.start_daemon()
        tgt = self.start_registry(name="links-tgt")
        self.add_registry(d.api, "eu-src", SOURCE.url, region="eu", webhook_secret=SECRET)
        self.add_registry(d.api, "us-dst", tgt.url, region="us")
        r = d.api.request("PUT", "/v1/links/eu/us", {"rate_bytes_per_s": RATE})
        link = self.expect(r, 201, "PUT the link cap")
        self.assertEqual(link.get("rate_bytes_per_s"), RATE, r.describe())
        return d, tgt

    def wait_started(self, api, ids, timeout=15.0):
        """Waits until every task in ``ids`` is InProgress (or over)."""
        deadline = time.monotonic() + timeout
        last = {}
        for _ in range(int(timeout / 0.05) + 20):
            last = {i: self.get_task(api, i)["status"] for i in ids}
            if all(s != "Queued" for s in last.values()):
                return
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        self.fail(f"tasks not started within {timeout}s: {last}")

    def sample(self, api, ids):
        """Samples every task's progress every SAMPLE s until all are over (bounded).
        Returns ({id: [(t, bytes_read)]}, {id: final task})."""
        series = {i: [] for i in ids}
        final = {}
        deadline = time.monotonic() + RUN_TIMEOUT
        for _ in range(int(RUN_TIMEOUT / SAMPLE) + 50):
            for i in ids:
                if i in final:
                    continue
                t = self.get_task(api, i)
                now = time.monotonic()
                if t["status"] in TERMINAL:
                    final[i] = t
                elif (t.get("progress") or {}).get("bytes_read") is not None:
                    series[i].append((now, t["progress"]["bytes_read"]))
            if len(final) == len(ids) or time.monotonic() >= deadline:
                break
            time.sleep(SAMPLE)
        self.assertEqual(sorted(final), sorted(ids),
                         f"tasks not over within {RUN_TIMEOUT}s: "
                         f"{[self.get_task(api, i) for i in ids if i not in final]}")
        return series, final

    def overlap_rates(self, series):
        """Each task's rate (least-squares slope of bytes_read) over the window in which all
        tasks were moving bytes, EDGE s trimmed at each end; returns ({id: rate}, window s)."""
        starts, ends = [], []
        for i, pts in series.items():
            moving = [t for (t, b) in pts if b > 0]
            self.assertTrue(moving, f"task {i} never read a byte: {pts}")
            top = pts[-1][1]
            starts.append(moving[0])
            ends.append(next(t for t, b in pts if b >= top))   # its last byte read
        lo, hi = max(starts) + EDGE, min(ends) - EDGE
        self.assertGreaterEqual(hi - lo, MIN_WINDOW,
                                f"the tasks moved bytes together for only {hi - lo + 2 * EDGE:.1f}s")
        rates = {}
        for i, pts in series.items():
            win = [(t, b) for t, b in pts if lo <= t <= hi]
            self.assertGreaterEqual(len(win), 8, f"task {i}: too few samples in the window")
            rates[i] = slope(win)
        return rates, hi - lo

    def assertCopied(self, tgt, target_ns, desc, task):
        self.assertEqual((task["status"], task["failed"]), ("Succeeded", 0), task)
        cl = tgt.client()
        for t in desc["tags"]:
            repo = f"{target_ns}/{t['relative']}"
            self.assertEqual(check.manifest_digest(cl, repo, t["tag"]), t["digest"],
                             f"{tgt.host}/{repo}:{t['tag']}")
            self.assertEqual(check.missing_content(cl, repo, t["tag"]), [],
                             f"{tgt.host}/{repo}:{t['tag']}")

    def assertWholeRunWithinCap(self, finals, total_bytes):
        """From the tasks' own records: every byte they read, over the time from the first
        start to the last finish, at most the cap (+5%)."""
        t0 = min(parse_time(t["started"]) for t in finals.values())
        t1 = max(parse_time(t["finished"]) for t in finals.values())
        avg = total_bytes / (t1 - t0)
        note(f"whole run: {total_bytes / MiB:.1f} MiB in {t1 - t0:.2f}s = {mib(avg)} "
             f"(cap {mib(RATE)})")
        self.assertLessEqual(avg, RATE * 1.05,
                             f"{total_bytes} bytes in {t1 - t0:.2f}s: {mib(avg)} over a cap of "
                             f"{mib(RATE)}; tasks: {list(finals.values())}")

    # -- 1 -----------------------------------------------------------------
    def test_two_manual_tasks_share_the_cap(self):
        d, tgt = self.capped_link()
        api = d.api
        self.add_rule(api, "to-us-a", "eu-src", "la", "us-dst", "copy-a")
        self.add_rule(api, "to-us-b", "eu-src", "lb", "us-dst", "copy-b")
        ta = self.trigger(api, "to-us-a")["id"]
        tb = self.trigger(api, "to-us-b")["id"]
        self.wait_started(api, [ta, tb])
        series, finals = self.sample(api, [ta, tb])

        self.assertCopied(tgt, "copy-a", CORPORA["la"], finals[ta])
        self.assertCopied(tgt, "copy-b", CORPORA["lb"], finals[tb])
        rates, window = self.overlap_rates(series)
        total = rates[ta] + rates[tb]
        share = rates[ta] / total
        note(f"two manual tasks over {window:.1f}s: {mib(rates[ta])} + {mib(rates[tb])} = "
             f"{mib(total)} (cap {mib(RATE)}, {total / RATE:.1%}); shares "
             f"{share:.1%} / {1 - share:.1%}")
        what = (f"over {window:.1f}s in which both ran: task {ta} {mib(rates[ta])}, task {tb} "
                f"{mib(rates[tb])}, together {mib(total)}; cap {mib(RATE)}")
        self.assertLessEqual(total, RATE * 1.05, "the two tasks exceed the link's cap: " + what)
        self.assertGreaterEqual(total, RATE * 0.8,
                                "the two tasks stay far below the cap (is it what limits them?): "
                                + what)
        self.assertLess(abs(share - 0.5), 0.5 * 0.15,
                        f"equal triggers, unequal shares ({share:.1%} / {1 - share:.1%}): " + what)
        read = sum(CORPORA[ns]["unique_blob_bytes"] for ns in ("la", "lb"))
        self.assertWholeRunWithinCap(finals, read)

    # -- 2 -----------------------------------------------------------------
    def test_event_task_gets_more_of_the_link(self):
        d, tgt = self.capped_link()
        api = d.api
        # Sync on push; the long schedule keeps the rule from reconciling (a full scan) at once.
        self.add_rule(api, "push-a", "eu-src", "la", "us-dst", "copy-a", sync_on_push=True,
                      schedule="24h")
        self.add_rule(api, "bulk-b", "eu-src", "lb", "us-dst", "copy-b")
        desc = CORPORA["la"]
        events = [manifest_event(SOURCE.host, t["repository"], t["tag"], t["digest"],
                                 f"links-{os.getpid()}-{n}") for n, t in enumerate(desc["tags"])]
        conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=10)
        try:
            conn.request("POST", "/v1/webhooks/eu-src", body=json.dumps({"events": events}),
                         headers={"Content-Type": ENVELOPE_V1,
                                  "Authorization": f"Bearer {SECRET}"})
            resp = conn.getresponse()
            body = resp.read().decode("utf-8", "replace")
        finally:
            conn.close()
        self.assertEqual(resp.status, 200, body)
        tb = self.trigger(api, "bulk-b")["id"]
        # The events are coalesced (quiet for 250 ms, at most 1 s), then one event task.
        deadline = time.monotonic() + 10
        ev = []
        for _ in range(200):
            ev = self.tasks_of(api, "push-a")
            if ev or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        self.assertEqual(len(ev), 1, f"event tasks of push-a: {ev}")
        ta = ev[0]["id"]
        self.assertEqual(ev[0]["trigger"], "event", ev[0])
        self.wait_started(api, [ta, tb])
        series, finals = self.sample(api, [ta, tb])

        self.assertCopied(tgt, "copy-a", desc, finals[ta])
        self.assertCopied(tgt, "copy-b", CORPORA["lb"], finals[tb])
        rates, window = self.overlap_rates(series)
        total = rates[ta] + rates[tb]
        note(f"event vs manual over {window:.1f}s: event {mib(rates[ta])}, manual "
             f"{mib(rates[tb])} (x{rates[ta] / rates[tb]:.1f}), together {mib(total)} "
             f"(cap {mib(RATE)}, {total / RATE:.1%})")
        what = (f"over {window:.1f}s in which both ran: event task {ta} {mib(rates[ta])}, "
                f"manual task {tb} {mib(rates[tb])}; cap {mib(RATE)}")
        self.assertGreaterEqual(rates[ta], 2 * rates[tb],
                                "the event task (weight 8) does not get clearly more of the link "
                                "than the manual one (weight 2): " + what)
        self.assertLessEqual(total, RATE * 1.05, "the two tasks exceed the link's cap: " + what)
        self.assertGreaterEqual(total, RATE * 0.8, "the two tasks stay far below the cap: " + what)
        read = sum(CORPORA[ns]["unique_blob_bytes"] for ns in ("la", "lb"))
        self.assertWholeRunWithinCap(finals, read)


if __name__ == "__main__":
    unittest.main()
