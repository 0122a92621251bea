#include "netio/uring_loop.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <stdlib.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "netio/unique_fd.h"
#include "tests/netio/test_util.h"

using namespace std::chrono_literals;
using netio::Clock;
using netio::OpId;
using netio::UniqueFd;
using netio::UringLoop;
using testutil::run_for;
using testutil::run_until;

namespace {

struct Pipe {
    UniqueFd r, w;
    Pipe() {
        int fds[2];
        if (::pipe2(fds, O_CLOEXEC) != 0) throw std::runtime_error("pipe2");
        r.reset(fds[0]);
        w.reset(fds[1]);
    }
};

}  // namespace

TEST(UringLoop, TimersFireInDeadlineOrderAndFifoOnTies) {
    UringLoop loop;
    std::vector<std::string> order;
    loop.add_timer(30ms, [&] { order.push_back("30"); });
    loop.add_timer(10ms, [&] { order.push_back("10a"); });
    loop.add_timer(20ms, [&] { order.push_back("20"); });
    loop.add_timer(0ms, [&] { order.push_back("0"); });
    loop.add_timer(10ms, [&] { order.push_back("10b"); });
    const auto start = Clock::now();
    ASSERT_TRUE(run_until(loop, [&] { return order.size() == 5; }, 2s));
    EXPECT_GE(Clock::now() - start, 30ms);
    EXPECT_EQ(order, (std::vector<std::string>{"0", "10a", "10b", "20", "30"}));
}

TEST(UringLoop, WaitEndsAtTheNearestDeadline) {
    UringLoop loop;
    bool fired = false;
    loop.add_timer(20ms, [&] { fired = true; });
    const auto start = Clock::now();
    loop.run_once(5000ms);  // must not sleep the full max_wait
    loop.run_once(0ms);
    EXPECT_TRUE(fired);
    EXPECT_LT(Clock::now() - start, 1000ms);
}

TEST(UringLoop, CancelledTimersNeverRun) {
    UringLoop loop;
    int a = 0, b = 0, c = 0;
    const OpId ta = loop.add_timer(20ms, [&] { ++a; });
    loop.add_timer(5ms, [&] {
        ++b;
        loop.cancel_timer(ta);  // from inside another timer
    });
    const OpId tc = loop.add_timer(1ms, [&] { ++c; });
    loop.cancel_timer(tc);
    loop.cancel_timer(tc);       // twice: ignored
    loop.cancel_timer(OpId{});   // invalid: ignored
    run_for(loop, 60ms);
    EXPECT_EQ(a, 0);
    EXPECT_EQ(b, 1);
    EXPECT_EQ(c, 0);
}

TEST(UringLoop, TimerAddedFromTimerWithZeroDelayDoesNotStarveIo) {
    UringLoop loop;
    int ticks = 0;
    bool other = false;
    std::function<void()> again = [&] {
        ++ticks;
        if (!other) loop.add_timer(0ms, again);
    };
    loop.add_timer(0ms, again);
    loop.add_timer(15ms, [&] { other = true; });
    ASSERT_TRUE(run_until(loop, [&] { return other; }, 2s));
    EXPECT_GT(ticks, 1);
}

TEST(UringLoop, DeferredRunsInOrderAndSelfRequeueingIsBounded) {
    UringLoop loop;
    std::vector<int> order;
    loop.defer([&] { order.push_back(1); });
    loop.defer([&] {
        order.push_back(2);
        loop.defer([&] { order.push_back(4); });
    });
    loop.defer([&] { order.push_back(3); });
    loop.run_once(0ms);
    EXPECT_EQ(order, (std::vector<int>{1, 2, 3, 4}));

    // A callback that re-defers itself forever must not keep run_once from returning, nor keep
    // timers from running.
    bool timer_ran = false;
    long spins = 0;
    std::function<void()> spin = [&] {
        ++spins;
        if (!timer_ran) loop.defer(spin);
    };
    loop.defer(spin);
    loop.run_once(0ms);  // returns although the queue is never empty
    EXPECT_GT(spins, 0);
    loop.add_timer(10ms, [&] { timer_ran = true; });
    ASSERT_TRUE(run_until(loop, [&] { return timer_ran; }, 2s));
    run_for(loop, 5ms);
}

TEST(UringLoop, FileWriteFsyncRead) {
    UringLoop loop;
    std::string path = (std::getenv("TMPDIR") ? std::string(std::getenv("TMPDIR")) : std::string("/tmp")) +
                       "/netio-test-XXXXXX";
    UniqueFd fd(::mkstemp(path.data()));
    ASSERT_TRUE(fd.valid());
    ::unlink(path.c_str());

    std::vector<char> out(1 << 20);
    for (size_t i = 0; i < out.size(); ++i) out[i] = static_cast<char>(i * 7 + 3);
    int wres = 1, fres = 1, rres = 1;
    bool wdone = false, fdone = false, rdone = false;
    loop.write_at(fd.get(), out.data(), out.size(), 4096, [&](int res) {
        wres = res;
        wdone = true;
        loop.fsync(fd.get(), [&](int r) {
            fres = r;
            fdone = true;
        });
    });
    ASSERT_TRUE(run_until(loop, [&] { return fdone; }, 10s));
    EXPECT_TRUE(wdone);
    EXPECT_EQ(wres, static_cast<int>(out.size()));
    EXPECT_EQ(fres, 0);

    std::vector<char> in(out.size() + 100);
    loop.read_at(fd.get(), in.data(), in.size(), 4096, [&](int res) {
        rres = res;
        rdone = true;
    });
    ASSERT_TRUE(run_until(loop, [&] { return rdone; }, 10s));
    ASSERT_EQ(rres, static_cast<int>(out.size()));  // short read at EOF
    EXPECT_EQ(std::memcmp(in.data(), out.data(), out.size()), 0);
    EXPECT_EQ(loop.pending_ops(), 0u);

    // Errors come back as negative errno.
    int bad = 0;
    bool bad_done = false;
    loop.read_at(-1, in.data(), 10, 0, [&](int res) {
        bad = res;
        bad_done = true;
    });
    ASSERT_TRUE(run_until(loop, [&] { return bad_done; }, 2s));
    EXPECT_EQ(bad, -EBADF);
}

TEST(UringLoop, PollOnPipe) {
    UringLoop loop;
    Pipe p;
    int got = 0;
    loop.poll_add(p.r.get(), POLLIN, [&](int res) { got = res; });
    run_for(loop, 20ms);
    EXPECT_EQ(got, 0);
    EXPECT_EQ(loop.pending_ops(), 1u);
    ASSERT_EQ(::write(p.w.get(), "x", 1), 1);
    ASSERT_TRUE(run_until(loop, [&] { return got != 0; }, 2s));
    EXPECT_TRUE(got & POLLIN);
    EXPECT_EQ(loop.pending_ops(), 0u);
}

TEST(UringLoop, CancelledPollNeverCallsBack) {
    UringLoop loop;
    Pipe p;
    int calls = 0;
    const OpId id = loop.poll_add(p.r.get(), POLLIN, [&](int) { ++calls; });
    loop.run_once(0ms);  // the poll is in the kernel now
    loop.cancel(id);
    ASSERT_EQ(::write(p.w.get(), "x", 1), 1);
    ASSERT_TRUE(run_until(loop, [&] { return loop.pending_ops() == 0; }, 2s));
    run_for(loop, 10ms);
    EXPECT_EQ(calls, 0);

    // Cancelled before it was even submitted.
    const OpId id2 = loop.poll_add(p.r.get(), POLLIN, [&](int) { ++calls; });
    loop.cancel(id2);
    ASSERT_TRUE(run_until(loop, [&] { return loop.pending_ops() == 0; }, 2s));
    EXPECT_EQ(calls, 0);
    loop.cancel(id2);  // finished id: ignored
}

TEST(UringLoop, CancelledReadNeverCallsBackAndReleasesTheBuffer) {
    UringLoop loop;
    Pipe p;
    int calls = 0;
    char buf[16];
    const OpId id = loop.read_at(p.r.get(), buf, sizeof buf, 0, [&](int) { ++calls; });
    loop.run_once(0ms);
    loop.cancel(id);
    // The read's own completion was awaited inside cancel(): the buffer is free now.
    EXPECT_EQ(loop.pending_ops(), 0u);
    ASSERT_EQ(::write(p.w.get(), "x", 1), 1);
    run_for(loop, 20ms);
    EXPECT_EQ(calls, 0);
}

TEST(UringLoop, WakeFromAnotherThread) {
    UringLoop loop;
    std::thread t([&] {
        std::this_thread::sleep_for(30ms);
        loop.wake();
    });
    const auto start = Clock::now();
    loop.run_once(5000ms);
    const auto took = Clock::now() - start;
    t.join();
    EXPECT_LT(took, 2000ms);
    // Still works afterwards (the eventfd read was re-armed).
    std::thread t2([&] {
        std::this_thread::sleep_for(10ms);
        loop.wake();
    });
    const auto start2 = Clock::now();
    loop.run_once(5000ms);
    t2.join();
    EXPECT_LT(Clock::now() - start2, 2000ms);
}

TEST(UringLoop, StopEndsRunUntil) {
    UringLoop loop;
    loop.add_timer(5ms, [&] { loop.stop(); });
    const auto start = Clock::now();
    loop.run_until([] { return false; });
    EXPECT_TRUE(loop.stopped());
    EXPECT_LT(Clock::now() - start, 2000ms);
}

TEST(UringLoop, DestroyWithPendingOps) {
    Pipe p;
    char buf[8];
    int calls = 0;
    {
        UringLoop loop;
        loop.poll_add(p.r.get(), POLLIN, [&](int) { ++calls; });
        loop.read_at(p.r.get(), buf, sizeof buf, 0, [&](int) { ++calls; });
        loop.add_timer(1ms, [&] { ++calls; });
        loop.run_once(0ms);
    }
    EXPECT_EQ(calls, 0);
}
