"""``sae-gba inspect``: a static HTML page for looking at what an SAE's latents mean.

:func:`build_latent_page` runs a language model over held-out windows, encodes the
hook's activations with the SAE and writes ``OUT/index.html``: one self-contained file
(inline CSS, SVG and a few lines of JavaScript; no server, no network) with, for each
chosen latent, its top-activating contexts (every token shaded by the latent's
activation, the peak token outlined), a histogram of its non-zero activations, its
firing frequency beside its GBA group's target, and the tokens its decoder direction
promotes and suppresses through the unembedding. :func:`inspect_sae` does the same
from an SAE folder with the model and held-out tokens it was trained on.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sae_gba.known_warnings import known_warnings_silenced
from sae_gba.latent_cards import build_cards, group_table
from sae_gba.latent_data import (  # noqa: F401 (public names, defined there)
    SELECTIONS,
    PageOptions,
    Selection,
    encode_latents,
    gba_groups,
    hook_activations,
    logit_effects,
    select_latents,
)
from sae_gba.lm.windows import special_token_ids

if TYPE_CHECKING:
    from sae_lens import SAE
    from transformer_lens import HookedTransformer

PAGE_FILE = "index.html"


def build_latent_page(
    sae: SAE[Any],
    model: HookedTransformer,
    tokens: torch.Tensor,
    out: str | Path,
    options: PageOptions | None = None,
    *,
    title: str | None = None,
    data_label: str = "held-out windows",
    batch_windows: int = 8,
    progress: bool = True,
    activations: torch.Tensor | None = None,
) -> Path:
    """Write ``out/index.html`` for ``sae`` on ``tokens``; returns its path.

    Special tokens (BOS, EOS, PAD) are left out of every statistic, as SAELens's
    ``exclude_special_tokens`` leaves them out of training.

    Args:
        sae: any SAELens SAE whose ``cfg.metadata.hook_name`` is a hook of ``model``.
        model: the language model the SAE was trained on.
        tokens: (n_windows, context) held-out token ids.
        out: output folder.
        options: which latents and how much of each (see :class:`PageOptions`).
        title: page heading (default: the hook and SAE width).
        data_label: what ``tokens`` are, for the page.
        batch_windows: windows per model forward pass.
        progress: show progress bars.
        activations: the hook's activations on ``tokens`` (:func:`hook_activations`)
            when already computed; None runs the model.
    """
    options = options or PageOptions()
    hook_name = sae.cfg.metadata.hook_name
    x = _checked_activations(sae, model, tokens, activations, batch_windows, progress)
    keep = _text_tokens(model, tokens)
    n_kept = int(keep.sum())
    flat_x, flat_keep = x.flatten(0, 1), keep.flatten()
    counts, _ = encode_latents(sae, flat_x, flat_keep, None)
    frequencies = counts.double() / n_kept
    grouping = gba_groups(sae)
    groups, targets = grouping if grouping is not None else (None, [])
    latents = select_latents(frequencies, options, groups)
    _, acts = encode_latents(sae, flat_x, flat_keep, latents)
    acts = acts.view(*tokens.shape, len(latents))
    effects = logit_effects(sae, model, latents, options.top_tokens)
    cards, names = build_cards(
        model, tokens, acts, latents, frequencies, groups, targets, effects, options
    )
    group_rows = group_table(frequencies, groups, targets, cards)
    selection = options.latents if isinstance(options.latents, str) else "ids given"
    page = _render(
        title=title or f"{hook_name}: {sae.cfg.d_sae:,} latents",
        sae={
            "architecture": sae.cfg.architecture(),
            "training_architecture": sae.cfg.metadata.get("training_architecture"),
            "model": sae.cfg.metadata.get("model_name"),
            "hook": hook_name,
            "d_in": sae.cfg.d_in,
            "d_sae": sae.cfg.d_sae,
        },
        data={
            "label": data_label,
            "windows": len(tokens),
            "context": tokens.shape[1],
            "tokens": n_kept,
            "l0": float(counts.sum()) / n_kept,
            "alive": float((counts > 0).double().mean()),
        },
        selection=selection,
        groups=group_rows,
        cards=cards,
        names=names,
        has_logits=effects is not None,
    )
    return _write_page(out, page)


def _checked_activations(
    sae: SAE[Any],
    model: HookedTransformer,
    tokens: torch.Tensor,
    activations: torch.Tensor | None,
    batch_windows: int,
    progress: bool,
) -> torch.Tensor:
    """The hook's activations on ``tokens`` (computed when None), checked against
    the tokens' shape and the SAE's width."""
    hook_name = sae.cfg.metadata.hook_name
    if not hook_name:
        raise ValueError("the SAE's cfg names no hook (metadata.hook_name)")
    if tokens.ndim != 2 or len(tokens) == 0:
        raise ValueError(
            f"tokens must be a non-empty (n_windows, context) tensor, got shape "
            f"{tuple(tokens.shape)}"
        )
    x = activations
    if x is None:
        x = hook_activations(model, hook_name, tokens, batch_windows, progress)
    if x.shape[:2] != tokens.shape:
        raise ValueError(
            f"activations of shape {tuple(x.shape)} do not match tokens of shape "
            f"{tuple(tokens.shape)}"
        )
    if x.shape[-1] != sae.cfg.d_in:
        raise ValueError(
            f"{hook_name} has width {x.shape[-1]}; the SAE expects d_in={sae.cfg.d_in}"
        )
    return x


def _text_tokens(model: HookedTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """(n_windows, context) mask of the tokens that are not BOS/EOS/PAD."""
    keep = ~torch.isin(
        tokens, torch.tensor(special_token_ids(model.tokenizer), dtype=tokens.dtype)
    )
    if not bool(keep.any()):
        raise ValueError("tokens hold no text tokens (only BOS/EOS/PAD)")
    return keep


def _write_page(out: str | Path, page: str) -> Path:
    """Write ``out/index.html`` atomically; returns its path."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / PAGE_FILE
    tmp = path.with_name(f".{PAGE_FILE}.{os.getpid()}.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return path


def _render(**context: Any) -> str:
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

    env = Environment(
        loader=PackageLoader("sae_gba", "templates"),
        autoescape=select_autoescape(["html", "j2"]),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["freq"] = lambda v: "0" if v == 0 else f"{v:.3g}"
    return env.get_template("latent_page.html.j2").render(**context)


@known_warnings_silenced()
def inspect_sae(
    sae_dir: str | Path,
    out: str | Path,
    options: PageOptions | None = None,
    *,
    model_path: str | None = None,
    dataset_path: str | None = None,
    n_windows: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    progress: bool = True,
) -> Path:
    """Write the latent page of an SAE folder on its own model and held-out tokens.

    The model is the one the SAE's cfg names, loaded as :mod:`sae_gba.presets` loads
    it (the embedded Gemma-3-270M, or a Gemma-2 from ``model_path``). The tokens are
    the embedded Wikipedia slice's held-out articles for the embedded model, or the
    rows of ``dataset_path``.

    Args:
        sae_dir: an SAELens SAE folder.
        out: output folder (``out/index.html``).
        options: which latents and how much of each.
        model_path: local Hugging Face folder of a Gemma-2 model.
        dataset_path: a ``save_to_disk`` folder of held-out data ("tokens",
            "input_ids" or "text").
        n_windows: use only the first windows; None uses all.
        device: torch device of the model and the SAE.
        dtype: model dtype ("float32", "bfloat16").
        progress: show progress bars.
    """
    from sae_gba.embedded import EMBEDDED_MODEL_NAME
    from sae_gba.lm.data import read_windows
    from sae_gba.loading import load_sae
    from sae_gba.presets import PRESETS, load_hooked_model

    if n_windows is not None and n_windows < 1:
        raise ValueError(f"n_windows={n_windows!r} must be >= 1 or None")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(
            f"dtype={dtype!r} is invalid: must be float32, bfloat16 or float16"
        )
    sae = load_sae(sae_dir, device=device)
    name = sae.cfg.metadata.get("model_name")
    preset = next((p for p in PRESETS.values() if p.model_name == name), None)
    if preset is None:
        raise ValueError(
            f"the SAE's model {name!r} has no loader here; known models: "
            f"{sorted(p.model_name for p in PRESETS.values())}"
        )
    if dataset_path is None and name != EMBEDDED_MODEL_NAME:
        raise ValueError(
            f"model {name!r} has no bundled held-out text: pass dataset_path"
        )
    model = load_hooked_model(
        preset, model_path, device=device, dtype=getattr(torch, dtype)
    )
    # The SAE's own training window length; the preset's for SAEs that lack it.
    context = sae.cfg.metadata.get("context_size") or preset.context_size
    tokens, label = read_windows(model, "held_out", context, dataset_path)
    tokens = tokens[:n_windows]
    return build_latent_page(
        sae,
        model,
        tokens,
        out,
        options,
        title=f"{Path(sae_dir).resolve().name}: {sae.cfg.metadata.hook_name}",
        data_label=label,
        progress=progress,
    )
