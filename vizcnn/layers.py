"""Layer names: list a model's modules by dotted name and resolve a name to its module."""

from __future__ import annotations

import difflib

from torch import nn

from vizcnn.errors import BadArgument, LayerNotFound

__all__ = [
    "ACTIVATIONS",
    "ACTIVATION_FUNCTIONS",
    "LAYER_KINDS",
    "POINTWISE",
    "is_activation",
    "list_layers",
    "resolve_layer",
]

# The elementwise nonlinearities vizcnn knows, as modules and by the names their functions carry
# in ``__torch_function__`` (``F.relu`` -> "relu", ``torch.relu_`` -> "relu_", ``nn.ReLU6`` ->
# "hardtanh", ...). The deconvnet rectifies its signal at every one of them (the paper's rule,
# whatever the forward nonlinearity was); occlusion and receptive fields treat them as pointwise.
ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
    nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardtanh, nn.Softplus, nn.Sigmoid, nn.Tanh,
    nn.Hardsigmoid, nn.LogSigmoid, nn.Softsign, nn.Tanhshrink, nn.Softshrink, nn.Hardshrink,
    nn.Threshold,
)
ACTIVATION_FUNCTIONS = frozenset({
    "relu", "relu_", "relu6", "leaky_relu", "leaky_relu_", "prelu", "rrelu", "rrelu_", "elu",
    "elu_", "selu", "selu_", "celu", "celu_", "gelu", "silu", "mish", "hardswish", "hardtanh",
    "hardtanh_", "softplus", "sigmoid", "sigmoid_", "tanh", "tanh_", "hardsigmoid",
    "log_sigmoid", "logsigmoid", "softsign", "tanhshrink", "softshrink", "hardshrink",
    "threshold", "threshold_", "_threshold",
})

# Layers that act on each position separately (in eval mode): they keep a map's geometry.
POINTWISE: tuple[type[nn.Module], ...] = (
    *ACTIVATIONS, nn.BatchNorm2d, nn.LocalResponseNorm, nn.Dropout, nn.Dropout2d, nn.Identity,
)

# Each kind is a tuple of module classes; `list_layers(model, kind)` filters by isinstance.
LAYER_KINDS: dict[str, tuple[type[nn.Module], ...]] = {
    "conv": (nn.Conv1d, nn.Conv2d, nn.Conv3d),
    "relu": (nn.ReLU,),
    "activation": ACTIVATIONS,
    "pool": (
        nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
        nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
        nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
        nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    ),
    "linear": (nn.Linear,),
    "norm": (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LocalResponseNorm,
             nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d),
}


def is_activation(module: nn.Module) -> bool:
    """Whether ``module`` is an elementwise nonlinearity (see ``ACTIVATIONS``)."""
    return isinstance(module, ACTIVATIONS)


def list_layers(model: nn.Module, kind: str | None = None) -> list[str]:
    """Dotted names of the model's modules in registration order (the root is left out).

    Args:
        model: any ``nn.Module``.
        kind: None for every module (containers too), ``"leaf"`` for modules without children,
            or one of ``LAYER_KINDS``: "conv", "relu" (``nn.ReLU`` only), "activation" (every
            elementwise nonlinearity: ReLU, PReLU, LeakyReLU, ELU, GELU, SiLU, ...), "pool",
            "linear", "norm".
    """
    if kind is not None and kind != "leaf" and kind not in LAYER_KINDS:
        kinds = ", ".join(LAYER_KINDS)
        raise BadArgument(f"unknown layer kind {kind!r}", f"use one of: leaf, {kinds}")
    names = []
    for name, module in model.named_modules():
        if not name:
            continue
        if kind == "leaf" and next(module.children(), None) is not None:
            continue
        if kind in LAYER_KINDS and not isinstance(module, LAYER_KINDS[kind]):
            continue
        names.append(name)
    return names


def resolve_layer(model: nn.Module, name: str) -> nn.Module:
    """The module called ``name`` (dotted, as in ``list_layers``).

    Raises:
        LayerNotFound: with the nearest existing names as a hint.
    """
    modules = dict(model.named_modules())
    if name and name in modules:
        return modules[name]
    raise LayerNotFound(f"layer {name!r} not found", _suggest(name, list(modules)[1:]))


def _suggest(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    if not close:
        # Names like "features.99" are closest by prefix, which difflib scores poorly.
        prefix = name.rsplit(".", 1)[0]
        close = [n for n in names if n.startswith(prefix + ".") and n.count(".") == name.count(".")]
        close = close[-3:]
    listing = "`vizcnn summary MODEL` lists them all"
    if close:
        return f"did you mean {' or '.join(repr(c) for c in close)}? {listing}"
    return listing
