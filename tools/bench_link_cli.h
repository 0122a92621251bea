// The `crossdock bench-link` subcommand: CLI11 wiring only (the work is engine::run_bench_link).
//
// Wiring into tools/crossdock.cpp, two lines:
//   #include "tools/bench_link_cli.h"
//   add_bench_link_command(app);          // in main(), next to the mirror subcommand
// The subcommand's callback runs the benchmark when CLI11 has parsed it, then ends the process with
// bench-link's exit code (0 ok, 1 failed, 2 usage error or scratch repository refused): main()
// maps every CLI::ParseError to exit 2, so an exit code cannot travel back through app.parse().
// While it runs, SIGINT/SIGTERM abort the measurement in progress and bench-link deletes what it
// uploaded before it exits; a second signal ends the process at once (SA_RESETHAND).
#pragma once

#include <unistd.h>

#include <CLI/CLI.hpp>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "engine/auth_parse.h"
#include "tools/cli_common.h"
#include "engine/bench_link.h"
#include "engine/reference.h"

namespace bench_link_cli {

struct Args {
    std::vector<std::string> refs;
    bool insecure = false, force = false;
    std::string ca_file, src_creds, dest_creds, authfile, repo, json_path, plot_path;
    std::vector<unsigned> streams = {1, 2, 4, 8, 16};
    std::vector<uint64_t> chunk_mib = {8, 32};
    uint64_t size_mib = 64;
    int rtt_samples = 10;
};

inline volatile std::sig_atomic_t interrupted = 0;

inline void on_signal(int) {
    interrupted = 1;
    static const char msg[] = "\ncrossdock bench-link: interrupted, deleting what was uploaded (again to quit at once)\n";
    (void)!::write(STDERR_FILENO, msg, sizeof msg - 1);
}

inline int usage_error(const std::string& msg) {
    std::fprintf(stderr, "crossdock: bench-link: %s\n", msg.c_str());
    return engine::kBenchLinkRefused;
}

inline int run(const Args& a) {
    engine::BenchLinkOptions o;
    if (a.refs.size() != 2) return usage_error("needs a SOURCE and a TARGET");
    auto src = engine::parse_registry_ref(a.refs[0]);
    if (!src.ok()) return usage_error("SOURCE '" + a.refs[0] + "': " + src.error().message);
    auto dst = engine::parse_registry_ref(a.refs[1]);
    if (!dst.ok()) return usage_error("TARGET '" + a.refs[1] + "': " + dst.error().message);
    o.source = src.value();
    o.target = dst.value();
    cli::ResolvedCredentials creds;
    if (auto err = cli::resolve_credentials({a.src_creds, a.dest_creds, a.authfile}, creds)) return usage_error(*err);
    o.source_credentials = creds.source;
    o.target_credentials = creds.target;
    o.auth_files = creds.auth_files;
    if (a.streams.empty()) return usage_error("--streams needs at least one count");
    if (a.chunk_mib.empty()) return usage_error("--chunk-sizes needs at least one size");
    o.insecure = a.insecure;
    o.ca_file = a.ca_file;
    o.repo = a.repo;
    o.force = a.force;
    o.streams = a.streams;
    o.chunk_sizes.clear();
    for (uint64_t m : a.chunk_mib) o.chunk_sizes.push_back(m << 20);
    o.blob_bytes = a.size_mib << 20;
    o.rtt_samples = a.rtt_samples;
    o.json_path = a.json_path;
    o.plot_path = a.plot_path;
    o.interrupted = &interrupted;

    struct sigaction sa {};
    sa.sa_handler = &on_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESETHAND;
    struct sigaction old_int {}, old_term {};
    ::sigaction(SIGINT, &sa, &old_int);
    ::sigaction(SIGTERM, &sa, &old_term);
    const int rc = engine::run_bench_link(o);
    ::sigaction(SIGINT, &old_int, nullptr);
    ::sigaction(SIGTERM, &old_term, nullptr);
    if (interrupted && rc == engine::kBenchLinkOk) return engine::kBenchLinkFailed;
    return rc;
}

}  // namespace bench_link_cli

inline void add_bench_link_command(CLI::App& app) {
    auto a = std::make_shared<bench_link_cli::Args>();
    auto* sub = app.add_subcommand(
        "bench-link", "Measure the link between two registries (RTT, GET and PUT throughput by streams and chunk size) "
                      "and print the crossdock mirror settings it recommends");
    sub->add_option("refs", a->refs, "SOURCE TARGET, each host[:port]/namespace")->required()->expected(2);
    sub->add_flag("--insecure", a->insecure, "allow plain HTTP and skip TLS verification");
    sub->add_option("--ca-file", a->ca_file, "PEM bundle of extra CAs to trust")->check(CLI::ExistingFile);
    sub->add_option("--src-creds", a->src_creds, "USER:PASSWORD for the source");
    sub->add_option("--dest-creds", a->dest_creds, "USER:PASSWORD for the target");
    sub->add_option("--authfile", a->authfile, "docker config.json / auth.json with credentials");
    sub->add_option("--repo", a->repo,
                    "scratch repository below each namespace (default: crossdock-bench-link/<random>)");
    sub->add_flag("--force", a->force, "use the scratch repository even if it already holds content");
    sub->add_option("--streams", a->streams, "stream counts to measure, comma-separated")
        ->delimiter(',')
        ->check(CLI::Range(1u, 64u))
        ->capture_default_str();
    sub->add_option("--chunk-sizes", a->chunk_mib, "PATCH chunk sizes to measure, MiB, comma-separated")
        ->delimiter(',')
        ->check(CLI::Range(uint64_t{5}, uint64_t{4096}))
        ->capture_default_str();
    sub->add_option("--size", a->size_mib, "MiB moved per run (GET: one blob; PUT: N blobs of SIZE/N)")
        ->check(CLI::Range(uint64_t{1}, uint64_t{65536}))
        ->capture_default_str();
    sub->add_option("--rtt-samples", a->rtt_samples, "GET /v2/ round trips timed per registry")
        ->check(CLI::Range(1, 1000))
        ->capture_default_str();
    sub->add_option("--json", a->json_path, "write the full report as JSON to FILE");
    sub->add_option("--plot", a->plot_path, "draw throughput against streams as SVG to FILE");
    sub->callback([a] {
        int rc = engine::kBenchLinkFailed;
        try {
            rc = bench_link_cli::run(*a);
        } catch (const std::exception& e) {
            std::fprintf(stderr, "crossdock: bench-link: %s\n", e.what());
        }
        std::fflush(nullptr);
        std::exit(rc);
    });
}
