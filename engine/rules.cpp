#include "engine/rules.h"

#include <algorithm>
#include <array>
#include <bit>
#include <cstdio>

#include <nlohmann/json.hpp>
#include <re2/re2.h>

#include "engine/reference.h"

namespace engine {

using nlohmann::json;
namespace chr = std::chrono;

namespace {

bool is_digit(char c) noexcept { return c >= '0' && c <= '9'; }
bool is_lower_alnum(char c) noexcept { return (c >= 'a' && c <= 'z') || is_digit(c); }
char to_lower(char c) noexcept { return (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c; }

std::string lowercase(std::string_view s) {
    std::string out(s);
    for (char& c : out) c = to_lower(c);
    return out;
}

std::string quote(std::string_view s) { return quote_input(s); }

bool has_control(std::string_view s, bool allow_newlines) noexcept {
    return std::any_of(s.begin(), s.end(), [allow_newlines](char ch) {
        const auto c = static_cast<unsigned char>(ch);
        if (allow_newlines && (c == '\n' || c == '\t' || c == '\r')) return false;
        return c < 0x20 || c == 0x7f;
    });
}

// Parses a non-negative decimal without sign or leading '+'; at most 9 digits (no overflow).
std::optional<uint32_t> parse_small_uint(std::string_view s) noexcept {
    if (s.empty() || s.size() > 9 || !std::all_of(s.begin(), s.end(), is_digit)) return std::nullopt;
    uint32_t v = 0;
    for (char c : s) v = v * 10 + static_cast<uint32_t>(c - '0');
    return v;
}

std::string_view trim(std::string_view s) noexcept {
    while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
    while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
    return s;
}

}  // namespace

std::string quote_input(std::string_view s) {
    constexpr size_t kMaxQuoted = 80;
    std::string out = "'";
    for (size_t i = 0; i < s.size(); ++i) {
        if (i == kMaxQuoted) {
            out += "...";
            break;
        }
        const auto c = static_cast<unsigned char>(s[i]);
        if (c < 0x20 || c == 0x7f) {
            static constexpr char kHex[] = "0123456789abcdef";
            out += "\\x";
            out += kHex[c >> 4];
            out += kHex[c & 0xf];
        } else {
            out += static_cast<char>(c);
        }
    }
    return out + "'";
}

// ---------------------------------------------------------------------------------------------
// Time

Time now_ms() noexcept { return chr::floor<chr::milliseconds>(chr::system_clock::now()); }

std::string format_time(Time t) {
    const auto day = chr::floor<chr::days>(t);
    const chr::year_month_day ymd{day};
    const chr::hh_mm_ss hms{t - day};
    char buf[40];
    std::snprintf(buf, sizeof buf, "%04d-%02u-%02uT%02d:%02d:%02d.%03dZ", static_cast<int>(ymd.year()),
                  static_cast<unsigned>(ymd.month()), static_cast<unsigned>(ymd.day()),
                  static_cast<int>(hms.hours().count()), static_cast<int>(hms.minutes().count()),
                  static_cast<int>(hms.seconds().count()), static_cast<int>(hms.subseconds().count()));
    return buf;
}

std::optional<Time> parse_time(std::string_view s) {
    // YYYY-MM-DDTHH:MM:SS
    if (s.size() < 20) return std::nullopt;
    auto num = [&](size_t pos, size_t len) { return parse_small_uint(s.substr(pos, len)); };
    const auto y = num(0, 4), mo = num(5, 2), d = num(8, 2), h = num(11, 2), mi = num(14, 2), sec = num(17, 2);
    if (!y || !mo || !d || !h || !mi || !sec) return std::nullopt;
    if (s[4] != '-' || s[7] != '-' || !(s[10] == 'T' || s[10] == 't' || s[10] == ' ') || s[13] != ':' ||
        s[16] != ':')
        return std::nullopt;
    const chr::year_month_day ymd{chr::year{static_cast<int>(*y)}, chr::month{*mo}, chr::day{*d}};
    if (!ymd.ok() || *h > 23 || *mi > 59 || *sec > 59) return std::nullopt;
    Time t = Time{chr::sys_days{ymd}} + chr::hours{*h} + chr::minutes{*mi} + chr::seconds{*sec};

    size_t i = 19;
    if (i < s.size() && s[i] == '.') {
        ++i;
        const size_t start = i;
        int ms = 0;
        while (i < s.size() && is_digit(s[i])) {
            if (i - start < 3) ms = ms * 10 + (s[i] - '0');
            ++i;
        }
        if (i == start || i - start > 9) return std::nullopt;
        for (size_t k = i - start; k < 3; ++k) ms *= 10;
        t += chr::milliseconds{ms};
    }
    const std::string_view zone = s.substr(i);
    if (zone == "Z" || zone == "z") return t;
    if (zone.size() != 6 || (zone[0] != '+' && zone[0] != '-') || zone[3] != ':') return std::nullopt;
    const auto oh = parse_small_uint(zone.substr(1, 2)), om = parse_small_uint(zone.substr(4, 2));
    if (!oh || !om || *oh > 23 || *om > 59) return std::nullopt;
    const chr::minutes offset = chr::hours{*oh} + chr::minutes{*om};
    return zone[0] == '+' ? t - offset : t + offset;
}

// ---------------------------------------------------------------------------------------------
// Field errors

std::string describe(const FieldErrors& errors) {
    std::string out;
    for (const auto& e : errors) {
        if (!out.empty()) out += "; ";
        out += e.field.empty() ? e.message : e.field + ": " + e.message;
    }
    return out;
}

json to_json(const FieldErrors& errors) {
    json list = json::array();
    for (const auto& e : errors) list.push_back({{"field", e.field}, {"message", e.message}});
    return json{{"errors", std::move(list)}};
}

std::string check_name(std::string_view name) {
    if (name.empty()) return "must not be empty";
    if (name.size() > kMaxNameLength)
        return "must be at most " + std::to_string(kMaxNameLength) + " characters, not " + std::to_string(name.size());
    if (!is_lower_alnum(name.front()))
        return quote(name) + " must start with a lowercase letter or a digit";
    for (size_t i = 0; i < name.size(); ++i) {
        const char c = name[i];
        if (!(is_lower_alnum(c) || c == '-' || c == '.' || c == '_'))
            return quote(name) + " has " + quote(name.substr(i, 1)) + " at position " + std::to_string(i + 1) +
                   "; use lowercase letters, digits, '-', '.' and '_'";
    }
    return {};
}

// ---------------------------------------------------------------------------------------------
// Schedules
//
// The cron parser and evaluator are hand-written: Debian packages no C++ cron library (there are
// Go, Perl and Ruby ones), and the 5-field grammar is small enough to check exhaustively in tests.

namespace {

struct CronField {
    const char* name;
    unsigned min;
    unsigned max;
    const std::array<const char*, 12>* names;  // names[i] stands for min + i; null if none
};

constexpr std::array<const char*, 12> kMonthNames = {"jan", "feb", "mar", "apr", "may", "jun",
                                                     "jul", "aug", "sep", "oct", "nov", "dec"};
constexpr std::array<const char*, 12> kDayNames = {"sun", "mon", "tue", "wed", "thu", "fri", "sat",
                                                   nullptr, nullptr, nullptr, nullptr, nullptr};

constexpr CronField kCronFields[5] = {
    {"minute", 0, 59, nullptr},
    {"hour", 0, 23, nullptr},
    {"day-of-month", 1, 31, nullptr},
    {"month", 1, 12, &kMonthNames},
    {"day-of-week", 0, 7, &kDayNames},
};

// One value of a field: a number or (month, day of week) a three-letter name.
std::optional<unsigned> cron_value(const CronField& f, std::string_view s, std::string& why) {
    if (!s.empty() && is_digit(s.front())) {
        const auto v = parse_small_uint(s);
        if (!v) {
            why = quote(s) + " is not a number";
            return std::nullopt;
        }
        if (*v < f.min || *v > f.max) {
            why = std::to_string(*v) + " is out of range " + std::to_string(f.min) + "-" + std::to_string(f.max);
            return std::nullopt;
        }
        return *v;
    }
    if (f.names != nullptr) {
        const std::string lower = lowercase(s);
        for (unsigned i = 0; i < f.names->size(); ++i) {
            if ((*f.names)[i] != nullptr && lower == (*f.names)[i]) return f.min + i;
        }
        why = quote(s) + " is not a number or a name";
        return std::nullopt;
    }
    why = quote(s) + " is not a number";
    return std::nullopt;
}

// Parses one field into a bit set (bit v for value v). Sets `star` when the field starts with '*'.
std::optional<uint64_t> parse_cron_field(const CronField& f, std::string_view text, bool& star, std::string& why) {
    star = !text.empty() && text.front() == '*';
    uint64_t bits = 0;
    size_t start = 0;
    for (;;) {
        const size_t comma = text.find(',', start);
        const std::string_view item =
            text.substr(start, comma == std::string_view::npos ? std::string_view::npos : comma - start);
        std::string item_why;
        auto fail = [&](const std::string& what) {
            why = "cron " + std::string(f.name) + " field " + quote(text) + ": " + what;
            return std::nullopt;
        };
        if (item.empty()) return fail("empty list element");

        std::string_view base = item;
        unsigned step = 1;
        bool has_step = false;
        if (const size_t slash = item.find('/'); slash != std::string_view::npos) {
            base = item.substr(0, slash);
            const auto s = parse_small_uint(item.substr(slash + 1));
            if (!s) return fail("step " + quote(item.substr(slash + 1)) + " is not a number");
            if (*s == 0 || *s > f.max) return fail("step " + std::to_string(*s) + " is out of range 1-" +
                                                   std::to_string(f.max));
            step = *s;
            has_step = true;
        }
        unsigned lo = 0;
        unsigned hi = 0;
        if (base == "*") {
            lo = f.min;
            hi = f.max;
        } else if (const size_t dash = base.find('-'); dash != std::string_view::npos) {
            const auto a = cron_value(f, base.substr(0, dash), item_why);
            if (!a) return fail(item_why);
            const auto b = cron_value(f, base.substr(dash + 1), item_why);
            if (!b) return fail(item_why);
            if (*a > *b) return fail("range " + quote(base) + " runs backwards");
            lo = *a;
            hi = *b;
        } else {
            const auto a = cron_value(f, base, item_why);
            if (!a) return fail(item_why);
            lo = *a;
            hi = has_step ? f.max : *a;  // "a/n" = "a-max/n"
        }
        for (unsigned v = lo; v <= hi; v += step) bits |= uint64_t{1} << v;

        if (comma == std::string_view::npos) break;
        start = comma + 1;
    }
    return bits;
}

std::optional<std::string_view> cron_macro(std::string_view s) noexcept {
    if (s == "@yearly" || s == "@annually") return "0 0 1 1 *";
    if (s == "@monthly") return "0 0 1 * *";
    if (s == "@weekly") return "0 0 * * 0";
    if (s == "@daily" || s == "@midnight") return "0 0 * * *";
    if (s == "@hourly") return "0 * * * *";
    return std::nullopt;
}

// Looking further than this for a cron match means there is none (the calendar of days of week
// repeats every 28 years within a century).
constexpr chr::days kCronHorizon{366 * 30};

}  // namespace

Checked<Schedule> Schedule::parse(std::string_view text) {
    Checked<Schedule> out;
    out.value.text_ = std::string(text);
    auto fail = [&](std::string message) {
        out.errors.push_back({"schedule", std::move(message)});
        out.value.kind_ = Kind::none;
        return out;
    };
    if (text.empty()) return out;
    if (text.size() > kMaxScheduleLength)
        return fail("must be at most " + std::to_string(kMaxScheduleLength) + " characters");
    if (std::any_of(text.begin(), text.end(), [](char c) { return c != '\t' && has_control({&c, 1}, false); }))
        return fail(quote(text) + " contains control characters");

    std::string_view spec = trim(text);
    if (!spec.empty() && spec.front() == '@') {
        const auto expanded = cron_macro(spec);
        if (!expanded)
            return fail(quote(spec) + " is not a known macro (@yearly, @annually, @monthly, @weekly, @daily, "
                                      "@midnight, @hourly)");
        spec = *expanded;
    }

    if (spec.find_first_of(" \t") == std::string_view::npos) {
        // An interval: digits and one unit.
        const char unit = spec.empty() ? '\0' : spec.back();
        const auto n = parse_small_uint(spec.substr(0, spec.empty() ? 0 : spec.size() - 1));
        int64_t mult = 0;
        switch (unit) {
        case 's': mult = 1; break;
        case 'm': mult = 60; break;
        case 'h': mult = 3600; break;
        case 'd': mult = 86400; break;
        default: break;
        }
        if (!n || mult == 0)
            return fail(quote(text) + " is neither an interval (like 30s, 30m, 2h, 1d) nor a 5-field cron "
                                      "expression (minute hour day-of-month month day-of-week)");
        const chr::seconds interval{static_cast<int64_t>(*n) * mult};
        if (interval < chr::seconds{10}) return fail("interval " + quote(text) + " is shorter than the minimum, 10s");
        if (interval > chr::days{365}) return fail("interval " + quote(text) + " is longer than the maximum, 365d");
        out.value.kind_ = Kind::interval;
        out.value.interval_ = interval;
        return out;
    }

    std::vector<std::string_view> fields;
    size_t i = 0;
    while (i < spec.size()) {
        while (i < spec.size() && (spec[i] == ' ' || spec[i] == '\t')) ++i;
        const size_t start = i;
        while (i < spec.size() && spec[i] != ' ' && spec[i] != '\t') ++i;
        if (i > start) fields.push_back(spec.substr(start, i - start));
    }
    if (fields.size() != 5)
        return fail("a cron expression has 5 fields (minute hour day-of-month month day-of-week), " + quote(text) +
                    " has " + std::to_string(fields.size()));

    Cron c;
    std::array<uint64_t, 5> bits{};
    std::array<bool, 5> star{};
    for (size_t f = 0; f < 5; ++f) {
        std::string why;
        bool s = false;
        const auto b = parse_cron_field(kCronFields[f], fields[f], s, why);
        if (!b) return fail(why);
        bits[f] = *b;
        star[f] = s;
    }
    c.minutes = bits[0];
    c.hours = static_cast<uint32_t>(bits[1]);
    c.days_of_month = static_cast<uint32_t>(bits[2]);
    c.months = static_cast<uint16_t>(bits[3]);
    // Day of week 7 is Sunday, as 0.
    c.days_of_week = static_cast<uint8_t>((bits[4] & 0x7f) | ((bits[4] >> 7) & 1));
    c.dom_star = star[2];
    c.dow_star = star[4];

    // "0 0 30 2 *" parses but never fires: refuse it. Deterministic: search from a fixed date.
    const Time reference{chr::sys_days{chr::year{2000} / chr::January / 1}};
    if (!next_cron(c, reference))
        return fail(quote(text) + " never fires (no such day in the months given)");

    out.value.kind_ = Kind::cron;
    out.value.cron_ = c;
    return out;
}

bool Schedule::day_matches(const Cron& c, unsigned dom, unsigned dow) noexcept {
    const bool dom_ok = (c.days_of_month >> dom) & 1u;
    const bool dow_ok = (c.days_of_week >> dow) & 1u;
    // Vixie cron (do_command/cron.c): when either field starts with '*', both must match;
    // otherwise either one suffices.
    if (c.dom_star || c.dow_star) return dom_ok && dow_ok;
    return dom_ok || dow_ok;
}

std::optional<Time> Schedule::next_cron(const Cron& c, Time after) {
    chr::sys_time<chr::minutes> t = chr::floor<chr::minutes>(after) + chr::minutes{1};
    const auto limit = t + kCronHorizon;
    while (t < limit) {
        const chr::sys_days day = chr::floor<chr::days>(t);
        const chr::year_month_day ymd{day};
        const unsigned month = static_cast<unsigned>(ymd.month());
        if (((c.months >> month) & 1u) == 0) {
            const chr::year_month next = chr::year_month{ymd.year(), ymd.month()} + chr::months{1};
            t = chr::sys_days{next / chr::day{1}};
            continue;
        }
        if (!day_matches(c, static_cast<unsigned>(ymd.day()), chr::weekday{day}.c_encoding())) {
            t = day + chr::days{1};
            continue;
        }
        const auto minute_of_day = static_cast<unsigned>((t - day).count());
        const unsigned hour = minute_of_day / 60;
        const unsigned minute = minute_of_day % 60;
        if (((c.hours >> hour) & 1u) == 0) {
            t = day + chr::hours{hour + 1};
            continue;
        }
        const uint64_t later = c.minutes & (~uint64_t{0} << minute);
        if (later == 0) {
            t = day + chr::hours{hour + 1};
            continue;
        }
        return Time{day + chr::hours{hour} + chr::minutes{std::countr_zero(later)}};
    }
    return std::nullopt;
}

std::optional<Time> Schedule::next_after(Time after) const {
    switch (kind_) {
    case Kind::none: return std::nullopt;
    case Kind::interval: return after + chr::duration_cast<chr::milliseconds>(interval_);
    case Kind::cron: return next_cron(cron_, after);
    }
    return std::nullopt;
}

// ---------------------------------------------------------------------------------------------
// Field checks

namespace {

void check_required_name(FieldErrors& errs, const char* field, std::string_view value) {
    if (auto why = check_name(value); !why.empty()) errs.push_back({field, std::move(why)});
}

void check_region(FieldErrors& errs, const char* field, std::string_view region, bool required) {
    if (region.empty() && !required) return;
    if (auto why = check_name(region); !why.empty()) errs.push_back({field, std::move(why)});
}

void check_length(FieldErrors& errs, const char* field, std::string_view value, size_t max) {
    if (value.size() > max)
        errs.push_back({field, "must be at most " + std::to_string(max) + " characters, not " +
                                   std::to_string(value.size())});
}

// Never quotes the values: they are credentials.
void check_credentials(FieldErrors& errs, const Credentials& c, const char* user_field, const char* secret_field) {
    if (c.username.size() > kMaxUsernameLength)
        errs.push_back({user_field, "must be at most " + std::to_string(kMaxUsernameLength) + " characters"});
    else if (has_control(c.username, false) || c.username.find(':') != std::string::npos)
        errs.push_back({user_field, "must not contain ':' or control characters"});
    if (c.password.size() > kMaxSecretLength)
        errs.push_back({secret_field, "must be at most " + std::to_string(kMaxSecretLength) + " characters"});
    else if (has_control(c.password, false))
        errs.push_back({secret_field, "must not contain control characters"});
    if (!c.username.empty() && c.password.empty())
        errs.push_back({secret_field, std::string("is required when ") + user_field + " is set"});
}

// "" or what is wrong with the regular expression, with the 1-based position of the error.
std::string check_regex(std::string_view pattern) {
    if (pattern.empty()) return {};
    RE2::Options o;
    o.set_log_errors(false);
    const RE2 re(re2::StringPiece(pattern.data(), pattern.size()), o);
    if (re.ok()) return {};
    // RE2 reports the offending fragment (error_arg), not an offset; find it in the pattern.
    const std::string& arg = re.error_arg();
    std::optional<size_t> pos;
    switch (re.error_code()) {
    case RE2::ErrorMissingParen:  // arg is the whole unclosed group: the error is at the end
    case RE2::ErrorMissingBracket:
        pos = pattern.size() + 1;
        break;
    case RE2::ErrorTrailingBackslash: pos = pattern.size(); break;
    case RE2::ErrorUnexpectedParen:  // arg is the pattern up to and including the stray ')'
        if (!arg.empty() && pattern.substr(0, arg.size()) == arg) pos = arg.size();
        break;
    default:
        if (!arg.empty()) {
            if (const size_t p = pattern.find(arg); p != std::string_view::npos) pos = p + 1;
        }
        break;
    }
    std::string out = "invalid regular expression";
    if (pos) {
        out += " at position " + std::to_string(*pos);
        if (*pos > pattern.size()) out += " (end of pattern)";
    }
    return out + ": " + re.error();
}

void check_filter(FieldErrors& errs, const char* field, std::string_view pattern) {
    if (pattern.size() > kMaxFilterLength) {
        check_length(errs, field, pattern, kMaxFilterLength);
        return;
    }
    if (auto why = check_regex(pattern); !why.empty()) errs.push_back({field, std::move(why)});
}

void check_namespace(FieldErrors& errs, const char* field, std::string_view ns, bool required) {
    if (ns.empty()) {
        if (required) errs.push_back({field, "must not be empty"});
        return;
    }
    if (!is_valid_repo_name(ns))
        errs.push_back({field, quote(ns) +
                                   " is not a repository path: lowercase letters and digits, separated by '.', "
                                   "'_', '__' or '-' within a component and '/' between components"});
}

// Checks "scheme://host[:port][/]" and returns it normalised; errors never quote the whole URL,
// which might hold credentials.
std::string check_url(FieldErrors& errs, std::string_view url) {
    if (url.empty()) {
        errs.push_back({"url", "must not be empty"});
        return {};
    }
    if (url.size() > kMaxUrlLength) {
        check_length(errs, "url", url, kMaxUrlLength);
        return std::string(url);
    }
    const size_t sep = url.find("://");
    if (sep == std::string_view::npos) {
        errs.push_back({"url", "must be scheme://host[:port] with scheme http or https"});
        return std::string(url);
    }
    const std::string scheme = lowercase(url.substr(0, sep));
    std::string_view rest = url.substr(sep + 3);
    if (scheme != "http" && scheme != "https") {
        errs.push_back({"url", "scheme must be http or https"});
        return std::string(url);
    }
    if (rest.find('@') != std::string_view::npos) {
        errs.push_back({"url", "must not contain credentials (user:password@); set username and password instead"});
        return std::string(url);
    }
    if (!rest.empty() && rest.back() == '/') rest.remove_suffix(1);
    if (rest.find_first_of("/?#") != std::string_view::npos) {
        errs.push_back({"url", "must be scheme://host[:port], without a path, query or fragment"});
        return std::string(url);
    }
    auto ref = parse_registry_ref(rest);
    if (!ref.ok()) {
        errs.push_back({"url", "bad host or port: " + ref.error().message});
        return std::string(url);
    }
    return scheme + "://" + ref->host;
}

// Never quotes the value: it is a secret.
void check_webhook_secret(FieldErrors& errs, std::string_view secret) {
    if (secret.size() > kMaxSecretLength)
        errs.push_back({"webhook_secret", "must be at most " + std::to_string(kMaxSecretLength) + " characters"});
    else if (has_control(secret, false))
        errs.push_back({"webhook_secret", "must not contain control characters"});
    else if (!secret.empty() && (secret.front() == ' ' || secret.back() == ' '))
        errs.push_back({"webhook_secret", "must not start or end with a space (HTTP trims header values)"});
}

// One notification URL: "http(s)://host[:port][/path][?query]", returned with scheme and host
// lowercased; "" and a message in `why` if it is not one. Messages never quote the URL (a webhook
// URL often carries a token in its path or query); they may quote the host.
std::string check_notify_url(std::string_view url, std::string& why) {
    if (url.empty()) {
        why = "must not be empty";
        return {};
    }
    if (url.size() > kMaxUrlLength) {
        why = "must be at most " + std::to_string(kMaxUrlLength) + " characters, not " + std::to_string(url.size());
        return {};
    }
    if (std::any_of(url.begin(), url.end(), [](char ch) {
            const auto c = static_cast<unsigned char>(ch);
            return c <= 0x20 || c == 0x7f;
        })) {
        why = "must not contain whitespace or control characters";
        return {};
    }
    const size_t sep = url.find("://");
    if (sep == std::string_view::npos) {
        why = "must be an absolute URL, http://host[:port][/path] or https://...";
        return {};
    }
    const std::string scheme = lowercase(url.substr(0, sep));
    if (scheme != "http" && scheme != "https") {
        why = "scheme must be http or https";
        return {};
    }
    const std::string_view rest = url.substr(sep + 3);
    const size_t end = rest.find_first_of("/?#");
    const std::string_view authority = rest.substr(0, end);
    if (authority.find('@') != std::string_view::npos) {
        why = "must not contain credentials (user:password@)";
        return {};
    }
    if (authority.empty()) {
        why = "has no host";
        return {};
    }
    auto ref = parse_registry_ref(authority);
    if (!ref.ok()) {
        why = "bad host or port: " + ref.error().message;
        return {};
    }
    if (rest.find('#') != std::string_view::npos) {
        why = "must not have a fragment ('#...')";
        return {};
    }
    return scheme + "://" + ref->host + std::string(end == std::string_view::npos ? std::string_view() : rest.substr(end));
}

void check_notify_urls(FieldErrors& errs, std::vector<std::string>& urls) {
    if (urls.size() > kMaxNotifyUrls) {
        errs.push_back({"notify_urls", "at most " + std::to_string(kMaxNotifyUrls) + " URLs, not " +
                                           std::to_string(urls.size())});
        return;
    }
    for (size_t i = 0; i < urls.size(); ++i) {
        std::string why;
        std::string normal = check_notify_url(urls[i], why);
        if (!why.empty()) {
            errs.push_back({"notify_urls", "URL " + std::to_string(i + 1) + " " + why});
            continue;
        }
        urls[i] = std::move(normal);
        for (size_t j = 0; j < i; ++j) {
            if (urls[j] == urls[i]) {
                errs.push_back({"notify_urls", "URL " + std::to_string(i + 1) + " repeats URL " + std::to_string(j + 1)});
                break;
            }
        }
    }
}

}  // namespace

Checked<Registry> check(Registry r) {
    Checked<Registry> out;
    auto& errs = out.errors;
    check_required_name(errs, "name", r.name);
    r.url = check_url(errs, r.url);
    check_region(errs, "region", r.region, false);
    const bool https = r.url.rfind("https://", 0) == 0;
    if (!r.ca_file.empty()) {
        if (r.ca_file.size() > kMaxPathLength) check_length(errs, "ca_file", r.ca_file, kMaxPathLength);
        else if (r.ca_file.front() != '/' || has_control(r.ca_file, false))
            errs.push_back({"ca_file", "must be an absolute path"});
        else if (!https && r.url.rfind("http://", 0) == 0)
            errs.push_back({"ca_file", "applies to https URLs only"});
        else if (r.insecure)
            errs.push_back({"ca_file", "conflicts with insecure (which skips certificate verification)"});
    }
    if (r.insecure && !https && r.url.rfind("http://", 0) == 0)
        errs.push_back({"insecure", "applies to https URLs only (an http URL is already unencrypted)"});
    if (r.credentials) check_credentials(errs, *r.credentials, "username", "password");
    if (r.webhook_secret) check_webhook_secret(errs, *r.webhook_secret);
    out.value = std::move(r);
    return out;
}

Checked<Link> check(Link l) {
    Checked<Link> out;
    check_region(out.errors, "source_region", l.source_region, true);
    check_region(out.errors, "target_region", l.target_region, true);
    if (l.rate_bytes_per_s == 0) out.errors.push_back({"rate_bytes_per_s", "must be greater than 0"});
    out.value = std::move(l);
    return out;
}

Checked<Rule> check(Rule r) {
    Checked<Rule> out;
    auto& errs = out.errors;
    check_required_name(errs, "name", r.name);
    check_length(errs, "description", r.description, kMaxDescriptionLength);
    if (has_control(r.description, true)) errs.push_back({"description", "must not contain control characters"});
    check_required_name(errs, "source_registry", r.source_registry);
    check_namespace(errs, "source_namespace", r.source_namespace, true);
    check_filter(errs, "repo_filter", r.repo_filter);
    check_filter(errs, "tag_filter", r.tag_filter);
    check_required_name(errs, "target_registry", r.target_registry);
    check_namespace(errs, "target_namespace", r.target_namespace, false);
    if (!r.source_registry.empty() && r.source_registry == r.target_registry && !r.source_namespace.empty() &&
        r.effective_target_namespace() == r.source_namespace)
        errs.push_back({"target_namespace", "the target is the source itself (same registry and namespace)"});
    if (r.target_credentials) check_credentials(errs, *r.target_credentials, "target_username", "target_password");
    auto schedule = Schedule::parse(r.schedule);
    errs.insert(errs.end(), schedule.errors.begin(), schedule.errors.end());
    check_notify_urls(errs, r.notify_urls);
    out.value = std::move(r);
    return out;
}

Checked<ReplicationGroup> check(ReplicationGroup g) {
    Checked<ReplicationGroup> out;
    auto& errs = out.errors;
    check_required_name(errs, "name", g.name);
    check_required_name(errs, "primary", g.primary);
    if (g.replicas.empty()) {
        errs.push_back({"replicas", "must name at least one registry"});
    } else if (g.replicas.size() > kMaxReplicas) {
        errs.push_back({"replicas", "at most " + std::to_string(kMaxReplicas) + " registries, not " +
                                        std::to_string(g.replicas.size())});
    } else {
        for (size_t i = 0; i < g.replicas.size(); ++i) {
            const std::string& name = g.replicas[i];
            if (auto why = check_name(name); !why.empty()) {
                errs.push_back({"replicas", "replica " + std::to_string(i + 1) + ": " + why});
                continue;
            }
            if (name == g.primary) {
                errs.push_back({"replicas", quote(name) + " is the primary; a replica must be another registry"});
                continue;
            }
            for (size_t j = 0; j < i; ++j) {
                if (g.replicas[j] == name) {
                    errs.push_back({"replicas", quote(name) + " is named more than once"});
                    break;
                }
            }
        }
    }
    auto schedule = Schedule::parse(g.schedule);
    errs.insert(errs.end(), schedule.errors.begin(), schedule.errors.end());
    out.value = std::move(g);
    return out;
}

// ---------------------------------------------------------------------------------------------
// Enums

std::string_view to_string(TypeFilter t) noexcept {
    switch (t) {
    case TypeFilter::all: return "all";
    case TypeFilter::image: return "image";
    case TypeFilter::helm: return "helm";
    }
    return "all";
}

std::string_view to_string(Trigger t) noexcept {
    switch (t) {
    case Trigger::manual: return "manual";
    case Trigger::schedule: return "schedule";
    case Trigger::event: return "event";
    }
    return "manual";
}

std::string_view to_string(TaskStatus s) noexcept {
    switch (s) {
    case TaskStatus::queued: return "Queued";
    case TaskStatus::in_progress: return "InProgress";
    case TaskStatus::succeeded: return "Succeeded";
    case TaskStatus::partially_failed: return "PartiallyFailed";
    case TaskStatus::failed: return "Failed";
    case TaskStatus::stopped: return "Stopped";
    }
    return "Failed";
}

std::string_view to_string(ItemAction a) noexcept {
    switch (a) {
    case ItemAction::copied: return "copied";
    case ItemAction::skipped_exists: return "skipped: exists";
    case ItemAction::skipped_same_digest: return "skipped: same digest";
    case ItemAction::failed: return "failed";
    case ItemAction::deleted: return "deleted";
    }
    return "failed";
}

std::string_view to_string(NotifyOn n) noexcept {
    switch (n) {
    case NotifyOn::always: return "always";
    case NotifyOn::failure: return "failure";
    case NotifyOn::success: return "success";
    }
    return "always";
}

std::optional<NotifyOn> parse_notify_on(std::string_view s) noexcept {
    for (auto n : {NotifyOn::always, NotifyOn::failure, NotifyOn::success})
        if (s == to_string(n)) return n;
    return std::nullopt;
}

std::optional<TypeFilter> parse_type_filter(std::string_view s) noexcept {
    for (auto t : {TypeFilter::image, TypeFilter::helm, TypeFilter::all})
        if (s == to_string(t)) return t;
    return std::nullopt;
}

std::optional<Trigger> parse_trigger(std::string_view s) noexcept {
    for (auto t : {Trigger::manual, Trigger::schedule, Trigger::event})
        if (s == to_string(t)) return t;
    return std::nullopt;
}

std::optional<TaskStatus> parse_task_status(std::string_view s) noexcept {
    for (auto t : {TaskStatus::queued, TaskStatus::in_progress, TaskStatus::succeeded, TaskStatus::partially_failed,
                   TaskStatus::failed, TaskStatus::stopped}) {
        const std::string_view name = to_string(t);
        if (name.size() == s.size() &&
            std::equal(name.begin(), name.end(), s.begin(), [](char a, char b) { return to_lower(a) == to_lower(b); }))
            return t;
    }
    return std::nullopt;
}

std::optional<ItemAction> parse_item_action(std::string_view s) noexcept {
    for (auto a : {ItemAction::copied, ItemAction::skipped_exists, ItemAction::skipped_same_digest, ItemAction::failed,
                   ItemAction::deleted})
        if (s == to_string(a)) return a;
    return std::nullopt;
}

bool is_terminal(TaskStatus s) noexcept {
    return s != TaskStatus::queued && s != TaskStatus::in_progress;
}

double TaskRecord::success_ratio() const noexcept {
    const uint64_t ok = counters.copied + counters.skipped;
    const uint64_t total = ok + counters.failed;
    if (total == 0) return status == TaskStatus::failed ? 0.0 : 1.0;
    return static_cast<double>(ok) / static_cast<double>(total);
}

std::optional<chr::milliseconds> TaskRecord::duration(Time now) const noexcept {
    if (!started) return std::nullopt;
    const Time end = finished ? *finished : now;
    return end > *started ? end - *started : chr::milliseconds{0};
}

// ---------------------------------------------------------------------------------------------
// JSON out

namespace {

json time_or_null(const std::optional<Time>& t) { return t ? json(format_time(*t)) : json(nullptr); }

}  // namespace

json to_json(const Registry& r) {
    return json{{"id", r.id},
                {"name", r.name},
                {"url", r.url},
                {"region", r.region},
                {"insecure", r.insecure},
                {"ca_file", r.ca_file},
                {"has_credentials", r.has_credentials},
                {"has_webhook_secret", r.has_webhook_secret},
                {"created", format_time(r.created)},
                {"updated", format_time(r.updated)}};
}

json to_json(const Link& l) {
    return json{{"source_region", l.source_region},
                {"target_region", l.target_region},
                {"rate_bytes_per_s", l.rate_bytes_per_s},
                {"burst_bytes", l.burst_bytes}};
}

json to_json(const Rule& r) {
    return json{{"id", r.id},
                {"name", r.name},
                {"description", r.description},
                {"source_registry", r.source_registry},
                {"source_namespace", r.source_namespace},
                {"repo_filter", r.repo_filter},
                {"tag_filter", r.tag_filter},
                {"type", to_string(r.type)},
                {"target_registry", r.target_registry},
                {"target_namespace", r.target_namespace},
                {"has_target_credentials", r.has_target_credentials},
                {"overwrite", r.overwrite},
                {"enabled", r.enabled},
                {"schedule", r.schedule},
                {"sync_on_push", r.sync_on_push},
                {"notify_urls", r.notify_urls},
                {"notify_on", to_string(r.notify_on)},
                {"next_fire", time_or_null(r.next_fire)},
                {"created", format_time(r.created)},
                {"updated", format_time(r.updated)}};
}

json to_json(const ReplicationGroup& g) {
    return json{{"id", g.id},
                {"name", g.name},
                {"primary", g.primary},
                {"replicas", g.replicas},
                {"replicate_deletes", g.replicate_deletes},
                {"enabled", g.enabled},
                {"schedule", g.schedule},
                {"next_fire", time_or_null(g.next_fire)},
                {"created", format_time(g.created)},
                {"updated", format_time(g.updated)}};
}

json to_json(const Delivery& d) {
    return json{{"id", d.id},
                {"task_id", d.task_id},
                {"url", d.url},
                {"status", d.status},
                {"attempts", d.attempts},
                {"last_status", d.last_status},
                {"last_error", d.last_error},
                {"created", format_time(d.created)},
                {"finished", time_or_null(d.finished)}};
}

json to_json(const StoredEvent& e) {
    return json{{"id", e.id},
                {"registry_id", e.registry_id},
                {"registry", e.registry_name},
                {"event_id", e.event_id},
                {"action", e.remove ? "delete" : "push"},
                {"repository", e.repository},
                {"tag", e.tag},
                {"digest", e.digest},
                {"received", format_time(e.received)},
                {"processed", e.processed},
                {"task_ids", e.task_ids}};
}

json to_json(const TaskRecord& t, Time now) {
    const auto d = t.duration(now);
    json scope = json::array();
    for (const auto& s : t.scope)
        scope.push_back({{"repository", s.repository}, {"tag", s.tag}, {"digest", s.digest}, {"remove", s.remove}});
    return json{{"id", t.id},
                {"rule_id", t.rule_id ? json(*t.rule_id) : json(nullptr)},
                {"rule_name", t.rule_name},
                {"group_id", t.group_id ? json(*t.group_id) : json(nullptr)},
                {"group_name", t.group_name},
                {"scope", std::move(scope)},
                {"trigger", to_string(t.trigger)},
                {"status", to_string(t.status)},
                {"reason", t.reason},
                {"created", format_time(t.created)},
                {"started", time_or_null(t.started)},
                {"finished", time_or_null(t.finished)},
                {"duration_ms", d ? json(d->count()) : json(nullptr)},
                {"cancel_requested", t.cancel_requested},
                {"success_ratio", t.success_ratio()},
                {"repositories", t.counters.repositories},
                {"copied", t.counters.copied},
                {"skipped", t.counters.skipped},
                {"failed", t.counters.failed},
                {"bytes", t.counters.bytes}};
}

json to_json(const TaskItem& i) {
    return json{{"id", i.id},
                {"task_id", i.task_id},
                {"target", i.target},
                {"repository", i.repository},
                {"tag", i.tag},
                {"digest", i.digest},
                {"action", to_string(i.action)},
                {"reason", i.reason},
                {"bytes", i.bytes},
                {"duration_ms", i.duration_ms}};
}

// ---------------------------------------------------------------------------------------------
// JSON in

namespace {

const char* type_name(const json& v) noexcept {
    switch (v.type()) {
    case json::value_t::null: return "null";
    case json::value_t::object: return "an object";
    case json::value_t::array: return "an array";
    case json::value_t::string: return "a string";
    case json::value_t::boolean: return "a boolean";
    case json::value_t::number_integer:
    case json::value_t::number_unsigned: return "an integer";
    case json::value_t::number_float: return "a number with a fraction";
    default: return "invalid";
    }
}

// Reads fields of one JSON object into a value, recording type errors per field.
class FieldReader {
public:
    explicit FieldReader(FieldErrors& errs) : errs_(errs) {}

    // null resets to "".
    void string(const std::string& key, const json& v, std::string& out) {
        if (v.is_null()) out.clear();
        else if (v.is_string()) out = v.get<std::string>();
        else errs_.push_back({key, std::string("must be a string, not ") + type_name(v)});
    }
    // null resets to `def`.
    void boolean(const std::string& key, const json& v, bool& out, bool def) {
        if (v.is_null()) out = def;
        else if (v.is_boolean()) out = v.get<bool>();
        else errs_.push_back({key, std::string("must be true or false, not ") + type_name(v)});
    }
    void uint(const std::string& key, const json& v, uint64_t& out) {
        if (v.is_null()) out = 0;
        else if (v.is_number_unsigned()) out = v.get<uint64_t>();
        else if (v.is_number_integer() && v.get<int64_t>() >= 0) out = static_cast<uint64_t>(v.get<int64_t>());
        else if (v.is_number_integer()) errs_.push_back({key, "must not be negative"});
        else errs_.push_back({key, std::string("must be a non-negative integer, not ") + type_name(v)});
    }
    // An array of strings; null resets to empty.
    void strings(const std::string& key, const json& v, std::vector<std::string>& out) {
        if (v.is_null()) {
            out.clear();
            return;
        }
        if (!v.is_array()) {
            errs_.push_back({key, std::string("must be an array of strings, not ") + type_name(v)});
            return;
        }
        std::vector<std::string> list;
        for (size_t i = 0; i < v.size(); ++i) {
            if (!v[i].is_string()) {
                errs_.push_back({key, "element " + std::to_string(i + 1) + " must be a string, not " + type_name(v[i])});
                return;
            }
            list.push_back(v[i].get<std::string>());
        }
        out = std::move(list);
    }
    void unknown(const std::string& key) { errs_.push_back({key, "unknown field"}); }

private:
    FieldErrors& errs_;
};

// Adds the errors of check() for fields that have no error yet (a field that was not a string
// would otherwise also be reported as empty).
void merge(FieldErrors& errs, const FieldErrors& more) {
    const size_t reader_errors = errs.size();
    for (const auto& e : more) {
        const auto end = errs.begin() + static_cast<std::ptrdiff_t>(reader_errors);
        if (std::none_of(errs.begin(), end, [&](const FieldError& x) { return x.field == e.field; }))
            errs.push_back(e);
    }
}

bool is_object_body(const json& body, FieldErrors& errs) {
    if (body.is_object()) return true;
    errs.push_back({"", std::string("the body must be a JSON object, not ") + type_name(body)});
    return false;
}

// Credentials arrive as two fields that are replaced together. Values are never quoted.
struct CredentialFields {
    std::optional<std::string> username;
    std::optional<std::string> password;

    void read(FieldReader& rd, const std::string& key, const json& v, bool is_user) {
        std::string s;
        rd.string(key, v, s);
        (is_user ? username : password) = std::move(s);
    }
    // Applies the pair to `out` (nullopt = unchanged).
    void apply(FieldErrors& errs, const char* user_field, const char* secret_field,
               std::optional<Credentials>& out) const {
        if (!username && !password) return;
        if (!username || !password) {
            errs.push_back({username ? secret_field : user_field,
                            std::string("must be given together with ") + (username ? user_field : secret_field) +
                                " (both are replaced; \"\" for no username with a token)"});
            return;
        }
        out = Credentials{*username, *password, {}};
    }
};

Checked<Registry> apply_registry(Registry r, const json& body) {
    FieldErrors errs;
    if (!is_object_body(body, errs)) return {std::move(r), std::move(errs)};
    FieldReader rd(errs);
    CredentialFields creds;
    for (const auto& [key, v] : body.items()) {
        if (key == "name") rd.string(key, v, r.name);
        else if (key == "url") rd.string(key, v, r.url);
        else if (key == "region") rd.string(key, v, r.region);
        else if (key == "insecure") rd.boolean(key, v, r.insecure, false);
        else if (key == "ca_file") rd.string(key, v, r.ca_file);
        else if (key == "username") creds.read(rd, key, v, true);
        else if (key == "password") creds.read(rd, key, v, false);
        else if (key == "webhook_secret") {
            // null removes it, as "" does. Never quoted.
            std::string secret;
            rd.string(key, v, secret);
            r.webhook_secret = std::move(secret);
        } else if (key == "id" || key == "created" || key == "updated" || key == "has_credentials" ||
                   key == "has_webhook_secret")
            continue;
        else rd.unknown(key);
    }
    creds.apply(errs, "username", "password", r.credentials);
    auto checked = check(std::move(r));
    merge(errs, checked.errors);
    return {std::move(checked.value), std::move(errs)};
}

Checked<Rule> apply_rule(Rule r, const json& body) {
    FieldErrors errs;
    if (!is_object_body(body, errs)) return {std::move(r), std::move(errs)};
    FieldReader rd(errs);
    CredentialFields creds;
    for (const auto& [key, v] : body.items()) {
        if (key == "name") rd.string(key, v, r.name);
        else if (key == "description") rd.string(key, v, r.description);
        else if (key == "source_registry") rd.string(key, v, r.source_registry);
        else if (key == "source_namespace") rd.string(key, v, r.source_namespace);
        else if (key == "repo_filter") rd.string(key, v, r.repo_filter);
        else if (key == "tag_filter") rd.string(key, v, r.tag_filter);
        else if (key == "type") {
            if (v.is_null()) r.type = TypeFilter::all;
            else if (!v.is_string()) errs.push_back({key, std::string("must be a string, not ") + type_name(v)});
            else if (auto t = parse_type_filter(v.get_ref<const std::string&>())) r.type = *t;
            else errs.push_back({key, quote(v.get_ref<const std::string&>()) + " is not one of image, helm, all"});
        } else if (key == "target_registry") rd.string(key, v, r.target_registry);
        else if (key == "target_namespace") rd.string(key, v, r.target_namespace);
        else if (key == "target_username") creds.read(rd, key, v, true);
        else if (key == "target_password") creds.read(rd, key, v, false);
        else if (key == "overwrite") rd.boolean(key, v, r.overwrite, false);
        else if (key == "enabled") rd.boolean(key, v, r.enabled, true);
        else if (key == "schedule") rd.string(key, v, r.schedule);
        else if (key == "sync_on_push") rd.boolean(key, v, r.sync_on_push, false);
        else if (key == "notify_urls") rd.strings(key, v, r.notify_urls);
        else if (key == "notify_on") {
            if (v.is_null()) r.notify_on = NotifyOn::always;
            else if (!v.is_string()) errs.push_back({key, std::string("must be a string, not ") + type_name(v)});
            else if (auto n = parse_notify_on(v.get_ref<const std::string&>())) r.notify_on = *n;
            else errs.push_back({key, quote(v.get_ref<const std::string&>()) + " is not one of always, failure, success"});
        } else if (key == "id" || key == "created" || key == "updated" || key == "has_target_credentials" ||
                 key == "next_fire" || key == "source_registry_id" || key == "target_registry_id")
            continue;
        else rd.unknown(key);
    }
    creds.apply(errs, "target_username", "target_password", r.target_credentials);
    auto checked = check(std::move(r));
    merge(errs, checked.errors);
    return {std::move(checked.value), std::move(errs)};
}

Checked<ReplicationGroup> apply_group(ReplicationGroup g, const json& body) {
    FieldErrors errs;
    if (!is_object_body(body, errs)) return {std::move(g), std::move(errs)};
    FieldReader rd(errs);
    for (const auto& [key, v] : body.items()) {
        if (key == "name") rd.string(key, v, g.name);
        else if (key == "primary") rd.string(key, v, g.primary);
        else if (key == "replicas") rd.strings(key, v, g.replicas);
        else if (key == "replicate_deletes") rd.boolean(key, v, g.replicate_deletes, false);
        else if (key == "enabled") rd.boolean(key, v, g.enabled, true);
        else if (key == "schedule") {
            // null resets to the default ("1h"); "" means events only.
            if (v.is_null()) g.schedule = ReplicationGroup{}.schedule;
            else rd.string(key, v, g.schedule);
        } else if (key == "id" || key == "created" || key == "updated" || key == "next_fire" || key == "primary_id" ||
                   key == "replica_ids")
            continue;
        else rd.unknown(key);
    }
    auto checked = check(std::move(g));
    merge(errs, checked.errors);
    return {std::move(checked.value), std::move(errs)};
}

}  // namespace

Checked<Registry> registry_from_json(const json& body) { return apply_registry(Registry{}, body); }

Checked<Registry> patch_registry(const Registry& current, const json& patch) {
    Registry r = current;
    r.credentials.reset();  // unchanged unless the patch has them
    r.webhook_secret.reset();
    return apply_registry(std::move(r), patch);
}

Checked<ReplicationGroup> group_from_json(const json& body) { return apply_group(ReplicationGroup{}, body); }

Checked<ReplicationGroup> patch_group(const ReplicationGroup& current, const json& patch) {
    return apply_group(current, patch);
}

Checked<Rule> rule_from_json(const json& body) { return apply_rule(Rule{}, body); }

Checked<Rule> patch_rule(const Rule& current, const json& patch) {
    Rule r = current;
    r.target_credentials.reset();
    return apply_rule(std::move(r), patch);
}

Checked<Link> link_from_json(const json& body) {
    FieldErrors errs;
    Link l;
    if (!is_object_body(body, errs)) return {std::move(l), std::move(errs)};
    FieldReader rd(errs);
    for (const auto& [key, v] : body.items()) {
        if (key == "source_region") rd.string(key, v, l.source_region);
        else if (key == "target_region") rd.string(key, v, l.target_region);
        else if (key == "rate_bytes_per_s") rd.uint(key, v, l.rate_bytes_per_s);
        else if (key == "burst_bytes") rd.uint(key, v, l.burst_bytes);
        else rd.unknown(key);
    }
    auto checked = check(std::move(l));
    merge(errs, checked.errors);
    return {std::move(checked.value), std::move(errs)};
}

}  // namespace engine
