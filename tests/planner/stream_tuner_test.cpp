#include "planner/stream_tuner.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <random>

#include "tests/planner/sim_clock.h"

using namespace std::chrono;
using planner::StreamTuner;
using planner::StreamTunerConfig;
using planner::test::SimClock;

namespace {

constexpr uint64_t kMiB = 1024 * 1024;

// A link whose aggregate is min(n * per_stream, total), times uniform noise of +-noise.
struct SimLink {
    double total_bytes_per_s;
    double per_stream_bytes_per_s;
    double noise;
    std::mt19937_64 rng;

    double sample(unsigned streams) {
        const double clean = std::min(streams * per_stream_bytes_per_s, total_bytes_per_s);
        std::uniform_real_distribution<double> u(-noise, noise);
        return clean * (1 + u(rng));
    }
};

struct TunerRun {
    int first_settled_s = -1;     // when the tuner first settled
    unsigned min_after = ~0u;     // stream counts seen after it first settled
    unsigned max_after = 0;
    int settled_samples = 0;
};

// One sample per simulated second for `seconds_total`.
TunerRun drive(StreamTuner& t, SimLink& link, SimClock& clk, int seconds_total) {
    TunerRun r;
    for (int s = 0; s < seconds_total; ++s) {
        clk.advance(seconds(1));
        t.on_sample(link.sample(t.streams()), clk.now);
        if (r.first_settled_s < 0 && t.settled()) r.first_settled_s = s;
        if (r.first_settled_s >= 0) {
            r.min_after = std::min(r.min_after, t.streams());
            r.max_after = std::max(r.max_after, t.streams());
            r.settled_samples += t.settled();
        }
    }
    return r;
}

TEST(StreamTuner, StartsSmall) {
    StreamTuner t;
    EXPECT_LE(t.streams(), 2u);
    EXPECT_FALSE(t.settled());
    EXPECT_EQ(t.per_stream_bytes_per_s(), 0);
}

TEST(StreamTuner, ConvergesToTenStreamsWhenEachStreamGetsATenthAndStaysThere) {
    // Many seeds: the claim is about the algorithm, not one lucky noise sequence.
    for (uint64_t seed = 1; seed <= 25; ++seed) {
        SimClock clk;
        SimLink link{125e6, 12.5e6, 0.05, std::mt19937_64(seed)};  // 1 Gbit/s, 100 Mbit/s per stream
        StreamTuner t(1, 16);
        const TunerRun r = drive(t, link, clk, 600);
        ASSERT_GE(r.first_settled_s, 0) << "seed " << seed;
        EXPECT_LE(r.first_settled_s, 60) << "seed " << seed;
        EXPECT_GE(r.min_after, 9u) << "seed " << seed;
        EXPECT_LE(r.max_after, 12u) << "seed " << seed;
        EXPECT_GE(t.streams(), 9u);
        EXPECT_LE(t.streams(), 12u);
        EXPECT_GT(r.settled_samples, 450) << "seed " << seed;  // mostly settled, not forever probing
    }
}

TEST(StreamTuner, FindsTheKneeOnOtherLinks) {
    struct Case {
        double per_stream_fraction;  // of the total
        unsigned max_streams;
        unsigned lo, hi;
    };
    for (const Case& c : {Case{1.0, 16, 1, 1}, Case{0.25, 16, 4, 5}, Case{1.0 / 3, 16, 3, 4},
                          Case{1.0 / 30, 64, 27, 36}, Case{1.0 / 100, 16, 16, 16}}) {
        for (uint64_t seed = 1; seed <= 5; ++seed) {
            SimClock clk;
            SimLink link{100e6, 100e6 * c.per_stream_fraction, 0.03, std::mt19937_64(seed)};
            StreamTuner t(1, c.max_streams);
            drive(t, link, clk, 300);
            EXPECT_GE(t.streams(), c.lo) << c.per_stream_fraction << " seed " << seed;
            EXPECT_LE(t.streams(), c.hi) << c.per_stream_fraction << " seed " << seed;
        }
    }
}

// Drives for `seconds_total` and returns the count held most of the last `tail_s` seconds (a
// re-probe may be one step off at any given instant).
unsigned held_count(StreamTuner& t, SimLink& link, SimClock& clk, int seconds_total, int tail_s) {
    std::map<unsigned, int> seen;
    for (int s = 0; s < seconds_total; ++s) {
        clk.advance(seconds(1));
        t.on_sample(link.sample(t.streams()), clk.now);
        if (s >= seconds_total - tail_s) ++seen[t.streams()];
    }
    return std::max_element(seen.begin(), seen.end(), [](const auto& a, const auto& b) { return a.second < b.second; })
        ->first;
}

TEST(StreamTuner, FollowsTheLinkWhenItChanges) {
    for (uint64_t seed : {9, 10, 11}) {
        SimClock clk;
        SimLink link{125e6, 12.5e6, 0.03, std::mt19937_64(seed)};
        StreamTuner t(1, 64);
        EXPECT_NEAR(held_count(t, link, clk, 120, 60), 10, 1) << seed;
        // Per-stream shaping tightens (a 50 Mbit/s per-connection policy appears): the aggregate
        // halves, which starts a new search at once; it ramps up to about 20.
        link.per_stream_bytes_per_s = 6.25e6;
        EXPECT_NEAR(held_count(t, link, clk, 180, 60), 20, 2) << seed;
        // It loosens again (200 Mbit/s per stream): the aggregate does not change, but the
        // periodic re-probes find that fewer streams do as well and step down to about 5.
        link.per_stream_bytes_per_s = 25e6;
        EXPECT_NEAR(held_count(t, link, clk, 600, 120), 5, 1) << seed;
    }
}

TEST(StreamTuner, MinEqualsMaxHoldsStill) {
    SimClock clk;
    SimLink link{125e6, 12.5e6, 0.05, std::mt19937_64(1)};
    StreamTuner t(4, 4);
    const TunerRun r = drive(t, link, clk, 200);
    EXPECT_EQ(r.min_after, 4u);
    EXPECT_EQ(r.max_after, 4u);
}

TEST(StreamTuner, IgnoresNonsenseSamples) {
    SimClock clk;
    StreamTunerConfig cfg;
    cfg.warmup_samples = 0;
    cfg.samples_per_step = 1;
    StreamTuner t(1, 16, cfg);
    const unsigned before = t.streams();
    t.on_sample(std::nan(""), clk.now);
    t.on_sample(-1, clk.now);
    t.on_sample(HUGE_VAL, clk.now);
    EXPECT_EQ(t.streams(), before);
    EXPECT_EQ(t.per_stream_bytes_per_s(), 0);
    t.on_sample(10e6, clk.now);  // first real measurement: ramp doubles
    EXPECT_EQ(t.streams(), before * 2);
    EXPECT_DOUBLE_EQ(t.per_stream_bytes_per_s(), 10e6 / before);
}

TEST(StreamTuner, WarmupSamplesAreDiscardedAfterEachChange) {
    SimClock clk;
    StreamTunerConfig cfg;
    cfg.warmup_samples = 2;
    cfg.samples_per_step = 1;
    StreamTuner t(1, 16, cfg);
    const unsigned s0 = t.streams();
    t.on_sample(1e6, clk.now);
    t.on_sample(1e6, clk.now);
    EXPECT_EQ(t.streams(), s0);  // both discarded
    t.on_sample(1e6, clk.now);
    EXPECT_EQ(t.streams(), 2 * s0);
}

TEST(StreamTuner, ChunkSizeRules) {
    StreamTuner t(1, 16);
    // Nothing measured yet: the minimum.
    EXPECT_EQ(t.chunk_bytes(100 * kMiB, milliseconds(40)), 8 * kMiB);
    EXPECT_EQ(t.chunk_bytes(1, microseconds(0)), 8 * kMiB);
    // Grows with blob size: 1 GiB / 64 = 16 MiB; 4 GiB and more: the 64 MiB cap.
    EXPECT_EQ(t.chunk_bytes(1024 * kMiB, microseconds(0)), 16 * kMiB);
    EXPECT_EQ(t.chunk_bytes(4096 * kMiB, microseconds(0)), 64 * kMiB);
    EXPECT_EQ(t.chunk_bytes(~uint64_t{0}, microseconds(0)), 64 * kMiB);

    // Grows with the bandwidth-delay product: 12.5 MB/s per stream at 100 ms RTT is 1.25 MB;
    // 16 of them is 20 MB, rounded up to 20 MiB.
    SimClock clk;
    StreamTunerConfig cfg;
    cfg.warmup_samples = 0;
    cfg.samples_per_step = 1;
    cfg.start_streams = 1;
    StreamTuner m(1, 16, cfg);
    m.on_sample(12.5e6, clk.now);
    EXPECT_DOUBLE_EQ(m.per_stream_bytes_per_s(), 12.5e6);
    EXPECT_EQ(m.chunk_bytes(10 * kMiB, milliseconds(100)), 20 * kMiB);
    EXPECT_EQ(m.chunk_bytes(10 * kMiB, milliseconds(10)), 8 * kMiB);
    EXPECT_EQ(m.chunk_bytes(10 * kMiB, seconds(10)), 64 * kMiB);
    EXPECT_EQ(m.chunk_bytes(10 * kMiB, microseconds(-5)), 8 * kMiB);
    for (int rtt_ms = 0; rtt_ms < 2000; rtt_ms += 7)
        for (uint64_t blob : {uint64_t{0}, 3 * kMiB, 700 * kMiB, 9000 * kMiB}) {
            const uint64_t c = m.chunk_bytes(blob, milliseconds(rtt_ms));
            EXPECT_EQ(c % (4 * kMiB), 0u);
            EXPECT_GE(c, 5 * kMiB);
            EXPECT_LE(c, 64 * kMiB);
        }
}

}  // namespace
