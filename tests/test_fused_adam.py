"""make_trainer's fused Adam: SAELens's update and scheduler, in torch's fused kernel."""

import torch

from sae_gba.gba_sae import GBATrainingSAE, GBATrainingSAEConfig
from sae_gba.training import TensorDataProvider, make_trainer, use_fused_adam

D_IN, D_SAE, BATCH, STEPS = 16, 64, 64, 30


def _trained(fused: bool) -> tuple[dict, dict, list[float]]:
    """A GBA SAE's parameters before and after STEPS trainer steps, and the rates."""
    g = torch.Generator().manual_seed(0)
    data = 2.0 + torch.randn(BATCH * 8, D_IN, generator=g) @ torch.randn(
        D_IN, D_IN, generator=g
    )
    torch.manual_seed(0)
    sae = GBATrainingSAE(
        GBATrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, n_groups=4, train_pre_bias=True)
    )
    start = {n: p.detach().clone() for n, p in sae.named_parameters()}
    provider = TensorDataProvider(data, BATCH, seed=0)
    # Warm-up and decay: the scheduler moves the fused optimizer's rate too.
    trainer = make_trainer(
        sae,
        provider,
        total_tokens=BATCH * STEPS,
        batch_size=BATCH,
        lr=1e-2,
        lr_warm_up_steps=5,
        lr_decay_steps=STEPS // 2,
    )
    for group in trainer.optimizer.param_groups:
        assert group["fused"] is True
        group["fused"] = fused
    lrs = []
    for _ in range(STEPS):
        trainer.step(next(provider))
        trainer.n_training_steps += 1
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
    return start, dict(sae.named_parameters()), lrs


def test_make_trainer__fused_adam_takes_the_default_adams_steps():
    _, fused, fused_lrs = _trained(True)
    start, plain, plain_lrs = _trained(False)
    assert fused_lrs == plain_lrs and fused_lrs[-1] < max(fused_lrs)
    moved = 0.0
    for name, reference in plain.items():
        scale = reference.abs().max()
        assert (fused[name] - reference).abs().max() <= 1e-5 * scale, name
        moved = max(moved, float((reference - start[name]).abs().max() / scale))
    # Far more than the tolerance: a broken update could not pass by standing still.
    assert moved > 1e-2


def test_use_fused_adam__only_where_torch_has_the_kernel():
    floating = torch.nn.Parameter(torch.zeros(3))
    adam = torch.optim.Adam([{"params": [floating]}])
    use_fused_adam(adam)
    assert adam.param_groups[0]["fused"] is True
    foreach = torch.optim.Adam([floating], foreach=True)
    use_fused_adam(foreach)
    assert foreach.param_groups[0]["fused"] is False
