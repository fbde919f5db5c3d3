"""Means, spreads and the post-training effect from the draws of metrics/arms.py.

A "draw" of a metric is one value: rFID has one per checkpoint of an arm (per post-training seed); pFID and gFID
one per (checkpoint, evaluation seed). The effect of post-training is post - control (METHOD.md A5: the control arm is
the same decoder post-trained with the same recipe and steps on clean grids, sigma = 1), taken over PAIRED draws:
the same post-training seed index and the same evaluation seed, so both decoders saw the same generated samples.

Noise rule (stated in every report): with n >= 2 paired draws the effect is "beyond noise" when
|mean| > t * std / sqrt(n), t the two-sided 95 % quantile of Student's t with n - 1 degrees of freedom (a paired
t-test at 5 %: t = 12.7 at n = 2, 4.30 at n = 3, 2.78 at n = 5; a fixed 2 standard errors would call a 2-seed
difference "beyond noise" far too often, since with one degree of freedom the spread itself is barely known);
with one draw FID has no noise estimate, and KID is compared with its own subset spread, |delta KID| > 2 * sqrt(std_post^2 + std_control^2).
Paired evaluation seeds measure the noise of sampling and of the finite image sets; the noise of post-training
itself shows only with several post-training seeds (`--post-seeds`), and the report says when it was not measured.
"""

from __future__ import annotations

import math
import statistics
from typing import Optional

METRICS = ("rfid", "pfid", "gfid")


def draws(checkpoint: dict, metric: str) -> list[dict]:
    """The draws of one metric of one checkpoint record (arms.py's measure()), each {"fid", "kid", "kid_std", ...}."""
    value = checkpoint[metric]
    return [{"seed": None, **value}] if isinstance(value, dict) else list(value)


def arm_draws(records: list[dict], metric: str) -> list[tuple[int, Optional[int], dict]]:
    """[(checkpoint index, evaluation seed or None, draw)] of an arm."""
    return [(i, d.get("seed"), d) for i, record in enumerate(records) for d in draws(record, metric)]


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values), "values": values}


def summarize(arms: dict[str, list[dict]]) -> dict:
    """{arm: {metric: {"fid": spread, "kid": spread, "kid_subset_std": mean subset std}}}."""
    out = {}
    for arm, records in arms.items():
        out[arm] = {}
        for metric in METRICS:
            found = arm_draws(records, metric)
            if not found:
                continue
            out[arm][metric] = {"fid": spread([d["fid"] for _, _, d in found]),
                                "kid": spread([d["kid"] for _, _, d in found]),
                                "kid_subset_std": statistics.fmean(d["kid_std"] for _, _, d in found)}
    return out


def paired_effect(post: list[dict], control: list[dict], metric: str) -> Optional[dict]:
    """post - control over the paired draws of one metric; None when the arms share no draw."""
    a = {(i, s): d for i, s, d in arm_draws(post, metric)}
    b = {(i, s): d for i, s, d in arm_draws(control, metric)}
    keys = sorted(set(a) & set(b), key=lambda k: (k[0], -1 if k[1] is None else k[1]))
    if not keys:
        return None
    out = {"n": len(keys), "pairs": [list(k) for k in keys]}
    for what in ("fid", "kid"):
        diffs = [a[k][what] - b[k][what] for k in keys]
        out[what] = spread(diffs)
        out[what]["verdict"] = verdict(diffs, [(a[k]["kid_std"], b[k]["kid_std"]) for k in keys]
                                       if what == "kid" else None)
    return out


def student_t_975(dof: int) -> float:
    """The two-sided 95 % quantile of Student's t with `dof` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(0.975, dof))


def verdict(diffs: list[float], kid_stds: Optional[list[tuple[float, float]]] = None) -> dict:
    """Whether the mean paired difference is beyond noise (the module's rule): {"beyond_noise": bool | None,
    "threshold": float | None, "rule": str}."""
    mean = statistics.fmean(diffs)
    if len(diffs) >= 2:
        t = student_t_975(len(diffs) - 1)
        threshold = t * statistics.stdev(diffs) / math.sqrt(len(diffs))
        rule = f"|mean| > t std / sqrt(n), t = {t:.3g} (paired t-test at 5 %, n = {len(diffs)} paired draws)"
    elif kid_stds:
        post_std, control_std = kid_stds[0]
        threshold = 2 * math.sqrt(post_std ** 2 + control_std ** 2)
        rule = "|delta| > 2 sqrt(std_post^2 + std_control^2) of the KID subsets (one draw)"
    else:
        return {"beyond_noise": None, "threshold": None, "rule": "one draw: no noise estimate"}
    return {"beyond_noise": abs(mean) > threshold, "threshold": threshold, "rule": rule}


def effects(arms: dict[str, list[dict]], post: str = "post", control: str = "control") -> dict:
    """{metric: paired_effect(post, control)} for the metrics both arms have."""
    if post not in arms or control not in arms:
        return {}
    return {m: e for m in METRICS if (e := paired_effect(arms[post], arms[control], m)) is not None}


def effect_sentence(name: str, effect: dict, unit: str = "FID") -> str:
    """One line: 'gFID: post - control = -3.1 +- 1.2 (n = 3): post better, beyond noise (...)'."""
    key = "fid" if unit == "FID" else "kid"
    e = effect[key]
    std = f" +- {e['std']:.3g}" if e["std"] is not None else ""
    direction = "post better" if e["mean"] < 0 else "control better" if e["mean"] > 0 else "no difference"
    v = e["verdict"]
    if v["beyond_noise"] is None:
        judged = "no noise estimate from one draw"
    else:
        judged = (f"{'beyond' if v['beyond_noise'] else 'within'} noise (threshold {v['threshold']:.3g}: "
                  f"{v['rule']})")
    return f"{name} {unit}: post - control = {e['mean']:+.4g}{std} (n = {e['n']}): {direction}, {judged}"
