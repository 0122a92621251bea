// The control API's thin client (see client_cli.h): CLI11 wiring, one HTTP round trip over the
// daemon's Unix socket (libcurl easy), and the tables and lines that show the answers.
#include "tools/client_cli.h"

#include <curl/curl.h>
#include <sys/ioctl.h>
#include <sys/un.h>
#include <termios.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cctype>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <functional>
#include <initializer_list>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "engine/mirror.h"
#include "engine/rules.h"
#include "engine/store.h"
#include "planner/token_bucket.h"

namespace {

// ordered_json keeps the API's field order, for --json and for `show`.
using Json = nlohmann::ordered_json;
using Params = std::vector<std::pair<std::string, std::string>>;
using Row = std::vector<std::string>;

constexpr int kExitOk = 0;
constexpr int kExitFailed = 1;
constexpr int kExitUsage = 2;
constexpr int kExitInterrupted = 130;  // 128 + SIGINT, as shells report it

constexpr const char* kDefaultSocket = "/run/crossdock/crossdock.sock";
constexpr long kConnectTimeoutMs = 5'000;
constexpr long kRequestTimeoutMs = 30'000;
constexpr size_t kMaxResponseBytes = size_t{64} << 20;
constexpr size_t kPageLimit = engine::Store::kMaxPageSize;  // entries per page when following every page
constexpr int kMaxPages = 100'000;         // 1e8 entries: a daemon that keeps answering next_cursor is broken
constexpr size_t kDigestColumnChars = 19;  // "sha256:" and 12 hex digits

// Ends a command: the message goes to stderr after "crossdock: ", and the process exits with `exit_code`.
struct Failure : std::runtime_error {
    Failure(const std::string& message, int code) : std::runtime_error(message), exit_code(code) {}
    int exit_code;
};

[[noreturn]] void usage_error(const std::string& message) { throw Failure(message, kExitUsage); }
[[noreturn]] void failed(const std::string& message) { throw Failure(message, kExitFailed); }

// ---------------------------------------------------------------------------------------------
// Text

// Text from the daemon on its way to a terminal: control characters (an ESC could move the
// cursor or retitle the window) become '?'.
std::string printable(std::string_view s) {
    std::string out(s);
    for (char& ch : out)
        if (static_cast<unsigned char>(ch) < 0x20 || ch == 0x7f) ch = '?';
    return out;
}

// Columns on a terminal: UTF-8 continuation bytes take none.
size_t columns(std::string_view s) {
    return static_cast<size_t>(
        std::count_if(s.begin(), s.end(), [](char ch) { return (static_cast<unsigned char>(ch) & 0xC0) != 0x80; }));
}

std::string percent_encode(std::string_view s) {
    static constexpr char kHex[] = "0123456789ABCDEF";
    std::string out;
    for (char ch : s) {
        const auto c = static_cast<unsigned char>(ch);
        if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '.' ||
            c == '_' || c == '~') {
            out += ch;
        } else {
            out += '%';
            out += kHex[c >> 4];
            out += kHex[c & 15];
        }
    }
    return out;
}

// "/v1/" and the segments, each percent-encoded: a ref such as "a/b" or "%" stays one segment.
std::string api_path(std::initializer_list<std::string_view> segments) {
    std::string out = "/v1";
    for (auto seg : segments) {
        out += '/';
        out += percent_encode(seg);
    }
    return out;
}

std::string with_query(std::string path, const Params& params) {
    char sep = '?';
    for (const auto& [key, value] : params) {
        path += sep + percent_encode(key) + "=" + percent_encode(value);
        sep = '&';
    }
    return path;
}

// 850ms, 4.2s, 42s, 1m05s, 2h03m, 3d04h.
std::string format_duration_ms(uint64_t ms) {
    char buf[48];
    const uint64_t s = ms / 1000;
    const auto u = [](uint64_t v) { return static_cast<unsigned long long>(v); };
    if (ms < 1000) std::snprintf(buf, sizeof buf, "%llums", u(ms));
    else if (ms < 10'000) std::snprintf(buf, sizeof buf, "%.1fs", static_cast<double>(ms) / 1000);
    else if (s < 60) std::snprintf(buf, sizeof buf, "%llus", u(s));
    else if (s < 3600) std::snprintf(buf, sizeof buf, "%llum%02llus", u(s / 60), u(s % 60));
    else if (s < 86400) std::snprintf(buf, sizeof buf, "%lluh%02llum", u(s / 3600), u(s / 60 % 60));
    else std::snprintf(buf, sizeof buf, "%llud%02lluh", u(s / 86400), u(s / 3600 % 24));
    return buf;
}

std::string or_dash(std::string s) { return s.empty() ? "-" : s; }
std::string yes_no(bool b) { return b ? "yes" : "no"; }
// "1 artifact", "3 artifacts".
std::string plural(uint64_t n, const std::string& noun) { return std::to_string(n) + " " + noun + (n == 1 ? "" : "s"); }

// ---------------------------------------------------------------------------------------------
// Reading the API's JSON leniently: a missing field or one of another type reads as empty.

const Json& member(const Json& o, const std::string& key) {
    static const Json null_value;
    if (!o.is_object()) return null_value;
    auto it = o.find(key);
    return it == o.end() ? null_value : *it;
}

// Strings as they are, other values as JSON, missing or null as "".
std::string text(const Json& o, const std::string& key) {
    const Json& v = member(o, key);
    if (v.is_null()) return "";
    if (v.is_string()) return v.get<std::string>();
    return v.dump();
}

uint64_t number(const Json& v) {
    if (v.is_number_unsigned()) return v.get<uint64_t>();
    if (v.is_number_integer()) return static_cast<uint64_t>(std::max<int64_t>(v.get<int64_t>(), 0));
    if (v.is_number_float()) return static_cast<uint64_t>(std::clamp(v.get<double>(), 0.0, 1.8e19));
    return 0;
}
uint64_t number(const Json& o, const std::string& key) { return number(member(o, key)); }
bool flag(const Json& o, const std::string& key) { return member(o, key) == true; }
std::string bytes(uint64_t n) { return engine::format_bytes(static_cast<double>(n)); }
// "sha256:" and 12 hex digits of o's "digest", "-" for none.
std::string short_digest(const Json& o) { return or_dash(text(o, "digest").substr(0, kDigestColumnChars)); }
std::string duration(const Json& o, const std::string& key) {
    const Json& v = member(o, key);
    return v.is_number() ? format_duration_ms(number(v)) : "-";
}

// A value of `show` or of a task's progress, humanised by what its name says it holds.
std::string show_value(std::string_view key, const Json& v) {
    if (v.is_null()) return "-";
    if (v.is_string()) return v.get<std::string>();
    if (v.is_number()) {
        if (key.ends_with("_ms")) return format_duration_ms(number(v));
        if (key.ends_with("bytes_per_s")) return planner::format_rate(v.get<double>());
        if (key == "bytes" || key.starts_with("bytes_") || key.ends_with("_bytes")) return bytes(number(v));
        if (key == "success_ratio") {
            char buf[32];
            std::snprintf(buf, sizeof buf, "%.1f%%", v.get<double>() * 100);
            return buf;
        }
    }
    // A list of names, URLs or ids: "a, b, c" ("-" when empty).
    if (v.is_array() && std::none_of(v.begin(), v.end(), [](const Json& e) { return e.is_structured(); })) {
        std::string out;
        for (const auto& e : v) out += (out.empty() ? "" : ", ") + show_value(key, e);
        return or_dash(out);
    }
    return v.dump(-1, ' ', false, Json::error_handler_t::replace);
}

// ---------------------------------------------------------------------------------------------
// Output

void print_json(const Json& j, int indent = 2) {
    std::printf("%s\n", j.dump(indent, ' ', false, Json::error_handler_t::replace).c_str());
}

// Aligned columns, two spaces apart, the header in capitals.
void print_table(const Row& header, const std::vector<Row>& rows) {
    std::vector<size_t> width(header.size(), 0);
    auto measure = [&](const Row& row) {
        for (size_t i = 0; i < row.size() && i < width.size(); ++i) width[i] = std::max(width[i], columns(row[i]));
    };
    auto print = [&](const Row& row) {
        std::string line;
        for (size_t i = 0; i < row.size() && i < width.size(); ++i) {
            const std::string cell = printable(row[i]);
            line += cell;
            if (i + 1 < row.size()) line.append(width[i] - columns(cell) + 2, ' ');
        }
        std::printf("%s\n", line.c_str());
    };
    measure(header);
    for (const auto& row : rows) measure(row);
    print(header);
    for (const auto& row : rows) print(row);
}

// "key: value" lines, values aligned; nested objects as "parent.key".
void print_fields(const Json& obj) {
    std::vector<std::pair<std::string, std::string>> lines;
    std::function<void(const Json&, const std::string&)> flatten = [&](const Json& o, const std::string& prefix) {
        for (const auto& [key, value] : o.items()) {
            if (value.is_object()) flatten(value, prefix + key + ".");
            else lines.emplace_back(prefix + key, show_value(key, value));
        }
    };
    flatten(obj, "");
    size_t width = 0;
    for (const auto& l : lines) width = std::max(width, columns(l.first));
    for (const auto& [key, value] : lines) {
        const std::string pad = value.empty() ? "" : std::string(width - columns(key) + 1, ' ');
        std::printf("%s:%s%s\n", printable(key).c_str(), pad.c_str(), printable(value).c_str());
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP over the daemon's Unix socket

struct EasyDeleter {
    void operator()(CURL* h) const noexcept { curl_easy_cleanup(h); }
};
struct SlistDeleter {
    void operator()(curl_slist* l) const noexcept { curl_slist_free_all(l); }
};

struct Reply {
    long status = 0;
    Json body;  // null for an empty body (204)
};

struct BodySink {
    std::string data;
    bool too_large = false;
};

size_t on_body(char* p, size_t n, size_t k, void* ud) noexcept {
    auto& sink = *static_cast<BodySink*>(ud);
    const size_t len = n * k;
    if (sink.data.size() + len > kMaxResponseBytes) {
        sink.too_large = true;
        return 0;  // -> CURLE_WRITE_ERROR
    }
    try {
        sink.data.append(p, len);
    } catch (...) {
        sink.too_large = true;
        return 0;
    }
    return len;
}

// stderr text for an answer >= 400: the API's "message" as it wrote it, then "  field: message"
// per entry of "errors" that the message does not already say. A body without a message (a proxy,
// a crash) is named by its status.
std::string api_error(long status, const Json& body, const std::string& raw) {
    const Json& message = member(body, "message");
    std::string out;
    if (message.is_string()) {
        out = printable(message.get<std::string>());
    } else {
        out = "the daemon answered HTTP " + std::to_string(status);
        if (!raw.empty() && !body.is_object()) out += ": " + printable(raw.substr(0, 200));
    }
    const Json& errors = member(body, "errors");
    if (errors.is_array())
        for (const auto& e : errors) {
            const std::string field = text(e, "field");
            const std::string line = printable(field.empty() ? text(e, "message") : field + ": " + text(e, "message"));
            if (out.find(line) == std::string::npos) out += "\n  " + line;
        }
    return out;
}

// One connection to the daemon, kept alive between calls (pages, `task watch`).
class Api {
public:
    explicit Api(std::string socket_path) : socket_(std::move(socket_path)) {
        static const CURLcode global = curl_global_init(CURL_GLOBAL_DEFAULT);
        if (global != CURLE_OK) failed(std::string("libcurl: ") + curl_easy_strerror(global));
        easy_.reset(curl_easy_init());
        if (!easy_) failed("libcurl: cannot create a handle");
    }

    // One request; `body` is sent as JSON. Throws Failure when the daemon cannot be reached, its
    // answer is >= 400, or its body is not JSON.
    Reply call(const char* method, const std::string& target, const Json* body = nullptr) {
        CURL* h = easy_.get();
        curl_easy_reset(h);  // keeps the connection
        const bool sends = body != nullptr || std::strcmp(method, "POST") == 0;
        const std::string payload = body ? body->dump(-1, ' ', false, Json::error_handler_t::replace) : "";
        // "Expect:" off: curl would wait for a 100 Continue before a body over 1 KiB. A POST without
        // a body gets no Content-Type (curl's default is a form's).
        std::unique_ptr<curl_slist, SlistDeleter> headers;
        for (const char* line :
             {"Accept: application/json", "Expect:", body ? "Content-Type: application/json" : "Content-Type:"}) {
            curl_slist* grown = curl_slist_append(headers.get(), line);
            if (!grown) failed("libcurl: out of memory");
            (void)headers.release();
            headers.reset(grown);
        }
        const std::string url = "http://localhost" + target;
        BodySink sink;
        error_[0] = '\0';
        curl_easy_setopt(h, CURLOPT_UNIX_SOCKET_PATH, socket_.c_str());
        curl_easy_setopt(h, CURLOPT_URL, url.c_str());
        curl_easy_setopt(h, CURLOPT_PROXY, "");       // "" = no proxy, even one named by http_proxy
        curl_easy_setopt(h, CURLOPT_PATH_AS_IS, 1L);  // a ref ".." is a name, not a step up the path
        curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
        curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS, kConnectTimeoutMs);
        curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, kRequestTimeoutMs);
        curl_easy_setopt(h, CURLOPT_ERRORBUFFER, error_);
        curl_easy_setopt(h, CURLOPT_USERAGENT, "crossdock/0.1.0");
        curl_easy_setopt(h, CURLOPT_HTTPHEADER, headers.get());
        curl_easy_setopt(h, CURLOPT_CUSTOMREQUEST, method);
        curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, &on_body);
        curl_easy_setopt(h, CURLOPT_WRITEDATA, &sink);
        if (sends) {
            curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE_LARGE, static_cast<curl_off_t>(payload.size()));
            curl_easy_setopt(h, CURLOPT_POSTFIELDS, payload.c_str());
        }
        const CURLcode rc = curl_easy_perform(h);
        if (rc != CURLE_OK) failed(transport_error(rc, sink));
        long status = 0;
        curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &status);
        Json parsed = sink.data.empty() ? Json() : Json::parse(sink.data, nullptr, false);
        if (status >= 400) failed(api_error(status, parsed, sink.data));
        if (parsed.is_discarded())
            failed("the daemon at " + socket_ + " answered " + method + " " + target + " with a body that is not JSON");
        return {status, std::move(parsed)};
    }

private:
    std::string transport_error(CURLcode rc, const BodySink& sink) const {
        if (sink.too_large) return "the daemon's answer is larger than " + bytes(kMaxResponseBytes);
        if (rc == CURLE_OPERATION_TIMEDOUT)
            return "the daemon at " + socket_ + " did not answer within " + std::to_string(kRequestTimeoutMs / 1000) +
                   " s";
        if (rc != CURLE_COULDNT_CONNECT)
            return "talking to the daemon at " + socket_ + ": " + (error_[0] ? error_ : curl_easy_strerror(rc));
        // curl's own text names "localhost port 80"; the socket's errno says what is wrong.
        long os_errno = 0;
        curl_easy_getinfo(easy_.get(), CURLINFO_OS_ERRNO, &os_errno);
        const std::string why = os_errno != 0 ? std::strerror(static_cast<int>(os_errno)) : curl_easy_strerror(rc);
        return "cannot reach the crossdock daemon at " + socket_ + ": " + why +
               "\n  start it with `crossdock serve --socket " + socket_ +
               "`, or give its socket with --socket or $CROSSDOCK_SOCKET";
    }

    std::string socket_;
    std::unique_ptr<CURL, EasyDeleter> easy_;
    char error_[CURL_ERROR_SIZE] = "";  // CURLOPT_ERRORBUFFER: must live as long as the handle
};

std::string resolve_socket(const std::string& flag) {
    std::string path = flag;
    if (const char* env = std::getenv("CROSSDOCK_SOCKET"); path.empty() && env != nullptr) path = env;
    if (path.empty()) path = kDefaultSocket;
    if (path.size() >= sizeof(sockaddr_un::sun_path))
        usage_error("socket path " + path + " is longer than " + std::to_string(sizeof(sockaddr_un::sun_path) - 1) +
                    " bytes, the most a Unix socket address holds");
    return path;
}

// A list endpoint's object ({"<key>": [...], "next_cursor": ...}). With `all`, follows next_cursor
// to the last page and returns every entry in one object whose next_cursor is null.
Json get_list(Api& api, const std::string& path, Params params, const std::string& key, bool all) {
    Json out = api.call("GET", with_query(path, params)).body;
    if (!member(out, key).is_array()) failed("unexpected answer to GET " + path + ": no \"" + key + "\" list");
    for (int page = 1; all && member(out, "next_cursor").is_string(); ++page) {
        if (page >= kMaxPages) failed("GET " + path + ": more than " + std::to_string(kMaxPages) + " pages");
        Params next_params = params;
        next_params.emplace_back("cursor", text(out, "next_cursor"));
        Json next = api.call("GET", with_query(path, next_params)).body;
        if (!member(next, key).is_array()) failed("unexpected answer to GET " + path + ": no \"" + key + "\" list");
        if (member(next, "next_cursor") == member(out, "next_cursor"))
            failed("GET " + path + ": the daemon answered the same next_cursor twice");
        for (auto& entry : next[key]) out[key].push_back(std::move(entry));
        out["next_cursor"] = std::move(next["next_cursor"]);
    }
    return out;
}

// ---------------------------------------------------------------------------------------------
// Flags that become request fields

// Flags mapped one to one onto JSON fields: only those given on the command line go into the body,
// so a PATCH changes only what was asked for.
class BodyFields {
public:
    void add(CLI::Option* opt, std::string key, std::function<Json()> value) {
        fields_.push_back({opt, std::move(key), std::move(value)});
    }
    Json given() const {
        Json body = Json::object();
        for (const auto& f : fields_)
            if (f.opt->count() > 0) body[f.key] = f.value();
        return body;
    }

private:
    struct Field {
        CLI::Option* opt;
        std::string key;
        std::function<Json()> value;
    };
    std::vector<Field> fields_;
};

CLI::Option* text_field(CLI::App* sub, BodyFields& fields, const std::string& flag, const char* key, std::string& var,
                        const std::string& help) {
    auto* opt = sub->add_option(flag, var, help);
    fields.add(opt, key, [&var] { return Json(var); });
    return opt;
}

// A repeatable flag (one value each time) whose values make one JSON list, which replaces the stored one.
CLI::Option* list_field(CLI::App* sub, BodyFields& fields, const std::string& flag, const char* key,
                        std::vector<std::string>& var, const std::string& help) {
    auto* opt = sub->add_option(flag, var, help)->allow_extra_args(false);
    fields.add(opt, key, [&var] { return Json(var); });
    return opt;
}

// The NAME argument of an add, or the REF argument and --name of an edit.
void name_or_ref(CLI::App* sub, BodyFields& fields, std::string& name, std::string& ref, bool create,
                 const std::string& kind) {
    if (create) {
        text_field(sub, fields, "name", "name", name, kind + " name: 1-63 of a-z 0-9 . _ -")->required();
    } else {
        sub->add_option("ref", ref, kind + " id or name")->required();
        text_field(sub, fields, "--name", "name", name, "rename the " + kind);
    }
}

// `flags` as "--on,!--off"; `--on=false` works too. `invert` sends the opposite (--disabled -> enabled).
CLI::Option* bool_field(CLI::App* sub, BodyFields& fields, const std::string& flags, const char* key, bool& var,
                        bool invert, const std::string& help) {
    auto* opt = sub->add_flag(flags, var, help);
    fields.add(opt, key, [&var, invert] { return Json(var != invert); });
    return opt;
}

// One line from standard input, without its line end, as `docker login --password-stdin` reads it;
// on a terminal it is asked for without echo. `what` names it ("password", "webhook secret").
std::string read_secret_line(const std::string& flag, const std::string& what) {
    termios saved{};
    const bool quiet = ::isatty(STDIN_FILENO) == 1 && ::tcgetattr(STDIN_FILENO, &saved) == 0;
    if (quiet) {
        termios no_echo = saved;
        no_echo.c_lflag &= ~static_cast<tcflag_t>(ECHO);
        std::string prompt = what + ": ";
        prompt[0] = static_cast<char>(std::toupper(static_cast<unsigned char>(prompt[0])));
        std::fputs(prompt.c_str(), stderr);
        std::fflush(stderr);
        ::tcsetattr(STDIN_FILENO, TCSAFLUSH, &no_echo);
    }
    std::string line;
    bool too_long = false;
    for (int ch; (ch = std::getchar()) != EOF && ch != '\n';) {
        if (line.size() == engine::kMaxSecretLength) too_long = true;
        else line += static_cast<char>(ch);
    }
    if (quiet) {
        ::tcsetattr(STDIN_FILENO, TCSAFLUSH, &saved);
        std::fputc('\n', stderr);
    }
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (too_long) usage_error(flag + ": longer than " + std::to_string(engine::kMaxSecretLength) + " bytes");
    if (line.empty()) usage_error(flag + ": no " + what + " on standard input");
    return line;
}

// --FLAG-stdin and --FLAG: a write-only value read from the first line of standard input, or
// given on the command line (where other users see it in ps).
struct SecretFlags {
    std::string flag;  // "--password", "--webhook-secret", ...
    std::string what;  // "password", "webhook secret"
    std::string value;
    bool from_stdin = false;
    CLI::Option* stdin_opt = nullptr;
    CLI::Option* value_opt = nullptr;

    void add_to(CLI::App* sub, std::string flag_name, std::string what_name, const std::string& help) {
        flag = std::move(flag_name);
        what = std::move(what_name);
        stdin_opt =
            sub->add_flag(flag + "-stdin", from_stdin, "read the " + help + " from the first line of standard input");
        value_opt = sub->add_option(flag, value,
                                    "the " + help + " (visible to other users in ps; prefer " + flag + "-stdin)");
        stdin_opt->excludes(value_opt);
    }
    bool given() const { return from_stdin || value_opt->count() > 0; }
    // Reads standard input for --FLAG-stdin.
    std::string get() const { return from_stdin ? read_secret_line(flag + "-stdin", what) : value; }
};

// --[PREFIX]username, --[PREFIX]password-stdin, --[PREFIX]password and, when editing,
// --remove-[PREFIX]credentials. The API takes the two fields together or not at all.
struct CredentialFlags {
    std::string prefix;  // "" or "target-"
    std::string username;
    SecretFlags password;
    bool remove = false;
    CLI::Option* username_opt = nullptr;

    void add_to(CLI::App* sub, bool editing) {
        const std::string p = "--" + prefix;
        username_opt = sub->add_option(p + "username", username,
                                       "user name for the password (without one, the password is a token)");
        password.add_to(sub, p + "password", "password", "password or token");
        if (editing)
            sub->add_flag("--remove-" + prefix + "credentials", remove, "forget the stored credentials")
                ->excludes(username_opt)
                ->excludes(password.stdin_opt)
                ->excludes(password.value_opt);
    }

    // Adds "[target_]username" and "[target_]password" to `body` when the flags give credentials.
    void put(Json& body) const {
        std::string key = prefix;
        std::replace(key.begin(), key.end(), '-', '_');
        if (remove) {
            body[key + "username"] = "";
            body[key + "password"] = "";
            return;
        }
        if (!password.given()) {
            if (username_opt->count() > 0)
                usage_error("--" + prefix + "username needs --" + prefix + "password-stdin (or --" + prefix +
                            "password)");
            return;
        }
        body[key + "username"] = username;  // "" with a token
        body[key + "password"] = password.get();
    }
};

// --webhook-secret-stdin, --webhook-secret and, when editing, --remove-webhook-secret: the secret a
// registry's webhooks must carry. Standard input holds one line, so not with --password-stdin.
struct WebhookSecretFlags {
    SecretFlags secret;
    bool remove = false;

    void add_to(CLI::App* sub, bool editing, const CredentialFlags& creds) {
        secret.add_to(sub, "--webhook-secret", "webhook secret",
                      "secret this registry's webhooks carry in their Authorization header");
        secret.stdin_opt->excludes(creds.password.stdin_opt);
        if (editing)
            sub->add_flag("--remove-webhook-secret", remove, "forget the stored webhook secret")
                ->excludes(secret.stdin_opt)
                ->excludes(secret.value_opt);
    }

    // Adds "webhook_secret" to `body` when the flags give one ("" removes it).
    void put(Json& body) const {
        if (remove) body["webhook_secret"] = "";
        else if (secret.given()) body["webhook_secret"] = secret.get();
    }
};

// ---------------------------------------------------------------------------------------------
// Commands

struct Ctx {
    Api& api;
    bool json;
};
using Action = std::function<int(Ctx&)>;

// The arguments of add/update/edit commands; body() is the request's body (reading standard input
// for a --*-stdin flag).
struct RegistryArgs {
    std::string ref, name, url, region, ca_file;
    bool insecure = false;
    CredentialFlags creds;
    WebhookSecretFlags webhook;
    BodyFields fields;

    Json body() const {
        Json body = fields.given();
        creds.put(body);
        webhook.put(body);
        return body;
    }
};

struct RuleArgs {
    std::string ref, name, description, source_registry, source_namespace, repo_filter, tag_filter, type,
        target_registry, target_namespace, schedule, notify_on;
    std::vector<std::string> notify_urls;
    bool overwrite = false, disabled = false, sync_on_push = false, clear_notify_urls = false;
    CredentialFlags creds{"target-"};
    BodyFields fields;

    Json body() const {
        Json body = fields.given();
        creds.put(body);
        return body;
    }
};

struct GroupArgs {
    std::string ref, name, primary, schedule;
    std::vector<std::string> replicas;
    bool replicate_deletes = false, disabled = false;
    BodyFields fields;

    Json body() const { return fields.given(); }
};

struct WatchArgs {
    int64_t id = 0;
    unsigned interval_ms = 500;
    unsigned timeout_s = 0;  // 0 = none
};

struct TaskListArgs {
    std::string rule, group, status, since, until;
    size_t limit = 0;  // 0 = the API's default (or kPageLimit with --all)
    bool all = false;
};

// When a rule or a replication group runs next by its schedule: "" for none, and for a disabled one
// (the API still computes next_fire for it, but it will not run).
std::string next_run(const Json& rule) { return flag(rule, "enabled") ? text(rule, "next_fire") : ""; }

// POSTs a new registry, rule or replication group, or PATCHes the one `ref` names, with `body` (the
// fields whose flags were given); prints what the API stored.
int save(Ctx& c, const std::string& kind, const char* collection, const std::string* ref, const Json& body) {
    if (ref && body.empty()) usage_error("nothing to change: give the flags of the fields to change");
    const Reply r = ref ? c.api.call("PATCH", api_path({collection, *ref}), &body)
                        : c.api.call("POST", api_path({collection}), &body);
    if (c.json) {
        print_json(r.body);
        return kExitOk;
    }
    std::string line = kind + " " + text(r.body, "name") + (ref ? " updated" : " added") + " (id " +
                       text(r.body, "id") + ")";
    if (const std::string next = next_run(r.body); !next.empty()) line += ", next run " + next;
    std::printf("%s\n", printable(line).c_str());
    return kExitOk;
}

int show(Ctx& c, const std::string& path) {
    const Reply r = c.api.call("GET", path);
    if (c.json) print_json(r.body);
    else print_fields(r.body);
    return kExitOk;
}

int remove_one(Ctx& c, const std::string& path, const std::string& what) {
    c.api.call("DELETE", path);
    if (!c.json) std::printf("%s removed\n", printable(what).c_str());
    return kExitOk;
}

// A table's rows, one per entry of a JSON list (none if it is not one).
std::vector<Row> rows_of(const Json& list, const std::function<Row(const Json&)>& row) {
    std::vector<Row> rows;
    if (list.is_array())
        for (const auto& entry : list) rows.push_back(row(entry));
    return rows;
}

// A list as a table, or with --json as the API's list object.
int print_list(Ctx& c, const Json& list, const std::string& key, const Row& header,
               const std::function<Row(const Json&)>& row) {
    if (c.json) print_json(list);
    else print_table(header, rows_of(member(list, key), row));
    return kExitOk;
}

// ---- registries ----

void add_registry_flags(CLI::App* sub, RegistryArgs& a, bool create) {
    name_or_ref(sub, a.fields, a.name, a.ref, create, "registry");
    auto* url = text_field(sub, a.fields, "--url", "url", a.url, "scheme://host[:port], http or https");
    if (create) url->required();
    text_field(sub, a.fields, "--region", "region", a.region, "region for bandwidth caps (crossdock link set)");
    bool_field(sub, a.fields, "--insecure,!--no-insecure", "insecure", a.insecure, false,
               "https without certificate verification");
    // The daemon reads the file, so a relative path is made absolute here, where it was meant.
    auto* ca = sub->add_option("--ca-file", a.ca_file, "PEM bundle to verify the registry with (\"\" = none)");
    a.fields.add(ca, "ca_file", [&a] {
        return Json(a.ca_file.empty() ? "" : std::filesystem::absolute(a.ca_file).lexically_normal().string());
    });
    a.creds.add_to(sub, !create);
    a.webhook.add_to(sub, !create, a.creds);
}

// GET /v1/COLLECTION (registries, rules, replications, links: one page, under the collection's name)
// as print_list.
int list_collection(Ctx& c, const std::string& collection, const Row& header,
                    const std::function<Row(const Json&)>& row) {
    return print_list(c, get_list(c.api, api_path({collection}), {}, collection, false), collection, header, row);
}

int registry_ls(Ctx& c) {
    return list_collection(c, "registries", {"NAME", "URL", "REGION", "INSECURE", "CREDENTIALS", "WEBHOOK"},
                           [](const Json& r) {
                               return Row{text(r, "name"),
                                          text(r, "url"),
                                          or_dash(text(r, "region")),
                                          yes_no(flag(r, "insecure")),
                                          yes_no(flag(r, "has_credentials")),
                                          yes_no(flag(r, "has_webhook_secret"))};
                           });
}

// ---- rules ----

void add_rule_flags(CLI::App* sub, RuleArgs& a, bool create) {
    auto required_to_add = [create](CLI::Option* opt) {
        if (create) opt->required();
    };
    name_or_ref(sub, a.fields, a.name, a.ref, create, "rule");
    required_to_add(text_field(sub, a.fields, "--source-registry", "source_registry", a.source_registry,
                               "registry to copy from (its name)"));
    required_to_add(text_field(sub, a.fields, "--source-namespace", "source_namespace", a.source_namespace,
                               "repository path to copy, e.g. library or team/sub"));
    text_field(sub, a.fields, "--repo-filter", "repo_filter", a.repo_filter,
               "RE2, full match on the repository path below the namespace (\"\" = all)");
    text_field(sub, a.fields, "--tag-filter", "tag_filter", a.tag_filter, "RE2, full match on the tag (\"\" = all)");
    text_field(sub, a.fields, "--type", "type", a.type, "image, helm or all (default all)")
        ->check(CLI::IsMember({"image", "helm", "all"}));
    required_to_add(text_field(sub, a.fields, "--target-registry", "target_registry", a.target_registry,
                               "registry to copy to (its name)"));
    text_field(sub, a.fields, "--target-namespace", "target_namespace", a.target_namespace,
               "namespace on the target (\"\" = the source namespace)");
    a.creds.add_to(sub, !create);
    bool_field(sub, a.fields, "--overwrite,!--no-overwrite", "overwrite", a.overwrite, false,
               "replace target tags that hold other content (--overwrite=false or --no-overwrite: keep them)");
    bool_field(sub, a.fields, "--disabled,!--enabled", "enabled", a.disabled, true,
               "keep the rule from running (--enabled or --disabled=false: let it run)");
    text_field(sub, a.fields, "--schedule", "schedule", a.schedule,
               "interval (30m, 2h, 1d), 5-field cron in UTC, or @daily, @hourly...; \"\" = manual only");
    bool_field(sub, a.fields, "--sync-on-push,!--no-sync-on-push", "sync_on_push", a.sync_on_push, false,
               "copy what is pushed to the source as its webhooks announce it, and reconcile periodically");
    auto* urls = list_field(sub, a.fields, "--notify-url", "notify_urls", a.notify_urls,
                            "POST a JSON summary to this http(s) URL when a task of the rule ends; repeat for "
                            "several (at most 10)" +
                                std::string(create ? "" : "; replaces the rule's list"));
    if (!create) {
        auto* clear = sub->add_flag("--clear-notify-urls", a.clear_notify_urls, "remove every notify URL");
        clear->disable_flag_override()->excludes(urls);
        a.fields.add(clear, "notify_urls", [] { return Json::array(); });
    }
    text_field(sub, a.fields, "--notify-on", "notify_on", a.notify_on,
               "when to notify: always (default), failure (Failed, PartiallyFailed) or success")
        ->check(CLI::IsMember({"always", "failure", "success"}));
    text_field(sub, a.fields, "--description", "description", a.description, "free text");
}

std::string rule_filters(const Json& r) {
    std::string out;
    auto add = [&out](const char* label, const std::string& value) {
        if (!value.empty()) out += (out.empty() ? "" : " ") + std::string(label) + value;
    };
    add("repo=", text(r, "repo_filter"));
    add("tag=", text(r, "tag_filter"));
    if (text(r, "type") != "all") add("type=", text(r, "type"));
    return or_dash(out);
}

int rule_ls(Ctx& c) {
    return list_collection(
        c, "rules", {"NAME", "SOURCE", "TARGET", "FILTERS", "SCHEDULE", "PUSH", "ENABLED", "NEXT"}, [](const Json& r) {
            const std::string source_ns = text(r, "source_namespace");
            const std::string target_ns = text(r, "target_namespace");
            return Row{text(r, "name"),
                       text(r, "source_registry") + "/" + source_ns,
                       text(r, "target_registry") + "/" + (target_ns.empty() ? source_ns : target_ns),
                       rule_filters(r),
                       or_dash(text(r, "schedule")),
                       yes_no(flag(r, "sync_on_push")),
                       yes_no(flag(r, "enabled")),
                       or_dash(next_run(r))};
        });
}

// POST /v1/COLLECTION/REF/enable|disable of a rule or a replication group (`kind` names it).
int set_enabled(Ctx& c, const std::string& kind, const char* collection, const std::string& ref, const char* action) {
    const Reply r = c.api.call("POST", api_path({collection, ref, action}));
    if (c.json) {
        print_json(r.body);
        return kExitOk;
    }
    std::string line = kind + " " + text(r.body, "name") + (flag(r.body, "enabled") ? " enabled" : " disabled");
    if (const std::string next = next_run(r.body); !next.empty()) line += ", next run " + next;
    std::printf("%s\n", printable(line).c_str());
    return kExitOk;
}

// ---- tasks ----

bool is_terminal(const Json& task) {
    const auto status = engine::parse_task_status(text(task, "status"));
    return status && engine::is_terminal(*status);
}

std::string task_counters(const Json& t) {
    return std::to_string(number(t, "copied")) + " copied, " + std::to_string(number(t, "skipped")) + " skipped, " +
           std::to_string(number(t, "failed")) + " failed, " + bytes(number(t, "bytes"));
}

// "task 7 InProgress[ ELAPSED]: 10 copied, 0 skipped, 0 failed, 1.2 GiB | bytes_sent 500 MiB, ...":
// the status and what changes most first, as a terminal line may be cut.
std::string task_line(const Json& t, bool elapsed) {
    std::string line = "task " + text(t, "id") + " " + text(t, "status");
    if (elapsed) line += " " + duration(t, "duration_ms");
    if (flag(t, "cancel_requested") && !is_terminal(t)) line += " (cancel requested)";
    line += ": " + task_counters(t);
    std::string progress;
    static const Json kNoProgress = Json::object();
    const Json& p = member(t, "progress");
    for (bool byte_fields : {true, false})  // bytes first: they move most
        for (const auto& [key, value] : (p.is_object() ? p : kNoProgress).items())
            if (value.is_number() && (key.find("bytes") != std::string::npos) == byte_fields)
                progress += (progress.empty() ? " | " : ", ") + key + " " + show_value(key, value);
    return printable(line + progress);
}

void print_task_summary(const Json& t) {
    const std::string id = text(t, "id");
    std::printf("%s\n", printable("task " + id + " " + text(t, "status") + " in " + duration(t, "duration_ms") + ": " +
                                  std::to_string(number(t, "repositories")) + " repositories, " + task_counters(t))
                            .c_str());
    if (const std::string reason = text(t, "reason"); !reason.empty())
        std::printf("reason: %s\n", printable(reason).c_str());
    if (number(t, "failed") > 0) std::printf("failed artifacts: crossdock task logs %s --action failed\n", id.c_str());
}

volatile std::sig_atomic_t g_interrupted = 0;
void on_sigint(int) { g_interrupted = 1; }

// While it lives, SIGINT only sets g_interrupted; a second one ends the process (SA_RESETHAND).
// No SA_RESTART, so the sleep between polls ends at once.
class SigintGuard {
public:
    SigintGuard() {
        g_interrupted = 0;
        struct sigaction sa {};
        sa.sa_handler = &on_sigint;
        sigemptyset(&sa.sa_mask);
        sa.sa_flags = SA_RESETHAND;
        ::sigaction(SIGINT, &sa, &old_);
    }
    ~SigintGuard() { ::sigaction(SIGINT, &old_, nullptr); }
    SigintGuard(const SigintGuard&) = delete;
    SigintGuard& operator=(const SigintGuard&) = delete;

private:
    struct sigaction old_ {};
};

size_t terminal_columns() {
    winsize ws{};
    return ::ioctl(STDOUT_FILENO, TIOCGWINSZ, &ws) == 0 ? ws.ws_col : 0;
}

// Cut to one terminal line, so "\r\033[K" can redraw it (a wrapped line would scroll instead).
std::string fit(std::string line, size_t width) {
    if (width == 0 || columns(line) < width) return line;
    while (!line.empty() && columns(line) >= width) {
        line.pop_back();
        while (!line.empty() && (static_cast<unsigned char>(line.back()) & 0xC0) == 0x80) line.pop_back();
        if (!line.empty() && (static_cast<unsigned char>(line.back()) & 0xC0) == 0xC0) line.pop_back();
    }
    return line;
}

// Polls the task until its status is terminal. On a terminal: one line redrawn in place; otherwise
// a line per change; --json: one compact JSON line per change. Exit 0 for Succeeded, 1 otherwise.
int watch_task(Ctx& c, const WatchArgs& w) {
    using Clock = std::chrono::steady_clock;
    const bool tty = !c.json && ::isatty(STDOUT_FILENO) == 1;
    const auto deadline = w.timeout_s > 0 ? Clock::now() + std::chrono::seconds(w.timeout_s) : Clock::time_point::max();
    const std::string path = api_path({"tasks", std::to_string(w.id)});
    SigintGuard sigint;
    bool drawn = false;  // a redrawn line is on screen, without its newline
    auto end_line = [&] {
        if (drawn) std::putchar('\n');
        drawn = false;
    };
    std::string last;
    try {
        while (true) {
            const Json t = c.api.call("GET", path).body;
            const std::string line = task_line(t, false);  // what "changed" means: not the elapsed time
            const bool done = is_terminal(t);
            if (c.json) {
                if (line != last || done) print_json(t, -1);
            } else if (done) {
                if (drawn) std::printf("\r\033[K");  // the summary replaces the progress line
                print_task_summary(t);
            } else if (tty) {
                std::printf("\r\033[K%s", fit(task_line(t, true), terminal_columns()).c_str());
                drawn = true;
            } else if (line != last) {
                std::printf("%s\n", line.c_str());
            }
            std::fflush(stdout);
            last = line;
            if (done) return text(t, "status") == "Succeeded" ? kExitOk : kExitFailed;
            const auto now = Clock::now();
            if (now >= deadline)
                failed("task " + std::to_string(w.id) + " did not finish within --timeout " +
                       std::to_string(w.timeout_s) + " s; it goes on in the daemon");
            const auto wait = std::min<Clock::duration>(std::chrono::milliseconds(w.interval_ms), deadline - now);
            const auto wait_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(wait).count();
            timespec ts{static_cast<time_t>(wait_ns / 1'000'000'000), static_cast<long>(wait_ns % 1'000'000'000)};
            ::nanosleep(&ts, nullptr);  // a SIGINT ends it early (EINTR)
            if (g_interrupted) {
                end_line();
                std::fflush(stdout);
                std::fprintf(
                    stderr,
                    "crossdock: interrupted; task %lld goes on in the daemon (crossdock task cancel %lld stops it)\n",
                    static_cast<long long>(w.id), static_cast<long long>(w.id));
                return kExitInterrupted;
            }
        }
    } catch (const Failure&) {
        end_line();
        std::fflush(stdout);
        throw;
    }
}

void add_watch_flags(CLI::App* sub, WatchArgs& w) {
    sub->add_option("--interval-ms", w.interval_ms, "time between polls")
        ->check(CLI::Range(50u, 60'000u))
        ->capture_default_str();
    sub->add_option("--timeout", w.timeout_s, "give up after SECONDS (exit 1; the task goes on); default: no limit")
        ->check(CLI::Range(1u, 7u * 86400u));
}

// POST to a rule's or a replication group's trigger `path`: the queued task, then with `watch` its
// progress as `task watch` shows it.
int trigger(Ctx& c, const std::string& path, bool watch, WatchArgs w) {
    const Reply r = c.api.call("POST", path);
    const Json& id = member(r.body, "id");
    if (!id.is_number_integer()) failed("unexpected answer to the trigger: no task id");
    w.id = id.get<int64_t>();
    if (c.json && !watch) print_json(r.body);
    if (!c.json) std::printf("task %lld queued\n", static_cast<long long>(w.id));
    std::fflush(stdout);
    return watch ? watch_task(c, w) : kExitOk;
}

int task_ls(Ctx& c, const TaskListArgs& a) {
    Params params;
    for (const auto& [key, value] : {std::pair<const char*, const std::string*>{"rule", &a.rule},
                                     {"group", &a.group},
                                     {"status", &a.status},
                                     {"since", &a.since},
                                     {"until", &a.until}})
        if (!value->empty()) params.emplace_back(key, *value);
    if (a.limit > 0 || a.all) params.emplace_back("limit", std::to_string(a.limit > 0 ? a.limit : kPageLimit));
    const Json list = get_list(c.api, api_path({"tasks"}), params, "tasks", a.all);
    const int rc =
        print_list(c, list, "tasks",
                   {"ID", "RULE", "TRIGGER", "STATUS", "CREATED", "DURATION", "COPIED", "SKIPPED", "FAILED", "BYTES"},
                   [](const Json& t) {
                       std::string status = text(t, "status");
                       if (flag(t, "cancel_requested") && !is_terminal(t)) status += " (cancelling)";
                       const std::string group = text(t, "group_name");
                       return Row{text(t, "id"),
                                  group.empty() ? or_dash(text(t, "rule_name")) : "group:" + group,
                                  text(t, "trigger"),
                                  status,
                                  text(t, "created"),
                                  duration(t, "duration_ms"),
                                  std::to_string(number(t, "copied")),
                                  std::to_string(number(t, "skipped")),
                                  std::to_string(number(t, "failed")),
                                  bytes(number(t, "bytes"))};
                   });
    if (!c.json && member(list, "next_cursor").is_string())
        std::fprintf(stderr, "(more tasks: --all lists every page)\n");
    return rc;
}

// "repo:tag", or "repo@digest" for an artifact named by digest only; " (delete)" for a delete.
std::string scope_entry(const Json& s) {
    const std::string tag = text(s, "tag");
    return text(s, "repository") + (tag.empty() ? "@" + text(s, "digest") : ":" + tag) +
           (flag(s, "remove") ? " (delete)" : "");
}

// The task's fields, the artifacts it is limited to, and its notifications out. --json: the task's
// object with its "deliveries" list added.
int task_show(Ctx& c, int64_t id) {
    const std::string path = api_path({"tasks", std::to_string(id)});
    Json t = c.api.call("GET", path).body;
    if (!t.is_object()) failed("unexpected answer to GET " + path + ": not an object");
    Json deliveries = std::move(get_list(c.api, path + "/deliveries", {}, "deliveries", false)["deliveries"]);
    if (c.json) {
        t["deliveries"] = std::move(deliveries);
        print_json(t);
        return kExitOk;
    }
    const Json scope = member(t, "scope");
    if (scope.is_array())
        t["scope"] = scope.empty() ? "full scan" : plural(scope.size(), "artifact") + " (below)";
    print_fields(t);
    if (scope.is_array() && !scope.empty()) {
        std::printf("\nscope:\n");
        for (const auto& s : scope) std::printf("  %s\n", printable(scope_entry(s)).c_str());
    }
    if (!deliveries.empty()) {
        std::printf("\ndeliveries:\n");
        print_table({"URL", "STATUS", "ATTEMPTS", "LAST_ERROR"}, rows_of(deliveries, [](const Json& d) {
                        return Row{text(d, "url"), text(d, "status"), std::to_string(number(d, "attempts")),
                                   or_dash(text(d, "last_error"))};
                    }));
    }
    return kExitOk;
}

int task_logs(Ctx& c, int64_t id, const std::string& action) {
    Params params{{"limit", std::to_string(kPageLimit)}};
    if (!action.empty()) params.emplace_back("action", action);
    const Json list = get_list(c.api, api_path({"tasks", std::to_string(id), "items"}), params, "items", true);
    return print_list(c, list, "items",
                      {"TARGET", "REPOSITORY", "TAG", "DIGEST", "ACTION", "BYTES", "DURATION", "REASON"},
                      [](const Json& i) {
                          return Row{or_dash(text(i, "target")),
                                     text(i, "repository"),
                                     text(i, "tag"),
                                     short_digest(i),
                                     text(i, "action"),
                                     bytes(number(i, "bytes")),
                                     duration(i, "duration_ms"),
                                     or_dash(text(i, "reason"))};
                      });
}

int task_cancel(Ctx& c, int64_t id) {
    const Reply r = c.api.call("POST", api_path({"tasks", std::to_string(id), "cancel"}));
    if (c.json) print_json(r.body);
    else if (r.status == 202) std::printf("task %lld: cancel requested\n", static_cast<long long>(id));
    else std::printf("task %lld %s\n", static_cast<long long>(id), printable(text(r.body, "status")).c_str());
    return kExitOk;
}

// ---- links ----

struct LinkArgs {
    std::string source, target, rate, burst;
};

int link_set(Ctx& c, const LinkArgs& a) {
    const auto rate = planner::parse_rate(a.rate);
    if (!rate) usage_error("--rate '" + a.rate + "': expected a rate such as 200Mbit, 1Gbit or 50MiB/s");
    if (*rate < 1) usage_error("--rate must be above 0 (crossdock link rm removes a cap)");
    std::optional<double> burst = 0.0;
    if (!a.burst.empty()) burst = planner::parse_rate(a.burst);
    if (!burst) usage_error("--burst '" + a.burst + "': expected a size such as 64MiB or 100MB");
    const Json body{{"rate_bytes_per_s", static_cast<uint64_t>(std::llround(*rate))},
                    {"burst_bytes", static_cast<uint64_t>(std::llround(*burst))}};
    const Reply r = c.api.call("PUT", api_path({"links", a.source, a.target}), &body);
    if (c.json) {
        print_json(r.body);
        return kExitOk;
    }
    const uint64_t burst_bytes = number(r.body, "burst_bytes");
    std::printf("%s\n", printable("link " + a.source + " -> " + a.target + ": " +
                                  planner::format_rate(static_cast<double>(number(r.body, "rate_bytes_per_s"))) +
                                  ", burst " + (burst_bytes > 0 ? bytes(burst_bytes) : "1 s of rate") +
                                  (r.status == 201 ? " (added)" : " (replaced)"))
                            .c_str());
    return kExitOk;
}

int link_ls(Ctx& c) {
    return list_collection(c, "links", {"SOURCE", "TARGET", "RATE", "BURST"}, [](const Json& l) {
        const uint64_t burst = number(l, "burst_bytes");
        return Row{text(l, "source_region"), text(l, "target_region"),
                   planner::format_rate(static_cast<double>(number(l, "rate_bytes_per_s"))),
                   burst > 0 ? bytes(burst) : "1 s of rate"};
    });
}

// ---- replication groups ----

void add_group_flags(CLI::App* sub, GroupArgs& a, bool create) {
    name_or_ref(sub, a.fields, a.name, a.ref, create, "replication group");
    auto* primary = text_field(sub, a.fields, "--primary", "primary", a.primary,
                               "registry that images are pushed to (its name)");
    auto* replicas = list_field(sub, a.fields, "--replica", "replicas", a.replicas,
                                "registry that gets a copy of everything on the primary (its name); repeat for "
                                "several (at most 16)" +
                                    std::string(create ? "" : "; replaces the group's list"));
    if (create) {
        primary->required();
        replicas->required();
    }
    bool_field(sub, a.fields, "--replicate-deletes,!--no-replicate-deletes", "replicate_deletes", a.replicate_deletes,
               false, "delete from the replicas a tag deleted on the primary");
    text_field(sub, a.fields, "--schedule", "schedule", a.schedule,
               "full reconcile scan: interval (30m, 2h, 1d), 5-field cron in UTC, or @daily, @hourly...; \"\" = "
               "events only" +
                   std::string(create ? " (default 1h)" : ""));
    bool_field(sub, a.fields, "--disabled,!--enabled", "enabled", a.disabled, true,
               "keep the group from replicating (--enabled or --disabled=false: let it)");
}

int replication_ls(Ctx& c) {
    return list_collection(c, "replications", {"NAME", "PRIMARY", "REPLICAS", "DELETES", "SCHEDULE", "ENABLED"},
                           [](const Json& g) {
                               return Row{text(g, "name"),
                                          text(g, "primary"),
                                          show_value("replicas", member(g, "replicas")),
                                          yes_no(flag(g, "replicate_deletes")),
                                          or_dash(text(g, "schedule")),
                                          yes_no(flag(g, "enabled"))};
                           });
}

// What a Lagging replica waits for ("3 artifacts, 12.0 MiB"); "-" in any other state.
std::string replica_behind(const Json& r) {
    if (text(r, "state") != "Lagging") return "-";
    std::string out;
    if (const uint64_t n = number(r, "artifacts_behind"); n > 0) out = plural(n, "artifact") + ", ";
    if (flag(r, "full_scan_pending")) out += "full scan pending, ";
    return out + bytes(number(r, "bytes_behind"));
}

// The replica's last error, after how many artifacts failed for it in the last task.
std::string replica_error(const Json& r) {
    const std::string error = text(r, "last_error");
    const uint64_t failed = number(r, "failed_artifacts");
    if (error.empty()) return "-";
    return failed > 0 ? plural(failed, "failed artifact") + ", last: " + error : error;
}

// Per replica: its state, what it lags by, the group's last finished task and the replica's error
// in it; then the group's recent tasks.
int replication_status(Ctx& c, const std::string& ref) {
    const Json s = c.api.call("GET", api_path({"replications", ref, "status"})).body;
    print_list(c, s, "replicas", {"REPLICA", "STATE", "BEHIND", "LAST", "ERROR"}, [](const Json& r) {
        const Json& last = member(r, "last_task");
        return Row{text(r, "registry"), text(r, "state"), replica_behind(r),
                   last.is_object() ? "#" + text(last, "id") + " " + text(last, "status") : "-", replica_error(r)};
    });
    if (c.json) return kExitOk;
    const Json& tasks = member(s, "tasks");
    if (!tasks.is_array() || tasks.empty()) {
        std::printf("\nrecent tasks: none\n");
        return kExitOk;
    }
    std::printf("\nrecent tasks:\n");
    print_table({"ID", "TRIGGER", "STATUS", "CREATED", "FINISHED", "COPIED", "FAILED", "BYTES"},
                rows_of(tasks, [](const Json& t) {
                    return Row{text(t, "id"),
                               text(t, "trigger"),
                               text(t, "status"),
                               text(t, "created"),
                               or_dash(text(t, "finished")),
                               std::to_string(number(t, "copied")),
                               std::to_string(number(t, "failed")),
                               bytes(number(t, "bytes"))};
                }));
    return kExitOk;
}

// Which registries of the group hold IMAGE, by digest, as the daemon asks them now. Exit 0 if every
// replica holds the primary's digest, 1 otherwise (with --json too).
int replication_where(Ctx& c, const std::string& ref, const std::string& image) {
    const Json w = c.api.call("GET", with_query(api_path({"replications", ref, "where"}), {{"image", image}})).body;
    const Json& replicas = member(w, "replicas");
    const bool in_sync = replicas.is_array() && std::all_of(replicas.begin(), replicas.end(), [](const Json& r) {
                             return flag(r, "same_as_primary");
                         });
    if (c.json) {
        print_json(w);
        return in_sync ? kExitOk : kExitFailed;
    }
    // An error, a missing manifest, or `found` (what a registry holding one is).
    const auto status = [](const Json& r, const std::string& found) {
        if (const std::string error = text(r, "error"); !error.empty()) return "error: " + error;
        return member(r, "digest").is_string() ? found : "missing";
    };
    std::vector<Row> rows = rows_of(replicas, [&status](const Json& r) {
        return Row{text(r, "registry"), "replica", short_digest(r),
                   status(r, flag(r, "same_as_primary") ? "in sync" : "different digest")};
    });
    const Json& primary = member(w, "primary");
    rows.insert(rows.begin(),
                {text(primary, "registry"), "primary", short_digest(primary), status(primary, "primary")});
    print_table({"REGISTRY", "ROLE", "DIGEST", "STATUS"}, rows);
    return in_sync ? kExitOk : kExitFailed;
}

// ---- webhook events ----

int event_ls(Ctx& c, size_t limit) {
    Params params;
    if (limit > 0) params.emplace_back("limit", std::to_string(limit));
    return print_list(c, get_list(c.api, api_path({"events"}), params, "events", false), "events",
                      {"RECEIVED", "REGISTRY", "ACTION", "REPOSITORY", "TAG", "DIGEST", "PROCESSED", "TASKS"},
                      [](const Json& e) {
                          return Row{text(e, "received"),
                                     text(e, "registry"),
                                     text(e, "action"),
                                     text(e, "repository"),
                                     or_dash(text(e, "tag")),
                                     short_digest(e),
                                     yes_no(flag(e, "processed")),
                                     show_value("task_ids", member(e, "task_ids"))};
                      });
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Wiring

struct ClientCommands::State {
    std::string socket;
    bool json = false;
    std::vector<std::pair<CLI::App*, Action>> commands;

    CLI::App* add(CLI::App* group, const char* name, const std::string& help, Action action) {
        auto* sub = group->add_subcommand(name, help);
        commands.emplace_back(sub, std::move(action));
        return sub;
    }
};

std::optional<int> ClientCommands::run() const {
    for (const auto& [sub, action] : state_->commands) {
        if (!sub->parsed()) continue;
        try {
            Api api(resolve_socket(state_->socket));
            Ctx c{api, state_->json};
            return action(c);
        } catch (const Failure& f) {
            std::fflush(stdout);
            std::fprintf(stderr, "crossdock: %s\n", f.what());
            return f.exit_code;
        }
    }
    return std::nullopt;
}

ClientCommands add_client_commands(CLI::App& app) {
    auto st = std::make_shared<ClientCommands::State>();
    auto group = [&app](const char* name, const char* help) {
        auto* g = app.add_subcommand(name, help);
        g->require_subcommand(1);
        return g;
    };

    // Commands of one group that take a REF (registry, rule or replication group) or a task ID share
    // its storage: only one command is parsed.
    auto ref = std::make_shared<std::string>();
    auto id = std::make_shared<int64_t>(0);
    auto with_ref = [&ref](CLI::App* sub, const std::string& kind) {
        sub->add_option("ref", *ref, kind + " id or name")->required();
        return sub;
    };
    auto with_id = [&id](CLI::App* sub) {
        sub->add_option("id", *id, "task id")->required();
        return sub;
    };
    auto trigger_watch = std::make_shared<bool>(false);
    auto watch = std::make_shared<WatchArgs>();
    // The commands of rules and of replication groups: ADD (with `Args` and its flags), edit, ls,
    // show, enable, disable, rm and trigger.
    auto add_runnable = [&]<class Args>(CLI::App* g, const char* collection, const std::string& kind, const char* add,
                                        void (*add_flags)(CLI::App*, Args&, bool), Action ls,
                                        const std::string& rm_help, const std::string& trigger_help) {
        for (bool create : {true, false}) {
            auto a = std::make_shared<Args>();
            auto save_it = [a, create, kind, collection](Ctx& c) {
                return save(c, kind, collection, create ? nullptr : &a->ref, a->body());
            };
            add_flags(st->add(g, create ? add : "edit",
                              create ? "Add a " + kind : "Change a " + kind + " (only the fields given)", save_it),
                      *a, create);
        }
        st->add(g, "ls", "List " + kind + "s", std::move(ls));
        with_ref(st->add(g, "show", "Show a " + kind,
                         [ref, collection](Ctx& c) {
                             return show(c, api_path({collection, *ref}));
                         }),
                 kind);
        for (const auto& [action, verb] : {std::pair{"enable", "Enable"}, {"disable", "Disable"}})
            with_ref(st->add(g, action, verb + (" a " + kind),
                             [ref, kind, collection, action](Ctx& c) {
                                 return set_enabled(c, kind, collection, *ref, action);
                             }),
                     kind);
        with_ref(st->add(g, "rm", rm_help,
                         [ref, kind, collection](Ctx& c) {
                             return remove_one(c, api_path({collection, *ref}), kind + " " + *ref);
                         }),
                 kind);
        auto* trigger_cmd = with_ref(st->add(g, "trigger", trigger_help,
                                             [ref, collection, trigger_watch, watch](Ctx& c) {
                                                 return trigger(c, api_path({collection, *ref, "trigger"}),
                                                                *trigger_watch, *watch);
                                             }),
                                     kind);
        trigger_cmd->add_flag("--watch", *trigger_watch,
                              "then show the task's progress as `crossdock task watch` does");
        add_watch_flags(trigger_cmd, *watch);
    };

    auto* registry = group("registry", "Registries known to the crossdock daemon");
    for (bool create : {true, false}) {
        auto a = std::make_shared<RegistryArgs>();
        auto save_registry = [a, create](Ctx& c) {
            return save(c, "registry", "registries", create ? nullptr : &a->ref, a->body());
        };
        add_registry_flags(
            st->add(registry, create ? "add" : "update",
                    create ? "Add a registry" : "Change a registry (only the fields given)", save_registry),
            *a, create);
    }
    st->add(registry, "ls", "List registries", registry_ls);
    with_ref(st->add(registry, "show", "Show a registry",
                     [ref](Ctx& c) {
                         return show(c, api_path({"registries", *ref}));
                     }),
             "registry");
    with_ref(st->add(registry, "rm", "Remove a registry (refused while a rule or a replication group uses it)",
                     [ref](Ctx& c) {
                         return remove_one(c, api_path({"registries", *ref}), "registry " + *ref);
                     }),
             "registry");

    add_runnable(group("rule", "Replication rules of the crossdock daemon"), "rules", "rule", "add",
                 &add_rule_flags, rule_ls, "Remove a rule (its queued tasks stop, running ones are asked to)",
                 "Queue a run of a rule now");

    auto* replication = group("replication", "Replication groups: push once to the primary, pull in every replica");
    add_runnable(replication, "replications", "replication group", "create", &add_group_flags,
                 replication_ls, "Remove a replication group (its queued tasks stop, running ones are asked to)",
                 "Queue a full reconcile scan of a replication group now");
    with_ref(st->add(replication, "status",
                     "Each replica's state (InSync, Lagging, Failing, Unknown), and the group's recent tasks",
                     [ref](Ctx& c) { return replication_status(c, *ref); }),
             "replication group");
    auto image = std::make_shared<std::string>();
    with_ref(st->add(replication, "where",
                     "Which registries of a group hold an image, by digest (asked now); exit 0 if every replica "
                     "holds the primary's digest, 1 otherwise",
                     [ref, image](Ctx& c) { return replication_where(c, *ref, *image); }),
             "replication group")
        ->add_option("image", *image, "REPOSITORY:TAG or REPOSITORY@DIGEST (without the registry host)")
        ->required();

    auto* task = group("task", "Runs of rules and replication groups, and what they copied");
    auto list = std::make_shared<TaskListArgs>();
    auto* ls = st->add(task, "ls", "List tasks, newest first", [list](Ctx& c) { return task_ls(c, *list); });
    ls->add_option("--rule", list->rule, "only this rule's (id or name)");
    ls->add_option("--group", list->group, "only this replication group's (id or name)");
    ls->add_option("--status", list->status, "Queued, InProgress, Succeeded, PartiallyFailed, Failed or Stopped");
    ls->add_option("--since", list->since, "created at or after this RFC 3339 time, e.g. 2024-05-01T12:00:00Z");
    ls->add_option("--until", list->until, "created before this RFC 3339 time");
    ls->add_option("--limit", list->limit, "tasks per page (the API's default: 50)")
        ->check(CLI::Range(size_t{1}, kPageLimit));
    ls->add_flag("--all", list->all, "follow next_cursor through every page");
    with_id(st->add(task, "show", "Show a task: its fields, the artifacts it is limited to, its notifications",
                    [id](Ctx& c) { return task_show(c, *id); }));
    auto action = std::make_shared<std::string>();
    with_id(st->add(task, "logs", "What a task did, artifact by artifact (and target by target)",
                    [id, action](Ctx& c) { return task_logs(c, *id, *action); }))
        ->add_option("--action", *action,
                     "only \"copied\", \"skipped: exists\", \"skipped: same digest\" or \"failed\"");
    with_id(st->add(task, "cancel", "Stop a queued task, or ask a running one to stop",
                    [id](Ctx& c) { return task_cancel(c, *id); }));
    auto* watch_cmd = st->add(task, "watch", "Show a task's progress until it ends (exit 0 if it Succeeded)",
                              [watch](Ctx& c) { return watch_task(c, *watch); });
    watch_cmd->add_option("id", watch->id, "task id")->required();
    add_watch_flags(watch_cmd, *watch);

    auto* event = group("event", "Webhook events the daemon received from registries");
    auto event_limit = std::make_shared<size_t>(0);
    st->add(event, "ls", "List received events, newest first",
            [event_limit](Ctx& c) { return event_ls(c, *event_limit); })
        ->add_option("--limit", *event_limit, "at most this many (the API's default: 100)")
        ->check(CLI::Range(size_t{1}, kPageLimit));

    auto* link = group("link", "Bandwidth caps between regions");
    auto l = std::make_shared<LinkArgs>();
    auto* set =
        st->add(link, "set", "Cap the bandwidth from one region to another", [l](Ctx& c) { return link_set(c, *l); });
    set->add_option("source", l->source, "source region")->required();
    set->add_option("target", l->target, "target region")->required();
    set->add_option("--rate", l->rate, "e.g. 200Mbit, 1Gbit, 50MiB/s")->required();
    set->add_option("--burst", l->burst, "bytes that may go at once, e.g. 64MiB (default: 1 s of rate)");
    st->add(link, "ls", "List bandwidth caps", link_ls);
    auto* rm = st->add(link, "rm", "Remove a bandwidth cap", [l](Ctx& c) {
        return remove_one(c, api_path({"links", l->source, l->target}), "link " + l->source + " -> " + l->target);
    });
    rm->add_option("source", l->source, "source region")->required();
    rm->add_option("target", l->target, "target region")->required();

    for (auto& [sub, unused] : st->commands) {
        sub->add_option(
            "--socket", st->socket,
            std::string("the daemon's Unix socket (default: $CROSSDOCK_SOCKET, else ") + kDefaultSocket + ")");
        sub->add_flag("--json", st->json, "print the API's JSON answer instead of a table");
    }
    return ClientCommands(std::move(st));
}
