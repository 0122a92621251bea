#include "engine/mirror.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <list>
#include <map>
#include <nlohmann/json.hpp>
#include <set>

#include "cas/digest.h"
#include "engine/manifest.h"
#include "engine/registry_client.h"
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
    j["duration_s"] = duration_s;
    j["errors"] = errors;
    auto& arr = j["items"] = nlohmann::json::array();
    for (const auto& it : items) {
        arr.push_back({{"target", it.target}, {"repository", it.repository}, {"tag", it.tag}, {"digest", it.digest},
                       {"type", it.type}, {"action", it.action}, {"reason", it.reason}, {"bytes", it.bytes}});
    }
    return j.dump(2);
}

namespace {

std::string human_bytes(double b) {
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

// A one-shot result many coroutines can wait for (single flight).
struct Flight {
    bool done = false;
    netio::Status result = netio::ok_status();
    std::vector<std::coroutine_handle<>> waiters;

    struct Wait {
        Flight& f;
        bool await_ready() const noexcept { return f.done; }
        void await_suspend(std::coroutine_handle<> h) { f.waiters.push_back(h); }
        netio::Status await_resume() const { return f.result; }
    };
    Wait wait() { return Wait{*this}; }
    void finish(netio::UringLoop& loop, netio::Status r) {
        done = true;
        result = std::move(r);
        for (auto h : waiters) loop.defer([h] { h.resume(); });
        waiters.clear();
    }
};

// Writes a blob's body to a spool file, hashing it as it arrives; non-2xx bodies are kept (bounded)
// for the error message instead.
class SpoolSink final : public netio::BodySink {
public:
    SpoolSink(int fd, uint64_t expected) : fd_(fd), expected_(expected) {}

    bool on_response_head(long status, const netio::Headers&) noexcept override {
        status_ = status;
        return true;
    }
    netio::Offer offer(std::span<const char> data) noexcept override {
        if (status_ != 200 && status_ != 206) {
            if (error_body_.size() < 65536) error_body_.append(data.data(), std::min<size_t>(data.size(), 65536));
            return netio::Offer::taken;
        }
        if (bytes_ + data.size() > expected_) {
            overflow_ = true;
            return netio::Offer::error;  // the registry sends more than the manifest says
        }
        size_t done = 0;
        while (done < data.size()) {
            ssize_t n = ::pwrite(fd_, data.data() + done, data.size() - done, static_cast<off_t>(bytes_ + done));
            if (n < 0) {
                if (errno == EINTR) continue;
                write_errno_ = errno;
                return netio::Offer::error;
            }
            done += static_cast<size_t>(n);
        }
        hasher_.update(data);
        bytes_ += data.size();
        return netio::Offer::taken;
    }

    long status_ = 0;
    uint64_t bytes_ = 0;
    bool overflow_ = false;
    int write_errno_ = 0;
    std::string error_body_;
    cas::Sha256 hasher_;

private:
    int fd_;
    uint64_t expected_;
};

struct SpoolEntry {
    Flight flight;
    netio::UniqueFd fd;
    std::string path;
    uint64_t size = 0;
    unsigned pins = 0;
    uint64_t last_use = 0;
};

struct Target {
    RegistryRef ref;
    std::string label;  // host/ns for messages
    std::unique_ptr<RegistryClient> client;
    std::map<std::string, std::unique_ptr<Flight>> blob_flights;   // repo@digest -> ensure in flight/done
    std::map<std::string, std::string> digest_home;                // digest -> a repo known to hold it
    std::map<std::string, std::pair<std::string, Flight*>> digest_inflight;  // digest -> (repo, flight)
};

class Mirror {
public:
    explicit Mirror(const MirrorOptions& o)
        : opts_(o), http_(loop_), tag_sem_(loop_, std::max(1u, o.jobs)), blob_sem_(loop_, std::max(1u, o.jobs)) {}

    MirrorSummary run() {
        auto t0 = std::chrono::steady_clock::now();
        summary_.dry_run = opts_.dry_run;
        if (!setup_spool()) return finish(t0);
        netio::OpId progress_timer;
        if (opts_.progress_tty && opts_.log) progress_timer = schedule_progress();
        netio::run_blocking(loop_, main_task());
        if (progress_timer) loop_.cancel_timer(progress_timer_);
        progress_stop_ = true;
        if (opts_.progress_tty && opts_.log) std::fprintf(opts_.log, "\r\033[K");
        return finish(t0);
    }

private:
    MirrorSummary finish(std::chrono::steady_clock::time_point t0) {
        for (const auto& it : summary_.items) {
            if (it.action == "copied" || it.action == "would-copy") ++summary_.copied;
            else if (it.action == "skipped") ++summary_.skipped;
            else if (it.action == "failed") ++summary_.failed;
        }
        summary_.duration_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        spool_.clear();
        if (remove_spool_dir_) {
            std::error_code ec;
            std::filesystem::remove_all(opts_.spool_dir.empty() ? spool_dir_ : opts_.spool_dir, ec);
        }
        return std::move(summary_);
    }

    bool setup_spool() {
        std::error_code ec;
        if (opts_.spool_dir.empty()) {
            auto base = std::filesystem::temp_directory_path(ec);
            if (ec) base = "/tmp";
            std::string tmpl = (base / "crossdock-spool-XXXXXX").string();
            if (!::mkdtemp(tmpl.data())) {
                summary_.errors.push_back("cannot create a spool directory under " + base.string() + ": " +
                                          std::strerror(errno));
                return false;
            }
            spool_dir_ = tmpl;
            remove_spool_dir_ = true;
        } else {
            spool_dir_ = opts_.spool_dir;
            std::filesystem::create_directories(spool_dir_, ec);
            if (ec) {
                summary_.errors.push_back("cannot create spool directory " + spool_dir_ + ": " + ec.message());
                return false;
            }
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

    void draw_progress() {
        auto now = std::chrono::steady_clock::now();
        double secs = std::chrono::duration<double>(now - rate_t0_).count();
        if (secs >= 1.0) {
            rate_ = static_cast<double>(moved_bytes() - rate_bytes0_) / secs;
            rate_t0_ = now;
            rate_bytes0_ = moved_bytes();
        }
        std::string line = "scanned " + std::to_string(repos_scanned_) + "/" + std::to_string(repos_total_) +
                           " repos, " + std::to_string(summary_.items.size()) + " artifacts done, " +
                           std::to_string(in_progress_) + " in progress | " + human_bytes(double(moved_bytes())) +
                           " moved, " + human_bytes(rate_) + "/s";
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

    uint64_t moved_bytes() const { return summary_.bytes_read_source + summary_.bytes_copied; }

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
        ro.credentials = credentials_for(host, flag);
        ro.chunk_size_bytes = opts_.chunk_size_bytes;
        return ro;
    }

    Task<void> main_task() {
        source_ = std::make_unique<RegistryClient>(http_, registry_options(opts_.source.host, opts_.source_credentials));
        for (const auto& t : opts_.targets) {
            auto tg = std::make_unique<Target>();
            tg->ref = t;
            if (opts_.target_namespace) tg->ref.ns = *opts_.target_namespace;
            tg->label = tg->ref.host + (tg->ref.ns.empty() ? "" : "/" + tg->ref.ns);
            tg->client = std::make_unique<RegistryClient>(http_, registry_options(t.host, opts_.target_credentials));
            targets_.push_back(std::move(tg));
        }
        if (!summary_.errors.empty()) co_return;

        // Reach every registry before any work.
        if (auto st = co_await source_->ping(); !st.ok()) {
            summary_.errors.push_back("source " + st.error().message);
            co_return;
        }
        for (auto& t : targets_) {
            if (auto st = co_await t->client->ping(); !st.ok()) {
                summary_.errors.push_back("target " + st.error().message);
                co_return;
            }
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
        repos_total_ = repos.size();
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
            co_await tag_sem_.acquire();
            netio::Semaphore::Permit permit(&tag_sem_);
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
            log("scanned " + std::to_string(repos_scanned_) + "/" + std::to_string(repos_total_) + ": " + rel + " (" +
                std::to_string(tags.size()) + " matching tags)");
        for (auto& tag : tags) {
            if (stop_) break;
            wg.add();
            netio::spawn(guarded(copy_tag(rel, tag), wg));
        }
    }

    void record(MirrorItem item) {
        std::string line = item.action + " " + item.repository + ":" + item.tag + " -> " + item.target;
        if (!item.digest.empty()) line += " (" + item.digest.substr(0, 19) + ")";
        if (item.bytes) line += " " + human_bytes(double(item.bytes));
        if (!item.reason.empty()) line += ": " + item.reason;
        log(line);
        if (item.action == "failed" && opts_.fail_fast) stop_ = true;
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
        planned_bytes_ += blob_bytes(m) * targets_.size();

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
        MirrorItem item{t.label, rel, tag, data.digest, type, "", "", 0};
        auto head = co_await t.client->head_manifest(dst_repo, tag);
        if (!head.ok()) {
            item.action = "failed";
            item.reason = head.error().message;
            record(std::move(item));
            co_return;
        }
        if (head.value()) {
            const auto& h = *head.value();
            if (h.digest == data.digest) {
                item.action = "skipped";
                item.reason = "same digest";
                record(std::move(item));
                co_return;
            }
            if (!opts_.overwrite) {
                item.action = "skipped";
                item.reason = "exists";
                record(std::move(item));
                co_return;
            }
        }
        uint64_t bytes = 0;
        netio::Status st = opts_.dry_run ? co_await missing_bytes(t, rel, dst_repo, m, bytes)
                                         : co_await push_tree(t, rel, dst_repo, data, m, tag, bytes);
        item.bytes = bytes;
        if (!st.ok()) {
            item.action = "failed";
            item.reason = st.error().message;
        } else {
            item.action = opts_.dry_run ? "would-copy" : "copied";
        }
        record(std::move(item));
    }

    // Dry run: bytes of the blobs (of this manifest and its children) the target lacks.
    Task<netio::Status> missing_bytes(Target& t, std::string rel, std::string dst_repo, const Manifest& m,
                                      uint64_t& bytes) {
        const std::string src_repo = join_repo(opts_.source.ns, rel);
        if (m.kind == ManifestKind::index) {
            for (const auto& child : m.manifests) {
                auto h = co_await t.client->head_manifest(dst_repo, child.digest);
                if (!h.ok()) co_return h.error();
                if (h.value()) continue;
                auto cm = co_await source_->get_manifest(src_repo, child.digest);
                if (!cm.ok()) co_return cm.error();
                if (!cm.value()) co_return netio::Error::make("index child " + child.digest + " is missing on the source");
                auto parsed = parse_manifest(cm.value()->bytes, cm.value()->media_type);
                if (!parsed.ok()) co_return netio::Error::make("malformed child manifest " + child.digest + ": " + parsed.error().message);
                auto st = co_await missing_bytes(t, rel, dst_repo, parsed.value(), bytes);
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
                auto h = co_await t.client->head_manifest(dst_repo, child.digest);
                if (!h.ok()) co_return h.error();
                if (h.value()) continue;
                auto cm = co_await source_->get_manifest(src_repo, child.digest);
                if (!cm.ok()) co_return cm.error();
                if (!cm.value())
                    co_return netio::Error::make("index child " + child.digest + " is missing on the source");
                ManifestData cd = std::move(*cm.value());
                auto parsed = parse_manifest(cd.bytes, cd.media_type);
                if (!parsed.ok())
                    co_return netio::Error::make("malformed child manifest " + child.digest + ": " + parsed.error().message);
                if (cd.media_type.empty()) cd.media_type = parsed->media_type;
                auto st = co_await push_tree(t, rel, dst_repo, cd, parsed.value(), child.digest, bytes);
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
        co_return co_await t.client->put_manifest(dst_repo, reference, data.bytes, data.media_type);
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
    // the same target, or uploaded from the spool (fetched from the source once).
    Task<netio::Status> ensure_blob(Target& t, std::string src_repo, std::string dst_repo, Descriptor b,
                                    uint64_t& bytes) {
        const std::string key = dst_repo + "@" + b.digest;
        if (auto it = t.blob_flights.find(key); it != t.blob_flights.end()) co_return co_await it->second->wait();
        auto& flight = *(t.blob_flights[key] = std::make_unique<Flight>());
        auto st = co_await ensure_blob_once(t, src_repo, dst_repo, b, bytes, flight);
        flight.finish(loop_, st);
        co_return st;
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

        co_await blob_sem_.acquire();
        netio::Semaphore::Permit permit(&blob_sem_);
        auto spooled = co_await fetch_source_blob(src_repo, b);
        if (!spooled.ok()) co_return spooled.error();
        std::shared_ptr<SpoolEntry> e = spooled.value();
        int fd = e->fd.get();
        auto st = co_await t.client->upload_blob(dst_repo, b.digest, e->size, [fd](uint64_t off, uint64_t len) {
            return std::make_shared<netio::FileRangeSource>(fd, off, len);
        });
        --e->pins;
        e->last_use = ++use_clock_;
        if (!st.ok()) co_return st;
        ++summary_.blobs_uploaded;
        summary_.bytes_copied += e->size;
        bytes += e->size;
        t.digest_home.emplace(b.digest, dst_repo);
        co_return netio::ok_status();
    }

    // Single flight per digest: the blob is read from the source once, verified, and kept in the
    // spool for every repository and target that needs it. The entry comes back pinned; the caller
    // unpins it when its upload is done.
    Task<netio::Result<std::shared_ptr<SpoolEntry>>> fetch_source_blob(std::string src_repo, Descriptor b) {
        for (int round = 0; round < 3; ++round) {
            if (auto it = spool_.find(b.digest); it != spool_.end()) {
                std::shared_ptr<SpoolEntry> e = it->second;
                auto st = co_await e->flight.wait();
                if (!st.ok()) co_return st.error();
                if (e->fd.valid()) {
                    ++e->pins;
                    co_return e;
                }
                continue;  // evicted meanwhile (and removed from the map): look again
            }
            auto e = std::make_shared<SpoolEntry>();
            spool_[b.digest] = e;
            ++e->pins;
            auto st = co_await download(src_repo, b, *e);
            e->last_use = ++use_clock_;
            e->flight.finish(loop_, st);
            if (!st.ok()) {
                // Kept in the map as failed: the source is not asked again in this run.
                --e->pins;
                if (!e->path.empty()) ::unlink(e->path.c_str());
                e->fd.reset();
                co_return st.error();
            }
            spooled_bytes_ += e->size;
            evict_if_needed();
            co_return e;
        }
        co_return netio::Error::make("blob " + b.digest + " was evicted from the spool repeatedly; raise the spool cap");
    }

    Task<netio::Status> download(const std::string& src_repo, const Descriptor& b, SpoolEntry& e) {
        e.path = spool_dir_ + "/" + b.digest.substr(7) + ".partial";
        e.fd.reset(::open(e.path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
        if (!e.fd.valid())
            co_return netio::Error::make("cannot create spool file " + e.path + ": " + std::strerror(errno));
        const std::string what = "blob " + b.digest + " from " + opts_.source.host + "/" + src_repo;
        netio::Status last = netio::ok_status();
        constexpr int kAttempts = 4;
        for (int attempt = 0; attempt < kAttempts; ++attempt) {
            if (attempt > 0) co_await netio::sleep_for(loop_, std::chrono::milliseconds(250 << attempt));
            if (::ftruncate(e.fd.get(), 0) != 0)
                co_return netio::Error::make("cannot truncate spool file " + e.path + ": " + std::strerror(errno));
            SpoolSink sink(e.fd.get(), b.size);
            auto res = co_await source_->get_blob(src_repo, b.digest, &sink);
            summary_.bytes_read_source += sink.bytes_;
            if (sink.overflow_) co_return netio::Error::make(what + ": the source sent more than the " + std::to_string(b.size) + " bytes the manifest declares");
            if (sink.write_errno_) co_return netio::Error::make(what + ": writing the spool file: " + std::strerror(sink.write_errno_));
            if (!res.ok()) {
                last = netio::Error{res.error().code, what + ": " + res.error().message};
                continue;  // connection cut or stalled: start again
            }
            if (res->status == 404) co_return netio::Error::make(what + ": the source does not have it (404)");
            if (res->status != 200) {
                std::string body = sink.error_body_.substr(0, 300);
                std::replace(body.begin(), body.end(), '\n', ' ');
                auto err = netio::Error::make(what + ": HTTP " + std::to_string(res->status) + (body.empty() ? "" : " " + body));
                last = err;
                if (planner::is_retryable_status(res->status)) continue;
                co_return err;
            }
            if (sink.bytes_ != b.size) {
                last = netio::Error::make(what + ": the source sent " + std::to_string(sink.bytes_) + " bytes, the manifest declares " + std::to_string(b.size));
                continue;
            }
            std::string got = sink.hasher_.finish_digest();
            if (got != b.digest) {
                // Never publish it. One more try in case of corruption in transit, then give up.
                last = netio::Error::make(what + ": content does not match its digest (got " + got + ")");
                if (attempt >= 1) co_return last;
                continue;
            }
            e.size = b.size;
            co_return netio::ok_status();
        }
        co_return last;
    }

    void evict_if_needed() {
        while (spooled_bytes_ > opts_.spool_cap_bytes) {
            auto victim = spool_.end();
            for (auto it = spool_.begin(); it != spool_.end(); ++it) {
                auto& e = *it->second;
                if (e.pins || !e.flight.done || !e.flight.result.ok() || !e.fd.valid()) continue;
                if (victim == spool_.end() || e.last_use < victim->second->last_use) victim = it;
            }
            if (victim == spool_.end()) return;
            spooled_bytes_ -= victim->second->size;
            ::unlink(victim->second->path.c_str());
            victim->second->fd.reset();
            spool_.erase(victim);
        }
    }

    const MirrorOptions& opts_;
    netio::UringLoop loop_;
    netio::HttpClient http_;
    netio::Semaphore tag_sem_;
    netio::Semaphore blob_sem_;
    std::unique_ptr<RegistryClient> source_;
    std::vector<std::unique_ptr<Target>> targets_;
    std::map<std::string, std::shared_ptr<SpoolEntry>> spool_;
    std::string spool_dir_;
    bool remove_spool_dir_ = false;
    uint64_t spooled_bytes_ = 0;
    uint64_t use_clock_ = 0;
    MirrorSummary summary_;
    bool stop_ = false;
    size_t repos_total_ = 0;
    size_t repos_scanned_ = 0;
    size_t in_progress_ = 0;
    uint64_t planned_bytes_ = 0;
    netio::OpId progress_timer_;
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
