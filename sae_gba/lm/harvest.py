"""The activation harvest: a hook's activations on token windows, on the CPU."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from sae_gba.lm.windows import special_token_ids

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


def hook_layer(hook_name: str) -> int:
    """The block index of a ``blocks.<layer>.<hook>`` hook name."""
    parts = hook_name.split(".")
    if len(parts) < 3 or parts[0] != "blocks" or not parts[1].isdigit():
        raise ValueError(
            f"hook_name={hook_name!r} is not a block hook ('blocks.<layer>.<hook>')"
        )
    return int(parts[1])


@torch.no_grad()
def harvest(
    model: HookedTransformer,
    hook_name: str,
    windows: torch.Tensor,
    n_tokens: int | None = None,
    batch_windows: int = 16,
    progress: bool = True,
    *,
    keep_special: bool = False,
) -> torch.Tensor:
    """The hook's activations on ``windows``, the forward pass stopped after its block.

    Args:
        model: the language model.
        hook_name: a ``blocks.<layer>.*`` hook.
        windows: (n_windows, context) token ids, BOS first.
        n_tokens: stop once this many activations are read (None: every window);
            fewer in the windows is a ``ValueError``.
        batch_windows: windows per forward pass.
        progress: show a progress bar (in tokens).
        keep_special: keep BOS/EOS/PAD positions (:func:`special_token_ids`); by
            default they are dropped, as SAELens's ``exclude_special_tokens`` does.

    Returns:
        (n, d_model) activations in the model's dtype on the CPU, window by window
        (with ``keep_special`` and no ``n_tokens``: ``n_windows * context`` rows).
    """
    layer = hook_layer(hook_name)
    special = torch.tensor(
        [] if keep_special else special_token_ids(model.tokenizer), dtype=windows.dtype
    )
    keep = ~torch.isin(windows, special)
    available = int(keep.sum())
    wanted = available if n_tokens is None else n_tokens
    if wanted > available:
        raise ValueError(
            f"the windows hold {available:,} text tokens; n_tokens={wanted:,} "
            "needs more"
        )
    # Filled in place: no second copy of what may be tens of GB.
    result = torch.empty(wanted, model.cfg.d_model, dtype=model.cfg.dtype)
    have = 0
    bar = tqdm(total=wanted, desc="harvest", unit="tok", disable=not progress)
    for start in range(0, len(windows), batch_windows):
        if have >= wanted:
            break
        batch = windows[start : start + batch_windows]
        _, cache = model.run_with_cache(
            batch.to(model.cfg.device), names_filter=hook_name, stop_at_layer=layer + 1
        )
        rows = keep[start : start + batch_windows].to(cache[hook_name].device)
        acts = cache[hook_name][rows][: wanted - have]
        result[have : have + len(acts)] = acts.cpu()
        have += len(acts)
        bar.update(len(acts))
    bar.close()
    return result
