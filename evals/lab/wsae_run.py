"""``sae-gba synth wsae``'s run: every (W_p kind, S, seed) cell, then rows and the
paired moderate-sparsity summary (the setting and one cell: :mod:`.wsae`)."""

import math
import multiprocessing
import os
import statistics
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from typing import Any

import torch

from sae_gba_evals.lab.runner import mean_std
from sae_gba_evals.lab.wsae import (
    MATCHED_PREFIX,
    METRICS,
    MIXED_METRICS,
    SAE_METHOD,
    WSAE_PREFIX,
    Cell,
    WSAESettings,
    method_name,
    run_cell,
)


def _single_thread() -> None:
    torch.set_num_threads(1)


def _run_cells(
    cells: list[Cell], settings: WSAESettings, workers: int
) -> list[dict[str, Any]]:
    if workers <= 1 or len(cells) <= 1:
        return [run_cell(*cell, settings) for cell in cells]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        min(workers, len(cells)), mp_context=context, initializer=_single_thread
    ) as pool:
        futures = [pool.submit(run_cell, *cell, settings) for cell in cells]
        return [future.result() for future in futures]


def method_names(settings: WSAESettings) -> list[str]:
    """Every method of a cell, in order: SAE, the WSAEs, their matched controls."""
    return [
        method_name(None),
        *(method_name(a) for a in settings.alphas),
        *(method_name(a, matched=True) for a in settings.alphas),
    ]


def _rows(
    settings: WSAESettings, seeds: int, results: dict[Cell, dict]
) -> list[dict[str, Any]]:
    rows = []
    for kind in settings.w_p_kinds:
        metrics = METRICS + (MIXED_METRICS if kind == "mixed" else ())
        for sparsity in settings.sparsities:
            cell = [results[kind, sparsity, seed] for seed in range(seeds)]
            trivial = statistics.fmean(c["gt_error_trivial"] for c in cell)
            for name in method_names(settings):
                per_seed = [c["methods"][name] for c in cell]
                row: dict[str, Any] = {
                    "w_p_kind": kind,
                    "sparsity": sparsity,
                    "method": name,
                }
                for key in metrics:
                    row[key], row[f"{key}_std"] = mean_std([m[key] for m in per_seed])
                for key in ("gt_error_on_support", "polysemantic_error"):
                    row[f"{key}_per_seed"] = [m[key] for m in per_seed]
                row["gt_error_trivial"] = trivial
                if "loss_scale_ratio" in per_seed[0]:
                    for key in ("loss_scale_ratio", "l1_coefficient"):
                        values = [m[key] for m in per_seed]
                        row[key], row[f"{key}_per_seed"] = (
                            statistics.fmean(values),
                            values,
                        )
                if "gamma_min" in per_seed[0]:
                    row["gamma_min"] = min(m["gamma_min"] for m in per_seed)
                    row["gamma_max"] = max(m["gamma_max"] for m in per_seed)
                    for key in ("gamma_mono_mean", "gamma_poly_mean"):
                        if key in per_seed[0]:
                            row[key] = statistics.fmean(m[key] for m in per_seed)
                row["seeds"] = seeds
                rows.append(row)
    return rows


def moderate_sparsity_summary(
    rows: list[dict[str, Any]], max_sparsity: float
) -> dict[str, Any]:
    """Whether each WSAE lowers the ground-truth error at moderate S, from the rows.

    Runs of one (S, seed) share data and initialisation, so the comparison is paired:
    ``r = method / baseline - 1`` per (S, seed), relative so that every S counts alike
    (the errors shrink about 5x from S = 0.5 to 0.9). A method "lowers" the error when
    the mean of r over every moderate (S, seed) pair is negative by more than two
    standard errors (sample standard deviation; with one pair, only the sign counts).
    The same paired relative change of the polysemantic error is reported beside it
    per S. Two baselines:

    - ``methods``: every method (WSAEs and matched controls) against the plain SAE.
    - ``vs_matched_control``: each WSAE against its ``sae_l1_matched_alpha<alpha>``
      control (when the rows have it): does the weighting PATTERN lower the error
      beyond the change of loss scale?

    Args:
        rows: the rows of one W_p kind (with ``gt_error_on_support_per_seed``; and
            ``polysemantic_error_per_seed`` for the polysemantic change).
        max_sparsity: the largest S counted as moderate.

    Returns:
        ``{"sparsities", "rule", "methods": {name: {...}}, "any_wsae_lowers": bool,
        "vs_matched_control": {wsae name: {..., "control"}},
        "any_wsae_beats_matched_control": bool}`` (the last two only with controls).
    """
    moderate = [row for row in rows if row["sparsity"] <= max_sparsity]
    by_method: dict[str, dict[float, dict[str, Any]]] = {}
    for row in moderate:
        by_method.setdefault(row["method"], {})[row["sparsity"]] = row
    sae = by_method[SAE_METHOD]
    methods = {
        name: _paired_comparison(method_rows, sae)
        for name, method_rows in by_method.items()
        if name != SAE_METHOD
    }
    summary: dict[str, Any] = {
        "sparsities": sorted(sae),
        "rule": "paired (same data and init) relative difference method / baseline "
        "- 1 of gt_error_on_support, mean over all moderate (S, seed) pairs, < 0 by "
        "more than 2 standard errors; baseline: the plain sae in 'methods', the "
        "matched-penalty control in 'vs_matched_control'",
        "methods": methods,
        "any_wsae_lowers": any(
            entry["lowers"]
            for name, entry in methods.items()
            if name.startswith(WSAE_PREFIX)
        ),
    }
    pairs = {
        name: MATCHED_PREFIX + name.removeprefix(WSAE_PREFIX)
        for name in by_method
        if name.startswith(WSAE_PREFIX)
        and MATCHED_PREFIX + name.removeprefix(WSAE_PREFIX) in by_method
    }
    if pairs:
        versus = {
            name: {
                "control": control,
                **_paired_comparison(by_method[name], by_method[control]),
            }
            for name, control in pairs.items()
        }
        summary["vs_matched_control"] = versus
        summary["any_wsae_beats_matched_control"] = any(
            entry["lowers"] for entry in versus.values()
        )
    return summary


def _paired_comparison(
    rows: dict[float, dict[str, Any]], base: dict[float, dict[str, Any]]
) -> dict[str, Any]:
    """The paired rule of :func:`moderate_sparsity_summary`, ``rows`` vs ``base``
    (both keyed by S)."""
    per_sparsity, all_ratios = [], []
    for sparsity in sorted(rows):
        row, base_row = rows[sparsity], base[sparsity]
        ratios = _paired_relative_change(row, base_row, "gt_error_on_support")
        all_ratios.extend(ratios)
        entry = {
            "sparsity": sparsity,
            "gt_relative_change": statistics.fmean(ratios),
            "seeds_lower": sum(r < 0 for r in ratios),
            "seeds": len(ratios),
        }
        if "polysemantic_error_per_seed" in row:
            entry["polysemantic_relative_change"] = statistics.fmean(
                _paired_relative_change(row, base_row, "polysemantic_error")
            )
        per_sparsity.append(entry)
    mean = statistics.fmean(all_ratios)
    stderr = (
        statistics.stdev(all_ratios) / math.sqrt(len(all_ratios))
        if len(all_ratios) > 1
        else 0
    )
    return {
        "per_sparsity": per_sparsity,
        "gt_relative_change_mean": mean,
        "gt_relative_change_stderr": stderr,
        "pairs_lower": f"{sum(r < 0 for r in all_ratios)}/{len(all_ratios)}",
        "lowers": mean < 0 and abs(mean) > 2 * stderr,
    }


def _paired_relative_change(
    row: dict[str, Any], base: dict[str, Any], key: str
) -> list[float]:
    """``row / base - 1`` of ``key`` per seed (runs of one seed share data and init)."""
    pairs = zip(row[f"{key}_per_seed"], base[f"{key}_per_seed"], strict=True)
    return [w / s - 1 for w, s in pairs]


def wsae_experiment(
    seeds: int = 3,
    workers: int = os.cpu_count() or 1,
    settings: WSAESettings | None = None,
) -> dict[str, Any]:
    """SAE vs WSAE (alpha 0.5, 1) vs matched-penalty controls: ground-truth and
    polysemantic errors across S, for every kind of W_p.

    Args:
        seeds: independent draws (W_p, samples, SAE init) per (W_p kind, S).
        workers: processes over the (W_p kind, S, seed) cells, one thread each
            (1: in this process; the results do not depend on it).
        settings: the shared setting (default: :class:`WSAESettings`).

    Returns:
        ``{"experiment": "wsae", "settings", "rows": [{"w_p_kind", "sparsity",
        "method", "gt_error_on_support", "gt_error_on_support_std",
        "polysemantic_error", ..., "seeds"}], "moderate_sparsity": {kind: {...}}}``.
    """
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1; got {seeds}")
    settings = settings or WSAESettings()
    cells = [
        (kind, s, seed)
        for kind in settings.w_p_kinds
        for s in settings.sparsities
        for seed in range(seeds)
    ]
    results = dict(zip(cells, _run_cells(cells, settings, workers), strict=True))
    rows = _rows(settings, seeds, results)
    return {
        "experiment": "wsae",
        "settings": {**asdict(settings), "base_architecture": "standard"},
        "rows": rows,
        "moderate_sparsity": {
            kind: moderate_sparsity_summary(
                [row for row in rows if row["w_p_kind"] == kind],
                settings.moderate_max_sparsity,
            )
            for kind in settings.w_p_kinds
        },
    }
