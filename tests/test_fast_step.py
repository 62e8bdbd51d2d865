"""The fused GBA step: values and gradients against autograd on the plain formula."""

from typing import Any

import pytest
import torch
from sae_lens.saes.sae import TrainStepInput

from sae_gba import fast_step
from sae_gba.bias_adaptation import (
    group_index,
    high_target_for_l0,
    target_frequencies,
)
from sae_gba.fast_step import FAST_STEP_ENV, fused_forward, plan_runs
from sae_gba.gba_sae import GBATrainingSAE, GBATrainingSAEConfig
from sae_gba.training import make_trainer
from sae_gba.weighted_sae import WeightedGBATrainingSAE, WeightedGBATrainingSAEConfig
from tests.helpers import relative_weights_by_hand

D_IN, D_SAE, N_TOKENS = 12, 48, 96
# (block, max_density): everything dense, everything CSR, and a mix of both.
PLANS = {"dense": (16, -1.0), "sparse": (16, 1.0), "mixed": (8, 0.05)}
# Largest errors seen: 1e-15 (float64), 6e-7 (float32), relative to the largest entry.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 5e-6}


def _plain_loss(
    x: torch.Tensor,
    directions: torch.Tensor,
    output_scale: torch.Tensor,
    pre_bias: torch.Tensor,
    c: torch.Tensor,
    gate_bias: torch.Tensor,
    gamma_sq: torch.Tensor | None = None,
    relative: bool = False,
) -> torch.Tensor:
    """The GBA loss written straight from the formula (autograd does the rest).

    ``gamma_sq`` holds the squared WSAE weights of ``weighted_gba``; ``relative``
    weights each token by ``min(1, (c^2 + |b_pre|^2) / |x|^2)`` (``relative_loss``).
    """
    w = directions / directions.norm(dim=1, keepdim=True)
    b_pre = pre_bias * c
    u = (x - b_pre) @ w.T
    z = u * ((u / c + gate_bias) > 0)
    x_hat = (z * output_scale) @ w + b_pre
    squared = (x_hat - x).square()
    if gamma_sq is not None:
        squared = squared * gamma_sq
    if relative:
        squared = squared * relative_weights_by_hand(x, c, b_pre)
    return 0.5 * (squared / c**2).sum(dim=-1).mean()


def _problem(dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs far from zero and gates from always-on to rare, in three groups."""
    g = torch.Generator().manual_seed(seed)
    x = 3.0 + 2.0 * torch.randn(N_TOKENS, D_IN, generator=g)
    c = (x - x.mean(0)).square().sum(-1).mean().sqrt()
    gate_bias = torch.cat(
        [
            torch.zeros(16),
            torch.full((16,), -0.35),
            -0.7 - 0.2 * torch.rand(16, generator=g),
        ]
    )
    return {
        "x": x.to(dtype),
        "directions": (torch.randn(D_SAE, D_IN, generator=g) * 1.3).to(dtype),
        "output_scale": (0.5 + torch.rand(D_SAE, generator=g)).to(dtype),
        "pre_bias": (x.mean(0) / c + 0.1 * torch.randn(D_IN, generator=g)).to(dtype),
        "c": c.to(dtype),
        "gate_bias": gate_bias.to(dtype),
    }


def _leaves(p: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    names = ("directions", "output_scale", "pre_bias")
    return {k: v.clone().requires_grad_(k in names) for k, v in p.items()}


def _fused(leaves: dict[str, torch.Tensor], *plan: Any, **options: Any) -> Any:
    """``fused_forward`` on a problem's leaves (threshold ``-gate_bias * c``)."""
    return fused_forward(
        leaves["x"],
        leaves["directions"],
        leaves["output_scale"],
        leaves["pre_bias"],
        leaves["c"],
        -leaves["gate_bias"] * leaves["c"],
        *plan,
        **options,
    )


def _grads(
    loss: torch.Tensor, leaves: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    names = ("directions", "output_scale", "pre_bias")
    return dict(
        zip(names, torch.autograd.grad(loss, [leaves[n] for n in names]), strict=True)
    )


def _assert_close(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str
) -> None:
    scale = expected.abs().max().clamp(min=1e-30)
    error = (actual - expected).abs().max() / scale
    assert error < TOLERANCE[dtype], f"{what}: relative error {error:.2e}"


def test_plan_runs__merges_blocks_and_covers_every_neuron():
    counts = torch.tensor([50, 50, 1, 0, 0, 0, 40, 1, 1, 1])
    runs = plan_runs(counts, n_tokens=100, block=2, max_density=0.05)
    assert runs == [(0, 2, False), (2, 6, True), (6, 8, False), (8, 10, True)]
    assert plan_runs(counts, 100, block=4, max_density=-1.0) == [(0, 10, False)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize("weighted", [False, True])
def test_fused_forward__loss_and_gradients_match_the_plain_formula(
    dtype, plan, weighted
):
    p = _problem(dtype)
    gamma = (0.5 + torch.rand(D_IN, generator=torch.Generator().manual_seed(1))).to(
        dtype
    )
    gamma_sq = gamma.square() if weighted else None
    block, max_density = PLANS[plan]
    reference = _leaves(p)
    expected = _plain_loss(*reference.values(), gamma_sq=gamma_sq)
    fused = _leaves(p)
    out = _fused(fused, block=block, max_density=max_density)
    squared = (out.x_hat - fused["x"]).square()
    if gamma_sq is not None:
        squared = squared * gamma_sq
    loss = 0.5 * (squared / fused["c"] ** 2).sum(dim=-1).mean()
    _assert_close(loss, expected, dtype, "loss")
    runs = plan_runs(out.fire_counts, N_TOKENS, block, max_density)
    assert {sparse for *_, sparse in runs} == {
        "dense": {False},
        "sparse": {True},
        "mixed": {False, True},
    }[plan]
    expected_grads = _grads(expected, reference)
    for name, grad in _grads(loss, fused).items():
        _assert_close(grad, expected_grads[name], dtype, name)
    # z: sparse COO (coalesced) exactly where every block is sparse.
    assert out.feature_acts.is_sparse == (plan == "sparse")
    assert not out.feature_acts.is_sparse or out.feature_acts.is_coalesced()
    with torch.no_grad():
        r = {k: v.detach() for k, v in reference.items()}
        u = (r["x"] - r["pre_bias"] * r["c"]) @ (
            r["directions"] / r["directions"].norm(dim=1, keepdim=True)
        ).T
        z = u * ((u / r["c"] + r["gate_bias"]) > 0)
    _assert_close(out.feature_acts.to_dense(), z, dtype, "feature_acts")
    assert torch.equal(out.feature_acts.to_dense() != 0, z != 0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("plan", list(PLANS))
def test_fused_forward__unit_directions_skip_the_normalisation_only(dtype, plan):
    """Rows at unit norm (as ``_before_step`` leaves them) used as ``w`` directly:
    the loss and gradients of the formula, which still normalises them."""
    p = _problem(dtype)
    p["directions"] = p["directions"] / p["directions"].norm(dim=1, keepdim=True)
    reference, fused = _leaves(p), _leaves(p)
    expected = _plain_loss(*reference.values())
    out = _fused(fused, *PLANS[plan], unit_directions=True)
    loss = 0.5 * ((out.x_hat - fused["x"]).square() / fused["c"] ** 2).sum(-1).mean()
    _assert_close(loss, expected, dtype, "loss")
    expected_grads = _grads(expected, reference)
    for name, grad in _grads(loss, fused).items():
        _assert_close(grad, expected_grads[name], dtype, name)


def _step_input(x: torch.Tensor) -> TrainStepInput:
    return TrainStepInput(
        sae_in=x,
        coefficients={},
        dead_neuron_mask=None,
        n_training_steps=0,
        is_logging_step=False,
    )


def _sae(weighted: bool, dtype: torch.dtype, train_pre_bias: bool) -> GBATrainingSAE:
    fields = dict(
        d_in=D_IN, d_sae=D_SAE, n_groups=3, dtype=str(dtype).removeprefix("torch.")
    )
    torch.manual_seed(0)
    if weighted:
        sae = WeightedGBATrainingSAE(
            WeightedGBATrainingSAEConfig(train_pre_bias=train_pre_bias, **fields)
        )
        gamma = 0.5 + torch.rand(D_IN, generator=torch.Generator().manual_seed(1))
        sae.set_input_weights(gamma)
        return sae
    return GBATrainingSAE(GBATrainingSAEConfig(train_pre_bias=train_pre_bias, **fields))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("train_pre_bias", [False, True])
def test_training_forward_pass__fused_step_matches_the_plain_formula(
    monkeypatch, dtype, weighted, train_pre_bias
):
    monkeypatch.setattr(fast_step, "BLOCK", 8)
    monkeypatch.setattr(fast_step, "MAX_SPARSE_DENSITY", 0.05)
    p = _problem(dtype)
    sae = _sae(weighted, dtype, train_pre_bias)
    with torch.no_grad():
        sae.input_scale.fill_(float(p["c"]))
        sae.pre_bias.copy_(p["pre_bias"])
        sae.gate_bias.copy_(p["gate_bias"])
        sae.directions.copy_(p["directions"])
        sae.output_scale.copy_(p["output_scale"])
    x = p["x"]
    out = sae.training_forward_pass(_step_input(x))
    out.loss.backward()
    # _before_step renormalised the directions in place; the formula sees them so.
    reference = _leaves(
        {**p, "directions": sae.directions.detach(), "c": sae.input_scale.to(dtype)}
    )
    # The weighted loss squares its float32 weights before casting them.
    gamma_sq = sae.input_weights.square().to(dtype) if weighted else None
    expected = _plain_loss(*reference.values(), gamma_sq=gamma_sq, relative=True)
    _assert_close(out.loss, expected, dtype, "loss")
    expected_grads = _grads(expected, reference)
    trained = {"directions": True, "output_scale": True, "pre_bias": train_pre_bias}
    for name, is_trained in trained.items():
        grad = getattr(sae, name).grad
        if is_trained:
            _assert_close(grad, expected_grads[name], dtype, name)
        else:
            assert grad is None, name


@pytest.mark.parametrize("weighted", [False, True])
def test_training_forward_pass__fused_and_reference_paths_agree(monkeypatch, weighted):
    monkeypatch.setattr(fast_step, "BLOCK", 8)
    p = _problem(torch.float32)
    results = []
    for enabled in ("1", "0"):
        monkeypatch.setenv(FAST_STEP_ENV, enabled)
        sae = _sae(weighted, torch.float32, train_pre_bias=True)
        for _ in range(3):
            out = sae.training_forward_pass(_step_input(p["x"]))
            out.loss.backward()
            with torch.no_grad():
                sae.gate_bias.copy_(p["gate_bias"])
        grads = [t.grad for t in (sae.directions, sae.output_scale, sae.pre_bias)]
        results.append((out, sae, grads))
    (fused, fused_sae, fused_grads), (plain, plain_sae, plain_grads) = results
    for name in ("sae_out", "feature_acts", "hidden_pre", "loss"):
        _assert_close(getattr(fused, name), getattr(plain, name), torch.float32, name)
    for name in ("window_fire_counts", "window_tokens", "window_steps"):
        assert torch.equal(getattr(fused_sae, name), getattr(plain_sae, name)), name
    _assert_close(
        fused_sae.window_peak_preacts,
        plain_sae.window_peak_preacts,
        torch.float32,
        "window_peak_preacts",
    )
    for fused_grad, plain_grad in zip(fused_grads, plain_grads, strict=True):
        _assert_close(fused_grad, plain_grad, torch.float32, "gradient")


def test_trainer_step__sparse_feature_acts_give_the_dense_path_statistics(monkeypatch):
    """Every block sparse: the fused step hands SAELens's trainer a sparse COO ``z``;
    its firing statistics, logged L0 and the trained weights equal the dense path's."""
    monkeypatch.setattr(fast_step, "MAX_SPARSE_DENSITY", 1.0)
    p = _problem(torch.float32)
    # Gates from always open to never (the last 8), so both counters are exercised.
    gate_bias = p["gate_bias"].clone()
    gate_bias[-8:] = -1e3
    batch = N_TOKENS // 3
    results = []
    for enabled in ("1", "0"):
        monkeypatch.setenv(FAST_STEP_ENV, enabled)
        sae = _sae(False, torch.float32, train_pre_bias=True)
        trainer = make_trainer(sae, iter(()), total_tokens=10**6, batch_size=batch)
        outputs = []
        for step in range(3):
            if step:
                sae.gate_bias.data.copy_(gate_bias)
            outputs.append(trainer.step(p["x"][step * batch :][:batch]))
            trainer.n_training_steps += 1
        logged = trainer.build_train_step_log_dict(outputs[-1], batch)["metrics/l0"]
        results.append((outputs, trainer, logged))
    (sparse_out, sparse, sparse_l0), (dense_out, dense, dense_l0) = results
    assert all(out.feature_acts.is_sparse for out in sparse_out)
    assert not any(out.feature_acts.is_sparse for out in dense_out)
    for a, b in zip(sparse_out, dense_out, strict=True):
        assert torch.equal(a.feature_acts.to_dense() != 0, b.feature_acts != 0)
        _assert_close(a.feature_acts.to_dense(), b.feature_acts, torch.float32, "z")
    # Some latents fired and some did not: both counters are exercised.
    assert 0 < int((dense.n_forward_passes_since_fired == 0).sum()) < D_SAE
    for name in ("act_freq_scores", "n_forward_passes_since_fired"):
        assert torch.equal(getattr(sparse, name), getattr(dense, name)), name
    assert sparse_l0 == pytest.approx(dense_l0) and dense_l0 > 0
    _assert_close(
        sparse.sae.directions, dense.sae.directions, torch.float32, "directions"
    )


def test_fused_step__falls_back_when_an_activation_hook_is_attached():
    sae = _sae(False, torch.float32, train_pre_bias=False)
    x = _problem(torch.float32)["x"]
    seen = []
    sae.hook_sae_acts_post.register_forward_hook(lambda *args: seen.append(1))
    sae.training_forward_pass(_step_input(x))
    assert seen == [1]
    assert not sae._fused_step_applies(x)


def test_fused_forward__no_open_gate_gives_b_pre_and_zero_direction_gradients():
    p = _leaves(_problem(torch.float64))
    out = fused_forward(
        p["x"],
        p["directions"],
        p["output_scale"],
        p["pre_bias"],
        p["c"],
        torch.full((D_SAE,), 1e6, dtype=torch.float64),
        block=8,
        max_density=1.0,
    )
    assert int(out.fire_counts.sum()) == 0
    assert torch.equal(out.x_hat, (p["pre_bias"] * p["c"]).expand_as(p["x"]))
    (out.x_hat - p["x"]).square().sum().backward()
    assert not p["directions"].grad.any() and not p["output_scale"].grad.any()
    assert p["pre_bias"].grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("l0", [32, 128])
def test_fused_forward__matches_the_plain_formula_at_the_bench_l0_points(dtype, l0):
    """Production blocks and density cut, GBA's group targets settled to L0 32 / 128
    of 4,096 latents (the throughput bench's points): mostly sparse runs, the first
    group's blocks dense at L0 128."""
    d_in, d_sae, n_tokens, n_groups = 24, 4096, 1024, 10
    g = torch.Generator().manual_seed(0)
    x = 3.0 + 2.0 * torch.randn(n_tokens, d_in, generator=g)
    c = (x - x.mean(0)).square().sum(-1).mean().sqrt()
    pre_bias = x.mean(0) / c + 0.1 * torch.randn(d_in, generator=g)
    directions = torch.randn(d_sae, d_in, generator=g)
    w = directions / directions.norm(dim=1, keepdim=True)
    high = high_target_for_l0(l0, d_sae, n_groups, 1e-4)
    targets = target_frequencies(n_groups, high, 1e-4)[group_index(d_sae, n_groups)]
    # Neuron m opens on its k_m = floor(p_m * N) largest projections: its gate lies
    # midway between the k_m-th and the next, so float32 rounding flips none.
    preacts = (x - pre_bias * c) @ w.T / c
    ranks = (targets * n_tokens).floor().long()
    top = preacts.topk(int(ranks.max()) + 1, dim=0).values
    closed = top.gather(0, ranks[None])[0]
    opened = torch.where(
        ranks > 0, top.gather(0, (ranks - 1).clamp(min=0)[None])[0], closed + 0.02
    )
    gate_bias = -(opened + closed) / 2
    p = {
        "x": x,
        "directions": directions,
        "output_scale": 0.5 + torch.rand(d_sae, generator=g),
        "pre_bias": pre_bias,
        "c": c,
        "gate_bias": gate_bias,
    }
    p = {k: v.to(dtype) for k, v in p.items()}
    reference, fused = _leaves(p), _leaves(p)
    expected = _plain_loss(*reference.values())
    out = _fused(fused)
    assert torch.equal(out.fire_counts, ranks)
    assert abs(int(ranks.sum()) / n_tokens - l0) <= 0.1 * l0
    runs = plan_runs(
        out.fire_counts, n_tokens, fast_step.BLOCK, fast_step.MAX_SPARSE_DENSITY
    )
    sparse_share = sum(stop - start for start, stop, sparse in runs if sparse) / d_sae
    assert sparse_share >= 0.8
    loss = 0.5 * ((out.x_hat - fused["x"]).square() / fused["c"] ** 2).sum(-1).mean()
    expected_grads = _grads(expected, reference)
    pairs = {"loss": (loss, expected)}
    pairs |= {n: (g, expected_grads[n]) for n, g in _grads(loss, fused).items()}
    for name, (actual, wanted) in pairs.items():
        _assert_close(actual, wanted, dtype, name)
        # float32 sums of 1,024 tokens err by ~1e-5 on the O(10) pre_bias gradient:
        # only the relative check above applies to them.
        if dtype == torch.float64:
            torch.testing.assert_close(actual, wanted, atol=1e-5, rtol=0)
