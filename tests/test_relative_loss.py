"""The per-token weights of GBA's relative loss, by hand."""

import torch

from sae_gba.relative_loss import relative_token_weights


def test_weights__only_tokens_above_the_reference_are_weighted_down():
    # squared norms 0, 1, 4, 16 and 36 against a reference of 4
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [4.0, 0.0], [0.0, -6.0]])
    weights = relative_token_weights(x, torch.tensor(4.0))
    assert weights.shape == (5, 1)
    expected = torch.tensor([[1.0], [1.0], [1.0], [0.25], [4.0 / 36.0]])
    assert torch.allclose(weights, expected)


def test_weights__keep_the_input_dtype_and_leading_dimensions():
    x = torch.full((2, 3, 4), 2.0, dtype=torch.bfloat16)  # squared norm 16
    weights = relative_token_weights(x, torch.tensor(8.0))
    assert weights.dtype == torch.bfloat16 and weights.shape == (2, 3, 1)
    assert torch.all(weights == 0.5)
