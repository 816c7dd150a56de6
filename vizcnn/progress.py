"""Progress bars for long work: tqdm, except that a bar whose block ends with an exception
erases itself, so that a failed command leaves one line on the terminal (its error), not a
half-drawn bar above it. A bar that finishes stays, as tqdm leaves it."""

from __future__ import annotations

from typing import Any

from tqdm import tqdm

__all__ = ["progress_bar"]


class progress_bar(tqdm):  # noqa: N801 - used as tqdm is
    """``tqdm``, erased when its ``with`` block ends with an exception."""

    def __exit__(self, kind: Any, value: Any, traceback: Any) -> Any:
        if kind is not None:
            self.leave = False
        return super().__exit__(kind, value, traceback)
