"""The deconvnet of Zeiler & Fergus (2013, section 2.1): project a feature map back to pixels.

Start from one layer's output with every activation but the selected ones set to zero, then go
down layer by layer to the input: **unpool** with the switches (the argmax positions) recorded in
the forward pass, **rectify** the signal with a ReLU, **filter** with the transposed filters (no
bias). Unpooling is the exact adjoint of max pooling, so where overlapping windows (3x3, stride 2
in AlexNet and ZF Net) pick the same input, their signals add.

Three routes behind one interface, with the same numbers:

- **explicit**, for chains of conv / activation / max-pool / batch-norm / dropout layers (AlexNet,
  VGG, ZFNetMini): the three operations written out. In "max" mode a unit depends only on the pixels
  of its receptive field, so the forward pass and the projection run on that crop alone; each
  layer's crop is padded exactly as the layer pads its full map (zeros before a conv, -inf
  before a max pool), so cropping changes no number.
- **explicit graph**, for residual and branching networks made of the ops ``deconv_graph``
  knows (convs, max pools, eval-mode batch norm, nonlinearities, adds, concatenations): the
  same three operations down a graph recorded in one no-grad forward pass, each transposed
  conv kept to the unit's cone (see ``deconv_graph``).
- **autograd**, for any other network: the model's own backward
  pass with every nonlinearity's backward replaced by a rectifier, ``grad_in = relu(grad_out)``.
  Nonlinearities are caught as functions (``F.relu``, ``torch.relu_``, ``F.prelu``, ``F.gelu``,
  ``Tensor.sigmoid``, ...; see ``layers.ACTIVATION_FUNCTIONS``) while the call runs, so modules,
  in-place variants and functional calls are all treated alike.

**Rectify** (``rectify=``): ``"all"`` (default) is the paper's rule: the signal passes through a
ReLU at *every* elementwise nonlinearity on the way down, module or function, whatever the
forward nonlinearity was (ReLU, PReLU, LeakyReLU, ELU, GELU, SiLU, sigmoid, ...).
``"captum"`` rectifies at ``nn.ReLU`` modules only and lets every other nonlinearity (and a
functional ReLU) pass its ordinary gradient, as Captum's ``NeuronDeconvolution`` does with its
hooks on ReLU modules. A ``RectificationWarning`` names, per model, the nonlinearities where the
two choices differ and how they were treated, so the difference is never silent.

With ``rectify="captum"`` the "max" result equals Captum's ``NeuronDeconvolution`` at the
strongest unit times that unit's activation, on any model; with ``"all"`` it equals it on
models whose only nonlinearities are ``nn.ReLU`` modules.
"""

from __future__ import annotations

import contextlib
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from vizcnn.checks import (
    channel_index,
    channel_indices,
    check_channels,
    feature_maps,
    positive_int,
)
from vizcnn.crops import crop_batch, paste_batch
from vizcnn.deconv_graph import (
    Graph,
    activation_modules,
    project_cones,
    record_graph,
    record_switches,
    start_cone,
    transposed_conv,
)
from vizcnn.errors import BadArgument, ModelError
from vizcnn.geometry import (
    Geometry,
    LayerCall,
    chain_calls,
    crop_blocker,
    geometry_of,
    last_call,
    trace_calls,
)
from vizcnn.hooks import (
    forward_to,
    model_device,
    preserved_state,
    require_batch,
    strongest_units,
)
from vizcnn.layers import ACTIVATION_FUNCTIONS, POINTWISE, is_activation, resolve_layer
from vizcnn.receptive import receptive_fields

__all__ = [
    "Deconvnet",
    "Patches",
    "RectificationWarning",
    "TopPatches",
    "top_patches",
]

Mode = Literal["max", "map"]
Route = Literal["auto", "explicit", "autograd"]  # which implementation projects
Rectify = Literal["all", "captum"]  # where the signal is rectified on the way down


class RectificationWarning(UserWarning):
    """The model has nonlinearities where the paper's rule (rectify at every one) and Captum's
    (rectify at ``nn.ReLU`` modules only) give different projections; says how each was
    treated."""


# --------------------------------------------------------------------------- the explicit chain


@dataclass(frozen=True)
class _Link:
    """One leaf layer of a chain: what it does, the (H, W) of its full input map, and, for a
    conv or max pool, its geometry."""

    kind: str  # "conv", "pool", "act" (a nonlinearity: rectified), "norm" or "same"
    module: nn.Module
    input_size: tuple[int, int]
    geometry: Geometry | None = None


def _step(call: LayerCall, rectify: Rectify) -> _Link | None:
    """The step for one traced call, or None if the explicit route cannot do this layer."""
    module = call.module
    size = tuple(call.inputs[0].shape[-2:]) if call.inputs[0].dim() == 4 else None
    if size is None:
        return None
    geometry = geometry_of(module)
    if geometry is not None:
        croppable = geometry.exact_on_crops and geometry.kind in ("conv", "max")
        kind = "conv" if geometry.kind == "conv" else "pool"
        return _Link(kind, module, size, geometry) if croppable else None
    if is_activation(module):
        # a nonlinearity that keeps its gradient ("captum" mode) needs autograd
        rectified = rectify == "all" or isinstance(module, nn.ReLU)
        return _Link("act", module, size) if rectified else None
    if isinstance(module, nn.BatchNorm2d):
        return _Link("norm", module, size) if module.track_running_stats else None
    if isinstance(module, POINTWISE) and not isinstance(module, nn.LocalResponseNorm):
        return _Link("same", module, size)  # dropout (eval mode) and identity
    return None


def _explicit_chain(calls: list[LayerCall], layer: str, rectify: Rectify = "all"
                    ) -> list[_Link] | None:
    """The chain of links from the input to ``layer``, or None when the explicit route cannot
    take it (a branch, a functional op, or a layer it does not know on the way)."""
    leaves = chain_calls(calls, last_call(calls, layer))
    if not leaves or calls[last_call(calls, layer)].output.dim() != 4:
        return None
    chain = [_step(call, rectify) for call in leaves]
    return None if any(step is None for step in chain) else chain  # type: ignore[return-value]


def _regions(chain: list[_Link], out_len: tuple[int, int]) -> list[tuple[int, int]]:
    """The crop length (per axis) of each link's input for ``out_len`` units at the top, from
    the top down (``Geometry.input_length``). Index i holds link i's input length; the last
    entry is the top."""
    lengths = [out_len]
    for step in reversed(chain):
        lengths.insert(0, lengths[0] if step.geometry is None
                       else step.geometry.input_length(lengths[0]))
    return lengths


def _starts(chain: list[_Link], top_start: torch.Tensor) -> list[torch.Tensor]:
    """Crop starts (P, 2) of each step's input, from the top-level start, in full-map
    coordinates (negative: in the padding). Index i holds step i's input start."""
    starts = [top_start]
    for step in reversed(chain):
        starts.insert(0, starts[0] if step.geometry is None
                      else step.geometry.input_start(starts[0]))
    return starts


def _inside(start: torch.Tensor, length: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """(P, 1, h, w) bool: which positions of each crop lie inside the full map."""
    rows = start[:, :1] + torch.arange(length[0], device=start.device)
    cols = start[:, 1:] + torch.arange(length[1], device=start.device)
    rows_in = (rows >= 0) & (rows < size[0])
    cols_in = (cols >= 0) & (cols < size[1])
    return (rows_in[:, :, None] & cols_in[:, None, :]).unsqueeze(1)


@dataclass
class _Forward:
    """What the backward pass needs from the forward pass over the crops."""

    masks: list[torch.Tensor]  # per step: (P, 1, h, w) bool, inside the full map
    switches: list[torch.Tensor | None]  # per step: max-pool argmax indices, else None
    lengths: list[tuple[int, int]]
    output: torch.Tensor  # (P, C, h, w) the layer's output over the top crop


def _chain_forward(chain: list[_Link], x: torch.Tensor, rows: torch.Tensor,
                   top_start: torch.Tensor, top_len: tuple[int, int]) -> _Forward:
    """Run the chain on crops: the crop of step i's input is masked to the layer's padding
    value outside the full map, then the layer runs without padding."""
    lengths = _regions(chain, top_len)
    starts = _starts(chain, top_start)
    signal = crop_batch(x, rows, starts[0], lengths[0])
    masks, switches = [], []
    for step, start, length in zip(chain, starts, lengths, strict=False):
        mask = _inside(start, length, step.input_size)
        masks.append(mask)
        switch = None
        module = step.module
        geometry = step.geometry
        if step.kind == "conv":
            signal = F.conv2d(_outside(signal, mask, 0.0), module.weight, module.bias,
                              geometry.stride, 0, geometry.dilation, module.groups)
        elif step.kind == "pool":
            signal, switch = F.max_pool2d(_outside(signal, mask, geometry.pad_value),
                                          geometry.kernel, geometry.stride, 0, geometry.dilation,
                                          return_indices=True)
        elif step.kind == "act":
            signal = module.forward(signal)  # the model's own nonlinearity, without its hooks
        elif step.kind == "norm":
            signal = signal * _norm_scale(module) + _norm_shift(module)
        switches.append(switch)
    return _Forward(masks, switches, lengths, signal)


def _crop_forward(chain: list[_Link], whole: _Forward, rows: torch.Tensor,
                  top_start: torch.Tensor, top_len: tuple[int, int]) -> _Forward:
    """The per-crop ``_Forward`` of each projection, cut from a whole-map forward pass of its
    image (``whole``, row ``rows[p]``): masks from the crop geometry, switches re-indexed into
    crop coordinates, the top output cropped."""
    lengths = _regions(chain, top_len)
    starts = _starts(chain, top_start)
    whole_starts = _starts(chain, _zeros(1, top_start.device))  # the same for every image
    masks, switches = [], []
    for index, step in enumerate(chain):
        masks.append(_inside(starts[index], lengths[index], step.input_size))
        switch = None
        if step.kind == "pool":
            out_start = starts[index + 1] - whole_starts[index + 1]
            cropped = crop_batch(whole.switches[index], rows, out_start, lengths[index + 1])
            width = whole.lengths[index][1]
            offset = starts[index] - whole_starts[index]  # crop start in whole-crop coords
            ys = cropped // width - offset[:, :1, None, None]
            xs = cropped % width - offset[:, 1:, None, None]
            # positions outside the map carry no signal; any index inside the crop will do
            ys = ys.clamp(0, lengths[index][0] - 1)
            xs = xs.clamp(0, lengths[index][1] - 1)
            switch = ys * lengths[index][1] + xs
        switches.append(switch)
    output = crop_batch(whole.output, rows, starts[-1] - whole_starts[-1], lengths[-1])
    return _Forward(masks, switches, lengths, output)


def _whole_forward(chain: list[_Link], x: torch.Tensor, map_size: tuple[int, int],
                   batch_size: int) -> _Forward:
    """The chain over the whole map of every image of ``x``, in batches; the masks are the
    same for every image and kept once (batch dimension 1)."""
    parts = [_chain_forward(chain, x, torch.arange(start, min(start + batch_size, len(x)),
                                                   device=x.device),
                            _zeros(min(start + batch_size, len(x)) - start, x.device), map_size)
             for start in range(0, len(x), batch_size)]
    return _Forward([mask[:1] for mask in parts[0].masks],
                    [None if s is None else torch.cat([p.switches[i] for p in parts])
                     for i, s in enumerate(parts[0].switches)],
                    parts[0].lengths, torch.cat([p.output for p in parts]))


def _cost(chain: list[_Link], top_len: tuple[int, int]) -> float:
    """Multiply-adds of the convolutions of a forward pass that computes ``top_len`` units."""
    lengths = _regions(chain, top_len)
    total = 0.0
    for index, step in enumerate(chain):
        if step.kind == "conv":
            out = lengths[index + 1]
            weight = step.module.weight
            total += out[0] * out[1] * weight.numel()
    return total


def _outside(signal: torch.Tensor, mask: torch.Tensor, value: float) -> torch.Tensor:
    """Set the positions outside the map (``mask`` False) to ``value``, in place: the padding
    of a conv (0) or a max pool (-inf). ``signal`` must be a tensor this module owns."""
    if not bool(mask.all()):
        signal.masked_fill_(~mask, value)
    return signal


def _norm_scale(module: nn.BatchNorm2d) -> torch.Tensor:
    scale = torch.rsqrt(module.running_var + module.eps)
    if module.weight is not None:
        scale = scale * module.weight
    return scale[None, :, None, None]


def _norm_shift(module: nn.BatchNorm2d) -> torch.Tensor:
    shift = -module.running_mean * _norm_scale(module).flatten()
    if module.bias is not None:
        shift = shift + module.bias
    return shift[None, :, None, None]


def _chain_backward(chain: list[_Link], forward: _Forward, signal: torch.Tensor,
                    rows: torch.Tensor) -> torch.Tensor:
    """The deconvnet proper: from ``signal`` (P, C, h, w) at the top crop down to the input
    crop (P, C_in, H, W). ``rows[p]`` is the forward row whose switches projection p uses."""
    for index in range(len(chain) - 1, -1, -1):
        step = chain[index]
        mask = forward.masks[index]
        mask = mask if len(mask) == 1 else mask[rows]
        length = forward.lengths[index]
        if step.kind == "conv":
            # the padding takes no signal
            signal = _outside(transposed_conv(signal, step.module.weight, step.module.groups,
                                                   step.geometry), mask, 0.0)
        elif step.kind == "pool":
            switches = forward.switches[index][rows].flatten(2)  # type: ignore[index]
            unpooled = signal.new_zeros(*signal.shape[:2], length[0] * length[1])
            # scatter_add, not max_unpool2d: overlapping windows that share a switch must add
            unpooled.scatter_add_(2, switches, signal.flatten(2))
            signal = unpooled.view(*signal.shape[:2], *length)
        elif step.kind == "act":
            signal = signal.clamp_min(0.0)  # rectify, whatever the forward nonlinearity
        elif step.kind == "norm":
            signal = signal * _norm_scale(step.module)
    return signal


# --------------------------------------------------------------------------- the autograd route


class _Rectify(torch.autograd.Function):
    """A nonlinearity's forward, a rectified backward: the deconvnet's treatment of it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, function, args: tuple, kwargs: dict) -> torch.Tensor:
        # on a copy: an in-place variant must not overwrite what the graph needs
        return function(x.clone(), *args, **kwargs)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.clamp_min(0.0), None, None, None


class _Rectifier(TorchFunctionMode):
    """While active, every call of an elementwise nonlinearity (``layers.ACTIVATION_FUNCTIONS``)
    that is to be rectified goes through ``_Rectify``. ``inside`` holds the activation modules
    running (kept by hooks), so a call is told apart as a module's or a bare function's; the
    calls are counted per kind in ``rectified`` and ``passed`` for the warning."""

    def __init__(self, rectify: Rectify):
        super().__init__()
        self.rectify = rectify
        self.inside: list[nn.Module] = []
        self.rectified: Counter[str] = Counter()
        self.passed: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", None)
        if name in ACTIVATION_FUNCTIONS and args and isinstance(args[0], torch.Tensor):
            module = self.inside[-1] if self.inside else None
            kind = type(module).__name__ if module is not None else f"F.{name.strip('_')}"
            if self.rectify == "all" or isinstance(module, nn.ReLU):
                self.rectified[kind] += 1
                return _Rectify.apply(args[0], func, args[1:], kwargs)
            self.passed[kind] += 1
        return func(*args, **kwargs)


@contextlib.contextmanager
def _rectified(model: nn.Module, rectify: Rectify) -> Iterator[_Rectifier]:
    """Rectify the model's nonlinearities for the block (as ``rectify`` says), then warn where
    the paper's rule and Captum's differ on this model."""
    mode = _Rectifier(rectify)
    with activation_modules(model, mode.inside), mode:
        yield mode
    _warn_rectification(model, mode.rectified, mode.passed, rectify)


def _warn_rectification(model: nn.Module, rectified: Counter[str], passed: Counter[str],
                        rectify: Rectify) -> None:
    """A ``RectificationWarning`` naming the nonlinearities (other than ``nn.ReLU`` modules)
    on the way down, and how they were treated, when there are any: there the paper's rule
    and Captum's give different projections."""
    differing = Counter({kind: count for kind, count in (rectified + passed).items()
                         if kind != "ReLU"})
    if not differing:
        return
    listing = ", ".join(f"{kind} x{count}" for kind, count in sorted(differing.items()))
    name = type(model).__name__
    if rectify == "all":
        text = (f"{name}: the deconvnet rectified its signal at {listing} as at every "
                "nonlinearity (the paper's rule). Captum's NeuronDeconvolution rectifies only "
                "at nn.ReLU modules and passes the ordinary gradient through these, so its "
                "projections of this model differ; rectify='captum' reproduces them")
    else:
        text = (f"{name}: with rectify='captum' the signal passed {listing} with their "
                "ordinary gradient and was rectified at nn.ReLU modules only, as Captum's "
                "NeuronDeconvolution does; the paper's rule (rectify='all', the default) "
                "rectifies at every nonlinearity")
    warnings.warn(text, RectificationWarning, stacklevel=5)


# --------------------------------------------------------------------------- the public class


@dataclass(frozen=True)
class Patches:
    """Projections and the matching image crops, one per projected unit.

    Attributes:
        projections: (P, C_in, s, s) the projection inside each unit's patch box.
        images: (P, C_in, s, s) the model input inside the same box.
        boxes: (P, 4) long, (top, left, bottom, right) of each patch in the input image, ends
            exclusive. A patch is the unit's receptive field (size s, at most the image size)
            moved inside the image where the field reaches past the border, so all patches have
            one size; every pixel the unit can see is inside its patch.
        route: how they were computed: "explicit" (a chain), "explicit graph" (down a
            traced graph, "each unit's cone") or "autograd", and whether each unit ran on a
            crop of the input that holds its receptive field ("cropped"), or on the whole
            input ("one forward pass per image" where an image's projections share it).
    """

    projections: torch.Tensor
    images: torch.Tensor
    boxes: torch.Tensor
    route: str = ""


class Deconvnet:
    """Project feature maps of a model back to pixels (Zeiler & Fergus, section 2.1).

    Holds the model and nothing else; every call runs in eval mode without touching the
    model's weights, flags or modes, and adds no hook that outlives it.

    Example::

        recon = Deconvnet(model).project(x, "features.10", channel=42)   # (N, 3, H, W)
    """

    def __init__(self, model: nn.Module):
        self.model = model

    def project(self, x: torch.Tensor, layer: str, channel: int, mode: Mode = "max", *,
                route: Route = "auto", rectify: Rectify = "all") -> torch.Tensor:
        """Project one channel of ``layer`` for each image of ``x``.

        Args:
            x: (N, C_in, H, W) model input (normalised).
            layer: dotted layer name.
            channel: the feature map (for a linear layer, the unit).
            mode: "max" keeps only the channel's strongest activation in each image (the
                projection is that activation times the deconvnet image of the unit); "map"
                keeps the whole channel as it is.
            route: which implementation projects: "auto" (explicit for chains; for other
                graphs explicit down the traced graph or autograd on crops, whichever needs
                fewer multiply-adds, and autograd where the graph holds an op the explicit
                route cannot take), "explicit" or "autograd".
            rectify: "all" (default, the paper's rule: rectify at every elementwise
                nonlinearity, module or function) or "captum" (at ``nn.ReLU`` modules only,
                the others keep their ordinary gradient, as Captum's NeuronDeconvolution).

        Returns:
            (N, C_in, H, W) projections, on the model's device.
        """
        x = require_batch(x)
        channel_index(channel)
        return self.project_many(x, layer, [channel] * len(x), mode=mode, route=route,
                                 rectify=rectify)

    def project_many(
        self,
        x: torch.Tensor,
        layer: str,
        channels: Sequence[int] | torch.Tensor,
        *,
        image_indices: Sequence[int] | torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        activations: torch.Tensor | None = None,
        mode: Mode = "max",
        route: Route = "auto",
        rectify: Rectify = "all",
        batch_size: int = 64,
    ) -> torch.Tensor:
        """Project many (image, channel) pairs of one layer in batches.

        No forward pass goes past ``layer``. Without ``positions``, one pass per image finds
        the strongest units. On the explicit route in "max" mode each projection then runs on
        its unit's receptive-field crop, taken either from one whole forward pass per distinct
        image (when many projections share an image) or from a forward pass over the crop
        alone, whichever needs fewer multiply-adds; the numbers are the same.

        Args:
            x: (N, C_in, H, W) images.
            channels: (P,) the channel of each projection.
            image_indices: (P,) which image of ``x`` each projection uses (default:
                projection p uses image p, which needs P == N).
            positions: (P, 2) the (y, x) unit of each projection in "max" mode (default: the
                strongest unit of the channel in that image, e.g. a top-k scan's positions).
            activations: (P,) the activation of each projection's unit, where it is known
                already (a top-k scan's values, with its positions): the projection is that
                number times the unit's deconvnet image, and on the explicit route down a
                traced graph the forward pass stops at the last max pool (its switches are
                all the way down needs). Default: computed.
            mode: as in ``project``.
            route: as in ``project``.
            rectify: as in ``project``.
            batch_size: projections computed at once (bounds the memory).

        Returns:
            (P, C_in, H, W) projections.
        """
        plan = _make_plan(self.model, x, layer, channels, image_indices, positions, mode,
                          route, rectify, batch_size, activations)
        result = plan.x.new_zeros(len(plan.channels), *plan.x.shape[1:])
        for rows, (crops, starts) in self._projected_chunks(plan):
            _paste_rows(result, rows, crops, starts, (0, 0))
        return result

    def project_patches(
        self,
        x: torch.Tensor,
        layer: str,
        channels: Sequence[int] | torch.Tensor,
        *,
        image_indices: Sequence[int] | torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        activations: torch.Tensor | None = None,
        route: Route = "auto",
        rectify: Rectify = "all",
        batch_size: int = 64,
    ) -> Patches:
        """Like ``project_many`` in "max" mode, but keeps only each unit's patch: its receptive
        field, cut from the projection and from the input (see ``Patches``). This is what the
        Fig. 2 figure shows, and it never holds full-size projections in memory."""
        plan = _make_plan(self.model, x, layer, channels, image_indices, positions, "max",
                          route, rectify, batch_size, activations)
        field_size, field_starts = _field(self.model, plan)
        patch = (min(field_size[0], plan.x.shape[-2]), min(field_size[1], plan.x.shape[-1]))
        boxes = _patch_boxes(field_starts, patch, plan.x.shape[-2:])
        projections = plan.x.new_zeros(len(plan.channels), plan.x.shape[1], *patch)
        for rows, (projected, starts) in self._projected_chunks(plan):
            _paste_rows(projections, rows, projected, starts, boxes[rows, :2])
        images = crop_batch(plan.x, plan.image_indices, boxes[:, :2], patch)
        return Patches(projections, images, boxes, plan.route)

    def _projected_chunks(self, plan: _Plan
                          ) -> Iterator[tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]]:
        """Each chunk of ``plan``'s projections, as its rows (p,) and its (crops (p, C_in, h,
        w), starts (p, 2)) in input coordinates; the whole-map forward passes, where the plan
        shares them, run once before the first chunk."""
        model = self.model
        device = plan.x.device
        with preserved_state(model, eval_mode=True):
            if plan.graph is not None:
                yield from _explicit_graph(model, plan)
                return
            if plan.chain is None:
                for param in model.parameters():
                    param.requires_grad_(False)  # only the input's gradient is needed
                for rows in _autograd_groups(plan):
                    yield rows, _autograd(model, plan, rows)
                return
            with torch.no_grad():
                whole = None
                if plan.mode == "map" or plan.share_forward:
                    whole = _whole_forward(plan.chain, plan.x[plan.distinct], plan.map_size,
                                           plan.batch_size)
                for chunk in _chunks(len(plan.channels), plan.batch_size):
                    rows = torch.arange(chunk.start, chunk.stop, device=device)
                    yield rows, _explicit(plan, whole, chunk)


@dataclass(frozen=True)
class _Plan:
    """Everything one projection call works from, checked and decided before any projection
    runs (internal)."""

    x: torch.Tensor  # (N, C_in, H, W) on the model's device
    layer: str
    channels: torch.Tensor  # (P,)
    image_indices: torch.Tensor  # (P,) each projection's image in x
    positions: torch.Tensor | None  # (P, 2) each projection's unit ("max" mode)
    mode: Mode
    chain: list[_Link] | None  # the explicit chain, or None for the autograd route
    calls: list[LayerCall]  # the trace of one forward pass at this input size
    map_size: tuple[int, int]
    rectify: Rectify
    batch_size: int
    distinct: torch.Tensor  # the distinct images, ascending
    distinct_rows: torch.Tensor  # (P,) each projection's row in ``distinct``
    share_forward: bool  # explicit "max" mode: crop the units from whole forward passes
    crops: _Crops | None  # autograd route, "max" mode: each unit on its field's crop
    per_image: bool  # uncropped autograd: one forward pass per distinct image
    graph: Graph | None = None  # explicit route on the traced graph: its way, on a zero image
    activations: torch.Tensor | None = None  # (P,) the units' activations, where given

    @property
    def traced(self) -> list[str]:
        return [call.name for call in self.calls]

    @property
    def route(self) -> str:
        if self.chain is not None:
            return "explicit, cropped" if self.mode == "max" else "explicit"
        if self.graph is not None:
            return "explicit graph, each unit's cone" if self.mode == "max" else "explicit graph"
        if self.crops is not None:
            return "autograd, cropped"
        return "autograd, one forward pass per image" if self.per_image else "autograd"


@dataclass(frozen=True)
class _Crops:
    """The autograd route's crops: each projection runs on the input box ``starts`` (P, 2),
    ``lengths`` (P, 2), which holds its unit's receptive field, starts at a multiple of the
    layer's jump (so the crop's grid of units is the image's) and ends where the field ends
    or at the image's border (so the model pads where it pads the image); ``units`` (P, 2)
    is the unit's position in the crop's map. Boxes come in at most three lengths per axis
    (at the start, inside, at the end), so projections of one length run as one batch."""

    starts: torch.Tensor
    lengths: torch.Tensor
    units: torch.Tensor


def _make_plan(model: nn.Module, x, layer, channels, image_indices, positions, mode, route,
               rectify, batch_size, activations=None) -> _Plan:
    """Check the arguments, trace the model, choose the route and find each projection's
    unit."""
    positive_int(batch_size, "batch_size")
    for value, name, allowed in ((mode, "mode", ("max", "map")),
                                 (route, "route", ("auto", "explicit", "autograd")),
                                 (rectify, "rectify", ("all", "captum"))):
        if value not in allowed:
            raise BadArgument(f"{name} must be {' or '.join(map(repr, allowed))}, not {value!r}")
    resolve_layer(model, layer)
    x = require_batch(x).to(model_device(model))
    channels = channel_indices(channels).to(x.device)
    image_indices = _image_indices(image_indices, channels, len(x))
    calls = trace_calls(model, tuple(x.shape[-2:]))  # in eval mode, model restored
    output = feature_maps(calls[last_call(calls, layer)].output, layer, flat_ok=True)
    check_channels(channels, output.shape[1], layer)
    chain = None if route == "autograd" else _explicit_chain(calls, layer, rectify)
    graph = None
    if chain is None and route != "autograd":
        graph = _probe_graph(model, x, layer, calls, rectify)
        if route == "explicit" and isinstance(graph, str):
            raise BadArgument(f"the explicit deconvnet cannot go down through {graph} on the "
                              f"way to {layer!r} (it takes convs, max pools, batch norm, "
                              "nonlinearities, adds and concatenations; with rectify='captum' "
                              "ReLU modules only)", "use route='autograd' (or 'auto')")
        graph = None if isinstance(graph, str) else graph
    if chain is not None or graph is not None:
        acts = (Counter(type(link.module).__name__ for link in chain if link.kind == "act")
                if chain is not None else graph.rectified)
        _warn_rectification(model, acts, Counter(), rectify)
    map_size = tuple(output.shape[-2:]) if output.dim() == 4 else (1, 1)
    if activations is not None:
        activations = _checked_activations(activations, positions, mode, len(channels), x)
    if positions is not None:
        positions = _checked_positions(positions, len(channels), map_size, layer, x.device)
    elif mode == "max":
        positions = _strongest(model, x, layer, calls, channels, image_indices)
    distinct, distinct_rows = torch.unique(image_indices, return_inverse=True)
    crops = None
    if chain is None and route != "explicit" and mode == "max" and output.dim() == 4 and (
            graph is None or _crops_pay(graph, positions, len(distinct), activations is not None,
                                        tuple(x.shape[-2:]))):
        crops = _autograd_crops(model, layer, calls, tuple(x.shape[-2:]), positions)
        graph = None if crops is not None else graph
    autograd = chain is None and graph is None
    # whole forward passes pay off when many projections share an image
    share_forward = (chain is not None and mode == "max" and len(distinct) *
                     _cost(chain, map_size) < len(image_indices) * _cost(chain, (1, 1)))
    # uncropped autograd: one forward pass per image where images hold several projections
    per_image = autograd and crops is None and len(image_indices) >= 2 * len(distinct)
    return _Plan(x, layer, channels, image_indices, positions, mode, chain, calls, map_size,
                 rectify, batch_size, distinct, distinct_rows, share_forward, crops, per_image,
                 graph, activations)


# Calibrated on ResNet18 and ResNet50 at 224 on 2 CPU cores (bench.py --section deconv): one op
# of the way down for one group costs about as much as 25 M multiply-adds of a large conv (0.5
# ms), and the autograd route's passes on crops run at about a third of the rate of the
# transposed convs. With these the choice matched the faster route on every layer measured.
_OP_OVERHEAD = 2.5e7
_AUTOGRAD_SLOWDOWN = 3.0


def _crops_pay(graph: Graph, positions: torch.Tensor, images: int, known: bool,
               size: tuple[int, int]) -> bool:
    """Whether the autograd route on receptive-field crops costs fewer multiply-adds than the
    way down the traced graph, for projections at ``positions`` (P, 2) of ``images`` images.

    Down the graph: each unit's cone, a fixed cost per op and group of projections at one
    position (small cones make the way down overhead-bound), and one forward pass per image
    (only to the last max pool when the activations are ``known``). On crops: a forward and a
    backward pass (about as dear) per projection, on its field's crop."""
    where, counts = torch.unique(positions, dim=0, return_counts=True)
    full = graph.forward_cost()
    down = crops = 0.0
    for position, count in zip(where.tolist(), counts.tolist(), strict=True):
        macs, field = graph.down_cost(tuple(position))
        down += count * macs + len(graph.ops) * _OP_OVERHEAD
        crops += count * 2.0 * _AUTOGRAD_SLOWDOWN * full * field[0] * field[1] / (
            size[0] * size[1])
    return crops < down + images * graph.forward_cost(upto_last_pool=known)


def _checked_activations(activations: Any, positions, mode: Mode, count: int,
                         x: torch.Tensor) -> torch.Tensor:
    """(P,) finite activations, given with the positions they belong to, in "max" mode."""
    if mode != "max" or positions is None:
        raise BadArgument("activations= belong to given positions in \"max\" mode",
                          "give positions= too, or leave activations out")
    activations = torch.as_tensor(activations, dtype=x.dtype, device=x.device).flatten()
    if len(activations) != count:
        raise BadArgument(f"{len(activations)} activations for {count} channels")
    if not bool(torch.isfinite(activations).all()):
        raise BadArgument("an activation is not a finite number",
                          "leave empty top-k slots out")
    return activations


def _probe_graph(model: nn.Module, x: torch.Tensor, layer: str, calls, rectify: Rectify
                 ) -> Graph | str:
    """The way to ``layer`` recorded on one zero image (see ``deconv_graph``), or the name of
    the first op on it that the explicit route cannot go down through."""
    with preserved_state(model, eval_mode=True):
        return record_graph(model, torch.zeros_like(x[:1]), layer, [c.name for c in calls],
                            rectify_all=rectify == "all")


def _autograd_crops(model: nn.Module, layer: str, calls, size: tuple[int, int],
                    positions: torch.Tensor) -> _Crops | None:
    """Each unit's crop (see ``_Crops``), or None where cropping is not exact (an operation
    on the way that is not local, ``geometry.crop_blocker``) or saves nothing (the field
    spans the image)."""
    if crop_blocker(model, layer, size) is not None:
        return None
    field = receptive_fields(model, [layer], size, calls=calls)[layer]
    if field.is_global:
        return None
    starts, lengths = [], []
    for axis in range(2):
        jump, offset, side = field.jump[axis], field.offset[axis], size[axis]
        length = field.size[axis] + offset % jump  # from an aligned start to the field's end
        if length >= side:
            starts.append(torch.zeros_like(positions[:, axis]))
            lengths.append(torch.full_like(positions[:, axis], side))
            continue
        aligned = (positions[:, axis] + offset // jump) * jump
        last = (side - length) // jump * jump  # the last aligned start that fits
        start = torch.where(aligned <= 0, 0, torch.where(aligned + length > side, last, aligned))
        starts.append(start)
        lengths.append(torch.where(aligned + length > side, side - last, length))
    starts, lengths = torch.stack(starts, dim=1), torch.stack(lengths, dim=1)
    if bool((lengths == torch.tensor(size, device=lengths.device)).all()):
        return None
    jumps = torch.tensor(field.jump, device=positions.device)
    return _Crops(starts, lengths, positions - starts // jumps)


def _image_indices(image_indices: Any, channels: torch.Tensor, count: int) -> torch.Tensor:
    """(P,) long: which image of a batch of ``count`` each projection uses (checked)."""
    device = channels.device
    if image_indices is None:
        indices = torch.arange(len(channels), device=device)
    else:
        indices = torch.as_tensor(image_indices, dtype=torch.long, device=device).flatten()
    if len(indices) != len(channels):
        raise BadArgument(f"{len(channels)} channels but {len(indices)} image indices",
                          "give one image index per channel")
    if len(indices) and (indices.min() < 0 or indices.max() >= count):
        raise BadArgument(f"image index {int(indices.max())} out of range for a batch of "
                          f"{count}", "without image_indices=, give one channel per image")
    return indices


def _checked_positions(positions: Any, count: int, map_size: tuple[int, int], layer: str,
                       device) -> torch.Tensor:
    """(P, 2) long units, each inside the layer's map."""
    positions = torch.as_tensor(positions, dtype=torch.long, device=device).view(-1, 2)
    if len(positions) != count:
        raise BadArgument(f"{len(positions)} positions for {count} channels")
    if len(positions) and ((positions < 0).any() or (positions[:, 0] >= map_size[0]).any()
                           or (positions[:, 1] >= map_size[1]).any()):
        raise BadArgument(f"a position lies outside the {map_size[0]}x{map_size[1]} map "
                          f"of {layer!r}")
    return positions


def _strongest(model, x, layer, calls, channels, image_indices) -> torch.Tensor:
    """(P, 2): the strongest unit of each projection's channel in its image, from one forward
    pass per image up to the layer."""
    with preserved_state(model, eval_mode=True), torch.no_grad():
        output = forward_to(model, x, [layer], [c.name for c in calls])[layer]
    if output.dim() == 2:
        return _zeros(len(channels), x.device)
    return strongest_units(output[image_indices, channels])[1]


def _field(model: nn.Module, plan: _Plan) -> tuple[tuple[int, int], torch.Tensor]:
    """Receptive-field size and unclipped top-left corner (P, 2) of each projected unit:
    from the explicit chain's geometry or the traced graph's, else from
    ``receptive_fields``."""
    if plan.chain is not None:
        return _regions(plan.chain, (1, 1))[0], _starts(plan.chain, plan.positions)[0]
    if plan.graph is not None:  # the first unit's field, moved by one jump per unit
        (first, size), (second, _) = plan.graph.field((0, 0)), plan.graph.field((1, 1))
        jump = torch.tensor([b - a for a, b in zip(first, second, strict=True)],
                            device=plan.x.device)
        return size, plan.positions * jump + torch.tensor(first, device=plan.x.device)
    field = receptive_fields(model, [plan.layer], tuple(plan.x.shape[-2:]),
                             calls=plan.calls)[plan.layer]
    if field.is_global:
        return tuple(plan.x.shape[-2:]), torch.zeros_like(plan.positions)
    jump = torch.tensor(field.jump, device=plan.x.device)
    offset = torch.tensor(field.offset, device=plan.x.device)
    return field.size, plan.positions * jump + offset


def _explicit(plan: _Plan, whole: _Forward | None, chunk: slice
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The explicit route for the projections in ``chunk``, from their crops' forward passes
    or from ``whole``, the whole-map passes of the distinct images."""
    chain, device = plan.chain, plan.x.device
    channels, images = plan.channels[chunk], plan.image_indices[chunk]
    positions = plan.positions[chunk] if plan.positions is not None else None
    if whole is None:  # a forward pass per projection, on its receptive field alone
        forward = _chain_forward(chain, plan.x, images, positions, (1, 1))
    else:
        rows = plan.distinct_rows[chunk]
        if plan.mode == "map":
            signal = _select(whole.output[rows], channels, None)
            projected = _chain_backward(chain, whole, signal, rows)
            return projected, _starts(chain, _zeros(len(channels), device))[0]
        forward = _crop_forward(chain, whole, rows, positions, (1, 1))
    rows = torch.arange(len(channels), device=device)
    activation = (forward.output[rows, channels, 0, 0] if plan.activations is None
                  else plan.activations[chunk])
    signal = _select(forward.output, channels, _zeros(len(channels), device), unit=True)
    projected = _chain_backward(chain, forward, signal, rows)
    projected *= activation.view(-1, 1, 1, 1)
    return projected, _starts(chain, positions)[0]


def _explicit_graph(model: nn.Module, plan: _Plan
                    ) -> Iterator[tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]]:
    """The explicit route on the traced graph: one no-grad forward pass per batch of distinct
    images records their switches, then their projections go down, at most ``batch_size`` at
    once, those at one unit position as one group (their cones are the same boxes)."""
    for chunk in _chunks(len(plan.distinct), plan.batch_size):
        x = plan.x[plan.distinct[chunk]]
        if plan.activations is None:
            graph = record_graph(model, x, plan.layer, plan.traced,
                                 rectify_all=plan.rectify == "all")
            same = not isinstance(graph, str) and graph.same_way(plan.graph)
        else:  # only the switches are needed
            graph = record_switches(model, x, plan.graph, plan.layer, plan.traced)
            same = graph is not None
        if not same:
            raise ModelError(f"the forward pass to {plan.layer!r} took another way on these "
                             "images than on a zero image", "use route='autograd'")
        images = plan.distinct_rows - chunk.start
        rows = ((images >= 0) & (images < len(x))).nonzero().flatten()
        if plan.mode == "max":  # neighbours in the order share positions
            rows = rows[_position_order(plan.positions[rows])]
        for part in _chunks(len(rows), plan.batch_size):
            yield from _cones_down(graph, images, plan, rows[part])


def _position_order(positions: torch.Tensor) -> torch.Tensor:
    """(P,) the order that sorts ``positions`` (P, 2) row by row, then column by column."""
    return torch.argsort(positions[:, 0] * (int(positions[:, 1].max()) + 1) + positions[:, 1],
                         stable=True)


def _cones_down(graph: Graph, images: torch.Tensor, plan: _Plan, rows: torch.Tensor
                ) -> Iterator[tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]]:
    """The projections ``rows`` down the graph (``images[rows]``: their rows in its batch),
    as their rows and (crops, starts (P, 2) in the input)."""
    channels = plan.channels[rows]
    if plan.mode == "map":
        groups = [(torch.arange(len(rows)), None)]
    else:
        where, group = torch.unique(plan.positions[rows], dim=0, return_inverse=True)
        groups = [((group == g).nonzero().flatten(), tuple(where[g].tolist()))
                  for g in range(len(where))]
    starts = []
    for members, position in groups:
        if position is None:
            starts.append((members, start_cone(graph, images[rows[members]],
                                               channels[members], None), None))
            continue
        # one signal per channel at this position until the way down meets a max pool
        unique, shared = torch.unique(channels[members], return_inverse=True)
        starts.append((members, start_cone(graph, None, unique, position), shared))
    for members, cone in project_cones(graph, images[rows], starts):
        signal = cone.signal
        if plan.mode == "max":  # the unit's activation times its deconvnet image
            if plan.activations is not None:
                unit = plan.activations[rows[members]]
            else:
                at = plan.positions[rows[members]]
                unit = graph.output[images[rows[members]], channels[members], at[:, 0],
                                    at[:, 1]]
            signal = signal * unit.view(-1, 1, 1, 1)
        corner = torch.tensor(cone.start, device=signal.device).expand(len(members), 2)
        yield rows[members], (signal, corner)


def _autograd_groups(plan: _Plan) -> Iterator[torch.Tensor]:
    """The rows of the autograd route's chunks: projections whose crops have one size (all,
    uncropped), at most ``batch_size`` at once."""
    device = plan.x.device
    if plan.per_image:  # the projections of one image at once
        for row in range(len(plan.distinct)):
            rows = (plan.distinct_rows == row).nonzero().flatten()
            for chunk in _chunks(len(rows), plan.batch_size):
                yield rows[chunk]
        return
    if plan.crops is None:
        for chunk in _chunks(len(plan.channels), plan.batch_size):
            yield torch.arange(chunk.start, chunk.stop, device=device)
        return
    lengths = plan.crops.lengths
    for length in torch.unique(lengths, dim=0):
        rows = (lengths == length).all(dim=1).nonzero().flatten()
        for chunk in _chunks(len(rows), plan.batch_size):
            yield rows[chunk]


def _autograd(model: nn.Module, plan: _Plan, rows: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The autograd route for the projections ``rows``: the model's own backward pass with
    every nonlinearity rectified, one forward pass per projection, on its crop where the
    plan has crops (returned with their starts in the input)."""
    if plan.per_image:
        return _autograd_shared(model, plan, rows)
    channels = plan.channels[rows]
    positions = plan.positions[rows] if plan.positions is not None else None
    starts = _zeros(len(rows), plan.x.device)
    if plan.crops is None:
        x = plan.x[plan.image_indices[rows]]
    else:
        starts = plan.crops.starts[rows]
        length = tuple(plan.crops.lengths[rows[0]].tolist())
        x = crop_batch(plan.x, plan.image_indices[rows], starts, length)
        positions = plan.crops.units[rows]
    x = x.detach().requires_grad_(True)
    unit = plan.mode == "max"
    with _rectified(model, plan.rectify):
        output = forward_to(model, x, [plan.layer], plan.traced)[plan.layer]
        signal = _select(output.detach(), channels, positions if unit else None, unit=unit)
        (grad,) = torch.autograd.grad(output, x, grad_outputs=signal)
    if unit:  # the unit's activation times its deconvnet image
        known = None if plan.activations is None else plan.activations[rows]
        grad *= _unit_activations(signal, output, known).view(-1, 1, 1, 1)
    return grad, starts


def _autograd_shared(model: nn.Module, plan: _Plan, rows: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The autograd route for projections ``rows`` of one image whose fields span it (no
    crop saves anything): one forward pass, then one backward pass per projection through
    the kept graph. The forward pass is as dear as a backward one, so sharing it halves the
    work when an image holds many projections (a top-9 scan's images hold several)."""
    x = plan.x[plan.image_indices[rows[:1]]].detach().requires_grad_(True)
    unit = plan.mode == "max"
    grads = []
    with _rectified(model, plan.rectify):
        output = forward_to(model, x, [plan.layer], plan.traced)[plan.layer]
        for k, row in enumerate(rows.tolist()):
            positions = plan.positions[row:row + 1] if unit else None
            signal = _select(output.detach(), plan.channels[row:row + 1], positions, unit=unit)
            (grad,) = torch.autograd.grad(output, x, grad_outputs=signal,
                                          retain_graph=k + 1 < len(rows))
            if unit:
                known = None if plan.activations is None else plan.activations[row]
                grad = grad * _unit_activations(signal, output, known).view(-1, 1, 1, 1)
            grads.append(grad)
    return torch.cat(grads), _zeros(len(rows), x.device)


def _unit_activations(signal: torch.Tensor, output: torch.Tensor,
                      known: torch.Tensor | None) -> torch.Tensor:
    """(P,) the activation at each projection's unit: ``known`` where given, else read from
    ``output`` where ``signal`` is 1."""
    if known is not None:
        return known
    return (signal * output.detach()).flatten(1).sum(1)


def _chunks(count: int, size: int) -> Iterator[slice]:
    for start in range(0, count, size):
        yield slice(start, min(start + size, count))


def _select(output: torch.Tensor, channels: torch.Tensor, positions: torch.Tensor | None, *,
            unit: bool = False) -> torch.Tensor:
    """The starting signal: zeros but the selected activations (or 1 there, with ``unit``).

    output: (P, C, h, w) or (P, F); positions (P, 2) selects one unit per projection, None the
    whole channel."""
    rows = torch.arange(len(channels), device=output.device)
    signal = torch.zeros_like(output)
    if output.dim() == 2 or positions is None:
        index = (rows, channels)
    else:
        index = (rows, channels, positions[:, 0], positions[:, 1])
    signal[index] = 1.0 if unit else output[index]
    return signal


def _paste_rows(out: torch.Tensor, rows: torch.Tensor, crops: torch.Tensor,
                starts: torch.Tensor, targets: torch.Tensor | tuple) -> None:
    """``paste_batch`` into the rows ``rows`` of ``out`` (any rows, not only a slice)."""
    part = out[rows]
    paste_batch(crops, starts, targets, part)
    out[rows] = part


def _zeros(count: int, device) -> torch.Tensor:
    return torch.zeros(count, 2, dtype=torch.long, device=device)


def _patch_boxes(starts: torch.Tensor, patch: tuple[int, int], size) -> torch.Tensor:
    """(P, 4) fixed-size boxes: each field's box moved inside the image."""
    top = starts[:, 0].clamp(0, size[0] - patch[0])
    left = starts[:, 1].clamp(0, size[1] - patch[1])
    return torch.stack([top, left, top + patch[0], left + patch[1]], dim=1)


# --------------------------------------------------------------------------- top-k patches


@dataclass(frozen=True)
class TopPatches:
    """Fig. 2 of Zeiler & Fergus for one layer: per channel, its top-k units' projections and
    the image patches they came from.

    Attributes:
        layer: the layer's name.
        channels: the channels shown, in order.
        values: (C, k) the units' activations (``-inf`` for an empty slot).
        indices: (C, k) their data-set indices (-1 for an empty slot).
        projections: (C, k, C_in, s, s) each unit's projection inside its patch box.
        images: (C, k, C_in, s, s) the model input inside the same box (normalised).
        boxes: (C, k, 4) the patch boxes (top, left, bottom, right) in the input image.
        route: how the projections were computed (see ``Patches.route``).
    """

    layer: str
    channels: tuple[int, ...]
    values: torch.Tensor
    indices: torch.Tensor
    projections: torch.Tensor
    images: torch.Tensor
    boxes: torch.Tensor
    route: str = ""


def top_patches(model: nn.Module, top: Any, data: Any, layer: str,
                channels: Sequence[int] | None = None, *, route: Route = "auto",
                rectify: Rectify = "all", batch_size: int = 64) -> TopPatches:
    """Project the top-k units of each channel (from ``scan_topk``) and cut their patches.

    Args:
        model: the scanned model.
        top: the ``TopK`` of a scan that included ``layer``.
        data: the data set that was scanned (indices refer to it).
        layer: the layer to show.
        channels: which channels (default: all).
        route: as in ``Deconvnet.project``.
        rectify: as in ``Deconvnet.project``.
    """
    from vizcnn.scan import images_at, model_fingerprint

    if layer not in top.values:
        raise BadArgument(f"layer {layer!r} was not scanned",
                          f"scanned layers: {', '.join(top.layers)}")
    count = top.values[layer].shape[0]
    channels = list(range(count)) if channels is None else channel_indices(channels).tolist()
    check_channels(channels, count, layer)
    indices = top.indices[layer][channels]  # (C, k)
    filled = indices >= 0
    wanted = indices[filled]
    distinct = sorted(set(wanted.tolist()))
    if not distinct:
        raise BadArgument(f"the scan holds no image for {layer!r}")
    x = images_at(model, data, distinct).to(model_device(model))
    row_of = {index: row for row, index in enumerate(distinct)}
    rows = torch.tensor([row_of[int(i)] for i in wanted])
    pair_channels = torch.tensor(channels).view(-1, 1).expand_as(indices)[filled]
    positions = top.positions[layer][channels][filled]
    # the scan's activations, where it scanned these weights: no forward pass need recompute
    known = (top.values[layer][channels][filled]
             if top.fingerprint and top.fingerprint == model_fingerprint(model) else None)
    patches = Deconvnet(model).project_patches(x, layer, pair_channels, image_indices=rows,
                                               positions=positions, activations=known,
                                               route=route, rectify=rectify,
                                               batch_size=batch_size)
    k = indices.shape[1]
    size = patches.projections.shape[1:]

    def spread(values: torch.Tensor, shape) -> torch.Tensor:
        out = values.new_zeros(len(channels), k, *shape)
        out[filled.to(values.device)] = values
        return out

    return TopPatches(layer, tuple(channels), top.values[layer][channels].clone(),
                      indices.clone(), spread(patches.projections, size),
                      spread(patches.images, size), spread(patches.boxes, (4,)), patches.route)
