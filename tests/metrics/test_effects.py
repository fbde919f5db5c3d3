"""metrics/effects.py: arm summaries, the paired post - control effect and its noise rule."""

import math

import pytest

from tokpost_fast.metrics.effects import effect_sentence, effects, summarize, verdict


def record(rfid, pfids, gfids, kid_std=0.01):
    draw = lambda seed, fid: {"seed": seed, "fid": fid, "kid": fid / 100, "kid_std": kid_std}   # noqa: E731
    return {"rfid": {"fid": rfid, "kid": rfid / 100, "kid_std": kid_std},
            "pfid": [draw(s, v) for s, v in enumerate(pfids)], "gfid": [draw(s, v) for s, v in enumerate(gfids)]}


def test_summary_means_and_spreads_over_draws():
    arms = {"post": [record(10.0, [20.0, 22.0], [30.0, 34.0]), record(12.0, [21.0, 23.0], [31.0, 35.0])]}
    s = summarize(arms)["post"]
    assert s["rfid"]["fid"]["mean"] == 11.0 and s["rfid"]["fid"]["n"] == 2
    assert s["gfid"]["fid"]["mean"] == 32.5 and s["gfid"]["fid"]["n"] == 4
    assert s["gfid"]["fid"]["std"] == pytest.approx(math.sqrt(((2.5 ** 2) * 2 + (1.5 ** 2) * 2) / 3))
    assert s["pfid"]["kid_subset_std"] == 0.01


def test_paired_effect_is_beyond_noise_only_when_consistent():
    control = [record(10.0, [20.0, 22.0, 21.0], [30.0, 34.0, 32.0])]
    consistent = [record(9.0, [19.0, 21.0, 20.0], [28.0, 32.1, 29.9])]     # -2 +- 0.1 on every seed
    e = effects({"post": consistent, "control": control})["gfid"]
    assert e["n"] == 3 and e["fid"]["mean"] == pytest.approx(-2.0)
    assert e["fid"]["verdict"]["beyond_noise"] is True
    noisy = [record(9.0, [19.0, 21.0, 20.0], [25.0, 37.0, 28.0])]          # -5, +3, -4: mean -2, std 4.4
    assert effects({"post": noisy, "control": control})["gfid"]["fid"]["verdict"]["beyond_noise"] is False
    # pairs follow the seeds: the same draws in another order give the same effect
    shuffled = [dict(consistent[0], gfid=list(reversed(consistent[0]["gfid"])))]
    assert effects({"post": shuffled, "control": control})["gfid"]["fid"]["mean"] == pytest.approx(-2.0)


def test_one_draw_has_no_fid_noise_estimate_but_kid_has_its_subsets():
    e = effects({"post": [record(9.0, [20.0], [30.0], kid_std=0.001)],
                 "control": [record(10.0, [20.0], [30.0], kid_std=0.001)]})["rfid"]
    assert e["n"] == 1 and e["fid"]["verdict"]["beyond_noise"] is None
    assert e["kid"]["verdict"]["beyond_noise"] is True            # |0.01| > 2 sqrt(2) 0.001
    assert "no noise estimate" in effect_sentence("rFID", e) and "post better" in effect_sentence("rFID", e)
    assert verdict([1.0])["rule"] == "one draw: no noise estimate"


def test_missing_arm_gives_no_effect():
    assert effects({"post": [record(1.0, [1.0], [1.0])]}) == {}


def test_noise_threshold_is_a_paired_t_test_at_five_percent():
    # two draws, std of the differences 1: t(1) = 12.71, so the threshold is 12.71 / sqrt(2) = 8.99
    diffs = [-5.0 - 1 / math.sqrt(2), -5.0 + 1 / math.sqrt(2)]
    v = verdict(diffs)
    assert v["threshold"] == pytest.approx(12.706 / math.sqrt(2), rel=1e-3)
    assert v["beyond_noise"] is False            # -5 +- 1 over 2 draws: 2 standard errors (1.41) would say beyond
    five = [-5.0, -4.0, -6.0, -5.5, -4.5]      # n = 5: t(4) = 2.776, std 0.79
    assert verdict(five)["threshold"] == pytest.approx(2.776 * 0.7906 / math.sqrt(5), rel=1e-3)
    assert verdict(five)["beyond_noise"] is True
