// knn_codes on the CPU: the k nearest codes of every row of z (csrc/knn_search_cpu.cpp does the search).
#include <ATen/ops/empty.h>

#include <algorithm>

#include "common.h"
#include "knn_search_cpu.h"
#include "ops.h"

namespace tokpost {

std::tuple<at::Tensor, at::Tensor> knn_codes_cpu(const at::Tensor& z, const at::Tensor& codebook, int64_t k) {
  check_z_codebook(z, codebook, at::kCPU);
  check_k("k", k, codebook.size(0));
  const int64_t N = z.size(0);
  at::Tensor dist = at::empty({N, k}, z.options().dtype(at::kFloat));
  at::Tensor idx = at::empty({N, k}, z.options().dtype(at::kLong));
  float* dist_ptr = dist.data_ptr<float>();
  int64_t* idx_ptr = idx.data_ptr<int64_t>();
  knn_search_cpu(
      z, codebook, k, /*sorted=*/true, [k](int64_t) { return k; },
      [&](int64_t row, const float* row_dist, const int32_t* row_idx, int64_t row_k) {
        std::copy_n(row_dist, row_k, dist_ptr + row * k);
        std::copy_n(row_idx, row_k, idx_ptr + row * k);
      });
  return {dist, idx};
}

}  // namespace tokpost
