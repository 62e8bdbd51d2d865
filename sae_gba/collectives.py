"""The collectives the architectures call: no-ops in a single process.

``sae_gba.distributed`` runs data-parallel training; the SAEs only need these two
hooks, which do nothing unless a ``torch.distributed`` process group is up:
:func:`gather_rows` (GBA's first batch, the weighted SAEs' variance batches) and
:func:`synchronized_window` (GBA's bias adaptation).
"""

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

# GBA window statistics: summed over ranks, or maxed (max is idempotent).
SUMMED_WINDOW = ("window_fire_counts", "window_tokens")
MAXED_WINDOW = ("window_peak_preacts",)


def parallel() -> bool:
    """Whether a ``torch.distributed`` process group is up."""
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    """(this rank, number of ranks); (0, 1) without a process group."""
    if parallel():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of ``x`` (dim 0), in rank order: the global batch.

    Args:
        x: this rank's rows; the same shape on every rank.
    """
    if not parallel():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def reduce_window(sae: Any) -> None:
    """Sum the fire and token counts and max the peaks of GBA windows over ranks."""
    for names, op in (
        (SUMMED_WINDOW, dist.ReduceOp.SUM),
        (MAXED_WINDOW, dist.ReduceOp.MAX),
    ):
        for name in names:
            dist.all_reduce(getattr(sae, name), op=op)


def keep_counts_on_first_rank(sae: Any) -> None:
    """Ranks other than 0 zero their window counts (after :func:`reduce_window`)."""
    if dist.get_rank() != 0:
        for name in SUMMED_WINDOW:
            getattr(sae, name).zero_()


def synchronized_window(adapt: Callable[[Any], None]) -> Callable[[Any], None]:
    """Make GBA's ``adapt_biases`` judge the window of every rank together.

    Before it, fire and token counts are summed and peaks maxed over the ranks, so
    every rank applies the same update; after it, the windows still open keep the
    summed evidence on rank 0 only, so the next sum counts it once. Without a
    process group ``adapt`` runs as it is.
    """

    @functools.wraps(adapt)
    def adapt_on_every_rank(sae: Any) -> None:
        if not parallel():
            return adapt(sae)
        reduce_window(sae)
        adapt(sae)
        keep_counts_on_first_rank(sae)

    return adapt_on_every_rank
