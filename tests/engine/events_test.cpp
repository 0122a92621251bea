#include "engine/events.h"

#include <gtest/gtest.h>

using engine::below_namespace;
using engine::parse_registry_events;
using engine::RegistryEvent;

namespace {

constexpr const char* kEnvelope = R"({"events": [
  {"id": "e1", "timestamp": "2024-05-01T12:00:00Z", "action": "push",
   "target": {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "size": 10, "digest": "sha256:aa",
              "length": 10, "repository": "team/web", "url": "http://r/v2/team/web/blobs/sha256:aa"}},
  {"id": "e2", "action": "push",
   "target": {"mediaType": "application/vnd.oci.image.manifest.v1+json", "size": 500, "digest": "sha256:bb",
              "repository": "team/web", "url": "http://r/v2/team/web/manifests/sha256:bb", "tag": "v1"}},
  {"id": "e3", "action": "pull",
   "target": {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "sha256:bb",
              "repository": "team/web", "url": "http://r/v2/team/web/manifests/v1", "tag": "v1"}},
  {"id": "e4", "action": "delete", "target": {"digest": "sha256:cc", "repository": "team/api"}},
  {"id": "e5", "action": "push", "target": {"mediaType": "application/vnd.docker.distribution.manifest.list.v2+json",
   "digest": "sha256:dd", "repository": "team/multi", "url": "http://r/v2/team/multi/manifests/sha256:dd"}}
]})";

TEST(RegistryEvents, DistributionEnvelopeKeepsManifestPushesAndDeletes) {
    auto got = parse_registry_events(kEnvelope, "application/vnd.docker.distribution.events.v1+json");
    ASSERT_TRUE(got.ok()) << got.error().message;
    ASSERT_EQ(got->size(), 3u);
    const auto& push = (*got)[0];
    EXPECT_EQ(push.id, "e2");
    EXPECT_EQ(push.action, RegistryEvent::Action::push);
    EXPECT_EQ(push.repository, "team/web");
    EXPECT_EQ(push.tag, "v1");
    EXPECT_EQ(push.digest, "sha256:bb");
    EXPECT_EQ((*got)[1].action, RegistryEvent::Action::remove);
    EXPECT_EQ((*got)[1].repository, "team/api");
    EXPECT_EQ((*got)[2].tag, "");  // pushed by digest (an index child, or a push without a tag)
    EXPECT_EQ((*got)[2].digest, "sha256:dd");
}

TEST(RegistryEvents, V2EnvelopeAndNoContentTypeParseAlike) {
    auto v2 = parse_registry_events(kEnvelope, "application/vnd.docker.distribution.events.v2+json");
    auto none = parse_registry_events(kEnvelope, "");
    ASSERT_TRUE(v2.ok());
    ASSERT_TRUE(none.ok());
    EXPECT_EQ(v2->size(), 3u);
    EXPECT_EQ(none->size(), 3u);
}

TEST(RegistryEvents, HarborPushArtifact) {
    auto got = parse_registry_events(R"({"type": "PUSH_ARTIFACT", "occur_at": 1680501893, "operator": "admin",
        "event_data": {"resources": [{"digest": "sha256:ee", "tag": "latest",
                                      "resource_url": "harbor.example.com/library/nginx:latest"}],
                       "repository": {"name": "nginx", "namespace": "library", "repo_full_name": "library/nginx",
                                      "repo_type": "public"}}})",
                                     "application/json");
    ASSERT_TRUE(got.ok()) << got.error().message;
    ASSERT_EQ(got->size(), 1u);
    EXPECT_EQ((*got)[0].repository, "library/nginx");
    EXPECT_EQ((*got)[0].tag, "latest");
    EXPECT_EQ((*got)[0].digest, "sha256:ee");
    EXPECT_FALSE((*got)[0].id.empty());
    // The same payload delivered again has the same id (de-duplicated by the store).
    auto again = parse_registry_events(R"({"type": "PUSH_ARTIFACT", "occur_at": 1680501893,
        "event_data": {"resources": [{"digest": "sha256:ee", "tag": "latest"}],
                       "repository": {"repo_full_name": "library/nginx"}}})",
                                       "application/json");
    ASSERT_TRUE(again.ok());
    EXPECT_EQ((*again)[0].id, (*got)[0].id);
    // Other Harbor events carry nothing to sync.
    auto scan = parse_registry_events(R"({"type": "SCANNING_COMPLETED", "event_data": {}})", "application/json");
    ASSERT_TRUE(scan.ok());
    EXPECT_TRUE(scan->empty());
}

TEST(RegistryEvents, BadBodiesAreErrors) {
    EXPECT_FALSE(parse_registry_events("not json", "").ok());
    EXPECT_FALSE(parse_registry_events("[1,2]", "").ok());
    EXPECT_FALSE(parse_registry_events(R"({"hello": 1})", "").ok());
    EXPECT_FALSE(parse_registry_events(R"({"events": 3})", "").ok());
    EXPECT_FALSE(parse_registry_events(R"({"type": "PUSH_ARTIFACT", "event_data": {"resources": []}})", "").ok());
    // Odd members are skipped, never fatal.
    auto odd = parse_registry_events(R"({"events": [1, "x", {"action": "push"}, {"action": "push", "target": 7}]})", "");
    ASSERT_TRUE(odd.ok());
    EXPECT_TRUE(odd->empty());
}

TEST(RegistryEvents, BelowNamespace) {
    EXPECT_EQ(below_namespace("team/web", "team"), "web");
    EXPECT_EQ(below_namespace("team/a/b", "team"), "a/b");
    EXPECT_EQ(below_namespace("team/web", ""), "team/web");
    EXPECT_FALSE(below_namespace("teamx/web", "team").has_value());
    EXPECT_FALSE(below_namespace("team", "team").has_value());
    EXPECT_FALSE(below_namespace("other/web", "team").has_value());
}

}  // namespace
