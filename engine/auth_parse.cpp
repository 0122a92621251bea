#include "engine/auth_parse.h"

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <nlohmann/json.hpp>

namespace engine {

namespace {

bool is_ws(char c) noexcept { return c == ' ' || c == '\t'; }
bool is_alpha(char c) noexcept { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }
bool is_digit(char c) noexcept { return c >= '0' && c <= '9'; }

// RFC 9110 §5.6.2 tchar.
bool is_tchar(char c) noexcept {
    if (is_alpha(c) || is_digit(c)) return true;
    switch (c) {
    case '!': case '#': case '$': case '%': case '&': case '\'': case '*': case '+':
    case '-': case '.': case '^': case '_': case '`': case '|': case '~':
        return true;
    default:
        return false;
    }
}

// RFC 7235 §2.1 token68 characters (before the trailing '=' padding).
bool is_token68_char(char c) noexcept {
    return is_alpha(c) || is_digit(c) || c == '-' || c == '.' || c == '_' || c == '~' || c == '+' || c == '/';
}

char to_lower(char c) noexcept { return (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c; }

std::string lowercase(std::string_view s) {
    std::string out(s);
    for (char& c : out) c = to_lower(c);
    return out;
}

bool iequals(std::string_view a, std::string_view b) noexcept {
    if (a.size() != b.size()) return false;
    for (size_t i = 0; i < a.size(); ++i)
        if (to_lower(a[i]) != to_lower(b[i])) return false;
    return true;
}

// A bounds-checked cursor over a header value.
struct Cursor {
    std::string_view s;
    size_t i = 0;

    bool at_end() const noexcept { return i >= s.size(); }
    char peek() const noexcept { return i < s.size() ? s[i] : '\0'; }
    void skip_ws() noexcept {
        while (i < s.size() && is_ws(s[i])) ++i;
    }
    void skip_ws_and_commas() noexcept {
        while (i < s.size() && (is_ws(s[i]) || s[i] == ',')) ++i;
    }
    void skip_to_comma() noexcept {
        while (i < s.size() && s[i] != ',') ++i;
    }
    std::string_view token() noexcept {
        const size_t start = i;
        while (i < s.size() && is_tchar(s[i])) ++i;
        return s.substr(start, i - start);
    }
    // At '"': the unescaped content; an unterminated string runs to the end.
    std::string quoted_string() {
        std::string out;
        ++i;  // opening quote
        while (i < s.size()) {
            const char c = s[i++];
            if (c == '"') break;
            if (c == '\\') {
                if (i < s.size()) out += s[i++];
                continue;
            }
            out += c;
        }
        return out;
    }
    // Whether "token BWS =" starts at `pos`.
    bool param_starts_at(size_t pos) const noexcept {
        size_t j = pos;
        while (j < s.size() && is_tchar(s[j])) ++j;
        if (j == pos) return false;
        while (j < s.size() && is_ws(s[j])) ++j;
        return j < s.size() && s[j] == '=';
    }
};

// After the scheme: a token68, or a comma-separated list of auth-params. Stops in front of the
// comma that starts the next challenge.
void parse_challenge_body(Cursor& c, Challenge& ch) {
    c.skip_ws();
    if (c.at_end()) return;

    // token68 ("abc+/==") is only possible as the first thing after the scheme.
    if (c.peek() != ',') {
        size_t j = c.i;
        while (j < c.s.size() && is_token68_char(c.s[j])) ++j;
        if (j > c.i) {
            size_t k = j;
            while (k < c.s.size() && c.s[k] == '=') ++k;
            size_t e = k;
            while (e < c.s.size() && is_ws(c.s[e])) ++e;
            if (e >= c.s.size() || c.s[e] == ',') {
                ch.params.emplace("", std::string(c.s.substr(c.i, k - c.i)));
                c.i = e;
                return;
            }
        }
    }

    for (;;) {
        c.skip_ws();
        if (c.at_end()) return;
        if (c.peek() == ',') {
            const size_t comma = c.i;
            c.skip_ws_and_commas();
            if (c.at_end()) return;
            if (!c.param_starts_at(c.i)) {  // a new challenge: leave it to the caller
                c.i = comma;
                return;
            }
        }
        const std::string_view name = c.token();
        c.skip_ws();
        if (name.empty() || c.peek() != '=') {  // garbage: drop up to the next comma
            c.skip_to_comma();
            continue;
        }
        ++c.i;  // '='
        c.skip_ws();
        std::string value;
        if (c.peek() == '"') {
            value = c.quoted_string();
        } else {
            // Lenient: registries send unquoted realms such as realm=https://auth.example/token.
            const size_t start = c.i;
            c.skip_to_comma();
            std::string_view v = c.s.substr(start, c.i - start);
            while (!v.empty() && is_ws(v.back())) v.remove_suffix(1);
            value = std::string(v);
        }
        ch.params.emplace(lowercase(name), std::move(value));
        c.skip_ws();
        if (!c.at_end() && c.peek() != ',') c.skip_to_comma();  // junk after a quoted value
    }
}

// --- base64 -------------------------------------------------------------------------------------

constexpr char kB64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

int b64_value(char c) noexcept {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+') return 62;
    if (c == '/') return 63;
    return -1;
}

// --- auth files ---------------------------------------------------------------------------------

constexpr size_t kMaxAuthFileBytes = 16u << 20;

struct FileCloser {
    void operator()(std::FILE* f) const noexcept { std::fclose(f); }
};

netio::Error auth_error(const std::string& file, const std::string& what,
                        std::error_code ec = std::make_error_code(std::errc::invalid_argument)) {
    return netio::Error::make("auth file " + file + ": " + what, ec);
}

// nullopt = the file does not exist; an Error when it exists but cannot be read.
netio::Result<std::optional<std::string>> read_small_file(const std::string& path) {
    std::unique_ptr<std::FILE, FileCloser> f(std::fopen(path.c_str(), "rb"));
    if (!f) {
        const int e = errno;
        if (e == ENOENT || e == ENOTDIR) return std::optional<std::string>();
        return auth_error(path, std::string("cannot open: ") + std::strerror(e), std::error_code(e, std::generic_category()));
    }
    std::string data;
    char buf[16384];
    for (;;) {
        const size_t n = std::fread(buf, 1, sizeof buf, f.get());
        data.append(buf, n);
        if (data.size() > kMaxAuthFileBytes) return auth_error(path, "larger than 16 MiB, not a credentials file");
        if (n < sizeof buf) {
            if (std::ferror(f.get())) {
                const int e = errno;
                return auth_error(path, std::string("cannot read: ") + std::strerror(e),
                                  std::error_code(e, std::generic_category()));
            }
            break;
        }
    }
    return std::optional<std::string>(std::move(data));
}

bool starts_with_icase(std::string_view s, std::string_view prefix) noexcept {
    return s.size() >= prefix.size() && iequals(s.substr(0, prefix.size()), prefix);
}

// "https://Host:5000/v2/" -> "host:5000"; Docker Hub aliases -> "docker.io".
std::string normalize_registry_key(std::string_view key) {
    while (!key.empty() && is_ws(key.front())) key.remove_prefix(1);
    while (!key.empty() && is_ws(key.back())) key.remove_suffix(1);
    if (starts_with_icase(key, "https://")) key.remove_prefix(8);
    else if (starts_with_icase(key, "http://")) key.remove_prefix(7);
    if (const size_t slash = key.find('/'); slash != std::string_view::npos) key = key.substr(0, slash);
    std::string h = lowercase(key);
    if (h == "index.docker.io" || h == "registry-1.docker.io" || h == "docker.io") return "docker.io";
    return h;
}

std::string quote_key(std::string_view k) {
    std::string out = "'";
    for (unsigned char c : k.substr(0, 200)) out += (c < 0x20 || c == 0x7f) ? '?' : static_cast<char>(c);
    return out + "'";
}

// Credentials from one "auths" entry; empty Credentials when the entry holds none.
netio::Result<Credentials> credentials_of(const nlohmann::json& entry, const std::string& file,
                                          const std::string& key) {
    const std::string where = "auths[" + quote_key(key) + "]";
    if (!entry.is_object()) return auth_error(file, where + " is not an object");
    const auto get_string = [&](const char* field, std::string& out) -> bool {
        const auto it = entry.find(field);
        if (it == entry.end() || it->is_null()) return true;
        if (!it->is_string()) return false;
        out = it->get<std::string>();
        return true;
    };
    Credentials c;
    std::string auth;
    if (!get_string("auth", auth)) return auth_error(file, where + ".auth is not a string");
    if (!get_string("identitytoken", c.identity_token))
        return auth_error(file, where + ".identitytoken is not a string");
    if (!auth.empty()) {
        auto decoded = base64_decode(auth);
        if (!decoded) return auth_error(file, where + ".auth is not valid base64");
        const size_t colon = decoded->find(':');
        if (colon == std::string::npos) return auth_error(file, where + ".auth does not decode to user:password");
        c.username = decoded->substr(0, colon);
        c.password = decoded->substr(colon + 1);
    } else {
        if (!get_string("username", c.username)) return auth_error(file, where + ".username is not a string");
        if (!get_string("password", c.password)) return auth_error(file, where + ".password is not a string");
    }
    return c;
}

// --- URLs ---------------------------------------------------------------------------------------

// RFC 3986 §3.1: scheme ":" with scheme = ALPHA *( ALPHA / DIGIT / "+" / "-" / "." ).
bool has_scheme(std::string_view uri) noexcept {
    if (uri.empty() || !is_alpha(uri.front())) return false;
    for (size_t i = 1; i < uri.size(); ++i) {
        const char c = uri[i];
        if (c == ':') return true;
        if (!(is_alpha(c) || is_digit(c) || c == '+' || c == '-' || c == '.')) return false;
    }
    return false;
}

std::optional<std::string> resolve_reference(std::string_view ref, std::string_view base) {
    if (ref.empty()) return std::nullopt;
    if (has_scheme(ref)) return std::string(ref);
    const size_t sep = base.find("://");
    if (sep == std::string_view::npos) return std::string(ref);  // nothing to resolve against
    const std::string_view scheme = base.substr(0, sep);
    size_t auth_end = base.find_first_of("/?#", sep + 3);
    if (auth_end == std::string_view::npos) auth_end = base.size();
    const std::string_view origin = base.substr(0, auth_end);
    size_t path_end = base.find_first_of("?#", auth_end);
    if (path_end == std::string_view::npos) path_end = base.size();
    const std::string_view path = base.substr(auth_end, path_end - auth_end);

    if (ref.substr(0, 2) == "//") return std::string(scheme) + ":" + std::string(ref);
    if (ref.front() == '/') return std::string(origin) + std::string(ref);
    if (ref.front() == '?') return std::string(base.substr(0, path_end)) + std::string(ref);
    if (ref.front() == '#') {
        const size_t hash = base.find('#');
        return std::string(base.substr(0, hash)) + std::string(ref);
    }
    const size_t last_slash = path.rfind('/');
    const std::string dir = last_slash == std::string_view::npos ? "/" : std::string(path.substr(0, last_slash + 1));
    return std::string(origin) + dir + std::string(ref);
}

}  // namespace

std::vector<Challenge> parse_www_authenticate(std::string_view header) {
    std::vector<Challenge> out;
    try {
        Cursor c{header};
        for (;;) {
            c.skip_ws_and_commas();
            if (c.at_end()) break;
            const std::string_view scheme = c.token();
            if (scheme.empty() || (!c.at_end() && !is_ws(c.peek()) && c.peek() != ',')) {
                c.skip_to_comma();  // not a challenge: skip it
                continue;
            }
            Challenge ch;
            ch.scheme = lowercase(scheme);
            parse_challenge_body(c, ch);
            out.push_back(std::move(ch));
        }
    } catch (const std::bad_alloc&) {
        // Only allocation can fail; return what was parsed so far.
    }
    return out;
}

std::string base64_encode(std::string_view bytes) {
    std::string out;
    out.reserve((bytes.size() + 2) / 3 * 4);
    size_t i = 0;
    for (; i + 3 <= bytes.size(); i += 3) {
        const uint32_t v = (static_cast<uint32_t>(static_cast<unsigned char>(bytes[i])) << 16) |
                           (static_cast<uint32_t>(static_cast<unsigned char>(bytes[i + 1])) << 8) |
                           static_cast<unsigned char>(bytes[i + 2]);
        out += kB64[(v >> 18) & 63];
        out += kB64[(v >> 12) & 63];
        out += kB64[(v >> 6) & 63];
        out += kB64[v & 63];
    }
    const size_t rest = bytes.size() - i;
    if (rest == 1) {
        const uint32_t v = static_cast<uint32_t>(static_cast<unsigned char>(bytes[i])) << 16;
        out += kB64[(v >> 18) & 63];
        out += kB64[(v >> 12) & 63];
        out += "==";
    } else if (rest == 2) {
        const uint32_t v = (static_cast<uint32_t>(static_cast<unsigned char>(bytes[i])) << 16) |
                           (static_cast<uint32_t>(static_cast<unsigned char>(bytes[i + 1])) << 8);
        out += kB64[(v >> 18) & 63];
        out += kB64[(v >> 12) & 63];
        out += kB64[(v >> 6) & 63];
        out += '=';
    }
    return out;
}

std::optional<std::string> base64_decode(std::string_view text) {
    std::string s;
    s.reserve(text.size());
    for (char c : text)
        if (c != '\r' && c != '\n') s += c;

    size_t pad = 0;
    while (pad < s.size() && pad < 3 && s[s.size() - 1 - pad] == '=') ++pad;
    if (pad > 2) return std::nullopt;
    if (pad > 0 && s.size() % 4 != 0) return std::nullopt;
    const std::string_view body = std::string_view(s).substr(0, s.size() - pad);
    if (body.size() % 4 == 1) return std::nullopt;

    std::string out;
    out.reserve(body.size() / 4 * 3 + 2);
    uint32_t acc = 0;
    int bits = 0;
    for (char c : body) {
        const int v = b64_value(c);
        if (v < 0) return std::nullopt;  // includes '=' in the middle
        acc = (acc << 6) | static_cast<uint32_t>(v);
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            out += static_cast<char>((acc >> bits) & 0xff);
        }
    }
    return out;
}

netio::Result<std::optional<Credentials>> lookup_docker_config(std::string_view registry_host,
                                                               const std::vector<std::string>& files) {
    try {
        const std::string want = normalize_registry_key(registry_host);
        for (const auto& file : files) {
            if (file.empty()) continue;
            auto content = read_small_file(file);
            if (!content.ok()) return content.error();
            if (!content.value()) continue;  // missing
            const std::string& text = **content;
            if (std::all_of(text.begin(), text.end(),
                            [](char c) { return is_ws(c) || c == '\n' || c == '\r'; }))
                continue;  // an empty file holds no credentials

            nlohmann::json doc;
            try {
                doc = nlohmann::json::parse(text);
            } catch (const nlohmann::json::parse_error& e) {
                // e.what() quotes the text around the error, which may be a secret: only the offset.
                return auth_error(file, "not valid JSON (error at byte " + std::to_string(e.byte) + ")");
            } catch (const nlohmann::json::exception&) {  // out_of_range: a number like 1e400
                return auth_error(file, "not valid JSON (a number is out of range)");
            }
            if (!doc.is_object()) return auth_error(file, "not a JSON object");
            const auto auths = doc.find("auths");
            if (auths == doc.end() || auths->is_null()) continue;
            if (!auths->is_object()) return auth_error(file, "\"auths\" is not an object");

            // An entry written exactly as asked wins over one that only normalises to it.
            std::vector<std::string> order;
            for (const auto& item : auths->items())
                if (item.key() == registry_host) order.push_back(item.key());
            for (const auto& item : auths->items())
                if (item.key() != registry_host && normalize_registry_key(item.key()) == want)
                    order.push_back(item.key());
            for (const std::string& key : order) {
                auto creds = credentials_of(auths->at(key), file, key);
                if (!creds.ok()) return creds.error();
                if (!creds->empty()) return std::optional<Credentials>(std::move(creds.value()));
            }
        }
        return std::optional<Credentials>();
    } catch (const std::exception& e) {  // allocation failure; no secret can be in e.what()
        return netio::Error::make(std::string("reading auth files: ") + e.what());
    }
}

std::vector<std::string> default_auth_files() {
    std::vector<std::string> out;
    const auto env = [](const char* name) -> std::string {
        const char* v = std::getenv(name);
        return v ? std::string(v) : std::string();
    };
    if (auto f = env("REGISTRY_AUTH_FILE"); !f.empty()) out.push_back(f);
    if (auto d = env("XDG_RUNTIME_DIR"); !d.empty()) out.push_back(d + "/containers/auth.json");
    if (auto d = env("DOCKER_CONFIG"); !d.empty()) {
        out.push_back(d + "/config.json");
    } else if (auto h = env("HOME"); !h.empty()) {
        out.push_back(h + "/.docker/config.json");
    }
    return out;
}

std::optional<std::string> parse_link_next(std::string_view link_header, std::string_view request_url) {
    try {
        Cursor c{link_header};
        for (;;) {
            c.skip_ws_and_commas();
            if (c.at_end()) return std::nullopt;
            if (c.peek() != '<') {
                c.skip_to_comma();
                continue;
            }
            const size_t close = link_header.find('>', c.i + 1);
            if (close == std::string_view::npos) return std::nullopt;
            std::string_view target = link_header.substr(c.i + 1, close - c.i - 1);
            while (!target.empty() && is_ws(target.front())) target.remove_prefix(1);
            while (!target.empty() && is_ws(target.back())) target.remove_suffix(1);
            c.i = close + 1;

            bool next = false;
            bool seen_rel = false;
            for (;;) {
                c.skip_ws();
                if (c.peek() != ';') break;
                ++c.i;
                c.skip_ws();
                const std::string_view name = c.token();
                c.skip_ws();
                std::string value;
                if (c.peek() == '=') {
                    ++c.i;
                    c.skip_ws();
                    if (c.peek() == '"') value = c.quoted_string();
                    else value = std::string(c.token());
                }
                if (iequals(name, "rel") && !seen_rel) {  // RFC 8288 §3.3: only the first rel counts
                    seen_rel = true;
                    size_t p = 0;
                    while (p < value.size()) {
                        while (p < value.size() && (is_ws(value[p]) || value[p] == '\n')) ++p;
                        size_t e = p;
                        while (e < value.size() && !is_ws(value[e]) && value[e] != '\n') ++e;
                        if (e > p && iequals(std::string_view(value).substr(p, e - p), "next")) next = true;
                        p = e;
                    }
                }
            }
            if (next) return resolve_reference(target, request_url);
            if (!c.at_end() && c.peek() != ',') c.skip_to_comma();
        }
    } catch (const std::bad_alloc&) {
        return std::nullopt;
    }
}

std::string url_encode_component(std::string_view s) {
    static constexpr char kHex[] = "0123456789ABCDEF";
    std::string out;
    out.reserve(s.size());
    for (unsigned char c : s) {
        if (is_alpha(static_cast<char>(c)) || is_digit(static_cast<char>(c)) || c == '-' || c == '.' || c == '_' ||
            c == '~') {
            out += static_cast<char>(c);
        } else {
            out += '%';
            out += kHex[c >> 4];
            out += kHex[c & 0xf];
        }
    }
    return out;
}

std::string redact(std::string_view text, const std::vector<std::string>& secrets) {
    std::vector<std::string_view> sorted;
    for (const auto& s : secrets)
        if (!s.empty()) sorted.emplace_back(s);
    std::sort(sorted.begin(), sorted.end(), [](std::string_view a, std::string_view b) { return a.size() > b.size(); });
    std::string out(text);
    for (const auto secret : sorted) {
        size_t pos = 0;
        while ((pos = out.find(secret, pos)) != std::string::npos) {
            out.replace(pos, secret.size(), "***");
            pos += 3;
        }
    }
    return out;
}

}  // namespace engine
