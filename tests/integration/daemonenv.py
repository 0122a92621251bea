"""The sidecar daemon under test, shared by the daemon test modules (test_daemon, test_events).

- ``Api``: a small client of the control API (HTTP/1.1 + JSON on the Unix socket,
  engine/api.h); every answer is kept in ``api.transcript``.
- ``Daemon``: one ``crossdock serve`` process in a state directory, its log in a file, its
  loopback TCP port (``--listen 127.0.0.1:0``: /healthz, /metrics, webhooks) read from the log.
- ``DaemonTestCase``: a per-test temporary directory, daemons and registries stopped at the end,
  the daemons' logs appended to a failure report, and API helpers (rules, triggers, bounded
  waits for tasks, task items) and independent checks of a registry's content.

Every wait is bounded in time and in iterations.  Python 3 standard library only.
"""

import http.client
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import tempfile
import time
import unittest
import urllib.parse

import check
from cdenv import base_env
from registry import Registry

HERE = os.path.dirname(os.path.abspath(__file__))

CROSSDOCK = os.environ.get("CROSSDOCK_BIN") or os.path.join(
    HERE, "..", "..", "build", "tools", "crossdock")

KiB = 1024
MiB = 1024 * 1024

START_TIMEOUT = 10.0        # seconds until a daemon serves (socket up, "serving" logged)
STOP_TIMEOUT = 5            # --stop-timeout given to every daemon
STOP_GRACE = 5.0            # seconds past --stop-timeout before SIGKILL in clean-up
API_TIMEOUT = 30.0          # socket timeout of one API request
POLL = 0.1                  # seconds between polls
TASK_TIMEOUT = 60.0         # seconds for a small task to finish

TERMINAL = ("Succeeded", "PartiallyFailed", "Failed", "Stopped")
KEEP_TMP = os.environ.get("CROSSDOCK_KEEP_TMP") == "1"


# --------------------------------------------------------------------------
# The control API over the Unix socket
# --------------------------------------------------------------------------

class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over an AF_UNIX stream socket."""

    def __init__(self, socket_path, timeout=API_TIMEOUT):
        super().__init__("localhost", timeout=timeout)
        self.socket_path = socket_path

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(self.timeout)
            s.connect(self.socket_path)
        except BaseException:
            s.close()
            raise
        self.sock = s


class ApiResponse:
    def __init__(self, method, path, status, headers, body, sent=b""):
        self.method = method
        self.path = path
        self.status = status
        self.headers = headers            # [(name, value)]
        self.body = body                  # bytes
        self.sent = sent
        self.text = body.decode("utf-8", "replace")
        try:
            self.json = json.loads(self.text) if self.text.strip() else None
        except ValueError:
            self.json = None

    def header(self, name):
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def raw_headers(self):
        return "\n".join(f"{k}: {v}" for k, v in self.headers)

    def error_fields(self):
        """Field names of a 400's "errors" list."""
        if not isinstance(self.json, dict):
            return []
        return [e.get("field") for e in self.json.get("errors") or [] if isinstance(e, dict)]

    def error_for(self, field):
        """The message of the first error naming ``field`` ("" if none)."""
        for e in (self.json or {}).get("errors") or []:
            if isinstance(e, dict) and e.get("field") == field:
                return e.get("message") or ""
        return ""

    def describe(self):
        sent = self.sent[:400].decode("utf-8", "replace") if self.sent else ""
        return (f"\n{self.method} {self.path}" + (f" {sent}" if sent else "")
                + f"\n-> HTTP {self.status}\n{self.raw_headers()}\n\n{self.text[:3000]}")


class Api:
    """A small client of the daemon's control API; records every answer."""

    def __init__(self, socket_path):
        self.socket_path = socket_path
        self.transcript = []              # [ApiResponse], every answer received

    def request(self, method, path, body=None, data=None,
                content_type="application/json", headers=None):
        if body is not None:
            data = json.dumps(body).encode()
        hdrs = dict(headers or {})
        if data is not None and content_type:
            hdrs.setdefault("Content-Type", content_type)
        conn = UnixHTTPConnection(self.socket_path)
        try:
            conn.request(method, path, body=data, headers=hdrs)
            resp = conn.getresponse()
            payload = resp.read()
            r = ApiResponse(method, path, resp.status, resp.getheaders(), payload, data or b"")
        finally:
            conn.close()
        self.transcript.append(r)
        return r

    def get(self, path):
        return self.request("GET", path)

    def post(self, path, body=None, **kw):
        return self.request("POST", path, body, **kw)

    def patch(self, path, body=None, **kw):
        return self.request("PATCH", path, body, **kw)

    def delete(self, path):
        return self.request("DELETE", path)

    def raw_post(self, path, body_bytes, content_type="application/json"):
        """POST written by hand, for bodies the server may refuse before reading them
        (413): the body is sent as far as the server takes it, then the answer is read."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(API_TIMEOUT)
        try:
            s.connect(self.socket_path)
            head = (f"POST {path} HTTP/1.1\r\nHost: localhost\r\n"
                    f"Content-Type: {content_type}\r\n"
                    f"Content-Length: {len(body_bytes)}\r\nConnection: close\r\n\r\n").encode()
            s.sendall(head)
            view = memoryview(body_bytes)
            for i in range(0, len(view), 64 * KiB):
                try:
                    s.sendall(view[i:i + 64 * KiB])
                except (BrokenPipeError, ConnectionResetError):
                    break             # refused early: the answer is waiting
                except socket.timeout:
                    break
            resp = http.client.HTTPResponse(s, method="POST")
            resp.begin()
            payload = resp.read()
            r = ApiResponse("POST", path, resp.status, resp.getheaders(), payload,
                            f"<{len(body_bytes)} bytes>".encode())
        finally:
            s.close()
        self.transcript.append(r)
        return r


# --------------------------------------------------------------------------
# The daemon
# --------------------------------------------------------------------------

_PORT_RE = re.compile(r"/healthz and /metrics on http://127\.0\.0\.1:(\d+)")


class DaemonStartError(AssertionError):
    pass


class Daemon:
    """One `crossdock serve` process; its stdout and stderr go to ``log_path``."""

    def __init__(self, state_dir, log_path, socket_path=None, listen=True,
                 stop_timeout=STOP_TIMEOUT, extra=()):
        self.state_dir = state_dir
        self.log_path = log_path
        self.socket_path = socket_path or os.path.join(state_dir, "crossdock.sock")
        self.explicit_socket = socket_path is not None
        self.listen = listen
        self.stop_timeout = stop_timeout
        self.extra = list(extra)
        self.proc = None
        self.port = None
        self.final_log = None             # the log, kept when the daemon is stopped
        self.api = Api(self.socket_path)

    @property
    def args(self):
        a = [CROSSDOCK, "serve", "--state", self.state_dir, "--socket", self.socket_path,
             "--stop-timeout", str(self.stop_timeout)]
        if self.listen:
            a += ["--listen", "127.0.0.1:0"]
        return a + self.extra

    @property
    def pid(self):
        return self.proc.pid

    @property
    def base_url(self):
        return f"http://127.0.0.1:{self.port}"

    def start(self):
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=logf,
                                         stderr=logf, env=base_env())
        self._wait_ready()
        return self

    def _wait_ready(self):
        deadline = time.monotonic() + START_TIMEOUT
        for _ in range(int(START_TIMEOUT / 0.05) + 20):
            rc = self.proc.poll()
            if rc is not None:
                raise DaemonStartError(f"crossdock serve exited with {rc} before serving"
                                       + self.describe())
            text = self.log_text()
            if "serving" in text and self._socket_ready():
                if self.listen:
                    m = _PORT_RE.search(text)
                    if not m:
                        raise DaemonStartError("no '/healthz and /metrics on http://127.0.0.1:PORT'"
                                               " in the log" + self.describe())
                    self.port = int(m.group(1))
                return
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        self.kill()
        raise DaemonStartError(f"crossdock serve not serving within {START_TIMEOUT}s"
                               + self.describe())

    def _socket_ready(self):
        try:
            return stat.S_ISSOCK(os.stat(self.socket_path).st_mode)
        except OSError:
            return False

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def send(self, sig):
        if self.running():
            os.kill(self.proc.pid, sig)

    def wait(self, timeout):
        """The exit code, or None if still running after ``timeout`` seconds."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self):
        """SIGKILL; returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.kill()
        rc = self.wait(10)
        self._keep_log()
        return rc

    def stop(self):
        """SIGTERM, SIGKILL after stop-timeout + STOP_GRACE; returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            if self.wait(self.stop_timeout + STOP_GRACE) is None:
                self.proc.kill()
                self.wait(10)
        self._keep_log()
        return self.proc.returncode

    def _keep_log(self):
        self.final_log = self.log_text()

    def log_text(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return self.final_log or ""

    def describe(self, tail=6000):
        rc = self.proc.poll() if self.proc else None
        return (f"\n$ {' '.join(self.args)}\n(pid {self.proc.pid if self.proc else '-'}, "
                f"exit {rc})\n--- daemon log ({self.log_path}) ---\n{self.log_text()[-tail:]}")


# --------------------------------------------------------------------------
# Test base: daemons, API helpers, assertions
# --------------------------------------------------------------------------

class DaemonTestCase(unittest.TestCase):
    maxDiff = None

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="crossdock-daemon-")
        if not KEEP_TMP:
            self.addCleanup(shutil.rmtree, self.tmp, True)
        self.daemons = []

    def run(self, result=None):
        """On failure, the daemons' logs are appended to the failure report."""
        if result is None:
            return super().run(result)
        nf, ne = len(result.failures), len(result.errors)
        try:
            return super().run(result)
        finally:
            extra = self._daemon_logs()
            if extra:
                for lst, first in ((result.failures, nf), (result.errors, ne)):
                    for i in range(first, len(lst)):
                        t, text = lst[i]
                        lst[i] = (t, text + extra)

    def _daemon_logs(self):
        out = ""
        for i, d in enumerate(getattr(self, "daemons", []), 1):
            log = d.final_log if d.final_log is not None else d.log_text()
            out += (f"\n--- daemon #{i} log (exit {d.proc.returncode if d.proc else '-'}) ---\n"
                    f"{log[-6000:]}")
        return out

    # -- daemons & registries --------------------------------------------
    def state_dir(self):
        return os.path.join(self.tmp, "state")

    def start_daemon(self, state_dir=None, **kw):
        d = Daemon(state_dir or self.state_dir(),
                   os.path.join(self.tmp, f"daemon-{len(self.daemons) + 1}.log"), **kw)
        self.daemons.append(d)
        self.addCleanup(d.stop)
        d.start()
        return d

    def start_registry(self, **kw):
        reg = Registry(**kw)
        reg.start()
        self.addCleanup(reg.stop)
        return reg

    # -- API helpers ---------------------------------------------------------
    def expect(self, resp, status, what=""):
        self.assertEqual(resp.status, status, (what + " " if what else "") + resp.describe())
        return resp.json

    def add_registry(self, api, name, url, **kw):
        r = api.post("/v1/registries", {"name": name, "url": url, **kw})
        return self.expect(r, 201, f"create registry {name}")

    def add_rule(self, api, name, source, source_ns, target, target_ns, **kw):
        body = {"name": name, "source_registry": source, "source_namespace": source_ns,
                "target_registry": target, "target_namespace": target_ns}
        body.update(kw)
        r = api.post("/v1/rules", body)
        return self.expect(r, 201, f"create rule {name}")

    def trigger(self, api, rule):
        r = api.post(f"/v1/rules/{rule}/trigger")
        task = self.expect(r, 202, f"trigger {rule}")
        self.assertEqual(r.header("Location"), f"/v1/tasks/{task['id']}", r.describe())
        self.assertEqual(task["status"], "Queued", r.describe())
        self.assertEqual(task["trigger"], "manual", r.describe())
        self.assertEqual(task["rule_name"], rule, r.describe())
        return task

    def get_task(self, api, task_id):
        return self.expect(api.get(f"/v1/tasks/{task_id}"), 200)

    def wait_task(self, api, task_id, statuses=TERMINAL, timeout=TASK_TIMEOUT):
        deadline = time.monotonic() + timeout
        last = None
        for _ in range(int(timeout / POLL) + 50):
            last = self.get_task(api, task_id)
            if last["status"] in statuses:
                return last
            if time.monotonic() >= deadline:
                break
            time.sleep(POLL)
        self.fail(f"task {task_id} not {'/'.join(statuses)} within {timeout}s; last seen: {last}")

    def run_task(self, api, rule, timeout=TASK_TIMEOUT):
        """Triggers ``rule`` and waits for the task to end; returns (task, items)."""
        t = self.trigger(api, rule)
        done = self.wait_task(api, t["id"], timeout=timeout)
        return done, self.items(api, t["id"])

    def items(self, api, task_id):
        out, cursor = [], None
        for _ in range(1000):
            q = "?limit=1000" + (f"&cursor={urllib.parse.quote(cursor)}" if cursor else "")
            page = self.expect(api.get(f"/v1/tasks/{task_id}/items{q}"), 200)
            out += page["items"]
            cursor = page.get("next_cursor")
            if not cursor:
                return out
        self.fail(f"items of task {task_id}: pagination does not end")

    def tasks_of(self, api, rule):
        page = self.expect(api.get(f"/v1/tasks?rule={urllib.parse.quote(rule)}&limit=1000"), 200)
        return page["tasks"]

    def wait_mid_blob(self, api, task_id, size, fraction, timeout=60.0):
        """Waits until the running task has read at least ``fraction`` of ``size`` bytes
        from the source (but not all of it); returns the task as last seen."""
        deadline = time.monotonic() + timeout
        last = None
        for _ in range(int(timeout / 0.05) + 50):
            last = self.get_task(api, task_id)
            self.assertNotIn(last["status"], TERMINAL,
                             f"task {task_id} ended before it could be caught mid-blob: {last}")
            p = last.get("progress") or {}
            if last["status"] == "InProgress" and p.get("bytes_read", 0) >= fraction * size:
                self.assertLess(p["bytes_read"], size,
                                f"the whole blob was read before the task was caught: {last}")
                return last
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        self.fail(f"task {task_id} did not read {fraction:.0%} of {size} bytes within "
                  f"{timeout}s; last seen: {last}")

    # -- independent checks --------------------------------------------------
    def assertImageOnTarget(self, reg, repo, tag, digest, client=None):
        client = client or reg.client()
        info = check.manifest(client, repo, tag)
        self.assertIsNotNone(info, f"{reg.host}/{repo}:{tag} missing on the target")
        self.assertEqual(info.digest, digest, f"{reg.host}/{repo}:{tag} digest")
        self.assertEqual(check.missing_content(client, repo, tag), [],
                         f"{reg.host}/{repo}:{tag} incomplete")

    def assertNoLeak(self, text, where, secrets):
        for s in secrets:
            self.assertNotIn(s, text, f"{where} contains a credential ({s[:4]}...)")
