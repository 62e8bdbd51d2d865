"""Data-parallel training on ``torch.distributed`` (gloo on CPU, nccl on GPUs).

Launched by ``torchrun`` (or ``sae-gba train --nproc N``, which calls it), every rank
builds the same SAE and SAELens ``SAETrainer``, trains on its own rows of every
global batch (:class:`RankSlice`, or ``activation_cache.CachedActivations``, which
reads only those rows) and keeps its replica equal to the others':

- gradients are averaged over the ranks as each is accumulated (hooks on the
  parameters), before SAELens clips them and takes the Adam step. DDP cannot wrap the
  SAE: SAELens's trainer calls ``training_forward_pass``, not ``forward``;
- GBA's window statistics are summed (fire and token counts) and maxed (peaks) before
  every bias adaptation (``collectives.synchronized_window``), so every rank applies the same
  update; between adaptations each rank counts only its own rows;
- GBA's first batch (input scale, pre-bias, quantile biases) and the weighted SAEs'
  variance batches are gathered from every rank (``collectives.gather_rows``);
- SAELens's dead-latent counters take the minimum over ranks every step (TopK's
  aux-k loss reads them); its firing counts are summed before a checkpoint and at
  the end.

So a run on N ranks takes the steps of one process fed the same global batches
(``tests/test_distributed.py``). Rank 0 writes the checkpoints and the final SAE. The
global batches do not depend on the number of ranks, so a run resumes exactly on any
number of them, from a checkpoint folder every rank can read. Steps that depend on
the whole batch see each rank's rows only (BatchTopK's batch-level top-k and its
running threshold), as in other data-parallel SAE trainers. The SAEs' hooks
(``sae_gba.collectives``) do nothing without a process group, so single-process
training is what it was.
"""

import os
import shutil
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from sae_lens.saes.sae import TrainingSAE
from sae_lens.training.sae_trainer import SAETrainer
from typing_extensions import override

from sae_gba.atomic import replace_folder
from sae_gba.collectives import (
    keep_counts_on_first_rank,
    parallel,
    rank_and_world,
    reduce_window,
)
from sae_gba.progress import progress_bars
from sae_gba.training import (
    CheckpointedFit,
    check_finite,
    latest_checkpoint,
    make_trainer,
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


def _estimate_scaling_factor(trainer: SAETrainer[Any, Any], data: Any) -> None:
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


def train_parallel(
    sae: TrainingSAE[Any],
    data: Iterator[torch.Tensor],
    *,
    total_tokens: int,
    batch_size: int,
    folder: str | Path,
    checkpoint_interval_s: float = 300.0,
    resume: bool = False,
    **trainer_kwargs: Any,
) -> TrainingSAE[Any]:
    """Train ``sae`` as this rank of the process group; rank 0 writes ``folder/sae``.

    Args:
        sae: the training SAE, built the same way on every rank (rank 0's state is
            broadcast).
        data: this rank's rows of every global batch (:class:`RankSlice` or
            ``CachedActivations``), with ``save_state``/``load_state``.
        total_tokens: training length in rows, over all ranks.
        batch_size: rows per global batch (a multiple of the world size).
        folder: run folder: ``checkpoints`` and the exported ``sae`` go inside.
        checkpoint_interval_s: seconds between checkpoints (rank 0's clock).
        resume: continue from the newest checkpoint in ``folder/checkpoints``.
        trainer_kwargs: ``make_trainer`` options (``lr``, ``lr_end``, ...).

    Returns:
        The trained SAE (on rank 0 with the counts of every rank).
    """
    if not parallel():
        raise ValueError(
            "train_parallel needs a process group: launch with torchrun (or "
            "sae-gba train --nproc N) and call init_process_group first"
        )
    rank, world = rank_and_world()
    if batch_size % world:
        raise ValueError(
            f"batch_size={batch_size} is invalid: must be a multiple of the "
            f"{world} ranks"
        )
    if sae.cfg.normalize_activations == "covariance_whitening":
        raise ValueError(
            "normalize_activations='covariance_whitening' is not supported in "
            "data-parallel training (each rank would estimate its own whitening); "
            "use expected_average_only_in, constant_norm_rescale or none"
        )
    folder = Path(folder)
    steps = total_tokens // batch_size
    broadcast_state(sae)
    local = batch_size // world
    trainer = make_trainer(
        sae, data, total_tokens=steps * local, batch_size=local, **trainer_kwargs
    )
    hooks = average_gradients(sae)
    fit = ParallelFit(trainer, data, folder / "checkpoints", checkpoint_interval_s)
    try:
        if resume:
            fit.resume()
        _estimate_scaling_factor(trainer, fit)
        with progress_bars(rank == 0):  # one bar for the job
            fit.fit()
        collect_on_first_rank(trainer)
    except RuntimeError as err:  # dist.DistError included
        # A rank that died shows up on the others as a failed collective (gloo:
        # "Connection closed by peer" or "reset"); the message says where to resume.
        checkpoint = latest_checkpoint(folder / "checkpoints")
        raise RuntimeError(
            f"rank {rank} of {world} stopped: {' '.join(str(err).split())[:300]}; if "
            "another rank stopped first, its error is the cause. The last checkpoint "
            f"is {checkpoint or 'none (none was written yet)'}: resume with the same "
            "number of ranks"
        ) from err
    finally:
        for hook in hooks:
            hook.remove()
    if rank == 0:
        trainer.set_final_sae_metadata()
        tmp = folder / ".sae.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        sae.save_inference_model(tmp)
        replace_folder(tmp, folder / "sae")
        shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    dist.barrier()
    return sae


def train_preset_rank(
    out: Path, settings: dict[str, Any], resume: bool, checkpoint_interval_s: float
) -> None:
    """This rank's part of ``sae-gba train --nproc N``: the preset's SAE from the cache.

    Args:
        out: the run folder (``activations``, ``checkpoints``, ``sae``).
        settings: the train command's settings (preset, d_sae, training_tokens,
            layer, device, architecture, sae: the architecture's fields).
        resume: continue from the newest checkpoint.
        checkpoint_interval_s: seconds between checkpoints.
    """
    from sae_lens.saes.sae import TrainingSAEConfig

    from sae_gba.activation_cache import CachedActivations
    from sae_gba.presets import gba_runner_config, preset_for_run

    preset = preset_for_run(settings)
    cfg = gba_runner_config(
        preset,
        output_path=str(out / "sae"),
        d_sae=settings["d_sae"],
        training_tokens=settings["training_tokens"],
        layer=settings["layer"],
        device=settings["device"],
        architecture=settings["architecture"],
        **settings["sae"],
    )
    init_process_group(settings["device"])
    try:
        torch.manual_seed(preset.seed)
        sae_cfg = TrainingSAEConfig.from_dict(cfg.get_training_sae_cfg_dict())
        sae = TrainingSAE.from_dict(sae_cfg.to_dict()).to(cfg.device)
        train_parallel(
            sae,
            CachedActivations(
                out / "activations",
                cfg.train_batch_size_tokens,
                hook_name=cfg.hook_name,
            ),
            total_tokens=cfg.training_tokens,
            batch_size=cfg.train_batch_size_tokens,
            folder=out,
            checkpoint_interval_s=checkpoint_interval_s,
            resume=resume,
            lr=cfg.lr,
            lr_end=cfg.lr_end,
            feature_sampling_window=cfg.feature_sampling_window,
            dead_feature_window=cfg.dead_feature_window,
            n_batches_for_norm_estimate=cfg.n_batches_for_norm_estimate,
        )
    finally:
        dist.destroy_process_group()


def launch(
    out: Path,
    settings_file: Path,
    nproc: int,
    resume: bool = False,
    checkpoint_interval_s: float = 300.0,
) -> None:
    """Run :func:`train_preset_rank` on ``nproc`` local ranks through torchrun.

    Args:
        out: the run folder; its ``activations`` cache must exist.
        settings_file: the train command's settings (JSON).
        nproc: ranks on this machine.
        resume: continue from the newest checkpoint.
        checkpoint_interval_s: seconds between checkpoints.
    """
    from torch.distributed.run import main as torchrun

    torchrun(
        [
            "--standalone",
            f"--nproc-per-node={nproc}",
            "-m",
            "sae_gba.distributed",
            str(out),
            str(settings_file),
            f"--checkpoint-every={checkpoint_interval_s}",
            *(["--resume"] if resume else []),
        ]
    )


def train_preset_parallel(
    out: Path,
    settings_file: Path,
    nproc: int,
    resume: bool = False,
    checkpoint_interval_s: float = 300.0,
) -> None:
    """``sae-gba train --nproc N``: harvest once into ``out/activations``, then train.

    The harvest runs in this process with SAELens's ``CacheActivationsRunner``
    (skipped when the cache is there, e.g. on ``--resume``); torchrun then starts
    ``nproc`` ranks that train from it.

    Args:
        out: the run folder.
        settings_file: the train command's settings (JSON: preset, model_path,
            dataset_path, d_sae, training_tokens, layer, device, architecture, k).
        nproc: ranks on this machine.
        resume: continue from the newest checkpoint.
        checkpoint_interval_s: seconds between checkpoints.
    """
    import json

    from sae_gba.activation_cache import fill_preset_cache
    from sae_gba.presets import preset_for_run

    settings = json.loads(Path(settings_file).read_text())
    if settings["device"].startswith("cuda") and nproc > torch.cuda.device_count():
        raise ValueError(
            f"--nproc {nproc} is invalid with --device {settings['device']}: this "
            f"machine has {torch.cuda.device_count()} CUDA device(s), one per rank"
        )
    if not (out / "activations").is_dir():
        fill_preset_cache(
            preset_for_run(settings),
            out / "activations",
            model_path=settings["model_path"],
            dataset_path=settings["dataset_path"],
            training_tokens=settings["training_tokens"],
            layer=settings["layer"],
            device=settings["device"],
        )
    launch(out, settings_file, nproc, resume, checkpoint_interval_s)


def main(argv: list[str] | None = None) -> None:
    """``torchrun ... -m sae_gba.distributed OUT SETTINGS.json``: one rank's run."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m sae_gba.distributed")
    parser.add_argument("out", help="run folder with the activations cache")
    parser.add_argument("settings", help="train settings JSON (sae-gba train's)")
    parser.add_argument("--checkpoint-every", type=float, default=300.0)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    settings = json.loads(Path(args.settings).read_text())
    train_preset_rank(Path(args.out), settings, args.resume, args.checkpoint_every)


if __name__ == "__main__":
    main()
