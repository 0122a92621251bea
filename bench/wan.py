#!/usr/bin/env python3
"""WAN benchmark: crossdock mirror vs skopeo sync through the WAN emulator (loopback).

The source registry sits behind `wanem` (tests/tools/README.md): 20 ms one-way
delay, 100 Mbit/s per connection, 1 Gbit/s over all connections; the target
registry is local.  Both tools pull across the emulated WAN.

    python3 bench/wan.py [--quick] [--reps 2]

Scenarios (issue 4, item 5), each run into a fresh, empty target registry
through a fresh wanem instance (so its counters and CPU are per run):

  bench-link  once, first: `crossdock bench-link WANSRC/ns DST/ns --insecure
              --json F` (its GET side crosses the emulator, its PUT side is
              the local target); its "recommended" block gives the settings
              of the `crossdock recommended` rows.
  a           ~1 GiB of shared-layer images (bench/bigcorpus.py shape with
              8 MiB app layers): `crossdock mirror` with default settings,
              with `--streams auto`, and with bench-link's settings;
  b           `skopeo sync` of the whole namespace (as bench/e2e.py runs it);
  c           `crossdock mirror --bandwidth 200Mbit`: the link rate held;
  d           many small images (100 repositories, one tag, 2 layers of a
              few KiB): crossdock vs skopeo, against the round trips a
              one-image-at-a-time copier would pay in series.

Every tool alternates within each repetition, so slow drifts of the (shared,
noisy) machine hit all of them; ratios are taken within a repetition.

`--variant 'NAME|ARGS'` adds crossdock rows with other flags to scenario a.

Per run: wall time; bytes through the emulator (wanem's --stats-file
counters) and blob bytes read from the source (its access log); Mbit/s =
bytes through the emulator / wall; the link rate while the link carried 2%
to 98% of those bytes (wanem's counters, sampled every 0.1 s through
SIGUSR1: "link" = bytes wanem read from the source, i.e. what crossed the
rate-capped link; "client side" = bytes it wrote to the tool), and its 1 s
bins; the blob-GET phase seen by the source registry; peak RSS and CPU of the tool
(/usr/bin/time); CPU share of wanem and of both registries (/proc/PID/stat)
and of the whole machine (/proc/stat).  After every run the target is
checked independently (tests/integration/check.py through e2e.verify): every
source tag with the same digest, every referenced blob present.  A run that
fails that (or exits non-zero) is FAILED and posts no number.

Markdown tables go to stdout; everything to bench/results/wan-<timestamp>.json.
"""

import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import http.client

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
sys.dont_write_bytecode = True

import e2e  # noqa: E402  (also puts tests/integration on sys.path)
import bigcorpus  # noqa: E402
import check  # noqa: E402
import registry  # noqa: E402
from corpus import Builder, push_manifest_tree  # noqa: E402
import wanemproc  # noqa: E402

MiB = e2e.MiB
SRC_NS = e2e.SRC_NS          # bench-src
DST_NS = e2e.DST_NS          # bench-dst
SMALL_SRC_NS = "small-src"
SMALL_DST_NS = "small-dst"
CLK_TCK = os.sysconf("SC_CLK_TCK")

# ~1 GiB of unique blob bytes: bigcorpus.FULL's shape (32 repositories, 4 x 64 MiB base layers
# shared by 8 repositories each, 8 x 32 MiB runtime layers shared by 4 each) with 8 MiB app layers
# instead of 16: 256 + 256 + 512 MiB + small layers and configs.
WAN = bigcorpus.Spec(repos=32, bases=4, base_size=64 * MiB, runtimes=8, runtime_size=32 * MiB,
                     app_size=8 * MiB)


def log(msg):
    print(f"[wan {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# CPU accounting (/proc)
# --------------------------------------------------------------------------

def proc_cpu_s(pid):
    """utime + stime of a live process, seconds (None if gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return None


def machine_cpu():
    """(busy, total) jiffies over all CPUs from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    total = sum(v[:8])
    return total - idle, total


class CpuWatch:
    """CPU share of named long-lived processes and of the machine between start() and stop()."""

    def __init__(self, pids):
        self.pids = {k: p for k, p in pids.items() if p}

    def start(self):
        self.t0 = time.monotonic()
        self.c0 = {k: proc_cpu_s(p) for k, p in self.pids.items()}
        self.m0 = machine_cpu()

    def stop(self):
        dt = time.monotonic() - self.t0
        out = {}
        for k, p in self.pids.items():
            c1 = proc_cpu_s(p)
            if c1 is not None and self.c0.get(k) is not None:
                out[k + "_cpu_s"] = round(c1 - self.c0[k], 2)
                out[k + "_cpu_pct"] = round(100 * (c1 - self.c0[k]) / dt, 1)   # % of one core
        busy, total = machine_cpu()
        db, dtot = busy - self.m0[0], total - self.m0[1]
        out["machine_busy_pct"] = round(100 * db / dtot, 1) if dtot else None  # % of all cores
        return out


# --------------------------------------------------------------------------
# wanem
# --------------------------------------------------------------------------

class Wanem:
    """One build/tests/tools/wanem process in front of `upstream` (host:port)."""

    def __init__(self, binary, upstream, a, workdir, name):
        self.binary, self.upstream, self.a = binary, upstream, a
        self.stats_path = os.path.join(workdir, f"wanem-{name}.json")
        self.err_path = os.path.join(workdir, f"wanem-{name}.err")
        self.proc = None
        self.samples = []           # (uptime_s, upstream_to_client bytes_out, bytes_in)
        self._stop = threading.Event()
        self._thread = None

    def start(self):
        cmd = [self.binary, "--listen", "127.0.0.1:0", "--upstream", self.upstream,
               "--delay-ms", str(self.a.delay_ms), "--conn-rate", self.a.conn_rate,
               "--total-rate", self.a.total_rate, "--stats-file", self.stats_path]
        self.command = shlex.join(cmd)
        with open(self.err_path, "ab") as err:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=err)
        self.host = wanemproc.listening_address(self.proc)
        if self.host is None:
            self.stop()
            raise RuntimeError(f"wanem did not start; stderr: {open(self.err_path).read()[-500:]}")
        return self

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def read_stats(self):
        try:
            with open(self.stats_path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def _sampler(self, period):
        while not self._stop.wait(period):
            try:
                os.kill(self.proc.pid, signal.SIGUSR1)   # wanem rewrites the stats file (atomically)
            except OSError:
                return
            time.sleep(0.01)
            s = self.read_stats()
            if s:
                u2c = s["upstream_to_client"]
                self.samples.append((s["uptime_ms"] / 1000.0, u2c["bytes_out"], u2c["bytes_in"]))

    def start_sampling(self, period=0.1):
        self.samples = []
        self._stop.clear()
        self._thread = threading.Thread(target=self._sampler, args=(period,), daemon=True)
        self._thread.start()

    def stop_sampling(self):
        if self._thread:
            self._stop.set()
            self._thread.join(timeout=5)
            self._thread = None

    def stop(self):
        """SIGTERM (wanem writes its stats and exits 0); returns the final stats."""
        self.stop_sampling()
        p, self.proc = self.proc, None
        if p is None:
            return None
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        p.stdout.close()
        return self.read_stats()


def window_rate(samples, final_bytes, lo=0.02, hi=0.98):
    """Bytes/s while a counter, given as [(t, bytes)], went from lo to hi of final_bytes
    (linear interpolation); and the length of that window."""
    pts = [(0.0, 0)] + [s for s in samples if s[1] <= final_bytes]
    if final_bytes <= 0 or len(pts) < 3:
        return None, None

    def t_at(level):
        for (t0, b0), (t1, b1) in zip(pts, pts[1:]):
            if b0 < level <= b1:
                return t0 + (t1 - t0) * (level - b0) / (b1 - b0)
        return None
    ta, tb = t_at(lo * final_bytes), t_at(hi * final_bytes)
    if ta is None or tb is None or tb <= ta:
        return None, None
    return (hi - lo) * final_bytes / (tb - ta), tb - ta


def second_rates(samples, final_bytes, lo=0.02, hi=0.98):
    """Rates (bytes/s) of the whole 1-second bins of [(t, bytes)] inside the lo..hi window."""
    if len(samples) < 3 or final_bytes <= 0:
        return []
    first = next((t for t, b in samples if b >= lo * final_bytes), None)
    last = next((t for t, b in samples if b >= hi * final_bytes), None)
    if first is None or last is None:
        return []

    def at(t):       # counter at time t (linear between samples)
        prev = (0.0, 0)
        for s in samples:
            if s[0] >= t:
                return prev[1] + (s[1] - prev[1]) * (t - prev[0]) / max(s[0] - prev[0], 1e-9)
            prev = s
        return prev[1]
    out, t = [], first
    while t + 1.0 <= last:
        out.append(at(t + 1.0) - at(t))
        t += 1.0
    return out


def pctl(values, q):
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, max(0, int(round(q * (len(v) - 1)))))]


# --------------------------------------------------------------------------
# Source registry log: the blob-GET phase as the registry saw it
# --------------------------------------------------------------------------

_DONE = re.compile(r'time="(?P<t>[^"]+)".*msg="response completed".*'
                   r'http\.request\.method=(?P<m>[A-Z]+) .*http\.request\.uri="?(?P<u>[^" ]+)"?'
                   r'.*http\.response\.duration="?(?P<d>[0-9.]+)(?P<unit>ms|µs|s)"?'
                   r'.*http\.response\.status=(?P<s>\d+)')


def blob_get_phase(reg, offset):
    """(first blob GET start, last blob GET end) in seconds apart, from the source's
    'response completed' lines after byte `offset` of its log; None if no blob GET."""
    with open(reg.log_path, "rb") as f:
        f.seek(offset)
        text = f.read().decode("utf-8", "replace")
    lo, hi = None, None
    for line in text.splitlines():
        m = _DONE.search(line)
        if not m or m.group("m") != "GET" or "/blobs/sha256:" not in m.group("u") \
                or m.group("s") not in ("200", "206"):
            continue
        end = datetime.datetime.fromisoformat(m.group("t")[:26].rstrip("Z")).timestamp()
        dur = float(m.group("d")) * {"ms": 1e-3, "µs": 1e-6, "s": 1.0}[m.group("unit")]
        lo = end - dur if lo is None else min(lo, end - dur)
        hi = end if hi is None else max(hi, end)
    return None if lo is None else hi - lo


def measure_rtt(host, n=7):
    """Median of n GET /v2/ round trips on one kept-alive connection (ms)."""
    h, _, p = host.rpartition(":")
    conn = http.client.HTTPConnection(h, int(p), timeout=10)
    out = []
    try:
        for _ in range(n):
            t0 = time.monotonic()
            conn.request("GET", "/v2/")
            conn.getresponse().read()
            out.append((time.monotonic() - t0) * 1000)
    finally:
        conn.close()
    return round(statistics.median(out[1:] if len(out) > 1 else out), 2)   # first one opens the connection


# --------------------------------------------------------------------------
# Small-image corpus (scenario d)
# --------------------------------------------------------------------------

def push_small_corpus(client, n, seed=20241123):
    """n repositories small-src/img-NNN, tag v1, 2 layers of 2-8 KiB each (OCI).
    Returns a description in bigcorpus' shape (tags, unique_blob_bytes) for e2e.verify."""
    t0 = time.monotonic()
    b = Builder(seed, 2 * 1024, 8 * 1024)
    tags, blobs = [], {}
    for i in range(n):
        repo = f"{SMALL_SRC_NS}/img-{i:03d}"
        m = b.image(f"img-{i:03d}", [f"img-{i:03d}-l0", f"img-{i:03d}-l1"])
        push_manifest_tree(client, repo, m, "v1")
        tags.append({"repository": repo, "relative": f"img-{i:03d}", "tag": "v1", "digest": m.digest})
        for bl in m.blobs:
            blobs[bl.digest] = len(bl.data)
    return {"tags": tags, "unique_blob_bytes": sum(blobs.values()), "unique_blobs": len(blobs),
            "images": n, "generate_seconds": round(time.monotonic() - t0, 2)}


# --------------------------------------------------------------------------
# The bench
# --------------------------------------------------------------------------

class WanBench:
    def __init__(self, a, workdir):
        self.a, self.workdir = a, workdir
        self.runs = []
        self.run_log = os.path.join(workdir, "runs.log")
        self.n_wanem = 0

    def wanem(self, src):
        self.n_wanem += 1
        return Wanem(self.a.wanem, src.host, self.a, self.workdir, str(self.n_wanem)).start()

    def run(self, scenario, tool, rep, src, desc, src_ns, dst_ns, cmd_fn, repo_map):
        """One tool run: fresh target and wanem, CPU watch, timed command, verification."""
        target = registry.Registry(name="wan-dst")
        wan = None
        res = {"scenario": scenario, "tool": tool, "rep": rep}
        try:
            target.start()
            wan = self.wanem(src)
            os.sync()
            time.sleep(0.5)
            off = e2e.log_size(src)
            res["loadavg_1m"] = round(os.getloadavg()[0], 2)
            cmd = cmd_fn(f"{wan.host}/{src_ns}", f"{target.host}/{dst_ns}", wan.host)
            log(f"{scenario} rep {rep}: {tool}")
            watch = CpuWatch({"wanem": wan.pid, "src_registry": src.proc.pid,
                              "dst_registry": target.proc.pid})
            watch.start()
            wan.start_sampling()
            rc, wall, rss, cpu, out = e2e.timed(cmd, self.a.run_timeout, self.run_log)
            wan.stop_sampling()
            res.update(watch.stop())
            samples = wan.samples
            stats = wan.stop()
            res.update(wall_s=round(wall, 3), rc=rc, rss_mib=round(rss / 1024, 1), cpu_s=round(cpu, 2),
                       command=shlex.join(cmd), wanem_command=wan.command)
            res["ok"] = rc == 0
            if tool.startswith("crossdock"):
                try:
                    s = json.loads(out)
                    res["tool_summary"] = {k: s.get(k) for k in (
                        "copied", "skipped", "failed", "bytes_copied", "bytes_read_source",
                        "blobs_uploaded", "blobs_mounted", "blobs_existing", "duration_s", "errors")}
                except ValueError:
                    res["ok"] = False
                    res["error"] = "no JSON summary on stdout"
            res["source"] = e2e.access_log_since(src, off)
            res["source_blob_get_phase_s"] = blob_get_phase(src, off)
            res["wanem"] = stats
            down = stats["upstream_to_client"]["bytes_out"] if stats else None
            res["wan_bytes_down"] = down
            res["wan_bytes_up"] = stats["client_to_upstream"]["bytes_out"] if stats else None
            res["wan_conns"] = stats["connections_accepted"] if stats else None
            res["wan_conns_peak"] = stats["connections_peak"] if stats else None
            # the client side (bytes wanem wrote to the tool) and the link side (bytes wanem read
            # from the source registry: what crossed the emulated, rate-capped link)
            down_in = stats["upstream_to_client"]["bytes_in"] if stats else None
            rate, span = window_rate([(t, o) for t, o, _ in samples], down or 0)
            res["client_mbit_2_98"] = round(rate * 8 / 1e6, 1) if rate else None
            rate, span = window_rate([(t, i) for t, _, i in samples], down_in or 0)
            res["link_mbit_2_98"] = round(rate * 8 / 1e6, 1) if rate else None
            res["link_window_s"] = round(span, 2) if span else None
            sec = [x * 8 / 1e6 for x in second_rates([(t, i) for t, _, i in samples], down_in or 0)]
            res["link_1s_mbit"] = {"p10": pctl(sec, 0.1), "p50": pctl(sec, 0.5), "p90": pctl(sec, 0.9),
                                   "seconds": len(sec),
                                   "below_half_of_mean": sum(1 for x in sec if x < 0.5 * statistics.mean(sec))
                                   if sec else None}
            res["timeline"] = [(round(t, 2), o, i) for t, o, i in samples]
            # verification, independent of the tool (registry API, local target)
            if res["ok"]:
                probs = e2e.verify(target, desc, repo_map)
                res["verified"] = not probs
                res["problems"] = probs[:20]
            else:
                res["verified"] = False
        except subprocess.TimeoutExpired as e:
            res.update(ok=False, verified=False, error=f"timeout after {e.timeout}s",
                       wall_s=None)
        finally:
            if wan:
                wan.stop()
            target.stop()
        w, down = res.get("wall_s"), res.get("wan_bytes_down")
        good = res.get("verified") and w
        res["mbit_s"] = round(down * 8 / 1e6 / w, 1) if good and down else None
        res["pct_of_cap"] = round(100 * res["mbit_s"] / self.a.cap_mbit, 1) if res["mbit_s"] else None
        uniq = desc["unique_blob_bytes"]
        res["unique_mbit_s"] = round(uniq * 8 / 1e6 / w, 1) if good else None
        sb = (res.get("source") or {}).get("blob_get_bytes", 0)
        log(f"   {'ok' if res.get('verified') else 'FAILED'}: {w or 0:.2f}s, "
            f"{res['mbit_s'] or 0:.0f} Mbit/s through wanem ({res['pct_of_cap'] or 0:.0f}% of cap), "
            f"link 2-98% {res.get('link_mbit_2_98')} Mbit/s (client side {res.get('client_mbit_2_98')}), source blobs {sb / MiB:.1f} MiB, "
            f"rss {res.get('rss_mib')} MiB, cpu {res.get('cpu_s')} s, wanem {res.get('wanem_cpu_pct')}%, "
            f"machine {res.get('machine_busy_pct')}%"
            + ("" if res.get("verified") else f" problems: {res.get('problems') or res.get('error')}"))
        self.runs.append(res)
        return res

    # -- command builders --
    def crossdock(self, extra=()):
        def fn(src, dst, _wan_host):
            return [self.a.crossdock, "mirror", src, dst, "--insecure", "--json"] + list(extra)
        return fn

    def skopeo(self, repos):
        def fn(_src, dst, wan_host):
            yml = os.path.join(self.workdir, f"sync-{len(self.runs)}.yml")
            with open(yml, "w") as f:
                f.write(f"{wan_host}:\n  tls-verify: false\n  images:\n")
                for r in repos:
                    f.write(f"    {r}: []\n")
            return ["skopeo", "sync", "--src", "yaml", "--dest", "docker", "--dest-tls-verify=false",
                    "--preserve-digests", yml, dst]
        return fn

    def bench_link(self, src):
        """crossdock bench-link through a wanem, into a fresh local target; returns its JSON."""
        target = registry.Registry(name="wan-bl-dst")
        wan = None
        try:
            target.start()
            wan = self.wanem(src)
            jpath = os.path.join(self.workdir, "bench-link.json")
            cmd = [self.a.crossdock, "bench-link", f"{wan.host}/{SRC_NS}", f"{target.host}/{DST_NS}",
                   "--insecure", "--json", jpath] + shlex.split(self.a.bench_link_args)
            log("bench-link: " + shlex.join(cmd))
            t0 = time.monotonic()
            p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               timeout=self.a.run_timeout, env=check._skopeo_env())
            wall = time.monotonic() - t0
            text = p.stdout.decode("utf-8", "replace")
            print(text, file=sys.stderr)
            if p.returncode != 0:
                raise RuntimeError(f"bench-link exited {p.returncode}: {p.stderr.decode()[-2000:]}")
            with open(jpath) as f:
                report = json.load(f)
            report["_wall_s"] = round(wall, 2)
            report["_text"] = text
            report["_command"] = shlex.join(cmd)
            return report
        finally:
            if wan:
                wan.stop()
            target.stop()


def recommended_args(rec, default_jobs=16):
    """mirror flags from bench-link's "recommended" block: --streams, --chunk-size, and --jobs
    at least the parallel uploads it found necessary (put_streams; it prints that as the --jobs
    hint, not as a flag).  Its --bandwidth (90% of the measured capacity) is a cap for sharing the
    link, not a speed setting, so it is left out here and run verbatim as its own row."""
    args = ["--streams", str(rec["streams"])]
    if rec.get("chunk_size_mib"):
        args += ["--chunk-size", str(rec["chunk_size_mib"])]
    args += ["--jobs", str(max(default_jobs, int(rec.get("put_streams") or 0)))]
    return args


# --------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------

def _f(x, fmt="{:.1f}"):
    return "-" if x is None else fmt.format(x)


def same_rep_ratio(runs, r, baseline="skopeo"):
    if not r.get("verified") or r["tool"] == baseline:
        return None
    b = [x for x in runs if x["scenario"] == r["scenario"] and x["tool"] == baseline
         and x["rep"] == r["rep"] and x.get("verified")]
    return b[0]["wall_s"] / r["wall_s"] if b else None


def tables(runs, desc, small, rtt_ms, a):
    uniq = desc["unique_blob_bytes"] if desc else 1
    big = [r for r in runs if r["scenario"] != "d: small images"]
    smalls = [r for r in runs if r["scenario"] == "d: small images"]
    out = []
    if big:
        out.append("| scenario | tool | rep | wall s | through wanem MiB | Mbit/s (wanem bytes / wall) "
                   "| % of 1 Gbit cap | link Mbit/s (2-98%) | x skopeo (same rep) | source blob MiB (x unique) "
                   "| conns (peak) | peak RSS MiB | tool CPU s | wanem CPU % | src reg CPU % | dst reg CPU % "
                   "| machine busy % | load 1m | verified |")
        out.append("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for r in big:
            sb = (r.get("source") or {}).get("blob_get_bytes", 0)
            out.append(
                f"| {r['scenario']} | {r['tool']} | {r['rep']} | {_f(r.get('wall_s'), '{:.2f}')} | "
                f"{_f((r.get('wan_bytes_down') or 0) / MiB, '{:.0f}')} | {_f(r.get('mbit_s'))} | "
                f"{_f(r.get('pct_of_cap'), '{:.0f}')} | {_f(r.get('link_mbit_2_98'))} | "
                f"{_f(same_rep_ratio(runs, r), '{:.2f}')} | {sb / MiB:.0f} ({sb / uniq:.2f}) | "
                f"{r.get('wan_conns', '-')} ({r.get('wan_conns_peak', '-')}) | {_f(r.get('rss_mib'))} | "
                f"{_f(r.get('cpu_s'))} | {_f(r.get('wanem_cpu_pct'), '{:.0f}')} | {_f(r.get('src_registry_cpu_pct'), '{:.0f}')} | "
                f"{_f(r.get('dst_registry_cpu_pct'), '{:.0f}')} | {_f(r.get('machine_busy_pct'), '{:.0f}')} | "
                f"{_f(r.get('loadavg_1m'))} | {'yes' if r.get('verified') else 'FAILED'} |")
        # summary: medians per tool
        out.append("")
        out.append("| scenario | tool | median wall s | median Mbit/s | median % of cap | median link Mbit/s (2-98%) "
                   "| median x skopeo | max peak RSS MiB | median tool CPU s | runs ok |")
        out.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
        seen = []
        for r in big:
            if (r["scenario"], r["tool"]) not in seen:
                seen.append((r["scenario"], r["tool"]))
        for sc, tool in seen:
            rs = [r for r in big if r["scenario"] == sc and r["tool"] == tool]
            ok = [r for r in rs if r.get("verified")]

            def med(k, rows=ok):
                v = [x[k] for x in rows if x.get(k) is not None]
                return statistics.median(v) if v else None
            rat = [x for x in (same_rep_ratio(runs, r) for r in ok) if x]
            rss = [r["rss_mib"] for r in ok if r.get("rss_mib") is not None]
            out.append(f"| {sc} | {tool} | {_f(med('wall_s'), '{:.2f}')} | {_f(med('mbit_s'))} | "
                       f"{_f(med('pct_of_cap'), '{:.0f}')} | {_f(med('link_mbit_2_98'))} | "
                       f"{_f(statistics.median(rat) if rat else None, '{:.2f}')} | "
                       f"{_f(max(rss) if rss else None)} | {_f(med('cpu_s'))} | {len(ok)}/{len(rs)} |")
    bw = [r for r in runs if r["scenario"] == "c: --bandwidth 200Mbit"]
    if bw:
        out.append("")
        cap = parse_rate_mbit(a.bandwidth)
        dev = lambda x: _f(100 * (x - cap) / cap if x else None, '{:+.1f}%')   # noqa: E731
        out.append(f"| --bandwidth {a.bandwidth} | rep | wall s | link Mbit/s (2-98%) | deviation "
                   "| client side Mbit/s (2-98%) | deviation | source blob bytes / blob-GET phase (Mbit/s) "
                   "| deviation | unique bytes / wall (Mbit/s) | link 1 s bins p10 / p50 / p90 Mbit/s | verified |")
        out.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
        for r in bw:
            sb = (r.get("source") or {}).get("blob_get_bytes", 0)
            ph = r.get("source_blob_get_phase_s")
            pr = sb * 8 / 1e6 / ph if ph else None
            lk, cl = r.get("link_mbit_2_98"), r.get("client_mbit_2_98")
            b1 = r.get("link_1s_mbit") or {}
            out.append(f"| crossdock | {r['rep']} | {_f(r.get('wall_s'), '{:.2f}')} | {_f(lk)} | {dev(lk)} | "
                       f"{_f(cl)} | {dev(cl)} | {_f(pr)} | {dev(pr)} | {_f(r.get('unique_mbit_s'))} | "
                       f"{_f(b1.get('p10'), '{:.0f}')} / {_f(b1.get('p50'), '{:.0f}')} / "
                       f"{_f(b1.get('p90'), '{:.0f}')} | {'yes' if r.get('verified') else 'FAILED'} |")
    if smalls:
        n = small["images"]
        serial3 = n * 3 * rtt_ms / 1000
        out.append("")
        out.append(f"Small images: {n} images ({small['unique_blobs']} blobs, "
                   f"{small['unique_blob_bytes'] / 1024:.0f} KiB), measured RTT through wanem {rtt_ms} ms. "
                   f"A copier that takes one image at a time pays at least 3 round trips per image in series "
                   f"(tag list, manifest, blobs in parallel): {n} x 3 x {rtt_ms} ms = {serial3:.1f} s.")
        out.append("")
        out.append("| tool | rep | wall s | x skopeo (same rep) | source requests | requests x RTT s (all in series) "
                   "| overlap (requests x RTT / wall) | wall / (images x RTT) | conns | peak RSS MiB | tool CPU s | verified |")
        out.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for r in smalls:
            nreq = (r.get("source") or {}).get("requests", 0)
            w = r.get("wall_s")
            ser = nreq * rtt_ms / 1000
            out.append(f"| {r['tool']} | {r['rep']} | {_f(w, '{:.2f}')} | {_f(same_rep_ratio(runs, r), '{:.2f}')} | "
                       f"{nreq} | {ser:.1f} | {_f(ser / w if w else None, '{:.1f}')} | "
                       f"{_f(w * 1000 / (n * rtt_ms) if w else None, '{:.2f}')} | {r.get('wan_conns', '-')} | "
                       f"{_f(r.get('rss_mib'))} | {_f(r.get('cpu_s'))} | {'yes' if r.get('verified') else 'FAILED'} |")
    return "\n".join(out)


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------

def parse_rate_mbit(text):
    m = re.fullmatch(r"([0-9.]+)\s*(k|M|G)bit", text.strip(), re.I)
    if not m:
        raise ValueError(text)
    return float(m.group(1)) * {"k": 1e-3, "m": 1, "g": 1e3}[m.group(2).lower()]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="~105 MiB corpus, 20 small images (development)")
    ap.add_argument("--reps", type=int, default=2, help="repetitions (tools alternate within each)")
    ap.add_argument("--scenarios", default="a,b,c,d", help="subset of a,b,c,d")
    ap.add_argument("--crossdock", default=os.path.join(ROOT, "build", "tools", "crossdock"))
    ap.add_argument("--wanem", default=os.path.join(ROOT, "build", "tests", "tools", "wanem"))
    ap.add_argument("--delay-ms", type=float, default=20, help="one-way delay (default 20)")
    ap.add_argument("--conn-rate", default="100Mbit")
    ap.add_argument("--total-rate", default="1Gbit")
    ap.add_argument("--bandwidth", default="200Mbit", help="scenario c's --bandwidth")
    ap.add_argument("--small-images", type=int, default=None, help="scenario d (default 100; quick 20)")
    ap.add_argument("--bench-link-args", default="",
                    help="extra arguments for crossdock bench-link (default: its defaults)")
    ap.add_argument("--recommended", default=None,
                    help="skip bench-link and use these mirror flags for the recommended row")
    ap.add_argument("--no-verbatim", action="store_true",
                    help="leave out the row running bench-link's recommendation verbatim (with its --bandwidth)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME|ARGS",
                    help="an extra crossdock row in scenario a, e.g. 'jobs16|--jobs 16' (repeatable)")
    ap.add_argument("--run-timeout", type=float, default=900, help="seconds per tool run")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--note", default="")
    a = ap.parse_args(argv)
    if not 1 <= a.reps <= 10:
        ap.error("--reps must be 1..10")
    a.cap_mbit = parse_rate_mbit(a.total_rate)
    for tool in (e2e.TIME_BIN, "skopeo", registry.REGISTRY_BIN, a.crossdock, a.wanem):
        if not shutil.which(tool):
            ap.error(f"{tool} not found (ninja -C build; Debian packages time, skopeo, docker-registry)")
    scenarios = {s.strip() for s in a.scenarios.split(",") if s.strip()}
    n_small = a.small_images or (20 if a.quick else 100)
    spec = bigcorpus.QUICK if a.quick else WAN

    started = datetime.datetime.now()
    workdir = tempfile.mkdtemp(prefix="crossdock-wan-")
    # Others rebuild build/ while this runs: every run uses copies taken now.
    src_bins = {"crossdock": os.path.abspath(a.crossdock), "wanem": os.path.abspath(a.wanem)}
    a.crossdock = shutil.copy2(a.crossdock, os.path.join(workdir, "crossdock"))
    a.wanem = shutil.copy2(a.wanem, os.path.join(workdir, "wanem"))
    vers = e2e.versions(a.crossdock)
    vers["crossdock_bin"] = src_bins["crossdock"]
    vers["wanem_bin"] = src_bins["wanem"]
    import hashlib
    vers["wanem_bin_sha256"] = hashlib.sha256(open(a.wanem, "rb").read()).hexdigest()

    src = registry.Registry(name="wan-src")
    small_src = registry.Registry(name="wan-small-src")
    b = WanBench(a, workdir)
    desc = small = bl = None
    rtt_ms = None
    rc = 0
    try:
        src.start()
        log(f"generating the corpus into {src.host}/{SRC_NS} ...")
        desc = bigcorpus.generate(src.client(), spec, log=None)
        uniq = desc["unique_blob_bytes"]
        repos = sorted({t["repository"] for t in desc["tags"]})
        log(f"corpus: {len(desc['tags'])} tags, {len(desc['blobs'])} unique blobs, {uniq / MiB:.1f} MiB "
            f"({uniq * 8 / 1e6 / a.cap_mbit:.1f} s at the {a.total_rate} cap); generated in "
            f"{desc['generate_seconds']} s")
        if "d" in scenarios:
            small_src.start()
            small = push_small_corpus(small_src.client(), n_small)
            log(f"small corpus: {small['images']} images, {small['unique_blobs']} blobs, "
                f"{small['unique_blob_bytes'] / 1024:.0f} KiB")
            w = b.wanem(small_src)
            try:
                rtt_ms = measure_rtt(w.host)
            finally:
                w.stop()
            log(f"RTT through wanem: {rtt_ms} ms")

        rec_args = None
        if "a" in scenarios:
            if a.recommended is not None:
                rec_args = shlex.split(a.recommended)
            else:
                bl = b.bench_link(src)
                rec = bl["recommended"]
                if not rec.get("valid"):
                    raise RuntimeError("bench-link gave no valid recommendation")
                rec_args = recommended_args(rec)
                log(f"bench-link ({bl['_wall_s']} s) recommends: {rec['command']}; applied: "
                    f"{shlex.join(rec_args)}")

        xd_map = lambda r: DST_NS + r[len(SRC_NS):]                      # noqa: E731
        sk_map = lambda r: DST_NS + "/" + r.rsplit("/", 1)[-1]           # noqa: E731
        xs_map = lambda r: SMALL_DST_NS + r[len(SMALL_SRC_NS):]          # noqa: E731
        ss_map = lambda r: SMALL_DST_NS + "/" + r.rsplit("/", 1)[-1]     # noqa: E731
        small_repos = sorted({t["repository"] for t in small["tags"]}) if small else []
        for rep in range(1, a.reps + 1):
            if "a" in scenarios:
                A = "a: ~1 GiB shared layers" if not a.quick else "a: quick corpus"
                b.run(A, "crossdock", rep, src, desc, SRC_NS, DST_NS, b.crossdock(), xd_map)
                b.run(A, "crossdock --streams auto", rep, src, desc, SRC_NS, DST_NS,
                      b.crossdock(["--streams", "auto"]), xd_map)
                b.run(A, "crossdock recommended", rep, src, desc, SRC_NS, DST_NS,
                      b.crossdock(rec_args), xd_map)
                if bl and not a.no_verbatim:
                    verb = shlex.split(bl["recommended"]["command"])
                    i = verb.index("--insecure") + 1 if "--insecure" in verb else 4
                    b.run(A, "crossdock recommended verbatim", rep, src, desc, SRC_NS, DST_NS,
                          b.crossdock(verb[i:]), xd_map)
                for v in a.variant:
                    name, _, vargs = v.partition("|")
                    b.run(A, f"crossdock {name}", rep, src, desc, SRC_NS, DST_NS,
                          b.crossdock(shlex.split(vargs)), xd_map)
                if "b" in scenarios:
                    b.run(A, "skopeo", rep, src, desc, SRC_NS, DST_NS, b.skopeo(repos), sk_map)
            elif "b" in scenarios:
                b.run("b: skopeo", "skopeo", rep, src, desc, SRC_NS, DST_NS, b.skopeo(repos), sk_map)
            if "c" in scenarios:
                b.run("c: --bandwidth 200Mbit", f"crossdock --bandwidth {a.bandwidth}", rep, src, desc,
                      SRC_NS, DST_NS, b.crossdock(["--bandwidth", a.bandwidth]), xd_map)
            if "d" in scenarios:
                D = "d: small images"
                b.run(D, "crossdock", rep, small_src, small, SMALL_SRC_NS, SMALL_DST_NS,
                      b.crossdock(), xs_map)
                b.run(D, "skopeo", rep, small_src, small, SMALL_SRC_NS, SMALL_DST_NS,
                      b.skopeo(small_repos), ss_map)
    finally:
        src.stop()
        small_src.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    head = (f"link: wanem --delay-ms {a.delay_ms:g} --conn-rate {a.conn_rate} --total-rate {a.total_rate} "
            f"in front of the source; target local. corpus: {len(desc['tags'])} tags in "
            f"{desc['spec']['repos']} repositories, {len(desc['blobs'])} unique blobs, "
            f"{desc['unique_blob_bytes'] / MiB:.1f} MiB; reps {a.reps}; {os.cpu_count()} CPUs")
    if bl:
        head += f"\nbench-link recommended: {bl['recommended']['command']}\napplied (row 'crossdock recommended'): " \
                f"{shlex.join(rec_args)}"
    text = tables(b.runs, desc, small, rtt_ms, a)
    print(head + "\n\n" + text)
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, f"wan-{started.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump({"started": started.isoformat(timespec="seconds"),
                   "finished": datetime.datetime.now().isoformat(timespec="seconds"),
                   "argv": sys.argv, "quick": a.quick, "reps": a.reps, "note": a.note,
                   "link": {"delay_ms": a.delay_ms, "conn_rate": a.conn_rate, "total_rate": a.total_rate},
                   "versions": vers,
                   "corpus": {k: v for k, v in desc.items() if k != "blobs"},
                   "small_corpus": small, "rtt_ms": rtt_ms,
                   "bench_link": bl, "recommended_args": rec_args,
                   "runs": b.runs, "tables": text}, f, indent=1)
    log(f"wrote {path}")
    if not all(r.get("verified") for r in b.runs):
        rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
