"""Presets: the paper's Gemma-2-2B constants, and its wiring on a random Gemma-2.

The model is a randomly initialised 2-layer Gemma-2 with Gemma-2-2B's width and head
layout (so activations have the real shape) and a small vocab and MLP (so it is fast),
saved with a tiny word-level tokenizer into a local folder: nothing is downloaded.
"""

import dataclasses
import json

import pytest
import torch
from datasets import Dataset
from sae_lens import LanguageModelSAETrainingRunner
from sae_lens.saes.sae import SAE

from sae_gba.cli import main
from sae_gba.lm.windows import load_local_dataset
from sae_gba.presets import (
    EMBEDDED,
    GEMMA_2_2B,
    PRESETS,
    gba_runner_config,
    load_hooked_model,
    train_preset,
)
from tests.helpers import GEMMA2_VOCAB

VOCAB = GEMMA2_VOCAB
BOS = 2  # Gemma2Config's default bos_token_id
LAYER = 1
# Small runs: 16-token windows, 64-token batches, 2-step adaptation windows.
SMALL = dataclasses.replace(
    GEMMA_2_2B,
    context_size=16,
    batch_tokens=64,
    store_batch_size_prompts=4,
    n_batches_in_buffer=4,
    adaptation_interval=2,
)


@pytest.fixture(scope="module")
def model(gemma2):
    return load_hooked_model(GEMMA_2_2B, str(gemma2[0]))


def _tokens(n_rows: int, context: int = 16) -> torch.Tensor:
    rows = torch.randint(
        4, VOCAB, (n_rows, context), generator=torch.Generator().manual_seed(1)
    )
    rows[:, 0] = BOS
    return rows


def test_gemma_2_2b_preset_is_the_papers_setup():
    assert PRESETS == {"embedded": EMBEDDED, "gemma-2-2b": GEMMA_2_2B}
    assert GEMMA_2_2B.model_name == "google/gemma-2-2b"
    assert GEMMA_2_2B.hook_name == "blocks.12.hook_resid_post"
    assert (GEMMA_2_2B.d_in, GEMMA_2_2B.d_sae) == (2304, 65_536)
    assert (GEMMA_2_2B.batch_tokens, GEMMA_2_2B.adaptation_interval) == (512, 50)
    assert EMBEDDED.hook_name == "blocks.9.hook_resid_post"
    assert (EMBEDDED.d_in, EMBEDDED.d_sae, EMBEDDED.training_tokens) == (
        640,
        4096,
        560_000,
    )


def test_runner_config_is_an_ordinary_gba_run(tmp_path):
    cfg = gba_runner_config(GEMMA_2_2B, output_path=str(tmp_path))
    assert cfg.sae.architecture() == "gba"
    assert (cfg.sae.d_in, cfg.sae.d_sae, cfg.sae.adaptation_interval) == (
        2304,
        65_536,
        50,
    )
    assert cfg.hook_name == "blocks.12.hook_resid_post"
    assert (cfg.train_batch_size_tokens, cfg.context_size) == (512, 1024)
    assert cfg.dataset_path == GEMMA_2_2B.dataset_path and cfg.streaming
    assert cfg.sae.normalize_activations == "constant_norm_rescale"
    assert cfg.exclude_special_tokens is True
    assert not cfg.logger.log_to_wandb
    small = gba_runner_config(
        GEMMA_2_2B,
        output_path="x",
        d_sae=256,
        layer=3,
        training_tokens=5120,
        n_groups=4,
    )
    assert (small.sae.d_sae, small.sae.n_groups) == (256, 4)
    assert (small.hook_name, small.training_tokens) == (
        "blocks.3.hook_resid_post",
        5120,
    )
    with pytest.raises(ValueError, match="layer"):
        gba_runner_config(GEMMA_2_2B, output_path="x", layer=-1)
    topk = gba_runner_config(GEMMA_2_2B, output_path="x", architecture="topk", k=64)
    assert (topk.sae.architecture(), topk.sae.k) == ("topk", 64)
    with pytest.raises(ValueError, match="architecture='nope' is invalid"):
        gba_runner_config(GEMMA_2_2B, output_path="x", architecture="nope")


def test_random_gemma2_loads_with_the_folders_shape(gemma2, model):
    _, hf_model = gemma2
    assert (model.cfg.d_model, model.cfg.n_layers) == (2304, 2)
    assert (model.cfg.d_mlp, model.cfg.d_vocab) == (512, VOCAB)
    tokens = _tokens(2)
    with torch.no_grad():
        logits = model(tokens)
        expected = hf_model(tokens).logits
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    _, cache = model.run_with_cache(tokens, names_filter=SMALL.hook_name_at(LAYER))
    assert cache[SMALL.hook_name_at(LAYER)].shape == (2, 16, 2304)


def test_bad_model_paths_are_named(tmp_path):
    from transformers import Gemma2Config, GPT2Config

    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_hooked_model(GEMMA_2_2B, str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_hooked_model(GEMMA_2_2B, str(tmp_path))
    GPT2Config(n_layer=1).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="'gpt2' model.*Gemma-2"):
        load_hooked_model(GEMMA_2_2B, str(tmp_path / "gpt2"))
    Gemma2Config(hidden_size=256).save_pretrained(tmp_path / "narrow")
    with pytest.raises(ValueError, match="hidden_size 256.*d_in 2304"):
        load_hooked_model(GEMMA_2_2B, str(tmp_path / "narrow"))
    with pytest.raises(ValueError, match="no model path"):
        load_hooked_model(EMBEDDED, str(tmp_path))


def test_bad_dataset_paths_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_local_dataset(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="not a saved dataset"):
        load_local_dataset(tmp_path)
    Dataset.from_dict({"label": [1, 2]}).save_to_disk(tmp_path / "labels")
    with pytest.raises(ValueError, match="columns"):
        load_local_dataset(tmp_path / "labels")


def test_training_exports_an_sae_that_matches(tmp_path, model):
    cfg = gba_runner_config(
        SMALL,
        output_path=str(tmp_path / "sae"),
        layer=LAYER,
        d_sae=256,
        training_tokens=64 * 8,
        n_groups=4,
    )
    dataset = Dataset.from_dict({"tokens": _tokens(64).tolist()})
    runner = LanguageModelSAETrainingRunner(
        cfg, override_model=model, override_dataset=dataset
    )
    sae = runner.run()
    assert sae.input_scale > 0 and sae.gate_bias.abs().sum() > 0  # adapted

    exported = SAE.load_from_disk(tmp_path / "sae")
    assert exported.cfg.architecture() == "jumprelu"
    assert (exported.cfg.d_in, exported.cfg.d_sae) == (2304, 256)
    assert exported.cfg.metadata.hook_name == "blocks.1.hook_resid_post"
    _, cache = model.run_with_cache(_tokens(2), names_filter=cfg.hook_name)
    acts = cache[cfg.hook_name][:, 1:].reshape(-1, 2304)
    with torch.no_grad():
        assert exported.encode(acts).count_nonzero() > 0  # not a trivial match
        torch.testing.assert_close(exported(acts), sae(acts), atol=1e-4, rtol=1e-4)


def test_train_preset_reads_local_folders(tmp_path, gemma2):
    data = tmp_path / "data"
    Dataset.from_dict({"tokens": _tokens(32).tolist()}).save_to_disk(data)
    train_preset(
        SMALL,
        tmp_path / "run",
        model_path=str(gemma2[0]),
        dataset_path=str(data),
        d_sae=64,
        training_tokens=64 * 4,
        layer=LAYER,
    )
    saved = json.loads((tmp_path / "run" / "sae" / "cfg.json").read_text())
    assert (saved["d_in"], saved["d_sae"]) == (2304, 64)
    # sae-gba inspect finds the model and held-out rows the same way.
    argv = ["inspect", str(tmp_path / "run" / "sae"), "--out", str(tmp_path / "page")]
    argv += ["--model-path", str(gemma2[0]), "--dataset-path", str(data)]
    main([*argv, "--latents", "3,60", "--quiet"])
    page = (tmp_path / "page" / "index.html").read_text()
    assert page.count('<article class="latent"') == 2
    assert 'id="latent-3"' in page and 'id="latent-60"' in page
    with pytest.raises(ValueError, match="layer 5 does not exist"):
        train_preset(SMALL, tmp_path / "bad", model_path=str(gemma2[0]), layer=5)
