"""Shared builders: tiny real TransformerLens models, in-memory token datasets."""

import pytest
import torch
from datasets import Dataset
from transformer_lens import HookedTransformer, HookedTransformerConfig

import sae_gba  # noqa: F401  (registers the architectures)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_model(d_model: int = 32, n_ctx: int = 16) -> HookedTransformer:
    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=d_model,
        n_ctx=n_ctx,
        d_head=8,
        n_heads=d_model // 8,
        d_vocab=64,
        act_fn="relu",
        d_mlp=2 * d_model,
    )
    return HookedTransformer(cfg)


def token_dataset(n_rows: int = 400, context: int = 16, vocab: int = 64) -> Dataset:
    tokens = torch.randint(
        1, vocab, (n_rows, context), generator=torch.Generator().manual_seed(1)
    )
    return Dataset.from_dict({"tokens": tokens.tolist()})


def runner_dict(sae: dict, output_path: str, **overrides) -> dict:
    """A LanguageModelSAERunnerConfig dict for the tiny model, wandb off."""
    return {
        "sae": sae,
        "logger": {"log_to_wandb": False},
        "model_name": "tiny-random",
        "hook_name": "blocks.0.hook_resid_post",
        "dataset_path": "in-memory",
        "context_size": 16,
        "training_tokens": 64 * 60,
        "train_batch_size_tokens": 64,
        "store_batch_size_prompts": 4,
        "n_batches_in_buffer": 4,
        "output_path": output_path,
        "checkpoint_path": None,
        "verbose": False,
        **overrides,
    }
