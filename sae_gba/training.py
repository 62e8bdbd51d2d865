"""Training any SAELens training SAE on tensors with SAELens's own ``SAETrainer``.

Used by the synthetic lab, the comparison runs and the tests: the data provider is
deterministic and resumable, and checkpoints are written atomically (a temporary
folder renamed into place), so an interrupted run loses nothing and a resumed run
ends with the same weights as an uninterrupted one.
"""

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from sae_lens.config import LoggingConfig, SAETrainerConfig
from sae_lens.saes.sae import TrainingSAE
from sae_lens.training.sae_trainer import SAETrainer
from safetensors.torch import load_file

DATA_STATE_FILENAME = "data_provider_state.json"


class TensorDataProvider(Iterator[torch.Tensor]):
    """Endless batches from an in-memory activation tensor, reshuffled every epoch.

    The order is a function of ``(seed, epoch)``, so the provider's state is just
    two integers and a resumed provider yields exactly the batches it would have.

    Args:
        activations: (n_rows, d_in) float tensor.
        batch_size: rows per batch (<= n_rows).
        seed: shuffling seed.
    """

    def __init__(self, activations: torch.Tensor, batch_size: int, seed: int = 0):
        if activations.ndim != 2:
            raise ValueError(
                f"activations must be 2-D (n_rows, d_in), got shape {tuple(activations.shape)}"
            )
        if not 1 <= batch_size <= activations.shape[0]:
            raise ValueError(
                f"batch_size={batch_size} must be in [1, n_rows={activations.shape[0]}]"
            )
        self.activations = activations
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order = self._permutation()

    def _permutation(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.activations.shape[0], generator=generator)

    def __next__(self) -> torch.Tensor:
        if self.position + self.batch_size > self.activations.shape[0]:
            self.epoch += 1
            self.position = 0
            self._order = self._permutation()
        rows = self._order[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return self.activations[rows]

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed, self.epoch, self.position = (
            state["seed"],
            state["epoch"],
            state["position"],
        )
        self._order = self._permutation()


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
    return SAETrainer(cfg=cfg, sae=sae, data_provider=data_provider)


def save_checkpoint_atomically(
    trainer: SAETrainer[Any, Any], data_provider: TensorDataProvider, path: str | Path
) -> Path:
    """Write SAE, trainer and data state to ``path`` via a temporary sibling folder.

    Args:
        trainer: the trainer to checkpoint (its SAE keeps the GBA adaptation state).
        data_provider: the data provider, whose position is saved beside it.
        path: the checkpoint folder; replaced if it exists.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.save_checkpoint(checkpoint_name=tmp.name, base_path=tmp.parent)
    (tmp / DATA_STATE_FILENAME).write_text(json.dumps(data_provider.state_dict()))
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def resume_from_checkpoint(
    trainer: SAETrainer[Any, Any], data_provider: TensorDataProvider, path: str | Path
) -> None:
    """Restore what ``save_checkpoint_atomically`` wrote, so training continues exactly.

    Args:
        trainer: a freshly built trainer around a freshly built SAE of the same config.
        data_provider: a fresh provider over the same activations.
        path: the checkpoint folder.
    """
    path = Path(path)
    for name in ("sae_weights.safetensors", "trainer_state.pt", DATA_STATE_FILENAME):
        if not (path / name).is_file():
            raise FileNotFoundError(f"checkpoint {path} is missing {name}")
    trainer.load_trainer_state(path)
    state_dict = load_file(path / "sae_weights.safetensors")
    trainer.sae.process_state_dict_for_loading(state_dict)
    trainer.sae.load_state_dict(state_dict)
    data_provider.load_state_dict(json.loads((path / DATA_STATE_FILENAME).read_text()))
