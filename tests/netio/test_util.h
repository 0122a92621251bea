// Helpers shared by the netio tests.
#pragma once

#include <chrono>

#include "netio/uring_loop.h"

namespace testutil {

// Turns the loop until pred() holds or `limit` passed; returns pred(). Every test wait goes
// through here so that none can hang.
template <class Pred>
bool run_until(netio::UringLoop& loop, Pred&& pred, std::chrono::milliseconds limit = std::chrono::seconds(20)) {
    const auto deadline = netio::Clock::now() + limit;
    while (!pred()) {
        if (netio::Clock::now() >= deadline) return false;
        loop.run_once(std::chrono::milliseconds(20));
    }
    return true;
}

// Turns the loop for `d` (to let things that should not happen have a chance to).
inline void run_for(netio::UringLoop& loop, std::chrono::milliseconds d) {
    const auto deadline = netio::Clock::now() + d;
    while (netio::Clock::now() < deadline) loop.run_once(std::chrono::milliseconds(5));
}

}  // namespace testutil
