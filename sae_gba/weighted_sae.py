"""Weighted SAEs (WSAE, seeds 002 and 003) as SAELens architectures ``weighted_<base>``.

The reconstruction term of the base architecture, ``|x - x_hat|^2`` summed over input
dimensions, becomes ``|Gamma (x - x_hat)|^2 = sum_i gamma_i^2 (x_i - x_hat_i)^2``; every
other term of the base is kept as it is (L1, TopK's aux-k on the unweighted residual,
JumpReLU's L0 and pre-activation losses, GBA's bias adaptation). Bases: ``standard``,
``topk``, ``batchtopk``, ``jumprelu`` and ``gba``.

Both SAELens's ``TrainingSAE.training_forward_pass`` and GBA's measure reconstruction
through the ``mse_loss_fn(preds, target)`` hook (per-dimension squared errors); the
weighted classes replace that hook, so the weights apply exactly where each base
measures its error (raw inputs for the SAELens bases, GBA's normalised inputs for GBA).

Weights, in order of precedence:
- ``set_input_weights(tensor)`` or ``weights_path`` (a safetensors file holding a
  ``"gamma"`` tensor of shape ``(d_in,)``): fixed from the start, rescaled to
  ``mean(gamma^2) = 1``.
- Otherwise estimated: the first ``weight_estimation_batches`` training batches are
  trained with weights 1 while the per-dimension variance of the tensor the loss
  compares against is accumulated; after the last of them ``gamma = var^alpha``
  (``input_weights``) is fixed and weights every later batch.

The weights and the running statistics are buffers: checkpoints carry them and a
resumed run continues exactly. The exported inference SAE is an ordinary SAE of the
base's inference architecture (``weighted_gba`` and ``weighted_batchtopk`` export as
``jumprelu``); the weights used are written beside it in ``input_weights.safetensors``
and described in ``cfg.json``'s metadata (``input_weights_source``).
"""

import copy
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from sae_lens.saes.batchtopk_sae import (
    BatchTopKTrainingSAE,
    BatchTopKTrainingSAEConfig,
)
from sae_lens.saes.jumprelu_sae import (
    JumpReLUSAEConfig,
    JumpReLUTrainingSAE,
    JumpReLUTrainingSAEConfig,
)
from sae_lens.saes.sae import SAEConfig, TrainingSAE, TrainingSAEConfig
from sae_lens.saes.standard_sae import (
    StandardSAEConfig,
    StandardTrainingSAE,
    StandardTrainingSAEConfig,
)
from sae_lens.saes.topk_sae import TopKSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig

from sae_gba.gba_sae import GBATrainingSAE, GBATrainingSAEConfig
from sae_gba.weighted_mixins import (  # noqa: F401 (public names, defined there)
    ESTIMATED,
    FROM_FILE,
    FROM_TENSOR,
    PENDING,
    SOURCE_NAMES,
    WEIGHT_BUFFERS,
    WeightedConfigMixin,
    WeightedTrainingMixin,
)
from sae_gba.wsae_weights import (  # noqa: F401 (public names, defined there)
    INPUT_WEIGHTS_FILENAME,
    WEIGHTS_TENSOR_NAME,
    check_input_weights,
    input_weights,
    load_input_weights,
)

# ------------------------------------------------------------- the five architectures


@dataclass
class WeightedStandardTrainingSAEConfig(WeightedConfigMixin, StandardTrainingSAEConfig):
    """``standard`` (ReLU + L1) on the weighted loss; exports as ``standard``."""

    weighted_base: ClassVar[str] = "standard"
    inference_config: ClassVar[type[SAEConfig]] = StandardSAEConfig


@dataclass
class WeightedTopKTrainingSAEConfig(WeightedConfigMixin, TopKTrainingSAEConfig):
    """``topk`` on the weighted loss (aux-k unweighted); exports as ``topk``."""

    weighted_base: ClassVar[str] = "topk"
    inference_config: ClassVar[type[SAEConfig]] = TopKSAEConfig


@dataclass
class WeightedBatchTopKTrainingSAEConfig(
    WeightedConfigMixin, BatchTopKTrainingSAEConfig
):
    """``batchtopk`` on the weighted loss; exports as ``jumprelu`` like batchtopk."""

    weighted_base: ClassVar[str] = "batchtopk"
    inference_config: ClassVar[type[SAEConfig]] = JumpReLUSAEConfig


@dataclass
class WeightedJumpReLUTrainingSAEConfig(WeightedConfigMixin, JumpReLUTrainingSAEConfig):
    """``jumprelu`` on the weighted loss (L0 loss kept); exports as ``jumprelu``."""

    weighted_base: ClassVar[str] = "jumprelu"
    inference_config: ClassVar[type[SAEConfig]] = JumpReLUSAEConfig


@dataclass
class WeightedGBATrainingSAEConfig(WeightedConfigMixin, GBATrainingSAEConfig):
    """``gba`` on the weighted loss (bias adaptation kept); exports as ``jumprelu``."""

    weighted_base: ClassVar[str] = "gba"
    inference_config: ClassVar[type[SAEConfig]] = JumpReLUSAEConfig


class WeightedStandardTrainingSAE(WeightedTrainingMixin, StandardTrainingSAE):
    """``weighted_standard`` training SAE."""


class WeightedTopKTrainingSAE(WeightedTrainingMixin, TopKTrainingSAE):
    """``weighted_topk`` training SAE."""


class WeightedBatchTopKTrainingSAE(WeightedTrainingMixin, BatchTopKTrainingSAE):
    """``weighted_batchtopk`` training SAE."""


class WeightedJumpReLUTrainingSAE(WeightedTrainingMixin, JumpReLUTrainingSAE):
    """``weighted_jumprelu`` training SAE."""


class WeightedGBATrainingSAE(WeightedTrainingMixin, GBATrainingSAE):
    """``weighted_gba`` training SAE."""


# base architecture -> (weighted training SAE, weighted training config)
WEIGHTED_CLASSES: dict[str, tuple[type[TrainingSAE[Any]], type[TrainingSAEConfig]]] = {
    "standard": (WeightedStandardTrainingSAE, WeightedStandardTrainingSAEConfig),
    "topk": (WeightedTopKTrainingSAE, WeightedTopKTrainingSAEConfig),
    "batchtopk": (WeightedBatchTopKTrainingSAE, WeightedBatchTopKTrainingSAEConfig),
    "jumprelu": (WeightedJumpReLUTrainingSAE, WeightedJumpReLUTrainingSAEConfig),
    "gba": (WeightedGBATrainingSAE, WeightedGBATrainingSAEConfig),
}


def weighted_config_class(base: str) -> type[TrainingSAEConfig]:
    """The ``weighted_<base>`` training config class, e.g. ``"topk"``.

    Args:
        base: a base architecture name: standard, topk, batchtopk, jumprelu or gba.
    """
    if base not in WEIGHTED_CLASSES:
        raise ValueError(
            f"no weighted version of architecture {base!r}; "
            f"available: {sorted(WEIGHTED_CLASSES)}"
        )
    return WEIGHTED_CLASSES[base][1]


def weighted_config(base_cfg: TrainingSAEConfig, **weight_fields: Any) -> Any:
    """The weighted version of a base training config, with every base field kept.

    Args:
        base_cfg: e.g. a ``TopKTrainingSAEConfig``.
        weight_fields: ``weight_alpha``, ``weight_estimation_batches``, ``weights_path``.
    """
    config_class = weighted_config_class(base_cfg.architecture())
    values = {f.name: getattr(base_cfg, f.name) for f in fields(base_cfg) if f.init}
    values["metadata"] = copy.deepcopy(base_cfg.metadata)
    return config_class(**values, **weight_fields)
