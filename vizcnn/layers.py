"""Layer names: list a model's modules by dotted name and resolve a name to its module."""

from __future__ import annotations

import difflib

from torch import nn

from vizcnn.errors import BadArgument, LayerNotFound

# Each kind is a tuple of module classes; `list_layers(model, kind)` filters by isinstance.
LAYER_KINDS: dict[str, tuple[type[nn.Module], ...]] = {
    "conv": (nn.Conv1d, nn.Conv2d, nn.Conv3d),
    "relu": (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SiLU, nn.GELU,
             nn.Hardswish),
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


def list_layers(model: nn.Module, kind: str | None = None) -> list[str]:
    """Dotted names of the model's modules in registration order (the root is left out).

    Args:
        model: any ``nn.Module``.
        kind: None for every module (containers too), ``"leaf"`` for modules without children,
            or one of ``LAYER_KINDS``: "conv", "relu", "pool", "linear", "norm".
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
