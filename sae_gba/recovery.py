"""Feature-recovery metrics on dictionaries given as tensors (pure torch).

A dictionary is a 2-D tensor whose rows are directions in the input space (any norm; rows
are normalised here). Cosines are plain, not absolute: an SAE neuron is a signed detector
(it fires on positive projections), so a neuron pointing at ``-v`` does not recover ``v``.
A zero row of a learned dictionary (e.g. a pruned neuron) has cosine 0 with everything.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

_CHUNK_ROWS = 4096  # bounds the [chunk, m] cosine block for large dictionaries


def _check_dictionary(
    name: str, dictionary: torch.Tensor, d: int | None = None
) -> None:
    if not isinstance(dictionary, torch.Tensor):
        raise ValueError(
            f"{name} must be a torch.Tensor; got {type(dictionary).__name__}"
        )
    if dictionary.ndim != 2 or dictionary.shape[0] == 0 or dictionary.shape[1] == 0:
        raise ValueError(
            f"{name} must be a 2-D tensor [rows, d] with rows >= 1 and d >= 1; "
            f"got shape {tuple(dictionary.shape)}"
        )
    if d is not None and dictionary.shape[1] != d:
        raise ValueError(
            f"{name} has d={dictionary.shape[1]} (shape {tuple(dictionary.shape)}) but "
            f"the other dictionary has d={d}; both must share the input dimension"
        )
    if not dictionary.is_floating_point() or not bool(torch.isfinite(dictionary).all()):
        raise ValueError(f"{name} must be a floating tensor with finite entries")


def _check_threshold(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and -1.0 <= value <= 1.0):
        raise ValueError(f"{name} must be a cosine in [-1, 1]; got {value!r}")


def _unit_rows(dictionary: torch.Tensor) -> torch.Tensor:
    dtype = torch.promote_types(dictionary.dtype, torch.float32)
    return torch.nn.functional.normalize(dictionary.to(dtype), dim=1)


def _check_learned_and_true(learned: torch.Tensor, true: torch.Tensor) -> None:
    _check_dictionary("true", true)
    _check_dictionary("learned", learned, d=true.shape[1])
    if bool((true.norm(dim=1) == 0).any()):
        raise ValueError("true has a zero row; a true feature must have a direction")


def _max_cosine(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Per query row, the max cosine over key rows (both already unit rows)."""
    dtype = torch.promote_types(queries.dtype, keys.dtype)
    queries = queries.to(dtype)
    keys = keys.to(device=queries.device, dtype=dtype)
    blocks = [block @ keys.T for block in queries.split(_CHUNK_ROWS)]
    return torch.cat([block.max(dim=1).values for block in blocks])


def cosine_matrix(learned: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """Cosine of every true feature with every learned direction.

    Args:
        learned: Learned dictionary [m, d].
        true: True feature directions [n, d]; must have no zero row.

    Returns:
        Tensor [n, m] (on ``true``'s device) of plain cosines.
    """
    _check_learned_and_true(learned, true)
    unit_true, unit_learned = _unit_rows(true), _unit_rows(learned)
    dtype = torch.promote_types(unit_true.dtype, unit_learned.dtype)
    return unit_true.to(dtype) @ unit_learned.to(device=true.device, dtype=dtype).T


def best_match_cosine(learned: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """Per true feature, the max plain cosine over learned neurons.

    Args:
        learned: Learned dictionary [m, d].
        true: True feature directions [n, d].

    Returns:
        Tensor [n] in [-1, 1].
    """
    _check_learned_and_true(learned, true)
    return _max_cosine(_unit_rows(true), _unit_rows(learned))


def feature_recovery_rate(
    learned: torch.Tensor, true: torch.Tensor, threshold: float
) -> float:
    """FRR: fraction of true features whose best-match cosine is strictly above threshold.

    Args:
        learned: Learned dictionary [m, d].
        true: True feature directions [n, d].
        threshold: Cosine threshold in [-1, 1] (the paper uses 0.8 and 0.9).

    Returns:
        The fraction in [0, 1].
    """
    _check_threshold("threshold", threshold)
    return float((best_match_cosine(learned, true) > threshold).double().mean())


def feature_recovery_rates(
    learned: torch.Tensor, true: torch.Tensor, thresholds: Sequence[float] = (0.8, 0.9)
) -> dict[float, float]:
    """FRR at several thresholds from one best-match computation.

    Args:
        learned: Learned dictionary [m, d].
        true: True feature directions [n, d].
        thresholds: Cosine thresholds in [-1, 1].

    Returns:
        ``{threshold: FRR}``.
    """
    for threshold in thresholds:
        _check_threshold("thresholds", threshold)
    best = best_match_cosine(learned, true)
    return {t: float((best > t).double().mean()) for t in thresholds}


def recovery_by_frequency(
    best_match: torch.Tensor,
    frequencies: torch.Tensor,
    n_buckets: int = 5,
    bucket_edges: Sequence[float] | None = None,
    threshold: float = 0.9,
) -> list[dict[str, float]]:
    """Recovery per feature-frequency bucket.

    Buckets are ``[low, high)`` except the last, ``[low, high]``. Features outside the
    edges are not counted (the per-bucket counts show how many were).

    Args:
        best_match: Best-match cosine per true feature [n].
        frequencies: Occurrence frequency per true feature [n], all > 0.
        n_buckets: Number of log-spaced buckets from min to max frequency; used when
            ``bucket_edges`` is None.
        bucket_edges: Increasing positive edges (>= 2) instead of ``n_buckets``.
        threshold: Cosine a feature's best match must exceed to count as recovered.

    Returns:
        One dict per bucket: ``low``, ``high``, ``count``, ``recovered_fraction`` and
        ``mean_best_cosine`` (both NaN for an empty bucket).
    """
    _check_bucket_inputs(best_match, frequencies, threshold)
    # Bucketing in the caller's dtype: a float32 0.01 must land in a bucket starting at 0.01.
    dtype = torch.promote_types(frequencies.dtype, torch.float32)
    frequencies = frequencies.to(dtype).cpu()
    best_match = best_match.double().cpu()
    edges = _bucket_edges(frequencies, n_buckets, bucket_edges)
    n_out = edges.numel() - 1
    lookup_edges = edges.to(dtype)
    bucket = torch.searchsorted(lookup_edges, frequencies, right=True) - 1
    bucket[frequencies == lookup_edges[-1]] = n_out - 1
    report: list[dict[str, float]] = []
    for index in range(n_out):
        members = best_match[bucket == index]
        count = members.numel()
        report.append(
            {
                "low": float(edges[index]),
                "high": float(edges[index + 1]),
                "count": count,
                "recovered_fraction": float((members > threshold).double().mean())
                if count
                else math.nan,
                "mean_best_cosine": float(members.mean()) if count else math.nan,
            }
        )
    return report


def _check_bucket_inputs(
    best_match: torch.Tensor, frequencies: torch.Tensor, threshold: float
) -> None:
    """Require two finite, non-empty 1-D tensors of one shape, frequencies > 0."""
    _check_threshold("threshold", threshold)
    for name, vector in (("best_match", best_match), ("frequencies", frequencies)):
        if (
            not isinstance(vector, torch.Tensor)
            or vector.ndim != 1
            or vector.numel() == 0
        ):
            shape = (
                tuple(vector.shape)
                if isinstance(vector, torch.Tensor)
                else type(vector)
            )
            raise ValueError(f"{name} must be a non-empty 1-D tensor [n]; got {shape}")
        if not bool(torch.isfinite(vector).all()):
            raise ValueError(f"{name} must have finite entries")
    if best_match.shape != frequencies.shape:
        raise ValueError(
            f"best_match has shape {tuple(best_match.shape)} but frequencies has "
            f"{tuple(frequencies.shape)}; they must match (one entry per true feature)"
        )
    if bool((frequencies <= 0).any()):
        raise ValueError(
            f"frequencies must be > 0 for log-spaced buckets; got min {float(frequencies.min())}"
        )


def _bucket_edges(
    frequencies: torch.Tensor, n_buckets: int, bucket_edges: Sequence[float] | None
) -> torch.Tensor:
    """float64 bucket edges: the given ones, checked, or ``n_buckets`` log-spaced
    from the smallest to the largest frequency."""
    if bucket_edges is None:
        if not isinstance(n_buckets, int) or n_buckets < 1:
            raise ValueError(f"n_buckets must be an int >= 1; got {n_buckets!r}")
        low, high = float(frequencies.min()), float(frequencies.max())
        log_edges = torch.linspace(math.log(low), math.log(high), n_buckets + 1)
        edges = log_edges.double().exp()
        edges[0], edges[-1] = low, high  # exact ends: the extremes stay inside
        return edges
    edges = torch.tensor([float(e) for e in bucket_edges], dtype=torch.float64)
    if edges.numel() < 2 or bool((edges <= 0).any() | (edges.diff() <= 0).any()):
        raise ValueError(
            "bucket_edges must be >= 2 strictly increasing positive values; "
            f"got {list(bucket_edges)}"
        )
    return edges


def cross_seed_consistency(
    dict_a: torch.Tensor,
    dict_b: torch.Tensor,
    activation_a: torch.Tensor,
    top_fraction: float,
    threshold: float = 0.9,
) -> float:
    """MCS: fraction of A's top-activating neurons with a match in B above threshold.

    The top ``max(1, ceil(top_fraction * m))`` neurons of A by ``activation_a`` are
    selected (ties broken by torch.topk); for each, the max plain cosine over all
    neurons of B is compared (strictly) with ``threshold``.

    Args:
        dict_a: Dictionary of run A [m, d].
        dict_b: Dictionary of run B (another seed) [m', d].
        activation_a: Per-neuron activation statistic of A [m] (e.g. mean activation).
        top_fraction: Fraction of A's neurons to select, in (0, 1] (paper: 0.0005).
        threshold: Cosine in [-1, 1] (paper: 0.9).

    Returns:
        The fraction in [0, 1].
    """
    _check_dictionary("dict_a", dict_a)
    _check_dictionary("dict_b", dict_b, d=dict_a.shape[1])
    _check_threshold("threshold", threshold)
    n_neurons = dict_a.shape[0]
    if (
        not isinstance(activation_a, torch.Tensor)
        or activation_a.shape != (n_neurons,)
        or not bool(torch.isfinite(activation_a).all())
    ):
        shape = (
            tuple(activation_a.shape)
            if isinstance(activation_a, torch.Tensor)
            else None
        )
        raise ValueError(
            f"activation_a must be a finite 1-D tensor of shape ({n_neurons},) "
            f"(one value per row of dict_a); got shape {shape}"
        )
    if not (isinstance(top_fraction, (int, float)) and 0 < top_fraction <= 1):
        raise ValueError(f"top_fraction must be in (0, 1]; got {top_fraction!r}")
    # Rounding first keeps e.g. 0.1 * 100 from becoming 11 through float error.
    n_selected = max(1, math.ceil(round(top_fraction * n_neurons, 6)))
    selected = activation_a.topk(n_selected).indices.to(dict_a.device)
    best = _max_cosine(_unit_rows(dict_a[selected]), _unit_rows(dict_b))
    return float((best > threshold).double().mean())
