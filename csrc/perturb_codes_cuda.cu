// perturb_codes on CUDA: the Philox rank is drawn in the kernel, then the row searches only its rank + 1 nearest
// codes (csrc/knn_cuda.cuh). Compiled, never run, on the machine it was written on.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

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
  // Per-row sorted lists of up to topk codes.
  at::Tensor list_dist = at::empty({N, topk}, z.options().dtype(at::kFloat));
  at::Tensor list_idx = at::empty({N, topk}, z.options().dtype(at::kLong));
  const int64_t tile = cuda::tile_codes(D);
  const size_t smem = size_t(tile) * (D + 1) * sizeof(float);
  TORCH_CHECK(smem <= 48 * 1024, "codebook's dim D (", D, ") is too large for the CUDA kernel's shared-memory tile");
  const dim3 grid(unsigned((N + cuda::kRowsPerBlock - 1) / cuda::kRowsPerBlock));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  TOKPOST_DISPATCH_FLOAT(z.scalar_type(), "perturb_codes_cuda", [&] {
    cuda::knn_rows_kernel<scalar_t, true><<<grid, cuda::kRowsPerBlock, smem, stream>>>(
        z.data_ptr<scalar_t>(), codebook.data_ptr<scalar_t>(), N, K, D, tile, topk, threshold, uint64_t(seed),
        position_offset, list_dist.data_ptr<float>(), list_idx.data_ptr<int64_t>(), topk, idx.data_ptr<int64_t>(),
        idx_perturbed.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {idx, idx_perturbed};
}

}  // namespace tokpost
