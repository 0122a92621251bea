// Pure helpers around registry authentication and HTTP headers: WWW-Authenticate challenges,
// base64, docker/podman credential files, Link pagination, URL encoding and secret redaction.
//
// Nothing here performs network I/O; lookup_docker_config() and default_auth_files() read local
// files and the environment. Nothing here throws on bad input; secrets never appear in an Error.
// Threading: reentrant (default_auth_files() reads the environment, which must not be modified
// concurrently).
#pragma once

#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "netio/result.h"

namespace engine {

struct Challenge {
    std::string scheme;                         // lowercased: "basic", "bearer", ...
    std::map<std::string, std::string> params;  // keys lowercased, values unquoted; first occurrence wins.
                                                // A token68 credential (RFC 7235 §2.1) is stored under "".
};

// RFC 7235 §4.1 WWW-Authenticate: one or more comma-separated challenges, each a scheme followed
// by either a token68 or auth-params (token "=" token / quoted-string, backslash escapes honoured).
// Lenient where servers are sloppy (unquoted values containing '/' or ':' are accepted up to the
// next comma; an unterminated quoted string runs to the end); garbage between challenges is
// skipped. Never throws on input; never reads outside `header`.
std::vector<Challenge> parse_www_authenticate(std::string_view header);

// RFC 4648 base64 with the standard alphabet and '=' padding.
std::string base64_encode(std::string_view bytes);
// Strict decoder: standard alphabet only; padding optional but, when present, correct; CR and LF
// ignored (as Go's encoding/base64 does, which wrote most docker config files). nullopt on any
// other character, misplaced '=' or an impossible length.
std::optional<std::string> base64_decode(std::string_view text);

struct Credentials {
    std::string username;
    std::string password;
    std::string identity_token;  // OAuth2 refresh token ("identitytoken"); used instead of the password

    bool empty() const noexcept { return username.empty() && password.empty() && identity_token.empty(); }
};

// Looks `registry_host` ("host[:port]") up in docker config.json / containers auth.json files,
// in order; the first file with a matching "auths" entry wins. Keys are normalised before
// matching: a scheme ("https://"), a path ("/v2/", "/v1/") and case are ignored, so
// "https://Registry.example:5000/v2/" matches "registry.example:5000". Docker Hub's aliases
// (docker.io, index.docker.io, registry-1.docker.io) match one another. An entry holds "auth"
// (base64 of "user:password") or "username" + "password", and/or "identitytoken".
// Missing files (or missing parent directories) are skipped. Unreadable files, malformed JSON or a
// bad "auth" value are errors naming the file and the key, never the secret. Credential helpers
// ("credsStore", "credHelpers") are not run. nullopt when no file has credentials for the host.
netio::Result<std::optional<Credentials>> lookup_docker_config(std::string_view registry_host,
                                                               const std::vector<std::string>& files);

// In order: $REGISTRY_AUTH_FILE, ${XDG_RUNTIME_DIR}/containers/auth.json,
// $DOCKER_CONFIG/config.json (else $HOME/.docker/config.json). Unset or empty variables are skipped.
std::vector<std::string> default_auth_files();

// The target of the rel="next" link in an RFC 8288 Link header, e.g.
//   </v2/_catalog?last=b&n=2>; rel="next"
// An absolute URI is returned as is; "//host/path" takes request_url's scheme; "/path" takes
// request_url's scheme://host[:port]; "?query" replaces request_url's query; other relative
// references are resolved against request_url's directory. nullopt when there is no next link.
std::optional<std::string> parse_link_next(std::string_view link_header, std::string_view request_url);

// Percent-encodes everything except RFC 3986 unreserved characters (ALPHA DIGIT - . _ ~).
std::string url_encode_component(std::string_view s);

// Replaces every occurrence of each non-empty secret with "***" (longest secrets first, so a
// secret that contains another is hidden whole).
std::string redact(std::string_view text, const std::vector<std::string>& secrets);

}  // namespace engine
