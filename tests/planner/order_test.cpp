#include "planner/order.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <string>

using planner::ArtifactGraph;
using planner::NodeId;
using planner::NodeKind;
using planner::ReadyTracker;
using planner::start_order;

namespace {

constexpr uint64_t kMiB = 1024 * 1024;

NodeId add(ArtifactGraph& g, const std::string& key, NodeKind kind, uint64_t size) {
    const auto id = g.add_node(key, kind, size);
    EXPECT_TRUE(id.has_value()) << key;
    return *id;
}

// An image: a manifest with a config blob and layers.
NodeId image(ArtifactGraph& g, const std::string& name, std::initializer_list<std::pair<std::string, uint64_t>> layers) {
    const NodeId m = add(g, name, NodeKind::manifest, 1000);
    EXPECT_TRUE(g.add_child(m, add(g, name + "-config", NodeKind::blob, 500)));
    for (const auto& [key, size] : layers) EXPECT_TRUE(g.add_child(m, add(g, key, NodeKind::blob, size)));
    return m;
}

std::map<NodeId, size_t> positions(const std::vector<NodeId>& order) {
    std::map<NodeId, size_t> pos;
    for (size_t i = 0; i < order.size(); ++i) pos[order[i]] = i;
    return pos;
}

// Invariant 2: every node after all of its children, each node exactly once.
void expect_children_first(const ArtifactGraph& g, const std::vector<NodeId>& order) {
    ASSERT_EQ(order.size(), g.size());
    const auto pos = positions(order);
    ASSERT_EQ(pos.size(), g.size());
    for (NodeId id = 0; id < g.size(); ++id)
        for (NodeId c : g.node(id).children) EXPECT_LT(pos.at(c), pos.at(id)) << g.node(c).key << " before " << g.node(id).key;
}

TEST(ArtifactGraph, DeduplicatesByKeyAndChecksEdges) {
    ArtifactGraph g;
    const NodeId a = add(g, "sha256:a", NodeKind::blob, 10);
    EXPECT_EQ(g.add_node("sha256:a", NodeKind::blob, 999), a);  // same digest, same node
    EXPECT_EQ(g.node(a).size_bytes, 10u);
    EXPECT_FALSE(g.add_node("sha256:a", NodeKind::manifest, 10).has_value());  // conflicting kind
    const NodeId m = add(g, "sha256:m", NodeKind::manifest, 100);
    EXPECT_TRUE(g.add_child(m, a));
    EXPECT_TRUE(g.add_child(m, a));  // no-op
    EXPECT_EQ(g.node(m).children.size(), 1u);
    EXPECT_FALSE(g.add_child(a, m));  // a blob references nothing
    EXPECT_FALSE(g.add_child(m, m));
    EXPECT_FALSE(g.add_child(m, 42));
    EXPECT_EQ(g.find("sha256:m"), m);
    EXPECT_FALSE(g.find("sha256:x").has_value());
    EXPECT_EQ(planner::total_bytes(g, m), 110u);
}

TEST(StartOrder, BlobsBeforeManifestIndexAfterChildren) {
    ArtifactGraph g;
    const NodeId amd = image(g, "amd64", {{"l1", 50 * kMiB}, {"l2", 5 * kMiB}});
    const NodeId arm = image(g, "arm64", {{"l1", 50 * kMiB}, {"l3", 7 * kMiB}});  // shares l1
    const NodeId idx = add(g, "index", NodeKind::index, 800);
    g.add_child(idx, amd);
    g.add_child(idx, arm);
    const auto order = start_order(g);
    ASSERT_TRUE(order.has_value());
    expect_children_first(g, *order);
    EXPECT_EQ(order->back(), idx);
}

TEST(StartOrder, SmallImagesFirstLargestBlobFirstWithinAnImage) {
    ArtifactGraph g;
    const NodeId big = image(g, "big", {{"b1", 900 * kMiB}, {"b2", 100 * kMiB}});
    const NodeId small = image(g, "small", {{"s1", 1 * kMiB}, {"s2", 3 * kMiB}});
    const NodeId mid = image(g, "mid", {{"m1", 20 * kMiB}});
    const auto order = start_order(g);
    ASSERT_TRUE(order.has_value());
    expect_children_first(g, *order);
    const auto pos = positions(*order);
    EXPECT_LT(pos.at(small), pos.at(mid));
    EXPECT_LT(pos.at(mid), pos.at(big));
    EXPECT_LT(pos.at(small), pos.at(*g.find("m1")));  // the whole small image before mid starts
    // Within an image: the largest blob starts first.
    EXPECT_LT(pos.at(*g.find("s2")), pos.at(*g.find("s1")));
    EXPECT_LT(pos.at(*g.find("b1")), pos.at(*g.find("b2")));
    EXPECT_LT(pos.at(*g.find("b1")), pos.at(*g.find("big-config")));
}

TEST(StartOrder, IndexChildrenSmallestFirstAndSharedBlobsOnce) {
    ArtifactGraph g;
    const NodeId idx = add(g, "index", NodeKind::index, 800);
    const NodeId heavy = image(g, "heavy", {{"shared", 10 * kMiB}, {"h", 200 * kMiB}});
    const NodeId light = image(g, "light", {{"shared", 10 * kMiB}});
    g.add_child(idx, heavy);
    g.add_child(idx, light);
    const auto order = start_order(g);
    ASSERT_TRUE(order.has_value());
    expect_children_first(g, *order);
    const auto pos = positions(*order);
    EXPECT_LT(pos.at(light), pos.at(*g.find("h")));
    EXPECT_EQ(std::count(order->begin(), order->end(), *g.find("shared")), 1);
    // The index's total counts the shared blob once.
    EXPECT_EQ(planner::total_bytes(g, idx), 800u + 2 * 1000 + 2 * 500 + 10 * kMiB + 200 * kMiB);
}

TEST(StartOrder, ATaggedChildIsARootToo) {
    ArtifactGraph g;
    const NodeId big = image(g, "big", {{"b", 500 * kMiB}});
    const NodeId idx = add(g, "index", NodeKind::index, 800);
    const NodeId tagged = image(g, "tagged", {{"t", 1 * kMiB}});
    g.add_child(idx, big);
    g.add_child(idx, tagged);
    g.mark_root(tagged);
    const auto order = start_order(g);
    ASSERT_TRUE(order.has_value());
    expect_children_first(g, *order);
    EXPECT_LT(positions(*order).at(tagged), positions(*order).at(*g.find("b")));
}

TEST(StartOrder, CyclesAreRefused) {
    ArtifactGraph g;
    const NodeId a = add(g, "a", NodeKind::index, 1);
    const NodeId b = add(g, "b", NodeKind::index, 1);
    g.add_child(a, b);
    g.add_child(b, a);  // unreachable from any root
    EXPECT_FALSE(start_order(g).has_value());

    ArtifactGraph h;
    const NodeId r = add(h, "r", NodeKind::index, 1);
    const NodeId x = add(h, "x", NodeKind::index, 1);
    const NodeId y = add(h, "y", NodeKind::index, 1);
    h.add_child(r, x);
    h.add_child(x, y);
    h.add_child(y, x);  // reachable from the root
    EXPECT_FALSE(start_order(h).has_value());
}

TEST(StartOrder, DeepChainsDoNotRecurse) {
    ArtifactGraph g;
    NodeId prev = add(g, "leaf", NodeKind::blob, 1);
    for (int i = 0; i < 200000; ++i) {
        // std::to_string alone: gcc 12 -O3 gives a false -Wrestrict on "n" + std::to_string(i)
        // (GCC bug 105329).
        const NodeId n = add(g, std::to_string(i), NodeKind::index, 1);
        g.add_child(n, prev);
        prev = n;
    }
    const auto order = start_order(g);
    ASSERT_TRUE(order.has_value());
    EXPECT_EQ(order->back(), prev);
}

TEST(StartOrder, EmptyGraph) {
    ArtifactGraph g;
    const auto order = start_order(g);
    ASSERT_TRUE(order.has_value());
    EXPECT_TRUE(order->empty());
}

TEST(ReadyTracker, HandsOutNodesOnlyWhenTheirChildrenAreDone) {
    ArtifactGraph g;
    const NodeId amd = image(g, "amd64", {{"l1", 50 * kMiB}});
    const NodeId arm = image(g, "arm64", {{"l1", 50 * kMiB}, {"l2", 5 * kMiB}});
    const NodeId idx = add(g, "index", NodeKind::index, 800);
    g.add_child(idx, amd);
    g.add_child(idx, arm);
    const auto order = start_order(g);
    ASSERT_TRUE(order.has_value());
    ReadyTracker t(g, *order);

    // All four blobs are ready at once, in start order; no manifest yet.
    std::vector<NodeId> first;
    while (auto n = t.next_ready()) first.push_back(*n);
    ASSERT_EQ(first.size(), 4u);
    for (NodeId n : first) EXPECT_EQ(g.node(n).kind, NodeKind::blob);
    const auto pos = positions(*order);
    EXPECT_TRUE(std::is_sorted(first.begin(), first.end(), [&](NodeId a, NodeId b) { return pos.at(a) < pos.at(b); }));

    t.on_done(*g.find("l1"));
    EXPECT_FALSE(t.next_ready().has_value());
    t.on_done(*g.find("amd64-config"));
    EXPECT_EQ(t.next_ready(), amd);  // all its blobs are done; arm64 still waits for l2
    EXPECT_FALSE(t.next_ready().has_value());
    t.on_done(*g.find("l2"));
    t.on_done(*g.find("arm64-config"));
    EXPECT_EQ(t.next_ready(), arm);
    t.on_done(amd);
    EXPECT_FALSE(t.next_ready().has_value());  // the index waits for both
    t.on_done(arm);
    EXPECT_EQ(t.next_ready(), idx);
    EXPECT_FALSE(t.finished());
    t.on_done(idx);
    EXPECT_TRUE(t.finished());
}

TEST(ReadyTracker, AFailedBlobBlocksEverythingAboveIt) {
    ArtifactGraph g;
    const NodeId amd = image(g, "amd64", {{"bad", 50 * kMiB}});
    const NodeId arm = image(g, "arm64", {{"ok", 5 * kMiB}});
    const NodeId idx = add(g, "index", NodeKind::index, 800);
    g.add_child(idx, amd);
    g.add_child(idx, arm);
    ReadyTracker t(g, *start_order(g));
    while (auto n = t.next_ready()) {
        if (g.node(*n).key == "bad") {
            const auto blocked = t.on_failed(*n);
            EXPECT_EQ(blocked.size(), 2u);  // amd64 and the index
            EXPECT_TRUE(t.is_blocked(amd));
            EXPECT_TRUE(t.is_blocked(idx));
        } else {
            t.on_done(*n);
        }
    }
    EXPECT_TRUE(t.is_done(arm));  // the other image still completes
    EXPECT_TRUE(t.finished());
    t.on_done(idx);  // a report for a node never handed out is ignored
    EXPECT_TRUE(t.is_blocked(idx));
}

}  // namespace
