"""One rank of a data-parallel run (``sae_gba.distributed``): joining the process
group, averaging gradients, broadcasting state, collecting counts on rank 0, this
rank's rows of every global batch and its checkpointed ``fit``."""

import os
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from sae_lens.training.sae_trainer import SAETrainer
from typing_extensions import override

from sae_gba.collectives import (
    keep_counts_on_first_rank,
    parallel,
    rank_and_world,
    reduce_window,
)
from sae_gba.training import (
    CheckpointedFit,
    check_finite,
    latest_checkpoint,
    resume_from_checkpoint,
)

# Seconds a collective waits for a rank that is alive but stuck; a rank that died is
# noticed as soon as its connections close.
DEFAULT_TIMEOUT_S = 600.0


def init_process_group(device: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Join the job ``torchrun`` started (rank, world and rendezvous from its env).

    Args:
        device: the training device: ``cuda`` selects nccl and this rank's GPU
            (``LOCAL_RANK``), anything else gloo.
        timeout_s: how long a collective waits for a stuck rank.
    """
    if device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))


def collect_on_first_rank(trainer: SAETrainer[Any, Any]) -> None:
    """Sum every rank's counts onto rank 0 (SAE windows, the trainer's firing counts).

    The global values are unchanged (the others hold zeros afterwards), so training
    continues exactly; rank 0 can then write them.
    """
    if not parallel():
        return
    sae = trainer.sae
    if _has_window(sae):
        reduce_window(sae)
    dist.all_reduce(trainer.act_freq_scores)
    samples = torch.tensor(trainer.n_frac_active_samples, device=sae.device)
    dist.all_reduce(samples)
    trainer.n_frac_active_samples = int(samples)
    _drop_share_off_first_rank(trainer)


def _drop_share_off_first_rank(trainer: SAETrainer[Any, Any]) -> None:
    """Ranks other than 0 forget the summed counts (rank 0 holds them)."""
    if _has_window(trainer.sae):
        keep_counts_on_first_rank(trainer.sae)
    if dist.get_rank() != 0:
        trainer.act_freq_scores.zero_()
        trainer.n_frac_active_samples = 0


def _has_window(sae: Any) -> bool:
    return hasattr(sae, "window_fire_counts")


def average_gradients(module: torch.nn.Module) -> list[Any]:
    """Average each trained parameter's gradient over the ranks once accumulated.

    Returns:
        The hook handles (``.remove()`` them to stop).
    """
    world = dist.get_world_size()

    def average(param: torch.Tensor) -> None:
        assert param.grad is not None
        dist.all_reduce(param.grad)
        param.grad.div_(world)

    return [
        param.register_post_accumulate_grad_hook(average)
        for param in module.parameters()
        if param.requires_grad
    ]


def broadcast_state(module: torch.nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers."""
    with torch.no_grad():
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)


class RankSlice(Iterator[torch.Tensor]):
    """This rank's rows of every global batch of ``data``: rows ``[r k, (r+1) k)``.

    Args:
        data: a resumable provider of global batches (``TensorDataProvider``); its
            position is the same on every rank.
    """

    def __init__(self, data: Any):
        self.data = data
        self.rank, self.world = rank_and_world()

    def __next__(self) -> torch.Tensor:
        batch = next(self.data)
        rows = batch.shape[0] // self.world
        return batch[self.rank * rows : (self.rank + 1) * rows]

    def save_state(self, folder: Path) -> None:
        """Write the global position into a checkpoint folder."""
        self.data.save_state(folder)

    def load_state(self, folder: Path) -> None:
        """Continue from the global position saved in a checkpoint folder."""
        self.data.load_state(folder)


class ParallelFit(CheckpointedFit):
    """:class:`CheckpointedFit` for one rank of a data-parallel run.

    Every step the ranks agree on whether to checkpoint (rank 0's clock) or stop
    (Ctrl-C or SIGTERM on any rank) and take the minimum of the dead-latent counters.
    A checkpoint first collects the counts on rank 0, which writes it.
    """

    def __next__(self) -> torch.Tensor:
        trainer = self.trainer
        due = dist.get_rank() == 0 and (
            time.monotonic() - self.saved_at >= self.interval_s
        )
        flags = torch.tensor([int(due), int(self.stop)], device=trainer.sae.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        due, self.stop = bool(flags[0]), bool(flags[1])
        if (due or self.stop) and trainer.n_training_steps > self.saved_steps:
            self.checkpoint()
        if self.stop:
            raise KeyboardInterrupt
        dist.all_reduce(trainer.n_forward_passes_since_fired, op=dist.ReduceOp.MIN)
        batch = next(self.data)
        check_finite(batch, trainer.n_training_steps)
        return batch

    def checkpoint(self) -> Path:
        """Collect the counts on rank 0, which writes the checkpoint."""
        collect_on_first_rank(self.trainer)
        return super().checkpoint()

    @override
    def writes_checkpoints(self) -> bool:
        return dist.get_rank() == 0

    def resume(self) -> Path | None:
        """Continue from the newest checkpoint, on any number of ranks.

        Rank 0 takes the saved counts; the global batches, and so the data position,
        are the same for any number of ranks.
        """
        path = latest_checkpoint(self.folder)
        if path is not None:
            resume_from_checkpoint(self.trainer, self.data, path)
            # The saved sample count is per rank: recount it for this world size.
            trainer = self.trainer
            local = trainer.cfg.train_batch_size_samples
            trainer.n_training_samples = trainer.n_training_steps * local
            _drop_share_off_first_rank(trainer)
            self.saved_steps = self.trainer.n_training_steps
        return path


def estimate_scaling_factor(trainer: SAETrainer[Any, Any], data: Any) -> None:
    """SAELens's ``expected_average_only_in`` factor from the global batches.

    The same batches and formula as ``ActivationScaler.estimate_scaling_factor``
    (``sqrt(d_in) / mean norm``), with the norms summed over the ranks; the trainer
    then skips its own, per-rank estimate. A resumed run keeps the saved factor.
    """
    cfg = trainer.sae.cfg
    scaler = trainer.activation_scaler
    if cfg.normalize_activations != "expected_average_only_in" or (
        scaler.scaling_factor is not None
    ):
        return
    totals = torch.zeros(2, dtype=torch.float64, device=trainer.sae.device)
    for _ in range(trainer.cfg.n_batches_for_norm_estimate):
        norms = next(data).norm(dim=-1)
        totals[0] += norms.float().sum().item()
        totals[1] += norms.numel()
    dist.all_reduce(totals)
    scaler.scaling_factor = cfg.d_in**0.5 / float(totals[0] / totals[1])
