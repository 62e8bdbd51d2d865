"""The ``sae-gba`` command line: one subcommand per job, each a thin call into the library.

Each command is one config dataclass (its options, generated with their ``--help``
sentences by ``sae_gba.cli.options``) and one check function in the dispatch table
``COMMANDS``. The check tests what it can without loading a model or data (output
paths, counts, names, devices, model and SAE folders) and refuses in one line with
exit status 2: ``sae-gba CMD: error: <what and how to fix>``. A failure during the
work exits 1 (130 on Ctrl-C) and says where the partial results are. Tracebacks are
shown only with ``--debug`` or ``SAE_GBA_DEBUG=1``. Heavy libraries (torch, SAELens)
are imported only by the command that runs, so ``--help`` is instant.
"""

import argparse
import dataclasses
import os
import shlex
import sys
import traceback
from collections.abc import Callable
from typing import Any

from sae_gba.cli.evaluate import (
    CompareOptions,
    EvalOptions,
    InspectOptions,
    PublishOptions,
    check_compare,
    check_eval,
    check_inspect,
    check_publish,
)
from sae_gba.cli.lab import BenchOptions, SynthOptions, check_bench, check_synth
from sae_gba.cli.options import (
    Job,
    Parser,
    UsageError,
    add_config_options,
    config_from_args,
)
from sae_gba.cli.train import (
    TRAIN_ARGS_FILE,
    TRAIN_FIELDS,
    DemoOptions,
    TrainOptions,
    check_demo,
    check_train,
)

__all__ = [
    "COMMANDS",
    "TRAIN_ARGS_FILE",
    "TRAIN_FIELDS",
    "Command",
    "UsageError",
    "build_parser",
    "main",
]


DESCRIPTION = (
    "Group Bias Adaptation SAEs for SAELens: train, evaluate, compare, inspect and "
    "publish. Every command checks its input first and refuses in one line (exit "
    "status 2); --debug (or SAE_GBA_DEBUG=1) shows tracebacks. `sae-gba COMMAND "
    "--help` lists a command's options."
)


@dataclasses.dataclass(frozen=True)
class Command:
    """One subcommand: its one-line help, its options and its check.

    Args:
        help: what the command does, for ``sae-gba --help``.
        options: the config dataclass its options are generated from.
        check: checks a request (the filled options and the command line) and
            returns the job.
    """

    help: str
    options: type
    check: Callable[[Any, str], Job]


COMMANDS: dict[str, Command] = {
    "demo": Command(
        "train a GBA SAE on the embedded Gemma-3-270M and report on it",
        DemoOptions,
        check_demo,
    ),
    "train": Command(
        "train an SAE (GBA by default) on a model preset through SAELens's runner",
        TrainOptions,
        check_train,
    ),
    "synth": Command(
        "synthetic feature-recovery experiments (JSON + PNG)", SynthOptions, check_synth
    ),
    "publish": Command(
        "check exported SAE folders and upload them to the Hugging Face Hub for "
        "SAE.from_pretrained(release=REPO_ID, sae_id=...)",
        PublishOptions,
        check_publish,
    ),
    "eval": Command(
        "SAEBench core and absorption evals of an SAE folder on held-out data",
        EvalOptions,
        check_eval,
    ),
    "compare": Command(
        "train GBA, TopK, BatchTopK, JumpReLU (and weighted) SAEs on the same tokens "
        "across an L0 range and compare them with SAEBench (JSON, MD, PNG)",
        CompareOptions,
        check_compare,
    ),
    "bench": Command(
        "training throughput of GBA against SAELens's SAEs, and data-parallel "
        "scaling (JSON + PNG)",
        BenchOptions,
        check_bench,
    ),
    "inspect": Command(
        "write a static HTML page of an SAE's latents on its model's held-out text "
        "(top contexts, activation histograms, promoted tokens)",
        InspectOptions,
        check_inspect,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """The ``sae-gba`` argument parser (every subcommand and option)."""
    parser = Parser(prog="sae-gba", description=DESCRIPTION)
    parser.add_argument(
        "--debug", action="store_true", help="show tracebacks (or SAE_GBA_DEBUG=1)"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        sub = commands.add_parser(
            name,
            help=command.help,
            description=command.options.__doc__.splitlines()[0].replace("``", ""),
        )
        add_config_options(sub, command.options)
    return parser


def _fail(prog: str, message: str, code: int, debug: bool) -> None:
    if debug:
        traceback.print_exc()
    print(f"{prog}: error: {' '.join(message.split())}", file=sys.stderr)
    raise SystemExit(code)


def main(argv: list[str] | None = None) -> None:
    """Run ``sae-gba`` with ``argv`` (default: the command line)."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("SAE_GBA_DEBUG", "") not in ("", "0")
    prog = f"sae-gba {args.command}"
    command = COMMANDS[args.command]
    try:
        options = config_from_args(command.options, args)
        run, partial = command.check(options, shlex.join(["sae-gba", *argv]))
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
