"""The token-window reader: training or held-out windows for a model, with a label.

Without a dataset folder the windows come from the embedded Wikipedia slice, split by
article (:mod:`sae_gba.embedded`: 10% of the articles held out, seed 0), tokenized
with the model's own tokenizer (the embedded model's windows are cached). A local
``save_to_disk`` folder is read whole, or split by row when ``split_rows_of_dataset``
is set (training and held-out windows from one folder).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from sae_gba.lm.windows import (
    load_local_dataset,
    rows_to_windows,
    split_rows,
    tokenize_windows,
)

if TYPE_CHECKING:
    import datasets
    from transformer_lens import HookedTransformer

Split = Literal["train", "held_out"]
_WIKIPEDIA = {
    "train": "sae_gba.embedded Wikipedia, training articles",
    "held_out": "sae_gba.embedded Wikipedia, held-out articles",
}


def is_embedded_model(model: HookedTransformer) -> bool:
    """Whether ``model`` is the embedded Gemma-3-270M (by TransformerLens's name)."""
    from sae_gba.embedded import EMBEDDED_MODEL_NAME

    return model.cfg.model_name in (
        EMBEDDED_MODEL_NAME,
        EMBEDDED_MODEL_NAME.split("/")[-1],
    )


def read_windows(
    model: HookedTransformer,
    split: Split,
    context_size: int,
    dataset_path: str | Path | None = None,
    *,
    split_rows_of_dataset: bool = False,
    held_out_fraction: float = 0.1,
    seed: int = 0,
) -> tuple[torch.Tensor, str]:
    """Token windows for ``model`` and a label saying what they are.

    Args:
        model: the model whose tokenizer reads text.
        split: "train" or "held_out".
        context_size: tokens per window, BOS first.
        dataset_path: a ``save_to_disk`` folder ("tokens", "input_ids" or "text"
            rows) instead of the Wikipedia slice; read whole unless
            ``split_rows_of_dataset``.
        split_rows_of_dataset: split the folder's rows (:func:`split_rows`) and
            return the ``split`` part.
        held_out_fraction: share of the folder's rows held out when split.
        seed: seed of the row split.

    Returns:
        (n_windows, context_size) int64 windows, in order, and their label.
    """
    if dataset_path is None:
        return _wikipedia_windows(model, split, context_size), _WIKIPEDIA[split]
    data = load_local_dataset(dataset_path)
    label = f"local dataset {dataset_path}"
    if split_rows_of_dataset:
        data = split_rows(data, held_out_fraction, seed)[split == "held_out"]
        share = round(100 * held_out_fraction)
        label += (
            f", {100 - share}% of rows"
            if split == "train"
            else f", the other {share}% of rows (seeded split)"
        )
    return rows_to_windows(data, context_size, model.tokenizer, dataset_path), label


def _wikipedia_windows(
    model: HookedTransformer, split: Split, context_size: int
) -> torch.Tensor:
    from sae_gba import embedded

    if is_embedded_model(model):
        data = embedded.embedded_token_dataset(split, context_size)
        return torch.tensor(data["tokens"])
    if model.tokenizer is None:
        raise ValueError("the model has no tokenizer to read the Wikipedia slice")
    articles = embedded.split_articles(embedded.wikipedia_articles(), 0.1)
    texts = [a.text for a in articles[split == "held_out"]]
    return tokenize_windows(model.tokenizer, texts, context_size)


def windows_dataset(windows: torch.Tensor) -> datasets.Dataset:
    """Windows as a ``datasets.Dataset`` with a "tokens" column (SAELens's shape)."""
    import datasets

    return datasets.Dataset.from_dict({"tokens": windows.tolist()})
