"""GBA / BA sparse autoencoders as SAELens architectures (``architecture="gba"``).

Forward, with unit-norm tied directions ``w_m``, output scales ``a_m`` and an input
scale ``c`` fixed from the first training batch:

    v_m = w_m . (x - b_pre)                 (raw units)
    y_m = v_m / c + b_m                     (bias b_m in units of c: scale free)
    z_m = e_m v_m * 1[y_m > 0]              (JumpReLU: the bias only gates)
    x_hat = sum_m a_m w_m z_m + b_pre

The loss is ``0.5 * |x_hat - x|^2 / c^2`` with no sparsity penalty. Adam trains
``w`` and ``a`` (and ``b_pre / c`` with ``train_pre_bias``; by default ``b_pre`` stays at
the first batch's mean); the biases are buffers steered by bias adaptation
(``bias_adaptation.adapt_biases``) every ``adaptation_interval`` steps. Because
every trained quantity is in units of ``c``, multiplying the inputs by any constant
changes nothing but ``c``. The exported SAE is SAELens's ``jumprelu``:
``W_enc = e * w.T, b_enc = 0, threshold = -c * e * b, W_dec = a * w, b_dec = b_pre``.

The encoder scales ``e_m`` are 1 while training; SAELens's folds set them as they set
a JumpReLU SAE's ``W_enc``. ``fold_activation_norm_scaling_factor(s)`` (SAELens's
trainer calls it at the end of a run with ``expected_average_only_in``) makes
``c -> c/s, e -> s*e, a -> a/s``: on raw inputs the feature activations stay what
they were on scaled ones and the outputs come out in raw units. ``fold_W_dec_norm``
makes ``e -> |a| * e, a -> a/|a|``: unit-norm decoder rows, feature activations
times the old decoder norms, the same outputs.

Training steps run through ``fast_step`` (one autograd op with a hand-written,
sparsity-aware backward; same values and gradients); ``SAE_GBA_FAST_STEP=0``, an
activation hook or autocast selects plain autograd on the formula instead.
"""

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, get_args

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
    StepUnit,
    accumulate_window,
    adapt_biases,
    batch_window,
    closed_windows,
    expected_l0,
    group_index,
    high_target_for_l0,
    quantile_biases,
    target_frequencies,
)
from sae_gba.buffers import keep_float32, restore_state_dtypes
from sae_gba.collectives import gather_rows, synchronized_window
from sae_gba.config_fields import check_field
from sae_gba.fast_step import fast_step_enabled, fused_forward
from sae_gba.metrics import logged_lazily, summarize_window

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
    "gate_bias_init": "zero",
    "decoder_init_norm": 0.1,
}

# Adaptation state: saved with training checkpoints, dropped from exported SAEs.
WINDOW_BUFFERS = (
    "window_fire_counts",
    "window_peak_preacts",
    "window_tokens",
    "window_steps",
    # Each neuron's last completed window, for the logged metrics.
    "last_window_fire_counts",
    "last_window_tokens",
)
GBA_PARAMETERS = (
    "directions",
    "output_scale",
    "pre_bias",
    "gate_bias",
    "input_scale",
    "encoder_scale",
)
# Controller state kept in float32 whatever the SAE dtype, and integer counters.
FLOAT32_STATE = (
    "gate_bias",
    "input_scale",
    "window_peak_preacts",
)
COUNTER_STATE = (
    "window_fire_counts",
    "window_tokens",
    "window_steps",
    "last_window_fire_counts",
    "last_window_tokens",
)
# How the gate biases start (``GBATrainingSAEConfig.gate_bias_init``).
GateBiasInit = Literal["zero", "target_quantile"]
GATE_BIAS_INITS: tuple[str, ...] = get_args(GateBiasInit)
# The first batch's centred spread must exceed this fraction of its RMS norm.
MIN_RELATIVE_SPREAD = 1e-3


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


# Type checkers see the mixin as the SAE it extends; at run time it is a plain mixin.
if TYPE_CHECKING:
    _SAEBase: TypeAlias = SAE[Any]
else:
    _SAEBase = object


class _GBAForward(_SAEBase):
    """The tied GBA forward shared by the inference and training classes."""

    cfg: SAEConfig
    directions: nn.Parameter
    output_scale: nn.Parameter
    pre_bias: nn.Parameter
    gate_bias: torch.Tensor
    input_scale: torch.Tensor
    encoder_scale: torch.Tensor

    def _init_gba_weights(self, output_scale_init: float) -> None:
        d_sae, d_in = self.cfg.d_sae, self.cfg.d_in
        dtype = self.dtype
        device = self.device
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
        self.register_buffer(
            "gate_bias", torch.zeros(d_sae, dtype=torch.float32, device=device)
        )
        # 0 until the first training batch fixes it.
        self.register_buffer(
            "input_scale", torch.zeros((), dtype=torch.float32, device=device)
        )
        # 1 until a fold sets it (see the module docstring).
        self.register_buffer(
            "encoder_scale", torch.ones(d_sae, dtype=dtype, device=device)
        )

    def _unit_directions(self) -> torch.Tensor:
        # Normalising in the graph makes the gradient tangent to the sphere.
        return self.directions / self.directions.norm(dim=1, keepdim=True)

    @property
    def W_enc(self) -> torch.Tensor:
        return self._unit_directions().T * self.encoder_scale

    @property
    def W_dec(self) -> torch.Tensor:
        return self.output_scale[:, None] * self._unit_directions()

    @property
    def b_dec(self) -> torch.Tensor:
        return self.pre_bias * self.input_scale.to(self.pre_bias)

    @property
    def threshold(self) -> torch.Tensor:
        """JumpReLU threshold on ``hidden_pre = e * v``."""
        return -self.gate_bias * self.input_scale * self.encoder_scale

    def encode_with_hidden_pre(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (feature_acts, hidden_pre) with ``hidden_pre = e * v``."""
        return self._encode_processed(self._process_in(x))

    def _encode_processed(
        self, sae_in: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden_pre = self.hook_sae_acts_pre((sae_in - self.b_dec) @ self.W_enc)
        gate = hidden_pre > self.threshold.to(hidden_pre)
        return self.hook_sae_acts_post(hidden_pre * gate), hidden_pre

    def _process_in(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.cfg.d_in:
            raise ValueError(
                f"SAE input has last dimension {x.shape[-1]}, expected d_in={self.cfg.d_in}"
                f" (input shape {tuple(x.shape)})"
            )
        sae_in = self.reshape_fn_in(x.to(self.dtype))
        sae_in = self.hook_sae_input(sae_in)
        return self.run_time_activation_norm_fn_in(sae_in)

    @torch.no_grad()
    def fold_W_dec_norm(self) -> None:
        """Move the decoder norms ``|a_m|`` into the encoder scales, as SAELens does.

        ``W_dec`` rows become unit norm, ``W_enc`` columns and the threshold grow by
        the old norms (SAELens's JumpReLU fold), so feature activations scale by them
        and outputs stay the same.
        """
        norms = self.get_W_dec_norm()
        self.output_scale.data /= norms
        self.encoder_scale *= norms

    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        """Take raw inputs where the SAE was trained on inputs times ``scaling_factor``.

        As SAELens's folds: ``W_enc`` times the factor, ``W_dec`` and ``b_dec`` divided
        by it, the threshold unchanged; feature activations on raw inputs equal those
        on scaled inputs before the fold.

        Args:
            scaling_factor: the factor SAELens's activation scaler multiplied inputs by.
        """
        self.input_scale /= scaling_factor
        self.encoder_scale *= scaling_factor
        self.output_scale.data /= scaling_factor
        self.cfg.normalize_activations = "none"

    def _add_missing_state(self, state_dict: dict[str, Any]) -> None:
        # Checkpoints written before these buffers existed: encoder scales of 1 are
        # what they computed with, and no adaptation window has completed.
        defaults = {
            "encoder_scale": ("output_scale", torch.ones_like),
            "last_window_fire_counts": ("window_fire_counts", torch.zeros_like),
            "last_window_tokens": ("window_fire_counts", torch.zeros_like),
        }
        own = self._buffers
        for name, (like, fill) in defaults.items():
            if name in own and name not in state_dict and like in state_dict:
                state_dict[name] = fill(state_dict[like])

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
        self._add_missing_state(state_dict)


class GBATrainingSAE(_GBAForward, TrainingSAE[GBATrainingSAEConfig]):
    """GBA training SAE: tied weights, JumpReLU gate, biases by bias adaptation."""

    window_fire_counts: torch.Tensor
    window_peak_preacts: torch.Tensor
    window_tokens: torch.Tensor
    window_steps: torch.Tensor
    last_window_fire_counts: torch.Tensor
    last_window_tokens: torch.Tensor

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
        # Per neuron: a window closes when its own evidence suffices.
        self.register_buffer(
            "window_tokens",
            torch.zeros(cfg.d_sae, dtype=torch.int64, device=self.device),
        )
        self.register_buffer(
            "window_steps", torch.zeros((), dtype=torch.int64, device=self.device)
        )
        self.register_buffer(
            "last_window_fire_counts",
            torch.zeros(cfg.d_sae, dtype=torch.int64, device=self.device),
        )
        self.register_buffer(
            "last_window_tokens",
            torch.zeros(cfg.d_sae, dtype=torch.int64, device=self.device),
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
        self._check_unfolded()
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
        # weighted subclass (sae_gba.weighted_sae) can weight them.
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
            metrics=self._logged_metrics(),
        )

    def _check_unfolded(self) -> None:
        if not bool((self.encoder_scale == 1).all()):
            raise ValueError(
                "cannot train a GBA SAE whose scales were folded for inference "
                "(encoder_scale != 1 after fold_activation_norm_scaling_factor or "
                "fold_W_dec_norm); resume from a checkpoint saved before the fold"
            )

    def window_frequency(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each latent's firing frequency in its last completed adaptation window.

        Before a latent's first window closes its running window stands in.

        Returns:
            (frequency (d_sae,), each latent's window token count (d_sae,)).
        """
        done = self.last_window_tokens > 0
        counts = torch.where(
            done, self.last_window_fire_counts, self.window_fire_counts
        )
        tokens = torch.where(done, self.last_window_tokens, self.window_tokens)
        return counts.double() / tokens.clamp(min=1), tokens

    def window_metrics(self) -> dict[str, float]:
        """``metrics.summarize_window`` on the last window (README's table of names)."""
        cfg = self.cfg
        frequency, tokens = self.window_frequency()
        group_targets, groups = self._groups()
        metrics = summarize_window(
            frequency,
            group_targets,
            groups,
            self.gate_bias,
            cfg.dead_threshold,
            self.output_scale if cfg.train_output_scale else None,
        )
        return {**metrics, "gba/window_tokens": tokens.double().median().item()}

    def _logged_metrics(self) -> dict[str, Callable[[], float]]:
        # The names depend on the config only: computed once, at the first step.
        if not hasattr(self, "_metric_names"):
            self._metric_names = tuple(self.window_metrics())
        return logged_lazily(self.window_metrics, self._metric_names)

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
            accumulate_window(
                self.window_fire_counts,
                self.window_peak_preacts,
                out.fire_counts,
                out.peak_hidden_pre / scale + self.gate_bias,
            )
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
                self.window_fire_counts,
                self.window_peak_preacts,
                *batch_window(preacts),
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
        # Data-parallel: from the global batch, the same on every rank.
        x = gather_rows(self._process_in(sae_in).reshape(-1, self.cfg.d_in).float())
        mean = x.mean(dim=0)
        scale = (x - mean).pow(2).sum(dim=-1).mean().sqrt()
        size = x.pow(2).sum(dim=-1).mean().sqrt()
        # Rows that barely differ give a scale set by their noise: every trained
        # quantity is in units of it, and the SAE learns nothing useful.
        if not torch.isfinite(scale) or scale <= MIN_RELATIVE_SPREAD * size:
            raise ValueError(
                f"cannot set the GBA input scale from the first batch ({x.shape[0]} "
                f"rows): its rows are (nearly) constant (centred RMS norm "
                f"{scale.item():.3g}, RMS norm {size.item():.3g}; the spread must be "
                f"above {MIN_RELATIVE_SPREAD:g} of the size). Shuffle the data so the "
                "first batch is representative, and leave out constant positions "
                "(padding, BOS)"
            )
        self.input_scale.copy_(scale)
        self.pre_bias.data.copy_((mean / scale).to(self.pre_bias))
        if self.cfg.gate_bias_init == "target_quantile":
            preacts = (x - mean) / scale @ self._unit_directions().float().T
            self.gate_bias.copy_(quantile_biases(preacts, self.neuron_targets()))

    def _groups(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(each group's target (K,), each neuron's group (d_sae,)) on the SAE's device.

        The config fixes both, so they are computed once per device.
        """
        device = self.gate_bias.device
        cached = getattr(self, "_groups_cache", None)
        if cached is None or cached[1].device != device:
            cfg = self.cfg
            cached = (
                target_frequencies(
                    cfg.n_groups, cfg.high_target_freq, cfg.low_target_freq
                ).to(device),
                group_index(cfg.d_sae, cfg.n_groups).to(device),
            )
            self._groups_cache = cached
        return cached

    def neuron_targets(self) -> torch.Tensor:
        """Each neuron's target firing frequency (its group's), on the SAE's device."""
        targets, groups = self._groups()
        return targets[groups]

    @torch.no_grad()
    @synchronized_window  # data-parallel: every rank judges the global window
    def adapt_biases(self) -> None:
        """Adapt every neuron whose window is closed, and start new windows for them."""
        _, groups = self._groups()
        targets = self.neuron_targets()
        closed = closed_windows(
            self.window_fire_counts,
            self.window_tokens,
            targets,
            self.cfg.min_window_firings,
        )
        frequency = self.window_fire_counts.double() / self.window_tokens.clamp(min=1)
        adapted = adapt_biases(
            self.gate_bias,
            frequency,
            self.window_peak_preacts,
            targets,
            groups,
            self.cfg.n_groups,
            self.cfg.gamma_plus,
            self.cfg.gamma_minus,
            self.cfg.dead_threshold,
            self.cfg.bias_step_unit,
            self.window_tokens,
        )
        self.gate_bias.copy_(torch.where(closed, adapted, self.gate_bias))
        self.last_window_fire_counts.copy_(
            torch.where(closed, self.window_fire_counts, self.last_window_fire_counts)
        )
        self.last_window_tokens.copy_(
            torch.where(closed, self.window_tokens, self.last_window_tokens)
        )
        self.window_fire_counts.masked_fill_(closed, 0)
        self.window_peak_preacts.masked_fill_(closed, -torch.inf)
        self.window_tokens.masked_fill_(closed, 0)
        self.window_steps.zero_()

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
        self._add_missing_state(state_dict)
        restore_state_dtypes(state_dict, FLOAT32_STATE, COUNTER_STATE)
        # Checkpoints from before per-neuron windows hold one shared token count.
        tokens = state_dict.get("window_tokens")
        if tokens is not None and tokens.ndim == 0:
            state_dict["window_tokens"] = tokens.expand(self.cfg.d_sae).clone()

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
