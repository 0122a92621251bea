// wanem: a loopback TCP proxy that emulates a WAN link (one-way delay, per-connection and total
// rate caps) for crossdock's tests and benchmarks, where tc netem is not available.
//
//   wanem --listen 127.0.0.1:0 --upstream 127.0.0.1:5000 --delay-ms 25
//         --conn-rate 100Mbit --total-rate 1Gbit [--stats-file FILE]
//
// See README.md beside this file for what is modelled and what is not.
//
// Structure: one thread, one epoll instance (edge-triggered), one timerfd for deadlines, one
// signalfd. Every accepted connection is a Conn with two Sides (client, upstream) and two Flows
// (client->upstream, upstream->client). A flow reads its source socket into a DelayQueue, stamped
// with read time + delay, and writes its sink socket once the bytes are due. Reading is what the
// token buckets pace: a flow that wants to read waits in the ready list of its direction, and the
// lists are served round-robin, one grant (at most kGrantBytes) per turn, so connections share the
// total cap evenly.
//
// Ownership: Proxy owns every Conn (slots_), every Conn owns its fds and queues; the ready lists,
// timer heap and dirty list hold FlowRefs ({slot, generation, direction}) that are checked
// against the slot's current generation before use, so a closed connection is never touched.
// epoll user data carries the same {slot, generation, side}.

#include "wanem_core.h"

#include <fcntl.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <functional>
#include <queue>
#include <stdexcept>
#include <string>
#include <system_error>
#include <vector>

#include "netio/unique_fd.h"

namespace wanem {
namespace {

using netio::UniqueFd;

constexpr uint64_t kGrantBytes = 256 * 1024;        // most bytes one flow reads per turn
// A flow out of tokens sleeps until it may read at least 1 ms worth of its rate (between these
// bounds): fewer, larger reads at high rates, still smooth at low ones.
constexpr uint64_t kMinGrantFloorBytes = 8 * 1024;
constexpr uint64_t kMinGrantCeilBytes = 128 * 1024;
constexpr int64_t kMinGrantNs = 1'000'000;
constexpr uint64_t kBurstMinBytes = 64 * 1024;      // token bucket depth, at least
constexpr int64_t kBurstNs = 2'000'000;             // ... or 2 ms worth of the rate
constexpr uint64_t kQueueSlackBytes = 4 * 1024 * 1024;
constexpr uint64_t kQueueMaxBytes = 256ull * 1024 * 1024;
constexpr uint64_t kAssumedUnlimitedBytesPerS = 10'000'000'000ull / 8;  // sizing only
constexpr size_t kMaxEvents = 256;
constexpr size_t kSendIovecs = 16;
constexpr size_t kReadsPerTurn = 512;                // then poll the kernel again
constexpr int64_t kAcceptRetryNs = 100'000'000;       // after EMFILE/ENFILE

uint64_t min_grant_bytes(uint64_t rate_bytes_per_s) noexcept {
    if (rate_bytes_per_s == 0) return kMinGrantFloorBytes;
    return std::clamp<uint64_t>(rate_bytes_per_s * kMinGrantNs / 1'000'000'000, kMinGrantFloorBytes, kMinGrantCeilBytes);
}

int64_t now_ns() noexcept {
    timespec ts{};
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return int64_t{ts.tv_sec} * 1'000'000'000 + ts.tv_nsec;
}

[[noreturn]] void throw_errno(const std::string& what) {
    throw std::system_error(errno, std::system_category(), what);
}

std::string endpoint_text(const sockaddr_storage& ss) {
    char host[INET6_ADDRSTRLEN] = {};
    if (ss.ss_family == AF_INET) {
        const auto& sin = reinterpret_cast<const sockaddr_in&>(ss);
        inet_ntop(AF_INET, &sin.sin_addr, host, sizeof host);
        return std::string(host) + ":" + std::to_string(ntohs(sin.sin_port));
    }
    const auto& sin6 = reinterpret_cast<const sockaddr_in6&>(ss);
    inet_ntop(AF_INET6, &sin6.sin6_addr, host, sizeof host);
    return "[" + std::string(host) + "]:" + std::to_string(ntohs(sin6.sin6_port));
}

// ---------------------------------------------------------------------------------------------

struct Config {
    Endpoint listen;
    Endpoint upstream;
    int64_t delay_ns = 0;
    uint64_t conn_rate_bytes_per_s = 0;   // 0 = unlimited
    uint64_t total_rate_bytes_per_s = 0;  // 0 = unlimited
    uint64_t queue_bytes = 0;             // per direction per connection; 0 = automatic
    uint64_t memory_limit_bytes = 1ull << 30;
    size_t max_conns = 1024;
    std::string stats_file;
};

constexpr const char* kUsage =
    "usage: wanem --listen ADDR:PORT --upstream ADDR:PORT [options]\n"
    "  --listen ADDR:PORT     loopback address to accept on; port 0 = ephemeral. Prints\n"
    "                         'listening ADDR:PORT' on stdout once ready.\n"
    "  --upstream ADDR:PORT   loopback address every connection is relayed to\n"
    "  --delay-ms D           one-way delay added in each direction (RTT += 2D); default 0\n"
    "  --conn-rate RATE       cap per connection, each direction (100Mbit, 50MiB/s; 0 = none)\n"
    "  --total-rate RATE      cap over all connections, each direction (0 = none)\n"
    "  --queue-bytes SIZE     bytes held per direction per connection (default: rate*delay + 4MiB)\n"
    "  --memory-limit SIZE    bytes held over all connections (default 1GiB)\n"
    "  --max-conns N          connections at once; more wait in the listen backlog (default 1024)\n"
    "  --stats-file FILE      JSON counters, written on SIGUSR1 and at exit\n";

// Setup-time parsing: throws std::invalid_argument with a message naming the bad input.
Config parse_args(int argc, char** argv) {
    Config cfg;
    bool have_listen = false, have_upstream = false;
    auto take = []<class T>(Parsed<T> p) {
        if (!p.value) throw std::invalid_argument(p.error);
        return *p.value;
    };
    for (int i = 1; i < argc; ++i) {
        std::string arg = argv[i];
        std::string value;
        if (arg == "--help" || arg == "-h") {
            std::fputs(kUsage, stdout);
            std::exit(0);
        }
        if (auto eq = arg.find('='); arg.starts_with("--") && eq != std::string::npos) {
            value = arg.substr(eq + 1);
            arg.resize(eq);
        } else {
            if (i + 1 >= argc) throw std::invalid_argument(arg + " needs a value");
            value = argv[++i];
        }
        if (arg == "--listen") {
            cfg.listen = take(parse_loopback_endpoint(value, true));
            have_listen = true;
        } else if (arg == "--upstream") {
            cfg.upstream = take(parse_loopback_endpoint(value, false));
            have_upstream = true;
        } else if (arg == "--delay-ms") {
            cfg.delay_ns = take(parse_delay_ns(value));
        } else if (arg == "--conn-rate") {
            cfg.conn_rate_bytes_per_s = take(parse_rate_bytes_per_s(value));
        } else if (arg == "--total-rate") {
            cfg.total_rate_bytes_per_s = take(parse_rate_bytes_per_s(value));
        } else if (arg == "--queue-bytes") {
            cfg.queue_bytes = take(parse_size_bytes(value));
            if (cfg.queue_bytes < BlockPool::kBlockBytes) {
                throw std::invalid_argument("--queue-bytes: at least 64KiB");
            }
        } else if (arg == "--memory-limit") {
            cfg.memory_limit_bytes = take(parse_size_bytes(value));
            if (cfg.memory_limit_bytes < (1u << 20)) throw std::invalid_argument("--memory-limit: at least 1MiB");
        } else if (arg == "--max-conns") {
            auto n = take(parse_size_bytes(value));
            if (n < 1 || n > 1'000'000) throw std::invalid_argument("--max-conns: 1 to 1000000");
            cfg.max_conns = static_cast<size_t>(n);
        } else if (arg == "--stats-file") {
            cfg.stats_file = value;
        } else {
            throw std::invalid_argument("unknown option " + arg);
        }
    }
    if (!have_listen) throw std::invalid_argument("--listen is required");
    if (!have_upstream) throw std::invalid_argument("--upstream is required");
    if (cfg.queue_bytes == 0) {
        // The queue is what stands for the bytes in flight on the emulated link: a flow can move
        // at most queue_bytes per delay, so size it for the bandwidth-delay product plus slack.
        uint64_t rate = cfg.conn_rate_bytes_per_s ? cfg.conn_rate_bytes_per_s
                      : cfg.total_rate_bytes_per_s ? cfg.total_rate_bytes_per_s
                      : kAssumedUnlimitedBytesPerS;
        double bdp = static_cast<double>(rate) * static_cast<double>(cfg.delay_ns) / 1e9;
        cfg.queue_bytes = std::min<uint64_t>(kQueueMaxBytes, static_cast<uint64_t>(bdp) + kQueueSlackBytes);
    }
    return cfg;
}

// ---------------------------------------------------------------------------------------------

enum Dir : int { kClientToUpstream = 0, kUpstreamToClient = 1 };
enum SideIdx : int { kClient = 0, kUpstream = 1 };

struct Side {
    UniqueFd fd;
    bool readable = false;  // edge-triggered: true until a read comes back short or EAGAIN
    bool writable = false;  // edge-triggered: true until a write comes back short or EAGAIN
    bool dead = false;      // reset or failed: no more I/O on it
    bool peer_fin = false;  // EPOLLRDHUP seen: a read returns 0 once the data before it is read
};

// Flow d reads Side d and writes Side 1-d.
struct Flow {
    Flow(BlockPool& pool, uint64_t queue_bytes, size_t max_marks, TokenBucket b)
        : queue(pool, queue_bytes, max_marks), bucket(b) {}
    DelayQueue queue;
    TokenBucket bucket;
    bool eof_read = false;
    bool fin_sent = false;
    bool in_ready = false;
    bool in_dirty = false;
    bool mem_wait = false;
    int64_t timer_ns = kNeverNs;  // earliest wake-up already in the heap for this flow
};

struct Conn {
    enum class State { connect_pending, connecting, open };
    Conn(uint32_t s, uint32_t g, BlockPool& pool, const Config& cfg, size_t max_marks, int64_t now)
        : slot(s), generation(g),
          flows{Flow(pool, cfg.queue_bytes, max_marks, make_bucket(cfg, now)),
                Flow(pool, cfg.queue_bytes, max_marks, make_bucket(cfg, now))} {}
    static TokenBucket make_bucket(const Config& cfg, int64_t now) {
        if (cfg.conn_rate_bytes_per_s == 0) return TokenBucket();
        return TokenBucket(cfg.conn_rate_bytes_per_s, std::max<uint64_t>(kBurstMinBytes, cfg.conn_rate_bytes_per_s * kBurstNs / 1'000'000'000), now);
    }

    uint32_t slot;
    uint32_t generation;
    State state = State::connect_pending;
    std::array<Side, 2> sides;
    std::array<Flow, 2> flows;
    int64_t connect_at_ns = kNeverNs;
    int64_t abort_at_ns = kNeverNs;  // a side was reset: reset the other one at this time
    bool reset_counted = false;
};

struct FlowRef {
    uint32_t slot;
    uint32_t generation;
    int dir;  // 0/1 = flow, 2 = the connection itself (connect / abort deadlines)
};

struct TimerEntry {
    int64_t when_ns;
    FlowRef ref;
    bool operator>(const TimerEntry& o) const noexcept { return when_ns > o.when_ns; }
};

struct DirStats {
    uint64_t bytes_in = 0;   // read from the source
    uint64_t bytes_out = 0;  // written to the sink
};

struct Stats {
    uint64_t accepted = 0;
    uint64_t closed = 0;
    uint64_t resets = 0;
    uint64_t upstream_refused = 0;
    uint64_t peak_active = 0;
    std::array<DirStats, 2> dirs;
};

// epoll user data: generation in the high 32 bits, slot << 1 | side in the low 32.
constexpr uint32_t kSpecialSlot = 0x7fffffff;
constexpr uint64_t kTagListen = (uint64_t{1} << 32) | (uint64_t{kSpecialSlot} << 1);
constexpr uint64_t kTagTimer = (uint64_t{2} << 32) | (uint64_t{kSpecialSlot} << 1);
constexpr uint64_t kTagSignal = (uint64_t{3} << 32) | (uint64_t{kSpecialSlot} << 1);

uint64_t tag(const Conn& c, int side) noexcept {
    return (uint64_t{c.generation} << 32) | (uint64_t{c.slot} << 1) | static_cast<uint64_t>(side);
}

// ---------------------------------------------------------------------------------------------

class Proxy {
public:
    explicit Proxy(Config cfg);
    int run();  // returns the exit status

private:
    // events
    void on_listen_ready(int64_t now) noexcept;
    void on_socket_event(uint64_t data, uint32_t events, int64_t now) noexcept;
    void on_signal() noexcept;
    void on_timers(int64_t now) noexcept;

    // connection life cycle
    Conn* lookup(uint32_t slot, uint32_t generation) noexcept;
    Conn* lookup(const FlowRef& r) noexcept { return lookup(r.slot, r.generation); }
    void connect_upstream(Conn& c, int64_t now) noexcept;
    void side_failed(Conn& c, int side, int64_t now) noexcept;
    void conn_deadlines(Conn& c, int64_t now) noexcept;
    void abort_conn(Conn& c) noexcept;
    void close_conn(Conn& c) noexcept;
    bool add_to_epoll(Conn& c, int side) noexcept;

    // data path
    bool read_wanted(const Conn& c, int d) const noexcept;
    void pump(Conn& c, int d, int64_t now) noexcept;
    void service_ready(int d) noexcept;
    void mark_dirty(Conn& c, int d) noexcept;
    void run_dirty(int64_t now) noexcept;
    void arm(Conn& c, int d, int64_t when_ns) noexcept;
    void blocks_freed() noexcept;
    bool has_immediate_work(int64_t now) noexcept;
    int64_t next_deadline_ns() noexcept;
    void set_timerfd(int64_t when_ns) noexcept;

    void write_stats() noexcept;

    Config cfg_;
    size_t max_marks_;
    uint64_t conn_min_grant_;
    uint64_t total_min_grant_;
    UniqueFd epoll_;
    UniqueFd listen_;
    UniqueFd timer_;
    UniqueFd signal_;
    BlockPool pool_;
    std::array<TokenBucket, 2> total_;
    std::array<std::deque<FlowRef>, 2> ready_;
    std::array<int64_t, 2> total_wait_ns_{kNeverNs, kNeverNs};
    std::vector<FlowRef> mem_waiters_;
    std::vector<FlowRef> dirty_;
    std::priority_queue<TimerEntry, std::vector<TimerEntry>, std::greater<>> timers_;
    int64_t timer_armed_ns_ = kNeverNs;
    std::vector<std::unique_ptr<Conn>> slots_;
    std::vector<uint32_t> free_slots_;
    std::vector<uint32_t> generations_;
    size_t active_ = 0;
    bool accept_paused_ = false;
    int64_t accept_retry_ns_ = kNeverNs;
    bool stop_ = false;
    int64_t start_ns_;
    Stats stats_;
};

Proxy::Proxy(Config cfg)
    : cfg_(std::move(cfg)),
      max_marks_(static_cast<size_t>(std::clamp<int64_t>(cfg_.delay_ns / DelayQueue::kMergeNs + 16, 16, 2048))),
      conn_min_grant_(min_grant_bytes(cfg_.conn_rate_bytes_per_s)),
      total_min_grant_(min_grant_bytes(cfg_.total_rate_bytes_per_s)),
      pool_(cfg_.memory_limit_bytes),
      start_ns_(now_ns()) {
    // Two fds per connection plus a few; raise the soft limit as far as the hard one allows.
    rlimit rl{};
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
        getrlimit(RLIMIT_NOFILE, &rl);
    }
    if (rl.rlim_cur != RLIM_INFINITY && rl.rlim_cur < 2 * cfg_.max_conns + 32) {
        cfg_.max_conns = std::max<size_t>(1, (rl.rlim_cur - 32) / 2);
        std::fprintf(stderr, "wanem: open-file limit allows only %zu connections\n", cfg_.max_conns);
    }

    int64_t now = now_ns();
    for (auto& t : total_) {
        if (cfg_.total_rate_bytes_per_s) {
            t = TokenBucket(cfg_.total_rate_bytes_per_s,
                            std::max<uint64_t>(kBurstMinBytes, cfg_.total_rate_bytes_per_s * kBurstNs / 1'000'000'000), now);
        }
    }

    epoll_ = UniqueFd(epoll_create1(EPOLL_CLOEXEC));
    if (!epoll_.valid()) throw_errno("epoll_create1");

    listen_ = UniqueFd(socket(cfg_.listen.family(), SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
    if (!listen_.valid()) throw_errno("socket");
    int one = 1;
    setsockopt(listen_.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(listen_.get(), reinterpret_cast<const sockaddr*>(&cfg_.listen.addr), cfg_.listen.addr_len) != 0) {
        throw_errno("bind " + endpoint_text(cfg_.listen.addr));
    }
    if (listen(listen_.get(), 1024) != 0) throw_errno("listen");

    timer_ = UniqueFd(timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC));
    if (!timer_.valid()) throw_errno("timerfd_create");

    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGTERM);
    sigaddset(&mask, SIGINT);
    sigaddset(&mask, SIGUSR1);
    if (sigprocmask(SIG_BLOCK, &mask, nullptr) != 0) throw_errno("sigprocmask");
    signal(SIGPIPE, SIG_IGN);
    signal_ = UniqueFd(signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC));
    if (!signal_.valid()) throw_errno("signalfd");

    auto add = [&](int fd, uint64_t data) {
        epoll_event ev{};
        ev.events = EPOLLIN | EPOLLET;
        ev.data.u64 = data;
        if (epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, fd, &ev) != 0) throw_errno("epoll_ctl");
    };
    add(listen_.get(), kTagListen);
    add(timer_.get(), kTagTimer);
    add(signal_.get(), kTagSignal);

    slots_.reserve(cfg_.max_conns);
    generations_.reserve(cfg_.max_conns);
    mem_waiters_.reserve(2 * cfg_.max_conns);
    dirty_.reserve(2 * cfg_.max_conns + kMaxEvents);

    sockaddr_storage bound{};
    socklen_t len = sizeof bound;
    if (getsockname(listen_.get(), reinterpret_cast<sockaddr*>(&bound), &len) != 0) throw_errno("getsockname");
    std::printf("listening %s\n", endpoint_text(bound).c_str());
    std::fflush(stdout);
}

int Proxy::run() {
    std::array<epoll_event, kMaxEvents> events;
    while (!stop_) {
        int64_t now = now_ns();
        int timeout_ms = -1;
        if (has_immediate_work(now)) {
            timeout_ms = 0;
        } else {
            set_timerfd(next_deadline_ns());
        }
        int n = epoll_wait(epoll_.get(), events.data(), static_cast<int>(events.size()), timeout_ms);
        if (n < 0) {
            if (errno == EINTR) continue;
            std::perror("wanem: epoll_wait");
            return 1;
        }
        now = now_ns();
        for (int i = 0; i < n; ++i) {
            uint64_t data = events[i].data.u64;
            if (data == kTagListen) {
                on_listen_ready(now);
            } else if (data == kTagTimer) {
                uint64_t expirations;
                while (read(timer_.get(), &expirations, sizeof expirations) > 0) {}
                timer_armed_ns_ = kNeverNs;  // fired (or was re-armed later; set again below)
            } else if (data == kTagSignal) {
                on_signal();
            } else {
                on_socket_event(data, events[i].events, now);
            }
        }
        on_timers(now);
        if (accept_paused_ && active_ < cfg_.max_conns && (accept_retry_ns_ == kNeverNs || accept_retry_ns_ <= now)) {
            on_listen_ready(now);
        }
        run_dirty(now);
        service_ready(kClientToUpstream);
        service_ready(kUpstreamToClient);
        run_dirty(now_ns());
    }
    write_stats();
    return 0;
}

// ---------------------------------------------------------------------------------------------
// Connection life cycle

Conn* Proxy::lookup(uint32_t slot, uint32_t generation) noexcept {
    if (slot >= slots_.size()) return nullptr;
    Conn* c = slots_[slot].get();
    return (c && c->generation == generation) ? c : nullptr;
}

void Proxy::on_listen_ready(int64_t now) noexcept {
    accept_paused_ = false;
    while (true) {
        if (active_ >= cfg_.max_conns) {
            accept_paused_ = true;  // the rest wait in the backlog; retried when one closes
            accept_retry_ns_ = kNeverNs;
            return;
        }
        int fd = accept4(listen_.get(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED) continue;
            if (errno == EAGAIN) return;
            if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
                accept_paused_ = true;
                accept_retry_ns_ = now + kAcceptRetryNs;
                std::fprintf(stderr, "wanem: accept: %s; retrying\n", std::strerror(errno));
                return;
            }
            std::fprintf(stderr, "wanem: accept: %s\n", std::strerror(errno));
            return;
        }
        UniqueFd client(fd);
        uint32_t slot;
        if (!free_slots_.empty()) {
            slot = free_slots_.back();
            free_slots_.pop_back();
        } else {
            slot = static_cast<uint32_t>(slots_.size());
            slots_.emplace_back();  // capacity reserved for max_conns
            generations_.push_back(0);
        }
        uint32_t gen = ++generations_[slot];
        try {
            slots_[slot] = std::make_unique<Conn>(slot, gen, pool_, cfg_, max_marks_, now);
        } catch (const std::bad_alloc&) {
            free_slots_.push_back(slot);
            std::fprintf(stderr, "wanem: out of memory for a new connection; dropped it\n");
            continue;
        }
        Conn& c = *slots_[slot];
        ++active_;
        ++stats_.accepted;
        stats_.peak_active = std::max<uint64_t>(stats_.peak_active, active_);
        c.sides[kClient].fd = std::move(client);
        int one = 1;
        setsockopt(c.sides[kClient].fd.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        if (!add_to_epoll(c, kClient)) {
            close_conn(c);
            continue;
        }
        // The client's SYN reaches the upstream one delay later.
        c.connect_at_ns = now + cfg_.delay_ns;
        if (cfg_.delay_ns == 0) {
            connect_upstream(c, now);
        } else {
            arm(c, 2, c.connect_at_ns);
        }
    }
}

bool Proxy::add_to_epoll(Conn& c, int side) noexcept {
    epoll_event ev{};
    ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET;
    ev.data.u64 = tag(c, side);
    if (epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, c.sides[side].fd.get(), &ev) != 0) {
        std::fprintf(stderr, "wanem: epoll_ctl: %s\n", std::strerror(errno));
        return false;
    }
    return true;
}

void Proxy::connect_upstream(Conn& c, int64_t now) noexcept {
    c.connect_at_ns = kNeverNs;
    if (c.abort_at_ns != kNeverNs) return;  // the client reset first: no SYN is sent
    Side& up = c.sides[kUpstream];
    up.fd = UniqueFd(socket(cfg_.upstream.family(), SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
    if (!up.fd.valid()) {
        side_failed(c, kUpstream, now);
        return;
    }
    int one = 1;
    setsockopt(up.fd.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    int r = connect(up.fd.get(), reinterpret_cast<const sockaddr*>(&cfg_.upstream.addr), cfg_.upstream.addr_len);
    if (r != 0 && errno != EINPROGRESS) {
        side_failed(c, kUpstream, now);
        return;
    }
    c.state = r == 0 ? Conn::State::open : Conn::State::connecting;
    if (!add_to_epoll(c, kUpstream)) side_failed(c, kUpstream, now);
}

// A side was reset (or refused, or failed): it is dead. Whatever is queued towards it is
// dropped; the other side is reset one delay later, which is when the RST would arrive there.
// Bytes already due towards the healthy side keep flowing until then.
void Proxy::side_failed(Conn& c, int side, int64_t now) noexcept {
    Side& s = c.sides[side];
    if (s.dead) return;
    s.dead = true;
    s.readable = s.writable = false;
    if (side == kUpstream && c.state != Conn::State::open) {
        ++stats_.upstream_refused;
    } else if (!c.reset_counted) {
        ++stats_.resets;
        c.reset_counted = true;
    }
    Flow& towards = c.flows[1 - side];
    if (towards.queue.clear() > 0) blocks_freed();
    towards.fin_sent = true;
    if (c.abort_at_ns == kNeverNs) {
        c.abort_at_ns = now + cfg_.delay_ns;
        arm(c, 2, c.abort_at_ns);
    }
}

void Proxy::conn_deadlines(Conn& c, int64_t now) noexcept {
    if (c.abort_at_ns <= now) {
        abort_conn(c);
        return;
    }
    if (c.connect_at_ns <= now) connect_upstream(c, now);
}

// Resets every side still alive (SO_LINGER 0 makes close() send RST) and forgets the connection.
void Proxy::abort_conn(Conn& c) noexcept {
    for (Side& s : c.sides) {
        if (s.fd.valid() && !s.dead) {
            linger lg{1, 0};
            setsockopt(s.fd.get(), SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
        }
    }
    close_conn(c);
}

void Proxy::close_conn(Conn& c) noexcept {
    uint32_t slot = c.slot;
    size_t before = pool_.in_use_blocks();
    slots_[slot].reset();  // closes the fds (which leaves epoll) and returns the queue blocks
    if (pool_.in_use_blocks() < before) blocks_freed();
    free_slots_.push_back(slot);
    --active_;
    ++stats_.closed;  // a paused accept loop is retried by run() now that a slot is free
}

void Proxy::on_socket_event(uint64_t data, uint32_t events, int64_t now) noexcept {
    uint32_t generation = static_cast<uint32_t>(data >> 32);
    uint32_t slot = static_cast<uint32_t>(data & 0xffffffffu) >> 1;
    int side = static_cast<int>(data & 1);
    Conn* cp = lookup(slot, generation);
    if (!cp) return;
    Conn& c = *cp;
    Side& s = c.sides[side];
    if (s.dead) return;

    if (side == kUpstream && c.state == Conn::State::connecting) {
        if (!(events & (EPOLLOUT | EPOLLERR | EPOLLHUP))) return;
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(s.fd.get(), SOL_SOCKET, SO_ERROR, &err, &len);
        if (err != 0 || (events & (EPOLLERR | EPOLLHUP))) {
            side_failed(c, kUpstream, now);
            return;
        }
        c.state = Conn::State::open;
    }
    if (events & EPOLLERR) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(s.fd.get(), SOL_SOCKET, SO_ERROR, &err, &len);
        if (err != 0) {
            side_failed(c, side, now);
            mark_dirty(c, 0);
            mark_dirty(c, 1);
            return;
        }
    }
    if (events & (EPOLLRDHUP | EPOLLHUP)) s.peer_fin = true;
    if (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP)) s.readable = true;
    if (events & (EPOLLOUT | EPOLLHUP)) s.writable = true;
    mark_dirty(c, side);      // the flow reading this side
    mark_dirty(c, 1 - side);  // the flow writing this side
}

void Proxy::on_signal() noexcept {
    signalfd_siginfo si;
    while (read(signal_.get(), &si, sizeof si) == static_cast<ssize_t>(sizeof si)) {
        if (si.ssi_signo == SIGUSR1) {
            write_stats();
        } else {
            stop_ = true;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Timers

void Proxy::arm(Conn& c, int d, int64_t when_ns) noexcept {
    if (d < 2) {
        Flow& f = c.flows[d];
        if (f.timer_ns <= when_ns) return;  // an earlier wake-up is already queued
        f.timer_ns = when_ns;
    }
    timers_.push(TimerEntry{when_ns, FlowRef{c.slot, c.generation, d}});
}

void Proxy::on_timers(int64_t now) noexcept {
    while (!timers_.empty() && timers_.top().when_ns <= now) {
        TimerEntry e = timers_.top();
        timers_.pop();
        Conn* c = lookup(e.ref);
        if (!c) continue;
        if (e.ref.dir == 2) {
            conn_deadlines(*c, now);
            continue;
        }
        Flow& f = c->flows[e.ref.dir];
        if (f.timer_ns <= now) f.timer_ns = kNeverNs;
        mark_dirty(*c, e.ref.dir);
    }
    for (int d = 0; d < 2; ++d) {
        if (total_wait_ns_[d] <= now) total_wait_ns_[d] = kNeverNs;  // service_ready retries
    }
}

int64_t Proxy::next_deadline_ns() noexcept {
    int64_t t = kNeverNs;
    if (!timers_.empty()) t = timers_.top().when_ns;
    t = std::min({t, total_wait_ns_[0], total_wait_ns_[1]});
    if (accept_paused_ && accept_retry_ns_ != kNeverNs) t = std::min(t, accept_retry_ns_);
    return t;
}

bool Proxy::has_immediate_work(int64_t now) noexcept {
    if (!dirty_.empty()) return true;
    if (accept_paused_ && active_ < cfg_.max_conns && accept_retry_ns_ == kNeverNs) return true;
    for (int d = 0; d < 2; ++d) {
        if (!ready_[d].empty() && total_wait_ns_[d] == kNeverNs) return true;
    }
    return next_deadline_ns() <= now;
}

void Proxy::set_timerfd(int64_t when_ns) noexcept {
    if (when_ns == timer_armed_ns_) return;
    itimerspec its{};
    if (when_ns != kNeverNs) {
        its.it_value.tv_sec = when_ns / 1'000'000'000;
        its.it_value.tv_nsec = when_ns % 1'000'000'000;
    }
    // Absolute time: a deadline already past fires at once. An all-zero value disarms.
    timerfd_settime(timer_.get(), TFD_TIMER_ABSTIME, &its, nullptr);
    timer_armed_ns_ = when_ns;
}

// ---------------------------------------------------------------------------------------------
// Data path

void Proxy::mark_dirty(Conn& c, int d) noexcept {
    Flow& f = c.flows[d];
    if (f.in_dirty) return;
    f.in_dirty = true;
    dirty_.push_back(FlowRef{c.slot, c.generation, d});
}

void Proxy::run_dirty(int64_t now) noexcept {
    // pump() may mark flows dirty (even the one it runs, via blocks_freed()); iterating by index
    // serves those in this pass too.
    for (size_t i = 0; i < dirty_.size(); ++i) {
        FlowRef r = dirty_[i];
        Conn* c = lookup(r);
        if (!c) continue;
        c->flows[r.dir].in_dirty = false;
        pump(*c, r.dir, now);
    }
    dirty_.clear();
}

bool Proxy::read_wanted(const Conn& c, int d) const noexcept {
    const Flow& f = c.flows[d];
    const Side& src = c.sides[d];
    return src.readable && !src.dead && !f.eof_read && !f.mem_wait && c.abort_at_ns == kNeverNs &&
           f.queue.space_bytes() > 0;
}

// Sends what is due, propagates a due FIN, arms the flow's next release and queues the flow
// for reading if it wants to read.
void Proxy::pump(Conn& c, int d, int64_t now) noexcept {
    Flow& f = c.flows[d];
    Side& dst = c.sides[1 - d];
    f.queue.release_due(now);

    bool sink_ok = dst.fd.valid() && !dst.dead && (d == kUpstreamToClient || c.state == Conn::State::open);
    while (sink_ok && dst.writable && f.queue.has_sendable()) {
        std::array<iovec, kSendIovecs> iov;
        size_t n = f.queue.prepare_send(iov);
        size_t want = 0;
        for (size_t i = 0; i < n; ++i) want += iov[i].iov_len;
        msghdr msg{};
        msg.msg_iov = iov.data();
        msg.msg_iovlen = n;
        ssize_t r = sendmsg(dst.fd.get(), &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (r < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN) {
                dst.writable = false;
                break;
            }
            side_failed(c, 1 - d, now);
            return;
        }
        stats_.dirs[d].bytes_out += static_cast<uint64_t>(r);
        if (f.queue.commit_send(static_cast<uint64_t>(r)) > 0) blocks_freed();
        if (static_cast<size_t>(r) < want) {
            dst.writable = false;  // the send buffer is full; EPOLLOUT comes when it drains
            break;
        }
    }
    if (sink_ok && !f.fin_sent && f.queue.eof_due()) {
        shutdown(dst.fd.get(), SHUT_WR);
        f.fin_sent = true;
    }
    if (c.flows[0].fin_sent && c.flows[1].fin_sent && c.abort_at_ns == kNeverNs) {
        close_conn(c);  // both FINs delivered: done
        return;
    }
    if (int64_t next = f.queue.next_release_ns(); next != kNeverNs) arm(c, d, next);
    if (!f.in_ready && read_wanted(c, d)) {
        f.in_ready = true;
        ready_[d].push_back(FlowRef{c.slot, c.generation, d});
    }
}

// Serves the flows waiting to read in direction d, round-robin, one grant each per turn, while
// the direction's total bucket has tokens. A flow whose own bucket is empty sleeps on a timer.
void Proxy::service_ready(int d) noexcept {
    auto& ready = ready_[d];
    if (total_wait_ns_[d] != kNeverNs) return;
    for (size_t turn = 0; turn < kReadsPerTurn && !ready.empty(); ++turn) {
        FlowRef r = ready.front();
        ready.pop_front();
        Conn* cp = lookup(r);
        if (!cp) continue;
        Conn& c = *cp;
        Flow& f = c.flows[d];
        Side& src = c.sides[d];
        f.in_ready = false;
        if (!read_wanted(c, d)) continue;

        int64_t now = now_ns();
        uint64_t space = f.queue.space_bytes();
        uint64_t total_need = std::min(space, total_min_grant_);
        uint64_t total_avail = total_[d].available(now);
        if (total_avail < total_need) {
            ready.push_front(r);
            f.in_ready = true;
            total_wait_ns_[d] = total_[d].ready_at_ns(total_need, now);
            return;
        }
        uint64_t conn_need = std::min(space, conn_min_grant_);
        uint64_t conn_avail = f.bucket.available(now);
        if (conn_avail < conn_need) {
            arm(c, d, f.bucket.ready_at_ns(conn_need, now));
            continue;
        }
        // Share what the total bucket holds among the flows waiting for it, so that whoever is
        // first after a (late) wake-up does not take it all.
        uint64_t fair = std::max(kMinGrantFloorBytes, total_avail / (ready.size() + 1));
        uint64_t want = std::min({space, kGrantBytes, fair, total_avail, conn_avail});
        std::array<iovec, kGrantBytes / BlockPool::kBlockBytes + 1> iov;
        size_t n = f.queue.prepare_read(want, iov);
        if (n == 0) {
            if (f.queue.pool_exhausted()) {
                f.mem_wait = true;  // blocks_freed() wakes it
                mem_waiters_.push_back(r);
            }
            continue;
        }
        uint64_t prepared = 0;
        for (size_t i = 0; i < n; ++i) prepared += iov[i].iov_len;
        ssize_t got = readv(src.fd.get(), iov.data(), static_cast<int>(n));
        int read_errno = errno;
        if (f.queue.commit_read(got > 0 ? static_cast<uint64_t>(got) : 0, now + cfg_.delay_ns) > 0) {
            blocks_freed();
        }
        if (got > 0) {
            uint64_t g = static_cast<uint64_t>(got);
            f.bucket.take(g);
            total_[d].take(g);
            stats_.dirs[d].bytes_in += g;
            // A short read drained the socket and the next edge says when there is more; but
            // a FIN already announced raises no new edge, so keep reading to get the 0.
            if (g < prepared) src.readable = src.peer_fin;
            if (cfg_.delay_ns == 0) {
                mark_dirty(c, d);
            } else {
                arm(c, d, now + cfg_.delay_ns);
            }
        } else if (got == 0) {
            f.eof_read = true;
            src.readable = false;
            f.queue.push_eof(now + cfg_.delay_ns);
            mark_dirty(c, d);
        } else if (read_errno == EAGAIN) {
            src.readable = false;
        } else if (read_errno != EINTR) {
            side_failed(c, d, now);
            mark_dirty(c, 1 - d);
            continue;
        }
        if (read_wanted(c, d)) {
            f.in_ready = true;
            ready.push_back(r);
        }
    }
}

// Blocks went back to the pool: flows that stopped for lack of memory may read again.
void Proxy::blocks_freed() noexcept {
    for (const FlowRef& r : mem_waiters_) {
        if (Conn* c = lookup(r)) {
            c->flows[r.dir].mem_wait = false;
            mark_dirty(*c, r.dir);
        }
    }
    mem_waiters_.clear();
}

// ---------------------------------------------------------------------------------------------

void Proxy::write_stats() noexcept {
    if (cfg_.stats_file.empty()) return;
    char buf[1024];
    const auto& c2u = stats_.dirs[kClientToUpstream];
    const auto& u2c = stats_.dirs[kUpstreamToClient];
    int len = std::snprintf(buf, sizeof buf,
        "{\n"
        "  \"uptime_ms\": %" PRId64 ",\n"
        "  \"connections_accepted\": %" PRIu64 ",\n"
        "  \"connections_active\": %zu,\n"
        "  \"connections_peak\": %" PRIu64 ",\n"
        "  \"connections_closed\": %" PRIu64 ",\n"
        "  \"connections_reset\": %" PRIu64 ",\n"
        "  \"upstream_refused\": %" PRIu64 ",\n"
        "  \"client_to_upstream\": {\"bytes_in\": %" PRIu64 ", \"bytes_out\": %" PRIu64 "},\n"
        "  \"upstream_to_client\": {\"bytes_in\": %" PRIu64 ", \"bytes_out\": %" PRIu64 "},\n"
        "  \"memory_limit_bytes\": %" PRIu64 ",\n"
        "  \"buffer_blocks_in_use\": %" PRIu64 "\n"
        "}\n",
        (now_ns() - start_ns_) / 1'000'000, stats_.accepted, active_, stats_.peak_active, stats_.closed,
        stats_.resets, stats_.upstream_refused, c2u.bytes_in, c2u.bytes_out, u2c.bytes_in, u2c.bytes_out,
        pool_.limit_blocks() * BlockPool::kBlockBytes, pool_.in_use_blocks());
    if (len < 0 || static_cast<size_t>(len) >= sizeof buf) return;
    // Write a temporary file and rename it, so a reader never sees half a document.
    std::string tmp = cfg_.stats_file + ".tmp";
    UniqueFd fd(open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
    if (!fd.valid() || write(fd.get(), buf, static_cast<size_t>(len)) != len ||
        rename(tmp.c_str(), cfg_.stats_file.c_str()) != 0) {
        std::fprintf(stderr, "wanem: writing %s: %s\n", cfg_.stats_file.c_str(), std::strerror(errno));
    }
}

}  // namespace
}  // namespace wanem

int main(int argc, char** argv) {
    try {
        wanem::Proxy proxy(wanem::parse_args(argc, argv));
        return proxy.run();
    } catch (const std::invalid_argument& e) {
        std::fprintf(stderr, "wanem: %s\n%s", e.what(), wanem::kUsage);
        return 2;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "wanem: %s\n", e.what());
        return 1;
    }
}
