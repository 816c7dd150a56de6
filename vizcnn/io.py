"""Writing outputs safely: a file or folder appears complete or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from vizcnn.errors import BadArgument


def writable_parent(target: str | os.PathLike) -> Path:
    """Create the folder that will hold ``target`` and check it is writable (fail early,
    before long work)."""
    target = Path(target)
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise BadArgument(f"cannot create output folder '{parent}': {error.strerror}") from None
    if not os.access(parent, os.W_OK):
        raise BadArgument(f"output folder '{parent}' is not writable",
                          "choose another --out")
    return parent


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it is renamed onto ``target``, on
    any error (or Ctrl-C) it is deleted, so ``target`` is never half-written. Works for a file
    or a folder written at the yielded path."""
    target = Path(target)
    parent = writable_parent(target)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=parent)
    os.close(fd)
    os.unlink(name)
    temporary = Path(name)
    try:
        yield temporary
        if target.is_dir() and temporary.is_dir():
            shutil.rmtree(target)
        os.replace(temporary, target)
    finally:
        if temporary.is_dir():
            shutil.rmtree(temporary, ignore_errors=True)
        elif temporary.exists():
            temporary.unlink()


def check_replaceable(folder: str | os.PathLike, marker: str, what: str) -> Path:
    """Refuse an output folder that exists, is not empty, and lacks ``marker`` (the file that
    vizcnn's own output of this kind holds): replacing it would delete the user's files.

    Args:
        folder: the output folder that will be replaced whole.
        marker: a path relative to the folder, e.g. "report.txt".
        what: the kind of output, for the message ("demo", "top-k").
    """
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or
                            (any(folder.iterdir()) and not (folder / marker).exists())):
        raise BadArgument(f"'{folder}' exists and is not a vizcnn {what} output",
                          f"choose another --out (vizcnn replaces its own earlier {what} "
                          "output only)")
    return folder
