// The daemon's notifications out: when a rule's task ends, each of the rule's notify_urls is
// POSTed a JSON summary (per notify_on), retried with backoff; every delivery is recorded in the
// store, and pending ones resume when the daemon starts.
#include <algorithm>

#include "engine/daemon_impl.h"

namespace engine::daemon_detail {

namespace {

bool wanted(NotifyOn on, TaskStatus s) {
    switch (on) {
    case NotifyOn::always: return true;
    case NotifyOn::failure: return s == TaskStatus::failed || s == TaskStatus::partially_failed;
    case NotifyOn::success: return s == TaskStatus::succeeded;
    }
    return false;
}

constexpr uint32_t kMaxFailuresListed = 100;

}  // namespace

json Daemon::notification_body(const TaskRecord& t) {
    json failures = json::array();
    ItemQuery q;
    q.action = ItemAction::failed;
    q.limit = kMaxFailuresListed;
    if (auto items = store_->list_items(t.id, q); items.ok())
        for (const auto& i : items->items)
            failures.push_back({{"repository", i.repository}, {"tag", i.tag}, {"digest", i.digest}, {"reason", i.reason}});
    const auto d = t.duration(now_ms());
    return json{{"event", "task.finished"},
                {"rule", t.rule_name},
                {"task_id", t.id},
                {"trigger", to_string(t.trigger)},
                {"status", to_string(t.status)},
                {"reason", t.reason},
                {"started", t.started ? json(format_time(*t.started)) : json(nullptr)},
                {"finished", t.finished ? json(format_time(*t.finished)) : json(nullptr)},
                {"duration_ms", d ? json(d->count()) : json(nullptr)},
                {"repositories", t.counters.repositories},
                {"artifacts", {{"copied", t.counters.copied}, {"skipped", t.counters.skipped}, {"failed", t.counters.failed}}},
                {"bytes", t.counters.bytes},
                {"failures", std::move(failures)}};
}

void Daemon::notify_task_end(int64_t task_id) {
    auto t = store_->get_task(task_id);
    if (!t.ok() || !t->rule_id) return;
    auto rule = store_->get_rule(*t->rule_id);
    if (!rule.ok() || rule->notify_urls.empty() || !wanted(rule->notify_on, t->status)) return;
    const std::string body = notification_body(t.value()).dump(-1, ' ', false, json::error_handler_t::replace);
    for (const auto& url : rule->notify_urls) {
        auto d = store_->add_delivery(task_id, url);
        if (!d.ok()) {
            log("task " + std::to_string(task_id) + ": cannot record a notification: " + d.error().message);
            continue;
        }
        deliver(d->id, url, body, 1);
    }
}

void Daemon::resume_deliveries() {
    auto pending = store_->pending_deliveries();
    if (!pending.ok()) return;
    for (const auto& d : pending.value()) {
        auto t = store_->get_task(d.task_id);
        if (!t.ok()) continue;
        deliver(d.id, d.url, notification_body(t.value()).dump(-1, ' ', false, json::error_handler_t::replace),
                d.attempts + 1);
    }
}

// One attempt; a failure (no answer, or not 2xx) is retried after notify_backoff * 2^(attempt-1),
// up to notify_attempts attempts in all. Redirects are not followed (a webhook that moved is an error).
void Daemon::deliver(int64_t delivery_id, std::string url, std::string body, uint32_t attempt) {
    if (stopping_) return;  // stays pending; the next start resumes it
    netio::Request req;
    req.method = "POST";
    req.url = url;
    req.body = body;
    req.headers.emplace_back("Content-Type", "application/json");
    req.headers.emplace_back("User-Agent", std::string("crossdock/") + kVersion);
    req.follow_redirects = false;
    req.timeout_ms = 10000;
    req.connect_timeout_ms = 5000;
    req.max_body_bytes = 64 << 10;
    http_->start(std::move(req), nullptr,
                 [this, token = std::weak_ptr<int>(alive_), delivery_id, url, body, attempt](netio::Result<netio::Response> res) {
                     if (token.expired()) return;
                     int status = 0;
                     std::string error;
                     if (!res.ok()) {
                         error = res.error().message;
                     } else {
                         status = static_cast<int>(res->status);
                         if (status < 200 || status >= 300) error = "HTTP " + std::to_string(status);
                     }
                     const bool done = error.empty();
                     const bool give_up = !done && attempt >= o_.notify_attempts;
                     const char* state = done ? "delivered" : give_up ? "failed" : "pending";
                     (void)store_->update_delivery(delivery_id, state, attempt, status, error);
                     if (done) return;
                     if (give_up) {
                         log("notification to " + url + " failed after " + std::to_string(attempt) + " attempts: " + error);
                         return;
                     }
                     const auto delay = o_.notify_backoff * (1u << std::min<uint32_t>(attempt - 1, 10));
                     loop_.add_timer(delay, [this, token, delivery_id, url, body, attempt] {
                         if (!token.expired()) deliver(delivery_id, url, body, attempt + 1);
                     });
                 });
}

}  // namespace engine::daemon_detail
