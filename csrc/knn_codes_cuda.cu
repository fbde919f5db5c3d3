// knn_codes on CUDA (csrc/knn_cuda.cuh has the kernel). Compiled, never run, on the machine it was written on.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "common.h"
#include "knn_cuda.cuh"
#include "ops.h"

namespace tokpost {

std::tuple<at::Tensor, at::Tensor> knn_codes_cuda(const at::Tensor& z, const at::Tensor& codebook, int64_t k) {
  check_z_codebook(z, codebook, at::kCUDA);
  TORCH_CHECK(z.device() == codebook.device(), "z (", z.device(), ") and codebook (", codebook.device(),
              ") must be on the same device");
  check_k("k", k, codebook.size(0));
  const c10::cuda::CUDAGuard device_guard(z.device());
  const int64_t N = z.size(0), K = codebook.size(0), D = codebook.size(1);
  at::Tensor dist = at::empty({N, k}, z.options().dtype(at::kFloat));
  at::Tensor idx = at::empty({N, k}, z.options().dtype(at::kLong));
  if (N == 0) return {dist, idx};
  const int64_t tile = cuda::tile_codes(D);
  const size_t smem = size_t(tile) * (D + 1) * sizeof(float);
  TORCH_CHECK(smem <= 48 * 1024, "codebook's dim D (", D, ") is too large for the CUDA kernel's shared-memory tile");
  const dim3 grid(unsigned((N + cuda::kRowsPerBlock - 1) / cuda::kRowsPerBlock));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  TOKPOST_DISPATCH_FLOAT(z.scalar_type(), "knn_codes_cuda", [&] {
    cuda::knn_rows_kernel<scalar_t, false><<<grid, cuda::kRowsPerBlock, smem, stream>>>(
        z.data_ptr<scalar_t>(), codebook.data_ptr<scalar_t>(), N, K, D, tile, k, 0, 0, 0, dist.data_ptr<float>(),
        idx.data_ptr<int64_t>(), k, nullptr, nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dist, idx};
}

}  // namespace tokpost
