"""Model activations harvested once to disk and read by any number of runs and ranks.

Writing is SAELens's own ``CacheActivationsRunner``: a Hugging Face dataset folder
with one row per context window, a ``(context, d_in)`` column named after the hook
and the ``token_ids`` (:func:`write_activation_cache`; SAELens's runner loads its
model by name, so :class:`LoadedModelCacheRunner` hands it one already loaded, such
as the embedded GGUF Gemma-3). SAELens's ``use_cached_activations`` store reads the
same folder, so ``LanguageModelSAERunnerConfig(use_cached_activations=True,
cached_activations_path=...)`` trains from it in one process.

Reading for data-parallel runs is :class:`CachedActivations`, not that store: the
store reads the rows in order through a per-process mixing buffer, so its batches
depend on the number of processes and a checkpoint cannot hold its position. Here the
global batches are whole context rows in a seeded order, the same for any number of
ranks; each rank reads only the rows of its slice (sparsify also batches whole
sequences), and the position is three integers, so a resumed run is exact.
"""

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import torch
from datasets import Array2D, Features, Sequence, Value
from sae_lens import CacheActivationsRunner
from sae_lens.cache_activations_runner import _mk_activations_store
from sae_lens.config import CacheActivationsRunnerConfig

from sae_gba.atomic import replace_folder
from sae_gba.collectives import rank_and_world
from sae_gba.training import DATA_STATE_FILENAME

TOKEN_IDS = "token_ids"


class LoadedModelCacheRunner(CacheActivationsRunner):
    """SAELens's ``CacheActivationsRunner`` on a model that is already loaded.

    Args:
        cfg: the runner config.
        model: the loaded HookedTransformer (SAELens's runner would load
            ``cfg.model_name`` itself).
        override_dataset: the dataset to read instead of ``cfg.dataset_path``.
    """

    def __init__(
        self,
        cfg: CacheActivationsRunnerConfig,
        model: Any,
        override_dataset: Any = None,
    ):
        self.cfg, self.model = cfg, model
        self.activations_store = _mk_activations_store(
            model, cfg, override_dataset=override_dataset
        )
        self.context_size = self._get_sliced_context_size(
            cfg.context_size, cfg.seqpos_slice
        )
        self.features = Features(
            {
                cfg.hook_name: Array2D(
                    shape=(self.context_size, cfg.d_in), dtype=cfg.dtype
                ),
                TOKEN_IDS: Sequence(Value(dtype="int32"), length=self.context_size),
            }
        )


def write_activation_cache(
    model: Any,
    out: str | Path,
    *,
    hook_name: str,
    d_in: int,
    context_size: int,
    training_tokens: int,
    dataset: Any,
    model_batch_size: int = 16,
    seqpos_slice: tuple[int | None, ...] = (1, None),
    device: str = "cpu",
) -> Path:
    """Harvest ``training_tokens`` activations with SAELens's runner into ``out``.

    The folder is written beside ``out`` and renamed into place when complete.

    Args:
        model: the loaded HookedTransformer.
        out: the cache folder (must not exist).
        hook_name: TransformerLens hook whose activations are cached.
        d_in: model width at the hook.
        context_size: tokens per context window (before ``seqpos_slice``).
        training_tokens: tokens to harvest.
        dataset: the (tokenized) Hugging Face dataset to read.
        model_batch_size: context windows per model forward pass.
        seqpos_slice: positions kept; the default drops the BOS position, whose
            activations are outliers and not text.
        device: where the model runs.
    """
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"activation cache {out} exists; remove it or reuse it")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    kept = len(range(context_size)[slice(*seqpos_slice)])
    batch_bytes = model_batch_size * kept * d_in * 4
    batches = -(-training_tokens // (model_batch_size * kept))
    cfg = CacheActivationsRunnerConfig(
        dataset_path="in-memory",
        model_name=model.cfg.model_name,
        model_batch_size=model_batch_size,
        hook_name=hook_name,
        d_in=d_in,
        training_tokens=batches * model_batch_size * kept,
        context_size=context_size,
        new_cached_activations_path=str(tmp),
        shuffle=False,  # the reader draws rows in its own seeded order
        device=device,
        # One shard holds the whole harvest up to SAELens's 2 GB per shard.
        buffer_size_gb=min(2.0, (batches * batch_bytes + 1) / 1e9),
        seqpos_slice=seqpos_slice,
        streaming=False,
    )
    LoadedModelCacheRunner(cfg, model, override_dataset=dataset).run()
    return replace_folder(tmp, out)


class CachedActivations(Iterator[torch.Tensor]):
    """This rank's rows of every global batch drawn from an activation cache.

    A global batch is the next ``batch_size`` tokens of the cache's context rows
    taken in a seeded random order (a new order every epoch); rank ``r`` of ``W``
    gets tokens ``[r k, (r+1) k)`` of it (``k = batch_size / W``) and reads only the
    rows they lie in. Without a process group it is the whole global batch.

    Args:
        path: a folder written by :func:`write_activation_cache` (or SAELens's
            ``CacheActivationsRunner``).
        batch_size: tokens per global batch (a multiple of the number of ranks).
        seed: seed of the row order.
        dtype: dtype of the returned batches.
        rank: this rank (None: the process group's, 0 without one).
        world: the number of ranks (None: the process group's, 1 without one).
        hook_name: the hook the run trains on; a cache of another hook is refused
            (None: any).
    """

    def __init__(
        self,
        path: str | Path,
        batch_size: int,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        rank: int | None = None,
        world: int | None = None,
        hook_name: str | None = None,
    ):
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(
                f"activation cache {path} does not exist; write one with "
                "write_activation_cache (sae-gba train --nproc does it first)"
            )
        data = datasets.load_from_disk(str(path))
        hooks = [c for c in data.column_names if c != TOKEN_IDS]
        if len(hooks) != 1:
            raise ValueError(
                f"activation cache {path} has columns {data.column_names}; expected "
                "one hook column and token_ids"
            )
        self.hook = hooks[0]
        if hook_name is not None and hook_name != self.hook:
            raise ValueError(
                f"activation cache {path} holds {self.hook!r}; this run trains on "
                f"{hook_name!r} (harvest that hook into another folder)"
            )
        self.rows = data.with_format("torch", columns=[self.hook])
        self.context, self.d_in = data.features[self.hook].shape
        group = rank_and_world()
        self.rank = group[0] if rank is None else rank
        self.world = group[1] if world is None else world
        tokens = len(data) * self.context
        if not 1 <= batch_size <= tokens or batch_size % self.world:
            raise ValueError(
                f"batch_size={batch_size} is invalid: must be in [1, {tokens}] (the "
                f"cache's tokens) and a multiple of the {self.world} ranks"
            )
        self.batch_size, self.seed, self.dtype = batch_size, seed, dtype
        self.epoch = self.position = 0
        self._order = self._permutation()

    def _permutation(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(len(self.rows), generator=generator)

    def __next__(self) -> torch.Tensor:
        if self.position + self.batch_size > len(self.rows) * self.context:
            self.epoch += 1
            self.position = 0
            self._order = self._permutation()
        share = self.batch_size // self.world
        start = self.position + self.rank * share
        first, last = start // self.context, (start + share - 1) // self.context
        rows = self.rows[self._order[first : last + 1].tolist()][self.hook]
        offset = start - first * self.context
        self.position += self.batch_size
        return rows.reshape(-1, self.d_in)[offset : offset + share].to(self.dtype)

    def save_state(self, folder: Path) -> None:
        """Write the position (the same on every rank) into a checkpoint folder."""
        state = {"seed": self.seed, "epoch": self.epoch, "position": self.position}
        (Path(folder) / DATA_STATE_FILENAME).write_text(json.dumps(state))

    def load_state(self, folder: Path) -> None:
        """Continue from the position saved in a checkpoint folder."""
        state = json.loads((Path(folder) / DATA_STATE_FILENAME).read_text())
        self.seed, self.epoch, self.position = (
            state["seed"],
            state["epoch"],
            state["position"],
        )
        self._order = self._permutation()


def fill_preset_cache(
    preset: Any,
    out: str | Path,
    *,
    model_path: str | None = None,
    dataset_path: str | None = None,
    training_tokens: int | None = None,
    layer: int | None = None,
    device: str = "cpu",
) -> Path:
    """Harvest a model preset's activations (the run's tokens) into ``out``.

    Args:
        preset: a ``sae_gba.presets.ModelPreset`` (the embedded one: the demo's model
            and Wikipedia slice).
        out: the cache folder (must not exist).
        model_path: local model folder (see ``presets.load_hooked_model``).
        dataset_path: local dataset folder; None as in ``presets.train_preset``.
        training_tokens: tokens to harvest; None keeps the preset's.
        layer: residual stream block; None keeps the preset's.
        device: where the model runs.
    """
    from sae_gba.presets import (
        EMBEDDED_DATASET,
        load_hooked_model,
        load_local_dataset,
    )

    if dataset_path is not None:
        dataset = load_local_dataset(dataset_path)
    elif preset.dataset_path == EMBEDDED_DATASET:
        from sae_gba.embedded import embedded_token_dataset

        dataset = embedded_token_dataset("train", preset.context_size).shuffle(
            seed=preset.seed
        )
    else:
        dataset = datasets.load_dataset(
            preset.dataset_path, split="train", streaming=preset.streaming
        )
    layer = preset.layer if layer is None else layer
    return write_activation_cache(
        load_hooked_model(preset, model_path, device=device),
        out,
        hook_name=preset.hook_name_at(layer),
        d_in=preset.d_in,
        context_size=preset.context_size,
        training_tokens=preset.training_tokens
        if training_tokens is None
        else training_tokens,
        dataset=dataset,
        model_batch_size=preset.store_batch_size_prompts,
        device=device,
    )


def read_cached_tokens(
    path: str | Path, n_tokens: int, ignore_ids: tuple[int, ...] = ()
) -> torch.Tensor:
    """The first ``n_tokens`` activations of a cache, in its row order, as one tensor.

    For in-memory consumers of a harvest (``sae-gba compare`` trains every method
    on one tensor): the cache stands in for harvesting again.

    Args:
        path: a folder written by :func:`write_activation_cache`.
        n_tokens: activations to return.
        ignore_ids: token ids whose positions are left out (e.g. EOS and PAD; the
            BOS position is not cached).

    Returns:
        (n_tokens, d_in) activations in the cache's dtype.
    """
    data = datasets.load_from_disk(str(path))
    hook = next(c for c in data.column_names if c != TOKEN_IDS)
    rows = data.with_format("torch", columns=[hook, TOKEN_IDS])
    context, d_in = data.features[hook].shape
    result = torch.empty(n_tokens, d_in)
    have = 0
    per_read = max(1, 65_536 // context)
    for start in range(0, len(rows), per_read):
        chunk = rows[start : start + per_read]
        keep = ~torch.isin(
            chunk[TOKEN_IDS], torch.tensor(ignore_ids, dtype=torch.int32)
        )
        acts = chunk[hook][keep][: n_tokens - have]
        result[have : have + len(acts)] = acts
        have += len(acts)
        if have == n_tokens:
            return result
    raise ValueError(
        f"activation cache {path} holds {have:,} tokens (ignoring {list(ignore_ids)}); "
        f"{n_tokens:,} were asked for"
    )
