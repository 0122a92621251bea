#include "planner/token_bucket.h"

#include <algorithm>
#include <array>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <limits>

namespace planner {

using std::chrono::nanoseconds;

namespace {

// Rounding slack: after waiting exactly the reported time, float error may leave a debt of a
// fraction of a byte; it must not turn into another 1 ns wait.
constexpr double kEpsilonBytes = 1e-6;

double sanitize_rate(double rate_bytes_per_s) noexcept {
    return (std::isfinite(rate_bytes_per_s) && rate_bytes_per_s > 0) ? rate_bytes_per_s : 0.0;
}

}  // namespace

TokenBucket::TokenBucket(double rate_bytes_per_s, uint64_t burst_bytes, TimePoint now) noexcept
    : rate_bytes_per_s_(sanitize_rate(rate_bytes_per_s)),
      burst_bytes_(burst_bytes),
      balance_bytes_(static_cast<double>(burst_bytes)),
      last_(now) {}

double TokenBucket::balance_at(TimePoint now) const noexcept {
    if (unlimited()) return static_cast<double>(burst_bytes_);
    if (now <= last_) return balance_bytes_;
    const double elapsed_s = std::chrono::duration<double>(now - last_).count();
    return std::min(static_cast<double>(burst_bytes_), balance_bytes_ + elapsed_s * rate_bytes_per_s_);
}

void TokenBucket::refill(TimePoint now) noexcept {
    balance_bytes_ = balance_at(now);
    last_ = std::max(last_, now);
}

void TokenBucket::set_rate(double rate_bytes_per_s, uint64_t burst_bytes, TimePoint now) noexcept {
    const bool was_unlimited = unlimited();
    refill(now);  // accrue at the old rate up to `now`
    rate_bytes_per_s_ = sanitize_rate(rate_bytes_per_s);
    burst_bytes_ = burst_bytes;
    if (was_unlimited)
        balance_bytes_ = static_cast<double>(burst_bytes_);
    else
        balance_bytes_ = std::min(balance_bytes_, static_cast<double>(burst_bytes_));
}

nanoseconds TokenBucket::wait_for_balance(double balance_bytes) const noexcept {
    if (unlimited() || balance_bytes >= -kEpsilonBytes) return nanoseconds::zero();
    const double wait_ns = std::ceil(-balance_bytes / rate_bytes_per_s_ * 1e9);
    if (!(wait_ns < static_cast<double>(kMaxWait.count()))) return kMaxWait;
    return nanoseconds(static_cast<int64_t>(wait_ns));
}

nanoseconds TokenBucket::consume(uint64_t bytes, TimePoint now) noexcept {
    if (unlimited()) return nanoseconds::zero();
    refill(now);
    balance_bytes_ -= static_cast<double>(bytes);
    return wait_for_balance(balance_bytes_);
}

nanoseconds TokenBucket::wait_time(TimePoint now) const noexcept { return wait_for_balance(balance_at(now)); }

uint64_t TokenBucket::available(TimePoint now) const noexcept {
    if (unlimited()) return std::numeric_limits<uint64_t>::max();
    const double b = balance_at(now);
    if (b <= 0) return 0;
    // + epsilon: 3 bytes accrued as 2.9999999 are 3 bytes.
    return std::min(burst_bytes_, static_cast<uint64_t>(b + kEpsilonBytes));
}

// ---- RateLimiter ----

void RateLimiter::set_link(const std::string& link, double rate_bytes_per_s, uint64_t burst_bytes, TimePoint now) {
    if (auto it = links_.find(link); it != links_.end())
        it->second.set_rate(rate_bytes_per_s, burst_bytes, now);
    else
        links_.emplace(link, TokenBucket(rate_bytes_per_s, burst_bytes, now));
}

bool RateLimiter::remove_link(const std::string& link) noexcept {
    auto it = links_.find(link);
    if (it == links_.end()) return false;
    links_.erase(it);
    return true;
}

void RateLimiter::set_global(double rate_bytes_per_s, uint64_t burst_bytes, TimePoint now) noexcept {
    global_.set_rate(rate_bytes_per_s, burst_bytes, now);
}

nanoseconds RateLimiter::consume(const std::string& link, uint64_t bytes, TimePoint now) noexcept {
    nanoseconds wait = global_.consume(bytes, now);
    if (auto it = links_.find(link); it != links_.end()) wait = std::max(wait, it->second.consume(bytes, now));
    return wait;
}

nanoseconds RateLimiter::wait_time(const std::string& link, TimePoint now) const noexcept {
    nanoseconds wait = global_.wait_time(now);
    if (auto it = links_.find(link); it != links_.end()) wait = std::max(wait, it->second.wait_time(now));
    return wait;
}

uint64_t RateLimiter::available(const std::string& link, TimePoint now) const noexcept {
    uint64_t avail = global_.available(now);
    if (auto it = links_.find(link); it != links_.end()) avail = std::min(avail, it->second.available(now));
    return avail;
}

const TokenBucket* RateLimiter::link(const std::string& link) const noexcept {
    auto it = links_.find(link);
    return it == links_.end() ? nullptr : &it->second;
}

// ---- parse_rate / format_rate ----

namespace {

bool is_space(char c) noexcept { return c == ' ' || c == '\t'; }

std::string_view trim(std::string_view s) noexcept {
    while (!s.empty() && is_space(s.front())) s.remove_prefix(1);
    while (!s.empty() && is_space(s.back())) s.remove_suffix(1);
    return s;
}

char lower(char c) noexcept { return (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c; }

bool iequals(std::string_view a, std::string_view b) noexcept {
    if (a.size() != b.size()) return false;
    for (size_t i = 0; i < a.size(); ++i)
        if (lower(a[i]) != lower(b[i])) return false;
    return true;
}

bool is_digit(char c) noexcept { return c >= '0' && c <= '9'; }

// The multiplier to bytes/s of a unit, or nullopt. Empty means bytes/s.
std::optional<double> unit_factor(std::string_view u) noexcept {
    if (u.empty()) return 1.0;
    double prefix = 1.0;
    const char p = lower(u.front());
    const int power = p == 'k' ? 1 : p == 'm' ? 2 : p == 'g' ? 3 : p == 't' ? 4 : 0;
    if (power > 0) {
        u.remove_prefix(1);
        const bool binary = !u.empty() && lower(u.front()) == 'i';
        if (binary) u.remove_prefix(1);
        prefix = std::pow(binary ? 1024.0 : 1000.0, power);
    }
    if (u == "B" || u == "B/s" || u == "Bps") return prefix;
    for (std::string_view bits : {"bit", "bit/s", "bits", "bits/s"})
        if (iequals(u, bits)) return prefix / 8.0;
    if (u == "bps") return prefix / 8.0;
    return std::nullopt;  // includes a lone "b" and a prefix without a unit
}

}  // namespace

std::optional<double> parse_rate(std::string_view text) {
    text = trim(text);
    if (iequals(text, "unlimited")) return 0.0;
    size_t n = 0;
    while (n < text.size() && is_digit(text[n])) ++n;
    if (n == 0) return std::nullopt;  // no sign, no leading '.', no words
    if (n < text.size() && text[n] == '.') {
        const size_t frac = ++n;
        while (n < text.size() && is_digit(text[n])) ++n;
        if (n == frac) return std::nullopt;  // "5." is a typo
    }
    double value = 0;
    const auto [end, ec] = std::from_chars(text.data(), text.data() + n, value, std::chars_format::fixed);
    if (ec != std::errc() || end != text.data() + n) return std::nullopt;
    const auto factor = unit_factor(trim(text.substr(n)));
    if (!factor) return std::nullopt;
    const double rate = value * *factor;
    if (!std::isfinite(rate) || rate > 1e15) return std::nullopt;
    return rate;
}

std::string format_rate(double bytes_per_s) {
    if (!std::isfinite(bytes_per_s) || bytes_per_s <= 0) return "unlimited";
    static constexpr std::array<const char*, 5> kPrefixes = {"", "k", "M", "G", "T"};
    double v = bytes_per_s * 8;
    size_t i = 0;
    while (i + 1 < kPrefixes.size() && v >= 1000) {
        v /= 1000;
        ++i;
    }
    // Two decimals; tiny rates (below 0.01 bit/s) get enough decimals for three significant
    // digits instead of printing "0", which would read back as unlimited.
    const int decimals = v >= 0.01 ? 2 : std::min(40, 2 + static_cast<int>(std::ceil(-std::log10(v))));
    std::array<char, 128> buf{};
    std::snprintf(buf.data(), buf.size(), "%.*f", decimals, v);
    std::string s(buf.data());
    if (s.find('.') != std::string::npos) {
        while (s.back() == '0') s.pop_back();
        if (s.back() == '.') s.pop_back();
    }
    return s + kPrefixes[i] + "bit/s";
}

}  // namespace planner
