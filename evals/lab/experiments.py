"""``sae-gba synth EXPERIMENT``: the GBA paper's feature-recovery experiments.

Each experiment returns a JSON-ready dict; ``run_experiment`` writes it and a PNG
beside it. Run: ``sae-gba synth imbalanced --out runs/synth/imbalanced.json --seeds 3``.

Seed ``i`` of a setting draws both a fresh data model (``data.seed = i``: new feature
directions) and a fresh SAE initialisation, so "3 seeds" means 3 independent datasets.
"""

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sae_gba.atomic import write_text_atomically
from sae_gba.recovery import (
    cross_seed_consistency,
    recovery_by_frequency,
)
from sae_gba.synthetic import (
    SyntheticFeatureModel,
    imbalanced_preset,
    longtail_preset,
)
from sae_gba_evals.lab.ablation import ablate, ablation_variants
from sae_gba_evals.lab.methods import (
    RunSpec,
    feature_frequency,
)
from sae_gba_evals.lab.plots import plot
from sae_gba_evals.lab.resonance import resonance, resonance_band
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
