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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from sae_gba.known_warnings import known_warnings_silenced
from sae_gba.lm.harvest import harvest
from sae_gba.lm.windows import special_token_ids

if TYPE_CHECKING:
    from sae_lens import SAE
    from transformer_lens import HookedTransformer

Selection = Literal["frequent", "random", "groups"]
SELECTIONS: tuple[str, ...] = ("frequent", "random", "groups")
PAGE_FILE = "index.html"
_HISTOGRAM_BINS = 24
_HISTOGRAM_SIZE = (240, 56)


@dataclass(frozen=True)
class PageOptions:
    """What the page shows.

    Args:
        latents: "frequent" (highest held-out firing frequency), "random" (latents
            that fired at least once), "groups" (a random sample from every GBA
            group), or a sequence of latent ids.
        n_latents: how many latents to show (ignored for explicit ids).
        top_contexts: top-activating windows shown per latent.
        context_before: tokens shown before a context's peak token.
        context_after: tokens shown after it.
        top_tokens: promoted and suppressed tokens listed per latent.
        seed: seed of the random and per-group samples.
    """

    latents: Selection | Sequence[int] = "frequent"
    n_latents: int = 48
    top_contexts: int = 8
    context_before: int = 16
    context_after: int = 4
    top_tokens: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.latents, str) and self.latents not in SELECTIONS:
            raise ValueError(
                f"latents={self.latents!r} is invalid: must be one of {SELECTIONS} "
                "or a sequence of latent ids"
            )
        for name in ("n_latents", "top_contexts", "top_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be >= 1")
        for name in ("context_before", "context_after"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be >= 0")


def hook_activations(
    model: HookedTransformer,
    hook_name: str,
    tokens: torch.Tensor,
    batch_windows: int = 8,
    progress: bool = True,
) -> torch.Tensor:
    """The hook's activations at every position of every window (:func:`harvest`).

    Args:
        model: the language model.
        hook_name: a ``blocks.<layer>.*`` hook.
        tokens: (n_windows, context) token ids.
        batch_windows: windows per forward pass.
        progress: show a progress bar.

    Returns:
        float32 tensor (n_windows, context, d_hook) on the CPU.
    """
    acts = harvest(
        model, hook_name, tokens, None, batch_windows, progress, keep_special=True
    )
    return acts.view(*tokens.shape, -1).float()


def _group_of_latents(sae: SAE[Any]) -> tuple[torch.Tensor, list[float]] | None:
    """Each latent's GBA group and the group targets, from the SAE's metadata."""
    targets = sae.cfg.metadata.get("gba_target_frequencies")
    sizes = sae.cfg.metadata.get("gba_group_sizes")
    if not targets or not sizes:
        return None
    if sum(sizes) != sae.cfg.d_sae or len(sizes) != len(targets):
        raise ValueError(
            f"gba_group_sizes={sizes} does not partition d_sae={sae.cfg.d_sae} into "
            f"{len(targets)} groups"
        )
    groups = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    return groups, [float(t) for t in targets]


def select_latents(
    frequencies: torch.Tensor,
    options: PageOptions,
    groups: torch.Tensor | None = None,
) -> list[int]:
    """The latent ids the page shows, in display order.

    Args:
        frequencies: (d_sae,) held-out firing frequency of every latent.
        options: the selection (``options.latents``, ``n_latents``, ``seed``).
        groups: (d_sae,) GBA group of every latent; needed for "groups".
    """
    d_sae = frequencies.shape[0]
    how, n = options.latents, options.n_latents
    if not isinstance(how, str):
        ids = [int(i) for i in how]
        bad = [i for i in ids if not 0 <= i < d_sae]
        if not ids or bad:
            raise ValueError(
                f"latents={list(how)!r} is invalid: ids must lie in [0, {d_sae}) "
                f"(d_sae={d_sae}){f'; out of range: {bad}' if bad else ''}"
            )
        return list(dict.fromkeys(ids))
    if how == "frequent":
        return frequencies.argsort(descending=True, stable=True)[:n].tolist()
    gen = torch.Generator().manual_seed(options.seed)
    alive = (frequencies > 0).nonzero().flatten()
    if how == "random":
        return alive[torch.randperm(len(alive), generator=gen)[:n]].sort()[0].tolist()
    if groups is None:
        raise ValueError(
            "latents='groups' needs a GBA-trained SAE (metadata gba_group_sizes and "
            "gba_target_frequencies); use 'frequent', 'random' or latent ids"
        )
    n_groups = int(groups.max()) + 1
    per_group = -(-n // n_groups)
    chosen = []
    for k in range(n_groups):
        members = alive[groups[alive] == k]
        pick = torch.randperm(len(members), generator=gen)[:per_group]
        chosen.extend(members[pick].sort()[0].tolist())
    return chosen


@torch.no_grad()
def _encode(
    sae: SAE[Any], x: torch.Tensor, keep: torch.Tensor, latents: list[int] | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Firing counts of every latent over kept tokens; activations of ``latents``."""
    counts = torch.zeros(sae.cfg.d_sae, dtype=torch.int64)
    chosen = []
    param = next(sae.parameters())
    for rows, mask in zip(x.split(4096), keep.split(4096), strict=True):
        acts = sae.encode(rows.to(param.device, param.dtype)).float().cpu()
        acts[~mask] = 0.0
        counts += (acts > 0).sum(0)
        if latents is not None:
            chosen.append(acts[:, latents])
    return counts, (torch.cat(chosen) if latents is not None else None)


@torch.no_grad()
def logit_effects(
    sae: SAE[Any], model: HookedTransformer, latents: list[int], k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Top promoted and suppressed tokens of each latent's decoder direction.

    The direct effect on the logits: ``W_dec[i] * ln_final.w @ W_U`` (the final norm's
    scale applies when the model keeps it unfolded; later layers are ignored).

    Returns:
        (promoted values, promoted ids, suppressed values, suppressed ids), each
        (n_latents, k); None when the SAE does not write to the residual stream.
    """
    if sae.cfg.d_in != model.cfg.d_model:
        return None
    directions = sae.W_dec[latents].detach().float().cpu()
    scale = getattr(getattr(model, "ln_final", None), "w", None)
    if scale is not None:
        directions = directions * scale.detach().float().cpu()
    w_u = model.W_U.detach()
    logits = torch.cat(
        [
            directions @ w_u[:, s : s + 32_768].float().cpu()
            for s in range(0, w_u.shape[1], 32_768)
        ],
        dim=1,
    )
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1)
    bottom = logits.topk(k, dim=1, largest=False)
    return top.values, top.indices, bottom.values, bottom.indices


def _token_strings(model: HookedTransformer, ids: set[int]) -> dict[int, str]:
    """Readable text of each token id (newlines and tabs made visible)."""
    order = sorted(ids)
    if model.tokenizer is None:
        return {i: f"#{i}" for i in order}
    texts = model.tokenizer.batch_decode([[i] for i in order])
    return {
        i: t.replace("\n", "\u23ce").replace("\t", "\u21e5") or f"#{i}"
        for i, t in zip(order, texts, strict=True)
    }


def _histogram(values: torch.Tensor) -> dict[str, Any]:
    """SVG bars (x, y, width, height, label) of a latent's non-zero activations."""
    width, height = _HISTOGRAM_SIZE
    if len(values) == 0:
        return {"bars": [], "width": width, "height": height, "max": 0.0}
    top = float(values.max())
    counts = torch.histc(values, bins=_HISTOGRAM_BINS, min=0.0, max=top)
    step = width / _HISTOGRAM_BINS
    peak = float(counts.max())
    bars = []
    for b, c in enumerate(counts.tolist()):
        h = height * c / peak
        lo, hi = top * b / _HISTOGRAM_BINS, top * (b + 1) / _HISTOGRAM_BINS
        bars.append(
            {
                "x": round(b * step, 2),
                "y": round(height - h, 2),
                "w": round(step - 1, 2),
                "h": round(h, 2),
                "label": f"{lo:.3g}-{hi:.3g}: {int(c)}",
            }
        )
    return {"bars": bars, "width": width, "height": height, "max": top}


def _contexts(
    acts: torch.Tensor, tokens: torch.Tensor, options: PageOptions
) -> list[dict[str, Any]]:
    """Top windows of one latent: (n_windows, context) activations -> display rows."""
    peaks, where = acts.max(dim=1)
    order = peaks.argsort(descending=True, stable=True)[: options.top_contexts]
    rows = []
    for w in order.tolist():
        if peaks[w] <= 0:
            break
        p = int(where[w])
        lo = max(0, p - options.context_before)
        hi = min(acts.shape[1], p + options.context_after + 1)
        rows.append(
            {
                "window": w,
                "position": p,
                "peak": float(peaks[w]),
                "tokens": list(
                    zip(
                        tokens[w, lo:hi].tolist(),
                        acts[w, lo:hi].tolist(),
                        range(lo, hi),
                        strict=True,
                    )
                ),
            }
        )
    return rows


def _cards(
    model: HookedTransformer,
    tokens: torch.Tensor,
    acts: torch.Tensor,
    latents: list[int],
    frequencies: torch.Tensor,
    groups: torch.Tensor | None,
    targets: list[float],
    effects: Any,
    options: PageOptions,
) -> tuple[list[dict[str, Any]], dict[int, str]]:
    """One card per shown latent (frequency, group, histogram, top contexts, logit
    effects, search words) and the strings of every token they show."""
    cards = []
    for j, latent in enumerate(latents):
        values = acts[..., j]
        group = int(groups[latent]) if groups is not None else None
        card: dict[str, Any] = {
            "id": latent,
            "frequency": float(frequencies[latent]),
            "group": group,
            "target": targets[group] if group is not None else None,
            "histogram": _histogram(values[values > 0]),
            "contexts": _contexts(values, tokens, options),
        }
        if effects is not None:
            up_v, up, down_v, down = (e[j].tolist() for e in effects)
            card["logits"] = list(zip(up, up_v, down, down_v, strict=True))
        cards.append(card)

    ids = {t for c in cards for ctx in c["contexts"] for t, _, _ in ctx["tokens"]}
    ids |= {t for c in cards for row in c.get("logits", []) for t in row[::2]}
    names = _token_strings(model, ids)
    for card in cards:
        peaks = [
            ctx["tokens"][ctx["position"] - ctx["tokens"][0][2]]
            for ctx in card["contexts"]
        ]
        words = [names[t] for t, _, _ in peaks]
        words += [names[row[0]] for row in card.get("logits", [])]
        card["search"] = " ".join([str(card["id"]), *words]).lower()
    return cards, names


def _group_rows(
    frequencies: torch.Tensor,
    groups: torch.Tensor | None,
    targets: list[float],
    cards: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """Each GBA group's size, target, median frequency, alive share and cards shown."""
    group_rows = []
    if groups is not None:
        for k, target in enumerate(targets):
            member = frequencies[groups == k]
            group_rows.append(
                {
                    "group": k,
                    "size": len(member),
                    "target": target,
                    "median": float(member.median()),
                    "alive": float((member > 0).double().mean()),
                    "shown": sum(1 for c in cards if c["group"] == k),
                }
            )
    return group_rows


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
    keep = ~torch.isin(
        tokens, torch.tensor(special_token_ids(model.tokenizer), dtype=tokens.dtype)
    )
    n_kept = int(keep.sum())
    if n_kept == 0:
        raise ValueError("tokens hold no text tokens (only BOS/EOS/PAD)")
    flat_x, flat_keep = x.flatten(0, 1), keep.flatten()
    counts, _ = _encode(sae, flat_x, flat_keep, None)
    frequencies = counts.double() / n_kept
    grouping = _group_of_latents(sae)
    groups, targets = grouping if grouping is not None else (None, [])
    latents = select_latents(frequencies, options, groups)
    _, acts = _encode(sae, flat_x, flat_keep, latents)
    acts = acts.view(*tokens.shape, len(latents))
    effects = logit_effects(sae, model, latents, options.top_tokens)
    cards, names = _cards(
        model, tokens, acts, latents, frequencies, groups, targets, effects, options
    )
    group_rows = _group_rows(frequencies, groups, targets, cards)
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
