#include "engine/api.h"

#include <algorithm>
#include <charconv>
#include <exception>
#include <initializer_list>
#include <optional>
#include <string_view>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

namespace engine {

using json = nlohmann::json;
using netio::HttpRequest;
using netio::HttpResponse;

namespace {

std::string dump(const json& j) {
    std::string s = j.dump(-1, ' ', false, json::error_handler_t::replace);
    s += '\n';
    return s;
}

HttpResponse json_response(int status, const json& body) {
    HttpResponse r;
    r.status = status;
    r.headers.emplace_back("Content-Type", "application/json");
    r.body = dump(body);
    return r;
}

HttpResponse error_response(int status, const std::string& message) {
    return json_response(status, json{{"message", message}});
}

HttpResponse no_content() {
    HttpResponse r;
    r.status = 204;
    return r;
}

HttpResponse field_errors_response(const FieldErrors& errors, const std::string& message = {}) {
    json body = to_json(errors);
    body["message"] = message.empty() ? (errors.empty() ? std::string("invalid request") : describe(errors)) : message;
    return json_response(400, body);
}

bool is_field_name(std::string_view s) {
    return !s.empty() && std::all_of(s.begin(), s.end(), [](char ch) { return (ch >= 'a' && ch <= 'z') || ch == '_'; });
}

// The store's `invalid` messages are FieldErrors joined by describe(): "field: message; ...".
FieldErrors parse_described(std::string_view msg) {
    FieldErrors out;
    while (!msg.empty()) {
        size_t end = msg.find("; ");
        std::string_view part = msg.substr(0, end);
        const size_t colon = part.find(": ");
        if (colon != std::string_view::npos && is_field_name(part.substr(0, colon)))
            out.push_back({std::string(part.substr(0, colon)), std::string(part.substr(colon + 2))});
        else if (!out.empty() && !out.back().field.empty() && colon == std::string_view::npos)
            out.back().message.append("; ").append(part);  // a message that itself contained "; "
        else
            out.push_back({"", std::string(part)});
        if (end == std::string_view::npos) break;
        msg.remove_prefix(end + 2);
    }
    return out;
}

netio::Error not_found(std::string message) { return netio::Error{make_error_code(ErrorKind::not_found), std::move(message)}; }

bool all_digits(std::string_view s) {
    return !s.empty() && std::all_of(s.begin(), s.end(), [](char ch) { return ch >= '0' && ch <= '9'; });
}

// A positive int64 written in decimal, or nullopt.
std::optional<int64_t> parse_id(std::string_view s) {
    if (!all_digits(s)) return std::nullopt;
    int64_t v = 0;
    auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
    if (ec != std::errc() || p != s.data() + s.size() || v <= 0) return std::nullopt;
    return v;
}

int hex_value(char ch) {
    if (ch >= '0' && ch <= '9') return ch - '0';
    if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
    if (ch >= 'A' && ch <= 'F') return ch - 'A' + 10;
    return -1;
}

// Percent-decoding; invalid escapes are kept as they are. `plus_is_space` for query strings.
std::string percent_decode(std::string_view s, bool plus_is_space) {
    std::string out;
    out.reserve(s.size());
    for (size_t i = 0; i < s.size(); ++i) {
        if (s[i] == '%' && i + 2 < s.size()) {
            const int hi = hex_value(s[i + 1]);
            const int lo = hex_value(s[i + 2]);
            if (hi >= 0 && lo >= 0) {
                out += static_cast<char>(hi * 16 + lo);
                i += 2;
                continue;
            }
        }
        out += (plus_is_space && s[i] == '+') ? ' ' : s[i];
    }
    return out;
}

char lower(char ch) { return ch >= 'A' && ch <= 'Z' ? static_cast<char>(ch - 'A' + 'a') : ch; }

std::string trim(std::string_view s) {
    while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
    while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
    return std::string(s);
}

bool is_json_media_type(std::string_view content_type) {
    std::string media = trim(content_type.substr(0, content_type.find(';')));
    std::transform(media.begin(), media.end(), media.begin(), lower);
    if (media == "application/json") return true;
    const std::string_view m = media;
    return m.starts_with("application/") && m.ends_with("+json");
}

// Nesting depth of a JSON text (brackets outside strings); stops counting past `limit`.
int json_depth(std::string_view s, int limit) {
    int depth = 0, max_depth = 0;
    bool in_string = false, escaped = false;
    for (char ch : s) {
        if (in_string) {
            if (escaped) escaped = false;
            else if (ch == '\\') escaped = true;
            else if (ch == '"') in_string = false;
            continue;
        }
        if (ch == '"') in_string = true;
        else if (ch == '[' || ch == '{') {
            max_depth = std::max(max_depth, ++depth);
            if (max_depth > limit) return max_depth;
        } else if (ch == ']' || ch == '}') --depth;
    }
    return max_depth;
}

}  // namespace

namespace {

// By id (an all-digit ref, tried first) or by name; a miss is not_found naming the ref.
template <class Get, class GetByName>
auto find_by_ref(const std::string& ref, const char* what, Get get, GetByName get_by_name)
    -> decltype(get(int64_t{})) {
    if (auto id = parse_id(ref)) {
        auto r = get(*id);
        if (r.ok() || kind_of(r.error()) != ErrorKind::not_found) return r;
    }
    if (check_name(ref).empty()) {
        auto r = get_by_name(ref);
        if (r.ok() || kind_of(r.error()) != ErrorKind::not_found) return r;
    }
    return not_found(std::string("no ") + what + " " + quote_input(ref));
}

}  // namespace

netio::Result<Registry> find_registry(Store& store, const std::string& ref) {
    return find_by_ref(
        ref, "registry", [&](int64_t id) { return store.get_registry(id); },
        [&](const std::string& name) { return store.get_registry_by_name(name); });
}

netio::Result<Rule> find_rule(Store& store, const std::string& ref) {
    return find_by_ref(
        ref, "rule", [&](int64_t id) { return store.get_rule(id); },
        [&](const std::string& name) { return store.get_rule_by_name(name); });
}

netio::Result<ReplicationGroup> find_group(Store& store, const std::string& ref) {
    return find_by_ref(
        ref, "replication group", [&](int64_t id) { return store.get_group(id); },
        [&](const std::string& name) { return store.get_group_by_name(name); });
}

Query parse_query(std::string_view q) {
    Query out;
    while (!q.empty()) {
        const size_t amp = q.find('&');
        std::string_view part = q.substr(0, amp);
        if (!part.empty()) {
            const size_t eq = part.find('=');
            out.emplace_back(percent_decode(part.substr(0, eq), true),
                             eq == std::string_view::npos ? std::string() : percent_decode(part.substr(eq + 1), true));
        }
        if (amp == std::string_view::npos) break;
        q.remove_prefix(amp + 1);
    }
    return out;
}

namespace {

std::string join_methods(std::initializer_list<std::string_view> methods) {
    std::string out;
    bool get = false;
    for (auto m : methods) {
        if (!out.empty()) out += ", ";
        out += m;
        get = get || m == "GET";
    }
    if (get) out += ", HEAD";
    out += ", OPTIONS";
    return out;
}

std::optional<uint32_t> parse_limit(std::string_view s) {
    if (!all_digits(s) || s.size() > 6) return std::nullopt;
    uint32_t v = 0;
    auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
    if (ec != std::errc() || p != s.data() + s.size() || v == 0 || v > Store::kMaxPageSize) return std::nullopt;
    return v;
}

// Marks "no such route" for handle() (every other 404 has a body).
HttpResponse unknown_route() {
    HttpResponse r;
    r.status = 404;
    return r;
}

json cursor_json(const std::optional<int64_t>& c) { return c ? json(std::to_string(*c)) : json(nullptr); }

}  // namespace

struct ControlApi::Context {
    const HttpRequest& req;
    std::string method;                 // HEAD is answered as GET
    std::vector<std::string> segments;  // percent-decoded path segments
    Query query;
};

ControlApi::ControlApi(Store& store, Options options) : store_(store), options_(std::move(options)) {}

HttpResponse ControlApi::handle(const HttpRequest& req) noexcept {
    try {
        Context c{req, req.method == "HEAD" ? std::string("GET") : req.method, {}, parse_query(req.query)};
        std::string_view path = req.path;
        if (path.size() > 1 && path.back() == '/') path.remove_suffix(1);  // "/v1/rules/" = "/v1/rules"
        bool bad_path = path.empty() || path.front() != '/';
        if (!bad_path) {
            path.remove_prefix(1);
            while (true) {
                const size_t slash = path.find('/');
                std::string_view seg = path.substr(0, slash);
                if (seg.empty()) {
                    bad_path = true;
                    break;
                }
                c.segments.push_back(percent_decode(seg, false));
                if (slash == std::string_view::npos) break;
                path.remove_prefix(slash + 1);
            }
        }
        if (!bad_path) {
            HttpResponse r = route(c);
            if (r.status != 404 || !r.body.empty()) return r;  // else unknown_route()
        }
        return error_response(404, "no such route: " + quote_input(req.method) + " " + quote_input(req.path));
    } catch (const std::exception& e) {
        try {
            if (options_.log) options_.log(std::string("control API: unexpected error: ") + e.what());
        } catch (...) {
        }
    } catch (...) {
        try {
            if (options_.log) options_.log("control API: unexpected non-standard exception");
        } catch (...) {
        }
    }
    try {
        return error_response(500, "internal error");
    } catch (...) {
        HttpResponse r;
        r.status = 500;
        return r;
    }
}

namespace {

// Everything a route handler needs; kept out of the class so the header stays small.
class Router {
public:
    Router(Store& store, const ControlApiOptions& options, const HttpRequest& req, std::string method,
           const std::vector<std::string>& seg, const Query& query)
        : store_(store), o_(options), req_(req), method_(std::move(method)), seg_(seg), query_(query) {}

    HttpResponse route();

private:
    // ---- helpers ----
    Time now() const { return o_.clock ? o_.clock() : now_ms(); }

    // A task as the API shows it: the record, and the engine's live figures while it runs.
    json task_json(const TaskRecord& t, Time at) const {
        json j = to_json(t, at);
        if (t.status == TaskStatus::in_progress && o_.live_progress) {
            try {
                json p = o_.live_progress(t.id);
                if (p.is_object()) j["progress"] = std::move(p);
            } catch (...) {
                log("control API: live_progress threw");
            }
        }
        return j;
    }

    void log(const std::string& msg) const {
        try {
            if (o_.log) o_.log(msg);
        } catch (...) {
        }
    }

    HttpResponse from_error(const netio::Error& e) const {
        switch (kind_of(e)) {
        case ErrorKind::invalid: return field_errors_response(parse_described(e.message), e.message);
        case ErrorKind::not_found: return error_response(404, e.message);
        case ErrorKind::conflict: return error_response(409, e.message);
        default: break;
        }
        log("control API: " + method_ + " " + req_.path + ": " + e.message);
        return error_response(500, "internal error: " + e.message);
    }

    // Method dispatch: true if this route takes the method; else `out` is the 405 (or OPTIONS 204).
    bool allowed(std::initializer_list<std::string_view> methods, HttpResponse& out) const {
        for (auto m : methods)
            if (method_ == m) return true;
        if (method_ == "OPTIONS") {
            out = no_content();
        } else {
            out = error_response(405, "method " + quote_input(req_.method) + " is not allowed here; allowed: " +
                                          join_methods(methods));
        }
        out.headers.emplace_back("Allow", join_methods(methods));
        return false;
    }

    // The JSON body, or the error response in `out`.
    std::optional<json> body(HttpResponse& out) const {
        const std::string ct = req_.header("Content-Type");
        if (!ct.empty() && !is_json_media_type(ct)) {
            out = error_response(415, "Content-Type must be application/json, not " + quote_input(ct));
            return std::nullopt;
        }
        if (req_.body.size() > ControlApi::kMaxBodyBytes) {
            out = error_response(413, "body is over " + std::to_string(ControlApi::kMaxBodyBytes) + " bytes");
            return std::nullopt;
        }
        if (json_depth(req_.body, ControlApi::kMaxJsonDepth) > ControlApi::kMaxJsonDepth) {
            out = field_errors_response({{"", "nested deeper than " + std::to_string(ControlApi::kMaxJsonDepth) + " levels"}},
                                        "body is nested too deeply");
            return std::nullopt;
        }
        try {
            return json::parse(req_.body);
        } catch (const json::parse_error& e) {
            // Never e.what(): it quotes the body, which may hold a credential.
            out = field_errors_response({{"", req_.body.empty() ? std::string("the body is empty")
                                                                : "syntax error at byte " + std::to_string(e.byte)}},
                                        "body is not valid JSON");
            return std::nullopt;
        }
    }

    // Query parameters: only `known` are accepted, each at most once.
    bool read_query(std::initializer_list<std::string_view> known, FieldErrors& errs) const {
        for (size_t i = 0; i < query_.size(); ++i) {
            const auto& key = query_[i].first;
            if (std::find(known.begin(), known.end(), key) == known.end()) {
                errs.push_back({key, "unknown query parameter"});
                continue;
            }
            for (size_t j = 0; j < i; ++j)
                if (query_[j].first == key) {
                    errs.push_back({key, "given more than once"});
                    break;
                }
        }
        return errs.empty();
    }
    const std::string* param(std::string_view key) const {
        for (const auto& [k, v] : query_)
            if (k == key) return &v;
        return nullptr;
    }

    netio::Result<Registry> find_registry(const std::string& ref) { return engine::find_registry(store_, ref); }
    netio::Result<Rule> find_rule(const std::string& ref) { return engine::find_rule(store_, ref); }
    netio::Result<ReplicationGroup> find_group(const std::string& ref) { return engine::find_group(store_, ref); }

    // Tells the daemon about tasks that must stop now (a deleted rule's or group's).
    void cancel_requested(const std::vector<int64_t>& ids) const {
        for (int64_t id : ids) {
            try {
                if (o_.on_cancel_requested) o_.on_cancel_requested(id);
            } catch (...) {
                log("control API: on_cancel_requested threw");
            }
        }
    }

    // 202 with the Queued task of a manual trigger, after telling the daemon.
    HttpResponse queued(const TaskRecord& task) const {
        try {
            if (o_.on_task_queued) o_.on_task_queued(task);
        } catch (...) {
            log("control API: on_task_queued threw");
        }
        HttpResponse r = json_response(202, to_json(task, now()));
        r.headers.emplace_back("Location", "/v1/tasks/" + std::to_string(task.id));
        return r;
    }

    netio::Result<TaskRecord> find_task(const std::string& ref) {
        if (auto id = parse_id(ref)) {
            auto t = store_.get_task(*id);
            if (t.ok() || kind_of(t.error()) != ErrorKind::not_found) return t;
        }
        return not_found("no task " + quote_input(ref));
    }

    // ---- routes ----
    HttpResponse version();
    // A collection: GET lists it under `key`; POST checks the body with `parse`, creates with
    // `create` and answers 201 with a Location under `path`.
    template <class List, class Parse, class Create>
    HttpResponse collection(const char* key, const std::string& path, List list, Parse parse, Create create);
    // A member of a collection whose deletion stops its tasks (rules, replication groups): GET,
    // PATCH (checked by `patch`, stored by `update`) and DELETE (`remove` returns the tasks whose
    // cancel was requested).
    template <class Found, class Patch, class Update, class Remove>
    HttpResponse member(Found found, Patch patch, Update update, Remove remove);
    HttpResponse registries();
    HttpResponse registry(const std::string& ref);
    HttpResponse links();
    HttpResponse link(const std::string& src, const std::string& dst);
    HttpResponse rules();
    HttpResponse rule(const std::string& ref);
    HttpResponse rule_action(const std::string& ref, const std::string& action);
    HttpResponse replications();
    HttpResponse replication(const std::string& ref);
    HttpResponse replication_action(const std::string& ref, const std::string& action);
    HttpResponse replication_status(const std::string& ref);
    HttpResponse tasks();
    HttpResponse task(const std::string& ref);
    HttpResponse task_items(const std::string& ref);
    HttpResponse task_deliveries(const std::string& ref);
    HttpResponse task_cancel(const std::string& ref);
    HttpResponse events();

    Store& store_;
    const ControlApiOptions& o_;
    const HttpRequest& req_;
    std::string method_;
    const std::vector<std::string>& seg_;
    const Query& query_;
};

HttpResponse Router::route() {
    const size_t n = seg_.size();
    if (n < 2 || seg_[0] != "v1") return unknown_route();
    const std::string& coll = seg_[1];
    if (coll == "version" && n == 2) return version();
    if (coll == "registries") {
        if (n == 2) return registries();
        if (n == 3) return registry(seg_[2]);
    } else if (coll == "links") {
        if (n == 2) return links();
        if (n == 4) return link(seg_[2], seg_[3]);
    } else if (coll == "rules") {
        if (n == 2) return rules();
        if (n == 3) return rule(seg_[2]);
        if (n == 4 && (seg_[3] == "enable" || seg_[3] == "disable" || seg_[3] == "trigger"))
            return rule_action(seg_[2], seg_[3]);
    } else if (coll == "replications") {
        // /where and /v1/webhooks are the daemon's own routes, answered before this router.
        if (n == 2) return replications();
        if (n == 3) return replication(seg_[2]);
        if (n == 4 && (seg_[3] == "enable" || seg_[3] == "disable" || seg_[3] == "trigger"))
            return replication_action(seg_[2], seg_[3]);
        if (n == 4 && seg_[3] == "status") return replication_status(seg_[2]);
    } else if (coll == "tasks") {
        if (n == 2) return tasks();
        if (n == 3) return task(seg_[2]);
        if (n == 4 && seg_[3] == "items") return task_items(seg_[2]);
        if (n == 4 && seg_[3] == "deliveries") return task_deliveries(seg_[2]);
        if (n == 4 && seg_[3] == "cancel") return task_cancel(seg_[2]);
    } else if (coll == "events") {
        if (n == 2) return events();
    }
    return unknown_route();
}

HttpResponse Router::version() {
    HttpResponse out;
    if (!allowed({"GET"}, out)) return out;
    return json_response(200, json{{"version", o_.version}, {"api_version", "v1"}});
}

// ---- registries ----

template <class List, class Parse, class Create>
HttpResponse Router::collection(const char* key, const std::string& path, List list, Parse parse, Create create) {
    HttpResponse out;
    if (!allowed({"GET", "POST"}, out)) return out;
    if (method_ == "GET") {
        auto items = list();
        if (!items.ok()) return from_error(items.error());
        json arr = json::array();
        for (const auto& r : *items) arr.push_back(to_json(r));
        return json_response(200, json{{key, std::move(arr)}});
    }
    auto b = body(out);
    if (!b) return out;
    auto checked = parse(*b);
    if (!checked.ok()) return field_errors_response(checked.errors);
    auto created = create(checked.value);
    if (!created.ok()) return from_error(created.error());
    HttpResponse r = json_response(201, to_json(*created));
    r.headers.emplace_back("Location", path + std::to_string(created->id));
    return r;
}

template <class Found, class Patch, class Update, class Remove>
HttpResponse Router::member(Found found, Patch patch, Update update, Remove remove) {
    HttpResponse out;
    if (!allowed({"GET", "PATCH", "DELETE"}, out)) return out;
    std::optional<json> changes;
    if (method_ == "PATCH") {
        changes = body(out);
        if (!changes) return out;
    }
    if (!found.ok()) return from_error(found.error());
    if (method_ == "GET") return json_response(200, to_json(*found));
    if (method_ == "DELETE") {
        auto stopped = remove(found->id);
        if (!stopped.ok()) return from_error(stopped.error());
        cancel_requested(*stopped);
        return no_content();
    }
    auto checked = patch(*found, *changes);
    if (!checked.ok()) return field_errors_response(checked.errors);
    checked.value.id = found->id;
    auto updated = update(checked.value);
    if (!updated.ok()) return from_error(updated.error());
    return json_response(200, to_json(*updated));
}

HttpResponse Router::registries() {
    return collection(
        "registries", "/v1/registries/", [&] { return store_.list_registries(); },
        [](const json& b) { return registry_from_json(b); },
        [&](const auto& value) { return store_.add_registry(value); });
}

HttpResponse Router::registry(const std::string& ref) {
    HttpResponse out;
    if (!allowed({"GET", "PATCH", "DELETE"}, out)) return out;
    std::optional<json> patch;
    if (method_ == "PATCH") {  // the body is checked first: a bad body is 4xx whatever the ref
        patch = body(out);
        if (!patch) return out;
    }
    auto reg = find_registry(ref);
    if (!reg.ok()) return from_error(reg.error());
    if (method_ == "GET") return json_response(200, to_json(*reg));
    if (method_ == "DELETE") {
        auto st = store_.remove_registry(reg->id);
        if (!st.ok()) return from_error(st.error());
        return no_content();
    }
    auto checked = patch_registry(*reg, *patch);
    if (!checked.ok()) return field_errors_response(checked.errors);
    checked.value.id = reg->id;
    auto updated = store_.update_registry(checked.value);
    if (!updated.ok()) return from_error(updated.error());
    return json_response(200, to_json(*updated));
}

// ---- links ----

HttpResponse Router::links() {
    HttpResponse out;
    if (!allowed({"GET"}, out)) return out;
    auto list = store_.list_links();
    if (!list.ok()) return from_error(list.error());
    json arr = json::array();
    for (const auto& l : *list) arr.push_back(to_json(l));
    return json_response(200, json{{"links", std::move(arr)}});
}

HttpResponse Router::link(const std::string& src, const std::string& dst) {
    HttpResponse out;
    if (!allowed({"GET", "PUT", "DELETE"}, out)) return out;
    const std::string missing = "no link from region " + quote_input(src) + " to region " + quote_input(dst);
    if (method_ == "DELETE") {
        auto st = store_.remove_link(src, dst);
        if (!st.ok()) return from_error(st.error());
        return no_content();
    }
    auto list = store_.list_links();
    if (!list.ok()) return from_error(list.error());
    auto it = std::find_if(list->begin(), list->end(),
                           [&](const Link& l) { return l.source_region == src && l.target_region == dst; });
    if (method_ == "GET") {
        if (it == list->end()) return error_response(404, missing);
        return json_response(200, to_json(*it));
    }
    auto b = body(out);
    if (!b) return out;
    FieldErrors errs;
    if (b->is_object()) {
        for (const auto& [field, value] : {std::pair<const char*, const std::string*>{"source_region", &src},
                                           std::pair<const char*, const std::string*>{"target_region", &dst}}) {
            auto f = b->find(field);
            if (f != b->end() && !(f->is_string() && f->get_ref<const std::string&>() == *value))
                errs.push_back({field, "must be the region named in the path (" + quote_input(*value) + ") or left out"});
            (*b)[field] = *value;
        }
    }
    auto checked = link_from_json(*b);
    for (auto& e : checked.errors) errs.push_back(std::move(e));
    if (!errs.empty()) return field_errors_response(errs);
    const bool existed = it != list->end();
    auto set = store_.set_link(checked.value);
    if (!set.ok()) return from_error(set.error());
    HttpResponse r = json_response(existed ? 200 : 201, to_json(*set));
    if (!existed)
        r.headers.emplace_back("Location", "/v1/links/" + set->source_region + "/" + set->target_region);
    return r;
}

// ---- rules ----

HttpResponse Router::rules() {
    return collection(
        "rules", "/v1/rules/", [&] { return store_.list_rules(); }, [](const json& b) { return rule_from_json(b); },
        [&](const auto& value) { return store_.create_rule(value); });
}

HttpResponse Router::rule(const std::string& ref) {
    return member(
        find_rule(ref), [](const Rule& cur, const json& p) { return patch_rule(cur, p); },
        [&](const Rule& r) { return store_.update_rule(r); }, [&](int64_t id) { return store_.delete_rule(id); });
}

HttpResponse Router::rule_action(const std::string& ref, const std::string& action) {
    HttpResponse out;
    if (!allowed({"POST"}, out)) return out;
    auto rule = find_rule(ref);
    if (!rule.ok()) return from_error(rule.error());
    if (action == "trigger") {
        if (!rule->enabled)
            return error_response(409, "rule " + quote_input(rule->name) + " is disabled; enable it to trigger it");
        auto task = store_.create_task(rule->id, Trigger::manual);
        if (!task.ok()) return from_error(task.error());
        return queued(*task);
    }
    const bool enable = action == "enable";
    if (rule->enabled == enable) return json_response(200, to_json(*rule));
    Rule r = *rule;
    r.enabled = enable;
    r.target_credentials.reset();  // keep the stored ones
    auto updated = store_.update_rule(r);
    if (!updated.ok()) return from_error(updated.error());
    return json_response(200, to_json(*updated));
}

// ---- replication groups ----

HttpResponse Router::replications() {
    return collection(
        "replications", "/v1/replications/", [&] { return store_.list_groups(); },
        [](const json& b) { return group_from_json(b); }, [&](const auto& value) { return store_.create_group(value); });
}

HttpResponse Router::replication(const std::string& ref) {
    return member(
        find_group(ref), [](const ReplicationGroup& cur, const json& p) { return patch_group(cur, p); },
        [&](const ReplicationGroup& g) { return store_.update_group(g); },
        [&](int64_t id) { return store_.delete_group(id); });
}

HttpResponse Router::replication_action(const std::string& ref, const std::string& action) {
    HttpResponse out;
    if (!allowed({"POST"}, out)) return out;
    auto group = find_group(ref);
    if (!group.ok()) return from_error(group.error());
    if (action == "trigger") {
        if (!group->enabled)
            return error_response(409, "replication group " + quote_input(group->name) +
                                           " is disabled; enable it to trigger it");
        auto task = store_.create_group_task(group->id, Trigger::manual, {});
        if (!task.ok()) return from_error(task.error());
        return queued(*task);
    }
    const bool enable = action == "enable";
    if (group->enabled == enable) return json_response(200, to_json(*group));
    ReplicationGroup g = *group;
    g.enabled = enable;
    auto updated = store_.update_group(g);
    if (!updated.ok()) return from_error(updated.error());
    return json_response(200, to_json(*updated));
}

HttpResponse Router::replication_status(const std::string& ref) {
    HttpResponse out;
    if (!allowed({"GET"}, out)) return out;
    auto group = find_group(ref);
    if (!group.ok()) return from_error(group.error());
    if (!o_.group_status) return error_response(501, "replication status is not available here (no daemon attached)");
    json status;
    try {
        status = o_.group_status(*group);
    } catch (const std::exception& e) {
        log(std::string("control API: group_status threw: ") + e.what());
        return error_response(500, "internal error");
    } catch (...) {
        log("control API: group_status threw");
        return error_response(500, "internal error");
    }
    return json_response(200, status);
}

// ---- events ----

HttpResponse Router::events() {
    HttpResponse out;
    if (!allowed({"GET"}, out)) return out;
    FieldErrors errs;
    read_query({"limit"}, errs);
    uint32_t limit = 100;
    if (auto s = param("limit")) {
        if (auto l = parse_limit(*s)) limit = *l;
        else errs.push_back({"limit", "must be an integer from 1 to " + std::to_string(Store::kMaxPageSize)});
    }
    if (!errs.empty()) return field_errors_response(errs);
    auto list = store_.list_events(limit);
    if (!list.ok()) return from_error(list.error());
    json arr = json::array();
    for (const auto& e : *list) arr.push_back(to_json(e));
    return json_response(200, json{{"events", std::move(arr)}});
}

// ---- tasks ----

HttpResponse Router::tasks() {
    HttpResponse out;
    if (!allowed({"GET"}, out)) return out;
    FieldErrors errs;
    read_query({"rule", "group", "status", "since", "until", "limit", "cursor"}, errs);
    TaskQuery q;
    if (auto s = param("status")) {
        if (auto st = parse_task_status(*s)) q.status = *st;
        else
            errs.push_back({"status", quote_input(*s) +
                                          " is not one of Queued, InProgress, Succeeded, PartiallyFailed, Failed, Stopped"});
    }
    if (auto s = param("since")) {
        if (auto t = parse_time(*s)) q.created_from = *t;
        else errs.push_back({"since", quote_input(*s) + " is not an RFC 3339 time such as 2024-05-01T12:00:00Z"});
    }
    if (auto s = param("until")) {
        if (auto t = parse_time(*s)) q.created_to = *t;
        else errs.push_back({"until", quote_input(*s) + " is not an RFC 3339 time such as 2024-05-01T12:00:00Z"});
    }
    if (auto s = param("limit")) {
        if (auto l = parse_limit(*s)) q.limit = *l;
        else errs.push_back({"limit", "must be an integer from 1 to " + std::to_string(Store::kMaxPageSize)});
    }
    if (auto s = param("cursor")) {
        if (auto c = parse_id(*s)) q.cursor = *c;
        else errs.push_back({"cursor", quote_input(*s) + " is not a next_cursor from a previous page"});
    }
    if (!errs.empty()) return field_errors_response(errs);
    if (auto s = param("rule")) {
        auto rule = find_rule(*s);
        if (!rule.ok()) return from_error(rule.error());
        q.rule_id = rule->id;
    }
    if (auto s = param("group")) {
        auto group = find_group(*s);
        if (!group.ok()) return from_error(group.error());
        q.group_id = group->id;
    }
    auto page = store_.list_tasks(q);
    if (!page.ok()) return from_error(page.error());
    const Time t = now();
    json arr = json::array();
    for (const auto& task : page->tasks) arr.push_back(task_json(task, t));
    return json_response(200, json{{"tasks", std::move(arr)}, {"next_cursor", cursor_json(page->next_cursor)}});
}

HttpResponse Router::task(const std::string& ref) {
    HttpResponse out;
    if (!allowed({"GET"}, out)) return out;
    auto t = find_task(ref);
    if (!t.ok()) return from_error(t.error());
    return json_response(200, task_json(*t, now()));
}

HttpResponse Router::task_items(const std::string& ref) {
    HttpResponse out;
    if (!allowed({"GET"}, out)) return out;
    FieldErrors errs;
    read_query({"limit", "cursor", "action"}, errs);
    ItemQuery q;
    if (auto s = param("action")) {
        if (auto a = parse_item_action(*s)) q.action = *a;
        else
            errs.push_back({"action", quote_input(*s) +
                                          " is not one of \"copied\", \"skipped: exists\", \"skipped: same digest\", \"failed\", \"deleted\""});
    }
    if (auto s = param("limit")) {
        if (auto l = parse_limit(*s)) q.limit = *l;
        else errs.push_back({"limit", "must be an integer from 1 to " + std::to_string(Store::kMaxPageSize)});
    }
    if (auto s = param("cursor")) {
        if (auto c = parse_id(*s)) q.cursor = *c;
        else errs.push_back({"cursor", quote_input(*s) + " is not a next_cursor from a previous page"});
    }
    if (!errs.empty()) return field_errors_response(errs);
    auto t = find_task(ref);
    if (!t.ok()) return from_error(t.error());
    auto page = store_.list_items(t->id, q);
    if (!page.ok()) return from_error(page.error());
    json arr = json::array();
    for (const auto& item : page->items) arr.push_back(to_json(item));
    return json_response(200, json{{"items", std::move(arr)}, {"next_cursor", cursor_json(page->next_cursor)}});
}

HttpResponse Router::task_deliveries(const std::string& ref) {
    HttpResponse out;
    if (!allowed({"GET"}, out)) return out;
    auto t = find_task(ref);
    if (!t.ok()) return from_error(t.error());
    auto list = store_.list_deliveries(t->id);
    if (!list.ok()) return from_error(list.error());
    json arr = json::array();
    for (const auto& d : *list) arr.push_back(to_json(d));
    return json_response(200, json{{"deliveries", std::move(arr)}});
}

HttpResponse Router::task_cancel(const std::string& ref) {
    HttpResponse out;
    if (!allowed({"POST"}, out)) return out;
    auto t = find_task(ref);
    if (!t.ok()) return from_error(t.error());
    auto c = store_.request_cancel(t->id);
    if (!c.ok()) return from_error(c.error());
    const bool running = c->status == TaskStatus::in_progress;
    if (running) {
        try {
            if (o_.on_cancel_requested) o_.on_cancel_requested(c->id);
        } catch (...) {
            log("control API: on_cancel_requested threw");
        }
    }
    return json_response(running ? 202 : 200, to_json(*c, now()));
}

}  // namespace

HttpResponse ControlApi::route(Context& c) {
    Router r(store_, options_, c.req, c.method, c.segments, c.query);
    return r.route();
}

}  // namespace engine
