#!/usr/bin/env python3
"""Where a WAN run's wall time goes: start, transfer and tail of `crossdock mirror`.

The whole-run figure of wan.py (bytes / wall) counts everything from the start of
the process to its exit; this splits that time up.  Same emulator and corpus as
wan.py scenario a (20 ms one-way, 100 Mbit/s per connection, 1 Gbit/s in all,
~1 GiB of shared-layer images); every run into a fresh target through a fresh
wanem, variants alternating within each repetition.

    python3 bench/phases.py [--reps 3] [--quick] ['NAME|ARGS[|CROSSDOCK]' ...]

e.g. `python3 bench/phases.py 'defaults|' 'jobs32|--jobs 32'`, or, to compare two builds,
`python3 bench/phases.py 'new|' 'old||/tmp/crossdock-old'`.  Per run, from
wanem's client-side counter (bytes it delivered to crossdock), sampled every
20 ms, and from the target registry's log (request end times and durations):

  first MiB    time from start until the first MiB reached crossdock
  5% / 50% / 95% / 98%   time until that share of the bytes had arrived
  last byte    time until every byte had arrived
  transfer %   bytes / (last byte - first MiB), against the cap
  uploads end  end of the last blob PATCH/PUT at the target
  tail         exit - last byte (uploads still draining, manifests, exit)
  CPU          crossdock's user + system time

A run whose summary reports failures is marked so and its row is kept.
"""

import argparse
import datetime
import json
import os
import re
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
sys.dont_write_bytecode = True

import bigcorpus  # noqa: E402
import e2e  # noqa: E402  (puts tests/integration on sys.path)
import registry  # noqa: E402
import wan  # noqa: E402

LOG_LINE = re.compile(r'time="([^"]+)".*?msg="response completed".*?http\.request\.method=(\w+)'
                      r'.*?http\.request\.uri="?([^" ]+)"?.*?http\.response\.duration="?([^" ]+)"?')
FRACTIONS = (0.05, 0.5, 0.95, 0.98)


def log_time(s):
    """distribution's logrus time, e.g. 2026-11-23T17:00:33.471850157Z, as a Unix timestamp."""
    m = re.match(r"(\d+-\d+-\d+T\d+:\d+:\d+)(\.\d+)?Z", s)
    base = datetime.datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S").replace(tzinfo=datetime.timezone.utc)
    return base.timestamp() + float(m.group(2) or 0)


def go_duration(s):
    units = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "µs": 1e-6, "us": 1e-6, "ns": 1e-9}
    return sum(float(v) * units[u] for v, u in re.findall(r"([\d.]+)(ms|µs|us|ns|h|m|s)", s))


def blob_upload_ends(log_path):
    """End times of the target's blob upload requests (PATCH and PUT on .../blobs/uploads/...)."""
    ends = []
    with open(log_path, errors="replace") as f:
        for line in f:
            m = LOG_LINE.search(line)
            if m and m.group(2) in ("PATCH", "PUT") and "/blobs/uploads/" in m.group(3):
                ends.append(log_time(m.group(1)))
    return ends


class Sampler:
    """wanem's client-side byte counter every `period` s, with wall-clock times."""

    def __init__(self, wanem, period=0.02):
        self.wanem, self.period = wanem, period
        self.samples = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(self.period):
            try:
                os.kill(self.wanem.pid, signal.SIGUSR1)   # wanem rewrites its stats file
            except (OSError, TypeError):
                return
            time.sleep(0.005)
            s = self.wanem.read_stats()
            if s:
                self.samples.append((time.time(), s["upstream_to_client"]["bytes_out"]))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)


def one_run(a, src, crossdock, wanem_bin, workdir, name, args):
    """One run of `crossdock` (a path) with `args` into a fresh target through a fresh wanem."""
    target = registry.Registry(name="phases-dst")
    wanem = None
    try:
        target.start()
        wanem = wan.Wanem(wanem_bin, src.host, a, workdir, name.replace(" ", "_")).start()
        os.sync()
        time.sleep(0.5)
        cmd = [crossdock, "mirror", f"{wanem.host}/{wan.SRC_NS}", f"{target.host}/{wan.DST_NS}",
               "--insecure", "--json", "-q"] + shlex.split(args)
        with Sampler(wanem) as sampler:
            r0 = resource.getrusage(resource.RUSAGE_CHILDREN)   # only waited-for children count
            t0 = time.time()
            p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=a.run_timeout)
            t1 = time.time()
            r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        samples = sampler.samples + [(t1, wanem.read_stats()["upstream_to_client"]["bytes_out"])]
        total = samples[-1][1]

        def reached(n):
            return next((t for t, b in samples if b >= n), t1) - t0

        try:
            failed = json.loads(p.stdout).get("failed", 0)
        except ValueError:
            failed = None
        first_mib = reached(1 << 20)
        last = reached(total)
        uploads = blob_upload_ends(target.log_path)
        return {
            "name": name, "rc": p.returncode, "failed": failed, "wall": t1 - t0, "bytes": total,
            "first_mib": first_mib, "last_byte": last,
            "fractions": {f: reached(f * total) for f in FRACTIONS},
            "transfer_mbit": total * 8 / 1e6 / max(1e-9, last - first_mib),
            "uploads_end": (max(uploads) - t0) if uploads else None,
            "tail": (t1 - t0) - last,
            "cpu": (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime),
            "stderr": p.stderr.decode(errors="replace")[-2000:] if p.returncode else "",
        }
    finally:
        if wanem:
            wanem.stop()
        target.stop()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="*", default=["defaults|"], metavar="NAME|ARGS[|CROSSDOCK]")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="~105 MiB corpus (development)")
    ap.add_argument("--crossdock", default=os.path.join(ROOT, "build", "tools", "crossdock"))
    ap.add_argument("--wanem", default=os.path.join(ROOT, "build", "tests", "tools", "wanem"))
    ap.add_argument("--delay-ms", type=float, default=20)
    ap.add_argument("--conn-rate", default="100Mbit")
    ap.add_argument("--total-rate", default="1Gbit")
    ap.add_argument("--cap-mbit", type=float, default=1000, help="the total rate, for the % columns")
    ap.add_argument("--run-timeout", type=float, default=600)
    a = ap.parse_args()

    workdir = tempfile.mkdtemp(prefix="crossdock-phases-")
    crossdock = shutil.copy2(a.crossdock, os.path.join(workdir, "crossdock"))
    wanem_bin = shutil.copy2(a.wanem, os.path.join(workdir, "wanem"))
    binaries = {}   # a variant's own crossdock, copied too (builds change under a running bench)
    for i, v in enumerate(a.variants):
        binary = (v.split("|", 2) + ["", ""])[2]
        if binary and binary not in binaries:
            binaries[binary] = shutil.copy2(binary, os.path.join(workdir, f"crossdock-{i}"))
    src = registry.Registry(name="phases-src")
    rows = []
    try:
        src.start()
        desc = bigcorpus.generate(src.client(), bigcorpus.QUICK if a.quick else wan.WAN, log=None)
        ideal = desc["unique_blob_bytes"] * 8 / 1e6 / a.cap_mbit
        print(f"corpus {desc['unique_blob_bytes'] / 2**20:.1f} MiB: {ideal:.2f} s at the cap", flush=True)
        for rep in range(1, a.reps + 1):
            for v in a.variants:
                name, args, binary = (v.split("|", 2) + ["", ""])[:3]
                r = one_run(a, src, binaries[binary] if binary else crossdock, wanem_bin, workdir, name, args)
                r["rep"] = rep
                rows.append(r)
                ok = r["rc"] == 0 and r["failed"] == 0
                print(f"{name} rep {rep}: wall {r['wall']:.2f} s ({ideal / r['wall'] * 100:.1f}% of cap), "
                      f"first MiB {r['first_mib']:.2f}, last byte {r['last_byte']:.2f}, tail {r['tail']:.2f}, "
                      f"CPU {r['cpu']:.2f} s"
                      + ("" if ok else f"  FAILED (exit {r['rc']}, failed {r['failed']})\n{r['stderr']}"),
                      flush=True)
    finally:
        src.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    print()
    print("| variant | rep | wall s | % of cap (whole run) | first MiB s | "
          + " | ".join(f"{int(f * 100)}% s" for f in FRACTIONS)
          + " | last byte s | transfer Mbit/s (first MiB to last byte) | uploads end s | tail s (exit - last byte) | CPU s |")
    print("|---|---:|---:|---:|---:|" + "---:|" * len(FRACTIONS) + "---:|---:|---:|---:|---:|")
    for r in rows:
        up = f"{r['uploads_end']:.2f}" if r["uploads_end"] is not None else "-"
        print(f"| {r['name']} | {r['rep']} | {r['wall']:.2f} | {ideal / r['wall'] * 100:.1f} | {r['first_mib']:.2f} | "
              + " | ".join(f"{r['fractions'][f]:.2f}" for f in FRACTIONS)
              + f" | {r['last_byte']:.2f} | {r['transfer_mbit']:.0f} | {up} | {r['tail']:.2f} | {r['cpu']:.2f} |")
    print()
    print("| variant | median wall s | median % of cap | median first MiB s | median transfer Mbit/s | median tail s | median CPU s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in dict.fromkeys(r["name"] for r in rows):
        rs = [r for r in rows if r["name"] == name]
        med = lambda k: statistics.median(r[k] for r in rs)  # noqa: E731
        print(f"| {name} | {med('wall'):.2f} | {ideal / med('wall') * 100:.1f} | {med('first_mib'):.2f} | "
              f"{med('transfer_mbit'):.0f} | {med('tail'):.2f} | {med('cpu'):.2f} |")
    return 0 if all(r["rc"] == 0 and r["failed"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
