"""``sae-gba eval``, ``compare``, ``inspect`` and ``publish``: commands on SAE folders."""

import dataclasses
from pathlib import Path
from typing import Literal

from sae_gba.cli import checks
from sae_gba.cli.options import (
    Job,
    QuietOption,
    UsageError,
    metavar,
    positional,
    repeated,
)
from sae_gba.config_fields import parse_settings


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


@dataclasses.dataclass(kw_only=True)
class EvalOptions(QuietOption):
    """``sae-gba eval``: SAEBench core and absorption evals of an SAE folder.

    Args:
        sae_dir: any SAELens SAE folder.
        out: output folder.
        evals: comma list of the evals to run: core, absorption.
        overwrite: replace the results in a non-empty --out.
        model_path: local Hugging Face folder of the SAE's model.
        dataset_path: held-out data folder (save_to_disk) to use instead of the
            preset's.
        n_tokens: tokens for the sparsity and alive metrics (default: all held-out).
        n_recon_tokens: tokens for the CE and KL metrics (default: the preset's).
        absorption_words: probe vocabulary sample (0: all words; default: the
            preset's).
        preset: eval preset (default: from the SAE's model name).
        device: torch device: cpu, cuda, cuda:N or mps.
    """

    sae_dir: str = positional("SAE_DIR")
    out: str
    evals: str = "core,absorption"
    overwrite: bool = False
    model_path: str | None = None
    dataset_path: str | None = None
    n_tokens: int | None = None
    n_recon_tokens: int | None = None
    absorption_words: int | None = None
    preset: str | None = None
    device: str = "cpu"


def check_eval(opts: EvalOptions, command_line: str) -> Job:
    """Check ``sae-gba eval``'s request; return its job."""
    checks.positive("--n-tokens", opts.n_tokens)
    checks.positive("--n-recon-tokens", opts.n_recon_tokens)
    checks.positive("--absorption-words", opts.absorption_words, 0)
    checks.existing_folder("--model-path", opts.model_path, needs="config.json")
    checks.existing_folder("--dataset-path", opts.dataset_path)
    hint = "pass --overwrite to replace its results"
    out = checks.output_folder(opts.out, False, opts.overwrite, hint)
    checks.sae_folder(opts.sae_dir)
    checks.torch_device(opts.device)
    checks.writable_folder("--out", out)
    options = {
        "n_tokens": opts.n_tokens,
        "n_recon_tokens": opts.n_recon_tokens,
        "absorption_words": opts.absorption_words,
    }
    options = {k: v for k, v in options.items() if v is not None}
    if options.get("absorption_words") == 0:
        options["absorption_words"] = None

    def run() -> None:
        from sae_gba.progress import progress_bars
        from sae_gba_evals.saebench import evaluate

        with progress_bars(not opts.quiet):
            report = evaluate(
                opts.sae_dir,
                out,
                _comma_list(opts.evals),
                model_path=opts.model_path,
                dataset_path=opts.dataset_path,
                device=opts.device,
                preset=opts.preset,
                progress=not opts.quiet,
                **options,
            )
        print(Path(report["summary"]).read_text())

    return run, None


@dataclasses.dataclass(kw_only=True)
class CompareOptions(QuietOption):
    """``sae-gba compare``: GBA against SAELens's SAEs across an L0 range.

    Args:
        out: output folder (compare.json, compare.md and plots).
        resume: keep the finished SAEs and evals in --out and do the rest.
        preset: embedded or gemma-2-2b.
        size: default or small (a smoke run in minutes).
        methods: comma list of gba, topk, batchtopk, jumprelu, weighted_<each>, or
            all (default: gba, topk, batchtopk, jumprelu).
        evals: comma list of the evals to run: core, absorption.
        model_path: local Hugging Face folder (gemma-2-2b preset).
        dataset_path: save_to_disk folder split by row into training and held-out
            data.
        absorption_words: absorption probe vocabulary sample instead of the size's
            (0: all words).
        device: torch device: cpu, cuda, cuda:N or mps.
        seed: training seed.
        l0: comma list of target L0s instead of the size's (e.g. 16,32).
        training_passes: passes over the harvested tokens instead of the size's (an
            ablation: every method trains that long).
        gba: an ablation: a GBATrainingSAEConfig field for GBA as KEY=VALUE
            (repeatable; the default comparison sets none).
    """

    out: str
    resume: bool = False
    preset: str = "embedded"
    size: str = "default"
    methods: str | None = None
    evals: str = "core,absorption"
    model_path: str | None = None
    dataset_path: str | None = None
    absorption_words: int | None = None
    device: str = "cpu"
    seed: int = 0
    l0: str | None = None
    training_passes: int | None = None
    gba: list[str] = repeated("KEY=VALUE")


def check_compare(opts: CompareOptions, command_line: str) -> Job:
    """Check ``sae-gba compare``'s request; return its job."""
    checks.positive("--seed", opts.seed, 0)
    checks.positive("--absorption-words", opts.absorption_words, 0)
    checks.positive("--training-passes", opts.training_passes)
    from sae_gba.gba_config import GBATrainingSAEConfig

    try:
        gba = parse_settings(
            opts.gba, GBATrainingSAEConfig, "--gba", ("d_in", "d_sae", "target_l0")
        )
    except ValueError as err:
        raise UsageError(str(err)) from None
    if opts.preset == "gemma-2-2b" or opts.model_path is not None:
        checks.existing_folder("--model-path", opts.model_path, needs="config.json")
        if opts.model_path is None:
            raise UsageError(
                "preset 'gemma-2-2b' needs the model's weights on this machine: "
                + checks.GEMMA_2_2B_HOW_TO
            )
    checks.existing_folder("--dataset-path", opts.dataset_path)
    hint = "pass --resume to keep its finished SAEs and evals and continue"
    out = checks.output_folder(opts.out, opts.resume, False, hint)
    checks.torch_device(opts.device)

    from sae_gba_evals.compare import METHODS, resolve_request

    methods = None
    if opts.methods:
        methods = _comma_list(opts.methods)
        methods = list(METHODS) if methods == ["all"] else methods
    evals = _comma_list(opts.evals)
    size = resolve_request(opts.preset, opts.size, methods, evals)[1]
    if opts.absorption_words is not None:
        size = dataclasses.replace(size, absorption_words=opts.absorption_words or None)
    if opts.l0 is not None:
        try:
            targets = tuple(float(t) for t in _comma_list(opts.l0))
        except ValueError:
            raise UsageError(
                f"--l0 {opts.l0!r} is invalid: expected a comma list of numbers"
            ) from None
        size = dataclasses.replace(size, target_l0s=targets)
    if opts.training_passes is not None:
        size = dataclasses.replace(size, training_passes=opts.training_passes)
    if gba:
        size = dataclasses.replace(size, gba_fields=gba)
    resolve_request(opts.preset, size, methods, evals)
    checks.writable_folder("--out", out)

    def run() -> None:
        from sae_gba.progress import progress_bars
        from sae_gba_evals.compare import run_compare

        with progress_bars(not opts.quiet):
            result = run_compare(
                out,
                preset=opts.preset,
                size=size,
                methods=methods,
                evals=evals,
                model_path=opts.model_path,
                dataset_path=opts.dataset_path,
                device=opts.device,
                seed=opts.seed,
                command=command_line,
                progress=not opts.quiet,
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


@dataclasses.dataclass(kw_only=True)
class InspectOptions(QuietOption):
    """``sae-gba inspect``: a static HTML page of an SAE's latents.

    Args:
        sae_dir: any SAELens SAE folder.
        out: output folder (OUT/index.html).
        latents: frequent, random, groups (a sample from every GBA group) or
            comma-separated latent ids.
        n_latents: latents shown.
        model_path: local Hugging Face folder of the SAE's model (Gemma-2).
        dataset_path: held-out data folder (save_to_disk) to use instead.
        n_windows: use only the first windows (default: all).
        device: torch device: cpu, cuda, cuda:N or mps.
    """

    sae_dir: str = positional("SAE_DIR")
    out: str
    latents: str = "frequent"
    n_latents: int = 48
    model_path: str | None = None
    dataset_path: str | None = None
    n_windows: int | None = None
    device: str = "cpu"


def check_inspect(opts: InspectOptions, command_line: str) -> Job:
    """Check ``sae-gba inspect``'s request; return its job."""
    checks.positive("--n-latents", opts.n_latents)
    checks.positive("--n-windows", opts.n_windows)
    latents: str | list[int] = opts.latents
    if latents not in ("frequent", "random", "groups"):
        try:
            latents = [int(i) for i in _comma_list(opts.latents)]
        except ValueError:
            raise UsageError(
                f"--latents {opts.latents!r} is invalid: expected frequent, random, "
                "groups or comma-separated latent ids"
            ) from None
    checks.sae_folder(opts.sae_dir)
    checks.existing_folder("--model-path", opts.model_path, needs="config.json")
    checks.existing_folder("--dataset-path", opts.dataset_path)
    checks.torch_device(opts.device)
    checks.writable_folder("--out", Path(opts.out))

    def run() -> None:
        from sae_gba.latent_page import PageOptions, inspect_sae

        page = inspect_sae(
            opts.sae_dir,
            opts.out,
            PageOptions(latents=latents, n_latents=opts.n_latents),
            model_path=opts.model_path,
            dataset_path=opts.dataset_path,
            n_windows=opts.n_windows,
            device=opts.device,
            progress=not opts.quiet,
        )
        print(f"wrote {page}")

    return run, None


@dataclasses.dataclass(kw_only=True)
class PublishOptions:
    """``sae-gba publish``: SAE folders to the Hugging Face Hub.

    Args:
        sae_dirs: exported SAE folders.
        repo_id: Hub repo, USER/NAME.
        revision: branch (SAE.from_pretrained reads main).
        private: create the repo private if it is new.
        dry_run: only stage the repo layout in this folder; upload nothing.
        eval_dir: folder of SAEBench result JSON for the model card.
        sae_id_from: repo folder names: hook (HOOK__TRAINING-ARCH_WIDTH) or folder
            (the SAE folders' names).
    """

    sae_dirs: list[str] = positional("SAE_DIR")
    repo_id: str
    revision: str = "main"
    private: bool = False
    dry_run: str | None = metavar("STAGING_DIR")
    eval_dir: str | None = None
    sae_id_from: Literal["hook", "folder"] = "hook"


def check_publish(opts: PublishOptions, command_line: str) -> Job:
    """Check ``sae-gba publish``'s request; return its job."""
    for folder in opts.sae_dirs:  # publish checks the files; this is instant
        if not Path(folder).is_dir():
            raise UsageError(f"SAE folder {folder} does not exist")
    if opts.dry_run is not None:
        staging = Path(opts.dry_run)
        existing = checks.nearest_existing(staging)
        if not existing.is_dir():
            raise UsageError(f"--dry-run {staging}: {existing} is a file")
    checks.existing_folder("--eval-dir", opts.eval_dir)

    def run() -> None:
        from sae_gba.publish import publish

        report = publish(
            opts.sae_dirs,
            opts.repo_id,
            revision=opts.revision,
            private=opts.private,
            dry_run=opts.dry_run,
            eval_dir=opts.eval_dir,
            sae_id_from=opts.sae_id_from,
        )
        where = report.get("staging_dir") or report.get("commit_url")
        done = "staged (not uploaded) in" if opts.dry_run else "uploaded:"
        print(f"{len(report['sae_ids'])} SAE(s) {done} {where}")
        for path in report["unmatched_evals"]:
            print(f"SAEBench file matched no SAE, left out of the card: {path}")
        print(f"load with: from sae_lens import SAE; sae = {report['load']}")

    return run, None
