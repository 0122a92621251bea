// The sidecar's data model: registries, links, rules, task records and task items as plain structs,
// the checks users expect on every field, schedules (intervals and 5-field cron), and the JSON the
// control API reads and writes.
//
// Checks return every problem at once as FieldErrors, each naming the field ("name", "tag_filter",
// "schedule", ...) so the API can answer 400 with the field named. Messages quote user input with
// control characters escaped; they never quote a credential.
//
// Credentials are write-only (invariant 7): the structs carry them only on the way in
// (`std::optional<Credentials>`, empty optional = "leave as stored"), the store never fills them in
// on the way out, and no to_json() here writes them: `has_credentials` / `has_target_credentials`
// say whether some are stored. Code that needs them to talk to a registry asks the store
// explicitly (Store::credentials_for). A registry's webhook secret is handled the same way
// (`has_webhook_secret` out, Store::webhook_secret_for), and no message quotes it either.
//
// The persisted task is `TaskRecord`, not `Task`: engine code already uses `Task` for netio's
// coroutine type (registry_client.h has `using netio::Task`).
//
// Times are UTC, millisecond resolution (`Time`); JSON writes them as RFC 3339 ("...T12:00:00.000Z").
// Everything here is pure and reentrant; nothing throws on bad input.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "engine/auth_parse.h"
#include "engine/mirror.h"

namespace engine {

using Time = std::chrono::sys_time<std::chrono::milliseconds>;

// Now, truncated to milliseconds.
Time now_ms() noexcept;
// RFC 3339 in UTC with milliseconds: "2024-05-01T12:00:00.123Z".
std::string format_time(Time t);
// "YYYY-MM-DDTHH:MM:SS[.frac](Z|+HH:MM|-HH:MM)" ('t'/'z' and a space for 'T' also accepted).
std::optional<Time> parse_time(std::string_view s);

// ---------------------------------------------------------------------------------------------
// Field errors

struct FieldError {
    std::string field;    // JSON field name; "" for the body as a whole
    std::string message;  // what is wrong, without the field name
};
using FieldErrors = std::vector<FieldError>;

// User input inside a message: quoted, control characters escaped, cut after 80 bytes (so a
// name from a request cannot forge log lines). Never given a credential.
std::string quote_input(std::string_view s);

// "name: must not be empty; schedule: ..." — for logs and for Error messages.
std::string describe(const FieldErrors& errors);
// {"errors": [{"field": "...", "message": "..."}, ...]} — the body of a 400.
nlohmann::json to_json(const FieldErrors& errors);

// A value after checking: normalised (URLs lowercased, defaults filled), plus every problem found.
template <class T>
struct Checked {
    T value;
    FieldErrors errors;
    bool ok() const noexcept { return errors.empty(); }
};

// Limits on user input (put a limit on everything).
inline constexpr size_t kMaxNameLength = 63;
inline constexpr size_t kMaxDescriptionLength = 1024;
inline constexpr size_t kMaxFilterLength = 1024;
inline constexpr size_t kMaxUrlLength = 2048;
inline constexpr size_t kMaxPathLength = 4096;
inline constexpr size_t kMaxUsernameLength = 256;
inline constexpr size_t kMaxSecretLength = 16384;  // registry tokens (JWTs) run to a few KiB
inline constexpr size_t kMaxScheduleLength = 128;

// Rule and registry names: 1..63 of [a-z0-9._-], starting with [a-z0-9].
// "" if valid, else what is wrong (without the field name).
std::string check_name(std::string_view name);

// ---------------------------------------------------------------------------------------------
// Schedules

// Empty (no schedule), an interval ("30s", "30m", "2h", "1d"; at least 10s, at most 365d), a
// 5-field cron expression "minute hour day-of-month month day-of-week", or one of @yearly
// @annually @monthly @weekly @daily @midnight @hourly. Cron is evaluated in UTC.
//
// Cron fields take `*`, numbers, ranges `a-b`, lists `a,b,c`, steps `*/n`, `a-b/n` and `a/n`
// (= a-max/n); months and days of week also take names (jan..dec, sun..sat, any case); day of week
// 0..7 with 0 and 7 both Sunday. Day of month and day of week combine as in Vixie cron: when both
// are restricted (neither starts with `*`) a day matches if either matches.
class Schedule {
public:
    enum class Kind { none, interval, cron };

    // FieldError.field is "schedule".
    static Checked<Schedule> parse(std::string_view text);

    Kind kind() const noexcept { return kind_; }
    bool empty() const noexcept { return kind_ == Kind::none; }
    const std::string& text() const noexcept { return text_; }
    std::chrono::seconds interval() const noexcept { return interval_; }

    // The first fire time strictly after `after`: after + interval, or the next whole minute that
    // the cron expression matches. nullopt for an empty schedule (and, as a guard, for a cron
    // expression with no match within 10 years, which parse() already refuses).
    std::optional<Time> next_after(Time after) const;

private:
    struct Cron {
        uint64_t minutes = 0;  // bit i: minute i matches
        uint32_t hours = 0;
        uint32_t days_of_month = 0;  // bit d, 1..31
        uint16_t months = 0;         // bit m, 1..12
        uint8_t days_of_week = 0;    // bit w, 0..6 (Sunday = 0)
        bool dom_star = true;        // day-of-month field starts with '*'
        bool dow_star = true;
    };
    static std::optional<Time> next_cron(const Cron& c, Time after);
    static bool day_matches(const Cron& c, unsigned dom, unsigned dow) noexcept;

    Kind kind_ = Kind::none;
    std::string text_;
    std::chrono::seconds interval_{0};
    Cron cron_;
};

// ---------------------------------------------------------------------------------------------
// Registries

struct Registry {
    int64_t id = 0;       // assigned by the store
    std::string name;     // unique, same grammar as rule names
    std::string url;      // "scheme://host[:port]", scheme http or https; no path, query or userinfo
    std::string region;   // "" or [a-z0-9._-]{1,63}; links are keyed by region
    bool insecure = false;  // https without certificate verification
    std::string ca_file;    // absolute path of a PEM bundle to verify the registry with; https only
    // Write-only. On input: nullopt = keep what is stored; a value replaces it (an empty value
    // removes it). On output from the store: always nullopt.
    std::optional<Credentials> credentials;
    bool has_credentials = false;  // output only
    // Write-only, as credentials: the shared secret a webhook from this registry must carry in its
    // Authorization header (the value itself, or "Bearer <secret>"). nullopt = keep; "" removes.
    // JSON "webhook_secret" in, "has_webhook_secret" out. At most kMaxSecretLength.
    std::optional<std::string> webhook_secret;
    bool has_webhook_secret = false;  // output only
    Time created{};
    Time updated{};
};

// Normalises (scheme and host lowercased, a trailing '/' dropped) and checks every field.
Checked<Registry> check(Registry r);

// ---------------------------------------------------------------------------------------------
// Links: bandwidth caps between regions, for the planner's token buckets.

struct Link {
    std::string source_region;
    std::string target_region;
    uint64_t rate_bytes_per_s = 0;  // > 0
    uint64_t burst_bytes = 0;       // 0 = one second's worth of rate
};

Checked<Link> check(Link l);

// ---------------------------------------------------------------------------------------------
// Rules

// When a rule's notify_urls are called: "always" (every end), "failure" (Failed, PartiallyFailed),
// "success" (Succeeded). Stopped tasks notify only with "always".
enum class NotifyOn { always, failure, success };
inline constexpr size_t kMaxNotifyUrls = 10;

struct Rule {
    int64_t id = 0;  // assigned by the store
    std::string name;
    std::string description;
    std::string source_registry;  // registry name; the store resolves it
    std::string source_namespace;  // required; a repository path ("library", "team/sub")
    std::string repo_filter;  // RE2, full match against the repository path below the namespace; "" = all
    std::string tag_filter;   // RE2, full match against the tag; "" = all
    TypeFilter type = TypeFilter::all;
    std::string target_registry;   // registry name
    std::string target_namespace;  // "" = same as source_namespace
    // Write-only, as Registry::credentials: nullopt = keep what is stored.
    std::optional<Credentials> target_credentials;
    bool has_target_credentials = false;  // output only
    bool overwrite = false;
    bool enabled = true;
    std::string schedule;  // see Schedule
    // Sync on push: the source registry's webhook events (engine/events.h) trigger `event` tasks
    // for the pushed artifacts. Such a rule also reconciles periodically (a full scan): on its
    // schedule, or every `serve --reconcile-interval` when it has none.
    bool sync_on_push = false;
    // Notifications out: each URL (http or https, at most kMaxNotifyUrls) is POSTed a JSON summary
    // when a task of the rule ends, per notify_on. check() wants absolute URLs without userinfo or
    // fragment, at most kMaxUrlLength each, no two alike; it lowercases scheme and host (the path
    // and query are kept as given). Errors (field "notify_urls") name a URL by its position, never
    // quote it: a webhook URL often carries a token.
    std::vector<std::string> notify_urls;
    NotifyOn notify_on = NotifyOn::always;
    // Output only, filled by the store.
    int64_t source_registry_id = 0;
    int64_t target_registry_id = 0;
    std::optional<Time> next_fire;
    Time created{};
    Time updated{};

    // target_namespace, or source_namespace when that is empty.
    const std::string& effective_target_namespace() const noexcept {
        return target_namespace.empty() ? source_namespace : target_namespace;
    }
};

// Checks every field (regular expressions compiled with RE2; errors give the position and RE2's
// message). Registry names are checked for form only; whether they exist is the store's business.
Checked<Rule> check(Rule r);

// ---------------------------------------------------------------------------------------------
// Tasks and their items

enum class Trigger { manual, schedule, event };
enum class TaskStatus { queued, in_progress, succeeded, partially_failed, failed, stopped };
// `deleted`: a replication group replicated a delete (counted with the copied artifacts).
enum class ItemAction { copied, skipped_exists, skipped_same_digest, failed, deleted };

// "manual"... / "Queued", "InProgress"... / "copied", "skipped: exists", ..., "deleted" (the API's spellings).
std::string_view to_string(TypeFilter t) noexcept;
std::string_view to_string(Trigger t) noexcept;
std::string_view to_string(TaskStatus s) noexcept;
std::string_view to_string(ItemAction a) noexcept;
std::optional<TypeFilter> parse_type_filter(std::string_view s) noexcept;
std::optional<Trigger> parse_trigger(std::string_view s) noexcept;
std::optional<TaskStatus> parse_task_status(std::string_view s) noexcept;  // case-insensitive
std::optional<ItemAction> parse_item_action(std::string_view s) noexcept;
// Succeeded, PartiallyFailed, Failed or Stopped.
bool is_terminal(TaskStatus s) noexcept;

struct TaskCounters {
    uint64_t repositories = 0;
    uint64_t copied = 0;   // artifacts
    uint64_t skipped = 0;  // artifacts
    uint64_t failed = 0;   // artifacts
    uint64_t bytes = 0;    // bytes moved by copied artifacts
};

// One artifact an event-triggered task is limited to: a repository path in the source registry
// (full path, as the event named it) and a tag ("" = the digest only).
struct TaskScope {
    std::string repository;
    std::string tag;
    std::string digest;
    bool remove = false;  // replicate a delete (replication groups with replicate_deletes)
};

struct TaskRecord {
    int64_t id = 0;
    std::optional<int64_t> rule_id;  // nullopt once the rule is deleted (and for group tasks)
    std::string rule_name;           // as it was when the task was created ("" for group tasks)
    std::optional<int64_t> group_id;  // a replication group's task; nullopt once the group is deleted
    std::string group_name;           // as it was when the task was created ("" for rule tasks)
    std::vector<TaskScope> scope;     // empty: a full scan; else only these artifacts
    Trigger trigger = Trigger::manual;
    TaskStatus status = TaskStatus::queued;
    std::string reason;  // why it failed or stopped; "" otherwise
    Time created{};
    std::optional<Time> started;
    std::optional<Time> finished;
    bool cancel_requested = false;
    TaskCounters counters;

    // (copied + skipped) / (copied + skipped + failed); with no artifacts at all, 0 for a Failed
    // task and 1 otherwise.
    double success_ratio() const noexcept;
    // finished - started, or now - started while running; nullopt before it starts.
    std::optional<std::chrono::milliseconds> duration(Time now) const noexcept;
};

struct TaskItem {
    int64_t id = 0;  // assigned by the store; items of a task list in id order
    int64_t task_id = 0;
    std::string target;  // the target registry's name (a group task has one per replica)
    std::string repository;
    std::string tag;
    std::string digest;
    ItemAction action = ItemAction::copied;
    std::string reason;
    uint64_t bytes = 0;
    uint64_t duration_ms = 0;
};

// ---------------------------------------------------------------------------------------------
// JSON for the control API

std::string_view to_string(NotifyOn n) noexcept;
std::optional<NotifyOn> parse_notify_on(std::string_view s) noexcept;

// ---------------------------------------------------------------------------------------------
// Replication groups: push once to the primary, pull in every region. All repositories, all tags,
// overwrite on; triggered by the primary's events and reconciled on `schedule` (default "1h").

struct ReplicationGroup {
    int64_t id = 0;
    std::string name;                   // same grammar as rule names; unique among groups
    std::string primary;                // registry name
    std::vector<std::string> replicas;  // registry names, 1..kMaxReplicas, distinct, not the primary
    bool replicate_deletes = false;     // a tag deleted on the primary is deleted on the replicas
    bool enabled = true;
    std::string schedule = "1h";        // the reconcile scan; see Schedule ("" = events only)
    // Output only.
    int64_t primary_id = 0;
    std::vector<int64_t> replica_ids;
    std::optional<Time> next_fire;
    Time created{};
    Time updated{};
};
inline constexpr size_t kMaxReplicas = 16;

Checked<ReplicationGroup> check(ReplicationGroup g);

// ---------------------------------------------------------------------------------------------
// Webhook deliveries (notifications out) and stored events (webhooks in)

struct Delivery {
    int64_t id = 0;
    int64_t task_id = 0;
    std::string url;
    std::string status = "pending";  // pending | delivered | failed
    uint32_t attempts = 0;
    std::string last_error;          // "" or why the last attempt failed ("HTTP 500", "connection refused", ...)
    int last_status = 0;             // HTTP status of the last attempt, 0 if none
    Time created{};
    std::optional<Time> finished;    // delivered or given up
};

struct StoredEvent {
    int64_t id = 0;
    int64_t registry_id = 0;
    std::string registry_name;
    std::string event_id;     // the sender's id (de-duplication key with registry_id)
    bool remove = false;      // a delete; else a push
    std::string repository;
    std::string tag;
    std::string digest;
    Time received{};
    bool processed = false;
    std::vector<int64_t> task_ids;  // tasks it triggered (output only)
};

// Output. None of these writes a credential or a webhook secret. TaskRecord: "group_id" (or null),
// "group_name", "scope": [{"repository", "tag", "digest", "remove"}] ([] for a full scan).
// TaskItem: "target". StoredEvent: "registry" (the name), "action" "push" | "delete", "task_ids".
nlohmann::json to_json(const ReplicationGroup& g);
nlohmann::json to_json(const Delivery& d);
nlohmann::json to_json(const StoredEvent& e);
nlohmann::json to_json(const Registry& r);
nlohmann::json to_json(const Link& l);
nlohmann::json to_json(const Rule& r);
nlohmann::json to_json(const TaskRecord& t, Time now);
nlohmann::json to_json(const TaskItem& i);

// Input. Unknown fields are errors; the read-only fields that to_json writes (id, created,
// has_credentials, ...) are ignored, so a document read with GET can be sent back. A JSON null
// resets a field to its default. Credentials: "username" and "password" (registries),
// "target_username" and "target_password" (rules) are given together or not at all; "" for both
// removes them. The result is checked as by check().
Checked<Registry> registry_from_json(const nlohmann::json& body);
Checked<Link> link_from_json(const nlohmann::json& body);
Checked<Rule> rule_from_json(const nlohmann::json& body);
// "name", "primary", "replicas" (array of registry names), "replicate_deletes", "enabled",
// "schedule". As for rules: unknown fields are errors, the read-only fields of to_json() ("id",
// "next_fire", "created", "updated") are ignored, null resets a field to its default (for
// "schedule" that is "1h"; "" means events only). patch_group changes only the fields given.
Checked<ReplicationGroup> group_from_json(const nlohmann::json& body);
Checked<ReplicationGroup> patch_group(const ReplicationGroup& current, const nlohmann::json& patch);
// PATCH: only the fields present in `patch` change; the result is checked again as a whole.
// `current` is as the store returned it (credentials nullopt = unchanged unless the patch has them).
Checked<Registry> patch_registry(const Registry& current, const nlohmann::json& patch);
Checked<Rule> patch_rule(const Rule& current, const nlohmann::json& patch);

}  // namespace engine
