"""The adaptation windows of a GBA training SAE: each neuron's firing count, peak
pre-activation and token count since its last adaptation, the bias adaptation that
closes them, and the metrics logged from the last closed ones."""

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeAlias

import torch
from sae_lens.saes.sae import TrainingSAE

from sae_gba.bias_adaptation import (
    adapt_biases,
    closed_windows,
    group_index,
    target_frequencies,
)
from sae_gba.collectives import synchronized_window
from sae_gba.gba_config import GBATrainingSAEConfig
from sae_gba.metrics import logged_lazily, summarize_window

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
# The integer counters among them.
COUNTER_STATE = (
    "window_fire_counts",
    "window_tokens",
    "window_steps",
    "last_window_fire_counts",
    "last_window_tokens",
)

# Type checkers see the mixin as the SAE it extends; at run time it is a plain mixin.
if TYPE_CHECKING:
    _TrainingBase: TypeAlias = TrainingSAE[Any]
else:
    _TrainingBase = object


class _GBAWindow(_TrainingBase):
    """Per-neuron adaptation windows, mixed into ``GBATrainingSAE``."""

    cfg: GBATrainingSAEConfig
    gate_bias: torch.Tensor
    output_scale: torch.Tensor
    window_fire_counts: torch.Tensor
    window_peak_preacts: torch.Tensor
    window_tokens: torch.Tensor
    window_steps: torch.Tensor
    last_window_fire_counts: torch.Tensor
    last_window_tokens: torch.Tensor

    def _register_window_buffers(self) -> None:
        self.register_buffer(
            "window_fire_counts",
            torch.zeros(self.cfg.d_sae, dtype=torch.int64, device=self.device),
        )
        self.register_buffer(
            "window_peak_preacts",
            torch.full(
                (self.cfg.d_sae,), -torch.inf, dtype=torch.float32, device=self.device
            ),
        )
        # Per neuron: a window closes when its own evidence suffices.
        self.register_buffer(
            "window_tokens",
            torch.zeros(self.cfg.d_sae, dtype=torch.int64, device=self.device),
        )
        self.register_buffer(
            "window_steps", torch.zeros((), dtype=torch.int64, device=self.device)
        )
        self.register_buffer(
            "last_window_fire_counts",
            torch.zeros(self.cfg.d_sae, dtype=torch.int64, device=self.device),
        )
        self.register_buffer(
            "last_window_tokens",
            torch.zeros(self.cfg.d_sae, dtype=torch.int64, device=self.device),
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
