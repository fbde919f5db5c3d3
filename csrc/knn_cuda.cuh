// CUDA k-nearest-codes search shared by knn_codes_cuda.cu and perturb_codes_cuda.cu.
//
// NOTE: compiled (nvcc 13, sm_80/sm_90) but never run on the machine it was written on (no GPU there). It is the
// straightforward, obviously-correct kernel, not a tuned one (the Triton kernels in kernels/ are the fast GPU path):
// - one thread per row of z; the block stages a tile of codes (fp32) and their norms in shared memory;
// - dist = ||z||^2 + (||c||^2 - 2 z.c), every term an explicit fmaf chain in d order, exactly as the CPU kernel
//   (csrc/knn_search_cpu.cpp) computes it, so the two backends give the same fp32 distances;
// - each thread keeps its row's sorted top-k list in global memory (the output rows or a workspace), inserting a
//   code only when dist < the k-th best: codes arrive in ascending index order, so ties keep the lowest index,
//   and NaN (no ordered compare passes) and +inf are never inserted; rows short of k finite distances are
//   completed with the lowest unused indices at +inf. Any k <= K works; large k is slow (O(k) insertion).
#pragma once

#include <c10/macros/Macros.h>
#include <math_constants.h>

#include <cstdint>

#include "philox.h"

namespace tokpost::cuda {

constexpr int kRowsPerBlock = 128;
constexpr int kTileSmemBytes = 32 * 1024;

// Codes per shared-memory tile for dimension D (fp32 values + one norm each).
inline int64_t tile_codes(int64_t D) {
  const int64_t t = kTileSmemBytes / (4 * (D + 1));
  return t < 1 ? 1 : (t > 256 ? 256 : t);
}

// Rows [blockIdx.x * kRowsPerBlock, ...). row k = k_fixed, or (kPerturb) the Philox rank + 1 (SPEC A2).
// list_dist/list_idx: [N, ld] per-row lists (ld >= k). kPerturb: writes idx_out[n] = list[0] and
// pert_out[n] = list[rank] instead of leaving the sorted list as the result.
template <typename scalar_t, bool kPerturb>
__global__ void knn_rows_kernel(const scalar_t* __restrict__ z,         // [N, D]
                                const scalar_t* __restrict__ codebook,  // [K, D]
                                int64_t N, int64_t K, int64_t D, int64_t tile,
                                int64_t k_fixed,                         // knn: k;  perturb: topk
                                int64_t threshold, uint64_t seed, int64_t position_offset,
                                float* __restrict__ list_dist,           // [N, ld] fp32
                                int64_t* __restrict__ list_idx,          // [N, ld] int64
                                int64_t ld,
                                int64_t* __restrict__ idx_out,           // perturb: [N] int64
                                int64_t* __restrict__ pert_out) {        // perturb: [N] int64
  extern __shared__ float smem[];
  float* tile_codes_smem = smem;                  // [tile, D]
  float* tile_norms = smem + tile * D;            // [tile]
  const int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x;
  const bool active = row < N;

  int64_t k = k_fixed, rank = 0;
  if (kPerturb && active) {
    rank = perturb_rank(seed, uint64_t(position_offset + row), threshold, k_fixed);
    k = rank + 1;
  }
  float znorm = 0.f;
  if (active)
    for (int64_t d = 0; d < D; ++d) {
      const float x = static_cast<float>(z[row * D + d]);
      znorm = fmaf(x, x, znorm);
    }
  float* my_dist = list_dist + (active ? row : 0) * ld;
  int64_t* my_idx = list_idx + (active ? row : 0) * ld;
  int64_t count = 0;
  float thr = CUDART_INF_F;

  for (int64_t t0 = 0; t0 < K; t0 += tile) {
    const int64_t tn = (K - t0) < tile ? (K - t0) : tile;
    __syncthreads();  // the previous tile is no longer read
    for (int64_t e = threadIdx.x; e < tn * D; e += blockDim.x)
      tile_codes_smem[e] = static_cast<float>(codebook[t0 * D + e]);
    __syncthreads();
    for (int64_t j = threadIdx.x; j < tn; j += blockDim.x) {
      float norm = 0.f;
      for (int64_t d = 0; d < D; ++d) norm = fmaf(tile_codes_smem[j * D + d], tile_codes_smem[j * D + d], norm);
      tile_norms[j] = norm;
    }
    __syncthreads();
    if (!active) continue;
    for (int64_t j = 0; j < tn; ++j) {
      float acc = tile_norms[j];
      for (int64_t d = 0; d < D; ++d)
        acc = fmaf(-2.f * static_cast<float>(z[row * D + d]), tile_codes_smem[j * D + d], acc);
      const float dist = znorm + acc;
      if (!(dist < thr)) continue;  // NaN, +inf, or not better than the k-th best (ties: the earlier code)
      int64_t pos = count < k ? count++ : k - 1;
      while (pos > 0 && my_dist[pos - 1] > dist) {
        my_dist[pos] = my_dist[pos - 1];
        my_idx[pos] = my_idx[pos - 1];
        --pos;
      }
      my_dist[pos] = dist;
      my_idx[pos] = t0 + j;
      if (count == k) thr = my_dist[k - 1];
    }
  }
  if (!active) return;
  // Fewer than k finite distances: the lowest code indices not in the list, at +inf.
  int64_t next = 0;
  for (int64_t pos = count; pos < k; ++pos) {
    bool held = true;
    while (held) {
      held = false;
      for (int64_t q = 0; q < count; ++q)
        if (my_idx[q] == next) {
          held = true;
          ++next;
          break;
        }
    }
    my_dist[pos] = CUDART_INF_F;
    my_idx[pos] = next++;
  }
  if (kPerturb) {
    idx_out[row] = my_idx[0];
    pert_out[row] = my_idx[rank];
  }
}

}  // namespace tokpost::cuda
