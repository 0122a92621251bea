// The order in which the artifacts of a run are started, and when each may go.
//
// Invariant 2 of DESIGN.md: a manifest is pushed only after every blob and child manifest it
// references exists on the target; an index after its children. Within that constraint the
// order is chosen so that many images complete early (a user waiting for "is my image there
// yet" is served by finishing images, not by moving bytes):
//  - images (roots) by their total bytes, smallest first: the total of a root counts each blob
//    and manifest under it once, computed once up front (blobs shared with an earlier root are
//    not discounted). A root is a node nothing references, or one marked with mark_root();
//  - under a node: child manifests and indexes first, smallest first (by own size plus their
//    children's totals; a blob shared by two children counts in both), then its blobs, largest
//    first: the node may go when its last child is done, and with children running in
//    parallel, starting the longest first ends the set soonest (LPT);
//  - every node exactly once, however many parents share it, after all of its children.
//
// Use: build an ArtifactGraph from the parsed manifests (one node per digest), compute
// start_order(), hand both to a ReadyTracker and start what next_ready() returns, reporting
// on_done()/on_failed(). start_order() alone is also a valid sequential order: a node comes after
// all its children.
//
// Threading: plain values; one thread at a time.
#pragma once

#include <cstdint>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace planner {

enum class NodeKind { blob, manifest, index };

using NodeId = uint32_t;

struct ArtifactNode {
    std::string key;  // the digest (any unique string)
    NodeKind kind = NodeKind::blob;
    uint64_t size_bytes = 0;
    std::vector<NodeId> children;  // what it references, in the order added, no duplicates
    std::vector<NodeId> parents;
    bool root = false;  // asked for by name (a tag), whether or not something references it
};

class ArtifactGraph {
public:
    // Adds a node, or returns the node already added under `key` (its kind and size are kept
    // from the first call). nullopt if `key` exists with a different kind: the input says the
    // same digest is both, which a caller should report.
    std::optional<NodeId> add_node(std::string_view key, NodeKind kind, uint64_t size_bytes);
    // `parent` references `child`. false (and nothing added) if either id is unknown, the parent
    // is a blob, or parent == child. Adding the same edge twice is a no-op that returns true.
    bool add_child(NodeId parent, NodeId child);
    // Marks a node as asked for; nodes that nothing references are roots anyway.
    void mark_root(NodeId id);

    std::optional<NodeId> find(std::string_view key) const;
    const ArtifactNode& node(NodeId id) const { return nodes_.at(id); }
    size_t size() const noexcept { return nodes_.size(); }

private:
    std::vector<ArtifactNode> nodes_;
    std::unordered_map<std::string, NodeId> by_key_;
};

// Every node of `graph` once, each after all of its children, in the order described above.
// O(nodes + edges) plus, per root, the size of what is under it. nullopt if the graph has a cycle: content addressing makes a real one impossible, so a cycle
// means the input (or the caller) is wrong.
std::optional<std::vector<NodeId>> start_order(const ArtifactGraph& graph);

// The bytes under a node: its own size plus every node reachable from it, each counted once.
uint64_t total_bytes(const ArtifactGraph& graph, NodeId id);

// Hands out nodes when they may start: a node is ready when every child is done. Among ready
// nodes, the one earliest in `order` goes first. A node whose child failed is blocked, and so is
// everything above it: it is never handed out.
class ReadyTracker {
public:
    // `order` must be a permutation of the graph's nodes (start_order()'s result); the graph
    // must outlive the tracker and not change.
    ReadyTracker(const ArtifactGraph& graph, std::vector<NodeId> order);

    // The next ready node, now counted as started; nullopt if none is ready right now.
    std::optional<NodeId> next_ready();
    // A started node finished: parents whose last child this was become ready.
    void on_done(NodeId id);
    // A started node failed: it and every node above it are blocked. Returns the newly blocked
    // ancestors (not `id` itself), so the caller can log "not pushed: child failed".
    std::vector<NodeId> on_failed(NodeId id);

    // Every node is done, failed or blocked.
    bool finished() const noexcept { return settled_ == state_.size(); }
    bool is_done(NodeId id) const { return state_.at(id) == State::done; }
    bool is_blocked(NodeId id) const { return state_.at(id) == State::blocked; }

private:
    enum class State : uint8_t { waiting, ready, started, done, failed, blocked };

    const ArtifactGraph& graph_;
    std::vector<uint32_t> position_;        // by node: its index in the order
    std::vector<NodeId> order_;
    std::vector<uint32_t> children_left_;   // by node: children not yet done
    std::vector<State> state_;
    std::set<uint32_t> ready_;              // positions of ready nodes
    size_t settled_ = 0;                    // done + failed + blocked
};

}  // namespace planner
