"""Independent checks of what a registry holds (registry HTTP API and skopeo).

Everything here talks to the registry directly (corpus.RegistryClient) or
through skopeo; nothing goes through crossdock.
"""

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import urllib.parse

from corpus import ACCEPT_ALL, INDEX_TYPES, RegistryClient, sha256_digest

SKOPEO = os.environ.get("SKOPEO_BIN", "skopeo")
SKOPEO_TIMEOUT = 60

_LINK_RE = re.compile(r'<([^>]*)>\s*;\s*rel="?next"?')


def _next_link(resp):
    link = resp.headers.get("Link")
    if not link:
        return None
    m = _LINK_RE.search(link)
    return m.group(1) if m else None


def _paged(client, first_path, key):
    """Follow RFC 5988 Link: <...>; rel="next" (relative in distribution 2.8)."""
    out, path, pages = [], first_path, 0
    while path:
        pages += 1
        if pages > 10000:
            raise RuntimeError(f"pagination of {first_path} does not end")
        r = client.request("GET", path, ok=(200, 404))
        if r.status == 404:
            return None
        out += r.json().get(key) or []
        nxt = _next_link(r)
        # A relative Link resolves against the URL that was just fetched.
        path = urllib.parse.urljoin(r.url, nxt) if nxt else None
    return out


def catalog(client, page_size=None):
    """All repository names of the registry (follows Link pagination)."""
    q = f"?n={page_size}" if page_size else ""
    return _paged(client, f"/v2/_catalog{q}", "repositories") or []


def tags(client, repo, page_size=None):
    """Tags of ``repo``, sorted; [] if the repository does not exist."""
    q = f"?n={page_size}" if page_size else ""
    return sorted(_paged(client, f"/v2/{repo}/tags/list{q}", "tags") or [])


class ManifestInfo:
    def __init__(self, digest, media_type, body):
        self.digest, self.media_type, self.body = digest, media_type, body

    def json(self):
        import json
        return json.loads(self.body)

    def __repr__(self):
        return f"ManifestInfo({self.digest}, {self.media_type}, {len(self.body)} bytes)"


def manifest(client, repo, ref):
    """GET a manifest with every Accept type.  Returns ManifestInfo (digest =
    sha256 of the raw bytes, cross-checked against Docker-Content-Digest), or
    None if the registry answers 404."""
    r = client.get_manifest(repo, ref, accept=ACCEPT_ALL)
    if r is None:
        return None
    digest = sha256_digest(r.body)
    header = r.headers.get("Docker-Content-Digest")
    if header and header != digest:
        raise AssertionError(
            f"{repo}@{ref}: Docker-Content-Digest {header} != sha256 of body {digest}")
    if ref.startswith("sha256:") and ref != digest:
        raise AssertionError(f"{repo}@{ref}: body hashes to {digest}")
    ct = (r.headers.get("Content-Type") or "").split(";")[0].strip()
    return ManifestInfo(digest, ct, r.body)


def manifest_digest(client, repo, ref):
    info = manifest(client, repo, ref)
    return info.digest if info else None


def referenced(info):
    """(child manifest digests, blob digests) referenced by a manifest."""
    doc = info.json()
    if info.media_type in INDEX_TYPES or "manifests" in doc:
        return [m["digest"] for m in doc.get("manifests", [])], []
    blobs = []
    if doc.get("config"):
        blobs.append(doc["config"]["digest"])
    blobs += [layer["digest"] for layer in doc.get("layers", [])]
    return [], blobs


def missing_content(client, repo, ref):
    """Walk a manifest (and children) on the registry; return a list of
    human-readable problems (empty list = complete)."""
    problems = []
    info = manifest(client, repo, ref)
    if info is None:
        return [f"{repo}@{ref}: manifest missing"]
    children, blobs = referenced(info)
    for b in blobs:
        if not client.blob_exists(repo, b):
            problems.append(f"{repo}@{ref}: blob {b} missing")
    for c in children:
        problems += missing_content(client, repo, c)
    return problems


# --------------------------------------------------------------------------
# skopeo
# --------------------------------------------------------------------------

def skopeo_available():
    return shutil.which(SKOPEO) is not None


def _skopeo_env():
    env = dict(os.environ)
    for k in list(env):
        if k.lower() in ("http_proxy", "https_proxy", "all_proxy", "no_proxy") \
                or k in ("REGISTRY_AUTH_FILE", "DOCKER_CONFIG"):
            env.pop(k)
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


def skopeo(args, timeout=SKOPEO_TIMEOUT):
    """Run skopeo; returns CompletedProcess (stdout as bytes)."""
    return subprocess.run([SKOPEO] + list(args), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=timeout, env=_skopeo_env())


def _skopeo_transport_args(creds=None, cert_dir=None):
    args = []
    if cert_dir:
        args += ["--cert-dir", cert_dir]
    else:
        args += ["--tls-verify=false"]
    if creds:
        args += ["--creds", creds]
    return args


def skopeo_raw(host, repo, ref, creds=None, cert_dir=None):
    """`skopeo inspect --raw` -> the manifest bytes exactly as served."""
    sep = "@" if ref.startswith("sha256:") else ":"
    r = skopeo(["inspect", "--raw"] + _skopeo_transport_args(creds, cert_dir)
               + [f"docker://{host}/{repo}{sep}{ref}"])
    if r.returncode != 0:
        raise AssertionError(f"skopeo inspect --raw {host}/{repo}{sep}{ref} failed: "
                             f"{r.stderr.decode(errors='replace')}")
    return r.stdout


def skopeo_raw_digest(host, repo, ref, creds=None, cert_dir=None):
    return "sha256:" + hashlib.sha256(skopeo_raw(host, repo, ref, creds, cert_dir)).hexdigest()


def skopeo_inspect(host, repo, ref, creds=None, cert_dir=None):
    """`skopeo inspect` (parses manifest+config) -> dict."""
    import json
    sep = "@" if ref.startswith("sha256:") else ":"
    r = skopeo(["inspect"] + _skopeo_transport_args(creds, cert_dir)
               + [f"docker://{host}/{repo}{sep}{ref}"])
    if r.returncode != 0:
        raise AssertionError(f"skopeo inspect {host}/{repo}{sep}{ref} failed: "
                             f"{r.stderr.decode(errors='replace')}")
    return json.loads(r.stdout)


def skopeo_copy_verify(host, repo, ref, creds=None, cert_dir=None, all_images=True):
    """Pull an image with skopeo into a throw-away OCI layout; skopeo checks
    every blob's digest on the way.  Raises AssertionError on failure."""
    d = tempfile.mkdtemp(prefix="crossdock-skopeo-")
    try:
        sep = "@" if ref.startswith("sha256:") else ":"
        src_args = []
        if cert_dir:
            src_args += ["--src-cert-dir", cert_dir]
        else:
            src_args += ["--src-tls-verify=false"]
        if creds:
            src_args += ["--src-creds", creds]
        pol = os.path.join(d, "policy.json")
        with open(pol, "w") as f:
            f.write('{"default":[{"type":"insecureAcceptAnything"}]}')
        r = skopeo(["--policy", pol, "copy", "-q"] + (["--all"] if all_images else [])
                   + src_args + [f"docker://{host}/{repo}{sep}{ref}",
                                 f"oci:{d}/layout:x"], timeout=120)
        if r.returncode != 0:
            raise AssertionError(f"skopeo copy {host}/{repo}{sep}{ref} failed: "
                                 f"{r.stderr.decode(errors='replace')}")
    finally:
        shutil.rmtree(d, ignore_errors=True)


__all__ = ["catalog", "tags", "manifest", "manifest_digest", "missing_content",
           "referenced", "skopeo_raw", "skopeo_raw_digest", "skopeo_inspect",
           "skopeo_copy_verify", "skopeo_available", "RegistryClient"]
