#include "engine/registry_client.h"

#include <chrono>
#include <nlohmann/json.hpp>
#include <random>

#include "cas/digest.h"
#include "engine/manifest.h"

namespace engine {

namespace {

constexpr const char* kUserAgent = "crossdock/0.1";
constexpr int kMaxPages = 100000;
constexpr size_t kMaxManifestBytes = 8u << 20;  // distribution caps manifests at 4 MiB

std::string pull_scope(const std::string& repo) { return "repository:" + repo + ":pull"; }
std::string push_scope(const std::string& repo) { return "repository:" + repo + ":pull,push"; }

// Scope lists are built outside co_await expressions: gcc 12 cannot keep an initializer_list's
// backing array alive across a suspension ("array used as initializer").
std::vector<std::string> scopes_of(std::string a, std::string b = {}) {
    std::vector<std::string> v;
    v.push_back(std::move(a));
    if (!b.empty()) v.push_back(std::move(b));
    return v;
}

std::string join(const std::vector<std::string>& v, const char* sep) {
    std::string out;
    for (const auto& s : v) {
        if (!out.empty()) out += sep;
        out += s;
    }
    return out;
}

// "scheme://host[:port]" of an absolute URL.
std::string origin_of(const std::string& url) {
    auto p = url.find("://");
    if (p == std::string::npos) return {};
    auto slash = url.find('/', p + 3);
    return slash == std::string::npos ? url : url.substr(0, slash);
}

std::string with_query(const std::string& url, const std::string& kv) {
    return url + (url.find('?') == std::string::npos ? "?" : "&") + kv;
}

netio::Error error(std::string msg) { return netio::Error::make(std::move(msg)); }

}  // namespace

RegistryClient::RegistryClient(netio::HttpClient& http, RegistryOptions opts)
    : http_(http),
      opts_(std::move(opts)),
      backoff_(opts_.backoff, std::random_device{}()),
      budget_(opts_.max_connections, opts_.max_requests_per_s) {}

Task<void> RegistryClient::acquire_slot() {
    struct Park {
        std::deque<std::coroutine_handle<>>& q;
        bool await_ready() const noexcept { return false; }
        void await_suspend(std::coroutine_handle<> h) { q.push_back(h); }
        void await_resume() const noexcept {}
    };
    for (;;) {
        const auto now = planner::Clock::now();
        if (budget_.try_start(now)) co_return;
        const auto next = budget_.next_start(now);
        if (next == planner::TimePoint::max()) {
            co_await Park{slot_waiters_};  // every slot busy: woken by release_slot()
        } else {
            auto wait = std::chrono::ceil<std::chrono::milliseconds>(next - now);
            co_await netio::sleep_for(http_.loop(), std::max(wait, std::chrono::milliseconds(1)));
        }
    }
}

void RegistryClient::release_slot() {
    budget_.finish();
    if (!slot_waiters_.empty()) {
        auto h = slot_waiters_.front();
        slot_waiters_.pop_front();
        http_.loop().defer([h] { h.resume(); });
    }
}

netio::Request RegistryClient::make_request(std::string method, std::string u) const {
    netio::Request r;
    r.method = std::move(method);
    r.url = std::move(u);
    r.tls.verify = !opts_.insecure;
    r.tls.ca_file = opts_.ca_file;
    r.timeout_ms = opts_.request_timeout_ms;
    r.socket_recv_buffer_bytes = opts_.socket_recv_buffer_bytes;
    r.headers.emplace_back("User-Agent", kUserAgent);
    return r;
}

std::string RegistryClient::resolve_location(const netio::Response& r, const std::string& request_url) const {
    std::string loc = r.header("Location");
    if (loc.empty()) return {};
    if (loc.find("://") != std::string::npos) return loc;
    std::string base = origin_of(r.effective_url.empty() ? request_url : r.effective_url);
    if (!loc.empty() && loc[0] != '/') loc = "/" + loc;
    return base + loc;
}

netio::Error RegistryClient::describe(const std::string& what, const netio::Response& r) const {
    std::string msg = what + ": HTTP " + std::to_string(r.status);
    auto j = nlohmann::json::parse(r.body, nullptr, false);
    bool described = false;
    if (j.is_object() && j.contains("errors") && j["errors"].is_array()) {
        for (const auto& e : j["errors"]) {
            if (!e.is_object()) continue;
            msg += described ? "; " : " ";
            if (e.contains("code") && e["code"].is_string()) msg += e["code"].get<std::string>();
            if (e.contains("message") && e["message"].is_string()) msg += ": " + e["message"].get<std::string>();
            if (e.contains("detail") && !e["detail"].is_null()) {
                std::string d = e["detail"].is_string() ? e["detail"].get<std::string>() : e["detail"].dump();
                if (d.size() > 300) d.resize(300);
                msg += " (" + d + ")";
            }
            described = true;
        }
    }
    if (!described && !r.body.empty()) {
        std::string b = r.body.substr(0, 200);
        for (char& c : b)
            if (c == '\n' || c == '\r') c = ' ';
        msg += " " + b;
    }
    std::vector<std::string> secrets;
    if (opts_.credentials) {
        secrets = {opts_.credentials->password, opts_.credentials->identity_token};
    }
    msg = redact(msg, secrets);
    return netio::Error{std::make_error_code(std::errc::protocol_error), msg};
}

Task<Result<netio::Response>> RegistryClient::send_once(netio::Request& req, const std::vector<std::string>& scopes,
                                                        netio::BodySink* sink) {
    netio::Request r = req;  // keep the original headers for the next attempt
    if (auth_scheme_ == "basic" && opts_.credentials) {
        r.headers.emplace_back("Authorization", "Basic " + base64_encode(opts_.credentials->username + ":" +
                                                                         opts_.credentials->password));
    } else if (auth_scheme_ == "bearer") {
        auto it = tokens_.find(join(scopes, " "));
        if (it != tokens_.end() && !it->second.empty())
            r.headers.emplace_back("Authorization", "Bearer " + it->second);
    }
    if (r.body_source && !r.body_source->rewind()) co_return error(r.method + " " + r.url + ": body cannot be re-sent");
    co_await acquire_slot();
    auto out = co_await netio::fetch(http_, std::move(r), sink);
    release_slot();
    if (out.ok()) {
        const auto now = planner::Clock::now();
        auto number = [](const std::string& v) -> std::optional<long> {
            if (v.empty() || v.find_first_not_of("0123456789") != std::string::npos || v.size() > 12) return std::nullopt;
            return std::stol(v);
        };
        auto remaining = number(out->header("RateLimit-Remaining"));
        auto reset = number(out->header("RateLimit-Reset"));
        if (remaining || reset) budget_.on_rate_headers(now, remaining, reset);
        if (out->status == 429)
            budget_.on_throttled(now, planner::parse_retry_after(out->header("Retry-After"), std::chrono::system_clock::now()));
        else if (out->status < 500)
            budget_.on_success(now);
    }
    co_return out;
}

Task<Result<netio::Response>> RegistryClient::send(netio::Request req, std::vector<std::string> scopes,
                                                   netio::BodySink* sink, bool retry) {
    bool reauthenticated = false;
    for (int attempt = 0;; ++attempt) {
        auto res = co_await send_once(req, scopes, sink);
        const bool attempts_left = retry && attempt + 1 < opts_.backoff.max_attempts;
        if (!res.ok()) {
            if (!attempts_left || res.error().code == std::errc::operation_canceled) co_return res;
            co_await netio::sleep_for(http_.loop(), backoff_.next_delay(attempt));
            continue;
        }
        auto& resp = res.value();
        if (resp.status == 401 && !reauthenticated) {
            reauthenticated = true;
            std::string challenge = resp.header("WWW-Authenticate");
            auto st = co_await authenticate(challenge, scopes);
            if (!st.ok()) co_return st.error();
            --attempt;  // an auth round trip is not a failed attempt
            continue;
        }
        if (planner::is_retryable_status(resp.status) && attempts_left) {
            std::chrono::milliseconds delay = backoff_.next_delay(attempt);
            if (resp.status == 429) continue;  // the registry's budget now paces every request to it
            if (resp.status == 503) {
                if (auto ra = planner::parse_retry_after(resp.header("Retry-After"), std::chrono::system_clock::now()))
                    delay = std::max(delay, *ra);
            }
            co_await netio::sleep_for(http_.loop(), delay);
            continue;
        }
        co_return res;
    }
}

Task<Status> RegistryClient::authenticate(const std::string& header, const std::vector<std::string>& scopes) {
    auto challenges = parse_www_authenticate(header);
    const Challenge* bearer = nullptr;
    const Challenge* basic = nullptr;
    for (const auto& c : challenges) {
        if (c.scheme == "bearer" && !bearer) bearer = &c;
        if (c.scheme == "basic" && !basic) basic = &c;
    }
    if (bearer) {
        auth_scheme_ = "bearer";
        challenge_ = bearer->params;
        const std::string key = join(scopes, " ");
        // Single flight per scope: concurrent 401s for one scope share one token request.
        if (auto it = token_flights_.find(key); it != token_flights_.end() && !it->second->done) {
            auto flight = it->second;
            auto shared = co_await flight->wait();
            co_return shared;
        }
        auto flight = std::make_shared<netio::Flight>();
        token_flights_[key] = flight;
        auto st = co_await fetch_token(key, scopes);
        flight->finish(http_.loop(), st);
        co_return st;
    }
    if (basic) {
        if (!opts_.credentials || opts_.credentials->username.empty())
            co_return netio::Error{std::make_error_code(std::errc::permission_denied),
                                   opts_.host + ": authentication required, and no credentials were given "
                                                "(--src-creds/--dest-creds, --authfile or a docker config.json)"};
        if (auth_scheme_ == "basic")
            co_return netio::Error{std::make_error_code(std::errc::permission_denied),
                                   opts_.host + ": authentication failed for user '" + opts_.credentials->username + "'"};
        auth_scheme_ = "basic";
        co_return netio::ok_status();
    }
    co_return netio::Error{std::make_error_code(std::errc::permission_denied),
                           opts_.host + ": unauthorized, and the registry offered no usable authentication scheme"};
}

Task<Status> RegistryClient::fetch_token(std::string key, std::vector<std::string> scopes) {
    auto realm = challenge_.find("realm");
    if (realm == challenge_.end() || realm->second.empty())
        co_return error(opts_.host + ": bearer challenge without a realm");
    std::string u = realm->second;
    if (auto s = challenge_.find("service"); s != challenge_.end())
        u = with_query(u, "service=" + url_encode_component(s->second));
    for (const auto& sc : scopes) u = with_query(u, "scope=" + url_encode_component(sc));
    auto req = make_request("GET", u);
    if (opts_.credentials && !opts_.credentials->username.empty())
        req.headers.emplace_back("Authorization", "Basic " + base64_encode(opts_.credentials->username + ":" +
                                                                           opts_.credentials->password));
    auto res = co_await netio::fetch(http_, std::move(req));
    if (!res.ok()) co_return netio::Error{res.error().code, opts_.host + ": token request failed: " + res.error().message};
    if (res->status != 200) co_return describe(opts_.host + ": token request refused", *res);
    auto j = nlohmann::json::parse(res->body, nullptr, false);
    std::string token;
    if (j.is_object()) {
        if (j.contains("token") && j["token"].is_string()) token = j["token"];
        else if (j.contains("access_token") && j["access_token"].is_string()) token = j["access_token"];
    }
    if (token.empty()) co_return error(opts_.host + ": token endpoint answered without a token");
    tokens_[key] = token;
    co_return netio::ok_status();
}

Task<void> RegistryClient::probe(std::string base, bool retry, std::optional<Result<netio::Response>>* out,
                                 netio::WaitGroup* wg) {
    auto req = make_request("GET", base + "/v2/");
    req.timeout_ms = 30000;
    try {
        auto res = co_await send(req, std::vector<std::string>{}, nullptr, retry);
        out->emplace(std::move(res));
    } catch (const std::exception& e) {
        out->emplace(error(opts_.host + ": " + e.what()));
    }
    wg->done();
}

// With `insecure` and no scheme given, https and http are probed at once (one round trip instead
// of two on a plain-http registry); https wins when both answer.
Task<Status> RegistryClient::ping() {
    std::vector<std::string> schemes;
    if (opts_.scheme.empty()) {
        schemes.push_back("https://");
        if (opts_.insecure) schemes.push_back("http://");
    } else {
        schemes.push_back(opts_.scheme + "://");
    }
    std::vector<std::optional<Result<netio::Response>>> results(schemes.size());
    netio::WaitGroup wg(http_.loop());
    for (size_t i = 0; i < schemes.size(); ++i) {
        wg.add();
        netio::spawn(probe(schemes[i] + opts_.host, /*retry=*/i + 1 == schemes.size(), &results[i], &wg));
    }
    co_await wg.wait();
    netio::Error last = error(opts_.host + ": not reachable");
    for (size_t i = 0; i < schemes.size(); ++i) {
        auto& res = *results[i];
        if (!res.ok()) {
            if (res.error().code == std::errc::permission_denied) co_return res.error();
            last = netio::Error{res.error().code, opts_.host + ": " + res.error().message};
            continue;
        }
        base_url_ = schemes[i] + opts_.host;
        if (res->status == 200) co_return netio::ok_status();
        if (res->status == 401) {
            co_return netio::Error{std::make_error_code(std::errc::permission_denied),
                                   describe(opts_.host + ": authentication failed", *res).message};
        }
        if (res->status == 404) co_return error(opts_.host + ": not an OCI registry (GET /v2/ answered 404)");
        co_return describe(opts_.host + ": GET /v2/", *res);
    }
    co_return last;
}

Task<Result<std::vector<std::string>>> RegistryClient::paginate(std::string path, std::string key,
                                                                 std::vector<std::string> scopes) {
    std::vector<std::string> out;
    std::string next = url(path);
    for (int page = 0; page < kMaxPages && !next.empty(); ++page) {
        auto res = co_await send(make_request("GET", next), scopes);
        if (!res.ok()) co_return res.error();
        if (res->status == 404 && key == "tags") co_return out;  // NAME_UNKNOWN: no such repository
        if (res->status != 200) co_return describe("GET " + next, *res);
        auto j = nlohmann::json::parse(res->body, nullptr, false);
        if (!j.is_object()) co_return error("GET " + next + ": response is not a JSON object");
        if (j.contains(key) && !j[key].is_null()) {
            if (!j[key].is_array()) co_return error("GET " + next + ": '" + key + "' is not an array");
            for (const auto& v : j[key]) {
                if (!v.is_string()) co_return error("GET " + next + ": '" + key + "' holds a non-string");
                out.push_back(v.get<std::string>());
            }
        }
        auto link = parse_link_next(res->header("Link"), next);
        next = link ? *link : std::string();
    }
    co_return out;
}

Task<Result<std::vector<std::string>>> RegistryClient::catalog() {
    return paginate("/v2/_catalog?n=1000", "repositories", scopes_of("registry:catalog:*"));
}

Task<Result<std::vector<std::string>>> RegistryClient::tags(std::string repo) {
    return paginate("/v2/" + repo + "/tags/list?n=1000", "tags", scopes_of(pull_scope(repo)));
}

Task<Result<std::optional<ManifestHead>>> RegistryClient::head_manifest(std::string repo, std::string reference) {
    auto req = make_request("HEAD", url("/v2/" + repo + "/manifests/" + reference));
    req.headers.emplace_back("Accept", manifest_accept_header());
    auto res = co_await send(std::move(req), scopes_of(pull_scope(repo)));
    if (!res.ok()) co_return res.error();
    if (res->status == 404) co_return std::optional<ManifestHead>{};
    if (res->status != 200) co_return describe("HEAD " + repo + ":" + reference + " on " + opts_.host, *res);
    ManifestHead h;
    h.digest = res->header("Docker-Content-Digest");
    h.media_type = res->header("Content-Type");
    auto cl = res->header("Content-Length");
    h.size = cl.empty() ? 0 : std::strtoull(cl.c_str(), nullptr, 10);
    co_return std::optional<ManifestHead>(std::move(h));
}

Task<Result<std::optional<ManifestData>>> RegistryClient::get_manifest(std::string repo, std::string reference) {
    auto req = make_request("GET", url("/v2/" + repo + "/manifests/" + reference));
    req.headers.emplace_back("Accept", manifest_accept_header());
    req.max_body_bytes = kMaxManifestBytes;
    const std::string what = "GET manifest " + opts_.host + "/" + repo + (reference.starts_with("sha256:") ? "@" : ":") + reference;
    auto res = co_await send(std::move(req), scopes_of(pull_scope(repo)));
    if (!res.ok()) co_return netio::Error{res.error().code, what + ": " + res.error().message};
    if (res->status == 404) co_return std::optional<ManifestData>{};
    if (res->status != 200) co_return describe(what, *res);
    ManifestData m;
    m.bytes = std::move(res->body);
    m.media_type = res->header("Content-Type");
    if (auto semi = m.media_type.find(';'); semi != std::string::npos) m.media_type.resize(semi);
    m.digest = cas::sha256_digest(m.bytes);
    if (cas::is_sha256_digest(reference) && m.digest != reference)
        co_return error(what + ": the registry sent content with digest " + m.digest + ", not the one asked for");
    std::string claimed = res->header("Docker-Content-Digest");
    if (cas::is_sha256_digest(claimed) && claimed != m.digest)
        co_return error(what + ": Docker-Content-Digest " + claimed + " does not match the content (" + m.digest + ")");
    co_return std::optional<ManifestData>(std::move(m));
}

Task<Status> RegistryClient::put_manifest(std::string repo, std::string reference, std::string bytes,
                                          std::string media_type) {
    const std::string digest = cas::sha256_digest(bytes);
    auto req = make_request("PUT", url("/v2/" + repo + "/manifests/" + reference));
    req.headers.emplace_back("Content-Type", media_type);
    req.body = std::move(bytes);
    const std::string what = "PUT manifest " + opts_.host + "/" + repo + ":" + reference;
    auto res = co_await send(std::move(req), scopes_of(push_scope(repo)));
    if (!res.ok()) co_return netio::Error{res.error().code, what + ": " + res.error().message};
    if (res->status != 201 && res->status != 200) co_return describe(what, *res);
    std::string got = res->header("Docker-Content-Digest");
    if (!got.empty() && got != digest)
        co_return error(what + ": the registry stored digest " + got + " instead of " + digest);
    co_return netio::ok_status();
}

Task<Status> RegistryClient::delete_manifest(std::string repo, std::string digest) {
    auto res = co_await send(make_request("DELETE", url("/v2/" + repo + "/manifests/" + digest)), scopes_of(push_scope(repo)));
    if (!res.ok()) co_return res.error();
    if (res->status != 202 && res->status != 200 && res->status != 404)
        co_return describe("DELETE manifest " + repo + "@" + digest, *res);
    co_return netio::ok_status();
}

Task<Status> RegistryClient::delete_blob(std::string repo, std::string digest) {
    const std::string what = "DELETE blob " + opts_.host + "/" + repo + "@" + digest;
    auto res = co_await send(make_request("DELETE", url("/v2/" + repo + "/blobs/" + digest)),
                             scopes_of("repository:" + repo + ":*"));
    if (!res.ok()) co_return netio::Error{res.error().code, what + ": " + res.error().message};
    if (res->status == 202 || res->status == 200 || res->status == 204 || res->status == 404) co_return netio::ok_status();
    auto e = describe(what, *res);
    if (res->status == 405) e.code = std::make_error_code(std::errc::operation_not_supported);
    co_return e;
}

Task<Result<std::optional<uint64_t>>> RegistryClient::head_blob(std::string repo, std::string digest) {
    auto res = co_await send(make_request("HEAD", url("/v2/" + repo + "/blobs/" + digest)), scopes_of(pull_scope(repo)));
    if (!res.ok()) co_return res.error();
    if (res->status == 404) co_return std::optional<uint64_t>{};
    if (res->status != 200) co_return describe("HEAD blob " + opts_.host + "/" + repo + "@" + digest, *res);
    auto cl = res->header("Content-Length");
    co_return std::optional<uint64_t>(cl.empty() ? 0 : std::strtoull(cl.c_str(), nullptr, 10));
}

Task<Result<netio::Response>> RegistryClient::get_blob(std::string repo, std::string digest, netio::BodySink* sink,
                                                       std::optional<netio::ByteRange> range) {
    auto req = make_request("GET", url("/v2/" + repo + "/blobs/" + digest));
    req.timeout_ms = 0;  // large blobs: the low-speed limit catches a stalled transfer instead
    req.range = range;
    auto out = co_await send(std::move(req), scopes_of(pull_scope(repo)), sink, /*retry=*/false);
    co_return out;
}

Task<Result<bool>> RegistryClient::mount_blob(std::string repo, std::string digest, std::string from_repo) {
    auto req = make_request("POST", url("/v2/" + repo + "/blobs/uploads/?mount=" + url_encode_component(digest) +
                                        "&from=" + url_encode_component(from_repo)));
    auto res = co_await send(req, scopes_of(push_scope(repo), pull_scope(from_repo)));
    if (!res.ok()) co_return res.error();
    if (res->status == 201) co_return true;
    if (res->status == 202) {
        // Mount refused but a session was opened: cancel it rather than leave it on the target.
        std::string loc = resolve_location(*res, req.url);
        if (!loc.empty()) (void)co_await send(make_request("DELETE", loc), scopes_of(push_scope(repo)), nullptr, false);
    }
    co_return false;
}

Task<Status> RegistryClient::await_ready(const Finalizable& ready) {
    if (!ready) co_return netio::ok_status();
    auto st = co_await ready();
    co_return st;
}

Task<void> RegistryClient::cancel_upload(std::string session, std::vector<std::string> scopes) {
    auto req = make_request("DELETE", std::move(session));
    (void)co_await send(std::move(req), std::move(scopes), nullptr, false);
}

Task<Status> RegistryClient::upload_blob(std::string repo, std::string digest, uint64_t size, BlobBodyFactory body,
                                         Finalizable ready, bool still_arriving) {
    bool allow_chunked = true;
    Status last = netio::ok_status();
    for (int attempt = 0; attempt < opts_.backoff.max_attempts; ++attempt) {
        last = co_await upload_once(repo, digest, size, body, ready, allow_chunked, still_arriving);
        if (last.ok()) co_return last;
        if (last.error().code == std::errc::operation_not_supported) {
            allow_chunked = false;  // the registry refused PATCH: monolithic PUT
            --attempt;
            continue;
        }
        if (last.error().code == std::errc::invalid_argument || last.error().code == std::errc::bad_message ||
            last.error().code == std::errc::operation_canceled)
            co_return last;  // digest/size rejected, the content failed verification, or cancelled: no retry
        co_await netio::sleep_for(http_.loop(), backoff_.next_delay(attempt));
    }
    co_return last;
}

Task<Status> RegistryClient::upload_once(const std::string& repo, const std::string& digest, uint64_t size,
                                         const BlobBodyFactory& body, const Finalizable& ready, bool allow_chunked,
                                         bool still_arriving) {
    const std::string what = "upload " + digest + " to " + opts_.host + "/" + repo;
    const std::vector<std::string> scopes = scopes_of(push_scope(repo));
    auto post = make_request("POST", url("/v2/" + repo + "/blobs/uploads/"));
    auto res = co_await send(post, scopes);
    if (!res.ok()) co_return netio::Error{res.error().code, what + ": " + res.error().message};
    if (res->status != 202) co_return describe(what + ": POST", *res);
    std::string loc = resolve_location(*res, post.url);
    if (loc.empty()) co_return error(what + ": the registry gave no upload Location");
    uint64_t chunk = opts_.chunk_size_bytes;
    if (auto m = res->header("OCI-Chunk-Min-Length"); !m.empty()) chunk = std::max<uint64_t>(chunk, std::strtoull(m.c_str(), nullptr, 10));

    // Every way out of the session that leaves it open cancels it (with its newest Location).
    bool closed = false;
    auto st = co_await upload_on_session(loc, closed, what, scopes, digest, size, chunk, body, ready, allow_chunked,
                                         still_arriving);
    if (!st.ok() && !closed) co_await cancel_upload(loc, scopes);
    co_return st;
}

// The PATCHes and the final PUT of upload_once on the session at `loc` (kept up to date with the
// registry's newest Location). `closed` is set once the registry has finalised the session.
Task<Status> RegistryClient::upload_on_session(std::string& loc, bool& closed, const std::string& what,
                                               const std::vector<std::string>& scopes, const std::string& digest,
                                               uint64_t size, uint64_t chunk, const BlobBodyFactory& body,
                                               const Finalizable& ready, bool allow_chunked, bool still_arriving) {
    // Not lambdas, and no `co_return co_await`: gcc 12 double-destroys the result in such
    // expressions (seen: a double free of an Error message under ASan).
    constexpr uint64_t kStreamMinBytes = 8u << 20;
    const bool stream = still_arriving && size > kStreamMinBytes;
    const bool monolithic = !allow_chunked || (size <= chunk && !stream);
    int resumes = 0;
    // Chunked: PATCHes in order, then a PUT with no body. Monolithic: the PUT carries it all.
    for (uint64_t offset = 0; !monolithic && offset < size;) {
        const uint64_t len = std::min(chunk, size - offset);
        auto patch = make_request("PATCH", loc);
        patch.timeout_ms = 0;
        patch.headers.emplace_back("Content-Type", "application/octet-stream");
        patch.headers.emplace_back("Content-Range", std::to_string(offset) + "-" + std::to_string(offset + len - 1));
        patch.body_source = body(offset, len);
        if (!patch.body_source)
            co_return netio::Error{std::make_error_code(std::errc::bad_message), what + ": the content is no longer available"};
        auto r = co_await send(patch, scopes, nullptr, false);
        if (!r.ok()) {
            // Where the registry allows it, resume from the offset it reports (GET on the session
            // answers 204 with Range: 0-N). distribution 2.8 refuses a session after a reset: then
            // the whole upload starts again with a new POST (from the cache, not the source).
            if (r.error().code != std::errc::operation_canceled && resumes < 3) {
                ++resumes;
                auto probe = co_await send(make_request("GET", loc), scopes, nullptr, false);
                if (probe.ok() && probe->status == 204) {
                    std::string range = probe->header("Range");
                    auto dash = range.find('-');
                    if (dash != std::string::npos) {
                        // "0-N": N is the last byte received; "0--1" or "0-0" on an empty session.
                        std::string last = range.substr(dash + 1);
                        uint64_t received = 0;
                        if (!last.empty() && last != "0" && last.find_first_not_of("0123456789") == std::string::npos)
                            received = std::strtoull(last.c_str(), nullptr, 10) + 1;
                        if (received <= size) {
                            offset = received;
                            if (auto next = resolve_location(*probe, loc); !next.empty()) loc = next;
                            continue;
                        }
                    }
                }
            }
            co_return netio::Error{r.error().code, what + ": " + r.error().message};
        }
        if (r->status != 202) {
            auto e = describe(what + ": PATCH", *r);
            if (offset == 0 && (r->status == 405 || r->status == 501 || r->status == 400 || r->status == 416))
                e.code = std::make_error_code(std::errc::operation_not_supported);
            co_return e;
        }
        std::string next = resolve_location(*r, loc);
        if (!next.empty()) loc = next;  // always follow the newest Location
        offset += len;
    }
    // The PUT finalises the blob: its content (already on the session, or in the PUT's body) must
    // be verified first.
    if (auto st = co_await await_ready(ready); !st.ok()) co_return st;
    auto put = make_request("PUT", with_query(loc, "digest=" + url_encode_component(digest)));
    if (monolithic) {
        put.timeout_ms = 0;
        put.headers.emplace_back("Content-Type", "application/octet-stream");
        put.body_source = body(0, size);
        if (!put.body_source)
            co_return netio::Error{std::make_error_code(std::errc::bad_message), what + ": the content is no longer available"};
    }
    auto r = co_await send(put, scopes, nullptr, false);
    if (!r.ok()) co_return netio::Error{r.error().code, what + ": " + r.error().message};
    if (r->status != 201) {
        auto e = describe(what + ": PUT", *r);
        if (r->status == 400) e.code = std::make_error_code(std::errc::invalid_argument);
        co_return e;
    }
    closed = true;
    std::string got = r->header("Docker-Content-Digest");
    if (!got.empty() && got != digest) co_return error(what + ": the registry stored " + got);
    co_return netio::ok_status();
}

}  // namespace engine
