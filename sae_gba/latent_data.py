"""What the latent page measures: its options, the hook's activations, each latent's
firing count and GBA group, which latents to show, and their direct logit effects."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from sae_gba.lm.harvest import harvest

if TYPE_CHECKING:
    from sae_lens import SAE
    from transformer_lens import HookedTransformer

Selection = Literal["frequent", "random", "groups"]
SELECTIONS: tuple[str, ...] = ("frequent", "random", "groups")


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


def gba_groups(sae: SAE[Any]) -> tuple[torch.Tensor, list[float]] | None:
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
def encode_latents(
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
