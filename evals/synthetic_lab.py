"""``sae-gba synth EXPERIMENT``: the GBA paper's feature-recovery experiments.

Each experiment returns a JSON-ready dict and writes a PNG beside the JSON.
Run: ``sae-gba synth imbalanced --out runs/synth/imbalanced.json --seeds 3``.
"""

import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from evals.synthetic_methods import RunSpec, feature_frequency, measure, train
from sae_gba.recovery import cross_seed_consistency, recovery_by_frequency
from sae_gba.synthetic import imbalanced_preset, longtail_preset, uniform_preset


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.pstdev(values) if len(
        values
    ) > 1 else 0.0


def _row(name: str, spec: RunSpec, seeds: int, **extra: Any) -> dict[str, Any]:
    results = [measure(*train(spec.with_(seed=seed))) for seed in range(seeds)]
    frr8, _ = _mean_std([r["frr@0.8"] for r in results])
    frr9, frr9_std = _mean_std([r["frr@0.9"] for r in results])
    return {
        "method": name,
        "k": spec.k,
        "frr@0.8": frr8,
        "frr@0.9": frr9,
        "frr@0.9_std": frr9_std,
        "l0": statistics.fmean(r["l0"] for r in results),
        "seeds": seeds,
        **extra,
    }


def imbalanced(seeds: int = 3, base: RunSpec | None = None) -> dict[str, Any]:
    """The paper's table: n = 128, d = 42, half the samples s = 3, half s = 20."""
    base = base or RunSpec(method="gba", data=imbalanced_preset())
    specs = [
        ("gba", base),
        ("gba_wrong_range", base.with_(method="gba_wrong_range")),
        ("ba", base.with_(method="ba")),
        *[("topk", base.with_(method="topk", k=k)) for k in (20, 30, 50)],
        ("batchtopk", base.with_(method="batchtopk", k=20)),
        ("l1", base.with_(method="l1")),
    ]
    rows = [_row(name, spec, seeds) for name, spec in tqdm(specs, desc="imbalanced")]
    return {
        "experiment": "imbalanced",
        "rows": rows,
        "feature_frequency": feature_frequency(base.data),
    }


def resonance(
    seeds: int = 1, n_features: int = 128, dims: tuple[int, ...] = (8, 42)
) -> dict[str, Any]:
    """BA with its target p swept over two decades around the feature frequency f."""
    ratios = [2.0**e for e in range(-4, 4)]
    cells = []
    for d in tqdm(dims, desc="resonance d"):
        data = uniform_preset(sparsity=3, n_features=n_features, d=d)
        f = feature_frequency(data)
        for ratio in ratios:
            spec = RunSpec(
                method="ba", data=data, gba={"high_target_freq": min(0.5, ratio * f)}
            )
            row = _row("ba", spec, seeds)
            cells.append(
                {
                    "d": d,
                    "p_over_f": ratio,
                    "frr@0.8": row["frr@0.8"],
                    "frr@0.9": row["frr@0.9"],
                }
            )
    return {
        "experiment": "resonance",
        "n_features": n_features,
        "sqrt_n": math.sqrt(n_features),
        "cells": cells,
    }


def consistency(seeds: int = 3, top_fraction: float = 0.1) -> dict[str, Any]:
    """Cross-seed consistency of the most active neurons (the paper's MCS > 0.9)."""
    base = RunSpec(method="gba", data=imbalanced_preset())
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
                "seeds": seeds,
            }
        )
    return {"experiment": "consistency", "top_fraction": top_fraction, "rows": rows}


def longtail(seeds: int = 1) -> dict[str, Any]:
    """Recovery per feature-frequency bucket on a long-tailed data model."""
    data = longtail_preset(n_features=256, d=64)
    base = RunSpec(method="gba", data=data, width=1024, steps=4000)
    specs = {
        "gba": base,
        "topk": base.with_(method="topk", k=4),
        "ba": base.with_(method="ba"),
    }
    rows = []
    for name, spec in tqdm(specs.items(), desc="longtail"):
        for seed in range(seeds):
            sae, model = train(spec.with_(seed=seed))
            buckets = recovery_by_frequency(
                measure(sae, model)["best_match"],
                model.feature_frequencies(),
                n_buckets=4,
                threshold=0.9,
            )
            rows.append({"method": name, "seed": seed, "buckets": buckets})
    return {"experiment": "longtail", "rows": rows}


EXPERIMENTS: dict[str, Callable[..., dict[str, Any]]] = {
    "imbalanced": imbalanced,
    "resonance": resonance,
    "consistency": consistency,
    "longtail": longtail,
}


def run_experiment(
    name: str, out: str | Path, seeds: int | None = None
) -> dict[str, Any]:
    """Run one experiment, write its JSON and PNG, return the result."""
    if name not in EXPERIMENTS:
        raise ValueError(
            f"experiment={name!r} is invalid: must be one of {sorted(EXPERIMENTS)}"
        )
    start = time.time()
    result = EXPERIMENTS[name](**({} if seeds is None else {"seeds": seeds}))
    result["wall_seconds"] = time.time() - start
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=_jsonable))
    return result


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(type(value))


__all__ = ["EXPERIMENTS", "run_experiment"]
