#include "planner/backoff.h"

#include <gtest/gtest.h>

#include <set>

namespace {

using namespace std::chrono;
using planner::Backoff;
using planner::BackoffPolicy;
using planner::parse_retry_after;

TEST(Backoff, StaysWithinBounds) {
    Backoff b(BackoffPolicy{}, 42);
    for (int attempt = 0; attempt < 12; ++attempt) {
        const int64_t hi = std::min<int64_t>(10000, 200LL << attempt);
        for (int i = 0; i < 2000; ++i) {
            const auto d = b.next_delay(attempt).count();
            EXPECT_GE(d, 100) << "attempt " << attempt;
            EXPECT_LE(d, hi) << "attempt " << attempt;
        }
        EXPECT_EQ(b.ceiling(attempt).count(), hi);
    }
}

TEST(Backoff, DeterministicPerSeed) {
    Backoff a(BackoffPolicy{}, 7), b(BackoffPolicy{}, 7), c(BackoffPolicy{}, 8);
    bool differs = false;
    for (int i = 0; i < 50; ++i) {
        const auto x = a.next_delay(5);
        EXPECT_EQ(x, b.next_delay(5));
        if (x != c.next_delay(5)) differs = true;
    }
    EXPECT_TRUE(differs);
}

TEST(Backoff, JitterSpreadsOverTheRange) {
    Backoff b(BackoffPolicy{milliseconds(100), milliseconds(100000), 5}, 1);
    // attempt 4: [50, 1600]
    double sum = 0;
    int64_t lo = 1 << 30, hi = 0;
    std::set<int64_t> distinct;
    constexpr int kN = 20000;
    for (int i = 0; i < kN; ++i) {
        const int64_t d = b.next_delay(4).count();
        sum += static_cast<double>(d);
        lo = std::min(lo, d);
        hi = std::max(hi, d);
        distinct.insert(d);
    }
    EXPECT_NEAR(sum / kN, (50 + 1600) / 2.0, 30);
    EXPECT_LT(lo, 70);
    EXPECT_GT(hi, 1580);
    EXPECT_GT(distinct.size(), 1000u);
}

TEST(Backoff, EdgeCases) {
    Backoff b(BackoffPolicy{}, 3);
    // Huge and negative attempts neither overflow nor go out of range.
    for (int attempt : {-5, -1, 31, 63, 64, 1000, std::numeric_limits<int>::max()}) {
        const auto d = b.next_delay(attempt).count();
        EXPECT_GE(d, 100);
        EXPECT_LE(d, attempt < 0 ? 200 : 10000);
    }
    Backoff zero(BackoffPolicy{milliseconds(0), milliseconds(0), 3}, 3);
    EXPECT_EQ(zero.next_delay(3).count(), 0);
    Backoff negative(BackoffPolicy{milliseconds(-10), milliseconds(-5), 3}, 3);
    EXPECT_EQ(negative.next_delay(3).count(), 0);
    // cap below base/2: the cap wins.
    Backoff capped(BackoffPolicy{milliseconds(1000), milliseconds(300), 3}, 3);
    for (int i = 0; i < 100; ++i) EXPECT_EQ(capped.next_delay(i % 5).count(), 300);
    // Enormous base and cap.
    Backoff big(BackoffPolicy{milliseconds(std::numeric_limits<int64_t>::max() / 2),
                              milliseconds(std::numeric_limits<int64_t>::max()), 3},
                3);
    for (int i = 0; i < 100; ++i) EXPECT_GE(big.next_delay(i).count(), 0);
}

system_clock::time_point at(int y, unsigned m, unsigned d, int hh, int mm, int ss) {
    return sys_days(year(y) / month(m) / day(d)) + hours(hh) + minutes(mm) + seconds(ss);
}

TEST(RetryAfter, DelaySeconds) {
    const auto now = system_clock::now();
    EXPECT_EQ(parse_retry_after("120", now), milliseconds(120000));
    EXPECT_EQ(parse_retry_after("0", now), milliseconds(0));
    EXPECT_EQ(parse_retry_after("  5\t", now), milliseconds(5000));
    EXPECT_EQ(parse_retry_after("007", now), milliseconds(7000));
    EXPECT_EQ(parse_retry_after("3600", now), milliseconds(3600000));
    EXPECT_EQ(parse_retry_after("3601", now), milliseconds(3600000));
    EXPECT_EQ(parse_retry_after("99999999999999999999999999999999", now), planner::kMaxRetryAfter);
    for (const char* bad : {"", "   ", "-1", "+1", "1.5", "1e3", "abc", "12 34", "0x10", "5s", "\x01"})
        EXPECT_EQ(parse_retry_after(bad, now), std::nullopt) << bad;
}

TEST(RetryAfter, HttpDates) {
    const auto now = at(2015, 10, 21, 7, 27, 0);
    EXPECT_EQ(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now), milliseconds(60000));
    EXPECT_EQ(parse_retry_after(" Wed, 21 Oct 2015 07:28:00 GMT ", now), milliseconds(60000));
    // Sub-second `now`.
    EXPECT_EQ(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now + milliseconds(250)), milliseconds(59750));
    // Past -> 0.
    EXPECT_EQ(parse_retry_after("Wed, 21 Oct 2015 07:26:00 GMT", now), milliseconds(0));
    EXPECT_EQ(parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now), milliseconds(0));
    // Far future -> capped, no overflow.
    EXPECT_EQ(parse_retry_after("Fri, 31 Dec 9999 23:59:59 GMT", now), planner::kMaxRetryAfter);
    EXPECT_EQ(parse_retry_after("Wed, 21 Oct 2015 09:28:00 GMT", now), planner::kMaxRetryAfter);
    // Obsolete formats (RFC 9110 §5.6.7).
    EXPECT_EQ(parse_retry_after("Wednesday, 21-Oct-15 07:28:00 GMT", now), milliseconds(60000));
    EXPECT_EQ(parse_retry_after("Wed Oct 21 07:28:00 2015", now), milliseconds(60000));
    EXPECT_EQ(parse_retry_after("Wed Oct  1 07:28:00 2015", at(2015, 10, 1, 7, 27, 30)), milliseconds(30000));
    // Leap day.
    EXPECT_EQ(parse_retry_after("Thu, 29 Feb 2024 00:00:10 GMT", at(2024, 2, 29, 0, 0, 0)), milliseconds(10000));
}

TEST(RetryAfter, MalformedDates) {
    const auto now = at(2015, 10, 21, 7, 27, 0);
    for (const char* bad : {
             "Wed, 21 Oct 2015 07:28:00",        // no zone
             "Wed, 21 Oct 2015 07:28:00 UTC",    // wrong zone
             "Wed, 21 Oct 2015 07:28:00 gmt",
             "wed, 21 Oct 2015 07:28:00 GMT",
             "Wed, 21 oct 2015 07:28:00 GMT",
             "Wed, 1 Oct 2015 07:28:00 GMT",     // day must be 2 digits
             "Wed, 21 Oct 15 07:28:00 GMT",
             "Wed, 31 Feb 2015 07:28:00 GMT",    // no such day
             "Wed, 29 Feb 2015 07:28:00 GMT",
             "Wed, 21 Oct 2015 24:00:00 GMT",
             "Wed, 21 Oct 2015 07:60:00 GMT",
             "Wed, 21 Oct 2015 07:28:61 GMT",
             "Wed, 21 Oct 2015 07:28:00 GMTX",
             "Xyz, 21 Oct 2015 07:28:00 GMT",
             "Wed, 21 Oct 2015 7:28:00 GMT",
             "Wed,21 Oct 2015 07:28:00 GMT",
             "Wed, 21 Oct 2015",
             "Wed",
             "W",
             "2015-10-21T07:28:00Z",
         })
        EXPECT_EQ(parse_retry_after(bad, now), std::nullopt) << bad;
}

TEST(RetryAfter, RandomGarbageNeverCrashes) {
    uint64_t s = 12345;
    const auto now = system_clock::now();
    const std::string alphabet = "0123456789 ,:-WedOctGMTSunNov\t\x01\xff";
    for (int i = 0; i < 20000; ++i) {
        std::string v;
        s = s * 6364136223846793005ULL + 1442695040888963407ULL;
        const size_t len = (s >> 33) % 40;
        for (size_t k = 0; k < len; ++k) {
            s = s * 6364136223846793005ULL + 1442695040888963407ULL;
            v += alphabet[(s >> 33) % alphabet.size()];
        }
        auto r = parse_retry_after(v, now);
        if (r) {
            EXPECT_GE(r->count(), 0);
            EXPECT_LE(*r, planner::kMaxRetryAfter);
        }
    }
}

TEST(RetryableStatus, Set) {
    for (long s : {408L, 429L, 500L, 502L, 503L, 504L}) EXPECT_TRUE(planner::is_retryable_status(s)) << s;
    for (long s : {0L, 200L, 201L, 202L, 301L, 400L, 401L, 403L, 404L, 409L, 416L, 501L, 505L, 599L, -1L})
        EXPECT_FALSE(planner::is_retryable_status(s)) << s;
}

}  // namespace
