#include "engine/daemon.h"

#include <grp.h>
#include <poll.h>
#include <pwd.h>
#include <pthread.h>
#include <signal.h>
#include <sys/signalfd.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <cstring>
#include <filesystem>

#include "engine/daemon_impl.h"

namespace engine {

namespace daemon_detail {

TaskItem to_task_item(const MirrorItem& m) {
    TaskItem t;
    t.repository = m.repository;
    t.tag = m.tag;
    t.digest = m.digest;
    t.bytes = m.bytes;
    t.duration_ms = m.duration_ms;
    t.reason = m.reason;
    if (m.action == "copied") {
        t.action = ItemAction::copied;
    } else if (m.action == "deleted") {
        t.action = ItemAction::deleted;
    } else if (m.action == "skipped" && m.reason == "same digest") {
        t.action = ItemAction::skipped_same_digest;
        t.reason.clear();
    } else if (m.action == "skipped") {
        t.action = ItemAction::skipped_exists;
        if (m.reason == "exists") t.reason = "the target's tag holds other content and overwrite is off";
        else if (m.reason == "vanished") t.reason = "the tag vanished from the source while the task ran";
    } else {
        t.action = ItemAction::failed;
    }
    return t;
}

// Whether user `uid` belongs to group `gid` (primary or supplementary), per the system's user database.
bool user_in_group(uid_t uid, gid_t gid) {
    passwd pw{};
    passwd* found = nullptr;
    std::vector<char> buf(16384);
    if (::getpwuid_r(uid, &pw, buf.data(), buf.size(), &found) != 0 || !found) return false;
    int n = 64;
    std::vector<gid_t> groups(static_cast<size_t>(n));
    if (::getgrouplist(pw.pw_name, pw.pw_gid, groups.data(), &n) < 0) {
        if (n <= 0 || n > 65536) return false;
        groups.resize(static_cast<size_t>(n));
        if (::getgrouplist(pw.pw_name, pw.pw_gid, groups.data(), &n) < 0) return false;
    }
    groups.resize(static_cast<size_t>(n));
    return std::find(groups.begin(), groups.end(), gid) != groups.end();
}

int Daemon::run() {
    if (!start()) return 1;
    auto next_tick = SteadyClock::now();
    for (;;) {
        // Short waits while events are being coalesced, so a quiet artifact is picked up promptly.
        loop_.run_once(std::chrono::milliseconds(events_pending_ ? 50 : 200));
        pump();
        if (stopping_) {
            if (running_.empty() || SteadyClock::now() >= stop_deadline_) break;
            continue;
        }
        if (events_pending_) process_events();
        if (SteadyClock::now() >= next_tick) {
            tick();
            reconcile();
            next_tick = SteadyClock::now() + o_.tick;
            dispatch_needed_ = true;  // once a tick too: cancelled tasks and those of deleted rules leave the queue
        }
        if (dispatch_needed_) dispatch();
    }

    // Tasks still running past the stop timeout: flush what they logged and checkpoint them too.
    bool stragglers = false;
    for (auto& [id, r] : running_) {
        drain(*r);
        if (auto st = store_->requeue(id, "checkpointed when the daemon stopped; resumes when it starts"); !st.ok())
            log("task " + std::to_string(id) + ": cannot checkpoint: " + st.error().message);
        log("task " + std::to_string(id) + " did not stop within the stop timeout; checkpointed");
        stragglers = true;
    }
    unix_server_.reset();
    tcp_server_.reset();
    api_.reset();
    store_.reset();  // closes the database and releases the state lock
    log("stopped");
    if (stragglers) {
        // Worker threads still hold transfers; the state is saved and the cache keeps verified
        // chunks only, so leaving without joining them is safe.
        std::fflush(nullptr);
        std::_Exit(0);
    }
    return 0;
}

bool Daemon::start() {
    // Signals are read from a signalfd; block them before any thread starts so workers inherit it.
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &set, nullptr);
    sigset_t wanted = set;
    sigdelset(&wanted, SIGPIPE);
    signal_fd_ = netio::UniqueFd(::signalfd(-1, &wanted, SFD_CLOEXEC | SFD_NONBLOCK));
    if (signal_fd_.get() < 0) {
        log(std::string("cannot read signals: ") + std::strerror(errno));
        return false;
    }

    auto store = Store::open(o_.state_dir);
    if (!store.ok()) {
        log("cannot open the state in " + o_.state_dir + ": " + store.error().message);
        return false;
    }
    store_ = std::move(store.value());

    ControlApiOptions ao;
    ao.version = kVersion;
    ao.on_task_queued = [this](const TaskRecord& t) { enqueue(t); };
    ao.on_cancel_requested = [this](int64_t id) {
        if (auto it = running_.find(id); it != running_.end()) {
            it->second->stop = StopWhy::cancel;
            it->second->cancel->store(true);
            log("task " + std::to_string(id) + ": stop requested");
        }
    };
    ao.live_progress = [this](int64_t id) { return live_progress(id); };
    ao.group_status = [this](const ReplicationGroup& g) { return group_status(g); };
    ao.log = [this](std::string_view msg) { log(std::string(msg)); };
    api_ = std::make_unique<ControlApi>(*store_, ao);

    recover();
    remove_stale_caches();
    prune();

    netio::HttpServerOptions so;
    so.log = [this](std::string_view msg) { log("control socket: " + std::string(msg)); };
    if (o_.socket_group) {
        const gid_t group = *o_.socket_group;
        so.allow_peer = [group](const ucred& peer) {
            return peer.uid == 0 || peer.uid == ::geteuid() || peer.gid == group || user_in_group(peer.uid, group);
        };
    }
    std::error_code ec;
    std::filesystem::create_directories(std::filesystem::path(o_.socket_path).parent_path(), ec);
    http_ = std::make_unique<netio::HttpClient>(loop_);
    resume_deliveries();
    unix_server_ = std::make_unique<netio::HttpServer>(
        loop_, netio::Handler([this](netio::HttpRequest& req) { return serve_unix(req); }), so);
    if (auto st = unix_server_->listen_unix(o_.socket_path, o_.socket_group ? 0660 : 0600, o_.socket_group); !st.ok()) {
        log("cannot listen on " + o_.socket_path + ": " + st.error().message);
        return false;
    }
    if (!o_.listen_host.empty()) {
        netio::HttpServerOptions to;
        to.max_body_bytes = ControlApi::kMaxBodyBytes;  // webhook envelopes of a big push list many events
        to.log = [this](std::string_view msg) { log("http: " + std::string(msg)); };
        tcp_server_ = std::make_unique<netio::HttpServer>(
            loop_, netio::SyncHandler([this](netio::HttpRequest& req) { return serve_tcp(req); }), to);
        if (auto st = tcp_server_->listen_tcp(o_.listen_host, o_.listen_port); !st.ok()) {
            log("cannot listen on " + o_.listen_host + ":" + std::to_string(o_.listen_port) + ": " + st.error().message);
            return false;
        }
    }
    watch_signals();
    std::string where = "control API on " + o_.socket_path;
    if (tcp_server_) where += ", /healthz and /metrics on http://" + o_.listen_host + ":" + std::to_string(tcp_server_->tcp_port());
    log("crossdock " + std::string(kVersion) + " serving; state in " + o_.state_dir + "; " + where);
    return true;
}

// The task's rule (or replication group) still exists.
bool Daemon::owner_exists(const TaskRecord& t) {
    if (t.rule_id) return store_->get_rule(*t.rule_id).ok();
    if (t.group_id) return store_->get_group(*t.group_id).ok();
    return false;
}

// Tasks a previous process left Queued or InProgress: continued if their rule (or group) still exists,
// failed as interrupted otherwise. Never lost.
void Daemon::recover() {
    auto left = store_->interrupted_tasks();
    if (!left.ok()) {
        log("cannot read interrupted tasks: " + left.error().message);
        return;
    }
    for (const auto& t : left.value()) {
        if (!owner_exists(t)) {
            (void)store_->finish_task(t.id, TaskStatus::failed,
                                      "interrupted: the daemon stopped and its rule or replication group is gone");
            log("task " + std::to_string(t.id) + " failed: interrupted, and its rule or replication group is gone");
            continue;
        }
        if (t.status == TaskStatus::in_progress) {
            if (auto st = store_->requeue(t.id, "resumed after the daemon restarted"); !st.ok()) {
                log("task " + std::to_string(t.id) + ": cannot resume: " + st.error().message);
                continue;
            }
            log("task " + std::to_string(t.id) + " (rule " + t.rule_name + ") was interrupted; resuming it");
        }
        enqueue(t);
    }
}

void Daemon::watch_signals() {
    loop_.poll_add(signal_fd_.get(), POLLIN, [this](int) { on_signal(); });
}

void Daemon::on_signal() {
    signalfd_siginfo info{};
    bool got = false;
    while (::read(signal_fd_.get(), &info, sizeof info) == static_cast<ssize_t>(sizeof info)) got = true;
    if (got && !stopping_) {
        log(std::string("received ") + (info.ssi_signo == SIGINT ? "SIGINT" : "SIGTERM") + "; stopping");
        begin_shutdown();
    }
    watch_signals();
}

void Daemon::begin_shutdown() {
    stopping_ = true;
    stop_deadline_ = SteadyClock::now() + o_.stop_timeout;
    if (unix_server_) unix_server_->stop();
    if (tcp_server_) tcp_server_->stop();
    for (auto& [id, r] : running_) {
        r->stop = StopWhy::shutdown;
        r->cancel->store(true);
    }
}

// A full scan of the rule (or group) is queued or running: a schedule that fires now is skipped
// rather than piling up another.
bool Daemon::scan_pending(std::optional<int64_t> rule_id, std::optional<int64_t> group_id) {
    auto owns = [&](const TaskRecord& t) {
        return t.scope.empty() && ((rule_id && t.rule_id == rule_id) || (group_id && t.group_id == group_id));
    };
    for (auto& [id, r] : running_)
        if (owns(r->task)) return true;
    for (int64_t id : queue_) {
        auto t = store_->get_task(id);
        if (t.ok() && t->status == TaskStatus::queued && owns(t.value())) return true;
    }
    return false;
}

// Schedules (rules, and groups' reconcile scans) and retention.
void Daemon::tick() {
    const Time now = now_ms();
    auto due = store_->due_rules(now);
    if (!due.ok()) {
        log("cannot read schedules: " + due.error().message);
    } else {
        for (const auto& d : due.value()) {
            (void)store_->record_fire(d.rule_id, now);
            if (scan_pending(d.rule_id, std::nullopt)) {
                log("rule " + d.rule_name + ": schedule fired while its previous scan is still pending; skipped");
                continue;
            }
            auto t = store_->create_task(d.rule_id, Trigger::schedule);
            if (!t.ok()) {
                log("rule " + d.rule_name + ": cannot create the scheduled task: " + t.error().message);
                continue;
            }
            enqueue(t.value());
        }
    }
    auto groups = store_->due_groups(now);
    if (groups.ok()) {
        for (const auto& d : groups.value()) {
            (void)store_->record_group_fire(d.rule_id, now);
            if (scan_pending(std::nullopt, d.rule_id)) continue;
            auto t = store_->create_group_task(d.rule_id, Trigger::schedule, {});
            if (!t.ok()) {
                log("replication group " + d.rule_name + ": cannot create its reconcile task: " + t.error().message);
                continue;
            }
            enqueue(t.value());
        }
    }
    if (SteadyClock::now() >= next_prune_) prune();
}

// Retention, hourly: finished tasks (with their items and deliveries) and processed events.
void Daemon::prune() {
    next_prune_ = SteadyClock::now() + std::chrono::hours(1);
    if (auto pruned = store_->prune_tasks(o_.retention); pruned.ok() && *pruned > 0)
        log("pruned " + std::to_string(*pruned) + " finished tasks past the retention");
    if (o_.retention.older_than_days) {
        const Time before = now_ms() - std::chrono::days(*o_.retention.older_than_days);
        if (auto pruned = store_->prune_events(before); pruned.ok() && *pruned > 0)
            log("pruned " + std::to_string(*pruned) + " processed events past the retention");
    }
}

// Starts queued tasks within the limits (planner::may_start_task): event-triggered ones first
// (they may take up to two slots beyond --max-tasks, and run beside a scan of the same rule, but
// leave a scan that waits one slot), then the others oldest first; one task per rule (or group) at
// a time otherwise.
void Daemon::dispatch() {
    dispatch_needed_ = false;
    if (queue_.empty()) return;
    std::vector<std::pair<int64_t, TaskRecord>> ready;
    for (auto it = queue_.begin(); it != queue_.end();) {
        auto t = store_->get_task(*it);
        if (!t.ok() || t->status != TaskStatus::queued) {  // cancelled, or its rule was deleted
            it = queue_.erase(it);
            continue;
        }
        ready.emplace_back(*it, std::move(t.value()));
        ++it;
    }
    std::stable_partition(ready.begin(), ready.end(),
                          [](const auto& p) { return p.second.trigger == Trigger::event; });
    // Whether `t` must wait for a task of its own rule or group.
    auto owner_busy = [this](const TaskRecord& t) {
        const bool event = t.trigger == Trigger::event;
        for (auto& [rid, r] : running_) {
            const bool same_owner = (t.rule_id && r->rule_id == *t.rule_id) || (t.group_id && r->task.group_id == t.group_id);
            if (same_owner && (!event || r->task.trigger == Trigger::event)) return true;
        }
        return false;
    };
    const planner::TaskSlots slots{o_.max_running_tasks, kEventExtraSlots};
    // A scan that could start but for the slots (taken before any event starts: a slot kept for a
    // scan whose rule then gets an event task stays free until the next dispatch).
    const bool others_waiting = std::any_of(ready.begin(), ready.end(), [&](const auto& p) {
        return p.second.trigger != Trigger::event && !owner_busy(p.second);
    });
    for (const auto& [id, t] : ready) {
        const bool event = t.trigger == Trigger::event;
        size_t running_events = 0;
        for (auto& [rid, r] : running_) running_events += r->task.trigger == Trigger::event;
        const size_t running_others = running_.size() - running_events;
        if (!planner::may_start_task(slots, event, running_events, running_others, others_waiting)) continue;
        if (owner_busy(t)) continue;
        queue_.erase(std::find(queue_.begin(), queue_.end(), id));
        launch(id);
    }
}

netio::Result<std::string> Daemon::add_endpoint(MirrorOptions& o, const Registry& reg, bool source,
                                                std::optional<Credentials> override_credentials) {
    const Endpoint e = endpoint_of(reg.url);
    RegistryTransport tr{e.scheme, reg.insecure, reg.ca_file, std::nullopt};
    if (override_credentials && !override_credentials->empty()) {
        tr.credentials = std::move(override_credentials);
    } else {
        auto creds = store_->credentials_for(reg.id);
        if (!creds.ok()) return creds.error();
        if (!creds->empty()) tr.credentials = creds.value();
    }
    // One host with two registry records (two accounts on one registry): the source's
    // credentials go through source_credentials, the targets' through target_credentials.
    if (source) o.source_credentials = tr.credentials;
    else o.target_credentials = tr.credentials;
    o.transports[e.host] = std::move(tr);
    return e.host;
}

// The link's cap holds for every task on the link together, split by the tasks' weights.
void Daemon::share_link(MirrorOptions& o, Running& r, const Registry& src, const Registry& dst) {
    if (src.region.empty() || dst.region.empty()) return;
    auto links = store_->list_links();
    if (!links.ok()) return;
    for (const auto& l : links.value()) {
        if (l.source_region != src.region || l.target_region != dst.region) continue;
        r.link = l.source_region + "->" + l.target_region;
        SharedLink& shared = shared_link(r.link, l);
        const unsigned weight = weight_of(r.task.trigger);
        const auto now = planner::Clock::now();
        shared.down->join(r.task.id, weight, now);
        shared.up->join(r.task.id, weight, now);
        o.shared_source = shared.down;
        o.shared_target = shared.up;
        o.shared_member = static_cast<uint64_t>(r.task.id);
    }
}

std::shared_ptr<MirrorOptions> base_options(const DaemonOptions& d) {
    auto o = std::make_shared<MirrorOptions>();
    o->jobs = d.jobs;
    o->streams = d.streams;
    o->chunk_size_bytes = d.chunk_size_bytes;
    o->cache_cap_bytes = d.cache_cap_bytes;
    o->log = nullptr;
    return o;
}

namespace {

// An event task's scope, as the mirror takes it: repositories relative to the source namespace.
std::vector<MirrorArtifact> scoped(const std::vector<TaskScope>& scope, const std::string& ns) {
    std::vector<MirrorArtifact> out;
    for (const auto& s : scope)
        if (auto rel = below_namespace(s.repository, ns)) out.push_back({*rel, s.tag, s.digest, s.remove});
    return out;
}

}  // namespace

netio::Result<std::shared_ptr<MirrorOptions>> Daemon::mirror_options(const Rule& rule, Running& r) {
    auto src = store_->get_registry(rule.source_registry_id);
    if (!src.ok()) return src.error();
    auto dst = store_->get_registry(rule.target_registry_id);
    if (!dst.ok()) return dst.error();
    auto filters = compile_filters(rule.repo_filter, rule.tag_filter, std::string(to_string(rule.type)));
    if (!filters.ok()) return filters.error();

    auto o = base_options(o_);
    auto src_host = add_endpoint(*o, src.value(), true, std::nullopt);
    if (!src_host.ok()) return src_host.error();
    auto rule_creds = store_->rule_target_credentials(rule.id);
    if (!rule_creds.ok()) return rule_creds.error();
    auto dst_host = add_endpoint(*o, dst.value(), false, rule_creds.value());
    if (!dst_host.ok()) return dst_host.error();
    o->source = RegistryRef{src_host.value(), rule.source_namespace};
    o->targets.push_back(RegistryRef{dst_host.value(), rule.effective_target_namespace()});
    r.target_names[o->targets.back().to_string()] = dst->name;
    o->filters = filters.value();
    o->overwrite = rule.overwrite;
    o->only = scoped(r.task.scope, rule.source_namespace);
    share_link(*o, r, src.value(), dst.value());
    return o;
}

bool Daemon::launch(int64_t task_id) {
    auto task = store_->get_task(task_id);
    if (!task.ok()) return false;
    auto fail = [&](const std::string& why) {
        (void)store_->finish_task(task_id, TaskStatus::failed, why);
        ++finished_by_status_["Failed"];
        log("task " + std::to_string(task_id) + " failed: " + why);
        return false;
    };
    auto r = std::make_unique<Running>();
    r->task = task.value();
    std::string what;
    if (task->group_id) {
        auto group = store_->get_group(*task->group_id);
        if (!group.ok()) return fail("cannot read its replication group: " + group.error().message);
        auto opts = group_mirror_options(group.value(), *r);
        if (!opts.ok()) return fail(opts.error().message);
        r->opts = opts.value();
        what = "replication group " + group->name;
    } else {
        if (!task->rule_id) return fail("its rule was deleted");
        auto rule = store_->get_rule(*task->rule_id);
        if (!rule.ok()) return fail("cannot read its rule: " + rule.error().message);
        r->rule_id = rule->id;
        auto opts = mirror_options(rule.value(), *r);
        if (!opts.ok()) return fail(opts.error().message);
        r->opts = opts.value();
        what = "rule " + rule->name;
    }
    // Each task has its own blob cache (a cas::BlobStore belongs to one loop): kept while the task
    // may resume, removed when it ends.
    r->opts->cache_dir = cache_dir_of(task_id);
    if (!task->scope.empty() && r->opts->only.empty()) {
        // Every scoped artifact fell outside the namespace: nothing to do.
        (void)store_->start_task(task_id);
        (void)store_->finish_task(task_id, TaskStatus::succeeded, "");
        ++finished_by_status_["Succeeded"];
        return true;
    }

    // A resumed task: what its log already holds.
    std::optional<int64_t> cursor;
    for (int page = 0; page < 10000; ++page) {
        ItemQuery q;
        q.cursor = cursor;
        q.limit = Store::kMaxPageSize;
        auto items = store_->list_items(task_id, q);
        if (!items.ok()) break;
        for (const auto& it : items->items) r->logged.emplace(it.target + "\n" + it.repository, it.tag);
        if (!items->next_cursor) break;
        cursor = items->next_cursor;
    }

    if (auto st = store_->start_task(task_id); !st.ok()) {
        log("task " + std::to_string(task_id) + ": cannot start: " + st.error().message);
        return false;
    }
    if (auto started = store_->get_task(task_id); started.ok()) r->task = started.value();
    r->opts->cancel = r->cancel;
    r->opts->progress = r->progress;
    r->opts->on_item = [ex = r->exchange, loop = &loop_](const MirrorItem& item) {
        {
            std::lock_guard lock(ex->mu);
            ex->items.push_back(item);
        }
        loop->wake();
    };
    r->thread = std::thread([opts = r->opts, ex = r->exchange, loop = &loop_] {
        MirrorSummary s;
        try {
            s = run_mirror(*opts);
        } catch (const std::exception& e) {
            s.errors.push_back(std::string("internal error: ") + e.what());
        }
        {
            std::lock_guard lock(ex->mu);
            ex->summary = std::move(s);
        }
        loop->wake();
    });
    ++tasks_started_;
    std::string targets;
    for (const auto& t : r->opts->targets) targets += (targets.empty() ? "" : ", ") + t.to_string();
    log("task " + std::to_string(task_id) + " started (" + what + ", " + std::string(to_string(r->task.trigger)) + ": " +
        r->opts->source.to_string() + " -> " + targets +
        (r->task.scope.empty() ? "" : ", " + std::to_string(r->task.scope.size()) + " artifact(s)") +
        (r->logged.empty() ? "" : ", continuing its log") + ")");
    running_.emplace(task_id, std::move(r));
    return true;
}

// Moves what the workers reported into the store; finishes the tasks whose run is over.
void Daemon::pump() {
    for (auto it = running_.begin(); it != running_.end();) {
        Running& r = *it->second;
        drain(r);
        std::optional<MirrorSummary> summary;
        {
            std::lock_guard lock(r.exchange->mu);
            if (r.exchange->summary) summary = std::move(r.exchange->summary);
        }
        if (!summary) {
            ++it;
            continue;
        }
        r.thread.join();
        drain(r);  // anything recorded between the last drain and the end
        finish(r, *summary);
        if (auto l = links_.find(r.link); l != links_.end()) {
            l->second.down->leave(static_cast<uint64_t>(r.task.id));
            l->second.up->leave(static_cast<uint64_t>(r.task.id));
        }
        it = running_.erase(it);
        dispatch_needed_ = true;
    }
}

void Daemon::drain(Running& r) {
    std::vector<MirrorItem> got;
    {
        std::lock_guard lock(r.exchange->mu);
        got.swap(r.exchange->items);
    }
    std::vector<TaskItem> items;
    items.reserve(got.size());
    for (const auto& m : got) {
        TaskItem t = to_task_item(m);
        if (auto name = r.target_names.find(m.target); name != r.target_names.end()) t.target = name->second;
        if (t.action == ItemAction::skipped_same_digest && r.logged.count({t.target + "\n" + t.repository, t.tag})) continue;
        ++artifacts_by_action_[std::string(to_string(t.action))];
        if (t.action == ItemAction::copied) bytes_copied_ += t.bytes;
        items.push_back(std::move(t));
    }
    const int64_t id = r.task.id;
    for (size_t i = 0; i < items.size(); i += Store::kMaxItemsPerAppend) {
        std::vector<TaskItem> batch(items.begin() + static_cast<long>(i),
                                    items.begin() + static_cast<long>(std::min(items.size(), i + Store::kMaxItemsPerAppend)));
        if (auto st = store_->append_items(id, batch); !st.ok())
            log("task " + std::to_string(id) + ": cannot write its log: " + st.error().message);
    }
    const uint64_t repos = r.progress->repositories.load();
    if (repos != r.repositories_stored) {
        (void)store_->set_task_repositories(id, repos);
        r.repositories_stored = repos;
    }
}

void Daemon::finish(Running& r, MirrorSummary& s) {
    const int64_t id = r.task.id;
    if (s.repositories != r.repositories_stored) (void)store_->set_task_repositories(id, s.repositories);
    if (r.stop == StopWhy::shutdown) {
        if (auto st = store_->requeue(id, "checkpointed when the daemon stopped; resumes when it starts"); !st.ok())
            log("task " + std::to_string(id) + ": cannot checkpoint: " + st.error().message);
        else
            log("task " + std::to_string(id) + " checkpointed");
        return;
    }
    auto rec = store_->get_task(id);
    const TaskCounters c = rec.ok() ? rec->counters : TaskCounters{};
    TaskStatus status = TaskStatus::succeeded;
    std::string reason;
    if (r.stop == StopWhy::cancel) {
        status = TaskStatus::stopped;
        reason = owner_exists(r.task) ? "stopped on request" : "stopped: its rule or replication group was deleted";
    } else {
        std::string errors;
        for (const auto& e : s.errors) errors += (errors.empty() ? "" : "; ") + e;
        const bool some_done = c.copied + c.skipped > 0;
        if (!errors.empty() || c.failed > 0) {
            status = some_done ? TaskStatus::partially_failed : TaskStatus::failed;
            reason = errors;
            if (c.failed > 0)
                reason += (reason.empty() ? "" : "; ") + std::to_string(c.failed) + " artifact" + (c.failed == 1 ? "" : "s") +
                          " failed (see the task log)";
        }
    }
    if (auto st = store_->finish_task(id, status, reason); !st.ok())
        log("task " + std::to_string(id) + ": cannot record its end: " + st.error().message);
    else
        notify_task_end(id);
    std::error_code ec;
    std::filesystem::remove_all(cache_dir_of(id), ec);
    ++finished_by_status_[std::string(to_string(status))];
    log("task " + std::to_string(id) + " " + std::string(to_string(status)) + ": " + std::to_string(c.copied) + " copied, " +
        std::to_string(c.skipped) + " skipped, " + std::to_string(c.failed) + " failed, " +
        format_bytes(double(c.bytes)) + " in " + std::to_string(static_cast<long>(s.duration_s * 1000)) + " ms" +
        (reason.empty() ? "" : "; " + reason));
}

std::string Daemon::cache_dir_of(int64_t task_id) const {
    return (std::filesystem::path(o_.state_dir) / "cache" / ("task-" + std::to_string(task_id))).string();
}

// Caches of tasks that can no longer resume (finished, pruned, or from an older layout).
void Daemon::remove_stale_caches() {
    std::error_code ec;
    const std::filesystem::path root = std::filesystem::path(o_.state_dir) / "cache";
    for (auto it = std::filesystem::directory_iterator(root, ec); !ec && it != std::filesystem::directory_iterator();
         it.increment(ec)) {
        const std::string name = it->path().filename().string();
        bool keep = false;
        if (name.starts_with("task-")) {
            int64_t id = 0;
            const char* b = name.data() + 5;
            const char* e = name.data() + name.size();
            if (std::from_chars(b, e, id).ptr == e)
                if (auto t = store_->get_task(id); t.ok() && !is_terminal(t->status)) keep = true;
        }
        if (!keep) {
            std::error_code rm;
            std::filesystem::remove_all(it->path(), rm);
        }
    }
}

SharedLink& Daemon::shared_link(const std::string& key, const Link& l) {
    const auto now = planner::Clock::now();
    const double rate = static_cast<double>(l.rate_bytes_per_s);
    auto it = links_.find(key);
    if (it == links_.end()) {
        SharedLink fresh{std::make_shared<planner::LinkShares>(rate, l.burst_bytes, now),
                         std::make_shared<planner::LinkShares>(rate, l.burst_bytes, now)};
        it = links_.emplace(key, std::move(fresh)).first;
    } else if (it->second.down->rate_bytes_per_s() != rate) {  // the cap was changed
        it->second.down->set_rate(rate, l.burst_bytes, now);
        it->second.up->set_rate(rate, l.burst_bytes, now);
    }
    return it->second;
}

json Daemon::live_progress(int64_t task_id) {
    auto it = running_.find(task_id);
    if (it == running_.end()) return nullptr;
    const MirrorProgress& p = *it->second->progress;
    return json{{"repositories", p.repositories.load()},
                {"repositories_scanned", p.repositories_scanned.load()},
                {"artifacts_done", p.artifacts_done.load()},
                {"artifacts_in_progress", p.artifacts_in_progress.load()},
                {"bytes_read", p.bytes_read.load()},
                {"bytes_sent", p.bytes_sent.load()}};
}

netio::HttpResponse Daemon::serve_tcp(const netio::HttpRequest& req) {
    static constexpr std::string_view kWebhooks = "/v1/webhooks/";
    if (req.path.starts_with(kWebhooks) && req.path.size() > kWebhooks.size()) {
        if (req.method != "POST") {
            netio::HttpResponse r = netio::HttpResponse::json_error(405, "webhooks are POSTed");
            r.headers.emplace_back("Allow", "POST");
            return r;
        }
        return receive_webhook(req, req.path.substr(kWebhooks.size()));
    }
    if (req.method != "GET" && req.method != "HEAD") {
        netio::HttpResponse r = netio::HttpResponse::json_error(405, "only GET and HEAD are served here");
        r.headers.emplace_back("Allow", "GET, HEAD");
        return r;
    }
    if (req.path == "/healthz") {
        auto v = store_->schema_version();
        netio::HttpResponse r;
        r.status = v.ok() ? 200 : 503;
        r.body = json{{"status", v.ok() ? "ok" : "unhealthy"},
                      {"tasks_running", running_.size()},
                      {"tasks_queued", queue_.size()}}
                     .dump() +
                 "\n";
        return r;
    }
    if (req.path == "/metrics") {
        netio::HttpResponse r;
        r.headers.emplace_back("Content-Type", "text/plain; version=0.0.4; charset=utf-8");
        r.body = metrics();
        return r;
    }
    return netio::HttpResponse::json_error(
        404, "not found: " + quote_input(req.path) + " (this port serves /healthz, /metrics and POST /v1/webhooks/{registry})");
}

// The control API, plus the one route that talks to registries and so cannot be synchronous.
netio::Task<netio::HttpResponse> Daemon::serve_unix(netio::HttpRequest& req) {
    static constexpr std::string_view kGroups = "/v1/replications/";
    static constexpr std::string_view kWhere = "/where";
    if (req.path.starts_with(kGroups) && req.path.ends_with(kWhere) &&
        req.path.size() > kGroups.size() + kWhere.size() && (req.method == "GET" || req.method == "HEAD")) {
        std::string ref = req.path.substr(kGroups.size(), req.path.size() - kGroups.size() - kWhere.size());
        std::string image;
        for (const auto& [k, v] : parse_query(req.query))
            if (k == "image") image = v;
        netio::HttpResponse r = co_await where(std::move(ref), std::move(image));
        co_return r;
    }
    co_return api_->handle(req);
}

std::string Daemon::metrics() {
    std::string out;
    auto family = [&](const char* name, const char* type, const char* help) {
        out += std::string("# HELP ") + name + " " + help + "\n# TYPE " + name + " " + type + "\n";
    };
    auto sample = [&](const std::string& name, uint64_t v) { out += name + " " + std::to_string(v) + "\n"; };
    family("crossdock_build_info", "gauge", "Version of the running daemon.");
    sample(std::string("crossdock_build_info{version=\"") + kVersion + "\"}", 1);
    family("crossdock_tasks_running", "gauge", "Tasks running now.");
    sample("crossdock_tasks_running", running_.size());
    family("crossdock_tasks_queued", "gauge", "Tasks waiting to start.");
    sample("crossdock_tasks_queued", queue_.size());
    family("crossdock_tasks_started_total", "counter", "Task runs started since the daemon started.");
    sample("crossdock_tasks_started_total", tasks_started_);
    family("crossdock_tasks_finished_total", "counter", "Tasks finished since the daemon started, by status.");
    for (const char* st : {"Succeeded", "PartiallyFailed", "Failed", "Stopped"}) {
        auto it = finished_by_status_.find(st);
        sample(std::string("crossdock_tasks_finished_total{status=\"") + st + "\"}", it == finished_by_status_.end() ? 0 : it->second);
    }
    family("crossdock_artifacts_total", "counter", "Artifacts logged by tasks since the daemon started, by action.");
    for (const char* a : {"copied", "skipped: exists", "skipped: same digest", "failed"}) {
        auto it = artifacts_by_action_.find(a);
        sample(std::string("crossdock_artifacts_total{action=\"") + a + "\"}", it == artifacts_by_action_.end() ? 0 : it->second);
    }
    family("crossdock_bytes_copied_total", "counter", "Blob bytes uploaded by copied artifacts since the daemon started.");
    sample("crossdock_bytes_copied_total", bytes_copied_);
    uint64_t read = 0, sent = 0;
    for (auto& [id, r] : running_) {
        read += r->progress->bytes_read.load();
        sent += r->progress->bytes_sent.load();
    }
    family("crossdock_running_bytes_read", "gauge", "Bytes read from sources by the running tasks so far.");
    sample("crossdock_running_bytes_read", read);
    family("crossdock_running_bytes_sent", "gauge", "Bytes sent to targets by the running tasks so far.");
    sample("crossdock_running_bytes_sent", sent);
    return out;
}

}  // namespace daemon_detail

int run_daemon(const DaemonOptions& options) {
    daemon_detail::Daemon d(options);
    return d.run();
}

}  // namespace engine
