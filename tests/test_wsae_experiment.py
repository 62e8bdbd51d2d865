"""``sae-gba synth wsae``: schema, SAE and WSAE differ only by weights, metric path."""

import json

import pytest
import torch
from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig

from evals.synthetic_lab import run_experiment
from evals.wsae_experiment import (
    WSAESettings,
    build_sae,
    evaluate,
    method_name,
    moderate_sparsity_summary,
    train_sae,
)
from sae_gba.weighted import ESTIMATED
from sae_gba.wsae_theory import (
    closed_form_encoder,
    ground_truth_error_on_support,
    make_wsae_data,
    polysemantic_error,
    sae_latents,
    sae_reconstruction,
)

TINY = WSAESettings(
    n=12,
    n_p=4,
    sparsities=(0.5, 0.9),
    steps=12,
    batch_size=32,
    n_train=256,
    n_eval=128,
    weight_estimation_batches=3,
)
METHODS = ["sae", "wsae_alpha0.5", "wsae_alpha1"]


def _parameters(sae: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in sae.named_parameters()}


def _assert_equal_parameters(a: torch.nn.Module, b: torch.nn.Module) -> None:
    pa, pb = _parameters(a), _parameters(b)
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name


def test_wsae_experiment__runs_end_to_end_and_writes_the_schema(tmp_path) -> None:
    out = tmp_path / "wsae.json"
    run_experiment("wsae", out, seeds=2, settings=TINY)
    result = json.loads(out.read_text())
    assert out.with_suffix(".png").is_file()
    assert result["experiment"] == "wsae" and result["wall_seconds"] > 0
    assert result["settings"]["base_architecture"] == "standard"
    assert result["settings"]["steps"] == TINY.steps
    assert [(r["sparsity"], r["method"]) for r in result["rows"]] == [
        (s, m) for s in TINY.sparsities for m in METHODS
    ]
    keys = {
        "gt_error_on_support",
        "gt_error_on_support_std",
        "gt_error_off_support",
        "polysemantic_error",
        "polysemantic_error_std",
        "gt_error_trivial",
        "seeds",
    }
    for row in result["rows"]:
        assert keys <= set(row) and row["seeds"] == 2
        assert len(row["gt_error_on_support_per_seed"]) == 2
        assert row["gt_error_on_support"] >= 0 and row["polysemantic_error"] >= 0
        if row["method"] != "sae":
            assert 0 < row["gamma_min"] <= 1 <= row["gamma_max"]
    summary = result["moderate_sparsity"]
    assert summary["sparsities"] == [0.5, 0.9]  # moderate: S <= 0.9
    assert set(summary["methods"]) == {"wsae_alpha0.5", "wsae_alpha1"}
    assert isinstance(summary["any_wsae_lowers"], bool)


def test_method_name() -> None:
    assert [method_name(a) for a in (None, 0.5, 1.0)] == METHODS


def test_build_sae__every_method_starts_from_the_same_parameters() -> None:
    plain = build_sae(TINY, None, seed=3)
    for alpha in TINY.alphas:
        _assert_equal_parameters(plain, build_sae(TINY, alpha, seed=3))
    assert not torch.equal(plain.W_enc, build_sae(TINY, None, seed=4).W_enc)


def test_train_sae__wsae_equals_sae_exactly_when_all_variances_are_equal() -> None:
    # Every row is v * (1, 1, 1, 1): the per-dimension variances are bitwise equal, so
    # the estimated weights are exactly 1 and the WSAE loss IS the SAE loss. Any other
    # difference between the runs (init, batches, steps, lr) would break equality.
    v = torch.rand(256, 1, generator=torch.Generator().manual_seed(0))
    x_p = v * torch.ones(1, TINY.n_p)
    plain = train_sae(x_p, TINY, None, seed=1)
    for alpha in TINY.alphas:
        weighted = train_sae(x_p, TINY, alpha, seed=1)
        assert int(weighted.input_weights_state) == ESTIMATED
        assert torch.equal(weighted.input_weights, torch.ones(TINY.n_p))
        _assert_equal_parameters(plain, weighted)


def test_train_sae__wsae_differs_from_sae_when_variances_differ() -> None:
    # The same check is not vacuous: uneven variances give uneven weights and a
    # different run (the first weight_estimation_batches steps are still identical).
    x_p = torch.rand(256, TINY.n_p, generator=torch.Generator().manual_seed(0))
    x_p = x_p * torch.tensor([0.5, 1.0, 2.0, 4.0])
    plain = train_sae(x_p, TINY, None, seed=1)
    weighted = train_sae(x_p, TINY, 1.0, seed=1)
    assert not torch.allclose(weighted.input_weights, torch.ones(TINY.n_p))
    assert not torch.equal(plain.W_dec, weighted.W_dec)


def _oracle_sae(w_p_PN: torch.Tensor) -> StandardTrainingSAE:
    """Theorem 1's closed-form SAE as a SAELens ``standard`` SAE: tied, bias-free."""
    n_p, n = w_p_PN.shape
    sae = StandardTrainingSAE(
        StandardTrainingSAEConfig(d_in=n_p, d_sae=n, l1_coefficient=0.0)
    )
    with torch.no_grad():
        sae.W_enc.copy_(w_p_PN.float())
        sae.W_dec.copy_(w_p_PN.T.float())
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_evaluate__closed_form_oracle_matches_the_theory_and_beats_a_random_sae():
    data = make_wsae_data(n=40, n_p=10, sparsity=0.99, n_samples=4096, seed=0)
    oracle = evaluate(_oracle_sae(data.w_p), *data)
    # The same numbers straight from wsae_theory (its tied SAE, float64).
    w_m = closed_form_encoder(data.w_p)
    gt = ground_truth_error_on_support(data.x, sae_latents(w_m, data.x_p))
    poly = polysemantic_error(data.x_p, sae_reconstruction(w_m, data.x_p))
    assert oracle["gt_error_on_support"] == pytest.approx(float(gt), rel=1e-4)
    assert oracle["polysemantic_error"] == pytest.approx(float(poly), rel=1e-4)
    # The input scale cancels (a bias-free ReLU SAE is positively homogeneous).
    scaled = evaluate(_oracle_sae(data.w_p), *data, scale=0.37)
    assert scaled["gt_error_on_support"] == pytest.approx(
        oracle["gt_error_on_support"], rel=1e-4
    )
    torch.manual_seed(0)
    random = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=10, d_sae=40))
    trivial = float(ground_truth_error_on_support(data.x, torch.zeros_like(data.x)))
    assert oracle["gt_error_on_support"] < 0.2 * trivial
    assert (
        oracle["gt_error_on_support"]
        < 0.2 * evaluate(random, *data)["gt_error_on_support"]
    )


def _row(sparsity: float, method: str, per_seed: list[float]) -> dict:
    return {
        "sparsity": sparsity,
        "method": method,
        "gt_error_on_support": sum(per_seed) / len(per_seed),
        "gt_error_on_support_per_seed": per_seed,
    }


def test_moderate_sparsity_summary__is_computed_from_paired_numbers() -> None:
    rows = [
        _row(0.5, "sae", [1.0, 2.0, 3.0]),
        _row(0.5, "wsae_alpha1", [0.9, 1.9, 2.9]),  # lower in every seed
        _row(0.5, "wsae_alpha0.5", [1.1, 1.9, 3.0]),  # mixed
        _row(0.99, "sae", [1.0, 1.0, 1.0]),
        _row(0.99, "wsae_alpha1", [9.0, 9.0, 9.0]),  # extreme S: not counted
        _row(0.99, "wsae_alpha0.5", [9.0, 9.0, 9.0]),
    ]
    summary = moderate_sparsity_summary(rows, max_sparsity=0.9)
    assert summary["sparsities"] == [0.5]
    lower, mixed = (
        summary["methods"]["wsae_alpha1"],
        summary["methods"]["wsae_alpha0.5"],
    )
    assert lower["lowers"] and lower["pairs_lower"] == "3/3"
    ratios = [-0.1 / 1.0, -0.1 / 2.0, -0.1 / 3.0]  # wsae / sae - 1 per seed
    assert lower["gt_relative_change_mean"] == pytest.approx(sum(ratios) / 3)
    assert lower["per_sparsity"][0]["gt_relative_change"] == pytest.approx(
        sum(ratios) / 3
    )
    assert not mixed["lowers"] and mixed["pairs_lower"] == "1/3"
    assert summary["any_wsae_lowers"]
    rows[1] = _row(0.5, "wsae_alpha1", [1.0, 2.0, 3.0])
    assert not moderate_sparsity_summary(rows, 0.9)["any_wsae_lowers"]
