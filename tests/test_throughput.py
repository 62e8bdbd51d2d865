"""The matched-sparsity throughput benchmark (evals/bench/throughput.py) at toy size."""

import json
import os

import pytest
import torch

from sae_gba_evals.bench import throughput
from sae_gba_evals.bench.matching import (
    L0_TOLERANCE,
    METHODS,
    match_gba_target,
    mean_l0,
    predict_gba_target,
    settled_l0,
)
from sae_gba_evals.bench.throughput import (
    SHAPES,
    run_throughput,
    sparsify_available,
    synthetic_activations,
)
from tests.helpers import cli_error

ROW_FIELDS = (
    "arch",
    "d_in",
    "d_sae",
    "batch",
    "l0",
    "tokens_per_s",
    "peak_rss_mb",
    "encoder_floor_fraction",
)


def _run(tmp_path, methods=METHODS, points=(32, 128)):
    (shape,) = SHAPES["tiny"]
    logged = []
    result = run_throughput(
        tmp_path / "t.json",
        shapes=(shape,),
        l0_points=points,
        methods=methods,
        steps={shape: (1, 2)},
        harvest=False,
        threads=1,
        log=logged.append,
    )
    return result, logged


def test_throughput_bench__every_method_at_every_l0_point_with_all_fields(tmp_path):
    result, _ = _run(tmp_path)
    measured = set(METHODS) if sparsify_available() else set(METHODS) - {"sparsify"}
    assert {(r["arch"], r["l0_point"]) for r in result["rows"]} == {
        (m, p) for m in measured for p in (32, 128)
    }
    assert len(result["rows"]) == 2 * len(measured)
    for row in result["rows"]:
        assert all(field in row for field in ROW_FIELDS), row
        assert abs(row["l0"] - row["l0_point"]) <= L0_TOLERANCE * row["l0_point"], row
        assert row["tokens_per_s"] > 0 and row["peak_rss_mb"] > 0
        assert 0 < row["encoder_floor_fraction"] < 1
    # Every method, sparsify included, steps the same optimizer.
    assert {r["optimizer"] for r in result["rows"]} == {"Adam (fused)"}
    gba = [r for r in result["rows"] if r["arch"] == "gba"]
    # 2 timed steps hold no adaptation: one is timed apart and its share added.
    assert all(r["adaptations_timed"] == 0 and r["adaptation_seconds"] > 0 for r in gba)
    assert all(r["profile"] and r["target_l0"] > 0 for r in gba)
    assert result["threads"] == 1 and result["mm_peak_gflops"] > 0
    assert len(result["load_average_before"]) == 3
    assert [(c["l0_point"], set(c["gba_speedup"])) for c in result["acceptance"]] == [
        (p, measured - {"gba"}) for p in (32, 128)
    ]
    assert (tmp_path / "t.png").stat().st_size > 0
    assert json.loads((tmp_path / "t.json").read_text())["rows"] == result["rows"]


def test_throughput_bench__without_sparsify_says_how_to_add_it(tmp_path, monkeypatch):
    monkeypatch.setattr(throughput, "sparsify_available", lambda: False)
    result, logged = _run(tmp_path, methods=("gba", "sparsify"), points=(32,))
    assert [r["arch"] for r in result["rows"]] == ["gba"]
    assert "pip install 'sae-gba[bench]'" in result["sparsify"]
    assert any("sparsify left out" in line for line in logged)


@pytest.mark.parametrize(("arch", "l0"), [("gba", 64), ("weighted_gba", 100)])
def test_match_gba_target__lands_within_10_percent(arch, l0):
    """At L0 100 of 1,024 latents over d_in 16 the bias clamp holds the first group
    below its target: the measurement corrects the floors' prediction."""
    shape = (16, 1024, 256)
    data = synthetic_activations(8 * shape[2], shape[0])
    sae, _, target, trial = match_gba_target(arch, shape, l0, data)
    x = data[shape[2] : 2 * shape[2]]
    with torch.no_grad():
        assert abs((sae.encode(x) != 0).sum(-1).double().mean() - l0) <= 0.1 * l0
    assert abs(trial - l0) <= 0.1 * l0
    assert target > l0


def test_mean_l0__sparse_coo_acts_count_as_their_dense_form():
    dense = torch.zeros(4, 6)
    dense[0, [1, 2, 5]] = torch.tensor([0.5, -1.0, 2.0])
    dense[3, 0] = 3.0
    coo = dense.to_sparse()
    # An explicit zero in the COO values is inactive, as in the dense form.
    padded = torch.sparse_coo_tensor(
        torch.cat([coo.indices(), torch.tensor([[1], [4]])], dim=1),
        torch.cat([coo.values(), torch.zeros(1)]),
        dense.shape,
    )
    assert mean_l0(dense) == mean_l0(coo) == mean_l0(padded) == 1.0


@pytest.mark.parametrize("l0", [32, 128])
def test_predict_gba_target__sets_the_target_so_the_floors_land_on_the_point(l0):
    """Settled gates open each latent on floor(p * batch) tokens, below p * batch."""
    shape = (640, 4096, 1024)
    target = predict_gba_target("gba", shape, l0)
    assert settled_l0("gba", *shape, l0) < 0.99 * l0 < l0 < target
    assert abs(settled_l0("gba", *shape, target) - l0) <= 0.01 * l0


def test_match_gba_target__a_point_between_two_floor_steps_is_named():
    shape = (16, 4096, 32)  # one token more in a group of 410 latents: L0 + 12.8
    data = synthetic_activations(8 * shape[2], shape[0])
    with pytest.raises(ValueError, match="no target_l0 landed within 10% of L0 8"):
        match_gba_target("gba", shape, 8, data)


def test_match_gba_target__out_of_reach_names_the_target():
    shape = (16, 256, 64)
    data = synthetic_activations(8 * shape[2], shape[0])
    with pytest.raises(ValueError, match="target_l0"):
        match_gba_target("gba", shape, 200, data)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--size", "huge"], "--size 'huge' is invalid: must be one of"),
        (["--l0", "32,x"], "--l0 '32,x' is invalid: must be comma-separated"),
        (["--l0", "4096"], "between 1 and 4095"),
        (["--methods", "gba,sae"], "--methods 'gba,sae' is invalid"),
    ],
)
def test_bench_throughput_cli__bad_options_are_named(tmp_path, capsys, argv, message):
    out = tmp_path / "t.json"
    error = cli_error(capsys, ["bench", "throughput", "--out", str(out), *argv])
    assert message in error
    assert not out.exists()


def test_profiler_noise__native_lines_with_the_prefix_are_dropped(capfd):
    from sae_gba_evals.bench.timing import _native_lines_dropped

    with _native_lines_dropped("USDT:"):
        os.write(
            2, b"USDT:2026 profiler_start\nreal warning\nUSDT:2026 profiler_stop\n"
        )
    err = capfd.readouterr().err
    assert err == "real warning\n"
