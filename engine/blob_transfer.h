// Moving one blob through the cache: parallel ranged GETs from the source into a cas::Blob
// (fill_blob), and request bodies that follow the blob's watermark while it is still arriving
// (CasRangeSource), so uploads to every target start before the download ends.
//
// Threading: loop thread only. Ownership: both hold a BlobRef (pinning the blob) while they live.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "cas/blob_store.h"
#include "engine/registry_client.h"
#include "engine/throttle.h"
#include "netio/http_client.h"
#include "netio/task.h"

namespace engine {

struct FillOptions {
    unsigned streams = 4;                        // parallel ranged GETs for a large blob
    uint64_t range_threshold_bytes = 32u << 20;  // blobs below this use one stream
    int attempts = 4;                            // per range, resuming where the last attempt stopped
    uint64_t max_inflight_bytes = 2u << 20;      // per stream: writes queued to the cache before pausing
    uint64_t* live_bytes_read = nullptr;         // if set, counts body bytes as they arrive (progress)
    Throttle* throttle = nullptr;                // if set, downloads obey its link's rate cap
    // If set, the number of streams wanted for this blob right now (planner's stream tuner): more
    // workers join while it grows; `streams` is then only the starting count.
    std::function<unsigned()> streams_now;
    // Large blobs are fetched in ranged pieces of 1-4x this, taken in order from one queue: the
    // verified prefix, which uploads follow, stays close behind the downloads, so little is left
    // to upload when the last byte arrives. Each piece costs a request (a round trip per stream).
    uint64_t piece_bytes = 4u << 20;
};

struct FillStats {
    uint64_t bytes_read = 0;  // body bytes received from the source (all attempts)
};

// Fetches blob->missing_ranges() of `digest` from `repo` on `source` into `blob` (which the caller
// acquired as filler), then waits until the blob settles. Returns the blob's verdict: ok once it is
// committed (sha256 verified); otherwise an error that says what went wrong (the blob is failed).
// A source that answers 200 to a ranged GET is handled (that stream takes the whole body).
netio::Task<netio::Status> fill_blob(RegistryClient& source, std::string repo, cas::BlobRef blob,
                                     FillOptions opts, FillStats& stats);

// The bytes [offset, offset+length) of a blob that may still be filling: read() answers kPause
// while they are not below the watermark yet and resumes the transfer when they are. If the blob
// fails, the rest of the request is filler (zeros) so the session stays cancellable; the upload is
// never finalised because the blob's verdict is awaited first.
class CasRangeSource final : public netio::BodySource, public std::enable_shared_from_this<CasRangeSource> {
public:
    // `sent_counter` (optional) counts bytes handed to the transfer, for progress displays.
    CasRangeSource(cas::BlobRef blob, uint64_t offset, uint64_t length, uint64_t* sent_counter = nullptr,
                   std::shared_ptr<Throttle> throttle = nullptr)
        : blob_(std::move(blob)), offset_(offset), length_(length), sent_counter_(sent_counter),
          throttle_(std::move(throttle)) {}
    uint64_t length() const noexcept override { return length_; }
    long read(std::span<char> buf) noexcept override;
    bool rewind() noexcept override {
        pos_ = 0;
        return true;
    }
    void attach(std::function<void()> resume) noexcept override { resume_ = std::move(resume); }

private:
    cas::BlobRef blob_;
    uint64_t offset_;
    uint64_t length_;
    uint64_t* sent_counter_;
    std::shared_ptr<Throttle> throttle_;
    uint64_t pos_ = 0;
    bool waiting_ = false;
    std::function<void()> resume_;
};

// Awaits the blob's verdict: ok when committed, its error when failed.
netio::Task<netio::Status> blob_verified(cas::BlobRef blob);

}  // namespace engine
