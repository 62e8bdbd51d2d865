"""SAELens's architecture contract, for every architecture this package registers.

SAELens's own repository tests each training architecture for the same things
(tests/saes/test_sae.py): config to and from dict, the inference config, save and
load, ``fold_activation_norm_scaling_factor`` and ``fold_W_dec_norm``. These are
those tests for gba and weighted_*, plus an oracle: after either fold, each SAE
matches SAELens's own architecture folded the same way (GBA's exported JumpReLU SAE,
a weighted SAE's unweighted base).
"""

import copy

import pytest
import torch
from sae_lens import SAE
from sae_lens.registry import get_sae_class, get_sae_training_class
from sae_lens.saes.sae import SAEConfig, TrainingSAE, TrainingSAEConfig, TrainStepInput

from sae_gba import GBASAE, GBASAEConfig
from sae_gba.registry import INFERENCE_CLASSES, TRAINING_CLASSES

TRAINING_ARCHITECTURES = list(TRAINING_CLASSES)
# Fields that make each architecture sensible at d_sae = 48.
FIELDS = {"weighted_topk": {"k": 8}, "weighted_batchtopk": {"k": 8}}
# SAELens's TopK-style encoders rescale activations by the decoder norm, so their
# features follow the folds differently (its tests make the same exception).
TOPK_STYLE = {"weighted_topk", "weighted_batchtopk"}
SCALE = 2.5


def _training_cfg(architecture: str) -> TrainingSAEConfig:
    config_class = get_sae_training_class(architecture)[1]
    return config_class(d_in=16, d_sae=48, **FIELDS.get(architecture, {}))


@torch.no_grad()
def _randomize(sae: SAE) -> SAE:
    """Random parameters as SAELens's tests set them, and a trained GBA's state."""
    generator = torch.Generator().manual_seed(1)
    for param in sae.parameters():
        param.copy_(torch.rand(param.shape, generator=generator))
    if hasattr(sae, "gate_bias"):
        sae.gate_bias.copy_(-0.5 * torch.rand(sae.cfg.d_sae, generator=generator))
        sae.input_scale.fill_(1.7)
    if hasattr(sae, "input_weights"):
        sae.set_input_weights(1 + torch.rand(sae.cfg.d_in, generator=generator))
    return sae


def _build(architecture: str) -> TrainingSAE:
    return _randomize(TrainingSAE.from_dict(_training_cfg(architecture).to_dict()))


def _inputs() -> torch.Tensor:
    return 2 * torch.randn(100, 16, generator=torch.Generator().manual_seed(2))


def _reference(sae: TrainingSAE) -> SAE:
    """SAELens's own SAE computing the same function: GBA's exported JumpReLU, or a
    weighted SAE's base architecture holding its parameters."""
    if hasattr(sae, "to_jumprelu"):
        return sae.to_jumprelu()
    base = sae.cfg.weighted_base
    sae_class, config_class = get_sae_training_class(base)
    fields = {
        k: v
        for k, v in sae.cfg.to_dict().items()
        if k in config_class.__dataclass_fields__ and k != "metadata"
    }
    plain = sae_class(config_class(**fields))
    plain.load_state_dict(
        {k: v for k, v in sae.state_dict().items() if k in plain.state_dict()}
    )
    return plain


def _fold(sae: SAE, fold: str) -> None:
    if fold == "activation_norm":
        sae.fold_activation_norm_scaling_factor(SCALE)
    else:
        sae.fold_W_dec_norm()


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("architecture", TRAINING_ARCHITECTURES)
def test_training_config__to_and_from_dict(architecture):
    cfg = _training_cfg(architecture)
    reloaded = TrainingSAEConfig.from_dict(cfg.to_dict())
    assert reloaded.to_dict() == cfg.to_dict()
    assert type(reloaded) is type(cfg) is get_sae_training_class(architecture)[1]
    assert cfg.to_dict()["metadata"]["training_architecture"] == architecture


@pytest.mark.parametrize("architecture", TRAINING_ARCHITECTURES)
def test_inference_config__to_and_from_dict_as_the_exported_architecture(
    architecture,
):
    cfg = _training_cfg(architecture)
    cfg_dict = cfg.get_inference_sae_cfg_dict()
    reloaded = SAEConfig.from_dict(cfg_dict)
    # GBA exports as SAELens's jumprelu, a weighted SAE as its base exports.
    base = getattr(cfg, "weighted_base", "gba")
    exported = (
        "jumprelu"
        if base == "gba"
        else _training_cfg(base).get_inference_config_class().architecture()
    )
    assert reloaded.architecture() == exported
    assert reloaded.to_dict() == cfg_dict
    assert type(reloaded) is get_sae_class(exported)[1]


@pytest.mark.parametrize("architecture", TRAINING_ARCHITECTURES)
def test_save_and_load__checkpoint_and_inference_model(architecture, tmp_path):
    sae = _build(architecture)
    sae.save_model(tmp_path / "checkpoint")
    loaded = TrainingSAE.from_dict(_training_cfg(architecture).to_dict())
    loaded.load_weights_from_checkpoint(tmp_path / "checkpoint")
    for name, tensor in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name

    sae.save_inference_model(tmp_path / "inference")
    exported = SAE.load_from_disk(tmp_path / "inference")
    if architecture == "weighted_batchtopk":
        return  # exported as a JumpReLU threshold, not the batch's top k (SAELens's)
    x = _inputs()
    _close(exported.encode(x), sae.encode(x))
    _close(exported(x), sae(x))


@pytest.mark.parametrize("architecture", TRAINING_ARCHITECTURES)
@torch.no_grad()
def test_fold_activation_norm_scaling_factor__keeps_features_and_outputs(
    architecture,
):
    sae = _build(architecture)
    x = _inputs()
    features, outputs = sae.encode(x), sae(x)
    assert 0 < (features != 0).float().mean() < 1  # some latents on, some off

    sae.fold_activation_norm_scaling_factor(SCALE)

    assert sae.cfg.normalize_activations == "none"
    _close(SCALE * sae(x / SCALE), outputs)
    expected = features / SCALE if architecture in TOPK_STYLE else features
    _close(sae.encode(x / SCALE), expected)


@pytest.mark.parametrize("architecture", TRAINING_ARCHITECTURES)
@torch.no_grad()
def test_fold_W_dec_norm__unit_decoder_features_times_norms_same_outputs(
    architecture,
):
    sae = _build(architecture)
    norms = sae.W_dec.norm(dim=-1)
    assert not torch.allclose(norms, torch.ones_like(norms), atol=1e-2)
    x = _inputs()
    features = sae.encode(x)

    folded = copy.deepcopy(sae)
    folded.fold_W_dec_norm()

    _close(folded.W_dec.norm(dim=-1), torch.ones_like(norms))
    folded_features = folded.encode(x)
    assert torch.equal(folded_features != 0, features != 0)
    expected = features if architecture in TOPK_STYLE else features * norms
    _close(folded_features, expected)
    _close(folded.decode(folded_features), sae.decode(features))


# The last: SAELens's trainer folds the activation norm, then a loader or SAEBench
# folds the decoder norms.
FOLDS = [["activation_norm"], ["W_dec_norm"], ["activation_norm", "W_dec_norm"]]


@pytest.mark.parametrize("folds", FOLDS, ids="+".join)
@pytest.mark.parametrize("architecture", TRAINING_ARCHITECTURES)
@torch.no_grad()
def test_folds__match_saelens_own_architecture_folded_the_same_way(architecture, folds):
    sae = _build(architecture)
    reference = _reference(sae)
    for fold in folds:
        _fold(sae, fold)
        _fold(reference, fold)
    x = _inputs()
    _close(sae.encode(x), reference.encode(x))
    _close(sae(x), reference(x))
    if hasattr(sae, "to_jumprelu"):  # the exported form stays exact
        exported = sae.to_jumprelu().state_dict()
        for name, tensor in reference.state_dict().items():
            _close(exported[name], tensor)


@pytest.mark.parametrize("architecture", TRAINING_ARCHITECTURES)
@torch.no_grad()
def test_fold_W_dec_norm__zero_norm_decoder_rows_give_no_nan(architecture):
    sae = _build(architecture)
    rows = torch.arange(5)
    if hasattr(sae, "output_scale"):
        sae.output_scale[rows] = 0.0
    else:
        sae.W_dec[rows] = 0.0

    def finite() -> dict[str, bool]:
        tensors = [*sae.named_parameters(), *sae.named_buffers()]
        return {name: bool(torch.isfinite(t).all()) for name, t in tensors}

    before = finite()  # an empty GBA window's peaks are -inf by design
    sae.fold_W_dec_norm()
    assert finite() == before
    assert before["W_dec" if "W_dec" in before else "output_scale"]


def _inference_gba() -> GBASAE:
    assert INFERENCE_CLASSES["gba"] == (GBASAE, GBASAEConfig)
    return _randomize(GBASAE(GBASAEConfig(d_in=16, d_sae=48)))


@torch.no_grad()
def test_inference_gba__folds_as_saelens_inference_saes():
    sae = _inference_gba()
    x = _inputs()
    features, outputs, w_enc = sae.encode(x), sae(x), sae.W_enc.clone()

    scaled = copy.deepcopy(sae)
    scaled.fold_activation_norm_scaling_factor(SCALE)
    assert scaled.cfg.normalize_activations == "none"
    _close(scaled.W_enc, w_enc * SCALE)
    _close(scaled.encode(x / SCALE), features)
    _close(SCALE * scaled(x / SCALE), outputs)

    norms = sae.W_dec.norm(dim=-1)
    unit = copy.deepcopy(sae)
    unit.fold_W_dec_norm()
    _close(unit.W_dec.norm(dim=-1), torch.ones_like(norms))
    _close(unit.encode(x), features * norms)
    _close(unit(x), outputs)


def test_inference_gba__load_from_disk_with_fold_W_dec_norm(tmp_path):
    sae = _inference_gba()
    sae.save_model(tmp_path)
    folded_on_load = SAE.load_from_disk(tmp_path, fold_W_dec_norm=True)
    folded_afterwards = SAE.load_from_disk(tmp_path)
    folded_afterwards.fold_W_dec_norm()
    assert isinstance(folded_on_load, GBASAE)
    for name, tensor in folded_afterwards.state_dict().items():
        assert torch.equal(folded_on_load.state_dict()[name], tensor), name
    x = _inputs()
    _close(folded_on_load(x), sae(x))


def test_training_gba__refuses_to_train_after_a_fold():
    sae = _build("gba")
    sae.fold_W_dec_norm()
    with pytest.raises(ValueError, match="folded"):
        sae.training_forward_pass(
            TrainStepInput(
                sae_in=_inputs(),
                coefficients={},
                dead_neuron_mask=None,
                n_training_steps=0,
                is_logging_step=False,
            )
        )
