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
    synth = commands.add_parser(
        "synth", help="synthetic feature-recovery experiments (JSON + PNG)"
    )
    synth.add_argument(
        "experiment",
        choices=["imbalanced", "resonance", "consistency", "longtail", "ablate"],
    )
    synth.add_argument(
        "--out", required=True, help="JSON path (the PNG goes beside it)"
    )
    synth.add_argument("--seeds", type=int, help="seeds per setting")
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
        )
        print(f"wrote the SAE to {args.out}/sae")
    elif args.command == "synth":
        from evals.synthetic_lab import run_experiment

        result = run_experiment(args.experiment, args.out, seeds=args.seeds)
        print(json.dumps(result, indent=1)[:4000])


if __name__ == "__main__":
    main()
