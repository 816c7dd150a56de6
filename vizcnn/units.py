"""What each channel of a layer does over a data set: how strongly and how often it fires, how
class-selective it is (Morcos et al. 2018), and which concept it detects (Network Dissection,
Bau et al. 2017).

- ``channel_stats``: one forward pass over the data keeps, per image and channel, the strongest
  activation (N x C numbers per layer) and the image's label where the data has labels.
- ``dissect``: two passes. The first finds each channel's threshold T, the value that 0.5 % of
  all its activations (every position of every image) exceed; the second upsamples each map to
  the image (bilinear), keeps where it exceeds T, and compares that region with every concept's
  mask by intersection over union, summed over the data set. The best concept labels the
  channel where its IoU reaches 0.04, the paper's cut-off.

Data with labels: items ``(image, label, ...)`` of a torch Dataset, ``shapes:N``, or a folder
with one sub-folder per class. Data with concept masks: items ``(image, label, mask)`` whose
mask is an (H, W) integer map of concept indices at the model input's size, as
``ShapesDataset(..., masks=True)`` gives. A pixel of value 255 (``UNLABELLED``, PASCAL VOC's
"void") where fewer than 256 concepts are named is unlabelled: it counts in no concept's
area and in no unit's, as if it were outside the image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vizcnn.checks import feature_maps, positive_int
from vizcnn.data.images import UNLABELLED, foreign_mask_value
from vizcnn.errors import BadArgument
from vizcnn.geometry import traced_names
from vizcnn.hooks import (
    forward_to,
    model_device,
    preserved_state,
    run_forward,
    strongest_units,
)
from vizcnn.layers import resolve_layer
from vizcnn.models import model_info
from vizcnn.probes import class_scores
from vizcnn.progress import progress_bar
from vizcnn.scan import input_batches, input_mask, no_readable_image, open_data

__all__ = [
    "IOU_CUTOFF",
    "Accuracy",
    "ChannelStats",
    "Dissection",
    "accuracy",
    "channel_stats",
    "data_classes",
    "dissect",
    "require_finite_activations",
]

IOU_CUTOFF = 0.04  # Network Dissection: a channel detects a concept from this IoU on
TOP_QUANTILE = 0.005  # ... with its map thresholded at its top 0.5 % of activations


@dataclass(frozen=True)
class ChannelStats:
    """Per image and channel of one layer, the strongest activation over a data set.

    Attributes:
        layer: the layer's name.
        maxima: (N, C) each image's strongest activation of each channel.
        indices: (N,) the data-set index of each row (unreadable images are left out).
        labels: (N,) each image's class, or None where the data has no labels.
        classes: the name of each class where the data names them (``data_classes``).
        minima: (N, C) each image's weakest activation of each channel (the lowest over its
            positions; the activation itself for a linear layer), or None where not kept.
        skipped: the images left out, each with the reason (unreadable, NaN or inf values).
    """

    layer: str
    maxima: torch.Tensor
    indices: torch.Tensor
    labels: torch.Tensor | None
    classes: tuple[str, ...] | None = None
    minima: torch.Tensor | None = None
    skipped: tuple[str, ...] = ()

    @property
    def non_finite(self) -> torch.Tensor:
        """(C,) long: on how many images the channel's activations hold a NaN or an infinity
        somewhere (their strongest or weakest value is not finite): the model's forward pass
        broke there, and no other statistic of the channel means anything."""
        broken = ~torch.isfinite(self.maxima)
        if self.minima is not None:
            broken |= ~torch.isfinite(self.minima)
        return broken.sum(dim=0)

    @property
    def fire_rate(self) -> torch.Tensor:
        """(C,) the fraction of images where the channel's strongest activation is above 0."""
        return (self.maxima > 0).float().mean(dim=0)

    @property
    def dead(self) -> torch.Tensor:
        """(C,) bool: never above 0 on any image (a channel whose activations are NaN or
        infinite is not called dead: see ``non_finite``)."""
        return ~(self.maxima > 0).any(dim=0) & (self.non_finite == 0)

    @property
    def always_on(self) -> torch.Tensor:
        """(C,) bool: above 0 at every position of every image, so the rectifier after it
        never acts: the channel passes its input on linearly and selects nothing."""
        if self.minima is None:
            raise BadArgument("these statistics kept no minima", "compute them with "
                              "channel_stats")
        return (self.minima > 0).all(dim=0)

    def class_means(self, classes: int | None = None) -> torch.Tensor:
        """(C, K) the mean strongest activation, rectified (what the next layer sees), over
        the images of each class; NaN for a class without images. K: ``classes``, else as
        many as the data names, else the largest label + 1."""
        if self.labels is None:
            raise BadArgument("the data has no labels", "give data with (image, label) items")
        count = classes or (len(self.classes) if self.classes else int(self.labels.max()) + 1)
        rectified = self.maxima.clamp_min(0.0).double()
        sums = torch.zeros(count, rectified.shape[1], dtype=torch.float64,
                           device=rectified.device)
        sums.index_add_(0, self.labels, rectified)
        sizes = torch.bincount(self.labels, minlength=count).double()
        return (sums / sizes[:, None]).T.float()

    def selectivity(self, classes: int | None = None) -> torch.Tensor:
        """(C,) class selectivity (mu_max - mu_rest) / (mu_max + mu_rest) (Morcos et al.
        2018): mu_max the largest class mean, mu_rest the mean of the other classes' means,
        over the classes that have images (a class the data lacks has no mean); 0 for a
        channel that never fires."""
        means = self.class_means(classes)
        means = means[:, ~means.isnan().any(dim=0)]
        top = means.max(dim=1).values
        rest = (means.sum(dim=1) - top) / max(means.shape[1] - 1, 1)
        total = top + rest
        return torch.where(total > 0, (top - rest) / total.clamp_min(1e-12),
                           torch.zeros_like(total))


def channel_stats(model: nn.Module, data: Any, layers: str | Sequence[str], *,
                  batch_size: int = 64, progress: bool = True) -> dict[str, ChannelStats]:
    """``ChannelStats`` of each layer over ``data`` (anything ``scan_topk`` takes), from one
    forward pass per batch that stops at the deepest layer."""
    names = _layers(model, layers)
    positive_int(batch_size, "batch_size")
    opened = open_data(data)
    maxima: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    minima: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    indices: list[int] = []
    skipped: list[str] = []
    for batch_indices, _, outputs in _passes(model, opened, names, batch_size, progress,
                                             "statistics", _extremes, skipped):
        indices += batch_indices
        for name in names:
            maxima[name].append(outputs[name][0])
            minima[name].append(outputs[name][1])
    if not indices:
        raise no_readable_image(skipped)
    labels = _labels(opened, indices)
    order = torch.tensor(indices)
    classes = data_classes(opened) if labels is not None else None
    return {name: ChannelStats(name, torch.cat(maxima[name]), order,
                               None if labels is None else labels.to(maxima[name][0].device),
                               classes, torch.cat(minima[name]), tuple(skipped))
            for name in names}


def require_finite_activations(stats: dict[str, ChannelStats], what: str) -> None:
    """Refuse, in one line, a model (``what``) whose activations turn NaN or infinite on the
    data at one of the layers of ``stats`` (the first such layer is named)."""
    for name, layer in stats.items():
        broken = torch.nonzero(layer.non_finite).flatten()
        if len(broken):
            raise BadArgument(f"{what} gives NaN or infinite activations at layer {name!r} "
                              f"(channel {int(broken[0])}, on {int(layer.non_finite.max()):,} "
                              f"of {len(layer.indices):,} images)",
                              "vizcnn doctor MODEL DATA shows where the forward pass breaks")


def data_classes(data: Any) -> tuple[str, ...] | None:
    """The name of each label of a data set, where it names them: a folder's sub-folders,
    the shapes, a torchvision data set's ``classes``; None otherwise."""
    classes = getattr(open_data(data), "classes", None)
    return tuple(str(name) for name in classes) if classes else None


# --------------------------------------------------------------------------- accuracy


@dataclass(frozen=True)
class Accuracy:
    """Top-1 accuracy of a classifier over labelled data.

    Attributes:
        correct: images whose most probable class is their label.
        total: images counted (unreadable ones are left out).
        matched: how the data's labels were matched to the model's outputs.
    """

    correct: int
    total: int
    matched: str

    @property
    def fraction(self) -> float:
        return self.correct / self.total


def accuracy(model: nn.Module, data: Any, *, output: Any = None, batch_size: int = 64,
             progress: bool = True) -> Accuracy:
    """How often the model's most probable class is the image's label.

    The labels are matched to the model's outputs by name where both the data and the model
    name their classes (a folder ``cat/`` counts as the model's class "cat"), else taken as
    output indices. ``output`` selects the class scores of a model with tuple or dict
    outputs (see ``vizcnn.probes.class_scores``).

    Raises:
        BadArgument: the data has no labels, or names a class the model does not have.
    """
    positive_int(batch_size, "batch_size")
    opened = open_data(data)
    to_model, matched = _label_to_output(model, data_classes(opened))
    correct = total = 0
    skipped: list[str] = []
    with (progress_bar(total=len(opened) if hasattr(opened, "__len__") else None,
                       desc="accuracy", unit="img", disable=not progress) as bar,
          preserved_state(model, eval_mode=True), torch.no_grad()):
        for indices, batch, left_out in input_batches(model, opened, batch_size):
            bar.update(len(indices) + len(left_out))
            skipped += [reason for _, reason in left_out]
            if not len(batch):
                continue
            labels = _labels(opened, indices)
            if labels is None:
                raise BadArgument("the data has no labels",
                                  "give a folder with a sub-folder per class, or (image, label) "
                                  "items")
            labels = labels if to_model is None else to_model[labels]
            scores = class_scores(run_forward(model, batch.to(model_device(model))), output)
            if int(labels.max()) >= scores.shape[1]:
                raise BadArgument(f"the data has label {int(labels.max())}, the model only "
                                  f"{scores.shape[1]} outputs", "give data of the model's classes")
            correct += int((scores.argmax(dim=1).cpu() == labels).sum())
            total += len(indices)
    if not total:
        raise no_readable_image(skipped)
    return Accuracy(correct, total, matched)


def _label_to_output(model: nn.Module, names: tuple[str, ...] | None
                     ) -> tuple[torch.Tensor | None, str]:
    """(K,) the model's output index of each data class (None: the labels are the indices)
    and how they were matched."""
    known = model_info(model).classes
    if not names or not known:
        return None, "labels taken as the model's output indices"
    if tuple(names) == tuple(known):
        return None, "the data's classes are the model's"

    def key(name: str) -> str:
        return name.strip().lower().replace("_", " ")

    index = {key(name): i for i, name in enumerate(known)}
    missing = [name for name in names if key(name) not in index]
    if missing:
        raise BadArgument(f"the data's class {missing[0]!r} is not one of the model's "
                          f"{len(known)} classes", "name the class folders as the model's "
                          "classes")
    return (torch.tensor([index[key(name)] for name in names]),
            "the data's classes matched to the model's by name")


# --------------------------------------------------------------------------- dissection


@dataclass(frozen=True)
class Dissection:
    """Network Dissection of one layer: each channel's IoU with every concept.

    Attributes:
        layer: the layer's name.
        concepts: the concept names, indexed as in the masks.
        thresholds: (C,) each channel's top-quantile activation T.
        iou: (C, K) intersection over union of {upsampled map > T} and each concept's mask,
            summed over the data set.
    """

    layer: str
    concepts: tuple[str, ...]
    thresholds: torch.Tensor
    iou: torch.Tensor

    @property
    def best(self) -> torch.Tensor:
        """(C,) each channel's best concept."""
        return self.iou.argmax(dim=1)

    def label(self, channel: int) -> tuple[str, float]:
        """(concept, IoU) of a channel's best concept, or ("no concept", IoU) below 0.04."""
        concept = int(self.best[channel])
        value = float(self.iou[channel, concept])
        return (self.concepts[concept] if value >= IOU_CUTOFF else "no concept"), value


def dissect(model: nn.Module, data: Any, layers: str | Sequence[str],
            concepts: Sequence[str], *, quantile: float = TOP_QUANTILE, batch_size: int = 64,
            progress: bool = True) -> dict[str, Dissection]:
    """Label each channel of each conv layer with the concept its strongest activations
    cover (Network Dissection). ``data`` items are ``(image, label, mask)`` with an (H, W)
    integer mask of concept indices into ``concepts`` (255: unlabelled), at the model input's
    size."""
    names = _layers(model, layers)
    positive_int(batch_size, "batch_size")
    if not 0 < quantile < 1:
        raise BadArgument(f"quantile must be in (0, 1), got {quantile!r}")
    opened = open_data(data)
    count = len(opened) if hasattr(opened, "__len__") else None
    if count is None:
        raise BadArgument("dissection needs a data set with a length (it reads it twice)")
    thresholds = _thresholds(model, opened, names, quantile, count, batch_size, progress)
    kinds = len(concepts)
    inter = {name: torch.zeros(len(thresholds[name]), kinds, dtype=torch.float64)
             for name in names}
    area = {name: torch.zeros(len(thresholds[name]), dtype=torch.float64) for name in names}
    concept_area = torch.zeros(kinds, dtype=torch.float64)
    for indices, batch, outputs in _passes(model, opened, names, batch_size, progress,
                                           "dissection"):
        masks = _masks(model, opened, indices, batch.shape[-2:], kinds)  # (B, H, W) on the CPU
        concept_area += torch.bincount(masks.flatten(), minlength=kinds + 1)[:kinds].double()
        for name in names:
            _overlap(outputs[name], thresholds[name], masks, kinds, inter[name], area[name])
    results = {}
    for name in names:
        union = area[name][:, None] + concept_area[None, :] - inter[name]
        iou = torch.where(union > 0, inter[name] / union.clamp_min(1), torch.zeros_like(union))
        results[name] = Dissection(name, tuple(concepts), thresholds[name], iou.float())
    return results


def _overlap(maps: torch.Tensor, thresholds: torch.Tensor, masks: torch.Tensor, kinds: int,
             inter: torch.Tensor, area: torch.Tensor) -> None:
    """Add one batch's overlaps: ``inter`` (C, K) += pixels where map c, upsampled to the
    masks' size, exceeds its threshold and the mask shows concept k; ``area`` (C,) += pixels
    above the threshold. A bilinear value never exceeds the largest of its four neighbours
    (but for rounding), so only the (image, channel) maps whose maximum reaches the threshold
    are upsampled (a few percent of them, for a top quantile): the same counts, far less
    work."""
    margin = 1e-5 * (thresholds.abs() + 1)  # float rounding of the bilinear weights
    active = (maps.amax(dim=(2, 3)) > (thresholds - margin).view(1, -1)).nonzero()  # (P, 2)
    if not len(active):
        return
    images, channels = active[:, 0], active[:, 1]
    planes = maps[images, channels].unsqueeze(1)  # (P, 1, h, w): one plane per map
    up = F.interpolate(planes, size=masks.shape[-2:], mode="bilinear", align_corners=False)
    above = (up[:, 0] > thresholds[channels].view(-1, 1, 1)).flatten(1).cpu()  # (P, H W)
    concepts = masks[images.cpu()].flatten(1)  # (P, H W); unlabelled pixels are ``kinds``
    counts = torch.zeros(len(active), kinds + 1)  # exact: at most H W per entry
    counts.scatter_add_(1, concepts, above.float())
    counts = counts[:, :kinds]  # an unlabelled pixel is in no unit's area either
    channels = channels.cpu()
    inter.index_add_(0, channels, counts.double())
    area.index_add_(0, channels, counts.sum(dim=1).double())  # each labelled pixel: 1 concept


def _thresholds(model, data, names, quantile, count, batch_size, progress
                ) -> dict[str, torch.Tensor]:
    """(C,) per layer: the m-th largest activation of each channel over every position of
    every image, m = ceil(quantile x positions), kept as a running top-m."""
    kept: dict[str, torch.Tensor] = {}
    for _, _, outputs in _passes(model, data, names, batch_size, progress, "thresholds"):
        for name in names:
            maps = outputs[name]
            values = maps.transpose(0, 1).flatten(1)  # (C, B h w)
            m = max(1, math.ceil(quantile * count * maps.shape[-2] * maps.shape[-1]))
            merged = values if name not in kept else torch.cat([kept[name], values], dim=1)
            kept[name] = merged.topk(min(m, merged.shape[1]), dim=1).values
    return {name: values[:, -1] for name, values in kept.items()}


# --------------------------------------------------------------------------- data


def _layers(model: nn.Module, layers: str | Sequence[str]) -> list[str]:
    names = [layers] if isinstance(layers, str) else list(layers)
    if not names:
        raise BadArgument("no layer given", "give at least one layer")
    for name in names:
        resolve_layer(model, name)
    return names


def _extremes(name: str, output: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C) twice: each image's strongest and weakest activation per channel (for a linear
    layer its features, twice), taken before any later in-place op can change the output."""
    output = feature_maps(output, name, flat_ok=True)
    if output.dim() == 2:
        return output.clone(), output.clone()
    return strongest_units(output)[0], output.flatten(2).amin(dim=2)


def _copy(name: str, output: Any) -> torch.Tensor:
    return feature_maps(output, name).clone()  # an in-place ReLU after the layer must not reach it


def _passes(model, data, names, batch_size, progress, what, on_output=_copy, skipped=None):
    """(indices, batch, {layer: on_output(layer, output)}) per batch of ``data``, forward
    passes stopping at the deepest layer, in eval mode without gradients; the reasons of the
    images left out go into the list ``skipped``, where one is given."""
    traced, size = None, None
    total = len(data) if hasattr(data, "__len__") else None
    with (progress_bar(total=total, desc=what, unit="img", disable=not progress) as bar,
          preserved_state(model, eval_mode=True), torch.no_grad()):
        for indices, batch, left_out in input_batches(model, data, batch_size):
            bar.update(len(indices) + len(left_out))
            if skipped is not None:
                skipped += [reason for _, reason in left_out]
            if not len(batch):
                continue
            batch = batch.to(model_device(model), non_blocking=True)
            if traced is None or batch.shape[-2:] != size:
                size = batch.shape[-2:]
                traced = traced_names(model, tuple(size), names)
            yield indices, batch, forward_to(model, batch, names, traced, on_output)


def _labels(data: Any, indices: list[int]) -> torch.Tensor | None:
    """(N,) the class of each data-set index, or None where the data has no labels: from the
    data set's ``label(i)`` (the shapes; a folder in the ImageFolder layout), else from its
    items ``(image, label, ...)``."""
    if hasattr(data, "label"):
        labels = [data.label(i) for i in indices]
    elif hasattr(data, "__getitem__"):
        labels = [_item_part(data[i], 1) for i in indices]
    else:
        return None
    if not labels or any(label is None for label in labels):
        return None
    return torch.tensor([int(label) for label in labels])


def _masks(model: nn.Module, data: Any, indices: list[int], size: torch.Size,
           kinds: int) -> torch.Tensor:
    """(B, H, W) long concept masks of the given data-set indices, at the input's size."""
    masks = []
    for index in indices:
        item = data[index]
        mask = _item_part(item, 2)
        if mask is None or getattr(mask, "ndim", 0) != 2:
            raise BadArgument("dissection needs data whose items are (image, label, mask) "
                              "with an (H, W) mask", "e.g. ShapesDataset(..., masks=True)")
        mask = input_mask(model, item[0], mask)
        if tuple(mask.shape) != tuple(size):
            raise BadArgument(f"a mask is {tuple(mask.shape)} after its image's resize and "
                              f"crop, the model input is {tuple(size)}",
                              "give each mask at its image's size")
        value = foreign_mask_value(mask, kinds)
        if value is not None:
            raise BadArgument(f"the mask of item {index} holds value {value}, which names no "
                              f"concept: {kinds} are named (values 0-{kinds - 1}; "
                              f"{UNLABELLED}: unlabelled)", "give each pixel the index of "
                              "its concept")
        if kinds <= UNLABELLED:  # unlabelled pixels go to an extra concept that is dropped
            mask = torch.where(mask == UNLABELLED, kinds, mask)
        masks.append(mask)
    return torch.stack(masks)


def _item_part(item: Any, position: int) -> Any:
    """Element ``position`` of an ``(image, label, mask)`` item, or None (an integer for the
    label: a 0-dim tensor or an int)."""
    if not isinstance(item, (tuple, list)) or len(item) <= position:
        return None
    part = item[position]
    if position == 1 and not (isinstance(part, int) or (
            isinstance(part, torch.Tensor) and part.dim() == 0)):
        return None
    return part
