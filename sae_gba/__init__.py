"""sae-gba: Group Bias Adaptation and Weighted SAEs for SAELens.

Importing the package makes its architectures (``"gba"``, ``"weighted_<base>"``)
known to SAELens: at once when SAELens is already imported, otherwise as soon as
SAELens and the module that imported it have finished loading. The package itself
imports nothing heavy, so the ``sae-gba`` command starts in a fraction of a second;
its public classes and functions load on first use (``sae_gba.GBATrainingSAE``,
``sae_gba.WeightedTopKTrainingSAEConfig``, ``sae_gba.load_sae``).
"""

import importlib
import importlib.abc
import importlib.util
import sys
from typing import Any

_GBA = "sae_gba.gba_sae"
_GBA_CONFIG = "sae_gba.gba_config"
_WEIGHTED = "sae_gba.weighted_sae"
# Public name -> the module that defines it (imported on first use).
_EXPORTS = {
    "GBASAE": _GBA,
    "GBASAEConfig": _GBA_CONFIG,
    "GBATrainingSAE": _GBA,
    "GBATrainingSAEConfig": _GBA_CONFIG,
    "WeightedBatchTopKTrainingSAE": _WEIGHTED,
    "WeightedBatchTopKTrainingSAEConfig": _WEIGHTED,
    "WeightedGBATrainingSAE": _WEIGHTED,
    "WeightedGBATrainingSAEConfig": _WEIGHTED,
    "WeightedJumpReLUTrainingSAE": _WEIGHTED,
    "WeightedJumpReLUTrainingSAEConfig": _WEIGHTED,
    "WeightedStandardTrainingSAE": _WEIGHTED,
    "WeightedStandardTrainingSAEConfig": _WEIGHTED,
    "WeightedTopKTrainingSAE": _WEIGHTED,
    "WeightedTopKTrainingSAEConfig": _WEIGHTED,
    "weighted_config": _WEIGHTED,
    "load_sae": "sae_gba.loading",
    "register_architectures": "sae_gba.registry",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'sae_gba' has no attribute {name!r}")


def _register() -> None:
    from sae_gba.registry import register_architectures

    register_architectures()


class _RegisterWhenReady(importlib.abc.MetaPathFinder):
    """Registers the architectures once SAELens is loaded and no module of ours is
    half-loaded (registering imports our classes, which may be what is loading).

    SAELens has no plugin entry points, so registration has to ride on an import.
    """

    def __init__(self) -> None:
        self.busy = False  # inside our own find_spec call
        self.loading = 0  # sae_gba modules executing now
        self.sae_lens_loaded = False

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        ours = name.startswith("sae_gba.")
        if self.busy or not (ours or name == "sae_lens"):
            return None
        self.busy = True
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self.busy = False
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module: Any) -> None:
            self.loading += ours
            try:
                exec_module(module)
            finally:
                self.loading -= ours
            self.sae_lens_loaded |= name == "sae_lens"
            if self.sae_lens_loaded and not self.loading and self in sys.meta_path:
                sys.meta_path.remove(self)
                _register()

        spec.loader.exec_module = exec_then_register  # type: ignore[method-assign]
        return spec


if "sae_lens" in sys.modules:
    _register()
elif not any(isinstance(f, _RegisterWhenReady) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWhenReady())

__all__ = sorted(_EXPORTS)
