#include "planner/backoff.h"

#include <algorithm>
#include <array>
#include <limits>

namespace planner {

using std::chrono::milliseconds;

Backoff::Backoff(BackoffPolicy p, uint64_t seed) : policy_(p), state_(seed) {}

milliseconds Backoff::ceiling(int attempt) const noexcept {
    const int64_t base = std::max<int64_t>(0, policy_.base.count());
    const int64_t cap = std::max<int64_t>(0, policy_.cap.count());
    int64_t c = base;
    // Double until the cap is reached; stops early, so no overflow whatever `attempt` is.
    for (int i = 0; i < attempt && c < cap; ++i) c = (c > cap / 2) ? cap : c * 2;
    return milliseconds(std::min(c, cap));
}

milliseconds Backoff::next_delay(int attempt) noexcept {
    const int64_t hi = ceiling(attempt).count();
    const int64_t lo = std::min<int64_t>(std::max<int64_t>(0, policy_.base.count()) / 2, hi);
    return milliseconds(static_cast<int64_t>(uniform(static_cast<uint64_t>(lo), static_cast<uint64_t>(hi))));
}

uint64_t Backoff::next_random() noexcept {
    // splitmix64 (Steele, Lea, Flood 2014): tiny state, good enough for jitter.
    uint64_t z = (state_ += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

uint64_t Backoff::uniform(uint64_t lo, uint64_t hi) noexcept {
    if (lo >= hi) return lo;
    const uint64_t span = hi - lo;
    if (span == std::numeric_limits<uint64_t>::max()) return next_random();
    const uint64_t n = span + 1;
    // Rejection sampling: drop the top partial bucket so every value is equally likely.
    const uint64_t limit = std::numeric_limits<uint64_t>::max() - std::numeric_limits<uint64_t>::max() % n;
    uint64_t r;
    do {
        r = next_random();
    } while (r >= limit);
    return lo + r % n;
}

namespace {

bool is_ws(char c) noexcept { return c == ' ' || c == '\t' || c == '\r' || c == '\n'; }

std::string_view trim(std::string_view s) noexcept {
    while (!s.empty() && is_ws(s.front())) s.remove_prefix(1);
    while (!s.empty() && is_ws(s.back())) s.remove_suffix(1);
    return s;
}

bool is_digit(char c) noexcept { return c >= '0' && c <= '9'; }

// A small cursor over the date text; every read is bounds-checked.
struct Cursor {
    std::string_view s;
    size_t i = 0;

    bool at_end() const noexcept { return i >= s.size(); }
    bool lit(std::string_view l) noexcept {
        if (s.substr(i, l.size()) != l) return false;
        i += l.size();
        return true;
    }
    // Exactly `n` digits (n >= 1).
    bool digits(size_t n, int& out) noexcept {
        if (i + n > s.size()) return false;
        int v = 0;
        for (size_t k = 0; k < n; ++k) {
            if (!is_digit(s[i + k])) return false;
            v = v * 10 + (s[i + k] - '0');
        }
        i += n;
        out = v;
        return true;
    }
    // One of `names` (case-sensitive, as the grammar says); returns its index.
    template <size_t N>
    bool one_of(const std::array<std::string_view, N>& names, int& out) noexcept {
        for (size_t k = 0; k < N; ++k) {
            if (lit(names[k])) {
                out = static_cast<int>(k);
                return true;
            }
        }
        return false;
    }
};

constexpr std::array<std::string_view, 7> kDays = {"Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"};
constexpr std::array<std::string_view, 7> kLongDays = {"Monday", "Tuesday", "Wednesday", "Thursday",
                                                       "Friday", "Saturday", "Sunday"};
constexpr std::array<std::string_view, 12> kMonths = {"Jan", "Feb", "Mar", "Apr", "May", "Jun",
                                                      "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};

struct DateParts {
    int year = 0, month = 0, day = 0, hour = 0, minute = 0, second = 0;
};

bool time_of_day(Cursor& c, DateParts& d) noexcept {
    return c.digits(2, d.hour) && c.lit(":") && c.digits(2, d.minute) && c.lit(":") && c.digits(2, d.second);
}

// IMF-fixdate: "Sun, 06 Nov 1994 08:49:37 GMT"
bool parse_imf_fixdate(std::string_view s, DateParts& d) noexcept {
    Cursor c{s};
    int ignored = 0;
    return c.one_of(kDays, ignored) && c.lit(", ") && c.digits(2, d.day) && c.lit(" ") &&
           c.one_of(kMonths, d.month) && c.lit(" ") && c.digits(4, d.year) && c.lit(" ") && time_of_day(c, d) &&
           c.lit(" GMT") && c.at_end();
}

// rfc850-date: "Sunday, 06-Nov-94 08:49:37 GMT". Two-digit years: RFC 9110 §5.6.7 says a year
// that appears more than 50 years in the future is in the past century.
bool parse_rfc850(std::string_view s, DateParts& d, int current_year) noexcept {
    Cursor c{s};
    int ignored = 0;
    if (!(c.one_of(kLongDays, ignored) && c.lit(", ") && c.digits(2, d.day) && c.lit("-") &&
          c.one_of(kMonths, d.month) && c.lit("-") && c.digits(2, d.year) && c.lit(" ") && time_of_day(c, d) &&
          c.lit(" GMT") && c.at_end()))
        return false;
    int y = current_year - current_year % 100 + d.year;
    if (y > current_year + 50) y -= 100;
    d.year = y;
    return true;
}

// asctime-date: "Sun Nov  6 08:49:37 1994" (day is 2DIGIT or SP 1DIGIT).
bool parse_asctime(std::string_view s, DateParts& d) noexcept {
    Cursor c{s};
    int ignored = 0;
    if (!(c.one_of(kDays, ignored) && c.lit(" ") && c.one_of(kMonths, d.month) && c.lit(" "))) return false;
    if (c.lit(" ")) {
        if (!c.digits(1, d.day)) return false;
    } else if (!c.digits(2, d.day)) {
        return false;
    }
    return c.lit(" ") && time_of_day(c, d) && c.lit(" ") && c.digits(4, d.year) && c.at_end();
}

std::optional<std::chrono::sys_seconds> to_time_point(const DateParts& d) noexcept {
    using namespace std::chrono;
    const year_month_day ymd{year(d.year), month(static_cast<unsigned>(d.month + 1)), day(static_cast<unsigned>(d.day))};
    if (!ymd.ok() || d.hour > 23 || d.minute > 59 || d.second > 60) return std::nullopt;  // 60: leap second
    return sys_days(ymd) + hours(d.hour) + minutes(d.minute) + seconds(d.second);
}

}  // namespace

std::optional<milliseconds> parse_retry_after(std::string_view value, std::chrono::system_clock::time_point now) {
    using namespace std::chrono;
    value = trim(value);
    if (value.empty()) return std::nullopt;

    if (std::all_of(value.begin(), value.end(), is_digit)) {
        constexpr int64_t kCapSeconds = duration_cast<seconds>(kMaxRetryAfter).count();
        int64_t secs = 0;
        for (char ch : value) {
            secs = secs * 10 + (ch - '0');
            if (secs >= kCapSeconds) return kMaxRetryAfter;  // also stops overflow on long inputs
        }
        return milliseconds(secs * 1000);
    }

    const int current_year = static_cast<int>(year_month_day(floor<days>(now)).year());
    DateParts d;
    if (!parse_imf_fixdate(value, d) && !parse_rfc850(value, d = DateParts{}, current_year) &&
        !parse_asctime(value, d = DateParts{}))
        return std::nullopt;
    const auto when = to_time_point(d);
    if (!when) return std::nullopt;
    // In milliseconds: a far-future date minus `now` would overflow system_clock's nanoseconds.
    const auto delta = time_point_cast<milliseconds>(*when) - floor<milliseconds>(now);
    if (delta <= milliseconds::zero()) return milliseconds::zero();
    return std::min(delta, kMaxRetryAfter);
}

bool is_retryable_status(long http_status) noexcept {
    switch (http_status) {
    case 408:
    case 429:
    case 500:
    case 502:
    case 503:
    case 504:
        return true;
    default:
        return false;
    }
}

}  // namespace planner
