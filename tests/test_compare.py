"""``sae-gba compare`` (evals/compare/), run for real on a tiny random model.

The whole pipeline runs once per module: a 2-layer random model carrying the embedded
Gemma-3 tokenizer (absorption needs a real one), 2 methods x 2 L0 targets plus a second
seed of each at the middle target, two passes over the tokens, SAELens's trainer with
held-out convergence curves, SAEBench's core and absorption evals (absorption gates lowered as in
tests/test_saebench.py, since a random model cannot spell). The tests check the
outputs, the resume, the memoised forward pass against an unmemoised one and the
errors; the numbers themselves mean nothing on a random model.
"""

import dataclasses
import json
import math

import pytest
import torch
from datasets import Dataset
from sae_lens import SAE
from transformer_lens import HookedTransformer

from sae_gba_evals.compare import (
    COMPARE_PRESETS,
    CompareError,
    CompareSize,
    interpolate_log_l0,
    matched_l0,
    memoized_forward,
    run_compare,
    sweep_points,
)
from sae_gba_evals.compare.evaluate import alive_by_group
from sae_gba_evals.compare.train import convergence
from sae_gba_evals.saebench import EvalSettings, prepare_sae, run_core
from tests.helpers import (
    FAST_ABSORPTION,
    GEMMA2_VOCAB,
    cli_error,
    tiny_model,
    tiny_speller,
)

SIZE = CompareSize(
    name="test",
    d_sae=64,
    training_tokens=2_048,
    target_l0s=(4.0, 8.0),
    batch_tokens=128,
    training_passes=2,
    middle_seeds=2,
    ev_curve_points=4,
    n_recon_tokens=64,
    absorption_words=500,
)
METHODS = ("gba", "topk")


def _windows(n: int, context: int = 16, seed: int = 1) -> torch.Tensor:
    """Random Gemma-3 token windows, BOS (id 2) first."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(300, 5_000, (n, context), generator=g)
    tokens[:, 0] = 2
    return tokens


@pytest.fixture(scope="module")
def speller():
    return tiny_speller()


@pytest.fixture(scope="module")
def compared(speller, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    held_out = Dataset.from_dict({"tokens": _windows(40, seed=2).tolist()})
    kwargs = {
        "size": SIZE,
        "methods": METHODS,
        "model": speller,
        "train_windows": _windows(200),
        "held_out": held_out,
        "layer": 1,
        "probes_dir": out / "probes",
        "absorption_options": FAST_ABSORPTION,
        "progress": False,
    }
    result = run_compare(out, **kwargs)
    return out, result, kwargs


def test_compare__writes_rows_report_and_plots(compared):
    out, result, _ = compared
    data = json.loads((out / "compare.json").read_text())
    assert data["rows"] == json.loads(json.dumps(result["rows"]))
    seeds = {(r["method"], r["target_l0"], r["seed"]) for r in data["rows"]}
    assert seeds == {(m, t, 0) for m in METHODS for t in SIZE.target_l0s} | {
        (m, 4.0, 1) for m in METHODS
    }
    rows = {(r["method"], r["target_l0"]): r for r in data["rows"] if not r["seed"]}
    for row in data["rows"]:
        assert 0 < row["l0"] <= SIZE.d_sae
        assert row["explained_variance_legacy"] < 1
        assert 0 < row["frac_alive"] <= 1
        assert row["ce_loss_score"] is not None and row["kl_div_score"] is not None
        assert row["absorption_status"] == "evaluated"
        assert 0 <= row["mean_absorption_fraction_score"] <= 1
        assert 0 <= row["mean_full_absorption_score"] <= 1
        assert row["train_seconds"] > 0 and row["eval_seconds"]["core"] > 0
        assert row["tokens"]["training"] == SIZE.training_tokens
        assert row["tokens"]["eval_sparsity_variance"] == 40 * 16
        assert row["tokens"]["eval_sparsity_variance_without_special"] == 40 * 15
        assert row["tokens"]["absorption_words"] > 400
    # Absorption results are kept per word sample (a resume with another recomputes).
    assert sorted(p.name for p in (out / "evals").iterdir()) == [
        "absorption_500_words",
        "core",
        "explained_variance",
    ]
    # TopK's L0 is at most k and grows with it; GBA's target L0 grows with L0.
    # The second seed is another SAE: other initialisation and batch order.
    spread = result["seed_spread"]
    assert sorted(spread) == ["gba@4", "topk@4"]
    assert spread["topk@4"][0]["explained_variance_legacy"] != pytest.approx(
        spread["topk@4"][1]["explained_variance_legacy"], abs=1e-6
    )
    assert set(result["gba_criteria"]) >= {"ev_within_tolerance_at_every_point"}
    assert rows[("topk", 4.0)]["l0"] <= 4 + 1e-6
    assert rows[("topk", 4.0)]["l0"] < rows[("topk", 8.0)]["l0"] <= 8 + 1e-6
    assert rows[("topk", 8.0)]["setting"] == {"k": 8}
    aimed = [rows[("gba", t)]["setting"]["target_l0"] for t in SIZE.target_l0s]
    assert aimed[0] < aimed[1]
    markdown = (out / "compare.md").read_text()
    assert "| method | seed | setting | L0 | EV legacy |" in markdown
    assert result["gba_vs_topk"] in markdown
    assert "TopK" in result["gba_vs_topk"]
    for name in ("ev_vs_l0.png", "absorption_vs_l0.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["memoized_forward"]["hits"] > 0


def test_compare__records_a_convergence_curve_per_run(compared):
    out, result, _ = compared
    steps = SIZE.training_passes * SIZE.training_tokens // SIZE.batch_tokens
    for row in result["rows"]:
        record = json.loads((out / "saes" / row["sae_dir"].split("/")[-1] /
                             "compare_train.json").read_text())  # fmt: skip
        curve = record["ev_curve"]
        # Every steps // points steps, then once after the last step.
        assert (
            [s for s, _ in curve]
            == [8, 16, 24, 32]
            == [steps * i // 4 for i in (1, 2, 3, 4)]
        )
        assert all(ev < 1 for _, ev in curve)
        change = curve[-1][1] - curve[-2][1]  # 80% of 32 steps is step 25.6: step 24
        assert record["ev_change_last_20pct"] == pytest.approx(change)
        assert row["converged"] == (abs(change) < 0.005)
    markdown = (out / "compare.md").read_text()
    assert "runs did." in markdown


def test_convergence__compares_the_last_point_with_the_tail_start():
    points = [(100, 0.5), (200, 0.6), (300, 0.70), (400, 0.704), (500, 0.706)]
    # The tail starts at 80% of 500 = step 400.
    result = convergence(points)
    assert result["ev_change_last_20pct"] == pytest.approx(0.002)
    assert result["converged"] is True
    # At 300 the tail starts at step 240, nearest 200: 0.70 - 0.60.
    assert convergence(points[:3])["ev_change_last_20pct"] == pytest.approx(0.1)
    assert convergence(points[:3])["converged"] is False


def test_compare__explained_variance_is_the_conventional_ratio(compared, speller):
    out, result, kwargs = compared
    tokens = torch.tensor(kwargs["held_out"]["tokens"])
    hook = "blocks.1.hook_resid_post"
    with torch.no_grad():
        _, cache = speller.run_with_cache(tokens, names_filter=hook)
    x = cache[hook][tokens != 2].float()  # BOS left out, as in SAEBench's pass
    for row in result["rows"]:
        sae = SAE.load_from_disk(row["sae_dir"])
        with torch.no_grad():
            err = (sae.decode(sae.encode(x)) - x).pow(2).sum(-1)
        var = (x - x.mean(dim=0)).pow(2).sum(-1)
        assert row["explained_variance"] == pytest.approx(
            float(1 - err.sum() / var.sum()), abs=1e-4
        )
    markdown = (out / "compare.md").read_text()
    assert "EV (0.6)" not in markdown and "| EV legacy | EV |" in markdown
    assert "SAEBench 0.6's own `explained_variance` is left out" in markdown


def test_compare__saes_are_plain_saelens_folders(compared):
    out, _, _ = compared
    folder = out / "saes" / "gba_L0-8"
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu"  # GBA exports as JumpReLU
    assert cfg["normalize_activations"] == "constant_norm_rescale"
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
    assert cfg["metadata"]["model_name"] == "tiny-speller"
    sae = SAE.load_from_disk(out / "saes" / "topk_L0-4")
    assert sae.cfg.architecture() == "topk"
    # Trained on rescaled tokens, it takes raw ones: any scale gives the same codes.
    x = torch.randn(5, 32)
    torch.testing.assert_close(sae.encode(100 * x), sae.encode(x))
    assert sae.encode(x).count_nonzero(dim=-1).max() <= 4


def test_compare__resumes_without_redoing_work(compared):
    out, result, kwargs = compared
    again = run_compare(out, **kwargs)
    assert again["timings"]["train_s"] == 0 and again["harvest"]["skipped"]
    assert [r["l0"] for r in again["rows"]] == [r["l0"] for r in result["rows"]]
    assert again["memoized_forward"]["misses"] == 0  # no eval ran the model
    other = CompareSize(**{**SIZE.__dict__, "training_tokens": 1_024})
    with pytest.raises(CompareError, match="use another --out"):
        run_compare(out, **{**kwargs, "size": other})


def test_compare__gemma2_preset_reads_a_model_folder_and_splits_a_dataset(
    gemma2,
    tmp_path,
):
    g = torch.Generator().manual_seed(4)
    rows = torch.randint(4, GEMMA2_VOCAB, (60, 16), generator=g)
    rows[:, 0] = 2  # BOS
    Dataset.from_dict({"tokens": rows.tolist()}).save_to_disk(tmp_path / "data")
    # The Gemma-2-2B preset with 16-token windows, on a random 2-layer Gemma-2 of
    # the real width (tests/test_presets.py).
    preset = dataclasses.replace(
        COMPARE_PRESETS["gemma-2-2b"], context_size=16, eval_context_size=16
    )
    size = CompareSize("tiny", d_sae=64, training_tokens=512, target_l0s=(4.0, 8.0))
    result = run_compare(
        tmp_path / "out",
        preset=preset,
        size=size,
        methods=["gba", "topk"],
        evals=["core"],
        model_path=str(gemma2[0]),
        dataset_path=str(tmp_path / "data"),
        layer=1,
        progress=False,
    )
    assert result["model"] == "google/gemma-2-2b" and result["preset"] == "gemma-2-2b"
    assert "other 10% of rows" in result["held_out_data"]
    for row in result["rows"]:
        # 6 of the 60 rows are held out: 6 windows of 16 tokens.
        assert row["tokens"]["eval_sparsity_variance"] == 6 * 16
        assert row["l0"] > 0 and row["mean_absorption_fraction_score"] is None
    cfg = json.loads((tmp_path / "out/saes/topk_L0-8/cfg.json").read_text())
    assert (cfg["d_in"], cfg["metadata"]["model_name"]) == (2304, "google/gemma-2-2b")


def test_memoized_forward__same_core_metrics_as_the_model(tmp_path):
    model = tiny_model()
    tokens = Dataset.from_dict({"tokens": _windows(12, seed=3).remainder(64).tolist()})
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    meta = SAEMetadata(
        model_name="tiny",
        hook_name="blocks.0.hook_resid_post",
        context_size=16,
        prepend_bos=True,
    )
    sae = prepare_sae(
        TopKSAE(TopKSAEConfig(d_in=32, d_sae=64, k=4, metadata=meta)), "cpu", "float32"
    )
    settings = EvalSettings(n_recon_tokens=32, batch_size_prompts=4)
    plain = run_core(sae, model, tokens, tmp_path / "a", settings=settings)
    with memoized_forward(model) as stats:
        first = run_core(sae, model, tokens, tmp_path / "b", settings=settings)
        second = run_core(sae, model, tokens, tmp_path / "c", settings=settings)
    assert type(model) is HookedTransformer  # restored
    assert stats["misses"] == 3 and stats["hits"] == 3  # one per sparsity batch
    for result in (first, second):
        assert result["metrics"] == plain["metrics"]


def test_matched_l0__interpolates_in_log_l0_inside_the_range_only():
    assert interpolate_log_l0([(10, 0.5), (40, 0.7)], 20) == pytest.approx(0.6)
    assert interpolate_log_l0([(10, 0.5), (40, 0.7)], 50) is None
    rows = [
        {"method": "topk", "l0": 10.0, "ev": 0.5},
        {"method": "topk", "l0": 40.0, "ev": 0.7},
        {"method": "gba", "l0": 20.0, "ev": 0.58},
        {"method": "gba", "l0": 80.0, "ev": 0.9},
    ]
    result = matched_l0(rows, "gba", "topk", "ev")
    assert result["n_inside"] == 1 and result["reference_l0_range"] == [10.0, 40.0]
    assert result["mean_difference"] == pytest.approx(-0.02)
    assert result["points"][1]["difference"] is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"methods": ["gba", "relu"]}, "methods=.*must be distinct names among"),
        ({"size": "huge"}, "size='huge' is invalid for preset 'embedded'"),
        ({"preset": "gemma-7b"}, "preset='gemma-7b' is invalid"),
        ({"evals": ["core", "probing"]}, "evals=.*must be among"),
        (
            {"size": CompareSize("x", 64, 512, (4,), absorption_words=10)},
            "absorption_words=10 is invalid: must be >= 26",
        ),
        (
            {"size": CompareSize("x", d_sae=64, training_tokens=512, target_l0s=(70,))},
            r"target_l0s=\(70,\) is invalid",
        ),
        (
            {"size": CompareSize("x", d_sae=64, training_tokens=512, target_l0s=(60,))},
            "GBA at L0 60: target L0 60 is out of reach",
        ),
    ],
)
def test_run_compare__bad_requests_are_named(tmp_path, kwargs, message):
    with pytest.raises(CompareError, match=message):
        run_compare(tmp_path, **kwargs)


def test_cli_compare__reports_bad_methods(tmp_path, capsys):
    line = cli_error(
        capsys, ["compare", "--out", str(tmp_path), "--methods", "gba,relu"]
    )
    assert line.startswith("methods=['gba', 'relu'] is invalid: must be distinct names")
    assert "'weighted_jumprelu']" in line
    line = cli_error(
        capsys, ["compare", "--out", str(tmp_path), "--absorption-words", "3"]
    )
    assert line.startswith("absorption_words=3 is invalid: must be >= 26")
    line = cli_error(capsys, ["compare", "--out", str(tmp_path), "--gba", "k=3"])
    assert line.startswith("--gba 'k=3' is invalid: expected KEY=VALUE with KEY a")
    line = cli_error(
        capsys, ["compare", "--out", str(tmp_path), "--training-passes", "0"]
    )
    assert line == "--training-passes 0 is invalid: must be >= 1"
    line = cli_error(capsys, ["compare", "--out", str(tmp_path), "--l0", "16,x"])
    assert line == "--l0 '16,x' is invalid: expected a comma list of numbers"
    line = cli_error(capsys, ["compare", "--out", str(tmp_path), "--l0", "4096"])
    assert line.startswith("target_l0s=(4096.0,) is invalid: must be non-empty, each")


def test_sweep_points__ablation_fields_reach_gba_only():
    size = dataclasses.replace(SIZE, gba_fields={"decoder_init_norm": 0.5})
    points = {p.name: p.setting for p in sweep_points(METHODS, size)}
    assert points["gba_L0-4"] == {
        "target_l0": 4.0,
        "adaptation_interval": 50,
        "decoder_init_norm": 0.5,
    }
    assert points["topk_L0-4_seed-1"] == {"k": 4}


def test_alive_by_group__fired_latents_and_the_poisson_expectation():
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=4, d_sae=4))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(4))
        sae.W_dec.copy_(torch.eye(4))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        sae.threshold.fill_(0.5)
    acts = torch.zeros(10, 4)
    acts[3, 0] = 1.0  # latent 0 fires once; 1 never; 2 fires; 3 stays under threshold
    acts[7, 2] = 2.0
    acts[5, 3] = 0.4
    groups = alive_by_group(sae, acts, [2, 2], [0.5, 0.01], chunk=3)
    assert [g["alive"] for g in groups] == [0.5, 0.5]
    assert [g["target"] for g in groups] == [0.5, 0.01]
    assert groups[0]["alive_if_at_target"] == pytest.approx(1 - math.exp(-5))
    assert groups[1]["alive_if_at_target"] == pytest.approx(1 - math.exp(-0.1))
