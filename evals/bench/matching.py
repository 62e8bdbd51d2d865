"""Every method of the throughput bench at one shape and one L0 (mean active latents).

GBA gets a ``target_l0`` whose settled gates open the point within ``L0_TOLERANCE``
(:func:`match_gba_target`), its gates put at their targets' quantiles before each
step (:func:`settle_gate_biases`); TopK and BatchTopK get ``k``; JumpReLU a
threshold set per batch; sparsify's ``SparseCoder`` ``k``.
"""

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY

import sae_gba  # noqa: F401  (registers gba and weighted_gba)
from sae_gba.bias_adaptation import (
    BIAS_MIN,
    group_index,
    quantile_biases,
    target_frequencies,
)
from sae_gba.gba_sae import GBATrainingSAE
from sae_gba.training import make_trainer, use_fused_adam
from sae_gba.weighted_sae import WeightedTrainingMixin, input_weights
from sae_gba_evals.bench.sparsify_peer import (
    sparsify_step,
)

Shape = tuple[int, int, int]

METHODS = ("gba", "weighted_gba", "topk", "batchtopk", "jumprelu", "sparsify")

LR = 3e-4

# The measured L0 must land within this fraction of the point.
L0_TOLERANCE = 0.1

MATCH_TRIES = 4


@torch.no_grad()
def settle_gate_biases(sae: GBATrainingSAE, x: torch.Tensor, chunk: int = 1024) -> None:
    """Put each neuron's gate bias where its group's target frequency would on ``x``.

    That is the state bias adaptation steers towards, reached at once with the rule's
    own :func:`~sae_gba.bias_adaptation.quantile_biases`, ``chunk`` neurons at a time.
    The bias goes midway between the last projection it opens and the first it
    leaves closed (below the largest where it opens none): at the closed one itself,
    the step's renormalisation of the directions would flip about half of them open.
    """
    c = sae.input_scale.to(x)
    x_c = (x - sae.pre_bias * c) / c
    w = sae.directions / sae.directions.norm(dim=1, keepdim=True)
    targets = sae.neuron_targets()
    none_open = targets * x.shape[0] < 1
    for start in range(0, sae.cfg.d_sae, chunk):
        block = slice(start, start + chunk)
        preacts = x_c @ w[block].T
        closed = quantile_biases(preacts, targets[block])
        opened = quantile_biases(preacts, targets[block] - 1 / x.shape[0])
        midway = (closed + opened) / 2
        below = (closed - 1e-3).clamp(min=BIAS_MIN)
        sae.gate_bias[block] = torch.where(none_open[block], below, midway)


@torch.no_grad()
def set_jumprelu_threshold(sae: Any, x: torch.Tensor, l0: float) -> None:
    """One threshold for every latent under which ``x``'s mean L0 is ``l0``."""
    _, hidden_pre = sae.encode_with_hidden_pre(x)
    flat = hidden_pre.flatten()
    opened = min(round(l0 * x.shape[0]), flat.numel() - 1)
    # The (opened + 1)-th largest: exactly `opened` entries lie above it (ties aside).
    threshold = torch.kthvalue(flat, flat.numel() - opened).values
    sae.threshold.fill_(max(float(threshold), 1e-6))


def mean_l0(acts: torch.Tensor) -> float:
    """Mean number of nonzero entries per row (dense or sparse COO ``acts``)."""
    if acts.is_sparse:
        rows = acts.numel() // acts.shape[-1]
        return int((acts.coalesce().values() != 0).sum()) / rows
    return float((acts != 0).sum(dim=-1).double().mean())


class Method(NamedTuple):
    """One method at one shape and L0, ready to time.

    ``prepare(batch)`` runs untimed before each step (the sparsity matching);
    ``step(batch)`` is the timed training step and returns the latent activations.
    ``info`` goes into the method's row, with the optimizer's :func:`optimizer_name`.
    """

    prepare: Callable[[torch.Tensor], None]
    step: Callable[[torch.Tensor], torch.Tensor]
    sae: Any
    info: dict[str, Any]


def optimizer_name(optimizer: torch.optim.Optimizer) -> str:
    """The optimizer and torch's implementation of its step, e.g. ``Adam (fused)``."""
    group = optimizer.param_groups[0]
    on_cpu = all(p.device.type == "cpu" for p in group["params"])
    if group.get("fused"):
        kind = "fused"
    elif group.get("foreach"):
        kind = "foreach"
    else:  # torch's default: foreach on GPUs, one tensor at a time on CPU
        kind = "for-loop" if on_cpu else "default"
    return f"{type(optimizer).__name__} ({kind})"


def _trainer(sae: Any, data: torch.Tensor, batch: int) -> Any:
    """SAELens's trainer on ``sae`` (the first step is run here)."""
    trainer = make_trainer(
        sae, iter(()), total_tokens=batch * 10**6, batch_size=batch, lr=LR
    )
    _trainer_step(trainer)(data[:batch])  # GBA: fixes the input scale and b_pre
    return trainer


def _trainer_step(trainer: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """One step of SAELens's ``trainer``; returns the latent activations."""

    def step(x: torch.Tensor) -> torch.Tensor:
        output = trainer.step(x)
        trainer.n_training_steps += 1
        return output.feature_acts

    return step


def _method(prepare: Callable, trainer: Any, info: dict[str, Any]) -> Method:
    info = {**info, "optimizer": optimizer_name(trainer.optimizer)}
    return Method(prepare, _trainer_step(trainer), trainer.sae, info)


def _saelens_sae(arch: str, d_in: int, d_sae: int, data: torch.Tensor, **fields: Any):
    """A fresh SAELens training SAE; ``weighted_*`` get their weights up front."""
    sae_class, config_class = SAE_TRAINING_CLASS_REGISTRY[arch]
    torch.manual_seed(0)
    sae = sae_class(config_class(d_in=d_in, d_sae=d_sae, **fields))
    if isinstance(sae, WeightedTrainingMixin):
        sae.set_input_weights(input_weights(data.var(dim=0), sae.cfg.weight_alpha))
    return sae


def settled_l0(arch: str, d_in: int, d_sae: int, batch: int, target_l0: float) -> float:
    """The L0 that gates settled on ``batch`` tokens give with this ``target_l0``.

    :func:`settle_gate_biases` opens each neuron on ``floor(p * batch)`` tokens (bias
    clamps aside), so the L0 moves in steps of a group's size over ``batch``.
    """
    cfg = SAE_TRAINING_CLASS_REGISTRY[arch][1](
        d_in=d_in, d_sae=d_sae, target_l0=target_l0
    )
    groups = target_frequencies(cfg.n_groups, cfg.high_target_freq, cfg.low_target_freq)
    targets = groups[group_index(d_sae, cfg.n_groups)]
    opened = (targets * batch).floor().clamp(max=batch - 1)
    return float(opened.sum()) / batch


def predict_gba_target(arch: str, shape: Shape, l0: float) -> float:
    """The ``target_l0`` whose :func:`settled_l0` is nearest ``l0`` (bisection).

    The settled L0 never exceeds the target (floors), and rises with it.
    """
    d_in, d_sae, batch = shape

    def at(target: float) -> float:
        try:
            return settled_l0(arch, d_in, d_sae, batch, target)
        except ValueError:  # out of the config's reach
            return math.inf

    lo, hi = float(l0), float(l0)
    while at(hi) < l0 and hi < d_sae:
        lo, hi = hi, hi * 2
    for _ in range(25):  # the target to 2^-25 of its bracket's log-width
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if at(mid) < l0 else (lo, mid)
    return min((lo, hi), key=lambda t: abs(at(t) - l0))


def match_gba_target(
    arch: str, shape: Shape, l0: float, data: torch.Tensor
) -> tuple[Any, Callable, float, float]:
    """A GBA SAE whose settled gates open ``l0`` latents per token, within 10%.

    Starts from :func:`predict_gba_target` and, where the bias clamps move the
    measured L0 off the prediction, rescales the target by point / measured until
    the L0 of the settled gates on a batch lands.

    Returns:
        (sae, its SAELens trainer, target_l0, the L0 measured on the trial batch).

    Raises:
        ValueError: no target within ``MATCH_TRIES`` tries lands within 10% (at a
            small batch, one token of a group's floor can move the L0 by more).
    """
    d_in, d_sae, batch = shape
    target, tried = predict_gba_target(arch, shape, l0), []
    for _ in range(MATCH_TRIES):
        sae = _saelens_sae(arch, d_in, d_sae, data, target_l0=target)
        trainer = _trainer(sae, data, batch)
        x = data[batch : 2 * batch]
        settle_gate_biases(sae, x)
        with torch.no_grad():
            measured = mean_l0(sae.encode(x))
        tried.append((target, measured))
        if abs(measured - l0) <= L0_TOLERANCE * l0:
            return sae, trainer, target, measured
        # At most 4x a try: where every group's p * batch < 1 nothing opens at all.
        target *= min(max(l0 / max(measured, 1e-3), 0.25), 4.0)
    raise ValueError(
        f"{arch} at {shape}: no target_l0 landed within {L0_TOLERANCE:.0%} of L0 "
        f"{l0} (tried (target_l0, L0): {tried})"
    )


def build_method(method: str, shape: Shape, l0: int, data: torch.Tensor) -> Method:
    """``method`` at ``shape`` set to ``l0`` active latents per token."""
    d_in, d_sae, batch = shape
    if method in ("gba", "weighted_gba"):
        sae, trainer, target, trial = match_gba_target(method, shape, l0, data)
        info = {"target_l0": target, "trial_l0": trial}
        return _method(lambda x: settle_gate_biases(sae, x), trainer, info)
    if method in ("topk", "batchtopk"):
        sae = _saelens_sae(method, d_in, d_sae, data, k=l0)
        return _method(lambda x: None, _trainer(sae, data, batch), {})
    if method == "jumprelu":
        sae = _saelens_sae(method, d_in, d_sae, data)
        trainer = _trainer(sae, data, batch)
        return _method(lambda x: set_jumprelu_threshold(sae, x, l0), trainer, {})
    if method == "sparsify":
        return _sparsify_method(d_in, d_sae, l0)
    raise ValueError(f"method={method!r} is invalid: must be one of {list(METHODS)}")


def _sparsify_method(d_in: int, d_sae: int, k: int) -> Method:
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(0)
    sae = SparseCoder(d_in, SparseCoderConfig(num_latents=d_sae, k=k), "cpu")
    # The same optimizer as the trainer's methods: make_trainer's fused Adam.
    optimizer = torch.optim.Adam(sae.parameters(), lr=LR)
    use_fused_adam(optimizer)

    def step(x: torch.Tensor) -> torch.Tensor:
        return sparsify_step(sae, optimizer, x).latent_acts

    return Method(lambda x: None, step, sae, {"optimizer": optimizer_name(optimizer)})
