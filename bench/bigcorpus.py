#!/usr/bin/env python3
"""A big, deterministic benchmark corpus, streamed straight into a registry.

tests/integration/corpus.py builds every blob in memory (fine for its few MiB);
this one generates each layer on the fly and streams it to the registry
(POST, one PATCH with a known Content-Length, PUT ?digest=), so a corpus of
several GiB costs a few MiB of memory.  Registry access reuses
corpus.RegistryClient (POST, manifests, mounts, checks); only the streaming
PATCH uses http.client directly.

Layout (``Spec``): R repositories NS/team-X/svc-NN, each with tags v1, v2 and
latest (= v2).  Every image has four layers:

    base-K      one of B big base layers, shared by R/B repositories
    runtime-K   one of M mid layers, shared by R/M repositories
    app-<repo>-<tag>   unique per repository and tag
    etc-<repo>-<tag>   a small unique layer (4-200 KiB)

Even repositories use OCI manifests, odd ones Docker schema2.  A base layer is
uploaded once and then mounted (POST ?mount=&from=) into the other
repositories, as a registry would hold it after real pushes.

Layers are real tar+gzip streams: a tar holding one file of pseudo-random
bytes (SHAKE-128 of seed, label and block index: incompressible and
deterministic), wrapped in gzip with stored (level 0) deflate blocks, written
directly (zlib's level 0 is 3x slower).  Configs carry the matching diff_ids,
so the images are valid for skopeo & co.

    python3 bench/bigcorpus.py --registry 127.0.0.1:5000 [--quick]
"""

import hashlib
import http.client
import json
import os
import struct
import sys
import tarfile
import time
import urllib.parse
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "integration"))

from corpus import (DOCKER_CONFIG, DOCKER_LAYER, DOCKER_MANIFEST,  # noqa: E402
                    OCI_CONFIG, OCI_LAYER, OCI_MANIFEST, RegistryClient, RegistryError,
                    sha256_digest)

KiB = 1024
MiB = 1024 * KiB
BLOCK = 1 * MiB              # generator block
STORED_MAX = 65535           # max payload of one stored deflate block
DEFAULT_SEED = 20240601
CREATED = "2024-01-01T00:00:00Z"
FIXED_MTIME = 1700000000


class Spec:
    """Corpus shape.  sizes are payload bytes (the tar+gzip blob is a few KiB larger)."""

    def __init__(self, repos, bases, base_size, runtimes, runtime_size, app_size,
                 namespace="bench-src", seed=DEFAULT_SEED, tags=("v1", "v2")):
        self.repos, self.bases, self.base_size = repos, bases, base_size
        self.runtimes, self.runtime_size, self.app_size = runtimes, runtime_size, app_size
        self.namespace, self.seed, self.tags = namespace, seed, tuple(tags)

    def to_dict(self):
        return {"repos": self.repos, "bases": self.bases, "base_size": self.base_size,
                "runtimes": self.runtimes, "runtime_size": self.runtime_size,
                "app_size": self.app_size, "namespace": self.namespace,
                "seed": self.seed, "tags": list(self.tags)}

    def repo_names(self):
        teams = "abcd"
        return [f"team-{teams[i % len(teams)]}/svc-{i:02d}" for i in range(self.repos)]


# Full benchmark: 32 repos; 4 x 64 MiB bases, 8 x 32 MiB runtimes, 2 x 16 MiB app layers
# per repo -> 256 + 256 + 1024 MiB = 1.5 GiB of unique layer bytes (+ small layers).
FULL = Spec(repos=32, bases=4, base_size=64 * MiB, runtimes=8, runtime_size=32 * MiB,
            app_size=16 * MiB)
# Quick smoke: 6 repos; 2 x 16 MiB, 3 x 8 MiB, 2 x 4 MiB per repo -> ~104 MiB.
QUICK = Spec(repos=6, bases=2, base_size=16 * MiB, runtimes=3, runtime_size=8 * MiB,
             app_size=4 * MiB)


# --------------------------------------------------------------------------
# Layer streams
# --------------------------------------------------------------------------

def _payload(seed, label, size):
    """Pseudo-random, incompressible, deterministic bytes, in blocks of BLOCK."""
    done, i = 0, 0
    while done < size:
        n = min(BLOCK, size - done)
        yield hashlib.shake_128(f"{seed}:{label}:{i}".encode()).digest(n)
        done += n
        i += 1


def _tar_header(label, size):
    ti = tarfile.TarInfo(f"crossdock-bench/{label}.bin")
    ti.size, ti.mtime, ti.mode = size, FIXED_MTIME, 0o644
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = "root"
    return ti.tobuf(format=tarfile.USTAR_FORMAT)


def tar_size(size):
    return 512 + (size + 511) // 512 * 512 + 1024


def gz_size(tsize):
    """Size of the stored-deflate gzip stream of a tsize-byte input."""
    blocks = (tsize + STORED_MAX - 1) // STORED_MAX
    return 10 + tsize + 5 * blocks + 5 + 8


class LayerStream:
    """Iterates the tar+gzip bytes of one layer; digest/diff_id are set at the end."""

    GZ_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # no name, mtime 0, OS unknown

    def __init__(self, seed, label, size):
        self.seed, self.label, self.size = seed, label, size
        self.tar_bytes = tar_size(size)
        self.gz_bytes = gz_size(self.tar_bytes)
        self.digest = self.diff_id = None

    def _tar_pieces(self):
        yield _tar_header(self.label, self.size)
        yield from _payload(self.seed, self.label, self.size)
        pad = (512 - self.size % 512) % 512
        yield b"\0" * (pad + 1024)

    def __iter__(self):
        tar_sha, gz_sha = hashlib.sha256(), hashlib.sha256()
        crc, total, sent = 0, 0, 0
        carry = b""
        gz_sha.update(self.GZ_HEADER)
        yield self.GZ_HEADER
        sent += len(self.GZ_HEADER)
        for piece in self._tar_pieces():
            tar_sha.update(piece)
            crc = zlib.crc32(piece, crc)
            total += len(piece)
            data = carry + piece if carry else piece
            mv = memoryview(data)
            full = len(data) // STORED_MAX * STORED_MAX
            out = []
            for off in range(0, full, STORED_MAX):
                out.append(b"\x00\xff\xff\x00\x00")   # not final, stored, LEN=65535, NLEN
                out.append(mv[off:off + STORED_MAX])
            carry = bytes(mv[full:])
            if out:
                chunk = b"".join(out)
                gz_sha.update(chunk)
                sent += len(chunk)
                yield chunk
        tail = []
        if carry:
            n = len(carry)
            tail.append(b"\x00" + struct.pack("<HH", n, n ^ 0xFFFF) + carry)
        tail.append(b"\x01\x00\x00\xff\xff")             # final, empty stored block
        tail.append(struct.pack("<II", crc & 0xFFFFFFFF, total & 0xFFFFFFFF))
        chunk = b"".join(tail)
        gz_sha.update(chunk)
        sent += len(chunk)
        yield chunk
        if total != self.tar_bytes or sent != self.gz_bytes:
            raise AssertionError(f"{self.label}: size bookkeeping is off "
                                 f"({total}/{self.tar_bytes}, {sent}/{self.gz_bytes})")
        self.diff_id = "sha256:" + tar_sha.hexdigest()
        self.digest = "sha256:" + gz_sha.hexdigest()


# --------------------------------------------------------------------------
# Pushing
# --------------------------------------------------------------------------

def _split(url_or_path, base_url):
    u = urllib.parse.urlsplit(urllib.parse.urljoin(base_url + "/", url_or_path))
    return u.path + (f"?{u.query}" if u.query else "")


def stream_blob(client, repo, stream, timeout=300):
    """Upload an iterable of known total size (stream.gz_bytes) into repo:
    POST (RegistryClient), one streamed PATCH (http.client), PUT ?digest=.
    Returns the digest the stream computed (checked against the registry's)."""
    r = client.request("POST", f"/v2/{repo}/blobs/uploads/", ok=(202,))
    loc = _split(r.headers["Location"], client.base_url)
    netloc = urllib.parse.urlsplit(client.base_url).netloc
    host, _, port = netloc.rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout, blocksize=BLOCK)
    try:
        conn.putrequest("PATCH", loc, skip_accept_encoding=True)
        conn.putheader("Content-Type", "application/octet-stream")
        conn.putheader("Content-Length", str(stream.gz_bytes))
        if client.auth_header:
            conn.putheader("Authorization", client.auth_header)
        conn.endheaders()
        for chunk in stream:
            conn.send(chunk)
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 202:
            raise RegistryError("PATCH", loc, resp.status, body)
        loc = _split(resp.getheader("Location"), client.base_url)
    finally:
        conn.close()
    sep = "&" if "?" in loc else "?"
    r = client.request("PUT", f"{loc}{sep}digest={urllib.parse.quote(stream.digest, safe=':')}",
                       data=b"", ok=(201,))
    got = r.headers.get("Docker-Content-Digest")
    if got and got != stream.digest:
        raise RuntimeError(f"registry stored {stream.label} as {got}, expected {stream.digest}")
    return stream.digest


def mount_blob(client, repo, digest, from_repo):
    r = client.request("POST", f"/v2/{repo}/blobs/uploads/?mount={digest}&from={from_repo}",
                       ok=(201, 202))
    if r.status == 202:   # mount refused: cancel the upload session it opened
        loc = _split(r.headers["Location"], client.base_url)
        client.request("DELETE", loc, ok=(204, 404))
        return False
    return True


def _small_layer(seed, label):
    import random
    n = random.Random(f"{seed}:size:{label}").randint(4 * KiB, 200 * KiB)
    return LayerStream(seed, label, n)


def generate(client, spec, log=None):
    """Push the corpus described by ``spec``; returns a description dict
    (tags with manifest digests, unique blobs with a repository holding each)."""
    t0 = time.monotonic()
    layers = {}        # label -> {"digest", "diff_id", "size", "home"}
    blobs = {}         # digest -> {"size", "repo", "kind"}
    tags = []
    pushed_bytes = 0

    def layer(repo, label, size, kind):
        nonlocal pushed_bytes
        info = layers.get(label)
        if info is None:
            s = LayerStream(spec.seed, label, size) if size else _small_layer(spec.seed, label)
            stream_blob(client, repo, s)
            info = layers[label] = {"digest": s.digest, "diff_id": s.diff_id,
                                    "size": s.gz_bytes, "home": repo}
            blobs[s.digest] = {"size": s.gz_bytes, "repo": repo, "kind": kind}
            pushed_bytes += s.gz_bytes
            if log:
                el = time.monotonic() - t0
                log(f"  {label}: {s.gz_bytes / MiB:.1f} MiB "
                    f"({pushed_bytes / MiB / max(el, 1e-6):.0f} MiB/s so far)")
        elif info["home"] != repo:
            if not mount_blob(client, repo, info["digest"], info["home"]):
                raise RuntimeError(f"mount of {label} into {repo} refused")
        return info

    for i, rel in enumerate(spec.repo_names()):
        repo = f"{spec.namespace}/{rel}"
        docker = i % 2 == 1
        lmt = DOCKER_LAYER if docker else OCI_LAYER
        slug = rel.replace("/", "-")
        for tag in spec.tags:
            labels = [(f"base-{i % spec.bases}", spec.base_size, "base"),
                      (f"runtime-{i % spec.runtimes}", spec.runtime_size, "runtime"),
                      (f"app-{slug}-{tag}", spec.app_size, "app"),
                      (f"etc-{slug}-{tag}", 0, "small")]
            infos = [layer(repo, lab, size, kind) for lab, size, kind in labels]
            cfg = {"created": CREATED, "architecture": "amd64", "os": "linux",
                   "config": {"Env": ["PATH=/usr/local/bin:/usr/bin:/bin"],
                              "Cmd": ["/bin/sh"],
                              "Labels": {"org.crossdock.bench": f"{rel}:{tag}"}},
                   "rootfs": {"type": "layers", "diff_ids": [x["diff_id"] for x in infos]},
                   "history": [{"created": CREATED, "created_by": f"layer {lab}"}
                               for lab, _, _ in labels]}
            cfg_bytes = json.dumps(cfg, indent=2).encode()
            cfg_digest = client.push_blob(repo, cfg_bytes)
            blobs[cfg_digest] = {"size": len(cfg_bytes), "repo": repo, "kind": "config"}
            mt = DOCKER_MANIFEST if docker else OCI_MANIFEST
            doc = {"schemaVersion": 2, "mediaType": mt,
                   "config": {"mediaType": DOCKER_CONFIG if docker else OCI_CONFIG,
                              "digest": cfg_digest, "size": len(cfg_bytes)},
                   "layers": [{"mediaType": lmt, "digest": x["digest"], "size": x["size"]}
                              for x in infos]}
            body = (json.dumps(doc, indent=3) + "\n").encode()
            digest = client.put_manifest(repo, tag, body, mt)
            tags.append({"repository": repo, "relative": rel, "tag": tag, "digest": digest})
            if tag == spec.tags[-1]:
                client.put_manifest(repo, "latest", body, mt)
                tags.append({"repository": repo, "relative": rel, "tag": "latest",
                             "digest": digest})
    elapsed = time.monotonic() - t0
    desc = {"spec": spec.to_dict(), "tags": tags, "blobs": blobs,
            "unique_blob_bytes": sum(b["size"] for b in blobs.values()),
            "unique_blobs": len(blobs),
            "layer_bytes": sum(b["size"] for b in blobs.values() if b["kind"] != "config"),
            "generate_seconds": round(elapsed, 2)}
    if log:
        log(f"corpus: {len(tags)} tags in {spec.repos} repositories, {len(blobs)} unique blobs, "
            f"{desc['unique_blob_bytes'] / MiB:.1f} MiB, pushed in {elapsed:.1f}s "
            f"({desc['unique_blob_bytes'] / MiB / max(elapsed, 1e-6):.0f} MiB/s)")
    return desc


def present(client, desc):
    """True if every tag of a description is on the registry with its digest
    (used to reuse a cached corpus)."""
    for t in desc["tags"]:
        r = client.get_manifest(t["repository"], t["tag"], method="HEAD")
        if r is None or r.headers.get("Docker-Content-Digest") != t["digest"]:
            return False
    return True


def main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--registry", required=True, help="host:port of a plain-HTTP registry")
    ap.add_argument("--quick", action="store_true", help="~100 MiB instead of ~1.5 GiB")
    ap.add_argument("--namespace", default="bench-src")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--json", metavar="FILE", help="write the description here")
    a = ap.parse_args(argv)
    base = QUICK if a.quick else FULL
    spec = Spec(base.repos, base.bases, base.base_size, base.runtimes, base.runtime_size,
                base.app_size, namespace=a.namespace, seed=a.seed)
    desc = generate(RegistryClient(a.registry), spec,
                    log=lambda s: print(s, file=sys.stderr, flush=True))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(desc, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
