"""Tests for the closed-form SAE theory of the WSAE paper (sae_gba.wsae_theory)."""

import math

import pytest
import torch

from sae_gba.wsae_theory import (
    SPARSITY_SWEEP,
    aligned_latents,
    closed_form_encoder,
    closed_form_recovery,
    ground_truth_error_on_support,
    gt_loss,
    interference_matrix,
    loss_gap,
    loss_gap_closed_form,
    make_wsae_data,
    polysemantic_error,
    sae_latents,
    sae_loss,
    sae_reconstruction,
    shrinking_example,
    superposition_matrix,
    vanishing_example,
)

# The seed prints one decimal place: a printed value v stands for [v - 0.05, v + 0.05].
PRINTED_ONE_DECIMAL = 0.05
IDENTITY_ATOL = 1e-5
# (n, n_p, batch): the toy example size, a small one, the WSAE paper's toy model, near-square.
SHAPES = [(3, 2, 64), (10, 4, 128), (200, 20, 256), (33, 32, 64)]


def _close(actual: torch.Tensor, printed: list[float], atol: float) -> None:
    expected = torch.tensor(printed, dtype=torch.float64)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


def _topk(k: int):
    def activation(z: torch.Tensor) -> torch.Tensor:
        values, indices = z.topk(k, dim=-1)
        return torch.zeros_like(z).scatter(-1, indices, values)

    return activation


def _instance(n: int, n_p: int, batch: int, seed: int, weighted: bool):
    """Random W_p (un-normalised Gaussian: the identity needs no structure), sparse x."""
    gen = torch.Generator().manual_seed(seed)
    w_p = torch.randn(n_p, n, generator=gen, dtype=torch.float64)
    x = make_wsae_data(n, n_p, sparsity=0.7, n_samples=batch, seed=seed).x
    gamma = None
    if weighted:
        gamma = 0.2 + torch.rand(n_p, generator=gen, dtype=torch.float64)
    return w_p, x, gamma


# ---------------------------------------------------------------- the WSAE paper's examples


def test_shrinking_example__matches_seed():
    # Seed: [0.5, 1.0, 0.8] -> superposition -> [0.5, 0.2(, 0.2)] -> SAE -> [0.5, 0.2, 0].
    w_p, x = shrinking_example()
    result = closed_form_recovery(w_p, x)
    _close(result.x_p, [0.5, 0.2], PRINTED_ONE_DECIMAL)
    _close(result.x_m, [0.5, 0.2, 0.0], PRINTED_ONE_DECIMAL)
    # Exact arithmetic, not just within rounding.
    _close(result.x_m, [0.5, 0.2, 0.0], 1e-12)
    assert result.x_m[1] < x[1]  # "The superposed feature dimensions shrink"
    # "The top activated dimension changes because of feature shrinking."
    assert int(x.argmax()) == 1 and int(result.x_m.argmax()) == 0


def test_vanishing_example__matches_seed():
    # Seed: [0.7, 0.5, 0.3] -> [0.1 sqrt(3), 0.3] -> SAE -> [0.3, 0(, 0)].
    w_p, x = vanishing_example()
    result = closed_form_recovery(w_p, x)
    _close(result.x_p, [0.1 * math.sqrt(3), 0.3], 1e-12)  # printed exactly
    _close(result.x_m[:2], [0.3, 0.0], PRINTED_ONE_DECIMAL)
    _close(result.x_m, [0.3, 0.0, 0.0], 1e-12)
    # "some features even completely vanish": x_2 = 0.5 and x_3 = 0.3 both go to 0.
    assert result.vanished.tolist() == [False, True, True]


def test_examples__columns_form_a_digon_and_a_triangle():
    # Theorem 1's hypothesis: unit columns forming digons/polygons (non-positive
    # interference); the vanishing example's three columns are 120 degrees apart.
    digon, _ = shrinking_example()
    triangle, _ = vanishing_example()
    _close(interference_matrix(digon)[1:, 1:].flatten(), [0, -1, -1, 0], 1e-12)
    off = interference_matrix(triangle) + torch.eye(3, dtype=torch.float64)
    _close(off.flatten(), [1, -0.5, -0.5, -0.5, 1, -0.5, -0.5, -0.5, 1], 1e-12)


def test_closed_form_encoder__is_w_p_transposed_with_zero_rows():
    w_p, _ = vanishing_example()
    w_m = closed_form_encoder(w_p, n_latents=5)
    assert w_m.shape == (5, 2)
    torch.testing.assert_close(w_m[:3], w_p.T)
    assert bool((w_m[3:] == 0).all())
    with pytest.raises(ValueError, match="n_latents"):
        closed_form_encoder(w_p, n_latents=2)


def test_closed_form_encoder__reconstructs_the_digon_exactly():
    # For a digon ReLU(a) - ReLU(-a) = a, so L_SAE = 0 at W_p^T: Theorem 1 holds trivially.
    w_p, _ = shrinking_example()
    data = make_wsae_data(3, 2, sparsity=0.5, n_samples=500, seed=1)
    x_p = data.x @ w_p.T
    assert float(sae_loss(closed_form_encoder(w_p, n_latents=4), x_p)) < 1e-24


def test_extreme_sparsity__one_active_feature_is_recovered_exactly():
    # Theorem 2: non-positive interference and a single active feature give x_m = x.
    w_p, _ = vanishing_example()
    x = torch.diag(torch.tensor([0.7, 0.5, 0.3], dtype=torch.float64))
    torch.testing.assert_close(sae_latents(w_p.T, x @ w_p.T), x, atol=1e-12, rtol=0)


# ---------------------------------------------------------------- Theorems 4 and 5


@pytest.mark.parametrize("weighted", [False, True], ids=["thm4_sae", "thm5_wsae"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"n{s[0]}_np{s[1]}")
@pytest.mark.parametrize("seed", [0, 1])
def test_loss_gap__identity_holds(shape, weighted, seed):
    w_p, x, gamma = _instance(*shape, seed=seed, weighted=weighted)
    lhs = loss_gap(w_p, x, gamma)
    rhs = loss_gap_closed_form(w_p, x, gamma)
    assert abs(float(lhs)) > 1e-3  # a non-trivial instance
    torch.testing.assert_close(lhs, rhs, atol=IDENTITY_ATOL, rtol=0)


def test_loss_gap__identity_holds_for_topk():
    # The identity is algebraic in x_m, so it holds for any activation, e.g. Top-k.
    w_p, x, gamma = _instance(40, 8, 128, seed=3, weighted=True)
    lhs = loss_gap(w_p, x, gamma, activation=_topk(4))
    rhs = loss_gap_closed_form(w_p, x, gamma, activation=_topk(4))
    torch.testing.assert_close(lhs, rhs, atol=IDENTITY_ATOL, rtol=0)


def test_loss_gap__wrong_variants_fail():
    # The test can fail: dropping a term or the weights breaks the identity.
    w_p, x, gamma = _instance(20, 5, 256, seed=0, weighted=True)
    lhs = loss_gap(w_p, x, gamma)
    error = x - torch.relu(x @ (w_p.T @ w_p))
    eye = torch.eye(20, dtype=torch.float64)
    wrong_matrices = {
        "no -I": interference_matrix(w_p, gamma) + eye,
        "no Gamma": interference_matrix(w_p),
        "no Gamma, no -I": w_p.T @ w_p,
    }
    for name, matrix in wrong_matrices.items():
        wrong = ((error @ matrix) * error).sum(dim=1).mean()
        assert abs(float(wrong - lhs)) > 100 * IDENTITY_ATOL, name
    # Error taken without the activation (a linear SAE) is also wrong.
    linear_error = x - x @ (w_p.T @ w_p)
    matrix = interference_matrix(w_p, gamma)
    wrong = ((linear_error @ matrix) * linear_error).sum(dim=1).mean()
    assert abs(float(wrong - lhs)) > 100 * IDENTITY_ATOL


def test_interference_matrix__entries():
    w_p, _, gamma = _instance(6, 3, 1, seed=5, weighted=True)
    m = interference_matrix(w_p, gamma)
    i, j = 1, 4
    expected_ij = float((gamma**2 * w_p[:, i] * w_p[:, j]).sum())
    expected_ii = float((gamma**2 * w_p[:, i] ** 2).sum()) - 1
    assert float(m[i, j]) == pytest.approx(expected_ij, abs=1e-12)
    assert float(m[i, i]) == pytest.approx(expected_ii, abs=1e-12)
    torch.testing.assert_close(m, m.T)


# ---------------------------------------------------------------- experiment helpers


def test_make_wsae_data__shapes_sparsity_and_seed():
    data = make_wsae_data(50, 10, sparsity=0.9, n_samples=4000, seed=7)
    assert data.x.shape == (4000, 50) and data.x_p.shape == (4000, 10)
    assert data.x.dtype == torch.float64
    assert bool((data.x >= 0).all()) and float(data.x.max()) <= 1.0
    torch.testing.assert_close(
        data.w_p.norm(dim=0), torch.ones(50, dtype=torch.float64)
    )
    torch.testing.assert_close(data.x_p, data.x @ data.w_p.T)
    # P(x_i = 0) = S: 200,000 coordinates, standard error 6.7e-4.
    assert float((data.x == 0).double().mean()) == pytest.approx(0.9, abs=4e-3)
    again = make_wsae_data(50, 10, sparsity=0.9, n_samples=4000, seed=7)
    assert torch.equal(data.x, again.x) and torch.equal(data.w_p, again.w_p)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n": 10, "n_p": 10, "sparsity": 0.5}, "n_p < n"),
        ({"n": 10, "n_p": 4, "sparsity": 1.0}, "sparsity"),
        ({"n": 10, "n_p": 4, "sparsity": -0.1}, "sparsity"),
    ],
)
def test_make_wsae_data__rejects_invalid(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_wsae_data(n_samples=8, **kwargs)


def test_make_wsae_data__gaussian_is_the_default_kind():
    default = make_wsae_data(30, 6, sparsity=0.8, n_samples=64, seed=3)
    explicit = make_wsae_data(30, 6, 0.8, 64, seed=3, w_p_kind="gaussian")
    for a, b in zip(default, explicit, strict=True):
        assert torch.equal(a, b)
    assert bool((default.w_p != 0).all())  # every dimension mixes every feature


@pytest.mark.parametrize(("n", "n_p", "n_mono"), [(200, 20, 10), (12, 5, 1), (9, 8, 7)])
def test_make_wsae_data__mixed_structure(n, n_p, n_mono):
    data = make_wsae_data(n, n_p, 0.5, n_samples=256, seed=5, w_p_kind="mixed",
                          n_mono=n_mono)  # fmt: skip
    w_p = data.w_p
    assert w_p.shape == (n_p, n) and n_p < n
    torch.testing.assert_close(w_p.norm(dim=0), torch.ones(n, dtype=torch.float64))
    # Monosemantic: input dimension i is exactly feature i, and nothing else.
    assert torch.equal(w_p[:n_mono, :n_mono], torch.eye(n_mono, dtype=torch.float64))
    assert bool((w_p[:n_mono, n_mono:] == 0).all())
    assert bool((w_p[n_mono:, :n_mono] == 0).all())
    assert torch.equal(data.x_p[:, :n_mono], data.x[:, :n_mono])
    # Polysemantic: every other dimension mixes all of the other features.
    assert bool((w_p[n_mono:, n_mono:] != 0).all())
    torch.testing.assert_close(data.x_p, data.x @ w_p.T)
    # Monosemantic features interfere with no other; the superposed ones do.
    interference = interference_matrix(w_p)
    assert float(interference[:n_mono].abs().max()) < 1e-12
    assert float(interference[n_mono:, n_mono:].abs().max()) > 0.1


def test_make_wsae_data__mixed_polysemantic_dimensions_have_the_larger_variance():
    # Unit-norm columns: a polysemantic dimension carries (n - n_mono) / (n_p - n_mono)
    # = 19 features' worth of variance on average, a monosemantic one exactly one.
    data = make_wsae_data(200, 20, 0.7, n_samples=20_000, seed=0, w_p_kind="mixed")
    variance = data.x_p.var(dim=0)
    ratio = float(variance[10:].mean() / variance[:10].mean())
    assert ratio == pytest.approx(19, rel=0.15)
    assert float(variance[10:].min()) > float(variance[:10].max())


def test_superposition_matrix__mixed_default_n_mono_is_half():
    w_p = superposition_matrix(
        20, 6, "mixed", generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(w_p[:3, :3], torch.eye(3, dtype=torch.float64))
    assert bool((w_p[3:, 3:] != 0).all())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"w_p_kind": "sparse"}, "w_p_kind"),
        ({"w_p_kind": "mixed", "n_mono": 0}, "n_mono"),
        ({"w_p_kind": "mixed", "n_mono": 4}, "n_mono"),  # = n_p: nothing superposed
        ({"w_p_kind": "gaussian", "n_mono": 2}, "mixed"),
    ],
)
def test_make_wsae_data__rejects_invalid_kinds(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_wsae_data(10, 4, 0.5, n_samples=8, **kwargs)


def test_ground_truth_error_on_support__plus_off_support_is_gt_loss():
    data = make_wsae_data(30, 6, sparsity=0.8, n_samples=300, seed=2)
    w_m = closed_form_encoder(data.w_p)
    x_m = sae_latents(w_m, data.x_p)
    on = ground_truth_error_on_support(data.x, x_m)
    off = ((x_m * (data.x == 0)).square()).sum(dim=1).mean()
    torch.testing.assert_close(on + off, gt_loss(w_m, data.w_p, data.x))


def test_ground_truth_error_on_support__vanishes_as_s_goes_to_1():
    # Unit columns: (W_p^T W_p)_ii = 1, so a lone active feature is reconstructed exactly
    # on its support: from moderate to extreme S the error should all but vanish.
    errors = []
    for sparsity in (SPARSITY_SWEEP[0], SPARSITY_SWEEP[-1]):
        data = make_wsae_data(200, 20, sparsity, n_samples=2000, seed=0)
        x_m = sae_latents(closed_form_encoder(data.w_p), data.x_p)
        errors.append(float(ground_truth_error_on_support(data.x, x_m)))
    assert errors[1] < 0.01 * errors[0]


def test_polysemantic_error__is_the_unweighted_sae_loss():
    data = make_wsae_data(30, 6, sparsity=0.8, n_samples=300, seed=4)
    w_m = closed_form_encoder(data.w_p)
    x_p_hat = sae_reconstruction(w_m, data.x_p)
    torch.testing.assert_close(
        polysemantic_error(data.x_p, x_p_hat), sae_loss(w_m, data.x_p)
    )


def test_aligned_latents__undoes_permutation_and_scale():
    data = make_wsae_data(12, 5, sparsity=0.6, n_samples=50, seed=6)
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(12, generator=gen)
    scale = 0.5 + torch.rand(12, generator=gen, dtype=torch.float64)
    # A 16-latent SAE whose decoder holds scaled, shuffled W_p columns and 4 dead rows.
    decoder = torch.zeros(16, 5, dtype=torch.float64)
    decoder[:12] = data.w_p.T[perm] * scale[:, None]
    latents = torch.zeros(50, 16, dtype=torch.float64)
    latents[:, :12] = data.x[:, perm] / scale  # same reconstruction as x
    torch.testing.assert_close(latents @ decoder, data.x_p)
    torch.testing.assert_close(aligned_latents(latents, decoder, data.w_p), data.x)
