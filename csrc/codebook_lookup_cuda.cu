// codebook_lookup and its deterministic backward on CUDA. Compiled, not yet run on a GPU when written
// (benchmarks/gpu_check.sh checks it against the CPU kernel bit for bit).
// Backward: a stable sort groups the rows by code and searchsorted gives each code's segment; each segment is cut
// into chunks of kLookupChunkRows rows (common.h), one block per chunk sums it in row order (one thread per
// column), and one thread per (code, column) adds its chunk sums in chunk order, all in fp32. No float atomics and
// a fixed order: repeated runs are bit-identical and equal the CPU kernel's result; a collapsed codebook (every
// row on one code) spreads over N / 256 parallel chunks instead of one thread.
#include <ATen/ops/add.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/floor_divide.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/sub.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "common.h"
#include "ops.h"

namespace tokpost {
namespace {

template <typename scalar_t>
__global__ void lookup_kernel(const int64_t* __restrict__ idx,         // [N] int64
                              const scalar_t* __restrict__ codebook,  // [K, D]
                              scalar_t* __restrict__ out,             // [N, D]
                              int64_t N, int64_t K, int64_t D) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < N * D; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = e / D, d = e - n * D;
    const int64_t code = idx[n];
    CUDA_KERNEL_ASSERT(code >= 0 && code < K && "codebook_lookup: idx out of range");
    out[e] = codebook[code * D + d];
  }
}

// One block per chunk m (blockIdx.x), threads over columns: partial[m] = the chunk's rows summed in row order.
template <typename scalar_t>
__global__ void chunk_sum_kernel(const scalar_t* __restrict__ grad,         // [N, D]
                                 const int64_t* __restrict__ order,         // [N] rows sorted by code (stable)
                                 const int64_t* __restrict__ offsets,       // [K + 1] segment starts in order
                                 const int64_t* __restrict__ chunk_start,   // [K + 1] first chunk of each code
                                 int64_t K, int64_t D,
                                 float* __restrict__ partial) {             // [chunks, D]
  const int64_t m = blockIdx.x;
  const int64_t d = int64_t(blockIdx.y) * blockDim.x + threadIdx.x;
  if (m >= chunk_start[K] || d >= D) return;  // the grid is sized by an upper bound on the chunk count
  int64_t lo = 0, hi = K - 1;  // the code whose chunks hold m: the last c with chunk_start[c] <= m
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (chunk_start[mid] <= m) lo = mid;
    else hi = mid - 1;
  }
  const int64_t j0 = offsets[lo] + (m - chunk_start[lo]) * kLookupChunkRows;
  const int64_t j1 = min(offsets[lo + 1], j0 + kLookupChunkRows);
  float acc = 0.f;
  for (int64_t j = j0; j < j1; ++j) acc = __fadd_rn(acc, static_cast<float>(grad[order[j] * D + d]));
  partial[m * D + d] = acc;
}

// One thread per (code, column): the code's chunk sums in chunk order, rounded once to the output dtype.
template <typename scalar_t>
__global__ void combine_chunks_kernel(const float* __restrict__ partial,       // [chunks, D]
                                      const int64_t* __restrict__ chunk_start,  // [K + 1]
                                      int64_t D,
                                      scalar_t* __restrict__ grad_codebook) {   // [K, D]
  const int64_t code = blockIdx.x;
  const int64_t d = int64_t(blockIdx.y) * blockDim.x + threadIdx.x;
  if (d >= D) return;
  float acc = 0.f;
  for (int64_t m = chunk_start[code]; m < chunk_start[code + 1]; ++m) acc = __fadd_rn(acc, partial[m * D + d]);
  grad_codebook[code * D + d] = static_cast<scalar_t>(acc);
}

}  // namespace

at::Tensor codebook_lookup_cuda(const at::Tensor& idx, const at::Tensor& codebook) {
  check_lookup(idx, codebook, at::kCUDA);
  TORCH_CHECK(idx.device() == codebook.device(), "idx (", idx.device(), ") and codebook (", codebook.device(),
              ") must be on the same device");
  const c10::cuda::CUDAGuard device_guard(codebook.device());
  const int64_t N = idx.size(0), K = codebook.size(0), D = codebook.size(1);
  at::Tensor out = at::empty({N, D}, codebook.options());
  if (N == 0) return out;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((N * D + threads - 1) / threads, 65535);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  TOKPOST_DISPATCH_FLOAT(codebook.scalar_type(), "codebook_lookup_cuda", [&] {
    lookup_kernel<scalar_t><<<unsigned(blocks), threads, 0, stream>>>(
        idx.data_ptr<int64_t>(), codebook.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), N, K, D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor codebook_lookup_backward_cuda(const at::Tensor& grad_out, const at::Tensor& idx, int64_t num_codes) {
  check_lookup_backward(grad_out, idx, num_codes, at::kCUDA);
  TORCH_CHECK(idx.device() == grad_out.device(), "idx (", idx.device(), ") and grad_out (", grad_out.device(),
              ") must be on the same device");
  const c10::cuda::CUDAGuard device_guard(grad_out.device());
  const int64_t N = idx.size(0), K = num_codes, D = grad_out.size(1);
  at::Tensor grad_codebook = at::empty({K, D}, grad_out.options());
  if (D == 0) return grad_codebook;
  // Rows grouped by code; within a code, in row order (stable), which fixes the summation order.
  const auto [sorted_codes, order] = at::sort(idx, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor offsets = at::searchsorted(sorted_codes, at::arange(K + 1, idx.options()));
  const at::Tensor counts = at::sub(offsets.slice(0, 1), offsets.slice(0, 0, K));
  const at::Tensor chunks = at::floor_divide(at::add(counts, kLookupChunkRows - 1), kLookupChunkRows);
  const at::Tensor chunk_start = at::cat({at::zeros({1}, idx.options()), at::cumsum(chunks, 0)});
  // sum_c ceil(n_c / C) <= N / C + K: a bound that needs no device-to-host copy of the exact count.
  const int64_t max_chunks = (N + kLookupChunkRows - 1) / kLookupChunkRows + K;
  at::Tensor partial = at::empty({max_chunks, D}, grad_out.options().dtype(at::kFloat));
  const int threads = int(std::min<int64_t>(128, (D + 31) / 32 * 32));
  const unsigned column_blocks = unsigned((D + threads - 1) / threads);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  TOKPOST_DISPATCH_FLOAT(grad_out.scalar_type(), "codebook_lookup_backward_cuda", [&] {
    if (N > 0) {
      chunk_sum_kernel<scalar_t><<<dim3(unsigned(max_chunks), column_blocks), threads, 0, stream>>>(
          grad_out.data_ptr<scalar_t>(), order.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(),
          chunk_start.data_ptr<int64_t>(), K, D, partial.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    combine_chunks_kernel<scalar_t><<<dim3(unsigned(K), column_blocks), threads, 0, stream>>>(
        partial.data_ptr<float>(), chunk_start.data_ptr<int64_t>(), D, grad_codebook.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_codebook;
}

}  // namespace tokpost
