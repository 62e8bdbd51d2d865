"""EleutherAI's sparsify as the benchmarks' peer (the optional ``bench`` extra)."""

from typing import Any

import torch

HOW_TO_ADD_SPARSIFY = (
    "pip install 'sae-gba[bench]' (or pip install eai-sparsify) beside sae-lens, "
    "then rerun"
)


def sparsify_available() -> bool:
    """Whether EleutherAI's sparsify (the ``bench`` extra) imports."""
    try:
        import sparsify  # noqa: F401
    except ImportError:
        return False
    return True


def sparsify_step(sae: Any, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> Any:
    """One sparsify training step as its trainer runs it; returns the forward output.

    ``fvu`` backward, the gradient parallel to the decoder directions removed, the
    optimizer step, and the decoder rows put back to unit norm.
    """
    out = sae(x)
    out.fvu.backward()
    sae.remove_gradient_parallel_to_decoder_directions()
    optimizer.step()
    optimizer.zero_grad()
    sae.set_decoder_norm_to_unit_norm()
    return out
