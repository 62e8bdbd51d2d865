"""GBA's and the weighted SAEs' metrics in SAELens's logger: values, and wandb offline."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner
from sae_lens.saes.sae import TrainStepInput

from sae_gba import GBATrainingSAE, GBATrainingSAEConfig
from sae_gba.bias_adaptation import group_index, target_frequencies
from sae_gba.metrics import DENSE_FREQUENCY, summarize_window
from sae_gba.synthetic import SyntheticFeatureModel, uniform_preset
from sae_gba.training import TensorDataProvider, make_trainer
from sae_gba.weighted_sae import WEIGHTED_CLASSES
from tests.helpers import runner_dict, tiny_model, token_dataset

GROUP_METRICS = (
    "target_freq",
    "median_freq",
    "mean_freq",
    "median_over_target",
    "gate_bias_mean",
    "gate_bias_min",
    "gate_bias_max",
    "dead",
    "dense",
)
OVERALL_METRICS = (
    "l0",
    "fired_fraction",
    "dead",
    "dense",
    "mean_gate_bias",
    "window_tokens",
)
OUTPUT_SCALE_METRICS = ("output_scale_mean", "output_scale_min", "output_scale_max")


def _synthetic(n_rows: int) -> torch.Tensor:
    model = SyntheticFeatureModel(
        uniform_preset(sparsity=3, n_features=48, d=16, seed=3)
    )
    return model.sample(n_rows, torch.Generator().manual_seed(0))[0]


def _step_input(x: torch.Tensor) -> TrainStepInput:
    return TrainStepInput(
        sae_in=x,
        coefficients={"l1": 0.5, "l0": 0.5},
        dead_neuron_mask=None,
        n_training_steps=0,
        is_logging_step=False,
    )


def _expected(
    frequency: np.ndarray, sae: GBATrainingSAE, tokens: int
) -> dict[str, float]:
    """The metrics computed directly, with numpy, from the window's frequencies."""
    cfg = sae.cfg
    targets = target_frequencies(
        cfg.n_groups, cfg.high_target_freq, cfg.low_target_freq
    ).numpy()
    groups = group_index(cfg.d_sae, cfg.n_groups).numpy()
    bias = sae.gate_bias.double().numpy()
    scale = sae.output_scale.detach().double().numpy()
    out = {}
    for k in range(cfg.n_groups):
        f, b = frequency[groups == k], bias[groups == k]
        p = f"metrics/gba/group_{k}/"
        out |= {
            p + "target_freq": targets[k],
            p + "median_freq": np.median(f),
            p + "mean_freq": f.mean(),
            p + "median_over_target": np.median(f) / targets[k],
            p + "gate_bias_mean": b.mean(),
            p + "gate_bias_min": b.min(),
            p + "gate_bias_max": b.max(),
            p + "dead": (f <= cfg.dead_threshold).sum(),
            p + "dense": (f > DENSE_FREQUENCY).sum(),
        }
    return out | {
        "metrics/gba/l0": frequency.sum(),
        "metrics/gba/fired_fraction": (frequency > 0).mean(),
        "metrics/gba/dead": (frequency <= cfg.dead_threshold).sum(),
        "metrics/gba/dense": (frequency > DENSE_FREQUENCY).sum(),
        "metrics/gba/mean_gate_bias": bias.mean(),
        "metrics/gba/window_tokens": tokens,
        "metrics/gba/output_scale_mean": scale.mean(),
        "metrics/gba/output_scale_min": scale.min(),
        "metrics/gba/output_scale_max": scale.max(),
    }


def test_logger__reports_the_last_completed_window_per_group():
    torch.manual_seed(0)
    cfg = GBATrainingSAEConfig(
        d_in=16,
        d_sae=48,
        n_groups=3,
        low_target_freq=0.01,
        adaptation_interval=5,
        min_window_firings=0,  # every window closes at each check: one shared window
        gate_bias_init="target_quantile",  # the groups apart from the first step
    )
    sae = GBATrainingSAE(cfg)
    provider = TensorDataProvider(_synthetic(4096), 128, seed=0)
    trainer = make_trainer(sae, provider, total_tokens=128 * 40, batch_size=128)
    trainer.fit()  # 40 steps: 8 full windows, the last not yet adapted on
    assert int(sae.window_steps) == 5
    window = (sae.window_fire_counts.double() / sae.window_tokens).numpy()
    tokens = int(sae.window_tokens[0])

    # The next step adapts on that window, then SAELens's logger reads the metrics.
    output = trainer.step(next(provider))
    logged = trainer.build_train_step_log_dict(output, trainer.n_training_samples)

    expected = _expected(window, sae, tokens)
    assert {k for k in logged if k.startswith("metrics/gba/")} == set(expected)
    for name, value in expected.items():
        assert logged[name] == pytest.approx(value, rel=1e-6, abs=1e-9), name
    # The groups hold different frequencies in the order of their targets, some
    # latents are dead or dense: a window of zeros or of the wrong window would fail.
    medians = [logged[f"metrics/gba/group_{k}/median_freq"] for k in range(3)]
    assert medians[0] > medians[1] > medians[2]
    assert logged["metrics/gba/dense"] > 0
    assert 0 < logged["metrics/gba/fired_fraction"] <= 1
    # The running window (one step in) is not what is reported.
    running = sae.window_fire_counts.double() / sae.window_tokens
    assert not np.allclose(running.numpy(), window)


def test_logger__running_window_stands_in_before_the_first_adaptation():
    sae = GBATrainingSAE(
        GBATrainingSAEConfig(d_in=16, d_sae=32, n_groups=2, train_output_scale=False)
    )
    output = sae.training_forward_pass(_step_input(_synthetic(256)))
    metrics = {name: value() for name, value in output.metrics.items()}
    frequency = (sae.window_fire_counts.double() / 256).numpy()
    expected = _expected(frequency, sae, 256)
    # Frozen output scales are not reported.
    assert {f"metrics/{k}" for k in metrics} == {
        k for k in expected if "output_scale" not in k
    }
    for name, value in metrics.items():
        assert value == pytest.approx(expected[f"metrics/{name}"], rel=1e-6), name


@pytest.mark.parametrize("base", list(WEIGHTED_CLASSES))
def test_logger__weighted_architectures_report_their_weights(base):
    sae_class, cfg_class = WEIGHTED_CLASSES[base]
    fields = {"k": 8} if "topk" in base else {}
    sae = sae_class(cfg_class(d_in=16, d_sae=32, weight_estimation_batches=2, **fields))
    x = _synthetic(256) * torch.linspace(0.5, 3.0, 16)  # unequal variances
    for step, fixed in enumerate((0, 1)):
        output = sae.training_forward_pass(_step_input(x[step * 128 :][:128]))
        metrics = {  # as SAELens's logger unwraps them (topk_threshold is a tensor)
            name: float(value() if callable(value) else value)
            for name, value in output.metrics.items()
        }
        assert metrics["wsae/weights_fixed"] == fixed
    gamma = sae.input_weights
    assert metrics["wsae/gamma_min"] == pytest.approx(float(gamma.min()))
    assert metrics["wsae/gamma_max"] == pytest.approx(float(gamma.max()))
    assert metrics["wsae/gamma_max"] > 2 * metrics["wsae/gamma_min"]
    assert any(name.startswith("gba/") for name in metrics) == (base == "gba")


def _wandb_history(root) -> list[dict]:
    """The history rows of the one offline run under ``root``, by wandb's reader."""
    (path,) = root.glob("wandb/offline-run-*/run-*.wandb")
    records = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout.splitlines()
    return [
        record["history"]["item"]
        for record in map(json.loads, records)
        if record["type"] == "history"
    ]


def test_wandb_offline__metrics_reach_the_run_files(tmp_path, monkeypatch):
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = LanguageModelSAERunnerConfig.from_dict(
        runner_dict(
            {
                "architecture": "gba",
                "d_in": 32,
                "d_sae": 64,
                "n_groups": 4,
                "high_target_freq": 0.5,
                "adaptation_interval": 5,
            },
            str(tmp_path / "out"),
            logger={
                "log_to_wandb": True,
                "wandb_log_frequency": 5,
                "eval_every_n_wandb_logs": 1000,
            },
        )
    )
    sae = LanguageModelSAETrainingRunner(
        cfg, override_model=tiny_model(), override_dataset=token_dataset()
    ).run()

    rows = [row for row in _wandb_history(tmp_path) if "metrics/gba/l0" in row]
    assert [row["_step"] for row in rows] == list(range(4, 60, 5))
    # The last logged step is the last step: its values are the SAE's final state.
    final = sae.window_metrics()
    for name, value in final.items():
        assert rows[-1][f"metrics/{name}"] == pytest.approx(value, rel=1e-6), name
    targets = target_frequencies(4, 0.5, 1e-4).tolist()
    for k, target in enumerate(targets):
        assert rows[-1][f"metrics/gba/group_{k}/target_freq"] == pytest.approx(target)
    assert len({row["metrics/gba/mean_gate_bias"] for row in rows}) > 1


def test_summarize_window__by_hand():
    metrics = summarize_window(
        frequency=torch.tensor([0.0, 0.05, 0.2, 0.6, 0.0]),
        group_targets=torch.tensor([0.5, 0.01], dtype=torch.float64),
        neuron_groups=torch.tensor([0, 0, 1, 1, 1]),
        gate_bias=torch.tensor([-0.1, -0.3, -0.2, 0.0, -0.4]),
        dead_threshold=0.0,
    )
    expected = {
        "gba/group_0/median_freq": 0.025,
        "gba/group_0/mean_freq": 0.025,
        "gba/group_0/median_over_target": 0.05,
        "gba/group_0/gate_bias_mean": -0.2,
        "gba/group_0/dead": 1,
        "gba/group_0/dense": 0,
        "gba/group_1/median_freq": 0.2,
        "gba/group_1/median_over_target": 20,
        "gba/group_1/gate_bias_min": -0.4,
        "gba/group_1/gate_bias_max": 0.0,
        "gba/group_1/dead": 1,
        "gba/group_1/dense": 2,
        "gba/l0": 0.85,
        "gba/fired_fraction": 0.6,
        "gba/dead": 2,
        "gba/dense": 2,
    }
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value, rel=1e-6, abs=1e-7), name
    assert not any("output_scale" in name for name in metrics)
