// Flag handling shared by the subcommands: credentials from --src-creds/--dest-creds/--authfile.
#pragma once

#include <unistd.h>

#include <optional>
#include <string>
#include <vector>

#include "engine/auth_parse.h"

namespace cli {

// "user:password" -> Credentials; the password may itself contain ':'.
inline std::optional<engine::Credentials> parse_creds(const std::string& s) {
    auto colon = s.find(':');
    if (colon == std::string::npos || colon == 0) return std::nullopt;
    engine::Credentials c;
    c.username = s.substr(0, colon);
    c.password = s.substr(colon + 1);
    return c;
}

struct CredentialFlags {
    std::string src_creds, dest_creds, authfile;
};

struct ResolvedCredentials {
    std::optional<engine::Credentials> source, target;
    std::vector<std::string> auth_files;  // --authfile first, then the default locations
};

// The credentials the flags give, or the message of a usage error.
inline std::optional<std::string> resolve_credentials(const CredentialFlags& f, ResolvedCredentials& out) {
    if (!f.src_creds.empty()) {
        out.source = parse_creds(f.src_creds);
        if (!out.source) return "--src-creds must be USER:PASSWORD";
    }
    if (!f.dest_creds.empty()) {
        out.target = parse_creds(f.dest_creds);
        if (!out.target) return "--dest-creds must be USER:PASSWORD";
    }
    if (!f.authfile.empty()) {
        if (::access(f.authfile.c_str(), R_OK) != 0) return "--authfile " + f.authfile + ": cannot be read";
        out.auth_files.push_back(f.authfile);
    }
    for (auto& file : engine::default_auth_files()) out.auth_files.push_back(file);
    return std::nullopt;
}

}  // namespace cli
