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

}  // namespace
