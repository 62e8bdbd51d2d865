"""Buffers and saved state that must keep their dtype when a module is cast or loaded."""

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn


def keep_float32(module: nn.Module, names: Iterable[str]) -> None:
    """Cast the named buffers of ``module`` back to float32 where a cast changed them.

    ``nn.Module.to(dtype)`` casts every float buffer; controller and estimator state
    (counts, peaks, variances) would lose precision in bfloat16.

    Args:
        module: the module, after ``_apply``.
        names: buffer names; missing ones are skipped.
    """
    for name in names:
        buffer = module._buffers.get(name)
        if buffer is not None and buffer.dtype != torch.float32:
            module._buffers[name] = buffer.float()


def restore_state_dtypes(
    state_dict: dict[str, Any], float32: Iterable[str], counters: Iterable[str]
) -> None:
    """Give loaded state back its own dtypes: float32 state and int64 counters.

    SAELens's disk loader casts every tensor of a checkpoint to ``cfg.dtype``;
    counters stored as floats come back rounded to integers.

    Args:
        state_dict: the state about to be loaded (changed in place).
        float32: names of state kept in float32; missing ones are skipped.
        counters: names of integer counters; missing ones are skipped.
    """
    for name in counters:
        if name in state_dict:
            state_dict[name] = state_dict[name].round().to(torch.int64)
    for name in float32:
        if name in state_dict:
            state_dict[name] = state_dict[name].float()
