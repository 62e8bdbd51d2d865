"""Thin layers over ``sae_lens.synthetic`` for what its ``SyntheticModel`` cannot express.

- :class:`FixedSparsityActivationGenerator`: every sample has exactly ``s`` active
  features, ``s`` drawn per sample from a mix (the GBA paper's s = 3 / s = 20 set).
  SAELens fires every feature independently, so a per-sample sparsity mix needs its
  own support sampler; magnitudes are drawn as SAELens draws them.
- :func:`lognormal_magnitudes`: an ``ActivationGenerator`` modifier (SAELens's own
  hook) that redraws every active coefficient from a log-normal of mean 1. SAELens
  draws magnitudes from a per-feature normal, which cannot be heavy-tailed.
- :class:`NoisyFeatureDictionary`: a ``FeatureDictionary`` that adds isotropic
  Gaussian noise to every hidden activation, at a stated signal-to-noise ratio.

All draw from torch's global RNG, as SAELens's generators do, so seeding the global
RNG before training makes every method see the same stream.
"""

import math
from collections.abc import Callable

import torch
from sae_lens.synthetic import ActivationGenerator, FeatureDictionary
from sae_lens.util import temporary_seed

from sae_gba.synthetic import SyntheticConfig, SyntheticFeatureModel


class FixedSparsityActivationGenerator(ActivationGenerator):
    """Exactly ``s`` uniformly chosen active features per sample, ``s`` from a mix.

    Every feature fires with frequency ``sum_j w_j s_j / n``. Support sampling is
    ``sae_gba.synthetic``'s; active magnitudes are ``relu(mean + std * N(0, 1))``
    like SAELens's.

    Args:
        num_features: n.
        sparsities: the per-sample sparsities s_j.
        weights: their probabilities (normalised).
        mean_magnitude: mean of an active coefficient.
        std_magnitude: its standard deviation.
    """

    def __init__(
        self,
        num_features: int,
        sparsities: tuple[int, ...],
        weights: tuple[float, ...],
        mean_magnitude: float = 1.0,
        std_magnitude: float = 0.0,
    ) -> None:
        support = SyntheticConfig(  # only its support sampler is used, so d = 1
            n_features=num_features,
            d=1,
            sparsities=sparsities,
            sparsity_weights=weights,
        )
        self.support_model = SyntheticFeatureModel(support)
        frequencies = self.support_model.feature_frequencies().float()
        super().__init__(
            num_features,
            firing_probabilities=frequencies,
            std_firing_magnitudes=std_magnitude,
            mean_firing_magnitudes=mean_magnitude,
        )

    @torch.no_grad()
    def sample(self, batch_size: int) -> torch.Tensor:
        """Feature activations [batch_size, num_features] (non-negative)."""
        rows, features = self.support_model.sample_support(batch_size).nonzero(
            as_tuple=True
        )
        mean = self.mean_firing_magnitudes[features]
        std = self.std_firing_magnitudes[features]
        values = (mean + std * torch.randn(features.shape[0])).relu()
        acts = torch.zeros(batch_size, self.num_features)
        acts[rows, features] = values
        return acts


def lognormal_magnitudes(sigma: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """A modifier that replaces each active coefficient by a LogNormal draw of mean 1.

    ``log c ~ N(-sigma^2 / 2, sigma^2)``: mean 1, median ``exp(-sigma^2 / 2)``,
    99th percentile ``exp(-sigma^2 / 2 + 2.326 sigma)``.

    Args:
        sigma: standard deviation of ``log c`` (> 0).

    Returns:
        The modifier, for ``ActivationGenerator(modify_activations=...)``.
    """
    if not sigma > 0:
        raise ValueError(f"sigma={sigma!r} is invalid: must be > 0")

    def modify(acts: torch.Tensor) -> torch.Tensor:
        draws = torch.exp(sigma * torch.randn_like(acts) - sigma**2 / 2)
        return torch.where(acts > 0, draws, torch.zeros_like(acts))

    return modify


class NoisyFeatureDictionary(FeatureDictionary):
    """``base``'s map plus isotropic Gaussian noise of a stated SNR.

    SNR is ``E|H V|^2 / E|noise|^2`` (the bias excluded); the signal power is measured
    on ``calibration_samples`` draws of ``generator`` under a fixed seed.

    Args:
        base: the noiseless dictionary (its vectors and bias are shared).
        generator: the activation generator the signal comes from.
        snr: signal-to-noise power ratio (> 0).
        calibration_samples: draws used to measure the signal power.
    """

    def __init__(
        self,
        base: FeatureDictionary,
        generator: ActivationGenerator,
        snr: float,
        calibration_samples: int = 100_000,
    ) -> None:
        if not snr > 0:
            raise ValueError(f"snr={snr!r} is invalid: must be > 0")
        super().__init__(base.num_features, base.hidden_dim, initializer=None)
        self.feature_vectors, self.bias = base.feature_vectors, base.bias
        with temporary_seed(0), torch.no_grad():
            signal = generator.sample(calibration_samples) @ base.feature_vectors
        power = float(signal.pow(2).sum(-1).mean())
        self.snr = snr
        self.noise_std = math.sqrt(power / (base.hidden_dim * snr))

    def forward(self, feature_activations: torch.Tensor) -> torch.Tensor:
        """Hidden activations ``H V + bias + noise``."""
        clean = super().forward(feature_activations)
        return clean + self.noise_std * torch.randn_like(clean)
