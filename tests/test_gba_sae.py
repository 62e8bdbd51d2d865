"""GBA as a SAELens architecture: forward, export, invariances, resume, errors."""

import json
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from sae_lens import SAE, LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner
from sae_lens.saes.sae import TrainingSAE, TrainStepInput

import sae_gba
from sae_gba import GBASAE, GBATrainingSAE, GBATrainingSAEConfig
from sae_gba.bias_adaptation import adapt_biases, group_index, target_frequencies
from sae_gba.registry import register_architectures
from sae_gba.synthetic import SyntheticFeatureModel, uniform_preset
from sae_gba.training import (
    TensorDataProvider,
    make_trainer,
    resume_from_checkpoint,
    save_checkpoint_atomically,
)
from tests.helpers import (
    relative_weights_by_hand,
    runner_dict,
    tiny_model,
    token_dataset,
)


def _step_input(x: torch.Tensor, step: int = 0) -> TrainStepInput:
    return TrainStepInput(
        sae_in=x,
        coefficients={},
        dead_neuron_mask=None,
        n_training_steps=step,
        is_logging_step=False,
    )


def _synthetic(n_rows: int, scale: float = 1.0) -> torch.Tensor:
    model = SyntheticFeatureModel(
        uniform_preset(sparsity=3, n_features=48, d=16, seed=3)
    )
    x, _ = model.sample(n_rows, torch.Generator().manual_seed(0))
    return x * scale


def _train(
    x: torch.Tensor, steps: int, seed: int = 0, **cfg
) -> tuple[GBATrainingSAE, object]:
    torch.manual_seed(seed)
    sae = GBATrainingSAE(GBATrainingSAEConfig(d_in=x.shape[1], **cfg))
    provider = TensorDataProvider(x, 128, seed=seed)
    trainer = make_trainer(
        sae, provider, total_tokens=128 * steps, batch_size=128, lr=3e-3
    )
    trainer.fit()
    return sae, trainer


def test_forward__matches_the_paper_formula():
    sae = GBATrainingSAE(GBATrainingSAEConfig(d_in=8, d_sae=20, n_groups=2))
    x = torch.randn(64, 8) * 2 + 0.5
    sae.training_forward_pass(_step_input(x))  # fixes the input scale and b_pre
    with torch.no_grad():
        sae.gate_bias.uniform_(-0.3, 0.0)
        sae.output_scale.uniform_(0.5, 1.5)
    w = sae.directions / sae.directions.norm(dim=1, keepdim=True)
    c = sae.input_scale
    b_pre = sae.pre_bias * c
    y = (x - b_pre) @ w.T / c + sae.gate_bias
    z = ((x - b_pre) @ w.T) * (y > 0)
    expected = (z * sae.output_scale) @ w + b_pre
    assert torch.allclose(sae(x), expected, atol=1e-5)
    assert torch.allclose(sae.encode(x), z, atol=1e-5)


def test_biases_get_no_gradient_and_w_stays_unit_norm():
    sae, _ = _train(
        _synthetic(4096), steps=30, d_sae=64, n_groups=4, adaptation_interval=5
    )
    trained = {name for name, p in sae.named_parameters() if p.requires_grad}
    assert trained == {"directions", "output_scale"}
    assert "gate_bias" in dict(sae.named_buffers())
    norms = sae.directions.norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-2)
    assert (sae.gate_bias < 0).any(), "bias adaptation never moved a bias"
    assert sae.gate_bias.min() >= -1 and sae.gate_bias.max() <= 0


def test_pre_bias__fixed_at_the_data_mean_unless_trained():
    x = _synthetic(4096) + 2.0
    fixed, _ = _train(x, steps=20, d_sae=32, n_groups=2)
    first_batch = x[TensorDataProvider(x, 128, seed=0)._order[:128]]
    assert torch.allclose(fixed.b_dec, first_batch.mean(0), atol=1e-5)
    trained, _ = _train(x, steps=20, d_sae=32, n_groups=2, train_pre_bias=True)
    assert "pre_bias" in {n for n, p in trained.named_parameters() if p.requires_grad}
    assert not torch.allclose(trained.b_dec, first_batch.mean(0), atol=1e-3)


def test_gate_bias_init__target_quantile_fires_each_group_at_its_target():
    x = _synthetic(4096)
    cfg = {"d_in": 16, "d_sae": 300, "n_groups": 3, "high_target_freq": 0.5}
    cfg["low_target_freq"] = 0.02
    zero = GBATrainingSAE(GBATrainingSAEConfig(**cfg))
    zero.training_forward_pass(_step_input(x[:2048]))
    assert torch.equal(zero.gate_bias, torch.zeros(300))
    sae = GBATrainingSAE(GBATrainingSAEConfig(**cfg, gate_bias_init="target_quantile"))
    sae.training_forward_pass(_step_input(x[:2048]))
    # Fresh rows from the same data: each group fires near 0.5, 0.1, 0.02.
    fired = (sae.encode(x[2048:]) > 0).float().mean(0)
    groups = fired.reshape(3, 100).mean(1)
    assert groups.tolist() == pytest.approx([0.5, 0.1, 0.02], rel=0.15)


def test_adaptation_checks_every_interval_and_judges_only_closed_windows():
    # Targets 0.5 and 1e-3: at 192 tokens the first group expects 96 firings (its
    # windows close), the second 0.19 (its windows stay open unless a neuron fired
    # 20 times).
    sae = GBATrainingSAE(
        GBATrainingSAEConfig(
            d_in=16, d_sae=32, n_groups=2, adaptation_interval=3, low_target_freq=1e-3
        )
    )
    with torch.no_grad():
        sae.gate_bias[16:24] = -1.0  # silent: open windows, nothing to judge yet
    x = _synthetic(64)
    for step in range(3):
        sae.training_forward_pass(_step_input(x, step))
    assert sae.window_steps.item() == 3
    assert torch.equal(sae.window_tokens, torch.full((32,), 192))
    counts = sae.window_fire_counts.clone()
    before = sae.gate_bias.clone()
    sae.training_forward_pass(_step_input(x, 3))  # adapts first, then counts
    closed = torch.arange(32) < 16
    closed |= counts >= 20
    assert sae.window_steps.item() == 1
    assert torch.equal(sae.window_tokens, torch.where(closed, 64, 256))
    assert not closed[16:24].any() and closed[24:].all()
    assert torch.equal(sae.gate_bias[~closed], before[~closed])
    assert not torch.equal(sae.gate_bias[closed], before[closed])


def test_export__plain_jumprelu_with_identical_outputs(tmp_path):
    sae, _ = _train(
        _synthetic(4096), steps=40, d_sae=64, n_groups=4, adaptation_interval=5
    )
    sae.save_inference_model(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu"
    assert cfg["metadata"]["training_architecture"] == "gba"
    assert cfg["metadata"]["training_architecture_details"]["n_groups"] == 4
    assert len(cfg["metadata"]["gba_target_frequencies"]) == 4
    assert sum(cfg["metadata"]["gba_group_sizes"]) == 64
    loaded = SAE.load_from_disk(tmp_path)
    x = _synthetic(512, scale=1.0) + 0.1 * torch.randn(512, 16)
    assert torch.allclose(loaded.encode(x), sae.encode(x), atol=1e-5)
    assert torch.allclose(loaded(x), sae(x), atol=1e-5)
    assert torch.allclose(sae.to_jumprelu()(x), sae(x), atol=1e-5)


@pytest.mark.parametrize(
    "normalize", ["constant_norm_rescale", "expected_average_only_in"]
)
def test_export__matches_under_saelens_input_normalisation(tmp_path, normalize):
    x = _synthetic(4096, scale=30.0)
    sae, trainer = _train(
        x,
        steps=30,
        d_sae=64,
        n_groups=4,
        adaptation_interval=5,
        normalize_activations=normalize,
    )
    # expected_average_only_in is folded into the weights at the end of fit()
    assert sae.cfg.normalize_activations == (
        "none" if normalize != "constant_norm_rescale" else normalize
    )
    sae.save_inference_model(tmp_path)
    loaded = SAE.load_from_disk(tmp_path)
    probe = x[:256] * torch.linspace(0.5, 2.0, 256)[:, None]
    assert torch.allclose(loaded(probe), sae(probe), rtol=1e-4, atol=1e-4)
    assert torch.allclose(loaded.encode(probe), sae.encode(probe), rtol=1e-4, atol=1e-4)


def test_loss__is_measured_after_per_token_normalisation():
    sae = GBATrainingSAE(
        GBATrainingSAEConfig(
            d_in=16, d_sae=32, normalize_activations="constant_norm_rescale"
        )
    )
    x = _synthetic(256)
    x_loud = x * torch.logspace(0, 3, 256)[:, None]  # norms spanning three decades
    quiet = sae.training_forward_pass(_step_input(x)).loss
    loud = GBATrainingSAE(sae.cfg)
    loud.load_state_dict(sae.state_dict())
    loud.input_scale.zero_()
    assert torch.allclose(
        loud.training_forward_pass(_step_input(x_loud)).loss, quiet, rtol=1e-4
    )


def test_export__loads_in_a_process_that_never_imports_sae_gba(tmp_path):
    sae, _ = _train(
        _synthetic(4096), steps=40, d_sae=64, n_groups=4, adaptation_interval=5
    )
    sae.save_inference_model(tmp_path / "sae")
    x = _synthetic(256) + 0.05 * torch.randn(256, 16)
    torch.save(
        {"x": x, "out": sae(x).detach(), "acts": sae.encode(x).detach()},
        tmp_path / "io.pt",
    )
    script = f"""
import sys, torch
from sae_lens import SAE
sae = SAE.load_from_disk({str(tmp_path / "sae")!r})
io = torch.load({str(tmp_path / "io.pt")!r}, weights_only=True)
assert "sae_gba" not in sys.modules
assert type(sae).__name__ == "JumpReLUSAE", type(sae)
print(float((sae(io["x"]) - io["out"]).abs().max()), float((sae.encode(io["x"]) - io["acts"]).abs().max()))
"""
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out_err, acts_err = map(float, result.stdout.split()[-2:])
    assert out_err < 1e-5 and acts_err < 1e-5


def test_input_scale_invariance__same_frequencies_and_directions():
    x = _synthetic(8192)
    kwargs = dict(
        d_sae=64,
        n_groups=4,
        adaptation_interval=5,
        high_target_freq=0.3,
        low_target_freq=0.01,
    )
    sae_1, trainer_1 = _train(x, steps=150, **kwargs)
    sae_100, trainer_100 = _train(x * 100, steps=150, **kwargs)
    assert torch.allclose(
        trainer_1.feature_sparsity, trainer_100.feature_sparsity, atol=0.01
    )
    cosines = (sae_1.directions * sae_100.directions).sum(1) / (
        sae_1.directions.norm(dim=1) * sae_100.directions.norm(dim=1)
    )
    assert cosines.min() > 0.99
    assert torch.allclose(sae_1.gate_bias, sae_100.gate_bias, atol=1e-3)
    assert sae_100.input_scale / sae_1.input_scale == pytest.approx(100, rel=1e-4)


def test_resume__ends_with_the_same_weights_as_an_uninterrupted_run(tmp_path):
    x = _synthetic(4096)
    kwargs = dict(d_in=16, d_sae=64, n_groups=4, adaptation_interval=7)

    def build(seed=0):
        torch.manual_seed(seed)
        sae = GBATrainingSAE(GBATrainingSAEConfig(**kwargs))
        provider = TensorDataProvider(x, 128, seed=1)
        return (
            sae,
            provider,
            make_trainer(sae, provider, total_tokens=128 * 60, batch_size=128, lr=3e-3),
        )

    full_sae, _, full_trainer = build()
    full_trainer.fit()

    # Interrupted: 25 steps (mid-window: 25 % 7 != 0), checkpoint, then a fresh process-like restart.
    sae, provider, trainer = build()
    for _ in range(25):
        trainer.step(next(provider))
        trainer.n_training_steps += 1
    save_checkpoint_atomically(trainer, provider, tmp_path / "ckpt")
    assert sae.window_steps.item() == 25 % 7

    resumed_sae, resumed_provider, resumed_trainer = build(
        seed=123
    )  # different init, overwritten
    resume_from_checkpoint(resumed_trainer, resumed_provider, tmp_path / "ckpt")
    assert resumed_sae.window_fire_counts.dtype == torch.int64
    resumed_trainer.fit()
    for name, tensor in full_sae.state_dict().items():
        assert torch.allclose(
            resumed_sae.state_dict()[name].float(), tensor.float(), atol=1e-6
        ), name


def test_runner__trains_from_config_object_and_from_dict(tmp_path):
    model = tiny_model()
    for i, cfg in enumerate(
        [
            LanguageModelSAERunnerConfig(
                sae=GBATrainingSAEConfig(
                    d_in=32, d_sae=96, n_groups=3, adaptation_interval=5
                ),
                **{
                    k: v
                    for k, v in runner_dict({}, str(tmp_path / "obj")).items()
                    if k not in ("sae", "logger")
                },
            ),
            LanguageModelSAERunnerConfig.from_dict(
                runner_dict(
                    {
                        "architecture": "gba",
                        "d_in": 32,
                        "d_sae": 96,
                        "n_groups": 3,
                        "adaptation_interval": 5,
                    },
                    str(tmp_path / "dict"),
                )
            ),
        ]
    ):
        cfg.logger.log_to_wandb = False
        sae = LanguageModelSAETrainingRunner(
            cfg, override_model=model, override_dataset=token_dataset()
        ).run()
        assert isinstance(sae, GBATrainingSAE)
        assert (sae.gate_bias < 0).any()
        out = Path(cfg.output_path)
        loaded = SAE.load_from_disk(out)
        assert type(loaded).__name__ == "JumpReLUSAE"
        assert loaded.cfg.metadata.hook_name == "blocks.0.hook_resid_post"
        _, cache = model.run_with_cache(
            torch.randint(0, 64, (2, 16)), names_filter=cfg.hook_name
        )
        acts = cache[cfg.hook_name]
        assert torch.allclose(loaded(acts), sae(acts), atol=1e-5), i


def test_training_checkpoint__loads_as_gba_inference_sae_with_plugin(tmp_path):
    sae, _ = _train(
        _synthetic(2048), steps=12, d_sae=32, n_groups=2, adaptation_interval=5
    )
    sae.save_model(tmp_path)
    native = SAE.load_from_disk(tmp_path)
    assert isinstance(native, GBASAE)
    x = _synthetic(128)
    assert torch.allclose(native(x), sae(x), atol=1e-5)
    again = TrainingSAE.load_from_disk(tmp_path)
    assert again.window_fire_counts.dtype == torch.int64
    assert torch.equal(again.window_fire_counts, sae.window_fire_counts)


def test_registration_is_idempotent():
    register_architectures()
    register_architectures()
    import importlib

    importlib.reload(sae_gba)


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("high_target_freq", 1.5, "(0, 1)"),
        ("high_target_freq", 0.0, "(0, 1)"),
        ("low_target_freq", -1e-4, "(0, 1)"),
        ("low_target_freq", 0.6, "< high_target_freq"),
        ("n_groups", 0, "[1, d_sae=64]"),
        ("n_groups", 65, "[1, d_sae=64]"),
        ("adaptation_interval", 0, ">= 1"),
        ("gamma_plus", -0.1, "[0, 1]"),
        ("gamma_minus", -0.01, "[0, 1]"),
        ("dead_threshold", 1.0, "[0, 1)"),
        ("gate_bias_init", "random", "one of ('zero', 'target_quantile')"),
        ("decoder_init_norm", 0.0, "> 0"),
        ("apply_b_dec_to_input", False, "must be True"),
        ("normalize_activations", "covariance_whitening", "not supported"),
    ],
)
def test_config__invalid_values_name_field_value_and_range(field, value, fragment):
    with pytest.raises(ValueError) as error:
        GBATrainingSAEConfig(d_in=16, d_sae=64, **{field: value})
    message = str(error.value)
    assert f"GBATrainingSAEConfig.{field}={value!r}" in message
    assert fragment in message


def test_config__from_dict_validates_too():
    with pytest.raises(ValueError, match="n_groups=0"):
        LanguageModelSAERunnerConfig.from_dict(
            runner_dict(
                {"architecture": "gba", "d_in": 32, "d_sae": 96, "n_groups": 0}, "out"
            )
        )


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_activations_raise_clearly(bad):
    sae = GBATrainingSAE(GBATrainingSAEConfig(d_in=16, d_sae=32))
    x = _synthetic(64)
    x[3, 5] = bad
    with pytest.raises(ValueError, match="1 NaN/Inf values"):
        sae.training_forward_pass(_step_input(x, step=7))


def test_wrong_input_width_raises_clearly():
    sae = GBATrainingSAE(GBATrainingSAEConfig(d_in=16, d_sae=32))
    with pytest.raises(ValueError, match="expected d_in=16"):
        sae.training_forward_pass(_step_input(torch.randn(8, 12)))


def test_constant_first_batch_raises_clearly():
    sae = GBATrainingSAE(GBATrainingSAEConfig(d_in=16, d_sae=32))
    with pytest.raises(ValueError, match="input scale"):
        sae.training_forward_pass(_step_input(torch.ones(8, 16)))


def test_input_scale__the_first_batchs_centred_rms_norm_by_hand():
    # Rows (1,0), (3,0), (1,2), (3,2): mean (2,1), every centred row has |.|^2 = 2,
    # so c = sqrt(2) and b_pre = (2,1) in raw units, (2,1) / c in units of c.
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0], [1.0, 2.0], [3.0, 2.0]])
    for factor in (1.0, 10.0):
        cfg = GBATrainingSAEConfig(d_in=2, d_sae=4, n_groups=1, high_target_freq=0.5)
        sae = GBATrainingSAE(cfg)
        sae.training_forward_pass(_step_input(x * factor))
        assert sae.input_scale.item() == pytest.approx(factor * 2**0.5, rel=1e-6)
        torch.testing.assert_close(sae.b_dec, torch.tensor([2.0, 1.0]) * factor)
        torch.testing.assert_close(sae.pre_bias.data, torch.tensor([2.0, 1.0]) / 2**0.5)


@pytest.mark.parametrize("fast_step", ["1", "0"])
@pytest.mark.parametrize("unit", ["margin", "scale"])
def test_adaptation__equals_the_pure_rule_on_the_same_window(
    fast_step, unit, monkeypatch
):
    """The SAE's own adaptation is ``bias_adaptation.adapt_biases`` applied to the
    window it saw: counts and peaks of ``y = w.(x - b_pre)/c + b`` over its batches."""
    monkeypatch.setenv("SAE_GBA_FAST_STEP", fast_step)
    cfg = GBATrainingSAEConfig(
        d_in=16,
        d_sae=32,
        n_groups=2,
        high_target_freq=0.3,
        low_target_freq=0.05,
        adaptation_interval=2,
        min_window_firings=0,  # every window closes at the check
        gamma_plus=0.03,
        gamma_minus=0.07,
        bias_step_unit=unit,
    )
    sae = GBATrainingSAE(cfg)
    batches = _synthetic(3 * 64).split(64)
    sae.training_forward_pass(_step_input(batches[0], 0))  # sets c and b_pre
    with torch.no_grad():
        sae.gate_bias[::4] = -5.0  # dead: these neurons will be raised
    sae.window_fire_counts.zero_()
    sae.window_peak_preacts.fill_(-torch.inf)
    sae.window_tokens.zero_()
    sae.window_steps.zero_()
    sae.training_forward_pass(_step_input(batches[1], 1))
    sae.training_forward_pass(_step_input(batches[2], 2))
    # The window by hand from the SAE's parameters (no optimizer step was taken).
    with torch.no_grad():
        c = sae.input_scale
        unit_w = sae.directions / sae.directions.norm(dim=1, keepdim=True)
        x = torch.cat(batches[1:])
        y = (x / c - sae.pre_bias) @ unit_w.T + sae.gate_bias
    frequency = (y > 0).double().mean(0)
    peaks = y.max(0).values
    groups = group_index(32, 2)
    targets = target_frequencies(2, 0.3, 0.05)[groups]
    dead, over = frequency == 0, frequency > targets
    assert dead.sum() >= 4 and over.sum() >= 4  # both steps are exercised
    rule = partial(adapt_biases, sae.gate_bias.clone(), frequency, peaks, targets)
    expected = rule(groups, 2, 0.03, 0.07, 0.0, unit)
    swapped = rule(groups, 2, 0.07, 0.03, 0.0, unit)

    sae.training_forward_pass(_step_input(batches[0], 3))  # adapts first
    torch.testing.assert_close(sae.gate_bias, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(sae.gate_bias, swapped, rtol=1e-3, atol=1e-4)
    assert torch.equal(sae.last_window_tokens, torch.full((32,), 128))
    assert torch.equal(sae.last_window_fire_counts, (y > 0).sum(0))


def test_relative_loss__large_tokens_count_by_their_relative_error():
    x = _synthetic(256) * torch.logspace(0, 1, 256)[:, None]
    torch.manual_seed(0)
    sae = GBATrainingSAE(GBATrainingSAEConfig(d_in=16, d_sae=32))
    assert sae.cfg.relative_loss  # the default
    output = sae.training_forward_pass(_step_input(x))
    scale = sae.input_scale
    mean_square = scale**2 + sae.b_dec.pow(2).sum()
    # the first batch fixes the reference: its mean squared norm
    assert mean_square == pytest.approx(x.pow(2).sum(-1).mean().item(), rel=1e-4)
    weights = relative_weights_by_hand(x, scale, sae.b_dec).squeeze(-1)
    assert 0.05 < weights.min() < 0.5 and weights.max() == 1
    squared = (output.sae_out - x).pow(2).sum(-1)
    by_hand = 0.5 * (weights * squared).mean() / scale**2
    assert output.loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    plain = GBATrainingSAE(GBATrainingSAEConfig(d_in=16, d_sae=32, relative_loss=False))
    plain.load_state_dict(sae.state_dict())
    plain_loss = plain.training_forward_pass(_step_input(x)).loss
    assert plain_loss.item() == pytest.approx(
        (0.5 * squared.mean() / scale**2).item(), rel=1e-5
    )


def test_relative_loss__no_change_on_tokens_of_one_norm():
    x = _synthetic(256) * torch.logspace(0, 1, 256)[:, None]
    losses = []
    for relative in (True, False):
        torch.manual_seed(0)
        cfg = GBATrainingSAEConfig(
            d_in=16,
            d_sae=32,
            relative_loss=relative,
            normalize_activations="constant_norm_rescale",
        )
        losses.append(GBATrainingSAE(cfg).training_forward_pass(_step_input(x)).loss)
    assert losses[0].item() == pytest.approx(losses[1].item(), rel=1e-5)
