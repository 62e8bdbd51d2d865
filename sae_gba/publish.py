"""Publishing exported SAE folders to the Hugging Face Hub, loadable with plain SAELens.

``publish`` checks every folder (files present, ``cfg.json`` parses, an architecture that
SAELens itself defines, tensor shapes that match the config, finite weights, and a real
``SAE.load_from_disk``), stages one subfolder per SAE beside a ``README.md`` model card, and
uploads the staged folder in one commit. Users then need only SAELens::

    from sae_lens import SAE
    sae = SAE.from_pretrained(release="USER/NAME", sae_id="blocks.9.hook_resid_post__gba_4096")

For a ``release`` that is not in its ``pretrained_saes.yaml``, SAELens takes the release as
the Hub repo id and the ``sae_id`` as the folder inside it, and downloads
``{sae_id}/cfg.json``, ``{sae_id}/sae_weights.safetensors`` and, when present,
``{sae_id}/sparsity.safetensors`` from the ``main`` branch. Each staged folder also holds
``runner_cfg.json`` when there is one (as SAELens's own uploader does; it records the
run's settings, local paths included) and a weighted SAE's ``input_weights.safetensors``.

The ``sae_id`` is derived from the config: ``{hook_name}__{training_architecture}_{d_sae}``
(``sae_id_from="folder"``: the folder's name instead).
"""

import json
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from sae_lens import SAE
from sae_lens.registry import SAE_CLASS_REGISTRY

from sae_gba.loading import (
    CFG_FILENAME,
    SPARSITY_FILENAME,
    WEIGHTS_FILENAME,
    read_sae_config,
    verify_sae_folder,
)

RUNNER_CFG_FILENAME = "runner_cfg.json"
OPTIONAL_FILENAMES = (SPARSITY_FILENAME, RUNNER_CFG_FILENAME)
# Hub repo names: "namespace/name", alphanumerics and "-", "_", ".", no "--" or "..".
_REPO_PART = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?")
_SAE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# Metadata this plugin's exports add (GBA group targets and sizes, WSAE loss weights).
PLUGIN_METADATA = ("gba_", "input_weights_")
# SAEBench metrics worth a line in the card (leaf names inside ``eval_result_metrics``).
KEY_SAEBENCH_METRICS = (
    "explained_variance_legacy",
    "explained_variance",
    "mse",
    "cossim",
    "kl_div_score",
    "ce_loss_score",
    "l0",
    "l1",
    "frac_alive",
    "mean_absorption_fraction_score",
    "mean_full_absorption_score",
    "mean_num_split_features",
)


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


def require_token() -> str:
    """The Hub token (``HF_TOKEN`` or a cached ``hf auth login``), or a clear error."""
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise PublishError(
            "no Hugging Face token: set HF_TOKEN or run `hf auth login` (a token with "
            "write access), or pass --dry-run STAGING_DIR to only stage the upload"
        )
    return token


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


def attach_saebench_results(
    saes: list[PublishedSae], eval_dir: str | Path
) -> list[Path]:
    """Read SAEBench result JSON files under ``eval_dir`` into the matching SAEs.

    A file belongs to an SAE when its ``sae_lens_id`` is the SAE's ``sae_id`` or folder
    name, when it lies under a subfolder with one of those names, or when its file
    name holds one of them between underscores (SAEBench writes
    ``{release}_{sae_id}_eval_results.json``).

    Args:
        saes: the SAEs, with their ``sae_id`` assigned.
        eval_dir: a folder searched recursively for ``*.json``.

    Returns:
        The SAEBench files that matched no SAE.
    """
    root = Path(eval_dir)
    if not root.is_dir():
        raise PublishError(f"--eval-dir {root} is not a folder")
    unmatched = []
    for path in sorted(root.rglob("*.json")):
        result = _read_saebench_json(path)
        if result is None:
            continue
        matches = [sae for sae in saes if _belongs_to(path, root, result, sae)]
        if not matches:
            unmatched.append(path)
        for sae in matches:
            metrics = _key_metrics(result["eval_result_metrics"])
            sae.evals.setdefault(result["eval_type_id"], {}).update(metrics)
    return unmatched


def _read_saebench_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    is_result = (
        isinstance(data, dict)
        and isinstance(data.get("eval_type_id"), str)
        and isinstance(data.get("eval_result_metrics"), dict)
    )
    return data if is_result else None


def _belongs_to(
    path: Path, root: Path, result: dict[str, Any], sae: PublishedSae
) -> bool:
    names = {sae.sae_id, sae.folder.resolve().name}
    if result.get("sae_lens_id") in names:
        return True
    if names & set(path.relative_to(root).parts[:-1]):
        return True
    return any(re.search(rf"(^|_){re.escape(n)}(_|$)", path.stem) for n in names)


def _key_metrics(categories: dict[str, Any]) -> dict[str, float]:
    leaves = {
        name: value
        for metrics in categories.values()
        if isinstance(metrics, dict)
        for name, value in metrics.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }
    chosen = {k: leaves[k] for k in KEY_SAEBENCH_METRICS if k in leaves} or leaves
    return {name: _rounded(value) for name, value in chosen.items()}


def _rounded(value: Any) -> Any:
    return float(f"{value:.6g}") if isinstance(value, float) else value


def model_card(repo_id: str, saes: list[PublishedSae], revision: str = "main") -> str:
    """README.md for the release: YAML metadata, the load command, one section per SAE."""
    models = sorted({str(s.metadata.get("model_name", "unknown")) for s in saes})
    front: dict[str, Any] = {"library_name": "saelens"}
    base_models = sorted({m for m in map(_hub_model_id, models) if m})
    if base_models:
        front["base_model"] = base_models[0] if len(base_models) == 1 else base_models
    front["tags"] = [
        "saelens",
        "sparse-autoencoder",
        "mechanistic-interpretability",
        "sae-gba",
        *sorted({s.training_architecture for s in saes}),
    ]
    front["saes"] = [_card_entry(sae) for sae in saes]
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(),
        "---",
        "",
        f"# Sparse autoencoders for {', '.join(models)}",
        "",
        f"{len(saes)} sparse autoencoder(s), published with `sae-gba publish`. They are "
        "saved in architectures that SAELens defines: loading needs SAELens only.",
        "",
        "```python",
        "from sae_lens import SAE",
        "",
        f'sae = SAE.from_pretrained(release="{repo_id}", sae_id="{saes[0].sae_id}")',
        "```",
        "",
    ]
    if revision != "main":
        lines += [
            f"Uploaded to revision `{revision}`: `SAE.from_pretrained` reads `main`, "
            "so merge this revision before loading it that way.",
            "",
        ]
    lines += [
        "| sae_id | hook | width | L0 (training) | trained as | saved as |",
        "|---|---|---|---|---|---|",
    ]
    for sae, entry in zip(saes, front["saes"], strict=True):
        lines.append(
            f"| `{sae.sae_id}` | `{entry['hook_name']}` | {entry['width']} | "
            f"{entry.get('l0', '-')} | {entry['training_architecture']} | "
            f"{entry['architecture']} |"
        )
    for sae, entry in zip(saes, front["saes"], strict=True):
        lines += ["", f"## `{sae.sae_id}`", ""]
        lines.append(f"- model `{entry['model_name']}`, d_in {entry['d_in']}")
        for name, value in entry.get("training_settings", {}).items():
            lines.append(f"- {name}: `{value}`")
        for eval_type, metrics in entry.get("saebench", {}).items():
            shown = ", ".join(f"{k} {v}" for k, v in metrics.items())
            lines.append(f"- SAEBench {eval_type}: {shown}")
    return "\n".join(lines) + "\n"


def _card_entry(sae: PublishedSae) -> dict[str, Any]:
    meta = sae.metadata
    entry: dict[str, Any] = {
        "sae_id": sae.sae_id,
        "model_name": str(meta.get("model_name", "unknown")),
        "hook_name": sae.hook_name,
        "width": sae.cfg["d_sae"],
        "d_in": sae.cfg["d_in"],
        "architecture": sae.cfg["architecture"],
        "training_architecture": sae.training_architecture,
    }
    if isinstance(meta.get("l0"), int | float):
        entry["l0"] = _rounded(float(meta["l0"]))
    settings = dict(meta.get("training_architecture_details") or {})
    settings.update({k: v for k, v in meta.items() if k.startswith(PLUGIN_METADATA)})
    if sae.cfg.get("normalize_activations", "none") != "none":
        settings["normalize_activations"] = sae.cfg["normalize_activations"]
    if settings:
        entry["training_settings"] = settings
    if sae.evals:
        entry["saebench"] = sae.evals
    return entry


def _hub_model_id(model_name: str) -> str | None:
    """The Hub id behind a TransformerLens model name (None for unknown models)."""
    from transformer_lens.loading_from_pretrained import get_official_model_name

    try:
        official = get_official_model_name(model_name)
    except ValueError:
        return None
    return official if "/" in official else None


def stage_release(
    saes: list[PublishedSae],
    staging_dir: str | Path,
    repo_id: str,
    revision: str = "main",
) -> Path:
    """Write the repo layout: ``{sae_id}/`` per SAE (its files) and ``README.md``.

    Args:
        saes: validated SAEs with their ``sae_id`` assigned.
        staging_dir: an empty or new folder.
        repo_id: the Hub repo (for the model card).
        revision: the branch (for the model card).
    """
    staging = _require_empty(staging_dir)
    # Staged beside it and renamed into place: an interrupted run leaves no half
    # release that a later upload could pick up.
    tmp = staging.with_name(f".{staging.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for sae in saes:
            target = tmp / sae.sae_id
            target.mkdir()
            for name in _files_to_stage(sae):
                if (sae.folder / name).is_file():
                    shutil.copy2(sae.folder / name, target / name)
        (tmp / "README.md").write_text(model_card(repo_id, saes, revision))
        os.replace(tmp, staging)  # staging is absent or an empty folder
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return staging


def _require_empty(staging_dir: str | Path) -> Path:
    staging = Path(staging_dir)
    if staging.exists() and (not staging.is_dir() or any(staging.iterdir())):
        raise PublishError(
            f"staging folder {staging} is not an empty folder; choose a new path"
        )
    return staging


def _files_to_stage(sae: PublishedSae) -> list[str]:
    """SAELens's files, and the loss weights a weighted SAE's metadata names."""
    names = [CFG_FILENAME, WEIGHTS_FILENAME, *OPTIONAL_FILENAMES]
    extra = sae.metadata.get("input_weights_file")
    if isinstance(extra, str) and extra == Path(extra).name:
        names.append(extra)
    return names


def upload_release(
    staging_dir: str | Path,
    repo_id: str,
    token: str,
    revision: str = "main",
    private: bool = False,
    api: Any = None,
) -> str:
    """Create the repo if needed (``private`` applies to a new repo) and upload in one commit.

    Returns:
        The commit URL.
    """
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    if revision != "main":
        api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
    commit = api.upload_folder(
        folder_path=str(staging_dir),
        repo_id=repo_id,
        repo_type="model",
        revision=revision,
        commit_message="Upload SAEs (sae-gba publish)",
    )
    return str(getattr(commit, "commit_url", commit))


def publish(
    sae_dirs: list[str | Path],
    repo_id: str,
    revision: str = "main",
    private: bool = False,
    dry_run: str | Path | None = None,
    eval_dir: str | Path | None = None,
    sae_id_from: Literal["hook", "folder"] = "hook",
    api: Any = None,
) -> dict[str, Any]:
    """Validate, stage and (unless ``dry_run``) upload SAE folders as one Hub release.

    Args:
        sae_dirs: exported SAE folders.
        repo_id: ``namespace/name`` on the Hub.
        revision: branch to upload to (created if missing).
        private: create the repo private (an existing repo keeps its visibility).
        dry_run: stage into this folder and upload nothing.
        eval_dir: folder of SAEBench result JSON files for the model card.
        sae_id_from: how repo folders are named (see ``assign_sae_ids``).
        api: an ``HfApi``-like object (tests); default ``HfApi(token=...)``.

    Returns:
        ``sae_ids``, ``staging_dir`` (dry run), ``commit_url`` (upload),
        ``unmatched_evals`` and the ``load`` command.
    """
    if not sae_dirs:
        raise PublishError("no SAE folders given")
    validate_repo_id(repo_id)
    if dry_run is not None:
        _require_empty(dry_run)
    token = None if dry_run is not None else require_token()
    saes = [inspect_sae_folder(path) for path in sae_dirs]
    assign_sae_ids(saes, sae_id_from)
    unmatched = attach_saebench_results(saes, eval_dir) if eval_dir else []
    report: dict[str, Any] = {
        "sae_ids": [sae.sae_id for sae in saes],
        "unmatched_evals": [str(path) for path in unmatched],
        "load": f'SAE.from_pretrained(release="{repo_id}", sae_id="{saes[0].sae_id}")',
    }
    if dry_run is not None:
        report["staging_dir"] = str(stage_release(saes, dry_run, repo_id, revision))
        return report
    assert token is not None
    with tempfile.TemporaryDirectory(prefix="sae-gba-publish-") as tmp:
        staging = stage_release(saes, Path(tmp) / "release", repo_id, revision)
        report["commit_url"] = upload_release(
            staging, repo_id, token, revision, private, api
        )
    return report
