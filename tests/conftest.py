"""Fixtures shared by the tests (plain builders are in helpers.py)."""

import pytest
import torch

import sae_gba  # noqa: F401  (registers the architectures)
from tests.helpers import GEMMA2_VOCAB, save_word_tokenizer


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def gemma2(tmp_path_factory):
    """(folder, HF model) of a random 2-layer Gemma-2 with Gemma-2-2B's width."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(
        num_hidden_layers=2, vocab_size=GEMMA2_VOCAB, intermediate_size=512
    )
    assert (config.hidden_size, config.num_attention_heads) == (2304, 8)
    assert (config.num_key_value_heads, config.head_dim) == (4, 256)
    hf_model = Gemma2ForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("gemma2")
    hf_model.save_pretrained(folder)
    save_word_tokenizer(folder, GEMMA2_VOCAB)
    return folder, hf_model
