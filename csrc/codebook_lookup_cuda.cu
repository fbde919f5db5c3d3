// codebook_lookup and its deterministic backward on CUDA. Compiled, never run, on the machine it was written on.
// Backward: a stable sort groups the rows by code, searchsorted gives each code's segment, and one thread per
// (code, column) sums its segment in row order in fp32: no float atomics, so repeated runs are bit-identical.
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/sort.h>
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

template <typename scalar_t>
__global__ void segment_sum_kernel(const scalar_t* __restrict__ grad,     // [N, D]
                                   const int64_t* __restrict__ order,     // [N] rows sorted by code (stable)
                                   const int64_t* __restrict__ offsets,   // [K + 1] segment starts in order
                                   scalar_t* __restrict__ grad_codebook,  // [K, D]
                                   int64_t D) {
  const int64_t code = blockIdx.x;
  const int64_t d = int64_t(blockIdx.y) * blockDim.x + threadIdx.x;
  if (d >= D) return;
  float acc = 0.f;
  for (int64_t j = offsets[code]; j < offsets[code + 1]; ++j) acc += static_cast<float>(grad[order[j] * D + d]);
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
  const int64_t K = num_codes, D = grad_out.size(1);
  at::Tensor grad_codebook = at::empty({K, D}, grad_out.options());
  if (D == 0) return grad_codebook;
  // Rows grouped by code; within a code, in row order (stable), which fixes the summation order.
  const auto [sorted_codes, order] = at::sort(idx, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor offsets = at::searchsorted(sorted_codes, at::arange(K + 1, idx.options()));
  const int threads = 128;
  const dim3 grid(unsigned(K), unsigned((D + threads - 1) / threads));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  TOKPOST_DISPATCH_FLOAT(grad_out.scalar_type(), "codebook_lookup_backward_cuda", [&] {
    segment_sum_kernel<scalar_t><<<grid, threads, 0, stream>>>(grad_out.data_ptr<scalar_t>(),
                                                               order.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(),
                                                               grad_codebook.data_ptr<scalar_t>(), D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_codebook;
}

}  // namespace tokpost
