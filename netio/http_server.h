// HttpServer: an HTTP/1.1 server on the UringLoop, for the sidecar's control API on a Unix socket
// (`curl --unix-socket PATH http://x/v1/rules`) and for /healthz, /metrics and webhooks on a loopback
// TCP port. Requests are parsed by http_parser (2.9); responses are written whole.
//
// What it does:
// - keep-alive (the HTTP/1.1 default; `Connection: close` and HTTP/1.0 honoured), pipelined requests
//   answered in order (one request at a time per connection: the next one is parsed only once the
//   previous response is on the wire), chunked request bodies (decoded), `Expect: 100-continue`.
// - server-generated errors are JSON `{"message": "..."}` and close the connection:
//   400 malformed request, 403 peer refused by allow_peer, 408 request not received within
//   request_timeout, 413 body over max_body_bytes (answered as soon as it is known, from
//   Content-Length or while a chunked body arrives: the body is not read whole), 414/431 request
//   line / header section over max_header_bytes, 417 an Expect other than 100-continue,
//   500 handler threw (the exception is logged, never sent), 501 a method token http_parser does
//   not know (it knows the ~30 methods of HTTP, WebDAV and friends; every one of them reaches the
//   handler, which decides).
// - after an error (or `Connection: close`) the server half-closes and drains what the client still
//   sends for a bounded time and amount, so the client reads the answer instead of a reset.
// - slow clients are bounded: idle_timeout between requests, request_timeout to receive one request
//   (from its first byte) and again to write one response.
// - at max_connections it stops accepting (new clients wait in the kernel's backlog) until one closes.
//
// Threading: every method, and the handler, runs on the loop's thread.
// Ownership: the server owns its listening sockets, its connections and the handler (kept alive
// while a handler coroutine is suspended, even past the server's destruction). The loop is borrowed
// and must outlive the server. A request is owned by its connection and lent to the handler until
// the handler's Task completes. Destroying the server closes every connection at once; a handler
// still suspended then finishes with its response dropped.
// Errors: listen_* return a Status (errno codes); nothing on the data path throws out of the server.
#pragma once

#include <sys/socket.h>
#include <sys/types.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include "netio/http_client.h"  // Headers, find_header
#include "netio/result.h"
#include "netio/task.h"
#include "netio/uring_loop.h"

namespace netio {

struct HttpRequest {
    std::string method;   // "GET", "POST", ... (as http_parser names it)
    std::string target;   // path + query as sent (origin-form; absolute-form is kept as sent too)
    std::string path;     // the target's path, not percent-decoded ("/v1/rules"); "*" for OPTIONS *
    std::string query;    // after '?', not decoded, without the '?'
    Headers headers;      // in order, names as sent (look up with find_header: case-insensitive);
                          // trailers of a chunked body are appended
    std::string body;     // de-chunked
    std::optional<ucred> peer;  // SO_PEERCRED of a Unix-socket client; empty on TCP
    int http_minor = 1;   // HTTP/1.x

    std::string header(std::string_view name) const { return find_header(headers, name); }
};

struct HttpResponse {
    int status = 200;
    Headers headers;      // Content-Length and Transfer-Encoding are set by the server (any given are
                          // dropped); `Connection: close` here closes the connection after the response
    std::string body;     // Content-Type defaults to application/json when the body starts with { or
                          // [, else to text/plain; charset=utf-8 (when non-empty). HEAD: not sent.

    // {"message": msg} with this status.
    static HttpResponse json_error(int status, std::string_view message);
};

// A coroutine handler: it may await work on the loop. Exceptions become a 500.
using Handler = std::function<Task<HttpResponse>(HttpRequest&)>;
// A plain synchronous handler.
using SyncHandler = std::function<HttpResponse(HttpRequest&)>;

struct HttpServerOptions {
    size_t max_body_bytes = 1 << 20;
    // Request line + header fields (names, values, separators). http_parser itself stops at 80 KiB
    // (its compile-time HTTP_MAX_HEADER_SIZE), so larger values are capped there (also a 431).
    size_t max_header_bytes = 64 << 10;
    size_t max_connections = 256;
    std::chrono::milliseconds idle_timeout{60000};
    std::chrono::milliseconds request_timeout{30000};
    // Unix sockets: peers this returns false for get 403 (after their request head is read).
    // Default: the server's effective uid, or root. A socket shared with a group (listen_unix with a
    // group) needs an allow_peer that admits that group's users.
    std::function<bool(const ucred&)> allow_peer;
    // Where problems are reported (handler exceptions, accept failures). Default: stderr.
    std::function<void(std::string_view)> log;
    // listen_unix on a path whose socket still accepts connections but does not answer: how long
    // to wait for it to go away (listen_tcp waits as long for a fixed port in use). A process
    // killed while an io_uring request held its listening socket leaves one behind for a moment:
    // the kernel tears the ring down after the process is gone, so the socket is still open when
    // the next server starts.
    std::chrono::milliseconds takeover_wait{3000};
};

class HttpServer {
public:
    HttpServer(UringLoop& loop, Handler handler, HttpServerOptions options = {});
    HttpServer(UringLoop& loop, SyncHandler handler, HttpServerOptions options = {});
    ~HttpServer();
    HttpServer(const HttpServer&) = delete;
    HttpServer& operator=(const HttpServer&) = delete;

    // Listens on a Unix stream socket at `path`, created with `mode` (and owned by `group` when
    // given; the file gets its mode and group before the socket listens, so no one connects in
    // between). A stale socket file (connections refused, at once or within takeover_wait) is
    // removed first; a live one (another server answers a request, or the socket still accepts
    // without answering when the wait ends) gives EADDRINUSE; a path that exists and is not a
    // socket gives EEXIST. The file is removed when the server stops or is destroyed, if it is
    // still the one we made.
    Status listen_unix(const std::string& path, mode_t mode = 0600, std::optional<gid_t> group = {});
    // Listens on host:port (numeric address or a name resolved once here); port 0 picks one.
    Status listen_tcp(const std::string& host, uint16_t port);
    // The port the last listen_tcp bound (0 if none).
    uint16_t tcp_port() const noexcept;

    // Stops accepting (listening sockets closed, socket files removed) and closes idle connections;
    // requests already being received or handled finish, their responses carry `Connection: close`.
    // Final: the server does not listen again.
    void stop();
    // Open connections (including ones finishing a response or draining before close).
    size_t connections() const noexcept;

private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

}  // namespace netio
