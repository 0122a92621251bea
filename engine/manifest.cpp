#include "engine/manifest.h"

#include <algorithm>
#include <exception>
#include <limits>
#include <nlohmann/json.hpp>

#include "cas/digest.h"

namespace engine {

namespace {

using nlohmann::json;

constexpr size_t kMaxQuoted = 80;

// Quotes a value for an error message: truncated, control characters escaped.
std::string quote_arg(std::string_view s) {
    std::string out = "'";
    const bool cut = s.size() > kMaxQuoted;
    for (unsigned char c : s.substr(0, kMaxQuoted)) {
        if (c < 0x20 || c == 0x7f) {
            static constexpr char kHex[] = "0123456789abcdef";
            out += "\\x";
            out += kHex[c >> 4];
            out += kHex[c & 0xf];
        } else {
            out += static_cast<char>(c);
        }
    }
    out += "'";
    if (cut) out += "...";
    return out;
}

// A JSON value as it appears in the document, for "X is not a Y" messages.
std::string describe_value(const json& v) {
    if (v.is_string()) return quote_arg(v.get_ref<const std::string&>());
    std::string d = v.dump(-1, ' ', false, json::error_handler_t::replace);
    if (d.size() > kMaxQuoted) d = d.substr(0, kMaxQuoted) + "...";
    return d;
}

const char* type_name(const json& v) noexcept {
    switch (v.type()) {
    case json::value_t::null: return "null";
    case json::value_t::object: return "an object";
    case json::value_t::array: return "an array";
    case json::value_t::string: return "a string";
    case json::value_t::boolean: return "a boolean";
    case json::value_t::binary: return "binary";
    case json::value_t::discarded: return "invalid";
    default: return "a number";
    }
}

netio::Error fail(const std::string& msg) {
    return netio::Error::make("manifest: " + msg, std::make_error_code(std::errc::bad_message));
}

char to_lower(char c) noexcept { return (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c; }

// "Type/Sub; charset=x" -> "type/sub".
std::string normalize_media_type(std::string_view mt) {
    if (const size_t semi = mt.find(';'); semi != std::string_view::npos) mt = mt.substr(0, semi);
    while (!mt.empty() && (mt.front() == ' ' || mt.front() == '\t')) mt.remove_prefix(1);
    while (!mt.empty() && (mt.back() == ' ' || mt.back() == '\t')) mt.remove_suffix(1);
    std::string out(mt);
    for (char& c : out) c = to_lower(c);
    return out;
}

// RFC 6838 restricted-name "/" restricted-name, as in the image-spec JSON schema:
// ^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}$
bool is_valid_media_type(std::string_view mt) noexcept {
    const auto is_name = [](std::string_view n) {
        if (n.empty() || n.size() > 127) return false;
        const auto alnum = [](char c) {
            return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
        };
        if (!alnum(n.front())) return false;
        return std::all_of(n.begin(), n.end(), [&](char c) {
            return alnum(c) || c == '!' || c == '#' || c == '$' || c == '&' || c == '^' || c == '_' || c == '.' ||
                   c == '+' || c == '-';
        });
    };
    const size_t slash = mt.find('/');
    return slash != std::string_view::npos && is_name(mt.substr(0, slash)) && is_name(mt.substr(slash + 1));
}

bool is_schema1(std::string_view mt) noexcept { return mt == kDockerSchema1 || mt == kDockerSchema1Signed; }
bool is_supported(std::string_view mt) noexcept {
    return mt == kOciManifest || mt == kOciIndex || mt == kDockerManifest || mt == kDockerManifestList;
}
// Content types that say nothing about the manifest's kind.
bool is_generic_content_type(std::string_view ct) noexcept {
    return ct.empty() || ct == "application/json" || ct == "application/octet-stream" || ct == "text/plain" ||
           ct == "binary/octet-stream";
}

constexpr const char* kSchema1Message =
    "Docker schema1 manifests are not supported (push the image again with a current Docker or use a schema 2 / "
    "OCI copy)";

// Reads an optional string member; error when present but not a string.
std::optional<std::string> optional_string(const json& obj, const char* key, const std::string& where,
                                           std::string& err) {
    const auto it = obj.find(key);
    if (it == obj.end()) return std::nullopt;
    if (!it->is_string()) {
        err = where + key + " is " + type_name(*it) + ", not a string";
        return std::nullopt;
    }
    return it->get<std::string>();
}

bool check_annotations(const json& obj, const std::string& where, std::string& err) {
    const auto it = obj.find("annotations");
    if (it == obj.end() || it->is_null()) return true;
    if (!it->is_object()) {
        err = where + "annotations is " + type_name(*it) + ", not an object";
        return false;
    }
    for (const auto& [k, v] : it->items()) {
        if (!v.is_string()) {
            err = where + "annotations[" + quote_arg(k) + "] is " + type_name(v) + ", not a string";
            return false;
        }
    }
    return true;
}

// `where` is the descriptor's path, e.g. "layers[2]"; messages read "layers[2].digest ...".
std::optional<Descriptor> parse_descriptor(const json& j, const std::string& where, bool index_entry,
                                           std::string& err) {
    if (!j.is_object()) {
        err = where + " is " + type_name(j) + ", not a descriptor object";
        return std::nullopt;
    }
    const std::string prefix = where + ".";
    Descriptor d;

    const auto mt = j.find("mediaType");
    if (mt == j.end()) {
        err = prefix + "mediaType is missing";
        return std::nullopt;
    }
    if (!mt->is_string()) {
        err = prefix + "mediaType is " + type_name(*mt) + ", not a string";
        return std::nullopt;
    }
    d.media_type = mt->get<std::string>();
    if (!is_valid_media_type(d.media_type)) {
        err = prefix + "mediaType is not a valid media type: " + quote_arg(d.media_type);
        return std::nullopt;
    }

    const auto dg = j.find("digest");
    if (dg == j.end()) {
        err = prefix + "digest is missing";
        return std::nullopt;
    }
    if (!dg->is_string()) {
        err = prefix + "digest is " + type_name(*dg) + ", not a string";
        return std::nullopt;
    }
    d.digest = dg->get<std::string>();
    if (!cas::is_valid_digest(d.digest)) {
        err = prefix + "digest is not a valid digest: " + quote_arg(d.digest);
        return std::nullopt;
    }

    const auto sz = j.find("size");
    if (sz == j.end()) {
        err = prefix + "size is missing";
        return std::nullopt;
    }
    if (sz->is_number_unsigned()) {
        d.size = sz->get<uint64_t>();
    } else if (sz->is_number_integer()) {  // nlohmann stores only negative integers as signed
        const int64_t v = sz->get<int64_t>();
        if (v < 0) {
            err = prefix + "size is negative: " + std::to_string(v);
            return std::nullopt;
        }
        d.size = static_cast<uint64_t>(v);
    } else if (sz->is_number_float()) {
        const double v = sz->get<double>();
        err = prefix + "size " + describe_value(*sz) +
              (v >= 18446744073709551616.0 ? " does not fit in 64 bits" : " is not an integer");
        return std::nullopt;
    } else {
        err = prefix + "size is " + type_name(*sz) + ", not an integer";
        return std::nullopt;
    }

    if (auto at = optional_string(j, "artifactType", prefix, err)) {
        if (!is_valid_media_type(*at)) {
            err = prefix + "artifactType is not a valid media type: " + quote_arg(*at);
            return std::nullopt;
        }
        d.artifact_type = std::move(*at);
    } else if (!err.empty()) {
        return std::nullopt;
    }

    if (const auto urls = j.find("urls"); urls != j.end() && !urls->is_null()) {
        if (!urls->is_array()) {
            err = prefix + "urls is " + type_name(*urls) + ", not an array";
            return std::nullopt;
        }
        for (size_t i = 0; i < urls->size(); ++i) {
            if (!(*urls)[i].is_string()) {
                err = prefix + "urls[" + std::to_string(i) + "] is " + type_name((*urls)[i]) + ", not a string";
                return std::nullopt;
            }
        }
    }
    if (!check_annotations(j, prefix, err)) return std::nullopt;
    if (optional_string(j, "data", prefix, err); !err.empty()) return std::nullopt;

    if (const auto pf = j.find("platform"); pf != j.end() && !pf->is_null()) {
        const std::string pprefix = prefix + "platform.";
        if (!pf->is_object()) {
            err = prefix + "platform is " + type_name(*pf) + ", not an object";
            return std::nullopt;
        }
        auto os = optional_string(*pf, "os", pprefix, err);
        if (!err.empty()) return std::nullopt;
        auto arch = optional_string(*pf, "architecture", pprefix, err);
        if (!err.empty()) return std::nullopt;
        auto variant = optional_string(*pf, "variant", pprefix, err);
        if (!err.empty()) return std::nullopt;
        if (!os || os->empty()) {
            err = pprefix + "os is missing";
            return std::nullopt;
        }
        if (!arch || arch->empty()) {
            err = pprefix + "architecture is missing";
            return std::nullopt;
        }
        if (index_entry) {
            d.platform = *os + "/" + *arch;
            if (variant && !variant->empty()) d.platform += "/" + *variant;
        }
    }
    return d;
}

netio::Result<Manifest> parse_json_manifest(const json& doc, const std::string& ct) {
    if (!doc.is_object()) return fail(std::string("the document is ") + type_name(doc) + ", not a JSON object");

    // schemaVersion first: schema1 documents are recognised whatever the Content-Type says.
    const auto sv = doc.find("schemaVersion");
    if (sv == doc.end()) {
        if (is_schema1(ct)) return fail(kSchema1Message);
        return fail("schemaVersion is missing");
    }
    if (!sv->is_number_integer() && !sv->is_number_unsigned())
        return fail(std::string("schemaVersion is ") + type_name(*sv) + ", not an integer");
    if (sv->get<int64_t>() == 1 || is_schema1(ct)) return fail(kSchema1Message);
    if (sv->get<int64_t>() != 2) return fail("schemaVersion " + describe_value(*sv) + " is not supported (expected 2)");

    std::string field_mt;
    if (const auto mt = doc.find("mediaType"); mt != doc.end()) {
        if (!mt->is_string()) return fail(std::string("mediaType is ") + type_name(*mt) + ", not a string");
        field_mt = mt->get<std::string>();
        if (field_mt.empty()) return fail("mediaType is empty");
    }
    const std::string field_norm = normalize_media_type(field_mt);

    std::string media_type;
    if (!is_generic_content_type(ct)) {
        if (!is_supported(ct)) return fail("unsupported media type " + quote_arg(ct));
        if (!field_mt.empty() && field_norm != ct)
            return fail("mediaType field " + quote_arg(field_mt) + " disagrees with the Content-Type " + quote_arg(ct));
        media_type = ct;
    } else if (!field_mt.empty()) {
        if (is_schema1(field_norm)) return fail(kSchema1Message);
        if (!is_supported(field_norm)) return fail("unsupported media type " + quote_arg(field_mt));
        media_type = field_norm;
    } else if (doc.contains("manifests")) {
        media_type = kOciIndex;
    } else if (doc.contains("config") && doc.contains("layers")) {
        media_type = kOciManifest;
    } else {
        return fail("cannot tell the manifest type: no mediaType field, and neither 'manifests' nor 'config' + "
                    "'layers'");
    }

    Manifest m;
    m.media_type = media_type;
    m.kind = is_index_media_type(media_type) ? ManifestKind::index : ManifestKind::image;
    std::string err;

    if (m.kind == ManifestKind::image) {
        const auto cfg = doc.find("config");
        if (cfg == doc.end()) return fail("config is missing");
        auto c = parse_descriptor(*cfg, "config", false, err);
        if (!c) return fail(err);
        m.config = std::move(*c);

        const auto layers = doc.find("layers");
        if (layers == doc.end()) return fail("layers is missing");
        if (!layers->is_array()) return fail(std::string("layers is ") + type_name(*layers) + ", not an array");
        m.layers.reserve(layers->size());
        for (size_t i = 0; i < layers->size(); ++i) {
            auto d = parse_descriptor((*layers)[i], "layers[" + std::to_string(i) + "]", false, err);
            if (!d) return fail(err);
            m.layers.push_back(std::move(*d));
        }
        m.type = m.config.media_type == kHelmConfig ? ArtifactType::helm : ArtifactType::image;
    } else {
        const auto list = doc.find("manifests");
        if (list == doc.end()) return fail("manifests is missing");
        if (!list->is_array()) return fail(std::string("manifests is ") + type_name(*list) + ", not an array");
        m.manifests.reserve(list->size());
        for (size_t i = 0; i < list->size(); ++i) {
            auto d = parse_descriptor((*list)[i], "manifests[" + std::to_string(i) + "]", true, err);
            if (!d) return fail(err);
            m.manifests.push_back(std::move(*d));
        }
        m.type = ArtifactType::image;
    }

    if (const auto subj = doc.find("subject"); subj != doc.end() && !subj->is_null()) {
        auto d = parse_descriptor(*subj, "subject", false, err);
        if (!d) return fail(err);
        m.subject = std::move(*d);
    }
    if (auto at = optional_string(doc, "artifactType", "", err)) {
        if (!is_valid_media_type(*at)) return fail("artifactType is not a valid media type: " + quote_arg(*at));
        m.artifact_type = std::move(*at);
    } else if (!err.empty()) {
        return fail(err);
    }
    if (!check_annotations(doc, "", err)) return fail(err);
    return m;
}

}  // namespace

std::string manifest_accept_header() {
    return std::string(kOciIndex) + ", " + kOciManifest + ", " + kDockerManifestList + ", " + kDockerManifest;
}

bool is_index_media_type(std::string_view media_type) noexcept {
    try {
        const std::string mt = normalize_media_type(media_type);
        return mt == kOciIndex || mt == kDockerManifestList;
    } catch (...) {  // std::bad_alloc only
        return false;
    }
}

bool is_image_manifest_media_type(std::string_view media_type) noexcept {
    try {
        const std::string mt = normalize_media_type(media_type);
        return mt == kOciManifest || mt == kDockerManifest;
    } catch (...) {
        return false;
    }
}

netio::Result<Manifest> parse_manifest(std::string_view bytes, std::string_view content_type) {
    try {
        const std::string ct = normalize_media_type(content_type);
        if (is_schema1(ct)) return fail(kSchema1Message);
        if (!is_generic_content_type(ct) && !is_supported(ct)) return fail("unsupported media type " + quote_arg(ct));
        if (bytes.empty()) return fail("the body is empty");
        json doc;
        try {
            doc = json::parse(bytes.begin(), bytes.end());
        } catch (const json::exception& e) {  // parse_error, or out_of_range for numbers like 1e400
            return fail("not valid JSON: " + std::string(e.what()));
        }
        return parse_json_manifest(doc, ct);
    } catch (const std::exception& e) {
        // Allocation failure, or a nlohmann type_error from a case the checks above missed.
        return fail(std::string("cannot be read: ") + e.what());
    }
}

std::vector<Descriptor> blobs_of(const Manifest& m) {
    std::vector<Descriptor> out;
    if (m.kind != ManifestKind::image) return out;
    out.reserve(m.layers.size() + 1);
    out.push_back(m.config);
    out.insert(out.end(), m.layers.begin(), m.layers.end());
    return out;
}

uint64_t blob_bytes(const Manifest& m) noexcept {
    if (m.kind != ManifestKind::image) return 0;
    uint64_t total = m.config.size;
    for (const auto& l : m.layers) {
        if (total > std::numeric_limits<uint64_t>::max() - l.size) return std::numeric_limits<uint64_t>::max();
        total += l.size;
    }
    return total;
}

std::string effective_artifact_type(const Manifest& m) {
    if (!m.artifact_type.empty()) return m.artifact_type;
    if (m.kind == ManifestKind::image) return m.config.media_type;
    return {};
}

}  // namespace engine
