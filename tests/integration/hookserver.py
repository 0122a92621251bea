"""A loopback HTTP server that records the POSTs it receives: webhooks sent *to* the tests.

    with HookServer({"/flaky": [500, 500, 200]}) as hooks:
        url = hooks.url("/flaky")                  # http://127.0.0.1:PORT/flaky
        ...
        got = hooks.wait_posts("/flaky", 3, timeout=10)   # [Hook], bounded wait

Each path answers the statuses of its script in order, then the last one for ever; a path
without a script answers 200.  Every request is kept as a ``Hook`` (path, headers, body, the
status it was answered, and the time.monotonic() it arrived).  It serves 127.0.0.1 only, on an
ephemeral port, one thread per connection; ``stop()`` (or leaving the ``with``) shuts it down.

Used by test_harness (a registry's notifications) and test_events (the daemon's notifications
out).  Python 3 standard library only.
"""

import http.server
import json
import threading
import time


class Hook:
    def __init__(self, method, path, headers, body, status):
        self.method = method
        self.path = path
        self.headers = headers            # {lower-case name: value}
        self.body = body                  # bytes
        self.status = status              # what the server answered
        self.t = time.monotonic()

    def json(self):
        return json.loads(self.body.decode("utf-8"))

    def __repr__(self):
        return f"Hook({self.method} {self.path} -> {self.status}, {len(self.body)} bytes)"


class HookServer:
    MAX_BODY = 16 << 20

    def __init__(self, script=None):
        self.script = {p: list(s) for p, s in (script or {}).items()}
        self.hooks = []
        self._cond = threading.Condition()
        self._counts = {}
        self._srv = None
        self._thread = None

    # -- lifecycle ----------------------------------------------------------
    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False

    def start(self):
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(min(n, owner.MAX_BODY)) if n > 0 else b""
                status = owner._next_status(self.path)
                owner._record(Hook(self.command, self.path,
                                   {k.lower(): v for k, v in self.headers.items()}, body, status))
                payload = b'{"ok": true}\n' if status < 300 else b'{"error": "scripted"}\n'
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_POST = do_PUT = _answer

            def log_message(self, *args):
                pass

        self._srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._srv.daemon_threads = True
        self._thread = threading.Thread(target=self._srv.serve_forever,
                                        kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()
        return self

    def stop(self):
        srv, self._srv = self._srv, None
        if srv is not None:
            srv.shutdown()
            srv.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    # -- use -------------------------------------------------------------------
    @property
    def port(self):
        return self._srv.server_address[1]

    def url(self, path="/"):
        return f"http://127.0.0.1:{self.port}{path}"

    def posts(self, path=None):
        """The requests received so far (for ``path`` only, if given), in order."""
        with self._cond:
            return [h for h in self.hooks if path is None or h.path == path]

    def wait_posts(self, path, count, timeout):
        """Waits (bounded) until ``path`` got at least ``count`` requests; returns them all."""
        deadline = time.monotonic() + timeout
        with self._cond:
            for _ in range(int(timeout / 0.05) + 10):
                got = [h for h in self.hooks if path is None or h.path == path]
                left = deadline - time.monotonic()
                if len(got) >= count or left <= 0:
                    return got
                self._cond.wait(min(left, 0.25))
            return [h for h in self.hooks if path is None or h.path == path]

    # -- internals ------------------------------------------------------------
    def _next_status(self, path):
        with self._cond:
            i = self._counts.get(path, 0)
            self._counts[path] = i + 1
            s = self.script.get(path)
            if not s:
                return 200
            return s[min(i, len(s) - 1)]

    def _record(self, hook):
        with self._cond:
            self.hooks.append(hook)
            self._cond.notify_all()
