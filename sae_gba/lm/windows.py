"""Token windows: the special-token rule, BOS-first windows and local datasets.

Nothing here loads a model or the embedded corpus (:mod:`sae_gba.lm.data` does), so
:mod:`sae_gba.embedded` can build its cached windows with the same code.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

TOKEN_COLUMNS = ("tokens", "input_ids", "text")


def special_token_ids(tokenizer: PreTrainedTokenizerBase | None) -> list[int]:
    """The token ids left out of training and metrics: BOS, EOS and PAD, sorted.

    Their activations are outliers (norms far above the rest) and not text; SAELens's
    ``exclude_special_tokens`` and SAEBench's ``ignore_tokens`` drop the same ids.

    Args:
        tokenizer: the model's tokenizer; None (no tokenizer) gives no ids.
    """
    if tokenizer is None:
        return []
    ids = {tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id}
    return sorted(i for i in ids if i is not None)


def check_context_size(context_size: int) -> None:
    """Refuse a window length that leaves no room for a text token after BOS."""
    if context_size < 2:
        raise ValueError(f"context_size must be an integer >= 2, got {context_size!r}")


def tokenize_windows(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], context_size: int
) -> torch.Tensor:
    """Concatenate texts (joined by a blank line) and cut BOS-prefixed windows.

    Each row is BOS followed by ``context_size - 1`` text tokens; Gemma's loss is far
    worse without BOS. The ragged tail is dropped.

    Args:
        tokenizer: A Hugging Face tokenizer with a BOS token.
        texts: Documents, in order.
        context_size: Tokens per window including BOS; at least 2.

    Returns:
        int64 tensor of shape ``[n_windows, context_size]``.
    """
    check_context_size(context_size)
    bos = tokenizer.bos_token_id
    if bos is None:
        raise ValueError("tokenizer has no bos_token_id; windows must start with BOS")
    sep = tokenizer.encode("\n\n", add_special_tokens=False)
    ids: list[int] = []
    for i, doc in enumerate(tokenizer(texts, add_special_tokens=False)["input_ids"]):
        ids.extend(sep if i else [])
        ids.extend(doc)
    body = context_size - 1
    windows = torch.tensor(ids[: len(ids) // body * body], dtype=torch.int64)
    windows = windows.view(-1, body)
    return torch.cat([torch.full_like(windows[:, :1], bos), windows], dim=1)


def load_local_dataset(path: str | Path) -> datasets.Dataset:
    """Load a dataset folder written by ``save_to_disk`` (tokenized or text).

    Args:
        path: the folder; a DatasetDict folder must have a "train" split. Rows need a
            "tokens" or "input_ids" column (pretokenized windows) or a "text" column.
    """
    import datasets

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"dataset folder {folder} does not exist; expected a folder written by "
            "datasets' save_to_disk"
        )
    try:
        data = datasets.load_from_disk(str(folder))
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"dataset folder {folder} is not a saved dataset ({err}); expected a "
            "folder written by datasets' save_to_disk"
        ) from err
    if isinstance(data, datasets.DatasetDict):
        if "train" not in data:
            raise ValueError(
                f"dataset folder {folder} has splits {list(data)}; expected 'train'"
            )
        data = data["train"]
    if not set(TOKEN_COLUMNS) & set(data.column_names):
        raise ValueError(
            f"dataset folder {folder} has columns {data.column_names}; expected one "
            f"of {list(TOKEN_COLUMNS)}"
        )
    return data


def token_column(data: datasets.Dataset) -> str:
    """The column a dataset's windows come from: "tokens", "input_ids" or "text"."""
    return next(c for c in TOKEN_COLUMNS if c in data.column_names)


def rows_to_windows(
    data: datasets.Dataset,
    context_size: int,
    tokenizer: PreTrainedTokenizerBase | None,
    where: str | Path,
) -> torch.Tensor:
    """A dataset's rows as ``(n, context_size)`` windows.

    Text rows are tokenized into BOS-first windows (:func:`tokenize_windows`);
    pretokenized rows are cut to ``context_size`` and must be at least that long.

    Args:
        data: rows with a "tokens", "input_ids" or "text" column.
        context_size: tokens per window.
        tokenizer: reads text rows (None: text rows are refused).
        where: what the rows are (for the messages).
    """
    column = token_column(data)
    if column == "text":
        if tokenizer is None:
            raise ValueError(f"{where} holds text and the model has no tokenizer")
        return tokenize_windows(tokenizer, data["text"], context_size)
    rows = data[column]
    short = sum(len(row) < context_size for row in rows)
    if short or not rows:
        raise ValueError(
            f"{where}: {short} of {len(rows)} {column} rows hold fewer than "
            f"context_size={context_size} tokens; every row must hold at least that"
        )
    return torch.tensor([row[:context_size] for row in rows], dtype=torch.int64)


def split_rows(
    data: datasets.Dataset, held_out_fraction: float = 0.1, seed: int = 0
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Split a dataset's rows once, seeded, into (train, held_out); order is kept.

    Args:
        data: at least 2 rows.
        held_out_fraction: share of rows held out (at least one row each side).
        seed: seed of the split.
    """
    if len(data) < 2:
        raise ValueError(f"the dataset needs at least 2 rows, has {len(data)}")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    n_held = min(max(1, round(len(data) * held_out_fraction)), len(data) - 1)
    train = data.select(sorted(order[n_held:].tolist()))
    return train, data.select(sorted(order[:n_held].tolist()))
