"""SAEBench 0.6's first-letter absorption eval with an injected model.

The stages are SAEBench's own: ``common.create_and_train_probe`` (ground-truth
probes), ``run_k_sparse_probing_experiment`` and ``FeatureAbsorptionCalculator``; the
output is assembled as ``absorption.main.run_eval`` does for one SAE. What differs is
only how they are fed: the model is given (SAEBench loads it by name), the vocabulary
is :func:`first_letter_words` (sorted, sampled, prompt-safe), and the forward passes
stop after the probed layer (:func:`stop_after_layer`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sae_gba_evals.saebench.absorption_stages import (  # noqa: F401 (public name)
    absorption_output,
    run_stages,
    stop_after_layer,
)
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
    from sae_lens import SAE
    from transformer_lens import HookedTransformer

# SAE activations for the k-sparse probes are precomputed when they fit in this.
PRECALC_BYTES = 4 * 2**30


@functools.lru_cache(maxsize=2)
def _alpha_words(tokenizer: Any) -> tuple[str, ...]:
    from sae_bench.evals.absorption.vocab import get_alpha_tokens

    return tuple(sorted(set(get_alpha_tokens(tokenizer))))


def first_letter_words(
    tokenizer: Any,
    n_words: int | None = None,
    seed: int = 42,
    template: str = "{word} has the first letter:",
    token_pos: int = -6,
) -> list[str]:
    """SAEBench's letter-only vocabulary words, sorted, sampled and prompt-safe.

    ``tokenizer.vocab`` order differs between processes, so the words are sorted
    before any seeded step. A sample keeps each first letter's share (at least 20
    words of each where the vocabulary has them). Words that do not stay one token
    inside the prompt are dropped.

    Args:
        tokenizer: a Hugging Face tokenizer.
        n_words: sample size; None keeps every word.
        seed: sampling seed.
        template: SAEBench's prompt template.
        token_pos: SAEBench's position of the word in the prompt (checked).
    """
    prefix, suffix = template.split("{word}")
    encode = functools.partial(tokenizer, add_special_tokens=False)
    head = encode("\n" + prefix)["input_ids"]
    tail = encode(suffix)["input_ids"]
    if -(len(tail) + 1) != token_pos:
        raise EvalError(
            f"the word sits at position {-(len(tail) + 1)} of the prompt with this "
            f"tokenizer, not {token_pos}; set prompt_token_pos accordingly"
        )
    words = list(_alpha_words(tokenizer))
    if n_words is not None and n_words < len(words):
        by_letter: dict[str, list[str]] = {}
        for word in words:
            by_letter.setdefault(word.strip()[0].lower(), []).append(word)
        rng = random.Random(seed)
        share = n_words / len(words)
        words = sorted(
            w
            for group in by_letter.values()
            for w in rng.sample(
                group, min(len(group), max(20, round(share * len(group))))
            )
        )
    encoded = encode(["\n" + prefix + w + suffix for w in words])["input_ids"]
    return [
        w
        for w, ids in zip(words, encoded, strict=True)
        if len(ids) == len(head) + 1 + len(tail)
        and ids[: len(head)] == head
        and ids[len(head) + 1 :] == tail
    ]


def sae_input_space(sae: SAE[Any]) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The SAE's per-token input normalisation as a pure function (None if it has none).

    SAEBench's absorption calculator compares latent activations times decoder
    directions with probe projections of the raw activation, which assumes the decoder
    maps latents linearly into the activation space. With SAELens's run-time
    normalisation (``constant_norm_rescale``, ``layer_norm``) it maps into the
    normalised space, so the calculator's activations are normalised first; the SAE's
    own normalisation is then the identity on them. The ground-truth probe and the
    k-sparse probes keep SAEBench's raw activations (the SAE normalises what it
    encodes): a probe trained on per-token normalised activations of Gemma-3-270M
    layer 9 passed the F1 gate for 11 letters where the raw one passed 18 (4,000 words).
    """
    kind = sae.cfg.normalize_activations
    if kind == "constant_norm_rescale":
        return lambda x: x * (sae.cfg.d_in**0.5 / x.norm(dim=-1, keepdim=True))
    if kind == "layer_norm":

        def layer_norm(x: torch.Tensor) -> torch.Tensor:
            x = x - x.mean(dim=-1, keepdim=True)
            return x / (x.std(dim=-1, keepdim=True) + 1e-5)

        return layer_norm
    return None


def _probe_dir(
    model: HookedTransformer, layer: int, words: list[str], config: Any
) -> Path:
    from sae_gba.embedded import cache_dir

    fingerprint = float(model.W_E[:16].double().sum())
    key = json.dumps(
        [
            model.cfg.model_name,
            model.cfg.n_layers,
            model.cfg.d_model,
            str(model.cfg.dtype),
            fingerprint,
            layer,
            config.prompt_template,
            config.prompt_token_pos,
            config.random_seed,
            saebench_version(),
            words,
        ]
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return (
        cache_dir()
        / "saebench_probes"
        / f"{model.cfg.model_name}-layer{layer}-{digest}"
    )


def run_absorption(
    sae: SAE[Any],
    model: HookedTransformer,
    out_dir: str | Path,
    *,
    settings: EvalSettings | None = None,
    sae_name: str = "sae",
    probes_dir: str | Path | None = None,
    precalc: bool | None = None,
    **config_fields: Any,
) -> dict[str, Any]:
    """SAEBench's first-letter absorption eval of ``sae``; writes its result JSON.

    As in SAEBench, when fewer than ``min_feats_for_eval`` letters have a ground-truth
    probe with F1 above ``min_GT_probe_f1``, no result is written and the returned
    status says so.

    Args:
        sae: a SAELens SAE prepared by ``sae_gba_evals.saebench.prepare_sae``.
        model: the model, with a tokenizer, in the dtype to run (recorded).
        out_dir: folder for the JSON files and SAEBench's working files.
        settings: word sample, batch size, seed (None: the defaults).
        sae_name: the SAE's name in SAEBench's output.
        probes_dir: where ground-truth probes are kept; None means a cache folder
            keyed by model, layer, dtype and word list.
        precalc: precompute SAE activations for the k-sparse probes; None decides
            by memory (at most :data:`PRECALC_BYTES`).
        **config_fields: further ``AbsorptionEvalConfig`` fields (thresholds, gates).

    Returns:
        The JSON path (None when not evaluated), SAEBench's mean metrics, the word
        and token counts with the status, and the stage timings.
    """
    settings = settings or EvalSettings()
    layer = _resid_post_layer(sae)
    sae = sae.to(dtype=model.cfg.dtype)
    config, words = _config_and_words(model, sae, settings, precalc, config_fields)
    transform = sae_input_space(sae)
    space = sae.cfg.normalize_activations if transform else "raw"
    probes_dir = Path(probes_dir or _probe_dir(model, layer, words, config))
    out_dir = Path(out_dir)
    cached = (
        probes_dir / model.cfg.model_name / f"layer_{layer}" / "probe.pth"
    ).exists()
    k_sparse, raw, timings = run_stages(
        model,
        sae,
        f"{RELEASE}_{sae_name}",
        words,
        config,
        (out_dir, probes_dir),
        cached,
        transform,
    )
    info = _run_info(model, words, config, k_sparse, (probes_dir, cached), space)
    if raw is None:
        passing = info["letters_passing_probe_gate"]
        info["status"] = (
            f"not evaluated: {passing} letters have a ground-truth probe with F1 > "
            f"{config.min_GT_probe_f1}, SAEBench needs {config.min_feats_for_eval}"
        )
        return {"path": None, "metrics": None, "tokens": info, "timings": timings}
    info["absorption_prompts"] = len(raw)
    info["absorption_tokens"] = len(raw) * info["prompt_tokens"]
    info["status"] = "evaluated"
    output = absorption_output(config, raw, k_sparse, sae, sae_name)
    path = result_path(out_dir, sae_name)
    output.to_json_file(str(path), indent=2)
    add_provenance(path, {**info, "timings": timings})
    return {
        "path": str(path),
        "metrics": asdict(output.eval_result_metrics),
        "tokens": info,
        "timings": timings,
    }


def _resid_post_layer(sae: SAE[Any]) -> int:
    """The SAE's layer; absorption probes the residual stream after it."""
    layer = sae.cfg.hook_layer
    if sae.cfg.hook_name != f"blocks.{layer}.hook_resid_post":
        raise EvalError(
            f"absorption probes blocks.{layer}.hook_resid_post; this SAE reads "
            f"{sae.cfg.hook_name}"
        )
    return layer


def _run_info(
    model: HookedTransformer,
    words: list[str],
    config: Any,
    k_sparse: Any,
    probes: tuple[Path, bool],
    space: str,
) -> dict[str, Any]:
    """Word, prompt and token counts, where the probes are and which letters pass
    SAEBench's ground-truth probe gate."""
    probes_dir, cached = probes
    n_train = int(len(words) * 0.8)  # create_dataset_probe_training's split
    passing = int((k_sparse["f1_probe"] > config.min_GT_probe_f1).sum())
    prompt_tokens = len(model.to_tokens(_example_prompt(words, config))[0])
    return {
        "words": len(words),
        "train_words": n_train,
        "test_words": len(words) - n_train,
        "prompt_tokens": prompt_tokens,
        "ground_truth_probe_tokens": len(words) * prompt_tokens,
        "ground_truth_probe_cached": cached,
        "activation_space": space,
        "probes_dir": str(probes_dir),
        "letters_passing_probe_gate": passing,
        "ground_truth_probe_f1": dict(
            zip(k_sparse["letter"], k_sparse["f1_probe"], strict=True)
        ),
    }


def _config_and_words(
    model: HookedTransformer,
    sae: SAE[Any],
    settings: EvalSettings,
    precalc: bool | None,
    config_fields: dict[str, Any],
) -> tuple[Any, list[str]]:
    """SAEBench's ``AbsorptionEvalConfig`` for this run and its word sample."""
    from sae_bench.evals.absorption.eval_config import AbsorptionEvalConfig

    config = AbsorptionEvalConfig(
        model_name=model.cfg.model_name,
        random_seed=settings.seed,
        llm_batch_size=settings.absorption_llm_batch_size,
        llm_dtype=dtype_name(model),
        **config_fields,
    )
    words = first_letter_words(
        model.tokenizer,
        settings.absorption_words,
        settings.seed,
        config.prompt_template,
        config.prompt_token_pos,
    )
    if precalc is None:
        n_train = int(len(words) * 0.8)  # create_dataset_probe_training's split
        precalc = n_train * sae.cfg.d_sae * sae.W_enc.element_size() <= PRECALC_BYTES
    config.precalc_k_sparse_probe_sae_acts = precalc
    return config, words


def _example_prompt(words: list[str], config: Any) -> str:
    from sae_bench.evals.absorption.prompting import create_icl_prompt

    return create_icl_prompt(
        words[0],
        examples=words,
        base_template=config.prompt_template,
        max_icl_examples=10,
        prepend_separator_to_first_example=True,
    ).base
