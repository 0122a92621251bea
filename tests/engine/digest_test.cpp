#include "cas/digest.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace {

constexpr const char* kEmptySha = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
constexpr const char* kAbcSha = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

TEST(Sha256, KnownVectors) {
    EXPECT_EQ(cas::sha256_digest(""), std::string("sha256:") + kEmptySha);
    EXPECT_EQ(cas::sha256_digest("abc"), std::string("sha256:") + kAbcSha);
    // FIPS 180-2 two-block vector.
    EXPECT_EQ(cas::sha256_digest("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
              "sha256:248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
}

TEST(Sha256, IncrementalMatchesOneShot) {
    std::string data;
    for (int i = 0; i < 100000; ++i) data += static_cast<char>(i * 31 + 7);
    cas::Sha256 h;
    size_t off = 0;
    for (size_t step = 1; off < data.size(); step = step * 3 % 4099 + 1) {
        const size_t n = std::min(step, data.size() - off);
        h.update(std::span<const char>(data.data() + off, n));
        off += n;
    }
    EXPECT_EQ(h.finish_digest(), cas::sha256_digest(data));
}

TEST(Sha256, OverloadsAndReset) {
    cas::Sha256 h;
    h.update("a");                     // literal
    h.update(std::string("b"));        // std::string
    h.update(std::string_view("c"));   // string_view
    std::vector<char> none;
    h.update(std::span<const char>(none));  // empty span is a no-op
    EXPECT_EQ(h.finish_hex(), kAbcSha);
    // finish resets: the next stream starts fresh.
    EXPECT_EQ(h.finish_hex(), kEmptySha);
    h.update("abc");
    EXPECT_EQ(h.finish_digest(), std::string("sha256:") + kAbcSha);
}

TEST(Sha256, MoveOnly) {
    static_assert(!std::is_copy_constructible_v<cas::Sha256>);
    static_assert(std::is_nothrow_move_constructible_v<cas::Sha256>);
    cas::Sha256 a;
    a.update("ab");
    cas::Sha256 b(std::move(a));
    b.update("c");
    EXPECT_EQ(b.finish_hex(), kAbcSha);
    cas::Sha256 c;
    c = std::move(b);
    EXPECT_EQ(c.finish_hex(), kEmptySha);
}

TEST(Digest, Validity) {
    const std::string hex64(64, 'a');
    const std::string hex128(128, '0');
    EXPECT_TRUE(cas::is_valid_digest("sha256:" + hex64));
    EXPECT_TRUE(cas::is_valid_digest(std::string("sha256:") + kAbcSha));
    EXPECT_TRUE(cas::is_valid_digest("sha512:" + hex128));
    EXPECT_TRUE(cas::is_valid_digest("blake3:" + hex64));
    // Unregistered algorithms: syntax only.
    EXPECT_TRUE(cas::is_valid_digest("multihash+base58:QmRZxt2b1FVZPNqd8hsiykDL3TdBDeTSPX9Kv46HmX4Gx8"));
    EXPECT_TRUE(cas::is_valid_digest("sha256+b64u:LCa0a2j_xo_5m0U8HTBBNBNCLXBkg7-g-YpeiGJm564"));
    EXPECT_TRUE(cas::is_valid_digest("foo.bar_baz-1:A=_-z"));

    EXPECT_FALSE(cas::is_valid_digest(""));
    EXPECT_FALSE(cas::is_valid_digest("sha256"));
    EXPECT_FALSE(cas::is_valid_digest("sha256:"));
    EXPECT_FALSE(cas::is_valid_digest(":" + hex64));
    EXPECT_FALSE(cas::is_valid_digest("sha256:" + std::string(63, 'a')));
    EXPECT_FALSE(cas::is_valid_digest("sha256:" + std::string(65, 'a')));
    EXPECT_FALSE(cas::is_valid_digest("sha256:" + std::string(64, 'A')));  // uppercase hex
    EXPECT_FALSE(cas::is_valid_digest("sha256:" + std::string(63, 'a') + "g"));
    EXPECT_FALSE(cas::is_valid_digest("sha512:" + hex64));
    EXPECT_FALSE(cas::is_valid_digest("SHA256:" + hex64));
    EXPECT_FALSE(cas::is_valid_digest("sha256::" + hex64));
    EXPECT_FALSE(cas::is_valid_digest("+sha:abc"));
    EXPECT_FALSE(cas::is_valid_digest("sha+:abc"));
    EXPECT_FALSE(cas::is_valid_digest("sh++a:abc"));
    EXPECT_FALSE(cas::is_valid_digest("foo:abc def"));
    EXPECT_FALSE(cas::is_valid_digest("foo:abc/def"));
    EXPECT_FALSE(cas::is_valid_digest(std::string("sha256:") + kAbcSha + "\n"));
}

TEST(Digest, IsSha256) {
    EXPECT_TRUE(cas::is_sha256_digest(std::string("sha256:") + kEmptySha));
    EXPECT_FALSE(cas::is_sha256_digest(kEmptySha));
    EXPECT_FALSE(cas::is_sha256_digest("sha512:" + std::string(128, 'a')));
    EXPECT_FALSE(cas::is_sha256_digest("sha256:" + std::string(64, 'F')));
    EXPECT_FALSE(cas::is_sha256_digest("sha256+b64u:LCa0a2j_xo_5m0U8HTBBNBNCLXBkg7-g-YpeiGJm564"));
    EXPECT_FALSE(cas::is_sha256_digest("latest"));
}

TEST(Xxh3, KnownAndStable) {
    EXPECT_EQ(cas::xxh3_64(std::span<const char>()), 0x2D06800538D394C2ULL);
    const std::string a = "hello world";
    const std::string b = "hello worle";
    EXPECT_EQ(cas::xxh3_64(a), cas::xxh3_64(std::span<const char>(a.data(), a.size())));
    EXPECT_NE(cas::xxh3_64(a), cas::xxh3_64(b));
}

}  // namespace
