"""The comparison's evaluation: SAEBench's evals and the explained variance per SAE.

Each SAE gets SAEBench 0.6's core eval (:func:`sae_gba_evals.saebench.core.run_core`)
and first-letter absorption (:func:`sae_gba_evals.saebench.absorption.run_absorption`)
on held-out data only, with one loaded model under :func:`memoized_forward`; the
absorption ground-truth probe is trained once per layer and shared. Every result is
kept in ``OUT/evals/`` and found there by a resumed run.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from sae_gba.lm.harvest import harvest
from sae_gba_evals.compare.memo import memoized_forward
from sae_gba_evals.saebench.absorption import run_absorption
from sae_gba_evals.saebench.common import EvalSettings, dtype_name, prepare_sae
from sae_gba_evals.saebench.core import core_windows, run_core

if TYPE_CHECKING:
    import datasets
    from transformer_lens import HookedTransformer


def _cached(path: Path, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``compute()``'s JSON-able result, or the one saved at ``path`` by an earlier run."""
    if path.is_file():
        return json.loads(path.read_text())
    start = time.perf_counter()
    result = compute()
    result["seconds"] = time.perf_counter() - start
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=1, default=float))
    os.replace(tmp, path)
    return result


def held_out_activations(
    model: HookedTransformer,
    hook_name: str,
    held_out: datasets.Dataset,
    settings: EvalSettings,
) -> torch.Tensor:
    """The hook's activations on the windows the core eval reads, special tokens out.

    Args:
        model: the language model.
        hook_name: the SAEs' hook.
        held_out: held-out windows ("tokens" column).
        settings: the core eval's token count and seed (:func:`core_windows`).
    """
    windows = torch.tensor(core_windows(held_out, settings)["tokens"])
    return harvest(
        model, hook_name, windows, None, settings.batch_size_prompts, progress=False
    )


def explained_variance(
    folder: Path, acts: torch.Tensor | None, device: str
) -> dict[str, Any]:
    """:func:`sae_gba.metrics.held_out_metrics` of the SAE in ``folder`` on ``acts``,
    and for a GBA SAE its :func:`alive_by_group`."""
    from sae_gba.loading import load_sae
    from sae_gba.metrics import held_out_metrics

    if acts is None:
        raise ValueError("no held-out activations to measure the SAE on")
    sae, acts = load_sae(folder, device), acts.to(device)
    result = held_out_metrics(sae, acts)
    sizes = getattr(sae.cfg.metadata, "gba_group_sizes", None)
    if sizes:
        targets = sae.cfg.metadata.gba_target_frequencies
        result["alive_by_group"] = alive_by_group(sae, acts, sizes, targets)
    return result


@torch.no_grad()
def alive_by_group(
    sae: Any,
    acts: torch.Tensor,
    group_sizes: Sequence[int],
    targets: Sequence[float],
    chunk: int = 4096,
) -> list[dict[str, float]]:
    """Per GBA frequency group: the fraction of its latents that fire at least once on
    ``acts``, and the fraction expected of latents firing exactly at the group's target
    (``1 - exp(-target * tokens)``, Poisson): below ~3 / target tokens a latent at its
    target can look dead by chance.

    Args:
        sae: the SAE (takes raw activations).
        acts: (n_tokens, d_in) held-out activations.
        group_sizes: latents per group, in latent order.
        targets: each group's target firing frequency.
        chunk: tokens per step.
    """
    fired = torch.zeros(sum(group_sizes), dtype=torch.bool, device=acts.device)
    for part in acts.split(chunk):
        fired |= (sae.encode(part.float()) > 0).any(dim=0)
    groups, start = [], 0
    for size, target in zip(group_sizes, targets, strict=True):
        groups.append(
            {
                "target": float(target),
                "alive": float(fired[start : start + size].float().mean()),
                "alive_if_at_target": 1 - math.exp(-target * len(acts)),
            }
        )
        start += size
    return groups


def evaluate_one(
    name: str,
    folder: Path,
    model: HookedTransformer,
    held_out: datasets.Dataset,
    held_out_label: str,
    out: Path,
    settings: EvalSettings,
    evals: Sequence[str],
    probes_dir: str | Path | None = None,
    absorption_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """SAEBench core and absorption evals of one SAE folder (each skipped if done).

    Args:
        name: the SAE's name in SAEBench's output.
        folder: the SAE folder.
        model: the loaded model (its dtype is used for absorption).
        held_out: held-out windows for the core eval.
        held_out_label: what they are.
        out: the comparison folder (results under ``out/evals``).
        settings: token counts, words, seed.
        evals: any of "core", "absorption".
        probes_dir: ground-truth probe folder (None: the shared cache).
        absorption_options: further ``AbsorptionEvalConfig`` fields.

    Returns:
        Per eval, what ``run_core`` / ``run_absorption`` returned plus ``seconds``.
    """
    from sae_gba.loading import load_sae

    device = str(model.cfg.device)
    results: dict[str, Any] = {}
    if "core" in evals:
        results["core"] = _cached(
            out / "evals" / "core" / f"{name}.json",
            lambda: run_core(
                # float32 SAE whatever the model dtype: SAELens casts its input.
                prepare_sae(load_sae(folder, device), device, "float32"),
                model,
                held_out,
                out / "evals" / "core",
                settings=settings,
                sae_name=name,
                data_label=held_out_label,
            ),
        )
    if "absorption" in evals:
        dtype = dtype_name(model)
        # One folder per word sample, so a resumed run with another sample recomputes.
        words = settings.absorption_words
        absorption_dir = out / "evals" / f"absorption_{words or 'all'}_words"
        results["absorption"] = _cached(
            absorption_dir / f"{name}.json",
            lambda: run_absorption(
                prepare_sae(load_sae(folder, device), device, dtype),
                model,
                absorption_dir,
                settings=settings,
                sae_name=name,
                probes_dir=probes_dir,
                **(absorption_options or {}),
            ),
        )
    return results


def evaluate_all(
    out: Path,
    records: dict[str, Any],
    model: HookedTransformer,
    held_out: tuple[datasets.Dataset, str],
    settings: EvalSettings,
    evals: Sequence[str],
    memo_bytes: int,
    held_out_acts: Callable[[], torch.Tensor],
    probes_dir: str | Path | None = None,
    absorption_options: dict[str, Any] | None = None,
    progress: bool = True,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Evaluate every trained SAE (:func:`evaluate_one`) under one memoised model.

    Beside SAEBench's evals, each SAE's conventional explained variance is computed
    on the core eval's held-out tokens (:func:`explained_variance`; their activations
    are asked for once, before the memoised evals, and only if a result is missing).

    Args:
        out: the comparison folder.
        records: SAE name -> training record.
        model: the loaded model.
        held_out: held-out windows and their label.
        settings: token counts, words, seed.
        evals: any of "core", "absorption".
        memo_bytes: cap of :func:`memoized_forward`.
        held_out_acts: returns the hook's activations on the core eval's tokens
            (:func:`held_out_activations`; for the conventional explained variance).
        probes_dir: ground-truth probe folder (None: the shared cache).
        absorption_options: further ``AbsorptionEvalConfig`` fields.
        progress: show a progress bar.

    Returns:
        The ``compare.json`` rows and the memo's counters.
    """
    ev_dir = out / "evals" / "explained_variance"
    acts = None
    if any(not (ev_dir / f"{name}.json").is_file() for name in records):
        acts = held_out_acts()
    rows = []
    with memoized_forward(model, memo_bytes) as memo:
        for name, record in tqdm(
            records.items(), desc="evaluate", disable=not progress
        ):
            folder = out / "saes" / name
            results = evaluate_one(
                name,
                folder,
                model,
                held_out[0],
                held_out[1],
                out,
                settings,
                evals,
                probes_dir,
                absorption_options,
            )
            results["explained_variance"] = _cached(
                ev_dir / f"{name}.json",
                lambda: explained_variance(folder, acts, str(model.cfg.device)),  # noqa: B023
            )
            rows.append(result_row(record, results, folder))
    return rows, memo


def result_row(
    record: dict[str, Any], results: dict[str, Any], folder: Path
) -> dict[str, Any]:
    """One row of ``compare.json`` from a training record and the eval results."""
    row: dict[str, Any] = {
        "method": record["method"],
        "target_l0": record["target_l0"],
        "seed": record.get("seed_offset", 0),
        "setting": record["setting"],
        "converged": record.get("converged"),
        "ev_change_last_20pct": record.get("ev_change_last_20pct"),
    }
    core = results.get("core")
    metrics = core["metrics"] if core else {}
    for group, key in (
        ("sparsity", "l0"),
        ("reconstruction_quality", "explained_variance_legacy"),
        ("misc_metrics", "frac_alive"),
        ("model_performance_preservation", "ce_loss_score"),
        ("model_behavior_preservation", "kl_div_score"),
    ):
        row[key] = metrics.get(group, {}).get(key)
    # The conventional ratio, computed here: SAEBench 0.6's `explained_variance`
    # measures variance about zero (see report.EV_FOOTNOTE).
    held_out = results.get("explained_variance") or {}
    row["explained_variance"] = held_out.get("explained_variance")
    row["alive_by_group"] = held_out.get("alive_by_group")
    absorbed = results.get("absorption") or {}
    mean = (absorbed.get("metrics") or {}).get("mean", {})
    row["mean_absorption_fraction_score"] = mean.get("mean_absorption_fraction_score")
    row["mean_full_absorption_score"] = mean.get("mean_full_absorption_score")
    absorption_tokens = absorbed.get("tokens", {})
    row["absorption_status"] = absorption_tokens.get("status")
    core_tokens = core["tokens"] if core else {}
    row["tokens"] = {
        "training": record["training_tokens"],
        "eval_sparsity_variance": core_tokens.get("sparsity_variance_tokens"),
        "eval_sparsity_variance_without_special": core_tokens.get(
            "sparsity_variance_tokens_without_special"
        ),
        "eval_reconstruction": core_tokens.get("reconstruction_tokens"),
        "absorption_words": absorption_tokens.get("words"),
        "absorption_ground_truth_probe": absorption_tokens.get(
            "ground_truth_probe_tokens"
        ),
        "absorption_prompts": absorption_tokens.get("absorption_tokens"),
    }
    row["train_seconds"] = record["train_seconds"]
    row["eval_seconds"] = {
        k: v.get("seconds") for k, v in results.items() if k in ("core", "absorption")
    }
    row["sae_dir"] = str(folder)
    return row
