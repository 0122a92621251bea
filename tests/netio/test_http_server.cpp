#include "tests/netio/test_http_server.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <system_error>

namespace testsrv {

namespace {

uint64_t splitmix64(uint64_t x) noexcept {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

std::string lower(std::string_view s) {
    std::string out(s);
    for (auto& c : out) c = static_cast<char>((c >= 'A' && c <= 'Z') ? c + 32 : c);
    return out;
}

std::string_view trim(std::string_view s) {
    while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
    while (!s.empty() && (s.back() == ' ' || s.back() == '\t' || s.back() == '\r')) s.remove_suffix(1);
    return s;
}

std::string percent_decode(std::string_view s) {
    std::string out;
    for (size_t i = 0; i < s.size(); ++i) {
        if (s[i] == '%' && i + 2 < s.size()) {
            out += static_cast<char>(std::stoi(std::string(s.substr(i + 1, 2)), nullptr, 16));
            i += 2;
        } else if (s[i] == '+') {
            out += ' ';
        } else {
            out += s[i];
        }
    }
    return out;
}

// Value of query parameter `name` in `target` ("" when absent).
std::string query_param(std::string_view target, std::string_view name) {
    const size_t q = target.find('?');
    if (q == std::string_view::npos) return {};
    std::string_view rest = target.substr(q + 1);
    while (!rest.empty()) {
        const size_t amp = rest.find('&');
        const std::string_view kv = rest.substr(0, amp);
        const size_t eq = kv.find('=');
        if (kv.substr(0, eq) == name) return eq == std::string_view::npos ? std::string() : percent_decode(kv.substr(eq + 1));
        if (amp == std::string_view::npos) break;
        rest.remove_prefix(amp + 1);
    }
    return {};
}

uint64_t to_u64(const std::string& s, uint64_t dflt) {
    if (s.empty()) return dflt;
    return std::stoull(s);
}

const char* reason(int status) {
    switch (status) {
    case 200: return "OK";
    case 206: return "Partial Content";
    case 301: return "Moved Permanently";
    case 302: return "Found";
    case 303: return "See Other";
    case 307: return "Temporary Redirect";
    case 308: return "Permanent Redirect";
    case 400: return "Bad Request";
    case 404: return "Not Found";
    case 416: return "Range Not Satisfiable";
    default: return "Status";
    }
}

class Conn {
public:
    explicit Conn(int fd) : fd_(fd) {}

    bool read_more() {
        char tmp[64 * 1024];
        for (;;) {
            const ssize_t n = ::recv(fd_, tmp, sizeof tmp, 0);
            if (n < 0 && errno == EINTR) continue;
            if (n <= 0) return false;
            buf_.append(tmp, static_cast<size_t>(n));
            return true;
        }
    }

    bool send_all(const char* p, size_t n) {
        while (n > 0) {
            const ssize_t r = ::send(fd_, p, n, MSG_NOSIGNAL);
            if (r < 0 && errno == EINTR) continue;
            if (r <= 0) return false;
            p += r;
            n -= static_cast<size_t>(r);
        }
        return true;
    }
    bool send_all(std::string_view s) { return send_all(s.data(), s.size()); }

    // Reads until "\r\n\r\n"; returns the head without it, false on EOF/error.
    bool read_head(std::string& head) {
        for (;;) {
            const size_t end = buf_.find("\r\n\r\n");
            if (end != std::string::npos) {
                head = buf_.substr(0, end);
                buf_.erase(0, end + 4);
                return true;
            }
            if (buf_.size() > 256 * 1024) return false;
            if (!read_more()) return false;
        }
    }

    // Reads exactly n body bytes, feeding them to `fn(const char*, size_t)`.
    template <class Fn>
    bool read_exact(uint64_t n, Fn&& fn) {
        while (n > 0) {
            if (buf_.empty() && !read_more()) return false;
            const size_t take = static_cast<size_t>(std::min<uint64_t>(n, buf_.size()));
            fn(buf_.data(), take);
            buf_.erase(0, take);
            n -= take;
        }
        return true;
    }

    bool read_line(std::string& line) {
        for (;;) {
            const size_t end = buf_.find("\r\n");
            if (end != std::string::npos) {
                line = buf_.substr(0, end);
                buf_.erase(0, end + 2);
                return true;
            }
            if (!read_more()) return false;
        }
    }

    // Chunked transfer coding.
    template <class Fn>
    bool read_chunked(Fn&& fn) {
        for (;;) {
            std::string line;
            if (!read_line(line)) return false;
            const uint64_t size = std::stoull(line, nullptr, 16);
            if (size == 0) {
                // Trailers until an empty line.
                for (;;) {
                    if (!read_line(line)) return false;
                    if (line.empty()) return true;
                }
            }
            if (!read_exact(size, fn)) return false;
            if (!read_line(line)) return false;
        }
    }

private:
    int fd_;
    std::string buf_;
};

}  // namespace

uint8_t pattern_byte(uint64_t seed, uint64_t i) noexcept {
    return static_cast<uint8_t>(splitmix64(seed * 0x100000001b3ull ^ (i / 8)) >> (8 * (i % 8)));
}

void fill_pattern(uint64_t seed, uint64_t offset, char* buf, size_t n) noexcept {
    size_t k = 0;
    // Head up to an 8-byte boundary, whole words, tail.
    while (k < n && (offset + k) % 8 != 0) {
        buf[k] = static_cast<char>(pattern_byte(seed, offset + k));
        ++k;
    }
    while (k + 8 <= n) {
        const uint64_t w = splitmix64(seed * 0x100000001b3ull ^ ((offset + k) / 8));
        for (int b = 0; b < 8; ++b) buf[k + static_cast<size_t>(b)] = static_cast<char>(w >> (8 * b));
        k += 8;
    }
    while (k < n) {
        buf[k] = static_cast<char>(pattern_byte(seed, offset + k));
        ++k;
    }
}

uint64_t fnv1a(uint64_t h, const char* p, size_t n) noexcept {
    for (size_t i = 0; i < n; ++i) {
        h ^= static_cast<uint8_t>(p[i]);
        h *= 0x100000001b3ull;
    }
    return h;
}

std::string LoggedRequest::header(std::string_view name) const {
    const std::string n = lower(name);
    for (const auto& [k, v] : headers) {
        if (k == n) return v;
    }
    return {};
}

TestHttpServer::TestHttpServer() {
    listen_fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (listen_fd_ < 0) throw std::system_error(errno, std::system_category(), "socket");
    const int one = 1;
    ::setsockopt(listen_fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = 0;
    if (::bind(listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 || ::listen(listen_fd_, 1024) != 0) {
        const int err = errno;
        ::close(listen_fd_);
        throw std::system_error(err, std::system_category(), "bind/listen");
    }
    socklen_t len = sizeof addr;
    ::getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&addr), &len);
    port_ = ntohs(addr.sin_port);
    acceptor_ = std::thread([this] { accept_loop(); });
}

TestHttpServer::~TestHttpServer() { stop(); }

std::string TestHttpServer::url(std::string_view path) const {
    return "http://127.0.0.1:" + std::to_string(port_) + std::string(path);
}

std::string TestHttpServer::url_localhost(std::string_view path) const {
    return "http://localhost:" + std::to_string(port_) + std::string(path);
}

std::vector<LoggedRequest> TestHttpServer::requests() const {
    std::lock_guard lock(mu_);
    return log_;
}

void TestHttpServer::stop() {
    if (stopping_.exchange(true)) return;
    {
        std::lock_guard lock(mu_);
        stop_cv_.notify_all();
        for (int fd : open_fds_) ::shutdown(fd, SHUT_RDWR);
    }
    ::shutdown(listen_fd_, SHUT_RDWR);
    if (acceptor_.joinable()) acceptor_.join();
    std::vector<std::thread> workers;
    {
        std::lock_guard lock(mu_);
        workers.swap(workers_);
        for (int fd : open_fds_) ::shutdown(fd, SHUT_RDWR);
    }
    for (auto& t : workers) t.join();
    ::close(listen_fd_);
    listen_fd_ = -1;
}

void TestHttpServer::accept_loop() {
    while (!stopping_.load()) {
        const int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED) continue;
            return;
        }
        accepted_.fetch_add(1);
        const int one = 1;
        ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        std::lock_guard lock(mu_);
        if (stopping_.load()) {
            ::close(fd);
            return;
        }
        open_fds_.push_back(fd);
        workers_.emplace_back([this, fd] {
            serve(fd);
            unregister_fd(fd);
        });
    }
}

void TestHttpServer::unregister_fd(int fd) {
    std::lock_guard lock(mu_);
    open_fds_.erase(std::remove(open_fds_.begin(), open_fds_.end(), fd), open_fds_.end());
    ::close(fd);
}

bool TestHttpServer::wait_stop_for_ms(int ms) {
    std::unique_lock lock(mu_);
    return stop_cv_.wait_for(lock, std::chrono::milliseconds(ms), [this] { return stopping_.load(); });
}

void TestHttpServer::serve(int fd) {
    Conn c(fd);
    for (;;) {
        std::string head;
        if (!c.read_head(head)) return;
        LoggedRequest req;
        size_t pos = head.find("\r\n");
        const std::string_view request_line = std::string_view(head).substr(0, pos);
        const size_t sp1 = request_line.find(' ');
        const size_t sp2 = request_line.rfind(' ');
        if (sp1 == std::string_view::npos || sp2 == sp1) return;
        req.method = std::string(request_line.substr(0, sp1));
        req.target = std::string(request_line.substr(sp1 + 1, sp2 - sp1 - 1));
        while (pos != std::string::npos) {
            const size_t start = pos + 2;
            pos = head.find("\r\n", start);
            const std::string_view line = std::string_view(head).substr(start, pos == std::string::npos ? std::string::npos : pos - start);
            const size_t colon = line.find(':');
            if (colon == std::string_view::npos) continue;
            req.headers.emplace_back(lower(trim(line.substr(0, colon))), std::string(trim(line.substr(colon + 1))));
        }
        {
            std::lock_guard lock(mu_);
            log_.push_back(req);
        }

        const std::string cl = req.header("content-length");
        const std::string te = req.header("transfer-encoding");
        const bool chunked = lower(te).find("chunked") != std::string::npos;
        uint64_t body_len = 0;
        uint64_t body_fnv = kFnvInit;
        auto consume = [&](const char* p, size_t n) {
            body_len += n;
            body_fnv = fnv1a(body_fnv, p, n);
        };
        const bool body_ok = chunked ? c.read_chunked(consume) : c.read_exact(to_u64(cl, 0), consume);
        if (!body_ok) return;

        const bool head_only = req.method == "HEAD";
        const bool keep_alive = lower(req.header("connection")) != "close";
        const std::string path = req.target.substr(0, req.target.find('?'));

        auto respond = [&](int status, const std::string& extra_headers, std::string_view body) {
            std::string out = "HTTP/1.1 " + std::to_string(status) + " " + reason(status) + "\r\n";
            out += "Content-Length: " + std::to_string(body.size()) + "\r\n";
            out += extra_headers;
            if (!keep_alive) out += "Connection: close\r\n";
            out += "\r\n";
            if (!head_only) out += body;
            return c.send_all(out);
        };

        if (path == "/bytes") {
            const uint64_t n = to_u64(query_param(req.target, "n"), 0);
            const uint64_t seed = to_u64(query_param(req.target, "seed"), 0);
            uint64_t first = 0;
            uint64_t last = n == 0 ? 0 : n - 1;
            int status = 200;
            std::string extra = "X-Final: yes\r\nContent-Type: application/octet-stream\r\n";
            const std::string range = req.header("range");
            if (!range.empty() && range.rfind("bytes=", 0) == 0) {
                const std::string spec = range.substr(6);
                const size_t dash = spec.find('-');
                first = std::stoull(spec.substr(0, dash));
                if (dash + 1 < spec.size()) last = std::min<uint64_t>(std::stoull(spec.substr(dash + 1)), n - 1);
                if (first > last || first >= n) {
                    if (!respond(416, "Content-Range: bytes */" + std::to_string(n) + "\r\n", "")) return;
                    continue;
                }
                status = 206;
                extra += "Content-Range: bytes " + std::to_string(first) + "-" + std::to_string(last) + "/" +
                         std::to_string(n) + "\r\n";
            }
            const uint64_t len = n == 0 ? 0 : last - first + 1;
            std::string out = "HTTP/1.1 " + std::to_string(status) + " " + reason(status) + "\r\n";
            out += "Content-Length: " + std::to_string(len) + "\r\n" + extra;
            if (!keep_alive) out += "Connection: close\r\n";
            out += "\r\n";
            if (!c.send_all(out)) return;
            if (!head_only) {
                std::vector<char> chunk(256 * 1024);
                uint64_t off = first;
                uint64_t left = len;
                while (left > 0) {
                    const size_t k = static_cast<size_t>(std::min<uint64_t>(left, chunk.size()));
                    fill_pattern(seed, off, chunk.data(), k);
                    if (!c.send_all(chunk.data(), k)) return;
                    off += k;
                    left -= k;
                }
            }
            // then_close=1: drop the connection silently after the response (no "Connection: close").
            if (query_param(req.target, "then_close") == "1") return;
        } else if (path == "/redirect") {
            std::string to = query_param(req.target, "to");
            if (to.empty()) to = "/redirect";
            const int code = static_cast<int>(to_u64(query_param(req.target, "code"), 302));
            if (!respond(code, "Location: " + to + "\r\nX-Hop: 1\r\n", "redirect body, to be ignored")) return;
        } else if (path == "/echo-headers") {
            std::string body;
            for (const auto& [k, v] : req.headers) body += k + ": " + v + "\n";
            if (!respond(200, "", body)) return;
        } else if (path == "/upload") {
            char hex[17];
            std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(body_fnv));
            const std::string expect = req.header("expect");
            const std::string body = "len=" + std::to_string(body_len) + " fnv=" + hex + " cl=" + (cl.empty() ? "none" : cl) +
                                     " te=" + (te.empty() ? "none" : te) + " expect=" + (expect.empty() ? "none" : expect);
            if (!respond(200, "", body)) return;
        } else if (path == "/stall") {
            wait_stop_for_ms(20000);
            return;
        } else if (path == "/close-mid") {
            const uint64_t n = to_u64(query_param(req.target, "n"), 1000000);
            std::string out = "HTTP/1.1 200 OK\r\nContent-Length: " + std::to_string(n) + "\r\n\r\n";
            if (!c.send_all(out)) return;
            std::vector<char> data(static_cast<size_t>(n / 2));
            fill_pattern(0, 0, data.data(), data.size());
            c.send_all(data.data(), data.size());
            return;
        } else {
            if (!respond(404, "", "not found")) return;
        }
        if (!keep_alive) return;
    }
}

}  // namespace testsrv
