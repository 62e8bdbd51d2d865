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

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

from sae_gba.loading import CFG_FILENAME, SPARSITY_FILENAME, WEIGHTS_FILENAME
from sae_gba.model_card import (  # noqa: F401 (public names, defined there)
    KEY_SAEBENCH_METRICS,
    PLUGIN_METADATA,
    attach_saebench_results,
    model_card,
)
from sae_gba.publish_checks import (  # noqa: F401 (public names, defined there)
    PublishedSae,
    PublishError,
    assign_sae_ids,
    inspect_sae_folder,
    validate_repo_id,
)

RUNNER_CFG_FILENAME = "runner_cfg.json"
OPTIONAL_FILENAMES = (SPARSITY_FILENAME, RUNNER_CFG_FILENAME)


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
