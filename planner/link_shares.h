// LinkShares: one capped link shared by tasks that run on different threads. The sidecar runs
// each task's mirror on its own loop; a cap set for a link (source region -> target region) must
// hold for all of them together ("one cap means one cap"), and split between them by weight, so an
// event-triggered task gets most of a link that a bulk scan is also using, without starving it.
//
// How: one token bucket for the link (the cap), plus one bucket per member (task) whose rate is
// the member's share: cap * weight / (sum of the weights of the members using the link now). A
// member "uses" the link if it asked or charged within the last kIdleAfter; a member that stops
// asking is left out of the split, so the others take its share (work conserving). A transfer
// waits the longer of the link's and its member's waits, as with RateLimiter (token_bucket.h).
//
// Threading: every method may be called from any thread (one mutex). Nothing reads a clock: the
// callers pass `now` from one steady clock.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <mutex>

#include "planner/time_point.h"
#include "planner/token_bucket.h"

namespace planner {

class LinkShares {
public:
    static constexpr std::chrono::milliseconds kIdleAfter{300};

    // rate <= 0: unlimited. burst 0: 50 ms of the rate, at least 256 KiB.
    LinkShares(double rate_bytes_per_s, uint64_t burst_bytes, TimePoint now);

    // A new cap from `now` on (debts are kept, as TokenBucket::set_rate).
    void set_rate(double rate_bytes_per_s, uint64_t burst_bytes, TimePoint now);
    // Registers a member (or changes its weight); weight 0 counts as 1.
    void join(uint64_t member, unsigned weight, TimePoint now);
    void leave(uint64_t member);

    // Charges bytes a member moved (or is about to move); returns how long it must now wait.
    // An unknown member joins with weight 1.
    std::chrono::nanoseconds consume(uint64_t member, uint64_t bytes, TimePoint now);
    // The wait before the member may move bytes (0: now). Asking marks the member as using the link.
    std::chrono::nanoseconds wait_time(uint64_t member, TimePoint now);

    // The member's current rate (bytes/s), 0 if unknown; for tests and status.
    double member_rate(uint64_t member) const;
    double rate_bytes_per_s() const;

private:
    struct Member {
        unsigned weight = 1;
        TokenBucket bucket;
        TimePoint last_seen;
        bool active = true;
    };

    Member& member_locked(uint64_t id, TimePoint now);
    // The member, marked as using the link now (the split is redone if it was idle).
    Member& touch_locked(uint64_t id, TimePoint now);
    // Recomputes every member's share when the set of active members changed.
    void rebalance_locked(TimePoint now, bool force);

    mutable std::mutex mu_;
    double rate_;
    uint64_t burst_;
    TokenBucket link_;
    std::map<uint64_t, Member> members_;
};

}  // namespace planner
