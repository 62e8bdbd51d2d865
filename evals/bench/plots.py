"""The throughput benchmark's plot: tokens/s against L0, a panel per shape."""

from pathlib import Path
from typing import Any


def shape_of(row: dict[str, Any]) -> tuple[int, int, int]:
    """A result row's (d_in, d_sae, batch)."""
    return row["d_in"], row["d_sae"], row["batch"]


def plot_throughput(result: dict[str, Any], path: Path) -> None:
    """Tokens/s against measured L0, a line per method, one panel per shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    shapes = sorted({shape_of(r) for r in rows})
    methods = list(dict.fromkeys(r["arch"] for r in rows))
    fig, axes = plt.subplots(
        1, len(shapes), figsize=(4.5 * len(shapes), 4), squeeze=False
    )
    for ax, shape in zip(axes[0], shapes, strict=True):
        for i, method in enumerate(methods):
            points = sorted(
                (r["l0"], r["tokens_per_s"])
                for r in rows
                if r["arch"] == method and shape_of(r) == shape
            )
            style = "-o" if method.endswith("gba") else "--s"
            ls, rates = zip(*points, strict=True)
            ax.plot(ls, rates, style, color=f"C{i}", label=method)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("measured L0 (active latents per token)")
        ax.set_ylabel("training tokens/s")
        ax.set_title(f"d_in={shape[0]}, d_sae={shape[1]}, batch={shape[2]}")
    axes[0][0].legend(fontsize=8)
    load = result["load_average_before"][0]
    fig.suptitle(
        f"Training-step throughput at matched L0, {result['threads']} threads, "
        f"mm peak {result['mm_peak_gflops']:.0f} GFLOP/s, load {load:.1f}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
