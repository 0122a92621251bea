// Which queued work item runs next: priority classes with a guaranteed share for the lower ones,
// and deficit round robin (Shreedhar & Varghese, SIGCOMM 1995) between the tasks of a class.
//
// A task (a rule run, a replication event, a mirror) queues items (a blob transfer, a chunk, a
// manifest push) with their cost in bytes; whenever the engine has a free slot (a connection, a
// stream, link budget) it asks next() and starts what it gets. Shares are shares of bytes picked,
// so a task of big layers and a task of small ones get the same bandwidth, not the same count.
//
//  - Classes: `event` (a push just happened: someone is waiting), `manual` (a user asked), `bulk`
//    (scans, schedules, backfills). A higher class goes first, but while a lower class has work
//    queued it is owed `lower_class_share` of the bytes picked from it and the classes above it,
//    so a big manual scan cannot starve a backfill, and a burst of events cannot starve either.
//    With the default share of 1/8 and all three classes busy, bulk gets 12.5% of the bytes,
//    manual 10.9%, event 76.6%. A class that is alone gets everything.
//  - Within a class: DRR. Each visit adds quantum_bytes * weight to the task's deficit; the task
//    runs items while its deficit covers their cost. While two tasks stay backlogged, the bytes
//    each was given, divided by its weight, differ by at most about one quantum plus the largest
//    item: shares converge to the weights whatever the item sizes.
//  - Within a task: FIFO, in the order enqueued (the engine enqueues in planner::start_order()).
//
// Threading: belongs to one thread (the event loop). All operations are O(1) amortised except
// add_task/remove_task (O(tasks in the class)) and next() after a run of items much larger than
// the quantum (O(tasks in the class), not O(cost / quantum)).
#pragma once

#include <array>
#include <cstdint>
#include <deque>
#include <optional>
#include <unordered_map>
#include <utility>

namespace planner {

enum class Priority { event = 0, manual = 1, bulk = 2 };

struct FairSchedulerConfig {
    // DRR quantum per unit of weight. Smaller: finer interleaving; larger than the biggest item:
    // every visit runs at least one item. Either way shares converge; 0 counts as 1.
    uint64_t quantum_bytes = 1u << 20;
    // The share of bytes a lower class is owed while higher classes have work, in [0, 0.9]
    // (clamped). 0 is strict priority: a lower class may starve.
    double lower_class_share = 1.0 / 8;
};

class FairScheduler {
public:
    explicit FairScheduler(FairSchedulerConfig config = {}) noexcept;

    // Registers a task, or changes the weight and class of a registered one (its queued items
    // follow it). Weight 0 counts as 1.
    void add_task(uint64_t task_id, unsigned weight, Priority p);
    // Forgets a task and drops its queued items; returns how many were dropped (0 if unknown).
    size_t remove_task(uint64_t task_id);
    // Queues an item at the back of its task's queue. Cost 0 counts as 1 byte. Returns false
    // (and queues nothing) if the task is not registered.
    bool enqueue(uint64_t task_id, uint64_t item_id, uint64_t cost_bytes);

    // The next item to run as {task_id, item_id}, removed from its queue; nullopt when nothing is
    // queued.
    std::optional<std::pair<uint64_t, uint64_t>> next();

    // Items queued, in all tasks / in one task (0 if unknown).
    size_t pending() const noexcept { return pending_; }
    size_t pending(uint64_t task_id) const noexcept;
    bool has_task(uint64_t task_id) const noexcept { return tasks_.count(task_id) != 0; }

private:
    static constexpr size_t kClasses = 3;

    struct Item {
        uint64_t id;
        uint64_t cost_bytes;
    };
    struct Task {
        unsigned weight = 1;
        Priority priority = Priority::bulk;
        std::deque<Item> queue;
        uint64_t deficit_bytes = 0;
        bool in_turn = false;  // its quantum for the current visit was added
        bool active = false;   // in its class's round-robin ring
    };
    struct Class {
        std::deque<uint64_t> ring;  // tasks with queued items, in round-robin order
        size_t pending = 0;
        // Bytes this class is owed while higher classes are busy (may go negative: it ran an
        // item bigger than what it was owed, and pays back before its next guaranteed turn).
        double credit_bytes = 0;
    };

    static size_t index(Priority p) noexcept { return static_cast<size_t>(p); }
    void activate(uint64_t task_id, Task& t);
    void deactivate(uint64_t task_id, Task& t);
    std::pair<uint64_t, Item> next_in_class(Class& c);

    FairSchedulerConfig config_;
    std::unordered_map<uint64_t, Task> tasks_;
    std::array<Class, kClasses> classes_;
    size_t pending_ = 0;
};

// The task slots of a daemon: `max_running` for any task, plus `event_extra` that only
// event-triggered tasks may take, so a push is not stuck behind long scans. Events start first,
// but while a non-event task is waiting and none is running, events leave one slot free for it:
// a stream of pushes cannot starve the scans. Neither kind ever makes the total exceed
// max_running + event_extra, and non-event tasks alone never exceed max_running.
struct TaskSlots {
    size_t max_running = 2;
    size_t event_extra = 2;
};
bool may_start_task(const TaskSlots& slots, bool event, size_t running_events, size_t running_others,
                    bool others_waiting) noexcept;

}  // namespace planner
