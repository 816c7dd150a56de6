"""The deconvnet written out on a traced graph, each projection kept to its unit's cone.

For networks that are not chains (residual adds, concatenations) the deconvnet can still be
written out op by op instead of running the model's own backward pass. With every nonlinearity
rectified (``grad_in = relu(grad_out)``), the way down depends on the forward pass only through
the max-pool switches: convolutions, eval-mode batch norm, adds and concatenations are linear
with fixed coefficients. So a no-grad forward pass per batch of images records the graph (which
op fed which) and the switches, and each projection then walks the graph backwards. Three
things follow, and each is used:

- **The cone.** At every tensor the unit's signal is zero outside a box (one position at the
  layer, a window wider at each conv or pool below), so each transposed conv runs on that box
  alone. A ResNet18 ``layer3`` unit's cone covers a few positions of ``layer3``'s maps and about
  half of ``layer2``'s.
- **Shared signals.** Above the first max pool on the way down the signal does not depend on
  the image: projections of one unit (channel and position) in several images, common in a
  top-9 scan, go down together as one signal until they meet the switches.
- **A short forward pass.** Where the units' activations are known (a scan's), the forward
  pass only has to reach the last max pool (``record_switches``).

Batch norm is folded into the conv before it (one pass less on the way down), and projections
whose cones meet in one box at one tensor (a block's input, once the border clips them) go on
as one batch.

The graph is recorded with a ``TorchFunctionMode``: ``conv2d``, ``batch_norm`` (eval mode),
max pooling, the elementwise nonlinearities of ``layers.ACTIVATION_FUNCTIONS``, adds and
subtractions, scaling by a number, concatenation of channels, dropout in eval mode, ``clone``.
Any other op that touches the signal's way (an average pool, a multiplication of two maps, a
reshape, a value read out with ``item()``) makes ``record_graph`` return the op's name instead,
and the caller uses another route.
"""

from __future__ import annotations

import contextlib
import weakref
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from vizcnn.geometry import METADATA_CALLS, Geometry, Pair, as_pair, call_argument
from vizcnn.hooks import forward_to, scoped_hooks
from vizcnn.layers import ACTIVATION_FUNCTIONS, is_activation

__all__ = ["Graph", "activation_modules", "project_cones", "record_graph", "record_switches",
           "start_cone", "transposed_conv"]

_ADD = frozenset({"add", "add_", "__add__", "__iadd__", "__radd__"})
_SUB = frozenset({"sub", "sub_", "__sub__", "__isub__", "__rsub__", "neg", "neg_"})
_SCALE = frozenset({"mul", "mul_", "__mul__", "__imul__", "__rmul__", "div", "div_",
                    "__truediv__", "__itruediv__"})
_SAME = frozenset({"clone", "contiguous", "dropout", "dropout2d", "feature_dropout",
                   "alpha_dropout"})
_CAT = frozenset({"cat", "concat", "concatenate"})
_FEW_CHANNELS = 8  # where a strided transposed conv goes through pixel_shuffle

_POOLS = frozenset({"max_pool2d", "max_pool2d_with_indices", "_max_pool2d"})


@dataclass(frozen=True)
class _Op:
    """One recorded op, seen from the way down.

    kind: "conv", "pool", "norm", "act" (rectified), "sum" (add, subtract, scale: the signal
    goes to each input times ``factors[i]``), "cat" (split by ``splits``).
    """

    kind: str
    inputs: tuple[int, ...]  # the node of each tracked input
    output: int
    input_size: Pair  # (H, W) of the (first) input's map
    output_size: Pair = (1, 1)  # conv: (H, W) of its output map
    geometry: Geometry | None = None  # conv, pool
    weight: torch.Tensor | None = None  # conv: the filters; norm: the per-channel scale (C,)
    groups: int = 1
    factors: tuple[float, ...] = ()  # sum
    splits: tuple[int, ...] = ()  # cat: the channels of each input
    pool: int = -1  # pool: its index in ``Graph.switches``


@dataclass
class Graph:
    """The recorded way from the input (node 0) to the layer's output, and what the way down
    needs from the forward pass: the switches of each max pool (N, C, h, w), indices into the
    pool's input map, and the layer's output (N, C, h, w) for the units' activations."""

    ops: list[_Op]
    output_node: int
    switches: list[torch.Tensor]
    output: torch.Tensor
    rectified: Counter[str]  # the nonlinearities on the way, by kind (for the warning)

    def same_way(self, other: Graph) -> bool:
        """Whether ``other`` (another batch) took the same way through the model."""
        def signature(graph: Graph) -> list[tuple]:
            return [(op.kind, op.inputs, op.output, op.input_size, op.geometry, op.factors,
                     op.splits) for op in graph.ops]
        return signature(self) == signature(other) and self.output_node == other.output_node

    def forward_cost(self, upto_last_pool: bool = False) -> float:
        """Multiply-adds of the convs of one image's forward pass to the layer (or only as far
        as the last max pool)."""
        ops = self.ops
        if upto_last_pool:
            pools = [index for index, op in enumerate(ops) if op.kind == "pool"]
            ops = ops[:pools[-1]] if pools else []
        return float(sum(op.output_size[0] * op.output_size[1] * op.weight.numel()
                         for op in ops if op.kind == "conv"))

    def down_cost(self, position: Pair) -> tuple[float, Pair]:
        """The multiply-adds of the transposed convs on the way down from one unit at
        ``position``, each on its cone's box (see ``project_cones``), and the (h, w) of the
        cone's box in the input (the unit's receptive field, clipped by the border)."""
        total, (_, size) = self._walk_boxes(position, clip=True)
        return total, size

    def field(self, position: Pair) -> tuple[Pair, Pair]:
        """The receptive field of the unit at ``position``: its (y, x) start in the input
        (negative: in the padding) and its (h, w), unclipped."""
        return self._walk_boxes(position, clip=False)[1]

    def _walk_boxes(self, position: Pair, clip: bool) -> tuple[float, tuple[Pair, Pair]]:
        boxes = {self.output_node: (position, (1, 1))}
        total = 0.0
        for op in reversed(self.ops):
            box = boxes.pop(op.output, None)
            if box is None:
                continue
            if op.kind == "conv":
                total += box[1][0] * box[1][1] * op.weight.numel()
            below = _box_down(op, box, clip)
            for node in op.inputs:
                boxes[node] = _box_union(boxes[node], below) if node in boxes else below
        return total, boxes[0]


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


class _Recorder(TorchFunctionMode):
    """Records the ops that the signal's way goes through (see the module docstring); the
    first op it cannot take ends the recording with ``blocker`` set to its name.

    Tensors are known by ``id`` (with a weak reference, so a freed tensor's reused id is not
    mistaken for it); an in-place op gives its tensor a new node."""

    def __init__(self, rectify_all: bool, pools: int | None = None):
        super().__init__()
        self.rectify_all = rectify_all
        self.pools = pools  # stop after this many max pools (None: at the layer)
        self.inside: list[nn.Module] = []  # the activation modules running
        self.ops: list[_Op] = []
        self.switches: list[torch.Tensor] = []
        self.blocker: str | None = None
        self.rectified: Counter[str] = Counter()  # the nonlinearities rectified, by kind
        self._nodes: dict[int, tuple[int, weakref.ref]] = {}
        self._count = 0

    def track(self, tensor: torch.Tensor) -> int:
        node = self._count
        self._count += 1
        self._nodes[id(tensor)] = (node, weakref.ref(tensor))
        return node

    def node(self, value: Any) -> int | None:
        if not isinstance(value, torch.Tensor):
            return None
        entry = self._nodes.get(id(value))
        return entry[0] if entry is not None and entry[1]() is value else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.blocker is not None:
            return func(*args, **kwargs)
        tracked = [t for t in _tensors((args, kwargs)) if self.node(t) is not None]
        if not tracked:
            return func(*args, **kwargs)
        name = getattr(func, "__name__", str(func))
        if name in _POOLS:
            return self._pool(name, args, kwargs)
        inputs = [self.node(t) for t in tracked]  # before an in-place op renames them
        result = func(*args, **kwargs)
        if not isinstance(result, torch.Tensor):
            if name not in METADATA_CALLS:  # a value read out (item(), bool()) may steer the way
                self.blocker = name
            return result
        op = self._op(name, args, kwargs, tracked, inputs, result)
        if op is None:
            self.blocker = name
        else:
            self.ops.append(op)
        return result

    def _op(self, name: str, args: tuple, kwargs: dict, tracked: list[torch.Tensor],
            inputs: list[int], result: torch.Tensor) -> _Op | None:
        first = args[0] if args else None
        size = tuple(tracked[0].shape[-2:]) if tracked[0].dim() == 4 else (1, 1)
        if name in _CAT:
            tensors = args[0] if args else kwargs.get("tensors")
            dim = call_argument(args, kwargs, 1, "dim", 0)
            if dim not in (1, -3) or any(self.node(t) is None for t in tensors):
                return None
            return _Op("cat", tuple(inputs), self.track(result), size,
                       splits=tuple(t.shape[1] for t in tensors))
        if self.node(first) is None:
            return None  # the signal's tensor must come first
        if name == "conv2d":
            return self._conv(args, kwargs, inputs, result, size)
        if first.shape != result.shape:
            return None
        if name == "batch_norm":
            if call_argument(args, kwargs, 5, "training", False):
                return None
            var, weight = call_argument(args, kwargs, 2, "running_var", None), \
                call_argument(args, kwargs, 3, "weight", None)
            eps = call_argument(args, kwargs, 7, "eps", 1e-5)
            scale = torch.rsqrt(var + eps) * (weight if weight is not None else 1.0)
            return _Op("norm", tuple(inputs), self.track(result), size, weight=scale)
        if name in ACTIVATION_FUNCTIONS:
            module = self.inside[-1] if self.inside else None
            if not (self.rectify_all or isinstance(module, nn.ReLU)):
                return None  # keeps its ordinary gradient: needs the model's own backward
            self.rectified[type(module).__name__ if module is not None
                           else f"F.{name.strip('_')}"] += 1
            return _Op("act", tuple(inputs), self.track(result), size)
        if name in _SAME:
            dropping = name not in ("clone", "contiguous") and \
                call_argument(args, kwargs, 2, "training", True)
            return None if dropping else _Op("sum", tuple(inputs), self.track(result), size,
                                             factors=(1.0,))
        return self._sum(name, args, kwargs, tracked, inputs, result, size)

    def _conv(self, args, kwargs, inputs, result, size) -> _Op | None:
        weight = call_argument(args, kwargs, 1, "weight", None)
        if self.node(weight) is not None or len(inputs) != 1 or weight.dim() != 4:
            return None
        kernel = tuple(weight.shape[-2:])
        stride = as_pair(call_argument(args, kwargs, 3, "stride", 1))
        dilation = as_pair(call_argument(args, kwargs, 5, "dilation", 1))
        padding = call_argument(args, kwargs, 4, "padding", 0)
        if padding == "valid":
            padding = (0, 0)
        elif padding == "same":  # PyTorch pads D (K - 1) // 2 before, the rest after
            padding = tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation, strict=True))
        geometry = Geometry("conv", kernel, stride, as_pair(padding), dilation)
        return _Op("conv", tuple(inputs), self.track(result), size,
                   tuple(result.shape[-2:]), geometry, weight.detach(),
                   groups=int(call_argument(args, kwargs, 6, "groups", 1)))

    def _sum(self, name, args, kwargs, tracked, inputs, result, size) -> _Op | None:
        """Adds, subtractions and scaling by numbers: the signal goes to each input on the way
        times a factor (a constant added takes none). Anything that multiplies two tensors or
        broadcasts the signal is refused."""
        if any(t.shape != result.shape for t in tracked):
            return None
        other = call_argument(args, kwargs, 1, "other", None)
        if name in _SCALE:
            if not isinstance(other, (int, float)) or isinstance(other, bool):
                return None
            divides = "div" in name
            return _Op("sum", tuple(inputs), self.track(result), size,
                       factors=(1.0 / other if divides else float(other),))
        if name not in _ADD and name not in _SUB:
            return None
        if name in ("neg", "neg_"):
            factors = (-1.0,)
        elif name == "__rsub__":  # other - self
            factors = (-1.0, 1.0)
        else:
            alpha = float(kwargs.get("alpha", 1.0))
            factors = (1.0, -alpha if name in _SUB else alpha)
        factors = factors[:len(inputs)]
        if len(inputs) == 2 and inputs[0] == inputs[1]:  # x + x
            return _Op("sum", inputs[:1], self.track(result), size, factors=(sum(factors),))
        return _Op("sum", tuple(inputs), self.track(result), size, factors=factors)

    def _pool(self, name: str, args: tuple, kwargs: dict):
        """A max pool, run with its switches kept."""
        x = args[0]
        kernel = as_pair(call_argument(args, kwargs, 1, "kernel_size", None))
        stride = call_argument(args, kwargs, 2, "stride", None)
        stride = kernel if stride is None or stride == [] or stride == () else as_pair(stride)
        padding = as_pair(call_argument(args, kwargs, 3, "padding", 0))
        dilation = as_pair(call_argument(args, kwargs, 4, "dilation", 1))
        ceil = bool(call_argument(args, kwargs, 5, "ceil_mode", False))
        wants_indices = name == "max_pool2d_with_indices" or \
            bool(call_argument(args, kwargs, 6, "return_indices", False))
        if self.node(x) is None or x.dim() != 4:
            self.blocker = "max_pool2d"
            return F.max_pool2d(*args, **kwargs)
        out, switches = F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode=ceil,
                                     return_indices=True)
        geometry = Geometry("max", kernel, stride, padding, dilation)
        self.ops.append(_Op("pool", (self.node(x),), self.track(out), tuple(x.shape[-2:]),
                            tuple(out.shape[-2:]), geometry, pool=len(self.switches)))
        self.switches.append(switches)
        if len(self.switches) == self.pools:
            raise _Enough
        return (out, switches) if wants_indices else out


class _Enough(Exception):  # noqa: N818 - not an error: the recording has what it needs
    """Ends a recorded forward pass once it has every switch the way down needs."""


@contextlib.contextmanager
def activation_modules(model: nn.Module, stack: list[nn.Module]) -> Iterator[None]:
    """Keep ``stack`` holding the activation modules running while the block runs, so a
    function mode can tell a module's nonlinearity from a bare function call."""
    def enter(module, inputs):
        stack.append(module)

    def leave(module, inputs, output):
        stack.pop()

    modules = [module for module in model.modules() if is_activation(module)]
    with scoped_hooks(before=[(m, enter) for m in modules], after=[(m, leave) for m in modules]):
        yield


def record_graph(model: nn.Module, x: torch.Tensor, layer: str, traced: Sequence[str], *,
                 rectify_all: bool) -> Graph | str:
    """One no-grad forward pass of ``x`` (N, C_in, H, W) to ``layer``, recorded; the name of
    the first op the written-out deconvnet cannot take, instead, where there is one. The model
    must be in eval mode (the caller's ``preserved_state``)."""
    recorder = _Recorder(rectify_all)
    with torch.no_grad(), activation_modules(model, recorder.inside):
        recorder.track(x)
        with recorder:
            output = forward_to(model, x, [layer], traced)[layer]
    if recorder.blocker is not None:
        return recorder.blocker
    node = recorder.node(output)
    if node is None or output.dim() != 4:
        return "a layer output that is not a feature map on the way"
    return Graph(_norms_folded(recorder.ops, node), node, recorder.switches, output,
                 recorder.rectified)


def record_switches(model: nn.Module, x: torch.Tensor, graph: Graph, layer: str,
                    traced: Sequence[str]) -> Graph | None:
    """``graph`` (recorded on another batch) with the switches of ``x`` (N, C_in, H, W), from a
    forward pass that stops at the last max pool: what the way down needs where the units'
    activations are known already. None if the pass took another way to that pool."""
    pools = [op for op in graph.ops if op.kind == "pool"]
    if not pools:
        return replace(graph, switches=[])
    recorder = _Recorder(rectify_all=True, pools=len(pools))
    with torch.no_grad(), activation_modules(model, recorder.inside):
        recorder.track(x)
        try:
            with recorder:
                forward_to(model, x, [layer], traced)
        except _Enough:
            pass
    seen = [op for op in recorder.ops if op.kind == "pool"]
    if recorder.blocker is not None or seen != pools:
        return None
    return replace(graph, switches=recorder.switches)


def _norms_folded(ops: list[_Op], output_node: int) -> list[_Op]:
    """The ops with each batch norm that alone takes a conv's output folded into that conv's
    filters (scaled per output channel): the way down then skips one pass over the signal."""
    consumers = Counter(node for op in ops for node in op.inputs)
    consumers[output_node] += 1
    producers = {op.output: index for index, op in enumerate(ops)}
    ops, folded = list(ops), set()
    for index, op in enumerate(ops):
        source = producers.get(op.inputs[0]) if op.kind == "norm" else None
        if source is None or ops[source].kind != "conv" or consumers[op.inputs[0]] != 1:
            continue
        conv = ops[source]
        ops[source] = replace(conv, output=op.output,
                              weight=conv.weight * op.weight.view(-1, 1, 1, 1))
        folded.add(index)
    return [op for index, op in enumerate(ops) if index not in folded]


def _box_down(op: _Op, box: tuple[Pair, Pair], clip: bool) -> tuple[Pair, Pair]:
    """The (start, length) box at an op's inputs that its output's box reaches (inside the
    input's map, with ``clip``)."""
    if op.kind not in ("conv", "pool"):
        return box
    (start, length), geometry = box, op.geometry
    first = [s * st - p for s, st, p in zip(start, geometry.stride, geometry.padding,
                                            strict=True)]
    last = [f + n for f, n in zip(first, geometry.input_length(length), strict=True)]
    if clip:
        first = [max(f, 0) for f in first]
        last = [min(e, side) for e, side in zip(last, op.input_size, strict=True)]
    return (tuple(first), (last[0] - first[0], last[1] - first[1]))


def _box_union(a: tuple[Pair, Pair], b: tuple[Pair, Pair]) -> tuple[Pair, Pair]:
    first = [min(x, y) for x, y in zip(a[0], b[0], strict=True)]
    last = [max(x + n, y + m) for x, n, y, m in zip(a[0], a[1], b[0], b[1], strict=True)]
    return (tuple(first), (last[0] - first[0], last[1] - first[1]))


# --------------------------------------------------------------------------- the way down


@dataclass
class _Cone:
    """The signal at one tensor, inside its box: (B, C, h, w) starting at ``start`` (y, x) of
    the tensor's full map; zero outside the box."""

    signal: torch.Tensor
    start: Pair

    @property
    def box(self) -> tuple[Pair, Pair]:
        return self.start, tuple(self.signal.shape[-2:])

    def plus(self, other: _Cone) -> _Cone:
        union = _box_union(self.box, other.box)
        if union == self.box == other.box:
            return _Cone(self.signal + other.signal, self.start)
        if union == self.box:
            total = self.signal.clone()
        else:
            total = self.signal.new_zeros(*self.signal.shape[:2], *union[1])
            _region(total, self, union[0]).add_(self.signal)
        _region(total, other, union[0]).add_(other.signal)
        return _Cone(total, union[0])


def _region(total: torch.Tensor, cone: _Cone, origin: Pair) -> torch.Tensor:
    y, x = cone.start[0] - origin[0], cone.start[1] - origin[1]
    return total[..., y:y + cone.signal.shape[-2], x:x + cone.signal.shape[-1]]


def transposed_conv(signal: torch.Tensor, weight: torch.Tensor, groups: int,
                    geometry: Geometry) -> torch.Tensor:
    """Filter with the transposed filters ``weight`` (the forward conv's (out, in, kh, kw)),
    no padding, no bias: output row r is input row ``start * stride - padding + r``.

    A strided transposed convolution down to a few channels (an input layer's) is computed
    as one ordinary convolution with the ``stride x stride`` phases of the kernel as output
    channels, interleaved by ``pixel_shuffle``: the same sums, about 2x faster on the CPU than
    ``conv_transpose2d`` for AlexNet's 11x11 stride-4 conv1 and ResNet's 7x7 stride-2 one.
    With many channels, rearranging the kernel costs more than it saves (8 ms against 0.5 ms
    for a ResNet18 ``layer3`` conv)."""
    stride = geometry.stride
    out_channels, in_channels, kh, kw = weight.shape
    if (stride[0] != stride[1] or stride[0] == 1 or groups != 1 or in_channels > _FEW_CHANNELS
            or geometry.dilation != (1, 1)):
        return F.conv_transpose2d(signal, weight, None, stride, 0, 0, groups, geometry.dilation)
    step = stride[0]
    taps = (-(-kh // step), -(-kw // step))  # kernel taps per phase
    padded = F.pad(weight, (0, taps[1] * step - kw, 0, taps[0] * step - kh))
    phases = padded.view(out_channels, in_channels, taps[0], step, taps[1], step)
    phases = phases.permute(1, 3, 5, 0, 2, 4).flip(-1, -2)
    phases = phases.reshape(in_channels * step * step, out_channels, *taps)
    out = F.pixel_shuffle(F.conv2d(signal, phases, padding=(taps[0] - 1, taps[1] - 1)), step)
    height, width = signal.shape[-2:]
    return out[..., :(height - 1) * step + kh, :(width - 1) * step + kw]


def _conv_down(op: _Op, cone: _Cone) -> _Cone:
    """Filter with the transposed filters, and keep the part inside the input's map."""
    signal = cone.signal
    if len(signal) > 1:  # the CPU's transposed convs run faster on channels-last batches
        signal = signal.contiguous(memory_format=torch.channels_last)
    signal = transposed_conv(signal, op.weight, op.groups, op.geometry)
    (y, x), _ = _box_down(op, cone.box, clip=False)  # where the filtered signal starts
    (top, left), (height, width) = _box_down(op, cone.box, clip=True)
    return _Cone(signal[..., top - y:top - y + height, left - x:left - x + width], (top, left))


def _pool_down(op: _Op, cone: _Cone, switches: torch.Tensor, images: torch.Tensor) -> _Cone:
    """Unpool ``cone`` with the switches of its projections' ``images`` (B,) (rows of the
    pool's switches (N, C, h, w)): each signal goes to its window's argmax; where windows share
    one, the signals add. The switches index the whole input map, so the signals are scattered
    there (cheaper than re-indexing the switches into the box) and the box is cut out."""
    (y, x), (height, width) = cone.box
    rows, cols = op.input_size
    picked = switches[images, :, y:y + height, x:x + width]
    batch, channels = cone.signal.shape[:2]
    unpooled = cone.signal.new_zeros(batch, channels, rows * cols)
    unpooled.scatter_add_(2, picked.reshape(batch, channels, -1),
                          cone.signal.reshape(batch, channels, -1))
    (top, left), (box_rows, box_cols) = _box_down(op, cone.box, clip=True)
    full = unpooled.view(batch, channels, rows, cols)
    return _Cone(full[..., top:top + box_rows, left:left + box_cols], (top, left))


def start_cone(graph: Graph, images: torch.Tensor, channels: torch.Tensor,
               position: Pair | None) -> _Cone:
    """The deconvnet's starting signal for projections of ``channels`` (B,) in ``images`` (B,)
    (rows of the graph's batch): 1 at the unit ``position`` ("max" mode; the caller multiplies
    by the unit's activation), or the channel's whole map as it is (``position`` None)."""
    rows = torch.arange(len(channels), device=channels.device)
    output = graph.output
    if position is None:
        signal = torch.zeros(len(channels), *output.shape[1:], dtype=output.dtype,
                             device=output.device)
        signal[rows, channels] = output[images, channels]
        return _Cone(signal, (0, 0))
    signal = output.new_zeros(len(channels), output.shape[1], 1, 1)
    signal[rows, channels] = 1.0
    return _Cone(signal, position)


@dataclass
class _Walk:
    """Projections going down together: their ``rows`` (B,) in the caller's list, their
    ``images`` (B,) (rows of the graph's batch), and the signal at each tensor still to be
    passed down. Above the first max pool on the way down the signal does not depend on the
    image, so projections of one unit (channel and position) in several images share one
    signal: projection b's is row ``shared[b]`` (None: row b)."""

    rows: torch.Tensor
    images: torch.Tensor
    cones: dict[int, _Cone]
    shared: torch.Tensor | None = None

    def spread(self) -> None:
        """One signal per projection from here on (the switches differ per image)."""
        if self.shared is not None:
            self.cones = {node: _Cone(cone.signal[self.shared], cone.start)
                          for node, cone in self.cones.items()}
            self.shared = None


def project_cones(graph: Graph, images: torch.Tensor,
                  starts: Sequence[tuple[torch.Tensor, _Cone, torch.Tensor | None]]
                  ) -> list[tuple[torch.Tensor, _Cone]]:
    """The deconvnet from the layer down to the input, for groups of projections: each group
    is its rows (B,) in ``images`` (rows of the graph's batch), its starting cone (U, C, h,
    w) at the layer and which of its U signals each projection starts from ((B,), or None:
    one each). Groups whose signals meet in one box at one tensor (at a block's input, where
    the fields are clipped by the image's border) go on as one batch, which the CPU filters
    faster. Returns (rows, the input's cone (B, C_in, h, w) from its start (y, x)) per group
    that reached the input."""
    walks = [_Walk(rows, images[rows], {graph.output_node: cone}, shared)
             for rows, cone, shared in starts]
    for op in reversed(graph.ops):
        for walk in walks:
            if op.output not in walk.cones:
                continue
            if op.kind == "pool":
                walk.spread()
            cone = walk.cones.pop(op.output)
            below_op = _down(op, cone, graph.switches, walk.images)
            for node, below in zip(op.inputs, below_op, strict=True):
                walk.cones[node] = walk.cones[node].plus(below) if node in walk.cones else below
        walks = _merged(walks)
    for walk in walks:
        walk.spread()
    return [(walk.rows, walk.cones[0]) for walk in walks]


def _merged(walks: list[_Walk]) -> list[_Walk]:
    """Walks whose whole signal sits at one tensor in the same box, as one walk."""
    if len(walks) < 2 or any(len(walk.cones) != 1 for walk in walks):
        return walks
    meeting: dict[tuple, list[_Walk]] = {}
    for walk in walks:
        ((node, cone),) = walk.cones.items()
        meeting.setdefault((node, *cone.box), []).append(walk)
    merged = []
    for (node, start, _), group in meeting.items():
        if len(group) == 1:
            merged.extend(group)
            continue
        signals = [walk.cones[node].signal for walk in group]
        shared = None
        if any(walk.shared is not None for walk in group):
            offsets = torch.tensor([0] + [len(s) for s in signals[:-1]]).cumsum(0).tolist()
            shared = torch.cat([(walk.shared if walk.shared is not None
                                 else torch.arange(len(walk.rows), device=walk.rows.device))
                                + offset for walk, offset in zip(group, offsets, strict=True)])
        merged.append(_Walk(torch.cat([walk.rows for walk in group]),
                            torch.cat([walk.images for walk in group]),
                            {node: _Cone(torch.cat(signals), start)}, shared))
    return merged


def _down(op: _Op, cone: _Cone, switches: list[torch.Tensor], images: torch.Tensor
          ) -> list[_Cone]:
    """The signal at each input of ``op`` from the signal at its output."""
    if op.kind == "conv":
        return [_conv_down(op, cone)]
    if op.kind == "pool":
        return [_pool_down(op, cone, switches[op.pool], images)]
    if op.kind == "act":
        return [_Cone(cone.signal.clamp_min(0.0), cone.start)]
    if op.kind == "norm":
        return [_Cone(cone.signal * op.weight.view(1, -1, 1, 1), cone.start)]
    if op.kind == "cat":
        return [_Cone(part, cone.start) for part in cone.signal.split(list(op.splits), dim=1)]
    return [_Cone(cone.signal if f == 1.0 else cone.signal * f, cone.start)
            for f in op.factors]
