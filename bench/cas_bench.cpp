// Micro-benchmarks of the CAS (cas::BlobStore) against the raw disk figures of digest_bench:
//
//   BM_CasWriteCommit   acquire a new digest, write the blob in 256 KiB pieces (DEPTH writes in
//                       flight, like a download stream), until it is committed: xxh3 per chunk,
//                       sha256 over the watermark, fsync of the data and the directory, rename.
//                       Compare with BM_DiskWrite (pwrite 256 KiB + fdatasync).
//   BM_CasRead          read a committed blob through the loop (UringLoop::read_at on read_fd()),
//                       256 KiB at a time, DEPTH reads in flight; cached / cold (pages dropped).
//                       Compare with BM_DiskRead.
//
//   build/bench/cas_bench [--benchmark_filter=Write]
//
// Each write iteration uses a fresh store directory (set up and removed outside the timing) under
// $CROSSDOCK_BENCH_DIR, else $TMPDIR, else /tmp. Every loop wait is bounded by a loop timer.
#include <benchmark/benchmark.h>
#include <fcntl.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "cas/blob_store.h"
#include "cas/digest.h"
#include "netio/uring_loop.h"

namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

constexpr size_t kKiB = 1024;
constexpr size_t kMiB = 1024 * kKiB;
constexpr size_t kBlock = 256 * kKiB;
constexpr auto kTimeout = 120s;

struct Content {
    std::string bytes;
    std::string digest;
};

const Content& content(size_t n) {
    static Content c;
    if (c.bytes.size() != n) {
        std::mt19937_64 rng(20240602);
        c.bytes.resize(n);
        for (size_t i = 0; i + 8 <= n; i += 8) {
            const uint64_t v = rng();
            std::memcpy(c.bytes.data() + i, &v, 8);
        }
        c.digest = cas::sha256_digest(c.bytes);
    }
    return c;
}

std::string make_dir() {
    std::string base = "/tmp";
    for (const char* var : {"CROSSDOCK_BENCH_DIR", "TMPDIR"}) {
        const char* v = std::getenv(var);
        if (v && *v) {
            base = v;
            break;
        }
    }
    std::string tmpl = base + "/crossdock-cas-bench-XXXXXX";
    if (!::mkdtemp(tmpl.data())) return {};
    return tmpl;
}

// Runs the loop until pred() or kTimeout; returns pred().
bool run_until(netio::UringLoop& loop, const std::function<bool()>& pred) {
    bool timed_out = false;
    const netio::OpId t = loop.add_timer(std::chrono::duration_cast<std::chrono::milliseconds>(kTimeout),
                                         [&] { timed_out = true; });
    loop.run_until([&] { return timed_out || pred(); });
    loop.cancel_timer(t);
    return pred();
}

// Fills `blob` from `data` with up to `depth` writes of kBlock in flight; true once committed.
bool fill(netio::UringLoop& loop, const cas::BlobRef& blob, const std::string& data, unsigned depth,
          std::string& err) {
    uint64_t pos = 0;
    unsigned inflight = 0;
    bool failed = false;
    std::function<void()> pump = [&] {
        while (!failed && inflight < depth && pos < data.size()) {
            const size_t n = std::min<uint64_t>(kBlock, data.size() - pos);
            const uint64_t at = pos;
            pos += n;
            ++inflight;
            blob->write(at, std::span<const char>(data.data() + at, n), [&](netio::Status s) {
                --inflight;
                if (!s) {
                    failed = true;
                    err = s.error().message;
                    return;
                }
                pump();
            });
        }
    };
    pump();
    const bool settled = run_until(loop, [&] {
        return inflight == 0 && (failed || blob->state() != cas::BlobState::partial);
    });
    if (!settled && err.empty()) err = "timed out";
    if (blob->state() == cas::BlobState::failed && err.empty()) err = blob->error().message;
    return blob->state() == cas::BlobState::committed;
}

cas::BlobStoreOptions options(const std::string& dir) {
    cas::BlobStoreOptions o;
    o.dir = dir + "/store";
    o.cap_bytes = 8ull << 30;
    return o;  // default chunk_bytes (4 MiB), as the engine would use it
}

// args: bytes, depth
void BM_CasWriteCommit(benchmark::State& state) {
    const size_t n = static_cast<size_t>(state.range(0));
    const unsigned depth = static_cast<unsigned>(state.range(1));
    const Content& c = content(n);
    netio::UringLoop loop;
    for (auto _ : state) {
        state.PauseTiming();
        const std::string dir = make_dir();
        if (dir.empty()) {
            state.SkipWithError("mkdtemp failed");
            break;
        }
        std::string err;
        bool ok = false;
        {
            cas::BlobStore store(loop, options(dir));
            auto a = store.acquire(c.digest, n);
            if (!a.ok() || !a->filler) {
                err = a.ok() ? "not the filler" : a.error().message;
            } else {
                cas::BlobRef blob = a->blob;
                state.ResumeTiming();
                ok = fill(loop, blob, c.bytes, depth, err);
                state.PauseTiming();
            }
            run_until(loop, [&] { return loop.pending_ops() == 0; });
        }
        std::error_code ec;
        fs::remove_all(dir, ec);
        state.ResumeTiming();
        if (!ok) {
            state.SkipWithError(("CAS write failed: " + err).c_str());
            break;
        }
    }
    state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * n));
}
BENCHMARK(BM_CasWriteCommit)
    ->ArgsProduct({{256 * kMiB}, {1, 4}})
    ->ArgNames({"bytes", "depth"})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->MinTime(2.0);

// args: bytes, cold, depth
void BM_CasRead(benchmark::State& state) {
    const size_t n = static_cast<size_t>(state.range(0));
    const bool cold = state.range(1) != 0;
    const unsigned depth = static_cast<unsigned>(state.range(2));
    const Content& c = content(n);
    netio::UringLoop loop;
    const std::string dir = make_dir();
    if (dir.empty()) {
        state.SkipWithError("mkdtemp failed");
        return;
    }
    {
        cas::BlobStore store(loop, options(dir));
        cas::BlobRef blob;
        std::string err;
        auto a = store.acquire(c.digest, n);
        if (!a.ok() || !a->filler || !fill(loop, a->blob, c.bytes, 4, err)) {
            state.SkipWithError(("CAS set-up failed: " + (a.ok() ? err : a.error().message)).c_str());
        } else {
            blob = store.lookup(c.digest);
            const int fd = blob->read_fd();
            std::vector<std::vector<char>> bufs(depth, std::vector<char>(kBlock));
            for (auto _ : state) {
                if (cold) {
                    state.PauseTiming();
                    ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
                    state.ResumeTiming();
                }
                uint64_t pos = 0, total = 0;
                unsigned inflight = 0;
                bool failed = false;
                std::function<void(unsigned)> issue = [&](unsigned slot) {
                    if (failed || pos >= n) return;
                    const size_t len = std::min<uint64_t>(kBlock, n - pos);
                    const uint64_t at = pos;
                    pos += len;
                    ++inflight;
                    loop.read_at(fd, bufs[slot].data(), len, at, [&, slot, len](int res) {
                        --inflight;
                        if (res != static_cast<int>(len)) {  // a short read on a local file: treat as error
                            failed = true;
                            return;
                        }
                        total += static_cast<uint64_t>(res);
                        issue(slot);
                    });
                };
                for (unsigned s = 0; s < depth; ++s) issue(s);
                run_until(loop, [&] { return inflight == 0; });
                if (failed || total != n) {
                    state.SkipWithError("CAS read failed or short");
                    break;
                }
            }
        }
        run_until(loop, [&] { return loop.pending_ops() == 0; });
    }
    std::error_code ec;
    fs::remove_all(dir, ec);
    state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * n));
}
BENCHMARK(BM_CasRead)
    ->ArgsProduct({{256 * kMiB}, {0, 1}, {1, 4}})
    ->ArgNames({"bytes", "cold", "depth"})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->MinTime(2.0);

}  // namespace

BENCHMARK_MAIN();
