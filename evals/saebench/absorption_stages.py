"""SAEBench's absorption stages, each called as ``absorption.main.run_eval`` calls it.

The ground-truth probe, the k-sparse probing, the feature-absorption calculator (with
the sampled word list as in-context examples) and the assembly of SAEBench's
``AbsorptionEvalOutput``; :func:`run_stages` runs the first three in order with the
forward passes stopped after the probed layer (:func:`stop_after_layer`), for
:func:`sae_gba_evals.saebench.absorption.run_absorption`.
"""

from __future__ import annotations

import contextlib
import random
import statistics
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from sae_gba_evals.saebench.common import RELEASE, saebench_version

if TYPE_CHECKING:
    from sae_lens import SAE
    from transformer_lens import HookedTransformer


def train_ground_truth_probe(
    model: HookedTransformer,
    layer: int,
    words: list[str],
    config: Any,
    probes_dir: Path,
) -> None:
    """SAEBench's ``train_and_save_probes`` for one layer, on ``words``."""
    from sae_bench.evals.absorption.common import create_and_train_probe
    from sae_bench.evals.absorption.prompting import first_letter_formatter

    create_and_train_probe(
        model=model,
        formatter=first_letter_formatter(),
        hook_point=f"blocks.{layer}.hook_resid_post",
        probes_dir=probes_dir,
        vocab=words,
        batch_size=64,  # train_and_save_probes's defaults
        num_epochs=50,
        lr=1e-2,
        device=torch.device(model.cfg.device),
        base_template=config.prompt_template,
        pos_idx=config.prompt_token_pos,
    )


def k_sparse_probing(
    model: HookedTransformer,
    sae: SAE[Any],
    name: str,
    config: Any,
    out_dir: Path,
    probes_dir: Path,
) -> Any:
    """SAEBench's k-sparse probing stage; its table is also written as JSON."""
    from sae_bench.evals.absorption.k_sparse_probing import (
        run_k_sparse_probing_experiment,
    )

    table = run_k_sparse_probing_experiment(
        model=model,
        sae=sae,
        layer=sae.cfg.hook_layer,
        sae_name=name,
        force=True,
        max_k_value=config.max_k_value,
        f1_jump_threshold=config.f1_jump_threshold,
        prompt_template=config.prompt_template,
        prompt_token_pos=config.prompt_token_pos,
        device=str(sae.device),
        experiment_dir=out_dir / "artifacts" / "k_sparse_probing",
        probes_dir=probes_dir,
        k_sparse_probe_l1_decay=config.k_sparse_probe_l1_decay,
        k_sparse_probe_batch_size=config.k_sparse_probe_batch_size,
        k_sparse_probe_num_epochs=config.k_sparse_probe_num_epochs,
        eval_batch_size=config.eval_k_sparse_probe_batch_size,
        precalc_k_sparse_probe_sae_acts=config.precalc_k_sparse_probe_sae_acts,
        verbose=False,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    table.to_json(out_dir / f"{name}_k_sparse_probing.json", orient="records", indent=4)
    return table


def feature_absorption(
    model: HookedTransformer,
    sae: SAE[Any],
    name: str,
    config: Any,
    words: list[str],
    out_dir: Path,
    probes_dir: Path,
) -> Any:
    """``run_feature_absortion_experiment`` with ``words`` as the in-context examples.

    SAEBench draws the examples from the whole tokenizer vocabulary, where a few words
    tokenize differently in context and make its prompt-length check raise.
    """
    from sae_bench.evals.absorption import feature_absorption as fa
    from sae_bench.evals.absorption import k_sparse_probing as ks
    from sae_bench.evals.absorption.common import load_experiment_df
    from sae_bench.evals.absorption.prompting import first_letter_formatter

    calculator = fa.FeatureAbsorptionCalculator(
        model=model,
        icl_word_list=words,
        max_icl_examples=10,
        base_template=config.prompt_template,
        answer_formatter=first_letter_formatter(),
        word_token_pos=config.prompt_token_pos,
        full_absorption_probe_cos_sim_threshold=fa.FULL_ABSORPTION_PROBE_COS_THRESHOLD,
        absorption_fraction_probe_cos_sim_threshold=fa.ABSORPTION_FRACTION_PROBE_COS_THRESHOLD,
        probe_projection_proportion_threshold=fa.ABSORPTION_PROBE_PROJECTION_PROPORTION_THRESHOLD,
        absorption_fraction_max_absorbing_latents=fa.ABSORPTION_FRACTION_MAX_ABSORBING_LATENTS,
        batch_size=config.llm_batch_size,
    )
    layer = sae.cfg.hook_layer
    sparse_dir = out_dir / "artifacts" / "k_sparse_probing" / name
    metrics = load_experiment_df(
        ks.SPARSE_PROBING_EXPERIMENT_NAME,
        sparse_dir / ks.get_sparse_probing_metrics_filename(name, layer),
    )
    ks.add_feature_splits_to_metrics_df(
        metrics,
        max_k_value=config.max_k_value,
        f1_jump_threshold=config.f1_jump_threshold,
    )
    return fa.load_and_run_calculate_projections_and_cos_sims(
        model,
        sae,
        calculator,
        metrics,
        sae_name=name,
        layer=layer,
        probes_dir=probes_dir,
        sparse_probing_task_output_dir=sparse_dir,
        device=str(sae.device),
    )


def absorption_output(
    config: Any, raw: Any, k_sparse: Any, sae: SAE[Any], sae_name: str
) -> Any:
    """``AbsorptionEvalOutput`` for one SAE, as ``absorption.main.run_eval`` builds it."""
    from sae_bench.evals.absorption import main as absorption
    from sae_bench.evals.absorption.eval_output import (
        EVAL_TYPE_ID_ABSORPTION,
        AbsorptionEvalOutput,
        AbsorptionMeanMetrics,
        AbsorptionMetricCategories,
        AbsorptionResultDetail,
    )
    from sae_bench.sae_bench_utils import get_eval_uuid

    fractions, full_rates, splits, details = [], [], [], []
    for _, row in absorption._aggregate_results_df(raw).iterrows():
        f1 = k_sparse[k_sparse["letter"] == row["letter"]]["f1_probe"].item()
        if f1 <= config.min_GT_probe_f1:
            continue
        fractions.append(row["mean_absorption_fraction"])
        full_rates.append(row["full_absorption_rate"])
        splits.append(row["num_split_feats"])
        details.append(
            AbsorptionResultDetail(
                first_letter=row["letter"],
                mean_absorption_fraction=row["mean_absorption_fraction"],
                full_absorption_rate=row["full_absorption_rate"],
                num_full_absorption=row["num_full_absorption"],
                num_probe_true_positives=row["num_probe_true_positives"],
                num_split_features=row["num_split_feats"],
            )
        )
    return AbsorptionEvalOutput(
        eval_type_id=EVAL_TYPE_ID_ABSORPTION,
        eval_config=config,
        eval_id=get_eval_uuid(),
        datetime_epoch_millis=int(datetime.now().timestamp() * 1000),
        eval_result_metrics=AbsorptionMetricCategories(
            mean=AbsorptionMeanMetrics(
                mean_absorption_fraction_score=statistics.mean(fractions),
                mean_full_absorption_score=statistics.mean(full_rates),
                mean_num_split_features=statistics.mean(splits),
                std_dev_absorption_fraction_score=statistics.stdev(fractions),
                std_dev_full_absorption_score=statistics.stdev(full_rates),
                std_dev_num_split_features=statistics.stdev(splits),
            )
        ),
        eval_result_details=details,
        sae_bench_commit_hash=saebench_version(),
        sae_lens_id=sae_name,
        sae_lens_release_id=RELEASE,
        sae_lens_version=version("sae_lens"),
        sae_cfg_dict=sae.cfg.to_dict(),
    )


@contextlib.contextmanager
def stop_after_layer(
    model: HookedTransformer,
    layer: int,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Iterator[None]:
    """Make ``model.run_with_cache`` stop after block ``layer`` (same activations there).

    SAEBench's absorption stages read only ``blocks.{layer}.hook_resid_post`` but run
    the whole model, unembedding included; this skips the rest. ``transform``, if
    given, is applied to that cached activation (see :func:`sae_input_space`).
    """
    hook = f"blocks.{layer}.hook_resid_post"

    def run_with_cache(*args: Any, **kwargs: Any) -> Any:
        kwargs["stop_at_layer"] = layer + 1
        out, cache = type(model).run_with_cache(model, *args, **kwargs)
        if transform is not None and hook in cache.cache_dict:
            cache.cache_dict[hook] = transform(cache.cache_dict[hook])
        return out, cache

    model.run_with_cache = run_with_cache
    try:
        yield
    finally:
        del model.run_with_cache


def run_stages(
    model: HookedTransformer,
    sae: SAE[Any],
    name: str,
    words: list[str],
    config: Any,
    dirs: tuple[Path, Path],
    cached: bool,
    transform: Callable[[torch.Tensor], torch.Tensor] | None,
) -> tuple[Any, Any, dict[str, float]]:
    """The ground-truth probe (unless cached), k-sparse probing and absorption.

    Each stage starts from the same seeding, whether or not a probe was trained, so
    every SAE sees the same random draws. The absorption stage runs only when enough
    letters pass the probe gate (else its result is None).

    Returns:
        The k-sparse probing table, the raw absorption results and stage timings.
    """
    out_dir, probes_dir = dirs
    layer = sae.cfg.hook_layer
    timings: dict[str, float] = {}
    seed_everything(config.random_seed)
    with torch.enable_grad():
        start = time.perf_counter()
        with stop_after_layer(model, layer):
            if not cached:
                train_ground_truth_probe(model, layer, words, config, probes_dir)
            timings["ground_truth_probe_s"] = time.perf_counter() - start
            start = time.perf_counter()
            seed_everything(config.random_seed)
            k_sparse = k_sparse_probing(model, sae, name, config, out_dir, probes_dir)
        timings["k_sparse_probing_s"] = time.perf_counter() - start
        passing = int((k_sparse["f1_probe"] > config.min_GT_probe_f1).sum())
        if passing < config.min_feats_for_eval:
            return k_sparse, None, timings
        start = time.perf_counter()
        seed_everything(config.random_seed)
        with stop_after_layer(model, layer, transform):
            raw = feature_absorption(
                model, sae, name, config, words, out_dir, probes_dir
            )
        timings["feature_absorption_s"] = time.perf_counter() - start
    return k_sparse, raw, timings


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
