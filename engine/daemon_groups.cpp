// Replication groups in the daemon: a group's task is one mirror run from the primary to every
// replica (each blob read once, streamed to all replicas in parallel), the status of each replica,
// and `where`: which replicas hold an image, by digest.
#include <algorithm>

#include "engine/daemon_impl.h"
#include "engine/reference.h"
#include "engine/registry_client.h"

namespace engine::daemon_detail {

netio::Result<std::shared_ptr<MirrorOptions>> Daemon::group_mirror_options(const ReplicationGroup& g, Running& r) {
    auto primary = store_->get_registry(g.primary_id);
    if (!primary.ok()) return primary.error();
    auto o = base_options(o_);
    auto src_host = add_endpoint(*o, primary.value(), true, std::nullopt);
    if (!src_host.ok()) return src_host.error();
    o->source = RegistryRef{src_host.value(), ""};
    for (int64_t id : g.replica_ids) {
        auto replica = store_->get_registry(id);
        if (!replica.ok()) return replica.error();
        auto host = add_endpoint(*o, replica.value(), false, std::nullopt);
        if (!host.ok()) return host.error();
        o->targets.push_back(RegistryRef{host.value(), ""});
        r.target_names[o->targets.back().to_string()] = replica->name;
        share_link(*o, r, primary.value(), replica.value());
    }
    // Each replica's own credentials are in its transport entry (by host); one shared
    // target_credentials would be wrong for replicas in other accounts.
    o->target_credentials.reset();
    o->overwrite = true;
    for (const auto& s : r.task.scope) o->only.push_back({s.repository, s.tag, s.digest, s.remove});
    return o;
}

// Per replica: InSync, Lagging (artifacts and bytes behind) or Failing (the last error), from the
// group's tasks: queued and running ones are what the replicas lag by; the newest finished one
// says whether each replica failed.
json Daemon::group_status(const ReplicationGroup& g) {
    TaskQuery q;
    q.group_id = g.id;
    q.limit = 20;
    auto page = store_->list_tasks(q);
    std::vector<TaskRecord> tasks = page.ok() ? page->tasks : std::vector<TaskRecord>{};

    // Pending work shared by every replica.
    uint64_t artifacts_behind = 0;
    bool full_scan_pending = false;
    uint64_t bytes_behind = 0;
    for (const auto& t : tasks) {
        if (t.status != TaskStatus::queued && t.status != TaskStatus::in_progress) continue;
        if (t.scope.empty()) full_scan_pending = true;
        artifacts_behind += t.scope.size();
        if (auto it = running_.find(t.id); it != running_.end()) {
            const MirrorProgress& p = *it->second->progress;
            const uint64_t planned = p.bytes_planned.load(), sent = p.bytes_sent.load();
            bytes_behind += planned > sent ? planned - sent : 0;
        }
    }
    if (auto ev = store_->pending_events(now_ms(), 5000); ev.ok())
        for (const auto& e : ev.value())
            if (e.registry_id == g.primary_id) ++artifacts_behind;

    json replicas = json::array();
    for (size_t i = 0; i < g.replicas.size(); ++i) {
        const std::string& name = g.replicas[i];
        json rep{{"registry", name}};
        // The newest finished task's outcome for this replica.
        const TaskRecord* last = nullptr;
        for (const auto& t : tasks)
            if (is_terminal(t.status)) {
                last = &t;
                break;
            }
        std::string last_error;
        uint64_t failed = 0;
        if (last) {
            ItemQuery iq;
            iq.action = ItemAction::failed;
            iq.limit = Store::kMaxPageSize;
            if (auto items = store_->list_items(last->id, iq); items.ok())
                for (const auto& it : items->items)
                    if (it.target == name) {
                        ++failed;
                        last_error = it.repository + ":" + it.tag + ": " + it.reason;
                    }
            if (last->status == TaskStatus::failed && failed == 0 && last->counters.failed == 0) last_error = last->reason;
            rep["last_task"] = json{{"id", last->id},
                                    {"status", to_string(last->status)},
                                    {"finished", last->finished ? json(format_time(*last->finished)) : json(nullptr)}};
        }
        if (!last_error.empty()) {
            rep["state"] = "Failing";
            rep["last_error"] = last_error;
            rep["failed_artifacts"] = failed;
        } else if (artifacts_behind > 0 || full_scan_pending) {
            rep["state"] = "Lagging";
            rep["artifacts_behind"] = artifacts_behind;
            rep["full_scan_pending"] = full_scan_pending;
            rep["bytes_behind"] = bytes_behind;
        } else {
            rep["state"] = last ? "InSync" : "Unknown";
        }
        replicas.push_back(std::move(rep));
    }
    json history = json::array();
    for (const auto& t : tasks)
        history.push_back(json{{"id", t.id},
                               {"trigger", to_string(t.trigger)},
                               {"status", to_string(t.status)},
                               {"created", format_time(t.created)},
                               {"finished", t.finished ? json(format_time(*t.finished)) : json(nullptr)},
                               {"copied", t.counters.copied},
                               {"failed", t.counters.failed},
                               {"bytes", t.counters.bytes}});
    return json{{"name", g.name}, {"primary", g.primary}, {"replicas", std::move(replicas)}, {"tasks", std::move(history)}};
}

// Which replicas hold IMAGE ("repo:tag" or "repo@sha256:..."): the primary's digest and each
// replica's, asked of the registries now (HEAD of the manifest).
netio::Task<netio::HttpResponse> Daemon::where(std::string group_ref, std::string image) {
    auto group = find_group(*store_, group_ref);
    if (!group.ok()) {
        netio::HttpResponse r = netio::HttpResponse::json_error(
            kind_of(group.error()) == ErrorKind::not_found ? 404 : 500, group.error().message);
        co_return r;
    }
    // repo:tag or repo@digest
    std::string repo = image, reference;
    if (const size_t at = image.find('@'); at != std::string::npos) {
        repo = image.substr(0, at);
        reference = image.substr(at + 1);
    } else if (const size_t colon = image.rfind(':'); colon != std::string::npos && image.find('/', colon) == std::string::npos) {
        repo = image.substr(0, colon);
        reference = image.substr(colon + 1);
    } else {
        reference = "latest";
    }
    if (repo.empty() || reference.empty() || !parse_registry_ref("x/" + repo).ok()) {
        netio::HttpResponse r = netio::HttpResponse::json_error(
            400, "image: expected REPOSITORY:TAG or REPOSITORY@DIGEST, got " + quote_input(image));
        co_return r;
    }
    std::vector<int64_t> ids{group->primary_id};
    ids.insert(ids.end(), group->replica_ids.begin(), group->replica_ids.end());
    std::vector<std::pair<std::string, std::optional<std::string>>> found;  // name, digest
    std::vector<std::string> errors(ids.size());
    for (size_t i = 0; i < ids.size(); ++i) {
        auto reg = store_->get_registry(ids[i]);
        if (!reg.ok()) {
            found.emplace_back("#" + std::to_string(ids[i]), std::nullopt);
            errors[i] = reg.error().message;
            continue;
        }
        MirrorOptions scratch;
        auto host = add_endpoint(scratch, reg.value(), true, std::nullopt);
        if (!host.ok()) {
            found.emplace_back(reg->name, std::nullopt);
            errors[i] = host.error().message;
            continue;
        }
        const RegistryTransport& tr = scratch.transports[host.value()];
        RegistryOptions ro;
        ro.host = host.value();
        ro.scheme = tr.scheme;
        ro.insecure = tr.insecure;
        ro.ca_file = tr.ca_file;
        ro.credentials = tr.credentials;
        ro.request_timeout_ms = 10000;
        RegistryClient client(*http_, ro);
        std::optional<std::string> digest;
        auto reached = co_await client.ping();
        if (!reached.ok()) {
            errors[i] = reached.error().message;
        } else {
            auto head = co_await client.head_manifest(repo, reference);
            if (!head.ok()) errors[i] = head.error().message;
            else if (head.value()) digest = head.value()->digest;
        }
        found.emplace_back(reg->name, digest);
    }
    const std::optional<std::string> primary_digest = found[0].second;
    json replicas = json::array();
    for (size_t i = 1; i < found.size(); ++i) {
        json rep{{"registry", found[i].first},
                 {"digest", found[i].second ? json(*found[i].second) : json(nullptr)},
                 {"present", found[i].second.has_value()},
                 {"same_as_primary", primary_digest && found[i].second == primary_digest}};
        if (!errors[i].empty()) rep["error"] = errors[i];
        replicas.push_back(std::move(rep));
    }
    json primary{{"registry", found[0].first}, {"digest", primary_digest ? json(*primary_digest) : json(nullptr)}};
    if (!errors[0].empty()) primary["error"] = errors[0];
    netio::HttpResponse r;
    r.body = json{{"image", repo + (image.find('@') != std::string::npos ? "@" : ":") + reference},
                  {"primary", std::move(primary)},
                  {"replicas", std::move(replicas)}}
                 .dump() +
             "\n";
    co_return r;
}

}  // namespace engine::daemon_detail
