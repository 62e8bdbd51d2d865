"""The closed-form SAE theory of the WSAE paper (On the Theoretical Understanding of Identifiable Sparse Autoencoders and Beyond), as runnable code.

Pure torch, float64 by default, no SAELens. Notation follows the WSAE paper ("Mathematical
Formulations"): ground-truth monosemantic features ``x`` in R^n (non-negative, each
coordinate zero with probability S), superposed polysemantic input ``x_p = W_p x`` in
R^{n_p} (n_p < n), and a tied, bias-free SAE with latents ``x_m = sigma(W_m x_p)`` in
R^{n_m} and reconstruction ``x~_p = W_m^T x_m``. Batches are rows: ``x_BN`` is
[batch, n], ``x_p_BP`` is [batch, n_p], ``w_m_MP`` is [n_m, n_p], ``w_p_PN`` is [n_p, n].

How the seed's text is read where it is ambiguous (the tests check what the seed prints):

1. Theorem 1, ``W_m* = I*(W_p, 0)^T``: the optimum is W_p^T with n_m - n zero rows
   appended (``I*`` reorders rows; seed: "~ : equivalence in sense of reordering and
   zero-padding"), so we use the identity order: :func:`closed_form_encoder`.
2. Failure Example 1 prints the superposed vector with three entries, [0.5, 0.2, 0.2],
   but its W_p is 2 x 3, so x_p = W_p x has two: (0.5, 0.2). We check those two; the
   printed third entry matches |(W_p^T x_p)_3| = 0.2 and is taken as a transcription slip.
3. Failure Example 2 prints the SAE output with two entries, [0.3, 0], but x_m has n = 3:
   the computation gives (0.3, 0, 0). We check the printed entries as a prefix.
4. Theorems 4 and 5 write the gap without an expectation on the right-hand side. With the
   decoder equal to W_p (i.e. W_m = W_p^T), ``x_p - x~_p = W_p (x - x_m)`` holds for every
   sample, so the identity holds per sample, for any activation sigma, and hence for the
   empirical mean over a batch, which is what the functions here return.
5. Theorem 5's displayed entry-wise matrix mixes indices (gamma runs over the n_p input
   dimensions, the matrix is n x n); we implement its definition
   ``W_p^T Gamma^T Gamma W_p - I`` (:func:`interference_matrix`), whose (i, j) entry is
   ``sum_k gamma_k^2 W_p[k, i] W_p[k, j] - delta_ij``.

Not claimed here: that W_p^T is an exact minimiser for every W_p and S. A quick check
(U(0, 1) magnitudes, S = 0.5) gives L_SAE = 0 at W_p^T for Example 1's digon, but for
Example 2's triangle the gradient at W_p^T is non-zero and gradient descent reaches a
about 3.5% lower loss near 1.03 W_p^T (same directions). The examples use W_p^T, as the
seed does.

The experiment's data and error measures live in :mod:`sae_gba.wsae_data` (imported
here too).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from sae_gba.wsae_data import (  # noqa: F401 (the experiment's names, defined there)
    W_P_KINDS,
    WSAEData,
    aligned_latents,
    default_n_mono,
    ground_truth_error_on_support,
    make_wsae_data,
    polysemantic_error,
    superposition_matrix,
)

Activation = Callable[[Tensor], Tensor]

# From moderate to extreme sparsity; Theorem 2 says the SAE recovers x as S -> 1.
SPARSITY_SWEEP: tuple[float, ...] = (0.5, 0.7, 0.9, 0.95, 0.99, 0.999)
_VANISH_RTOL = 1e-12  # a latent this small relative to max|x| counts as vanished


# ---------------------------------------------------------------- the model and the optimum


def closed_form_encoder(w_p_PN: Tensor, n_latents: int | None = None) -> Tensor:
    """Theorem 1's optimal tied SAE weights ``W_m* = [W_p, 0]^T`` (reading 1).

    Args:
        w_p_PN: superposition matrix W_p, [n_p, n].
        n_latents: n_m >= n; the n_m - n extra latents get zero rows. None means n.

    Returns:
        W_m*, [n_m, n_p].
    """
    n_p, n = w_p_PN.shape
    n_m = n if n_latents is None else n_latents
    if n_m < n:
        raise ValueError(f"n_latents must be >= n = {n} (Theorem 1); got {n_m}")
    return torch.cat([w_p_PN.T, w_p_PN.new_zeros(n_m - n, n_p)])


def sae_latents(
    w_m_MP: Tensor, x_p_BP: Tensor, activation: Activation = torch.relu
) -> Tensor:
    """SAE latents ``x_m = sigma(W_m x_p)``, [batch, n_m].

    Args:
        w_m_MP: tied SAE weights W_m, [n_m, n_p].
        x_p_BP: polysemantic inputs, [batch, n_p].
        activation: sigma (ReLU in the seed's examples and theorems).
    """
    return activation(x_p_BP @ w_m_MP.T)


def sae_reconstruction(
    w_m_MP: Tensor, x_p_BP: Tensor, activation: Activation = torch.relu
) -> Tensor:
    """Reconstruction ``x~_p = W_m^T sigma(W_m x_p)``, [batch, n_p] (tied decoder).

    Args:
        w_m_MP: tied SAE weights W_m, [n_m, n_p].
        x_p_BP: polysemantic inputs, [batch, n_p].
        activation: sigma.
    """
    return sae_latents(w_m_MP, x_p_BP, activation) @ w_m_MP


class ClosedFormRecovery(NamedTuple):
    """What the closed-form SAE does to one ground-truth vector (Failure Examples 1, 2)."""

    x_p: Tensor  # superposed input W_p x, [n_p]
    x_m: Tensor  # latents of the optimal SAE, sigma(W_p^T W_p x), [n]
    vanished: Tensor  # bool [n]: x_i > 0 but x_m_i = 0 (feature vanishing)


def closed_form_recovery(w_p_PN: Tensor, x_N: Tensor) -> ClosedFormRecovery:
    """Run one ground-truth vector through superposition and the optimal ReLU SAE.

    Args:
        w_p_PN: superposition matrix W_p, [n_p, n].
        x_N: one ground-truth feature vector, [n].
    """
    x_p = w_p_PN @ x_N
    x_m = sae_latents(closed_form_encoder(w_p_PN), x_p[None])[0]
    # Zero up to round-off: Example 2's second latent is 0.15 - 0.15 in exact arithmetic.
    zero = x_m <= _VANISH_RTOL * float(x_N.abs().max())
    return ClosedFormRecovery(x_p, x_m, (x_N > 0) & zero)


def shrinking_example() -> tuple[Tensor, Tensor]:
    """Seed 003, Failure Example 1 (feature shrinking): ``(W_p [2, 3], x [3])``."""
    w_p = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, -1.0]], dtype=torch.float64)
    return w_p, torch.tensor([0.5, 1.0, 0.8], dtype=torch.float64)


def vanishing_example() -> tuple[Tensor, Tensor]:
    """Seed 003, Failure Example 2 (feature vanishing): ``(W_p [2, 3], x [3])``.

    The columns of W_p are three unit vectors 120 degrees apart (a "polygon").
    """
    h = math.sqrt(3) / 2
    w_p = torch.tensor([[0.0, h, -h], [1.0, -0.5, -0.5]], dtype=torch.float64)
    return w_p, torch.tensor([0.7, 0.5, 0.3], dtype=torch.float64)


# ---------------------------------------------------------------- Theorems 4 and 5


def sae_loss(
    w_m_MP: Tensor,
    x_p_BP: Tensor,
    gamma_P: Tensor | None = None,
    activation: Activation = torch.relu,
) -> Tensor:
    """``L_SAE = E ||x_p - x~_p||^2``, or ``L_WSAE = E ||Gamma (x_p - x~_p)||^2``.

    Seed 003, "SAE reconstruction" and "Reweighted Remedy (WSAE)"; the expectation is the
    mean over the batch.

    Args:
        w_m_MP: tied SAE weights W_m, [n_m, n_p].
        x_p_BP: polysemantic inputs, [batch, n_p].
        gamma_P: the diagonal of Gamma, [n_p]; None is the unweighted L_SAE.
        activation: sigma.
    """
    residual = x_p_BP - sae_reconstruction(w_m_MP, x_p_BP, activation)
    if gamma_P is not None:
        residual = residual * gamma_P
    return residual.square().sum(dim=1).mean()


def gt_loss(
    w_m_MP: Tensor,
    w_p_PN: Tensor,
    x_BN: Tensor,
    activation: Activation = torch.relu,
) -> Tensor:
    """``L_GT = E ||x - sigma(W_m W_p x)||^2`` (the WSAE paper, "Reconstruction Gap").

    With n_m > n, x is zero-padded to n_m (the seed's "~" up to zero-padding).

    Args:
        w_m_MP: tied SAE weights W_m, [n_m, n_p] with n_m >= n, latents aligned with x.
        w_p_PN: superposition matrix W_p, [n_p, n].
        x_BN: ground-truth features, [batch, n].
        activation: sigma.
    """
    x_m = sae_latents(w_m_MP, x_BN @ w_p_PN.T, activation)
    x_padded = torch.nn.functional.pad(x_BN, (0, x_m.shape[1] - x_BN.shape[1]))
    return (x_padded - x_m).square().sum(dim=1).mean()


def interference_matrix(w_p_PN: Tensor, gamma_P: Tensor | None = None) -> Tensor:
    """``W_p^T Gamma^T Gamma W_p - I``, [n, n] (Theorem 5; Gamma = I gives Theorem 4).

    Its off-diagonal entries are the (weighted) interferences between feature directions;
    the WSAE shrinks the gap by down-weighting the rows of W_p that carry negative ones.

    Args:
        w_p_PN: superposition matrix W_p, [n_p, n].
        gamma_P: the diagonal of Gamma, [n_p]; None means Gamma = I.
    """
    weighted = w_p_PN if gamma_P is None else w_p_PN * gamma_P[:, None]
    return weighted.T @ weighted - torch.eye(w_p_PN.shape[1], dtype=w_p_PN.dtype)


def loss_gap(
    w_p_PN: Tensor,
    x_BN: Tensor,
    gamma_P: Tensor | None = None,
    activation: Activation = torch.relu,
) -> Tensor:
    """Left side of Theorems 4/5: ``L_(W)SAE(W_p^T; x_p) - L_GT(W_p^T; x)``, computed
    by running the SAE.

    Args:
        w_p_PN: superposition matrix W_p, [n_p, n].
        x_BN: ground-truth features, [batch, n].
        gamma_P: the diagonal of Gamma, [n_p]; None gives Theorem 4 (plain SAE).
        activation: sigma.
    """
    w_m = w_p_PN.T  # the theorems' assumption W_m = W_p^T
    return sae_loss(w_m, x_BN @ w_p_PN.T, gamma_P, activation) - gt_loss(
        w_m, w_p_PN, x_BN, activation
    )


def loss_gap_closed_form(
    w_p_PN: Tensor,
    x_BN: Tensor,
    gamma_P: Tensor | None = None,
    activation: Activation = torch.relu,
) -> Tensor:
    """Right side of Theorems 4/5: ``E e^T (W_p^T Gamma^T Gamma W_p - I) e`` with
    ``e = x - sigma(W_p^T W_p x)``.

    Args:
        w_p_PN: superposition matrix W_p, [n_p, n].
        x_BN: ground-truth features, [batch, n].
        gamma_P: the diagonal of Gamma, [n_p]; None gives Theorem 4.
        activation: sigma.
    """
    error_BN = x_BN - activation(x_BN @ (w_p_PN.T @ w_p_PN))  # W_p^T W_p is symmetric
    matrix = interference_matrix(w_p_PN, gamma_P)
    return ((error_BN @ matrix) * error_BN).sum(dim=1).mean()
