"""The WSAE input weights: ``gamma = var^alpha`` from per-dimension variances, the
checks on user-given weights, and the safetensors file that holds them."""

import math
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

INPUT_WEIGHTS_FILENAME = "input_weights.safetensors"
WEIGHTS_TENSOR_NAME = "gamma"


def input_weights(variance: torch.Tensor, alpha: float) -> torch.Tensor:
    """WSAE weights ``gamma_i = var_i^alpha``, rescaled so that ``mean(gamma^2) = 1``.

    A dimension with zero variance gets weight 0 (``0^alpha``): it carries no signal and
    drops out of the reconstruction loss. The rescaling keeps the loss comparable with
    the unweighted one (isotropic inputs give weights 1).

    Args:
        variance: (d_in,) per-dimension variances, finite and >= 0, not all zero.
        alpha: exponent > 0 (the paper uses 0.5 and 1).
    """
    if variance.ndim != 1:
        raise ValueError(
            f"variance must be 1-D (d_in,), got shape {tuple(variance.shape)}"
        )
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha={alpha!r} is invalid: must be a finite number > 0")
    bad = (~torch.isfinite(variance)) | (variance < 0)
    if bool(bad.any()):
        dims = bad.nonzero().flatten()[:10].tolist()
        raise ValueError(
            f"variance must be finite and >= 0; {int(bad.sum())} dimensions are not "
            f"(first: {dims})"
        )
    gamma = variance.float().pow(alpha)
    if not bool((gamma > 0).any()):
        raise ValueError(
            f"every one of the {variance.numel()} input dimensions has zero variance: "
            "there is nothing to weight (the inputs are constant)"
        )
    gamma = gamma / gamma.max()  # before squaring: large variances cannot overflow
    return gamma / gamma.square().mean().sqrt()


def check_input_weights(
    weights: torch.Tensor, d_in: int, where: str = "input weights"
) -> torch.Tensor:
    """Return ``weights`` as float32 after checking shape ``(d_in,)``, finite, > 0.

    Args:
        weights: the user's weights.
        d_in: the SAE's input width.
        where: what the weights came from (for the message).
    """
    if not isinstance(weights, torch.Tensor):
        raise ValueError(
            f"{where} must be a torch.Tensor, got {type(weights).__name__}"
        )
    if tuple(weights.shape) != (d_in,):
        raise ValueError(
            f"{where} must have shape (d_in,) = ({d_in},), got {tuple(weights.shape)}"
        )
    weights = weights.detach().float()
    bad = ~(torch.isfinite(weights) & (weights > 0))
    if bool(bad.any()):
        dims = bad.nonzero().flatten()[:10].tolist()
        raise ValueError(
            f"{where} must be finite and > 0; {int(bad.sum())} of {d_in} entries are "
            f"not (first dims: {dims}, values: {weights[dims].tolist()})"
        )
    return weights


def load_input_weights(path: str | Path, d_in: int) -> torch.Tensor:
    """Read and check the ``"gamma"`` tensor of a safetensors file.

    Args:
        path: safetensors file with a ``"gamma"`` tensor of shape ``(d_in,)``.
        d_in: the SAE's input width.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"weights_path {str(path)!r} does not exist (expected a safetensors file "
            f"with a {WEIGHTS_TENSOR_NAME!r} tensor of shape ({d_in},))"
        )
    try:
        with safe_open(path, framework="pt") as file:
            names = list(file.keys())
            if WEIGHTS_TENSOR_NAME not in names:
                raise ValueError(
                    f"weights_path {str(path)!r} has no {WEIGHTS_TENSOR_NAME!r} tensor "
                    f"(it holds {names})"
                )
            weights = file.get_tensor(WEIGHTS_TENSOR_NAME)
    except (SafetensorError, OSError) as err:
        raise ValueError(
            f"weights_path {str(path)!r} is not a readable safetensors file: {err}"
        ) from err
    return check_input_weights(weights, d_in, f"weights_path {str(path)!r}")
