// A small HTTP/1.1 server for the netio tests: blocking sockets on 127.0.0.1 (port 0), one thread
// per connection, keep-alive. It counts accepted connections so tests can check connection reuse.
//
// Routes (any method unless noted; HEAD answers like GET without the body):
//   /bytes?n=N&seed=S          N pattern bytes (pattern_byte); honours "Range: bytes=a-b" (206);
//                              with then_close=1 the connection is closed afterwards, unannounced
//   /redirect?to=URL&code=C    C (default 302) with Location: URL (percent-decoded; default: itself)
//                              and a small body
//   /echo-headers              the request headers, one "lowercased-name: value\n" per line
//   /upload                    consumes the body; answers "len=N fnv=HEX cl=V te=V expect=V"
//                              (cl/te/expect: the request's header values, "none" when absent)
//   /stall                     reads the request and never answers (until the server stops)
//   /close-mid?n=N             headers with Content-Length N, N/2 bytes, then closes
//   anything else              404
// Every request's method, target and headers are logged (requests()).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

namespace testsrv {

// Deterministic test data: byte i of stream `seed`.
uint8_t pattern_byte(uint64_t seed, uint64_t i) noexcept;
void fill_pattern(uint64_t seed, uint64_t offset, char* buf, size_t n) noexcept;

// FNV-1a 64, chainable: start with kFnvInit.
constexpr uint64_t kFnvInit = 0xcbf29ce484222325ull;
uint64_t fnv1a(uint64_t h, const char* p, size_t n) noexcept;

struct LoggedRequest {
    std::string method;
    std::string target;
    std::vector<std::pair<std::string, std::string>> headers;  // names lowercased
    std::string header(std::string_view name) const;             // "" when absent
};

class TestHttpServer {
public:
    TestHttpServer();
    ~TestHttpServer();
    TestHttpServer(const TestHttpServer&) = delete;
    TestHttpServer& operator=(const TestHttpServer&) = delete;

    uint16_t port() const noexcept { return port_; }
    // "http://127.0.0.1:PORT" + path, or with "localhost" as the host.
    std::string url(std::string_view path) const;
    std::string url_localhost(std::string_view path) const;

    size_t accepted() const noexcept { return accepted_.load(); }
    std::vector<LoggedRequest> requests() const;

    void stop();

private:
    void accept_loop();
    void serve(int fd);
    void unregister_fd(int fd);
    bool wait_stop_for_ms(int ms);

    int listen_fd_ = -1;
    uint16_t port_ = 0;
    std::atomic<bool> stopping_{false};
    std::atomic<size_t> accepted_{0};
    std::thread acceptor_;

    mutable std::mutex mu_;
    std::condition_variable stop_cv_;
    std::vector<std::thread> workers_;
    std::vector<int> open_fds_;
    std::vector<LoggedRequest> log_;
};

}  // namespace testsrv
