"""A per-layer table of a model: type, output shape, receptive field and parameter count."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from vizcnn.geometry import as_pair, trace_calls
from vizcnn.layers import list_layers, resolve_layer
from vizcnn.receptive import ReceptiveField, receptive_fields

__all__ = [
    "LayerSummary",
    "format_summary",
    "summarize",
]


@dataclass(frozen=True)
class LayerSummary:
    """One row of ``summarize``.

    Attributes:
        name: dotted layer name.
        kind: the module's class name.
        output_shape: output shape without the batch dimension, e.g. (256, 13, 13); None when
            the module is not called in the forward pass (or returns no tensor).
        params: parameters of the module and its children.
        field: receptive field of its units, None for non-spatial outputs of uncalled modules.
    """

    name: str
    kind: str
    output_shape: tuple[int, ...] | None
    params: int
    field: ReceptiveField | None


def summarize(
    model: nn.Module,
    input_size: int | Sequence[int] = 224,
    layers: Sequence[str] | None = None,
) -> list[LayerSummary]:
    """Every named module of ``model`` (containers too) in registration order, as seen by one
    forward pass of a ``(1, C, H, W)`` zero image; only ``layers`` when given (unknown names
    raise ``LayerNotFound`` before any work). The model is left as it was.

    Raises:
        VizCNNError: when a layer rejects the input size (a fixed-size head, a map that
            vanishes); its ``rows`` attribute holds the rows computed up to that layer.
    """
    input_size = as_pair(input_size, "input size")
    wanted = set(list_layers(model)) if layers is None else set(layers)
    for name in wanted:
        resolve_layer(model, name)
    calls = trace_calls(model, input_size)
    outputs = {}
    for call in calls[1:]:
        if call.name not in wanted:
            continue
        if isinstance(call.output, torch.Tensor):
            outputs[call.name] = call.output
        elif isinstance(call.output, (tuple, list)) and call.output and isinstance(
                call.output[0], torch.Tensor):
            outputs[call.name] = call.output[0]
    fields = receptive_fields(model, list(outputs), input_size, calls=calls)
    rows = []
    for name, module in model.named_modules():
        if name not in wanted:
            continue
        output = outputs.get(name)
        rows.append(LayerSummary(
            name=name,
            kind=type(module).__name__,
            output_shape=tuple(output.shape[1:]) if output is not None else None,
            params=sum(p.numel() for p in module.parameters()),
            field=fields.get(name),
        ))
    if calls.error is not None:
        calls.error.rows = [row for row in rows if row.output_shape is not None]
        raise calls.error
    return rows


def format_summary(rows: list[LayerSummary]) -> str:
    """The rows as an aligned text table."""
    table = [("layer", "type", "output", "rf", "jump", "params")]
    for row in rows:
        shape = "x".join(map(str, row.output_shape)) if row.output_shape else "(not called)"
        size, jump = row.field.describe() if row.field else ("-", "-")
        table.append((row.name, row.kind, shape, size, jump, f"{row.params:,}"))
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    lines = []
    for line in table:
        cells = [cell.ljust(width) if i < 3 else cell.rjust(width)
                 for i, (cell, width) in enumerate(zip(line, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)
