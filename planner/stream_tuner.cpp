#include "planner/stream_tuner.h"

#include <algorithm>
#include <cmath>

namespace planner {

StreamTuner::StreamTuner(unsigned min_streams, unsigned max_streams, StreamTunerConfig config)
    : config_(config),
      min_streams_(std::max(min_streams, 1u)),
      max_streams_(std::max(max_streams, min_streams_)),
      streams_(std::clamp(config.start_streams, min_streams_, max_streams_)),
      search_floor_(min_streams_ - 1) {
    config_.samples_per_step = std::max(config_.samples_per_step, 1u);
    skip_ = config_.warmup_samples;  // the first connections are in slow start too
}

void StreamTuner::set_streams(unsigned n) {
    n = std::clamp(n, min_streams_, max_streams_);
    if (n != streams_) {
        streams_ = n;
        skip_ = config_.warmup_samples;
    }
    count_ = 0;
    sum_ = 0;
}

void StreamTuner::on_sample(double aggregate_bytes_per_s, TimePoint now) {
    if (!std::isfinite(aggregate_bytes_per_s) || aggregate_bytes_per_s < 0) return;
    if (skip_ > 0) {
        --skip_;
        return;
    }
    sum_ += aggregate_bytes_per_s;
    if (++count_ < config_.samples_per_step) return;
    const double mean = sum_ / count_;
    count_ = 0;
    sum_ = 0;
    per_stream_bytes_per_s_ = mean / streams_;
    on_measured(mean, now);
}

void StreamTuner::on_measured(double mean, TimePoint now) {
    switch (phase_) {
    case Phase::ramp: {
        measured_[streams_] = mean;
        const bool grew = ramp_prev_ == 0 || mean >= measured_[ramp_prev_] * (1 + config_.growth_threshold);
        if (!grew || streams_ >= max_streams_) {
            finish_search(now);
            return;
        }
        ramp_prev_ = streams_;
        set_streams(static_cast<unsigned>(std::min<uint64_t>(max_streams_, uint64_t{streams_} * 2)));
        return;
    }
    case Phase::bisect:
        measured_[streams_] = mean;
        finish_search(now);
        return;
    case Phase::settled: {
        if (std::fabs(mean - settled_mean_) > config_.change_threshold * settled_mean_) {
            // The link changed under us: search again from here, in both directions.
            measured_.clear();
            measured_[streams_] = mean;
            search_floor_ = min_streams_ - 1;
            phase_ = Phase::ramp;
            ramp_prev_ = streams_;
            if (streams_ >= max_streams_) {
                finish_search(now);
                return;
            }
            set_streams(static_cast<unsigned>(std::min<uint64_t>(max_streams_, uint64_t{streams_} * 2)));
            return;
        }
        if (now - settled_at_ >= config_.reprobe_interval_s) {
            start_reprobe(mean, now);
            return;
        }
        settled_mean_ = 0.75 * settled_mean_ + 0.25 * mean;
        return;
    }
    case Phase::probe_up: {
        measured_[streams_] = mean;
        if (mean > measured_[probe_base_] * (1 + config_.plateau_tolerance)) {
            // The step paid: keep stepping up, one step at a time.
            probe_base_ = streams_;
            const unsigned up = static_cast<unsigned>(std::min<uint64_t>(max_streams_, uint64_t{streams_} + step(streams_)));
            if (up == streams_) {
                finish_search(now);
                return;
            }
            set_streams(up);
            return;
        }
        if (probe_base_ == reprobe_origin_)
            probe_down_from(probe_base_, now);  // no gain above: try below
        else
            finish_search(now);  // gained, then stopped gaining: the smallest count near the best
        return;
    }
    case Phase::probe_down: {
        measured_[streams_] = mean;
        double best = 0;
        for (const auto& [n, m] : measured_) best = std::max(best, m);
        // Half the tolerance: under noise, err on the side of keeping a stream too many.
        if (mean >= (1 - config_.plateau_tolerance / 2) * best)
            probe_down_from(streams_, now);  // fewer streams do as well: keep stepping down
        else
            settle(probe_base_, now);
        return;
    }
    }
}

void StreamTuner::finish_search(TimePoint now) {
    double best = 0;
    for (const auto& [n, m] : measured_) best = std::max(best, m);
    const double mark = (1 - config_.plateau_tolerance) * best;
    unsigned hi = 0;
    for (const auto& [n, m] : measured_) {
        if (m >= mark) {
            hi = n;  // the map is ordered: the smallest count that reaches the mark
            break;
        }
    }
    unsigned lo = search_floor_;
    for (const auto& [n, m] : measured_)
        if (n < hi && n > lo) lo = n;  // every measured count below hi is under the mark
    if (hi <= lo + 1) {
        settle(hi, now);
        return;
    }
    phase_ = Phase::bisect;
    set_streams(lo + (hi - lo) / 2);
}

void StreamTuner::settle(unsigned n, TimePoint now) {
    phase_ = Phase::settled;
    set_streams(n);
    settled_at_ = now;
    const auto it = measured_.find(n);
    settled_mean_ = it != measured_.end() ? it->second : 0;
    search_floor_ = min_streams_ - 1;
    ramp_prev_ = 0;
}

void StreamTuner::start_reprobe(double mean, TimePoint now) {
    measured_.clear();  // conditions may have changed: old means are not comparable
    measured_[streams_] = mean;
    probe_base_ = streams_;
    reprobe_origin_ = streams_;
    search_floor_ = streams_ - 1;  // a step up that pays is searched above the origin only
    const unsigned up = static_cast<unsigned>(std::min<uint64_t>(max_streams_, uint64_t{streams_} + step(streams_)));
    if (up == streams_) {
        probe_down_from(streams_, now);
        return;
    }
    phase_ = Phase::probe_up;
    set_streams(up);
}

void StreamTuner::probe_down_from(unsigned base, TimePoint now) {
    const unsigned down = base - std::min(step(base), base - min_streams_);
    if (down == base) {
        settle(base, now);
        return;
    }
    probe_base_ = base;
    phase_ = Phase::probe_down;
    set_streams(down);
}

uint64_t StreamTuner::chunk_bytes(uint64_t blob_size, std::chrono::microseconds rtt) const noexcept {
    const double rtt_s = std::max(0.0, std::chrono::duration<double>(rtt).count());
    const double bdp_bytes = per_stream_bytes_per_s_ * rtt_s;
    double want = std::max(16 * bdp_bytes, static_cast<double>(blob_size) / 64);
    if (!(want < static_cast<double>(kMaxChunkBytes))) return kMaxChunkBytes;  // also NaN
    const uint64_t w = static_cast<uint64_t>(want);
    const uint64_t rounded = (w + kChunkGranuleBytes - 1) / kChunkGranuleBytes * kChunkGranuleBytes;
    return std::clamp(rounded, kMinChunkBytes, kMaxChunkBytes);
}

}  // namespace planner
