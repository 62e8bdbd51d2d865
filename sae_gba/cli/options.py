"""Command-line options generated from a command's config dataclass.

Each field becomes one option: ``--field-name`` (or a positional argument with
``positional()``), typed by its annotation (``bool`` a switch, ``Literal`` a choice,
``list[str]`` repeatable or, positional, one or more), required when it has no
default, and documented by its entry in the class docstring's ``Args:`` section.
"""

import argparse
import dataclasses
import inspect
import re
import types
from collections.abc import Callable
from typing import (
    Any,
    Literal,
    NoReturn,
    TypeVar,
    Union,
    get_args,
    get_origin,
    get_type_hints,
)

Config = TypeVar("Config")


class UsageError(Exception):
    """A request that a command refuses before doing any work (exit status 2)."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positional(metavar: str, default: Any = dataclasses.MISSING) -> Any:
    """A dataclass field read as a positional argument named ``metavar``.

    Args:
        metavar: the name ``--help`` shows.
        default: its default; none makes it required.
    """
    return dataclasses.field(
        default=default, metadata={"positional": True, "metavar": metavar}
    )


def metavar(name: str, default: Any = None) -> Any:
    """A dataclass field whose option shows ``name`` as its value in ``--help``.

    Args:
        name: the value's name, e.g. ``OUT``.
        default: the field's default.
    """
    return dataclasses.field(default=default, metadata={"metavar": name})


def repeated(metavar: str) -> Any:
    """A ``list[str]`` dataclass field filled by a repeatable option.

    Args:
        metavar: the value's name, e.g. ``KEY=VALUE``.
    """
    return dataclasses.field(default_factory=list, metadata={"metavar": metavar})


def field_help(config_class: type) -> dict[str, str]:
    """Each field's sentence from the ``Args:`` sections of the class and its bases.

    Args:
        config_class: a dataclass documented in the SAELens style.
    """
    helps: dict[str, str] = {}
    for klass in reversed(config_class.__mro__):
        doc = inspect.cleandoc(klass.__dict__.get("__doc__") or "")
        if "Args:" not in doc:
            continue
        block = re.split(r"\n(?=\S)", doc.split("Args:", 1)[1].lstrip("\n"))[0]
        for name, text in re.findall(r"^    (\w+): (.*(?:\n {8,}.*)*)", block, re.M):
            helps[name] = " ".join(text.split())
    return helps


def _help_text(text: str, default: Any) -> str:
    text = re.sub(r"``(.*?)``", r"\1", text)
    if default in (None, False, [], dataclasses.MISSING) or "(default" in text:
        return text
    return f"{text.rstrip('.')} (default: {default})"


def add_config_options(parser: argparse.ArgumentParser, config_class: type) -> None:
    """Add one option per field of ``config_class`` to ``parser``.

    Args:
        parser: the command's parser.
        config_class: the command's config dataclass; every field needs an ``Args:``
            entry (its ``--help`` sentence).
    """
    helps = field_help(config_class)
    hints = get_type_hints(config_class)
    shared = {f.name for group in SHARED_GROUPS for f in dataclasses.fields(group)}
    own = [f for f in dataclasses.fields(config_class) if f.name not in shared]
    for field in own + [f for f in dataclasses.fields(config_class) if f not in own]:
        if field.name not in helps:
            raise ValueError(f"{config_class.__name__}.{field.name} has no Args: entry")
        hint = hints[field.name]
        if get_origin(hint) in (Union, types.UnionType):
            hint = next(m for m in get_args(hint) if m is not type(None))
        default = (
            field.default_factory()
            if field.default_factory is not dataclasses.MISSING
            else field.default
        )
        options: dict[str, Any] = {"help": _help_text(helps[field.name], default)}
        if "metavar" in field.metadata:
            options["metavar"] = field.metadata["metavar"]
        if get_origin(hint) is list:
            hint = get_args(hint)[0]
            many = "+" if field.metadata.get("positional") else None
            # append: argparse would add to a shared default list.
            options |= {"nargs": many} if many else {"action": "append"}
            default = None if many is None else default
        if get_origin(hint) is Literal:
            options["choices"] = get_args(hint)
            if "metavar" in options:  # argparse would show only the metavar
                choices = ", ".join(get_args(hint))
                options["help"] = f"{options['help'].rstrip('.')} (one of: {choices})"
            hint = type(get_args(hint)[0])
        if hint is bool:
            options["action"] = "store_true"
        else:
            options["type"] = hint
        if field.metadata.get("positional"):
            if default is not dataclasses.MISSING:
                options |= {"nargs": options.get("nargs") or "?", "default": default}
            parser.add_argument(field.name, **options)
            continue
        if default is dataclasses.MISSING:
            options["required"] = True
        else:
            options["default"] = default
        parser.add_argument(f"--{field.name.replace('_', '-')}", **options)


def config_from_args(config_class: type[Config], args: argparse.Namespace) -> Config:
    """The config dataclass filled from parsed arguments.

    Args:
        config_class: the command's config dataclass.
        args: what ``add_config_options``' parser parsed.
    """
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_class)}
    for field in dataclasses.fields(config_class):
        if (
            values[field.name] is None
            and field.default_factory is not dataclasses.MISSING
        ):
            values[field.name] = field.default_factory()
    return config_class(**values)


# Option groups several commands share.


@dataclasses.dataclass(kw_only=True)
class CheckpointOptions:
    """Checkpointing of a training command.

    Args:
        checkpoint_every: seconds between training checkpoints (Ctrl-C also saves
            one).
        overwrite: start over in a non-empty --out.
    """

    checkpoint_every: float = dataclasses.field(
        default=300.0, metadata={"metavar": "SECONDS"}
    )
    overwrite: bool = False


@dataclasses.dataclass(kw_only=True)
class QuietOption:
    """Progress display of a long command.

    Args:
        quiet: no progress bars.
    """

    quiet: bool = False


# Their options come after each command's own in --help.
SHARED_GROUPS = (CheckpointOptions, QuietOption)


# What a command does once its checks passed, and where its partial results are.
Job = tuple[Callable[[], None], Callable[[], str] | None]
