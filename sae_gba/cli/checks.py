"""Checks a command makes before any work: each refuses with a one-line ``UsageError``
naming the option, the value and what to do instead."""

import tempfile
from pathlib import Path

from sae_gba.cli.options import UsageError
from sae_gba.presets import EMBEDDED, PRESETS

GEMMA_2_2B_HOW_TO = (
    "pass --model-path FOLDER, a local Hugging Face folder of google/gemma-2-2b "
    "(download it once where the Hub is reachable, after accepting the licence on "
    "its Hub page: `hf download google/gemma-2-2b --local-dir FOLDER`)"
)


def positive(option: str, value: int | None, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise UsageError(f"{option} {value} is invalid: must be >= {minimum}")


def nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".")


def folder_path(option: str, folder: Path) -> None:
    """Refuse a folder path that is a file or lies under one."""
    existing = nearest_existing(folder)
    if not existing.is_dir():
        where = "is a file" if existing == folder else f"lies under the file {existing}"
        raise UsageError(f"{option} {folder} {where}; choose a folder path")


def writable_folder(option: str, folder: Path) -> None:
    """Create ``folder`` (and parents) and make sure a file can be written in it."""
    folder_path(option, folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise UsageError(
            f"{option} {folder} cannot be written ({err.strerror or err}); choose "
            "another place"
        ) from err


def output_folder(
    out: str, resume: bool, overwrite: bool, how_to_continue: str
) -> Path:
    """Check ``--out`` (created by ``_writable_folder`` once all checks passed)."""
    folder = Path(out)
    if folder.is_dir() and any(folder.iterdir()) and not (resume or overwrite):
        raise UsageError(
            f"--out {folder} already holds files; {how_to_continue}, or choose "
            "another --out"
        )
    folder_path("--out", folder)
    return folder


def output_file(option: str, path: str) -> Path:
    file = Path(path)
    if file.is_dir():
        raise UsageError(f"{option} {file} is a folder; give a file path (.json)")
    writable_folder(f"{option}'s folder", file.parent)
    return file


def existing_folder(option: str, path: str | None, needs: str = "") -> None:
    if path is None:
        return
    folder = Path(path)
    if not folder.is_dir():
        raise UsageError(f"{option} {folder} is not a folder")
    if needs and not (folder / needs).is_file():
        raise UsageError(
            f"{option} {folder} has no {needs}; expected a Hugging Face model folder "
            "(as written by save_pretrained or `hf download`)"
        )


def torch_device(device: str) -> None:
    import torch

    try:
        found = torch.device(device)
    except RuntimeError as err:
        raise UsageError(
            f"--device {device!r} is not a torch device (cpu, cuda, cuda:N, mps)"
        ) from err
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if found.type == "cuda" and (found.index or 0) >= count:
        raise UsageError(
            f"--device {device}: this machine has {count} CUDA device(s); use "
            "--device cpu" + (" or cuda:0" if count else "")
        )
    if found.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {device}: MPS is not available; use --device cpu")
    if found.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {device}: use cpu, cuda, cuda:N or mps")


def model_folder(preset: str, model_path: str | None) -> None:
    if PRESETS[preset] is EMBEDDED:
        if model_path is not None:
            raise UsageError(
                "--model-path: the embedded preset's model ships with the package; "
                "leave --model-path out"
            )
        return
    if model_path is None:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(PRESETS[preset].model_name, "config.json")
        if not isinstance(cached, str):
            raise UsageError(
                f"preset {preset!r} needs the model's weights on this machine: "
                + GEMMA_2_2B_HOW_TO
            )
        return
    existing_folder("--model-path", model_path, needs="config.json")


def training_architecture(name: str) -> None:
    from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY

    if name not in SAE_TRAINING_CLASS_REGISTRY:
        raise UsageError(
            f"--architecture {name!r} is not a training architecture; known: "
            f"{', '.join(sorted(SAE_TRAINING_CLASS_REGISTRY))}"
        )


def sae_folder(path: str) -> None:
    if not Path(path).is_dir():  # before SAELens's import (seconds)
        raise UsageError(f"SAE folder {path} does not exist")
    from sae_gba.loading import verify_sae_folder

    try:
        verify_sae_folder(path)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(str(err)) from err


def partial_checkpoint(out: Path, command: str) -> str:
    from sae_gba.training import latest_checkpoint

    checkpoint = latest_checkpoint(out / "checkpoints")
    if checkpoint is None:
        return "no checkpoint was written yet (the first comes after the interval)"
    return f"the newest checkpoint is {checkpoint}; continue with: {command}"
