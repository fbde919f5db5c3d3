"""benchmarks/gpu_check.sh and what it runs, proven as far as a CPU allows: the script parses, its timing driver
runs end to end on tiny CPU shapes (gates, timers, ceilings, floor fractions, the JSON), and the static CUDA
kernel report reads the built extension."""

import importlib.util
import json
import os
import subprocess

import pytest
import torch

import tokpost_fast._C  # noqa: F401  (registers torch.ops.tokpost_fast.*)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_script_parses():
    subprocess.run(["bash", "-n", os.path.join(ROOT, "benchmarks", "gpu_check.sh")], check=True)


def test_driver_dry_run_gates_and_times_every_cpu_provider(tmp_path):
    driver = _load("bench_driver", "benchmarks/gpu/bench_driver.py")
    out = tmp_path / "bench.json"
    driver.main(["--device", "cpu", "--tiny", "--out", str(out), "--shapes", "128x300x8x1,128x300x8x5",
                 "--dtypes", "float32"])
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert report["ceilings"]["matmul_tflops"] > 0 and report["ceilings"]["copy_tb_s"] > 0
    timed = {(r["op"], r["provider"]) for r in rows if "median_ms" in r}
    assert {("nearest_codes", "torch"), ("nearest_codes", "cpu"), ("perturb_codes", "cpu"),
            ("codebook_lookup", "cpu"), ("codebook_lookup", "torch")} <= timed
    for r in rows:
        if "median_ms" in r:
            assert r["gate"] == "ok" and r["median_ms"] > 0 and 0 < r["fraction_of_floor"]
    skipped = {r["provider"]: r["skipped"] for r in rows if r.get("skipped")}
    assert skipped["cuda"] == "GPU only" and skipped["triton"] == "GPU only"
    assert {r["pattern"] for r in rows if r["op"] == "codebook_lookup"} == {"uniform", "collapsed"}


def test_driver_gate_rejects_a_wrong_answer():
    driver = _load("bench_driver", "benchmarks/gpu/bench_driver.py")
    gen = torch.Generator().manual_seed(0)
    z, codebook = torch.randn(50, 8, generator=gen), torch.randn(300, 8, generator=gen)
    best = torch.cdist(z, codebook).argmin(1)
    assert driver.tie_aware(z, codebook, best, 1) == "ok"
    assert driver.tie_aware(z, codebook, (best + 1) % 300, 1) != "ok"


def test_cuda_kernel_report_reads_the_built_extension():
    if not torch.ops.tokpost_fast.built_with_cuda():
        pytest.skip("the extension was built without nvcc: the report has nothing to read")
    report = _load("kernel_report_cuda", "benchmarks/kernel_report_cuda.py")
    rows = report.cuda_rows()
    kernels = [r for r in rows if r["kind"] == "kernel"]
    assert {r["arch"] for r in kernels} >= {"sm_90", "sm_80"}
    assert all(r["compiled"] and r["n_spills"] == 0 and r["stack_bytes"] == 0 for r in kernels)
    knn = [r for r in kernels if r["kernel"] == "nearest_codes.exact"]
    assert knn and all(r["c_d"] >= 3 for r in knn)  # at least the FADD, FMUL, FADD of the difference form
    ops_rows = [r for r in rows if r["kind"] == "op"]
    assert all(r["estimate_us"] > r["floor_us"] > 0 for r in ops_rows)
