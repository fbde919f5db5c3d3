// tokpost_fast._C: schemas and per-dispatch-key kernels of the fused quantizer ops (docs/INTERFACES.md).
// Importing the module runs the TORCH_LIBRARY blocks below; the Python layer (tokpost_fast/ops/) calls the ops
// as torch.ops.tokpost_fast.<name>.
#include <Python.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "ops.h"

namespace tokpost {
namespace {

bool built_with_cuda() {
#ifdef TOKPOST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// Shape-only kernels, so the ops also run on meta tensors (shape propagation without data).
std::tuple<at::Tensor, at::Tensor> knn_codes_meta(const at::Tensor& z, const at::Tensor& codebook, int64_t k) {
  return {at::empty({z.size(0), k}, z.options().dtype(at::kFloat)),
          at::empty({z.size(0), k}, z.options().dtype(at::kLong))};
}
std::tuple<at::Tensor, at::Tensor> perturb_codes_meta(const at::Tensor& z, const at::Tensor&, int64_t, int64_t,
                                                      int64_t, int64_t) {
  return {at::empty({z.size(0)}, z.options().dtype(at::kLong)), at::empty({z.size(0)}, z.options().dtype(at::kLong))};
}
at::Tensor codebook_lookup_meta(const at::Tensor& idx, const at::Tensor& codebook) {
  return at::empty({idx.size(0), codebook.size(1)}, codebook.options());
}
at::Tensor codebook_lookup_backward_meta(const at::Tensor& grad_out, const at::Tensor&, int64_t num_codes) {
  return at::empty({num_codes, grad_out.size(1)}, grad_out.options());
}

}  // namespace
}  // namespace tokpost

TORCH_LIBRARY(tokpost_fast, m) {
  m.def("knn_codes(Tensor z, Tensor codebook, int k) -> (Tensor dist, Tensor idx)");
  m.def(
      "perturb_codes(Tensor z, Tensor codebook, int topk, int threshold, int seed, int position_offset) -> "
      "(Tensor idx, Tensor idx_perturbed)");
  m.def("codebook_lookup(Tensor idx, Tensor codebook) -> Tensor");
  m.def("codebook_lookup_backward(Tensor grad_out, Tensor idx, int num_codes) -> Tensor");
  m.def("built_with_cuda() -> bool", &tokpost::built_with_cuda);
}

TORCH_LIBRARY_IMPL(tokpost_fast, CPU, m) {
  m.impl("knn_codes", &tokpost::knn_codes_cpu);
  m.impl("perturb_codes", &tokpost::perturb_codes_cpu);
  m.impl("codebook_lookup", &tokpost::codebook_lookup_cpu);
  m.impl("codebook_lookup_backward", &tokpost::codebook_lookup_backward_cpu);
}

TORCH_LIBRARY_IMPL(tokpost_fast, Meta, m) {
  m.impl("knn_codes", &tokpost::knn_codes_meta);
  m.impl("perturb_codes", &tokpost::perturb_codes_meta);
  m.impl("codebook_lookup", &tokpost::codebook_lookup_meta);
  m.impl("codebook_lookup_backward", &tokpost::codebook_lookup_backward_meta);
}

#ifdef TOKPOST_WITH_CUDA
TORCH_LIBRARY_IMPL(tokpost_fast, CUDA, m) {
  m.impl("knn_codes", &tokpost::knn_codes_cuda);
  m.impl("perturb_codes", &tokpost::perturb_codes_cuda);
  m.impl("codebook_lookup", &tokpost::codebook_lookup_cuda);
  m.impl("codebook_lookup_backward", &tokpost::codebook_lookup_backward_cuda);
}
#endif

// A plain extension module with no Python functions: importing it is what registers the ops above.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "tokpost_fast fused quantizer kernels", -1, nullptr};
  return PyModule_Create(&module_def);
}
