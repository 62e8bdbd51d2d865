"""Config fields: the one check behind every field's error message, and ``KEY=VALUE``
settings read into a config class's fields by their declared types."""

import dataclasses
import types
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def check_field(cfg: object, name: str, ok: bool, allowed: str) -> None:
    """Raise ``ValueError`` naming the config class, field, value and what is allowed.

    Args:
        cfg: the config whose field is checked.
        name: the field's name.
        ok: whether the value is allowed.
        allowed: what values are allowed, e.g. ``"must be >= 1"``.
    """
    if not ok:
        raise ValueError(
            f"{type(cfg).__name__}.{name}={getattr(cfg, name)!r} is invalid: {allowed}"
        )


def _convert(text: str, hint: Any) -> Any:
    """``text`` as a value of type ``hint``; ValueError says what the type allows."""
    if get_origin(hint) in (Union, types.UnionType):
        members = [m for m in get_args(hint) if m is not type(None)]
        nullable = len(members) < len(get_args(hint))
        if nullable and text.lower() == "none":
            return None
        errors = []
        for member in members:
            try:
                return _convert(text, member)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(" or ".join(errors + ["none"] * nullable))
    if get_origin(hint) is Literal:
        if text not in get_args(hint):
            raise ValueError(f"one of {', '.join(map(str, get_args(hint)))}")
        return text
    if hint is bool:
        if text.lower() not in (*_TRUE, *_FALSE):
            raise ValueError("true or false")
        return text.lower() in _TRUE
    if hint in (int, float):
        try:
            return hint(text)
        except ValueError:
            raise ValueError("an integer" if hint is int else "a number") from None
    if hint is str:
        return text
    raise ValueError(f"nothing from the command line (its type is {hint})")


def settable_fields(
    config_class: type, exclude: tuple[str, ...] = ()
) -> dict[str, Any]:
    """The init fields of a config dataclass and their types, less ``exclude``.

    Args:
        config_class: a dataclass, e.g. a SAELens training config class.
        exclude: field names set some other way.
    """
    hints = get_type_hints(config_class)
    return {
        f.name: hints[f.name]
        for f in dataclasses.fields(config_class)
        if f.init and f.name not in exclude
    }


def parse_settings(
    items: list[str],
    config_class: type,
    option: str,
    exclude: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Read ``["KEY=VALUE", ...]`` into typed values of ``config_class``'s fields.

    Values are converted by the field's declared type (``int``, ``float``, ``bool``,
    ``str``, a ``Literal`` or any of them ``| None``, where ``none`` means None);
    range checks stay with the config class itself.

    Args:
        items: the settings as given.
        config_class: the config dataclass whose fields they set.
        option: the option's name, for messages (``--sae``).
        exclude: fields the command sets itself.

    Returns:
        ``{field: value}``.
    """
    allowed = settable_fields(config_class, exclude)
    settings: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or key not in allowed:
            raise ValueError(
                f"{option} {item!r} is invalid: expected KEY=VALUE with KEY a field of "
                f"{config_class.__name__}: {', '.join(sorted(allowed))}"
            )
        try:
            settings[key] = _convert(text, allowed[key])
        except ValueError as err:
            raise ValueError(
                f"{option} {item!r} is invalid: {config_class.__name__}.{key} takes "
                f"{err}"
            ) from None
    return settings
