#include "engine/store.h"

#include <sqlite3.h>
#include <sys/stat.h>

#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>

#include <nlohmann/json.hpp>

namespace {

using engine::ErrorKind;
using engine::Registry;
using engine::Rule;
using engine::Store;
using engine::TaskItem;
using engine::TaskStatus;
using engine::Time;
using engine::Trigger;
namespace chr = std::chrono;
namespace fs = std::filesystem;

constexpr char kSecret[] = "S3CRET-pa55w0rd-do-not-leak";
constexpr char kTargetSecret[] = "TARGET-t0ken-do-not-leak";
constexpr char kUser[] = "robot-account-7";

Time at(const char* rfc3339) { return engine::parse_time(rfc3339).value(); }

// prefix + i, without operator+ on a literal: gcc 12 -O3 reports a false -Wrestrict for
// numbered("v", i) (GCC bug 105329).
std::string numbered(const char* prefix, int i) {
    std::string s(prefix);
    s.append(std::to_string(i));
    return s;
}

// The value of a Result that must have succeeded (a failure is reported, and T{} returned).
template <class T>
T must(netio::Result<T> r) {
    EXPECT_TRUE(r.ok()) << r.error().message;
    return r.ok() ? std::move(r).value() : T{};
}

mode_t mode_of(const fs::path& p) {
    struct stat st {};
    EXPECT_EQ(::stat(p.c_str(), &st), 0) << p;
    return st.st_mode & 07777;
}

std::string file_bytes(const fs::path& p) {
    std::ifstream in(p, std::ios::binary);
    return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

class StoreTest : public ::testing::Test {
protected:
    void SetUp() override {
        char tmpl[] = "/tmp/crossdock-store-test-XXXXXX";
        ASSERT_NE(::mkdtemp(tmpl), nullptr);
        root_ = tmpl;
        dir_ = root_ / "state";
        open_store();
    }
    void TearDown() override {
        store_.reset();
        std::error_code ec;
        fs::remove_all(root_, ec);
    }

    void open_store() {
        store_.reset();
        engine::StoreOptions o;
        o.clock = [this] { return now_; };
        auto s = Store::open(dir_.string(), o);
        ASSERT_TRUE(s.ok()) << s.error().message;
        store_ = std::move(s.value());
    }

    Registry add_registry(const std::string& name, bool with_credentials = false) {
        Registry r;
        r.name = name;
        r.url = "https://" + name + ".example.com";
        r.region = "eu";
        if (with_credentials) r.credentials = engine::Credentials{kUser, kSecret, {}};
        auto added = store_->add_registry(r);
        EXPECT_TRUE(added.ok()) << added.error().message;
        return added.ok() ? added.value() : Registry{};
    }

    Rule rule(const std::string& name) {
        Rule r;
        r.name = name;
        r.source_registry = "src";
        r.source_namespace = "library";
        r.target_registry = "dst";
        return r;
    }

    // Registries "src" and "dst", and a rule.
    Rule add_rule(const std::string& name, const std::string& schedule = "") {
        if (!store_->get_registry_by_name("src").ok()) add_registry("src");
        if (!store_->get_registry_by_name("dst").ok()) add_registry("dst");
        Rule r = rule(name);
        r.schedule = schedule;
        auto created = store_->create_rule(r);
        EXPECT_TRUE(created.ok()) << created.error().message;
        return created.ok() ? created.value() : Rule{};
    }

    int64_t add_task(int64_t rule_id, Trigger trigger = Trigger::manual) {
        auto t = store_->create_task(rule_id, trigger);
        EXPECT_TRUE(t.ok()) << t.error().message;
        return t.ok() ? t->id : 0;
    }

    void finish(int64_t task_id, TaskStatus status = TaskStatus::succeeded) {
        ASSERT_TRUE(store_->start_task(task_id).ok());
        ASSERT_TRUE(store_->finish_task(task_id, status, "").ok());
    }

    fs::path root_;
    fs::path dir_;
    Time now_ = at("2024-06-01T12:00:00Z");
    std::unique_ptr<Store> store_;
};

template <class T>
::testing::AssertionResult fails_with(const netio::Result<T>& r, ErrorKind kind, const std::string& needle) {
    if (r.ok()) return ::testing::AssertionFailure() << "succeeded";
    if (engine::kind_of(r.error()) != kind)
        return ::testing::AssertionFailure() << "kind " << static_cast<int>(engine::kind_of(r.error())) << ": "
                                             << r.error().message;
    if (r.error().message.find(needle) == std::string::npos)
        return ::testing::AssertionFailure() << "message '" << r.error().message << "' lacks '" << needle << "'";
    if (r.error().message.find(kSecret) != std::string::npos ||
        r.error().message.find(kTargetSecret) != std::string::npos)
        return ::testing::AssertionFailure() << "message holds a secret";
    return ::testing::AssertionSuccess();
}

// ---------------------------------------------------------------------------------------------
// Files and open

TEST_F(StoreTest, CreatesPrivateDirAndFile) {
    EXPECT_EQ(mode_of(dir_), 0700u);
    EXPECT_EQ(mode_of(dir_ / "state.db"), 0600u);
    EXPECT_EQ(mode_of(dir_ / "state.lock"), 0600u);
    add_registry("hub", true);  // writes the WAL
    for (const char* f : {"state.db-wal", "state.db-shm"}) {
        if (fs::exists(dir_ / f)) {
            EXPECT_EQ(mode_of(dir_ / f), 0600u) << f;
        }
    }
    auto v = store_->schema_version();
    ASSERT_TRUE(v.ok());
    EXPECT_EQ(*v, Store::latest_schema_version());
}

TEST_F(StoreTest, FixesPermissiveModesOfExistingFiles) {
    store_.reset();
    ASSERT_EQ(::chmod(dir_.c_str(), 0755), 0);
    ASSERT_EQ(::chmod((dir_ / "state.db").c_str(), 0644), 0);
    open_store();
    EXPECT_EQ(mode_of(dir_), 0700u);
    EXPECT_EQ(mode_of(dir_ / "state.db"), 0600u);
}

TEST_F(StoreTest, RefusesSymlinkedDatabase) {
    store_.reset();
    fs::remove(dir_ / "state.db");
    fs::create_symlink(root_ / "elsewhere.db", dir_ / "state.db");
    auto s = Store::open(dir_.string());
    ASSERT_FALSE(s.ok());
    EXPECT_NE(s.error().message.find("state.db"), std::string::npos) << s.error().message;
}

TEST_F(StoreTest, SecondOpenOfTheSameDirIsRefused) {
    auto second = Store::open(dir_.string());
    EXPECT_TRUE(fails_with(second, ErrorKind::conflict, "in use by another crossdock process"));
    store_.reset();
    EXPECT_TRUE(Store::open(dir_.string()).ok());
}

TEST_F(StoreTest, CreatesMissingParents) {
    store_.reset();
    auto s = Store::open((root_ / "a" / "b" / "state").string());
    ASSERT_TRUE(s.ok()) << s.error().message;
    EXPECT_EQ(mode_of(root_ / "a" / "b" / "state"), 0700u);
}

// ---------------------------------------------------------------------------------------------
// Registries

TEST_F(StoreTest, RegistryRoundTrip) {
    Registry r;
    r.name = "hub";
    r.url = "HTTPS://Hub.Example.com:5000/";
    r.region = "eu-west";
    r.ca_file = "/etc/ssl/hub.pem";
    r.credentials = engine::Credentials{kUser, kSecret, {}};
    auto added = store_->add_registry(r);
    ASSERT_TRUE(added.ok()) << added.error().message;
    EXPECT_GT(added->id, 0);
    EXPECT_EQ(added->url, "https://hub.example.com:5000");
    EXPECT_EQ(added->region, "eu-west");
    EXPECT_EQ(added->ca_file, "/etc/ssl/hub.pem");
    EXPECT_TRUE(added->has_credentials);
    EXPECT_FALSE(added->credentials.has_value());  // write-only
    EXPECT_EQ(added->created, now_);

    auto by_id = store_->get_registry(added->id);
    auto by_name = store_->get_registry_by_name("hub");
    ASSERT_TRUE(by_id.ok() && by_name.ok());
    EXPECT_EQ(by_id->name, "hub");
    EXPECT_EQ(by_name->id, added->id);

    auto creds = store_->credentials_for(added->id);
    ASSERT_TRUE(creds.ok());
    EXPECT_EQ(creds->username, kUser);
    EXPECT_EQ(creds->password, kSecret);

    add_registry("alpha");
    auto list = store_->list_registries();
    ASSERT_TRUE(list.ok());
    ASSERT_EQ(list->size(), 2u);
    EXPECT_EQ((*list)[0].name, "alpha");
    EXPECT_FALSE((*list)[0].has_credentials);
    EXPECT_EQ((*list)[1].name, "hub");
}

TEST_F(StoreTest, RegistryUpdateKeepsOrReplacesCredentials) {
    Registry r = add_registry("hub", true);
    now_ += chr::minutes{5};
    r.region = "us";
    r.name = "hub2";
    auto updated = store_->update_registry(r);  // credentials nullopt: kept
    ASSERT_TRUE(updated.ok()) << updated.error().message;
    EXPECT_EQ(updated->name, "hub2");
    EXPECT_EQ(updated->region, "us");
    EXPECT_EQ(updated->updated, now_);
    EXPECT_LT(updated->created, updated->updated);
    EXPECT_EQ(store_->credentials_for(r.id)->password, kSecret);

    r.credentials = engine::Credentials{"", "new-token", {}};
    ASSERT_TRUE(store_->update_registry(r).ok());
    EXPECT_EQ(store_->credentials_for(r.id)->password, "new-token");
    EXPECT_EQ(store_->credentials_for(r.id)->username, "");

    r.credentials = engine::Credentials{};
    auto cleared = store_->update_registry(r);
    ASSERT_TRUE(cleared.ok());
    EXPECT_FALSE(cleared->has_credentials);
}

TEST_F(StoreTest, RegistryErrors) {
    add_registry("hub");
    Registry dup;
    dup.name = "hub";
    dup.url = "https://other.example.com";
    EXPECT_TRUE(fails_with(store_->add_registry(dup), ErrorKind::conflict, "a registry named 'hub' already exists"));

    Registry other = add_registry("other");
    other.name = "hub";
    EXPECT_TRUE(fails_with(store_->update_registry(other), ErrorKind::conflict, "already exists"));

    Registry bad;
    bad.name = "Bad";
    bad.url = "ftp://x";
    EXPECT_TRUE(fails_with(store_->add_registry(bad), ErrorKind::invalid, "name: "));
    EXPECT_TRUE(fails_with(store_->add_registry(bad), ErrorKind::invalid, "url: scheme must be http or https"));

    EXPECT_TRUE(fails_with(store_->get_registry(999), ErrorKind::not_found, "no registry with id 999"));
    EXPECT_TRUE(fails_with(store_->get_registry_by_name("nope"), ErrorKind::not_found, "no registry named 'nope'"));
    EXPECT_TRUE(fails_with(store_->remove_registry(999), ErrorKind::not_found, "999"));
    EXPECT_TRUE(fails_with(store_->credentials_for(999), ErrorKind::not_found, "999"));
    Registry ghost = other;
    ghost.id = 999;
    ghost.name = "ghost";
    EXPECT_TRUE(fails_with(store_->update_registry(ghost), ErrorKind::not_found, "999"));
}

TEST_F(StoreTest, RegistryRemovalBlockedByRule) {
    const Rule r1 = add_rule("uses-both");
    auto src = store_->get_registry_by_name("src");
    ASSERT_TRUE(src.ok());
    auto removed = store_->remove_registry(src->id);
    EXPECT_TRUE(fails_with(removed, ErrorKind::conflict, "registry 'src' is used by rule 'uses-both'"));
    EXPECT_TRUE(store_->get_registry(src->id).ok());

    ASSERT_TRUE(store_->delete_rule(r1.id).ok());
    EXPECT_TRUE(store_->remove_registry(src->id).ok());
    EXPECT_TRUE(fails_with(store_->get_registry(src->id), ErrorKind::not_found, "no registry"));
}

// ---------------------------------------------------------------------------------------------
// Links

TEST_F(StoreTest, Links) {
    ASSERT_TRUE(store_->set_link({"eu", "us", 1000, 0}).ok());
    ASSERT_TRUE(store_->set_link({"eu", "ap", 500, 64}).ok());
    ASSERT_TRUE(store_->set_link({"eu", "us", 2000, 10}).ok());  // replaces
    auto links = store_->list_links();
    ASSERT_TRUE(links.ok());
    ASSERT_EQ(links->size(), 2u);
    EXPECT_EQ((*links)[0].target_region, "ap");
    EXPECT_EQ((*links)[1].rate_bytes_per_s, 2000u);
    EXPECT_EQ((*links)[1].burst_bytes, 10u);
    EXPECT_TRUE(fails_with(store_->set_link({"eu", "us", 0, 0}), ErrorKind::invalid, "rate_bytes_per_s"));
    EXPECT_TRUE(store_->remove_link("eu", "us").ok());
    EXPECT_TRUE(fails_with(store_->remove_link("eu", "us"), ErrorKind::not_found, "no link from region 'eu'"));
}

// ---------------------------------------------------------------------------------------------
// Rules

TEST_F(StoreTest, RuleRoundTrip) {
    add_registry("src");
    add_registry("dst");
    Rule r = rule("nightly");
    r.description = "copy the base images";
    r.repo_filter = "(alpine|debian)";
    r.tag_filter = "v.*";
    r.type = engine::TypeFilter::helm;
    r.target_namespace = "mirror/library";
    r.target_credentials = engine::Credentials{kUser, kTargetSecret, {}};
    r.overwrite = true;
    r.enabled = false;
    r.schedule = "0 3 * * *";
    auto created = store_->create_rule(r);
    ASSERT_TRUE(created.ok()) << created.error().message;
    const Rule& c = *created;
    EXPECT_GT(c.id, 0);
    EXPECT_EQ(c.name, "nightly");
    EXPECT_EQ(c.description, r.description);
    EXPECT_EQ(c.source_registry, "src");
    EXPECT_EQ(c.target_registry, "dst");
    EXPECT_EQ(c.source_registry_id, store_->get_registry_by_name("src")->id);
    EXPECT_EQ(c.repo_filter, r.repo_filter);
    EXPECT_EQ(c.tag_filter, r.tag_filter);
    EXPECT_EQ(c.type, engine::TypeFilter::helm);
    EXPECT_EQ(c.target_namespace, "mirror/library");
    EXPECT_TRUE(c.has_target_credentials);
    EXPECT_FALSE(c.target_credentials.has_value());
    EXPECT_TRUE(c.overwrite);
    EXPECT_FALSE(c.enabled);
    EXPECT_EQ(c.schedule, "0 3 * * *");
    ASSERT_TRUE(c.next_fire.has_value());
    EXPECT_EQ(*c.next_fire, at("2024-06-02T03:00:00Z"));
    EXPECT_EQ(c.created, now_);

    auto creds = store_->rule_target_credentials(c.id);
    ASSERT_TRUE(creds.ok());
    EXPECT_EQ(creds->password, kTargetSecret);

    auto by_name = store_->get_rule_by_name("nightly");
    ASSERT_TRUE(by_name.ok());
    EXPECT_EQ(by_name->id, c.id);
    add_rule("another");
    auto list = store_->list_rules();
    ASSERT_TRUE(list.ok());
    ASSERT_EQ(list->size(), 2u);
    EXPECT_EQ((*list)[0].name, "another");
    EXPECT_TRUE((*list)[0].enabled);
    EXPECT_FALSE((*list)[0].overwrite);
}

TEST_F(StoreTest, RuleErrors) {
    add_rule("one");
    EXPECT_TRUE(fails_with(store_->create_rule(rule("one")), ErrorKind::conflict, "a rule named 'one' already exists"));

    Rule two = add_rule("two");
    two.name = "one";
    EXPECT_TRUE(fails_with(store_->update_rule(two), ErrorKind::conflict, "a rule named 'one' already exists"));

    Rule unknown_reg = rule("three");
    unknown_reg.source_registry = "nowhere";
    EXPECT_TRUE(fails_with(store_->create_rule(unknown_reg), ErrorKind::invalid,
                           "source_registry: no registry named 'nowhere'"));
    unknown_reg = rule("three");
    unknown_reg.target_registry = "nowhere";
    EXPECT_TRUE(fails_with(store_->create_rule(unknown_reg), ErrorKind::invalid, "target_registry: no registry"));

    Rule bad = rule("Bad Name");
    bad.tag_filter = "(";
    EXPECT_TRUE(fails_with(store_->create_rule(bad), ErrorKind::invalid, "tag_filter: invalid regular expression"));

    EXPECT_TRUE(fails_with(store_->get_rule(999), ErrorKind::not_found, "no rule with id 999"));
    EXPECT_TRUE(fails_with(store_->get_rule_by_name("zzz"), ErrorKind::not_found, "no rule named 'zzz'"));
    // A name from a request cannot forge a log line through the message.
    EXPECT_TRUE(fails_with(store_->get_rule_by_name("x\nINFO forged"), ErrorKind::not_found, "'x\\x0aINFO forged'"));
    EXPECT_TRUE(fails_with(store_->delete_rule(999), ErrorKind::not_found, "no rule with id 999"));
    Rule ghost = rule("ghost");
    ghost.id = 999;
    EXPECT_TRUE(fails_with(store_->update_rule(ghost), ErrorKind::not_found, "no rule with id 999"));
    EXPECT_TRUE(fails_with(store_->create_task(999, Trigger::manual), ErrorKind::not_found, "no rule with id 999"));
    auto list = store_->list_rules();
    ASSERT_TRUE(list.ok());
    EXPECT_EQ(list->size(), 2u);  // nothing half-written
}

TEST_F(StoreTest, RuleUpdateViaPatchKeepsCredentials) {
    add_registry("src");
    add_registry("dst");
    add_registry("dst2");
    Rule r = rule("r");
    r.target_credentials = engine::Credentials{kUser, kTargetSecret, {}};
    auto created = store_->create_rule(r);
    ASSERT_TRUE(created.ok());

    auto patched = engine::patch_rule(*created, nlohmann::json{{"target_registry", "dst2"}, {"overwrite", true}});
    ASSERT_TRUE(patched.ok()) << describe(patched.errors);
    auto updated = store_->update_rule(patched.value);
    ASSERT_TRUE(updated.ok()) << updated.error().message;
    EXPECT_EQ(updated->target_registry, "dst2");
    EXPECT_TRUE(updated->overwrite);
    EXPECT_TRUE(updated->has_target_credentials);
    EXPECT_EQ(store_->rule_target_credentials(updated->id)->password, kTargetSecret);

    patched = engine::patch_rule(*updated, nlohmann::json{{"target_username", ""}, {"target_password", ""}});
    ASSERT_TRUE(patched.ok());
    updated = store_->update_rule(patched.value);
    ASSERT_TRUE(updated.ok());
    EXPECT_FALSE(updated->has_target_credentials);
}

TEST_F(StoreTest, DeleteRuleStopsItsTasksAndKeepsTheirHistory) {
    const Rule r = add_rule("doomed");
    const int64_t queued = add_task(r.id);
    const int64_t running = add_task(r.id);
    ASSERT_TRUE(store_->start_task(running).ok());
    const int64_t done = add_task(r.id);
    finish(done);

    auto stopping = store_->delete_rule(r.id);
    ASSERT_TRUE(stopping.ok()) << stopping.error().message;
    EXPECT_EQ(*stopping, std::vector<int64_t>{running});
    EXPECT_TRUE(fails_with(store_->get_rule(r.id), ErrorKind::not_found, "no rule"));

    auto q = store_->get_task(queued);
    ASSERT_TRUE(q.ok());
    EXPECT_EQ(q->status, TaskStatus::stopped);
    EXPECT_EQ(q->reason, "rule deleted");
    EXPECT_FALSE(q->rule_id.has_value());
    EXPECT_EQ(q->rule_name, "doomed");
    auto run = store_->get_task(running);
    ASSERT_TRUE(run.ok());
    EXPECT_EQ(run->status, TaskStatus::in_progress);
    EXPECT_TRUE(run->cancel_requested);
    EXPECT_EQ(store_->get_task(done)->status, TaskStatus::succeeded);
}

// ---------------------------------------------------------------------------------------------
// Tasks

TEST_F(StoreTest, TaskLifecycle) {
    const Rule r = add_rule("r");
    auto created = store_->create_task(r.id, Trigger::event);
    ASSERT_TRUE(created.ok());
    EXPECT_EQ(created->status, TaskStatus::queued);
    EXPECT_EQ(created->trigger, Trigger::event);
    EXPECT_EQ(created->rule_id, r.id);
    EXPECT_EQ(created->created, now_);
    EXPECT_FALSE(created->started.has_value());
    const int64_t id = created->id;

    now_ += chr::seconds{1};
    ASSERT_TRUE(store_->start_task(id).ok());
    EXPECT_TRUE(fails_with(store_->start_task(id), ErrorKind::conflict, "is InProgress, not Queued"));
    ASSERT_TRUE(store_->set_task_repositories(id, 2).ok());
    std::vector<TaskItem> items = {
        {0, 0, "dst", "library/alpine", "3.19", "sha256:aa", engine::ItemAction::copied, "", 1000, 12},
        {0, 0, "dst", "library/alpine", "3.18", "sha256:bb", engine::ItemAction::skipped_same_digest, "", 0, 1},
        {0, 0, "dst", "library/debian", "12", "sha256:cc", engine::ItemAction::skipped_exists, "tag exists", 0, 1},
        {0, 0, "dst", "library/debian", "11", "", engine::ItemAction::failed, "source: 500", 0, 3},
        {0, 0, "dst", "library/debian", "10", "sha256:dd", engine::ItemAction::copied, "", 2000, 20},
    };
    ASSERT_TRUE(store_->append_items(id, items).ok());
    now_ += chr::milliseconds{2500};
    ASSERT_TRUE(store_->finish_task(id, TaskStatus::partially_failed, "1 artifact failed").ok());

    auto t = store_->get_task(id);
    ASSERT_TRUE(t.ok());
    EXPECT_EQ(t->status, TaskStatus::partially_failed);
    EXPECT_EQ(t->reason, "1 artifact failed");
    EXPECT_EQ(t->counters.repositories, 2u);
    EXPECT_EQ(t->counters.copied, 2u);
    EXPECT_EQ(t->counters.skipped, 2u);
    EXPECT_EQ(t->counters.failed, 1u);
    EXPECT_EQ(t->counters.bytes, 3000u);
    EXPECT_DOUBLE_EQ(t->success_ratio(), 0.8);
    EXPECT_EQ(t->duration(now_), chr::milliseconds{2500});
    const auto j = engine::to_json(*t, now_);
    EXPECT_EQ(j["status"], "PartiallyFailed");
    EXPECT_EQ(j["duration_ms"], 2500);

    EXPECT_TRUE(fails_with(store_->finish_task(id, TaskStatus::succeeded, ""), ErrorKind::conflict,
                           "already finished (PartiallyFailed)"));
    EXPECT_TRUE(fails_with(store_->append_items(id, items), ErrorKind::conflict, "takes no more items"));
    EXPECT_TRUE(fails_with(store_->finish_task(id, TaskStatus::in_progress, ""), ErrorKind::invalid, "status:"));
    EXPECT_TRUE(fails_with(store_->get_task(424242), ErrorKind::not_found, "no task with id 424242"));
    EXPECT_TRUE(fails_with(store_->start_task(424242), ErrorKind::not_found, "no task"));
    EXPECT_TRUE(fails_with(store_->set_task_repositories(424242, 1), ErrorKind::not_found, "no task"));
}

TEST_F(StoreTest, Cancel) {
    const Rule r = add_rule("r");
    const int64_t queued = add_task(r.id);
    auto c = store_->request_cancel(queued);
    ASSERT_TRUE(c.ok());
    EXPECT_EQ(c->status, TaskStatus::stopped);
    EXPECT_EQ(c->reason, "cancelled");
    EXPECT_TRUE(c->finished.has_value());

    const int64_t running = add_task(r.id);
    ASSERT_TRUE(store_->start_task(running).ok());
    c = store_->request_cancel(running);
    ASSERT_TRUE(c.ok());
    EXPECT_EQ(c->status, TaskStatus::in_progress);  // the engine stops it
    EXPECT_TRUE(c->cancel_requested);
    ASSERT_TRUE(store_->finish_task(running, TaskStatus::stopped, "cancelled by user").ok());

    EXPECT_TRUE(fails_with(store_->request_cancel(running), ErrorKind::conflict, "already finished (Stopped)"));
    EXPECT_TRUE(fails_with(store_->request_cancel(777), ErrorKind::not_found, "no task with id 777"));
}

TEST_F(StoreTest, ListTasksFiltersAndPages) {
    const Rule a = add_rule("a");
    const Rule b = add_rule("b");
    std::vector<int64_t> a_ids;
    for (int i = 0; i < 7; ++i) {
        now_ = at("2024-06-01T00:00:00Z") + chr::hours{i};
        a_ids.push_back(add_task(a.id));
        if (i % 2 == 0) finish(a_ids.back(), TaskStatus::succeeded);
    }
    for (int i = 0; i < 3; ++i) {
        now_ = at("2024-06-01T00:30:00Z") + chr::hours{i};
        finish(add_task(b.id, Trigger::schedule), TaskStatus::failed);
    }

    auto all = store_->list_tasks({});
    ASSERT_TRUE(all.ok());
    EXPECT_EQ(all->tasks.size(), 10u);
    EXPECT_FALSE(all->next_cursor.has_value());
    for (size_t i = 1; i < all->tasks.size(); ++i) EXPECT_GT(all->tasks[i - 1].id, all->tasks[i].id);  // newest first

    engine::TaskQuery q;
    q.rule_id = a.id;
    auto by_rule = store_->list_tasks(q);
    ASSERT_TRUE(by_rule.ok());
    EXPECT_EQ(by_rule->tasks.size(), 7u);

    q.status = TaskStatus::succeeded;
    auto by_status = store_->list_tasks(q);
    ASSERT_TRUE(by_status.ok());
    EXPECT_EQ(by_status->tasks.size(), 4u);  // i = 0, 2, 4, 6
    for (const auto& t : by_status->tasks) EXPECT_EQ(t.status, TaskStatus::succeeded);

    engine::TaskQuery range;
    range.created_from = at("2024-06-01T01:00:00Z");
    range.created_to = at("2024-06-01T03:00:00Z");
    auto in_range = store_->list_tasks(range);
    ASSERT_TRUE(in_range.ok());
    EXPECT_EQ(in_range->tasks.size(), 4u);  // a at 01:00, 02:00; b at 01:30, 02:30
    for (const auto& t : in_range->tasks) {
        EXPECT_GE(t.created, *range.created_from);
        EXPECT_LT(t.created, *range.created_to);
    }

    // Cursor pagination: pages of 3 over rule a's 7 tasks, no duplicates, nothing missed.
    engine::TaskQuery page_q;
    page_q.rule_id = a.id;
    page_q.limit = 3;
    std::vector<int64_t> seen;
    int pages = 0;
    for (;;) {
        auto page = store_->list_tasks(page_q);
        ASSERT_TRUE(page.ok());
        ++pages;
        for (const auto& t : page->tasks) seen.push_back(t.id);
        if (!page->next_cursor) break;
        page_q.cursor = page->next_cursor;
    }
    EXPECT_EQ(pages, 3);
    std::vector<int64_t> expected(a_ids.rbegin(), a_ids.rend());
    EXPECT_EQ(seen, expected);

    engine::TaskQuery off;
    off.rule_id = a.id;
    off.limit = 2;
    off.offset = 5;
    auto tail = store_->list_tasks(off);
    ASSERT_TRUE(tail.ok());
    ASSERT_EQ(tail->tasks.size(), 2u);
    EXPECT_EQ(tail->tasks[0].id, a_ids[1]);
    EXPECT_FALSE(tail->next_cursor.has_value());

    engine::TaskQuery bad;
    bad.limit = 0;
    EXPECT_TRUE(fails_with(store_->list_tasks(bad), ErrorKind::invalid, "limit"));
    bad.limit = Store::kMaxPageSize + 1;
    EXPECT_TRUE(fails_with(store_->list_tasks(bad), ErrorKind::invalid, "limit"));
}

TEST_F(StoreTest, ItemsPaginationAndFilter) {
    const Rule r = add_rule("r");
    const int64_t id = add_task(r.id);
    ASSERT_TRUE(store_->start_task(id).ok());
    std::vector<TaskItem> batch;
    for (int i = 0; i < 25; ++i) {
        TaskItem item;
        item.repository = numbered("library/repo", i);
        item.tag = numbered("v", i);
        item.digest = numbered("sha256:", i);
        item.action = i % 5 == 0 ? engine::ItemAction::failed : engine::ItemAction::copied;
        item.reason = i % 5 == 0 ? std::string(5000, 'x') : "";
        item.bytes = 10;
        batch.push_back(item);
    }
    ASSERT_TRUE(store_->append_items(id, batch).ok());

    engine::ItemQuery q;
    q.limit = 10;
    std::vector<std::string> tags;
    for (;;) {
        auto page = store_->list_items(id, q);
        ASSERT_TRUE(page.ok()) << page.error().message;
        EXPECT_LE(page->items.size(), 10u);
        for (const auto& i : page->items) {
            tags.push_back(i.tag);
            EXPECT_EQ(i.task_id, id);
        }
        if (!page->next_cursor) break;
        q.cursor = page->next_cursor;
    }
    ASSERT_EQ(tags.size(), 25u);
    for (int i = 0; i < 25; ++i) EXPECT_EQ(tags[static_cast<size_t>(i)], numbered("v", i));  // append order

    engine::ItemQuery failed_only;
    failed_only.action = engine::ItemAction::failed;
    auto failed = store_->list_items(id, failed_only);
    ASSERT_TRUE(failed.ok());
    ASSERT_EQ(failed->items.size(), 5u);
    EXPECT_LE(failed->items[0].reason.size(), Store::kMaxReasonLength + 3);  // cut, with "..."
    EXPECT_EQ(failed->items[0].action, engine::ItemAction::failed);

    auto task = store_->get_task(id);
    EXPECT_EQ(task->counters.copied, 20u);
    EXPECT_EQ(task->counters.failed, 5u);
    EXPECT_EQ(task->counters.bytes, 200u);

    EXPECT_TRUE(fails_with(store_->list_items(999, {}), ErrorKind::not_found, "no task with id 999"));
    EXPECT_TRUE(fails_with(store_->append_items(id, {TaskItem{}}), ErrorKind::invalid, "repository"));
}

TEST_F(StoreTest, PruneByAgeAndCount) {
    const Rule a = add_rule("a");
    const Rule b = add_rule("b");
    std::vector<int64_t> a_ids;
    for (int day = 0; day < 6; ++day) {
        now_ = at("2024-06-01T00:00:00Z") + chr::days{day};
        a_ids.push_back(add_task(a.id));
        finish(a_ids.back());
    }
    const int64_t running = add_task(a.id);  // day 5, never finished: never pruned
    ASSERT_TRUE(store_->start_task(running).ok());
    ASSERT_TRUE(
        store_->append_items(running, {TaskItem{0, 0, "", "r", "t", "", engine::ItemAction::copied, "", 1, 1}}).ok());
    const int64_t b_old = add_task(b.id);
    finish(b_old);

    now_ = at("2024-06-10T00:00:00Z");
    engine::Retention age;
    age.older_than_days = 7;  // finished before 06-03
    auto removed = store_->prune_tasks(age);
    ASSERT_TRUE(removed.ok()) << removed.error().message;
    EXPECT_EQ(*removed, 2u);  // a's days 0 and 1
    EXPECT_TRUE(fails_with(store_->get_task(a_ids[0]), ErrorKind::not_found, "no task"));
    EXPECT_TRUE(store_->get_task(a_ids[2]).ok());

    engine::Retention count;
    count.keep_last_per_rule = 2;
    removed = store_->prune_tasks(count);
    ASSERT_TRUE(removed.ok()) << removed.error().message;
    // a: running + days 5,4,3,2 -> newest two are the running one and day 5: days 4, 3, 2 go.
    EXPECT_EQ(*removed, 3u);
    engine::TaskQuery q;
    q.rule_id = a.id;
    auto left = store_->list_tasks(q);
    ASSERT_TRUE(left.ok());
    ASSERT_EQ(left->tasks.size(), 2u);
    EXPECT_EQ(left->tasks[0].status, TaskStatus::in_progress);
    EXPECT_EQ(left->tasks[1].id, a_ids[5]);
    EXPECT_TRUE(store_->get_task(b_old).ok());  // b has one task

    // Running tasks survive any retention.
    engine::Retention zero;
    zero.keep_last_per_rule = 0;
    zero.older_than_days = 0;
    ASSERT_TRUE(store_->prune_tasks(zero).ok());
    auto still = store_->list_tasks({});
    ASSERT_TRUE(still.ok());
    ASSERT_EQ(still->tasks.size(), 1u);
    EXPECT_EQ(still->tasks[0].status, TaskStatus::in_progress);
    auto items = store_->list_items(still->tasks[0].id, {});
    ASSERT_TRUE(items.ok());
    EXPECT_EQ(items->items.size(), 1u);
}

TEST_F(StoreTest, PrunedTaskItemsAreDeleted) {
    const Rule r = add_rule("r");
    const int64_t id = add_task(r.id);
    ASSERT_TRUE(store_->start_task(id).ok());
    ASSERT_TRUE(store_->append_items(id, {TaskItem{0, 0, "", "r", "t", "", engine::ItemAction::copied, "", 1, 1}}).ok());
    ASSERT_TRUE(store_->finish_task(id, TaskStatus::succeeded, "").ok());
    engine::Retention keep_none;
    keep_none.keep_last_per_rule = 0;
    ASSERT_TRUE(store_->prune_tasks(keep_none).ok());
    store_.reset();
    sqlite3* db = nullptr;
    ASSERT_EQ(sqlite3_open((dir_ / "state.db").c_str(), &db), SQLITE_OK);
    sqlite3_stmt* st = nullptr;
    ASSERT_EQ(sqlite3_prepare_v2(db, "SELECT count(*) FROM task_items", -1, &st, nullptr), SQLITE_OK);
    ASSERT_EQ(sqlite3_step(st), SQLITE_ROW);
    EXPECT_EQ(sqlite3_column_int(st, 0), 0);
    sqlite3_finalize(st);
    sqlite3_close(db);
}

// ---------------------------------------------------------------------------------------------
// Schedules

TEST_F(StoreTest, SchedulesPersistAndFire) {
    const Rule r = add_rule("every-30m", "30m");
    ASSERT_TRUE(r.next_fire.has_value());
    EXPECT_EQ(*r.next_fire, now_ + chr::minutes{30});
    add_rule("no-schedule");

    auto due = store_->due_rules(now_ + chr::minutes{29});
    ASSERT_TRUE(due.ok());
    EXPECT_TRUE(due->empty());
    due = store_->due_rules(now_ + chr::minutes{30});
    ASSERT_TRUE(due.ok());
    ASSERT_EQ(due->size(), 1u);
    EXPECT_EQ((*due)[0].rule_id, r.id);
    EXPECT_EQ((*due)[0].rule_name, "every-30m");

    now_ += chr::minutes{30};
    auto next = store_->record_fire(r.id, now_);
    ASSERT_TRUE(next.ok());
    EXPECT_EQ(*next, now_ + chr::minutes{30});
    EXPECT_TRUE(store_->due_rules(now_)->empty());

    // The daemon was down for hours: one fire now, the next one 30 minutes after now.
    const Time stale = now_;
    now_ += chr::hours{5};
    EXPECT_EQ(store_->due_rules(now_)->size(), 1u);
    next = store_->record_fire(r.id, stale + chr::minutes{30});
    ASSERT_TRUE(next.ok());
    EXPECT_EQ(*next, now_ + chr::minutes{30});

    // Persisted across a restart.
    open_store();
    auto again = store_->get_rule(r.id);
    ASSERT_TRUE(again.ok());
    EXPECT_EQ(again->next_fire, now_ + chr::minutes{30});

    // Disabled rules are not due; enabling again counts from now.
    Rule disabled = *again;
    disabled.enabled = false;
    ASSERT_TRUE(store_->update_rule(disabled).ok());
    now_ += chr::hours{1};
    EXPECT_TRUE(store_->due_rules(now_)->empty());
    disabled.enabled = true;
    auto enabled = store_->update_rule(disabled);
    ASSERT_TRUE(enabled.ok());
    EXPECT_EQ(enabled->next_fire, now_ + chr::minutes{30});

    // A new schedule is computed from now; removing it removes the fire time.
    Rule cron = *enabled;
    cron.schedule = "0 0 * * *";
    auto changed = store_->update_rule(cron);
    ASSERT_TRUE(changed.ok());
    EXPECT_EQ(changed->next_fire, at("2024-06-02T00:00:00Z"));
    cron.schedule = "";
    changed = store_->update_rule(cron);
    ASSERT_TRUE(changed.ok());
    EXPECT_FALSE(changed->next_fire.has_value());
    EXPECT_TRUE(store_->due_rules(now_ + chr::days{400})->empty());
    EXPECT_TRUE(fails_with(store_->record_fire(999, now_), ErrorKind::not_found, "no rule"));
}

// ---------------------------------------------------------------------------------------------
// Restart safety

TEST_F(StoreTest, InterruptedTasksAfterReopen) {
    const Rule r = add_rule("r");
    const int64_t running = add_task(r.id);
    ASSERT_TRUE(store_->start_task(running).ok());
    ASSERT_TRUE(store_->append_items(running, {TaskItem{0, 0, "", "r", "t", "", engine::ItemAction::copied, "", 5, 1}})
                    .ok());
    const int64_t queued = add_task(r.id);
    const int64_t done = add_task(r.id);
    finish(done);

    open_store();  // closes (as a dead process would leave it) and reopens
    auto interrupted = store_->interrupted_tasks();
    ASSERT_TRUE(interrupted.ok());
    ASSERT_EQ(interrupted->size(), 2u);
    EXPECT_EQ((*interrupted)[0].id, running);
    EXPECT_EQ((*interrupted)[0].status, TaskStatus::in_progress);
    EXPECT_EQ((*interrupted)[1].id, queued);

    // Resume one, fail the rest.
    const auto before = store_->get_task(running);
    ASSERT_TRUE(before.ok());
    const size_t items_before = store_->list_items(running, {})->items.size();
    ASSERT_TRUE(store_->requeue(running, "resumed after an interrupted run").ok());
    auto requeued = store_->get_task(running);
    ASSERT_TRUE(requeued.ok());
    EXPECT_EQ(requeued->status, TaskStatus::queued);
    EXPECT_EQ(requeued->counters.copied, before->counters.copied);  // the log continues
    EXPECT_EQ(requeued->started, before->started);
    EXPECT_NE(requeued->reason.find("resumed"), std::string::npos);
    EXPECT_EQ(store_->list_items(running, {})->items.size(), items_before);
    now_ += chr::seconds{1};
    ASSERT_TRUE(store_->start_task(running).ok());
    EXPECT_EQ(store_->get_task(running)->started, before->started);  // the first start counts
    ASSERT_TRUE(store_->requeue(running, "resumed").ok());
    EXPECT_TRUE(fails_with(store_->requeue(done, "resumed"), ErrorKind::conflict, "cannot be requeued"));

    now_ += chr::seconds{3};
    auto failed = store_->fail_interrupted("interrupted: the daemon stopped");
    ASSERT_TRUE(failed.ok());
    EXPECT_EQ(*failed, 2u);  // the requeued one and the queued one
    for (int64_t id : {running, queued}) {
        auto t = store_->get_task(id);
        ASSERT_TRUE(t.ok());
        EXPECT_EQ(t->status, TaskStatus::failed);
        EXPECT_EQ(t->reason, "interrupted: the daemon stopped");
        EXPECT_EQ(t->finished, now_);
    }
    EXPECT_TRUE(store_->interrupted_tasks()->empty());
    EXPECT_EQ(store_->get_task(done)->status, TaskStatus::succeeded);
}

// ---------------------------------------------------------------------------------------------
// Migrations

// Schema version 1 exactly as it shipped; never change this copy.
constexpr char kSchemaV1[] = R"(
CREATE TABLE schema_version (version INTEGER NOT NULL);
INSERT INTO schema_version (version) VALUES (1);
CREATE TABLE registries (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL UNIQUE, url TEXT NOT NULL,
  region TEXT NOT NULL DEFAULT '', insecure INTEGER NOT NULL DEFAULT 0, ca_file TEXT NOT NULL DEFAULT '',
  username TEXT NOT NULL DEFAULT '', password TEXT NOT NULL DEFAULT '', created_ms INTEGER NOT NULL,
  updated_ms INTEGER NOT NULL);
CREATE TABLE links (source_region TEXT NOT NULL, target_region TEXT NOT NULL, rate_bytes_per_s INTEGER NOT NULL,
  burst_bytes INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (source_region, target_region));
CREATE TABLE rules (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL UNIQUE,
  description TEXT NOT NULL DEFAULT '',
  source_registry_id INTEGER NOT NULL REFERENCES registries(id) ON DELETE RESTRICT,
  source_namespace TEXT NOT NULL, repo_filter TEXT NOT NULL DEFAULT '', tag_filter TEXT NOT NULL DEFAULT '',
  type TEXT NOT NULL DEFAULT 'all',
  target_registry_id INTEGER NOT NULL REFERENCES registries(id) ON DELETE RESTRICT,
  target_namespace TEXT NOT NULL DEFAULT '', target_username TEXT NOT NULL DEFAULT '',
  target_password TEXT NOT NULL DEFAULT '', overwrite INTEGER NOT NULL DEFAULT 0,
  enabled INTEGER NOT NULL DEFAULT 1, schedule TEXT NOT NULL DEFAULT '', created_ms INTEGER NOT NULL,
  updated_ms INTEGER NOT NULL);
CREATE INDEX rules_source_registry ON rules(source_registry_id);
CREATE INDEX rules_target_registry ON rules(target_registry_id);
CREATE TABLE tasks (id INTEGER PRIMARY KEY AUTOINCREMENT,
  rule_id INTEGER REFERENCES rules(id) ON DELETE SET NULL, rule_name TEXT NOT NULL, trigger_kind TEXT NOT NULL,
  status TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '', created_ms INTEGER NOT NULL, started_ms INTEGER,
  finished_ms INTEGER, repositories INTEGER NOT NULL DEFAULT 0, copied INTEGER NOT NULL DEFAULT 0,
  skipped INTEGER NOT NULL DEFAULT 0, failed INTEGER NOT NULL DEFAULT 0, bytes INTEGER NOT NULL DEFAULT 0);
CREATE INDEX tasks_rule ON tasks(rule_id, id);
CREATE TABLE task_items (id INTEGER PRIMARY KEY AUTOINCREMENT,
  task_id INTEGER NOT NULL REFERENCES tasks(id) ON DELETE CASCADE, repository TEXT NOT NULL,
  tag TEXT NOT NULL DEFAULT '', digest TEXT NOT NULL DEFAULT '', action TEXT NOT NULL,
  reason TEXT NOT NULL DEFAULT '', bytes INTEGER NOT NULL DEFAULT 0, duration_ms INTEGER NOT NULL DEFAULT 0);
CREATE INDEX task_items_task ON task_items(task_id, id);
INSERT INTO registries (name, url, username, password, created_ms, updated_ms)
  VALUES ('src', 'https://src.example.com', 'u', 'old-secret', 1000, 1000),
         ('dst', 'https://dst.example.com', '', '', 1000, 1000);
INSERT INTO rules (name, source_registry_id, source_namespace, target_registry_id, schedule, created_ms, updated_ms)
  VALUES ('legacy', 1, 'library', 2, '1h', 1000, 1000);
INSERT INTO tasks (rule_id, rule_name, trigger_kind, status, created_ms, started_ms, copied, bytes)
  VALUES (1, 'legacy', 'schedule', 'InProgress', 2000, 2001, 3, 300);
INSERT INTO task_items (task_id, repository, tag, digest, action, bytes) VALUES (1, 'library/a', 'v1', 'sha256:1',
  'copied', 100);
)";

void write_v1_database(const fs::path& dir) {
    fs::create_directories(dir);
    sqlite3* db = nullptr;
    ASSERT_EQ(sqlite3_open((dir / "state.db").c_str(), &db), SQLITE_OK);
    char* msg = nullptr;
    const int rc = sqlite3_exec(db, kSchemaV1, nullptr, nullptr, &msg);
    EXPECT_EQ(rc, SQLITE_OK) << (msg ? msg : "");
    sqlite3_free(msg);
    sqlite3_close(db);
}

TEST_F(StoreTest, MigratesFromVersion1) {
    store_.reset();
    const fs::path old_dir = root_ / "v1";
    write_v1_database(old_dir);
    ASSERT_EQ(::chmod((old_dir / "state.db").c_str(), 0644), 0);

    engine::StoreOptions o;
    o.clock = [this] { return now_; };
    auto opened = Store::open(old_dir.string(), o);
    ASSERT_TRUE(opened.ok()) << opened.error().message;
    Store& s = **opened;
    EXPECT_EQ(must(s.schema_version()), 3);
    EXPECT_EQ(mode_of(old_dir / "state.db"), 0600u);

    // Data kept.
    auto rule = s.get_rule_by_name("legacy");
    ASSERT_TRUE(rule.ok()) << rule.error().message;
    EXPECT_EQ(rule->source_registry, "src");
    EXPECT_EQ(rule->schedule, "1h");
    EXPECT_EQ(rule->next_fire, now_ + chr::hours{1});  // v2 persists schedules: filled in on open
    EXPECT_EQ(s.credentials_for(rule->source_registry_id)->password, "old-secret");
    auto task = s.get_task(1);
    ASSERT_TRUE(task.ok());
    EXPECT_EQ(task->status, TaskStatus::in_progress);
    EXPECT_EQ(task->counters.copied, 3u);
    EXPECT_FALSE(task->cancel_requested);  // new column, default
    EXPECT_EQ(s.list_items(1, {})->items.size(), 1u);

    // v2 features work on the migrated data.
    EXPECT_EQ(s.interrupted_tasks()->size(), 1u);
    auto cancelled = s.request_cancel(1);
    ASSERT_TRUE(cancelled.ok()) << cancelled.error().message;
    EXPECT_TRUE(cancelled->cancel_requested);
    opened.value().reset();

    // Opening again is a no-op.
    auto reopened = Store::open(old_dir.string(), o);
    ASSERT_TRUE(reopened.ok()) << reopened.error().message;
    EXPECT_EQ(must((*reopened)->schema_version()), 3);
    EXPECT_EQ((*reopened)->get_rule_by_name("legacy")->next_fire, now_ + chr::hours{1});
}

// What migration 2 added, applied to kSchemaV1 as it shipped: a database at schema version 2, with
// data a v2 daemon wrote (a schedule row, a cancel flag). Never change this copy.
constexpr char kSchemaV2Steps[] = R"(
ALTER TABLE tasks ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0;
CREATE TABLE schedules (rule_id INTEGER PRIMARY KEY REFERENCES rules(id) ON DELETE CASCADE, next_fire_ms INTEGER,
  last_fire_ms INTEGER);
CREATE INDEX tasks_status ON tasks(status, id);
CREATE INDEX tasks_created ON tasks(created_ms);
UPDATE schema_version SET version = 2;
INSERT INTO schedules (rule_id, next_fire_ms, last_fire_ms) VALUES (1, 7200000, 3600000);
INSERT INTO tasks (rule_id, rule_name, trigger_kind, status, reason, created_ms, started_ms, finished_ms,
  cancel_requested) VALUES (1, 'legacy', 'manual', 'Stopped', 'cancelled', 3000, 3001, 3002, 1);
)";

TEST_F(StoreTest, MigratesFromVersion2) {
    store_.reset();
    const fs::path old_dir = root_ / "v2";
    write_v1_database(old_dir);
    {
        sqlite3* db = nullptr;
        ASSERT_EQ(sqlite3_open((old_dir / "state.db").c_str(), &db), SQLITE_OK);
        char* msg = nullptr;
        const int rc = sqlite3_exec(db, kSchemaV2Steps, nullptr, nullptr, &msg);
        EXPECT_EQ(rc, SQLITE_OK) << (msg ? msg : "");
        sqlite3_free(msg);
        sqlite3_close(db);
    }

    engine::StoreOptions o;
    o.clock = [this] { return now_; };
    {
        auto opened = Store::open(old_dir.string(), o);
        ASSERT_TRUE(opened.ok()) << opened.error().message;
        Store& s = **opened;
        EXPECT_EQ(must(s.schema_version()), 3);
        EXPECT_EQ(Store::latest_schema_version(), 3);

        // v2 data kept; the new columns read as their defaults.
        auto rule = s.get_rule_by_name("legacy");
        ASSERT_TRUE(rule.ok()) << rule.error().message;
        EXPECT_EQ(rule->next_fire, Time{chr::milliseconds{7200000}});  // the stored fire time, not recomputed
        EXPECT_FALSE(rule->sync_on_push);
        EXPECT_TRUE(rule->notify_urls.empty());
        EXPECT_EQ(rule->notify_on, engine::NotifyOn::always);
        auto src = s.get_registry_by_name("src");
        ASSERT_TRUE(src.ok());
        EXPECT_TRUE(src->has_credentials);
        EXPECT_FALSE(src->has_webhook_secret);
        EXPECT_EQ(must(s.webhook_secret_for(src->id)), "");
        auto stopped = s.get_task(2);
        ASSERT_TRUE(stopped.ok()) << stopped.error().message;
        EXPECT_TRUE(stopped->cancel_requested);
        EXPECT_EQ(stopped->rule_id, rule->id);
        EXPECT_FALSE(stopped->group_id.has_value());
        EXPECT_EQ(stopped->group_name, "");
        EXPECT_TRUE(stopped->scope.empty());
        auto items = s.list_items(1, {});
        ASSERT_TRUE(items.ok());
        ASSERT_EQ(items->items.size(), 1u);
        EXPECT_EQ(items->items[0].target, "");

        // v3 features work on the migrated database.
        engine::ReplicationGroup g;
        g.name = "global";
        g.primary = "src";
        g.replicas = {"dst"};
        auto group = s.create_group(g);
        ASSERT_TRUE(group.ok()) << group.error().message;
        auto gt = s.create_group_task(group->id, Trigger::event, {{"library/a", "v2", "", false}});
        ASSERT_TRUE(gt.ok()) << gt.error().message;
        auto recorded = s.record_events(src->id, {{"ev-1", engine::RegistryEvent::Action::push, "library/a", "v2", "", ""}});
        ASSERT_TRUE(recorded.ok()) << recorded.error().message;
        EXPECT_EQ(recorded->size(), 1u);
        EXPECT_TRUE(s.add_delivery(1, "https://hooks.example.com/x").ok());
        Rule updated = *rule;
        updated.notify_urls = {"https://hooks.example.com/x"};
        updated.sync_on_push = true;
        EXPECT_TRUE(s.update_rule(updated).ok());
    }
    // Reopening is a no-op and keeps what v3 wrote.
    auto reopened = Store::open(old_dir.string(), o);
    ASSERT_TRUE(reopened.ok()) << reopened.error().message;
    EXPECT_EQ(must((*reopened)->schema_version()), 3);
    EXPECT_EQ(must((*reopened)->list_groups()).size(), 1u);
    EXPECT_EQ(must((*reopened)->list_events(10)).size(), 1u);
    EXPECT_TRUE((*reopened)->get_rule_by_name("legacy")->sync_on_push);
}

// ---------------------------------------------------------------------------------------------
// Webhook secrets

TEST_F(StoreTest, WebhookSecretIsWriteOnly) {
    constexpr char kHookSecret[] = "HOOK-shared-s3cret-never-out";
    Registry r;
    r.name = "hub";
    r.url = "https://hub.example.com";
    r.webhook_secret = kHookSecret;
    auto added = store_->add_registry(r);
    ASSERT_TRUE(added.ok()) << added.error().message;
    EXPECT_TRUE(added->has_webhook_secret);
    EXPECT_FALSE(added->webhook_secret.has_value());  // never filled in on the way out
    EXPECT_EQ(must(store_->webhook_secret_for(added->id)), kHookSecret);

    // nullopt keeps it, also across other changes and credentials updates.
    Registry keep = *added;
    keep.region = "eu";
    keep.credentials = engine::Credentials{kUser, kSecret, {}};
    auto kept = store_->update_registry(keep);
    ASSERT_TRUE(kept.ok()) << kept.error().message;
    EXPECT_TRUE(kept->has_webhook_secret);
    EXPECT_EQ(must(store_->webhook_secret_for(added->id)), kHookSecret);

    // Nothing the API shows holds it, nor any error about the registry.
    std::string everything;
    for (const auto& x : must(store_->list_registries())) everything += engine::to_json(x).dump();
    everything += engine::to_json(must(store_->get_registry_by_name("hub"))).dump();
    Registry dup = r;
    auto conflict = store_->add_registry(dup);
    ASSERT_FALSE(conflict.ok());
    everything += conflict.error().message;
    dup.name = "other";
    dup.webhook_secret = std::string(kHookSecret) + "\x01";
    auto invalid = store_->add_registry(dup);
    EXPECT_TRUE(fails_with(invalid, ErrorKind::invalid, "webhook_secret"));
    if (!invalid.ok()) everything += invalid.error().message;
    EXPECT_EQ(everything.find(kHookSecret), std::string::npos) << everything;
    EXPECT_NE(everything.find("\"has_webhook_secret\":true"), std::string::npos);

    // Replaced, then removed with "".
    Registry rotate = *kept;
    rotate.webhook_secret = "rotated";
    ASSERT_TRUE(store_->update_registry(rotate).ok());
    EXPECT_EQ(must(store_->webhook_secret_for(added->id)), "rotated");
    rotate.webhook_secret = "";
    auto removed = store_->update_registry(rotate);
    ASSERT_TRUE(removed.ok());
    EXPECT_FALSE(removed->has_webhook_secret);
    EXPECT_EQ(must(store_->webhook_secret_for(added->id)), "");
    EXPECT_TRUE(must(store_->credentials_for(added->id)).password == kSecret);  // credentials untouched
    EXPECT_TRUE(fails_with(store_->webhook_secret_for(999), ErrorKind::not_found, "no registry with id 999"));
}

// ---------------------------------------------------------------------------------------------
// Rules: sync on push and notifications

TEST_F(StoreTest, RuleNotifyFieldsRoundTrip) {
    add_registry("src");
    add_registry("dst");
    Rule r = rule("notifying");
    r.sync_on_push = true;
    r.notify_urls = {"https://Hooks.Example.com/a", "http://10.0.0.1:8080/b?x=1"};
    r.notify_on = engine::NotifyOn::failure;
    auto created = store_->create_rule(r);
    ASSERT_TRUE(created.ok()) << created.error().message;
    EXPECT_TRUE(created->sync_on_push);
    EXPECT_EQ(created->notify_urls, (std::vector<std::string>{"https://hooks.example.com/a", "http://10.0.0.1:8080/b?x=1"}));
    EXPECT_EQ(created->notify_on, engine::NotifyOn::failure);

    Rule changed = *created;
    changed.sync_on_push = false;
    changed.notify_urls = {"https://hooks.example.com/c"};
    changed.notify_on = engine::NotifyOn::success;
    auto updated = store_->update_rule(changed);
    ASSERT_TRUE(updated.ok()) << updated.error().message;
    open_store();
    auto again = store_->get_rule(created->id);
    ASSERT_TRUE(again.ok());
    EXPECT_FALSE(again->sync_on_push);
    EXPECT_EQ(again->notify_urls, std::vector<std::string>{"https://hooks.example.com/c"});
    EXPECT_EQ(again->notify_on, engine::NotifyOn::success);

    changed.notify_urls = {"ftp://hooks.example.com/c"};
    EXPECT_TRUE(fails_with(store_->update_rule(changed), ErrorKind::invalid, "notify_urls: URL 1 scheme"));
    changed.notify_urls = {"https://hooks.example.com/c", "https://hooks.example.com/c"};
    EXPECT_TRUE(fails_with(store_->update_rule(changed), ErrorKind::invalid, "notify_urls"));
}

// ---------------------------------------------------------------------------------------------
// Replication groups

class GroupStoreTest : public StoreTest {
protected:
    engine::ReplicationGroup group(const std::string& name, const std::string& primary,
                                   std::vector<std::string> replicas) {
        engine::ReplicationGroup g;
        g.name = name;
        g.primary = primary;
        g.replicas = std::move(replicas);
        return g;
    }
    engine::ReplicationGroup add_group(const std::string& name, const std::string& schedule = "1h") {
        // "ap" gets a smaller id than "us": the replicas' order is the order given, not the ids'.
        for (const char* reg : {"eu", "ap", "us"})
            if (!store_->get_registry_by_name(reg).ok()) add_registry(reg);
        auto g = group(name, "eu", {"us", "ap"});
        g.schedule = schedule;
        auto created = store_->create_group(g);
        EXPECT_TRUE(created.ok()) << created.error().message;
        return created.ok() ? created.value() : engine::ReplicationGroup{};
    }
    int64_t add_group_task(int64_t group_id, std::vector<engine::TaskScope> scope = {}) {
        auto t = store_->create_group_task(group_id, Trigger::manual, scope);
        EXPECT_TRUE(t.ok()) << t.error().message;
        return t.ok() ? t->id : 0;
    }
};

TEST_F(GroupStoreTest, CrudKeepsReplicaOrderAndResolvesNames) {
    const auto g = add_group("global");
    EXPECT_GT(g.id, 0);
    EXPECT_EQ(g.primary, "eu");
    EXPECT_EQ(g.primary_id, must(store_->get_registry_by_name("eu")).id);
    EXPECT_EQ(g.replicas, (std::vector<std::string>{"us", "ap"}));  // as given, not sorted
    ASSERT_EQ(g.replica_ids.size(), 2u);
    EXPECT_EQ(g.replica_ids[1], must(store_->get_registry_by_name("ap")).id);
    EXPECT_TRUE(g.enabled);
    EXPECT_EQ(g.created, now_);
    EXPECT_EQ(g.next_fire, now_ + chr::hours{1});

    auto by_name = store_->get_group_by_name("global");
    ASSERT_TRUE(by_name.ok());
    EXPECT_EQ(by_name->id, g.id);
    EXPECT_EQ(by_name->replicas, g.replicas);
    add_group("another");
    auto list = must(store_->list_groups());
    ASSERT_EQ(list.size(), 2u);
    EXPECT_EQ(list[0].name, "another");  // by name
    EXPECT_EQ(list[1].replicas, (std::vector<std::string>{"us", "ap"}));

    // Renaming a registry shows in the group (it holds ids).
    Registry us = must(store_->get_registry_by_name("us"));
    us.name = "us-east";
    ASSERT_TRUE(store_->update_registry(us).ok());
    EXPECT_EQ(must(store_->get_group(g.id)).replicas, (std::vector<std::string>{"us-east", "ap"}));

    // Update replaces every field, replicas included.
    auto changed = must(store_->get_group(g.id));
    changed.replicas = {"ap"};
    changed.replicate_deletes = true;
    changed.name = "global2";
    now_ += chr::minutes{5};
    auto updated = store_->update_group(changed);
    ASSERT_TRUE(updated.ok()) << updated.error().message;
    EXPECT_EQ(updated->replicas, std::vector<std::string>{"ap"});
    EXPECT_TRUE(updated->replicate_deletes);
    EXPECT_EQ(updated->name, "global2");
    EXPECT_EQ(updated->updated, now_);
    EXPECT_EQ(updated->next_fire, g.next_fire);  // same schedule: unchanged
    EXPECT_TRUE(fails_with(store_->get_group_by_name("global"), ErrorKind::not_found, "no replication group named"));
    EXPECT_TRUE(fails_with(store_->get_group(999), ErrorKind::not_found, "no replication group with id 999"));
}

TEST_F(GroupStoreTest, Errors) {
    add_group("global");
    auto dup = group("global", "eu", {"us"});
    EXPECT_TRUE(fails_with(store_->create_group(dup), ErrorKind::conflict, "a replication group named 'global' already exists"));
    auto unknown = group("g2", "nowhere", {"us", "missing"});
    auto r = store_->create_group(unknown);
    EXPECT_TRUE(fails_with(r, ErrorKind::invalid, "primary: no registry named 'nowhere'"));
    EXPECT_TRUE(fails_with(r, ErrorKind::invalid, "replicas: no registry named 'missing'"));
    EXPECT_TRUE(fails_with(store_->create_group(group("g3", "eu", {"us", "eu"})), ErrorKind::invalid,
                           "replicas: 'eu' is the primary"));
    EXPECT_TRUE(fails_with(store_->create_group(group("g4", "eu", {"us", "us"})), ErrorKind::invalid,
                           "named more than once"));
    EXPECT_TRUE(fails_with(store_->create_group(group("g5", "eu", {})), ErrorKind::invalid, "replicas: must name"));
    EXPECT_EQ(must(store_->list_groups()).size(), 1u);  // nothing half-created

    auto other = add_group("other");
    other.name = "global";
    EXPECT_TRUE(fails_with(store_->update_group(other), ErrorKind::conflict, "already exists"));
    other.id = 999;
    other.name = "fresh";
    EXPECT_TRUE(fails_with(store_->update_group(other), ErrorKind::not_found, "no replication group with id 999"));
    EXPECT_TRUE(fails_with(store_->delete_group(999), ErrorKind::not_found, "no replication group"));
    EXPECT_TRUE(fails_with(store_->create_group_task(999, Trigger::manual, {}), ErrorKind::not_found,
                           "no replication group with id 999"));
}

TEST_F(GroupStoreTest, RegistryRemovalBlockedByGroup) {
    const auto g = add_group("global");
    const Registry eu = must(store_->get_registry_by_name("eu"));
    const Registry ap = must(store_->get_registry_by_name("ap"));
    EXPECT_TRUE(fails_with(store_->remove_registry(eu.id), ErrorKind::conflict,
                           "registry 'eu' is used by replication group 'global'"));  // the primary
    EXPECT_TRUE(fails_with(store_->remove_registry(ap.id), ErrorKind::conflict,
                           "registry 'ap' is used by replication group 'global'"));  // a replica
    // A rule and a group on the same registry: both named.
    add_registry("src");
    Rule r = rule("uses-ap");
    r.target_registry = "ap";
    ASSERT_TRUE(store_->create_rule(r).ok());
    EXPECT_TRUE(fails_with(store_->remove_registry(ap.id), ErrorKind::conflict,
                           "used by rule 'uses-ap' and replication group 'global'"));

    ASSERT_TRUE(store_->delete_group(g.id).ok());
    EXPECT_TRUE(store_->remove_registry(eu.id).ok());
}

TEST_F(GroupStoreTest, GroupTasksAndListing) {
    const auto g = add_group("global");
    const auto other = add_group("other");
    add_registry("src");
    add_registry("dst");
    const Rule r = add_rule("r");
    const int64_t rule_task = add_task(r.id);
    auto created = store_->create_group_task(g.id, Trigger::event,
                                             {{"team/app", "v1", "sha256:aa", false}, {"team/app", "old", "", true}});
    ASSERT_TRUE(created.ok()) << created.error().message;
    EXPECT_FALSE(created->rule_id.has_value());
    EXPECT_EQ(created->rule_name, "");
    EXPECT_EQ(created->group_id, g.id);
    EXPECT_EQ(created->group_name, "global");
    EXPECT_EQ(created->trigger, Trigger::event);
    EXPECT_EQ(created->status, TaskStatus::queued);
    ASSERT_EQ(created->scope.size(), 2u);
    EXPECT_EQ(created->scope[0].repository, "team/app");
    EXPECT_EQ(created->scope[0].digest, "sha256:aa");
    EXPECT_FALSE(created->scope[0].remove);
    EXPECT_EQ(created->scope[1].tag, "old");
    EXPECT_TRUE(created->scope[1].remove);
    const int64_t other_task = add_group_task(other.id);

    // A rule task with a scope.
    auto scoped = store_->create_task(r.id, Trigger::event, {{"library/x", "1", "", false}});
    ASSERT_TRUE(scoped.ok());
    EXPECT_EQ(scoped->scope.size(), 1u);
    EXPECT_FALSE(scoped->group_id.has_value());
    EXPECT_TRUE(must(store_->get_task(rule_task)).scope.empty());

    engine::TaskQuery q;
    q.group_id = g.id;
    auto page = must(store_->list_tasks(q));
    ASSERT_EQ(page.tasks.size(), 1u);
    EXPECT_EQ(page.tasks[0].id, created->id);
    q.group_id = other.id;
    page = must(store_->list_tasks(q));
    ASSERT_EQ(page.tasks.size(), 1u);
    EXPECT_EQ(page.tasks[0].id, other_task);
    engine::TaskQuery by_rule;
    by_rule.rule_id = r.id;
    EXPECT_EQ(must(store_->list_tasks(by_rule)).tasks.size(), 2u);  // no group tasks
    q.rule_id = r.id;  // AND: nothing is both
    EXPECT_TRUE(must(store_->list_tasks(q)).tasks.empty());
    EXPECT_EQ(must(store_->list_tasks({})).tasks.size(), 4u);

    // Group tasks are restart-safe like rule tasks; deleting a rule leaves them alone.
    EXPECT_EQ(must(store_->interrupted_tasks()).size(), 4u);
    ASSERT_TRUE(store_->delete_rule(r.id).ok());
    EXPECT_EQ(must(store_->get_task(created->id)).status, TaskStatus::queued);
    EXPECT_EQ(must(store_->get_task(rule_task)).status, TaskStatus::stopped);

    // Items carry their target.
    ASSERT_TRUE(store_->start_task(created->id).ok());
    ASSERT_TRUE(store_->append_items(created->id, {TaskItem{0, 0, "us", "team/app", "v1", "sha256:aa",
                                                            engine::ItemAction::copied, "", 10, 1},
                                                   TaskItem{0, 0, "ap", "team/app", "v1", "sha256:aa",
                                                            engine::ItemAction::failed, "HTTP 500", 0, 1}})
                    .ok());
    auto items = must(store_->list_items(created->id, {}));
    ASSERT_EQ(items.items.size(), 2u);
    EXPECT_EQ(items.items[0].target, "us");
    EXPECT_EQ(items.items[1].target, "ap");
    EXPECT_EQ(engine::to_json(items.items[1])["target"], "ap");

    // Scope limits.
    EXPECT_TRUE(fails_with(store_->create_group_task(g.id, Trigger::event, {{"", "v1", "", false}}),
                           ErrorKind::invalid, "scope: repository must not be empty"));
}

TEST_F(GroupStoreTest, DeleteGroupStopsItsTasksAndKeepsTheirHistory) {
    const auto g = add_group("global");
    const auto other = add_group("other");
    const int64_t queued = add_group_task(g.id);
    const int64_t running = add_group_task(g.id);
    ASSERT_TRUE(store_->start_task(running).ok());
    const int64_t done = add_group_task(g.id);
    finish(done);
    const int64_t unrelated = add_group_task(other.id);

    auto stopped = store_->delete_group(g.id);
    ASSERT_TRUE(stopped.ok()) << stopped.error().message;
    EXPECT_EQ(*stopped, std::vector<int64_t>{running});
    auto q = must(store_->get_task(queued));
    EXPECT_EQ(q.status, TaskStatus::stopped);
    EXPECT_EQ(q.reason, "replication group deleted");
    EXPECT_FALSE(q.group_id.has_value());  // ON DELETE SET NULL
    EXPECT_EQ(q.group_name, "global");     // the name stays
    auto run = must(store_->get_task(running));
    EXPECT_EQ(run.status, TaskStatus::in_progress);
    EXPECT_TRUE(run.cancel_requested);
    EXPECT_EQ(must(store_->get_task(done)).status, TaskStatus::succeeded);
    auto u = must(store_->get_task(unrelated));
    EXPECT_EQ(u.status, TaskStatus::queued);
    EXPECT_FALSE(u.cancel_requested);
    EXPECT_TRUE(fails_with(store_->get_group(g.id), ErrorKind::not_found, "no replication group"));
    // Its replicas went with it: the registries can go now that "other" is deleted too.
    ASSERT_TRUE(store_->delete_group(other.id).ok());
    EXPECT_TRUE(store_->remove_registry(must(store_->get_registry_by_name("us")).id).ok());
}

TEST_F(GroupStoreTest, PruneKeepsLastPerGroup) {
    const auto a = add_group("a");
    const auto b = add_group("b");
    add_registry("src");
    add_registry("dst");
    const Rule r = add_rule("r");
    std::vector<int64_t> a_ids;
    for (int i = 0; i < 4; ++i) {
        a_ids.push_back(add_group_task(a.id));
        finish(a_ids.back());
    }
    const int64_t b_only = add_group_task(b.id);
    finish(b_only);
    std::vector<int64_t> rule_ids;
    for (int i = 0; i < 3; ++i) {
        rule_ids.push_back(add_task(r.id));
        finish(rule_ids.back());
    }

    engine::Retention keep;
    keep.keep_last_per_rule = 2;
    auto removed = store_->prune_tasks(keep);
    ASSERT_TRUE(removed.ok()) << removed.error().message;
    EXPECT_EQ(*removed, 3u);  // a's two oldest, r's oldest; b's only task stays
    EXPECT_TRUE(store_->get_task(b_only).ok());
    EXPECT_FALSE(store_->get_task(a_ids[0]).ok());
    EXPECT_FALSE(store_->get_task(a_ids[1]).ok());
    EXPECT_TRUE(store_->get_task(a_ids[2]).ok());
    EXPECT_TRUE(store_->get_task(a_ids[3]).ok());
    EXPECT_FALSE(store_->get_task(rule_ids[0]).ok());
    EXPECT_TRUE(store_->get_task(rule_ids[2]).ok());
}

TEST_F(GroupStoreTest, SchedulesDueAndFire) {
    const auto g = add_group("hourly", "1h");
    add_group("events-only", "");
    EXPECT_EQ(g.next_fire, now_ + chr::hours{1});
    EXPECT_TRUE(must(store_->due_groups(now_ + chr::minutes{59})).empty());
    auto due = must(store_->due_groups(now_ + chr::hours{1}));
    ASSERT_EQ(due.size(), 1u);
    EXPECT_EQ(due[0].rule_id, g.id);
    EXPECT_EQ(due[0].rule_name, "hourly");
    EXPECT_EQ(due[0].next_fire, now_ + chr::hours{1});
    EXPECT_TRUE(must(store_->due_rules(now_ + chr::days{2})).empty());  // groups are not rules

    // Fired late (the daemon was down): the next one counts from now.
    now_ += chr::hours{3};
    auto next = store_->record_group_fire(g.id, g.next_fire.value());
    ASSERT_TRUE(next.ok()) << next.error().message;
    EXPECT_EQ(*next, now_ + chr::hours{1});
    EXPECT_TRUE(must(store_->due_groups(now_)).empty());
    open_store();
    EXPECT_EQ(must(store_->get_group(g.id)).next_fire, now_ + chr::hours{1});

    // Disabled groups are not due; enabling again counts from now.
    auto disabled = must(store_->get_group(g.id));
    disabled.enabled = false;
    ASSERT_TRUE(store_->update_group(disabled).ok());
    now_ += chr::hours{2};
    EXPECT_TRUE(must(store_->due_groups(now_)).empty());
    disabled.enabled = true;
    auto enabled = store_->update_group(disabled);
    ASSERT_TRUE(enabled.ok());
    EXPECT_EQ(enabled->next_fire, now_ + chr::hours{1});

    // A schedule change resets the next fire; "" removes it.
    auto cron = *enabled;
    cron.schedule = "0 0 * * *";
    auto changed = store_->update_group(cron);
    ASSERT_TRUE(changed.ok());
    EXPECT_EQ(changed->next_fire, at("2024-06-02T00:00:00Z"));
    cron.schedule = "";
    changed = store_->update_group(cron);
    ASSERT_TRUE(changed.ok());
    EXPECT_FALSE(changed->next_fire.has_value());
    EXPECT_TRUE(must(store_->due_groups(now_ + chr::days{400})).empty());
    EXPECT_TRUE(fails_with(store_->record_group_fire(999, now_), ErrorKind::not_found, "no replication group"));
}

// ---------------------------------------------------------------------------------------------
// Webhook events

engine::RegistryEvent push_event(const std::string& id, const std::string& repo, const std::string& tag) {
    engine::RegistryEvent e;
    e.id = id;
    e.repository = repo;
    e.tag = tag;
    e.digest = "sha256:" + id;
    return e;
}

TEST_F(StoreTest, EventsAreStoredOnceEach) {
    const Registry hub = add_registry("hub");
    const Registry other = add_registry("other");
    auto first = store_->record_events(hub.id, {push_event("e1", "team/app", "v1"), push_event("e2", "team/app", "v2"),
                                                push_event("e1", "team/app", "v1")});  // repeated in one body
    ASSERT_TRUE(first.ok()) << first.error().message;
    ASSERT_EQ(first->size(), 2u);
    EXPECT_GT((*first)[0].id, 0);
    EXPECT_EQ((*first)[0].event_id, "e1");
    EXPECT_EQ((*first)[0].registry_id, hub.id);
    EXPECT_EQ((*first)[0].registry_name, "hub");
    EXPECT_EQ((*first)[0].received, now_);
    EXPECT_FALSE((*first)[0].processed);
    EXPECT_EQ((*first)[1].event_id, "e2");

    // A redelivery: nothing new.
    now_ += chr::seconds{5};
    auto again = store_->record_events(hub.id, {push_event("e2", "team/app", "v2"), push_event("e1", "team/app", "v1")});
    ASSERT_TRUE(again.ok());
    EXPECT_TRUE(again->empty());
    // Another registry may use the same ids.
    engine::RegistryEvent del = push_event("e1", "team/app", "v1");
    del.action = engine::RegistryEvent::Action::remove;
    auto elsewhere = store_->record_events(other.id, {del});
    ASSERT_TRUE(elsewhere.ok());
    ASSERT_EQ(elsewhere->size(), 1u);
    EXPECT_TRUE((*elsewhere)[0].remove);
    EXPECT_EQ(must(store_->list_events(100)).size(), 3u);

    EXPECT_TRUE(fails_with(store_->record_events(999, {push_event("x", "a", "b")}), ErrorKind::not_found,
                           "no registry with id 999"));
    EXPECT_TRUE(fails_with(store_->record_events(hub.id, {push_event("", "a", "b")}), ErrorKind::invalid, "event id"));
    EXPECT_TRUE(fails_with(store_->record_events(hub.id, {push_event("y", "", "b")}), ErrorKind::invalid, "repository"));
    std::vector<engine::RegistryEvent> too_many(Store::kMaxEventsPerRecord + 1, push_event("z", "a", "b"));
    EXPECT_TRUE(fails_with(store_->record_events(hub.id, too_many), ErrorKind::invalid, "events: at most 10000"));
    auto empty = store_->record_events(hub.id, {});
    ASSERT_TRUE(empty.ok());
    EXPECT_TRUE(empty->empty());
}

TEST_F(StoreTest, EventsPendingProcessedListedAndPruned) {
    const Registry hub = add_registry("hub");
    const Rule r = add_rule("r");
    const Time t0 = now_;
    ASSERT_TRUE(store_->record_events(hub.id, {push_event("a", "team/app", "v1"), push_event("b", "team/app", "v2")}).ok());
    now_ += chr::seconds{10};
    ASSERT_TRUE(store_->record_events(hub.id, {push_event("c", "team/web", "v1")}).ok());

    // Pending: oldest first, up to the time given and the limit.
    auto pending = must(store_->pending_events(t0, 100));
    ASSERT_EQ(pending.size(), 2u);
    EXPECT_EQ(pending[0].event_id, "a");
    EXPECT_EQ(pending[1].event_id, "b");
    EXPECT_EQ(pending[0].registry_name, "hub");
    EXPECT_EQ(pending[0].repository, "team/app");
    EXPECT_EQ(pending[0].tag, "v1");
    EXPECT_EQ(pending[0].digest, "sha256:a");
    EXPECT_EQ(must(store_->pending_events(now_, 100)).size(), 3u);
    auto one = must(store_->pending_events(now_, 1));
    ASSERT_EQ(one.size(), 1u);
    EXPECT_EQ(one[0].event_id, "a");
    EXPECT_TRUE(fails_with(store_->pending_events(now_, 0), ErrorKind::invalid, "limit"));

    // Processed events leave the pending list and remember their tasks.
    const int64_t task = add_task(r.id, Trigger::event);
    ASSERT_TRUE(store_->mark_events_processed({pending[0].id, pending[1].id}, {task}).ok());
    const int64_t task2 = add_task(r.id, Trigger::event);
    ASSERT_TRUE(store_->mark_events_processed({pending[1].id, 424242}, {task2, task}).ok());  // merged; unknown id skipped
    pending = must(store_->pending_events(now_, 100));
    ASSERT_EQ(pending.size(), 1u);
    EXPECT_EQ(pending[0].event_id, "c");

    // Listed newest first.
    auto listed = must(store_->list_events(100));
    ASSERT_EQ(listed.size(), 3u);
    EXPECT_EQ(listed[0].event_id, "c");
    EXPECT_FALSE(listed[0].processed);
    EXPECT_TRUE(listed[0].task_ids.empty());
    EXPECT_EQ(listed[1].event_id, "b");
    EXPECT_TRUE(listed[1].processed);
    EXPECT_EQ(listed[1].task_ids, (std::vector<int64_t>{task, task2}));
    EXPECT_EQ(listed[2].task_ids, std::vector<int64_t>{task});
    EXPECT_EQ(must(store_->list_events(1)).size(), 1u);
    EXPECT_TRUE(fails_with(store_->list_events(0), ErrorKind::invalid, "limit"));

    // The processed flag survives a restart (a redelivery after it is still skipped).
    open_store();
    EXPECT_EQ(must(store_->pending_events(now_, 100)).size(), 1u);
    EXPECT_TRUE(must(store_->record_events(hub.id, {push_event("a", "team/app", "v1")})).empty());

    // Pruning removes processed events older than the cutoff only.
    auto pruned = store_->prune_events(now_ + chr::seconds{1});
    ASSERT_TRUE(pruned.ok());
    EXPECT_EQ(*pruned, 2u);  // a and b; c is unprocessed
    listed = must(store_->list_events(100));
    ASSERT_EQ(listed.size(), 1u);
    EXPECT_EQ(listed[0].event_id, "c");
    ASSERT_TRUE(store_->mark_events_processed({listed[0].id}, {}).ok());
    EXPECT_EQ(must(store_->prune_events(now_)), 0u);  // received at now_: not before it
    EXPECT_EQ(must(store_->prune_events(now_ + chr::milliseconds{1})), 1u);
    // After pruning, the same id is accepted again (de-duplication lasts as long as the event is kept).
    EXPECT_EQ(must(store_->record_events(hub.id, {push_event("a", "team/app", "v1")})).size(), 1u);
}

TEST_F(StoreTest, EventsGoWithTheirRegistry) {
    const Registry hub = add_registry("hub");
    ASSERT_TRUE(store_->record_events(hub.id, {push_event("a", "team/app", "v1")}).ok());
    ASSERT_TRUE(store_->remove_registry(hub.id).ok());
    EXPECT_TRUE(must(store_->list_events(100)).empty());
}

// ---------------------------------------------------------------------------------------------
// Deliveries

TEST_F(StoreTest, DeliveriesLifecycle) {
    const Rule r = add_rule("r");
    const int64_t task = add_task(r.id);
    finish(task);
    auto d1 = store_->add_delivery(task, "https://hooks.example.com/a");
    ASSERT_TRUE(d1.ok()) << d1.error().message;
    EXPECT_GT(d1->id, 0);
    EXPECT_EQ(d1->task_id, task);
    EXPECT_EQ(d1->url, "https://hooks.example.com/a");
    EXPECT_EQ(d1->status, "pending");
    EXPECT_EQ(d1->attempts, 0u);
    EXPECT_EQ(d1->created, now_);
    EXPECT_FALSE(d1->finished.has_value());
    auto d2 = store_->add_delivery(task, "https://hooks.example.com/b");
    ASSERT_TRUE(d2.ok());

    // A failed attempt that will be retried stays pending.
    now_ += chr::seconds{1};
    ASSERT_TRUE(store_->update_delivery(d1->id, "pending", 1, 503, "HTTP 503").ok());
    auto pending = must(store_->pending_deliveries());
    ASSERT_EQ(pending.size(), 2u);
    EXPECT_EQ(pending[0].id, d1->id);
    EXPECT_EQ(pending[0].attempts, 1u);
    EXPECT_EQ(pending[0].last_status, 503);
    EXPECT_EQ(pending[0].last_error, "HTTP 503");
    EXPECT_FALSE(pending[0].finished.has_value());

    now_ += chr::seconds{1};
    ASSERT_TRUE(store_->update_delivery(d1->id, "delivered", 2, 200, "").ok());
    ASSERT_TRUE(store_->update_delivery(d2->id, "failed", 5, 0, "connection refused").ok());
    EXPECT_TRUE(must(store_->pending_deliveries()).empty());
    open_store();
    auto list = must(store_->list_deliveries(task));
    ASSERT_EQ(list.size(), 2u);
    EXPECT_EQ(list[0].status, "delivered");
    EXPECT_EQ(list[0].attempts, 2u);
    EXPECT_EQ(list[0].last_status, 200);
    EXPECT_EQ(list[0].last_error, "");
    EXPECT_EQ(list[0].finished, now_);
    EXPECT_EQ(list[1].status, "failed");
    EXPECT_EQ(list[1].last_error, "connection refused");
    EXPECT_EQ(list[1].finished, now_);
    EXPECT_EQ(engine::to_json(list[1])["status"], "failed");

    // Back to pending (a manual retry) clears finished.
    ASSERT_TRUE(store_->update_delivery(d2->id, "pending", 5, 0, "").ok());
    EXPECT_FALSE(must(store_->list_deliveries(task))[1].finished.has_value());

    EXPECT_TRUE(fails_with(store_->update_delivery(d1->id, "done", 1, 200, ""), ErrorKind::invalid,
                           "status: 'done' is not one of pending, delivered, failed"));
    EXPECT_TRUE(fails_with(store_->update_delivery(999, "failed", 1, 0, ""), ErrorKind::not_found, "no delivery"));
    EXPECT_TRUE(fails_with(store_->add_delivery(999, "https://h.example.com"), ErrorKind::not_found, "no task"));
    EXPECT_TRUE(fails_with(store_->add_delivery(task, ""), ErrorKind::invalid, "url"));
    EXPECT_TRUE(fails_with(store_->list_deliveries(999), ErrorKind::not_found, "no task"));

    // Deliveries go with their task.
    engine::Retention none;
    none.keep_last_per_rule = 0;
    ASSERT_TRUE(store_->prune_tasks(none).ok());
    EXPECT_TRUE(must(store_->pending_deliveries()).empty());
    EXPECT_TRUE(fails_with(store_->list_deliveries(task), ErrorKind::not_found, "no task"));
}

TEST_F(StoreTest, RefusesNewerSchema) {
    store_.reset();
    sqlite3* db = nullptr;
    ASSERT_EQ(sqlite3_open((dir_ / "state.db").c_str(), &db), SQLITE_OK);
    ASSERT_EQ(sqlite3_exec(db, "UPDATE schema_version SET version = 99", nullptr, nullptr, nullptr), SQLITE_OK);
    sqlite3_close(db);
    auto s = Store::open(dir_.string());
    ASSERT_FALSE(s.ok());
    EXPECT_NE(s.error().message.find("schema version 99"), std::string::npos) << s.error().message;
}

// ---------------------------------------------------------------------------------------------
// Credentials never come back

TEST_F(StoreTest, CredentialsNeverInApiOutputOrErrors) {
    const Registry reg = add_registry("src", true);
    add_registry("dst", true);
    Rule r = rule("secretive");
    r.target_credentials = engine::Credentials{kUser, kTargetSecret, {}};
    auto created = store_->create_rule(r);
    ASSERT_TRUE(created.ok());
    const int64_t task = add_task(created->id);

    std::string everything;
    for (const auto& x : must(store_->list_registries())) everything += engine::to_json(x).dump();
    everything += engine::to_json(must(store_->get_registry(reg.id))).dump();
    everything += engine::to_json(must(store_->get_registry_by_name("dst"))).dump();
    for (const auto& x : must(store_->list_rules())) everything += engine::to_json(x).dump();
    everything += engine::to_json(must(store_->get_rule(created->id))).dump();
    everything += engine::to_json(must(store_->get_task(task)), now_).dump();
    for (const auto& x : must(store_->list_tasks({})).tasks) everything += engine::to_json(x, now_).dump();

    // Error paths that involve the objects holding credentials.
    Registry dup = reg;
    dup.id = 0;
    dup.credentials = engine::Credentials{kUser, kSecret, {}};
    auto conflict = store_->add_registry(dup);
    ASSERT_FALSE(conflict.ok());
    everything += conflict.error().message;
    dup.name = "fresh";
    dup.credentials = engine::Credentials{kUser, std::string(kSecret) + "\n", {}};
    auto invalid = store_->add_registry(dup);
    ASSERT_FALSE(invalid.ok());
    everything += invalid.error().message;
    auto blocked = store_->remove_registry(reg.id);
    ASSERT_FALSE(blocked.ok());
    everything += blocked.error().message;
    Rule dup_rule = r;
    auto rule_conflict = store_->create_rule(dup_rule);
    ASSERT_FALSE(rule_conflict.ok());
    everything += rule_conflict.error().message;

    EXPECT_EQ(everything.find(kSecret), std::string::npos) << everything;
    EXPECT_EQ(everything.find(kTargetSecret), std::string::npos) << everything;
    EXPECT_EQ(everything.find(kUser), std::string::npos) << everything;
    EXPECT_NE(everything.find("\"has_credentials\":true"), std::string::npos);
    EXPECT_NE(everything.find("\"has_target_credentials\":true"), std::string::npos);
}

TEST_F(StoreTest, ReplacedSecretsDoNotLingerInTheFile) {
    Registry reg = add_registry("hub", true);
    add_registry("later");
    // A longer secret moves the row; without secure_delete the old cell stays in the page's free space.
    reg.credentials = engine::Credentials{"other", std::string(200, 'r'), {}};
    ASSERT_TRUE(store_->update_registry(reg).ok());
    store_.reset();  // checkpoints the WAL into state.db
    EXPECT_EQ(file_bytes(dir_ / "state.db").find(kSecret), std::string::npos);
    if (fs::exists(dir_ / "state.db-wal")) {
        EXPECT_EQ(file_bytes(dir_ / "state.db-wal").find(kSecret), std::string::npos);
    }
}

TEST(StoreErrors, KindOfForeignErrorIsInternal) {
    EXPECT_EQ(engine::kind_of(netio::Error::make("x")), ErrorKind::internal);
    EXPECT_EQ(engine::kind_of(netio::Error{engine::make_error_code(ErrorKind::not_found), "x"}), ErrorKind::not_found);
    const std::error_code ec = ErrorKind::conflict;
    EXPECT_EQ(ec.category().name(), std::string("crossdock.store"));
    EXPECT_EQ(ec.message(), "conflict");
}

}  // namespace
