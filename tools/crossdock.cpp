// crossdock: one binary, subcommands. Argument parsing and wiring only.
#include <mimalloc.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <iostream>
#include <string>
#include <vector>

#include "engine/auth_parse.h"
#include "tools/cli_common.h"
#include "engine/mirror.h"
#include "engine/reference.h"
#include "planner/token_bucket.h"
#include "tools/bench_link_cli.h"
#include "tools/client_cli.h"
#include "tools/serve_cli.h"

namespace {

constexpr int kExitOk = 0;
constexpr int kExitFailed = 1;
constexpr int kExitUsage = 2;

int usage_error(const std::string& msg) {
    std::fprintf(stderr, "crossdock: %s\n", msg.c_str());
    return kExitUsage;
}


struct MirrorArgs {
    std::vector<std::string> refs;
    std::string repo_regex, tag_regex, type = "all", target_namespace, ca_file, src_creds, dest_creds, authfile,
        cache_dir;
    bool overwrite = false, dry_run = false, insecure = false, json = false, fail_fast = false, quiet = false;
    unsigned jobs = 16;
    std::string streams = "4";
    std::string bandwidth;
    uint64_t chunk_mib = 64;
    uint64_t cache_cap_gib = 16;
};

int run_mirror(const MirrorArgs& a, bool target_namespace_given) {
    if (a.refs.size() < 2) return usage_error("mirror needs a SOURCE and at least one TARGET");
    // Every check that can fail on user input runs before any work.
    auto filters = engine::compile_filters(a.repo_regex, a.tag_regex, a.type);
    if (!filters.ok()) return usage_error(filters.error().message);
    engine::MirrorOptions o;
    auto src = engine::parse_registry_ref(a.refs[0]);
    if (!src.ok()) return usage_error("SOURCE '" + a.refs[0] + "': " + src.error().message);
    o.source = src.value();
    for (size_t i = 1; i < a.refs.size(); ++i) {
        auto t = engine::parse_registry_ref(a.refs[i]);
        if (!t.ok()) return usage_error("TARGET '" + a.refs[i] + "': " + t.error().message);
        o.targets.push_back(t.value());
    }
    if (target_namespace_given) {
        auto ns = engine::parse_registry_ref("x/" + a.target_namespace);
        if (!a.target_namespace.empty() && !ns.ok())
            return usage_error("--target-namespace '" + a.target_namespace + "': " + ns.error().message);
        o.target_namespace = a.target_namespace;
    }
    cli::ResolvedCredentials creds;
    if (auto err = cli::resolve_credentials({a.src_creds, a.dest_creds, a.authfile}, creds)) return usage_error(*err);
    o.source_credentials = creds.source;
    o.target_credentials = creds.target;
    o.auth_files = creds.auth_files;
    if (a.jobs == 0 || a.jobs > 256) return usage_error("--jobs must be between 1 and 256");
    // Registries that take chunked uploads commonly require chunks of at least 5 MiB (S3-backed
    // storage); only the last may be shorter.
    if (a.chunk_mib < 5 || a.chunk_mib > 4096) return usage_error("--chunk-size must be between 5 and 4096 (MiB)");
    if (a.streams == "auto") {
        o.streams_auto = true;
    } else {
        char* end = nullptr;
        unsigned long n = std::strtoul(a.streams.c_str(), &end, 10);
        if (a.streams.empty() || *end != '\0' || n == 0 || n > 64)
            return usage_error("--streams must be 'auto' or a number between 1 and 64");
        o.streams = static_cast<unsigned>(n);
    }
    if (!a.bandwidth.empty()) {
        auto rate = planner::parse_rate(a.bandwidth);
        if (!rate) return usage_error("--bandwidth '" + a.bandwidth + "': expected a rate such as 200Mbit, 1Gbit or 50MiB/s");
        o.bandwidth_bytes_per_s = *rate;
    }
    if (a.cache_cap_gib == 0) return usage_error("--cache-size must be at least 1 (GiB)");
    o.filters = filters.value();
    o.overwrite = a.overwrite;
    o.dry_run = a.dry_run;
    o.insecure = a.insecure;
    o.ca_file = a.ca_file;
    o.jobs = a.jobs;
    o.fail_fast = a.fail_fast;
    o.cache_dir = a.cache_dir;
    o.cache_cap_bytes = a.cache_cap_gib << 30;
    o.chunk_size_bytes = a.chunk_mib << 20;
    o.log = a.quiet ? nullptr : stderr;
    o.progress_tty = !a.quiet && ::isatty(STDERR_FILENO);

    engine::MirrorSummary s = engine::run_mirror(o);

    if (a.json) std::printf("%s\n", s.to_json().c_str());
    for (const auto& e : s.errors) std::fprintf(stderr, "error: %s\n", e.c_str());
    for (const auto& it : s.items)
        if (it.action == "failed")
            std::fprintf(stderr, "failed: %s:%s -> %s: %s\n", it.repository.c_str(), it.tag.c_str(), it.target.c_str(),
                         it.reason.c_str());
    std::fprintf(stderr, "%s%zu repositories, %zu %s, %zu skipped, %zu failed; %s uploaded (%zu blobs, %zu mounted, %zu already there), %s read from the source in %.1f s\n",
                 s.dry_run ? "dry run: " : "", s.repositories, s.copied, s.dry_run ? "would be copied" : "copied",
                 s.skipped, s.failed, engine::format_bytes(double(s.bytes_copied)).c_str(), s.blobs_uploaded, s.blobs_mounted,
                 s.blobs_existing, engine::format_bytes(double(s.bytes_read_source)).c_str(), s.duration_s);
    if (s.dry_run) {
        uint64_t would = 0;
        for (const auto& it : s.items) would += it.bytes;
        std::fprintf(stderr, "dry run: %s of blobs would be uploaded; nothing was written\n", engine::format_bytes(double(would)).c_str());
    }
    return s.ok() ? kExitOk : kExitFailed;
}

}  // namespace

int main(int argc, char** argv) {
    (void)mi_version();  // mimalloc is the process allocator (linked --no-as-needed)
    CLI::App app{"crossdock: replicate container-registry content between registries"};
    app.set_version_flag("--version", "crossdock 0.1.0");
    app.require_subcommand(1);

    MirrorArgs m;
    auto* mirror = app.add_subcommand("mirror", "Copy every repository under SOURCE's namespace to each TARGET");
    mirror->add_option("refs", m.refs, "SOURCE TARGET [TARGET...], each host[:port]/namespace")->required()->expected(2, -1);
    mirror->add_option("--repo", m.repo_regex, "RE2 regex, full match on the repository path below the namespace");
    mirror->add_option("--tag", m.tag_regex, "RE2 regex, full match on the tag");
    mirror->add_option("--type", m.type, "image, helm or all")->check(CLI::IsMember({"image", "helm", "all"}));
    auto* tns = mirror->add_option("--target-namespace", m.target_namespace, "namespace on every target (default: each TARGET's)");
    mirror->add_flag("--overwrite", m.overwrite, "replace target tags that hold other content");
    mirror->add_flag("--dry-run", m.dry_run, "report what would be copied and how many bytes; write nothing");
    mirror->add_flag("--insecure", m.insecure, "allow plain HTTP and skip TLS verification");
    mirror->add_option("--ca-file", m.ca_file, "PEM bundle of extra CAs to trust")->check(CLI::ExistingFile);
    mirror->add_option("--src-creds", m.src_creds, "USER:PASSWORD for the source");
    mirror->add_option("--dest-creds", m.dest_creds, "USER:PASSWORD for the targets");
    mirror->add_option("--authfile", m.authfile, "docker config.json / auth.json with credentials");
    mirror->add_option("--jobs,-j", m.jobs, "artifacts and blobs in flight at once")->capture_default_str();
    mirror->add_option("--chunk-size", m.chunk_mib, "MiB per PATCH when uploading large blobs")->capture_default_str();
    mirror->add_option("--streams", m.streams, "parallel ranged GETs per large blob, or 'auto' (measured)")->capture_default_str();
    mirror->add_option("--bandwidth", m.bandwidth, "cap per link (source, each target), e.g. 200Mbit, 50MiB/s");
    mirror->add_option("--cache", m.cache_dir, "keep the blob cache in DIR between runs (default: a temporary one)");
    mirror->add_option("--cache-size", m.cache_cap_gib, "GiB the cache may hold; least recently used blobs go first")->capture_default_str();
    mirror->add_flag("--json", m.json, "print a JSON summary on stdout");
    mirror->add_flag("--fail-fast", m.fail_fast, "stop at the first failed artifact");
    mirror->add_flag("--quiet,-q", m.quiet, "no progress or log lines");

    add_bench_link_command(app);
    auto client = add_client_commands(app);
    add_serve_command(app);

    try {
        app.parse(argc, argv);
    } catch (const CLI::CallForHelp& e) {
        return app.exit(e);
    } catch (const CLI::CallForVersion& e) {
        return app.exit(e);
    } catch (const CLI::ParseError& e) {
        app.exit(e);
        return kExitUsage;
    }
    try {
        if (mirror->parsed()) return run_mirror(m, tns->count() > 0);
        if (auto rc = client.run()) return *rc;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "crossdock: %s\n", e.what());
        return kExitFailed;
    }
    return kExitUsage;
}
