"""Small threaded HTTP reverse proxies in front of a (plain HTTP) registry.

Every proxy forwards requests unchanged (Host header included, so the
registry builds Location/Link URLs that point back at the proxy) and records
what it relayed.  Two flavours:

``VanishingProxy`` makes one tag vanish between listing and copying:

    with VanishingProxy(upstream_registry, repo="src-ns/team-a/web", tag="v1") as px:
        px.host          # "127.0.0.1:PORT", use instead of the registry's host
        ...
        px.vanished.is_set()   # True once the tag has been deleted upstream

    Right after the upstream answered GET /v2/<repo>/tags/list for the chosen
    repository (the first time), and *before* that answer is relayed to the
    client, the proxy resolves <tag> to its digest on the upstream and DELETEs
    /v2/<repo>/manifests/<digest>.  So the client sees the tag in the listing,
    but the tag is really gone by the time the client can ask for it; there is
    no race with a client that fetches manifests on other connections.

``FaultProxy`` injects faults described by ``Fault`` rules:

    rules = [Fault("GET", r"/blobs/sha256:", "respond", times=2, status=503),
             Fault("GET", rf"/blobs/{big}$", "cut", times=1)]
    with FaultProxy(upstream_registry, rules) as px:
        ...
        rules[0].hits          # how often the fault was really injected
        px.log                 # [ProxyEvent] in order: method, path, status, fault

    A rule matches a request when ``method`` (a regex, full match: "GET",
    "GET|HEAD") and ``path`` (a regex searched in the request target, query
    string included) match; it applies to the first ``times`` matching
    requests (``None``: every one).  The first applicable rule wins.  Actions:

    respond   answer ``status`` with ``headers``/``body`` without asking the
              upstream (the request body is read and dropped).
    cut       a network fault: relay the upstream headers (full
              Content-Length), then only ``keep`` bytes of the body (default:
              half), then close the connection.  Applies to 200 and 206
              answers (a ranged GET is cut the same way).

    The other actions are object faults: they stand for a source whose stored
    object really is different.  The proxy fetches the whole upstream object
    (without the client's Range), makes the fake object, and serves the
    request from it - whole (200), the asked Range (206, Content-Range), or
    416 for a Range past its end - with a Content-Length that matches what is
    sent.  Docker-Content-Digest keeps the upstream value (the lie), except
    for ``replace``.

    corrupt   the object with one byte flipped (at ``offset``, default the
              middle), same length.
    truncate  only the first ``keep`` bytes (default: half); every answer
              closes the connection cleanly afterwards.
    extend    the object followed by ``extra`` more bytes (default 4096).
    replace   ``replace`` instead (bytes, or a callable old -> new); the
              Docker-Content-Digest and Etag headers are made to match it,
              as a registry serving it would.

    Faults apply only when the upstream answers 200 (200/206 for ``cut``);
    other answers are relayed unchanged and do not count as hits.  A HEAD
    request that matches a GET-like rule ("GET|HEAD") is answered with the
    headers the faulty GET would have (the upstream is asked with GET).

Only the standard library is used; traffic goes to 127.0.0.1 only.
"""

import hashlib
import http.client
import http.server
import re
import socket
import socketserver
import threading
import time
import urllib.parse

from corpus import ACCEPT_ALL

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
              "te", "trailers", "transfer-encoding", "upgrade", "expect"}
UPSTREAM_TIMEOUT = 60
ACTIONS = ("respond", "cut", "corrupt", "truncate", "extend", "replace")


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address):
        # A client that gives up on a connection (as clients under test do
        # when a fault makes them abort a transfer) is no proxy error.
        import sys
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)


class ProxyEvent:
    """One relayed request: what the client asked and what it was answered."""

    __slots__ = ("t_start", "t", "method", "path", "status", "fault", "sent")

    def __init__(self, t_start, t, method, path, status, fault, sent):
        self.t_start = t_start  # time.monotonic() when the request had arrived
        self.t = t              # time.monotonic() when the answer was sent
        self.method = method
        self.path = path        # request target, query string included
        self.status = status    # status sent to the client
        self.fault = fault      # name of the Fault applied, or None
        self.sent = sent        # body bytes sent to the client

    def __repr__(self):
        f = f" [{self.fault}]" if self.fault else ""
        return f"{self.method} {self.path} -> {self.status}{f}"


class Fault:
    """A fault rule for FaultProxy (see the module docstring)."""

    def __init__(self, method, path, action, times=None, status=503, headers=(),
                 body=b"", keep=None, offset=None, extra=4096, replace=None, name=None):
        if action not in ACTIONS:
            raise ValueError(f"unknown fault action {action!r} (one of {ACTIONS})")
        self.method_re = re.compile(method)
        self.path_re = re.compile(path)
        self.action = action
        self.times = times
        self.status = status
        self.headers = list(headers.items() if isinstance(headers, dict) else headers)
        self.body = body if isinstance(body, bytes) else str(body).encode()
        self.keep = keep
        self.offset = offset
        self.extra = extra
        self.replace = replace
        self.name = name or f"{action}:{method} {path}"
        self.matched = 0          # matching requests seen (applied or not)
        self.hits = 0             # faults really injected

    @property
    def transforms_body(self):
        return self.action != "respond"

    def matches(self, method, target):
        return (self.method_re.fullmatch(method) is not None
                and self.path_re.search(target) is not None)

    def __repr__(self):
        return f"Fault({self.name!r}, hits={self.hits})"


def _registry_error(status, message):
    code = {429: "TOOMANYREQUESTS", 401: "UNAUTHORIZED"}.get(status, "UNAVAILABLE")
    return (f'{{"errors":[{{"code":"{code}","message":"{message}","detail":null}}]}}'
            ).encode()


def _fake_object(fault, data, headers):
    """(fake body, headers) for an object fault applied to upstream body ``data``."""
    act = fault.action
    if act == "truncate":
        keep = len(data) // 2 if fault.keep is None else min(fault.keep, len(data))
        return data[:keep], headers
    if act == "corrupt":
        b = bytearray(data)
        if b:
            off = len(b) // 2 if fault.offset is None else fault.offset
            b[off] ^= 0xFF
        return bytes(b), headers
    if act == "extend":
        return data + bytes((i * 37 + 11) % 256 for i in range(fault.extra)), headers
    if act == "replace":
        new = fault.replace(data) if callable(fault.replace) else fault.replace
        if isinstance(new, str):
            new = new.encode()
        digest = "sha256:" + hashlib.sha256(new).hexdigest()
        hdrs = [(k, digest if k.lower() == "docker-content-digest" else v)
                for k, v in headers if k.lower() != "etag"]
        hdrs.append(("Etag", f'"{digest}"'))
        return new, hdrs
    raise AssertionError(f"unhandled fault action {act}")


_RANGE_RE = re.compile(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*")


def _parse_range(value, size):
    """A single ``Range: bytes=...`` against an object of ``size`` bytes:
    None (no/ignored Range: whole object), "unsatisfiable", or (first, last)."""
    if not value:
        return None
    m = _RANGE_RE.fullmatch(value)
    if not m or (m.group(1) == "" and m.group(2) == ""):
        return None          # several ranges or nonsense: a server may ignore Range
    if m.group(1) == "":     # suffix: the last N bytes
        n = int(m.group(2))
        if n == 0 or size == 0:
            return "unsatisfiable"
        return (max(0, size - n), size - 1)
    first = int(m.group(1))
    last = int(m.group(2)) if m.group(2) else size - 1
    if first >= size or last < first:
        return "unsatisfiable"
    return (first, min(last, size - 1))


class ForwardingProxy:
    """Pass-through proxy; subclasses hook into requests and answers."""

    thread_name = "forwarding-proxy"

    def __init__(self, upstream):
        """upstream: a registry.Registry (plain HTTP)."""
        if upstream.tls:
            raise ValueError(f"{type(self).__name__} supports plain-HTTP upstreams only")
        self.upstream = upstream
        self.error = None
        self.requests = []            # (method, path, status) as relayed
        self.log = []                 # [ProxyEvent]
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

    # -- hooks -------------------------------------------------------------
    def pick_fault(self, method, target):
        """The Fault to apply to this request, or None."""
        return None

    def after_upstream(self, method, path, status):
        """Called with the upstream's answer, before it is relayed."""

    # -- machinery ---------------------------------------------------------
    def _record(self, t_start, method, target, status, fault, sent):
        with self._lock:
            self.requests.append((method, target, status))
            self.log.append(ProxyEvent(t_start, time.monotonic(), method, target, status,
                                       fault.name if fault else None, sent))

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

            def _upstream(self, method, body, drop_range=False):
                # A list, not a dict: repeated headers (several Accept lines) must survive.
                dropped = {"content-length"} | ({"range", "if-range"} if drop_range else set())
                headers = [(k, v) for k, v in self.headers.items()
                           if k.lower() not in HOP_BY_HOP and k.lower() not in dropped]
                if body is not None:
                    headers.append(("Content-Length", str(len(body))))
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream.port,
                                                  timeout=UPSTREAM_TIMEOUT)
                try:
                    conn.putrequest(method, self.path, skip_host=True,
                                    skip_accept_encoding=True)
                    for k, v in headers:
                        conn.putheader(k, v)
                    conn.endheaders(body)
                    resp = conn.getresponse()
                    data = resp.read() if method != "HEAD" else b""
                    rheaders = [(k, v) for k, v in resp.getheaders()
                                if k.lower() not in HOP_BY_HOP]
                    return resp.status, resp.reason, rheaders, data
                finally:
                    conn.close()

            def _send(self, status, reason, headers, data, head_only, length=None,
                      close=False, fault=None):
                """Send an answer. ``length``: the Content-Length to announce
                (default len(data)); ``data`` is what is really sent."""
                if length is None:
                    length = len(data)
                self.send_response_only(status, reason)
                for k, v in headers:
                    if k.lower() != "content-length":
                        self.send_header(k, v)
                if status not in (204, 304) and not (100 <= status < 200):
                    self.send_header("Content-Length", str(length))
                if close:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                if data and not head_only:
                    self.wfile.write(data)
                self.wfile.flush()
                proxy._record(self.t_start, self.command, self.path, status, fault,
                              0 if head_only else len(data))

            def _forward(self):
                self.t_start = time.monotonic()
                method = self.command
                body = self._body()
                fault = proxy.pick_fault(method, self.path)

                if fault is not None and fault.action == "respond":
                    with proxy._lock:
                        fault.hits += 1
                    hdrs = list(fault.headers)
                    data = fault.body
                    if not data and method != "HEAD":
                        data = _registry_error(fault.status, f"injected by test proxy ({fault.name})")
                    if not any(k.lower() == "content-type" for k, _ in hdrs) and data:
                        hdrs.append(("Content-Type", "application/json; charset=utf-8"))
                    self._send(fault.status, None, hdrs, data, method == "HEAD", fault=fault)
                    return

                # Object faults stand for a source whose stored blob/manifest *is*
                # different: the whole upstream object is fetched (no Range), turned
                # into the fake one, and the client's request is served from it.
                object_fault = fault is not None and fault.action != "cut"
                up_method = "GET" if (method == "HEAD" and fault is not None) else method
                status, reason, rheaders, data = self._upstream(
                    up_method, body, drop_range=object_fault)
                path = urllib.parse.urlsplit(self.path).path
                proxy.after_upstream(method, path, status)
                head_only = method == "HEAD"

                if fault is None or status not in ((200, 206) if fault.action == "cut" else (200,)):
                    if head_only:
                        self._send_head_passthrough(status, reason, rheaders)
                    else:
                        self._send(status, reason, rheaders, data, False)
                    return

                with proxy._lock:
                    fault.hits += 1
                if fault.action == "cut":
                    keep = len(data) // 2 if fault.keep is None else min(fault.keep, len(data))
                    if head_only:
                        self._send(status, reason, rheaders, data, True, fault=fault)
                        return
                    self._send(status, reason, rheaders, data[:keep], False,
                               length=len(data), close=True, fault=fault)
                    try:   # make the break visible at once, whatever the client buffers
                        self.connection.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    return

                fake, rheaders = _fake_object(fault, data, rheaders)
                close = fault.action == "truncate"
                rheaders = [(k, v) for k, v in rheaders if k.lower() != "content-range"]
                rng = _parse_range(self.headers.get("Range"), len(fake))
                if rng is None:
                    self._send(200, "OK", rheaders, fake, head_only, close=close, fault=fault)
                elif rng == "unsatisfiable":
                    hdrs = [(k, v) for k, v in rheaders if k.lower() != "content-type"]
                    hdrs += [("Content-Range", f"bytes */{len(fake)}"),
                             ("Content-Type", "text/plain; charset=utf-8")]
                    self._send(416, "Range Not Satisfiable", hdrs, b"", head_only,
                               close=close, fault=fault)
                else:
                    a, b = rng
                    hdrs = rheaders + [("Content-Range", f"bytes {a}-{b}/{len(fake)}")]
                    self._send(206, "Partial Content", hdrs, fake[a:b + 1], head_only,
                               close=close, fault=fault)

            def _send_head_passthrough(self, status, reason, rheaders):
                # HEAD: the upstream's headers as they are (its Content-Length included).
                self.send_response_only(status, reason)
                for k, v in rheaders:
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.flush()
                proxy._record(self.t_start, self.command, self.path, status, None, 0)

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

        self._server = _Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.1},
                                        name=self.thread_name, daemon=True)
        self._thread.start()
        return self

    def stop(self):
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=10)
            self._server = None

    def events(self, method=None, path=None):
        """Recorded events, optionally filtered (method: exact; path: regex search)."""
        with self._lock:
            evs = list(self.log)
        return [e for e in evs
                if (method is None or e.method == method)
                and (path is None or re.search(path, e.path))]


class FaultProxy(ForwardingProxy):
    """Forwards everything, injecting the faults of ``rules`` (see module docstring)."""

    thread_name = "fault-proxy"

    def __init__(self, upstream, rules=()):
        super().__init__(upstream)
        self.rules = list(rules)

    def pick_fault(self, method, target):
        with self._lock:
            for r in self.rules:
                if r.matches(method, target):
                    r.matched += 1
                    if r.times is None or r.matched <= r.times:
                        return r
        return None


class VanishingProxy(ForwardingProxy):
    thread_name = "vanishing-proxy"

    def __init__(self, upstream, repo=None, tag=None):
        """upstream: a registry.Registry (plain HTTP).  repo/tag: the tag to
        delete after the first tags/list of repo (None: pure pass-through)."""
        super().__init__(upstream)
        self.repo = repo
        self.tag = tag
        self.vanished = threading.Event()
        self.vanished_digest = None
        self._vanish_lock = threading.Lock()

    def after_upstream(self, method, path, status):
        if (method == "GET" and status == 200 and self.repo
                and path == f"/v2/{self.repo}/tags/list"):
            self._maybe_vanish()

    def _maybe_vanish(self):
        with self._vanish_lock:
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
