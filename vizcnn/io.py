"""Writing outputs safely: a file or folder appears complete or not at all, also across a kill.

Every output is written under a temporary name beside its target (``.NAME.PID-RANDOM.partial``)
and moved into place when complete. Replacing an earlier folder takes three renames, each
atomic: the old output moves aside (``.NAME.vizcnn-old``), the new one moves into place, the
old one is deleted. A kill at any moment leaves the old or the new output whole; the next write
to the same target (``recover``) finishes or undoes the interrupted replace and removes the
partial outputs of processes that no longer run.

An output whose name is a symbolic link is written through it: the file or folder the link
leads to is replaced (the same way), the link stays. A write that fails (a full disk, a file
too large, a read-only folder) is one ``BadOutput`` line naming the output and its folder,
and leaves nothing: no partial file or folder, the earlier output untouched.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

from vizcnn.errors import BadArgument, BadOutput, VizCNNError

__all__ = [
    "atomic_path",
    "check_outside",
    "check_replaceable",
    "file_target",
    "output_errors",
    "output_path",
    "recover",
    "save_tensors",
    "writable_parent",
]


def output_path(target: str | os.PathLike) -> Path:
    """Where an output named ``target`` is written: ``target`` itself, or, where it is a
    symbolic link, the path the link leads to (which may not exist yet)."""
    target = Path(target)
    if not target.is_symlink():
        return target
    try:
        return target.resolve()
    except (RuntimeError, OSError):  # a loop of links
        raise BadOutput(f"'{target}' is a symbolic link that leads in a loop",
                        "choose another --out") from None


def check_outside(output: str | os.PathLike, folder: str | os.PathLike | None) -> None:
    """Refuse an output inside the image ``folder`` it is made from (None: not a folder):
    the next run over that folder would read the output's images as data."""
    if folder is None:
        return
    written, root = output_path(output).resolve(), Path(folder).resolve()
    if written == root or root in written.parents:
        raise BadArgument(f"the output '{output}' is inside the data folder '{folder}', so a "
                          "later run over that folder would read it as data",
                          f"choose an --out outside '{folder}'")


def writable_parent(target: str | os.PathLike, *, create: bool = False) -> Path:
    """Check, before long work, that the folder that will hold ``target`` can be written:
    it is a writable folder, or the nearest folder above it that exists is (the missing ones
    are created when the output is written, so a run that fails creates none). With
    ``create``, create it now. Returns the folder."""
    parent = output_path(target).parent
    if create:
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise BadOutput(f"cannot create output folder '{parent}': {error.strerror}",
                            "choose another --out") from None
    existing = parent
    while not (existing.exists() or existing.is_symlink()) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise BadOutput(f"cannot create output folder '{parent}': '{existing}' is not a "
                        "folder", "choose another --out")
    if not os.access(existing, os.W_OK):
        raise BadOutput(f"output folder '{existing}' is not writable", "choose another --out")
    return parent


_KILL_AT = "VIZCNN_TEST_KILL_AT"  # test-only: SIGKILL this process at the named step


def _step(name: str) -> None:
    """A step of a replace; the crash tests kill the process here (``VIZCNN_TEST_KILL_AT``)."""
    if os.environ.get(_KILL_AT) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _aside(target: Path) -> Path:
    return target.with_name(f".{target.name}.vizcnn-old")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def recover(target: str | os.PathLike) -> None:
    """Clean up after an interrupted write of ``target``: an old output left aside is put
    back (the new one never arrived) or deleted (the new one is in place), and partial
    outputs of processes that no longer run are removed."""
    target = Path(target)
    aside = _aside(target)
    if aside.exists() or aside.is_symlink():
        if target.exists():
            _remove(aside)
        else:
            os.replace(aside, target)
    if not target.parent.is_dir():
        return
    prefix = f".{target.name}."
    for partial in target.parent.iterdir():
        name = partial.name
        if not (name.startswith(prefix) and name.endswith(".partial")):
            continue
        owner = name[len(prefix):].split("-", 1)[0]
        if not (owner.isdigit() and _running(int(owner))):
            _remove(partial)


@contextlib.contextmanager
def output_errors(target: str | os.PathLike) -> Iterator[None]:
    """A block whose failed writes (a full disk, a file too large, a read-only folder) are
    one ``BadOutput`` line naming ``target``, the output they were for (such as the work
    files written beside a gallery before the gallery itself)."""
    try:
        yield
    except OSError as error:
        if isinstance(error, VizCNNError) or error.errno not in _WRITE_ERRORS:
            raise
        raise _write_failed(output_path(target), error) from None


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it is moved onto ``target`` (an
    earlier output is replaced as the module's text says), on any error (or Ctrl-C) it is
    deleted, so ``target`` is never half-written, even if the process is killed. Works for a
    file or a folder written at the yielded path. A write that fails for want of space (or
    of permission, or on a read-only disk) is one ``BadOutput`` line."""
    target = output_path(target)
    parent = writable_parent(target, create=True)
    recover(target)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}-", suffix=".partial",
                                    dir=parent)
    except OSError as error:  # a folder that takes no file, though it says it is writable
        raise _write_failed(target, error) from None  # (/proc, a refusing network mount)
    os.close(fd)
    os.unlink(name)
    temporary = Path(name)
    try:
        yield temporary
        _step("written")
        _replace(temporary, target)
    except VizCNNError:
        raise
    except OSError as error:
        if error.errno not in _WRITE_ERRORS:
            raise  # not the output's: e.g. an input that vanished while the output was written
        raise _write_failed(target, error) from None
    finally:
        _remove(temporary)


# errors of writing an output: the disk, the quota, the file size limit, the permissions
_WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES,
                 errno.EPERM}


def _write_failed(target: Path, error: OSError) -> BadOutput:
    """The one line for a failed write, naming the output as the user named it."""
    named = _as_named(target)
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return BadOutput(f"cannot write '{named}': the disk that holds '{named.parent}' is "
                         "full", "free some space there, or choose another --out")
    return BadOutput(f"cannot write '{named}': {error.strerror}",
                     "choose another --out, or check the folder's disk and permissions")


# vizcnn's own hidden folders beside an output NAME: being written, a scan's state, aside
_TEMPORARY = re.compile(r"\.(.+)\.(\d+-[^.]+\.partial|scan-state|vizcnn-old)")


def _as_named(path: Path) -> Path:
    """The output that ``path`` is part of, as the user named it: NAME for anything inside
    ``.NAME.PID-RANDOM.partial`` or ``.NAME.scan-state``."""
    for i, part in enumerate(path.parts):
        match = _TEMPORARY.fullmatch(part)
        if match:
            return Path(*path.parts[:i], match.group(1))
    return path


def save_tensors(obj: object, path: str | os.PathLike) -> None:
    """``torch.save(obj)`` to ``path`` (a temporary of ``atomic_path``), serialised in memory
    first: a full disk is then an ``OSError`` with its errno, not torch's
    "unexpected pos" RuntimeError."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    Path(path).write_bytes(buffer.getbuffer())


def file_target(target: str | os.PathLike) -> Path:
    """``target`` as the path of a file output: refused when it is an existing folder (which
    writing the file would replace), its folder created and checked writable."""
    target = Path(target)
    if target.is_dir():
        raise BadOutput(f"'{target}' is a folder, not a file name", "give a file name")
    writable_parent(target)
    return target


def _replace(new: Path, target: Path) -> None:
    """Move ``new`` onto ``target``: one atomic rename for a file over a file (or nothing),
    else old aside, new into place, old deleted. A file never replaces a folder."""
    if new.is_file():
        file_target(target)  # never over a folder
    if not (target.exists() or target.is_symlink()) or (new.is_file() and target.is_file()):
        os.replace(new, target)
        return
    aside = _aside(target)
    os.replace(target, aside)
    _step("aside")
    os.replace(new, target)
    _step("placed")
    _remove(aside)


def check_replaceable(folder: str | os.PathLike, marker: str, what: str) -> Path:
    """Refuse an output folder that exists, is not empty, and lacks ``marker`` (the file that
    vizcnn's own output of this kind holds): replacing it would delete the user's files. A
    link is checked where it leads (the output is written through it).

    Args:
        folder: the output folder that will be replaced whole.
        marker: a path relative to the folder, e.g. "report.txt".
        what: the kind of output, for the message ("demo", "top-k").
    """
    folder = Path(folder)
    written = output_path(folder)
    recover(written)
    if written.exists() and (not written.is_dir() or
                             (any(written.iterdir()) and not (written / marker).exists())):
        raise BadArgument(f"'{folder}' exists and is not a vizcnn {what} output",
                          f"choose another --out (vizcnn replaces its own earlier {what} "
                          "output only)")
    return folder
