"""Tests for the synthetic data model X = H V."""

import math

import pytest
import torch

from sae_gba.synthetic import (
    SyntheticConfig,
    SyntheticFeatureModel,
    imbalanced_preset,
    longtail_preset,
    uniform_preset,
)

N_FREQUENCY_SAMPLES = 200_000


def _max_z_score(support: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest |empirical - expected| per-feature frequency, in standard errors."""
    n_samples = support.shape[0]
    empirical = support.double().mean(dim=0)
    standard_error = (expected * (1 - expected) / n_samples).sqrt()
    return float(((empirical - expected).abs() / standard_error).max())


def test_feature_directions_are_seeded_unit_gaussian_rows():
    model = SyntheticFeatureModel(uniform_preset(n_features=64, d=16, seed=3))
    directions = model.feature_directions
    assert directions.shape == (64, 16)
    torch.testing.assert_close(directions.norm(dim=1), torch.ones(64))
    again = SyntheticFeatureModel(uniform_preset(n_features=64, d=16, seed=3))
    assert torch.equal(directions, again.feature_directions)
    other = SyntheticFeatureModel(uniform_preset(n_features=64, d=16, seed=4))
    assert not torch.allclose(directions, other.feature_directions)
    # Random directions in 16 dims are far from parallel: no duplicated rows.
    cosines = directions @ directions.T - torch.eye(64)
    assert float(cosines.abs().max()) < 0.95


def test_uniform_model_has_exactly_s_active_per_row_and_frequency_s_over_n():
    model = SyntheticFeatureModel(uniform_preset(sparsity=5, n_features=128, d=42))
    generator = torch.Generator().manual_seed(0)
    x, coefficients = model.sample(4096, generator)
    assert x.shape == (4096, 42) and coefficients.shape == (4096, 128)
    assert x.dtype == coefficients.dtype == torch.float32
    assert torch.equal((coefficients > 0).sum(dim=1), torch.full((4096,), 5))
    torch.testing.assert_close(x, coefficients @ model.feature_directions)

    expected = model.feature_frequencies()
    torch.testing.assert_close(
        expected, torch.full((128,), 5 / 128, dtype=torch.float64)
    )
    support = model.sample_support(N_FREQUENCY_SAMPLES, generator)
    assert _max_z_score(support, expected) < 5.0


def test_imbalanced_mixture_half_s3_half_s20_every_feature_near_0_09():
    config = imbalanced_preset(seed=1)
    assert (config.n_features, config.d) == (128, 42)
    model = SyntheticFeatureModel(config)
    expected = model.feature_frequencies()
    torch.testing.assert_close(
        expected, torch.full((128,), 23 / 256, dtype=torch.float64)
    )
    assert abs(float(expected[0]) - 0.09) < 0.001

    support = model.sample_support(
        N_FREQUENCY_SAMPLES, torch.Generator().manual_seed(1)
    )
    sizes = support.sum(dim=1)
    assert set(sizes.unique().tolist()) == {3, 20}
    fraction_s3 = float((sizes == 3).double().mean())
    assert abs(fraction_s3 - 0.5) < 4 * math.sqrt(0.25 / N_FREQUENCY_SAMPLES)
    assert _max_z_score(support, expected) < 5.0


def test_longtail_spans_two_decades_and_matches_expected_per_feature_and_bucket():
    model = SyntheticFeatureModel(
        longtail_preset(max_frequency=0.2, min_frequency=1e-3)
    )
    expected = model.feature_frequencies()
    assert float(expected.max() / expected.min()) >= 100
    assert float(expected[0]) == pytest.approx(0.2)
    assert float(expected[-1]) == pytest.approx(1e-3)
    assert bool((expected.diff() < 0).all())

    support = model.sample_support(
        N_FREQUENCY_SAMPLES, torch.Generator().manual_seed(2)
    )
    assert _max_z_score(support, expected) < 5.0
    # Per log bucket: total occurrences (a sum of independent Bernoullis) vs expected.
    counts = support.double().sum(dim=0)
    edges = [1e-3, 1e-2, 1e-1, 1.0]
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        in_bucket = (expected >= low) & (expected < high)
        assert int(in_bucket.sum()) >= 10
        probabilities = expected[in_bucket]
        mean = float(probabilities.sum()) * N_FREQUENCY_SAMPLES
        std = math.sqrt(
            float((probabilities * (1 - probabilities)).sum()) * N_FREQUENCY_SAMPLES
        )
        assert abs(float(counts[in_bucket].sum()) - mean) < 4 * std


def test_coefficient_distributions_respect_their_ranges():
    generator = torch.Generator().manual_seed(5)
    uniform = SyntheticFeatureModel(
        uniform_preset(coefficient_low=0.25, coefficient_high=2.0)
    )
    _, coefficients = uniform.sample(20_000, generator)
    active = coefficients[coefficients > 0]
    assert float(coefficients.min()) == 0.0
    assert float(active.min()) >= 0.25 and float(active.max()) <= 2.0
    assert float(active.min()) < 0.26 and float(active.max()) > 1.99
    assert float(active.mean()) == pytest.approx(1.125, abs=0.01)

    constant = SyntheticFeatureModel(
        uniform_preset(coefficient_distribution="constant")
    )
    _, coefficients = constant.sample(1000, generator)
    assert set(coefficients.unique().tolist()) == {0.0, 1.0}

    exponential = SyntheticFeatureModel(
        uniform_preset(coefficient_distribution="exponential")
    )
    _, coefficients = exponential.sample(20_000, generator)
    assert torch.equal((coefficients > 0).sum(dim=1), torch.full((20_000,), 3))
    active = coefficients[coefficients > 0]
    assert float(active.mean()) == pytest.approx(1.0, abs=0.02)
    assert float(active.std()) == pytest.approx(1.0, abs=0.03)  # Exp(1): std = mean


def test_noise_has_the_configured_std():
    model = SyntheticFeatureModel(uniform_preset(noise_std=0.2))
    x, coefficients = model.sample(20_000, torch.Generator().manual_seed(6))
    noise = x - coefficients @ model.feature_directions
    assert float(noise.mean()) == pytest.approx(0.0, abs=0.002)
    assert float(noise.std()) == pytest.approx(0.2, rel=0.01)


def test_batches_are_deterministic_and_resumable():
    model = SyntheticFeatureModel(imbalanced_preset())
    first = [next(model.batches(64, seed=7)) for _ in range(2)]
    assert torch.equal(first[0], first[1])
    assert first[0].shape == (64, 42) and first[0].dtype == torch.float32

    stream = model.batches(64, seed=7)
    consumed = [next(stream) for _ in range(3)]
    assert not torch.equal(consumed[0], consumed[1])
    assert not torch.equal(consumed[0], next(model.batches(64, seed=8)))
    state = stream.state_dict()
    assert state == {"seed": 7, "batch_size": 64, "batches_consumed": 3}
    upcoming = next(stream)

    resumed = model.batches(64, seed=0)
    resumed.load_state_dict(state)
    assert torch.equal(next(resumed), upcoming)
    skipped = model.batches(64, seed=7)
    skipped.skip(3)
    assert torch.equal(next(skipped), upcoming)
    # A fresh model from the same config gives the same data (V is seeded too).
    rebuilt = SyntheticFeatureModel(imbalanced_preset()).batches(64, seed=7)
    assert torch.equal(next(rebuilt), consumed[0])

    with pytest.raises(ValueError, match="batch_size"):
        model.batches(32, seed=7).load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size"):
        model.batches(0)
    with pytest.raises(ValueError, match="n_samples"):
        model.sample(0)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n_features", 0),
        ("d", -1),
        ("seed", -2),
        ("support_model", "zipf"),
        ("sparsities", (0,)),
        ("sparsities", (129,)),
        ("sparsities", ()),
        ("sparsity_weights", (1.0,)),
        ("sparsity_weights", (1.0, -1.0)),
        ("max_frequency", 1.5),
        ("min_frequency", 0.5),
        ("coefficient_distribution", "gamma"),
        ("coefficient_low", 0.0),
        ("coefficient_high", 0.1),
        ("noise_std", -0.1),
        ("noise_std", float("nan")),
        ("d", "42"),
        ("sparsities", 3),
    ],
)
def test_bad_configs_name_the_field_and_value(field, value):
    fields = {"sparsities": (3, 20)} if field == "sparsity_weights" else {}
    fields[field] = value
    with pytest.raises(ValueError, match=f"SyntheticConfig.{field}=") as error:
        SyntheticConfig(**fields)
    assert repr(value) in str(error.value)
    assert "must be" in str(error.value)
