// A simulated clock for planner tests: time moves only when the test says so.
#pragma once

#include <chrono>

#include "planner/time_point.h"

namespace planner::test {

struct SimClock {
    // Not the epoch: code under test must not assume time starts at 0.
    TimePoint now = TimePoint{} + std::chrono::hours(1000);

    void advance(std::chrono::nanoseconds d) { now += d; }
    double seconds_since(TimePoint t) const { return std::chrono::duration<double>(now - t).count(); }
};

}  // namespace planner::test
