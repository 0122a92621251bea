#include "planner/stream_tuner.h"

#include <algorithm>
#include <cmath>

namespace planner {

namespace {

// How many samples the settled average rests on at most: old samples fade, so a slow drift is
// followed.
constexpr unsigned kSettledWindowSamples = 30;
// A relative noise estimate above this is not noise but a link that changed within a step.
constexpr double kMaxRelativeNoise = 0.5;
// "Close" is within this many standard errors.
constexpr double kCloseCallStdErrors = 2.0;

}  // namespace

StreamTuner::StreamTuner(unsigned min_streams, unsigned max_streams, StreamTunerConfig config)
    : config_(config),
      min_streams_(std::max(min_streams, 1u)),
      max_streams_(std::max(max_streams, min_streams_)),
      streams_(std::clamp(config.start_streams, min_streams_, max_streams_)),
      search_floor_(min_streams_ - 1) {
    config_.samples_per_step = std::max(config_.samples_per_step, 1u);
    config_.max_samples_per_step = std::max(config_.max_samples_per_step, config_.samples_per_step);
    skip_ = config_.warmup_samples;  // the first connections are in slow start too
}

unsigned StreamTuner::up_from(unsigned n) const noexcept {
    return static_cast<unsigned>(std::min<uint64_t>(max_streams_, uint64_t{n} + step(n)));
}

void StreamTuner::set_streams(unsigned n) {
    n = std::clamp(n, min_streams_, max_streams_);
    if (n != streams_) {
        streams_ = n;
        skip_ = config_.warmup_samples;
    }
    count_ = 0;
    sum_ = 0;
    sum_sq_ = 0;
}

StreamTuner::Measurement StreamTuner::plateau() const {
    double best = 0;
    for (const auto& [n, m] : measured_) best = std::max(best, m.mean);
    double weighted = 0;
    unsigned samples = 0;
    for (const auto& [n, m] : measured_) {
        if (m.mean < (1 - config_.plateau_tolerance) * best) continue;
        weighted += m.mean * m.samples;
        samples += m.samples;
    }
    return samples == 0 ? Measurement{} : Measurement{weighted / samples, samples};
}

std::optional<StreamTuner::Threshold> StreamTuner::threshold() const {
    auto at = [&](unsigned n) -> const Measurement* {
        const auto it = measured_.find(n);
        return it == measured_.end() ? nullptr : &it->second;
    };
    switch (phase_) {
    case Phase::ramp:
        if (const Measurement* prev = ramp_prev_ ? at(ramp_prev_) : nullptr)
            return Threshold{prev->mean * (1 + config_.growth_threshold), prev->samples};
        return std::nullopt;
    case Phase::search:
    case Phase::probe_down: {
        const Measurement p = plateau();
        if (p.samples == 0) return std::nullopt;
        const double tol = phase_ == Phase::search ? config_.plateau_tolerance : config_.plateau_tolerance / 2;
        return Threshold{(1 - tol) * p.mean, p.samples};
    }
    case Phase::probe_up:
        if (const Measurement* base = at(probe_base_))
            return Threshold{base->mean * (1 + config_.plateau_tolerance), base->samples};
        return std::nullopt;
    case Phase::settled:
        return std::nullopt;
    }
    return std::nullopt;
}

bool StreamTuner::close_call(double mean) const {
    if (noise_dof_ < 2) return false;  // no idea of the noise yet
    const auto th = threshold();
    if (!th || th->ref_samples == 0) return false;
    const double cv = std::min(std::sqrt(noise_sum_sq_ / noise_dof_), kMaxRelativeNoise);
    const double std_error = cv * th->value * std::sqrt(1.0 / count_ + 1.0 / th->ref_samples);
    return std::fabs(mean - th->value) < kCloseCallStdErrors * std_error;
}

void StreamTuner::on_sample(double aggregate_bytes_per_s, TimePoint now) {
    if (!std::isfinite(aggregate_bytes_per_s) || aggregate_bytes_per_s < 0) return;
    if (skip_ > 0) {
        --skip_;
        return;
    }
    sum_ += aggregate_bytes_per_s;
    sum_sq_ += aggregate_bytes_per_s * aggregate_bytes_per_s;
    if (++count_ < config_.samples_per_step) return;
    const double mean = sum_ / count_;
    if (count_ < config_.max_samples_per_step && close_call(mean)) return;  // gather more first
    if (count_ >= 2 && mean > 0) {
        const double var_sum = std::max(0.0, sum_sq_ - count_ * mean * mean);
        noise_sum_sq_ += std::min(var_sum / (mean * mean), kMaxRelativeNoise * kMaxRelativeNoise * (count_ - 1));
        noise_dof_ += count_ - 1;
    }
    const Measurement m{mean, count_};
    count_ = 0;
    sum_ = 0;
    sum_sq_ = 0;
    per_stream_bytes_per_s_ = mean / streams_;
    on_measured(m, now);
}

void StreamTuner::on_measured(Measurement m, TimePoint now) {
    switch (phase_) {
    case Phase::ramp: {
        const auto prev = measured_.find(ramp_prev_);
        const bool grew = prev == measured_.end() || m.mean >= prev->second.mean * (1 + config_.growth_threshold);
        measured_[streams_] = m;
        if (!grew || streams_ >= max_streams_) {
            finish_search(now);
            return;
        }
        start_ramp(now);
        return;
    }
    case Phase::search:
        measured_[streams_] = m;
        finish_search(now);
        return;
    case Phase::settled: {
        if (settled_.samples == 0) settled_ = m;
        if (std::fabs(m.mean - settled_.mean) > config_.change_threshold * settled_.mean) {
            // The link changed under us: search again from here, in both directions.
            measured_.clear();
            measured_[streams_] = m;
            search_floor_ = min_streams_ - 1;
            start_ramp(now);
            return;
        }
        const unsigned total = settled_.samples + m.samples;
        settled_.mean = (settled_.mean * settled_.samples + m.mean * m.samples) / total;
        settled_.samples = std::min(total, kSettledWindowSamples);
        if (now - settled_at_ >= config_.reprobe_interval_s) start_reprobe(now);
        return;
    }
    case Phase::probe_up: {
        const double base = measured_[probe_base_].mean;
        measured_[streams_] = m;
        if (m.mean > base * (1 + config_.plateau_tolerance)) {
            // The step paid: keep stepping up, one step at a time.
            probe_base_ = streams_;
            const unsigned up = up_from(streams_);
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
        const Measurement p = plateau();  // without this step, as threshold() had it
        measured_[streams_] = m;
        if (m.mean >= (1 - config_.plateau_tolerance / 2) * p.mean)
            probe_down_from(streams_, now);  // fewer streams do as well: keep stepping down
        else
            settle(probe_base_, now);
        return;
    }
    }
}

void StreamTuner::start_ramp(TimePoint now) {
    phase_ = Phase::ramp;
    ramp_prev_ = streams_;
    if (streams_ >= max_streams_) {
        finish_search(now);
        return;
    }
    set_streams(static_cast<unsigned>(std::min<uint64_t>(max_streams_, uint64_t{streams_} * 2)));
}

void StreamTuner::finish_search(TimePoint now) {
    const Measurement p = plateau();
    const double mark = (1 - config_.plateau_tolerance) * p.mean;
    unsigned hi = streams_;
    for (const auto& [n, m] : measured_) {
        if (m.mean >= mark) {
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
    // The next count to measure: where the line through lo's per-stream throughput reaches the
    // plateau, at least a quarter of the way into (lo, hi); the midpoint if lo was not measured.
    unsigned next = lo + (hi - lo) / 2;
    if (const auto it = measured_.find(lo); it != measured_.end() && it->second.mean > 0) {
        const double reach = std::ceil(lo * p.mean / it->second.mean);
        const unsigned quarter = lo + std::max(1u, (hi - lo) / 4);
        next = reach < hi ? std::max(quarter, static_cast<unsigned>(reach)) : hi - 1;
        next = std::clamp(next, lo + 1, hi - 1);
    }
    phase_ = Phase::search;
    set_streams(next);
}

void StreamTuner::settle(unsigned n, TimePoint now) {
    phase_ = Phase::settled;
    set_streams(n);
    settled_at_ = now;
    const auto it = measured_.find(n);
    settled_ = it != measured_.end() ? it->second : Measurement{};
    search_floor_ = min_streams_ - 1;
    ramp_prev_ = 0;
}

void StreamTuner::start_reprobe(TimePoint now) {
    measured_.clear();  // conditions may have changed: only the settled average carries over
    measured_[streams_] = settled_;
    probe_base_ = streams_;
    reprobe_origin_ = streams_;
    search_floor_ = streams_ - 1;  // a step up that pays is searched above the origin only
    const unsigned up = up_from(streams_);
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
    const double want = std::max(16 * bdp_bytes, static_cast<double>(blob_size) / 64);
    if (!(want < static_cast<double>(kMaxChunkBytes))) return kMaxChunkBytes;  // also NaN
    const uint64_t w = static_cast<uint64_t>(want);
    const uint64_t rounded = (w + kChunkGranuleBytes - 1) / kChunkGranuleBytes * kChunkGranuleBytes;
    return std::clamp(rounded, kMinChunkBytes, kMaxChunkBytes);
}

}  // namespace planner
