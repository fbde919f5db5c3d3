"""The static kernel report on a reduced set: every Triton kernel the dispatcher picks compiles for sm_90 with our
Triton and with the oldest one GPU users have (3.6, installed by `make setup` into .triton36), and the main paths
(the scans and the direct re-rank) neither spill nor use a stack. No GPU needed: triton.compile runs the real
backend and the ptxas bundled in the wheel."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import floor_model  # noqa: E402
import kernel_report  # noqa: E402

OLD_TRITON = os.path.join(ROOT, ".triton36")
# k = 1 (the training path), k = 100 and the perturbation; D = 8 resident, D = 256 resident with a tail, fp32 split.
VARIANTS = [("nearest_codes", 1, "bfloat16", 8), ("nearest_codes", 1, "bfloat16", 256),
            ("nearest_codes", 100, "bfloat16", 8), ("perturb_codes", 100, "bfloat16", 8),
            ("nearest_codes", 1, "float32", 64)]
MAIN_PATHS = ("scan", "collect", "rerank_direct")


def _check(rows, toolchain_prefix):
    kernels = [r for r in rows if r["kind"] == "kernel"]
    assert kernels and all(r["toolchain"].startswith(toolchain_prefix) for r in kernels)
    failed = [(r["kernel"], r["variant"], r["error"]) for r in kernels if not r["compiled"]]
    assert not failed, failed
    for r in kernels:
        if r["kernel"].split(".")[-1] in MAIN_PATHS:
            assert r["n_spills"] == 0 and r["stack_bytes"] == 0, (r["kernel"], r["variant"], r["n_regs"])
        if r["kernel"].endswith(".scan"):
            assert r["tensor_core"] == "HGMMA", (r["variant"], r["tensor_core"])  # wgmma on sm_90
            assert r["sass_instr_per_element"] > 0
    ops = [r for r in rows if r["kind"] == "op"]
    assert len(ops) == len(VARIANTS)
    for r in ops:
        assert r["estimate_us"] >= r["floor_us"] > 0, r  # no estimate may beat its own floor


def test_compiles_with_our_triton_for_sm90():
    import triton

    _check(kernel_report.run_worker(None, [90], False, VARIANTS), f"triton {triton.__version__}")


def test_compiles_with_triton_36_for_sm90():
    if not os.path.isdir(os.path.join(OLD_TRITON, "triton")):
        pytest.fail(f"{OLD_TRITON} is missing: `make setup` installs triton 3.6.0 there")
    _check(kernel_report.run_worker(OLD_TRITON, [90], False, VARIANTS), "triton 3.6")


def test_floor_model_terms():
    # D = 256, bf16, N = 65536, K = 16384 on an H100: 2 N K 256 / 989.4 TFLOPS = 555.6 us, tensor-core bound.
    f = floor_model.floor_us(65536, 16384, 256, 1, "bfloat16", "h100-sxm")
    assert f["bound"] == "tensor_core" and abs(f["tensor_core_us"] - 555.6) < 0.1
    # One instruction per element: N K / (132 SMs * 128 lanes * 1.98 GHz) = 32.1 us.
    assert abs(floor_model.epilogue_us(65536, 16384, 1.0, "h100-sxm") - 32.1) < 0.1
    assert floor_model.floor_us(65536, 16384, 8, 100, "bfloat16", "h200")["bound"] == "epilogue"
    # fp32 searches as three bf16 terms: three times the MMA work.
    assert abs(floor_model.tensor_core_us(1, 1, 256, "float32", "h100-sxm") / floor_model.tensor_core_us(
        1, 1, 256, "bfloat16", "h100-sxm") - 3.0) < 1e-9
    with pytest.raises(ValueError, match="gpu"):
        floor_model.floor_us(1, 1, 1, 1, "bfloat16", "v100")
