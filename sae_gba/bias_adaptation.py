"""Group Bias Adaptation: target frequencies, window statistics and the bias update.

Pure torch on tensors, no SAELens: the SAE classes call these. Biases and peaks are
in units of the input scale (see ``gba_sae``), so the clamp ``[BIAS_MIN, BIAS_MAX]``
means "from off for any input to always on for positive projections" at any scale.
"""

import math
from typing import Literal

import torch

StepUnit = Literal["margin", "scale", "tail"]

EULER_GAMMA = 0.5772156649015329
# The tail step also raises a neuron that fires below this fraction of its target.
TAIL_BAND = 0.5

BIAS_MIN = -1.0
BIAS_MAX = 0.0


def target_frequencies(
    n_groups: int, high_target_freq: float, low_target_freq: float
) -> torch.Tensor:
    """Geometric target firing frequencies, one per group, from high to low.

    ``p_k = high * (low / high) ** (k / (K - 1))``; a single group (BA) targets
    ``high_target_freq``.

    Args:
        n_groups: number of groups K (>= 1).
        high_target_freq: target of the first group.
        low_target_freq: target of the last group (ignored when K = 1).

    Returns:
        float64 tensor of shape (K,).
    """
    if n_groups == 1:
        return torch.tensor([high_target_freq], dtype=torch.float64)
    exponents = torch.arange(n_groups, dtype=torch.float64) / (n_groups - 1)
    return high_target_freq * (low_target_freq / high_target_freq) ** exponents


def group_index(d_sae: int, n_groups: int) -> torch.Tensor:
    """Group of each neuron: contiguous blocks whose sizes differ by at most one.

    Contiguous is as good as random here because neurons are i.i.d. at init, and it
    keeps membership recoverable from (d_sae, n_groups) alone.

    Args:
        d_sae: number of neurons.
        n_groups: number of groups.

    Returns:
        int64 tensor of shape (d_sae,) with values in [0, n_groups).
    """
    return torch.arange(d_sae, dtype=torch.int64) * n_groups // d_sae


@torch.no_grad()
def batch_window(preacts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch's window statistics: each neuron's firing count and peak ``y``.

    Args:
        preacts: (batch, d_sae) pre-activations ``y = w . (x - b_pre) + b``.

    Returns:
        ((d_sae,) int64 counts of ``y > 0``, (d_sae,) max of ``y``).
    """
    return (preacts > 0).sum(dim=0), preacts.max(dim=0).values


@torch.no_grad()
def accumulate_window(
    fire_counts: torch.Tensor,
    peak_preacts: torch.Tensor,
    batch_fire_counts: torch.Tensor,
    batch_peaks: torch.Tensor,
) -> None:
    """Add one batch's statistics (:func:`batch_window`) to the window, in place.

    Args:
        fire_counts: (d_sae,) int64, times each neuron had ``y > 0`` in the window.
        peak_preacts: (d_sae,) running max of ``y`` in the window (-inf when empty).
        batch_fire_counts: (d_sae,) the batch's firing counts.
        batch_peaks: (d_sae,) the batch's max of ``y``.
    """
    fire_counts += batch_fire_counts
    torch.maximum(peak_preacts, batch_peaks.to(peak_preacts), out=peak_preacts)


@torch.no_grad()
def closed_windows(
    fire_counts: torch.Tensor,
    window_tokens: torch.Tensor,
    neuron_targets: torch.Tensor,
    min_firings: int,
) -> torch.Tensor:
    """Which neurons' windows hold enough evidence to be judged.

    A window closes once its neuron fired ``min_firings`` times (then its frequency is
    measured to about ``1 / sqrt(min_firings)``) or once ``min_firings`` firings were
    expected at its target (then "fired less than the target", and "never fired",
    mean something). A high target closes within a few batches; a target of 1e-4
    with ``min_firings = 20`` waits for 200,000 tokens. ``min_firings = 0`` closes
    every window at every check: the paper's fixed windows.

    Args:
        fire_counts: (d_sae,) firings of each neuron in its window.
        window_tokens: (d_sae,) or () tokens in each neuron's window.
        neuron_targets: (d_sae,) target frequency of each neuron.
        min_firings: the evidence a window needs, in (expected) firings.

    Returns:
        (d_sae,) bool mask of the neurons to judge now.
    """
    expected = neuron_targets.to(torch.float64) * window_tokens
    return (fire_counts >= min_firings) | (expected >= min_firings)


@torch.no_grad()
def adapt_biases(
    bias: torch.Tensor,
    firing_frequency: torch.Tensor,
    peak_preacts: torch.Tensor,
    neuron_targets: torch.Tensor,
    neuron_groups: torch.Tensor,
    n_groups: int,
    gamma_plus: float,
    gamma_minus: float,
    dead_threshold: float = 0.0,
    step_unit: StepUnit = "margin",
    window_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """One bias-adaptation step (the paper's rule), returning the new biases.

    - over-active (``p_m > p_k``): ``b_m <- max(b_m - gamma_minus * r_m, BIAS_MIN)``;
    - dead (``p_m <= dead_threshold``): ``b_m <- min(b_m + gamma_plus * s_k, BIAS_MAX)``
      with ``s_k`` the mean of the positive peaks in the neuron's group;
    - otherwise unchanged.

    ``r_m`` is the neuron's step: with ``step_unit="margin"`` (the paper) its peak
    of ``y = u + b``, its margin over the gate, which shrinks as the bias nears
    minus the largest projection, so each step closes only ``gamma_minus`` of the
    remaining gap and a low target takes hundreds of adaptations to reach; with
    ``"scale"`` the peak of the unbiased projection ``u = y - b``, the neuron's own
    scale, so the bias moves by a fixed fraction of it per adaptation; with
    ``"tail"`` the bias gap to the target under an exponential tail,
    ``ln(p_m / p_k)`` tail scales, a tail scale being the margin peak over
    ``H(c_m)``, the expected maximum excess of ``c_m = p_m * window_tokens``
    firings in units of the scale (``ln c + 0.5772 + 1 / (2c)``). The tail step
    is two-sided: a neuron that fired, but below ``TAIL_BAND`` of its target, is
    raised by the same estimate (the paper leaves it alone, and groups then drift
    below their targets as the directions sharpen); dead neurons are raised by the
    group mean of the margin peaks as for "margin".

    A group with no positive peak falls back to the mean positive peak of all
    neurons, and to 1 (the input scale) when nothing fired at all, so a fully dead
    group still recovers.

    Args:
        bias: (d_sae,) current biases.
        firing_frequency: (d_sae,) fraction of window inputs with ``y > 0``.
        peak_preacts: (d_sae,) max ``y`` over the window.
        neuron_targets: (d_sae,) target frequency of each neuron's group.
        neuron_groups: (d_sae,) int64 group of each neuron.
        n_groups: number of groups.
        gamma_plus: step size for raising dead neurons.
        gamma_minus: step size for lowering over-active neurons.
        dead_threshold: frequencies at or below this count as dead.
        step_unit: what ``r_m`` measures, "margin", "scale" or "tail" (see above).
        window_tokens: (d_sae,) tokens in each neuron's window; needed by "tail".

    Returns:
        (d_sae,) new biases, clamped to ``[BIAS_MIN, BIAS_MAX]`` by the steps.
    """
    if step_unit == "scale":
        peak_preacts = peak_preacts - bias.to(peak_preacts)
    peaks = peak_preacts.clamp(min=0)
    targets = neuron_targets.to(firing_frequency)
    over_active = firing_frequency > targets
    dead = firing_frequency <= dead_threshold
    group_mean = _group_mean_peaks(peaks, neuron_groups, n_groups)
    raised = torch.clamp(bias + gamma_plus * group_mean[neuron_groups], max=BIAS_MAX)
    if step_unit == "tail":
        if window_tokens is None:
            raise ValueError('step_unit="tail" needs window_tokens')
        moved = over_active | (~dead & (firing_frequency < TAIL_BAND * targets))
        step = _tail_gap(firing_frequency, targets, peaks, window_tokens).to(bias)
        tail = torch.clamp(bias - gamma_minus * step, BIAS_MIN, BIAS_MAX)
        return torch.where(moved, tail, torch.where(dead, raised, bias))
    lowered = torch.clamp(bias - gamma_minus * peaks, min=BIAS_MIN)
    return torch.where(over_active, lowered, torch.where(dead, raised, bias))


def _group_mean_peaks(
    peaks: torch.Tensor, neuron_groups: torch.Tensor, n_groups: int
) -> torch.Tensor:
    """(n_groups,) mean positive peak per group, falling back as ``adapt_biases`` says.

    ``peaks`` are the window peaks clamped at 0 (0: the neuron never rose above it).
    """
    positive = peaks > 0
    group_sum = torch.zeros(n_groups, dtype=peaks.dtype, device=peaks.device)
    group_count = torch.zeros_like(group_sum)
    group_sum.index_add_(0, neuron_groups, peaks)
    group_count.index_add_(0, neuron_groups, positive.to(peaks.dtype))
    overall = peaks.sum() / positive.sum() if positive.any() else peaks.new_tensor(1.0)
    return torch.where(group_count > 0, group_sum / group_count.clamp(min=1), overall)


def _tail_gap(
    firing_frequency: torch.Tensor,
    targets: torch.Tensor,
    peaks: torch.Tensor,
    window_tokens: torch.Tensor,
) -> torch.Tensor:
    """Each neuron's bias gap to its target, ``ln(p / target)`` tail scales."""
    # The window's count sets how many tail scales its margin peak spans.
    count = (firing_frequency * window_tokens).clamp(min=1)
    harmonic = count.log() + EULER_GAMMA + 0.5 / count
    gap = (firing_frequency.clamp(min=1e-300) / targets).log()
    return peaks.to(gap) / harmonic * gap


@torch.no_grad()
def quantile_biases(
    preacts: torch.Tensor, neuron_targets: torch.Tensor, chunk: int = 4096
) -> torch.Tensor:
    """Biases under which each neuron fires on its target fraction of a batch.

    With ``k_m = floor(p_m * N)`` of the ``N`` rows, ``b_m`` is minus the
    ``(k_m + 1)``-th largest unbiased pre-activation, so ``y + b_m > 0`` holds on the
    ``k_m`` largest (ties aside); ``k_m = 0`` gives minus the maximum (no row fires).
    Clamped to ``[BIAS_MIN, BIAS_MAX]`` like every bias.

    Args:
        preacts: (N, d_sae) unbiased pre-activations ``w . (x - b_pre)``, in units of
            the input scale.
        neuron_targets: (d_sae,) target frequency of each neuron.
        chunk: neurons sorted at a time (bounds the memory of the sort).

    Returns:
        (d_sae,) biases in the dtype of ``preacts``.
    """
    n_rows = preacts.shape[0]
    ranks = (neuron_targets.double() * n_rows).floor().long().clamp(0, n_rows - 1)
    biases = torch.empty(preacts.shape[1], dtype=preacts.dtype, device=preacts.device)
    for start in range(0, preacts.shape[1], chunk):
        block = preacts[:, start : start + chunk]
        top = block.topk(int(ranks[start : start + chunk].max()) + 1, dim=0).values
        rank = ranks[start : start + chunk].to(block.device)
        biases[start : start + chunk] = -top.gather(0, rank[None])[0]
    return biases.clamp(BIAS_MIN, BIAS_MAX)


def expected_l0(d_sae: int, n_groups: int, high: float, low: float) -> float:
    """The L0 the targets aim at: the sum over neurons of their group's target.

    Args:
        d_sae: number of neurons.
        n_groups: number of groups.
        high: the first group's target.
        low: the last group's target.
    """
    sizes = torch.bincount(group_index(d_sae, n_groups), minlength=n_groups)
    return float((sizes.double() * target_frequencies(n_groups, high, low)).sum())


def high_target_for_l0(
    l0: float, d_sae: int, n_groups: int, low: float, highest: float = 0.999
) -> float:
    """The first group's target whose :func:`expected_l0` is ``l0``.

    Bisection in log space (the expected L0 rises with the first target).

    Args:
        l0: the expected L0 wanted.
        d_sae: number of neurons.
        n_groups: number of groups.
        low: the last group's target (kept).
        highest: the largest first target allowed.

    Raises:
        ValueError: ``l0`` is out of reach with first targets in ``(low, highest]``.
    """
    if n_groups == 1:
        if not 0 < l0 <= d_sae * highest:
            raise ValueError(
                f"target L0 {l0:g} is out of reach with d_sae={d_sae} and one group: "
                f"must lie in (0, {d_sae * highest:.3g}]"
            )
        return l0 / d_sae
    lo, hi = low * (1 + 1e-9), highest
    reach = (
        expected_l0(d_sae, n_groups, lo, low),
        expected_l0(d_sae, n_groups, hi, low),
    )
    if not reach[0] < l0 <= reach[1]:
        raise ValueError(
            f"target L0 {l0:g} is out of reach with d_sae={d_sae}, {n_groups} groups "
            f"and low_target_freq={low:g}: must lie in ({reach[0]:.3g}, {reach[1]:.3g}]"
        )
    for _ in range(100):
        mid = math.sqrt(lo * hi)
        if expected_l0(d_sae, n_groups, mid, low) < l0:
            lo = mid
        else:
            hi = mid
    return math.sqrt(lo * hi)
