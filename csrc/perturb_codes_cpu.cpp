// perturb_codes on the CPU: the METHOD.md A2 operator fused with the nearest-code search.
// The rank of every token comes from Philox before any distance is computed, so a row with rank r only searches
// its r + 1 nearest codes (rank 0, the common case at rate < 1, is a plain argmin).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <vector>

#include "common.h"
#include "knn_search_cpu.h"
#include "ops.h"
#include "philox.h"

namespace tokpost {

std::tuple<at::Tensor, at::Tensor> perturb_codes_cpu(const at::Tensor& z, const at::Tensor& codebook, int64_t topk,
                                                     int64_t threshold, int64_t seed, int64_t position_offset) {
  check_z_codebook(z, codebook, at::kCPU);
  check_perturb_args(topk, threshold, seed, position_offset, codebook.size(0));
  const int64_t N = z.size(0);
  at::Tensor idx = at::empty({N}, z.options().dtype(at::kLong));
  at::Tensor idx_perturbed = at::empty({N}, z.options().dtype(at::kLong));
  std::vector<int32_t> ranks(N);
  at::parallel_for(0, N, 4096, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      ranks[n] = int32_t(perturb_rank(uint64_t(seed), uint64_t(position_offset + n), threshold, topk));
  });
  int64_t* idx_ptr = idx.data_ptr<int64_t>();
  int64_t* pert_ptr = idx_perturbed.data_ptr<int64_t>();
  knn_search_cpu(
      z, codebook, topk, /*sorted=*/false, [&](int64_t row) { return int64_t(ranks[row]) + 1; },
      [&](int64_t row, const float*, const int32_t* row_idx, int64_t row_k) {
        idx_ptr[row] = row_idx[0];
        pert_ptr[row] = row_idx[row_k - 1];  // row_k = rank + 1
      });
  return {idx, idx_perturbed};
}

}  // namespace tokpost
