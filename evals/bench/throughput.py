"""``sae-gba bench throughput``: training-step throughput of GBA against SAELens's SAEs.

    sae-gba bench throughput --out runs/bench/throughput.json

For each (d_in, d_sae, batch tokens) shape and architecture, times the full step as
SAELens's ``SAETrainer`` runs it (forward, backward, gradient clipping, Adam, LR
scheduler and the trainer's firing statistics; for GBA also bias adaptation at its
default interval of 50, counted in the timed steps) on synthetic activations, and
reports tokens/s, dense-equivalent GFLOP/s (``6 * batch * d_in * d_sae`` per step)
and its fraction of the best ``torch.mm`` rate measured on the same shapes in the
same run. GBA is timed twice: ``settled``, with every neuron's gate bias at its
group's target frequency (what bias adaptation converges to, 8% of gates open on
average with the defaults), and ``init``, with the biases of a fresh SAE (half of the
gates open). Also measures the embedded Gemma-3-270M's activation harvest rate
(:mod:`sae_gba_evals.bench.harvest`). Writes the JSON and a PNG
beside it.
"""

import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY
from sae_lens.saes.sae import TrainingSAE
from tqdm.auto import tqdm

import sae_gba  # noqa: F401  (registers gba and weighted_gba)
from sae_gba.atomic import write_text_atomically
from sae_gba.bias_adaptation import quantile_biases
from sae_gba.fast_step import fast_step_enabled
from sae_gba.gba_sae import GBATrainingSAE
from sae_gba.training import TensorDataProvider, make_trainer
from sae_gba.weighted_sae import WeightedTrainingMixin, input_weights
from sae_gba_evals.bench.harvest import harvest_rate
from sae_gba_evals.bench.plots import plot_throughput, shape_of

SHAPES = ((640, 4096, 1024), (640, 16384, 4096), (2304, 16384, 1024))
ARCHS = ("gba", "weighted_gba", "topk", "batchtopk", "jumprelu", "standard")
# (warm-up steps, timed steps, timed GBA steps) per shape. 50 timed GBA steps hold
# one bias adaptation, as in training; at the large shapes (seconds per step) fewer,
# and the adaptation is timed apart and added at its share (see time_steps).
STEPS = {SHAPES[0]: (3, 20, 50), SHAPES[1]: (2, 3, 3), SHAPES[2]: (2, 3, 3)}
BATCHES_OF_DATA = 8


def synthetic_activations(n_rows: int, d_in: int, seed: int = 0) -> torch.Tensor:
    """Residual-stream-like rows: an offset mean and a decaying spectrum."""
    g = torch.Generator().manual_seed(seed)
    spectrum = torch.arange(1, d_in + 1, dtype=torch.float32) ** -0.5
    basis = torch.linalg.qr(torch.randn(d_in, d_in, generator=g))[0]
    mixing = basis * spectrum[:, None]
    mean = torch.randn(d_in, generator=g)
    return torch.randn(n_rows, d_in, generator=g) @ mixing * 3.0 + mean


def mm_rates(shapes: tuple[tuple[int, int, int], ...], reps: int = 3) -> list[float]:
    """Best GFLOP/s of ``torch.mm`` on each shape, over the step's three layouts.

    The layouts are (batch x d_in)(d_in x d_sae) as in the encoder,
    (batch x d_sae)(d_sae x d_in) as in the decoder, and (d_sae x batch)(batch x d_in)
    as in the weight gradient.
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


def build_sae(arch: str, d_in: int, d_sae: int, data: torch.Tensor) -> TrainingSAE:
    """A fresh training SAE with the architecture's defaults.

    ``weighted_*`` get their weights from the data's variance up front, so no timed
    step is one of the (one-off) estimation steps.
    """
    sae_class, config_class = SAE_TRAINING_CLASS_REGISTRY[arch]
    sae = sae_class(config_class(d_in=d_in, d_sae=d_sae))
    if isinstance(sae, WeightedTrainingMixin):
        sae.set_input_weights(input_weights(data.var(dim=0), sae.cfg.weight_alpha))
    return sae


@torch.no_grad()
def settle_gate_biases(sae: GBATrainingSAE, x: torch.Tensor, chunk: int = 1024) -> None:
    """Put each neuron's gate bias where its group's target frequency would on ``x``.

    That is the state bias adaptation steers towards, reached at once with the rule's
    own :func:`~sae_gba.bias_adaptation.quantile_biases`, ``chunk`` neurons at a time.
    """
    c = sae.input_scale.to(x)
    x_c = (x - sae.pre_bias * c) / c
    w = sae.directions / sae.directions.norm(dim=1, keepdim=True)
    targets = sae.neuron_targets()
    for start in range(0, sae.cfg.d_sae, chunk):
        block = slice(start, start + chunk)
        sae.gate_bias[block] = quantile_biases(x_c @ w[block].T, targets[block])


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


def time_steps(
    arch: str,
    shape: tuple[int, int, int],
    data: torch.Tensor,
    warmup: int,
    steps: int,
    gate_state: str | None = None,
    profile: int = 0,
) -> dict[str, Any]:
    """Time ``steps`` SAETrainer steps after ``warmup``; returns one result row.

    ``profile`` > 0 adds a ``profile`` of that many further (untimed) steps.
    """
    d_in, d_sae, batch = shape
    torch.manual_seed(0)
    sae = build_sae(arch, d_in, d_sae, data)
    provider = TensorDataProvider(data, batch, seed=0)
    trainer = make_trainer(
        sae, provider, total_tokens=batch * (warmup + steps + 1), batch_size=batch
    )

    def step() -> Any:
        output = trainer.step(next(provider))
        trainer.n_training_steps += 1
        return output

    step()  # the first step fixes GBA's input scale and b_pre
    gba = isinstance(sae, GBATrainingSAE)
    if gba and gate_state == "settled":
        settle_gate_biases(sae, data)
    adaptations = _timed_adaptations(sae) if gba else []
    for _ in range(warmup - 1):
        step()
    adaptations.clear()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        output = step()
        times.append(time.perf_counter() - start)
    # Training adapts once per `interval` steps. Where the timed steps held no
    # adaptation (too few of them), one is timed on the current window and its share
    # added; forcing one early would run it on a short window, which flags the rare
    # neurons as dead and moves their biases.
    amortized = 0.0
    if gba:
        interval = sae.cfg.adaptation_interval
        adapt = (
            sum(adaptations) / len(adaptations)
            if adaptations
            else _time_one_adaptation(sae)
        )
        amortized = 0.0 if adaptations else adapt / interval
    seconds = sum(times) / steps + amortized
    top_ops = profile_steps(step, profile) if profile else None
    flops = 6 * batch * d_in * d_sae
    row: dict[str, Any] = {
        "arch": arch,
        "d_in": d_in,
        "d_sae": d_sae,
        "batch": batch,
        "tokens_per_s": batch / seconds,
        "gflops": flops / seconds / 1e9,
        "seconds_per_step": seconds,
        "steps_timed": steps,
        # Under a varying load the fastest step estimates the unloaded rate better.
        "tokens_per_s_best_step": batch / (min(times) + amortized),
        "open_fraction": float((output.feature_acts != 0).float().mean()),
    }
    if gba:
        row |= {
            "gate_state": gate_state,
            "adaptations_timed": len(adaptations),
            "adaptation_seconds": adapt,
            "adaptation_share": adapt / (interval * seconds),
        }
    if top_ops is not None:
        row["profile"] = top_ops
    return row


def profile_steps(step: Callable[[], Any], steps: int, top: int = 12) -> list[dict]:
    """The ops that took most time over ``steps`` more steps (torch.profiler, CPU).

    Ops are grouped by input shapes, so the encoder product, the dense decode and the
    weight-gradient products can be told apart; times are wall ms per step.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            step()
    events = prof.key_averages(group_by_input_shape=True)
    total = sum(e.self_cpu_time_total for e in events)
    ranked = sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]
    return [
        {
            "op": e.key,
            "input_shapes": str(e.input_shapes),
            "ms_per_step": e.self_cpu_time_total / steps / 1e3,
            "share": e.self_cpu_time_total / total,
        }
        for e in ranked
    ]


def _runs(shape: tuple[int, int, int]) -> list[tuple[str, str | None]]:
    """(arch, gate state) pairs timed at a shape; ``init`` GBA only for plain gba."""
    runs: list[tuple[str, str | None]] = []
    for arch in ARCHS:
        if arch == "gba":
            runs += [(arch, "settled"), (arch, "init")]
        elif arch == "weighted_gba":
            runs.append((arch, "settled"))
        else:
            runs.append((arch, None))
    return runs


def run_throughput(
    out: str | Path,
    shapes: tuple[tuple[int, int, int], ...] = SHAPES,
    steps: dict[tuple[int, int, int], tuple[int, int, int]] | None = None,
    harvest: bool = True,
    threads: int | None = None,
    profile_gba: bool = True,
    log: Callable[[str], None] = tqdm.write,
) -> dict[str, Any]:
    """Run the benchmark, write ``out`` (JSON) and the PNG beside it; returns the result.

    Args:
        out: JSON path.
        shapes: (d_in, d_sae, batch) shapes.
        steps: (warm-up, timed, timed GBA) steps per shape; default ``STEPS``
            (else 2, 5, 5).
        harvest: also measure the embedded model's harvest rate.
        threads: torch threads (default: all cores).
        profile_gba: add a one-step op profile to each plain ``gba`` row.
        log: printer of each row's result (beside the progress bars).
    """
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads or os.cpu_count() or 1)
    try:
        result = _measure(shapes, STEPS if steps is None else steps, profile_gba, log)
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
    shapes: tuple[tuple[int, int, int], ...],
    steps: dict[tuple[int, int, int], tuple[int, int, int]],
    profile_gba: bool,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """The mm peak and the step timings (everything but the harvest)."""
    wall = time.perf_counter()
    load_before = os.getloadavg()
    peaks = mm_rates(shapes)
    rows = []
    bar = tqdm(
        total=sum(len(_runs(s)) for s in shapes), desc="bench: steps", unit="run"
    )
    for shape in shapes:
        data = synthetic_activations(BATCHES_OF_DATA * shape[2], shape[0])
        warmup, timed, timed_gba = steps.get(shape, (2, 5, 5))
        for arch, gate_state in _runs(shape):
            n = timed if gate_state is None else timed_gba
            profile = 1 if arch == "gba" and profile_gba else 0
            row = time_steps(arch, shape, data, warmup, n, gate_state, profile)
            rows.append(row)
            log(
                f"{shape} {arch:12s} {gate_state or '':8s} "
                f"{row['tokens_per_s']:9.0f} tok/s {row['gflops']:7.1f} GFLOP/s"
            )
            bar.update()
    bar.close()
    # The peak again at the end: under a varying load the best of both is fairer.
    peaks = [max(a, b) for a, b in zip(peaks, mm_rates(shapes), strict=True)]
    mm_peak = max(peaks)
    for row in rows:
        row["peak_fraction"] = row["gflops"] / mm_peak
    result: dict[str, Any] = {
        "mm_peak_gflops": mm_peak,
        "mm_peak_gflops_by_shape": {
            str(s): p for s, p in zip(shapes, peaks, strict=True)
        },
        # One row per (arch, shape), GBA's with settled gates; GBA from fresh gates
        # (half open) apart, in gba_init_rows.
        "rows": [r for r in rows if r.get("gate_state") != "init"],
        "gba_init_rows": [r for r in rows if r.get("gate_state") == "init"],
        "acceptance": _acceptance(rows),
        "threads": torch.get_num_threads(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "machine": f"{_cpu_name()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "fast_step": fast_step_enabled(),
        "timing_seconds": time.perf_counter() - wall,
    }
    return result


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _acceptance(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per shape: GBA (settled and init) tokens/s over topk's, and GBA's peak fraction."""
    checks = []
    for row in rows:
        if row["arch"] != "gba":
            continue
        shape = shape_of(row)
        topk = next(r for r in rows if r["arch"] == "topk" and shape_of(r) == shape)
        checks.append(
            {
                "shape": list(shape),
                "gate_state": row["gate_state"],
                "speedup_over_topk": row["tokens_per_s"] / topk["tokens_per_s"],
                "best_step_speedup_over_topk": row["tokens_per_s_best_step"]
                / topk["tokens_per_s_best_step"],
                "peak_fraction": row.get("peak_fraction"),
            }
        )
    return checks
