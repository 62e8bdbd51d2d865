"""The recovery suite's data families, each a ``sae_lens.synthetic.SyntheticModel``.

Every family has unit-norm random feature directions (no orthogonalisation), active
magnitudes ``relu(N(1, 0.25^2))`` unless stated, and a data seed equal to the run's
seed (so seed i of uniform, heavy_tail and noise shares one dictionary, and differs
from seed j). Families the default may be tuned on ("tune") and those it is only
confirmed on ("confirm"):

==============  =======  ============================================================
family          split    data
==============  =======  ============================================================
uniform         tune     n 128, d 42, every feature fires independently at p = 3/128
imbalanced      tune     n 128, d 42, exactly 3 (half the samples) or 20 active
                         features, f = 23/256 ~ 0.09 (the GBA paper's set)
longtail        tune     n 256, d 48, Zipfian p (exponent 0.5) from 0.1 to 0.002
                         (1.7 decades, rarest third 0.002-0.0034), dictionary bias 1
heavy_tail      confirm  uniform's support, magnitudes LogNormal (sigma 1, mean 1)
noise           confirm  uniform plus isotropic Gaussian noise at SNR 10 (power)
hierarchical    confirm  n 128, d 42, Zipfian p (0.5, 0.2 to 0.01); 16 parents with
                         4 children each that fire only with their parent (SAELens
                         HierarchyConfig, compensated probabilities), 48 free
                         features, dictionary bias 1
low_d           confirm  n 256, d 14 < sqrt(n) = 16, every feature at p = 2/256
==============  =======  ============================================================
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from sae_lens.synthetic import (
    ActivationGenerator,
    ConstantFiringProbabilityConfig,
    FiringProbabilityConfig,
    HierarchyConfig,
    SyntheticModel,
    SyntheticModelConfig,
    ZipfianFiringProbabilityConfig,
)
from sae_lens.util import temporary_seed

from sae_gba_evals.suite.layers import (
    FixedSparsityActivationGenerator,
    NoisyFeatureDictionary,
    lognormal_magnitudes,
)

SAELENS = "sae_lens.synthetic"
STD_MAGNITUDE = 0.25
LOGNORMAL_SIGMA = 1.0
NOISE_SNR = 10.0
IMBALANCED_SPARSITIES = (3, 20)


def _model(
    seed: int,
    n: int,
    d: int,
    firing: FiringProbabilityConfig,
    bias: bool | float = False,
    hierarchy: HierarchyConfig | None = None,
) -> SyntheticModel:
    cfg = SyntheticModelConfig(
        num_features=n,
        hidden_dim=d,
        firing_probability=firing,
        hierarchy=hierarchy,
        std_firing_magnitudes=STD_MAGNITUDE,
        mean_firing_magnitudes=1.0,
        bias=bias,
        seed=seed,
    )
    return SyntheticModel(cfg)


def uniform(seed: int, n: int = 128, d: int = 42) -> SyntheticModel:
    """Every feature independent at p = 3 / n."""
    return _model(seed, n, d, ConstantFiringProbabilityConfig(probability=3 / n))


def imbalanced(seed: int, n: int = 128, d: int = 42) -> SyntheticModel:
    """Exactly 3 or 20 active features per sample, each half the time."""
    model = _model(seed, n, d, ConstantFiringProbabilityConfig(probability=23 / 256))
    model.activation_generator = FixedSparsityActivationGenerator(
        n, IMBALANCED_SPARSITIES, (0.5, 0.5), 1.0, STD_MAGNITUDE
    )
    return model


def longtail(seed: int, n: int = 256, d: int = 48) -> SyntheticModel:
    """Zipfian frequencies from 0.1 down to 0.002, with a dictionary bias of norm 1."""
    firing = ZipfianFiringProbabilityConfig(exponent=0.5, max_prob=0.1, min_prob=0.002)
    return _model(seed, n, d, firing, bias=1.0)


def heavy_tail(seed: int, n: int = 128, d: int = 42) -> SyntheticModel:
    """Uniform's support with LogNormal(sigma 1, mean 1) active magnitudes."""
    model = uniform(seed, n, d)
    base = model.activation_generator
    model.activation_generator = ActivationGenerator(
        n,
        base.firing_probabilities,
        base.std_firing_magnitudes,
        base.mean_firing_magnitudes,
        modify_activations=lognormal_magnitudes(LOGNORMAL_SIGMA),
    )
    return model


def noise(seed: int, n: int = 128, d: int = 42) -> SyntheticModel:
    """Uniform plus isotropic Gaussian noise at SNR 10 (signal over noise power)."""
    model = uniform(seed, n, d)
    with temporary_seed(seed):
        model.feature_dict = NoisyFeatureDictionary(
            model.feature_dict, model.activation_generator, NOISE_SNR
        )
    return model


def hierarchical(seed: int, n: int = 128, d: int = 42) -> SyntheticModel:
    """16 parents x 4 children (children fire only with their parent), 48 free."""
    firing = ZipfianFiringProbabilityConfig(exponent=0.5, max_prob=0.2, min_prob=0.01)
    tree = HierarchyConfig(
        total_root_nodes=16,
        branching_factor=4,
        max_depth=1,
        compensate_probabilities=True,
    )
    return _model(seed, n, d, firing, bias=1.0, hierarchy=tree)


def low_d(seed: int, n: int = 256, d: int = 14) -> SyntheticModel:
    """d = 14 below sqrt(n) = 16, every feature independent at p = 2 / n."""
    return _model(seed, n, d, ConstantFiringProbabilityConfig(probability=2 / n))


@dataclass(frozen=True)
class Family:
    """One data family of the suite.

    Args:
        name: its key.
        split: "tune" (a default may be chosen on it) or "confirm" (only checked).
        build: ``build(seed, **sizes)`` returns the model.
        built_by: "sae_lens.synthetic", or "own layer: " and why.
        description: the data in one line.
        settings: its constants, for the JSON.
    """

    name: str
    split: Literal["tune", "confirm"]
    build: Callable[..., SyntheticModel]
    built_by: str
    description: str
    settings: dict[str, Any] = field(default_factory=dict)


_MAGNITUDES = {"mean": 1.0, "std": STD_MAGNITUDE, "distribution": "relu(normal)"}
FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family("uniform", "tune", uniform, SAELENS,
               "n 128, d 42, every feature independent at p = 3/128",
               {"n": 128, "d": 42, "p": 3 / 128, "bias": 0.0,
                "magnitudes": _MAGNITUDES}),
        Family("imbalanced", "tune", imbalanced,
               "own layer: SAELens fires features independently and cannot fix "
               "the number active per sample (FixedSparsityActivationGenerator)",
               "n 128, d 42, exactly 3 or 20 active features per sample (1:1), "
               "f = 23/256",
               {"n": 128, "d": 42, "sparsities": list(IMBALANCED_SPARSITIES),
                "weights": [0.5, 0.5], "bias": 0.0, "magnitudes": _MAGNITUDES}),
        Family("longtail", "tune", longtail, SAELENS,
               "n 256, d 48, Zipfian p (exponent 0.5) from 0.1 to 0.002, bias 1",
               {"n": 256, "d": 48, "zipf_exponent": 0.5, "max_prob": 0.1,
                "min_prob": 0.002, "bias": 1.0, "magnitudes": _MAGNITUDES}),
        Family("heavy_tail", "confirm", heavy_tail,
               "own layer: SAELens draws magnitudes from a per-feature normal; a "
               "modifier (its modify_activations hook) redraws them log-normal",
               "uniform's support, active magnitudes LogNormal(sigma 1, mean 1)",
               {"n": 128, "d": 42, "p": 3 / 128, "bias": 0.0,
                "magnitudes": {"distribution": "lognormal", "mean": 1.0,
                               "sigma_log": LOGNORMAL_SIGMA}}),
        Family("noise", "confirm", noise,
               "own layer: SAELens has no additive noise; NoisyFeatureDictionary "
               "adds it to the FeatureDictionary's output",
               f"uniform plus isotropic Gaussian noise at SNR {NOISE_SNR:g}",
               {"n": 128, "d": 42, "p": 3 / 128, "bias": 0.0,
                "snr": NOISE_SNR, "snr_definition": "E|HV|^2 / E|noise|^2",
                "magnitudes": _MAGNITUDES}),
        Family("hierarchical", "confirm", hierarchical, SAELENS,
               "n 128, d 42, Zipfian p (0.5, 0.2 to 0.01), 16 parents x 4 "
               "children that fire only with their parent, 48 free, bias 1",
               {"n": 128, "d": 42, "zipf_exponent": 0.5, "max_prob": 0.2,
                "min_prob": 0.01, "roots": 16, "branching": 4,
                "compensate_probabilities": True, "bias": 1.0,
                "magnitudes": _MAGNITUDES}),
        Family("low_d", "confirm", low_d, SAELENS,
               "n 256, d 14 < sqrt(n) = 16, every feature independent at p = 2/256",
               {"n": 256, "d": 14, "p": 2 / 256, "bias": 0.0,
                "magnitudes": _MAGNITUDES}),
    )
}  # fmt: skip


def true_frequencies(model: SyntheticModel, samples: int = 100_000) -> torch.Tensor:
    """Each feature's measured firing frequency (hierarchy and mixes included).

    Args:
        model: the data model.
        samples: draws, under a fixed seed.

    Returns:
        Float64 tensor [n].
    """
    counts = torch.zeros(model.cfg.num_features, dtype=torch.float64)
    with temporary_seed(12_345):
        for chunk in range(0, samples, 10_000):
            acts = model.activation_generator.sample(min(10_000, samples - chunk))
            counts += (acts > 0).sum(0)
    return counts / samples


def hierarchy_groups(model: SyntheticModel) -> dict[str, list[int]] | None:
    """Feature indices of the hierarchy's parents and children (None: no hierarchy)."""
    if model.hierarchy is None:
        return None
    parents, children = [], []
    stack = [(root, False) for root in model.hierarchy.roots]
    while stack:
        node, is_child = stack.pop()
        if node.children and node.feature_index is not None:
            parents.append(node.feature_index)
        if is_child and node.feature_index is not None:
            children.append(node.feature_index)
        stack.extend((child, True) for child in node.children)
    return {"parents": sorted(parents), "children": sorted(children)}
