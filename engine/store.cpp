#include "engine/store.h"

#include <fcntl.h>
#include <sqlite3.h>
#include <sys/file.h>
#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <limits>

#include <nlohmann/json.hpp>

namespace engine {

namespace {

using netio::Error;
using netio::Result;
using netio::Status;

class StoreCategory final : public std::error_category {
public:
    const char* name() const noexcept override { return "crossdock.store"; }
    std::string message(int v) const override {
        switch (static_cast<ErrorKind>(v)) {
        case ErrorKind::invalid: return "invalid";
        case ErrorKind::not_found: return "not found";
        case ErrorKind::conflict: return "conflict";
        case ErrorKind::internal: return "internal";
        }
        return "unknown";
    }
};

}  // namespace

const std::error_category& store_category() noexcept {
    static const StoreCategory category;
    return category;
}

std::error_code make_error_code(ErrorKind k) noexcept { return {static_cast<int>(k), store_category()}; }

ErrorKind kind_of(const netio::Error& e) noexcept {
    if (e.code.category() != store_category()) return ErrorKind::internal;
    switch (static_cast<ErrorKind>(e.code.value())) {
    case ErrorKind::invalid: return ErrorKind::invalid;
    case ErrorKind::not_found: return ErrorKind::not_found;
    case ErrorKind::conflict: return ErrorKind::conflict;
    case ErrorKind::internal: return ErrorKind::internal;
    }
    return ErrorKind::internal;
}

namespace {

Error err(ErrorKind k, std::string message) { return Error{make_error_code(k), std::move(message)}; }

// SQLite's messages name tables, columns and constraints, never bound values, so they cannot
// carry a credential.
Error db_error(sqlite3* db, std::string_view what) {
    return err(ErrorKind::internal, "state store: " + std::string(what) + ": " + sqlite3_errmsg(db));
}

Error os_error(int errnum, const std::string& what) {
    return Error{std::error_code(errnum, std::system_category()), "state store: " + what + ": " + std::strerror(errnum)};
}

std::string quote(std::string_view s) { return quote_input(s); }
// Paths come from the operator's command line: quoted whole.
std::string quote_path(std::string_view p) { return "'" + std::string(p) + "'"; }

int64_t to_db(uint64_t v) noexcept {
    return v > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) ? std::numeric_limits<int64_t>::max()
                                                                           : static_cast<int64_t>(v);
}
uint64_t from_db(int64_t v) noexcept { return v < 0 ? 0 : static_cast<uint64_t>(v); }
int64_t to_db(Time t) noexcept { return t.time_since_epoch().count(); }
Time time_from_db(int64_t ms) noexcept { return Time{std::chrono::milliseconds{ms}}; }

// Cuts at a UTF-8 character boundary.
std::string cut(std::string_view s, size_t max) {
    if (s.size() <= max) return std::string(s);
    size_t n = max;
    while (n > 0 && (static_cast<unsigned char>(s[n]) & 0xC0) == 0x80) --n;
    return std::string(s.substr(0, n)) + "...";
}

struct StmtDeleter {
    void operator()(sqlite3_stmt* s) const noexcept { sqlite3_finalize(s); }
};

// A prepared statement. Bind errors are kept and reported by the next step().
class Stmt {
public:
    Stmt(sqlite3* db, sqlite3_stmt* s) noexcept : db_(db), stmt_(s) {}

    void bind(int i, int64_t v) noexcept { note(sqlite3_bind_int64(stmt_.get(), i, v)); }
    void bind(int i, int v) noexcept { bind(i, static_cast<int64_t>(v)); }
    void bind(int i, bool v) noexcept { bind(i, static_cast<int64_t>(v ? 1 : 0)); }
    void bind(int i, uint64_t v) noexcept { bind(i, to_db(v)); }
    void bind(int i, Time t) noexcept { bind(i, to_db(t)); }
    void bind(int i, std::string_view v) noexcept {
        note(sqlite3_bind_text64(stmt_.get(), i, v.data(), v.size(), SQLITE_TRANSIENT, SQLITE_UTF8));
    }
    void bind(int i, const std::string& v) noexcept { bind(i, std::string_view(v)); }
    void bind(int i, const char* v) noexcept { bind(i, std::string_view(v)); }
    void bind(int i, std::nullopt_t) noexcept { note(sqlite3_bind_null(stmt_.get(), i)); }
    template <class T>
    void bind(int i, const std::optional<T>& v) noexcept {
        if (v) bind(i, *v);
        else bind(i, std::nullopt);
    }

    // true: a row is ready; false: done.
    Result<bool> step() {
        if (bind_rc_ != SQLITE_OK) {
            rc_ = bind_rc_;
            return db_error(db_, "bind");
        }
        rc_ = sqlite3_step(stmt_.get());
        if (rc_ == SQLITE_ROW) return true;
        if (rc_ == SQLITE_DONE) return false;
        return db_error(db_, "step");
    }
    // Runs a statement that returns no rows.
    Status run() {
        auto r = step();
        if (!r.ok()) return r.error();
        return netio::ok_status();
    }
    void reset() noexcept {
        sqlite3_reset(stmt_.get());
        sqlite3_clear_bindings(stmt_.get());
        bind_rc_ = SQLITE_OK;
    }
    int rc() const noexcept { return rc_; }  // extended result code of the last step

    bool is_null(int c) const noexcept { return sqlite3_column_type(stmt_.get(), c) == SQLITE_NULL; }
    int64_t i64(int c) const noexcept { return sqlite3_column_int64(stmt_.get(), c); }
    uint64_t u64(int c) const noexcept { return from_db(i64(c)); }
    bool flag(int c) const noexcept { return i64(c) != 0; }
    Time time(int c) const noexcept { return time_from_db(i64(c)); }
    std::optional<Time> opt_time(int c) const noexcept {
        return is_null(c) ? std::nullopt : std::optional<Time>(time(c));
    }
    std::optional<int64_t> opt_i64(int c) const noexcept {
        return is_null(c) ? std::nullopt : std::optional<int64_t>(i64(c));
    }
    std::string text(int c) const {
        const auto* p = sqlite3_column_text(stmt_.get(), c);
        const int n = sqlite3_column_bytes(stmt_.get(), c);
        return p ? std::string(reinterpret_cast<const char*>(p), static_cast<size_t>(n)) : std::string();
    }

private:
    void note(int rc) noexcept {
        if (bind_rc_ == SQLITE_OK) bind_rc_ = rc;
    }

    sqlite3* db_;
    std::unique_ptr<sqlite3_stmt, StmtDeleter> stmt_;
    int bind_rc_ = SQLITE_OK;
    int rc_ = SQLITE_OK;
};

// Prepares `sql` (a constant: never built from user values) and binds `args` to ?1, ?2, ...
template <class... Args>
Result<Stmt> prepare(sqlite3* db, std::string_view text, const Args&... args) {
    sqlite3_stmt* raw = nullptr;
    if (sqlite3_prepare_v2(db, text.data(), static_cast<int>(text.size()), &raw, nullptr) != SQLITE_OK) {
        sqlite3_finalize(raw);
        return db_error(db, "prepare");
    }
    Stmt st(db, raw);
    [[maybe_unused]] int i = 1;
    (st.bind(i++, args), ...);
    return st;
}

// Runs a statement that returns no rows; returns the number of rows changed.
template <class... Args>
Result<int64_t> exec(sqlite3* db, std::string_view text, const Args&... args) {
    auto st = prepare(db, text, args...);
    if (!st.ok()) return st.error();
    if (auto r = st->run(); !r.ok()) return r.error();
    return static_cast<int64_t>(sqlite3_changes64(db));
}

// BEGIN IMMEDIATE ... COMMIT; rolled back by the destructor unless committed.
class Transaction {
public:
    static Result<Transaction> begin(sqlite3* db) {
        if (sqlite3_exec(db, "BEGIN IMMEDIATE", nullptr, nullptr, nullptr) != SQLITE_OK)
            return db_error(db, "begin transaction");
        return Transaction(db);
    }
    Transaction(Transaction&& o) noexcept : db_(std::exchange(o.db_, nullptr)) {}
    Transaction& operator=(Transaction&&) = delete;
    ~Transaction() {
        if (db_ != nullptr) sqlite3_exec(db_, "ROLLBACK", nullptr, nullptr, nullptr);
    }
    Status commit() {
        if (sqlite3_exec(db_, "COMMIT", nullptr, nullptr, nullptr) != SQLITE_OK) return db_error(db_, "commit");
        db_ = nullptr;
        return netio::ok_status();
    }

private:
    explicit Transaction(sqlite3* db) noexcept : db_(db) {}
    sqlite3* db_;
};

bool is_unique_violation(int rc) noexcept {
    return rc == SQLITE_CONSTRAINT_UNIQUE || rc == SQLITE_CONSTRAINT_PRIMARYKEY;
}

// ---------------------------------------------------------------------------------------------
// Schema
//
// Never edit a migration that has shipped: add a new one. Each entry's steps run, with the
// version bump, in one transaction.

struct Migration {
    int version;
    std::vector<const char*> steps;
};

const std::vector<Migration>& migrations() {
    static const std::vector<Migration> list = {
        {1,
         {
             R"(CREATE TABLE registries (
                  id INTEGER PRIMARY KEY AUTOINCREMENT,
                  name TEXT NOT NULL UNIQUE,
                  url TEXT NOT NULL,
                  region TEXT NOT NULL DEFAULT '',
                  insecure INTEGER NOT NULL DEFAULT 0,
                  ca_file TEXT NOT NULL DEFAULT '',
                  username TEXT NOT NULL DEFAULT '',
                  password TEXT NOT NULL DEFAULT '',
                  created_ms INTEGER NOT NULL,
                  updated_ms INTEGER NOT NULL))",
             R"(CREATE TABLE links (
                  source_region TEXT NOT NULL,
                  target_region TEXT NOT NULL,
                  rate_bytes_per_s INTEGER NOT NULL,
                  burst_bytes INTEGER NOT NULL DEFAULT 0,
                  PRIMARY KEY (source_region, target_region)))",
             R"(CREATE TABLE rules (
                  id INTEGER PRIMARY KEY AUTOINCREMENT,
                  name TEXT NOT NULL UNIQUE,
                  description TEXT NOT NULL DEFAULT '',
                  source_registry_id INTEGER NOT NULL REFERENCES registries(id) ON DELETE RESTRICT,
                  source_namespace TEXT NOT NULL,
                  repo_filter TEXT NOT NULL DEFAULT '',
                  tag_filter TEXT NOT NULL DEFAULT '',
                  type TEXT NOT NULL DEFAULT 'all',
                  target_registry_id INTEGER NOT NULL REFERENCES registries(id) ON DELETE RESTRICT,
                  target_namespace TEXT NOT NULL DEFAULT '',
                  target_username TEXT NOT NULL DEFAULT '',
                  target_password TEXT NOT NULL DEFAULT '',
                  overwrite INTEGER NOT NULL DEFAULT 0,
                  enabled INTEGER NOT NULL DEFAULT 1,
                  schedule TEXT NOT NULL DEFAULT '',
                  created_ms INTEGER NOT NULL,
                  updated_ms INTEGER NOT NULL))",
             "CREATE INDEX rules_source_registry ON rules(source_registry_id)",
             "CREATE INDEX rules_target_registry ON rules(target_registry_id)",
             R"(CREATE TABLE tasks (
                  id INTEGER PRIMARY KEY AUTOINCREMENT,
                  rule_id INTEGER REFERENCES rules(id) ON DELETE SET NULL,
                  rule_name TEXT NOT NULL,
                  trigger_kind TEXT NOT NULL,
                  status TEXT NOT NULL,
                  reason TEXT NOT NULL DEFAULT '',
                  created_ms INTEGER NOT NULL,
                  started_ms INTEGER,
                  finished_ms INTEGER,
                  repositories INTEGER NOT NULL DEFAULT 0,
                  copied INTEGER NOT NULL DEFAULT 0,
                  skipped INTEGER NOT NULL DEFAULT 0,
                  failed INTEGER NOT NULL DEFAULT 0,
                  bytes INTEGER NOT NULL DEFAULT 0))",
             "CREATE INDEX tasks_rule ON tasks(rule_id, id)",
             R"(CREATE TABLE task_items (
                  id INTEGER PRIMARY KEY AUTOINCREMENT,
                  task_id INTEGER NOT NULL REFERENCES tasks(id) ON DELETE CASCADE,
                  repository TEXT NOT NULL,
                  tag TEXT NOT NULL DEFAULT '',
                  digest TEXT NOT NULL DEFAULT '',
                  action TEXT NOT NULL,
                  reason TEXT NOT NULL DEFAULT '',
                  bytes INTEGER NOT NULL DEFAULT 0,
                  duration_ms INTEGER NOT NULL DEFAULT 0))",
             "CREATE INDEX task_items_task ON task_items(task_id, id)",
         }},
        // v2: schedules persisted (next fire per rule), the cancel flag, task indexes for listing
        // and pruning. Next fire times of existing rules are filled in on open.
        {2,
         {
             "ALTER TABLE tasks ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0",
             R"(CREATE TABLE schedules (
                  rule_id INTEGER PRIMARY KEY REFERENCES rules(id) ON DELETE CASCADE,
                  next_fire_ms INTEGER,
                  last_fire_ms INTEGER))",
             "CREATE INDEX tasks_status ON tasks(status, id)",
             "CREATE INDEX tasks_created ON tasks(created_ms)",
         }},
        // v3: webhooks in (registry secrets, stored events), sync on push and notifications out for
        // rules (deliveries), replication groups and their tasks (scope, per-item target).
        {3,
         {
             "ALTER TABLE registries ADD COLUMN webhook_secret TEXT NOT NULL DEFAULT ''",
             "ALTER TABLE rules ADD COLUMN sync_on_push INTEGER NOT NULL DEFAULT 0",
             "ALTER TABLE rules ADD COLUMN notify_urls TEXT NOT NULL DEFAULT '[]'",
             "ALTER TABLE rules ADD COLUMN notify_on TEXT NOT NULL DEFAULT 'always'",
             R"(CREATE TABLE replication_groups (
                  id INTEGER PRIMARY KEY AUTOINCREMENT,
                  name TEXT NOT NULL UNIQUE,
                  primary_registry_id INTEGER NOT NULL REFERENCES registries(id) ON DELETE RESTRICT,
                  replicate_deletes INTEGER NOT NULL DEFAULT 0,
                  enabled INTEGER NOT NULL DEFAULT 1,
                  schedule TEXT NOT NULL DEFAULT '',
                  next_fire_ms INTEGER,
                  last_fire_ms INTEGER,
                  created_ms INTEGER NOT NULL,
                  updated_ms INTEGER NOT NULL))",
             "CREATE INDEX replication_groups_primary ON replication_groups(primary_registry_id)",
             R"(CREATE TABLE replication_replicas (
                  group_id INTEGER NOT NULL REFERENCES replication_groups(id) ON DELETE CASCADE,
                  registry_id INTEGER NOT NULL REFERENCES registries(id) ON DELETE RESTRICT,
                  position INTEGER NOT NULL,
                  PRIMARY KEY (group_id, registry_id)))",
             "CREATE INDEX replication_replicas_registry ON replication_replicas(registry_id)",
             // A column added with REFERENCES must default to NULL (SQLite, ALTER TABLE ADD COLUMN).
             "ALTER TABLE tasks ADD COLUMN group_id INTEGER REFERENCES replication_groups(id) ON DELETE SET NULL",
             "ALTER TABLE tasks ADD COLUMN group_name TEXT NOT NULL DEFAULT ''",
             "ALTER TABLE tasks ADD COLUMN scope TEXT NOT NULL DEFAULT '[]'",
             "CREATE INDEX tasks_group ON tasks(group_id, id)",
             "ALTER TABLE task_items ADD COLUMN target TEXT NOT NULL DEFAULT ''",
             R"(CREATE TABLE events (
                  id INTEGER PRIMARY KEY AUTOINCREMENT,
                  registry_id INTEGER NOT NULL REFERENCES registries(id) ON DELETE CASCADE,
                  event_id TEXT NOT NULL,
                  action TEXT NOT NULL,
                  repository TEXT NOT NULL,
                  tag TEXT NOT NULL DEFAULT '',
                  digest TEXT NOT NULL DEFAULT '',
                  received_ms INTEGER NOT NULL,
                  processed INTEGER NOT NULL DEFAULT 0,
                  task_ids TEXT NOT NULL DEFAULT '[]',
                  UNIQUE (registry_id, event_id)))",
             "CREATE INDEX events_pending ON events(processed, received_ms, id)",
             R"(CREATE TABLE deliveries (
                  id INTEGER PRIMARY KEY AUTOINCREMENT,
                  task_id INTEGER NOT NULL REFERENCES tasks(id) ON DELETE CASCADE,
                  url TEXT NOT NULL,
                  status TEXT NOT NULL DEFAULT 'pending',
                  attempts INTEGER NOT NULL DEFAULT 0,
                  last_status INTEGER NOT NULL DEFAULT 0,
                  last_error TEXT NOT NULL DEFAULT '',
                  created_ms INTEGER NOT NULL,
                  finished_ms INTEGER))",
             "CREATE INDEX deliveries_task ON deliveries(task_id, id)",
             "CREATE INDEX deliveries_status ON deliveries(status, id)",
         }},
    };
    return list;
}

// ---------------------------------------------------------------------------------------------
// Files

Status make_private_dir(const std::string& dir) {
    std::error_code ec;
    const std::filesystem::path p(dir);
    if (p.has_parent_path() && !p.parent_path().empty()) {
        std::filesystem::create_directories(p.parent_path(), ec);
        if (ec) return Error{ec, "state store: cannot create " + quote_path(p.parent_path().string()) + ": " + ec.message()};
    }
    if (::mkdir(dir.c_str(), 0700) != 0 && errno != EEXIST) return os_error(errno, "cannot create " + quote_path(dir));
    struct stat st {};
    if (::stat(dir.c_str(), &st) != 0) return os_error(errno, "cannot stat " + quote_path(dir));
    if (!S_ISDIR(st.st_mode)) return err(ErrorKind::internal, "state store: " + quote_path(dir) + " is not a directory");
    if ((st.st_mode & 077) != 0 && ::chmod(dir.c_str(), st.st_mode & 0700) != 0)
        return os_error(errno, "cannot restrict the mode of " + quote_path(dir));
    return netio::ok_status();
}

// Creates `path` 0600 if missing; sets an existing one to 0600. Refuses symlinks and non-files.
Status make_private_file(const std::string& path, bool create) {
    const int flags = O_RDWR | O_CLOEXEC | O_NOFOLLOW | (create ? O_CREAT : 0);
    netio::UniqueFd fd(::open(path.c_str(), flags, 0600));
    if (!fd.valid()) {
        if (!create && errno == ENOENT) return netio::ok_status();
        return os_error(errno, "cannot open " + quote_path(path));
    }
    struct stat st {};
    if (::fstat(fd.get(), &st) != 0) return os_error(errno, "cannot stat " + quote_path(path));
    if (!S_ISREG(st.st_mode)) return err(ErrorKind::internal, "state store: " + quote_path(path) + " is not a regular file");
    if ((st.st_mode & 07777) != 0600 && ::fchmod(fd.get(), 0600) != 0)
        return os_error(errno, "cannot set the mode of " + quote_path(path) + " to 0600");
    return netio::ok_status();
}

// ---------------------------------------------------------------------------------------------
// Rows

constexpr std::string_view kRegistryColumns =
    "SELECT id, name, url, region, insecure, ca_file, (username != '' OR password != ''), created_ms, updated_ms, "
    "webhook_secret != '' FROM registries ";

Registry read_registry(const Stmt& s) {
    Registry r;
    r.id = s.i64(0);
    r.name = s.text(1);
    r.url = s.text(2);
    r.region = s.text(3);
    r.insecure = s.flag(4);
    r.ca_file = s.text(5);
    r.has_credentials = s.flag(6);
    r.created = s.time(7);
    r.updated = s.time(8);
    r.has_webhook_secret = s.flag(9);
    return r;
}

// JSON text columns (notify_urls, scope, task_ids) are written by this file only; a value that does
// not parse reads as empty.
std::string urls_to_db(const std::vector<std::string>& urls) { return nlohmann::json(urls).dump(); }

std::vector<std::string> urls_from_db(const std::string& text) {
    std::vector<std::string> out;
    const auto j = nlohmann::json::parse(text, nullptr, false);
    if (!j.is_array()) return out;
    for (const auto& v : j)
        if (v.is_string()) out.push_back(v.get<std::string>());
    return out;
}

std::string ids_to_db(const std::vector<int64_t>& ids) { return nlohmann::json(ids).dump(); }

std::vector<int64_t> ids_from_db(const std::string& text) {
    std::vector<int64_t> out;
    const auto j = nlohmann::json::parse(text, nullptr, false);
    if (!j.is_array()) return out;
    for (const auto& v : j)
        if (v.is_number_integer()) out.push_back(v.get<int64_t>());
    return out;
}

std::string scope_to_db(const std::vector<TaskScope>& scope) {
    auto j = nlohmann::json::array();
    for (const auto& s : scope)
        j.push_back({{"repository", s.repository}, {"tag", s.tag}, {"digest", s.digest}, {"remove", s.remove}});
    return j.dump();
}

std::vector<TaskScope> scope_from_db(const std::string& text) {
    std::vector<TaskScope> out;
    const auto j = nlohmann::json::parse(text, nullptr, false);
    if (!j.is_array()) return out;
    for (const auto& v : j) {
        if (!v.is_object()) continue;
        TaskScope s;
        s.repository = v.value("repository", "");
        s.tag = v.value("tag", "");
        s.digest = v.value("digest", "");
        s.remove = v.value("remove", false);
        out.push_back(std::move(s));
    }
    return out;
}

constexpr std::string_view kRuleColumns =
    "SELECT r.id, r.name, r.description, src.name, r.source_namespace, r.repo_filter, r.tag_filter, r.type, "
    "dst.name, r.target_namespace, (r.target_username != '' OR r.target_password != ''), r.overwrite, r.enabled, "
    "r.schedule, r.source_registry_id, r.target_registry_id, sc.next_fire_ms, r.created_ms, r.updated_ms, "
    "r.sync_on_push, r.notify_urls, r.notify_on "
    "FROM rules r JOIN registries src ON src.id = r.source_registry_id "
    "JOIN registries dst ON dst.id = r.target_registry_id LEFT JOIN schedules sc ON sc.rule_id = r.id ";

Rule read_rule(const Stmt& s) {
    Rule r;
    r.id = s.i64(0);
    r.name = s.text(1);
    r.description = s.text(2);
    r.source_registry = s.text(3);
    r.source_namespace = s.text(4);
    r.repo_filter = s.text(5);
    r.tag_filter = s.text(6);
    r.type = parse_type_filter(s.text(7)).value_or(TypeFilter::all);
    r.target_registry = s.text(8);
    r.target_namespace = s.text(9);
    r.has_target_credentials = s.flag(10);
    r.overwrite = s.flag(11);
    r.enabled = s.flag(12);
    r.schedule = s.text(13);
    r.source_registry_id = s.i64(14);
    r.target_registry_id = s.i64(15);
    r.next_fire = s.opt_time(16);
    r.created = s.time(17);
    r.updated = s.time(18);
    r.sync_on_push = s.flag(19);
    r.notify_urls = urls_from_db(s.text(20));
    r.notify_on = parse_notify_on(s.text(21)).value_or(NotifyOn::always);
    return r;
}

constexpr std::string_view kTaskColumns =
    "SELECT id, rule_id, rule_name, trigger_kind, status, reason, created_ms, started_ms, finished_ms, "
    "cancel_requested, repositories, copied, skipped, failed, bytes, group_id, group_name, scope FROM tasks ";

TaskRecord read_task(const Stmt& s) {
    TaskRecord t;
    t.id = s.i64(0);
    t.rule_id = s.opt_i64(1);
    t.rule_name = s.text(2);
    t.trigger = parse_trigger(s.text(3)).value_or(Trigger::manual);
    t.status = parse_task_status(s.text(4)).value_or(TaskStatus::failed);
    t.reason = s.text(5);
    t.created = s.time(6);
    t.started = s.opt_time(7);
    t.finished = s.opt_time(8);
    t.cancel_requested = s.flag(9);
    t.counters.repositories = s.u64(10);
    t.counters.copied = s.u64(11);
    t.counters.skipped = s.u64(12);
    t.counters.failed = s.u64(13);
    t.counters.bytes = s.u64(14);
    t.group_id = s.opt_i64(15);
    t.group_name = s.text(16);
    t.scope = scope_from_db(s.text(17));
    return t;
}

constexpr std::string_view kItemColumns =
    "SELECT id, task_id, repository, tag, digest, action, reason, bytes, duration_ms, target FROM task_items ";

TaskItem read_item(const Stmt& s) {
    TaskItem i;
    i.id = s.i64(0);
    i.task_id = s.i64(1);
    i.repository = s.text(2);
    i.tag = s.text(3);
    i.digest = s.text(4);
    i.action = parse_item_action(s.text(5)).value_or(ItemAction::failed);
    i.reason = s.text(6);
    i.bytes = s.u64(7);
    i.duration_ms = s.u64(8);
    i.target = s.text(9);
    return i;
}

constexpr std::string_view kGroupColumns =
    "SELECT g.id, g.name, p.name, g.primary_registry_id, g.replicate_deletes, g.enabled, g.schedule, "
    "g.next_fire_ms, g.created_ms, g.updated_ms FROM replication_groups g "
    "JOIN registries p ON p.id = g.primary_registry_id ";

ReplicationGroup read_group(const Stmt& s) {
    ReplicationGroup g;
    g.id = s.i64(0);
    g.name = s.text(1);
    g.primary = s.text(2);
    g.primary_id = s.i64(3);
    g.replicate_deletes = s.flag(4);
    g.enabled = s.flag(5);
    g.schedule = s.text(6);
    g.next_fire = s.opt_time(7);
    g.created = s.time(8);
    g.updated = s.time(9);
    return g;
}

constexpr std::string_view kEventColumns =
    "SELECT e.id, e.registry_id, r.name, e.event_id, e.action, e.repository, e.tag, e.digest, e.received_ms, "
    "e.processed, e.task_ids FROM events e JOIN registries r ON r.id = e.registry_id ";

StoredEvent read_event(const Stmt& s) {
    StoredEvent e;
    e.id = s.i64(0);
    e.registry_id = s.i64(1);
    e.registry_name = s.text(2);
    e.event_id = s.text(3);
    e.remove = s.text(4) == "delete";
    e.repository = s.text(5);
    e.tag = s.text(6);
    e.digest = s.text(7);
    e.received = s.time(8);
    e.processed = s.flag(9);
    e.task_ids = ids_from_db(s.text(10));
    return e;
}

constexpr std::string_view kDeliveryColumns =
    "SELECT id, task_id, url, status, attempts, last_status, last_error, created_ms, finished_ms FROM deliveries ";

Delivery read_delivery(const Stmt& s) {
    Delivery d;
    d.id = s.i64(0);
    d.task_id = s.i64(1);
    d.url = s.text(2);
    d.status = s.text(3);
    d.attempts = static_cast<uint32_t>(std::min<uint64_t>(s.u64(4), std::numeric_limits<uint32_t>::max()));
    d.last_status = static_cast<int>(s.i64(5));
    d.last_error = s.text(6);
    d.created = s.time(7);
    d.finished = s.opt_time(8);
    return d;
}

std::string sql(std::string_view columns, std::string_view rest) {
    std::string out(columns);
    out += rest;
    return out;
}

// Reads every row of a prepared statement with `read`.
template <class T, class Read>
Result<std::vector<T>> read_all(Result<Stmt> st, Read read) {
    if (!st.ok()) return st.error();
    std::vector<T> out;
    for (;;) {
        auto row = st->step();
        if (!row.ok()) return row.error();
        if (!*row) return out;
        out.push_back(read(*st));
    }
}

// Reads one row, or returns not_found with `missing`.
template <class T, class Read>
Result<T> read_one(Result<Stmt> st, Read read, const std::string& missing) {
    if (!st.ok()) return st.error();
    auto row = st->step();
    if (!row.ok()) return row.error();
    if (!*row) return err(ErrorKind::not_found, missing);
    return read(*st);
}

std::string no_rule(int64_t id) { return "no rule with id " + std::to_string(id); }
std::string no_registry(int64_t id) { return "no registry with id " + std::to_string(id); }
std::string no_task(int64_t id) { return "no task with id " + std::to_string(id); }
std::string no_group(int64_t id) { return "no replication group with id " + std::to_string(id); }
std::string no_delivery(int64_t id) { return "no delivery with id " + std::to_string(id); }

Error invalid(const FieldErrors& errors) { return err(ErrorKind::invalid, describe(errors)); }

// The status of a task, or not_found.
Result<TaskStatus> task_status(sqlite3* db, int64_t task_id) {
    return read_one<TaskStatus>(
        prepare(db, "SELECT status FROM tasks WHERE id = ?1", task_id),
        [](const Stmt& s) { return parse_task_status(s.text(0)).value_or(TaskStatus::failed); }, no_task(task_id));
}

constexpr std::string_view kTerminalStatuses = "('Succeeded', 'PartiallyFailed', 'Failed', 'Stopped')";

}  // namespace

// ---------------------------------------------------------------------------------------------
// Open and migrate

void Store::DbDeleter::operator()(sqlite3* db) const noexcept { sqlite3_close_v2(db); }

Store::Store(std::unique_ptr<sqlite3, DbDeleter> db, netio::UniqueFd lock, Options options)
    : lock_(std::move(lock)), db_(std::move(db)), options_(std::move(options)) {}

Store::~Store() = default;

int Store::latest_schema_version() noexcept { return migrations().back().version; }

Result<std::unique_ptr<Store>> Store::open(const std::string& state_dir, Options options) {
    if (state_dir.empty()) return err(ErrorKind::invalid, "state_dir: must not be empty");
    if (!options.clock) options.clock = now_ms;
    if (auto r = make_private_dir(state_dir); !r.ok()) return r.error();

    const std::string lock_path = state_dir + "/state.lock";
    netio::UniqueFd lock(::open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600));
    if (!lock.valid()) return os_error(errno, "cannot open " + quote_path(lock_path));
    if (::flock(lock.get(), LOCK_EX | LOCK_NB) != 0) {
        if (errno == EWOULDBLOCK)
            return err(ErrorKind::conflict,
                       "state store: " + quote_path(state_dir) + " is in use by another crossdock process");
        return os_error(errno, "cannot lock " + quote_path(lock_path));
    }

    const std::string db_path = state_dir + "/state.db";
    if (auto r = make_private_file(db_path, true); !r.ok()) return r.error();
    for (const char* suffix : {"-wal", "-shm"}) {
        if (auto r = make_private_file(db_path + suffix, false); !r.ok()) return r.error();
    }

    sqlite3* raw = nullptr;
    const int rc = sqlite3_open_v2(db_path.c_str(), &raw, SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOFOLLOW, nullptr);
    std::unique_ptr<sqlite3, DbDeleter> db(raw);
    if (rc != SQLITE_OK) {
        if (!db) return err(ErrorKind::internal, "state store: out of memory opening " + quote_path(db_path));
        return db_error(db.get(), "cannot open " + quote_path(db_path));
    }
    sqlite3_extended_result_codes(db.get(), 1);
    sqlite3_busy_timeout(db.get(), static_cast<int>(options.busy_timeout.count()));

    // WAL: readers do not block the writer. synchronous=FULL: a commit is on disk when it returns.
    // secure_delete: replaced credentials do not linger in free pages.
    for (const char* pragma : {"PRAGMA foreign_keys = ON", "PRAGMA synchronous = FULL", "PRAGMA secure_delete = ON",
                               "PRAGMA trusted_schema = OFF"}) {
        if (sqlite3_exec(db.get(), pragma, nullptr, nullptr, nullptr) != SQLITE_OK)
            return db_error(db.get(), pragma);
    }
    auto mode = read_one<std::string>(prepare(db.get(), "PRAGMA journal_mode = WAL"),
                                      [](const Stmt& s) { return s.text(0); }, "journal_mode");
    if (!mode.ok()) return mode.error();
    if (*mode != "wal") return err(ErrorKind::internal, "state store: WAL mode refused (journal_mode is " + *mode + ")");
    auto fk = read_one<bool>(prepare(db.get(), "PRAGMA foreign_keys"), [](const Stmt& s) { return s.flag(0); },
                             "foreign_keys");
    if (!fk.ok()) return fk.error();
    if (!*fk) return err(ErrorKind::internal, "state store: this SQLite does not enforce foreign keys");

    std::unique_ptr<Store> store(new Store(std::move(db), std::move(lock), std::move(options)));
    if (auto r = store->migrate(); !r.ok()) return r.error();
    if (auto r = store->schedule_missing_fires(); !r.ok()) return r.error();
    return store;
}

Result<int> Store::schema_version() {
    auto v = read_one<int64_t>(prepare(db_.get(), "SELECT max(version) FROM schema_version"),
                               [](const Stmt& s) { return s.is_null(0) ? int64_t{0} : s.i64(0); }, "schema_version");
    if (!v.ok()) return v.error();
    return static_cast<int>(*v);
}

Status Store::migrate() {
    sqlite3* db = db_.get();
    if (sqlite3_exec(db, "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)", nullptr, nullptr,
                     nullptr) != SQLITE_OK)
        return db_error(db, "create schema_version");
    auto current = schema_version();
    if (!current.ok()) return current.error();
    if (*current > latest_schema_version())
        return err(ErrorKind::internal, "state store: state.db has schema version " + std::to_string(*current) +
                                            ", newer than this crossdock knows (" +
                                            std::to_string(latest_schema_version()) + "); refusing to open it");
    for (const auto& m : migrations()) {
        if (m.version <= *current) continue;
        auto tx = Transaction::begin(db);
        if (!tx.ok()) return tx.error();
        for (const char* step : m.steps) {
            if (sqlite3_exec(db, step, nullptr, nullptr, nullptr) != SQLITE_OK)
                return db_error(db, "migration to schema version " + std::to_string(m.version));
        }
        if (auto r = exec(db, "DELETE FROM schema_version"); !r.ok()) return r.error();
        if (auto r = exec(db, "INSERT INTO schema_version (version) VALUES (?1)", m.version); !r.ok())
            return r.error();
        if (auto r = tx->commit(); !r.ok()) return r;
    }
    return netio::ok_status();
}

Status Store::schedule_missing_fires() {
    struct Pending {
        int64_t id;
        std::string schedule;
    };
    auto pending = read_all<Pending>(
        prepare(db_.get(),
                "SELECT r.id, r.schedule FROM rules r LEFT JOIN schedules s ON s.rule_id = r.id "
                "WHERE r.schedule != '' AND s.next_fire_ms IS NULL"),
        [](const Stmt& s) { return Pending{s.i64(0), s.text(1)}; });
    if (!pending.ok()) return pending.error();
    const Time now = options_.clock();
    for (const auto& p : *pending) {
        const auto schedule = Schedule::parse(p.schedule);
        const auto next = schedule.ok() ? schedule.value.next_after(now) : std::nullopt;
        auto r = exec(db_.get(),
                      "INSERT INTO schedules (rule_id, next_fire_ms) VALUES (?1, ?2) "
                      "ON CONFLICT (rule_id) DO UPDATE SET next_fire_ms = excluded.next_fire_ms",
                      p.id, next);
        if (!r.ok()) return r.error();
    }
    auto groups = read_all<Pending>(
        prepare(db_.get(), "SELECT id, schedule FROM replication_groups WHERE schedule != '' AND next_fire_ms IS NULL"),
        [](const Stmt& s) { return Pending{s.i64(0), s.text(1)}; });
    if (!groups.ok()) return groups.error();
    for (const auto& p : *groups) {
        const auto schedule = Schedule::parse(p.schedule);
        const auto next = schedule.ok() ? schedule.value.next_after(now) : std::nullopt;
        auto r = exec(db_.get(), "UPDATE replication_groups SET next_fire_ms = ?2 WHERE id = ?1", p.id, next);
        if (!r.ok()) return r.error();
    }
    return netio::ok_status();
}

// ---------------------------------------------------------------------------------------------
// Registries

Result<Registry> Store::add_registry(const Registry& in) {
    auto checked = check(in);
    if (!checked.ok()) return invalid(checked.errors);
    const Registry& r = checked.value;
    const Credentials creds = r.credentials.value_or(Credentials{});
    const Time now = options_.clock();
    auto st = prepare(db_.get(),
                      "INSERT INTO registries (name, url, region, insecure, ca_file, username, password, created_ms, "
                      "updated_ms, webhook_secret) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8, ?9)",
                      r.name, r.url, r.region, r.insecure, r.ca_file, creds.username, creds.password, now,
                      r.webhook_secret.value_or(std::string()));
    if (!st.ok()) return st.error();
    if (auto res = st->run(); !res.ok()) {
        if (is_unique_violation(st->rc()))
            return err(ErrorKind::conflict, "a registry named " + quote(r.name) + " already exists");
        return res.error();
    }
    return get_registry(sqlite3_last_insert_rowid(db_.get()));
}

Result<std::vector<Registry>> Store::list_registries() {
    return read_all<Registry>(prepare(db_.get(), sql(kRegistryColumns, "ORDER BY name")), read_registry);
}

Result<Registry> Store::get_registry(int64_t id) {
    return read_one<Registry>(prepare(db_.get(), sql(kRegistryColumns, "WHERE id = ?1"), id), read_registry,
                              no_registry(id));
}

Result<Registry> Store::get_registry_by_name(std::string_view name) {
    return read_one<Registry>(prepare(db_.get(), sql(kRegistryColumns, "WHERE name = ?1"), name), read_registry,
                              "no registry named " + quote(name));
}

Result<Registry> Store::update_registry(const Registry& in) {
    auto checked = check(in);
    if (!checked.ok()) return invalid(checked.errors);
    const Registry& r = checked.value;
    auto tx = Transaction::begin(db_.get());
    if (!tx.ok()) return tx.error();
    auto st = prepare(db_.get(),
                      "UPDATE registries SET name = ?2, url = ?3, region = ?4, insecure = ?5, ca_file = ?6, "
                      "updated_ms = ?7 WHERE id = ?1",
                      r.id, r.name, r.url, r.region, r.insecure, r.ca_file, options_.clock());
    if (!st.ok()) return st.error();
    if (auto res = st->run(); !res.ok()) {
        if (is_unique_violation(st->rc()))
            return err(ErrorKind::conflict, "a registry named " + quote(r.name) + " already exists");
        return res.error();
    }
    if (sqlite3_changes64(db_.get()) == 0) return err(ErrorKind::not_found, no_registry(r.id));
    if (r.credentials) {
        auto res = exec(db_.get(), "UPDATE registries SET username = ?2, password = ?3 WHERE id = ?1", r.id,
                        r.credentials->username, r.credentials->password);
        if (!res.ok()) return res.error();
    }
    if (r.webhook_secret) {
        auto res = exec(db_.get(), "UPDATE registries SET webhook_secret = ?2 WHERE id = ?1", r.id, *r.webhook_secret);
        if (!res.ok()) return res.error();
    }
    if (auto res = tx->commit(); !res.ok()) return res.error();
    return get_registry(r.id);
}

Status Store::remove_registry(int64_t id) {
    auto tx = Transaction::begin(db_.get());
    if (!tx.ok()) return tx.error();
    auto reg = get_registry(id);
    if (!reg.ok()) return reg.error();
    constexpr int kNamesShown = 10;
    auto users = read_all<std::string>(
        prepare(db_.get(),
                "SELECT name FROM rules WHERE source_registry_id = ?1 OR target_registry_id = ?1 ORDER BY name "
                "LIMIT ?2",
                id, kNamesShown + 1),
        [](const Stmt& s) { return s.text(0); });
    if (!users.ok()) return users.error();
    auto groups = read_all<std::string>(
        prepare(db_.get(),
                "SELECT name FROM replication_groups WHERE primary_registry_id = ?1 OR id IN "
                "(SELECT group_id FROM replication_replicas WHERE registry_id = ?1) ORDER BY name LIMIT ?2",
                id, kNamesShown + 1),
        [](const Stmt& s) { return s.text(0); });
    if (!groups.ok()) return groups.error();
    auto list = [](const std::vector<std::string>& names) {
        std::string out;
        for (size_t i = 0; i < names.size() && i < kNamesShown; ++i) {
            if (i > 0) out += ", ";
            out += quote(names[i]);
        }
        if (names.size() > kNamesShown) out += ", ...";
        return out;
    };
    if (!users->empty() || !groups->empty()) {
        std::string msg = "registry " + quote(reg->name) + " is used by ";
        if (!users->empty()) msg += std::string(users->size() > 1 ? "rules " : "rule ") + list(*users);
        if (!users->empty() && !groups->empty()) msg += " and ";
        if (!groups->empty())
            msg += std::string(groups->size() > 1 ? "replication groups " : "replication group ") + list(*groups);
        msg += "; delete ";
        msg += users->size() + groups->size() > 1 ? "them" : "it";
        msg += " or point ";
        msg += users->size() + groups->size() > 1 ? "them" : "it";
        msg += " elsewhere first";
        return err(ErrorKind::conflict, std::move(msg));
    }
    if (auto r = exec(db_.get(), "DELETE FROM registries WHERE id = ?1", id); !r.ok()) return r.error();
    return tx->commit();
}

Result<std::string> Store::webhook_secret_for(int64_t registry_id) {
    return read_one<std::string>(prepare(db_.get(), "SELECT webhook_secret FROM registries WHERE id = ?1", registry_id),
                                 [](const Stmt& s) { return s.text(0); }, no_registry(registry_id));
}

Result<Credentials> Store::credentials_for(int64_t registry_id) {
    return read_one<Credentials>(prepare(db_.get(), "SELECT username, password FROM registries WHERE id = ?1",
                                         registry_id),
                                 [](const Stmt& s) { return Credentials{s.text(0), s.text(1), {}}; },
                                 no_registry(registry_id));
}

// ---------------------------------------------------------------------------------------------
// Links

Result<Link> Store::set_link(const Link& in) {
    auto checked = check(in);
    if (!checked.ok()) return invalid(checked.errors);
    const Link& l = checked.value;
    auto r = exec(db_.get(),
                  "INSERT INTO links (source_region, target_region, rate_bytes_per_s, burst_bytes) "
                  "VALUES (?1, ?2, ?3, ?4) ON CONFLICT (source_region, target_region) DO UPDATE SET "
                  "rate_bytes_per_s = excluded.rate_bytes_per_s, burst_bytes = excluded.burst_bytes",
                  l.source_region, l.target_region, l.rate_bytes_per_s, l.burst_bytes);
    if (!r.ok()) return r.error();
    return l;
}

Result<std::vector<Link>> Store::list_links() {
    return read_all<Link>(prepare(db_.get(),
                                  "SELECT source_region, target_region, rate_bytes_per_s, burst_bytes FROM links "
                                  "ORDER BY source_region, target_region"),
                          [](const Stmt& s) { return Link{s.text(0), s.text(1), s.u64(2), s.u64(3)}; });
}

Status Store::remove_link(std::string_view source_region, std::string_view target_region) {
    auto r = exec(db_.get(), "DELETE FROM links WHERE source_region = ?1 AND target_region = ?2", source_region,
                  target_region);
    if (!r.ok()) return r.error();
    if (*r == 0)
        return err(ErrorKind::not_found, "no link from region " + quote(source_region) + " to region " +
                                             quote(target_region));
    return netio::ok_status();
}

// ---------------------------------------------------------------------------------------------
// Rules

namespace {

// The id of the registry named `name`, or an invalid error naming `field`.
Result<int64_t> registry_id_for(sqlite3* db, const char* field, const std::string& name) {
    auto id = read_one<int64_t>(prepare(db, "SELECT id FROM registries WHERE name = ?1", name),
                                [](const Stmt& s) { return s.i64(0); }, "");
    if (!id.ok() && kind_of(id.error()) == ErrorKind::not_found)
        return invalid({{field, "no registry named " + quote(name)}});
    return id;
}

// Sets the rule's next fire time from its schedule (none: the row goes).
Status reschedule(sqlite3* db, int64_t rule_id, const std::string& schedule, Time now) {
    const auto parsed = Schedule::parse(schedule);
    if (!parsed.ok() || parsed.value.empty()) {
        auto r = exec(db, "DELETE FROM schedules WHERE rule_id = ?1", rule_id);
        if (!r.ok()) return r.error();
        return netio::ok_status();
    }
    auto r = exec(db,
                  "INSERT INTO schedules (rule_id, next_fire_ms) VALUES (?1, ?2) "
                  "ON CONFLICT (rule_id) DO UPDATE SET next_fire_ms = excluded.next_fire_ms",
                  rule_id, parsed.value.next_after(now));
    if (!r.ok()) return r.error();
    return netio::ok_status();
}

}  // namespace

Result<Rule> Store::read_rule_where_id(int64_t id) {
    return read_one<Rule>(prepare(db_.get(), sql(kRuleColumns, "WHERE r.id = ?1"), id), read_rule, no_rule(id));
}

Result<Rule> Store::create_rule(const Rule& in) {
    auto checked = check(in);
    if (!checked.ok()) return invalid(checked.errors);
    const Rule& r = checked.value;
    auto tx = Transaction::begin(db_.get());
    if (!tx.ok()) return tx.error();
    auto src = registry_id_for(db_.get(), "source_registry", r.source_registry);
    if (!src.ok()) return src.error();
    auto dst = registry_id_for(db_.get(), "target_registry", r.target_registry);
    if (!dst.ok()) return dst.error();
    const Credentials creds = r.target_credentials.value_or(Credentials{});
    const Time now = options_.clock();
    auto st = prepare(db_.get(),
                      "INSERT INTO rules (name, description, source_registry_id, source_namespace, repo_filter, "
                      "tag_filter, type, target_registry_id, target_namespace, target_username, target_password, "
                      "overwrite, enabled, schedule, created_ms, updated_ms, sync_on_push, notify_urls, notify_on) "
                      "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?15, ?16, ?17, ?18)",
                      r.name, r.description, *src, r.source_namespace, r.repo_filter, r.tag_filter,
                      to_string(r.type), *dst, r.target_namespace, creds.username, creds.password, r.overwrite,
                      r.enabled, r.schedule, now, r.sync_on_push, urls_to_db(r.notify_urls), to_string(r.notify_on));
    if (!st.ok()) return st.error();
    if (auto res = st->run(); !res.ok()) {
        if (is_unique_violation(st->rc()))
            return err(ErrorKind::conflict, "a rule named " + quote(r.name) + " already exists");
        return res.error();
    }
    const int64_t id = sqlite3_last_insert_rowid(db_.get());
    if (auto res = reschedule(db_.get(), id, r.schedule, now); !res.ok()) return res.error();
    if (auto res = tx->commit(); !res.ok()) return res.error();
    return read_rule_where_id(id);
}

Result<std::vector<Rule>> Store::list_rules() {
    return read_all<Rule>(prepare(db_.get(), sql(kRuleColumns, "ORDER BY r.name")), read_rule);
}

Result<Rule> Store::get_rule(int64_t id) { return read_rule_where_id(id); }

Result<Rule> Store::get_rule_by_name(std::string_view name) {
    return read_one<Rule>(prepare(db_.get(), sql(kRuleColumns, "WHERE r.name = ?1"), name), read_rule,
                          "no rule named " + quote(name));
}

Result<Rule> Store::update_rule(const Rule& in) {
    auto checked = check(in);
    if (!checked.ok()) return invalid(checked.errors);
    const Rule& r = checked.value;
    auto tx = Transaction::begin(db_.get());
    if (!tx.ok()) return tx.error();
    auto old = read_rule_where_id(r.id);
    if (!old.ok()) return old.error();
    auto src = registry_id_for(db_.get(), "source_registry", r.source_registry);
    if (!src.ok()) return src.error();
    auto dst = registry_id_for(db_.get(), "target_registry", r.target_registry);
    if (!dst.ok()) return dst.error();
    const Time now = options_.clock();
    auto st = prepare(db_.get(),
                      "UPDATE rules SET name = ?2, description = ?3, source_registry_id = ?4, source_namespace = ?5, "
                      "repo_filter = ?6, tag_filter = ?7, type = ?8, target_registry_id = ?9, target_namespace = ?10, "
                      "overwrite = ?11, enabled = ?12, schedule = ?13, updated_ms = ?14, sync_on_push = ?15, "
                      "notify_urls = ?16, notify_on = ?17 WHERE id = ?1",
                      r.id, r.name, r.description, *src, r.source_namespace, r.repo_filter, r.tag_filter,
                      to_string(r.type), *dst, r.target_namespace, r.overwrite, r.enabled, r.schedule, now,
                      r.sync_on_push, urls_to_db(r.notify_urls), to_string(r.notify_on));
    if (!st.ok()) return st.error();
    if (auto res = st->run(); !res.ok()) {
        if (is_unique_violation(st->rc()))
            return err(ErrorKind::conflict, "a rule named " + quote(r.name) + " already exists");
        return res.error();
    }
    if (r.target_credentials) {
        auto res = exec(db_.get(), "UPDATE rules SET target_username = ?2, target_password = ?3 WHERE id = ?1", r.id,
                        r.target_credentials->username, r.target_credentials->password);
        if (!res.ok()) return res.error();
    }
    // A new schedule, or a rule enabled again, counts from now: no burst of stale fire times.
    if (old->schedule != r.schedule || (r.enabled && !old->enabled)) {
        if (auto res = reschedule(db_.get(), r.id, r.schedule, now); !res.ok()) return res.error();
    }
    if (auto res = tx->commit(); !res.ok()) return res.error();
    return read_rule_where_id(r.id);
}

Result<std::vector<int64_t>> Store::delete_rule(int64_t id) {
    auto tx = Transaction::begin(db_.get());
    if (!tx.ok()) return tx.error();
    auto exists = read_one<int64_t>(prepare(db_.get(), "SELECT id FROM rules WHERE id = ?1", id),
                                    [](const Stmt& s) { return s.i64(0); }, no_rule(id));
    if (!exists.ok()) return exists.error();
    const Time now = options_.clock();
    auto stopped = exec(db_.get(),
                        "UPDATE tasks SET status = 'Stopped', reason = 'rule deleted', finished_ms = ?2, "
                        "cancel_requested = 1 WHERE rule_id = ?1 AND status = 'Queued'",
                        id, now);
    if (!stopped.ok()) return stopped.error();
    auto running = read_all<int64_t>(
        prepare(db_.get(), "SELECT id FROM tasks WHERE rule_id = ?1 AND status = 'InProgress' ORDER BY id", id),
        [](const Stmt& s) { return s.i64(0); });
    if (!running.ok()) return running.error();
    auto flagged = exec(db_.get(), "UPDATE tasks SET cancel_requested = 1 WHERE rule_id = ?1 AND status = 'InProgress'",
                        id);
    if (!flagged.ok()) return flagged.error();
    if (auto r = exec(db_.get(), "DELETE FROM rules WHERE id = ?1", id); !r.ok()) return r.error();
    if (auto r = tx->commit(); !r.ok()) return r.error();
    return std::move(*running);
}

Result<Credentials> Store::rule_target_credentials(int64_t rule_id) {
    return read_one<Credentials>(
        prepare(db_.get(), "SELECT target_username, target_password FROM rules WHERE id = ?1", rule_id),
        [](const Stmt& s) { return Credentials{s.text(0), s.text(1), {}}; }, no_rule(rule_id));
}

// ---------------------------------------------------------------------------------------------
// Tasks

namespace {

constexpr size_t kMaxField = 1024;  // repository, tag, digest, target of items, scopes and events

Status check_scope(const std::vector<TaskScope>& scope) {
    if (scope.size() > Store::kMaxEventsPerRecord)
        return err(ErrorKind::invalid, "scope: at most " + std::to_string(Store::kMaxEventsPerRecord) + " artifacts");
    for (const auto& s : scope) {
        if (s.repository.empty()) return err(ErrorKind::invalid, "scope: repository must not be empty");
        if (s.repository.size() > kMaxField || s.tag.size() > kMaxField || s.digest.size() > kMaxField)
            return err(ErrorKind::invalid, "scope: repository, tag and digest must be at most " +
                                               std::to_string(kMaxField) + " characters");
    }
    return netio::ok_status();
}

}  // namespace

Result<TaskRecord> Store::create_task(int64_t rule_id, Trigger trigger) { return create_task(rule_id, trigger, {}); }

Result<TaskRecord> Store::create_task(int64_t rule_id, Trigger trigger, const std::vector<TaskScope>& scope) {
    if (auto c = check_scope(scope); !c.ok()) return c.error();
    auto tx = Transaction::begin(db_.get());
    if (!tx.ok()) return tx.error();
    auto name = read_one<std::string>(prepare(db_.get(), "SELECT name FROM rules WHERE id = ?1", rule_id),
                                      [](const Stmt& s) { return s.text(0); }, no_rule(rule_id));
    if (!name.ok()) return name.error();
    auto r = exec(db_.get(),
                  "INSERT INTO tasks (rule_id, rule_name, trigger_kind, status, created_ms, scope) "
                  "VALUES (?1, ?2, ?3, 'Queued', ?4, ?5)",
                  rule_id, *name, to_string(trigger), options_.clock(), scope_to_db(scope));
    if (!r.ok()) return r.error();
    const int64_t id = sqlite3_last_insert_rowid(db_.get());
    if (auto c = tx->commit(); !c.ok()) return c.error();
    return get_task(id);
}

Result<TaskRecord> Store::create_group_task(int64_t group_id, Trigger trigger, const std::vector<TaskScope>& scope) {
    if (auto c = check_scope(scope); !c.ok()) return c.error();
    auto tx = Transaction::begin(db_.get());
    if (!tx.ok()) return tx.error();
    auto name = read_one<std::string>(prepare(db_.get(), "SELECT name FROM replication_groups WHERE id = ?1", group_id),
                                      [](const Stmt& s) { return s.text(0); }, no_group(group_id));
    if (!name.ok()) return name.error();
    auto r = exec(db_.get(),
                  "INSERT INTO tasks (rule_id, rule_name, group_id, group_name, trigger_kind, status, created_ms, scope) "
                  "VALUES (NULL, '', ?1, ?2, ?3, 'Queued', ?4, ?5)",
                  group_id, *name, to_string(trigger), options_.clock(), scope_to_db(scope));
    if (!r.ok()) return r.error();
    const int64_t id = sqlite3_last_insert_rowid(db_.get());
    if (auto c = tx->commit(); !c.ok()) return c.error();
    return get_task(id);
}

Status Store::start_task(int64_t task_id) {
    // A resumed task keeps the time its first run started.
    auto r = exec(db_.get(),
                  "UPDATE tasks SET status = 'InProgress', started_ms = COALESCE(started_ms, ?2) "
                  "WHERE id = ?1 AND status = 'Queued'",
                  task_id, options_.clock());
    if (!r.ok()) return r.error();
    if (*r == 1) return netio::ok_status();
    auto status = task_status(db_.get(), task_id);
    if (!status.ok()) return status.error();
    return err(ErrorKind::conflict, "task " + std::to_string(task_id) + " is " + std::string(to_string(*status)) +
                                        ", not Queued: it cannot start");
}

Status Store::set_task_repositories(int64_t task_id, uint64_t repositories) {
    auto r = exec(db_.get(), "UPDATE tasks SET repositories = ?2 WHERE id = ?1", task_id, repositories);
    if (!r.ok()) return r.error();
    if (*r == 0) return err(ErrorKind::not_found, no_task(task_id));
    return netio::ok_status();
}

Status Store::finish_task(int64_t task_id, TaskStatus status, std::string_view reason) {
    if (!is_terminal(status))
        return err(ErrorKind::invalid, "status: a task finishes as Succeeded, PartiallyFailed, Failed or Stopped, not " +
                                           std::string(to_string(status)));
    auto r = exec(db_.get(),
                  "UPDATE tasks SET status = ?2, reason = ?3, finished_ms = ?4 "
                  "WHERE id = ?1 AND status IN ('Queued', 'InProgress')",
                  task_id, to_string(status), cut(reason, kMaxReasonLength), options_.clock());
    if (!r.ok()) return r.error();
    if (*r == 1) return netio::ok_status();
    auto current = task_status(db_.get(), task_id);
    if (!current.ok()) return current.error();
    return err(ErrorKind::conflict,
               "task " + std::to_string(task_id) + " already finished (" + std::string(to_string(*current)) + ")");
}

Result<TaskRecord> Store::get_task(int64_t task_id) {
    return read_one<TaskRecord>(prepare(db_.get(), sql(kTaskColumns, "WHERE id = ?1"), task_id), read_task,
                                no_task(task_id));
}

Result<TaskPage> Store::list_tasks(const TaskQuery& q) {
    if (q.limit == 0 || q.limit > kMaxPageSize)
        return err(ErrorKind::invalid, "limit: must be 1 to " + std::to_string(kMaxPageSize));
    const std::optional<std::string_view> status =
        q.status ? std::optional<std::string_view>(to_string(*q.status)) : std::nullopt;
    auto rows = read_all<TaskRecord>(
        prepare(db_.get(),
                sql(kTaskColumns,
                    "WHERE (?1 IS NULL OR rule_id = ?1) AND (?2 IS NULL OR status = ?2) "
                    "AND (?3 IS NULL OR created_ms >= ?3) AND (?4 IS NULL OR created_ms < ?4) "
                    "AND (?5 IS NULL OR id < ?5) AND (?8 IS NULL OR group_id = ?8) "
                    "ORDER BY id DESC LIMIT ?6 OFFSET ?7"),
                q.rule_id, status, q.created_from, q.created_to, q.cursor, static_cast<int64_t>(q.limit) + 1,
                static_cast<int64_t>(q.offset), q.group_id),
        read_task);
    if (!rows.ok()) return rows.error();
    TaskPage page;
    page.tasks = std::move(*rows);
    if (page.tasks.size() > q.limit) {
        page.tasks.pop_back();
        page.next_cursor = page.tasks.back().id;
    }
    return page;
}

Result<TaskRecord> Store::request_cancel(int64_t task_id) {
    auto tx = Transaction::begin(db_.get());
    if (!tx.ok()) return tx.error();
    auto status = task_status(db_.get(), task_id);
    if (!status.ok()) return status.error();
    Result<int64_t> r = int64_t{0};
    switch (*status) {
    case TaskStatus::queued:
        r = exec(db_.get(),
                 "UPDATE tasks SET status = 'Stopped', reason = 'cancelled', finished_ms = ?2, cancel_requested = 1 "
                 "WHERE id = ?1",
                 task_id, options_.clock());
        break;
    case TaskStatus::in_progress:
        r = exec(db_.get(), "UPDATE tasks SET cancel_requested = 1 WHERE id = ?1", task_id);
        break;
    default:
        return err(ErrorKind::conflict, "task " + std::to_string(task_id) + " already finished (" +
                                            std::string(to_string(*status)) + ")");
    }
    if (!r.ok()) return r.error();
    if (auto c = tx->commit(); !c.ok()) return c.error();
    return get_task(task_id);
}

Result<uint64_t> Store::prune_tasks(const Retention& retention) {
    auto tx = Transaction::begin(db_.get());
    if (!tx.ok()) return tx.error();
    uint64_t removed = 0;
    if (retention.older_than_days) {
        const Time cutoff = options_.clock() - std::chrono::days{*retention.older_than_days};
        auto r = exec(db_.get(),
                      sql("DELETE FROM tasks WHERE finished_ms IS NOT NULL AND finished_ms < ?1 AND status IN ",
                          kTerminalStatuses),
                      cutoff);
        if (!r.ok()) return r.error();
        removed += static_cast<uint64_t>(*r);
    }
    if (retention.keep_last_per_rule) {
        // Ranked per rule and per replication group; tasks of deleted rules and groups (both ids
        // NULL) are ranked together.
        auto r = exec(db_.get(),
                      sql("DELETE FROM tasks WHERE id IN (SELECT id FROM (SELECT id, status, ROW_NUMBER() OVER "
                          "(PARTITION BY rule_id, group_id ORDER BY id DESC) AS rank FROM tasks) WHERE rank > ?1 "
                          "AND status IN ",
                          std::string(kTerminalStatuses) + ")"),
                      static_cast<int64_t>(*retention.keep_last_per_rule));
        if (!r.ok()) return r.error();
        removed += static_cast<uint64_t>(*r);
    }
    if (auto c = tx->commit(); !c.ok()) return c.error();
    return removed;
}

// ---------------------------------------------------------------------------------------------
// Task items

Status Store::append_items(int64_t task_id, const std::vector<TaskItem>& items) {
    if (items.size() > kMaxItemsPerAppend)
        return err(ErrorKind::invalid, "items: at most " + std::to_string(kMaxItemsPerAppend) + " per call");
    for (const auto& i : items) {
        if (i.repository.empty()) return err(ErrorKind::invalid, "items: repository must not be empty");
        if (i.repository.size() > kMaxField || i.tag.size() > kMaxField || i.digest.size() > kMaxField ||
            i.target.size() > kMaxField)
            return err(ErrorKind::invalid, "items: target, repository, tag and digest must be at most " +
                                               std::to_string(kMaxField) + " characters");
    }
    auto tx = Transaction::begin(db_.get());
    if (!tx.ok()) return tx.error();
    auto status = task_status(db_.get(), task_id);
    if (!status.ok()) return status.error();
    if (is_terminal(*status))
        return err(ErrorKind::conflict, "task " + std::to_string(task_id) + " already finished (" +
                                            std::string(to_string(*status)) + "); it takes no more items");
    auto insert = prepare(db_.get(),
                          "INSERT INTO task_items (task_id, repository, tag, digest, action, reason, bytes, "
                          "duration_ms, target) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)");
    if (!insert.ok()) return insert.error();
    TaskCounters add;
    for (const auto& i : items) {
        insert->reset();
        insert->bind(1, task_id);
        insert->bind(2, i.repository);
        insert->bind(3, i.tag);
        insert->bind(4, i.digest);
        insert->bind(5, to_string(i.action));
        insert->bind(6, cut(i.reason, kMaxReasonLength));
        insert->bind(7, i.bytes);
        insert->bind(8, i.duration_ms);
        insert->bind(9, i.target);
        if (auto r = insert->run(); !r.ok()) return r;
        switch (i.action) {
        case ItemAction::copied:
            ++add.copied;
            add.bytes += i.bytes;
            break;
        case ItemAction::skipped_exists:
        case ItemAction::skipped_same_digest: ++add.skipped; break;
        case ItemAction::failed: ++add.failed; break;
        case ItemAction::deleted: ++add.copied; break;
        }
    }
    auto r = exec(db_.get(),
                  "UPDATE tasks SET copied = copied + ?2, skipped = skipped + ?3, failed = failed + ?4, "
                  "bytes = bytes + ?5 WHERE id = ?1",
                  task_id, add.copied, add.skipped, add.failed, add.bytes);
    if (!r.ok()) return r.error();
    return tx->commit();
}

Result<ItemPage> Store::list_items(int64_t task_id, const ItemQuery& q) {
    if (q.limit == 0 || q.limit > kMaxPageSize)
        return err(ErrorKind::invalid, "limit: must be 1 to " + std::to_string(kMaxPageSize));
    if (auto t = task_status(db_.get(), task_id); !t.ok()) return t.error();
    const std::optional<std::string_view> action =
        q.action ? std::optional<std::string_view>(to_string(*q.action)) : std::nullopt;
    auto rows = read_all<TaskItem>(
        prepare(db_.get(),
                sql(kItemColumns,
                    "WHERE task_id = ?1 AND (?2 IS NULL OR action = ?2) AND (?3 IS NULL OR id > ?3) "
                    "ORDER BY id LIMIT ?4 OFFSET ?5"),
                task_id, action, q.cursor, static_cast<int64_t>(q.limit) + 1, static_cast<int64_t>(q.offset)),
        read_item);
    if (!rows.ok()) return rows.error();
    ItemPage page;
    page.items = std::move(*rows);
    if (page.items.size() > q.limit) {
        page.items.pop_back();
        page.next_cursor = page.items.back().id;
    }
    return page;
}

// ---------------------------------------------------------------------------------------------
// Replication groups

namespace {

struct GroupRegistryIds {
    int64_t primary = 0;
    std::vector<int64_t> replicas;
};

// The ids of the group's registries; every name that is not a registry is reported, with its field.
Result<GroupRegistryIds> resolve_group_registries(sqlite3* db, const ReplicationGroup& g) {
    auto lookup = [db](const std::string& name) -> Result<std::optional<int64_t>> {
        auto id = read_one<int64_t>(prepare(db, "SELECT id FROM registries WHERE name = ?1", name),
                                    [](const Stmt& s) { return s.i64(0); }, "");
        if (id.ok()) return std::optional<int64_t>(*id);
        if (kind_of(id.error()) == ErrorKind::not_found) return std::optional<int64_t>();
        return id.error();
    };
    GroupRegistryIds ids;
    FieldErrors errs;
    auto primary = lookup(g.primary);
    if (!primary.ok()) return primary.error();
    if (*primary) ids.primary = **primary;
    else errs.push_back({"primary", "no registry named " + quote(g.primary)});
    for (const auto& name : g.replicas) {
        auto id = lookup(name);
        if (!id.ok()) return id.error();
        if (*id) ids.replicas.push_back(**id);
        else errs.push_back({"replicas", "no registry named " + quote(name)});
    }
    if (!errs.empty()) return invalid(errs);
    return ids;
}

Status write_replicas(sqlite3* db, int64_t group_id, const std::vector<int64_t>& replicas) {
    if (auto r = exec(db, "DELETE FROM replication_replicas WHERE group_id = ?1", group_id); !r.ok()) return r.error();
    for (size_t i = 0; i < replicas.size(); ++i) {
        auto r = exec(db, "INSERT INTO replication_replicas (group_id, registry_id, position) VALUES (?1, ?2, ?3)",
                      group_id, replicas[i], static_cast<int64_t>(i));
        if (!r.ok()) return r.error();
    }
    return netio::ok_status();
}

// Fills in replicas and replica_ids, in the order they were given; `only` limits the query to one group.
Status attach_replicas(sqlite3* db, std::vector<ReplicationGroup>& groups, std::optional<int64_t> only) {
    struct Row {
        int64_t group_id;
        int64_t registry_id;
        std::string name;
    };
    auto rows = read_all<Row>(
        prepare(db,
                "SELECT rr.group_id, rr.registry_id, r.name FROM replication_replicas rr "
                "JOIN registries r ON r.id = rr.registry_id WHERE (?1 IS NULL OR rr.group_id = ?1) "
                "ORDER BY rr.group_id, rr.position",
                only),
        [](const Stmt& s) { return Row{s.i64(0), s.i64(1), s.text(2)}; });
    if (!rows.ok()) return rows.error();
    for (auto& g : groups) {
        g.replicas.clear();
        g.replica_ids.clear();
    }
    for (auto& row : *rows) {
        auto it = std::find_if(groups.begin(), groups.end(), [&](const ReplicationGroup& g) { return g.id == row.group_id; });
        if (it == groups.end()) continue;
        it->replicas.push_back(std::move(row.name));
        it->replica_ids.push_back(row.registry_id);
    }
    return netio::ok_status();
}

Result<ReplicationGroup> read_group_where(sqlite3* db, std::string_view where, const std::string& missing,
                                          const auto& arg) {
    auto g = read_one<ReplicationGroup>(prepare(db, sql(kGroupColumns, where), arg), read_group, missing);
    if (!g.ok()) return g.error();
    std::vector<ReplicationGroup> one{std::move(*g)};
    if (auto r = attach_replicas(db, one, one.front().id); !r.ok()) return r.error();
    return std::move(one.front());
}

Error group_name_taken(const std::string& name) {
    return err(ErrorKind::conflict, "a replication group named " + quote(name) + " already exists");
}

}  // namespace

Result<ReplicationGroup> Store::create_group(const ReplicationGroup& in) {
    auto checked = check(in);
    if (!checked.ok()) return invalid(checked.errors);
    const ReplicationGroup& g = checked.value;
    auto tx = Transaction::begin(db_.get());
    if (!tx.ok()) return tx.error();
    auto ids = resolve_group_registries(db_.get(), g);
    if (!ids.ok()) return ids.error();
    const Time now = options_.clock();
    const auto schedule = Schedule::parse(g.schedule);
    auto st = prepare(db_.get(),
                      "INSERT INTO replication_groups (name, primary_registry_id, replicate_deletes, enabled, schedule, "
                      "next_fire_ms, created_ms, updated_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7)",
                      g.name, ids->primary, g.replicate_deletes, g.enabled, g.schedule, schedule.value.next_after(now),
                      now);
    if (!st.ok()) return st.error();
    if (auto res = st->run(); !res.ok()) {
        if (is_unique_violation(st->rc())) return group_name_taken(g.name);
        return res.error();
    }
    const int64_t id = sqlite3_last_insert_rowid(db_.get());
    if (auto r = write_replicas(db_.get(), id, ids->replicas); !r.ok()) return r.error();
    if (auto r = tx->commit(); !r.ok()) return r.error();
    return get_group(id);
}

Result<std::vector<ReplicationGroup>> Store::list_groups() {
    auto groups = read_all<ReplicationGroup>(prepare(db_.get(), sql(kGroupColumns, "ORDER BY g.name")), read_group);
    if (!groups.ok()) return groups.error();
    if (auto r = attach_replicas(db_.get(), *groups, std::nullopt); !r.ok()) return r.error();
    return groups;
}

Result<ReplicationGroup> Store::get_group(int64_t id) {
    return read_group_where(db_.get(), "WHERE g.id = ?1", no_group(id), id);
}

Result<ReplicationGroup> Store::get_group_by_name(std::string_view name) {
    return read_group_where(db_.get(), "WHERE g.name = ?1", "no replication group named " + quote(name), name);
}

Result<ReplicationGroup> Store::update_group(const ReplicationGroup& in) {
    auto checked = check(in);
    if (!checked.ok()) return invalid(checked.errors);
    const ReplicationGroup& g = checked.value;
    auto tx = Transaction::begin(db_.get());
    if (!tx.ok()) return tx.error();
    auto old = get_group(g.id);
    if (!old.ok()) return old.error();
    auto ids = resolve_group_registries(db_.get(), g);
    if (!ids.ok()) return ids.error();
    const Time now = options_.clock();
    auto st = prepare(db_.get(),
                      "UPDATE replication_groups SET name = ?2, primary_registry_id = ?3, replicate_deletes = ?4, "
                      "enabled = ?5, schedule = ?6, updated_ms = ?7 WHERE id = ?1",
                      g.id, g.name, ids->primary, g.replicate_deletes, g.enabled, g.schedule, now);
    if (!st.ok()) return st.error();
    if (auto res = st->run(); !res.ok()) {
        if (is_unique_violation(st->rc())) return group_name_taken(g.name);
        return res.error();
    }
    if (auto r = write_replicas(db_.get(), g.id, ids->replicas); !r.ok()) return r.error();
    // As for rules: a new schedule, or a group enabled again, counts from now.
    if (old->schedule != g.schedule || (g.enabled && !old->enabled)) {
        const auto schedule = Schedule::parse(g.schedule);
        auto r = exec(db_.get(), "UPDATE replication_groups SET next_fire_ms = ?2 WHERE id = ?1", g.id,
                      schedule.value.next_after(now));
        if (!r.ok()) return r.error();
    }
    if (auto r = tx->commit(); !r.ok()) return r.error();
    return get_group(g.id);
}

Result<std::vector<int64_t>> Store::delete_group(int64_t id) {
    auto tx = Transaction::begin(db_.get());
    if (!tx.ok()) return tx.error();
    auto exists = read_one<int64_t>(prepare(db_.get(), "SELECT id FROM replication_groups WHERE id = ?1", id),
                                    [](const Stmt& s) { return s.i64(0); }, no_group(id));
    if (!exists.ok()) return exists.error();
    auto stopped = exec(db_.get(),
                        "UPDATE tasks SET status = 'Stopped', reason = 'replication group deleted', finished_ms = ?2, "
                        "cancel_requested = 1 WHERE group_id = ?1 AND status = 'Queued'",
                        id, options_.clock());
    if (!stopped.ok()) return stopped.error();
    auto running = read_all<int64_t>(
        prepare(db_.get(), "SELECT id FROM tasks WHERE group_id = ?1 AND status = 'InProgress' ORDER BY id", id),
        [](const Stmt& s) { return s.i64(0); });
    if (!running.ok()) return running.error();
    auto flagged = exec(db_.get(),
                        "UPDATE tasks SET cancel_requested = 1 WHERE group_id = ?1 AND status = 'InProgress'", id);
    if (!flagged.ok()) return flagged.error();
    if (auto r = exec(db_.get(), "DELETE FROM replication_groups WHERE id = ?1", id); !r.ok()) return r.error();
    if (auto r = tx->commit(); !r.ok()) return r.error();
    return std::move(*running);
}

Result<std::vector<DueRule>> Store::due_groups(Time now) {
    return read_all<DueRule>(
        prepare(db_.get(),
                "SELECT id, name, next_fire_ms FROM replication_groups WHERE enabled = 1 AND schedule != '' "
                "AND next_fire_ms IS NOT NULL AND next_fire_ms <= ?1 ORDER BY next_fire_ms, id",
                now),
        [](const Stmt& s) { return DueRule{s.i64(0), s.text(1), s.time(2)}; });
}

Result<std::optional<Time>> Store::record_group_fire(int64_t group_id, Time fired_at) {
    auto tx = Transaction::begin(db_.get());
    if (!tx.ok()) return tx.error();
    auto text = read_one<std::string>(
        prepare(db_.get(), "SELECT schedule FROM replication_groups WHERE id = ?1", group_id),
        [](const Stmt& s) { return s.text(0); }, no_group(group_id));
    if (!text.ok()) return text.error();
    const auto schedule = Schedule::parse(*text);
    const std::optional<Time> next =
        schedule.ok() ? schedule.value.next_after(std::max(fired_at, options_.clock())) : std::nullopt;
    auto r = exec(db_.get(), "UPDATE replication_groups SET next_fire_ms = ?2, last_fire_ms = ?3 WHERE id = ?1",
                  group_id, next, fired_at);
    if (!r.ok()) return r.error();
    if (auto c = tx->commit(); !c.ok()) return c.error();
    return next;
}

// ---------------------------------------------------------------------------------------------
// Webhook events

namespace {

constexpr size_t kMaxEventIdLength = 4096;  // Harbor's derived ids hold repository, tag and digest

// A list of ids held in one JSON column: ids in `add` not yet in `into` are appended.
void merge_ids(std::vector<int64_t>& into, const std::vector<int64_t>& add) {
    for (int64_t id : add)
        if (std::find(into.begin(), into.end(), id) == into.end()) into.push_back(id);
}

}  // namespace

Result<std::vector<StoredEvent>> Store::record_events(int64_t registry_id, const std::vector<RegistryEvent>& events) {
    if (events.size() > kMaxEventsPerRecord)
        return err(ErrorKind::invalid, "events: at most " + std::to_string(kMaxEventsPerRecord) + " per call, not " +
                                           std::to_string(events.size()));
    for (const auto& e : events) {
        if (e.id.empty()) return err(ErrorKind::invalid, "events: an event id must not be empty");
        if (e.id.size() > kMaxEventIdLength)
            return err(ErrorKind::invalid, "events: an event id must be at most " + std::to_string(kMaxEventIdLength) +
                                               " characters");
        if (e.repository.empty()) return err(ErrorKind::invalid, "events: repository must not be empty");
        if (e.repository.size() > kMaxField || e.tag.size() > kMaxField || e.digest.size() > kMaxField)
            return err(ErrorKind::invalid, "events: repository, tag and digest must be at most " +
                                               std::to_string(kMaxField) + " characters");
    }
    auto tx = Transaction::begin(db_.get());
    if (!tx.ok()) return tx.error();
    auto name = read_one<std::string>(prepare(db_.get(), "SELECT name FROM registries WHERE id = ?1", registry_id),
                                      [](const Stmt& s) { return s.text(0); }, no_registry(registry_id));
    if (!name.ok()) return name.error();
    // OR IGNORE: the UNIQUE (registry_id, event_id) of a redelivered event skips the row.
    auto insert = prepare(db_.get(),
                          "INSERT OR IGNORE INTO events (registry_id, event_id, action, repository, tag, digest, "
                          "received_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)");
    if (!insert.ok()) return insert.error();
    const Time now = options_.clock();
    std::vector<StoredEvent> stored;
    for (const auto& e : events) {
        const bool remove = e.action == RegistryEvent::Action::remove;
        insert->reset();
        insert->bind(1, registry_id);
        insert->bind(2, e.id);
        insert->bind(3, remove ? "delete" : "push");
        insert->bind(4, e.repository);
        insert->bind(5, e.tag);
        insert->bind(6, e.digest);
        insert->bind(7, now);
        if (auto r = insert->run(); !r.ok()) return r.error();
        if (sqlite3_changes64(db_.get()) == 0) continue;  // already stored
        StoredEvent s;
        s.id = sqlite3_last_insert_rowid(db_.get());
        s.registry_id = registry_id;
        s.registry_name = *name;
        s.event_id = e.id;
        s.remove = remove;
        s.repository = e.repository;
        s.tag = e.tag;
        s.digest = e.digest;
        s.received = now;
        stored.push_back(std::move(s));
    }
    if (auto r = tx->commit(); !r.ok()) return r.error();
    return stored;
}

Result<std::vector<StoredEvent>> Store::pending_events(Time received_before, uint32_t limit) {
    if (limit == 0 || limit > kMaxEventsPerRecord)
        return err(ErrorKind::invalid, "limit: must be 1 to " + std::to_string(kMaxEventsPerRecord));
    return read_all<StoredEvent>(
        prepare(db_.get(),
                sql(kEventColumns, "WHERE e.processed = 0 AND e.received_ms <= ?1 ORDER BY e.received_ms, e.id LIMIT ?2"),
                received_before, static_cast<int64_t>(limit)),
        read_event);
}

Status Store::mark_events_processed(const std::vector<int64_t>& event_ids, const std::vector<int64_t>& task_ids) {
    if (event_ids.size() > kMaxEventsPerRecord || task_ids.size() > kMaxEventsPerRecord)
        return err(ErrorKind::invalid, "events: at most " + std::to_string(kMaxEventsPerRecord) +
                                           " events and tasks per call");
    auto tx = Transaction::begin(db_.get());
    if (!tx.ok()) return tx.error();
    for (int64_t id : event_ids) {
        auto current = read_one<std::string>(prepare(db_.get(), "SELECT task_ids FROM events WHERE id = ?1", id),
                                             [](const Stmt& s) { return s.text(0); }, "");
        if (!current.ok()) {
            if (kind_of(current.error()) == ErrorKind::not_found) continue;  // pruned meanwhile: nothing to mark
            return current.error();
        }
        std::vector<int64_t> ids = ids_from_db(*current);
        merge_ids(ids, task_ids);
        auto r = exec(db_.get(), "UPDATE events SET processed = 1, task_ids = ?2 WHERE id = ?1", id, ids_to_db(ids));
        if (!r.ok()) return r.error();
    }
    return tx->commit();
}

Result<std::vector<StoredEvent>> Store::list_events(uint32_t limit) {
    if (limit == 0 || limit > kMaxPageSize)
        return err(ErrorKind::invalid, "limit: must be 1 to " + std::to_string(kMaxPageSize));
    return read_all<StoredEvent>(
        prepare(db_.get(), sql(kEventColumns, "ORDER BY e.id DESC LIMIT ?1"), static_cast<int64_t>(limit)), read_event);
}

Result<uint64_t> Store::prune_events(Time before) {
    auto r = exec(db_.get(), "DELETE FROM events WHERE processed = 1 AND received_ms < ?1", before);
    if (!r.ok()) return r.error();
    return static_cast<uint64_t>(*r);
}

// ---------------------------------------------------------------------------------------------
// Deliveries

Result<Delivery> Store::add_delivery(int64_t task_id, std::string_view url) {
    if (url.empty()) return err(ErrorKind::invalid, "url: must not be empty");
    if (url.size() > kMaxUrlLength)
        return err(ErrorKind::invalid, "url: must be at most " + std::to_string(kMaxUrlLength) + " characters");
    auto tx = Transaction::begin(db_.get());
    if (!tx.ok()) return tx.error();
    if (auto t = task_status(db_.get(), task_id); !t.ok()) return t.error();
    auto r = exec(db_.get(), "INSERT INTO deliveries (task_id, url, created_ms) VALUES (?1, ?2, ?3)", task_id, url,
                  options_.clock());
    if (!r.ok()) return r.error();
    const int64_t id = sqlite3_last_insert_rowid(db_.get());
    if (auto c = tx->commit(); !c.ok()) return c.error();
    return read_one<Delivery>(prepare(db_.get(), sql(kDeliveryColumns, "WHERE id = ?1"), id), read_delivery,
                              no_delivery(id));
}

Status Store::update_delivery(int64_t id, std::string_view status, uint32_t attempts, int last_status,
                              std::string_view last_error) {
    if (status != "pending" && status != "delivered" && status != "failed")
        return err(ErrorKind::invalid, "status: " + quote(status) + " is not one of pending, delivered, failed");
    const std::optional<Time> finished = status == "pending" ? std::nullopt : std::optional<Time>(options_.clock());
    auto r = exec(db_.get(),
                  "UPDATE deliveries SET status = ?2, attempts = ?3, last_status = ?4, last_error = ?5, "
                  "finished_ms = ?6 WHERE id = ?1",
                  id, status, static_cast<int64_t>(attempts), last_status, cut(last_error, kMaxReasonLength), finished);
    if (!r.ok()) return r.error();
    if (*r == 0) return err(ErrorKind::not_found, no_delivery(id));
    return netio::ok_status();
}

Result<std::vector<Delivery>> Store::list_deliveries(int64_t task_id) {
    if (auto t = task_status(db_.get(), task_id); !t.ok()) return t.error();
    return read_all<Delivery>(prepare(db_.get(), sql(kDeliveryColumns, "WHERE task_id = ?1 ORDER BY id"), task_id),
                              read_delivery);
}

Result<std::vector<Delivery>> Store::pending_deliveries() {
    return read_all<Delivery>(prepare(db_.get(), sql(kDeliveryColumns, "WHERE status = 'pending' ORDER BY id")),
                              read_delivery);
}

// ---------------------------------------------------------------------------------------------
// Schedules

Result<std::vector<DueRule>> Store::due_rules(Time now) {
    return read_all<DueRule>(
        prepare(db_.get(),
                "SELECT r.id, r.name, s.next_fire_ms FROM rules r JOIN schedules s ON s.rule_id = r.id "
                "WHERE r.enabled = 1 AND r.schedule != '' AND s.next_fire_ms IS NOT NULL AND s.next_fire_ms <= ?1 "
                "ORDER BY s.next_fire_ms, r.id",
                now),
        [](const Stmt& s) { return DueRule{s.i64(0), s.text(1), s.time(2)}; });
}

Result<std::optional<Time>> Store::record_fire(int64_t rule_id, Time fired_at) {
    auto tx = Transaction::begin(db_.get());
    if (!tx.ok()) return tx.error();
    auto text = read_one<std::string>(prepare(db_.get(), "SELECT schedule FROM rules WHERE id = ?1", rule_id),
                                      [](const Stmt& s) { return s.text(0); }, no_rule(rule_id));
    if (!text.ok()) return text.error();
    const auto schedule = Schedule::parse(*text);
    const std::optional<Time> next =
        schedule.ok() ? schedule.value.next_after(std::max(fired_at, options_.clock())) : std::nullopt;
    auto r = exec(db_.get(),
                  "INSERT INTO schedules (rule_id, next_fire_ms, last_fire_ms) VALUES (?1, ?2, ?3) "
                  "ON CONFLICT (rule_id) DO UPDATE SET next_fire_ms = excluded.next_fire_ms, "
                  "last_fire_ms = excluded.last_fire_ms",
                  rule_id, next, fired_at);
    if (!r.ok()) return r.error();
    if (auto c = tx->commit(); !c.ok()) return c.error();
    return next;
}

// ---------------------------------------------------------------------------------------------
// Restart safety

Result<std::vector<TaskRecord>> Store::interrupted_tasks() {
    return read_all<TaskRecord>(
        prepare(db_.get(), sql(kTaskColumns, "WHERE status IN ('Queued', 'InProgress') ORDER BY id")), read_task);
}

Result<uint64_t> Store::fail_interrupted(std::string_view reason) {
    auto r = exec(db_.get(),
                  "UPDATE tasks SET status = 'Failed', reason = ?1, finished_ms = ?2 "
                  "WHERE status IN ('Queued', 'InProgress')",
                  cut(reason, kMaxReasonLength), options_.clock());
    if (!r.ok()) return r.error();
    return static_cast<uint64_t>(*r);
}

Status Store::requeue(int64_t task_id, std::string_view reason) {
    auto tx = Transaction::begin(db_.get());
    if (!tx.ok()) return tx.error();
    auto status = task_status(db_.get(), task_id);
    if (!status.ok()) return status.error();
    if (is_terminal(*status))
        return err(ErrorKind::conflict, "task " + std::to_string(task_id) + " already finished (" +
                                            std::string(to_string(*status)) + "); it cannot be requeued");
    auto r = exec(db_.get(), "UPDATE tasks SET status = 'Queued', finished_ms = NULL, reason = ?2 WHERE id = ?1",
                  task_id, std::string(reason.substr(0, kMaxReasonLength)));
    if (!r.ok()) return r.error();
    return tx->commit();
}

}  // namespace engine
