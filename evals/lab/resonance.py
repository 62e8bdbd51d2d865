"""``sae-gba synth resonance``: BA's recovery with its target p swept around the
feature frequency f, for d below, at and above sqrt(n), its peak and band per d, and
the floor a random dictionary already reaches."""

import math
from dataclasses import replace
from typing import Any

import torch

from sae_gba.recovery import best_match_cosine
from sae_gba.synthetic import SyntheticConfig, SyntheticFeatureModel, uniform_preset
from sae_gba_evals.lab.methods import RunSpec, feature_frequency
from sae_gba_evals.lab.runner import DEFAULT_WORKERS, setting_rows, shared_settings


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
