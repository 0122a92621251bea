// Content digests: SHA-256 (the OCI content address) and xxh3 (fast, non-cryptographic: cache keys
// and dedup hints only, never an identity).
//
// Digest strings follow the OCI image-spec grammar (descriptor.md, "Digests"):
//   digest    ::= algorithm ":" encoded
//   algorithm ::= component ([+._-] component)*      component ::= [a-z0-9]+
//   encoded   ::= [a-zA-Z0-9=_-]+
// with the registered algorithms held to their exact encodings: sha256 = 64 lowercase hex,
// sha512 = 128 lowercase hex, blake3 = 64 lowercase hex.
//
// Threading: everything here is reentrant; a Sha256 object belongs to one thread at a time.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>

// OpenSSL's EVP_MD_CTX, declared here so this header does not pull in OpenSSL.
struct evp_md_ctx_st;

namespace cas {

// Incremental SHA-256 on an OpenSSL EVP context. Move-only; a moved-from object may only be
// destroyed or assigned to. finish_*() returns the digest of everything fed since construction
// (or since the previous finish_*()) and resets the object, so it can hash the next stream.
// The constructor throws std::bad_alloc / std::runtime_error if OpenSSL cannot set up a context
// (set-up, not the data path).
class Sha256 {
public:
    Sha256();
    Sha256(Sha256&&) noexcept = default;
    Sha256& operator=(Sha256&&) noexcept = default;
    Sha256(const Sha256&) = delete;
    Sha256& operator=(const Sha256&) = delete;
    ~Sha256() = default;

    void update(std::span<const char> data) noexcept;
    void update(std::string_view s) noexcept;
    // Without these two, a std::string or a literal converts equally well to span and string_view.
    void update(const std::string& s) noexcept { update(std::string_view(s)); }
    void update(const char* s) noexcept { update(std::string_view(s)); }
    std::string finish_hex();     // 64 lowercase hex digits
    std::string finish_digest();  // "sha256:" + finish_hex()

private:
    struct CtxDeleter {
        void operator()(evp_md_ctx_st* ctx) const noexcept;
    };
    std::unique_ptr<evp_md_ctx_st, CtxDeleter> ctx_;
};

// "sha256:<64 hex>" of `bytes`.
std::string sha256_digest(std::string_view bytes);

// Syntax check per the grammar above (registered algorithms checked exactly; unknown but
// well-formed algorithms are accepted as syntax).
bool is_valid_digest(std::string_view d) noexcept;
// True only for "sha256:" followed by exactly 64 lowercase hex digits.
bool is_sha256_digest(std::string_view d) noexcept;

// XXH3 64-bit hash (seed 0).
uint64_t xxh3_64(std::span<const char> data) noexcept;

// Lowercase hex of raw bytes.
std::string to_hex(std::span<const unsigned char> bytes);

}  // namespace cas
