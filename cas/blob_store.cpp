#include "cas/blob_store.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <array>
#include <cassert>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <stdexcept>
#include <system_error>
#include <tuple>

namespace cas {

namespace {

namespace fs = std::filesystem;

constexpr std::string_view kSha256Prefix = "sha256:";

// .meta layout (host byte order: the file never leaves this machine).
constexpr std::array<char, 8> kMetaMagic = {'C', 'D', 'C', 'A', 'S', 'M', '0', '1'};
constexpr size_t kMetaHeaderBytes = 32;  // magic, size, chunk_bytes, check
constexpr size_t kMetaRecordBytes = 24;  // chunk index, xxh3, check
constexpr uint64_t kHeaderSeed = 0x63646361732d6864ull;  // distinct seeds: a header never passes
constexpr uint64_t kRecordSeed = 0x63646361732d7263ull;  // as a record, nor a record as a header

// Limits on the read-back pipeline of one blob: memory is (seal reads + 1 sha read) x piece.
constexpr size_t kMaxSealReads = 2;
constexpr size_t kReadPieceMaxBytes = 1u << 20;
// A single write/read SQE never asks for more than this (the kernel caps one at ~2 GiB anyway).
constexpr size_t kIoMaxBytes = 1u << 30;
// A blob is tracked with 16 bytes per chunk: sizes beyond this many chunks are refused (4 TiB at
// the default 4 MiB chunks), so a bogus size from a manifest cannot exhaust memory.
constexpr uint64_t kMaxChunks = 1u << 20;

struct XxhStateDeleter {
    void operator()(XXH3_state_t* s) const noexcept { XXH3_freeState(s); }
};
using XxhState = std::unique_ptr<XXH3_state_t, XxhStateDeleter>;

XxhState new_xxh_state() {
    XxhState s(XXH3_createState());
    if (!s) throw std::bad_alloc();
    XXH3_64bits_reset(s.get());
    return s;
}

std::error_code errno_code(int e) noexcept { return {e, std::system_category()}; }

netio::Error sys_error(int e, const std::string& what) {
    return netio::Error{errno_code(e), what + ": " + errno_code(e).message()};
}

void put_u64(char* p, uint64_t v) noexcept { std::memcpy(p, &v, sizeof v); }
uint64_t get_u64(const char* p) noexcept {
    uint64_t v;
    std::memcpy(&v, p, sizeof v);
    return v;
}

std::array<char, kMetaHeaderBytes> encode_header(uint64_t size, uint64_t chunk_bytes) noexcept {
    std::array<char, kMetaHeaderBytes> b{};
    std::memcpy(b.data(), kMetaMagic.data(), kMetaMagic.size());
    put_u64(b.data() + 8, size);
    put_u64(b.data() + 16, chunk_bytes);
    put_u64(b.data() + 24, XXH3_64bits_withSeed(b.data(), 24, kHeaderSeed));
    return b;
}

std::array<char, kMetaRecordBytes> encode_record(uint64_t chunk, uint64_t xxh3) noexcept {
    std::array<char, kMetaRecordBytes> b{};
    put_u64(b.data(), chunk);
    put_u64(b.data() + 8, xxh3);
    put_u64(b.data() + 16, XXH3_64bits_withSeed(b.data(), 16, kRecordSeed));
    return b;
}

struct ParsedMeta {
    uint64_t size = 0;
    uint64_t chunk_bytes = 0;
    std::map<uint64_t, uint64_t> records;  // chunk index -> xxh3
};

uint64_t chunk_count_for(uint64_t size, uint64_t chunk_bytes) noexcept {
    return size / chunk_bytes + (size % chunk_bytes != 0);
}

// A bad header rejects the file; a bad record (torn append, hole) is skipped.
std::optional<ParsedMeta> parse_meta(std::string_view bytes) {
    if (bytes.size() < kMetaHeaderBytes) return std::nullopt;
    const char* h = bytes.data();
    if (std::memcmp(h, kMetaMagic.data(), kMetaMagic.size()) != 0) return std::nullopt;
    if (get_u64(h + 24) != XXH3_64bits_withSeed(h, 24, kHeaderSeed)) return std::nullopt;
    ParsedMeta m;
    m.size = get_u64(h + 8);
    m.chunk_bytes = get_u64(h + 16);
    if (m.chunk_bytes == 0 || chunk_count_for(m.size, m.chunk_bytes) > kMaxChunks) return std::nullopt;
    const uint64_t chunks = chunk_count_for(m.size, m.chunk_bytes);
    for (size_t pos = kMetaHeaderBytes; pos + kMetaRecordBytes <= bytes.size(); pos += kMetaRecordBytes) {
        const char* r = bytes.data() + pos;
        if (get_u64(r + 16) != XXH3_64bits_withSeed(r, 16, kRecordSeed)) continue;
        const uint64_t index = get_u64(r);
        if (index < chunks) m.records[index] = get_u64(r + 8);
    }
    return m;
}

std::optional<std::string> read_small_file(const std::string& path) {
    netio::UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
    if (!fd.valid()) return std::nullopt;
    std::string out;
    char buf[64 * 1024];
    for (;;) {
        const ssize_t n = ::read(fd.get(), buf, sizeof buf);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) return std::nullopt;
        if (n == 0) return out;
        out.append(buf, static_cast<size_t>(n));
    }
}

bool write_all(int fd, std::string_view bytes) noexcept {
    while (!bytes.empty()) {
        const ssize_t n = ::write(fd, bytes.data(), bytes.size());
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return false;
        bytes.remove_prefix(static_cast<size_t>(n));
    }
    return true;
}

// xxh3 of [offset, offset+len) of `fd` by plain pread (start-up verification only).
std::optional<uint64_t> xxh3_of_file_range(int fd, uint64_t offset, uint64_t len, std::span<char> buf) {
    XxhState st = new_xxh_state();
    while (len > 0) {
        const size_t want = static_cast<size_t>(std::min<uint64_t>(len, buf.size()));
        const ssize_t n = ::pread(fd, buf.data(), want, static_cast<off_t>(offset));
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return std::nullopt;
        XXH3_64bits_update(st.get(), buf.data(), static_cast<size_t>(n));
        offset += static_cast<uint64_t>(n);
        len -= static_cast<uint64_t>(n);
    }
    return XXH3_64bits_digest(st.get());
}

bool ends_with(std::string_view s, std::string_view suffix) noexcept {
    return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}

bool is_hex64(std::string_view s) noexcept {
    return s.size() == 64 && std::all_of(s.begin(), s.end(), [](char c) {
               return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
           });
}

// Names in a directory (set-up only: throws std::system_error when it cannot be read).
std::vector<std::string> list_dir(const std::string& dir) {
    std::vector<std::string> names;
    std::error_code ec;
    for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec))
        names.push_back(it->path().filename().string());
    if (ec) throw std::system_error(ec, "BlobStore: cannot read " + dir);
    return names;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Blob

struct Blob::WriteJoin {
    size_t pending = 1;  // pieces in flight, +1 while write() is still splitting
    std::optional<netio::Error> error;
    std::function<void(netio::Status)> done;
};

struct Blob::WritePiece {
    std::shared_ptr<WriteJoin> join;
    size_t chunk = 0;
    uint64_t offset = 0;
    const char* data = nullptr;
    size_t len = 0;
    size_t written = 0;
};

struct Blob::ReadBack {
    size_t chunk = 0;
    bool seal = false;  // compute the xxh3, then the chunk is verified
    bool hash = false;  // feed the sha256 (the chunk is the next one in order)
    uint64_t pos = 0;
    uint64_t end = 0;
    std::unique_ptr<char[]> buf;
    size_t buf_bytes = 0;
    XxhState xxh;
};

Blob::Blob(Passkey, netio::UringLoop& loop, BlobStore* store, std::string hex, uint64_t size,
           uint64_t chunk_bytes, Files files, netio::UniqueFd data_fd)
    : loop_(loop),
      store_(store),
      hex_(std::move(hex)),
      digest_(std::string(kSha256Prefix) + hex_),
      size_(size),
      chunk_bytes_(chunk_bytes),
      files_(std::move(files)),
      data_fd_(std::move(data_fd)) {}

Blob::~Blob() {
    if (!store_) return;
    if (state_ == BlobState::partial) store_->on_blob_released(this, hex_, size_, chunk_bytes_, verified_chunks());
    store_->on_blob_destroyed(hex_);
}

BlobRef Blob::make_committed(netio::UringLoop& loop, BlobStore* store, std::string hex, uint64_t size,
                             Files files, netio::UniqueFd fd) {
    auto b = std::make_shared<Blob>(Passkey{}, loop, store, std::move(hex), size, 0, std::move(files), std::move(fd));
    b->state_ = BlobState::committed;
    return b;
}

BlobRef Blob::make_partial(netio::UringLoop& loop, BlobStore* store, std::string hex, uint64_t size,
                           uint64_t chunk_bytes, Files files, netio::UniqueFd data_fd, netio::UniqueFd meta_fd,
                           uint64_t meta_end, const std::vector<std::pair<uint64_t, uint64_t>>& verified) {
    auto b = std::make_shared<Blob>(Passkey{}, loop, store, std::move(hex), size, chunk_bytes, std::move(files),
                                    std::move(data_fd));
    b->meta_fd_ = std::move(meta_fd);
    b->meta_end_ = meta_end;
    b->chunks_.resize(static_cast<size_t>(chunk_count_for(size, chunk_bytes)));
    for (const auto& [index, xxh3] : verified) {
        if (index >= b->chunks_.size()) continue;
        b->chunks_[index].state = ChunkState::verified;
        b->chunks_[index].xxh3 = xxh3;
        b->add_written(b->chunk_begin(index), b->chunk_end(index));
    }
    b->advance_watermark();
    return b;
}

void Blob::start() {
    // Resumed chunks are hashed and an empty blob commits without any write.
    loop_.defer([self = shared_from_this()] { self->pump(); });
}

uint64_t Blob::chunk_end(size_t i) const noexcept { return std::min(size_, (i + 1) * chunk_bytes_); }

std::vector<std::pair<uint64_t, uint64_t>> Blob::verified_chunks() const {
    std::vector<std::pair<uint64_t, uint64_t>> out;
    for (size_t i = 0; i < chunks_.size(); ++i)
        if (chunks_[i].state == ChunkState::verified) out.emplace_back(i, chunks_[i].xxh3);
    return out;
}

std::vector<netio::ByteRange> Blob::missing_ranges() const {
    std::vector<netio::ByteRange> out;
    if (state_ != BlobState::partial) return out;
    for (size_t i = 0; i < chunks_.size(); ++i) {
        if (chunks_[i].state != ChunkState::open) continue;
        const uint64_t first = chunk_begin(i);
        const uint64_t last = chunk_end(i) - 1;
        if (!out.empty() && out.back().last + 1 == first)
            out.back().last = last;
        else
            out.push_back(netio::ByteRange{first, last});
    }
    return out;
}

uint64_t Blob::watermark() const noexcept {
    if (state_ == BlobState::committed) return size_;
    return std::min<uint64_t>(size_, watermark_chunks_ * chunk_bytes_);
}

// ---- write path ----

void Blob::write(uint64_t offset, std::span<const char> data, std::function<void(netio::Status)> done) {
    auto finish_later = [this, &done](netio::Status s) {
        loop_.defer([done = std::move(done), s = std::move(s)]() mutable { done(std::move(s)); });
    };
    if (state_ == BlobState::committed) return finish_later(netio::ok_status());
    if (state_ == BlobState::failed) return finish_later(error_);
    if (offset > size_ || data.size() > size_ - offset)
        return finish_later(netio::Error::make(
            "write of [" + std::to_string(offset) + ", " + std::to_string(offset + data.size()) +
                ") is outside blob " + digest_ + " of " + std::to_string(size_) + " bytes",
            std::make_error_code(std::errc::invalid_argument)));
    if (data.empty()) return finish_later(netio::ok_status());

    auto join = std::make_shared<WriteJoin>();
    join->done = std::move(done);
    const uint64_t end = offset + data.size();
    for (size_t c = static_cast<size_t>(offset / chunk_bytes_); c < chunks_.size() && chunk_begin(c) < end; ++c) {
        // A chunk that is sealing or verified is immutable: its bytes are already there.
        if (chunks_[c].state != ChunkState::open) continue;
        const uint64_t piece_begin = std::max(offset, chunk_begin(c));
        const uint64_t piece_end = std::min(end, chunk_end(c));
        auto piece = std::make_shared<WritePiece>();
        piece->join = join;
        piece->chunk = c;
        piece->offset = piece_begin;
        piece->data = data.data() + (piece_begin - offset);
        piece->len = static_cast<size_t>(piece_end - piece_begin);
        ++chunks_[c].writes_in_flight;
        ++writes_in_flight_;
        ++join->pending;
        submit_piece(std::move(piece));
    }
    // Completions arrive on later turns, so this never finishes the join when a piece is in flight.
    if (--join->pending == 0) {
        loop_.defer([join] { join->done(netio::ok_status()); });
    }
}

void Blob::submit_piece(std::shared_ptr<WritePiece> piece) {
    const size_t len = std::min(piece->len - piece->written, kIoMaxBytes);
    const char* p = piece->data + piece->written;
    const uint64_t at = piece->offset + piece->written;
    loop_.write_at(data_fd_.get(), p, len, at, [self = shared_from_this(), piece](int res) mutable {
        if (res == -EINTR || res == -EAGAIN) return self->submit_piece(std::move(piece));
        if (res < 0) return self->on_piece_done(*piece, sys_error(-res, "write " + self->files_.data_path));
        if (res == 0)
            return self->on_piece_done(*piece, netio::Error::make("write " + self->files_.data_path + " made no progress"));
        piece->written += static_cast<size_t>(res);
        // Short write: resubmit the remainder.
        if (piece->written < piece->len) return self->submit_piece(std::move(piece));
        self->on_piece_done(*piece, std::nullopt);
    });
}

void Blob::on_piece_done(const WritePiece& piece, std::optional<netio::Error> err) {
    --chunks_[piece.chunk].writes_in_flight;
    --writes_in_flight_;
    WriteJoin& join = *piece.join;
    if (err) {
        if (!join.error) join.error = std::move(err);
    } else if (state_ == BlobState::partial) {
        add_written(piece.offset, piece.offset + piece.len);
    }
    if (state_ == BlobState::partial) {
        try_seal(piece.chunk);
    } else if (state_ == BlobState::failed && writes_in_flight_ == 0) {
        if (auto next = successor_.lock()) loop_.defer([next] { next->on_predecessor_drained(); });
    }
    if (--join.pending > 0) return;
    if (!join.error && state_ == BlobState::failed) join.error = error_;
    auto join_ref = piece.join;  // `piece` may be the last owner of the join
    if (join_ref->error)
        join_ref->done(std::move(*join_ref->error));
    else
        join_ref->done(netio::ok_status());
}

void Blob::add_written(uint64_t begin, uint64_t end) {
    auto it = written_.upper_bound(begin);
    if (it != written_.begin()) {
        auto prev = std::prev(it);
        if (prev->second >= begin) {
            begin = prev->first;
            end = std::max(end, prev->second);
            it = written_.erase(prev);
        }
    }
    while (it != written_.end() && it->first <= end) {
        end = std::max(end, it->second);
        it = written_.erase(it);
    }
    written_.emplace(begin, end);
}

bool Blob::covered(uint64_t begin, uint64_t end) const {
    auto it = written_.upper_bound(begin);
    if (it == written_.begin()) return false;
    --it;
    return it->first <= begin && it->second >= end;
}

bool Blob::predecessor_busy() const noexcept { return predecessor_ && predecessor_->writes_in_flight_ > 0; }

void Blob::on_predecessor_drained() {
    if (predecessor_busy()) return;
    predecessor_.reset();
    if (state_ != BlobState::partial) return;
    for (size_t c = 0; c < chunks_.size(); ++c) try_seal(c);
}

void Blob::try_seal(size_t c) {
    Chunk& ch = chunks_[c];
    if (ch.state != ChunkState::open || ch.writes_in_flight > 0 || predecessor_busy()) return;
    if (!covered(chunk_begin(c), chunk_end(c))) return;
    ch.state = ChunkState::sealing;
    seal_queue_.push_back(c);
    pump();
}

// ---- read-back pipeline ----

void Blob::pump() {
    if (state_ != BlobState::partial || finalizing_) return;
    while (seal_reads_ < kMaxSealReads && !seal_queue_.empty()) {
        const size_t c = seal_queue_.front();
        seal_queue_.pop_front();
        // The next chunk in sha256 order is hashed from the same read.
        const bool hash = !sha_reading_ && c == sha_next_;
        start_read_back(c, true, hash);
    }
    if (!sha_reading_ && sha_next_ < chunks_.size() && chunks_[sha_next_].state == ChunkState::verified)
        start_read_back(sha_next_, false, true);
    if (!sha_reading_ && sha_next_ == chunks_.size()) finalize();
}

void Blob::start_read_back(size_t c, bool seal, bool hash) {
    auto rb = std::make_shared<ReadBack>();
    rb->chunk = c;
    rb->seal = seal;
    rb->hash = hash;
    rb->pos = chunk_begin(c);
    rb->end = chunk_end(c);
    rb->buf_bytes = static_cast<size_t>(std::min<uint64_t>(rb->end - rb->pos, kReadPieceMaxBytes));
    rb->buf = std::make_unique_for_overwrite<char[]>(rb->buf_bytes);
    if (seal) {
        rb->xxh = new_xxh_state();
        ++seal_reads_;
    }
    if (hash) sha_reading_ = true;
    continue_read_back(std::move(rb));
}

void Blob::continue_read_back(std::shared_ptr<ReadBack> rb) {
    const size_t want = static_cast<size_t>(std::min<uint64_t>(rb->end - rb->pos, rb->buf_bytes));
    char* buf = rb->buf.get();
    const uint64_t at = rb->pos;
    loop_.read_at(data_fd_.get(), buf, want, at,
                  [self = shared_from_this(), rb = std::move(rb)](int res) mutable {
                      self->on_read_piece(std::move(rb), res);
                  });
}

void Blob::on_read_piece(std::shared_ptr<ReadBack> rb, int res) {
    auto release = [this, &rb] {
        if (rb->seal) --seal_reads_;
        if (rb->hash) sha_reading_ = false;
    };
    if (state_ != BlobState::partial) return release();
    if (res == -EINTR || res == -EAGAIN) return continue_read_back(std::move(rb));
    if (res <= 0) {
        release();
        const std::string what = "read back chunk " + std::to_string(rb->chunk) + " of " + files_.data_path;
        return fail_internal(res < 0 ? sys_error(-res, what) : netio::Error::make(what + ": unexpected end of file"));
    }
    const std::span<const char> got(rb->buf.get(), static_cast<size_t>(res));
    if (rb->seal) XXH3_64bits_update(rb->xxh.get(), got.data(), got.size());
    if (rb->hash) sha_.update(got);
    rb->pos += static_cast<uint64_t>(res);
    if (rb->pos < rb->end) return continue_read_back(std::move(rb));

    release();
    if (rb->hash) {
        assert(sha_next_ == rb->chunk);
        ++sha_next_;
    }
    if (rb->seal) {
        Chunk& ch = chunks_[rb->chunk];
        ch.xxh3 = XXH3_64bits_digest(rb->xxh.get());
        ch.state = ChunkState::verified;
        append_meta_record(rb->chunk, ch.xxh3);
        advance_watermark();
    }
    rb.reset();  // free the buffer before the next read is started
    pump();
}

void Blob::append_meta_record(size_t c, uint64_t xxh3) {
    if (!meta_fd_.valid()) return;
    // Best effort: a lost or torn record only means the chunk is fetched again after a restart.
    auto rec = std::make_shared<std::array<char, kMetaRecordBytes>>(encode_record(c, xxh3));
    const uint64_t at = meta_end_;
    meta_end_ += kMetaRecordBytes;
    loop_.write_at(meta_fd_.get(), rec->data(), rec->size(), at, [self = shared_from_this(), rec](int) {});
}

void Blob::advance_watermark() {
    const size_t before = watermark_chunks_;
    while (watermark_chunks_ < chunks_.size() && chunks_[watermark_chunks_].state == ChunkState::verified)
        ++watermark_chunks_;
    if (watermark_chunks_ != before) wake_waiters(false);
}

void Blob::finalize() {
    finalizing_ = true;
    const std::string got = sha_.finish_hex();
    if (got != hex_) return discard_mismatch(got);
    if (store_ && !store_->options().durable) {
        if (::rename(files_.data_path.c_str(), files_.final_path.c_str()) != 0)
            return fail_internal(sys_error(errno, "rename " + files_.data_path + " to " + files_.final_path));
        files_.data_path = files_.final_path;
        loop_.defer([self = shared_from_this()] { self->on_dir_synced(0); });
        return;
    }
    loop_.fsync(data_fd_.get(), [self = shared_from_this()](int res) { self->on_data_synced(res); });
}

void Blob::on_data_synced(int res) {
    if (state_ != BlobState::partial) return;
    if (res < 0) return fail_internal(sys_error(-res, "fsync " + files_.data_path));
    if (::rename(files_.data_path.c_str(), files_.final_path.c_str()) != 0)
        return fail_internal(sys_error(errno, "rename " + files_.data_path + " to " + files_.final_path));
    files_.data_path = files_.final_path;
    // The rename is durable once the directory is synced. The fd stays open until the fsync completes.
    auto dir = std::make_shared<netio::UniqueFd>(::open(files_.blobs_dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    if (!dir->valid()) return on_dir_synced(-errno);
    loop_.fsync(dir->get(), [self = shared_from_this(), dir](int r) { self->on_dir_synced(r); });
}

void Blob::on_dir_synced(int res) {
    // The content is verified and in place whatever the directory fsync said: a failure here can
    // only lose the rename in a crash, after which the blob is simply fetched again.
    (void)res;
    if (state_ != BlobState::partial) return;
    ::unlink(files_.meta_path.c_str());
    state_ = BlobState::committed;
    finalizing_ = false;
    written_.clear();
    if (store_) store_->on_blob_committed(hex_, size_);
    wake_waiters(true);
}

void Blob::discard_mismatch(const std::string& got_hex) {
    ::unlink(files_.data_path.c_str());
    ::unlink(files_.meta_path.c_str());
    state_ = BlobState::failed;
    finalizing_ = false;
    error_ = netio::Error{std::make_error_code(std::errc::bad_message),
                          "sha256 mismatch: expected " + digest_ + ", got " + std::string(kSha256Prefix) + got_hex};
    if (store_) store_->on_blob_discarded(hex_);
    wake_waiters(true);
}

void Blob::fail(netio::Error err) {
    if (state_ != BlobState::partial || finalizing_) return;
    fail_internal(std::move(err));
}

void Blob::fail_internal(netio::Error err) {
    if (state_ != BlobState::partial) return;
    state_ = BlobState::failed;
    finalizing_ = false;
    error_ = std::move(err);
    if (error_.message.empty()) error_.message = "blob " + digest_ + " failed";
    seal_queue_.clear();
    for (auto& ch : chunks_)
        if (ch.state == ChunkState::sealing) ch.state = ChunkState::open;
    if (store_) store_->on_blob_released(this, hex_, size_, chunk_bytes_, verified_chunks());
    wake_waiters(true);
}

// ---- readers ----

void Blob::when_available(uint64_t offset, std::function<void()> cb) {
    if (state_ != BlobState::partial || watermark() >= offset) {
        loop_.defer(std::move(cb));
        return;
    }
    waiters_.emplace(offset, std::move(cb));
}

void Blob::wake_waiters(bool all) {
    const auto end = all ? waiters_.end() : waiters_.upper_bound(watermark());
    for (auto it = waiters_.begin(); it != end; ++it) loop_.defer(std::move(it->second));
    waiters_.erase(waiters_.begin(), end);
}

// ---------------------------------------------------------------------------------------------
// BlobStore

BlobStore::BlobStore(netio::UringLoop& loop, BlobStoreOptions opts) : loop_(loop), opts_(std::move(opts)) {
    if (opts_.dir.empty()) throw std::invalid_argument("BlobStore: options.dir is empty");
    if (opts_.chunk_bytes == 0) throw std::invalid_argument("BlobStore: options.chunk_bytes is 0");
    blobs_dir_ = opts_.dir + "/blobs/sha256";
    partial_dir_ = opts_.dir + "/partial";
    for (const std::string& d : {blobs_dir_, partial_dir_}) {
        std::error_code ec;
        fs::create_directories(d, ec);
        if (!ec && !fs::is_directory(d, ec) && !ec) ec = std::make_error_code(std::errc::not_a_directory);
        if (ec) throw std::system_error(ec, "BlobStore: cannot create " + d);
    }
    scan_committed();
    scan_partials();
    evict_if_needed();
}

BlobStore::~BlobStore() {
    for (auto& [hex, weak] : live_)
        if (auto b = weak.lock()) b->store_ = nullptr;
}

Blob::Files BlobStore::files_for(const std::string& hex) const {
    Blob::Files f;
    f.data_path = partial_dir_ + "/" + hex + ".data";
    f.meta_path = partial_dir_ + "/" + hex + ".meta";
    f.final_path = blobs_dir_ + "/" + hex;
    f.blobs_dir = blobs_dir_;
    return f;
}

void BlobStore::scan_committed() {
    struct Found {
        struct timespec mtime;
        std::string hex;
        uint64_t size;
    };
    std::vector<Found> found;
    for (const std::string& name : list_dir(blobs_dir_)) {
        const std::string path = blobs_dir_ + "/" + name;
        if (ends_with(name, ".tmp")) {
            ::unlink(path.c_str());
            continue;
        }
        struct stat st;
        if (!is_hex64(name) || ::stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) continue;
        found.push_back(Found{st.st_mtim, name, static_cast<uint64_t>(st.st_size)});
    }
    std::sort(found.begin(), found.end(), [](const Found& a, const Found& b) {
        return std::tie(a.mtime.tv_sec, a.mtime.tv_nsec, a.hex) < std::tie(b.mtime.tv_sec, b.mtime.tv_nsec, b.hex);
    });
    for (Found& f : found) {
        lru_.push_back(f.hex);
        committed_[f.hex] = Committed{f.size, std::prev(lru_.end())};
        used_bytes_ += f.size;
    }
}

void BlobStore::scan_partials() {
    struct Pair {
        bool data = false;
        bool meta = false;
    };
    std::map<std::string, Pair> found;
    for (const std::string& name : list_dir(partial_dir_)) {
        if (ends_with(name, ".tmp")) {
            ::unlink((partial_dir_ + "/" + name).c_str());
            continue;
        }
        const bool data = ends_with(name, ".data");
        const bool meta = ends_with(name, ".meta");
        if (!data && !meta) continue;
        const std::string hex = name.substr(0, name.size() - 5);
        if (!is_hex64(hex)) continue;
        (data ? found[hex].data : found[hex].meta) = true;
    }

    std::unique_ptr<char[]> buf;
    size_t buf_bytes = 0;
    for (const auto& [hex, pair] : found) {
        // Already committed (a crash between the rename and the .meta unlink), or half a pair.
        if (committed_.count(hex) || !pair.data || !pair.meta) {
            remove_partial_files(hex);
            continue;
        }
        const Blob::Files files = files_for(hex);
        const auto bytes = read_small_file(files.meta_path);
        const auto meta = bytes ? parse_meta(*bytes) : std::nullopt;
        netio::UniqueFd fd(::open(files.data_path.c_str(), O_RDONLY | O_CLOEXEC));
        struct stat st;
        if (!meta || !fd.valid() || ::fstat(fd.get(), &st) != 0) {
            remove_partial_files(hex);
            continue;
        }
        Partial p{meta->size, meta->chunk_bytes, {}};
        const size_t want_buf = static_cast<size_t>(std::min<uint64_t>(meta->chunk_bytes, kReadPieceMaxBytes));
        if (buf_bytes < want_buf) {
            buf = std::make_unique_for_overwrite<char[]>(want_buf);
            buf_bytes = want_buf;
        }
        for (const auto& [index, xxh3] : meta->records) {
            const uint64_t begin = index * meta->chunk_bytes;
            const uint64_t end = std::min(meta->size, begin + meta->chunk_bytes);
            if (end > static_cast<uint64_t>(st.st_size)) continue;
            const auto got = xxh3_of_file_range(fd.get(), begin, end - begin, std::span<char>(buf.get(), buf_bytes));
            if (got && *got == xxh3) p.verified.emplace_back(index, xxh3);
        }
        partials_[hex] = std::move(p);
    }
}

void BlobStore::remove_partial_files(const std::string& hex) noexcept {
    ::unlink((partial_dir_ + "/" + hex + ".data").c_str());
    ::unlink((partial_dir_ + "/" + hex + ".meta").c_str());
}

BlobRef BlobStore::live_blob(const std::string& hex) const {
    auto it = live_.find(hex);
    return it == live_.end() ? nullptr : it->second.lock();
}

netio::Result<Acquired> BlobStore::acquire(std::string_view digest, uint64_t size) {
    if (!is_sha256_digest(digest)) {
        const std::string shown(digest.substr(0, 80));
        return netio::Error::make("invalid digest \"" + shown + "\": expected sha256:<64 lowercase hex digits>",
                                  std::make_error_code(std::errc::invalid_argument));
    }
    const std::string hex(digest.substr(kSha256Prefix.size()));
    auto size_mismatch = [&](uint64_t have) {
        return netio::Error::make("size mismatch for " + std::string(digest) + ": the cache has " +
                                      std::to_string(have) + " bytes, " + std::to_string(size) + " were asked for",
                                  std::make_error_code(std::errc::invalid_argument));
    };

    if (BlobRef live = live_blob(hex); live && live->state() != BlobState::failed) {
        if (live->size() != size) return size_mismatch(live->size());
        if (live->state() == BlobState::committed) touch(hex);
        return Acquired{std::move(live), false};
    }
    if (auto it = committed_.find(hex); it != committed_.end()) {
        if (it->second.size != size) return size_mismatch(it->second.size);
        if (BlobRef b = open_committed(hex)) {
            evict_if_needed();
            return Acquired{std::move(b), false};
        }
    }
    if (chunk_count_for(size, opts_.chunk_bytes) > kMaxChunks)
        return netio::Error::make("blob " + std::string(digest) + " of " + std::to_string(size) +
                                      " bytes is too large for the cache (at most " +
                                      std::to_string(kMaxChunks * opts_.chunk_bytes) + " bytes)",
                                  std::make_error_code(std::errc::file_too_large));
    auto made = open_partial(hex, size);
    if (!made) return made.error();
    BlobRef b = std::move(made.value());
    evict_if_needed();
    b->start();
    return Acquired{std::move(b), true};
}

BlobRef BlobStore::lookup(std::string_view digest) {
    if (!is_sha256_digest(digest)) return nullptr;
    const std::string hex(digest.substr(kSha256Prefix.size()));
    if (BlobRef live = live_blob(hex); live && live->state() != BlobState::failed) {
        if (live->state() == BlobState::committed) touch(hex);
        return live;
    }
    if (committed_.count(hex)) return open_committed(hex);
    return nullptr;
}

bool BlobStore::drop(std::string_view digest) {
    if (!is_sha256_digest(digest)) return false;
    const std::string hex(digest.substr(kSha256Prefix.size()));
    auto c = committed_.find(hex);
    if (c == committed_.end() || live_blob(hex)) return false;
    ::unlink((blobs_dir_ + "/" + hex).c_str());
    used_bytes_ -= c->second.size;
    lru_.erase(c->second.lru);
    committed_.erase(c);
    live_.erase(hex);
    return true;
}

BlobRef BlobStore::open_committed(const std::string& hex) {
    auto it = committed_.find(hex);
    assert(it != committed_.end());
    Blob::Files files = files_for(hex);
    files.data_path = files.final_path;
    netio::UniqueFd fd(::open(files.final_path.c_str(), O_RDONLY | O_CLOEXEC));
    if (!fd.valid()) {
        // Removed behind our back: forget it, the caller fetches it again.
        used_bytes_ -= it->second.size;
        lru_.erase(it->second.lru);
        committed_.erase(it);
        return nullptr;
    }
    BlobRef b = Blob::make_committed(loop_, this, hex, it->second.size, std::move(files), std::move(fd));
    live_[hex] = b;
    touch(hex);
    return b;
}

netio::Result<BlobRef> BlobStore::open_partial(const std::string& hex, uint64_t size) {
    const Blob::Files files = files_for(hex);
    Partial p{size, opts_.chunk_bytes, {}};
    bool resume = false;
    if (auto it = partials_.find(hex); it != partials_.end()) {
        // Same size: resume with its own chunk size. Otherwise the old partial was for another size.
        if (it->second.size == size) {
            p = std::move(it->second);
            resume = true;
        }
        partials_.erase(it);
    }

    int flags = O_RDWR | O_CREAT | O_CLOEXEC;
    if (!resume) flags |= O_TRUNC;
    netio::UniqueFd data_fd(::open(files.data_path.c_str(), flags, 0644));
    if (!data_fd.valid()) return sys_error(errno, "create " + files.data_path);
    struct stat st;
    if (::fstat(data_fd.get(), &st) != 0) return sys_error(errno, "stat " + files.data_path);
    // Chunks beyond the file's end (truncated behind our back) are not there any more.
    std::erase_if(p.verified, [&](const auto& v) {
        return std::min(size, (v.first + 1) * p.chunk_bytes) > static_cast<uint64_t>(st.st_size);
    });
    // Sparse preallocation: reads of unwritten ranges return zeros, never a short read.
    if (static_cast<uint64_t>(st.st_size) != size && ::ftruncate(data_fd.get(), static_cast<off_t>(size)) != 0)
        return sys_error(errno, "truncate " + files.data_path);

    // A fresh .meta (temp + rename): a failed predecessor's appends go to the replaced inode.
    std::string meta;
    meta.reserve(kMetaHeaderBytes + p.verified.size() * kMetaRecordBytes);
    const auto header = encode_header(size, p.chunk_bytes);
    meta.append(header.data(), header.size());
    for (const auto& [index, xxh3] : p.verified) {
        const auto rec = encode_record(index, xxh3);
        meta.append(rec.data(), rec.size());
    }
    const std::string tmp = files.meta_path + ".tmp";
    netio::UniqueFd meta_fd(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
    if (!meta_fd.valid()) return sys_error(errno, "create " + tmp);
    if (!write_all(meta_fd.get(), meta)) {
        const int e = errno;
        ::unlink(tmp.c_str());
        return sys_error(e ? e : EIO, "write " + tmp);
    }
    if (::rename(tmp.c_str(), files.meta_path.c_str()) != 0) {
        const int e = errno;
        ::unlink(tmp.c_str());
        return sys_error(e, "rename " + tmp);
    }

    BlobRef old = live_blob(hex);
    BlobRef b = Blob::make_partial(loop_, this, hex, size, p.chunk_bytes, files, std::move(data_fd), std::move(meta_fd),
                                   meta.size(), p.verified);
    if (old && old->writes_in_flight_ > 0) {
        b->predecessor_ = old;
        old->successor_ = b;
    }
    live_[hex] = b;
    return b;
}

void BlobStore::touch(const std::string& hex) {
    auto it = committed_.find(hex);
    if (it == committed_.end()) return;
    lru_.splice(lru_.end(), lru_, it->second.lru);
    // Persist the order for the next start (mtime = now).
    ::utimensat(AT_FDCWD, (blobs_dir_ + "/" + hex).c_str(), nullptr, 0);
}

void BlobStore::evict_if_needed() {
    // Blobs being filled will need their room too.
    uint64_t filling_bytes = 0;
    for (const auto& [hex, weak] : live_)
        if (BlobRef b = weak.lock(); b && b->state() == BlobState::partial) filling_bytes += b->size();
    for (auto it = lru_.begin(); it != lru_.end() && used_bytes_ + filling_bytes > opts_.cap_bytes;) {
        const std::string hex = *it;
        if (live_blob(hex)) {  // pinned by a BlobRef or by its own I/O
            ++it;
            continue;
        }
        ::unlink((blobs_dir_ + "/" + hex).c_str());
        auto c = committed_.find(hex);
        used_bytes_ -= c->second.size;
        committed_.erase(c);
        live_.erase(hex);
        it = lru_.erase(it);
    }
}

void BlobStore::on_blob_committed(const std::string& hex, uint64_t size) {
    partials_.erase(hex);
    if (auto it = committed_.find(hex); it != committed_.end()) {
        used_bytes_ -= it->second.size;
        lru_.erase(it->second.lru);
        committed_.erase(it);
    }
    lru_.push_back(hex);
    committed_[hex] = Committed{size, std::prev(lru_.end())};
    used_bytes_ += size;
    evict_if_needed();
}

void BlobStore::on_blob_discarded(const std::string& hex) { partials_.erase(hex); }

void BlobStore::on_blob_released(const Blob* blob, const std::string& hex, uint64_t size, uint64_t chunk_bytes,
                                 std::vector<std::pair<uint64_t, uint64_t>> verified) {
    // A newer Blob of this digest owns the partial now.
    if (BlobRef live = live_blob(hex); live && live.get() != blob) return;
    partials_[hex] = Partial{size, chunk_bytes, std::move(verified)};
}

void BlobStore::on_blob_destroyed(const std::string& hex) {
    auto it = live_.find(hex);
    if (it != live_.end() && it->second.expired()) live_.erase(it);
}

}  // namespace cas
