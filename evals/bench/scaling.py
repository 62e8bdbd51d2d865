"""``sae-gba bench scaling``: data-parallel training throughput on 1 and 2 ranks.

    sae-gba bench scaling --out docs/bench/scaling.json            # CPU, gloo
    sae-gba bench scaling --out scaling_gpu.json --device cuda     # nccl, 1 rank/GPU

For each shape (d_in, d_sae, global batch tokens) a GBA SAE trains on synthetic
activations through SAELens's ``SAETrainer``:

- ``plain``: one process on the single-process path (``make_trainer`` and
  ``CheckpointedFit``), with all the threads;
- ``distributed``: ``train_parallel`` on 1 and 2 ranks started by torchrun (gloo on
  CPU, nccl on GPUs), the threads split evenly between the ranks.

Tokens/s is global batch tokens over the time between batch requests on rank 0 in the
timed steps (after warm-up), so it covers the whole step: forward, backward, the
gradient all-reduce, clipping, Adam and, every ``ADAPTATION_INTERVAL`` steps, the
window reduction and bias adaptation. ``overhead_1_rank`` is the distributed path's
time per step at 1 rank over the plain path's, minus 1; ``speedup_2_ranks`` is the
tokens/s at 2 ranks over 1. EleutherAI's sparsify (``eai-sparsify``, the ``bench``
extra) is the peer: its TopK SAE's training step (forward, FVU loss, backward,
removal of the decoder-parallel gradient, Adam, decoder renormalisation) at the same
shapes in one process; without it the JSON says how to add it.
"""

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY

import sae_gba  # noqa: F401  (registers gba)
from sae_gba.atomic import write_text_atomically
from sae_gba.training import (
    CheckpointedFit,
    TensorDataProvider,
    make_trainer,
    use_fused_adam,
)
from sae_gba_evals.bench.sparsify_peer import (
    HOW_TO_ADD_SPARSIFY,
    sparsify_available,
    sparsify_step,
)

# (d_in, d_sae, global batch tokens): the embedded preset's width and a wider SAE.
SHAPES = {
    "default": ((640, 4096, 1024), (1024, 16384, 4096)),
    "tiny": ((32, 128, 64), (64, 256, 128)),
}
# (warm-up steps, timed steps) per size.
STEPS = {"default": (2, 10), "tiny": (1, 3)}
RANKS = (1, 2)
ADAPTATION_INTERVAL = 5  # the embedded preset's
SPARSIFY_K = 32


def synthetic_activations(n_rows: int, d_in: int, seed: int = 0) -> torch.Tensor:
    """Residual-stream-like rows: an offset mean and a decaying spectrum."""
    g = torch.Generator().manual_seed(seed)
    spectrum = torch.arange(1, d_in + 1, dtype=torch.float32) ** -0.5
    return torch.randn(n_rows, d_in, generator=g) * spectrum * 3 + torch.randn(
        d_in, generator=g
    )


class _Clock(Iterator[torch.Tensor]):
    """Passes the batches on and notes when each was requested."""

    def __init__(self, data: Any):
        self.data = data
        self.times: list[float] = []

    def __next__(self) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return next(self.data)

    def save_state(self, folder: Path) -> None:
        self.data.save_state(folder)

    def load_state(self, folder: Path) -> None:
        self.data.load_state(folder)


def _sae(d_in: int, d_sae: int, device: str) -> Any:
    sae_class, config_class = SAE_TRAINING_CLASS_REGISTRY["gba"]
    torch.manual_seed(0)
    cfg = config_class(
        d_in=d_in,
        d_sae=d_sae,
        adaptation_interval=ADAPTATION_INTERVAL,
        device=device,
        normalize_activations="constant_norm_rescale",
    )
    return sae_class(cfg)


def _rate(times: list[float], warmup: int, timed: int, batch: int) -> dict[str, float]:
    """Rate over the timed steps: a step ends when the next batch is requested."""
    step_s = (times[warmup + timed] - times[warmup]) / timed
    return {"step_s": step_s, "tokens_per_s": batch / step_s}


def _data(shape: tuple[int, int, int]) -> TensorDataProvider:
    d_in, _, batch = shape
    return TensorDataProvider(synthetic_activations(4 * batch, d_in), batch)


def time_plain(
    shape: tuple[int, int, int], warmup: int, timed: int, device: str
) -> dict[str, float]:
    """Tokens/s of the single-process path (all threads)."""
    d_in, d_sae, batch = shape
    clock = _Clock(_data(shape))
    # One step more: its batch request marks the end of the last timed step.
    steps = warmup + timed + 1
    trainer = make_trainer(_sae(d_in, d_sae, device), clock, steps * batch, batch)
    with tempfile.TemporaryDirectory() as folder:
        CheckpointedFit(trainer, clock, folder, interval_s=1e9).fit()
    return _rate(clock.times, warmup, timed, batch)


def worker(spec: dict[str, Any]) -> None:
    """One rank of a distributed timing (started by torchrun); rank 0 writes it."""
    import torch.distributed as dist

    from sae_gba.distributed import RankSlice, init_process_group, train_parallel

    torch.set_num_threads(spec["threads"])
    init_process_group(spec["device"])
    d_in, d_sae, batch = spec["shape"]
    device = spec["device"]
    if device.startswith("cuda"):
        device = f"cuda:{torch.cuda.current_device()}"
    clock = _Clock(RankSlice(_data(tuple(spec["shape"]))))
    with tempfile.TemporaryDirectory() as folder:
        train_parallel(
            _sae(d_in, d_sae, device),
            clock,
            total_tokens=(spec["warmup"] + spec["timed"] + 1) * batch,
            batch_size=batch,
            folder=folder,
            checkpoint_interval_s=1e9,
        )
    if dist.get_rank() == 0:
        rate = _rate(clock.times, spec["warmup"], spec["timed"], batch)
        Path(spec["result"]).write_text(json.dumps(rate))
    dist.destroy_process_group()


def time_distributed(
    shape: tuple[int, int, int],
    ranks: int,
    warmup: int,
    timed: int,
    threads: int,
    device: str,
) -> dict[str, float]:
    """Tokens/s of ``train_parallel`` on ``ranks`` local ranks (torchrun)."""
    from torch.distributed.run import main as torchrun

    with tempfile.TemporaryDirectory() as folder:
        spec = {
            "shape": shape,
            "warmup": warmup,
            "timed": timed,
            "threads": max(1, threads // ranks),
            "device": device,
            "result": str(Path(folder) / "rate.json"),
        }
        spec_file = Path(folder) / "spec.json"
        spec_file.write_text(json.dumps(spec))
        torchrun(
            [
                "--standalone",
                f"--nproc-per-node={ranks}",
                "-m",
                "sae_gba_evals.bench.scaling",
                str(spec_file),
            ]
        )
        return json.loads(Path(spec["result"]).read_text())


def time_sparsify(
    shape: tuple[int, int, int], warmup: int, timed: int, device: str
) -> dict[str, float]:
    """Tokens/s of sparsify's TopK SAE training step in one process."""
    from sparsify import Sae, SaeConfig

    d_in, d_sae, batch = shape
    torch.manual_seed(0)
    sae = Sae(d_in, SaeConfig(num_latents=d_sae, k=min(SPARSIFY_K, d_sae)), device)
    optimizer = torch.optim.Adam(sae.parameters(), lr=3e-4)
    use_fused_adam(optimizer)  # make_trainer's Adam, as the GBA path steps
    data = _data(shape)
    times = []
    for _ in range(warmup + timed + 1):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter())
        sparsify_step(sae, optimizer, next(data).to(device))
    return _rate(times, warmup, timed, batch)


def run_scaling(
    out: str | Path,
    size: str = "default",
    device: str = "cpu",
    threads: int | None = None,
    ranks: tuple[int, ...] = RANKS,
) -> dict[str, Any]:
    """Time every shape on the plain path, on each rank count and with sparsify.

    Args:
        out: the JSON file.
        size: "default" (the measured shapes) or "tiny" (seconds: a check only).
        device: "cpu" (gloo) or "cuda" (nccl, one GPU per rank).
        threads: torch threads in all (split between ranks; None: all cores).
        ranks: the rank counts timed.
    """
    if size not in SHAPES:
        raise ValueError(f"size={size!r} is invalid: must be one of {list(SHAPES)}")
    if device.startswith("cuda") and max(ranks) > torch.cuda.device_count():
        raise ValueError(
            f"ranks={ranks} need {max(ranks)} CUDA devices; this machine has "
            f"{torch.cuda.device_count()} (pass ranks=(1,) on one GPU)"
        )
    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    warmup, timed = STEPS[size]
    peer = sparsify_available()
    rows: list[dict[str, Any]] = []
    for shape in SHAPES[size]:
        key = {"d_in": shape[0], "d_sae": shape[1], "batch_tokens": shape[2]}
        plain = time_plain(shape, warmup, timed, device)
        rows.append({**key, "mode": "plain", "ranks": 1, **plain})
        for n in ranks:
            rate = time_distributed(shape, n, warmup, timed, threads, device)
            rows.append({**key, "mode": "distributed", "ranks": n, **rate})
        if peer:
            rate = time_sparsify(shape, warmup, timed, device)
            rows.append({**key, "mode": "sparsify", "ranks": 1, **rate})
    result = {
        "command": f"sae-gba bench scaling --out {out} --size {size} --device {device}",
        "size": size,
        "device": device,
        "backend": "nccl" if device.startswith("cuda") else "gloo",
        "threads": threads,
        "steps": {"warmup": warmup, "timed": timed},
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
        },
        "rows": rows,
        "summary": _summary(rows),
        "sparsify": "measured" if peer else f"not installed: {HOW_TO_ADD_SPARSIFY}",
    }
    write_text_atomically(Path(out), json.dumps(result, indent=1))
    return result


def _summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per shape: the 1-rank overhead against plain and the 2-rank speedup."""
    summary = []
    for shape in sorted({(r["d_in"], r["d_sae"], r["batch_tokens"]) for r in rows}):
        at = {
            (r["mode"], r["ranks"]): r
            for r in rows
            if (r["d_in"], r["d_sae"], r["batch_tokens"]) == shape
        }
        entry: dict[str, Any] = {"shape": list(shape)}
        plain, one, two = (
            at.get(("plain", 1)),
            at.get(("distributed", 1)),
            at.get(("distributed", 2)),
        )
        if plain and one:
            entry["overhead_1_rank"] = one["step_s"] / plain["step_s"] - 1
        if one and two:
            entry["speedup_2_ranks"] = two["tokens_per_s"] / one["tokens_per_s"]
        if plain and ("sparsify", 1) in at:
            entry["sparsify_vs_plain"] = (
                at[("sparsify", 1)]["tokens_per_s"] / plain["tokens_per_s"]
            )
        summary.append(entry)
    return summary


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m sae_gba_evals.bench.scaling")
    parser.add_argument("spec", help="a worker spec JSON (written by run_scaling)")
    worker(json.loads(Path(parser.parse_args().spec).read_text()))
