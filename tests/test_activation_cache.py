"""The activation cache: SAELens's CacheActivationsRunner writes, ranks read slices."""

import pytest
import torch
from sae_lens.training.activations_store import ActivationsStore

from sae_gba.activation_cache import (
    CachedActivations,
    read_cached_tokens,
    write_activation_cache,
)
from tests.helpers import tiny_model, token_dataset

HOOK = "blocks.0.hook_resid_post"


def _cache(tmp_path):
    model = tiny_model()
    dataset = token_dataset(n_rows=24)
    path = write_activation_cache(
        model,
        tmp_path / "cache",
        hook_name=HOOK,
        d_in=32,
        context_size=16,
        training_tokens=15 * 24,
        dataset=dataset,
        model_batch_size=4,
    )
    return model, dataset, path


def test_cache_holds_the_models_activations_and_ranks_split_each_batch(tmp_path):
    model, dataset, path = _cache(tmp_path)
    assert not (tmp_path / ".cache.tmp").exists()
    whole = CachedActivations(path, batch_size=40, seed=1)
    assert (whole.context, whole.d_in) == (15, 32)  # BOS position dropped
    # Every cached row is the model's activations at positions 1.. of a context.
    tokens = torch.as_tensor(dataset["tokens"])
    _, cache = model.run_with_cache(tokens, names_filter=HOOK)
    expected = cache[HOOK][:, 1:]
    rows = whole.rows[:][whole.hook]
    assert rows.shape == expected.shape
    assert torch.allclose(rows, expected, atol=1e-5)
    # Two ranks' slices of each global batch make the global batch (3 epochs).
    ranks = [CachedActivations(path, 40, seed=1, rank=r, world=2) for r in (0, 1)]
    for _ in range(27):
        batch = next(whole)
        assert batch.shape == (40, 32)
        assert torch.equal(torch.cat([next(r) for r in ranks]), batch)
    assert whole.epoch == 2
    with pytest.raises(ValueError, match="holds 'blocks.0.hook_resid_post'; this run"):
        CachedActivations(path, 40, hook_name="blocks.1.hook_resid_post")
    # The position survives a checkpoint folder.
    whole.save_state(tmp_path)
    resumed = CachedActivations(path, batch_size=40, seed=1)
    resumed.load_state(tmp_path)
    assert torch.equal(next(resumed), next(whole))


def test_sae_lens_store_reads_the_same_cache(tmp_path):
    model, _, path = _cache(tmp_path)
    store = ActivationsStore(
        model=model,
        dataset=token_dataset(n_rows=24),
        streaming=False,
        hook_name=HOOK,
        hook_head_index=None,
        context_size=15,
        d_in=32,
        n_batches_in_buffer=2,
        total_training_tokens=15 * 24,
        store_batch_size_prompts=4,
        train_batch_size_tokens=20,
        prepend_bos=True,
        normalize_activations="none",
        device=torch.device("cpu"),
        dtype="float32",
        cached_activations_path=str(path),
    )
    raw, token_ids = store.get_raw_llm_batch()
    reader = CachedActivations(path, batch_size=40)
    assert torch.equal(raw, reader.rows[:4][reader.hook].reshape(-1, 32))
    assert token_ids is not None and token_ids.shape == (60,)


def test_whole_tensor_reads_leave_out_ignored_tokens(tmp_path):
    _, dataset, path = _cache(tmp_path)
    tokens = torch.as_tensor(dataset["tokens"])[:, 1:]
    reader = CachedActivations(path, batch_size=40)
    every = reader.rows[:][reader.hook].reshape(-1, 32)
    assert torch.equal(read_cached_tokens(path, 100), every[:100])
    ignored = int(tokens[0, 0])
    kept = every[(tokens.reshape(-1) != ignored)]
    assert len(kept) < len(every)
    assert torch.equal(read_cached_tokens(path, 200, (ignored,)), kept[:200])
    with pytest.raises(ValueError, match="holds 360 tokens"):
        read_cached_tokens(path, 361)
