// BlobStore: the content-addressed blob cache on disk. Blobs are addressed by their sha256 digest
// and kept as plain files under BlobStoreOptions::dir:
//
//   DIR/blobs/sha256/<hex>      committed blobs (sha256 verified), LRU order = file mtime
//   DIR/partial/<hex>.data      a blob being filled, preallocated (sparse) to its full size
//   DIR/partial/<hex>.meta      its checksums: a 32-byte header {magic, size, chunk_bytes, check} then
//                               append-only 24-byte records {chunk index, xxh3-64, check}; `check`
//                               is an xxh3 of the record itself, so a torn or zero-filled record is
//                               recognised and skipped on the next start
//   DIR/partial/*.tmp           temporaries (a .meta being rewritten); removed on start
//
// Filling. A blob is fetched by several ranged streams in parallel, each writing its range in
// pieces, in any order. The blob is cut into chunks of `chunk_bytes` (the last may be short). When
// every byte of a chunk has been written (and no write into it is still in flight) the chunk is
// read back, its xxh3 is appended to .meta, and it becomes verified (immutable: later writes into
// it are dropped and reported as done). The watermark is the contiguous prefix of verified chunks;
// the sha256 of the blob is computed in order behind it, by reading the verified chunks back (a
// chunk sealed while it is the next one for the sha256 is read only once). When the sha256 covers
// the whole blob it is compared with the digest: on a match the data file is fsync'ed, renamed into
// blobs/sha256/ (and the directory fsync'ed), the .meta removed, and the blob is committed; on a
// mismatch both partial files are removed and the blob fails ("sha256 mismatch: ..."). Memory per
// blob in flight is bounded by the read-back buffers (at most 3 x min(chunk_bytes, 1 MiB)) plus
// one small record per chunk; no blob is ever held in memory.
//
// Resume. On start the store indexes committed blobs, removes temporaries and leftovers, and for
// each partial re-reads every chunk listed in its .meta and checks its xxh3 (plain pread: this is
// set-up, not the data path); chunks that fail are dropped. acquire() of that digest then returns
// a partial whose missing_ranges() exclude the verified chunks. A filler that gives up calls
// Blob::fail(): its verified chunks stay on disk, and the next acquire() resumes from them.
// Neither .data nor .meta is fsync'ed before the commit: every record is re-checked against the
// data on the next start, so a lost write costs a re-fetch, never a wrong byte. Files in
// blobs/sha256/ are trusted on start (they were verified before the rename), not re-hashed.
//
// Single flight. acquire() makes the first caller for a digest that is not committed the filler;
// concurrent callers share the same Blob and follow its watermark (when_available / available).
// The filler must end in a commit (all missing ranges written) or in fail(): a partial Blob whose
// filler just dropped its BlobRef keeps its readers waiting.
//
// Cache size. Committed blobs are accounted in used_bytes(); after a commit or an acquire, while
// the committed bytes plus the sizes of blobs being filled exceed cap_bytes, the least recently
// used committed blobs that no BlobRef (and no in-flight I/O) holds are deleted. acquire() and
// lookup() touch a blob (LRU order, persisted as the file's mtime).
//
// Threading: loop thread only (the loop the store was built with), including BlobRef destruction.
// Ownership: the store owns its index; a Blob is shared (BlobRef) by the store's callers and by its
// own in-flight I/O. A Blob may outlive the store (it keeps working on its files, unindexed); the
// loop must outlive both. Data-path I/O (writes, read-backs, fsync) goes through the loop; file
// creation, rename, unlink and directory scans are plain syscalls.
// Errors: the constructor throws std::system_error when the directory cannot be created or read
// (or std::invalid_argument for bad options); everything else returns errors as values.
#pragma once

#include <coroutine>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <list>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "cas/digest.h"
#include "netio/http_client.h"  // netio::ByteRange
#include "netio/result.h"
#include "netio/unique_fd.h"
#include "netio/uring_loop.h"

namespace cas {

struct BlobStoreOptions {
    std::string dir;
    uint64_t cap_bytes = 8ull << 30;
    uint64_t chunk_bytes = 4u << 20;  // granularity of checksums, resume and the watermark
    // fsync data and directory on commit. A cache that lives only as long as one run (removed at
    // exit) gains nothing from it, and the fsync of a multi-GiB blob sits on the critical path of
    // every upload waiting for the verdict.
    bool durable = true;
};

enum class BlobState { partial, committed, failed };

class BlobStore;
class Blob;
using BlobRef = std::shared_ptr<Blob>;

// One blob, committed or being filled. Obtained from BlobStore::acquire/lookup only.
class Blob : public std::enable_shared_from_this<Blob> {
    struct Passkey {
        explicit Passkey() = default;
    };

public:
    // ---- state (any holder) ----
    const std::string& digest() const noexcept { return digest_; }  // "sha256:<hex>"
    uint64_t size() const noexcept { return size_; }
    BlobState state() const noexcept { return state_; }
    // Why the blob failed (empty message unless state() == failed). A sha256 mismatch has code
    // std::errc::bad_message and the message "sha256 mismatch: expected sha256:X, got sha256:Y".
    const netio::Error& error() const noexcept { return error_; }
    // An fd open on the blob's data, for reading (pread or UringLoop::read_at) below watermark().
    // Opened once: it stays valid while this Blob lives, across the rename on commit.
    int read_fd() const noexcept { return data_fd_.get(); }
    // Chunk-aligned byte ranges that are not yet complete (merged; `last` inclusive). Empty once
    // every chunk is complete or the blob left the partial state.
    std::vector<netio::ByteRange> missing_ranges() const;
    // Bytes [0, watermark()) are written, xxh3-checksummed and readable. It reaches size() before
    // the sha256 is checked: an upload may send bytes up to the watermark, but must finalise on a
    // target only once state() == committed (when_settled), never on watermark() == size().
    uint64_t watermark() const noexcept;
    uint64_t chunk_bytes() const noexcept { return chunk_bytes_; }

    // ---- writer (the filler) ----
    // Writes `data` at `offset` (any offset and length inside the blob). The buffer must stay
    // valid until `done` runs. `done` runs exactly once, on the loop, never inside write(): ok
    // once the bytes are on the file (or were not needed: that chunk is already verified, or the
    // blob is already committed); an error for an I/O failure, a range outside the blob, or a blob
    // that failed meanwhile.
    void write(uint64_t offset, std::span<const char> data, std::function<void(netio::Status)> done);
    // The filler gives up: the blob goes to failed with `err`, waiting readers are woken, writes
    // still in flight complete with an error. Verified chunks stay on disk; the next acquire()
    // of the digest resumes from them (readers of this Blob must acquire() again to follow the
    // new one; that new partial seals no chunk until this Blob's last write has landed). Ignored
    // once the blob is complete (commit in progress) or no longer partial.
    void fail(netio::Error err);

    // ---- readers (uploads following the watermark) ----
    // `cb` runs on the loop (always deferred, never inside this call) once watermark() >= offset
    // or the blob is no longer partial; the callback checks state() itself. Keep the BlobRef
    // while waiting: callbacks of a destroyed Blob are dropped.
    void when_available(uint64_t offset, std::function<void()> cb);
    // `cb` runs on the loop (deferred) once the blob is committed or failed.
    void when_settled(std::function<void()> cb) { when_available(UINT64_MAX, std::move(cb)); }

    // co_await blob->available(offset): resumes on the loop under the same condition.
    struct AvailableAwaiter {
        Blob& blob;
        uint64_t offset;
        bool await_ready() const noexcept {
            return blob.state() != BlobState::partial || blob.watermark() >= offset;
        }
        void await_suspend(std::coroutine_handle<> h) {
            blob.when_available(offset, [h] { h.resume(); });
        }
        void await_resume() const noexcept {}
    };
    AvailableAwaiter available(uint64_t offset) noexcept { return {*this, offset}; }
    // co_await blob->settled(): resumes once the blob is committed or failed.
    AvailableAwaiter settled() noexcept { return {*this, UINT64_MAX}; }

    // co_await blob->write_async(offset, data) -> netio::Status (same contract as write()).
    struct WriteAwaiter {
        Blob& blob;
        uint64_t offset;
        std::span<const char> data;
        std::optional<netio::Status> status{};
        bool await_ready() const noexcept { return false; }
        void await_suspend(std::coroutine_handle<> h) {
            blob.write(offset, data, [this, h](netio::Status s) {
                status.emplace(std::move(s));
                h.resume();
            });
        }
        netio::Status await_resume() { return std::move(*status); }
    };
    WriteAwaiter write_async(uint64_t offset, std::span<const char> data) noexcept {
        return {*this, offset, data};
    }

    // ---- internals (public for make_shared only; the Passkey keeps them private) ----
    struct Files {
        std::string data_path;    // partial/<hex>.data (the committed path when committed)
        std::string meta_path;    // partial/<hex>.meta
        std::string final_path;   // blobs/sha256/<hex>
        std::string blobs_dir;    // blobs/sha256
    };
    Blob(Passkey, netio::UringLoop& loop, BlobStore* store, std::string hex, uint64_t size,
         uint64_t chunk_bytes, Files files, netio::UniqueFd data_fd);
    ~Blob();
    Blob(const Blob&) = delete;
    Blob& operator=(const Blob&) = delete;

private:
    friend class BlobStore;

    enum class ChunkState : uint8_t { open, sealing, verified };
    struct Chunk {
        ChunkState state = ChunkState::open;
        uint32_t writes_in_flight = 0;
        uint64_t xxh3 = 0;
    };
    struct WriteJoin;
    struct WritePiece;
    struct ReadBack;

    // Set-up by the store.
    static BlobRef make_committed(netio::UringLoop& loop, BlobStore* store, std::string hex, uint64_t size,
                                  Files files, netio::UniqueFd fd);
    static BlobRef make_partial(netio::UringLoop& loop, BlobStore* store, std::string hex, uint64_t size,
                                uint64_t chunk_bytes, Files files, netio::UniqueFd data_fd,
                                netio::UniqueFd meta_fd, uint64_t meta_end,
                                const std::vector<std::pair<uint64_t, uint64_t>>& verified);
    void start();  // first pump, deferred (resumed chunks, empty blob)
    std::vector<std::pair<uint64_t, uint64_t>> verified_chunks() const;
    uint64_t chunk_begin(size_t i) const noexcept { return i * chunk_bytes_; }
    uint64_t chunk_end(size_t i) const noexcept;

    // Write path.
    void submit_piece(std::shared_ptr<WritePiece> piece);
    void on_piece_done(const WritePiece& piece, std::optional<netio::Error> err);
    void add_written(uint64_t begin, uint64_t end);
    bool covered(uint64_t begin, uint64_t end) const;
    void try_seal(size_t chunk);
    bool predecessor_busy() const noexcept;
    void on_predecessor_drained();

    // Read-back pipeline: seal (xxh3 + meta record), sha256 in order, commit.
    void pump();
    void start_read_back(size_t chunk, bool seal, bool hash);
    void continue_read_back(std::shared_ptr<ReadBack> rb);
    void on_read_piece(std::shared_ptr<ReadBack> rb, int res);
    void append_meta_record(size_t chunk, uint64_t xxh3);
    void advance_watermark();
    void finalize();
    void on_data_synced(int res);
    void on_dir_synced(int res);
    void discard_mismatch(const std::string& got_hex);
    void fail_internal(netio::Error err);

    void wake_waiters(bool all);

    netio::UringLoop& loop_;
    BlobStore* store_;  // null once the store is gone
    std::string hex_;
    std::string digest_;
    uint64_t size_;
    uint64_t chunk_bytes_;
    Files files_;
    netio::UniqueFd data_fd_;
    netio::UniqueFd meta_fd_;
    uint64_t meta_end_ = 0;

    BlobState state_ = BlobState::partial;
    netio::Error error_{};
    std::vector<Chunk> chunks_;
    std::map<uint64_t, uint64_t> written_;  // completed writes, merged: begin -> end
    size_t writes_in_flight_ = 0;
    std::deque<size_t> seal_queue_;
    size_t seal_reads_ = 0;
    size_t watermark_chunks_ = 0;  // chunks [0, n) verified
    size_t sha_next_ = 0;          // chunks [0, n) hashed into sha_
    bool sha_reading_ = false;
    bool finalizing_ = false;
    Sha256 sha_;

    // A failed Blob of the same digest whose writes into the same file are still in flight: no
    // chunk is sealed until they land (they could overwrite bytes after the read-back).
    std::shared_ptr<Blob> predecessor_;
    std::weak_ptr<Blob> successor_;

    std::multimap<uint64_t, std::function<void()>> waiters_;  // by offset
};

struct Acquired {
    BlobRef blob;
    bool filler = false;  // true: the caller must fetch missing_ranges() and write them
};

class BlobStore {
public:
    BlobStore(netio::UringLoop& loop, BlobStoreOptions opts);
    ~BlobStore();
    BlobStore(const BlobStore&) = delete;
    BlobStore& operator=(const BlobStore&) = delete;

    // The blob for `digest` ("sha256:<64 lowercase hex>") of `size` bytes: committed (filler
    // false), being filled by someone else (filler false, same Blob), or a new or resumed partial
    // that the caller must fill (filler true). Errors: invalid digest, size differing from the
    // committed or in-progress blob's, a size over 2^20 chunks, or files that cannot be created.
    // A failed Blob is never returned: after a failure, acquire() starts a new (resumed) partial.
    netio::Result<Acquired> acquire(std::string_view digest, uint64_t size);
    // The committed or in-progress blob, or nullptr (also for an invalid digest).
    BlobRef lookup(std::string_view digest);
    // Removes a committed blob that nobody holds now, before the LRU would: a cache that lives for
    // one run frees each blob once every target has it. False (nothing done) if the blob is held,
    // not committed, or the digest is invalid.
    bool drop(std::string_view digest);

    uint64_t used_bytes() const noexcept { return used_bytes_; }  // committed bytes
    size_t blob_count() const noexcept { return committed_.size(); }  // committed blobs
    const BlobStoreOptions& options() const noexcept { return opts_; }

private:
    friend class Blob;

    struct Committed {
        uint64_t size = 0;
        std::list<std::string>::iterator lru;
    };
    struct Partial {  // a partial on disk with no live Blob
        uint64_t size = 0;
        uint64_t chunk_bytes = 0;
        std::vector<std::pair<uint64_t, uint64_t>> verified;  // chunk index, xxh3
    };

    Blob::Files files_for(const std::string& hex) const;
    void scan_committed();
    void scan_partials();
    BlobRef live_blob(const std::string& hex) const;
    BlobRef open_committed(const std::string& hex);
    netio::Result<BlobRef> open_partial(const std::string& hex, uint64_t size);
    void touch(const std::string& hex);
    void evict_if_needed();
    void remove_partial_files(const std::string& hex) noexcept;

    // From Blob.
    void on_blob_committed(const std::string& hex, uint64_t size);
    void on_blob_discarded(const std::string& hex);
    void on_blob_released(const Blob* blob, const std::string& hex, uint64_t size, uint64_t chunk_bytes,
                          std::vector<std::pair<uint64_t, uint64_t>> verified);
    void on_blob_destroyed(const std::string& hex);

    netio::UringLoop& loop_;
    BlobStoreOptions opts_;
    std::string blobs_dir_;
    std::string partial_dir_;
    std::unordered_map<std::string, Committed> committed_;
    std::list<std::string> lru_;  // front = least recently used
    uint64_t used_bytes_ = 0;
    std::unordered_map<std::string, std::weak_ptr<Blob>> live_;
    std::unordered_map<std::string, Partial> partials_;
};

}  // namespace cas
