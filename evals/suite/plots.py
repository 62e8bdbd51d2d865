"""PNGs of the recovery suite and the scaling sweep, drawn from their JSON."""

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

BARS = (("frr@0.9", "overall"), ("frr@0.9_rare", "rarest third"))


def plot_suite(result: dict[str, Any], png: str | Path) -> None:
    """One panel per family: FRR@0.9 overall and on the rarest third per method,
    with the seeds' standard deviation as error bars.

    Args:
        result: ``suite``'s result.
        png: output path.
    """
    families = list(result["table"])
    columns = min(4, len(families))
    rows = math.ceil(len(families) / columns)
    fig, axes = plt.subplots(
        rows, columns, figsize=(4.2 * columns, 3.6 * rows), squeeze=False
    )
    for ax in axes.flat[len(families) :]:
        ax.axis("off")
    width = 0.8 / len(BARS)
    for ax, family in zip(axes.flat, families, strict=False):
        methods = result["table"][family]
        for i, (key, label) in enumerate(BARS):
            ax.bar(
                [j + i * width for j in range(len(methods))],
                [summary[key] for summary in methods.values()],
                width,
                yerr=[summary[f"{key}_std"] for summary in methods.values()],
                capsize=2,
                label=label,
            )
        ax.set_xticks([j + width / 2 for j in range(len(methods))])
        ax.set_xticklabels(list(methods), rotation=40, ha="right", fontsize=8)
        split = result["families"][family]["split"]
        ax.set_title(f"{family} ({split})", fontsize=10)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("FRR@0.9")
    axes.flat[0].legend(fontsize=8)
    seeds = result["seeds"]
    fig.suptitle(f"Feature recovery per family ({seeds} seeds, mean +- std)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def plot_scaling(result: dict[str, Any], png: str | Path) -> None:
    """FRR@0.9 (overall, rarest third) of gba_default and the better TopK against
    width (n = 256) and against n (fixed width).

    Args:
        result: ``scaling``'s result.
        png: output path.
    """
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, sweep, axis in zip(axes, ("width", "n"), ("width", "n"), strict=True):
        cells = sorted(
            (c for c in result["cells"] if c["sweep"] == sweep), key=lambda c: c[axis]
        )
        xs = [c[axis] for c in cells]
        for method, colour in (("gba_default", "C0"), ("best_topk", "C1")):
            for key, style in (("frr@0.9", "-o"), ("frr@0.9_rare", "--s")):
                ax.plot(
                    xs,
                    [c[f"{method}_{key}"] for c in cells],
                    style,
                    color=colour,
                    label=f"{method} {'overall' if key == 'frr@0.9' else 'rarest third'}",
                )
        ax.set_xscale("log", base=2)
        ax.set_xlabel(axis)
        ax.set_ylabel("FRR@0.9")
        ax.set_ylim(-0.02, 1.05)
        ax.set_title(f"longtail, against {axis}")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
