#include "engine/auth_parse.h"

#include <gtest/gtest.h>

#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <filesystem>
#include <fstream>

namespace {

using engine::Challenge;
using engine::parse_www_authenticate;

#define EXPECT_HAS(haystack, needle) \
    EXPECT_NE(std::string(haystack).find(needle), std::string::npos) << "'" << (haystack) << "' lacks '" << (needle) << "'"

TEST(WwwAuthenticate, DockerHubBearer) {
    const auto c = parse_www_authenticate(
        R"(Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/ubuntu:pull")");
    ASSERT_EQ(c.size(), 1u);
    EXPECT_EQ(c[0].scheme, "bearer");
    EXPECT_EQ(c[0].params.at("realm"), "https://auth.docker.io/token");
    EXPECT_EQ(c[0].params.at("service"), "registry.docker.io");
    EXPECT_EQ(c[0].params.at("scope"), "repository:library/ubuntu:pull");
}

TEST(WwwAuthenticate, BasicAndCase) {
    const auto c = parse_www_authenticate(R"(BASIC Realm="Registry Realm", charset="UTF-8")");
    ASSERT_EQ(c.size(), 1u);
    EXPECT_EQ(c[0].scheme, "basic");
    EXPECT_EQ(c[0].params.at("realm"), "Registry Realm");
    EXPECT_EQ(c[0].params.at("charset"), "UTF-8");
}

TEST(WwwAuthenticate, MultipleChallenges) {
    // RFC 7235 §4.1 example.
    const auto c = parse_www_authenticate(R"(Newauth realm="apps", type=1, title="Login to \"apps\"", Basic realm="simple")");
    ASSERT_EQ(c.size(), 2u);
    EXPECT_EQ(c[0].scheme, "newauth");
    EXPECT_EQ(c[0].params.at("realm"), "apps");
    EXPECT_EQ(c[0].params.at("type"), "1");
    EXPECT_EQ(c[0].params.at("title"), "Login to \"apps\"");
    EXPECT_EQ(c[1].scheme, "basic");
    EXPECT_EQ(c[1].params.at("realm"), "simple");

    const auto d = parse_www_authenticate("Basic realm=\"a\", Bearer realm=\"b\",service=\"s\"");
    ASSERT_EQ(d.size(), 2u);
    EXPECT_EQ(d[1].scheme, "bearer");
    EXPECT_EQ(d[1].params.at("service"), "s");

    const auto e = parse_www_authenticate("Basic, Bearer realm=x");
    ASSERT_EQ(e.size(), 2u);
    EXPECT_TRUE(e[0].params.empty());
    EXPECT_EQ(e[1].params.at("realm"), "x");
}

TEST(WwwAuthenticate, Token68AndBareSchemes) {
    const auto c = parse_www_authenticate("Negotiate abc+/def==, NTLM, Basic realm=\"r\"");
    ASSERT_EQ(c.size(), 3u);
    EXPECT_EQ(c[0].scheme, "negotiate");
    EXPECT_EQ(c[0].params.at(""), "abc+/def==");
    EXPECT_EQ(c[1].scheme, "ntlm");
    EXPECT_TRUE(c[1].params.empty());
    EXPECT_EQ(c[2].params.at("realm"), "r");
    const auto t = parse_www_authenticate("Bearer");
    ASSERT_EQ(t.size(), 1u);
    EXPECT_EQ(t[0].scheme, "bearer");
}

TEST(WwwAuthenticate, LenientForms) {
    // Unquoted URL, spaces around '=', escapes, duplicate keys (first wins), empty quoted value.
    const auto c = parse_www_authenticate(
        "Bearer  realm = https://auth.example:5001/token?x=1 , service=\"\", Scope=\"a\\\\b\", scope=\"second\"");
    ASSERT_EQ(c.size(), 1u);
    EXPECT_EQ(c[0].params.at("realm"), "https://auth.example:5001/token?x=1");
    EXPECT_EQ(c[0].params.at("service"), "");
    EXPECT_EQ(c[0].params.at("scope"), "a\\b");
    // Unterminated quoted string runs to the end.
    const auto u = parse_www_authenticate("Bearer realm=\"https://x/token, service=y");
    ASSERT_EQ(u.size(), 1u);
    EXPECT_EQ(u[0].params.at("realm"), "https://x/token, service=y");
    // Commas inside quoted strings do not split.
    const auto q = parse_www_authenticate("Bearer scope=\"repository:a:pull,push\",realm=\"r\"");
    ASSERT_EQ(q.size(), 1u);
    EXPECT_EQ(q[0].params.at("scope"), "repository:a:pull,push");
    EXPECT_EQ(q[0].params.at("realm"), "r");
    // Garbage between parameters and challenges is skipped.
    const auto g = parse_www_authenticate("Bearer realm=\"r\" junk, ??? , Basic realm=b");
    ASSERT_EQ(g.size(), 2u);
    EXPECT_EQ(g[0].params.at("realm"), "r");
    EXPECT_EQ(g[1].params.at("realm"), "b");
}

TEST(WwwAuthenticate, Degenerate) {
    EXPECT_TRUE(parse_www_authenticate("").empty());
    EXPECT_TRUE(parse_www_authenticate("   ,, , ").empty());
    EXPECT_TRUE(parse_www_authenticate("\"").empty());
    EXPECT_TRUE(parse_www_authenticate("=").empty());
    EXPECT_TRUE(parse_www_authenticate("realm=\"x\"").empty());
    const auto b = parse_www_authenticate("Bearer realm=\"\\");
    ASSERT_EQ(b.size(), 1u);
    EXPECT_EQ(b[0].params.at("realm"), "");
    const auto e = parse_www_authenticate("Bearer realm=");
    ASSERT_EQ(e.size(), 1u);
    EXPECT_EQ(e[0].params.count("realm"), 0u);
}

TEST(WwwAuthenticate, FuzzNeverCrashes) {
    uint64_t s = 7;
    const auto rnd = [&s]() {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        return s;
    };
    const std::vector<std::string> tokens = {"Bearer", "Basic", " ", ",", "=", "\"", "\\", "realm", "service",
                                             "abc==", "\t", "x", "\x01", "\xff", ";"};
    for (int i = 0; i < 50000; ++i) {
        std::string h;
        const size_t n = rnd() % 30;
        for (size_t k = 0; k < n; ++k) {
            if (rnd() % 4 == 0) h += static_cast<char>(rnd() & 0xff);
            else h += tokens[rnd() % tokens.size()];
        }
        // An exact-size heap copy (no terminating NUL), so ASan flags any read past the end.
        std::unique_ptr<char[]> buf(new char[std::max<size_t>(h.size(), 1)]);
        std::memcpy(buf.get(), h.data(), h.size());
        std::vector<Challenge> c;
        EXPECT_NO_THROW(c = parse_www_authenticate(std::string_view(buf.get(), h.size())));
        for (const auto& ch : c) {
            EXPECT_FALSE(ch.scheme.empty());
            for (const auto& [k, v] : ch.params)
                for (char x : k) EXPECT_FALSE(x >= 'A' && x <= 'Z');
        }
    }
}

TEST(Base64, RoundTrip) {
    EXPECT_EQ(engine::base64_encode(""), "");
    EXPECT_EQ(engine::base64_encode("f"), "Zg==");
    EXPECT_EQ(engine::base64_encode("fo"), "Zm8=");
    EXPECT_EQ(engine::base64_encode("foo"), "Zm9v");
    EXPECT_EQ(engine::base64_encode("foobar"), "Zm9vYmFy");
    EXPECT_EQ(engine::base64_encode("user:pa ss"), "dXNlcjpwYSBzcw==");
    std::string all;
    for (int i = 0; i < 256; ++i) all += static_cast<char>(i);
    for (size_t n = 0; n <= all.size(); ++n) {
        const auto sub = all.substr(256 - n);
        EXPECT_EQ(engine::base64_decode(engine::base64_encode(sub)), sub) << n;
    }
    EXPECT_EQ(engine::base64_encode("\xfb\xff"), "+/8=");
}

TEST(Base64, DecodeStrict) {
    EXPECT_EQ(engine::base64_decode(""), "");
    EXPECT_EQ(engine::base64_decode("Zg=="), "f");
    EXPECT_EQ(engine::base64_decode("Zg"), "f");  // padding optional
    EXPECT_EQ(engine::base64_decode("Zm8"), "fo");
    EXPECT_EQ(engine::base64_decode("Zm9v\r\nYmFy"), "foobar");
    for (const char* bad : {"Z", "Zg=", "Zg===", "Z===", "====", "Zm9v=", "Zg==Zg==", "Zm=v", "Zm9v YmFy", "Zm9-",
                            "Zm9_", "Zm9v!", "Zm8==", "=Zm8"})
        EXPECT_EQ(engine::base64_decode(bad), std::nullopt) << bad;
}

class AuthFiles : public ::testing::Test {
protected:
    void SetUp() override {
        dir_ = std::filesystem::temp_directory_path() /
               ("crossdock-auth-" + std::to_string(::getpid()) + "-" +
                ::testing::UnitTest::GetInstance()->current_test_info()->name());
        std::filesystem::create_directories(dir_);
    }
    void TearDown() override { std::filesystem::remove_all(dir_); }
    std::string write(const std::string& name, const std::string& content) {
        const auto p = dir_ / name;
        std::ofstream(p, std::ios::binary) << content;
        return p.string();
    }
    std::string path(const std::string& name) const { return (dir_ / name).string(); }

    std::filesystem::path dir_;
};

TEST_F(AuthFiles, FindsAndNormalises) {
    const auto b64 = engine::base64_encode("alice:s3cr:et");
    const auto f = write("config.json", R"({"auths": {
        "https://Reg.Example:5000/v2/": {"auth": ")" + b64 + R"("},
        "other.example": {"auth": ")" + engine::base64_encode("bob:pw") + R"(", "identitytoken": "tok"},
        "http://plain.example/": {"username": "u", "password": "p"},
        "https://index.docker.io/v1/": {"auth": ")" + engine::base64_encode("hub:pw") + R"("}
      }, "credsStore": "desktop"})");
    auto r = engine::lookup_docker_config("reg.example:5000", {f});
    ASSERT_TRUE(r.ok()) << r.error().message;
    ASSERT_TRUE(r.value());
    EXPECT_EQ((*r)->username, "alice");
    EXPECT_EQ((*r)->password, "s3cr:et");  // split at the first ':'

    auto o = engine::lookup_docker_config("OTHER.example", {f});
    ASSERT_TRUE(o.ok() && o.value());
    EXPECT_EQ((*o)->identity_token, "tok");
    EXPECT_EQ((*o)->username, "bob");

    auto p = engine::lookup_docker_config("plain.example", {f});
    ASSERT_TRUE(p.ok() && p.value());
    EXPECT_EQ((*p)->username, "u");
    EXPECT_EQ((*p)->password, "p");

    for (const char* hub : {"docker.io", "registry-1.docker.io", "index.docker.io"}) {
        auto h = engine::lookup_docker_config(hub, {f});
        ASSERT_TRUE(h.ok() && h.value()) << hub;
        EXPECT_EQ((*h)->username, "hub");
    }

    auto none = engine::lookup_docker_config("reg.example", {f});  // port matters
    ASSERT_TRUE(none.ok());
    EXPECT_FALSE(none.value());
    auto none2 = engine::lookup_docker_config("reg.example:5001", {f});
    ASSERT_TRUE(none2.ok());
    EXPECT_FALSE(none2.value());
}

TEST_F(AuthFiles, OrderMissingAndExactKeyFirst) {
    const auto first = write("a.json", R"({"auths": {"reg:5000": {"auth": ")" + engine::base64_encode("first:1") + R"("}}})");
    const auto second = write("b.json", R"({"auths": {"reg:5000": {"auth": ")" + engine::base64_encode("second:2") + R"("}}})");
    auto r = engine::lookup_docker_config("reg:5000", {path("missing.json"), path("nodir/x.json"), first, second});
    ASSERT_TRUE(r.ok()) << r.error().message;
    ASSERT_TRUE(r.value());
    EXPECT_EQ((*r)->username, "first");
    auto s = engine::lookup_docker_config("reg:5000", {second, first});
    ASSERT_TRUE(s.ok() && s.value());
    EXPECT_EQ((*s)->username, "second");

    // Within one file, the key written exactly as asked beats a normalised one.
    const auto both = write("c.json", R"({"auths": {"https://reg:5000": {"auth": ")" + engine::base64_encode("norm:1") +
                                          R"("}, "reg:5000": {"auth": ")" + engine::base64_encode("exact:1") + R"("}}})");
    auto e = engine::lookup_docker_config("reg:5000", {both});
    ASSERT_TRUE(e.ok() && e.value());
    EXPECT_EQ((*e)->username, "exact");

    // Empty entries and files without auths fall through to the next file.
    const auto empty_entry = write("d.json", R"({"auths": {"reg:5000": {}}})");
    const auto no_auths = write("e.json", R"({"credHelpers": {"reg:5000": "x"}})");
    const auto empty_file = write("f.json", "  \n");
    auto f = engine::lookup_docker_config("reg:5000", {empty_entry, no_auths, empty_file, second});
    ASSERT_TRUE(f.ok()) << f.error().message;
    ASSERT_TRUE(f.value());
    EXPECT_EQ((*f)->username, "second");

    auto nothing = engine::lookup_docker_config("reg:5000", {});
    ASSERT_TRUE(nothing.ok());
    EXPECT_FALSE(nothing.value());
}

TEST_F(AuthFiles, ErrorsNameTheFileButNotTheSecret) {
    const std::string secret = "hunter2-very-secret";
    const auto bad_json = write("bad.json", R"({"auths": {"reg": {"auth": ")" + secret + R"(" }})");
    auto r = engine::lookup_docker_config("reg", {bad_json});
    ASSERT_FALSE(r.ok());
    EXPECT_HAS(r.error().message, bad_json);
    EXPECT_HAS(r.error().message, "not valid JSON");
    EXPECT_EQ(r.error().message.find(secret), std::string::npos) << r.error().message;

    const auto bad_b64 = write("b64.json", R"({"auths": {"reg": {"auth": ")" + secret + R"(!"}}})");
    auto b = engine::lookup_docker_config("reg", {bad_b64});
    ASSERT_FALSE(b.ok());
    EXPECT_HAS(b.error().message, bad_b64);
    EXPECT_HAS(b.error().message, "auths['reg'].auth is not valid base64");
    EXPECT_EQ(b.error().message.find(secret), std::string::npos);

    const auto no_colon = write("nc.json", R"({"auths": {"reg": {"auth": ")" + engine::base64_encode(secret) + R"("}}})");
    auto n = engine::lookup_docker_config("reg", {no_colon});
    ASSERT_FALSE(n.ok());
    EXPECT_HAS(n.error().message, "user:password");
    EXPECT_EQ(n.error().message.find(secret), std::string::npos);

    auto t = engine::lookup_docker_config("reg", {write("t.json", R"({"auths": []})")});
    ASSERT_FALSE(t.ok());
    EXPECT_HAS(t.error().message, "\"auths\" is not an object");
    auto a = engine::lookup_docker_config("reg", {write("a.json", R"([1])")});
    ASSERT_FALSE(a.ok());
    EXPECT_HAS(a.error().message, "not a JSON object");
    auto e = engine::lookup_docker_config("reg", {write("e.json", R"({"auths": {"reg": "x"}})")});
    ASSERT_FALSE(e.ok());
    EXPECT_HAS(e.error().message, "auths['reg'] is not an object");
    auto i = engine::lookup_docker_config("reg", {write("i.json", R"({"auths": {"reg": {"identitytoken": 5}}})")});
    ASSERT_FALSE(i.ok());
    EXPECT_HAS(i.error().message, "identitytoken is not a string");
    auto big = engine::lookup_docker_config("reg", {write("n.json", R"({"auths": {"reg": {"x": 1e400}}})")});
    ASSERT_FALSE(big.ok());
    EXPECT_HAS(big.error().message, "not valid JSON");
    // A non-matching malformed entry elsewhere in the file is not looked at.
    auto other = engine::lookup_docker_config("reg", {write("o.json", R"({"auths": {"other": {"auth": "!!"}}})")});
    ASSERT_TRUE(other.ok());
    EXPECT_FALSE(other.value());
    // A directory where a file is expected is an error, not "missing".
    std::filesystem::create_directories(dir_ / "isdir");
    auto d = engine::lookup_docker_config("reg", {path("isdir")});
    ASSERT_FALSE(d.ok());
    EXPECT_HAS(d.error().message, "isdir");
}

TEST(DefaultAuthFiles, Order) {
    const auto save = [](const char* n) -> std::optional<std::string> {
        const char* v = std::getenv(n);
        return v ? std::optional<std::string>(v) : std::nullopt;
    };
    const char* names[] = {"REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR", "DOCKER_CONFIG", "HOME"};
    std::vector<std::optional<std::string>> saved;
    for (const char* n : names) saved.push_back(save(n));

    ::setenv("REGISTRY_AUTH_FILE", "/a/auth.json", 1);
    ::setenv("XDG_RUNTIME_DIR", "/run/user/1", 1);
    ::setenv("DOCKER_CONFIG", "/dc", 1);
    ::setenv("HOME", "/home/u", 1);
    EXPECT_EQ(engine::default_auth_files(),
              (std::vector<std::string>{"/a/auth.json", "/run/user/1/containers/auth.json", "/dc/config.json"}));
    ::unsetenv("DOCKER_CONFIG");
    ::setenv("REGISTRY_AUTH_FILE", "", 1);
    ::unsetenv("XDG_RUNTIME_DIR");
    EXPECT_EQ(engine::default_auth_files(), (std::vector<std::string>{"/home/u/.docker/config.json"}));
    ::unsetenv("HOME");
    ::unsetenv("REGISTRY_AUTH_FILE");
    EXPECT_TRUE(engine::default_auth_files().empty());

    for (size_t i = 0; i < saved.size(); ++i) {
        if (saved[i]) ::setenv(names[i], saved[i]->c_str(), 1);
        else ::unsetenv(names[i]);
    }
}

TEST(LinkNext, Distribution) {
    const std::string req = "https://reg.example:5000/v2/_catalog?n=2";
    EXPECT_EQ(engine::parse_link_next(R"(</v2/_catalog?last=b&n=2>; rel="next")", req),
              "https://reg.example:5000/v2/_catalog?last=b&n=2");
    EXPECT_EQ(engine::parse_link_next("<https://other/v2/x?last=1>; rel=next", req), "https://other/v2/x?last=1");
    EXPECT_EQ(engine::parse_link_next("<//cdn.example/v2/x>; rel=\"next\"", req), "https://cdn.example/v2/x");
    EXPECT_EQ(engine::parse_link_next("<?last=c>; rel=\"next\"", req), "https://reg.example:5000/v2/_catalog?last=c");
    EXPECT_EQ(engine::parse_link_next("<list?last=c>; rel=\"next\"", "http://h/v2/repo/tags/list?n=1"),
              "http://h/v2/repo/tags/list?last=c");
    EXPECT_EQ(engine::parse_link_next("</v2/x>; rel=\"next\"", "http://[::1]:5000"), "http://[::1]:5000/v2/x");
    // Multiple links, several rel values, other params, case.
    EXPECT_EQ(engine::parse_link_next(
                  R"(</v2/a?p=1>; rel="prev", </v2/a?p=3>; title="x, y; z"; REL="last next"; type="a/b")", req),
              "https://reg.example:5000/v2/a?p=3");
    EXPECT_EQ(engine::parse_link_next(R"(</v2/a?x=1,2>; rel = "next")", req), "https://reg.example:5000/v2/a?x=1,2");
}

TEST(LinkNext, NoNext) {
    const std::string req = "https://h/v2/_catalog";
    EXPECT_EQ(engine::parse_link_next("", req), std::nullopt);
    EXPECT_EQ(engine::parse_link_next("</v2/a>; rel=\"prev\"", req), std::nullopt);
    EXPECT_EQ(engine::parse_link_next("</v2/a>; rel=\"nextpage\"", req), std::nullopt);
    EXPECT_EQ(engine::parse_link_next("</v2/a>", req), std::nullopt);
    EXPECT_EQ(engine::parse_link_next("</v2/a; rel=\"next\"", req), std::nullopt);  // unterminated
    EXPECT_EQ(engine::parse_link_next("<>; rel=\"next\"", req), std::nullopt);
    EXPECT_EQ(engine::parse_link_next("/v2/a; rel=\"next\"", req), std::nullopt);
    // Only the first rel counts (RFC 8288 §3.3).
    EXPECT_EQ(engine::parse_link_next("</v2/a>; rel=\"prev\"; rel=\"next\"", req), std::nullopt);
}

TEST(LinkNext, FuzzNeverCrashes) {
    uint64_t s = 5;
    const auto rnd = [&s]() {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        return s;
    };
    const std::vector<std::string> tokens = {"<", ">", ";", ",", "rel", "=", "\"", "next", " ", "/v2/", "\\", "?", "//",
                                             "http:"};
    for (int i = 0; i < 30000; ++i) {
        std::string h;
        const size_t n = rnd() % 20;
        for (size_t k = 0; k < n; ++k) h += tokens[rnd() % tokens.size()];
        std::unique_ptr<char[]> buf(new char[std::max<size_t>(h.size(), 1)]);
        std::memcpy(buf.get(), h.data(), h.size());
        EXPECT_NO_THROW((void)engine::parse_link_next(std::string_view(buf.get(), h.size()),
                                                      rnd() % 2 ? "https://h:1/v2/x" : "garbage"));
    }
}

TEST(UrlEncode, Component) {
    EXPECT_EQ(engine::url_encode_component("AZaz09-._~"), "AZaz09-._~");
    EXPECT_EQ(engine::url_encode_component("repository:a/b:pull,push"), "repository%3Aa%2Fb%3Apull%2Cpush");
    EXPECT_EQ(engine::url_encode_component("a b+c&d=e?f#g%"), "a%20b%2Bc%26d%3De%3Ff%23g%25");
    EXPECT_EQ(engine::url_encode_component(std::string("\x00\xff", 2)), "%00%FF");
    EXPECT_EQ(engine::url_encode_component(""), "");
}

TEST(Redact, Secrets) {
    EXPECT_EQ(engine::redact("user alice pass hunter2 and hunter2", {"hunter2"}), "user alice pass *** and ***");
    EXPECT_EQ(engine::redact("token=abcdef", {"abc", "abcdef"}), "token=***");
    EXPECT_EQ(engine::redact("nothing here", {"", "zzz"}), "nothing here");
    EXPECT_EQ(engine::redact("***", {"*"}), "*********");
    EXPECT_EQ(engine::redact("aaaa", {"aa"}), "******");
    EXPECT_EQ(engine::redact("", {"x"}), "");
}

TEST(Credentials, Empty) {
    engine::Credentials c;
    EXPECT_TRUE(c.empty());
    c.identity_token = "t";
    EXPECT_FALSE(c.empty());
}

}  // namespace
