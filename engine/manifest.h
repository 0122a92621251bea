// Image manifests and indexes (OCI image-spec v1.1, Docker distribution schema 2): parsing and
// strict validation of what a registry sends, so the mirror never copies something it cannot read.
//
// Supported: OCI image manifest, OCI image index, Docker manifest v2 (schema 2), Docker manifest
// list. Docker schema 1 (signed or not) is refused with its own message. Artifacts (an
// `artifactType`, a config of application/vnd.oci.empty.v1+json, or a Helm chart config) are image
// manifests whose `type` tells them apart.
//
// Errors name the field: "manifest: layers[2].digest is not a valid digest: 'sha256:xyz'".
// Everything here is pure and reentrant; parse_manifest never throws.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "netio/result.h"

namespace engine {

inline constexpr char kOciManifest[] = "application/vnd.oci.image.manifest.v1+json";
inline constexpr char kOciIndex[] = "application/vnd.oci.image.index.v1+json";
inline constexpr char kDockerManifest[] = "application/vnd.docker.distribution.manifest.v2+json";
inline constexpr char kDockerManifestList[] = "application/vnd.docker.distribution.manifest.list.v2+json";
inline constexpr char kDockerSchema1[] = "application/vnd.docker.distribution.manifest.v1+json";
inline constexpr char kDockerSchema1Signed[] = "application/vnd.docker.distribution.manifest.v1+prettyjws";
inline constexpr char kOciEmpty[] = "application/vnd.oci.empty.v1+json";
inline constexpr char kOciImageConfig[] = "application/vnd.oci.image.config.v1+json";
inline constexpr char kDockerImageConfig[] = "application/vnd.docker.container.image.v1+json";
inline constexpr char kHelmConfig[] = "application/vnd.cncf.helm.config.v1+json";

// The Accept header for manifest GET/HEAD: the four supported types, indexes first.
std::string manifest_accept_header();

// True for the two index types / the two image-manifest types (parameters and case ignored).
bool is_index_media_type(std::string_view media_type) noexcept;
bool is_image_manifest_media_type(std::string_view media_type) noexcept;

struct Descriptor {
    std::string media_type;
    std::string digest;
    uint64_t size = 0;
    std::string platform;       // "os/arch[/variant]" for index entries that carry one, else empty
    std::string artifact_type;  // the descriptor's artifactType, usually empty
};

enum class ManifestKind { image, index };
// helm when the config media type is kHelmConfig; every other config type (including artifacts)
// counts as image. An index is always `image`.
enum class ArtifactType { image, helm };

struct Manifest {
    std::string media_type;  // one of the four supported constants
    ManifestKind kind = ManifestKind::image;
    ArtifactType type = ArtifactType::image;
    Descriptor config;                  // image only
    std::vector<Descriptor> layers;     // image only (may be empty, e.g. for artifacts)
    std::vector<Descriptor> manifests;  // index only
    std::optional<Descriptor> subject;
    std::string artifact_type;          // the top-level artifactType, empty when absent
};

// `content_type` is the response's Content-Type (parameters and case ignored). When it is empty,
// application/json, application/octet-stream or text/plain, the JSON "mediaType" field decides,
// else the shape: "manifests" -> OCI index, "config" + "layers" -> OCI manifest.
// A "mediaType" field that disagrees with a specific Content-Type is an error.
netio::Result<Manifest> parse_manifest(std::string_view bytes, std::string_view content_type);

// The blobs an image manifest references: config first, then the layers in order. Empty for an
// index (its children are manifests, not blobs).
std::vector<Descriptor> blobs_of(const Manifest& m);
// Sum of config and layer sizes (saturating at UINT64_MAX); 0 for an index.
uint64_t blob_bytes(const Manifest& m) noexcept;
// The artifact type the OCI referrers API would report: artifactType, else the config media type
// for an image manifest, else empty.
std::string effective_artifact_type(const Manifest& m);

}  // namespace engine
