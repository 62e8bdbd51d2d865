"""The recovery suite: its data families against their settings, the method rules,
a seconds-long end-to-end run of ``sae-gba synth suite``, and a seconds-long recovery
run of the default GBA config on a small long tail."""

import contextlib
import io
import json
import math

import pytest
import torch
from sae_lens.config import LoggingConfig
from sae_lens.synthetic import (
    SyntheticModel,
    SyntheticModelConfig,
    SyntheticSAERunner,
    SyntheticSAERunnerConfig,
    ZipfianFiringProbabilityConfig,
)
from sae_lens.util import temporary_seed

from sae_gba.cli import main
from sae_gba.gba_sae import PAPER_RECIPE, GBATrainingSAEConfig
from sae_gba.recovery import best_match_cosine
from sae_gba_evals.suite.families import FAMILIES, hierarchy_groups, true_frequencies
from sae_gba_evals.suite.methods import METHODS, method_k, parse_gba_overrides
from sae_gba_evals.suite.suite import scaling, suite, write_result
from tests.helpers import cli_error

SAMPLES = 40_000


def _draw(family: str, samples: int = 20_000) -> tuple[object, torch.Tensor]:
    model = FAMILIES[family].build(0)
    with temporary_seed(7):
        acts = model.activation_generator.sample(samples)
    return model, acts


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family__measured_frequencies_match_configured(family: str) -> None:
    # Hierarchy probabilities are compensated, so every family's features fire at
    # the rate its SyntheticModelConfig states; 4 standard errors per feature.
    model = FAMILIES[family].build(0)
    expected = model.cfg.firing_probability.generate(model.cfg.num_features).double()
    measured = true_frequencies(model, SAMPLES)
    tolerance = 4 * (expected * (1 - expected) / SAMPLES).sqrt() + 1e-4
    worst = float(((measured - expected).abs() / tolerance).max())
    assert worst < 1, f"{family}: a feature is {worst:.2f} tolerances off"


def test_family_shapes_meet_the_issue() -> None:
    longtail = FAMILIES["longtail"].build(0)
    p = longtail.cfg.firing_probability.generate(longtail.cfg.num_features)
    assert math.log10(float(p.max() / p.min())) >= 1.5 and float(p.min()) <= 0.003
    low_d = FAMILIES["low_d"].build(0).cfg
    assert low_d.hidden_dim < math.sqrt(low_d.num_features)
    for family in FAMILIES.values():
        vectors = family.build(1).feature_dict.feature_vectors.detach()
        assert torch.allclose(vectors.norm(dim=1), torch.ones(len(vectors)))
    splits = {name: f.split for name, f in FAMILIES.items()}
    assert [n for n, s in splits.items() if s == "tune"] == [
        "uniform",
        "imbalanced",
        "longtail",
    ]


def test_imbalanced__exactly_3_or_20_active_half_the_time_each() -> None:
    _, acts = _draw("imbalanced")
    active = (acts > 0).sum(1)
    # relu(N(1, 0.25^2)) zeroes 3e-5 of the active values, as SAELens's does.
    assert float(((active == 3) | (active == 20)).double().mean()) > 0.998
    assert int(active.max()) == 20 and int(active.min()) >= 2
    assert abs(float((active <= 3).double().mean()) - 0.5) < 0.02


def test_hierarchical__a_child_never_fires_without_its_parent() -> None:
    model, acts = _draw("hierarchical")
    fires = acts > 0
    pairs = [
        (child.feature_index, root.feature_index)
        for root in model.hierarchy.roots
        for child in root.children
    ]
    assert len(pairs) == 64
    for child, parent in pairs:
        assert fires[:, child].any(), "every child fires sometimes"
        assert not (fires[:, child] & ~fires[:, parent]).any()
    parents = hierarchy_groups(model)["parents"]
    # Parents also fire alone: the constraint is one-way.
    alone = fires[:, parents].any(1) & ~fires[:, [c for c, _ in pairs]].any(1)
    assert alone.any()


def test_noise__measured_snr_matches_the_stated_one() -> None:
    model, acts = _draw("noise")
    with temporary_seed(8):
        noisy = model.feature_dict(acts)
    clean = acts @ model.feature_dict.feature_vectors.detach()
    noise_power = (noisy - clean - model.feature_dict.bias).pow(2).sum(1).mean()
    snr = float(clean.pow(2).sum(1).mean() / noise_power)
    assert snr == pytest.approx(FAMILIES["noise"].settings["snr"], rel=0.05)
    assert FAMILIES["uniform"].build(0).feature_dict(acts[:5]).allclose(clean[:5])


def test_heavy_tail__lognormal_magnitudes_with_mean_1() -> None:
    _, acts = _draw("heavy_tail", 40_000)
    values = acts[acts > 0].double()
    median, q99 = values.quantile(0.5).item(), values.quantile(0.99).item()
    assert values.mean().item() == pytest.approx(1.0, rel=0.05)
    assert median == pytest.approx(math.exp(-0.5), rel=0.05)
    assert q99 / median == pytest.approx(math.exp(2.326), rel=0.15)
    kurtosis = ((values - values.mean()) ** 4).mean() / values.var() ** 2
    assert kurtosis > 10
    # The light-tailed base family for contrast: relu(N(1, 0.25^2)).
    _, base = _draw("uniform", 40_000)
    base_values = base[base > 0].double()
    assert base_values.quantile(0.99).item() / base_values.median().item() < 1.7


def test_method_rules() -> None:
    assert [method_k(m, 11.49) for m in METHODS] == [None, None, 11, 22, 22, None]
    assert method_k("topk_k1", 0.2) == 1
    assert parse_gba_overrides(["train_output_scale=False", "gate_bias_init=zero"]) == {
        "train_output_scale": False,
        "gate_bias_init": "zero",
    }
    with pytest.raises(ValueError, match="'d_sae=4' is invalid"):
        parse_gba_overrides(["d_sae=4"])


def test_suite_small__every_family_and_method_end_to_end(tmp_path) -> None:
    log = tmp_path / "runs.jsonl"
    result = suite(size="small", seeds=1, workers=1, log=log)
    assert len(log.read_text().splitlines()) == len(FAMILIES) * len(METHODS)
    assert set(result["table"]) == set(FAMILIES)
    for methods in result["table"].values():
        assert list(methods) == list(METHODS)
    assert result["splits"] == {
        "tune": ["uniform", "imbalanced", "longtail"],
        "confirm": ["heavy_tail", "noise", "hierarchical", "low_d"],
    }
    runs = {(r["family"], r["method"]): r for r in result["runs"]}
    assert len(runs) == len(FAMILIES) * len(METHODS)
    k1 = runs["imbalanced", "topk_k1"]
    assert k1["true_l0"] == pytest.approx(11.5, abs=0.2)  # (3 + 20) / 2
    assert k1["k"] == round(k1["true_l0"]) and k1["l0"] == pytest.approx(k1["k"])
    assert runs["imbalanced", "topk_k2"]["k"] == 2 * k1["k"]
    assert "frr@0.9_children" in runs["hierarchical", "gba_default"]
    assert 0 <= runs["longtail", "batchtopk"]["mcc"] <= 1
    png = write_result(result, tmp_path / "suite.json")
    assert png.stat().st_size > 0
    assert json.loads((tmp_path / "suite.json").read_text())["seeds"] == 1


def test_cli_suite__selects_families_methods_and_gba_fields(tmp_path, capsys) -> None:
    out = tmp_path / "s.json"
    main(
        ["synth", "suite", "--size", "small", "--seeds", "2", "--workers", "1",
         "--families", "uniform", "--methods", "gba_default,topk_k2",
         "--gba", "train_output_scale=False", "--out", str(out)]
    )  # fmt: skip
    result = json.loads(out.read_text())
    assert not out.with_suffix(".runs.jsonl").exists()  # the run log, once written
    assert list(result["table"]) == ["uniform"]
    assert list(result["table"]["uniform"]) == ["gba_default", "topk_k2"]
    assert result["table"]["uniform"]["topk_k2"]["seeds"] == [0, 1]
    assert result["gba_default_fields"]["train_output_scale"] is False
    capsys.readouterr()  # the run's progress bars
    line = cli_error(
        capsys, ["synth", "suite", "--families", "nope", "--out", str(out)]
    )
    assert line.startswith("families=['nope'] is invalid: must be among ['uniform',")
    line = cli_error(
        capsys, ["synth", "imbalanced", "--size", "small", "--out", str(out)]
    )
    assert line == "--families, --gba and --size apply to suite and scaling only"


def test_scaling_small__width_and_n_sweeps_against_the_better_topk() -> None:
    result = scaling(size="small")
    cells = {(c["sweep"], c["width"], c["n"]): c for c in result["cells"]}
    # --size small shrinks the widths by 64 / 512 and keeps n.
    assert sorted(cells) == [
        ("n", 256, 128),
        ("n", 256, 512),
        ("n", 256, 1024),
        ("width", 64, 256),
        ("width", 256, 256),
        ("width", 1024, 256),
    ]
    for cell in cells.values():
        runs = {
            r["method"]: r
            for r in result["runs"]
            if r["width"] == cell["width"] and r["n"] == cell["n"]
        }
        best = max(runs["topk_k1"]["frr@0.9"], runs["topk_k2"]["frr@0.9"])
        assert cell["best_topk_frr@0.9"] == best
        assert cell["gba_default_frr@0.9"] == runs["gba_default"]["frr@0.9"]


def _long_tail_recovery(recipe: dict) -> tuple[float, float]:
    """FRR@0.9 (all, rarest third) of GBA trained by SyntheticSAERunner on a small
    long tail: 32 features in 24 dimensions, Zipfian frequencies 0.2 down to 0.01."""
    firing = ZipfianFiringProbabilityConfig(exponent=0.5, max_prob=0.2, min_prob=0.01)
    model_cfg = SyntheticModelConfig(
        num_features=32,
        hidden_dim=24,
        firing_probability=firing,
        std_firing_magnitudes=0.25,
        mean_firing_magnitudes=1.0,
        seed=0,
    )
    model = SyntheticModel(model_cfg)
    cfg = SyntheticSAERunnerConfig(
        synthetic_model=model_cfg,
        sae=GBATrainingSAEConfig(d_in=24, d_sae=128, **recipe),
        training_samples=600 * 256,
        batch_size=256,
        lr=3e-3,
        checkpoint_path=None,
        output_path=None,
        run_final_eval=False,
        logger=LoggingConfig(log_to_wandb=False),
    )
    torch.manual_seed(1)
    runner = SyntheticSAERunner(cfg, override_synthetic_model=model)
    with contextlib.redirect_stderr(io.StringIO()):  # the trainer's progress bar
        sae = runner.run().sae
    features = model.feature_dict.feature_vectors.detach()
    best = best_match_cosine(sae.W_dec.detach().float(), features)
    rarest = model.activation_generator.firing_probabilities.argsort()[:10]
    return float((best > 0.9).double().mean()), float(
        (best[rarest] > 0.9).double().mean()
    )


def test_default_config__recovers_a_small_long_tail_rarest_third_included() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small products: threads only contend
    try:
        overall, rare = _long_tail_recovery({})
        paper = _long_tail_recovery(PAPER_RECIPE)
    finally:
        torch.set_num_threads(threads)
    assert overall >= 0.6 and rare >= 0.5  # measured 0.72 and 0.70
    # the paper's literal recipe recovers none of it: the run can tell them apart
    assert max(paper) <= 0.2
