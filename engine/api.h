// ControlApi: the sidecar's control API (issue 5, items 3, 4, 5 and 8), HTTP/1.1 + JSON under /v1 in
// the style of the Docker Engine API. A synchronous router: handle() is a plain function of the
// request, mounted on the HttpServer as its SyncHandler and tested by calling it directly.
//
// Endpoints ({ref} of a registry, rule or replication group is its id or its name; an all-digit ref
// is tried as an id first, then as a name):
//   GET    /v1/version
//   POST   /v1/registries                 201 + Location      GET /v1/registries         200
//   GET    /v1/registries/{ref}           200                 PATCH (any field)          200
//   DELETE /v1/registries/{ref}           204 (409 while a rule or a replication group uses it)
//   PUT    /v1/links/{src}/{dst}          201 (new) / 200 (replaced); body {rate_bytes_per_s, burst_bytes}
//   GET    /v1/links                      200                 GET/DELETE /v1/links/{src}/{dst}  200/204
//   POST   /v1/rules                      201 + Location      GET /v1/rules              200
//   GET    /v1/rules/{ref}                200                 PATCH (any field)          200
//   DELETE /v1/rules/{ref}                204 (its Queued tasks stop, InProgress ones get a cancel request)
//   POST   /v1/rules/{ref}/enable|disable 200 with the rule
//   POST   /v1/rules/{ref}/trigger        202 + Location, the Queued task (trigger "manual"); 409 if the
//                                         rule is disabled. Running it is the daemon's job (hooks below).
//   POST   /v1/replications               201 + Location      GET /v1/replications       200
//   GET    /v1/replications/{ref}         200                 PATCH (any field)          200
//   DELETE /v1/replications/{ref}         204 (as a rule's: Queued tasks stop, InProgress ones get a cancel request)
//   POST   /v1/replications/{ref}/enable|disable  200 with the group
//   POST   /v1/replications/{ref}/trigger 202 + Location, the Queued group task (trigger "manual", empty
//                                         scope = a full scan); 409 if the group is disabled
//   GET    /v1/replications/{ref}/status  200, the body options.group_status gives (the daemon's per-replica
//                                         view); 501 when no hook is set
//   (/v1/replications/{ref}/where and /v1/webhooks/... are served by the daemon itself, not here)
//   GET    /v1/tasks?rule=&group=&status=&since=&until=&limit=&cursor=  200 {"tasks": [...], "next_cursor"}
//                                         (rule= and group= take an id or a name)
//   GET    /v1/tasks/{id}                 200; a running task also has "progress": {"repositories",
//                                         "repositories_scanned", "artifacts_done", "artifacts_in_progress",
//                                         "bytes_read", "bytes_sent"} (live, from the engine)
//   GET    /v1/tasks/{id}/items?limit=&cursor=&action=             200 {"items": [...], "next_cursor"}
//   GET    /v1/tasks/{id}/deliveries      200 {"deliveries": [...]}: its notifications out, in order
//   POST   /v1/tasks/{id}/cancel          200 (Queued -> Stopped) / 202 (InProgress: cancel requested);
//                                         409 if already finished
//   GET    /v1/events?limit=              200 {"events": [...]}: webhook events received, newest first
// Lists: {"registries": [...]}, {"links": [...]}, {"rules": [...]}, {"replications": [...]}. next_cursor
// is a string (opaque to clients) or null on the last page. since/until are RFC 3339 (since
// inclusive, until exclusive); limit 1..1000 (tasks default 50, items and events 100); status is
// case-insensitive; action is the API's spelling ("copied", "skipped: exists", "skipped: same
// digest", "failed"), percent-encoded.
//
// Errors are JSON {"message": "..."} (plus "errors": [{"field", "message"}, ...] for 400s on input):
// 400 a field error (named), a bad query parameter (named), a body that is not JSON ("body is not
// valid JSON") or nested too deep; 404 unknown route, registry, rule, replication group, task or
// link; 405 wrong method on a known route (with Allow); 409 duplicate name, registry in use, task
// already finished, trigger of a disabled rule or group; 413 body over 1 MiB; 415 a JSON body sent
// with a Content-Type other than application/json (or +json); no Content-Type is accepted; 500
// anything unexpected (handle() never throws), including a group_status hook that throws; 501
// replication status without a group_status hook. HEAD is answered as GET; OPTIONS with 204 and Allow.
//
// Credentials and webhook secrets are write-only: no response body contains one (the model's
// to_json never writes them, store messages never quote them, and a JSON syntax error is reported
// by byte offset only, never by quoting the body).
//
// Threading: the Store's (one thread at a time, normally the loop thread).
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "engine/rules.h"
#include "engine/store.h"
#include "netio/http_server.h"

namespace engine {

struct ControlApiOptions {
    std::string version = "0.1.0";         // reported by GET /v1/version
    std::function<Time()> clock = now_ms;  // "now" for task durations
    // Hooks for the daemon, called after the store has committed (exceptions are caught).
    std::function<void(const TaskRecord&)> on_task_queued;   // a manual trigger created a task
    std::function<void(int64_t task_id)> on_cancel_requested;  // an InProgress task must stop
    // GET /v1/replications/{ref}/status: the daemon's per-replica status of the group (501 if unset).
    std::function<nlohmann::json(const ReplicationGroup&)> group_status;
    // Live figures of a running task, written as its "progress" member (an object; null = none).
    std::function<nlohmann::json(int64_t task_id)> live_progress;
    // Where unexpected errors are reported (500s). Default: nowhere.
    std::function<void(std::string_view)> log;
};

// A query string's parameters in order, percent-decoded ('+' is a space).
using Query = std::vector<std::pair<std::string, std::string>>;
Query parse_query(std::string_view query);

// A registry, rule or replication group by its {ref}: an all-digit ref is tried as an id first,
// then as a name. A miss is a not_found error naming the ref ("no rule 'x'").
netio::Result<Registry> find_registry(Store& store, const std::string& ref);
netio::Result<Rule> find_rule(Store& store, const std::string& ref);
netio::Result<ReplicationGroup> find_group(Store& store, const std::string& ref);

class ControlApi {
public:
    using Options = ControlApiOptions;

    static constexpr size_t kMaxBodyBytes = 1 << 20;
    static constexpr int kMaxJsonDepth = 64;

    explicit ControlApi(Store& store, Options options = {});

    // Never throws.
    netio::HttpResponse handle(const netio::HttpRequest& req) noexcept;
    // handle() as the HttpServer's SyncHandler; the ControlApi must outlive the server.
    netio::SyncHandler handler() {
        return [this](netio::HttpRequest& req) { return handle(req); };
    }

private:
    struct Context;
    netio::HttpResponse route(Context& c);

    Store& store_;
    Options options_;
};

}  // namespace engine
