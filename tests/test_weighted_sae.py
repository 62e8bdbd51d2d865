"""Weighted SAEs (weighted_<base>): weights, loss, estimation, export, runner, resume."""

import json
import math
import subprocess
import sys

import pytest
import torch
from sae_lens import SAE, LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner
from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY
from sae_lens.saes.sae import TrainingSAE, TrainStepInput
from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
from sae_lens.saes.topk_sae import TopKTrainingSAEConfig
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sae_gba.gba_sae import GBATrainingSAEConfig
from sae_gba.training import (
    TensorDataProvider,
    make_trainer,
    resume_from_checkpoint,
    save_checkpoint_atomically,
)
from sae_gba.weighted_sae import (
    INPUT_WEIGHTS_FILENAME,
    WEIGHTED_CLASSES,
    WeightedStandardTrainingSAEConfig,
    WeightedTopKTrainingSAE,
    WeightedTopKTrainingSAEConfig,
    input_weights,
    load_input_weights,
    weighted_config,
    weighted_config_class,
)
from tests.helpers import (
    relative_weights_by_hand,
    runner_dict,
    tiny_model,
    token_dataset,
)

BASES = list(WEIGHTED_CLASSES)
# The base-specific fields that make each architecture sensible at d_sae = 16..96.
BASE_FIELDS = {
    "standard": {},
    "topk": {"k": 8},
    "batchtopk": {"k": 8},
    "jumprelu": {},
    "gba": {"n_groups": 2, "adaptation_interval": 5},
}
EXPORTED_CLASS = {
    "standard": "StandardSAE",
    "topk": "TopKSAE",
    "batchtopk": "JumpReLUSAE",
    "jumprelu": "JumpReLUSAE",
    "gba": "JumpReLUSAE",
}


def _step_input(x: torch.Tensor, d_sae: int = 16, step: int = 0) -> TrainStepInput:
    dead = torch.zeros(d_sae, dtype=torch.bool)
    dead[: d_sae // 2] = True  # half dead, so TopK's aux-k loss is not zero
    return TrainStepInput(
        sae_in=x,
        coefficients={"l1": 0.5, "l0": 0.5},
        dead_neuron_mask=dead,
        n_training_steps=step,
        is_logging_step=False,
    )


def _build(base: str, **fields) -> TrainingSAE:
    sae_class, cfg_class = WEIGHTED_CLASSES[base]
    return sae_class(cfg_class(d_in=8, d_sae=16, **BASE_FIELDS[base], **fields))


def _unweighted_copy(base: str, sae: TrainingSAE) -> TrainingSAE:
    """The base architecture's own training SAE holding ``sae``'s parameters."""
    base_class, base_cfg_class = SAE_TRAINING_CLASS_REGISTRY[base]
    cfg = sae.cfg
    plain = base_class(
        base_cfg_class(d_in=cfg.d_in, d_sae=cfg.d_sae, **BASE_FIELDS[base])
    )
    plain.load_state_dict(
        {k: v for k, v in sae.state_dict().items() if k in plain.state_dict()}
    )
    return plain


def _data(n_rows: int, d_in: int = 8, seed: int = 0) -> torch.Tensor:
    # Per-dimension spreads 1..d_in around a large mean, so the weights are uneven.
    g = torch.Generator().manual_seed(seed)
    return 50.0 + torch.randn(n_rows, d_in, generator=g) * torch.arange(1, d_in + 1)


# ---------------------------------------------------------------- the weights


def test_input_weights__hand_computed_for_alpha_1_and_one_half():
    variance = torch.tensor([1.0, 4.0, 9.0, 16.0])
    # alpha 1: gamma ~ (1, 4, 9, 16), mean(gamma^2) = 354 / 4 = 88.5
    expected_1 = torch.tensor([1.0, 4.0, 9.0, 16.0]) / math.sqrt(88.5)
    # alpha 0.5: gamma ~ (1, 2, 3, 4), mean(gamma^2) = 30 / 4 = 7.5
    expected_half = torch.tensor([1.0, 2.0, 3.0, 4.0]) / math.sqrt(7.5)
    assert torch.allclose(input_weights(variance, 1.0), expected_1)
    assert torch.allclose(input_weights(variance, 0.5), expected_half)
    for alpha in (0.5, 1.0, 2.0):
        gamma = input_weights(variance * 1e6, alpha)  # scale free
        assert gamma.square().mean().item() == pytest.approx(1.0, rel=1e-6)
    assert torch.allclose(input_weights(torch.full((5,), 3.0), 1.0), torch.ones(5))


def test_input_weights__zero_variance_dims_get_weight_zero_not_nan():
    gamma = input_weights(torch.tensor([0.0, 4.0]), 0.5)
    assert torch.allclose(gamma, torch.tensor([0.0, math.sqrt(2.0)]))
    with pytest.raises(ValueError, match="every one of the 3 input dimensions"):
        input_weights(torch.zeros(3), 1.0)
    with pytest.raises(ValueError, match="finite and >= 0"):
        input_weights(torch.tensor([1.0, float("nan")]), 1.0)
    with pytest.raises(ValueError, match="finite and >= 0"):
        input_weights(torch.tensor([1.0, -1.0]), 1.0)
    with pytest.raises(ValueError, match="alpha=0.0"):
        input_weights(torch.ones(2), 0.0)


def test_estimation__variance_of_the_batches_seen_then_fixed_weights():
    sae = _build("standard", weight_estimation_batches=3, weight_alpha=0.5)
    plain = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=8, d_sae=16))
    plain.load_state_dict(
        {k: v for k, v in sae.state_dict().items() if k in plain.state_dict()}
    )
    batches = [_data(n, seed=i) for i, n in enumerate((40, 24, 64, 32))]

    def mse(model, x):
        return model.training_forward_pass(_step_input(x)).losses["mse_loss"]

    for i, x in enumerate(batches[:3]):
        # Every estimation batch, the last included, is trained with weights 1.
        assert sae.input_weights_source == "none"
        assert torch.equal(mse(sae, x), mse(plain, x)), i
    seen = torch.cat(batches[:3]).double()
    assert torch.allclose(sae.estimated_variance.double(), seen.var(dim=0), rtol=1e-5)
    assert sae.input_weights_source == "variance"
    expected = input_weights(seen.var(dim=0).float(), 0.5)
    assert torch.allclose(sae.input_weights, expected, rtol=1e-5)
    # From the next batch on the loss is weighted and the weights stay fixed.
    assert not torch.allclose(mse(sae, batches[3]), mse(plain, batches[3]))
    assert torch.allclose(sae.input_weights, expected, rtol=1e-5)
    assert int(sae.variance_batches) == 3 and int(sae.variance_count) == 128


def test_estimation__only_in_training_mode():
    sae = _build("gba", weight_estimation_batches=2)
    sae.eval()
    sae.training_forward_pass(_step_input(_data(32)))
    assert int(sae.variance_count) == 0 and sae.input_weights_source == "none"


def test_estimation__constant_inputs_raise_clearly():
    sae = _build("topk", weight_estimation_batches=2)
    with pytest.raises(ValueError, match="first 2 training batches .64 rows.: every"):
        for _ in range(2):
            sae.training_forward_pass(_step_input(torch.ones(32, 8)))


def test_user_weights__from_a_tensor_and_from_a_safetensors_file(tmp_path):
    weights = torch.arange(1.0, 9.0)
    normalised = weights / weights.square().mean().sqrt()
    sae = _build("jumprelu")
    sae.set_input_weights(weights)
    assert torch.allclose(sae.input_weights, normalised)
    assert sae.input_weights_source == "tensor"
    sae.set_input_weights(weights, normalize=False)
    assert torch.equal(sae.input_weights, weights)
    sae.training_forward_pass(_step_input(_data(32)))  # supplied: nothing estimated
    assert int(sae.variance_batches) == 0 and torch.equal(sae.input_weights, weights)

    save_file({"gamma": weights}, tmp_path / "gamma.safetensors")
    from_file = _build("gba", weights_path=str(tmp_path / "gamma.safetensors"))
    assert torch.allclose(from_file.input_weights, normalised)
    assert from_file.input_weights_source == "weights_path"


@pytest.mark.parametrize(
    ("weights", "fragment"),
    [
        (torch.ones(7), "shape (d_in,) = (8,), got (7,)"),
        (torch.ones(8, 1), "shape (d_in,) = (8,), got (8, 1)"),
        (
            torch.tensor([1.0] * 7 + [float("nan")]),
            "1 of 8 entries are not (first dims: [7]",
        ),
        (torch.tensor([1.0] * 7 + [float("inf")]), "finite and > 0"),
        (torch.tensor([0.0] + [1.0] * 7), "first dims: [0]"),
        (torch.tensor([-1.0] + [1.0] * 7), "finite and > 0"),
    ],
)
def test_user_weights__invalid_tensors_raise_clearly(weights, fragment):
    sae = _build("standard")
    with pytest.raises(ValueError) as error:
        sae.set_input_weights(weights)
    assert fragment in str(error.value) and "set_input_weights" in str(error.value)
    assert sae.input_weights_source == "none"


def test_user_weights__missing_corrupt_and_wrong_files_raise_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors' does not exist"):
        _build("topk", weights_path=str(tmp_path / "nowhere.safetensors"))
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x00" * 40)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_input_weights(tmp_path / "corrupt.safetensors", 8)
    save_file({"weights": torch.ones(8)}, tmp_path / "named.safetensors")
    with pytest.raises(
        ValueError, match=r"no 'gamma' tensor \(it holds \['weights'\]\)"
    ):
        load_input_weights(tmp_path / "named.safetensors", 8)
    save_file({"gamma": torch.ones(6)}, tmp_path / "short.safetensors")
    with pytest.raises(ValueError, match=r"short.safetensors' must have shape"):
        load_input_weights(tmp_path / "short.safetensors", 8)


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("weight_alpha", 0.0, "finite number > 0"),
        ("weight_alpha", -0.5, "finite number > 0"),
        ("weight_alpha", float("nan"), "finite number > 0"),
        ("weight_estimation_batches", 0, "integer >= 1"),
        ("weights_path", "", "path of a safetensors file"),
    ],
)
def test_config__invalid_weight_fields_name_field_value_and_range(
    field, value, fragment
):
    with pytest.raises(ValueError) as error:
        WeightedTopKTrainingSAEConfig(d_in=8, d_sae=16, **{field: value})
    message = str(error.value)
    assert f"WeightedTopKTrainingSAEConfig.{field}={value!r}" in message
    assert fragment in message


# ---------------------------------------------------------------- the loss


@pytest.mark.parametrize("base", BASES)
def test_loss__weighted_mse_by_hand_and_every_other_term_as_the_base(base):
    sae = _build(base)
    gamma = torch.linspace(0.2, 2.0, 8)
    sae.set_input_weights(gamma, normalize=False)
    plain = _unweighted_copy(base, sae)
    x = _data(32)
    out = sae.training_forward_pass(_step_input(x))
    reference = plain.training_forward_pass(_step_input(x))
    squared = gamma.square() * (out.sae_out - x).square()
    if base == "gba":  # GBA's loss: 0.5 |out - in|^2 / c^2, relative per token
        tokens = relative_weights_by_hand(x, sae.input_scale, sae.b_dec)
        expected = 0.5 * (tokens * squared / sae.input_scale.square()).sum(-1).mean()
    else:
        expected = squared.sum(-1).mean()
    assert torch.allclose(out.losses["mse_loss"], expected, rtol=1e-5)
    assert torch.allclose(out.sae_out, reference.sae_out)
    assert set(out.losses) == set(reference.losses)
    for name in set(out.losses) - {"mse_loss"}:
        assert torch.allclose(out.losses[name], reference.losses[name]), name
    others = sum(v for k, v in out.losses.items() if k != "mse_loss")
    assert torch.allclose(out.loss, out.losses["mse_loss"] + others)


# ---------------------------------------------------------------- export, runner, resume


def _train_on_tensors(
    base: str, steps: int, scale: float = 1.0, trainer_kwargs=None, **fields
) -> TrainingSAE:
    """``base``'s weighted SAE after ``steps`` SAETrainer steps on ``_data * scale``."""
    torch.manual_seed(0)
    sae = _build(base, weight_estimation_batches=4, **fields)
    provider = TensorDataProvider(_data(2048) * scale, 64, seed=0)
    trainer = make_trainer(
        sae,
        provider,
        total_tokens=64 * steps,
        batch_size=64,
        lr=3e-3,
        **(trainer_kwargs or {}),
    )
    trainer.fit()
    return sae


def test_export__loads_in_a_process_that_never_imports_sae_gba(tmp_path):
    x = _data(128, seed=7)
    expected = {}
    for base in ("topk", "gba"):
        sae = _train_on_tensors(base, steps=12)
        sae.save_inference_model(tmp_path / base)
        expected[base] = {"out": sae(x).detach(), "acts": sae.encode(x).detach()}
        record = load_file(tmp_path / base / INPUT_WEIGHTS_FILENAME)
        assert torch.equal(record["gamma"], sae.input_weights)
        assert torch.allclose(record["variance"], sae.estimated_variance)
        with safe_open(tmp_path / base / INPUT_WEIGHTS_FILENAME, "pt") as file:
            assert file.metadata()["source"] == "variance"
        weights = load_file(tmp_path / base / "sae_weights.safetensors")
        assert not any(
            name.startswith(("input_weights", "variance")) for name in weights
        )
    torch.save(
        {"x": x, **{f"{b}_{k}": v for b, d in expected.items() for k, v in d.items()}},
        tmp_path / "io.pt",
    )
    script = f"""
import sys, torch
from sae_lens import SAE
io = torch.load({str(tmp_path / "io.pt")!r}, weights_only=True)
for base, name in (("topk", "TopKSAE"), ("gba", "JumpReLUSAE")):
    sae = SAE.load_from_disk({str(tmp_path)!r} + "/" + base)
    assert type(sae).__name__ == name, type(sae)
    print(float((sae(io["x"]) - io[base + "_out"]).abs().max()),
          float((sae.encode(io["x"]) - io[base + "_acts"]).abs().max()))
assert "sae_gba" not in sys.modules
"""
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    errors = [float(v) for v in result.stdout.split()[-4:]]
    assert max(errors) < 1e-4, errors


@pytest.mark.parametrize("base", BASES)
def test_runner__trains_each_architecture_and_exports_its_base(tmp_path, base):
    model = tiny_model()
    cfg = LanguageModelSAERunnerConfig.from_dict(
        runner_dict(
            {
                "architecture": f"weighted_{base}",
                "d_in": 32,
                "d_sae": 64,
                "weight_estimation_batches": 3,
                "weight_alpha": 0.5,
                **BASE_FIELDS[base],
            },
            str(tmp_path / "out"),
            training_tokens=64 * 12,
        )
    )
    sae = LanguageModelSAETrainingRunner(
        cfg, override_model=model, override_dataset=token_dataset(n_rows=120)
    ).run()
    assert isinstance(sae, WEIGHTED_CLASSES[base][0])
    assert sae.input_weights_source == "variance"
    assert int(sae.variance_batches) == 3 and int(sae.variance_count) == 3 * 64
    loaded = SAE.load_from_disk(tmp_path / "out")
    assert type(loaded).__name__ == EXPORTED_CLASS[base]
    saved_cfg = json.loads((tmp_path / "out" / "cfg.json").read_text())
    metadata = saved_cfg["metadata"]
    assert metadata["training_architecture"] == f"weighted_{base}"
    assert metadata["training_architecture_details"]["weight_alpha"] == 0.5
    assert metadata["input_weights_source"] == "variance"
    record = load_file(tmp_path / "out" / INPUT_WEIGHTS_FILENAME)
    assert torch.equal(record["gamma"], sae.input_weights)
    # The exported weights are exactly what the unweighted base exports.
    plain = _unweighted_copy(base, sae)
    expected = plain.state_dict()
    plain.process_state_dict_for_saving_inference(expected)
    saved = load_file(tmp_path / "out" / "sae_weights.safetensors")
    assert set(saved) == set(expected)
    for name, tensor in expected.items():
        assert torch.allclose(saved[name], tensor.to(saved[name].dtype)), name
    if base == "batchtopk":
        return  # its training forward is a batch-level top-k, not the exported gate
    _, cache = model.run_with_cache(
        torch.randint(0, 64, (2, 16)), names_filter=cfg.hook_name
    )
    acts = cache[cfg.hook_name]
    assert torch.allclose(loaded(acts), sae(acts), atol=1e-4)


def test_runner__config_object_with_a_weights_file(tmp_path):
    gamma = torch.rand(32) + 0.5
    save_file({"gamma": gamma}, tmp_path / "gamma.safetensors")
    fields = {
        k: v
        for k, v in runner_dict(
            {}, str(tmp_path / "out"), training_tokens=64 * 6
        ).items()
        if k not in ("sae", "logger")
    }
    cfg = LanguageModelSAERunnerConfig(
        sae=WeightedTopKTrainingSAEConfig(
            d_in=32, d_sae=64, k=8, weights_path=str(tmp_path / "gamma.safetensors")
        ),
        **fields,
    )
    cfg.logger.log_to_wandb = False
    sae = LanguageModelSAETrainingRunner(
        cfg, override_model=tiny_model(), override_dataset=token_dataset(n_rows=60)
    ).run()
    assert torch.allclose(sae.input_weights, gamma / gamma.square().mean().sqrt())
    assert int(sae.variance_batches) == 0
    metadata = json.loads((tmp_path / "out" / "cfg.json").read_text())["metadata"]
    assert metadata["input_weights_source"] == "weights_path"


def test_resume__mid_estimation_ends_with_the_same_state_as_an_uninterrupted_run(
    tmp_path,
):
    x = _data(2048)

    def build(seed=0):
        torch.manual_seed(seed)
        sae = _build("topk", weight_estimation_batches=5)
        provider = TensorDataProvider(x, 64, seed=1)
        trainer = make_trainer(
            sae, provider, total_tokens=64 * 14, batch_size=64, lr=3e-3
        )
        return sae, provider, trainer

    full_sae, _, full_trainer = build()
    full_trainer.fit()

    sae, provider, trainer = build()
    for _ in range(3):  # stop inside the estimation window
        trainer.step(next(provider))
        trainer.n_training_steps += 1
    save_checkpoint_atomically(trainer, provider, tmp_path / "ckpt")
    assert sae.input_weights_source == "none" and int(sae.variance_batches) == 3

    resumed_sae, resumed_provider, resumed_trainer = build(seed=123)
    resume_from_checkpoint(resumed_trainer, resumed_provider, tmp_path / "ckpt")
    resumed_trainer.fit()
    assert resumed_sae.input_weights_source == "variance"
    for name, tensor in full_sae.state_dict().items():
        assert torch.allclose(
            resumed_sae.state_dict()[name].float(), tensor.float(), atol=1e-6
        ), name

    # SAELens's own loader casts every tensor to cfg.dtype; the state comes back typed.
    full_sae.save_model(tmp_path / "final")
    again = TrainingSAE.load_from_disk(tmp_path / "final")
    assert isinstance(again, WeightedTopKTrainingSAE)
    assert again.input_weights_state.dtype == torch.int64
    assert torch.equal(again.input_weights, full_sae.input_weights)
    again.to(torch.bfloat16)  # the weight state keeps its precision
    assert again.input_weights.dtype == again.variance_m2.dtype == torch.float32
    assert again.variance_count.dtype == torch.int64


def test_expected_average_only_in__statistics_fold_back_to_raw_units():
    # SAELens feeds the SAE inputs rescaled to norm sqrt(d_in) and folds the factor
    # in at the end: the weights are the same at any input scale, the recorded
    # variance is that of the raw inputs.
    runs = [
        _train_on_tensors(
            "topk",
            steps=8,
            scale=scale,
            normalize_activations="expected_average_only_in",
            trainer_kwargs={"n_batches_for_norm_estimate": 4},
        )
        for scale in (1.0, 30.0)
    ]
    assert torch.allclose(runs[0].input_weights, runs[1].input_weights, rtol=1e-4)
    ratio = runs[1].estimated_variance / runs[0].estimated_variance
    assert torch.allclose(ratio, torch.full_like(ratio, 900.0), rtol=1e-3)


# ---------------------------------------------------------------- helpers, registration


def test_weighted_config_class_and_weighted_config():
    assert weighted_config_class("topk") is WeightedTopKTrainingSAEConfig
    with pytest.raises(ValueError, match=r"'gated'; available: \['batchtopk'"):
        weighted_config_class("gated")
    base = TopKTrainingSAEConfig(d_in=8, d_sae=16, k=3, aux_loss_coefficient=0.5)
    cfg = weighted_config(base, weight_alpha=0.5)
    assert isinstance(cfg, WeightedTopKTrainingSAEConfig)
    assert (cfg.k, cfg.aux_loss_coefficient, cfg.weight_alpha) == (3, 0.5, 0.5)
    assert cfg.metadata.training_architecture == "weighted_topk"
    gba = weighted_config(GBATrainingSAEConfig(d_in=8, d_sae=16, n_groups=4))
    assert gba.n_groups == 4 and gba.architecture() == "weighted_gba"


def test_every_weighted_architecture_is_registered_for_training():
    for base in BASES:
        assert SAE_TRAINING_CLASS_REGISTRY[f"weighted_{base}"] == WEIGHTED_CLASSES[base]
    config = LanguageModelSAERunnerConfig.from_dict(
        runner_dict(
            {"architecture": "weighted_standard", "d_in": 32, "d_sae": 64}, "out"
        )
    )
    assert isinstance(config.sae, WeightedStandardTrainingSAEConfig)
