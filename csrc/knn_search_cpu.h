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
// dist = ||z||^2 + (||c||^2 - 2 z.c), the bracket accumulated as a chain of fp32 FMAs in d order; NaN and +inf
// distances are never kept, and a row with fewer than k finite distances is completed with the lowest unused code
// indices at dist +inf (= "NaN orders as +inf", ties to the lowest index).
void knn_search_cpu(const at::Tensor& z, const at::Tensor& codebook, int64_t k_max, bool sorted, RowK row_k,
                    RowEmit emit);

}  // namespace tokpost
