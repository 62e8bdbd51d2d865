"""``sae-gba synth EXPERIMENT``: the GBA paper's feature-recovery experiments.

Each experiment returns a JSON-ready dict; ``run_experiment`` writes it and a PNG
beside it. Run: ``sae-gba synth imbalanced --out runs/synth/imbalanced.json --seeds 3``.

Seed ``i`` of a setting draws both a fresh data model (``data.seed = i``: new feature
directions) and a fresh SAE initialisation, so "3 seeds" means 3 independent datasets.
"""

import json
import math
import multiprocessing
import os
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from sae_gba.atomic import write_text_atomically
from sae_gba.gba_sae import GBATrainingSAEConfig
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
from sae_gba_evals.lab.methods import (
    Probe,
    RunSpec,
    dictionary,
    feature_frequency,
    measure,
    train,
)
from sae_gba_evals.lab.plots import plot
from sae_gba_evals.lab.wsae import wsae_experiment


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


def _run(spec: RunSpec, probe_every: int | None = None) -> dict[str, Any]:
    """Train and measure one run; the result also holds the dictionary and probe."""
    probe = Probe(probe_every) if probe_every else None
    sae, model = train(spec, probe)
    result = measure(sae, model)
    result["dictionary"] = dictionary(sae)
    result["trajectory"] = probe.records if probe else None
    return result


def _worker_init(parent: int) -> None:
    torch.set_num_threads(1)

    # A worker whose parent was killed (SIGTERM, not Ctrl-C, which reaches the whole
    # process group) would otherwise train on as an orphan.
    def exit_with_parent() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=exit_with_parent, daemon=True).start()


def run_all(
    specs: list[RunSpec], workers: int = 1, probe_every: int | None = None
) -> list[dict[str, Any]]:
    """Train and measure every run, in ``workers`` processes of one thread each.

    Synthetic runs are small matmuls that one thread runs nearly as fast as many,
    so a process per core gives close to a core's worth of speed-up each.

    Args:
        specs: the runs.
        workers: processes (1: run here, in order).
        probe_every: record recovery every this many steps (None: do not).

    Returns:
        ``measure``'s dict per run, in order, plus ``dictionary`` and ``trajectory``.
    """
    if workers <= 1 or len(specs) <= 1:
        return [_run(spec, probe_every) for spec in tqdm(specs, desc="runs")]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        min(workers, len(specs)),
        mp_context=context,
        initializer=_worker_init,
        initargs=(os.getpid(),),
    ) as pool:
        futures = [pool.submit(_run, spec, probe_every) for spec in specs]
        return [future.result() for future in tqdm(futures, desc="runs")]


DEFAULT_WORKERS = os.cpu_count() or 1


def _row(name: str, spec: RunSpec, results: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean FRR (and per-seed values) of one setting's seeded runs.

    Args:
        name: the method label of the row.
        spec: the setting.
        results: ``run_all``'s results for seeds 0 .. len(results) - 1.

    Returns:
        The row.
    """
    seeds = len(results)
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
    }


def _rows(
    named_specs: list[tuple[str, RunSpec]],
    seeds: int,
    workers: int,
    probe_every: int | None = None,
) -> list[dict[str, Any]]:
    """One row per ``(name, spec)``, each over ``seeds`` seeds, all runs in parallel;
    with ``probe_every``, a row also has its seed-mean ``frr@0.9_by_step``."""
    runs = [seeded(spec, seed) for _, spec in named_specs for seed in range(seeds)]
    results = run_all(runs, workers, probe_every)
    rows = []
    for i, (name, spec) in enumerate(named_specs):
        seeded_results = results[i * seeds : (i + 1) * seeds]
        row = _row(name, spec, seeded_results)
        if probe_every:
            by_step = zip(*(r["trajectory"] for r in seeded_results), strict=True)
            row["frr@0.9_by_step"] = [
                [records[0]["step"], statistics.fmean(r["frr@0.9"] for r in records)]
                for records in by_step
            ]
        rows.append(row)
    return rows


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
        "rows": _rows(specs, seeds, workers),
        "feature_frequency": feature_frequency(base.data),
        "settings": _settings(base),
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
    rows = _rows(specs, seeds, workers, probe_every=max(1, base.steps // 10))
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
        "settings": _settings(base),
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
        mean, std = _mean_std(pairs)
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
        "settings": _settings(base),
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
    return {"experiment": "longtail", "rows": rows, "settings": _settings(base)}


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
    return {"experiment": "planted", "rows": rows, "settings": _settings(base)}


# GBATrainingSAEConfig's (SAELens's) default initial output scale.
DEFAULT_SCALE = GBATrainingSAEConfig.decoder_init_norm


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
        ("train_output_scale=False", gba(train_output_scale=False)),
        ("output_scale_init=1", gba(decoder_init_norm=1.0)),
        ("output_scale_init=0.3", gba(decoder_init_norm=0.3)),
        ("output_scale_init=0.01", gba(decoder_init_norm=0.01)),
        ("width*4", base.with_(width=base.width * 4)),
        # Width x4 quadruples L0; a quarter of the output scale keeps a * L0 as it was.
        (
            "width*4 & output_scale_init/4",
            gba(
                decoder_init_norm=base.gba.get("decoder_init_norm", DEFAULT_SCALE) / 4
            ).with_(width=base.width * 4),
        ),
        ("steps*3", base.with_(steps=base.steps * 3)),
        ("lr/3", base.with_(lr=base.lr / 3)),
        ("n_groups=3", gba(n_groups=3)),
        ("htf=0.1", gba(high_target_freq=0.1)),
        ("ltf=1e-3", gba(low_target_freq=1e-3)),
        ("adaptation_interval=10", gba(adaptation_interval=10)),
        ("gate_bias_init=target_quantile", gba(gate_bias_init="target_quantile")),
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


DATA_PRESETS: dict[str, Callable[[], Any]] = {
    "imbalanced": imbalanced_preset,
    "uniform": uniform_preset,
    "longtail": longtail_preset,
}


def ablate(
    seeds: int = 1,
    base: RunSpec | None = None,
    workers: int = DEFAULT_WORKERS,
    variants: list[str] | None = None,
    methods: list[str] | None = None,
    data: str = "imbalanced",
) -> dict[str, Any]:
    """GBA on the imbalanced set, one setting changed at a time, with the output
    scale trained (the paper's recipe) and frozen (the theory's regime).

    Args:
        seeds: seeds per variant.
        base: the default GBA run.
        workers: parallel training processes.
        variants: labels of ``ablation_variants`` to run (None: all).
        methods: "gba" and/or "gba_frozen_scale" (None: both).
        data: the data preset of the base run when ``base`` is None: "imbalanced"
            (the set the variants were chosen on), or "uniform" (s = 3) and "longtail"
            to check a variant on data it was not chosen on.

    Returns:
        ``{"experiment": "ablate", "rows": [{"variant", "method", "frr@0.8", ...}]}``.
    """
    if data not in DATA_PRESETS:
        raise ValueError(
            f"data={data!r} is invalid: must be one of {list(DATA_PRESETS)}"
        )
    base = base or RunSpec(method="gba", data=DATA_PRESETS[data]())
    all_variants = ablation_variants(base)
    all_methods = ("gba", "gba_frozen_scale")
    labels = [label for label, _ in all_variants]
    for field, chosen, allowed in (
        ("variants", variants, labels),
        ("methods", methods, all_methods),
    ):
        unknown = sorted(set(chosen or ()) - set(allowed))
        if unknown:
            raise ValueError(f"{field}={unknown} is invalid: must be among {allowed}")
    named = [
        (f"{method}: {label}", spec.with_(method=method))
        for method in methods or all_methods
        for label, spec in all_variants
        if (variants is None or label in variants)
        and not (method == "gba_frozen_scale" and label.startswith("train_output"))
    ]
    rows = _rows(named, seeds, workers)
    for row in rows:
        row["method"], row["variant"] = row["method"].split(": ", 1)
    return {
        "experiment": "ablate",
        "data": data,
        "rows": rows,
        "settings": _settings(base),
    }


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
