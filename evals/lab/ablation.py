"""``sae-gba synth ablate``: GBA on synthetic data, one factor changed at a time."""

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from sae_gba.gba_sae import GBATrainingSAEConfig
from sae_gba.synthetic import imbalanced_preset, longtail_preset, uniform_preset
from sae_gba_evals.lab.methods import RunSpec
from sae_gba_evals.lab.runner import DEFAULT_WORKERS, setting_rows, shared_settings

# GBATrainingSAEConfig's (SAELens's) default initial output scale.
DEFAULT_SCALE = GBATrainingSAEConfig.decoder_init_norm


def ablation_variants(base: RunSpec) -> list[tuple[str, RunSpec]]:
    """GBA on the imbalanced set, one factor changed at a time from ``base``.

    Args:
        base: the default GBA run.

    Returns:
        ``(label, spec)`` pairs, the default first.
    """

    def gba(**changes: Any) -> RunSpec:
        return base.with_(gba={**base.gba, **changes})

    return [
        ("default", base),
        ("train_output_scale=False", gba(train_output_scale=False)),
        ("output_scale_init=1", gba(decoder_init_norm=1.0)),
        ("output_scale_init=0.3", gba(decoder_init_norm=0.3)),
        ("output_scale_init=0.01", gba(decoder_init_norm=0.01)),
        ("width*4", base.with_(width=base.width * 4)),
        # Width x4 quadruples L0; a quarter of the output scale keeps a * L0 as it was.
        (
            "width*4 & output_scale_init/4",
            gba(
                decoder_init_norm=base.gba.get("decoder_init_norm", DEFAULT_SCALE) / 4
            ).with_(width=base.width * 4),
        ),
        ("steps*3", base.with_(steps=base.steps * 3)),
        ("lr/3", base.with_(lr=base.lr / 3)),
        ("n_groups=3", gba(n_groups=3)),
        ("htf=0.1", gba(high_target_freq=0.1)),
        ("ltf=1e-3", gba(low_target_freq=1e-3)),
        ("adaptation_interval=10", gba(adaptation_interval=10)),
        ("gate_bias_init=target_quantile", gba(gate_bias_init="target_quantile")),
        ("per-sample norm", base.with_(normalize_activations="constant_norm_rescale")),
        (
            "coefficients=constant",
            base.with_(data=replace(base.data, coefficient_distribution="constant")),
        ),
        (
            "coefficients=exponential",
            base.with_(data=replace(base.data, coefficient_distribution="exponential")),
        ),
    ]


DATA_PRESETS: dict[str, Callable[[], Any]] = {
    "imbalanced": imbalanced_preset,
    "uniform": uniform_preset,
    "longtail": longtail_preset,
}


def ablate(
    seeds: int = 1,
    base: RunSpec | None = None,
    workers: int = DEFAULT_WORKERS,
    variants: list[str] | None = None,
    methods: list[str] | None = None,
    data: str = "imbalanced",
) -> dict[str, Any]:
    """GBA on the imbalanced set, one setting changed at a time, with the output
    scale trained (the paper's recipe) and frozen (the theory's regime).

    Args:
        seeds: seeds per variant.
        base: the default GBA run.
        workers: parallel training processes.
        variants: labels of ``ablation_variants`` to run (None: all).
        methods: "gba" and/or "gba_frozen_scale" (None: both).
        data: the data preset of the base run when ``base`` is None: "imbalanced"
            (the set the variants were chosen on), or "uniform" (s = 3) and "longtail"
            to check a variant on data it was not chosen on.

    Returns:
        ``{"experiment": "ablate", "rows": [{"variant", "method", "frr@0.8", ...}]}``.
    """
    if data not in DATA_PRESETS:
        raise ValueError(
            f"data={data!r} is invalid: must be one of {list(DATA_PRESETS)}"
        )
    base = base or RunSpec(method="gba", data=DATA_PRESETS[data]())
    all_variants = ablation_variants(base)
    all_methods = ("gba", "gba_frozen_scale")
    labels = [label for label, _ in all_variants]
    for field, chosen, allowed in (
        ("variants", variants, labels),
        ("methods", methods, all_methods),
    ):
        unknown = sorted(set(chosen or ()) - set(allowed))
        if unknown:
            raise ValueError(f"{field}={unknown} is invalid: must be among {allowed}")
    named = [
        (f"{method}: {label}", spec.with_(method=method))
        for method in methods or all_methods
        for label, spec in all_variants
        if (variants is None or label in variants)
        and not (method == "gba_frozen_scale" and label.startswith("train_output"))
    ]
    rows = setting_rows(named, seeds, workers)
    for row in rows:
        row["method"], row["variant"] = row["method"].split(": ", 1)
    return {
        "experiment": "ablate",
        "data": data,
        "rows": rows,
        "settings": shared_settings(base),
    }
