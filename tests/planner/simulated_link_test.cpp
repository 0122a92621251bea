// The planner pieces together on a simulated link, the way the engine drives them: workers take
// items from the FairScheduler, move them in 256 KiB pieces, charge each piece to the
// RateLimiter and stay paused for the wait it returns; a StreamTuner picks the stream count from
// per-second measurements. Time is simulated: minutes of link time run in milliseconds.
#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <random>
#include <vector>

#include "planner/scheduler.h"
#include "planner/stream_tuner.h"
#include "planner/token_bucket.h"
#include "tests/planner/sim_clock.h"

using namespace std::chrono;
using planner::FairScheduler;
using planner::Priority;
using planner::RateLimiter;
using planner::StreamTuner;
using planner::TimePoint;
using planner::TokenBucket;
using planner::test::SimClock;

namespace {

constexpr uint64_t kKiB = 1024;
constexpr uint64_t kMiB = 1024 * kKiB;
constexpr uint64_t kPieceBytes = 256 * kKiB;
constexpr double k100Mbit = 100e6 / 8;

nanoseconds wire_time(uint64_t bytes, double bytes_per_s) {
    return nanoseconds(static_cast<int64_t>(static_cast<double>(bytes) / bytes_per_s * 1e9));
}

// Workers moving scheduler items across limited links.
struct LinkSim {
    struct Worker {
        enum class State { idle, receiving, paused };
        std::string link;
        TimePoint next;  // when its next event happens
        State state = State::idle;
        uint64_t task = 0;
        uint64_t left_bytes = 0;  // of the current item
    };

    SimClock clk;
    TimePoint start = clk.now;
    RateLimiter limiter{clk.now};
    FairScheduler scheduler;
    std::map<std::pair<uint64_t, uint64_t>, uint64_t> item_bytes;
    std::vector<Worker> workers;
    double worker_wire_bytes_per_s = 40e6;  // each connection alone could go 320 Mbit/s
    std::map<uint64_t, uint64_t> delivered_by_task;
    std::map<std::string, uint64_t> delivered_by_link;
    std::vector<uint64_t> delivered_by_second;

    void add_workers(const std::string& link, int n) {
        for (int i = 0; i < n; ++i) workers.push_back(Worker{link, clk.now});
    }

    nanoseconds next_piece_time(const Worker& w) const {
        return wire_time(std::min(kPieceBytes, w.left_bytes), worker_wire_bytes_per_s);
    }

    // Runs until start + d; pieces landing at or before it are counted.
    void run(nanoseconds d) {
        using State = Worker::State;
        const TimePoint end = start + d;
        for (;;) {
            auto w = std::min_element(workers.begin(), workers.end(),
                                      [](const Worker& a, const Worker& b) { return a.next < b.next; });
            if (w == workers.end() || w->next > end) break;
            clk.now = w->next;
            switch (w->state) {
            case State::idle:
            case State::paused:
                // The timer fired: look again, other transfers may have charged the link.
                if (const nanoseconds wait = limiter.wait_time(w->link, clk.now); wait > nanoseconds::zero()) {
                    w->next = clk.now + wait;
                    break;
                }
                if (w->state == State::idle) {
                    const auto item = scheduler.next();
                    if (!item) {
                        w->next = TimePoint::max();  // nothing more is queued
                        break;
                    }
                    w->task = item->first;
                    w->left_bytes = item_bytes.at(*item);
                }
                w->state = State::receiving;
                w->next = clk.now + next_piece_time(*w);
                break;
            case State::receiving: {
                // A piece landed: count it, charge it, obey the wait before the next one moves.
                const uint64_t piece = std::min(kPieceBytes, w->left_bytes);
                w->left_bytes -= piece;
                delivered_by_task[w->task] += piece;
                delivered_by_link[w->link] += piece;
                const auto second = static_cast<size_t>(duration_cast<seconds>(clk.now - start).count());
                if (delivered_by_second.size() <= second) delivered_by_second.resize(second + 1);
                delivered_by_second[second] += piece;
                const nanoseconds wait = limiter.consume(w->link, piece, clk.now);
                w->state = w->left_bytes == 0 ? State::idle : State::paused;
                w->next = clk.now + wait;
                break;
            }
            }
        }
    }

    uint64_t total_delivered() const {
        uint64_t t = 0;
        for (const auto& [task, b] : delivered_by_task) t += b;
        return t;
    }
};

TEST(SimulatedLink, A100MbitCapHoldsWithin5PercentOver10Seconds) {
    for (int workers : {1, 4, 16}) {
        LinkSim sim;
        sim.limiter.set_link("eu>us", k100Mbit, 1 * kMiB, sim.clk.now);
        sim.scheduler.add_task(1, 1, Priority::bulk);
        for (uint64_t i = 0; i < 2000; ++i) {
            sim.item_bytes[{1, i}] = 3 * kMiB + i % 7 * kMiB;
            sim.scheduler.enqueue(1, i, sim.item_bytes[{1, i}]);
        }
        sim.add_workers("eu>us", workers);
        sim.run(seconds(10));
        const double rate = static_cast<double>(sim.total_delivered()) / 10.0;
        EXPECT_NEAR(rate, k100Mbit, k100Mbit * 0.05) << workers << " workers";
        // And second by second, after the first (which carries the initial burst).
        ASSERT_GE(sim.delivered_by_second.size(), 10u);
        for (size_t s = 1; s < 10; ++s)
            EXPECT_NEAR(static_cast<double>(sim.delivered_by_second[s]), k100Mbit, k100Mbit * 0.05)
                << workers << " workers, second " << s;
    }
}

TEST(SimulatedLink, LinkCapsAndTheGlobalCapHoldTogether) {
    LinkSim sim;
    sim.limiter.set_link("eu>us", k100Mbit, 1 * kMiB, sim.clk.now);
    sim.limiter.set_link("eu>ap", k100Mbit, 1 * kMiB, sim.clk.now);
    sim.limiter.set_global(1.5 * k100Mbit, 1 * kMiB, sim.clk.now);
    sim.scheduler.add_task(1, 1, Priority::bulk);
    for (uint64_t i = 0; i < 2000; ++i) {
        sim.item_bytes[{1, i}] = 4 * kMiB;
        sim.scheduler.enqueue(1, i, 4 * kMiB);
    }
    sim.add_workers("eu>us", 4);
    sim.add_workers("eu>ap", 4);
    sim.run(seconds(10));
    EXPECT_NEAR(static_cast<double>(sim.total_delivered()) / 10.0, 1.5 * k100Mbit, 1.5 * k100Mbit * 0.05);
    EXPECT_LE(static_cast<double>(sim.delivered_by_link["eu>us"]) / 10.0, k100Mbit * 1.05);
    EXPECT_LE(static_cast<double>(sim.delivered_by_link["eu>ap"]) / 10.0, k100Mbit * 1.05);
}

TEST(SimulatedLink, TwoEqualTasksShareACappedLinkFiftyFifty) {
    for (uint64_t seed : {1, 2, 3}) {
        std::mt19937_64 rng(seed);
        LinkSim sim;
        sim.limiter.set_link("eu>us", k100Mbit, 1 * kMiB, sim.clk.now);
        sim.scheduler.add_task(1, 1, Priority::manual);
        sim.scheduler.add_task(2, 1, Priority::manual);
        // Items are chunks of blobs (the engine cuts blobs at StreamTuner::chunk_bytes), mixed
        // sizes, and the two tasks have different mixes: task 1 many small, task 2 fewer big.
        for (uint64_t i = 0; i < 4000; ++i) {
            const uint64_t small = 16 * kKiB + rng() % (1 * kMiB);
            const uint64_t big = 4 * kMiB + rng() % (4 * kMiB);
            sim.item_bytes[{1, i}] = small;
            sim.item_bytes[{2, i}] = big;
            sim.scheduler.enqueue(1, i, small);
            sim.scheduler.enqueue(2, i, big);
        }
        sim.add_workers("eu>us", 6);
        sim.run(seconds(60));
        ASSERT_GT(sim.scheduler.pending(1), 0u);  // both stayed backlogged
        ASSERT_GT(sim.scheduler.pending(2), 0u);
        const double a = static_cast<double>(sim.delivered_by_task[1]);
        const double b = static_cast<double>(sim.delivered_by_task[2]);
        EXPECT_NEAR(a / (a + b), 0.5, 0.025) << "seed " << seed;  // 50/50 within 5% of each half
        EXPECT_NEAR((a + b) / 60.0, k100Mbit, k100Mbit * 0.05);
    }
}

TEST(SimulatedLink, EventWorkOvertakesABackfillOnASharedCap) {
    LinkSim sim;
    sim.limiter.set_link("eu>us", k100Mbit, 1 * kMiB, sim.clk.now);
    sim.scheduler.add_task(1, 1, Priority::bulk);
    for (uint64_t i = 0; i < 4000; ++i) {
        sim.item_bytes[{1, i}] = 2 * kMiB;
        sim.scheduler.enqueue(1, i, 2 * kMiB);
    }
    sim.add_workers("eu>us", 4);
    sim.run(seconds(5));
    const uint64_t bulk_before = sim.delivered_by_task[1];
    // A push: 40 MiB of event work arrives at t = 5 s.
    sim.scheduler.add_task(2, 1, Priority::event);
    for (uint64_t i = 0; i < 20; ++i) {
        sim.item_bytes[{2, i}] = 2 * kMiB;
        sim.scheduler.enqueue(2, i, 2 * kMiB);
    }
    sim.run(seconds(10));
    // 40 MiB at 12.5 MB/s is ~3.4 s; with 7/8 of the link it is done well within 5 s.
    EXPECT_EQ(sim.scheduler.pending(2), 0u);
    EXPECT_EQ(sim.delivered_by_task[2], 40 * kMiB);
    // The backfill kept moving meanwhile.
    EXPECT_GT(sim.delivered_by_task[1] - bulk_before, 4 * kMiB);
}

// A shaped link: each stream capped at a tenth of the total (a per-connection policer, or
// window / RTT), the total capped too; both modelled as token buckets the pieces must pass.
TEST(SimulatedLink, StreamCountConvergesWhenEachStreamGetsATenth) {
    for (uint64_t seed : {1, 2, 3, 4, 5}) {
        std::mt19937_64 rng(seed);
        std::uniform_real_distribution<double> jitter(0.0, 0.1);
        SimClock clk;
        const TimePoint start = clk.now;
        const double total = 125e6;  // 1 Gbit/s
        const double per_stream = total / 10;
        TokenBucket link(total, kPieceBytes, clk.now);
        struct Stream {
            TokenBucket policer;
            TimePoint next;
        };
        std::vector<Stream> streams;
        StreamTuner tuner(1, 16);
        auto resize = [&](unsigned n) {
            while (streams.size() > n) streams.pop_back();
            while (streams.size() < n) streams.push_back(Stream{TokenBucket(per_stream, 0, clk.now), clk.now});
        };
        resize(tuner.streams());
        std::vector<unsigned> history;
        uint64_t bytes_this_second = 0;
        TimePoint second_end = start + seconds(1);
        while (clk.now - start < seconds(300)) {
            auto s = std::min_element(streams.begin(), streams.end(),
                                      [](const Stream& a, const Stream& b) { return a.next < b.next; });
            if (s->next >= second_end) {
                clk.now = second_end;
                tuner.on_sample(static_cast<double>(bytes_this_second), clk.now);
                history.push_back(tuner.streams());
                bytes_this_second = 0;
                second_end += seconds(1);
                resize(tuner.streams());
                continue;
            }
            clk.now = s->next;
            bytes_this_second += kPieceBytes;
            const nanoseconds wait = std::max(s->policer.consume(kPieceBytes, clk.now), link.consume(kPieceBytes, clk.now));
            // Jitter: a stream is sometimes a little late (ACK compression, cross traffic).
            s->next = clk.now + wait + duration_cast<nanoseconds>(wait * jitter(rng));
        }
        // Converged within the first minute, then held in 9..12.
        ASSERT_GE(history.size(), 300u);
        for (size_t i = 60; i < history.size(); ++i) {
            EXPECT_GE(history[i], 9u) << "seed " << seed << " t=" << i;
            EXPECT_LE(history[i], 12u) << "seed " << seed << " t=" << i;
        }
        EXPECT_TRUE(tuner.settled() || history.back() >= 9u);
    }
}

}  // namespace
