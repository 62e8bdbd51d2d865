"""The latent page's content: one card per shown latent (histogram, top contexts,
logit effects, search words) and one row per GBA group."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from sae_gba.latent_data import PageOptions

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

_HISTOGRAM_BINS = 24
_HISTOGRAM_SIZE = (240, 56)


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


def build_cards(
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


def group_table(
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
