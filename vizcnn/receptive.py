"""Receptive fields: which box of input pixels each unit of a layer can see.

Two methods give the same answer wherever both apply:

- **analytic**, for a chain of conv / pool / pointwise layers (AlexNet, VGG, ZFNetMini): with
  kernel K, stride S, padding P and dilation D, each layer grows the size by
  (D(K - 1)) x jump, moves the offset by -P x jump and multiplies the jump by S; the output size
  is O = floor((W - K + 2P) / S) + 1.
- **gradient**, for any other graph (residual adds, concatenations, functional ops): the support
  of d unit / d input. A naive gradient under-counts (a max pool routes the gradient to one input
  only, a ReLU zeroes it where the unit is off, weights of opposite signs can cancel), so the
  gradient is taken on a *linearised stand-in*: every weight replaced by 1 / fan_in, biases and
  batch-norm shifts by 0, and max pools by average pools of the same window. Every path from a
  pixel to the unit then has a positive weight, so the support is exactly the receptive field.
  The stand-in runs through ``torch.func.functional_call``, so the model's own parameters are
  never touched.

A chain is recognised by tracing one forward pass: every leaf module up to the layer must consume
exactly the tensor that the previous one produced (so a functional op or a branch in between
sends the layer to the gradient method).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from vizcnn.errors import BadArgument, Unsupported
from vizcnn.geometry import (
    LayerCall,
    Pair,
    as_pair,
    chain_calls,
    geometry_of,
    input_channels,
    last_call,
    trace_calls,
    zero_image,
)
from vizcnn.hooks import model_device, preserved_state, scoped_hooks
from vizcnn.layers import POINTWISE, resolve_layer

__all__ = ["ReceptiveField", "receptive_field", "receptive_fields"]

Method = Literal["auto", "analytic", "gradient"]

_ADAPTIVE = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_LARGEST_SIDE = 4096  # the gradient method enlarges its input up to this side, then gives up
_SMALLEST_SAFE = 1e-30  # float32 gradients below this may have neighbours that underflowed


@dataclass(frozen=True)
class ReceptiveField:
    """The receptive field of the units of one layer, in input pixels, per axis (y, x).

    Attributes:
        size: extent of one unit's box, unclipped (it may reach into the padding).
        jump: input pixels between neighbouring units (the product of strides).
        offset: input coordinate of the top-left pixel of unit (0, 0)'s box; negative where the
            box starts in the padding.
        input_size: the (H, W) the field was computed for; boxes are clipped to it.
        method: "analytic" or "gradient".
        is_global: every unit sees the whole input (linear layers, global pooling); then size is
            the input size and jump is (0, 0).
    """

    size: Pair
    jump: Pair
    offset: Pair
    input_size: Pair
    method: str = field(compare=False)
    is_global: bool = False

    def box(self, y: int, x: int) -> tuple[int, int, int, int]:
        """The input box ``(top, left, bottom, right)`` of unit (y, x), ends exclusive, clipped
        to the image: crop it with ``image[..., top:bottom, left:right]``."""
        height, width = self.input_size
        if self.is_global:
            return 0, 0, height, width
        top = y * self.jump[0] + self.offset[0]
        left = x * self.jump[1] + self.offset[1]
        return (max(top, 0), max(left, 0),
                min(top + self.size[0], height), min(left + self.size[1], width))

    def describe(self) -> tuple[str, str]:
        """Short text for size and jump, as the summary prints them ("163", "7x3", "global")."""
        if self.is_global:
            return "global", "-"
        return _pair_text(self.size), _pair_text(self.jump)


# What a float32 measurement returns when it may have underflowed: measure again in float64.
_UNDERFLOW = ReceptiveField((0, 0), (0, 0), (0, 0), (0, 0), "gradient")


def _pair_text(pair: Pair) -> str:
    return str(pair[0]) if pair[0] == pair[1] else f"{pair[0]}x{pair[1]}"


# --------------------------------------------------------------------------- analytic method


def _analytic(calls: list[LayerCall], end: int, input_size: Pair) -> ReceptiveField | None:
    """The field by the chain formula, or None when the path is no chain of known layers."""
    leaves = chain_calls(calls, end)
    if leaves is None:
        return None
    if not _is_spatial(calls[end].output):
        return _global(input_size, "analytic")
    size, jump, offset = [1, 1], [1, 1], [0, 0]
    for call in leaves:
        geometry = geometry_of(call.module)
        if geometry is None:
            identity_pool = (isinstance(call.module, _ADAPTIVE)
                             and call.inputs[0].shape[-2:] == call.output.shape[-2:])
            if isinstance(call.module, POINTWISE) or identity_pool:
                continue
            return None
        for axis in range(2):
            offset[axis] -= geometry.padding[axis] * jump[axis]
            size[axis] += geometry.reach[axis] * jump[axis]
            jump[axis] *= geometry.stride[axis]
    return ReceptiveField(tuple(size), tuple(jump), tuple(offset), input_size, "analytic")


def _is_spatial(output: Any) -> bool:
    return isinstance(output, torch.Tensor) and output.dim() == 4


def _global(input_size: Pair, method: str) -> ReceptiveField:
    return ReceptiveField(input_size, (0, 0), (0, 0), input_size, method, is_global=True)


# --------------------------------------------------------------------------- gradient method


class _LinearisedPools(TorchFunctionMode):
    """Inside this mode max pools average their window (so the gradient reaches every input of
    the window), and adaptive pools that were the identity at the original input size stay the
    identity when the input is enlarged (AlexNet's and VGG's ``avgpool`` at 224 x 224)."""

    _MAX_AS_AVERAGE = {
        "max_pool1d": F.avg_pool1d, "max_pool2d": F.avg_pool2d, "max_pool3d": F.avg_pool3d,
        "max_pool1d_with_indices": F.avg_pool1d, "max_pool2d_with_indices": F.avg_pool2d,
        "max_pool3d_with_indices": F.avg_pool3d,
    }
    _ADAPTIVE_AS_AVERAGE = {
        "adaptive_max_pool1d": F.adaptive_avg_pool1d, "adaptive_max_pool2d": F.adaptive_avg_pool2d,
        "adaptive_avg_pool1d": F.adaptive_avg_pool1d, "adaptive_avg_pool2d": F.adaptive_avg_pool2d,
        "adaptive_max_pool2d_with_indices": F.adaptive_avg_pool2d,
    }

    _REDUCTIONS = frozenset({"mean", "sum", "amax", "amin", "max", "min", "std", "var",
                             "logsumexp"})

    def __init__(self, identity_pools: list[bool] | None):
        super().__init__()
        self.identity_pools = identity_pools  # None: record them (the pass at input_size)
        self.seen: list[bool] = []
        self.resized = False  # an adaptive pool has changed the map size in this pass
        self.after_adaptive: set[str] = set()  # layers that ran after it

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "").lstrip("_")
        if name in self._MAX_AS_AVERAGE:
            return self._max_as_average(self._MAX_AS_AVERAGE[name], *args, **kwargs)
        if name in self._ADAPTIVE_AS_AVERAGE:
            x, output_size = args[0], args[1] if len(args) > 1 else kwargs["output_size"]
            if self.identity_pools is None:
                wanted = torch.nn.modules.utils._ntuple(x.dim() - 2)(output_size)
                current = x.shape[2:]
                self.seen.append(all(w in (None, s) for w, s in zip(wanted, current, strict=True)))
            else:
                self.seen.append(self.identity_pools[len(self.seen)])
            if self.seen[-1]:
                return x
            self.resized = True
            return self._ADAPTIVE_AS_AVERAGE[name](x, output_size)
        if name in self._REDUCTIONS and _reduces_space(args, kwargs):
            self.resized = True  # a global mean (a squeeze-and-excitation gate): every unit after
        return func(*args, **kwargs)

    @staticmethod
    def _max_as_average(average, x, kernel_size, stride=None, padding=0, dilation=1,
                        ceil_mode=False, return_indices=False):
        if dilation not in (1, (1,), (1, 1), (1, 1, 1)):
            raise Unsupported("the gradient receptive field does not support dilated max pools",
                              "use method='analytic' where the layers form a chain")
        out = average(x, kernel_size, stride if stride else kernel_size, padding,
                      ceil_mode=ceil_mode, count_include_pad=False)
        return (out, None) if return_indices else out


def _reduces_space(args: tuple, kwargs: dict) -> bool:
    """Whether a reduction call (``x.mean(dim=(2, 3))``, ``torch.amax(x, -1)``, ``x.sum()``)
    takes a feature map's spatial axes together."""
    x = args[0] if args else kwargs.get("input")
    if not isinstance(x, torch.Tensor) or x.dim() < 3:
        return False
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    if dim is None:
        return True
    if not isinstance(dim, (int, tuple, list)):  # torch.max(x, y): elementwise
        return False
    dims = {d % x.dim() for d in ((dim,) if isinstance(dim, int) else dim)
            if isinstance(d, int)}
    return bool(dims & {x.dim() - 2, x.dim() - 1})


def _linearised_state(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Positive stand-ins for every parameter and buffer: weights 1 / fan_in, biases 0,
    batch-norm statistics mean 0 and variance 1."""
    state: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        if param.dim() >= 2:
            value = torch.full_like(param, 1.0 / param[0].numel(), dtype=dtype)
        elif name.endswith("bias"):
            value = torch.zeros_like(param, dtype=dtype)
        else:
            value = torch.ones_like(param, dtype=dtype)
        state[name] = value
    for name, buffer in model.named_buffers():
        if name.endswith("running_mean"):
            state[name] = torch.zeros_like(buffer, dtype=dtype)
        elif name.endswith("running_var"):
            state[name] = torch.ones_like(buffer, dtype=dtype)
        elif buffer.is_floating_point():
            state[name] = buffer.to(dtype)
    return state


def _gradient(
    model: nn.Module, names: list[str], input_size: Pair, dtype: torch.dtype = torch.float32
) -> dict[str, ReceptiveField]:
    """Fields of several layers from the linearised stand-in.

    Two units are measured per layer, the centre one (in batch item 0) and its diagonal
    neighbour (item 1), in one backward pass: their boxes give size, jump and offset. A box
    that touches the image border may be clipped, so each layer is probed on square inputs of
    growing side (16, 32, 64, ...) until both boxes lie inside; small probes keep this cheap, and
    a conv/pool field does not depend on the input size. What does depend on it, adaptive pools
    that are the identity at ``input_size`` (AlexNet's and VGG's ``avgpool`` at 224), is
    recorded at ``input_size`` first and kept so. A layer whose output at ``input_size`` comes
    after an adaptive pool that changes the map size (global pooling), or is not spatial (linear
    layers), is global: its field depends on the input size.
    """
    device = model_device(model)
    state = _linearised_state(model, dtype)
    modules = {name: resolve_layer(model, name) for name in names}
    channels = input_channels(model)
    recorder = _LinearisedPools(None)
    with torch.no_grad():
        x = zero_image(model, (1, channels, *input_size), dtype).fill_(1.0)
        outputs, error = _linearised_forward(model, modules, state, x, recorder)
    if error is not None and len(outputs) < len(modules):
        missing = next(name for name in modules if name not in outputs)
        raise BadArgument(f"cannot measure the receptive field of {missing!r} at input size "
                          f"{input_size[0]}x{input_size[1]}: "
                          f"{str(error).strip().splitlines()[0] if str(error).strip() else error}",
                          "use another --input-size")
    results = {n: _global(input_size, "gradient") for n in names
               if not _is_spatial(outputs[n]) or n in recorder.after_adaptive}
    side = 16
    while len(results) < len(names):
        if side > _LARGEST_SIDE:
            missing = ", ".join(n for n in names if n not in results)
            raise Unsupported(f"could not measure the receptive field of {missing}: it spans "
                              f"more than {_LARGEST_SIDE} pixels")
        x = torch.ones(2, channels, side, side, device=device, dtype=dtype, requires_grad=True)
        pending = {n: modules[n] for n in names if n not in results}
        outputs, _ = _linearised_forward(model, pending, state, x,
                                         _LinearisedPools(recorder.seen))
        for name, output in outputs.items():  # in the order the layers ran
            field = _measure(output, x, input_size)
            if field is None:
                break  # later layers see at least as much, as a rule: try them on the next side
            results[name] = field
        side *= 2
    underflowed = [name for name, field in results.items() if field is _UNDERFLOW]
    if underflowed:
        results.update(_gradient(model, underflowed, input_size, torch.float64))
    return results


def _linearised_forward(model, modules, state, x, pools) -> tuple[dict[str, Any], Exception | None]:
    """Forward the linearised stand-in; returns the (non-detached) output of each module's last
    call, and the error that stopped the pass, if any. An error after the modules ran (a
    classifier that expects another input size) does not matter here; one before them (an input
    too small for the early pools) leaves them out of the outputs."""
    outputs: dict[str, Any] = {}
    error = None

    def store(name):
        def hook(module, inputs, output):
            outputs[name] = output
            if pools.resized:
                pools.after_adaptive.add(name)
        return hook

    with preserved_state(model, eval_mode=True):
        try:
            with scoped_hooks(after=[(module, store(name)) for name, module in modules.items()]), \
                    pools:
                torch.func.functional_call(model, state, (x,), strict=False)
        except (RuntimeError, ValueError) as caught:
            error = caught
    return outputs, error


def _measure(output: torch.Tensor, x: torch.Tensor, input_size: Pair) -> ReceptiveField | None:
    """Size, jump and offset from the boxes of two neighbouring units; None if either box may be
    clipped by the border (or the map has a single row or column)."""
    height, width = output.shape[2:]
    if height < 2 or width < 2:
        return None
    cy, cx = (height - 1) // 2, (width - 1) // 2
    target = output[0, :, cy, cx].sum() + output[1, :, cy + 1, cx + 1].sum()
    (grad,) = torch.autograd.grad(target, x, retain_graph=True)
    magnitude = grad.abs().sum(dim=1)  # (2, H, W)
    support = magnitude > 0
    if not support.any():
        return None
    if x.dtype == torch.float32 and magnitude[support].min() < _SMALLEST_SAFE:
        return _UNDERFLOW
    boxes = []
    for item in range(2):
        rows = support[item].any(dim=1).nonzero().flatten()
        cols = support[item].any(dim=0).nonzero().flatten()
        if len(rows) == 0:
            return None
        box = (int(rows[0]), int(cols[0]), int(rows[-1]), int(cols[-1]))
        if box[0] < 1 or box[1] < 1 or box[2] > x.shape[2] - 2 or box[3] > x.shape[3] - 2:
            return None
        boxes.append(box)
    (top, left, bottom, right), (next_top, next_left, _, _) = boxes
    jump = (next_top - top, next_left - left)
    return ReceptiveField(
        size=(bottom - top + 1, right - left + 1),
        jump=jump,
        offset=(top - cy * jump[0], left - cx * jump[1]),
        input_size=input_size,
        method="gradient",
    )


# --------------------------------------------------------------------------- public functions


def receptive_fields(
    model: nn.Module,
    layers: Sequence[str],
    input_size: int | Sequence[int],
    *,
    method: Method = "auto",
    calls: list[LayerCall] | None = None,
) -> dict[str, ReceptiveField]:
    """Receptive fields of several layers, sharing one trace and one gradient computation.

    Args:
        model: the network; it is left exactly as it was (no hooks, same modes, same weights).
        layers: dotted layer names.
        input_size: H or (H, W) of the input image.
        method: "auto" (analytic for chains, gradient otherwise), "analytic" (raises for a
            layer that is not on a chain) or "gradient".
        calls: a trace from ``trace_calls`` at this input size, to skip tracing again.
    """
    if method not in ("auto", "analytic", "gradient"):
        raise BadArgument(f"method must be auto, analytic or gradient, not {method!r}")
    input_size = as_pair(input_size, "input size")
    for name in layers:
        resolve_layer(model, name)
    calls = calls if calls is not None else trace_calls(model, input_size)
    results: dict[str, ReceptiveField] = {}
    for name in layers:
        end = last_call(calls, name)
        field = None if method == "gradient" else _analytic(calls, end, input_size)
        if field is None and method == "analytic":
            raise BadArgument(f"layer {name!r} is not on a chain of conv/pool layers",
                              "use method='gradient' (or 'auto')")
        if field is not None:
            results[name] = field
    rest = [name for name in layers if name not in results]
    if rest:
        results.update(_gradient(model, rest, input_size))
    return {name: results[name] for name in layers}


def receptive_field(
    model: nn.Module,
    layer: str,
    input_size: int | Sequence[int],
    *,
    method: Method = "auto",
) -> ReceptiveField:
    """The receptive field of the units of ``layer`` for an input of ``input_size``.

    Example: ``receptive_field(alexnet, "features.10", 224)`` gives size 163, jump 16, and
    ``.box(6, 6)`` the clipped image box ``(top, left, bottom, right)`` of the centre unit.
    """
    return receptive_fields(model, [layer], input_size, method=method)[layer]

