#include "netio/curl_driver.h"

#include <poll.h>

#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace netio {

namespace {

class CurlCategory final : public std::error_category {
public:
    const char* name() const noexcept override { return "curl"; }
    std::string message(int c) const override { return curl_easy_strerror(static_cast<CURLcode>(c)); }
    // Lets callers test `ec == std::errc::timed_out` without knowing curl's codes.
    std::error_condition default_error_condition(int c) const noexcept override {
        switch (static_cast<CURLcode>(c)) {
        case CURLE_OPERATION_TIMEDOUT: return std::errc::timed_out;
        case CURLE_OUT_OF_MEMORY: return std::errc::not_enough_memory;
        default: return {c, *this};
        }
    }
};

void global_init_once() {
    static std::once_flag once;
    std::call_once(once, [] {
        const CURLcode rc = curl_global_init(CURL_GLOBAL_DEFAULT);
        if (rc != CURLE_OK) throw std::system_error(make_error_code(rc), "curl_global_init");
    });
}

// After this many consecutive completions carrying only ERR/HUP the socket is no longer re-armed:
// io_uring reports POLLHUP/POLLRDHUP even when not asked for, and re-arming on a hangup curl does
// not act on would spin the loop (NETIO-RECIPE.md). curl's own timeouts end such a transfer.
constexpr unsigned kMaxHupOnlyCompletions = 4;
// After this many 0 ms timer requests in a row, ask for 1 ms instead (spin guard).
constexpr unsigned kMaxZeroTimers = 64;

}  // namespace

const std::error_category& curl_category() noexcept {
    static const CurlCategory category;
    return category;
}

struct CurlMulti::Impl {
    // One per socket curl asked us to watch, indexed by the fd.
    struct SockSlot {
        bool active = false;
        int want = 0;             // CURL_POLL_IN / OUT / INOUT
        OpId poll{};              // the armed one-shot poll, {} when not armed
        uint32_t generation = 0;  // bumped on every (re)registration and removal
        unsigned hup_only = 0;    // consecutive ERR/HUP-only completions
    };

    enum class State { pending_add, running, finished };
    struct Entry {
        DoneCallback on_done;
        uint64_t serial = 0;
        State state = State::pending_add;
        CURLcode result = CURLE_OK;
    };
    struct Ref {
        CURL* easy;
        uint64_t serial;
    };

    UringLoop& loop;
    CURLM* multi = nullptr;
    std::vector<SockSlot> socks;
    std::unordered_map<CURL*, Entry> entries;
    uint64_t next_serial = 1;
    OpId timer{};
    OpId rearm_timer{};
    unsigned zero_timers = 0;
    int in_curl = 0;  // > 0 while a curl multi/easy function runs (its callbacks may call us)

    // Work for the deferred pump (never done from inside curl).
    std::vector<Ref> pending_adds;
    std::vector<CURL*> pending_removes;
    std::vector<Ref> resumes;
    std::vector<Ref> dones;
    std::vector<Ref> scratch;
    bool pump_scheduled = false;
    std::shared_ptr<int> alive = std::make_shared<int>(0);

    explicit Impl(UringLoop& l) : loop(l) { multi = make_multi(); }
    ~Impl();

    CURLM* make_multi();
    static int on_socket(CURL* easy, curl_socket_t s, int what, void* userp, void* socketp) noexcept;
    static int on_timer(CURLM* m, long timeout_ms, void* userp) noexcept;
    void arm(int fd) noexcept;
    void forget(int fd) noexcept;
    void on_poll(int fd, uint32_t generation, int res) noexcept;
    void on_timeout() noexcept;
    void rearm_all() noexcept;
    void action(curl_socket_t fd, int ev_bitmask) noexcept;
    void drain() noexcept;
    void start(CURL* easy, Entry& e) noexcept;
    void finish(CURL* easy, Entry& e, CURLcode result);
    void fatal(CURLMcode rc) noexcept;
    void schedule_pump();
    void pump();
    void cancel_polls() noexcept;
};

CURLM* CurlMulti::Impl::make_multi() {
    CURLM* m = curl_multi_init();
    if (!m) throw std::system_error(make_error_code(CURLE_OUT_OF_MEMORY), "curl_multi_init");
    curl_multi_setopt(m, CURLMOPT_SOCKETFUNCTION, &Impl::on_socket);
    curl_multi_setopt(m, CURLMOPT_SOCKETDATA, this);
    curl_multi_setopt(m, CURLMOPT_TIMERFUNCTION, &Impl::on_timer);
    curl_multi_setopt(m, CURLMOPT_TIMERDATA, this);
    return m;
}

CurlMulti::Impl::~Impl() {
    // Shutdown order (NETIO-RECIPE.md): easy handles, then the multi handle (its cleanup closes the
    // cached connections and reports CURL_POLL_REMOVE for them while our slot table still lives),
    // then the remaining polls and timers. The loop outlives us.
    alive.reset();
    for (auto& [easy, e] : entries) {
        if (e.state == State::running) curl_multi_remove_handle(multi, easy);
    }
    for (CURL* easy : pending_removes) curl_multi_remove_handle(multi, easy);
    entries.clear();
    curl_multi_cleanup(multi);
    multi = nullptr;
    cancel_polls();
    if (timer) loop.cancel_timer(timer);
    if (rearm_timer) loop.cancel_timer(rearm_timer);
}

void CurlMulti::Impl::cancel_polls() noexcept {
    for (auto& s : socks) {
        if (s.poll) loop.cancel(s.poll);
        s.poll = {};
        s.active = false;
        ++s.generation;
    }
}

int CurlMulti::Impl::on_socket(CURL*, curl_socket_t s, int what, void* userp, void*) noexcept {
    // Never call multi functions here (CURLM_RECURSIVE_API_CALL) and always return 0 (-1 would
    // abort every transfer).
    auto& d = *static_cast<Impl*>(userp);
    if (s < 0) return 0;
    const auto fd = static_cast<size_t>(s);
    if (what == CURL_POLL_REMOVE) {
        d.forget(s);
        return 0;
    }
    if (fd >= d.socks.size()) d.socks.resize(fd + 1);
    auto& slot = d.socks[fd];
    if (!slot.active || slot.want != what) {
        if (slot.poll) {
            // Mask changed: drop the old poll (POLL_REMOVE goes out at once) and arm a new one.
            d.loop.cancel(slot.poll);
            slot.poll = {};
        }
        slot.active = true;
        slot.want = what;
        slot.hup_only = 0;
        ++slot.generation;
    }
    if (!slot.poll) d.arm(s);
    return 0;
}

int CurlMulti::Impl::on_timer(CURLM*, long timeout_ms, void* userp) noexcept {
    auto& d = *static_cast<Impl*>(userp);
    if (d.timer) {
        d.loop.cancel_timer(d.timer);
        d.timer = {};
    }
    if (timeout_ms < 0) return 0;  // delete the timer
    if (timeout_ms == 0) {
        // "Run soon", but not from in here: socket_action inside this callback returns
        // CURLM_RECURSIVE_API_CALL. A due loop timer runs in this or the next turn.
        if (++d.zero_timers > kMaxZeroTimers) timeout_ms = 1;
    } else {
        d.zero_timers = 0;
    }
    d.timer = d.loop.add_timer(std::chrono::milliseconds(timeout_ms), [&d] {
        d.timer = {};
        d.on_timeout();
    });
    return 0;
}

void CurlMulti::Impl::arm(int fd) noexcept {
    auto& s = socks[static_cast<size_t>(fd)];
    unsigned mask = 0;
    if (s.want & CURL_POLL_IN) mask |= POLLIN;
    if (s.want & CURL_POLL_OUT) mask |= POLLOUT;
    const uint32_t generation = s.generation;
    try {
        // One-shot POLL_ADD, re-armed after each socket_action: multishot polls re-fire only on
        // edges and curl sends one buffer per call, so a multishot POLLOUT stalls uploads.
        s.poll = loop.poll_add(fd, mask, [this, fd, generation](int res) { on_poll(fd, generation, res); });
    } catch (const std::system_error&) {
        // The SQ stayed full even after a submit: try again shortly.
        s.poll = {};
        if (!rearm_timer) {
            rearm_timer = loop.add_timer(std::chrono::milliseconds(1), [this] {
                rearm_timer = {};
                rearm_all();
            });
        }
    }
}

void CurlMulti::Impl::rearm_all() noexcept {
    for (size_t fd = 0; fd < socks.size(); ++fd) {
        auto& s = socks[fd];
        if (s.active && !s.poll && s.hup_only <= kMaxHupOnlyCompletions) arm(static_cast<int>(fd));
    }
}

void CurlMulti::Impl::forget(int fd) noexcept {
    const auto i = static_cast<size_t>(fd);
    if (i >= socks.size()) return;
    auto& s = socks[i];
    // curl closes the socket right after this callback; a pending poll would keep the file (and
    // the connection) alive, so POLL_REMOVE is submitted at once by loop.cancel.
    if (s.poll) loop.cancel(s.poll);
    s.poll = {};
    s.active = false;
    s.want = 0;
    s.hup_only = 0;
    ++s.generation;
}

void CurlMulti::Impl::on_poll(int fd, uint32_t generation, int res) noexcept {
    const auto i = static_cast<size_t>(fd);
    if (i >= socks.size()) return;
    {
        auto& s = socks[i];
        if (!s.active || s.generation != generation) return;  // stale
        s.poll = {};
        int ev = 0;
        bool hup_only = false;
        if (res < 0) {
            ev = CURL_CSELECT_ERR;
        } else {
            // Mapped as curl's Curl_socket_check does. A readable hangup is IN, not a bare ERR
            // (that would fail the transfer with CURLE_SEND_ERROR).
            const auto r = static_cast<unsigned>(res);
            if ((s.want & CURL_POLL_IN) && (r & (POLLIN | POLLERR | POLLHUP | POLLRDHUP))) ev |= CURL_CSELECT_IN;
            if ((s.want & CURL_POLL_OUT) && (r & POLLOUT)) ev |= CURL_CSELECT_OUT;
            if ((s.want & CURL_POLL_OUT) && (r & (POLLERR | POLLHUP))) ev |= CURL_CSELECT_ERR;
            hup_only = (r & (POLLIN | POLLOUT | POLLPRI)) == 0;
        }
        s.hup_only = hup_only ? s.hup_only + 1 : 0;
        zero_timers = 0;
        action(fd, ev);
    }
    // curl reports only changes: if the socket is still current, still wanted and was not re-armed
    // during the call, watch it again.
    if (i >= socks.size()) return;
    auto& s = socks[i];
    if (s.active && s.generation == generation && !s.poll && s.hup_only <= kMaxHupOnlyCompletions) arm(fd);
}

void CurlMulti::Impl::on_timeout() noexcept { action(CURL_SOCKET_TIMEOUT, 0); }

void CurlMulti::Impl::action(curl_socket_t fd, int ev_bitmask) noexcept {
    int running = 0;
    ++in_curl;
    const CURLMcode rc = curl_multi_socket_action(multi, fd, ev_bitmask, &running);
    --in_curl;
    if (rc != CURLM_OK) {
        fatal(rc);
        return;
    }
    drain();
}

void CurlMulti::Impl::drain() noexcept {
    int left = 0;
    while (CURLMsg* msg = curl_multi_info_read(multi, &left)) {
        if (msg->msg != CURLMSG_DONE) continue;
        // Copy before removing: remove_handle invalidates msg.
        CURL* easy = msg->easy_handle;
        const CURLcode result = msg->data.result;
        ++in_curl;
        curl_multi_remove_handle(multi, easy);
        --in_curl;
        auto it = entries.find(easy);
        if (it == entries.end() || it->second.state != State::running) continue;
        finish(easy, it->second, result);
    }
}

void CurlMulti::Impl::finish(CURL* easy, Entry& e, CURLcode result) {
    e.state = State::finished;
    e.result = result;
    dones.push_back(Ref{easy, e.serial});
    schedule_pump();
}

void CurlMulti::Impl::start(CURL* easy, Entry& e) noexcept {
    ++in_curl;
    const CURLMcode rc = curl_multi_add_handle(multi, easy);  // asks for a 0 ms timer itself
    --in_curl;
    if (rc == CURLM_OK) {
        e.state = State::running;
        return;
    }
    finish(easy, e, rc == CURLM_OUT_OF_MEMORY ? CURLE_OUT_OF_MEMORY : CURLE_FAILED_INIT);
}

void CurlMulti::Impl::fatal(CURLMcode rc) noexcept {
    // The multi handle is unusable after a socket_action error (NETIO-RECIPE.md): fail all its
    // transfers and start over with a new one.
    const CURLcode result = rc == CURLM_OUT_OF_MEMORY ? CURLE_OUT_OF_MEMORY : CURLE_FAILED_INIT;
    for (auto& [easy, e] : entries) {
        if (e.state != State::running) continue;
        curl_multi_remove_handle(multi, easy);
        finish(easy, e, result);
    }
    for (CURL* easy : pending_removes) curl_multi_remove_handle(multi, easy);
    pending_removes.clear();
    curl_multi_cleanup(multi);
    cancel_polls();
    if (timer) loop.cancel_timer(timer);
    timer = {};
    multi = make_multi();
}

void CurlMulti::Impl::schedule_pump() {
    if (pump_scheduled) return;
    pump_scheduled = true;
    loop.defer([this, token = std::weak_ptr<int>(alive)] {
        if (token.expired()) return;
        pump();
    });
}

void CurlMulti::Impl::pump() {
    pump_scheduled = false;

    if (!pending_removes.empty()) {
        std::vector<CURL*> removes;
        removes.swap(pending_removes);
        for (CURL* easy : removes) {
            ++in_curl;
            curl_multi_remove_handle(multi, easy);
            --in_curl;
        }
    }

    if (!pending_adds.empty()) {
        scratch.clear();
        scratch.swap(pending_adds);
        for (const Ref& r : scratch) {
            auto it = entries.find(r.easy);
            if (it != entries.end() && it->second.serial == r.serial && it->second.state == State::pending_add) {
                start(r.easy, it->second);
            }
        }
        scratch.clear();
    }

    if (!resumes.empty()) {
        scratch.clear();
        scratch.swap(resumes);
        for (const Ref& r : scratch) {
            auto it = entries.find(r.easy);
            if (it == entries.end() || it->second.serial != r.serial || it->second.state != State::running) continue;
            // May call the write callback at once with cached data (which may pause again), and
            // the socket/timer callbacks; never from a socket callback (NETIO-RECIPE.md).
            ++in_curl;
            const CURLcode rc = curl_easy_pause(r.easy, CURLPAUSE_CONT);
            --in_curl;
            if (rc != CURLE_OK) {
                it = entries.find(r.easy);
                if (it != entries.end() && it->second.state == State::running) {
                    ++in_curl;
                    curl_multi_remove_handle(multi, r.easy);
                    --in_curl;
                    finish(r.easy, it->second, rc);
                }
            }
        }
        scratch.clear();
        drain();
    }

    if (!dones.empty()) {
        std::vector<Ref> work;
        work.swap(dones);
        for (size_t i = 0; i < work.size(); ++i) {
            auto it = entries.find(work[i].easy);
            if (it == entries.end() || it->second.serial != work[i].serial || it->second.state != State::finished) {
                continue;
            }
            DoneCallback cb = std::move(it->second.on_done);
            const CURLcode result = it->second.result;
            entries.erase(it);
            const std::weak_ptr<int> token = alive;
            try {
                if (cb) cb(result);
            } catch (...) {
                if (token.expired()) throw;
                // Keep the rest for the next pump, then let the exception reach run_once's caller.
                dones.insert(dones.begin(), work.begin() + static_cast<std::ptrdiff_t>(i + 1), work.end());
                if (!dones.empty()) schedule_pump();
                throw;
            }
            if (token.expired()) return;  // the callback destroyed this CurlMulti
        }
    }
}

CurlMulti::CurlMulti(UringLoop& loop) {
    global_init_once();
    impl_ = std::make_unique<Impl>(loop);
}

CurlMulti::~CurlMulti() = default;

void CurlMulti::add(CURL* easy, DoneCallback on_done) {
    auto& d = *impl_;
    auto [it, inserted] = d.entries.try_emplace(easy);
    if (!inserted) throw std::logic_error("CurlMulti::add: handle already added");
    Impl::Entry& e = it->second;
    e.on_done = std::move(on_done);
    e.serial = d.next_serial++;
    e.state = Impl::State::pending_add;
    if (d.in_curl > 0) {
        // Called from inside a curl callback: curl_multi_add_handle would fail with
        // CURLM_RECURSIVE_API_CALL, so add it from the loop's queue.
        d.pending_adds.push_back(Impl::Ref{easy, e.serial});
        d.schedule_pump();
        return;
    }
    d.start(easy, e);
}

void CurlMulti::remove(CURL* easy) noexcept {
    auto& d = *impl_;
    auto it = d.entries.find(easy);
    if (it == d.entries.end()) return;
    const bool in_multi = it->second.state == Impl::State::running;
    d.entries.erase(it);  // queued resumes/dones for it are now stale and skipped
    if (!in_multi) return;
    if (d.in_curl > 0) {
        // From inside a curl callback the removal itself waits for the loop's queue; on_done is
        // already off. The handle must then stay alive until the next turn.
        d.pending_removes.push_back(easy);
        d.schedule_pump();
        return;
    }
    ++d.in_curl;
    curl_multi_remove_handle(d.multi, easy);
    --d.in_curl;
}

void CurlMulti::resume(CURL* easy) {
    auto& d = *impl_;
    auto it = d.entries.find(easy);
    if (it == d.entries.end() || it->second.state == Impl::State::finished) return;
    d.resumes.push_back(Impl::Ref{easy, it->second.serial});
    d.schedule_pump();
}

size_t CurlMulti::running() const noexcept {
    size_t n = 0;
    for (const auto& [easy, e] : impl_->entries) {
        if (e.state != Impl::State::finished) ++n;
    }
    return n;
}

UringLoop& CurlMulti::loop() noexcept { return impl_->loop; }

}  // namespace netio
