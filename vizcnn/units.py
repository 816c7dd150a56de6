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
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vizcnn.checks import feature_maps, positive_int
from vizcnn.data.images import UNLABELLED, foreign_mask_value
from vizcnn.datapass import (
    TABLE_BYTES,
    Batch,
    Consumer,
    LayerOutput,
    PassRecord,
    Table,
    barrier,
    gather,
    merge_tables,
    rank_and_world,
    read_table,
    row_chunks,
    run_pass,
    work_folder,
)
from vizcnn.display import ShowsItself
from vizcnn.errors import BadArgument, VizCNNError
from vizcnn.hooks import (
    model_device,
)
from vizcnn.layers import resolve_layer
from vizcnn.models import model_info
from vizcnn.probes import class_scores
from vizcnn.scan import no_readable_image, open_data

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
class ChannelStats(ShowsItself):
    """Per image and channel of one layer, the strongest activation over a data set.

    The per-image numbers (``maxima``, ``minima``) may be memory-mapped from a table on disk
    (``vizcnn.datapass.Table``): every summary below reads them a bounded chunk of rows at a
    time, so its memory does not grow with the images.

    Attributes:
        layer: the layer's name.
        maxima: (N, C) each image's strongest activation of each channel (on the CPU).
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
    def images(self) -> int:
        return self.maxima.shape[0]

    def _sum(self, measure, *tables: torch.Tensor) -> torch.Tensor:
        """Sum over images of ``measure(rows of each table)``, a chunk of rows at a time."""
        total = None
        for first, rows in row_chunks(tables[0]):
            others = [t[first:first + len(rows)] for t in tables[1:]]
            part = measure(rows, *others)
            total = part if total is None else total + part
        return total if total is not None else measure(*(t[:0] for t in tables))

    @property
    def non_finite(self) -> torch.Tensor:
        """(C,) long: on how many images the channel's activations hold a NaN or an infinity
        somewhere (their strongest or weakest value is not finite): the model's forward pass
        broke there, and no other statistic of the channel means anything."""
        if self.minima is None:
            return self._sum(lambda a: (~torch.isfinite(a)).sum(dim=0), self.maxima)
        return self._sum(lambda a, b: (~torch.isfinite(a) | ~torch.isfinite(b)).sum(dim=0),
                         self.maxima, self.minima)

    @property
    def fire_count(self) -> torch.Tensor:
        """(C,) long: on how many images the channel's strongest activation is above 0."""
        return self._sum(lambda a: (a > 0).sum(dim=0), self.maxima)

    @property
    def fire_rate(self) -> torch.Tensor:
        """(C,) the fraction of images where the channel's strongest activation is above 0."""
        return self.fire_count.float() / self.images

    @property
    def dead(self) -> torch.Tensor:
        """(C,) bool: never above 0 on any image (a channel whose activations are NaN or
        infinite is not called dead: see ``non_finite``)."""
        return (self.fire_count == 0) & (self.non_finite == 0)

    @property
    def always_on(self) -> torch.Tensor:
        """(C,) bool: above 0 at every position of every image, so the rectifier after it
        never acts: the channel passes its input on linearly and selects nothing."""
        if self.minima is None:
            raise BadArgument("these statistics kept no minima", "compute them with "
                              "channel_stats")
        return self._sum(lambda a: (a <= 0).sum(dim=0), self.minima) == 0

    def strongest(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(C,) each channel's strongest activation over the images and (C,) long the row of
        the first image where it is reached (NaN, where there is one, counts as strongest)."""
        best = rows = None
        for first, chunk in row_chunks(self.maxima):
            values, where = chunk.max(dim=0)
            if best is None:
                best, rows = values, where + first
                continue
            better = (values > best) | (values.isnan() & ~best.isnan())
            best, rows = torch.where(better, values, best), torch.where(better, where + first,
                                                                        rows)
        return best, rows

    def histograms(self, bins: int) -> tuple[np.ndarray, np.ndarray]:
        """(C, bins) counts of each channel's strongest activation per image over ``bins``
        equal bins from its lowest to its highest, and (C, 2) those ends: what
        ``np.histogram(maxima[:, c], bins)`` gives, a chunk of rows at a time."""
        low = np.asarray(self._extreme(torch.minimum).numpy())
        high = np.asarray(self.strongest()[0].numpy())
        counts = np.zeros((len(low), bins), dtype=np.int64)
        edges = np.zeros((len(low), 2), dtype=np.float64)
        for channel in range(len(low)):
            edges[channel] = np.histogram(np.empty(0, np.float32), bins, range=(
                low[channel], high[channel]))[1][[0, -1]]
        for _, chunk in row_chunks(self.maxima):
            chunk = chunk.numpy()
            for channel in range(len(low)):
                counts[channel] += np.histogram(chunk[:, channel], bins, range=(
                    low[channel], high[channel]))[0]
        return counts, edges

    def _extreme(self, pick) -> torch.Tensor:
        """(C,) the lowest (``torch.minimum``) of each channel's strongest activations."""
        result = None
        for _, chunk in row_chunks(self.maxima):
            part = chunk.min(dim=0).values
            result = part if result is None else pick(result, part)
        return result

    def class_means(self, classes: int | None = None) -> torch.Tensor:
        """(C, K) the mean strongest activation, rectified (what the next layer sees), over
        the images of each class; NaN for a class without images. K: ``classes``, else as
        many as the data names, else the largest label + 1."""
        if self.labels is None:
            raise BadArgument("the data has no labels", "give data with (image, label) items")
        count = classes or (len(self.classes) if self.classes else int(self.labels.max()) + 1)
        sums = torch.zeros(count, self.maxima.shape[1], dtype=torch.float64)
        for first, chunk in row_chunks(self.maxima):
            labels = self.labels[first:first + len(chunk)].cpu()
            sums.index_add_(0, labels, chunk.cpu().clamp_min(0.0).double())
        sizes = torch.bincount(self.labels.cpu(), minlength=count).double()
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


class StatsPass(Consumer):
    """A pass's consumer that keeps, per image, each channel's strongest and weakest
    activation of ``layers`` in tables on disk (``folder``), and its label."""

    def __init__(self, model: nn.Module, layers: Sequence[str], folder: Path):
        self.model, self.layers, self.folder = model, list(layers), Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.tables = {name: (Table(self.folder / f"{i}.max.f32"),
                              Table(self.folder / f"{i}.min.f32"))
                       for i, name in enumerate(self.layers)}
        self.indices: list[int] = []
        self.labels: list[Any] = []

    def add(self, batch: Batch, found: dict[str, LayerOutput], output: Any) -> None:
        for name in self.layers:
            self.tables[name][0].append(found[name].values)
            self.tables[name][1].append(found[name].minima)
        self.indices += batch.indices
        self.labels += batch.labels if batch.labels is not None else [None] * len(batch.indices)

    def state(self) -> dict:
        return {"tables": {name: (a.state(), b.state()) for name, (a, b) in self.tables.items()},
                "indices": list(self.indices), "labels": list(self.labels)}

    def restore(self, state: dict) -> None:
        for name, (a, b) in self.tables.items():
            a.restore(state["tables"][name][0])
            b.restore(state["tables"][name][1])
        self.indices, self.labels = list(state["indices"]), list(state["labels"])

    def close(self) -> None:
        for a, b in self.tables.values():
            a.close()
            b.close()

    def finish(self, record: PassRecord, classes: tuple[str, ...] | None
               ) -> dict[str, ChannelStats]:
        """Every rank's rows in data-set order, as ``ChannelStats`` per layer (call on every
        rank)."""
        self.close()
        parts = gather((str(self.folder), self.indices, self.labels,
                        {name: (a.rows, a.width) for name, (a, _) in self.tables.items()},
                        record.skipped))
        indices = torch.tensor([i for part in parts for i in part[1]], dtype=torch.long)
        labels = [label for part in parts for label in part[2]]
        order = torch.argsort(indices, stable=True)
        skipped = sorted((s for part in parts for s in part[4]), key=lambda s: s[0])
        if not len(indices):
            raise no_readable_image([reason for _, reason in skipped])
        first = Path(parts[0][0])  # rank 0's folder: the merged tables go beside it
        merged = first.parent / f"{first.name}-merged"
        if len(parts) > 1 and rank_and_world()[0] == 0:
            merged.mkdir(exist_ok=True)
            for i, name in enumerate(self.layers):
                rows = [part[3][name][0] for part in parts]
                width = next(part[3][name][1] for part in parts if part[3][name][1])
                for kind in ("max", "min"):
                    merge_tables([Path(part[0]) / f"{i}.{kind}.f32" for part in parts], rows,
                                 width, order, merged / f"{i}.{kind}.f32")
        barrier()
        with_labels = all(label is not None for label in labels)
        label_tensor = torch.tensor([int(labels[i]) for i in order]) if with_labels else None
        result = {}
        for i, name in enumerate(self.layers):
            width = next(part[3][name][1] for part in parts if part[3][name][1])
            folder = merged if len(parts) > 1 else self.folder
            tables = [read_table(folder / f"{i}.{kind}.f32", len(indices), width)
                      for kind in ("max", "min")]
            result[name] = ChannelStats(name, tables[0], indices[order], label_tensor,
                                        classes, tables[1], tuple(r for _, r in skipped))
        return result


def channel_stats(model: nn.Module, data: Any, layers: str | Sequence[str], *,
                  batch_size: int = 64, progress: bool = True,
                  workers: int | None = None) -> dict[str, ChannelStats]:
    """``ChannelStats`` of each layer over ``data`` (anything ``scan_topk`` takes), from one
    forward pass per batch that stops at the deepest layer. The per-image numbers are kept
    in a table on disk (a temporary file, memory-mapped); under torchrun each rank reads its
    shard and every rank gets the same statistics, those of one process."""
    names = _layers(model, layers)
    positive_int(batch_size, "batch_size")
    opened = open_data(data)
    with work_folder() as work:
        consumer = StatsPass(model, names, work / f"rank{rank_and_world()[0]}" / "stats")
        record = run_pass(opened, [consumer], batch_size=batch_size, workers=workers,
                          progress=progress, desc="statistics")
        return consumer.finish(record, data_classes(opened))


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


class AccuracyPass(Consumer):
    """A pass's consumer that counts the images whose most probable class is their label
    (the forward pass runs to the end). A model that is not a classifier of the data's
    classes is not measured: ``finish`` says why."""

    output = True

    def __init__(self, model: nn.Module, data: Any, output: Any = None):
        self.model, self.selector = model, output
        self.correct = self.total = 0
        self.error: str | None = None
        self.to_model, self.matched = None, ""
        try:
            self.to_model, self.matched = _label_to_output(model, data_classes(data))
        except BadArgument as error:
            self.error = str(error)

    def add(self, batch: Batch, found: dict[str, LayerOutput], output: Any) -> None:
        if self.error is not None:
            return
        if batch.labels is None:
            self.error = str(BadArgument("the data has no labels", "give a folder with a "
                                         "sub-folder per class, or (image, label) items"))
            return
        labels = torch.tensor(batch.labels)
        labels = labels if self.to_model is None else self.to_model[labels]
        try:
            scores = class_scores(output, self.selector)
        except VizCNNError as error:
            self.error = str(error)
            return
        if int(labels.max()) >= scores.shape[1]:
            self.error = str(BadArgument(f"the data has label {int(labels.max())}, the model "
                                         f"only {scores.shape[1]} outputs",
                                         "give data of the model's classes"))
            return
        self.correct += int((scores.argmax(dim=1).cpu() == labels).sum())
        self.total += len(batch.indices)

    def state(self) -> tuple:
        return self.correct, self.total, self.error

    def restore(self, state: tuple) -> None:
        self.correct, self.total, self.error = state

    def finish(self) -> Accuracy | str:
        """Every rank's counts summed, or why the accuracy was not measured."""
        parts = gather(self.state())
        errors = [error for _, _, error in parts if error is not None]
        if errors:
            return errors[0]
        return Accuracy(sum(p[0] for p in parts), sum(p[1] for p in parts), self.matched)


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
    _label_to_output(model, data_classes(opened))  # refused before the pass
    counting = AccuracyPass(model, opened, output)
    record = run_pass(opened, [counting], batch_size=batch_size, progress=progress,
                      desc="accuracy")
    result = counting.finish()
    if isinstance(result, str):
        raise BadArgument(result)
    if not result.total:
        raise no_readable_image([reason for _, reason in record.skipped])
    return result


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
    size. Two passes over the data (thresholds, then IoU); under torchrun each rank reads its
    shard and the ranks' results merge exactly."""
    names = _layers(model, layers)
    positive_int(batch_size, "batch_size")
    opened = open_data(data)
    thresholds = ThresholdPass(model, names, quantile, dissection_length(opened))
    run_pass(opened, [thresholds], batch_size=batch_size, progress=progress,
             desc="thresholds")
    overlap = OverlapPass(model, names, concepts, thresholds.finish())
    run_pass(opened, [overlap], batch_size=batch_size, progress=progress, desc="dissection")
    return overlap.finish()


def dissection_length(data: Any) -> int:
    """The number of images dissection's quantile counts (the data must say)."""
    data = open_data(data)
    if not hasattr(data, "__len__"):
        raise BadArgument("dissection needs a data set with a length (it reads it twice)")
    return len(data)


class ThresholdPass(Consumer):
    """A pass's consumer that finds each channel's threshold T of ``layers``: the m-th
    largest activation over every position of every image, m = ceil(quantile x positions),
    ``count`` images in all.

    Each channel keeps its m largest values so far; once it has m, only the values above
    the m-th (a bound that only rises) are set aside (a compaction, not a sort; only the
    maps whose strongest unit passes the bound are looked at), and merged in when as many
    have gathered as are kept: the m-th largest value comes out exactly, at a cost that
    follows the values that can still matter. Memory: up to 2 x C x m floats per layer (1 %
    of the layer's activations over the data set: the price of an exact quantile in one
    pass)."""

    maps = True

    def __init__(self, model: nn.Module, layers: Sequence[str], quantile: float, count: int):
        if not 0 < quantile < 1:
            raise BadArgument(f"quantile must be in (0, 1), got {quantile!r}")
        self.model, self.layers, self.quantile, self.count = model, list(layers), quantile, count
        self.kept: dict[str, _Largest] = {}

    def add(self, batch: Batch, found: dict[str, LayerOutput], output: Any) -> None:
        for name in self.layers:
            maps = feature_maps(found[name].maps, name)
            if name not in self.kept:
                m = max(1, math.ceil(self.quantile * self.count * maps.shape[-2]
                                     * maps.shape[-1]))
                self.kept[name] = _Largest(m)
            self.kept[name].add(maps, found[name].values)

    def state(self) -> dict:
        return {name: (kept.m, kept.values()) for name, kept in self.kept.items()}

    def restore(self, state: dict) -> None:
        for name, (m, values) in state.items():
            self.kept[name] = _Largest(m)
            self.kept[name].keep(values)

    def finish(self) -> dict[str, torch.Tensor]:
        """(C,) thresholds per layer, every rank's values merged (call on every rank)."""
        parts = gather({name: (kept.m, kept.values().cpu())
                        for name, kept in self.kept.items()})
        thresholds = {}
        for name in self.layers:
            mine = [part[name] for part in parts if name in part]
            values = largest(torch.cat([values for _, values in mine], dim=1), mine[0][0])
            thresholds[name] = values.amin(dim=1).to(model_device(self.model))
        return thresholds


def largest(values: torch.Tensor, m: int) -> torch.Tensor:
    """(C, min(m, P)) the largest values of each row of (C, P) ``values``, in no order; a few
    rows at a time, so that the selection's indices (int64, twice the floats) and working
    copies stay within ``TABLE_BYTES`` whatever the data's size."""
    m = min(m, values.shape[1])
    rows = max(1, TABLE_BYTES // max(12 * values.shape[1], 1))
    out = values.new_empty(values.shape[0], m)
    for first in range(0, values.shape[0], rows):
        out[first:first + rows] = values[first:first + rows].topk(m, dim=1, sorted=False).values
    return out


class _Largest:
    """The m largest values of each row seen so far (see ``ThresholdPass``)."""

    def __init__(self, m: int):
        self.m = m
        self.kept: torch.Tensor | None = None  # (C, <= m): the m largest at the last merge
        self.bound: torch.Tensor | None = None  # (C,) the smallest of them
        # set aside since the last merge, batch by batch: the values grouped by channel, and
        # how many of them each channel has (C,)
        self.values_: list[torch.Tensor] = []
        self.counts: list[torch.Tensor] = []
        self.waiting = 0

    def add(self, maps: torch.Tensor, strongest: torch.Tensor) -> None:
        """Take the values of (B, C, h, w) maps (row c: channel c), whose strongest units
        are (B, C)."""
        if self.kept is None or self.kept.shape[1] < self.m:
            values = maps.transpose(0, 1).flatten(1)
            merged = values if self.kept is None else torch.cat([self.kept, values], dim=1)
            self.keep(largest(merged, self.m))
            return
        bound = self.bound
        # only a map whose strongest unit passes the bound holds a value above it; taken
        # channel by channel, so that each batch's values come grouped by channel
        passing = (strongest > bound).T  # (C, B)
        channels, images = passing.nonzero(as_tuple=True)
        if not len(channels):
            return
        if 2 * len(channels) > passing.numel():  # most maps pass: no copy of their planes
            above = (maps > bound.view(1, -1, 1, 1)).transpose(0, 1)
            rows, images, y, x = above.nonzero(as_tuple=True)
            values = maps[images, rows, y, x]
        else:
            planes = maps[images, channels]  # (P, h, w)
            where = (planes > bound[channels].view(-1, 1, 1)).nonzero(as_tuple=True)
            rows, values = channels[where[0]], planes[where]
        self.values_.append(values)
        self.counts.append(torch.bincount(rows, minlength=maps.shape[1]))
        self.waiting += len(values)
        if self.waiting >= self.m * maps.shape[1]:  # as many set aside as kept: merge
            self._merge()

    def _merge(self) -> None:
        """The values set aside merged in, a block of channels at a time (memory: the block,
        whatever the data's size): each channel's kept values and those set aside for it,
        laid out in a row padded with -inf, and the row's m largest kept."""
        if not self.values_:
            return
        counts = torch.stack(self.counts)  # (J, C): batch j's values of channel c
        ends = counts.cumsum(dim=1)
        width = self.m + int(counts.sum(dim=0).max())
        step = max(1, TABLE_BYTES // (4 * width))
        kept = self.kept.new_empty(self.kept.shape)
        for first in range(0, kept.shape[0], step):
            last = min(first + step, kept.shape[0])
            block = self.kept.new_full((last - first, width), float("-inf"))
            block[:, :self.m] = self.kept[first:last]
            filled = torch.full((last - first,), self.m, dtype=torch.long,
                                device=block.device)
            for values, mine, end in zip(self.values_, counts[:, first:last], ends, strict=True):
                start = int(end[first - 1]) if first else 0
                part = values[start:int(end[last - 1])]  # channels first..last-1, in order
                rows = torch.repeat_interleave(torch.arange(last - first,
                                                            device=block.device), mine)
                offsets = torch.cumsum(mine, 0) - mine
                columns = torch.arange(len(part), device=block.device) - offsets[rows]
                block[rows, filled[rows] + columns] = part
                filled += mine
            kept[first:last] = largest(block, self.m)
        self.values_, self.counts, self.waiting = [], [], 0
        self.keep(kept)

    def keep(self, values: torch.Tensor) -> None:
        """Keep (C, <= m) values, in no order (a sort would cost more than the selection);
        the bound is the smallest of each row."""
        self.kept, self.bound = values, values.amin(dim=1)

    def values(self) -> torch.Tensor:
        self._merge()
        return self.kept


class OverlapPass(Consumer):
    """A pass's consumer that sums, per channel of ``layers`` and concept, the pixels where
    the channel's map (upsampled to the image) exceeds its threshold and the concept's mask
    covers them: Network Dissection's intersections and areas."""

    maps = True

    def __init__(self, model: nn.Module, layers: Sequence[str], concepts: Sequence[str],
                 thresholds: dict[str, torch.Tensor]):
        self.model, self.layers, self.concepts = model, list(layers), tuple(concepts)
        self.thresholds = thresholds
        kinds = len(self.concepts)
        self.inter = {name: torch.zeros(len(thresholds[name]), kinds, dtype=torch.float64)
                      for name in self.layers}
        self.area = {name: torch.zeros(len(thresholds[name]), dtype=torch.float64)
                     for name in self.layers}
        self.concept_area = torch.zeros(kinds, dtype=torch.float64)

    def add(self, batch: Batch, found: dict[str, LayerOutput], output: Any) -> None:
        kinds = len(self.concepts)
        masks = _checked_masks(batch, kinds)
        self.concept_area += torch.bincount(masks.flatten(),
                                            minlength=kinds + 1)[:kinds].double()
        for name in self.layers:
            _overlap(found[name].maps, self.thresholds[name], masks, kinds, self.inter[name],
                     self.area[name])

    def state(self) -> tuple:
        return self.inter, self.area, self.concept_area

    def restore(self, state: tuple) -> None:
        self.inter, self.area, self.concept_area = state

    def finish(self) -> dict[str, Dissection]:
        """Each layer's ``Dissection``, the ranks' counts summed (exact: whole numbers)."""
        parts = gather(self.state())
        concept_area = sum(part[2] for part in parts)
        results = {}
        for name in self.layers:
            inter = sum(part[0][name] for part in parts)
            area = sum(part[1][name] for part in parts)
            union = area[:, None] + concept_area[None, :] - inter
            iou = torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(union))
            results[name] = Dissection(name, self.concepts, self.thresholds[name], iou.float())
        return results


def _checked_masks(batch: Batch, kinds: int) -> torch.Tensor:
    """(B, H, W) long concept masks of a batch, unlabelled pixels as concept ``kinds``, or a
    one-line error: no masks, masks of another size than the input, a value that names no
    concept."""
    masks = batch.masks
    if masks is None:
        raise BadArgument("dissection needs data whose items are (image, label, mask) with an "
                          "(H, W) mask", "e.g. ShapesDataset(..., masks=True)")
    size = tuple(batch.inputs.shape[-2:])
    if tuple(masks.shape[-2:]) != size:
        raise BadArgument(f"a mask is {tuple(masks.shape[-2:])} after its image's resize and "
                          f"crop, the model input is {size}", "give each mask at its image's "
                          "size")
    if foreign_mask_value(masks, kinds) is not None:
        for index, mask in zip(batch.indices, masks, strict=True):
            value = foreign_mask_value(mask, kinds)
            if value is not None:
                raise BadArgument(f"the mask of item {index} holds value {value}, which names "
                                  f"no concept: {kinds} are named (values 0-{kinds - 1}; "
                                  f"{UNLABELLED}: unlabelled)", "give each pixel the index "
                                  "of its concept")
    if kinds <= UNLABELLED:  # unlabelled pixels go to an extra concept that is dropped
        masks = torch.where(masks == UNLABELLED, kinds, masks)
    return masks.cpu()


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


# --------------------------------------------------------------------------- data


def _layers(model: nn.Module, layers: str | Sequence[str]) -> list[str]:
    names = [layers] if isinstance(layers, str) else list(layers)
    if not names:
        raise BadArgument("no layer given", "give at least one layer")
    for name in names:
        resolve_layer(model, name)
    return names
