"""What ``sae-gba publish`` checks before staging: the Hub repo id, each SAE folder (an
architecture SAELens defines, matching tensors, a real ``SAE.load_from_disk``) and the
``sae_id`` each folder gets in the repo."""

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sae_lens import SAE
from sae_lens.registry import SAE_CLASS_REGISTRY

from sae_gba.loading import read_sae_config, verify_sae_folder

# Hub repo names: "namespace/name", alphanumerics and "-", "_", ".", no "--" or "..".
_REPO_PART = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?")
_SAE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class PublishError(ValueError):
    """A folder, repo id, staging folder or login that cannot be published as asked."""


@dataclass
class PublishedSae:
    """One validated SAE folder and what the model card says about it."""

    folder: Path
    cfg: dict[str, Any]
    sae_id: str = ""
    evals: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def metadata(self) -> dict[str, Any]:
        return self.cfg.get("metadata") or {}

    @property
    def hook_name(self) -> str | None:
        return self.metadata.get("hook_name") or self.cfg.get("hook_name")

    @property
    def training_architecture(self) -> str:
        return self.metadata.get("training_architecture") or self.cfg["architecture"]


def validate_repo_id(repo_id: str) -> None:
    """Require ``namespace/name`` with the characters the Hub allows (at most 96)."""
    parts = repo_id.split("/")
    problem = None
    if len(parts) != 2:
        problem = "it must be 'namespace/name' (one '/')"
    elif not all(_REPO_PART.fullmatch(part) for part in parts):
        problem = (
            "each part may use letters, digits, '-', '_' and '.', and must start and "
            "end with a letter or digit"
        )
    elif "--" in repo_id or ".." in repo_id or len(repo_id) > 96:
        problem = "'--' and '..' are not allowed and the id is at most 96 characters"
    elif parts[1].endswith(".git"):
        problem = "the name cannot end in '.git'"
    if problem:
        raise PublishError(f"invalid Hub repo id {repo_id!r}: {problem}")


def inspect_sae_folder(path: str | Path) -> PublishedSae:
    """Validate one SAE folder for publication and read its config.

    Args:
        path: a folder written by the runner or ``save_inference_model``.
    """
    folder = Path(path)
    try:
        cfg = read_sae_config(folder)
    except (FileNotFoundError, ValueError) as err:
        raise PublishError(str(err)) from err
    _require_plain_architecture(cfg["architecture"], folder)
    if cfg.get("normalize_activations") == "expected_average_only_in":
        raise PublishError(
            f"{folder}: normalize_activations is 'expected_average_only_in' but the "
            "scaling factor is not stored in the folder, so SAE.from_pretrained would "
            "load an SAE that expects rescaled inputs; fold the factor into the weights "
            "first (the runner does this at the end of training)"
        )
    try:
        verify_sae_folder(folder, allow_extra_tensors=False)
    except (FileNotFoundError, ValueError) as err:
        raise PublishError(str(err)) from err
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            SAE.load_from_disk(folder, device="cpu")
        except Exception as err:
            raise PublishError(
                f"{folder}: plain SAELens cannot load this folder: {err}"
            ) from err
    return PublishedSae(folder=folder, cfg=cfg)


def _require_plain_architecture(architecture: str, folder: Path) -> None:
    entry = SAE_CLASS_REGISTRY.get(architecture)
    module = entry[0].__module__ if entry else ""
    if module.startswith("sae_lens."):
        return
    if entry is None:
        raise PublishError(
            f"{folder}: architecture {architecture!r} is not an SAELens architecture "
            f"(SAELens defines: {sorted(_plain_architectures())})"
        )
    raise PublishError(
        f"{folder}: architecture {architecture!r} is defined by the plugin module "
        f"{module}, so users of plain SAELens could not load it. This looks like a "
        "native training checkpoint: publish the exported inference folder instead (the "
        "runner's output_path, or training_sae.save_inference_model(path)), whose "
        f"architecture is one SAELens defines ({', '.join(sorted(_plain_architectures()))})"
    )


def _plain_architectures() -> list[str]:
    return [
        name
        for name, (sae_class, _) in SAE_CLASS_REGISTRY.items()
        if sae_class.__module__.startswith("sae_lens.")
    ]


def assign_sae_ids(
    saes: list[PublishedSae], sae_id_from: Literal["hook", "folder"] = "hook"
) -> None:
    """Name each SAE's folder in the repo (the ``sae_id`` of ``SAE.from_pretrained``).

    Args:
        saes: the validated SAEs.
        sae_id_from: ``"hook"``: ``{hook_name}__{training_architecture}_{d_sae}``;
            ``"folder"``: the local folder's name.
    """
    for sae in saes:
        if sae_id_from == "folder":
            sae.sae_id = sae.folder.resolve().name
        else:
            hook = sae.hook_name or sae.folder.resolve().name
            sae.sae_id = f"{hook}__{sae.training_architecture}_{sae.cfg['d_sae']}"
        if not _SAE_ID.fullmatch(sae.sae_id) or ".." in sae.sae_id:
            raise PublishError(
                f"{sae.folder}: sae_id {sae.sae_id!r} is not a valid repo folder name "
                "(letters, digits, '-', '_' and '.'); rename the folder and pass "
                "--sae-id-from folder"
            )
    seen: dict[str, Path] = {}
    for sae in saes:
        if sae.sae_id in seen:
            raise PublishError(
                f"{seen[sae.sae_id]} and {sae.folder} would both be published as "
                f"sae_id {sae.sae_id!r}; give the folders distinct names and pass "
                "--sae-id-from folder, or publish them to different repos"
            )
        seen[sae.sae_id] = sae.folder
