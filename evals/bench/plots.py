"""The throughput benchmark's plot: tokens/s per architecture, a panel per shape."""

from pathlib import Path
from typing import Any


def shape_of(row: dict[str, Any]) -> tuple[int, int, int]:
    """A result row's (d_in, d_sae, batch)."""
    return row["d_in"], row["d_sae"], row["batch"]


def plot_throughput(result: dict[str, Any], path: Path) -> None:
    """Bars of tokens/s per architecture, one panel per shape, peak fraction on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    all_rows = result["rows"] + result["gba_init_rows"]
    shapes = sorted({shape_of(r) for r in all_rows})
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4.5))
    for ax, shape in zip(
        list(axes) if len(shapes) > 1 else [axes], shapes, strict=True
    ):
        rows = [r for r in all_rows if shape_of(r) == shape]
        labels = [
            r["arch"] + (f"\n({r['gate_state']})" if r.get("gate_state") else "")
            for r in rows
        ]
        colors = ["C1" if r["arch"].endswith("gba") else "C0" for r in rows]
        bars = ax.bar(range(len(rows)), [r["tokens_per_s"] for r in rows], color=colors)
        ax.bar_label(bars, [f"{r['peak_fraction']:.2f}" for r in rows], fontsize=8)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=8)
        ax.set_title(f"d_in={shape[0]}, d_sae={shape[1]}, batch={shape[2]}")
        ax.set_ylabel("training tokens/s (bar label: fraction of mm peak)")
    fig.suptitle(
        f"Training-step throughput, {result['threads']} threads, "
        f"mm peak {result['mm_peak_gflops']:.0f} GFLOP/s"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
