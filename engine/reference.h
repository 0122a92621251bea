// Registry references as the user writes them on the command line: "host[:port][/namespace]".
//
// The first component is always the registry host; there is no Docker Hub defaulting
// ("library/ubuntu" is rejected, not read as docker.io/library/ubuntu). Tags and digests are not
// part of a registry reference, and neither is a URL scheme: plain http is a flag, not a prefix.
//
// Grammars are those of distribution/reference (reference.go) and the OCI distribution spec:
//   path-component ::= [a-z0-9]+ ((\.|_|__|-+) [a-z0-9]+)*
//   name           ::= path-component ("/" path-component)*        at most 255 characters
//   tag            ::= [a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}
//
// Everything here is pure and reentrant.
#pragma once

#include <string>
#include <string_view>

#include "netio/result.h"

namespace engine {

struct RegistryRef {
    std::string host;  // "host[:port]" exactly as the user wrote it, host part lowercased
    std::string ns;    // namespace path, may be empty or contain slashes; no trailing slash

    // "host[:port]" or "host[:port]/ns".
    std::string to_string() const { return ns.empty() ? host : host + "/" + ns; }
};

// Longest repository name the distribution spec allows.
inline constexpr size_t kMaxRepoNameLength = 255;

// Accepts "host", "host:port", "host/ns/deeper", "[::1]:5000/ns", "host/ns/" (trailing slashes
// dropped). The host is a DNS name, a dotted IPv4 address or a bracketed IPv6 address; the port
// 1..65535 without leading zeros. Errors say what is wrong and quote the input.
netio::Result<RegistryRef> parse_registry_ref(std::string_view s);

// "ns/rel", or rel when ns is empty, or ns when rel is empty.
std::string join_repo(std::string_view ns, std::string_view rel);

// A repository name per the grammar above (non-empty, <= 255 characters).
bool is_valid_repo_name(std::string_view name) noexcept;
// One path component (no '/').
bool is_valid_path_component(std::string_view component) noexcept;
bool is_valid_tag(std::string_view tag) noexcept;

}  // namespace engine
