#include "planner/token_bucket.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "tests/planner/sim_clock.h"

using namespace std::chrono;
using planner::format_rate;
using planner::parse_rate;
using planner::RateLimiter;
using planner::TimePoint;
using planner::TokenBucket;
using planner::test::SimClock;

namespace {

constexpr double kMiB = 1024.0 * 1024.0;

TEST(TokenBucket, StartsFullAndAllowsTheBurst) {
    SimClock clk;
    TokenBucket b(1000, 5000, clk.now);
    EXPECT_FALSE(b.unlimited());
    EXPECT_EQ(b.available(clk.now), 5000u);
    EXPECT_EQ(b.consume(3000, clk.now), nanoseconds::zero());
    EXPECT_EQ(b.available(clk.now), 2000u);
    EXPECT_EQ(b.consume(2000, clk.now), nanoseconds::zero());  // exactly empty is not debt
    EXPECT_EQ(b.available(clk.now), 0u);
    EXPECT_EQ(b.wait_time(clk.now), nanoseconds::zero());
}

TEST(TokenBucket, DebtAsksForTheTimeToPayItOff) {
    SimClock clk;
    TokenBucket b(1000, 0, clk.now);                        // 1000 B/s, no burst
    EXPECT_EQ(b.consume(500, clk.now), milliseconds(500));  // consumption always succeeds
    EXPECT_EQ(b.wait_time(clk.now), milliseconds(500));
    EXPECT_EQ(b.available(clk.now), 0u);
    clk.advance(milliseconds(200));
    EXPECT_EQ(b.wait_time(clk.now), milliseconds(300));
    EXPECT_EQ(b.consume(100, clk.now), milliseconds(400));  // debt piles up
    clk.advance(milliseconds(400));
    EXPECT_EQ(b.wait_time(clk.now), nanoseconds::zero());
    EXPECT_EQ(b.available(clk.now), 0u);  // burst 0: nothing accrues beyond zero
}

TEST(TokenBucket, WaitingTheAnswerIsEnoughWhateverTheRounding) {
    SimClock clk;
    TokenBucket b(12'345'678.9, 1000, clk.now);
    for (int i = 0; i < 10000; ++i) {
        const auto w = b.consume(262'144 + static_cast<uint64_t>(i % 7), clk.now);
        clk.advance(w);
        ASSERT_EQ(b.wait_time(clk.now), nanoseconds::zero()) << i;
    }
}

TEST(TokenBucket, RefillIsCappedAtTheBurst) {
    SimClock clk;
    TokenBucket b(1000, 4000, clk.now);
    b.consume(4000, clk.now);
    clk.advance(seconds(2));
    EXPECT_EQ(b.available(clk.now), 2000u);
    clk.advance(hours(5));
    EXPECT_EQ(b.available(clk.now), 4000u);
}

TEST(TokenBucket, LongRunRateIsTheConfiguredRate) {
    SimClock clk;
    const TimePoint start = clk.now;
    TokenBucket b(10 * kMiB, 0, clk.now);
    uint64_t moved = 0;
    while (clk.now - start < seconds(10)) {
        clk.advance(b.consume(64 * 1024, clk.now));
        moved += 64 * 1024;
    }
    EXPECT_NEAR(static_cast<double>(moved) / clk.seconds_since(start), 10 * kMiB, 10 * kMiB * 0.001);
}

TEST(TokenBucket, ZeroOrInvalidRateIsUnlimited) {
    SimClock clk;
    for (double r : {0.0, -5.0, std::nan(""), std::numeric_limits<double>::infinity()}) {
        TokenBucket b(r, 100, clk.now);
        EXPECT_TRUE(b.unlimited()) << r;
        EXPECT_EQ(b.consume(uint64_t{1} << 40, clk.now), nanoseconds::zero());
        EXPECT_EQ(b.wait_time(clk.now), nanoseconds::zero());
        EXPECT_EQ(b.available(clk.now), std::numeric_limits<uint64_t>::max());
    }
}

TEST(TokenBucket, SetRateKeepsAccruedTokensAndDebt) {
    SimClock clk;
    TokenBucket b(1000, 10000, clk.now);
    b.consume(10000, clk.now);
    clk.advance(seconds(3));                  // 3000 accrued at the old rate
    b.set_rate(2000, 10000, clk.now);
    EXPECT_EQ(b.available(clk.now), 3000u);
    clk.advance(seconds(1));
    EXPECT_EQ(b.available(clk.now), 5000u);   // new rate from the change on
    b.set_rate(2000, 1000, clk.now);          // smaller burst clamps
    EXPECT_EQ(b.available(clk.now), 1000u);

    b.consume(3000, clk.now);                 // 2000 in debt
    b.set_rate(4000, 1000, clk.now);
    EXPECT_EQ(b.wait_time(clk.now), milliseconds(500));  // the debt is paid at the new rate
}

TEST(TokenBucket, FromUnlimitedStartsFullAndToUnlimitedForgetsDebt) {
    SimClock clk;
    TokenBucket b(0, 0, clk.now);
    b.consume(1'000'000, clk.now);
    b.set_rate(1000, 500, clk.now);
    EXPECT_EQ(b.available(clk.now), 500u);
    b.consume(5000, clk.now);
    EXPECT_GT(b.wait_time(clk.now), nanoseconds::zero());
    b.set_rate(0, 0, clk.now);
    EXPECT_EQ(b.wait_time(clk.now), nanoseconds::zero());
}

TEST(TokenBucket, TimeGoingBackwardsAddsNothing) {
    SimClock clk;
    TokenBucket b(1000, 1000, clk.now);
    b.consume(1000, clk.now);
    EXPECT_EQ(b.available(clk.now - seconds(5)), 0u);
    EXPECT_EQ(b.consume(500, clk.now - seconds(5)), milliseconds(500));
    EXPECT_EQ(b.wait_time(clk.now), milliseconds(500));
}

TEST(TokenBucket, HugeDebtAtATinyRateIsClampedNotUndefined) {
    SimClock clk;
    TokenBucket b(1e-6, 0, clk.now);
    EXPECT_EQ(b.consume(std::numeric_limits<uint64_t>::max(), clk.now), planner::kMaxWait);
    EXPECT_EQ(b.wait_time(clk.now), planner::kMaxWait);
}

TEST(RateLimiter, ChargesLinkAndGlobalAndReturnsTheLongerWait) {
    SimClock clk;
    RateLimiter rl(clk.now);
    rl.set_link("eu>us", 1000, 0, clk.now);
    rl.set_global(4000, 0, clk.now);
    EXPECT_EQ(rl.consume("eu>us", 1000, clk.now), seconds(1));           // link is the tighter one
    EXPECT_EQ(rl.consume("eu>ap", 1000, clk.now), milliseconds(500));    // no link cap: global only
    EXPECT_EQ(rl.wait_time("eu>us", clk.now), seconds(1));
    EXPECT_EQ(rl.wait_time("eu>ap", clk.now), milliseconds(500));
    EXPECT_EQ(rl.available("eu>us", clk.now), 0u);
    ASSERT_NE(rl.link("eu>us"), nullptr);
    EXPECT_EQ(rl.link("nowhere"), nullptr);
    EXPECT_TRUE(rl.remove_link("eu>us"));
    EXPECT_FALSE(rl.remove_link("eu>us"));
    EXPECT_EQ(rl.wait_time("eu>us", clk.now), milliseconds(500));
}

TEST(RateLimiter, OneCapMeansOneCapHoweverManyTransfersShareIt) {
    // Eight transfers on one link, each pacing itself by the waits it gets (and looking again
    // when its timer fires, as the header asks), move no more than one transfer would: they all
    // drain the same bucket.
    for (int transfers : {1, 8, 64}) {
        SimClock clk;
        const TimePoint start = clk.now;
        RateLimiter rl(clk.now);
        rl.set_link("a>b", 1e6, 0, clk.now);
        std::vector<TimePoint> resume(static_cast<size_t>(transfers), clk.now);
        uint64_t moved = 0;
        while (clk.now - start < seconds(5)) {
            auto it = std::min_element(resume.begin(), resume.end());
            clk.now = *it;
            if (const auto w = rl.wait_time("a>b", clk.now); w > nanoseconds::zero()) {
                *it = clk.now + w;
                continue;
            }
            *it = clk.now + rl.consume("a>b", 10'000, clk.now);
            moved += 10'000;
        }
        EXPECT_NEAR(static_cast<double>(moved) / 5.0, 1e6, 10'000 / 5.0) << transfers << " transfers";
    }
}

TEST(RateLimiter, WithoutTheSecondLookTheOvershootIsOnePiecePerTransfer) {
    SimClock clk;
    const TimePoint start = clk.now;
    RateLimiter rl(clk.now);
    rl.set_link("a>b", 1e6, 0, clk.now);
    std::vector<TimePoint> resume(8, clk.now);
    uint64_t moved = 0;
    while (clk.now - start < seconds(5)) {
        auto it = std::min_element(resume.begin(), resume.end());
        clk.now = *it;
        *it = clk.now + rl.consume("a>b", 10'000, clk.now);
        moved += 10'000;
    }
    EXPECT_LE(static_cast<double>(moved), 5e6 + 8 * 10'000 + 10'000);
    EXPECT_GE(static_cast<double>(moved), 5e6);
}

TEST(ParseRate, AcceptsWhatUsersType) {
    struct Case {
        const char* text;
        double bytes_per_s;
    };
    const Case cases[] = {
        {"200Mbit", 25e6},           {"200Mbit/s", 25e6},        {"1Gbit", 125e6},
        {"50MiB/s", 50 * kMiB},      {"50MB/s", 50e6},           {"1.5GiB/s", 1.5 * 1024 * kMiB},
        {"100000", 100000},          {"0", 0},                   {"unlimited", 0},
        {"UNLIMITED", 0},            {" 200 Mbit/s ", 25e6},     {"100mbit", 12.5e6},
        {"100Mbps", 12.5e6},         {"100mbps", 12.5e6},        {"10MBps", 10e6},
        {"800kB", 800e3},            {"64KiB", 65536},           {"1Mibit", kMiB / 8},
        {"8bit", 1},                 {"16bits/s", 2},            {"10B/s", 10},
        {"2.5", 2.5},                {"1Tbit", 125e9},           {"0.5GB", 0.5e9},
    };
    for (const auto& c : cases) {
        const auto r = parse_rate(c.text);
        ASSERT_TRUE(r.has_value()) << c.text;
        EXPECT_DOUBLE_EQ(*r, c.bytes_per_s) << c.text;
    }
}

TEST(ParseRate, RefusesGarbageAndAmbiguity) {
    for (const char* bad : {"", " ", "abc", "-5", "+5", "5.", ".5", "1e3", "1..5Mbit", "200Mb", "200mb", "50M",
                            "Mbit", "200Mbit/ss", "50MiB/s/s", "50 MiB / s", "nan", "inf", "5 5", "200Xbit",
                            "200Mbps/s", "1Bps/s", "99999999999999999999", "unlimited!", "0x10"}) {
        EXPECT_FALSE(parse_rate(bad).has_value()) << '"' << bad << '"';
    }
}

TEST(FormatRate, PrintsBitsAndReadsBack) {
    EXPECT_EQ(format_rate(25e6), "200Mbit/s");
    EXPECT_EQ(format_rate(187.5e6), "1.5Gbit/s");
    EXPECT_EQ(format_rate(125), "1kbit/s");
    EXPECT_EQ(format_rate(12), "96bit/s");
    EXPECT_EQ(format_rate(0), "unlimited");
    EXPECT_EQ(format_rate(-1), "unlimited");
    EXPECT_EQ(format_rate(std::nan("")), "unlimited");
    for (double r : {1.0, 100.0, 12345.0, 25e6, 50 * kMiB, 1.5e9, 3e12, 1e-4}) {
        const auto back = parse_rate(format_rate(r));
        ASSERT_TRUE(back.has_value()) << format_rate(r);
        EXPECT_NEAR(*back, r, r * 0.01) << format_rate(r);
    }
}

}  // namespace
