"""``sae-gba eval``: SAEBench 0.6's core and first-letter absorption evals, offline.

Every metric is SAEBench's own code: :func:`sae_gba_evals.saebench.core.run_core`
calls ``sae_bench.evals.core.main.run_evals`` (both explained-variance definitions,
MSE, cosine, L0/L1, shrinkage, CE and KL scores, per-latent densities and with them
``frac_alive``), and ``sae_gba_evals.saebench.absorption.run_absorption`` calls SAEBench's
absorption stages and assembles its ``AbsorptionEvalOutput`` as ``run_eval`` does.
Only the model and the data are injected: SAEBench's top-level entry points load both
from the Hub by name. Each eval writes SAEBench's own result JSON
(``OUT/core/*.json``, ``OUT/absorption/*.json``) and :func:`evaluate` adds
``OUT/summary.md``. Every output states how many tokens it used (SAEBench's
``token_stats``, and ``eval_result_unstructured["sae_gba"]``).

Run::

    sae-gba eval runs/demo/sae --evals core,absorption --out runs/demo/eval

Which held-out tokens each metric reads, how absorption is made practical on CPUs, the
costs on the embedded model and the resources Gemma-2-2B would need:
docs/eval/README.md.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sae_gba.atomic import write_text_atomically
from sae_gba_evals.saebench.absorption import run_absorption
from sae_gba_evals.saebench.common import (
    EVAL_PRESETS,
    EvalError,
    EvalSettings,
    dtype_name,
    prepare_sae,
    preset_for,
    require_saebench,
    saebench_version,
)
from sae_gba_evals.saebench.core import run_core

if TYPE_CHECKING:
    import datasets
    from transformer_lens import HookedTransformer

EVAL_TYPES = ("core", "absorption")


def load_model_for_sae(
    sae_cfg: dict[str, Any],
    model_path: str | None = None,
    device: str = "cpu",
    dtype: str = "float32",
) -> HookedTransformer:
    """The model an SAE folder's cfg names (:func:`sae_gba.lm.models.load_model`).

    Args:
        sae_cfg: the SAE's ``cfg.json`` (``metadata.model_name``, ``d_in``).
        model_path: a local Hugging Face folder; None loads the embedded Gemma-3-270M
            for its name and otherwise asks TransformerLens (Hub or HF cache).
        device: torch device.
        dtype: model dtype name ("float32", "bfloat16", ...).
    """
    from sae_bench.sae_bench_utils.general_utils import str_to_dtype

    from sae_gba.lm.models import load_model

    meta = sae_cfg.get("metadata", {})
    name = meta.get("model_name") or sae_cfg.get("model_name")
    if not name:
        raise ValueError("the SAE's cfg.json names no model (metadata.model_name)")
    return load_model(
        name,
        model_path,
        d_in=sae_cfg["d_in"],
        device=device,
        dtype=str_to_dtype(dtype),
        from_pretrained_kwargs=meta.get("model_from_pretrained_kwargs"),
    )


def held_out_tokens(
    model: HookedTransformer, context_size: int = 128, dataset_path: str | None = None
) -> tuple[datasets.Dataset, str]:
    """Held-out windows (:func:`sae_gba.lm.data.read_windows`) as SAEBench reads them.

    Args:
        model: the evaluated model (its tokenizer tokenizes the text).
        context_size: tokens per window, BOS first.
        dataset_path: a ``save_to_disk`` folder to read whole instead of the held-out
            Wikipedia articles.

    Returns:
        A dataset with a "tokens" column of equal-length windows, and its label.
    """
    from sae_gba.lm.data import read_windows, windows_dataset

    windows, label = read_windows(model, "held_out", context_size, dataset_path)
    return windows_dataset(windows), label


def evaluate(
    sae_dir: str | Path,
    out: str | Path,
    evals: Sequence[str] = EVAL_TYPES,
    *,
    model_path: str | None = None,
    dataset_path: str | None = None,
    device: str = "cpu",
    preset: str | None = None,
    model: HookedTransformer | None = None,
    progress: bool = True,
    **settings_fields: Any,
) -> dict[str, Any]:
    """Run SAEBench evals on an SAELens SAE folder; write their JSON and ``summary.md``.

    Args:
        sae_dir: any SAELens SAE folder (this plugin's architectures register
            themselves on load).
        out: output folder (``core/``, ``absorption/``, ``summary.md``).
        evals: any of "core", "absorption".
        model_path: local Hugging Face folder of the SAE's model (see
            :func:`load_model_for_sae`).
        dataset_path: held-out data to use instead of the Wikipedia articles.
        device: torch device.
        preset: a key of :data:`EVAL_PRESETS`; None picks it from the SAE's model.
        model: an already loaded model (used as it is, in its dtype, for both evals).
        progress: show a bar for each phase (core's batches, absorption's stages).
        **settings_fields: :class:`EvalSettings` fields overriding the preset's.

    Raises:
        EvalError: a bad folder, model, dataset or option, named.
    """
    require_saebench()
    from sae_gba.lm.windows import load_local_dataset
    from sae_gba.loading import read_sae_config

    unknown = sorted(set(evals) - set(EVAL_TYPES))
    if unknown or not evals:
        raise EvalError(f"evals must be among {list(EVAL_TYPES)}, got {list(evals)}")
    try:
        cfg = read_sae_config(sae_dir)
        if dataset_path is not None:
            load_local_dataset(dataset_path)
    except (FileNotFoundError, ValueError) as err:
        raise EvalError(str(err)) from err
    model_name = cfg.get("metadata", {}).get("model_name") or ""
    preset = preset or preset_for(model_name)
    if preset not in EVAL_PRESETS:
        raise EvalError(f"preset must be one of {sorted(EVAL_PRESETS)}, got {preset!r}")
    settings = replace(EVAL_PRESETS[preset], **settings_fields)
    out = Path(out)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    owns_model = model is None
    if model is None:
        try:
            model = load_model_for_sae(cfg, model_path, device, settings.llm_dtype)
        except (FileNotFoundError, ValueError) as err:
            raise EvalError(str(err)) from err
    timings["model_load_s"] = time.perf_counter() - start
    results, eval_timings = _run_evals(
        sae_dir, model, device, evals, settings, out, dataset_path, owns_model, progress
    )
    timings.update(eval_timings)
    summary = out / "summary.md"
    write_text_atomically(
        summary, summary_markdown(sae_dir, cfg, preset, settings, results, timings)
    )
    return {
        "preset": preset,
        "settings": asdict(settings),
        "results": results,
        "timings": timings,
        "summary": str(summary),
    }


def _run_evals(
    sae_dir: str | Path,
    model: HookedTransformer,
    device: str,
    evals: Sequence[str],
    settings: EvalSettings,
    out: Path,
    dataset_path: str | None,
    owns_model: bool,
    progress: bool,
) -> tuple[dict[str, Any], dict[str, float]]:
    """Core then absorption on the SAE folder; their results and wall times.

    The model moves to ``settings.absorption_dtype`` for absorption only when it was
    loaded here (``owns_model``); a given model is used as it is.
    """
    from sae_bench.sae_bench_utils.general_utils import str_to_dtype

    from sae_gba.loading import load_sae

    sae_name = Path(sae_dir).resolve().name
    results: dict[str, Any] = {}
    timings: dict[str, float] = {}
    if "core" in evals:
        start = time.perf_counter()
        try:
            tokens, label = held_out_tokens(model, settings.context_size, dataset_path)
        except (FileNotFoundError, ValueError) as err:
            raise EvalError(str(err)) from err
        sae = prepare_sae(load_sae(sae_dir, device), device, dtype_name(model))
        results["core"] = run_core(
            sae,
            model,
            tokens,
            out / "core",
            settings=settings,
            sae_name=sae_name,
            data_label=label,
            progress=progress,
        )
        timings["core_s"] = time.perf_counter() - start
    if "absorption" in evals:
        start = time.perf_counter()
        if owns_model and dtype_name(model) != settings.absorption_dtype:
            model = model.to(
                str_to_dtype(settings.absorption_dtype), print_details=False
            )
        sae = prepare_sae(load_sae(sae_dir, device), device, dtype_name(model))
        results["absorption"] = run_absorption(
            sae, model, out / "absorption", settings=settings, sae_name=sae_name
        )
        timings["absorption_s"] = time.perf_counter() - start
    return results, timings


_CORE_ROWS = (
    ("reconstruction_quality", "explained_variance_legacy"),
    ("reconstruction_quality", "explained_variance"),
    ("reconstruction_quality", "mse"),
    ("reconstruction_quality", "cossim"),
    ("sparsity", "l0"),
    ("sparsity", "l1"),
    ("misc_metrics", "frac_alive"),
    ("misc_metrics", "freq_over_1_percent"),
    ("misc_metrics", "freq_over_10_percent"),
    ("model_performance_preservation", "ce_loss_score"),
    ("model_performance_preservation", "ce_loss_without_sae"),
    ("model_performance_preservation", "ce_loss_with_sae"),
    ("model_performance_preservation", "ce_loss_with_ablation"),
    ("model_behavior_preservation", "kl_div_score"),
    ("model_behavior_preservation", "kl_div_with_sae"),
    ("shrinkage", "l2_ratio"),
    ("shrinkage", "relative_reconstruction_bias"),
)


def summary_markdown(
    sae_dir: str | Path,
    cfg: dict[str, Any],
    preset: str,
    settings: EvalSettings,
    results: dict[str, Any],
    timings: dict[str, float],
) -> str:
    """The short markdown report of one :func:`evaluate` run."""
    meta = cfg.get("metadata", {})
    lines = [
        f"# SAEBench evals of `{sae_dir}`",
        "",
        f"- SAE: {cfg['architecture']} (trained as "
        f"{meta.get('training_architecture', cfg['architecture'])}), "
        f"d_in {cfg['d_in']}, d_sae {cfg['d_sae']}, hook `{meta.get('hook_name')}`",
        f"- Model: {meta.get('model_name')}; {saebench_version()}, "
        f"sae_lens=={version('sae_lens')}; eval preset `{preset}`",
        f"- Settings: {json.dumps(asdict(settings))}",
    ]
    if core := results.get("core"):
        t = core["tokens"]
        lines += [
            "",
            f"## Core ({t['sparsity_variance_tokens']:,} held-out tokens)",
            "",
            f"Data: {t['data']}. Sparsity, variance and alive fraction: all "
            f"{t['held_out_windows']} windows of {t['context_size']} tokens = "
            f"{t['sparsity_variance_tokens']:,} tokens "
            f"({t['sparsity_variance_tokens_without_special']:,} without BOS/EOS/PAD, "
            f"which are excluded). CE and KL: {t['reconstruction_tokens']:,} tokens. "
            "Compare explained variance on `explained_variance_legacy` (per token, "
            "1 - |x - x_hat|^2 / |x - mean x|^2; the GBA paper's 0.902): SAEBench "
            "0.6's `explained_variance` subtracts the squared mean of x^2 over all "
            "dimensions instead of the mean of x, so it is not a variance ratio and "
            f"can exceed 1 when activations are large. JSON: `{core['path']}`.",
            "",
            "| metric | value |",
            "| --- | --- |",
        ]
        for group, key in _CORE_ROWS:
            value = core["metrics"].get(group, {}).get(key)
            if value is not None:
                lines.append(f"| {key} | {value:.4g} |")
    if "absorption" in results:
        absorbed = results["absorption"]
        t = absorbed["tokens"]
        lines += [
            "",
            f"## Absorption, first letter ({t['words']:,} words)",
            "",
            f"Status: {t['status']}. {t['train_words']:,} words train the probes and "
            f"{t['test_words']:,} test them; prompts are {t['prompt_tokens']} tokens "
            f"({t['ground_truth_probe_tokens']:,} tokens for the ground-truth probe"
            f"{', cached' if t['ground_truth_probe_cached'] else ''}"
            + (
                f", {t['absorption_tokens']:,} for {t['absorption_prompts']:,} "
                "absorption prompts)."
                if "absorption_tokens" in t
                else ")."
            ),
            f"Letters whose ground-truth probe passes SAEBench's F1 gate: "
            f"{t['letters_passing_probe_gate']}/26. Probed activations: "
            f"{t['activation_space']} (the SAE's input space).",
        ]
        if absorbed["metrics"]:
            mean = absorbed["metrics"]["mean"]
            lines += ["", "| metric | value |", "| --- | --- |"]
            lines += [f"| {k} | {v:.4g} |" for k, v in mean.items()]
            lines += ["", f"JSON: `{absorbed['path']}`."]
    lines += ["", "## Wall time", ""]
    lines += [f"- {k.removesuffix('_s')}: {v:.0f} s" for k, v in timings.items()]
    return "\n".join(lines) + "\n"
