"""The comparison's plots: metrics against held-out L0, a line per method."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _style(method: str) -> dict[str, Any]:
    colours = {"gba": "C3", "topk": "C0", "batchtopk": "C2", "jumprelu": "C4"}
    base = method.removeprefix("weighted_")
    return {
        "color": colours.get(base, "C7"),
        "linestyle": "--" if method.startswith("weighted_") else "-",
        "marker": "o" if base == "gba" else "s",
        "label": method,
    }


def plot_curves(
    rows: Sequence[dict[str, Any]],
    panels: Sequence[tuple[str, str]],
    path: Path,
    title: str,
) -> None:
    """One panel per (row field, axis label) against L0 (log scale), a line per method
    through its seed-0 points; further seeds are hollow markers of the same colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2))
    axes = list(axes) if len(panels) > 1 else [axes]
    for ax, (key, label) in zip(axes, panels, strict=True):
        for method in sorted({r["method"] for r in rows}):
            found = [
                r
                for r in rows
                if r["method"] == method and r["l0"] is not None and r[key] is not None
            ]
            points = sorted((r["l0"], r[key]) for r in found if not r.get("seed"))
            if points:
                ax.plot(*zip(*points, strict=True), **_style(method))
            for r in found:
                if r.get("seed"):
                    style = _style(method) | {"label": None, "markerfacecolor": "none"}
                    ax.plot([r["l0"]], [r[key]], **style)
        if ax.lines:
            ax.set_xscale("log")
            # Plain numbers at 1, 2 and 5 times powers of ten, not 2x10^1.
            ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(ticker.NullFormatter())
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no scores", ha="center", transform=ax.transAxes)
        ax.set_xlabel("L0 (held-out)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
