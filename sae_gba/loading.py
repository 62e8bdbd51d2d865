"""Loading SAE folders with clear errors: missing, truncated or corrupt files, wrong
shapes, NaN weights, unknown architectures.

SAELens itself raises a bare ``KeyError: 'gba'`` for a folder whose architecture
comes from a plugin that was not imported, and loads NaN weights or a truncated
weighted SAE's ``input_weights.safetensors`` without a word. ``verify_sae_folder``
checks every file an SAE folder needs and names the bad one; ``load_sae`` verifies
and then loads, registering this plugin's architectures when a folder needs them.
"""

import json
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE
from sae_lens.registry import SAE_CLASS_REGISTRY
from safetensors import SafetensorError, safe_open

from sae_gba.registry import INFERENCE_CLASSES, register_architectures

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
SPARSITY_FILENAME = "sparsity.safetensors"
# Written beside a weighted SAE (sae_gba.weighted_sae; not imported here, it is heavy).
INPUT_WEIGHTS_FILENAME = "input_weights.safetensors"
INPUT_WEIGHTS_TENSOR = "gamma"


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
    for name in ("d_in", "d_sae"):
        value = cfg.get(name)
        if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            raise ValueError(
                f"{folder / CFG_FILENAME}: {name}={value!r} is invalid: must be a "
                "positive integer (is the file from another SAELens version?)"
            )
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


def expected_shapes(cfg: dict[str, Any], where: str | Path) -> dict[str, tuple]:
    """Tensor name -> shape that SAELens builds for this config (nothing allocated).

    Args:
        cfg: the folder's config.
        where: the config file (for the message).
    """
    try:
        sae = SAE.from_dict({**cfg, "device": "meta"})
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"{where}: SAELens cannot build a {cfg['architecture']!r} SAE from this "
            f"config ({err}); was it written by another SAELens version?"
        ) from err
    return {name: tuple(t.shape) for name, t in sae.state_dict().items()}


def read_checked_tensors(
    path: Path,
    expected: dict[str, tuple],
    allow_extra: bool = True,
    finite: bool = True,
) -> None:
    """Check that a safetensors file holds the expected tensors, floating, finite.

    Args:
        path: the file.
        expected: tensor name -> shape that must be there.
        allow_extra: whether further tensors may be in the file.
        finite: whether NaN/Inf values are an error.
    """
    problems = []
    try:
        with safe_open(path, framework="pt") as file:
            names = set(file.keys())
            for name in sorted(names & set(expected)):
                tensor = file.get_tensor(name)
                if tuple(tensor.shape) != expected[name]:
                    problems.append(
                        f"{name} has shape {tuple(tensor.shape)}, expected "
                        f"{expected[name]}"
                    )
                elif not tensor.is_floating_point():
                    problems.append(f"{name} has dtype {tensor.dtype}, expected float")
                elif finite and (bad := int((~torch.isfinite(tensor)).sum())):
                    problems.append(
                        f"{name} has {bad} NaN/Inf values of {tensor.numel()}"
                    )
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from err
    if missing := sorted(set(expected) - names):
        problems.append(f"missing tensors {missing}")
    if not allow_extra and (extra := sorted(names - set(expected))):
        problems.append(f"unexpected tensors {extra}")
    if problems:
        raise ValueError(f"{path}: " + "; ".join(problems))


def verify_sae_folder(
    path: str | Path, allow_extra_tensors: bool = True
) -> dict[str, Any]:
    """Check every file an SAE folder needs and return its config.

    ``cfg.json`` (valid, an architecture SAELens knows, positive sizes), the weights
    (every tensor the architecture needs, right shape, floating, finite), and when
    present ``sparsity.safetensors`` and a weighted SAE's ``input_weights.safetensors``
    (``gamma`` of shape (d_in,), finite, > 0). Errors name the bad file.

    Args:
        path: the SAE folder.
        allow_extra_tensors: whether the weights file may hold tensors the
            architecture does not use (a training checkpoint's state).
    """
    folder = Path(path)
    cfg = read_sae_config(folder)
    require_architecture(cfg["architecture"], folder)
    shapes = expected_shapes(cfg, folder / CFG_FILENAME)
    read_checked_tensors(folder / WEIGHTS_FILENAME, shapes, allow_extra_tensors)
    if (folder / SPARSITY_FILENAME).exists():
        read_checked_tensors(
            folder / SPARSITY_FILENAME, {"sparsity": (cfg["d_sae"],)}, finite=False
        )
    named = (cfg.get("metadata") or {}).get("input_weights_file")
    if named or (folder / INPUT_WEIGHTS_FILENAME).exists():
        weights = folder / (named or INPUT_WEIGHTS_FILENAME)
        if not weights.is_file():
            raise FileNotFoundError(
                f"{weights} is missing; {folder / CFG_FILENAME} says this weighted "
                "SAE's loss weights are there"
            )
        read_checked_tensors(weights, {INPUT_WEIGHTS_TENSOR: (cfg["d_in"],)})
        with safe_open(weights, framework="pt") as file:
            gamma = file.get_tensor(INPUT_WEIGHTS_TENSOR)
        if bad := int((gamma <= 0).sum()):
            raise ValueError(
                f"{weights}: {INPUT_WEIGHTS_TENSOR} has {bad} entries <= 0 of "
                f"{gamma.numel()}; loss weights must be > 0"
            )
    return cfg


def load_sae(path: str | Path, device: str = "cpu") -> SAE[Any]:
    """Load any SAELens SAE folder (ours, exported or native, or SAELens's own).

    Args:
        path: the SAE folder (checked first by :func:`verify_sae_folder`).
        device: torch device.
    """
    verify_sae_folder(path)
    return SAE.load_from_disk(path, device=device)
