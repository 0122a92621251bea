#include "cas/digest.h"

#include <openssl/evp.h>
#include <xxhash.h>

#include <cassert>
#include <new>
#include <stdexcept>

namespace cas {

namespace {

constexpr std::string_view kSha256Prefix = "sha256:";

bool is_lower_hex(std::string_view s) noexcept {
    for (char c : s)
        if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
    return true;
}

bool is_alg_component_char(char c) noexcept { return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9'); }
bool is_alg_separator(char c) noexcept { return c == '+' || c == '.' || c == '_' || c == '-'; }
bool is_encoded_char(char c) noexcept {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '=' || c == '_' ||
           c == '-';
}

}  // namespace

void Sha256::CtxDeleter::operator()(evp_md_ctx_st* ctx) const noexcept { EVP_MD_CTX_free(ctx); }

Sha256::Sha256() : ctx_(EVP_MD_CTX_new()) {
    if (!ctx_) throw std::bad_alloc();
    if (EVP_DigestInit_ex(ctx_.get(), EVP_sha256(), nullptr) != 1)
        throw std::runtime_error("OpenSSL: EVP_DigestInit_ex(sha256) failed");
}

void Sha256::update(std::span<const char> data) noexcept {
    assert(ctx_ && "Sha256 used after move");
    if (data.empty() || !ctx_) return;
    // EVP_DigestUpdate cannot fail for an initialised SHA-256 context.
    EVP_DigestUpdate(ctx_.get(), data.data(), data.size());
}

void Sha256::update(std::string_view s) noexcept { update(std::span<const char>(s.data(), s.size())); }

std::string Sha256::finish_hex() {
    assert(ctx_ && "Sha256 used after move");
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int len = 0;
    if (EVP_DigestFinal_ex(ctx_.get(), md, &len) != 1 ||
        EVP_DigestInit_ex(ctx_.get(), EVP_sha256(), nullptr) != 1)
        throw std::runtime_error("OpenSSL: SHA-256 finalisation failed");
    return to_hex(std::span<const unsigned char>(md, len));
}

std::string Sha256::finish_digest() { return std::string(kSha256Prefix) + finish_hex(); }

std::string sha256_digest(std::string_view bytes) {
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int len = 0;
    if (EVP_Digest(bytes.data(), bytes.size(), md, &len, EVP_sha256(), nullptr) != 1)
        throw std::runtime_error("OpenSSL: EVP_Digest(sha256) failed");
    return std::string(kSha256Prefix) + to_hex(std::span<const unsigned char>(md, len));
}

bool is_valid_digest(std::string_view d) noexcept {
    const size_t colon = d.find(':');
    if (colon == std::string_view::npos || colon == 0 || colon + 1 == d.size()) return false;
    const std::string_view alg = d.substr(0, colon);
    const std::string_view enc = d.substr(colon + 1);

    // algorithm: components of [a-z0-9]+ joined by single separators.
    bool prev_sep = true;  // a separator may neither start nor end the algorithm, nor repeat
    for (char c : alg) {
        if (is_alg_component_char(c)) {
            prev_sep = false;
        } else if (is_alg_separator(c) && !prev_sep) {
            prev_sep = true;
        } else {
            return false;
        }
    }
    if (prev_sep) return false;

    for (char c : enc)
        if (!is_encoded_char(c)) return false;

    if (alg == "sha256" || alg == "blake3") return enc.size() == 64 && is_lower_hex(enc);
    if (alg == "sha512") return enc.size() == 128 && is_lower_hex(enc);
    return true;
}

bool is_sha256_digest(std::string_view d) noexcept {
    return d.size() == kSha256Prefix.size() + 64 && d.substr(0, kSha256Prefix.size()) == kSha256Prefix &&
           is_lower_hex(d.substr(kSha256Prefix.size()));
}

uint64_t xxh3_64(std::span<const char> data) noexcept { return XXH3_64bits(data.data(), data.size()); }

std::string to_hex(std::span<const unsigned char> bytes) {
    static constexpr char kHex[] = "0123456789abcdef";
    std::string out(bytes.size() * 2, '\0');
    for (size_t i = 0; i < bytes.size(); ++i) {
        out[2 * i] = kHex[bytes[i] >> 4];
        out[2 * i + 1] = kHex[bytes[i] & 0xf];
    }
    return out;
}

}  // namespace cas
