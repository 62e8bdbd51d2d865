"""The framework-free GBA core against hand-computed values."""

import math

import pytest
import torch

from sae_gba.bias_adaptation import (
    BIAS_MAX,
    BIAS_MIN,
    accumulate_window,
    adapt_biases,
    batch_window,
    closed_windows,
    expected_l0,
    group_index,
    high_target_for_l0,
    quantile_biases,
    target_frequencies,
)


def test_target_frequencies__geometric_from_high_to_low():
    targets = target_frequencies(3, 0.5, 0.005)
    assert targets.tolist() == pytest.approx([0.5, 0.05, 0.005])
    ten = target_frequencies(10, 0.5, 1e-4)
    ratios = ten[1:] / ten[:-1]
    assert torch.allclose(ratios, ratios[0].expand_as(ratios))
    assert ten[0].item() == pytest.approx(0.5)
    assert ten[-1].item() == pytest.approx(1e-4)
    assert ratios[0].item() == pytest.approx((2e-4) ** (1 / 9))


def test_target_frequencies__single_group_is_ba_at_high_target():
    assert target_frequencies(1, 0.09, 0.001).tolist() == [0.09]


def test_group_index__contiguous_balanced_blocks():
    assert group_index(6, 3).tolist() == [0, 0, 1, 1, 2, 2]
    sizes = torch.bincount(group_index(10, 3), minlength=3).tolist()
    assert sorted(sizes) == [3, 3, 4]
    assert group_index(5, 1).tolist() == [0] * 5


def test_accumulate_window__counts_and_running_max():
    counts = torch.zeros(3, dtype=torch.int64)
    peaks = torch.full((3,), -math.inf)
    first = batch_window(torch.tensor([[0.5, -1.0, 0.0], [0.2, -2.0, 0.1]]))
    assert first[0].tolist() == [2, 0, 1]
    assert first[1].tolist() == pytest.approx([0.5, -1.0, 0.1])
    accumulate_window(counts, peaks, *first)
    accumulate_window(counts, peaks, *batch_window(torch.tensor([[0.9, -0.5, -0.1]])))
    assert counts.tolist() == [3, 0, 1]
    assert peaks.tolist() == pytest.approx([0.9, -0.5, 0.1])


def _adapt(bias, frequency, peaks, targets, groups, n_groups, dead_threshold=0.0):
    return adapt_biases(
        torch.tensor(bias),
        torch.tensor(frequency, dtype=torch.float64),
        torch.tensor(peaks),
        torch.tensor(targets, dtype=torch.float64),
        torch.tensor(groups),
        n_groups,
        gamma_plus=0.1,
        gamma_minus=0.2,
        dead_threshold=dead_threshold,
    )


def test_adapt_biases__over_active_lowers_by_gamma_minus_times_own_peak():
    new = _adapt([-0.1], [0.3], [0.5], [0.1], [0], 1)
    assert new.tolist() == pytest.approx([-0.1 - 0.2 * 0.5])


def test_adapt_biases__in_band_unchanged():
    # fired, but not more often than its target
    new = _adapt([-0.3, -0.4], [0.05, 0.1], [0.2, 0.3], [0.1, 0.1], [0, 0], 1)
    assert new.tolist() == pytest.approx([-0.3, -0.4])


def test_adapt_biases__dead_raised_by_group_mean_of_positive_peaks():
    # group 0: neurons 0,1,2 (neuron 2 dead); group 1: neurons 3,4 (neuron 4 dead)
    bias = [-0.2, -0.2, -0.5, -0.2, -0.6]
    frequency = [0.01, 0.01, 0.0, 0.01, 0.0]
    peaks = [0.4, 0.2, -0.3, 0.6, -0.1]
    new = _adapt(bias, frequency, peaks, [0.1] * 5, [0, 0, 0, 1, 1], 2)
    # group 0 mean positive peak = (0.4 + 0.2) / 2 = 0.3; group 1 = 0.6
    assert new.tolist() == pytest.approx(
        [-0.2, -0.2, -0.5 + 0.1 * 0.3, -0.2, -0.6 + 0.1 * 0.6]
    )


def test_adapt_biases__clamped_to_bounds():
    new = _adapt([-0.95, -0.01], [0.9, 0.0], [1.0, -0.5], [0.1, 0.1], [0, 1], 2)
    # neuron 0 would go to -1.15; neuron 1 (dead, its group has no positive peak)
    # uses the overall mean positive peak 1.0 and would go to +0.09
    assert new.tolist() == pytest.approx([BIAS_MIN, BIAS_MAX])


def test_adapt_biases__nothing_fired_anywhere_uses_unit_step():
    new = _adapt([-0.5, -0.7], [0.0, 0.0], [-0.1, -0.2], [0.1, 0.1], [0, 0], 1)
    assert new.tolist() == pytest.approx([-0.4, -0.6])


def test_adapt_biases__dead_threshold_counts_rare_firing_as_dead():
    new = _adapt([-0.5], [0.001], [0.3], [0.1], [0], 1, dead_threshold=0.002)
    assert new.tolist() == pytest.approx([-0.5 + 0.1 * 0.3])


def test_adapt_biases__group_targets_differ_per_neuron():
    # same frequency 0.05: over-active for the 0.01 group, in band for the 0.1 group
    new = _adapt([-0.1, -0.1], [0.05, 0.05], [0.5, 0.5], [0.1, 0.01], [0, 1], 2)
    assert new.tolist() == pytest.approx([-0.1, -0.1 - 0.2 * 0.5])


def test_quantile_biases__fire_on_the_target_fraction_clamped():
    # Columns: a ramp, a ramp above the clamp, all negative.
    preacts = torch.tensor(
        [[0.4, 3.0, -0.1], [0.3, 2.5, -0.2], [0.2, 2.0, -0.3], [0.1, 1.5, -0.4]]
    )
    # k = floor(p * 4) rows fire: 2, 1, 2 -> minus the 3rd, 2nd, 3rd largest.
    biases = quantile_biases(preacts, torch.tensor([0.5, 0.25, 0.5]), chunk=2)
    assert biases.tolist() == pytest.approx([-0.2, BIAS_MIN, BIAS_MAX])
    assert ((preacts[:, 0] + biases[0]) > 0).sum() == 2
    # Below one row in the batch: minus the maximum, nothing fires yet.
    assert quantile_biases(preacts[:, :1], torch.tensor([0.1])).item() == pytest.approx(
        -0.4
    )


def test_closed_windows__enough_firings_or_enough_expected_firings():
    # Targets 0.5, 0.5, 1e-4, 1e-4, 1e-4 with 20 firings needed:
    # - 0.5 at 100 tokens expects 50: closed whatever it fired (even 0: dead);
    # - 0.5 at 30 tokens expects 15 and fired 19: still open;
    # - 1e-4 at 100 tokens expects 0.01: open at 3 firings, closed at 20 (it is
    #   over-active beyond doubt), open at 0 (no evidence it is dead);
    # - 1e-4 at 200,000 tokens expects 20: closed even with no firing.
    counts = torch.tensor([0, 19, 3, 20, 0])
    tokens = torch.tensor([100, 30, 100, 100, 200_000])
    targets = torch.tensor([0.5, 0.5, 1e-4, 1e-4, 1e-4], dtype=torch.float64)
    closed = closed_windows(counts, tokens, targets, min_firings=20)
    assert closed.tolist() == [True, False, False, True, True]


def test_closed_windows__zero_evidence_is_the_papers_fixed_windows():
    counts = torch.tensor([0, 5])
    closed = closed_windows(counts, torch.tensor(7), torch.tensor([1e-4, 0.5]), 0)
    assert closed.tolist() == [True, True]


def test_closed_windows__low_target_accumulates_while_high_adapts():
    """The controller loop on hand-made counts: a 1e-3 group fires at its target
    (1 per 1,000 tokens), a 0.2 group too; 500 tokens a check, 20 firings needed.
    The high group is judged at every check; the low group after 40 checks
    (20,000 tokens), with its frequency then measured on all of them."""
    targets = torch.tensor([0.2, 1e-3], dtype=torch.float64)
    counts = torch.zeros(2, dtype=torch.int64)
    tokens = torch.zeros(2, dtype=torch.int64)
    judged: list[list[int]] = [[], []]
    for check in range(1, 81):
        tokens += 500
        counts += torch.tensor([100, 1 if check % 2 == 0 else 0])
        closed = closed_windows(counts, tokens, targets, min_firings=20)
        for neuron in closed.nonzero().flatten().tolist():
            judged[neuron].append(check)
            assert counts[neuron] / tokens[neuron] == pytest.approx(
                targets[neuron].item()
            )
        counts[closed] = 0
        tokens[closed] = 0
    assert judged[0] == list(range(1, 81))
    assert judged[1] == [40, 80]


def test_adapt_biases__scale_step_uses_the_unbiased_peak():
    # y peaks at 0.05 with b = -0.8: the paper's margin step is 0.2 * 0.05 = 0.01,
    # the scale step 0.2 * (0.05 + 0.8) = 0.17. A dead neuron is raised by the
    # group mean of unbiased peaks: (0.85 + 0.3) / 2 = 0.575 (times 0.1).
    args = (
        torch.tensor([-0.8, -0.5]),
        torch.tensor([0.5, 0.0], dtype=torch.float64),
        torch.tensor([0.05, -0.2]),
        torch.tensor([0.1, 0.1], dtype=torch.float64),
        torch.tensor([0, 0]),
        1,
    )
    margin = adapt_biases(*args, gamma_plus=0.1, gamma_minus=0.2)
    scale = adapt_biases(*args, gamma_plus=0.1, gamma_minus=0.2, step_unit="scale")
    assert margin.tolist() == pytest.approx([-0.81, -0.495])
    assert scale.tolist() == pytest.approx([-0.97, -0.5 + 0.0575])


def test_expected_l0__group_sizes_times_targets_by_hand():
    # 6 neurons in 3 groups of 2, targets 0.5 / 0.05 / 0.005.
    assert expected_l0(6, 3, 0.5, 0.005) == pytest.approx(2 * 0.555)
    # 10 neurons in groups of 4, 3, 3: the first group is the largest.
    assert expected_l0(10, 3, 0.5, 0.005) == pytest.approx(4 * 0.5 + 0.15 + 0.015)
    assert expected_l0(8, 1, 0.25, 0.001) == pytest.approx(2.0)


def test_high_target_for_l0__inverts_expected_l0_with_groups_and_low():
    assert high_target_for_l0(2.0, 8, 1, 0.001) == pytest.approx(0.25)
    for n_groups, low in ((10, 1e-4), (3, 1e-3)):
        for l0 in (5.0, 40.0):
            high = high_target_for_l0(l0, 2048, n_groups, low)
            assert expected_l0(2048, n_groups, high, low) == pytest.approx(l0, rel=1e-6)
    # 6 neurons, 3 groups, low 0.005: at most 2 * (0.5 + 0.05 + 0.005) = 1.11.
    assert high_target_for_l0(1.11, 6, 3, 0.005, 0.5) == pytest.approx(0.5, rel=1e-6)
    with pytest.raises(
        ValueError, match=r"out of reach .* must lie in \(0\.03.*, 1\.11\]"
    ):
        high_target_for_l0(1.2, 6, 3, 0.005, 0.5)


def test_adapt_biases__tail_step_closes_the_log_frequency_gap_by_hand():
    # Neuron 0 fired 60 times in 1,000 tokens against a target of 0.01: gap ln 6.
    # Its margin peak 0.4 spans about H(60) = ln 60 + Euler's gamma + 1 / 120 =
    # 4.679894 tail scales, so the full step is 0.4 * ln 6 / 4.679894 = 0.153145;
    # gamma_minus = 0.5 takes half of it. Neuron 1 fires at exactly half its target
    # (the band's edge) and keeps its bias; neuron 2 (dead) is raised by 0.1 x its
    # group's mean positive margin peak (0.4 + 0.1) / 2. Neuron 3 fired twice against
    # 10 expected: gap ln 0.2 = -1.609438 over H(2) = 1.520363 tail scales of 0.1,
    # so it is raised by 0.5 * 0.1 * 1.609438 / 1.520363 = 0.0529295.
    new = adapt_biases(
        torch.tensor([-0.3, -0.2, -0.6, -0.5]),
        torch.tensor([0.06, 0.005, 0.0, 0.002], dtype=torch.float64),
        torch.tensor([0.4, 0.1, -0.2, 0.1]),
        torch.tensor([0.01] * 4, dtype=torch.float64),
        torch.tensor([0, 0, 0, 1]),
        2,
        gamma_plus=0.1,
        gamma_minus=0.5,
        step_unit="tail",
        window_tokens=torch.tensor([1000] * 4),
    )
    assert new.tolist() == pytest.approx(
        [-0.3 - 0.0765726, -0.2, -0.6 + 0.025, -0.5 + 0.0529295], abs=1e-6
    )


def test_adapt_biases__tail_step_needs_window_tokens():
    one = torch.tensor([0.1])
    with pytest.raises(ValueError, match="window_tokens"):
        adapt_biases(
            one,
            one.double(),
            one,
            one.double(),
            torch.tensor([0]),
            1,
            gamma_plus=0.1,
            gamma_minus=0.5,
            step_unit="tail",
        )
