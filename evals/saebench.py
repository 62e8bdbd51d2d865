"""``sae-gba eval``: SAEBench 0.6's core and first-letter absorption evals, offline.

Every metric is SAEBench's own code: :func:`run_core` calls
``sae_bench.evals.core.main.run_evals`` (both explained-variance definitions, MSE,
cosine, L0/L1, shrinkage, CE and KL scores, per-latent densities and with them
``frac_alive``) and :func:`run_absorption` calls the absorption stages
(``create_and_train_probe``, ``run_k_sparse_probing_experiment``,
``FeatureAbsorptionCalculator``) and assembles ``AbsorptionEvalOutput`` as SAEBench's
``run_eval`` does. Only the model and the data are injected: SAEBench's top-level
entry points load both from the Hub by name. Each eval writes SAEBench's own result
JSON (``OUT/core/*.json``, ``OUT/absorption/*.json``) and :func:`evaluate` adds
``OUT/summary.md``. Every output states how many tokens it used (SAEBench's
``token_stats``, and ``eval_result_unstructured["sae_gba"]``).

Run::

    sae-gba eval runs/demo/sae --evals core,absorption --out runs/demo/eval

Held-out data. The core eval reads only held-out text: the articles of the embedded
Wikipedia slice that ``sae_gba.embedded`` keeps out of training (split by article,
10%, seed 0), tokenized with the evaluated model's own tokenizer in BOS-first
128-token windows (about 36k tokens for Gemma-3). By default every held-out window is
used for the sparsity and variance pass, so L0, explained variance and the alive
fraction cover all held-out tokens (SAEBench's default of one 2,048-token batch
understates the alive fraction: a latent firing once in 10^4 tokens is missed most of
the time); ``--n-tokens`` caps it. CE and KL scores take three full forward passes
through the 262k-token vocabulary each, so they use a seeded random subset of the
windows (``--n-recon-tokens``). BOS/EOS/PAD positions are excluded from every metric
and left unreconstructed, as in SAEBench's published runs. ``--dataset-path`` takes
your own held-out set instead (a ``save_to_disk`` folder with "tokens", "input_ids" or
"text"); held-out then means whatever that set is.

Absorption needs a model that can spell and a real tokenizer; SAEBench recommends
LLMs of at least 1B parameters and SAEs of at least 16k latents, so on the embedded
Gemma-3-270M with a 4,096-latent SAE the numbers are indicative. To make it practical
on CPUs the forward passes stop after the probed layer (identical activations), the
model runs in bfloat16 (SAEBench's own choice for Gemma), SAE activations are
precomputed for the k-sparse probes when they fit in 4 GiB, and the ground-truth
probes use a seeded sample of 40,000 letter-only vocabulary words (``--absorption-words
0`` takes the whole vocabulary, as SAEBench does). Words that tokenize differently
inside the prompt are dropped (SAEBench would otherwise raise). The ground-truth
probes are cached per model, layer, dtype and word list under
``~/.cache/sae_gba/saebench_probes`` and reused by later SAEs on the same layer.

Gemma-2-2B (the paper's setup: layer 12 residual stream, 65,536 latents, L0 about
300). An SAE whose cfg names ``google/gemma-2-2b`` gets the ``gemma-2-2b`` eval preset
(bfloat16 model, SAEBench's 20,480 reconstruction tokens, 16-window batches, the whole
vocabulary for absorption)::

    sae-gba eval runs/gemma2/sae --out runs/gemma2/eval --device cuda \\
        --model-path /models/gemma-2-2b [--dataset-path /data/pile-held-out]

``--model-path`` is a local Hugging Face folder (config, weights, tokenizer); without
it TransformerLens loads the model from the Hub or the HF cache. Expected resources:
one GPU with 24 GB or more (SAEBench measured a 24 GB peak for absorption on
Gemma-2-2B; the bfloat16 model is 5.2 GB, the SAE 1.2 GB in float32, and one
16-window CE/KL batch holds about 1 GB per 256k-vocabulary logits tensor), 32 GB of
host memory, and on one A100/H100-class GPU roughly a minute for the core eval on the
held-out slice, about 30 minutes for the ground-truth probes of a layer (once) plus
about 10 minutes per SAE for absorption (SAEBench's own estimates). On CPUs it is not
practical (hours for the core eval's CE/KL alone). For the alive fraction use at least
10^6 held-out tokens of the SAE's training distribution (``--dataset-path``): the
Wikipedia slice is 36k tokens, too few to see latents firing once in 10^5 tokens.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import random
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    import datasets
    from sae_lens import SAE
    from transformer_lens import HookedTransformer

EVAL_TYPES = ("core", "absorption")
RELEASE = "sae_gba"
# SAE latents with elementwise encoders: folding decoder norms keeps their function.
_FOLDABLE = ("standard", "jumprelu", "gated")
_PRECALC_BYTES = 4 * 2**30


class EvalError(ValueError):
    """An SAE folder, model, data or option that cannot be evaluated as asked."""


@dataclass(frozen=True)
class EvalSettings:
    """How much data and which dtypes an eval uses.

    Args:
        n_tokens: held-out tokens for sparsity, variance and alive fraction; None
            means every held-out window.
        n_recon_tokens: held-out tokens for the CE and KL scores.
        context_size: tokens per window, BOS included.
        batch_size_prompts: windows per forward pass, at most (the largest divisor
            of the window count not above it is used, so every window is read once).
        llm_dtype: model dtype for the core eval.
        absorption_dtype: model dtype for absorption.
        absorption_words: letter-only vocabulary words for the absorption probes;
            None means all of them.
        absorption_llm_batch_size: prompts per forward pass in absorption.
        seed: seed of the window order, the word sample and the probe splits.
    """

    n_tokens: int | None = None
    n_recon_tokens: int = 8_192
    context_size: int = 128
    batch_size_prompts: int = 4
    llm_dtype: str = "float32"
    absorption_dtype: str = "bfloat16"
    absorption_words: int | None = 40_000
    absorption_llm_batch_size: int = 32
    seed: int = 42


EVAL_PRESETS: dict[str, EvalSettings] = {
    "embedded": EvalSettings(),
    "gemma-2-2b": EvalSettings(
        n_recon_tokens=20_480,
        batch_size_prompts=16,
        llm_dtype="bfloat16",
        absorption_words=None,
    ),
}


def preset_for(model_name: str) -> str:
    """The eval preset for an SAE's model: "gemma-2-2b" for Gemma-2, else "embedded"."""
    return "gemma-2-2b" if "gemma-2-" in model_name else "embedded"


def prepare_sae(sae: SAE[Any], device: str, dtype: str) -> SAE[Any]:
    """SAEBench's SAE preparation: its cfg fields, unit-norm decoder rows, dtype.

    ``general_utils.load_and_format_sae`` fills in ``hook_layer`` and friends. Decoder
    norms are folded into the encoder (as SAEBench does for pretrained SAEs) when that
    keeps the SAE's function, so absorption's probe projections are in the units it
    assumes; TopK-style encoders are left as they are.
    """
    from sae_bench.sae_bench_utils import general_utils

    _, sae, _ = general_utils.load_and_format_sae(RELEASE, sae, device)
    norms = sae.W_dec.detach().norm(dim=-1)
    if sae.cfg.architecture_str in _FOLDABLE and not torch.allclose(
        norms, torch.ones_like(norms), atol=1e-5
    ):
        with contextlib.suppress(NotImplementedError):
            sae.fold_W_dec_norm()
    return sae.to(device=device, dtype=general_utils.str_to_dtype(dtype))


def load_model_for_sae(
    sae_cfg: dict[str, Any],
    model_path: str | None = None,
    device: str = "cpu",
    dtype: str = "float32",
) -> HookedTransformer:
    """Load the model an SAE folder's cfg names, offline where the weights are local.

    Args:
        sae_cfg: the SAE's ``cfg.json`` (``metadata.model_name``, ``d_in``).
        model_path: a local Hugging Face folder; None loads the embedded Gemma-3-270M
            for its name and otherwise asks TransformerLens (Hub or HF cache).
        device: torch device.
        dtype: model dtype name ("float32", "bfloat16", ...).
    """
    from sae_bench.sae_bench_utils.general_utils import str_to_dtype
    from transformer_lens import HookedTransformer

    from sae_gba.embedded import EMBEDDED_MODEL_NAME, load_embedded_model
    from sae_gba.presets import load_gemma2_folder

    meta = sae_cfg.get("metadata", {})
    name = meta.get("model_name") or sae_cfg.get("model_name")
    if not name:
        raise EvalError("the SAE's cfg.json names no model (metadata.model_name)")
    torch_dtype = str_to_dtype(dtype)
    kwargs = meta.get("model_from_pretrained_kwargs") or {}
    if model_path is None:
        if name == EMBEDDED_MODEL_NAME:
            return load_embedded_model(device=device, dtype=torch_dtype)
        return HookedTransformer.from_pretrained_no_processing(
            name, device=device, dtype=torch_dtype, **kwargs
        )
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = Path(model_path)
    if not (folder / "config.json").is_file():
        raise EvalError(
            f"--model-path {folder} is not a Hugging Face model folder (no config.json)"
        )
    if AutoConfig.from_pretrained(folder).model_type == "gemma2":
        return load_gemma2_folder(
            folder, sae_cfg["d_in"], device=device, dtype=torch_dtype
        )
    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return HookedTransformer.from_pretrained_no_processing(
        name,
        hf_model=hf_model,
        tokenizer=AutoTokenizer.from_pretrained(folder),
        device=device,
        dtype=torch_dtype,
        **kwargs,
    )


def held_out_tokens(
    model: HookedTransformer, context_size: int = 128, dataset_path: str | None = None
) -> tuple[datasets.Dataset, str]:
    """Held-out token windows for ``model`` and a label saying what they are.

    Args:
        model: the evaluated model (its tokenizer tokenizes the text).
        context_size: tokens per window, BOS first.
        dataset_path: a ``save_to_disk`` folder to read instead of the held-out
            Wikipedia articles.

    Returns:
        A dataset with a "tokens" column of equal-length windows, and its label.
    """
    import datasets

    from sae_gba import embedded
    from sae_gba.presets import load_local_dataset

    tokenizer = model.tokenizer
    if dataset_path is not None:
        data = load_local_dataset(dataset_path)
        label = f"local dataset {dataset_path}"
        if "text" not in data.column_names:
            column = "tokens" if "tokens" in data.column_names else "input_ids"
            rows = [row[:context_size] for row in data[column]]
            if any(len(row) < context_size for row in rows):
                raise EvalError(
                    f"{dataset_path}: rows must hold at least {context_size} tokens"
                )
            return datasets.Dataset.from_dict({"tokens": rows}), label
        texts, source = list(data["text"]), label
    elif model.cfg.model_name == embedded.EMBEDDED_MODEL_NAME.split("/")[-1]:
        data = embedded.embedded_token_dataset("held_out", context_size)
        return data, "sae_gba.embedded Wikipedia, held-out articles"
    else:
        articles = embedded.split_articles(embedded.wikipedia_articles(), 0.1)[1]
        texts = [a.text for a in articles]
        source = "sae_gba.embedded Wikipedia, held-out articles"
    if tokenizer is None:
        raise EvalError("the model has no tokenizer; pass token windows instead")
    windows = embedded.tokenize_windows(tokenizer, texts, context_size)
    return datasets.Dataset.from_dict({"tokens": windows.tolist()}), source


def _ignore_tokens(model: HookedTransformer) -> set[int | None]:
    tok = model.tokenizer
    if tok is None:
        return set()
    ids = {tok.pad_token_id, tok.eos_token_id, tok.bos_token_id}
    return {i for i in ids if i is not None}


def _largest_divisor_at_most(n: int, cap: int) -> int:
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def _result_path(out_dir: Path, sae_name: str) -> Path:
    from sae_bench.sae_bench_utils.general_utils import get_results_filepath

    return Path(get_results_filepath(str(out_dir), RELEASE, sae_name))


def _add_provenance(path: Path, info: dict[str, Any]) -> None:
    data = json.loads(path.read_text())
    data["eval_result_unstructured"] = {"sae_gba": info}
    path.write_text(json.dumps(data, indent=2))


def run_core(
    sae: SAE[Any],
    model: HookedTransformer,
    tokens: datasets.Dataset,
    out_dir: str | Path,
    *,
    settings: EvalSettings = EvalSettings(),
    sae_name: str = "sae",
    data_label: str = "in-memory tokens",
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
        settings: token counts and batch size.
        sae_name: the SAE's name in SAEBench's output.
        data_label: what the tokens are, recorded in the output.

    Returns:
        SAEBench's metrics by category, the JSON path and the token counts.
    """
    from sae_bench.evals.core import main as core
    from sae_lens.training.activations_store import ActivationsStore

    context = len(tokens[0]["tokens"])
    n_windows = len(tokens)
    if settings.n_tokens is not None:
        n_windows = min(n_windows, math.ceil(settings.n_tokens / context))
    if n_windows < 1:
        raise EvalError("no token windows to evaluate on")
    tokens = tokens.shuffle(seed=settings.seed).select(range(n_windows))
    batch = _largest_divisor_at_most(n_windows, settings.batch_size_prompts)
    n_recon_windows = min(n_windows, math.ceil(settings.n_recon_tokens / context))
    n_recon_batches = max(1, math.ceil(n_recon_windows / batch))
    ignore = _ignore_tokens(model)
    windows = torch.tensor(tokens["tokens"])
    text_tokens = int((~torch.isin(windows, torch.tensor(sorted(ignore)))).sum())
    config = core.CoreEvalConfig(
        model_name=model.cfg.model_name,
        llm_dtype=str(model.cfg.dtype).removeprefix("torch."),
        batch_size_prompts=batch,
        n_eval_reconstruction_batches=n_recon_batches,
        n_eval_sparsity_variance_batches=n_windows // batch,
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
    store = ActivationsStore.from_sae(
        model,
        sae,
        dataset=tokens,
        context_size=context,
        total_tokens=n_windows,
        device=str(sae.device),
    )
    scalar, per_latent = core.run_evals(
        sae, store, model, eval_config=config, ignore_tokens=ignore
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
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = _result_path(out_dir, sae_name)
    core.save_single_eval_result(
        result, core.get_eval_uuid(), version("sae_lens"), _saebench(), str(path), sae
    )
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
    _add_provenance(path, info)
    return {"path": str(path), "metrics": result["metrics"], "tokens": info}


def _is_unit_norm(sae: SAE[Any]) -> bool:
    norms = sae.W_dec.detach().float().norm(dim=-1)
    return bool(torch.allclose(norms, torch.ones_like(norms), atol=1e-2))


def _saebench() -> str:
    return f"sae_bench=={version('sae-bench')}"


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
    from sae_bench.evals.absorption.vocab import get_alpha_tokens

    words = sorted(set(get_alpha_tokens(tokenizer)))
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
    prefix, suffix = template.split("{word}")
    encode = functools.partial(tokenizer, add_special_tokens=False)
    head = encode("\n" + prefix)["input_ids"]
    tail = encode(suffix)["input_ids"]
    if -(len(tail) + 1) != token_pos:
        raise EvalError(
            f"the word sits at position {-(len(tail) + 1)} of the prompt with this "
            f"tokenizer, not {token_pos}; set prompt_token_pos accordingly"
        )
    encoded = encode(["\n" + prefix + w + suffix for w in words])["input_ids"]
    return [
        w
        for w, ids in zip(words, encoded, strict=True)
        if len(ids) == len(head) + 1 + len(tail)
        and ids[: len(head)] == head
        and ids[len(head) + 1 :] == tail
    ]


@contextlib.contextmanager
def stop_after_layer(model: HookedTransformer, layer: int) -> Iterator[None]:
    """Make ``model.run_with_cache`` stop after block ``layer`` (same activations there).

    SAEBench's absorption stages read only ``blocks.{layer}.hook_resid_post`` but run
    the whole model, unembedding included; this skips the rest.
    """
    run = type(model).run_with_cache
    model.run_with_cache = functools.partial(run, model, stop_at_layer=layer + 1)
    try:
        yield
    finally:
        del model.run_with_cache


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
            _saebench(),
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
    settings: EvalSettings = EvalSettings(),
    sae_name: str = "sae",
    probes_dir: str | Path | None = None,
    precalc: bool | None = None,
    **config_fields: Any,
) -> dict[str, Any]:
    """SAEBench's first-letter absorption eval of ``sae``; writes its result JSON.

    The stages and the output are SAEBench's (``absorption.main.run_eval`` for one
    SAE); the model is the one given (in its dtype) and the vocabulary is
    :func:`first_letter_words`. As in SAEBench, when fewer than ``min_feats_for_eval``
    letters have a ground-truth probe with F1 above ``min_GT_probe_f1`` nothing is
    written and the result says so.

    Args:
        sae: a SAELens SAE prepared by :func:`prepare_sae` (cast to the model dtype).
        model: the model, with a tokenizer.
        out_dir: folder for the JSON files and SAEBench's working files.
        settings: word sample, batch size, seed.
        sae_name: the SAE's name in SAEBench's output.
        probes_dir: where ground-truth probes are kept; None means the shared cache.
        precalc: precompute SAE activations for the k-sparse probes; None decides
            by memory (at most 4 GiB).
        **config_fields: further ``AbsorptionEvalConfig`` fields (thresholds, gates).
    """
    from sae_bench.evals.absorption import common
    from sae_bench.evals.absorption import main as absorption
    from sae_bench.evals.absorption.eval_config import AbsorptionEvalConfig
    from sae_bench.evals.absorption.k_sparse_probing import (
        run_k_sparse_probing_experiment,
    )
    from sae_bench.evals.absorption.prompting import first_letter_formatter

    layer = sae.cfg.hook_layer
    hook = f"blocks.{layer}.hook_resid_post"
    if sae.cfg.hook_name != hook:
        raise EvalError(f"absorption probes {hook}; this SAE reads {sae.cfg.hook_name}")
    dtype = str(model.cfg.dtype).removeprefix("torch.")
    sae = sae.to(dtype=model.cfg.dtype)
    config = AbsorptionEvalConfig(
        model_name=model.cfg.model_name,
        random_seed=settings.seed,
        llm_batch_size=settings.absorption_llm_batch_size,
        llm_dtype=dtype,
        **config_fields,
    )
    words = first_letter_words(
        model.tokenizer,
        settings.absorption_words,
        settings.seed,
        config.prompt_template,
        config.prompt_token_pos,
    )
    n_train = int(len(words) * 0.8)  # create_dataset_probe_training's split
    if precalc is None:
        precalc = n_train * sae.cfg.d_sae * sae.W_enc.element_size() <= _PRECALC_BYTES
    config.precalc_k_sparse_probe_sae_acts = precalc
    probes_dir = Path(probes_dir or _probe_dir(model, layer, words, config))
    out_dir = Path(out_dir)
    work = out_dir / "artifacts"
    device = str(sae.device)
    name = f"{RELEASE}_{sae_name}"
    probe_cached = (
        probes_dir / model.cfg.model_name / f"layer_{layer}" / "probe.pth"
    ).exists()
    timings: dict[str, float] = {}
    _seed_everything(settings.seed)
    with torch.enable_grad(), stop_after_layer(model, layer):
        start = time.perf_counter()
        if not probe_cached:
            common.create_and_train_probe(
                model=model,
                formatter=first_letter_formatter(),
                hook_point=hook,
                probes_dir=probes_dir,
                vocab=words,
                batch_size=64,  # train_and_save_probes's defaults
                num_epochs=50,
                lr=1e-2,
                device=torch.device(device),
                base_template=config.prompt_template,
                pos_idx=config.prompt_token_pos,
            )
        timings["ground_truth_probe_s"] = time.perf_counter() - start
        start = time.perf_counter()
        k_sparse = run_k_sparse_probing_experiment(
            model=model,
            sae=sae,
            layer=layer,
            sae_name=name,
            force=True,
            max_k_value=config.max_k_value,
            f1_jump_threshold=config.f1_jump_threshold,
            prompt_template=config.prompt_template,
            prompt_token_pos=config.prompt_token_pos,
            device=device,
            experiment_dir=work / "k_sparse_probing",
            probes_dir=probes_dir,
            k_sparse_probe_l1_decay=config.k_sparse_probe_l1_decay,
            k_sparse_probe_batch_size=config.k_sparse_probe_batch_size,
            k_sparse_probe_num_epochs=config.k_sparse_probe_num_epochs,
            eval_batch_size=config.eval_k_sparse_probe_batch_size,
            precalc_k_sparse_probe_sae_acts=precalc,
            verbose=False,
        )
        timings["k_sparse_probing_s"] = time.perf_counter() - start
        out_dir.mkdir(parents=True, exist_ok=True)
        k_sparse.to_json(
            out_dir / f"{name}_k_sparse_probing.json", orient="records", indent=4
        )
        good = k_sparse["f1_probe"] > config.min_GT_probe_f1
        prompt_tokens = len(model.to_tokens(_example_prompt(words, config))[0])
        info: dict[str, Any] = {
            "words": len(words),
            "train_words": n_train,
            "test_words": len(words) - n_train,
            "prompt_tokens": prompt_tokens,
            "ground_truth_probe_tokens": len(words) * prompt_tokens,
            "ground_truth_probe_cached": probe_cached,
            "probes_dir": str(probes_dir),
            "letters_passing_probe_gate": int(good.sum()),
            "ground_truth_probe_f1": dict(
                zip(k_sparse["letter"], k_sparse["f1_probe"], strict=True)
            ),
        }
        if good.sum() < config.min_feats_for_eval:
            info["status"] = (
                f"not evaluated: {int(good.sum())} letters have a ground-truth probe "
                f"with F1 > {config.min_GT_probe_f1}, SAEBench needs "
                f"{config.min_feats_for_eval}"
            )
            return {"path": None, "metrics": None, "tokens": info, "timings": timings}
        start = time.perf_counter()
        raw = _feature_absorption(
            model, sae, layer, name, config, words, work, probes_dir
        )
        timings["feature_absorption_s"] = time.perf_counter() - start
    info["absorption_prompts"] = len(raw)
    info["absorption_tokens"] = len(raw) * prompt_tokens
    output = _absorption_output(absorption, config, raw, k_sparse, sae, sae_name)
    path = _result_path(out_dir, sae_name)
    output.to_json_file(str(path), indent=2)
    info["status"] = "evaluated"
    _add_provenance(path, {**info, "timings": timings})
    return {
        "path": str(path),
        "metrics": asdict(output.eval_result_metrics),
        "tokens": info,
        "timings": timings,
    }


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _example_prompt(words: list[str], config: Any) -> str:
    from sae_bench.evals.absorption.prompting import create_icl_prompt

    return create_icl_prompt(
        words[0],
        examples=words,
        base_template=config.prompt_template,
        max_icl_examples=10,
        prepend_separator_to_first_example=True,
    ).base


def _feature_absorption(
    model: HookedTransformer,
    sae: SAE[Any],
    layer: int,
    name: str,
    config: Any,
    words: list[str],
    work: Path,
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
    sparse_dir = work / "k_sparse_probing" / name
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


def _absorption_output(
    absorption: Any, config: Any, raw: Any, k_sparse: Any, sae: SAE[Any], sae_name: str
) -> Any:
    """``AbsorptionEvalOutput`` for one SAE, as ``absorption.main.run_eval`` builds it."""
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
        sae_bench_commit_hash=_saebench(),
        sae_lens_id=sae_name,
        sae_lens_release_id=RELEASE,
        sae_lens_version=version("sae_lens"),
        sae_cfg_dict=sae.cfg.to_dict(),
    )


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
        **settings_fields: :class:`EvalSettings` fields overriding the preset's.
    """
    from sae_bench.sae_bench_utils.general_utils import str_to_dtype

    from sae_gba.loading import load_sae, read_sae_config

    unknown = sorted(set(evals) - set(EVAL_TYPES))
    if unknown or not evals:
        raise EvalError(f"evals must be among {list(EVAL_TYPES)}, got {list(evals)}")
    try:
        cfg = read_sae_config(sae_dir)
    except (FileNotFoundError, ValueError) as err:
        raise EvalError(str(err)) from err
    model_name = cfg.get("metadata", {}).get("model_name") or ""
    preset = preset or preset_for(model_name)
    if preset not in EVAL_PRESETS:
        raise EvalError(f"preset must be one of {sorted(EVAL_PRESETS)}, got {preset!r}")
    settings = replace(EVAL_PRESETS[preset], **settings_fields)
    out, sae_name = Path(out), Path(sae_dir).resolve().name
    timings: dict[str, float] = {}
    start = time.perf_counter()
    owns_model = model is None
    if model is None:
        model = load_model_for_sae(cfg, model_path, device, settings.llm_dtype)
    timings["model_load_s"] = time.perf_counter() - start
    results: dict[str, Any] = {}
    if "core" in evals:
        start = time.perf_counter()
        tokens, label = held_out_tokens(model, settings.context_size, dataset_path)
        sae = prepare_sae(load_sae(sae_dir, device), device, _dtype_name(model))
        results["core"] = run_core(
            sae,
            model,
            tokens,
            out / "core",
            settings=settings,
            sae_name=sae_name,
            data_label=label,
        )
        timings["core_s"] = time.perf_counter() - start
    if "absorption" in evals:
        start = time.perf_counter()
        if owns_model and _dtype_name(model) != settings.absorption_dtype:
            model = model.to(
                str_to_dtype(settings.absorption_dtype), print_details=False
            )
        sae = prepare_sae(load_sae(sae_dir, device), device, _dtype_name(model))
        results["absorption"] = run_absorption(
            sae, model, out / "absorption", settings=settings, sae_name=sae_name
        )
        timings["absorption_s"] = time.perf_counter() - start
    summary = out / "summary.md"
    summary.write_text(
        summary_markdown(sae_dir, cfg, preset, settings, results, timings)
    )
    return {
        "preset": preset,
        "settings": asdict(settings),
        "results": results,
        "timings": timings,
        "summary": str(summary),
    }


def _dtype_name(model: HookedTransformer) -> str:
    return str(model.cfg.dtype).removeprefix("torch.")


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
        f"- Model: {meta.get('model_name')}; {_saebench()}, "
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
            f"Published explained variance (the GBA paper's 0.902) is the legacy "
            f"definition. JSON: `{core['path']}`.",
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
            f"{t['letters_passing_probe_gate']}/26.",
        ]
        if absorbed["metrics"]:
            mean = absorbed["metrics"]["mean"]
            lines += ["", "| metric | value |", "| --- | --- |"]
            lines += [f"| {k} | {v:.4g} |" for k, v in mean.items()]
            lines += ["", f"JSON: `{absorbed['path']}`."]
    lines += ["", "## Wall time", ""]
    lines += [f"- {k.removesuffix('_s')}: {v:.0f} s" for k, v in timings.items()]
    return "\n".join(lines) + "\n"
