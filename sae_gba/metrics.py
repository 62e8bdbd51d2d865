"""The training metrics GBA reports through SAELens's logger, and held-out metrics.

``summarize_window`` summarises one adaptation window: per frequency group, the firing
frequencies against the group's target, the gate biases, dead and dense counts; and
overall, the window's L0, the fraction of latents that fired and the output scales.
``GBATrainingSAE`` hands it to SAELens through ``logged_lazily``'s lambdas in
``TrainStepOutput.metrics``, so it runs only on the steps SAELens logs. README "What a
GBA run logs" lists the names. ``held_out_metrics`` measures any SAE (anything with
``encode`` and ``decode``) on held-out activations: L0 and both explained variances.
"""

import functools
from collections.abc import Callable, Iterable
from typing import Any

import torch

# A latent that fires on more than this fraction of tokens is dense: the usual cut
# for "dense latents" in SAE work, the same for every group so counts compare across
# groups and with other architectures (a group whose target is above it is dense by
# design).
DENSE_FREQUENCY = 0.1


@torch.no_grad()
def summarize_window(
    frequency: torch.Tensor,
    group_targets: torch.Tensor,
    neuron_groups: torch.Tensor,
    gate_bias: torch.Tensor,
    dead_threshold: float,
    output_scale: torch.Tensor | None = None,
) -> dict[str, float]:
    """Per-group and overall statistics of one adaptation window, as plain floats.

    Group ``k`` reports under ``gba/group_<k>/`` (``k`` zero-padded to the width of
    the largest index): ``target_freq``, ``median_freq``, ``mean_freq``,
    ``median_over_target``, ``gate_bias_mean``/``_min``/``_max``, ``dead`` (frequency
    at or below ``dead_threshold``, the controller's own rule) and ``dense`` (above
    ``DENSE_FREQUENCY``). Overall: ``gba/l0`` (mean latents firing per token, the sum
    of the frequencies), ``gba/fired_fraction`` (latents that fired at least once),
    ``gba/dead``, ``gba/dense``, ``gba/mean_gate_bias`` and, with ``output_scale``,
    ``gba/output_scale_mean``/``_min``/``_max``.

    Args:
        frequency: (d_sae,) fraction of the window's tokens on which each latent fired.
        group_targets: (K,) target frequency of each group.
        neuron_groups: (d_sae,) int64 group of each latent.
        gate_bias: (d_sae,) gate biases.
        dead_threshold: frequencies at or below this count as dead.
        output_scale: (d_sae,) output scales ``a_m``; None leaves their statistics out
            (they are not trained).

    Returns:
        name -> value, read from the device in one transfer.
    """
    frequency = frequency.double()
    bias = gate_bias.double()
    groups = neuron_groups.to(frequency.device)
    dead = frequency <= dead_threshold
    dense = frequency > DENSE_FREQUENCY
    n_groups = group_targets.numel()
    width = len(str(n_groups - 1))
    values: dict[str, torch.Tensor] = {}
    for k in range(n_groups):
        member = groups == k
        freq, group_bias = frequency[member], bias[member]
        target = group_targets[k].to(frequency)
        median = freq.quantile(0.5)
        prefix = f"gba/group_{k:0{width}d}/"
        values |= {
            prefix + "target_freq": target,
            prefix + "median_freq": median,
            prefix + "mean_freq": freq.mean(),
            prefix + "median_over_target": median / target,
            prefix + "gate_bias_mean": group_bias.mean(),
            prefix + "gate_bias_min": group_bias.min(),
            prefix + "gate_bias_max": group_bias.max(),
            prefix + "dead": dead[member].sum(),
            prefix + "dense": dense[member].sum(),
        }
    values |= {
        "gba/l0": frequency.sum(),
        "gba/fired_fraction": (frequency > 0).double().mean(),
        "gba/dead": dead.sum(),
        "gba/dense": dense.sum(),
        "gba/mean_gate_bias": bias.mean(),
    }
    if output_scale is not None:
        scale = output_scale.double()
        values |= {
            "gba/output_scale_mean": scale.mean(),
            "gba/output_scale_min": scale.min(),
            "gba/output_scale_max": scale.max(),
        }
    flat = torch.stack([v.to(torch.float64) for v in values.values()]).tolist()
    return dict(zip(values, flat, strict=True))


def logged_lazily(
    compute: Callable[[], dict[str, float]], names: Iterable[str]
) -> dict[str, Callable[[], float]]:
    """One lambda per name for ``TrainStepOutput.metrics``, all sharing one ``compute``.

    SAELens calls metric lambdas only when it logs a step; the first call runs
    ``compute`` and the others reuse its result.

    Args:
        compute: returns every metric at once.
        names: the names ``compute`` returns.
    """
    values = functools.cache(compute)
    return {name: functools.partial(_lookup, values, name) for name in names}


def _lookup(values: Callable[[], dict[str, float]], name: str) -> float:
    return values()[name]


@torch.no_grad()
def held_out_metrics(sae: Any, x: torch.Tensor, chunk: int = 4096) -> dict[str, float]:
    """L0 and explained variance of ``sae`` on held-out activations.

    ``explained_variance`` is the conventional one, ``1 - sum |x - x_hat|^2 / sum |x -
    mean x|^2`` over all tokens; ``explained_variance_legacy`` is the per-token mean of
    ``1 - |x - x_hat|^2 / |x - mean x|^2`` (SAEBench's ``explained_variance_legacy``
    is the same with the mean taken per batch).

    Args:
        sae: any SAELens SAE (float32; it takes raw activations).
        x: (n_tokens, d_in) activations at its hook, special tokens left out; any
            dtype (read in float32 chunks).
        chunk: tokens per step.
    """
    if len(x) == 0:
        raise ValueError("x holds no activations")
    mean = sum(part.float().sum(dim=0) for part in x.split(chunk)) / len(x)
    l0, legacy, sq_err, sq_var = 0.0, 0.0, 0.0, 0.0
    for part in x.split(chunk):
        part = part.float()
        acts = sae.encode(part)
        err = (sae.decode(acts) - part).pow(2).sum(-1)
        var = (part - mean).pow(2).sum(-1)
        l0 += (acts > 0).sum().item()
        legacy += (1 - err / var).sum().item()
        sq_err += err.sum().item()
        sq_var += var.sum().item()
    return {
        "eval_tokens": len(x),
        "l0": l0 / len(x),
        "explained_variance_legacy": legacy / len(x),
        "explained_variance": 1 - sq_err / sq_var,
    }
