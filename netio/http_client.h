// HttpClient: a streaming HTTP client on CurlMulti.
//
// A request body comes from a string or a BodySource (its length is always known: the client sends
// an explicit Content-Length, never Transfer-Encoding: chunked, and never Expect: 100-continue).
// A response body is either collected into Response::body (no sink; bounded by max_body_bytes)
// or delivered in chunks to a BodySink, which can push back: Offer::full pauses the transfer
// (CURL_WRITEFUNC_PAUSE) until the sink's owner calls resume(id).
// Redirects are followed by curl (credentials in custom Authorization headers are dropped when the
// host changes: curl does that since 7.58). Non-2xx statuses are Responses, not errors; errors are
// transport failures (refused, reset, timeout, TLS, sink abort, body over the limit).
//
// Threading: loop thread only. Ownership: the client owns its easy handles and requests; sinks and
// sources are borrowed (sink) or shared (source) and must outlive the transfer's `done` callback.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "netio/curl_driver.h"
#include "netio/result.h"
#include "netio/uring_loop.h"

namespace netio {

using Headers = std::vector<std::pair<std::string, std::string>>;

// Case-insensitive lookup of the last header with this name ("" when absent).
std::string find_header(const Headers& headers, std::string_view name);

enum class Offer { taken, full, error };

class BodySink {
public:
    virtual ~BodySink() = default;
    // Called once the final response's status and headers are known (after redirects), before the
    // first body byte. Returning false aborts the transfer.
    virtual bool on_response_head(long status, const Headers& headers) noexcept {
        (void)status;
        (void)headers;
        return true;
    }
    // Offer a chunk. taken: consumed whole. full: nothing consumed, pause until resume(). error: abort.
    virtual Offer offer(std::span<const char> data) noexcept = 0;
    // Called by start() with a function that resumes this transfer (a no-op once it finished or the
    // client is gone), so a sink that answered Offer::full can un-pause itself later.
    virtual void attach(std::function<void()> resume) noexcept { (void)resume; }
};

class BodySource {
public:
    static constexpr long kPause = -2;
    static constexpr long kAbort = -1;
    virtual ~BodySource() = default;
    virtual uint64_t length() const noexcept = 0;
    // Fill `buf`; return the bytes written (0 only at the end), kPause (call resume() later), or kAbort.
    virtual long read(std::span<char> buf) noexcept = 0;
    // Start again from the beginning (redirects, retries). false if not possible.
    virtual bool rewind() noexcept = 0;
    // Called by start() with a function that resumes this transfer (see BodySink::attach), so a
    // source that answered kPause can un-pause itself when its data is there.
    virtual void attach(std::function<void()> resume) noexcept { (void)resume; }
};

// A body held in memory.
class StringSource final : public BodySource {
public:
    explicit StringSource(std::string s) : data_(std::move(s)) {}
    uint64_t length() const noexcept override { return data_.size(); }
    long read(std::span<char> buf) noexcept override;
    bool rewind() noexcept override { pos_ = 0; return true; }
private:
    std::string data_;
    size_t pos_ = 0;
};

// A byte range [offset, offset+length) of an open file, read with pread. The fd is borrowed.
class FileRangeSource final : public BodySource {
public:
    FileRangeSource(int fd, uint64_t offset, uint64_t length) : fd_(fd), offset_(offset), length_(length) {}
    uint64_t length() const noexcept override { return length_; }
    long read(std::span<char> buf) noexcept override;
    bool rewind() noexcept override { pos_ = 0; return true; }
private:
    int fd_;
    uint64_t offset_;
    uint64_t length_;
    uint64_t pos_ = 0;
};

struct TlsOptions {
    bool verify = true;       // verify peer and host name
    std::string ca_file;      // extra CA bundle (PEM); empty = system default
};

struct ByteRange {
    uint64_t first = 0;
    uint64_t last = 0;        // inclusive, as in the Range header
};

struct Request {
    std::string method = "GET";   // GET, HEAD, PUT, POST, PATCH, DELETE
    std::string url;
    Headers headers;
    std::string body;                         // used when body_source is null
    std::shared_ptr<BodySource> body_source;  // streamed body; its length is sent as Content-Length
    std::optional<ByteRange> range;
    bool follow_redirects = true;
    int max_redirects = 10;
    long timeout_ms = 0;              // whole transfer; 0 = none
    long connect_timeout_ms = 15000;
    long low_speed_time_s = 60;       // abort when under 1 byte/s for this long; 0 = off
    TlsOptions tls;
    size_t max_body_bytes = 32u << 20;  // when collecting into Response::body
    // SO_RCVBUF of a connection this request opens (0 = the kernel's autotuning). A small buffer
    // makes a paused receiver stop the sender within a round trip: rate caps applied by pausing
    // then hold on the wire, not only in what the application reads.
    int socket_recv_buffer_bytes = 0;
};

struct Response {
    long status = 0;
    Headers headers;           // of the final response only
    std::string effective_url; // after redirects
    std::string body;          // collected body (empty when a sink was given)
    uint64_t body_bytes = 0;   // bytes received for the final response's body
    std::string header(std::string_view name) const { return find_header(headers, name); }
};

using TransferId = uint64_t;

class HttpClient {
public:
    using DoneCallback = std::function<void(Result<Response>)>;

    explicit HttpClient(UringLoop& loop);
    ~HttpClient();  // aborts running transfers without calling their callbacks
    HttpClient(const HttpClient&) = delete;
    HttpClient& operator=(const HttpClient&) = delete;

    // Starts a transfer. `done` runs exactly once on the loop (never inside start()), unless the
    // client is destroyed first. `sink` may be null (collect the body).
    TransferId start(Request req, BodySink* sink, DoneCallback done);
    // Resumes a transfer paused by its sink or its body source.
    void resume(TransferId id);
    // Aborts a transfer; `done` runs with an ECANCELED error.
    void cancel(TransferId id);
    // Cancels every running transfer and makes later start()s fail at once with ECANCELED (their
    // `done` still runs on the loop, never inside start()). Final.
    void shutdown();

    size_t active() const noexcept;
    UringLoop& loop() noexcept;

private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

}  // namespace netio
