"""Memory for the fused step's large tensors, reused from one step to the next.

On CPU a fresh allocation of tens of MB is an ``mmap`` that glibc returns to the
kernel when freed, so every step faults its pages in again (about 2 us per 4 KiB page
on the machine of ``docs/bench``: ~0.1 s a step at d_in 2,304 and 16,384 latents).
PyTorch caches freed memory on CUDA but not on CPU, so the step keeps its own: the
pre-activations, the gate, the dense activations (where a block is dense) and the
directions' gradient, in storages it hands out again once nothing else holds them (the
previous step's ``hidden_pre`` or ``.grad`` gone).
A storage still held elsewhere is never written: the step allocates a fresh one.
"""

import math

import torch

# The count of holders of a storage (its tensors, plus the Python storage object
# this keeps). Without it (a torch that dropped the private call) nothing is reused.
_use_count = getattr(torch._C, "_storage_Use_Count", None)


class StepMemory:
    """Storages for named per-step tensors, handed out again once free.

    Args:
        slots: storages kept per name. Two let a step reuse memory while the previous
            step's output is still referenced (SAELens's training loop holds it until
            the next step returns).
    """

    def __init__(self, slots: int = 2):
        self.slots = slots
        self._storages: dict[str, list[torch.UntypedStorage]] = {}

    def empty(
        self,
        name: str,
        shape: tuple[int, ...],
        like: torch.Tensor,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """An uninitialised tensor whose memory is kept under ``name``.

        That memory is a kept storage of the tensor's size that nothing else holds, or
        else a fresh allocation, kept if fewer than ``slots`` are.

        Args:
            name: what the tensor is (storages are kept per name).
            shape: its shape.
            like: a tensor on the device to allocate on, with the default dtype.
            dtype: the dtype, if not ``like``'s.
        """
        dtype = like.dtype if dtype is None else dtype
        nbytes = math.prod(shape) * dtype.itemsize
        kept = [
            s
            for s in self._storages.get(name, [])
            if s.nbytes() == nbytes and s.device == like.device
        ]
        self._storages[name] = kept
        for storage in kept:
            if _use_count is not None and _use_count(storage._cdata) == 1:
                # A new tensor on the storage, not a view: autograd may then take it
                # as a parameter's .grad without copying it.
                return torch.empty(0, dtype=dtype, device=like.device).set_(
                    storage, 0, shape
                )
        tensor = torch.empty(shape, dtype=dtype, device=like.device)
        if _use_count is not None and len(kept) < self.slots:
            kept.append(tensor.untyped_storage())
        return tensor

    def release(self, name: str) -> None:
        """Stop keeping ``name``'s storages (a step that no longer needs them)."""
        self._storages.pop(name, None)
