"""``sae-gba compare``: GBA against SAELens's SAEs on the same tokens, width and L0 range.

Run::

    sae-gba compare --out runs/compare            # embedded Gemma-3-270M, default size

What it does, in order (every phase resumes: finished work is found on disk and kept):

1. **Harvest once.** The language model runs once over the training split (embedded:
   the training articles of the Wikipedia slice, never the held-out ones), BOS/EOS/PAD
   positions dropped, and the hook's activations are kept in memory (and written to
   ``OUT/activations.safetensors`` in the model's dtype, so a resumed run skips it).
   Each token is rescaled to norm ``sqrt(d_in)`` (SAELens's ``constant_norm_rescale``)
   before training, for every method alike: the residual stream has outlier tokens
   (see the README) and every method then minimises the same squared error. The saved
   SAEs carry ``normalize_activations: constant_norm_rescale``, so SAELens applies the
   same rescaling at inference and they take raw activations.
2. **Train** every (method, target L0) on exactly those activations with SAELens's own
   ``SAETrainer`` (``sae_gba.training``): same width, tokens, batch size, learning rate,
   seed, batch order. Each is written as an ordinary SAELens folder
   ``OUT/saes/<method>_L0-<target>/`` whose metadata name the model and hook, plus
   ``compare_train.json`` (setting, seconds, tokens).
3. **Evaluate** each with SAEBench 0.6's core eval (:func:`evals.saebench.run_core`) and
   first-letter absorption (:func:`evals.saebench_absorption.run_absorption`) on
   held-out data only, with one loaded model; the absorption ground-truth probe is
   trained once per layer and shared. SAEBench's JSON goes to ``OUT/evals/``.
4. **Report**: ``OUT/compare.json`` (one row per SAE), ``OUT/compare.md`` (the table and
   GBA against TopK at matched L0) and the plots ``OUT/ev_vs_l0.png`` and
   ``OUT/absorption_vs_l0.png``.

Sparsity settings. Each size lists target L0s; each method turns a target into its own
knob: TopK and BatchTopK ``k = target``; JumpReLU SAELens's ``quadratic`` L0 loss
(Gemma Scope 2's penalty ``2 / t * (L0 - t)^2``) with ``target_l0 = target`` and the
straight-through gradient reaching the encoder (``jumprelu_ste_to_input``; without it
the L0 stayed near 1,100 of 2,048 in the pilot: the thresholds alone move by about
``lr`` per step); GBA ``target_l0`` set so that the group targets' expected
L0 (group size times target frequency, summed; ``low_target_freq`` and ``n_groups``
stay at the paper's 1e-4 and 10) is ``target / gba_l0_ratio``. The L0 that counts is
always the one measured on held-out tokens (BatchTopK's exported threshold, for one,
gives more than k). Short runs make initial values matter, because Adam moves a
parameter by about ``lr`` per step: SAELens's SAEs start with ``b_dec`` at the data
mean and JumpReLU with its threshold at the target L0 (:func:`initialize_from_data`),
and GBA with output scales 0.5 (see :data:`EMBEDDED_SIZES`).

Evaluation cost. Every SAE's core eval runs the model over the same held-out windows in
the same batches, and every absorption eval over the same prompts (its words are the
probe's true positives, independent of the SAE; the in-context examples are drawn
after the same seeding), so :func:`memoized_forward` keeps the model's activations from
the first SAE and returns them to the rest: the tensors SAEBench receives are the ones
the model produced, and its metric code runs unchanged (tested against a run without
it). Only the CE/KL passes, which splice each SAE into the model, run for every SAE.

Cost of the embedded default (2,048 latents, 200,000 training tokens, targets 24/48/96,
6 methods = 18 SAEs; held-out: 35,840 tokens for the core eval, 1,024 for CE/KL,
12,000 words for absorption). Pilot measurements, one thread of the project's 2-core
AMD EPYC machine:

- model load about 15 s; harvest 1,130 tokens/s (200k: 177 s);
- training per SAE (200k tokens): TopK 68-76 s, BatchTopK 70 s, weighted TopK 71 s,
  JumpReLU 50-59 s, GBA 34-38 s, weighted GBA 31 s (GBA's gates are sparse once
  adapted, and its fused step uses that): 984 s for the 18;
- core eval: 70 s for the first SAE (it runs the model over the held-out tokens),
  28 s for each later one (23 s of it the CE/KL passes through the 262k vocabulary);
- absorption: the ground-truth probe is the model over 88-token prompts for every
  word, 227 s for 2,529 words, so about 1,080 s for 12,000 (once per layer, cached
  in ``~/.cache/sae_gba/saebench_probes``); per SAE the k-sparse probes took 11 s at
  2,529 words (about 52 s at 12,000, scaled linearly) and the absorption prompts
  35 s for the first SAE (about 170 s at 12,000), under 1 s for later ones
  (memoised).

That is about 3,900 s on one thread (65 minutes); with both cores (the harvest runs
at 1,760 instead of 1,130 tokens/s, a factor 0.65 in time) the projection is about
42 minutes; the measured run took 45 (absorption then scored nothing: see below).
The knobs that cut it are ``training_tokens`` and ``absorption_words``. Absorption
needs 20 of 26 letters whose ground-truth probe passes SAEBench's F1 gate. With the
probe trained on SAEBench's raw activations, 12,000 words pass 23 letters at layer 9.
The first run trained it on normalised activations and passed 13, so it scored
nothing. Redone after the fix, the absorption phase took 2,110 s for 18 SAEs, partly
on a shared machine, for about 50-56 minutes in all. ``--size small``
(1,024 latents, 100,000 tokens) is for trying the pipeline out; it shares the default's
word list, so its ground-truth probe is the default's.

Gemma-2-2B (``--preset gemma-2-2b --model-path DIR``, optional ``--dataset-path`` for
a local ``save_to_disk`` dataset whose rows are split 90/10 into training and
held-out; without it the Wikipedia slice, which is small for 65,536 latents). Layer 12,
65,536 latents, targets 150/300/600 (the paper's L0 about 300), 2^23 training tokens
per SAE in batches of 4,096. Expected resources, estimated and not measured (no
Gemma-2-2B weights here): host memory about 45 GB (the harvested activations in
bfloat16, 39 GB, normalised in place) and the same on disk for
``activations.safetensors``; one GPU with 24 GB or more (the bfloat16 model 5.2 GB,
each SAE with Adam about 4 GB, activations of a 4,096-token batch a few GB); on one
A100/H100-class GPU a few minutes of harvest, about 2-3 minutes of training per SAE
(1 hour for 18), minutes per core eval, and for absorption over the whole vocabulary
(SAEBench's setting) about 30 minutes of ground-truth probe plus several minutes per
SAE: about 2-4 hours in all. On CPUs it is not practical.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from evals.saebench import (
    EvalError,
    EvalSettings,
    prepare_sae,
    require_saebench,
    run_core,
)
from sae_gba.atomic import write_text_atomically
from sae_gba.bias_adaptation import high_target_for_l0

if TYPE_CHECKING:
    import datasets
    from sae_lens.saes.sae import TrainingSAE, TrainingSAEConfig
    from transformer_lens import HookedTransformer

# Every method the comparison can train, as SAELens architecture names.
METHODS = (
    "gba",
    "topk",
    "batchtopk",
    "jumprelu",
    "weighted_gba",
    "weighted_topk",
    "weighted_batchtopk",
    "weighted_jumprelu",
)
DEFAULT_METHODS = (
    "gba",
    "topk",
    "batchtopk",
    "jumprelu",
    "weighted_gba",
    "weighted_topk",
)
EVALS = ("core", "absorption")
ACTIVATIONS_FILE = "activations.safetensors"
TRAIN_INFO_FILE = "compare_train.json"
# A latent that has not fired for this many training tokens counts as dead for
# TopK's aux-k loss (SAELens's default window, 1000 steps, is longer than the runs).
DEAD_WINDOW_TOKENS = 50_000


class CompareError(ValueError):
    """A comparison request that cannot run as asked (bad method, size, folder...)."""


@dataclass(frozen=True)
class CompareSize:
    """How big a comparison is: width, training length, L0 targets and eval data.

    Args:
        name: key in :data:`SIZES`.
        d_sae: latents of every SAE.
        training_tokens: tokens harvested once; every SAE trains one pass over them.
        target_l0s: L0 targets of the sweep, shared by every method.
        batch_tokens: tokens per training step.
        lr: Adam learning rate (SAELens's default).
        adaptation_interval: GBA steps between bias adaptations.
        gba_l0_ratio: realised L0 over the group targets' expected L0 for GBA (pilot).
        gba_output_scale_init: GBA's initial output scales ``a_m``
            (``decoder_init_norm``).
        jumprelu_l0_coefficient: coefficient of JumpReLU's quadratic L0 loss.
        jumprelu_ste_to_input: let the L0 loss's straight-through gradient reach
            the encoder (Anthropic's setup), not only the thresholds (DeepMind's).
        harvest_batch_windows: context windows per model forward pass when harvesting.
        eval_n_tokens: held-out tokens for sparsity, variance and alive fraction
            (None: every held-out window).
        n_recon_tokens: held-out tokens for the CE and KL scores.
        absorption_words: vocabulary words for the absorption probes.
        eval_batch_size_prompts: windows per forward pass in the core eval.
        llm_dtype: model dtype for the harvest and both evals.
        memo_bytes: cap on the model activations :func:`memoized_forward` keeps
            (first come, first kept: the ground-truth probe's prompts, 1.35 GB at
            12,000 words, are stored before the absorption prompts, 0.2 GB).
        train_dtype: dtype the normalised training activations are kept in (the
            SAEs train in float32 either way; bfloat16 halves the memory).
    """

    name: str
    d_sae: int
    training_tokens: int
    target_l0s: tuple[float, ...]
    batch_tokens: int = 512
    lr: float = 3e-4
    adaptation_interval: int = 5
    gba_l0_ratio: float = 1.0
    gba_output_scale_init: float = 0.1
    jumprelu_l0_coefficient: float = 1.0
    jumprelu_ste_to_input: bool = True
    harvest_batch_windows: int = 16
    eval_n_tokens: int | None = None
    n_recon_tokens: int = 1024
    absorption_words: int | None = 12_000
    eval_batch_size_prompts: int = 4
    llm_dtype: str = "bfloat16"
    memo_bytes: int = 3 * 2**30
    train_dtype: str = "float32"

    def eval_settings(self, context_size: int, seed: int = 42) -> EvalSettings:
        """The :class:`EvalSettings` of this size (one dtype for both evals)."""
        return EvalSettings(
            n_tokens=self.eval_n_tokens,
            n_recon_tokens=self.n_recon_tokens,
            context_size=context_size,
            batch_size_prompts=self.eval_batch_size_prompts,
            llm_dtype=self.llm_dtype,
            absorption_dtype=self.llm_dtype,
            absorption_words=self.absorption_words,
            seed=seed,
        )


@dataclass(frozen=True)
class ComparePreset:
    """The model side of a comparison.

    Args:
        name: key in :data:`COMPARE_PRESETS`.
        model_preset: key in ``sae_gba.presets.PRESETS`` (model, layer, hook, d_in).
        context_size: tokens per harvested window, BOS first.
        eval_context_size: tokens per held-out window in the evals.
        sizes: the sizes this preset offers.
    """

    name: str
    model_preset: str
    context_size: int
    eval_context_size: int
    sizes: dict[str, CompareSize] = field(default_factory=dict)


# Embedded Gemma-3-270M (d_in 640), sized from pilot measurements on the project's
# 2-core machine (one thread each; see the module docstring for the phase costs).
# GBA adapts every 2 steps: at 5 (the demo's interval) 200k tokens give 78
# adaptations and a held-out L0 of 103 for an expected 48; at 2 (195 adaptations),
# 45, and 29 for 26 and 90 for 102 (hence gba_l0_ratio). "small" adapts every step
# for the same count (at 60k tokens and every 2 steps its L0s were 116-146 for
# targets 16-64: not settled). GBA's output scales start at 0.5, not the package's 0.1:
# each a_m is one scalar that Adam moves by about lr per step, so from 0.1 all of them
# were still rising at the end (max 0.235 = 0.1 + 390 steps x 3e-4); from 0.5 they
# settle around 0.48 (0.43-0.59) and from 1.0 they were still falling (0.93-0.99).
# Chosen among 0.1 / 0.5 / 1.0 in the pilot at target 48 by held-out explained
# variance (0.652 / 0.700 / 0.617): the one GBA setting tuned on the eval data.
# 280 of the 283 held-out windows: a count divisible by the batch of 4 (a prime
# count makes SAEBench's core eval read one window per batch).
EMBEDDED_SIZES = {
    "default": CompareSize(
        name="default",
        d_sae=2048,
        training_tokens=200_000,
        target_l0s=(24.0, 48.0, 96.0),
        adaptation_interval=2,
        gba_l0_ratio=0.94,
        gba_output_scale_init=0.5,
        eval_n_tokens=280 * 128,
        absorption_words=12_000,
    ),
    "small": CompareSize(
        name="small",
        d_sae=1024,
        training_tokens=100_000,
        target_l0s=(16.0, 32.0, 64.0),
        adaptation_interval=1,
        gba_l0_ratio=0.94,
        gba_output_scale_init=0.5,
        eval_n_tokens=64 * 128,
        n_recon_tokens=512,
        absorption_words=12_000,
    ),
}

# The paper's setup: Gemma-2-2B layer 12, 65,536 latents, L0 about 300 (the middle
# target). Not run here (no Gemma-2-2B weights); the expected resources in the module
# docstring are estimates. GBA adapts every 6 steps of 4,096 tokens (24,576-token
# windows, about the paper's 50 x 512): 341 adaptations in 2^23 tokens.
# gba_l0_ratio is not measured for this model (1.0: the group targets as they are).
GEMMA_2_2B_SIZES = {
    "default": CompareSize(
        name="default",
        d_sae=65_536,
        training_tokens=2**23,
        target_l0s=(150.0, 300.0, 600.0),
        batch_tokens=4096,
        adaptation_interval=6,
        harvest_batch_windows=8,
        n_recon_tokens=20_480,
        absorption_words=None,
        eval_batch_size_prompts=16,
        memo_bytes=16 * 2**30,
        train_dtype="bfloat16",
    ),
}

COMPARE_PRESETS = {
    "embedded": ComparePreset("embedded", "embedded", 128, 128, EMBEDDED_SIZES),
    "gemma-2-2b": ComparePreset(
        "gemma-2-2b", "gemma-2-2b", 1024, 128, GEMMA_2_2B_SIZES
    ),
}


# ------------------------------------------------------------------ sparsity settings


def sparsity_setting(
    method: str, target_l0: float, size: CompareSize
) -> dict[str, Any]:
    """The training-config fields that set ``method``'s sparsity for ``target_l0``.

    Args:
        method: one of :data:`METHODS`.
        target_l0: the L0 aimed at.
        size: the comparison size (width, GBA ratio, JumpReLU coefficient).
    """
    base = method.removeprefix("weighted_")
    if base in ("topk", "batchtopk"):
        return {"k": int(round(target_l0))}
    if base == "jumprelu":
        return {
            "jumprelu_sparsity_loss_mode": "quadratic",
            "target_l0": float(target_l0),
            "l0_coefficient": size.jumprelu_l0_coefficient,
            "jumprelu_ste_to_input": size.jumprelu_ste_to_input,
        }
    if base == "gba":
        expected = target_l0 / size.gba_l0_ratio
        try:
            high_target_for_l0(expected, size.d_sae, 10, 1e-4)
        except ValueError as err:
            raise CompareError(f"GBA at L0 {target_l0:g}: {err}") from None
        return {
            "target_l0": expected,
            "adaptation_interval": size.adaptation_interval,
            "decoder_init_norm": size.gba_output_scale_init,
        }
    raise CompareError(f"method {method!r} is not one of {list(METHODS)}")


def sae_name(method: str, target_l0: float) -> str:
    """The folder and SAEBench name of one SAE of the sweep."""
    return f"{method}_L0-{target_l0:g}"


def build_training_sae(
    method: str, d_in: int, target_l0: float, size: CompareSize, device: str = "cpu"
) -> TrainingSAE[Any]:
    """A fresh SAELens training SAE of ``method`` at ``target_l0`` (inputs normalised).

    Args:
        method: one of :data:`METHODS` (a registered SAELens training architecture).
        d_in: input width.
        target_l0: the L0 aimed at.
        size: the comparison size.
        device: torch device of the SAE.
    """
    from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY

    sae_class, config_class = SAE_TRAINING_CLASS_REGISTRY[method]
    cfg: TrainingSAEConfig = config_class(
        d_in=d_in,
        d_sae=size.d_sae,
        # The data are rescaled per token before training (see the module docstring).
        normalize_activations="none",
        device=device,
        **sparsity_setting(method, target_l0, size),
    )
    return sae_class(cfg)


# ------------------------------------------------------------------------- the data


def _ignore_ids(model: HookedTransformer) -> list[int]:
    tok = model.tokenizer
    if tok is None:
        return []
    ids = {tok.pad_token_id, tok.eos_token_id, tok.bos_token_id}
    return sorted(i for i in ids if i is not None)


def _hook_layer(hook_name: str) -> int:
    return int(hook_name.split(".")[1])


@torch.no_grad()
def harvest(
    model: HookedTransformer,
    hook_name: str,
    windows: torch.Tensor,
    n_tokens: int,
    batch_windows: int = 16,
    progress: bool = True,
) -> torch.Tensor:
    """The hook's activations on ``windows`` until ``n_tokens`` text tokens are read.

    The forward pass stops after the hooked block; BOS, EOS and PAD positions are
    dropped (SAELens's ``exclude_special_tokens``).

    Args:
        model: the language model.
        hook_name: ``blocks.<layer>.hook_resid_post`` or another hook of that block.
        windows: (n_windows, context) token ids, BOS first.
        n_tokens: activations to return.
        batch_windows: windows per forward pass.
        progress: show a progress bar.

    Returns:
        (n_tokens, d_model) activations in the model's dtype.
    """
    ignore = torch.tensor(_ignore_ids(model), dtype=windows.dtype)
    # Filled in place: no second copy of what may be tens of GB.
    result = torch.empty(n_tokens, model.cfg.d_model, dtype=model.cfg.dtype)
    have = 0
    bar = tqdm(total=n_tokens, desc="harvest", unit="tok", disable=not progress)
    for start in range(0, len(windows), batch_windows):
        batch = windows[start : start + batch_windows]
        _, cache = model.run_with_cache(
            batch.to(model.cfg.device),
            names_filter=hook_name,
            stop_at_layer=_hook_layer(hook_name) + 1,
        )
        keep = ~torch.isin(batch, ignore)
        acts = cache[hook_name][keep.to(cache[hook_name].device)][: n_tokens - have]
        result[have : have + len(acts)] = acts.cpu()
        have += len(acts)
        bar.update(len(acts))
        if have >= n_tokens:
            break
    bar.close()
    if have < n_tokens:
        raise CompareError(
            f"the training split holds {have:,} text tokens; training_tokens="
            f"{n_tokens:,} needs more (use a smaller size or more data)"
        )
    return result


def normalize_per_token(
    acts: torch.Tensor, dtype: str = "float32", chunk: int = 65_536
) -> torch.Tensor:
    """Rows rescaled to norm ``sqrt(d_in)`` (``constant_norm_rescale``), in ``dtype``.

    Computed in float32 chunk by chunk, so a bfloat16 result never needs a float32
    copy of all the activations; when ``acts`` already has ``dtype`` it is rescaled
    in place.

    Args:
        acts: (n, d_in) activations.
        dtype: dtype of the result ("float32", or "bfloat16" to halve the memory).
        chunk: rows per step.
    """
    target = getattr(torch, dtype)
    result = acts if acts.dtype == target else torch.empty(acts.shape, dtype=target)
    for start in range(0, len(acts), chunk):
        x = acts[start : start + chunk].float()
        scale = x.shape[-1] ** 0.5 / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        result[start : start + chunk] = x * scale
    return result


def load_or_harvest(
    out: Path,
    model: HookedTransformer,
    hook_name: str,
    windows: torch.Tensor,
    n_tokens: int,
    batch_windows: int,
    progress: bool = True,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Harvested activations, read from ``out`` when a matching harvest is there.

    Returns:
        The activations (model dtype) and a record of where they came from.
    """
    from safetensors.torch import load_file, save_file

    path = out / ACTIVATIONS_FILE
    key = {"model": model.cfg.model_name, "hook": hook_name, "tokens": str(n_tokens)}
    if path.is_file():
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            found = dict(f.metadata() or {})
        seconds = float(found.pop("seconds", "nan"))
        if found == key:
            info = {"seconds": 0.0, "first_harvest_seconds": seconds, "reused": True}
            return load_file(path)["acts"], info
    start = time.perf_counter()
    acts = harvest(model, hook_name, windows, n_tokens, batch_windows, progress)
    seconds = time.perf_counter() - start
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(
        {"acts": acts.contiguous()}, tmp, metadata={**key, "seconds": f"{seconds}"}
    )
    os.replace(tmp, path)
    info = {"seconds": seconds, "first_harvest_seconds": seconds, "reused": False}
    return acts, info


# ------------------------------------------------------------------------- training


def train_one(
    method: str,
    target_l0: float,
    data: torch.Tensor,
    size: CompareSize,
    folder: Path,
    metadata: dict[str, Any],
    seed: int = 0,
    device: str = "cpu",
) -> dict[str, Any]:
    """Train one SAE on ``data`` with SAELens's ``SAETrainer``; save it to ``folder``.

    The folder appears complete or not at all (written beside it, then renamed), and
    ``compare_train.json`` inside says what was trained.

    Args:
        method: one of :data:`METHODS`.
        target_l0: the L0 aimed at.
        data: (n_tokens, d_in) per-token normalised activations.
        size: width, training length, batch and learning rate.
        folder: the SAE folder to write.
        metadata: SAELens metadata fields (model, hook, context, dataset).
        seed: seed of the initialisation and of the batch order.
        device: torch device to train on.

    Returns:
        The training record written to ``compare_train.json``.
    """
    from sae_gba.training import TensorDataProvider, make_trainer

    torch.manual_seed(seed)
    sae = build_training_sae(method, data.shape[1], target_l0, size, device)
    initial = initialize_from_data(sae, data, target_l0)
    provider = TensorDataProvider(data, size.batch_tokens, seed=seed)
    steps = size.training_tokens // size.batch_tokens
    trainer = make_trainer(
        sae,
        provider,
        total_tokens=size.training_tokens,
        batch_size=size.batch_tokens,
        lr=size.lr,
        dead_feature_window=max(1, DEAD_WINDOW_TOKENS // size.batch_tokens),
        # One window over the whole run: SAELens's saved sparsity covers all of it.
        feature_sampling_window=steps + 1,
    )
    start = time.perf_counter()
    sae = trainer.fit()
    seconds = time.perf_counter() - start
    for name, value in metadata.items():
        setattr(sae.cfg.metadata, name, value)
    # Trained on rescaled tokens: SAELens applies the same rescaling at inference.
    sae.cfg.normalize_activations = "constant_norm_rescale"
    record = {
        "method": method,
        "target_l0": target_l0,
        "setting": sparsity_setting(method, target_l0, size),
        "d_sae": size.d_sae,
        "training_tokens": size.training_tokens,
        "batch_tokens": size.batch_tokens,
        "lr": size.lr,
        "seed": seed,
        "train_seconds": seconds,
        "train_l0_full_run": float(trainer.feature_sparsity.sum()),
        "initialized_from_data": initial,
    }
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    sae.save_inference_model(tmp)
    (tmp / TRAIN_INFO_FILE).write_text(json.dumps(record, indent=1))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return record


@torch.no_grad()
def initialize_from_data(
    sae: TrainingSAE[Any], data: torch.Tensor, target_l0: float, rows: int = 4096
) -> dict[str, Any]:
    """Start SAELens's SAEs where a short run can reach: ``b_dec`` and JumpReLU gates.

    - ``b_dec`` starts at the mean of the first ``rows`` training rows (GBA sets its
      ``b_pre`` the same way from its first batch; SAELens 5's ``b_dec_init_method=
      "mean"``). From zeros, Adam moves each element by about ``lr`` per step, far
      less than the residual stream's mean offset in a few hundred steps, and TopK
      then spends its k latents on that offset (a pilot: 58 of 2,048 latents alive).
    - JumpReLU's threshold starts at the quantile of the initial pre-activations
      that opens ``target_l0`` of ``d_sae`` gates on those rows. SAELens's default
      (0.01) opened about 1,500 of 2,048 gates, and the threshold also moves by about
      ``lr`` per step, too slowly for the L0 loss to close them in a short run.

    GBA is left alone (it fixes ``b_pre`` and its input scale from its first batch).

    Returns:
        What was set, for the training record.
    """
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE

    from sae_gba.gba_sae import GBATrainingSAE

    if isinstance(sae, GBATrainingSAE):
        return {}
    sample = data[:rows].to(sae.device, torch.float32)
    sae.b_dec.copy_(sample.mean(dim=0).to(sae.b_dec))
    initial: dict[str, Any] = {"b_dec": f"mean of the first {len(sample)} rows"}
    if isinstance(sae, JumpReLUTrainingSAE):
        hidden_pre = sae.encode_with_hidden_pre(sample)[1].flatten().float()
        n_open = max(1, round(target_l0 / sae.cfg.d_sae * hidden_pre.numel()))
        # kthvalue, not quantile: quantile refuses more than 2^24 elements.
        k = hidden_pre.numel() - n_open
        threshold = float(hidden_pre.kthvalue(k).values.clamp(min=0.0))
        sae.threshold.fill_(threshold)
        initial["jumprelu_threshold"] = threshold
    return initial


def trained_record(
    folder: Path, method: str, target_l0: float, size: CompareSize
) -> dict[str, Any] | None:
    """The training record of a finished SAE folder, None if there is none.

    Raises:
        CompareError: the folder holds an SAE trained with other settings.
    """
    path = folder / TRAIN_INFO_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    wanted = {
        "setting": sparsity_setting(method, target_l0, size),
        "d_sae": size.d_sae,
        "training_tokens": size.training_tokens,
    }
    found = {k: record.get(k) for k in wanted}
    if json.loads(json.dumps(wanted)) != found:
        raise CompareError(
            f"{folder} holds an SAE trained with {found}, this run wants {wanted}; "
            "use another --out or delete that folder"
        )
    return record


# ------------------------------------------------------------------ memoised forward


def _key(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        raw = value.detach().cpu().contiguous().flatten().view(torch.uint8)
        digest = hashlib.sha1(raw.numpy().tobytes())
        return ("tensor", tuple(value.shape), str(value.dtype), digest.hexdigest())
    if isinstance(value, (list, tuple)):
        return tuple(_key(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _key(v)) for k, v in value.items()))
    return value


@contextlib.contextmanager
def memoized_forward(
    model: HookedTransformer, max_bytes: int = 2**30
) -> Iterator[dict[str, int]]:
    """Within the block, repeated ``model.run_with_cache`` calls reuse the first result.

    A call is identified by its inputs (token tensors by content, prompt strings as
    they are) and keyword arguments; the first call runs the model and its output and
    cached activations are kept (detached) while they fit in ``max_bytes``; a repeat
    gets the same tensors in a new cache object. The model's class is swapped for a
    subclass for the duration, so wrappers that call ``type(model).run_with_cache``
    (``evals.saebench_absorption.stop_after_layer``) are memoised too.

    Yields:
        Counters: ``hits``, ``misses``, ``bytes`` kept.
    """
    from transformer_lens import ActivationCache

    base = type(model)
    store: dict[Any, tuple[Any, dict[str, torch.Tensor]]] = {}
    stats = {"hits": 0, "misses": 0, "bytes": 0}

    def run_with_cache(self: Any, *args: Any, **kwargs: Any) -> Any:
        key = (_key(args), _key(kwargs))
        if key in store:
            stats["hits"] += 1
            out, tensors = store[key]
            return out, ActivationCache(dict(tensors), self)
        stats["misses"] += 1
        out, cache = base.run_with_cache(self, *args, **kwargs)
        tensors = {k: v.detach() for k, v in cache.cache_dict.items()}
        out = out.detach() if isinstance(out, torch.Tensor) else out
        kept = {t.untyped_storage().data_ptr(): t for t in tensors.values()}
        if isinstance(out, torch.Tensor):
            kept[out.untyped_storage().data_ptr()] = out
        size = sum(t.untyped_storage().nbytes() for t in kept.values())
        if stats["bytes"] + size <= max_bytes:
            store[key] = (out, tensors)
            stats["bytes"] += size
        return out, cache

    model.__class__ = type(f"Memoized{base.__name__}", (base,), {})
    model.__class__.run_with_cache = run_with_cache  # type: ignore[method-assign]
    try:
        yield stats
    finally:
        model.__class__ = base


# ---------------------------------------------------------------------- model, data


def load_compare_model(
    preset: ComparePreset, model_path: str | None, device: str, dtype: str
) -> HookedTransformer:
    """The preset's language model in ``dtype`` (embedded: no path; Gemma-2: a folder).

    Args:
        preset: the comparison preset.
        model_path: local Hugging Face folder (Gemma-2-2B); None for the embedded
            model, or TransformerLens's own loading (Hub or HF cache) for Gemma-2.
        device: torch device.
        dtype: dtype name, e.g. "bfloat16".
    """
    from sae_gba.presets import PRESETS, load_hooked_model

    try:
        return load_hooked_model(
            PRESETS[preset.model_preset],
            model_path,
            device=device,
            dtype=getattr(torch, dtype),
        )
    except (FileNotFoundError, ValueError) as err:
        raise CompareError(str(err)) from err


def _shuffled(windows: torch.Tensor, seed: int) -> torch.Tensor:
    # Harvesting reads windows in order: shuffled, a short run samples every article.
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed))
    return windows[order]


def split_local_dataset(
    model: HookedTransformer,
    dataset_path: str,
    context_size: int,
    eval_context_size: int,
    held_out_fraction: float = 0.1,
    seed: int = 0,
) -> tuple[torch.Tensor, datasets.Dataset]:
    """Training windows and held-out windows from disjoint rows of a local dataset.

    Rows (documents, or pretokenized windows) are split once, seeded; text rows are
    tokenized with the model's tokenizer into BOS-first windows.

    Args:
        model: the model whose tokenizer reads text rows.
        dataset_path: a ``save_to_disk`` folder ("text", "tokens" or "input_ids").
        context_size: tokens per training window.
        eval_context_size: tokens per held-out window.
        held_out_fraction: share of rows held out.
        seed: seed of the row split.
    """
    import datasets

    from sae_gba.embedded import tokenize_windows
    from sae_gba.presets import load_local_dataset

    try:
        data = load_local_dataset(dataset_path)
    except (FileNotFoundError, ValueError) as err:
        raise CompareError(str(err)) from err
    if len(data) < 2:
        raise CompareError(f"{dataset_path}: needs at least 2 rows, has {len(data)}")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    n_held = min(max(1, round(len(data) * held_out_fraction)), len(data) - 1)
    parts = [data.select(sorted(order[n_held:].tolist()))]
    parts.append(data.select(sorted(order[:n_held].tolist())))
    windows = []
    for part, context in zip(parts, (context_size, eval_context_size), strict=True):
        if "text" in part.column_names:
            if model.tokenizer is None:
                raise CompareError("the model has no tokenizer to read text rows")
            windows.append(tokenize_windows(model.tokenizer, part["text"], context))
            continue
        column = "tokens" if "tokens" in part.column_names else "input_ids"
        rows = [row[:context] for row in part[column] if len(row) >= context]
        if not rows:
            raise CompareError(
                f"{dataset_path}: no {column} row holds {context} tokens or more"
            )
        windows.append(torch.tensor(rows))
    held_out = datasets.Dataset.from_dict({"tokens": windows[1].tolist()})
    return windows[0], held_out


def preset_data(
    preset: ComparePreset,
    model: HookedTransformer,
    dataset_path: str | None,
    seed: int = 0,
) -> tuple[torch.Tensor, datasets.Dataset, str, str]:
    """Training windows (shuffled) and held-out windows, disjoint, with their labels.

    Without ``dataset_path`` both come from the embedded Wikipedia slice, split by
    article (``sae_gba.embedded``: 10% of the articles held out, seed 0).

    Returns:
        (training windows, held-out dataset with a "tokens" column, training label,
        held-out label).
    """
    from evals.saebench import held_out_tokens
    from sae_gba import embedded

    if dataset_path is not None:
        train, held = split_local_dataset(
            model, dataset_path, preset.context_size, preset.eval_context_size
        )
        label = f"local dataset {dataset_path}"
        return (
            _shuffled(train, seed),
            held,
            f"{label}, 90% of rows",
            f"{label}, the other 10% of rows (seeded split)",
        )
    held, held_label = held_out_tokens(model, preset.eval_context_size)
    train_label = "sae_gba.embedded Wikipedia, training articles"
    if model.cfg.model_name in (
        embedded.EMBEDDED_MODEL_NAME,
        embedded.EMBEDDED_MODEL_NAME.split("/")[-1],
    ):
        tokens = embedded.embedded_token_dataset("train", preset.context_size)
        return (
            _shuffled(torch.tensor(tokens["tokens"]), seed),
            held,
            train_label,
            held_label,
        )
    if model.tokenizer is None:
        raise CompareError("the model has no tokenizer; pass token windows instead")
    articles = embedded.split_articles(embedded.wikipedia_articles(), 0.1)[0]
    train = embedded.tokenize_windows(
        model.tokenizer, [a.text for a in articles], preset.context_size
    )
    return _shuffled(train, seed), held, train_label, held_label


# ----------------------------------------------------------------------- evaluation


def _cached(path: Path, compute: Any) -> dict[str, Any]:
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
    from evals.saebench_absorption import run_absorption
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
        dtype = str(model.cfg.dtype).removeprefix("torch.")
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


def result_row(
    record: dict[str, Any], results: dict[str, Any], folder: Path
) -> dict[str, Any]:
    """One row of ``compare.json`` from a training record and the eval results."""
    row: dict[str, Any] = {
        "method": record["method"],
        "target_l0": record["target_l0"],
        "setting": record["setting"],
    }
    core = results.get("core")
    metrics = core["metrics"] if core else {}
    for group, key in (
        ("sparsity", "l0"),
        ("reconstruction_quality", "explained_variance_legacy"),
        ("reconstruction_quality", "explained_variance"),
        ("misc_metrics", "frac_alive"),
        ("model_performance_preservation", "ce_loss_score"),
        ("model_behavior_preservation", "kl_div_score"),
    ):
        row[key] = metrics.get(group, {}).get(key)
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
    row["eval_seconds"] = {k: v.get("seconds") for k, v in results.items()}
    row["sae_dir"] = str(folder)
    return row


# -------------------------------------------------------------------------- report

# Row fields compared against TopK at matched L0 (absorption: lower is better).
MATCHED_METRICS = (
    "explained_variance_legacy",
    "frac_alive",
    "mean_absorption_fraction_score",
    "mean_full_absorption_score",
)
# The GBA paper's claim: legacy explained variance within 0.02 of TopK's, or better.
PAPER_EV_TOLERANCE = 0.02


def interpolate_log_l0(
    points: Sequence[tuple[float, float]], l0: float
) -> float | None:
    """The value at ``l0`` on a curve of (L0, value) points, linear in log L0.

    Returns None outside the points' L0 range (no extrapolation) or without points.
    """
    points = sorted(points)
    if not points or not points[0][0] <= l0 <= points[-1][0] or l0 <= 0:
        return None
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if x0 <= l0 <= x1:
            if x1 == x0:
                return y0
            t = (math.log(l0) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + t * (y1 - y0)
    return points[0][1]  # a single point at exactly this L0


def matched_l0(
    rows: Sequence[dict[str, Any]], method: str, reference: str, metric: str
) -> dict[str, Any]:
    """``method``'s ``metric`` minus ``reference``'s, interpolated at the same L0.

    Args:
        rows: ``compare.json`` rows.
        method: the method compared, e.g. "gba".
        reference: the curve it is compared against, e.g. "topk".
        metric: a row field.

    Returns:
        The points (L0, both values, difference; None outside the reference's L0
        range), their count inside it, the mean difference and the reference range.
    """
    ref = [
        (r["l0"], r[metric])
        for r in rows
        if r["method"] == reference and r["l0"] is not None and r[metric] is not None
    ]
    points = []
    for r in sorted(rows, key=lambda r: r["l0"] or 0.0):
        if r["method"] != method or r["l0"] is None or r[metric] is None:
            continue
        at = interpolate_log_l0(ref, r["l0"])
        points.append(
            {
                "l0": r["l0"],
                method: r[metric],
                reference: at,
                "difference": None if at is None else r[metric] - at,
            }
        )
    inside = [p["difference"] for p in points if p["difference"] is not None]
    return {
        "metric": metric,
        "method": method,
        "reference": reference,
        "points": points,
        "n_inside": len(inside),
        "mean_difference": sum(inside) / len(inside) if inside else None,
        "reference_l0_range": [min(x for x, _ in ref), max(x for x, _ in ref)]
        if ref
        else None,
    }


def matched_summary(rows: Sequence[dict[str, Any]], reference: str = "topk") -> dict:
    """:func:`matched_l0` of every method but ``reference`` for :data:`MATCHED_METRICS`."""
    methods = sorted({r["method"] for r in rows} - {reference})
    return {
        method: {
            metric: matched_l0(rows, method, reference, metric)
            for metric in MATCHED_METRICS
        }
        for method in methods
    }


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _diffs(result: dict[str, Any]) -> str:
    inside = [p for p in result["points"] if p["difference"] is not None]
    return ", ".join(f"{p['difference']:+.3f} at L0 {p['l0']:.0f}" for p in inside)


def gba_vs_topk_text(summary: dict[str, Any]) -> str:
    """The honest sentence on GBA against TopK at matched L0 (legacy EV, alive, absorption)."""
    if "gba" not in summary:
        return "GBA or TopK was not part of this comparison: no matched-L0 statement."
    ev = summary["gba"]["explained_variance_legacy"]
    if ev["reference_l0_range"] is None:
        return "TopK has no evaluated points: no matched-L0 statement."
    low, high = ev["reference_l0_range"]
    n_gba = len(ev["points"])
    if not ev["n_inside"]:
        return (
            f"None of GBA's {n_gba} points lies inside TopK's L0 range "
            f"({low:.0f}-{high:.0f}), so there is no matched-L0 comparison."
        )
    worst = min(p["difference"] for p in ev["points"] if p["difference"] is not None)
    holds = worst >= -PAPER_EV_TOLERANCE
    parts = [
        f"At matched L0 (TopK's curve interpolated linearly in log L0; "
        f"{ev['n_inside']} of GBA's {n_gba} points lie inside TopK's L0 range "
        f"{low:.0f}-{high:.0f}), GBA's legacy explained variance minus TopK's is "
        f"{_diffs(ev)} (mean {ev['mean_difference']:+.3f}): the paper's claim, "
        f"within {PAPER_EV_TOLERANCE} of TopK or better, "
        + ("holds at these points." if holds else "does not hold here.")
    ]
    alive = summary["gba"]["frac_alive"]
    if alive["n_inside"]:
        parts.append(
            f"Alive fraction, GBA minus TopK: {_diffs(alive)} "
            f"(mean {alive['mean_difference']:+.3f})."
        )
    absorbed = summary["gba"]["mean_absorption_fraction_score"]
    full = summary["gba"]["mean_full_absorption_score"]
    if absorbed["n_inside"]:
        parts.append(
            "Absorption (lower is better), GBA minus TopK: mean absorption fraction "
            f"{_diffs(absorbed)} (mean {absorbed['mean_difference']:+.3f}); full "
            f"absorption {_diffs(full)} (mean {full['mean_difference']:+.3f})."
        )
    else:
        parts.append("Absorption: no GBA point with a TopK absorption score to match.")
    return " ".join(parts)


_TABLE = (
    ("method", "method"),
    ("setting", "setting"),
    ("L0", "l0"),
    ("EV legacy", "explained_variance_legacy"),
    ("EV (0.6)", "explained_variance"),
    ("alive", "frac_alive"),
    ("CE score", "ce_loss_score"),
    ("KL score", "kl_div_score"),
    ("absorption fraction", "mean_absorption_fraction_score"),
    ("full absorption", "mean_full_absorption_score"),
    ("train s", "train_seconds"),
)


def _setting_text(setting: dict[str, Any]) -> str:
    shown = {
        k: v
        for k, v in setting.items()
        if k in ("k", "target_l0", "high_target_freq", "l0_coefficient")
    }
    return ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()
    )


def markdown_report(result: dict[str, Any]) -> str:
    """``compare.md``: what ran, on which tokens, the table and the matched-L0 text."""
    rows = sorted(result["rows"], key=lambda r: (r["method"], r["l0"] or 0.0))
    first = rows[0]["tokens"] if rows else {}
    size = result["size"]
    lines = [
        f"# SAE comparison: {result['model']} `{result['hook_name']}`",
        "",
        f"Command: `{result['command']}`",
        "",
        f"- Methods: {', '.join(result['methods'])}; width {size['d_sae']:,} latents; "
        f"every SAE trained by SAELens's SAETrainer on the same "
        f"{size['training_tokens']:,} harvested tokens ({result['train_data']}), "
        f"batch {size['batch_tokens']}, lr {size['lr']:g}, seed {result['seed']}.",
        f"- Held-out evaluation ({result['held_out_data']}): SAEBench core on "
        f"{_fmt(first.get('eval_sparsity_variance'))} tokens for L0, explained "
        f"variance and alive fraction "
        f"({_fmt(first.get('eval_sparsity_variance_without_special'))} without "
        f"BOS/EOS/PAD), {_fmt(first.get('eval_reconstruction'))} tokens for CE/KL; "
        + (
            f"first-letter absorption with {_fmt(first['absorption_words'])} "
            "vocabulary words."
            if first.get("absorption_words")
            else "no absorption eval."
        ),
        f"- Explained variance: compare `EV legacy` (per token, the published "
        f"definition). Absorption: lower is better. {result['versions']}.",
        "",
        "| " + " | ".join(h for h, _ in _TABLE) + " |",
        "|" + "---|" * len(_TABLE),
    ]
    for row in rows:
        cells = []
        for _, key in _TABLE:
            value = row[key]
            if key == "setting":
                value = _setting_text(value)
            elif key == "l0":
                value = _fmt(value, 1)
            elif key == "train_seconds":
                value = _fmt(value, 0)
            cells.append(_fmt(value))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## GBA against TopK at matched L0", "", result["gba_vs_topk"], ""]
    lines += [
        "Every method against TopK at matched L0 (mean difference over its points "
        "inside TopK's L0 range; n = points inside):",
        "",
        "| method | n | EV legacy | alive | absorption fraction | full absorption |",
        "|---|---|---|---|---|---|",
    ]
    for method, metrics in result["matched_l0_vs_topk"].items():
        ev = metrics["explained_variance_legacy"]
        cells = [method, str(ev["n_inside"])]
        cells += [
            _fmt(metrics[m]["mean_difference"]) if metrics[m]["n_inside"] else "-"
            for m in MATCHED_METRICS
        ]
        lines.append("| " + " | ".join(cells) + " |")
    statuses = {r["absorption_status"] for r in rows if r["absorption_status"]}
    if statuses - {"evaluated"}:
        lines += [
            "",
            "Absorption not evaluated for some SAEs: "
            + "; ".join(sorted(statuses - {"evaluated"})),
        ]
    lines += ["", "![explained variance vs L0](ev_vs_l0.png)"]
    lines += ["", "![absorption vs L0](absorption_vs_l0.png)", "", "## Wall time", ""]
    lines += ["This invocation:", ""]
    lines += [
        f"- {k.removesuffix('_s')}: {v:.0f} s" for k, v in result["timings"].items()
    ]
    lines += ["", "Summed over the invocations that built this folder:", ""]
    lines += [f"- {k}: {_fmt(v, 0)} s" for k, v in result["cumulative_seconds"].items()]
    return "\n".join(lines) + "\n"


def _style(method: str) -> dict[str, Any]:
    colours = {"gba": "C3", "topk": "C0", "batchtopk": "C2", "jumprelu": "C4"}
    base = method.removeprefix("weighted_")
    return {
        "color": colours.get(base, "C7"),
        "linestyle": "--" if method.startswith("weighted_") else "-",
        "marker": "o" if base == "gba" else "s",
        "label": method,
    }


def plot_curves(
    rows: Sequence[dict[str, Any]],
    panels: Sequence[tuple[str, str]],
    path: Path,
    title: str,
) -> None:
    """One panel per (row field, axis label) against L0 (log scale), a line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2))
    axes = list(axes) if len(panels) > 1 else [axes]
    for ax, (key, label) in zip(axes, panels, strict=True):
        for method in sorted({r["method"] for r in rows}):
            points = sorted(
                (r["l0"], r[key])
                for r in rows
                if r["method"] == method and r["l0"] is not None and r[key] is not None
            )
            if points:
                ax.plot(*zip(*points, strict=True), **_style(method))
        if ax.lines:
            ax.set_xscale("log")
            # Plain numbers at 1, 2 and 5 times powers of ten, not 2x10^1.
            ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(ticker.NullFormatter())
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no scores", ha="center", transform=ax.transAxes)
        ax.set_xlabel("L0 (held-out)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------ the run


def resolve_request(
    preset: str | ComparePreset,
    size: str | CompareSize,
    methods: Sequence[str] | None,
    evals: Sequence[str],
) -> tuple[ComparePreset, CompareSize, tuple[str, ...]]:
    """Check a request; return the preset, the size and the methods.

    Raises:
        CompareError: naming the field, the value and what is allowed.
    """
    if isinstance(preset, ComparePreset):
        chosen = preset
    elif preset in COMPARE_PRESETS:
        chosen = COMPARE_PRESETS[preset]
    else:
        raise CompareError(
            f"preset={preset!r} is invalid: must be one of {sorted(COMPARE_PRESETS)}"
        )
    preset = chosen.name
    if isinstance(size, str):
        if size not in chosen.sizes:
            raise CompareError(
                f"size={size!r} is invalid for preset {preset!r}: must be one of "
                f"{sorted(chosen.sizes)}"
            )
        size = chosen.sizes[size]
    methods = tuple(DEFAULT_METHODS if methods is None else methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods or len(set(methods)) != len(methods):
        raise CompareError(
            f"methods={list(methods)!r} is invalid: must be distinct names among "
            f"{list(METHODS)}"
        )
    if any(e not in EVALS for e in evals) or "core" not in evals:
        raise CompareError(
            f"evals={list(evals)!r} is invalid: must be among {list(EVALS)} and "
            "include 'core' (L0 and explained variance come from it)"
        )
    if not size.target_l0s or any(not 0 < t < size.d_sae for t in size.target_l0s):
        raise CompareError(
            f"target_l0s={size.target_l0s!r} is invalid: must be non-empty, each in "
            f"(0, d_sae={size.d_sae})"
        )
    if not 1 <= size.batch_tokens <= size.training_tokens:
        raise CompareError(
            f"batch_tokens={size.batch_tokens} is invalid: must be in "
            f"[1, training_tokens={size.training_tokens}]"
        )
    if size.absorption_words is not None and size.absorption_words < 26:
        raise CompareError(
            f"absorption_words={size.absorption_words} is invalid: must be >= 26 (a "
            "word per letter at least) or None for the whole vocabulary"
        )
    for method in methods:  # GBA's reach, before any model is loaded
        for target in size.target_l0s:
            sparsity_setting(method, target, size)
    return chosen, size, methods


def _default_command(
    out: Path, preset: str, size: CompareSize, methods: Sequence[str]
) -> str:
    return (
        f"sae-gba compare --out {out} --preset {preset} --size {size.name} "
        f"--methods {','.join(methods)}"
    )


def run_compare(
    out: str | Path,
    *,
    preset: str | ComparePreset = "embedded",
    size: str | CompareSize = "default",
    methods: Sequence[str] | None = None,
    evals: Sequence[str] = EVALS,
    model_path: str | None = None,
    dataset_path: str | None = None,
    device: str = "cpu",
    seed: int = 0,
    model: HookedTransformer | None = None,
    train_windows: torch.Tensor | None = None,
    held_out: datasets.Dataset | None = None,
    layer: int | None = None,
    probes_dir: str | Path | None = None,
    absorption_options: dict[str, Any] | None = None,
    command: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Harvest once, train every (method, target L0), evaluate all, write the report.

    Args:
        out: output folder (resumable: finished SAEs and evals are kept).
        preset: a key of :data:`COMPARE_PRESETS`, or a :class:`ComparePreset`.
        size: a key of the preset's sizes, or a :class:`CompareSize`.
        methods: SAELens training architectures from :data:`METHODS`
            (None: :data:`DEFAULT_METHODS`).
        evals: any of "core", "absorption".
        model_path: local model folder (Gemma-2-2B preset).
        dataset_path: a ``save_to_disk`` folder whose rows are split into training
            and held-out (default: the embedded Wikipedia slice, split by article).
        device: torch device.
        seed: seed of the SAE initialisations, batch order and window order.
        model: an already loaded model (used in its dtype) instead of the preset's.
        train_windows: (n, context) training token windows instead of the preset's.
        held_out: held-out windows ("tokens" column) instead of the preset's.
        layer: residual-stream block (default: the preset's).
        probes_dir: absorption ground-truth probe folder (default: the shared cache).
        absorption_options: further ``AbsorptionEvalConfig`` fields.
        command: the command line recorded in the report.
        progress: show progress bars.

    Returns:
        What ``compare.json`` holds.
    """
    chosen, size, methods = resolve_request(preset, size, methods, evals)
    try:
        require_saebench()
    except EvalError as err:
        raise CompareError(str(err)) from err
    out = Path(out)
    # Settings of finished SAEs are checked before the model is even loaded.
    records = {
        sae_name(m, t): trained_record(out / "saes" / sae_name(m, t), m, t, size)
        for m in methods
        for t in size.target_l0s
    }
    out.mkdir(parents=True, exist_ok=True)
    wall = time.perf_counter()
    model, model_name, hook_name = _model_and_hook(
        chosen, model, model_path, device, size.llm_dtype, layer
    )
    timings = {"model_load_s": time.perf_counter() - wall}
    train_label = held_label = "given token windows"
    if train_windows is None or held_out is None:
        windows, held, train_label, held_label = preset_data(
            chosen, model, dataset_path, seed
        )
        train_windows = windows if train_windows is None else train_windows
        held_out = held if held_out is None else held_out
    harvest_info: dict[str, Any] = {
        "seconds": 0.0,
        "first_harvest_seconds": _saved_harvest_seconds(out),
        "skipped": "all SAEs trained",
    }
    if any(record is None for record in records.values()):
        acts, harvest_info = load_or_harvest(
            out,
            model,
            hook_name,
            train_windows,
            size.training_tokens,
            size.harvest_batch_windows,
            progress,
        )
        metadata = _sae_metadata(model_name, hook_name, train_windows, train_label)
        train_device = str(model.cfg.device)
        train_pending(out, acts, size, records, metadata, seed, train_device, progress)
        del acts
    timings["harvest_s"] = harvest_info["seconds"]
    timings["train_s"] = sum(r.get("seconds_this_run", 0.0) for r in records.values())
    start = time.perf_counter()
    settings = size.eval_settings(len(held_out[0]["tokens"]))
    rows, memo = evaluate_all(
        out,
        records,
        model,
        (held_out, held_label),
        settings,
        evals,
        size.memo_bytes,
        probes_dir,
        absorption_options,
        progress,
    )
    timings["eval_s"] = time.perf_counter() - start
    timings["total_this_run_s"] = time.perf_counter() - wall
    header = {
        "command": command or _default_command(out, chosen.name, size, methods),
        "preset": chosen.name,
        "size": asdict(size),
        "methods": list(methods),
        "evals": list(evals),
        "seed": seed,
        "model": model_name,
        "hook_name": hook_name,
        "train_data": train_label,
        "held_out_data": held_label,
        "harvest": harvest_info,
        "timings": timings,
        "memoized_forward": memo,
    }
    return report(out, header, rows)


def evaluate_all(
    out: Path,
    records: dict[str, Any],
    model: HookedTransformer,
    held_out: tuple[datasets.Dataset, str],
    settings: EvalSettings,
    evals: Sequence[str],
    memo_bytes: int,
    probes_dir: str | Path | None = None,
    absorption_options: dict[str, Any] | None = None,
    progress: bool = True,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Evaluate every trained SAE (:func:`evaluate_one`) under one memoised model.

    Args:
        out: the comparison folder.
        records: SAE name -> training record.
        model: the loaded model.
        held_out: held-out windows and their label.
        settings: token counts, words, seed.
        evals: any of "core", "absorption".
        memo_bytes: cap of :func:`memoized_forward`.
        probes_dir: ground-truth probe folder (None: the shared cache).
        absorption_options: further ``AbsorptionEvalConfig`` fields.
        progress: show a progress bar.

    Returns:
        The ``compare.json`` rows and the memo's counters.
    """
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
            rows.append(result_row(record, results, folder))
    return rows, memo


def _saved_harvest_seconds(out: Path) -> float | None:
    """How long the harvest saved in ``out`` took (None without one)."""
    from safetensors import safe_open

    path = out / ACTIVATIONS_FILE
    if not path.is_file():
        return None
    with safe_open(path, framework="pt") as f:
        seconds = (f.metadata() or {}).get("seconds")
    return None if seconds is None else float(seconds)


def _model_and_hook(
    preset: ComparePreset,
    model: HookedTransformer | None,
    model_path: str | None,
    device: str,
    dtype: str,
    layer: int | None,
) -> tuple[HookedTransformer, str, str]:
    """The model (loaded unless given), the model name for the SAEs and the hook."""
    from sae_gba.presets import PRESETS

    model_preset = PRESETS[preset.model_preset]
    model_name = model_preset.model_name
    if model is None:
        model = load_compare_model(preset, model_path, device, dtype)
    else:
        model_name = model.cfg.model_name
    layer = model_preset.layer if layer is None else layer
    if not 0 <= layer < model.cfg.n_layers:
        raise CompareError(
            f"layer={layer} is invalid: the model has {model.cfg.n_layers} blocks"
        )
    return model, model_name, f"blocks.{layer}.hook_resid_post"


def _sae_metadata(
    model_name: str, hook_name: str, windows: torch.Tensor, data_label: str
) -> dict[str, Any]:
    """SAELens metadata of the saved SAEs, as SAELens's runner records it."""
    return {
        "model_name": model_name,
        "hook_name": hook_name,
        "context_size": int(windows.shape[1]),
        "prepend_bos": True,
        "exclude_special_tokens": True,
        "dataset_path": data_label,
        "model_class_name": "HookedTransformer",
    }


def train_pending(
    out: Path,
    acts: torch.Tensor,
    size: CompareSize,
    records: dict[str, dict[str, Any] | None],
    metadata: dict[str, Any],
    seed: int,
    device: str = "cpu",
    progress: bool = True,
) -> None:
    """Train the SAEs whose record is None, filling in their records.

    Args:
        out: the comparison folder (SAEs under ``out/saes``).
        acts: harvested activations (model dtype); rescaled per token here.
        size: the comparison size.
        records: SAE name -> training record, None where not trained yet (updated).
        metadata: SAELens metadata for the saved SAEs.
        seed: training seed.
        device: torch device to train on.
        progress: show a progress bar.
    """
    data = normalize_per_token(acts, size.train_dtype)
    pending = [name for name, record in records.items() if record is None]
    for name in tqdm(pending, desc="train", disable=not progress):
        method, target = name.rsplit("_L0-", 1)
        folder = out / "saes" / name
        folder.parent.mkdir(parents=True, exist_ok=True)
        record = train_one(
            method, float(target), data, size, folder, metadata, seed, device
        )
        record["seconds_this_run"] = record["train_seconds"]
        records[name] = record


def _cumulative_seconds(
    rows: Sequence[dict[str, Any]], harvest_info: dict[str, Any]
) -> dict[str, float | None]:
    """Seconds of each phase summed over every run that built this folder."""

    def total(key: str) -> float:
        return sum(r["eval_seconds"].get(key) or 0.0 for r in rows)

    return {
        "harvest": harvest_info.get("first_harvest_seconds"),
        "train": sum(r["train_seconds"] for r in rows),
        "eval_core": total("core"),
        "eval_absorption": total("absorption"),
    }


def report(
    out: Path, header: dict[str, Any], rows: list[dict[str, Any]]
) -> dict[str, Any]:
    """Write ``compare.json``, ``compare.md`` and the two plots; return the JSON.

    Args:
        out: the comparison folder.
        header: what ran (command, preset, size, methods, data, timings...).
        rows: one row per SAE (:func:`result_row`).
    """
    from evals.saebench import saebench_version

    summary = matched_summary(rows)
    result = {
        **header,
        "rows": rows,
        "matched_l0_vs_topk": summary,
        "gba_vs_topk": gba_vs_topk_text(summary),
        "cumulative_seconds": _cumulative_seconds(rows, header["harvest"]),
        "versions": f"sae_lens=={version('sae_lens')}, {saebench_version()}",
    }
    write_text_atomically(
        out / "compare.json", json.dumps(result, indent=1, default=float)
    )
    write_text_atomically(out / "compare.md", markdown_report(result))
    size = header["size"]
    title = (
        f"{header['model']} {header['hook_name']}, {size['d_sae']:,} latents, "
        f"{size['training_tokens']:,} tokens"
    )
    plot_curves(
        rows,
        [
            ("explained_variance_legacy", "explained variance (legacy, held-out)"),
            ("ce_loss_score", "CE loss score (held-out)"),
        ],
        out / "ev_vs_l0.png",
        title,
    )
    plot_curves(
        rows,
        [
            (
                "mean_absorption_fraction_score",
                "mean absorption fraction (lower is better)",
            ),
            ("mean_full_absorption_score", "mean full absorption (lower is better)"),
        ],
        out / "absorption_vs_l0.png",
        title,
    )
    return result
