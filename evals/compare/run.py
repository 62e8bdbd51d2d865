"""``run_compare``: harvest once, train every sweep point, evaluate all, report."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sae_gba_evals.compare.config import (
    EVALS,
    CompareError,
    ComparePreset,
    CompareSize,
    SweepPoint,
    resolve_request,
    sweep_points,
)
from sae_gba_evals.compare.data import model_and_hook, preset_data
from sae_gba_evals.compare.evaluate import evaluate_all, held_out_activations
from sae_gba_evals.compare.report import report
from sae_gba_evals.compare.train import harvest_and_train, sae_metadata, trained_record
from sae_gba_evals.saebench.common import EvalError, EvalSettings, require_saebench

if TYPE_CHECKING:
    import datasets
    from transformer_lens import HookedTransformer


def _default_command(
    out: Path, preset: str, size: CompareSize, methods: Sequence[str]
) -> str:
    return (
        f"sae-gba compare --out {out} --preset {preset} --size {size.name} "
        f"--methods {','.join(methods)}"
    )


def _windows(
    preset: ComparePreset,
    model: HookedTransformer,
    dataset_path: str | None,
    seed: int,
    train_windows: torch.Tensor | None,
    held_out: datasets.Dataset | None,
) -> tuple[torch.Tensor, datasets.Dataset, str, str]:
    """The given windows, or the preset's (:func:`preset_data`), with their labels."""
    if train_windows is not None and held_out is not None:
        return train_windows, held_out, "given token windows", "given token windows"
    windows, held, train_label, held_label = preset_data(
        preset, model, dataset_path, seed
    )
    if train_windows is not None:
        train_label = "given token windows"
    if held_out is not None:
        held_label = "given token windows"
    return (
        windows if train_windows is None else train_windows,
        held if held_out is None else held_out,
        train_label,
        held_label,
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
    out = Path(out)
    request = _Request(
        out,
        chosen,
        size,
        methods,
        evals,
        seed,
        progress,
        probes_dir,
        absorption_options,
    )
    points = sweep_points(methods, size)
    records = _finished_records(out, points, size)
    wall = time.perf_counter()
    model, model_name, hook_name = model_and_hook(
        chosen, model, model_path, device, size.llm_dtype, layer
    )
    timings = {"model_load_s": time.perf_counter() - wall}
    train_windows, held_out, train_label, held_label = _windows(
        chosen, model, dataset_path, seed, train_windows, held_out
    )
    metadata = sae_metadata(model_name, hook_name, train_windows, train_label)
    # The core eval's held-out activations, harvested at most once: the training
    # curves and the conventional explained variance both read them.
    settings = size.eval_settings(len(held_out[0]["tokens"]))
    held_out_acts = functools.cache(
        functools.partial(held_out_activations, model, hook_name, held_out, settings)
    )
    harvest_info = _train(
        request,
        model,
        (hook_name, metadata),
        (train_windows, held_out_acts),
        points,
        records,
        timings,
    )
    header = request.header(
        command, model_name, hook_name, (train_label, held_label), harvest_info, timings
    )
    rows, header["memoized_forward"] = _evaluate(
        request,
        records,
        model,
        (held_out, held_label),
        (settings, held_out_acts),
        timings,
    )
    timings["total_this_run_s"] = time.perf_counter() - wall
    return report(out, header, rows)


@dataclass(frozen=True)
class _Request:
    """One comparison as asked, resolved: what every step of the run reads."""

    out: Path
    preset: ComparePreset
    size: CompareSize
    methods: Sequence[str]
    evals: Sequence[str]
    seed: int
    progress: bool
    probes_dir: str | Path | None
    absorption_options: dict[str, Any] | None

    def header(
        self,
        command: str | None,
        model_name: str,
        hook_name: str,
        data_labels: tuple[str, str],
        harvest_info: dict[str, Any],
        timings: dict[str, float],
    ) -> dict[str, Any]:
        """The report's header: the command line, what it asked for, the model and
        data it ran on, the harvest and the timings."""
        return {
            "command": command
            or _default_command(self.out, self.preset.name, self.size, self.methods),
            "preset": self.preset.name,
            "size": asdict(self.size),
            "methods": list(self.methods),
            "evals": list(self.evals),
            "seed": self.seed,
            "model": model_name,
            "hook_name": hook_name,
            "train_data": data_labels[0],
            "held_out_data": data_labels[1],
            "harvest": harvest_info,
            "timings": timings,
        }


def _train(
    request: _Request,
    model: HookedTransformer,
    hook: tuple[str, dict[str, Any]],
    windows: tuple[torch.Tensor, Callable[[], torch.Tensor]],
    points: Sequence[SweepPoint],
    records: dict[str, Any],
    timings: dict[str, float],
) -> dict[str, Any]:
    """Harvest once and train every unfinished sweep point; adds the timings.

    ``windows``: the training windows and the core eval's held-out activations
    (a call), which each run's convergence curve reads."""
    train_windows, held_out_acts = windows
    harvest_info = harvest_and_train(
        request.out,
        model,
        hook,
        train_windows,
        request.size,
        points,
        records,
        request.seed,
        request.progress,
        held_out_acts,
    )
    timings["harvest_s"] = harvest_info["seconds"]
    timings["train_s"] = sum(r.get("seconds_this_run", 0.0) for r in records.values())
    return harvest_info


def _evaluate(
    request: _Request,
    records: dict[str, Any],
    model: HookedTransformer,
    held_out: tuple[datasets.Dataset, str],
    eval_inputs: tuple[EvalSettings, Callable[[], torch.Tensor]],
    timings: dict[str, float],
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Every SAE's evals on the held-out windows (memoised); adds the timing.

    ``eval_inputs``: the eval settings and the held-out activations (a call)."""
    start = time.perf_counter()
    settings, held_out_acts = eval_inputs
    rows, memo = evaluate_all(
        request.out,
        records,
        model,
        held_out,
        settings,
        request.evals,
        request.size.memo_bytes,
        held_out_acts,
        request.probes_dir,
        request.absorption_options,
        request.progress,
    )
    timings["eval_s"] = time.perf_counter() - start
    return rows, memo


def _finished_records(
    out: Path, points: Sequence[SweepPoint], size: CompareSize
) -> dict[str, dict[str, Any] | None]:
    """Each sweep point's finished training record (None: not trained yet).

    Checked before the model is even loaded: a finished SAE trained with other
    settings stops the run at once. SAEBench's presence is checked first.
    """
    try:
        require_saebench()
    except EvalError as err:
        raise CompareError(str(err)) from err
    records = {p.name: trained_record(out / "saes" / p.name, p, size) for p in points}
    out.mkdir(parents=True, exist_ok=True)
    return records
