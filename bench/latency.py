#!/usr/bin/env python3
"""Replication latency: push to the primary, time until the image is pullable from every replica.

    python3 bench/latency.py [--pushes 20] [--big-mib 500] [--replicas 3]

A `crossdock serve` daemon with a replication group (primary + N replicas, events only); the
primary is a real docker-registry whose notifications point at the daemon's webhook endpoint.
Each push is `skopeo copy` of a distinct image from a staging registry into the primary; the clock
starts when skopeo returns (the push is complete) and stops, per replica, when a HEAD of the tag on
that replica answers 200 with the pushed digest (polled every 10 ms by one thread per replica).

  small   --pushes distinct small images (2 layers of a few KiB): p50 / p99 / max of the time to
          each replica and to all replicas;
  big     one image with a --big-mib layer: time to all replicas, against a single copy of the
          same image from the primary to one fresh registry (`crossdock mirror`, and `skopeo copy`
          for reference) in the same run: the ratio is the figure.

Every wait is bounded.  Standard library only (plus the repository's test helpers).
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests", "integration"))

import bigcorpus  # noqa: E402
import check  # noqa: E402
import corpus  # noqa: E402
import daemonenv  # noqa: E402
import registry  # noqa: E402
from corpus import RegistryClient  # noqa: E402
from e2e import timed  # noqa: E402
from wan import Wanem  # noqa: E402

MiB = 1 << 20
SECRET = "latency-bench-webhook-secret"
POLL_S = 0.01
ACCEPT = ", ".join([
    "application/vnd.oci.image.manifest.v1+json", "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json"])


def skopeo_copy(src, dst):
    rc, wall, _, _, _ = timed(["skopeo", "copy", "--src-tls-verify=false", "--dest-tls-verify=false",
                               f"docker://{src}", f"docker://{dst}"], 1800, os.devnull)
    if rc != 0:
        raise RuntimeError(f"skopeo copy {src} {dst} failed ({rc})")
    return wall


def wait_present(client, repo, tag, digest, t0, timeout, out, key, poll_s=POLL_S):
    """Polls HEAD repo:tag until it answers with `digest`; stores seconds since t0 in out[key]."""
    deadline = t0 + timeout
    for _ in range(int(timeout / poll_s) + 100):
        try:
            r = client.request("HEAD", f"/v2/{repo}/manifests/{tag}", headers={"Accept": ACCEPT})
            if r.status == 200 and r.headers.get("Docker-Content-Digest") == digest:
                out[key] = time.monotonic() - t0
                return
        except Exception:  # noqa: BLE001 - a replica restarting or refusing: keep polling
            pass
        if time.monotonic() >= deadline:
            return
        time.sleep(poll_s)


def time_to_replicas(replicas, repo, tag, digest, t0, timeout, poll_s=POLL_S):
    """Seconds from t0 until each replica serves repo:tag at `digest` (polled on the replica itself,
    not through its link). Big images are polled every 50 ms so the polling costs the replicas
    little CPU."""
    out = {}
    threads = [threading.Thread(target=wait_present,
                                args=(RegistryClient(r.host), repo, tag, digest, t0, timeout, out, r.name, poll_s))
               for r in replicas]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 5)
    return out


def cpu_s(pid):
    """User + system CPU seconds of a process so far (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return 0.0


def cpu_of(procs):
    """{name: CPU seconds} for {name: pid}."""
    return {name: cpu_s(pid) for name, pid in procs.items()}


def pctl(values, q):
    v = sorted(values)
    if not v:
        return None
    k = min(len(v) - 1, max(0, int(round(q / 100 * (len(v) - 1)))))
    return v[k]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pushes", type=int, default=20)
    ap.add_argument("--big-mib", type=int, default=500)
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=120.0, help="per push, seconds")
    ap.add_argument("--replica-link", default="",
                    help="put each replica (and the single-copy target) behind wanem with this rate, e.g. "
                         "400Mbit: replicas in other regions, each with its own link (default: loopback)")
    ap.add_argument("--replica-delay-ms", type=float, default=20, help="one-way delay of --replica-link")
    ap.add_argument("--wanem", default=os.path.join(HERE, "..", "build", "tests", "tools", "wanem"))
    ap.add_argument("--json", help="write the results as JSON to FILE")
    a = ap.parse_args(argv)
    os.environ.setdefault("CROSSDOCK_BIN", os.path.join(HERE, "..", "build", "tools", "crossdock"))
    work = tempfile.mkdtemp(prefix="crossdock-latency-")
    results = {"pushes": a.pushes, "replicas": a.replicas, "big_mib": a.big_mib,
               "replica_link": a.replica_link or "loopback"}
    regs, links = [], []

    def reachable(reg):
        """The URL the daemon and the baseline use for a replica: its own, or a wanem in front."""
        if not a.replica_link:
            return reg.url, reg.host
        link_args = argparse.Namespace(delay_ms=a.replica_delay_ms, conn_rate=a.replica_link,
                                       total_rate=a.replica_link)
        w = Wanem(a.wanem, reg.host, link_args, work, f"{reg.name}-{len(links)}").start()
        links.append(w)
        return f"http://{w.host}", w.host

    daemon = daemonenv.Daemon(os.path.join(work, "state"), os.path.join(work, "serve.log"))
    try:
        daemon.start()
        api = daemon.api
        hook = f"{daemon.base_url}/v1/webhooks/primary"
        staging = registry.Registry(name="staging").start()
        primary = registry.Registry(name="primary", notify_url=hook,
                                    notify_headers={"Authorization": f"Bearer {SECRET}"}).start()
        replicas = [registry.Registry(name=f"replica{i}").start() for i in range(a.replicas)]
        regs = [staging, primary, *replicas]
        assert api.post("/v1/registries", {"name": "primary", "url": primary.url,
                                           "webhook_secret": SECRET}).status == 201
        for r in replicas:
            assert api.post("/v1/registries", {"name": r.name, "url": reachable(r)[0]}).status == 201
        resp = api.post("/v1/replications", {"name": "bench", "primary": "primary",
                                             "replicas": [r.name for r in replicas], "schedule": ""})
        assert resp.status == 201, resp.describe()

        # --- small images
        sc = RegistryClient(staging.host)
        small = {"per_replica": [], "all": []}
        for i in range(a.pushes):
            m = corpus.push_image(sc, "app/small", f"p{i}", f"latency-{i}-{time.time_ns()}")
            skopeo_copy(f"{staging.host}/app/small:p{i}", f"{primary.host}/app/small:p{i}")
            t0 = time.monotonic()
            got = time_to_replicas(replicas, "app/small", f"p{i}", m.digest, t0, a.timeout)
            if len(got) != len(replicas):
                raise RuntimeError(f"push {i}: only {sorted(got)} had the image within {a.timeout}s\n"
                                   + daemon.describe())
            small["per_replica"] += list(got.values())
            small["all"].append(max(got.values()))
            print(f"small push {i}: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in sorted(got.items())),
                  flush=True)
        for k in ("per_replica", "all"):
            v = small[k]
            small[k + "_ms"] = {"p50": round(pctl(v, 50) * 1000), "p99": round(pctl(v, 99) * 1000),
                                "max": round(max(v) * 1000), "mean": round(statistics.mean(v) * 1000)}
            del small[k]
        results["small"] = small

        # --- one big image
        if a.big_mib > 0:
            spec = bigcorpus.Spec(repos=1, bases=1, base_size=a.big_mib * MiB, runtimes=1, runtime_size=MiB,
                                  app_size=MiB, namespace="big", tags=("v1",))
            desc = bigcorpus.generate(sc, spec, log=lambda *_: None)
            repo, digest = desc["tags"][0]["repository"], desc["tags"][0]["digest"]
            # Baselines first: a single copy from the primary to one fresh registry. The primary
            # gets the image through a push (its events are replicated too, and awaited).
            skopeo_copy(f"{staging.host}/{repo}:v1", f"{primary.host}/{repo}:v1")
            t0 = time.monotonic()
            warm = time_to_replicas(replicas, repo, "v1", digest, t0, a.timeout * 10, poll_s=0.05)
            if len(warm) != len(replicas):
                raise RuntimeError("the big image did not reach every replica\n" + daemon.describe())
            single, single_cpu = {}, {}
            for tool in ("crossdock", "skopeo"):
                with registry.Registry(name=f"single-{tool}") as one:
                    procs = {"primary": primary.proc.pid, "target": one.proc.pid}
                    before = cpu_of(procs)
                    one_host = reachable(one)[1]
                    if tool == "crossdock":
                        cmd = [os.environ["CROSSDOCK_BIN"], "mirror", f"{primary.host}/big", f"{one_host}/big",
                               "--insecure", "--quiet"]
                    else:
                        cmd = ["skopeo", "copy", "--src-tls-verify=false", "--dest-tls-verify=false",
                               f"docker://{primary.host}/{repo}:v1", f"docker://{one_host}/{repo}:v1"]
                    rc, wall, _, tool_cpu, _ = timed(cmd, 1800, os.devnull)
                    ok = rc == 0 and check.manifest_digest(RegistryClient(one.host), repo, "v1") == digest
                    single[tool] = round(wall, 2) if ok else None
                    after = cpu_of(procs)
                    single_cpu[tool] = {k: round(after[k] - before[k], 2) for k in procs}
                    single_cpu[tool][tool] = round(tool_cpu, 2)
            # The measured push: the same content under a new tag would be mounted, not copied,
            # so the replicas get fresh registries' worth of work: a second big image.
            spec2 = bigcorpus.Spec(repos=1, bases=1, base_size=a.big_mib * MiB, runtimes=1, runtime_size=MiB,
                                   app_size=MiB, namespace="big2", tags=("v1",), seed=spec.seed + 1)
            desc2 = bigcorpus.generate(sc, spec2, log=lambda *_: None)
            repo2, digest2 = desc2["tags"][0]["repository"], desc2["tags"][0]["digest"]
            procs = {"primary": primary.proc.pid, "crossdock serve": daemon.pid,
                     **{r.name: r.proc.pid for r in replicas}}
            skopeo_copy(f"{staging.host}/{repo2}:v1", f"{primary.host}/{repo2}:v1")
            before = cpu_of(procs)
            t0 = time.monotonic()
            got = time_to_replicas(replicas, repo2, "v1", digest2, t0, a.timeout * 10, poll_s=0.05)
            after = cpu_of(procs)
            if len(got) != len(replicas):
                raise RuntimeError("the big image did not reach every replica\n" + daemon.describe())
            all_s = max(got.values())
            results["big"] = {"to_each_s": {k: round(v, 2) for k, v in sorted(got.items())},
                              "to_all_s": round(all_s, 2), "single_copy_s": single,
                              "cpu_s": {k: round(after[k] - before[k], 2) for k in procs},
                              "single_copy_cpu_s": single_cpu, "cpus": os.cpu_count(),
                              "ratio_vs_single_crossdock": round(all_s / single["crossdock"], 2)
                              if single.get("crossdock") else None,
                              "ratio_vs_single_skopeo": round(all_s / single["skopeo"], 2)
                              if single.get("skopeo") else None}
            print(json.dumps(results["big"]), flush=True)
    finally:
        daemon.stop()
        for w in links:
            w.stop()
        for r in regs:
            r.stop()

    where = (f"each behind its own {a.replica_link} link, {a.replica_delay_ms:g} ms one way"
             if a.replica_link else "loopback")
    print(f"\n{a.pushes} small pushes to the primary, {a.replicas} replicas ({where}):\n")
    print("| measure | p50 ms | p99 ms | max ms | mean ms |\n|---|---:|---:|---:|---:|")
    for k, label in (("per_replica_ms", "push done -> pullable on a replica"),
                     ("all_ms", "push done -> pullable on every replica")):
        s = results["small"][k]
        print(f"| {label} | {s['p50']} | {s['p99']} | {s['max']} | {s['mean']} |")
    if "big" in results:
        b = results["big"]
        print(f"\n{a.big_mib} MiB image: to every replica {b['to_all_s']} s; a single copy primary -> one registry: "
              f"crossdock mirror {b['single_copy_s'].get('crossdock')} s, skopeo copy {b['single_copy_s'].get('skopeo')} s; "
              f"ratio {b['ratio_vs_single_crossdock']} (vs crossdock), {b['ratio_vs_single_skopeo']} (vs skopeo)")
        total = sum(b["cpu_s"].values())
        one = sum(b["single_copy_cpu_s"].get("crossdock", {}).values())
        print(f"CPU seconds while replicating: {b['cpu_s']} = {total:.1f} s on {b['cpus']} CPUs "
              f"(at least {total / b['cpus']:.1f} s of wall time); single crossdock copy: "
              f"{b['single_copy_cpu_s'].get('crossdock')} = {one:.1f} s (at least {one / b['cpus']:.1f} s)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
