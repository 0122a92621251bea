// The one clock type the planner speaks. The planner never reads a clock: every function that
// depends on time takes `now`, so the engine passes its loop time and tests drive a fake one.
#pragma once

#include <chrono>

namespace planner {

using Clock = std::chrono::steady_clock;
using TimePoint = Clock::time_point;

}  // namespace planner
