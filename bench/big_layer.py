#!/usr/bin/env python3
"""One image with one very large layer (default 2 GiB): wall time and peak RSS of crossdock mirror
against skopeo copy, alternating, each into a fresh target registry.

    python3 bench/big_layer.py [--size-mib 2048] [--reps 2]

Memory must stay bounded by buffers, not by the blob: crossdock's peak RSS is the figure to watch.
"""
import argparse
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests", "integration"))

import bigcorpus  # noqa: E402
import check  # noqa: E402
import registry  # noqa: E402
from corpus import RegistryClient  # noqa: E402
from e2e import timed  # noqa: E402

MiB = 1 << 20


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--crossdock", default=os.path.join(HERE, "..", "build", "tools", "crossdock"))
    a = ap.parse_args(argv)
    spec = bigcorpus.Spec(repos=1, bases=1, base_size=a.size_mib * MiB, runtimes=1, runtime_size=MiB,
                          app_size=MiB, namespace="big", tags=("v1",))
    rows = []
    with registry.Registry(name="big-src") as src:
        desc = bigcorpus.generate(RegistryClient(src.host), spec, log=print)
        repo = desc["tags"][0]["repository"]
        for rep in range(1, a.reps + 1):
            for tool in ("crossdock", "skopeo"):
                with registry.Registry(name=f"big-dst-{tool}") as dst, tempfile.NamedTemporaryFile() as lg:
                    if tool == "crossdock":
                        cmd = [a.crossdock, "mirror", f"{src.host}/big", f"{dst.host}/big", "--insecure", "--quiet"]
                    else:
                        cmd = ["skopeo", "copy", "--src-tls-verify=false", "--dest-tls-verify=false",
                               f"docker://{src.host}/{repo}:v1", f"docker://{dst.host}/{repo}:v1"]
                    rc, wall, rss_kib, cpu, _ = timed(cmd, 1800, lg.name)
                    ok = rc == 0 and check.manifest_digest(RegistryClient(dst.host), repo, "v1") == \
                        desc["tags"][0]["digest"]
                    rows.append({"rep": rep, "tool": tool, "rc": rc, "ok": ok, "wall_s": round(wall, 2),
                                 "rss_mib": round(rss_kib / 1024, 1), "cpu_s": round(cpu, 2),
                                 "mib_s": round(desc["unique_blob_bytes"] / MiB / wall, 1)})
                    print(json.dumps(rows[-1]))
    print(f"\n| rep | tool | wall s | MiB/s | peak RSS MiB | CPU s |\n|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['rep']} | {r['tool']}{'' if r['ok'] else ' (FAILED)'} | {r['wall_s']} | {r['mib_s']} "
              f"| {r['rss_mib']} | {r['cpu_s']} |")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
