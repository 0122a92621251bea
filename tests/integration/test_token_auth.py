"""`crossdock mirror` between registries that use bearer-token auth.

Each registry is docker-registry 2.8 with ``auth: token`` trusting its own
TokenServer (tokenserver.py: RS256 JWTs signed with the openssl CLI, x5c
header, ``access`` claims for the scopes asked).  Source and target have
their own token server and their own users; the harness pushes and checks
with a separate "harness" user, so the token servers' logs tell crossdock's
token requests apart, and the registries' access logs tell crossdock's
requests apart by User-Agent.

What is checked: a mirror with the right credentials copies everything
(registry API through a token-speaking client, and skopeo); a wrong
password fails with exit 1 and a clear message that does not contain the
password; tokens are requested per scope and cached (far fewer token
requests than registry requests).

``TokenServerSelfTest`` checks the token server and registry setup itself
(no crossdock needed).
"""

import collections
import os
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import check  # noqa: E402
import corpus  # noqa: E402
from tokenserver import TokenRegistry, TokenServer, decode_jwt, parse_scope  # noqa: E402
from test_mirror import AUTH_WORDS, CROSSDOCK, MirrorTestCase, crossdock  # noqa: E402

SRC_NS = "src-ns"
DST_NS = "dst"
HARNESS = ("harness", "h4rness-Pa55")
SRC_USER = ("srcuser", "src-T0ken-Pa55")
DST_USER = ("dstuser", "dst-T0ken-Pa55")
WRITE_METHODS = ("POST", "PUT", "PATCH", "DELETE")


class TokenTestCase(MirrorTestCase):
    def token_registry(self, name, user):
        ts = TokenServer(dict([HARNESS, user]), name=f"{name}-token")
        ts.start()
        self.addCleanup(ts.stop)
        reg = TokenRegistry(ts, name=name)
        reg.start()
        self.addCleanup(reg.stop)
        return ts, reg

    @staticmethod
    def harness_client(reg):
        return reg.client(*HARNESS)


class TokenServerSelfTest(TokenTestCase):
    def test_registry_trusts_the_token_server(self):
        ts, reg = self.token_registry("selftest", SRC_USER)
        anon = corpus.RegistryClient(reg.url)
        with self.assertRaises(corpus.RegistryError) as cm:
            anon.ping()
        self.assertEqual(cm.exception.status, 401)
        cl = self.harness_client(reg)
        self.assertEqual(cl.ping(), 200)
        m = corpus.push_image(cl, "a/b", "v1", "selftest")
        self.assertEqual(check.manifest_digest(cl, "a/b", "v1"), m.digest)
        self.assertEqual(check.catalog(cl), ["a/b"])
        granted = [r for r in ts.requests(HARNESS[0]) if r.granted]
        # The registry's challenge may list the actions in either order.
        self.assertTrue(any(s in r.scopes for r in granted
                            for s in ("repository:a/b:pull,push", "repository:a/b:push,pull")), ts.log)
        # The token carries x5c, RS256 and the access asked for.
        header, claims = decode_jwt(ts.issue("x", ["repository:a/b:pull"])[0])
        self.assertEqual(header["alg"], "RS256")
        self.assertEqual(len(header["x5c"]), 1)
        self.assertEqual((claims["iss"], claims["aud"]), ("test-issuer", "test-registry"))
        self.assertIn({"type": "repository", "name": "a/b", "actions": ["pull"]},
                      claims["access"])
        self.assertIn({"type": "registry", "name": "catalog", "actions": ["*"]},
                      claims["access"])
        self.assertEqual(parse_scope("repository:x/y:pull,push"),
                         ("repository", "x/y", ["pull", "push"]))

    def test_scopes_are_enforced_and_passwords_checked(self):
        ts, reg = self.token_registry("selftest", SRC_USER)
        pull_only, _ = ts.issue(HARNESS[0], ["repository:a/b:pull"])
        r = corpus.RegistryClient(reg.url).request(
            "POST", "/v2/a/b/blobs/uploads/", headers={"Authorization": "Bearer " + pull_only},
            ok=(401, 403))
        self.assertIn(r.status, (401, 403), "a pull-only token may not push")
        with self.assertRaises(corpus.RegistryError) as cm:
            reg.client(SRC_USER[0], "wrong").ping()
        self.assertEqual(cm.exception.status, 401)
        self.assertEqual([r.granted for r in ts.requests(SRC_USER[0])], [False])
        self.assertEqual(reg.client(*SRC_USER).ping(), 200)


class TokenAuthMirrorTest(TokenTestCase):
    @classmethod
    def setUpClass(cls):
        if not (os.path.isfile(CROSSDOCK) and os.access(CROSSDOCK, os.X_OK)):
            raise RuntimeError(f"crossdock binary not found at {CROSSDOCK} "
                               "(build it, or set CROSSDOCK_BIN)")

    def setup_pair(self):
        src_ts, src = self.token_registry("src-token", SRC_USER)
        dst_ts, dst = self.token_registry("tgt-token", DST_USER)
        c = corpus.push_corpus(self.harness_client(src), SRC_NS, outside=False)
        return src_ts, src, dst_ts, dst, c

    def mirror(self, src, dst, src_creds, dst_creds, *flags):
        return crossdock("mirror", f"{src.host}/{SRC_NS}", f"{dst.host}/{DST_NS}",
                         "--insecure", "--json", "--src-creds", src_creds,
                         "--dest-creds", dst_creds, *flags)

    @staticmethod
    def crossdock_requests(reg):
        return [e for e in reg.access_log_ua() if "crossdock" in e[3].lower()]

    def test_mirror_with_token_auth(self):
        src_ts, src, dst_ts, dst, c = self.setup_pair()
        run = self.mirror(src, dst, ":".join(SRC_USER), ":".join(DST_USER))
        entries = c.in_namespace()
        self.assertExit(run, 0)
        s = self.assertSummaryShape(run)
        self.assertEqual(s["failed"], 0, run.describe())
        self.assertItems(run, f"{dst.host}/{DST_NS}", entries, "copied")
        for pw in (SRC_USER[1], DST_USER[1]):
            self.assertNotIn(pw, run.output, "password leaked into output")

        # Registry API, through the token flow (harness user).
        hc = self.harness_client(dst)
        self.assertCatalog(dst, DST_NS, c.repositories(), client=hc)
        self.assertTags(dst, DST_NS, entries, client=hc)
        self.assertMirrored(dst, DST_NS, entries, client=hc)
        # skopeo speaks the token flow on its own.
        for rel, tag in (("team-a/web", "v1"), ("team-b/worker", "multi")):
            self.assertEqual(
                check.skopeo_raw_digest(dst.host, f"{DST_NS}/{rel}", tag,
                                        creds=":".join(HARNESS)),
                c.entry(rel, tag).digest, f"skopeo {rel}:{tag}")

        # Token requests: crossdock's own, all granted, per scope, and cached.
        src_tok = src_ts.requests(SRC_USER[0])
        dst_tok = dst_ts.requests(DST_USER[0])
        tokens = src_tok + dst_tok
        reg_requests = self.crossdock_requests(src) + self.crossdock_requests(dst)
        per_scope = collections.Counter(" ".join(r.scopes) for r in tokens)
        stats = (f"\n{len(tokens)} token requests ({len(src_tok)} source, {len(dst_tok)} "
                 f"target), {len(reg_requests)} registry requests by crossdock; "
                 f"token requests per scope set: {dict(per_scope)}")
        self.assertTrue(tokens, "crossdock asked no token server for a token" + stats)
        self.assertTrue(all(r.granted for r in tokens),
                        f"refused token requests: {[r for r in tokens if not r.granted]}"
                        + stats + run.describe())
        self.assertEqual([r for r in src_ts.requests() + dst_ts.requests()
                          if r.user not in (HARNESS[0], SRC_USER[0], DST_USER[0])], [],
                         "token requests without (or with other) credentials")

        def scopes_of(reqs):
            out = set()
            for r in reqs:
                for sc in r.scopes:
                    typ, name, actions = parse_scope(sc)
                    out.add((typ, name, frozenset(actions)))
            return out
        src_scopes, dst_scopes = scopes_of(src_tok), scopes_of(dst_tok)
        self.assertTrue(any(t == "registry" and n == "catalog" for t, n, _ in src_scopes),
                        "no token for registry:catalog:* on the source" + stats)
        for rel in c.repositories():
            self.assertTrue(any(t == "repository" and n == f"{SRC_NS}/{rel}" and "pull" in a
                                for t, n, a in src_scopes),
                            f"no pull token for {SRC_NS}/{rel} on the source" + stats)
            self.assertTrue(any(t == "repository" and n == f"{DST_NS}/{rel}" and "push" in a
                                for t, n, a in dst_scopes),
                            f"no push token for {DST_NS}/{rel} on the target" + stats)
        self.assertFalse(any(n.startswith(DST_NS + "/") for _, n, _ in src_scopes),
                         "target scopes asked from the source's token server" + stats)
        # Cached per scope: not a new token for every request.
        self.assertLess(len(tokens), len(reg_requests) / 3,
                        "crossdock fetches a token for (almost) every request" + stats)

    def _wrong_password(self, side):
        src_ts, src, dst_ts, dst, c = self.setup_pair()
        bad = f"Wr0ng-{side}-T0KEN-pw-77"
        src_creds = f"{SRC_USER[0]}:{bad}" if side == "src" else ":".join(SRC_USER)
        dst_creds = f"{DST_USER[0]}:{bad}" if side == "dst" else ":".join(DST_USER)
        run = self.mirror(src, dst, src_creds, dst_creds, "--repo", "team-a/.*")
        self.assertExit(run, 1)
        self.assertNotIn(bad, run.output, "password leaked into output")
        low = run.output.lower()
        self.assertTrue(any(w in low for w in AUTH_WORDS),
                        "no clear authentication error" + run.describe())
        s = self.assertSummaryShape(run)
        errors = s.get("errors") or []
        self.assertTrue(s["failed"] > 0 or errors, "summary names no failure" + run.describe())
        named = " ".join([it["reason"] for it in run.items] + list(errors)).lower()
        self.assertTrue(any(w in named for w in AUTH_WORDS),
                        "the summary's failure does not say it is about authentication"
                        + run.describe())
        self.assertEqual(s["copied"], 0, run.describe())
        # The token server saw the wrong password and refused it.
        ts, user = (src_ts, SRC_USER[0]) if side == "src" else (dst_ts, DST_USER[0])
        refused = [r for r in ts.requests(user) if not r.granted]
        self.assertTrue(refused, f"{side} token server saw no refused request: {ts.log}"
                        + run.describe())
        # Nothing was written to the target.
        writes = [e for e in self.crossdock_requests(dst)
                  if e[0] in WRITE_METHODS and 200 <= e[2] < 300]
        self.assertEqual(writes, [], "crossdock wrote to the target")
        self.assertEqual(check.catalog(self.harness_client(dst)), [])
        return run

    def test_wrong_source_password(self):
        self._wrong_password("src")

    def test_wrong_target_password(self):
        self._wrong_password("dst")


if __name__ == "__main__":
    unittest.main(verbosity=2)
