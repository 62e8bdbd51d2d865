"""The tied GBA forward shared by the inference and training SAEs: weights, the
SAELens-facing ``W_enc``/``W_dec``/``b_dec``/``threshold``, encoding, SAELens's folds
and the exact JumpReLU export (formulas in ``sae_gba.gba_sae``'s docstring)."""

from typing import TYPE_CHECKING, Any, TypeAlias

import torch
from sae_lens.saes.sae import SAE, SAEConfig
from torch import nn

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
