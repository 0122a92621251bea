#include "netio/http_server.h"

#include <fcntl.h>
#include <http_parser.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <exception>
#include <unordered_map>
#include <utility>
#include <vector>

#include "netio/unique_fd.h"

namespace netio {

namespace {

using namespace std::chrono_literals;

// Limits (TIGER_STYLE: a bound on everything).
constexpr size_t kReadChunkBytes = 16 << 10;   // one recv; also the most unparsed input a connection holds
constexpr int kMaxReadsPerWake = 8;            // recvs per readiness event before yielding to others
constexpr int kMaxAcceptsPerWake = 64;
constexpr auto kAcceptRetryDelay = 100ms;      // after EMFILE and friends: the backlog would re-fire at once
constexpr std::chrono::milliseconds kLingerTime = 2s;  // drain before close, at most (and ≤ request_timeout)
constexpr size_t kLingerMaxBytes = 4 << 20;    // ... and at most this much

Error sys_error(const std::string& what, int err) {
    return Error{std::error_code(err, std::system_category()), what + ": " + std::strerror(err)};
}

bool iequals(std::string_view a, std::string_view b) noexcept {
    if (a.size() != b.size()) return false;
    for (size_t i = 0; i < a.size(); ++i) {
        char x = a[i], y = b[i];
        if (x >= 'A' && x <= 'Z') x = static_cast<char>(x - 'A' + 'a');
        if (y >= 'A' && y <= 'Z') y = static_cast<char>(y - 'A' + 'a');
        if (x != y) return false;
    }
    return true;
}

std::string_view trim_ows(std::string_view s) noexcept {
    while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
    while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
    return s;
}

// RFC 9110 tchar.
bool is_tchar(unsigned char c) noexcept {
    if ((c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')) return true;
    return std::strchr("!#$%&'*+-.^_`|~", c) != nullptr && c != '\0';
}

bool valid_field_name(std::string_view s) noexcept {
    if (s.empty()) return false;
    for (unsigned char c : s)
        if (!is_tchar(c)) return false;
    return true;
}

bool valid_field_value(std::string_view s) noexcept {
    for (unsigned char c : s)
        if (c == '\r' || c == '\n' || c == '\0') return false;
    return true;
}

std::string json_escape(std::string_view s) {
    std::string out;
    out.reserve(s.size() + 8);
    for (unsigned char c : s) {
        switch (c) {
        case '"': out += "\\\""; break;
        case '\\': out += "\\\\"; break;
        case '\n': out += "\\n"; break;
        case '\r': out += "\\r"; break;
        case '\t': out += "\\t"; break;
        default:
            if (c < 0x20 || c == 0x7f) {
                char buf[8];
                std::snprintf(buf, sizeof buf, "\\u%04x", c);
                out += buf;
            } else {
                out += static_cast<char>(c);
            }
        }
    }
    return out;
}

const char* reason_phrase(int status) noexcept {
    const char* s = http_status_str(static_cast<enum http_status>(status));
    return (s == nullptr || s[0] == '<') ? "Status" : s;
}

void default_log(std::string_view line) { std::fprintf(stderr, "http_server: %.*s\n", static_cast<int>(line.size()), line.data()); }

}  // namespace

HttpResponse HttpResponse::json_error(int status, std::string_view message) {
    HttpResponse r;
    r.status = status;
    r.body = "{\"message\": \"" + json_escape(message) + "\"}";
    return r;
}

struct HttpServer::Impl {
    struct Conn;

    struct Listener {
        UniqueFd fd;
        bool is_unix = false;
        std::string path;  // Unix socket file, removed on stop if still ours (dev, ino)
        dev_t dev = 0;
        ino_t ino = 0;
        OpId poll;
    };

    UringLoop& loop;
    std::shared_ptr<const Handler> handler;          // exactly one of these two is set
    std::shared_ptr<const SyncHandler> sync_handler;
    HttpServerOptions opt;
    std::vector<std::unique_ptr<Listener>> listeners;
    std::unordered_map<uint64_t, std::shared_ptr<Conn>> conns;
    uint64_t next_conn_id = 1;
    uint16_t tcp_port = 0;
    bool stopping = false;
    OpId accept_retry;

    Impl(UringLoop& l, HttpServerOptions o) : loop(l), opt(std::move(o)) {
        if (!opt.log) opt.log = default_log;
        if (opt.max_connections == 0) opt.max_connections = 1;
    }
    ~Impl();

    void log(const std::string& line) noexcept {
        try {
            opt.log(line);
        } catch (...) {
        }
    }

    Status add_listener(UniqueFd fd, bool is_unix, std::string path);
    void arm_listener(Listener& l);
    void on_acceptable(Listener& l, int res);
    void resume_accepting() noexcept;
    void retry_accept_later() noexcept;
    void add_conn(UniqueFd fd, bool is_unix);
    void on_conn_closed(uint64_t id);
    void close_listeners() noexcept;
    bool peer_allowed(const ucred& cred) noexcept;
};

// One client connection: an explicit state machine.
//   idle       waiting for a request (idle_timeout)            -> receiving (first byte), closed
//   receiving  request head/body arriving (request_timeout)    -> handling, sending (error), closed
//   handling   the handler runs (no timer, no read)             -> sending
//   sending    response being written (request_timeout)         -> idle (keep-alive), lingering
//   lingering  half-closed, draining what the client still sends (bounded) -> closed
// Loop callbacks hold a shared_ptr to the connection, so it lives while one runs; close() cancels
// them all. `srv` is null once the server is gone.
struct HttpServer::Impl::Conn : std::enable_shared_from_this<Conn> {
    enum class State { idle, receiving, handling, sending, lingering, closed };

    Impl* srv;
    UringLoop& loop;
    const uint64_t id;
    UniqueFd fd;
    std::optional<ucred> peer;
    bool allowed = true;
    State state = State::idle;

    http_parser parser{};
    std::unique_ptr<char[]> in{new char[kReadChunkBytes]};
    size_t in_pos = 0;  // unparsed input is [in_pos, in_len)
    size_t in_len = 0;

    // The request being received; lent to the handler while handling.
    HttpRequest req;
    std::string field, value;
    bool in_value = false;
    size_t header_bytes = 0;
    bool head_request = false;
    bool keep_alive = true;
    bool close_after = false;  // close once the current response is out (sticky)
    int reject_status = 0;     // set by a parser callback that stopped the parser on purpose
    std::string reject_message;

    std::string out;
    size_t out_pos = 0;
    size_t drained_bytes = 0;

    OpId read_poll, write_poll, timer;

    Conn(Impl* s, uint64_t i, UniqueFd f) : srv(s), loop(s->loop), id(i), fd(std::move(f)) {
        http_parser_init(&parser, HTTP_REQUEST);
        parser.data = this;
    }

    const HttpServerOptions& opt() const { return srv->opt; }
    bool reading() const noexcept { return state == State::idle || state == State::receiving; }

    void start() {
        set_timer(opt().idle_timeout);
        want_read();
    }

    // Every entry from the loop goes through here: nothing thrown on the data path (bad_alloc, a
    // full submission queue) may escape into the loop; the connection is dropped instead.
    template <class F>
    void guarded(F&& f) noexcept {
        try {
            f();
        } catch (const std::exception& e) {
            abort(e.what());
        } catch (...) {
            abort("unknown exception");
        }
    }
    void abort(const char* what) noexcept {
        if (state == State::closed) return;
        try {
            if (srv) srv->log(std::string("connection dropped: ") + what);
        } catch (...) {
        }
        close();
    }

    // --- timers ---------------------------------------------------------------------------------
    void set_timer(std::chrono::milliseconds d) {
        cancel_timer();
        timer = loop.add_timer(d, [self = shared_from_this()] {
            self->timer = {};
            self->guarded([&] { self->on_timer(); });
        });
    }
    void cancel_timer() noexcept {
        if (timer) loop.cancel_timer(std::exchange(timer, {}));
    }
    void on_timer() {
        switch (state) {
        case State::receiving:
            fail(408, "request not received within " + std::to_string(opt().request_timeout.count()) + " ms");
            break;
        case State::idle:       // idle too long
        case State::sending:    // client does not read its response
        case State::lingering:  // drained long enough
            close();
            break;
        case State::handling:
        case State::closed:
            break;
        }
    }

    // --- reading --------------------------------------------------------------------------------
    void want_read() {
        if (read_poll || !fd.valid() || in_pos < in_len) return;
        read_poll = loop.poll_add(fd.get(), POLLIN, [self = shared_from_this()](int res) {
            self->read_poll = {};
            self->guarded([&] { self->on_readable(res); });
        });
    }

    void on_readable(int res) {
        if (state == State::closed) return;
        if (res < 0) {
            close();
            return;
        }
        if (state == State::lingering) {
            drain();
            return;
        }
        for (int i = 0; i < kMaxReadsPerWake && reading() && in_pos == in_len && !read_poll; ++i) {
            const ssize_t n = ::recv(fd.get(), in.get(), kReadChunkBytes, 0);
            if (n > 0) {
                in_pos = 0;
                in_len = static_cast<size_t>(n);
                feed();
                continue;
            }
            if (n == 0) {
                on_eof();
                return;
            }
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) break;
            close();
            return;
        }
        continue_reading();
    }

    // After input was consumed: push out a pending 100 Continue, wait for more input.
    void continue_reading() {
        if (!reading()) return;
        if (out_pos < out.size() && !write_poll) flush();
        if (reading()) want_read();
    }

    void on_eof() {
        if (state == State::receiving) {
            fail(400, "request truncated: the connection was closed before the request was complete");
        } else {
            close();
        }
    }

    // Runs the parser over the buffered input until it is consumed, a request is complete (the
    // parser pauses in on_message_complete), or an error.
    void feed() {
        while (reading() && in_pos < in_len) {
            const size_t start = in_pos;
            const size_t avail = in_len - in_pos;
            const size_t n = http_parser_execute(&parser, settings(), in.get() + start, avail);
            in_pos += std::min(n, avail);
            const auto err = HTTP_PARSER_ERRNO(&parser);
            if (err == HPE_PAUSED) {
                http_parser_pause(&parser, 0);
                dispatch();
                return;
            }
            if (err != HPE_OK) {
                parse_failed(err);
                return;
            }
            if (n < avail) {  // stopped without error or pause: an Upgrade it could not complete
                fail(400, "malformed request: protocol upgrades are not supported");
                return;
            }
        }
    }

    void parse_failed(http_errno err) {
        if (reject_status != 0) {
            fail(reject_status, reject_message.empty() ? "internal server error" : reject_message);
            return;
        }
        switch (err) {
        case HPE_HEADER_OVERFLOW:
            fail(431, "request header section too large");
            return;
        case HPE_INVALID_METHOD:
            // http_parser knows a fixed set of methods; a well-formed token it does not know is a
            // method we do not implement (RFC 9110 15.6.2), anything else is garbage.
            if (looks_like_method_token()) {
                fail(501, "method not implemented");
                return;
            }
            break;
        default:
            break;
        }
        fail(400, std::string("malformed request: ") + http_errno_description(err));
    }

    // The parser stopped at in[in_pos] inside the method: is the method a token followed by SP?
    bool looks_like_method_token() const noexcept {
        size_t b = in_pos, e = in_pos;
        while (b > 0 && is_tchar(static_cast<unsigned char>(in[b - 1]))) --b;
        while (e < in_len && is_tchar(static_cast<unsigned char>(in[e]))) ++e;
        return e > b && e < in_len && in[e] == ' ';
    }

    // --- parser callbacks ---------------------------------------------------------------------
    // No exception crosses the C parser: each callback runs its member through call(), which turns
    // one into a 500. A callback that wants the parser stopped records why and returns -1.
    static Conn& of(http_parser* p) noexcept { return *static_cast<Conn*>(p->data); }

    template <class F>
    static int call(http_parser* p, F&& f) noexcept {
        auto& c = of(p);
        try {
            return f(c);
        } catch (...) {
            c.reject_status = 500;
            return -1;
        }
    }

    int reject(int status, std::string message) {
        reject_status = status;
        reject_message = std::move(message);
        return -1;
    }

    bool count_header_bytes(size_t n) noexcept {
        header_bytes += n;
        return header_bytes <= opt().max_header_bytes;
    }

    void push_header() {
        if (field.empty() && !in_value) return;
        req.headers.emplace_back(std::move(field), std::string(trim_ows(value)));
        field.clear();
        value.clear();
        in_value = false;
    }

    static int on_message_begin(http_parser* p) noexcept {
        return call(p, [](Conn& c) {
            c.state = State::receiving;
            c.req = HttpRequest{};
            c.field.clear();
            c.value.clear();
            c.in_value = false;
            c.header_bytes = 0;
            c.head_request = false;
            c.set_timer(c.opt().request_timeout);
            return 0;
        });
    }

    static int on_url(http_parser* p, const char* at, size_t len) noexcept {
        return call(p, [=](Conn& c) {
            if (!c.count_header_bytes(len)) return c.reject(414, "request target too long");
            c.req.target.append(at, len);
            return 0;
        });
    }

    static int on_header_field(http_parser* p, const char* at, size_t len) noexcept {
        return call(p, [=](Conn& c) {
            if (c.in_value) c.push_header();
            if (c.field.empty()) c.header_bytes += 4;  // ": " and CRLF
            if (!c.count_header_bytes(len)) return c.reject(431, "request header section too large");
            c.field.append(at, len);
            return 0;
        });
    }

    static int on_header_value(http_parser* p, const char* at, size_t len) noexcept {
        return call(p, [=](Conn& c) {
            if (!c.count_header_bytes(len)) return c.reject(431, "request header section too large");
            c.in_value = true;
            c.value.append(at, len);
            return 0;
        });
    }

    static int on_headers_complete(http_parser* p) noexcept {
        return call(p, [](Conn& c) { return c.headers_complete(); });
    }

    int headers_complete() {
        push_header();
        req.method = http_method_str(static_cast<http_method>(parser.method));
        req.http_minor = parser.http_minor;
        head_request = parser.method == HTTP_HEAD;
        keep_alive = http_should_keep_alive(&parser) != 0;
        split_target();
        req.peer = peer;

        if (!allowed) {
            return reject(403, peer ? "forbidden: uid " + std::to_string(peer->uid) + " may not use this socket"
                                    : std::string("forbidden"));
        }
        const bool chunked = (parser.flags & F_CHUNKED) != 0;
        const bool has_length = (parser.flags & F_CONTENTLENGTH) != 0;
        const uint64_t length = has_length ? parser.content_length : 0;
        if (has_length && length > opt().max_body_bytes) {
            return reject(413, "request body of " + std::to_string(length) + " bytes is over the limit of " +
                                   std::to_string(opt().max_body_bytes) + " bytes");
        }
        const std::string expect = find_header(req.headers, "expect");
        if (!expect.empty()) {
            if (!iequals(trim_ows(expect), "100-continue")) return reject(417, "unsupported Expect: " + expect);
            // Only HTTP/1.1 clients wait for it, and only when a body follows (RFC 9110 10.1.1).
            if (parser.http_major == 1 && parser.http_minor >= 1 && (chunked || length > 0)) {
                out += "HTTP/1.1 100 Continue\r\n\r\n";
            }
        }
        if (has_length) req.body.reserve(static_cast<size_t>(length));
        return 0;
    }

    void split_target() {
        std::string_view t = req.target;
        t = t.substr(0, t.find('#'));  // clients do not send fragments; drop one if they do
        if (!t.empty() && t[0] == '/') {
            const size_t q = t.find('?');
            req.path = std::string(t.substr(0, q));
            if (q != std::string_view::npos) req.query = std::string(t.substr(q + 1));
            return;
        }
        if (t == "*") {
            req.path = "*";
            return;
        }
        // absolute-form (or authority-form for CONNECT)
        http_parser_url u;
        http_parser_url_init(&u);
        req.path = "/";
        if (t.size() <= UINT16_MAX &&
            http_parser_parse_url(t.data(), t.size(), parser.method == HTTP_CONNECT, &u) == 0) {
            if (u.field_set & (1 << UF_PATH)) req.path = t.substr(u.field_data[UF_PATH].off, u.field_data[UF_PATH].len);
            if (u.field_set & (1 << UF_QUERY))
                req.query = t.substr(u.field_data[UF_QUERY].off, u.field_data[UF_QUERY].len);
        }
    }

    static int on_body(http_parser* p, const char* at, size_t len) noexcept {
        return call(p, [=](Conn& c) {
            const size_t max = c.opt().max_body_bytes;
            if (len > max || c.req.body.size() > max - len) {
                return c.reject(413, "request body is over the limit of " + std::to_string(max) + " bytes");
            }
            c.req.body.append(at, len);
            return 0;
        });
    }

    static int on_message_complete(http_parser* p) noexcept {
        return call(p, [p](Conn& c) {
            c.push_header();  // a chunked body's last trailer
            // Stop here: the next pipelined request is parsed once this one is answered.
            http_parser_pause(p, 1);
            return 0;
        });
    }

    static const http_parser_settings* settings() noexcept {
        static const http_parser_settings s = [] {
            http_parser_settings x;
            http_parser_settings_init(&x);
            x.on_message_begin = on_message_begin;
            x.on_url = on_url;
            x.on_header_field = on_header_field;
            x.on_header_value = on_header_value;
            x.on_headers_complete = on_headers_complete;
            x.on_body = on_body;
            x.on_message_complete = on_message_complete;
            return x;
        }();
        return &s;
    }

    // --- handling -------------------------------------------------------------------------------
    void dispatch() {
        state = State::handling;
        cancel_timer();
        if (read_poll) loop.cancel(std::exchange(read_poll, {}));
        if (!keep_alive || srv->stopping) close_after = true;
        if (srv->sync_handler) {
            HttpResponse r;
            try {
                r = (*srv->sync_handler)(req);
            } catch (const std::exception& e) {
                r = handler_failed(e.what());
            } catch (...) {
                r = handler_failed("unknown exception");
            }
            respond(std::move(r));
        } else {
            run_handler(shared_from_this(), srv->handler);
        }
    }

    HttpResponse handler_failed(const std::string& what) {
        if (srv) srv->log("handler failed on " + req.method + " " + req.path + ": " + what);
        return HttpResponse::json_error(500, "internal server error");
    }

    // Holds the connection and the handler (the closure a coroutine lambda's frame points into)
    // until the handler's Task completes, whatever happened to the server meanwhile.
    static detail::Detached run_handler(std::shared_ptr<Conn> c, std::shared_ptr<const Handler> h) {
        std::optional<HttpResponse> r;
        std::string error;
        try {
            r.emplace(co_await (*h)(c->req));
        } catch (const std::exception& e) {
            error = e.what();
        } catch (...) {
            error = "unknown exception";
        }
        if (c->state != State::handling) co_return;  // closed meanwhile (server destroyed)
        c->guarded([&] {
            if (!r) r.emplace(c->handler_failed(error));
            c->respond(std::move(*r));
        });
    }

    // --- writing --------------------------------------------------------------------------------
    void respond(HttpResponse r) {
        if (state == State::closed) return;
        serialize(std::move(r));
        state = State::sending;
        set_timer(opt().request_timeout);
        flush();
    }

    void serialize(HttpResponse r) {
        if (r.status < 200 || r.status > 999) {
            if (srv) srv->log("handler returned status " + std::to_string(r.status) + " on " + req.method + " " + req.path);
            r = HttpResponse::json_error(500, "internal server error");
        }
        const bool no_body = r.status == 204 || r.status == 304;
        if (no_body) r.body.clear();
        bool has_type = false;
        std::string head = "HTTP/1.1 " + std::to_string(r.status) + " " + reason_phrase(r.status) + "\r\n";
        for (auto& [name, value] : r.headers) {
            if (iequals(name, "content-length") || iequals(name, "transfer-encoding")) continue;
            if (iequals(name, "connection")) {
                if (iequals(trim_ows(value), "close")) close_after = true;
                continue;
            }
            if (!valid_field_name(name) || !valid_field_value(value)) {
                if (srv) srv->log("dropped an invalid response header from the handler");
                continue;
            }
            if (iequals(name, "content-type")) has_type = true;
            head += name;
            head += ": ";
            head += value;
            head += "\r\n";
        }
        if (!has_type && !r.body.empty()) {
            const char first = r.body.front();
            head += (first == '{' || first == '[') ? "Content-Type: application/json\r\n"
                                                   : "Content-Type: text/plain; charset=utf-8\r\n";
        }
        if (!no_body) head += "Content-Length: " + std::to_string(r.body.size()) + "\r\n";
        if (close_after) {
            head += "Connection: close\r\n";
        } else if (req.http_minor == 0) {
            head += "Connection: keep-alive\r\n";
        }
        head += "\r\n";
        if (out_pos == out.size()) {
            out.clear();
            out_pos = 0;
        }
        out += head;
        if (!head_request) out += r.body;
    }

    void flush() {
        while (out_pos < out.size()) {
            const ssize_t n = ::send(fd.get(), out.data() + out_pos, out.size() - out_pos, MSG_NOSIGNAL | MSG_DONTWAIT);
            if (n > 0) {
                out_pos += static_cast<size_t>(n);
                continue;
            }
            if (n < 0 && errno == EINTR) continue;
            if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
                want_write();
                return;
            }
            close();  // EPIPE, ECONNRESET: the client is gone
            return;
        }
        out.clear();
        out_pos = 0;
        if (state == State::sending) sent();
    }

    void want_write() {
        if (write_poll || !fd.valid()) return;
        write_poll = loop.poll_add(fd.get(), POLLOUT, [self = shared_from_this()](int res) {
            self->write_poll = {};
            if (self->state == State::closed) return;
            if (res < 0) {
                self->close();
                return;
            }
            self->guarded([&] { self->flush(); });
        });
    }

    void sent() {
        if (close_after) {
            linger();
            return;
        }
        state = State::idle;
        set_timer(opt().idle_timeout);
        if (in_pos < in_len) {
            // A pipelined request is already here: parse it on the next turn, not from inside this
            // call chain (a sync handler would otherwise recurse once per pipelined request).
            loop.defer([self = shared_from_this()] {
                if (self->state != State::idle) return;
                self->guarded([&] {
                    self->feed();
                    self->continue_reading();
                });
            });
        } else {
            want_read();
        }
    }

    // Half-close, then read and drop what the client still sends (bounded), so that closing does
    // not turn unread input into a reset that destroys the response before the client reads it.
    void linger() {
        state = State::lingering;
        ::shutdown(fd.get(), SHUT_WR);
        in_pos = in_len = 0;
        set_timer(std::min(kLingerTime, opt().request_timeout));
        want_read();
    }

    void drain() {
        for (int i = 0; i < kMaxReadsPerWake; ++i) {
            const ssize_t n = ::recv(fd.get(), in.get(), kReadChunkBytes, 0);
            if (n > 0) {
                drained_bytes += static_cast<size_t>(n);
                if (drained_bytes > kLingerMaxBytes) {
                    close();
                    return;
                }
                continue;
            }
            if (n < 0 && errno == EINTR) continue;
            if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
            close();  // EOF or error
            return;
        }
        want_read();  // drained for now (or yielding to other connections)
    }

    // A server-generated error while receiving: answer it and close.
    void fail(int status, const std::string& message) {
        if (state == State::closed) return;
        if (read_poll) loop.cancel(std::exchange(read_poll, {}));
        if (state == State::idle) head_request = false;  // failed before a new request began
        close_after = true;
        keep_alive = false;
        in_pos = in_len;  // whatever follows is not parsed
        respond(HttpResponse::json_error(status, message));
    }

    void close() noexcept {
        if (state == State::closed) return;
        state = State::closed;
        auto self = shared_from_this();  // the map's reference may be the last one
        if (read_poll) loop.cancel(std::exchange(read_poll, {}));
        if (write_poll) loop.cancel(std::exchange(write_poll, {}));
        cancel_timer();
        fd.reset();
        if (srv) srv->on_conn_closed(id);
    }
};

HttpServer::Impl::~Impl() {
    close_listeners();
    if (accept_retry) loop.cancel_timer(std::exchange(accept_retry, {}));
    auto all = std::move(conns);
    conns.clear();
    for (auto& [id, c] : all) {
        c->srv = nullptr;
        c->close();
    }
}

bool HttpServer::Impl::peer_allowed(const ucred& cred) noexcept {
    if (!opt.allow_peer) return cred.uid == ::geteuid() || cred.uid == 0;
    try {
        return opt.allow_peer(cred);
    } catch (const std::exception& e) {
        log(std::string("allow_peer threw: ") + e.what());
    } catch (...) {
        log("allow_peer threw");
    }
    return false;
}

Status HttpServer::Impl::add_listener(UniqueFd fd, bool is_unix, std::string path) {
    if (::listen(fd.get(), SOMAXCONN) != 0) return sys_error("listen", errno);
    auto l = std::make_unique<Listener>();
    l->fd = std::move(fd);
    l->is_unix = is_unix;
    l->path = std::move(path);
    if (is_unix) {
        struct stat st{};
        if (::lstat(l->path.c_str(), &st) == 0) {
            l->dev = st.st_dev;
            l->ino = st.st_ino;
        }
    }
    listeners.push_back(std::move(l));
    if (conns.size() < opt.max_connections) arm_listener(*listeners.back());
    return ok_status();
}

void HttpServer::Impl::arm_listener(Listener& l) {
    if (l.poll || !l.fd.valid()) return;
    l.poll = loop.poll_add(l.fd.get(), POLLIN, [this, lp = &l](int res) {
        lp->poll = {};
        try {
            on_acceptable(*lp, res);
        } catch (const std::exception& e) {  // bad_alloc, a full submission queue: try again later
            log(std::string("accepting failed: ") + e.what());
            retry_accept_later();
        }
    });
}

void HttpServer::Impl::on_acceptable(Listener& l, int res) {
    if (stopping || !l.fd.valid()) return;
    if (res < 0) {
        log("poll on a listening socket failed: " + std::string(std::strerror(-res)));
        retry_accept_later();
        return;
    }
    for (int i = 0; i < kMaxAcceptsPerWake; ++i) {
        if (conns.size() >= opt.max_connections) return;  // paused; resumed by on_conn_closed
        const int fd = ::accept4(l.fd.get(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            const int err = errno;
            if (err == EINTR || err == ECONNABORTED || err == EPROTO) continue;
            if (err == EAGAIN || err == EWOULDBLOCK) break;
            log("accept failed: " + std::string(std::strerror(err)));
            retry_accept_later();  // EMFILE, ENFILE, ENOBUFS, ENOMEM: the backlog would re-fire at once
            return;
        }
        add_conn(UniqueFd(fd), l.is_unix);
    }
    arm_listener(l);
}

void HttpServer::Impl::retry_accept_later() noexcept {
    if (accept_retry) return;
    try {
        accept_retry = loop.add_timer(kAcceptRetryDelay, [this] {
            accept_retry = {};
            resume_accepting();
        });
    } catch (...) {
        log("cannot schedule accepting again");
    }
}

void HttpServer::Impl::resume_accepting() noexcept {
    if (stopping || conns.size() >= opt.max_connections) return;
    try {
        for (auto& l : listeners) arm_listener(*l);
    } catch (const std::exception& e) {
        log(std::string("re-arming accept failed: ") + e.what());
        retry_accept_later();
    }
}

void HttpServer::Impl::add_conn(UniqueFd fd, bool is_unix) {
    const uint64_t id = next_conn_id++;
    auto c = std::make_shared<Conn>(this, id, std::move(fd));
    if (is_unix) {
        ucred cred{};
        socklen_t len = sizeof cred;
        if (::getsockopt(c->fd.get(), SOL_SOCKET, SO_PEERCRED, &cred, &len) == 0 && len == sizeof cred) {
            c->peer = cred;
            c->allowed = peer_allowed(cred);
        } else {
            c->allowed = false;
        }
    } else {
        // Responses go out in one send, but a 100 Continue followed by the response would
        // otherwise meet Nagle and delayed ACKs.
        const int one = 1;
        (void)::setsockopt(c->fd.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    conns.emplace(id, c);
    c->guarded([&] { c->start(); });
}

void HttpServer::Impl::on_conn_closed(uint64_t id) {
    conns.erase(id);
    resume_accepting();
}

void HttpServer::Impl::close_listeners() noexcept {
    for (auto& l : listeners) {
        if (l->poll) loop.cancel(std::exchange(l->poll, {}));
        l->fd.reset();
        if (l->is_unix && !l->path.empty()) {
            struct stat st{};
            if (::lstat(l->path.c_str(), &st) == 0 && st.st_dev == l->dev && st.st_ino == l->ino) {
                ::unlink(l->path.c_str());
            }
        }
    }
    listeners.clear();
}

// --- HttpServer -----------------------------------------------------------------------------------

HttpServer::HttpServer(UringLoop& loop, Handler handler, HttpServerOptions options)
    : impl_(std::make_unique<Impl>(loop, std::move(options))) {
    impl_->handler = std::make_shared<const Handler>(std::move(handler));
}

HttpServer::HttpServer(UringLoop& loop, SyncHandler handler, HttpServerOptions options)
    : impl_(std::make_unique<Impl>(loop, std::move(options))) {
    impl_->sync_handler = std::make_shared<const SyncHandler>(std::move(handler));
}

HttpServer::~HttpServer() = default;

namespace {

enum class SocketProbe { Gone, Answers, Silent };

// Whether a server is behind the Unix socket at addr: connect, send a request and wait a little for
// any reply (a response or a close, both mean someone accepted the connection). A listener whose
// owner died can outlive it briefly (an io_uring ring torn down after the process exits still holds
// the socket): connections to it are queued and later reset, never answered. So a silent one is
// asked again until it refuses connections (gone) or `wait` ends (silent).
Result<SocketProbe> probe_unix_socket(const sockaddr_un& addr, socklen_t addr_len, std::chrono::milliseconds wait) {
    using clock = std::chrono::steady_clock;
    const auto deadline = clock::now() + wait;
    constexpr int kMaxRounds = 200;  // bounded whatever the clock does
    for (int round = 0; round < kMaxRounds; ++round) {
        UniqueFd probe(::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
        if (!probe.valid()) return sys_error("socket", errno);
        if (::connect(probe.get(), reinterpret_cast<const sockaddr*>(&addr), addr_len) != 0) {
            const int err = errno;
            if (err == ECONNREFUSED || err == ENOENT) return SocketProbe::Gone;
            if (err != EAGAIN && err != EINPROGRESS) return sys_error("connect", err);
            // EAGAIN: the backlog is full, so something holds it; ask again below.
        } else {
            static constexpr char kRequest[] = "GET / HTTP/1.0\r\n\r\n";
            (void)::send(probe.get(), kRequest, sizeof kRequest - 1, MSG_NOSIGNAL);
            pollfd p{probe.get(), POLLIN, 0};
            if (::poll(&p, 1, 200) == 1) {
                char c;
                const ssize_t n = ::recv(probe.get(), &c, 1, 0);
                if (n >= 0) return SocketProbe::Answers;  // a reply, or an orderly close
                // ECONNRESET: the listener went away with our connection still queued.
            }
        }
        if (clock::now() >= deadline) return SocketProbe::Silent;
        ::usleep(50'000);
    }
    return SocketProbe::Silent;
}

}  // namespace

Status HttpServer::listen_unix(const std::string& path, mode_t mode, std::optional<gid_t> group) {
    auto& d = *impl_;
    if (d.stopping) return Error{std::make_error_code(std::errc::invalid_argument), "server stopped"};
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    if (path.empty() || path.size() >= sizeof addr.sun_path) {
        return Error{std::make_error_code(std::errc::filename_too_long), "bad Unix socket path: " + path};
    }
    std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
    const auto addr_len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + path.size() + 1);

    struct stat st{};
    if (::lstat(path.c_str(), &st) == 0) {
        if (!S_ISSOCK(st.st_mode)) {
            return Error{std::make_error_code(std::errc::file_exists), path + " exists and is not a socket"};
        }
        auto live = probe_unix_socket(addr, addr_len, d.opt.takeover_wait);
        if (!live) return Error{live.error().code, "checking existing socket " + path + ": " + live.error().message};
        if (*live != SocketProbe::Gone) {
            return Error{std::make_error_code(std::errc::address_in_use),
                         *live == SocketProbe::Answers
                             ? "another server is listening on " + path
                             : "another process accepts connections on " + path + " but does not answer"};
        }
        if (::unlink(path.c_str()) != 0 && errno != ENOENT) return sys_error("removing stale socket " + path, errno);
    } else if (errno != ENOENT) {
        return sys_error("lstat " + path, errno);
    }

    UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
    if (!fd.valid()) return sys_error("socket", errno);
    if (::bind(fd.get(), reinterpret_cast<const sockaddr*>(&addr), addr_len) != 0) {
        return sys_error("bind " + path, errno);
    }
    // Mode and group before listen(): until then a connect is refused, so no one gets in through
    // the umask-derived mode bind() created the file with.
    auto undo = [&](const std::string& what, int err) {
        ::unlink(path.c_str());
        return sys_error(what, err);
    };
    if (::chmod(path.c_str(), mode) != 0) return undo("chmod " + path, errno);
    if (group && ::chown(path.c_str(), static_cast<uid_t>(-1), *group) != 0) return undo("chown " + path, errno);
    auto st_ok = d.add_listener(std::move(fd), true, path);
    if (!st_ok) ::unlink(path.c_str());
    return st_ok;
}

Status HttpServer::listen_tcp(const std::string& host, uint16_t port) {
    auto& d = *impl_;
    if (d.stopping) return Error{std::make_error_code(std::errc::invalid_argument), "server stopped"};
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    addrinfo* res = nullptr;
    const std::string service = std::to_string(port);
    const int gai = ::getaddrinfo(host.empty() ? nullptr : host.c_str(), service.c_str(), &hints, &res);
    if (gai != 0 || res == nullptr) {
        return Error{std::make_error_code(std::errc::invalid_argument),
                     "cannot resolve " + host + ": " + ::gai_strerror(gai)};
    }
    std::unique_ptr<addrinfo, decltype(&::freeaddrinfo)> guard(res, &::freeaddrinfo);
    UniqueFd fd(::socket(res->ai_family, res->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, res->ai_protocol));
    if (!fd.valid()) return sys_error("socket", errno);
    const int one = 1;
    (void)::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    // EADDRINUSE on a fixed port may be a listener whose process is gone but whose io_uring is not
    // torn down yet (see takeover_wait): asked again until the wait ends.
    const auto bind_deadline = std::chrono::steady_clock::now() + d.opt.takeover_wait;
    for (int attempt = 0;; ++attempt) {
        if (::bind(fd.get(), res->ai_addr, res->ai_addrlen) == 0) break;
        const int err = errno;
        if (err != EADDRINUSE || port == 0 || attempt >= 200 || std::chrono::steady_clock::now() >= bind_deadline) {
            return sys_error("bind " + host + ":" + service, err);
        }
        ::usleep(50'000);
    }
    sockaddr_storage ss{};
    socklen_t len = sizeof ss;
    if (::getsockname(fd.get(), reinterpret_cast<sockaddr*>(&ss), &len) != 0) return sys_error("getsockname", errno);
    uint16_t bound = 0;
    if (ss.ss_family == AF_INET) bound = ntohs(reinterpret_cast<const sockaddr_in*>(&ss)->sin_port);
    if (ss.ss_family == AF_INET6) bound = ntohs(reinterpret_cast<const sockaddr_in6*>(&ss)->sin6_port);
    auto st = d.add_listener(std::move(fd), false, {});
    if (st) d.tcp_port = bound;
    return st;
}

uint16_t HttpServer::tcp_port() const noexcept { return impl_->tcp_port; }

void HttpServer::stop() {
    auto& d = *impl_;
    if (d.stopping) return;
    d.stopping = true;
    d.close_listeners();
    if (d.accept_retry) d.loop.cancel_timer(std::exchange(d.accept_retry, {}));
    std::vector<std::shared_ptr<Impl::Conn>> all;
    all.reserve(d.conns.size());
    for (auto& [id, c] : d.conns) all.push_back(c);
    for (auto& c : all) {
        const bool idle = c->state == Impl::Conn::State::idle && c->in_pos == c->in_len && c->out_pos == c->out.size();
        if (idle) {
            c->close();
        } else {
            c->close_after = true;
        }
    }
}

size_t HttpServer::connections() const noexcept { return impl_->conns.size(); }

}  // namespace netio
