"""The compiled variants of a search plan, as triton.compile needs them: what benchmarks/kernel_report.py and
tests/benchmarks compile for sm_90 / sm_80 without a GPU. The constexprs come from the plan's methods that
nearest_codes.run_search launches with (a test runs both on the same shapes and compares them).

kernel_specs(plan, k, D) -> [KernelSpec]: one per kernel the plan launches (scan, collect, re-rank direct / general).
"""

from dataclasses import dataclass, field

from tokpost_fast.kernels._rerank import RERANK_WARPS, _rerank_kernel
from tokpost_fast.kernels._scan import _collect_kernel, _scan_kernel


@dataclass
class KernelSpec:
    name: str  # "scan", "collect", "rerank_direct", "rerank"
    fn: object  # the @triton.jit function
    signature: dict  # argument name -> Triton type string ("*bf16", "i32", "constexpr", ...)
    constexprs: dict
    num_warps: int
    num_stages: int
    options: dict = field(default_factory=dict)
    # What one iteration of the hot loop covers, to turn SASS counts into per-element counts.
    elems_per_iter: int = 1
    # Trip count of a loop nested inside the hot loop (the D chunks), 0 when there is none.
    inner_trips: int = 0


def _pointer_attrs(fn, signature: dict) -> dict:
    # torch allocations are 16-byte aligned: the JIT marks such pointers divisible by 16, and so do we.
    return {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n, t in signature.items() if t.startswith("*")}


def attrs_for(spec: KernelSpec) -> dict:
    return _pointer_attrs(spec.fn, spec.signature)


def _with_constexprs(fn, types: dict, constexprs: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        sig[name] = "constexpr" if name in constexprs else types[name]
    return sig


def kernel_specs(plan, k: int, D: int) -> list:
    scan_const, collect_const = plan.search_constexprs(upcast_dot=False)
    scan_types = dict(z_ptr="*bf16", c_ptr="*bf16", err_ptr="*fp32", status_ptr="*i32", thr_ptr="*fp32",
                      buf_ptr="*i32", rank_ptr="*i32", N="i32", k="i32", num_tiles="i32", buf_stride="i32",
                      pack_rel="fp32", seed="i64", threshold="i64", position_offset="i64", topk="i32")
    collect_types = dict(z_ptr="*bf16", c_ptr="*bf16", thr_ptr="*fp32", list_ptr="*i32", n_list_ptr="*i32",
                         buf_ptr="*i32", count_ptr="*i32", num_tiles="i32")
    tile = dict(elems_per_iter=plan.block_n * plan.block_k, inner_trips=plan.layout.d_chunks)
    specs = [
        KernelSpec("scan", _scan_kernel, _with_constexprs(_scan_kernel, scan_types, scan_const), scan_const,
                   plan.num_warps, plan.num_stages, **tile),
        KernelSpec("collect", _collect_kernel, _with_constexprs(_collect_kernel, collect_types, collect_const),
                   collect_const, plan.num_warps, plan.num_stages, **tile),
    ]
    out0 = "*i64" if plan.perturb else "*fp32"
    types = dict(z_ptr="*" + plan.input_dtype, c_ptr="*" + plan.input_dtype, buf_ptr="*i32",
                 count_ptr="*i32", status_ptr="*i32", list_ptr="*i32", n_list_ptr="*i32", rank_ptr="*i32",
                 out0_ptr=out0, out1_ptr="*i64", N="i32", K="i32", k="i32", stride_zn="i32",
                 buf_stride="i32")
    for const in plan.rerank_constexprs(offsets_32=True):  # the report's shape: K * D < 2**31
        specs.append(KernelSpec("rerank_direct" if const["DIRECT"] else "rerank", _rerank_kernel,
                                _with_constexprs(_rerank_kernel, types, const), const, RERANK_WARPS, 1,
                                {"enable_fp_fusion": False}, elems_per_iter=const["BLOCK_R"] * const["WIDTH"]))
    return specs

