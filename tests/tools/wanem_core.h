// wanem_core.h: the parts of wanem that do no I/O. Argument parsing (rates, sizes, loopback
// endpoints), the token bucket and the delay queue. Everything here is single-threaded state
// owned by one wanem event loop; time is always passed in (CLOCK_MONOTONIC nanoseconds), so the
// logic can be driven by a fake clock.
//
// Errors: the parsers return Parsed<T> whose `error` says what was wrong with the input. The
// data-path classes (TokenBucket, BlockPool, DelayQueue) are noexcept and never allocate except
// BlockPool::acquire(), which reports exhaustion as nullptr.
#pragma once

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include <algorithm>
#include <cassert>
#include <charconv>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace wanem {

inline constexpr int64_t kNeverNs = std::numeric_limits<int64_t>::max();

// ---------------------------------------------------------------------------------------------
// Parsing

template <class T>
struct Parsed {
    std::optional<T> value;
    std::string error;  // set when value is empty
};

namespace detail {

// A non-negative decimal number ("100", "2.5") at the start of `text`; the rest is returned.
inline std::optional<std::pair<double, std::string_view>> leading_number(std::string_view text) {
    double v = 0;
    auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), v,
                                     std::chars_format::fixed);
    if (ec != std::errc() || !std::isfinite(v) || v < 0) return std::nullopt;
    return std::pair{v, text.substr(static_cast<size_t>(end - text.data()))};
}

// "" k K M G T, optionally followed by "i" (binary). Case-insensitive so that tc's "mbit"
// works; the base unit ("bit" / "B") is what tells bits from bytes.
inline std::optional<std::pair<double, std::string_view>> unit_prefix(std::string_view u) {
    if (u.empty()) return std::pair{1.0, u};
    int power = 0;
    switch (u.front()) {
    case 'k': case 'K': power = 1; break;
    case 'm': case 'M': power = 2; break;
    case 'g': case 'G': power = 3; break;
    case 't': case 'T': power = 4; break;
    default: return std::pair{1.0, u};
    }
    u.remove_prefix(1);
    double base = 1000.0;
    if (!u.empty() && u.front() == 'i') {
        base = 1024.0;
        u.remove_prefix(1);
    }
    return std::pair{std::pow(base, power), u};
}

}  // namespace detail

// A rate per direction: "100Mbit", "1Gbit", "1.5gbit/s", "800kbit", "50MiB/s", "10MB/s",
// "0" (= unlimited). Bits use "bit"; bytes use "B". "bps" is refused: tc reads it as bytes,
// most people as bits.
inline Parsed<uint64_t> parse_rate_bytes_per_s(std::string_view text) {
    const std::string quoted = "rate '" + std::string(text) + "': ";
    auto num = detail::leading_number(text);
    if (!num) return {std::nullopt, quoted + "expected a number followed by a unit (100Mbit, 50MiB/s)"};
    auto [value, unit] = *num;
    if (unit.empty()) {
        if (value == 0) return {0, {}};
        return {std::nullopt, quoted + "needs a unit: bit, kbit, Mbit, Gbit, B/s, KiB/s, MiB/s, MB/s..."};
    }
    auto prefix = detail::unit_prefix(unit);
    if (!prefix) return {std::nullopt, quoted + "unknown unit"};
    auto [scale, rest] = *prefix;
    if (rest.ends_with("/s")) rest.remove_suffix(2);
    double bytes_per_s = 0;
    if (rest == "bit") {
        bytes_per_s = value * scale / 8.0;
    } else if (rest == "B") {
        bytes_per_s = value * scale;
    } else if (rest == "bps" || rest == "Bps") {
        return {std::nullopt, quoted + "'bps' is ambiguous; write e.g. 100Mbit or 12MB/s"};
    } else {
        return {std::nullopt, quoted + "unknown unit '" + std::string(unit) +
                                  "' (use bit, kbit, Mbit, Gbit, B/s, KiB/s, MiB/s, MB/s, GB/s...)"};
    }
    if (value == 0) return {0, {}};
    if (bytes_per_s < 1) return {std::nullopt, quoted + "below 1 byte per second"};
    if (bytes_per_s > 1e15) return {std::nullopt, quoted + "too large"};
    return {static_cast<uint64_t>(std::llround(bytes_per_s)), {}};
}

// A byte count: "65536", "64KiB", "8MiB", "16MB", "1GiB".
inline Parsed<uint64_t> parse_size_bytes(std::string_view text) {
    const std::string quoted = "size '" + std::string(text) + "': ";
    auto num = detail::leading_number(text);
    if (!num) return {std::nullopt, quoted + "expected a number, optionally with a unit (8MiB)"};
    auto [value, unit] = *num;
    auto prefix = detail::unit_prefix(unit);
    if (!prefix) return {std::nullopt, quoted + "unknown unit"};
    auto [scale, rest] = *prefix;
    if (!(rest.empty() || rest == "B")) {
        return {std::nullopt, quoted + "unknown unit '" + std::string(unit) + "' (use B, KiB, MiB, GiB, kB, MB, GB)"};
    }
    double bytes = value * scale;
    if (bytes > 1e15) return {std::nullopt, quoted + "too large"};
    return {static_cast<uint64_t>(std::llround(bytes)), {}};
}

// One-way delay in milliseconds, fractions allowed ("25", "0.5"), at most one minute.
inline Parsed<int64_t> parse_delay_ns(std::string_view text) {
    auto num = detail::leading_number(text);
    if (!num || !num->second.empty()) {
        return {std::nullopt, "delay '" + std::string(text) + "': expected milliseconds (25, 0.5)"};
    }
    if (num->first > 60'000) return {std::nullopt, "delay '" + std::string(text) + "': at most 60000 ms"};
    return {static_cast<int64_t>(std::llround(num->first * 1e6)), {}};
}

struct Endpoint {
    sockaddr_storage addr{};
    socklen_t addr_len = 0;
    int family() const noexcept { return addr.ss_family; }
};

// "127.0.0.1:8080", "127.1.2.3:0", "[::1]:8080" or "localhost:8080". Anything that is not a
// loopback address is refused: wanem must never relay traffic off the machine.
inline Parsed<Endpoint> parse_loopback_endpoint(std::string_view text, bool allow_port_zero) {
    const std::string quoted = "address '" + std::string(text) + "': ";
    std::string host;
    std::string_view port_text;
    if (text.starts_with('[')) {
        auto close = text.find(']');
        if (close == std::string_view::npos || close + 1 >= text.size() || text[close + 1] != ':') {
            return {std::nullopt, quoted + "expected [IPv6]:PORT"};
        }
        host = std::string(text.substr(1, close - 1));
        port_text = text.substr(close + 2);
    } else {
        auto colon = text.rfind(':');
        if (colon == std::string_view::npos) return {std::nullopt, quoted + "expected HOST:PORT"};
        host = std::string(text.substr(0, colon));
        port_text = text.substr(colon + 1);
    }
    unsigned port = 0;
    auto [pend, pec] = std::from_chars(port_text.data(), port_text.data() + port_text.size(), port);
    if (port_text.empty() || pec != std::errc() || pend != port_text.data() + port_text.size() ||
        port > 65535) {
        return {std::nullopt, quoted + "bad port"};
    }
    if (port == 0 && !allow_port_zero) return {std::nullopt, quoted + "port 0 is not allowed here"};
    if (host == "localhost") host = "127.0.0.1";

    Endpoint ep;
    in_addr v4{};
    in6_addr v6{};
    if (inet_pton(AF_INET, host.c_str(), &v4) == 1) {
        if ((ntohl(v4.s_addr) >> 24) != 127) {
            return {std::nullopt, quoted + "not a loopback address (only 127.0.0.0/8 and ::1)"};
        }
        sockaddr_in sin{};
        sin.sin_family = AF_INET;
        sin.sin_port = htons(static_cast<uint16_t>(port));
        sin.sin_addr = v4;
        std::memcpy(&ep.addr, &sin, sizeof sin);
        ep.addr_len = sizeof sin;
    } else if (inet_pton(AF_INET6, host.c_str(), &v6) == 1) {
        if (!IN6_IS_ADDR_LOOPBACK(&v6)) {
            return {std::nullopt, quoted + "not a loopback address (only 127.0.0.0/8 and ::1)"};
        }
        sockaddr_in6 sin6{};
        sin6.sin6_family = AF_INET6;
        sin6.sin6_port = htons(static_cast<uint16_t>(port));
        sin6.sin6_addr = v6;
        std::memcpy(&ep.addr, &sin6, sizeof sin6);
        ep.addr_len = sizeof sin6;
    } else {
        return {std::nullopt, quoted + "host must be a numeric loopback address or localhost"};
    }
    return {ep, {}};
}

// ---------------------------------------------------------------------------------------------
// Token bucket: `rate_bytes_per_s` refill, at most `burst_bytes` saved up. Rate 0 = unlimited.
//
// Late wake-ups are made good. A caller that runs out of tokens asks ready_at_ns() when to come
// back; if it comes back later than that (timer slack, a busy loop, or a virtual CPU the host did
// not schedule: tens of milliseconds have been seen on small VMs), the tokens that accrued since
// the promised time are kept even beyond the burst, up to kMaxCatchUpNs worth. Without this every
// late wake-up would silently lower the rate. An idle bucket still saves up only the burst.

class TokenBucket {
public:
    static constexpr int64_t kMaxCatchUpNs = 500'000'000;

    TokenBucket() = default;  // unlimited
    TokenBucket(uint64_t rate_bytes_per_s, uint64_t burst_bytes, int64_t now_ns) noexcept
        : rate_bytes_per_s_(rate_bytes_per_s),
          burst_bytes_(static_cast<double>(burst_bytes)),
          tokens_(static_cast<double>(burst_bytes)),
          last_ns_(now_ns) {}

    bool unlimited() const noexcept { return rate_bytes_per_s_ == 0; }
    uint64_t rate_bytes_per_s() const noexcept { return rate_bytes_per_s_; }

    // Whole tokens available at now_ns (refills first); unlimited: UINT64_MAX.
    uint64_t available(int64_t now_ns) noexcept {
        if (unlimited()) return std::numeric_limits<uint64_t>::max();
        refill(now_ns);
        return static_cast<uint64_t>(tokens_);
    }

    // Spends n tokens; n must not exceed available().
    void take(uint64_t n) noexcept {
        if (unlimited()) return;
        tokens_ -= static_cast<double>(n);
        assert(tokens_ > -1.0);
    }

    // Earliest time at which n tokens will be available (n is clamped to the burst). The caller
    // promises to come back then; see the class comment.
    int64_t ready_at_ns(uint64_t n, int64_t now_ns) noexcept {
        if (unlimited()) return now_ns;
        refill(now_ns);
        double want = std::min(static_cast<double>(n), burst_bytes_);
        if (tokens_ >= want) return now_ns;
        double wait_ns = std::ceil((want - tokens_) * 1e9 / static_cast<double>(rate_bytes_per_s_));
        wake_ns_ = now_ns + static_cast<int64_t>(wait_ns) + 1;
        return wake_ns_;
    }

private:
    void refill(int64_t now_ns) noexcept {
        if (now_ns <= last_ns_) return;
        double cap = burst_bytes_;
        if (wake_ns_ != kNeverNs && now_ns > wake_ns_) {
            // Came back late: keep what accrued since the promised time.
            cap += static_cast<double>(std::min(now_ns - wake_ns_, kMaxCatchUpNs)) *
                   static_cast<double>(rate_bytes_per_s_) / 1e9;
        }
        wake_ns_ = kNeverNs;
        double refilled = tokens_ + static_cast<double>(now_ns - last_ns_) *
                                        static_cast<double>(rate_bytes_per_s_) / 1e9;
        // Tokens above the cap (catch-up credit being spent) are never clipped away.
        tokens_ = std::max(tokens_, std::min(cap, refilled));
        last_ns_ = now_ns;
    }

    uint64_t rate_bytes_per_s_ = 0;
    double burst_bytes_ = 0;
    double tokens_ = 0;
    int64_t last_ns_ = 0;
    int64_t wake_ns_ = kNeverNs;  // promised by ready_at_ns(), cleared by the next refill
};

// ---------------------------------------------------------------------------------------------
// Fixed-size buffer blocks shared by every queue of one proxy, with a cap on the total. Blocks
// are owned by whoever holds the unique_ptr; a queue gives them back with release().
//
// The cap is soft: a caller may ask for a block `beyond_limit`, which DelayQueue does for its
// first kReservedBlocks. Every direction of every connection can thus always make progress; a
// hard global cap would let the queues of one stalled connection starve all the others (or let
// an echo-style peer deadlock against itself).

class BlockPool {
public:
    static constexpr size_t kBlockBytes = 64 * 1024;
    static constexpr size_t kMaxFreeBlocks = 256;  // 16 MiB kept for reuse, the rest is freed

    explicit BlockPool(uint64_t limit_bytes)
        : limit_blocks_(std::max<uint64_t>(4, limit_bytes / kBlockBytes)) {
        free_.reserve(kMaxFreeBlocks);
    }

    // A block, or nullptr when the limit is reached (unless beyond_limit) or memory ran out.
    std::unique_ptr<std::byte[]> acquire(bool beyond_limit) noexcept {
        if (in_use_ >= limit_blocks_ && !beyond_limit) return nullptr;
        std::unique_ptr<std::byte[]> b;
        if (!free_.empty()) {
            b = std::move(free_.back());
            free_.pop_back();
        } else {
            b.reset(new (std::nothrow) std::byte[kBlockBytes]);
            if (!b) return nullptr;
        }
        ++in_use_;
        return b;
    }

    void release(std::unique_ptr<std::byte[]> block) noexcept {
        assert(block && in_use_ > 0);
        --in_use_;
        if (free_.size() < kMaxFreeBlocks) free_.push_back(std::move(block));  // capacity reserved
    }

    uint64_t in_use_blocks() const noexcept { return in_use_; }
    uint64_t limit_blocks() const noexcept { return limit_blocks_; }

private:
    uint64_t limit_blocks_;
    uint64_t in_use_ = 0;
    std::vector<std::unique_ptr<std::byte[]>> free_;
};

// ---------------------------------------------------------------------------------------------
// DelayQueue: the bytes of one direction of one connection between the read from the source
// socket and the write to the sink socket. Every read is stamped with the time at which its
// bytes may leave (read time + one-way delay); bytes become sendable only then, in order. An
// end-of-stream (the source's FIN) is queued the same way, after the last byte.
//
// Storage: a ring of BlockPool blocks; byte positions are absolute stream offsets. At most
// `limit_bytes` are held: the caller stops reading when space_bytes() is 0, so the source's
// TCP window closes (back-pressure).
//
// Release marks: a ring with room for `max_marks`; reads whose release times lie within
// kMergeNs of the newest mark's first stamp share that mark (released at the later stamp). When
// the ring is full, reads join the newest mark. Both only ever release bytes later, never early.

class DelayQueue {
public:
    static constexpr int64_t kMergeNs = 50'000;
    static constexpr size_t kReservedBlocks = 2;  // taken from the pool even beyond its limit

    DelayQueue(BlockPool& pool, uint64_t limit_bytes, size_t max_marks)
        : pool_(&pool),
          limit_bytes_(limit_bytes),
          blocks_(limit_bytes / BlockPool::kBlockBytes + 3),
          marks_(std::max<size_t>(2, max_marks)) {}
    DelayQueue(const DelayQueue&) = delete;
    DelayQueue& operator=(const DelayQueue&) = delete;
    ~DelayQueue() { clear(); }

    uint64_t queued_bytes() const noexcept { return received_ - sent_; }
    uint64_t space_bytes() const noexcept {
        return eof_queued_ ? 0 : limit_bytes_ - std::min(limit_bytes_, queued_bytes());
    }
    uint64_t received_bytes() const noexcept { return received_; }
    uint64_t sent_bytes() const noexcept { return sent_; }
    bool eof_queued() const noexcept { return eof_queued_; }
    // The source's FIN was queued, is due, and every byte before it was sent.
    bool eof_due() const noexcept { return eof_released_ && sent_ == received_; }
    bool has_sendable() const noexcept { return released_end_ > sent_; }

    // Iovecs for a read of at most max_bytes (and at most space_bytes()), taking new blocks
    // from the pool as needed. Returns how many entries of `iov` were filled; 0 means no room:
    // either no space or the pool is exhausted (then pool_exhausted() is true).
    size_t prepare_read(uint64_t max_bytes, std::span<iovec> iov) noexcept {
        pool_exhausted_ = false;
        uint64_t want = std::min(max_bytes, space_bytes());
        size_t n = 0;
        uint64_t pos = received_;
        while (want > 0 && n < iov.size()) {
            uint64_t rel = pos - base_;
            size_t idx = static_cast<size_t>(rel / BlockPool::kBlockBytes);
            if (idx >= count_) {
                if (count_ == blocks_.size()) break;
                auto b = pool_->acquire(count_ < kReservedBlocks);
                if (!b) {
                    pool_exhausted_ = (n == 0);
                    break;
                }
                blocks_[(head_ + count_) % blocks_.size()] = std::move(b);
                ++count_;
            }
            size_t off = static_cast<size_t>(rel % BlockPool::kBlockBytes);
            size_t len = static_cast<size_t>(std::min<uint64_t>(want, BlockPool::kBlockBytes - off));
            iov[n].iov_base = block(idx) + off;
            iov[n].iov_len = len;
            ++n;
            pos += len;
            want -= len;
        }
        return n;
    }
    bool pool_exhausted() const noexcept { return pool_exhausted_; }

    // n bytes were read into the iovecs of the last prepare_read(); they leave at release_ns.
    // Blocks taken for the read but left empty go back to the pool; returns how many.
    size_t commit_read(uint64_t n, int64_t release_ns) noexcept {
        assert(!eof_queued_ && n <= space_bytes());
        received_ += n;
        if (n > 0) add_mark(release_ns);
        size_t used = static_cast<size_t>((received_ - base_ + BlockPool::kBlockBytes - 1) / BlockPool::kBlockBytes);
        size_t freed = 0;
        while (count_ > used) {
            --count_;
            pool_->release(std::move(blocks_[(head_ + count_) % blocks_.size()]));
            ++freed;
        }
        return freed;
    }

    // The source sent FIN; it leaves after the last byte, not before release_ns.
    void push_eof(int64_t release_ns) noexcept {
        if (eof_queued_) return;
        eof_queued_ = true;
        eof_release_ns_ = std::max(release_ns, mark_count_ ? newest_mark().release_ns : release_ns);
    }

    // Makes everything due at now_ns sendable.
    void release_due(int64_t now_ns) noexcept {
        while (mark_count_ > 0 && marks_[mark_head_].release_ns <= now_ns) {
            released_end_ = marks_[mark_head_].end;
            mark_head_ = (mark_head_ + 1) % marks_.size();
            --mark_count_;
        }
        if (eof_queued_ && mark_count_ == 0 && eof_release_ns_ <= now_ns) eof_released_ = true;
    }

    // When the next bytes (or the FIN) become due; kNeverNs when nothing is waiting.
    int64_t next_release_ns() const noexcept {
        if (mark_count_ > 0) return marks_[mark_head_].release_ns;
        if (eof_queued_ && !eof_released_) return eof_release_ns_;
        return kNeverNs;
    }

    // Iovecs over the sendable bytes; returns how many entries were filled.
    size_t prepare_send(std::span<iovec> iov) const noexcept {
        size_t n = 0;
        uint64_t pos = sent_;
        while (pos < released_end_ && n < iov.size()) {
            uint64_t rel = pos - base_;
            size_t idx = static_cast<size_t>(rel / BlockPool::kBlockBytes);
            size_t off = static_cast<size_t>(rel % BlockPool::kBlockBytes);
            size_t len = static_cast<size_t>(std::min<uint64_t>(released_end_ - pos, BlockPool::kBlockBytes - off));
            iov[n].iov_base = block(idx) + off;
            iov[n].iov_len = len;
            ++n;
            pos += len;
        }
        return n;
    }

    // n sendable bytes were written. Returns how many blocks went back to the pool.
    size_t commit_send(uint64_t n) noexcept {
        assert(sent_ + n <= released_end_);
        sent_ += n;
        size_t freed = 0;
        if (sent_ == received_) {
            // Drained: give back every block (including read-ahead ones) and restart at the
            // current offset, so an idle connection holds no memory.
            freed = count_;
            drop_blocks();
            base_ = sent_;
            return freed;
        }
        while (count_ > 0 && sent_ - base_ >= BlockPool::kBlockBytes) {
            pool_->release(std::move(blocks_[head_]));
            head_ = (head_ + 1) % blocks_.size();
            --count_;
            base_ += BlockPool::kBlockBytes;
            ++freed;
        }
        return freed;
    }

    // Drops everything queued (the sink is gone). Returns how many blocks went back.
    size_t clear() noexcept {
        size_t freed = count_;
        drop_blocks();
        base_ = sent_ = released_end_ = received_;
        mark_count_ = 0;
        return freed;
    }

private:
    struct Mark {
        int64_t first_release_ns;  // stamp of the first read in this mark
        int64_t release_ns;        // stamp of the last read: when the mark becomes due
        uint64_t end;              // stream offset just past the mark's bytes
    };

    std::byte* block(size_t idx) const noexcept { return blocks_[(head_ + idx) % blocks_.size()].get(); }
    Mark& newest_mark() noexcept { return marks_[(mark_head_ + mark_count_ - 1) % marks_.size()]; }

    void add_mark(int64_t release_ns) noexcept {
        if (mark_count_ > 0) {
            Mark& last = newest_mark();
            if (mark_count_ == marks_.size() || release_ns - last.first_release_ns <= kMergeNs) {
                last.release_ns = std::max(last.release_ns, release_ns);
                last.end = received_;
                return;
            }
        }
        marks_[(mark_head_ + mark_count_) % marks_.size()] = Mark{release_ns, release_ns, received_};
        ++mark_count_;
    }

    void drop_blocks() noexcept {
        while (count_ > 0) {
            pool_->release(std::move(blocks_[head_]));
            head_ = (head_ + 1) % blocks_.size();
            --count_;
        }
        head_ = 0;
    }

    BlockPool* pool_;
    uint64_t limit_bytes_;
    std::vector<std::unique_ptr<std::byte[]>> blocks_;  // ring; block i holds [base_ + i*B, ...)
    size_t head_ = 0;
    size_t count_ = 0;
    uint64_t base_ = 0;          // stream offset of the first byte of the head block
    uint64_t sent_ = 0;          // written to the sink
    uint64_t released_end_ = 0;  // due: may be written
    uint64_t received_ = 0;      // read from the source
    std::vector<Mark> marks_;    // ring of not-yet-due marks
    size_t mark_head_ = 0;
    size_t mark_count_ = 0;
    bool eof_queued_ = false;
    bool eof_released_ = false;
    bool pool_exhausted_ = false;
    int64_t eof_release_ns_ = kNeverNs;
};

}  // namespace wanem
