"""Scoped forward hooks: capture a model's intermediate outputs and leave the model as it was.

Every hook vizcnn adds lives inside a ``with`` block or a single call and is removed in
``finally``. Captured tensors are clones, so an in-place ReLU that runs after a convolution cannot
overwrite the convolution's captured output. Tensors stay on the model's device unless
``to_cpu=True`` is asked for.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal

import torch
from torch import nn

from vizcnn.errors import BadArgument, ModelError, VizCNNError
from vizcnn.layers import resolve_layer

__all__ = [
    "activations",
    "capture",
    "finite_images",
    "forward_to",
    "model_device",
    "preserved_state",
    "require_batch",
    "require_hookable",
    "run_forward",
    "scoped_hooks",
    "strongest_channels",
    "strongest_units",
]

Calls = Literal["last", "first", "all"]


def _clone(value: Any, detach: bool, to_cpu: bool) -> Any:
    """Clone every tensor in a (possibly nested) module output."""
    if isinstance(value, torch.Tensor):
        value = value.detach() if detach else value
        return value.to("cpu", copy=True) if to_cpu else value.clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_clone(v, detach, to_cpu) for v in value)
    if isinstance(value, dict):
        return {k: _clone(v, detach, to_cpu) for k, v in value.items()}
    return value


@contextlib.contextmanager
def capture(
    model: nn.Module,
    layers: str | Sequence[str],
    *,
    detach: bool = True,
    to_cpu: bool = False,
    calls: Calls = "last",
) -> Iterator[dict[str, Any]]:
    """Record the outputs of the named layers during forward passes run inside the block.

    A module called more than once per forward pass (ResNet's ``BasicBlock`` applies its one
    ``relu`` twice) is handled by ``calls``: ``"last"`` (default) keeps the output of the last
    call, which for a ResNet block's ``relu`` is the block's output; ``"first"`` keeps the first;
    ``"all"`` keeps a list with every call's output in call order. Several forward passes inside
    one block behave the same way: "last" holds the latest pass, "all" appends.

    Args:
        model: the network; it is not modified and holds no hook after the block.
        layers: one dotted name or several (see ``list_layers``).
        detach: store detached clones (default) or clones that stay in the autograd graph.
        to_cpu: copy the clones to the CPU instead of keeping them on the model's device.
        calls: "last", "first" or "all", see above.

    Yields:
        ``{name: Tensor}`` (``{name: list[Tensor]}`` for ``calls="all"``), filled as the model
        runs. Each tensor is ``(N, C, H, W)`` for a conv layer, ``(N, F)`` for a linear one.
    """
    if calls not in ("last", "first", "all"):
        raise BadArgument(f"calls must be 'last', 'first' or 'all', not {calls!r}")
    require_hookable(model)
    names = [layers] if isinstance(layers, str) else list(layers)
    modules = {name: resolve_layer(model, name) for name in names}  # fail before any hook
    outputs: dict[str, Any] = {}

    def store(name: str) -> Callable:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if calls == "first" and name in outputs:
                return
            value = _clone(output, detach, to_cpu)
            if calls == "all":
                outputs.setdefault(name, []).append(value)
            else:
                outputs[name] = value

        return hook

    with scoped_hooks(after=[(module, store(name)) for name, module in modules.items()]):
        yield outputs


@contextlib.contextmanager
def scoped_hooks(*, before: Iterable[tuple[nn.Module, Callable]] = (),
                 after: Iterable[tuple[nn.Module, Callable]] = ()) -> Iterator[None]:
    """Forward hooks for the block: ``before`` as pre-forward hooks, ``after`` as forward
    hooks, each a (module, hook) pair; all removed when the block ends, however it ends."""
    handles = []
    try:
        for module, hook in before:
            handles.append(module.register_forward_pre_hook(hook))
        for module, hook in after:
            handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


def require_hookable(model: nn.Module) -> None:
    """Refuse a TorchScript model up front: it takes no new hooks, and its flags are constants."""
    if isinstance(model, torch.jit.ScriptModule):
        raise BadArgument(
            "a TorchScript model cannot be inspected layer by layer (it takes no hooks)",
            "load the eager model instead: its state_dict with --arch",
        )


@contextlib.contextmanager
def preserved_state(model: nn.Module, *, eval_mode: bool = False) -> Iterator[nn.Module]:
    """Restore every module's ``training`` flag, ``inplace`` flag and parameters'
    ``requires_grad`` when the block ends, normally or by an exception.

    Args:
        model: the network.
        eval_mode: put the model in eval mode for the duration of the block.
    """
    require_hookable(model)
    training = {module: module.training for module in model.modules()}
    inplace = {module: module.inplace for module in model.modules() if hasattr(module, "inplace")}
    requires_grad = {param: param.requires_grad for param in model.parameters()}
    try:
        if eval_mode:
            model.eval()
        yield model
    finally:
        for module, flag in training.items():
            module.training = flag
        for module, flag in inplace.items():
            if module.inplace != flag:
                module.inplace = flag
        for param, flag in requires_grad.items():
            param.requires_grad_(flag)


def require_batch(x: Any) -> torch.Tensor:
    """``x`` if it is a non-empty image batch (N, C, H, W) of finite values, else a one-line
    BadArgument (an image with NaN or inf would get a label, a rank or a map all the same)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise BadArgument(f"expected an image batch (N, C, H, W), got {shape}",
                          "use vizcnn.preprocess(model, image) first")
    if len(x) == 0:
        raise BadArgument("the image batch is empty (N = 0)", "give at least one image")
    finite = finite_images(x)
    if not bool(finite.all()):
        index = int((~finite).nonzero()[0])
        raise BadArgument(f"image {index} of the batch has NaN or infinite values",
                          "check how it was decoded and normalised")
    return x


def finite_images(batch: torch.Tensor) -> torch.Tensor:
    """(B,) bool on the CPU: which images of a batch hold only finite values."""
    if not batch.is_floating_point():
        return torch.ones(len(batch), dtype=torch.bool)
    return torch.isfinite(batch.flatten(1)).all(dim=1).cpu()


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model with neither)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


_TOO_SMALL = re.compile(
    r"too small|non-positive|greater than (the )?actual input|"
    r"Kernel size can't be greater|input image .* is smaller|Padding size should be less|"
    r"pad should be at most half",
    re.IGNORECASE,
)


_MEMORY = re.compile(r"out of memory|can't allocate|not enough memory|allocat", re.IGNORECASE)


def run_forward(model: nn.Module, x: torch.Tensor) -> Any:
    """``model(x)``, with the model's own failures turned into one-line errors that name the
    layer where they happened: a too small input (``BadArgument``), anything else the forward
    pass raises (``ModelError``: wrong channel count, a size the head rejects, memory).

    Args:
        x: ``(N, C, H, W)`` on the model's device.
    """
    running: list[str] = []
    names = {module: name for name, module in model.named_modules() if module is not model}
    convs_run = []

    def enter(module: nn.Module, inputs: Any) -> None:
        running.append(names[module])
        if isinstance(module, nn.Conv2d) and not convs_run:
            convs_run.append(module)
            seen = _shape(inputs, -3)  # the image's channels, if nothing changed them before
            if seen != module.in_channels and x.dim() == 4 and seen == x.shape[1]:
                raise _wrong_channels(module.in_channels, x, _where(running))
        _check_fits(module, inputs, names[module], x)

    def leave(module: nn.Module, inputs: Any, output: Any) -> None:
        running.pop()

    try:
        with scoped_hooks(before=[(m, enter) for m in names], after=[(m, leave) for m in names]):
            return model(x)
    except VizCNNError:
        raise
    except torch.OutOfMemoryError:
        raise _out_of_memory(x, _where(running)) from None
    except (RuntimeError, ValueError, TypeError, IndexError) as error:
        raise _model_error(error, running[-1] if running else None, x) from None


def _shape(inputs: Any, axis: int) -> int | None:
    """The size of the first input along ``axis``, if it is a tensor with that axis."""
    first = inputs[0] if inputs else None
    if isinstance(first, torch.Tensor) and first.dim() >= -axis:
        return first.shape[axis]
    return None


def _where(running: list[str]) -> str:
    return f" at layer {running[-1]!r}" if running else ""


def _check_fits(module: nn.Module, inputs: Any, name: str, x: torch.Tensor) -> None:
    """Before a conv or pool runs: refuse a map smaller than one (padded) window, the case
    PyTorch reports with messages that change between versions."""
    from vizcnn.geometry import geometry_of

    geometry = geometry_of(module)
    if geometry is None or not inputs or not isinstance(inputs[0], torch.Tensor) \
            or inputs[0].dim() < 3:
        return
    size = inputs[0].shape[-2:]
    for axis in range(2):
        padded = size[axis] + 2 * geometry.padding[axis]
        if geometry.kind == "conv" and module.padding == "same":
            padded = size[axis] + geometry.reach[axis]
        if padded < geometry.reach[axis] + 1:
            raise _too_small(x, f" at layer {name!r}")


def _too_small(x: torch.Tensor, where: str) -> BadArgument:
    return BadArgument(f"input size {_size(x)} is too small for this model: the feature map "
                       f"vanishes{where}", "use a larger --input-size or image")


def _out_of_memory(x: torch.Tensor, where: str) -> ModelError:
    return ModelError(f"not enough memory for an input of {_size(x)}{where}",
                      "use a smaller --input-size, image or batch")


def _wrong_channels(expected: int, x: torch.Tensor, where: str) -> ModelError:
    return ModelError(f"the model takes {expected}-channel input, the image has "
                      f"{x.shape[1]} channels{where}",
                      "give the model's preprocessing (--mean/--std with one value per "
                      "channel), or check --arch")


def _size(x: torch.Tensor) -> str:
    return "x".join(str(s) for s in x.shape[1:])


def _model_error(error: Exception, layer: str | None, x: torch.Tensor) -> VizCNNError:
    """The one-line error for a failure inside the model's forward pass at ``layer``.

    ``run_forward`` checks the common cases structurally before they happen; the patterns
    here catch what only the model's own code knows (a functional pool, an allocator)."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    where = f" at layer {layer!r}" if layer else ""
    if _TOO_SMALL.search(text):
        return _too_small(x, where)
    if _MEMORY.search(text):
        return _out_of_memory(x, where)
    channels = re.search(r"expected input.*? to have (\d+) channels", text)
    if channels:
        return _wrong_channels(int(channels.group(1)), x, where)
    return ModelError(f"the model failed{where} on input {_size(x)}: {text}",
                      "check the input size and the model (see `vizcnn summary MODEL`)")


def activations(
    model: nn.Module,
    x: torch.Tensor,
    layers: str | Sequence[str],
    *,
    to_cpu: bool = False,
    calls: Calls = "last",
) -> dict[str, Any]:
    """One forward pass without gradients, in eval mode; returns the named layers' outputs.

    The model's modes are restored afterwards; the forward pass stops after the last call of
    the deepest layer asked for, so a conv layer can be captured at input sizes the model's
    head rejects. ``x``: ``(N, C, H, W)``; it is moved to the model's device. Returns
    ``{name: Tensor}`` as ``capture`` does.
    """
    from vizcnn.geometry import traced_names

    x = require_batch(x)
    names = [layers] if isinstance(layers, str) else list(layers)
    for name in names:
        resolve_layer(model, name)
    require_hookable(model)
    traced = traced_names(model, tuple(x.shape[-2:]), names)
    with (
        preserved_state(model, eval_mode=True),
        capture(model, names, to_cpu=to_cpu, calls=calls) as outputs,
        torch.no_grad(),
    ):
        forward_to(model, x.to(model_device(model)), names, traced)
    return outputs


class _Stop(Exception):
    """Raised by a hook to end a forward pass once every wanted layer has run."""


def _call_counts(names: Sequence[str], traced: Sequence[str]) -> dict[str, int]:
    """How often each layer runs in one forward pass, from the names of a trace's calls."""
    return {name: sum(1 for t in traced if t == name) for name in names}


def forward_to(
    model: nn.Module,
    x: torch.Tensor,
    layers: Sequence[str],
    traced: Sequence[str],
    on_output: Callable[[str, Any], Any] | None = None,
) -> dict[str, Any]:
    """Run ``model(x)`` only as far as needed: it stops right after the last call of the layer
    that finishes last, so nothing past the deepest wanted layer is computed.

    Args:
        x: ``(N, C, H, W)`` on the model's device.
        layers: dotted names.
        traced: the names of the calls of one forward pass in finishing order (from
            ``geometry.trace_calls``), which tell how often each layer runs and which is last.
        on_output: called as ``on_output(name, output)`` at the layer's last call, right away,
            before any later in-place op can change the output; its result is stored. Default:
            the output itself (not cloned, still in the autograd graph).

    Returns:
        ``{name: on_output(name, output)}`` for each layer's last call.
    """
    counts = _call_counts(layers, traced)
    never = [name for name, count in counts.items() if count == 0]
    if never:
        raise BadArgument(f"layer {never[0]!r} is never called in the model's forward pass",
                          "pick a layer that the forward pass uses")
    order = {name: max(i for i, t in enumerate(traced) if t == name) for name in layers}
    final = max(order, key=order.get)
    modules = {name: resolve_layer(model, name) for name in layers}
    seen = dict.fromkeys(layers, 0)
    results: dict[str, Any] = {}

    def hook_for(name: str) -> Callable:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            seen[name] += 1
            if seen[name] == counts[name]:
                results[name] = on_output(name, output) if on_output else output
                if name == final:
                    raise _Stop

        return hook

    try:
        with scoped_hooks(after=[(module, hook_for(name)) for name, module in modules.items()]):
            run_forward(model, x)
    except _Stop:
        pass
    return results


def strongest_units(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The largest value of each map of ``maps`` (..., h, w) and where it is: values (...)
    and (y, x) positions (..., 2) long. Ties go to the first in row-major order."""
    values, flat = maps.flatten(-2).max(dim=-1)
    width = maps.shape[-1]
    return values, torch.stack([flat // width, flat % width], dim=-1)


def strongest_channels(maps: torch.Tensor) -> torch.Tensor:
    """(N,) long: the channel of ``maps`` (N, C, h, w) with the largest single activation."""
    return maps.amax(dim=(2, 3)).argmax(dim=1)
