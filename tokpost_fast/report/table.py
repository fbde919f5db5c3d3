"""The printed table of `python -m tokpost_fast.evaluate` (metrics.json -> text). Proxy numbers say so in the header
and in every row."""

from __future__ import annotations

ROW_NAMES = {
    "rfid": "rFID", "pfid": "pFID", "gfid": "gFID", "is": "IS", "is_std": "IS std", "prec": "precision",
    "rec": "recall", "kid": "KID",
}


SUFFIXES = (("_kid_std_seeds", " KID std per seed"), ("_kid_std_std", " KID std spread"),
            ("_kid_seeds", " KID per seed"), ("_kid_std", " KID std (subsets)"), ("_kid", " KID"),
            ("_seeds", " per seed"), ("_std", " std (seeds)"))


def _row_name(key: str, proxy: bool) -> str:
    base = key[: -len("_proxy")] if key.endswith("_proxy") else key
    suffix = ""
    for ending, words in SUFFIXES:
        if base.endswith(ending) and base[: -len(ending)] in ROW_NAMES:
            base, suffix = base[: -len(ending)], words
            break
    return ROW_NAMES.get(base, base) + suffix + (" (proxy)" if proxy else "")


def _value_text(value) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(f"{v:.4g}" for v in value)
    return f"{value:.4f}"


def pfid_label(settings: dict, proxy: bool = False) -> str:
    """The pFID row name with its settings: alpha / delta (VQ), or for a continuous tokenizer the latent noise of
    our analogue, named as such (metrics/latent_noise.py)."""
    if settings.get("kind") == "gaussian":
        return (f"perturbed-latent FID{' (proxy)' if proxy else ''} [noise={settings['noise']:g}; our analogue, "
                "not the paper's pFID]")
    return f"pFID{' (proxy)' if proxy else ''} [alpha={settings['alpha']:g}, delta={settings['delta']}]"


def format_table(result: dict) -> str:
    """metrics.json's dict -> a plain-text table (one metric per row; pFID rows carry alpha and delta, or the
    latent noise of a continuous tokenizer's analogue)."""
    proxy = result["proxy"]
    pfid = result["settings"]["pfid"]
    tok = result["checkpoints"]["tokenizer"]
    lines = [
        f"metrics{' (PROXY)' if proxy else ''}: extractor {result['extractor']['id']}"
        + (" -- offline proxy features, NOT comparable to paper FID" if proxy else ""),
        f"tokenizer {tok.get('path') or '(in memory)'} sha256 {tok['sha256'][:12]}; "
        f"N real = {result['num']['real']}, N generated = {result['num']['generated']}",
    ]
    rows = []
    for key, value in result["values"].items():
        name = pfid_label(pfid, proxy) if key.startswith("pfid") and key.removesuffix("_proxy") == "pfid" \
            else _row_name(key, proxy)
        rows.append((name, _value_text(value)))
    reasons: dict[str, list[str]] = {}
    for key, why in result.get("skipped", {}).items():
        reasons.setdefault(why, []).append(_row_name(key, False))
    for why, names in reasons.items():  # one row per reason: "gFID, IS, precision, recall (proxy)  skipped: ..."
        rows.append((", ".join(names) + (" (proxy)" if proxy else ""), f"skipped: {why}"))
    for point in result.get("pfid_curve", {}).get("points", []):
        where = (f"noise={point['noise']:g}" if "noise" in point else
                 f"alpha={point['alpha']:g}, delta={point['delta']}")
        rows.append((f"{'perturbed-latent FID' if 'noise' in point else 'pFID'} curve{' (proxy)' if proxy else ''} "
                     f"[{where}]", f"{point['pfid']:.4f}"))
    width = max([len(name) for name, _ in rows] + [len("metric" + (" (proxy)" if proxy else ""))])
    lines.append(f"{'metric' + (' (proxy)' if proxy else ''):<{width}}  value")
    lines += [f"{name:<{width}}  {text}" for name, text in rows]
    return "\n".join(lines)
