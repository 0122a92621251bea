// The sidecar's state: registries, links, rules, replication groups, task records, task items,
// schedules, webhook events received and notification deliveries in one SQLite database,
// `<state_dir>/state.db`.
//
// Files: the state dir is created 0700 and state.db 0600; both are tightened on open if an existing
// one is more permissive (state.db holds registry credentials in the clear, as docker's
// config.json does; SQLite gives its -wal and -shm files the database's mode). `state.lock` is held
// with flock() for the Store's lifetime, so a second process on the same dir is refused instead of
// failing the first one's tasks as "interrupted".
//
// Database: WAL, synchronous=FULL (a task is on disk before its first byte moves, invariant 5),
// foreign keys on, busy_timeout, secure_delete (a replaced credential is zeroed, not left in free
// pages). The schema is versioned: a `schema_version` table and an ordered
// list of migrations, each a list of SQL steps applied with its version bump in one transaction.
// A database newer than this code is refused.
//
// Errors: netio::Error whose code is in store_category(); kind_of() gives the ErrorKind the control
// API maps to a status (invalid 400, not_found 404, conflict 409, internal 500). Messages of
// `invalid` errors are FieldErrors joined by describe(): "field: message; ...". File-system errors
// in open() carry errno (system_category), which kind_of() reports as internal. No message, and no
// value returned by a list/get, contains a credential or a webhook secret: they come back only from
// credentials_for(), rule_target_credentials() and webhook_secret_for(), for the code that talks to
// registries and checks webhooks.
//
// Schema versions: 1 the first; 2 persisted schedules and the cancel flag; 3 webhook secrets, sync
// on push and notifications of rules, replication groups (replication_groups, replication_replicas),
// group tasks (tasks.group_id/group_name/scope, task_items.target), events and deliveries.
//
// SQL: prepared statements with bound parameters only; no SQL is built from user values.
//
// Threading: a Store is used by one thread at a time (its owner's, normally the loop thread). Calls
// block on disk I/O; each is one short transaction.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#include "engine/events.h"
#include "engine/rules.h"
#include "netio/result.h"
#include "netio/unique_fd.h"

struct sqlite3;

namespace engine {

enum class ErrorKind { invalid = 1, not_found, conflict, internal };

}  // namespace engine

template <>
struct std::is_error_code_enum<engine::ErrorKind> : std::true_type {};

namespace engine {

const std::error_category& store_category() noexcept;
std::error_code make_error_code(ErrorKind k) noexcept;
// The kind of a Store error; `internal` for an error from anywhere else.
ErrorKind kind_of(const netio::Error& e) noexcept;

// Task listing: newest first. Filters combine with AND; unset = any.
struct TaskQuery {
    std::optional<int64_t> rule_id;
    std::optional<int64_t> group_id;
    std::optional<TaskStatus> status;
    std::optional<Time> created_from;  // inclusive
    std::optional<Time> created_to;    // exclusive
    std::optional<int64_t> cursor;     // next_cursor of the previous page: tasks with a smaller id
    uint32_t offset = 0;               // rows to skip (after the cursor, if any)
    uint32_t limit = 50;               // 1..kMaxPageSize
};

struct TaskPage {
    std::vector<TaskRecord> tasks;
    std::optional<int64_t> next_cursor;  // set when more tasks match
};

// Items of one task, in the order they were appended.
struct ItemQuery {
    std::optional<ItemAction> action;
    std::optional<int64_t> cursor;  // next_cursor of the previous page: items with a larger id
    uint32_t offset = 0;
    uint32_t limit = 100;  // 1..kMaxPageSize
};

struct ItemPage {
    std::vector<TaskItem> items;
    std::optional<int64_t> next_cursor;
};

// Which finished tasks prune_tasks() removes (with their items). Queued and InProgress tasks are
// never removed.
struct Retention {
    std::optional<uint32_t> older_than_days;     // finished more than N days ago
    // Beyond the newest N tasks of each rule and of each replication group (tasks of deleted rules
    // and groups are ranked together).
    std::optional<uint32_t> keep_last_per_rule;
};

struct DueRule {
    int64_t rule_id = 0;
    std::string rule_name;
    Time next_fire{};
};

struct StoreOptions {
    std::function<Time()> clock = now_ms;  // every timestamp the store writes; tests pass a fake
    std::chrono::milliseconds busy_timeout{5000};
};

class Store {
public:
    using Options = StoreOptions;

    static constexpr uint32_t kMaxPageSize = 1000;
    static constexpr size_t kMaxReasonLength = 2048;  // longer item/task reasons are cut
    static constexpr size_t kMaxItemsPerAppend = 10000;

    // Creates or opens `<state_dir>/state.db` and migrates it to the current schema.
    static netio::Result<std::unique_ptr<Store>> open(const std::string& state_dir, Options options);
    static netio::Result<std::unique_ptr<Store>> open(const std::string& state_dir) { return open(state_dir, {}); }

    ~Store();
    Store(const Store&) = delete;
    Store& operator=(const Store&) = delete;

    // The schema version this code writes, and the one of the open database (always equal after
    // open()).
    static int latest_schema_version() noexcept;
    netio::Result<int> schema_version();

    // Registries. add/update check the registry (invalid), names are unique (conflict). `update`
    // replaces every field of registry `r.id`; r.credentials nullopt keeps the stored ones.
    netio::Result<Registry> add_registry(const Registry& r);
    netio::Result<std::vector<Registry>> list_registries();
    netio::Result<Registry> get_registry(int64_t id);
    netio::Result<Registry> get_registry_by_name(std::string_view name);
    netio::Result<Registry> update_registry(const Registry& r);
    // Refused (conflict) while a rule or a replication group uses the registry (as primary or
    // replica); the message names them. Its stored events go with it.
    netio::Status remove_registry(int64_t id);
    // The stored credentials (empty if none). Never log or return them to an API client.
    netio::Result<Credentials> credentials_for(int64_t registry_id);
    // The registry's webhook secret ("" if none). Never log or return it to an API client.
    netio::Result<std::string> webhook_secret_for(int64_t registry_id);

    // Links between regions: set inserts or replaces the pair's caps.
    netio::Result<Link> set_link(const Link& l);
    netio::Result<std::vector<Link>> list_links();
    netio::Status remove_link(std::string_view source_region, std::string_view target_region);

    // Rules. The registries are given by name and must exist (invalid, field named). `update`
    // replaces every field of rule `r.id`; r.target_credentials nullopt keeps the stored ones.
    // A schedule change resets the rule's next fire time to the first one after now.
    netio::Result<Rule> create_rule(const Rule& r);
    netio::Result<std::vector<Rule>> list_rules();
    netio::Result<Rule> get_rule(int64_t id);
    netio::Result<Rule> get_rule_by_name(std::string_view name);
    netio::Result<Rule> update_rule(const Rule& r);
    // Deletes the rule; its Queued tasks become Stopped, its InProgress tasks get cancel_requested
    // (their ids are returned so the engine can stop them now). Its tasks stay, with rule_id unset.
    netio::Result<std::vector<int64_t>> delete_rule(int64_t id);
    netio::Result<Credentials> rule_target_credentials(int64_t rule_id);

    // Tasks. create_task persists a Queued task before any work starts and returns it with its id.
    // Transitions: Queued -> InProgress (start_task) -> terminal (finish_task); Queued -> terminal
    // too. Any other transition is a conflict.
    netio::Result<TaskRecord> create_task(int64_t rule_id, Trigger trigger);
    // An event-triggered task limited to `scope` (empty scope = a full scan, as above). A scope has
    // at most kMaxEventsPerRecord artifacts, each with a repository (invalid otherwise).
    netio::Result<TaskRecord> create_task(int64_t rule_id, Trigger trigger, const std::vector<TaskScope>& scope);
    // A replication group's task (rule_id unset, group_id/group_name set).
    netio::Result<TaskRecord> create_group_task(int64_t group_id, Trigger trigger, const std::vector<TaskScope>& scope);
    netio::Status start_task(int64_t task_id);
    netio::Status set_task_repositories(int64_t task_id, uint64_t repositories);
    netio::Status finish_task(int64_t task_id, TaskStatus status, std::string_view reason);
    netio::Result<TaskRecord> get_task(int64_t task_id);
    netio::Result<TaskPage> list_tasks(const TaskQuery& q);
    // Queued: becomes Stopped at once. InProgress: cancel_requested is set and the engine stops it.
    // Already finished: conflict. Returns the task as it is now.
    netio::Result<TaskRecord> request_cancel(int64_t task_id);
    // Removes finished tasks per the retention; returns how many.
    netio::Result<uint64_t> prune_tasks(const Retention& r);

    // Task items. Appending also counts each item into the task's counters (copied, skipped,
    // failed; bytes of copied items) in the same transaction, so the log and the counters agree.
    // Only a Queued or InProgress task takes items (conflict otherwise).
    netio::Status append_items(int64_t task_id, const std::vector<TaskItem>& items);
    netio::Result<ItemPage> list_items(int64_t task_id, const ItemQuery& q);

    // Replication groups. Registries are given by name and must exist (invalid, field named);
    // names are unique among groups (conflict). A registry used by a group cannot be removed
    // (remove_registry: conflict naming the group). Deleting a group: as delete_rule for its tasks.
    netio::Result<ReplicationGroup> create_group(const ReplicationGroup& g);
    netio::Result<std::vector<ReplicationGroup>> list_groups();
    netio::Result<ReplicationGroup> get_group(int64_t id);
    netio::Result<ReplicationGroup> get_group_by_name(std::string_view name);
    netio::Result<ReplicationGroup> update_group(const ReplicationGroup& g);
    netio::Result<std::vector<int64_t>> delete_group(int64_t id);
    // Enabled groups whose reconcile schedule is due, and recording a fire (as for rules; DueRule's
    // rule_id and rule_name are the group's). update_group resets the next fire time when the
    // schedule changes or the group is enabled again.
    netio::Result<std::vector<DueRule>> due_groups(Time now);
    netio::Result<std::optional<Time>> record_group_fire(int64_t group_id, Time fired_at);

    // Webhook events. record_events stores the new ones durably (synchronous=FULL), in one
    // transaction, and returns them with their ids; events already stored for the registry (same
    // event id, also twice in one call) are skipped: a redelivery is not processed twice (for as
    // long as the event is kept, see prune_events). Different registries may use the same ids.
    // At most kMaxEventsPerRecord per call; an empty id or repository is invalid; an unknown
    // registry is not_found.
    static constexpr size_t kMaxEventsPerRecord = 10000;
    netio::Result<std::vector<StoredEvent>> record_events(int64_t registry_id, const std::vector<RegistryEvent>& events);
    // Unprocessed events received at or before `received_before`, oldest first, at most `limit`
    // (1..kMaxEventsPerRecord).
    netio::Result<std::vector<StoredEvent>> pending_events(Time received_before, uint32_t limit);
    // Marks events processed and links them to the tasks they triggered (task_ids may be empty),
    // in one transaction. task_ids are added to those an event already has; ids of events that no
    // longer exist are skipped.
    netio::Status mark_events_processed(const std::vector<int64_t>& event_ids, const std::vector<int64_t>& task_ids);
    // Newest first, for the API; limit 1..kMaxPageSize.
    netio::Result<std::vector<StoredEvent>> list_events(uint32_t limit);
    // Events older than `before` that are processed are removed; returns how many.
    netio::Result<uint64_t> prune_events(Time before);

    // Webhook deliveries (notifications out). add_delivery: the task must exist (not_found), the
    // URL must be non-empty and at most kMaxUrlLength; the delivery starts "pending".
    netio::Result<Delivery> add_delivery(int64_t task_id, std::string_view url);
    // status: "pending" (will retry), "delivered" or "failed" (given up); sets finished for the last
    // two and clears it for "pending". last_error is cut at kMaxReasonLength.
    netio::Status update_delivery(int64_t id, std::string_view status, uint32_t attempts, int last_status,
                                  std::string_view last_error);
    netio::Result<std::vector<Delivery>> list_deliveries(int64_t task_id);
    // Pending deliveries (a restart resumes them), oldest first. Deliveries go with their task
    // (prune_tasks).
    netio::Result<std::vector<Delivery>> pending_deliveries();

    // Schedules. Enabled rules with a schedule whose next fire time is at or before `now`.
    netio::Result<std::vector<DueRule>> due_rules(Time now);
    // Records that the rule fired at `fired_at` and moves its next fire time to the first one after
    // max(fired_at, now): fire times missed while the daemon was down are not caught up one by one.
    netio::Result<std::optional<Time>> record_fire(int64_t rule_id, Time fired_at);

    // Restart safety: tasks a dead process left Queued or InProgress (the lock file guarantees no
    // live process owns them), oldest first.
    netio::Result<std::vector<TaskRecord>> interrupted_tasks();
    // Marks every one of them Failed with `reason`; returns how many.
    netio::Result<uint64_t> fail_interrupted(std::string_view reason);
    // Puts one back to Queued so that a new run continues it: its items, counters and start time are
    // kept (the new run appends what it does; the daemon leaves out artifacts the log already has
    // and finds unchanged), and `reason` says why it was resumed.
    netio::Status requeue(int64_t task_id, std::string_view reason);

private:
    struct DbDeleter {
        void operator()(sqlite3* db) const noexcept;
    };

    Store(std::unique_ptr<sqlite3, DbDeleter> db, netio::UniqueFd lock, Options options);
    netio::Status migrate();
    netio::Status schedule_missing_fires();
    netio::Result<Rule> read_rule_where_id(int64_t id);

    netio::UniqueFd lock_;  // flock'ed state.lock; declared first so it is released after the database closes
    std::unique_ptr<sqlite3, DbDeleter> db_;
    Options options_;
};

}  // namespace engine
