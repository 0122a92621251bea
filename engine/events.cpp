#include "engine/events.h"

#include <optional>

#include <nlohmann/json.hpp>

#include "engine/manifest.h"

namespace engine {

namespace {

using json = nlohmann::json;

constexpr size_t kMaxEvents = 10000;

std::string str(const json& obj, const char* key) {
    if (!obj.is_object()) return {};
    auto it = obj.find(key);
    if (it == obj.end() || !it->is_string()) return {};
    return it->get<std::string>();
}

bool is_manifest_type(std::string_view mt) {
    return is_index_media_type(mt) || is_image_manifest_media_type(mt);
}

// distribution: {"events": [{"id", "action", "target": {"mediaType", "digest", "repository", "url", "tag"}}]}
netio::Result<std::vector<RegistryEvent>> from_envelope(const json& doc) {
    const auto it = doc.find("events");
    if (it == doc.end() || !it->is_array()) return netio::Error::make("not a notification envelope: no \"events\" array");
    if (it->size() > kMaxEvents) return netio::Error::make("too many events in one envelope (" + std::to_string(it->size()) + ")");
    std::vector<RegistryEvent> out;
    for (const auto& e : *it) {
        if (!e.is_object()) continue;
        const std::string action = str(e, "action");
        if (action != "push" && action != "delete") continue;
        const json target = e.contains("target") ? e["target"] : json::object();
        RegistryEvent ev;
        ev.id = str(e, "id");
        ev.action = action == "push" ? RegistryEvent::Action::push : RegistryEvent::Action::remove;
        ev.repository = str(target, "repository");
        ev.tag = str(target, "tag");
        ev.digest = str(target, "digest");
        ev.media_type = str(target, "mediaType");
        const std::string url = str(target, "url");
        // A manifest event: its URL names /manifests/, or its media type is a manifest's, or it has
        // a tag. Deletes of a manifest by digest carry neither URL nor media type in 2.x: they are
        // kept when the URL does not say /blobs/.
        const bool manifest = url.find("/manifests/") != std::string::npos || is_manifest_type(ev.media_type) ||
                              !ev.tag.empty() ||
                              (ev.action == RegistryEvent::Action::remove && url.find("/blobs/") == std::string::npos &&
                               ev.media_type.empty());
        if (!manifest || ev.repository.empty()) continue;
        if (ev.id.empty()) ev.id = action + ":" + ev.repository + ":" + ev.tag + "@" + ev.digest;
        out.push_back(std::move(ev));
    }
    return out;
}

// Harbor: {"type": "PUSH_ARTIFACT", "occur_at": N, "event_data": {"resources": [{"digest", "tag"}],
// "repository": {"repo_full_name", "name", "namespace"}}}
netio::Result<std::vector<RegistryEvent>> from_harbor(const json& doc) {
    const std::string type = str(doc, "type");
    std::vector<RegistryEvent> out;
    if (type != "PUSH_ARTIFACT" && type != "DELETE_ARTIFACT") return out;  // other Harbor events: nothing to sync
    const json data = doc.contains("event_data") ? doc["event_data"] : json::object();
    const json repo = data.is_object() && data.contains("repository") ? data["repository"] : json::object();
    std::string full = str(repo, "repo_full_name");
    if (full.empty()) {
        const std::string ns = str(repo, "namespace"), name = str(repo, "name");
        full = ns.empty() ? name : ns + "/" + name;
    }
    if (full.empty()) return netio::Error::make("Harbor payload without event_data.repository");
    const json resources = data.is_object() && data.contains("resources") ? data["resources"] : json::array();
    if (!resources.is_array()) return netio::Error::make("Harbor payload: event_data.resources is not an array");
    if (resources.size() > kMaxEvents) return netio::Error::make("too many resources in one payload");
    std::string occur;
    if (doc.contains("occur_at") && doc["occur_at"].is_number()) occur = doc["occur_at"].dump();
    for (const auto& r : resources) {
        RegistryEvent ev;
        ev.action = type == "PUSH_ARTIFACT" ? RegistryEvent::Action::push : RegistryEvent::Action::remove;
        ev.repository = full;
        ev.tag = str(r, "tag");
        ev.digest = str(r, "digest");
        if (ev.tag.empty() && ev.digest.empty()) continue;
        ev.id = "harbor:" + type + ":" + occur + ":" + full + ":" + ev.tag + "@" + ev.digest;
        out.push_back(std::move(ev));
    }
    return out;
}

}  // namespace

netio::Result<std::vector<RegistryEvent>> parse_registry_events(std::string_view body, std::string_view content_type) {
    json doc = json::parse(body, nullptr, /*allow_exceptions=*/false);
    if (doc.is_discarded()) return netio::Error::make("the body is not valid JSON");
    if (!doc.is_object()) return netio::Error::make("the body is not a JSON object");
    const bool envelope_type = content_type.find("application/vnd.docker.distribution.events.") != std::string_view::npos;
    if (envelope_type || doc.contains("events")) return from_envelope(doc);
    if (doc.contains("type") && doc.contains("event_data")) return from_harbor(doc);
    return netio::Error::make("neither a distribution notification envelope nor a Harbor webhook payload");
}

std::optional<std::string> below_namespace(std::string_view repository, std::string_view ns) {
    if (ns.empty()) return std::string(repository);
    if (repository.size() <= ns.size() + 1 || repository.substr(0, ns.size()) != ns || repository[ns.size()] != '/')
        return std::nullopt;
    return std::string(repository.substr(ns.size() + 1));
}

}  // namespace engine
