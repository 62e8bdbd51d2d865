"""``sae-gba train`` and ``sae-gba demo``: training commands that checkpoint and resume."""

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

from sae_gba.cli import checks
from sae_gba.cli.options import CheckpointOptions, Job, UsageError, repeated
from sae_gba.demo import DemoConfig
from sae_gba.presets import BUFFER_FIELDS, EMBEDDED, PRESETS, preset_for_run

# The train command's settings, saved in OUT so that `--resume OUT` needs nothing else.
TRAIN_ARGS_FILE = "train_args.json"
TRAIN_FIELDS = (
    "preset",
    "model_path",
    "dataset_path",
    "d_sae",
    "training_tokens",
    "layer",
    "device",
    "architecture",
    "sae",
    "store_batch_size_prompts",
    "n_batches_in_buffer",
)
TRAIN_DEFAULTS = {"device": "cpu", "architecture": "gba"}
# Architecture fields the train command sets itself (--d-sae, --device, the model).
SET_BY_TRAIN = ("d_in", "d_sae", "device", "dtype", "metadata")


@dataclasses.dataclass(kw_only=True)
class TrainOptions(CheckpointOptions):
    """``sae-gba train``: an SAE on a model preset through SAELens's runner.

    Args:
        preset: the model preset: embedded (Gemma-3-270M, shipped with the package)
            or gemma-2-2b (local weights).
        out: output folder of a new run (the SAE goes to OUT/sae).
        resume: continue the interrupted run in this folder from its newest
            checkpoint, with the settings it was started with.
        model_path: local Hugging Face model folder (Gemma-2 presets).
        dataset_path: local dataset folder written by save_to_disk, instead of the
            preset's data.
        d_sae: number of latents (default: the preset's).
        training_tokens: training length (default: the preset's).
        layer: residual stream block (default: the preset's).
        device: torch device: cpu, cuda, cuda:N or mps (default: cpu).
        architecture: the SAELens training architecture: gba (default),
            weighted_gba, topk, weighted_topk, batchtopk, jumprelu, standard, ...
        sae: a field of the architecture's training config as KEY=VALUE
            (repeatable), e.g. --sae k=32 for topk, --sae n_groups=4 for gba.
        store_batch_size_prompts: context windows per model forward pass (default:
            the preset's).
        n_batches_in_buffer: forward passes whose activations are mixed in the
            shuffling buffer; less uses less memory (default: the preset's).
        nproc: data-parallel ranks on this machine (torchrun; activations are
            harvested once into OUT/activations first).
    """

    preset: str | None = None
    out: str | None = None
    resume: str | None = dataclasses.field(default=None, metadata={"metavar": "OUT"})
    model_path: str | None = None
    dataset_path: str | None = None
    d_sae: int | None = None
    training_tokens: int | None = None
    layer: int | None = None
    device: str | None = None
    architecture: str | None = None
    sae: list[str] = repeated("KEY=VALUE")
    store_batch_size_prompts: int | None = None
    n_batches_in_buffer: int | None = None
    nproc: int | None = None


@dataclasses.dataclass
class DemoOptions(DemoConfig, CheckpointOptions):
    """``sae-gba demo``: a GBA SAE on the embedded Gemma-3-270M, reported on.

    Args:
        resume: continue the interrupted run in --out.
    """

    resume: bool = False


def _sae_settings(architecture: str, items: list[str]) -> dict[str, Any]:
    """``--sae`` items as typed fields of ``architecture``'s training config."""
    from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY

    from sae_gba.config_fields import parse_settings

    checks.training_architecture(architecture)
    config_class = SAE_TRAINING_CLASS_REGISTRY[architecture][1]
    return parse_settings(items, config_class, "--sae", exclude=SET_BY_TRAIN)


def _train_settings(opts: TrainOptions) -> dict[str, Any]:
    """The run's settings: the command line's, or the interrupted run's (--resume)."""
    given = {
        f: getattr(opts, f) for f in TRAIN_FIELDS if getattr(opts, f) not in (None, [])
    }
    if opts.preset is not None and opts.preset not in PRESETS:
        raise UsageError(
            f"--preset {opts.preset!r} is invalid: must be one of "
            f"{', '.join(sorted(PRESETS))}"
        )
    if opts.out is not None and opts.resume is not None:
        raise UsageError(
            "--out and --resume cannot be combined: --resume OUT continues the run "
            "in OUT"
        )
    if opts.out is None and opts.resume is None:
        raise UsageError(
            "--out OUT (a new run) or --resume OUT (an interrupted one) is required"
        )
    if opts.resume is None:
        if "preset" not in given:
            raise UsageError("--preset is required (or --resume OUT)")
        # --sae stays as given until the cheap checks have passed (it loads SAELens).
        return {**dict.fromkeys(TRAIN_FIELDS), **TRAIN_DEFAULTS, **given}
    saved_file = Path(opts.resume) / TRAIN_ARGS_FILE
    if not saved_file.is_file():
        raise UsageError(
            f"--resume {opts.resume}: no sae-gba train run there ({TRAIN_ARGS_FILE} "
            f"is missing); start one with --out {opts.resume}"
        )
    saved = json.loads(saved_file.read_text())
    if "sae" in given:
        given["sae"] = _sae_settings(saved["architecture"], opts.sae)
    differing = [
        f"--{name.replace('_', '-')} {value} (the run has {saved.get(name)})"
        for name, value in given.items()
        if value != saved.get(name)
    ]
    if differing:
        raise UsageError(
            f"--resume {opts.resume}: the run was started with other settings: "
            f"{'; '.join(differing)}; resume with its settings (or none) or start a "
            "new run with --out"
        )
    return saved


def check_train(opts: TrainOptions, command_line: str) -> Job:
    """Check ``sae-gba train``'s request; return its job."""
    settings = _train_settings(opts)
    resume = opts.resume is not None
    out_path = opts.resume if resume else opts.out
    assert out_path is not None  # _train_settings requires one of them
    for name in BUFFER_FIELDS:
        checks.positive(f"--{name.replace('_', '-')}", settings[name])
    preset = preset_for_run(settings)
    checks.model_folder(settings["preset"], settings["model_path"])
    checks.existing_folder("--dataset-path", settings["dataset_path"])
    checks.positive("--d-sae", settings["d_sae"])
    checks.positive(
        "--training-tokens", settings["training_tokens"], preset.batch_tokens
    )
    checks.positive("--layer", settings["layer"], 0)
    checks.positive("--checkpoint-every", opts.checkpoint_every)
    checks.positive("--nproc", opts.nproc)
    hint = f"pass --resume {out_path} to continue that run or --overwrite to start over"
    out = checks.output_folder(out_path, resume, opts.overwrite, hint)
    if resume and (out / "sae").is_dir() and not (out / "checkpoints").is_dir():
        raise UsageError(
            f"--resume {out}: the run is finished (its SAE is in {out / 'sae'}); "
            f"train again with --out {out} --overwrite"
        )
    checks.torch_device(settings["device"])
    if not resume:
        settings["sae"] = _sae_settings(settings["architecture"], opts.sae)
    from sae_gba.presets import gba_runner_config

    options = {k: settings[k] for k in ("d_sae", "training_tokens", "layer", "device")}
    # Builds the architecture's config: its own checks name a bad --sae value.
    gba_runner_config(
        preset,
        output_path=str(out / "sae"),
        architecture=settings["architecture"],
        **options,
        **settings["sae"],
    )
    checks.writable_folder("--out", out)
    if opts.overwrite:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    if not resume:
        from sae_gba.atomic import write_text_atomically

        write_text_atomically(out / TRAIN_ARGS_FILE, json.dumps(settings, indent=1))

    def run() -> None:
        if opts.nproc is not None:
            from sae_gba.distributed import train_preset_parallel

            train_preset_parallel(
                out, out / TRAIN_ARGS_FILE, opts.nproc, resume, opts.checkpoint_every
            )
            print(f"wrote the SAE to {out}/sae")
            return
        from sae_gba.presets import train_preset

        train_preset(
            preset,
            out,
            model_path=settings["model_path"],
            dataset_path=settings["dataset_path"],
            architecture=settings["architecture"],
            resume=resume,
            checkpoint_interval_s=opts.checkpoint_every,
            **options,
            **settings["sae"],
        )
        print(f"wrote the SAE to {out}/sae")

    return run, lambda: checks.partial_checkpoint(out, f"sae-gba train --resume {out}")


def check_demo(opts: DemoOptions, command_line: str) -> Job:
    """Check ``sae-gba demo``'s request; return its job."""
    cfg = DemoConfig(
        **{f.name: getattr(opts, f.name) for f in dataclasses.fields(DemoConfig)}
    )
    for name in (
        "d_sae",
        "adaptation_interval",
        "eval_windows",
        *BUFFER_FIELDS,
    ):
        checks.positive(f"--{name.replace('_', '-')}", getattr(cfg, name))
    checks.positive("--training-tokens", cfg.training_tokens, EMBEDDED.batch_tokens)
    checks.positive("--layer", cfg.layer, 0)
    checks.positive("--seed", cfg.seed, 0)
    checks.positive("--checkpoint-every", opts.checkpoint_every)
    hint = "pass --resume to continue that run or --overwrite to start over"
    out = checks.output_folder(cfg.out, opts.resume, opts.overwrite, hint)
    checks.writable_folder("--out", out)
    if opts.overwrite:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)

    def run() -> None:
        from sae_gba.demo import run_demo

        summary = run_demo(cfg, opts.resume, opts.checkpoint_every)
        print(json.dumps({k: summary[k] for k in ("held_out", "groups")}, indent=1))
        print(
            f"wrote {out}/summary.json, firing_frequencies.png and the latent page "
            f"{out}/latents/index.html"
        )

    command = f"sae-gba demo --out {out} --resume (and the same options)"
    return run, lambda: checks.partial_checkpoint(out, command)
