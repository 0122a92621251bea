#include "planner/order.h"

#include <algorithm>
#include <cassert>
#include <cstdint>
#include <numeric>
#include <utility>

namespace planner {

std::optional<NodeId> ArtifactGraph::add_node(std::string_view key, NodeKind kind, uint64_t size_bytes) {
    std::string k(key);
    if (auto it = by_key_.find(k); it != by_key_.end()) {
        if (nodes_[it->second].kind != kind) return std::nullopt;
        return it->second;
    }
    const auto id = static_cast<NodeId>(nodes_.size());
    nodes_.push_back(ArtifactNode{k, kind, size_bytes, {}, {}, false});
    by_key_.emplace(std::move(k), id);
    return id;
}

bool ArtifactGraph::add_child(NodeId parent, NodeId child) {
    if (parent >= nodes_.size() || child >= nodes_.size() || parent == child) return false;
    ArtifactNode& p = nodes_[parent];
    if (p.kind == NodeKind::blob) return false;
    if (std::find(p.children.begin(), p.children.end(), child) != p.children.end()) return true;
    p.children.push_back(child);
    nodes_[child].parents.push_back(parent);
    return true;
}

void ArtifactGraph::mark_root(NodeId id) {
    if (id < nodes_.size()) nodes_[id].root = true;
}

std::optional<NodeId> ArtifactGraph::find(std::string_view key) const {
    auto it = by_key_.find(std::string(key));
    if (it == by_key_.end()) return std::nullopt;
    return it->second;
}

namespace {

// Sum of sizes over the closure of `id`, each node once. `stamp`/`mark` make "visited" O(1)
// without clearing a set per call. Iterative: a hostile graph cannot overflow the stack.
uint64_t closure_bytes(const ArtifactGraph& g, NodeId id, std::vector<uint32_t>& stamp, uint32_t mark) {
    uint64_t total = 0;
    std::vector<NodeId> stack{id};
    stamp[id] = mark;
    while (!stack.empty()) {
        const NodeId n = stack.back();
        stack.pop_back();
        total += g.node(n).size_bytes;
        for (NodeId c : g.node(n).children) {
            if (stamp[c] == mark) continue;
            stamp[c] = mark;
            stack.push_back(c);
        }
    }
    return total;
}

}  // namespace

uint64_t total_bytes(const ArtifactGraph& graph, NodeId id) {
    if (id >= graph.size()) return 0;
    std::vector<uint32_t> stamp(graph.size(), 0);
    return closure_bytes(graph, id, stamp, 1);
}

std::optional<std::vector<NodeId>> start_order(const ArtifactGraph& g) {
    const size_t n = g.size();
    // Children before parents (Kahn): finds cycles, and lets subtree sums be computed in one
    // pass. A node left unprocessed is on, or above, a cycle.
    std::vector<uint32_t> children_left(n);
    std::vector<NodeId> topo;
    topo.reserve(n);
    for (NodeId id = 0; id < n; ++id) {
        children_left[id] = static_cast<uint32_t>(g.node(id).children.size());
        if (children_left[id] == 0) topo.push_back(id);
    }
    for (size_t i = 0; i < topo.size(); ++i)
        for (NodeId p : g.node(topo[i]).parents)
            if (--children_left[p] == 0) topo.push_back(p);
    if (topo.size() != n) return std::nullopt;

    // Orders children: own size plus the children's sums (a node shared by two children counts
    // in both; exact dedup per node would be quadratic on deep graphs).
    std::vector<uint64_t> total(n, 0);
    for (NodeId id : topo) {
        uint64_t t = g.node(id).size_bytes;
        for (NodeId c : g.node(id).children) t = total[c] > UINT64_MAX - t ? UINT64_MAX : t + total[c];
        total[id] = t;
    }

    // Children in visiting order: manifests/indexes by total ascending, then blobs by size
    // descending; ties keep the order they were added (stable sort).
    auto ordered_children = [&](NodeId id) {
        std::vector<NodeId> c = g.node(id).children;
        std::stable_sort(c.begin(), c.end(), [&](NodeId a, NodeId b) {
            const bool a_blob = g.node(a).kind == NodeKind::blob;
            const bool b_blob = g.node(b).kind == NodeKind::blob;
            if (a_blob != b_blob) return !a_blob;
            return a_blob ? total[a] > total[b] : total[a] < total[b];
        });
        return c;
    };

    // Orders roots: each node under the root counted once.
    std::vector<NodeId> roots;
    std::vector<uint64_t> root_total(n, 0);
    std::vector<uint32_t> stamp(n, 0);
    uint32_t mark = 0;
    for (NodeId id = 0; id < n; ++id) {
        if (!g.node(id).root && !g.node(id).parents.empty()) continue;
        roots.push_back(id);
        root_total[id] = closure_bytes(g, id, stamp, ++mark);
    }
    std::stable_sort(roots.begin(), roots.end(), [&](NodeId a, NodeId b) { return root_total[a] < root_total[b]; });

    enum : uint8_t { white, gray, black };
    std::vector<uint8_t> color(n, white);
    std::vector<NodeId> order;
    order.reserve(n);
    struct Frame {
        NodeId id;
        std::vector<NodeId> children;
        size_t next = 0;
    };
    std::vector<Frame> stack;
    // Post-order DFS from each root; a node whose children are all emitted is emitted.
    auto visit = [&](NodeId root) -> bool {
        if (color[root] != white) return true;
        color[root] = gray;
        stack.push_back(Frame{root, ordered_children(root)});
        while (!stack.empty()) {
            Frame& f = stack.back();
            if (f.next < f.children.size()) {
                const NodeId c = f.children[f.next++];
                if (color[c] == gray) return false;  // a cycle (excluded above; kept as a guard)
                if (color[c] == black) continue;
                color[c] = gray;
                stack.push_back(Frame{c, ordered_children(c)});  // invalidates f
                continue;
            }
            color[f.id] = black;
            order.push_back(f.id);
            stack.pop_back();
        }
        return true;
    };
    for (NodeId r : roots)
        if (!visit(r)) return std::nullopt;
    if (order.size() != n) return std::nullopt;  // unreachable without a cycle; a guard
    return order;
}

// ---- ReadyTracker ----

ReadyTracker::ReadyTracker(const ArtifactGraph& graph, std::vector<NodeId> order)
    : graph_(graph),
      position_(graph.size(), 0),
      order_(std::move(order)),
      children_left_(graph.size(), 0),
      state_(graph.size(), State::waiting) {
    assert(order_.size() == graph_.size());
    for (uint32_t pos = 0; pos < order_.size(); ++pos) position_[order_[pos]] = pos;
    for (NodeId id = 0; id < graph_.size(); ++id) {
        children_left_[id] = static_cast<uint32_t>(graph_.node(id).children.size());
        if (children_left_[id] == 0) {
            state_[id] = State::ready;
            ready_.insert(position_[id]);
        }
    }
}

std::optional<NodeId> ReadyTracker::next_ready() {
    if (ready_.empty()) return std::nullopt;
    const NodeId id = order_[*ready_.begin()];
    ready_.erase(ready_.begin());
    state_[id] = State::started;
    return id;
}

void ReadyTracker::on_done(NodeId id) {
    if (id >= state_.size() || state_[id] != State::started) return;  // ignore a double report
    state_[id] = State::done;
    ++settled_;
    for (NodeId p : graph_.node(id).parents) {
        if (--children_left_[p] == 0 && state_[p] == State::waiting) {
            state_[p] = State::ready;
            ready_.insert(position_[p]);
        }
    }
}

std::vector<NodeId> ReadyTracker::on_failed(NodeId id) {
    std::vector<NodeId> blocked;
    if (id >= state_.size() || state_[id] != State::started) return blocked;
    state_[id] = State::failed;
    ++settled_;
    std::vector<NodeId> stack{id};
    while (!stack.empty()) {
        const NodeId n = stack.back();
        stack.pop_back();
        for (NodeId p : graph_.node(n).parents) {
            // A parent that is not waiting was already blocked (a parent cannot be ready,
            // started or done while this child was not done).
            if (state_[p] != State::waiting) continue;
            state_[p] = State::blocked;
            ++settled_;
            blocked.push_back(p);
            stack.push_back(p);
        }
    }
    return blocked;
}

}  // namespace planner
