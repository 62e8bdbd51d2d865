"""Buffers that must keep their dtype when a module is cast."""

from collections.abc import Iterable

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
