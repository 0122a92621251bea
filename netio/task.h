// Coroutines on the loop: Task<T> (lazy, awaited by exactly one parent, symmetric transfer back on
// completion), spawn() to start a detached Task<void>, and the awaitables the engine needs:
// sleep_for, fetch (an HttpClient transfer), Semaphore (bounded concurrency) and WaitGroup.
//
// Threading: everything runs on the loop thread; nothing here is thread-safe.
// Ownership: a Task owns its coroutine frame until it is awaited to completion; a spawned Task owns
// itself and frees its frame when it finishes. Exceptions thrown inside a coroutine are carried to
// the awaiting parent (the data path returns Result values; exceptions are for bugs and bad_alloc).
#pragma once

#include <coroutine>
#include <cstddef>
#include <deque>
#include <exception>
#include <functional>
#include <map>
#include <optional>
#include <stdexcept>
#include <type_traits>
#include <utility>
#include <vector>

#include "netio/http_client.h"
#include "netio/uring_loop.h"

namespace netio {

template <class T>
class Task;

namespace detail {

struct PromiseBase {
    std::coroutine_handle<> continuation;
    std::exception_ptr exception;

    std::suspend_always initial_suspend() noexcept { return {}; }
    struct FinalAwaiter {
        bool await_ready() noexcept { return false; }
        template <class P>
        std::coroutine_handle<> await_suspend(std::coroutine_handle<P> h) noexcept {
            auto c = h.promise().continuation;
            return c ? c : std::noop_coroutine();
        }
        void await_resume() noexcept {}
    };
    FinalAwaiter final_suspend() noexcept { return {}; }
    void unhandled_exception() noexcept { exception = std::current_exception(); }
};

}  // namespace detail

template <class T>
class [[nodiscard]] Task {
public:
    struct promise_type : detail::PromiseBase {
        std::optional<T> value;
        Task get_return_object() { return Task(std::coroutine_handle<promise_type>::from_promise(*this)); }
        template <class U>
        void return_value(U&& v) { value.emplace(std::forward<U>(v)); }
    };

    Task(Task&& o) noexcept : h_(std::exchange(o.h_, {})) {}
    Task& operator=(Task&& o) noexcept {
        if (this != &o) {
            if (h_) h_.destroy();
            h_ = std::exchange(o.h_, {});
        }
        return *this;
    }
    ~Task() {
        if (h_) h_.destroy();
    }

    bool await_ready() const noexcept { return false; }
    std::coroutine_handle<> await_suspend(std::coroutine_handle<> parent) noexcept {
        h_.promise().continuation = parent;
        return h_;
    }
    T await_resume() {
        auto& p = h_.promise();
        if (p.exception) std::rethrow_exception(p.exception);
        return std::move(*p.value);
    }

private:
    explicit Task(std::coroutine_handle<promise_type> h) : h_(h) {}
    std::coroutine_handle<promise_type> h_;
};

template <>
class [[nodiscard]] Task<void> {
public:
    struct promise_type : detail::PromiseBase {
        Task get_return_object() { return Task(std::coroutine_handle<promise_type>::from_promise(*this)); }
        void return_void() noexcept {}
    };

    Task(Task&& o) noexcept : h_(std::exchange(o.h_, {})) {}
    Task& operator=(Task&& o) noexcept {
        if (this != &o) {
            if (h_) h_.destroy();
            h_ = std::exchange(o.h_, {});
        }
        return *this;
    }
    ~Task() {
        if (h_) h_.destroy();
    }

    bool await_ready() const noexcept { return false; }
    std::coroutine_handle<> await_suspend(std::coroutine_handle<> parent) noexcept {
        h_.promise().continuation = parent;
        return h_;
    }
    void await_resume() {
        if (h_.promise().exception) std::rethrow_exception(h_.promise().exception);
    }

private:
    explicit Task(std::coroutine_handle<promise_type> h) : h_(h) {}
    std::coroutine_handle<promise_type> h_;
};

namespace detail {
struct Detached {
    struct promise_type {
        Detached get_return_object() noexcept { return {}; }
        std::suspend_never initial_suspend() noexcept { return {}; }
        std::suspend_never final_suspend() noexcept { return {}; }
        void return_void() noexcept {}
        void unhandled_exception() noexcept { std::terminate(); }  // spawned tasks must catch their own
    };
};
inline Detached run_detached(Task<void> t, std::function<void(std::exception_ptr)> on_exception) {
    try {
        co_await t;
    } catch (...) {
        if (on_exception) on_exception(std::current_exception());
    }
}
}  // namespace detail

// Starts `t` now (up to its first suspension); it frees itself when done. An exception escaping
// it is handed to `on_exception` (if none is given, the process terminates: that is a bug).
inline void spawn(Task<void> t, std::function<void(std::exception_ptr)> on_exception = {}) {
    detail::run_detached(std::move(t), std::move(on_exception));
}

// co_await sleep_for(loop, 100ms);
struct SleepAwaiter {
    UringLoop& loop;
    std::chrono::milliseconds delay;
    bool await_ready() const noexcept { return delay.count() <= 0; }
    void await_suspend(std::coroutine_handle<> h) { loop.add_timer(delay, [h] { h.resume(); }); }
    void await_resume() const noexcept {}
};
inline SleepAwaiter sleep_for(UringLoop& loop, std::chrono::milliseconds d) { return {loop, d}; }

// co_await fetch(client, req[, sink]) -> Result<Response>
struct FetchAwaiter {
    HttpClient& client;
    Request req;
    BodySink* sink;
    std::optional<Result<Response>> result{};
    TransferId id = 0;
    bool await_ready() const noexcept { return false; }
    void await_suspend(std::coroutine_handle<> h) {
        id = client.start(std::move(req), sink, [this, h](Result<Response> r) {
            result.emplace(std::move(r));
            h.resume();
        });
    }
    Result<Response> await_resume() { return std::move(*result); }
};
inline FetchAwaiter fetch(HttpClient& client, Request req, BodySink* sink = nullptr) {
    return FetchAwaiter{client, std::move(req), sink};
}

// Bounded concurrency: co_await sem.acquire(); ... sem.release(); (or hold a Permit). Waiters are
// served lowest `rank` first, first come first served within a rank (acquire() is rank 0): the
// mirror ranks blob transfers by size so small images complete early.
class Semaphore {
public:
    Semaphore(UringLoop& loop, size_t permits) : loop_(loop), free_(permits) {}

    struct Acquire {
        Semaphore& s;
        uint64_t rank;
        bool await_ready() const noexcept {
            if (s.free_ > 0 && s.waiters_.empty()) {
                --s.free_;
                return true;
            }
            return false;
        }
        void await_suspend(std::coroutine_handle<> h) { s.waiters_.emplace(std::make_pair(rank, s.seq_++), h); }
        void await_resume() const noexcept {}
    };
    Acquire acquire(uint64_t rank = 0) { return Acquire{*this, rank}; }

    // Hands the permit to the next waiter (resumed from the deferred queue, not re-entrantly).
    void release() {
        if (!waiters_.empty()) {
            auto it = waiters_.begin();
            auto h = it->second;
            waiters_.erase(it);
            loop_.defer([h] { h.resume(); });
        } else {
            ++free_;
        }
    }

    class Permit {
    public:
        explicit Permit(Semaphore* s) : s_(s) {}
        Permit(Permit&& o) noexcept : s_(std::exchange(o.s_, nullptr)) {}
        Permit(const Permit&) = delete;
        ~Permit() {
            if (s_) s_->release();
        }
    private:
        Semaphore* s_;
    };

private:
    UringLoop& loop_;
    size_t free_;
    uint64_t seq_ = 0;
    std::map<std::pair<uint64_t, uint64_t>, std::coroutine_handle<>> waiters_;
};

// Counts spawned work; co_await wg.wait() resumes once the count is back to zero.
class WaitGroup {
public:
    explicit WaitGroup(UringLoop& loop) : loop_(loop) {}
    void add(size_t n = 1) noexcept { count_ += n; }
    void done() {
        if (--count_ == 0 && waiter_) {
            auto h = std::exchange(waiter_, {});
            loop_.defer([h] { h.resume(); });
        }
    }
    size_t count() const noexcept { return count_; }

    struct Wait {
        WaitGroup& wg;
        bool await_ready() const noexcept { return wg.count_ == 0; }
        void await_suspend(std::coroutine_handle<> h) noexcept { wg.waiter_ = h; }
        void await_resume() const noexcept {}
    };
    Wait wait() { return Wait{*this}; }

private:
    UringLoop& loop_;
    size_t count_ = 0;
    std::coroutine_handle<> waiter_;
};

// A one-shot Status many coroutines can wait for (single flight): the first caller does the work
// and finish()es; the others co_await wait() and get the same result.
struct Flight {
    bool done = false;
    Status result = ok_status();
    std::vector<std::coroutine_handle<>> waiters;

    struct Wait {
        Flight& f;
        bool await_ready() const noexcept { return f.done; }
        void await_suspend(std::coroutine_handle<> h) { f.waiters.push_back(h); }
        Status await_resume() const { return f.result; }
    };
    Wait wait() { return Wait{*this}; }
    // Waiters are resumed from the loop's deferred queue, not from inside this call.
    void finish(UringLoop& loop, Status r) {
        done = true;
        result = std::move(r);
        for (auto h : waiters) loop.defer([h] { h.resume(); });
        waiters.clear();
    }
};

// Runs `t` on `loop` until it completes; returns its value. For main()s and tests.
template <class T>
T run_blocking(UringLoop& loop, Task<T> t) {
    using Slot = std::conditional_t<std::is_void_v<T>, bool, std::optional<T>>;
    Slot out{};
    std::exception_ptr exc;
    bool finished = false;
    auto wrapper = [](Task<T> inner, Slot& o, std::exception_ptr& e, bool& f) -> Task<void> {
        try {
            if constexpr (std::is_void_v<T>) {
                co_await inner;
                o = true;
            } else {
                o.emplace(co_await inner);
            }
        } catch (...) {
            e = std::current_exception();
        }
        f = true;
    };
    spawn(wrapper(std::move(t), out, exc, finished));
    loop.run_until([&] { return finished; });
    if (exc) std::rethrow_exception(exc);
    if (!finished) throw std::runtime_error("event loop stopped before the task finished");
    if constexpr (!std::is_void_v<T>) return std::move(*out);
}

}  // namespace netio
