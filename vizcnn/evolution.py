"""Feature evolution over training (Zeiler & Fergus Fig. 4): how each channel's strongest
feature looks at each checkpoint, and how settled each layer is.

``feature_evolution(checkpoints, data, layer, channels)`` loads each checkpoint, makes one
pass over the data (``units.channel_stats``: each image's strongest activation per channel,
from which the top-k images of every channel follow), and projects each chosen channel's
strongest unit over the data with the deconvnet (its receptive-field patch, as Fig. 2 shows it).

How settled a layer is at a checkpoint is measured against the last checkpoint:

- ``settledness``: the mean over channels of the correlation, over the images of the data,
  between each image's strongest activation of the channel at that checkpoint and at the last
  (1 at the last; a channel whose activations are constant at either counts 0);
- ``overlap``: the mean over channels of the share of the channel's top-k images (k = 9) that
  are also its top-k images at the last checkpoint.

Checkpoints are put in epoch order; the epoch of each comes from ``{epoch: checkpoint}``, a
``demo:N`` spec, the checkpoint's own ``epoch`` field, or the last number in its file name.
All must be the same architecture, and hold finite weights: a checkpoint whose weights (or
whose activations on the data) are NaN or infinite is refused in one line, naming the tensor
or the layer (``vizcnn doctor`` reports such a model in full).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vizcnn.checks import check_channels, require_finite_weights
from vizcnn.datapass import rank_and_world, row_chunks, run_pass, work_folder
from vizcnn.deconv import Deconvnet
from vizcnn.display import ShowsItself
from vizcnn.errors import BadArgument, BadCheckpoint
from vizcnn.hooks import activations, model_device, require_hookable
from vizcnn.layers import list_layers, resolve_layer
from vizcnn.models import checkpoint_epoch, load_model, model_info
from vizcnn.scan import first_input, images_at, in_memory
from vizcnn.units import ChannelStats, StatsPass, data_classes, require_finite_activations

__all__ = [
    "FeatureEvolution",
    "architecture_difference",
    "feature_evolution",
    "load_checkpoints",
    "same_weights",
    "settled_epoch",
]

TOP_K = 9


@dataclass(frozen=True)
class FeatureEvolution(ShowsItself):
    """Fig. 4's numbers and pictures.

    Attributes:
        epochs: (E,) the checkpoints' epochs, ascending.
        sources: where each checkpoint came from (its spec or path).
        layers: the layers drawn.
        channels: {layer: the channels drawn}.
        projections: {layer: (E, C, 3, s, s)} each channel's strongest unit's projection,
            inside its receptive-field patch, at each checkpoint.
        images: {layer: (E, C, 3, s, s)} the image patches under them.
        values: {layer: (E, C)} the strongest activation.
        indices: {layer: (E, C)} long, the data-set index of its image.
        settledness: {layer: (E,)} correlation with the last checkpoint, for every layer
            measured (the drawn ones and ``settle_layers``).
        overlap: {layer: (E,)} top-9 image overlap with the last checkpoint.
    """

    epochs: tuple[int, ...]
    sources: tuple[str, ...]
    layers: tuple[str, ...]
    channels: dict[str, tuple[int, ...]]
    projections: dict[str, torch.Tensor]
    images: dict[str, torch.Tensor]
    values: dict[str, torch.Tensor]
    indices: dict[str, torch.Tensor]
    settledness: dict[str, torch.Tensor]
    overlap: dict[str, torch.Tensor]

    def settled_epoch(self, layer: str, fraction: float = 0.9) -> int:
        """The first epoch at which ``layer``'s settledness reaches ``fraction`` of its final
        value (1) and stays there."""
        return settled_epoch(self.epochs, self.settledness[layer], fraction)


def settled_epoch(epochs: Sequence[int], curve: torch.Tensor, fraction: float = 0.9) -> int:
    """The first of ``epochs`` from which ``curve`` (E,) stays at or above ``fraction`` of its
    last value."""
    goal = fraction * float(curve[-1])
    settled = len(epochs) - 1
    while settled > 0 and float(curve[settled - 1]) >= goal:
        settled -= 1
    return int(epochs[settled])


def load_checkpoints(checkpoints: Sequence[Any] | Mapping[int, Any], *,
                     arch: str | None = None, num_classes: int | None = None,
                     trust_checkpoint: bool = False, device: str | torch.device | None = None,
                     at_least: int = 2) -> list[tuple[int, str, nn.Module]]:
    """(epoch, source, model) per checkpoint, in epoch order, each checked to be the same
    architecture as the last and to hold finite weights.

    Args:
        checkpoints: specs or paths (``demo:5``, ``runs/demo/epoch_05.pt``) whose epochs can
            be told (see the module docstring), or ``{epoch: spec, path or nn.Module}``.
        arch, num_classes, trust_checkpoint, device: as in ``load_model``, for every path.
        at_least: how many checkpoints are needed.
    """
    if isinstance(checkpoints, Mapping):
        given = [(int(epoch), item) for epoch, item in checkpoints.items()]
    else:
        given = []
        for item in checkpoints:
            if isinstance(item, nn.Module):
                raise BadArgument("a model among the checkpoints has no epoch",
                                  "give {epoch: model, ...}")
            epoch = checkpoint_epoch(item)
            if epoch is None:
                raise BadArgument(f"cannot tell the epoch of checkpoint '{item}'",
                                  "save it with an 'epoch' field, put the epoch in its file "
                                  "name (epoch_05.pt), or give {epoch: checkpoint} in Python")
            given.append((epoch, item))
    if len(given) < at_least:
        raise BadArgument(f"feature evolution needs at least 2 checkpoints, got {len(given)}")
    given.sort(key=lambda pair: pair[0])
    for (a, first), (b, second) in zip(given, given[1:], strict=False):
        if a == b:
            raise BadArgument(f"checkpoints '{first}' and '{second}' are both of epoch {a}",
                              "give one checkpoint per epoch")
    loaded = [(epoch, _source(item), item if isinstance(item, nn.Module) else
               load_model(item, arch=arch, num_classes=num_classes,
                          trust_checkpoint=trust_checkpoint, device=device))
              for epoch, item in given]
    for epoch, source, model in loaded:
        require_hookable(model)
        require_finite_weights(model, f"checkpoint '{source}' (epoch {epoch})")
    reference = loaded[-1]
    for epoch, source, model in loaded[:-1]:
        difference = architecture_difference(reference[2], model)
        if difference:
            raise BadCheckpoint(f"checkpoint '{source}' (epoch {epoch}) is not the "
                                f"architecture of '{reference[1]}': {difference}",
                                "give checkpoints of one training run")
    return loaded


def _source(item: Any) -> str:
    if isinstance(item, nn.Module):
        return model_info(item).spec or type(item).__name__
    return str(item)


def architecture_difference(reference: nn.Module, other: nn.Module) -> str:
    """'' when ``other`` has the parameters and buffers of ``reference``, of the same shapes;
    else the first difference, in words."""
    expected = {name: tuple(value.shape) for name, value in reference.state_dict().items()}
    got = {name: tuple(value.shape) for name, value in other.state_dict().items()}
    for name, shape in expected.items():
        if name not in got:
            return f"it has no {name}"
        if got[name] != shape:
            return f"{name} is {'x'.join(map(str, got[name]))}, not {'x'.join(map(str, shape))}"
    extra = sorted(set(got) - set(expected))
    return f"it has {extra[0]}, which the other lacks" if extra else ""


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    """Whether two models hold exactly the same parameters and buffers (by name)."""
    first, second = a.state_dict(), b.state_dict()
    return first.keys() == second.keys() and all(
        first[name].shape == second[name].shape
        and torch.equal(first[name].cpu(), second[name].cpu()) for name in first)


def feature_evolution(checkpoints: Sequence[Any] | Mapping[int, Any], data: Any,
                      layer: str | Sequence[str],
                      channels: Sequence[int] | str | Mapping[str, Any] | None = None, *,
                      settle_layers: Sequence[str] | None = None, arch: str | None = None,
                      num_classes: int | None = None, trust_checkpoint: bool = False,
                      device: str | torch.device | None = None, batch_size: int = 64,
                      progress: bool = True) -> FeatureEvolution:
    """Fig. 4: each channel's strongest feature at each checkpoint, and how settled each
    layer is (see the module docstring).

    Args:
        checkpoints: see ``load_checkpoints``; the last is the trained network.
        data: anything ``scan_topk`` takes (the same images for every checkpoint).
        layer: the layer (or layers) drawn.
        channels: the channels drawn of each layer (default: the first 8 it has; "all"),
            or ``{layer: channels}``.
        settle_layers: layers whose settledness is measured besides the drawn ones
            (default: every conv layer).

    Returns:
        FeatureEvolution.
    """
    loaded = load_checkpoints(checkpoints, arch=arch, num_classes=num_classes,
                              trust_checkpoint=trust_checkpoint, device=device)
    final = loaded[-1][2]
    drawn = [layer] if isinstance(layer, str) else list(layer)
    if not drawn:
        raise BadArgument("no layer given", "give at least one layer")
    measured = list(dict.fromkeys(drawn + list(settle_layers if settle_layers is not None
                                               else list_layers(final, "conv"))))
    for name in measured:
        resolve_layer(final, name)
    opened = in_memory(final, data)  # read once for every checkpoint
    chosen = _chosen_channels(final, opened, drawn, channels)  # checked before the long part
    with work_folder() as work:
        passes = checkpoint_passes(loaded, measured, work)
        record = run_pass(opened, passes, batch_size=batch_size, progress=progress,
                          desc="feature evolution")
        classes = data_classes(opened)
        stats = [consumer.finish(record, classes) for consumer in passes]
        return evolution_from_stats(loaded, opened, drawn, chosen, stats)


def checkpoint_passes(loaded: list[tuple[int, str, nn.Module]], layers: Sequence[str],
                      work: Path) -> list[StatsPass]:
    """A statistics consumer per checkpoint (``load_checkpoints``' list), for one pass over
    the data that runs every checkpoint on each batch (tables in ``work``)."""
    rank = rank_and_world()[0]
    return [StatsPass(model, layers, work / f"rank{rank}" / f"checkpoint{number}")
            for number, (_, _, model) in enumerate(loaded)]


def evolution_from_stats(loaded: list[tuple[int, str, nn.Module]], data: Any,
                         drawn: Sequence[str], chosen: dict[str, tuple[int, ...]],
                         stats: list[dict[str, ChannelStats]]) -> FeatureEvolution:
    """Fig. 4 from each checkpoint's statistics over ``data`` (of the drawn layers and the
    layers whose settledness is measured): the checkpoints' activations are checked finite,
    each drawn channel's strongest unit is projected, and the settledness and overlap
    measured against the last checkpoint."""
    pictures: list[dict[str, tuple]] = []
    for (epoch, source, model), found in zip(loaded, stats, strict=True):
        require_finite_activations(found, f"checkpoint '{source}' (epoch {epoch})")
        pictures.append({name: _strongest_patches(model, data, name, chosen[name], found[name])
                         for name in drawn})
    measured = list(stats[-1])

    def per_epoch(part: int) -> dict[str, torch.Tensor]:  # (E, ...) of one _strongest_patches part
        return {name: torch.stack([p[name][part] for p in pictures]) for name in drawn}

    def against_last(measure) -> dict[str, torch.Tensor]:  # (E,) per measured layer
        return {name: torch.stack([measure(s[name].maxima, stats[-1][name].maxima)
                                   for s in stats]) for name in measured}

    return FeatureEvolution(
        epochs=tuple(epoch for epoch, _, _ in loaded),
        sources=tuple(source for _, source, _ in loaded), layers=tuple(drawn), channels=chosen,
        projections=per_epoch(0), images=per_epoch(1), values=per_epoch(2),
        indices=per_epoch(3), settledness=against_last(_correlation),
        overlap=against_last(_overlap))


def _chosen_channels(model: nn.Module, data: Any, layers: list[str], channels: Any
                     ) -> dict[str, tuple[int, ...]]:
    """{layer: channels drawn}, each checked against the layer's channel count, which one
    image of the data shows."""
    maps = activations(model, first_input(model, data), layers)
    chosen = {}
    for name in layers:
        count = maps[name].shape[1]
        wanted = channels[name] if isinstance(channels, Mapping) else channels
        picked = (list(range(min(8, count))) if wanted is None else
                  list(range(count)) if wanted == "all" else list(wanted))
        check_channels(picked, count, name)
        chosen[name] = tuple(picked)
    return chosen


def _strongest_patches(model: nn.Module, data: Any, layer: str, channels: tuple[int, ...],
                       stats: ChannelStats
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(projections, images, values, indices) of each channel's strongest unit over the data."""
    strongest, rows = stats.strongest()
    wanted = torch.tensor(channels, dtype=torch.long)
    values, indices = strongest[wanted], stats.indices[rows[wanted]]
    device = model_device(model)
    x = images_at(model, data, indices.tolist()).to(device)
    patches = Deconvnet(model).project_patches(x, layer, list(channels))
    return patches.projections, patches.images, values.to(device), indices.to(device)


def _correlation(maxima: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
    """Mean over channels of the correlation over images of (N, C) with (N, C), a chunk of
    images at a time (the tables may be on disk)."""
    count = len(maxima)
    sums = [torch.zeros(maxima.shape[1], dtype=torch.float64) for _ in range(2)]
    for first, chunk in row_chunks(maxima):
        sums[0] += chunk.double().sum(dim=0)
        sums[1] += final[first:first + len(chunk)].double().sum(dim=0)
    means = [total / max(count, 1) for total in sums]
    products = torch.zeros(3, maxima.shape[1], dtype=torch.float64)
    for first, chunk in row_chunks(maxima):
        a = chunk.double() - means[0]
        b = final[first:first + len(chunk)].double() - means[1]
        products += torch.stack([(a * b).sum(dim=0), a.square().sum(dim=0),
                                 b.square().sum(dim=0)])
    scale = products[1].sqrt() * products[2].sqrt()
    correlation = torch.where(scale > 0, products[0] / scale.clamp_min(1e-300),
                              torch.zeros_like(scale))
    return correlation.mean().float()


def _overlap(maxima: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
    """Mean over channels of the share of each channel's top-k images (by its strongest
    activation; ties to the earlier image) that are among its top-k images in ``final``."""
    k = min(TOP_K, len(maxima))
    mine, theirs = _top_rows(maxima, k), _top_rows(final, k)  # (k, C)
    shared = (mine[:, None, :] == theirs[None, :, :]).any(dim=1).float()  # (k, C)
    return shared.mean()


def _top_rows(table: torch.Tensor, k: int) -> torch.Tensor:
    """(k, C) the rows of each column's k largest values, ties to the earlier row, a chunk of
    rows at a time."""
    values = rows = None
    for first, chunk in row_chunks(table):
        chunk_rows = torch.arange(first, first + len(chunk)).unsqueeze(1).expand_as(chunk)
        if values is not None:
            chunk, chunk_rows = torch.cat([values, chunk]), torch.cat([rows, chunk_rows])
        order = torch.sort(chunk, dim=0, descending=True, stable=True).indices[:k]
        values, rows = chunk.gather(0, order), chunk_rows.gather(0, order)
    return rows
