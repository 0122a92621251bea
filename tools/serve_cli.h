// The `crossdock serve` subcommand: CLI11 wiring only (the work is engine::run_daemon).
//
// Wiring into tools/crossdock.cpp, two lines:
//   #include "tools/serve_cli.h"
//   add_serve_command(app);
// As bench-link does, the callback ends the process with the daemon's exit code (0 after SIGTERM or
// SIGINT, 1 if it could not start, 2 on a usage error).
#pragma once

#include <grp.h>

#include <CLI/CLI.hpp>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>

#include "engine/daemon.h"
#include "engine/rules.h"

namespace serve_cli {

struct Args {
    std::string state_dir, socket_path, listen, socket_group, reconcile_interval = "1h";
    unsigned max_tasks = 2, jobs = 16, streams = 4, retention_days = 30, keep_tasks = 1000, stop_timeout_s = 10;
    uint64_t chunk_mib = 64, cache_cap_gib = 16;
};

inline int usage(const std::string& msg) {
    std::fprintf(stderr, "crossdock: serve: %s\n", msg.c_str());
    return 2;
}

inline int run(const Args& a) {
    engine::DaemonOptions o;
    o.state_dir = a.state_dir;
    o.socket_path = a.socket_path;
    if (o.socket_path.empty()) {
        const char* env = std::getenv("CROSSDOCK_SOCKET");
        o.socket_path = env && *env ? env : "/run/crossdock/crossdock.sock";
    }
    if (!a.socket_group.empty()) {
        const group* g = ::getgrnam(a.socket_group.c_str());
        if (!g) return usage("--socket-group '" + a.socket_group + "': no such group");
        o.socket_group = g->gr_gid;
    }
    if (!a.listen.empty()) {
        const size_t colon = a.listen.rfind(':');
        if (colon == std::string::npos || colon == 0) return usage("--listen '" + a.listen + "': expected HOST:PORT, e.g. 127.0.0.1:9480");
        std::string host = a.listen.substr(0, colon);
        if (host.size() > 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
        char* end = nullptr;
        const unsigned long port = std::strtoul(a.listen.c_str() + colon + 1, &end, 10);
        if (*end != '\0' || colon + 1 == a.listen.size() || port > 65535)
            return usage("--listen '" + a.listen + "': the port must be a number from 0 to 65535");
        o.listen_host = host;
        o.listen_port = static_cast<uint16_t>(port);
    }
    o.max_running_tasks = a.max_tasks;
    o.jobs = a.jobs;
    o.streams = a.streams;
    o.chunk_size_bytes = a.chunk_mib << 20;
    o.cache_cap_bytes = a.cache_cap_gib << 30;
    o.retention.older_than_days = a.retention_days;
    o.retention.keep_last_per_rule = a.keep_tasks;
    o.stop_timeout = std::chrono::seconds(a.stop_timeout_s);
    auto interval = engine::Schedule::parse(a.reconcile_interval);
    if (!interval.ok() || interval.value.kind() != engine::Schedule::Kind::interval)
        return usage("--reconcile-interval '" + a.reconcile_interval + "': expected an interval such as 30m, 1h or 1d");
    o.reconcile_interval = interval.value.interval();
    return engine::run_daemon(o);
}

}  // namespace serve_cli

inline void add_serve_command(CLI::App& app) {
    auto a = std::make_shared<serve_cli::Args>();
    auto* sub = app.add_subcommand("serve", "Run the sidecar daemon: control API on a Unix socket, rules, schedules and tasks");
    sub->add_option("--state", a->state_dir, "directory for the state database and the blob cache (created 0700)")->required();
    sub->add_option("--socket", a->socket_path,
                    "Unix socket of the control API (default: $CROSSDOCK_SOCKET, else /run/crossdock/crossdock.sock)");
    sub->add_option("--socket-group", a->socket_group, "make the socket 0660 and owned by GROUP, whose members may use it");
    sub->add_option("--listen", a->listen, "HOST:PORT serving /healthz and /metrics over HTTP (e.g. 127.0.0.1:9480)");
    sub->add_option("--max-tasks", a->max_tasks, "tasks running at once")->check(CLI::Range(1u, 64u))->capture_default_str();
    sub->add_option("--jobs,-j", a->jobs, "artifacts and blobs in flight at once, per task")->check(CLI::Range(1u, 256u))->capture_default_str();
    sub->add_option("--streams", a->streams, "parallel ranged GETs per large blob")->check(CLI::Range(1u, 64u))->capture_default_str();
    sub->add_option("--chunk-size", a->chunk_mib, "MiB per PATCH when uploading large blobs")
        ->check(CLI::Range(uint64_t{5}, uint64_t{4096}))
        ->capture_default_str();
    sub->add_option("--cache-size", a->cache_cap_gib, "GiB the blob cache may hold")
        ->check(CLI::Range(uint64_t{1}, uint64_t{1} << 20))
        ->capture_default_str();
    sub->add_option("--retention-days", a->retention_days, "remove finished tasks older than this")
        ->check(CLI::Range(1u, 36500u))
        ->capture_default_str();
    sub->add_option("--keep-tasks", a->keep_tasks, "keep at most this many finished tasks per rule")
        ->check(CLI::Range(1u, 1000000u))
        ->capture_default_str();
    sub->add_option("--reconcile-interval", a->reconcile_interval,
                    "how often sync-on-push rules without a schedule scan for what notifications missed")
        ->capture_default_str();
    sub->add_option("--stop-timeout", a->stop_timeout_s, "seconds running tasks get to checkpoint on SIGTERM")
        ->check(CLI::Range(0u, 3600u))
        ->capture_default_str();
    sub->callback([a] {
        int rc = 1;
        try {
            rc = serve_cli::run(*a);
        } catch (const std::exception& e) {
            std::fprintf(stderr, "crossdock: serve: %s\n", e.what());
        }
        std::fflush(nullptr);
        std::exit(rc);
    });
}
