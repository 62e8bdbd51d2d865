"""``sae-gba synth EXPERIMENT``: the GBA paper's feature-recovery experiments.

Each experiment returns a JSON-ready dict; ``run_experiment`` writes it and a PNG
beside it. Run: ``sae-gba synth imbalanced --out runs/synth/imbalanced.json --seeds 3``.

Seed ``i`` of a setting draws both a fresh data model (``data.seed = i``: new feature
directions) and a fresh SAE initialisation, so "3 seeds" means 3 independent datasets.
"""

import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from sae_gba.atomic import write_text_atomically
from sae_gba.recovery import (
    best_match_cosine,
    cross_seed_consistency,
    recovery_by_frequency,
)
from sae_gba.synthetic import (
    SyntheticConfig,
    SyntheticFeatureModel,
    imbalanced_preset,
    longtail_preset,
    uniform_preset,
)
from sae_gba_evals.lab.ablation import ablate, ablation_variants
from sae_gba_evals.lab.methods import (
    RunSpec,
    feature_frequency,
)
from sae_gba_evals.lab.plots import plot
from sae_gba_evals.lab.runner import (
    DEFAULT_WORKERS,
    mean_std,
    run_all,
    seeded,
    setting_rows,
    shared_settings,
)
from sae_gba_evals.lab.wsae_run import wsae_experiment


def imbalanced(
    seeds: int = 3, base: RunSpec | None = None, workers: int = DEFAULT_WORKERS
) -> dict[str, Any]:
    """The paper's table: n = 128, d = 42, half the samples s = 3, half s = 20.

    Args:
        seeds: seeds per method.
        base: the shared setting (default: the imbalanced preset, lab defaults).
        workers: parallel training processes.

    Returns:
        ``{"experiment": "imbalanced", "rows": [...], ...}``.
    """
    base = base or RunSpec(method="gba", data=imbalanced_preset())
    specs = [
        ("gba", base),
        ("gba_frozen_scale", base.with_(method="gba_frozen_scale")),
        ("gba_wrong_range", base.with_(method="gba_wrong_range")),
        ("ba", base.with_(method="ba")),
        *[("topk", base.with_(method="topk", k=k)) for k in (20, 30, 50)],
        ("batchtopk", base.with_(method="batchtopk", k=20)),
        ("l1", base.with_(method="l1")),
    ]
    return {
        "experiment": "imbalanced",
        "rows": setting_rows(specs, seeds, workers),
        "feature_frequency": feature_frequency(base.data),
        "settings": shared_settings(base),
    }


def chance_recovery(
    data: SyntheticConfig, width: int, seed: int = 0
) -> dict[str, float]:
    """FRR of ``width`` random unit directions: the floor a trained SAE must beat.

    In few dimensions a random dictionary already has a neuron near every feature
    (at d = 8, FRR@0.8 of 512 random neurons is about 0.7), so low-d cells of a
    sweep mean something only above this floor.

    Args:
        data: the data model.
        width: number of random directions.
        seed: their seed.

    Returns:
        ``{"frr@0.8": ..., "frr@0.9": ...}``.
    """
    generator = torch.Generator().manual_seed(seed + 7_919)
    random = torch.randn(width, data.d, generator=generator)
    best = best_match_cosine(random, SyntheticFeatureModel(data).feature_directions)
    return {f"frr@{t}": (best > t).float().mean().item() for t in (0.8, 0.9)}


def resonance(
    seeds: int = 1,
    base: RunSpec | None = None,
    dims: tuple[int, ...] = (12, 16, 42),
    ratios: tuple[float, ...] = tuple(2.0**e for e in range(-4, 4)),
    workers: int = DEFAULT_WORKERS,
) -> dict[str, Any]:
    """BA with its target p swept around the feature frequency f, for d below, at
    and above sqrt(n).

    BA runs in the theory's regime: output scale frozen at its small initial value,
    and each bias set from the first batch so that the neuron fires at p from step 0
    (``gate_bias_init="target_quantile"``). From the paper's zero bias every neuron
    would start at p = 0.5 and the controller would sweep it down through every value
    above the target, so a cell would not measure its own p. The default data
    (n = 256, s = 3, width 1,024, 3,000 steps) keep the chance floor at tau = 0.9
    low; every cell records the firing frequency reached and FRR@0.9 every 300
    steps, and every d its peak and band (:func:`resonance_band`).

    Args:
        seeds: seeds per cell.
        base: the shared setting (its data's n_features is used).
        dims: input dimensions d to compare with sqrt(n).
        ratios: values of p / f.
        workers: parallel training processes.

    Returns:
        ``{"experiment": "resonance", "cells": [{"d", "p_over_f", "frr@0.8", ...}],
        "bands": {d: ...}}``.
    """
    base = base or RunSpec(
        method="ba",
        data=uniform_preset(sparsity=3, n_features=256),
        width=1024,
        steps=3000,
        # Adapting every 10 steps keeps each neuron near its p as its direction moves.
        gba={"adaptation_interval": 10},
    )
    grid, specs = [], []
    for d in dims:
        data = replace(base.data, d=d)
        f = feature_frequency(data)
        for ratio in ratios:
            target = min(0.5, ratio * f)
            gba = {
                **base.gba,
                "high_target_freq": target,
                "train_output_scale": False,
                "gate_bias_init": "target_quantile",
            }
            grid.append({"d": d, "p_over_f": ratio, "p": target, "f": f})
            specs.append(("ba", base.with_(method="ba", data=data, gba=gba)))
    rows = setting_rows(specs, seeds, workers, probe_every=max(1, base.steps // 10))
    keys = ("frr@0.8", "frr@0.9", "frr@0.9_per_seed", "frr@0.9_by_step")
    cells = [
        {
            **cell,
            **{key: row[key] for key in keys},
            "achieved_p_over_f": row["l0"] / base.width / cell["f"],
        }
        for cell, row in zip(grid, rows, strict=True)
    ]
    n_features = base.data.n_features
    return {
        "experiment": "resonance",
        "n_features": n_features,
        "sqrt_n": math.sqrt(n_features),
        "seeds": seeds,
        "cells": cells,
        "bands": {
            str(d): resonance_band([c for c in cells if c["d"] == d]) for d in dims
        },
        "chance": {
            str(d): chance_recovery(replace(base.data, d=d), base.width) for d in dims
        },
        "settings": shared_settings(base),
    }


BAND_FRR = 0.5


def resonance_band(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """Where one d's recovery peaks over p / f, and the band around the peak.

    The band is the run of consecutive swept ratios, containing the peak, whose
    FRR@0.9 is at least :data:`BAND_FRR`; its width is in decades of p.

    Args:
        cells: one d's cells, each with ``p_over_f`` and ``frr@0.9``.

    Returns:
        ``{"peak_p_over_f", "peak_frr@0.9", "band_p_over_f": [low, high] | None,
        "band_decades"}``; the band reaching the first or last ratio means it may
        extend beyond the sweep.
    """
    cells = sorted(cells, key=lambda c: c["p_over_f"])
    frr = [c["frr@0.9"] for c in cells]
    peak = max(range(len(cells)), key=frr.__getitem__)
    summary: dict[str, Any] = {
        "peak_p_over_f": cells[peak]["p_over_f"],
        "peak_frr@0.9": frr[peak],
        "band_p_over_f": None,
        "band_decades": 0.0,
    }
    if frr[peak] < BAND_FRR:
        return summary
    low = high = peak
    while low > 0 and frr[low - 1] >= BAND_FRR:
        low -= 1
    while high < len(cells) - 1 and frr[high + 1] >= BAND_FRR:
        high += 1
    ratios = cells[low]["p_over_f"], cells[high]["p_over_f"]
    summary["band_p_over_f"] = list(ratios)
    summary["band_decades"] = math.log10(ratios[1] / ratios[0])
    return summary


def consistency(
    seeds: int = 3,
    base: RunSpec | None = None,
    top_fraction: float = 0.1,
    workers: int = DEFAULT_WORKERS,
) -> dict[str, Any]:
    """Cross-seed consistency of the most active neurons (the paper's MCS > 0.9).

    Runs of one setting share the data model (seed 0) and differ in SAE seed only.

    Args:
        seeds: runs per method (>= 2).
        base: the shared setting.
        top_fraction: fraction of neurons selected by mean activation.
        workers: parallel training processes.

    Returns:
        ``{"experiment": "consistency", "rows": [{"method", "consistency", ...}]}``.
    """
    if seeds < 2:
        raise ValueError(f"consistency needs seeds >= 2 (pairs of runs); got {seeds}")
    base = base or RunSpec(method="gba", data=imbalanced_preset())
    specs = {
        "gba": base,
        "gba_frozen_scale": base.with_(method="gba_frozen_scale"),
        "topk": base.with_(method="topk", k=20),
        "l1": base.with_(method="l1"),
    }
    runs = [spec.with_(seed=seed) for spec in specs.values() for seed in range(seeds)]
    results = run_all(runs, workers)
    rows = []
    for i, (name, spec) in enumerate(specs.items()):
        measured = results[i * seeds : (i + 1) * seeds]
        pairs = [
            cross_seed_consistency(
                measured[a]["dictionary"],
                measured[b]["dictionary"],
                measured[a]["mean_activation"],
                top_fraction=top_fraction,
            )
            for a in range(seeds)
            for b in range(seeds)
            if a != b
        ]
        mean, std = mean_std(pairs)
        rows.append(
            {
                "method": name,
                "k": spec.k,
                "consistency": mean,
                "consistency_std": std,
                "frr@0.9": statistics.fmean(m["frr@0.9"] for m in measured),
                "seeds": seeds,
            }
        )
    return {
        "experiment": "consistency",
        "top_fraction": top_fraction,
        "rows": rows,
        "settings": shared_settings(base),
    }


def longtail(
    seeds: int = 1, base: RunSpec | None = None, workers: int = DEFAULT_WORKERS
) -> dict[str, Any]:
    """Recovery per feature-frequency bucket on a long-tailed data model.

    Args:
        seeds: seeds per method.
        base: the shared setting (default: the long-tail preset, n = 128, d = 42).
        workers: parallel training processes.

    Returns:
        ``{"experiment": "longtail", "rows": [{"method", "seed", "buckets"}]}``.
    """
    base = base or RunSpec(method="gba", data=longtail_preset())
    specs = {
        "gba": base,
        "gba_frozen_scale": base.with_(method="gba_frozen_scale"),
        "ba": base.with_(method="ba"),
        "topk": base.with_(method="topk", k=4),
    }
    named = [(name, seed) for name in specs for seed in range(seeds)]
    runs = [seeded(specs[name], seed) for name, seed in named]
    results = run_all(runs, workers)
    rows = [
        {
            "method": name,
            "seed": seed,
            "frr@0.9": measured["frr@0.9"],
            "buckets": recovery_by_frequency(
                measured["best_match"],
                SyntheticFeatureModel(run.data).feature_frequencies(),
                n_buckets=4,
                threshold=0.9,
            ),
        }
        for (name, seed), run, measured in zip(named, runs, results, strict=True)
    ]
    return {"experiment": "longtail", "rows": rows, "settings": shared_settings(base)}


def planted(
    seeds: int = 1, base: RunSpec | None = None, workers: int = DEFAULT_WORKERS
) -> dict[str, Any]:
    """Training started ON the true features: are they a stable point?

    If a method's loss keeps falling while its recovery falls from 1, the true
    features are not what that method's objective converges to on these data, and
    no initialisation or schedule will make it recover them.

    Args:
        seeds: seeds per method.
        base: the shared setting (default: imbalanced preset, planted start).
        workers: parallel training processes.

    Returns:
        ``{"experiment": "planted", "rows": [{"method", "trajectory", ...}]}``.
    """
    base = (base or RunSpec(method="gba", data=imbalanced_preset())).with_(planted=True)
    specs = {
        "gba": base,
        "gba_frozen_scale": base.with_(method="gba_frozen_scale"),
        "topk": base.with_(method="topk", k=20),
    }
    named = [(name, seed) for name in specs for seed in range(seeds)]
    runs = [seeded(specs[name], seed) for name, seed in named]
    results = run_all(runs, workers, probe_every=max(1, base.steps // 20))
    rows = [
        {
            "method": name,
            "k": run.k,
            "seed": seed,
            **{key: measured[key] for key in ("frr@0.8", "frr@0.9", "l0")},
            "explained_variance": measured["explained_variance"],
            "trajectory": measured["trajectory"],
        }
        for (name, seed), run, measured in zip(named, runs, results, strict=True)
    ]
    return {"experiment": "planted", "rows": rows, "settings": shared_settings(base)}


EXPERIMENTS: dict[str, Callable[..., dict[str, Any]]] = {
    "imbalanced": imbalanced,
    "resonance": resonance,
    "consistency": consistency,
    "longtail": longtail,
    "ablate": ablate,
    "planted": planted,
    "wsae": wsae_experiment,
}


def run_experiment(
    name: str, out: str | Path, seeds: int | None = None, **kwargs: Any
) -> dict[str, Any]:
    """Run one experiment, write its JSON and PNG (same stem), return the result.

    Args:
        name: one of ``EXPERIMENTS``.
        out: JSON path.
        seeds: seeds per setting (None: the experiment's default).
        kwargs: further experiment arguments (e.g. ``base`` for tiny runs).

    Returns:
        The result dict (with ``wall_seconds``).
    """
    if name not in EXPERIMENTS:
        raise ValueError(
            f"experiment={name!r} is invalid: must be one of {sorted(EXPERIMENTS)}"
        )
    if seeds is not None and seeds < 1:
        raise ValueError(f"seeds={seeds} is invalid: must be >= 1")
    start = time.time()
    if seeds is not None:
        kwargs["seeds"] = seeds
    result = EXPERIMENTS[name](**kwargs)
    result["wall_seconds"] = time.time() - start
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(out, json.dumps(result, indent=2, default=_jsonable))
    plot(result, out.with_suffix(".png"))
    return result


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


__all__ = [
    "EXPERIMENTS",
    "ablation_variants",
    "resonance_band",
    "run_experiment",
    "seeded",
]
