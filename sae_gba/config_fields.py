"""The one check behind every config field's error message."""


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
