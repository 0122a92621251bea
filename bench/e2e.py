#!/usr/bin/env python3
"""End-to-end benchmark: crossdock mirror vs skopeo sync vs a curl ceiling (loopback).

`crossdock mirror` against `skopeo sync`, and the raw ceiling of the machine,
on local docker-registry instances on 127.0.0.1.

    python3 bench/e2e.py [--quick] [--reps 2] [--crossdock build/tools/crossdock]

What it does (see bench/README.md for the method and the results):

  1. starts a source registry and pushes the benchmark corpus into it once
     (bench/bigcorpus.py: ~1.5 GiB of unique layer bytes, base layers shared
     by many repositories; --quick: ~105 MiB).  --corpus-dir DIR keeps the
     source registry's storage between invocations.
  2. for each scenario, ALTERNATING the tools (crossdock, skopeo, crossdock,
     skopeo, ... --reps times), each run into fresh, empty target registries:
       a  1 target:   crossdock mirror SRC/ns DST/ns   vs  one skopeo sync
       b  3 targets:  crossdock mirror SRC/ns T1 T2 T3 vs  three skopeo syncs
                      one after the other (as a script would run them)
       c  ceiling:    every unique blob copied once by curl GET | curl PUT
                      pipelines, 1 and 4 in parallel (and 4 pipelines teeing
                      each blob to 3 targets, the fan-out ceiling for b)
  3. after every run, checks every tag on every target (manifest digest equal
     to the source's, every referenced blob present: tests/integration/check.py);
     a run that fails the check is reported FAILED and left out of the medians.

Per run: wall time, MiB/s (unique blob bytes / wall), ratio to skopeo in the
same repetition, blob bytes read from the source (counted from the source
registry's access log, which logs the bytes written per response), CPU time
and peak RSS (/usr/bin/time -f %M; Debian package `time`).

Markdown tables go to stdout; everything to bench/results/e2e-<timestamp>.json.
"""

import argparse
import concurrent.futures
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))
sys.path.insert(0, HERE)
sys.dont_write_bytecode = True

import bigcorpus  # noqa: E402
import check  # noqa: E402
import registry  # noqa: E402
from corpus import RegistryClient  # noqa: E402

MiB = 1024 * 1024
TIME_BIN = "/usr/bin/time"
SRC_NS = "bench-src"
DST_NS = "bench-dst"


def log(msg):
    print(f"[e2e {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Registries
# --------------------------------------------------------------------------

class SourceRegistry(registry.Registry):
    """A registry.Registry whose storage can live in a kept directory."""

    def __init__(self, storage_dir=None, **kw):
        super().__init__(**kw)
        self.kept_storage = storage_dir

    def _prepare_files(self):
        super()._prepare_files()
        if self.kept_storage:
            os.makedirs(self.kept_storage, exist_ok=True)
            self.storage_dir = self.kept_storage


def access_log_since(reg, offset):
    """Parse the registry's access log (combined format) from byte `offset`."""
    reg.settle_log()
    with open(reg.log_path, "rb") as f:
        f.seek(offset)
        text = f.read().decode("utf-8", "replace")
    pat = re.compile(r'"(?P<m>[A-Z]+) (?P<p>\S+) HTTP/[0-9.]+" (?P<s>\d{3}) (?P<n>\d+|-)')
    out = {"blob_get_bytes": 0, "blob_gets": 0, "blob_heads": 0, "manifest_gets": 0,
           "response_bytes": 0, "requests": 0}
    for line in text.splitlines():
        m = pat.search(line)
        if not m or "crossdock-log-sync" in m.group("p"):
            continue
        n = 0 if m.group("n") == "-" else int(m.group("n"))
        out["requests"] += 1
        out["response_bytes"] += n
        path, method, status = m.group("p"), m.group("m"), int(m.group("s"))
        if "/blobs/sha256:" in path:
            if method == "GET" and status in (200, 206):
                out["blob_gets"] += 1
                out["blob_get_bytes"] += n
            elif method == "HEAD":
                out["blob_heads"] += 1
        elif "/manifests/" in path and method == "GET":
            out["manifest_gets"] += 1
    return out


_DONE_RE = re.compile(r'time="(?P<t>[^"]+)".*msg="response completed".*'
                      r'http\.request\.method=(?P<m>[A-Z]+) .*http\.request\.uri="?(?P<u>[^" ]+)"?'
                      r'.*http\.response\.duration=(?P<d>[0-9.]+)(?P<unit>ms|µs|s)\b')


def upload_concurrency(regs):
    """Average number of blob upload requests (PATCH/PUT on /blobs/uploads/) in flight on the
    targets while any was, from the registries' 'response completed' log lines."""
    iv = []
    for reg in regs:
        reg.settle_log()
        for line in reg.log_text().splitlines():
            m = _DONE_RE.search(line)
            if not m or m.group("m") not in ("PUT", "PATCH") or "/blobs/uploads/" not in m.group("u"):
                continue
            end = datetime.datetime.fromisoformat(m.group("t")[:26].rstrip("Z")).timestamp()
            dur = float(m.group("d")) * {"ms": 1e-3, "µs": 1e-6, "s": 1.0}[m.group("unit")]
            iv.append((end - dur, end))
    if not iv:
        return None
    # union of the intervals (time with at least one upload in flight)
    iv.sort()
    covered, cur_s, cur_e = 0.0, iv[0][0], iv[0][1]
    for s_, e_ in iv[1:]:
        if s_ > cur_e:
            covered += cur_e - cur_s
            cur_s, cur_e = s_, e_
        else:
            cur_e = max(cur_e, e_)
    covered += cur_e - cur_s
    busy = sum(e_ - s_ for s_, e_ in iv)
    return round(busy / covered, 2) if covered > 0 else None


def log_size(reg):
    try:
        return os.path.getsize(reg.log_path)
    except OSError:
        return 0


# --------------------------------------------------------------------------
# Verification (independent of the tools: registry API via check.py)
# --------------------------------------------------------------------------

def verify(target, desc, repo_map):
    """Every source tag is on `target` at repo_map(source repo) with the same
    manifest digest and every referenced blob present.  Returns a list of problems."""
    client = RegistryClient(target.url)
    problems = []
    done = set()
    for t in desc["tags"]:
        dst_repo = repo_map(t["repository"])
        try:
            got = check.manifest_digest(client, dst_repo, t["tag"])
        except Exception as e:  # noqa: BLE001 - any failure is a problem to report
            got = f"error {e}"
        if got != t["digest"]:
            problems.append(f"{dst_repo}:{t['tag']}: {got} != {t['digest']}")
            continue
        if (dst_repo, got) not in done:
            done.add((dst_repo, got))
            problems += check.missing_content(client, dst_repo, got)
    return problems


def verify_blobs(target, repo, digests):
    client = RegistryClient(target.url)
    return [f"{repo}@{d}: missing" for d in digests if not client.blob_exists(repo, d)]


# --------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------

def timed(cmd, timeout, log_path):
    """Run cmd under /usr/bin/time; returns (rc, wall, rss_kib, cpu_s, stdout)."""
    fd, tfile = tempfile.mkstemp(prefix="e2e-time-")
    os.close(fd)
    try:
        with open(log_path, "ab") as errf:
            errf.write(("\n$ " + shlex.join(cmd) + "\n").encode())
            errf.flush()
            t0 = time.monotonic()
            p = subprocess.run([TIME_BIN, "-o", tfile, "-f", "%M %e %U %S"] + cmd,
                               stdout=subprocess.PIPE, stderr=errf, timeout=timeout,
                               env=check._skopeo_env())
            wall = time.monotonic() - t0
        with open(tfile) as f:
            lines = [ln for ln in f.read().splitlines() if ln.strip()]
        rss, _, user, sys_ = lines[-1].split()
        return p.returncode, wall, int(rss), float(user) + float(sys_), p.stdout
    finally:
        os.unlink(tfile)


class Bench:
    def __init__(self, args, src, desc, workdir):
        self.a, self.src, self.desc, self.workdir = args, src, desc, workdir
        self.unique = desc["unique_blob_bytes"]
        self.runs = []
        self.run_log = os.path.join(workdir, "runs.log")
        repos = sorted({t["repository"] for t in desc["tags"]})
        names = [r.rsplit("/", 1)[-1] for r in repos]
        if len(set(names)) != len(names):
            raise RuntimeError("skopeo sync --src yaml keeps only the last path component; "
                               "the corpus needs unique repository basenames")
        self.repos = repos

    # -- generic wrapper: fresh targets, source log accounting, verification --
    def run(self, scenario, tool, rep, ntargets, fn):
        targets = [registry.Registry(name=f"dst{i}") for i in range(ntargets)]
        try:
            for t in targets:
                t.start()
            os.sync()                       # start every run with clean page-cache writeback
            time.sleep(0.5)
            off = log_size(self.src)
            log(f"{scenario} rep {rep}: {tool} -> {ntargets} target(s)")
            load = os.getloadavg()[0]
            res = fn(targets)
            res["source"] = access_log_since(self.src, off)
            if res.get("ok"):
                t0 = time.monotonic()
                probs = []
                for t in targets:
                    probs += res["verify"](t)
                res["verified"] = not probs
                res["problems"] = probs[:20]
                res["verify_s"] = round(time.monotonic() - t0, 2)
            else:
                res["verified"] = False
            res.pop("verify", None)
            res["uploads_in_flight"] = upload_concurrency(targets)
        finally:
            for t in targets:
                t.stop()
        res.update(scenario=scenario, tool=tool, rep=rep, targets=ntargets, loadavg_1m=round(load, 2))
        w = res.get("wall_s")
        res["mib_s"] = round(self.unique / MiB / w, 1) if w and res["verified"] else None
        res["delivered_mib_s"] = (round(self.unique * ntargets / MiB / w, 1)
                                  if w and res["verified"] else None)
        sb = res["source"]["blob_get_bytes"]
        log(f"   {'ok' if res['verified'] else 'FAILED'}: {w:.2f}s, "
            f"{res['mib_s'] or 0:.0f} MiB/s, source blob bytes {sb / MiB:.1f} MiB "
            f"({sb / self.unique:.2f}x unique), rss {res.get('rss_mib')} MiB"
            + ("" if res["verified"] else f" problems: {res.get('problems') or res.get('error')}"))
        self.runs.append(res)
        return res

    # -- crossdock --
    def crossdock(self, targets, binary=None, extra=()):
        cmd = [binary or self.a.crossdock, "mirror", f"{self.src.host}/{SRC_NS}"]
        cmd += [f"{t.host}/{DST_NS}" for t in targets]
        cmd += ["--insecure", "--json"] + self.a.crossdock_arg + list(extra)
        rc, wall, rss, cpu, out = timed(cmd, self.a.run_timeout, self.run_log)
        res = {"wall_s": round(wall, 3), "rss_mib": round(rss / 1024, 1), "cpu_s": round(cpu, 2),
               "rc": rc, "ok": rc == 0, "command": shlex.join(cmd)}
        try:
            s = json.loads(out)
            res["tool_summary"] = {k: s.get(k) for k in (
                "copied", "skipped", "failed", "bytes_copied", "bytes_read_source",
                "blobs_uploaded", "blobs_mounted", "blobs_existing", "duration_s", "errors")}
        except ValueError:
            res["tool_summary"] = None
            res["ok"] = False
            res["error"] = "no JSON summary on stdout"
        res["verify"] = lambda t: verify(t, self.desc, lambda r: DST_NS + r[len(SRC_NS):])
        return res

    # -- skopeo --
    def sync_yaml(self):
        path = os.path.join(self.workdir, "sync.yml")
        with open(path, "w") as f:
            f.write(f"{self.src.host}:\n  tls-verify: false\n  images:\n")
            for r in self.repos:
                f.write(f"    {r}: []\n")     # [] = every tag of the repository
        return path

    def skopeo_cmd(self, target, yml):
        return ["skopeo", "sync", "--src", "yaml", "--dest", "docker",
                "--dest-tls-verify=false", "--preserve-digests", yml, f"{target.host}/{DST_NS}"]

    def skopeo_repo_cmd(self, target, repo):
        return ["skopeo", "sync", "--src", "docker", "--dest", "docker", "--src-tls-verify=false",
                "--dest-tls-verify=false", "--preserve-digests", f"{self.src.host}/{repo}",
                f"{target.host}/{DST_NS}"]

    def skopeo(self, targets):
        """One `skopeo sync --src yaml` per target (default), or with --skopeo-jobs N one
        `skopeo sync --src docker SRC/REPO` per repository, N at a time."""
        yml = self.sync_yaml()
        if self.a.skopeo_jobs > 1:
            cmds = [self.skopeo_repo_cmd(t, r) for t in targets for r in self.repos]
            jobs = self.a.skopeo_jobs
        else:
            cmds = [self.skopeo_cmd(t, yml) for t in targets]
            jobs = len(targets) if self.a.skopeo_parallel else 1
        res = {"wall_s": 0.0, "rss_mib": 0.0, "cpu_s": 0.0, "ok": True, "rc": [],
               "command": [shlex.join(c) for c in cmds], "processes": len(cmds), "parallel": jobs}
        t0 = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(jobs) as ex:
            outs = list(ex.map(lambda c: timed(c, self.a.run_timeout, self.run_log), cmds))
        wall = time.monotonic() - t0
        for rc, _, rss, cpu, _ in outs:
            res["rc"].append(rc)
            res["ok"] = res["ok"] and rc == 0
            res["rss_mib"] = max(res["rss_mib"], round(rss / 1024, 1))   # per process
            res["cpu_s"] = round(res["cpu_s"] + cpu, 2)
        res["wall_s"] = round(wall, 3)
        res["verify"] = lambda t: verify(t, self.desc,
                                         lambda r: DST_NS + "/" + r.rsplit("/", 1)[-1])
        return res

    # -- ceiling: curl GET | curl PUT, no manifests, no mounts --
    def ceiling(self, targets, streams):
        blobs = sorted(self.desc["blobs"].items(), key=lambda kv: -kv[1]["size"])
        repo = "ceiling/blobs"
        clients = [RegistryClient(t.url) for t in targets]
        fifo_dir = tempfile.mkdtemp(prefix="e2e-fifo-", dir=self.workdir)

        def put_cmd(loc, digest, size, out):
            sep = "&" if "?" in loc else "?"
            return (f"curl -sS -o /dev/null -w '%{{http_code}}' -X PUT -T - "
                    f"-H 'Content-Length: {size}' -H 'Transfer-Encoding:' -H 'Expect:' "
                    f"-H 'Content-Type: application/octet-stream' "
                    f"{shlex.quote(loc + sep + 'digest=' + digest)} > {out}")

        # Upload sessions are opened before the clock starts: the ceiling times data movement.
        sessions = [[c.request("POST", f"/v2/{repo}/blobs/uploads/", ok=(202,)).headers["Location"]
                     for c in clients] for _ in blobs]

        def one(item):
            i, (digest, b) = item
            locs = sessions[i]
            get = (f"curl -sS --fail {shlex.quote(self.src.url)}/v2/{b['repo']}/blobs/{digest}")
            codes = [os.path.join(fifo_dir, f"{i}.{k}.code") for k in range(len(locs))]
            if len(locs) == 1:
                script = f"set -o pipefail; {get} | {put_cmd(locs[0], digest, b['size'], codes[0])}"
            else:       # fan-out: tee into named pipes read by the other PUTs
                fifos = [os.path.join(fifo_dir, f"{i}.{k}.fifo") for k in range(len(locs) - 1)]
                script = "set -o pipefail; "
                script += "".join(f"mkfifo {f}; " for f in fifos)
                script += "".join(f"{put_cmd(loc, digest, b['size'], code)} < {f} & "
                                  for loc, code, f in zip(locs, codes, fifos))
                script += (f"{get} | tee {' '.join(fifos)} | "
                           f"{put_cmd(locs[-1], digest, b['size'], codes[-1])}; rc=$?; wait; "
                           f"rm -f {' '.join(fifos)}; exit $rc")
            p = subprocess.run(["bash", "-c", script], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, timeout=self.a.run_timeout,
                               env=check._skopeo_env())
            got = []
            for c in codes:
                try:
                    with open(c) as f:
                        got.append(f.read().strip())
                except OSError:
                    got.append("?")
            if p.returncode != 0 or any(g != "201" for g in got):
                return f"{digest}: rc {p.returncode}, PUT {got}, {p.stderr.decode()[-300:]}"
            return None

        t0 = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(streams) as ex:
            errors = [e for e in ex.map(one, enumerate(blobs)) if e]
        wall = time.monotonic() - t0
        shutil.rmtree(fifo_dir, ignore_errors=True)
        digests = [d for d, _ in blobs]
        return {"wall_s": round(wall, 3), "rss_mib": None, "cpu_s": None, "ok": not errors,
                "error": errors[:5], "streams": streams,
                "command": "(POST before the clock) curl -sS SRC/v2/REPO/blobs/D | curl -sS -X PUT -T - "
                           "-H 'Content-Length: N' -H 'Transfer-Encoding:' -H 'Expect:' "
                           "'LOCATION&digest=D'" + (" (tee to 3 PUTs)" if len(targets) > 1 else ""),
                "verify": lambda t: verify_blobs(t, repo, digests)}


# --------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------

def _f(x, fmt="{:.1f}"):
    return "-" if x is None else fmt.format(x)


def ratios(runs, scenario, tool, baseline="skopeo"):
    """wall(baseline) / wall(tool) for each repetition where both verified."""
    out = []
    by = {(r["tool"], r["rep"]): r for r in runs if r["scenario"] == scenario and r["verified"]}
    for (t, rep), r in by.items():
        b = by.get((baseline, rep))
        if t == tool and b:
            out.append(b["wall_s"] / r["wall_s"])
    return out


def tables(runs, unique, ntags):
    lines = ["| scenario | tool | rep | wall s | MiB/s | x skopeo (same rep) | source blob MiB read (x unique) "
             "| blob GETs | uploads in flight | peak RSS MiB | CPU s | load 1m | verified |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in runs:
        ratio = None
        if r["verified"] and r["tool"] != "skopeo":
            rr = [x for x in runs if x["scenario"] == r["scenario"] and x["tool"] == "skopeo"
                  and x["rep"] == r["rep"] and x["verified"]]
            if rr:
                ratio = rr[0]["wall_s"] / r["wall_s"]
        sb = r["source"]["blob_get_bytes"]
        lines.append(f"| {r['scenario']} | {r['tool']} | {r['rep']} | {r['wall_s']:.2f} | "
                     f"{_f(r['mib_s'])} | {_f(ratio, '{:.2f}')} | {sb / MiB:.0f} ({sb / unique:.2f}) | "
                     f"{r['source']['blob_gets']} | {_f(r.get('uploads_in_flight'))} | "
                     f"{_f(r['rss_mib'])} | {_f(r['cpu_s'], '{:.1f}')} | {_f(r.get('loadavg_1m'))} | "
                     f"{'yes' if r['verified'] else 'FAILED'} |")
    summ = ["| scenario | tool | median wall s | median MiB/s | delivered MiB/s | median x skopeo "
            "| source read (x unique) | max peak RSS MiB | median CPU s | runs ok |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    seen, medians = [], {}
    for r in runs:
        k = (r["scenario"], r["tool"])
        if k not in seen:
            seen.append(k)
    for sc, tool in seen:
        rs = [r for r in runs if r["scenario"] == sc and r["tool"] == tool]
        ok = [r for r in rs if r["verified"]]
        med = statistics.median([r["wall_s"] for r in ok]) if ok else None
        rat = ratios(runs, sc, tool) if tool != "skopeo" else []
        reads = [r["source"]["blob_get_bytes"] / unique for r in ok]
        rss = [r["rss_mib"] for r in ok if r["rss_mib"] is not None]
        cpu = [r["cpu_s"] for r in ok if r["cpu_s"] is not None]
        ntg = rs[0]["targets"]
        summ.append(f"| {sc} | {tool} | {_f(med, '{:.2f}')} | "
                    f"{_f(unique / MiB / med if med else None)} | "
                    f"{_f(unique * ntg / MiB / med if med else None)} | "
                    f"{_f(statistics.median(rat) if rat else None, '{:.2f}')} | "
                    f"{_f(statistics.median(reads) if reads else None, '{:.2f}')} | "
                    f"{_f(max(rss) if rss else None)} | "
                    f"{_f(statistics.median(cpu) if cpu else None)} | {len(ok)}/{len(rs)} |")
        medians[(sc, tool)] = med
    notes = []
    for sc, ceil in (("a: 1 target", "curl x4"), ("b: 3 targets", "curl x4 tee 3 targets")):
        c = medians.get(("c: ceiling", ceil))
        for (s2, tool), m in medians.items():
            if s2 == sc and c and m:
                notes.append(f"- {sc}, {tool}: {100 * c / m:.0f}% of the `{ceil}` ceiling "
                             f"(median wall {m:.2f}s vs {c:.2f}s)")
    if notes:
        summ.append("\n" + "\n".join(notes))
    return "\n".join(summ), "\n".join(lines)


def versions(crossdock):
    import hashlib
    def out(cmd):
        try:
            return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  timeout=20, cwd=ROOT).stdout.decode().strip().splitlines()[0]
        except Exception as e:  # noqa: BLE001
            return f"? ({e})"
    return {"skopeo": out(["skopeo", "--version"]),
            "docker-registry": out([registry.REGISTRY_BIN, "--version"]),
            "curl": out(["curl", "--version"]),
            "crossdock_git": out(["git", "describe", "--always", "--dirty"]),
            "crossdock_bin": crossdock,
            "crossdock_version": out([crossdock, "--version"]),
            "crossdock_bin_sha256": hashlib.sha256(open(crossdock, "rb").read()).hexdigest(),
            "kernel": platform.release(), "cpus": os.cpu_count(),
            "python": platform.python_version()}


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="~105 MiB corpus (smoke test)")
    ap.add_argument("--reps", type=int, default=2, help="repetitions per tool (alternating)")
    ap.add_argument("--scenarios", default="a,b,c", help="subset of a,b,c")
    ap.add_argument("--crossdock", default=os.path.join(ROOT, "build", "tools", "crossdock"))
    ap.add_argument("--crossdock-arg", action="append", default=[],
                    help="extra argument for crossdock mirror (repeatable), e.g. --crossdock-arg=--jobs=8")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME|BINARY|ARGS",
                    help="an extra crossdock run in every repetition of a and b, e.g. "
                         "'jobs8||--jobs 8' (empty BINARY: --crossdock)")
    ap.add_argument("--skopeo-parallel", action="store_true",
                    help="scenario b: run the three skopeo syncs at the same time, not one after the other")
    ap.add_argument("--skopeo-jobs", type=int, default=1,
                    help="N>1: one `skopeo sync --src docker` per repository, N at a time "
                         "(default: one `skopeo sync --src yaml` for the whole namespace)")
    ap.add_argument("--corpus-dir", help="keep the source registry storage here (reused when it matches)")
    ap.add_argument("--run-timeout", type=float, default=1200, help="seconds per tool run")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--note", default="", help="free text stored in the JSON (e.g. which crossdock build)")
    a = ap.parse_args(argv)
    a.crossdock = os.path.abspath(a.crossdock)
    if not (1 <= a.reps <= 20):
        ap.error("--reps must be 1..20")
    for tool in (TIME_BIN, "skopeo", "curl", registry.REGISTRY_BIN, a.crossdock):
        if not shutil.which(tool):
            ap.error(f"{tool} not found (Debian packages: time, skopeo, curl, docker-registry; "
                     "build crossdock with ninja -C build)")
    scenarios = [s.strip() for s in a.scenarios.split(",") if s.strip()]

    spec = bigcorpus.QUICK if a.quick else bigcorpus.FULL
    started = datetime.datetime.now()
    workdir = tempfile.mkdtemp(prefix="crossdock-e2e-")
    # Other people rebuild build/tools/crossdock while this runs: every run uses a copy taken now.
    a.crossdock_source = a.crossdock
    a.crossdock = shutil.copy2(a.crossdock, os.path.join(workdir, "crossdock"))
    vers = versions(a.crossdock)
    vers["crossdock_bin"] = a.crossdock_source
    if a.corpus_dir:
        # A kept corpus of another shape (e.g. --quick vs full) is wiped, not mixed in.
        try:
            with open(os.path.join(a.corpus_dir, "corpus.json")) as f:
                stale = json.load(f).get("spec") != spec.to_dict()
        except (OSError, ValueError):
            stale = True
        if stale:
            shutil.rmtree(os.path.join(a.corpus_dir, "storage"), ignore_errors=True)
            try:
                os.unlink(os.path.join(a.corpus_dir, "corpus.json"))
            except OSError:
                pass
    src = SourceRegistry(storage_dir=os.path.join(a.corpus_dir, "storage") if a.corpus_dir else None,
                         name="bench-src")
    try:
        src.start()
        desc = None
        desc_path = os.path.join(a.corpus_dir, "corpus.json") if a.corpus_dir else None
        if desc_path and os.path.exists(desc_path):
            with open(desc_path) as f:
                cached = json.load(f)
            if cached.get("spec") == spec.to_dict() and bigcorpus.present(src.client(), cached):
                desc = cached
                log(f"reusing the corpus in {a.corpus_dir}")
        if desc is None:
            log(f"generating the corpus into {src.host}/{SRC_NS} ...")
            desc = bigcorpus.generate(src.client(), spec, log=None)
            if desc_path:
                with open(desc_path, "w") as f:
                    json.dump(desc, f)
        unique = desc["unique_blob_bytes"]
        log(f"corpus: {len(desc['tags'])} tags, {len(desc['blobs'])} unique blobs, "
            f"{unique / MiB:.1f} MiB (generated in {desc['generate_seconds']}s)")

        b = Bench(a, src, desc, workdir)
        variants = []
        for v in a.variant:
            name, binary, args = (v.split("|", 2) + ["", ""])[:3]
            if binary:
                binary = shutil.copy2(binary, os.path.join(workdir, f"crossdock-{name}"))
            variants.append((f"crossdock {name}", binary or None, shlex.split(args)))
        # Every repetition runs every scenario, each tool in turn: crossdock, variants, skopeo,
        # then the ceilings; so slow drifts of a noisy machine hit all of them alike.
        for rep in range(1, a.reps + 1):
            for sc, label, n in (("a", "a: 1 target", 1), ("b", "b: 3 targets", 3)):
                if sc not in scenarios:
                    continue
                b.run(label, "crossdock", rep, n, b.crossdock)
                for name, binary, args in variants:
                    b.run(label, name, rep, n,
                          lambda t, binary=binary, args=args: b.crossdock(t, binary, args))
                b.run(label, "skopeo", rep, n, b.skopeo)
            if "c" in scenarios:
                b.run("c: ceiling", "curl x1", rep, 1, lambda t: b.ceiling(t, 1))
                b.run("c: ceiling", "curl x4", rep, 1, lambda t: b.ceiling(t, 4))
                b.run("c: ceiling", "curl x4 tee 3 targets", rep, 3, lambda t: b.ceiling(t, 4))
    finally:
        src.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    summary, detail = tables(b.runs, unique, len(desc["tags"]))
    head = (f"corpus: {len(desc['tags'])} tags in {desc['spec']['repos']} repositories, "
            f"{len(desc['blobs'])} unique blobs, {unique / MiB:.1f} MiB unique blob bytes; "
            f"reps {a.reps}; {os.cpu_count()} CPUs")
    print(head + "\n\n" + summary + "\n\n" + detail)
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, f"e2e-{started.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump({"started": started.isoformat(timespec="seconds"),
                   "argv": sys.argv, "quick": a.quick, "reps": a.reps, "note": a.note,
                   "versions": vers,
                   "corpus": {k: v for k, v in desc.items() if k not in ("blobs",)},
                   "runs": b.runs}, f, indent=1)
    log(f"wrote {path}")
    return 0 if all(r["verified"] for r in b.runs) else 1


if __name__ == "__main__":
    sys.exit(main())
