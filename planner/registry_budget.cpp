#include "planner/registry_budget.h"

#include <algorithm>
#include <cassert>
#include <cmath>

namespace planner {

using namespace std::chrono;

namespace {

double sanitize_rate(double r) noexcept { return (std::isfinite(r) && r > 0) ? r : 0.0; }

}  // namespace

RegistryBudget::RegistryBudget(unsigned max_connections, double max_requests_per_s, RegistryBudgetTuning tuning)
    : tuning_(tuning),
      max_connections_(max_connections),
      configured_per_s_(sanitize_rate(max_requests_per_s)),
      rate_per_s_(configured_per_s_),
      ceiling_per_s_(configured_per_s_),
      requests_(0, 0, TimePoint{}),
      pause_steps_(BackoffPolicy{tuning.pause_base_ms, tuning.pause_cap_ms, 0}, 0) {
    tuning_.min_requests_per_s = std::max(tuning_.min_requests_per_s, 1e-3);
    tuning_.recovery_s = std::max(tuning_.recovery_s, 1e-3);
    apply_rate(TimePoint{});
}

void RegistryBudget::apply_rate(TimePoint now) noexcept {
    // Debt semantics: a start is admitted while the balance is >= 0 and costs one token, so a
    // bucket holding B tokens admits B + 1 starts back to back; hence the - 1.
    const double burst = std::max(0.0, std::round(rate_per_s_ * tuning_.burst_s) - 1);
    requests_.set_rate(rate_per_s_, static_cast<uint64_t>(burst), now);
}

void RegistryBudget::pause_until(TimePoint until) noexcept { paused_until_ = std::max(paused_until_, until); }

void RegistryBudget::count_start(TimePoint now) noexcept {
    if (now - window_start_ >= seconds(1)) {
        previous_window_starts_ = (now - window_start_ < seconds(2)) ? window_starts_ : 0;
        window_start_ = now;
        window_starts_ = 0;
    }
    ++window_starts_;
}

double RegistryBudget::observed_rate_per_s(TimePoint now) const noexcept {
    if (now - window_start_ >= seconds(2)) return tuning_.min_requests_per_s;
    // The current window is at most a second long, so its count is a lower bound of its rate.
    return std::max({static_cast<double>(previous_window_starts_), static_cast<double>(window_starts_),
                     tuning_.min_requests_per_s});
}

bool RegistryBudget::try_start(TimePoint now) noexcept {
    if (max_connections_ != 0 && in_flight_ >= max_connections_) return false;
    if (now < paused_until_) return false;
    if (quota_active_ && now >= quota_until_) quota_active_ = false;
    if (quota_active_ && quota_left_ <= 0) return false;
    if (requests_.wait_time(now) > nanoseconds::zero()) return false;
    requests_.consume(1, now);
    if (quota_active_) --quota_left_;
    ++in_flight_;
    count_start(now);
    return true;
}

void RegistryBudget::finish() noexcept {
    assert(in_flight_ > 0 && "finish() without a successful try_start()");
    if (in_flight_ > 0) --in_flight_;
}

void RegistryBudget::on_throttled(TimePoint now, std::optional<milliseconds> retry_after) noexcept {
    const bool new_event = !decreased_ || now - last_decrease_ >= tuning_.decrease_holdoff_ms;
    if (!new_event) {
        // Another answer to a request that was already in flight: same congestion event.
        if (retry_after) pause_until(now + *retry_after);
        return;
    }
    ++consecutive_throttles_;
    const double observed = observed_rate_per_s(now);
    // Halve what was actually sent: with a configured cap of 100/s while only 3/s went out,
    // halving the cap would change nothing.
    const double base = rate_per_s_ > 0 ? std::min(rate_per_s_, observed) : observed;
    if (ceiling_per_s_ <= 0) ceiling_per_s_ = observed;  // unlimited: learn the rate that drew the 429
    rate_per_s_ = std::max(tuning_.min_requests_per_s, base / 2);
    increase_per_s2_ = std::max(0.0, ceiling_per_s_ - rate_per_s_) / tuning_.recovery_s;
    decreased_ = true;
    last_decrease_ = now;
    last_increase_ = now;
    apply_rate(now);
    pause_until(now + (retry_after ? *retry_after : pause_steps_.ceiling(consecutive_throttles_ - 1)));
}

void RegistryBudget::on_rate_headers(TimePoint now, std::optional<long> remaining, std::optional<long> reset_s) noexcept {
    if (!remaining || *remaining < 0) return;
    std::optional<milliseconds> reset;
    if (reset_s && *reset_s >= 0)
        reset = *reset_s >= kMaxRetryAfter.count() / 1000 ? kMaxRetryAfter : milliseconds(seconds(*reset_s));
    if (*remaining == 0) {
        pause_until(now + (reset ? *reset : tuning_.pause_base_ms));
        quota_active_ = false;
        return;
    }
    quota_active_ = true;
    quota_left_ = *remaining;
    quota_until_ = now + (reset ? *reset : milliseconds(tuning_.default_quota_window_s));
}

void RegistryBudget::on_success(TimePoint now) noexcept {
    consecutive_throttles_ = 0;
    if (rate_per_s_ <= 0 || rate_per_s_ >= ceiling_per_s_ || increase_per_s2_ <= 0) return;
    // At most one second of increase per success: after an idle spell the registry has not told
    // us anything new about what it tolerates.
    const double dt_s = std::clamp(duration<double>(now - last_increase_).count(), 0.0, 1.0);
    last_increase_ = std::max(last_increase_, now);
    rate_per_s_ = std::min(ceiling_per_s_, rate_per_s_ + increase_per_s2_ * dt_s);
    apply_rate(now);
}

TimePoint RegistryBudget::next_start(TimePoint now) const noexcept {
    if (max_connections_ != 0 && in_flight_ >= max_connections_) return TimePoint::max();
    TimePoint t = std::max(now, paused_until_);
    if (quota_active_ && quota_left_ <= 0 && now < quota_until_) t = std::max(t, quota_until_);
    return std::max(t, now + requests_.wait_time(now));
}

}  // namespace planner
