// UringLoop: one thread, one io_uring. Socket readiness (one-shot POLL_ADD), timers kept in the
// loop (the wait itself times out at the nearest deadline), file reads/writes/fsync at offsets,
// and a deferred queue run after each batch of completions.
//
// Threading: every method must be called from the loop's thread (the one that constructed it),
// except wake(), which any thread may call.
// Ownership: the loop owns the ring and its operation slot table. A callback handed to the loop is
// owned by the loop until it has run or the operation was cancelled; kernel-visible user_data
// encodes {kind, slot, generation}, never a pointer, so a completion for a cancelled operation is
// dropped.
// Errors: the constructor throws std::system_error if the ring cannot be set up or lacks a
// required feature/opcode. Operation callbacks receive the CQE's res (negative errno on error).
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>

namespace netio {

using Clock = std::chrono::steady_clock;

// Identifies an in-flight operation or timer. {} (0) is never a valid id.
struct OpId {
    uint64_t value = 0;
    explicit operator bool() const noexcept { return value != 0; }
    friend bool operator==(OpId, OpId) = default;
};

class UringLoop {
public:
    using IoCallback = std::function<void(int res)>;

    explicit UringLoop(unsigned entries = 512);
    ~UringLoop();
    UringLoop(const UringLoop&) = delete;
    UringLoop& operator=(const UringLoop&) = delete;

    // One-shot poll for `poll_mask` (POLLIN/POLLOUT/...). `done(res)` gets the revents mask, or a
    // negative errno. Cancelling drops the callback; it is never called afterwards.
    OpId poll_add(int fd, unsigned poll_mask, IoCallback done);
    // Cancels a poll (POLL_REMOVE submitted at once, so the kernel drops its file reference now)
    // or any other pending op (ASYNC_CANCEL). Unknown or finished ids are ignored.
    void cancel(OpId id) noexcept;

    // File I/O at an offset. The buffer must stay valid until `done` runs (or cancel() returned).
    OpId read_at(int fd, void* buf, size_t len, uint64_t offset, IoCallback done);
    OpId write_at(int fd, const void* buf, size_t len, uint64_t offset, IoCallback done);
    OpId fsync(int fd, IoCallback done);

    // Timers: `fn` runs once on the loop thread after `delay`. cancel_timer before it ran drops it.
    OpId add_timer(std::chrono::milliseconds delay, std::function<void()> fn);
    void cancel_timer(OpId id) noexcept;

    // Runs `fn` on the loop thread after the current batch of completions (never re-entrantly).
    void defer(std::function<void()> fn);

    // One turn: submit, wait until a completion or the nearest deadline (at most max_wait), copy
    // the CQEs out, dispatch them, run due timers, run the deferred queue.
    void run_once(std::chrono::milliseconds max_wait = std::chrono::milliseconds(1000));
    // Turns until `done()` is true or stop() is called.
    void run_until(const std::function<bool()>& done);
    void stop() noexcept;
    bool stopped() const noexcept;

    // Thread-safe: wakes a loop blocked in run_once (eventfd).
    void wake() noexcept;

    // Number of in-flight kernel operations (for tests and shutdown checks).
    size_t pending_ops() const noexcept;

    Clock::time_point now() const noexcept { return Clock::now(); }

private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

}  // namespace netio
