"""One exception family for every mistake a user can make.

Each error carries a message (what was wrong) and an optional hint (what to do). The CLI prints
``str(error)`` as a single line and exits 2, so a message never contains a newline.
"""

from __future__ import annotations

__all__ = [
    "BadArgument",
    "BadCheckpoint",
    "BadImage",
    "BadOutput",
    "LayerNotFound",
    "ModelError",
    "Unsupported",
    "VizCNNError",
]


class VizCNNError(Exception):
    """Base class: a user-facing error with one message and one hint."""

    def __init__(self, message: str, hint: str | None = None):
        self.message = " ".join(str(message).split())
        self.hint = " ".join(hint.split()) if hint else None
        super().__init__(self.message)

    def __str__(self) -> str:
        return f"{self.message}; {self.hint}" if self.hint else self.message


class LayerNotFound(VizCNNError, KeyError):
    """A layer name that the model does not have."""

    # KeyError.__str__ would quote the message; keep VizCNNError's.
    __str__ = VizCNNError.__str__


class BadImage(VizCNNError):
    """An image file that is missing, unreadable or of an unsupported kind."""


class BadCheckpoint(VizCNNError):
    """A checkpoint that is missing, corrupt, untrusted or for another architecture."""


class BadArgument(VizCNNError, ValueError):
    """Any other argument that cannot work: unknown architecture, input too small, bad size."""


class BadOutput(VizCNNError, OSError):
    """An output that cannot be written: a folder that cannot be created or written to, a
    write that failed, a file or folder of another kind in the way."""

    __str__ = VizCNNError.__str__


class Unsupported(VizCNNError):
    """Something vizcnn cannot do for this model: it says what, and what would work instead
    (a receptive field wider than the measuring limit, a dilated max pool in the gradient
    method)."""


class ModelError(VizCNNError, RuntimeError):
    """The model's own forward pass failed (wrong number of input channels, an input size its
    head rejects, not enough memory): the message names the layer where it failed."""
