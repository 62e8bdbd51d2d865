"""The language-model layer (sae_gba.lm): the special-token rule, the window reader
and split, and the harvest, on a tiny random model with the embedded tokenizer."""

import pytest
import torch
from datasets import Dataset

from sae_gba.lm.data import read_windows
from sae_gba.lm.harvest import harvest, hook_layer
from sae_gba.lm.windows import special_token_ids
from tests.helpers import tiny_speller

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def speller():
    return tiny_speller()


def _windows(n: int, context: int = 16, seed: int = 1) -> torch.Tensor:
    """Random Gemma-3 token windows, BOS (id 2) first."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(300, 5_000, (n, context), generator=g)
    tokens[:, 0] = 2
    return tokens


def test_special_token_ids__are_gemmas_pad_eos_bos(speller):
    assert special_token_ids(speller.tokenizer) == [0, 1, 2]
    assert special_token_ids(None) == []


def test_harvest__drops_special_tokens_and_stops_at_n_tokens(speller):
    windows = _windows(10)
    windows[3, 5] = 1  # an EOS inside a window is dropped too
    _, cache = speller.run_with_cache(windows, names_filter=HOOK)
    text = cache[HOOK][(windows != 2) & (windows != 1)]
    acts = harvest(speller, HOOK, windows, 100, 4, False)
    assert acts.dtype == torch.bfloat16
    torch.testing.assert_close(acts, text[:100])
    every = harvest(speller, HOOK, windows, batch_windows=3, progress=False)
    torch.testing.assert_close(every, text)
    kept = harvest(speller, HOOK, windows, progress=False, keep_special=True)
    torch.testing.assert_close(kept, cache[HOOK].flatten(0, 1))
    with pytest.raises(ValueError, match="hold 149 text tokens; n_tokens=150"):
        harvest(speller, HOOK, windows, 150, 4, False)


def test_hook_layer__reads_block_hooks_only():
    assert hook_layer("blocks.12.hook_resid_post") == 12
    with pytest.raises(ValueError, match="hook_name='embed' is not a block hook"):
        hook_layer("embed")


def test_read_windows__splits_local_rows_once_and_cuts_them(speller, tmp_path):
    rows = [[2, *range(1000 + 100 * i, 1020 + 100 * i)] for i in range(20)]
    Dataset.from_dict({"tokens": rows}).save_to_disk(tmp_path / "rows")
    path = tmp_path / "rows"
    train, train_label = read_windows(
        speller, "train", 16, path, split_rows_of_dataset=True
    )
    held, held_label = read_windows(
        speller, "held_out", 16, path, split_rows_of_dataset=True
    )
    assert (train.shape, held.shape) == ((18, 16), (2, 16))
    assert train_label == f"local dataset {path}, 90% of rows"
    assert held_label == f"local dataset {path}, the other 10% of rows (seeded split)"
    firsts = {int(w[1]) for w in train} | {int(w[1]) for w in held}
    assert firsts == {1000 + 100 * i for i in range(20)}  # disjoint, all rows
    assert train.tolist() == [
        r[:16] for r in rows if r[1] in {int(w[1]) for w in train}
    ]
    whole, label = read_windows(speller, "held_out", 16, path)
    assert whole.tolist() == [r[:16] for r in rows] and label == f"local dataset {path}"
    with pytest.raises(ValueError, match="20 of 20 tokens rows hold fewer than"):
        read_windows(speller, "held_out", 32, path)


def test_read_windows__tokenizes_text_rows_bos_first(speller, tmp_path):
    texts = ["The cat sat on the mat. " * 20, "A dog ran in the park. " * 20]
    Dataset.from_dict({"text": texts}).save_to_disk(tmp_path / "text")
    windows, _ = read_windows(speller, "held_out", 8, tmp_path / "text")
    ids = speller.tokenizer("The cat sat", add_special_tokens=False)["input_ids"]
    assert (windows[:, 0] == 2).all() and windows.shape[1] == 8
    assert windows[0, 1:4].tolist() == ids
