"""The comparison's training: every sweep point on the same harvested activations.

Each SAE is trained by SAELens's own ``SAETrainer`` (``sae_gba.training``) with the
same width, tokens, passes, batch size, learning rate, seed and batch order, and
written as an ordinary SAELens folder ``OUT/saes/<name>/`` plus ``compare_train.json``
(setting, seconds, tokens, and the held-out explained-variance curve that says
whether the run converged).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from sae_gba_evals.compare.config import (
    CONVERGED_EV_CHANGE,
    CONVERGED_TAIL,
    CompareError,
    CompareSize,
    SweepPoint,
)
from sae_gba_evals.compare.data import (
    load_or_harvest,
    normalize_per_token,
    saved_harvest_seconds,
)

if TYPE_CHECKING:
    from sae_lens.saes.sae import TrainingSAE, TrainingSAEConfig
    from transformer_lens import HookedTransformer

TRAIN_INFO_FILE = "compare_train.json"
# A latent that has not fired for this many training tokens counts as dead for
# TopK's aux-k loss (SAELens's default window, 1000 steps, is longer than the runs).
DEAD_WINDOW_TOKENS = 50_000


def build_training_sae(
    point: SweepPoint, d_in: int, size: CompareSize, device: str = "cpu"
) -> TrainingSAE[Any]:
    """A fresh SAELens training SAE for ``point`` (inputs normalised).

    Args:
        point: the method (a registered SAELens training architecture) and its
            sparsity setting.
        d_in: input width.
        size: the comparison size.
        device: torch device of the SAE.
    """
    from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY

    sae_class, config_class = SAE_TRAINING_CLASS_REGISTRY[point.method]
    cfg: TrainingSAEConfig = config_class(
        d_in=d_in,
        d_sae=size.d_sae,
        # The data are rescaled per token before training (see the module docstring).
        normalize_activations="none",
        device=device,
        **point.setting,
    )
    return sae_class(cfg)


class _EVCurve:
    """Batches from ``provider``; every ``every`` batches, first the SAE's held-out
    legacy explained variance (:func:`sae_gba.metrics.held_out_metrics`).

    ``SAETrainer`` reads one batch per step, so the value read before batch ``n`` is
    the SAE after ``n`` steps.
    """

    def __init__(self, provider: Any, sae: Any, held_out: torch.Tensor, every: int):
        self.provider, self.sae, self.held_out, self.every = (
            provider,
            sae,
            held_out,
            every,
        )
        self.steps = 0
        self.points: list[tuple[int, float]] = []

    def measure(self) -> None:
        """Record the SAE's held-out legacy explained variance now."""
        from sae_gba.metrics import held_out_metrics

        with torch.no_grad():
            ev = held_out_metrics(self.sae, self.held_out)["explained_variance_legacy"]
        self.points.append((self.steps, ev))

    def __iter__(self) -> _EVCurve:
        return self

    def __next__(self) -> torch.Tensor:
        if self.steps and self.steps % self.every == 0:
            self.measure()
        self.steps += 1
        return next(self.provider)


def convergence(points: Sequence[tuple[int, float]]) -> dict[str, Any]:
    """Whether a run's held-out EV moved by less than ``CONVERGED_EV_CHANGE`` over its
    last ``CONVERGED_TAIL`` of steps (the last point against the one nearest the
    tail's start).

    Args:
        points: (step, explained variance) in step order, the last at the end.
    """
    last_step, last_ev = points[-1]
    start = last_step * (1 - CONVERGED_TAIL)
    _, tail_ev = min(points, key=lambda p: abs(p[0] - start))
    change = last_ev - tail_ev
    return {
        "ev_curve": [list(p) for p in points],
        "ev_change_last_20pct": change,
        "converged": abs(change) < CONVERGED_EV_CHANGE,
    }


def train_one(
    point: SweepPoint,
    data: torch.Tensor,
    size: CompareSize,
    folder: Path,
    metadata: dict[str, Any],
    seed: int = 0,
    device: str = "cpu",
    held_out: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Train one SAE on ``data`` with SAELens's ``SAETrainer``; save it to ``folder``.

    The folder appears complete or not at all (written beside it, then renamed), and
    ``compare_train.json`` inside says what was trained.

    Args:
        point: the method, target L0 and sparsity setting.
        data: (n_tokens, d_in) per-token normalised activations.
        size: width, training length, batch and learning rate.
        folder: the SAE folder to write.
        metadata: SAELens metadata fields (model, hook, context, dataset).
        seed: the run's seed; ``seed + point.seed`` seeds the initialisation and
            the batch order.
        device: torch device to train on.
        held_out: per-token normalised held-out activations for the
            explained-variance curve (None: no curve).

    Returns:
        The training record written to ``compare_train.json``.
    """
    from sae_gba.training import TensorDataProvider, make_trainer

    seed += point.seed
    torch.manual_seed(seed)
    sae = build_training_sae(point, data.shape[1], size, device)
    initial = initialize_from_data(sae, data, point.target_l0)
    total_tokens = size.training_passes * size.training_tokens
    steps = total_tokens // size.batch_tokens
    provider: Any = TensorDataProvider(data, size.batch_tokens, seed=seed)
    if held_out is not None:
        provider = _EVCurve(
            provider, sae, held_out, max(1, steps // size.ev_curve_points)
        )
    trainer = make_trainer(
        sae,
        provider,
        total_tokens=total_tokens,
        batch_size=size.batch_tokens,
        lr=size.lr,
        dead_feature_window=max(1, DEAD_WINDOW_TOKENS // size.batch_tokens),
        # One window over the whole run: SAELens's saved sparsity covers all of it.
        feature_sampling_window=steps + 1,
    )
    start = time.perf_counter()
    sae = trainer.fit()
    seconds = time.perf_counter() - start
    curve = {}
    if isinstance(provider, _EVCurve):
        provider.measure()
        curve = convergence(provider.points)
    for name, value in metadata.items():
        setattr(sae.cfg.metadata, name, value)
    # Trained on rescaled tokens: SAELens applies the same rescaling at inference.
    sae.cfg.normalize_activations = "constant_norm_rescale"
    record = {
        "method": point.method,
        "target_l0": point.target_l0,
        "setting": point.setting,
        "d_sae": size.d_sae,
        "training_tokens": size.training_tokens,
        "training_passes": size.training_passes,
        "batch_tokens": size.batch_tokens,
        "lr": size.lr,
        "seed": seed,
        "seed_offset": point.seed,
        "train_seconds": seconds,
        "train_l0_full_run": float(trainer.feature_sparsity.sum()),
        "initialized_from_data": initial,
        **curve,
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
    folder: Path, point: SweepPoint, size: CompareSize
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
        "setting": point.setting,
        "d_sae": size.d_sae,
        "training_tokens": size.training_tokens,
        "training_passes": size.training_passes,
    }
    found = {k: record.get(k) for k in wanted}
    if json.loads(json.dumps(wanted)) != found:
        raise CompareError(
            f"{folder} holds an SAE trained with {found}, this run wants {wanted}; "
            "use another --out or delete that folder"
        )
    return record


def sae_metadata(
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
    points: Sequence[SweepPoint],
    records: dict[str, dict[str, Any] | None],
    metadata: dict[str, Any],
    seed: int,
    device: str = "cpu",
    progress: bool = True,
    held_out: torch.Tensor | None = None,
) -> None:
    """Train the SAEs whose record is None, filling in their records.

    Args:
        out: the comparison folder (SAEs under ``out/saes``).
        acts: harvested activations (model dtype); rescaled per token here.
        size: the comparison size.
        points: the sweep.
        records: SAE name -> training record, None where not trained yet (updated).
        metadata: SAELens metadata for the saved SAEs.
        seed: training seed.
        device: torch device to train on.
        progress: show a progress bar.
        held_out: held-out activations for each run's explained-variance curve
            (model dtype; rescaled per token here; None: no curve).
    """
    data = normalize_per_token(acts, size.train_dtype)
    if held_out is not None:
        every = max(1, len(held_out) // size.ev_curve_tokens)
        held_out = normalize_per_token(held_out[::every][: size.ev_curve_tokens])
    pending = [point for point in points if records[point.name] is None]
    for point in tqdm(pending, desc="train", disable=not progress):
        folder = out / "saes" / point.name
        folder.parent.mkdir(parents=True, exist_ok=True)
        record = train_one(point, data, size, folder, metadata, seed, device, held_out)
        record["seconds_this_run"] = record["train_seconds"]
        records[point.name] = record


def harvest_and_train(
    out: Path,
    model: HookedTransformer,
    hook: tuple[str, dict[str, Any]],
    windows: torch.Tensor,
    size: CompareSize,
    points: Sequence[SweepPoint],
    records: dict[str, dict[str, Any] | None],
    seed: int,
    progress: bool = True,
    held_out: Callable[[], torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Harvest (or read back) the training activations and train the pending SAEs.

    Nothing is harvested when every SAE is trained already.

    Args:
        out: the comparison folder.
        model: the language model (the SAEs train on its device).
        hook: the hook name and the SAELens metadata of the saved SAEs.
        windows: training token windows.
        size: the comparison size.
        points: the sweep.
        records: SAE name -> training record, None where not trained yet (updated).
        seed: training seed.
        progress: show progress bars.
        held_out: returns held-out activations for the runs' explained-variance
            curves (called only when an SAE is to be trained; None: no curves).

    Returns:
        Where the activations came from and how long the harvest took.
    """
    if all(record is not None for record in records.values()):
        return {
            "seconds": 0.0,
            "first_harvest_seconds": saved_harvest_seconds(out),
            "skipped": "all SAEs trained",
        }
    hook_name, metadata = hook
    acts, info = load_or_harvest(
        out,
        model,
        hook_name,
        windows,
        size.training_tokens,
        size.harvest_batch_windows,
        progress,
    )
    device = str(model.cfg.device)
    held = None if held_out is None else held_out()
    train_pending(
        out, acts, size, points, records, metadata, seed, device, progress, held
    )
    return info
