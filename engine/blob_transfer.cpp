#include "engine/blob_transfer.h"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <deque>

namespace engine {

namespace {

// Per-stream state shared with the cache writes in flight (they may complete after the sink).
struct StreamState {
    uint64_t inflight_bytes = 0;
    uint64_t max_inflight_bytes = 0;
    bool paused = false;
    std::optional<netio::Error> write_error;
    std::function<void()> resume;
    std::coroutine_handle<> drain_waiter;
    netio::UringLoop* loop = nullptr;
};

// Writes a (ranged) response body into the blob at its offsets. Non-2xx bodies are kept, bounded,
// for the error message. Pushes back (Offer::full) while too many bytes wait for the disk.
class CasSink final : public netio::BodySink {
public:
    CasSink(netio::UringLoop& loop, cas::BlobRef blob, uint64_t first, uint64_t end, uint64_t max_inflight,
            bool* whole_claimed, uint64_t* live_counter, Throttle* throttle)
        : blob_(std::move(blob)), first_(first), end_(end), max_inflight_(max_inflight), whole_claimed_(whole_claimed),
          live_counter_(live_counter), throttle_(throttle),
          st_(std::make_shared<StreamState>()) {
        st_->loop = &loop;
        st_->max_inflight_bytes = max_inflight;
    }

    bool on_response_head(long status, const netio::Headers&) noexcept override {
        status_ = status;
        if (status == 200 && (first_ != 0 || end_ != blob_->size())) {
            // The source ignored Range: one stream takes the whole body, the others stand down.
            if (*whole_claimed_) {
                stood_down_ = true;
                return false;
            }
            *whole_claimed_ = true;
            whole_ = true;
            first_ = 0;
            end_ = blob_->size();
        }
        return true;
    }

    netio::Offer offer(std::span<const char> data) noexcept override {
        if (status_ != 200 && status_ != 206) {
            if (error_body_.size() < 4096) error_body_.append(data.data(), std::min<size_t>(data.size(), 4096));
            return netio::Offer::taken;
        }
        if (st_->write_error) return netio::Offer::error;
        if (first_ + received_ + data.size() > end_) {
            overflow_ = true;  // more than asked for (or than the manifest declares)
            return netio::Offer::error;
        }
        if (st_->inflight_bytes >= max_inflight_) {
            st_->paused = true;
            return netio::Offer::full;
        }
        if (throttle_ && !throttle_->admit(st_->resume)) return netio::Offer::full;  // over the link's cap
        // Gathered into blocks that end on a block boundary of the blob: one cache write per
        // block instead of one per network read, and whole pages, which the kernel need not
        // zero first (a write into part of an uncached page of the preallocated file has it
        // zero the rest).
        if (!pending_) {
            pending_ = std::make_shared<std::vector<char>>();
            pending_->reserve(kBlockBytes + (64u << 10));
            pending_at_ = first_ + received_;
        }
        pending_->insert(pending_->end(), data.begin(), data.end());
        st_->inflight_bytes += data.size();
        received_ += data.size();
        // Also once the stream is at its limit: a pause must have a write in flight to end it.
        if ((pending_at_ + pending_->size()) / kBlockBytes != pending_at_ / kBlockBytes ||
            st_->inflight_bytes >= max_inflight_)
            flush();
        bytes_read_ += data.size();
        if (live_counter_) *live_counter_ += data.size();
        if (throttle_) throttle_->charge(data.size());
        return netio::Offer::taken;
    }

    void attach(std::function<void()> resume) noexcept override { st_->resume = std::move(resume); }

    // Hands the gathered bytes to the cache (the response has ended, or a block is full).
    void flush() noexcept {
        if (!pending_ || pending_->empty()) return;
        auto buf = std::exchange(pending_, nullptr);
        auto st = st_;
        blob_->write(pending_at_, {buf->data(), buf->size()}, [st, buf](netio::Status s) {
            st->inflight_bytes -= buf->size();
            if (!s.ok() && !st->write_error) st->write_error = s.error();
            if (st->paused && st->inflight_bytes < st->max_inflight_bytes && st->resume) {
                st->paused = false;
                st->resume();
            }
            if (st->inflight_bytes == 0 && st->drain_waiter) {
                auto h = std::exchange(st->drain_waiter, {});
                st->loop->defer([h] { h.resume(); });
            }
        });
    }

    // co_await sink.drained(): every byte taken is on the file (call flush() first).
    struct Drain {
        StreamState& st;
        bool await_ready() const noexcept { return st.inflight_bytes == 0; }
        void await_suspend(std::coroutine_handle<> h) noexcept { st.drain_waiter = h; }
        void await_resume() const noexcept {}
    };
    Drain drained() { return Drain{*st_}; }

    long status_ = 0;
    bool whole_ = false;
    bool stood_down_ = false;
    bool overflow_ = false;
    uint64_t received_ = 0;   // body bytes of this attempt written (or queued) at first_ + ...
    uint64_t bytes_read_ = 0;
    std::string error_body_;
    const std::optional<netio::Error>& write_error() const { return st_->write_error; }

private:
    static constexpr uint64_t kBlockBytes = 256u << 10;
    cas::BlobRef blob_;
    uint64_t first_;
    uint64_t end_;  // exclusive
    std::shared_ptr<std::vector<char>> pending_;  // taken, not yet handed to the cache
    uint64_t pending_at_ = 0;                      // its offset in the blob
    uint64_t max_inflight_;
    bool* whole_claimed_;
    uint64_t* live_counter_;
    Throttle* throttle_;
    std::shared_ptr<StreamState> st_;
};

struct FillShared {
    std::deque<netio::ByteRange> pieces;
    unsigned active = 0;                // workers running
    std::function<void()> add_worker;   // starts one more worker (streams_now grew)
    bool whole_claimed = false;
    bool whole_done = false;
    std::optional<netio::Error> error;
};

// Cuts the missing ranges into about `streams` pieces of similar size, on chunk boundaries.
std::deque<netio::ByteRange> cut(const std::vector<netio::ByteRange>& missing, unsigned streams, uint64_t chunk) {
    uint64_t total = 0;
    for (const auto& r : missing) total += r.last - r.first + 1;
    uint64_t per = std::max<uint64_t>(chunk, (total + streams - 1) / std::max(1u, streams));
    per = (per + chunk - 1) / chunk * chunk;
    std::deque<netio::ByteRange> out;
    for (const auto& r : missing) {
        const size_t first_of_range = out.size();
        for (uint64_t a = r.first; a <= r.last;) {
            uint64_t b = std::min(r.last, a + per - 1);
            out.push_back({a, b});
            a = b + 1;
        }
        // A short remainder (a layer is often a round size plus a few KiB of tar and gzip framing)
        // goes with the piece before it: on its own it would cost a request and a round trip after
        // the other streams are done.
        if (out.size() - first_of_range >= 2 && out.back().last - out.back().first + 1 < per / 4) {
            const uint64_t last = out.back().last;
            out.pop_back();
            out.back().last = last;
        }
    }
    return out;
}

std::string clean(std::string s) {
    if (s.size() > 300) s.resize(300);
    std::replace(s.begin(), s.end(), '\n', ' ');
    std::replace(s.begin(), s.end(), '\r', ' ');
    return s;
}

netio::Task<void> stream_worker(RegistryClient& source, const std::string& repo, cas::BlobRef blob,
                                const FillOptions& opts, FillStats& stats, FillShared& shared, bool ranged) {
    const std::string what = "blob " + blob->digest() + " from " + source.host() + "/" + repo;
    netio::UringLoop& loop = source.loop();
    while (!shared.pieces.empty() && !shared.error && !shared.whole_done) {
        // The planner may want more streams on this link than when the blob started.
        if (opts.streams_now && shared.add_worker && shared.pieces.size() > 1 && shared.active < opts.streams_now())
            shared.add_worker();
        // The worker just added runs at once and may itself add workers, each taking a piece: by
        // now the queue may be empty.
        if (shared.pieces.empty()) break;
        netio::ByteRange piece = shared.pieces.front();
        shared.pieces.pop_front();
        uint64_t done = 0;
        const uint64_t want = piece.last - piece.first + 1;
        int attempt = 0;
        while (done < want && !shared.error && !shared.whole_done) {
            if (attempt >= opts.attempts) {
                shared.error = netio::Error::make(what + ": range " + std::to_string(piece.first + done) + "-" +
                                                  std::to_string(piece.last) + " still incomplete after " +
                                                  std::to_string(attempt) + " attempts");
                break;
            }
            if (attempt > 0) co_await netio::sleep_for(loop, std::chrono::milliseconds(200 << std::min(attempt, 5)));
            ++attempt;
            CasSink sink(loop, blob, piece.first + done, piece.last + 1, opts.max_inflight_bytes, &shared.whole_claimed,
                         opts.live_bytes_read, opts.throttle);
            std::optional<netio::ByteRange> range;
            if (ranged || done > 0) range = netio::ByteRange{piece.first + done, piece.last};
            auto res = co_await source.get_blob(repo, blob->digest(), &sink, range);
            sink.flush();
            co_await sink.drained();
            stats.bytes_read += sink.bytes_read_;
            if (!res.ok() && res.error().code == std::errc::operation_canceled) {
                shared.error = res.error();  // the run is stopping: no retry
                break;
            }
            if (sink.stood_down_) co_return;  // another stream has the whole body
            if (sink.write_error()) {
                shared.error = netio::Error::make(what + ": writing to the cache: " + sink.write_error()->message);
                break;
            }
            if (sink.overflow_) {
                shared.error = netio::Error::make(what + ": the source sent more bytes than the " +
                                                  std::to_string(blob->size()) + " the manifest declares");
                break;
            }
            if (sink.whole_) {
                // This stream received the whole blob (the source ignores Range).
                if (res.ok() && sink.received_ == blob->size()) {
                    shared.whole_done = true;
                    co_return;
                }
                shared.whole_claimed = false;  // let a retry (of any stream) take it again
                if (res.ok() && sink.received_ < blob->size()) {
                    shared.error = netio::Error::make(what + ": the source sent " + std::to_string(sink.received_) +
                                                      " bytes, the manifest declares " + std::to_string(blob->size()));
                    break;
                }
                continue;
            }
            const uint64_t asked = want - done;
            done += sink.received_;
            if (!res.ok()) continue;  // cut or stalled: resume from where this attempt stopped
            const long status = res->status;
            if ((status == 200 || status == 206) && sink.received_ < asked) {
                // A clean, complete response that is shorter than asked: the source's blob is not
                // the size its manifest declares.
                shared.error = netio::Error::make(what + ": the source sent " + std::to_string(sink.received_) +
                                                  " bytes where " + std::to_string(asked) +
                                                  " were asked for; the manifest declares " +
                                                  std::to_string(blob->size()) + " bytes");
                break;
            }
            if (status == 416) {
                shared.error = netio::Error::make(what + ": the source cannot serve bytes " +
                                                  std::to_string(piece.first + done) + "-" + std::to_string(piece.last) +
                                                  " (HTTP 416): it holds fewer bytes than the " +
                                                  std::to_string(blob->size()) + " the manifest declares");
                break;
            }
            if (status == 404) {
                shared.error = netio::Error::make(what + ": the source does not have it (HTTP 404)");
                break;
            }
            if (status != 200 && status != 206) {
                if (planner::is_retryable_status(status)) continue;
                shared.error = netio::Error::make(what + ": HTTP " + std::to_string(status) +
                                                  (sink.error_body_.empty() ? "" : " " + clean(sink.error_body_)));
                break;
            }
        }
    }
}

}  // namespace

netio::Task<netio::Status> blob_verified(cas::BlobRef blob) {
    co_await blob->settled();
    if (blob->state() == cas::BlobState::committed) co_return netio::ok_status();
    co_return blob->error();
}

netio::Task<netio::Status> fill_blob(RegistryClient& source, std::string repo, cas::BlobRef blob, FillOptions opts,
                                     FillStats& stats) {
    const std::string what = "blob " + blob->digest() + " from " + source.host() + "/" + repo;
    auto missing = blob->missing_ranges();
    if (!missing.empty()) {
        const bool whole = missing.size() == 1 && missing[0].first == 0 && missing[0].last + 1 == blob->size();
        const bool large = blob->size() >= opts.range_threshold_bytes;
        unsigned streams = large ? std::max(1u, opts.streams) : 1u;
        if (large && opts.streams_now) streams = std::max(1u, opts.streams_now());
        FillShared shared;
        // Pieces taken in order from one queue, not one contiguous share per stream: every stream
        // works just ahead of the verified prefix, so the prefix (which uploads follow) advances
        // at the aggregate rate, and streams joining later find work.
        const uint64_t piece = std::clamp<uint64_t>(blob->size() / (std::max(1u, streams) * 4), opts.piece_bytes,
                                                    4 * opts.piece_bytes);
        shared.pieces = large ? cut(missing, static_cast<unsigned>((blob->size() + piece - 1) / piece),
                                    blob->chunk_bytes())
                              : cut(missing, 1, blob->chunk_bytes());
        const bool ranged = !(whole && shared.pieces.size() == 1);
        const unsigned workers = std::min<unsigned>(streams, static_cast<unsigned>(shared.pieces.size()));
        netio::WaitGroup wg(source.loop());
        shared.add_worker = [&source, &repo, blob, &opts, &stats, &shared, ranged, &wg] {
            wg.add();
            ++shared.active;
            netio::spawn([](RegistryClient& src, const std::string& r, cas::BlobRef b, const FillOptions& o,
                            FillStats& s, FillShared& sh, bool rg, netio::WaitGroup& w) -> netio::Task<void> {
                try {
                    co_await stream_worker(src, r, b, o, s, sh, rg);
                } catch (const std::exception& e) {
                    if (!sh.error) sh.error = netio::Error::make(std::string("internal error: ") + e.what());
                }
                --sh.active;
                w.done();
            }(source, repo, blob, opts, stats, shared, ranged, wg));
        };
        // A worker runs at once and may add workers itself (streams_now): count the active ones.
        for (unsigned i = 0; i < workers && shared.active < workers && !shared.pieces.empty(); ++i) shared.add_worker();
        co_await wg.wait();
        shared.add_worker = nullptr;
        if (shared.error) {
            blob->fail(*shared.error);
            co_return *shared.error;
        }
        if (blob->state() == cas::BlobState::partial && !blob->missing_ranges().empty()) {
            auto err = netio::Error::make(what + ": incomplete after every stream finished");
            blob->fail(err);
            co_return err;
        }
    }
    auto verdict = co_await blob_verified(blob);
    if (!verdict.ok()) {
        auto e = verdict.error();
        if (e.code == std::errc::bad_message)
            e.message = what + ": content does not match its digest (" + e.message + ")";
        else
            e.message = what + ": " + e.message;
        co_return e;
    }
    co_return verdict;
}

long CasRangeSource::read(std::span<char> buf) noexcept {
    if (pos_ >= length_) return 0;
    if (blob_->state() == cas::BlobState::failed) {
        // Finish this request with filler bytes rather than abort it: a registry that received part
        // of a PATCH holds a session whose state token we no longer know (distribution answers 404
        // "upload resumed at wrong offset" to GET and DELETE), so it could not be cancelled. A
        // completed PATCH gives a fresh Location, the caller never finalises (the verdict is an
        // error) and cancels the session with it.
        const uint64_t n = std::min<uint64_t>(buf.size(), length_ - pos_);
        std::memset(buf.data(), 0, n);
        pos_ += n;
        return static_cast<long>(n);
    }
    const uint64_t available_end =
        blob_->state() == cas::BlobState::committed ? blob_->size() : blob_->watermark();
    const uint64_t cur = offset_ + pos_;
    if (cur >= available_end) {
        if (!waiting_) {
            waiting_ = true;
            std::weak_ptr<CasRangeSource> self = weak_from_this();
            blob_->when_available(cur + 1, [self] {
                if (auto s = self.lock()) {
                    s->waiting_ = false;
                    if (s->resume_) s->resume_();
                }
            });
        }
        return kPause;
    }
    if (throttle_ && !throttle_->admit(resume_)) return kPause;  // over the link's cap
    const uint64_t n = std::min<uint64_t>({buf.size(), length_ - pos_, available_end - cur});
    ssize_t got;
    do {
        got = ::pread(blob_->read_fd(), buf.data(), n, static_cast<off_t>(cur));
    } while (got < 0 && errno == EINTR);
    if (got <= 0) return kAbort;
    pos_ += static_cast<uint64_t>(got);
    if (sent_counter_) *sent_counter_ += static_cast<uint64_t>(got);
    if (throttle_) throttle_->charge(static_cast<uint64_t>(got));
    return static_cast<long>(got);
}

}  // namespace engine
