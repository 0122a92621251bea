"""A small threaded HTTP reverse proxy in front of a (plain HTTP) registry.

It forwards every request unchanged (Host header included, so the registry
builds Location/Link URLs that point back at the proxy) and can make one tag
vanish between listing and copying:

    with VanishingProxy(upstream_registry, repo="src-ns/team-a/web", tag="v1") as px:
        px.host          # "127.0.0.1:PORT", use instead of the registry's host
        ...
        px.vanished.is_set()   # True once the tag has been deleted upstream

Right after the upstream answered GET /v2/<repo>/tags/list for the chosen
repository (the first time), and *before* that answer is relayed to the
client, the proxy resolves <tag> to its digest on the upstream and DELETEs
/v2/<repo>/manifests/<digest>.  So the client sees the tag in the listing, but
the tag is really gone by the time the client can ask for it; there is no race
with a client that fetches manifests on other connections.

Only the standard library is used; traffic goes to 127.0.0.1 only.
"""

import http.client
import http.server
import socketserver
import threading
import urllib.parse

from corpus import ACCEPT_ALL

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
              "te", "trailers", "transfer-encoding", "upgrade", "expect"}
UPSTREAM_TIMEOUT = 60


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class VanishingProxy:
    def __init__(self, upstream, repo=None, tag=None):
        """upstream: a registry.Registry (plain HTTP).  repo/tag: the tag to
        delete after the first tags/list of repo (None: pure pass-through)."""
        if upstream.tls:
            raise ValueError("VanishingProxy supports plain-HTTP upstreams only")
        self.upstream = upstream
        self.repo = repo
        self.tag = tag
        self.vanished = threading.Event()
        self.vanished_digest = None
        self.error = None
        self.requests = []            # (method, path, status) as relayed
        self._lock = threading.Lock()
        self._server = None
        self._thread = None

    @property
    def host(self):
        return f"127.0.0.1:{self._server.server_address[1]}"

    @property
    def url(self):
        return f"http://{self.host}"

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()
        return False

    def start(self):
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt, *args):   # keep test output quiet
                pass

            def _body(self):
                if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                    chunks = []
                    while True:
                        line = self.rfile.readline(65537)
                        size = int(line.split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                                pass
                            break
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline(3)
                    return b"".join(chunks)
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else None

            def _forward(self):
                body = self._body()
                # A list, not a dict: repeated headers (several Accept lines) must survive.
                headers = [(k, v) for k, v in self.headers.items()
                           if k.lower() not in HOP_BY_HOP and k.lower() != "content-length"]
                if body is not None:
                    headers.append(("Content-Length", str(len(body))))
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream.port,
                                                  timeout=UPSTREAM_TIMEOUT)
                try:
                    conn.putrequest(self.command, self.path, skip_host=True,
                                    skip_accept_encoding=True)
                    for k, v in headers:
                        conn.putheader(k, v)
                    conn.endheaders(body)
                    resp = conn.getresponse()
                    data = resp.read() if self.command != "HEAD" else b""
                    status, reason = resp.status, resp.reason
                    rheaders = [(k, v) for k, v in resp.getheaders()
                                if k.lower() not in HOP_BY_HOP]
                finally:
                    conn.close()

                path = urllib.parse.urlsplit(self.path).path
                if (self.command == "GET" and status == 200 and proxy.repo
                        and path == f"/v2/{proxy.repo}/tags/list"):
                    proxy._maybe_vanish()

                self.send_response_only(status, reason)
                has_len = False
                for k, v in rheaders:
                    if k.lower() == "content-length":
                        has_len = True
                        if self.command != "HEAD":
                            v = str(len(data))
                    self.send_header(k, v)
                if not has_len and self.command != "HEAD" and status not in (204, 304):
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if data:
                    self.wfile.write(data)
                self.wfile.flush()
                with proxy._lock:
                    proxy.requests.append((self.command, self.path, status))

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

        self._server = _Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.1},
                                        name="vanishing-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=10)
            self._server = None

    def _maybe_vanish(self):
        with self._lock:
            if self.vanished.is_set() or self.tag is None:
                return
            try:
                client = self.upstream.client()
                r = client.get_manifest(self.repo, self.tag, accept=ACCEPT_ALL, method="HEAD")
                if r is None:
                    raise RuntimeError(f"{self.repo}:{self.tag} not found upstream")
                digest = r.headers.get("Docker-Content-Digest")
                client.delete_manifest(self.repo, digest)
                if client.get_manifest(self.repo, self.tag) is not None:
                    raise RuntimeError(f"{self.repo}:{self.tag} still there after DELETE")
                self.vanished_digest = digest
                self.vanished.set()
            except Exception as e:  # reported by the test via proxy.error
                self.error = e
