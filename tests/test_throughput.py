"""The training-throughput benchmark (evals/throughput.py) at a toy shape."""

import json

from sae_gba_evals.bench.throughput import ARCHS, run_throughput


def test_throughput_bench__writes_rows_for_every_arch_and_a_png(tmp_path):
    shape = (16, 128, 32)  # topk keeps its default k = 100
    result = run_throughput(
        tmp_path / "t.json",
        shapes=(shape,),
        steps={shape: (2, 2, 3)},
        harvest=False,
        threads=1,
        log=lambda _: None,
    )
    assert result["mm_peak_gflops"] > 0
    assert {row["arch"] for row in result["rows"]} == set(ARCHS)
    for row in result["rows"]:
        assert row["tokens_per_s"] > 0 and row["peak_fraction"] > 0
    assert len(result["rows"]) == len(ARCHS)
    gba = [row for row in result["rows"] if row["arch"] == "gba"]
    gba += result["gba_init_rows"]
    assert [row["gate_state"] for row in gba] == ["settled", "init"]
    # 3 timed steps hold no adaptation: one is timed apart and its share added.
    assert all(row["adaptations_timed"] == 0 for row in gba)
    assert all(row["adaptation_seconds"] > 0 and row["profile"] for row in gba)
    assert (tmp_path / "t.png").stat().st_size > 0
    assert json.loads((tmp_path / "t.json").read_text())["rows"] == result["rows"]
