"""The generator benchmarks run end to end (--quick, tiny sizes) and write their JSON record: command, machine, and
a positive time for every variant they name."""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import gen_order_bench  # noqa: E402
import generator_bench  # noqa: E402


def test_gen_order_bench_writes_its_record(tmp_path):
    out = tmp_path / "gen-order.json"
    result = gen_order_bench.main(["--quick", "--seq-len", "16", "--vocab", "64", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["headline"] == result["headline"]
    assert "gen_order_bench" in saved["command"] and saved["machine"]["cpu_count"] == os.cpu_count()
    variants = [r["variant"] for r in saved["rows"]]
    assert len(variants) == len(set(variants)) >= 2 and any("rar" in v for v in variants)
    assert all(r["median_s"] > 0 and len(r["times_s"]) == 2 for r in saved["rows"])


def test_generator_bench_writes_its_record(tmp_path):
    out = tmp_path / "generator.json"
    generator_bench.main(["--quick", "--seq-len", "16", "--threads", "1", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert "generator_bench" in saved["command"] and saved["rows"]
    assert saved["config"]["seq_len"] == 16
