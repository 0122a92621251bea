"""Bearer-token auth for the integration tests: a token server, a registry
that trusts it, and an API client that speaks the token flow.

``TokenServer`` is the "docker token" authorization server of the
distribution spec, as small as it can be: GET /token?service=S&scope=A&scope=B
with HTTP Basic credentials answers {"token": JWT, "access_token": JWT, ...}.
The JWT is RS256, signed with the ``openssl`` CLI (``openssl dgst -sha256
-sign key.pem``); its header carries ``x5c`` = [base64 DER of the self-signed
certificate], which distribution verifies against ``rootcertbundle`` (the
same certificate).  Every valid user is granted every action asked for in
each ``scope`` (``repository:NAME:pull,push``), and ``registry:catalog:*``
in every token.  Every request is logged in ``server.log``
(``TokenRequest``: user, scopes, granted or refused, user agent, time).

    ts = TokenServer({"alice": "pw"}); ts.start()
    reg = TokenRegistry(ts); reg.start()     # docker-registry 2.8, auth: token
    cl = reg.client("alice", "pw")           # TokenClient: corpus/check work with it
    ...
    reg.stop(); ts.stop()

``TokenRegistry`` is a registry.Registry whose config has
``auth: token: {realm, service, issuer, rootcertbundle}``; anything else
(ephemeral port, temp storage, access log) is as for Registry.

``TokenClient`` is a corpus.RegistryClient that answers a 401 Bearer
challenge by fetching a token from the realm (Basic credentials, the scopes
of the challenge) and retrying once; tokens are cached per repository and
kind of access.

Only the standard library and the ``openssl`` CLI are used; 127.0.0.1 only.
"""

import base64
import datetime
import http.server
import json
import os
import re
import secrets
import shutil
import socketserver
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

from corpus import RegistryClient, RegistryError
from registry import (START_TIMEOUT, Registry, RegistryStartError, _require_tool,
                      no_proxy_opener)

DEFAULT_SERVICE = "test-registry"
DEFAULT_ISSUER = "test-issuer"
OPENSSL_TIMEOUT = 30


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text):
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def parse_scope(scope):
    """"repository:team/app:pull,push" -> ("repository", "team/app", ["pull", "push"]).
    The name may itself contain ':' (type first, actions last)."""
    typ, _, rest = scope.partition(":")
    name, _, actions = rest.rpartition(":")
    if not typ or not name:
        raise ValueError(f"malformed scope {scope!r}")
    return typ, name, [a for a in actions.split(",") if a]


def decode_jwt(token):
    """(header, claims) of a JWT, without verifying anything (for tests)."""
    h, c, _ = token.split(".")
    return json.loads(b64url_decode(h)), json.loads(b64url_decode(c))


class TokenRequest:
    """One request to the token endpoint."""

    __slots__ = ("t", "user", "granted", "status", "service", "scopes", "user_agent",
                 "access")

    def __init__(self, t, user, granted, status, service, scopes, user_agent, access):
        self.t = t
        self.user = user            # from the Basic credentials (None: anonymous)
        self.granted = granted      # True when a token was issued
        self.status = status
        self.service = service
        self.scopes = scopes        # [scope strings] as asked, in order
        self.user_agent = user_agent
        self.access = access        # the "access" claim issued

    def __repr__(self):
        return (f"TokenRequest({self.user!r}, {self.status}, scopes={self.scopes}, "
                f"ua={self.user_agent!r})")


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class TokenServer:
    def __init__(self, users, service=DEFAULT_SERVICE, issuer=DEFAULT_ISSUER, ttl=600,
                 name="token"):
        """users: {username: password}."""
        self.users = dict(users)
        self.service = service
        self.issuer = issuer
        self.ttl = ttl
        self.name = name
        self.tmpdir = None
        self.cert_path = None
        self.key_path = None
        self.log = []                    # [TokenRequest]
        self._lock = threading.Lock()
        self._server = None
        self._thread = None
        self._x5c = None

    # -- public ---------------------------------------------------------------
    @property
    def port(self):
        return self._server.server_address[1]

    @property
    def realm(self):
        return f"http://127.0.0.1:{self.port}/token"

    def registry_auth_yaml(self):
        """The ``auth:`` section of a docker-registry config trusting this server."""
        return ["auth:",
                "  token:",
                f"    realm: {self.realm}",
                f"    service: {self.service}",
                f"    issuer: {self.issuer}",
                f"    rootcertbundle: {self.cert_path}"]

    def requests(self, user=None):
        with self._lock:
            return [r for r in self.log if user is None or r.user == user]

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()
        return False

    def start(self):
        _require_tool("openssl")
        self.tmpdir = tempfile.mkdtemp(prefix=f"crossdock-{self.name}-")
        try:
            self.key_path = os.path.join(self.tmpdir, "key.pem")
            self.cert_path = os.path.join(self.tmpdir, "cert.pem")
            subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                            "-keyout", self.key_path, "-out", self.cert_path, "-days", "2",
                            "-subj", "/CN=crossdock test token issuer"],
                           check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           timeout=OPENSSL_TIMEOUT)
            with open(self.cert_path) as f:
                der = ssl.PEM_cert_to_DER_cert(f.read())
            self._x5c = base64.b64encode(der).decode()
            self._server = _Server(("127.0.0.1", 0), self._handler())
            self._thread = threading.Thread(target=self._server.serve_forever,
                                            kwargs={"poll_interval": 0.1},
                                            name="token-server", daemon=True)
            self._thread.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self):
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=10)
            self._server = None
        if self.tmpdir and os.environ.get("CROSSDOCK_KEEP_TMP") != "1":
            shutil.rmtree(self.tmpdir, ignore_errors=True)
        self.tmpdir = None

    def issue(self, user, scopes):
        """(JWT, access claim) for ``user`` granting ``scopes``."""
        access = []
        for sc in scopes:
            typ, name, actions = parse_scope(sc)
            access.append({"type": typ, "name": name, "actions": actions})
        if not any(a["type"] == "registry" and a["name"] == "catalog" for a in access):
            access.append({"type": "registry", "name": "catalog", "actions": ["*"]})
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self._x5c]}
        claims = {"iss": self.issuer, "sub": user or "", "aud": self.service,
                  "exp": now + self.ttl, "nbf": now - 10, "iat": now,
                  "jti": secrets.token_hex(16), "access": access}
        signing_input = (b64url(json.dumps(header, separators=(",", ":")).encode()) + "."
                         + b64url(json.dumps(claims, separators=(",", ":")).encode()))
        r = subprocess.run(["openssl", "dgst", "-sha256", "-sign", self.key_path],
                           input=signing_input.encode(), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=OPENSSL_TIMEOUT, check=True)
        return signing_input + "." + b64url(r.stdout), access

    # -- internals ------------------------------------------------------------
    def _handler(self):
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt, *args):
                pass

            def _reply(self, status, doc, extra=()):
                body = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in extra:
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                u = urllib.parse.urlsplit(self.path)
                q = urllib.parse.parse_qs(u.query, keep_blank_values=True)
                ua = self.headers.get("User-Agent", "")
                if u.path != "/token":
                    self._reply(404, {"errors": [{"code": "NOT_FOUND", "message": u.path}]})
                    return
                scopes = [s for v in q.get("scope", []) for s in v.split(" ") if s]
                service = (q.get("service") or [""])[0]
                user, password = None, None
                auth = self.headers.get("Authorization", "")
                if auth.lower().startswith("basic "):
                    try:
                        user, _, password = base64.b64decode(auth[6:].strip()).decode().partition(":")
                    except (ValueError, UnicodeDecodeError):
                        user = None

                def record(status, granted, access=None):
                    with server._lock:
                        server.log.append(TokenRequest(time.monotonic(), user, granted, status,
                                                       service, scopes, ua, access))

                if user is None or server.users.get(user) != password:
                    record(401, False)
                    self._reply(401, {"errors": [{
                        "code": "UNAUTHORIZED",
                        "message": "authentication required" if user is None
                        else f"invalid username or password for {user!r}"}]},
                        [("WWW-Authenticate", 'Basic realm="crossdock-test-token"')])
                    return
                if service != server.service:
                    record(400, False)
                    self._reply(400, {"errors": [{"code": "UNSUPPORTED",
                                                  "message": f"unknown service {service!r}"}]})
                    return
                try:
                    token, access = server.issue(user, scopes)
                except ValueError as e:
                    record(400, False)
                    self._reply(400, {"errors": [{"code": "INVALID", "message": str(e)}]})
                    return
                record(200, True, access)
                issued = datetime.datetime.now(datetime.timezone.utc).strftime(
                    "%Y-%m-%dT%H:%M:%SZ")
                self._reply(200, {"token": token, "access_token": token,
                                  "expires_in": server.ttl, "issued_at": issued})

        return Handler


class TokenRegistry(Registry):
    """docker-registry configured for bearer tokens from ``token_server``."""

    def __init__(self, token_server, name="registry-token", tls=False):
        super().__init__(auth=False, tls=tls, name=name)
        self.token_server = token_server

    def _config_yaml(self):
        return super()._config_yaml() + "\n".join(self.token_server.registry_auth_yaml()) + "\n"

    def client(self, username=None, password=None):
        return TokenClient(self.url, username, password, ca_file=self.ca_file)

    def _wait_ready(self):
        # As Registry._wait_ready, but 401 (a Bearer challenge) means "up".
        deadline = time.monotonic() + START_TIMEOUT
        opener = no_proxy_opener(self.ssl_context())
        delay, last = 0.02, None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RegistryStartError(
                    f"docker-registry exited with {self.proc.returncode} on port "
                    f"{self.port}; log:\n{self.log_text()[-3000:]}")
            try:
                with opener.open(f"{self.url}/v2/", timeout=2) as r:
                    last = f"HTTP {r.status} (expected 401)"
            except urllib.error.HTTPError as e:
                if e.code == 401 and "bearer" in (e.headers.get("WWW-Authenticate") or "").lower():
                    return
                last = e
            except (urllib.error.URLError, OSError, ssl.SSLError) as e:
                last = e
            time.sleep(delay)
            delay = min(delay * 2, 0.2)
        raise RegistryStartError(
            f"token-auth docker-registry on port {self.port} not ready within "
            f"{START_TIMEOUT}s (last: {last}); log:\n{self.log_text()[-3000:]}")

    _ACCESS_UA_RE = re.compile(
        r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[0-9.]+" (?P<status>\d{3}) \S+ '
        r'"[^"]*" "(?P<ua>[^"]*)"')

    def access_log_ua(self):
        """[(method, path, status, user_agent)] from the access log, in order."""
        self.settle_log()
        out = []
        for line in self.log_text().splitlines():
            m = self._ACCESS_UA_RE.search(line)
            if m:
                out.append((m.group("method"), m.group("path"), int(m.group("status")),
                            m.group("ua")))
        return out


_CHALLENGE_PARAM_RE = re.compile(r'(\w+)\s*=\s*"([^"]*)"')
_ALL_STATUSES = tuple(range(100, 600))


class TokenError(RuntimeError):
    pass


class TokenClient(RegistryClient):
    """corpus.RegistryClient that follows Bearer challenges (see module doc)."""

    def __init__(self, base_url, username=None, password=None, ca_file=None,
                 insecure=False, timeout=60):
        super().__init__(base_url, None, None, ca_file=ca_file, insecure=insecure,
                         timeout=timeout)
        self.username, self.password = username, password
        self._tokens = {}
        self._token_lock = threading.Lock()

    @staticmethod
    def _key(method, url):
        path = urllib.parse.urlsplit(url).path
        write = method in ("POST", "PUT", "PATCH", "DELETE")
        if path.startswith("/v2/_catalog"):
            return ("catalog", write)
        m = re.match(r"^/v2/(.+?)/(manifests|blobs|tags)/", path)
        return (m.group(1) if m else "", write)

    def fetch_token(self, challenge):
        params = dict(_CHALLENGE_PARAM_RE.findall(challenge))
        realm = params.get("realm")
        if not realm:
            raise TokenError(f"no realm in challenge {challenge!r}")
        q = []
        if params.get("service"):
            q.append(("service", params["service"]))
        for sc in (params.get("scope") or "").split(" "):
            if sc:
                q.append(("scope", sc))
        url = realm + ("&" if "?" in realm else "?") + urllib.parse.urlencode(q)
        headers = {}
        if self.username is not None:
            cred = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
            headers["Authorization"] = "Basic " + cred
        req = urllib.request.Request(url, headers=headers)
        try:
            with self._opener.open(req, timeout=self.timeout) as r:
                doc = json.loads(r.read().decode())
        except urllib.error.HTTPError as e:
            body = e.read() if e.fp is not None else b""
            raise RegistryError("GET", url, e.code, body) from None
        token = doc.get("token") or doc.get("access_token")
        if not token:
            raise TokenError(f"token endpoint answered without a token: {doc}")
        return token

    def request(self, method, path_or_url, data=None, headers=None, ok=None):
        url = urllib.parse.urljoin(self.base_url + "/", path_or_url)
        key = self._key(method, url)
        hdrs = dict(headers or {})
        with self._token_lock:
            tok = self._tokens.get(key)
        if tok:
            hdrs["Authorization"] = "Bearer " + tok
        resp = super().request(method, url, data=data, headers=hdrs, ok=_ALL_STATUSES)
        challenge = (resp.headers.get("WWW-Authenticate") or "") if resp.status == 401 else ""
        if resp.status == 401 and challenge.lower().startswith("bearer"):
            tok = self.fetch_token(challenge)
            with self._token_lock:
                self._tokens[key] = tok
            hdrs["Authorization"] = "Bearer " + tok
            resp = super().request(method, url, data=data, headers=hdrs, ok=_ALL_STATUSES)
        good = (200 <= resp.status < 300) if ok is None else resp.status in ok
        if not good:
            raise RegistryError(method, url, resp.status, resp.body)
        return resp


__all__ = ["TokenServer", "TokenRegistry", "TokenClient", "TokenRequest", "TokenError",
           "decode_jwt", "parse_scope"]
