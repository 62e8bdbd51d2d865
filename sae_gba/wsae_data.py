"""The WSAE paper's experiment in code (``sae_gba.wsae_theory``'s notation): its data
(non-negative sparse features superposed by a drawn W_p), its two reconstruction
errors, and the alignment of a trained SAE's latents with the ground truth."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class WSAEData(NamedTuple):
    """Ground truth and its superposition for the WSAE experiment."""

    x: Tensor  # ground-truth features, [n_samples, n], non-negative
    x_p: Tensor  # polysemantic inputs W_p x, [n_samples, n_p]
    w_p: Tensor  # superposition matrix, [n_p, n], unit-norm columns


# The kinds of W_p that :func:`make_wsae_data` draws.
W_P_KINDS: tuple[str, ...] = ("gaussian", "mixed")


def default_n_mono(n_p: int) -> int:
    """Monosemantic input dimensions of a ``"mixed"`` W_p when none are asked for: half.

    Args:
        n_p: polysemantic dimension (>= 2 for a mix).
    """
    return n_p // 2


def superposition_matrix(
    n: int,
    n_p: int,
    kind: str = "gaussian",
    n_mono: int | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """W_p, [n_p, n], unit-norm columns, of one of the kinds in :data:`W_P_KINDS`.

    ``"gaussian"``: i.i.d. Gaussian entries, columns normalised; every input dimension
    mixes all n features (equally polysemantic on average).

    ``"mixed"``: the WSAE paper's picture of a mix of monosemantic and superposed dimensions,
    block diagonal. The first ``n_mono`` input dimensions are monosemantic: dimension i
    is exactly feature i (``W_p[i, i] = 1``, zero elsewhere in its row and column), so
    those features have no interference with any other (the WSAE paper, Theorem 5: "weights
    near 1 to monosemantic dimensions (small off-diagonal interference)"). The other
    ``n - n_mono`` features are superposed in the remaining ``n_p - n_mono`` dimensions
    only: a Gaussian block with unit-norm columns, so every one of those dimensions is a
    Gaussian mix of all of them (interferences of both signs, as in the ``"gaussian"``
    kind). ``n_p < n`` keeps at least one more feature than dimensions in that block.

    Args:
        n: number of ground-truth features.
        n_p: polysemantic dimension, < n.
        kind: ``"gaussian"`` or ``"mixed"``.
        n_mono: monosemantic dimensions of ``"mixed"``, 1 <= n_mono < n_p (None:
            :func:`default_n_mono`); must be None for ``"gaussian"``.
        generator: random generator (None: the global one).
        dtype: floating dtype.
    """
    if not 1 <= n_p < n:
        raise ValueError(f"need 1 <= n_p < n (superposition); got n={n}, n_p={n_p}")
    if kind == "gaussian":
        if n_mono is not None:
            raise ValueError(f"n_mono applies to the 'mixed' W_p only; got {n_mono}")
        w_p = torch.randn(n_p, n, generator=generator, dtype=dtype)
        return w_p / w_p.norm(dim=0, keepdim=True)
    if kind != "mixed":
        raise ValueError(f"w_p_kind={kind!r} is invalid: must be one of {W_P_KINDS}")
    n_mono = default_n_mono(n_p) if n_mono is None else n_mono
    if not 1 <= n_mono < n_p:
        raise ValueError(
            f"a 'mixed' W_p needs 1 <= n_mono < n_p = {n_p} (some monosemantic and "
            f"some polysemantic dimensions); got n_mono={n_mono}"
        )
    block = torch.randn(n_p - n_mono, n - n_mono, generator=generator, dtype=dtype)
    w_p = torch.zeros(n_p, n, dtype=dtype)
    w_p[:n_mono, :n_mono] = torch.eye(n_mono, dtype=dtype)
    w_p[n_mono:, n_mono:] = block / block.norm(dim=0, keepdim=True)
    return w_p


def make_wsae_data(
    n: int,
    n_p: int,
    sparsity: float,
    n_samples: int,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    w_p_kind: str = "gaussian",
    n_mono: int | None = None,
) -> WSAEData:
    """Sample x and ``x_p = W_p x`` under the WSAE paper's sparsity assumption.

    Each x_i is 0 with probability ``sparsity`` (S) and otherwise drawn from U(0, 1]
    (the seed fixes only positivity; uniform magnitudes follow the toy-models setting).
    W_p (:func:`superposition_matrix`) has unit-norm columns, so every feature direction
    has the same scale and ``(W_p^T W_p)_ii = 1``. ``"gaussian"`` (the default): i.i.d.
    Gaussian entries. ``"mixed"``: the first ``n_mono`` input dimensions are features
    0..n_mono-1 themselves, the others a Gaussian mix of the remaining features; there a
    polysemantic dimension sums about ``(n - n_mono) / (n_p - n_mono)`` features' worth
    of variance, a monosemantic one a single feature's.

    Args:
        n: number of ground-truth features (the WSAE paper's toy model: 200).
        n_p: polysemantic dimension, < n (the WSAE paper's toy model: 20).
        sparsity: S in [0, 1); see :data:`SPARSITY_SWEEP`.
        n_samples: batch size.
        seed: seeds a private generator, so the global RNG is untouched.
        dtype: floating dtype of the outputs.
        w_p_kind: one of :data:`W_P_KINDS`.
        n_mono: monosemantic dimensions of a ``"mixed"`` W_p (None: n_p // 2).
    """
    if not 1 <= n_p < n:
        raise ValueError(f"need 1 <= n_p < n (superposition); got n={n}, n_p={n_p}")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity S must be in [0, 1); got {sparsity}")
    gen = torch.Generator().manual_seed(seed)
    w_p = superposition_matrix(n, n_p, w_p_kind, n_mono, generator=gen, dtype=dtype)
    active = torch.rand(n_samples, n, generator=gen, dtype=dtype) >= sparsity
    # 1 - U[0, 1) lies in (0, 1], so an active coordinate is never exactly 0.
    magnitude = 1.0 - torch.rand(n_samples, n, generator=gen, dtype=dtype)
    x = magnitude * active
    return WSAEData(x, x @ w_p.T, w_p)


def ground_truth_error_on_support(x_BN: Tensor, x_m_BN: Tensor) -> Tensor:
    """Ground-truth reconstruction error on the non-zero dimensions of x.

    ``E sum_{i : x_i > 0} (x_i - x_m,i)^2``: the WSAE paper's L_GT ("Reconstruction Gap")
    restricted to the support of x, the quantity of its Experimental Verification panel
    (a), "reconstruction error on the non-sparse dimensions of the ground truth". This is
    where shrinking and vanishing show; adding the same sum over the zero dimensions gives
    L_GT back.

    Args:
        x_BN: ground-truth features, [batch, n].
        x_m_BN: latents aligned with x (see :func:`aligned_latents`), [batch, n].
    """
    return ((x_BN - x_m_BN).square() * (x_BN > 0)).sum(dim=1).mean()


def polysemantic_error(x_p_BP: Tensor, x_p_hat_BP: Tensor) -> Tensor:
    """Polysemantic reconstruction error ``E ||x_p - x~_p||^2``.

    Seed 003's L_SAE ("SAE reconstruction"; Experimental Verification panel (b)),
    deliberately unweighted so the SAE and the WSAE are compared on the same scale.

    Args:
        x_p_BP: polysemantic inputs, [batch, n_p].
        x_p_hat_BP: the SAE's reconstructions, [batch, n_p].
    """
    return (x_p_BP - x_p_hat_BP).square().sum(dim=1).mean()


def aligned_latents(latents_BM: Tensor, decoder_MP: Tensor, w_p_PN: Tensor) -> Tensor:
    """Put a trained SAE's latents in the order and units of x (the WSAE paper's "x_m ~ x").

    Ground-truth feature i is matched to the latent whose decoder row has the largest
    cosine with column i of W_p; the latent is rescaled by
    ``||decoder row|| / ||W_p[:, i]||`` so that it is the coefficient of W_p[:, i] in the
    reconstruction. Several features may match the same latent (greedy, not one-to-one).

    Args:
        latents_BM: SAE latents, [batch, n_m].
        decoder_MP: decoder rows in input space, [n_m, n_p] (W_m for a tied SAE).
        w_p_PN: superposition matrix W_p, [n_p, n].

    Returns:
        [batch, n]: column i is the matched latent for feature i.
    """
    decoder_norm_M = decoder_MP.norm(dim=1)
    column_norm_N = w_p_PN.norm(dim=0)
    cosine_MN = (decoder_MP @ w_p_PN) / (
        decoder_norm_M[:, None] * column_norm_N[None, :]
    ).clamp_min(1e-12)  # a zero (dead) decoder row has cosine 0
    match_N = cosine_MN.argmax(dim=0)
    return latents_BM[:, match_N] * (decoder_norm_M[match_N] / column_norm_N)
