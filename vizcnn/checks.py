"""Argument checks that several probes share, each written once, each a one-line
``BadArgument`` that says what was wrong."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from vizcnn.errors import BadArgument, BadCheckpoint

__all__ = [
    "channel_index",
    "channel_indices",
    "check_channels",
    "describe_non_finite",
    "feature_maps",
    "non_finite_weights",
    "positive_int",
    "require_finite_weights",
]


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


def non_finite_weights(model: torch.nn.Module) -> list[tuple[str, int, int, int]]:
    """``(name, NaN count, inf count, size)`` of each parameter or buffer of ``model`` that
    holds a NaN or an infinity, in the model's order; [] for a model whose weights are all
    finite."""
    found = []
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        if not tensor.is_floating_point() or bool(torch.isfinite(tensor).all()):
            continue
        nan = int(torch.isnan(tensor).sum())
        found.append((name, nan, int((~torch.isfinite(tensor)).sum()) - nan, tensor.numel()))
    return found


def describe_non_finite(found: list[tuple[str, int, int, int]]) -> str:
    """'features.0.weight holds 9,408 NaN of 9,408 values (and 2 more tensors)'."""
    name, nan, inf, size = found[0]
    counts = " and ".join(f"{count:,} {kind}" for count, kind in ((nan, "NaN"), (inf, "inf"))
                          if count)
    more = f" (and {len(found) - 1} more tensor{'s' if len(found) > 2 else ''})" \
        if len(found) > 1 else ""
    return f"{name} holds {counts} of {size:,} values{more}"


def require_finite_weights(model: torch.nn.Module, what: str) -> None:
    """Refuse, in one line, a model (``what``: "the model 'x.pt'", "checkpoint 'x.pt'")
    whose weights hold NaN or infinity: every picture of it would be of NaN."""
    found = non_finite_weights(model)
    if found:
        raise BadCheckpoint(f"{what} has non-finite weights: {describe_non_finite(found)}",
                            "give a checkpoint from before the training diverged (vizcnn "
                            "doctor names every such layer)")
