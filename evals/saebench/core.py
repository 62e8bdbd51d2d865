"""SAEBench 0.6's core eval of one SAE on given token windows.

Every metric is SAEBench's own code (``sae_bench.evals.core.main.run_evals``: both
explained-variance definitions, MSE, cosine, L0/L1, shrinkage, CE and KL scores,
per-latent densities and with them ``frac_alive``); only the model and the windows
are injected. BOS/EOS/PAD positions are excluded from every metric and left
unreconstructed, as in SAEBench's published runs.
"""

from __future__ import annotations

import math
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sae_gba.lm.windows import special_token_ids
from sae_gba_evals.saebench.common import (
    RELEASE,
    EvalError,
    EvalSettings,
    add_provenance,
    dtype_name,
    result_path,
    saebench_version,
)

if TYPE_CHECKING:
    import datasets
    from sae_lens import SAE
    from transformer_lens import HookedTransformer


def core_windows(tokens: datasets.Dataset, settings: EvalSettings) -> datasets.Dataset:
    """The windows :func:`run_core` reads: a seeded sample of ``settings.n_tokens``.

    Args:
        tokens: equal-length windows in a "tokens" column.
        settings: ``n_tokens`` (None: every window) and ``seed``.
    """
    n_windows = len(tokens)
    if n_windows and settings.n_tokens is not None:
        context = len(tokens[0]["tokens"])
        n_windows = min(n_windows, math.ceil(settings.n_tokens / context))
    if n_windows < 1:
        raise EvalError("no token windows to evaluate on")
    return tokens.shuffle(seed=settings.seed).select(range(n_windows))


def run_core(
    sae: SAE[Any],
    model: HookedTransformer,
    tokens: datasets.Dataset,
    out_dir: str | Path,
    *,
    settings: EvalSettings | None = None,
    sae_name: str = "sae",
    data_label: str = "in-memory tokens",
    progress: bool = True,
) -> dict[str, Any]:
    """SAEBench's core eval of ``sae`` on ``tokens``; writes SAEBench's result JSON.

    One ``run_evals`` call reads the CE/KL windows first, then every sparsity window
    exactly once (the batch size divides the window count, and the activation store
    wraps around), so L0, explained variance and ``frac_alive`` cover all of them.

    Args:
        sae: a SAELens SAE prepared by :func:`prepare_sae`.
        model: the model its hook belongs to.
        tokens: equal-length windows in a "tokens" column (BOS first).
        out_dir: folder for ``sae_gba_<sae_name>_eval_results.json``.
        settings: token counts and batch size (None: the defaults).
        sae_name: the SAE's name in SAEBench's output.
        data_label: what the tokens are, recorded in the output.
        progress: show SAEBench's bars over the reconstruction and the sparsity
            batches.

    Returns:
        SAEBench's metrics by category, the JSON path and the token counts.
    """
    from sae_bench.evals.core import main as core
    from sae_lens.training.activations_store import ActivationsStore

    settings = settings or EvalSettings()
    tokens = core_windows(tokens, settings)
    context, n_windows = len(tokens[0]["tokens"]), len(tokens)
    batch = _largest_divisor_at_most(n_windows, settings.batch_size_prompts)
    n_recon_windows = min(n_windows, math.ceil(settings.n_recon_tokens / context))
    n_recon_batches = max(1, math.ceil(n_recon_windows / batch))
    ignore = set(special_token_ids(model.tokenizer))
    windows = torch.tensor(tokens["tokens"])
    text_tokens = int((~torch.isin(windows, torch.tensor(sorted(ignore)))).sum())
    config = _core_config(
        model, data_label, context, batch, n_recon_batches, n_windows // batch
    )
    store = ActivationsStore.from_sae(
        model,
        sae,
        dataset=tokens,
        context_size=context,
        total_tokens=n_windows,
        device=str(sae.device),
    )
    scalar, per_latent = core.run_evals(
        sae, store, model, eval_config=config, ignore_tokens=ignore, verbose=progress
    )
    scalar["misc_metrics"] = core.calculate_misc_metrics(per_latent)
    result = core.replace_nans_with_negative_one(
        {
            "sae_set": RELEASE,
            "sae_id": sae_name,
            "eval_cfg": config,
            "metrics": scalar,
            "feature_metrics": per_latent,
        }
    )
    path = _save_result(result, sae, Path(out_dir), sae_name)
    info = {
        "data": data_label,
        "held_out_windows": n_windows,
        "context_size": context,
        "sparsity_variance_tokens": n_windows * context,
        "sparsity_variance_tokens_without_special": text_tokens,
        "reconstruction_tokens": n_recon_batches * batch * context,
        "excluded_token_ids": sorted(ignore),
        "sae_decoder_unit_norm": _is_unit_norm(sae),
    }
    add_provenance(path, info)
    return {"path": str(path), "metrics": result["metrics"], "tokens": info}


def _save_result(
    result: dict[str, Any], sae: SAE[Any], out_dir: Path, sae_name: str
) -> Path:
    """Write SAEBench's core result file as its own runner does; returns its path."""
    from sae_bench.evals.core import main as core

    out_dir.mkdir(parents=True, exist_ok=True)
    path = result_path(out_dir, sae_name)
    core.save_single_eval_result(
        result,
        core.get_eval_uuid(),
        version("sae_lens"),
        saebench_version(),
        str(path),
        sae,
    )
    return path


def _core_config(
    model: HookedTransformer,
    data_label: str,
    context: int,
    batch: int,
    n_recon_batches: int,
    n_sparsity_batches: int,
) -> Any:
    """SAEBench's ``CoreEvalConfig`` with every metric on, as its own CLI runs it."""
    from sae_bench.evals.core.main import CoreEvalConfig

    return CoreEvalConfig(
        model_name=model.cfg.model_name,
        llm_dtype=dtype_name(model),
        batch_size_prompts=batch,
        n_eval_reconstruction_batches=n_recon_batches,
        n_eval_sparsity_variance_batches=n_sparsity_batches,
        dataset=data_label,
        context_size=context,
        compute_kl=True,
        compute_ce_loss=True,
        compute_l2_norms=True,
        compute_sparsity_metrics=True,
        compute_variance_metrics=True,
        compute_featurewise_density_statistics=True,
        compute_featurewise_weight_based_metrics=True,
        exclude_special_tokens_from_reconstruction=True,
    )


def _largest_divisor_at_most(n: int, cap: int) -> int:
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def _is_unit_norm(sae: SAE[Any]) -> bool:
    norms = sae.W_dec.detach().float().norm(dim=-1)
    return bool(torch.allclose(norms, torch.ones_like(norms), atol=1e-2))
