"""The gallery: a static site of every layer and channel of a model, browsable offline.

``write_gallery(model, data, out)`` scans the data for each channel's top-k images, projects
them with the deconvnet, gathers each channel's statistics (and its Network Dissection label
where the data carries concept masks), and writes:

- ``index.html``: the model, the layer table, the first-layer filters and, for a classifier,
  the paper's figures for a few images of the data;
- ``<layer>.html``: one card per channel (strongest projection beside its patch), sortable by
  channel, strongest activation, how often it fires and class selectivity, dead channels
  hideable;
- ``<layer>/<channel>.html``: the filter, the top-k projections beside their patches, where
  the units sit in their images, the histogram of the channel's strongest activation per
  image, and, with labels, the mean per class and the selectivity index.

Plain HTML and CSS from jinja2 templates with a few lines of inline JavaScript; every link is
relative, nothing leaves the site. The site is written to a temporary folder beside ``out``
and moved into place whole (``vizcnn.io``).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import time
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import torch
from jinja2 import Environment, PackageLoader, select_autoescape
from torch import nn

from vizcnn.checks import positive_int, require_finite_weights
from vizcnn.data.shapes import SHAPE_CONCEPTS, ShapesDataset
from vizcnn.datapass import (
    DecodedCache,
    PassRecord,
    PassState,
    TopKPass,
    barrier,
    decoded_source,
    gather,
    rank_and_world,
    release_memory,
    run_pass,
    work_folder,
)
from vizcnn.deconv import top_patches
from vizcnn.doctor import HealthReport, health_report
from vizcnn.errors import BadArgument, BadCheckpoint, VizCNNError
from vizcnn.evolution import (
    FeatureEvolution,
    architecture_difference,
    checkpoint_passes,
    evolution_from_stats,
    load_checkpoints,
    same_weights,
)
from vizcnn.hooks import require_hookable
from vizcnn.io import (
    atomic_path,
    check_outside,
    check_replaceable,
    output_errors,
    output_path,
    writable_parent,
)
from vizcnn.layers import list_layers, resolve_layer
from vizcnn.models import checkpoint_epoch, model_info
from vizcnn.progress import progress_bar
from vizcnn.render.figures import save_figure, settledness_figure
from vizcnn.render.grid import (
    filter_grid,
    image_tiles,
    pixel_tiles,
    projection_tiles,
    tile,
    write_image,
)
from vizcnn.render.panels import display_normalisation, filters_panel
from vizcnn.scan import (
    ImageFolder,
    InMemory,
    TopK,
    _data_identity,
    _describe,
    data_folder,
    discard_state,
    discarded_on_error,
    first_input,
    images_at,
    model_fingerprint,
    open_data,
    probe,
    sibling_masks,
)
from vizcnn.summary import summarize
from vizcnn.units import (
    TOP_QUANTILE,
    AccuracyPass,
    OverlapPass,
    StatsPass,
    ThresholdPass,
    data_classes,
    dissection_length,
    require_finite_activations,
)

__all__ = ["default_layers", "write_gallery"]

HISTOGRAM_BINS = 24
TILE = 128  # the largest side of a written tile, in pixels

if TYPE_CHECKING:  # imported inside the functions that optimize, for the annotation
    from vizcnn.featvis import FeatureVisualization


def default_layers(model: nn.Module) -> list[str]:
    """Every conv layer; for a residual network (torchvision's ``layerN.M`` blocks) every
    block output instead, where the features a person looks at are formed."""
    blocks = [name for name in list_layers(model) if re.fullmatch(r"layer\d+\.\d+", name)]
    return blocks or list_layers(model, "conv")


@dataclass(frozen=True)
class Gallery:
    """What ``make_gallery`` wrote, and the results it computed on the way, for a caller
    that draws more from them (``vizcnn demo``) without a second pass over the data.

    Attributes:
        index: the site's ``index.html``.
        top: the top-k scan of the shown layers (``TopK``).
        health: the health report on the index, or None.
        evolution: the ``FeatureEvolution`` of the checkpoints, or None.
        feature_vis: ``{layer: FeatureVisualization}`` of the visualized channels (the
            "neuron" objective at the map's centre unit), empty where left out.
    """

    index: Path
    top: TopK
    health: HealthReport | None
    evolution: FeatureEvolution | None
    feature_vis: dict[str, FeatureVisualization]


def write_gallery(model: nn.Module, data: Any, out: str | os.PathLike, **options: Any) -> Path:
    """Write the gallery of ``model`` over ``data`` into the folder ``out``; returns the path
    of its ``index.html``. The ``options`` are ``make_gallery``'s."""
    return make_gallery(model, data, out, **options).index


def make_gallery(model: nn.Module, data: Any, out: str | os.PathLike, *,
                  layers: list[str] | None = None, k: int = 9,
                  channels: list[int] | None = None, batch_size: int = 64,
                  concepts: list[str] | None = None,
                  masks: str | os.PathLike | bool | None = None,
                  workers: int | None = None, figures: bool = True,
                  progress: bool = True, command: str | None = None,
                  state_path: str | os.PathLike | None = None, health: Any = True,
                  checkpoints: Any = None, checkpoint_options: dict | None = None,
                  feature_vis: bool | None = None,
                  feature_vis_steps: int | None = None,
                  feature_vis_channels: int | None = None,
                  sanity: bool | None = None) -> Gallery:
    """Write the gallery of ``model`` over ``data`` into the folder ``out``; returns what it
    wrote and computed (``Gallery``; ``write_gallery`` returns its index alone).

    Args:
        model: the network (left as it was).
        data: what ``scan_topk`` takes; ``"shapes:N"`` also brings the shapes' concept masks.
            With labels (a folder's class sub-folders, ``(image, label)`` items) the index
            shows the accuracy and the channel pages the class means and selectivity.
        layers: the layers shown (default: ``default_layers``).
        k: top images per channel.
        channels: the channels shown per layer (default: all).
        concepts: concept names when the data's items are ``(image, label, mask)``.
        masks: for a folder of images, the folder of their concept masks (laid out as
            ``vizcnn.scan.MASKS_LAYOUT``); default: ``DATA-masks`` beside the folder where it
            holds a ``concepts.txt``; False: no concept masks (also none for ``shapes:N``).
        workers: processes that decode a folder's images (default: see
            ``vizcnn.scan.default_workers``).
        figures: draw the paper's figures (occlusion, invariance, adversarial) for a classifier.
        command: how the site was made, shown on the index (the CLI passes its command line).
        state_path: where the top-k scan saves its state, so that an interrupted gallery
            resumes its scan (see ``scan_topk``).
        health: the index shows the model's health report (``vizcnn.doctor``, from the
            statistics the gallery gathers anyway): True (default) to make it, a
            ``HealthReport`` made already, or False.
        checkpoints: earlier checkpoints of the model's training run (what
            ``feature_evolution`` takes), or their ``FeatureEvolution`` computed already:
            each channel page then shows its evolution strip, and the index how settled each
            layer is. They are loaded and checked before the scan; the model must be the
            last, and is added (with a warning) where it is not among them (``_with_model``).
        checkpoint_options: ``arch``, ``num_classes``, ``trust_checkpoint`` for loading the
            checkpoints.
        feature_vis: show each channel's feature visualization beside its top-k
            (``vizcnn.featvis``, the "neuron" objective at the map's centre unit: what one
            unit of the channel responds to most, the question the top-k patches answer from
            the data). None (default): where the model's normalisation is known; True
            refuses a model whose normalisation is unknown.
        feature_vis_steps: optimization steps (default ``featvis.DEFAULT_STEPS``).
        feature_vis_channels: visualize only this many channels per layer, those with the
            strongest natural units (default: every channel shown); the other channels'
            pages say that theirs was not computed.
        sanity: each layer page says how alike its projections stay once every weight is
            random, linked to a page with the layer's sanity check (``vizcnn.sanity``: the
            deconvnet's pictures of the ``sanity.LINE_CHANNELS`` strongest shown channels'
            top units under cascading randomization), and the health report gets the same
            line. None (default): for each layer where that costs fewer projections than the
            layer's top-k projections; True: every layer; False: none.

    A run that fails with an error leaves nothing: no site, no scan state; one interrupted
    (Ctrl-C) keeps its scan state at ``state_path``, to resume. The model and the
    checkpoints must hold finite weights and give finite activations on the data.
    """
    out = Path(out)
    positive_int(k, "k")
    positive_int(batch_size, "batch_size")
    require_hookable(model)  # a TorchScript model: say so, not "no conv layer"
    check_outside(out, data_folder(data))
    writable_parent(check_replaceable(out, "index.html", "gallery"))
    require_finite_weights(model, f"the model {model_info(model).spec or type(model).__name__!r}")
    layers = list(layers) if layers else default_layers(model)
    if not layers:
        raise BadArgument("the model has no conv layer (nn.Conv2d) to show",
                          "name the layers to show (--layer)")
    for name in layers:
        resolve_layer(model, name)
    source = str(data) if isinstance(data, (str, os.PathLike)) else None
    original = data
    data, concepts = _with_masks(data, concepts, masks)
    if checkpoints is not None and not isinstance(checkpoints, FeatureEvolution):
        checkpoints = _with_model(model, checkpoints, **(checkpoint_options or {}))
    steps, vis_fact = _feature_vis_wanted(model, feature_vis, feature_vis_steps)
    if feature_vis_channels is not None:
        positive_int(feature_vis_channels, "feature_vis_channels")
    identity = _data_identity(original) if state_path is not None else ""
    state = PassState(state_path, _state_key(model, identity, layers, k, checkpoints, concepts))
    state.load()  # a saved state of another run is refused now, and left as it was
    rank, world = rank_and_world()
    clock = _Stages(progress and rank == 0)
    keep = Path(state_path) / "work" if state_path is not None else None
    # a failed gallery leaves nothing: no state, no work files, no site
    with (clock, discarded_on_error(state_path), output_errors(out),
          work_folder(None if keep else output_path(out).parent, out.name, keep) as work):
        data = clock.run("reading", _read, data)
        known = probe(model, data, (rank, world))
        size = _input_size(model, data, known)
        rows = {row.name: row for row in summarize(model, size, layers)}
        shown = {name: _chosen(channels, rows[name]) for name in layers}  # before the pass
        passes = _Passes(model, data, work, layers=layers, rows=rows, k=k, concepts=concepts,
                         checkpoints=checkpoints, known=known, source=source, state=state)
        try:
            clock.run("data pass", passes.first, batch_size, workers)
            made = _after_pass(model, passes, out, clock, layers=layers, size=size, rows=rows,
                        shown=shown, batch_size=batch_size, health=health,
                        checkpoints=checkpoints, figures=figures, command=command,
                        feature_vis=(steps, feature_vis_channels, vis_fact), sanity=sanity)
        finally:
            passes.close()
        barrier()  # every rank done before the state goes
    if rank == 0:
        discard_state(state_path)  # it was kept to resume an interrupted gallery: done
    top, report, evolution, visualized = made
    return Gallery(out / "index.html", top, report, evolution,
                   {name: seen.result for name, seen in visualized.items()})


def _state_key(model: nn.Module, identity: str, layers: list[str], k: int, checkpoints: Any,
               concepts: list[str] | None) -> dict:
    """What a saved pass must match to be resumed: the model, the data (``identity``), the
    layers, k, the checkpoints and the concepts, and the number of ranks (each saves its own
    shard)."""
    epochs = ([model_fingerprint(m) for _, _, m in checkpoints]
              if isinstance(checkpoints, list) else None)
    return {"layers": list(layers), "k": k, "model": model_fingerprint(model),
            "data": identity, "checkpoints": epochs,
            "concepts": list(concepts or []), "ranks": rank_and_world()[1]}


class _Passes:
    """The gallery's passes over the data: the first feeds the top-k scan, the statistics,
    the accuracy, dissection's thresholds and every earlier checkpoint's statistics (each
    image decoded once, each model run once); the second, only with concept masks, measures
    dissection's overlaps, reading the decoded inputs again (kept in memory, or in the work
    folder's cache where they do not fit)."""

    def __init__(self, model: nn.Module, data: Any, work: Path, *, layers: list[str],
                 rows: dict, k: int, concepts: list[str] | None, checkpoints: Any,
                 known: dict, source: str | None, state: PassState):
        rank = rank_and_world()[0]
        self.model, self.data, self.layers, self.concepts = model, data, layers, concepts
        self.known, self.state = known, state
        self.spatial = [name for name in layers if rows[name].output_shape
                        and len(rows[name].output_shape) == 3]
        decoded = isinstance(data, (InMemory, torch.Tensor))  # model inputs already
        self.cache = None if decoded else DecodedCache(work / f"rank{rank}" / "cache")
        self.describe = source or _describe(data)
        self.top = TopKPass(model, layers, k, self.describe)
        self.stats = StatsPass(model, layers, work / f"rank{rank}" / "stats")
        first = next((item for item in known.values() if not isinstance(item[1], str)), None)
        labelled = _labelled(data, first)
        self.accuracy = AccuracyPass(model, data) if labelled else None
        self.thresholds = (ThresholdPass(model, self.spatial, TOP_QUANTILE,
                                         dissection_length(data))
                           if concepts and self.spatial else None)
        self.loaded = checkpoints if isinstance(checkpoints, list) else []
        self.earlier = checkpoint_passes(self.loaded[:-1], layers, work)
        self.forward_passes: dict[str, int] = {}
        self.record: PassRecord | None = None

    def first(self, batch_size: int, workers: int | None) -> None:
        consumers = [self.top, self.stats, *([self.accuracy] if self.accuracy else []),
                     *([self.thresholds] if self.thresholds else []), *self.earlier]
        self.record = run_pass(self.data, consumers, batch_size=batch_size, workers=workers,
                               cache=self.cache, state=self.state, known=self.known,
                               progress=False)
        self.forward_passes = {"model": 1, **{f"checkpoint epoch {epoch}": 1
                                              for epoch, _, _ in self.loaded[:-1]}}
        if self.cache is not None:
            _one_size(self.cache)
        self.source = decoded_source(self.data, self.cache)

    def results(self) -> tuple[Any, dict, Any]:
        """(top-k, statistics, accuracy) of the first pass, every rank's merged."""
        classes = data_classes(self.data)
        top, stats = self.top.finish(), self.stats.finish(self.record, classes)
        score = None
        if self.accuracy is not None and stats[self.layers[0]].labels is not None:
            score = self.accuracy.finish()
            score = f"not measured: {score}" if isinstance(score, str) else score
        return top, stats, score

    def dissection(self, batch_size: int) -> dict:
        """The second pass: dissection's overlaps over the decoded inputs."""
        overlap = OverlapPass(self.model, self.spatial, self.concepts, self.thresholds.finish())
        run_pass(self.source, [overlap], batch_size=batch_size, progress=False)
        self.forward_passes["model"] += 1
        return overlap.finish()

    def evolution(self, stats: dict, shown: dict[str, list[int]]) -> FeatureEvolution:
        """Fig. 4 from the first pass: the earlier checkpoints' statistics and the model's
        own (the model is the last checkpoint)."""
        classes = data_classes(self.data)
        earlier = [consumer.finish(self.record, classes) for consumer in self.earlier]
        loaded = [*self.loaded[:-1], (*self.loaded[-1][:2], self.model)]
        chosen = {name: tuple(shown[name]) for name in self.layers}
        return evolution_from_stats(loaded, self.source, self.layers, chosen, [*earlier, stats])

    def close(self) -> None:
        """Close the tables' files (a failed run's among them)."""
        for consumer in (self.stats, *self.earlier):
            consumer.close()
        if self.cache is not None:
            self.cache.close()

    def decoded(self) -> int:
        """Images decoded by the ranks: by their probes and first passes, the only ones that
        decode (none where the data are model inputs already)."""
        mine = self.record.decoded + len(self.known) if self.cache is not None else 0
        return sum(gather(mine))


def _one_size(cache: DecodedCache) -> None:
    """Refuse images that came to the model at different sizes (a model whose preprocessing
    is unknown keeps each image's size): the pages tile a channel's top images side by side.
    Every rank raises alike."""
    sizes = sorted({shape[-2:] for part in gather(list(cache.tables)) for shape in part})
    if len(sizes) > 1:
        shown = " and ".join("x".join(map(str, size)) for size in sizes[:2])
        raise BadArgument(f"the images reach the model at different sizes ({shown}); the "
                          "gallery shows them side by side",
                          "give the model's input size (--size N, or preprocessing=)")


def _labelled(data: Any, first: tuple | None) -> bool:
    """Whether the data's images have labels (its first readable one has)."""
    if isinstance(data, InMemory):
        return all(label is not None for label in data.labels)
    return first is not None and len(first) > 2 and first[2] is not None


def _after_pass(model: nn.Module, passes: _Passes, out: Path, clock: _Stages, *,
                layers: list[str], size: tuple[int, int], rows: dict,
                shown: dict[str, list[int]], batch_size: int, health: Any, checkpoints: Any,
                figures: bool, command: str | None,
                feature_vis: tuple[int | None, int | None, str], sanity: bool | None
                ) -> tuple:
    """The stages after the first pass: dissection, health, evolution, feature
    visualization, then the site (projections, figures, pages), written whole into ``out``
    (the ranks share the projections and the pages; rank 0 moves the site into place).
    Returns (top-k, health report, evolution, feature visualizations)."""
    rank, world = rank_and_world()
    top, stats, score = passes.results()
    require_finite_activations(stats, "the model")
    data = passes.source
    dissections = (clock.run("dissection", passes.dissection, batch_size)
                   if passes.thresholds is not None else clock.skip("dissection", {}))
    checks = (clock.skip("sanity", {}) if sanity is False else
              clock.run("sanity", _on_rank0, _sanity_checks, model, data, top, shown, size,
                        sanity))
    if health is True:
        report = clock.run("health", health_report, model, data, layers, stats,
                           passes.describe,
                           sanity={name: check.final() for name, check in checks.items()})
    else:
        report = clock.skip("health", health or None)
    if checkpoints is None or isinstance(checkpoints, FeatureEvolution):
        evolution = clock.skip("evolution", checkpoints)
    else:
        evolution = clock.run("evolution", passes.evolution, stats, shown)
    steps, per_layer, vis_fact = feature_vis
    if steps is None:
        visualized = clock.skip("feature visualization", {})
    else:
        chosen = {name: _strongest_channels(top, name, channels, per_layer)
                  for name, channels in shown.items()}
        if not clock.bar.disable:  # the estimate costs two steps per layer: only for a bar
            clock.bar.set_postfix_str(f"feature visualization, about "
                                      f"{_feature_vis_estimate(model, chosen, size, steps)}")
        visualized = clock.run("feature visualization", _on_rank0, _feature_vis, model,
                               chosen, size, steps, top, rows)
    source = passes.describe
    decoded = passes.decoded()
    with (atomic_path(out) if rank == 0 else contextlib.nullcontext()) as made:
        root = Path(gather(str(made) if rank == 0 else None)[0])
        with _Site(model, data, root, layers=layers, size=size, rows=rows, top=top,
                   stats=stats, dissections=dissections, command=command, figures=figures,
                   source=source, score=score, health=report, evolution=evolution,
                   visualized=visualized, vis_fact=vis_fact,
                   sanity=None if sanity is False else checks) as site:
            clock.run("projections", site.project, shown)
            clock.run("figures", site.draw_figures)
            clock.run("pages", site.write)
        barrier()  # every rank's files are in the site before rank 0 moves it into place
        if rank == 0:
            (root / "gallery.json").write_text(json.dumps(
                {"seconds": clock.seconds, "layers": layers, "images": top.images,
                 "skipped": len(top.skipped),
                 "channels": sum(len(channels) for channels in shown.values()),
                 "images_decoded": decoded, "forward_passes": passes.forward_passes,
                 "ranks": world, "feature_visualization": _feature_vis_summary(visualized),
                 "sanity": {name: check.to_dict() for name, check in checks.items()}},
                indent=2))
    return top, report, evolution, visualized


def _sanity_checks(model: nn.Module, data: Any, top: Any, shown: dict[str, list[int]],
                   size: tuple[int, int], wanted: bool | None) -> dict[str, Any]:
    """{layer: SanityCheck} of the layers checked: the deconvnet's cascade for the top unit
    of the shown channels that fire most (``sanity.layer_sanity``); with ``wanted`` None only
    where it costs fewer projections than the layer's top-k."""
    from vizcnn.sanity import cascade_cost, layer_sanity, line_units

    checks = {}
    for name, channels in shown.items():
        rows = torch.tensor(channels)
        picked, indices = line_units(top.values[name][rows, 0], top.indices[name][rows, 0])
        cost = cascade_cost(model, name, size, len(picked))  # 0: no unit, or no weights
        if cost and (wanted or cost < len(channels) * top.k):
            checks[name] = layer_sanity(model, data, name, [channels[r] for r in picked],
                                        indices, positions=top.positions[name][rows[picked], 0])
    return checks


def _on_rank0(function, *args: Any) -> Any:
    """``function(*args)`` computed on rank 0 and handed to every rank."""
    result = function(*args) if rank_and_world()[0] == 0 else None
    return gather(result)[0] if rank_and_world()[1] > 1 else result


@dataclass(frozen=True)
class _Visualized:
    """A layer's feature visualizations as the pages need them.

    Attributes:
        result: the ``FeatureVisualization`` of the shown channels (neuron objective).
        natural: (C,) each shown channel's strongest unit over the data (the scan's top 1).
        box: (top, left, bottom, right) the optimized unit's receptive field in the image.
    """

    result: Any
    natural: torch.Tensor
    box: tuple[int, int, int, int]

    def reached(self) -> torch.Tensor:
        """(C,) bool: the image's strongest unit reaches the strongest natural one."""
        return self.result.strongest.amax(1) >= self.natural


def _feature_vis_wanted(model: nn.Module, wanted: bool | None, steps: int | None
                        ) -> tuple[int | None, str]:
    """The feature visualization's steps, or None where the gallery leaves it out (not
    wanted, or by default the model's normalisation unknown), and what the index says about
    it. Asked for explicitly on a model whose normalisation is unknown: the one-line
    refusal of ``feature_visualization``."""
    from vizcnn.featvis import DEFAULT_STEPS
    from vizcnn.models import normalisation_of

    steps = positive_int(steps, "feature_vis_steps") if steps is not None else DEFAULT_STEPS
    if wanted is False:
        return None, "left out (--no-feature-vis)"
    if wanted is None and not model_info(model).preprocessing.known:
        return None, ("none: the model's input normalisation is unknown (give it with --mean "
                      "and --std)")
    normalisation_of(model, None, "the gallery's feature visualization")
    return steps, (f"{steps} steps per channel, the centre unit of its map (see a channel "
                   "page)")


def _feature_vis_estimate(model: nn.Module, shown: dict[str, list[int]],
                          size: tuple[int, int], steps: int) -> str:
    """How long the stage will take, from two timed steps of a few rows per layer."""
    from vizcnn.featvis import feature_visualization

    seconds = 0.0
    for name, channels in shown.items():
        rows = channels[:8]
        started = time.perf_counter()
        feature_visualization(model, name, rows, objective="neuron", steps=2, size=size,
                              redirect_steps=0, progress=False)
        seconds += (time.perf_counter() - started) / 2 / len(rows) * len(channels) * steps
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def _strongest_channels(top: Any, name: str, channels: list[int], count: int | None
                        ) -> list[int]:
    """The ``count`` of ``channels`` with the strongest natural units (all for None), in
    channel order."""
    if count is None or count >= len(channels):
        return channels
    values = top.values[name][torch.tensor(channels), 0]
    return sorted(channels[i] for i in values.argsort(descending=True)[:count].tolist())


def _feature_vis(model: nn.Module, shown: dict[str, list[int]], size: tuple[int, int],
                 steps: int, top: Any, rows: dict) -> dict[str, _Visualized]:
    """Each layer's feature visualizations (the centre unit of each channel in ``shown``);
    the stage's own bar is the gallery's (its postfix says how long it will take)."""
    from vizcnn.featvis import feature_visualization

    visualized = {}
    for name, channels in shown.items():
        result = feature_visualization(model, name, channels, objective="neuron", steps=steps,
                                       size=size, progress=False)
        shape, field = rows[name].output_shape, rows[name].field
        box = (0, 0, *size)
        if field is not None and len(shape) == 3:
            box = field.box(shape[1] // 2, shape[2] // 2)
        natural = top.values[name][torch.tensor(channels), 0].cpu()
        visualized[name] = _Visualized(result, natural, box)
    return visualized


def _feature_vis_summary(visualized: dict[str, _Visualized]) -> dict | None:
    """gallery.json's record: per layer the channels visualized, how many never fired, and
    how many of the live ones (strongest natural unit above 0) reached their strongest
    natural unit."""
    if not visualized:
        return None
    layers = {}
    for name, seen in visualized.items():
        live = seen.natural > 0
        layers[name] = {"channels": len(seen.natural), "failed": int(seen.result.failed.sum()),
                        "live": int(live.sum()),
                        "reached": int((seen.reached() & live).sum()),
                        "ratio_median": float((seen.result.strongest.amax(1) / seen.natural)
                                              [live].median()) if live.any() else None}
    first = next(iter(visualized.values())).result.recipe
    return {"objective": first.objective, "steps": first.steps, "layers": layers}


def _read(data: Any) -> Any:
    """The data, its concept masks checked first where it is a folder with masks: a bad
    mask is refused before any long work. The images themselves are decoded once, by the
    first pass, into the work folder's cache (``vizcnn.datapass.DecodedCache``), which every
    later stage reads."""
    if isinstance(data, ImageFolder) and data.masks is not None:
        data.check_masks()
    return data


def _with_model(model: nn.Module, checkpoints: Any, **options: Any
                ) -> list[tuple[int, str, nn.Module]]:
    """``checkpoints`` loaded and checked before any long work (``load_checkpoints``: epochs,
    one architecture, finite weights), as ``{epoch: model}`` ending with the gallery's own
    model. The model must be the last checkpoint (the settledness is measured against it);
    where it is not among them, it is added with its epoch (from its spec) and a warning
    says so; a model whose epoch cannot be told is refused."""
    loaded = load_checkpoints(checkpoints, at_least=1, **options)  # the model may be the 2nd
    difference = architecture_difference(model, loaded[-1][2])
    if difference:
        raise BadCheckpoint(f"checkpoint '{loaded[-1][1]}' is not the architecture of the "
                            f"model: {difference}", "give checkpoints of the model's own "
                            "training run")
    same = [i for i, (_, _, checkpoint) in enumerate(loaded) if same_weights(model, checkpoint)]
    spec = model_info(model).spec or type(model).__name__
    if same and same[-1] != len(loaded) - 1:
        epoch, source, _ = loaded[same[-1]]
        raise BadArgument(f"the model is checkpoint '{source}' (epoch {epoch}), but later "
                          f"checkpoints are given (up to epoch {loaded[-1][0]})",
                          "the gallery shows the model, so it must be the last checkpoint: "
                          "leave the later ones out")
    by_epoch = {epoch: checkpoint for epoch, _, checkpoint in loaded}
    if same:
        if len(loaded) < 2:
            raise BadArgument("the only checkpoint given is the model itself",
                              "give the model's earlier checkpoints too")
        return loaded[:same[-1] + 1]
    epoch = checkpoint_epoch(spec) if model_info(model).spec else None
    if epoch is None:
        raise BadArgument(f"the model ({spec}) is not among the checkpoints, and its epoch "
                          "cannot be told", "add it to --checkpoints, with its epoch in its "
                          "file name or its 'epoch' field")
    if epoch in by_epoch:
        raise BadArgument(f"the model ({spec}) is of epoch {epoch}, and so is checkpoint "
                          f"'{dict((e, s) for e, s, _ in loaded)[epoch]}', with other weights",
                          "give checkpoints of the model's own training run")
    if epoch < loaded[-1][0]:
        raise BadArgument(f"the model ({spec}, epoch {epoch}) is not among the checkpoints, "
                          f"which go up to epoch {loaded[-1][0]}",
                          "the gallery shows the model, so it must be the last checkpoint")
    warnings.warn(f"the model ({spec}, epoch {epoch}) was not among the checkpoints: it is "
                  "added as the last", stacklevel=3)
    return [*loaded, (epoch, spec, model)]


class _Stages:
    """Runs the gallery's stages with one tqdm step each and records their seconds."""

    NAMES = ("reading", "data pass", "dissection", "sanity", "health", "evolution",
             "feature visualization", "projections", "figures", "pages")

    def __init__(self, progress: bool):
        self.bar = progress_bar(total=len(self.NAMES), desc="gallery", unit="stage",
                                disable=not progress)
        self.seconds: dict[str, float] = {}

    def __enter__(self) -> _Stages:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)  # erased if the gallery failed

    def skip(self, name: str, result: Any) -> Any:
        """A stage that has nothing to do (no concept masks: no dissection)."""
        self.bar.update()
        return result

    def run(self, name: str, function, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        self.bar.set_postfix_str(name)
        result = function(*args, **kwargs)
        release_memory()  # what the stage freed, back to the system before the next
        self.seconds[name] = round(time.perf_counter() - started, 3)
        self.bar.update()
        return result


def _with_masks(data: Any, concepts: list[str] | None, masks: str | os.PathLike | bool | None
                ) -> tuple[Any, list[str] | None]:
    """The data with its concept masks, and the concepts' names: ``shapes:N`` as the shapes
    with theirs, a folder with its masks folder (given, or ``DATA-masks`` beside it); other
    data as given."""
    opened = open_data(data)
    if masks is False:
        return data, concepts
    if isinstance(opened, ImageFolder):
        folder = sibling_masks(opened.root) if masks in (None, True) else Path(masks)
        if folder is None:
            return data, concepts
        masked = ImageFolder(opened.root, masks=folder)
        return masked, list(concepts or masked.concepts)
    if masks is not None:
        raise BadArgument("a masks folder (masks=, --masks) goes with a folder of images",
                          "give a data set whose items are (image, label, mask) instead")
    if isinstance(opened, ShapesDataset) and concepts is None:
        return (ShapesDataset(opened.length, seed=opened.seed, image_size=opened.image_size,
                              masks=True), list(SHAPE_CONCEPTS))
    return data, concepts


def _input_size(model: nn.Module, data: Any, known: dict) -> tuple[int, int]:
    """(H, W) of the model input, from the data's first readable image."""
    return tuple(first_input(model, data, known).shape[-2:])


def _chosen(channels: list[int] | None, row: Any) -> list[int]:
    """The channels shown for a layer (its ``summarize`` row): all, or those of ``channels``
    the layer has (layers differ in width); a one-line error when it has none of them."""
    name = row.name
    if not row.output_shape:
        raise BadArgument(f"layer {name!r} gives no feature maps", "pick conv layers")
    count = row.output_shape[0]
    if channels is None:
        return list(range(count))
    chosen = [c for c in channels if 0 <= c < count]
    if not chosen:
        raise BadArgument(f"layer {name!r} has none of the channels asked for: it has {count} "
                          f"channels (0-{count - 1})", "give channels it has (--channels)")
    return chosen


@dataclass(frozen=True)
class _Projected:
    """What the pages need of a layer's top-k projections once their tiles are written (the
    pixels are not kept: memory is one chunk of channels, whatever the layer's width).

    Attributes:
        channels: the channels shown, in order.
        values, indices: (C, k) each unit's activation and data-set index (-1: empty slot).
        boxes: (C, k, 4) each patch's box (top, left, bottom, right) in the input image.
        ext: the tiles' file suffix.
    """

    channels: tuple[int, ...]
    values: torch.Tensor
    indices: torch.Tensor
    boxes: torch.Tensor
    ext: str


# the top-k projections and patches computed at once: AlexNet's gallery (200 crops) peaks
# 0.6 GB above its start (4.7 GB when every layer was projected whole), in the same time
PROJECTION_BYTES = 256 * 2**20


class _Site:
    """Writes the pages and images of one gallery into ``root``; a context manager that owns
    the threads writing the image files."""

    def __init__(self, model: nn.Module, data: Any, root: Path, *, layers: list[str],
                 size: tuple[int, int], rows: dict, top: Any, stats: dict, dissections: dict,
                 command: str | None, figures: bool, source: str, score: Any, health: Any,
                 evolution: Any, visualized: dict[str, _Visualized], vis_fact: str,
                 sanity: dict[str, Any] | None):
        self.model, self.data, self.root, self.layers = model, data, root, layers
        self.sanity = sanity  # None: left out (sanity=False); else {layer: SanityCheck}
        self.visualized, self.vis_fact = visualized, vis_fact
        self.health, self.evolution = health, evolution
        self.source, self.score = source, score
        self.size, self.rows = size, rows
        self.top, self.stats, self.dissections = top, stats, dissections
        self.command, self.figures = command, figures
        self.info = model_info(model)
        self.mean, self.std = display_normalisation(model)
        self.env = Environment(loader=PackageLoader("vizcnn.render", "templates"),
                               autoescape=select_autoescape(["html"]))
        self.rank, self.world = rank_and_world()
        if self.rank == 0:
            root.mkdir()
            (root / "img").mkdir()
        barrier()
        self.figures_drawn: tuple[list[tuple[str, str]], list[str]] = ([], [])
        self.projected: dict[str, _Projected] = {}
        # thousands of small image files: OpenCV encodes them without the GIL, so threads
        # overlap the encoding and writing with the projections, the pages and each other
        self.pool = ThreadPoolExecutor(max_workers=len(os.sched_getaffinity(0)))
        self.writes = _Writes(self.pool)

    def __enter__(self) -> _Site:
        return self

    def __exit__(self, *exc: Any) -> None:
        # after Ctrl-C or a failed write: no more files dropped into the site being removed
        self.pool.shutdown(cancel_futures=exc[0] is not None)

    def project(self, shown: dict[str, list[int]]) -> None:
        """Each layer's top-k projections and patches, computed a chunk of channels at a
        time (``PROJECTION_BYTES``), their tiles written as they come. Under torchrun each
        rank projects every world-th channel, and every rank gets every channel's record."""
        for number, name in enumerate(self.layers):
            folder = self.root / "img" / _layer_folder(number, name)
            folder.mkdir(exist_ok=True)
            mine = shown[name][self.rank::self.world]
            chunk = max(1, PROJECTION_BYTES // self._bytes_per_channel(name))
            parts = []
            for start in range(0, len(mine), chunk):
                parts.append(self._project_chunk(folder, name, mine[start:start + chunk]))
                # the tiles are encoded while nothing else runs: encoding beside PyTorch's own
                # threads slowed both (AlexNet, 200 crops, 2 cores: 41 s against 36 s)
                self.writes.wait()
            ranks = gather((mine, parts))
            channels = [c for owned, _ in ranks for c in owned]
            order = torch.tensor([channels.index(c) for c in shown[name]])
            parts = [part for _, owned in ranks for part in owned]
            self.projected[name] = _Projected(
                tuple(shown[name]), torch.cat([p[0] for p in parts])[order],
                torch.cat([p[1] for p in parts])[order], torch.cat([p[2] for p in parts])[order],
                parts[0][3])

    def _bytes_per_channel(self, name: str) -> int:
        """Memory of one channel's top-k projections and patches (float32, RGB): k patches
        of the receptive field, at most the input."""
        field = self.rows[name].field
        height, width = self.size
        if field is not None and not field.is_global:
            height, width = min(height, field.size[0]), min(width, field.size[1])
        return 2 * self.top.k * 3 * height * width * 4

    def _project_chunk(self, folder: Path, name: str, channels: list[int]) -> tuple:
        """Project ``channels`` of ``name``, write their tiles into ``folder``; returns
        (values, indices, boxes, ext) of those channels."""
        patches = top_patches(self.model, self.top, self.data, name, channels)
        ext = _extension(tuple(patches.projections.shape[-2:]))
        for row, channel in enumerate(channels):
            projections = projection_tiles(patches.projections[row])
            crops = image_tiles(patches.images[row], self.mean, self.std)
            for j in range(len(projections)):
                if int(patches.indices[row, j]) >= 0:
                    self.writes.image(folder / f"p{channel}_{j}{ext}", projections[j])
                    self.writes.image(folder / f"i{channel}_{j}{ext}", crops[j])
        return patches.values.cpu(), patches.indices.cpu(), patches.boxes.cpu(), ext

    def draw_figures(self) -> None:
        """The paper figures of the index (the slow part of the index, timed apart; on
        rank 0, which writes the index)."""
        if self.rank == 0:
            self.figures_drawn = self._figures()

    def write(self) -> None:
        """The pages: each rank writes every world-th channel page (and whole image);
        rank 0 the index, the layer pages and the feature visualizations' tiles."""
        if self.rank == 0:
            (self.root / "style.css").write_text(
                (Path(__file__).parent / "templates" / "style.css").read_text())
        whole = self._whole_images()
        for number, name in enumerate(self.layers):
            if self.rank == 0:
                self._feature_vis_tiles(number, name)
                self._sanity_page(number, name)
            self._layer(number, name, whole)
        if self.rank == 0:
            self._index()
        self.writes.wait()

    # ------------------------------------------------------------------ pages

    def _index(self) -> None:
        filters = "img/filters.png"
        save_figure(filters_panel(self.model).figure, self.root / filters, dpi=110)
        figures, notes = self.figures_drawn
        labelled = self.stats[self.layers[0]].labels is not None
        facts = [("model", self.info.spec or type(self.model).__name__),
                 ("parameters", f"{sum(p.numel() for p in self.model.parameters()):,}"),
                 ("input size", "x".join(map(str, self.size))),
                 ("data", f"{self.source} ({self.top.images:,} images"
                  + (f", {len(self.top.skipped):,} unreadable" if self.top.skipped else "")
                  + ")"),
                 ("feature visualization", self.vis_fact),
                 ("made by", self.command or "vizcnn.render.write_gallery"),
                 ("date", datetime.date.today().isoformat()),
                 ("vizcnn", _version())]
        if labelled:
            facts.insert(4, ("labels", "yes: class means and selectivity on channel pages"))
            facts.insert(5, ("accuracy", self.score if isinstance(self.score, str) else
                             f"{100 * self.score.fraction:.1f} % of {self.score.total:,} "
                             f"images ({self.score.matched})"))
        if self.dissections:
            concepts = next(iter(self.dissections.values())).concepts
            facts.insert(4, ("concepts", f"{len(concepts)} ({', '.join(concepts)}): "
                             "Network Dissection labels"))
        layers = []
        for number, name in enumerate(self.layers):
            row, stats = self.rows.get(name), self.stats[name]
            size, jump = row.field.describe() if row is not None and row.field else ("-", "-")
            layers.append({
                "name": name, "page": _layer_page(number, name),
                "kind": type(resolve_layer(self.model, name)).__name__,
                "shape": "x".join(map(str, row.output_shape)) if row and row.output_shape else "-",
                "size": size, "jump": jump, "channels": stats.maxima.shape[1],
                "dead": int(stats.dead.sum()), "concepts": self._concept_counts(name)})
        settled = None
        if self.evolution is not None:
            settled = "img/settledness.png"
            save_figure(settledness_figure(self.evolution), self.root / settled, dpi=110)
        first_vis = self._feature_vis_mosaic()
        self._render("index.html", self.root / "index.html", first_vis=first_vis,
                     title=f"vizcnn gallery: {self.info.spec or type(self.model).__name__}",
                     facts=facts, layers=layers, filters=filters, figures=figures, notes=notes,
                     concepts=bool(self.dissections), health=self.health, settled=settled,
                     sanity_pages={name: f"{_layer_folder(number, name)}/sanity.html"
                                   for number, name in enumerate(self.layers)
                                   if self.sanity and name in self.sanity},
                     epochs=self.evolution.epochs if self.evolution is not None else ())

    def _layer(self, number: int, name: str, whole: dict[int, str]) -> None:
        folder = self.root / _layer_folder(number, name)
        folder.mkdir(exist_ok=True)
        projected, stats = self.projected[name], self.stats[name]
        labelled = stats.labels is not None
        # per layer once: class means and selectivity of every channel
        means = stats.class_means().cpu().nan_to_num(0.0) if labelled else None
        selectivity = stats.selectivity().cpu() if labelled else None
        strongest = stats.strongest()[0]
        fire_count, dead = stats.fire_count, stats.dead
        fires = fire_count.float() / stats.images
        histograms = stats.histograms(HISTOGRAM_BINS)
        ext = projected.ext
        cards = []
        shown = list(projected.channels)
        for row, channel in enumerate(shown):
            label = self._label(name, channel)
            cards.append({
                "channel": channel, "page": f"{_layer_folder(number, name)}/{channel}.html",
                "projection": f"img/{_layer_folder(number, name)}/p{channel}_0{ext}",
                "patch": f"img/{_layer_folder(number, name)}/i{channel}_0{ext}",
                "strongest": float(strongest[channel]), "fires": float(fires[channel]),
                "selectivity": float(selectivity[channel]) if labelled else 0.0,
                "dead": bool(dead[channel]), "label": label,
                "feature_vis": self._feature_vis_card(number, name, channel)})
            if row % self.world == self.rank:
                self._channel(number, name, row, shown, whole, label,
                              None if means is None else (means[channel], selectivity[channel]),
                              (histograms[0][channel], histograms[1][channel],
                               int(fire_count[channel]), float(strongest[channel])))
        if self.rank:
            return
        page = self.rows.get(name)
        self._render("layer.html", self.root / _layer_page(number, name), layer=name,
                     kind=type(resolve_layer(self.model, name)).__name__,
                     shape="x".join(map(str, page.output_shape)) if page and page.output_shape
                     else "-", cards=cards, labelled=labelled,
                     feature_vis=name in self.visualized, sanity=self._sanity_line(number, name),
                     previous=_layer_page(number - 1, self.layers[number - 1]) if number else None,
                     next=_layer_page(number + 1, self.layers[number + 1])
                     if number + 1 < len(self.layers) else None)

    def _channel(self, number: int, name: str, row: int, shown: list[int],
                 whole: dict[int, str], label: str | None,
                 by_class: tuple[torch.Tensor, torch.Tensor] | None,
                 numbers: tuple[np.ndarray, np.ndarray, int, float]) -> None:
        """One channel's page; ``by_class``: its mean per class (K,) and selectivity, or None
        without labels; ``numbers``: the histogram of its strongest activation per image
        (counts, (low, high)), on how many images it fires and its strongest activation."""
        projected, stats = self.projected[name], self.stats[name]
        channel = shown[row]
        folder = _layer_folder(number, name)
        ext = projected.ext
        height, width = self.size
        tiles = []
        for j in range(projected.indices.shape[1]):
            index = int(projected.indices[row, j])
            if index < 0:
                continue
            top_, left, bottom, right = projected.boxes[row, j].tolist()
            tiles.append({
                "projection": f"../img/{folder}/p{channel}_{j}{ext}",
                "patch": f"../img/{folder}/i{channel}_{j}{ext}",
                "image": f"../{whole[index]}", "index": index,
                "title": f"image {index}, activation {float(projected.values[row, j]):.4g}",
                "box": [round(100 * top_ / height, 2), round(100 * left / width, 2),
                        round(100 * (bottom - top_) / height, 2),
                        round(100 * (right - left) / width, 2)]})
        counts, edges, fired, strongest = numbers
        images = stats.images
        class_means, selectivity = None, None
        if by_class is not None:
            means, selectivity = by_class[0], float(by_class[1])
            scale = 160 / max(float(means.max()), 1e-12)
            names = stats.classes or [self.info.class_name(i) for i in range(len(means))]
            class_means = [(names[i], float(v), round(float(v) * scale, 1))
                           for i, v in enumerate(means)]
        filter_image, norms = self._filter(number, name, channel)
        dissection = None
        if name in self.dissections:
            concept, iou = self.dissections[name].label(channel)
            dissection = f"{concept} (IoU {iou:.3f})"
        self._render(
            "channel.html", self.root / folder / f"{channel}.html", layer=name,
            channel=channel, layer_page=f"../{_layer_page(number, name)}", label=label,
            previous=f"{shown[row - 1]}.html" if row else None,
            next=f"{shown[row + 1]}.html" if row + 1 < len(shown) else None,
            strongest=strongest, fires=fired / images, images=images, dead=not fired,
            dissection=dissection,
            filter_image=filter_image and f"../{filter_image}", norms=norms, tiles=tiles,
            strip=self._strip(number, name, channel),
            histogram=[round(100 * c / max(counts.max(), 1), 1) for c in counts],
            low=float(edges[0]), high=float(edges[-1]), class_means=class_means,
            selectivity=selectivity, feature_vis=self._feature_vis_page(number, name, channel))

    # ------------------------------------------------------------------ sanity checks

    def _sanity_page(self, number: int, name: str) -> None:
        """The layer's sanity page: the figure, the numbers per step, what they mean."""
        if not self.sanity or name not in self.sanity:
            return
        from vizcnn.render.panels import drawn_sanity
        from vizcnn.sanity import IMAGE_RECOVERY, LINE_METRIC
        from vizcnn.similarity import METRICS

        check = self.sanity[name]
        folder = _layer_folder(number, name)
        (self.root / folder).mkdir(exist_ok=True)
        save_figure(drawn_sanity(self.model, [check]).figure,
                    self.root / "img" / folder / "sanity.png", dpi=110)
        rows = [(step, changed, [float(check.curve(m)[s]) for m in METRICS])
                for s, (step, changed) in enumerate(zip(check.steps, check.changed,
                                                        strict=True))]
        self._render("sanity.html", self.root / folder / "sanity.html", layer=name,
                     layer_page=f"../{_layer_page(number, name)}", line=check.line(),
                     figure=f"../img/{folder}/sanity.png", metrics=METRICS, rows=rows,
                     bands=[check.band(m) for m in METRICS], units=len(check.rows),
                     threshold=IMAGE_RECOVERY, metric=LINE_METRIC, word=check.verdict(),
                     final=check.final(), kept=check.kept)

    def _sanity_line(self, number: int, name: str) -> dict | None:
        """What the layer page says of its sanity check (None: sanity left out)."""
        if self.sanity is None:
            return None
        if name not in self.sanity:
            return {"absent": True}
        check = self.sanity[name]
        return {"final": check.final(), "word": check.verdict(), "band": check.band(),
                "page": f"{_layer_folder(number, name)}/sanity.html", "units": len(check.rows)}

    # ------------------------------------------------------------------ feature visualization

    def _feature_vis_tiles(self, number: int, name: str) -> None:
        """Each visualized channel's image (``v<channel>.png``) and the optimized unit's
        receptive field in it (``vc<channel>.png``), beside the layer's other tiles."""
        if name not in self.visualized:
            return
        seen = self.visualized[name]
        top_, left, bottom, right = seen.box
        folder = self.root / "img" / _layer_folder(number, name)
        images = seen.result.images[:, 0]
        for channel, rgb in zip(seen.result.channels.tolist(), pixel_tiles(images), strict=True):
            self.writes.image(folder / f"v{channel}.png", rgb)
            self.writes.image(folder / f"vc{channel}.png",
                              np.ascontiguousarray(rgb[top_:bottom, left:right]))

    def _feature_vis_card(self, number: int, name: str, channel: int) -> dict | None:
        """A layer card's feature visualization: its crop, or None (none computed)."""
        row = self._feature_vis_row(name, channel)
        if row is None:
            return None
        return {"crop": f"img/{_layer_folder(number, name)}/vc{channel}.png",
                "failed": bool(self.visualized[name].result.failed[row])}

    def _feature_vis_page(self, number: int, name: str, channel: int) -> dict | None:
        """A channel page's feature visualization section: None where the gallery has none
        at all, ``computed`` False where this channel's was not computed."""
        if name not in self.visualized:
            return None
        seen, row = self.visualized[name], self._feature_vis_row(name, channel)
        if row is None:
            return {"computed": False, "count": len(seen.result.channels),
                    "steps": seen.result.recipe.steps}
        folder = _layer_folder(number, name)
        return {"computed": True, "image": f"../img/{folder}/v{channel}.png",
                "crop": f"../img/{folder}/vc{channel}.png",
                "failed": bool(seen.result.failed[row]),
                "reached": float(seen.result.strongest[row].max()),
                "natural": float(seen.natural[row]), "steps": seen.result.recipe.steps}

    def _feature_vis_row(self, name: str, channel: int) -> int | None:
        if name not in self.visualized:
            return None
        channels = self.visualized[name].result.channels.tolist()
        return channels.index(channel) if channel in channels else None

    def _feature_vis_mosaic(self) -> str | None:
        """The first layer's feature visualizations (each unit's receptive field, enlarged)
        as one image for the index; None where it has none."""
        name = self.layers[0]
        if name not in self.visualized:
            return None
        seen = self.visualized[name]
        top_, left, bottom, right = seen.box
        crops = pixel_tiles(seen.result.images[:, 0])[:, top_:bottom, left:right]
        scale = max(1, 32 // max(crops.shape[1:3]))
        crops = crops.repeat(scale, axis=1).repeat(scale, axis=2)
        crops[seen.result.failed.numpy()] = 200
        path = "img/first_layer_feature_vis.png"
        self.writes.image(self.root / path, tile(crops, columns=16, padding=2))
        return path

    # ------------------------------------------------------------------ pieces

    def _render(self, template: str, path: Path, **values: Any) -> None:
        path.write_text(self.env.get_template(template).render(**values))

    def _whole_images(self) -> dict[int, str]:
        """Each image that is in some channel's top k, written once: {index: path}."""
        wanted = sorted({int(i) for p in self.projected.values() for i in p.indices.flatten()
                         if int(i) >= 0})
        (self.root / "img" / "data").mkdir(exist_ok=True)
        paths = {index: f"img/data/{index}{_extension(self.size)}" for index in wanted}
        mine = wanted[self.rank::self.world]
        for start in range(0, len(mine), 64):
            chunk = mine[start:start + 64]
            tiles = image_tiles(images_at(self.model, self.data, chunk), self.mean, self.std)
            for index, rgb in zip(chunk, tiles, strict=True):
                self.writes.image(self.root / paths[index], rgb)
        return paths

    def _filter(self, number: int, name: str, channel: int
                ) -> tuple[str | None, list[float]]:
        """The filter as an RGB tile (3-channel convs), else its weight norm per input channel
        as bar heights in percent; (None, []) for a layer without one filter per channel."""
        module = resolve_layer(self.model, name)
        if not isinstance(module, nn.Conv2d) or channel >= module.out_channels:
            return None, []
        weight = module.weight.detach()[channel:channel + 1]
        if weight.shape[1] == 3:
            path = f"img/{_layer_folder(number, name)}/f{channel}.png"
            self.writes.image(self.root / path, filter_grid(weight, mode="rgb", padding=0))
            return path, []
        norms = weight[0].flatten(1).norm(dim=1)
        return None, [round(100 * float(v) / max(float(norms.max()), 1e-12), 1) for v in norms]

    def _strip(self, number: int, name: str, channel: int) -> list[tuple[int, str]]:
        """The channel's evolution strip: (epoch, image path) per checkpoint, or []."""
        evolution = self.evolution
        if evolution is None or channel not in evolution.channels.get(name, ()):
            return []
        column = evolution.channels[name].index(channel)
        tiles = projection_tiles(evolution.projections[name][:, column])
        folder = _layer_folder(number, name)
        strip = []
        for epoch, rgb in zip(evolution.epochs, tiles, strict=True):
            path = f"img/{folder}/e{channel}_{epoch}{_extension(rgb.shape[:2])}"
            self.writes.image(self.root / path, rgb)
            strip.append((epoch, f"../{path}"))
        return strip

    def _label(self, name: str, channel: int) -> str | None:
        if name not in self.dissections:
            return None
        concept, _ = self.dissections[name].label(channel)
        return None if concept == "no concept" else concept

    def _concept_counts(self, name: str) -> str:
        if name not in self.dissections:
            return ""
        result = self.dissections[name]
        counts = Counter(result.label(c)[0] for c in range(len(result.thresholds)))
        counts.pop("no concept", None)
        return ", ".join(f"{n} {concept}" for concept, n in counts.most_common()) or "none"

    def _figures(self) -> tuple[list[tuple[str, str]], list[str]]:
        """Fig. 7, Fig. 5 and an adversarial panel for two images of the data, where the
        model is a classifier whose normalisation is known."""
        if not self.figures:
            return [], []
        from vizcnn.render import panels

        indices = [int(i) for i in self.top.indices[self.layers[-1]][:, 0][:2] if int(i) >= 0]
        images = list(image_tiles(images_at(self.model, self.data, indices), self.mean,
                                  self.std))
        side = min(self.size)  # the occluder scales with the image: 16 px at 64, 56 at 224
        recipes = [("Fig. 7: occlusion", "fig7_occlusion.png",
                    lambda: panels.occlusion_panel(self.model, images, window=max(4, side // 4),
                                                   stride=max(2, side // 16),
                                                   progress=False)),
                   ("Fig. 5: invariance", "fig5_invariance.png",
                    lambda: panels.invariance_panel(self.model, images)),
                   ("An adversarial example (PGD, 8/255)", "adversarial_pgd.png",
                    lambda: panels.adversarial_panel(self.model, images[0], method="pgd"))]
        drawn, notes = [], []
        for title, file, draw in recipes:
            try:
                save_figure(draw().figure, self.root / "img" / file, dpi=110)
                drawn.append((title, f"img/{file}"))
            except VizCNNError as error:
                notes.append(f"{title}: not drawn ({error})")
        return drawn, notes


class _Writes:
    """Image files written by a thread pool; ``wait`` raises the first failed write."""

    def __init__(self, pool: ThreadPoolExecutor):
        self.pool, self.pending = pool, []

    def image(self, path: Path, rgb: np.ndarray) -> None:
        self.pending.append(self.pool.submit(_png, path, rgb))

    def wait(self) -> None:
        for future in self.pending:
            future.result()


def _layer_folder(number: int, name: str) -> str:
    return f"layer{number + 1}_{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}"


def _layer_page(number: int, name: str) -> str:
    return f"{_layer_folder(number, name)}.html"


def _extension(size: tuple[int, ...]) -> str:
    """PNG for small tiles (exact pixels); JPEG (quality 90) above 64 px, where a projection's
    fine noise would make PNGs of 20 KB and more each, thousands of them per site."""
    return ".png" if max(size) <= 64 else ".jpg"


def _png(path: Path, rgb: np.ndarray) -> None:
    """An RGB uint8 array as an image file (PNG or JPEG by the suffix; OpenCV writes BGR), at
    most ``TILE`` pixels on a side: pages show tiles at 128 px."""
    if max(rgb.shape[:2]) > TILE:
        scale = TILE / max(rgb.shape[:2])
        rgb = cv2.resize(rgb, (round(rgb.shape[1] * scale), round(rgb.shape[0] * scale)),
                         interpolation=cv2.INTER_AREA)
    write_image(path, rgb)


def _version() -> str:
    from vizcnn import __version__

    return __version__

