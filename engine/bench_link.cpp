#include "engine/bench_link.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cerrno>
#include <cstdarg>
#include <cstring>
#include <exception>
#include <fstream>
#include <iterator>
#include <limits>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <span>
#include <tuple>
#include <utility>

#include "cas/digest.h"
#include "engine/registry_client.h"
#include "netio/http_client.h"
#include "netio/task.h"
#include "netio/uring_loop.h"

namespace engine {

namespace {

using Clock = std::chrono::steady_clock;
using SigFlag = const volatile std::sig_atomic_t*;

constexpr uint64_t kMiB = 1u << 20;
constexpr unsigned kMaxStreams = 64;
constexpr uint64_t kMinBlobBytes = 1u << 20;
constexpr uint64_t kMaxBlobBytes = 64ull << 30;
constexpr uint64_t kMinChunkBytes = 1u << 20;
constexpr uint64_t kMaxChunkBytes = 4ull << 30;
constexpr int kMaxRttSamples = 1000;
constexpr uint64_t kWarmupBlobBytes = 1024;
constexpr size_t kDeletesInFlight = 8;
// A pass shorter than this (fast links) is repeated, up to kMaxPasses, so one hiccup weighs less.
constexpr double kMinRunSeconds = 0.5;
constexpr unsigned kMaxPasses = 3;
constexpr size_t kLeftShown = 20;            // leftovers listed in the text report (all in JSON)
constexpr long kRttTimeoutMs = 10000;
constexpr const char* kUserAgent = "crossdock/0.1 bench-link";
constexpr const char* kDefaultRepoPrefix = "crossdock-bench-link/";

[[gnu::format(printf, 1, 2)]] std::string strf(const char* fmt, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    int n = std::vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (n < 0) return {};
    if (static_cast<size_t>(n) < sizeof buf) return std::string(buf, static_cast<size_t>(n));
    std::string out(static_cast<size_t>(n) + 1, '\0');
    va_start(ap, fmt);
    std::vsnprintf(out.data(), out.size(), fmt, ap);
    va_end(ap);
    out.resize(static_cast<size_t>(n));
    return out;
}

// "64 MiB", "1.5 MiB", "512 KiB", "100 B".
std::string size_label(uint64_t bytes) {
    if (bytes >= kMiB) {
        if (bytes % kMiB == 0) return strf("%llu MiB", static_cast<unsigned long long>(bytes / kMiB));
        return strf("%.1f MiB", double(bytes) / double(kMiB));
    }
    if (bytes >= 1024 && bytes % 1024 == 0) return strf("%llu KiB", static_cast<unsigned long long>(bytes / 1024));
    return strf("%llu B", static_cast<unsigned long long>(bytes));
}

double seconds_between(Clock::time_point a, Clock::time_point b) {
    return std::chrono::duration<double>(b - a).count();
}

// ---- Synthetic blobs: counter-based splitmix64, so any byte range can be produced on its own. ----

uint64_t mix64(uint64_t z) noexcept {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
uint64_t word_at(uint64_t seed, uint64_t i) noexcept { return mix64(seed + (i + 1) * 0x9E3779B97F4A7C15ull); }

// Bytes [offset, offset + buf.size()) of the blob with this seed.
void fill_synthetic(uint64_t seed, uint64_t offset, std::span<char> buf) noexcept {
    size_t pos = 0;
    uint64_t word = offset / 8;
    size_t skip = static_cast<size_t>(offset % 8);
    while (pos < buf.size()) {
        if (skip == 0 && buf.size() - pos >= 8) {
            const size_t words = (buf.size() - pos) / 8;
            for (size_t k = 0; k < words; ++k) {
                const uint64_t w = word_at(seed, word + k);
                std::memcpy(buf.data() + pos + 8 * k, &w, 8);
            }
            pos += words * 8;
            word += words;
            continue;
        }
        const uint64_t w = word_at(seed, word);
        char b[8];
        std::memcpy(b, &w, 8);
        const size_t n = std::min<size_t>(8 - skip, buf.size() - pos);
        std::memcpy(buf.data() + pos, b + skip, n);
        pos += n;
        skip = 0;
        ++word;
    }
}

struct SyntheticBlob {
    uint64_t seed = 0;
    uint64_t size = 0;
    std::string digest;
};

SyntheticBlob make_blob(std::mt19937_64& rng, uint64_t size) {
    SyntheticBlob b;
    b.seed = rng();
    b.size = size;
    cas::Sha256 h;
    std::vector<char> buf(std::min<uint64_t>(size, 1u << 20));
    for (uint64_t off = 0; off < size;) {
        const size_t n = static_cast<size_t>(std::min<uint64_t>(buf.size(), size - off));
        std::span<char> part(buf.data(), n);
        fill_synthetic(b.seed, off, part);
        h.update(std::span<const char>(part));
        off += n;
    }
    b.digest = h.finish_digest();
    return b;
}

// Streams [offset, offset + length) of a synthetic blob; aborts once `interrupted` is set.
class SyntheticSource final : public netio::BodySource {
public:
    SyntheticSource(uint64_t seed, uint64_t offset, uint64_t length, SigFlag interrupted)
        : seed_(seed), offset_(offset), length_(length), interrupted_(interrupted) {}
    uint64_t length() const noexcept override { return length_; }
    long read(std::span<char> buf) noexcept override {
        if (interrupted_ && *interrupted_) return kAbort;
        const size_t n = static_cast<size_t>(std::min<uint64_t>(buf.size(), length_ - pos_));
        fill_synthetic(seed_, offset_ + pos_, buf.first(n));
        pos_ += n;
        return static_cast<long>(n);
    }
    bool rewind() noexcept override {
        pos_ = 0;
        return true;
    }

private:
    uint64_t seed_, offset_, length_;
    uint64_t pos_ = 0;
    SigFlag interrupted_;
};

BlobBodyFactory synthetic_factory(uint64_t seed, SigFlag interrupted) {
    return [seed, interrupted](uint64_t offset, uint64_t length) -> std::shared_ptr<netio::BodySource> {
        return std::make_shared<SyntheticSource>(seed, offset, length, interrupted);
    };
}

// Counts and discards a response body.
class DiscardSink final : public netio::BodySink {
public:
    explicit DiscardSink(SigFlag interrupted) : interrupted_(interrupted) {}
    netio::Offer offer(std::span<const char> data) noexcept override {
        if (interrupted_ && *interrupted_) return netio::Offer::error;
        bytes_ += data.size();
        return netio::Offer::taken;
    }
    uint64_t bytes() const noexcept { return bytes_; }

private:
    SigFlag interrupted_;
    uint64_t bytes_ = 0;
};

struct RangeOutcome {
    std::optional<netio::Error> error;
    long http_status = 0;
    uint64_t bytes = 0;
};

// One ranged GET into a discarding sink; reports into *out and signals *wg. Parameters by value
// or pointer: the frame outlives the caller's statement that spawned it.
Task<void> get_range(RegistryClient* client, std::string repo, std::string digest, netio::ByteRange range,
                     SigFlag interrupted, RangeOutcome* out, netio::WaitGroup* wg) {
    try {
        DiscardSink sink(interrupted);
        std::optional<netio::ByteRange> r = range;
        auto res = co_await client->get_blob(std::move(repo), std::move(digest), &sink, r);
        if (!res.ok()) {
            out->error = res.error();
        } else {
            out->http_status = res->status;
            out->bytes = sink.bytes();
        }
    } catch (const std::exception& e) {
        out->error = netio::Error::make(std::string("ranged GET: ") + e.what());
    }
    wg->done();
}

Task<void> put_blob(RegistryClient* client, std::string repo, SyntheticBlob blob, SigFlag interrupted,
                    std::optional<netio::Error>* out, netio::WaitGroup* wg) {
    try {
        BlobBodyFactory body = synthetic_factory(blob.seed, interrupted);
        RegistryClient::Finalizable ready;
        auto st = co_await client->upload_blob(std::move(repo), blob.digest, blob.size, std::move(body), std::move(ready));
        if (!st.ok()) *out = st.error();
    } catch (const std::exception& e) {
        *out = netio::Error::make(std::string("upload: ") + e.what());
    }
    wg->done();
}

Task<void> delete_one(RegistryClient* client, std::string repo, std::string digest, std::optional<netio::Error>* out,
                      netio::WaitGroup* wg) {
    try {
        auto st = co_await client->delete_blob(std::move(repo), std::move(digest));
        if (!st.ok()) *out = st.error();
    } catch (const std::exception& e) {
        *out = netio::Error::make(std::string("delete: ") + e.what());
    }
    wg->done();
}

// `total` split into `n` near-equal parts (the first total % n parts one byte longer).
std::vector<uint64_t> split_sizes(uint64_t total, unsigned n) {
    std::vector<uint64_t> out(n, total / n);
    for (uint64_t i = 0; i < total % n; ++i) ++out[i];
    return out;
}

class BenchLink {
public:
    explicit BenchLink(BenchLinkOptions opts) : opts_(std::move(opts)), http_(loop_), rng_(std::random_device{}()) {}

    int run() { return netio::run_blocking(loop_, main_task()); }

private:
    struct Created {
        bool on_source = false;
        std::string repo, digest;
    };

    bool interrupted() const noexcept { return opts_.interrupted && *opts_.interrupted; }
    netio::Error interrupted_error() const { return netio::Error::make("interrupted", std::make_error_code(std::errc::operation_canceled)); }

    void log(const std::string& line) {
        if (!opts_.log) return;
        std::fprintf(opts_.log, "bench-link: %s\n", line.c_str());
        std::fflush(opts_.log);
    }
    void fail(const std::string& msg) {
        std::fprintf(stderr, "crossdock bench-link: %s\n", msg.c_str());
        std::fflush(stderr);
    }

    std::optional<std::optional<Credentials>> credentials_for(const std::string& host,
                                                              const std::optional<Credentials>& flag) {
        if (flag) return std::optional<Credentials>(flag);
        auto found = lookup_docker_config(host, opts_.auth_files);
        if (!found.ok()) {
            fail(found.error().message);
            return std::nullopt;
        }
        return std::optional<Credentials>(found.value());
    }

    RegistryOptions registry_options(const std::string& host, const std::optional<Credentials>& creds) const {
        RegistryOptions ro;
        ro.host = host;
        ro.insecure = opts_.insecure;
        ro.ca_file = opts_.ca_file;
        ro.credentials = creds;
        return ro;
    }

    // A request outside RegistryClient (RTT probes): same TLS settings, no credentials.
    netio::Request plain_get(const std::string& url) const {
        netio::Request r;
        r.method = "GET";
        r.url = url;
        r.tls.verify = !opts_.insecure;
        r.tls.ca_file = opts_.ca_file;
        r.timeout_ms = kRttTimeoutMs;
        r.headers.emplace_back("User-Agent", kUserAgent);
        return r;
    }

    Task<int> main_task();
    Task<int> check_scratch(RegistryClient* client, std::string repo, const char* side);
    Task<netio::Result<RttStats>> measure_rtt(RegistryClient* client);
    Task<netio::Status> measure_get();
    Task<netio::Status> measure_put();
    Task<void> cleanup();
    int finish_report();

    BenchLinkOptions opts_;
    netio::UringLoop loop_;
    netio::HttpClient http_;
    std::mt19937_64 rng_;
    std::optional<Credentials> source_creds_, target_creds_;
    std::unique_ptr<RegistryClient> source_, target_;
    std::string source_repo_, target_repo_;
    bool same_repository_ = false;  // source and target are one repository of one registry
    std::vector<Created> created_;
    size_t delete_errors_ = 0;  // deletes that failed for another reason than a 405
    BenchLinkReport report_;
};

Task<int> BenchLink::main_task() {
    report_.source = opts_.source.to_string();
    report_.target = opts_.target.to_string();
    report_.blob_bytes = opts_.blob_bytes;

    auto sc = credentials_for(opts_.source.host, opts_.source_credentials);
    if (!sc) co_return kBenchLinkFailed;
    auto tc = credentials_for(opts_.target.host, opts_.target_credentials);
    if (!tc) co_return kBenchLinkFailed;
    source_creds_ = *sc;
    target_creds_ = *tc;
    source_ = std::make_unique<RegistryClient>(http_, registry_options(opts_.source.host, source_creds_));
    target_ = std::make_unique<RegistryClient>(http_, registry_options(opts_.target.host, target_creds_));

    std::string rel = opts_.repo;
    if (rel.empty()) rel = kDefaultRepoPrefix + strf("%08llx", static_cast<unsigned long long>(rng_() & 0xffffffffull));
    source_repo_ = join_repo(opts_.source.ns, rel);
    target_repo_ = join_repo(opts_.target.ns, rel);
    report_.source_repo = source_repo_;
    report_.target_repo = target_repo_;
    same_repository_ = opts_.source.host == opts_.target.host && source_repo_ == target_repo_;

    if (auto st = co_await source_->ping(); !st.ok()) {
        fail("source " + st.error().message);
        co_return kBenchLinkFailed;
    }
    if (auto st = co_await target_->ping(); !st.ok()) {
        fail("target " + st.error().message);
        co_return kBenchLinkFailed;
    }

    // Nothing is written before both scratch repositories are known to be ours.
    if (int rc = co_await check_scratch(source_.get(), source_repo_, "source"); rc != kBenchLinkOk) co_return rc;
    if (!same_repository_) {
        if (int rc = co_await check_scratch(target_.get(), target_repo_, "target"); rc != kBenchLinkOk) co_return rc;
    }
    log("scratch repository " + opts_.source.host + "/" + source_repo_ +
        (same_repository_ ? "" : " and " + opts_.target.host + "/" + target_repo_));

    auto srtt = co_await measure_rtt(source_.get());
    if (!srtt.ok()) {
        fail("source " + srtt.error().message);
        co_return kBenchLinkFailed;
    }
    report_.source_rtt = std::move(srtt.value());
    log(strf("RTT to the source: median %.2f ms, p90 %.2f ms", report_.source_rtt.median_ms, report_.source_rtt.p90_ms));
    auto trtt = co_await measure_rtt(target_.get());
    if (!trtt.ok()) {
        fail("target " + trtt.error().message);
        co_return kBenchLinkFailed;
    }
    report_.target_rtt = std::move(trtt.value());
    log(strf("RTT to the target: median %.2f ms, p90 %.2f ms", report_.target_rtt.median_ms, report_.target_rtt.p90_ms));

    // From the first upload on, every path goes through cleanup().
    auto st = co_await measure_get();
    if (st.ok()) st = co_await measure_put();
    co_await cleanup();
    if (!st.ok()) {
        fail(st.error().message);
        fail(strf("cleanup: %zu of the %zu blob(s) bench-link uploaded deleted", report_.blobs_deleted, report_.blobs_created));
        if (!report_.left.empty()) {
            fail(strf("%zu blob(s) could not be deleted:", report_.left.size()));
            for (const auto& l : report_.left) std::fprintf(stderr, "  %s\n", l.c_str());
        }
        co_return kBenchLinkFailed;
    }
    co_return finish_report();
}

// Refuses (kBenchLinkRefused) a scratch repository that already holds content, unless --force.
Task<int> BenchLink::check_scratch(RegistryClient* client, std::string repo, const char* side) {
    const std::string where = client->host() + "/" + repo;
    auto tags = co_await client->tags(repo);
    if (!tags.ok()) {
        fail(std::string("checking the ") + side + " scratch repository " + where + ": " + tags.error().message);
        co_return kBenchLinkFailed;
    }
    if (!tags->empty()) {
        std::string some;
        for (size_t i = 0; i < tags->size() && i < 5; ++i) some += (i ? ", " : "") + (*tags)[i];
        if (tags->size() > 5) some += ", ...";
        const std::string what = strf("%zu tag(s): ", tags->size()) + some;
        if (!opts_.force) {
            fail("refusing to use " + where + " as the scratch repository: it already has " + what +
                 ". bench-link only writes to a repository it creates; choose another --repo, or pass --force "
                 "(it then deletes only the blobs it uploads itself)");
            co_return kBenchLinkRefused;
        }
        report_.notes.push_back("--force: " + where + " already had " + what + "; only bench-link's own blobs were deleted");
        co_return kBenchLinkOk;
    }
    if (opts_.repo.empty()) co_return kBenchLinkOk;  // a fresh random name: nothing to look for
    // An explicit --repo with no tags may still hold blobs or untagged manifests: the catalog lists
    // a repository once anything was pushed to it (distribution keeps listing it after deletes,
    // until garbage collection).
    auto cat = co_await client->catalog();
    if (!cat.ok()) {
        report_.notes.push_back("could not list the catalog of " + client->host() + " (" + cat.error().message +
                                "): untagged content in " + repo + " was not ruled out");
        co_return kBenchLinkOk;
    }
    if (std::find(cat->begin(), cat->end(), repo) != cat->end()) {
        if (!opts_.force) {
            fail("refusing to use " + where + " as the scratch repository: it is listed in the registry's catalog, so it "
                 "holds (or held) blobs or manifests. Choose another --repo, or pass --force (bench-link then deletes "
                 "only the blobs it uploads itself)");
            co_return kBenchLinkRefused;
        }
        report_.notes.push_back("--force: " + where + " already existed; only bench-link's own blobs were deleted");
    }
    co_return kBenchLinkOk;
}

Task<netio::Result<RttStats>> BenchLink::measure_rtt(RegistryClient* client) {
    std::vector<double> samples;
    const std::string url = client->base_url() + "/v2/";
    // Round 0 warms the connection (and is not counted); then rtt_samples timed round trips.
    for (int i = 0; i <= opts_.rtt_samples; ++i) {
        if (interrupted()) co_return interrupted_error();
        netio::Request req = plain_get(url);
        const auto t0 = Clock::now();
        auto res = co_await netio::fetch(http_, std::move(req));
        const auto t1 = Clock::now();
        if (!res.ok()) co_return netio::Error{res.error().code, client->host() + ": GET /v2/: " + res.error().message};
        if (i > 0) samples.push_back(seconds_between(t0, t1) * 1000.0);
    }
    co_return rtt_stats(std::move(samples));
}

Task<netio::Status> BenchLink::measure_get() {
    SyntheticBlob blob = make_blob(rng_, opts_.blob_bytes);
    created_.push_back(Created{true, source_repo_, blob.digest});
    log("uploading a " + size_label(blob.size) + " test blob to the source (not timed)");
    {
        BlobBodyFactory body = synthetic_factory(blob.seed, opts_.interrupted);
        RegistryClient::Finalizable ready;
        auto st = co_await source_->upload_blob(source_repo_, blob.digest, blob.size, std::move(body), std::move(ready));
        if (interrupted()) co_return interrupted_error();
        if (!st.ok()) co_return netio::Error{st.error().code, "uploading the test blob to the source: " + st.error().message};
    }
    // Warm-up (not timed): the pull token, a connection, and whether the source honours Range.
    {
        DiscardSink sink(opts_.interrupted);
        netio::ByteRange first_byte;
        first_byte.first = 0;
        first_byte.last = 0;
        std::optional<netio::ByteRange> r = first_byte;
        auto res = co_await source_->get_blob(source_repo_, blob.digest, &sink, r);
        if (interrupted()) co_return interrupted_error();
        if (!res.ok()) co_return netio::Error{res.error().code, "reading the test blob from the source: " + res.error().message};
        if (res->status == 200) {
            report_.source_ignores_range = true;
            report_.notes.push_back("the source ignores Range (a ranged GET got 200 and the whole blob): every stream "
                                    "read the whole blob, so more streams do not speed up reads from this source");
        } else if (res->status != 206) {
            co_return netio::Error::make(strf("reading the test blob from the source: HTTP %ld", res->status));
        }
    }

    for (unsigned n : opts_.streams) {
        const std::vector<uint64_t> parts = split_sizes(blob.size, n);
        BenchRun run;
        run.streams = n;
        while (run.passes < kMaxPasses && (run.passes == 0 || run.seconds < kMinRunSeconds)) {
            if (interrupted()) co_return interrupted_error();
            std::vector<RangeOutcome> outs(n);
            netio::WaitGroup wg(loop_);
            wg.add(n);
            const auto t0 = Clock::now();
            uint64_t offset = 0;
            for (unsigned k = 0; k < n; ++k) {
                netio::ByteRange range;
                range.first = offset;
                range.last = offset + parts[k] - 1;
                offset += parts[k];
                Task<void> t = get_range(source_.get(), source_repo_, blob.digest, range, opts_.interrupted, &outs[k], &wg);
                netio::spawn(std::move(t));
            }
            co_await wg.wait();
            const auto t1 = Clock::now();
            if (interrupted()) co_return interrupted_error();
            for (unsigned k = 0; k < n; ++k) {
                const auto& o = outs[k];
                if (o.error)
                    co_return netio::Error{o.error->code, strf("GET with %u streams, range %u: ", n, k) + o.error->message};
                const uint64_t want = o.http_status == 200 ? blob.size : parts[k];
                if (o.http_status != 206 && o.http_status != 200)
                    co_return netio::Error::make(strf("GET with %u streams, range %u: HTTP %ld", n, k, o.http_status));
                if (o.bytes != want)
                    co_return netio::Error::make(strf("GET with %u streams, range %u: %llu bytes received instead of %llu", n,
                                                      k, static_cast<unsigned long long>(o.bytes),
                                                      static_cast<unsigned long long>(want)));
                run.bytes += o.bytes;
            }
            run.seconds += seconds_between(t0, t1);
            ++run.passes;
        }
        log(strf("GET  %2u stream(s): %9.1f MiB/s (%u pass%s)", n, run.mib_per_s(), run.passes, run.passes == 1 ? "" : "es"));
        report_.get.push_back(run);
    }
    co_return netio::ok_status();
}

// The chunk sizes (and monolithic) take turns at each stream count rather than running one after
// the other: a registry that slows down as it fills (dirty page writeback on its disk) then
// penalises every series alike, and a row of the table compares like with like.
Task<netio::Status> BenchLink::measure_put() {
    std::vector<uint64_t> variants = opts_.chunk_sizes;
    variants.push_back(0);  // monolithic
    SyntheticBlob warm = make_blob(rng_, kWarmupBlobBytes);
    created_.push_back(Created{false, target_repo_, warm.digest});

    std::vector<std::unique_ptr<RegistryClient>> clients;
    std::vector<std::string> labels;
    for (uint64_t chunk : variants) {
        labels.push_back(chunk ? "PUT " + size_label(chunk) + " chunks" : "PUT monolithic");
        RegistryOptions ro = registry_options(opts_.target.host, target_creds_);
        ro.chunk_size_bytes = chunk ? chunk : std::numeric_limits<uint64_t>::max();
        // A measurement with retries in it measures the retries: one retry for a blip, no more.
        ro.backoff.max_attempts = 2;
        clients.push_back(std::make_unique<RegistryClient>(http_, std::move(ro)));
        RegistryClient* client = clients.back().get();
        if (auto st = co_await client->ping(); !st.ok()) co_return netio::Error{st.error().code, "target " + st.error().message};
        // Warm-up (not timed): the push token and a connection.
        BlobBodyFactory body = synthetic_factory(warm.seed, opts_.interrupted);
        RegistryClient::Finalizable ready;
        auto st = co_await client->upload_blob(target_repo_, warm.digest, warm.size, std::move(body), std::move(ready));
        if (interrupted()) co_return interrupted_error();
        if (!st.ok()) co_return netio::Error{st.error().code, labels.back() + ", warm-up upload: " + st.error().message};
        PutSeries series;
        series.chunk_size_bytes = chunk;
        report_.put.push_back(std::move(series));
    }

    for (unsigned n : opts_.streams) {
        const std::vector<uint64_t> sizes = split_sizes(opts_.blob_bytes, n);
        for (size_t v = 0; v < variants.size(); ++v) {
            const uint64_t chunk = variants[v];
            BenchRun run;
            run.streams = n;
            run.upload_bytes = sizes.front();
            run.single_put = chunk == 0 || sizes.front() <= chunk;
            while (run.passes < kMaxPasses && (run.passes == 0 || run.seconds < kMinRunSeconds)) {
                if (interrupted()) co_return interrupted_error();
                // Distinct blobs in every pass; their digests are computed here, before the clock starts.
                std::vector<SyntheticBlob> blobs;
                blobs.reserve(n);
                for (uint64_t sz : sizes) {
                    blobs.push_back(make_blob(rng_, sz));
                    created_.push_back(Created{false, target_repo_, blobs.back().digest});
                }
                std::vector<std::optional<netio::Error>> outs(n);
                netio::WaitGroup wg(loop_);
                wg.add(n);
                const auto t0 = Clock::now();
                for (unsigned k = 0; k < n; ++k) {
                    Task<void> t = put_blob(clients[v].get(), target_repo_, blobs[k], opts_.interrupted, &outs[k], &wg);
                    netio::spawn(std::move(t));
                }
                co_await wg.wait();
                const auto t1 = Clock::now();
                if (interrupted()) co_return interrupted_error();
                for (unsigned k = 0; k < n; ++k) {
                    if (outs[k])
                        co_return netio::Error{outs[k]->code, labels[v] + strf(", %u parallel upload(s): ", n) + outs[k]->message};
                }
                run.bytes += opts_.blob_bytes;
                run.seconds += seconds_between(t0, t1);
                ++run.passes;
            }
            log(strf("%-18s %2u upload(s) of %s: %9.1f MiB/s (%u pass%s)", labels[v].c_str(), n,
                     size_label(run.upload_bytes).c_str(), run.mib_per_s(), run.passes, run.passes == 1 ? "" : "es"));
            report_.put[v].runs.push_back(run);
        }
    }
    co_return netio::ok_status();
}

// Deletes every blob bench-link uploaded (a failed upload's blob too: 404 counts as gone), a few in
// flight at a time. After a 405 from a registry, the rest of its blobs are not tried.
Task<void> BenchLink::cleanup() {
    std::vector<Created> todo;
    std::set<std::tuple<std::string, std::string, std::string>> seen;
    for (const auto& c : created_) {
        const std::string host = c.on_source ? opts_.source.host : opts_.target.host;
        if (seen.insert(std::make_tuple(host, c.repo, c.digest)).second) todo.push_back(c);
    }
    report_.blobs_created = todo.size();
    if (todo.empty()) co_return;
    log(strf("deleting the %zu blob(s) bench-link uploaded", todo.size()));
    std::map<std::string, std::string> unsupported;  // host -> the registry's answer
    for (size_t begin = 0; begin < todo.size(); begin += kDeletesInFlight) {
        const size_t end = std::min(todo.size(), begin + kDeletesInFlight);
        std::vector<std::optional<netio::Error>> outs(end - begin);
        std::vector<bool> tried(end - begin, false);
        netio::WaitGroup wg(loop_);
        for (size_t i = begin; i < end; ++i) {
            RegistryClient* client = todo[i].on_source ? source_.get() : target_.get();
            if (unsupported.count(client->host())) continue;
            tried[i - begin] = true;
            wg.add();
            Task<void> t = delete_one(client, todo[i].repo, todo[i].digest, &outs[i - begin], &wg);
            netio::spawn(std::move(t));
        }
        co_await wg.wait();
        for (size_t i = begin; i < end; ++i) {
            const Created& c = todo[i];
            const std::string host = c.on_source ? opts_.source.host : opts_.target.host;
            const auto& o = outs[i - begin];
            if (tried[i - begin] && !o) {
                ++report_.blobs_deleted;
                continue;
            }
            report_.left.push_back(host + "/" + c.repo + "@" + c.digest);
            if (o && o->code == std::errc::operation_not_supported) {
                report_.deletes_unsupported = true;
                // The registry's answer, without the request (host, repository, digest) in front.
                const auto http = o->message.find("HTTP ");
                unsupported.emplace(host, http == std::string::npos ? o->message : o->message.substr(http));
            } else if (o) {
                ++delete_errors_;
                report_.notes.push_back("could not delete " + host + "/" + c.repo + "@" + c.digest + ": " + o->message);
            }
        }
    }
    for (const auto& [host, msg] : unsupported)
        report_.notes.push_back(host + " refuses deletes (" + msg + "; distribution needs storage.delete.enabled). " +
                                "The blobs left there are in no manifest: the registry's garbage collection removes them");
}

int BenchLink::finish_report() {
    const LinkRecommendation rec = recommend_link_settings(report_);
    const std::string command = recommended_command(report_, rec, opts_.insecure, opts_.ca_file);
    if (opts_.out) {
        std::fputs(bench_link_text(report_, rec, command).c_str(), opts_.out);
        std::fflush(opts_.out);
    }
    int rc = kBenchLinkOk;
    auto write_file = [&](const std::string& path, const std::string& content, const char* what) {
        std::ofstream f(path, std::ios::binary | std::ios::trunc);
        f << content;
        f.close();
        if (!f) {
            fail(std::string("cannot write the ") + what + " to " + path + ": " + std::strerror(errno));
            rc = kBenchLinkFailed;
        }
    };
    if (!opts_.json_path.empty()) write_file(opts_.json_path, bench_link_json(report_, rec, command) + "\n", "JSON report");
    if (!opts_.plot_path.empty()) write_file(opts_.plot_path, bench_link_svg(report_), "plot");
    // Deletes refused by configuration are reported, not failed; any other leftover is a failure.
    if (delete_errors_ > 0) rc = kBenchLinkFailed;
    return rc;
}

// ---- Formatting helpers for the pure functions. ----

std::string fmt_rate(double mib_per_s) { return strf("%.1f", mib_per_s); }

std::string put_label(uint64_t chunk) { return chunk ? "PUT " + size_label(chunk) : std::string("PUT mono"); }

uint64_t chunk_flag_mib(uint64_t chunk_bytes) {
    return std::max<uint64_t>(1, (chunk_bytes + kMiB / 2) / kMiB);
}

std::string xml_escape(const std::string& s) {
    std::string out;
    for (char c : s) {
        switch (c) {
        case '&': out += "&amp;"; break;
        case '<': out += "&lt;"; break;
        case '>': out += "&gt;"; break;
        case '"': out += "&quot;"; break;
        case '\'': out += "&apos;"; break;
        default: out += c;
        }
    }
    return out;
}

// Best MiB/s of `runs`, and the smallest stream count within kStreamsTolerance of it.
std::pair<double, unsigned> best_of(const std::vector<BenchRun>& runs, bool only_chunked = false) {
    double best = 0;
    for (const auto& r : runs)
        if (!only_chunked || !r.single_put) best = std::max(best, r.mib_per_s());
    unsigned smallest = 0;
    for (const auto& r : runs) {
        if (only_chunked && r.single_put) continue;
        if (r.mib_per_s() >= (1.0 - kStreamsTolerance) * best && (smallest == 0 || r.streams < smallest))
            smallest = r.streams;
    }
    return {best, smallest};
}

}  // namespace

RttStats rtt_stats(std::vector<double> samples_ms) {
    RttStats s;
    s.samples_ms = samples_ms;
    if (samples_ms.empty()) return s;
    std::sort(samples_ms.begin(), samples_ms.end());
    const size_t n = samples_ms.size();
    s.median_ms = n % 2 ? samples_ms[n / 2] : (samples_ms[n / 2 - 1] + samples_ms[n / 2]) / 2;
    const size_t rank = static_cast<size_t>(std::ceil(0.9 * double(n)));  // nearest rank, 1-based
    s.p90_ms = samples_ms[std::max<size_t>(rank, 1) - 1];
    return s;
}

LinkRecommendation recommend_link_settings(const BenchLinkReport& r) {
    LinkRecommendation rec;
    if (r.get.empty() || r.put.empty()) return rec;
    for (const auto& g : r.get) {
        if (g.mib_per_s() > rec.best_get_mib_per_s) {
            rec.best_get_mib_per_s = g.mib_per_s();
            rec.best_get_streams = g.streams;
        }
    }
    rec.streams = best_of(r.get).second;
    double one_stream = 0;
    for (const auto& g : r.get)
        if (g.streams == 1) one_stream = g.mib_per_s();
    const double connections = one_stream > 0 ? std::ceil(rec.best_get_mib_per_s / one_stream) : 4.0;
    rec.jobs = static_cast<unsigned>(std::clamp(2.0 * connections, 16.0, 64.0));

    // Chunk sizes are compared where all of them really were chunked: at the stream counts whose
    // uploads are larger than every chunk size measured. Without such a count, each series is
    // scored over its own chunked runs (over all its runs if it has none).
    std::set<unsigned> common;
    bool first_chunked = true;
    for (const auto& s : r.put) {
        if (s.chunk_size_bytes == 0) continue;
        std::set<unsigned> chunked;
        for (const auto& b : s.runs)
            if (!b.single_put) chunked.insert(b.streams);
        if (first_chunked) {
            common = std::move(chunked);
            first_chunked = false;
        } else {
            std::set<unsigned> both;
            std::set_intersection(common.begin(), common.end(), chunked.begin(), chunked.end(), std::inserter(both, both.end()));
            common = std::move(both);
        }
    }
    double best_put_any = 0;
    double best_score = -1;
    for (const auto& s : r.put) {
        const double best = best_of(s.runs).first;
        best_put_any = std::max(best_put_any, best);
        if (s.chunk_size_bytes == 0) {
            rec.best_monolithic_mib_per_s = std::max(rec.best_monolithic_mib_per_s, best);
            continue;
        }
        double score = 0;
        if (!common.empty()) {
            for (const auto& b : s.runs)
                if (common.count(b.streams)) score = std::max(score, b.mib_per_s());
        } else {
            const bool any_chunked = std::any_of(s.runs.begin(), s.runs.end(), [](const BenchRun& b) { return !b.single_put; });
            score = best_of(s.runs, any_chunked).first;
        }
        if (score > best_score) {  // strictly: ties keep the smaller chunk size (series are in ascending order)
            best_score = score;
            rec.chunk_size_bytes = s.chunk_size_bytes;
            rec.chunked_put_mib_per_s = score;
            const auto [series_best, smallest] = best_of(s.runs);
            rec.best_put_mib_per_s = series_best;
            rec.put_streams = smallest;
        }
    }
    if (rec.chunk_size_bytes == 0) {  // only a monolithic series was measured
        rec.best_put_mib_per_s = rec.best_monolithic_mib_per_s;
        for (const auto& s : r.put) rec.put_streams = best_of(s.runs).second;
    }
    rec.best_put_any_mib_per_s = best_put_any;
    rec.capacity_mib_per_s = std::min(rec.best_get_mib_per_s, best_put_any);
    rec.bandwidth_mib_per_s = std::max<uint64_t>(1, static_cast<uint64_t>(std::floor(rec.capacity_mib_per_s * kBandwidthShare)));
    rec.valid = rec.best_get_mib_per_s > 0 && rec.capacity_mib_per_s > 0 && rec.streams > 0;
    return rec;
}

std::string recommended_command(const BenchLinkReport& r, const LinkRecommendation& rec, bool insecure,
                                const std::string& ca_file) {
    if (!rec.valid) return {};
    std::string cmd = "crossdock mirror " + r.source + " " + r.target;
    if (insecure) cmd += " --insecure";
    if (!ca_file.empty()) cmd += " --ca-file " + ca_file;
    cmd += strf(" --streams %u", rec.streams);
    if (rec.jobs) cmd += strf(" --jobs %u", rec.jobs);
    if (rec.chunk_size_bytes) cmd += strf(" --chunk-size %llu", static_cast<unsigned long long>(chunk_flag_mib(rec.chunk_size_bytes)));
    // --bandwidth is advice for sharing the link with other traffic (printed beside), not part of
    // the command that fills it.
    return cmd;
}

std::string bench_link_json(const BenchLinkReport& r, const LinkRecommendation& rec, const std::string& command) {
    using J = nlohmann::ordered_json;
    auto rtt = [](const RttStats& s) {
        J j;
        j["median"] = s.median_ms;
        j["p90"] = s.p90_ms;
        j["samples"] = s.samples_ms;
        return j;
    };
    auto run_json = [](const BenchRun& b, bool put) {
        J j;
        j["streams"] = b.streams;
        j["bytes"] = b.bytes;
        j["seconds"] = b.seconds;
        j["mib_per_s"] = b.mib_per_s();
        j["passes"] = b.passes;
        if (put) {
            j["upload_bytes"] = b.upload_bytes;
            j["single_put"] = b.single_put;
        }
        return j;
    };
    J j;
    j["source"] = r.source;
    j["target"] = r.target;
    j["source_repository"] = r.source_repo;
    j["target_repository"] = r.target_repo;
    j["blob_bytes"] = r.blob_bytes;
    j["rtt_ms"]["source"] = rtt(r.source_rtt);
    j["rtt_ms"]["target"] = rtt(r.target_rtt);
    j["get"] = J::array();
    for (const auto& g : r.get) j["get"].push_back(run_json(g, false));
    j["put"] = J::array();
    for (const auto& s : r.put) {
        J p;
        p["chunk_size_bytes"] = s.chunk_size_bytes;
        p["monolithic"] = s.chunk_size_bytes == 0;
        p["runs"] = J::array();
        for (const auto& b : s.runs) p["runs"].push_back(run_json(b, true));
        j["put"].push_back(std::move(p));
    }
    j["source_ignores_range"] = r.source_ignores_range;
    J rj;
    rj["valid"] = rec.valid;
    rj["streams"] = rec.streams;
    rj["jobs"] = rec.jobs;
    rj["chunk_size_bytes"] = rec.chunk_size_bytes;
    rj["chunk_size_mib"] = rec.chunk_size_bytes ? chunk_flag_mib(rec.chunk_size_bytes) : 0;
    rj["bandwidth"] = strf("%lluMiB/s", static_cast<unsigned long long>(rec.bandwidth_mib_per_s));
    rj["bandwidth_mib_per_s"] = rec.bandwidth_mib_per_s;
    rj["capacity_mib_per_s"] = rec.capacity_mib_per_s;
    rj["best_get_mib_per_s"] = rec.best_get_mib_per_s;
    rj["best_get_streams"] = rec.best_get_streams;
    rj["chunked_put_mib_per_s"] = rec.chunked_put_mib_per_s;
    rj["best_put_mib_per_s"] = rec.best_put_mib_per_s;
    rj["best_put_any_mib_per_s"] = rec.best_put_any_mib_per_s;
    rj["put_streams"] = rec.put_streams;
    rj["best_monolithic_mib_per_s"] = rec.best_monolithic_mib_per_s;
    rj["command"] = command;
    j["recommended"] = std::move(rj);
    J c;
    c["blobs_created"] = r.blobs_created;
    c["blobs_deleted"] = r.blobs_deleted;
    c["deletes_unsupported"] = r.deletes_unsupported;
    c["left"] = r.left;
    j["cleanup"] = std::move(c);
    j["notes"] = r.notes;
    return j.dump(2);
}

std::string bench_link_text(const BenchLinkReport& r, const LinkRecommendation& rec, const std::string& command) {
    std::string t;
    t += "crossdock bench-link " + r.source + " -> " + r.target + "\n";
    const std::string src_host = r.source.substr(0, r.source.find('/'));
    const std::string dst_host = r.target.substr(0, r.target.find('/'));
    t += "scratch repository: " + src_host + "/" + r.source_repo;
    if (src_host != dst_host || r.source_repo != r.target_repo) t += ", " + dst_host + "/" + r.target_repo;
    t += "\n\n";

    const size_t host_w = std::max<size_t>(std::max(src_host.size(), dst_host.size()), 10);
    t += strf("round trip, GET /v2/ (%zu samples)\n", r.source_rtt.samples_ms.size());
    t += strf("  %-6s  %-*s  %10s  %10s\n", "", static_cast<int>(host_w), "", "median", "p90");
    t += strf("  %-6s  %-*s  %7.2f ms  %7.2f ms\n", "source", static_cast<int>(host_w), src_host.c_str(),
              r.source_rtt.median_ms, r.source_rtt.p90_ms);
    t += strf("  %-6s  %-*s  %7.2f ms  %7.2f ms\n\n", "target", static_cast<int>(host_w), dst_host.c_str(),
              r.target_rtt.median_ms, r.target_rtt.p90_ms);

    t += "throughput, MiB/s (" + size_label(r.blob_bytes) + " per pass: GET as N ranges of one blob, PUT as N parallel "
         "uploads of " + size_label(r.blob_bytes) + "/N)\n";
    std::vector<std::string> heads = {"streams", "GET"};
    for (const auto& s : r.put) heads.push_back(put_label(s.chunk_size_bytes));
    std::vector<size_t> widths;
    for (const auto& h : heads) widths.push_back(std::max<size_t>(h.size(), 9));
    t += " ";
    for (size_t c = 0; c < heads.size(); ++c) t += strf("  %*s", static_cast<int>(widths[c]), heads[c].c_str());
    t += "\n";
    bool any_single = false;
    for (size_t i = 0; i < r.get.size(); ++i) {
        std::vector<std::string> cells = {strf("%u", r.get[i].streams), fmt_rate(r.get[i].mib_per_s())};
        for (const auto& s : r.put) {
            if (i >= s.runs.size()) {
                cells.push_back("-");
                continue;
            }
            std::string cell = fmt_rate(s.runs[i].mib_per_s());
            if (s.chunk_size_bytes && s.runs[i].single_put) {
                cell += "*";
                any_single = true;
            } else {
                cell += " ";
            }
            cells.push_back(cell);
        }
        // PUT cells end in a marker column ("*" or " "), so their digits sit one left of the edge.
        t += " ";
        for (size_t c = 0; c < cells.size(); ++c) t += strf("  %*s", static_cast<int>(widths[c]), cells[c].c_str());
        t += "\n";
    }
    if (any_single) t += "  * each upload was no larger than the chunk size, so it went in one PUT (as in crossdock mirror)\n";
    t += "\n";

    if (rec.valid) {
        t += "recommended settings\n";
        double at_streams = 0;
        for (const auto& g : r.get)
            if (g.streams == rec.streams) at_streams = g.mib_per_s();
        if (rec.streams == rec.best_get_streams)
            t += strf("  --streams %-10u GET reaches %.1f MiB/s with %u stream(s), the best measured\n", rec.streams,
                      at_streams, rec.streams);
        else
            t += strf("  --streams %-10u GET reaches %.1f MiB/s with %u stream(s), within %.0f%% of the best (%.1f MiB/s "
                      "with %u)\n",
                      rec.streams, at_streams, rec.streams, kStreamsTolerance * 100, rec.best_get_mib_per_s,
                      rec.best_get_streams);
        if (rec.chunk_size_bytes)
            t += strf("  --chunk-size %-7llu chunked PUT reaches %.1f MiB/s with %s chunks (best chunked; monolithic: %.1f MiB/s)\n",
                      static_cast<unsigned long long>(chunk_flag_mib(rec.chunk_size_bytes)), rec.chunked_put_mib_per_s,
                      size_label(rec.chunk_size_bytes).c_str(), rec.best_monolithic_mib_per_s);
        const std::string bw = strf("%lluMiB/s", static_cast<unsigned long long>(rec.bandwidth_mib_per_s));
        t += strf("  --jobs %-13u blobs in flight: the link takes about %u connections at the 1-stream rate, twice over\n",
                  rec.jobs, rec.jobs / 2);
        t += strf("  --bandwidth %-8s to share the link: %.0f%% of its capacity, min(best GET, best PUT) = %.1f MiB/s "
                  "(add it when other traffic needs room)\n", bw.c_str(), kBandwidthShare * 100, rec.capacity_mib_per_s);
        t += strf("  uploads: %u in parallel reach %.1f MiB/s (crossdock mirror --jobs bounds the blobs in flight)\n",
                  rec.put_streams, [&] {
                      for (const auto& s : r.put)
                          if (s.chunk_size_bytes == rec.chunk_size_bytes)
                              for (const auto& b : s.runs)
                                  if (b.streams == rec.put_streams) return b.mib_per_s();
                      return 0.0;
                  }());
        t += "\n  " + command + "\n\n";
    } else {
        t += "no recommendation: nothing was measured\n\n";
    }

    for (const auto& n : r.notes) t += "note: " + n + "\n";
    t += strf("cleanup: %zu of %zu blob(s) bench-link uploaded deleted", r.blobs_deleted, r.blobs_created);
    if (r.left.empty()) {
        t += "\n";
    } else {
        t += strf("; %zu left%s:\n", r.left.size(), r.deletes_unsupported ? " (the registry refuses deletes)" : "");
        for (size_t i = 0; i < r.left.size() && i < kLeftShown; ++i) t += "  " + r.left[i] + "\n";
        if (r.left.size() > kLeftShown) t += strf("  ... and %zu more (all listed in --json)\n", r.left.size() - kLeftShown);
    }
    return t;
}

std::string bench_link_svg(const BenchLinkReport& r) {
    constexpr double kW = 760, kH = 460;
    constexpr double kLeft = 70, kRight = 190, kTop = 50, kBottom = 60;
    const double plot_w = kW - kLeft - kRight, plot_h = kH - kTop - kBottom;

    struct Line {
        std::string label, color;
        bool dashed = false;
        std::vector<std::pair<unsigned, double>> points;
    };
    std::vector<Line> lines;
    {
        Line g{"GET", "#1f77b4", false, {}};
        for (const auto& b : r.get) g.points.emplace_back(b.streams, b.mib_per_s());
        lines.push_back(std::move(g));
    }
    static const char* const kColors[] = {"#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"};
    size_t ci = 0;
    for (const auto& s : r.put) {
        Line l;
        l.label = s.chunk_size_bytes ? "PUT, " + size_label(s.chunk_size_bytes) + " chunks" : "PUT, monolithic";
        l.color = s.chunk_size_bytes ? kColors[ci++ % std::size(kColors)] : "#7f7f7f";
        l.dashed = s.chunk_size_bytes == 0;
        for (const auto& b : s.runs) l.points.emplace_back(b.streams, b.mib_per_s());
        lines.push_back(std::move(l));
    }

    unsigned xmin = std::numeric_limits<unsigned>::max(), xmax = 0;
    double ymax_data = 0;
    for (const auto& l : lines)
        for (const auto& [x, y] : l.points) {
            xmin = std::min(xmin, x);
            xmax = std::max(xmax, x);
            ymax_data = std::max(ymax_data, y);
        }
    if (xmax == 0) xmin = xmax = 1;
    const bool log_x = xmin >= 1 && xmax >= 4 * xmin;
    auto xpos = [&](unsigned x) {
        if (xmax == xmin) return kLeft + plot_w / 2;
        if (log_x) return kLeft + plot_w * (std::log2(double(x)) - std::log2(double(xmin))) / (std::log2(double(xmax)) - std::log2(double(xmin)));
        return kLeft + plot_w * double(x - xmin) / double(xmax - xmin);
    };
    // A "nice" y range: 0 .. a multiple of 1, 2 or 5 x 10^k, about five ticks.
    double step = 1;
    if (ymax_data > 0) {
        const double raw = ymax_data / 5;
        const double mag = std::pow(10.0, std::floor(std::log10(raw)));
        const double norm = raw / mag;
        step = (norm <= 1 ? 1 : norm <= 2 ? 2 : norm <= 5 ? 5 : 10) * mag;
    }
    const double ymax = std::max(step, std::ceil(ymax_data / step) * step);
    auto ypos = [&](double y) { return kTop + plot_h * (1.0 - y / ymax); };

    std::string s;
    s += strf("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
              "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%.0f\" height=\"%.0f\" viewBox=\"0 0 %.0f %.0f\" "
              "font-family=\"sans-serif\" font-size=\"12\">\n",
              kW, kH, kW, kH);
    s += strf("<rect x=\"0\" y=\"0\" width=\"%.0f\" height=\"%.0f\" fill=\"white\"/>\n", kW, kH);
    s += strf("<text x=\"%.1f\" y=\"24\" text-anchor=\"middle\" font-size=\"15\">%s</text>\n", kLeft + plot_w / 2,
              xml_escape("crossdock bench-link: " + r.source + " \u2192 " + r.target).c_str());
    s += strf("<text x=\"%.1f\" y=\"40\" text-anchor=\"middle\" fill=\"#555\">%s</text>\n", kLeft + plot_w / 2,
              xml_escape(size_label(r.blob_bytes) + " per run; PUT: N uploads of " + size_label(r.blob_bytes) + "/N").c_str());
    // Grid and y ticks.
    for (double y = 0; y <= ymax + step / 2; y += step) {
        const double py = ypos(y);
        s += strf("<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#e0e0e0\"/>\n", kLeft, py, kLeft + plot_w, py);
        s += strf("<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"end\">%g</text>\n", kLeft - 6, py + 4, y);
    }
    // X ticks at each measured stream count.
    std::set<unsigned> xs;
    for (const auto& l : lines)
        for (const auto& p : l.points) xs.insert(p.first);
    for (unsigned x : xs) {
        const double px = xpos(x);
        s += strf("<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#000\"/>\n", px, kTop + plot_h, px, kTop + plot_h + 5);
        s += strf("<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">%u</text>\n", px, kTop + plot_h + 18, x);
    }
    // Axes and their labels.
    s += strf("<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#000\"/>\n", kLeft, kTop, kLeft, kTop + plot_h);
    s += strf("<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#000\"/>\n", kLeft, kTop + plot_h, kLeft + plot_w,
              kTop + plot_h);
    s += strf("<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">%s</text>\n", kLeft + plot_w / 2, kH - 16,
              log_x ? "parallel streams (log scale)" : "parallel streams");
    s += strf("<text x=\"18\" y=\"%.1f\" text-anchor=\"middle\" transform=\"rotate(-90 18 %.1f)\">throughput (MiB/s)</text>\n",
              kTop + plot_h / 2, kTop + plot_h / 2);
    // Lines, points, legend.
    for (size_t i = 0; i < lines.size(); ++i) {
        const auto& l = lines[i];
        auto pts = l.points;
        std::sort(pts.begin(), pts.end());
        std::string path;
        for (const auto& [x, y] : pts) path += strf("%s%.1f,%.1f", path.empty() ? "" : " ", xpos(x), ypos(y));
        if (!path.empty())
            s += strf("<polyline points=\"%s\" fill=\"none\" stroke=\"%s\" stroke-width=\"2\"%s/>\n", path.c_str(),
                      l.color.c_str(), l.dashed ? " stroke-dasharray=\"6 4\"" : "");
        for (const auto& [x, y] : pts)
            s += strf("<circle cx=\"%.1f\" cy=\"%.1f\" r=\"3.5\" fill=\"%s\"><title>%s</title></circle>\n", xpos(x), ypos(y),
                      l.color.c_str(), xml_escape(l.label + strf(": %u stream(s), %.1f MiB/s", x, y)).c_str());
        const double ly = kTop + 10 + 20 * double(i);
        const double lx = kLeft + plot_w + 20;
        s += strf("<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"%s\" stroke-width=\"2\"%s/>\n", lx, ly, lx + 24,
                  ly, l.color.c_str(), l.dashed ? " stroke-dasharray=\"6 4\"" : "");
        s += strf("<text x=\"%.1f\" y=\"%.1f\">%s</text>\n", lx + 30, ly + 4, xml_escape(l.label).c_str());
    }
    s += "</svg>\n";
    return s;
}

int run_bench_link(const BenchLinkOptions& in) {
    BenchLinkOptions o = in;
    auto usage = [](const std::string& msg) {
        std::fprintf(stderr, "crossdock bench-link: %s\n", msg.c_str());
        return kBenchLinkRefused;
    };
    if (o.source.host.empty() || o.target.host.empty()) return usage("SOURCE and TARGET are required");
    std::sort(o.streams.begin(), o.streams.end());
    o.streams.erase(std::unique(o.streams.begin(), o.streams.end()), o.streams.end());
    std::sort(o.chunk_sizes.begin(), o.chunk_sizes.end());
    o.chunk_sizes.erase(std::unique(o.chunk_sizes.begin(), o.chunk_sizes.end()), o.chunk_sizes.end());
    if (o.streams.empty()) return usage("--streams needs at least one stream count");
    if (o.streams.front() < 1 || o.streams.back() > kMaxStreams) return usage(strf("--streams: each count must be between 1 and %u", kMaxStreams));
    for (uint64_t c : o.chunk_sizes)
        if (c < kMinChunkBytes || c > kMaxChunkBytes) return usage("--chunk-sizes: each must be between 1 MiB and 4096 MiB");
    if (o.blob_bytes < kMinBlobBytes || o.blob_bytes > kMaxBlobBytes) return usage("--size must be between 1 and 65536 (MiB)");
    if (o.rtt_samples < 1 || o.rtt_samples > kMaxRttSamples) return usage(strf("--rtt-samples must be between 1 and %d", kMaxRttSamples));
    if (!o.repo.empty()) {
        if (!is_valid_repo_name(o.repo)) return usage("--repo '" + o.repo + "' is not a valid repository path (lowercase, a-z0-9 and . _ - /)");
        for (const auto* ref : {&o.source, &o.target}) {
            const std::string full = join_repo(ref->ns, o.repo);
            if (!is_valid_repo_name(full)) return usage("--repo: '" + full + "' is not a valid repository name (too long?)");
        }
    }
    try {
        BenchLink b(std::move(o));
        return b.run();
    } catch (const std::exception& e) {
        std::fprintf(stderr, "crossdock bench-link: %s\n", e.what());
        return kBenchLinkFailed;
    }
}

}  // namespace engine
