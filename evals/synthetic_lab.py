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
from tqdm.auto import tqdm

from evals.synthetic_methods import RunSpec, feature_frequency, measure, train
from evals.synthetic_plots import plot
from sae_gba.recovery import cross_seed_consistency, recovery_by_frequency
from sae_gba.synthetic import imbalanced_preset, longtail_preset, uniform_preset


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and population standard deviation (0 for a single value)."""
    std = statistics.pstdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), std


def seeded(spec: RunSpec, seed: int) -> RunSpec:
    """The run for seed ``seed``: new data model and new SAE initialisation.

    Args:
        spec: the setting.
        seed: the seed.

    Returns:
        The seeded run.
    """
    return spec.with_(seed=seed, data=replace(spec.data, seed=seed))


def _row(name: str, spec: RunSpec, seeds: int, **extra: Any) -> dict[str, Any]:
    """Train ``spec`` on ``seeds`` seeds; mean FRR (and per-seed values).

    Args:
        name: the method label of the row.
        spec: the setting.
        seeds: number of seeds (0 .. seeds-1).
        extra: further fields for the row.

    Returns:
        The row.
    """
    results = [measure(*train(seeded(spec, seed))) for seed in range(seeds)]
    frr8, frr8_std = _mean_std([r["frr@0.8"] for r in results])
    frr9, frr9_std = _mean_std([r["frr@0.9"] for r in results])
    return {
        "method": name,
        "k": spec.k,
        "frr@0.8": frr8,
        "frr@0.8_std": frr8_std,
        "frr@0.9": frr9,
        "frr@0.9_std": frr9_std,
        "frr@0.8_per_seed": [r["frr@0.8"] for r in results],
        "frr@0.9_per_seed": [r["frr@0.9"] for r in results],
        "l0": statistics.fmean(r["l0"] for r in results),
        "explained_variance": statistics.fmean(
            float(r["explained_variance"]) for r in results
        ),
        "seeds": seeds,
        **extra,
    }


def _settings(base: RunSpec) -> dict[str, Any]:
    """The shared training settings of an experiment, for its JSON."""
    return {
        "width": base.width,
        "steps": base.steps,
        "batch_size": base.batch_size,
        "lr": base.lr,
        "normalize_activations": base.normalize_activations,
        "gba": dict(base.gba),
    }


def imbalanced(seeds: int = 3, base: RunSpec | None = None) -> dict[str, Any]:
    """The paper's table: n = 128, d = 42, half the samples s = 3, half s = 20.

    Args:
        seeds: seeds per method.
        base: the shared setting (default: the imbalanced preset, lab defaults).

    Returns:
        ``{"experiment": "imbalanced", "rows": [...], ...}``.
    """
    base = base or RunSpec(method="gba", data=imbalanced_preset())
    specs = [
        ("gba", base),
        ("gba_wrong_range", base.with_(method="gba_wrong_range")),
        ("ba", base.with_(method="ba")),
        *[("topk", base.with_(method="topk", k=k)) for k in (20, 30, 50)],
        ("batchtopk", base.with_(method="batchtopk", k=20)),
    ]
    rows = [_row(name, spec, seeds) for name, spec in tqdm(specs, desc="imbalanced")]
    return {
        "experiment": "imbalanced",
        "rows": rows,
        "feature_frequency": feature_frequency(base.data),
        "settings": _settings(base),
    }


def resonance(
    seeds: int = 1,
    base: RunSpec | None = None,
    dims: tuple[int, ...] = (8, 42),
    ratios: tuple[float, ...] = tuple(2.0**e for e in range(-4, 4)),
) -> dict[str, Any]:
    """BA with its target p swept around the feature frequency f, for d < / > sqrt(n).

    Args:
        seeds: seeds per cell.
        base: the shared setting (its data's n_features is used; s = 3 uniform).
        dims: input dimensions d to compare with sqrt(n).
        ratios: values of p / f.

    Returns:
        ``{"experiment": "resonance", "cells": [{"d", "p_over_f", "frr@0.8", ...}]}``.
    """
    base = base or RunSpec(method="ba", data=uniform_preset(sparsity=3))
    n_features = base.data.n_features
    cells = []
    for d in tqdm(dims, desc="resonance d"):
        data = replace(base.data, d=d)
        f = feature_frequency(data)
        for ratio in ratios:
            target = min(0.5, ratio * f)
            spec = base.with_(method="ba", data=data, gba={"high_target_freq": target})
            row = _row("ba", spec, seeds)
            cells.append(
                {
                    "d": d,
                    "p_over_f": ratio,
                    "p": target,
                    "frr@0.8": row["frr@0.8"],
                    "frr@0.9": row["frr@0.9"],
                    "frr@0.9_per_seed": row["frr@0.9_per_seed"],
                }
            )
    return {
        "experiment": "resonance",
        "n_features": n_features,
        "sqrt_n": math.sqrt(n_features),
        "cells": cells,
        "settings": _settings(base),
    }


def consistency(
    seeds: int = 3, base: RunSpec | None = None, top_fraction: float = 0.1
) -> dict[str, Any]:
    """Cross-seed consistency of the most active neurons (the paper's MCS > 0.9).

    Runs of one setting share the data model (seed 0) and differ in SAE seed only.

    Args:
        seeds: runs per method (>= 2).
        base: the shared setting.
        top_fraction: fraction of neurons selected by mean activation.

    Returns:
        ``{"experiment": "consistency", "rows": [{"method", "consistency", ...}]}``.
    """
    if seeds < 2:
        raise ValueError(f"consistency needs seeds >= 2 (pairs of runs); got {seeds}")
    base = base or RunSpec(method="gba", data=imbalanced_preset())
    specs = {
        "gba": base,
        "topk": base.with_(method="topk", k=20),
        "l1": base.with_(method="l1"),
    }
    rows = []
    for name, spec in tqdm(specs.items(), desc="consistency"):
        runs = [train(spec.with_(seed=seed)) for seed in range(seeds)]
        measured = [measure(*run) for run in runs]
        pairs = [
            cross_seed_consistency(
                runs[a][0].W_dec.detach(),
                runs[b][0].W_dec.detach(),
                measured[a]["mean_activation"],
                top_fraction=top_fraction,
            )
            for a in range(seeds)
            for b in range(seeds)
            if a != b
        ]
        mean, std = _mean_std(pairs)
        rows.append(
            {
                "method": name,
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
        "settings": _settings(base),
    }


def longtail(seeds: int = 1, base: RunSpec | None = None) -> dict[str, Any]:
    """Recovery per feature-frequency bucket on a long-tailed data model.

    Args:
        seeds: seeds per method.
        base: the shared setting (default: the long-tail preset, n = 128, d = 42).

    Returns:
        ``{"experiment": "longtail", "rows": [{"method", "seed", "buckets"}]}``.
    """
    base = base or RunSpec(method="gba", data=longtail_preset())
    specs = {
        "gba": base,
        "ba": base.with_(method="ba"),
        "topk": base.with_(method="topk", k=4),
    }
    rows = []
    for name, spec in tqdm(specs.items(), desc="longtail"):
        for seed in range(seeds):
            sae, model = train(seeded(spec, seed))
            measured = measure(sae, model)
            buckets = recovery_by_frequency(
                measured["best_match"],
                model.feature_frequencies(),
                n_buckets=4,
                threshold=0.9,
            )
            rows.append(
                {
                    "method": name,
                    "seed": seed,
                    "frr@0.9": measured["frr@0.9"],
                    "buckets": buckets,
                }
            )
    return {"experiment": "longtail", "rows": rows, "settings": _settings(base)}


def ablation_variants(base: RunSpec) -> list[tuple[str, RunSpec]]:
    """GBA on the imbalanced set, one factor changed at a time from ``base``.

    Args:
        base: the default GBA run.

    Returns:
        ``(label, spec)`` pairs, the default first.
    """

    def gba(**changes: Any) -> RunSpec:
        return base.with_(gba={**base.gba, **changes})

    return [
        ("default", base),
        ("output_scale_init=1", gba(decoder_init_norm=1.0)),
        ("output_scale_init=0.01", gba(decoder_init_norm=0.01)),
        ("width/2", base.with_(width=base.width // 2)),
        ("width*4", base.with_(width=base.width * 4)),
        ("steps*3", base.with_(steps=base.steps * 3)),
        ("lr/3", base.with_(lr=base.lr / 3)),
        ("lr*3", base.with_(lr=base.lr * 3)),
        ("n_groups=3", gba(n_groups=3)),
        ("n_groups=20", gba(n_groups=20)),
        ("htf=0.2", gba(high_target_freq=0.2)),
        ("htf=0.1", gba(high_target_freq=0.1)),
        ("adaptation_interval=10", gba(adaptation_interval=10)),
        ("adaptation_interval=250", gba(adaptation_interval=250)),
        ("per-sample norm", base.with_(normalize_activations="constant_norm_rescale")),
        (
            "coefficients=constant",
            base.with_(data=replace(base.data, coefficient_distribution="constant")),
        ),
        (
            "coefficients=exponential",
            base.with_(data=replace(base.data, coefficient_distribution="exponential")),
        ),
    ]


def ablate(seeds: int = 1, base: RunSpec | None = None) -> dict[str, Any]:
    """GBA on the imbalanced set, one setting changed at a time from the default.

    Args:
        seeds: seeds per variant.
        base: the default GBA run.

    Returns:
        ``{"experiment": "ablate", "rows": [{"variant", "method", "frr@0.8", ...}]}``.
    """
    base = base or RunSpec(method="gba", data=imbalanced_preset())
    variants = ablation_variants(base)
    rows = [_row(name, spec, seeds) for name, spec in tqdm(variants, desc="ablate")]
    for row in rows:
        row["variant"], row["method"] = row["method"], f"gba: {row['method']}"
    return {"experiment": "ablate", "rows": rows, "settings": _settings(base)}


EXPERIMENTS: dict[str, Callable[..., dict[str, Any]]] = {
    "imbalanced": imbalanced,
    "resonance": resonance,
    "consistency": consistency,
    "longtail": longtail,
    "ablate": ablate,
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
    start = time.time()
    if seeds is not None:
        kwargs["seeds"] = seeds
    result = EXPERIMENTS[name](**kwargs)
    result["wall_seconds"] = time.time() - start
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=_jsonable))
    plot(result, out.with_suffix(".png"))
    return result


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


__all__ = ["EXPERIMENTS", "ablation_variants", "run_experiment", "seeded"]
