// bench-link: measures the link between two registries as a user would before setting caps, and
// recommends `crossdock mirror` settings.
//
// What it measures, in this order, on its own loop:
//   1. RTT to each registry: unauthenticated `GET /v2/` round trips on a warm connection (200 or
//      401 alike: either is one round trip); median and p90 of `rtt_samples`.
//   2. GET from the SOURCE with N parallel streams, for each N in `streams`: one synthetic random
//      blob of `blob_bytes` is uploaded to the source scratch repository (untimed), then read as N
//      concurrent ranged GETs that split it into N near-equal ranges (bodies discarded). Aggregate
//      MiB/s = bytes received / wall time from the first request to the last byte.
//   3. PUT to the TARGET, for each N, for each chunk size in `chunk_sizes` and monolithic (taking
//      turns, so a registry that slows down as it fills penalises every series alike): N
//      concurrent uploads of distinct synthetic blobs of blob_bytes/N each (so every pass moves
//      blob_bytes, like a GET pass, and the total time stays bounded), POST + PATCH chunks + PUT as
//      `crossdock mirror` does. An upload no larger than the chunk size goes in one PUT, as in the
//      mirror; such runs are flagged `single_put`.
// A pass shorter than 0.5 s (a fast link) is repeated, at most 3 passes per cell, and the cell
// reports their total bytes over their total time. Nothing of this is timed: digests (computed
// before each pass), connection and token set-up (a small warm-up request per client first).
// Timed requests get one retry at most (a retry inside a measurement measures the retry).
//
// Safety: the scratch repository is `<ns>/<repo>` under each of SOURCE's and TARGET's namespaces,
// by default `crossdock-bench-link/<8 random hex>`. Before writing anything, a repository that
// already has tags is refused (exit 2) unless `force`; with an explicit `repo`, one listed in the
// catalog (it holds or held blobs or manifests) is refused too. bench-link creates only blobs (no
// manifest, no tag) and deletes every blob it uploaded afterwards, whatever happened in between,
// and never deletes anything else. A registry that refuses deletes (405 UNSUPPORTED: distribution
// needs storage.delete.enabled) is reported with the list of what was left; unreferenced blobs go
// at the registry's next garbage collection.
//
// Threading: run_bench_link() owns its loop and runs it on the calling thread until done.
#pragma once

#include <csignal>
#include <cstdint>
#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include "engine/auth_parse.h"
#include "engine/reference.h"

namespace engine {

struct BenchLinkOptions {
    RegistryRef source, target;
    bool insecure = false;
    std::string ca_file;
    std::optional<Credentials> source_credentials, target_credentials;  // else looked up in auth_files
    std::vector<std::string> auth_files;
    std::string repo;                       // scratch repository below each namespace; empty: default
    bool force = false;                     // allow a scratch repository that already has content
    std::vector<unsigned> streams = {1, 2, 4, 8, 16};
    std::vector<uint64_t> chunk_sizes = {8u << 20, 32u << 20};
    uint64_t blob_bytes = 64u << 20;        // bytes moved per run (GET: one blob; PUT: N blobs of this/N)
    int rtt_samples = 10;
    std::string json_path;                  // write the report as JSON here ("" = no)
    std::string plot_path;                  // draw throughput vs streams as SVG here ("" = no)
    FILE* out = stdout;                     // the report
    FILE* log = stderr;                     // progress lines; nullptr = quiet
    // Set (by a signal handler) to stop: the measurement in progress is aborted and bench-link
    // cleans up before it returns 1. Read only; may be null.
    const volatile std::sig_atomic_t* interrupted = nullptr;
};

// Exit codes of run_bench_link().
inline constexpr int kBenchLinkOk = 0;
inline constexpr int kBenchLinkFailed = 1;   // unreachable registry, failed measurement, failed cleanup
inline constexpr int kBenchLinkRefused = 2;  // invalid options, or a scratch repository not ours

// Runs everything above and prints the report to opts.out. Returns one of the exit codes above.
// Deletes refused by the registry's configuration (405) are reported but do not fail the run.
int run_bench_link(const BenchLinkOptions& opts);

// ---- The report, and the pure functions that turn it into recommendations, JSON and SVG. ----

struct BenchRun {
    unsigned streams = 0;        // parallel ranged GETs, or parallel uploads
    uint64_t bytes = 0;          // bytes moved in the timed passes, together
    double seconds = 0;          // time of the timed passes, together
    unsigned passes = 0;         // passes of blob_bytes each: more than one when a pass was short
    uint64_t upload_bytes = 0;   // PUT: the size of each of the `streams` blobs
    bool single_put = false;     // PUT: every upload went as one PUT (no larger than the chunk size)
    double mib_per_s() const noexcept { return seconds > 0 ? double(bytes) / double(1u << 20) / seconds : 0; }
};

struct PutSeries {
    uint64_t chunk_size_bytes = 0;  // 0 = monolithic (POST + one PUT)
    std::vector<BenchRun> runs;     // one per stream count, in `streams` order
};

struct RttStats {
    std::vector<double> samples_ms;
    double median_ms = 0;
    double p90_ms = 0;  // nearest rank
};
// Median and p90 of the samples (zeros when empty).
RttStats rtt_stats(std::vector<double> samples_ms);

struct BenchLinkReport {
    std::string source, target;            // "host[:port]/ns" as given
    std::string source_repo, target_repo;  // full repository names used
    uint64_t blob_bytes = 0;
    RttStats source_rtt, target_rtt;
    std::vector<BenchRun> get;             // one per stream count
    std::vector<PutSeries> put;            // chunk sizes in order, then monolithic
    bool source_ignores_range = false;     // a ranged GET got 200 + the whole blob
    std::vector<std::string> notes;        // caveats worth printing
    // Cleanup.
    size_t blobs_created = 0;
    size_t blobs_deleted = 0;
    bool deletes_unsupported = false;      // a registry answered 405 to DELETE
    std::vector<std::string> left;         // "host/repo@digest" still there (or unknown) afterwards
};

struct LinkRecommendation {
    bool valid = false;               // false when there is nothing to recommend from
    unsigned streams = 0;             // smallest N whose GET is within kStreamsTolerance of the best
    double best_get_mib_per_s = 0;
    unsigned best_get_streams = 0;
    uint64_t chunk_size_bytes = 0;    // the chunk size with the best chunked PUT (see recommend_link_settings)
    double chunked_put_mib_per_s = 0; // its score: best MiB/s of its runs that were compared
    double best_put_mib_per_s = 0;    // best MiB/s of all runs at that chunk size (single PUTs included)
    unsigned put_streams = 0;         // smallest N within the tolerance of that best
    double best_monolithic_mib_per_s = 0;
    double best_put_any_mib_per_s = 0;  // best PUT of every series
    double capacity_mib_per_s = 0;    // min(best GET, best PUT of any series): what a mirror can reach
    uint64_t bandwidth_mib_per_s = 0; // kBandwidthShare of the capacity, rounded down, at least 1
    // Blob transfers in flight (--jobs): enough connections to fill the link when each one is
    // capped (aggregate / single-stream GET), twice over because blobs under the range threshold
    // use one connection each; within [8, 64].
    unsigned jobs = 0;
};

// Fewer streams are cheaper for the registry: take the smallest N within 5% of the best.
inline constexpr double kStreamsTolerance = 0.05;
// Suggested --bandwidth: 90% of the measured capacity, leaving room for other traffic.
inline constexpr double kBandwidthShare = 0.90;

// Chunk size: the series are compared at the stream counts where every chunk size really was
// chunked (each upload larger than the largest chunk size), best MiB/s there; when there is no
// such count, each series by the best of its own chunked runs (of all its runs if none was
// chunked). Ties go to the smaller chunk size.
LinkRecommendation recommend_link_settings(const BenchLinkReport& r);

// "crossdock mirror SOURCE TARGET [--insecure] [--ca-file F] --streams N --chunk-size M --bandwidth XMiB/s"
// (never credentials).
std::string recommended_command(const BenchLinkReport& r, const LinkRecommendation& rec, bool insecure,
                                const std::string& ca_file);

// The report as a JSON document (keys documented in README's bench-link section).
std::string bench_link_json(const BenchLinkReport& r, const LinkRecommendation& rec, const std::string& command);

// Throughput (MiB/s) against streams: one GET line, one PUT line per chunk size and monolithic;
// a log2 x axis when the stream counts span a factor of 4 or more. A standalone SVG document.
std::string bench_link_svg(const BenchLinkReport& r);

// The human-readable report (RTT, the table, recommendations, cleanup).
std::string bench_link_text(const BenchLinkReport& r, const LinkRecommendation& rec, const std::string& command);

}  // namespace engine
