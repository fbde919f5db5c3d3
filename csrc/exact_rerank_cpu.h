// The distance every backend returns (docs/INTERFACES.md, the exact-nearest contract) and the final selection:
//   t_d = fl(z_d - c_d);  s = +0;  for d = 0..D-1:  s = fl(s + fl(t_d * t_d));   NaN -> +inf
// Separate subtract, multiply and add (the extension builds with -ffp-contract=off, and the vector path uses
// explicit sub/mul/add intrinsics), so the scalar and vector forms, the CUDA kernel, the Triton kernels and the
// PyTorch reference agree bit for bit. Order: ascending (dist, idx); codes at +inf come last, in index order.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "row_topk_cpu.h"
#include "simd.h"

namespace tokpost::exact {

using row_topk::kInf;
using simd::kLanes;
using simd::vfloat;

// kVecs * kLanes codes of a panel laid out [D][kVecs * kLanes]: the difference form (top of file), lane-wise.
template <int kVecs>
inline void diff_dist_panel(const float* z, const float* panel, int64_t D, float* out) {
  constexpr int kPanel = kVecs * kLanes;
  vfloat s[kVecs];
#pragma GCC unroll 8
  for (int v = 0; v < kVecs; ++v) s[v] = simd::broadcast(0.f);
  for (int64_t d = 0; d < D; ++d) {
    const vfloat zb = simd::broadcast(z[d]);
#pragma GCC unroll 8
    for (int v = 0; v < kVecs; ++v) {
      const vfloat t = simd::sub(zb, simd::load(panel + d * kPanel + v * kLanes));
      s[v] = simd::add(s[v], simd::mul(t, t));
    }
  }
#pragma GCC unroll 8
  for (int v = 0; v < kVecs; ++v) simd::store(out + v * kLanes, s[v]);
  for (int j = 0; j < kPanel; ++j)
    if (!(out[j] == out[j])) out[j] = kInf;
}

#if defined(__AVX512F__)
// In-register transpose of a 16 x 16 float tile (r[i] lane j -> r[j] lane i).
inline void transpose16(__m512* r) {
  constexpr __mmask16 kAll = 0xFFFF;  // masked forms: see simd.h min_drop_nan
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_mask_unpacklo_ps(r[2 * i], kAll, r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_mask_unpackhi_ps(r[2 * i], kAll, r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_mask_shuffle_ps(t[4 * i], kAll, t[4 * i], t[4 * i + 2], 0x44);
    r[4 * i + 1] = _mm512_mask_shuffle_ps(t[4 * i], kAll, t[4 * i], t[4 * i + 2], 0xEE);
    r[4 * i + 2] = _mm512_mask_shuffle_ps(t[4 * i + 1], kAll, t[4 * i + 1], t[4 * i + 3], 0x44);
    r[4 * i + 3] = _mm512_mask_shuffle_ps(t[4 * i + 1], kAll, t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int h = 0; h < 2; ++h)
    for (int i = 0; i < 4; ++i) {
      t[8 * h + i] = _mm512_mask_shuffle_f32x4(r[8 * h + i], kAll, r[8 * h + i], r[8 * h + i + 4], 0x88);
      t[8 * h + i + 4] = _mm512_mask_shuffle_f32x4(r[8 * h + i], kAll, r[8 * h + i], r[8 * h + i + 4], 0xDD);
    }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_mask_shuffle_f32x4(t[i], kAll, t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_mask_shuffle_f32x4(t[i], kAll, t[i], t[i + 8], 0xDD);
  }
}
#endif

// Codes codes[0, n) of a row-major fp32 codebook rows [K, D]: the difference form (top of file). The squares are
// computed a vector at a time along d (subtract and multiply are elementwise: any layout gives the same bits);
// AVX-512 then transposes 16 codes x 16 dims in registers and adds whole vectors in d order (one lane per code),
// the other paths add kGroup independent scalar chains in d order. No gathers: on CPUs with the gather-data-
// sampling mitigation they cost more than this. The candidates' rows are prefetched first: they are scattered.
inline void diff_dist_codes(const float* z, const float* rows, int64_t D, const int32_t* codes, int64_t n, float* out,
                            std::vector<float>& squares) {
  for (int64_t j = 0; j < n; ++j)
    for (int64_t d = 0; d < D; d += 16) __builtin_prefetch(rows + int64_t(codes[j]) * D + d);
#if defined(__AVX512F__)
  (void)squares;
  for (int64_t g = 0; g < n; g += 16) {
    const int64_t m = std::min<int64_t>(16, n - g);
    __m512 s = _mm512_setzero_ps();
    for (int64_t d0 = 0; d0 < D; d0 += 16) {
      const int64_t dn = std::min<int64_t>(16, D - d0);
      const __mmask16 lanes = __mmask16((1u << dn) - 1u);
      const __m512 zv = _mm512_maskz_loadu_ps(lanes, z + d0);
      __m512 r[16];
      for (int j = 0; j < 16; ++j) {
        const float* c = rows + int64_t(codes[g + (j < m ? j : 0)]) * D + d0;
        const __m512 t = _mm512_sub_ps(zv, _mm512_maskz_loadu_ps(lanes, c));
        r[j] = _mm512_mul_ps(t, t);
      }
      transpose16(r);
      for (int64_t d = 0; d < dn; ++d) s = _mm512_add_ps(s, r[d]);
    }
    alignas(64) float lanes_out[16];
    _mm512_store_ps(lanes_out, s);
    for (int64_t j = 0; j < m; ++j) out[g + j] = lanes_out[j] == lanes_out[j] ? lanes_out[j] : kInf;
  }
#else
  constexpr int kGroup = 8;
  const int64_t stride = (D + kLanes - 1) / kLanes * kLanes;
  squares.assign(size_t(kGroup * stride), 0.f);
  float* sq = squares.data();
  for (int64_t g = 0; g < n; g += kGroup) {
    const int64_t m = std::min<int64_t>(kGroup, n - g);
    for (int64_t j = 0; j < m; ++j) {
      const float* c = rows + int64_t(codes[g + j]) * D;
      float* dst = sq + j * stride;
      int64_t d = 0;
      for (; d + kLanes <= D; d += kLanes) {
        const vfloat t = simd::sub(simd::loadu(z + d), simd::loadu(c + d));
        simd::storeu(dst + d, simd::mul(t, t));
      }
      for (; d < D; ++d) {
        const float t = z[d] - c[d];
        dst[d] = t * t;
      }
    }
    float s[kGroup] = {};
    for (int64_t d = 0; d < D; ++d)
#pragma GCC unroll 8
      for (int j = 0; j < kGroup; ++j) s[j] = s[j] + sq[j * stride + d];
    for (int64_t j = 0; j < m; ++j) out[g + j] = s[j] == s[j] ? s[j] : kInf;
  }
#endif
}

// Sorts n keys ascending. A bucket pass on the distance bits (monotone, so buckets are in order) then an insertion
// sort that only fixes order inside buckets: O(n) for the few hundred keys of a row, where std::sort spent as
// long as the whole distance sweep of a row at k = 100.
inline void sort_keys(uint64_t* keys, int64_t n, std::vector<uint64_t>& scratch) {
  if (n > 32) {
    uint32_t lo = 0xFFFFFFFFu, hi = 0;
    for (int64_t j = 0; j < n; ++j) {
      const uint32_t u = uint32_t(keys[j] >> 32);
      lo = std::min(lo, u);
      hi = std::max(hi, u);
    }
    const int64_t buckets = n;
    const double scale = double(buckets) / (double(hi - lo) + 1.0);  // bucket = floor((u - lo) * scale) < buckets
    scratch.assign(size_t(n + buckets + 1), 0);
    uint64_t* counts = scratch.data() + n;  // [buckets + 1] prefix sums
    for (int64_t j = 0; j < n; ++j) ++counts[1 + int64_t(double(uint32_t(keys[j] >> 32) - lo) * scale)];
    for (int64_t b = 0; b < buckets; ++b) counts[b + 1] += counts[b];
    for (int64_t j = 0; j < n; ++j) scratch[counts[int64_t(double(uint32_t(keys[j] >> 32) - lo) * scale)]++] = keys[j];
    std::copy_n(scratch.data(), n, keys);
  }
  for (int64_t j = 1; j < n; ++j) {
    const uint64_t key = keys[j];
    int64_t i = j;
    for (; i > 0 && keys[i - 1] > key; --i) keys[i] = keys[i - 1];
    keys[i] = key;
  }
}

// keys: (dist, idx) of candidate codes with FINITE dist, any order, no duplicates. Writes the k smallest,
// ascending, to dist/idx [k]; when fewer than k are given, the rest are the lowest code indices not among them,
// at +inf (every code not given is at +inf: the contract's "+inf codes last, in index order"). sorted = false
// sets only [0] and [k - 1] (what perturb_codes reads).
inline void select_k(std::vector<uint64_t>& keys, int64_t k, bool sorted, float* dist, int32_t* idx,
                     std::vector<uint64_t>& scratch) {
  const int64_t n = int64_t(keys.size());
  if (!sorted && n >= k) {
    if (n > k) std::nth_element(keys.begin(), keys.begin() + (k - 1), keys.end());
    // keys[0, k) now holds exactly the k smallest: [0] is their minimum, [k - 1] their maximum.
    const auto [lo, hi] = std::minmax_element(keys.begin(), keys.begin() + k);
    dist[0] = row_topk::key_dist(*lo);
    idx[0] = row_topk::key_idx(*lo);
    dist[k - 1] = row_topk::key_dist(*hi);
    idx[k - 1] = row_topk::key_idx(*hi);
    return;
  }
  sort_keys(keys.data(), n, scratch);
  const int64_t m = std::min(n, k);
  for (int64_t j = 0; j < m; ++j) {
    dist[j] = row_topk::key_dist(keys[j]);
    idx[j] = row_topk::key_idx(keys[j]);
  }
  if (m < k) {
    std::vector<int32_t> held(idx, idx + m);
    std::sort(held.begin(), held.end());
    int32_t next = 0;
    size_t h = 0;
    for (int64_t j = m; j < k; ++j) {
      while (h < held.size() && held[h] == next) ++next, ++h;
      dist[j] = kInf;
      idx[j] = next++;
    }
  }
}

}  // namespace tokpost::exact
