// Internals of the sidecar daemon (engine/daemon.h), shared by its implementation files:
// daemon.cpp (start, stop, tasks, /healthz, /metrics), daemon_events.cpp (webhooks in, events to
// tasks, reconcile scans), daemon_notify.cpp (notifications out), daemon_groups.cpp (replication
// groups: their tasks, status, `where`). Not part of the engine's interface.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "engine/api.h"
#include "engine/daemon.h"
#include "engine/mirror.h"
#include "engine/store.h"
#include "netio/http_client.h"
#include "netio/http_server.h"
#include "netio/uring_loop.h"
#include "planner/link_shares.h"
#include "planner/scheduler.h"

namespace engine::daemon_detail {

using json = nlohmann::json;
using SteadyClock = std::chrono::steady_clock;

inline constexpr const char* kVersion = "0.1.0";
// Slots beyond --max-tasks that only event-triggered tasks may take.
inline constexpr size_t kEventExtraSlots = 2;

// "host[:port]" and scheme of a registry URL the store has checked ("scheme://host[:port]").
struct Endpoint {
    std::string scheme;
    std::string host;
};

inline Endpoint endpoint_of(const std::string& url) {
    const size_t sep = url.find("://");
    if (sep == std::string::npos) return {"", url};
    return {url.substr(0, sep), url.substr(sep + 3)};
}

// A task's weight on a shared link: event-triggered work first, a manual run next, scheduled scans
// last, none starved (planner/link_shares.h).
inline unsigned weight_of(Trigger t) {
    switch (t) {
    case Trigger::event: return 8;
    case Trigger::manual: return 2;
    case Trigger::schedule: return 1;
    }
    return 1;
}

// One capped link's shares: downloads from the source side and uploads to the target side.
struct SharedLink {
    std::shared_ptr<planner::LinkShares> down;
    std::shared_ptr<planner::LinkShares> up;
};

// What the mirror reports, in the task log's terms.
TaskItem to_task_item(const MirrorItem& m);
// The mirror's tuning, its cache and quiet logging: the same for every task.
std::shared_ptr<MirrorOptions> base_options(const DaemonOptions& d);

// Everything a worker thread shares with the daemon's loop.
struct Exchange {
    std::mutex mu;
    std::vector<MirrorItem> items;            // recorded, not yet in the store
    std::optional<MirrorSummary> summary;     // set when the run is over
};

enum class StopWhy { none, cancel, shutdown };

struct Running {
    TaskRecord task;
    int64_t rule_id = 0;
    std::string link;  // "src-region->dst-region" when the link has a cap; "" otherwise
    std::shared_ptr<MirrorOptions> opts;
    std::shared_ptr<std::atomic<bool>> cancel = std::make_shared<std::atomic<bool>>(false);
    std::shared_ptr<MirrorProgress> progress = std::make_shared<MirrorProgress>();
    std::shared_ptr<Exchange> exchange = std::make_shared<Exchange>();
    std::thread thread;
    StopWhy stop = StopWhy::none;
    uint64_t repositories_stored = 0;
    std::map<std::string, std::string> target_names;  // the mirror's target label -> registry name
    // A resumed task: (repository, tag) pairs its log already has. A new run finds them unchanged
    // and would log them again as "skipped: same digest"; those are left out.
    std::set<std::pair<std::string, std::string>> logged;
};

class Daemon {
public:
    explicit Daemon(const DaemonOptions& o) : o_(o) {}

    int run();

private:
    void log(const std::string& line) {
        if (!o_.log) return;
        std::fprintf(o_.log, "%s crossdock: %s\n", format_time(now_ms()).c_str(), line.c_str());
        std::fflush(o_.log);
    }

    bool start();
    void recover();
    bool owner_exists(const TaskRecord& t);
    void prune();
    void watch_signals();
    void on_signal();
    void tick();
    bool scan_pending(std::optional<int64_t> rule_id, std::optional<int64_t> group_id);
    void dispatch();
    bool launch(int64_t task_id);
    netio::Result<std::shared_ptr<MirrorOptions>> mirror_options(const Rule& rule, Running& r);
    // Source/target transport and credentials of one registry record, into the mirror's options;
    // returns the host.
    netio::Result<std::string> add_endpoint(MirrorOptions& o, const Registry& reg, bool source,
                                            std::optional<Credentials> override_credentials);
    void share_link(MirrorOptions& o, Running& r, const Registry& src, const Registry& dst);
    void pump();
    void drain(Running& r);
    void finish(Running& r, MirrorSummary& s);
    void begin_shutdown();
    netio::HttpResponse serve_tcp(const netio::HttpRequest& req);
    std::string metrics();
    json live_progress(int64_t task_id);
    SharedLink& shared_link(const std::string& key, const Link& l);
    std::string cache_dir_of(int64_t task_id) const;
    void remove_stale_caches();
    netio::Task<netio::HttpResponse> serve_unix(netio::HttpRequest& req);

    // daemon_events.cpp: webhooks in, events to tasks, reconcile scans of sync-on-push rules.
    netio::HttpResponse receive_webhook(const netio::HttpRequest& req, const std::string& registry_ref);
    void process_events();
    void reconcile();
    void enqueue(const TaskRecord& t);

    // daemon_notify.cpp: notifications out when a rule's task ends; pending ones resume on start.
    void notify_task_end(int64_t task_id);
    void deliver(int64_t delivery_id, std::string url, std::string body, uint32_t attempt);
    void resume_deliveries();
    json notification_body(const TaskRecord& t);

    // daemon_groups.cpp: replication groups.
    netio::Result<std::shared_ptr<MirrorOptions>> group_mirror_options(const ReplicationGroup& g, Running& r);
    json group_status(const ReplicationGroup& g);
    netio::Task<netio::HttpResponse> where(std::string group_ref, std::string image);

    const DaemonOptions& o_;
    netio::UringLoop loop_;
    std::unique_ptr<Store> store_;
    std::unique_ptr<ControlApi> api_;
    std::unique_ptr<netio::HttpServer> unix_server_;
    std::unique_ptr<netio::HttpServer> tcp_server_;
    netio::UniqueFd signal_fd_;
    std::deque<int64_t> queue_;
    std::map<int64_t, std::unique_ptr<Running>> running_;
    std::map<std::string, SharedLink> links_;  // by "src-region->dst-region"
    std::unique_ptr<netio::HttpClient> http_;  // notifications out, `where`
    bool events_pending_ = true;               // the store may hold unprocessed events
    bool dispatch_needed_ = true;              // a task was queued or ended: look at the queue again
    std::map<int64_t, SteadyClock::time_point> next_reconcile_;  // sync-on-push rules without a schedule
    std::shared_ptr<int> alive_ = std::make_shared<int>(0);      // guards timers of deliveries
    bool stopping_ = false;
    SteadyClock::time_point stop_deadline_{};
    SteadyClock::time_point next_prune_{};
    // For /metrics, since the process started.
    std::map<std::string, uint64_t> finished_by_status_;
    std::map<std::string, uint64_t> artifacts_by_action_;
    uint64_t bytes_copied_ = 0;
    uint64_t tasks_started_ = 0;
};

}  // namespace engine::daemon_detail
