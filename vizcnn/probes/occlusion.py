"""Occlusion probes (Zeiler & Fergus, section 4.2, Fig. 7): which part of the image a decision
and a feature map depend on.

A square (or rectangle) of ``fill`` slides over the image, top-left corners at
``range(0, H - window + 1, stride)`` in each axis. At every position we record the probability
of the target class (panel d), the most probable label (panel e) and, for a chosen feature map,
its total activation (panel b).

Two engines give the same numbers:

- **incremental** (Krypton, Nakandala et al., SIGMOD 2019): the model's graph is traced with
  ``torch.fx``; the clean image runs once, and for each occluder only the region that the
  occluder can change is recomputed, layer by layer (a conv of kernel K and stride S changes
  the outputs whose windows touch the changed inputs), from the clean values around it. Convs,
  max and average pools, pointwise layers (every elementwise nonlinearity, module or function:
  ReLU, PReLU, LeakyReLU, ELU, GELU, SiLU, ...; batch norm, dropout, LRN) and residual adds
  stay incremental; anything else (flatten, linear, concatenation) gets full tensors again:
  the clean value with the changed region pasted in. Many occluders run as one batch.
- **naive**: occluded copies of the image through the whole model, in batches. Used where the
  model cannot be traced, and as the reference.

``engine="auto"`` (the default) picks the faster: where the incremental engine's first batch
needs at most a quarter of the naive engine's multiply-adds it runs alone; otherwise the two
take turns on real batches, timed per position, and the faster occludes the rest (``_Race``).
The result's ``engine_note`` says which ran, why, and the incremental engine's share of the
multiply-adds (its speed-up ceiling is the inverse).

The approximate mode (opt-in) follows Krypton's two ideas. ``approx=True`` is the adaptive
drill-down: compute every second row and column of the grid exactly, then the whole of each
cell whose corners disagree (probabilities more than 0.05 apart, or different labels);
interpolate the other cells, check each at its centre, and compute exactly every cell (and its
neighbours) where the check is more than 0.05 off, until the checks agree. ``approx=τ`` (a
fraction) also caps the recomputed region at τ of each map's side (the projective-field
threshold): changes further out are dropped. The result reports the largest deviation from
the exact probabilities on a sample of positions it re-checks.
"""

from __future__ import annotations

import json
import math
import operator
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from vizcnn.checks import channel_index, check_channels, feature_maps, positive_int
from vizcnn.crops import crop_batch, paste_batch
from vizcnn.display import ShowsItself
from vizcnn.errors import BadArgument
from vizcnn.geometry import Geometry, as_pair, geometry_of, trace_calls
from vizcnn.hooks import (
    capture,
    model_device,
    preserved_state,
    require_batch,
    run_forward,
    strongest_channels,
)
from vizcnn.io import atomic_path, save_tensors
from vizcnn.layers import ACTIVATION_FUNCTIONS, POINTWISE, resolve_layer
from vizcnn.models import Preprocessing, normalisation_of
from vizcnn.probes import OutputSelector, class_labels, class_scores
from vizcnn.progress import progress_bar

__all__ = [
    "OcclusionMaps",
    "occlusion",
]

DRILL_FACTOR = 2  # approximate mode: the coarse grid takes every 2nd row and column
DRILL_TOLERANCE = 0.05  # ... and refines cells whose corner probabilities differ more
CHECK_TOLERANCE = 0.05  # ... or whose centre differs more from the interpolation
_CHECKED = 8  # approximated positions re-checked exactly per image in approximate mode


@dataclass(frozen=True)
class OcclusionMaps(ShowsItself):
    """The occlusion maps of a batch of images, over the grid of occluder positions.

    Attributes:
        prob: (N, gy, gx) probability of each image's target class.
        label: (N, gy, gx) long, the most probable class.
        activation: (N, gy, gx) total activation of the feature map ``channel`` of ``layer``
            (float64), or None when no layer was given.
        positions: (gy, gx, 2) long, the occluder's top-left corner (y, x).
        window: (h, w) of the occluder; stride: (y, x) step between positions.
        target: (N,) the class whose probability ``prob`` holds.
        clean_prob, clean_label: (N,) the same for the image without occluder.
        clean_activation: (N,) or None.
        layer: the feature maps' layer, or None.
        channel: (N,) the feature map per image (chosen as the strongest when not given).
        engine: "incremental" or "naive"; engine_note says why this engine ran and, for
            the incremental one, its multiply-adds as a share of the naive engine's.
        approx: the region cap of the approximate mode (None: no cap).
        max_deviation: approximate mode only: the largest |prob - exact prob| over the
            re-checked positions (and their count in ``checked``).
        computed: positions actually computed (fewer than the grid's in approximate mode).
    """

    prob: torch.Tensor
    label: torch.Tensor
    activation: torch.Tensor | None
    positions: torch.Tensor
    window: tuple[int, int]
    stride: tuple[int, int]
    target: torch.Tensor
    clean_prob: torch.Tensor
    clean_label: torch.Tensor
    clean_activation: torch.Tensor | None = None
    layer: str | None = None
    channel: torch.Tensor | None = None
    engine: str = "incremental"
    engine_note: str = ""
    approx: float | None = None
    max_deviation: float | None = None
    checked: int = 0
    computed: int = 0

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``maps.pt`` (every tensor), one PNG per map and image (probability,
        label, activation) and ``manifest.json`` into ``folder``, which is replaced whole."""
        from vizcnn.render.grid import occlusion_map_png

        folder = Path(folder)
        tensors = {name: getattr(self, name) for name in
                   ("prob", "label", "activation", "positions", "target", "clean_prob",
                    "clean_label", "clean_activation", "channel")}
        with atomic_path(folder) as staging:
            staging.mkdir()
            save_tensors({k: v.cpu() if isinstance(v, torch.Tensor) else v
                          for k, v in tensors.items()}, staging / "maps.pt")
            for n in range(len(self.prob)):
                occlusion_map_png(self.prob[n], staging / f"prob_{n}.png", low=0.0, high=1.0)
                occlusion_map_png(self.label[n], staging / f"label_{n}.png", categorical=True)
                if self.activation is not None:
                    occlusion_map_png(self.activation[n], staging / f"activation_{n}.png")
            manifest = {
                "window": list(self.window), "stride": list(self.stride),
                "grid": list(self.prob.shape[1:]), "engine": self.engine,
                "engine_note": self.engine_note, "layer": self.layer,
                "channel": None if self.channel is None else self.channel.tolist(),
                "target": self.target.tolist(), "clean_prob": self.clean_prob.tolist(),
                "clean_label": self.clean_label.tolist(), "approx": self.approx,
                "max_deviation": self.max_deviation, "checked": self.checked,
            }
            (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))
        return folder


# --------------------------------------------------------------------------- arguments


def _grid_positions(size: tuple[int, int], window: tuple[int, int], stride: tuple[int, int]
                    ) -> tuple[list[int], list[int]]:
    """The occluder's top-left corners per axis: ``range(0, H - window + 1, stride)``."""
    if window[0] > size[0] or window[1] > size[1]:
        raise BadArgument(f"window {window[0]}x{window[1]} is larger than the image "
                          f"{size[0]}x{size[1]}", "use a smaller --window")
    return (list(range(0, size[0] - window[0] + 1, stride[0])),
            list(range(0, size[1] - window[1] + 1, stride[1])))


def _fill_tensor(fill: Any, channels: int, like: torch.Tensor) -> torch.Tensor:
    """(C, 1, 1) fill values in the model's input space (normalised)."""
    if fill is None:
        fill = 0.0
    values = torch.as_tensor(fill, dtype=like.dtype, device=like.device).flatten()
    if values.numel() not in (1, channels) or not torch.isfinite(values).all():
        raise BadArgument(f"fill must be one number or one per channel ({channels}), "
                          f"got {fill!r}")
    return values.expand(channels).reshape(channels, 1, 1).clone()


# --------------------------------------------------------------------------- incremental engine


@dataclass
class _Patched:
    """A batch of feature maps that equal ``clean`` (1, C, H, W) except in one box each:
    ``values`` (B, C, h, w) at top-left ``start`` (B, 2), inside the map."""

    clean: torch.Tensor
    values: torch.Tensor
    start: torch.Tensor

    def full(self) -> torch.Tensor:
        """(B, C, H, W): the clean map with each box pasted in."""
        out = self.clean.expand(len(self.values), *self.clean.shape[1:]).clone()
        paste_batch(self.values, self.start, (0, 0), out, add=False)
        return out

    def crop(self, start: torch.Tensor, length: tuple[int, int], fill: float) -> torch.Tensor:
        """(B, C, *length) at ``start`` (B, 2): clean values, the box pasted over them, and
        ``fill`` outside the map."""
        rows = torch.zeros(len(start), dtype=torch.long, device=start.device)
        out = crop_batch(self.clean, rows, start, length, fill)
        paste_batch(self.values, self.start - start, (0, 0), out, add=False)
        return out


_ADD = {operator.add, operator.iadd, torch.add}


def _macs(module: nn.Module, output: Any) -> int:
    """Multiply-adds of a conv or linear module that produced ``output`` (0 for others):
    each output element costs one weight row."""
    if isinstance(module, (nn.Conv2d, nn.Linear)) and isinstance(output, torch.Tensor):
        return output.numel() * module.weight[0].numel()
    return 0


class _Recorder(torch.fx.Interpreter):
    """Runs the traced model on the clean image and keeps a clone of every node's value
    (clones: a later in-place op must not change what we keep); counts the multiply-adds
    of its convs and linear layers in ``macs``."""

    def __init__(self, graph_module: torch.fx.GraphModule):
        super().__init__(graph_module)
        self.values: dict[torch.fx.Node, Any] = {}
        self.macs = 0

    def run_node(self, node: torch.fx.Node) -> Any:
        value = super().run_node(node)
        if node.op == "call_module":
            self.macs += _macs(self.fetch_attr(node.target), value)
        self.values[node] = value.clone() if isinstance(value, torch.Tensor) else value
        return value


class _Incremental(torch.fx.Interpreter):
    """Runs the traced model on a batch of occluders, recomputing only changed regions.

    ``clean`` holds the clean image's value of every node; ``cap`` is the approximate mode's
    largest region side as a fraction of the map's (None: exact); ``layer_node`` is the node
    whose channel total is recorded in ``activation``."""

    def __init__(self, graph_module, clean, cap: float | None, layer_node, channel: int | None):
        super().__init__(graph_module)
        self.clean = clean
        self.cap = cap
        self.layer_node = layer_node
        self.channel = channel
        self.activation: torch.Tensor | None = None
        self.node: torch.fx.Node | None = None
        self.macs = 0  # of the convs and linear layers run, on crops or whole

    def run_node(self, node: torch.fx.Node) -> Any:
        self.node = node
        value = super().run_node(node)
        if node is self.layer_node:
            self.activation = _channel_total(value, self.clean[node], self.channel)
        return value

    # ------------------------------------------------------------------ calls

    def call_module(self, target, args, kwargs):
        module = self.fetch_attr(target)
        patched = [a for a in args if isinstance(a, _Patched)]
        if patched and len(args) == 1 and not kwargs:
            source = args[0]
            geometry = geometry_of(module)
            if geometry is not None and geometry.exact_on_crops:
                return self._spatial(module, geometry, source)
            if isinstance(module, POINTWISE):
                return self._pointwise(source, module)
            if isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)) and \
                    self.clean[self.node].shape == source.clean.shape:
                return _Patched(self.clean[self.node], source.values, source.start)
        value = super().call_module(target, _materialised(args), _materialised(kwargs))
        self.macs += _macs(module, value) if patched else 0
        return value

    def call_function(self, target, args, kwargs):
        if any(isinstance(a, _Patched) for a in args):
            if target in _ADD and len(args) == 2 and not kwargs:
                return self._add(*args)
            if _is_activation_call(target, args, kwargs):
                return self._pointwise(args[0], lambda v: target(v, *args[1:], **kwargs))
        return super().call_function(target, _materialised(args), _materialised(kwargs))

    def call_method(self, target, args, kwargs):
        if isinstance(args[0], _Patched):
            if target in ("add", "add_", "__add__", "__iadd__") and len(args) == 2 \
                    and not kwargs:
                return self._add(*args)
            if _is_activation_call(target, args, kwargs):
                method = getattr(torch.Tensor, target)
                return self._pointwise(args[0], lambda v: method(v, *args[1:], **kwargs))
        return super().call_method(target, _materialised(args), _materialised(kwargs))

    # ------------------------------------------------------------------ rules

    def _pointwise(self, source: _Patched, function) -> _Patched:
        # on a copy: an in-place nonlinearity must not write into a value another node reads
        return _Patched(self.clean[self.node], function(source.values.clone()), source.start)

    def _spatial(self, module: nn.Module, geometry: Geometry, source: _Patched) -> _Patched:
        """A conv or pool: the outputs whose windows touch the changed box, from the input
        around them (padded as the layer pads), without padding."""
        clean_out = self.clean[self.node]
        out_size = clean_out.shape[-2:]
        box = torch.tensor(source.values.shape[-2:], device=source.start.device)
        low, high = geometry.outputs_touched(source.start, source.start + box - 1)
        length, starts = [], []
        for axis in range(2):
            low_a = low[:, axis].clamp(0, out_size[axis] - 1)
            high_a = high[:, axis].clamp(0, out_size[axis] - 1)
            size = max(1, min(int((high_a - low_a).max()) + 1, out_size[axis]))
            if self.cap is not None:
                size = min(size, max(1, math.ceil(self.cap * out_size[axis])))
                low_a = torch.div(low_a + high_a + 1 - size, 2, rounding_mode="floor")
            starts.append(low_a.clamp(0, out_size[axis] - size))
            length.append(size)
        start = torch.stack(starts, dim=1)
        crops = source.crop(geometry.input_start(start), geometry.input_length(tuple(length)),
                            geometry.pad_value)
        if geometry.kind == "conv":
            values = F.conv2d(crops, module.weight, module.bias, geometry.stride, 0,
                              geometry.dilation, module.groups)
            self.macs += _macs(module, values)
        elif geometry.kind == "max":
            values = F.max_pool2d(crops, geometry.kernel, geometry.stride, 0, geometry.dilation)
        else:
            values = F.avg_pool2d(crops, geometry.kernel, geometry.stride, 0,
                                  count_include_pad=True)
        return _Patched(clean_out, values, start)

    def _add(self, a: Any, b: Any) -> Any:
        if not (isinstance(a, _Patched) and isinstance(b, _Patched)):
            if isinstance(b, (int, float)) or isinstance(a, (int, float)):
                scalar, source = (b, a) if isinstance(b, (int, float)) else (a, b)
                return _Patched(self.clean[self.node], source.values + scalar, source.start)
            return _materialised(a) + _materialised(b)
        size = a.clean.shape[-2:]
        first = torch.minimum(a.start, b.start)
        ends = torch.maximum(a.start + torch.tensor(a.values.shape[-2:], device=a.start.device),
                             b.start + torch.tensor(b.values.shape[-2:], device=b.start.device))
        length = tuple(min(int((ends - first)[:, axis].max()), size[axis]) for axis in range(2))
        start = torch.stack([first[:, axis].clamp(0, size[axis] - length[axis])
                             for axis in range(2)], dim=1)
        values = a.crop(start, length, 0.0) + b.crop(start, length, 0.0)
        return _Patched(self.clean[self.node], values, start)


def _is_activation_call(target: Any, args: tuple, kwargs: dict) -> bool:
    """An elementwise nonlinearity applied to a patched map (its first argument) alone."""
    name = target if isinstance(target, str) else getattr(target, "__name__", None)
    return (name in ACTIVATION_FUNCTIONS and isinstance(args[0], _Patched)
            and not any(isinstance(a, _Patched) for a in (*args[1:], *kwargs.values())))


def _materialised(value: Any) -> Any:
    """Full tensors in place of every ``_Patched`` in a (nested) argument."""
    if isinstance(value, _Patched):
        return value.full()
    if isinstance(value, (tuple, list)):
        return type(value)(_materialised(v) for v in value)
    if isinstance(value, dict):
        return {k: _materialised(v) for k, v in value.items()}
    return value


def _channel_total(value: Any, clean: torch.Tensor, channel: int) -> torch.Tensor:
    """(B,) total of one channel, float64; for a patched map: the clean total corrected by
    the box."""
    if isinstance(value, _Patched):
        rows = torch.zeros(len(value.start), dtype=torch.long, device=value.start.device)
        before = crop_batch(clean, rows, value.start, tuple(value.values.shape[-2:]))
        change = (value.values[:, channel].double().sum((1, 2))
                  - before[:, channel].double().sum((1, 2)))
        return clean[0, channel].double().sum() + change
    return value[:, channel].double().sum((1, 2))


def _layer_node(graph_module: torch.fx.GraphModule, layer: str | None) -> torch.fx.Node | None:
    """The node that gives ``layer``'s output at its last call (as ``capture`` keeps the last
    call): the layer's own node for a leaf module, else the last node traced inside the
    container (fx records each node's module scope in ``nn_module_stack``)."""
    if layer is None:
        return None
    nodes = [n for n in graph_module.graph.nodes if n.op == "call_module" and n.target == layer]
    if not nodes:
        nodes = [n for n in graph_module.graph.nodes
                 if layer in {key.split("@")[0] for key in n.meta.get("nn_module_stack", {})}]
    return nodes[-1] if nodes else None


def _trace(model: nn.Module, layer: str | None) -> tuple[torch.fx.GraphModule | None, str]:
    """The model's fx graph, or None with the reason the incremental engine cannot run."""
    try:
        graph_module = torch.fx.symbolic_trace(model)
    except Exception as error:  # noqa: BLE001 - any tracing failure means: run naively
        return None, f"torch.fx cannot trace {type(model).__name__} ({type(error).__name__})"
    placeholders = [n for n in graph_module.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        return None, "the model's forward takes more than one input"
    if layer is not None and _layer_node(graph_module, layer) is None:
        return None, f"layer {layer!r} is not a module call in the traced graph"
    return graph_module, ""


# --------------------------------------------------------------------------- the probe


def occlusion(
    model: nn.Module,
    x: torch.Tensor,
    *,
    window: int | Sequence[int],
    stride: int | Sequence[int],
    fill: float | Sequence[float] | None = None,
    target: int | Sequence[int] | None = None,
    layer: str | None = None,
    channel: int | None = None,
    batch_size: int | None = None,
    approx: bool | float = False,
    engine: str = "auto",
    progress: bool = True,
    output: OutputSelector = None,
    preprocessing: Preprocessing | None = None,
) -> OcclusionMaps:
    """Slide an occluder over each image and record what changes (Zeiler & Fergus Fig. 7).

    Args:
        model: a classifier; it is left as it was (modes, flags, no hooks).
        x: (N, C, H, W) model input (normalised).
        window: occluder side, or (h, w).
        stride: step between positions, or (y, x).
        fill: the occluder's value in the normalised input, one number or one per channel;
            default 0, the data set's mean (gray), which needs the model's normalisation to
            be known (its preprocessing record, or ``preprocessing``).
        target: the class whose probability is mapped, per image or one for all; default: the
            class predicted for the clean image.
        layer: a layer with feature maps, for the activation map (panel b).
        channel: the feature map; default: the strongest one of the clean image (largest
            activation), reported in ``channel``.
        batch_size: occluded positions computed at once; default: as many as keep the
            largest feature map of a batch within ``BATCH_BYTES`` (8 to 256): a small
            network pays per batch, not per position.
        approx: False (exact), True (adaptive drill-down) or a fraction in (0, 1] (drill-down
            and the region cap at that fraction of each map's side); see the module's text.
        engine: "auto" (the faster of the two, see ``_faster_engine``; incremental in the
            approximate mode), "incremental" or "naive".
        progress: show a tqdm bar over the positions.
        output: selects the class scores from a model that returns a tuple or dict (an
            index, a key or a callable; see ``probes.class_scores``).
        preprocessing: the model's preprocessing, where the model does not carry it.

    Returns:
        ``OcclusionMaps``.
    """
    require_batch(x)
    if fill is None:  # the data's mean gray is zero only after the model's own normalisation
        normalisation_of(model, preprocessing, "occlusion's default fill (the data's mean gray)")
    window, stride = as_pair(window, "window"), as_pair(stride, "stride")
    if batch_size is not None:
        positive_int(batch_size, "batch_size")
    drill_down, cap = _approx_settings(approx)
    if engine not in ("auto", "incremental", "naive"):
        raise BadArgument(f"engine must be auto, incremental or naive, not {engine!r}")
    if cap is not None and engine == "naive":
        raise BadArgument("the region cap (approx=FRACTION) needs the incremental engine",
                          "use approx=True, or engine='auto'")
    tops, lefts = _grid_positions(tuple(x.shape[-2:]), window, stride)
    if layer is not None:
        resolve_layer(model, layer)
    x = x.to(model_device(model))
    positions = torch.tensor([[(t, left) for left in lefts] for t in tops], device=x.device)
    fill = _fill_tensor(fill, x.shape[1], x)
    with preserved_state(model, eval_mode=True), torch.no_grad():
        runs, note = _engine_runs(model, x, layer, output, engine, cap is not None)
        occluder = _Occluder(window, fill, cap, batch_size or _batch_size(model, x))
        clean_logits = torch.cat([run.logits for run in runs])
        clean_maps = None if layer is None else torch.cat([run.maps for run in runs])
        targets = _targets(target, clean_logits)
        channels = _channels(channel, clean_maps, layer)
        for n, run in enumerate(runs):
            run.channel = None if channels is None else int(channels[n])
        race = None
        if engine == "auto" and runs[0].engine == "incremental" and cap is None:
            runs, race = _raced(model, runs, layer, output)
        bar = progress_bar(total=len(x) * positions[..., 0].numel(), desc="occlusion",
                           unit="pos", disable=not progress)
        with bar:
            found = [_occlude_image(run, positions, occluder, int(targets[n]), drill_down, bar)
                     for n, run in enumerate(runs)]
        clean_p = torch.softmax(clean_logits.float(), dim=1)
        maps = OcclusionMaps(
            prob=torch.stack([f.prob for f in found]),
            label=torch.stack([f.label for f in found]),
            activation=None if layer is None else torch.stack([f.total for f in found]),
            positions=positions, window=window, stride=stride, target=targets,
            clean_prob=clean_p[torch.arange(len(x)), targets], clean_label=clean_p.argmax(1),
            clean_activation=(None if clean_maps is None else
                              clean_maps[torch.arange(len(x)), channels].double().sum((1, 2))),
            layer=layer, channel=channels, engine=runs[0].engine,
            engine_note=_with_work_share(race.note if race else note, runs),
            approx=cap, computed=sum(f.computed for f in found))
        if drill_down:
            maps = _check_approximation(maps, runs, [f.exact for f in found], occluder)
    return maps


@dataclass(frozen=True)
class _Occluder:
    """The occluder: its size, its fill (C, 1, 1) in the model's input space, the approximate
    mode's region cap (None: exact), and how many positions run at once."""

    window: tuple[int, int]
    fill: torch.Tensor
    cap: float | None
    batch_size: int


@dataclass(frozen=True)
class _ImageMaps:
    """One image's maps over the grid (rows, columns): the target's probability, the label,
    the channel total (or None), which positions were computed exactly, and how many."""

    prob: torch.Tensor
    label: torch.Tensor
    total: torch.Tensor | None
    exact: torch.Tensor
    computed: int


def _engine_runs(model, x, layer, output, engine, capped) -> tuple[list, str]:
    """One run per image of the engine that will occlude it (each with the clean ``logits``
    and ``maps``, and called as ``run(corners, occluder)``), and the note on why the naive
    engine was chosen, if it was."""
    run_forward(model, x[:1])  # one image as run_forward checks it: each engine refuses the
    # same inputs in the same words (the incremental one runs a traced copy of the model)
    graph_module, note = (None, "engine='naive' was asked for") if engine == "naive" \
        else _trace(model, layer)
    if graph_module is None and engine == "incremental":
        raise BadArgument(f"the incremental engine cannot run: {note}",
                          "use engine='naive' or 'auto'")
    if graph_module is None and capped:
        raise BadArgument(f"the region cap (approx=FRACTION) cannot run: {note}",
                          "use approx=True")
    if graph_module is None:
        logits, maps = _clean_pass(model, x, layer, output)
        return [_NaiveRun(model, x[n:n + 1], layer, output, logits[n:n + 1],
                          None if maps is None else maps[n:n + 1]) for n in range(len(x))], note
    runs = [_IncrementalRun(graph_module, x[n:n + 1], layer, output) for n in range(len(x))]
    _check_outputs(runs[0].logits, runs[0].maps, layer)
    return runs, note


BATCH_BYTES = 512 * 2**20  # the default batch: its largest feature map within this


def _batch_size(model: nn.Module, x: torch.Tensor) -> int:
    """Positions per batch: the largest feature map of one image (from a trace at the
    image's size) times the batch within ``BATCH_BYTES``, between 8 and 256."""
    calls = trace_calls(model, tuple(x.shape[-2:]))
    largest = max((call.output.numel() for call in calls
                   if isinstance(call.output, torch.Tensor)), default=x[0].numel())
    return max(8, min(256, BATCH_BYTES // (largest * x.element_size())))


_SURE_SHARE = 0.25  # incremental at most this share of the naive multiply-adds: no race
_ROUNDS = 2  # timed turns per engine in a race
_RACE_BATCH = 32  # positions per turn


def _raced(model, runs: list, layer, output) -> tuple[list, _Race]:
    """engine="auto": each image's run as an ``_AutoRun`` of both engines, sharing one
    ``_Race``."""
    race = _Race()
    raced = []
    for run in runs:
        naive = _NaiveRun(model, run.image, layer, output, run.logits, run.maps)
        naive.channel = run.channel
        raced.append(_AutoRun(race, run, naive))
    return raced, race


class _Race:
    """Which engine is faster on this model and input. The incremental engine computes far
    fewer multiply-adds, but pays Python's price per layer and per batch, which a small
    network does not repay. The first turn runs incremental; where it needed more than
    ``_SURE_SHARE`` of the naive engine's multiply-adds, the engines take ``_ROUNDS`` turns
    each of ``_RACE_BATCH`` positions, timed per position (the best of each engine's turns:
    the first call of either pays for setting up its kernels), and every later batch runs on
    the faster. Both engines are exact, so no position is computed twice."""

    def __init__(self):
        self.times: dict[str, list[float]] = {"incremental": [], "naive": []}
        self.positions = {"incremental": 0, "naive": 0}  # computed by each while racing
        self.share: float | None = None
        self.winner: str | None = None

    @property
    def leader(self) -> str:
        """The winner; before the race ends, the engine that computed the most positions."""
        return self.winner or max(self.positions, key=self.positions.get)

    @property
    def seconds(self) -> dict[str, float]:
        """The best time per position of each engine that ran."""
        return {name: min(values) for name, values in self.times.items() if values}

    def next_engine(self) -> str:
        if self.winner:
            return self.winner
        runs = {name: len(values) for name, values in self.times.items()}
        return "naive" if runs["naive"] < runs["incremental"] else "incremental"

    def record(self, engine: str, seconds: float, share: float | None, positions: int) -> None:
        self.times[engine].append(seconds)
        self.positions[engine] += positions
        if engine == "incremental" and self.share is None:
            self.share = share
            if share is not None and share <= _SURE_SHARE:
                self.winner = "incremental"
        if min(len(values) for values in self.times.values()) == _ROUNDS:
            self.winner = min(self.seconds, key=self.seconds.get)

    @property
    def note(self) -> str:
        if not self.times["naive"]:
            why = (f"{self.share:.0%} of the naive engine's multiply-adds" if self.share
                   is not None else "one batch only")
            return f"auto: {self.leader} ({why})"
        timed = ", ".join(f"{name} {1e3 * value:.2f} ms" for name, value in self.seconds.items())
        if self.winner is None:
            split = ", ".join(f"{name} {count}" for name, count in self.positions.items())
            return (f"auto: too few positions to finish the race, so both engines ran "
                    f"(positions: {split}; per position: {timed}); every position is exact")
        return (f"auto: {self.winner}, the faster per position over {_ROUNDS} timed turns "
                f"each ({timed})")


class _AutoRun:
    """One image's runs of both engines behind the ``_IncrementalRun`` interface; each
    batch goes to the engine the shared ``_Race`` names."""

    def __init__(self, race: _Race, incremental: _IncrementalRun, naive: _NaiveRun):
        self.race, self.runs = race, {"incremental": incremental, "naive": naive}
        self.image, self.logits, self.maps = incremental.image, incremental.logits, \
            incremental.maps

    @property
    def engine(self) -> str:
        return self.race.leader

    def __call__(self, corners: torch.Tensor, occluder: _Occluder, exact: bool = False):
        """Logits and totals at ``corners``, as the engines' runs give them; while the race
        is open, the corners go in turns of ``_RACE_BATCH`` to the engine it names."""
        parts = []
        while self.race.winner is None and len(corners):
            turn, corners = corners[:_RACE_BATCH], corners[_RACE_BATCH:]
            parts.append(self._timed(self.race.next_engine(), turn, occluder, exact))
        if len(corners):
            parts.append(self.runs[self.race.winner](corners, occluder, exact))
        logits = torch.cat([part[0] for part in parts])
        totals = [part[1] for part in parts]
        return logits, None if totals[0] is None else torch.cat(totals)

    def _timed(self, engine: str, corners: torch.Tensor, occluder: _Occluder, exact: bool):
        run = self.runs[engine]
        macs = getattr(run, "macs", 0)
        started = time.perf_counter()
        result = run(corners, occluder, exact)
        seconds = (time.perf_counter() - started) / len(corners)
        share = ((run.macs - macs) / max(run.full_macs * len(corners), 1)
                 if engine == "incremental" else None)
        self.race.record(engine, seconds, share, len(corners))
        return result


def _with_work_share(note: str, runs: list) -> str:
    """``note``, and for the incremental engine how much of the naive engine's work it did:
    the multiply-add ceiling of its speed-up is the inverse."""
    incremental = [getattr(run, "runs", {}).get("incremental", run) for run in runs]
    if incremental[0].engine != "incremental":
        return note
    spent = sum(run.macs for run in incremental)
    full = sum(run.full_macs * run.positions for run in incremental)
    if not spent or not full:
        return note
    share = (f"multiply-adds: {spent / full:.1%} of the naive engine's (a ceiling of "
             f"{full / spent:.1f}x)")
    return f"{note}; {share}" if note else share


def _occlude_image(run, positions: torch.Tensor, occluder: _Occluder, target: int,
                   drill_down: bool, bar) -> _ImageMaps:
    """The maps of one image: every position exactly, or by the adaptive drill-down."""
    flat = positions.view(-1, 2)
    shape = tuple(positions.shape[:2])

    def evaluate(indices: torch.Tensor):
        """Exact (or capped) prob, label and total (or None) at the given flat positions."""
        out_probs, out_labels, out_totals = [], [], []
        for begin in range(0, len(indices), occluder.batch_size):
            corners = flat[indices[begin:begin + occluder.batch_size]]
            logits, total = run(corners, occluder)
            p = torch.softmax(logits.float(), dim=1)
            out_probs.append(p[:, target])
            out_labels.append(p.argmax(dim=1))
            if total is not None:
                out_totals.append(total)
            bar.update(len(corners))
        return (torch.cat(out_probs), torch.cat(out_labels),
                torch.cat(out_totals) if out_totals else None)

    if drill_down:
        prob, label, total, exact = _drill_down(evaluate, shape, DRILL_FACTOR, DRILL_TOLERANCE,
                                                flat.device)
        bar.update(len(flat) - int(exact.sum()))
        computed = int(exact.sum())
        if occluder.cap is not None:  # capped positions are approximations too
            exact = torch.zeros_like(exact)
    else:
        prob, label, total = evaluate(torch.arange(len(flat), device=flat.device))
        exact, computed = torch.ones(len(flat), dtype=torch.bool, device=flat.device), len(flat)
    return _ImageMaps(prob.view(shape), label.view(shape),
                      None if total is None else total.view(shape), exact, computed)


class _IncrementalRun:
    """The clean pass of one image through the traced graph (every node's value kept), then
    batches of occluders. ``logits`` (1, K) and ``maps`` (1, C, h, w) (or None) are the clean
    outputs; ``channel`` is set once the feature map is chosen."""

    engine = "incremental"

    def __init__(self, graph_module, image, layer, output: OutputSelector):
        recorder = _Recorder(graph_module)
        self.output = output
        self.logits = class_scores(recorder.run(image), output)
        self.full_macs = recorder.macs  # what the naive engine spends per position
        self.macs, self.positions = 0, 0  # what this engine spent, over how many
        self.graph_module = graph_module
        self.clean = recorder.values
        self.image = image
        self.layer_node = _layer_node(graph_module, layer)
        self.maps = None if self.layer_node is None else self.clean[self.layer_node]
        self.channel: int | None = None

    def __call__(self, corners: torch.Tensor, occluder: _Occluder, exact: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, K) and channel totals (B,) (or None) with the occluder at ``corners``
        (B, 2); ``exact`` ignores the approximate mode's region cap."""
        channels, window = self.image.shape[1], occluder.window
        box = occluder.fill.expand(channels, *window).unsqueeze(0)
        source = _Patched(self.image, box.expand(len(corners), channels, *window), corners)
        interpreter = _Incremental(self.graph_module, self.clean,
                                   None if exact else occluder.cap, self.layer_node,
                                   self.channel)
        output = interpreter.run(source)
        self.macs += interpreter.macs
        self.positions += len(corners)
        return class_scores(_materialised(output), self.output), interpreter.activation


class _NaiveRun:
    """Occluded copies of one image through the whole model (the reference engine), with the
    same interface as ``_IncrementalRun``."""

    engine = "naive"

    def __init__(self, model, image, layer, output: OutputSelector, logits, maps):
        self.model, self.image, self.layer, self.output = model, image, layer, output
        self.logits, self.maps = logits, maps
        self.channel: int | None = None

    def __call__(self, corners: torch.Tensor, occluder: _Occluder, exact: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        window = occluder.window
        # channels-last: the CPU's convolutions run ~1.5x faster on it (the demo network at
        # 169 images), with the same numbers to float rounding
        batch = self.image.expand(len(corners), *self.image.shape[1:]).contiguous(
            memory_format=torch.channels_last)
        for b, (top, left) in enumerate(corners.tolist()):
            batch[b, :, top:top + window[0], left:left + window[1]] = occluder.fill
        if self.layer is None:
            return class_scores(run_forward(self.model, batch), self.output), None
        with capture(self.model, [self.layer]) as captured:
            logits = class_scores(run_forward(self.model, batch), self.output)
        return logits, captured[self.layer][:, self.channel].double().sum((1, 2))


def _clean_pass(model, x, layer, output) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits (N, K) of the clean images and the layer's maps (N, C, h, w) if a layer is
    given, by running the model itself (the naive engine)."""
    if layer is None:
        logits, maps = class_scores(run_forward(model, x), output), None
    else:
        with capture(model, [layer]) as captured:
            logits = class_scores(run_forward(model, x), output)
        maps = captured[layer]
    _check_outputs(logits, maps, layer)
    return logits, maps


def _check_outputs(logits: Any, maps: Any, layer: str | None) -> None:
    if layer is not None:
        feature_maps(maps, layer)


def _targets(target, logits: torch.Tensor) -> torch.Tensor:
    """The class mapped per image: given (checked), or the clean prediction."""
    return logits.argmax(dim=1) if target is None else class_labels(target, logits)


def _channels(channel, maps: torch.Tensor | None, layer) -> torch.Tensor | None:
    if maps is None:
        if channel is not None:
            raise BadArgument("a channel needs a layer", "give --layer too")
        return None
    if channel is None:  # the strongest feature map of each clean image
        return strongest_channels(maps)
    channel = channel_index(channel)
    check_channels(channel, maps.shape[1], layer)
    return torch.full((len(maps),), channel, dtype=torch.long, device=maps.device)


def _approx_settings(approx: bool | float) -> tuple[bool, float | None]:
    """(drill down?, region cap) from the ``approx`` argument."""
    if approx is False or approx is None:
        return False, None
    if approx is True:
        return True, None
    if not isinstance(approx, (int, float)) or not 0 < approx <= 1:
        raise BadArgument(f"approx must be True, False or a fraction in (0, 1], got {approx!r}")
    return True, float(approx)


def _drill_down(evaluate, shape: tuple[int, int], factor: int, tolerance: float, device):
    """Krypton's adaptive drill-down, made to keep its word: compute every ``factor``-th row
    and column of the grid (and the last ones) exactly; compute exactly the whole of each
    coarse cell whose corners disagree (probabilities more than ``tolerance`` apart, or
    different labels); interpolate the other cells bilinearly (the label: the corners'), and
    check each one at its centre: where the exact value there differs from the interpolation
    by more than ``tolerance`` (a dip narrower than the coarse grid), the cell and its
    neighbours are computed exactly, and their neighbours' centres checked in turn, until
    every check agrees.

    Returns prob, label, total (flat, or None) and which positions were computed (flat bool).
    """
    rows = sorted(set(range(0, shape[0], factor)) | {shape[0] - 1})
    cols = sorted(set(range(0, shape[1], factor)) | {shape[1] - 1})
    cells = [(i, j) for i in range(len(rows) - 1) for j in range(len(cols) - 1)]
    known = torch.zeros(shape, dtype=torch.bool, device=device)
    prob = torch.zeros(shape, device=device)
    label = torch.zeros(shape, dtype=torch.long, device=device)
    total: list[torch.Tensor | None] = [None]

    def compute(mask: torch.Tensor) -> None:
        indices = (mask & ~known).flatten().nonzero().flatten()
        if len(indices) == 0:
            return
        values = evaluate(indices)
        prob.view(-1)[indices], label.view(-1)[indices] = values[0], values[1]
        if values[2] is not None:
            if total[0] is None:
                total[0] = torch.zeros(shape, dtype=torch.float64, device=device)
            total[0].view(-1)[indices] = values[2]
        known.view(-1)[indices] = True

    def box(cell: tuple[int, int]) -> tuple[slice, slice]:
        return (slice(rows[cell[0]], rows[cell[0] + 1] + 1),
                slice(cols[cell[1]], cols[cell[1] + 1] + 1))

    def corners(cell):
        return [(rows[cell[0] + a], cols[cell[1] + b]) for a in (0, 1) for b in (0, 1)]

    coarse = torch.zeros(shape, dtype=torch.bool, device=device)
    coarse[torch.tensor(rows, device=device)[:, None], torch.tensor(cols, device=device)] = True
    compute(coarse)
    exact_cells = set()
    for cell in cells:
        p = torch.stack([prob[c] for c in corners(cell)])
        if len({int(label[c]) for c in corners(cell)}) > 1 or float(p.max() - p.min()) > \
                tolerance:
            exact_cells.add(cell)
    checked: set[tuple[int, int]] = set()
    while True:
        refine = torch.zeros(shape, dtype=torch.bool, device=device)
        for cell in exact_cells:
            refine[box(cell)] = True
        compute(refine)
        pending = [cell for cell in cells if cell not in exact_cells and cell not in checked]
        centres = {cell: ((rows[cell[0]] + rows[cell[0] + 1]) // 2,
                          (cols[cell[1]] + cols[cell[1] + 1]) // 2) for cell in pending}
        expected = {cell: _bilinear(prob, corners(cell), centre)
                    for cell, centre in centres.items()}
        mask = torch.zeros(shape, dtype=torch.bool, device=device)
        for centre in centres.values():
            mask[centre] = True
        compute(mask)
        checked.update(pending)
        wrong = [cell for cell in pending
                 if abs(float(prob[centres[cell]]) - expected[cell]) > CHECK_TOLERANCE]
        if not wrong:
            break
        for i, j in wrong:  # the cell and its neighbours, whose centres are checked next
            for di in (-1, 0, 1):
                for dj in (-1, 0, 1):
                    neighbour = (i + di, j + dj)
                    if neighbour in cells and neighbour not in exact_cells:
                        exact_cells.add(neighbour)
                        checked.discard(neighbour)
    exact = known.clone()
    for cell in cells:
        if cell in exact_cells:
            continue
        for y in range(box(cell)[0].start, box(cell)[0].stop):
            for x in range(box(cell)[1].start, box(cell)[1].stop):
                if known[y, x]:
                    continue
                prob[y, x] = _bilinear(prob, corners(cell), (y, x))
                label[y, x] = label[corners(cell)[0]]
                if total[0] is not None:
                    total[0][y, x] = _bilinear(total[0], corners(cell), (y, x))
                known[y, x] = True
    return (prob.flatten(), label.flatten(), None if total[0] is None else total[0].flatten(),
            exact.flatten())


def _bilinear(values: torch.Tensor, corners: list[tuple[int, int]],
              at: tuple[int, int]) -> float:
    """The bilinear interpolation at ``at`` of ``values`` at a cell's four ``corners``
    (top-left, top-right, bottom-left, bottom-right)."""
    (top, left), _, (bottom, _), (_, right) = corners
    wy = (at[0] - top) / (bottom - top) if bottom > top else 0.0
    wx = (at[1] - left) / (right - left) if right > left else 0.0
    weights = [(1 - wy) * (1 - wx), (1 - wy) * wx, wy * (1 - wx), wy * wx]
    return sum(w * float(values[c]) for w, c in zip(weights, corners, strict=True))


def _check_approximation(maps: OcclusionMaps, runs, exact_masks, occluder: _Occluder
                         ) -> OcclusionMaps:
    """Re-run exactly a sample of the positions that were approximated (evenly spread, plus
    each image's lowest probability) and record the largest deviation found."""
    from dataclasses import replace

    flat = maps.positions.view(-1, 2)
    worst = 0.0
    checked = 0
    for n, run in enumerate(runs):
        approximated = (~exact_masks[n]).nonzero().flatten().cpu()
        lowest = maps.prob[n].flatten().argmin().view(1).cpu()
        if len(approximated) == 0:
            continue
        spread = approximated[torch.linspace(0, len(approximated) - 1,
                                             min(_CHECKED, len(approximated))).round().long()]
        picks = torch.unique(torch.cat([spread, lowest[~exact_masks[n][lowest].cpu()]]))
        exact = []
        for begin in range(0, len(picks), occluder.batch_size):
            logits, _ = run(flat[picks[begin:begin + occluder.batch_size]], occluder, exact=True)
            exact.append(torch.softmax(logits.float(), dim=1)[:, maps.target[n]])
        approx = maps.prob[n].flatten()[picks.to(maps.prob.device)]
        worst = max(worst, float((approx - torch.cat(exact)).abs().max()))
        checked += len(picks)
    return replace(maps, max_deviation=worst, checked=checked)
