"""The comparison's report: ``compare.json``, ``compare.md`` and the matched-L0 text.

Methods are compared with TopK at matched L0: TopK's curve is interpolated linearly in
log L0 at each of the other method's held-out L0s (no extrapolation).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

from sae_gba.atomic import write_text_atomically
from sae_gba_evals.compare.config import CONVERGED_EV_CHANGE, CONVERGED_TAIL
from sae_gba_evals.compare.plots import plot_curves
from sae_gba_evals.saebench.common import saebench_version

# Row fields compared against TopK at matched L0 (absorption: lower is better).
MATCHED_METRICS = (
    "explained_variance_legacy",
    "frac_alive",
    "mean_absorption_fraction_score",
    "mean_full_absorption_score",
)
# The GBA paper's claim: legacy explained variance within 0.02 of TopK's, or better.
PAPER_EV_TOLERANCE = 0.02
EV_FOOTNOTE = (
    "`EV` is the conventional explained variance, 1 - sum |x - x_hat|^2 / "
    "sum |x - mean x|^2 over the core eval's held-out tokens (BOS/EOS/PAD left "
    "out), computed by sae-gba (`sae_gba.metrics.held_out_metrics`); `EV legacy` "
    "is SAEBench's `explained_variance_legacy`, the per-token mean of that ratio "
    "with the mean of x taken per batch of windows. SAEBench 0.6's own "
    "`explained_variance` is left out: it subtracts the squared mean of x^2 where "
    "the mean of x belongs, so it measures variance about zero (a known upstream "
    "bug, fixed in SAELens's own evals) and reads 1.000 for every SAE."
)


def interpolate_log_l0(
    points: Sequence[tuple[float, float]], l0: float
) -> float | None:
    """The value at ``l0`` on a curve of (L0, value) points, linear in log L0.

    Returns None outside the points' L0 range (no extrapolation) or without points.
    """
    points = sorted(points)
    if not points or not points[0][0] <= l0 <= points[-1][0] or l0 <= 0:
        return None
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if x0 <= l0 <= x1:
            if x1 == x0:
                return y0
            t = (math.log(l0) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + t * (y1 - y0)
    return points[0][1]  # a single point at exactly this L0


def matched_l0(
    rows: Sequence[dict[str, Any]], method: str, reference: str, metric: str
) -> dict[str, Any]:
    """``method``'s ``metric`` minus ``reference``'s, interpolated at the same L0.

    Args:
        rows: ``compare.json`` rows.
        method: the method compared, e.g. "gba".
        reference: the curve it is compared against, e.g. "topk".
        metric: a row field.

    Returns:
        The points (L0, both values, difference; None outside the reference's L0
        range), their count inside it, the mean difference and the reference range.
    """
    ref = [
        (r["l0"], r[metric])
        for r in rows
        if r["method"] == reference and r["l0"] is not None and r[metric] is not None
    ]
    points = []
    for r in sorted(rows, key=lambda r: r["l0"] or 0.0):
        if r["method"] != method or r["l0"] is None or r[metric] is None:
            continue
        at = interpolate_log_l0(ref, r["l0"])
        points.append(
            {
                "l0": r["l0"],
                method: r[metric],
                reference: at,
                "difference": None if at is None else r[metric] - at,
            }
        )
    inside = [p["difference"] for p in points if p["difference"] is not None]
    return {
        "metric": metric,
        "method": method,
        "reference": reference,
        "points": points,
        "n_inside": len(inside),
        "mean_difference": sum(inside) / len(inside) if inside else None,
        "reference_l0_range": [min(x for x, _ in ref), max(x for x, _ in ref)]
        if ref
        else None,
    }


def matched_summary(rows: Sequence[dict[str, Any]], reference: str = "topk") -> dict:
    """:func:`matched_l0` of every method but ``reference`` for :data:`MATCHED_METRICS`,
    on the seed-0 rows (the curves; further seeds are :func:`seed_spread`)."""
    rows = [r for r in rows if not r.get("seed")]
    methods = sorted({r["method"] for r in rows} - {reference})
    return {
        method: {
            metric: matched_l0(rows, method, reference, metric)
            for metric in MATCHED_METRICS
        }
        for method in methods
    }


def seed_spread(rows: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Per ``method@target`` trained with several seeds: each seed's L0, explained
    variance, alive fraction and absorption fraction."""
    keys = ("seed", "l0", "explained_variance_legacy", "frac_alive")
    keys += ("mean_absorption_fraction_score",)
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in sorted(rows, key=lambda r: r.get("seed", 0)):
        groups.setdefault(f"{r['method']}@{r['target_l0']:g}", []).append(
            {k: r.get(k) for k in keys}
        )
    return {name: seeds for name, seeds in groups.items() if len(seeds) > 1}


def gba_criteria(rows: Sequence[dict[str, Any]], summary: dict[str, Any]) -> dict:
    """The GBA paper's LM claims, checked on this run: legacy EV within
    :data:`PAPER_EV_TOLERANCE` of TopK at every matched point (or ahead), alive
    fraction >= 0.99 at every GBA point, mean absorption fraction no worse than
    TopK's (mean difference <= 0). None where not measurable."""
    if "gba" not in summary:
        return {}
    ev = [
        p["difference"] for p in summary["gba"]["explained_variance_legacy"]["points"]
    ]
    alive = [r["frac_alive"] for r in rows if r["method"] == "gba" and r["frac_alive"]]
    absorbed = summary["gba"]["mean_absorption_fraction_score"]["mean_difference"]
    inside = [d for d in ev if d is not None]
    return {
        "ev_within_tolerance_at_every_point": (
            min(inside) >= -PAPER_EV_TOLERANCE if inside else None
        ),
        "worst_ev_difference": min(inside) if inside else None,
        "alive_at_least_0.99": min(alive) >= 0.99 if alive else None,
        "min_alive": min(alive) if alive else None,
        "absorption_no_worse": None if absorbed is None else absorbed <= 0,
    }


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _diffs(result: dict[str, Any]) -> str:
    inside = [p for p in result["points"] if p["difference"] is not None]
    return ", ".join(f"{p['difference']:+.3f} at L0 {p['l0']:.0f}" for p in inside)


def gba_vs_topk_text(summary: dict[str, Any]) -> str:
    """The honest sentence on GBA against TopK at matched L0 (legacy EV, alive, absorption)."""
    if "gba" not in summary:
        return "GBA or TopK was not part of this comparison: no matched-L0 statement."
    ev = summary["gba"]["explained_variance_legacy"]
    if ev["reference_l0_range"] is None:
        return "TopK has no evaluated points: no matched-L0 statement."
    low, high = ev["reference_l0_range"]
    n_gba = len(ev["points"])
    if not ev["n_inside"]:
        return (
            f"None of GBA's {n_gba} points lies inside TopK's L0 range "
            f"({low:.0f}-{high:.0f}), so there is no matched-L0 comparison."
        )
    worst = min(p["difference"] for p in ev["points"] if p["difference"] is not None)
    holds = worst >= -PAPER_EV_TOLERANCE
    parts = [
        f"At matched L0 (TopK's curve interpolated linearly in log L0; "
        f"{ev['n_inside']} of GBA's {n_gba} points lie inside TopK's L0 range "
        f"{low:.0f}-{high:.0f}), GBA's legacy explained variance minus TopK's is "
        f"{_diffs(ev)} (mean {ev['mean_difference']:+.3f}): the paper's claim, "
        f"within {PAPER_EV_TOLERANCE} of TopK or better, "
        + ("holds at these points." if holds else "does not hold here.")
    ]
    alive = summary["gba"]["frac_alive"]
    if alive["n_inside"]:
        parts.append(
            f"Alive fraction, GBA minus TopK: {_diffs(alive)} "
            f"(mean {alive['mean_difference']:+.3f})."
        )
    absorbed = summary["gba"]["mean_absorption_fraction_score"]
    full = summary["gba"]["mean_full_absorption_score"]
    if absorbed["n_inside"]:
        parts.append(
            "Absorption (lower is better), GBA minus TopK: mean absorption fraction "
            f"{_diffs(absorbed)} (mean {absorbed['mean_difference']:+.3f}); full "
            f"absorption {_diffs(full)} (mean {full['mean_difference']:+.3f})."
        )
    else:
        parts.append("Absorption: no GBA point with a TopK absorption score to match.")
    return " ".join(parts)


_TABLE = (
    ("method", "method"),
    ("seed", "seed"),
    ("setting", "setting"),
    ("L0", "l0"),
    ("EV legacy", "explained_variance_legacy"),
    ("EV", "explained_variance"),
    ("alive", "frac_alive"),
    ("CE score", "ce_loss_score"),
    ("KL score", "kl_div_score"),
    ("absorption fraction", "mean_absorption_fraction_score"),
    ("full absorption", "mean_full_absorption_score"),
    ("train s", "train_seconds"),
    ("converged", "converged"),
)


def _setting_text(setting: dict[str, Any]) -> str:
    shown = {
        k: v
        for k, v in setting.items()
        if k in ("k", "target_l0", "high_target_freq", "l0_coefficient")
    }
    return ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()
    )


def markdown_report(result: dict[str, Any]) -> str:
    """``compare.md``: what ran, on which tokens, the table and the matched-L0 text."""
    rows = sorted(
        result["rows"],
        key=lambda r: (r["method"], r["target_l0"], r.get("seed", 0)),
    )
    first = rows[0]["tokens"] if rows else {}
    size = result["size"]
    lines = [
        f"# SAE comparison: {result['model']} `{result['hook_name']}`",
        "",
        f"Command: `{result['command']}`",
        "",
        f"- Methods: {', '.join(result['methods'])}; width {size['d_sae']:,} latents; "
        f"every SAE trained by SAELens's SAETrainer, {size['training_passes']} "
        f"pass(es) over the same {size['training_tokens']:,} harvested tokens "
        f"({result['train_data']}), batch {size['batch_tokens']}, lr {size['lr']:g}, "
        f"seed {result['seed']} (`seed` below is added to it).",
        f"- Converged (last column): the held-out legacy EV, measured "
        f"{size['ev_curve_points']} times over each run on {size['ev_curve_tokens']:,} "
        f"of the core eval's tokens, moved by less than {CONVERGED_EV_CHANGE} over the "
        f"last {CONVERGED_TAIL:.0%} of steps; "
        f"{sum(bool(r.get('converged')) for r in rows)} of {len(rows)} runs did.",
        f"- Held-out evaluation ({result['held_out_data']}): SAEBench core on "
        f"{_fmt(first.get('eval_sparsity_variance'))} tokens for L0, explained "
        f"variance and alive fraction "
        f"({_fmt(first.get('eval_sparsity_variance_without_special'))} without "
        f"BOS/EOS/PAD), {_fmt(first.get('eval_reconstruction'))} tokens for CE/KL; "
        + (
            f"first-letter absorption with {_fmt(first['absorption_words'])} "
            "vocabulary words."
            if first.get("absorption_words")
            else "no absorption eval."
        ),
        f"- Explained variance: `EV legacy` (SAEBench's, per token, the published "
        f"definition) and `EV` (conventional; see the note below the table). "
        f"Absorption: lower is better. {result['versions']}.",
        "",
        "| " + " | ".join(h for h, _ in _TABLE) + " |",
        "|" + "---|" * len(_TABLE),
    ]
    for row in rows:
        cells = []
        for _, key in _TABLE:
            value = row[key]
            if key == "setting":
                value = _setting_text(value)
            elif key == "l0":
                value = _fmt(value, 1)
            elif key == "train_seconds":
                value = _fmt(value, 0)
            cells.append(_fmt(value))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", EV_FOOTNOTE]
    lines += ["", "## GBA against TopK at matched L0", "", result["gba_vs_topk"], ""]
    criteria = result.get("gba_criteria") or {}
    if criteria:
        lines += [
            "The paper's claims on this run: "
            + "; ".join(f"{k}: {_fmt(v)}" for k, v in criteria.items()),
            "",
        ]
    for name, seeds in (result.get("seed_spread") or {}).items():
        lines.append(
            f"Seeds of {name} (L0 / EV legacy / alive / absorption fraction): "
            + "; ".join(
                f"seed {s['seed']}: {_fmt(s['l0'], 1)} / "
                f"{_fmt(s['explained_variance_legacy'])} / {_fmt(s['frac_alive'])} / "
                f"{_fmt(s['mean_absorption_fraction_score'])}"
                for s in seeds
            )
        )
    lines += [""]
    lines += _alive_by_group_lines(rows)
    lines += [
        "Every method against TopK at matched L0 (mean difference over its points "
        "inside TopK's L0 range; n = points inside):",
        "",
        "| method | n | EV legacy | alive | absorption fraction | full absorption |",
        "|---|---|---|---|---|---|",
    ]
    for method, metrics in result["matched_l0_vs_topk"].items():
        ev = metrics["explained_variance_legacy"]
        cells = [method, str(ev["n_inside"])]
        cells += [
            _fmt(metrics[m]["mean_difference"]) if metrics[m]["n_inside"] else "-"
            for m in MATCHED_METRICS
        ]
        lines.append("| " + " | ".join(cells) + " |")
    statuses = {r["absorption_status"] for r in rows if r["absorption_status"]}
    if statuses - {"evaluated"}:
        lines += [
            "",
            "Absorption not evaluated for some SAEs: "
            + "; ".join(sorted(statuses - {"evaluated"})),
        ]
    lines += ["", "![explained variance vs L0](ev_vs_l0.png)"]
    lines += ["", "![absorption vs L0](absorption_vs_l0.png)", "", "## Wall time", ""]
    lines += ["This invocation:", ""]
    lines += [
        f"- {k.removesuffix('_s')}: {v:.0f} s" for k, v in result["timings"].items()
    ]
    lines += ["", "Summed over the invocations that built this folder:", ""]
    lines += [f"- {k}: {_fmt(v, 0)} s" for k, v in result["cumulative_seconds"].items()]
    return "\n".join(lines) + "\n"


def _alive_by_group_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """GBA's alive fraction per frequency group beside what chance allows."""
    lines = []
    for row in rows:
        groups = row.get("alive_by_group")
        if not groups or row.get("seed"):
            continue
        cells = ", ".join(
            f"{g['target']:.1e}: {g['alive']:.2f} ({g['alive_if_at_target']:.2f})"
            for g in groups
        )
        lines.append(
            f"- {row['method']} at target L0 {row['target_l0']:g}, alive by group "
            f"(target: alive (expected of a latent firing at its target)): {cells}"
        )
    if lines:
        lines = [
            "Alive fraction of each GBA frequency group on the held-out tokens, "
            "beside the fraction a latent firing exactly at its group's target would "
            "show (Poisson, 1 - exp(-target x tokens)):",
            "",
            *lines,
            "",
        ]
    return lines


def _cumulative_seconds(
    rows: Sequence[dict[str, Any]], harvest_info: dict[str, Any]
) -> dict[str, float | None]:
    """Seconds of each phase summed over every run that built this folder."""

    def total(key: str) -> float:
        return sum(r["eval_seconds"].get(key) or 0.0 for r in rows)

    return {
        "harvest": harvest_info.get("first_harvest_seconds"),
        "train": sum(r["train_seconds"] for r in rows),
        "eval_core": total("core"),
        "eval_absorption": total("absorption"),
    }


def report(
    out: Path, header: dict[str, Any], rows: list[dict[str, Any]]
) -> dict[str, Any]:
    """Write ``compare.json``, ``compare.md`` and the two plots; return the JSON.

    Args:
        out: the comparison folder.
        header: what ran (command, preset, size, methods, data, timings...).
        rows: one row per SAE (:func:`result_row`).
    """
    summary = matched_summary(rows)
    result = {
        **header,
        "rows": rows,
        "matched_l0_vs_topk": summary,
        "gba_vs_topk": gba_vs_topk_text(summary),
        "gba_criteria": gba_criteria(rows, summary),
        "seed_spread": seed_spread(rows),
        "cumulative_seconds": _cumulative_seconds(rows, header["harvest"]),
        "versions": f"sae_lens=={version('sae_lens')}, {saebench_version()}",
    }
    write_text_atomically(
        out / "compare.json", json.dumps(result, indent=1, default=float)
    )
    write_text_atomically(out / "compare.md", markdown_report(result))
    size = header["size"]
    title = (
        f"{header['model']} {header['hook_name']}, {size['d_sae']:,} latents, "
        f"{size['training_tokens']:,} tokens"
    )
    plot_curves(
        rows,
        [
            ("explained_variance_legacy", "explained variance (legacy, held-out)"),
            ("ce_loss_score", "CE loss score (held-out)"),
        ],
        out / "ev_vs_l0.png",
        title,
    )
    plot_curves(
        rows,
        [
            (
                "mean_absorption_fraction_score",
                "mean absorption fraction (lower is better)",
            ),
            ("mean_full_absorption_score", "mean full absorption (lower is better)"),
        ],
        out / "absorption_vs_l0.png",
        title,
    )
    return result
