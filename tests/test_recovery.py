"""Tests for the feature-recovery metrics, on hand-made dictionaries."""

import math

import pytest
import torch

from sae_gba import recovery
from sae_gba.recovery import (
    best_match_cosine,
    cosine_matrix,
    cross_seed_consistency,
    feature_recovery_rate,
    feature_recovery_rates,
    recovery_by_frequency,
)

EYE3 = torch.eye(3)


def _hand_learned() -> torch.Tensor:
    """Learned rows with known cosines to e1, e2, e3 (any norm)."""
    sine = math.sqrt(1 - 0.85**2)
    return torch.tensor(
        [
            [2.0, 0.0, 0.0],  # e1 exactly (cos 1)
            [0.0, 1.0, 1.0],  # cos 1/sqrt(2) with e2 and e3
            [0.0, 0.0, -3.0],  # -e3: cos -1 with e3
            [sine, 0.85, 0.0],  # cos 0.85 with e2, sqrt(1 - 0.85^2) with e1
        ]
    )


def test_cosine_matrix_of_a_rotation_is_known_and_norm_free():
    angle = math.pi / 3
    c, s = math.cos(angle), math.sin(angle)
    true = torch.eye(2)
    learned = torch.tensor([[c, s], [-s, c]]) * torch.tensor([[3.0], [0.5]])
    expected = torch.tensor([[c, -s], [s, c]])
    torch.testing.assert_close(cosine_matrix(learned, true), expected)
    # e1's best is u1 (cos 60 deg = 0.5); e2's best is u1 too (sin 60 deg > cos 60 deg).
    torch.testing.assert_close(best_match_cosine(learned, true), torch.tensor([c, s]))


def test_cosine_matrix_is_true_by_learned():
    cosines = cosine_matrix(_hand_learned(), EYE3)
    assert cosines.shape == (3, 4)
    assert float(cosines[2, 2]) == pytest.approx(-1.0)
    assert float(cosines[1, 3]) == pytest.approx(0.85)


def test_best_match_and_frr_count_by_hand():
    best = best_match_cosine(_hand_learned(), EYE3)
    torch.testing.assert_close(best, torch.tensor([1.0, 0.85, 1 / math.sqrt(2)]))
    assert feature_recovery_rate(_hand_learned(), EYE3, 0.9) == pytest.approx(1 / 3)
    assert feature_recovery_rate(_hand_learned(), EYE3, 0.8) == pytest.approx(2 / 3)
    assert feature_recovery_rate(_hand_learned(), EYE3, 0.7) == pytest.approx(1.0)
    assert feature_recovery_rate(_hand_learned(), EYE3, 1.0) == 0.0  # strictly above
    rates = feature_recovery_rates(_hand_learned(), EYE3, (0.8, 0.9))
    assert rates == pytest.approx({0.8: 2 / 3, 0.9: 1 / 3})


def test_negative_cosine_does_not_count_as_recovery():
    # An anti-parallel neuron is the worst match (-1), not a perfect one (|cos| = 1).
    best = best_match_cosine(torch.tensor([[-2.0, 0.0, 0.0]]), EYE3[:1])
    torch.testing.assert_close(best, torch.tensor([-1.0]))
    torch.testing.assert_close(best_match_cosine(-EYE3, EYE3), torch.zeros(3))
    assert feature_recovery_rate(-EYE3, EYE3, 0.8) == 0.0
    learned = torch.cat([-EYE3, EYE3[:1]])
    assert feature_recovery_rate(learned, EYE3, 0.8) == pytest.approx(1 / 3)


def test_zero_learned_row_has_cosine_zero():
    learned = torch.tensor([[0.0, 0.0], [1.0, -1.0]])
    torch.testing.assert_close(
        cosine_matrix(learned, torch.eye(2)),
        torch.tensor([[0.0, 1 / math.sqrt(2)], [0.0, -1 / math.sqrt(2)]]),
    )


def test_chunked_best_match_equals_full_matrix_max(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    learned = torch.randn(50, 8, generator=generator)
    true = torch.randn(11, 8, generator=generator)
    expected = cosine_matrix(learned, true).max(dim=1).values
    monkeypatch.setattr(recovery, "_CHUNK_ROWS", 3)
    torch.testing.assert_close(best_match_cosine(learned, true), expected)


def test_recovery_by_frequency_buckets_by_hand():
    best = torch.tensor([0.95, 0.5, 0.92, 0.99, 0.1, 0.85])
    frequencies = torch.tensor([0.1, 0.05, 0.02, 0.01, 0.001, 0.005])
    buckets = recovery_by_frequency(best, frequencies, bucket_edges=[1e-3, 1e-2, 1e-1])
    assert [(b["low"], b["high"], b["count"]) for b in buckets] == [
        (1e-3, 1e-2, 2),
        (1e-2, 1e-1, 4),  # the last bucket includes its upper edge (0.1)
    ]
    assert buckets[0]["recovered_fraction"] == 0.0
    assert buckets[0]["mean_best_cosine"] == pytest.approx(0.475)
    assert buckets[1]["recovered_fraction"] == pytest.approx(0.75)
    assert buckets[1]["mean_best_cosine"] == pytest.approx(0.84)
    assert recovery_by_frequency(best, frequencies, threshold=0.4, n_buckets=1)[0] == (
        pytest.approx(
            {"low": 1e-3, "high": 0.1, "count": 6, "recovered_fraction": 5 / 6,
             "mean_best_cosine": 4.31 / 6}
        )
    )  # fmt: skip

    # n_buckets: log-spaced from min to max frequency -> edges 1e-3, 1e-2, 1e-1.
    auto = recovery_by_frequency(best, frequencies, n_buckets=2)
    assert [b["count"] for b in auto] == [2, 4]
    assert auto[1]["low"] == pytest.approx(1e-2)

    empty_first = recovery_by_frequency(
        best, frequencies, bucket_edges=[1e-5, 1e-4, 1.0]
    )
    assert empty_first[0]["count"] == 0
    assert math.isnan(empty_first[0]["recovered_fraction"])
    assert math.isnan(empty_first[0]["mean_best_cosine"])
    assert empty_first[1]["count"] == 6
    # Features outside the edges are left out: [0.01, 0.05] keeps 0.01, 0.02, 0.05.
    inside = recovery_by_frequency(best, frequencies, bucket_edges=[0.01, 0.05])
    assert inside[0]["count"] == 3


def test_cross_seed_consistency_selects_top_neurons_by_activation():
    dict_a = torch.tensor(
        [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]]
    )
    sine = math.sqrt(1 - 0.95**2)
    # a0 -> 0.95 (match), a1 -> only sine and -1 (no match), a2 -> 1 (match),
    # a3 -> (0.95 + sine) / sqrt(2) ~ 0.892 (just below 0.9).
    dict_b = torch.tensor([[0.95, sine, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, 5.0]])
    descending = torch.tensor([4.0, 3.0, 2.0, 1.0])
    assert cross_seed_consistency(dict_a, dict_b, descending, 0.25) == 1.0
    assert cross_seed_consistency(dict_a, dict_b, descending, 0.5) == 0.5
    assert cross_seed_consistency(dict_a, dict_b, descending, 0.75) == pytest.approx(
        2 / 3
    )
    assert cross_seed_consistency(dict_a, dict_b, descending, 1.0) == 0.5
    assert (
        cross_seed_consistency(dict_a, dict_b, descending, 0.01) == 1.0
    )  # >= 1 neuron
    ascending = descending.flip(0)
    assert cross_seed_consistency(dict_a, dict_b, ascending, 0.25) == 0.0
    assert (
        cross_seed_consistency(dict_a, dict_b, ascending, 0.25, threshold=0.85) == 1.0
    )
    assert cross_seed_consistency(dict_a, dict_b, ascending, 0.5, threshold=0.9) == 0.5


def test_cross_seed_consistency_selects_exactly_the_fraction():
    # 0.3 * 10 is 3.0000000000000004 in floats: the top 3 match, the 4th does not.
    dict_a, dict_b = torch.eye(10), torch.eye(10)[:3]
    activation = torch.arange(10, 0, -1).float()
    assert cross_seed_consistency(dict_a, dict_b, activation, 0.3) == 1.0
    assert cross_seed_consistency(dict_a, dict_b, activation, 0.4) == 0.75


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: cosine_matrix(torch.ones(3), EYE3), r"learned must be a 2-D.*\(3,\)"),
        (lambda: best_match_cosine(torch.ones(2, 4), EYE3), r"learned has d=4.*d=3"),
        (
            lambda: cosine_matrix(EYE3, torch.zeros(0, 3)),
            r"true must be a 2-D.*\(0, 3\)",
        ),
        (lambda: best_match_cosine(EYE3 * math.nan, EYE3), "learned must be .*finite"),
        (lambda: best_match_cosine(EYE3, torch.zeros(2, 3)), "true has a zero row"),
        (
            lambda: feature_recovery_rate(EYE3, EYE3, 1.5),
            r"threshold .*\[-1, 1\].*1\.5",
        ),
        (
            lambda: cross_seed_consistency(EYE3, torch.ones(2, 2), torch.ones(3), 0.5),
            "dict_b has d=2",
        ),
        (
            lambda: cross_seed_consistency(EYE3, EYE3, torch.ones(4), 0.5),
            r"activation_a .*\(3,\).*\(4,\)",
        ),
        (
            lambda: cross_seed_consistency(EYE3, EYE3, torch.ones(3), 0.0),
            r"top_fraction must be in \(0, 1\]; got 0\.0",
        ),
        (
            lambda: recovery_by_frequency(torch.ones(3), torch.ones(2)),
            r"best_match has shape \(3,\) but frequencies has \(2,\)",
        ),
        (
            lambda: recovery_by_frequency(torch.ones(2), torch.tensor([0.1, 0.0])),
            "frequencies must be > 0",
        ),
        (
            lambda: recovery_by_frequency(
                torch.ones(2), torch.ones(2), bucket_edges=[1.0]
            ),
            "bucket_edges must be",
        ),
    ],
)
def test_bad_inputs_raise_naming_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()
