"""The GBA configs: the inference config, the training config with its documented
fields, and their resolution (``target_l0`` to ``high_target_freq``) and validation."""

from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, get_args

import torch
from sae_lens.saes.jumprelu_sae import JumpReLUSAEConfig
from sae_lens.saes.sae import SAEConfig, TrainingSAEConfig
from typing_extensions import override

from sae_gba.bias_adaptation import (
    StepUnit,
    expected_l0,
    group_index,
    high_target_for_l0,
    target_frequencies,
)
from sae_gba.config_fields import check_field

# The default target L0 per input dimension (``GBATrainingSAEConfig.target_l0``).
L0_PER_D_IN = 1 / 8
# The largest first-group target the default derives: the paper's HTF.
HIGHEST_TARGET = 0.5
# The paper's literal recipe: fixed targets 0.5 to 1e-4, fixed 50-step windows, bias
# steps by the margin over the gate, trained output scales, zero bias start.
PAPER_RECIPE: dict[str, Any] = {
    "n_groups": 10,
    "high_target_freq": 0.5,
    "low_target_freq": 1e-4,
    "adaptation_interval": 50,
    "min_window_firings": 0,
    "gamma_plus": 0.01,
    "gamma_minus": 0.01,
    "dead_threshold": 0.0,
    "bias_step_unit": "margin",
    "train_pre_bias": False,
    "train_output_scale": True,
    "relative_loss": False,
    "gate_bias_init": "zero",
    "decoder_init_norm": 0.1,
}
# How the gate biases start (``GBATrainingSAEConfig.gate_bias_init``).
GateBiasInit = Literal["zero", "target_quantile"]
GATE_BIAS_INITS: tuple[str, ...] = get_args(GateBiasInit)


@dataclass
class GBASAEConfig(SAEConfig):
    """Inference config for a GBA SAE in its native (tied) form, e.g. a checkpoint."""

    @override
    @classmethod
    def architecture(cls) -> str:
        return "gba"


@dataclass
class GBATrainingSAEConfig(TrainingSAEConfig):
    """Training config for a GBA SAE (``n_groups=1`` is BA).

    ``decoder_init_norm`` (inherited, default 0.1) is the initial output scale
    ``a_m``: the theory's small-output-scale regime; ``None`` means 1.

    Args:
        n_groups: number of neuron groups K, each with its own target frequency.
        high_target_freq: target firing frequency of the first group (HTF). None
            (the default) derives it from ``target_l0``: the targets are fitted to
            a sparsity, not fixed at the paper's 0.5.
        target_l0: the L0 the targets aim at (the sum of every neuron's target),
            which sets ``high_target_freq`` with ``low_target_freq`` kept: GBA's
            counterpart of TopK's ``k``. None (the default) takes
            ``d_in * L0_PER_D_IN`` (``d_in / 8``), capped to what first targets
            in ``(low_target_freq, 0.5]`` reach. Set at most one of the two.
        low_target_freq: target of the last group (LTF); geometric in between.
        adaptation_interval: training steps between bias-adaptation checks. At each
            check every neuron whose window is closed (see ``min_window_firings``)
            is adapted and starts a new window; the others keep accumulating.
        min_window_firings: the evidence a neuron's window needs before it is
            judged: it closes once the neuron fired this many times or this many
            firings were expected at its group's target. High targets then adapt at
            every check while a 1e-4 target waits for 20 / 1e-4 = 200,000 tokens
            instead of being judged on a window where it expects no firing at all.
            0 judges every neuron at every check (the paper's fixed windows).
        gamma_plus: step size for raising the bias of dead neurons, in units of
            their group's mean positive peak pre-activation.
        gamma_minus: step size for lowering the bias of over-active neurons: with
            ``bias_step_unit`` "margin" or "scale", in units of the neuron's peak;
            with "tail", the fraction of its estimated bias gap closed per step.
        bias_step_unit: how far an over-active neuron's bias moves: "margin", the
            paper's ``gamma_minus`` times the peak of ``y`` (its margin over the
            gate, which vanishes as the target nears, so low targets are approached
            geometrically, 1% of the gap per adaptation); "scale", times the peak of
            the unbiased projection (a fixed fraction of the neuron's own range);
            "tail" (the default), ``gamma_minus`` times the bias gap to the target
            estimated from the window, ``ln(p / target)`` tail scales with the tail
            scale the margin peak over ``H(firings)`` (an exponential tail's
            expected maximum excess); a neuron firing below half its target is
            raised the same way. Windows of a low target close rarely, and a fixed
            step leaves groups below 1e-3 at several times their target on a run
            of a few hundred thousand tokens; the tail step reaches them in a few
            windows (docs/recovery/README.md).
        dead_threshold: a neuron whose window firing frequency is at or below this
            is dead (0: did not fire in the window).
        train_pre_bias: train ``b_pre`` with Adam. Off by default: ``b_pre`` stays at
            the first batch's mean, as in the theory. A trained ``b_pre`` shifts every
            neuron's projection at once, and the controller only raises neurons that
            stopped firing, so frequencies that drift below target stay there: on
            Gemma-3-270M layer 9 (2,048 latents, 560k tokens, 2 seeds) the 0.5 and
            0.19 groups ended at 0.72-0.81x of target with it and 0.92-0.96x without.
        train_output_scale: train the output scales ``a_m`` with Adam, as the paper
            does. ``False`` keeps every ``a_m`` at ``decoder_init_norm``: the
            theory's small-output-scale regime, where each neuron follows its own
            firing region instead of competing to reconstruct. It recovers planted
            features far better (see docs/synthetic_findings.md) but reconstructs
            worse, so it is for recovery studies, not the default.
        relative_loss: weight each token's squared error by
            ``min(1, m / |x|^2)``, ``m`` the first batch's mean squared norm, so a
            token larger than average counts by its relative error
            (``sae_gba.relative_loss``). With heavy-tailed magnitudes a few large
            tokens otherwise dominate the loss and the directions co-adapt to them
            (synthetic log-normal family: FRR@0.9 0.38 without, 0.92 with;
            docs/recovery/README.md). Inputs of one norm per token (SAELens's
            ``constant_norm_rescale``, the presets' setting) get weight 1: no change.
            ``False`` is the paper's plain squared error.
        gate_bias_init: "zero" is the paper's ``b_m = 0``: every neuron starts
            firing about half the time and the controller lowers its bias one step
            per adaptation, so the firing frequency sweeps down through every value
            above the target on the way. "target_quantile" sets each bias from the
            first batch so that the neuron fires at its group's target from step 0
            (a target below 1 / batch rows starts at the batch maximum, and the
            controller takes it from there): the setting for studying one target
            frequency, as the resonance experiment does.
    """

    n_groups: int = 10
    high_target_freq: float | None = None
    target_l0: float | None = None
    low_target_freq: float = 1e-4
    adaptation_interval: int = 50
    min_window_firings: int = 20
    gamma_plus: float = 0.01
    gamma_minus: float = 0.5
    dead_threshold: float = 0.0
    bias_step_unit: StepUnit = "tail"
    train_pre_bias: bool = False
    train_output_scale: bool = True
    relative_loss: bool = True
    gate_bias_init: GateBiasInit = "zero"

    @override
    @classmethod
    def architecture(cls) -> str:
        return "gba"

    @override
    def get_inference_config_class(self) -> type[SAEConfig]:
        return JumpReLUSAEConfig

    def __post_init__(self) -> None:
        _resolve_high_target_freq(self)
        _validate_gba_config(self)
        super().__post_init__()

    @override
    def add_training_info_to_metadata(self) -> None:
        super().add_training_info_to_metadata()
        targets = target_frequencies(
            self.n_groups, self.high_target_freq, self.low_target_freq
        )
        groups = group_index(self.d_sae, self.n_groups)
        self.metadata.gba_target_frequencies = targets.tolist()
        self.metadata.gba_group_sizes = torch.bincount(
            groups, minlength=self.n_groups
        ).tolist()


def _resolve_high_target_freq(cfg: GBATrainingSAEConfig) -> None:
    """Set ``high_target_freq`` from ``target_l0`` (or the ``d_in`` rule) when None."""
    if cfg.high_target_freq is not None:
        if cfg.target_l0 is not None:
            raise ValueError(
                f"GBATrainingSAEConfig.target_l0={cfg.target_l0!r} is invalid: set "
                f"either target_l0 or high_target_freq={cfg.high_target_freq!r}, "
                "not both"
            )
        return
    valid = cfg.d_in >= 1 and cfg.d_sae >= 1 and 1 <= cfg.n_groups <= cfg.d_sae
    if not valid or not 0 < cfg.low_target_freq < HIGHEST_TARGET:
        return  # _validate_gba_config names the bad field
    if cfg.target_l0 is not None:
        try:
            cfg.high_target_freq = high_target_for_l0(
                cfg.target_l0, cfg.d_sae, cfg.n_groups, cfg.low_target_freq
            )
        except ValueError as err:
            raise ValueError(
                f"GBATrainingSAEConfig.target_l0 is invalid: {err}"
            ) from None
        cfg.target_l0 = None
        return
    low, high = cfg.low_target_freq, HIGHEST_TARGET
    reach = (
        expected_l0(cfg.d_sae, cfg.n_groups, low * 1.01, low),
        expected_l0(cfg.d_sae, cfg.n_groups, high, low),
    )
    l0 = min(max(cfg.d_in * L0_PER_D_IN, reach[0]), reach[1])
    cfg.high_target_freq = high_target_for_l0(l0, cfg.d_sae, cfg.n_groups, low, high)


def _validate_gba_config(cfg: GBATrainingSAEConfig) -> None:
    require = partial(check_field, cfg)

    require("d_in", cfg.d_in >= 1, "must be >= 1")
    require("d_sae", cfg.d_sae >= 1, "must be >= 1")
    require(
        "n_groups", 1 <= cfg.n_groups <= cfg.d_sae, f"must be in [1, d_sae={cfg.d_sae}]"
    )
    require("low_target_freq", 0 < cfg.low_target_freq < 1, "must be in (0, 1)")
    require(
        "low_target_freq",
        cfg.high_target_freq is not None,
        f"must be < high_target_freq, which target_l0 derives up to {HIGHEST_TARGET}",
    )
    high = cfg.high_target_freq
    require("high_target_freq", high is not None and 0 < high < 1, "must be in (0, 1)")
    require(
        "low_target_freq",
        cfg.n_groups == 1 or cfg.low_target_freq < cfg.high_target_freq,
        f"must be < high_target_freq={cfg.high_target_freq} when n_groups > 1",
    )
    require("adaptation_interval", cfg.adaptation_interval >= 1, "must be >= 1")
    require("min_window_firings", cfg.min_window_firings >= 0, "must be >= 0")
    require("gamma_plus", 0 <= cfg.gamma_plus <= 1, "must be in [0, 1]")
    require("gamma_minus", 0 <= cfg.gamma_minus <= 1, "must be in [0, 1]")
    require("dead_threshold", 0 <= cfg.dead_threshold < 1, "must be in [0, 1)")
    require(
        "bias_step_unit",
        cfg.bias_step_unit in get_args(StepUnit),
        f"must be one of {get_args(StepUnit)}",
    )
    require(
        "gate_bias_init",
        cfg.gate_bias_init in GATE_BIAS_INITS,
        f"must be one of {GATE_BIAS_INITS}",
    )
    require(
        "decoder_init_norm",
        cfg.decoder_init_norm is None or cfg.decoder_init_norm > 0,
        "must be > 0 or None (the initial output scale)",
    )
    require(
        "apply_b_dec_to_input",
        cfg.apply_b_dec_to_input,
        "must be True: GBA centres inputs on b_pre before projecting",
    )
    require(
        "normalize_activations",
        cfg.normalize_activations != "covariance_whitening",
        "covariance_whitening is not supported by GBA (use none, "
        "expected_average_only_in, constant_norm_rescale or layer_norm)",
    )
