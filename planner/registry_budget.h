// Per-registry request budget: a connection cap and a request-rate cap, slowed down by the
// registry's own signals (429 Too Many Requests, Retry-After, RateLimit headers) instead of
// failing the task, and sped back up on successes (AIMD, like TCP congestion avoidance).
//
// Use, per request to that registry:
//   if (!budget.try_start(now)) { arm a timer for budget.next_start(now) (or wait for a finish) }
//   ... request ... then, on its response:
//   budget.on_rate_headers(now, remaining, reset_s)   when the response carried them
//   budget.on_throttled(now, retry_after_ms)          on a 429 (the caller re-queues the request)
//   budget.on_success(now)                            on any other response that is not a 5xx
//   budget.finish()                                   always, once per successful try_start()
//
// Threading: belongs to one thread (the event loop). Pure: no clock is read.
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>

#include "planner/backoff.h"
#include "planner/time_point.h"
#include "planner/token_bucket.h"

namespace planner {

struct RegistryBudgetTuning {
    // Requests that may start back to back after an idle spell: about this many seconds' worth of
    // the current request rate (at least one request).
    double burst_s = 1.0;
    // AIMD never goes below this rate.
    double min_requests_per_s = 0.5;
    // After a decrease, successes bring the rate back up to its ceiling (the configured rate, or
    // for an unlimited registry the rate that drew the 429) linearly over this many seconds.
    double recovery_s = 10.0;
    // 429s within this long of the last decrease are the same congestion event: one halving, one
    // step of the exponential pause, not one per request that was already in flight.
    std::chrono::milliseconds decrease_holdoff_ms{1000};
    // The pause after a 429 without Retry-After: base * 2^(n-1) for the n-th consecutive event,
    // capped (deterministic: one budget per registry, so no herd to spread with jitter).
    std::chrono::milliseconds pause_base_ms{1000};
    std::chrono::milliseconds pause_cap_ms{60000};
    // A quota from `ratelimit-remaining` without `ratelimit-reset` is trusted for this long.
    std::chrono::seconds default_quota_window_s{60};
};

class RegistryBudget {
public:
    // max_connections 0: no connection cap. max_requests_per_s <= 0: no configured rate cap (a 429
    // still installs one, learned from the rate that drew it).
    RegistryBudget(unsigned max_connections, double max_requests_per_s, RegistryBudgetTuning tuning = {});

    // May a new request start now? If yes, counts it in flight and charges the rate budget: the
    // caller must call finish() once for it. If no, nothing changed.
    bool try_start(TimePoint now) noexcept;
    // A request started by try_start() ended (whatever its outcome).
    void finish() noexcept;

    // A 429. retry_after (parsed by parse_retry_after(), already capped) pauses the registry until
    // now + retry_after; without it, an exponential pause (pause_base_ms doubling to pause_cap_ms
    // on consecutive congestion events). Either way the request rate is halved (AIMD, floored at
    // min_requests_per_s), once per decrease_holdoff_ms.
    void on_throttled(TimePoint now, std::optional<std::chrono::milliseconds> retry_after) noexcept;

    // `ratelimit-remaining` / `ratelimit-reset` (delta seconds, as in the IETF RateLimit header
    // draft and Docker Hub), parsed by the caller; either may be absent. remaining 0 pauses until
    // the reset (or for one pause step if no reset was sent). remaining > 0 becomes a quota: at
    // most that many more starts until the reset (or default_quota_window_s), refreshed by every
    // response that carries the headers. Negative values are ignored; reset is capped at
    // kMaxRetryAfter.
    void on_rate_headers(TimePoint now, std::optional<long> remaining, std::optional<long> reset_s) noexcept;

    // A response that was not throttled: ends the run of consecutive 429s and adds back rate.
    void on_success(TimePoint now) noexcept;

    // When the next request may start: `now` if try_start(now) would succeed; the earliest time
    // the pause, quota and rate allow otherwise; TimePoint::max() while only a finish() can free
    // a slot (all max_connections in flight).
    TimePoint next_start(TimePoint now) const noexcept;

    unsigned in_flight() const noexcept { return in_flight_; }
    // The request rate currently enforced; 0 while unlimited.
    double requests_per_s() const noexcept { return rate_per_s_; }
    // The end of the current pause (Retry-After, exponential, or remaining == 0), if any.
    TimePoint paused_until() const noexcept { return paused_until_; }

private:
    void apply_rate(TimePoint now) noexcept;
    void pause_until(TimePoint until) noexcept;
    double observed_rate_per_s(TimePoint now) const noexcept;
    void count_start(TimePoint now) noexcept;

    RegistryBudgetTuning tuning_;
    unsigned max_connections_;
    double configured_per_s_;  // 0: unlimited
    double rate_per_s_;        // the enforced rate, 0: unlimited
    double ceiling_per_s_;     // where additive increase stops (0: no ceiling)
    double increase_per_s2_ = 0;  // additive increase, requests/s per second of successes
    TokenBucket requests_;     // one token per request, debt semantics
    unsigned in_flight_ = 0;

    TimePoint paused_until_{};
    TimePoint last_decrease_{};
    bool decreased_ = false;
    int consecutive_throttles_ = 0;
    TimePoint last_increase_{};
    Backoff pause_steps_;

    // Quota from ratelimit-remaining.
    bool quota_active_ = false;
    long quota_left_ = 0;
    TimePoint quota_until_{};

    // Starts per second, measured over fixed one-second windows, for an unlimited registry's
    // first 429 (which rate to halve).
    TimePoint window_start_{};
    uint64_t window_starts_ = 0;
    uint64_t previous_window_starts_ = 0;
};

}  // namespace planner
