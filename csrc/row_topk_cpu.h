// The per-row candidate set of the CPU k-nearest search (csrc/knn_search_cpu.cpp): the row's k best codes so
// far plus a buffer of newer candidates, and the filter that keeps the distance loop free of per-element work.
//
// Invariants (what makes the result exact, ties included):
// - Codes reach a row in ascending index order, and candidates are appended in that order; compaction is stable,
//   so dist[0..count) is always in ascending index order.
// - thr is +inf until k candidates are held; afterwards at least k held candidates have dist <= thr. Any later
//   code with dist >= thr is then beaten by k earlier codes in the (dist, idx) order, so only dist < thr is kept.
// - filt: acc >= filt  =>  ||z||^2 + acc >= thr (update_filter has the argument), so the distance loop compares
//   the FMA accumulator acc = ||c||^2 - 2 z.c with filt and never adds ||z||^2 per element.
// - NaN distances fail every ordered compare and are never held; neither is +inf (nothing is < +inf).
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

// Monotone map of the float order onto the uint32 order (for -0.0 < +0.0 it differs; distances are never -0.0:
// ||z||^2 >= +0 and +0 + -0 = +0).
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

struct RowState {
  float filt;   // acc >= filt  =>  dist >= thr  (-inf marks a padding row: never a hit)
  float thr;    // see the invariants; +inf until k candidates are held
  float znorm;  // ||z||^2, fp32 FMA chain in d order
  int32_t k;      // codes this row needs
  int32_t count;  // candidates held
  int32_t cap;    // held candidates that trigger a compaction (k == 1: 1)
  int64_t row;    // the row of z
  float* dist;    // [cap + kLanes]: the last vector's compress store may write past cap
  int32_t* idx;
};

// f = the next float above fl(thr - ||z||^2) is >= the exact thr - ||z||^2, so acc >= f implies
// ||z||^2 + acc >= thr exactly, hence fl(||z||^2 + acc) >= thr (rounding is monotone). thr = +inf gives +inf; a
// NaN/inf ||z||^2 gives NaN, which no compare passes: such rows hold nothing and end as 0..k-1 at +inf.
inline void update_filter(RowState& s) { s.filt = next_up(s.thr - s.znorm); }

template <bool kStrict>
inline int count_below(const RowState& s, float x) {  // #held with dist < x (kStrict) or <= x
  const vfloat xv = simd::broadcast(x);
  int n = 0;
  for (int j = 0; j < s.count; j += kLanes) {
    const vfloat d = simd::loadu(s.dist + j);
    const uint32_t m = (kStrict ? simd::lt_mask(d, xv) : simd::le_mask(d, xv)) & simd::head_mask(s.count - j);
    n += __builtin_popcount(m);
  }
  return n;
}

// Shrinks the held set to the candidates with dist <= x (and, when that is more than `limit`, to exactly k:
// those below x plus the lowest-index ones at x), and sets thr = x. Requires #(dist <= x) >= k.
inline void keep_up_to(RowState& s, float x, int limit) {
  const int le = count_below<false>(s, x);
  const vfloat xv = simd::broadcast(x);
  int out = 0;
  if (le <= limit) {
    for (int j = 0; j < s.count; j += kLanes) {
      const uint32_t m = simd::le_mask(simd::loadu(s.dist + j), xv) & simd::head_mask(s.count - j);
      simd::compress_store(s.idx + out, m, s.idx + j);
      out += simd::compress_store(s.dist + out, m, simd::loadu(s.dist + j));
    }
  } else {  // many ties at x: keep every dist < x, then the first (= lowest-index) ones equal to x
    int at_x = s.k - count_below<true>(s, x);
    for (int j = 0; j < s.count; ++j) {
      const float d = s.dist[j];
      if (d < x || (d == x && at_x-- > 0)) {
        s.dist[out] = d;
        s.idx[out++] = s.idx[j];
      }
    }
  }
  s.count = out;
  s.thr = x;
  update_filter(s);
}

// Picks x with k <= #(dist <= x) <= k + slack by bisection on the ordered float bits (each step one vectorized
// count), then keeps dist <= x. slack = 0 asks for the exact k-th distance. Requires count >= k >= 2.
__attribute__((noinline)) inline void compact(RowState& s, int slack) {
  vfloat lo_v = simd::broadcast(kInf), hi_v = simd::broadcast(-kInf);
  int j = 0;
  for (; j + kLanes <= s.count; j += kLanes) {
    const vfloat d = simd::loadu(s.dist + j);
    lo_v = simd::min_drop_nan(d, lo_v);
    hi_v = simd::max_drop_nan(d, hi_v);
  }
  alignas(64) float lo_l[kLanes], hi_l[kLanes];
  simd::store(lo_l, lo_v);
  simd::store(hi_l, hi_v);
  float mn = *std::min_element(lo_l, lo_l + kLanes), mx = *std::max_element(hi_l, hi_l + kLanes);
  for (; j < s.count; ++j) {
    mn = std::min(mn, s.dist[j]);
    mx = std::max(mx, s.dist[j]);
  }
  // Invariant: #(dist <= from_ordered_bits(lo)) < k <= #(dist <= from_ordered_bits(hi)) = hi_count.
  uint32_t lo = ordered_bits(mn) - 1, hi = ordered_bits(mx);
  int hi_count = s.count;
  while (hi - lo > 1 && hi_count > s.k + slack) {
    const uint32_t mid = lo + (hi - lo) / 2;
    const int c = count_below<false>(s, from_ordered_bits(mid));
    if (c >= s.k) {
      hi = mid;
      hi_count = c;
    } else {
      lo = mid;
    }
  }
  keep_up_to(s, from_ordered_bits(hi), s.k + slack);
}

// k == 1, the rare slow path: panel `panel`'s smallest accumulator `acc_min` is below filt. Only the panel is
// recorded (idx[0] = panel); which of its codes it is gets settled once per row at the end (the engine
// recomputes that panel's distances with the same arithmetic and takes the first code at the best distance).
// Strict < keeps the earlier panel on ties.
inline void on_min_hit(RowState& s, float acc_min, int32_t panel) {
  const float d = s.znorm + acc_min;
  if (d < s.thr) {
    s.thr = d;
    s.dist[0] = d;
    s.idx[0] = panel;
    s.count = 1;
    update_filter(s);
  }
}

// k > 1: appends the panel's codes [base, base + kVecs * kLanes) with dist < thr, branch-free (vector compress).
// At k ~ 100 most panels of a row hold a candidate, so a filter branch would mostly mispredict; this costs a
// fixed ~12 vector ops per row and panel instead.
template <int kVecs>
inline void append_panel(RowState& s, const vfloat* acc, int32_t base) {
  // Compacting down to at most k + one panel leaves room for (buffer panels - 1) worst-case panels, typically
  // dozens of panels' worth of candidates.
  if (__builtin_expect(s.count + kVecs * kLanes > s.cap, 0)) compact(s, kVecs * kLanes);
  const vfloat zn = simd::broadcast(s.znorm);
  const vfloat thr = simd::broadcast(s.thr);
  // Locals: through the struct, every store into dist/idx would force a reload of count (possible aliasing).
  float* const dist = s.dist;
  int32_t* const idx = s.idx;
  int count = s.count;
#pragma GCC unroll 8
  for (int v = 0; v < kVecs; ++v) {
    const vfloat dv = simd::add(zn, acc[v]);
    const uint32_t mask = simd::lt_mask(dv, thr);
    simd::compress_iota(idx + count, mask, base + v * kLanes);
    count += simd::compress_store(dist + count, mask, dv);
  }
  s.count = count;
  if (__builtin_expect(s.thr == kInf && count >= s.k, 0)) compact(s, kVecs * kLanes);
}

// Sorts n keys ascending. A bucket pass on the distance bits (monotone, so buckets are in order) then an insertion
// sort that only fixes order inside buckets: O(n) for the few hundred keys of a row, where std::sort spent as
// long as the whole distance sweep of a row at k = 100.
inline void sort_keys(uint64_t* keys, int n, std::vector<uint64_t>& scratch) {
  if (n > 32) {
    uint32_t lo = 0xFFFFFFFFu, hi = 0;
    for (int j = 0; j < n; ++j) {
      const uint32_t u = uint32_t(keys[j] >> 32);
      lo = std::min(lo, u);
      hi = std::max(hi, u);
    }
    const int buckets = n;
    const double scale = double(buckets) / (double(hi - lo) + 1.0);  // bucket = floor((u - lo) * scale) < buckets
    scratch.assign(size_t(n) + buckets + 1, 0);
    uint64_t* counts = scratch.data() + n;  // [buckets + 1] prefix sums
    for (int j = 0; j < n; ++j) ++counts[1 + int(double(uint32_t(keys[j] >> 32) - lo) * scale)];
    for (int b = 0; b < buckets; ++b) counts[b + 1] += counts[b];
    for (int j = 0; j < n; ++j) scratch[counts[int(double(uint32_t(keys[j] >> 32) - lo) * scale)]++] = keys[j];
    std::copy_n(scratch.data(), n, keys);
  }
  for (int j = 1; j < n; ++j) {
    const uint64_t key = keys[j];
    int i = j;
    for (; i > 0 && keys[i - 1] > key; --i) keys[i] = keys[i - 1];
    keys[i] = key;
  }
}

// The row's k nearest, ascending by (dist, idx), into dist/idx [k]; completed with the lowest unused codes at
// +inf when fewer than k distances were finite. sorted = false sets only [0] and [k - 1] (what perturb_codes
// reads), which needs no sort.
inline void finish(RowState& s, bool sorted, float* dist, int32_t* idx, std::vector<uint64_t>& keys,
                   std::vector<uint64_t>& scratch) {
  if (s.k > 1 && s.count > s.k) compact(s, 0);
  keys.resize(s.count);
  for (int j = 0; j < s.count; ++j) keys[j] = make_key(s.dist[j], s.idx[j]);
  if (!sorted && s.count == s.k) {
    const auto [lo, hi] = std::minmax_element(keys.begin(), keys.end());
    dist[0] = key_dist(*lo);
    idx[0] = key_idx(*lo);
    dist[s.k - 1] = key_dist(*hi);
    idx[s.k - 1] = key_idx(*hi);
    return;
  }
  sort_keys(keys.data(), s.count, scratch);
  for (int j = 0; j < s.count; ++j) {
    dist[j] = key_dist(keys[j]);
    idx[j] = key_idx(keys[j]);
  }
  if (s.count < s.k) {
    std::vector<int32_t> held(idx, idx + s.count);
    std::sort(held.begin(), held.end());
    int32_t next = 0;
    size_t h = 0;
    for (int j = s.count; j < s.k; ++j) {
      while (h < held.size() && held[h] == next) ++next, ++h;
      dist[j] = kInf;
      idx[j] = next++;
    }
  }
}

}  // namespace tokpost::row_topk
