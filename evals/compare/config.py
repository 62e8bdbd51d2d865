"""The comparison's request: methods, sizes, presets and the sweep points, resolved once.

A request (preset, size, methods, evals) is checked by :func:`resolve_request`; its
sweep is a tuple of :class:`SweepPoint` (a method at a target L0 with the training
fields that set its sparsity), computed once by :func:`sweep_points` and passed to
training, evaluation and the report.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sae_gba.bias_adaptation import high_target_for_l0
from sae_gba.model_presets import EMBEDDED, GEMMA_2_2B
from sae_gba_evals.saebench.common import EvalSettings

# Every method the comparison can train, as SAELens architecture names.
METHODS = (
    "gba",
    "topk",
    "batchtopk",
    "jumprelu",
    "weighted_gba",
    "weighted_topk",
    "weighted_batchtopk",
    "weighted_jumprelu",
)
DEFAULT_METHODS = ("gba", "topk", "batchtopk", "jumprelu")
EVALS = ("core", "absorption")
# Methods trained with several seeds at the middle target L0 (CompareSize.middle_seeds).
SEEDED_METHODS = ("gba", "topk")
# A run counts as converged when its held-out legacy explained variance moved by less
# than this over its last CONVERGED_TAIL of steps.
CONVERGED_EV_CHANGE = 0.005
CONVERGED_TAIL = 0.2


class CompareError(ValueError):
    """A comparison request that cannot run as asked (bad method, size, folder...)."""


@dataclass(frozen=True)
class CompareSize:
    """How big a comparison is: width, training length, L0 targets and eval data.

    Args:
        name: key in :data:`SIZES`.
        d_sae: latents of every SAE.
        training_tokens: tokens harvested once; every SAE trains one pass over them.
        target_l0s: L0 targets of the sweep, shared by every method.
        batch_tokens: tokens per training step.
        lr: Adam learning rate (SAELens's default).
        adaptation_interval: GBA steps between bias-adaptation checks: the model
            preset's training recipe (``sae_gba.presets``), as ``sae-gba train`` and
            the demo use it.
        training_passes: passes over the harvested tokens (reshuffled each pass);
            every SAE trains ``training_passes * training_tokens`` tokens.
        middle_seeds: seeds of :data:`SEEDED_METHODS` at the middle target L0 (the
            others train seed 0 only), so the report shows the seed noise.
        ev_curve_points: held-out explained-variance measurements over each run, for
            the convergence check (:data:`CONVERGED_EV_CHANGE`).
        ev_curve_tokens: held-out tokens each of those measurements reads.
        gba_fields: further ``GBATrainingSAEConfig`` fields for GBA, for ablations
            (``sae-gba compare --gba``); empty in every preset size.
        jumprelu_l0_coefficient: coefficient of JumpReLU's quadratic L0 loss.
        jumprelu_ste_to_input: let the L0 loss's straight-through gradient reach
            the encoder (Anthropic's setup), not only the thresholds (DeepMind's).
        harvest_batch_windows: context windows per model forward pass when harvesting.
        eval_n_tokens: held-out tokens for sparsity, variance and alive fraction
            (None: every held-out window).
        n_recon_tokens: held-out tokens for the CE and KL scores.
        absorption_words: vocabulary words for the absorption probes.
        eval_batch_size_prompts: windows per forward pass in the core eval.
        llm_dtype: model dtype for the harvest and both evals.
        memo_bytes: cap on the model activations :func:`memoized_forward` keeps
            (first come, first kept: the ground-truth probe's prompts, 1.35 GB at
            12,000 words, are stored before the absorption prompts, 0.2 GB).
        train_dtype: dtype the normalised training activations are kept in (the
            SAEs train in float32 either way; bfloat16 halves the memory).
    """

    name: str
    d_sae: int
    training_tokens: int
    target_l0s: tuple[float, ...]
    batch_tokens: int = 512
    lr: float = 3e-4
    adaptation_interval: int = 50
    training_passes: int = 1
    middle_seeds: int = 1
    ev_curve_points: int = 20
    ev_curve_tokens: int = 8192
    gba_fields: dict[str, Any] = field(default_factory=dict)
    jumprelu_l0_coefficient: float = 1.0
    jumprelu_ste_to_input: bool = True
    harvest_batch_windows: int = 16
    eval_n_tokens: int | None = None
    n_recon_tokens: int = 1024
    absorption_words: int | None = 12_000
    eval_batch_size_prompts: int = 4
    llm_dtype: str = "bfloat16"
    memo_bytes: int = 3 * 2**30
    train_dtype: str = "float32"

    def eval_settings(self, context_size: int, seed: int = 42) -> EvalSettings:
        """The :class:`EvalSettings` of this size (one dtype for both evals)."""
        return EvalSettings(
            n_tokens=self.eval_n_tokens,
            n_recon_tokens=self.n_recon_tokens,
            context_size=context_size,
            batch_size_prompts=self.eval_batch_size_prompts,
            llm_dtype=self.llm_dtype,
            absorption_dtype=self.llm_dtype,
            absorption_words=self.absorption_words,
            seed=seed,
        )


@dataclass(frozen=True)
class ComparePreset:
    """The model side of a comparison.

    Args:
        name: key in :data:`COMPARE_PRESETS`.
        model_preset: key in ``sae_gba.presets.PRESETS`` (model, layer, hook, d_in).
        context_size: tokens per harvested window, BOS first.
        eval_context_size: tokens per held-out window in the evals.
        sizes: the sizes this preset offers.
    """

    name: str
    model_preset: str
    context_size: int
    eval_context_size: int
    sizes: dict[str, CompareSize] = field(default_factory=dict)


# Embedded Gemma-3-270M (d_in 640), sized for the project's 2-core machine (one
# thread each). Every method gets the package's defaults and only its sparsity setting
# (TopK's k, GBA's target_l0, JumpReLU's target_l0; GBA adapts at the embedded
# preset's interval, as the demo does); the L0 points span 16-128.
# 300k harvested tokens, two passes: about 1,170 steps of 512 tokens per SAE (the
# convergence check in each record says whether that was enough). 280 of the 283
# held-out windows: a count divisible by the batch of 4 (a prime count makes SAEBench's
# core eval read one window per batch).
EMBEDDED_SIZES = {
    "default": CompareSize(
        name="default",
        d_sae=2048,
        training_tokens=300_000,
        target_l0s=(16.0, 32.0, 64.0, 128.0),
        adaptation_interval=EMBEDDED.adaptation_interval,
        training_passes=2,
        middle_seeds=2,
        eval_n_tokens=280 * 128,
        absorption_words=12_000,
    ),
    "small": CompareSize(
        name="small",
        d_sae=1024,
        training_tokens=100_000,
        target_l0s=(16.0, 32.0, 64.0),
        adaptation_interval=EMBEDDED.adaptation_interval,
        eval_n_tokens=64 * 128,
        n_recon_tokens=512,
        absorption_words=12_000,
    ),
}

# The paper's setup: Gemma-2-2B layer 12, 65,536 latents, L0 about 300 (the middle
# target). Not run here (no Gemma-2-2B weights); the expected resources in the module
# docstring are estimates.
GEMMA_2_2B_SIZES = {
    "default": CompareSize(
        name="default",
        d_sae=65_536,
        training_tokens=2**23,
        target_l0s=(150.0, 300.0, 600.0),
        batch_tokens=4096,
        adaptation_interval=GEMMA_2_2B.adaptation_interval,
        harvest_batch_windows=8,
        n_recon_tokens=20_480,
        absorption_words=None,
        eval_batch_size_prompts=16,
        memo_bytes=16 * 2**30,
        train_dtype="bfloat16",
    ),
}

COMPARE_PRESETS = {
    "embedded": ComparePreset("embedded", "embedded", 128, 128, EMBEDDED_SIZES),
    "gemma-2-2b": ComparePreset(
        "gemma-2-2b", "gemma-2-2b", 1024, 128, GEMMA_2_2B_SIZES
    ),
}


def sparsity_setting(
    method: str, target_l0: float, size: CompareSize
) -> dict[str, Any]:
    """The training-config fields that set ``method``'s sparsity for ``target_l0``.

    Args:
        method: one of :data:`METHODS`.
        target_l0: the L0 aimed at.
        size: the comparison size (width, JumpReLU coefficient).
    """
    base = method.removeprefix("weighted_")
    if base in ("topk", "batchtopk"):
        return {"k": int(round(target_l0))}
    if base == "jumprelu":
        return {
            "jumprelu_sparsity_loss_mode": "quadratic",
            "target_l0": float(target_l0),
            "l0_coefficient": size.jumprelu_l0_coefficient,
            "jumprelu_ste_to_input": size.jumprelu_ste_to_input,
        }
    if base == "gba":
        from sae_gba.gba_sae import GBATrainingSAEConfig as GBA

        try:  # the reach of the targets at GBA's default groups and floor
            high_target_for_l0(target_l0, size.d_sae, GBA.n_groups, GBA.low_target_freq)
        except ValueError as err:
            raise CompareError(f"GBA at L0 {target_l0:g}: {err}") from None
        return {
            "target_l0": float(target_l0),
            "adaptation_interval": size.adaptation_interval,
            **size.gba_fields,
        }
    raise CompareError(f"method {method!r} is not one of {list(METHODS)}")


def sae_name(method: str, target_l0: float, seed: int = 0) -> str:
    """The folder and SAEBench name of one SAE of the sweep (seed 0 unsuffixed)."""
    return f"{method}_L0-{target_l0:g}" + (f"_seed-{seed}" if seed else "")


@dataclass(frozen=True)
class SweepPoint:
    """One SAE of the sweep: ``method`` at ``target_l0``.

    Args:
        method: one of :data:`METHODS`.
        target_l0: the L0 aimed at.
        setting: the training-config fields that set its sparsity
            (:func:`sparsity_setting`).
        seed: added to the run's seed for this SAE's initialisation and batch order.
    """

    method: str
    target_l0: float
    setting: dict[str, Any] = field(compare=False)
    seed: int = 0

    @property
    def name(self) -> str:
        """The folder and SAEBench name of this SAE."""
        return sae_name(self.method, self.target_l0, self.seed)


def middle_target(size: CompareSize) -> float:
    """The target L0 where :data:`SEEDED_METHODS` train several seeds (the lower
    middle one of an even count)."""
    targets = sorted(size.target_l0s)
    return targets[(len(targets) - 1) // 2]


def sweep_points(methods: Sequence[str], size: CompareSize) -> tuple[SweepPoint, ...]:
    """Every (method, target L0, seed) of the sweep with its sparsity setting.

    Seed 0 at every target for every method, and seeds 1 to ``middle_seeds - 1`` at
    the middle target for :data:`SEEDED_METHODS`.

    Raises:
        CompareError: a method is unknown or a target is out of GBA's reach.
    """
    middle = middle_target(size)
    return tuple(
        SweepPoint(method, target, sparsity_setting(method, target, size), seed)
        for method in methods
        for target in size.target_l0s
        for seed in range(size.middle_seeds if target == middle else 1)
        if seed == 0 or method in SEEDED_METHODS
    )


def resolve_request(
    preset: str | ComparePreset,
    size: str | CompareSize,
    methods: Sequence[str] | None,
    evals: Sequence[str],
) -> tuple[ComparePreset, CompareSize, tuple[str, ...]]:
    """Check a request; return the preset, the size and the methods.

    Raises:
        CompareError: naming the field, the value and what is allowed.
    """
    if isinstance(preset, ComparePreset):
        chosen = preset
    elif preset in COMPARE_PRESETS:
        chosen = COMPARE_PRESETS[preset]
    else:
        raise CompareError(
            f"preset={preset!r} is invalid: must be one of {sorted(COMPARE_PRESETS)}"
        )
    preset = chosen.name
    if isinstance(size, str):
        if size not in chosen.sizes:
            raise CompareError(
                f"size={size!r} is invalid for preset {preset!r}: must be one of "
                f"{sorted(chosen.sizes)}"
            )
        size = chosen.sizes[size]
    methods = tuple(DEFAULT_METHODS if methods is None else methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods or len(set(methods)) != len(methods):
        raise CompareError(
            f"methods={list(methods)!r} is invalid: must be distinct names among "
            f"{list(METHODS)}"
        )
    if any(e not in EVALS for e in evals) or "core" not in evals:
        raise CompareError(
            f"evals={list(evals)!r} is invalid: must be among {list(EVALS)} and "
            "include 'core' (L0 and explained variance come from it)"
        )
    if not size.target_l0s or any(not 0 < t < size.d_sae for t in size.target_l0s):
        raise CompareError(
            f"target_l0s={size.target_l0s!r} is invalid: must be non-empty, each in "
            f"(0, d_sae={size.d_sae})"
        )
    for name in (
        "training_passes",
        "middle_seeds",
        "ev_curve_points",
        "ev_curve_tokens",
    ):
        if getattr(size, name) < 1:
            raise CompareError(f"{name}={getattr(size, name)} is invalid: must be >= 1")
    if not 1 <= size.batch_tokens <= size.training_tokens:
        raise CompareError(
            f"batch_tokens={size.batch_tokens} is invalid: must be in "
            f"[1, training_tokens={size.training_tokens}]"
        )
    if size.absorption_words is not None and size.absorption_words < 26:
        raise CompareError(
            f"absorption_words={size.absorption_words} is invalid: must be >= 26 (a "
            "word per letter at least) or None for the whole vocabulary"
        )
    sweep_points(methods, size)  # GBA's reach, before any model is loaded
    return chosen, size, methods
