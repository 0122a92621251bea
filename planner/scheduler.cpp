#include "planner/scheduler.h"

#include <algorithm>
#include <cassert>
#include <cmath>
#include <limits>

namespace planner {

namespace {

constexpr uint64_t kMax = std::numeric_limits<uint64_t>::max();

uint64_t add_sat(uint64_t a, uint64_t b) noexcept { return a > kMax - b ? kMax : a + b; }
uint64_t mul_sat(uint64_t a, uint64_t b) noexcept { return (a != 0 && b > kMax / a) ? kMax : a * b; }

}  // namespace

FairScheduler::FairScheduler(FairSchedulerConfig config) noexcept : config_(config) {
    config_.quantum_bytes = std::max<uint64_t>(config_.quantum_bytes, 1);
    const double s = config_.lower_class_share;
    config_.lower_class_share = std::isfinite(s) ? std::clamp(s, 0.0, 0.9) : 0.0;
}

void FairScheduler::activate(uint64_t task_id, Task& t) {
    if (t.active) return;
    t.active = true;
    t.deficit_bytes = 0;
    t.in_turn = false;
    classes_[index(t.priority)].ring.push_back(task_id);
}

void FairScheduler::deactivate(uint64_t task_id, Task& t) {
    if (!t.active) return;
    auto& ring = classes_[index(t.priority)].ring;
    if (auto it = std::find(ring.begin(), ring.end(), task_id); it != ring.end()) ring.erase(it);
    t.active = false;
    t.deficit_bytes = 0;  // DRR: an idle task banks nothing
    t.in_turn = false;
}

void FairScheduler::add_task(uint64_t task_id, unsigned weight, Priority p) {
    auto [it, inserted] = tasks_.try_emplace(task_id);
    Task& t = it->second;
    t.weight = std::max(weight, 1u);
    if (inserted || t.priority == p) {
        t.priority = p;
        return;
    }
    // Moving class: its queued items move with it.
    const bool was_active = t.active;
    deactivate(task_id, t);
    Class& from = classes_[index(t.priority)];
    from.pending -= t.queue.size();
    if (from.pending == 0) from.credit_bytes = 0;
    t.priority = p;
    classes_[index(p)].pending += t.queue.size();
    if (was_active) activate(task_id, t);
}

size_t FairScheduler::remove_task(uint64_t task_id) {
    auto it = tasks_.find(task_id);
    if (it == tasks_.end()) return 0;
    Task& t = it->second;
    deactivate(task_id, t);
    const size_t dropped = t.queue.size();
    Class& c = classes_[index(t.priority)];
    c.pending -= dropped;
    if (c.pending == 0) c.credit_bytes = 0;
    pending_ -= dropped;
    tasks_.erase(it);
    return dropped;
}

bool FairScheduler::enqueue(uint64_t task_id, uint64_t item_id, uint64_t cost_bytes) {
    auto it = tasks_.find(task_id);
    if (it == tasks_.end()) return false;
    Task& t = it->second;
    t.queue.push_back(Item{item_id, std::max<uint64_t>(cost_bytes, 1)});
    activate(task_id, t);
    ++classes_[index(t.priority)].pending;
    ++pending_;
    return true;
}

size_t FairScheduler::pending(uint64_t task_id) const noexcept {
    auto it = tasks_.find(task_id);
    return it == tasks_.end() ? 0 : it->second.queue.size();
}

std::pair<uint64_t, FairScheduler::Item> FairScheduler::next_in_class(Class& c) {
    assert(!c.ring.empty());
    size_t misses = 0;  // consecutive visits that could not afford their head item
    for (;;) {
        const uint64_t id = c.ring.front();
        Task& t = tasks_.find(id)->second;
        assert(!t.queue.empty());
        const uint64_t quantum = mul_sat(config_.quantum_bytes, t.weight);
        if (!t.in_turn) {
            t.deficit_bytes = add_sat(t.deficit_bytes, quantum);
            t.in_turn = true;
        }
        const Item head = t.queue.front();
        if (head.cost_bytes <= t.deficit_bytes) {
            t.deficit_bytes -= head.cost_bytes;
            t.queue.pop_front();
            if (t.queue.empty()) deactivate(id, t);  // the ring's front: O(1)
            return {id, head};
        }
        // Its turn is over; the next visit adds a fresh quantum.
        t.in_turn = false;
        c.ring.pop_front();
        c.ring.push_back(id);
        if (++misses < c.ring.size()) continue;
        // A whole round went by and nobody could afford its head item (items much bigger than
        // the quantum). Grant the rounds in which nobody would run at once: k - 1 quanta each,
        // where k is the fewest rounds any task needs. Same picks as plain DRR, without
        // looping cost / quantum times.
        uint64_t k = kMax;
        for (uint64_t tid : c.ring) {
            const Task& u = tasks_.find(tid)->second;
            const uint64_t q = mul_sat(config_.quantum_bytes, u.weight);
            const uint64_t missing = u.queue.front().cost_bytes - u.deficit_bytes;
            k = std::min(k, missing / q + (missing % q != 0));
        }
        if (k > 1)
            for (uint64_t tid : c.ring) {
                Task& u = tasks_.find(tid)->second;
                u.deficit_bytes = add_sat(u.deficit_bytes, mul_sat(k - 1, mul_sat(config_.quantum_bytes, u.weight)));
            }
        misses = 0;
    }
}

std::optional<std::pair<uint64_t, uint64_t>> FairScheduler::next() {
    if (pending_ == 0) return std::nullopt;
    size_t top = 0;
    while (classes_[top].pending == 0) ++top;
    // A lower class that is owed bytes goes first; the highest such one.
    size_t chosen = top;
    for (size_t c = top + 1; c < kClasses; ++c) {
        if (classes_[c].pending > 0 && classes_[c].credit_bytes > 0) {
            chosen = c;
            break;
        }
    }
    Class& cls = classes_[chosen];
    const auto [task_id, item] = next_in_class(cls);
    --cls.pending;
    --pending_;
    const double cost = static_cast<double>(item.cost_bytes);
    if (chosen == top)
        cls.credit_bytes = 0;  // not owed anything while it is the highest class with work
    else
        cls.credit_bytes -= cost;
    if (cls.pending == 0) cls.credit_bytes = 0;  // no banking while idle
    // Classes below the one just served earn share / (1 - share) of its bytes, which gives each
    // `share` of the bytes served to it and to the classes above it.
    const double s = config_.lower_class_share;
    const double earn = s / (1 - s);
    for (size_t c = chosen + 1; c < kClasses; ++c)
        if (classes_[c].pending > 0) classes_[c].credit_bytes += cost * earn;
    return std::pair{task_id, item.id};
}

bool may_start_task(const TaskSlots& slots, bool event, size_t running_events, size_t running_others,
                    bool others_waiting) noexcept {
    const size_t total = running_events + running_others;
    const size_t all_slots = slots.max_running + slots.event_extra;
    if (event) {
        const size_t kept = others_waiting && running_others == 0 && slots.max_running > 0 ? 1 : 0;
        return total + kept < all_slots;
    }
    if (total < slots.max_running) return true;
    // The slot events leave free: one non-event task at a time.
    return running_others == 0 && total < all_slots && slots.max_running > 0;
}

}  // namespace planner
