// Throttle: applies a planner::RateLimiter to transfers on the loop. A transfer asks admit()
// before it moves bytes and charge()s what it moved; while the link's bucket is in debt, admit()
// says no and a loop timer resumes the transfer (CURL_WRITEFUNC_PAUSE / CURL_READFUNC_PAUSE) when
// the wait is over. No thread sleeps. Every transfer on one link shares the one bucket, so a cap
// holds for all the work on that link together.
//
// A throttle may also answer to a link shared with other tasks on other threads (the daemon's
// link caps, planner::LinkShares): then it waits the longer of the two waits and charges both.
//
// Threading: loop thread only. Ownership: borrows the loop and the limiter; both outlive it.
#pragma once

#include <algorithm>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "netio/uring_loop.h"
#include "planner/link_shares.h"
#include "planner/token_bucket.h"

namespace engine {

class Throttle {
public:
    Throttle(netio::UringLoop& loop, planner::RateLimiter& limiter, std::string link,
             std::shared_ptr<planner::LinkShares> shared = nullptr, uint64_t member = 0)
        : loop_(loop), limiter_(limiter), link_(std::move(link)), shared_(std::move(shared)), member_(member) {}

    // True when bytes may move now. Otherwise `resume` runs once the link's wait is over (the
    // caller answers "pause" and is resumed then).
    bool admit(const std::function<void()>& resume) {
        const auto now = planner::Clock::now();
        auto wait = limiter_.wait_time(link_, now);
        if (shared_) wait = std::max(wait, shared_->wait_time(member_, now));
        if (wait.count() <= 0) return true;
        auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(wait) + std::chrono::milliseconds(1);
        std::function<void()> r = resume;
        loop_.add_timer(ms, [r] {
            if (r) r();
        });
        return false;
    }
    void charge(uint64_t bytes) {
        const auto now = planner::Clock::now();
        (void)limiter_.consume(link_, bytes, now);
        if (shared_) (void)shared_->consume(member_, bytes, now);
    }

private:
    netio::UringLoop& loop_;
    planner::RateLimiter& limiter_;
    std::string link_;
    std::shared_ptr<planner::LinkShares> shared_;
    uint64_t member_;
};

}  // namespace engine
