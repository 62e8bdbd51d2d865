"""GBA / BA sparse autoencoders as SAELens architectures (``architecture="gba"``).

Forward, with unit-norm tied directions ``w_m``, output scales ``a_m`` and an input
scale ``c`` fixed from the first training batch:

    u_m = w_m . (x - b_pre)                 (raw units; exported as hidden_pre)
    y_m = u_m / c + b_m                     (bias b_m in units of c: scale free)
    z_m = u_m * 1[y_m > 0]                  (JumpReLU: the bias only gates)
    x_hat = sum_m a_m w_m z_m + b_pre

The loss is ``0.5 * |x_hat - x|^2 / c^2`` with no sparsity penalty. Adam trains
``w`` and ``a`` (and ``b_pre / c`` with ``train_pre_bias``; by default ``b_pre`` stays at
the first batch's mean); the biases are buffers steered by bias adaptation
(``bias_adaptation.adapt_biases``) every ``adaptation_interval`` steps. Because
every trained quantity is in units of ``c``, multiplying the inputs by any constant
changes nothing but ``c``. The exported SAE is SAELens's ``jumprelu``:
``W_enc = w.T, b_enc = 0, threshold = -c * b, W_dec = a * w, b_dec = b_pre``.

Training steps run through ``fast_step`` (one autograd op with a hand-written,
sparsity-aware backward; same values and gradients); ``SAE_GBA_FAST_STEP=0``, an
activation hook or autocast selects plain autograd on the formula instead.
"""

from dataclasses import dataclass
from typing import Any

import torch
from sae_lens.saes.jumprelu_sae import JumpReLUSAEConfig
from sae_lens.saes.sae import (
    SAE,
    SAEConfig,
    TrainCoefficientConfig,
    TrainingSAE,
    TrainingSAEConfig,
    TrainStepInput,
    TrainStepOutput,
)
from torch import nn
from typing_extensions import override

from sae_gba.bias_adaptation import (
    accumulate_window,
    adapt_biases,
    group_index,
    quantile_biases,
    target_frequencies,
)
from sae_gba.buffers import keep_float32
from sae_gba.fast_step import fast_step_enabled, fused_forward

# Adaptation state: saved with training checkpoints, dropped from exported SAEs.
WINDOW_BUFFERS = (
    "window_fire_counts",
    "window_peak_preacts",
    "window_tokens",
    "window_steps",
)
GBA_PARAMETERS = ("directions", "output_scale", "pre_bias", "gate_bias", "input_scale")
# Controller state kept in float32 whatever the SAE dtype, and integer counters.
FLOAT32_STATE = ("gate_bias", "input_scale", "window_peak_preacts")
COUNTER_STATE = ("window_fire_counts", "window_tokens", "window_steps")
GATE_BIAS_INITS = ("zero", "target_quantile")
# The GBA paper's literal recipe (trained output scales, zero bias start), fixed here
# so `GBATrainingSAEConfig(d_in, d_sae, **PAPER_RECIPE)` stays one step away.
PAPER_RECIPE: dict[str, Any] = {
    "n_groups": 10,
    "high_target_freq": 0.5,
    "low_target_freq": 1e-4,
    "adaptation_interval": 50,
    "gamma_plus": 0.01,
    "gamma_minus": 0.01,
    "dead_threshold": 0.0,
    "train_pre_bias": False,
    "train_output_scale": True,
    "gate_bias_init": "zero",
    "decoder_init_norm": 0.1,
}


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
        high_target_freq: target firing frequency of the first group (HTF).
        low_target_freq: target of the last group (LTF); geometric in between.
        adaptation_interval: training steps between bias adaptations; the firing
            statistics cover the steps since the previous adaptation.
        gamma_plus: step size for raising the bias of dead neurons, in units of
            their group's mean positive peak pre-activation.
        gamma_minus: step size for lowering the bias of over-active neurons, in
            units of their own peak pre-activation.
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
    high_target_freq: float = 0.5
    low_target_freq: float = 1e-4
    adaptation_interval: int = 50
    gamma_plus: float = 0.01
    gamma_minus: float = 0.01
    dead_threshold: float = 0.0
    train_pre_bias: bool = False
    train_output_scale: bool = True
    gate_bias_init: str = "zero"

    @override
    @classmethod
    def architecture(cls) -> str:
        return "gba"

    @override
    def get_inference_config_class(self) -> type[SAEConfig]:
        return JumpReLUSAEConfig

    def __post_init__(self) -> None:
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


def _validate_gba_config(cfg: GBATrainingSAEConfig) -> None:
    def require(name: str, ok: bool, allowed: str) -> None:
        if not ok:
            raise ValueError(
                f"GBATrainingSAEConfig.{name}={getattr(cfg, name)!r} is invalid: "
                f"{allowed}"
            )

    require("d_in", cfg.d_in >= 1, "must be >= 1")
    require("d_sae", cfg.d_sae >= 1, "must be >= 1")
    require(
        "n_groups", 1 <= cfg.n_groups <= cfg.d_sae, f"must be in [1, d_sae={cfg.d_sae}]"
    )
    require("high_target_freq", 0 < cfg.high_target_freq < 1, "must be in (0, 1)")
    require("low_target_freq", 0 < cfg.low_target_freq < 1, "must be in (0, 1)")
    require(
        "low_target_freq",
        cfg.n_groups == 1 or cfg.low_target_freq < cfg.high_target_freq,
        f"must be < high_target_freq={cfg.high_target_freq} when n_groups > 1",
    )
    require("adaptation_interval", cfg.adaptation_interval >= 1, "must be >= 1")
    require("gamma_plus", 0 <= cfg.gamma_plus <= 1, "must be in [0, 1]")
    require("gamma_minus", 0 <= cfg.gamma_minus <= 1, "must be in [0, 1]")
    require("dead_threshold", 0 <= cfg.dead_threshold < 1, "must be in [0, 1)")
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


class _GBAForward:
    """The tied GBA forward shared by the inference and training classes."""

    cfg: SAEConfig
    directions: nn.Parameter
    output_scale: nn.Parameter
    pre_bias: nn.Parameter
    gate_bias: torch.Tensor
    input_scale: torch.Tensor

    def _init_gba_weights(self, output_scale_init: float) -> None:
        d_sae, d_in = self.cfg.d_sae, self.cfg.d_in
        dtype = self.dtype  # type: ignore[attr-defined]
        device = self.device  # type: ignore[attr-defined]
        directions = torch.randn(d_sae, d_in, dtype=dtype, device=device)
        self.directions = nn.Parameter(
            directions / directions.norm(dim=1, keepdim=True)
        )
        self.output_scale = nn.Parameter(
            torch.full((d_sae,), output_scale_init, dtype=dtype, device=device)
        )
        self.pre_bias = nn.Parameter(torch.zeros(d_in, dtype=dtype, device=device))
        # Controller state stays float32 whatever the SAE dtype: 1% bias steps round
        # away in bfloat16.
        self.register_buffer(  # type: ignore[attr-defined]
            "gate_bias", torch.zeros(d_sae, dtype=torch.float32, device=device)
        )
        # 0 until the first training batch fixes it.
        self.register_buffer(  # type: ignore[attr-defined]
            "input_scale", torch.zeros((), dtype=torch.float32, device=device)
        )

    def _unit_directions(self) -> torch.Tensor:
        # Normalising in the graph makes the gradient tangent to the sphere.
        return self.directions / self.directions.norm(dim=1, keepdim=True)

    @property
    def W_enc(self) -> torch.Tensor:
        return self._unit_directions().T

    @property
    def W_dec(self) -> torch.Tensor:
        return self.output_scale[:, None] * self._unit_directions()

    @property
    def b_dec(self) -> torch.Tensor:
        return self.pre_bias * self.input_scale.to(self.pre_bias)

    @property
    def threshold(self) -> torch.Tensor:
        """JumpReLU threshold on ``u`` in raw units."""
        return -self.gate_bias * self.input_scale

    def encode_with_hidden_pre(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (feature_acts, hidden_pre) with ``hidden_pre = u`` in raw units."""
        return self._encode_processed(self._process_in(x))

    def _encode_processed(
        self, sae_in: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden_pre = self.hook_sae_acts_pre(  # type: ignore[attr-defined]
            (sae_in - self.b_dec) @ self.W_enc
        )
        gate = hidden_pre > self.threshold.to(hidden_pre)
        return self.hook_sae_acts_post(hidden_pre * gate), hidden_pre  # type: ignore[attr-defined]

    def _process_in(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.cfg.d_in:
            raise ValueError(
                f"SAE input has last dimension {x.shape[-1]}, expected d_in={self.cfg.d_in}"
                f" (input shape {tuple(x.shape)})"
            )
        sae_in = self.reshape_fn_in(x.to(self.dtype))  # type: ignore[attr-defined]
        sae_in = self.hook_sae_input(sae_in)  # type: ignore[attr-defined]
        return self.run_time_activation_norm_fn_in(sae_in)  # type: ignore[attr-defined]

    def fold_W_dec_norm(self) -> None:
        raise NotImplementedError(
            "fold_W_dec_norm is not defined for GBA: its directions are unit norm by "
            "construction and the output scale is the decoder norm"
        )

    def _jumprelu_state_dict(self) -> dict[str, torch.Tensor]:
        """The exact JumpReLU form of this SAE (plain SAELens loads it)."""
        with torch.no_grad():
            return {
                "W_enc": self.W_enc.detach().contiguous(),
                "b_enc": torch.zeros_like(self.output_scale).detach(),
                "W_dec": self.W_dec.detach().contiguous(),
                "b_dec": self.b_dec.detach().contiguous(),
                "threshold": self.threshold.to(self.output_scale).detach().contiguous(),
            }


class GBASAE(_GBAForward, SAE[GBASAEConfig]):
    """Inference GBA SAE in its native form (loads GBA training checkpoints)."""

    def __init__(self, cfg: GBASAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)

    @override
    def initialize_weights(self) -> None:
        self._init_gba_weights(output_scale_init=1.0)

    @override
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode_with_hidden_pre(x)[0]

    @override
    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        sae_out = self.hook_sae_recons(feature_acts @ self.W_dec + self.b_dec)
        sae_out = self.run_time_activation_norm_fn_out(sae_out)
        return self.reshape_fn_out(sae_out, self.d_head)

    @override
    def process_state_dict_for_loading(self, state_dict: dict[str, Any]) -> None:
        for name in WINDOW_BUFFERS:
            state_dict.pop(name, None)


class GBATrainingSAE(_GBAForward, TrainingSAE[GBATrainingSAEConfig]):
    """GBA training SAE: tied weights, JumpReLU gate, biases by bias adaptation."""

    window_fire_counts: torch.Tensor
    window_peak_preacts: torch.Tensor
    window_tokens: torch.Tensor
    window_steps: torch.Tensor

    def __init__(self, cfg: GBATrainingSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        self.pre_bias.requires_grad_(cfg.train_pre_bias)
        self.output_scale.requires_grad_(cfg.train_output_scale)
        self.register_buffer(
            "window_fire_counts",
            torch.zeros(cfg.d_sae, dtype=torch.int64, device=self.device),
        )
        self.register_buffer(
            "window_peak_preacts",
            torch.full(
                (cfg.d_sae,), -torch.inf, dtype=torch.float32, device=self.device
            ),
        )
        self.register_buffer(
            "window_tokens", torch.zeros((), dtype=torch.int64, device=self.device)
        )
        self.register_buffer(
            "window_steps", torch.zeros((), dtype=torch.int64, device=self.device)
        )

    @override
    def initialize_weights(self) -> None:
        init = self.cfg.decoder_init_norm
        self._init_gba_weights(output_scale_init=1.0 if init is None else init)

    @override
    def _apply(self, *args: Any, **kwargs: Any) -> "GBATrainingSAE":
        out = super()._apply(*args, **kwargs)
        keep_float32(self, FLOAT32_STATE)
        return out

    @override
    def get_coefficients(self) -> dict[str, float | TrainCoefficientConfig]:
        return {}

    @override
    def calculate_aux_loss(
        self,
        step_input: TrainStepInput,
        feature_acts: torch.Tensor,
        hidden_pre: torch.Tensor,
        sae_out: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        return {}

    @override
    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        sae_in = step_input.sae_in
        _check_finite(sae_in, step_input.n_training_steps)
        self._before_step(sae_in)

        # The loss lives where the SAE works: after SAELens's run-time normalisation
        # (per-token with constant_norm_rescale), in units of the input scale.
        processed_in = self._process_in(sae_in)
        forward = (
            self._fused_forward
            if self._fused_step_applies(processed_in)
            else self._reference_forward
        )
        processed_out, feature_acts, hidden_pre = forward(processed_in)
        with torch.no_grad():
            self.window_tokens += processed_in.numel() // self.cfg.d_in
            self.window_steps += 1
        processed_out = self.hook_sae_recons(processed_out)
        scale = self.input_scale.to(processed_out)
        # Per-dimension squared errors through SAELens's mse_loss_fn hook, so a
        # weighted subclass (sae_gba.weighted) can weight them.
        squared_error = self.mse_loss_fn(processed_out, processed_in)
        mse_loss = 0.5 * (squared_error / scale.square()).sum(dim=-1).mean()
        sae_out = self.reshape_fn_out(
            self.run_time_activation_norm_fn_out(processed_out), self.d_head
        )
        return TrainStepOutput(
            sae_in=sae_in,
            sae_out=sae_out,
            feature_acts=feature_acts,
            hidden_pre=hidden_pre,
            loss=mse_loss,
            losses={"mse_loss": mse_loss},
            metrics={"gba/mean_gate_bias": lambda: self.gate_bias.mean()},
        )

    def _fused_step_applies(self, processed_in: torch.Tensor) -> bool:
        # The fused step bypasses the activation hook points: fall back when a hook is
        # attached to them, and under autocast (whose casts are per op).
        hooked = any(
            hook._forward_hooks or hook._forward_pre_hooks or hook._backward_hooks
            for hook in (self.hook_sae_acts_pre, self.hook_sae_acts_post)
        )
        autocast = torch.is_autocast_enabled(processed_in.device.type)
        return fast_step_enabled() and not hooked and not autocast

    def _fused_forward(self, processed_in: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(x_hat, feature_acts, hidden_pre) by ``fast_step`` (one fused autograd op)."""
        x = processed_in.reshape(-1, self.cfg.d_in)
        scale = self.input_scale.to(x)
        out = fused_forward(
            x,
            self.directions,
            self.output_scale,
            self.pre_bias,
            scale,
            self.threshold.to(x),
        )
        with torch.no_grad():
            self.window_fire_counts += out.fire_counts
            peaks = (out.peak_hidden_pre / scale + self.gate_bias).float()
            torch.maximum(self.window_peak_preacts, peaks, out=self.window_peak_preacts)
        lead = processed_in.shape[:-1]
        return (
            out.x_hat.reshape(processed_in.shape),
            out.feature_acts.reshape(*lead, self.cfg.d_sae),
            out.hidden_pre.reshape(*lead, self.cfg.d_sae),
        )

    def _reference_forward(
        self, processed_in: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """The same by plain autograd on the formula, through the hook points."""
        feature_acts, hidden_pre = self._encode_processed(processed_in)
        processed_out = feature_acts @ self.W_dec + self.b_dec
        with torch.no_grad():
            scale = self.input_scale.to(hidden_pre)
            preacts = hidden_pre.reshape(-1, self.cfg.d_sae) / scale + self.gate_bias
            accumulate_window(
                self.window_fire_counts, self.window_peak_preacts, preacts
            )
        return processed_out, feature_acts, hidden_pre

    @torch.no_grad()
    def _before_step(self, sae_in: torch.Tensor) -> None:
        # State edits happen here, before the graph of this step is built.
        if self.input_scale <= 0:
            self._initialize_from_batch(sae_in)
        if self.window_steps >= self.cfg.adaptation_interval:
            self.adapt_biases()
        self.directions.data /= self.directions.data.norm(dim=1, keepdim=True)

    @torch.no_grad()
    def _initialize_from_batch(self, sae_in: torch.Tensor) -> None:
        x = self._process_in(sae_in).reshape(-1, self.cfg.d_in).float()
        mean = x.mean(dim=0)
        scale = (x - mean).pow(2).sum(dim=-1).mean().sqrt()
        if not torch.isfinite(scale) or scale <= 0:
            raise ValueError(
                f"cannot set the GBA input scale from the first batch: its centred RMS "
                f"norm is {scale.item()} (inputs must vary; got {x.shape[0]} rows)"
            )
        self.input_scale.copy_(scale)
        self.pre_bias.data.copy_((mean / scale).to(self.pre_bias))
        if self.cfg.gate_bias_init == "target_quantile":
            preacts = (x - mean) / scale @ self._unit_directions().float().T
            self.gate_bias.copy_(quantile_biases(preacts, self._neuron_targets()))

    def _neuron_targets(self) -> torch.Tensor:
        cfg = self.cfg
        groups = group_index(cfg.d_sae, cfg.n_groups).to(self.gate_bias.device)
        targets = target_frequencies(
            cfg.n_groups, cfg.high_target_freq, cfg.low_target_freq
        ).to(self.gate_bias.device)
        return targets[groups]

    @torch.no_grad()
    def adapt_biases(self) -> None:
        """Run one bias adaptation on the current window, then start a new window."""
        frequency = self.window_fire_counts.double() / self.window_tokens.clamp(min=1)
        groups = group_index(self.cfg.d_sae, self.cfg.n_groups)
        self.gate_bias.copy_(
            adapt_biases(
                self.gate_bias,
                frequency,
                self.window_peak_preacts,
                self._neuron_targets(),
                groups.to(self.gate_bias.device),
                self.cfg.n_groups,
                self.cfg.gamma_plus,
                self.cfg.gamma_minus,
                self.cfg.dead_threshold,
            )
        )
        self.window_fire_counts.zero_()
        self.window_peak_preacts.fill_(-torch.inf)
        self.window_tokens.zero_()
        self.window_steps.zero_()

    @override
    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        # Everything trained is in units of the input scale: only the scale moves.
        self.input_scale /= scaling_factor
        self.cfg.normalize_activations = "none"

    @override
    def fold_activation_whitening(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("covariance_whitening is not supported by GBA")

    @override
    def process_state_dict_for_saving_inference(
        self, state_dict: dict[str, Any]
    ) -> None:
        for name in (*GBA_PARAMETERS, *WINDOW_BUFFERS):
            state_dict.pop(name, None)
        state_dict.update(self._jumprelu_state_dict())

    @override
    def process_state_dict_for_loading(self, state_dict: dict[str, Any]) -> None:
        # SAELens's disk loader casts every tensor to cfg.dtype; counters are integers.
        for name in COUNTER_STATE:
            if name in state_dict:
                state_dict[name] = state_dict[name].round().to(torch.int64)
        for name in FLOAT32_STATE:
            if name in state_dict:
                state_dict[name] = state_dict[name].float()

    def to_jumprelu(self) -> SAE[Any]:
        """The exported inference SAE (SAELens ``JumpReLUSAE``) with the same outputs."""
        cfg = JumpReLUSAEConfig.from_dict(self.cfg.get_inference_sae_cfg_dict())
        sae = SAE.from_dict(cfg.to_dict())
        sae.load_state_dict(self._jumprelu_state_dict())
        return sae


def _check_finite(sae_in: torch.Tensor, step: int) -> None:
    finite = torch.isfinite(sae_in)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise ValueError(
            f"SAE input at training step {step} has {bad} NaN/Inf values out of "
            f"{sae_in.numel()} (shape {tuple(sae_in.shape)}); activations must be finite"
        )
