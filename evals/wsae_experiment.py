"""``sae-gba synth wsae``: does the Weighted SAE recover the ground truth better?

Run: ``sae-gba synth wsae --out runs/synth/wsae.json`` (3 seeds: 54 runs, 3.4 CPU
minutes on one thread, 6.6 minutes wall on a shared 2-core machine; ``--workers N``
spreads the (sparsity, seed) cells over N processes).

The setting is seed 003's (the WSAE paper, "Experimental Verification"): ground-truth
features x in R^n, non-negative, each coordinate zero with probability S; superposed
inputs ``x_p = W_p x`` in R^{n_p}, n_p < n (seed 002's toy model: n = 200, n_p = 20);
sparsity swept from moderate to extreme (:data:`~sae_gba.wsae_theory.SPARSITY_SWEEP`).
For every (S, seed) an ordinary SAE and WSAEs with alpha 0.5 and 1 are trained
identically: same data and batch order, same initialisation (``torch.manual_seed``
before building each SAE), same steps, batch size and learning rate, same base
architecture. The WSAE is SAELens's ``weighted_standard`` (``sae_gba.weighted``): its
weights are estimated from the per-dimension variance of the first
``weight_estimation_batches`` training batches, ``gamma_i = var_i^alpha``, normalised to
``mean(gamma^2) = 1``, which is what the weighted architectures do by default. Reported
per S, mean and std over seeds: seed 003's panel (a), the ground-truth reconstruction
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

Reading the numbers: with S = 0.5 about 100 of the 200 features are active in 20
dimensions, and no method can recover them; ``gt_error_trivial`` (all latents zero) is
reported beside each row for scale. In ``make_wsae_data`` W_p is Gaussian with
unit-norm columns, so the input dimensions differ in variance only through the norms of
W_p's rows: the variance weights are fairly uniform here (alpha 1: about 0.7 to 1.35),
and ``gamma_min`` / ``gamma_max`` say how uniform.
"""

import contextlib
import io
import math
import multiprocessing
import statistics
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import torch
from sae_lens.saes.sae import TrainingSAE
from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
from torch import Tensor

from sae_gba.training import TensorDataProvider, make_trainer
from sae_gba.weighted import WEIGHTED_CLASSES, weighted_config
from sae_gba.wsae_theory import (
    SPARSITY_SWEEP,
    WSAEData,
    aligned_latents,
    ground_truth_error_on_support,
    make_wsae_data,
    polysemantic_error,
)

SAE_METHOD = "sae"
# Keeps the SAE's initial weights off the random stream that drew W_p.
INIT_SEED_OFFSET = 1_000_003
METRICS = ("gt_error_on_support", "gt_error_off_support", "polysemantic_error", "l0")


@dataclass(frozen=True)
class WSAESettings:
    """The shared setting of every run in the experiment.

    Args:
        n: ground-truth features, and the SAE width (Theorem 1 needs n_m >= n).
        n_p: polysemantic input dimension (< n).
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
    sparsities: tuple[float, ...] = SPARSITY_SWEEP
    alphas: tuple[float, ...] = (0.5, 1.0)
    l1_coefficient: float = 0.3
    steps: int = 1200
    batch_size: int = 256
    lr: float = 1e-2
    n_train: int = 32_768
    n_eval: int = 8_192
    weight_estimation_batches: int = 10
    moderate_max_sparsity: float = 0.9


def method_name(alpha: float | None) -> str:
    """``"sae"`` for the unweighted run, ``"wsae_alpha<alpha>"`` (e.g. 0.5, 1) else."""
    return SAE_METHOD if alpha is None else f"wsae_alpha{alpha:g}"


def build_sae(settings: WSAESettings, alpha: float | None, seed: int) -> TrainingSAE:
    """The SAE of one run: ``standard``, or ``weighted_standard`` with ``alpha``.

    Both are built right after ``torch.manual_seed(seed + INIT_SEED_OFFSET)`` from the
    same base config, so their initial parameters are equal.

    Args:
        settings: the experiment's setting.
        alpha: WSAE exponent; None for the ordinary SAE.
        seed: the run's seed.
    """
    base = StandardTrainingSAEConfig(
        d_in=settings.n_p, d_sae=settings.n, l1_coefficient=settings.l1_coefficient
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
    x_p_BP: Tensor, settings: WSAESettings, alpha: float | None, seed: int
) -> TrainingSAE:
    """Train one run quietly with SAELens's ``SAETrainer``.

    Args:
        x_p_BP: float32 training inputs (already scaled), [n_train, n_p].
        settings: the experiment's setting.
        alpha: WSAE exponent; None for the ordinary SAE.
        seed: init and batch-order seed, the same for every method.
    """
    sae = build_sae(settings, alpha, seed)
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
    sae: TrainingSAE, x_BN: Tensor, x_p_BP: Tensor, w_p_PN: Tensor, scale: float = 1.0
) -> dict[str, float]:
    """Seed 003's two errors of a trained SAE, in the units of x and x_p.

    Args:
        sae: the trained SAE, fed ``x_p / scale``.
        x_BN: held-out ground truth, [batch, n].
        x_p_BP: its superposition ``W_p x``, [batch, n_p].
        w_p_PN: W_p, [n_p, n].
        scale: the scalar the training inputs were divided by.

    Returns:
        ``gt_error_on_support``; ``gt_error_off_support``, ``E sum_{i: x_i = 0}
        x_m,i^2`` (the rest of seed 003's L_GT: the on-support error alone does not
        penalise latents that fire where the feature is absent);
        ``polysemantic_error``; ``l0``, the mean number of active latents.
    """
    x_p = x_p_BP.float()
    latents_BM = sae.encode(x_p / scale)
    x_p_hat = sae.decode(latents_BM) * scale
    x_m_BN = aligned_latents(latents_BM, sae.W_dec.float(), w_p_PN.float()) * scale
    return {
        "gt_error_on_support": float(
            ground_truth_error_on_support(x_BN.float(), x_m_BN)
        ),
        "gt_error_off_support": float((x_m_BN.square() * (x_BN == 0)).sum(1).mean()),
        "polysemantic_error": float(polysemantic_error(x_p, x_p_hat)),
        "l0": float((latents_BM > 0).float().sum(dim=1).mean()),
    }


def run_cell(sparsity: float, seed: int, settings: WSAESettings) -> dict[str, Any]:
    """Train and evaluate every method on one (S, seed) draw of the data.

    Args:
        sparsity: S.
        seed: data seed (W_p and samples) and SAE seed.
        settings: the experiment's setting.

    Returns:
        ``{"methods": {name: metrics}, "gt_error_trivial": float}``; WSAE metrics add
        ``gamma_min`` / ``gamma_max``, the weights that were used.
    """
    data = make_wsae_data(
        settings.n,
        settings.n_p,
        sparsity,
        settings.n_train + settings.n_eval,
        seed=seed,
    )
    train_x_p = data.x_p[: settings.n_train].float()
    held_out = WSAEData(
        data.x[settings.n_train :], data.x_p[settings.n_train :], data.w_p
    )
    scale = float(train_x_p.square().sum(dim=1).mean().sqrt())
    methods = {}
    for alpha in (None, *settings.alphas):
        sae = train_sae(train_x_p / scale, settings, alpha, seed)
        metrics = evaluate(sae, *held_out, scale=scale)
        if alpha is not None:
            metrics["gamma_min"] = float(sae.input_weights.min())
            metrics["gamma_max"] = float(sae.input_weights.max())
        methods[method_name(alpha)] = metrics
    trivial = ground_truth_error_on_support(held_out.x, torch.zeros_like(held_out.x))
    return {"methods": methods, "gt_error_trivial": float(trivial)}


def _single_thread() -> None:
    torch.set_num_threads(1)


def _run_cells(
    cells: list[tuple[float, int]], settings: WSAESettings, workers: int
) -> list[dict[str, Any]]:
    if workers <= 1 or len(cells) <= 1:
        return [run_cell(s, seed, settings) for s, seed in cells]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        min(workers, len(cells)), mp_context=context, initializer=_single_thread
    ) as pool:
        futures = [pool.submit(run_cell, s, seed, settings) for s, seed in cells]
        return [future.result() for future in futures]


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and population standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.pstdev(values)


def _rows(
    settings: WSAESettings, seeds: int, results: dict[tuple[float, int], dict]
) -> list[dict[str, Any]]:
    rows = []
    for sparsity in settings.sparsities:
        cell = [results[sparsity, seed] for seed in range(seeds)]
        trivial = statistics.fmean(c["gt_error_trivial"] for c in cell)
        for alpha in (None, *settings.alphas):
            name = method_name(alpha)
            per_seed = [c["methods"][name] for c in cell]
            row: dict[str, Any] = {"sparsity": sparsity, "method": name}
            for key in METRICS:
                row[key], row[f"{key}_std"] = _mean_std([m[key] for m in per_seed])
            row["gt_error_on_support_per_seed"] = [
                m["gt_error_on_support"] for m in per_seed
            ]
            row["gt_error_trivial"] = trivial
            if alpha is not None:
                row["gamma_min"] = min(m["gamma_min"] for m in per_seed)
                row["gamma_max"] = max(m["gamma_max"] for m in per_seed)
            row["seeds"] = seeds
            rows.append(row)
    return rows


def moderate_sparsity_summary(
    rows: list[dict[str, Any]], max_sparsity: float
) -> dict[str, Any]:
    """Whether each WSAE lowers the ground-truth error at moderate S, from the rows.

    Runs of one (S, seed) share data and initialisation, so the comparison is paired:
    ``r = wsae / sae - 1`` per (S, seed), relative so that every S counts alike (the
    errors shrink about 5x from S = 0.5 to 0.9). A WSAE "lowers" the error when the
    mean of r over every moderate (S, seed) pair is negative by more than two standard
    errors (sample standard deviation; with one pair, only the sign counts).

    Args:
        rows: the experiment's rows (with ``gt_error_on_support_per_seed``).
        max_sparsity: the largest S counted as moderate.

    Returns:
        ``{"sparsities", "rule", "methods": {name: {...}}, "any_wsae_lowers": bool}``.
    """
    moderate = [row for row in rows if row["sparsity"] <= max_sparsity]
    sae = {row["sparsity"]: row for row in moderate if row["method"] == SAE_METHOD}
    methods: dict[str, Any] = {}
    for row in moderate:
        if row["method"] == SAE_METHOD:
            continue
        base = sae[row["sparsity"]]
        pairs = zip(
            row["gt_error_on_support_per_seed"],
            base["gt_error_on_support_per_seed"],
            strict=True,
        )
        ratios = [w / s - 1 for w, s in pairs]
        entry = methods.setdefault(row["method"], {"per_sparsity": [], "_r": []})
        entry["_r"].extend(ratios)
        entry["per_sparsity"].append(
            {
                "sparsity": row["sparsity"],
                "gt_relative_change": statistics.fmean(ratios),
                "seeds_lower": sum(r < 0 for r in ratios),
                "seeds": len(ratios),
            }
        )
    for entry in methods.values():
        ratios = entry.pop("_r")
        mean = statistics.fmean(ratios)
        stderr = (
            statistics.stdev(ratios) / math.sqrt(len(ratios)) if len(ratios) > 1 else 0
        )
        entry["gt_relative_change_mean"] = mean
        entry["gt_relative_change_stderr"] = stderr
        entry["pairs_lower"] = f"{sum(r < 0 for r in ratios)}/{len(ratios)}"
        entry["lowers"] = mean < 0 and abs(mean) > 2 * stderr
    return {
        "sparsities": sorted(sae),
        "rule": "paired (same data and init) relative difference wsae / sae - 1 of "
        "gt_error_on_support, mean over all moderate (S, seed) pairs, < 0 by more "
        "than 2 standard errors",
        "methods": methods,
        "any_wsae_lowers": any(m["lowers"] for m in methods.values()),
    }


def wsae_experiment(
    seeds: int = 3, workers: int = 1, settings: WSAESettings | None = None
) -> dict[str, Any]:
    """SAE vs WSAE (alpha 0.5, 1) ground-truth and polysemantic errors across S.

    Args:
        seeds: independent draws (W_p, samples, SAE init) per S.
        workers: processes over the (S, seed) cells (1: in this process).
        settings: the shared setting (default: :class:`WSAESettings`).

    Returns:
        ``{"experiment": "wsae", "settings", "rows": [{"sparsity", "method",
        "gt_error_on_support", "gt_error_on_support_std", "polysemantic_error", ...,
        "seeds"}], "moderate_sparsity": {...}}``.
    """
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1; got {seeds}")
    settings = settings or WSAESettings()
    cells = [(s, seed) for s in settings.sparsities for seed in range(seeds)]
    results = dict(zip(cells, _run_cells(cells, settings, workers), strict=True))
    rows = _rows(settings, seeds, results)
    return {
        "experiment": "wsae",
        "settings": {**asdict(settings), "base_architecture": "standard"},
        "rows": rows,
        "moderate_sparsity": moderate_sparsity_summary(
            rows, settings.moderate_max_sparsity
        ),
    }
