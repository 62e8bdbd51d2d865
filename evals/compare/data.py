"""The comparison's data: the model and hook, the token windows, the memoised harvest."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sae_gba.lm.harvest import harvest
from sae_gba_evals.compare.config import CompareError, ComparePreset

if TYPE_CHECKING:
    import datasets
    from transformer_lens import HookedTransformer

ACTIVATIONS_FILE = "activations.safetensors"


def model_and_hook(
    preset: ComparePreset,
    model: HookedTransformer | None,
    model_path: str | None,
    device: str,
    dtype: str,
    layer: int | None,
) -> tuple[HookedTransformer, str, str]:
    """The model (loaded unless given), the model name for the SAEs and the hook.

    Args:
        preset: the comparison preset (its model preset names model and layer).
        model: an already loaded model, or None to load the preset's.
        model_path: local Hugging Face folder (Gemma-2-2B); None for the embedded
            model, or TransformerLens's own loading (Hub or HF cache) for Gemma-2.
        device: torch device.
        dtype: dtype name, e.g. "bfloat16".
        layer: residual-stream block (None: the preset's).
    """
    from sae_gba.presets import PRESETS, load_hooked_model

    model_preset = PRESETS[preset.model_preset]
    model_name = model_preset.model_name
    if model is None:
        try:
            model = load_hooked_model(
                model_preset, model_path, device=device, dtype=getattr(torch, dtype)
            )
        except (FileNotFoundError, ValueError) as err:
            raise CompareError(str(err)) from err
    else:
        model_name = model.cfg.model_name
    layer = model_preset.layer if layer is None else layer
    if not 0 <= layer < model.cfg.n_layers:
        raise CompareError(
            f"layer={layer} is invalid: the model has {model.cfg.n_layers} blocks"
        )
    return model, model_name, f"blocks.{layer}.hook_resid_post"


def _shuffled(windows: torch.Tensor, seed: int) -> torch.Tensor:
    # Harvesting reads windows in order: shuffled, a short run samples every article.
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed))
    return windows[order]


def preset_data(
    preset: ComparePreset,
    model: HookedTransformer,
    dataset_path: str | None,
    seed: int = 0,
) -> tuple[torch.Tensor, datasets.Dataset, str, str]:
    """Training windows (shuffled) and held-out windows, disjoint, with their labels.

    Read by :func:`sae_gba.lm.data.read_windows`: without ``dataset_path`` from the
    embedded Wikipedia slice, split by article; with it, from the folder's rows split
    90/10 (seeded).

    Returns:
        (training windows, held-out dataset with a "tokens" column, training label,
        held-out label).
    """
    from sae_gba.lm.data import read_windows, windows_dataset

    try:
        train, train_label = read_windows(
            model,
            "train",
            preset.context_size,
            dataset_path,
            split_rows_of_dataset=True,
        )
        held, held_label = read_windows(
            model,
            "held_out",
            preset.eval_context_size,
            dataset_path,
            split_rows_of_dataset=True,
        )
    except (FileNotFoundError, ValueError) as err:
        raise CompareError(str(err)) from err
    return _shuffled(train, seed), windows_dataset(held), train_label, held_label


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
    """Harvested activations (:func:`sae_gba.lm.harvest.harvest`), memoised in ``out``.

    The first run writes them to ``out/activations.safetensors`` in the model's
    dtype; a later run with the same model, hook and token count reads them back.
    Not SAELens's ``MultiSAETrainingRunner``: it trains all SAEs in lockstep from its own buffer, so none can finish, resume or be initialised from data alone.

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
    try:
        acts = harvest(model, hook_name, windows, n_tokens, batch_windows, progress)
    except ValueError as err:
        raise CompareError(
            f"the training split is too short for training_tokens ({err}): use a "
            "smaller size or more data"
        ) from err
    seconds = time.perf_counter() - start
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(
        {"acts": acts.contiguous()}, tmp, metadata={**key, "seconds": f"{seconds}"}
    )
    os.replace(tmp, path)
    info = {"seconds": seconds, "first_harvest_seconds": seconds, "reused": False}
    return acts, info


def saved_harvest_seconds(out: Path) -> float | None:
    """How long the harvest saved in ``out`` took (None without one)."""
    from safetensors import safe_open

    path = out / ACTIVATIONS_FILE
    if not path.is_file():
        return None
    with safe_open(path, framework="pt") as f:
        seconds = (f.metadata() or {}).get("seconds")
    return None if seconds is None else float(seconds)
