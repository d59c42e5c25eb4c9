// actsim::study batch search — the largest batch size (or sequence length) whose simulated peak
// fits the device.
//
//   Analysis a = analyze(s);
//   int64_t b = max_batch_size(a);      // 0 if not even a batch of 1 fits
//   int64_t t = max_seq_len(s);         // at the scenario's batch size
//
// Both assume that a fitting size's smaller sizes fit too (the peak grows with the size); under
// that assumption the answer is the one a doubling-then-bisection over real simulations gives
// (largest_fitting), which is what they fall back on. Note [Batch search] in batch_search.cpp
// says how max_batch_size gets there with about two simulations instead of fourteen.
#pragma once

#include <cstdint>
#include <functional>

#include "actsim/study/analyze.hpp"
#include "actsim/study/scenario.hpp"

namespace actsim::study {

// Sizes beyond this are not searched (16M: far beyond any device today); a search answers it when
// it fits.
inline constexpr int64_t kMaxSearchedSize = int64_t{1} << 24;

// The largest n in [1, limit] with fits(n), for a fits that holds up to some n and not after; 0
// when fits(1) is false. Doubling, then bisection: about 2 log2(answer) calls of fits.
int64_t largest_fitting(const std::function<bool(int64_t)>& fits, int64_t limit = kMaxSearchedSize);

// The largest batch size whose simulated peak fits the scenario's device (0 if none does). `a` is
// the analysis of the scenario at its own batch size: its answer and figures are reused.
int64_t max_batch_size(const Analysis& a);
int64_t max_batch_size(const Scenario& s);

// The largest model.seq_len that fits at the scenario's batch size (0 if none does). A length the
// scenario rules out (a byte count overflowing int64) or whose totals overflow does not fit.
int64_t max_seq_len(const Scenario& s);

}  // namespace actsim::study
