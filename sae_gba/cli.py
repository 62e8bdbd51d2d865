"""The ``sae-gba`` command line: one subcommand per job, each a thin call into the library."""

import argparse
import json
from dataclasses import fields

from sae_gba.demo import DemoConfig


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
    args = parser.parse_args(argv)

    if args.command == "demo":
        from sae_gba.demo import run_demo

        values = {f.name: getattr(args, f.name) for f in fields(DemoConfig)}
        summary = run_demo(DemoConfig(**values))
        print(json.dumps({k: summary[k] for k in ("held_out", "groups")}, indent=1))
        print(f"wrote {values['out']}/summary.json and firing_frequencies.png")


if __name__ == "__main__":
    main()
