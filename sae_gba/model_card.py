"""The release's ``README.md`` model card: YAML metadata, the load command, one section
per SAE, with the key SAEBench metrics read from result files beside them."""

import json
import re
from pathlib import Path
from typing import Any

import yaml

from sae_gba.publish_checks import PublishedSae, PublishError

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
