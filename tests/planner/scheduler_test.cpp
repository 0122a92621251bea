#include "planner/scheduler.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <random>
#include <vector>

using planner::FairScheduler;
using planner::FairSchedulerConfig;
using planner::Priority;

namespace {

constexpr uint64_t kKiB = 1024;
constexpr uint64_t kMiB = 1024 * kKiB;

// Item sizes like a registry's: many small (configs, small layers), some large layers.
uint64_t mixed_size(std::mt19937_64& rng) {
    switch (rng() % 4) {
    case 0: return 1 * kKiB + rng() % (64 * kKiB);
    case 1: return 64 * kKiB + rng() % (1 * kMiB);
    case 2: return 1 * kMiB + rng() % (8 * kMiB);
    default: return 8 * kMiB + rng() % (24 * kMiB);
    }
}

struct Tally {
    std::map<uint64_t, uint64_t> bytes;  // by task
    std::map<uint64_t, uint64_t> picks;
};

// Pulls `n` picks; `cost` maps {task,item} back to the item's cost.
Tally pull(FairScheduler& s, int n, const std::map<std::pair<uint64_t, uint64_t>, uint64_t>& cost) {
    Tally t;
    for (int i = 0; i < n; ++i) {
        const auto p = s.next();
        EXPECT_TRUE(p.has_value());
        if (!p) break;
        t.bytes[p->first] += cost.at(*p);
        ++t.picks[p->first];
    }
    return t;
}

TEST(FairScheduler, EmptyAndUnknown) {
    FairScheduler s;
    EXPECT_FALSE(s.next().has_value());
    EXPECT_EQ(s.pending(), 0u);
    EXPECT_FALSE(s.enqueue(7, 1, 100));  // task not registered
    EXPECT_EQ(s.pending(), 0u);
    EXPECT_EQ(s.remove_task(7), 0u);
}

TEST(FairScheduler, FifoWithinATask) {
    FairScheduler s;
    s.add_task(1, 1, Priority::bulk);
    for (uint64_t i = 0; i < 10; ++i) ASSERT_TRUE(s.enqueue(1, i, (i % 3 + 1) * kMiB));
    EXPECT_EQ(s.pending(), 10u);
    EXPECT_EQ(s.pending(1), 10u);
    for (uint64_t i = 0; i < 10; ++i) {
        const auto p = s.next();
        ASSERT_TRUE(p);
        EXPECT_EQ(p->first, 1u);
        EXPECT_EQ(p->second, i);
    }
    EXPECT_FALSE(s.next());
}

// Two tasks, each with `n` items of mixed sizes; returns the cost map.
std::map<std::pair<uint64_t, uint64_t>, uint64_t> fill(FairScheduler& s, std::mt19937_64& rng,
                                                        std::initializer_list<uint64_t> tasks, int n) {
    std::map<std::pair<uint64_t, uint64_t>, uint64_t> cost;
    for (int i = 0; i < n; ++i)
        for (uint64_t t : tasks) {
            const uint64_t c = mixed_size(rng);
            cost[{t, static_cast<uint64_t>(i)}] = c;
            EXPECT_TRUE(s.enqueue(t, static_cast<uint64_t>(i), c));
        }
    return cost;
}

TEST(FairScheduler, EqualTasksGetEqualByteShares) {
    for (uint64_t quantum : {64 * kKiB, 1 * kMiB, 32 * kMiB}) {
        std::mt19937_64 rng(42);
        FairScheduler s(FairSchedulerConfig{quantum, 1.0 / 8});
        s.add_task(1, 1, Priority::bulk);
        s.add_task(2, 1, Priority::bulk);
        const auto cost = fill(s, rng, {1, 2}, 3000);
        const Tally t = pull(s, 3000, cost);  // both stay backlogged throughout
        ASSERT_GT(s.pending(1), 0u);
        ASSERT_GT(s.pending(2), 0u);
        const double ratio = static_cast<double>(t.bytes.at(1)) / static_cast<double>(t.bytes.at(2));
        EXPECT_NEAR(ratio, 1.0, 0.05) << "quantum " << quantum;
    }
}

TEST(FairScheduler, WeightsTwoToOneGiveTwoToOne) {
    std::mt19937_64 rng(7);
    FairScheduler s;
    s.add_task(1, 2, Priority::manual);
    s.add_task(2, 1, Priority::manual);
    const auto cost = fill(s, rng, {1, 2}, 4000);
    const Tally t = pull(s, 4000, cost);
    ASSERT_GT(s.pending(1), 0u);
    ASSERT_GT(s.pending(2), 0u);
    const double ratio = static_cast<double>(t.bytes.at(1)) / static_cast<double>(t.bytes.at(2));
    EXPECT_NEAR(ratio, 2.0, 0.1);
}

TEST(FairScheduler, ItemsFarLargerThanTheQuantumStillAlternateFairly) {
    FairScheduler s(FairSchedulerConfig{1, 0.125});  // a quantum of one byte
    s.add_task(1, 1, Priority::bulk);
    s.add_task(2, 1, Priority::bulk);
    for (uint64_t i = 0; i < 100; ++i) {
        s.enqueue(1, i, 1ull << 40);  // 1 TiB items: would be 2^40 DRR rounds each if looped
        s.enqueue(2, i, 1ull << 40);
    }
    std::map<uint64_t, int> picks;
    for (int i = 0; i < 100; ++i) ++picks[s.next()->first];
    EXPECT_EQ(picks[1], 50);
    EXPECT_EQ(picks[2], 50);
}

TEST(FairScheduler, EventWorkGoesAheadOfBulkWithoutStarvingIt) {
    std::mt19937_64 rng(3);
    FairScheduler s;  // lower_class_share 1/8
    s.add_task(10, 1, Priority::bulk);
    std::map<std::pair<uint64_t, uint64_t>, uint64_t> cost;
    for (uint64_t i = 0; i < 5000; ++i) {
        cost[{10, i}] = mixed_size(rng);
        s.enqueue(10, i, cost[{10, i}]);
    }
    // Bulk runs alone for a while.
    for (int i = 0; i < 10; ++i) EXPECT_EQ(s.next()->first, 10u);
    // A push arrives: its work goes next.
    s.add_task(20, 1, Priority::event);
    for (uint64_t i = 0; i < 5000; ++i) {
        cost[{20, i}] = mixed_size(rng);
        s.enqueue(20, i, cost[{20, i}]);
    }
    EXPECT_EQ(s.next()->first, 20u);
    const Tally t = pull(s, 3000, cost);
    ASSERT_GT(s.pending(10), 0u);
    ASSERT_GT(s.pending(20), 0u);
    const double bulk_share =
        static_cast<double>(t.bytes.at(10)) / static_cast<double>(t.bytes.at(10) + t.bytes.at(20));
    EXPECT_NEAR(bulk_share, 0.125, 0.02);  // not starved: its guaranteed eighth
    EXPECT_GT(t.picks.at(10), 100u);
    // Bulk's turns come back within a bounded number of event picks.
    int longest_gap = 0;
    int gap = 0;
    for (int i = 0; i < 1000; ++i) {
        if (s.next()->first == 10) {
            longest_gap = std::max(longest_gap, gap);
            gap = 0;
        } else {
            ++gap;
        }
    }
    EXPECT_LT(longest_gap, 200);
}

TEST(FairScheduler, ThreeClassesGetTheDocumentedShares) {
    std::mt19937_64 rng(11);
    FairScheduler s;
    s.add_task(1, 1, Priority::event);
    s.add_task(2, 1, Priority::manual);
    s.add_task(3, 1, Priority::bulk);
    const auto cost = fill(s, rng, {1, 2, 3}, 6000);
    const Tally t = pull(s, 6000, cost);
    for (uint64_t task : {1, 2, 3}) ASSERT_GT(s.pending(task), 0u);
    const double total = static_cast<double>(t.bytes.at(1) + t.bytes.at(2) + t.bytes.at(3));
    EXPECT_NEAR(t.bytes.at(1) / total, 0.766, 0.02);
    EXPECT_NEAR(t.bytes.at(2) / total, 0.109, 0.02);
    EXPECT_NEAR(t.bytes.at(3) / total, 0.125, 0.02);
}

TEST(FairScheduler, ShareZeroIsStrictPriority) {
    FairScheduler s(FairSchedulerConfig{1 * kMiB, 0});
    s.add_task(1, 1, Priority::event);
    s.add_task(2, 1, Priority::bulk);
    for (uint64_t i = 0; i < 100; ++i) {
        s.enqueue(1, i, kMiB);
        s.enqueue(2, i, kMiB);
    }
    for (int i = 0; i < 100; ++i) EXPECT_EQ(s.next()->first, 1u);
    for (int i = 0; i < 100; ++i) EXPECT_EQ(s.next()->first, 2u);
}

TEST(FairScheduler, ALowerClassAloneGetsEverything) {
    FairScheduler s;
    s.add_task(1, 1, Priority::bulk);
    s.add_task(2, 1, Priority::manual);
    for (uint64_t i = 0; i < 10; ++i) s.enqueue(1, i, kMiB);
    for (int i = 0; i < 10; ++i) EXPECT_EQ(s.next()->first, 1u);
    EXPECT_FALSE(s.next());
}

TEST(FairScheduler, RemoveTaskDropsItsItems) {
    FairScheduler s;
    s.add_task(1, 1, Priority::bulk);
    s.add_task(2, 1, Priority::bulk);
    for (uint64_t i = 0; i < 5; ++i) {
        s.enqueue(1, i, kMiB);
        s.enqueue(2, i, kMiB);
    }
    EXPECT_EQ(s.remove_task(1), 5u);
    EXPECT_FALSE(s.has_task(1));
    EXPECT_EQ(s.pending(), 5u);
    for (int i = 0; i < 5; ++i) EXPECT_EQ(s.next()->first, 2u);
    EXPECT_FALSE(s.next());
    EXPECT_FALSE(s.enqueue(1, 9, kMiB));
}

TEST(FairScheduler, ChangingClassMovesQueuedItems) {
    FairScheduler s(FairSchedulerConfig{1 * kMiB, 0});
    s.add_task(1, 1, Priority::bulk);
    s.add_task(2, 1, Priority::manual);
    for (uint64_t i = 0; i < 3; ++i) {
        s.enqueue(1, i, kMiB);
        s.enqueue(2, i, kMiB);
    }
    s.add_task(1, 1, Priority::event);  // promoted: a user is now waiting for it
    for (int i = 0; i < 3; ++i) EXPECT_EQ(s.next()->first, 1u);
    for (int i = 0; i < 3; ++i) EXPECT_EQ(s.next()->first, 2u);
    EXPECT_EQ(s.pending(), 0u);
}

TEST(FairScheduler, ZeroCostAndZeroWeightAreTolerated) {
    FairScheduler s(FairSchedulerConfig{0, 0.125});
    s.add_task(1, 0, Priority::bulk);
    s.add_task(2, 0, Priority::bulk);
    for (uint64_t i = 0; i < 50; ++i) {
        s.enqueue(1, i, 0);
        s.enqueue(2, i, 0);
    }
    std::map<uint64_t, int> picks;
    for (int i = 0; i < 100; ++i) ++picks[s.next()->first];
    EXPECT_EQ(picks[1], 50);
    EXPECT_EQ(picks[2], 50);
}

// --- task slots ----------------------------------------------------------------------------

using planner::may_start_task;
using planner::TaskSlots;

TEST(TaskSlots, EventsTakeTheExtraSlotsScansDoNot) {
    const TaskSlots slots{2, 2};
    // Scans alone: --max-tasks.
    EXPECT_TRUE(may_start_task(slots, false, 0, 1, false));
    EXPECT_FALSE(may_start_task(slots, false, 0, 2, false));
    // Events beside two scans: the two extra slots.
    EXPECT_TRUE(may_start_task(slots, true, 0, 2, false));
    EXPECT_TRUE(may_start_task(slots, true, 1, 2, false));
    EXPECT_FALSE(may_start_task(slots, true, 2, 2, false));
    // Events alone, nothing else waiting: all four.
    EXPECT_TRUE(may_start_task(slots, true, 3, 0, false));
    EXPECT_FALSE(may_start_task(slots, true, 4, 0, false));
}

TEST(TaskSlots, AWaitingScanKeepsOneSlot) {
    const TaskSlots slots{2, 2};
    // Three events run, a scan waits and none runs: the last slot is the scan's.
    EXPECT_FALSE(may_start_task(slots, true, 3, 0, true));
    EXPECT_TRUE(may_start_task(slots, false, 3, 0, true));
    EXPECT_FALSE(may_start_task(slots, false, 4, 0, true));  // never beyond all the slots
    // Once a scan runs, events may fill the rest again.
    EXPECT_TRUE(may_start_task(slots, true, 2, 1, true));
    // A second scan still needs a --max-tasks slot.
    EXPECT_FALSE(may_start_task(slots, false, 2, 1, true));
}

// A stream of pushes, one event task per tick (each runs 3 ticks), and one scan queued from the
// start (it runs 10 ticks): the scan starts at once and finishes, whatever the events do.
TEST(TaskSlots, AStreamOfEventsDoesNotStarveAScan) {
    for (size_t max_running : {1u, 2u, 4u}) {
        const TaskSlots slots{max_running, 2};
        std::vector<int> events;  // ticks left of each running event task
        int scan_left = -1;       // -1: queued
        size_t queued_events = 0;
        int scan_started = -1;
        for (int tick = 0; tick < 200 && scan_left != 0; ++tick) {
            ++queued_events;
            // Events first, as the daemon dispatches them.
            while (queued_events > 0 &&
                   may_start_task(slots, true, events.size(), scan_left > 0 ? 1 : 0, scan_left < 0)) {
                events.push_back(3);
                --queued_events;
            }
            if (scan_left < 0 && may_start_task(slots, false, events.size(), 0, true)) {
                scan_left = 10;
                scan_started = tick;
            }
            ASSERT_LE(events.size() + (scan_left > 0 ? 1 : 0), max_running + 2);
            for (auto& e : events) --e;
            events.erase(std::remove(events.begin(), events.end(), 0), events.end());
            if (scan_left > 0) --scan_left;
        }
        EXPECT_EQ(scan_started, 0) << "max_running " << max_running;
        EXPECT_EQ(scan_left, 0) << "the scan never finished, max_running " << max_running;
    }
}

}  // namespace
