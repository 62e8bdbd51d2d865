"""SAEBench 0.6 evals (evals/saebench/), run for real on tiny random models.

The core eval runs on the shared tiny TransformerLens model; absorption on a tiny model
carrying the embedded Gemma-3 tokenizer (letter-only words), with SAEBench's probe
gates lowered because a random model cannot spell: these check the wiring and the
JSON, not the numbers. The CLI test reads a random Gemma-2 folder through
``--model-path``. Nothing is mocked and nothing is downloaded.
"""

import json

import numpy as np
import pytest
import torch
from sae_lens import (
    LanguageModelSAERunnerConfig,
    LanguageModelSAETrainingRunner,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
)
from sae_lens.saes.sae import SAEMetadata

from sae_gba.cli import main
from sae_gba.embedded import embedded_model_dir
from sae_gba.loading import load_sae
from sae_gba_evals.saebench import (
    EvalError,
    EvalSettings,
    evaluate,
    prepare_sae,
    run_core,
)
from sae_gba_evals.saebench.absorption import (
    first_letter_words,
    run_absorption,
    sae_input_space,
    stop_after_layer,
)
from tests.helpers import (
    FAST_ABSORPTION,
    cli_error,
    runner_dict,
    save_word_tokenizer,
    spelling_model,
    tiny_model,
    tiny_speller,
    token_dataset,
)

HOOK = "blocks.0.hook_resid_post"


def _meta(**overrides) -> SAEMetadata:
    fields = {
        "model_name": "tiny-random",
        "hook_name": HOOK,
        "context_size": 16,
        "prepend_bos": True,
    }
    return SAEMetadata(**{**fields, **overrides})


@pytest.fixture(scope="module")
def sae_folders(tmp_path_factory):
    """SAE folders of the tiny model: a trained GBA export and SAELens's own kinds."""
    root = tmp_path_factory.mktemp("saes")
    cfg = runner_dict(
        {"architecture": "gba", "d_in": 32, "d_sae": 64, "n_groups": 2},
        str(root / "gba"),
        training_tokens=64 * 20,
    )
    LanguageModelSAETrainingRunner(
        LanguageModelSAERunnerConfig.from_dict(cfg),
        override_model=tiny_model(),
        override_dataset=token_dataset(),
    ).run()
    torch.manual_seed(0)
    TopKSAE(TopKSAEConfig(d_in=32, d_sae=64, k=8, metadata=_meta())).save_model(
        root / "topk"
    )
    StandardSAE(StandardSAEConfig(d_in=32, d_sae=64, metadata=_meta())).save_model(
        root / "standard"
    )
    return root


@pytest.fixture(scope="module")
def tokenizer():
    """Gemma-3's tokenizer, BOS on (else TransformerLens reloads it: seconds)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_model_dir(), add_bos_token=True)


@pytest.mark.parametrize("kind", ["gba", "topk", "standard"])
def test_core__saebench_json_covers_every_window_once(sae_folders, tmp_path, kind):
    assert json.loads((sae_folders / "gba" / "cfg.json").read_text())[
        "architecture"
    ] == ("jumprelu")
    model = tiny_model()
    sae = prepare_sae(load_sae(sae_folders / kind), "cpu", "float32")
    tokens = token_dataset(n_rows=37)  # prime: forces one window per batch
    settings = EvalSettings(n_recon_tokens=64, batch_size_prompts=4)
    result = run_core(sae, model, tokens, tmp_path, settings=settings, sae_name=kind)

    data = json.loads((tmp_path / f"sae_gba_{kind}_eval_results.json").read_text())
    assert data["eval_type_id"] == "core" and data["sae_lens_id"] == kind
    metrics = data["eval_result_metrics"]
    quality = metrics["reconstruction_quality"]
    assert {"explained_variance", "explained_variance_legacy", "mse", "cossim"} <= set(
        quality
    )
    assert {"ce_loss_score", "ce_loss_without_sae"} <= set(
        metrics["model_performance_preservation"]
    )
    assert "kl_div_score" in metrics["model_behavior_preservation"]
    assert metrics["token_stats"] == {
        "total_tokens_eval_reconstruction": 64,
        "total_tokens_eval_sparsity_variance": 37 * 16,
    }
    assert len(data["eval_result_details"]) == 64
    assert data["eval_result_unstructured"]["sae_gba"]["held_out_windows"] == 37
    # Every window exactly once: L0 and the alive fraction match a direct pass.
    with torch.no_grad():
        _, cache = model.run_with_cache(
            torch.tensor(tokens["tokens"]), names_filter=HOOK
        )
        acts = sae.encode(cache[HOOK]).flatten(0, 1)
    assert metrics["sparsity"]["l0"] == pytest.approx(
        (acts != 0).sum(-1).float().mean().item(), rel=1e-5
    )
    alive = (acts > 0).any(0).float().mean().item()
    assert metrics["misc_metrics"]["frac_alive"] == pytest.approx(alive)
    assert result["metrics"]["sparsity"] == metrics["sparsity"]


def _kl(clean: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    p = clean.softmax(-1)
    return (p * (p.log() - new.softmax(-1).log())).sum(-1)


@pytest.mark.parametrize("kind", ["gba", "topk"])
def test_core__metrics_equal_a_direct_computation_on_the_same_tokens(
    sae_folders, tmp_path, kind
):
    """EV (SAEBench's and legacy), MSE, cosine, CE and KL scores from SAEBench's JSON
    against the formulas applied by hand to the same 8 windows (2 batches of 4)."""
    model = tiny_model()
    sae = prepare_sae(load_sae(sae_folders / kind), "cpu", "float32")
    tokens = token_dataset(n_rows=8)
    settings = EvalSettings(n_recon_tokens=8 * 16, batch_size_prompts=4)
    run_core(sae, model, tokens, tmp_path, settings=settings, sae_name=kind)
    data = json.loads((tmp_path / f"sae_gba_{kind}_eval_results.json").read_text())
    metrics = data["eval_result_metrics"]
    quality = metrics["reconstruction_quality"]

    # run_core's order: shuffled by the settings' seed, read in batches of 4.
    windows = torch.tensor(tokens.shuffle(seed=settings.seed)["tokens"])
    with torch.no_grad():
        clean_logits, cache = model.run_with_cache(windows, names_filter=HOOK)
        x = cache[HOOK]
        x_hat = sae.decode(sae.encode(x))
        rss = (x - x_hat).pow(2).sum(-1).flatten()
        flat = x.flatten(0, 1)
        # SAEBench's explained variance: its total variance subtracts the square of
        # the mean of x^2 (not of x) from the mean squared norm.
        total = flat.pow(2).sum(-1).mean() - flat.pow(2).mean() ** 2
        batch_means = x.reshape(2, 4 * 16, -1).mean(1, keepdim=True)
        centred = (x.reshape(2, 4 * 16, -1) - batch_means).pow(2).sum(-1).flatten()
        cosine = torch.nn.functional.cosine_similarity(flat, x_hat.flatten(0, 1), -1)
        expected = {
            "explained_variance": 1 - rss.mean() / total,
            "explained_variance_legacy": (1 - rss / centred).mean(),
            "mse": rss.mean() / (4 * 16),  # SAEBench divides by the batch's tokens
            "cossim": cosine.mean(),
        }
        for name, value in expected.items():
            assert quality[name] == pytest.approx(value.item(), rel=1e-4), name

        def loss_and_logits(replace):
            hook = (HOOK, lambda acts, hook: replace(acts))
            return model.run_with_hooks(
                windows, return_type="both", fwd_hooks=[hook], loss_per_token=True
            )

        sae_logits, sae_ce = loss_and_logits(lambda a: sae.decode(sae.encode(a)))
        zero_logits, zero_ce = loss_and_logits(torch.zeros_like)
        clean_ce = model(windows, return_type="loss", loss_per_token=True)
        kl_sae = _kl(clean_logits, sae_logits).mean()
        kl_zero = _kl(clean_logits, zero_logits).mean()
    ce = metrics["model_performance_preservation"]
    assert ce["ce_loss_without_sae"] == pytest.approx(clean_ce.mean().item(), rel=1e-4)
    assert ce["ce_loss_with_sae"] == pytest.approx(sae_ce.mean().item(), rel=1e-4)
    ce_score = (zero_ce.mean() - sae_ce.mean()) / (zero_ce.mean() - clean_ce.mean())
    assert ce["ce_loss_score"] == pytest.approx(ce_score.item(), rel=1e-3)
    kl = metrics["model_behavior_preservation"]
    assert kl["kl_div_with_sae"] == pytest.approx(kl_sae.item(), rel=1e-3)
    assert kl["kl_div_score"] == pytest.approx((1 - kl_sae / kl_zero).item(), rel=1e-3)


def test_first_letter_words__sorted_sampled_and_prompt_safe(tokenizer):
    words = first_letter_words(tokenizer, n_words=1000, seed=3)
    assert words == sorted(words)
    assert {w.strip()[0].lower() for w in words} == set("abcdefghijklmnopqrstuvwxyz")
    assert 900 < len(words) < 1600
    for word in words[::50]:
        ids = tokenizer(
            "\n" + word + " has the first letter:", add_special_tokens=False
        )
        assert len(ids["input_ids"]) == 7
    with pytest.raises(EvalError, match="position -6"):
        first_letter_words(tokenizer, 100, token_pos=-5)


def test_stop_after_layer__same_activations_and_restored():
    model = tiny_model()
    tokens = torch.tensor(token_dataset(n_rows=2)["tokens"])
    _, full = model.run_with_cache(tokens, names_filter=HOOK)
    with stop_after_layer(model, 0):
        out, cut = model.run_with_cache(tokens, names_filter=HOOK)
    assert out.shape[-1] == model.cfg.d_model  # the residual, not logits
    torch.testing.assert_close(cut[HOOK], full[HOOK])
    assert "run_with_cache" not in vars(model)


@pytest.mark.parametrize("kind", ["constant_norm_rescale", "layer_norm"])
def test_sae_input_space__decoder_is_linear_there(kind):
    cfg = StandardSAEConfig(
        d_in=32, d_sae=64, normalize_activations=kind, metadata=_meta()
    )
    sae = StandardSAE(cfg)
    x = 50 * torch.randn(8, 32) + 3
    z = sae_input_space(sae)(x)
    # The SAE normalises z to itself, so its latents decode linearly into z's space,
    # the space SAEBench's probe projections are then measured in.
    torch.testing.assert_close(sae.encode(z), sae.encode(x), rtol=1e-4, atol=1e-4)
    acts = sae.encode(z)
    torch.testing.assert_close(
        sae.decode(acts), acts @ sae.W_dec + sae.b_dec, rtol=1e-4, atol=1e-4
    )
    assert sae_input_space(StandardSAE(StandardSAEConfig(d_in=32, d_sae=64))) is None


def test_absorption__stages_write_saebench_json(tmp_path):
    model = tiny_speller()
    meta = _meta(hook_name="blocks.1.hook_resid_post", context_size=128)
    sae_cfg = StandardSAEConfig(
        d_in=32, d_sae=64, normalize_activations="constant_norm_rescale", metadata=meta
    )
    sae = prepare_sae(StandardSAE(sae_cfg), "cpu", "bfloat16")
    settings = EvalSettings(absorption_words=500, seed=0)
    options = {"settings": settings, "probes_dir": tmp_path / "probes"}
    result = run_absorption(sae, model, tmp_path, **options, **FAST_ABSORPTION)

    data = json.loads((tmp_path / "sae_gba_sae_eval_results.json").read_text())
    assert data["eval_type_id"] == "absorption_first_letter"
    assert data["eval_config"]["llm_dtype"] == "bfloat16"
    mean = data["eval_result_metrics"]["mean"]
    assert 0 <= mean["mean_absorption_fraction_score"] <= 1
    assert 0 <= mean["mean_full_absorption_score"] <= 1
    assert {d["first_letter"] for d in data["eval_result_details"]} <= set(
        "abcdefghijklmnopqrstuvwxyz"
    )
    info = data["eval_result_unstructured"]["sae_gba"]
    assert info["status"] == "evaluated" and info["prompt_tokens"] > 20
    assert info["activation_space"] == "constant_norm_rescale"
    assert info["ground_truth_probe_tokens"] == info["words"] * info["prompt_tokens"]
    assert (
        info["absorption_tokens"] == info["absorption_prompts"] * info["prompt_tokens"]
    )
    assert (tmp_path / "sae_gba_sae_k_sparse_probing.json").is_file()
    assert result["metrics"]["mean"] == mean
    # The ground-truth probe learns from SAEBench's raw activations, not normalised ones.
    probe_data = np.load(next((tmp_path / "probes").rglob("data.npz")))
    norms = np.linalg.norm(probe_data["X_train"], axis=1)
    assert not np.allclose(norms, sae.cfg.d_in**0.5, rtol=1e-2)

    # SAEBench's own gate (a random model cannot spell); the probe is reused.
    (tmp_path / "sae_gba_sae_eval_results.json").unlink()
    gate = {**FAST_ABSORPTION, "max_k_value": 1, "min_GT_probe_f1": 0.6}
    gated = run_absorption(sae, model, tmp_path, **options, **gate)
    assert gated["path"] is None and "not evaluated" in gated["tokens"]["status"]
    assert gated["tokens"]["ground_truth_probe_cached"]
    assert not (tmp_path / "sae_gba_sae_eval_results.json").exists()

    # With the probe cached, the same in-context examples and so the same scores.
    again = run_absorption(sae, model, tmp_path, **options, **FAST_ABSORPTION)
    assert again["tokens"]["ground_truth_probe_cached"]
    assert again["metrics"] == result["metrics"]


def test_absorption__with_saebenchs_probe_gate_on_a_model_that_spells(tmp_path):
    model = spelling_model()
    meta = _meta(hook_name="blocks.1.hook_resid_post", context_size=128)
    sae = prepare_sae(
        StandardSAE(StandardSAEConfig(d_in=32, d_sae=64, metadata=meta)),
        "cpu",
        "bfloat16",
    )
    settings = EvalSettings(absorption_words=260, seed=0)
    # SAEBench's gate as it ships: min_GT_probe_f1 0.6, min_feats_for_eval default.
    fast = {"max_k_value": 1, "k_sparse_probe_num_epochs": 3}
    result = run_absorption(
        sae, model, tmp_path, settings=settings, probes_dir=tmp_path / "p", **fast
    )
    info = result["tokens"]
    assert info["status"] == "evaluated", info["status"]
    f1 = info["ground_truth_probe_f1"]
    assert info["letters_passing_probe_gate"] == sum(v > 0.6 for v in f1.values())
    assert info["letters_passing_probe_gate"] >= 10
    data = json.loads((tmp_path / "sae_gba_sae_eval_results.json").read_text())
    letters = {d["first_letter"] for d in data["eval_result_details"]}
    assert letters and letters <= {k for k, v in f1.items() if v > 0.6}
    mean = data["eval_result_metrics"]["mean"]
    assert 0 <= mean["mean_absorption_fraction_score"] <= 1


@pytest.fixture(scope="module")
def gemma2_folder(tmp_path_factory):
    """A random 2-layer, 64-wide Gemma-2 with a word-level tokenizer, saved locally."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(
        num_hidden_layers=2,
        hidden_size=64,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        intermediate_size=128,
        initializer_range=0.5,  # peaked next-token distributions: KL to ablation > 0
        vocab_size=512,
    )
    folder = tmp_path_factory.mktemp("gemma2")
    Gemma2ForCausalLM(config).save_pretrained(folder)
    save_word_tokenizer(folder, 512)
    return folder


def test_cli_eval__reads_the_model_folder_and_the_held_out_articles(
    gemma2_folder, tmp_path, capsys
):
    meta = _meta(
        model_name="google/gemma-2-2b",
        hook_name="blocks.1.hook_resid_post",
        context_size=128,
    )
    StandardSAE(StandardSAEConfig(d_in=64, d_sae=32, metadata=meta)).save_model(
        tmp_path / "sae"
    )
    argv = ["eval", str(tmp_path / "sae"), "--evals", "core"]
    argv += ["--out", str(tmp_path / "out"), "--model-path", str(gemma2_folder)]
    main([*argv, "--n-tokens", "512", "--n-recon-tokens", "256"])

    out = tmp_path / "out"
    core = json.loads((out / "core" / "sae_gba_sae_eval_results.json").read_text())
    assert core["eval_config"]["llm_dtype"] == "bfloat16"  # the gemma-2-2b preset
    # 4 windows, read in one batch of 4: CE/KL round up to that whole batch.
    assert core["eval_result_metrics"]["token_stats"] == {
        "total_tokens_eval_reconstruction": 512,
        "total_tokens_eval_sparsity_variance": 512,
    }
    info = core["eval_result_unstructured"]["sae_gba"]
    assert "held-out articles" in info["data"]
    assert info["excluded_token_ids"] == [0, 1, 2]  # PAD, EOS, BOS
    assert info["sparsity_variance_tokens_without_special"] == 512 - 4  # BOS each
    summary = (out / "summary.md").read_text()
    assert "## Core (512 held-out tokens)" in summary and "frac_alive" in summary
    assert "Absorption" not in summary
    assert summary in capsys.readouterr().out
    line = cli_error(capsys, [*argv, "--overwrite", "--preset", "gemma-7b"])
    assert line == "preset must be one of ['embedded', 'gemma-2-2b'], got 'gemma-7b'"


def test_evaluate__bad_requests_are_named(sae_folders, tmp_path):
    with pytest.raises(EvalError, match="evals must be among"):
        evaluate(sae_folders / "topk", tmp_path, ["core", "probing"])
    with pytest.raises(EvalError, match="does not exist"):
        evaluate(tmp_path / "nowhere", tmp_path)
    with pytest.raises(EvalError, match="preset must be one of"):
        evaluate(sae_folders / "topk", tmp_path, preset="gemma-7b")
