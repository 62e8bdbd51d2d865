"""``sae-gba synth suite`` and ``sae-gba synth scaling``: feature recovery of GBA
against TopK, BatchTopK and L1 on data families they were not tuned on.

``suite`` trains every method of ``sae_gba_evals.suite.methods`` on every family of
``sae_gba_evals.suite.families`` (3 seeds), all through SAELens's ``SyntheticSAERunner``,
and reports per family and method: FRR@0.8 / @0.9 overall, per true-frequency third
(common / middle / rare; for the hierarchical family also parents / children),
SAELens's MCC and uniqueness, L0, explained variance, dead latents and runtime.
Families are split into "tune" (uniform, imbalanced, longtail: a default may be
chosen on them) and "confirm" (heavy_tail, noise, hierarchical, low_d: only
checked); the JSON records the split.

Default size: width 512, 3,000 steps of batch 512, Adam lr 1e-3 (constant), 20,000
evaluation samples; 7 families x 6 methods x 3 seeds = 126 runs in one-thread worker
processes, about 20 minutes on 2 quiet cores. ``--size small`` is a seconds-long
smoke run (width 64, 10 steps of batch 64).

``scaling`` runs gba_default and TopK at k = 1x and 2x the true L0 on the longtail
family (1 seed) at widths 512, 2,048, 8,192 (n = 256) and at n = 128, 512, 1,024
(width 2,048), and reports FRR@0.9 overall and on the rarest third of gba_default
against the better TopK per cell.

Run: ``sae-gba synth suite --out docs/synth/suite.json`` (PNG beside it).
"""

import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, fields, replace
from importlib.metadata import version
from pathlib import Path
from typing import Any

from sae_lens.saes.sae import TrainingSAEConfig

from sae_gba.gba_sae import GBATrainingSAEConfig
from sae_gba_evals.suite.families import FAMILIES
from sae_gba_evals.suite.methods import METHODS, TOPK_METHODS, parse_gba_overrides
from sae_gba_evals.suite.methods import __doc__ as METHODS_DOC
from sae_gba_evals.suite.plots import plot_scaling, plot_suite
from sae_gba_evals.suite.run import SIZES, Job, Size, run_jobs

LABEL_KEYS = ("family", "method", "seed", "gba", "n", "width")
SCALING_WIDTHS = (512, 2048, 8192)
SCALING_NS = (128, 512, 1024)
SCALING_BASE = {"width": 2048, "n": 256}
SCALING_METHODS = ("gba_default", *TOPK_METHODS)


def _choose(name: str, chosen: list[str] | None, allowed: tuple[str, ...]) -> list[str]:
    unknown = sorted(set(chosen or ()) - set(allowed))
    if unknown:
        raise ValueError(f"{name}={unknown} is invalid: must be among {list(allowed)}")
    return [item for item in allowed if chosen is None or item in chosen]


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean, population std and per-seed values of every numeric metric."""
    summary: dict[str, Any] = {"seeds": [run["seed"] for run in runs]}
    for key, value in runs[0].items():
        if key in LABEL_KEYS or not isinstance(value, (int, float)):
            continue
        values = [float(run[key]) for run in runs]
        summary[key] = statistics.fmean(values)
        summary[f"{key}_std"] = statistics.pstdev(values)
        summary[f"{key}_per_seed"] = values
    return summary


def _environment(start: float, load_start: tuple[float, ...]) -> dict[str, Any]:
    return {
        "wall_seconds": time.time() - start,
        "load_average_start": list(load_start),
        "load_average_end": list(os.getloadavg()),
        "cpu_count": os.cpu_count(),
        "threads_per_worker": 1,
        "versions": {
            "python": platform.python_version(),
            **{pkg: version(pkg) for pkg in ("torch", "sae-lens", "sae-gba")},
        },
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start)),
    }


def _gba_default_fields(width: int, gba: dict[str, Any]) -> dict[str, Any]:
    """The GBA fields ``gba_default`` trained with (package defaults at run time)."""
    shared = {f.name for f in fields(TrainingSAEConfig)} - {"decoder_init_norm"}
    cfg = GBATrainingSAEConfig(d_in=1, d_sae=width, **gba)
    return {
        f.name: getattr(cfg, f.name)
        for f in fields(GBATrainingSAEConfig)
        if f.name not in shared
    }


def suite(
    size: str = "default",
    seeds: int = 3,
    families: list[str] | None = None,
    methods: list[str] | None = None,
    gba: dict[str, Any] | None = None,
    workers: int = 1,
    log: Path | None = None,
) -> dict[str, Any]:
    """Train every method on every family and seed; the JSON-ready result.

    Args:
        size: a key of ``SIZES``.
        seeds: seeds per family (data seed = SAE seed = 0 .. seeds - 1).
        families: family names (None: all).
        methods: method names (None: all).
        gba: extra ``GBATrainingSAEConfig`` fields for ``gba_default``.
        workers: parallel one-thread processes.
        log: JSON-lines file of run records, appended as runs finish.

    Returns:
        ``{"experiment": "suite", "table": {family: {method: summary}}, "runs", ...}``.
    """
    if size not in SIZES:
        raise ValueError(f"size={size!r} is invalid: must be one of {list(SIZES)}")
    if not (isinstance(seeds, int) and seeds >= 1):
        raise ValueError(f"seeds={seeds!r} is invalid: must be an int >= 1")
    family_names = _choose("families", families, tuple(FAMILIES))
    method_names = _choose("methods", methods, METHODS)
    start, load_start = time.time(), os.getloadavg()
    gba = gba or {}
    _gba_default_fields(SIZES[size].width, gba)  # bad fields fail before training
    # Seed-major order: an interrupted suite has whole seeds (see ``log``).
    jobs = [
        Job(family, method, seed, SIZES[size], gba)
        for seed in range(seeds)
        for family in family_names
        for method in method_names
    ]
    runs = run_jobs(jobs, workers, log)
    result = suite_result(runs, size, gba, workers)
    result["environment"] = _environment(start, load_start)
    return result


def suite_result(
    runs: list[dict[str, Any]], size: str, gba: dict[str, Any], workers: int
) -> dict[str, Any]:
    """The suite's JSON-ready result from its run records (all, or those an
    interrupted suite logged).

    Args:
        runs: ``run_jobs`` records.
        size: the key of ``SIZES`` they ran at.
        gba: the ``gba_default`` overrides they ran with.
        workers: parallel processes used.

    Returns:
        ``{"experiment": "suite", "table": {family: {method: summary}}, ...}``.
    """
    family_names = [f for f in FAMILIES if any(r["family"] == f for r in runs)]
    method_names = [m for m in METHODS if any(r["method"] == m for r in runs)]
    table = {
        family: {
            method: _summary(
                [r for r in runs if r["family"] == family and r["method"] == method]
            )
            for method in method_names
        }
        for family in family_names
    }
    return {
        "experiment": "suite",
        "splits": {
            split: [f for f in family_names if FAMILIES[f].split == split]
            for split in ("tune", "confirm")
        },
        "families": {
            name: {
                key: value
                for key, value in asdict(FAMILIES[name]).items()
                if key not in ("name", "build")
            }
            for name in family_names
        },
        "methods": method_names,
        "method_rules": METHODS_DOC,
        "gba_overrides": gba,
        "gba_default_fields": _gba_default_fields(SIZES[size].width, gba),
        "size_name": size,
        "size": asdict(SIZES[size]),
        "seeds": len({r["seed"] for r in runs}),
        "workers": workers,
        "table": table,
        "runs": runs,
    }


def scaling(
    size: str = "default",
    seed: int = 0,
    gba: dict[str, Any] | None = None,
    workers: int = 1,
) -> dict[str, Any]:
    """gba_default against the better TopK on longtail, across width and n.

    Args:
        size: a key of ``SIZES`` (its width is replaced per cell).
        seed: the one seed.
        gba: extra ``GBATrainingSAEConfig`` fields for ``gba_default``.
        workers: parallel one-thread processes.

    Returns:
        ``{"experiment": "scaling", "cells": [{"width", "n", "gba_default",
        "best_topk", ...}], ...}``.
    """
    if size not in SIZES:
        raise ValueError(f"size={size!r} is invalid: must be one of {list(SIZES)}")
    start, load_start = time.time(), os.getloadavg()
    gba = gba or {}
    base: Size = SIZES[size]
    gba_fields = _gba_default_fields(base.width, gba)  # validates gba first
    scale = base.width / SIZES["default"].width  # --size small shrinks widths too
    grid = [(width, SCALING_BASE["n"]) for width in SCALING_WIDTHS] + [
        (SCALING_BASE["width"], n) for n in SCALING_NS
    ]
    grid = [(max(8, int(width * scale)), n) for width, n in grid]
    jobs = [
        Job("longtail", method, seed, replace(base, width=width), gba, n)
        for width, n in grid
        for method in SCALING_METHODS
    ]
    runs = run_jobs(jobs, workers)
    cells = []
    for width, n in grid:
        by_method = {
            r["method"]: r
            for r in runs
            if r["n"] == n and r["method"] in SCALING_METHODS and r["width"] == width
        }
        topk = max(TOPK_METHODS, key=lambda m: by_method[m]["frr@0.9"])
        cells.append(
            {
                "width": width,
                "n": n,
                "sweep": "width" if n == SCALING_BASE["n"] else "n",
                "best_topk_method": topk,
                **{
                    f"{name}_{key}": by_method[method][key]
                    for name, method in (
                        ("gba_default", "gba_default"),
                        ("best_topk", topk),
                    )
                    for key in ("frr@0.9", "frr@0.9_rare", "l0", "mcc")
                },
            }
        )
    return {
        "experiment": "scaling",
        "family": "longtail",
        "seed": seed,
        "size_name": size,
        "size": asdict(base),
        "gba_overrides": gba,
        "gba_default_fields": gba_fields,
        "cells": cells,
        "runs": runs,
        "environment": _environment(start, load_start),
    }


def write_result(result: dict[str, Any], out: str | Path) -> Path:
    """Write the JSON atomically and its PNG beside it.

    Args:
        result: ``suite`` or ``scaling``'s result.
        out: the JSON path.

    Returns:
        The PNG path.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result["command"] = "sae-gba " + " ".join(sys.argv[1:])
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out)
    png = out.with_suffix(".png")
    (plot_suite if result["experiment"] == "suite" else plot_scaling)(result, png)
    return png


def format_table(result: dict[str, Any]) -> str:
    """A text table of FRR@0.9 overall / rarest third, L0 and MCC per family x method."""
    if result["experiment"] == "scaling":
        lines = ["width  n     gba_default all/rare  best TopK all/rare"]
        for c in result["cells"]:
            lines.append(
                f"{c['width']:<6} {c['n']:<5} {c['gba_default_frr@0.9']:.2f} / "
                f"{c['gba_default_frr@0.9_rare']:.2f}           "
                f"{c['best_topk_frr@0.9']:.2f} / {c['best_topk_frr@0.9_rare']:.2f} "
                f"({c['best_topk_method']})"
            )
        return "\n".join(lines)
    lines = ["family (split)          method       FRR@0.9 all / rare   L0     MCC"]
    for family, methods in result["table"].items():
        split = result["families"][family]["split"]
        for method, s in methods.items():
            lines.append(
                f"{family + ' (' + split + ')':<23} {method:<12} "
                f"{s['frr@0.9']:.2f} / {s['frr@0.9_rare']:.2f}          "
                f"{s['l0']:<6.1f} {s['mcc']:.2f}"
            )
    return "\n".join(lines)


def run_command(args: Any) -> str:
    """``sae-gba synth suite|scaling`` from parsed arguments; writes JSON and PNG.

    Args:
        args: the ``synth`` subcommand's namespace.

    Returns:
        The text table and where the files went.
    """
    for name in ("variants", "data"):
        if getattr(args, name) is not None:
            raise ValueError(f"--{name} applies to ablate only")
    options: dict[str, Any] = {
        "size": args.size or "default",
        "gba": parse_gba_overrides(args.gba or []),
        "workers": args.workers or os.cpu_count() or 1,
    }
    if args.experiment == "scaling":
        for name in ("families", "methods", "seeds"):
            if getattr(args, name) is not None:
                raise ValueError(f"--{name} does not apply to scaling (1 seed, fixed)")
        result = scaling(**options)
    else:
        split = {
            name: getattr(args, name).split(",")
            for name in ("families", "methods")
            if getattr(args, name)
        }
        seeds = 3 if args.seeds is None else args.seeds
        log = Path(args.out).with_suffix(".runs.jsonl")
        log.parent.mkdir(parents=True, exist_ok=True)
        log.unlink(missing_ok=True)
        result = suite(seeds=seeds, log=log, **split, **options)
    png = write_result(result, args.out)
    Path(args.out).with_suffix(".runs.jsonl").unlink(missing_ok=True)  # in the JSON
    return f"{format_table(result)}\nwrote {args.out} and {png}"
