"""Timing and memory of one method's training step (``sae-gba bench throughput``)."""

import contextlib
import ctypes
import gc
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from sae_gba.gba_sae import GBATrainingSAE
from sae_gba.training import TensorDataProvider
from sae_gba_evals.bench.matching import Shape, build_method, mean_l0


def _release_memory() -> None:
    """Free what earlier runs left, so each run's resident peak is its own."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_peak_rss() -> None:
    """Restart the kernel's resident-set peak (``VmHWM``) from the current size."""
    with contextlib.suppress(OSError):  # not Linux: the peak covers the whole run
        Path("/proc/self/clear_refs").write_text("5")


def _rss_mb(field: str) -> float:
    """``VmHWM`` (peak) or ``VmRSS`` (now) of this process in MB, or NaN."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return math.nan


@torch.no_grad()
def _time_one_adaptation(sae: GBATrainingSAE) -> float:
    """Wall time of one bias adaptation on the current window; the state is kept."""
    saved = [buffer.clone() for buffer in sae.buffers()]
    start = time.perf_counter()
    GBATrainingSAE.adapt_biases(sae)
    seconds = time.perf_counter() - start
    for buffer, value in zip(sae.buffers(), saved, strict=True):
        buffer.copy_(value)
    return seconds


def _timed_adaptations(sae: GBATrainingSAE) -> list[float]:
    """Record the wall time of every ``adapt_biases`` call from now on."""
    seconds: list[float] = []
    adapt = sae.adapt_biases

    def timed() -> None:
        start = time.perf_counter()
        adapt()
        seconds.append(time.perf_counter() - start)

    sae.adapt_biases = timed  # type: ignore[method-assign]
    return seconds


def time_method(
    method: str,
    shape: Shape,
    l0: int,
    data: torch.Tensor,
    warmup: int,
    steps: int,
    mm_peak_gflops: float,
    profile: int = 0,
) -> dict[str, Any]:
    """Time ``steps`` training steps after ``warmup``; returns one result row.

    ``profile`` > 0 adds a ``profile`` of that many further (untimed) steps.
    """
    d_in, d_sae, batch = shape
    _release_memory()
    run = build_method(method, shape, l0, data)
    provider = TensorDataProvider(data, batch, seed=0)
    gba = isinstance(run.sae, GBATrainingSAE)
    adaptations = _timed_adaptations(run.sae) if gba else []

    def prepared() -> torch.Tensor:
        x = next(provider)
        run.prepare(x)
        return x

    for _ in range(warmup):
        run.step(prepared())
    adaptations.clear()
    _reset_peak_rss()
    rss_start = _rss_mb("VmRSS")
    times, l0s = [], []
    for _ in range(steps):
        x = prepared()
        start = time.perf_counter()
        acts = run.step(x)
        times.append(time.perf_counter() - start)
        l0s.append(mean_l0(acts))
    peak_rss = _rss_mb("VmHWM")
    # Training adapts once per `interval` steps. Where the timed steps held no
    # adaptation (too few of them), one is timed on the current window and its share
    # added; forcing one early would run it on a short window.
    amortized = adapt = 0.0
    if gba:
        interval = run.sae.cfg.adaptation_interval
        if adaptations:
            adapt = sum(adaptations) / len(adaptations)
        else:
            adapt = _time_one_adaptation(run.sae)
            amortized = adapt / interval
    seconds = sum(times) / steps + amortized
    floor_seconds = 2 * batch * d_in * d_sae / (mm_peak_gflops * 1e9)
    row: dict[str, Any] = {
        "arch": method,
        "d_in": d_in,
        "d_sae": d_sae,
        "batch": batch,
        "l0_point": l0,
        "l0": sum(l0s) / len(l0s),
        "tokens_per_s": batch / seconds,
        "peak_rss_mb": peak_rss,
        "encoder_floor_fraction": floor_seconds / seconds,
        "seconds_per_step": seconds,
        "steps_timed": steps,
        # Under a varying load the fastest step estimates the unloaded rate better.
        "tokens_per_s_best_step": batch / (min(times) + amortized),
        "rss_at_start_mb": rss_start,
        **run.info,
    }
    if gba:
        row |= {
            "adaptations_timed": len(adaptations),
            "adaptation_seconds": adapt,
            "adaptation_share": adapt / (interval * seconds),
        }
    if profile:
        row["profile"] = profile_steps(prepared, run.step, profile)
    return row


# What the profiler's native side prints to stderr at every start and stop.
PROFILER_NOISE = "USDT:"


@contextlib.contextmanager
def _native_lines_dropped(prefix: str) -> Iterator[None]:
    """Hold back native writes to stderr, then pass on the lines not starting ``prefix``.

    Native code writes to file descriptor 2 directly, past ``sys.stderr``.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = [
                line
                for line in held.read().decode(errors="replace").splitlines(True)
                if not line.startswith(prefix)
            ]
            sys.stderr.write("".join(kept))


def profile_steps(
    prepare: Callable[[], torch.Tensor],
    step: Callable[[torch.Tensor], Any],
    steps: int,
    top: int = 15,
) -> list[dict]:
    """The ops that took most time over ``steps`` more steps (torch.profiler, CPU).

    Only ``step`` is profiled, not ``prepare`` (the untimed sparsity matching). Ops
    are grouped by input shapes, so the encoder product, the sparse products and the
    optimizer's passes can be told apart; times are wall ms per step.
    """
    from torch.profiler import ProfilerActivity, profile

    totals: dict[tuple[str, str], float] = {}
    for _ in range(steps):
        x = prepare()
        with (
            _native_lines_dropped(PROFILER_NOISE),
            profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof,
        ):
            step(x)
        for e in prof.key_averages(group_by_input_shape=True):
            key = (e.key, str(e.input_shapes))
            totals[key] = totals.get(key, 0.0) + e.self_cpu_time_total
    total = sum(totals.values())
    ranked = sorted(totals.items(), key=lambda item: -item[1])[:top]
    return [
        {
            "op": op,
            "input_shapes": shapes,
            "ms_per_step": us / steps / 1e3,
            "share": us / total,
        }
        for (op, shapes), us in ranked
    ]
