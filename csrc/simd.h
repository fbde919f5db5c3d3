// The few SIMD operations the CPU distance kernels need, for AVX-512, AVX2+FMA, and a portable scalar fallback.
// setup.py builds with -march=native, so the widest unit of the building (= running) machine is picked here.
// Every operation is exact IEEE (no fast-math), so all widths give bit-identical distances.
#pragma once

#include <cstdint>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

namespace tokpost::simd {

#if defined(__AVX512F__)
constexpr int kLanes = 16;
using vfloat = __m512;
inline vfloat load(const float* p) { return _mm512_load_ps(p); }
inline void store(float* p, vfloat a) { _mm512_store_ps(p, a); }
inline vfloat broadcast(float x) { return _mm512_set1_ps(x); }
inline vfloat fmadd(vfloat a, vfloat b, vfloat c) { return _mm512_fmadd_ps(a, b, c); }
inline vfloat add(vfloat a, vfloat b) { return _mm512_add_ps(a, b); }
inline vfloat sub(vfloat a, vfloat b) { return _mm512_sub_ps(a, b); }
inline vfloat mul(vfloat a, vfloat b) { return _mm512_mul_ps(a, b); }
// x86 MINPS returns its second operand when either is NaN: min_drop_nan(a, b) never lets a NaN in `a` through.
// (All-lanes masked forms here and below: GCC 12's unmasked AVX-512 intrinsics start from _mm512_undefined_ps and
// trip -Wmaybe-uninitialized inside its own header.)
inline vfloat min_drop_nan(vfloat a, vfloat b) { return _mm512_mask_min_ps(b, __mmask16(0xFFFF), a, b); }
inline vfloat max_drop_nan(vfloat a, vfloat b) { return _mm512_mask_max_ps(b, __mmask16(0xFFFF), a, b); }
// Bit i set where a[i] < b[i] (ordered: false for NaN).
inline uint32_t lt_mask(vfloat a, vfloat b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
inline uint32_t le_mask(vfloat a, vfloat b) { return _mm512_cmp_ps_mask(a, b, _CMP_LE_OQ); }
inline float hmin(vfloat a) {  // a must hold no NaN
  constexpr __mmask16 all = 0xFFFF;  // masked forms throughout: see min_drop_nan
  a = min_drop_nan(a, _mm512_mask_shuffle_f32x4(a, all, a, a, 0x4E));  // swap 256-bit halves
  a = min_drop_nan(a, _mm512_mask_shuffle_f32x4(a, all, a, a, 0xB1));  // swap 128-bit quarters within halves
  a = min_drop_nan(a, _mm512_mask_permute_ps(a, all, a, 0x4E));        // swap 64-bit pairs
  a = min_drop_nan(a, _mm512_mask_permute_ps(a, all, a, 0xB1));        // swap neighbours
  return _mm512_cvtss_f32(a);
}
inline vfloat loadu(const float* p) { return _mm512_loadu_ps(p); }
inline void storeu(float* p, vfloat a) { _mm512_storeu_ps(p, a); }
// Packs the lanes selected by `mask` to the front of dst (which must have kLanes writable slots), in lane order;
// returns how many were selected. Register compress + full store: vcompressps to memory is microcoded on Intel.
inline int compress_store(float* dst, uint32_t mask, vfloat v) {
  _mm512_storeu_ps(dst, _mm512_maskz_compress_ps(__mmask16(mask), v));
  return __builtin_popcount(mask);
}
inline int compress_store(int32_t* dst, uint32_t mask, const int32_t* src) {
  _mm512_storeu_si512(dst, _mm512_maskz_compress_epi32(__mmask16(mask), _mm512_loadu_si512(src)));
  return __builtin_popcount(mask);
}
// Stores the lane indices first, first + 1, ... selected by `mask` to the front of dst.
inline int compress_iota(int32_t* dst, uint32_t mask, int32_t first) {
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i v = _mm512_add_epi32(_mm512_set1_epi32(first), iota);
  _mm512_storeu_si512(dst, _mm512_maskz_compress_epi32(__mmask16(mask), v));
  return __builtin_popcount(mask);
}
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int kLanes = 8;
using vfloat = __m256;
inline vfloat load(const float* p) { return _mm256_load_ps(p); }
inline void store(float* p, vfloat a) { _mm256_store_ps(p, a); }
inline vfloat broadcast(float x) { return _mm256_set1_ps(x); }
inline vfloat fmadd(vfloat a, vfloat b, vfloat c) { return _mm256_fmadd_ps(a, b, c); }
inline vfloat add(vfloat a, vfloat b) { return _mm256_add_ps(a, b); }
inline vfloat sub(vfloat a, vfloat b) { return _mm256_sub_ps(a, b); }
inline vfloat mul(vfloat a, vfloat b) { return _mm256_mul_ps(a, b); }
inline vfloat min_drop_nan(vfloat a, vfloat b) { return _mm256_min_ps(a, b); }
inline vfloat max_drop_nan(vfloat a, vfloat b) { return _mm256_max_ps(a, b); }
inline uint32_t lt_mask(vfloat a, vfloat b) {
  return uint32_t(_mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_LT_OQ)));
}
inline uint32_t le_mask(vfloat a, vfloat b) {
  return uint32_t(_mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_LE_OQ)));
}
inline vfloat loadu(const float* p) { return _mm256_loadu_ps(p); }
inline void storeu(float* p, vfloat a) { _mm256_storeu_ps(p, a); }
inline float hmin(vfloat a) {  // a must hold no NaN
  __m128 m = _mm_min_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  m = _mm_min_ps(m, _mm_movehl_ps(m, m));
  m = _mm_min_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}
#else
// Portable fallback (e.g. aarch64 without a dedicated path): one lane; the compiler may still vectorize loops.
constexpr int kLanes = 1;
using vfloat = float;
inline vfloat load(const float* p) { return *p; }
inline void store(float* p, vfloat a) { *p = a; }
inline vfloat broadcast(float x) { return x; }
inline vfloat fmadd(vfloat a, vfloat b, vfloat c) { return __builtin_fmaf(a, b, c); }
inline vfloat add(vfloat a, vfloat b) { return a + b; }
inline vfloat sub(vfloat a, vfloat b) { return a - b; }
inline vfloat mul(vfloat a, vfloat b) { return a * b; }
inline vfloat min_drop_nan(vfloat a, vfloat b) { return a < b ? a : b; }
inline vfloat max_drop_nan(vfloat a, vfloat b) { return a > b ? a : b; }
inline uint32_t lt_mask(vfloat a, vfloat b) { return a < b ? 1u : 0u; }
inline uint32_t le_mask(vfloat a, vfloat b) { return a <= b ? 1u : 0u; }
inline vfloat loadu(const float* p) { return *p; }
inline void storeu(float* p, vfloat a) { *p = a; }
inline float hmin(vfloat a) { return a; }
#endif

#if !defined(__AVX512F__)
// Lane-by-lane compress for the narrower paths (same results, in lane order).
inline int compress_store(float* dst, uint32_t mask, vfloat v) {
  alignas(64) float lanes[kLanes];
  store(lanes, v);
  int n = 0;
  for (; mask; mask &= mask - 1) dst[n++] = lanes[__builtin_ctz(mask)];
  return n;
}
inline int compress_store(int32_t* dst, uint32_t mask, const int32_t* src) {
  int n = 0;
  for (; mask; mask &= mask - 1) dst[n++] = src[__builtin_ctz(mask)];
  return n;
}
inline int compress_iota(int32_t* dst, uint32_t mask, int32_t first) {
  int n = 0;
  for (; mask; mask &= mask - 1) dst[n++] = first + __builtin_ctz(mask);
  return n;
}
#endif

// Lanes [0, n) of a vector, n <= kLanes.
inline uint32_t head_mask(int n) { return n >= 32 ? 0xFFFFFFFFu : (1u << n) - 1u; }

}  // namespace tokpost::simd
