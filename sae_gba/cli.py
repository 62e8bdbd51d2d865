"""The ``sae-gba`` command line: one subcommand per job, each a thin call into the library.

Every command first checks what it can without loading a model or data (output
paths, counts, names, devices, model and SAE folders) and refuses in one line with
exit status 2: ``sae-gba CMD: error: <what and how to fix>``. A failure during the
work exits 1 (130 on Ctrl-C) and says where the partial results are. Tracebacks are
shown only with ``--debug`` or ``SAE_GBA_DEBUG=1``. Heavy libraries (torch, SAELens)
are imported only by the command that runs, so ``--help`` is instant.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

from sae_gba.demo import DemoConfig
from sae_gba.presets import EMBEDDED, PRESETS

SYNTH_EXPERIMENTS = (
    "imbalanced",
    "resonance",
    "consistency",
    "longtail",
    "ablate",
    "planted",
    "wsae",
    "suite",
    "scaling",
)
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
    "k",
)
TRAIN_DEFAULTS = {"device": "cpu", "architecture": "gba"}
LM_DTYPES = ("float32", "bfloat16", "float16")
GEMMA_2_2B_HOW_TO = (
    "pass --model-path FOLDER, a local Hugging Face folder of google/gemma-2-2b "
    "(download it once where the Hub is reachable, after accepting the licence on "
    "its Hub page: `hf download google/gemma-2-2b --local-dir FOLDER`)"
)


# What a command does once its checks passed, and where its partial results are.
_Job = tuple[Callable[[], None], Callable[[], str] | None]


class UsageError(Exception):
    """A request that a command refuses before doing any work (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ------------------------------------------------------------------------ checks


def _positive(option: str, value: int | None, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise UsageError(f"{option} {value} is invalid: must be >= {minimum}")


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".")


def _folder_path(option: str, folder: Path) -> None:
    """Refuse a folder path that is a file or lies under one."""
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        where = "is a file" if existing == folder else f"lies under the file {existing}"
        raise UsageError(f"{option} {folder} {where}; choose a folder path")


def _writable_folder(option: str, folder: Path) -> None:
    """Create ``folder`` (and parents) and make sure a file can be written in it."""
    _folder_path(option, folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise UsageError(
            f"{option} {folder} cannot be written ({err.strerror or err}); choose "
            "another place"
        ) from err


def _output_folder(
    out: str, resume: bool, overwrite: bool, how_to_continue: str
) -> Path:
    """Check ``--out`` (created by ``_writable_folder`` once all checks passed)."""
    folder = Path(out)
    if folder.is_dir() and any(folder.iterdir()) and not (resume or overwrite):
        raise UsageError(
            f"--out {folder} already holds files; {how_to_continue}, or choose "
            "another --out"
        )
    _folder_path("--out", folder)
    return folder


def _output_file(option: str, path: str) -> Path:
    file = Path(path)
    if file.is_dir():
        raise UsageError(f"{option} {file} is a folder; give a file path (.json)")
    _writable_folder(f"{option}'s folder", file.parent)
    return file


def _existing_folder(option: str, path: str | None, needs: str = "") -> None:
    if path is None:
        return
    folder = Path(path)
    if not folder.is_dir():
        raise UsageError(f"{option} {folder} is not a folder")
    if needs and not (folder / needs).is_file():
        raise UsageError(
            f"{option} {folder} has no {needs}; expected a Hugging Face model folder "
            "(as written by save_pretrained or `hf download`)"
        )


def _device(device: str) -> None:
    import torch

    try:
        found = torch.device(device)
    except RuntimeError as err:
        raise UsageError(
            f"--device {device!r} is not a torch device (cpu, cuda, cuda:N, mps)"
        ) from err
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if found.type == "cuda" and (found.index or 0) >= count:
        raise UsageError(
            f"--device {device}: this machine has {count} CUDA device(s); use "
            "--device cpu" + (" or cuda:0" if count else "")
        )
    if found.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {device}: MPS is not available; use --device cpu")
    if found.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {device}: use cpu, cuda, cuda:N or mps")


def _model_folder(preset: str, model_path: str | None) -> None:
    if PRESETS[preset] is EMBEDDED:
        if model_path is not None:
            raise UsageError(
                "--model-path: the embedded preset's model ships with the package; "
                "leave --model-path out"
            )
        return
    if model_path is None:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(PRESETS[preset].model_name, "config.json")
        if not isinstance(cached, str):
            raise UsageError(
                f"preset {preset!r} needs the model's weights on this machine: "
                + GEMMA_2_2B_HOW_TO
            )
        return
    _existing_folder("--model-path", model_path, needs="config.json")


def _training_architecture(name: str) -> None:
    from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY

    if name not in SAE_TRAINING_CLASS_REGISTRY:
        raise UsageError(
            f"--architecture {name!r} is not a training architecture; known: "
            f"{', '.join(sorted(SAE_TRAINING_CLASS_REGISTRY))}"
        )


def _sae_folder(path: str) -> None:
    if not Path(path).is_dir():  # before SAELens's import (seconds)
        raise UsageError(f"SAE folder {path} does not exist")
    from sae_gba.loading import verify_sae_folder

    try:
        verify_sae_folder(path)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(str(err)) from err


def _partial_checkpoint(out: Path, command: str) -> str:
    from sae_gba.training import latest_checkpoint

    checkpoint = latest_checkpoint(out / "checkpoints")
    if checkpoint is None:
        return "no checkpoint was written yet (the first comes after the interval)"
    return f"the newest checkpoint is {checkpoint}; continue with: {command}"


# ---------------------------------------------------------------------- commands


def _train_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The run's settings: the command line's, or the interrupted run's (--resume)."""
    given = {f: getattr(args, f) for f in TRAIN_FIELDS if getattr(args, f) is not None}
    if args.resume is None:
        if "preset" not in given:
            raise UsageError("--preset is required (or --resume OUT)")
        return {**dict.fromkeys(TRAIN_FIELDS), **TRAIN_DEFAULTS, **given}
    saved_file = Path(args.resume) / TRAIN_ARGS_FILE
    if not saved_file.is_file():
        raise UsageError(
            f"--resume {args.resume}: no sae-gba train run there ({TRAIN_ARGS_FILE} "
            f"is missing); start one with --out {args.resume}"
        )
    saved = json.loads(saved_file.read_text())
    differing = [
        f"--{name.replace('_', '-')} {value} (the run has {saved.get(name)})"
        for name, value in given.items()
        if value != saved.get(name)
    ]
    if differing:
        raise UsageError(
            f"--resume {args.resume}: the run was started with other settings: "
            f"{'; '.join(differing)}; resume with its settings (or none) or start a "
            "new run with --out"
        )
    return saved


def _train(args: argparse.Namespace) -> _Job:
    settings = _train_settings(args)
    resume = args.resume is not None
    out_path = args.resume if resume else args.out
    preset = settings["preset"]
    _model_folder(preset, settings["model_path"])
    _existing_folder("--dataset-path", settings["dataset_path"])
    _positive("--d-sae", settings["d_sae"])
    _positive(
        "--training-tokens", settings["training_tokens"], PRESETS[preset].batch_tokens
    )
    _positive("--layer", settings["layer"], 0)
    _positive("--k", settings["k"])
    _positive("--checkpoint-every", args.checkpoint_every)
    _positive("--nproc", args.nproc)
    hint = f"pass --resume {out_path} to continue that run or --overwrite to start over"
    out = _output_folder(out_path, resume, args.overwrite, hint)
    if resume and (out / "sae").is_dir() and not (out / "checkpoints").is_dir():
        raise UsageError(
            f"--resume {out}: the run is finished (its SAE is in {out / 'sae'}); "
            f"train again with --out {out} --overwrite"
        )
    _device(settings["device"])
    _training_architecture(settings["architecture"])
    _writable_folder("--out", out)
    if args.overwrite:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    if not resume:
        from sae_gba.atomic import write_text_atomically

        write_text_atomically(out / TRAIN_ARGS_FILE, json.dumps(settings, indent=1))

    def run() -> None:
        if args.nproc is not None:
            from sae_gba.distributed import train_preset_parallel

            train_preset_parallel(
                out, out / TRAIN_ARGS_FILE, args.nproc, resume, args.checkpoint_every
            )
            print(f"wrote the SAE to {out}/sae")
            return
        from sae_gba.presets import train_preset

        k = settings["k"]
        train_preset(
            PRESETS[preset],
            out,
            model_path=settings["model_path"],
            dataset_path=settings["dataset_path"],
            d_sae=settings["d_sae"],
            training_tokens=settings["training_tokens"],
            layer=settings["layer"],
            device=settings["device"],
            architecture=settings["architecture"],
            resume=resume,
            checkpoint_interval_s=args.checkpoint_every,
            **({} if k is None else {"k": k}),
        )
        print(f"wrote the SAE to {out}/sae")

    return run, lambda: _partial_checkpoint(out, f"sae-gba train --resume {out}")


def _demo(args: argparse.Namespace) -> _Job:
    values = {f.name: getattr(args, f.name) for f in fields(DemoConfig)}
    for name in ("d_sae", "adaptation_interval", "eval_windows"):
        _positive(f"--{name.replace('_', '-')}", values[name])
    _positive("--training-tokens", values["training_tokens"], EMBEDDED.batch_tokens)
    _positive("--layer", values["layer"], 0)
    _positive("--seed", values["seed"], 0)
    _positive("--checkpoint-every", args.checkpoint_every)
    if values["lm_dtype"] not in LM_DTYPES:
        raise UsageError(
            f"--lm-dtype {values['lm_dtype']!r} is invalid: must be one of {LM_DTYPES}"
        )
    hint = "pass --resume to continue that run or --overwrite to start over"
    out = _output_folder(values["out"], args.resume, args.overwrite, hint)
    _writable_folder("--out", out)
    if args.overwrite:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)

    def run() -> None:
        from sae_gba.demo import run_demo

        summary = run_demo(DemoConfig(**values), args.resume, args.checkpoint_every)
        print(json.dumps({k: summary[k] for k in ("held_out", "groups")}, indent=1))
        print(
            f"wrote {out}/summary.json, firing_frequencies.png and the latent page "
            f"{out}/latents/index.html"
        )

    command = f"sae-gba demo --out {out} --resume (and the same options)"
    return run, lambda: _partial_checkpoint(out, command)


def _synth(args: argparse.Namespace) -> _Job:
    _positive("--seeds", args.seeds, 2 if args.experiment == "consistency" else 1)
    _positive("--workers", args.workers)
    if args.experiment in ("suite", "scaling"):
        return _synth_suite(args)
    if args.families or args.gba or args.size:
        raise UsageError("--families, --gba and --size apply to suite and scaling only")
    options: dict[str, object] = {}
    if args.workers is not None:
        options["workers"] = args.workers
    for name in ("variants", "methods", "data"):
        value = getattr(args, name)
        if value is not None:
            if args.experiment != "ablate":
                raise UsageError(f"--{name} applies to ablate only")
            options[name] = value if name == "data" else value.split(",")
    out = _output_file("--out", args.out)

    def run() -> None:
        from sae_gba.progress import progress_bars
        from sae_gba_evals.lab.experiments import run_experiment

        with progress_bars(not args.quiet):
            result = run_experiment(args.experiment, out, seeds=args.seeds, **options)
        print(json.dumps(result, indent=1)[:4000])

    return run, None


def _synth_suite(args: argparse.Namespace) -> _Job:
    from sae_gba_evals.suite.methods import parse_gba_overrides

    parse_gba_overrides(args.gba or [])  # a bad KEY=VALUE fails before any run
    out = _output_file("--out", args.out)

    def run() -> None:
        from sae_gba.progress import progress_bars
        from sae_gba_evals.suite.suite import run_command

        with progress_bars(not args.quiet):
            print(run_command(args))

    return run, lambda: f"finished runs so far are in {out.with_suffix('.runs.jsonl')}"


def _publish(args: argparse.Namespace) -> _Job:
    for folder in args.sae_dirs:  # publish checks the files; this is instant
        if not Path(folder).is_dir():
            raise UsageError(f"SAE folder {folder} does not exist")
    if args.dry_run is not None:
        staging = Path(args.dry_run)
        existing = _nearest_existing(staging)
        if not existing.is_dir():
            raise UsageError(f"--dry-run {staging}: {existing} is a file")
    _existing_folder("--eval-dir", args.eval_dir)

    def run() -> None:
        from sae_gba.publish import publish

        report = publish(
            args.sae_dirs,
            args.repo_id,
            revision=args.revision,
            private=args.private,
            dry_run=args.dry_run,
            eval_dir=args.eval_dir,
            sae_id_from=args.sae_id_from,
        )
        where = report.get("staging_dir") or report.get("commit_url")
        done = "staged (not uploaded) in" if args.dry_run else "uploaded:"
        print(f"{len(report['sae_ids'])} SAE(s) {done} {where}")
        for path in report["unmatched_evals"]:
            print(f"SAEBench file matched no SAE, left out of the card: {path}")
        print(f"load with: from sae_lens import SAE; sae = {report['load']}")

    return run, None


def _eval(args: argparse.Namespace) -> _Job:
    _positive("--n-tokens", args.n_tokens)
    _positive("--n-recon-tokens", args.n_recon_tokens)
    _positive("--absorption-words", args.absorption_words, 0)
    _existing_folder("--model-path", args.model_path, needs="config.json")
    _existing_folder("--dataset-path", args.dataset_path)
    hint = "pass --overwrite to replace its results"
    out = _output_folder(args.out, False, args.overwrite, hint)
    _sae_folder(args.sae_dir)
    _device(args.device)
    _writable_folder("--out", out)
    options = {
        "n_tokens": args.n_tokens,
        "n_recon_tokens": args.n_recon_tokens,
        "absorption_words": args.absorption_words,
    }
    options = {k: v for k, v in options.items() if v is not None}
    if options.get("absorption_words") == 0:
        options["absorption_words"] = None

    def run() -> None:
        from sae_gba.progress import progress_bars
        from sae_gba_evals.saebench import evaluate

        with progress_bars(not args.quiet):
            report = evaluate(
                args.sae_dir,
                out,
                [name.strip() for name in args.evals.split(",") if name.strip()],
                model_path=args.model_path,
                dataset_path=args.dataset_path,
                device=args.device,
                preset=args.preset,
                progress=not args.quiet,
                **options,
            )
        print(Path(report["summary"]).read_text())

    return run, None


def _compare(args: argparse.Namespace, argv: list[str] | None) -> _Job:
    from dataclasses import replace

    _positive("--seed", args.seed, 0)
    _positive("--absorption-words", args.absorption_words, 0)
    if args.preset == "gemma-2-2b" or args.model_path is not None:
        _existing_folder("--model-path", args.model_path, needs="config.json")
        if args.model_path is None:
            raise UsageError(
                "preset 'gemma-2-2b' needs the model's weights on this machine: "
                + GEMMA_2_2B_HOW_TO
            )
    _existing_folder("--dataset-path", args.dataset_path)
    hint = "pass --resume to keep its finished SAEs and evals and continue"
    out = _output_folder(args.out, args.resume, False, hint)
    _device(args.device)

    from sae_gba_evals.compare import METHODS, resolve_request

    methods = None
    if args.methods:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        methods = list(METHODS) if methods == ["all"] else methods
    evals = [e.strip() for e in args.evals.split(",") if e.strip()]
    size = resolve_request(args.preset, args.size, methods, evals)[1]
    if args.absorption_words is not None:
        size = replace(size, absorption_words=args.absorption_words or None)
    resolve_request(args.preset, size, methods, evals)
    _writable_folder("--out", out)

    def run() -> None:
        from sae_gba.progress import progress_bars
        from sae_gba_evals.compare import run_compare

        with progress_bars(not args.quiet):
            result = run_compare(
                out,
                preset=args.preset,
                size=size,
                methods=methods,
                evals=evals,
                model_path=args.model_path,
                dataset_path=args.dataset_path,
                device=args.device,
                seed=args.seed,
                command="sae-gba " + " ".join(sys.argv[1:] if argv is None else argv),
                progress=not args.quiet,
            )
        print(result["gba_vs_topk"])
        print(
            f"wrote {out}/compare.json, compare.md, ev_vs_l0.png, absorption_vs_l0.png"
        )

    kept = (
        f"finished SAEs and evals are kept in {out}; continue with the same command "
        "and --resume"
    )
    return run, lambda: kept


def _bench(args: argparse.Namespace) -> _Job:
    _positive("--threads", args.threads)
    out = _output_file("--out", args.out)
    if args.benchmark == "scaling":
        return _bench_scaling(args, out)

    def run() -> None:
        from sae_gba.progress import progress_bars
        from sae_gba_evals.bench.throughput import run_throughput

        with progress_bars(not args.quiet):
            result = run_throughput(
                out, harvest=not args.no_harvest, threads=args.threads
            )
        print(json.dumps(result["acceptance"], indent=1))
        print(f"wrote {out} and its PNG")

    return run, None


def _bench_scaling(args: argparse.Namespace, out: Path) -> _Job:
    from sae_gba_evals.bench.scaling import SHAPES

    if args.size not in SHAPES:
        raise UsageError(
            f"--size {args.size!r} is invalid: must be one of {list(SHAPES)}"
        )
    _device(args.device)

    def run() -> None:
        from sae_gba_evals.bench.scaling import run_scaling

        ranks = (1,) if args.device.startswith("cuda") else (1, 2)
        result = run_scaling(out, args.size, args.device, args.threads, ranks)
        print(json.dumps(result["summary"], indent=1))
        print(f"sparsify: {result['sparsify']}")
        print(f"wrote {out}")

    return run, None


def _inspect(args: argparse.Namespace) -> _Job:
    _positive("--n-latents", args.n_latents)
    _positive("--n-windows", args.n_windows)
    latents: str | list[int] = args.latents
    if latents not in ("frequent", "random", "groups"):
        try:
            latents = [int(i) for i in args.latents.split(",") if i.strip()]
        except ValueError:
            raise UsageError(
                f"--latents {args.latents!r} is invalid: expected frequent, random, "
                "groups or comma-separated latent ids"
            ) from None
    _sae_folder(args.sae_dir)
    _existing_folder("--model-path", args.model_path, needs="config.json")
    _existing_folder("--dataset-path", args.dataset_path)
    _device(args.device)
    _writable_folder("--out", Path(args.out))

    def run() -> None:
        from sae_gba.latent_page import PageOptions, inspect_sae

        page = inspect_sae(
            args.sae_dir,
            args.out,
            PageOptions(latents=latents, n_latents=args.n_latents),
            model_path=args.model_path,
            dataset_path=args.dataset_path,
            n_windows=args.n_windows,
            device=args.device,
            progress=not args.quiet,
        )
        print(f"wrote {page}")

    return run, None


# ------------------------------------------------------------------------ parser


def _add_dataclass_options(parser: argparse.ArgumentParser, config_class: type) -> None:
    for field in fields(config_class):
        parser.add_argument(
            f"--{field.name.replace('_', '-')}",
            type=type(field.default),
            default=field.default,
        )


def _add_resume_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint-every",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="seconds between training checkpoints (default 300; Ctrl-C also saves one)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="start over in a non-empty --out"
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``sae-gba`` argument parser (every subcommand and option)."""
    parser = _Parser(prog="sae-gba", description=__doc__)
    parser.add_argument(
        "--debug", action="store_true", help="show tracebacks (or SAE_GBA_DEBUG=1)"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="train a GBA SAE on the embedded Gemma-3-270M and report on it"
    )
    _add_dataclass_options(demo, DemoConfig)
    demo.add_argument(
        "--resume", action="store_true", help="continue the interrupted run in --out"
    )
    _add_resume_options(demo)
    train = commands.add_parser(
        "train", help="train a GBA SAE on a model preset through SAELens's runner"
    )
    train.add_argument("--preset", choices=sorted(PRESETS))
    where = train.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", help="output folder (SAE in OUT/sae)")
    where.add_argument(
        "--resume",
        metavar="OUT",
        help="continue the interrupted run in OUT from its newest checkpoint",
    )
    train.add_argument(
        "--model-path", help="local Hugging Face model folder (Gemma-2 presets)"
    )
    train.add_argument(
        "--dataset-path", help="local dataset folder written by save_to_disk"
    )
    train.add_argument("--d-sae", type=int, help="number of latents")
    train.add_argument("--training-tokens", type=int, help="training length")
    train.add_argument("--layer", type=int, help="residual stream block")
    train.add_argument("--device", help="torch device (cpu, cuda; default cpu)")
    train.add_argument(
        "--architecture",
        help="training architecture: gba (default), weighted_gba, topk, "
        "weighted_topk, ...",
    )
    train.add_argument("--k", type=int, help="k for topk / batchtopk architectures")
    train.add_argument(
        "--nproc",
        type=int,
        help="data-parallel ranks on this machine (torchrun; activations are "
        "harvested once into OUT/activations first)",
    )
    _add_resume_options(train)
    synth = commands.add_parser(
        "synth", help="synthetic feature-recovery experiments (JSON + PNG)"
    )
    synth.add_argument("experiment", choices=SYNTH_EXPERIMENTS)
    synth.add_argument(
        "--out", required=True, help="JSON path (the PNG goes beside it)"
    )
    synth.add_argument("--seeds", type=int, help="seeds per setting")
    synth.add_argument(
        "--workers", type=int, help="parallel training processes (default: all cores)"
    )
    synth.add_argument(
        "--variants",
        help="ablate only: comma-separated variant labels (default: all)",
    )
    synth.add_argument(
        "--methods",
        help="ablate: gba and/or gba_frozen_scale; suite: any of gba_default, "
        "gba_paper, topk_k1, topk_k2, batchtopk, l1; comma-separated (default: all)",
    )
    synth.add_argument("--families", help="suite only: comma-separated (default: all)")
    synth.add_argument(
        "--gba",
        action="append",
        metavar="KEY=VALUE",
        help="suite/scaling: a GBATrainingSAEConfig field for gba_default (repeatable)",
    )
    synth.add_argument("--size", help="suite/scaling: default or small (seconds)")
    synth.add_argument(
        "--data",
        choices=["imbalanced", "uniform", "longtail"],
        help="ablate only: the data preset (default: imbalanced)",
    )
    publish = commands.add_parser(
        "publish",
        help="check exported SAE folders and upload them to the Hugging Face Hub "
        "for SAE.from_pretrained(release=REPO_ID, sae_id=...)",
    )
    publish.add_argument(
        "sae_dirs", nargs="+", metavar="SAE_DIR", help="exported SAE folders"
    )
    publish.add_argument("--repo-id", required=True, help="Hub repo, USER/NAME")
    publish.add_argument(
        "--revision", default="main", help="branch (from_pretrained reads main)"
    )
    publish.add_argument(
        "--private", action="store_true", help="create the repo private if new"
    )
    publish.add_argument(
        "--dry-run", metavar="STAGING_DIR", help="only stage the repo layout here"
    )
    publish.add_argument(
        "--eval-dir", help="folder of SAEBench result JSON for the model card"
    )
    publish.add_argument(
        "--sae-id-from",
        choices=["hook", "folder"],
        default="hook",
        help="repo folder names: HOOK__TRAINING-ARCH_WIDTH (default) or folder names",
    )
    evaluate = commands.add_parser(
        "eval",
        help="SAEBench core and absorption evals of an SAE folder on held-out data",
    )
    evaluate.add_argument("sae_dir", metavar="SAE_DIR", help="any SAELens SAE folder")
    evaluate.add_argument(
        "--evals", default="core,absorption", help="comma list: core, absorption"
    )
    evaluate.add_argument("--out", required=True, help="output folder")
    evaluate.add_argument(
        "--overwrite", action="store_true", help="replace results in a non-empty --out"
    )
    evaluate.add_argument(
        "--model-path", help="local Hugging Face folder of the SAE's model"
    )
    evaluate.add_argument(
        "--dataset-path", help="held-out data folder (save_to_disk) to use instead"
    )
    evaluate.add_argument(
        "--n-tokens", type=int, help="sparsity/alive tokens (default: all held-out)"
    )
    evaluate.add_argument("--n-recon-tokens", type=int, help="CE/KL tokens")
    evaluate.add_argument(
        "--absorption-words", type=int, help="probe vocabulary sample (0: all words)"
    )
    evaluate.add_argument(
        "--preset", help="eval preset (default: from the SAE's model name)"
    )
    evaluate.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    bench = commands.add_parser(
        "bench", help="training throughput of GBA against SAELens's SAEs (JSON + PNG)"
    )
    bench.add_argument("benchmark", choices=["throughput", "scaling"])
    bench.add_argument(
        "--out", required=True, help="JSON path (the PNG goes beside it)"
    )
    bench.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    bench.add_argument(
        "--no-harvest",
        action="store_true",
        help="skip the embedded model's activation-harvest measurement",
    )
    bench.add_argument(
        "--size", default="default", help="scaling: default or tiny (a check only)"
    )
    bench.add_argument(
        "--device", default="cpu", help="scaling: cpu (gloo, 1 and 2 ranks) or cuda"
    )
    compare = commands.add_parser(
        "compare",
        help="train GBA, TopK, BatchTopK, JumpReLU (and weighted) SAEs on the same "
        "tokens across an L0 range and compare them with SAEBench (JSON, MD, PNG)",
    )
    compare.add_argument("--out", required=True, help="output folder")
    compare.add_argument(
        "--resume",
        action="store_true",
        help="keep the finished SAEs and evals in --out and do the rest",
    )
    compare.add_argument(
        "--preset", default="embedded", help="embedded (default) or gemma-2-2b"
    )
    compare.add_argument("--size", default="default", help="default or small")
    compare.add_argument(
        "--methods",
        help="comma list of gba, topk, batchtopk, jumprelu, weighted_<each>, or "
        "'all' (default: gba,topk,batchtopk,jumprelu,weighted_gba,weighted_topk)",
    )
    compare.add_argument(
        "--evals", default="core,absorption", help="comma list: core, absorption"
    )
    compare.add_argument(
        "--model-path", help="local Hugging Face folder (gemma-2-2b preset)"
    )
    compare.add_argument(
        "--dataset-path",
        help="save_to_disk folder split by row into training and held-out data",
    )
    compare.add_argument(
        "--absorption-words",
        type=int,
        help="absorption probe vocabulary sample, instead of the size's (0: all words)",
    )
    compare.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    compare.add_argument("--seed", type=int, default=0, help="training seed")
    inspect = commands.add_parser(
        "inspect",
        help="write a static HTML page of an SAE's latents on its model's held-out "
        "text (top contexts, activation histograms, promoted tokens)",
    )
    inspect.add_argument("sae_dir", metavar="SAE_DIR", help="any SAELens SAE folder")
    inspect.add_argument("--out", required=True, help="output folder (OUT/index.html)")
    inspect.add_argument(
        "--latents",
        default="frequent",
        help="frequent, random, groups (a sample from every GBA group) or "
        "comma-separated latent ids (default: frequent)",
    )
    inspect.add_argument(
        "--n-latents", type=int, default=48, help="latents shown (default: 48)"
    )
    inspect.add_argument(
        "--model-path", help="local Hugging Face folder of the SAE's model (Gemma-2)"
    )
    inspect.add_argument(
        "--dataset-path", help="held-out data folder (save_to_disk) to use instead"
    )
    inspect.add_argument(
        "--n-windows", type=int, help="use only the first windows (default: all)"
    )
    inspect.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    for command in (synth, evaluate, bench, compare, inspect):
        command.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _fail(prog: str, message: str, code: int, debug: bool) -> None:
    if debug:
        traceback.print_exc()
    print(f"{prog}: error: {' '.join(message.split())}", file=sys.stderr)
    raise SystemExit(code)


def main(argv: list[str] | None = None) -> None:
    """Run ``sae-gba`` with ``argv`` (default: the command line)."""
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("SAE_GBA_DEBUG", "") not in ("", "0")
    prog = f"sae-gba {args.command}"
    checks = {
        "demo": _demo,
        "train": _train,
        "synth": _synth,
        "publish": _publish,
        "eval": _eval,
        "compare": lambda a: _compare(a, argv),
        "bench": _bench,
        "inspect": _inspect,
    }
    try:
        run, partial = checks[args.command](args)
    except (UsageError, ValueError, FileNotFoundError) as err:
        _fail(prog, str(err), 2, debug)
    except Exception as err:
        hint = "" if debug else "; SAE_GBA_DEBUG=1 shows the traceback"
        _fail(prog, f"{type(err).__name__}: {err}{hint}", 1, debug)
    try:
        run()
    except KeyboardInterrupt:
        note = f"; {partial()}" if partial else ""
        _fail(prog, f"interrupted{note}", 130, debug)
    except (ValueError, FileNotFoundError, NotADirectoryError) as err:
        note = f" ({partial()})" if partial else ""
        _fail(prog, f"{err}{note}", 2, debug)
    except Exception as err:
        note = f" ({partial()})" if partial else ""
        hint = "" if debug else "; SAE_GBA_DEBUG=1 shows the traceback"
        _fail(prog, f"{type(err).__name__}: {err}{note}{hint}", 1, debug)


if __name__ == "__main__":
    main()
