"""One PNG per synthetic experiment, drawn from its JSON result."""

from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _label(row: dict[str, Any]) -> str:
    """Bar label: the method, with its K for TopK-like methods."""
    return row["method"] + (f" K={row['k']}" if row.get("k") else "")


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
    """FRR@0.8 and @0.9 against p / f, one line pair per input dimension d."""
    for d in sorted({cell["d"] for cell in result["cells"]}):
        cells = sorted(
            (c for c in result["cells"] if c["d"] == d), key=lambda c: c["p_over_f"]
        )
        ratios = [c["p_over_f"] for c in cells]
        side = "<" if d < result["sqrt_n"] else ">"
        for key, style in (("frr@0.8", "-o"), ("frr@0.9", "--s")):
            ax.plot(
                ratios,
                [c[key] for c in cells],
                style,
                label=f"d={d} ({side} sqrt n) {key}",
            )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("BA target frequency p / feature frequency f")
    ax.set_ylabel("feature recovery rate")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)


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


def plot(result: dict[str, Any], path: str | Path) -> None:
    """Draw ``result`` (any experiment's JSON dict) to ``path``.

    Args:
        result: an experiment's result.
        path: PNG path.
    """
    name = result["experiment"]
    fig, ax = plt.subplots(figsize=(9, 4.8))
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
    else:
        raise ValueError(f"no plot for experiment {name!r}")
    ax.set_title(f"synthetic: {name}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
