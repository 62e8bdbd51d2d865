"""``sae-gba bench throughput``: training-step throughput at matched sparsity.

    sae-gba bench throughput --out runs/bench/throughput.json [--size small]

For each (d_in, d_sae, batch tokens) shape and each L0 point (mean active latents
per token; default 32 and 128), times the full training step of every method at
that L0 on synthetic activations:

- ``gba`` and ``weighted_gba``: SAELens's ``SAETrainer`` step (forward, backward,
  clipping, Adam, scheduler, the trainer's firing statistics, and bias adaptation
  at its default interval, counted at its share). ``target_l0`` is set so the
  measured L0 lands within 10% of the point (:func:`match_gba_target`), and before
  each step, untimed, the gate biases are put at their targets' quantiles on that
  step's batch (:func:`settle_gate_biases`): the state bias adaptation holds
  them in, so every timed step runs at the point.
- ``topk`` and ``batchtopk`` (k = L0), ``jumprelu`` (its threshold set, untimed,
  before each step so the batch's L0 is the point): SAELens's trainer step.
- ``sparsify``: EleutherAI's ``SparseCoder`` at k = L0 with Adam at the same rate,
  its own step (``fvu`` backward, the decoder-parallel gradient removed, Adam, unit
  decoder norms). Needs the ``bench`` extra; without it the rest runs.

Each row records the measured L0, tokens/s, the peak resident memory of the timed
steps and the encoder floor fraction: the time of the dense encoder product
(``2 * batch * d_in * d_sae`` FLOPs) at the run's best ``torch.mm`` rate over the
step's time. Plain ``gba`` rows carry an op profile of their step. Writes the JSON
and a PNG of tokens/s against L0, a panel per shape.
"""

import contextlib
import ctypes
import gc
import json
import math
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY
from tqdm.auto import tqdm

import sae_gba  # noqa: F401  (registers gba and weighted_gba)
from sae_gba.atomic import write_text_atomically
from sae_gba.bias_adaptation import (
    BIAS_MIN,
    group_index,
    quantile_biases,
    target_frequencies,
)
from sae_gba.fast_step import fast_step_enabled
from sae_gba.gba_sae import GBATrainingSAE
from sae_gba.training import TensorDataProvider, make_trainer
from sae_gba.weighted_sae import WeightedTrainingMixin, input_weights
from sae_gba_evals.bench.harvest import harvest_rate
from sae_gba_evals.bench.plots import plot_throughput, shape_of
from sae_gba_evals.bench.sparsify_peer import (
    HOW_TO_ADD_SPARSIFY,
    sparsify_available,
    sparsify_step,
)

Shape = tuple[int, int, int]

# (d_in, d_sae, batch tokens). The last default shape is the paper's width at
# d_in 2,304; about 6 GB for the largest method (sparsify's) at batch 1,024.
SHAPES: dict[str, tuple[Shape, ...]] = {
    "default": (
        (640, 4096, 1024),
        (640, 16384, 4096),
        (2304, 16384, 1024),
        (2304, 65536, 1024),
    ),
    "small": ((640, 4096, 1024),),
    "tiny": ((16, 4096, 256),),
}
L0_POINTS = (32, 128)
METHODS = ("gba", "weighted_gba", "topk", "batchtopk", "jumprelu", "sparsify")
# (warm-up steps, timed steps) per shape; others get DEFAULT_STEPS. 50 timed steps
# hold one bias adaptation, as in training; where fewer, the adaptation is timed
# apart and added at its share (see time_method).
STEPS: dict[Shape, tuple[int, int]] = {(640, 4096, 1024): (3, 50)}
DEFAULT_STEPS = (2, 4)
BATCHES_OF_DATA = 8
LR = 3e-4
# The measured L0 must land within this fraction of the point.
L0_TOLERANCE = 0.1
MATCH_TRIES = 4


def synthetic_activations(n_rows: int, d_in: int, seed: int = 0) -> torch.Tensor:
    """Residual-stream-like rows: an offset mean and a decaying spectrum."""
    g = torch.Generator().manual_seed(seed)
    spectrum = torch.arange(1, d_in + 1, dtype=torch.float32) ** -0.5
    basis = torch.linalg.qr(torch.randn(d_in, d_in, generator=g))[0]
    mixing = basis * spectrum[:, None]
    mean = torch.randn(d_in, generator=g)
    return torch.randn(n_rows, d_in, generator=g) @ mixing * 3.0 + mean


def mm_rates(shapes: tuple[Shape, ...], reps: int = 3) -> list[float]:
    """Best GFLOP/s of ``torch.mm`` on each shape, over the step's three layouts.

    The layouts are (batch x d_in)(d_in x d_sae) as in the encoder,
    (batch x d_sae)(d_sae x d_in) as in a dense decoder, and (d_sae x batch)
    (batch x d_in) as in a dense weight gradient.
    """
    rates = []
    for d_in, d_sae, batch in shapes:
        x, w = torch.randn(batch, d_in), torch.randn(d_sae, d_in)
        z = torch.randn(batch, d_sae)
        flops = 2 * batch * d_in * d_sae
        best = 0.0
        for a, b in ((x, w.T), (z, w), (z.T, x)):
            torch.mm(a, b)
            for _ in range(reps):
                start = time.perf_counter()
                torch.mm(a, b)
                best = max(best, flops / (time.perf_counter() - start) / 1e9)
        rates.append(best)
    return rates


@torch.no_grad()
def settle_gate_biases(sae: GBATrainingSAE, x: torch.Tensor, chunk: int = 1024) -> None:
    """Put each neuron's gate bias where its group's target frequency would on ``x``.

    That is the state bias adaptation steers towards, reached at once with the rule's
    own :func:`~sae_gba.bias_adaptation.quantile_biases`, ``chunk`` neurons at a time.
    The bias goes midway between the last projection it opens and the first it
    leaves closed (below the largest where it opens none): at the closed one itself,
    the step's renormalisation of the directions would flip about half of them open.
    """
    c = sae.input_scale.to(x)
    x_c = (x - sae.pre_bias * c) / c
    w = sae.directions / sae.directions.norm(dim=1, keepdim=True)
    targets = sae.neuron_targets()
    none_open = targets * x.shape[0] < 1
    for start in range(0, sae.cfg.d_sae, chunk):
        block = slice(start, start + chunk)
        preacts = x_c @ w[block].T
        closed = quantile_biases(preacts, targets[block])
        opened = quantile_biases(preacts, targets[block] - 1 / x.shape[0])
        midway = (closed + opened) / 2
        below = (closed - 1e-3).clamp(min=BIAS_MIN)
        sae.gate_bias[block] = torch.where(none_open[block], below, midway)


@torch.no_grad()
def set_jumprelu_threshold(sae: Any, x: torch.Tensor, l0: float) -> None:
    """One threshold for every latent under which ``x``'s mean L0 is ``l0``."""
    _, hidden_pre = sae.encode_with_hidden_pre(x)
    flat = hidden_pre.flatten()
    opened = min(round(l0 * x.shape[0]), flat.numel() - 1)
    # The (opened + 1)-th largest: exactly `opened` entries lie above it (ties aside).
    threshold = torch.kthvalue(flat, flat.numel() - opened).values
    sae.threshold.fill_(max(float(threshold), 1e-6))


def mean_l0(acts: torch.Tensor) -> float:
    """Mean number of nonzero entries per row."""
    return float((acts != 0).sum(dim=-1).double().mean())


class Method(NamedTuple):
    """One method at one shape and L0, ready to time.

    ``prepare(batch)`` runs untimed before each step (the sparsity matching);
    ``step(batch)`` is the timed training step and returns the latent activations.
    """

    prepare: Callable[[torch.Tensor], None]
    step: Callable[[torch.Tensor], torch.Tensor]
    sae: Any
    info: dict[str, Any]


def _trainer_step(sae: Any, data: torch.Tensor, batch: int) -> Callable:
    """SAELens's trainer step on ``sae`` (the first step is run here)."""
    trainer = make_trainer(
        sae, iter(()), total_tokens=batch * 10**6, batch_size=batch, lr=LR
    )

    def step(x: torch.Tensor) -> torch.Tensor:
        output = trainer.step(x)
        trainer.n_training_steps += 1
        return output.feature_acts

    step(data[:batch])  # GBA: fixes the input scale and b_pre
    return step


def _saelens_sae(arch: str, d_in: int, d_sae: int, data: torch.Tensor, **fields: Any):
    """A fresh SAELens training SAE; ``weighted_*`` get their weights up front."""
    sae_class, config_class = SAE_TRAINING_CLASS_REGISTRY[arch]
    torch.manual_seed(0)
    sae = sae_class(config_class(d_in=d_in, d_sae=d_sae, **fields))
    if isinstance(sae, WeightedTrainingMixin):
        sae.set_input_weights(input_weights(data.var(dim=0), sae.cfg.weight_alpha))
    return sae


def settled_l0(arch: str, d_in: int, d_sae: int, batch: int, target_l0: float) -> float:
    """The L0 that gates settled on ``batch`` tokens give with this ``target_l0``.

    :func:`settle_gate_biases` opens each neuron on ``floor(p * batch)`` tokens (bias
    clamps aside), so the L0 moves in steps of a group's size over ``batch``.
    """
    cfg = SAE_TRAINING_CLASS_REGISTRY[arch][1](
        d_in=d_in, d_sae=d_sae, target_l0=target_l0
    )
    groups = target_frequencies(cfg.n_groups, cfg.high_target_freq, cfg.low_target_freq)
    targets = groups[group_index(d_sae, cfg.n_groups)]
    opened = (targets * batch).floor().clamp(max=batch - 1)
    return float(opened.sum()) / batch


def predict_gba_target(arch: str, shape: Shape, l0: float) -> float:
    """The ``target_l0`` whose :func:`settled_l0` is nearest ``l0`` (bisection).

    The settled L0 never exceeds the target (floors), and rises with it.
    """
    d_in, d_sae, batch = shape

    def at(target: float) -> float:
        try:
            return settled_l0(arch, d_in, d_sae, batch, target)
        except ValueError:  # out of the config's reach
            return math.inf

    lo, hi = float(l0), float(l0)
    while at(hi) < l0 and hi < d_sae:
        lo, hi = hi, hi * 2
    for _ in range(25):  # the target to 2^-25 of its bracket's log-width
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if at(mid) < l0 else (lo, mid)
    return min((lo, hi), key=lambda t: abs(at(t) - l0))


def match_gba_target(
    arch: str, shape: Shape, l0: float, data: torch.Tensor
) -> tuple[Any, Callable, float, float]:
    """A GBA SAE whose settled gates open ``l0`` latents per token, within 10%.

    Starts from :func:`predict_gba_target` and, where the bias clamps move the
    measured L0 off the prediction, rescales the target by point / measured until
    the L0 of the settled gates on a batch lands.

    Returns:
        (sae, its trainer step, target_l0, the L0 measured on the trial batch).

    Raises:
        ValueError: no target within ``MATCH_TRIES`` tries lands within 10% (at a
            small batch, one token of a group's floor can move the L0 by more).
    """
    d_in, d_sae, batch = shape
    target, tried = predict_gba_target(arch, shape, l0), []
    for _ in range(MATCH_TRIES):
        sae = _saelens_sae(arch, d_in, d_sae, data, target_l0=target)
        step = _trainer_step(sae, data, batch)
        x = data[batch : 2 * batch]
        settle_gate_biases(sae, x)
        with torch.no_grad():
            measured = mean_l0(sae.encode(x))
        tried.append((target, measured))
        if abs(measured - l0) <= L0_TOLERANCE * l0:
            return sae, step, target, measured
        # At most 4x a try: where every group's p * batch < 1 nothing opens at all.
        target *= min(max(l0 / max(measured, 1e-3), 0.25), 4.0)
    raise ValueError(
        f"{arch} at {shape}: no target_l0 landed within {L0_TOLERANCE:.0%} of L0 "
        f"{l0} (tried (target_l0, L0): {tried})"
    )


def build_method(method: str, shape: Shape, l0: int, data: torch.Tensor) -> Method:
    """``method`` at ``shape`` set to ``l0`` active latents per token."""
    d_in, d_sae, batch = shape
    if method in ("gba", "weighted_gba"):
        sae, step, target, trial = match_gba_target(method, shape, l0, data)
        info = {"target_l0": target, "trial_l0": trial}
        return Method(lambda x: settle_gate_biases(sae, x), step, sae, info)
    if method in ("topk", "batchtopk"):
        sae = _saelens_sae(method, d_in, d_sae, data, k=l0)
        return Method(lambda x: None, _trainer_step(sae, data, batch), sae, {})
    if method == "jumprelu":
        sae = _saelens_sae(method, d_in, d_sae, data)
        step = _trainer_step(sae, data, batch)
        return Method(lambda x: set_jumprelu_threshold(sae, x, l0), step, sae, {})
    if method == "sparsify":
        return _sparsify_method(d_in, d_sae, l0)
    raise ValueError(f"method={method!r} is invalid: must be one of {list(METHODS)}")


def _sparsify_method(d_in: int, d_sae: int, k: int) -> Method:
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(0)
    sae = SparseCoder(d_in, SparseCoderConfig(num_latents=d_sae, k=k), "cpu")
    optimizer = torch.optim.Adam(sae.parameters(), lr=LR)

    def step(x: torch.Tensor) -> torch.Tensor:
        return sparsify_step(sae, optimizer, x).latent_acts

    return Method(lambda x: None, step, sae, {})


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
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
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


def run_throughput(
    out: str | Path,
    shapes: tuple[Shape, ...] = SHAPES["default"],
    l0_points: tuple[int, ...] = L0_POINTS,
    methods: tuple[str, ...] = METHODS,
    steps: dict[Shape, tuple[int, int]] | None = None,
    harvest: bool = True,
    threads: int | None = None,
    profile_gba: bool = True,
    log: Callable[[str], None] = tqdm.write,
) -> dict[str, Any]:
    """Run the benchmark, write ``out`` (JSON) and the PNG beside it; returns the result.

    Args:
        out: JSON path.
        shapes: (d_in, d_sae, batch) shapes.
        l0_points: the L0 every method is set to, in turn.
        methods: the methods timed (``sparsify`` is left out, with a note, when the
            ``bench`` extra is missing).
        steps: (warm-up, timed) steps per shape; default ``STEPS`` (else
            ``DEFAULT_STEPS``).
        harvest: also measure the embedded model's harvest rate.
        threads: torch threads (default: all cores).
        profile_gba: add a one-step op profile to each plain ``gba`` row.
        log: printer of each row's result (beside the progress bars).
    """
    bad = sorted(set(methods) - set(METHODS))
    if bad:
        raise ValueError(f"methods {bad} are invalid: must be among {list(METHODS)}")
    for shape in shapes:
        for l0 in l0_points:
            if not 0 < l0 < shape[1]:
                raise ValueError(
                    f"L0 point {l0} is invalid at {shape}: d_sae too small"
                )
    sparsify_note = "measured"
    if "sparsify" in methods and not sparsify_available():
        sparsify_note = f"not installed: {HOW_TO_ADD_SPARSIFY}"
        log(f"sparsify left out, {sparsify_note}")
        methods = tuple(m for m in methods if m != "sparsify")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads or os.cpu_count() or 1)
    try:
        result = _measure(shapes, l0_points, methods, steps or STEPS, profile_gba, log)
        result["sparsify"] = sparsify_note
        if harvest:
            result |= harvest_rate()
            log(f"harvest {result['harvest_tokens_per_s']:.0f} tok/s")
    finally:
        torch.set_num_threads(previous_threads)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(out, json.dumps(result, indent=1))
    plot_throughput(result, out.with_suffix(".png"))
    return result


def _measure(
    shapes: tuple[Shape, ...],
    l0_points: tuple[int, ...],
    methods: tuple[str, ...],
    steps: dict[Shape, tuple[int, int]],
    profile_gba: bool,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """The mm peak and the step timings (everything but the harvest)."""
    wall = time.perf_counter()
    load_before = os.getloadavg()
    peaks = mm_rates(shapes)
    rows = []
    bar = tqdm(
        total=len(shapes) * len(l0_points) * len(methods),
        desc="bench: steps",
        unit="run",
    )
    for shape in shapes:
        data = synthetic_activations(BATCHES_OF_DATA * shape[2], shape[0])
        warmup, timed = steps.get(shape, DEFAULT_STEPS)
        for l0 in l0_points:
            for method in methods:
                profile = 1 if method == "gba" and profile_gba else 0
                row = time_method(
                    method, shape, l0, data, warmup, timed, max(peaks), profile
                )
                rows.append(row)
                log(
                    f"{shape} L0 {l0:4d} {method:12s} measured L0 {row['l0']:7.1f} "
                    f"{row['tokens_per_s']:9.0f} tok/s, encoder floor fraction "
                    f"{row['encoder_floor_fraction']:.2f}, "
                    f"peak RSS {row['peak_rss_mb']:.0f} MB"
                )
                bar.update()
    bar.close()
    # The peak again at the end: under a varying load the best of both is fairer.
    final = [max(a, b) for a, b in zip(peaks, mm_rates(shapes), strict=True)]
    for row in rows:
        row["encoder_floor_fraction"] *= max(peaks) / max(final)
    return {
        "mm_peak_gflops": max(final),
        "mm_peak_gflops_by_shape": {
            str(s): p for s, p in zip(shapes, final, strict=True)
        },
        "l0_points": list(l0_points),
        "rows": rows,
        "acceptance": _acceptance(rows),
        "threads": torch.get_num_threads(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "machine": f"{_cpu_name()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "fast_step": fast_step_enabled(),
        "timing_seconds": time.perf_counter() - wall,
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _acceptance(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per shape and L0 point: GBA's tokens/s over each other method's, its floor."""
    checks = []
    for gba in (r for r in rows if r["arch"] == "gba"):
        point = (shape_of(gba), gba["l0_point"])
        peers = [
            r
            for r in rows
            if r["arch"] != "gba" and (shape_of(r), r["l0_point"]) == point
        ]
        checks.append(
            {
                "shape": list(point[0]),
                "l0_point": point[1],
                "gba_l0": gba["l0"],
                "gba_encoder_floor_fraction": gba["encoder_floor_fraction"],
                "gba_speedup": {
                    r["arch"]: gba["tokens_per_s"] / r["tokens_per_s"] for r in peers
                },
            }
        )
    return checks
