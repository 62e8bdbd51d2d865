"""The one model loader: the embedded Gemma-3-270M, a local folder, or a Hub name.

Every model comes back as an unprocessed TransformerLens ``HookedTransformer`` (no
folded layer norms, no centring), so hooks see the activations the model computes.
A local Gemma-2 folder is read with its own config (any depth, widths and vocab), so a
truncated or randomly initialised Gemma-2 loads as well as the real weights.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer
    from transformers import PretrainedConfig

# TransformerLens's name for Gemma-2's behaviour flags (post-norms, local attention).
GEMMA2_TL_NAME = "google/gemma-2-2b"


def load_model(
    model_name: str,
    model_path: str | Path | None = None,
    *,
    d_in: int | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    from_pretrained_kwargs: dict[str, Any] | None = None,
) -> HookedTransformer:
    """Load ``model_name`` as an unprocessed HookedTransformer, offline where local.

    Args:
        model_name: the model's name (an SAE's ``metadata.model_name``, a preset's
            ``model_name``).
        model_path: a local Hugging Face folder (config.json, weights, tokenizer);
            None loads the embedded Gemma-3-270M for its name and otherwise asks
            TransformerLens (Hub or HF cache).
        d_in: the width the caller's SAE expects; a folder of another width is
            refused. None checks nothing.
        device: torch device for the weights.
        dtype: weight dtype of the returned model.
        from_pretrained_kwargs: further TransformerLens ``from_pretrained`` fields.
    """
    from sae_gba.embedded import EMBEDDED_MODEL_NAME

    kwargs = from_pretrained_kwargs or {}
    if model_path is None:
        if model_name == EMBEDDED_MODEL_NAME:
            return _load_embedded(device, dtype)
        return _hooked(model_name, device=device, dtype=dtype, **kwargs)
    folder = Path(model_path)
    hf_config = _read_folder_config(folder)
    if hf_config.model_type == "gemma2" or model_name.startswith("google/gemma-2-"):
        return _load_gemma2_folder(folder, hf_config, d_in, device, dtype)
    _check_width(folder, hf_config.hidden_size, d_in)
    from transformers import AutoModelForCausalLM

    return _hooked(
        model_name,
        hf_model=AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32),
        tokenizer=_folder_tokenizer(folder),
        device=device,
        dtype=dtype,
        **kwargs,
    )


def _hooked(model_name: str, **kwargs: Any) -> HookedTransformer:
    from transformer_lens import HookedTransformer

    with warnings.catch_warnings():
        # TransformerLens 3.x flags HookedTransformer as deprecated; SAELens 6 needs it.
        warnings.filterwarnings(
            "ignore", category=DeprecationWarning, module="transformer_lens"
        )
        return HookedTransformer.from_pretrained_no_processing(model_name, **kwargs)


def _load_embedded(device: str, dtype: torch.dtype) -> HookedTransformer:
    """Gemma-3-270M from the folder :func:`sae_gba.embedded.embedded_model_dir` makes."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    from sae_gba.embedded import (
        EMBEDDED_MODEL_NAME,
        embedded_model_dir,
        go_offline,
        load_embedded_tokenizer,
    )

    folder = embedded_model_dir()
    go_offline()
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    except (OSError, ValueError, SafetensorError) as err:
        raise ValueError(
            f"model folder {folder} is unreadable ({err}); delete it to rebuild it"
        ) from err
    return _hooked(
        EMBEDDED_MODEL_NAME,
        hf_model=hf_model,
        tokenizer=load_embedded_tokenizer(),
        device=device,
        dtype=dtype,
    )


def _read_folder_config(folder: Path) -> PretrainedConfig:
    if not folder.is_dir():
        raise FileNotFoundError(
            f"model folder {folder} does not exist; expected a local Hugging Face "
            "folder (config.json, weights, tokenizer)"
        )
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"model folder {folder} has no config.json; expected a Hugging Face "
            "folder as written by save_pretrained"
        )
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder, local_files_only=True)


def _check_width(folder: Path, hidden_size: int, d_in: int | None) -> None:
    if d_in is not None and hidden_size != d_in:
        raise ValueError(
            f"model folder {folder} has hidden_size {hidden_size}; the SAE expects "
            f"d_in {d_in}"
        )


def _folder_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"model folder {folder} has no usable tokenizer: {err}"
        ) from err


def _gemma2_tl_overrides(hf: PretrainedConfig) -> dict[str, Any]:
    """TransformerLens config fields read from a Hugging Face Gemma-2 config.

    TransformerLens hard-codes Gemma-2-2B's 26-layer config by name; these fields
    make the model follow the folder instead (depth, widths, vocab, attention).
    """
    from transformer_lens.utilities.activation_functions import SOFTCAP_DISABLED

    rope = getattr(hf, "rope_parameters", None) or {}
    return {
        "n_layers": hf.num_hidden_layers,
        "d_model": hf.hidden_size,
        "n_heads": hf.num_attention_heads,
        "n_key_value_heads": hf.num_key_value_heads,
        "d_head": hf.head_dim,
        "rotary_dim": hf.head_dim,
        "d_mlp": hf.intermediate_size,
        "d_vocab": hf.vocab_size,
        "d_vocab_out": hf.vocab_size,
        "act_fn": hf.hidden_activation,
        "eps": hf.rms_norm_eps,
        "rotary_base": rope.get("rope_theta", getattr(hf, "rope_theta", 10_000.0)),
        "window_size": hf.sliding_window,
        "attn_types": [
            "local" if kind == "sliding_attention" else "global"
            for kind in hf.layer_types
        ],
        # Gemma-2 divides attention scores by sqrt(query_pre_attn_scalar), not by
        # sqrt(d_head) (they differ in the 27B model).
        "attn_scale": hf.query_pre_attn_scalar**0.5,
        "attn_scores_soft_cap": hf.attn_logit_softcapping or SOFTCAP_DISABLED,
        "output_logits_soft_cap": hf.final_logit_softcapping or SOFTCAP_DISABLED,
    }


def _load_gemma2_folder(
    folder: Path,
    hf_config: PretrainedConfig,
    d_in: int | None,
    device: str,
    dtype: torch.dtype,
) -> HookedTransformer:
    """A Gemma-2 folder as a HookedTransformer whose architecture follows its config."""
    from transformer_lens import HookedTransformer
    from transformer_lens import loading_from_pretrained as loading
    from transformers import AutoModelForCausalLM

    if hf_config.model_type != "gemma2":
        raise ValueError(
            f"model folder {folder} holds a {hf_config.model_type!r} model; the "
            "model name expects a Gemma-2 model (model_type 'gemma2')"
        )
    _check_width(folder, hf_config.hidden_size, d_in)
    tokenizer = _folder_tokenizer(folder)
    hf_model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, local_files_only=True
    )
    # HookedTransformer.from_pretrained would take TransformerLens's fixed Gemma-2-2B
    # config, so its steps are done here with the folder's fields swapped in.
    base = loading.get_pretrained_model_config(
        GEMMA2_TL_NAME,
        hf_cfg=hf_config.to_dict(),
        fold_ln=False,
        device=device,
        dtype=dtype,
        first_n_layers=hf_config.num_hidden_layers,
    )
    cfg = dataclasses.replace(base, **_gemma2_tl_overrides(hf_config))
    state_dict = loading.get_pretrained_state_dict(
        GEMMA2_TL_NAME, cfg, hf_model, dtype=dtype
    )
    del hf_model
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", category=DeprecationWarning, module="transformer_lens"
        )
        model = HookedTransformer(cfg, tokenizer, move_to_device=False)
    model.load_and_process_state_dict(
        state_dict,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    model.move_model_modules_to_device()
    return model
