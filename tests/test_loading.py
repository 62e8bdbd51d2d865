"""Loading SAE folders: plugin architectures, missing and corrupt files."""

import json
import subprocess
import sys

import pytest
import torch
from sae_lens.registry import SAE_CLASS_REGISTRY, SAE_TRAINING_CLASS_REGISTRY

from sae_gba import GBASAE, GBATrainingSAE, GBATrainingSAEConfig
from sae_gba.loading import load_sae


@pytest.fixture
def native_checkpoint(tmp_path):
    sae = GBATrainingSAE(GBATrainingSAEConfig(d_in=8, d_sae=16, n_groups=2))
    with torch.no_grad():
        sae.input_scale.fill_(1.0)
    sae.save_model(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_plain_saelens_without_the_plugin_cannot_read_a_native_gba_folder(
    native_checkpoint,
):
    script = f"from sae_lens import SAE; SAE.load_from_disk({str(native_checkpoint)!r})"
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False
    )
    assert result.returncode != 0 and "KeyError: 'gba'" in result.stderr


def test_load_sae__registers_the_plugin_when_the_folder_needs_it(native_checkpoint):
    saved = SAE_CLASS_REGISTRY.pop("gba"), SAE_TRAINING_CLASS_REGISTRY.pop("gba")
    try:
        sae = load_sae(native_checkpoint)
    finally:
        SAE_CLASS_REGISTRY.setdefault("gba", saved[0])
        SAE_TRAINING_CLASS_REGISTRY.setdefault("gba", saved[1])
    assert isinstance(sae, GBASAE)


def test_load_sae__unknown_architecture_names_it(native_checkpoint):
    cfg = json.loads((native_checkpoint / "cfg.json").read_text())
    (native_checkpoint / "cfg.json").write_text(
        json.dumps({**cfg, "architecture": "mystery"})
    )
    with pytest.raises(ValueError, match="architecture 'mystery' is not registered"):
        load_sae(native_checkpoint)


def test_load_sae__missing_and_corrupt_files(native_checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_sae(tmp_path / "nowhere")
    (native_checkpoint / "cfg.json").write_text("{not json")
    with pytest.raises(ValueError, match="cfg.json is not valid JSON"):
        load_sae(native_checkpoint)
    (native_checkpoint / "cfg.json").write_text(json.dumps({"architecture": "gba"}))
    (native_checkpoint / "sae_weights.safetensors").write_bytes(b"\x00" * 40)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_sae(native_checkpoint)
    (native_checkpoint / "sae_weights.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="has no sae_weights.safetensors"):
        load_sae(native_checkpoint)
