"""SAE methods on synthetic data, all trained by SAELens's own ``SAETrainer``.

Every method sees the same batches (same data seed) and the same width, steps, batch
size and learning rate; only the architecture and its sparsity setting differ.
"""

import contextlib
import io
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAEConfig
from sae_lens.saes.sae import TrainingSAE
from sae_lens.saes.standard_sae import StandardTrainingSAEConfig
from sae_lens.saes.topk_sae import TopKTrainingSAEConfig

from sae_gba.gba_sae import GBATrainingSAEConfig
from sae_gba.recovery import best_match_cosine
from sae_gba.synthetic import SyntheticConfig, SyntheticFeatureModel
from sae_gba.training import make_trainer

METHODS = (
    "gba",
    "gba_frozen_scale",
    "gba_wrong_range",
    "ba",
    "topk",
    "batchtopk",
    "l1",
)


@dataclass(frozen=True)
class RunSpec:
    """One training run on synthetic data.

    Args:
        method: one of ``METHODS``.
        data: the synthetic data model.
        width: number of SAE neurons.
        steps: training steps.
        batch_size: samples per step.
        lr: Adam learning rate.
        seed: SAE initialisation and data-order seed.
        k: TopK / BatchTopK sparsity.
        l1_coefficient: L1 penalty for ``l1``.
        gba: extra ``GBATrainingSAEConfig`` fields (e.g. targets, interval).
        normalize_activations: SAELens input normalisation.
        planted: start the first ``n_features`` neurons on the true features, to
            test whether they are a stable point of the method's training.
    """

    method: str
    data: SyntheticConfig
    width: int = 512
    steps: int = 3000
    batch_size: int = 512
    lr: float = 1e-3
    seed: int = 0
    k: int | None = None
    l1_coefficient: float = 1.0
    gba: dict[str, Any] = field(default_factory=dict)
    normalize_activations: str = "none"
    planted: bool = False

    def with_(self, **changes: Any) -> "RunSpec":
        return replace(self, **changes)


def feature_frequency(data: SyntheticConfig) -> float:
    """Mean feature frequency of the data model."""
    return SyntheticFeatureModel(data).feature_frequencies().mean().item()


def build_sae(spec: RunSpec) -> TrainingSAE[Any]:
    """The SAELens training SAE for a run (GBA through the plugin, others stock)."""
    d = spec.data.d
    common = {
        "d_in": d,
        "d_sae": spec.width,
        "normalize_activations": spec.normalize_activations,
    }
    f = feature_frequency(spec.data)
    if spec.method == "gba":
        cfg: Any = GBATrainingSAEConfig(**common, **spec.gba)
    elif spec.method == "gba_frozen_scale":
        # The theory's regime: output scales stay at their small initial value.
        gba = {"train_output_scale": False, **spec.gba}
        cfg = GBATrainingSAEConfig(**common, **gba)
    elif spec.method == "gba_wrong_range":
        # Every target at least a decade below the features' frequency.
        gba = {"high_target_freq": f / 10, "low_target_freq": f / 1000, **spec.gba}
        cfg = GBATrainingSAEConfig(**common, **gba)
    elif spec.method == "ba":
        cfg = GBATrainingSAEConfig(
            **common, **{"n_groups": 1, "high_target_freq": f, **spec.gba}
        )
    elif spec.method in ("topk", "batchtopk"):
        if spec.k is None:
            raise ValueError(f"RunSpec.k is required for method={spec.method!r}")
        config_class = (
            TopKTrainingSAEConfig
            if spec.method == "topk"
            else BatchTopKTrainingSAEConfig
        )
        cfg = config_class(**common, k=spec.k)
    elif spec.method == "l1":
        cfg = StandardTrainingSAEConfig(**common, l1_coefficient=spec.l1_coefficient)
    else:
        raise ValueError(
            f"RunSpec.method={spec.method!r} is invalid: must be one of {METHODS}"
        )
    return TrainingSAE.from_dict(cfg.to_dict())


def dictionary(sae: TrainingSAE[Any]) -> torch.Tensor:
    """The learned dictionary: decoder rows (for GBA the tied directions)."""
    return sae.W_dec.detach().float()


@torch.no_grad()
def plant_features(sae: TrainingSAE[Any], features: torch.Tensor) -> torch.Tensor:
    """Put the true features in evenly spaced neurons' encoder and decoder rows.

    Spacing them (rather than using the first neurons) spreads them over GBA's
    contiguous groups, so each target frequency holds some of them.

    Args:
        sae: a training SAE with ``d_sae >= n_features``.
        features: unit-norm true features [n_features, d_in].

    Returns:
        The indices of the planted neurons.
    """
    n_features = features.shape[0]
    neurons = torch.arange(n_features) * (sae.cfg.d_sae // n_features)
    if hasattr(sae, "directions"):
        sae.directions[neurons] = features
    else:
        sae.W_dec[neurons] = features
        sae.W_enc[:, neurons] = features.T
    return neurons


# The SAE's initial weights must not share a random stream with the true features:
# ``torch.manual_seed(s)`` then ``randn(M, d)`` reproduces ``V`` of a data model with
# seed ``s`` in its first n rows, so a GBA SAE would *start* on the true features.
INIT_SEED_OFFSET = 1_000_003


def train(
    spec: RunSpec, probe: "Probe | None" = None
) -> tuple[TrainingSAE[Any], SyntheticFeatureModel]:
    """Train one run quietly; returns the SAE and the data model.

    Args:
        spec: the run.
        probe: optional recorder of FRR during training.
    """
    model = SyntheticFeatureModel(spec.data)
    torch.manual_seed(spec.seed + INIT_SEED_OFFSET)
    sae = build_sae(spec)
    if spec.planted:
        plant_features(sae, model.feature_directions)
    stream: Iterator[torch.Tensor] = model.batches(spec.batch_size, seed=spec.seed)
    if probe is not None:
        stream = probe.wrap(stream, sae, model)
    trainer = make_trainer(
        sae,
        stream,
        total_tokens=spec.steps * spec.batch_size,
        batch_size=spec.batch_size,
        lr=spec.lr,
    )
    with contextlib.redirect_stderr(io.StringIO()):
        trainer.fit()
    return sae, model


class Probe:
    """Records recovery (and, after step 0, explained variance) during training.

    Each record is ``{"step", "frr@0.8", "frr@0.9", "explained_variance"}``; the
    variance is measured on a fixed sample of 4,096 fresh inputs.

    Args:
        every: steps between records.
    """

    def __init__(self, every: int) -> None:
        self.every = every
        self.records: list[dict[str, float | None]] = []

    def wrap(
        self,
        stream: Iterator[torch.Tensor],
        sae: TrainingSAE[Any],
        model: SyntheticFeatureModel,
    ) -> Iterator[torch.Tensor]:
        """The stream, recording before every ``every``-th batch."""
        x, _ = model.sample(4096, torch.Generator().manual_seed(10_009))
        for step, batch in enumerate(stream):
            if step % self.every == 0:
                best = best_match_cosine(dictionary(sae), model.feature_directions)
                self.records.append(
                    {
                        "step": step,
                        "frr@0.8": (best > 0.8).float().mean().item(),
                        "frr@0.9": (best > 0.9).float().mean().item(),
                        # GBA sets its input scale from the first batch.
                        "explained_variance": (
                            explained_variance(sae, x) if step else None
                        ),
                    }
                )
            yield batch


@torch.no_grad()
def explained_variance(sae: TrainingSAE[Any], x: torch.Tensor) -> float:
    """1 - |x - x_hat|^2 / |x - mean x|^2 over a sample."""
    x_hat = sae.decode(sae.encode(x))
    return (1 - (x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()


@torch.no_grad()
def measure(
    sae: TrainingSAE[Any], model: SyntheticFeatureModel, n_eval: int = 20_000
) -> dict[str, Any]:
    """Recovery and activity of a trained SAE on fresh samples."""
    best = best_match_cosine(dictionary(sae), model.feature_directions)
    x, _ = model.sample(n_eval, torch.Generator().manual_seed(10_007))
    acts = sae.encode(x)
    return {
        "best_match": best,
        "frr@0.8": (best > 0.8).float().mean().item(),
        "frr@0.9": (best > 0.9).float().mean().item(),
        "l0": (acts > 0).float().sum(-1).mean().item(),
        "mean_activation": acts.mean(0),
        "explained_variance": explained_variance(sae, x),
    }
