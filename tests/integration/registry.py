"""Throw-away docker-registry (distribution 2.8) instances for the integration tests.

Every instance listens on 127.0.0.1 on an ephemeral port, stores its blobs in
a fresh temporary directory (filesystem driver, deletes enabled) and writes
its log (including the access log) to ``<tmpdir>/registry.log``.

    with Registry() as reg:                    # plain HTTP, no auth
        print(reg.host)                        # "127.0.0.1:40123"
    with Registry(auth=True, tls=True) as reg: # htpasswd (bcrypt) + TLS
        reg.ca_file, reg.username, reg.password
    with Registry(notify_url="http://127.0.0.1:9480/v1/webhooks/src",
                  notify_headers={"Authorization": "Bearer s3cret"}) as reg:
        ...                                    # notifications (events) POSTed to the URL

TLS certificates are issued by one throw-away CA per Python process
(``test_ca()``), so one ``--ca-file`` trusts every TLS registry of a run.
The leaf certificates carry ``IP:127.0.0.1`` and ``DNS:localhost`` SANs.

Only the standard library and the Debian tools ``docker-registry``,
``openssl`` and ``htpasswd`` (apache2-utils) are used.
"""

import atexit
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request

REGISTRY_BIN = os.environ.get("DOCKER_REGISTRY_BIN", "/usr/bin/docker-registry")
START_TIMEOUT = 15.0      # seconds until /v2/ must answer
STOP_TIMEOUT = 5.0        # seconds between SIGTERM and SIGKILL
PORT_ATTEMPTS = 5         # retries when the picked port got taken meanwhile


def _require_tool(path_or_name):
    found = shutil.which(path_or_name)
    if not found:
        raise RuntimeError(
            f"required tool {path_or_name!r} not found "
            "(Debian packages: docker-registry, openssl, apache2-utils, skopeo)")
    return found


def _run(cmd, **kw):
    kw.setdefault("timeout", 60)
    return subprocess.run(cmd, check=True, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, **kw)


def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def no_proxy_opener(ssl_context=None):
    """urllib opener that never uses $http_proxy & co: traffic stays on loopback."""
    handlers = [urllib.request.ProxyHandler({})]
    if ssl_context is not None:
        handlers.append(urllib.request.HTTPSHandler(context=ssl_context))
    return urllib.request.build_opener(*handlers)


# --------------------------------------------------------------------------
# Test CA (one per process)
# --------------------------------------------------------------------------

class TestCA:
    """A throw-away certificate authority made with the openssl CLI."""

    def __init__(self, directory):
        _require_tool("openssl")
        self.dir = directory
        self.cert = os.path.join(directory, "ca.crt")
        self.key = os.path.join(directory, "ca.key")
        _run(["openssl", "req", "-x509", "-newkey", "ec",
              "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
              "-keyout", self.key, "-out", self.cert, "-days", "2",
              "-subj", "/CN=crossdock integration test CA",
              "-addext", "basicConstraints=critical,CA:TRUE",
              "-addext", "keyUsage=critical,keyCertSign,cRLSign"])
        self._serial = 0
        self._lock = threading.Lock()

    def issue(self, directory, cn="127.0.0.1"):
        """Issue a server certificate for 127.0.0.1; returns (cert, key) paths.

        The cert file holds the leaf followed by the CA, so that clients
        which only know the CA get the full chain."""
        with self._lock:
            self._serial += 1
            serial = self._serial
        key = os.path.join(directory, "server.key")
        csr = os.path.join(directory, "server.csr")
        leaf = os.path.join(directory, "server-leaf.crt")
        chain = os.path.join(directory, "server.crt")
        ext = os.path.join(directory, "server.ext")
        with open(ext, "w") as f:
            f.write("basicConstraints=critical,CA:FALSE\n"
                    "keyUsage=critical,digitalSignature,keyEncipherment\n"
                    "extendedKeyUsage=serverAuth\n"
                    "subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        _run(["openssl", "req", "-new", "-newkey", "ec",
              "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
              "-keyout", key, "-out", csr, "-subj", f"/CN={cn}"])
        _run(["openssl", "x509", "-req", "-in", csr, "-CA", self.cert,
              "-CAkey", self.key, "-set_serial", str(1000 + serial),
              "-days", "2", "-extfile", ext, "-out", leaf])
        with open(chain, "w") as out:
            for p in (leaf, self.cert):
                with open(p) as f:
                    out.write(f.read())
        return chain, key


_CA = None
_CA_LOCK = threading.Lock()


def test_ca():
    """The process-wide test CA (created on first use, removed at exit)."""
    global _CA
    with _CA_LOCK:
        if _CA is None:
            d = tempfile.mkdtemp(prefix="crossdock-ca-")
            atexit.register(shutil.rmtree, d, True)
            _CA = TestCA(d)
        return _CA


# --------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------

class RegistryStartError(RuntimeError):
    pass


class Registry:
    """One docker-registry process; use as a context manager or start()/stop()."""

    def __init__(self, auth=False, tls=False, username="crossdock",
                 password="s3cret-Pa55", name="registry", notify_url=None,
                 notify_headers=None):
        self.auth = auth
        self.tls = tls
        # Notifications: distribution's event envelopes (one endpoint, "crossdock") POSTed to
        # notify_url with notify_headers ({name: value or [values]}); 2 s timeout, and after 3
        # failures in a row a 1 s back-off (the registry keeps retrying from memory).
        self.notify_url = notify_url
        self.notify_headers = dict(notify_headers or {})
        self.username = username if auth else None
        self.password = password if auth else None
        self.name = name
        self.port = None
        self.tmpdir = None
        self.proc = None
        self.log_path = None
        self.ca_file = None       # CA bundle that verifies this registry (TLS only)
        self.cert_dir = None      # directory with ca.crt, for skopeo --cert-dir

    # -- public attributes -------------------------------------------------
    @property
    def host(self):
        """"127.0.0.1:PORT" - what goes in front of a repository path."""
        return f"127.0.0.1:{self.port}"

    @property
    def scheme(self):
        return "https" if self.tls else "http"

    @property
    def url(self):
        return f"{self.scheme}://{self.host}"

    @property
    def creds(self):
        """"user:password" or None."""
        return f"{self.username}:{self.password}" if self.auth else None

    def ssl_context(self):
        if not self.tls:
            return None
        return ssl.create_default_context(cafile=self.ca_file)

    def client(self, username=None, password=None):
        """A corpus.RegistryClient for this registry (own credentials by default)."""
        from corpus import RegistryClient  # local import: no cycle at load time
        if username is None and self.auth:
            username, password = self.username, self.password
        return RegistryClient(self.url, username=username, password=password,
                              ca_file=self.ca_file)

    # -- lifecycle ---------------------------------------------------------
    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()
        return False

    def start(self):
        _require_tool(REGISTRY_BIN)
        self.tmpdir = tempfile.mkdtemp(prefix=f"crossdock-{self.name}-")
        atexit.register(self.stop)   # no stray registries, even on errors
        try:
            self._prepare_files()
            last_err = None
            for _ in range(PORT_ATTEMPTS):
                self.port = free_port()
                try:
                    self._launch()
                    return self
                except RegistryStartError as e:
                    last_err = e
                    self._kill()
                    if not self._port_race():
                        break
            raise last_err
        except BaseException:
            self.stop()
            raise

    def stop(self):
        self._kill()
        if self.tmpdir and os.environ.get("CROSSDOCK_KEEP_TMP") != "1":
            shutil.rmtree(self.tmpdir, ignore_errors=True)
        self.tmpdir = None

    # -- helpers for tests -------------------------------------------------
    def log_text(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except (OSError, TypeError):
            return ""

    _ACCESS_RE = re.compile(
        r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[0-9.]+" (?P<status>\d{3})')

    def settle_log(self, timeout=5.0):
        """Wait (bounded) until requests answered so far are in the access log.

        The registry writes an access-log line just *after* sending the
        response, so a client that has exited may be a line ahead of the log.
        A marker request, waited for in the log, closes that gap."""
        if self.proc is None:
            return
        self._sync_seq = getattr(self, "_sync_seq", 0) + 1
        marker = f"crossdock-log-sync={os.getpid()}-{self._sync_seq}"
        opener = no_proxy_opener(self.ssl_context())
        try:
            opener.open(f"{self.url}/v2/?{marker}", timeout=5).close()
        except (urllib.error.URLError, OSError, ssl.SSLError):
            pass  # 401 on auth registries is fine: it is logged all the same
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if marker in self.log_text():
                time.sleep(0.05)  # let concurrent handlers finish their lines
                return
            time.sleep(0.02)

    def access_log(self):
        """[(method, path, status)] from the registry's access log, in order."""
        self.settle_log()
        out = []
        for line in self.log_text().splitlines():
            m = self._ACCESS_RE.search(line)
            if m:
                out.append((m.group("method"), m.group("path"), int(m.group("status"))))
        return out

    def write_requests(self):
        """Access-log entries that could modify the registry (POST/PUT/PATCH/DELETE)."""
        return [e for e in self.access_log()
                if e[0] in ("POST", "PUT", "PATCH", "DELETE")]

    # -- internals ---------------------------------------------------------
    def _prepare_files(self):
        self.storage_dir = os.path.join(self.tmpdir, "storage")
        os.makedirs(self.storage_dir)
        self.log_path = os.path.join(self.tmpdir, "registry.log")
        self.config_path = os.path.join(self.tmpdir, "config.yml")
        if self.auth:
            _require_tool("htpasswd")
            self.htpasswd_path = os.path.join(self.tmpdir, "htpasswd")
            r = _run(["htpasswd", "-Bbn", self.username, self.password])
            with open(self.htpasswd_path, "wb") as f:
                f.write(r.stdout.strip() + b"\n")
        if self.tls:
            ca = test_ca()
            self.cert_path, self.key_path = ca.issue(self.tmpdir)
            self.ca_file = ca.cert
            self.cert_dir = os.path.join(self.tmpdir, "certs.d")
            os.makedirs(self.cert_dir)
            shutil.copy(ca.cert, os.path.join(self.cert_dir, "ca.crt"))

    def _config_yaml(self):
        lines = [
            "version: 0.1",
            "log:",
            "  level: info",
            "  formatter: text",
            "  accesslog:",
            "    disabled: false",
            "  fields:",
            f"    service: {self.name}",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {self.storage_dir}",
            "  delete:",
            "    enabled: true",
            "  maintenance:",
            "    uploadpurging:",
            "      enabled: false",
            "http:",
            f"  addr: 127.0.0.1:{self.port}",
            "  secret: crossdock-integration-test-secret",
            "  headers:",
            "    X-Content-Type-Options: [nosniff]",
        ]
        if self.tls:
            lines += [
                "  tls:",
                f"    certificate: {self.cert_path}",
                f"    key: {self.key_path}",
            ]
        if self.auth:
            lines += [
                "auth:",
                "  htpasswd:",
                "    realm: crossdock-test",
                f"    path: {self.htpasswd_path}",
            ]
        if self.notify_url:
            lines += [
                "notifications:",
                "  events:",
                "    includereferences: true",
                "  endpoints:",
                "    - name: crossdock",
                f"      url: {json.dumps(self.notify_url)}",
            ]
            if self.notify_headers:
                lines.append("      headers:")
                for k, v in self.notify_headers.items():
                    values = v if isinstance(v, (list, tuple)) else [v]
                    lines.append(f"        {k}: {json.dumps(list(values))}")
            lines += [
                "      timeout: 2s",
                "      threshold: 3",
                "      backoff: 1s",
            ]
        return "\n".join(lines) + "\n"

    def _launch(self):
        with open(self.config_path, "w") as f:
            f.write(self._config_yaml())
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        env["OTEL_TRACES_EXPORTER"] = "none"
        logf = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                [REGISTRY_BIN, "serve", self.config_path],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                env=env, cwd=self.tmpdir)
        finally:
            logf.close()
        self._wait_ready()

    def _wait_ready(self):
        deadline = time.monotonic() + START_TIMEOUT
        opener = no_proxy_opener(self.ssl_context())
        delay = 0.02
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RegistryStartError(
                    f"docker-registry exited with {self.proc.returncode} on port "
                    f"{self.port}; log:\n{self.log_text()[-3000:]}")
            try:
                with opener.open(f"{self.url}/v2/", timeout=2) as r:
                    if r.status == 200:
                        return
            except urllib.error.HTTPError as e:
                if e.code == 401 and self.auth:
                    return  # up, and asking for credentials as configured
                last = e
            except (urllib.error.URLError, OSError, ssl.SSLError) as e:
                last = e
            time.sleep(delay)
            delay = min(delay * 2, 0.2)
        raise RegistryStartError(
            f"docker-registry on port {self.port} not ready within "
            f"{START_TIMEOUT}s (last error: {last}); log:\n{self.log_text()[-3000:]}")

    def _port_race(self):
        return "address already in use" in self.log_text().lower()

    def _kill(self):
        p, self.proc = self.proc, None
        if p is None or p.poll() is not None:
            return
        p.terminate()
        try:
            p.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=STOP_TIMEOUT)


def start_filled(name, fill):
    """A started Registry named `name`, and what fill(its client) returned. If fill raises, the
    registry is stopped before the exception goes on: a setUpModule that fails gets no
    tearDownModule to stop it."""
    reg = Registry(name=name)
    reg.start()
    try:
        return reg, fill(reg.client())
    except BaseException:
        reg.stop()
        raise


if __name__ == "__main__":
    # Manual use: start a registry and keep it running until Ctrl-C.
    import argparse
    ap = argparse.ArgumentParser(description="run a throw-away docker-registry")
    ap.add_argument("--auth", action="store_true")
    ap.add_argument("--tls", action="store_true")
    ap.add_argument("--seconds", type=float, default=3600,
                    help="stop after this many seconds (default 3600)")
    a = ap.parse_args()
    import signal

    def _stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)   # `kill PID` also stops the registry
    with Registry(auth=a.auth, tls=a.tls) as reg:
        print(f"registry at {reg.url} (log {reg.log_path})", flush=True)
        if reg.auth:
            print(f"credentials {reg.creds}", flush=True)
        if reg.tls:
            print(f"CA file {reg.ca_file}", flush=True)
        try:
            time.sleep(a.seconds)
        except KeyboardInterrupt:
            pass
