"""Training data that resumes exactly: :class:`TensorDataProvider` over in-memory
activations and :class:`ActivationStream` over SAELens's ``ActivationsStore``, each
saving its position (and the stream its mixing buffer) into a checkpoint folder."""

import contextlib
import inspect
import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from sae_lens.training.mixing_buffer import mixing_buffer
from safetensors.torch import load_file, save_file

DATA_STATE_FILENAME = "data_provider_state.json"
STREAM_TENSORS_FILENAME = "activation_stream.safetensors"
STREAM_STATE_FILENAME = "activation_stream.json"


class TensorDataProvider(Iterator[torch.Tensor]):
    """Endless batches from an in-memory activation tensor, reshuffled every epoch.

    The order is a function of ``(seed, epoch)``, so the provider's state is just
    two integers and a resumed provider yields exactly the batches it would have.

    Args:
        activations: (n_rows, d_in) float tensor.
        batch_size: rows per batch (<= n_rows).
        seed: shuffling seed.
    """

    def __init__(self, activations: torch.Tensor, batch_size: int, seed: int = 0):
        if activations.ndim != 2:
            raise ValueError(
                f"activations must be 2-D (n_rows, d_in), got shape {tuple(activations.shape)}"
            )
        if not 1 <= batch_size <= activations.shape[0]:
            raise ValueError(
                f"batch_size={batch_size} must be in [1, n_rows={activations.shape[0]}]"
            )
        self.activations = activations
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order = self._permutation()

    def _permutation(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.activations.shape[0], generator=generator)

    def __next__(self) -> torch.Tensor:
        if self.position + self.batch_size > self.activations.shape[0]:
            self.epoch += 1
            self.position = 0
            self._order = self._permutation()
        rows = self._order[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return self.activations[rows]

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed, self.epoch, self.position = (
            state["seed"],
            state["epoch"],
            state["position"],
        )
        self._order = self._permutation()

    def save_state(self, folder: Path) -> None:
        """Write the position into a checkpoint folder."""
        (folder / DATA_STATE_FILENAME).write_text(json.dumps(self.state_dict()))

    def load_state(self, folder: Path) -> None:
        """Continue from the position saved in a checkpoint folder."""
        self.load_state_dict(json.loads((folder / DATA_STATE_FILENAME).read_text()))


class ActivationStream(Iterator[torch.Tensor]):
    """Batches from an SAELens ``ActivationsStore``, with an exactly resumable position.

    SAELens's store checkpoints only how many dataset rows it has read: the
    activations waiting in its mixing buffer and the random state that shuffles them
    are lost, so a run resumed through it trains on other batches. This stream also
    saves those, and a log of the store's token reads; a resumed stream re-reads the
    dataset up to the same place (no model forward) and then yields exactly the
    batches the uninterrupted stream would have.

    Args:
        store: the runner's ``ActivationsStore``, before any batch was drawn.
    """

    def __init__(self, store: Any):
        self.store = store
        self.token_reads: list[tuple[int | None, bool]] = []
        self._read_tokens = store.get_batch_tokens

        def logged_read(
            batch_size: int | None = None,
            raise_at_epoch_end: bool = False,
            move_to_model_device: bool = True,
        ) -> torch.Tensor:
            self.token_reads.append((batch_size, raise_at_epoch_end))
            return self._read_tokens(
                batch_size, raise_at_epoch_end, move_to_model_device
            )

        store.get_batch_tokens = logged_read

    def __next__(self) -> torch.Tensor:
        return next(self.store)

    def save_state(self, folder: Path) -> None:
        """Write the token-read log, the mixing buffer and the random state."""
        tensors = {"rng_state": torch.get_rng_state()}
        state: dict[str, Any] = {"token_reads": self.token_reads}
        if self.store._dataloader is not None:
            storage, unserved, state["mixing"] = _mixing_state(self.store._dataloader)
            tensors.update(storage=storage, unserved=unserved)
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
            folder / STREAM_TENSORS_FILENAME,
        )
        (folder / STREAM_STATE_FILENAME).write_text(json.dumps(state))

    def load_state(self, folder: Path) -> None:
        """Continue from the position saved by :meth:`save_state` (fresh store only)."""
        state = json.loads((folder / STREAM_STATE_FILENAME).read_text())
        tensors = load_file(folder / STREAM_TENSORS_FILENAME)
        for batch_size, raise_at_epoch_end in state["token_reads"]:
            # A read that ended an epoch ends it here too.
            with contextlib.suppress(StopIteration):
                self._read_tokens(batch_size, raise_at_epoch_end, False)
        self.token_reads = [tuple(read) for read in state["token_reads"]]
        if "mixing" in state:
            device = self.store.device
            rest = tensors["unserved"].to(device)
            self.store._dataloader = _ResumedMixing(
                list(rest.split(state["mixing"]["batch_size"])) if len(rest) else [],
                tensors["storage"].to(device),
                self.store,
                state["mixing"],
            )
        torch.set_rng_state(tensors["rng_state"])


class _ResumedMixing(Iterator[torch.Tensor]):
    """SAELens's mixing buffer as a checkpoint left it: the batches it had not served
    yet, then the buffer again, starting from the activations it kept for mixing."""

    def __init__(
        self,
        unserved: list[torch.Tensor],
        storage: torch.Tensor,
        store: Any,
        mixing: dict[str, Any],
    ):
        self.unserved, self.storage, self.store = unserved, storage, store
        self.mixing = mixing
        self.generator: Iterator[torch.Tensor] | None = None

    def __next__(self) -> torch.Tensor:
        if self.unserved:
            return self.unserved.pop(0)
        if self.generator is None:
            loader = itertools.chain(
                [self.storage], self.store._iterate_filtered_activations()
            )
            self.generator = mixing_buffer(activations_loader=loader, **self.mixing)
        return next(self.generator)


def _mixing_state(
    loader: Any,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(kept activations, unserved batches, buffer settings) of a mixing buffer."""
    if isinstance(loader, _ResumedMixing):
        if loader.generator is None:
            rest = loader.unserved or [loader.storage[:0]]
            return loader.storage, torch.cat(rest), loader.mixing
        loader = loader.generator
    # The generator is paused at a yield: its locals are its state. torch.no_grad
    # wraps it in a generator that holds it as ``gen``.
    inner = inspect.getgeneratorlocals(loader).get("gen", loader)
    local = inspect.getgeneratorlocals(inner)
    size = local["batch_size"]
    served = (local["batch_idx"] + 1) * size
    end = local["num_serving_batches"] * size
    mixing = {k: local[k] for k in ("buffer_size", "batch_size", "mix_fraction")}
    return local["storage_buffer"], local["serving_buffer"][served:end], mixing
