#include "engine/mirror.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <limits>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <list>
#include <map>
#include <nlohmann/json.hpp>
#include <set>

#include "cas/blob_store.h"
#include "cas/digest.h"
#include "engine/blob_transfer.h"
#include "engine/manifest.h"
#include "engine/registry_client.h"
#include "engine/throttle.h"
#include "planner/stream_tuner.h"
#include "planner/token_bucket.h"
#include "netio/task.h"
#include "netio/unique_fd.h"

namespace engine {

using netio::Task;

netio::Result<Filters> compile_filters(const std::string& repo_regex, const std::string& tag_regex,
                                       const std::string& type) {
    Filters f;
    auto compile = [](const std::string& flag, const std::string& pattern) -> netio::Result<std::shared_ptr<RE2>> {
        if (pattern.empty()) return std::shared_ptr<RE2>{};
        RE2::Options o;
        o.set_log_errors(false);
        auto re = std::make_shared<RE2>(pattern, o);
        if (!re->ok()) {
            return netio::Error{std::make_error_code(std::errc::invalid_argument),
                                "invalid " + flag + " regular expression '" + pattern + "': " + re->error() +
                                    (re->error_arg().empty() ? "" : " at '" + re->error_arg() + "'")};
        }
        return re;
    };
    auto repo = compile("--repo", repo_regex);
    if (!repo.ok()) return repo.error();
    auto tag = compile("--tag", tag_regex);
    if (!tag.ok()) return tag.error();
    f.repo = repo.value();
    f.tag = tag.value();
    if (type == "all" || type.empty()) f.type = TypeFilter::all;
    else if (type == "image") f.type = TypeFilter::image;
    else if (type == "helm") f.type = TypeFilter::helm;
    else
        return netio::Error{std::make_error_code(std::errc::invalid_argument),
                            "invalid --type '" + type + "': expected image, helm or all"};
    return f;
}

std::string MirrorSummary::to_json() const {
    nlohmann::json j;
    j["dry_run"] = dry_run;
    j["repositories"] = repositories;
    j["copied"] = copied;
    j["skipped"] = skipped;
    j["failed"] = failed;
    j["bytes_copied"] = bytes_copied;
    j["bytes_read_source"] = bytes_read_source;
    j["blobs_uploaded"] = blobs_uploaded;
    j["blobs_mounted"] = blobs_mounted;
    j["blobs_existing"] = blobs_existing;
    j["blobs_from_cache"] = blobs_from_cache;
    j["duration_s"] = duration_s;
    j["errors"] = errors;
    auto& arr = j["items"] = nlohmann::json::array();
    for (const auto& it : items) {
        arr.push_back({{"target", it.target}, {"repository", it.repository}, {"tag", it.tag}, {"digest", it.digest},
                       {"type", it.type}, {"action", it.action}, {"reason", it.reason}, {"bytes", it.bytes}});
    }
    // Registry-provided text may not be UTF-8: replace, never throw.
    return j.dump(2, ' ', false, nlohmann::json::error_handler_t::replace);
}

std::string format_bytes(double b) {
    const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    int u = 0;
    while (b >= 1024 && u < 4) {
        b /= 1024;
        ++u;
    }
    char buf[32];
    std::snprintf(buf, sizeof buf, u == 0 ? "%.0f %s" : "%.1f %s", b, units[u]);
    return buf;
}

namespace {

using netio::Flight;

struct Target {
    RegistryRef ref;
    std::shared_ptr<Throttle> throttle;  // uploads to this target (null: no cap)
    std::string label;  // host/ns for messages
    std::unique_ptr<RegistryClient> client;
    std::optional<std::string> down;  // unreachable at the start (one of several targets): why
    std::map<std::string, std::unique_ptr<Flight>> blob_flights;   // repo@digest -> ensure in flight/done
    std::map<std::string, std::string> digest_home;                // digest -> a repo known to hold it
    std::map<std::string, std::pair<std::string, Flight*>> digest_inflight;  // digest -> (repo, flight)
};

class Mirror {
public:
    explicit Mirror(const MirrorOptions& o)
        : opts_(o),
          http_(loop_),
          list_sem_(loop_, 4 * std::max(1u, o.jobs)),
          tag_sem_(loop_, 8 * std::max(1u, o.jobs)),
          blob_sem_(loop_, 2 * std::max(1u, o.jobs)),
          fill_sem_(loop_, std::max(1u, o.jobs)),
          small_fill_sem_(loop_, std::max(1u, o.jobs)) {}

    MirrorSummary run() {
        auto t0 = std::chrono::steady_clock::now();
        summary_.dry_run = opts_.dry_run;
        if (!setup_cache()) return finish(t0);
        netio::OpId progress_timer;
        if (opts_.progress_tty && opts_.log) progress_timer = schedule_progress();
        if (opts_.cancel || opts_.progress) schedule_watch();
        netio::run_blocking(loop_, main_task());
        if (progress_timer) loop_.cancel_timer(progress_timer_);
        if (tuner_timer_) loop_.cancel_timer(tuner_timer_);
        if (watch_timer_) loop_.cancel_timer(watch_timer_);
        publish_progress();
        progress_stop_ = true;
        if (opts_.progress_tty && opts_.log) std::fprintf(opts_.log, "\r\033[K");
        return finish(t0);
    }

private:
    MirrorSummary finish(std::chrono::steady_clock::time_point t0) {
        for (const auto& it : summary_.items) {
            if (it.action == "copied" || it.action == "would-copy" || it.action == "deleted") ++summary_.copied;
            else if (it.action == "skipped") ++summary_.skipped;
            else if (it.action == "failed") ++summary_.failed;
        }
        summary_.duration_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        failed_blobs_.clear();
        cas_.reset();
        if (remove_cache_dir_) {
            std::error_code ec;
            std::filesystem::remove_all(cache_dir_, ec);
        }
        return std::move(summary_);
    }

    bool setup_cache() {
        std::error_code ec;
        if (opts_.cache_dir.empty()) {
            auto base = std::filesystem::temp_directory_path(ec);
            if (ec) base = "/tmp";
            std::string tmpl = (base / "crossdock-cache-XXXXXX").string();
            if (!::mkdtemp(tmpl.data())) {
                summary_.errors.push_back("cannot create a cache directory under " + base.string() + ": " +
                                          std::strerror(errno));
                return false;
            }
            cache_dir_ = tmpl;
            remove_cache_dir_ = true;
        } else {
            cache_dir_ = opts_.cache_dir;
        }
        try {
            cas::BlobStoreOptions co;
            co.dir = cache_dir_;
            co.cap_bytes = opts_.cache_cap_bytes;
            co.durable = !remove_cache_dir_;  // a throw-away cache needs no fsync
            cas_ = std::make_unique<cas::BlobStore>(loop_, co);
        } catch (const std::exception& e) {
            summary_.errors.push_back("cannot open the blob cache in " + cache_dir_ + ": " + e.what());
            return false;
        }
        return true;
    }

    void log(const std::string& line) {
        if (!opts_.log) return;
        if (opts_.progress_tty) std::fprintf(opts_.log, "\r\033[K%s\n", line.c_str());
        else std::fprintf(opts_.log, "%s\n", line.c_str());
        std::fflush(opts_.log);
    }

    netio::OpId schedule_progress() {
        progress_timer_ = loop_.add_timer(std::chrono::milliseconds(250), [this] {
            if (progress_stop_) return;
            draw_progress();
            schedule_progress();
        });
        return progress_timer_;
    }

    // The daemon's hooks: a cancel request stops the run; live figures are published.
    void schedule_watch() {
        watch_timer_ = loop_.add_timer(std::chrono::milliseconds(100), [this] {
            if (progress_stop_) return;
            if (opts_.cancel && opts_.cancel->load() && !summary_.cancelled) {
                summary_.cancelled = true;
                stop_ = true;
                http_.shutdown();
            }
            publish_progress();
            schedule_watch();
        });
    }

    void publish_progress() {
        if (!opts_.progress) return;
        MirrorProgress& p = *opts_.progress;
        p.repositories = summary_.repositories;
        p.repositories_scanned = repos_scanned_;
        p.artifacts_done = summary_.items.size();
        p.artifacts_in_progress = in_progress_;
        p.bytes_read = live_read_;
        p.bytes_sent = live_sent_;
        p.bytes_planned = planned_bytes_;
    }

    void draw_progress() {
        auto now = std::chrono::steady_clock::now();
        double secs = std::chrono::duration<double>(now - rate_t0_).count();
        if (secs >= 1.0) {
            rate_ = static_cast<double>(moved_bytes() - rate_bytes0_) / secs;
            rate_t0_ = now;
            rate_bytes0_ = moved_bytes();
        }
        std::string line = "scanned " + std::to_string(repos_scanned_) + "/" + std::to_string(summary_.repositories) +
                           " repos, " + std::to_string(summary_.items.size()) + " artifacts done, " +
                           std::to_string(in_progress_) + " in progress | read " + format_bytes(double(live_read_)) +
                           ", sent " + format_bytes(double(moved_bytes())) + ", " + format_bytes(rate_) + "/s";
        uint64_t pending = planned_bytes_ > moved_bytes() ? planned_bytes_ - moved_bytes() : 0;
        if (rate_ > 1 && pending > 0) {
            auto eta = static_cast<long>(double(pending) / rate_);
            char buf[32];
            std::snprintf(buf, sizeof buf, ", ETA %ld:%02ld", eta / 60, eta % 60);
            line += buf;
        }
        std::fprintf(opts_.log, "\r\033[K%s", line.c_str());
        std::fflush(opts_.log);
    }

    // Bytes handed to target uploads so far (retries count again): what the rate and ETA follow.
    uint64_t moved_bytes() const { return live_sent_; }

    std::optional<Credentials> credentials_for(const std::string& host, const std::optional<Credentials>& flag) {
        if (flag) return flag;
        auto found = lookup_docker_config(host, opts_.auth_files);
        if (!found.ok()) {
            summary_.errors.push_back(found.error().message);
            return std::nullopt;
        }
        return found.value();
    }

    RegistryOptions registry_options(const std::string& host, const std::optional<Credentials>& flag) {
        RegistryOptions ro;
        ro.host = host;
        ro.insecure = opts_.insecure;
        ro.ca_file = opts_.ca_file;
        if (auto it = opts_.transports.find(host); it != opts_.transports.end()) {
            ro.scheme = it->second.scheme;
            ro.insecure = it->second.insecure;
            ro.ca_file = it->second.ca_file;
            if (it->second.credentials) ro.credentials = it->second.credentials;
        }
        ro.credentials = credentials_for(host, flag);
        ro.chunk_size_bytes = opts_.chunk_size_bytes;
        return ro;
    }

    Task<void> main_task() {
        RegistryOptions source_options = registry_options(opts_.source.host, opts_.source_credentials);
        // The tighter of the run's own cap and the shared link's.
        double source_cap = opts_.bandwidth_bytes_per_s;
        if (const double shared = opts_.shared_source ? opts_.shared_source->rate_bytes_per_s() : 0.0; shared > 0)
            source_cap = source_cap > 0 ? std::min(source_cap, shared) : shared;
        source_capped_ = source_cap > 0;
        if (source_cap > 0) {
            // Receive buffers of ~0.1 s of the cap shared by the downloads, so that pausing a
            // download stops the sender soon and the cap holds on the link, not just in our reads.
            const double per_conn = source_cap * 0.1 / std::max(1u, opts_.jobs);
            source_options.socket_recv_buffer_bytes = static_cast<int>(std::clamp(per_conn, 64.0 * 1024, 4.0 * 1024 * 1024));
        }
        source_ = std::make_unique<RegistryClient>(http_, std::move(source_options));
        for (const auto& t : opts_.targets) {
            auto tg = std::make_unique<Target>();
            tg->ref = t;
            if (opts_.target_namespace) tg->ref.ns = *opts_.target_namespace;
            tg->label = tg->ref.host + (tg->ref.ns.empty() ? "" : "/" + tg->ref.ns);
            tg->client = std::make_unique<RegistryClient>(http_, registry_options(t.host, opts_.target_credentials));
            targets_.push_back(std::move(tg));
        }
        if (!summary_.errors.empty()) co_return;
        setup_planner();

        // Reach every registry before any work, all at once (each is a round trip or more away).
        netio::Status source_ping = netio::ok_status();
        std::vector<netio::Status> target_pings(targets_.size(), netio::ok_status());
        {
            netio::WaitGroup pings(loop_);
            pings.add();
            netio::spawn(run_into(source_->ping(), source_ping, pings));
            for (size_t i = 0; i < targets_.size(); ++i) {
                pings.add();
                netio::spawn(run_into(targets_[i]->client->ping(), target_pings[i], pings));
            }
            co_await pings.wait();
        }
        if (!source_ping.ok()) {
            summary_.errors.push_back("source " + source_ping.error().message);
            co_return;
        }
        // A target that cannot be reached fails the run when it is the only one; one of several
        // gets a failed item per artifact and the others are served.
        size_t down = 0;
        for (size_t i = 0; i < targets_.size(); ++i) {
            if (!target_pings[i].ok()) {
                targets_[i]->down = "target " + target_pings[i].error().message;
                ++down;
            }
        }
        if (down == targets_.size()) {
            for (auto& t : targets_) summary_.errors.push_back(*t->down);
            co_return;
        }

        if (!opts_.only.empty()) {
            co_await run_only();
            co_return;
        }
        log("listing repositories of " + opts_.source.host + (opts_.source.ns.empty() ? "" : "/" + opts_.source.ns));
        auto cat = co_await source_->catalog();
        if (!cat.ok()) {
            summary_.errors.push_back("listing the source catalog: " + cat.error().message);
            co_return;
        }
        std::vector<std::string> repos;
        const std::string prefix = opts_.source.ns.empty() ? "" : opts_.source.ns + "/";
        for (const auto& r : cat.value()) {
            if (!prefix.empty() && !r.starts_with(prefix)) continue;
            std::string rel = r.substr(prefix.size());
            if (rel.empty()) continue;
            if (opts_.filters.repo && !RE2::FullMatch(rel, *opts_.filters.repo)) continue;
            repos.push_back(rel);
        }
        summary_.repositories = repos.size();
        log("found " + std::to_string(repos.size()) + " matching repositories (of " + std::to_string(cat->size()) +
            " in the catalog)");

        netio::WaitGroup wg(loop_);
        for (const auto& rel : repos) {
            if (stop_) break;
            wg.add();
            netio::spawn(guarded(scan_repo(rel, wg), wg));
        }
        co_await wg.wait();
        co_await fills_.wait();  // every download has settled before the cache is closed
    }

    // A run limited to named artifacts: no catalog or tag listing, the filters still apply.
    Task<void> run_only() {
        std::set<std::string> repos;
        netio::WaitGroup wg(loop_);
        for (const auto& a : opts_.only) {
            if (stop_) break;
            if (opts_.filters.repo && !RE2::FullMatch(a.repository, *opts_.filters.repo)) continue;
            repos.insert(a.repository);
            if (a.remove) {
                wg.add();
                netio::spawn(guarded(delete_on_targets(a.repository, a.digest), wg));
                continue;
            }
            if (a.tag.empty() || (opts_.filters.tag && !RE2::FullMatch(a.tag, *opts_.filters.tag))) continue;
            wg.add();
            netio::spawn(guarded(copy_tag(a.repository, a.tag), wg));
        }
        summary_.repositories = repos.size();
        repos_scanned_ = repos.size();
        co_await wg.wait();
        co_await fills_.wait();
    }

    // Replicates a delete: the manifest `digest` goes from every target that has it.
    Task<void> delete_on_targets(std::string rel, std::string digest) {
        for (auto& t : targets_) {
            const auto t0 = std::chrono::steady_clock::now();
            const std::string dst_repo = join_repo(t->ref.ns, rel);
            MirrorItem item{t->label, rel, "", digest, "", "", "", 0};
            if (t->down) {
                item.action = "failed";
                item.reason = *t->down;
                record(std::move(item), t0);
                continue;
            }
            auto head = co_await t->client->head_manifest(dst_repo, digest);
            if (!head.ok()) {
                item.action = "failed";
                item.reason = head.error().message;
            } else if (!head.value()) {
                item.action = "skipped";
                item.reason = "already absent on the target";
            } else if (opts_.dry_run) {
                item.action = "would-copy";
                item.reason = "would delete";
            } else {
                auto st = co_await t->client->delete_manifest(dst_repo, digest);
                item.action = st.ok() ? "deleted" : "failed";
                if (!st.ok()) item.reason = "deleting: " + st.error().message;
            }
            record(std::move(item), t0);
        }
    }

    // Links: "source" (every download) and "target:<host/ns>" (uploads to one target), each capped
    // at --bandwidth; with --streams auto, a tuner sampled once a second sets the download streams.
    void setup_planner() {
        const auto now = planner::Clock::now();
        const bool capped = opts_.bandwidth_bytes_per_s > 0;
        if (capped) {
            // Burst: 50 ms worth, at least 256 KiB, so pauses are short and the average exact.
            const auto burst = std::max<uint64_t>(256u << 10, static_cast<uint64_t>(opts_.bandwidth_bytes_per_s / 20));
            limiter_.set_link("source", opts_.bandwidth_bytes_per_s, burst, now);
            // Uploads trail the download they follow (they start once its first chunk is
            // verified) and run at the same cap, so they could never catch up: their links keep
            // up to 2 s of unused rate, and an upload that waited for data may use it.
            const auto upload_burst = static_cast<uint64_t>(2 * opts_.bandwidth_bytes_per_s);
            for (auto& t : targets_)
                limiter_.set_link("target:" + t->label, opts_.bandwidth_bytes_per_s, upload_burst, now);
        }
        if (capped || opts_.shared_source)
            source_throttle_ = std::make_unique<Throttle>(loop_, limiter_, "source", opts_.shared_source, opts_.shared_member);
        if (capped || opts_.shared_target)
            for (auto& t : targets_)
                t->throttle = std::make_shared<Throttle>(loop_, limiter_, "target:" + t->label, opts_.shared_target,
                                                         opts_.shared_member);
        if (opts_.streams_auto) {
            // Sampled every 250 ms: a step (1 warm-up + 3 samples) takes about a second, so the
            // ramp reaches a WAN link's plateau while the first large blobs are still arriving.
            planner::StreamTunerConfig tc;
            tc.start_streams = std::max(2u, opts_.streams);
            tuner_ = std::make_unique<planner::StreamTuner>(1, 64, tc);
            tuner_last_bytes_ = live_read_;
            tuner_last_time_ = now;
            schedule_tuner();
        }
    }

    void schedule_tuner() {
        tuner_timer_ = loop_.add_timer(std::chrono::milliseconds(250), [this] {
            if (progress_stop_ || !tuner_) return;
            const auto now = planner::Clock::now();
            const double secs = std::chrono::duration<double>(now - tuner_last_time_).count();
            // Only intervals with downloads running say anything about the link.
            if (fills_active_ > 0 && secs > 0)
                tuner_->on_sample(static_cast<double>(live_read_ - tuner_last_bytes_) / secs, now);
            tuner_last_bytes_ = live_read_;
            tuner_last_time_ = now;
            schedule_tuner();
        });
    }

    // Streams one large blob's download should use now: the link's tuned total shared by the large
    // blobs being fetched (smaller ones take one stream each).
    unsigned streams_for_blob() const {
        if (!tuner_) return opts_.streams;
        const size_t fetching = std::max<size_t>(1, large_fills_active_);
        return std::max(1u, static_cast<unsigned>(tuner_->streams() / fetching));
    }

    // Runs `t`; an exception (a bug, or bad_alloc) becomes a global error, never a crash.
    Task<void> guarded(Task<void> t, netio::WaitGroup& wg) {
        try {
            co_await t;
        } catch (const std::exception& e) {
            summary_.errors.push_back(std::string("internal error: ") + e.what());
        }
        wg.done();
    }

    Task<void> scan_repo(std::string rel, netio::WaitGroup& wg) {
        std::vector<std::string> tags;
        {
            co_await list_sem_.acquire();
            netio::Semaphore::Permit permit(&list_sem_);
            auto res = co_await source_->tags(join_repo(opts_.source.ns, rel));
            ++repos_scanned_;
            if (!res.ok()) {
                fail_all_targets(rel, "", "", "", "listing tags: " + res.error().message);
                co_return;
            }
            for (auto& t : res.value())
                if (!opts_.filters.tag || RE2::FullMatch(t, *opts_.filters.tag)) tags.push_back(std::move(t));
        }
        if (!opts_.progress_tty)
            log("scanned " + std::to_string(repos_scanned_) + "/" + std::to_string(summary_.repositories) + ": " + rel + " (" +
                std::to_string(tags.size()) + " matching tags)");
        for (auto& tag : tags) {
            if (stop_) break;
            wg.add();
            netio::spawn(guarded(copy_tag(rel, tag), wg));
        }
    }

    // `started`: when the work on the item began, for its duration.
    void record(MirrorItem item, std::optional<std::chrono::steady_clock::time_point> started = {}) {
        if (started)
            item.duration_ms = static_cast<uint64_t>(
                std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - *started).count());
        std::string line = item.action + " " + item.repository + ":" + item.tag + " -> " + item.target;
        if (!item.digest.empty()) line += " (" + item.digest.substr(0, 19) + ")";
        if (item.bytes) line += " " + format_bytes(double(item.bytes));
        if (!item.reason.empty()) line += ": " + item.reason;
        log(line);
        if (item.action == "failed" && opts_.fail_fast) stop_ = true;
        if (opts_.on_item && !(summary_.cancelled && item.action == "failed")) opts_.on_item(item);
        summary_.items.push_back(std::move(item));
    }

    void fail_all_targets(const std::string& rel, const std::string& tag, const std::string& digest,
                          const std::string& type, const std::string& reason) {
        for (auto& t : targets_) record({t->label, rel, tag, digest, type, "failed", reason, 0});
    }

    Task<void> copy_tag(std::string rel, std::string tag) {
        co_await tag_sem_.acquire();
        netio::Semaphore::Permit permit(&tag_sem_);
        if (stop_) co_return;
        ++in_progress_;
        struct Done {
            size_t& n;
            ~Done() { --n; }
        } done{in_progress_};
        const std::string src_repo = join_repo(opts_.source.ns, rel);
        auto got = co_await source_->get_manifest(src_repo, tag);
        if (!got.ok()) {
            fail_all_targets(rel, tag, "", "", got.error().message);
            co_return;
        }
        if (!got.value()) {
            for (auto& t : targets_) record({t->label, rel, tag, "", "", "skipped", "vanished", 0});
            co_return;
        }
        ManifestData data = std::move(*got.value());
        auto parsed = parse_manifest(data.bytes, data.media_type);
        if (!parsed.ok()) {
            fail_all_targets(rel, tag, data.digest, "", "malformed manifest on the source: " + parsed.error().message);
            co_return;
        }
        const Manifest& m = parsed.value();
        const std::string type = m.type == ArtifactType::helm ? "helm" : "image";
        if ((opts_.filters.type == TypeFilter::image && m.type != ArtifactType::image) ||
            (opts_.filters.type == TypeFilter::helm && m.type != ArtifactType::helm))
            co_return;
        if (data.media_type.empty()) data.media_type = m.media_type;

        netio::WaitGroup wg(loop_);
        for (auto& t : targets_) {
            wg.add();
            netio::spawn(guarded(copy_to_target(*t, rel, tag, data, m, type), wg));
        }
        co_await wg.wait();
    }

    Task<void> copy_to_target(Target& t, std::string rel, std::string tag, const ManifestData& data,
                              const Manifest& m, std::string type) {
        const std::string dst_repo = join_repo(t.ref.ns, rel);
        const auto t0 = std::chrono::steady_clock::now();
        MirrorItem item{t.label, rel, tag, data.digest, type, "", "", 0};
        if (t.down) {
            item.action = "failed";
            item.reason = *t.down;
            record(std::move(item), t0);
            co_return;
        }
        auto head = co_await t.client->head_manifest(dst_repo, tag);
        if (!head.ok()) {
            item.action = "failed";
            item.reason = head.error().message;
            record(std::move(item), t0);
            co_return;
        }
        if (head.value()) {
            const auto& h = *head.value();
            if (h.digest == data.digest) {
                item.action = "skipped";
                item.reason = "same digest";
                record(std::move(item), t0);
                co_return;
            }
            if (!opts_.overwrite) {
                item.action = "skipped";
                item.reason = "exists";
                record(std::move(item), t0);
                co_return;
            }
        }
        uint64_t bytes = 0;
        // Two statements, not `c ? co_await a : co_await b`: gcc 12 miscompiles that (the result's
        // storage is destroyed before it is read).
        netio::Status st = netio::ok_status();
        if (opts_.dry_run) {
            st = co_await missing_bytes(t, rel, dst_repo, m, bytes);
        } else {
            st = co_await push_tree(t, rel, dst_repo, data, m, tag, bytes);
        }
        item.bytes = bytes;
        if (!st.ok()) {
            item.action = "failed";
            item.reason = st.error().message;
        } else {
            item.action = opts_.dry_run ? "would-copy" : "copied";
        }
        record(std::move(item), t0);
    }

    struct SourceManifest {
        ManifestData data;
        Manifest parsed;
    };

    // An index child the target lacks, fetched from the source and parsed (its media type filled
    // in from the content when the registry sent none); nullopt when the target already has it.
    Task<netio::Result<std::optional<SourceManifest>>> child_to_copy(Target& t, const std::string& src_repo,
                                                                    const std::string& dst_repo,
                                                                    const Descriptor& child) {
        auto h = co_await t.client->head_manifest(dst_repo, child.digest);
        if (!h.ok()) co_return h.error();
        if (h.value()) co_return std::optional<SourceManifest>{};
        auto cm = co_await source_->get_manifest(src_repo, child.digest);
        if (!cm.ok()) co_return cm.error();
        if (!cm.value()) co_return netio::Error::make("index child " + child.digest + " is missing on the source");
        ManifestData cd = std::move(*cm.value());
        auto parsed = parse_manifest(cd.bytes, cd.media_type);
        if (!parsed.ok())
            co_return netio::Error::make("malformed child manifest " + child.digest + ": " + parsed.error().message);
        if (cd.media_type.empty()) cd.media_type = parsed->media_type;
        std::optional<SourceManifest> out = SourceManifest{std::move(cd), std::move(parsed.value())};
        co_return out;
    }

    // Dry run: bytes of the blobs (of this manifest and its children) the target lacks.
    Task<netio::Status> missing_bytes(Target& t, std::string rel, std::string dst_repo, const Manifest& m,
                                      uint64_t& bytes) {
        const std::string src_repo = join_repo(opts_.source.ns, rel);
        if (m.kind == ManifestKind::index) {
            for (const auto& child : m.manifests) {
                auto next = co_await child_to_copy(t, src_repo, dst_repo, child);
                if (!next.ok()) co_return next.error();
                if (!next.value()) continue;
                auto st = co_await missing_bytes(t, rel, dst_repo, next.value()->parsed, bytes);
                if (!st.ok()) co_return st;
            }
            co_return netio::ok_status();
        }
        for (const auto& b : blobs_of(m)) {
            auto h = co_await t.client->head_blob(dst_repo, b.digest);
            if (!h.ok()) co_return h.error();
            if (!h.value()) bytes += b.size;
        }
        co_return netio::ok_status();
    }

    // Children before the index, blobs before a manifest, the reference (tag) last.
    Task<netio::Status> push_tree(Target& t, std::string rel, std::string dst_repo, const ManifestData& data,
                                  const Manifest& m, std::string reference, uint64_t& bytes) {
        const std::string src_repo = join_repo(opts_.source.ns, rel);
        if (m.kind == ManifestKind::index) {
            for (const auto& child : m.manifests) {
                auto next = co_await child_to_copy(t, src_repo, dst_repo, child);
                if (!next.ok()) co_return next.error();
                if (!next.value()) continue;
                const SourceManifest& c = *next.value();
                auto st = co_await push_tree(t, rel, dst_repo, c.data, c.parsed, child.digest, bytes);
                if (!st.ok()) co_return st;
            }
        } else {
            std::vector<Descriptor> blobs = blobs_of(m);
            std::vector<netio::Status> results(blobs.size(), netio::ok_status());
            netio::WaitGroup wg(loop_);
            for (size_t i = 0; i < blobs.size(); ++i) {
                wg.add();
                netio::spawn(run_into(ensure_blob(t, src_repo, dst_repo, blobs[i], bytes), results[i], wg));
            }
            co_await wg.wait();
            for (auto& r : results)
                if (!r.ok()) co_return r;
        }
        auto put = co_await t.client->put_manifest(dst_repo, reference, data.bytes, data.media_type);
        co_return put;
    }

    Task<void> run_into(Task<netio::Status> t, netio::Status& out, netio::WaitGroup& wg) {
        try {
            out = co_await t;
        } catch (const std::exception& e) {
            out = netio::Error::make(std::string("internal error: ") + e.what());
        }
        wg.done();
    }

    // Makes sure `dst_repo` on `t` has the blob: already there, mounted from another repository of
    // the same target, or uploaded from the cache (fetched from the source once).
    Task<netio::Status> ensure_blob(Target& t, std::string src_repo, std::string dst_repo, Descriptor b,
                                    uint64_t& bytes) {
        const std::string key = dst_repo + "@" + b.digest;
        if (auto it = t.blob_flights.find(key); it != t.blob_flights.end()) {
            auto shared = co_await it->second->wait();
            co_return shared;
        }
        auto& flight = *(t.blob_flights[key] = std::make_unique<Flight>());
        auto st = co_await ensure_blob_once(t, src_repo, dst_repo, b, bytes, flight);
        flight.finish(loop_, st);
        if (st.ok()) release_when_everywhere(t, b.digest);
        co_return st;
    }

    // A temporary cache lets a blob go once every target has it: the space is freed as the run
    // goes, not all at the end. (Another repository of a target that needs it later mounts it; if
    // the registry refuses the mount, it is fetched again.)
    void release_when_everywhere(Target& t, const std::string& digest) {
        if (!remove_cache_dir_ || !cas_) return;
        auto& have = targets_with_[digest];
        have.insert(&t);
        if (have.size() == targets_.size() && cas_->drop(digest)) targets_with_.erase(digest);
    }

    Task<netio::Status> ensure_blob_once(Target& t, const std::string& src_repo, const std::string& dst_repo,
                                         const Descriptor& b, uint64_t& bytes, Flight& flight) {
        if (!cas::is_sha256_digest(b.digest))
            co_return netio::Error::make("blob " + b.digest + ": only sha256 digests are supported");
        auto h = co_await t.client->head_blob(dst_repo, b.digest);
        if (!h.ok()) co_return h.error();
        if (h.value()) {
            ++summary_.blobs_existing;
            t.digest_home.emplace(b.digest, dst_repo);
            co_return netio::ok_status();
        }
        // Another repository of this target is receiving the same blob right now: wait, then mount.
        if (auto it = t.digest_inflight.find(b.digest); it != t.digest_inflight.end() && it->second.first != dst_repo) {
            Flight* other = it->second.second;
            (void)co_await other->wait();
        }
        if (auto home = t.digest_home.find(b.digest); home != t.digest_home.end() && home->second != dst_repo) {
            auto mounted = co_await t.client->mount_blob(dst_repo, b.digest, home->second);
            if (mounted.ok() && mounted.value()) {
                ++summary_.blobs_mounted;
                co_return netio::ok_status();
            }
        }
        t.digest_inflight.emplace(b.digest, std::make_pair(dst_repo, &flight));
        struct Clear {
            Target& t;
            const std::string& d;
            Flight* f;
            ~Clear() {
                auto it = t.digest_inflight.find(d);
                if (it != t.digest_inflight.end() && it->second.second == f) t.digest_inflight.erase(it);
            }
        } clear{t, b.digest, &flight};

        // The download starts now (it waits for a download permit of its own), before this upload
        // waits for a blob permit: downloads never wait for uploads, so the source link stays busy
        // while uploads work through what has arrived.
        auto cached = source_blob(src_repo, b);
        if (!cached.ok()) co_return cached.error();
        cas::BlobRef blob = cached.value();
        // No upload session is opened before the download has brought its first bytes (a fill may
        // be waiting for a download permit): registries time out request bodies that do not move.
        // Nor is an upload permit taken before then: a permit held by a blob still queued for its
        // download would keep one that is arriving from streaming on to the target, which then
        // catches up only after its last byte, at the end of the run.
        co_await blob->available(1);
        // Blobs still arriving first (their uploads are paced by their downloads: any wait is
        // backlog), then the complete ones, smallest first, so images complete early.
        co_await blob_sem_.acquire(blob->state() == cas::BlobState::partial ? 0 : b.size);
        netio::Semaphore::Permit permit(&blob_sem_);
        const bool arriving = blob->state() == cas::BlobState::partial;
        const bool from_cache = blob->state() == cas::BlobState::committed && !fetched_this_run_.count(b.digest);
        // Named, not temporaries inside the co_await: gcc 12 destroys a lambda temporary with
        // non-trivial captures twice when it spans a suspension.
        planned_bytes_ += b.size;
        BlobBodyFactory body = [this, blob, &t](uint64_t off, uint64_t len) -> std::shared_ptr<netio::BodySource> {
            if (blob->state() == cas::BlobState::failed) return nullptr;  // no retry can succeed
            return std::make_shared<CasRangeSource>(blob, off, len, &live_sent_, t.throttle);
        };
        RegistryClient::Finalizable ready = [this, blob]() -> Task<netio::Status> {
            return verdict_of(blob);
        };
        auto st = co_await t.client->upload_blob(dst_repo, b.digest, b.size, body, ready, arriving);
        if (!st.ok()) {
            if (auto f = failed_blobs_.find(b.digest); f != failed_blobs_.end()) co_return f->second;
            co_return st;
        }
        ++summary_.blobs_uploaded;
        if (from_cache) ++summary_.blobs_from_cache;
        summary_.bytes_copied += b.size;
        bytes += b.size;
        t.digest_home.emplace(b.digest, dst_repo);
        co_return netio::ok_status();
    }

    // The blob's verdict; for a failed download, the download's own message (digest mismatch,
    // source cut, ...).
    Task<netio::Status> verdict_of(cas::BlobRef blob) {
        auto v = co_await blob_verified(blob);
        if (v.ok()) co_return v;
        if (auto f = failed_blobs_.find(blob->digest()); f != failed_blobs_.end()) co_return f->second;
        co_return v;
    }

    // The blob in the cache: committed (from this run or an earlier one), being filled (shared:
    // single flight), or a new partial whose download starts now in the background. Callers read it
    // as it arrives; the source is asked once per run, whatever the number of targets.
    netio::Result<cas::BlobRef> source_blob(const std::string& src_repo, const Descriptor& b) {
        if (auto f = failed_blobs_.find(b.digest); f != failed_blobs_.end()) return f->second;
        auto acq = cas_->acquire(b.digest, b.size);
        if (!acq.ok()) return netio::Error::make("blob " + b.digest + ": cache: " + acq.error().message);
        cas::BlobRef blob = acq->blob;
        if (acq->filler) {
            fetched_this_run_.insert(b.digest);
            fills_.add();
            netio::spawn(fill(src_repo, b, blob));
        }
        return blob;
    }

    Task<void> fill(std::string src_repo, Descriptor b, cas::BlobRef blob) {
        // Small blobs (configs, small layers) take a round trip each and little bandwidth: they
        // have permits of their own, so they neither hold up the large ones nor wait behind them.
        // Small ones go smallest first. Large ones go largest first (longest job first: the run
        // does not end on a big blob fetched by its few streams alone, with the link idle around
        // it). Unless the source is capped: the cap, not the connections, then sets the pace to
        // the end, so one pool, smallest first, keeps fewer multi-stream downloads open at once,
        // less data is in flight past a pause, and the cap holds on the wire.
        const bool small = b.size < kSmallBlobBytes;
        netio::Semaphore& sem = small && !source_capped_ ? small_fill_sem_ : fill_sem_;
        const bool largest_first = !small && !source_capped_;
        co_await sem.acquire(largest_first ? std::numeric_limits<uint64_t>::max() - b.size : b.size);
        netio::Semaphore::Permit permit(&sem);
        const bool large = b.size >= opts_.range_threshold_bytes;
        ++fills_active_;
        if (large) ++large_fills_active_;
        struct Active {
            Mirror& m;
            bool large;
            ~Active() {
                --m.fills_active_;
                if (large) --m.large_fills_active_;
            }
        } active{*this, large};
        FillOptions fo;
        fo.streams = opts_.streams;
        fo.range_threshold_bytes = opts_.range_threshold_bytes;
        fo.live_bytes_read = &live_read_;
        fo.throttle = source_throttle_.get();
        if (tuner_) fo.streams_now = [this] { return streams_for_blob(); };
        FillStats stats;
        netio::Status st = netio::ok_status();
        try {
            st = co_await fill_blob(*source_, src_repo, blob, fo, stats);
        } catch (const std::exception& e) {
            st = netio::Error::make(std::string("internal error: ") + e.what());
            blob->fail(st.error());
        }
        summary_.bytes_read_source += stats.bytes_read;
        if (!st.ok()) failed_blobs_.emplace(b.digest, st.error());
        fills_.done();
    }

    const MirrorOptions& opts_;
    netio::UringLoop loop_;
    netio::HttpClient http_;
    // Four limits, so that waiting never holds a permit someone else's progress needs: listing
    // requests (4x jobs: tag lists are small, and a namespace's are fetched in one round trip);
    // artifacts in flight (8x jobs; bounds memory: manifests and coroutine frames, and
    // requests for manifests/HEADs); blobs in flight to targets (2x jobs); downloads from the
    // source (jobs, and jobs more for blobs under kSmallBlobBytes unless the source is capped).
    // A blob's download is started before its upload waits for a blob permit, and
    // uploads trail their downloads: the artifacts in flight are enough that a capped or slow
    // target never leaves the source idle. An artifact waiting for another one's upload of a
    // shared blob holds an artifact permit, never a blob one; a download never waits for an upload.
    netio::Semaphore list_sem_;
    netio::Semaphore tag_sem_;
    netio::Semaphore blob_sem_;
    netio::Semaphore fill_sem_;
    netio::Semaphore small_fill_sem_;  // downloads of blobs under kSmallBlobBytes
    bool source_capped_ = false;       // --bandwidth, or a shared link with a cap
    static constexpr uint64_t kSmallBlobBytes = 1u << 20;
    std::unique_ptr<RegistryClient> source_;
    std::vector<std::unique_ptr<Target>> targets_;
    std::unique_ptr<cas::BlobStore> cas_;
    std::string cache_dir_;
    bool remove_cache_dir_ = false;
    netio::WaitGroup fills_{loop_};
    size_t fills_active_ = 0;        // downloads holding a permit
    size_t large_fills_active_ = 0;  // of which ranged (at least range_threshold_bytes)
    std::map<std::string, netio::Error> failed_blobs_;  // digest -> why its download failed
    std::set<std::string> fetched_this_run_;
    std::map<std::string, std::set<Target*>> targets_with_;  // digest -> targets that have it
    MirrorSummary summary_;
    bool stop_ = false;
    size_t repos_scanned_ = 0;
    size_t in_progress_ = 0;
    uint64_t planned_bytes_ = 0;  // bytes of the uploads started so far
    uint64_t live_read_ = 0;
    planner::RateLimiter limiter_;
    std::unique_ptr<Throttle> source_throttle_;
    std::unique_ptr<planner::StreamTuner> tuner_;
    uint64_t tuner_last_bytes_ = 0;
    planner::TimePoint tuner_last_time_;
    netio::OpId tuner_timer_;
    uint64_t live_sent_ = 0;
    netio::OpId progress_timer_;
    netio::OpId watch_timer_;
    bool progress_stop_ = false;
    std::chrono::steady_clock::time_point rate_t0_ = std::chrono::steady_clock::now();
    uint64_t rate_bytes0_ = 0;
    double rate_ = 0;
};

}  // namespace

MirrorSummary run_mirror(const MirrorOptions& opts) {
    Mirror m(opts);
    return m.run();
}

}  // namespace engine
