#include "engine/reference.h"

#include <arpa/inet.h>

#include <algorithm>

namespace engine {

namespace {

bool is_lower_alnum(char c) noexcept { return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9'); }
bool is_alnum(char c) noexcept { return is_lower_alnum(c) || (c >= 'A' && c <= 'Z'); }
bool is_digit(char c) noexcept { return c >= '0' && c <= '9'; }

char to_lower(char c) noexcept { return (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c; }

std::string lowercase(std::string_view s) {
    std::string out(s);
    for (char& c : out) c = to_lower(c);
    return out;
}

// Printable form of user input inside an error message (control characters escaped).
std::string quote_arg(std::string_view s) {
    std::string out = "'";
    for (unsigned char c : s) {
        if (c < 0x20 || c == 0x7f) {
            static constexpr char kHex[] = "0123456789abcdef";
            out += "\\x";
            out += kHex[c >> 4];
            out += kHex[c & 0xf];
        } else {
            out += static_cast<char>(c);
        }
    }
    return out + "'";
}

netio::Error invalid(std::string_view ref, const std::string& why) {
    return netio::Error::make("invalid registry reference " + quote_arg(ref) + ": " + why,
                              std::make_error_code(std::errc::invalid_argument));
}

// domain-component ::= [a-zA-Z0-9] | [a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]   (at most 63 characters)
bool is_dns_label(std::string_view l) noexcept {
    if (l.empty() || l.size() > 63) return false;
    if (!is_alnum(l.front()) || !is_alnum(l.back())) return false;
    return std::all_of(l.begin(), l.end(), [](char c) { return is_alnum(c) || c == '-'; });
}

bool is_dns_name(std::string_view h) noexcept {
    if (h.empty() || h.size() > 253) return false;
    size_t start = 0;
    for (;;) {
        const size_t dot = h.find('.', start);
        if (!is_dns_label(h.substr(start, dot == std::string_view::npos ? std::string_view::npos : dot - start)))
            return false;
        if (dot == std::string_view::npos) return true;
        start = dot + 1;
    }
}

bool is_ipv4(std::string_view h) {
    if (h.size() > 15) return false;
    const std::string s(h);
    in_addr a{};
    return inet_pton(AF_INET, s.c_str(), &a) == 1;
}

bool is_ipv6(std::string_view h) {
    if (h.size() > 45) return false;
    const std::string s(h);
    in6_addr a{};
    return inet_pton(AF_INET6, s.c_str(), &a) == 1;
}

// "", or an error message about the port.
std::string check_port(std::string_view port) {
    if (port.empty()) return "the port after ':' is empty";
    if (!std::all_of(port.begin(), port.end(), is_digit))
        return "port " + quote_arg(port) +
               " is not a number (the first component is the registry host; tags and digests do not belong in a "
               "registry reference)";
    if (port.size() > 5 || port.front() == '0') return "port " + quote_arg(port) + " is not in 1..65535";
    unsigned v = 0;
    for (char c : port) v = v * 10 + static_cast<unsigned>(c - '0');
    if (v < 1 || v > 65535) return "port " + quote_arg(port) + " is not in 1..65535";
    return {};
}

}  // namespace

bool is_valid_path_component(std::string_view c) noexcept {
    // [a-z0-9]+ ((\.|_|__|-+) [a-z0-9]+)*
    if (c.empty() || !is_lower_alnum(c.front()) || !is_lower_alnum(c.back())) return false;
    size_t i = 0;
    while (i < c.size()) {
        if (is_lower_alnum(c[i])) {
            ++i;
            continue;
        }
        // A separator run, necessarily followed by an alphanumeric (the last character is one).
        const size_t start = i;
        while (i < c.size() && !is_lower_alnum(c[i])) ++i;
        const std::string_view sep = c.substr(start, i - start);
        const bool ok = sep == "." || sep == "_" || sep == "__" ||
                        std::all_of(sep.begin(), sep.end(), [](char ch) { return ch == '-'; });
        if (!ok) return false;
    }
    return true;
}

bool is_valid_repo_name(std::string_view name) noexcept {
    if (name.empty() || name.size() > kMaxRepoNameLength) return false;
    size_t start = 0;
    for (;;) {
        const size_t slash = name.find('/', start);
        const auto comp = name.substr(start, slash == std::string_view::npos ? std::string_view::npos : slash - start);
        if (!is_valid_path_component(comp)) return false;
        if (slash == std::string_view::npos) return true;
        start = slash + 1;
    }
}

bool is_valid_tag(std::string_view tag) noexcept {
    if (tag.empty() || tag.size() > 128) return false;
    if (!(is_alnum(tag.front()) || tag.front() == '_')) return false;
    return std::all_of(tag.begin(), tag.end(), [](char c) { return is_alnum(c) || c == '_' || c == '.' || c == '-'; });
}

std::string join_repo(std::string_view ns, std::string_view rel) {
    if (ns.empty()) return std::string(rel);
    if (rel.empty()) return std::string(ns);
    std::string out;
    out.reserve(ns.size() + 1 + rel.size());
    out.append(ns);
    out += '/';
    out.append(rel);
    return out;
}

netio::Result<RegistryRef> parse_registry_ref(std::string_view s) {
    if (s.empty()) return invalid(s, "it is empty (expected host[:port][/namespace])");
    for (unsigned char c : s) {
        if (c <= 0x20 || c == 0x7f) return invalid(s, "it contains whitespace or control characters");
    }
    if (const size_t p = s.find("://"); p != std::string_view::npos) {
        return invalid(s, "remove the scheme " + quote_arg(s.substr(0, p + 3)) +
                              ": write host[:port][/namespace] (plain http is chosen with --insecure, not a prefix)");
    }

    const size_t slash = s.find('/');
    const std::string_view authority = s.substr(0, slash);
    std::string_view path = slash == std::string_view::npos ? std::string_view() : s.substr(slash + 1);

    if (authority.empty()) return invalid(s, "the registry host is missing before the first '/'");
    if (authority.find('@') != std::string_view::npos)
        return invalid(s, "credentials or digests do not belong in the registry host; pass credentials separately");

    // host [":" port], where a bracketed IPv6 address may itself contain ':'.
    std::string_view hostname;
    std::string_view port;
    bool has_port = false;
    if (authority.front() == '[') {
        const size_t close = authority.find(']');
        if (close == std::string_view::npos) return invalid(s, "'[' opens an IPv6 address that is never closed");
        hostname = authority.substr(1, close - 1);
        const std::string_view rest = authority.substr(close + 1);
        if (!rest.empty()) {
            if (rest.front() != ':') return invalid(s, "unexpected " + quote_arg(rest) + " after the IPv6 address");
            has_port = true;
            port = rest.substr(1);
        }
        if (!is_ipv6(hostname)) return invalid(s, quote_arg(hostname) + " is not a valid IPv6 address");
    } else {
        if (std::count(authority.begin(), authority.end(), ':') > 1)
            return invalid(s, "an IPv6 address must be written in brackets, e.g. [::1]:5000");
        const size_t colon = authority.find(':');
        hostname = authority.substr(0, colon);
        if (colon != std::string_view::npos) {
            has_port = true;
            port = authority.substr(colon + 1);
        }
        if (hostname.empty()) return invalid(s, "the registry host is empty");
        const bool numeric =
            std::all_of(hostname.begin(), hostname.end(), [](char c) { return is_digit(c) || c == '.'; });
        if (numeric) {
            if (!is_ipv4(hostname)) return invalid(s, quote_arg(hostname) + " is not a valid IPv4 address");
        } else if (!is_dns_name(hostname)) {
            return invalid(s, quote_arg(hostname) + " is not a valid host name");
        }
    }
    if (has_port) {
        if (auto why = check_port(port); !why.empty()) return invalid(s, why);
    }

    while (!path.empty() && path.back() == '/') path.remove_suffix(1);
    if (path.find('@') != std::string_view::npos)
        return invalid(s, "a registry reference names a namespace, not a digest: remove '@...'");
    if (path.find(':') != std::string_view::npos)
        return invalid(s, "a registry reference names a namespace, not a tag: remove ':...'");
    if (!path.empty()) {
        if (path.size() > kMaxRepoNameLength)
            return invalid(s, "the namespace is longer than " + std::to_string(kMaxRepoNameLength) + " characters");
        size_t start = 0;
        for (;;) {
            const size_t next = path.find('/', start);
            const auto comp = path.substr(start, next == std::string_view::npos ? std::string_view::npos : next - start);
            if (comp.empty()) return invalid(s, "the namespace has an empty component ('//')");
            if (!is_valid_path_component(comp)) {
                std::string why = "namespace component " + quote_arg(comp) + " is invalid";
                if (std::any_of(comp.begin(), comp.end(), [](char c) { return c >= 'A' && c <= 'Z'; }))
                    why += " (repository names must be lowercase)";
                else
                    why += " (allowed: lowercase letters and digits, separated by '.', '_', '__' or dashes)";
                return invalid(s, why);
            }
            if (next == std::string_view::npos) break;
            start = next + 1;
        }
    }

    RegistryRef ref;
    if (authority.front() == '[') {
        ref.host = "[" + lowercase(hostname) + "]";
    } else {
        ref.host = lowercase(hostname);
    }
    if (has_port) {
        ref.host += ':';
        ref.host.append(port);
    }
    ref.ns = std::string(path);
    return ref;
}

}  // namespace engine
