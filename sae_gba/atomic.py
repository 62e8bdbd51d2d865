"""Writing results so that a killed writer leaves the old result or none, never half.

Everything is written to a temporary sibling (same folder, so the same file system)
and renamed into place; a rename is atomic on POSIX file systems.
"""

import os
import shutil
from pathlib import Path


def write_text_atomically(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary sibling file.

    Args:
        path: the file to (re)write; its folder must exist.
        text: the contents.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def replace_folder(tmp: str | Path, path: str | Path) -> Path:
    """Move the finished folder ``tmp`` to ``path``, replacing what is there.

    The old folder is renamed aside first (a folder cannot be renamed over a
    non-empty one), so a kill in between leaves no folder at ``path``, never a mix.

    Args:
        tmp: the complete new folder (a sibling of ``path``).
        path: where it goes.
    """
    tmp, path = Path(tmp), Path(path)
    old = path.with_name(f".{path.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    return path
