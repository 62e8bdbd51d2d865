"""Plain builders shared by the tests: tiny real TransformerLens models, in-memory
token datasets, runner configs and tokenizers (fixtures live in conftest.py)."""

import torch
from datasets import Dataset
from transformer_lens import HookedTransformer, HookedTransformerConfig

# Absorption stages cut down for speed: k up to 2, 5 probe epochs, lowered gates.
FAST_ABSORPTION = {
    "max_k_value": 2,
    "k_sparse_probe_num_epochs": 5,
    "min_GT_probe_f1": -1.0,
    "min_feats_for_eval": 1,
}
# The random Gemma-2 of the ``gemma2`` fixture: vocabulary size.
GEMMA2_VOCAB = 512


def tiny_model(
    d_model: int = 32, n_ctx: int = 16, tokenizer=None, **cfg_fields
) -> HookedTransformer:
    """A random 2-layer model; with a tokenizer, its vocabulary is the tokenizer's."""
    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=d_model,
        n_ctx=n_ctx,
        d_head=8,
        n_heads=d_model // 8,
        d_vocab=64 if tokenizer is None else len(tokenizer),
        act_fn="relu",
        d_mlp=2 * d_model,
        **cfg_fields,
    )
    return HookedTransformer(cfg, tokenizer=tokenizer)


def tiny_speller() -> HookedTransformer:
    """A tiny random bfloat16 model with the embedded Gemma-3 tokenizer (BOS on).

    Absorption needs a real tokenizer (letter-only vocabulary words); the tokenizer
    is passed in so that TransformerLens does not reload it (seconds).
    """
    from transformers import AutoTokenizer

    from sae_gba.embedded import embedded_model_dir

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir(), add_bos_token=True)
    torch.manual_seed(0)
    model = tiny_model(n_ctx=128, tokenizer=tokenizer, model_name="tiny-speller")
    return model.to(torch.bfloat16)


def spelling_model() -> HookedTransformer:
    """``tiny_speller`` made to spell: its residual stream is its token embedding,
    which holds the one-hot first letter of the token's text (attention, MLPs and
    positions write nothing). SAEBench's ground-truth probes pass their gate on it."""
    model = tiny_speller().float()
    tokens = model.tokenizer.convert_ids_to_tokens(list(range(model.cfg.d_vocab)))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("W_O", "W_out", "b_O", "b_out", "W_pos")):
                param.zero_()
        embed = 0.1 * torch.randn(model.cfg.d_vocab, model.cfg.d_model)
        for token_id, token in enumerate(tokens):
            text = (token or "").lstrip("\u2581 ").lower()
            if text[:1].isascii() and text[:1].isalpha():
                embed[token_id, ord(text[0]) - ord("a")] += 3.0
        model.W_E.copy_(embed)
    return model.to(torch.bfloat16)


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


def save_word_tokenizer(folder, vocab_size: int) -> None:
    """A word-level tokenizer (w4, w5, ...) with Gemma-2's special ids 0-3, saved."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]  # ids 0-3, as in Gemma2Config
    vocab = {t: i for i, t in enumerate(specials)}
    vocab.update({f"w{i}": i for i in range(len(specials), vocab_size)})
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
    ).save_pretrained(folder)


def cli_error(capsys, argv: list[str], code: int = 2) -> str:
    """Run ``sae-gba ARGV`` in-process, expecting exit ``code`` and one error line.

    Returns:
        The error line after ``sae-gba COMMAND: error: ``.
    """
    import pytest

    from sae_gba.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == code
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0]
    prefix = f"sae-gba {argv[0]}: error: "
    assert lines[0].startswith(prefix), lines[0]
    return lines[0][len(prefix) :]


def relative_weights_by_hand(
    x: torch.Tensor, input_scale: torch.Tensor, b_pre: torch.Tensor
) -> torch.Tensor:
    """GBA's relative-loss token weights from their definition, (..., 1):
    ``min(1, (c^2 + |b_pre|^2) / |x|^2)``, ``c^2 + |b_pre|^2`` the first batch's
    mean squared norm (``b_pre`` in input units)."""
    mean_square = input_scale**2 + b_pre.detach().square().sum()
    return (mean_square / x.square().sum(-1, keepdim=True)).clamp(max=1)
