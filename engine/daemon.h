// The sidecar daemon (`crossdock serve`): one process with one io_uring loop that serves the
// control API (engine/api.h) on a Unix socket and /healthz and /metrics on an optional loopback
// TCP port, keeps its state in the Store, fires scheduled rules, and runs tasks.
//
// Tasks: a trigger (manual through the API, or a schedule) persists a Queued task; the daemon
// starts Queued tasks oldest first, at most `max_running_tasks` at once and one per rule at a time.
// A task runs the mirror engine (engine/mirror.h) for its rule on a worker thread with its own
// loop; the mirror hands each artifact's outcome back, and the daemon's loop appends them to the
// task log in batches (the Store is only touched from the daemon's loop thread). Blobs go through
// one cache under `<state>/cache`, so a task cut short resumes its partial blobs from their
// verified chunks.
//
// Stopping: SIGTERM or SIGINT stop the listeners, ask every running task to stop, and wait up to
// `stop_timeout` for them; their logs are flushed and they are put back to Queued ("checkpointed"),
// so the next start continues them. A task left InProgress by a process that died (kill -9, power
// loss) is resumed the same way on start; one whose rule is gone is failed as "interrupted".
//
// Link caps: a cap set for a link (source registry's region -> target registry's region) holds for
// all the tasks running on that link together, downloads and uploads each, and is split between
// them by weight (event 8, manual 2, schedule 1; planner/link_shares.h); a task that stops using
// the link leaves its share to the others.
//
// Threading: run_daemon() runs on the calling thread until a stop signal; it blocks SIGTERM, SIGINT
// and SIGPIPE in the calling thread (and so in the workers it starts) and reads them from a signalfd.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <optional>
#include <string>

#include "engine/store.h"

namespace engine {

struct DaemonOptions {
    std::string state_dir;                 // the Store and the blob cache
    std::string socket_path;               // the control API
    std::optional<gid_t> socket_group;     // socket 0660 and owned by this group; else 0600
    std::string listen_host;               // /healthz and /metrics; "" = no TCP listener
    uint16_t listen_port = 0;
    unsigned max_running_tasks = 2;
    // Per task, as `crossdock mirror` takes them.
    unsigned jobs = 16;
    unsigned streams = 4;
    uint64_t chunk_size_bytes = 64u << 20;
    uint64_t cache_cap_bytes = 16ull << 30;
    Retention retention{30, 1000};         // finished tasks older than 30 days or beyond 1000 per rule
    std::chrono::milliseconds stop_timeout{10000};
    std::chrono::milliseconds tick{1000};  // how often schedules are checked
    // Webhook events: a burst of events for one artifact is coalesced until it has been quiet for
    // `event_quiet`, or its first event is `event_max_hold` old; then one task copies the latest.
    std::chrono::milliseconds event_quiet{250};
    std::chrono::milliseconds event_max_hold{1000};
    // Sync-on-push rules without a schedule are reconciled (a full scan) at start and this often.
    std::chrono::seconds reconcile_interval{3600};
    // Notifications out: attempts per URL, the first retry after `notify_backoff`, doubling.
    uint32_t notify_attempts = 5;
    std::chrono::milliseconds notify_backoff{1000};
    FILE* log = stderr;
};

// Returns the process exit code: 0 after a stop signal, 1 if the daemon could not start.
int run_daemon(const DaemonOptions& options);

}  // namespace engine
