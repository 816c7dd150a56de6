"""Layer geometry and the forward trace: the one place that knows how a conv or pool maps
positions, and which modules a forward pass calls in which order.

Receptive fields, the deconvnet, occlusion, the scan and the summary all work from these:

- ``geometry_of(module)``: kernel, stride, padding and dilation of a 2-D conv or pool, and the
  crop arithmetic that region-wise computation needs (``n`` outputs need
  ``(n - 1) S + D (K - 1) + 1`` inputs, starting at ``start * S - P``).
- ``trace_calls(model, input_size)``: every module call of one forward pass, in the order the
  calls finished, with what each took and returned.

Which modules act on each position alone (``POINTWISE``) and which are nonlinearities
(``ACTIVATIONS``) is listed once, in ``vizcnn.layers``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from vizcnn.errors import BadArgument, VizCNNError
from vizcnn.hooks import forward_to, model_device, preserved_state, run_forward, scoped_hooks
from vizcnn.layers import ACTIVATION_FUNCTIONS

__all__ = [
    "Geometry",
    "crop_blocker",
    "LayerCall",
    "Pair",
    "Trace",
    "METADATA_CALLS",
    "as_pair",
    "call_argument",
    "chain_calls",
    "geometry_of",
    "input_channels",
    "last_call",
    "trace_calls",
    "traced_names",
    "zero_image",
]

Pair = tuple[int, int]


def as_pair(value: int | Sequence[int], what: str | None = None) -> Pair:
    """An (H, W) pair from ``224`` or ``(224, 224)``.

    Args:
        value: an int, or a sequence of two (of one or two without ``what``).
        what: names a user's argument (``"input size"``, ``"window"``): then both must be
            positive integers, or a ``BadArgument`` says so. Without it the value is a
            module's or a call's own attribute, taken as it is (padding may be 0; PyTorch
            stores some as a tuple of one).
    """
    if what is None:
        return (value, value) if isinstance(value, int) else (int(value[0]), int(value[-1]))
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                 for v in pair):
        raise BadArgument(f"{what} must be a positive integer or two (H W), got {value!r}")
    return pair  # type: ignore[return-value]


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class Geometry:
    """How a 2-D conv or pool maps positions, per axis (y, x).

    Attributes:
        kind: "conv", "max" (max pool) or "avg" (average pool).
        kernel, stride, dilation: as the module has them.
        padding: the padding before the map (top, left). ``padding="same"`` with an even kernel
            pads one more after the map, which needs no number here: it lies outside the map.
        exact_on_crops: whether the layer, run without padding on a crop of its input that is
            filled with ``pad_value`` outside the map, gives exactly its own outputs (zero
            padding, no ceil-mode or pad-excluding average).
    """

    kind: Literal["conv", "max", "avg"]
    kernel: Pair
    stride: Pair
    padding: Pair
    dilation: Pair
    exact_on_crops: bool = True

    @property
    def reach(self) -> Pair:
        """D (K - 1): how far past its first input pixel one output's window reaches."""
        return (self.dilation[0] * (self.kernel[0] - 1), self.dilation[1] * (self.kernel[1] - 1))

    @property
    def pad_value(self) -> float:
        """What the padding holds as this layer sees it: -inf for a max pool, else 0."""
        return float("-inf") if self.kind == "max" else 0.0

    def input_length(self, length: Pair) -> Pair:
        """Inputs that ``length`` neighbouring outputs depend on: (n - 1) S + D (K - 1) + 1."""
        return ((length[0] - 1) * self.stride[0] + self.reach[0] + 1,
                (length[1] - 1) * self.stride[1] + self.reach[1] + 1)

    def input_start(self, start: torch.Tensor) -> torch.Tensor:
        """(P, 2) first input position of the window of output ``start`` (P, 2): start S - P
        (negative: in the padding)."""
        stride = torch.tensor(self.stride, device=start.device)
        padding = torch.tensor(self.padding, device=start.device)
        return start * stride - padding

    def outputs_touched(self, first: torch.Tensor, last: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """The first and last output (P, 2 each, unclipped) whose windows touch inputs
        ``first`` to ``last`` (P, 2 each, inclusive)."""
        stride = torch.tensor(self.stride, device=first.device)
        padding = torch.tensor(self.padding, device=first.device)
        reach = torch.tensor(self.reach, device=first.device)
        low = torch.div(first + padding - reach + stride - 1, stride, rounding_mode="floor")
        high = torch.div(last + padding, stride, rounding_mode="floor")
        return low, high


def geometry_of(module: nn.Module) -> Geometry | None:
    """The ``Geometry`` of a 2-D conv, max pool or average pool; None for any other module."""
    if isinstance(module, nn.Conv2d):
        kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
        padding = module.padding
        if padding == "valid":
            padding = (0, 0)
        elif padding == "same":  # PyTorch pads D (K - 1) // 2 before, the rest after
            padding = tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation, strict=True))
        return Geometry("conv", as_pair(kernel), as_pair(stride), as_pair(padding),
                        as_pair(dilation), exact_on_crops=module.padding_mode == "zeros")
    if isinstance(module, nn.MaxPool2d):
        return Geometry("max", as_pair(module.kernel_size),
                        as_pair(module.stride or module.kernel_size), as_pair(module.padding),
                        as_pair(module.dilation))
    if isinstance(module, nn.AvgPool2d):
        padding = as_pair(module.padding)
        # a window that counts only its pixels inside the map has a divisor a crop cannot know
        exact = (module.divisor_override is None and not module.ceil_mode
                 and (module.count_include_pad or padding == (0, 0)))
        return Geometry("avg", as_pair(module.kernel_size),
                        as_pair(module.stride or module.kernel_size), padding, (1, 1),
                        exact_on_crops=exact)
    return None


# --------------------------------------------------------------------------- the forward trace


@dataclass
class LayerCall:
    """One module call seen while tracing: what it took and what it returned.

    ``input_version`` and ``output_version`` are the tensors' in-place version counters at call
    and return time, so an in-place op between two layers (ResNet's ``out += identity``) shows.
    """

    name: str
    module: nn.Module
    inputs: tuple[Any, ...]
    output: Any
    input_version: int = -1
    output_version: int = -1


class Trace(list):
    """The ``LayerCall`` list of one traced forward pass. ``error`` is the one-line error that
    ended the pass early (a head that rejects the input size, a layer the input is too small
    for), or None: the calls before it are kept, so questions about earlier layers still work."""

    error: VizCNNError | None = None


def input_channels(model: nn.Module) -> int:
    """Channels the model's first convolution expects (3 when it has none)."""
    for module in model.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return module.in_channels
    return 3


def _version(value: Any) -> int:
    return value._version if isinstance(value, torch.Tensor) else -1


def trace_calls(model: nn.Module, input_size: Pair) -> Trace:
    """Run one eval-mode, no-grad forward pass on a zero image and record every module call
    (containers too) in the order the calls finished; the first entry is the input itself.
    A failure of the model's forward pass ends the trace early (see ``Trace.error``). The
    model is left as it was."""
    names = {module: name for name, module in model.named_modules() if name}
    calls = Trace()
    entered: list[int] = []

    def enter(module: nn.Module, inputs: tuple) -> None:
        entered.append(_version(inputs[0]) if inputs else -1)

    def leave(module: nn.Module, inputs: tuple, output: Any) -> None:
        calls.append(LayerCall(names[module], module, inputs, output, entered.pop(),
                               _version(output)))

    x = zero_image(model, (1, input_channels(model), *input_size))
    calls.append(LayerCall("", model, (), x, output_version=_version(x)))
    with (preserved_state(model, eval_mode=True), torch.no_grad(),
          scoped_hooks(before=[(m, enter) for m in names], after=[(m, leave) for m in names])):
        try:
            run_forward(model, x)
        except VizCNNError as error:
            calls.error = error
    return calls


def zero_image(model: nn.Module, shape: tuple[int, ...], dtype=torch.float32) -> torch.Tensor:
    """A zero input of ``shape`` on the model's device, or a one-line error when it does not
    fit in memory."""
    try:
        return torch.zeros(shape, device=model_device(model), dtype=dtype)
    except (RuntimeError, MemoryError):
        size = "x".join(map(str, shape[1:]))
        raise BadArgument(f"not enough memory for an input of {size}",
                          "use a smaller --input-size") from None


def last_call(calls: list[LayerCall], name: str) -> int:
    """The index of ``name``'s last call in a trace; an error if it never ran (saying why, if
    the trace ended early)."""
    for index in range(len(calls) - 1, 0, -1):
        if calls[index].name == name:
            return index
    error = getattr(calls, "error", None)
    if error is not None:
        raise type(error)(f"{error.message}, before layer {name!r} ran", error.hint)
    raise BadArgument(f"layer {name!r} is never called in the model's forward pass",
                      "pick a layer that the forward pass uses")


def traced_names(model: nn.Module, input_size: Pair, layers: Sequence[str]) -> list[str]:
    """The names of one traced forward pass's calls (for ``hooks.forward_to``), after checking
    that every layer in ``layers`` runs at this input size."""
    calls = trace_calls(model, tuple(input_size))
    for name in layers:
        last_call(calls, name)
    return [call.name for call in calls]


def chain_calls(calls: list[LayerCall], end: int) -> list[LayerCall] | None:
    """The leaf calls from the input to ``calls[end]`` if they form a simple chain (each
    consumes exactly what the previous one produced, untouched), else None."""
    leaves = [c for c in calls[1:end + 1] if next(c.module.children(), None) is None]
    previous = calls[0]
    for call in leaves:
        tensors = [i for i in call.inputs if isinstance(i, torch.Tensor)]
        if (len(tensors) != 1 or tensors[0] is not previous.output
                or call.input_version != previous.output_version):
            return None
        previous = call
    target = calls[end]
    same_tensor = previous.output is target.output
    return leaves if same_tensor and previous.output_version == target.output_version else None


# --------------------------------------------------------------------------- locality

# Functions that compute each output position from a window of positions (or from the same
# position) of their inputs, with the same grid whatever the input size: a graph made of these
# alone can run on a crop of the input and reproduce the full map's values wherever the crop
# holds the whole receptive field (with the model's own padding at the image's border).
_POINTWISE_FUNCTIONS = frozenset({
    "add", "add_", "__add__", "__iadd__", "__radd__", "sub", "sub_", "__sub__", "__rsub__",
    "mul", "mul_", "__mul__", "__imul__", "__rmul__", "div", "div_", "__truediv__", "neg",
    "clone", "contiguous", "clamp", "clamp_", "clamp_min", "clamp_min_",
})
# calls that read a tensor's shape, type or layout, never its values
METADATA_CALLS = frozenset({"dim", "size", "__get__", "numel", "__len__", "is_floating_point",
                            "stride", "is_contiguous", "get_device", "element_size",
                            "ndimension", "nelement", "is_complex"})


def call_argument(args: tuple, kwargs: dict, position: int, name: str, default: Any) -> Any:
    """A function call's argument, given by position or by name (``__torch_function__``)."""
    return args[position] if len(args) > position else kwargs.get(name, default)


def _not_local(name: str, args: tuple, kwargs: dict) -> str | None:
    """Why one call is not local (a few words), or None when it is."""
    if name in METADATA_CALLS or name in _POINTWISE_FUNCTIONS or name in ACTIVATION_FUNCTIONS:
        return None
    if name == "conv2d":
        padding = call_argument(args, kwargs, 4, "padding", 0)
        return "a conv with padding given as a string" if isinstance(padding, str) else None
    if name in ("max_pool2d", "max_pool2d_with_indices", "avg_pool2d"):
        ceil = call_argument(args, kwargs, 5 if name != "avg_pool2d" else 4, "ceil_mode", False)
        return f"a ceil-mode {name}" if ceil else None
    if name == "batch_norm":  # eval mode with running statistics: a per-channel affine map
        training = call_argument(args, kwargs, 5, "training", False)
        return "batch norm on batch statistics" if training else None
    if name in ("dropout", "dropout2d", "feature_dropout", "alpha_dropout"):
        return "dropout in training mode" if call_argument(args, kwargs, 2, "training", True) \
            else None
    if name in ("cat", "concatenate", "concat"):
        dim = call_argument(args, kwargs, 1, "dim", 0)
        return None if dim in (1, -3) else f"a concatenation along dim {dim}"
    return name


class _LocalityRecorder(TorchFunctionMode):
    """Records the first call that is not local (see ``_not_local``)."""

    def __init__(self):
        super().__init__()
        self.blocker: str | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.blocker is None:
            self.blocker = _not_local(getattr(func, "__name__", str(func)), args, kwargs)
        return func(*args, **kwargs)


def crop_blocker(model: nn.Module, layer: str, input_size: Pair) -> str | None:
    """None when every operation from the input to ``layer`` is local (convs with zero
    padding, max and average pools without ceil mode, batch norm in eval mode, elementwise
    nonlinearities and arithmetic, residual adds, concatenation of channels); else the first
    one that is not, in a few words. Where it is None, a unit of ``layer`` computed on a crop
    of the input that holds its receptive field, aligned to the layer's jump, equals the unit
    computed on the whole input."""
    names = traced_names(model, input_size, [layer])
    recorder = _LocalityRecorder()
    x = zero_image(model, (1, input_channels(model), *input_size))
    with preserved_state(model, eval_mode=True), torch.no_grad(), recorder:
        forward_to(model, x, [layer], names)
    return recorder.blocker
