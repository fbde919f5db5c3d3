// The per-row candidate set of the CPU k-nearest search (csrc/knn_search_cpu.cpp): every code whose search value
// can still be within the error window of the row's k-th best, collected so the exact re-rank
// (csrc/exact_rerank_cpu.h) sees a superset of the true k nearest.
//
// Search values live in "acc space": acc = ||c||^2 - 2 z.c (the sweep's FMA chain), i.e. the expanded distance
// minus the row constant ||z||^2, which orders the codes the same way and needs no per-element add.
// Invariants (what makes the result exact, csrc/knn_search_cpu.cpp has the bound):
// - thr is +inf until k candidates are held; afterwards at least k held candidates have acc <= thr, so the row's
//   final k-th smallest acc s_k is <= thr.
// - win = next_up(fl(thr + e2)) > thr + 2E exactly (e2 = 2E rounded up). A code with acc >= win has
//   acc > s_k + 2E and can never be a candidate; every held code has acc < win (the window at the time it was
//   kept), and compaction re-applies the current window.
// - NaN accumulators fail every ordered compare and are never held; neither is +inf (nothing is < +inf).
// - mode says when the window is not used at all: a row whose candidates overflow the buffer, or whose norms are
//   too large for the bound, gets a full difference-form pass; a row with a NaN/inf entry gets codes 0..k-1.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "simd.h"

namespace tokpost::row_topk {

using simd::kLanes;
using simd::vfloat;

constexpr float kInf = std::numeric_limits<float>::infinity();
// The smallest candidate buffer (codes) of a row; a k == 1 row on random data holds one or two candidates.
constexpr int kNearestCandidates = 512;

// Monotone map of the float order onto the uint32 order (for -0.0 < +0.0 it differs; the re-ranked distances are
// never -0.0: the difference form starts at +0 and adds squares).
inline uint32_t ordered_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
inline float from_ordered_bits(uint32_t u) {
  u = (u & 0x80000000u) ? (u & 0x7FFFFFFFu) : ~u;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
// (dist, idx) as one integer, so sorting compares integers and ties fall to the lower index.
inline uint64_t make_key(float dist, int32_t idx) { return (uint64_t(ordered_bits(dist)) << 32) | uint32_t(idx); }
inline float key_dist(uint64_t key) { return from_ordered_bits(uint32_t(key >> 32)); }
inline int32_t key_idx(uint64_t key) { return int32_t(uint32_t(key)); }

// The next float above x (nextafter(x, +inf)) without the libm call: +inf and NaN stay, -0/+0 go to the
// smallest subnormal, -inf goes to the lowest finite.
inline float next_up(float x) {
  if (!(x < kInf)) return x;  // +inf, NaN
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7FFFFFFFu) == 0) u = 1u;  // +-0
  else if (u & 0x80000000u) --u;       // negative: towards zero
  else ++u;
  std::memcpy(&x, &u, 4);
  return x;
}

enum class RowMode : int32_t {
  kSearch,     // candidates from the window, then the exact re-rank
  kFullPass,   // the difference form for every code (window overflowed, or norms too large for the bound)
  kNonFinite,  // the row has a NaN/inf entry: every distance is +inf, the answer is codes 0..k-1
};

struct RowState {
  float win;    // acc < win => candidate; -inf: collect nothing (padding row, or mode != kSearch)
  float thr;    // see the invariants; +inf until k candidates are held
  float e2;     // 2 E_i rounded up
  int32_t k;      // codes this row needs
  int32_t count;  // candidates held
  int32_t cap;    // held candidates that trigger a compaction
  RowMode mode;
  int64_t row;  // the row of z
  float* acc;   // [cap + kLanes]: the last vector's compress store may write past cap
  int32_t* idx;
};

inline void update_window(RowState& s) { s.win = next_up(s.thr + s.e2); }

// Too many candidates inside the window: stop collecting; the row gets the full difference-form pass.
inline void overflow(RowState& s) {
  s.mode = RowMode::kFullPass;
  s.win = -kInf;
  s.count = 0;
}

inline int count_at_most(const RowState& s, float x) {  // #held with acc <= x
  const vfloat xv = simd::broadcast(x);
  int n = 0;
  for (int j = 0; j < s.count; j += kLanes) {
    const uint32_t m = simd::le_mask(simd::loadu(s.acc + j), xv) & simd::head_mask(s.count - j);
    n += __builtin_popcount(m);
  }
  return n;
}

// thr = x (requires #(acc <= x) >= k), then keeps only the held codes inside the new window (stable).
inline void narrow_to(RowState& s, float x) {
  s.thr = x;
  update_window(s);
  const vfloat wv = simd::broadcast(s.win);
  int out = 0;
  for (int j = 0; j < s.count; j += kLanes) {
    const uint32_t m = simd::lt_mask(simd::loadu(s.acc + j), wv) & simd::head_mask(s.count - j);
    simd::compress_store(s.idx + out, m, s.idx + j);
    out += simd::compress_store(s.acc + out, m, simd::loadu(s.acc + j));
  }
  s.count = out;
}

// Picks x with k <= #(acc <= x) <= k + slack by bisection on the ordered float bits (each step one vectorized
// count), then narrows the window to x. Requires count >= k >= 2. Ties and the window may leave more than
// k + slack held; the caller checks the room left.
__attribute__((noinline)) inline void compact(RowState& s, int slack) {
  vfloat lo_v = simd::broadcast(kInf), hi_v = simd::broadcast(-kInf);
  int j = 0;
  for (; j + kLanes <= s.count; j += kLanes) {
    const vfloat a = simd::loadu(s.acc + j);
    lo_v = simd::min_drop_nan(a, lo_v);
    hi_v = simd::max_drop_nan(a, hi_v);
  }
  alignas(64) float lo_l[kLanes], hi_l[kLanes];
  simd::store(lo_l, lo_v);
  simd::store(hi_l, hi_v);
  float mn = *std::min_element(lo_l, lo_l + kLanes), mx = *std::max_element(hi_l, hi_l + kLanes);
  for (; j < s.count; ++j) {
    mn = std::min(mn, s.acc[j]);
    mx = std::max(mx, s.acc[j]);
  }
  // #(acc <= from_ordered_bits(hi)) = hi_count >= k throughout; lo only bounds the search from below.
  uint32_t lo = ordered_bits(mn) - 1, hi = ordered_bits(mx);
  int hi_count = s.count;
  while (hi - lo > 1 && hi_count > s.k + slack) {
    const uint32_t mid = lo + (hi - lo) / 2;
    const int c = count_at_most(s, from_ordered_bits(mid));
    if (c >= s.k) {
      hi = mid;
      hi_count = c;
    } else {
      lo = mid;
    }
  }
  narrow_to(s, from_ordered_bits(hi));
}

// k == 1: the panel's smallest accumulator `acc_min` is below win. A new minimum narrows the window first; then the
// panel's codes inside the window are appended (on random data this is a rare path: a row's minimum improves about
// ln K times, and a runner-up rarely falls within 2E; on near-tie data it collects the few hundred codes of a
// cluster). A full buffer is pruned to the current window first.
template <int kVecs>
inline void on_min_hit(RowState& s, float acc_min, const vfloat* acc, int32_t base) {
  constexpr int kPanel = kVecs * kLanes;
  if (acc_min < s.thr) {
    s.thr = acc_min;
    update_window(s);
  }
  if (s.count + kPanel > s.cap) {
    narrow_to(s, s.thr);
    if (s.count + kPanel > s.cap) return overflow(s);
  }
  const vfloat win = simd::broadcast(s.win);
  for (int v = 0; v < kVecs; ++v) {
    const uint32_t mask = simd::lt_mask(acc[v], win);
    simd::compress_iota(s.idx + s.count, mask, base + v * kLanes);
    s.count += simd::compress_store(s.acc + s.count, mask, acc[v]);
  }
}

// k > 1: appends the panel's codes [base, base + kVecs * kLanes) with acc < win, branch-free (vector compress).
// At k ~ 100 most panels of a row hold a candidate, so a filter branch would mostly mispredict; this costs a
// fixed ~10 vector ops per row and panel instead.
template <int kVecs>
inline void append_panel(RowState& s, const vfloat* acc, int32_t base) {
  constexpr int kPanel = kVecs * kLanes;
  if (__builtin_expect(s.count + kPanel > s.cap, 0)) {
    compact(s, kPanel);
    if (s.count + kPanel > s.cap) return overflow(s);
  }
  const vfloat win = simd::broadcast(s.win);
  // Locals: through the struct, every store into acc/idx would force a reload of count (possible aliasing).
  float* const held = s.acc;
  int32_t* const idx = s.idx;
  int count = s.count;
#pragma GCC unroll 8
  for (int v = 0; v < kVecs; ++v) {
    const uint32_t mask = simd::lt_mask(acc[v], win);
    simd::compress_iota(idx + count, mask, base + v * kLanes);
    count += simd::compress_store(held + count, mask, acc[v]);
  }
  s.count = count;
  if (__builtin_expect(s.thr == kInf && count >= s.k, 0)) compact(s, kPanel);
}

}  // namespace tokpost::row_topk
