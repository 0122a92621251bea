#include "engine/reference.h"

#include <gtest/gtest.h>

namespace {

using engine::parse_registry_ref;

struct Good {
    const char* in;
    const char* host;
    const char* ns;
};

TEST(RegistryRef, Accepts) {
    const Good cases[] = {
        {"localhost", "localhost", ""},
        {"localhost:5000", "localhost:5000", ""},
        {"localhost:5000/", "localhost:5000", ""},
        {"registry.example.com/team", "registry.example.com", "team"},
        {"Registry.Example.COM:443/team/sub", "registry.example.com:443", "team/sub"},
        {"reg.example.com/a/b/c/", "reg.example.com", "a/b/c"},
        {"reg.example.com/a//", "reg.example.com", "a"},
        {"127.0.0.1:5000/mirror", "127.0.0.1:5000", "mirror"},
        {"10.0.0.1", "10.0.0.1", ""},
        {"[::1]:5000/ns", "[::1]:5000", "ns"},
        {"[::1]", "[::1]", ""},
        {"[FE80::1]:65535", "[fe80::1]:65535", ""},
        {"my-registry:1/x", "my-registry:1", "x"},
        {"docker.io/library", "docker.io", "library"},
        {"ghcr.io/some-org/team_a/x.y/a__b/c---d", "ghcr.io", "some-org/team_a/x.y/a__b/c---d"},
        {"a", "a", ""},
        {"xn--bcher-kva.example/ns", "xn--bcher-kva.example", "ns"},
    };
    for (const auto& c : cases) {
        auto r = parse_registry_ref(c.in);
        ASSERT_TRUE(r.ok()) << c.in << ": " << r.error().message;
        EXPECT_EQ(r->host, c.host) << c.in;
        EXPECT_EQ(r->ns, c.ns) << c.in;
    }
}

void expect_error(const char* in, const char* needle) {
    auto r = parse_registry_ref(in);
    ASSERT_FALSE(r.ok()) << in << " was accepted as " << r->host << " / " << r->ns;
    EXPECT_NE(r.error().message.find(needle), std::string::npos) << in << ": " << r.error().message;
    EXPECT_EQ(r.error().code, std::errc::invalid_argument);
}

TEST(RegistryRef, Rejects) {
    expect_error("", "empty");
    expect_error("http://localhost:5000/ns", "scheme");
    expect_error("https://localhost:5000", "'https://'");
    expect_error("oci://x", "scheme");
    expect_error("localhost:5000/ns:latest", "tag");
    expect_error("localhost:5000/ns/app:1.0", "tag");
    expect_error("localhost:5000/ns@sha256:abcd", "digest");
    expect_error("ubuntu:latest", "port 'latest' is not a number");
    expect_error("localhost:", "port after ':' is empty");
    expect_error("localhost:0", "1..65535");
    expect_error("localhost:65536", "1..65535");
    expect_error("localhost:05000", "1..65535");
    expect_error("localhost:123456", "1..65535");
    expect_error("localhost:-1", "not a number");
    expect_error("/ns", "host is missing");
    expect_error(":5000/ns", "host is empty");
    expect_error("user:pass@host/ns", "credentials");
    expect_error("reg.example.com/Team", "lowercase");
    expect_error("reg.example.com/a//b", "empty component");
    expect_error("reg.example.com/-a", "invalid");
    expect_error("reg.example.com/a-", "invalid");
    expect_error("reg.example.com/a..b", "invalid");
    expect_error("reg.example.com/a___b", "invalid");
    expect_error("reg.example.com/a._b", "invalid");
    expect_error("reg.example.com/a b", "whitespace");
    expect_error(" reg.example.com", "whitespace");
    expect_error("reg.example.com\n", "whitespace");
    expect_error("-bad.example.com", "not a valid host name");
    expect_error("bad-.example.com", "not a valid host name");
    expect_error("bad..example.com", "not a valid host name");
    expect_error("bad_host.example.com", "not a valid host name");
    expect_error("reg.example.com.", "not a valid host name");
    expect_error("256.1.1.1", "IPv4");
    expect_error("1.2.3", "IPv4");
    expect_error("::1", "brackets");
    expect_error("::1/ns", "brackets");
    expect_error("[::1", "never closed");
    expect_error("[::1]x", "after the IPv6");
    expect_error("[zz::1]:5000", "IPv6");
    expect_error("[fe80::1%eth0]", "IPv6");
    expect_error("[]", "IPv6");
    expect_error((std::string(64, 'a') + ".com").c_str(), "not a valid host name");
    expect_error(("reg/" + std::string(256, 'a')).c_str(), "longer than 255");
}

TEST(RegistryRef, ToString) {
    auto r = parse_registry_ref("Reg.Example:5000/a/b/");
    ASSERT_TRUE(r.ok());
    EXPECT_EQ(r->to_string(), "reg.example:5000/a/b");
    auto h = parse_registry_ref("reg.example");
    ASSERT_TRUE(h.ok());
    EXPECT_EQ(h->to_string(), "reg.example");
}

TEST(RegistryRef, ErrorQuotesControlCharacters) {
    auto r = parse_registry_ref(std::string_view("a\x01" "b", 3));
    ASSERT_FALSE(r.ok());
    EXPECT_NE(r.error().message.find("\\x01"), std::string::npos) << r.error().message;
}

TEST(RegistryRef, RandomInputNeverCrashes) {
    uint64_t s = 99;
    const std::string alphabet = "aZ09.-_/:@[]%\x01 ";
    for (int i = 0; i < 50000; ++i) {
        std::string v;
        s = s * 6364136223846793005ULL + 1442695040888963407ULL;
        const size_t len = (s >> 33) % 30;
        for (size_t k = 0; k < len; ++k) {
            s = s * 6364136223846793005ULL + 1442695040888963407ULL;
            v += alphabet[(s >> 33) % alphabet.size()];
        }
        auto r = parse_registry_ref(v);
        if (r.ok()) {
            EXPECT_FALSE(r->host.empty());
            if (!r->ns.empty()) {
                EXPECT_TRUE(engine::is_valid_repo_name(r->ns)) << v;
            }
        } else {
            EXPECT_FALSE(r.error().message.empty());
        }
    }
}

TEST(JoinRepo, Cases) {
    EXPECT_EQ(engine::join_repo("ns", "app"), "ns/app");
    EXPECT_EQ(engine::join_repo("a/b", "c/d"), "a/b/c/d");
    EXPECT_EQ(engine::join_repo("", "app"), "app");
    EXPECT_EQ(engine::join_repo("ns", ""), "ns");
    EXPECT_EQ(engine::join_repo("", ""), "");
}

TEST(RepoName, Grammar) {
    for (const char* ok : {"a", "library/ubuntu", "a/b/c", "a.b", "a_b", "a__b", "a-b", "a---b", "0", "a1/b2",
                           "foo.bar_baz-qux/x"})
        EXPECT_TRUE(engine::is_valid_repo_name(ok)) << ok;
    for (const char* bad : {"", "A", "a/", "/a", "a//b", "a..b", "a___b", "-a", "a-", "_a", "a_", ".a", "a.",
                            "a:b", "a@b", "a b", "a._b", "a-.b", "a_-b"})
        EXPECT_FALSE(engine::is_valid_repo_name(bad)) << bad;
    EXPECT_TRUE(engine::is_valid_repo_name(std::string(255, 'a')));
    EXPECT_FALSE(engine::is_valid_repo_name(std::string(256, 'a')));
}

TEST(Tag, Grammar) {
    for (const char* ok : {"latest", "v1.0.0", "_x", "1", "A-b_c.d", "sha256-abc.sig"})
        EXPECT_TRUE(engine::is_valid_tag(ok)) << ok;
    for (const char* bad : {"", ".x", "-x", "a:b", "a/b", "a@b", "a b", "ä"})
        EXPECT_FALSE(engine::is_valid_tag(bad)) << bad;
    EXPECT_TRUE(engine::is_valid_tag(std::string(128, 'a')));
    EXPECT_FALSE(engine::is_valid_tag(std::string(129, 'a')));
}

}  // namespace
