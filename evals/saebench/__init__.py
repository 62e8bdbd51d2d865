"""SAEBench 0.6's core and first-letter absorption evals on SAELens SAEs, offline.

:mod:`~sae_gba_evals.saebench.core` and :mod:`~sae_gba_evals.saebench.absorption` run
one eval each on a given model and SAE; :mod:`~sae_gba_evals.saebench.run` is
``sae-gba eval`` (an SAE folder in, SAEBench's JSON and a summary out);
:mod:`~sae_gba_evals.saebench.common` holds what they share.
"""

from sae_gba_evals.saebench.absorption import run_absorption
from sae_gba_evals.saebench.common import (
    EVAL_PRESETS,
    EvalError,
    EvalSettings,
    prepare_sae,
    require_saebench,
    saebench_version,
)
from sae_gba_evals.saebench.core import run_core
from sae_gba_evals.saebench.run import EVAL_TYPES, evaluate

__all__ = [
    "EVAL_PRESETS",
    "EVAL_TYPES",
    "EvalError",
    "EvalSettings",
    "evaluate",
    "prepare_sae",
    "require_saebench",
    "run_absorption",
    "run_core",
    "saebench_version",
]
