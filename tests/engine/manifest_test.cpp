#include "engine/manifest.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <memory>

#include <nlohmann/json.hpp>

#include "cas/digest.h"

namespace {

using engine::Manifest;
using engine::parse_manifest;

const std::string kD1 = "sha256:" + std::string(64, '1');
const std::string kD2 = "sha256:" + std::string(64, '2');
const std::string kD3 = "sha256:" + std::string(64, '3');
const std::string kD4 = "sha256:" + std::string(64, '4');

std::string oci_image() {
    return R"({
  "schemaVersion": 2,
  "mediaType": "application/vnd.oci.image.manifest.v1+json",
  "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": ")" + kD1 + R"(", "size": 7023},
  "layers": [
    {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": ")" + kD2 + R"(", "size": 32654},
    {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": ")" + kD3 + R"(", "size": 16724,
     "annotations": {"a": "b"}},
    {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": ")" + kD4 + R"(", "size": 73109}
  ],
  "annotations": {"com.example.key1": "value1"}
})";
}

std::string docker_image() {
    return R"({
  "schemaVersion": 2,
  "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
  "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "size": 1470, "digest": ")" +
           kD1 + R"("},
  "layers": [
    {"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "size": 2818413, "digest": ")" + kD2 + R"("},
    {"mediaType": "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip", "size": 1, "digest": ")" + kD3 +
           R"(", "urls": ["https://example.com/layer"]}
  ]
})";
}

std::string docker_list() {
    return R"({
  "schemaVersion": 2,
  "mediaType": "application/vnd.docker.distribution.manifest.list.v2+json",
  "manifests": [
    {"mediaType": "application/vnd.docker.distribution.manifest.v2+json", "size": 7143, "digest": ")" + kD1 +
           R"(", "platform": {"architecture": "ppc64le", "os": "linux"}},
    {"mediaType": "application/vnd.docker.distribution.manifest.v2+json", "size": 7682, "digest": ")" + kD2 +
           R"(", "platform": {"architecture": "arm", "os": "linux", "variant": "v7", "features": ["sse4"]}}
  ]
})";
}

std::string oci_index() {
    return R"({
  "schemaVersion": 2,
  "mediaType": "application/vnd.oci.image.index.v1+json",
  "manifests": [
    {"mediaType": "application/vnd.oci.image.manifest.v1+json", "size": 7143, "digest": ")" + kD1 +
           R"(", "platform": {"architecture": "amd64", "os": "linux"}},
    {"mediaType": "application/vnd.oci.image.manifest.v1+json", "size": 566, "digest": ")" + kD2 +
           R"(", "annotations": {"vnd.docker.reference.type": "attestation-manifest"},
     "platform": {"architecture": "unknown", "os": "unknown"}},
    {"mediaType": "application/vnd.oci.image.index.v1+json", "size": 10, "digest": ")" + kD3 + R"("}
  ]
})";
}

// As pushed by helm 3.x: no mediaType field.
std::string helm_chart() {
    return R"({"schemaVersion":2,"config":{"mediaType":"application/vnd.cncf.helm.config.v1+json","digest":")" +
           kD1 +
           R"(","size":117},"layers":[{"mediaType":"application/vnd.cncf.helm.chart.content.v1.tar+gzip","digest":")" +
           kD2 + R"(","size":3614}],"annotations":{"org.opencontainers.image.title":"mychart"}})";
}

std::string artifact() {
    return R"({
  "schemaVersion": 2,
  "mediaType": "application/vnd.oci.image.manifest.v1+json",
  "artifactType": "application/vnd.example.sbom.v1",
  "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a", "size": 2, "data": "e30="},
  "layers": [{"mediaType": "application/vnd.example.sbom.v1+json", "digest": ")" + kD2 + R"(", "size": 1234}],
  "subject": {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": ")" + kD3 + R"(", "size": 1000}
})";
}

Manifest must_parse(const std::string& body, std::string_view ct) {
    auto r = parse_manifest(body, ct);
    EXPECT_TRUE(r.ok()) << (r.ok() ? "" : r.error().message);
    return r.ok() ? r.value() : Manifest{};
}

std::string must_fail(const std::string& body, std::string_view ct) {
    auto r = parse_manifest(body, ct);
    EXPECT_FALSE(r.ok()) << "accepted: " << body.substr(0, 200);
    if (r.ok()) return {};
    EXPECT_EQ(r.error().message.rfind("manifest: ", 0), 0u) << r.error().message;
    return r.error().message;
}

#define EXPECT_HAS(haystack, needle) \
    EXPECT_NE(std::string(haystack).find(needle), std::string::npos) << "'" << (haystack) << "' lacks '" << (needle) << "'"

TEST(Manifest, AcceptHeader) {
    const std::string h = engine::manifest_accept_header();
    EXPECT_HAS(h, engine::kOciManifest);
    EXPECT_HAS(h, engine::kOciIndex);
    EXPECT_HAS(h, engine::kDockerManifest);
    EXPECT_HAS(h, engine::kDockerManifestList);
    EXPECT_EQ(h.find("v1+prettyjws"), std::string::npos);
    EXPECT_EQ(h.find('\n'), std::string::npos);
}

TEST(Manifest, OciImage) {
    const auto m = must_parse(oci_image(), engine::kOciManifest);
    EXPECT_EQ(m.media_type, engine::kOciManifest);
    EXPECT_EQ(m.kind, engine::ManifestKind::image);
    EXPECT_EQ(m.type, engine::ArtifactType::image);
    EXPECT_EQ(m.config.digest, kD1);
    EXPECT_EQ(m.config.size, 7023u);
    EXPECT_EQ(m.config.media_type, engine::kOciImageConfig);
    ASSERT_EQ(m.layers.size(), 3u);
    EXPECT_EQ(m.layers[1].digest, kD3);
    EXPECT_TRUE(m.layers[1].platform.empty());
    EXPECT_TRUE(m.manifests.empty());
    EXPECT_FALSE(m.subject);
    EXPECT_EQ(engine::blob_bytes(m), 7023u + 32654u + 16724u + 73109u);
    const auto blobs = engine::blobs_of(m);
    ASSERT_EQ(blobs.size(), 4u);
    EXPECT_EQ(blobs[0].digest, kD1);
    EXPECT_EQ(blobs[3].digest, kD4);
    EXPECT_EQ(engine::effective_artifact_type(m), engine::kOciImageConfig);
}

TEST(Manifest, DockerImageAndList) {
    const auto m = must_parse(docker_image(), engine::kDockerManifest);
    EXPECT_EQ(m.media_type, engine::kDockerManifest);
    EXPECT_EQ(m.kind, engine::ManifestKind::image);
    ASSERT_EQ(m.layers.size(), 2u);

    const auto l = must_parse(docker_list(), engine::kDockerManifestList);
    EXPECT_EQ(l.kind, engine::ManifestKind::index);
    EXPECT_EQ(l.type, engine::ArtifactType::image);
    ASSERT_EQ(l.manifests.size(), 2u);
    EXPECT_EQ(l.manifests[0].platform, "linux/ppc64le");
    EXPECT_EQ(l.manifests[1].platform, "linux/arm/v7");
    EXPECT_TRUE(engine::blobs_of(l).empty());
    EXPECT_EQ(engine::blob_bytes(l), 0u);
}

TEST(Manifest, OciIndex) {
    const auto m = must_parse(oci_index(), engine::kOciIndex);
    EXPECT_EQ(m.kind, engine::ManifestKind::index);
    ASSERT_EQ(m.manifests.size(), 3u);
    EXPECT_EQ(m.manifests[0].platform, "linux/amd64");
    EXPECT_EQ(m.manifests[1].platform, "unknown/unknown");
    EXPECT_EQ(m.manifests[2].platform, "");
    EXPECT_EQ(m.manifests[2].media_type, engine::kOciIndex);
}

TEST(Manifest, HelmChartWithoutMediaTypeField) {
    const auto m = must_parse(helm_chart(), engine::kOciManifest);
    EXPECT_EQ(m.type, engine::ArtifactType::helm);
    EXPECT_EQ(m.media_type, engine::kOciManifest);
    EXPECT_EQ(engine::blob_bytes(m), 117u + 3614u);
    // Inferred from the shape when the registry says nothing useful.
    const auto g = must_parse(helm_chart(), "application/octet-stream");
    EXPECT_EQ(g.media_type, engine::kOciManifest);
    EXPECT_EQ(g.type, engine::ArtifactType::helm);
}

TEST(Manifest, ArtifactWithEmptyConfigAndSubject) {
    const auto m = must_parse(artifact(), engine::kOciManifest);
    EXPECT_EQ(m.type, engine::ArtifactType::image);
    EXPECT_EQ(m.artifact_type, "application/vnd.example.sbom.v1");
    EXPECT_EQ(m.config.media_type, engine::kOciEmpty);
    EXPECT_EQ(m.config.size, 2u);
    ASSERT_TRUE(m.subject);
    EXPECT_EQ(m.subject->digest, kD3);
    EXPECT_EQ(engine::effective_artifact_type(m), "application/vnd.example.sbom.v1");
    EXPECT_EQ(engine::blobs_of(m).size(), 2u);  // the empty config is still a blob to copy

    // Artifact with no layers at all.
    auto j = nlohmann::json::parse(artifact());
    j["layers"] = nlohmann::json::array();
    const auto e = must_parse(j.dump(), engine::kOciManifest);
    EXPECT_TRUE(e.layers.empty());
    EXPECT_EQ(engine::blob_bytes(e), 2u);
}

TEST(Manifest, ContentTypeHandling) {
    // Parameters and case are ignored.
    EXPECT_EQ(must_parse(oci_image(), "Application/VND.oci.image.manifest.v1+json; charset=utf-8").media_type,
              engine::kOciManifest);
    // Generic types: the mediaType field decides.
    for (const char* ct : {"", "application/json", "application/octet-stream", "application/json; charset=utf-8",
                           "text/plain"}) {
        EXPECT_EQ(must_parse(docker_list(), ct).media_type, engine::kDockerManifestList) << ct;
        EXPECT_EQ(must_parse(docker_image(), ct).media_type, engine::kDockerManifest) << ct;
    }
    // Generic type, no mediaType field: inferred from the shape.
    auto idx = nlohmann::json::parse(oci_index());
    idx.erase("mediaType");
    EXPECT_EQ(must_parse(idx.dump(), "").media_type, engine::kOciIndex);
    auto img = nlohmann::json::parse(oci_image());
    img.erase("mediaType");
    EXPECT_EQ(must_parse(img.dump(), "application/json").media_type, engine::kOciManifest);
    // But a specific Content-Type without the field is fine too.
    EXPECT_EQ(must_parse(idx.dump(), engine::kOciIndex).kind, engine::ManifestKind::index);
    EXPECT_TRUE(engine::is_index_media_type("application/vnd.oci.image.index.v1+json; x=y"));
    EXPECT_TRUE(engine::is_index_media_type(engine::kDockerManifestList));
    EXPECT_FALSE(engine::is_index_media_type(engine::kOciManifest));
    EXPECT_TRUE(engine::is_image_manifest_media_type(engine::kDockerManifest));
}

TEST(Manifest, Schema1IsRefused) {
    const std::string schema1 = R"({"schemaVersion":1,"name":"x","tag":"latest","architecture":"amd64",
        "fsLayers":[{"blobSum":")" + kD1 + R"("}],"history":[],"signatures":[]})";
    EXPECT_HAS(must_fail(schema1, engine::kDockerSchema1Signed), "Docker schema1 manifests are not supported");
    EXPECT_HAS(must_fail(schema1, engine::kDockerSchema1), "Docker schema1 manifests are not supported");
    EXPECT_HAS(must_fail(schema1, "application/json"), "Docker schema1 manifests are not supported");
    EXPECT_HAS(must_fail(schema1, ""), "Docker schema1 manifests are not supported");
    EXPECT_HAS(must_fail("not even json", engine::kDockerSchema1Signed), "schema1");
    EXPECT_HAS(must_fail(R"({"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v1+prettyjws"})",
                         ""),
               "schema1");
}

TEST(Manifest, Disagreement) {
    EXPECT_HAS(must_fail(docker_image(), engine::kOciManifest), "disagrees with the Content-Type");
    EXPECT_HAS(must_fail(oci_index(), engine::kOciManifest), "disagrees");
    EXPECT_HAS(must_fail(oci_image(), engine::kOciIndex), "disagrees");
}

TEST(Manifest, Unsupported) {
    EXPECT_HAS(must_fail(oci_image(), "text/html"), "unsupported media type 'text/html'");
    EXPECT_HAS(must_fail(oci_image(), "application/vnd.oci.artifact.manifest.v1+json"), "unsupported media type");
    auto j = nlohmann::json::parse(oci_image());
    j["mediaType"] = "application/vnd.example+json";
    EXPECT_HAS(must_fail(j.dump(), ""), "unsupported media type 'application/vnd.example+json'");
    EXPECT_HAS(must_fail(R"({"schemaVersion":2})", ""), "cannot tell the manifest type");
    EXPECT_HAS(must_fail(R"({"schemaVersion":3,"manifests":[]})", ""), "schemaVersion 3 is not supported");
    EXPECT_HAS(must_fail(R"({"manifests":[]})", ""), "schemaVersion is missing");
    EXPECT_HAS(must_fail(R"({"schemaVersion":"2","manifests":[]})", ""), "schemaVersion is a string");
}

TEST(Manifest, JsonErrors) {
    EXPECT_HAS(must_fail("", engine::kOciManifest), "empty");
    EXPECT_HAS(must_fail("{", engine::kOciManifest), "not valid JSON");
    EXPECT_HAS(must_fail("{\"schemaVersion\": 2,}", engine::kOciManifest), "not valid JSON");
    EXPECT_HAS(must_fail("[]", engine::kOciManifest), "not a JSON object");
    EXPECT_HAS(must_fail("null", ""), "not a JSON object");
    EXPECT_HAS(must_fail("\"x\"", ""), "not a JSON object");
    EXPECT_HAS(must_fail(std::string("{\"a\":\"\xff\"}"), ""), "not valid JSON");  // invalid UTF-8
    EXPECT_HAS(must_fail(oci_image() + "garbage", engine::kOciManifest), "not valid JSON");
}

std::string with(const std::string& base, const std::function<void(nlohmann::json&)>& edit) {
    auto j = nlohmann::json::parse(base);
    edit(j);
    return j.dump();
}

TEST(Manifest, FieldErrorsNameTheField) {
    using J = nlohmann::json;
    const auto ct = engine::kOciManifest;
    EXPECT_HAS(must_fail(with(oci_image(), [](J& j) { j["layers"][2]["digest"] = "sha256:xyz"; }), ct),
               "manifest: layers[2].digest is not a valid digest: 'sha256:xyz'");
    EXPECT_HAS(must_fail(with(oci_image(), [](J& j) { j["layers"][0].erase("digest"); }), ct),
               "layers[0].digest is missing");
    EXPECT_HAS(must_fail(with(oci_image(), [](J& j) { j["layers"][1]["digest"] = 5; }), ct),
               "layers[1].digest is a number, not a string");
    EXPECT_HAS(must_fail(with(oci_image(), [](J& j) { j["layers"][1]["size"] = -1; }), ct),
               "layers[1].size is negative: -1");
    EXPECT_HAS(must_fail(with(oci_image(), [](J& j) { j["layers"][1]["size"] = 1.5; }), ct),
               "layers[1].size 1.5 is not an integer");
    EXPECT_HAS(must_fail(with(oci_image(), [](J& j) { j["layers"][1]["size"] = "12"; }), ct),
               "layers[1].size is a string, not an integer");
    EXPECT_HAS(must_fail(with(oci_image(), [](J& j) { j["layers"][1].erase("size"); }), ct), "layers[1].size is missing");
    EXPECT_HAS(must_fail(with(oci_image(), [](J& j) { j["layers"][1]["size"] = nullptr; }), ct),
               "layers[1].size is null");
    EXPECT_HAS(must_fail(with(oci_image(), [](J& j) { j["layers"][0].erase("mediaType"); }), ct),
               "layers[0].mediaType is missing");
    EXPECT_HAS(must_fail(with(oci_image(), [](J& j) { j["layers"][0]["mediaType"] = "no slash"; }), ct),
               "layers[0].mediaType is not a valid media type");
    EXPECT_HAS(must_fail(with(oci_image(), [](J& j) { j["layers"][0] = 3; }), ct), "layers[0] is a number");
    EXPECT_HAS(must_fail(with(oci_image(), [](J& j) { j["layers"][0]["urls"] = "x"; }), ct), "layers[0].urls is a string");
    EXPECT_HAS(must_fail(with(oci_image(), [](J& j) { j["layers"][0]["urls"] = {1}; }), ct), "layers[0].urls[0]");
    EXPECT_HAS(must_fail(with(oci_image(), [](J& j) { j["layers"][0]["annotations"] = {{"k", 1}}; }), ct),
               "layers[0].annotations['k'] is a number");
    EXPECT_HAS(must_fail(with(oci_image(), [](J& j) { j["layers"][0]["artifactType"] = 1; }), ct),
               "layers[0].artifactType is a number");
    EXPECT_HAS(must_fail(with(oci_image(), [](J& j) { j.erase("layers"); }), ct), "layers is missing");
    EXPECT_HAS(must_fail(with(oci_image(), [](J& j) { j["layers"] = J::object(); }), ct), "layers is an object");
    EXPECT_HAS(must_fail(with(oci_image(), [](J& j) { j.erase("config"); }), ct), "config is missing");
    EXPECT_HAS(must_fail(with(oci_image(), [](J& j) { j["config"]["digest"] = "md5:"; }), ct), "config.digest");
    EXPECT_HAS(must_fail(with(oci_image(), [](J& j) { j["subject"] = {{"digest", "x"}}; }), ct),
               "subject.mediaType is missing");
    EXPECT_HAS(must_fail(with(oci_image(), [](J& j) { j["artifactType"] = true; }), ct), "artifactType is a boolean");
    EXPECT_HAS(must_fail(with(oci_image(), [](J& j) { j["artifactType"] = "bad"; }), ct),
               "artifactType is not a valid media type");
    EXPECT_HAS(must_fail(with(oci_image(), [](J& j) { j["annotations"] = J::array(); }), ct), "annotations is an array");
    EXPECT_HAS(must_fail(with(oci_image(), [](J& j) { j["mediaType"] = 7; }), ct), "mediaType is a number");
    EXPECT_HAS(must_fail(with(oci_image(), [](J& j) { j["mediaType"] = ""; }), ct), "mediaType is empty");

    const auto ict = engine::kOciIndex;
    EXPECT_HAS(must_fail(with(oci_index(), [](J& j) { j.erase("manifests"); }), ict), "manifests is missing");
    EXPECT_HAS(must_fail(with(oci_index(), [](J& j) { j["manifests"] = "x"; }), ict), "manifests is a string");
    EXPECT_HAS(must_fail(with(oci_index(), [](J& j) { j["manifests"][1]["size"] = -5; }), ict),
               "manifests[1].size is negative");
    EXPECT_HAS(must_fail(with(oci_index(), [](J& j) { j["manifests"][0]["platform"].erase("os"); }), ict),
               "manifests[0].platform.os is missing");
    EXPECT_HAS(must_fail(with(oci_index(), [](J& j) { j["manifests"][0]["platform"]["architecture"] = 1; }), ict),
               "manifests[0].platform.architecture is a number");
    EXPECT_HAS(must_fail(with(oci_index(), [](J& j) { j["manifests"][0]["platform"] = "linux/amd64"; }), ict),
               "manifests[0].platform is a string");
}

TEST(Manifest, Sizes) {
    const auto ct = engine::kOciManifest;
    const auto edit = [](const char* size) {
        std::string s = oci_image();
        const auto p = s.find("7023");
        return s.replace(p, 4, size);
    };
    EXPECT_EQ(must_parse(edit("0"), ct).config.size, 0u);
    EXPECT_EQ(must_parse(edit("18446744073709551615"), ct).config.size, 18446744073709551615ull);
    EXPECT_HAS(must_fail(edit("18446744073709551616"), ct), "does not fit in 64 bits");
    EXPECT_HAS(must_fail(edit("1e3"), ct), "is not an integer");
    EXPECT_HAS(must_fail(edit("7.0"), ct), "is not an integer");
    EXPECT_HAS(must_fail(edit("-0.5"), ct), "is not an integer");
    EXPECT_HAS(must_fail(edit("-9223372036854775808"), ct), "negative");
    // -0 is an integer zero in JSON.
    EXPECT_EQ(must_parse(edit("-0"), ct).config.size, 0u);
    // blob_bytes saturates.
    Manifest m;
    m.config.size = ~0ull;
    m.layers.push_back({});
    m.layers.back().size = 5;
    EXPECT_EQ(engine::blob_bytes(m), ~0ull);
}

// Random bytes, random JSON-ish tokens and mutations of valid manifests: never crash, never throw,
// and every error carries a message.
TEST(Manifest, FuzzNeverCrashes) {
    uint64_t s = 2024;
    const auto rnd = [&s]() {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        return s;
    };
    const std::vector<std::string> seeds = {oci_image(), docker_image(), docker_list(), oci_index(), helm_chart(),
                                            artifact()};
    const std::vector<std::string> tokens = {"{", "}", "[", "]", ",", ":", "\"mediaType\"", "\"layers\"",
                                             "\"config\"", "\"manifests\"", "\"size\"", "\"digest\"", "2", "-1",
                                             "1e400", "null", "true", "\"" + kD1 + "\"", "\"schemaVersion\"",
                                             "\"\\u0000\"", "\"\\ud800\"", "18446744073709551616"};
    const std::vector<std::string> cts = {"", engine::kOciManifest, engine::kOciIndex, engine::kDockerManifest,
                                          engine::kDockerManifestList, "application/json", "x/y", ";;;", "\x01"};
    int ok = 0;
    for (int i = 0; i < 30000; ++i) {
        std::string body;
        switch (rnd() % 3) {
        case 0: {  // random bytes
            const size_t n = rnd() % 200;
            for (size_t k = 0; k < n; ++k) body += static_cast<char>(rnd() & 0xff);
            break;
        }
        case 1: {  // token soup
            const size_t n = rnd() % 60;
            for (size_t k = 0; k < n; ++k) body += tokens[rnd() % tokens.size()];
            break;
        }
        default: {  // mutate a valid manifest
            body = seeds[rnd() % seeds.size()];
            const int edits = 1 + static_cast<int>(rnd() % 4);
            for (int e = 0; e < edits && !body.empty(); ++e) {
                const size_t pos = rnd() % body.size();
                switch (rnd() % 4) {
                case 0: body[pos] = static_cast<char>(rnd() & 0xff); break;
                case 1: body.erase(pos, 1 + rnd() % 8); break;
                case 2: body.insert(pos, tokens[rnd() % tokens.size()]); break;
                default: body.resize(pos); break;
                }
            }
        }
        }
        Manifest m;
        netio::Result<Manifest> r = m;
        // An exact-size heap copy (no terminating NUL), so ASan flags any read past the end.
        std::unique_ptr<char[]> buf(new char[std::max<size_t>(body.size(), 1)]);
        std::memcpy(buf.get(), body.data(), body.size());
        EXPECT_NO_THROW(r = parse_manifest(std::string_view(buf.get(), body.size()), cts[rnd() % cts.size()]));
        if (r.ok()) {
            ++ok;
            for (const auto& d : engine::blobs_of(*r)) EXPECT_TRUE(cas::is_valid_digest(d.digest));
        } else {
            EXPECT_GT(r.error().message.size(), 10u);
        }
    }
    EXPECT_GT(ok, 0);  // the mutations keep some manifests valid
}

TEST(Manifest, DeepNesting) {
    const std::string deep = std::string(100000, '[') + std::string(100000, ']');
    EXPECT_HAS(must_fail(deep, ""), "not a JSON object");
    const std::string deep_obj = "{\"schemaVersion\":2,\"x\":" + deep + ",\"manifests\":[]}";
    EXPECT_EQ(must_parse(deep_obj, "").kind, engine::ManifestKind::index);
}

}  // namespace
