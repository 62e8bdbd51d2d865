"""One suite run (family x method x seed) through SAELens's ``SyntheticSAERunner``,
its metrics, and a process pool for many.

Every method on one (family, seed) sees identical data: the SAE is initialised under
one seed, then the global RNG (which SAELens's generators draw from) is reseeded
before training and again before evaluation.
"""

import contextlib
import io
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
from sae_lens.config import LoggingConfig
from sae_lens.synthetic import (
    SyntheticModel,
    SyntheticSAERunner,
    SyntheticSAERunnerConfig,
    eval_sae_on_synthetic_data,
)
from sae_lens.util import temporary_seed
from tqdm.auto import tqdm

from sae_gba.recovery import best_match_cosine
from sae_gba_evals.lab.runner import worker_init
from sae_gba_evals.suite.families import FAMILIES, hierarchy_groups, true_frequencies
from sae_gba_evals.suite.methods import l1_rule, method_k, sae_config

# Offsets keep the SAE's initial weights, the training stream and the evaluation
# stream apart from each other and from the data model's own seed.
INIT_SEED_OFFSET = 1_000_003
STREAM_SEED_OFFSET = 2_000_003
EVAL_SEED_OFFSET = 3_000_017
THRESHOLDS = (0.8, 0.9)
THIRDS = ("common", "middle", "rare")


@dataclass(frozen=True)
class Size:
    """Training and evaluation sizes shared by every method.

    Args:
        width: SAE latents.
        steps: training steps.
        batch_size: samples per step.
        lr: Adam learning rate (constant).
        eval_samples: samples for SAELens's evaluation (L0, EV, MCC, ...).
        frequency_samples: samples to measure each feature's true frequency.
    """

    width: int = 512
    steps: int = 3000
    batch_size: int = 512
    lr: float = 1e-3
    eval_samples: int = 20_000
    frequency_samples: int = 100_000


SIZES = {
    "default": Size(),
    "small": Size(
        width=64, steps=10, batch_size=64, eval_samples=1000, frequency_samples=5000
    ),
}


@dataclass(frozen=True)
class Job:
    """One training run.

    Args:
        family: a key of ``FAMILIES``.
        method: a method of ``sae_gba_evals.suite.methods``.
        seed: data and SAE seed.
        size: the shared sizes.
        gba: extra fields for ``gba_default``.
        n: number of features, instead of the family's (scaling runs).
    """

    family: str
    method: str
    seed: int
    size: Size
    gba: dict[str, Any] = field(default_factory=dict)
    n: int | None = None


def _centred_power(model: SyntheticModel, samples: int) -> float:
    with temporary_seed(54_321):
        x = model.sample(samples)
    return float((x - x.mean(0)).pow(2).sum(-1).mean())


def _recovery(best: torch.Tensor, t: float, indices: Any = slice(None)) -> float:
    return float((best[indices] > t).double().mean())


def run_job(job: Job) -> dict[str, Any]:
    """Train one SAE through ``SyntheticSAERunner`` and measure it.

    Args:
        job: the run.

    Returns:
        FRR overall and per frequency third (and per hierarchy level), SAELens's
        synthetic-eval metrics, k, true L0 and timings.
    """
    start = time.time()
    sizes = {} if job.n is None else {"n": job.n}
    model = FAMILIES[job.family].build(job.seed, **sizes)
    frequencies = true_frequencies(model, job.size.frequency_samples)
    true_l0 = float(frequencies.sum())
    l1 = l1_rule(_centred_power(model, 20_000), true_l0)
    size = job.size
    cfg = SyntheticSAERunnerConfig(
        synthetic_model=model.cfg,
        sae=sae_config(
            job.method, model.cfg.hidden_dim, size.width, true_l0, l1, job.gba
        ),
        training_samples=size.steps * size.batch_size,
        batch_size=size.batch_size,
        lr=size.lr,
        checkpoint_path=None,
        output_path=None,
        run_final_eval=False,
        logger=LoggingConfig(log_to_wandb=False),
    )
    torch.manual_seed(job.seed + INIT_SEED_OFFSET)
    runner = SyntheticSAERunner(cfg, override_synthetic_model=model)
    torch.manual_seed(job.seed + STREAM_SEED_OFFSET)
    train_start = time.time()
    with contextlib.redirect_stderr(io.StringIO()):  # the trainer's progress bar
        sae = runner.run().sae
    train_seconds = time.time() - train_start
    torch.manual_seed(job.seed + EVAL_SEED_OFFSET)
    evaluation = eval_sae_on_synthetic_data(
        sae,
        model.feature_dict,
        model.activation_generator,
        num_samples=size.eval_samples,
        batch_size=min(size.eval_samples, 10_000),
    )
    dictionary = sae.W_dec.detach().float()
    best = best_match_cosine(dictionary, model.feature_dict.feature_vectors.detach())
    order = frequencies.argsort(descending=True)
    groups = {
        **dict(zip(THIRDS, torch.tensor_split(order, 3), strict=True)),
        **(hierarchy_groups(model) or {}),
    }
    result: dict[str, Any] = {"k": method_k(job.method, true_l0), "true_l0": true_l0}
    for t in THRESHOLDS:
        result[f"frr@{t}"] = _recovery(best, t)
        for name, members in groups.items():
            result[f"frr@{t}_{name}"] = _recovery(best, t, members)
    result.update(
        mcc=evaluation.mcc,
        uniqueness=evaluation.uniqueness,
        l0=evaluation.sae_l0,
        explained_variance=evaluation.explained_variance,
        dead_latents=evaluation.dead_latents,
        shrinkage=evaluation.shrinkage,
        f1=evaluation.classification.f1_score,
        l1_coefficient=l1 if job.method == "l1" else None,
        train_seconds=train_seconds,
        run_seconds=time.time() - start,
    )
    return result


def run_jobs(
    jobs: list[Job], workers: int = 1, log: Path | None = None
) -> list[dict[str, Any]]:
    """Every job, in ``workers`` one-thread processes (1: here, in order).

    Args:
        jobs: the runs.
        workers: processes.
        log: a JSON-lines file that gets each run's record as it finishes, so an
            interrupted suite keeps what it measured (None: no log).

    Returns:
        ``run_job``'s result per job, in order, each with the job's fields.
    """
    labels = [
        {
            **{k: v for k, v in asdict(job).items() if k != "size"},
            "width": job.size.width,
        }
        for job in jobs
    ]
    records: dict[int, dict[str, Any]] = {}

    def keep(index: int, result: dict[str, Any]) -> None:
        records[index] = {**labels[index], **result}
        if log is not None:
            with log.open("a") as file:
                file.write(json.dumps(records[index]) + "\n")

    if workers <= 1:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as in the workers: tiny matmuls, no contention
        try:
            for index, job in enumerate(tqdm(jobs, desc="runs")):
                keep(index, run_job(job))
        finally:
            torch.set_num_threads(threads)
    else:
        with ProcessPoolExecutor(
            min(workers, len(jobs)),
            mp_context=get_context("spawn"),
            initializer=worker_init,
            initargs=(os.getpid(),),
        ) as pool:
            futures = {pool.submit(run_job, job): i for i, job in enumerate(jobs)}
            for future in tqdm(as_completed(futures), total=len(jobs), desc="runs"):
                keep(futures[future], future.result())
    return [records[index] for index in range(len(jobs))]
