"""``sae-gba synth wsae``: schema, SAE and WSAE differ only by weights, metric path."""

import json

import pytest
import torch
from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig

from sae_gba.weighted_sae import ESTIMATED, input_weights
from sae_gba.wsae_theory import (
    closed_form_encoder,
    ground_truth_error_on_support,
    make_wsae_data,
    polysemantic_error,
    sae_latents,
    sae_reconstruction,
)
from sae_gba_evals.lab.experiments import run_experiment
from sae_gba_evals.lab.wsae import (
    WSAESettings,
    build_sae,
    estimation_variance,
    evaluate,
    loss_scale_ratio,
    method_name,
    run_cell,
    train_sae,
)
from sae_gba_evals.lab.wsae_run import method_names, moderate_sparsity_summary

TINY = WSAESettings(
    n=12,
    n_p=4,
    n_mono=2,
    sparsities=(0.5, 0.9),
    steps=12,
    batch_size=32,
    n_train=256,
    n_eval=128,
    weight_estimation_batches=3,
)
METHODS = [
    "sae",
    "wsae_alpha0.5",
    "wsae_alpha1",
    "sae_l1_matched_alpha0.5",
    "sae_l1_matched_alpha1",
]


def _parameters(sae: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in sae.named_parameters()}


def _assert_equal_parameters(a: torch.nn.Module, b: torch.nn.Module) -> None:
    pa, pb = _parameters(a), _parameters(b)
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name


def test_wsae_experiment__runs_end_to_end_and_writes_the_schema(tmp_path) -> None:
    out = tmp_path / "wsae.json"
    run_experiment("wsae", out, seeds=2, settings=TINY, workers=1)
    result = json.loads(out.read_text())
    assert out.with_suffix(".png").is_file()
    assert result["experiment"] == "wsae" and result["wall_seconds"] > 0
    assert result["settings"]["base_architecture"] == "standard"
    assert result["settings"]["steps"] == TINY.steps
    assert result["settings"]["w_p_kinds"] == ["gaussian", "mixed"]
    assert [(r["w_p_kind"], r["sparsity"], r["method"]) for r in result["rows"]] == [
        (k, s, m)
        for k in ("gaussian", "mixed")
        for s in TINY.sparsities
        for m in METHODS
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
        assert len(row["polysemantic_error_per_seed"]) == 2
        assert row["gt_error_on_support"] >= 0 and row["polysemantic_error"] >= 0
        wsae = row["method"].startswith("wsae_alpha")
        if wsae:
            assert 0 < row["gamma_min"] <= 1 <= row["gamma_max"]
        if row["method"] != "sae":  # WSAE or matched control: r and the L1 used
            assert row["loss_scale_ratio"] >= 1 - 1e-6
            assert len(row["loss_scale_ratio_per_seed"]) == 2
            for r, l1 in zip(
                row["loss_scale_ratio_per_seed"],
                row["l1_coefficient_per_seed"],
                strict=True,
            ):
                expected = TINY.l1_coefficient / r if not wsae else TINY.l1_coefficient
                assert l1 == pytest.approx(expected)
        mixed = row["w_p_kind"] == "mixed"
        assert ("gt_error_on_support_mono" in row) == mixed
        assert ("gamma_mono_mean" in row) == (mixed and wsae)
        if mixed:  # the two groups of features split the on-support error
            assert row["gt_error_on_support_mono"] + row[
                "gt_error_on_support_poly"
            ] == pytest.approx(row["gt_error_on_support"], rel=1e-4)
    by_key = {(r["w_p_kind"], r["sparsity"], r["method"]): r for r in result["rows"]}
    for (kind, sparsity, method), row in by_key.items():  # one r per WSAE and control
        if method.startswith("sae_l1_matched_alpha"):
            twin = by_key[kind, sparsity, method.replace("sae_l1_matched", "wsae")]
            assert row["loss_scale_ratio_per_seed"] == twin["loss_scale_ratio_per_seed"]
    assert set(result["moderate_sparsity"]) == {"gaussian", "mixed"}
    for summary in result["moderate_sparsity"].values():
        assert summary["sparsities"] == [0.5, 0.9]  # moderate: S <= 0.9
        assert set(summary["methods"]) == set(METHODS[1:])
        assert isinstance(summary["any_wsae_lowers"], bool)
        assert isinstance(summary["any_wsae_beats_matched_control"], bool)
        versus = summary["vs_matched_control"]
        assert {k: v["control"] for k, v in versus.items()} == {
            "wsae_alpha0.5": "sae_l1_matched_alpha0.5",
            "wsae_alpha1": "sae_l1_matched_alpha1",
        }
        for entry in [*summary["methods"].values(), *versus.values()]:
            for per_s in entry["per_sparsity"]:
                assert "polysemantic_relative_change" in per_s


def test_defaults__two_kinds_within_the_time_budget() -> None:
    # The default run: both W_p kinds, 5 sparsities (0.95 dropped), 3 methods.
    settings = WSAESettings()
    assert settings.w_p_kinds == ("gaussian", "mixed")
    assert settings.sparsities == (0.5, 0.7, 0.9, 0.99, 0.999)
    assert 1 <= settings.n_mono < settings.n_p < settings.n


def test_run_cell__mixed_weights_follow_the_input_variance() -> None:
    # The estimated gamma = var^alpha: in a "mixed" W_p a polysemantic dimension sums
    # several unit-norm features, so it has the larger variance and the larger weight.
    cell = run_cell("mixed", 0.5, 0, TINY)
    for name in ("wsae_alpha0.5", "wsae_alpha1"):
        metrics = cell["methods"][name]
        assert metrics["gamma_poly_mean"] > metrics["gamma_mono_mean"]
    assert "gamma_mono_mean" not in run_cell("gaussian", 0.5, 0, TINY)["methods"][name]


def test_method_name() -> None:
    assert [method_name(a) for a in (None, 0.5, 1.0)] == METHODS[:3]
    assert [method_name(a, matched=True) for a in (0.5, 1.0)] == METHODS[3:]
    assert method_names(TINY) == METHODS


def test_loss_scale_ratio__hand_made_two_dimensions() -> None:
    # var = (1, 4). alpha 1: gamma^2 ~ (1, 16), mean 8.5, so gamma^2 = (1, 16) / 8.5
    # and r = (1 * 1 + 16 * 4) / 8.5 / (1 + 4) = 65 / 42.5. alpha 0.5: gamma^2 ~
    # (1, 4), mean 2.5, gamma^2 = (0.4, 1.6), r = (0.4 * 1 + 1.6 * 4) / 5 = 1.36.
    variance = torch.tensor([1.0, 4.0])
    assert loss_scale_ratio(variance, 1.0) == pytest.approx(65 / 42.5, rel=1e-6)
    assert loss_scale_ratio(variance, 0.5) == pytest.approx(1.36, rel=1e-6)
    # Scale free, and 1 for equal variances (the weights are all 1).
    assert loss_scale_ratio(7 * variance, 1.0) == pytest.approx(65 / 42.5, rel=1e-6)
    assert loss_scale_ratio(torch.full((3,), 2.0), 1.0) == pytest.approx(1.0)
    # It is E|Gamma (x - mean)|^2 / E|x - mean|^2 on data with those variances.
    x = torch.randn(20_000, 2, dtype=torch.float64) * torch.tensor([1.0, 2.0]) + 5
    gamma = input_weights(torch.tensor([1.0, 4.0]), 1.0).double()
    centred = x - x.mean(0)
    empirical = (gamma * centred).square().sum(1).mean() / centred.square().sum(
        1
    ).mean()
    assert float(empirical) == pytest.approx(65 / 42.5, rel=0.02)


def test_estimation_variance__is_the_variance_the_wsae_estimates() -> None:
    # Columns v * (1, 2, 3, 4) + noise: the WSAE's weights are input_weights of the
    # variance of the first weight_estimation_batches batches of the run's order,
    # which is what the matched control's r is computed from.
    g = torch.Generator().manual_seed(0)
    x_p = torch.rand(256, 1, generator=g) * torch.tensor([1.0, 2.0, 3.0, 4.0])
    x_p = x_p + 0.1 * torch.rand(256, TINY.n_p, generator=g)
    variance = estimation_variance(x_p, TINY, seed=2)
    for alpha in TINY.alphas:
        weighted = train_sae(x_p, TINY, alpha, seed=2)
        assert int(weighted.input_weights_state) == ESTIMATED
        torch.testing.assert_close(
            weighted.input_weights, input_weights(variance, alpha), rtol=1e-5, atol=0
        )
    # Only those batches (3 x 32 of 256 rows): not the full training set's variance.
    assert not torch.allclose(variance, x_p.var(dim=0), rtol=1e-3)
    assert not torch.allclose(variance, estimation_variance(x_p, TINY, seed=3))


def test_build_sae__every_method_starts_from_the_same_parameters() -> None:
    plain = build_sae(TINY, None, seed=3)
    for alpha in TINY.alphas:
        _assert_equal_parameters(plain, build_sae(TINY, alpha, seed=3))
    control = build_sae(TINY, None, seed=3, l1_coefficient=0.15)
    assert control.cfg.l1_coefficient == 0.15 and plain.cfg.l1_coefficient == 0.3
    _assert_equal_parameters(plain, control)
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


def test_evaluate__mixed_oracle_recovers_the_monosemantic_features_exactly():
    # A monosemantic feature's column is orthogonal to every other, so Theorem 1's SAE
    # returns it unchanged: all of the on-support error is on the superposed features.
    data = make_wsae_data(40, 10, 0.7, 2048, seed=1, w_p_kind="mixed", n_mono=4)
    metrics = evaluate(_oracle_sae(data.w_p), *data, n_mono=4)
    assert metrics["gt_error_on_support_mono"] < 1e-10
    assert metrics["gt_error_on_support_poly"] == pytest.approx(
        metrics["gt_error_on_support"], rel=1e-5
    )
    assert metrics["gt_error_on_support_poly"] > 0.1


def _row(sparsity: float, method: str, per_seed: list[float]) -> dict:
    return {
        "sparsity": sparsity,
        "method": method,
        "gt_error_on_support": sum(per_seed) / len(per_seed),
        "gt_error_on_support_per_seed": per_seed,
    }


def test_moderate_sparsity_summary__polysemantic_change_is_paired() -> None:
    sae, wsae = _row(0.5, "sae", [1.0, 2.0]), _row(0.5, "wsae_alpha1", [1.0, 2.0])
    sae["polysemantic_error_per_seed"] = [1.0, 4.0]
    wsae["polysemantic_error_per_seed"] = [1.5, 2.0]  # +50%, -50%
    per_s = moderate_sparsity_summary([sae, wsae], 0.9)["methods"]["wsae_alpha1"]
    assert per_s["per_sparsity"][0]["polysemantic_relative_change"] == pytest.approx(0)


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


def test_moderate_sparsity_summary__wsae_against_its_matched_control() -> None:
    rows = [
        _row(0.5, "sae", [1.0, 2.0, 3.0]),
        _row(0.5, "wsae_alpha1", [0.9, 1.8, 2.7]),  # -10% against the plain SAE
        _row(0.5, "sae_l1_matched_alpha1", [0.8, 1.6, 2.4]),  # -20%: lower still
        _row(0.5, "wsae_alpha0.5", [1.0, 2.0, 3.0]),
        _row(0.5, "sae_l1_matched_alpha0.5", [1.1, 2.2, 3.3]),  # wsae: -1/11 vs it
    ]
    summary = moderate_sparsity_summary(rows, max_sparsity=0.9)
    assert summary["methods"]["wsae_alpha1"]["lowers"]
    assert summary["methods"]["sae_l1_matched_alpha1"]["lowers"]
    assert summary["any_wsae_lowers"]
    versus = summary["vs_matched_control"]
    one, half = versus["wsae_alpha1"], versus["wsae_alpha0.5"]
    assert one["control"] == "sae_l1_matched_alpha1"
    assert one["gt_relative_change_mean"] == pytest.approx(0.9 / 0.8 - 1)
    assert not one["lowers"] and one["pairs_lower"] == "0/3"
    assert half["gt_relative_change_mean"] == pytest.approx(1 / 1.1 - 1)
    assert half["lowers"] and half["pairs_lower"] == "3/3"
    assert summary["any_wsae_beats_matched_control"]
    # A control that lowers the error does not count as a WSAE that does.
    rows[1] = _row(0.5, "wsae_alpha1", [1.0, 2.0, 3.0])
    assert not moderate_sparsity_summary(rows, 0.9)["any_wsae_lowers"]


def test_moderate_sparsity_summary__without_controls_has_no_control_verdict() -> None:
    rows = [_row(0.5, "sae", [1.0, 2.0]), _row(0.5, "wsae_alpha1", [0.5, 1.0])]
    summary = moderate_sparsity_summary(rows, max_sparsity=0.9)
    assert "vs_matched_control" not in summary
    assert summary["any_wsae_lowers"]
