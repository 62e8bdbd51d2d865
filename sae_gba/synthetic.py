"""Synthetic sparse-superposition data ``X = H V`` with known features (pure torch).

``V`` (n x d) holds n unit-norm Gaussian feature directions in d dimensions (n > d is
superposition); ``H`` is non-negative and sparse. Two support models:

- ``"fixed_sparsity"``: every sample has exactly ``s`` active features chosen uniformly
  without replacement, with ``s`` drawn per sample from ``sparsities`` with
  ``sparsity_weights`` (one entry = the uniform model; the paper's imbalanced set is
  ``s in {3, 20}`` with equal weight). Every feature has frequency ``sum_j w_j s_j / n``.
- ``"independent"``: feature ``i`` is active independently with probability ``f_i``, the
  ``f_i`` log-spaced from ``max_frequency`` (feature 0) to ``min_frequency`` (feature
  n-1): a long tail whose frequency density is the power law ``p(f) ~ 1/f``, so every
  decade holds the same number of features. A sample may have no active feature.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

SUPPORT_MODELS = ("fixed_sparsity", "independent")
COEFFICIENT_DISTRIBUTIONS = ("uniform", "constant", "exponential")
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class SyntheticConfig:
    """Parameters of the data model; validated on construction.

    ``coefficient_distribution``: ``"uniform"`` draws U(coefficient_low, coefficient_high);
    ``"constant"`` sets every active coefficient to 1; ``"exponential"`` draws Exp(1)
    (mean 1, like the default uniform). ``coefficient_low/high`` only affect ``"uniform"``.
    ``max_frequency``/``min_frequency`` only affect the ``"independent"`` model and
    ``sparsities``/``sparsity_weights`` only the ``"fixed_sparsity"`` one.
    """

    n_features: int = 128
    d: int = 42
    support_model: str = "fixed_sparsity"
    sparsities: tuple[int, ...] = (3,)
    sparsity_weights: tuple[float, ...] | None = None  # None: equal weights
    max_frequency: float = 0.1
    min_frequency: float = 1e-3
    coefficient_distribution: str = "uniform"
    coefficient_low: float = 0.5
    coefficient_high: float = 1.5
    noise_std: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        # Predicates run in order, so later ones may rely on earlier fields being valid.
        n, weights = self.n_features, self.sparsity_weights
        checks: list[tuple[str, Callable[[], bool], str]] = [
            ("n_features", lambda: _is_int(n) and n >= 1, "an int >= 1"),
            ("d", lambda: _is_int(self.d) and self.d >= 1, "an int >= 1"),
            ("seed", lambda: _is_int(self.seed) and self.seed >= 0, "an int >= 0"),
            ("support_model", lambda: self.support_model in SUPPORT_MODELS,
             f"one of {SUPPORT_MODELS}"),
            ("sparsities",
             lambda: len(self.sparsities) >= 1
             and all(_is_int(s) and 1 <= s <= n for s in self.sparsities),
             f"a non-empty tuple of ints in [1, n_features={n}]"),
            ("sparsity_weights",
             lambda: weights is None or (
                 len(weights) == len(self.sparsities)
                 and all(math.isfinite(w) and w >= 0 for w in weights)
                 and sum(weights) > 0),
             "None or one finite weight >= 0 per entry of sparsities, with a positive "
             "sum (they are normalised)"),
            ("max_frequency", lambda: 0 < self.max_frequency <= 1, "in (0, 1]"),
            ("min_frequency", lambda: 0 < self.min_frequency <= self.max_frequency,
             f"in (0, max_frequency={self.max_frequency}]"),
            ("coefficient_distribution",
             lambda: self.coefficient_distribution in COEFFICIENT_DISTRIBUTIONS,
             f"one of {COEFFICIENT_DISTRIBUTIONS}"),
            # Support is defined as coefficient > 0, so an active one must not be 0.
            ("coefficient_low", lambda: 0 < self.coefficient_low < math.inf,
             "finite and > 0"),
            ("coefficient_high",
             lambda: self.coefficient_low <= self.coefficient_high < math.inf,
             f"finite and >= coefficient_low={self.coefficient_low}"),
            ("noise_std", lambda: 0 <= self.noise_std < math.inf, "finite and >= 0"),
        ]  # fmt: skip
        for field, is_valid, allowed in checks:
            try:
                valid = is_valid()
            except TypeError:  # e.g. a string where a number belongs
                valid = False
            if not valid:
                value = getattr(self, field)
                raise ValueError(
                    f"SyntheticConfig.{field}={value!r} is invalid: must be {allowed}"
                )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def uniform_preset(sparsity: int = 3, **overrides: Any) -> SyntheticConfig:
    """Every sample has exactly ``sparsity`` active features (default n=128, d=42).

    Args:
        sparsity: Active features per sample; frequency is ``sparsity / n_features``.
        **overrides: Other ``SyntheticConfig`` fields.

    Returns:
        The config.
    """
    return SyntheticConfig(sparsities=(sparsity,), **overrides)


def imbalanced_preset(**overrides: Any) -> SyntheticConfig:
    """The GBA paper's imbalanced set: n=128, d=42, half the samples s=3, half s=20.

    Args:
        **overrides: Other ``SyntheticConfig`` fields (e.g. seed, coefficients).

    Returns:
        The config; every feature has frequency ``(3 + 20) / (2 * 128) ~ 0.09``.
    """
    fields = {"n_features": 128, "d": 42, **overrides}
    return SyntheticConfig(sparsities=(3, 20), sparsity_weights=(0.5, 0.5), **fields)


def longtail_preset(
    max_frequency: float = 0.1, min_frequency: float = 1e-3, **overrides: Any
) -> SyntheticConfig:
    """Independent features, frequencies log-spaced from ``max`` to ``min`` (n=128).

    Args:
        max_frequency: Frequency of the most common feature (feature 0).
        min_frequency: Frequency of the rarest feature (the last one).
        **overrides: Other ``SyntheticConfig`` fields.

    Returns:
        The config.
    """
    return SyntheticConfig(
        support_model="independent",
        max_frequency=max_frequency,
        min_frequency=min_frequency,
        **overrides,
    )


class SyntheticFeatureModel:
    """Holds ``V`` (seeded by ``config.seed``) and samples ``(x, H)`` from it.

    Args:
        config: The data model.
    """

    def __init__(self, config: SyntheticConfig) -> None:
        self.config = config
        generator = torch.Generator().manual_seed(config.seed)
        directions = torch.randn(config.n_features, config.d, generator=generator)
        self.feature_directions = directions / directions.norm(dim=1, keepdim=True)
        weights = torch.tensor(
            config.sparsity_weights or [1.0] * len(config.sparsities),
            dtype=torch.float64,
        )
        self._sparsity_weights = weights / weights.sum()
        self._sparsities = torch.tensor(config.sparsities)

    def feature_frequencies(self) -> torch.Tensor:
        """Expected occurrence frequency ``P(H_i > 0)`` of every feature.

        Returns:
            Float64 tensor [n_features].
        """
        n = self.config.n_features
        if self.config.support_model == "independent":
            log_high = math.log(self.config.max_frequency)
            log_low = math.log(self.config.min_frequency)
            return torch.linspace(log_high, log_low, n, dtype=torch.float64).exp()
        mean_sparsity = float((self._sparsity_weights * self._sparsities).sum())
        return torch.full((n,), mean_sparsity / n, dtype=torch.float64)

    def sample_support(
        self, n_samples: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Draw which features are active.

        Args:
            n_samples: Number of rows.
            generator: CPU generator; None uses torch's global RNG.

        Returns:
            Bool tensor [n_samples, n_features].
        """
        if not _is_int(n_samples) or n_samples < 1:
            raise ValueError(f"n_samples must be an int >= 1; got {n_samples!r}")
        n = self.config.n_features
        if self.config.support_model == "independent":
            frequencies = self.feature_frequencies().float()
            return torch.rand(n_samples, n, generator=generator) < frequencies
        component = torch.multinomial(
            self._sparsity_weights, n_samples, replacement=True, generator=generator
        )
        row_sparsity = self._sparsities[component]
        # The top-s_max of i.i.d. uniforms is a uniformly random ordered subset, so its
        # first s entries are a uniform s-subset; scatter (not a threshold) keeps exactly s
        # even when float32 draws tie.
        max_sparsity = int(self._sparsities.max())
        chosen = (
            torch.rand(n_samples, n, generator=generator)
            .topk(max_sparsity, dim=1)
            .indices
        )
        keep = torch.arange(max_sparsity) < row_sparsity[:, None]
        return torch.zeros(n_samples, n, dtype=torch.bool).scatter_(1, chosen, keep)

    def sample(
        self, n_samples: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``x = H V + noise``.

        Args:
            n_samples: Number of rows.
            generator: CPU generator; None uses torch's global RNG.

        Returns:
            ``(x [n_samples, d], coefficients H [n_samples, n_features])``, float32;
            ``H`` excludes the noise.
        """
        cfg = self.config
        support = self.sample_support(n_samples, generator)
        shape = support.shape
        if cfg.coefficient_distribution == "uniform":
            width = cfg.coefficient_high - cfg.coefficient_low
            values = cfg.coefficient_low + width * torch.rand(
                shape, generator=generator
            )
        elif cfg.coefficient_distribution == "exponential":
            # Clamped so an active coefficient is never exactly 0 (support is H > 0).
            values = torch.empty(shape).exponential_(1.0, generator=generator)
            values = values.clamp_min(torch.finfo(torch.float32).tiny)
        else:
            values = torch.ones(shape)
        coefficients = values * support
        x = coefficients @ self.feature_directions
        if cfg.noise_std > 0:
            x = x + cfg.noise_std * torch.randn(x.shape, generator=generator)
        return x, coefficients

    def batches(self, batch_size: int, seed: int | None = None) -> SyntheticBatchStream:
        """An infinite, resumable stream of ``x`` batches (CPU; trainers move them).

        Args:
            batch_size: Rows per batch.
            seed: Stream seed; None uses ``config.seed``.

        Returns:
            The stream (an iterator of float32 tensors [batch_size, d]).
        """
        stream_seed = self.config.seed if seed is None else seed
        return SyntheticBatchStream(self, batch_size, stream_seed)


def _mix64(value: int) -> int:
    # SplitMix64 finaliser: decorrelates nearby (seed, batch index) pairs.
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


class SyntheticBatchStream(Iterator[torch.Tensor]):
    """Infinite iterator of ``x`` batches, reconstructible from ``(seed, batches_consumed)``.

    Batch ``k`` is drawn from its own generator seeded by a hash of ``(seed, k)``, so
    skipping or resuming costs nothing and never replays earlier batches.

    Args:
        model: The data model to sample from.
        batch_size: Rows per batch.
        seed: Stream seed.
    """

    def __init__(
        self, model: SyntheticFeatureModel, batch_size: int, seed: int
    ) -> None:
        for name, value, low in (("batch_size", batch_size, 1), ("seed", seed, 0)):
            if not _is_int(value) or value < low:
                raise ValueError(f"{name} must be an int >= {low}; got {value!r}")
        self.model = model
        self.batch_size = batch_size
        self.seed = seed
        self.batches_consumed = 0

    def __next__(self) -> torch.Tensor:
        batch_seed = _mix64(_mix64(self.seed) ^ self.batches_consumed)
        generator = torch.Generator().manual_seed(batch_seed)
        x, _ = self.model.sample(self.batch_size, generator)
        self.batches_consumed += 1
        return x

    def skip(self, n_batches: int) -> None:
        """Advance past ``n_batches`` batches without drawing them.

        Args:
            n_batches: How many batches to skip (>= 0).
        """
        if not _is_int(n_batches) or n_batches < 0:
            raise ValueError(f"n_batches must be an int >= 0; got {n_batches!r}")
        self.batches_consumed += n_batches

    def state_dict(self) -> dict[str, int]:
        """Returns: ``{"seed", "batch_size", "batches_consumed"}``."""
        keys = ("seed", "batch_size", "batches_consumed")
        return {key: getattr(self, key) for key in keys}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume: the next batch is the one that followed when ``state`` was saved.

        Args:
            state: From ``state_dict()``; its batch_size must match this stream's.
        """
        if state["batch_size"] != self.batch_size:
            raise ValueError(
                f"state batch_size={state['batch_size']} does not match this "
                f"stream's batch_size={self.batch_size}"
            )
        self.seed, self.batches_consumed = int(state["seed"]), 0
        self.skip(int(state["batches_consumed"]))
