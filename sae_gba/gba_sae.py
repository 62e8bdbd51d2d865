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

from typing import Any

import torch
from sae_lens.saes.jumprelu_sae import JumpReLUSAEConfig
from sae_lens.saes.sae import (
    SAE,
    TrainCoefficientConfig,
    TrainingSAE,
    TrainStepInput,
    TrainStepOutput,
)
from typing_extensions import override

from sae_gba.bias_adaptation import accumulate_window, batch_window, quantile_biases
from sae_gba.buffers import keep_float32, restore_state_dtypes
from sae_gba.collectives import gather_rows
from sae_gba.fast_step import fast_step_enabled, fused_forward
from sae_gba.gba_config import (  # noqa: F401 (public names, defined there)
    GATE_BIAS_INITS,
    HIGHEST_TARGET,
    L0_PER_D_IN,
    PAPER_RECIPE,
    GateBiasInit,
    GBASAEConfig,
    GBATrainingSAEConfig,
)
from sae_gba.gba_forward import _GBAForward
from sae_gba.gba_window import COUNTER_STATE, WINDOW_BUFFERS, _GBAWindow
from sae_gba.relative_loss import relative_token_weights
from sae_gba.step_memory import StepMemory

# The native parameters and buffers, replaced by the JumpReLU form on export.
GBA_PARAMETERS = (
    "directions",
    "output_scale",
    "pre_bias",
    "gate_bias",
    "input_scale",
    "encoder_scale",
)
# Controller state kept in float32 whatever the SAE dtype (the integer counters are
# gba_window.COUNTER_STATE).
FLOAT32_STATE = (
    "gate_bias",
    "input_scale",
    "window_peak_preacts",
)
# The first batch's centred spread must exceed this fraction of its RMS norm.
MIN_RELATIVE_SPREAD = 1e-3


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


class GBATrainingSAE(_GBAWindow, _GBAForward, TrainingSAE[GBATrainingSAEConfig]):
    """GBA training SAE: tied weights, JumpReLU gate, biases by bias adaptation.

    The windows the adaptation judges live in ``gba_window._GBAWindow``.
    """

    def __init__(self, cfg: GBATrainingSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        self.pre_bias.requires_grad_(cfg.train_pre_bias)
        self.output_scale.requires_grad_(cfg.train_output_scale)
        self._register_window_buffers()
        self._step_memory = StepMemory()

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
        if self.cfg.relative_loss:
            b_pre = self.b_dec.detach().to(squared_error)
            mean_square = scale.square() + b_pre.square().sum()
            squared_error = squared_error * relative_token_weights(
                processed_in, mean_square
            )
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
        """(x_hat, feature_acts, hidden_pre) by ``fast_step`` (one fused autograd op).

        ``feature_acts`` is a sparse COO tensor where every block of the step was
        sparse and the inputs are (batch, d_in); SAELens's trainer and its logging
        take either.
        """
        x = processed_in.reshape(-1, self.cfg.d_in)
        scale = self.input_scale.to(x)
        out = fused_forward(
            x,
            self.directions,
            self.output_scale,
            self.pre_bias,
            scale,
            self.threshold.to(x),
            unit_directions=True,  # _before_step renormalised them
            memory=self._step_memory,
        )
        with torch.no_grad():
            accumulate_window(
                self.window_fire_counts,
                self.window_peak_preacts,
                out.fire_counts,
                out.peak_hidden_pre / scale + self.gate_bias,
            )
        shape = (*processed_in.shape[:-1], self.cfg.d_sae)
        acts = out.feature_acts
        if acts.shape != shape:  # sparse COO acts stay so for (batch, d_in) inputs
            acts = acts.to_dense().reshape(shape)
        return (
            out.x_hat.reshape(processed_in.shape),
            acts,
            out.hidden_pre.reshape(shape),
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
