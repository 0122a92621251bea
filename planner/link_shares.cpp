#include "planner/link_shares.h"

#include <algorithm>

namespace planner {

namespace {

uint64_t default_burst(double rate, uint64_t burst) {
    if (burst > 0 || rate <= 0) return burst;
    return std::max<uint64_t>(256u << 10, static_cast<uint64_t>(rate / 20));
}

}  // namespace

LinkShares::LinkShares(double rate_bytes_per_s, uint64_t burst_bytes, TimePoint now)
    : rate_(rate_bytes_per_s),
      burst_(default_burst(rate_bytes_per_s, burst_bytes)),
      link_(rate_bytes_per_s, default_burst(rate_bytes_per_s, burst_bytes), now) {}

void LinkShares::set_rate(double rate_bytes_per_s, uint64_t burst_bytes, TimePoint now) {
    std::lock_guard lock(mu_);
    rate_ = rate_bytes_per_s;
    burst_ = default_burst(rate_bytes_per_s, burst_bytes);
    link_.set_rate(rate_, burst_, now);
    rebalance_locked(now, true);
}

void LinkShares::join(uint64_t member, unsigned weight, TimePoint now) {
    std::lock_guard lock(mu_);
    Member& m = member_locked(member, now);
    m.weight = std::max(1u, weight);
    rebalance_locked(now, true);
}

void LinkShares::leave(uint64_t member) {
    std::lock_guard lock(mu_);
    if (members_.erase(member) == 0) return;
    if (!members_.empty()) rebalance_locked(members_.begin()->second.last_seen, true);
}

LinkShares::Member& LinkShares::member_locked(uint64_t id, TimePoint now) {
    auto it = members_.find(id);
    if (it == members_.end()) {
        it = members_.emplace(id, Member{1, TokenBucket(0, 0, now), now, true}).first;
        rebalance_locked(now, true);
    }
    return it->second;
}

void LinkShares::rebalance_locked(TimePoint now, bool force) {
    bool changed = force;
    uint64_t weights = 0;
    for (auto& [id, m] : members_) {
        const bool active = now - m.last_seen <= kIdleAfter;
        changed = changed || active != m.active;
        m.active = active;
        if (active) weights += m.weight;
    }
    if (!changed) return;
    for (auto& [id, m] : members_) {
        if (rate_ <= 0) {
            m.bucket.set_rate(0, 0, now);
            continue;
        }
        // An idle member keeps a full share's bucket ready: when it comes back, the next
        // rebalance gives it its part of the split.
        const double share = m.active && weights > 0 ? static_cast<double>(m.weight) / static_cast<double>(weights) : 1.0;
        const double rate = rate_ * share;
        const auto burst = std::max<uint64_t>(64u << 10, static_cast<uint64_t>(static_cast<double>(burst_) * share));
        m.bucket.set_rate(rate, burst, now);
    }
}

LinkShares::Member& LinkShares::touch_locked(uint64_t member, TimePoint now) {
    Member& m = member_locked(member, now);
    const bool was_active = m.active;
    m.last_seen = std::max(m.last_seen, now);
    m.active = true;
    rebalance_locked(now, !was_active);
    return m;
}

std::chrono::nanoseconds LinkShares::consume(uint64_t member, uint64_t bytes, TimePoint now) {
    std::lock_guard lock(mu_);
    Member& m = touch_locked(member, now);
    return std::max(link_.consume(bytes, now), m.bucket.consume(bytes, now));
}

std::chrono::nanoseconds LinkShares::wait_time(uint64_t member, TimePoint now) {
    std::lock_guard lock(mu_);
    Member& m = touch_locked(member, now);
    return std::max(link_.wait_time(now), m.bucket.wait_time(now));
}

double LinkShares::member_rate(uint64_t member) const {
    std::lock_guard lock(mu_);
    auto it = members_.find(member);
    return it == members_.end() ? 0.0 : it->second.bucket.rate_bytes_per_s();
}

double LinkShares::rate_bytes_per_s() const {
    std::lock_guard lock(mu_);
    return rate_;
}

}  // namespace planner
