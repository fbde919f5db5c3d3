// The CPU k-nearest-codes search shared by knn_codes and perturb_codes (csrc/knn_search_cpu.cpp has the design).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/FunctionRef.h>

#include <cstdint>

namespace tokpost {

// How many nearest codes row n needs (1..k_max).
using RowK = c10::function_ref<int64_t(int64_t row)>;
// Receives row n's k nearest codes, ascending by (dist, idx); with sorted = false only [0] (the nearest) and
// [k - 1] (the k-th nearest) are set. Called once per row, concurrently for different rows.
using RowEmit = c10::function_ref<void(int64_t row, const float* dist, const int32_t* idx, int64_t k)>;

// z [N, D], codebook [K, D]: contiguous CPU tensors of one float dtype (fp32/fp16/bf16), computed in fp32.
// dist is the difference form sum_d fl(z_d - c_d)^2 in fp32 (csrc/exact_rerank_cpu.h), the k nearest by
// (dist, idx) exactly: the expanded-form search only picks the candidates. NaN distances are +inf; codes at +inf
// come after every finite one in index order, so a row with a NaN/inf entry gets codes 0..k-1 at +inf.
void knn_search_cpu(const at::Tensor& z, const at::Tensor& codebook, int64_t k_max, bool sorted, RowK row_k,
                    RowEmit emit);

}  // namespace tokpost
