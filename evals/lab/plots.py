"""One PNG per synthetic experiment, drawn from its JSON result."""

from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _label(row: dict[str, Any]) -> str:
    """Bar label: the method, its K for TopK-like methods, its ablation variant."""
    label = row["method"] + (f" K={row['k']}" if row.get("k") else "")
    return label + (f": {row['variant']}" if row.get("variant") else "")


def _bars(
    ax: Any, rows: list[dict[str, Any]], keys: tuple[str, ...], ylabel: str
) -> None:
    """Grouped bars of ``keys`` per row, with ``KEY_std`` error bars when present.

    Args:
        ax: matplotlib axes.
        rows: result rows.
        keys: row fields to draw.
        ylabel: y-axis label.
    """
    width = 0.8 / len(keys)
    for i, key in enumerate(keys):
        values = [row[key] for row in rows]
        errors = [row.get(f"{key}_std", 0.0) for row in rows]
        positions = [j + i * width for j in range(len(rows))]
        ax.bar(positions, values, width, yerr=errors, label=key, capsize=3)
    ax.set_xticks([j + width * (len(keys) - 1) / 2 for j in range(len(rows))])
    ax.set_xticklabels([_label(row) for row in rows], rotation=35, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.05)
    ax.legend()


def _resonance(ax: Any, result: dict[str, Any]) -> None:
    """Heatmap of FRR@0.9 over (p / f, d), each cell annotated "FRR@0.8 / @0.9";
    the y labels give each d's chance floor (random dictionary of the same width)."""
    dims = sorted({cell["d"] for cell in result["cells"]})
    ratios = sorted({cell["p_over_f"] for cell in result["cells"]})
    cell_at = {(c["d"], c["p_over_f"]): c for c in result["cells"]}
    grid = [[cell_at[d, r]["frr@0.9"] for r in ratios] for d in dims]
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for i, d in enumerate(dims):
        for j, r in enumerate(ratios):
            cell = cell_at[d, r]
            colour = "k" if cell["frr@0.9"] > 0.6 else "w"  # readable on viridis
            ax.text(j, i, f"{cell['frr@0.8']:.2f}\n{cell['frr@0.9']:.2f}",
                    ha="center", va="center", fontsize=7, color=colour)  # fmt: skip
    ax.set_xticks(range(len(ratios)))
    ax.set_xticklabels([f"{r:g}" for r in ratios])
    ax.set_yticks(range(len(dims)))
    sqrt_n = result["sqrt_n"]
    side = {d: "<" if d < sqrt_n else ">" if d > sqrt_n else "=" for d in dims}
    chance = result.get("chance", {})
    bands = result.get("bands", {})
    ax.set_yticklabels(
        [
            f"d={d} ({side[d]} sqrt n)"
            + (f"\nchance {chance[str(d)]['frr@0.9']:.2f}" if str(d) in chance else "")
            + (
                f"\nband {bands[str(d)]['band_decades']:.1f} dec"
                if str(d) in bands
                else ""
            )
            for d in dims
        ]
    )
    ax.set_xlabel("BA target frequency p / feature frequency f")
    ax.figure.colorbar(image, ax=ax, label="FRR@0.9 (cell text: @0.8 / @0.9)")


def _longtail(ax: Any, result: dict[str, Any]) -> None:
    """Recovered fraction per frequency bucket, averaged over seeds, per method."""
    by_method: dict[str, list[list[float]]] = defaultdict(list)
    centres: dict[str, list[float]] = {}
    for row in result["rows"]:
        by_method[row["method"]].append(
            [b["recovered_fraction"] for b in row["buckets"]]
        )
        centres[row["method"]] = [(b["low"] * b["high"]) ** 0.5 for b in row["buckets"]]
    for method, runs in by_method.items():
        mean = [sum(values) / len(values) for values in zip(*runs, strict=True)]
        ax.plot(centres[method], mean, marker="o", label=method)
    ax.set_xscale("log")
    ax.set_xlabel("feature frequency (bucket centre)")
    ax.set_ylabel("FRR @ 0.9")
    ax.set_ylim(0, 1.05)
    ax.legend()


def _planted(ax: Any, result: dict[str, Any]) -> None:
    """FRR@0.9 (solid) and explained variance (dashed) over training, per run."""
    for i, row in enumerate(result["rows"]):
        colour = f"C{i}"
        label = _label(row) + f" seed {row['seed']}"
        steps = [r["step"] for r in row["trajectory"]]
        ax.plot(steps, [r["frr@0.9"] for r in row["trajectory"]], "-", color=colour,
                label=f"{label}: FRR@0.9")  # fmt: skip
        later = [r for r in row["trajectory"] if r["explained_variance"] is not None]
        ax.plot([r["step"] for r in later], [r["explained_variance"] for r in later],
                "--", color=colour, label=f"{label}: EV")  # fmt: skip
    ax.set_xlabel("training step (started on the true features)")
    ax.set_ylabel("FRR@0.9 (solid) / explained variance (dashed)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7)


def _wsae(ax: Any, result: dict[str, Any]) -> None:
    """Per kind of W_p (one row of panels each), two panels against S: ground-truth
    error on the support, polysemantic error. Rows without ``w_p_kind`` are Gaussian.
    A matched-penalty control is drawn dashed in the colour of its WSAE."""
    ax.set_axis_off()  # keeps the figure title; the panels are insets
    all_rows = result["rows"]
    kinds = list(dict.fromkeys(row.get("w_p_kind", "gaussian") for row in all_rows))
    ax.figure.set_size_inches(10, 3.6 * len(kinds) + 0.6)
    panels = (("gt_error_on_support", "ground-truth error on x's support"),
              ("polysemantic_error", "polysemantic error |x_p - x_p_hat|^2"))  # fmt: skip
    height = 1.0 / len(kinds)
    for k, kind in enumerate(kinds):
        kind_rows = [r for r in all_rows if r.get("w_p_kind", "gaussian") == kind]
        sparsities = sorted({row["sparsity"] for row in kind_rows})
        trivial = {row["sparsity"]: row["gt_error_trivial"] for row in kind_rows}
        methods = list(dict.fromkeys(row["method"] for row in kind_rows))
        bottom = 1.0 - (k + 1) * height
        for i, (key, ylabel) in enumerate(panels):
            panel = ax.inset_axes(
                (0.56 * i, bottom + 0.16 * height, 0.44, 0.74 * height)
            )
            for j, method in enumerate(methods):
                rows = sorted((r for r in kind_rows if r["method"] == method),
                              key=lambda r: r["sparsity"])  # fmt: skip
                shift = 0.06 * (j - (len(methods) - 1) / 2)  # side by side error bars
                # A matched-penalty control: its WSAE's colour, dashed, square markers.
                control = method.startswith("sae_l1_matched_alpha")
                twin = method.replace("sae_l1_matched_alpha", "wsae_alpha")
                colour = f"C{methods.index(twin if twin in methods else method)}"
                panel.errorbar([sparsities.index(r["sparsity"]) + shift for r in rows],
                               [r[key] for r in rows], [r[f"{key}_std"] for r in rows],
                               marker="s" if control else "o", capsize=3,
                               color=colour, linestyle="--" if control else "-",
                               label=method)  # fmt: skip
            if key == "gt_error_on_support":
                panel.plot(range(len(sparsities)), [trivial[s] for s in sparsities],
                           "k:", label="all latents 0")  # fmt: skip
            panel.set_xticks(range(len(sparsities)))
            panel.set_xticklabels([f"{s:g}" for s in sparsities])
            panel.set_xlabel("sparsity S (P(x_i = 0))")
            panel.set_ylabel(ylabel, fontsize=8)
            panel.set_yscale("log")
            panel.set_title(f"W_p: {kind}", fontsize=9)
            panel.legend(fontsize=7)


def plot(result: dict[str, Any], path: str | Path) -> None:
    """Draw ``result`` (any experiment's JSON dict) to ``path``.

    Args:
        result: an experiment's result.
        path: PNG path.
    """
    name = result["experiment"]
    wide = name == "ablate"
    fig, ax = plt.subplots(figsize=(15, 6.5) if wide else (9, 4.8))
    if name in ("imbalanced", "ablate"):
        _bars(ax, result["rows"], ("frr@0.8", "frr@0.9"), "feature recovery rate")
    elif name == "consistency":
        _bars(
            ax, result["rows"], ("consistency",), "fraction of top neurons, MCS > 0.9"
        )
    elif name == "resonance":
        _resonance(ax, result)
    elif name == "longtail":
        _longtail(ax, result)
    elif name == "planted":
        _planted(ax, result)
    elif name == "wsae":
        _wsae(ax, result)
    else:
        raise ValueError(f"no plot for experiment {name!r}")
    ax.set_title(f"synthetic: {name}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
