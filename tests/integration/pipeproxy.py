"""Proxy behaviours for the streaming-pipeline tests, built on proxy.py.

``PipeProxy`` is a ``proxy.FaultProxy`` (so it forwards everything and can
take the same ``Fault`` rules) with three more behaviours, each optional:

    rate=BYTES_PER_S     every byte sent to the client (all connections
                         together) goes through one token bucket: a link of
                         that bandwidth.
    strip_range=True     the ``Range`` request header is dropped before the
                         request goes upstream, so the registry answers 200
                         with the whole body: a source that ignores Range.
    corrupt=REGEX        GET answers (200 or 206) whose request target matches
                         REGEX get one byte of their body flipped (the middle
                         byte), same length, same headers.  Unlike the
                         ``corrupt`` Fault of proxy.py this also applies to
                         206 (ranged) answers, i.e. to every GET.

It also records, with wall-clock times (``time.time()``, comparable with
the registry's log timestamps), every request it answered:

    px.timeline("GET", r"/blobs/sha256:...")  ->  [Exchange], in completion order
    Exchange: method, path, status, body_bytes, t_start, t_end

Nothing here copies proxy.py: the request handler that
``ForwardingProxy.start()`` builds is subclassed after the fact, and the
subclass only uses standard ``http.server`` hooks (``setup``,
``parse_request``, ``send_response_only``, ``flush_headers``,
``handle_one_request``).  Traffic stays on 127.0.0.1.
"""

import re
import threading
import time

from proxy import FaultProxy

PIECE = 64 * 1024          # bytes per throttled write


class TokenBucket:
    """A shared link of ``rate`` bytes/s: callers take turns by time slot."""

    def __init__(self, rate):
        self.rate = float(rate)
        self._lock = threading.Lock()
        self._next_free = 0.0

    def take(self, n):
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next_free)
            self._next_free = start + n / self.rate
            until = self._next_free
        delay = until - time.monotonic()
        if delay > 0:
            time.sleep(delay)


class Exchange:
    """One request answered by a PipeProxy (wall-clock times)."""

    __slots__ = ("method", "path", "status", "body_bytes", "t_start", "t_end")

    def __init__(self, method, path, status, body_bytes, t_start, t_end):
        self.method, self.path, self.status = method, path, status
        self.body_bytes, self.t_start, self.t_end = body_bytes, t_start, t_end

    def __repr__(self):
        return (f"{self.method} {self.path[:90]} -> {self.status} "
                f"{self.body_bytes}B [{self.t_start:.3f}..{self.t_end:.3f}]")


class _Writer:
    """Wraps a handler's wfile: throttles, corrupts, counts body bytes."""

    def __init__(self, raw, handler, proxy):
        self._raw = raw
        self._h = handler
        self._px = proxy

    def write(self, data):
        h = self._h
        data = bytes(data)
        if h._pp_headers_done:
            if (h._pp_corrupt and not h._pp_corrupted and data
                    and h._pp_status in (200, 206)):
                b = bytearray(data)
                b[len(b) // 2] ^= 0xFF
                data = bytes(b)
                h._pp_corrupted = True
                with self._px._pp_lock:
                    self._px.corrupted += 1
            h._pp_body += len(data)
        bucket = self._px.bucket
        if bucket is None:
            return self._raw.write(data)
        view = memoryview(data)
        for i in range(0, len(view), PIECE):
            piece = view[i:i + PIECE]
            bucket.take(len(piece))
            self._raw.write(piece)
        return len(data)

    def flush(self):
        return self._raw.flush() if hasattr(self._raw, "flush") else None

    def __getattr__(self, name):
        return getattr(self._raw, name)


class PipeProxy(FaultProxy):
    thread_name = "pipe-proxy"

    def __init__(self, upstream, rules=(), rate=None, strip_range=False, corrupt=None):
        super().__init__(upstream, rules)
        self.bucket = TokenBucket(rate) if rate else None
        self.strip_range = strip_range
        self.corrupt_re = re.compile(corrupt) if corrupt else None
        self.corrupted = 0          # bodies corrupted so far
        self.ranges_stripped = 0    # requests whose Range header was dropped
        self.exchanges = []         # [Exchange], completion order
        self.handler_errors = []    # unexpected exceptions in handler threads
        self._pp_lock = threading.Lock()

    def start(self):
        super().start()
        px = self
        base = self._server.RequestHandlerClass

        class Handler(base):
            def setup(self):
                super().setup()
                self.wfile = _Writer(self.wfile, self, px)

            def _pp_reset(self):
                self._pp_headers_done = False
                self._pp_corrupt = False
                self._pp_corrupted = False
                self._pp_status = None
                self._pp_body = 0
                self._pp_t0 = None

            def handle_one_request(self):
                self._pp_reset()
                self.command = None
                try:
                    super().handle_one_request()
                finally:
                    if self.command and self._pp_t0 is not None:
                        ex = Exchange(self.command, self.path, self._pp_status,
                                      self._pp_body, self._pp_t0, time.time())
                        with px._pp_lock:
                            px.exchanges.append(ex)

            def parse_request(self):
                ok = super().parse_request()
                if not ok:
                    return ok
                self._pp_t0 = time.time()
                if px.strip_range and "Range" in self.headers:
                    del self.headers["Range"]
                    with px._pp_lock:
                        px.ranges_stripped += 1
                if (px.corrupt_re is not None and self.command == "GET"
                        and px.corrupt_re.search(self.path)):
                    self._pp_corrupt = True
                return ok

            def send_response_only(self, code, message=None):
                if code >= 200:      # not an interim answer (100 Continue)
                    self._pp_status = code
                    self._pp_headers_done = False
                return super().send_response_only(code, message)

            def flush_headers(self):
                super().flush_headers()
                self._pp_headers_done = True

        self._server.RequestHandlerClass = Handler

        def handle_error(request, client_address, _px=px):
            import sys
            exc = sys.exc_info()[1]
            if isinstance(exc, (BrokenPipeError, ConnectionResetError,
                                ConnectionAbortedError, TimeoutError)):
                return          # the client went away (killed, or stood a stream down)
            with _px._pp_lock:
                _px.handler_errors.append(repr(exc))

        self._server.handle_error = handle_error
        return self

    def timeline(self, method=None, path=None):
        """Exchanges (completion order), optionally filtered by method and a
        regex searched in the request target."""
        with self._pp_lock:
            evs = list(self.exchanges)
        return [e for e in evs
                if (method is None or e.method == method)
                and (path is None or re.search(path, e.path))]
