// Coroutine helpers of netio/task.h on a real loop: Semaphore ranking, Flight, WaitGroup.
#include "netio/task.h"

#include <gtest/gtest.h>

#include <vector>

namespace netio {
namespace {

Task<void> take(Semaphore& sem, uint64_t rank, std::vector<uint64_t>& order, WaitGroup& wg) {
    co_await sem.acquire(rank);
    order.push_back(rank);
    sem.release();
    wg.done();
}

TEST(Semaphore, ServesLowestRankFirstAndFifoWithinARank) {
    UringLoop loop;
    Semaphore sem(loop, 1);
    std::vector<uint64_t> order;
    WaitGroup wg(loop);
    auto outer = [&]() -> Task<void> {
        co_await sem.acquire();  // hold the only permit while the others queue up
        for (uint64_t r : {50u, 10u, 30u, 10u, 0u}) {
            wg.add();
            spawn(take(sem, r, order, wg));
        }
        sem.release();
        co_await wg.wait();
    };
    run_blocking(loop, outer());
    EXPECT_EQ(order, (std::vector<uint64_t>{0, 10, 10, 30, 50}));
}

TEST(Flight, EveryWaiterGetsTheOneResult) {
    UringLoop loop;
    Flight flight;
    int resumed = 0;
    WaitGroup wg(loop);
    auto waiter = [&]() -> Task<void> {
        Status st = co_await flight.wait();
        EXPECT_FALSE(st.ok());
        EXPECT_EQ(st.error().message, "boom");
        ++resumed;
        wg.done();
    };
    auto main_task = [&]() -> Task<void> {
        for (int i = 0; i < 3; ++i) {
            wg.add();
            spawn(waiter());
        }
        co_await sleep_for(loop, std::chrono::milliseconds(5));
        flight.finish(loop, Error::make("boom"));
        co_await wg.wait();
        // A late waiter sees the result at once.
        Status late = co_await flight.wait();
        EXPECT_FALSE(late.ok());
    };
    run_blocking(loop, main_task());
    EXPECT_EQ(resumed, 3);
}

}  // namespace
}  // namespace netio
