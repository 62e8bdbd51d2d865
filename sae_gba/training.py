"""Resumable training with SAELens's own ``SAETrainer`` and training runner.

- :class:`TensorDataProvider` feeds in-memory activations (the synthetic lab, the
  comparison runs, the tests); :class:`ActivationStream` feeds SAELens's
  ``ActivationsStore`` (model activations). Both save their exact position
  (``sae_gba.data_providers``).
- :func:`save_checkpoint_atomically` / :func:`resume_from_checkpoint` write and read a
  checkpoint: SAE (with the GBA and weighting state in its buffers), optimizer,
  scheduler, trainer counters and data position, written to a temporary sibling and
  renamed into place, so a killed writer leaves the previous checkpoint.
- :class:`CheckpointedFit` runs ``trainer.fit()`` with a checkpoint every few minutes
  and one on Ctrl-C or SIGTERM; :class:`ResumableRunner` is SAELens's
  ``LanguageModelSAETrainingRunner`` with those and an atomic final SAE folder.

A resumed run ends with the same weights as an uninterrupted one (same seed, CPU).
"""

import json
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from sae_lens import LanguageModelSAETrainingRunner
from sae_lens.config import LoggingConfig, SAETrainerConfig
from sae_lens.saes.sae import TrainingSAE
from sae_lens.training.sae_trainer import SAETrainer
from safetensors.torch import load_file
from typing_extensions import override

from sae_gba.atomic import replace_folder
from sae_gba.data_providers import (  # noqa: F401 (public names, defined there)
    DATA_STATE_FILENAME,
    STREAM_STATE_FILENAME,
    STREAM_TENSORS_FILENAME,
    ActivationStream,
    TensorDataProvider,
)
from sae_gba.gba_sae import _check_finite as check_finite

RUNNER_CFG_FILENAME = "runner_cfg.json"
CHECKPOINT_PREFIX = "step_"
# Devices with torch's fused Adam kernel, which make_trainer switches to.
FUSED_ADAM_DEVICES = ("cpu", "cuda")


def make_trainer(
    sae: TrainingSAE[Any],
    data_provider: Iterator[torch.Tensor],
    total_tokens: int,
    batch_size: int,
    lr: float = 3e-4,
    checkpoint_path: str | None = None,
    **trainer_kwargs: Any,
) -> SAETrainer[Any, Any]:
    """An ``SAETrainer`` with wandb off (SAELens's own loop, clipping and Adam).

    SAELens's Adam runs as torch's fused kernel (:func:`use_fused_adam`): the same
    hyperparameters, scheduler and state.

    Args:
        sae: the training SAE.
        data_provider: iterator of (batch_size, d_in) tensors.
        total_tokens: training length in rows.
        batch_size: rows per step.
        lr: Adam learning rate.
        checkpoint_path: folder for checkpoints (None: none).
        trainer_kwargs: further ``SAETrainerConfig`` fields.
    """
    cfg = SAETrainerConfig(
        total_training_samples=total_tokens,
        train_batch_size_samples=batch_size,
        lr=lr,
        lr_end=trainer_kwargs.pop("lr_end", lr / 10),
        device=str(sae.device),
        checkpoint_path=checkpoint_path,
        logger=LoggingConfig(log_to_wandb=False),
        **trainer_kwargs,
    )
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=data_provider)
    use_fused_adam(trainer.optimizer)
    return trainer


def use_fused_adam(optimizer: torch.optim.Optimizer) -> None:
    """Switch an Adam optimizer to torch's fused kernel where its parameters allow.

    The default CPU Adam makes about six passes over every parameter (and allocates
    temporaries as large); the fused one updates each in one pass, to float rounding
    the same. Parameters on devices without the kernel, or not floating point, keep
    the default. A state dict loaded later brings its own setting, so a checkpoint
    saved before the switch resumes as it was trained.

    Args:
        optimizer: a ``torch.optim.Adam`` whose steps have not started.
    """
    for group in optimizer.param_groups:
        group["fused"] = not (group["foreach"] or group["differentiable"]) and all(
            p.device.type in FUSED_ADAM_DEVICES and p.is_floating_point()
            for p in group["params"]
        )


def save_checkpoint_atomically(
    trainer: SAETrainer[Any, Any], data_provider: Any, path: str | Path
) -> Path:
    """Write SAE, trainer and data state to ``path`` via a temporary sibling folder.

    Args:
        trainer: the trainer to checkpoint (its SAE keeps the GBA adaptation state).
        data_provider: a :class:`TensorDataProvider` or :class:`ActivationStream`,
            whose position is saved beside it.
        path: the checkpoint folder; replaced if it exists.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.save_checkpoint(checkpoint_name=tmp.name, base_path=tmp.parent)
    data_provider.save_state(tmp)
    replace_folder(tmp, path)
    return path


def resume_from_checkpoint(
    trainer: SAETrainer[Any, Any], data_provider: Any, path: str | Path
) -> None:
    """Restore what ``save_checkpoint_atomically`` wrote, so training continues exactly.

    Args:
        trainer: a freshly built trainer around a freshly built SAE of the same config.
        data_provider: a fresh provider over the same data.
        path: the checkpoint folder.
    """
    path = Path(path)
    for name in ("sae_weights.safetensors", "trainer_state.pt"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"checkpoint {path} is missing {name}")
    trainer.load_trainer_state(path)
    state_dict = load_file(path / "sae_weights.safetensors")
    trainer.sae.process_state_dict_for_loading(state_dict)
    trainer.sae.load_state_dict(state_dict)
    data_provider.load_state(path)


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The checkpoint of the most training steps in ``folder`` (None: there is none)."""
    found = sorted(Path(folder).glob(f"{CHECKPOINT_PREFIX}*"))
    return found[-1] if found else None


class CheckpointedFit(Iterator[torch.Tensor]):
    """Runs ``trainer.fit()`` with a checkpoint every ``interval_s`` and on Ctrl-C.

    It stands between the trainer and its data: the trainer asks it for each batch
    once the previous step is complete, which is when a checkpoint is consistent.
    Ctrl-C or SIGTERM finish the current step, write a checkpoint and raise
    ``KeyboardInterrupt``; a second Ctrl-C stops at once. Only the newest checkpoint
    (``folder/step_<n>``) is kept.

    Args:
        trainer: the trainer; its ``data_provider`` is replaced by this object.
        data: what the trainer drew from (with ``save_state``/``load_state``).
        folder: where checkpoints go.
        interval_s: seconds between checkpoints.
    """

    def __init__(
        self,
        trainer: SAETrainer[Any, Any],
        data: Any,
        folder: str | Path,
        interval_s: float = 300.0,
    ):
        self.trainer, self.data, self.folder = trainer, data, Path(folder)
        self.interval_s = interval_s
        self.saved_steps = trainer.n_training_steps
        self.saved_at = time.monotonic()
        self.stop = False
        trainer.data_provider = self

    def resume(self) -> Path | None:
        """Continue from the newest checkpoint in the folder, if there is one."""
        path = latest_checkpoint(self.folder)
        if path is not None:
            resume_from_checkpoint(self.trainer, self.data, path)
            self.saved_steps = self.trainer.n_training_steps
        return path

    def __next__(self) -> torch.Tensor:
        due = self.stop or time.monotonic() - self.saved_at >= self.interval_s
        if due and self.trainer.n_training_steps > self.saved_steps:
            self.checkpoint()
        if self.stop:
            raise KeyboardInterrupt
        batch = next(self.data)
        # Stop at the step that would train on them, whatever the architecture.
        check_finite(batch, self.trainer.n_training_steps)
        return batch

    def checkpoint(self) -> Path:
        """Write a checkpoint now and drop the older ones."""
        steps = self.trainer.n_training_steps
        path = self.folder / f"{CHECKPOINT_PREFIX}{steps:09d}"
        if self.writes_checkpoints():
            save_checkpoint_atomically(self.trainer, self.data, path)
            for old in self.folder.glob(f"{CHECKPOINT_PREFIX}*"):
                if old != path:
                    shutil.rmtree(old, ignore_errors=True)
        self.saved_steps, self.saved_at = steps, time.monotonic()
        return path

    def writes_checkpoints(self) -> bool:
        """Whether this process writes the files (one rank of several does not)."""
        return True

    def fit(self) -> Any:
        """``trainer.fit()`` with the signal handlers in place."""

        def on_signal(signum: int, frame: Any) -> None:
            if self.stop:
                raise KeyboardInterrupt
            self.stop = True

        previous = {}
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, on_signal)
        except ValueError:
            pass  # not the main thread: no handlers, Ctrl-C stops at once
        try:
            return self.trainer.fit()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


class ResumableRunner(LanguageModelSAETrainingRunner):
    """SAELens's training runner with exact resume and nothing half-written.

    Differences from ``LanguageModelSAETrainingRunner``: checkpoints (every
    ``checkpoint_interval_s``, and on Ctrl-C/SIGTERM) go to ``checkpoint_dir``
    atomically and carry the exact data position (:class:`ActivationStream`);
    ``resume=True`` continues from the newest one after checking that the
    configuration is the one it was written with; the final SAE folder is written
    beside ``output_path`` and renamed into place. (SAELens's own interruption
    handler saves only the data position, into a folder it never creates.)

    Args:
        cfg: the runner config (``prefetch_llm_batches`` must be off).
        checkpoint_dir: the checkpoint folder.
        resume: continue from the newest checkpoint in ``checkpoint_dir``.
        checkpoint_interval_s: seconds between checkpoints.
        **kwargs: ``override_model``, ``override_dataset``, ``override_sae``.
    """

    def __init__(
        self,
        cfg: Any,
        *,
        checkpoint_dir: str | Path,
        resume: bool = False,
        checkpoint_interval_s: float = 300.0,
        **kwargs: Any,
    ):
        if cfg.prefetch_llm_batches:
            raise ValueError(
                "prefetch_llm_batches must be off for a resumable run (the prefetch "
                "thread's position cannot be saved)"
            )
        self.checkpoint_dir = Path(checkpoint_dir)
        self.resume = resume
        self.checkpoint_interval_s = checkpoint_interval_s
        if resume and (path := latest_checkpoint(self.checkpoint_dir)) is not None:
            check_same_config(cfg, path / RUNNER_CFG_FILENAME)
        super().__init__(cfg, **kwargs)

    @override
    def run_trainer_with_interruption_handling(self, trainer: Any) -> Any:
        stream = ActivationStream(self.activations_store)
        fit = CheckpointedFit(
            trainer, stream, self.checkpoint_dir, self.checkpoint_interval_s
        )
        if self.resume:
            fit.resume()
        return fit.fit()

    @override
    def save_final_sae(
        self,
        sae: TrainingSAE[Any],
        output_path: str,
        log_feature_sparsity: torch.Tensor | None = None,
    ) -> None:
        out = Path(output_path)
        tmp = out.with_name(f".{out.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        super().save_final_sae(sae, str(tmp), log_feature_sparsity)
        replace_folder(tmp, out)


def config_differences(saved: Any, wanted: Any, prefix: str = "") -> list[str]:
    """``field: saved -> wanted`` for every (nested) field whose value differs."""
    if isinstance(saved, dict) and isinstance(wanted, dict):
        return [
            diff
            for key in sorted(set(saved) | set(wanted))
            for diff in config_differences(
                saved.get(key), wanted.get(key), f"{prefix}{key}."
            )
        ]
    if saved == wanted:
        return []
    return [f"{prefix.rstrip('.')}: {saved!r} -> {wanted!r}"]


def check_same_config(cfg: Any, saved_path: Path) -> None:
    """Refuse to resume under another configuration than the checkpoint's.

    Args:
        cfg: the runner config of this run.
        saved_path: the checkpoint's ``runner_cfg.json``.
    """
    saved = json.loads(saved_path.read_text())
    wanted = json.loads(json.dumps(cfg.to_dict()))
    # Where the run's files go is not its configuration (SAELens even appends a
    # random id to checkpoint_path), and a run folder may have been moved.
    for config in (saved, wanted):
        config.pop("checkpoint_path", None)
        config.pop("output_path", None)
    if differences := config_differences(saved, wanted):
        raise ValueError(
            f"cannot resume from {saved_path.parent}: it was written with another "
            f"configuration ({'; '.join(differences)}); resume with the same "
            "settings or start over"
        )
