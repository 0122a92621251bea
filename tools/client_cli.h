// The control API's thin client: `crossdock registry|rule|replication|task|event|link ...` talk to
// a running `crossdock serve` over its Unix socket (engine/api.h has the endpoints) and print what
// it answers.
//
// Wiring into tools/crossdock.cpp, three lines:
//   #include "tools/client_cli.h"
//   auto client = add_client_commands(app);           // in main(), before app.parse()
//   if (auto rc = client.run()) return *rc;           // after app.parse()
// The commands' arguments live in the returned object, so it must outlive app.parse().
//
// Output: tables (or "key: value" lines for `show`) on stdout; with --json the API's JSON body,
// indented, in the API's field order (for `ls`, the list object; with --all or `task logs`, every
// page merged into one with "next_cursor": null; `task show --json` is the task's object with the
// "deliveries" list of GET /v1/tasks/{id}/deliveries added; `task watch --json` prints one compact
// JSON line per change). No output ever holds a credential or a webhook secret: the API writes
// none, and the client reads them only from its flags or standard input (one line, so at most one
// --*-stdin flag per command) to send them.
//
// Exit codes: 0 done (`task watch`: the task Succeeded; `replication where`: every replica holds
// the primary's digest); 1 the API refused (its "message" and any "errors" go to stderr as it wrote
// them), the daemon could not be reached, the watched task did not succeed, or `replication where`
// found a replica without the primary's digest (missing, different, or not reachable); 2 usage
// error (from CLI11 in main(), or a flag combination refused here); 130 `task watch` interrupted by
// SIGINT (the task keeps running in the daemon).
//
// Single-threaded; run() is called once.
#pragma once

#include <memory>
#include <optional>
#include <utility>

namespace CLI {
class App;
}

class ClientCommands {
public:
    struct State;  // the commands, their arguments and their actions (client_cli.cpp)
    explicit ClientCommands(std::shared_ptr<State> state) : state_(std::move(state)) {}

    // The exit code of the client command that app.parse() selected, nullopt if none was.
    std::optional<int> run() const;

private:
    std::shared_ptr<State> state_;
};

// Adds the `registry`, `rule`, `replication`, `task`, `event` and `link` subcommands to `app`.
ClientCommands add_client_commands(CLI::App& app);
