// Mirror: copies every repository under a source namespace to one or more targets, exactly
// (manifests byte for byte, blobs verified by sha256 before their final PUT), in the order the
// invariants require: blobs, then child manifests, then the index, the tag last.
//
// Blobs pass through the content-addressed cache (cas::BlobStore): read from the source once, by
// parallel ranged GETs, while uploads to every target follow the verified prefix (PATCH chunks in
// order; the final PUT only once the sha256 matched). Memory stays bounded by buffers.
//
// Threading: run_mirror() owns its own loop and runs it on the calling thread until done.
#pragma once

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <re2/re2.h>

#include "engine/auth_parse.h"
#include "engine/reference.h"
#include "netio/result.h"
#include "planner/link_shares.h"

namespace engine {

enum class TypeFilter { all, image, helm };

// Compiled, validated user filters. Empty pattern = match everything. Full match (RE2).
struct Filters {
    std::shared_ptr<RE2> repo;  // null = all
    std::shared_ptr<RE2> tag;   // null = all
    TypeFilter type = TypeFilter::all;
};
// Errors name the flag and what is wrong with the regular expression.
netio::Result<Filters> compile_filters(const std::string& repo_regex, const std::string& tag_regex,
                                       const std::string& type);

// Per-registry transport, by host: the daemon's registry records (URL scheme, TLS settings).
struct RegistryTransport {
    std::string scheme;  // "http" or "https"; "" = https, then http if insecure
    bool insecure = false;
    std::string ca_file;
    std::optional<Credentials> credentials;  // for this host; else the source/target credentials
};

// One artifact of a run limited to named artifacts (event-triggered): a repository path relative
// to the source namespace and a tag; or, with `remove`, a manifest digest to delete on the targets.
struct MirrorArtifact {
    std::string repository;
    std::string tag;
    std::string digest;
    bool remove = false;
};

// Live figures of a run, updated by the mirror about ten times a second and readable from any
// thread (the daemon's task progress).
struct MirrorProgress {
    std::atomic<uint64_t> repositories{0};          // matching repositories (known once listed)
    std::atomic<uint64_t> repositories_scanned{0};
    std::atomic<uint64_t> artifacts_done{0};
    std::atomic<uint64_t> artifacts_in_progress{0};
    std::atomic<uint64_t> bytes_read{0};            // from the source
    std::atomic<uint64_t> bytes_sent{0};            // to the targets (retries count again)
    std::atomic<uint64_t> bytes_planned{0};         // of the uploads started so far
};

struct MirrorItem;

struct MirrorOptions {
    RegistryRef source;
    std::vector<RegistryRef> targets;
    Filters filters;
    std::optional<std::string> target_namespace;  // overrides each target's namespace
    bool overwrite = false;
    bool dry_run = false;
    bool insecure = false;
    std::string ca_file;
    std::optional<Credentials> source_credentials;  // from flags; else looked up in auth files
    std::optional<Credentials> target_credentials;
    std::vector<std::string> auth_files;            // docker config.json / auth.json, in order
    unsigned jobs = 16;
    bool fail_fast = false;
    std::string cache_dir;                          // the blob cache (kept); empty: a temporary one
    uint64_t cache_cap_bytes = 16ull << 30;         // least recently used unpinned blobs evicted above
    uint64_t chunk_size_bytes = 64u << 20;          // PATCH chunk; cached blobs up to this go in one PUT
    unsigned streams = 4;                           // parallel ranged GETs per large blob
    bool streams_auto = false;                      // the planner's tuner picks the stream count
    double bandwidth_bytes_per_s = 0;               // cap per link (source, each target); 0 = none
    uint64_t range_threshold_bytes = 32u << 20;     // blobs from this size use `streams` ranges
    bool progress_tty = false;                      // a live status line on `log`
    FILE* log = stderr;                             // progress and log lines; nullptr = quiet
    std::map<std::string, RegistryTransport> transports;  // by host; hosts not here use insecure/ca_file
    // Non-empty: no catalog scan; only these artifacts are copied (filters still apply) or, with
    // `remove`, deleted on the targets.
    std::vector<MirrorArtifact> only;

    // For the daemon. on_item: each artifact's outcome, on the mirror's thread, as it is recorded.
    // cancel: set from any thread to stop the run: no new artifact starts and transfers in flight
    // are aborted (partial blobs keep their verified chunks in the cache, for the next run); the
    // artifacts cut short are in the summary as failed but are not passed to on_item.
    std::function<void(const MirrorItem&)> on_item;
    std::shared_ptr<const std::atomic<bool>> cancel;
    std::shared_ptr<MirrorProgress> progress;
    // A link cap shared with other runs (the daemon's tasks on the same link): downloads answer to
    // `shared_source`, uploads to `shared_target`, as member `shared_member` (see planner/link_shares.h).
    std::shared_ptr<planner::LinkShares> shared_source;
    std::shared_ptr<planner::LinkShares> shared_target;
    uint64_t shared_member = 0;
};

struct MirrorItem {
    std::string target;      // "host:port/namespace"
    std::string repository;  // relative to the namespace
    std::string tag;
    std::string digest;
    std::string type;        // image | helm
    std::string action;      // copied | skipped | failed | would-copy | deleted
    std::string reason;
    uint64_t bytes = 0;      // blob bytes uploaded (or that would be) for this item
    uint64_t duration_ms = 0;
};

struct MirrorSummary {
    bool dry_run = false;
    size_t repositories = 0;
    size_t copied = 0;
    size_t skipped = 0;
    size_t failed = 0;
    uint64_t bytes_copied = 0;
    uint64_t bytes_read_source = 0;
    size_t blobs_uploaded = 0;
    size_t blobs_mounted = 0;
    size_t blobs_existing = 0;
    size_t blobs_from_cache = 0;     // uploads served from a cache kept by an earlier run
    bool cancelled = false;          // stopped by MirrorOptions::cancel
    double duration_s = 0;
    std::vector<std::string> errors;  // failures not tied to one artifact (source unreachable, ...)
    std::vector<MirrorItem> items;

    bool ok() const noexcept { return failed == 0 && errors.empty(); }
    std::string to_json() const;
};

MirrorSummary run_mirror(const MirrorOptions& opts);

// "1.5 GiB", "540.9 KiB", "176 B": sizes and rates for people.
std::string format_bytes(double bytes);

}  // namespace engine
