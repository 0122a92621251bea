#!/usr/bin/env python3
"""Deterministic test corpus for crossdock, pushed with a minimal HTTP client.

The client (``RegistryClient``) speaks the distribution API with urllib only:
monolithic blob uploads (POST, then PUT with the whole body and a
Content-Length), manifest PUT/GET/DELETE, Basic auth (sent pre-emptively) and
TLS with a custom CA file.  It shares no code with crossdock.

Default layout under NAMESPACE (``build_corpus``):

    NS/team-a/web       v1, v2, latest (= v2)          OCI image manifests
    NS/team-a/api       v1, 1.0.0 (= v1)               OCI image manifest
    NS/team-b/worker    multi (OCI index amd64+arm64), v1
    NS/legacy/app       v2 (Docker schema2), list (Docker manifest list)
    NS/charts/mychart   0.1.0                          Helm chart (OCI artifact)
    other/thing         v1        (outside the namespace: must never be mirrored)

Every image uses the same BASE layer (``Corpus.base_layer``), so a mirror
into one target can mount it from repository to repository.  Layers are real
(deterministic) tar+gzip streams of pseudo-random bytes; configs carry the
matching diff_ids, so the images are valid for skopeo & co.

CLI (for README quick-start and benchmarks):

    python3 corpus.py --registry 127.0.0.1:5000 --namespace src-ns [--big]
"""

import base64
import gzip
import hashlib
import io
import json
import random
import re
import ssl
import sys
import tarfile
import urllib.error
import urllib.parse
import urllib.request

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
HELM_CONFIG = "application/vnd.cncf.helm.config.v1+json"
HELM_LAYER = "application/vnd.cncf.helm.chart.content.v1.tar+gzip"

MANIFEST_TYPES = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
ACCEPT_ALL = ", ".join(MANIFEST_TYPES)

KiB = 1024
MiB = 1024 * 1024
DEFAULT_SEED = 20240601
BIG_LAYER_SIZE = 20 * MiB


def sha256_digest(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------
# Minimal registry HTTP client
# --------------------------------------------------------------------------

class RegistryError(RuntimeError):
    def __init__(self, method, url, status, body):
        self.method, self.url, self.status, self.body = method, url, status, body
        text = body[:500].decode("utf-8", "replace") if body else ""
        super().__init__(f"{method} {url} -> HTTP {status}: {text}")


class Response:
    def __init__(self, status, headers, body, url):
        self.status, self.headers, self.body, self.url = status, headers, body, url

    def json(self):
        return json.loads(self.body.decode("utf-8"))


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Follow redirects only for GET/HEAD (blob downloads), never for writes."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if req.get_method() not in ("GET", "HEAD"):
            return None
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class RegistryClient:
    """Tiny distribution-API client.  base_url e.g. "http://127.0.0.1:5000"."""

    def __init__(self, base_url, username=None, password=None, ca_file=None,
                 insecure=False, timeout=60):
        if "://" not in base_url:
            base_url = "http://" + base_url
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.auth_header = None
        if username is not None:
            tok = base64.b64encode(f"{username}:{password}".encode()).decode()
            self.auth_header = "Basic " + tok
        ctx = None
        if self.base_url.startswith("https://"):
            if insecure:
                ctx = ssl._create_unverified_context()
            else:
                ctx = ssl.create_default_context(cafile=ca_file)
        handlers = [urllib.request.ProxyHandler({}), _NoRedirect()]
        if ctx is not None:
            handlers.append(urllib.request.HTTPSHandler(context=ctx))
        self._opener = urllib.request.build_opener(*handlers)

    @property
    def host(self):
        return urllib.parse.urlsplit(self.base_url).netloc

    # -- raw request -------------------------------------------------------
    def request(self, method, path_or_url, data=None, headers=None, ok=None):
        """Perform one request; returns Response.  Raises RegistryError when
        the status is not in ``ok`` (default: any 2xx)."""
        url = urllib.parse.urljoin(self.base_url + "/", path_or_url)
        hdrs = dict(headers or {})
        if self.auth_header:
            hdrs.setdefault("Authorization", self.auth_header)
        if data is not None or method in ("POST", "PUT", "PATCH"):
            data = data if data is not None else b""
            hdrs["Content-Length"] = str(len(data))
        req = urllib.request.Request(url, data=data, method=method, headers=hdrs)
        try:
            with self._opener.open(req, timeout=self.timeout) as r:
                resp = Response(r.status, r.headers, r.read(), r.geturl())
        except urllib.error.HTTPError as e:
            body = e.read() if e.fp is not None else b""
            resp = Response(e.code, e.headers, body, url)
        good = (200 <= resp.status < 300) if ok is None else resp.status in ok
        if not good:
            raise RegistryError(method, url, resp.status, resp.body)
        return resp

    # -- API ----------------------------------------------------------------
    def ping(self):
        return self.request("GET", "/v2/").status

    def blob_exists(self, repo, digest):
        r = self.request("HEAD", f"/v2/{repo}/blobs/{digest}", ok=(200, 404))
        return r.status == 200

    def get_blob(self, repo, digest):
        return self.request("GET", f"/v2/{repo}/blobs/{digest}").body

    def push_blob(self, repo, data, digest=None):
        """Monolithic upload: POST to open an upload, PUT the whole blob."""
        digest = digest or sha256_digest(data)
        r = self.request("POST", f"/v2/{repo}/blobs/uploads/", ok=(202,))
        loc = r.headers.get("Location")
        if not loc:
            raise RuntimeError(f"no Location in upload response for {repo}")
        loc = urllib.parse.urljoin(self.base_url + "/", loc)
        sep = "&" if "?" in loc else "?"
        put_url = f"{loc}{sep}digest={urllib.parse.quote(digest, safe=':')}"
        r = self.request("PUT", put_url, data=data,
                         headers={"Content-Type": "application/octet-stream"},
                         ok=(201,))
        got = r.headers.get("Docker-Content-Digest")
        if got and got != digest:
            raise RuntimeError(f"registry stored blob as {got}, expected {digest}")
        return digest

    def put_manifest(self, repo, ref, body, media_type):
        digest = sha256_digest(body)
        r = self.request("PUT", f"/v2/{repo}/manifests/{ref}", data=body,
                         headers={"Content-Type": media_type}, ok=(201,))
        got = r.headers.get("Docker-Content-Digest")
        if got and got != digest:
            raise RuntimeError(f"registry stored manifest as {got}, expected {digest}")
        return digest

    def get_manifest(self, repo, ref, accept=ACCEPT_ALL, method="GET"):
        """Response for the manifest, or None if the registry says 404."""
        r = self.request(method, f"/v2/{repo}/manifests/{ref}",
                         headers={"Accept": accept}, ok=(200, 404))
        return None if r.status == 404 else r

    def delete_manifest(self, repo, digest):
        self.request("DELETE", f"/v2/{repo}/manifests/{digest}", ok=(202,))


# --------------------------------------------------------------------------
# Corpus model
# --------------------------------------------------------------------------

class Blob:
    def __init__(self, data, media_type, label):
        self.data = data
        self.media_type = media_type
        self.label = label
        self.digest = sha256_digest(data)
        self.size = len(data)

    def descriptor(self, media_type=None):
        return {"mediaType": media_type or self.media_type,
                "digest": self.digest, "size": self.size}


class Manifest:
    """A manifest (image, artifact or index) with its exact bytes."""

    def __init__(self, doc, media_type, blobs=(), children=(), kind="image"):
        self.body = (json.dumps(doc, indent=3) + "\n").encode()
        self.media_type = media_type
        self.digest = sha256_digest(self.body)
        self.size = len(self.body)
        self.blobs = list(blobs)          # config + layers (images only)
        self.children = list(children)    # Manifests (indexes only)
        self.kind = kind                  # "image" | "helm"

    def all_blobs(self):
        seen = {}
        for b in self.blobs:
            seen[b.digest] = b
        for c in self.children:
            for b in c.all_blobs():
                seen[b.digest] = b
        return list(seen.values())

    def all_manifests(self):
        """This manifest and every child (children first)."""
        out = []
        for c in self.children:
            out += c.all_manifests()
        out.append(self)
        return out

    def total_bytes(self):
        return (sum(m.size for m in self.all_manifests())
                + sum(b.size for b in self.all_blobs()))


class TagEntry:
    def __init__(self, repository, relative, tag, manifest):
        self.repository = repository      # full path on the source registry
        self.relative = relative          # path below the namespace, or None
        self.tag = tag
        self.manifest = manifest

    digest = property(lambda self: self.manifest.digest)
    media_type = property(lambda self: self.manifest.media_type)
    type = property(lambda self: self.manifest.kind)

    def to_dict(self):
        m = self.manifest
        return {"repository": self.repository, "relative": self.relative,
                "tag": self.tag, "digest": m.digest, "media_type": m.media_type,
                "type": m.kind, "children": [c.digest for c in m.children],
                "blobs": [b.digest for b in m.all_blobs()],
                "bytes": m.total_bytes()}


class Corpus:
    def __init__(self, namespace):
        self.namespace = namespace.strip("/")
        self.entries = []                 # TagEntry, push order
        self.base_layer = None            # Blob shared by (almost) every image
        self.big_layer = None

    # -- construction --------------------------------------------------------
    def add(self, relative, tag, manifest, outside=False):
        repo = relative if outside else f"{self.namespace}/{relative}"
        self.entries.append(TagEntry(repo, None if outside else relative, tag, manifest))

    # -- queries -------------------------------------------------------------
    def in_namespace(self):
        return [e for e in self.entries if e.relative is not None]

    def outside(self):
        return [e for e in self.entries if e.relative is None]

    def select(self, repo_re=None, tag_re=None, type_=None):
        """In-namespace entries that a mirror with these filters would copy
        (full-match semantics, like crossdock's --repo/--tag/--type)."""
        out = []
        for e in self.in_namespace():
            if repo_re is not None and not re.fullmatch(repo_re, e.relative):
                continue
            if tag_re is not None and not re.fullmatch(tag_re, e.tag):
                continue
            if type_ not in (None, "all") and e.type != type_:
                continue
            out.append(e)
        return out

    def repositories(self, entries=None):
        entries = self.in_namespace() if entries is None else entries
        return sorted({e.relative for e in entries})

    def tags(self, relative):
        return sorted(e.tag for e in self.in_namespace() if e.relative == relative)

    def entry(self, relative, tag):
        for e in self.in_namespace():
            if e.relative == relative and e.tag == tag:
                return e
        raise KeyError(f"{relative}:{tag}")

    def all_blobs(self, entries=None):
        seen = {}
        for e in (self.entries if entries is None else entries):
            for b in e.manifest.all_blobs():
                seen[b.digest] = b
        return seen

    def to_dict(self):
        return {"namespace": self.namespace,
                "base_layer": self.base_layer.digest if self.base_layer else None,
                "big_layer": self.big_layer.digest if self.big_layer else None,
                "tags": [e.to_dict() for e in self.entries]}

    # -- pushing -------------------------------------------------------------
    def push(self, client):
        """Push every entry (blobs, children, then the tagged manifest)."""
        done_blobs = set()
        done_manifests = set()
        for e in self.entries:
            push_manifest_tree(client, e.repository, e.manifest, e.tag,
                               done_blobs, done_manifests)
        return self


def push_manifest_tree(client, repo, manifest, tag=None, done_blobs=None,
                       done_manifests=None):
    """Push a manifest with everything it references into ``repo``;
    tag it with ``tag`` (or push by digest if tag is None)."""
    done_blobs = set() if done_blobs is None else done_blobs
    done_manifests = set() if done_manifests is None else done_manifests
    for b in manifest.blobs:
        if (repo, b.digest) not in done_blobs:
            client.push_blob(repo, b.data, b.digest)
            done_blobs.add((repo, b.digest))
    for c in manifest.children:
        if (repo, c.digest) not in done_manifests:
            push_manifest_tree(client, repo, c, None, done_blobs, done_manifests)
    ref = tag if tag is not None else manifest.digest
    client.put_manifest(repo, ref, manifest.body, manifest.media_type)
    done_manifests.add((repo, manifest.digest))
    return manifest.digest


# --------------------------------------------------------------------------
# Deterministic content
# --------------------------------------------------------------------------

FIXED_MTIME = 1700000000
CREATED = "2024-01-01T00:00:00Z"


class Builder:
    def __init__(self, seed=DEFAULT_SEED, min_size=4 * KiB, max_size=2 * MiB):
        self.seed = seed
        self.min_size = min_size
        self.max_size = max_size
        self._layers = {}

    def rng(self, label):
        return random.Random(f"{self.seed}:{label}")

    def size_for(self, label):
        """Log-uniform size between min_size and max_size, fixed per label."""
        r = self.rng("size:" + label)
        lo, hi = self.min_size, max(self.min_size, self.max_size)
        return int(round(lo * (hi / lo) ** r.random()))

    @staticmethod
    def _tar(files):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
            for name, data in files:
                ti = tarfile.TarInfo(name)
                ti.size = len(data)
                ti.mtime = FIXED_MTIME
                ti.mode = 0o644
                ti.uid = ti.gid = 0
                ti.uname = ti.gname = "root"
                tf.addfile(ti, io.BytesIO(data))
        return buf.getvalue()

    @staticmethod
    def _gzip(data, level):
        return gzip.compress(data, compresslevel=level, mtime=0)

    def layer(self, label, size=None, media_type=OCI_LAYER):
        """A tar+gzip layer holding one file of ``size`` pseudo-random bytes.
        Returns (Blob, diff_id).  Same label -> same bytes."""
        if label not in self._layers:
            size = self.size_for(label) if size is None else size
            payload = self.rng("data:" + label).randbytes(size)
            tar = self._tar([(f"crossdock/{label}.bin", payload)])
            # Random bytes do not compress: level 0 keeps it fast and valid.
            gz = self._gzip(tar, 0)
            self._layers[label] = (gz, sha256_digest(tar))
        gz, diff_id = self._layers[label]
        return Blob(gz, media_type, label), diff_id

    def image(self, label, layer_labels, arch="amd64", docker=False, sizes=None):
        """An image manifest (OCI, or Docker schema2 if docker=True)."""
        sizes = sizes or {}
        lmt = DOCKER_LAYER if docker else OCI_LAYER
        layers, diff_ids = [], []
        for ll in layer_labels:
            b, d = self.layer(ll, sizes.get(ll), lmt)
            layers.append(b)
            diff_ids.append(d)
        cfg = {
            "created": CREATED,
            "architecture": arch,
            "os": "linux",
            "config": {"Env": ["PATH=/usr/local/bin:/usr/bin:/bin"],
                       "Cmd": ["/bin/sh"],
                       "Labels": {"org.crossdock.test": label}},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [{"created": CREATED, "created_by": f"layer {ll}"}
                        for ll in layer_labels],
        }
        if arch == "arm64":
            cfg["variant"] = "v8"
        cfg_blob = Blob(json.dumps(cfg, indent=2).encode(),
                        DOCKER_CONFIG if docker else OCI_CONFIG, "config:" + label)
        doc = {"schemaVersion": 2,
               "mediaType": DOCKER_MANIFEST if docker else OCI_MANIFEST,
               "config": cfg_blob.descriptor(),
               "layers": [b.descriptor(lmt) for b in layers]}
        if not docker:
            doc["annotations"] = {"org.opencontainers.image.title": label,
                                  "org.opencontainers.image.created": CREATED}
        return Manifest(doc, DOCKER_MANIFEST if docker else OCI_MANIFEST,
                        [cfg_blob] + layers)

    def index(self, children, docker=False):
        """An OCI index (or Docker manifest list) of (Manifest, arch) pairs."""
        entries = []
        for m, arch in children:
            plat = {"architecture": arch, "os": "linux"}
            if arch == "arm64":
                plat["variant"] = "v8"
            entries.append({"mediaType": m.media_type, "digest": m.digest,
                            "size": m.size, "platform": plat})
        mt = DOCKER_LIST if docker else OCI_INDEX
        doc = {"schemaVersion": 2, "mediaType": mt, "manifests": entries}
        return Manifest(doc, mt, children=[m for m, _ in children])

    def helm_chart(self, name, version):
        chart_yaml = (f"apiVersion: v2\nname: {name}\nversion: {version}\n"
                      f"description: crossdock integration test chart\n"
                      f"type: application\nappVersion: \"1.0.0\"\n").encode()
        values = b"replicaCount: 1\nimage:\n  repository: example/app\n  tag: v1\n"
        tmpl = (b"apiVersion: v1\nkind: ConfigMap\nmetadata:\n"
                b"  name: {{ .Release.Name }}-cfg\ndata:\n  replicas: "
                b"\"{{ .Values.replicaCount }}\"\n")
        tgz = self._gzip(self._tar([(f"{name}/Chart.yaml", chart_yaml),
                                    (f"{name}/values.yaml", values),
                                    (f"{name}/templates/configmap.yaml", tmpl)]), 6)
        layer = Blob(tgz, HELM_LAYER, f"chart:{name}-{version}")
        cfg = {"name": name, "version": version, "apiVersion": "v2",
               "appVersion": "1.0.0", "type": "application",
               "description": "crossdock integration test chart"}
        cfg_blob = Blob(json.dumps(cfg).encode(), HELM_CONFIG, f"chartcfg:{name}")
        doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
               "config": cfg_blob.descriptor(),
               "layers": [layer.descriptor()],
               "annotations": {"org.opencontainers.image.title": name,
                               "org.opencontainers.image.version": version}}
        return Manifest(doc, OCI_MANIFEST, [cfg_blob, layer], kind="helm")


def build_corpus(namespace="src-ns", seed=DEFAULT_SEED, big=False,
                 min_size=4 * KiB, max_size=2 * MiB, base_size=512 * KiB,
                 big_size=BIG_LAYER_SIZE, outside=True):
    """Build (without pushing) the default corpus; see the module docstring."""
    b = Builder(seed, min_size, max_size)
    c = Corpus(namespace)
    sizes = {"base": base_size, "big": big_size}
    base, _ = b.layer("base", base_size)
    c.base_layer = base

    web_v1 = b.image("web-v1", ["base", "web-app-v1"], sizes=sizes)
    web_v2_layers = ["base", "web-app-v2", "web-assets-v2"] + (["big"] if big else [])
    web_v2 = b.image("web-v2", web_v2_layers, sizes=sizes)
    if big:
        c.big_layer = b.layer("big", big_size)[0]
    c.add("team-a/web", "v1", web_v1)
    c.add("team-a/web", "v2", web_v2)
    c.add("team-a/web", "latest", web_v2)

    api_v1 = b.image("api-v1", ["base", "api-app-v1"], sizes=sizes)
    c.add("team-a/api", "v1", api_v1)
    c.add("team-a/api", "1.0.0", api_v1)

    w_amd = b.image("worker-amd64", ["base", "worker-amd64"], arch="amd64", sizes=sizes)
    w_arm = b.image("worker-arm64", ["base-arm64", "worker-arm64"], arch="arm64",
                    sizes=sizes)
    c.add("team-b/worker", "multi", b.index([(w_amd, "amd64"), (w_arm, "arm64")]))
    c.add("team-b/worker", "v1", b.image("worker-v1", ["base", "worker-v1"], sizes=sizes))

    c.add("legacy/app", "v2",
          b.image("legacy-v2", ["base", "legacy-app"], docker=True, sizes=sizes))
    l_amd = b.image("legacy-amd64", ["base", "legacy-amd64"], arch="amd64",
                    docker=True, sizes=sizes)
    l_arm = b.image("legacy-arm64", ["base-arm64", "legacy-arm64"], arch="arm64",
                    docker=True, sizes=sizes)
    c.add("legacy/app", "list", b.index([(l_amd, "amd64"), (l_arm, "arm64")], docker=True))

    c.add("charts/mychart", "0.1.0", b.helm_chart("mychart", "0.1.0"))

    if outside:
        c.add("other/thing", "v1", b.image("thing-v1", ["base", "thing"], sizes=sizes),
              outside=True)
    return c


def push_corpus(client, namespace="src-ns", **kw):
    """Build the default corpus and push it with ``client``; returns the Corpus."""
    return build_corpus(namespace, **kw).push(client)


def push_image(client, repo, tag, label, seed=DEFAULT_SEED, layers=2):
    """Push one small standalone OCI image (e.g. to pre-occupy a target tag).
    Returns its Manifest."""
    b = Builder(seed, 4 * KiB, 64 * KiB)
    m = b.image(label, [f"{label}-l{i}" for i in range(layers)])
    push_manifest_tree(client, repo, m, tag)
    return m


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------

def main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(
        description="push crossdock's deterministic test corpus into a registry")
    ap.add_argument("--registry", required=True,
                    help="host:port (or http(s)://host:port) of the registry")
    ap.add_argument("--namespace", default="src-ns")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--big", action="store_true",
                    help="add a ~20 MiB layer to team-a/web:v2 (streaming)")
    ap.add_argument("--min-size", type=int, default=4 * KiB)
    ap.add_argument("--max-size", type=int, default=2 * MiB)
    ap.add_argument("--no-outside", action="store_true",
                    help="do not push other/thing:v1")
    ap.add_argument("--creds", help="USER:PASS for Basic auth")
    ap.add_argument("--ca-file", help="CA bundle for https registries")
    ap.add_argument("--tls", action="store_true", help="use https://")
    ap.add_argument("--insecure", action="store_true", help="do not verify TLS")
    ap.add_argument("--json", action="store_true", help="print the description as JSON")
    a = ap.parse_args(argv)

    url = a.registry
    if "://" not in url:
        url = ("https://" if (a.tls or a.ca_file) else "http://") + url
    user = pw = None
    if a.creds:
        user, _, pw = a.creds.partition(":")
    client = RegistryClient(url, user, pw, ca_file=a.ca_file, insecure=a.insecure)
    c = push_corpus(client, a.namespace, seed=a.seed, big=a.big,
                    min_size=a.min_size, max_size=a.max_size, outside=not a.no_outside)
    if a.json:
        json.dump(c.to_dict(), sys.stdout, indent=2)
        print()
    else:
        for e in c.entries:
            print(f"{client.host}/{e.repository}:{e.tag}\t{e.digest}\t{e.media_type}"
                  f"\t{e.manifest.total_bytes()}")
        total = sum(b.size for b in c.all_blobs().values())
        print(f"# {len(c.entries)} tags, {len(c.all_blobs())} distinct blobs, "
              f"{total} blob bytes", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
