"""What SAEBench's core and absorption runners share: settings, errors, SAE prep.

Kept apart from both runners so neither imports the other.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sae_gba.atomic import write_text_atomically

if TYPE_CHECKING:
    from sae_lens import SAE
    from transformer_lens import HookedTransformer

RELEASE = "sae_gba"
# SAE latents with elementwise encoders: folding decoder norms keeps their function.
_FOLDABLE = ("standard", "jumprelu", "gated")


class EvalError(ValueError):
    """An SAE folder, model, data or option that cannot be evaluated as asked."""


@dataclass(frozen=True)
class EvalSettings:
    """How much data and which dtypes an eval uses.

    Args:
        n_tokens: held-out tokens for sparsity, variance and alive fraction; None
            means every held-out window.
        n_recon_tokens: held-out tokens for the CE and KL scores.
        context_size: tokens per window, BOS included.
        batch_size_prompts: windows per forward pass, at most (the largest divisor
            of the window count not above it is used, so every window is read once).
        llm_dtype: model dtype for the core eval.
        absorption_dtype: model dtype for absorption.
        absorption_words: letter-only vocabulary words for the absorption probes;
            None means all of them.
        absorption_llm_batch_size: prompts per forward pass in absorption.
        seed: seed of the window order, the word sample and the probe splits.
    """

    n_tokens: int | None = None
    n_recon_tokens: int = 8_192
    context_size: int = 128
    batch_size_prompts: int = 4
    llm_dtype: str = "float32"
    absorption_dtype: str = "bfloat16"
    absorption_words: int | None = 40_000
    absorption_llm_batch_size: int = 32
    seed: int = 42


EVAL_PRESETS: dict[str, EvalSettings] = {
    "embedded": EvalSettings(),
    "gemma-2-2b": EvalSettings(
        n_recon_tokens=20_480,
        batch_size_prompts=16,
        llm_dtype="bfloat16",
        absorption_words=None,
    ),
}


def require_saebench() -> None:
    """Raise :class:`EvalError` naming sae-gba's evals extra if SAEBench is missing."""
    import importlib.util

    if importlib.util.find_spec("sae_bench") is None:
        raise EvalError(
            "SAEBench is not installed; it comes with sae-gba's evals extra: "
            "pip install 'sae-gba[evals]'"
        )


def preset_for(model_name: str) -> str:
    """The eval preset for an SAE's model: "gemma-2-2b" for Gemma-2, else "embedded"."""
    return "gemma-2-2b" if "gemma-2-" in model_name else "embedded"


def prepare_sae(sae: SAE[Any], device: str, dtype: str) -> SAE[Any]:
    """SAEBench's SAE preparation: its cfg fields, unit-norm decoder rows, dtype.

    ``general_utils.load_and_format_sae`` fills in ``hook_layer`` and friends. Decoder
    norms are folded into the encoder (as SAEBench does for pretrained SAEs) when that
    keeps the SAE's function, so absorption's probe projections are in the units it
    assumes; TopK-style encoders are left as they are.
    """
    from sae_bench.sae_bench_utils import general_utils

    _, sae, _ = general_utils.load_and_format_sae(RELEASE, sae, device)
    norms = sae.W_dec.detach().norm(dim=-1)
    if sae.cfg.architecture_str in _FOLDABLE and not torch.allclose(
        norms, torch.ones_like(norms), atol=1e-5
    ):
        with contextlib.suppress(NotImplementedError):
            sae.fold_W_dec_norm()
    return sae.to(device=device, dtype=general_utils.str_to_dtype(dtype))


def result_path(out_dir: Path, sae_name: str) -> Path:
    """Where SAEBench names an SAE's result file in ``out_dir``."""
    from sae_bench.sae_bench_utils.general_utils import get_results_filepath

    return Path(get_results_filepath(str(out_dir), RELEASE, sae_name))


def add_provenance(path: Path, info: dict[str, Any]) -> None:
    """Record this plugin's data and token counts in a SAEBench result file."""
    data = json.loads(path.read_text())
    data["eval_result_unstructured"] = {"sae_gba": info}
    write_text_atomically(path, json.dumps(data, indent=2))


def saebench_version() -> str:
    """The SAEBench release, for the result files' ``sae_bench_commit_hash``."""
    return f"sae_bench=={version('sae-bench')}"


def dtype_name(model: HookedTransformer) -> str:
    """The model's dtype as SAEBench names it ("float32", "bfloat16", ...)."""
    return str(model.cfg.dtype).removeprefix("torch.")
