"""The analysis and the report of benchmarks/replicate_paper.py: the paper's three claims from the members' records.

analyse(study) -> {"claim1", "claim2", "claim3"} for one config's family; write_report(saved, folder) writes
folder/report.md and its plots (small PNGs) for every family in the results JSON.

Rank correlations over a handful of members are weak evidence: with n members Spearman's rho takes only a few
values and the smallest possible two-sided permutation p-value is 2 / n! (1/3 at n = 3): nothing at n <= 4 can be
"significant" at 5 %. The report gives n and the exact permutation p-value beside every coefficient.
"""

from __future__ import annotations

import itertools
import math
import statistics
from pathlib import Path
from typing import Optional

GFID_METRICS = {"vq": ("rfid", "pfid"), "continuous": ("rfid", "pfid", "ifid")}
LABELS = {"rfid": "rFID", "pfid": "pFID", "ifid": "iFID", "gfid": "gFID"}
PERMUTATION_SAMPLES = 20000


def _mean_std(values: list[float]) -> tuple[float, Optional[float]]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def member_values(record: dict, arm: str = "main") -> dict:
    """{metric: {"mean", "std", "n", "kid"}} of one member's arm (first checkpoint), iFID included when measured."""
    out = {}
    for metric, summary in record["summary"].get(arm, {}).items():
        out[metric] = {"mean": summary["fid"]["mean"], "std": summary["fid"]["std"], "n": summary["fid"]["n"],
                       "kid": summary["kid"]["mean"], "values": summary["fid"]["values"]}
    if record.get("ifid") and arm in record["ifid"]["arms"]:
        row = record["ifid"]["arms"][arm][0]
        out["ifid"] = {"mean": row["fid"], "std": None, "n": 1, "kid": row["kid"], "values": [row["fid"]]}
    return out


def rank_correlation(x: list[float], y: list[float], seed: int = 0) -> dict:
    """Spearman's rho and Kendall's tau of x vs y with two-sided permutation p-values (exact: every permutation of
    y for n <= 8; else PERMUTATION_SAMPLES random ones); None coefficients below 3 points."""
    from scipy.stats import kendalltau, spearmanr

    n = len(x)
    out = {"n": n, "spearman": None, "kendall": None, "p_spearman": None, "p_kendall": None}
    if n < 3:
        out["note"] = "fewer than 3 members: no rank correlation"
        return out
    rho, tau = float(spearmanr(x, y).statistic), float(kendalltau(x, y).statistic)
    if n <= 8:
        perms, how = itertools.permutations(y), f"exact over all {math.factorial(n)} permutations"
    else:
        import random

        rng = random.Random(seed)
        perms = (rng.sample(y, n) for _ in range(PERMUTATION_SAMPLES))
        how = f"{PERMUTATION_SAMPLES} random permutations"
    hits_rho = hits_tau = total = 0
    for perm in perms:
        total += 1
        hits_rho += abs(spearmanr(x, perm).statistic) >= abs(rho) - 1e-12
        hits_tau += abs(kendalltau(x, perm).statistic) >= abs(tau) - 1e-12
    out.update(spearman=rho, kendall=tau, p_spearman=hits_rho / total, p_kendall=hits_tau / total,
               permutation=how, smallest_possible_p=2 / math.factorial(n) if n <= 8 else None)
    return out


def claim1(members: list[dict]) -> dict:
    """gFID of every member (main arm, over the evaluation seeds) and off vs paper: difference and Welch's t-test
    on the per-seed draws (different generators: unpaired)."""
    from scipy.stats import ttest_ind

    rows = {}
    for record in members:
        v = member_values(record)
        rows[record["id"]] = {"gfid": v["gfid"]["mean"], "gfid_std": v["gfid"]["std"], "n": v["gfid"]["n"],
                              "gfid_values": v["gfid"]["values"], "gfid_kid": v["gfid"]["kid"],
                              "description": record["description"]}
    out = {"members": rows}
    if "off" in rows and "paper" in rows:
        off, paper = rows["off"]["gfid_values"], rows["paper"]["gfid_values"]
        diff = statistics.fmean(paper) - statistics.fmean(off)
        test = {"p": None, "t": None}
        if len(off) > 1 and len(paper) > 1:
            result = ttest_ind(paper, off, equal_var=False)
            test = {"t": float(result.statistic), "p": float(result.pvalue)}
        out["paper_minus_off"] = {"gfid": diff, **test,
                                  "reproduced": bool(diff < 0 and test["p"] is not None and test["p"] < 0.05),
                                  "rule": "paper - off < 0 with Welch's t-test p < 0.05 over the evaluation-seed draws "
                                          "(evaluation noise only: one training run per member unless --train-seeds)"}
    return out


def claim2(members: list[dict], kind: str) -> dict:
    """Rank agreement of each tokenizer metric with gFID over the members' main arms."""
    values = [member_values(r) for r in members]
    gfid = [v["gfid"]["mean"] for v in values]
    out = {"members": [r["id"] for r in members], "gfid": gfid, "metrics": {}}
    for metric in GFID_METRICS[kind]:
        if all(metric in v for v in values):
            x = [v[metric]["mean"] for v in values]
            out["metrics"][metric] = {"values": x, **rank_correlation(x, gfid)}
    found = out["metrics"]
    if "pfid" in found and "rfid" in found and found["pfid"]["spearman"] is not None:
        best = max(found, key=lambda m: found[m]["spearman"])
        out["best_by_spearman"] = best
        out["pfid_beats_rfid"] = found["pfid"]["spearman"] > found["rfid"]["spearman"]
    return out


def claim3(members: list[dict]) -> dict:
    """post - control (and both against main) on the members that ran post-training."""
    out = {}
    for record in members:
        if not record["post"] or not record["effects"]:
            continue
        arms = {arm: member_values(record, arm) for arm in ("main", "control", "post")}
        effect = record["effects"].get("gfid", {})
        out[record["id"]] = {"arms": {arm: {m: {"mean": v["mean"], "std": v["std"], "n": v["n"]}
                                            for m, v in vals.items()} for arm, vals in arms.items()},
                             "effects": record["effects"],
                             "gfid_post_minus_control": effect.get("fid", {}).get("mean"),
                             "beyond_noise": effect.get("fid", {}).get("verdict", {}).get("beyond_noise"),
                             "reproduced": bool(effect and effect["fid"]["mean"] < 0
                                                and effect["fid"]["verdict"]["beyond_noise"])}
    return out


def analyse(study: dict) -> dict:
    members = [r for r in study["members"]]
    return {"claim1": claim1(members), "claim2": claim2(members, study["kind"]), "claim3": claim3(members)}


# --- plots ---------------------------------------------------------------------------------------------------------
def _figure(cols: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, cols, figsize=(3.2 * cols, 2.8), dpi=80, squeeze=False)
    return plt, fig, axes[0]


def plot_scatter(study: dict, path: Path) -> None:
    c2 = study["analysis"]["claim2"]
    metrics = list(c2["metrics"])
    plt, fig, axes = _figure(max(1, len(metrics)))
    values = [member_values(r) for r in study["members"]]
    gstd = [v["gfid"]["std"] or 0.0 for v in values]
    for ax, metric in zip(axes, metrics):
        m = c2["metrics"][metric]
        ax.errorbar(m["values"], c2["gfid"], yerr=gstd, fmt="o", capsize=3)
        for x, y, ident in zip(m["values"], c2["gfid"], c2["members"]):
            ax.annotate(ident, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        rho = "n/a" if m["spearman"] is None else f"{m['spearman']:+.2f}"
        tau = "n/a" if m["kendall"] is None else f"{m['kendall']:+.2f}"
        ax.set_title(f"{LABELS[metric]} vs gFID: rho {rho}, tau {tau} (n={m['n']})", fontsize=8)
        ax.set_xlabel(LABELS[metric], fontsize=8)
        ax.set_ylabel("gFID (mean ± std, seeds)", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_gfid_members(study: dict, path: Path) -> None:
    rows = study["analysis"]["claim1"]["members"]
    plt, fig, axes = _figure(1)
    ax = axes[0]
    names = list(rows)
    ax.bar(names, [rows[n]["gfid"] for n in names], yerr=[rows[n]["gfid_std"] or 0.0 for n in names], capsize=4,
           color=["#999999" if n.startswith("off") else "#3a7" for n in names])
    ax.set_ylabel("gFID (mean ± std over seeds)", fontsize=8)
    ax.set_title(f"{study['kind']}: gFID with / without perturbation", fontsize=8)
    low = min(rows[n]["gfid"] - (rows[n]["gfid_std"] or 0) for n in names)
    ax.set_ylim(bottom=max(0.0, low * 0.95))
    ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_arms(study: dict, path: Path) -> bool:
    c3 = study["analysis"]["claim3"]
    if not c3:
        return False
    ident, found = next(iter(c3.items()))
    metrics = [m for m in ("rfid", "pfid", "gfid", "ifid") if m in found["arms"]["main"]]
    plt, fig, axes = _figure(len(metrics))
    for ax, metric in zip(axes, metrics):
        arms = ("main", "control", "post")
        means = [found["arms"][a][metric]["mean"] for a in arms]
        ax.bar(arms, means, yerr=[found["arms"][a][metric]["std"] or 0.0 for a in arms], capsize=4,
               color=["#999999", "#c84", "#37a"])
        ax.set_ylim(bottom=max(0.0, min(means) * 0.95))
        ax.set_title(f"{ident}: {LABELS[metric]}", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


# --- report --------------------------------------------------------------------------------------------------------
def _fmt(value, std=None, digits=4) -> str:
    if value is None:
        return "n/a"
    text = f"{value:.{digits}g}"
    return text + (f" ± {std:.2g}" if std is not None else "")


def _study_section(stem: str, study: dict, folder: Path) -> list[str]:
    a = study["analysis"]
    lines = [f"## {stem} ({study['kind']}: {'VQ tokenizer + AR generator' if study['kind'] == 'vq' else 'KL tokenizer + DiT'})",
             "", f"Command: `{study['command']}` (budget {study['budget']}: "
             f"{', '.join(study['budget_overrides']) or 'the config sizes'}; {study['seeds']} evaluation seeds, "
             f"{study['train_seeds']} training seed(s) per member; {study['launcher']}, {study['ranks']} rank(s)). "
             f"Stage wall time of all members: {study['wall_s_stages'] / 60:.1f} min.", ""]
    first = study["members"][0]["evaluation"]
    what = "PROXY features (a random conv net: NOT FID)" if first["proxy"] else "FID and KID"
    lines += [f"Metrics: {what} ({first['extractor']['name']}), held-out split: "
              f"{first['num']['real']} images of the {first['split'].get('val_images')}-image val split "
              f"({first['split'].get('train_images')} train images, {first['split'].get('classes')} classes); "
              f"{first['num']['generated']} generated per seed; pFID setting {first['settings']['pfid']}.", ""]
    metrics = ["rfid", "pfid"] + (["ifid"] if study["kind"] == "continuous" else []) + ["gfid"]
    lines += ["| member | setting | " + " | ".join(LABELS[m] for m in metrics) + " | gFID KID | wall min |",
              "|---|---|" + "---|" * (len(metrics) + 2)]
    for record in study["members"]:
        v = member_values(record)
        cells = [_fmt(v[m]["mean"], v[m]["std"]) if m in v else "n/a" for m in metrics]
        lines.append(f"| {record['id']} | {record['description']} | " + " | ".join(cells)
                     + f" | {_fmt(v['gfid']['kid'], digits=3)} | {record['wall_s'] / 60:.1f} |")
    c1 = a["claim1"]
    lines += ["", f"### Claim 1: perturbation in main training lowers gFID", "",
              f"![gFID per member](gfid-{stem}.png)", ""]
    if "paper_minus_off" in c1:
        d = c1["paper_minus_off"]
        lines.append(f"gFID paper - off = {d['gfid']:+.4g} (Welch t = {_fmt(d['t'], digits=3)}, p = "
                     f"{_fmt(d['p'], digits=2)}; {d['rule']}): **{'reproduced' if d['reproduced'] else 'not reproduced'}**"
                     " at this scale.")
    c2 = a["claim2"]
    lines += ["", "### Claim 2: which tokenizer metric ranks the members as gFID does", "",
              f"![metric vs gFID](scatter-{stem}.png)", "",
              "| metric | Spearman rho | p (perm.) | Kendall tau | p (perm.) | n |", "|---|---|---|---|---|---|"]
    for metric, m in c2["metrics"].items():
        lines.append(f"| {LABELS[metric]} | {_fmt(m['spearman'], digits=3)} | {_fmt(m['p_spearman'], digits=2)} | "
                     f"{_fmt(m['kendall'], digits=3)} | {_fmt(m['p_kendall'], digits=2)} | {m['n']} |")
    if "pfid_beats_rfid" in c2:
        found = c2["metrics"]
        top = max(m["spearman"] for m in found.values())
        lines += ["", f"pFID's Spearman rho with gFID ({found['pfid']['spearman']:+.2f}) is "
                  f"{'above' if c2['pfid_beats_rfid'] else 'not above'} rFID's ({found['rfid']['spearman']:+.2f}); "
                  f"the highest rho here: {', '.join(LABELS[m] for m in found if found[m]['spearman'] == top)}"
                  f"{' (a tie)' if sum(found[m]['spearman'] == top for m in found) > 1 else ''}."]
    n = len(c2["members"])
    lines += ["", f"With n = {n} members the smallest possible two-sided permutation p-value is "
              f"{2 / math.factorial(n):.2g}: these coefficients can show a direction, not a significant ranking "
              "(the predecessor paper's rho > 0.95 is over 11 tokenizers)."]
    if study["kind"] == "continuous":
        lines.append("pFID here is the perturbed-latent FID, our analogue of the paper's VQ pFID; iFID follows "
                     "arXiv 2603.05630 (tokpost_fast/metrics/ifid.py).")
    c3 = a["claim3"]
    lines += ["", "### Claim 3: post-training beats the same amount of clean decoder training", ""]
    if not c3:
        lines.append("Not run for this family (no member ran post-training: `--no-post`, or none has post=True).")
    if plot_arms(study, folder / f"arms-{stem}.png"):
        lines += [f"![main / control / post](arms-{stem}.png)", ""]
    from tokpost_fast.metrics.effects import effect_sentence

    for ident, found in c3.items():
        for metric, effect in found["effects"].items():
            lines.append(f"- {ident}: " + effect_sentence(LABELS[metric], effect))
        lines.append(f"- verdict (gFID post - control < 0 beyond the noise rule): "
                     f"**{'reproduced' if found['reproduced'] else 'not reproduced'}** at this scale "
                     "(one post-training seed: the noise is that of the evaluation seeds).")
    lines += ["", "Wall time per member and stage (s; load average mean / max):", "",
              "| member | " + " | ".join(["main", "gen", "cache", "post", "control", "evaluate", "ifid"]) + " |",
              "|---|" + "---|" * 7]
    for record in study["members"]:
        t = record["timing"]
        lines.append(f"| {record['id']} | " + " | ".join(
            f"{t[s]['seconds']:.0f} ({t[s]['load_average']}/{t[s]['load_average_max']})" if s in t else "-"
            for s in ("main", "gen", "cache", "post", "control", "evaluate", "ifid")) + " |")
    return lines


def write_report(saved: dict, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["# Replicating the paper's claims at small scale", "",
             f"Machine {saved['machine']['name']} ({saved['machine']['cpu_count']} cores, CUDA "
             f"{saved['machine']['cuda']}), {saved['date']}; versions {saved['versions']}.", "",
             "Data: the embedded set (data/embedded: crops of 8 photographs from scikit-image, one class each) unless "
             "a study names another root; every metric is measured on the held-out val split. Numbers at this "
             "scale say whether a claim shows up on a tiny CPU budget, not what it is at ImageNet scale.", ""]
    for stem, study in saved["studies"].items():
        plot_scatter(study, folder / f"scatter-{stem}.png")
        plot_gfid_members(study, folder / f"gfid-{stem}.png")
        lines += _study_section(stem, study, folder) + [""]
    path = folder / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
