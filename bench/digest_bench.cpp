// Micro-benchmarks: digest throughput (cas::Sha256, cas::xxh3_64) and the raw disk figures the CAS
// is measured against (pwrite/pread in 256 KiB blocks on a temporary file, fdatasync at the end).
//
//   build/bench/digest_bench [--benchmark_filter=Sha256]
//
// The temporary files go to $CROSSDOCK_BENCH_DIR, else $TMPDIR, else /tmp (removed afterwards).
// Reads are measured twice: "cached" (the file was just written: page cache) and "cold" (the
// file's pages were dropped with posix_fadvise(DONTNEED) after the fdatasync).
#include <benchmark/benchmark.h>
#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "cas/digest.h"

namespace {

constexpr size_t kKiB = 1024;
constexpr size_t kMiB = 1024 * kKiB;
constexpr size_t kBlock = 256 * kKiB;

const std::string& random_buffer(size_t n) {
    static std::string buf;
    if (buf.size() < n) {
        std::mt19937_64 rng(20240601);
        buf.resize(n);
        for (size_t i = 0; i + 8 <= n; i += 8) {
            const uint64_t v = rng();
            std::memcpy(buf.data() + i, &v, 8);
        }
    }
    return buf;
}

std::string bench_dir() {
    for (const char* var : {"CROSSDOCK_BENCH_DIR", "TMPDIR"}) {
        const char* v = std::getenv(var);
        if (v && *v) return v;
    }
    return "/tmp";
}

void BM_Sha256(benchmark::State& state) {
    const size_t n = static_cast<size_t>(state.range(0));
    const std::string& buf = random_buffer(n);
    cas::Sha256 h;
    for (auto _ : state) {
        h.update(std::span<const char>(buf.data(), n));
        std::string hex = h.finish_hex();
        benchmark::DoNotOptimize(hex);
    }
    state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * n));
}
BENCHMARK(BM_Sha256)->Arg(1 * kMiB)->Arg(64 * kMiB)->Unit(benchmark::kMillisecond);

void BM_Xxh3(benchmark::State& state) {
    const size_t n = static_cast<size_t>(state.range(0));
    const std::string& buf = random_buffer(n);
    for (auto _ : state) {
        uint64_t v = cas::xxh3_64(std::span<const char>(buf.data(), n));
        benchmark::DoNotOptimize(v);
    }
    state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * n));
}
BENCHMARK(BM_Xxh3)->Arg(1 * kMiB)->Arg(64 * kMiB)->Unit(benchmark::kMillisecond);

bool pwrite_all(int fd, const char* p, size_t n, off_t off) {
    while (n > 0) {
        ssize_t w = ::pwrite(fd, p, n, off);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return false;
        p += w;
        n -= static_cast<size_t>(w);
        off += w;
    }
    return true;
}

// Writes `n` bytes to a fresh file in kBlock pwrites, then fdatasync. Returns the fd (or -1).
int write_file(const std::string& path, const std::string& buf, size_t n) {
    int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) return -1;
    for (size_t off = 0; off < n; off += kBlock) {
        const size_t len = std::min(kBlock, n - off);
        if (!pwrite_all(fd, buf.data() + off, len, static_cast<off_t>(off))) {
            ::close(fd);
            return -1;
        }
    }
    if (::fdatasync(fd) != 0) {
        ::close(fd);
        return -1;
    }
    return fd;
}

// Raw write: a fresh file each iteration (unlinked outside the timing), fdatasync included.
void BM_DiskWrite(benchmark::State& state) {
    const size_t n = static_cast<size_t>(state.range(0));
    const std::string& buf = random_buffer(n);
    const std::string path = bench_dir() + "/crossdock-digest-bench-write." + std::to_string(::getpid());
    for (auto _ : state) {
        int fd = write_file(path, buf, n);
        state.PauseTiming();
        if (fd < 0) {
            state.SkipWithError(("write to " + path + " failed: " + std::strerror(errno)).c_str());
            break;
        }
        ::close(fd);
        ::unlink(path.c_str());
        state.ResumeTiming();
    }
    ::unlink(path.c_str());
    state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * n));
}
BENCHMARK(BM_DiskWrite)->Arg(256 * kMiB)->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(2.0);

// Raw read in kBlock preads; arg 1: 0 = cached (page cache), 1 = cold (pages dropped first).
void BM_DiskRead(benchmark::State& state) {
    const size_t n = static_cast<size_t>(state.range(0));
    const bool cold = state.range(1) != 0;
    const std::string& buf = random_buffer(n);
    const std::string path = bench_dir() + "/crossdock-digest-bench-read." + std::to_string(::getpid());
    int fd = write_file(path, buf, n);
    if (fd < 0) {
        state.SkipWithError(("write to " + path + " failed: " + std::strerror(errno)).c_str());
        ::unlink(path.c_str());
        return;
    }
    std::vector<char> block(kBlock);
    for (auto _ : state) {
        if (cold) {
            state.PauseTiming();
            ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
            state.ResumeTiming();
        }
        size_t total = 0;
        for (size_t off = 0; off < n;) {
            ssize_t r = ::pread(fd, block.data(), kBlock, static_cast<off_t>(off));
            if (r < 0 && errno == EINTR) continue;
            if (r <= 0) break;
            off += static_cast<size_t>(r);
            total += static_cast<size_t>(r);
        }
        if (total != n) {
            state.SkipWithError("short read");
            break;
        }
        benchmark::DoNotOptimize(block.data());
    }
    ::close(fd);
    ::unlink(path.c_str());
    state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * n));
}
BENCHMARK(BM_DiskRead)
    ->ArgsProduct({{256 * kMiB}, {0, 1}})
    ->ArgNames({"bytes", "cold"})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->MinTime(2.0);

}  // namespace

BENCHMARK_MAIN();
