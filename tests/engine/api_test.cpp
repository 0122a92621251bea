// ControlApi: the control API's router, called directly with constructed requests (no sockets).
#include "engine/api.h"

#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace {

using engine::ControlApi;
using engine::Store;
using engine::TaskItem;
using engine::TaskStatus;
using engine::Time;
using json = nlohmann::json;
namespace fs = std::filesystem;

constexpr char kSecret[] = "S3CRET-pa55w0rd-do-not-leak";
constexpr char kTargetSecret[] = "TARGET-t0ken-do-not-leak";
constexpr char kWebhookSecret[] = "WEBHOOK-sh4red-do-not-leak";

json with(json j, const char* key, const char* value) {
    j[key] = value;
    return j;
}

Time at(const char* rfc3339) { return engine::parse_time(rfc3339).value(); }

struct Reply {
    int status = 0;
    json body;  // null when the body is empty
    std::string raw;
    netio::Headers headers;

    std::string header(std::string_view name) const { return netio::find_header(headers, name); }
    // The message of the error for `field` ("" if there is none).
    std::string field_error(std::string_view field) const {
        if (!body.is_object() || !body.contains("errors")) return "";
        for (const auto& e : body["errors"])
            if (e.value("field", "") == field) return e.value("message", "");
        return "";
    }
    bool has_field_error(std::string_view field) const {
        if (!body.is_object() || !body.contains("errors")) return false;
        for (const auto& e : body["errors"])
            if (e.value("field", "") == field) return true;
        return false;
    }
};

class ApiTest : public ::testing::Test {
protected:
    void SetUp() override {
        char tmpl[] = "/tmp/crossdock-api-test-XXXXXX";
        ASSERT_NE(::mkdtemp(tmpl), nullptr);
        root_ = tmpl;
        engine::StoreOptions so;
        so.clock = [this] { return now_; };
        auto s = Store::open((root_ / "state").string(), so);
        ASSERT_TRUE(s.ok()) << s.error().message;
        store_ = std::move(s.value());
        options_.clock = [this] { return now_; };
        options_.on_task_queued = [this](const engine::TaskRecord& t) { queued_.push_back(t.id); };
        options_.on_cancel_requested = [this](int64_t id) { cancel_requested_.push_back(id); };
        api_ = std::make_unique<ControlApi>(*store_, options_);
    }

    // A new router with options_ as changed by the test.
    void remake_api() { api_ = std::make_unique<ControlApi>(*store_, options_); }

    void TearDown() override {
        // Credentials are write-only: no response of any test carries one.
        for (const auto& body : bodies_) {
            EXPECT_EQ(body.find(kSecret), std::string::npos) << body;
            EXPECT_EQ(body.find(kTargetSecret), std::string::npos) << body;
            EXPECT_EQ(body.find(kWebhookSecret), std::string::npos) << body;
        }
        api_.reset();
        store_.reset();
        std::error_code ec;
        fs::remove_all(root_, ec);
    }

    Reply call(const std::string& method, const std::string& target, const std::string& body = "",
               const std::string& content_type = "application/json") {
        netio::HttpRequest req;
        req.method = method;
        req.target = target;
        const size_t q = target.find('?');
        req.path = target.substr(0, q);
        if (q != std::string::npos) req.query = target.substr(q + 1);
        if (!content_type.empty() && !body.empty()) req.headers.emplace_back("Content-Type", content_type);
        req.body = body;
        netio::HttpResponse resp = api_->handle(req);
        bodies_.push_back(resp.body);
        Reply r;
        r.status = resp.status;
        r.raw = resp.body;
        r.headers = resp.headers;
        if (!resp.body.empty()) {
            r.body = json::parse(resp.body, nullptr, false);
            EXPECT_FALSE(r.body.is_discarded()) << "not JSON: " << resp.body;
            if (r.status >= 400) {
                EXPECT_TRUE(r.body.contains("message")) << resp.body;
            }
        }
        if (resp.status >= 400) {
            EXPECT_FALSE(resp.body.empty()) << method << " " << target;
        }
        return r;
    }
    Reply send(const std::string& method, const std::string& target, const json& body) {
        return call(method, target, body.dump());
    }

    // Registries "src" (with credentials) and "dst".
    void add_registries() {
        ASSERT_EQ(send("POST", "/v1/registries",
                       json{{"name", "src"}, {"url", "https://src.example.com"}, {"region", "eu"},
                            {"username", "robot"}, {"password", kSecret}})
                      .status,
                  201);
        ASSERT_EQ(send("POST", "/v1/registries",
                       json{{"name", "dst"}, {"url", "https://dst.example.com"}, {"region", "us"}})
                      .status,
                  201);
    }

    json rule_body(const std::string& name) {
        return json{{"name", name},
                    {"source_registry", "src"},
                    {"source_namespace", "library"},
                    {"target_registry", "dst"},
                    {"target_username", "pusher"},
                    {"target_password", kTargetSecret}};
    }

    int64_t add_rule(const std::string& name) {
        auto r = send("POST", "/v1/rules", rule_body(name));
        EXPECT_EQ(r.status, 201) << r.raw;
        return r.body.value("id", int64_t{0});
    }

    int64_t trigger(const std::string& rule) {
        auto r = call("POST", "/v1/rules/" + rule + "/trigger");
        EXPECT_EQ(r.status, 202) << r.raw;
        return r.body.value("id", int64_t{0});
    }

    std::vector<int64_t> task_ids(const Reply& r) {
        std::vector<int64_t> ids;
        for (const auto& t : r.body["tasks"]) ids.push_back(t["id"].get<int64_t>());
        return ids;
    }

    // Registries "eu" (the primary), "us" and "ap", and a group over them.
    void add_group_registries() {
        for (const char* name : {"eu", "ap", "us"}) {  // ids in another order than the replicas
            json body{{"name", name}, {"url", std::string("https://") + name + ".example.com"}, {"region", name}};
            ASSERT_EQ(send("POST", "/v1/registries", body).status, 201) << name;
        }
    }
    json group_body(const std::string& name) {
        return json{{"name", name}, {"primary", "eu"}, {"replicas", {"us", "ap"}}};
    }
    int64_t add_group(const std::string& name) {
        auto r = send("POST", "/v1/replications", group_body(name));
        EXPECT_EQ(r.status, 201) << r.raw;
        return r.body.value("id", int64_t{0});
    }

    fs::path root_;
    Time now_ = at("2024-05-01T12:00:00Z");
    engine::ControlApiOptions options_;
    std::unique_ptr<Store> store_;
    std::unique_ptr<ControlApi> api_;
    std::vector<std::string> bodies_;
    std::vector<int64_t> queued_;
    std::vector<int64_t> cancel_requested_;
};

TEST_F(ApiTest, Version) {
    auto r = call("GET", "/v1/version");
    EXPECT_EQ(r.status, 200);
    EXPECT_EQ(r.body["api_version"], "v1");
    EXPECT_TRUE(r.body["version"].is_string());
    EXPECT_EQ(r.header("Content-Type"), "application/json");
    EXPECT_EQ(call("HEAD", "/v1/version").status, 200);
}

TEST_F(ApiTest, RuleLifecycle) {
    add_registries();
    auto created = send("POST", "/v1/rules", rule_body("nightly"));
    ASSERT_EQ(created.status, 201) << created.raw;
    const int64_t id = created.body["id"].get<int64_t>();
    EXPECT_EQ(created.header("Location"), "/v1/rules/" + std::to_string(id));
    EXPECT_EQ(created.body["name"], "nightly");
    EXPECT_EQ(created.body["enabled"], true);
    EXPECT_EQ(created.body["overwrite"], false);
    EXPECT_EQ(created.body["type"], "all");
    EXPECT_EQ(created.body["has_target_credentials"], true);

    add_rule("second");
    auto list = call("GET", "/v1/rules");
    ASSERT_EQ(list.status, 200);
    ASSERT_EQ(list.body["rules"].size(), 2u);

    auto by_name = call("GET", "/v1/rules/nightly");
    auto by_id = call("GET", "/v1/rules/" + std::to_string(id));
    EXPECT_EQ(by_name.status, 200);
    EXPECT_EQ(by_name.body, by_id.body);
    EXPECT_EQ(call("GET", "/v1/rules/nightly/").status, 200);  // trailing slash

    auto patched = send("PATCH", "/v1/rules/nightly",
                        json{{"description", "every night"}, {"schedule", "0 3 * * *"}, {"tag_filter", "v[0-9]+"},
                             {"overwrite", true}});
    ASSERT_EQ(patched.status, 200) << patched.raw;
    EXPECT_EQ(patched.body["description"], "every night");
    EXPECT_EQ(patched.body["schedule"], "0 3 * * *");
    EXPECT_EQ(patched.body["tag_filter"], "v[0-9]+");
    EXPECT_EQ(patched.body["overwrite"], true);
    EXPECT_TRUE(patched.body["next_fire"].is_string());
    EXPECT_EQ(patched.body["source_namespace"], "library");  // untouched
    EXPECT_EQ(patched.body["has_target_credentials"], true);  // kept

    // A document read with GET can be sent back as it is.
    auto roundtrip = send("PATCH", "/v1/rules/nightly", call("GET", "/v1/rules/nightly").body);
    EXPECT_EQ(roundtrip.status, 200) << roundtrip.raw;

    // Rename.
    auto renamed = send("PATCH", "/v1/rules/" + std::to_string(id), json{{"name", "nightly-2"}});
    ASSERT_EQ(renamed.status, 200) << renamed.raw;
    EXPECT_EQ(call("GET", "/v1/rules/nightly").status, 404);
    EXPECT_EQ(call("GET", "/v1/rules/nightly-2").status, 200);

    auto disabled = call("POST", "/v1/rules/nightly-2/disable");
    ASSERT_EQ(disabled.status, 200) << disabled.raw;
    EXPECT_EQ(disabled.body["enabled"], false);
    EXPECT_EQ(call("GET", "/v1/rules/nightly-2").body["enabled"], false);
    EXPECT_EQ(call("POST", "/v1/rules/nightly-2/disable").status, 200);  // idempotent
    auto enabled = call("POST", "/v1/rules/nightly-2/enable");
    ASSERT_EQ(enabled.status, 200);
    EXPECT_EQ(enabled.body["enabled"], true);
    EXPECT_EQ(enabled.body["has_target_credentials"], true);

    auto del = call("DELETE", "/v1/rules/nightly-2");
    EXPECT_EQ(del.status, 204);
    EXPECT_TRUE(del.raw.empty());
    EXPECT_EQ(call("GET", "/v1/rules/nightly-2").status, 404);
    EXPECT_EQ(call("GET", "/v1/rules/" + std::to_string(id)).status, 404);
    EXPECT_EQ(call("DELETE", "/v1/rules/nightly-2").status, 404);
    EXPECT_EQ(call("POST", "/v1/rules/nightly-2/trigger").status, 404);
    EXPECT_EQ(call("GET", "/v1/rules").body["rules"].size(), 1u);
}

TEST_F(ApiTest, RegistryCrud) {
    add_registries();
    auto list = call("GET", "/v1/registries");
    ASSERT_EQ(list.status, 200);
    ASSERT_EQ(list.body["registries"].size(), 2u);

    auto src = call("GET", "/v1/registries/src");
    ASSERT_EQ(src.status, 200);
    EXPECT_EQ(src.body["has_credentials"], true);
    EXPECT_EQ(src.body["url"], "https://src.example.com");
    const int64_t id = src.body["id"].get<int64_t>();
    EXPECT_EQ(call("GET", "/v1/registries/" + std::to_string(id)).body, src.body);

    auto created = send("POST", "/v1/registries", json{{"name", "third"}, {"url", "HTTPS://Third.Example.com/"}});
    ASSERT_EQ(created.status, 201) << created.raw;
    EXPECT_EQ(created.body["url"], "https://third.example.com");
    EXPECT_EQ(created.body["has_credentials"], false);
    EXPECT_EQ(created.header("Location"), "/v1/registries/" + std::to_string(created.body["id"].get<int64_t>()));

    auto patched = send("PATCH", "/v1/registries/src", json{{"region", "ap"}, {"url", "https://mirror.example.com:5000"}});
    ASSERT_EQ(patched.status, 200) << patched.raw;
    EXPECT_EQ(patched.body["region"], "ap");
    EXPECT_EQ(patched.body["url"], "https://mirror.example.com:5000");
    EXPECT_EQ(patched.body["has_credentials"], true);  // kept

    // New credentials replace the old; "" for both removes them.
    auto recred = send("PATCH", "/v1/registries/src", json{{"username", "robot2"}, {"password", kSecret}});
    EXPECT_EQ(recred.status, 200);
    auto cleared = send("PATCH", "/v1/registries/third", json{{"username", ""}, {"password", ""}});
    EXPECT_EQ(cleared.status, 200);
    EXPECT_EQ(cleared.body["has_credentials"], false);

    // Duplicate names: 409 on create and on rename.
    auto dup = send("POST", "/v1/registries", json{{"name", "src"}, {"url", "https://other.example.com"}});
    EXPECT_EQ(dup.status, 409) << dup.raw;
    EXPECT_NE(dup.body["message"].get<std::string>().find("already exists"), std::string::npos);
    EXPECT_EQ(send("PATCH", "/v1/registries/third", json{{"name", "dst"}}).status, 409);

    // Refused while a rule uses it; allowed once the rule is gone.
    add_rule("r1");
    auto refused = call("DELETE", "/v1/registries/src");
    EXPECT_EQ(refused.status, 409) << refused.raw;
    EXPECT_NE(refused.body["message"].get<std::string>().find("r1"), std::string::npos);
    EXPECT_EQ(call("GET", "/v1/registries/src").status, 200);
    EXPECT_EQ(call("DELETE", "/v1/rules/r1").status, 204);
    EXPECT_EQ(call("DELETE", "/v1/registries/src").status, 204);
    EXPECT_EQ(call("GET", "/v1/registries/src").status, 404);
    EXPECT_EQ(call("DELETE", "/v1/registries/src").status, 404);
    EXPECT_EQ(send("PATCH", "/v1/registries/src", json{{"region", "eu"}}).status, 404);
    EXPECT_EQ(call("GET", "/v1/registries").body["registries"].size(), 2u);
}

TEST_F(ApiTest, Links) {
    auto put = send("PUT", "/v1/links/eu/us", json{{"rate_bytes_per_s", 1000000}});
    ASSERT_EQ(put.status, 201) << put.raw;
    EXPECT_EQ(put.header("Location"), "/v1/links/eu/us");
    EXPECT_EQ(put.body["source_region"], "eu");
    EXPECT_EQ(put.body["target_region"], "us");
    auto again = send("PUT", "/v1/links/eu/us", json{{"rate_bytes_per_s", 2000000}, {"burst_bytes", 4000000}});
    ASSERT_EQ(again.status, 200) << again.raw;
    EXPECT_EQ(again.body["burst_bytes"], 4000000);

    auto list = call("GET", "/v1/links");
    ASSERT_EQ(list.status, 200);
    ASSERT_EQ(list.body["links"].size(), 1u);
    EXPECT_EQ(list.body["links"][0]["rate_bytes_per_s"], 2000000);
    EXPECT_EQ(call("GET", "/v1/links/eu/us").status, 200);
    EXPECT_EQ(call("GET", "/v1/links/us/eu").status, 404);

    auto mismatch = send("PUT", "/v1/links/eu/us", json{{"source_region", "ap"}, {"rate_bytes_per_s", 1}});
    EXPECT_EQ(mismatch.status, 400);
    EXPECT_TRUE(mismatch.has_field_error("source_region")) << mismatch.raw;
    auto zero = send("PUT", "/v1/links/eu/ap", json{{"rate_bytes_per_s", 0}});
    EXPECT_EQ(zero.status, 400);
    EXPECT_TRUE(zero.has_field_error("rate_bytes_per_s")) << zero.raw;
    auto negative = send("PUT", "/v1/links/eu/ap", json{{"rate_bytes_per_s", -5}});
    EXPECT_TRUE(negative.has_field_error("rate_bytes_per_s")) << negative.raw;
    auto bad_region = send("PUT", "/v1/links/EU!/ap", json{{"rate_bytes_per_s", 5}});
    EXPECT_EQ(bad_region.status, 400);
    EXPECT_TRUE(bad_region.has_field_error("source_region")) << bad_region.raw;

    EXPECT_EQ(call("DELETE", "/v1/links/eu/us").status, 204);
    EXPECT_EQ(call("DELETE", "/v1/links/eu/us").status, 404);
    EXPECT_EQ(call("GET", "/v1/links").body["links"].size(), 0u);
    auto wrong = send("POST", "/v1/links/eu/us", json{{"rate_bytes_per_s", 5}});
    EXPECT_EQ(wrong.status, 405);
    EXPECT_EQ(wrong.header("Allow"), "GET, PUT, DELETE, HEAD, OPTIONS");
}

TEST_F(ApiTest, TriggerQueuesTaskAndTasksList) {
    add_registries();
    const int64_t a = add_rule("alpha");
    add_rule("beta");

    auto trig = call("POST", "/v1/rules/alpha/trigger");
    ASSERT_EQ(trig.status, 202) << trig.raw;
    const int64_t t1 = trig.body["id"].get<int64_t>();
    EXPECT_EQ(trig.header("Location"), "/v1/tasks/" + std::to_string(t1));
    EXPECT_EQ(trig.body["status"], "Queued");
    EXPECT_EQ(trig.body["trigger"], "manual");
    EXPECT_EQ(trig.body["rule_id"], a);
    EXPECT_EQ(trig.body["rule_name"], "alpha");
    EXPECT_TRUE(trig.body["started"].is_null());
    EXPECT_EQ(queued_, std::vector<int64_t>{t1});
    // By id too.
    now_ = at("2024-05-01T13:00:00Z");
    const int64_t t2 = trigger(std::to_string(a));
    now_ = at("2024-05-01T14:00:00Z");
    const int64_t t3 = trigger("beta");
    now_ = at("2024-05-01T15:00:00Z");
    const int64_t t4 = trigger("alpha");

    auto shown = call("GET", "/v1/tasks/" + std::to_string(t1));
    ASSERT_EQ(shown.status, 200);
    EXPECT_EQ(shown.body["status"], "Queued");
    EXPECT_EQ(shown.body["created"], "2024-05-01T12:00:00.000Z");

    auto all = call("GET", "/v1/tasks");
    ASSERT_EQ(all.status, 200);
    EXPECT_EQ(task_ids(all), (std::vector<int64_t>{t4, t3, t2, t1}));  // newest first
    EXPECT_TRUE(all.body["next_cursor"].is_null());

    EXPECT_EQ(task_ids(call("GET", "/v1/tasks?rule=alpha")), (std::vector<int64_t>{t4, t2, t1}));
    EXPECT_EQ(task_ids(call("GET", "/v1/tasks?rule=" + std::to_string(a))), (std::vector<int64_t>{t4, t2, t1}));
    EXPECT_EQ(task_ids(call("GET", "/v1/tasks?rule=beta&status=queued")), (std::vector<int64_t>{t3}));
    EXPECT_TRUE(task_ids(call("GET", "/v1/tasks?status=Succeeded")).empty());
    EXPECT_EQ(task_ids(call("GET", "/v1/tasks?since=2024-05-01T13:00:00Z&until=2024-05-01T15:00:00Z")),
              (std::vector<int64_t>{t3, t2}));
    EXPECT_EQ(task_ids(call("GET", "/v1/tasks?since=2024-05-01T15%3A00%3A00%2B00%3A00")), (std::vector<int64_t>{t4}));

    // Pagination.
    auto p1 = call("GET", "/v1/tasks?limit=3");
    ASSERT_EQ(p1.status, 200);
    EXPECT_EQ(task_ids(p1), (std::vector<int64_t>{t4, t3, t2}));
    ASSERT_TRUE(p1.body["next_cursor"].is_string()) << p1.raw;
    auto p2 = call("GET", "/v1/tasks?limit=3&cursor=" + p1.body["next_cursor"].get<std::string>());
    EXPECT_EQ(task_ids(p2), (std::vector<int64_t>{t1}));
    EXPECT_TRUE(p2.body["next_cursor"].is_null());
    auto f1 = call("GET", "/v1/tasks?rule=alpha&limit=2");
    EXPECT_EQ(task_ids(f1), (std::vector<int64_t>{t4, t2}));
    auto f2 = call("GET", "/v1/tasks?rule=alpha&limit=2&cursor=" + f1.body["next_cursor"].get<std::string>());
    EXPECT_EQ(task_ids(f2), (std::vector<int64_t>{t1}));

    // Unknown rule or task: 404.
    EXPECT_EQ(call("GET", "/v1/tasks?rule=nope").status, 404);
    EXPECT_EQ(call("GET", "/v1/tasks/999999").status, 404);
    EXPECT_EQ(call("GET", "/v1/tasks/abc").status, 404);
    EXPECT_EQ(call("GET", "/v1/tasks/999999/items").status, 404);
    EXPECT_EQ(call("POST", "/v1/tasks/999999/cancel").status, 404);
    EXPECT_EQ(call("POST", "/v1/rules/nope/trigger").status, 404);

    // A disabled rule is not triggered.
    ASSERT_EQ(call("POST", "/v1/rules/beta/disable").status, 200);
    auto off = call("POST", "/v1/rules/beta/trigger");
    EXPECT_EQ(off.status, 409) << off.raw;
    EXPECT_NE(off.body["message"].get<std::string>().find("disabled"), std::string::npos);
    EXPECT_EQ(queued_.size(), 4u);
}

TEST_F(ApiTest, TaskItems) {
    add_registries();
    add_rule("alpha");
    const int64_t t = trigger("alpha");
    ASSERT_TRUE(store_->start_task(t).ok());
    std::vector<TaskItem> items;
    for (int i = 0; i < 5; ++i) {
        TaskItem it;
        it.repository = "library/app";
        it.tag = "v" + std::to_string(i);
        it.digest = "sha256:" + std::string(64, static_cast<char>('a' + i));
        it.action = i % 2 == 0 ? engine::ItemAction::copied : engine::ItemAction::skipped_exists;
        it.bytes = i % 2 == 0 ? 100 : 0;
        items.push_back(it);
    }
    ASSERT_TRUE(store_->append_items(t, items).ok());

    auto all = call("GET", "/v1/tasks/" + std::to_string(t) + "/items");
    ASSERT_EQ(all.status, 200) << all.raw;
    ASSERT_EQ(all.body["items"].size(), 5u);
    EXPECT_EQ(all.body["items"][0]["tag"], "v0");
    EXPECT_EQ(all.body["items"][1]["action"], "skipped: exists");
    EXPECT_TRUE(all.body["next_cursor"].is_null());

    auto skipped = call("GET", "/v1/tasks/" + std::to_string(t) + "/items?action=skipped%3A%20exists");
    ASSERT_EQ(skipped.status, 200) << skipped.raw;
    EXPECT_EQ(skipped.body["items"].size(), 2u);
    auto plus = call("GET", "/v1/tasks/" + std::to_string(t) + "/items?action=skipped:+exists");
    EXPECT_EQ(plus.body["items"].size(), 2u);

    auto p1 = call("GET", "/v1/tasks/" + std::to_string(t) + "/items?limit=2");
    ASSERT_EQ(p1.body["items"].size(), 2u);
    ASSERT_TRUE(p1.body["next_cursor"].is_string());
    auto p2 = call("GET", "/v1/tasks/" + std::to_string(t) + "/items?limit=2&cursor=" +
                              p1.body["next_cursor"].get<std::string>());
    ASSERT_EQ(p2.body["items"].size(), 2u);
    EXPECT_EQ(p2.body["items"][0]["tag"], "v2");

    auto task = call("GET", "/v1/tasks/" + std::to_string(t));
    EXPECT_EQ(task.body["status"], "InProgress");
    EXPECT_EQ(task.body["copied"], 3);
    EXPECT_EQ(task.body["skipped"], 2);
    EXPECT_EQ(task.body["bytes"], 300);

    auto bad = call("GET", "/v1/tasks/" + std::to_string(t) + "/items?action=moved&limit=0&cursor=x&foo=1");
    EXPECT_EQ(bad.status, 400);
    for (const char* f : {"action", "limit", "cursor", "foo"}) EXPECT_TRUE(bad.has_field_error(f)) << f << bad.raw;
}

TEST_F(ApiTest, Cancel) {
    add_registries();
    add_rule("alpha");
    const int64_t queued = trigger("alpha");
    auto c = call("POST", "/v1/tasks/" + std::to_string(queued) + "/cancel");
    ASSERT_EQ(c.status, 200) << c.raw;
    EXPECT_EQ(c.body["status"], "Stopped");
    auto again = call("POST", "/v1/tasks/" + std::to_string(queued) + "/cancel");
    EXPECT_EQ(again.status, 409) << again.raw;
    EXPECT_TRUE(cancel_requested_.empty());

    const int64_t running = trigger("alpha");
    ASSERT_TRUE(store_->start_task(running).ok());
    auto r = call("POST", "/v1/tasks/" + std::to_string(running) + "/cancel");
    ASSERT_EQ(r.status, 202) << r.raw;
    EXPECT_EQ(r.body["status"], "InProgress");
    EXPECT_EQ(r.body["cancel_requested"], true);
    EXPECT_EQ(cancel_requested_, std::vector<int64_t>{running});
    EXPECT_EQ(call("GET", "/v1/tasks/" + std::to_string(running) + "/cancel").status, 405);

    // Deleting a rule stops its tasks: the running one is reported to the daemon.
    cancel_requested_.clear();
    const int64_t q2 = trigger("alpha");
    EXPECT_EQ(call("DELETE", "/v1/rules/alpha").status, 204);
    EXPECT_EQ(cancel_requested_, std::vector<int64_t>{running});
    auto stopped = call("GET", "/v1/tasks/" + std::to_string(q2));
    EXPECT_EQ(stopped.body["status"], "Stopped");
    EXPECT_TRUE(stopped.body["rule_id"].is_null());
    EXPECT_EQ(stopped.body["rule_name"], "alpha");
}

TEST_F(ApiTest, FieldErrorsNameTheField) {
    add_registries();
    auto missing = send("POST", "/v1/rules", json{{"description", "x"}});
    ASSERT_EQ(missing.status, 400) << missing.raw;
    for (const char* f : {"name", "source_registry", "source_namespace", "target_registry"})
        EXPECT_TRUE(missing.has_field_error(f)) << f << " " << missing.raw;
    EXPECT_NE(missing.body["message"].get<std::string>().find("name:"), std::string::npos);

    json bad = rule_body("Bad Name");
    bad["tag_filter"] = "v[z-a]";
    bad["repo_filter"] = "a(b";
    bad["schedule"] = "61 * * * *";
    bad["type"] = "zip";
    bad["overwrite"] = "yes";
    bad["colour"] = "red";
    auto r = send("POST", "/v1/rules", bad);
    ASSERT_EQ(r.status, 400) << r.raw;
    EXPECT_NE(r.field_error("name"), "");
    EXPECT_NE(r.field_error("tag_filter").find("at position 3"), std::string::npos) << r.raw;
    EXPECT_NE(r.field_error("repo_filter").find("position"), std::string::npos) << r.raw;
    EXPECT_NE(r.field_error("schedule"), "");
    EXPECT_NE(r.field_error("type"), "");
    EXPECT_NE(r.field_error("overwrite"), "");
    EXPECT_EQ(r.field_error("colour"), "unknown field");

    auto interval = send("POST", "/v1/rules", with(rule_body("r"), "schedule", "5s"));
    EXPECT_EQ(interval.status, 400);
    EXPECT_TRUE(interval.has_field_error("schedule")) << interval.raw;

    // A registry that does not exist is the store's finding, still with the field named.
    auto no_reg = send("POST", "/v1/rules", with(rule_body("r"), "target_registry", "ghost"));
    ASSERT_EQ(no_reg.status, 400) << no_reg.raw;
    EXPECT_NE(no_reg.field_error("target_registry").find("ghost"), std::string::npos) << no_reg.raw;

    // Credentials come in pairs; the message never quotes the secret.
    auto half = send("POST", "/v1/registries", json{{"name", "x"}, {"url", "https://x.example.com"}, {"password", kSecret}});
    EXPECT_EQ(half.status, 400);
    EXPECT_TRUE(half.has_field_error("username")) << half.raw;
    auto bad_url = send("POST", "/v1/registries", json{{"name", "x"}, {"url", "ftp://x"}});
    EXPECT_TRUE(bad_url.has_field_error("url")) << bad_url.raw;

    // PATCH is checked the same way, and a failed PATCH changes nothing.
    add_rule("good");
    auto p = send("PATCH", "/v1/rules/good", json{{"tag_filter", "x**"}, {"name", ""}});
    ASSERT_EQ(p.status, 400);
    EXPECT_TRUE(p.has_field_error("tag_filter"));
    EXPECT_TRUE(p.has_field_error("name"));
    EXPECT_EQ(call("GET", "/v1/rules/good").body["tag_filter"], "");
    EXPECT_EQ(send("PATCH", "/v1/rules/nope", json{{"description", "x"}}).status, 404);

    // Duplicate rule name: 409, on create and on rename.
    add_rule("other");
    EXPECT_EQ(send("POST", "/v1/rules", rule_body("good")).status, 409);
    EXPECT_EQ(send("PATCH", "/v1/rules/other", json{{"name", "good"}}).status, 409);

    // Body that is not an object.
    auto arr = call("POST", "/v1/rules", "[1,2]");
    EXPECT_EQ(arr.status, 400);
    EXPECT_TRUE(arr.has_field_error("")) << arr.raw;
}

TEST_F(ApiTest, BadRequests) {
    add_registries();
    // Not JSON; the syntax error is reported by position, never by quoting the body.
    const std::string broken = std::string("{\"name\": \"x\", \"password\": \"") + kSecret;
    auto nj = call("POST", "/v1/registries", broken);
    ASSERT_EQ(nj.status, 400);
    EXPECT_EQ(nj.body["message"], "body is not valid JSON");
    EXPECT_EQ(call("POST", "/v1/rules", "").body["message"], "body is not valid JSON");
    EXPECT_EQ(call("PATCH", "/v1/rules/whatever", "{oops").status, 400);
    EXPECT_EQ(call("PUT", "/v1/links/eu/us", "nope").status, 400);

    // Too deep, too big.
    EXPECT_EQ(call("POST", "/v1/rules", std::string(100000, '[') + std::string(100000, ']')).status, 400);
    EXPECT_EQ(call("POST", "/v1/rules", std::string(ControlApi::kMaxBodyBytes + 1, ' ')).status, 413);

    // Wrong Content-Type for a JSON body: 415; parameters and +json are fine.
    auto form = call("POST", "/v1/rules", rule_body("r").dump(), "application/x-www-form-urlencoded");
    EXPECT_EQ(form.status, 415) << form.raw;
    EXPECT_EQ(call("PATCH", "/v1/registries/src", "{}", "text/plain").status, 415);
    EXPECT_EQ(call("POST", "/v1/rules", rule_body("r1").dump(), "application/json; charset=utf-8").status, 201);
    EXPECT_EQ(call("POST", "/v1/rules", rule_body("r2").dump(), "Application/vnd.crossdock+JSON").status, 201);
    EXPECT_EQ(call("POST", "/v1/rules", rule_body("r3").dump(), "").status, 201);

    // Unknown routes: 404 JSON.
    for (const char* t : {"/", "/v1", "/v2/rules", "/v1/nothing", "/v1/rules/r1/explode", "/v1//rules",
                          "/v1/tasks/1/items/2", "/v1/links/eu"}) {
        auto r = call("GET", t);
        EXPECT_EQ(r.status, 404) << t;
        EXPECT_TRUE(r.body.contains("message")) << t;
    }

    // Known route, wrong method: 405 with Allow.
    struct Case {
        const char* method;
        const char* target;
        const char* allow;
    } cases[] = {
        {"DELETE", "/v1/rules", "GET, POST, HEAD, OPTIONS"},
        {"PUT", "/v1/rules/r1", "GET, PATCH, DELETE, HEAD, OPTIONS"},
        {"GET", "/v1/rules/r1/trigger", "POST, OPTIONS"},
        {"POST", "/v1/tasks", "GET, HEAD, OPTIONS"},
        {"DELETE", "/v1/tasks/1", "GET, HEAD, OPTIONS"},
        {"POST", "/v1/version", "GET, HEAD, OPTIONS"},
        {"PATCH", "/v1/registries", "GET, POST, HEAD, OPTIONS"},
        {"BREW", "/v1/links", "GET, HEAD, OPTIONS"},
    };
    for (const auto& c : cases) {
        auto r = call(c.method, c.target, "{}");
        EXPECT_EQ(r.status, 405) << c.method << " " << c.target;
        EXPECT_EQ(r.header("Allow"), c.allow) << c.method << " " << c.target;
    }
    auto opts = call("OPTIONS", "/v1/rules");
    EXPECT_EQ(opts.status, 204);
    EXPECT_EQ(opts.header("Allow"), "GET, POST, HEAD, OPTIONS");

    // Bad query parameters name the parameter.
    auto q = call("GET", "/v1/tasks?status=Done&since=yesterday&until=2024-13-01T00:00:00Z&limit=1001&cursor=-1&x=1");
    ASSERT_EQ(q.status, 400) << q.raw;
    for (const char* f : {"status", "since", "until", "limit", "cursor", "x"})
        EXPECT_TRUE(q.has_field_error(f)) << f << " " << q.raw;
    auto twice = call("GET", "/v1/tasks?limit=1&limit=2");
    EXPECT_TRUE(twice.has_field_error("limit")) << twice.raw;
    EXPECT_EQ(call("GET", "/v1/tasks?limit=abc").status, 400);

    // Unknown names and ids: 404, with the name quoted safely.
    auto unknown = call("GET", "/v1/rules/no%0Asuch");
    EXPECT_EQ(unknown.status, 404);
    EXPECT_EQ(unknown.raw.find('\n'), unknown.raw.size() - 1);  // only the trailing newline
    EXPECT_EQ(call("GET", "/v1/registries/999").status, 404);
    EXPECT_EQ(call("GET", "/v1/rules/" + std::string(500, 'a')).status, 404);
    EXPECT_EQ(call("GET", "/v1/rules/99999999999999999999999").status, 404);
}

TEST_F(ApiTest, CredentialsNeverEchoed) {
    add_registries();
    add_rule("alpha");
    // Every read path; TearDown greps every body of the test for the secrets.
    call("GET", "/v1/registries");
    call("GET", "/v1/registries/src");
    send("PATCH", "/v1/registries/src", json{{"username", "u"}, {"password", kSecret}});
    send("PATCH", "/v1/registries/src", json{{"username", "u"}, {"password", kSecret}, {"url", "bogus"}});
    send("PATCH", "/v1/registries/src", json{{"password", kSecret}});
    send("POST", "/v1/registries", json{{"name", "src"}, {"url", "https://a.example.com"}, {"username", "u"},
                                        {"password", kSecret}});  // 409
    send("POST", "/v1/registries", json{{"name", "src2"}, {"url", "https://a.example.com"}, {"username", 5},
                                        {"password", kSecret}});
    call("GET", "/v1/rules");
    call("GET", "/v1/rules/alpha");
    send("PATCH", "/v1/rules/alpha", json{{"target_username", "u"}, {"target_password", kTargetSecret}});
    send("PATCH", "/v1/rules/alpha", json{{"target_password", kTargetSecret}, {"tag_filter", "("}});
    call("POST", "/v1/rules", std::string("{\"name\":\"x\",\"target_password\":\"") + kTargetSecret + "\"");
    call("POST", "/v1/rules", std::string("{\"name\":\"x\",\"target_password\":") + kTargetSecret + "}");
    call("POST", "/v1/rules/alpha/trigger");
    call("GET", "/v1/tasks");
    EXPECT_EQ(call("GET", "/v1/rules/alpha").body["has_target_credentials"], true);
    // The store still has them: write-only, not dropped.
    auto creds = store_->credentials_for(call("GET", "/v1/registries/src").body["id"].get<int64_t>());
    ASSERT_TRUE(creds.ok());
    EXPECT_EQ(creds->password, kSecret);
    for (const auto& b : bodies_) {
        EXPECT_EQ(b.find(kSecret), std::string::npos) << b;
        EXPECT_EQ(b.find(kTargetSecret), std::string::npos) << b;
    }
}

TEST_F(ApiTest, NeverThrows) {
    // Odd inputs the server could hand over: empty method and path, binary junk, huge segments.
    netio::HttpRequest req;
    EXPECT_EQ(api_->handle(req).status, 404);
    req.method = "GET";
    req.path = "*";
    EXPECT_EQ(api_->handle(req).status, 404);
    req.path = std::string("/v1/rules/\xff\xfe%ZZ%");
    EXPECT_EQ(api_->handle(req).status, 404);
    req.method = "POST";
    req.path = "/v1/rules";
    req.body = "{\"name\": \"\xff\xfe\"}";
    auto r = api_->handle(req);
    EXPECT_EQ(r.status, 400);
    // A failing hook does not undo the persisted task.
    engine::ControlApiOptions o;
    o.on_task_queued = [](const engine::TaskRecord&) { throw std::runtime_error("boom"); };
    ControlApi api(*store_, o);
    add_registries();
    add_rule("alpha");
    netio::HttpRequest t;
    t.method = "POST";
    t.path = "/v1/rules/alpha/trigger";
    EXPECT_EQ(api.handle(t).status, 202);

    // Anything unexpected is a 500 with a JSON body, reported to the log, never thrown out.
    std::vector<std::string> logged;
    engine::ControlApiOptions bad;
    bad.clock = []() -> Time { throw std::runtime_error("clock exploded"); };
    bad.log = [&](std::string_view m) { logged.emplace_back(m); };
    ControlApi broken(*store_, bad);
    netio::HttpRequest g;
    g.method = "GET";
    g.path = "/v1/tasks";
    auto r500 = broken.handler()(g);
    EXPECT_EQ(r500.status, 500);
    EXPECT_EQ(json::parse(r500.body)["message"], "internal error");
    EXPECT_EQ(r500.body.find("exploded"), std::string::npos);
    ASSERT_EQ(logged.size(), 1u);
    EXPECT_NE(logged[0].find("clock exploded"), std::string::npos);
}

// ---------------------------------------------------------------------------------------------
// Webhook secrets, notification fields, events and deliveries

TEST_F(ApiTest, WebhookSecretIsWriteOnly) {
    auto created = send("POST", "/v1/registries",
                        json{{"name", "hub"}, {"url", "https://hub.example.com"}, {"webhook_secret", kWebhookSecret}});
    ASSERT_EQ(created.status, 201) << created.raw;
    EXPECT_EQ(created.body["has_webhook_secret"], true);
    EXPECT_FALSE(created.body.contains("webhook_secret"));
    const int64_t id = created.body["id"].get<int64_t>();
    EXPECT_EQ(store_->webhook_secret_for(id).value(), kWebhookSecret);

    EXPECT_EQ(call("GET", "/v1/registries/hub").body["has_webhook_secret"], true);
    call("GET", "/v1/registries");
    // A patch without it keeps it; with a bad value it is refused without being echoed.
    auto kept = send("PATCH", "/v1/registries/hub", json{{"region", "eu"}});
    ASSERT_EQ(kept.status, 200) << kept.raw;
    EXPECT_EQ(kept.body["has_webhook_secret"], true);
    auto bad = send("PATCH", "/v1/registries/hub", json{{"webhook_secret", std::string(kWebhookSecret) + "\n"}});
    EXPECT_EQ(bad.status, 400);
    EXPECT_TRUE(bad.has_field_error("webhook_secret")) << bad.raw;
    send("POST", "/v1/registries",
         json{{"name", "hub"}, {"url", "https://hub.example.com"}, {"webhook_secret", kWebhookSecret}});  // 409
    EXPECT_EQ(store_->webhook_secret_for(id).value(), kWebhookSecret);
    auto removed = send("PATCH", "/v1/registries/hub", json{{"webhook_secret", ""}});
    ASSERT_EQ(removed.status, 200) << removed.raw;
    EXPECT_EQ(removed.body["has_webhook_secret"], false);
    EXPECT_EQ(store_->webhook_secret_for(id).value(), "");
    // TearDown checks that no body of this test holds the secret.
}

TEST_F(ApiTest, RuleNotifyFields) {
    add_registries();
    json body = rule_body("notifying");
    body["sync_on_push"] = true;
    body["notify_urls"] = {"https://hooks.example.com/a"};
    body["notify_on"] = "failure";
    auto created = send("POST", "/v1/rules", body);
    ASSERT_EQ(created.status, 201) << created.raw;
    EXPECT_EQ(created.body["sync_on_push"], true);
    EXPECT_EQ(created.body["notify_urls"], json::array({"https://hooks.example.com/a"}));
    EXPECT_EQ(created.body["notify_on"], "failure");
    auto patched = send("PATCH", "/v1/rules/notifying", json{{"notify_on", "success"}});
    ASSERT_EQ(patched.status, 200) << patched.raw;
    EXPECT_EQ(patched.body["notify_on"], "success");
    EXPECT_EQ(patched.body["sync_on_push"], true);

    auto bad = send("PATCH", "/v1/rules/notifying",
                    json{{"notify_urls", {"https://hooks.example.com/a", "ftp://x.example.com"}}});
    EXPECT_EQ(bad.status, 400);
    EXPECT_NE(bad.field_error("notify_urls").find("URL 2 scheme must be http or https"), std::string::npos) << bad.raw;
    bad = send("PATCH", "/v1/rules/notifying", json{{"notify_on", "never"}});
    EXPECT_TRUE(bad.has_field_error("notify_on")) << bad.raw;
}

TEST_F(ApiTest, EventsNewestFirst) {
    add_registries();
    const int64_t src = store_->get_registry_by_name("src").value().id;
    const int64_t dst = store_->get_registry_by_name("dst").value().id;
    engine::RegistryEvent push{"ev-1", engine::RegistryEvent::Action::push, "library/app", "v1", "sha256:aa", ""};
    engine::RegistryEvent del{"ev-2", engine::RegistryEvent::Action::remove, "library/app", "v0", "", ""};
    ASSERT_TRUE(store_->record_events(src, {push, del}).ok());
    now_ = at("2024-05-01T12:00:05Z");
    ASSERT_TRUE(store_->record_events(dst, {push}).ok());

    auto r = call("GET", "/v1/events");
    ASSERT_EQ(r.status, 200) << r.raw;
    ASSERT_EQ(r.body["events"].size(), 3u);
    const json& newest = r.body["events"][0];
    EXPECT_EQ(newest["registry"], "dst");
    EXPECT_EQ(newest["event_id"], "ev-1");
    EXPECT_EQ(newest["received"], "2024-05-01T12:00:05.000Z");
    EXPECT_EQ(r.body["events"][1]["action"], "delete");
    EXPECT_EQ(r.body["events"][1]["registry"], "src");
    EXPECT_EQ(r.body["events"][2]["action"], "push");
    EXPECT_EQ(r.body["events"][2]["processed"], false);
    EXPECT_EQ(r.body["events"][2]["task_ids"], json::array());

    auto one = call("GET", "/v1/events?limit=1");
    ASSERT_EQ(one.status, 200);
    ASSERT_EQ(one.body["events"].size(), 1u);
    EXPECT_EQ(one.body["events"][0]["registry"], "dst");
    for (const char* bad : {"/v1/events?limit=0", "/v1/events?limit=1001", "/v1/events?limit=x"}) {
        auto b = call("GET", bad);
        EXPECT_EQ(b.status, 400) << bad;
        EXPECT_TRUE(b.has_field_error("limit")) << b.raw;
    }
    EXPECT_TRUE(call("GET", "/v1/events?since=x").has_field_error("since"));
    EXPECT_EQ(call("POST", "/v1/events").status, 405);
    EXPECT_EQ(call("GET", "/v1/events/1").status, 404);
}

TEST_F(ApiTest, TaskDeliveries) {
    add_registries();
    add_rule("alpha");
    const int64_t t = trigger("alpha");
    auto empty = call("GET", "/v1/tasks/" + std::to_string(t) + "/deliveries");
    ASSERT_EQ(empty.status, 200) << empty.raw;
    EXPECT_EQ(empty.body["deliveries"], json::array());

    auto d = store_->add_delivery(t, "https://hooks.example.com/a");
    ASSERT_TRUE(d.ok());
    ASSERT_TRUE(store_->add_delivery(t, "https://hooks.example.com/b").ok());
    ASSERT_TRUE(store_->update_delivery(d->id, "failed", 3, 500, "HTTP 500").ok());
    auto r = call("GET", "/v1/tasks/" + std::to_string(t) + "/deliveries");
    ASSERT_EQ(r.status, 200) << r.raw;
    ASSERT_EQ(r.body["deliveries"].size(), 2u);
    EXPECT_EQ(r.body["deliveries"][0]["url"], "https://hooks.example.com/a");
    EXPECT_EQ(r.body["deliveries"][0]["status"], "failed");
    EXPECT_EQ(r.body["deliveries"][0]["attempts"], 3);
    EXPECT_EQ(r.body["deliveries"][0]["last_status"], 500);
    EXPECT_EQ(r.body["deliveries"][0]["last_error"], "HTTP 500");
    EXPECT_EQ(r.body["deliveries"][0]["task_id"], t);
    EXPECT_EQ(r.body["deliveries"][1]["status"], "pending");
    EXPECT_EQ(call("GET", "/v1/tasks/999999/deliveries").status, 404);
    EXPECT_EQ(call("POST", "/v1/tasks/" + std::to_string(t) + "/deliveries").status, 405);
}

// ---------------------------------------------------------------------------------------------
// Replication groups

TEST_F(ApiTest, ReplicationCrud) {
    add_group_registries();
    auto created = send("POST", "/v1/replications", group_body("global"));
    ASSERT_EQ(created.status, 201) << created.raw;
    const int64_t id = created.body["id"].get<int64_t>();
    EXPECT_EQ(created.header("Location"), "/v1/replications/" + std::to_string(id));
    EXPECT_EQ(created.body["primary"], "eu");
    EXPECT_EQ(created.body["replicas"], json::array({"us", "ap"}));
    EXPECT_EQ(created.body["schedule"], "1h");
    EXPECT_EQ(created.body["enabled"], true);
    EXPECT_EQ(created.body["replicate_deletes"], false);
    EXPECT_EQ(created.body["next_fire"], "2024-05-01T13:00:00.000Z");

    add_group("second");
    auto list = call("GET", "/v1/replications");
    ASSERT_EQ(list.status, 200);
    ASSERT_EQ(list.body["replications"].size(), 2u);
    EXPECT_EQ(list.body["replications"][0]["name"], "global");
    auto by_name = call("GET", "/v1/replications/global");
    ASSERT_EQ(by_name.status, 200);
    EXPECT_EQ(by_name.body, call("GET", "/v1/replications/" + std::to_string(id)).body);

    auto patched = send("PATCH", "/v1/replications/global",
                        json{{"replicas", {"ap"}}, {"replicate_deletes", true}, {"schedule", ""}});
    ASSERT_EQ(patched.status, 200) << patched.raw;
    EXPECT_EQ(patched.body["replicas"], json::array({"ap"}));
    EXPECT_EQ(patched.body["replicate_deletes"], true);
    EXPECT_EQ(patched.body["schedule"], "");
    EXPECT_TRUE(patched.body["next_fire"].is_null());
    EXPECT_EQ(patched.body["primary"], "eu");

    // Field errors name the field.
    auto as_replica = send("PATCH", "/v1/replications/global", json{{"replicas", {"us", "eu"}}});
    EXPECT_EQ(as_replica.status, 400);
    EXPECT_NE(as_replica.field_error("replicas").find("is the primary"), std::string::npos) << as_replica.raw;
    auto dup = send("POST", "/v1/replications", json{{"name", "g3"}, {"primary", "eu"}, {"replicas", {"us", "us"}}});
    EXPECT_EQ(dup.status, 400);
    EXPECT_NE(dup.field_error("replicas").find("more than once"), std::string::npos) << dup.raw;
    auto unknown = send("POST", "/v1/replications", json{{"name", "g3"}, {"primary", "eu"}, {"replicas", {"nowhere"}}});
    EXPECT_EQ(unknown.status, 400);
    EXPECT_NE(unknown.field_error("replicas").find("no registry named 'nowhere'"), std::string::npos) << unknown.raw;
    auto no_primary = send("POST", "/v1/replications", json{{"name", "g3"}, {"primary", "gone"}, {"replicas", {"us"}}});
    EXPECT_TRUE(no_primary.has_field_error("primary")) << no_primary.raw;
    auto extra = send("POST", "/v1/replications", json{{"name", "g3"}, {"primary", "eu"}, {"replicas", {"us"}},
                                                       {"overwrite", false}});
    EXPECT_TRUE(extra.has_field_error("overwrite")) << extra.raw;
    EXPECT_EQ(send("POST", "/v1/replications", group_body("global")).status, 409);
    EXPECT_EQ(call("GET", "/v1/replications/nope").status, 404);
    EXPECT_EQ(call("PUT", "/v1/replications/global").status, 405);
    EXPECT_EQ(call("DELETE", "/v1/replications").status, 405);

    EXPECT_EQ(call("DELETE", "/v1/replications/second").status, 204);
    EXPECT_EQ(call("GET", "/v1/replications/second").status, 404);
    EXPECT_EQ(call("GET", "/v1/replications").body["replications"].size(), 1u);
}

TEST_F(ApiTest, RegistryInUseByGroup) {
    add_group_registries();
    add_group("global");
    auto r = call("DELETE", "/v1/registries/ap");
    EXPECT_EQ(r.status, 409) << r.raw;
    EXPECT_NE(r.body["message"].get<std::string>().find("replication group 'global'"), std::string::npos) << r.raw;
    EXPECT_EQ(call("DELETE", "/v1/replications/global").status, 204);
    EXPECT_EQ(call("DELETE", "/v1/registries/ap").status, 204);
}

TEST_F(ApiTest, ReplicationTriggerEnableDisableAndTasks) {
    add_group_registries();
    const int64_t g = add_group("global");
    add_group("other");

    auto trig = call("POST", "/v1/replications/global/trigger");
    ASSERT_EQ(trig.status, 202) << trig.raw;
    const int64_t t1 = trig.body["id"].get<int64_t>();
    EXPECT_EQ(trig.header("Location"), "/v1/tasks/" + std::to_string(t1));
    EXPECT_EQ(trig.body["status"], "Queued");
    EXPECT_EQ(trig.body["trigger"], "manual");
    EXPECT_TRUE(trig.body["rule_id"].is_null());
    EXPECT_EQ(trig.body["group_id"], g);
    EXPECT_EQ(trig.body["group_name"], "global");
    EXPECT_EQ(trig.body["scope"], json::array());
    EXPECT_EQ(queued_, std::vector<int64_t>{t1});
    const int64_t t2 = call("POST", "/v1/replications/" + std::to_string(g) + "/trigger").body["id"].get<int64_t>();
    const int64_t t3 = call("POST", "/v1/replications/other/trigger").body["id"].get<int64_t>();
    add_registries();
    add_rule("alpha");
    const int64_t t4 = trigger("alpha");

    EXPECT_EQ(task_ids(call("GET", "/v1/tasks?group=global")), (std::vector<int64_t>{t2, t1}));
    EXPECT_EQ(task_ids(call("GET", "/v1/tasks?group=" + std::to_string(g))), (std::vector<int64_t>{t2, t1}));
    EXPECT_EQ(task_ids(call("GET", "/v1/tasks?group=other")), (std::vector<int64_t>{t3}));
    EXPECT_EQ(task_ids(call("GET", "/v1/tasks?rule=alpha")), (std::vector<int64_t>{t4}));
    EXPECT_TRUE(task_ids(call("GET", "/v1/tasks?rule=alpha&group=global")).empty());
    EXPECT_EQ(call("GET", "/v1/tasks?group=nope").status, 404);

    // Disabled: not triggered; enable/disable answer with the group.
    auto off = call("POST", "/v1/replications/global/disable");
    ASSERT_EQ(off.status, 200) << off.raw;
    EXPECT_EQ(off.body["enabled"], false);
    EXPECT_EQ(call("POST", "/v1/replications/global/disable").body["enabled"], false);  // idempotent
    auto refused = call("POST", "/v1/replications/global/trigger");
    EXPECT_EQ(refused.status, 409) << refused.raw;
    EXPECT_NE(refused.body["message"].get<std::string>().find("disabled"), std::string::npos);
    auto on = call("POST", "/v1/replications/global/enable");
    ASSERT_EQ(on.status, 200);
    EXPECT_EQ(on.body["enabled"], true);
    EXPECT_EQ(call("POST", "/v1/replications/global/trigger").status, 202);
    EXPECT_EQ(call("GET", "/v1/replications/global/trigger").status, 405);
    EXPECT_EQ(call("POST", "/v1/replications/nope/trigger").status, 404);
    EXPECT_EQ(queued_.size(), 5u);

    // Deleting the group: its Queued tasks stop, the running one is reported to the daemon.
    ASSERT_TRUE(store_->start_task(t1).ok());
    cancel_requested_.clear();
    EXPECT_EQ(call("DELETE", "/v1/replications/global").status, 204);
    EXPECT_EQ(cancel_requested_, std::vector<int64_t>{t1});
    auto stopped = call("GET", "/v1/tasks/" + std::to_string(t2));
    EXPECT_EQ(stopped.body["status"], "Stopped");
    EXPECT_TRUE(stopped.body["group_id"].is_null());
    EXPECT_EQ(stopped.body["group_name"], "global");
    EXPECT_EQ(call("GET", "/v1/tasks/" + std::to_string(t3)).body["status"], "Queued");
}

TEST_F(ApiTest, ReplicationStatusHook) {
    add_group_registries();
    add_group("global");
    auto none = call("GET", "/v1/replications/global/status");
    EXPECT_EQ(none.status, 501) << none.raw;
    EXPECT_TRUE(none.body["message"].is_string());

    std::vector<std::string> asked;
    options_.group_status = [&](const engine::ReplicationGroup& g) {
        asked.push_back(g.name);
        return json{{"group", g.name}, {"replicas", {{{"registry", g.replicas[0]}, {"lag_s", 3}}}}};
    };
    remake_api();
    auto r = call("GET", "/v1/replications/global/status");
    ASSERT_EQ(r.status, 200) << r.raw;
    EXPECT_EQ(r.body["group"], "global");
    EXPECT_EQ(r.body["replicas"][0]["registry"], "us");
    EXPECT_EQ(asked, std::vector<std::string>{"global"});
    EXPECT_EQ(call("GET", "/v1/replications/nope/status").status, 404);
    EXPECT_EQ(asked.size(), 1u);  // not asked about unknown groups
    EXPECT_EQ(call("POST", "/v1/replications/global/status").status, 405);

    std::vector<std::string> logged;
    options_.group_status = [](const engine::ReplicationGroup&) -> json { throw std::runtime_error("daemon gone"); };
    options_.log = [&](std::string_view m) { logged.emplace_back(m); };
    remake_api();
    auto broken = call("GET", "/v1/replications/global/status");
    EXPECT_EQ(broken.status, 500);
    EXPECT_EQ(broken.raw.find("daemon gone"), std::string::npos);
    ASSERT_EQ(logged.size(), 1u);
    EXPECT_NE(logged[0].find("daemon gone"), std::string::npos);
}

TEST_F(ApiTest, DaemonRoutesAreNotServedHere) {
    add_group_registries();
    add_group("global");
    EXPECT_EQ(call("GET", "/v1/replications/global/where").status, 404);
    EXPECT_EQ(call("POST", "/v1/webhooks/eu").status, 404);
    EXPECT_EQ(call("POST", "/v1/webhooks").status, 404);
}

}  // namespace
