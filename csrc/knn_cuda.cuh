// CUDA k-nearest-codes, shared by knn_codes_cuda.cu and perturb_codes_cuda.cu: the contract's difference form
// for EVERY code (exact by definition, docs/INTERFACES.md), so no search bound and no re-rank are needed.
//
// NOTE: compiled for sm_80/sm_90 (benchmarks/kernel_report_cuda.py inspects it) but, when this was written, never
// run on a GPU; benchmarks/gpu_check.sh tests and times it on one. It is the simple correct kernel, not the fast
// one: it runs on the CUDA cores (3 fp32 instructions per element and dimension, no tensor cores), and `auto`
// picks the Triton kernels on a GPU (README "CUDA kernels").
// - One warp per row of z, kWarps rows per block. The block stages a [kDimChunk x kTileCodes] codebook tile in
//   shared memory (coalesced loads, transposed so lane j reads code j: conflict-free), and each warp's z chunk
//   beside it; lane j owns codes j, j + 32, ... of the tile and accumulates their distances over the d chunks.
// - dist = sum_d fl(fl(z_d - c_d)^2) in d order with __fsub_rn/__fmul_rn/__fadd_rn (never contracted into an FMA),
//   NaN -> +inf; key = (dist bits, code index) as one uint64 (dist >= +0, so its bits order like the floats): the
//   order is (dist, idx), ties to the lowest index, +inf codes in index order, every code has a key.
// - k == 1: each lane keeps its smallest key, then a warp min-reduction. k > 1: keys below the row's threshold
//   (the k-th smallest key kept so far) are appended with a ballot to a per-row buffer in global memory; when the
//   next tile might not fit, the warp ranks the buffer (rank = #smaller keys: keys are distinct), keeps the k
//   smallest in order, and raises nothing but the threshold. The final ranking writes the sorted result.
#pragma once

#include <c10/macros/Macros.h>
#include <math_constants.h>

#include <cstdint>

#include "philox.h"

namespace tokpost::cuda {

constexpr int kWarps = 8;                               // rows per block
constexpr int kCodesPerLane = 4;                        // codes each lane owns per tile
constexpr int kTileCodes = 32 * kCodesPerLane;          // codes per shared-memory tile
constexpr int kDimChunk = 64;                           // dimensions per shared-memory stage
constexpr int64_t kWorkspaceBytes = int64_t(64) << 20;  // per-launch key buffers (rows are launched in slices)

// Key buffer per row for k_max > 1: [cap keys | k_max ranked keys]; cap leaves room for one tile after k kept.
C10_HOST_DEVICE inline int64_t row_buffer_cap(int64_t k_max) { return 2 * k_max + kTileCodes; }
C10_HOST_DEVICE inline int64_t row_buffer_len(int64_t k_max) { return row_buffer_cap(k_max) + k_max; }

__device__ __forceinline__ uint64_t dist_key(float dist, int64_t code) {
  const float d = dist != dist ? CUDART_INF_F : dist;
  return (uint64_t(__float_as_uint(d)) << 32) | uint32_t(code);
}
__device__ __forceinline__ float key_dist(uint64_t key) { return __uint_as_float(uint32_t(key >> 32)); }
__device__ __forceinline__ int64_t key_idx(uint64_t key) { return int64_t(uint32_t(key)); }

// The k smallest of buf[0, count) (distinct keys, count >= k) into out[0, k), ascending. Whole warp.
__device__ __forceinline__ void rank_into(const uint64_t* buf, int64_t count, int64_t k, uint64_t* out, int lane) {
  __syncwarp();  // the ballot appends of every lane are visible
  for (int64_t i = lane; i < count; i += 32) {
    const uint64_t key = buf[i];
    int64_t rank = 0;
    for (int64_t j = 0; j < count; ++j) rank += buf[j] < key ? 1 : 0;
    if (rank < k) out[rank] = key;
  }
  __syncwarp();
}

// Rows [row0, row0 + rows) of z. kPerturb: row k = Philox rank + 1 (METHOD.md A2), writes idx_out/pert_out; else
// k = k_fixed, writes out_dist/out_idx [N, k_fixed]. work: [rows, row_buffer_len(k_fixed)] (unused if k_fixed == 1).
template <typename scalar_t, bool kPerturb>
__global__ void __launch_bounds__(kWarps * 32)
    knn_exact_kernel(const scalar_t* __restrict__ z,         // [N, D]
                     const scalar_t* __restrict__ codebook,  // [K, D]
                     int64_t row0, int64_t rows, int64_t K, int64_t D,
                     int64_t k_fixed,                         // knn: k;  perturb: topk
                     int64_t threshold, uint64_t seed, int64_t position_offset,
                     uint64_t* __restrict__ work,             // [rows, row_buffer_len(k_fixed)]
                     float* __restrict__ out_dist,            // knn: [N, k] fp32
                     int64_t* __restrict__ out_idx,           // knn: [N, k] int64
                     int64_t* __restrict__ idx_out,           // perturb: [N] int64
                     int64_t* __restrict__ pert_out) {        // perturb: [N] int64
  __shared__ float tile[kDimChunk][kTileCodes + 1];  // + 1: the transposing stores spread over the banks
  __shared__ float z_chunk[kWarps][kDimChunk];
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
  const int64_t local = int64_t(blockIdx.x) * kWarps + warp;
  const int64_t row = row0 + local;
  const bool active = local < rows;  // uniform within the warp

  int64_t k = k_fixed, rank = 0;
  if (kPerturb) {
    rank = active ? perturb_rank(seed, uint64_t(position_offset + row), threshold, k_fixed) : 0;
    k = rank + 1;
  }
  const int64_t cap = row_buffer_cap(k_fixed);
  uint64_t* buf = k_fixed > 1 && active ? work + local * row_buffer_len(k_fixed) : nullptr;
  uint64_t* ranked = buf != nullptr ? buf + cap : nullptr;
  uint64_t best = ~uint64_t(0);  // k == 1
  uint64_t thr = ~uint64_t(0);   // k > 1: keys >= thr cannot be among the k nearest
  int64_t count = 0;

  for (int64_t t0 = 0; t0 < K; t0 += kTileCodes) {
    float acc[kCodesPerLane];
#pragma unroll
    for (int g = 0; g < kCodesPerLane; ++g) acc[g] = 0.f;
    for (int64_t d0 = 0; d0 < D; d0 += kDimChunk) {
      const int dn = int(D - d0 < kDimChunk ? D - d0 : kDimChunk);
      __syncthreads();  // the previous stage is no longer read
      for (int e = int(threadIdx.x); e < kTileCodes * dn; e += kWarps * 32) {
        const int j = e / dn, d = e - j * dn;  // consecutive threads read consecutive addresses of a code row
        const int64_t code = t0 + j;
        tile[d][j] = code < K ? static_cast<float>(codebook[code * D + d0 + d]) : 0.f;
      }
      for (int d = lane; d < dn; d += 32) z_chunk[warp][d] = active ? static_cast<float>(z[row * D + d0 + d]) : 0.f;
      __syncthreads();
      for (int d = 0; d < dn; ++d) {
        const float zd = z_chunk[warp][d];
#pragma unroll
        for (int g = 0; g < kCodesPerLane; ++g) {
          const float t = __fsub_rn(zd, tile[d][g * 32 + lane]);
          acc[g] = __fadd_rn(acc[g], __fmul_rn(t, t));
        }
      }
    }
    if (!active) continue;
    if (k == 1) {
#pragma unroll
      for (int g = 0; g < kCodesPerLane; ++g) {
        const int64_t code = t0 + g * 32 + lane;
        if (code < K) best = min(best, dist_key(acc[g], code));
      }
      continue;
    }
    if (count + kTileCodes > cap) {  // make room: keep the k smallest, lower the threshold
      rank_into(buf, count, k, ranked, lane);
      for (int64_t i = lane; i < k; i += 32) buf[i] = ranked[i];
      __syncwarp();
      count = k;
      thr = buf[k - 1];
    }
#pragma unroll
    for (int g = 0; g < kCodesPerLane; ++g) {
      const int64_t code = t0 + g * 32 + lane;
      const uint64_t key = code < K ? dist_key(acc[g], code) : ~uint64_t(0);
      const bool take = key < thr;
      const unsigned taken = __ballot_sync(0xFFFFFFFFu, take);
      if (take) buf[count + __popc(taken & ((1u << lane) - 1u))] = key;
      count += __popc(taken);
    }
  }
  if (!active) return;
  if (k == 1) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) best = min(best, __shfl_xor_sync(0xFFFFFFFFu, best, offset));
    if (lane == 0) {
      if (kPerturb) {
        idx_out[row] = key_idx(best);
        pert_out[row] = key_idx(best);
      } else {
        out_dist[row] = key_dist(best);
        out_idx[row] = key_idx(best);
      }
    }
    return;
  }
  // count >= k: every code was appended until the first ranking, which happens only above 2k held.
  rank_into(buf, count, k, ranked, lane);
  if (kPerturb) {
    if (lane == 0) {
      idx_out[row] = key_idx(ranked[0]);
      pert_out[row] = key_idx(ranked[rank]);
    }
  } else {
    for (int64_t i = lane; i < k; i += 32) {
      out_dist[row * k + i] = key_dist(ranked[i]);
      out_idx[row * k + i] = key_idx(ranked[i]);
    }
  }
}

// Rows per launch so that the key buffers stay within kWorkspaceBytes (a multiple of kWarps).
inline int64_t rows_per_launch(int64_t n, int64_t k_max) {
  if (k_max <= 1) return n;
  const int64_t per_row = row_buffer_len(k_max) * int64_t(sizeof(uint64_t));
  int64_t rows = kWorkspaceBytes / per_row / kWarps * kWarps;
  rows = rows < kWarps ? kWarps : rows;
  return rows < n ? rows : n;
}

}  // namespace tokpost::cuda
