"""``--quiet``: every progress bar hidden, ours and the libraries' alike.

tqdm reads its ``TQDM_DISABLE`` setting once, when it is imported, and SAELens's
trainer and SAEBench make their own bars with no switch, so :func:`progress_bars`
forces ``disable`` on every bar constructed inside the block instead, and sets
``TQDM_DISABLE`` for worker processes started inside it (they import tqdm afresh).
"""

import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager

from tqdm import std


@contextmanager
def progress_bars(enabled: bool = True) -> Iterator[None]:
    """Inside the block, show tqdm bars as usual, or with ``enabled`` False none.

    Args:
        enabled: False hides every bar (``--quiet``).
    """
    if enabled:
        yield
        return
    original = std.tqdm.__init__
    previous = os.environ.get("TQDM_DISABLE")

    @functools.wraps(original)
    def quiet_init(self: std.tqdm, *args: object, **kwargs: object) -> None:
        kwargs["disable"] = True
        original(self, *args, **kwargs)

    std.tqdm.__init__ = quiet_init  # type: ignore[method-assign]
    os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        std.tqdm.__init__ = original  # type: ignore[method-assign]
        if previous is None:
            del os.environ["TQDM_DISABLE"]
        else:
            os.environ["TQDM_DISABLE"] = previous
