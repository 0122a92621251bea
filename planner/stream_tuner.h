// How many parallel ranged streams a link should carry, and how big each ranged request is.
//
// Between regions one TCP stream rarely fills a link (window / RTT, per-connection shaping), so
// the tuner searches for the smallest stream count that reaches the link's plateau, from
// measurements of the aggregate throughput:
//   1. ramp: start small (start_streams), double while the aggregate grows by at least
//      growth_threshold (10%);
//   2. search: once it stops growing (or max_streams is reached), the plateau P is the mean of
//      the counts measured within plateau_tolerance of the best (pooled, so one lucky sample
//      does not raise the bar). Find the smallest count whose mean reaches (1 - tolerance) * P,
//      between the largest measured count below that mark (lo) and the smallest above it (hi).
//      The next count to try is where lo's per-stream throughput, extended linearly, reaches P
//      (exact on a link shaped like min(n * per_stream, total): one or two steps), at least a
//      quarter of the way from lo to hi (a curve that bends early still converges quickly);
//   3. settled: hold that count. When a step's aggregate moves by more than change_threshold
//      from the settled average (per-connection shaping changed, the route changed), search
//      again from the current count, ramping up and then searching in both directions.
//      Otherwise, every reprobe_interval_s, probe gently, one step (+1/8, at least one stream)
//      at a time: up while each step gains more than plateau_tolerance, then settle on the
//      smallest count near the best; if the first step up gains nothing, step down while a step
//      loses less than half of plateau_tolerance (under noise, a stream too many is cheaper than
//      a link not filled). A periodic re-probe moves one step at a time, so a settled link is
//      never thrown back to one stream, and a noisy sample costs at most one step.
//
// Noise: each count is judged on the mean of samples_per_step samples, after discarding
// warmup_samples taken right after a change (new connections are still in TCP slow start). When
// that mean is within two standard errors of the value it is compared against, more samples are
// taken (up to max_samples_per_step) before deciding: clear cases stay fast, close calls get the
// data they need. The noise level is learnt from the samples (pooled relative variance).
//
// One tuner per link (source region -> target region); streams() is how many ranged streams the
// engine keeps open on that link in total, spread over the blobs in flight. Feed on_sample() only
// with intervals during which all those streams were busy: an interval where the queue ran dry
// measures the work, not the link.
//
// Threading: belongs to one thread (the event loop). Pure: no clock is read. Memory: one entry
// per stream count measured in the current search (at most max_streams).
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <optional>

#include "planner/time_point.h"

namespace planner {

struct StreamTunerConfig {
    unsigned start_streams = 2;        // clamped into [min, max]
    double growth_threshold = 0.10;    // ramp: keep doubling while the aggregate grows this much
    double plateau_tolerance = 0.05;   // "as good as the best" means within this fraction
    double change_threshold = 0.25;    // settled: search again when the aggregate moves this much
    unsigned samples_per_step = 3;     // samples averaged per stream count (0 counts as 1)
    unsigned max_samples_per_step = 9; // for close calls (below samples_per_step: no extension)
    unsigned warmup_samples = 1;       // samples discarded after each change of stream count
    std::chrono::seconds reprobe_interval_s{60};
};

class StreamTuner {
public:
    // min_streams 0 counts as 1; max_streams below min_streams counts as min_streams.
    explicit StreamTuner(unsigned min_streams = 1, unsigned max_streams = 16, StreamTunerConfig config = {});

    // A measurement of the aggregate throughput achieved on the link with the current streams()
    // over an interval ending at `now`. Negative or non-finite values are ignored.
    void on_sample(double aggregate_bytes_per_s, TimePoint now);

    unsigned streams() const noexcept { return streams_; }
    // True once a search has ended (until the next re-probe starts).
    bool settled() const noexcept { return phase_ == Phase::settled; }

    // The latest step's aggregate throughput divided by the streams that achieved it; 0 before
    // the first complete step.
    double per_stream_bytes_per_s() const noexcept { return per_stream_bytes_per_s_; }

    // The size of one ranged GET / PATCH chunk for a blob of blob_size on this link:
    // max(16 * per-stream bandwidth-delay product, blob_size / 64), rounded up to a multiple of
    // 4 MiB (the CAS checksum granule, so a chunk never straddles a partially verified granule on
    // resume), at least 8 MiB (the first multiple of 4 MiB that is at least 5 MiB, S3's minimum
    // multipart part, which S3-backed registries enforce on PATCH chunks), at most 64 MiB.
    // Sixteen BDPs per chunk keep the request round trip under ~6% of the chunk's time; 64
    // chunks per blob keep per-chunk overhead and bookkeeping bounded for huge blobs. A negative
    // rtt counts as 0.
    uint64_t chunk_bytes(uint64_t blob_size, std::chrono::microseconds rtt) const noexcept;

    static constexpr uint64_t kChunkGranuleBytes = 4u << 20;
    static constexpr uint64_t kMinChunkBytes = 8u << 20;
    static constexpr uint64_t kMaxChunkBytes = 64u << 20;

private:
    enum class Phase { ramp, search, settled, probe_up, probe_down };

    struct Measurement {
        double mean = 0;
        unsigned samples = 0;
    };
    // What the current step's mean is compared against, and how many samples that value rests on.
    struct Threshold {
        double value;
        unsigned ref_samples;
    };

    void set_streams(unsigned n);
    bool close_call(double mean) const;
    std::optional<Threshold> threshold() const;
    Measurement plateau() const;
    void on_measured(Measurement m, TimePoint now);
    void start_ramp(TimePoint now);
    void finish_search(TimePoint now);
    void settle(unsigned n, TimePoint now);
    void start_reprobe(TimePoint now);
    void probe_down_from(unsigned base, TimePoint now);
    unsigned step(unsigned n) const noexcept { return n / 8 > 1 ? n / 8 : 1; }
    unsigned up_from(unsigned n) const noexcept;

    StreamTunerConfig config_;
    unsigned min_streams_;
    unsigned max_streams_;
    unsigned streams_;
    Phase phase_ = Phase::ramp;

    // Measured in the current search, by stream count.
    std::map<unsigned, Measurement> measured_;
    unsigned ramp_prev_ = 0;       // ramp: the count measured before the current one (0: none)
    unsigned search_floor_ = 0;    // the search never goes at or below this count
    unsigned probe_base_ = 0;      // probe_up/probe_down: the count being compared against
    unsigned reprobe_origin_ = 0;  // the settled count a periodic re-probe started from

    // The current step.
    unsigned skip_ = 0;
    unsigned count_ = 0;
    double sum_ = 0;
    double sum_sq_ = 0;

    // Pooled relative variance of single samples around their step's mean.
    double noise_sum_sq_ = 0;
    double noise_dof_ = 0;

    // Settled: the average aggregate since settling (a bounded window), and when it settled.
    Measurement settled_;
    TimePoint settled_at_{};
    double per_stream_bytes_per_s_ = 0;
};

}  // namespace planner
