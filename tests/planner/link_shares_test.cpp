#include "planner/link_shares.h"

#include <gtest/gtest.h>

#include <map>
#include <thread>
#include <vector>

#include "tests/planner/sim_clock.h"

using namespace std::chrono;
using planner::LinkShares;
using planner::test::SimClock;

namespace {

constexpr double kMbit = 1e6 / 8;

// Greedy members: each moves `piece` bytes whenever its wait is over, in 1 ms steps of simulated
// time, for `duration`. `active(member, t)` says whether it wants to move bytes at second t.
template <class Active>
std::map<uint64_t, uint64_t> simulate(LinkShares& link, SimClock& clk, const std::vector<uint64_t>& members,
                                      seconds span, Active active, uint64_t piece = 64 << 10) {
    std::map<uint64_t, uint64_t> moved;
    std::map<uint64_t, planner::TimePoint> ready;
    for (auto m : members) ready[m] = clk.now;
    const auto end = clk.now + span;
    const auto start = clk.now;
    while (clk.now < end) {
        const double t = duration_cast<duration<double>>(clk.now - start).count();
        for (auto m : members) {
            if (!active(m, t) || clk.now < ready[m]) continue;
            const auto wait = link.wait_time(m, clk.now);
            if (wait > nanoseconds::zero()) {
                ready[m] = clk.now + wait;
                continue;
            }
            moved[m] += piece;
            ready[m] = clk.now + link.consume(m, piece, clk.now);
        }
        clk.advance(milliseconds(1));
    }
    return moved;
}

TEST(LinkShares, TwoEqualTasksShareACappedLinkEvenly) {
    SimClock clk;
    LinkShares link(100 * kMbit, 0, clk.now);
    link.join(1, 1, clk.now);
    link.join(2, 1, clk.now);
    auto moved = simulate(link, clk, {1, 2}, seconds(10), [](uint64_t, double) { return true; });
    const double total = double(moved[1] + moved[2]);
    EXPECT_NEAR(double(moved[1]) / total, 0.5, 0.025);  // 50/50 within 5%
    EXPECT_NEAR(total / 10.0, 100 * kMbit, 100 * kMbit * 0.05);  // the cap holds within 5% over 10 s
}

TEST(LinkShares, WeightsSplitTheCapAndTheLowerWeightIsNotStarved) {
    SimClock clk;
    LinkShares link(200 * kMbit, 0, clk.now);
    link.join(1, 8, clk.now);  // event-triggered
    link.join(2, 1, clk.now);  // bulk scan
    auto moved = simulate(link, clk, {1, 2}, seconds(10), [](uint64_t, double) { return true; });
    const double total = double(moved[1] + moved[2]);
    EXPECT_NEAR(double(moved[1]) / total, 8.0 / 9.0, 0.02);
    EXPECT_GT(double(moved[2]) / total, 0.09);
    EXPECT_NEAR(total / 10.0, 200 * kMbit, 200 * kMbit * 0.05);
}

TEST(LinkShares, AnIdleMemberLeavesItsShareToTheOthers) {
    SimClock clk;
    LinkShares link(100 * kMbit, 0, clk.now);
    link.join(1, 1, clk.now);
    link.join(2, 1, clk.now);
    // Member 2 only uses the link during the first 2 s of 10.
    auto moved = simulate(link, clk, {1, 2}, seconds(10), [](uint64_t m, double t) { return m == 1 || t < 2.0; });
    const double total = double(moved[1] + moved[2]);
    EXPECT_NEAR(total / 10.0, 100 * kMbit, 100 * kMbit * 0.05);  // nothing is wasted
    EXPECT_NEAR(double(moved[2]), 1.0 * 100 * kMbit, 100 * kMbit * 0.1);  // half the link for 2 s
    EXPECT_GT(link.member_rate(1), 0.99 * 100 * kMbit);  // member 2 idle: member 1 has it all
}

TEST(LinkShares, ALateMemberGetsItsShareAtOnce) {
    SimClock clk;
    LinkShares link(100 * kMbit, 0, clk.now);
    auto first = simulate(link, clk, {1}, seconds(2), [](uint64_t, double) { return true; });
    EXPECT_NEAR(double(first[1]) / 2.0, 100 * kMbit, 100 * kMbit * 0.05);
    auto both = simulate(link, clk, {1, 2}, seconds(4), [](uint64_t, double) { return true; });
    const double total = double(both[1] + both[2]);
    EXPECT_NEAR(double(both[2]) / total, 0.5, 0.03);
}

TEST(LinkShares, UnlimitedAndRateChanges) {
    SimClock clk;
    LinkShares link(0, 0, clk.now);
    EXPECT_EQ(link.consume(1, 1u << 30, clk.now), nanoseconds::zero());
    EXPECT_EQ(link.wait_time(1, clk.now), nanoseconds::zero());
    link.set_rate(50 * kMbit, 0, clk.now);
    clk.advance(seconds(1));
    auto moved = simulate(link, clk, {1}, seconds(5), [](uint64_t, double) { return true; });
    EXPECT_NEAR(double(moved[1]) / 5.0, 50 * kMbit, 50 * kMbit * 0.05);
    link.leave(1);
    EXPECT_EQ(link.member_rate(1), 0.0);
}

TEST(LinkShares, ThreadsChargingAtOnceKeepTheAccounts) {
    // Many threads on one link: no lost update (the total charged equals what the link saw).
    SimClock clk;
    LinkShares link(1e12, 0, clk.now);
    const auto now = clk.now;
    std::vector<std::thread> threads;
    for (uint64_t m = 0; m < 4; ++m)
        threads.emplace_back([&link, m, now] {
            for (int i = 0; i < 10000; ++i) {
                (void)link.consume(m, 1000, now);
                (void)link.wait_time(m, now);
            }
        });
    for (auto& t : threads) t.join();
    for (uint64_t m = 0; m < 4; ++m) EXPECT_NEAR(link.member_rate(m), 1e12 / 4, 1e12 * 1e-9);
}

}  // namespace
