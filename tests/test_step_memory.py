"""StepMemory: a storage is handed out again only once nothing else holds it."""

import torch

from sae_gba import step_memory
from sae_gba.fast_step import fused_forward
from sae_gba.gba_sae import GBATrainingSAE, GBATrainingSAEConfig
from sae_gba.step_memory import StepMemory
from sae_gba.training import make_trainer

LIKE = torch.empty(0)


def _ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def test_empty__reuses_a_released_storage_and_never_a_held_one():
    memory = StepMemory(slots=2)
    first = memory.empty("u", (64, 32), LIKE)
    first_ptr = _ptr(first)
    view = first[:, :4]
    del first
    second = memory.empty("u", (64, 32), LIKE)  # the first is held through a view
    assert _ptr(second) != first_ptr
    del view
    third = memory.empty("u", (64, 32), LIKE)
    assert _ptr(third) == first_ptr
    # Both slots held: a fresh allocation, not kept.
    fourth = memory.empty("u", (64, 32), LIKE)
    assert _ptr(fourth) not in (first_ptr, _ptr(second))
    del second, third, fourth
    assert _ptr(memory.empty("u", (64, 32), LIKE)) == first_ptr


def test_empty__another_size_dtype_or_name_gets_its_own_storage():
    memory = StepMemory()
    ptr = _ptr(memory.empty("u", (64, 32), LIKE))
    assert _ptr(memory.empty("gate", (64, 32), LIKE, torch.bool)) != ptr
    assert _ptr(memory.empty("u", (64, 16), LIKE)) != ptr
    # Same byte size, other dtype and shape: the storage is the same memory.
    reused = memory.empty("u", (64, 64), LIKE, torch.float16)
    assert reused.dtype == torch.float16 and reused.shape == (64, 64)


def _step(leaves: dict, memory: StepMemory) -> torch.Tensor:
    out = fused_forward(
        leaves["x"], leaves["directions"], leaves["output_scale"],
        leaves["pre_bias"], leaves["c"], leaves["threshold"],
        block=8, max_density=1.0, memory=memory,
    )  # fmt: skip
    (out.x_hat - leaves["x"]).square().sum().backward()
    return out.hidden_pre


def _leaves() -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=g)
    return {
        "x": x,
        "directions": torch.randn(24, 6, generator=g).requires_grad_(),
        "output_scale": (0.5 + torch.rand(24, generator=g)).requires_grad_(),
        "pre_bias": torch.zeros(6).requires_grad_(),
        "c": torch.tensor(1.0),
        "threshold": torch.full((24,), 0.5),
    }


def _grad_alone(leaves: dict) -> torch.Tensor:
    """The directions' gradient of one step on fresh leaves, without StepMemory."""
    fresh = {
        k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in leaves.items()
    }
    _step(fresh, StepMemory(slots=0))
    return fresh["directions"].grad


def test_fused_step__gradient_memory_is_reused_after_zero_grad_and_sums_otherwise():
    leaves, memory = _leaves(), StepMemory()
    first = _grad_alone(leaves)
    _step(leaves, memory)
    grad_ptr = _ptr(leaves["directions"].grad)
    # Gradients kept: the second step's (on other inputs) adds to them.
    leaves["x"] = 1.5 * leaves["x"]
    second = _grad_alone(leaves)
    _step(leaves, memory)
    torch.testing.assert_close(leaves["directions"].grad, first + second)
    assert _ptr(leaves["directions"].grad) == grad_ptr
    # Released (zero_grad's set_to_none): the next gradient is written in that memory.
    leaves["directions"].grad = None
    _step(leaves, memory)
    assert _ptr(leaves["directions"].grad) == grad_ptr
    torch.testing.assert_close(leaves["directions"].grad, second)


def test_fused_step__a_kept_hidden_pre_is_not_overwritten():
    leaves, memory = _leaves(), StepMemory()
    kept = _step(leaves, memory)
    values = kept.clone()
    with torch.no_grad():
        leaves["directions"].mul_(-1)
    for _ in range(3):
        _step(leaves, memory)
    torch.testing.assert_close(kept, values, rtol=0, atol=0)


def _trained(monkeypatch, reuse: bool) -> tuple[GBATrainingSAE, list, list]:
    """Four SAELens trainer steps on a GBA SAE, the last output kept as its loop does."""
    if not reuse:
        monkeypatch.setattr(step_memory, "_use_count", None)
    torch.manual_seed(0)
    sae = GBATrainingSAE(GBATrainingSAEConfig(d_in=8, d_sae=32, n_groups=2))
    trainer = make_trainer(sae, iter(()), total_tokens=10**6, batch_size=50)
    x = torch.randn(200, 8, generator=torch.Generator().manual_seed(1))
    out, kept, pointers = None, [], []
    for step in range(4):
        out = trainer.step(x[step * 50 :][:50])
        kept.append(out.hidden_pre.clone())
        pointers.append(_ptr(out.hidden_pre))
        trainer.n_training_steps += 1
    assert torch.equal(out.hidden_pre, kept[-1])
    return sae, kept, pointers


def test_trainer__reused_memory_trains_the_same_weights(monkeypatch):
    plain, plain_acts, _ = _trained(monkeypatch, reuse=False)
    monkeypatch.undo()
    reused, reused_acts, pointers = _trained(monkeypatch, reuse=True)
    # The previous step's output is held while the next runs: two storages alternate.
    assert pointers[0] == pointers[2] != pointers[1] == pointers[3]
    for a, b in zip(plain_acts, reused_acts, strict=True):
        assert torch.equal(a, b)
    for name in ("directions", "output_scale", "gate_bias", "pre_bias"):
        assert torch.equal(getattr(plain, name), getattr(reused, name)), name


def test_fused_step__an_all_sparse_step_releases_the_dense_activations():
    leaves, memory = _leaves(), StepMemory()
    args = [leaves[k] for k in ("x", "directions", "output_scale", "pre_bias", "c")]
    fused_forward(*args, leaves["threshold"], block=8, max_density=-1.0, memory=memory)
    assert "z" in memory._storages
    fused_forward(*args, leaves["threshold"], block=8, max_density=1.0, memory=memory)
    assert "z" not in memory._storages and "u" in memory._storages
