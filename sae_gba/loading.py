"""Loading SAE folders with clear errors: missing or corrupt files, unknown architectures.

SAELens itself raises a bare ``KeyError: 'gba'`` for a folder whose architecture
comes from a plugin that was not imported; ``load_sae`` checks the folder first and
registers this plugin's architectures when a folder needs them.
"""

import json
from pathlib import Path
from typing import Any

from sae_lens import SAE
from sae_lens.registry import SAE_CLASS_REGISTRY
from safetensors import SafetensorError, safe_open

from sae_gba.registry import INFERENCE_CLASSES, register_architectures

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"


def read_sae_config(path: str | Path) -> dict[str, Any]:
    """The folder's ``cfg.json`` after checking that both SAE files are there and readable.

    Args:
        path: an SAELens SAE folder (``cfg.json`` + ``sae_weights.safetensors``).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"SAE folder {folder} does not exist")
    for name in (CFG_FILENAME, WEIGHTS_FILENAME):
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"SAE folder {folder} has no {name}; an SAELens SAE folder holds "
                f"{CFG_FILENAME} and {WEIGHTS_FILENAME}"
            )
    try:
        cfg = json.loads((folder / CFG_FILENAME).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{folder / CFG_FILENAME} is not valid JSON: {err}") from err
    if not isinstance(cfg, dict) or "architecture" not in cfg:
        raise ValueError(f"{folder / CFG_FILENAME} has no 'architecture' field")
    try:
        with safe_open(folder / WEIGHTS_FILENAME, framework="pt") as weights:
            weights.keys()
    except (SafetensorError, OSError) as err:
        raise ValueError(
            f"{folder / WEIGHTS_FILENAME} is not a readable safetensors file: {err}"
        ) from err
    return cfg


def require_architecture(architecture: str, where: str | Path) -> None:
    """Make sure SAELens can build ``architecture``, or say which plugin it needs.

    Args:
        architecture: the ``architecture`` field of an SAE config.
        where: the folder or file it came from (for the message).
    """
    if architecture in SAE_CLASS_REGISTRY:
        return
    if architecture in INFERENCE_CLASSES:
        register_architectures()
        return
    raise ValueError(
        f"{where}: architecture {architecture!r} is not registered with SAELens "
        f"(known: {sorted(SAE_CLASS_REGISTRY)}). If a plugin defines it, install and "
        "import that plugin before loading."
    )


def load_sae(path: str | Path, device: str = "cpu") -> SAE[Any]:
    """Load any SAELens SAE folder (ours, exported or native, or SAELens's own).

    Args:
        path: the SAE folder.
        device: torch device.
    """
    cfg = read_sae_config(path)
    require_architecture(cfg["architecture"], path)
    return SAE.load_from_disk(path, device=device)
