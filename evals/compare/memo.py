"""The memoised forward pass: every SAE's eval reuses the model's activations.

Every SAE's core eval runs the model over the same held-out windows in the same
batches, and every absorption eval over the same prompts, so :func:`memoized_forward`
keeps the model's activations from the first SAE and returns them to the rest: the
tensors SAEBench receives are the ones the model produced, and its metric code runs
unchanged. Only the CE/KL passes, which splice each SAE into the model, run for every
SAE.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


def _key(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        raw = value.detach().cpu().contiguous().flatten().view(torch.uint8)
        digest = hashlib.sha1(raw.numpy().tobytes())
        return ("tensor", tuple(value.shape), str(value.dtype), digest.hexdigest())
    if isinstance(value, (list, tuple)):
        return tuple(_key(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _key(v)) for k, v in value.items()))
    return value


@contextlib.contextmanager
def memoized_forward(
    model: HookedTransformer, max_bytes: int = 2**30
) -> Iterator[dict[str, int]]:
    """Within the block, repeated ``model.run_with_cache`` calls reuse the first result.

    A call is identified by its inputs (token tensors by content, prompt strings as
    they are) and keyword arguments; the first call runs the model and its output and
    cached activations are kept (detached) while they fit in ``max_bytes``; a repeat
    gets the same tensors in a new cache object. The model's class is swapped for a
    subclass for the duration, so wrappers that call ``type(model).run_with_cache``
    (``sae_gba_evals.saebench.absorption.stop_after_layer``) are memoised too.

    Yields:
        Counters: ``hits``, ``misses``, ``bytes`` kept.
    """
    from transformer_lens import ActivationCache

    base = type(model)
    store: dict[Any, tuple[Any, dict[str, torch.Tensor]]] = {}
    stats = {"hits": 0, "misses": 0, "bytes": 0}

    def run_with_cache(self: Any, *args: Any, **kwargs: Any) -> Any:
        key = (_key(args), _key(kwargs))
        if key in store:
            stats["hits"] += 1
            out, tensors = store[key]
            return out, ActivationCache(dict(tensors), self)
        stats["misses"] += 1
        out, cache = base.run_with_cache(self, *args, **kwargs)
        tensors = {k: v.detach() for k, v in cache.cache_dict.items()}
        out = out.detach() if isinstance(out, torch.Tensor) else out
        kept = {t.untyped_storage().data_ptr(): t for t in tensors.values()}
        if isinstance(out, torch.Tensor):
            kept[out.untyped_storage().data_ptr()] = out
        size = sum(t.untyped_storage().nbytes() for t in kept.values())
        if stats["bytes"] + size <= max_bytes:
            store[key] = (out, tensors)
            stats["bytes"] += size
        return out, cache

    model.__class__ = type(f"Memoized{base.__name__}", (base,), {})
    model.__class__.run_with_cache = run_with_cache  # type: ignore[method-assign]
    try:
        yield stats
    finally:
        model.__class__ = base
