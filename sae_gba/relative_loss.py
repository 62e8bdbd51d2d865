"""Per-token loss weights that stop a few large tokens from dominating the loss."""

import torch


def relative_token_weights(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``min(1, reference / |x_t|^2)`` for each token ``x_t`` (last dimension).

    A token whose squared norm is above ``reference`` (the data's mean square) counts
    by its error relative to its size; smaller tokens keep weight 1, so no token is
    ever weighted up and a zero token is harmless.

    Args:
        x: (..., d) tokens.
        reference: scalar mean squared norm, > 0.

    Returns:
        (..., 1) weights in ``(0, 1]``, in ``x``'s dtype, without gradient.
    """
    with torch.no_grad():
        dtype = torch.promote_types(x.dtype, torch.float32)  # no bfloat16 sums
        reference = reference.to(dtype)
        square = x.to(dtype).square().sum(dim=-1, keepdim=True)
        return (reference / square.clamp(min=reference)).to(x.dtype)
