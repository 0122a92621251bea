#include "planner/registry_budget.h"

#include <gtest/gtest.h>

#include "tests/planner/sim_clock.h"

using namespace std::chrono;
using planner::RegistryBudget;
using planner::TimePoint;
using planner::test::SimClock;

namespace {

// Starts requests as fast as the budget allows (each finishing at once) for `d`; returns how
// many started. Checks next_start()'s promise: at that time try_start() succeeds.
int run_for(RegistryBudget& b, SimClock& clk, nanoseconds d) {
    const TimePoint end = clk.now + d;
    int started = 0;
    for (;;) {
        const TimePoint t = b.next_start(clk.now);
        if (t >= end) break;
        clk.now = t;
        EXPECT_TRUE(b.try_start(clk.now));
        b.finish();
        b.on_success(clk.now);
        ++started;
    }
    clk.now = end;
    return started;
}

TEST(RegistryBudget, ConnectionCap) {
    SimClock clk;
    RegistryBudget b(2, 0);
    EXPECT_TRUE(b.try_start(clk.now));
    EXPECT_TRUE(b.try_start(clk.now));
    EXPECT_EQ(b.in_flight(), 2u);
    EXPECT_FALSE(b.try_start(clk.now));
    EXPECT_EQ(b.next_start(clk.now), TimePoint::max());  // only a finish frees a slot
    b.finish();
    EXPECT_EQ(b.next_start(clk.now), clk.now);
    EXPECT_TRUE(b.try_start(clk.now));
}

TEST(RegistryBudget, NoCapsMeansAlwaysYes) {
    SimClock clk;
    RegistryBudget b(0, 0);
    for (int i = 0; i < 10000; ++i) ASSERT_TRUE(b.try_start(clk.now));
    EXPECT_EQ(b.in_flight(), 10000u);
    EXPECT_EQ(b.requests_per_s(), 0);
}

TEST(RegistryBudget, RequestRateHolds) {
    SimClock clk;
    RegistryBudget b(0, 10);
    const int started = run_for(b, clk, seconds(10));
    EXPECT_GE(started, 100);
    EXPECT_LE(started, 100 + 10);  // plus about one second of burst
    // Back to back after the initial burst: spaced by 1/rate.
    const TimePoint t = b.next_start(clk.now);
    EXPECT_LE(t - clk.now, milliseconds(100));
}

TEST(RegistryBudget, RetryAfterPausesTheRegistryUntilThen) {
    SimClock clk;
    RegistryBudget b(4, 0);
    ASSERT_TRUE(b.try_start(clk.now));
    b.finish();
    b.on_throttled(clk.now, milliseconds(5000));
    EXPECT_EQ(b.paused_until(), clk.now + seconds(5));
    EXPECT_EQ(b.next_start(clk.now), clk.now + seconds(5));
    clk.advance(milliseconds(4999));
    EXPECT_FALSE(b.try_start(clk.now));
    clk.advance(milliseconds(1));
    EXPECT_TRUE(b.try_start(clk.now));
}

TEST(RegistryBudget, WithoutRetryAfterThePauseGrowsExponentiallyUntilASuccess) {
    SimClock clk;
    RegistryBudget b(0, 100);
    ASSERT_TRUE(b.try_start(clk.now));
    b.finish();
    for (int step : {1, 2, 4, 8}) {
        b.on_throttled(clk.now, std::nullopt);
        EXPECT_EQ(b.paused_until(), clk.now + seconds(step)) << step;
        clk.now = b.paused_until();
    }
    b.on_success(clk.now);
    b.on_throttled(clk.now, std::nullopt);
    EXPECT_EQ(b.paused_until(), clk.now + seconds(1));
}

TEST(RegistryBudget, PauseIsCapped) {
    SimClock clk;
    planner::RegistryBudgetTuning t;
    t.pause_cap_ms = milliseconds(5000);
    RegistryBudget b(0, 0, t);
    for (int i = 0; i < 20; ++i) {
        b.on_throttled(clk.now, std::nullopt);
        EXPECT_LE(b.paused_until() - clk.now, seconds(5));
        clk.now = b.paused_until();
    }
}

TEST(RegistryBudget, AimdHalvesOncePerCongestionEvent) {
    SimClock clk;
    RegistryBudget b(0, 100);
    run_for(b, clk, seconds(3));  // sending at the full 100/s
    EXPECT_DOUBLE_EQ(b.requests_per_s(), 100);
    // Twenty requests in flight all come back 429 within a few milliseconds: one halving.
    for (int i = 0; i < 20; ++i) {
        b.on_throttled(clk.now, milliseconds(100));
        clk.advance(milliseconds(2));
    }
    EXPECT_NEAR(b.requests_per_s(), 50, 1);
    clk.advance(seconds(1));
    run_for(b, clk, milliseconds(1500));
    const double before = b.requests_per_s();
    b.on_throttled(clk.now, std::nullopt);  // a new event: halves again
    EXPECT_NEAR(b.requests_per_s(), before / 2, before * 0.1);
}

TEST(RegistryBudget, AdditiveIncreaseReturnsToTheConfiguredRateAndNoFurther) {
    SimClock clk;
    RegistryBudget b(0, 100);
    run_for(b, clk, seconds(2));
    b.on_throttled(clk.now, milliseconds(0));
    EXPECT_NEAR(b.requests_per_s(), 50, 1);
    run_for(b, clk, seconds(5));  // halfway through recovery_s (10 s)
    EXPECT_GT(b.requests_per_s(), 60);
    EXPECT_LT(b.requests_per_s(), 90);
    run_for(b, clk, seconds(10));
    EXPECT_DOUBLE_EQ(b.requests_per_s(), 100);
    const int started = run_for(b, clk, seconds(10));
    EXPECT_LE(started, 1000 + 100);
}

TEST(RegistryBudget, IdleTimeDoesNotCountAsRecovery) {
    SimClock clk;
    RegistryBudget b(0, 100);
    run_for(b, clk, seconds(2));
    b.on_throttled(clk.now, milliseconds(0));
    const double low = b.requests_per_s();
    clk.advance(minutes(10));
    b.on_success(clk.now);  // one success after a long idle spell: one second's worth
    EXPECT_LE(b.requests_per_s(), low + (100 - low) / 10 + 1e-9);
}

TEST(RegistryBudget, HalvesWhatWasSentNotAnUnusedCap) {
    SimClock clk;
    RegistryBudget b(0, 1000);
    // Only about 4 requests a second go out (the work is slow), far under the cap.
    for (int i = 0; i < 12; ++i) {
        ASSERT_TRUE(b.try_start(clk.now));
        b.finish();
        clk.advance(milliseconds(250));
    }
    b.on_throttled(clk.now, milliseconds(0));
    EXPECT_LE(b.requests_per_s(), 3);
    EXPECT_GE(b.requests_per_s(), 0.5);
}

TEST(RegistryBudget, UnlimitedRegistryLearnsACeilingFromItsFirst429) {
    SimClock clk;
    RegistryBudget b(0, 0);
    for (int s = 0; s < 3; ++s)
        for (int i = 0; i < 200; ++i) {
            ASSERT_TRUE(b.try_start(clk.now));
            b.finish();
            clk.advance(milliseconds(5));  // 200/s
        }
    b.on_throttled(clk.now, milliseconds(0));
    EXPECT_NEAR(b.requests_per_s(), 100, 5);
    run_for(b, clk, seconds(30));
    EXPECT_NEAR(b.requests_per_s(), 200, 5);  // back to the rate that drew the 429, no further
}

TEST(RegistryBudget, RemainingZeroPausesUntilTheReset) {
    SimClock clk;
    RegistryBudget b(0, 0);
    b.on_rate_headers(clk.now, 0L, 30L);
    EXPECT_FALSE(b.try_start(clk.now));
    EXPECT_EQ(b.next_start(clk.now), clk.now + seconds(30));
    clk.advance(seconds(30));
    EXPECT_TRUE(b.try_start(clk.now));

    b.on_rate_headers(clk.now, 0L, std::nullopt);  // no reset sent: one pause step
    EXPECT_EQ(b.next_start(clk.now), clk.now + seconds(1));
}

TEST(RegistryBudget, RemainingIsAQuotaUntilTheReset) {
    SimClock clk;
    RegistryBudget b(0, 0);
    b.on_rate_headers(clk.now, 3L, 10L);
    for (int i = 0; i < 3; ++i) EXPECT_TRUE(b.try_start(clk.now));
    EXPECT_FALSE(b.try_start(clk.now));
    EXPECT_EQ(b.next_start(clk.now), clk.now + seconds(10));
    // A later response refreshes the quota.
    clk.advance(seconds(2));
    b.on_rate_headers(clk.now, 1L, 8L);
    EXPECT_TRUE(b.try_start(clk.now));
    EXPECT_FALSE(b.try_start(clk.now));
    clk.advance(seconds(8));
    EXPECT_TRUE(b.try_start(clk.now));  // the window is over
    EXPECT_TRUE(b.try_start(clk.now));
}

TEST(RegistryBudget, QuotaWithoutResetExpiresAfterTheDefaultWindow) {
    SimClock clk;
    RegistryBudget b(0, 0);
    b.on_rate_headers(clk.now, 1L, std::nullopt);
    EXPECT_TRUE(b.try_start(clk.now));
    EXPECT_FALSE(b.try_start(clk.now));
    EXPECT_EQ(b.next_start(clk.now), clk.now + seconds(60));
}

TEST(RegistryBudget, NonsenseHeadersAreIgnored) {
    SimClock clk;
    RegistryBudget b(0, 0);
    b.on_rate_headers(clk.now, -1L, 10L);
    b.on_rate_headers(clk.now, std::nullopt, 10L);
    EXPECT_TRUE(b.try_start(clk.now));
    b.on_rate_headers(clk.now, 0L, -5L);  // negative reset: treated as absent
    EXPECT_EQ(b.next_start(clk.now), clk.now + seconds(1));
    b.on_rate_headers(clk.now, 0L, 1L << 40);  // capped at kMaxRetryAfter
    EXPECT_EQ(b.next_start(clk.now), clk.now + planner::kMaxRetryAfter);
}

}  // namespace
