#include "netio/uring_loop.h"

#include <liburing.h>
#include <sys/eventfd.h>

#include <algorithm>
#include <cassert>
#include <cerrno>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include "netio/unique_fd.h"

namespace netio {

namespace {

// user_data / OpId layout: kind (8 bits) | slot (24 bits) | generation (32 bits). Kind 0 is never
// used, so 0 is never a valid id; kind 0xff is left for LIBURING_UDATA_TIMEOUT (all ones), which
// liburing uses for its own timeout SQE on kernels without IORING_FEAT_EXT_ARG.
enum class Kind : uint8_t {
    op = 1,       // an operation in the slot table (poll, read, write, fsync)
    timer = 2,    // a loop timer (never reaches the kernel; only appears in OpIds)
    wake = 3,     // the eventfd read behind wake()
    ignore = 4,   // POLL_REMOVE / ASYNC_CANCEL requests: their own completions carry nothing
};

constexpr unsigned kSlotBits = 24;
constexpr uint32_t kMaxSlots = 1u << kSlotBits;

constexpr uint64_t encode(Kind kind, uint32_t slot, uint32_t generation) noexcept {
    return (uint64_t{static_cast<uint8_t>(kind)} << 56) | (uint64_t{slot & (kMaxSlots - 1)} << 32) |
           generation;
}
constexpr Kind kind_of(uint64_t v) noexcept { return static_cast<Kind>(v >> 56); }
constexpr uint32_t slot_of(uint64_t v) noexcept { return static_cast<uint32_t>(v >> 32) & (kMaxSlots - 1); }
constexpr uint32_t generation_of(uint64_t v) noexcept { return static_cast<uint32_t>(v); }

// Limits: a turn copies out at most this many CQEs at a time, and runs at most this many deferred
// callbacks beyond the ones queued when the queue started (a callback that defers itself forever
// must not starve I/O).
constexpr unsigned kCqeBatch = 256;
constexpr size_t kMaxExtraDeferredPerTurn = 1024;
// A synchronous cancel of a file read/write waits at most this long for the op's own completion.
constexpr auto kCancelWaitLimit = std::chrono::seconds(5);
// The kernel caps a single read/write at MAX_RW_COUNT (INT_MAX rounded down to a page).
constexpr size_t kMaxRwBytes = 0x7ffff000;

}  // namespace

struct UringLoop::Impl {
    struct OpSlot {
        IoCallback done;
        uint32_t generation = 1;
        bool in_use = false;
        bool is_poll = false;
        bool cancelled = false;
    };

    struct TimerSlot {
        std::function<void()> fn;
        Clock::time_point deadline{};
        uint64_t seq = 0;
        uint32_t generation = 1;
        uint32_t heap_pos = 0;
        bool in_use = false;
    };

    struct Cqe {
        uint64_t user_data;
        int res;
        unsigned flags;
    };

    io_uring ring{};
    UniqueFd wake_fd;
    uint64_t wake_buf = 0;
    bool wake_armed = false;

    std::vector<OpSlot> ops;
    std::vector<uint32_t> free_ops;
    size_t ops_in_flight = 0;

    std::vector<TimerSlot> timers;
    std::vector<uint32_t> free_timers;
    std::vector<uint32_t> heap;  // timer slot indices, min-heap on (deadline, seq)
    uint64_t timer_seq = 0;

    std::vector<std::function<void()>> deferred;
    size_t deferred_head = 0;

    // CQEs copied out of the ring and not yet dispatched (also filled by a synchronous cancel).
    std::vector<Cqe> batch;
    size_t batch_pos = 0;

    bool stopped = false;

    explicit Impl(unsigned entries);
    ~Impl();

    io_uring_sqe* get_sqe();
    uint32_t alloc_op(IoCallback done, bool is_poll);
    void free_op(uint32_t slot) noexcept;
    OpSlot* find_op(uint64_t id) noexcept;
    void arm_wake();
    void reap() noexcept;
    void dispatch();
    void run_timers();
    void run_deferred();
    void wait(Clock::duration timeout) noexcept;
    void cancel_and_wait(uint64_t user_data) noexcept;

    // Timer heap.
    bool timer_less(uint32_t a, uint32_t b) const noexcept {
        const auto& x = timers[a];
        const auto& y = timers[b];
        return x.deadline < y.deadline || (x.deadline == y.deadline && x.seq < y.seq);
    }
    void heap_set(size_t pos, uint32_t slot) noexcept {
        heap[pos] = slot;
        timers[slot].heap_pos = static_cast<uint32_t>(pos);
    }
    void sift_up(size_t pos) noexcept;
    void sift_down(size_t pos) noexcept;
    void heap_remove(size_t pos) noexcept;
};

UringLoop::Impl::Impl(unsigned entries) {
    if (entries == 0) entries = 1;
    // A generous CQ: with IORING_FEAT_NODROP an overflow does not lose completions, but it costs.
    const unsigned cq_entries = std::max(entries * 8, 4096u);
    // Optional flags first; each step drops some on -EINVAL (liburing examples/poll-bench.c).
    const unsigned flag_sets[] = {
        IORING_SETUP_CQSIZE | IORING_SETUP_SUBMIT_ALL | IORING_SETUP_COOP_TASKRUN | IORING_SETUP_TASKRUN_FLAG,
        IORING_SETUP_CQSIZE,
        0,
    };
    int ret = -EINVAL;
    for (unsigned flags : flag_sets) {
        io_uring_params p{};
        p.flags = flags;
        if (flags & IORING_SETUP_CQSIZE) p.cq_entries = cq_entries;
        ret = io_uring_queue_init_params(entries, &ring, &p);
        if (ret != -EINVAL) break;
    }
    if (ret < 0) throw std::system_error(-ret, std::system_category(), "io_uring_queue_init_params");

    auto fail = [this](int err, const char* what) {
        io_uring_queue_exit(&ring);
        throw std::system_error(err, std::system_category(), what);
    };
    const unsigned required = IORING_FEAT_NODROP | IORING_FEAT_SUBMIT_STABLE;
    if ((ring.features & required) != required) fail(ENOTSUP, "io_uring lacks IORING_FEAT_NODROP/SUBMIT_STABLE");

    io_uring_probe* probe = io_uring_get_probe_ring(&ring);
    if (!probe) fail(ENOTSUP, "io_uring opcode probe");
    const std::pair<int, const char*> needed[] = {
        {IORING_OP_POLL_ADD, "POLL_ADD"},       {IORING_OP_POLL_REMOVE, "POLL_REMOVE"},
        {IORING_OP_ASYNC_CANCEL, "ASYNC_CANCEL"}, {IORING_OP_READ, "READ"},
        {IORING_OP_WRITE, "WRITE"},             {IORING_OP_FSYNC, "FSYNC"},
    };
    for (const auto& [op, name] : needed) {
        if (!io_uring_opcode_supported(probe, op)) {
            io_uring_free_probe(probe);
            fail(ENOTSUP, (std::string("io_uring lacks opcode ") + name).c_str());
        }
    }
    io_uring_free_probe(probe);

    // Blocking on purpose: io_uring honours O_NONBLOCK on reads and would complete the wake
    // read with -EAGAIN instead of waiting for a write.
    int efd = ::eventfd(0, EFD_CLOEXEC);
    if (efd < 0) fail(errno, "eventfd");
    wake_fd.reset(efd);
    try {
        arm_wake();
        io_uring_submit(&ring);
    } catch (const std::system_error& e) {
        fail(e.code().value(), "io_uring: arming the wake eventfd");
    }
}

UringLoop::Impl::~Impl() {
    // Cancel everything still in flight and wait (bounded) for the completions, so the kernel no
    // longer references our buffers when the ring goes away.
    for (uint32_t i = 0; i < ops.size(); ++i) {
        auto& s = ops[i];
        if (!s.in_use) continue;
        s.done = nullptr;
        s.cancelled = true;
        if (io_uring_sqe* sqe = io_uring_get_sqe(&ring)) {
            io_uring_prep_cancel64(sqe, encode(Kind::op, i, s.generation), 0);
            io_uring_sqe_set_data64(sqe, encode(Kind::ignore, 0, 0));
        }
    }
    if (wake_armed) {
        if (io_uring_sqe* sqe = io_uring_get_sqe(&ring)) {
            io_uring_prep_cancel64(sqe, encode(Kind::wake, 0, 0), 0);
            io_uring_sqe_set_data64(sqe, encode(Kind::ignore, 0, 0));
        }
    }
    io_uring_submit(&ring);
    const auto limit = Clock::now() + std::chrono::seconds(2);
    while ((ops_in_flight > 0 || wake_armed) && Clock::now() < limit) {
        wait(std::chrono::milliseconds(50));
        reap();
        for (; batch_pos < batch.size(); ++batch_pos) {
            const Cqe c = batch[batch_pos];
            if (kind_of(c.user_data) == Kind::wake) {
                wake_armed = false;
            } else if (kind_of(c.user_data) == Kind::op) {
                auto* s = find_op(c.user_data);
                if (s) free_op(slot_of(c.user_data));
            }
        }
    }
    io_uring_queue_exit(&ring);
}

io_uring_sqe* UringLoop::Impl::get_sqe() {
    io_uring_sqe* sqe = io_uring_get_sqe(&ring);
    if (!sqe) {
        // SQ full: submit to make room. This never reaps CQEs, so it is safe inside callbacks.
        io_uring_submit(&ring);
        sqe = io_uring_get_sqe(&ring);
    }
    if (!sqe) throw std::system_error(EBUSY, std::system_category(), "io_uring submission queue full");
    return sqe;
}

uint32_t UringLoop::Impl::alloc_op(IoCallback done, bool is_poll) {
    uint32_t slot;
    if (!free_ops.empty()) {
        slot = free_ops.back();
        free_ops.pop_back();
    } else {
        if (ops.size() >= kMaxSlots) throw std::system_error(ENOMEM, std::system_category(), "io_uring op slots");
        slot = static_cast<uint32_t>(ops.size());
        ops.emplace_back();
    }
    auto& s = ops[slot];
    s.done = std::move(done);
    s.in_use = true;
    s.is_poll = is_poll;
    s.cancelled = false;
    ++ops_in_flight;
    return slot;
}

void UringLoop::Impl::free_op(uint32_t slot) noexcept {
    auto& s = ops[slot];
    assert(s.in_use);
    s.in_use = false;
    s.done = nullptr;
    ++s.generation;
    if (s.generation == 0) s.generation = 1;
    --ops_in_flight;
    free_ops.push_back(slot);
}

UringLoop::Impl::OpSlot* UringLoop::Impl::find_op(uint64_t id) noexcept {
    if (kind_of(id) != Kind::op) return nullptr;
    const uint32_t slot = slot_of(id);
    if (slot >= ops.size()) return nullptr;
    auto& s = ops[slot];
    if (!s.in_use || s.generation != generation_of(id)) return nullptr;
    return &s;
}

void UringLoop::Impl::arm_wake() {
    io_uring_sqe* sqe = get_sqe();
    io_uring_prep_read(sqe, wake_fd.get(), &wake_buf, sizeof wake_buf, 0);
    io_uring_sqe_set_data64(sqe, encode(Kind::wake, 0, 0));
    wake_armed = true;
}

void UringLoop::Impl::wait(Clock::duration timeout) noexcept {
    if (timeout <= Clock::duration::zero() || io_uring_cq_ready(&ring) > 0) {
        // Nothing to wait for: submit and let the kernel post pending completions (task work).
        io_uring_submit_and_get_events(&ring);
        return;
    }
    const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(timeout).count();
    __kernel_timespec ts{};
    ts.tv_sec = ns / 1000000000;
    ts.tv_nsec = ns % 1000000000;
    io_uring_cqe* cqe = nullptr;
    // Only called with an empty CQ: liburing 2.3 passes the EXT_ARG struct without the EXT_ARG
    // flag when it enters merely to submit (CQEs already there), which the kernel rejects.
    // -ETIME (timeout) and -EINTR are normal; any other error shows up as a lack of progress.
    (void)io_uring_submit_and_wait_timeout(&ring, &cqe, 1, &ts, nullptr);
}

void UringLoop::Impl::reap() noexcept {
    // Compact the batch before appending.
    if (batch_pos > 0) {
        batch.erase(batch.begin(), batch.begin() + static_cast<std::ptrdiff_t>(batch_pos));
        batch_pos = 0;
    }
    io_uring_cqe* cqes[kCqeBatch];
    for (;;) {
        const unsigned n = io_uring_peek_batch_cqe(&ring, cqes, kCqeBatch);
        if (n == 0) break;
        for (unsigned i = 0; i < n; ++i) batch.push_back(Cqe{cqes[i]->user_data, cqes[i]->res, cqes[i]->flags});
        io_uring_cq_advance(&ring, n);
        if (n < kCqeBatch) break;
    }
}

void UringLoop::Impl::dispatch() {
    // batch_pos is advanced before each callback, so a callback that throws leaves the rest of the
    // batch for the next turn instead of losing it.
    while (batch_pos < batch.size()) {
        const Cqe c = batch[batch_pos++];
        switch (kind_of(c.user_data)) {
        case Kind::op: {
            OpSlot* s = find_op(c.user_data);
            if (!s) break;  // stale: the slot moved on
            IoCallback done = std::move(s->done);
            const bool cancelled = s->cancelled;
            free_op(slot_of(c.user_data));
            if (!cancelled && done) done(c.res);
            break;
        }
        case Kind::wake:
            wake_armed = false;  // re-armed at the end of the turn
            break;
        case Kind::timer:
        case Kind::ignore:
        default:
            break;  // cancel requests' own completions, LIBURING_UDATA_TIMEOUT
        }
    }
}

void UringLoop::Impl::sift_up(size_t pos) noexcept {
    const uint32_t slot = heap[pos];
    while (pos > 0) {
        const size_t parent = (pos - 1) / 2;
        if (!timer_less(slot, heap[parent])) break;
        heap_set(pos, heap[parent]);
        pos = parent;
    }
    heap_set(pos, slot);
}

void UringLoop::Impl::sift_down(size_t pos) noexcept {
    const uint32_t slot = heap[pos];
    const size_t n = heap.size();
    for (;;) {
        size_t child = 2 * pos + 1;
        if (child >= n) break;
        if (child + 1 < n && timer_less(heap[child + 1], heap[child])) ++child;
        if (!timer_less(heap[child], slot)) break;
        heap_set(pos, heap[child]);
        pos = child;
    }
    heap_set(pos, slot);
}

void UringLoop::Impl::heap_remove(size_t pos) noexcept {
    const uint32_t last = heap.back();
    heap.pop_back();
    if (pos == heap.size()) return;
    heap_set(pos, last);
    if (pos > 0 && timer_less(last, heap[(pos - 1) / 2])) {
        sift_up(pos);
    } else {
        sift_down(pos);
    }
}

void UringLoop::Impl::run_timers() {
    if (heap.empty()) return;
    // Only timers due now and added before this pass: a timer added by a timer callback with a
    // zero delay runs in the next turn, so a timer that re-adds itself cannot spin here.
    const auto now = Clock::now();
    const uint64_t seq_limit = timer_seq;
    while (!heap.empty()) {
        const uint32_t slot = heap.front();
        auto& t = timers[slot];
        if (t.deadline > now || t.seq >= seq_limit) break;
        heap_remove(0);
        std::function<void()> fn = std::move(t.fn);
        t.fn = nullptr;
        t.in_use = false;
        ++t.generation;
        if (t.generation == 0) t.generation = 1;
        free_timers.push_back(slot);
        if (fn) fn();
    }
}

void UringLoop::Impl::run_deferred() {
    const size_t limit = (deferred.size() - deferred_head) + kMaxExtraDeferredPerTurn;
    size_t ran = 0;
    while (deferred_head < deferred.size() && ran < limit) {
        std::function<void()> fn = std::move(deferred[deferred_head]);
        ++deferred_head;
        ++ran;
        if (fn) fn();
    }
    if (deferred_head == deferred.size()) {
        deferred.clear();
        deferred_head = 0;
    } else if (deferred_head > 0) {
        deferred.erase(deferred.begin(), deferred.begin() + static_cast<std::ptrdiff_t>(deferred_head));
        deferred_head = 0;
    }
}

void UringLoop::Impl::cancel_and_wait(uint64_t user_data) noexcept {
    // A read/write may already be running in io-wq (ASYNC_CANCEL then fails with -EALREADY) and
    // still writes into the caller's buffer; the contract lets the caller free it once cancel()
    // returned, so wait for the op's own completion. Other CQEs are kept for the next dispatch.
    if (io_uring_sqe* sqe = io_uring_get_sqe(&ring)) {
        io_uring_prep_cancel64(sqe, user_data, 0);
        io_uring_sqe_set_data64(sqe, encode(Kind::ignore, 0, 0));
    } else {
        io_uring_submit(&ring);
        if (io_uring_sqe* sqe2 = io_uring_get_sqe(&ring)) {
            io_uring_prep_cancel64(sqe2, user_data, 0);
            io_uring_sqe_set_data64(sqe2, encode(Kind::ignore, 0, 0));
        }
    }
    io_uring_submit(&ring);
    const auto limit = Clock::now() + kCancelWaitLimit;
    for (;;) {
        // Is the op's completion already among the copied-out CQEs?
        for (size_t i = batch_pos; i < batch.size(); ++i) {
            if (batch[i].user_data == user_data) {
                // Consume it here: the slot is freed, the callback dropped.
                batch[i].user_data = encode(Kind::ignore, 0, 0);
                if (find_op(user_data)) free_op(slot_of(user_data));
                return;
            }
        }
        if (!find_op(user_data) || Clock::now() >= limit) return;
        wait(std::chrono::milliseconds(10));
        // reap() compacts the batch; batch_pos-relative indices stay valid for the scan above.
        reap();
    }
}

UringLoop::UringLoop(unsigned entries) : impl_(std::make_unique<Impl>(entries)) {}

UringLoop::~UringLoop() = default;

OpId UringLoop::poll_add(int fd, unsigned poll_mask, IoCallback done) {
    auto& d = *impl_;
    io_uring_sqe* sqe = d.get_sqe();
    const uint32_t slot = d.alloc_op(std::move(done), true);
    const uint64_t id = encode(Kind::op, slot, d.ops[slot].generation);
    io_uring_prep_poll_add(sqe, fd, poll_mask);
    io_uring_sqe_set_data64(sqe, id);
    return OpId{id};
}

OpId UringLoop::read_at(int fd, void* buf, size_t len, uint64_t offset, IoCallback done) {
    auto& d = *impl_;
    io_uring_sqe* sqe = d.get_sqe();
    const uint32_t slot = d.alloc_op(std::move(done), false);
    const uint64_t id = encode(Kind::op, slot, d.ops[slot].generation);
    io_uring_prep_read(sqe, fd, buf, static_cast<unsigned>(std::min(len, kMaxRwBytes)), offset);
    io_uring_sqe_set_data64(sqe, id);
    return OpId{id};
}

OpId UringLoop::write_at(int fd, const void* buf, size_t len, uint64_t offset, IoCallback done) {
    auto& d = *impl_;
    io_uring_sqe* sqe = d.get_sqe();
    const uint32_t slot = d.alloc_op(std::move(done), false);
    const uint64_t id = encode(Kind::op, slot, d.ops[slot].generation);
    io_uring_prep_write(sqe, fd, buf, static_cast<unsigned>(std::min(len, kMaxRwBytes)), offset);
    io_uring_sqe_set_data64(sqe, id);
    return OpId{id};
}

OpId UringLoop::fsync(int fd, IoCallback done) {
    auto& d = *impl_;
    io_uring_sqe* sqe = d.get_sqe();
    const uint32_t slot = d.alloc_op(std::move(done), false);
    const uint64_t id = encode(Kind::op, slot, d.ops[slot].generation);
    io_uring_prep_fsync(sqe, fd, 0);
    io_uring_sqe_set_data64(sqe, id);
    return OpId{id};
}

void UringLoop::cancel(OpId id) noexcept {
    auto& d = *impl_;
    if (kind_of(id.value) == Kind::timer) {
        cancel_timer(id);
        return;
    }
    Impl::OpSlot* s = d.find_op(id.value);
    if (!s || s->cancelled) return;
    s->cancelled = true;
    // Drop the callback now (and whatever it captured); the slot stays in use until the op's own
    // completion (-ECANCELED, or its result if it won the race) arrives and is dropped.
    IoCallback dropped = std::move(s->done);
    s->done = nullptr;
    if (s->is_poll) {
        // POLL_REMOVE submitted at once: a pending poll holds a reference to the file, so the peer
        // of a socket curl just closed would see no EOF until the poll goes (NETIO-RECIPE.md).
        io_uring_sqe* sqe = io_uring_get_sqe(&d.ring);
        if (!sqe) {
            io_uring_submit(&d.ring);
            sqe = io_uring_get_sqe(&d.ring);
        }
        if (sqe) {
            io_uring_prep_poll_remove(sqe, id.value);
            io_uring_sqe_set_data64(sqe, encode(Kind::ignore, 0, 0));
        }
        io_uring_submit(&d.ring);
    } else {
        d.cancel_and_wait(id.value);
    }
}

OpId UringLoop::add_timer(std::chrono::milliseconds delay, std::function<void()> fn) {
    auto& d = *impl_;
    uint32_t slot;
    if (!d.free_timers.empty()) {
        slot = d.free_timers.back();
        d.free_timers.pop_back();
    } else {
        if (d.timers.size() >= kMaxSlots) throw std::system_error(ENOMEM, std::system_category(), "timer slots");
        slot = static_cast<uint32_t>(d.timers.size());
        d.timers.emplace_back();
    }
    auto& t = d.timers[slot];
    t.fn = std::move(fn);
    t.deadline = Clock::now() + std::max(delay, std::chrono::milliseconds(0));
    t.seq = d.timer_seq++;
    t.in_use = true;
    d.heap.push_back(slot);
    t.heap_pos = static_cast<uint32_t>(d.heap.size() - 1);
    d.sift_up(d.heap.size() - 1);
    return OpId{encode(Kind::timer, slot, t.generation)};
}

void UringLoop::cancel_timer(OpId id) noexcept {
    auto& d = *impl_;
    if (kind_of(id.value) != Kind::timer) return;
    const uint32_t slot = slot_of(id.value);
    if (slot >= d.timers.size()) return;
    auto& t = d.timers[slot];
    if (!t.in_use || t.generation != generation_of(id.value)) return;
    d.heap_remove(t.heap_pos);
    std::function<void()> dropped = std::move(t.fn);
    t.fn = nullptr;
    t.in_use = false;
    ++t.generation;
    if (t.generation == 0) t.generation = 1;
    d.free_timers.push_back(slot);
}

void UringLoop::defer(std::function<void()> fn) { impl_->deferred.push_back(std::move(fn)); }

void UringLoop::run_once(std::chrono::milliseconds max_wait) {
    auto& d = *impl_;
    Clock::duration timeout = std::max(max_wait, std::chrono::milliseconds(0));
    if (d.deferred_head < d.deferred.size() || d.batch_pos < d.batch.size()) {
        timeout = Clock::duration::zero();
    } else if (!d.heap.empty()) {
        timeout = std::min(timeout, d.timers[d.heap.front()].deadline - Clock::now());
    }
    d.wait(timeout);
    d.reap();
    d.dispatch();
    d.run_timers();
    d.run_deferred();
    if (!d.wake_armed) d.arm_wake();
    // What the callbacks queued goes to the kernel with the next turn's wait (one syscall);
    // cancels were submitted at once.
}

// stop() is sticky: once called, run_until returns at once (run_once still works, for draining).
void UringLoop::run_until(const std::function<bool()>& done) {
    while (!impl_->stopped && !done()) run_once();
}

void UringLoop::stop() noexcept { impl_->stopped = true; }

bool UringLoop::stopped() const noexcept { return impl_->stopped; }

void UringLoop::wake() noexcept {
    const uint64_t one = 1;
    // EAGAIN means the counter is saturated, so a wake-up is already pending.
    (void)!::write(impl_->wake_fd.get(), &one, sizeof one);
}

size_t UringLoop::pending_ops() const noexcept { return impl_->ops_in_flight; }

}  // namespace netio
