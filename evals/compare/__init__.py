"""``sae-gba compare``: GBA against SAELens's SAEs on the same tokens, width and L0 range.

Run::

    sae-gba compare --out runs/compare            # embedded Gemma-3-270M, default size

What it does, in order (every phase resumes: finished work is found on disk and kept):

1. **Harvest once** (:mod:`~sae_gba_evals.compare.data`). The language model runs once
   over the training split (embedded: the training articles of the Wikipedia slice,
   never the held-out ones), BOS/EOS/PAD positions dropped; the hook's activations
   are kept in memory and in ``OUT/activations.safetensors``. Each token is rescaled
   to norm ``sqrt(d_in)`` (SAELens's ``constant_norm_rescale``) for every method
   alike; the saved SAEs carry that setting, so they take raw activations.
2. **Train** every sweep point (:mod:`~sae_gba_evals.compare.config`: a method at a
   target L0 and seed, and the fields that set its sparsity) on exactly those
   activations with SAELens's ``SAETrainer`` (:mod:`~sae_gba_evals.compare.train`),
   ``training_passes`` passes each, measuring held-out explained variance along the
   way to say whether the run converged.
3. **Evaluate** each on held-out data only (:mod:`~sae_gba_evals.compare.evaluate`):
   SAEBench's core and absorption evals under one memoised model
   (:mod:`~sae_gba_evals.compare.memo`), and the conventional explained variance.
4. **Report** (:mod:`~sae_gba_evals.compare.report`): ``OUT/compare.json`` (one row
   per SAE), ``OUT/compare.md`` (the table and every method against TopK at matched
   L0) and the plots ``OUT/ev_vs_l0.png`` and ``OUT/absorption_vs_l0.png``.

:func:`~sae_gba_evals.compare.run.run_compare` runs the four. Why the sizes, sparsity
settings and initial values are what they are, what a run costs and what Gemma-2-2B
would need: docs/compare/README.md.
"""

from sae_gba_evals.compare.config import (
    COMPARE_PRESETS,
    DEFAULT_METHODS,
    EVALS,
    METHODS,
    CompareError,
    ComparePreset,
    CompareSize,
    SweepPoint,
    resolve_request,
    sweep_points,
)
from sae_gba_evals.compare.memo import memoized_forward
from sae_gba_evals.compare.report import interpolate_log_l0, matched_l0
from sae_gba_evals.compare.run import run_compare

__all__ = [
    "COMPARE_PRESETS",
    "DEFAULT_METHODS",
    "EVALS",
    "METHODS",
    "CompareError",
    "ComparePreset",
    "CompareSize",
    "SweepPoint",
    "interpolate_log_l0",
    "matched_l0",
    "memoized_forward",
    "resolve_request",
    "run_compare",
    "sweep_points",
]
