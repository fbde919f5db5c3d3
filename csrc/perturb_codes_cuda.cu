// perturb_codes on CUDA: the Philox rank is drawn in the kernel, then the row ranks only its rank + 1 nearest
// codes (csrc/knn_cuda.cuh has the kernel and its status: compiled, not yet run on a GPU).
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "common.h"
#include "knn_cuda.cuh"
#include "ops.h"

namespace tokpost {

std::tuple<at::Tensor, at::Tensor> perturb_codes_cuda(const at::Tensor& z, const at::Tensor& codebook, int64_t topk,
                                                      int64_t threshold, int64_t seed, int64_t position_offset) {
  check_z_codebook(z, codebook, at::kCUDA);
  TORCH_CHECK(z.device() == codebook.device(), "z (", z.device(), ") and codebook (", codebook.device(),
              ") must be on the same device");
  check_perturb_args(topk, threshold, seed, position_offset, codebook.size(0));
  const c10::cuda::CUDAGuard device_guard(z.device());
  const int64_t N = z.size(0), K = codebook.size(0), D = codebook.size(1);
  at::Tensor idx = at::empty({N}, z.options().dtype(at::kLong));
  at::Tensor idx_perturbed = at::empty({N}, z.options().dtype(at::kLong));
  if (N == 0) return {idx, idx_perturbed};
  const int64_t slice = cuda::rows_per_launch(N, topk);
  at::Tensor work;
  if (topk > 1) work = at::empty({slice * cuda::row_buffer_len(topk)}, z.options().dtype(at::kLong));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  TOKPOST_DISPATCH_FLOAT(z.scalar_type(), "perturb_codes_cuda", [&] {
    for (int64_t row0 = 0; row0 < N; row0 += slice) {
      const int64_t rows = std::min(slice, N - row0);
      const dim3 grid(unsigned((rows + cuda::kWarps - 1) / cuda::kWarps));
      cuda::knn_exact_kernel<scalar_t, true><<<grid, cuda::kWarps * 32, 0, stream>>>(
          z.data_ptr<scalar_t>(), codebook.data_ptr<scalar_t>(), row0, rows, K, D, topk, threshold,
          uint64_t(seed), position_offset,
          topk > 1 ? reinterpret_cast<uint64_t*>(work.data_ptr<int64_t>()) : nullptr, nullptr, nullptr,
          idx.data_ptr<int64_t>(), idx_perturbed.data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {idx, idx_perturbed};
}

}  // namespace tokpost
