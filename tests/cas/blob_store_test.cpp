// BlobStore tests on a real UringLoop and a temporary directory (removed afterwards). Every wait
// is bounded by a loop timer.
#include "cas/blob_store.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "cas/digest.h"
#include "netio/task.h"
#include "netio/uring_loop.h"

namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using cas::Blob;
using cas::BlobRef;
using cas::BlobState;
using cas::BlobStore;
using cas::BlobStoreOptions;

constexpr uint64_t kChunk = 64 * 1024;

std::string random_bytes(size_t n, uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::string s(n, '\0');
    for (size_t i = 0; i < n; i += 8) {
        const uint64_t v = rng();
        std::memcpy(s.data() + i, &v, std::min<size_t>(8, n - i));
    }
    return s;
}

std::string hex_of(const std::string& digest) { return digest.substr(7); }

std::string read_file(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), {});
}

std::string pread_all(int fd, uint64_t offset, size_t len) {
    std::string out(len, '\0');
    size_t got = 0;
    while (got < len) {
        const ssize_t n = ::pread(fd, out.data() + got, len - got, static_cast<off_t>(offset + got));
        if (n <= 0) break;
        got += static_cast<size_t>(n);
    }
    out.resize(got);
    return out;
}

using Ranges = std::vector<std::pair<uint64_t, uint64_t>>;  // {first, last} inclusive

Ranges missing(const BlobRef& b) {
    Ranges out;
    for (const auto& r : b->missing_ranges()) out.emplace_back(r.first, r.last);
    return out;
}

// {first chunk, last chunk} inclusive pairs -> byte ranges
Ranges chunk_ranges(std::initializer_list<std::pair<uint64_t, uint64_t>> chunks, uint64_t size) {
    Ranges out;
    for (auto [a, b] : chunks) out.emplace_back(a * kChunk, std::min(size, (b + 1) * kChunk) - 1);
    return out;
}

// A ranged GET stream: writes [pos, end) of `content` sequentially, in pieces of random size.
struct Stream {
    BlobRef blob;
    const std::string* content = nullptr;
    uint64_t pos = 0;
    uint64_t end = 0;
    size_t max_piece = 256 * 1024;
    std::mt19937_64 rng{1};
    bool done = false;
    std::optional<netio::Error> error;

    void next() {
        if (pos >= end) {
            done = true;
            return;
        }
        const size_t n = static_cast<size_t>(std::min<uint64_t>(end - pos, 1 + rng() % max_piece));
        const uint64_t at = pos;
        pos += n;
        blob->write(at, std::span<const char>(content->data() + at, n), [this](netio::Status s) {
            if (!s) {
                error = s.error();
                done = true;
                return;
            }
            next();
        });
    }
};

class BlobStoreTest : public ::testing::Test {
protected:
    void SetUp() override {
        const char* tmp = std::getenv("TMPDIR");
        std::string tmpl = std::string(tmp && *tmp ? tmp : "/tmp") + "/cas-test-XXXXXX";
        ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
        dir_ = tmpl;
    }
    void TearDown() override {
        // Let in-flight I/O land before the directory goes.
        run_until([&] { return loop_.pending_ops() == 0; }, 5s);
        std::error_code ec;
        fs::remove_all(dir_, ec);
    }

    BlobStoreOptions options(uint64_t cap_bytes = 1ull << 30) const {
        BlobStoreOptions o;
        o.dir = dir_ + "/store";
        o.cap_bytes = cap_bytes;
        o.chunk_bytes = kChunk;
        return o;
    }
    std::string blob_path(const std::string& digest) const { return dir_ + "/store/blobs/sha256/" + hex_of(digest); }
    std::string data_path(const std::string& digest) const { return dir_ + "/store/partial/" + hex_of(digest) + ".data"; }
    std::string meta_path(const std::string& digest) const { return dir_ + "/store/partial/" + hex_of(digest) + ".meta"; }

    // Runs the loop until pred() or the timeout; returns pred().
    bool run_until(const std::function<bool()>& pred, std::chrono::milliseconds timeout = 20s) {
        bool timed_out = false;
        const netio::OpId t = loop_.add_timer(timeout, [&] { timed_out = true; });
        loop_.run_until([&] { return timed_out || pred(); });
        loop_.cancel_timer(t);
        return pred();
    }
    // Runs until no I/O is in flight and the deferred queue ran.
    void settle() {
        for (int i = 0; i < 100; ++i) {
            ASSERT_TRUE(run_until([&] { return loop_.pending_ops() == 0; }));
            loop_.run_once(0ms);
            loop_.run_once(0ms);
            if (loop_.pending_ops() == 0) return;
        }
        FAIL() << "the loop did not settle";
    }
    bool wait_not_partial(const BlobRef& b) {
        return run_until([&] { return b->state() != BlobState::partial; });
    }

    netio::Status write_sync(const BlobRef& b, uint64_t offset, std::string_view data) {
        std::optional<netio::Status> st;
        b->write(offset, std::span<const char>(data.data(), data.size()), [&](netio::Status s) { st.emplace(std::move(s)); });
        EXPECT_FALSE(st.has_value()) << "done ran inside write()";
        if (!run_until([&] { return st.has_value(); })) return netio::Error::make("timed out");
        return std::move(*st);
    }
    // Writes whole chunks [first, last] of `content`.
    void write_chunks(const BlobRef& b, const std::string& content, uint64_t first, uint64_t last) {
        const uint64_t begin = first * kChunk;
        const uint64_t end = std::min<uint64_t>(content.size(), (last + 1) * kChunk);
        ASSERT_TRUE(write_sync(b, begin, std::string_view(content).substr(begin, end - begin)).ok());
    }

    // Acquires `content` as filler and commits it with one sequential stream.
    BlobRef put(BlobStore& store, const std::string& content) {
        const std::string digest = cas::sha256_digest(content);
        auto a = store.acquire(digest, content.size());
        EXPECT_TRUE(a.ok());
        if (!a.ok()) return nullptr;
        BlobRef b = a->blob;
        if (a->filler) {
            if (!content.empty()) {
                EXPECT_TRUE(write_sync(b, 0, content).ok());
            }
            EXPECT_TRUE(wait_not_partial(b));
        }
        EXPECT_EQ(b->state(), BlobState::committed) << b->error().message;
        return b;
    }

    netio::UringLoop loop_;
    std::string dir_;
};

TEST_F(BlobStoreTest, WriteInOrderCommits) {
    BlobStore store(loop_, options());
    const std::string content = random_bytes(16 * kChunk + 123, 1);
    const std::string digest = cas::sha256_digest(content);

    auto a = store.acquire(digest, content.size());
    ASSERT_TRUE(a.ok()) << a.error().message;
    ASSERT_TRUE(a->filler);
    BlobRef b = a->blob;
    EXPECT_EQ(b->digest(), digest);
    EXPECT_EQ(b->size(), content.size());
    EXPECT_EQ(b->state(), BlobState::partial);
    EXPECT_EQ(b->watermark(), 0u);
    EXPECT_EQ(missing(b), (Ranges{{0, content.size() - 1}}));
    EXPECT_TRUE(fs::exists(data_path(digest)));
    EXPECT_TRUE(fs::exists(meta_path(digest)));
    const int fd = b->read_fd();
    ASSERT_GE(fd, 0);

    Stream s;
    s.blob = b;
    s.content = &content;
    s.end = content.size();
    s.max_piece = 100 * 1024;
    s.next();
    ASSERT_TRUE(wait_not_partial(b));
    EXPECT_TRUE(s.done);
    EXPECT_FALSE(s.error.has_value());
    ASSERT_EQ(b->state(), BlobState::committed) << b->error().message;
    EXPECT_EQ(b->watermark(), content.size());
    EXPECT_TRUE(b->missing_ranges().empty());

    EXPECT_EQ(read_file(blob_path(digest)), content);
    EXPECT_FALSE(fs::exists(data_path(digest)));
    EXPECT_FALSE(fs::exists(meta_path(digest)));
    // The fd opened for the partial still reads the (renamed) file.
    EXPECT_EQ(b->read_fd(), fd);
    EXPECT_EQ(pread_all(fd, 0, content.size()), content);
    EXPECT_EQ(store.used_bytes(), content.size());
    EXPECT_EQ(store.blob_count(), 1u);

    auto again = store.acquire(digest, content.size());
    ASSERT_TRUE(again.ok());
    EXPECT_FALSE(again->filler);
    EXPECT_EQ(again->blob->state(), BlobState::committed);
    EXPECT_EQ(store.lookup(digest), again->blob);

    // Writing to a committed blob is a no-op that succeeds.
    EXPECT_TRUE(write_sync(b, 0, std::string_view(content).substr(0, 10)).ok());
}

TEST_F(BlobStoreTest, DropRemovesACommittedBlobNobodyHolds) {
    BlobStore store(loop_, options());
    const std::string content = random_bytes(3 * kChunk + 7, 9);
    const std::string digest = cas::sha256_digest(content);
    auto a = store.acquire(digest, content.size());
    ASSERT_TRUE(a.ok()) << a.error().message;
    BlobRef b = a->blob;
    EXPECT_FALSE(store.drop(digest));  // being filled
    ASSERT_TRUE(write_sync(b, 0, content).ok());
    ASSERT_TRUE(wait_not_partial(b));
    ASSERT_EQ(b->state(), BlobState::committed) << b->error().message;
    EXPECT_FALSE(store.drop(digest));  // still held
    EXPECT_TRUE(fs::exists(blob_path(digest)));
    a = netio::Error::make("released");
    b.reset();
    EXPECT_TRUE(store.drop(digest));
    EXPECT_FALSE(fs::exists(blob_path(digest)));
    EXPECT_EQ(store.used_bytes(), 0u);
    EXPECT_EQ(store.blob_count(), 0u);
    EXPECT_EQ(store.lookup(digest), nullptr);
    EXPECT_FALSE(store.drop(digest));  // gone
    EXPECT_FALSE(store.drop("sha256:nothex"));
    // Acquiring it again starts a new fill.
    auto again = store.acquire(digest, content.size());
    ASSERT_TRUE(again.ok());
    EXPECT_TRUE(again->filler);
}

TEST_F(BlobStoreTest, EmptyBlobCommitsWithoutWrites) {
    BlobStore store(loop_, options());
    const std::string digest = cas::sha256_digest("");
    auto a = store.acquire(digest, 0);
    ASSERT_TRUE(a.ok());
    EXPECT_TRUE(a->filler);
    EXPECT_TRUE(a->blob->missing_ranges().empty());
    ASSERT_TRUE(wait_not_partial(a->blob));
    EXPECT_EQ(a->blob->state(), BlobState::committed) << a->blob->error().message;
    EXPECT_TRUE(fs::exists(blob_path(digest)));
    EXPECT_EQ(store.blob_count(), 1u);
}

TEST_F(BlobStoreTest, ChunkMultipleSizeCommits) {
    BlobStore store(loop_, options());
    put(store, random_bytes(4 * kChunk, 2));
    put(store, random_bytes(1, 3));
    put(store, random_bytes(kChunk - 1, 4));
    EXPECT_EQ(store.blob_count(), 3u);
}

// Several ranged streams with random (unaligned) boundaries and random piece sizes, started in
// random order, plus a retried overlapping range; a reader follows the watermark and hashes
// what it reads.
class ParallelWrites : public BlobStoreTest, public ::testing::WithParamInterface<uint64_t> {};

TEST_P(ParallelWrites, OutOfOrderRangedStreamsCommit) {
    const uint64_t seed = GetParam();
    std::mt19937_64 rng(seed);
    BlobStore store(loop_, options());
    const std::string content = random_bytes(40 * kChunk + rng() % kChunk, seed);
    const std::string digest = cas::sha256_digest(content);
    auto a = store.acquire(digest, content.size());
    ASSERT_TRUE(a.ok());
    ASSERT_TRUE(a->filler);
    BlobRef b = a->blob;

    // Reader: reads [0, watermark) as it grows, via when_available.
    cas::Sha256 reader_hash;
    uint64_t read_pos = 0;
    bool reader_done = false;
    std::function<void()> follow = [&] {
        const uint64_t wm = b->watermark();
        EXPECT_GE(wm, std::min<uint64_t>(read_pos + 1, b->size()));
        if (wm > read_pos) {
            reader_hash.update(pread_all(b->read_fd(), read_pos, wm - read_pos));
            read_pos = wm;
        }
        if (b->state() != BlobState::partial || read_pos == b->size()) {
            reader_done = true;
            return;
        }
        b->when_available(read_pos + 1, follow);
    };
    b->when_available(1, follow);

    const int n_streams = 3 + static_cast<int>(rng() % 4);
    std::vector<uint64_t> cuts{0, content.size()};
    for (int i = 1; i < n_streams; ++i) cuts.push_back(rng() % content.size());
    std::sort(cuts.begin(), cuts.end());
    std::vector<std::unique_ptr<Stream>> streams;
    for (size_t i = 0; i + 1 < cuts.size(); ++i) {
        auto s = std::make_unique<Stream>();
        s->blob = b;
        s->content = &content;
        s->pos = cuts[i];
        s->end = cuts[i + 1];
        s->max_piece = 1 + rng() % (300 * 1024);
        s->rng.seed(rng());
        streams.push_back(std::move(s));
    }
    // A retry of an unaligned range that overlaps two streams.
    {
        auto s = std::make_unique<Stream>();
        s->blob = b;
        s->content = &content;
        s->pos = rng() % (content.size() / 2);
        s->end = s->pos + content.size() / 4;
        s->max_piece = 50 * 1024;
        s->rng.seed(rng());
        streams.push_back(std::move(s));
    }
    std::shuffle(streams.begin(), streams.end(), rng);
    for (auto& s : streams) s->next();

    ASSERT_TRUE(wait_not_partial(b));
    ASSERT_EQ(b->state(), BlobState::committed) << b->error().message;
    ASSERT_TRUE(run_until([&] {
        return reader_done && std::all_of(streams.begin(), streams.end(), [](auto& s) { return s->done; });
    }));
    for (auto& s : streams) EXPECT_FALSE(s->error.has_value()) << s->error->message;
    EXPECT_EQ(read_pos, content.size());
    EXPECT_EQ(reader_hash.finish_digest(), digest);
    EXPECT_EQ(read_file(blob_path(digest)), content);
}

INSTANTIATE_TEST_SUITE_P(Seeds, ParallelWrites, ::testing::Values(11, 22, 33, 44, 55, 66));

// Every piece of the blob written at once, in random order and random sizes (all in flight together).
TEST_F(BlobStoreTest, RandomPiecesAllInFlightCommit) {
    std::mt19937_64 rng(7);
    BlobStore store(loop_, options());
    const std::string content = random_bytes(24 * kChunk + 4321, 7);
    const std::string digest = cas::sha256_digest(content);
    auto a = store.acquire(digest, content.size());
    ASSERT_TRUE(a.ok());
    BlobRef b = a->blob;
    std::vector<std::pair<uint64_t, uint64_t>> pieces;
    for (uint64_t pos = 0; pos < content.size();) {
        const uint64_t n = std::min<uint64_t>(content.size() - pos, 1 + rng() % (3 * kChunk / 2));
        pieces.emplace_back(pos, n);
        pos += n;
    }
    std::shuffle(pieces.begin(), pieces.end(), rng);
    size_t done = 0;
    size_t errors = 0;
    for (auto [at, n] : pieces)
        b->write(at, std::span<const char>(content.data() + at, n), [&](netio::Status s) {
            ++done;
            if (!s) ++errors;
        });
    ASSERT_TRUE(run_until([&] { return done == pieces.size() && b->state() != BlobState::partial; }));
    EXPECT_EQ(errors, 0u);
    ASSERT_EQ(b->state(), BlobState::committed) << b->error().message;
    EXPECT_EQ(read_file(blob_path(digest)), content);
}

TEST_F(BlobStoreTest, WatermarkAdvancesOverContiguousCompleteChunksAndWakesReaders) {
    BlobStore store(loop_, options());
    const std::string content = random_bytes(4 * kChunk + 100, 5);  // chunks 0..4, the last short
    const std::string digest = cas::sha256_digest(content);
    auto a = store.acquire(digest, content.size());
    ASSERT_TRUE(a.ok());
    BlobRef b = a->blob;
    const std::string_view v(content);

    // Readers at: the end of chunk 0, the end of chunk 2, the end of the blob. Each records the
    // watermark it saw when woken.
    std::optional<uint64_t> r1, r3, r_end;
    b->when_available(kChunk, [&] { r1 = b->watermark(); });
    b->when_available(3 * kChunk, [&] { r3 = b->watermark(); });
    b->when_available(content.size(), [&] { r_end = b->watermark(); });
    // Offset 0 is available at once, but still runs deferred.
    bool r0 = false;
    b->when_available(0, [&] { r0 = true; });
    EXPECT_FALSE(r0);
    loop_.run_once(0ms);
    EXPECT_TRUE(r0);

    // Chunk 2 complete: verified, but not contiguous from 0.
    write_chunks(b, content, 2, 2);
    settle();
    EXPECT_EQ(b->watermark(), 0u);
    EXPECT_EQ(missing(b), chunk_ranges({{0, 1}, {3, 4}}, content.size()));
    // Chunk 0 all but its last byte: still incomplete.
    ASSERT_TRUE(write_sync(b, 0, v.substr(0, kChunk - 1)).ok());
    settle();
    EXPECT_EQ(b->watermark(), 0u);
    EXPECT_EQ(missing(b), chunk_ranges({{0, 1}, {3, 4}}, content.size()));
    EXPECT_FALSE(r1 || r3 || r_end);

    // The last byte of chunk 0: the watermark passes kChunk, the first reader wakes, no other.
    ASSERT_TRUE(write_sync(b, kChunk - 1, v.substr(kChunk - 1, 1)).ok());
    ASSERT_TRUE(run_until([&] { return r1.has_value(); }));
    settle();
    EXPECT_EQ(*r1, kChunk);
    EXPECT_EQ(b->watermark(), kChunk);
    EXPECT_FALSE(r3 || r_end);

    // Chunk 1 (in two unaligned pieces, second first): the watermark jumps over chunk 2 too.
    ASSERT_TRUE(write_sync(b, kChunk + 1000, v.substr(kChunk + 1000, kChunk - 1000)).ok());
    settle();
    EXPECT_EQ(b->watermark(), kChunk);
    EXPECT_FALSE(r3.has_value());
    ASSERT_TRUE(write_sync(b, kChunk, v.substr(kChunk, 1000)).ok());
    ASSERT_TRUE(run_until([&] { return r3.has_value(); }));
    EXPECT_EQ(*r3, 3 * kChunk);
    EXPECT_EQ(b->watermark(), 3 * kChunk);
    settle();
    EXPECT_FALSE(r_end.has_value());
    EXPECT_EQ(missing(b), chunk_ranges({{3, 4}}, content.size()));

    // Bytes below the watermark are readable while the blob is partial.
    EXPECT_EQ(pread_all(b->read_fd(), 0, 3 * kChunk), content.substr(0, 3 * kChunk));

    // The short last chunk, then chunk 3: the blob completes and commits.
    write_chunks(b, content, 4, 4);
    write_chunks(b, content, 3, 3);
    std::optional<BlobState> settled;
    b->when_settled([&] { settled = b->state(); });
    ASSERT_TRUE(run_until([&] { return r_end.has_value(); }));
    EXPECT_EQ(*r_end, content.size());
    ASSERT_TRUE(run_until([&] { return settled.has_value(); }));
    EXPECT_EQ(*settled, BlobState::committed) << b->error().message;
}

TEST_F(BlobStoreTest, CoroutineReaderFollowsWatermark) {
    BlobStore store(loop_, options());
    const std::string content = random_bytes(10 * kChunk + 17, 6);
    const std::string digest = cas::sha256_digest(content);
    auto a = store.acquire(digest, content.size());
    ASSERT_TRUE(a.ok());
    BlobRef b = a->blob;

    std::optional<std::string> got;
    auto reader = [](BlobRef blob, std::optional<std::string>& out) -> netio::Task<void> {
        cas::Sha256 h;
        uint64_t pos = 0;
        while (pos < blob->size()) {
            co_await blob->available(pos + 1);
            if (blob->state() == BlobState::failed) co_return;
            const uint64_t wm = blob->watermark();
            h.update(pread_all(blob->read_fd(), pos, wm - pos));
            pos = wm;
        }
        out = h.finish_digest();
    };
    auto writer = [](BlobRef blob, const std::string& data) -> netio::Task<void> {
        for (uint64_t pos = 0; pos < data.size(); pos += 30000) {
            const size_t n = std::min<size_t>(30000, data.size() - pos);
            netio::Status s = co_await blob->write_async(pos, std::span<const char>(data.data() + pos, n));
            EXPECT_TRUE(s.ok());
        }
    };
    bool committed = false;
    auto waiter = [](BlobRef blob, bool& out) -> netio::Task<void> {
        co_await blob->settled();
        out = blob->state() == BlobState::committed;
    };
    netio::spawn(waiter(b, committed));
    netio::spawn(reader(b, got));
    netio::spawn(writer(b, content));
    ASSERT_TRUE(run_until([&] { return got.has_value(); }));
    EXPECT_EQ(*got, digest);
    ASSERT_TRUE(run_until([&] { return committed; }));
    EXPECT_EQ(b->state(), BlobState::committed);
}

TEST_F(BlobStoreTest, DigestMismatchFailsRemovesFilesAndWakesReaders) {
    BlobStore store(loop_, options());
    const std::string expected = random_bytes(3 * kChunk + 5, 8);
    std::string served = expected;
    served[kChunk + 7] ^= 0x40;  // one flipped bit in transit
    const std::string digest = cas::sha256_digest(expected);
    auto a = store.acquire(digest, expected.size());
    ASSERT_TRUE(a.ok());
    BlobRef b = a->blob;
    auto other = store.acquire(digest, expected.size());  // a second reader
    ASSERT_TRUE(other.ok());
    EXPECT_FALSE(other->filler);

    // A reader at the end wakes when the watermark gets there (before the sha256 is known); one
    // waiting for the outcome wakes with the failure.
    std::optional<BlobState> at_end, settled;
    b->when_available(expected.size(), [&] { at_end = b->state(); });
    b->when_settled([&] { settled = b->state(); });
    ASSERT_TRUE(write_sync(b, 0, served).ok());
    ASSERT_TRUE(run_until([&] { return at_end && settled; }));
    EXPECT_EQ(*settled, BlobState::failed);
    ASSERT_EQ(b->state(), BlobState::failed);
    const std::string want = "sha256 mismatch: expected " + digest + ", got " + cas::sha256_digest(served);
    EXPECT_EQ(b->error().message, want);
    EXPECT_EQ(b->error().code, std::make_error_code(std::errc::bad_message));
    EXPECT_FALSE(fs::exists(data_path(digest)));
    EXPECT_FALSE(fs::exists(meta_path(digest)));
    EXPECT_FALSE(fs::exists(blob_path(digest)));
    EXPECT_EQ(store.blob_count(), 0u);
    EXPECT_EQ(store.used_bytes(), 0u);
    EXPECT_EQ(store.lookup(digest), nullptr);

    // Late readers and writers get the failure at once (deferred).
    bool late = false;
    b->when_available(1, [&] { late = true; });
    loop_.run_once(0ms);
    EXPECT_TRUE(late);
    auto st = write_sync(b, 0, std::string_view(expected).substr(0, 10));
    ASSERT_FALSE(st.ok());
    EXPECT_EQ(st.error().message, want);

    // The next acquire starts afresh and can succeed.
    auto retry = store.acquire(digest, expected.size());
    ASSERT_TRUE(retry.ok());
    EXPECT_TRUE(retry->filler);
    EXPECT_NE(retry->blob, b);
    EXPECT_EQ(missing(retry->blob), (Ranges{{0, expected.size() - 1}}));
    ASSERT_TRUE(write_sync(retry->blob, 0, expected).ok());
    ASSERT_TRUE(wait_not_partial(retry->blob));
    EXPECT_EQ(retry->blob->state(), BlobState::committed);
}

TEST_F(BlobStoreTest, SingleFlightAndInputErrors) {
    BlobStore store(loop_, options());
    const std::string content = random_bytes(2 * kChunk, 9);
    const std::string digest = cas::sha256_digest(content);

    EXPECT_EQ(store.lookup(digest), nullptr);
    auto first = store.acquire(digest, content.size());
    auto second = store.acquire(digest, content.size());
    ASSERT_TRUE(first.ok());
    ASSERT_TRUE(second.ok());
    EXPECT_TRUE(first->filler);
    EXPECT_FALSE(second->filler);
    EXPECT_EQ(first->blob, second->blob);
    EXPECT_EQ(store.lookup(digest), first->blob);
    EXPECT_FALSE(store.acquire(digest, content.size() + 1).ok());  // size differs from the in-progress blob

    auto bad = store.acquire("sha256:XYZ", 1);
    ASSERT_FALSE(bad.ok());
    EXPECT_NE(bad.error().message.find("invalid digest"), std::string::npos);
    EXPECT_FALSE(store.acquire("sha512:" + std::string(128, 'a'), 1).ok());
    EXPECT_FALSE(store.acquire(digest.substr(0, 70), 1).ok());
    EXPECT_EQ(store.lookup("nonsense"), nullptr);
    // A bogus size from a manifest is refused before anything is allocated or created.
    auto huge = store.acquire("sha256:" + std::string(64, 'e'), 1ull << 60);
    ASSERT_FALSE(huge.ok());
    EXPECT_EQ(huge.error().code, std::make_error_code(std::errc::file_too_large));
    EXPECT_FALSE(fs::exists(dir_ + "/store/partial/" + std::string(64, 'e') + ".data"));

    // A write outside the blob is an error (deferred), not a crash.
    auto st = write_sync(first->blob, content.size() - 1, "ab");
    EXPECT_FALSE(st.ok());

    ASSERT_TRUE(write_sync(first->blob, 0, content).ok());
    ASSERT_TRUE(wait_not_partial(second->blob));
    EXPECT_EQ(second->blob->state(), BlobState::committed);
    auto third = store.acquire(digest, content.size());
    ASSERT_TRUE(third.ok());
    EXPECT_FALSE(third->filler);
    EXPECT_EQ(third->blob->state(), BlobState::committed);
    auto mismatch = store.acquire(digest, content.size() - 1);
    ASSERT_FALSE(mismatch.ok());
    EXPECT_NE(mismatch.error().message.find("size mismatch"), std::string::npos);
}

TEST_F(BlobStoreTest, CrashMidBlobResumesVerifiedChunks) {
    const std::string content = random_bytes(10 * kChunk + 5, 10);  // chunks 0..10
    const std::string digest = cas::sha256_digest(content);
    {
        BlobStore store(loop_, options());
        auto a = store.acquire(digest, content.size());
        ASSERT_TRUE(a.ok());
        BlobRef b = a->blob;
        write_chunks(b, content, 0, 2);
        write_chunks(b, content, 5, 5);
        write_chunks(b, content, 7, 7);
        // Part of chunk 8 only.
        ASSERT_TRUE(write_sync(b, 8 * kChunk, std::string_view(content).substr(8 * kChunk, 1000)).ok());
        settle();
        EXPECT_EQ(missing(b), chunk_ranges({{3, 4}, {6, 6}, {8, 10}}, content.size()));
        // "Crash": the store and the blob go without a commit or a fail().
    }
    {
        BlobStore store(loop_, options());
        EXPECT_EQ(store.blob_count(), 0u);
        EXPECT_EQ(store.lookup(digest), nullptr);  // not in progress
        auto a = store.acquire(digest, content.size());
        ASSERT_TRUE(a.ok());
        EXPECT_TRUE(a->filler);
        BlobRef b = a->blob;
        EXPECT_EQ(missing(b), chunk_ranges({{3, 4}, {6, 6}, {8, 10}}, content.size()));
        EXPECT_EQ(b->watermark(), 3 * kChunk);
        for (const auto& r : b->missing_ranges())
            ASSERT_TRUE(write_sync(b, r.first, std::string_view(content).substr(r.first, r.last - r.first + 1)).ok());
        ASSERT_TRUE(wait_not_partial(b));
        ASSERT_EQ(b->state(), BlobState::committed) << b->error().message;
        EXPECT_EQ(read_file(blob_path(digest)), content);
        EXPECT_FALSE(fs::exists(data_path(digest)));
        EXPECT_FALSE(fs::exists(meta_path(digest)));
    }
}

TEST_F(BlobStoreTest, CorruptedChunkIsFetchedAgain) {
    const std::string content = random_bytes(6 * kChunk + 99, 12);  // chunks 0..6
    const std::string digest = cas::sha256_digest(content);
    {
        BlobStore store(loop_, options());
        auto a = store.acquire(digest, content.size());
        ASSERT_TRUE(a.ok());
        write_chunks(a->blob, content, 0, 3);
        settle();
        EXPECT_EQ(a->blob->watermark(), 4 * kChunk);
    }
    {
        // Flip a byte of verified chunk 1, and append a torn record to the .meta.
        netio::UniqueFd fd(::open(data_path(digest).c_str(), O_RDWR));
        ASSERT_TRUE(fd.valid());
        char c = 0;
        ASSERT_EQ(::pread(fd.get(), &c, 1, kChunk + 10), 1);
        c ^= 1;
        ASSERT_EQ(::pwrite(fd.get(), &c, 1, kChunk + 10), 1);
        std::ofstream(meta_path(digest), std::ios::binary | std::ios::app) << "torn-record";
    }
    BlobStore store(loop_, options());
    auto a = store.acquire(digest, content.size());
    ASSERT_TRUE(a.ok());
    ASSERT_TRUE(a->filler);
    BlobRef b = a->blob;
    EXPECT_EQ(missing(b), chunk_ranges({{1, 1}, {4, 6}}, content.size()));
    EXPECT_EQ(b->watermark(), kChunk);
    for (const auto& r : b->missing_ranges())
        ASSERT_TRUE(write_sync(b, r.first, std::string_view(content).substr(r.first, r.last - r.first + 1)).ok());
    ASSERT_TRUE(wait_not_partial(b));
    ASSERT_EQ(b->state(), BlobState::committed) << b->error().message;
    EXPECT_EQ(read_file(blob_path(digest)), content);
}

TEST_F(BlobStoreTest, FailKeepsVerifiedChunksForTheNextAcquire) {
    BlobStore store(loop_, options());
    const std::string content = random_bytes(5 * kChunk + 1, 13);
    const std::string digest = cas::sha256_digest(content);
    auto a = store.acquire(digest, content.size());
    ASSERT_TRUE(a.ok());
    BlobRef b = a->blob;
    write_chunks(b, content, 0, 1);
    write_chunks(b, content, 3, 3);
    settle();

    bool woken = false;
    b->when_available(content.size(), [&] { woken = true; });
    b->fail(netio::Error::make("source reset the connection"));
    EXPECT_EQ(b->state(), BlobState::failed);
    EXPECT_EQ(b->error().message, "source reset the connection");
    ASSERT_TRUE(run_until([&] { return woken; }));
    EXPECT_TRUE(fs::exists(data_path(digest)));
    EXPECT_EQ(store.lookup(digest), nullptr);

    auto again = store.acquire(digest, content.size());
    ASSERT_TRUE(again.ok());
    EXPECT_TRUE(again->filler);
    BlobRef b2 = again->blob;
    EXPECT_NE(b2, b);
    EXPECT_EQ(missing(b2), chunk_ranges({{2, 2}, {4, 5}}, content.size()));
    for (const auto& r : b2->missing_ranges())
        ASSERT_TRUE(write_sync(b2, r.first, std::string_view(content).substr(r.first, r.last - r.first + 1)).ok());
    ASSERT_TRUE(wait_not_partial(b2));
    EXPECT_EQ(b2->state(), BlobState::committed) << b2->error().message;
    EXPECT_EQ(read_file(blob_path(digest)), content);
}

TEST_F(BlobStoreTest, FailWithWritesInFlightThenResume) {
    BlobStore store(loop_, options());
    const std::string content = random_bytes(8 * kChunk, 14);
    const std::string digest = cas::sha256_digest(content);
    auto a = store.acquire(digest, content.size());
    ASSERT_TRUE(a.ok());
    BlobRef b = a->blob;
    write_chunks(b, content, 0, 0);
    settle();
    // Writes in flight when the filler gives up complete with an error.
    size_t errors = 0, done = 0;
    for (uint64_t c = 1; c < 8; ++c)
        b->write(c * kChunk, std::span<const char>(content.data() + c * kChunk, kChunk), [&](netio::Status s) {
            ++done;
            if (!s) ++errors;
        });
    b->fail(netio::Error::make("give up"));
    // A new filler starts before the old writes landed.
    auto again = store.acquire(digest, content.size());
    ASSERT_TRUE(again.ok());
    ASSERT_TRUE(again->filler);
    BlobRef b2 = again->blob;
    EXPECT_EQ(missing(b2), chunk_ranges({{1, 7}}, content.size()));
    ASSERT_TRUE(write_sync(b2, kChunk, std::string_view(content).substr(kChunk)).ok());
    ASSERT_TRUE(wait_not_partial(b2));
    EXPECT_EQ(b2->state(), BlobState::committed) << b2->error().message;
    ASSERT_TRUE(run_until([&] { return done == 7; }));
    EXPECT_EQ(errors, 7u);
    EXPECT_EQ(read_file(blob_path(digest)), content);
}

TEST_F(BlobStoreTest, AbandonedPartialResumesInProcess) {
    BlobStore store(loop_, options());
    const std::string content = random_bytes(4 * kChunk + 3, 15);
    const std::string digest = cas::sha256_digest(content);
    {
        auto a = store.acquire(digest, content.size());
        ASSERT_TRUE(a.ok());
        write_chunks(a->blob, content, 1, 2);
        settle();
    }  // every BlobRef dropped, no fail(), no commit
    settle();
    EXPECT_EQ(store.lookup(digest), nullptr);
    auto a = store.acquire(digest, content.size());
    ASSERT_TRUE(a.ok());
    EXPECT_TRUE(a->filler);
    EXPECT_EQ(missing(a->blob), chunk_ranges({{0, 0}, {3, 4}}, content.size()));
}

TEST_F(BlobStoreTest, OrphansAndLeftoversAreCleanedOnStart) {
    const std::string kept = random_bytes(kChunk + 1, 16);
    const std::string kept_digest = cas::sha256_digest(kept);
    {
        BlobStore store(loop_, options());
        put(store, kept);
    }
    const std::string p = dir_ + "/store/partial/";
    const std::string blobs = dir_ + "/store/blobs/sha256/";
    const std::string h1(64, 'a'), h2(64, 'b'), h3(64, 'c');
    auto touch_file = [](const std::string& path, std::string_view data = "x") {
        std::ofstream(path, std::ios::binary) << data;
    };
    touch_file(p + h1 + ".meta.tmp");          // a .meta rewrite cut short
    touch_file(blobs + h2 + ".tmp");           // a temporary in the committed dir
    touch_file(p + h2 + ".meta");              // .meta without .data
    touch_file(p + h3 + ".data");              // .data without .meta
    touch_file(p + hex_of(kept_digest) + ".data");  // a partial of a blob that is committed
    touch_file(p + hex_of(kept_digest) + ".meta");
    touch_file(p + h1 + ".data");              // a pair with a garbage .meta
    touch_file(p + h1 + ".meta", "not a meta file at all, too short or wrong magic");

    BlobStore store(loop_, options());
    EXPECT_EQ(store.blob_count(), 1u);
    EXPECT_TRUE(fs::exists(blob_path(kept_digest)));
    EXPECT_TRUE(fs::is_empty(p)) << "leftovers in partial/";
    EXPECT_FALSE(fs::exists(blobs + h2 + ".tmp"));
    EXPECT_EQ(read_file(blob_path(kept_digest)), kept);
}

TEST_F(BlobStoreTest, LruEvictionRespectsCapAndNeverEvictsPinned) {
    const uint64_t blob_bytes = 100 * 1000;
    BlobStore store(loop_, options(3 * blob_bytes));
    const std::string A = random_bytes(blob_bytes, 101), B = random_bytes(blob_bytes, 102),
                      C = random_bytes(blob_bytes, 103), D = random_bytes(blob_bytes, 104),
                      E = random_bytes(blob_bytes, 105);
    BlobRef pinned_a = put(store, A);
    put(store, B);
    put(store, C);
    settle();
    EXPECT_EQ(store.used_bytes(), 3 * blob_bytes);
    EXPECT_EQ(store.blob_count(), 3u);

    // D needs room: A is the least recently used but pinned, so B goes.
    put(store, D);
    settle();
    EXPECT_LE(store.used_bytes(), 3 * blob_bytes);
    EXPECT_TRUE(fs::exists(blob_path(cas::sha256_digest(A))));
    EXPECT_FALSE(fs::exists(blob_path(cas::sha256_digest(B))));
    EXPECT_TRUE(fs::exists(blob_path(cas::sha256_digest(C))));
    EXPECT_TRUE(fs::exists(blob_path(cas::sha256_digest(D))));
    EXPECT_EQ(store.lookup(cas::sha256_digest(B)), nullptr);
    EXPECT_EQ(pread_all(pinned_a->read_fd(), 0, A.size()), A);

    // Unpin A, touch C: the LRU order is now A, D, C; E evicts A.
    pinned_a.reset();
    EXPECT_NE(store.lookup(cas::sha256_digest(C)), nullptr);
    put(store, E);
    settle();
    EXPECT_LE(store.used_bytes(), 3 * blob_bytes);
    EXPECT_EQ(store.blob_count(), 3u);
    EXPECT_FALSE(fs::exists(blob_path(cas::sha256_digest(A))));
    EXPECT_TRUE(fs::exists(blob_path(cas::sha256_digest(C))));
    EXPECT_TRUE(fs::exists(blob_path(cas::sha256_digest(D))));
    EXPECT_TRUE(fs::exists(blob_path(cas::sha256_digest(E))));

    // Everything pinned: the cap is exceeded rather than a pinned blob evicted.
    std::vector<BlobRef> pins;
    for (const std::string* s : {&C, &D, &E}) pins.push_back(store.lookup(cas::sha256_digest(*s)));
    const std::string F = random_bytes(blob_bytes, 106);
    pins.push_back(put(store, F));
    settle();
    EXPECT_EQ(store.blob_count(), 4u);
    EXPECT_EQ(store.used_bytes(), 4 * blob_bytes);
    for (const std::string* s : {&C, &D, &E, &F}) EXPECT_TRUE(fs::exists(blob_path(cas::sha256_digest(*s))));
    for (const auto& ref : pins) ASSERT_NE(ref, nullptr);

    // Unpinned again: the next acquire brings the store back under the cap.
    pins.clear();
    put(store, A);
    settle();
    EXPECT_LE(store.used_bytes(), 3 * blob_bytes);
}

TEST_F(BlobStoreTest, RebuildIndexesCommittedBlobsInMtimeOrder) {
    std::vector<std::string> contents;
    for (uint64_t i = 0; i < 3; ++i) contents.push_back(random_bytes(50 * 1000 + i, 200 + i));
    {
        BlobStore store(loop_, options());
        for (const auto& c : contents) put(store, c);
    }
    // Make contents[1] the oldest, then [2], then [0].
    auto set_mtime = [&](const std::string& content, time_t sec) {
        struct timespec ts[2] = {{sec, 0}, {sec, 0}};
        ASSERT_EQ(::utimensat(AT_FDCWD, blob_path(cas::sha256_digest(content)).c_str(), ts, 0), 0);
    };
    set_mtime(contents[1], 1000);
    set_mtime(contents[2], 2000);
    set_mtime(contents[0], 3000);
    {
        BlobStore store(loop_, options());
        EXPECT_EQ(store.blob_count(), 3u);
        EXPECT_EQ(store.used_bytes(), 3 * 50 * 1000u + 3u);
        const std::string digest = cas::sha256_digest(contents[2]);
        auto a = store.acquire(digest, contents[2].size());
        ASSERT_TRUE(a.ok());
        EXPECT_FALSE(a->filler);
        EXPECT_EQ(a->blob->state(), BlobState::committed);
        EXPECT_EQ(a->blob->watermark(), contents[2].size());
        EXPECT_EQ(pread_all(a->blob->read_fd(), 0, contents[2].size()), contents[2]);
        BlobRef looked = store.lookup(cas::sha256_digest(contents[0]));
        ASSERT_NE(looked, nullptr);
        EXPECT_EQ(looked->state(), BlobState::committed);
    }
    // A smaller cap on the next start evicts in mtime order: [1] is the oldest.
    BlobStore store(loop_, options(2 * 50 * 1000 + 10));
    EXPECT_EQ(store.blob_count(), 2u);
    EXPECT_FALSE(fs::exists(blob_path(cas::sha256_digest(contents[1]))));
    EXPECT_TRUE(fs::exists(blob_path(cas::sha256_digest(contents[0]))));
    EXPECT_TRUE(fs::exists(blob_path(cas::sha256_digest(contents[2]))));
}

TEST_F(BlobStoreTest, ConstructorThrowsWhenTheDirectoryCannotBeCreated) {
    const std::string file = dir_ + "/a-file";
    std::ofstream(file) << "x";
    BlobStoreOptions o = options();
    o.dir = file + "/store";
    EXPECT_THROW({ BlobStore s(loop_, o); }, std::system_error);
    o.dir = file;
    EXPECT_THROW({ BlobStore s(loop_, o); }, std::system_error);
}

TEST_F(BlobStoreTest, BlobOutlivesTheStore) {
    const std::string content = random_bytes(3 * kChunk, 17);
    const std::string digest = cas::sha256_digest(content);
    BlobRef b;
    {
        BlobStore store(loop_, options());
        auto a = store.acquire(digest, content.size());
        ASSERT_TRUE(a.ok());
        b = a->blob;
    }
    ASSERT_TRUE(write_sync(b, 0, content).ok());
    ASSERT_TRUE(wait_not_partial(b));
    EXPECT_EQ(b->state(), BlobState::committed);
    BlobStore store(loop_, options());
    EXPECT_EQ(store.blob_count(), 1u);
}

}  // namespace
