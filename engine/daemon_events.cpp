// The daemon's webhooks in: registry events stored before the reply, coalesced per artifact, and
// turned into `event` tasks for the sync-on-push rules and replication groups they match; and the
// periodic reconcile scans that repair what a lost notification missed.
#include <openssl/crypto.h>

#include <algorithm>
#include <tuple>

#include "engine/daemon_impl.h"
#include "engine/events.h"

namespace engine::daemon_detail {

namespace {

// The Authorization header carries the registry's secret: as is (Harbor's auth_header), or as
// "Bearer <secret>" (distribution's notification endpoint `headers`). Compared in constant time.
bool authorized(const std::string& header, const std::string& secret) {
    if (secret.empty()) return false;
    auto same = [](std::string_view a, const std::string& b) {
        return a.size() == b.size() && CRYPTO_memcmp(a.data(), b.data(), a.size()) == 0;
    };
    std::string_view h = header;
    if (same(h, secret)) return true;
    static constexpr std::string_view kBearer = "Bearer ";
    return h.size() > kBearer.size() && h.substr(0, kBearer.size()) == kBearer && same(h.substr(kBearer.size()), secret);
}

}  // namespace

void Daemon::enqueue(const TaskRecord& t) {
    const std::string owner = t.group_id ? "replication group " + t.group_name : "rule " + t.rule_name;
    log("task " + std::to_string(t.id) + " queued (" + owner + ", " + std::string(to_string(t.trigger)) +
        (t.scope.empty() ? "" : ", " + std::to_string(t.scope.size()) + " artifact(s)") + ")");
    queue_.push_back(t.id);
    dispatch_needed_ = true;
}

netio::HttpResponse Daemon::receive_webhook(const netio::HttpRequest& req, const std::string& registry_ref) {
    auto reg = find_registry(*store_, registry_ref);
    if (!reg.ok()) {
        log("webhook for unknown registry " + quote_input(registry_ref) + " refused");
        return netio::HttpResponse::json_error(kind_of(reg.error()) == ErrorKind::not_found ? 404 : 500,
                                               reg.error().message);
    }
    auto secret = store_->webhook_secret_for(reg->id);
    if (!secret.ok()) return netio::HttpResponse::json_error(500, "cannot read the registry's webhook secret");
    if (!authorized(req.header("Authorization"), secret.value())) {
        const bool none = secret->empty();
        log("webhook for registry " + reg->name + " refused: " +
            (none ? std::string("the registry has no webhook_secret set")
                  : std::string(req.header("Authorization").empty() ? "no Authorization header"
                                                                     : "wrong Authorization header")));
        netio::HttpResponse r = netio::HttpResponse::json_error(
            401, none ? "registry " + reg->name + " has no webhook_secret: set one to accept its webhooks"
                      : "missing or wrong Authorization header");
        r.headers.emplace_back("WWW-Authenticate", "Bearer realm=\"crossdock webhooks\"");
        return r;
    }
    auto events = parse_registry_events(req.body, req.header("Content-Type"));
    if (!events.ok()) {
        log("webhook from registry " + reg->name + " refused: " + events.error().message);
        return netio::HttpResponse::json_error(400, events.error().message);
    }
    // Durable before the reply: a registry that got a 200 does not send the event again.
    auto stored = store_->record_events(reg->id, events.value());
    if (!stored.ok()) {
        log("webhook from registry " + reg->name + ": cannot store its events: " + stored.error().message);
        return netio::HttpResponse::json_error(503, "cannot store the events now; send them again");
    }
    if (!stored->empty()) events_pending_ = true;
    log("webhook from registry " + reg->name + ": " + std::to_string(events->size()) + " manifest event(s), " +
        std::to_string(stored->size()) + " new");
    netio::HttpResponse r;
    r.body = json{{"events", events->size()}, {"new", stored->size()}}.dump() + "\n";
    return r;
}

// Pending events, coalesced per artifact: an artifact's events are taken once it has been quiet
// for event_quiet or its first event is event_max_hold old; then every enabled sync-on-push rule
// and replication group that matches gets one `event` task for all the artifacts taken, each
// artifact once, at its latest digest.
void Daemon::process_events() {
    const Time now = now_ms();
    auto pending = store_->pending_events(now, 5000);
    if (!pending.ok()) {
        log("cannot read pending events: " + pending.error().message);
        return;
    }
    if (pending->empty()) {
        events_pending_ = false;
        return;
    }
    using Key = std::tuple<int64_t, std::string, std::string, bool>;  // registry, repository, tag or digest, delete
    struct Burst {
        Time first = Time::max();
        Time last = Time::min();
        std::vector<const StoredEvent*> events;  // oldest first
    };
    std::map<Key, Burst> bursts;
    for (const auto& e : pending.value()) {
        Burst& b = bursts[Key{e.registry_id, e.repository, e.remove || e.tag.empty() ? e.digest : e.tag, e.remove}];
        b.first = std::min(b.first, e.received);
        b.last = std::max(b.last, e.received);
        b.events.push_back(&e);
    }
    std::vector<const Burst*> ripe;
    bool waiting = false;
    for (const auto& [key, b] : bursts) {
        if (now - b.last >= o_.event_quiet || now - b.first >= o_.event_max_hold) ripe.push_back(&b);
        else waiting = true;
    }
    events_pending_ = waiting || pending->size() >= 5000;
    if (ripe.empty()) return;

    auto rules = store_->list_rules();
    auto groups = store_->list_groups();
    if (!rules.ok() || !groups.ok()) {
        log("cannot match events: cannot read the rules or groups");
        return;
    }
    std::map<int64_t, std::vector<TaskScope>> for_rule, for_group;
    std::vector<int64_t> taken;
    for (const Burst* b : ripe) {
        const StoredEvent& e = *b->events.back();  // the latest of the burst
        for (const StoredEvent* ev : b->events) taken.push_back(ev->id);
        const TaskScope scope{e.repository, e.tag, e.digest, e.remove};
        for (const auto& rule : rules.value()) {
            if (!rule.enabled || !rule.sync_on_push || rule.source_registry_id != e.registry_id) continue;
            if (e.remove || e.tag.empty()) continue;  // rules copy tags; deletes are not theirs to replicate
            if (!below_namespace(e.repository, rule.source_namespace)) continue;
            for_rule[rule.id].push_back(scope);
        }
        for (const auto& g : groups.value()) {
            if (!g.enabled || g.primary_id != e.registry_id) continue;
            if (e.remove ? (!g.replicate_deletes || e.digest.empty()) : e.tag.empty()) continue;
            for_group[g.id].push_back(scope);
        }
    }
    std::vector<int64_t> tasks;
    auto queue_task = [&](netio::Result<TaskRecord> t, const std::string& owner) {
        if (!t.ok()) {
            log("cannot create an event task for " + owner + ": " + t.error().message);
            return;
        }
        tasks.push_back(t->id);
        enqueue(t.value());
    };
    for (auto& [rule_id, scope] : for_rule)
        queue_task(store_->create_task(rule_id, Trigger::event, scope), "rule " + std::to_string(rule_id));
    for (auto& [group_id, scope] : for_group)
        queue_task(store_->create_group_task(group_id, Trigger::event, scope),
                   "replication group " + std::to_string(group_id));
    if (auto st = store_->mark_events_processed(taken, tasks); !st.ok())
        log("cannot mark events processed: " + st.error().message);
    if (tasks.empty())
        log(std::to_string(taken.size()) + " event(s) matched no enabled sync-on-push rule or replication group");
}

// Sync-on-push rules without a schedule of their own reconcile at start and every
// reconcile_interval: registries deliver notifications from memory and lose them on a restart.
void Daemon::reconcile() {
    auto rules = store_->list_rules();
    if (!rules.ok()) return;
    const auto now = SteadyClock::now();
    std::set<int64_t> seen;
    for (const auto& rule : rules.value()) {
        if (!rule.enabled || !rule.sync_on_push || !rule.schedule.empty()) continue;
        seen.insert(rule.id);
        auto [it, fresh] = next_reconcile_.emplace(rule.id, now);
        if (!fresh && now < it->second) continue;
        it->second = now + o_.reconcile_interval;
        if (scan_pending(rule.id, std::nullopt)) continue;
        auto t = store_->create_task(rule.id, Trigger::schedule);
        if (!t.ok()) {
            log("rule " + rule.name + ": cannot create its reconcile task: " + t.error().message);
            continue;
        }
        enqueue(t.value());
    }
    std::erase_if(next_reconcile_, [&](const auto& kv) { return !seen.count(kv.first); });
}

}  // namespace engine::daemon_detail
