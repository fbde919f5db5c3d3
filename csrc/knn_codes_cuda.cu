// knn_codes on CUDA (csrc/knn_cuda.cuh has the kernel and its status: compiled, not yet run on a GPU).
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

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
  const int64_t slice = cuda::rows_per_launch(N, k);
  at::Tensor work;
  if (k > 1) work = at::empty({slice * cuda::row_buffer_len(k)}, z.options().dtype(at::kLong));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  TOKPOST_DISPATCH_FLOAT(z.scalar_type(), "knn_codes_cuda", [&] {
    for (int64_t row0 = 0; row0 < N; row0 += slice) {  // slices reuse one key buffer (stream-ordered)
      const int64_t rows = std::min(slice, N - row0);
      const dim3 grid(unsigned((rows + cuda::kWarps - 1) / cuda::kWarps));
      cuda::knn_exact_kernel<scalar_t, false><<<grid, cuda::kWarps * 32, 0, stream>>>(
          z.data_ptr<scalar_t>(), codebook.data_ptr<scalar_t>(), row0, rows, K, D, k, 0, 0, 0,
          k > 1 ? reinterpret_cast<uint64_t*>(work.data_ptr<int64_t>()) : nullptr, dist.data_ptr<float>(),
          idx.data_ptr<int64_t>(), nullptr, nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {dist, idx};
}

}  // namespace tokpost
