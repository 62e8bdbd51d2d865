"""sae-gba: Group Bias Adaptation and Weighted SAEs for SAELens.

Importing the package registers its architectures (``"gba"``) with SAELens.
"""

from sae_gba.gba_sae import GBASAE, GBASAEConfig, GBATrainingSAE, GBATrainingSAEConfig
from sae_gba.registry import register_architectures

register_architectures()

__all__ = [
    "GBASAE",
    "GBASAEConfig",
    "GBATrainingSAE",
    "GBATrainingSAEConfig",
    "register_architectures",
]
