"""``sae_gba/__init__.py``: the public names, loaded on first use, and light to import."""

import subprocess
import sys

import pytest

import sae_gba
from sae_gba import gba_sae, loading, registry, weighted_sae

SCRIPT = """
import sys, sae_gba
light = not any(m in sys.modules for m in ("torch", "sae_lens", "transformers"))
names = [n for n in sae_gba.__all__ if getattr(sae_gba, n) is not None]
print(light, len(names))
"""


def test_import__loads_no_heavy_library_and_every_public_name_resolves():
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True
    )
    assert done.stdout.split() == ["True", str(len(sae_gba.__all__))]


def test_public_names__are_the_defining_modules_objects():
    assert sae_gba.load_sae is loading.load_sae
    assert sae_gba.GBATrainingSAEConfig is gba_sae.GBATrainingSAEConfig
    assert sae_gba.register_architectures is registry.register_architectures
    for base, (sae_class, config_class) in weighted_sae.WEIGHTED_CLASSES.items():
        assert getattr(sae_gba, sae_class.__name__) is sae_class, base
        assert getattr(sae_gba, config_class.__name__) is config_class, base
    assert sae_gba.weighted_config is weighted_sae.weighted_config


def test_unknown_name__raises_attribute_error_naming_it():
    with pytest.raises(AttributeError, match="has no attribute 'NoSuchThing'"):
        sae_gba.NoSuchThing  # noqa: B018
