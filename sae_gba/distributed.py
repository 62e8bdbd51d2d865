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

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from sae_lens.saes.sae import TrainingSAE
from sae_lens.training.sae_trainer import SAETrainer

from sae_gba.atomic import replace_folder
from sae_gba.collectives import parallel, rank_and_world
from sae_gba.progress import progress_bars
from sae_gba.ranks import (  # noqa: F401 (public names, defined there)
    DEFAULT_TIMEOUT_S,
    ParallelFit,
    RankSlice,
    average_gradients,
    broadcast_state,
    collect_on_first_rank,
    estimate_scaling_factor,
    init_process_group,
)
from sae_gba.training import latest_checkpoint, make_trainer


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
    rank, world = _check_parallel_setup(sae, batch_size)
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
        estimate_scaling_factor(trainer, fit)
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
        _export(trainer, folder)
    dist.barrier()
    return sae


def _check_parallel_setup(sae: TrainingSAE[Any], batch_size: int) -> tuple[int, int]:
    """(rank, world) after checking the process group, batch size and normalisation."""
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
    return rank, world


def _export(trainer: SAETrainer[Any, Any], folder: Path) -> None:
    """Rank 0: write the final SAE to ``folder/sae`` atomically, drop the checkpoints."""
    trainer.set_final_sae_metadata()
    tmp = folder / ".sae.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.sae.save_inference_model(tmp)
    replace_folder(tmp, folder / "sae")
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)


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
