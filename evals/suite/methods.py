"""The SAE methods the suite compares, as SAELens training configs.

All share width, steps, batch and learning rate; only the architecture and its
sparsity setting differ:

- ``gba_default``: ``GBATrainingSAEConfig(d_in, d_sae)`` with nothing else set (the
  package default at run time), plus any ``--gba key=value`` fields.
- ``gba_paper``: the paper's literal recipe, ``sae_gba.gba_sae.PAPER_RECIPE``.
- ``topk_k1`` / ``topk_k2``: SAELens TopK at k = the data's true L0 (rounded, >= 1)
  and at twice that k.
- ``batchtopk``: SAELens BatchTopK at k = twice the rounded true L0.
- ``l1``: SAELens's standard ReLU SAE with an L1 penalty whose coefficient is the
  data's RMS amplitude per active feature, ``sqrt(E|x - E x|^2 / true L0)`` (1 for
  unit-magnitude features, the synthetic lab's value, and scaling with the data as
  the penalty's optimum does).
"""

import ast
import math
from dataclasses import fields
from typing import Any

from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAEConfig
from sae_lens.saes.sae import TrainingSAEConfig
from sae_lens.saes.standard_sae import StandardTrainingSAEConfig
from sae_lens.saes.topk_sae import TopKTrainingSAEConfig

from sae_gba.gba_sae import PAPER_RECIPE, GBATrainingSAEConfig

METHODS = ("gba_default", "gba_paper", "topk_k1", "topk_k2", "batchtopk", "l1")
TOPK_METHODS = ("topk_k1", "topk_k2")
GBA_FIELDS = tuple(f.name for f in fields(GBATrainingSAEConfig))


def true_l0_k(true_l0: float) -> int:
    """k for ``topk_k1``: the true L0 rounded, at least 1."""
    return max(1, round(true_l0))


def method_k(method: str, true_l0: float) -> int | None:
    """The k a method uses on data of this true L0 (None: not a k-sparse method)."""
    k = true_l0_k(true_l0)
    return {"topk_k1": k, "topk_k2": 2 * k, "batchtopk": 2 * k}.get(method)


def sae_config(
    method: str,
    d_in: int,
    d_sae: int,
    true_l0: float,
    l1_coefficient: float,
    gba: dict[str, Any] | None = None,
) -> TrainingSAEConfig:
    """The SAELens training config of one method.

    Args:
        method: one of ``METHODS``.
        d_in: input dimension.
        d_sae: width.
        true_l0: the data's mean number of active features.
        l1_coefficient: the ``l1`` method's penalty.
        gba: extra ``GBATrainingSAEConfig`` fields for ``gba_default``.

    Returns:
        The config.
    """
    common = {"d_in": d_in, "d_sae": d_sae}
    k = method_k(method, true_l0)
    if method == "gba_default":
        return GBATrainingSAEConfig(**common, **(gba or {}))
    if method == "gba_paper":
        return GBATrainingSAEConfig(**common, **PAPER_RECIPE)
    if method in TOPK_METHODS:
        return TopKTrainingSAEConfig(**common, k=k)
    if method == "batchtopk":
        return BatchTopKTrainingSAEConfig(**common, k=k)
    if method == "l1":
        return StandardTrainingSAEConfig(**common, l1_coefficient=l1_coefficient)
    raise ValueError(f"method={method!r} is invalid: must be one of {METHODS}")


def parse_gba_overrides(items: list[str]) -> dict[str, Any]:
    """``["key=value", ...]`` to ``GBATrainingSAEConfig`` fields.

    Values are Python literals where they parse (``False``, ``0.1``, ``10``), else
    strings (``target_quantile``).

    Args:
        items: the ``--gba`` arguments.

    Returns:
        ``{field: value}``.
    """
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or key not in GBA_FIELDS or key in ("d_in", "d_sae"):
            raise ValueError(
                f"--gba {item!r} is invalid: must be KEY=VALUE with KEY a "
                f"GBATrainingSAEConfig field other than d_in/d_sae: {GBA_FIELDS}"
            )
        try:
            overrides[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            overrides[key] = text
    return overrides


def l1_rule(centred_power: float, true_l0: float) -> float:
    """The ``l1`` coefficient: RMS amplitude per active feature.

    Args:
        centred_power: ``E|x - E x|^2`` of the data.
        true_l0: the data's mean number of active features (> 0).
    """
    return math.sqrt(centred_power / true_l0)
