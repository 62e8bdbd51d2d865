"""The synthetic lab's runs: seeding, a process pool of one-thread workers, rows.

A setting (:class:`~sae_gba_evals.lab.methods.RunSpec`) is run once per seed; seed
``i`` draws both a fresh data model (``data.seed = i``: new feature directions) and a
fresh SAE initialisation, so "3 seeds" means 3 independent datasets.
"""

import multiprocessing
import os
import statistics
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from typing import Any

import torch
from tqdm.auto import tqdm

from sae_gba_evals.lab.methods import Probe, RunSpec, dictionary, measure, train


def mean_std(values: list[float]) -> tuple[float, float]:
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


def worker_init(parent: int) -> None:
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
        initializer=worker_init,
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
    frr8, frr8_std = mean_std([r["frr@0.8"] for r in results])
    frr9, frr9_std = mean_std([r["frr@0.9"] for r in results])
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


def setting_rows(
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


def shared_settings(base: RunSpec) -> dict[str, Any]:
    """The shared training settings of an experiment, for its JSON."""
    return {
        "width": base.width,
        "steps": base.steps,
        "batch_size": base.batch_size,
        "lr": base.lr,
        "normalize_activations": base.normalize_activations,
        "gba": dict(base.gba),
    }
