"""Argument checks that several probes share, each written once, each a one-line
``BadArgument`` that says what was wrong."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from vizcnn.errors import BadArgument

__all__ = ["channel_index", "channel_indices", "check_channels", "feature_maps", "positive_int"]


def positive_int(value: Any, what: str) -> int:
    """``value`` if it is a positive integer (not a bool), else a BadArgument naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadArgument(f"{what} must be a positive integer, got {value!r}")
    return value


def check_channels(channels: torch.Tensor | Sequence[int] | int, count: int,
                   layer: str | None = None) -> None:
    """Refuse channel indices outside 0 .. count - 1 of ``layer`` (None: "the layer")."""
    values = torch.as_tensor(channels).flatten()
    if values.numel() == 0:
        return
    bad = values[(values < 0) | (values >= count)]
    if len(bad):
        owner = "the layer" if layer is None else repr(layer)
        raise BadArgument(f"channel {int(bad[0])} out of range: {owner} has {count} channels "
                          f"(0-{count - 1})")


def channel_index(channel: Any) -> int:
    """``channel`` as an int if it is one integer (a Python int or a one-element integer
    tensor; not a bool, not a float that would be truncated)."""
    if isinstance(channel, bool) or not isinstance(channel, (int, torch.Tensor)) or (
            isinstance(channel, torch.Tensor) and (channel.numel() != 1
                                                   or channel.is_floating_point())):
        raise BadArgument(f"channel must be an integer, got {channel!r}")
    return int(channel)


def channel_indices(channels: Any) -> torch.Tensor:
    """(P,) long channel indices from an integer, a sequence or a tensor of integers. Floats
    and bools are refused: a silently truncated 1.7 would name the wrong channel."""
    values = torch.as_tensor(channels).flatten()
    if values.numel() == 0:
        return values.long()
    if values.dtype == torch.bool or values.is_floating_point() or values.is_complex():
        raise BadArgument(f"channels must be integers, got {channels!r}")
    return values.long()


def feature_maps(output: Any, layer: str, *, flat_ok: bool = False) -> torch.Tensor:
    """``output`` if it is a batch of feature maps (N, C, H, W) (or, with ``flat_ok``, of
    feature vectors (N, F)), else a BadArgument that names the layer."""
    dims = (2, 4) if flat_ok else (4,)
    if isinstance(output, torch.Tensor) and output.dim() in dims:
        return output
    shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
    raise BadArgument(f"layer {layer!r} has no spatial output: no feature maps (its output is "
                      f"{shape})", "pick a conv or pool layer")
