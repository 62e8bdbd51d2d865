"""The ``sae-gba`` command line: one subcommand per job, each a thin call into the library."""

import argparse
import json
from dataclasses import fields

from sae_gba.demo import DemoConfig
from sae_gba.presets import PRESETS


def _add_dataclass_options(parser: argparse.ArgumentParser, config_class: type) -> None:
    for field in fields(config_class):
        parser.add_argument(
            f"--{field.name.replace('_', '-')}",
            type=type(field.default),
            default=field.default,
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sae-gba", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="train a GBA SAE on the embedded Gemma-3-270M and report on it"
    )
    _add_dataclass_options(demo, DemoConfig)
    train = commands.add_parser(
        "train", help="train a GBA SAE on a model preset through SAELens's runner"
    )
    train.add_argument("--preset", choices=sorted(PRESETS), required=True)
    train.add_argument("--out", required=True, help="output folder (SAE in OUT/sae)")
    train.add_argument(
        "--model-path", help="local Hugging Face model folder (Gemma-2 presets)"
    )
    train.add_argument(
        "--dataset-path", help="local dataset folder written by save_to_disk"
    )
    train.add_argument("--d-sae", type=int, help="number of latents")
    train.add_argument("--training-tokens", type=int, help="training length")
    train.add_argument("--layer", type=int, help="residual stream block")
    train.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    train.add_argument(
        "--architecture",
        default="gba",
        help="training architecture: gba, weighted_gba, topk, weighted_topk, ...",
    )
    train.add_argument("--k", type=int, help="k for topk / batchtopk architectures")
    synth = commands.add_parser(
        "synth", help="synthetic feature-recovery experiments (JSON + PNG)"
    )
    synth.add_argument(
        "experiment",
        choices=[
            "imbalanced",
            "resonance",
            "consistency",
            "longtail",
            "ablate",
            "planted",
            "wsae",
            "suite",
            "scaling",
        ],
    )
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
    bench.add_argument("benchmark", choices=["throughput"])
    bench.add_argument(
        "--out", required=True, help="JSON path (the PNG goes beside it)"
    )
    bench.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    bench.add_argument(
        "--no-harvest",
        action="store_true",
        help="skip the embedded model's activation-harvest measurement",
    )
    compare = commands.add_parser(
        "compare",
        help="train GBA, TopK, BatchTopK, JumpReLU (and weighted) SAEs on the same "
        "tokens across an L0 range and compare them with SAEBench (JSON, MD, PNG)",
    )
    compare.add_argument("--out", required=True, help="output folder (resumable)")
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
    args = parser.parse_args(argv)

    if args.command == "demo":
        from sae_gba.demo import run_demo

        values = {f.name: getattr(args, f.name) for f in fields(DemoConfig)}
        summary = run_demo(DemoConfig(**values))
        print(json.dumps({k: summary[k] for k in ("held_out", "groups")}, indent=1))
        print(f"wrote {values['out']}/summary.json and firing_frequencies.png")
    elif args.command == "train":
        from sae_gba.presets import train_preset

        train_preset(
            PRESETS[args.preset],
            args.out,
            model_path=args.model_path,
            dataset_path=args.dataset_path,
            d_sae=args.d_sae,
            training_tokens=args.training_tokens,
            layer=args.layer,
            device=args.device,
            architecture=args.architecture,
            **({} if args.k is None else {"k": args.k}),
        )
        print(f"wrote the SAE to {args.out}/sae")
    elif args.command == "synth" and args.experiment in ("suite", "scaling"):
        from evals.suite.suite import run_command

        try:
            print(run_command(args))
        except ValueError as err:
            synth.error(str(err))
    elif args.command == "synth":
        from evals.synthetic_lab import run_experiment

        if args.families or args.gba or args.size:
            parser.error("--families, --gba and --size apply to suite and scaling only")

        options: dict[str, object] = {}
        if args.workers is not None:
            options["workers"] = args.workers
        for name in ("variants", "methods", "data"):
            value = getattr(args, name)
            if value is not None:
                if args.experiment != "ablate":
                    parser.error(f"--{name} applies to ablate only")
                options[name] = value if name == "data" else value.split(",")
        result = run_experiment(args.experiment, args.out, seeds=args.seeds, **options)
        print(json.dumps(result, indent=1)[:4000])
    elif args.command == "publish":
        from sae_gba.publish import PublishError
        from sae_gba.publish import publish as publish_release

        try:
            report = publish_release(
                args.sae_dirs,
                args.repo_id,
                revision=args.revision,
                private=args.private,
                dry_run=args.dry_run,
                eval_dir=args.eval_dir,
                sae_id_from=args.sae_id_from,
            )
        except PublishError as err:
            publish.error(str(err))
        where = report.get("staging_dir") or report.get("commit_url")
        done = "staged (not uploaded) in" if args.dry_run else "uploaded:"
        print(f"{len(report['sae_ids'])} SAE(s) {done} {where}")
        for path in report["unmatched_evals"]:
            print(f"SAEBench file matched no SAE, left out of the card: {path}")
        print(f"load with: from sae_lens import SAE; sae = {report['load']}")

    elif args.command == "eval":
        from pathlib import Path

        from evals.saebench import EvalError
        from evals.saebench import evaluate as run_evals

        options = {
            "n_tokens": args.n_tokens,
            "n_recon_tokens": args.n_recon_tokens,
            "absorption_words": args.absorption_words,
        }
        options = {k: v for k, v in options.items() if v is not None}
        if options.get("absorption_words") == 0:
            options["absorption_words"] = None
        try:
            report = run_evals(
                args.sae_dir,
                args.out,
                [name.strip() for name in args.evals.split(",") if name.strip()],
                model_path=args.model_path,
                dataset_path=args.dataset_path,
                device=args.device,
                preset=args.preset,
                **options,
            )
        except EvalError as err:
            evaluate.error(str(err))
        print(Path(report["summary"]).read_text())

    elif args.command == "compare":
        import sys
        from dataclasses import replace

        from evals.compare import METHODS, CompareError, resolve_request, run_compare

        methods = None
        if args.methods:
            methods = [m.strip() for m in args.methods.split(",") if m.strip()]
            methods = list(METHODS) if methods == ["all"] else methods
        try:
            size = resolve_request(args.preset, args.size, None, ["core"])[1]
            if args.absorption_words is not None:
                size = replace(size, absorption_words=args.absorption_words or None)
            result = run_compare(
                args.out,
                preset=args.preset,
                size=size,
                methods=methods,
                evals=[e.strip() for e in args.evals.split(",") if e.strip()],
                model_path=args.model_path,
                dataset_path=args.dataset_path,
                device=args.device,
                seed=args.seed,
                command="sae-gba " + " ".join(sys.argv[1:] if argv is None else argv),
            )
        except CompareError as err:
            compare.error(str(err))
        print(result["gba_vs_topk"])
        print(
            f"wrote {args.out}/compare.json, compare.md, ev_vs_l0.png, "
            "absorption_vs_l0.png"
        )

    elif args.command == "bench":
        from evals.throughput import run_throughput

        result = run_throughput(
            args.out, harvest=not args.no_harvest, threads=args.threads
        )
        print(json.dumps(result["acceptance"], indent=1))
        print(f"wrote {args.out} and its PNG")


if __name__ == "__main__":
    main()
