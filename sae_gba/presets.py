"""GBA training on a model preset (``sae_gba.model_presets``): the embedded showcase
and the paper's Gemma-2-2B.

:func:`gba_runner_config` turns a preset into an ordinary SAELens
``LanguageModelSAERunnerConfig`` (``architecture="gba"``), :func:`load_hooked_model`
loads its model (Gemma-2-2B from a local Hugging Face folder, since the Hub may be
unreachable) and :func:`train_preset` runs SAELens's ``LanguageModelSAETrainingRunner``
on them.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sae_gba.model_presets import (  # noqa: F401 (public names, defined there)
    BUFFER_FIELDS,
    EMBEDDED,
    EMBEDDED_DATASET,
    GEMMA_2_2B,
    PRESETS,
    ModelPreset,
    preset_for_run,
)

if TYPE_CHECKING:
    import datasets
    import torch
    from sae_lens import LanguageModelSAERunnerConfig
    from sae_lens.saes.sae import TrainingSAE
    from transformer_lens import HookedTransformer

# The saved sparsity covers this many final training tokens (as in the demo).
LAST_WINDOW_TOKENS = 100_000


def gba_runner_config(
    preset: ModelPreset,
    *,
    output_path: str,
    d_sae: int | None = None,
    training_tokens: int | None = None,
    layer: int | None = None,
    device: str = "cpu",
    checkpoint_path: str | None = None,
    architecture: str = "gba",
    **sae_overrides: Any,
) -> LanguageModelSAERunnerConfig[Any]:
    """An ordinary SAELens runner config for an SAE on ``preset`` (wandb off).

    Args:
        preset: the model preset.
        output_path: folder the final SAE is written to.
        d_sae: number of latents; None keeps the preset's.
        training_tokens: training length; None keeps the preset's.
        layer: residual stream block; None keeps the preset's.
        device: torch device for the SAE and the model.
        checkpoint_path: folder for SAELens checkpoints; None saves none.
        architecture: any registered SAELens training architecture (``gba``,
            ``weighted_gba``, ``topk``, ``weighted_topk``, ...).
        **sae_overrides: further fields of that architecture's training config
            (``n_groups``, ``adaptation_interval``, ``k``, ...).
    """
    from sae_lens import LanguageModelSAERunnerConfig, LoggingConfig
    from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY

    if architecture not in SAE_TRAINING_CLASS_REGISTRY:
        raise ValueError(
            f"architecture={architecture!r} is invalid: must be one of "
            f"{sorted(SAE_TRAINING_CLASS_REGISTRY)}"
        )
    config_class = SAE_TRAINING_CLASS_REGISTRY[architecture][1]
    layer = preset.layer if layer is None else layer
    if layer < 0:
        raise ValueError(f"layer must be >= 0, got {layer}")
    training_tokens = (
        preset.training_tokens if training_tokens is None else training_tokens
    )
    sae_kwargs: dict[str, Any] = {
        "d_in": preset.d_in,
        "d_sae": preset.d_sae if d_sae is None else d_sae,
        # GBA is scale free; per-token rescaling only keeps outlier tokens tame.
        "normalize_activations": "constant_norm_rescale",
    }
    if "adaptation_interval" in {f.name for f in dataclasses.fields(config_class)}:
        sae_kwargs["adaptation_interval"] = preset.adaptation_interval
    sae_kwargs.update(sae_overrides)
    total_steps = training_tokens // preset.batch_tokens
    last_steps = math.ceil(LAST_WINDOW_TOKENS / preset.batch_tokens)
    return LanguageModelSAERunnerConfig(
        sae=config_class(**sae_kwargs),
        model_name=preset.model_name,
        hook_name=preset.hook_name_at(layer),
        dataset_path=preset.dataset_path,
        streaming=preset.streaming,
        context_size=preset.context_size,
        prepend_bos=True,
        # BOS activations are outliers (norms far above the rest) and not text.
        exclude_special_tokens=True,
        training_tokens=training_tokens,
        train_batch_size_tokens=preset.batch_tokens,
        store_batch_size_prompts=preset.store_batch_size_prompts,
        n_batches_in_buffer=preset.n_batches_in_buffer,
        lr=preset.lr,
        # The last sparsity window (the one saved with the SAE) covers exactly the
        # final LAST_WINDOW_TOKENS training tokens.
        feature_sampling_window=max(total_steps - last_steps, last_steps + 1),
        dead_feature_window=last_steps,
        seed=preset.seed,
        device=device,
        logger=LoggingConfig(log_to_wandb=False),
        output_path=output_path,
        checkpoint_path=checkpoint_path,
        verbose=False,
    )


def load_hooked_model(
    preset: ModelPreset,
    model_path: str | None,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
) -> HookedTransformer:
    """Load the preset's model with :func:`sae_gba.lm.models.load_model`.

    Args:
        preset: the model preset.
        model_path: for Gemma-2 presets, a local Hugging Face folder; None loads
            ``preset.model_name`` through TransformerLens (Hub or HF cache). The
            embedded preset takes no path: its model ships with the package.
        device: torch device for the weights.
        dtype: weight dtype of the returned model (None: float32).
    """
    import torch

    from sae_gba.embedded import EMBEDDED_MODEL_NAME
    from sae_gba.lm.models import load_model

    if preset.model_name == EMBEDDED_MODEL_NAME and model_path is not None:
        raise ValueError(
            f"preset {preset.name!r} loads the embedded Gemma-3-270M; it takes no "
            f"model path (got {model_path!r})"
        )
    return load_model(
        preset.model_name,
        model_path,
        d_in=preset.d_in,
        device=device,
        dtype=torch.float32 if dtype is None else dtype,
    )


def check_dataset_size(
    data: datasets.Dataset, preset: ModelPreset, where: str | Path
) -> None:
    """Refuse a dataset too short to fill one of the runner's model batches.

    SAELens repeats a dataset shorter than the run (with a warning), but one that
    cannot fill a single batch of ``store_batch_size_prompts`` windows fails deep in
    its buffer with no word on the size.

    Args:
        data: the loaded dataset.
        preset: the run's preset (window length and windows per batch).
        where: the dataset folder (for the message).
    """
    from sae_gba.lm.windows import token_column

    needed = preset.store_batch_size_prompts
    column = token_column(data)
    if column == "text":
        if len(data) == 0:
            raise ValueError(f"dataset folder {where} has no rows")
        return
    tokens = sum(len(row) for row in data[:needed][column])
    if len(data) < needed:
        raise ValueError(
            f"dataset folder {where} has {len(data)} rows ({tokens} tokens); one "
            f"model batch needs {needed} windows of {preset.context_size} tokens "
            f"({needed * preset.context_size} tokens)"
        )


def train_preset(
    preset: ModelPreset,
    out: str | Path,
    *,
    model_path: str | None = None,
    dataset_path: str | None = None,
    d_sae: int | None = None,
    training_tokens: int | None = None,
    layer: int | None = None,
    device: str = "cpu",
    architecture: str = "gba",
    resume: bool = False,
    checkpoint_interval_s: float = 300.0,
    **sae_overrides: Any,
) -> TrainingSAE[Any]:
    """Train an SAE on ``preset`` with SAELens's runner; the SAE goes to ``out/sae``.

    Checkpoints go to ``out/checkpoints`` (every ``checkpoint_interval_s`` and on
    Ctrl-C; see :class:`sae_gba.training.ResumableRunner`) and are removed once the
    SAE is written.

    Args:
        preset: the model preset.
        out: output folder (``sae`` and ``checkpoints`` inside).
        model_path: local model folder (see :func:`load_hooked_model`).
        dataset_path: local dataset folder
            (:func:`sae_gba.lm.windows.load_local_dataset`); None
            uses the embedded Wikipedia slice for the embedded preset and streams
            ``preset.dataset_path`` otherwise.
        d_sae: number of latents; None keeps the preset's.
        training_tokens: training length; None keeps the preset's.
        layer: residual stream block; None keeps the preset's.
        device: torch device for the SAE and the model.
        architecture: the training architecture (see :func:`gba_runner_config`).
        resume: continue from the newest checkpoint in ``out/checkpoints`` (same
            settings required).
        checkpoint_interval_s: seconds between checkpoints.
        **sae_overrides: further fields of the architecture's training config.

    Returns:
        The trained SAE (its exported inference form is in ``out/sae``).
    """
    import torch

    out = Path(out)
    cfg = gba_runner_config(
        preset,
        output_path=str(out / "sae"),
        d_sae=d_sae,
        training_tokens=training_tokens,
        layer=layer,
        device=device,
        architecture=architecture,
        **sae_overrides,
    )
    # Check the resumed config and the data before the (possibly minutes-long)
    # model load.
    dataset = _checked_inputs(cfg, preset, out, resume, dataset_path)
    model = load_hooked_model(preset, model_path, device=device)
    layer = preset.layer if layer is None else layer
    if layer >= model.cfg.n_layers:
        raise ValueError(
            f"layer {layer} does not exist: the model has {model.cfg.n_layers} layers"
        )
    # SAELens's runner seeds nothing: the SAE's initialisation and the activation
    # buffer's shuffles come from torch's global generator.
    torch.manual_seed(preset.seed)
    return run_training(
        cfg,
        preset,
        out,
        model,
        dataset,
        resume=resume,
        checkpoint_interval_s=checkpoint_interval_s,
    )


def _checked_inputs(
    cfg: LanguageModelSAERunnerConfig[Any],
    preset: ModelPreset,
    out: Path,
    resume: bool,
    dataset_path: str | None,
) -> datasets.Dataset | None:
    """The local dataset (None: the preset's), after checking it and, on resume, that
    the newest checkpoint was written with the same runner config."""
    from sae_gba.lm.windows import load_local_dataset
    from sae_gba.training import (
        RUNNER_CFG_FILENAME,
        check_same_config,
        latest_checkpoint,
    )

    checkpoint = latest_checkpoint(out / "checkpoints") if resume else None
    if checkpoint is not None:
        check_same_config(cfg, checkpoint / RUNNER_CFG_FILENAME)
    dataset = load_local_dataset(dataset_path) if dataset_path is not None else None
    if dataset is not None:
        check_dataset_size(dataset, preset, dataset_path)
    return dataset


def run_training(
    cfg: LanguageModelSAERunnerConfig[Any],
    preset: ModelPreset,
    out: Path,
    model: HookedTransformer,
    dataset: datasets.Dataset | None = None,
    *,
    resume: bool = False,
    checkpoint_interval_s: float = 300.0,
) -> TrainingSAE[Any]:
    """SAELens's runner on ``cfg``, resumable, with checkpoints in ``out/checkpoints``.

    The checkpoints (:class:`sae_gba.training.ResumableRunner`) are removed once the
    SAE is written. The caller seeds torch's global generator.

    Args:
        cfg: the runner config (:func:`gba_runner_config`).
        preset: the model preset (the embedded one supplies its own data).
        out: output folder.
        model: the loaded model.
        dataset: the training data; None uses the embedded Wikipedia slice (shuffled
            with ``preset.seed``) for the embedded preset and ``cfg.dataset_path``
            otherwise.
        resume: continue from the newest checkpoint.
        checkpoint_interval_s: seconds between checkpoints.
    """
    import shutil

    from sae_gba.training import ResumableRunner

    if dataset is None and preset.dataset_path == EMBEDDED_DATASET:
        from sae_gba.embedded import embedded_token_dataset

        dataset = embedded_token_dataset("train", preset.context_size).shuffle(
            seed=preset.seed
        )
    runner = ResumableRunner(
        cfg,
        checkpoint_dir=out / "checkpoints",
        resume=resume,
        checkpoint_interval_s=checkpoint_interval_s,
        override_model=model,
        override_dataset=dataset,
    )
    sae = runner.run()
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return sae
