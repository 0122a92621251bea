// Retry timing: exponential backoff with full jitter, Retry-After parsing, and which HTTP statuses
// are worth retrying. Pure: no clock is read and no global RNG is used; callers pass `now` and a seed.
//
// Threading: a Backoff object belongs to one thread; the free functions are reentrant.
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <string_view>

namespace planner {

struct BackoffPolicy {
    std::chrono::milliseconds base{200};
    std::chrono::milliseconds cap{10000};
    int max_attempts = 5;  // total tries, the first included
};

// Full jitter (AWS architecture blog, "Exponential Backoff And Jitter"): the delay before retry
// number `attempt` (0 for the first retry) is uniform in [min(base/2, ceiling), ceiling] with
// ceiling = min(cap, base * 2^attempt). The floor of base/2 keeps a burst of failures from
// retrying immediately. Negative attempts count as 0; negative base/cap count as 0.
// Deterministic for a given seed (splitmix64), so tests can pin the sequence.
class Backoff {
public:
    explicit Backoff(BackoffPolicy p, uint64_t seed);

    std::chrono::milliseconds next_delay(int attempt) noexcept;

    // The upper bound next_delay(attempt) draws from (no randomness consumed).
    std::chrono::milliseconds ceiling(int attempt) const noexcept;
    const BackoffPolicy& policy() const noexcept { return policy_; }

private:
    uint64_t next_random() noexcept;
    uint64_t uniform(uint64_t lo, uint64_t hi) noexcept;  // inclusive, unbiased

    BackoffPolicy policy_;
    uint64_t state_;
};

// The longest wait parse_retry_after() will ask for.
inline constexpr std::chrono::milliseconds kMaxRetryAfter = std::chrono::hours(1);

// Retry-After (RFC 9110 §10.2.3): delay-seconds, or an HTTP-date in any of the three formats a
// recipient must accept (IMF-fixdate "Sun, 06 Nov 1994 08:49:37 GMT", obsolete RFC 850
// "Sunday, 06-Nov-94 08:49:37 GMT", asctime "Sun Nov  6 08:49:37 1994"). Surrounding whitespace is
// ignored. A date in the past gives 0; anything longer than kMaxRetryAfter is capped;
// unparseable input (including an empty value) gives nullopt.
std::optional<std::chrono::milliseconds> parse_retry_after(std::string_view value,
                                                           std::chrono::system_clock::time_point now);

// 408, 429, 500, 502, 503, 504.
bool is_retryable_status(long http_status) noexcept;

}  // namespace planner
