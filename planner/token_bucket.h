// Bandwidth caps: a token bucket with debt, a limiter that holds one bucket per link plus a global
// one, and the parser/printer for the rates users type.
//
// How the engine applies a cap (no sleeping threads): when a transfer has moved `n` bytes it calls
// RateLimiter::consume(link, n, now). The bytes have already moved, so consumption always succeeds;
// the bucket may go into debt, and the answer is how long that transfer must stay paused
// (`curl_easy_pause`) before it moves more. The loop arms a timer for `now + wait`; when it fires
// it asks wait_time() again and resumes the transfer only at 0, since other transfers on the same
// link may have charged the bucket meanwhile. Over any interval T a bucket then lets through at
// most burst_bytes + rate_bytes_per_s * T plus the pieces charged after the fact by transfers
// that were moving when the debt began (at most one each), so the piece size (curl's write
// callbacks, 16 KiB to 256 KiB) bounds the overshoot. Without the second look the long-run rate
// still holds, but every paused transfer can pile a piece onto the debt, and pacing gets burstier.
//
// Threading: objects belong to one thread (the event loop); the free functions are reentrant.
// Nothing here reads a clock; `now` must not go backwards for one object (if it does, no tokens
// are added for the backwards step, and nothing breaks).
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>

#include "planner/time_point.h"

namespace planner {

// The longest wait consume()/wait_time() report: keeps the double -> nanoseconds conversion
// defined whatever the debt and rate (a rate of 1 byte/s and 1 GiB of debt would be 34 years).
inline constexpr std::chrono::nanoseconds kMaxWait = std::chrono::hours(24 * 365);

// A token bucket in bytes. rate_bytes_per_s <= 0 (or not finite) means unlimited: consume() never
// asks for a wait and available() is UINT64_MAX. A new bucket starts full (burst_bytes available),
// so a transfer that starts on an idle link is not delayed. A burst of 0 is allowed: every
// consume() then goes into debt and the pieces are paced exactly at the rate.
class TokenBucket {
public:
    TokenBucket(double rate_bytes_per_s, uint64_t burst_bytes, TimePoint now) noexcept;

    // Changes rate and burst from `now` on. Tokens accrued until `now` at the old rate are kept
    // (clamped to the new burst); a debt is kept and is paid off at the new rate. A bucket that
    // was unlimited starts full.
    void set_rate(double rate_bytes_per_s, uint64_t burst_bytes, TimePoint now) noexcept;

    // Charges `bytes` that were (or are about to be) moved. Always succeeds; may leave the balance
    // negative. Returns how long the caller must wait before consuming again: 0 while the balance
    // is still >= 0, otherwise the time until the debt is paid off (at most kMaxWait).
    std::chrono::nanoseconds consume(uint64_t bytes, TimePoint now) noexcept;

    // The wait consume() would report now without charging anything: 0 unless in debt.
    std::chrono::nanoseconds wait_time(TimePoint now) const noexcept;

    // Whole bytes available now (0 if in debt); UINT64_MAX when unlimited.
    uint64_t available(TimePoint now) const noexcept;

    bool unlimited() const noexcept { return rate_bytes_per_s_ <= 0; }
    double rate_bytes_per_s() const noexcept { return rate_bytes_per_s_; }
    uint64_t burst_bytes() const noexcept { return burst_bytes_; }

private:
    // The balance at `now`, without storing it.
    double balance_at(TimePoint now) const noexcept;
    void refill(TimePoint now) noexcept;
    std::chrono::nanoseconds wait_for_balance(double balance_bytes) const noexcept;

    double rate_bytes_per_s_;  // 0: unlimited
    uint64_t burst_bytes_;
    double balance_bytes_;  // may be negative (debt); never above burst_bytes_
    TimePoint last_;        // when balance_bytes_ was last brought up to date
};

// "One cap means one cap": every transfer on a link (source region -> target region, named by the
// engine, e.g. "eu-west>us-east") charges that link's one bucket, however many tasks, rules or
// workers share it, and every transfer charges the global bucket too. A link without a cap (never
// set, or set to rate 0) only answers to the global bucket; the global bucket starts unlimited.
class RateLimiter {
public:
    explicit RateLimiter(TimePoint now) noexcept : global_(0, 0, now) {}
    RateLimiter() noexcept : RateLimiter(TimePoint{}) {}

    // Creates or re-rates the link's bucket (see TokenBucket::set_rate). rate 0: no link cap.
    void set_link(const std::string& link, double rate_bytes_per_s, uint64_t burst_bytes, TimePoint now);
    // Forgets a link's bucket (its debt too). Returns false if there was none.
    bool remove_link(const std::string& link) noexcept;
    void set_global(double rate_bytes_per_s, uint64_t burst_bytes, TimePoint now) noexcept;

    // Charges `bytes` to the link's bucket (if it has one) and to the global bucket; returns the
    // longer of the two waits.
    std::chrono::nanoseconds consume(const std::string& link, uint64_t bytes, TimePoint now) noexcept;
    // The wait a transfer on `link` must still observe now (0: it may move bytes).
    std::chrono::nanoseconds wait_time(const std::string& link, TimePoint now) const noexcept;
    // Bytes that may move on `link` now without debt: the smaller of link and global.
    uint64_t available(const std::string& link, TimePoint now) const noexcept;

    // The link's bucket, or nullptr if it has none. The pointer is valid until the next
    // set_link()/remove_link() of that link.
    const TokenBucket* link(const std::string& link) const noexcept;
    const TokenBucket& global() const noexcept { return global_; }

private:
    // std::less<> so lookups by string_view-like keys do not allocate.
    std::map<std::string, TokenBucket, std::less<>> links_;
    TokenBucket global_;
};

// A rate typed by a user, in bytes per second. Accepted (case-insensitive prefixes, whitespace
// allowed around the number and unit):
//   "100000"                          bytes/s
//   "1.5GiB/s" "50MiB/s" "64KiB"      bytes, binary prefixes Ki Mi Gi Ti; "/s" optional
//   "50MB/s" "50MBps" "800kB"         bytes, decimal prefixes k M G T
//   "200Mbit" "200Mbit/s" "1Gbit"     bits, decimal prefixes; also "Mibit", "Mbps", "bits"
//   "0" "unlimited"                   0, meaning unlimited (any rate that parses to 0 is unlimited)
// Refused (nullopt): empty or garbage, signs and exponents, a prefix without a unit ("50M"), and
// a lone lowercase "b" ("50Mb", "50mbps" is fine): lowercase "b" alone is bits to some tools and
// bytes to others, and an 8x mistake on a production link is worse than an error message.
// Rates above 1e15 bytes/s (8 Pbit/s) are refused as typos.
std::optional<double> parse_rate(std::string_view text);

// Prints a rate for people, in bits per second with a decimal prefix and at most two decimals:
// 25e6 -> "200Mbit/s", 187.5e6 -> "1.5Gbit/s". Values <= 0 or not finite print "unlimited",
// matching how TokenBucket treats them. parse_rate() reads the result back (to the rounding).
std::string format_rate(double bytes_per_s);

}  // namespace planner
