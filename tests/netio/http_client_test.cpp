#include "netio/http_client.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "netio/unique_fd.h"
#include "tests/netio/test_http_server.h"
#include "tests/netio/test_util.h"

using namespace std::chrono_literals;
using netio::BodySink;
using netio::BodySource;
using netio::Clock;
using netio::Headers;
using netio::HttpClient;
using netio::Offer;
using netio::Request;
using netio::Response;
using netio::Result;
using netio::TransferId;
using netio::UringLoop;
using testsrv::fill_pattern;
using testsrv::fnv1a;
using testsrv::kFnvInit;
using testutil::run_for;
using testutil::run_until;

namespace {

std::string pattern(uint64_t seed, uint64_t offset, size_t n) {
    std::string s(n, '\0');
    fill_pattern(seed, offset, s.data(), n);
    return s;
}

uint64_t pattern_fnv(uint64_t seed, uint64_t len) {
    std::vector<char> buf(1 << 20);
    uint64_t h = kFnvInit;
    for (uint64_t off = 0; off < len;) {
        const size_t n = static_cast<size_t>(std::min<uint64_t>(buf.size(), len - off));
        fill_pattern(seed, off, buf.data(), n);
        h = fnv1a(h, buf.data(), n);
        off += n;
    }
    return h;
}

std::string hex16(uint64_t v) {
    char b[17];
    std::snprintf(b, sizeof b, "%016llx", static_cast<unsigned long long>(v));
    return b;
}

std::string percent_encode(std::string_view s) {
    static const char* hex = "0123456789ABCDEF";
    std::string out;
    for (unsigned char c : s) {
        if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '_' ||
            c == '.' || c == '~') {
            out += static_cast<char>(c);
        } else {
            out += '%';
            out += hex[c >> 4];
            out += hex[c & 15];
        }
    }
    return out;
}

// Checks the body against the pattern as it streams in; can push back every `pause_every` bytes.
class VerifySink final : public BodySink {
public:
    VerifySink(uint64_t seed, uint64_t offset = 0) : seed_(seed), offset_(offset) {}

    bool on_response_head(long status, const Headers& headers) noexcept override {
        ++heads;
        status_seen = status;
        head_headers = headers;
        if (received != 0) mismatch = true;  // head must come before the first byte
        return accept_head;
    }

    Offer offer(std::span<const char> data) noexcept override {
        ++offers;
        if (heads != 1) mismatch = true;
        if (fail_offers) return Offer::error;
        if (pause_every > 0 && since_pause >= pause_every) {
            since_pause = 0;
            ++pauses;
            if (on_full) on_full();
            return Offer::full;
        }
        if (on_offer) on_offer();
        scratch_.resize(std::max(scratch_.size(), data.size()));
        fill_pattern(seed_, offset_ + received, scratch_.data(), data.size());
        if (std::memcmp(scratch_.data(), data.data(), data.size()) != 0) mismatch = true;
        received += data.size();
        since_pause += data.size();
        return Offer::taken;
    }

    int heads = 0;
    long status_seen = 0;
    Headers head_headers;
    long offers = 0;
    uint64_t received = 0;
    bool mismatch = false;
    bool accept_head = true;
    bool fail_offers = false;
    uint64_t pause_every = 0;
    uint64_t since_pause = 0;
    int pauses = 0;
    std::function<void()> on_full;
    std::function<void()> on_offer;

private:
    uint64_t seed_;
    uint64_t offset_;
    std::vector<char> scratch_;
};

// A generated request body; can pause every `pause_every` bytes.
class PatternSource final : public BodySource {
public:
    PatternSource(uint64_t seed, uint64_t len) : seed_(seed), len_(len) {}
    uint64_t length() const noexcept override { return len_; }
    long read(std::span<char> buf) noexcept override {
        if (pause_every > 0 && since_pause >= pause_every) {
            since_pause = 0;
            ++pauses;
            if (on_pause) on_pause();
            return kPause;
        }
        const size_t n = static_cast<size_t>(std::min<uint64_t>(buf.size(), len_ - pos_));
        fill_pattern(seed_, pos_, buf.data(), n);
        pos_ += n;
        since_pause += n;
        return static_cast<long>(n);
    }
    bool rewind() noexcept override {
        ++rewinds;
        pos_ = 0;
        since_pause = 0;
        return true;
    }

    uint64_t pause_every = 0;
    uint64_t since_pause = 0;
    int pauses = 0;
    int rewinds = 0;
    std::function<void()> on_pause;

private:
    uint64_t seed_;
    uint64_t len_;
    uint64_t pos_ = 0;
};

class HttpClientTest : public ::testing::Test {
protected:
    testsrv::TestHttpServer server;
    UringLoop loop;
    std::unique_ptr<HttpClient> client = std::make_unique<HttpClient>(loop);

    // Runs one transfer to completion (bounded); asserts done ran exactly once and not in start().
    Result<Response> fetch(Request req, BodySink* sink = nullptr, std::chrono::milliseconds limit = 20s) {
        std::optional<Result<Response>> out;
        int calls = 0;
        bool in_start = true;
        bool called_in_start = false;
        client->start(std::move(req), sink, [&](Result<Response> r) {
            ++calls;
            if (in_start) called_in_start = true;
            out.emplace(std::move(r));
        });
        in_start = false;
        EXPECT_FALSE(called_in_start);
        if (!run_until(loop, [&] { return out.has_value(); }, limit)) {
            ADD_FAILURE() << "transfer did not finish in time";
            return netio::Error::make("test: no result");
        }
        EXPECT_EQ(calls, 1);
        return std::move(*out);
    }

    static Request get(std::string url) {
        Request r;
        r.url = std::move(url);
        return r;
    }
};

}  // namespace

TEST(HttpHelpers, FindHeaderIsCaseInsensitiveAndTakesTheLast) {
    Headers h{{"Content-Type", "a"}, {"X-Y", "1"}, {"content-type", "b"}};
    EXPECT_EQ(netio::find_header(h, "CONTENT-TYPE"), "b");
    EXPECT_EQ(netio::find_header(h, "x-y"), "1");
    EXPECT_EQ(netio::find_header(h, "missing"), "");
    EXPECT_EQ(netio::find_header(h, "X-Z"), "");
}

TEST(HttpHelpers, StringAndFileRangeSources) {
    netio::StringSource s("hello world");
    char buf[4];
    std::string got;
    for (long n; (n = s.read(buf)) > 0;) got.append(buf, static_cast<size_t>(n));
    EXPECT_EQ(got, "hello world");
    EXPECT_TRUE(s.rewind());
    EXPECT_EQ(s.read(buf), 4);

    char path[] = "/tmp/netio-range-XXXXXX";
    netio::UniqueFd fd(::mkstemp(path));
    ASSERT_TRUE(fd.valid());
    ::unlink(path);
    const std::string data = pattern(3, 0, 10000);
    ASSERT_EQ(::write(fd.get(), data.data(), data.size()), static_cast<ssize_t>(data.size()));
    netio::FileRangeSource fr(fd.get(), 1000, 5000);
    EXPECT_EQ(fr.length(), 5000u);
    std::string r;
    std::vector<char> big(3000);
    for (long n; (n = fr.read(big)) > 0;) r.append(big.data(), static_cast<size_t>(n));
    EXPECT_EQ(r, data.substr(1000, 5000));
    EXPECT_TRUE(fr.rewind());
    EXPECT_EQ(fr.read(big), 3000);
    // A range past the end of the file is an error, not a silent short body.
    netio::FileRangeSource past(fd.get(), 9000, 5000);
    std::vector<char> b2(8000);
    EXPECT_EQ(past.read(b2), 1000);
    EXPECT_EQ(past.read(b2), BodySource::kAbort);
}

TEST_F(HttpClientTest, GetSmallBody) {
    auto r = fetch(get(server.url("/bytes?n=1000&seed=7")));
    ASSERT_TRUE(r.ok()) << r.error().message;
    EXPECT_EQ(r->status, 200);
    EXPECT_EQ(r->body, pattern(7, 0, 1000));
    EXPECT_EQ(r->body_bytes, 1000u);
    EXPECT_EQ(r->header("x-final"), "yes");
    EXPECT_EQ(r->header("Content-Length"), "1000");
    EXPECT_EQ(r->effective_url, server.url("/bytes?n=1000&seed=7"));
}

TEST_F(HttpClientTest, NonSuccessStatusIsAResponse) {
    auto r = fetch(get(server.url("/nothing-here")));
    ASSERT_TRUE(r.ok()) << r.error().message;
    EXPECT_EQ(r->status, 404);
    EXPECT_EQ(r->body, "not found");
}

TEST_F(HttpClientTest, GetLargeBodyThroughSink) {
    constexpr uint64_t kSize = 64ull << 20;
    VerifySink sink(11);
    const auto start = Clock::now();
    auto r = fetch(get(server.url("/bytes?n=" + std::to_string(kSize) + "&seed=11")), &sink);
    ASSERT_TRUE(r.ok()) << r.error().message;
    EXPECT_EQ(r->status, 200);
    EXPECT_EQ(sink.heads, 1);
    EXPECT_EQ(sink.status_seen, 200);
    EXPECT_EQ(sink.received, kSize);
    EXPECT_EQ(r->body_bytes, kSize);
    EXPECT_TRUE(r->body.empty());
    EXPECT_FALSE(sink.mismatch);
    std::printf("64 MiB GET through a sink: %.0f ms\n",
                std::chrono::duration<double, std::milli>(Clock::now() - start).count());
}

TEST_F(HttpClientTest, GetCollectedBodyOfSeveralMegabytes) {
    constexpr size_t kSize = 5 << 20;
    auto r = fetch(get(server.url("/bytes?n=" + std::to_string(kSize) + "&seed=5")));
    ASSERT_TRUE(r.ok()) << r.error().message;
    EXPECT_EQ(r->body.size(), kSize);
    EXPECT_TRUE(r->body == pattern(5, 0, kSize));
}

TEST_F(HttpClientTest, CollectedBodyOverTheLimitFails) {
    Request req = get(server.url("/bytes?n=5000"));
    req.max_body_bytes = 1000;
    auto r = fetch(std::move(req));
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.error().code, std::make_error_code(std::errc::value_too_large));
    EXPECT_NE(r.error().message.find("1000"), std::string::npos) << r.error().message;
}

TEST_F(HttpClientTest, HundredsOfConcurrentTransfers) {
    constexpr int kCount = 300;
    std::vector<std::optional<Result<Response>>> results(kCount);
    int done = 0;
    for (int i = 0; i < kCount; ++i) {
        const size_t n = static_cast<size_t>((i * 7919) % 65536 + 1);
        client->start(get(server.url("/bytes?n=" + std::to_string(n) + "&seed=" + std::to_string(i))), nullptr,
                      [&, i](Result<Response> r) {
                          results[static_cast<size_t>(i)].emplace(std::move(r));
                          ++done;
                      });
    }
    EXPECT_EQ(client->active(), static_cast<size_t>(kCount));
    ASSERT_TRUE(run_until(loop, [&] { return done == kCount; }, 30s)) << done << " of " << kCount;
    for (int i = 0; i < kCount; ++i) {
        auto& r = *results[static_cast<size_t>(i)];
        ASSERT_TRUE(r.ok()) << i << ": " << r.error().message;
        const size_t n = static_cast<size_t>((i * 7919) % 65536 + 1);
        EXPECT_EQ(r->status, 200);
        ASSERT_EQ(r->body.size(), n) << i;
        EXPECT_TRUE(r->body == pattern(static_cast<uint64_t>(i), 0, n)) << i;
    }
    EXPECT_EQ(client->active(), 0u);
}

TEST_F(HttpClientTest, SinkPushBackPausesAndResumeContinues) {
    constexpr uint64_t kSize = 16ull << 20;
    VerifySink sink(21);
    sink.pause_every = 1 << 20;
    TransferId id = 0;
    bool paused_now = false;
    sink.on_full = [&] {
        EXPECT_FALSE(paused_now);
        paused_now = true;
        loop.add_timer(2ms, [&] {
            paused_now = false;
            client->resume(id);
        });
    };
    sink.on_offer = [&] {
        if (paused_now) sink.mismatch = true;  // data while we said full and before resume
    };
    std::optional<Result<Response>> out;
    id = client->start(get(server.url("/bytes?n=" + std::to_string(kSize) + "&seed=21")), &sink,
                       [&](Result<Response> r) { out.emplace(std::move(r)); });
    ASSERT_TRUE(run_until(loop, [&] { return out.has_value(); }, 20s));
    ASSERT_TRUE(out->ok()) << out->error().message;
    EXPECT_EQ(sink.received, kSize);
    EXPECT_FALSE(sink.mismatch);
    EXPECT_GE(sink.pauses, 10);
    EXPECT_EQ((*out)->body_bytes, kSize);
}

TEST_F(HttpClientTest, SinkErrorAbortsTheTransfer) {
    VerifySink sink(1);
    sink.fail_offers = true;
    auto r = fetch(get(server.url("/bytes?n=100000")), &sink);
    ASSERT_FALSE(r.ok());
    EXPECT_NE(r.error().message.find("sink"), std::string::npos) << r.error().message;
}

TEST_F(HttpClientTest, SinkRejectingTheHeadAbortsTheTransfer) {
    VerifySink sink(1);
    sink.accept_head = false;
    auto r = fetch(get(server.url("/bytes?n=100000")), &sink);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(sink.offers, 0);
}

TEST_F(HttpClientTest, UploadFromBodySourceWithContentLength) {
    constexpr uint64_t kSize = 40ull << 20;
    auto src = std::make_shared<PatternSource>(33, kSize);
    TransferId id = 0;
    src->pause_every = 4 << 20;
    src->on_pause = [&] { loop.add_timer(1ms, [&] { client->resume(id); }); };
    Request req;
    req.method = "PUT";
    req.url = server.url("/upload");
    req.body_source = src;
    std::optional<Result<Response>> out;
    const auto start = Clock::now();
    id = client->start(std::move(req), nullptr, [&](Result<Response> r) { out.emplace(std::move(r)); });
    ASSERT_TRUE(run_until(loop, [&] { return out.has_value(); }, 20s));
    ASSERT_TRUE(out->ok()) << out->error().message;
    EXPECT_EQ((*out)->status, 200);
    EXPECT_EQ((*out)->body, "len=" + std::to_string(kSize) + " fnv=" + hex16(pattern_fnv(33, kSize)) +
                                " cl=" + std::to_string(kSize) + " te=none expect=none");
    EXPECT_GE(src->pauses, 5);
    std::printf("40 MiB PUT from a source: %.0f ms\n",
                std::chrono::duration<double, std::milli>(Clock::now() - start).count());
    auto log = server.requests();
    ASSERT_FALSE(log.empty());
    EXPECT_EQ(log.back().method, "PUT");
}

TEST_F(HttpClientTest, MethodsAndSmallBodies) {
    struct Case {
        std::string method;
        std::string body;
        std::string expect_cl;
    };
    const Case cases[] = {
        {"POST", "", "0"},      {"PUT", "", "0"},          {"POST", "hello", "5"},
        {"PATCH", "abc", "3"},  {"DELETE", "", "none"},    {"get", "", "none"},
    };
    for (const auto& c : cases) {
        Request req;
        req.method = c.method;
        req.url = server.url("/upload");
        req.body = c.body;
        auto r = fetch(std::move(req));
        ASSERT_TRUE(r.ok()) << c.method << ": " << r.error().message;
        EXPECT_EQ(r->body, "len=" + std::to_string(c.body.size()) + " fnv=" +
                               hex16(fnv1a(kFnvInit, c.body.data(), c.body.size())) + " cl=" + c.expect_cl +
                               " te=none expect=none")
            << c.method;
        auto log = server.requests();
        std::string upper = c.method;
        for (auto& ch : upper) ch = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
        EXPECT_EQ(log.back().method, upper);
        if (c.body.empty()) {
            EXPECT_EQ(log.back().header("content-type"), "");
        }
    }
}

TEST_F(HttpClientTest, RangeRequest) {
    Request req = get(server.url("/bytes?n=10000&seed=4"));
    req.range = netio::ByteRange{1000, 1999};
    auto r = fetch(std::move(req));
    ASSERT_TRUE(r.ok()) << r.error().message;
    EXPECT_EQ(r->status, 206);
    EXPECT_EQ(r->header("content-range"), "bytes 1000-1999/10000");
    EXPECT_EQ(r->body, pattern(4, 1000, 1000));

    // Through a sink, with the offset the sink expects.
    VerifySink sink(4, 9000);
    Request req2 = get(server.url("/bytes?n=10000&seed=4"));
    req2.range = netio::ByteRange{9000, 9999};
    auto r2 = fetch(std::move(req2), &sink);
    ASSERT_TRUE(r2.ok()) << r2.error().message;
    EXPECT_EQ(sink.status_seen, 206);
    EXPECT_EQ(sink.received, 1000u);
    EXPECT_FALSE(sink.mismatch);
}

TEST_F(HttpClientTest, RedirectOnTheSameHostIsFollowedWithFinalHeadersOnly) {
    Request req = get(server.url("/redirect?to=" + percent_encode("/bytes?n=3000&seed=9")));
    req.headers.emplace_back("Authorization", "Bearer same-host-token");
    VerifySink sink(9);
    auto r = fetch(std::move(req), &sink);
    ASSERT_TRUE(r.ok()) << r.error().message;
    EXPECT_EQ(r->status, 200);
    EXPECT_EQ(r->effective_url, server.url("/bytes?n=3000&seed=9"));
    EXPECT_EQ(r->header("x-final"), "yes");
    EXPECT_EQ(r->header("x-hop"), "");
    EXPECT_EQ(r->header("location"), "");
    EXPECT_EQ(sink.heads, 1);
    EXPECT_EQ(sink.status_seen, 200);
    EXPECT_EQ(netio::find_header(sink.head_headers, "x-hop"), "");
    EXPECT_EQ(sink.received, 3000u);
    EXPECT_FALSE(sink.mismatch);
    auto log = server.requests();
    ASSERT_EQ(log.size(), 2u);
    EXPECT_EQ(log[1].header("authorization"), "Bearer same-host-token");
    EXPECT_EQ(server.accepted(), 1u);  // same connection for both hops
}

TEST_F(HttpClientTest, RedirectToAnotherHostDropsAuthorization) {
    Request req = get(server.url("/redirect?to=" + percent_encode(server.url_localhost("/echo-headers"))));
    req.headers.emplace_back("Authorization", "Bearer secret-token");
    auto r = fetch(std::move(req));
    ASSERT_TRUE(r.ok()) << r.error().message;
    EXPECT_EQ(r->status, 200);
    EXPECT_EQ(r->effective_url, server.url_localhost("/echo-headers"));
    EXPECT_NE(r->body.find("host: localhost:"), std::string::npos) << r->body;
    EXPECT_EQ(r->body.find("authorization"), std::string::npos) << r->body;
    EXPECT_EQ(r->body.find("secret-token"), std::string::npos) << r->body;
    auto log = server.requests();
    ASSERT_EQ(log.size(), 2u);
    EXPECT_EQ(log[0].header("authorization"), "Bearer secret-token");
    EXPECT_EQ(log[1].header("authorization"), "");
}

TEST_F(HttpClientTest, RedirectNotFollowedWhenDisabled) {
    Request req = get(server.url("/redirect?to=/elsewhere"));
    req.follow_redirects = false;
    auto r = fetch(std::move(req));
    ASSERT_TRUE(r.ok()) << r.error().message;
    EXPECT_EQ(r->status, 302);
    EXPECT_EQ(r->header("Location"), "/elsewhere");
    EXPECT_EQ(r->body, "redirect body, to be ignored");
}

TEST_F(HttpClientTest, TooManyRedirectsIsAnError) {
    Request req = get(server.url("/redirect"));  // redirects to itself
    req.max_redirects = 3;
    auto r = fetch(std::move(req));
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.error().code, netio::make_error_code(CURLE_TOO_MANY_REDIRECTS)) << r.error().message;
    EXPECT_EQ(server.requests().size(), 4u);
}

TEST_F(HttpClientTest, RedirectWithUploadRewindsTheSource) {
    constexpr uint64_t kSize = 3ull << 20;
    auto src = std::make_shared<PatternSource>(44, kSize);
    Request req;
    req.method = "PUT";
    req.url = server.url("/redirect?code=307&to=/upload");
    req.body_source = src;
    auto r = fetch(std::move(req));
    ASSERT_TRUE(r.ok()) << r.error().message;
    EXPECT_EQ(r->status, 200);
    EXPECT_EQ(r->effective_url, server.url("/upload"));
    EXPECT_EQ(r->body, "len=" + std::to_string(kSize) + " fnv=" + hex16(pattern_fnv(44, kSize)) +
                           " cl=" + std::to_string(kSize) + " te=none expect=none");
    EXPECT_GE(src->rewinds, 1);
    auto log = server.requests();
    ASSERT_EQ(log.size(), 2u);
    EXPECT_EQ(log[1].method, "PUT");
}

TEST_F(HttpClientTest, PerRequestTimeoutOnAStallingServer) {
    Request req = get(server.url("/stall"));
    req.timeout_ms = 300;
    const auto start = Clock::now();
    auto r = fetch(std::move(req));
    const auto took = Clock::now() - start;
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.error().code, netio::make_error_code(CURLE_OPERATION_TIMEDOUT)) << r.error().message;
    EXPECT_TRUE(r.error().code == std::errc::timed_out);
    EXPECT_GE(took, 250ms);
    EXPECT_LT(took, 5000ms);
    EXPECT_NE(r.error().message.find("GET " + server.url("/stall") + ": "), std::string::npos) << r.error().message;
}

TEST_F(HttpClientTest, ConnectionRefused) {
    // A bound but not listening socket: connecting to it is refused, and nobody else gets the port.
    netio::UniqueFd s(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ASSERT_EQ(::bind(s.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
    socklen_t len = sizeof addr;
    ::getsockname(s.get(), reinterpret_cast<sockaddr*>(&addr), &len);
    const std::string url = "http://127.0.0.1:" + std::to_string(ntohs(addr.sin_port)) + "/x";
    auto r = fetch(get(url));
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.error().code, netio::make_error_code(CURLE_COULDNT_CONNECT));
    EXPECT_EQ(r.error().message.rfind("GET " + url + ": Couldn't connect to server (", 0), 0u) << r.error().message;
}

TEST_F(HttpClientTest, ServerClosingMidBodyIsAnError) {
    auto r = fetch(get(server.url("/close-mid?n=1000000")));
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.error().code, netio::make_error_code(CURLE_PARTIAL_FILE)) << r.error().message;

    VerifySink sink(0);
    auto r2 = fetch(get(server.url("/close-mid?n=1000000")), &sink);
    ASSERT_FALSE(r2.ok());
    EXPECT_EQ(sink.received, 500000u);
    EXPECT_FALSE(sink.mismatch);
}

TEST_F(HttpClientTest, SequentialRequestsReuseOneConnection) {
    constexpr int kCount = 20;
    int done = 0;
    int failures = 0;
    std::function<void()> next = [&] {
        client->start(get(server.url("/bytes?n=2000&seed=" + std::to_string(done))), nullptr,
                      [&](Result<Response> r) {
                          if (!r.ok() || r->body != pattern(static_cast<uint64_t>(done), 0, 2000)) ++failures;
                          ++done;
                          if (done < kCount) next();
                      });
    };
    next();
    ASSERT_TRUE(run_until(loop, [&] { return done == kCount; }, 20s));
    EXPECT_EQ(failures, 0);
    EXPECT_EQ(server.accepted(), 1u);
    EXPECT_EQ(server.requests().size(), static_cast<size_t>(kCount));
}

TEST_F(HttpClientTest, UploadsAlsoReuseTheConnection) {
    for (int i = 0; i < 5; ++i) {
        Request req;
        req.method = "PUT";
        req.url = server.url("/upload");
        req.body = pattern(static_cast<uint64_t>(i), 0, 100000);
        auto r = fetch(std::move(req));
        ASSERT_TRUE(r.ok()) << r.error().message;
        EXPECT_EQ(r->body.rfind("len=100000 ", 0), 0u) << r->body;
    }
    EXPECT_EQ(server.accepted(), 1u);
}

TEST_F(HttpClientTest, Head) {
    Request req = get(server.url("/bytes?n=5000"));
    req.method = "HEAD";
    auto r = fetch(std::move(req));
    ASSERT_TRUE(r.ok()) << r.error().message;
    EXPECT_EQ(r->status, 200);
    EXPECT_EQ(r->header("content-length"), "5000");
    EXPECT_TRUE(r->body.empty());
    EXPECT_EQ(r->body_bytes, 0u);

    VerifySink sink(0);
    Request req2 = get(server.url("/bytes?n=5000"));
    req2.method = "HEAD";
    auto r2 = fetch(std::move(req2), &sink);
    ASSERT_TRUE(r2.ok()) << r2.error().message;
    EXPECT_EQ(sink.heads, 1);  // a bodyless response still gets its head
    EXPECT_EQ(sink.status_seen, 200);
    EXPECT_EQ(sink.offers, 0);
    EXPECT_EQ(netio::find_header(sink.head_headers, "content-length"), "5000");
    auto log = server.requests();
    EXPECT_EQ(log.back().method, "HEAD");
    EXPECT_EQ(server.accepted(), 1u);
}

TEST_F(HttpClientTest, EmptyBodyWithSinkGetsHead) {
    VerifySink sink(0);
    auto r = fetch(get(server.url("/bytes?n=0")), &sink);
    ASSERT_TRUE(r.ok()) << r.error().message;
    EXPECT_EQ(sink.heads, 1);
    EXPECT_EQ(sink.offers, 0);
}

TEST_F(HttpClientTest, CancelARunningTransfer) {
    int calls = 0;
    std::optional<Result<Response>> out;
    const TransferId id = client->start(get(server.url("/stall")), nullptr, [&](Result<Response> r) {
        ++calls;
        out.emplace(std::move(r));
    });
    loop.add_timer(50ms, [&] {
        client->cancel(id);
        EXPECT_EQ(calls, 0);  // done runs from the queue, not inside cancel()
    });
    ASSERT_TRUE(run_until(loop, [&] { return out.has_value(); }, 5s));
    ASSERT_FALSE(out->ok());
    EXPECT_EQ(out->error().code, std::make_error_code(std::errc::operation_canceled));
    client->cancel(id);  // already finished: ignored
    run_for(loop, 30ms);
    EXPECT_EQ(calls, 1);
    EXPECT_EQ(client->active(), 0u);
}

TEST_F(HttpClientTest, CancelRightAfterStart) {
    int calls = 0;
    std::optional<Result<Response>> out;
    const TransferId id = client->start(get(server.url("/bytes?n=100")), nullptr, [&](Result<Response> r) {
        ++calls;
        out.emplace(std::move(r));
    });
    client->cancel(id);
    EXPECT_EQ(calls, 0);
    ASSERT_TRUE(run_until(loop, [&] { return out.has_value(); }, 5s));
    EXPECT_EQ(out->error().code, std::make_error_code(std::errc::operation_canceled));
    run_for(loop, 30ms);
    EXPECT_EQ(calls, 1);
}

TEST_F(HttpClientTest, ShutdownCancelsEveryTransferAndRefusesNewOnes) {
    std::vector<Result<Response>> outs;
    for (int i = 0; i < 3; ++i)
        client->start(get(server.url("/stall")), nullptr, [&](Result<Response> r) { outs.push_back(std::move(r)); });
    run_for(loop, 50ms);
    client->shutdown();
    EXPECT_TRUE(outs.empty());  // done runs from the queue, not inside shutdown()
    ASSERT_TRUE(run_until(loop, [&] { return outs.size() == 3; }, 5s));
    for (const auto& r : outs) {
        ASSERT_FALSE(r.ok());
        EXPECT_EQ(r.error().code, std::make_error_code(std::errc::operation_canceled));
    }
    EXPECT_EQ(client->active(), 0u);
    // A later start fails at once, from the queue.
    std::optional<Result<Response>> late;
    client->start(get(server.url("/bytes?n=10")), nullptr, [&](Result<Response> r) { late.emplace(std::move(r)); });
    EXPECT_FALSE(late.has_value());
    ASSERT_TRUE(run_until(loop, [&] { return late.has_value(); }, 5s));
    ASSERT_FALSE(late->ok());
    EXPECT_EQ(late->error().code, std::make_error_code(std::errc::operation_canceled));
}

TEST_F(HttpClientTest, CancelFromInsideTheSink) {
    VerifySink sink(2);
    TransferId id = 0;
    sink.on_offer = [&] { client->cancel(id); };
    int calls = 0;
    std::optional<Result<Response>> out;
    id = client->start(get(server.url("/bytes?n=10000000&seed=2")), &sink, [&](Result<Response> r) {
        ++calls;
        out.emplace(std::move(r));
    });
    ASSERT_TRUE(run_until(loop, [&] { return out.has_value(); }, 5s));
    EXPECT_EQ(out->error().code, std::make_error_code(std::errc::operation_canceled));
    EXPECT_LT(sink.received, 10000000u);
    run_for(loop, 30ms);
    EXPECT_EQ(calls, 1);
    // The client is still usable.
    auto r = fetch(get(server.url("/bytes?n=10&seed=1")));
    ASSERT_TRUE(r.ok()) << r.error().message;
}

TEST_F(HttpClientTest, StartFromInsideTheSink) {
    VerifySink sink(2);
    std::optional<Result<Response>> inner;
    bool started = false;
    sink.on_offer = [&] {
        if (started) return;
        started = true;
        client->start(get(server.url("/bytes?n=10&seed=1")), nullptr,
                      [&](Result<Response> r) { inner.emplace(std::move(r)); });
    };
    auto r = fetch(get(server.url("/bytes?n=300000&seed=2")), &sink);
    ASSERT_TRUE(r.ok()) << r.error().message;
    ASSERT_TRUE(run_until(loop, [&] { return inner.has_value(); }, 5s));
    ASSERT_TRUE(inner->ok()) << inner->error().message;
    EXPECT_EQ((*inner)->body, pattern(1, 0, 10));
}

TEST_F(HttpClientTest, UnsupportedSchemeFailsWithoutCallingBackInStart) {
    auto r = fetch(get("ftp://127.0.0.1/x"));
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.error().code, netio::make_error_code(CURLE_UNSUPPORTED_PROTOCOL)) << r.error().message;
}

TEST_F(HttpClientTest, ErrorMessagesCarryNoCredentialsOrQuery) {
    netio::UniqueFd s(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ASSERT_EQ(::bind(s.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
    socklen_t len = sizeof addr;
    ::getsockname(s.get(), reinterpret_cast<sockaddr*>(&addr), &len);
    const std::string port = std::to_string(ntohs(addr.sin_port));
    auto r = fetch(get("http://user:hunter2@127.0.0.1:" + port + "/blob?X-Amz-Signature=abc"));
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.error().message.find("hunter2"), std::string::npos) << r.error().message;
    EXPECT_EQ(r.error().message.find("abc"), std::string::npos) << r.error().message;
    EXPECT_EQ(r.error().message.rfind("GET http://127.0.0.1:" + port + "/blob?...: ", 0), 0u) << r.error().message;
}

TEST_F(HttpClientTest, DestroyingTheClientAbortsWithoutCallbacks) {
    int calls = 0;
    for (int i = 0; i < 5; ++i) {
        client->start(get(server.url("/stall")), nullptr, [&](Result<Response>) { ++calls; });
    }
    client->start(get(server.url("/bytes?n=100")), nullptr, [&](Result<Response>) { ++calls; });
    run_for(loop, 50ms);  // the small one may finish; the stalls are running
    const int before = calls;
    EXPECT_LE(before, 1);
    client.reset();
    run_for(loop, 30ms);
    EXPECT_EQ(calls, before);
    EXPECT_EQ(loop.pending_ops(), 0u);
}

namespace {
double thread_cpu_ms() {
    rusage ru{};
    ::getrusage(RUSAGE_THREAD, &ru);
    return (ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1e3 + (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e3;
}
}  // namespace

// The loop must sleep, not spin, while transfers wait: on a silent server, on a paused sink and
// on a paused body source.
TEST_F(HttpClientTest, WaitingTransfersDoNotSpinTheLoop) {
    // Silent server.
    Request stall = get(server.url("/stall"));
    stall.timeout_ms = 400;
    double cpu0 = thread_cpu_ms();
    auto r = fetch(std::move(stall));
    ASSERT_FALSE(r.ok());
    EXPECT_LT(thread_cpu_ms() - cpu0, 100.0) << "stalled GET";

    // Paused sink, resumed after 400 ms.
    VerifySink sink(8);
    sink.pause_every = 100000;
    TransferId id = 0;
    bool resumed = false;
    sink.on_full = [&] {
        loop.add_timer(400ms, [&] {
            resumed = true;
            sink.pause_every = 0;  // once is enough
            client->resume(id);
        });
    };
    std::optional<Result<Response>> out;
    cpu0 = thread_cpu_ms();
    id = client->start(get(server.url("/bytes?n=1000000&seed=8")), &sink,
                       [&](Result<Response> res) { out.emplace(std::move(res)); });
    ASSERT_TRUE(run_until(loop, [&] { return out.has_value(); }, 5s));
    ASSERT_TRUE(out->ok()) << out->error().message;
    EXPECT_FALSE(sink.mismatch);
    EXPECT_EQ(sink.received, 1000000u);
    EXPECT_TRUE(resumed);
    EXPECT_LT(thread_cpu_ms() - cpu0, 100.0) << "paused sink";

    // Paused body source, resumed after 400 ms.
    auto src = std::make_shared<PatternSource>(9, 2000000);
    src->pause_every = 500000;
    bool src_resumed = false;
    src->on_pause = [&] {
        loop.add_timer(400ms, [&] {
            src_resumed = true;
            src->pause_every = 0;
            client->resume(id);
        });
    };
    Request put;
    put.method = "PUT";
    put.url = server.url("/upload");
    put.body_source = src;
    out.reset();
    cpu0 = thread_cpu_ms();
    id = client->start(std::move(put), nullptr, [&](Result<Response> res) { out.emplace(std::move(res)); });
    ASSERT_TRUE(run_until(loop, [&] { return out.has_value(); }, 5s));
    ASSERT_TRUE(out->ok()) << out->error().message;
    EXPECT_EQ((*out)->body.rfind("len=2000000 fnv=" + hex16(pattern_fnv(9, 2000000)), 0), 0u) << (*out)->body;
    EXPECT_TRUE(src_resumed);
    EXPECT_LT(thread_cpu_ms() - cpu0, 100.0) << "paused source";
}

TEST_F(HttpClientTest, DestroyingTheClientFromItsOwnCallback) {
    int calls = 0;
    for (int i = 0; i < 3; ++i) {
        client->start(get(server.url("/bytes?n=10")), nullptr, [&](Result<Response>) {
            ++calls;
            client.reset();  // the other transfers' callbacks must not run
        });
    }
    ASSERT_TRUE(run_until(loop, [&] { return calls > 0; }, 5s));
    run_for(loop, 30ms);
    EXPECT_EQ(calls, 1);
    EXPECT_EQ(loop.pending_ops(), 0u);
}

TEST_F(HttpClientTest, BodySourceAbortFailsTheUpload) {
    class AbortingSource final : public BodySource {
    public:
        uint64_t length() const noexcept override { return 1 << 20; }
        long read(std::span<char> buf) noexcept override {
            if (sent_ >= 100000) return kAbort;
            const size_t n = std::min<size_t>(buf.size(), 10000);
            std::memset(buf.data(), 'a', n);
            sent_ += n;
            return static_cast<long>(n);
        }
        bool rewind() noexcept override { return false; }

    private:
        size_t sent_ = 0;
    };
    Request req;
    req.method = "PUT";
    req.url = server.url("/upload");
    req.body_source = std::make_shared<AbortingSource>();
    auto r = fetch(std::move(req));
    ASSERT_FALSE(r.ok());
    EXPECT_NE(r.error().message.find("PUT " + server.url("/upload") + ": request body source failed"), std::string::npos)
        << r.error().message;
    // The client keeps working.
    auto r2 = fetch(get(server.url("/bytes?n=10")));
    ASSERT_TRUE(r2.ok()) << r2.error().message;
}

TEST_F(HttpClientTest, TlsCaFileIsApplied) {
    // No TLS server here (a plain server would just wait for a request line): a missing CA file
    // fails before the handshake, as an error, never a response.
    Request req = get("https://127.0.0.1:" + std::to_string(server.port()) + "/bytes?n=10");
    req.tls.ca_file = "/nonexistent/ca.pem";
    auto r = fetch(std::move(req));
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.error().code, netio::make_error_code(CURLE_SSL_CACERT_BADFILE)) << r.error().message;
}

TEST_F(HttpClientTest, ServerClosingAnIdleConnectionIsHandled) {
    for (int i = 0; i < 3; ++i) {
        auto r = fetch(get(server.url("/bytes?n=1000&then_close=1&seed=" + std::to_string(i))));
        ASSERT_TRUE(r.ok()) << i << ": " << r.error().message;
        EXPECT_EQ(r->body, pattern(static_cast<uint64_t>(i), 0, 1000));
        run_for(loop, 10ms);  // the FIN arrives while the connection sits in curl's cache
    }
    // Uploads after an unannounced close too (curl may have to rewind the body to retry).
    for (int i = 0; i < 3; ++i) {
        Request req;
        req.method = "PUT";
        req.url = server.url("/upload");
        req.body_source = std::make_shared<PatternSource>(5, 300000);
        auto r = fetch(std::move(req));
        ASSERT_TRUE(r.ok()) << r.error().message;
        auto r2 = fetch(get(server.url("/bytes?n=10&then_close=1")));
        ASSERT_TRUE(r2.ok()) << r2.error().message;
        // Let the FIN land before the next request: a close racing the reuse itself is a transport
        // error that callers retry (RegistryClient does), not something curl can hide.
        run_for(loop, 50ms);
    }
    EXPECT_EQ(server.accepted(), 6u);
    EXPECT_EQ(loop.pending_ops(), 0u);  // nothing watches the cached, dead connections
}
