"""``sae-gba synth wsae``: does the Weighted SAE recover the ground truth better?

Run: ``sae-gba synth wsae --out runs/synth/wsae.json`` (2 kinds of W_p x 5 sparsities x
3 seeds x 5 methods: 150 runs of one thread each, 10.1 CPU minutes; the (W_p kind,
sparsity, seed) cells are spread over ``--workers`` processes, by default one per core:
16.3 minutes wall with 2 workers on a shared 2-core machine under a load of about 5).

The setting is the WSAE paper's (the WSAE paper, "Experimental Verification"): ground-truth
features x in R^n, non-negative, each coordinate zero with probability S; superposed
inputs ``x_p = W_p x`` in R^{n_p}, n_p < n (the WSAE paper's toy model: n = 200, n_p = 20);
sparsity swept from moderate to extreme (:data:`WSAE_SPARSITIES`:
:data:`~sae_gba.wsae_theory.SPARSITY_SWEEP` without 0.95, dropped when the second kind of
W_p doubled the runs, to stay near 10 single-threaded minutes).
For every (W_p kind, S, seed) an ordinary SAE, WSAEs with alpha 0.5 and 1, and for
each alpha a matched-penalty control (below) are trained identically: same data and
batch order, same initialisation (``torch.manual_seed`` before building each SAE),
same steps, batch size and learning rate, same base
architecture. The WSAE is SAELens's ``weighted_standard`` (``sae_gba.weighted_sae``): its
weights are estimated from the per-dimension variance of the first
``weight_estimation_batches`` training batches, ``gamma_i = var_i^alpha``, normalised to
``mean(gamma^2) = 1``, which is what the weighted architectures do by default. Reported
per S, mean and std over seeds: the WSAE paper's panel (a), the ground-truth reconstruction
error on the non-zero dimensions of x, and panel (b), the polysemantic reconstruction
error (``sae_gba.wsae_theory``'s functions, on held-out samples).

Base architecture: SAELens ``standard`` (ReLU, L1 penalty). Seed 003's theorems and
its WSAE loss ``|Gamma (x_p - W_m^T ReLU(W_m x_p))|^2`` are about a ReLU SAE, and
``standard`` is SAELens's ReLU SAE (untied and with biases, unlike the theory's). The
L1 is not zero on purpose: with n = 10 n_p untied ReLU latents and no penalty, x_p can
be reconstructed exactly in many ways, so at the optimum the weighting has nothing to
trade and cannot change the solution; with an L1 term, reconstruction competes with
sparsity and Gamma moves that balance per input dimension, the mechanism the paper
claims. (Seed 002 uses TopK on language models, and K = 2 in a toy ablation; one fixed
K is a poor fit to a sweep whose mean number of active features runs from 100 to 0.2.)
The inputs are divided by one scalar per (S, seed), ``sqrt(E |x_p|^2)`` on the training
set, so the same ``l1_coefficient`` means the same trade-off at every S (the weights
are scale free); errors are reported in the units of x and x_p.
``l1_coefficient = 0.3`` was chosen before any WSAE run, in a one-seed pilot of the
plain SAE over {0, 0.03, 0.1, 0.3, 1}: the lowest mean full L_GT (on + off support,
relative to all-zero latents) over the sweep among the values whose SAE still has
active latents at every S (1.0 scored lower but has no active latent at S <= 0.7,
where the comparison would be empty; 0 gives dense latents, l0 about 150-190, the best
on-support error and the worst full L_GT).

Two kinds of W_p (``make_wsae_data``'s ``w_p_kind``), both with unit-norm columns:

- ``"gaussian"``: i.i.d. Gaussian entries. Every input dimension mixes every feature, so
  the dimensions differ in variance only through the norms of W_p's rows: the variance
  weights are fairly uniform (alpha 1: about 0.7 to 1.35) and the weighting has little
  to act on.
- ``"mixed"``: the WSAE paper's picture of monosemantic and superposed dimensions side by
  side. The first ``n_mono`` = 10 input dimensions are features 0..9 themselves; the
  other 10 are a Gaussian mix of the remaining 190 features. A polysemantic dimension
  then carries about 19 features' worth of variance and a monosemantic one a single
  feature's, so ``gamma = var^alpha`` gives the polysemantic dimensions the LARGER
  weights (``gamma_mono_mean`` / ``gamma_poly_mean`` in the rows): this kind tests the
  variance rule as seeds 002/003 state it (``Gamma = diag(variance^alpha)``), which
  here runs against their stated principle (weights near 1 for monosemantic, smaller
  for polysemantic dimensions). Its rows also split the on-support error over the
  monosemantic and the superposed features (``gt_error_on_support_mono`` / ``_poly``).

Reading the numbers: with S = 0.5 about 100 of the 200 features are active in 20
dimensions, and no method can recover them; ``gt_error_trivial`` (all latents zero) is
reported beside each row for scale. ``moderate_sparsity`` holds the verdict per kind.
The weights are normalised to ``mean(gamma^2) = 1`` over dimensions, not over signal
energy: when the variance sits in a few dimensions, as in ``"mixed"``, the weighted
reconstruction term is about r times the unweighted one (r below: 1.81 to 1.90 with
alpha 0.5 and 1.91 to 1.97 with alpha 1 over the sweep; 1.006 to 1.04 for
``"gaussian"``), which acts like an L1 coefficient divided by r. So a WSAE differs
from the plain SAE in two ways: the PATTERN of its weights across dimensions, and the
overall loss scale r. The control ``sae_l1_matched_alpha<alpha>`` separates them: the plain ``standard``
SAE, same init, same batches, with ``l1_coefficient / r_alpha``, where r_alpha is
computed before any training from the weights the WSAE of that alpha will use
(:func:`loss_scale_ratio` of :func:`estimation_variance`),

    r_alpha = sum_i gamma_i^2 var_i / sum_i var_i
            = E|Gamma (x_p - mean)|^2 / E|x_p - mean|^2,

with var the per-dimension (unbiased) variance of exactly the first
``weight_estimation_batches`` training batches (the WSAE's own estimate, not the full
training set; ``run_cell`` checks that the WSAE ended up with the same gamma). r_alpha
is the ratio of the weighted to the unweighted error of the mean reconstruction, a
first-order stand-in for the ratio at the trained SAE's residual. The control differs
from its WSAE only by the weighting pattern (and in the first
``weight_estimation_batches`` steps, which the WSAE trains unweighted with the
unmatched L1). ``loss_scale_ratio`` is recorded in the WSAE and control rows, and
``moderate_sparsity``'s ``vs_matched_control`` compares each WSAE with its control by
the same paired rule: does the weighting pattern lower the ground-truth error beyond
what the loss-scale change alone does?
"""

import contextlib
import io
from dataclasses import dataclass
from typing import Any

import torch
from sae_lens.saes.sae import TrainingSAE
from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
from torch import Tensor

from sae_gba.training import TensorDataProvider, make_trainer
from sae_gba.weighted_sae import WEIGHTED_CLASSES, input_weights, weighted_config
from sae_gba.wsae_theory import (
    WSAEData,
    aligned_latents,
    ground_truth_error_on_support,
    make_wsae_data,
    polysemantic_error,
)

SAE_METHOD = "sae"
WSAE_PREFIX = "wsae_alpha"
MATCHED_PREFIX = "sae_l1_matched_alpha"
# Keeps the SAE's initial weights off the random stream that drew W_p.
INIT_SEED_OFFSET = 1_000_003
METRICS = ("gt_error_on_support", "gt_error_off_support", "polysemantic_error", "l0")
# Only for the "mixed" W_p: the on-support error split over the n_mono monosemantic
# features and the superposed rest (they sum to gt_error_on_support).
MIXED_METRICS = ("gt_error_on_support_mono", "gt_error_on_support_poly")
# The experiment's sparsities: SPARSITY_SWEEP without 0.95, to keep two W_p kinds
# within about 10 single-threaded minutes.
WSAE_SPARSITIES: tuple[float, ...] = (0.5, 0.7, 0.9, 0.99, 0.999)


@dataclass(frozen=True)
class WSAESettings:
    """The shared setting of every run in the experiment.

    Args:
        n: ground-truth features, and the SAE width (Theorem 1 needs n_m >= n).
        n_p: polysemantic input dimension (< n).
        w_p_kinds: kinds of W_p (``make_wsae_data``'s ``w_p_kind``), each a full sweep.
        n_mono: monosemantic input dimensions of the ``"mixed"`` W_p (1 <= n_mono <
            n_p); the other n_p - n_mono dimensions superpose the other n - n_mono
            features.
        sparsities: the values of S.
        alphas: WSAE exponents (seeds 002/003: 0.5 and 1).
        l1_coefficient: ``standard``'s L1 penalty, on unit-mean-square inputs.
        steps: training steps.
        batch_size: rows per step.
        lr: Adam learning rate (SAELens's constant schedule).
        n_train: training rows per (S, seed), reshuffled every epoch.
        n_eval: held-out rows for the metrics.
        weight_estimation_batches: batches whose variance sets the WSAE weights.
        moderate_max_sparsity: S up to this value counts as moderate in the summary.
    """

    n: int = 200
    n_p: int = 20
    w_p_kinds: tuple[str, ...] = ("gaussian", "mixed")
    n_mono: int = 10
    sparsities: tuple[float, ...] = WSAE_SPARSITIES
    alphas: tuple[float, ...] = (0.5, 1.0)
    l1_coefficient: float = 0.3
    steps: int = 1200
    batch_size: int = 256
    lr: float = 1e-2
    n_train: int = 32_768
    n_eval: int = 8_192
    weight_estimation_batches: int = 10
    moderate_max_sparsity: float = 0.9


def method_name(alpha: float | None, matched: bool = False) -> str:
    """``"sae"`` for the unweighted run, ``"wsae_alpha<alpha>"`` (e.g. 0.5, 1) for a
    WSAE, ``"sae_l1_matched_alpha<alpha>"`` for its matched-penalty control."""
    if alpha is None:
        return SAE_METHOD
    return f"{MATCHED_PREFIX if matched else WSAE_PREFIX}{alpha:g}"


def estimation_variance(x_p_BP: Tensor, settings: WSAESettings, seed: int) -> Tensor:
    """Per-dimension unbiased variance of the batches the WSAE estimates its weights on.

    The first ``weight_estimation_batches`` batches of the run's data order
    (``TensorDataProvider(x_p_BP, batch_size, seed)``, as in :func:`train_sae`).

    Args:
        x_p_BP: float32 training inputs (already scaled), [n_train, n_p].
        settings: the experiment's setting.
        seed: the run's batch-order seed.
    """
    provider = TensorDataProvider(x_p_BP, settings.batch_size, seed=seed)
    rows = [next(provider) for _ in range(settings.weight_estimation_batches)]
    return torch.cat(rows).double().var(dim=0).float()


def loss_scale_ratio(variance: Tensor, alpha: float) -> float:
    """``r = sum gamma_i^2 var_i / sum var_i``, gamma the WSAE weights of ``variance``.

    The weighted over the unweighted squared error of the mean reconstruction,
    ``E|Gamma (x - mean)|^2 / E|x - mean|^2``: how much the weighting scales the
    reconstruction term, which acts like an L1 coefficient divided by r.

    Args:
        variance: (d_in,) per-dimension variances, >= 0, not all zero.
        alpha: WSAE exponent.
    """
    gamma_sq = input_weights(variance, alpha).double().square()
    variance = variance.double()
    return float((gamma_sq * variance).sum() / variance.sum())


def build_sae(
    settings: WSAESettings,
    alpha: float | None,
    seed: int,
    l1_coefficient: float | None = None,
) -> TrainingSAE:
    """The SAE of one run: ``standard``, or ``weighted_standard`` with ``alpha``.

    Every one is built right after ``torch.manual_seed(seed + INIT_SEED_OFFSET)`` from
    the same base config but for the L1 coefficient, so their initial parameters are
    equal.

    Args:
        settings: the experiment's setting.
        alpha: WSAE exponent; None for the ordinary SAE.
        seed: the run's seed.
        l1_coefficient: overrides ``settings.l1_coefficient`` (the matched controls).
    """
    if l1_coefficient is None:
        l1_coefficient = settings.l1_coefficient
    base = StandardTrainingSAEConfig(
        d_in=settings.n_p, d_sae=settings.n, l1_coefficient=l1_coefficient
    )
    torch.manual_seed(seed + INIT_SEED_OFFSET)
    if alpha is None:
        return StandardTrainingSAE(base)
    cfg = weighted_config(
        base,
        weight_alpha=alpha,
        weight_estimation_batches=settings.weight_estimation_batches,
    )
    return WEIGHTED_CLASSES["standard"][0](cfg)


def train_sae(
    x_p_BP: Tensor,
    settings: WSAESettings,
    alpha: float | None,
    seed: int,
    l1_coefficient: float | None = None,
) -> TrainingSAE:
    """Train one run quietly with SAELens's ``SAETrainer``.

    Args:
        x_p_BP: float32 training inputs (already scaled), [n_train, n_p].
        settings: the experiment's setting.
        alpha: WSAE exponent; None for the ordinary SAE.
        seed: init and batch-order seed, the same for every method.
        l1_coefficient: overrides ``settings.l1_coefficient`` (the matched controls).
    """
    sae = build_sae(settings, alpha, seed, l1_coefficient)
    provider = TensorDataProvider(x_p_BP, settings.batch_size, seed=seed)
    trainer = make_trainer(
        sae,
        provider,
        total_tokens=settings.steps * settings.batch_size,
        batch_size=settings.batch_size,
        lr=settings.lr,
    )
    with contextlib.redirect_stderr(io.StringIO()):
        trainer.fit()
    return sae


@torch.no_grad()
def evaluate(
    sae: TrainingSAE,
    x_BN: Tensor,
    x_p_BP: Tensor,
    w_p_PN: Tensor,
    scale: float = 1.0,
    n_mono: int | None = None,
) -> dict[str, float]:
    """Seed 003's two errors of a trained SAE, in the units of x and x_p.

    Args:
        sae: the trained SAE, fed ``x_p / scale``.
        x_BN: held-out ground truth, [batch, n].
        x_p_BP: its superposition ``W_p x``, [batch, n_p].
        w_p_PN: W_p, [n_p, n].
        scale: the scalar the training inputs were divided by.
        n_mono: for a ``"mixed"`` W_p, its monosemantic features 0..n_mono-1: adds
            :data:`MIXED_METRICS`.

    Returns:
        ``gt_error_on_support``; ``gt_error_off_support``, ``E sum_{i: x_i = 0}
        x_m,i^2`` (the rest of the WSAE paper's L_GT: the on-support error alone does not
        penalise latents that fire where the feature is absent);
        ``polysemantic_error``; ``l0``, the mean number of active latents; with
        ``n_mono``, ``gt_error_on_support_mono`` / ``_poly``.
    """
    x_p = x_p_BP.float()
    x = x_BN.float()
    latents_BM = sae.encode(x_p / scale)
    x_p_hat = sae.decode(latents_BM) * scale
    x_m_BN = aligned_latents(latents_BM, sae.W_dec.float(), w_p_PN.float()) * scale
    metrics = {
        "gt_error_on_support": float(ground_truth_error_on_support(x, x_m_BN)),
        "gt_error_off_support": float((x_m_BN.square() * (x == 0)).sum(1).mean()),
        "polysemantic_error": float(polysemantic_error(x_p, x_p_hat)),
        "l0": float((latents_BM > 0).float().sum(dim=1).mean()),
    }
    if n_mono is not None:
        mono, poly = slice(None, n_mono), slice(n_mono, None)
        metrics["gt_error_on_support_mono"] = float(
            ground_truth_error_on_support(x[:, mono], x_m_BN[:, mono])
        )
        metrics["gt_error_on_support_poly"] = float(
            ground_truth_error_on_support(x[:, poly], x_m_BN[:, poly])
        )
    return metrics


def run_cell(
    w_p_kind: str, sparsity: float, seed: int, settings: WSAESettings
) -> dict[str, Any]:
    """Train and evaluate every method on one (W_p kind, S, seed) draw of the data.

    Args:
        w_p_kind: ``make_wsae_data``'s ``w_p_kind``.
        sparsity: S.
        seed: data seed (W_p and samples) and SAE seed.
        settings: the experiment's setting.

    Returns:
        ``{"methods": {name: metrics}, "gt_error_trivial": float}``; WSAE metrics add
        ``gamma_min`` / ``gamma_max``, the weights that were used, and for the
        ``"mixed"`` W_p ``gamma_mono_mean`` / ``gamma_poly_mean``, their means over
        the monosemantic and the polysemantic input dimensions; WSAE and matched
        control metrics add ``loss_scale_ratio`` (r_alpha) and ``l1_coefficient``.
    """
    mixed = w_p_kind == "mixed"
    n_mono = settings.n_mono if mixed else None
    data = make_wsae_data(
        settings.n,
        settings.n_p,
        sparsity,
        settings.n_train + settings.n_eval,
        seed=seed,
        w_p_kind=w_p_kind,
        n_mono=n_mono,
    )
    train_x_p = data.x_p[: settings.n_train].float()
    held_out = WSAEData(
        data.x[settings.n_train :], data.x_p[settings.n_train :], data.w_p
    )
    scale = float(train_x_p.square().sum(dim=1).mean().sqrt())
    train_x_p = train_x_p / scale
    # Fixed before any training: the weights each WSAE will estimate, and their r.
    variance = estimation_variance(train_x_p, settings, seed)
    ratios = {alpha: loss_scale_ratio(variance, alpha) for alpha in settings.alphas}
    methods = {}
    for alpha in (None, *settings.alphas):
        sae = train_sae(train_x_p, settings, alpha, seed)
        metrics = evaluate(sae, *held_out, scale=scale, n_mono=n_mono)
        if alpha is not None:
            gamma = sae.input_weights.float()
            expected = input_weights(variance, alpha)
            if not torch.allclose(gamma, expected, rtol=1e-4, atol=1e-6):
                raise RuntimeError(
                    f"the WSAE (alpha {alpha:g}) estimated weights {gamma.tolist()}, "
                    f"not the {expected.tolist()} its matched control was set from"
                )
            metrics["loss_scale_ratio"] = ratios[alpha]
            metrics["l1_coefficient"] = settings.l1_coefficient
            metrics["gamma_min"] = float(gamma.min())
            metrics["gamma_max"] = float(gamma.max())
            if mixed:
                metrics["gamma_mono_mean"] = float(gamma[: settings.n_mono].mean())
                metrics["gamma_poly_mean"] = float(gamma[settings.n_mono :].mean())
        methods[method_name(alpha)] = metrics
    for alpha in settings.alphas:
        l1 = settings.l1_coefficient / ratios[alpha]
        sae = train_sae(train_x_p, settings, None, seed, l1_coefficient=l1)
        metrics = evaluate(sae, *held_out, scale=scale, n_mono=n_mono)
        metrics["loss_scale_ratio"] = ratios[alpha]
        metrics["l1_coefficient"] = l1
        methods[method_name(alpha, matched=True)] = metrics
    trivial = ground_truth_error_on_support(held_out.x, torch.zeros_like(held_out.x))
    return {"methods": methods, "gt_error_trivial": float(trivial)}


Cell = tuple[str, float, int]  # (W_p kind, S, seed)
