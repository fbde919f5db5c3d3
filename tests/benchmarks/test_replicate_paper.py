"""benchmarks/replicate_paper.py end to end on a tiny two-member family (test-size pipeline config, all stages
in-process, proxy features): the results JSON holds every member's numbers, settings and timings and the three
claims' analysis; the report and its plots are written; a re-run skips the finished members; --plan checks the
paper-size config without running it. The rank-correlation helper against hand-computed values."""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import replicate_paper  # noqa: E402
import replicate_report  # noqa: E402

from tests.test_pipeline import tiny_pipeline_config  # noqa: E402


def test_rank_correlation_and_permutation_p():
    perfect = replicate_report.rank_correlation([1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0])
    assert perfect["spearman"] == pytest.approx(1.0) and perfect["kendall"] == pytest.approx(1.0)
    assert perfect["p_spearman"] == pytest.approx(2 / 24) and perfect["smallest_possible_p"] == pytest.approx(2 / 24)
    reverse = replicate_report.rank_correlation([1.0, 2.0, 3.0], [3.0, 2.0, 1.0])
    assert reverse["spearman"] == pytest.approx(-1.0) and reverse["p_kendall"] == pytest.approx(1 / 3)
    # rho = 1 - 6 * sum d^2 / (n (n^2 - 1)) with ranks (1,2,3,4,5) vs (2,1,4,3,5): d^2 sum 4 -> 0.8
    mixed = replicate_report.rank_correlation([1, 2, 3, 4, 5], [2, 1, 4, 3, 5])
    assert mixed["spearman"] == pytest.approx(0.8) and mixed["kendall"] == pytest.approx(0.6)
    assert 0.0 < mixed["p_spearman"] < 1.0
    assert replicate_report.rank_correlation([1, 2], [2, 1])["spearman"] is None


def test_plan_of_the_paper_size_config_and_bad_members(capsys):
    plan = replicate_paper.main(["--config", os.path.join(ROOT, "configs", "vq16.yaml"), "--plan"])
    assert plan["kind"] == "vq" and plan["members"] == ["off", "half", "paper"]
    out = capsys.readouterr().out
    assert "perturb.beta=0" in out and "cache -> post -> control" in out
    replicate_paper.main(["--config", os.path.join(ROOT, "configs", "demo_continuous.yaml"), "--plan", "--no-post"])
    out = capsys.readouterr().out
    assert "evaluate -> ifid" in out and "post" not in out.split("stages")[2].split(";")[0]
    with pytest.raises(SystemExit, match="unknown"):
        replicate_paper.main(["--config", os.path.join(ROOT, "configs", "demo.yaml"), "--plan", "--members", "nope"])


@pytest.mark.slow
def test_tiny_study_end_to_end_and_resume(tmp_path, capsys):
    config = tiny_pipeline_config(tmp_path)
    args = ["--config", str(config), "--launcher", "inprocess", "--extractor", "proxy", "--members", "off,paper",
            "--budget", "config", "--seeds", "2", "--runs-root", str(tmp_path / "runs"), "--out-dir",
            str(tmp_path / "out"), "--machine", "test", "--date", "2000-01-01", "--no-progress"]
    replicate_paper.main(args)
    saved = json.loads((tmp_path / "out" / "replicate-test-2000-01-01.json").read_text())
    study = saved["studies"]["tiny"]
    assert study["kind"] == "vq" and study["seeds"] == 2 and [m["id"] for m in study["members"]] == ["off", "paper"]
    off, paper = study["members"]
    assert off["perturb"]["beta"] == 0.0 and paper["perturb"]["beta"] == 0.5
    assert set(off["summary"]) == {"main"} and set(paper["summary"]) == {"main", "control", "post"}
    for record in study["members"]:
        assert record["summary"]["main"]["gfid"]["fid"]["n"] == 2 and record["evaluation"]["proxy"] is True
        assert record["evaluation"]["split"]["val_images"] == 8 and record["wall_s"] > 0
        assert {"main", "gen", "evaluate"} <= set(record["timing"])
    # the two members are different tokenizers and generators
    assert off["draws"]["main"][0]["sha256"] != paper["draws"]["main"][0]["sha256"]
    a = study["analysis"]
    assert set(a["claim1"]["members"]) == {"off", "paper"} and "paper_minus_off" in a["claim1"]
    assert a["claim2"]["metrics"]["pfid"]["n"] == 2 and a["claim2"]["metrics"]["pfid"]["spearman"] is None
    assert a["claim3"]["paper"]["effects"]["gfid"]["n"] == 2
    assert saved["versions"]["torch"] and saved["machine"]["name"] == "test"
    folder = tmp_path / "out" / "replicate-test-2000-01-01"
    for name in ("report.md", "scatter-tiny.png", "gfid-tiny.png", "arms-tiny.png"):
        assert (folder / name).stat().st_size > 1000, name
    text = (folder / "report.md").read_text()
    assert "Claim 1" in text and "Claim 3" in text and "n = 2" in text and "PROXY" in text.upper()

    capsys.readouterr()
    before = {m: (tmp_path / "runs" / "tiny" / m / "pipeline.json").read_text() for m in ("off", "paper")}
    replicate_paper.main(args)
    out = capsys.readouterr().out
    assert "[1/2] off: done, skipped" in out and "[2/2] paper: done, skipped" in out and "main ..." not in out
    assert before == {m: (tmp_path / "runs" / "tiny" / m / "pipeline.json").read_text() for m in ("off", "paper")}
    again = json.loads((tmp_path / "out" / "replicate-test-2000-01-01.json").read_text())["studies"]["tiny"]
    assert again["members"][1]["summary"] == paper["summary"]


@pytest.mark.slow
def test_tiny_continuous_family_measures_ifid(tmp_path):
    from tests.test_pipeline_continuous import tiny_continuous_config

    config = tiny_continuous_config(tmp_path)
    replicate_paper.main(["--config", str(config), "--launcher", "inprocess", "--extractor", "proxy",
                          "--members", "off,strong", "--budget", "config", "--runs-root", str(tmp_path / "runs"),
                          "--out-dir", str(tmp_path / "out"), "--machine", "test", "--date", "2000-01-01",
                          "--no-progress"])
    saved = json.loads((tmp_path / "out" / "replicate-test-2000-01-01.json").read_text())
    study = saved["studies"]["tiny_continuous"]
    assert study["kind"] == "continuous" and [m["perturb"]["noise"] for m in study["members"]] == [0.5, 1.0]
    for record in study["members"]:
        ifid = record["ifid"]
        assert ifid["settings"]["interpolation"] == "slerp" and ifid["settings"]["t"] == 0.5 and ifid["images"] == 8
        row = ifid["arms"]["main"][0]
        # iFID decodes other latents than rFID: the two numbers differ
        assert row["fid"] > 0 and row["fid"] != pytest.approx(record["summary"]["main"]["rfid"]["fid"]["mean"])
    assert set(study["analysis"]["claim2"]["metrics"]) == {"rfid", "pfid", "ifid"}
    assert study["analysis"]["claim3"] == {}
    text = (tmp_path / "out" / "replicate-test-2000-01-01" / "report.md").read_text()
    assert "iFID" in text and (tmp_path / "out" / "replicate-test-2000-01-01" / "scatter-tiny_continuous.png").is_file()
