// Registry events arriving as webhooks: distribution's notification envelope (media type
// application/vnd.docker.distribution.events.v1+json from 2.x, ...events.v2+json from 3.x; the
// same {"events": [...]} shape) and Harbor's webhook payload ({"type": "PUSH_ARTIFACT" |
// "DELETE_ARTIFACT", "event_data": {...}}).
//
// Only manifest events are kept: a push or delete of a manifest (by tag or by digest). Blob events,
// pulls and mounts are dropped, as are events without a repository. Each event keeps the sender's
// id when it has one (distribution's "id"); Harbor sends none, so one is derived from the payload
// (type, occur_at, repository, tag, digest), which is what de-duplicates a redelivery.
//
// Pure and reentrant; nothing throws on bad input.
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "netio/result.h"

namespace engine {

struct RegistryEvent {
    enum class Action { push, remove };
    std::string id;          // the sender's event id (or one derived from the payload); never empty
    Action action = Action::push;
    std::string repository;  // full path in the registry ("team/app")
    std::string tag;         // "" for a push or delete by digest
    std::string digest;      // "" if the sender gave none (Harbor delete by tag)
    std::string media_type;  // "" if not given
};

// Parses a webhook body. `content_type` picks distribution's envelope when it names an events media
// type; otherwise the body's shape decides (an object with "events", or one with "type" and
// "event_data"). An error says what is wrong (not JSON, not an envelope, too many events).
netio::Result<std::vector<RegistryEvent>> parse_registry_events(std::string_view body, std::string_view content_type);

// A pushed manifest's repository falls under a rule's source namespace ("" = the whole registry):
// returns the path below it ("web" for "team/web" under "team"), or nullopt.
std::optional<std::string> below_namespace(std::string_view repository, std::string_view ns);

}  // namespace engine
