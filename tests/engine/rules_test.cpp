#include "engine/rules.h"

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

namespace {

using engine::Checked;
using engine::FieldErrors;
using engine::Rule;
using engine::Schedule;
using engine::Time;
using nlohmann::json;
namespace chr = std::chrono;

Time at(const char* rfc3339) {
    auto t = engine::parse_time(rfc3339);
    EXPECT_TRUE(t.has_value()) << rfc3339;
    return t.value_or(Time{});
}

// The error for `field`, or "" if there is none.
std::string error_for(const FieldErrors& errors, const std::string& field) {
    for (const auto& e : errors)
        if (e.field == field) return e.message.empty() ? "(empty message)" : e.message;
    return "";
}

::testing::AssertionResult has_error(const FieldErrors& errors, const std::string& field, const std::string& needle) {
    const std::string msg = error_for(errors, field);
    if (msg.empty()) return ::testing::AssertionFailure() << "no error for '" << field << "': " << describe(errors);
    if (msg.find(needle) == std::string::npos)
        return ::testing::AssertionFailure() << "error for '" << field << "' is '" << msg << "', lacks '" << needle
                                             << "'";
    return ::testing::AssertionSuccess();
}

Rule valid_rule() {
    Rule r;
    r.name = "nightly-base";
    r.source_registry = "hub";
    r.source_namespace = "library";
    r.target_registry = "mirror";
    return r;
}

// ---------------------------------------------------------------------------------------------
// Names

TEST(RuleName, Accepts) {
    for (const char* n : {"a", "0", "nightly-base", "a.b_c-d", "9lives", "x-", "a..b"}) {
        EXPECT_EQ(engine::check_name(n), "") << n;
    }
    EXPECT_EQ(engine::check_name(std::string(63, 'a')), "");
}

TEST(RuleName, RejectsWithFieldAndReason) {
    struct Case {
        std::string name;
        const char* needle;
    };
    const Case cases[] = {
        {"", "must not be empty"},
        {"Nightly", "must start with a lowercase letter or a digit"},
        {"-a", "must start with a lowercase letter or a digit"},
        {".a", "must start with a lowercase letter or a digit"},
        {"_a", "must start with a lowercase letter or a digit"},
        {"aB", "has 'B' at position 2"},
        {"a b", "has ' ' at position 2"},
        {"a/b", "has '/' at position 2"},
        {"a\nb", "has '\\x0a' at position 2"},
        {"caf\xc3\xa9", "at position 4"},
        {std::string(64, 'a'), "at most 63 characters, not 64"},
    };
    for (const auto& c : cases) {
        Rule r = valid_rule();
        r.name = c.name;
        const auto checked = engine::check(r);
        EXPECT_TRUE(has_error(checked.errors, "name", c.needle)) << "name " << c.name;
        EXPECT_EQ(checked.errors.size(), 1u) << describe(checked.errors);
    }
}

// ---------------------------------------------------------------------------------------------
// Filters

TEST(RuleFilters, AcceptsValidRegexes) {
    Rule r = valid_rule();
    r.repo_filter = "(nginx|redis)(-.*)?";
    r.tag_filter = R"(v?\d+\.\d+(\.\d+)?)";
    EXPECT_TRUE(engine::check(r).ok()) << describe(engine::check(r).errors);
}

TEST(RuleFilters, RejectsInvalidRegexWithPositionAndRe2Message) {
    struct Case {
        const char* field;
        const char* pattern;
        const char* position;
        const char* re2_says;
    };
    const Case cases[] = {
        {"repo_filter", "a(b", "at position 4 (end of pattern)", "missing ): a(b"},
        {"tag_filter", "v[z-a]", "at position 3", "invalid character class range: z-a"},
        {"tag_filter", "x**", "at position 2", "bad repetition operator: **"},
        {"repo_filter", "abc)", "at position 4", "unexpected ): abc)"},
        {"tag_filter", "a{2,1}", "at position 2", "invalid repetition size: {2,1}"},
        {"tag_filter", "ab\\", "at position 3", "trailing \\"},
        {"repo_filter", "x\\k", "at position 2", "invalid escape sequence: \\k"},
        {"tag_filter", "[abc", "at position 5 (end of pattern)", "missing ]"},
    };
    for (const auto& c : cases) {
        Rule r = valid_rule();
        (std::string_view(c.field) == "repo_filter" ? r.repo_filter : r.tag_filter) = c.pattern;
        const auto checked = engine::check(r);
        EXPECT_TRUE(has_error(checked.errors, c.field, "invalid regular expression")) << c.pattern;
        EXPECT_TRUE(has_error(checked.errors, c.field, c.position)) << c.pattern;
        EXPECT_TRUE(has_error(checked.errors, c.field, c.re2_says)) << c.pattern;
    }
}

TEST(RuleFilters, RejectsOverlongFilter) {
    Rule r = valid_rule();
    r.tag_filter = std::string(engine::kMaxFilterLength + 1, 'a');
    EXPECT_TRUE(has_error(engine::check(r).errors, "tag_filter", "at most 1024 characters"));
}

// ---------------------------------------------------------------------------------------------
// Other rule fields

TEST(RuleFields, RequiredFieldsNamed) {
    Rule r;
    const auto checked = engine::check(r);
    EXPECT_TRUE(has_error(checked.errors, "name", "must not be empty"));
    EXPECT_TRUE(has_error(checked.errors, "source_registry", "must not be empty"));
    EXPECT_TRUE(has_error(checked.errors, "source_namespace", "must not be empty"));
    EXPECT_TRUE(has_error(checked.errors, "target_registry", "must not be empty"));
    EXPECT_EQ(checked.errors.size(), 4u) << describe(checked.errors);
}

TEST(RuleFields, Namespaces) {
    Rule r = valid_rule();
    r.source_namespace = "Team/Sub";
    EXPECT_TRUE(has_error(engine::check(r).errors, "source_namespace", "is not a repository path"));
    r.source_namespace = "team/sub";
    r.target_namespace = "mirror//x";
    EXPECT_TRUE(has_error(engine::check(r).errors, "target_namespace", "is not a repository path"));
    r.target_namespace = "mirror/team-sub";
    EXPECT_TRUE(engine::check(r).ok());
}

TEST(RuleFields, TargetMustDifferFromSource) {
    Rule r = valid_rule();
    r.target_registry = r.source_registry;
    EXPECT_TRUE(has_error(engine::check(r).errors, "target_namespace", "the target is the source itself"));
    r.target_namespace = r.source_namespace;
    EXPECT_TRUE(has_error(engine::check(r).errors, "target_namespace", "the target is the source itself"));
    r.target_namespace = "library-copy";
    EXPECT_TRUE(engine::check(r).ok());
    EXPECT_EQ(r.effective_target_namespace(), "library-copy");
    r.target_namespace.clear();
    EXPECT_EQ(r.effective_target_namespace(), "library");
}

TEST(RuleFields, DescriptionLimits) {
    Rule r = valid_rule();
    r.description = "line one\nline two\twith a tab";
    EXPECT_TRUE(engine::check(r).ok());
    r.description = std::string(1025, 'x');
    EXPECT_TRUE(has_error(engine::check(r).errors, "description", "at most 1024"));
    r.description = std::string("bell\a");
    EXPECT_TRUE(has_error(engine::check(r).errors, "description", "control characters"));
}

TEST(RuleFields, TargetCredentialsNeverQuoted) {
    const std::string secret = "s3cr3t-p4ss\n";
    Rule r = valid_rule();
    r.target_credentials = engine::Credentials{"robot:x", secret, {}};
    const auto checked = engine::check(r);
    EXPECT_TRUE(has_error(checked.errors, "target_username", "must not contain ':'"));
    EXPECT_TRUE(has_error(checked.errors, "target_password", "control characters"));
    EXPECT_EQ(describe(checked.errors).find("s3cr3t"), std::string::npos);
    EXPECT_EQ(describe(checked.errors).find("robot"), std::string::npos);

    r.target_credentials = engine::Credentials{"robot", "", {}};
    EXPECT_TRUE(has_error(engine::check(r).errors, "target_password", "required when target_username is set"));
    r.target_credentials = engine::Credentials{"", "a-token-alone", {}};
    EXPECT_TRUE(engine::check(r).ok());
}

TEST(RuleFields, ReportsEveryErrorAtOnce) {
    Rule r = valid_rule();
    r.name = "Bad Name";
    r.tag_filter = "(";
    r.schedule = "5s";
    const auto checked = engine::check(r);
    EXPECT_EQ(checked.errors.size(), 3u) << describe(checked.errors);
    EXPECT_NE(error_for(checked.errors, "name"), "");
    EXPECT_NE(error_for(checked.errors, "tag_filter"), "");
    EXPECT_NE(error_for(checked.errors, "schedule"), "");
    EXPECT_NE(describe(checked.errors).find("name: "), std::string::npos);
    const json j = engine::to_json(checked.errors);
    ASSERT_EQ(j["errors"].size(), 3u);
    EXPECT_EQ(j["errors"][0]["field"], "name");
}

// ---------------------------------------------------------------------------------------------
// Schedules: parsing

TEST(ScheduleParse, Accepts) {
    struct Case {
        const char* text;
        Schedule::Kind kind;
    };
    const Case cases[] = {
        {"", Schedule::Kind::none},
        {"10s", Schedule::Kind::interval},
        {"30s", Schedule::Kind::interval},
        {"30m", Schedule::Kind::interval},
        {"2h", Schedule::Kind::interval},
        {"1d", Schedule::Kind::interval},
        {"365d", Schedule::Kind::interval},
        {"*/5 * * * *", Schedule::Kind::cron},
        {"0 0 * * 0", Schedule::Kind::cron},
        {"0 9-17/2 * * mon-fri", Schedule::Kind::cron},
        {"0 0 1,15 * *", Schedule::Kind::cron},
        {"0 0 29 2 *", Schedule::Kind::cron},
        {"15 3 * JAN-Mar,dec SUN", Schedule::Kind::cron},
        {"  0   0  *  *  7  ", Schedule::Kind::cron},
        {"5/20 * * * *", Schedule::Kind::cron},
        {"@daily", Schedule::Kind::cron},
        {"@hourly", Schedule::Kind::cron},
        {"@annually", Schedule::Kind::cron},
    };
    for (const auto& c : cases) {
        const auto s = Schedule::parse(c.text);
        EXPECT_TRUE(s.ok()) << c.text << ": " << describe(s.errors);
        EXPECT_EQ(s.value.kind(), c.kind) << c.text;
        EXPECT_EQ(s.value.text(), c.text);
    }
    EXPECT_EQ(Schedule::parse("2h").value.interval(), chr::hours{2});
}

TEST(ScheduleParse, RejectsWithReason) {
    struct Case {
        const char* text;
        const char* needle;
    };
    const Case cases[] = {
        {"9s", "shorter than the minimum, 10s"},
        {"0s", "shorter than the minimum"},
        {"366d", "longer than the maximum"},
        {"5", "neither an interval"},
        {"1w", "neither an interval"},
        {"-5m", "neither an interval"},
        {"every 5m", "has 2"},
        {"* * * *", "5 fields"},
        {"* * * * * *", "5 fields"},
        {"60 * * * *", "minute field '60': 60 is out of range 0-59"},
        {"* 24 * * *", "hour field '24': 24 is out of range 0-23"},
        {"* * 0 * *", "day-of-month field '0': 0 is out of range 1-31"},
        {"* * 32 * *", "day-of-month field '32'"},
        {"* * * 13 *", "month field '13': 13 is out of range 1-12"},
        {"* * * * 8", "day-of-week field '8': 8 is out of range 0-7"},
        {"*/0 * * * *", "step 0 is out of range"},
        {"*/60 * * * *", "step 60 is out of range 1-59"},
        {"5-1 * * * *", "range '5-1' runs backwards"},
        {"1,,2 * * * *", "empty list element"},
        {"a * * * *", "'a' is not a number"},
        {"* * * foo *", "'foo' is not a number or a name"},
        {"* * * * mon-", "'' is not a number"},
        {"0 0 30 2 *", "never fires"},
        {"0 0 31 4,6,9,11 *", "never fires"},
        {"@reboot", "not a known macro"},
        {"*/5\x01 * * * *", "control characters"},
    };
    for (const auto& c : cases) {
        const auto s = Schedule::parse(c.text);
        EXPECT_TRUE(has_error(s.errors, "schedule", c.needle)) << c.text;
        EXPECT_TRUE(s.value.empty()) << c.text;
    }
    // Through the rule check, the field is named.
    Rule r = valid_rule();
    r.schedule = "61 * * * *";
    EXPECT_TRUE(has_error(engine::check(r).errors, "schedule", "out of range 0-59"));
}

// ---------------------------------------------------------------------------------------------
// Schedules: next fire time

struct NextCase {
    const char* expr;
    const char* after;
    const char* next;
};

void expect_next(const NextCase& c) {
    const auto s = Schedule::parse(c.expr);
    ASSERT_TRUE(s.ok()) << c.expr << ": " << describe(s.errors);
    const auto next = s.value.next_after(at(c.after));
    ASSERT_TRUE(next.has_value()) << c.expr << " after " << c.after;
    EXPECT_EQ(engine::format_time(*next), engine::format_time(at(c.next))) << c.expr << " after " << c.after;
}

TEST(ScheduleNext, Steps) {
    expect_next({"*/15 * * * *", "2024-01-01T00:07:30Z", "2024-01-01T00:15:00Z"});
    expect_next({"*/15 * * * *", "2024-01-01T00:45:00Z", "2024-01-01T01:00:00Z"});  // strictly after
    expect_next({"*/15 * * * *", "2024-01-01T23:59:00Z", "2024-01-02T00:00:00Z"});
    expect_next({"5/20 * * * *", "2024-01-01T00:30:00Z", "2024-01-01T00:45:00Z"});
    expect_next({"5/20 * * * *", "2024-01-01T00:45:00Z", "2024-01-01T01:05:00Z"});
    expect_next({"0 */6 * * *", "2024-01-01T13:00:00Z", "2024-01-01T18:00:00Z"});
}

TEST(ScheduleNext, RangesAndLists) {
    // Working hours every two hours, Monday to Friday: Friday evening -> Monday 09:00.
    expect_next({"0 9-17/2 * * 1-5", "2024-03-01T17:30:00Z", "2024-03-04T09:00:00Z"});
    expect_next({"0 9-17/2 * * mon-fri", "2024-03-04T09:00:00Z", "2024-03-04T11:00:00Z"});
    expect_next({"30 2 1,15 * *", "2024-01-15T03:00:00Z", "2024-02-01T02:30:00Z"});
    expect_next({"30 2 1,15 * *", "2024-01-01T00:00:00Z", "2024-01-01T02:30:00Z"});
    expect_next({"0,30 8,20 * * *", "2024-01-01T08:31:00Z", "2024-01-01T20:00:00Z"});
}

TEST(ScheduleNext, MonthEdges) {
    expect_next({"0 0 1 * *", "2024-12-31T23:59:59.999Z", "2025-01-01T00:00:00Z"});
    expect_next({"59 23 31 12 *", "2024-12-31T23:59:00Z", "2025-12-31T23:59:00Z"});
    expect_next({"0 0 31 * *", "2024-04-01T00:00:00Z", "2024-05-31T00:00:00Z"});  // April has 30 days
    expect_next({"0 0 29 2 *", "2024-03-01T00:00:00Z", "2028-02-29T00:00:00Z"});  // leap years only
    expect_next({"0 0 29 2 *", "2099-03-01T00:00:00Z", "2104-02-29T00:00:00Z"});  // 2100 is not a leap year
    expect_next({"0 0 * feb-mar *", "2024-03-31T12:00:00Z", "2025-02-01T00:00:00Z"});
    expect_next({"@monthly", "2024-02-15T00:00:00Z", "2024-03-01T00:00:00Z"});
    expect_next({"@yearly", "2024-02-15T00:00:00Z", "2025-01-01T00:00:00Z"});
}

TEST(ScheduleNext, DayOfWeekEdges) {
    // 2024-01-07 and 2024-01-14 are Sundays; 0 and 7 both mean Sunday.
    expect_next({"0 12 * * 0", "2024-01-08T00:00:00Z", "2024-01-14T12:00:00Z"});
    expect_next({"0 12 * * 7", "2024-01-08T00:00:00Z", "2024-01-14T12:00:00Z"});
    expect_next({"0 12 * * sun", "2024-01-08T00:00:00Z", "2024-01-14T12:00:00Z"});
    expect_next({"0 0 * * 6-7", "2024-01-08T00:00:00Z", "2024-01-13T00:00:00Z"});  // Saturday
    expect_next({"0 0 * * 6-7", "2024-01-13T00:00:00Z", "2024-01-14T00:00:00Z"});  // then Sunday
    expect_next({"@weekly", "2024-01-10T00:00:00Z", "2024-01-14T00:00:00Z"});
    // Day of week with a star day of month: both must match (January Sundays only).
    expect_next({"0 12 * jan,jul sun", "2024-01-29T00:00:00Z", "2024-07-07T12:00:00Z"});
}

TEST(ScheduleNext, DayOfMonthOrDayOfWeek) {
    // Both restricted: the 13th or any Friday (Vixie cron). October 2024: Fridays 4, 11, 18; 13 is a Sunday.
    expect_next({"0 0 13 * 5", "2024-10-05T00:00:00Z", "2024-10-11T00:00:00Z"});
    expect_next({"0 0 13 * 5", "2024-10-11T00:00:00Z", "2024-10-13T00:00:00Z"});
    expect_next({"0 0 13 * 5", "2024-10-13T00:00:00Z", "2024-10-18T00:00:00Z"});
    // A day of month starting with '*' counts as a star: both must match (odd days that are Mondays).
    expect_next({"0 0 */2 * 1", "2024-01-01T00:00:00Z", "2024-01-15T00:00:00Z"});
}

TEST(ScheduleNext, IntervalsAndNone) {
    const auto s = Schedule::parse("30m");
    ASSERT_TRUE(s.ok());
    EXPECT_EQ(s.value.next_after(at("2024-01-01T00:00:10.500Z")), at("2024-01-01T00:30:10.500Z"));
    EXPECT_FALSE(Schedule::parse("").value.next_after(at("2024-01-01T00:00:00Z")).has_value());
}

// ---------------------------------------------------------------------------------------------
// Registries and links

engine::Registry valid_registry() {
    engine::Registry r;
    r.name = "hub";
    r.url = "https://registry.example.com";
    return r;
}

TEST(RegistryCheck, NormalisesUrl) {
    auto r = valid_registry();
    r.url = "HTTPS://Registry.Example.COM:5000/";
    const auto checked = engine::check(r);
    ASSERT_TRUE(checked.ok()) << describe(checked.errors);
    EXPECT_EQ(checked.value.url, "https://registry.example.com:5000");
    r.url = "http://[::1]:5000";
    EXPECT_TRUE(engine::check(r).ok());
    r.url = "http://127.0.0.1:5000";
    EXPECT_TRUE(engine::check(r).ok());
}

TEST(RegistryCheck, RejectsBadUrls) {
    struct Case {
        const char* url;
        const char* needle;
    };
    const Case cases[] = {
        {"", "must not be empty"},
        {"registry.example.com", "must be scheme://host[:port]"},
        {"ftp://registry.example.com", "scheme must be http or https"},
        {"https://registry.example.com/v2/", "without a path"},
        {"https://registry.example.com?x=1", "without a path, query"},
        {"https://registry.example.com:99999", "not in 1..65535"},
        {"https://bad_host", "not a valid host name"},
        {"https://", "bad host or port"},
    };
    for (const auto& c : cases) {
        auto r = valid_registry();
        r.url = c.url;
        EXPECT_TRUE(has_error(engine::check(r).errors, "url", c.needle)) << c.url;
    }
}

TEST(RegistryCheck, UrlWithCredentialsRejectedWithoutEchoingThem) {
    auto r = valid_registry();
    r.url = "https://admin:hunter2@registry.example.com";
    const auto checked = engine::check(r);
    EXPECT_TRUE(has_error(checked.errors, "url", "must not contain credentials"));
    EXPECT_EQ(describe(checked.errors).find("hunter2"), std::string::npos);
}

TEST(RegistryCheck, OtherFields) {
    auto r = valid_registry();
    r.region = "EU West";
    EXPECT_TRUE(has_error(engine::check(r).errors, "region", "must start with a lowercase"));
    r = valid_registry();
    r.ca_file = "certs/ca.pem";
    EXPECT_TRUE(has_error(engine::check(r).errors, "ca_file", "absolute path"));
    r.ca_file = "/etc/ssl/ca.pem";
    EXPECT_TRUE(engine::check(r).ok());
    r.insecure = true;
    EXPECT_TRUE(has_error(engine::check(r).errors, "ca_file", "conflicts with insecure"));
    r = valid_registry();
    r.url = "http://localhost:5000";
    r.insecure = true;
    EXPECT_TRUE(has_error(engine::check(r).errors, "insecure", "https URLs only"));
    r = valid_registry();
    r.credentials = engine::Credentials{"admin", "", {}};
    EXPECT_TRUE(has_error(engine::check(r).errors, "password", "required when username is set"));
}

TEST(LinkCheck, Fields) {
    engine::Link l{"eu-west", "us-east", 0, 0};
    EXPECT_TRUE(has_error(engine::check(l).errors, "rate_bytes_per_s", "greater than 0"));
    l = {"", "US", 100, 0};
    const auto checked = engine::check(l);
    EXPECT_TRUE(has_error(checked.errors, "source_region", "must not be empty"));
    EXPECT_TRUE(has_error(checked.errors, "target_region", "must start with a lowercase"));
    EXPECT_TRUE(engine::check(engine::Link{"eu", "eu", 1, 0}).ok());
}

// ---------------------------------------------------------------------------------------------
// JSON

TEST(RuleJson, DefaultsFromMinimalBody) {
    const auto r = engine::rule_from_json(json::parse(R"({"name": "r1", "source_registry": "hub",
        "source_namespace": "library", "target_registry": "mirror"})"));
    ASSERT_TRUE(r.ok()) << describe(r.errors);
    EXPECT_FALSE(r.value.overwrite);
    EXPECT_TRUE(r.value.enabled);
    EXPECT_EQ(r.value.type, engine::TypeFilter::all);
    EXPECT_EQ(r.value.target_namespace, "");
    EXPECT_FALSE(r.value.target_credentials.has_value());
}

TEST(RuleJson, TypeErrorsUnknownFieldsAndBody) {
    const auto r = engine::rule_from_json(json::parse(R"({"name": 5, "source_registry": "hub",
        "source_namespace": "library", "target_registry": "mirror", "overwrite": "yes", "type": "chart",
        "tag_filer": "v1", "enabled": 1})"));
    EXPECT_TRUE(has_error(r.errors, "name", "must be a string, not an integer"));
    EXPECT_TRUE(has_error(r.errors, "overwrite", "must be true or false, not a string"));
    EXPECT_TRUE(has_error(r.errors, "type", "'chart' is not one of image, helm, all"));
    EXPECT_TRUE(has_error(r.errors, "tag_filer", "unknown field"));
    EXPECT_TRUE(has_error(r.errors, "enabled", "must be true or false"));
    EXPECT_EQ(r.errors.size(), 5u) << describe(r.errors);  // no second "name: must not be empty"

    const auto arr = engine::rule_from_json(json::array());
    EXPECT_TRUE(has_error(arr.errors, "", "must be a JSON object, not an array"));
}

TEST(RuleJson, ReadOnlyFieldsOfAGetAreIgnored) {
    Rule r = valid_rule();
    r.id = 7;
    r.has_target_credentials = true;
    r.next_fire = at("2024-01-01T00:00:00Z");
    const auto back = engine::rule_from_json(engine::to_json(r));
    ASSERT_TRUE(back.ok()) << describe(back.errors);
    EXPECT_EQ(back.value.name, r.name);
    EXPECT_EQ(back.value.id, 0);
    EXPECT_FALSE(back.value.target_credentials.has_value());
}

TEST(RuleJson, CredentialsComeInPairs) {
    const json base = {{"name", "r1"},
                       {"source_registry", "hub"},
                       {"source_namespace", "library"},
                       {"target_registry", "mirror"}};
    json only_password = base;
    only_password["target_password"] = "tok";
    EXPECT_TRUE(has_error(engine::rule_from_json(only_password).errors, "target_username",
                          "must be given together with target_password"));
    json both = base;
    both["target_username"] = "";
    both["target_password"] = "tok";
    const auto r = engine::rule_from_json(both);
    ASSERT_TRUE(r.ok()) << describe(r.errors);
    ASSERT_TRUE(r.value.target_credentials.has_value());
    EXPECT_EQ(r.value.target_credentials->password, "tok");
}

TEST(RuleJson, PatchChangesOnlyGivenFieldsAndRechecks) {
    Rule current = valid_rule();
    current.id = 3;
    current.description = "keep me";
    current.tag_filter = "v.*";
    current.schedule = "1h";
    current.has_target_credentials = true;

    auto p = engine::patch_rule(current, json{{"enabled", false}, {"tag_filter", "latest"}});
    ASSERT_TRUE(p.ok()) << describe(p.errors);
    EXPECT_EQ(p.value.id, 3);
    EXPECT_FALSE(p.value.enabled);
    EXPECT_EQ(p.value.tag_filter, "latest");
    EXPECT_EQ(p.value.description, "keep me");
    EXPECT_EQ(p.value.schedule, "1h");
    EXPECT_FALSE(p.value.target_credentials.has_value());  // unchanged credentials stay as stored

    p = engine::patch_rule(current, json{{"schedule", nullptr}, {"description", nullptr}});
    ASSERT_TRUE(p.ok());
    EXPECT_EQ(p.value.schedule, "");
    EXPECT_EQ(p.value.description, "");

    p = engine::patch_rule(current, json{{"schedule", "2s"}});
    EXPECT_TRUE(has_error(p.errors, "schedule", "shorter than the minimum"));

    // A patch that makes the whole rule inconsistent is refused, though each field is fine.
    p = engine::patch_rule(current, json{{"target_registry", "hub"}});
    EXPECT_TRUE(has_error(p.errors, "target_namespace", "the target is the source itself"));

    p = engine::patch_rule(current, json{{"target_username", "bot"}, {"target_password", "pw"}});
    ASSERT_TRUE(p.ok());
    EXPECT_EQ(p.value.target_credentials->username, "bot");
}

TEST(RegistryJson, FromJsonAndPatch) {
    const auto r = engine::registry_from_json(json{{"name", "hub"},
                                                   {"url", "https://Hub.Example.com/"},
                                                   {"region", "eu"},
                                                   {"username", "admin"},
                                                   {"password", "pw"}});
    ASSERT_TRUE(r.ok()) << describe(r.errors);
    EXPECT_EQ(r.value.url, "https://hub.example.com");
    ASSERT_TRUE(r.value.credentials.has_value());

    engine::Registry stored = r.value;
    stored.credentials.reset();
    stored.has_credentials = true;
    auto p = engine::patch_registry(stored, json{{"region", "us"}});
    ASSERT_TRUE(p.ok());
    EXPECT_EQ(p.value.region, "us");
    EXPECT_EQ(p.value.name, "hub");
    EXPECT_FALSE(p.value.credentials.has_value());

    p = engine::patch_registry(stored, json{{"password", "rotated"}});
    EXPECT_TRUE(has_error(p.errors, "username", "must be given together with password"));
    EXPECT_EQ(describe(p.errors).find("rotated"), std::string::npos);

    p = engine::patch_registry(stored, json{{"username", nullptr}, {"password", nullptr}});
    ASSERT_TRUE(p.ok());
    ASSERT_TRUE(p.value.credentials.has_value());
    EXPECT_TRUE(p.value.credentials->empty());  // removal

    EXPECT_TRUE(has_error(engine::registry_from_json(json{{"name", "x"}, {"url", "https://x"}, {"token", "t"}}).errors,
                          "token", "unknown field"));
}

TEST(LinkJson, FromJson) {
    auto l = engine::link_from_json(json{{"source_region", "eu"}, {"target_region", "us"},
                                         {"rate_bytes_per_s", 125000000}, {"burst_bytes", 1 << 20}});
    ASSERT_TRUE(l.ok()) << describe(l.errors);
    EXPECT_EQ(l.value.rate_bytes_per_s, 125000000u);
    EXPECT_EQ(engine::to_json(l.value)["burst_bytes"], 1 << 20);
    l = engine::link_from_json(json{{"source_region", "eu"}, {"target_region", "us"}, {"rate_bytes_per_s", -1}});
    EXPECT_TRUE(has_error(l.errors, "rate_bytes_per_s", "must not be negative"));
    l = engine::link_from_json(json{{"source_region", "eu"}, {"target_region", "us"}, {"rate_bytes_per_s", 1.5}});
    EXPECT_TRUE(has_error(l.errors, "rate_bytes_per_s", "non-negative integer"));
}

TEST(Json, ToJsonNeverWritesCredentials) {
    const std::string secret = "TOPSECRET-9f8e7d";
    const std::string user = "robot-user-42";
    engine::Registry reg = valid_registry();
    reg.credentials = engine::Credentials{user, secret, {}};
    reg.has_credentials = true;
    Rule rule = valid_rule();
    rule.target_credentials = engine::Credentials{user, secret, {}};
    rule.has_target_credentials = true;
    for (const json& j : {engine::to_json(reg), engine::to_json(rule)}) {
        const std::string text = j.dump();
        EXPECT_EQ(text.find(secret), std::string::npos) << text;
        EXPECT_EQ(text.find(user), std::string::npos) << text;
        EXPECT_FALSE(j.contains("password"));
        EXPECT_FALSE(j.contains("username"));
        EXPECT_FALSE(j.contains("target_password"));
    }
    EXPECT_EQ(engine::to_json(reg)["has_credentials"], true);
    EXPECT_EQ(engine::to_json(rule)["has_target_credentials"], true);
}

// ---------------------------------------------------------------------------------------------
// Tasks, enums, times

TEST(TaskRecord, RatioDurationAndJson) {
    engine::TaskRecord t;
    t.id = 9;
    t.rule_id = 2;
    t.rule_name = "r";
    t.created = at("2024-01-01T00:00:00Z");
    EXPECT_DOUBLE_EQ(t.success_ratio(), 1.0);
    EXPECT_FALSE(t.duration(t.created).has_value());
    t.status = engine::TaskStatus::failed;
    EXPECT_DOUBLE_EQ(t.success_ratio(), 0.0);
    t.counters = {3, 6, 2, 2, 4096};
    EXPECT_DOUBLE_EQ(t.success_ratio(), 0.8);
    t.started = at("2024-01-01T00:00:01Z");
    EXPECT_EQ(t.duration(at("2024-01-01T00:00:03.5Z")), chr::milliseconds{2500});
    t.finished = at("2024-01-01T00:00:02Z");
    EXPECT_EQ(t.duration(at("2024-01-01T01:00:00Z")), chr::milliseconds{1000});

    const json j = engine::to_json(t, at("2024-01-01T01:00:00Z"));
    EXPECT_EQ(j["status"], "Failed");
    EXPECT_EQ(j["trigger"], "manual");
    EXPECT_EQ(j["duration_ms"], 1000);
    EXPECT_EQ(j["started"], "2024-01-01T00:00:01.000Z");
    EXPECT_DOUBLE_EQ(j["success_ratio"].get<double>(), 0.8);
    EXPECT_EQ(j["bytes"], 4096);
    t.rule_id.reset();
    EXPECT_TRUE(engine::to_json(t, t.created)["rule_id"].is_null());
}

TEST(Enums, RoundTrip) {
    using engine::ItemAction;
    using engine::TaskStatus;
    for (auto s : {TaskStatus::queued, TaskStatus::in_progress, TaskStatus::succeeded, TaskStatus::partially_failed,
                   TaskStatus::failed, TaskStatus::stopped})
        EXPECT_EQ(engine::parse_task_status(engine::to_string(s)), s);
    EXPECT_EQ(engine::parse_task_status("inprogress"), TaskStatus::in_progress);
    EXPECT_EQ(engine::to_string(ItemAction::skipped_exists), "skipped: exists");
    EXPECT_EQ(engine::to_string(ItemAction::skipped_same_digest), "skipped: same digest");
    EXPECT_EQ(engine::parse_item_action("skipped: same digest"), ItemAction::skipped_same_digest);
    EXPECT_FALSE(engine::parse_item_action("skipped").has_value());
    EXPECT_EQ(engine::parse_trigger("event"), engine::Trigger::event);
    EXPECT_TRUE(engine::is_terminal(TaskStatus::stopped));
    EXPECT_FALSE(engine::is_terminal(TaskStatus::queued));
}

TEST(Time, FormatAndParse) {
    const Time t = at("2024-02-29T23:59:58.123Z");
    EXPECT_EQ(engine::format_time(t), "2024-02-29T23:59:58.123Z");
    EXPECT_EQ(engine::parse_time("2024-03-01T01:59:58.123+02:00"), t);
    EXPECT_EQ(engine::parse_time("2024-02-29T18:59:58.123456-05:00"), t);
    EXPECT_EQ(engine::parse_time("2024-02-29 23:59:58.1z"), t - chr::milliseconds{23});
    EXPECT_EQ(engine::format_time(Time{}), "1970-01-01T00:00:00.000Z");
    for (const char* bad : {"", "2024-02-30T00:00:00Z", "2024-01-01T24:00:00Z", "2024-01-01T00:00:00",
                            "2024-01-01T00:00:00+0200", "2024-01-01T00:00:00.Z", "yesterday"})
        EXPECT_FALSE(engine::parse_time(bad).has_value()) << bad;
}

// ---------------------------------------------------------------------------------------------
// Webhook secrets (write-only)

// prefix + i without operator+ on a literal (gcc 12 -O3 reports a false -Wrestrict, GCC bug 105329).
std::string numbered(const char* prefix, size_t i) {
    std::string s(prefix);
    s.append(std::to_string(i));
    return s;
}

TEST(RegistryWebhookSecret, JsonInIsWriteOnlyAndNeverOut) {
    const std::string secret = "WEBHOOK-s3cret-zz9";
    auto r = engine::registry_from_json(json{{"name", "hub"}, {"url", "https://hub.example.com"},
                                             {"webhook_secret", secret}});
    ASSERT_TRUE(r.ok()) << describe(r.errors);
    ASSERT_TRUE(r.value.webhook_secret.has_value());
    EXPECT_EQ(*r.value.webhook_secret, secret);
    r.value.has_webhook_secret = true;
    const json out = engine::to_json(r.value);
    EXPECT_EQ(out.dump().find(secret), std::string::npos) << out.dump();
    EXPECT_FALSE(out.contains("webhook_secret"));
    EXPECT_EQ(out["has_webhook_secret"], true);

    // Without the field: nullopt (keep what is stored), also in a patch of a stored registry.
    const auto plain = engine::registry_from_json(json{{"name", "hub"}, {"url", "https://hub.example.com"}});
    ASSERT_TRUE(plain.ok());
    EXPECT_FALSE(plain.value.webhook_secret.has_value());
    engine::Registry stored = r.value;
    stored.webhook_secret.reset();
    auto p = engine::patch_registry(r.value, json{{"region", "eu"}});
    ASSERT_TRUE(p.ok()) << describe(p.errors);
    EXPECT_FALSE(p.value.webhook_secret.has_value());  // the patch did not name it: unchanged

    // "" and null remove it; the output field of a GET is ignored on input.
    for (const json& removal : {json(""), json(nullptr)}) {
        p = engine::patch_registry(stored, json{{"webhook_secret", removal}});
        ASSERT_TRUE(p.ok()) << describe(p.errors);
        ASSERT_TRUE(p.value.webhook_secret.has_value());
        EXPECT_EQ(*p.value.webhook_secret, "");
    }
    p = engine::patch_registry(stored, engine::to_json(r.value));
    ASSERT_TRUE(p.ok()) << describe(p.errors);
    EXPECT_FALSE(p.value.webhook_secret.has_value());
}

TEST(RegistryWebhookSecret, ChecksNeverQuoteIt) {
    auto r = valid_registry();
    const std::string too_long = "LONGSECRET" + std::string(engine::kMaxSecretLength, 'x');
    r.webhook_secret = too_long;
    auto checked = engine::check(r);
    EXPECT_TRUE(has_error(checked.errors, "webhook_secret", "at most 16384 characters"));
    EXPECT_EQ(describe(checked.errors).find("LONGSECRET"), std::string::npos);
    r.webhook_secret = "CTRL-secret\nnext";
    checked = engine::check(r);
    EXPECT_TRUE(has_error(checked.errors, "webhook_secret", "control characters"));
    EXPECT_EQ(describe(checked.errors).find("CTRL-secret"), std::string::npos);
    r.webhook_secret = std::string(engine::kMaxSecretLength, 'y');
    EXPECT_TRUE(engine::check(r).ok());
    const auto typed = engine::registry_from_json(json{{"name", "hub"}, {"url", "https://hub.example.com"},
                                                       {"webhook_secret", 42}});
    EXPECT_TRUE(has_error(typed.errors, "webhook_secret", "must be a string"));
}

// ---------------------------------------------------------------------------------------------
// Rules: sync on push and notifications

TEST(RuleNotify, AcceptsAndNormalisesUrls) {
    Rule r = valid_rule();
    r.notify_urls = {"https://Hooks.Example.com/services/T0/B1/XyZ?x=1", "http://10.0.0.5:8080", "HTTP://[::1]:9/p"};
    const auto checked = engine::check(r);
    ASSERT_TRUE(checked.ok()) << describe(checked.errors);
    EXPECT_EQ(checked.value.notify_urls[0], "https://hooks.example.com/services/T0/B1/XyZ?x=1");  // path case kept
    EXPECT_EQ(checked.value.notify_urls[1], "http://10.0.0.5:8080");
    EXPECT_EQ(checked.value.notify_urls[2], "http://[::1]:9/p");
}

TEST(RuleNotify, RejectsBadUrlsWithoutQuotingThem) {
    struct Case {
        std::string url;
        const char* needle;
    };
    const Case cases[] = {
        {"", "must not be empty"},
        {"/hooks/TOKEN123", "absolute URL"},
        {"hooks.example.com/TOKEN123", "absolute URL"},
        {"ftp://hooks.example.com/TOKEN123", "scheme must be http or https"},
        {"https://user:TOKEN123@hooks.example.com/x", "must not contain credentials"},
        {"https:///TOKEN123", "has no host"},
        {"https://hooks.example.com:99999/TOKEN123", "bad host or port"},
        {"https://hooks.example.com/a b/TOKEN123", "whitespace"},
        {"https://hooks.example.com/TOKEN123#frag", "fragment"},
        {"https://hooks.example.com/" + std::string(engine::kMaxUrlLength, 'a') + "TOKEN123", "at most 2048"},
    };
    for (const auto& c : cases) {
        Rule r = valid_rule();
        r.notify_urls = {"https://ok.example.com/hook", c.url};
        const auto checked = engine::check(r);
        EXPECT_TRUE(has_error(checked.errors, "notify_urls", c.needle)) << c.url;
        EXPECT_TRUE(has_error(checked.errors, "notify_urls", "URL 2")) << c.url;
        EXPECT_EQ(describe(checked.errors).find("TOKEN123"), std::string::npos) << describe(checked.errors);
    }
}

TEST(RuleNotify, CountAndDuplicates) {
    Rule r = valid_rule();
    for (size_t i = 0; i < engine::kMaxNotifyUrls; ++i) r.notify_urls.push_back(numbered("https://h.example.com/", i));
    EXPECT_TRUE(engine::check(r).ok());
    r.notify_urls.push_back("https://h.example.com/extra");
    EXPECT_TRUE(has_error(engine::check(r).errors, "notify_urls", "at most 10 URLs, not 11"));

    r.notify_urls = {"https://h.example.com/x", "HTTPS://H.EXAMPLE.COM/x"};  // the same after normalising
    EXPECT_TRUE(has_error(engine::check(r).errors, "notify_urls", "URL 2 repeats URL 1"));
    r.notify_urls = {"https://h.example.com/x", "https://h.example.com/X"};  // paths are case-sensitive
    EXPECT_TRUE(engine::check(r).ok());
}

TEST(RuleNotify, JsonInOutAndPatch) {
    auto r = engine::rule_from_json(json{{"name", "r1"},
                                         {"source_registry", "hub"},
                                         {"source_namespace", "library"},
                                         {"target_registry", "mirror"},
                                         {"sync_on_push", true},
                                         {"notify_urls", {"https://h.example.com/a"}},
                                         {"notify_on", "failure"}});
    ASSERT_TRUE(r.ok()) << describe(r.errors);
    EXPECT_TRUE(r.value.sync_on_push);
    EXPECT_EQ(r.value.notify_urls, std::vector<std::string>{"https://h.example.com/a"});
    EXPECT_EQ(r.value.notify_on, engine::NotifyOn::failure);

    const json out = engine::to_json(r.value);
    EXPECT_EQ(out["sync_on_push"], true);
    EXPECT_EQ(out["notify_urls"], json::array({"https://h.example.com/a"}));
    EXPECT_EQ(out["notify_on"], "failure");
    const auto back = engine::rule_from_json(out);
    ASSERT_TRUE(back.ok()) << describe(back.errors);
    EXPECT_EQ(back.value.notify_urls, r.value.notify_urls);
    EXPECT_EQ(back.value.notify_on, engine::NotifyOn::failure);
    EXPECT_TRUE(back.value.sync_on_push);

    // Defaults.
    const json defaults = engine::to_json(valid_rule());
    EXPECT_EQ(defaults["sync_on_push"], false);
    EXPECT_EQ(defaults["notify_urls"], json::array());
    EXPECT_EQ(defaults["notify_on"], "always");

    // Patch: only what is given; null resets.
    auto p = engine::patch_rule(r.value, json{{"notify_on", "success"}});
    ASSERT_TRUE(p.ok());
    EXPECT_EQ(p.value.notify_on, engine::NotifyOn::success);
    EXPECT_EQ(p.value.notify_urls.size(), 1u);
    EXPECT_TRUE(p.value.sync_on_push);
    p = engine::patch_rule(r.value, json{{"notify_urls", nullptr}, {"notify_on", nullptr}, {"sync_on_push", nullptr}});
    ASSERT_TRUE(p.ok());
    EXPECT_TRUE(p.value.notify_urls.empty());
    EXPECT_EQ(p.value.notify_on, engine::NotifyOn::always);
    EXPECT_FALSE(p.value.sync_on_push);

    // Type errors, each reported once.
    p = engine::patch_rule(r.value, json{{"notify_urls", "https://h.example.com/a"}});
    EXPECT_TRUE(has_error(p.errors, "notify_urls", "must be an array of strings, not a string"));
    EXPECT_EQ(p.errors.size(), 1u) << describe(p.errors);
    p = engine::patch_rule(r.value, json{{"notify_urls", {"https://h.example.com/a", 5}}});
    EXPECT_TRUE(has_error(p.errors, "notify_urls", "element 2 must be a string, not an integer"));
    p = engine::patch_rule(r.value, json{{"notify_on", "sometimes"}});
    EXPECT_TRUE(has_error(p.errors, "notify_on", "'sometimes' is not one of always, failure, success"));
    p = engine::patch_rule(r.value, json{{"sync_on_push", "yes"}});
    EXPECT_TRUE(has_error(p.errors, "sync_on_push", "must be true or false"));
    p = engine::patch_rule(r.value, json{{"notify_urls", {"gopher://h.example.com"}}});
    EXPECT_TRUE(has_error(p.errors, "notify_urls", "scheme must be http or https"));
}

TEST(RuleNotify, NotifyOnRoundTrip) {
    for (auto n : {engine::NotifyOn::always, engine::NotifyOn::failure, engine::NotifyOn::success})
        EXPECT_EQ(engine::parse_notify_on(engine::to_string(n)), n);
    EXPECT_EQ(engine::to_string(engine::NotifyOn::failure), "failure");
    EXPECT_FALSE(engine::parse_notify_on("Always").has_value());
    EXPECT_FALSE(engine::parse_notify_on("").has_value());
}

// ---------------------------------------------------------------------------------------------
// Replication groups

engine::ReplicationGroup valid_group() {
    engine::ReplicationGroup g;
    g.name = "global";
    g.primary = "eu-hub";
    g.replicas = {"us-mirror", "ap-mirror"};
    return g;
}

TEST(GroupCheck, AcceptsValid) {
    auto g = valid_group();
    EXPECT_TRUE(engine::check(g).ok()) << describe(engine::check(g).errors);
    g.schedule = "";  // events only
    EXPECT_TRUE(engine::check(g).ok());
    g.schedule = "0 */6 * * *";
    EXPECT_TRUE(engine::check(g).ok());
    g.replicas.clear();
    for (size_t i = 0; i < engine::kMaxReplicas; ++i) g.replicas.push_back(numbered("r", i));
    EXPECT_TRUE(engine::check(g).ok());
}

TEST(GroupCheck, RejectsWithFieldsNamed) {
    auto g = valid_group();
    g.name = "Global";
    g.primary = "";
    g.schedule = "5s";
    auto checked = engine::check(g);
    EXPECT_TRUE(has_error(checked.errors, "name", "must start with a lowercase"));
    EXPECT_TRUE(has_error(checked.errors, "primary", "must not be empty"));
    EXPECT_TRUE(has_error(checked.errors, "schedule", "shorter than the minimum"));

    g = valid_group();
    g.replicas.clear();
    EXPECT_TRUE(has_error(engine::check(g).errors, "replicas", "at least one"));
    for (size_t i = 0; i <= engine::kMaxReplicas; ++i) g.replicas.push_back(numbered("r", i));
    EXPECT_TRUE(has_error(engine::check(g).errors, "replicas", "at most 16 registries, not 17"));

    g = valid_group();
    g.replicas = {"us-mirror", "ap-mirror", "us-mirror"};
    EXPECT_TRUE(has_error(engine::check(g).errors, "replicas", "'us-mirror' is named more than once"));
    g.replicas = {"us-mirror", "eu-hub"};
    EXPECT_TRUE(has_error(engine::check(g).errors, "replicas", "'eu-hub' is the primary"));
    g.replicas = {"us-mirror", "Bad Name"};
    EXPECT_TRUE(has_error(engine::check(g).errors, "replicas", "replica 2:"));
}

TEST(GroupJson, FromJsonDefaultsAndErrors) {
    auto g = engine::group_from_json(json{{"name", "global"}, {"primary", "eu-hub"}, {"replicas", {"us-mirror"}}});
    ASSERT_TRUE(g.ok()) << describe(g.errors);
    EXPECT_EQ(g.value.schedule, "1h");
    EXPECT_TRUE(g.value.enabled);
    EXPECT_FALSE(g.value.replicate_deletes);
    EXPECT_EQ(g.value.replicas, std::vector<std::string>{"us-mirror"});

    g = engine::group_from_json(json{{"name", "global"},
                                     {"primary", "eu-hub"},
                                     {"replicas", "us-mirror"},
                                     {"replicate_deletes", 1},
                                     {"regions", {"eu"}}});
    EXPECT_TRUE(has_error(g.errors, "replicas", "must be an array of strings, not a string"));
    EXPECT_TRUE(has_error(g.errors, "replicate_deletes", "must be true or false"));
    EXPECT_TRUE(has_error(g.errors, "regions", "unknown field"));
    EXPECT_EQ(g.errors.size(), 3u) << describe(g.errors);  // no second "replicas: at least one"
    EXPECT_TRUE(has_error(engine::group_from_json(json::array()).errors, "", "must be a JSON object"));
}

TEST(GroupJson, ToJsonRoundTripAndPatch) {
    auto g = valid_group();
    g.id = 4;
    g.primary_id = 1;
    g.replica_ids = {2, 3};
    g.replicate_deletes = true;
    g.next_fire = at("2024-01-01T01:00:00Z");
    g.created = at("2024-01-01T00:00:00Z");
    g.updated = g.created;
    const json out = engine::to_json(g);
    EXPECT_EQ(out["id"], 4);
    EXPECT_EQ(out["name"], "global");
    EXPECT_EQ(out["primary"], "eu-hub");
    EXPECT_EQ(out["replicas"], json::array({"us-mirror", "ap-mirror"}));
    EXPECT_EQ(out["replicate_deletes"], true);
    EXPECT_EQ(out["enabled"], true);
    EXPECT_EQ(out["schedule"], "1h");
    EXPECT_EQ(out["next_fire"], "2024-01-01T01:00:00.000Z");
    EXPECT_EQ(out["created"], "2024-01-01T00:00:00.000Z");

    // A GET's body is accepted back (read-only fields ignored).
    const auto back = engine::group_from_json(out);
    ASSERT_TRUE(back.ok()) << describe(back.errors);
    EXPECT_EQ(back.value.id, 0);
    EXPECT_EQ(back.value.replicas, g.replicas);
    EXPECT_TRUE(back.value.replicate_deletes);

    auto p = engine::patch_group(g, json{{"replicas", {"sa-mirror"}}, {"enabled", false}});
    ASSERT_TRUE(p.ok()) << describe(p.errors);
    EXPECT_EQ(p.value.id, 4);
    EXPECT_EQ(p.value.replicas, std::vector<std::string>{"sa-mirror"});
    EXPECT_FALSE(p.value.enabled);
    EXPECT_EQ(p.value.primary, "eu-hub");
    p = engine::patch_group(g, json{{"schedule", ""}});
    ASSERT_TRUE(p.ok());
    EXPECT_EQ(p.value.schedule, "");
    p = engine::patch_group(p.value, json{{"schedule", nullptr}});  // null: back to the default
    ASSERT_TRUE(p.ok());
    EXPECT_EQ(p.value.schedule, "1h");
    p = engine::patch_group(g, json{{"primary", "us-mirror"}});  // now a replica too
    EXPECT_TRUE(has_error(p.errors, "replicas", "'us-mirror' is the primary"));
}

// ---------------------------------------------------------------------------------------------
// Task scope, items, deliveries and events as JSON

TEST(TaskRecord, GroupFieldsAndScopeJson) {
    engine::TaskRecord t;
    t.id = 3;
    t.created = at("2024-01-01T00:00:00Z");
    json j = engine::to_json(t, t.created);
    EXPECT_TRUE(j["group_id"].is_null());
    EXPECT_EQ(j["group_name"], "");
    EXPECT_EQ(j["scope"], json::array());  // a full scan

    t.group_id = 8;
    t.group_name = "global";
    t.scope = {{"team/app", "v1", "sha256:aa", false}, {"team/app", "", "sha256:bb", true}};
    j = engine::to_json(t, t.created);
    EXPECT_EQ(j["group_id"], 8);
    EXPECT_EQ(j["group_name"], "global");
    EXPECT_TRUE(j["rule_id"].is_null());
    ASSERT_EQ(j["scope"].size(), 2u);
    EXPECT_EQ(j["scope"][0], (json{{"repository", "team/app"}, {"tag", "v1"}, {"digest", "sha256:aa"}, {"remove", false}}));
    EXPECT_EQ(j["scope"][1]["remove"], true);
    EXPECT_EQ(j["scope"][1]["tag"], "");

    engine::TaskItem item;
    item.target = "us-mirror";
    item.repository = "team/app";
    EXPECT_EQ(engine::to_json(item)["target"], "us-mirror");
}

TEST(DeliveryAndEventJson, Shapes) {
    engine::Delivery d;
    d.id = 5;
    d.task_id = 9;
    d.url = "https://h.example.com/hook";
    d.attempts = 2;
    d.last_status = 503;
    d.last_error = "HTTP 503";
    d.created = at("2024-01-01T00:00:00Z");
    json j = engine::to_json(d);
    EXPECT_EQ(j["id"], 5);
    EXPECT_EQ(j["task_id"], 9);
    EXPECT_EQ(j["url"], "https://h.example.com/hook");
    EXPECT_EQ(j["status"], "pending");
    EXPECT_EQ(j["attempts"], 2);
    EXPECT_EQ(j["last_status"], 503);
    EXPECT_EQ(j["last_error"], "HTTP 503");
    EXPECT_EQ(j["created"], "2024-01-01T00:00:00.000Z");
    EXPECT_TRUE(j["finished"].is_null());
    d.status = "delivered";
    d.finished = at("2024-01-01T00:00:05Z");
    EXPECT_EQ(engine::to_json(d)["finished"], "2024-01-01T00:00:05.000Z");

    engine::StoredEvent e;
    e.id = 11;
    e.registry_id = 2;
    e.registry_name = "eu-hub";
    e.event_id = "ev-1";
    e.repository = "team/app";
    e.tag = "v1";
    e.digest = "sha256:aa";
    e.received = at("2024-01-01T00:00:01Z");
    e.task_ids = {4, 6};
    j = engine::to_json(e);
    EXPECT_EQ(j["id"], 11);
    EXPECT_EQ(j["registry_id"], 2);
    EXPECT_EQ(j["registry"], "eu-hub");
    EXPECT_EQ(j["event_id"], "ev-1");
    EXPECT_EQ(j["action"], "push");
    EXPECT_EQ(j["repository"], "team/app");
    EXPECT_EQ(j["tag"], "v1");
    EXPECT_EQ(j["digest"], "sha256:aa");
    EXPECT_EQ(j["received"], "2024-01-01T00:00:01.000Z");
    EXPECT_EQ(j["processed"], false);
    EXPECT_EQ(j["task_ids"], json::array({4, 6}));
    e.remove = true;
    EXPECT_EQ(engine::to_json(e)["action"], "delete");
}

}  // namespace
