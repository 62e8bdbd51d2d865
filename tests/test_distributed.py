"""Data-parallel training on 2 gloo ranks (forked processes, real collectives).

The ranks are forked from the test process (no second import of torch and SAELens)
and join a gloo group through a rendezvous file; one test starts them with torchrun.
A weighted GBA SAE covers GBA's reductions: gradients, the gathered first batch and
variance batches, and the window statistics before each bias adaptation; a TopK SAE
covers SAELens's dead-latent counters and its activation norm estimate. float64
keeps the comparison with one process free of gate flips from rounding.
"""

import os
import shutil
import signal
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY
from safetensors.torch import load_file, save_file

from sae_gba.distributed import RankSlice, train_parallel
from sae_gba.training import (
    TensorDataProvider,
    latest_checkpoint,
    make_trainer,
    resume_from_checkpoint,
)
from tests.helpers import cli_error

D_IN, D_SAE, BATCH, STEPS = 16, 64, 32, 24
RANKS = 2
# A rank that died must stop the others within this many seconds.
STOP_BOUND_S = 30.0
# No run here takes a tenth of this, even on a loaded machine.
RUN_BOUND_S = 120.0


def _activations() -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    codes = torch.randn(512, 8, generator=g).relu()
    x = codes @ torch.randn(8, D_IN, generator=g)
    return (x + 0.1 * torch.randn(512, D_IN, generator=g)).double()


# Per architecture: its config fields and the trainer's options. TopK exercises
# SAELens's dead-latent counters (its aux-k loss) and the activation norm estimate.
JOBS = {
    "weighted_gba": (
        {
            "n_groups": 4,
            "adaptation_interval": 3,
            "min_window_firings": 0,
            "weight_estimation_batches": 2,
            "normalize_activations": "none",
        },
        {},
    ),
    "topk": (
        {"k": 4, "normalize_activations": "expected_average_only_in"},
        {"dead_feature_window": 2, "n_batches_for_norm_estimate": 3},
    ),
}


def _sae(arch: str = "weighted_gba"):
    sae_class, config_class = SAE_TRAINING_CLASS_REGISTRY[arch]
    torch.manual_seed(0)
    return sae_class(
        config_class(d_in=D_IN, d_sae=D_SAE, dtype="float64", **JOBS[arch][0])
    )


def _one_process(arch: str = "weighted_gba"):
    """The run of one process fed the global batches: (state, bias record)."""
    sae = _sae(arch)
    data = _Recorder(TensorDataProvider(_activations(), BATCH, seed=0), sae)
    trainer = make_trainer(
        sae, data, total_tokens=STEPS * BATCH, batch_size=BATCH, **JOBS[arch][1]
    )
    trainer.fit()
    return {k: v.contiguous() for k, v in sae.state_dict().items()}, data.biases


class _Recorder(Iterator[torch.Tensor]):
    """Records the gate biases before every step; a fault may stop this rank."""

    def __init__(self, data, sae, fault: str | None = None, at_step: int = -1):
        self.data, self.sae, self.fault, self.at_step = data, sae, fault, at_step
        self.biases: list[torch.Tensor] = []

    def __next__(self) -> torch.Tensor:
        sae = self.sae
        bias = sae.gate_bias if hasattr(sae, "gate_bias") else sae.b_enc
        self.biases.append(bias.detach().clone())
        if len(self.biases) == self.at_step and self.fault == "sigint":
            os.kill(os.getpid(), signal.SIGINT)
        if len(self.biases) == self.at_step and self.fault == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        return next(self.data)

    def save_state(self, folder: Path) -> None:
        self.data.save_state(folder)

    def load_state(self, folder: Path) -> None:
        self.data.load_state(folder)


def _rank_main(
    rank: int,
    out: Path,
    world: int,
    arch: str,
    fault: str | None,
    resume: bool,
    every: float,
):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{out}/rendezvous",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    sae = _sae(arch)
    data = TensorDataProvider(_activations(), BATCH, seed=0)
    recorder = _Recorder(RankSlice(data), sae, fault if rank == 1 else None, 10)
    try:
        train_parallel(
            sae,
            recorder,
            total_tokens=STEPS * BATCH,
            batch_size=BATCH,
            folder=out,
            checkpoint_interval_s=every,
            resume=resume,
            **JOBS[arch][1],
        )
    except KeyboardInterrupt:
        (out / f"interrupted_{rank}").touch()
        return
    except RuntimeError as err:
        (out / f"error_{rank}.txt").write_text(str(err))
        raise
    finally:
        save_file({"biases": torch.stack(recorder.biases)}, out / f"biases_{rank}.st")
    save_file(
        {k: v.contiguous() for k, v in sae.state_dict().items()},
        out / f"state_{rank}.st",
    )


def _run(
    out: Path,
    world: int = RANKS,
    arch: str = "weighted_gba",
    fault: str | None = None,
    resume: bool = False,
    every: float = 3600.0,
):
    out.mkdir(exist_ok=True)
    (out / "rendezvous").unlink(missing_ok=True)
    context = mp.start_processes(
        _rank_main,
        args=(out, world, arch, fault, resume, every),
        nprocs=world,
        start_method="fork",
        join=False,
    )
    _join(context)


def _join(context) -> None:
    """Wait for the ranks; a failed rank raises, and a hang fails the test."""
    deadline = time.monotonic() + RUN_BOUND_S
    while not context.join(timeout=1, grace_period=STOP_BOUND_S):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the ranks were still running after {RUN_BOUND_S} s")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two_ranks")
    _run(out)
    return out


def _assert_states_close(a: dict, b: dict, atol: float) -> None:
    assert set(a) == set(b)
    for name in a:
        assert torch.allclose(a[name].double(), b[name].double(), atol=atol, rtol=0), (
            name
        )


def test_two_ranks_equal_one_process_fed_the_same_global_batches(two_ranks):
    single, recorded = _one_process()
    parallel = load_file(two_ranks / "state_0.st")
    _assert_states_close(parallel, single, atol=1e-5)
    # The weights were estimated and the biases adapted (the test can fail).
    assert int(single["input_weights_state"]) == 1
    assert single["input_weights"].std() > 0.05
    biases = torch.stack(recorded)
    assert len(torch.unique(biases, dim=0)) >= 6
    assert torch.allclose(load_file(two_ranks / "biases_0.st")["biases"], biases)
    # Rank 0 holds the window counts of both ranks; rank 1 gave its share away.
    assert int(parallel["window_tokens"].max()) > 0
    assert (single["window_tokens"] == parallel["window_tokens"]).all()
    assert (two_ranks / "sae" / "sae_weights.safetensors").is_file()


def test_biases_are_equal_across_ranks_after_every_adaptation(two_ranks):
    first = load_file(two_ranks / "biases_0.st")["biases"]
    second = load_file(two_ranks / "biases_1.st")["biases"]
    assert first.shape == (STEPS, D_SAE)
    assert torch.equal(first, second)
    states = [load_file(two_ranks / f"state_{r}.st") for r in range(RANKS)]
    for name in ("directions", "output_scale", "gate_bias", "input_weights"):
        assert torch.equal(states[0][name], states[1][name]), name


def test_topk_with_norm_estimate_on_two_ranks_equals_one_process(tmp_path):
    _run(tmp_path, arch="topk")
    single, _ = _one_process("topk")
    _assert_states_close(load_file(tmp_path / "state_0.st"), single, atol=1e-5)


def test_resume_after_ctrl_c_equals_the_uninterrupted_run(two_ranks, tmp_path):
    _run(tmp_path, fault="sigint")
    assert (tmp_path / "interrupted_0").is_file()
    assert (tmp_path / "interrupted_1").is_file()
    checkpoint = latest_checkpoint(tmp_path / "checkpoints")
    assert checkpoint is not None and checkpoint.name == "step_000000010"
    shutil.copytree(tmp_path / "checkpoints", tmp_path / "kept")
    uninterrupted = load_file(two_ranks / "state_0.st")
    _run(tmp_path, resume=True)
    _assert_states_close(load_file(tmp_path / "state_0.st"), uninterrupted, 1e-12)
    # The global batches do not depend on the world size: 1 rank resumes it too.
    shutil.copytree(tmp_path / "kept", tmp_path / "checkpoints")
    _run(tmp_path, world=1, resume=True)
    _assert_states_close(load_file(tmp_path / "state_0.st"), uninterrupted, 1e-5)


def test_a_rank_that_dies_stops_the_job_with_the_last_checkpoint_intact(tmp_path):
    started = time.monotonic()
    with pytest.raises(mp.ProcessExitedException, match="process 1 .*SIGKILL"):
        out = tmp_path
        out.mkdir(exist_ok=True)
        context = mp.start_processes(
            _rank_main,
            args=(out, RANKS, "weighted_gba", "die", False, 0.0),
            nprocs=RANKS,
            start_method="fork",
            join=False,
        )
        _join(context)
    assert time.monotonic() - started < STOP_BOUND_S
    message = (tmp_path / "error_0.txt").read_text()
    assert "rank 0 of 2 stopped: " in message and "Connection" in message
    checkpoint = latest_checkpoint(tmp_path / "checkpoints")
    assert checkpoint is not None and str(checkpoint) in message
    # The checkpoint loads into a fresh trainer, at the step it was written.
    sae = _sae()
    data = TensorDataProvider(_activations(), BATCH, seed=0)
    trainer = make_trainer(sae, data, total_tokens=STEPS * BATCH, batch_size=BATCH)
    resume_from_checkpoint(trainer, data, checkpoint)
    assert trainer.n_training_steps == 9


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--preset", "embedded", "--nproc", "0"], "--nproc 0 is invalid"),
        (["bench", "scaling", "--size", "huge"], "--size 'huge' is invalid: must be"),
    ],
)
def test_bad_parallel_options_are_named(tmp_path, capsys, argv, message):
    out = tmp_path / ("run" if argv[0] == "train" else "scaling.json")
    assert message in cli_error(capsys, [*argv, "--out", str(out)])
    assert not out.exists()


def test_torchrun_launches_two_ranks_of_the_scaling_bench():
    """The real launcher: torchrun's rendezvous, env-initialised gloo group."""
    from sae_gba_evals.bench.scaling import time_distributed

    rate = time_distributed((16, 64, 32), 2, warmup=1, timed=2, threads=2, device="cpu")
    assert rate["tokens_per_s"] > 0 and rate["step_s"] > 0
