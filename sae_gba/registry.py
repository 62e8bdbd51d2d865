"""Registers sae-gba's architectures with SAELens, once, whatever the import order."""

from typing import Any

from sae_lens.registry import (
    SAE_CLASS_REGISTRY,
    SAE_TRAINING_CLASS_REGISTRY,
    register_sae_class,
    register_sae_training_class,
)

from sae_gba.gba_sae import GBASAE, GBASAEConfig, GBATrainingSAE, GBATrainingSAEConfig
from sae_gba.weighted_sae import WEIGHTED_CLASSES

INFERENCE_CLASSES: dict[str, tuple[type[Any], type[Any]]] = {
    "gba": (GBASAE, GBASAEConfig),
}
# The weighted_<base> architectures are training-only: they export as their base.
TRAINING_CLASSES: dict[str, tuple[type[Any], type[Any]]] = {
    "gba": (GBATrainingSAE, GBATrainingSAEConfig),
    **{f"weighted_{base}": classes for base, classes in WEIGHTED_CLASSES.items()},
}


def register_architectures() -> None:
    """Add the plugin's architectures to SAELens's registries (idempotent)."""
    for name, (sae_class, config_class) in INFERENCE_CLASSES.items():
        if name not in SAE_CLASS_REGISTRY:
            register_sae_class(name, sae_class, config_class)
    for name, (sae_class, config_class) in TRAINING_CLASSES.items():
        if name not in SAE_TRAINING_CLASS_REGISTRY:
            register_sae_training_class(name, sae_class, config_class)
