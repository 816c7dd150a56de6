"""Sanity checks (Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018): how much of
a picture depends on what the network learned?

Re-initialize the weights from the top layer down, one layer more at each step ("cascading
randomization"), draw the same picture for the same units and images again, and measure how
alike it still is to the trained network's (``vizcnn.similarity``: Spearman's rank correlation
with and without absolute values, SSIM, HOG). Beside it: the same picture drawn by networks of
the same architecture with every weight random (the "independent-model baseline"), which says
how alike two pictures are by chance. A picture that stays alike once the weights it passes
through are random shows the image more than the network (Nie et al., ICML 2018, call it
partial image recovery for the deconvnet and guided backprop).

How a layer is re-initialized: its own ``reset_parameters()``, after seeding torch with
``SEED_BASE + seed`` (inside ``torch.random.fork_rng``: the caller's random state is left
alone). This is Quantus's scheme (``quantus.MPRT`` seeds every layer with its ``seed + 1``), so
a layer's random weights are the same in every step. Not ``seed`` itself: training scripts seed
with small numbers, and a layer re-drawn with its training's own seed gets its initial weights
back, which the trained weights still partly hold (the demo, trained from seed 0: its first
layer's filters have a cosine similarity of 0.24 with those ``reset_parameters`` draws after
``torch.manual_seed(0)``, 0.00-0.01 with seeds 1, 2 and 42). The layers are every module that
has ``reset_parameters`` (batch norm
included: its statistics and affine parameters go back to their start), in ``named_modules``
order, top first. A parameter no ``reset_parameters`` covers keeps its trained value (listed
in ``SanityCheck.kept``). The work is done on one copy of the model (``copy.deepcopy``: memory
grows by one model); the model passed in is never changed.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from vizcnn.checks import channel_indices, check_channels, positive_int
from vizcnn.display import ShowsItself
from vizcnn.errors import BadArgument
from vizcnn.geometry import trace_calls
from vizcnn.hooks import model_device, require_hookable
from vizcnn.io import atomic_path, save_tensors
from vizcnn.layers import resolve_layer
from vizcnn.progress import progress_bar
from vizcnn.similarity import METRICS, Similarities, similarities, stacked

Method = Literal["deconv", "occlusion", "feature_visualization"]
METHODS = ("deconv", "occlusion", "feature_visualization")

DEFAULT_CHANNELS = 3  # channels checked when none are given: the layer's strongest
BASELINE_MODELS = 3  # all-random networks that give the band of chance similarity
# The measure of the one-line verdict: the rank correlation of the values, signs included (the
# projections' colours). Not of |values| (Quantus's default): the deconvnet's |values| share
# the receptive field's envelope whatever the weights and the image (two projections of
# different units and images of the demo's conv3 correlate 0.28 in |values|, 0.01 signed).
LINE_METRIC = "spearman"
# The verdict's threshold, read off the demo's figures (docs/sanity.md): once every weight is
# random, the pictures that depend on the weights by construction keep at most 0.18 in
# absolute value (occlusion's class-score maps -0.10 at every layer, feature visualizations
# -0.18 to 0.13); a picture that keeps 0.3 or more keeps more than any of them.
IMAGE_RECOVERY = 0.3
SEED_BASE = 1_000_003  # added to the seed (see above)
LINE_CHANNELS = 8  # the gallery's and the doctor's line: the 8 strongest channels' top unit


@dataclass(frozen=True)
class SanityCheck(ShowsItself):
    """One method's pictures under cascading (or independent) randomization, and how alike
    they stay to the trained network's.

    Attributes:
        method: "deconv", "occlusion" or "feature_visualization".
        layer: the layer the pictures are of.
        rows: what each row is (a channel and image, an image's map, a channel).
        steps: "trained", then the module re-initialized at each step, top first.
        changed: per step, whether the step's module can change the picture (it feeds the
            layer; every module feeds an occlusion map's class score). A step that cannot
            reuses the picture before it: its similarity is exactly that picture's.
        cascade: True: each step keeps the steps before it random (Adebayo et al.'s
            cascading randomization); False: only the step's module is random.
        seed: the seed of every re-initialization; the baseline's networks use seed + 1, ...
        inputs: (R, C, h, w) what each row's picture is of (the image patch, the image), in
            the model's input space; None for feature visualizations.
        pictures: (S, R, C, h, w) each step's pictures.
        baseline: (B, R, C, h, w) the pictures of B networks with every weight random.
        similarity: ``Similarities`` (S, R) of each step's pictures to the trained ones.
        baseline_similarity: ``Similarities`` (B, R) of the baseline's pictures to them.
        kept: parameters that no ``reset_parameters`` re-initializes (they stay trained).
        kinds: per row, what kind of picture it is where a method draws two ("class score"
            and "feature map" for occlusion); empty where every row is of one kind.
    """

    method: str
    layer: str
    rows: tuple[str, ...]
    steps: tuple[str, ...]
    changed: tuple[bool, ...]
    cascade: bool
    seed: int
    inputs: torch.Tensor | None
    pictures: torch.Tensor
    baseline: torch.Tensor
    similarity: Similarities
    baseline_similarity: Similarities
    kept: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ()

    @property
    def main_rows(self) -> list[int] | None:
        """The rows the verdict is about: the first kind's (occlusion: the class score's
        maps), or every row (None)."""
        return self.rows_of(self.kinds[0]) if self.kinds else None

    def rows_of(self, kind: str | None) -> list[int] | None:
        """The rows of one kind (None: every row)."""
        if kind is None:
            return None
        if kind not in self.kinds:
            raise BadArgument(f"no row of kind {kind!r}",
                              f"the kinds: {', '.join(dict.fromkeys(self.kinds)) or 'none'}")
        return [r for r, k in enumerate(self.kinds) if k == kind]

    def curve(self, metric: str = LINE_METRIC, rows: Sequence[int] | None = None
              ) -> torch.Tensor:
        """(S,) the mean similarity over the rows (or the given ``rows``) at each step."""
        values = self.similarity.metric(_metric(metric))
        return (values if rows is None else values[:, list(rows)]).nanmean(1)

    def band(self, metric: str = LINE_METRIC, rows: Sequence[int] | None = None
             ) -> tuple[float, float]:
        """The 5th and 95th percentile of the baseline's similarities (every random network
        and row, or the given ``rows``): what a network that learned nothing reaches."""
        values = self.baseline_similarity.metric(_metric(metric))
        values = (values if rows is None else values[:, list(rows)]).flatten()
        values = values[values.isfinite()]
        if not len(values):
            return math.nan, math.nan
        low, high = torch.quantile(values, torch.tensor([0.05, 0.95], dtype=values.dtype))
        return float(low), float(high)

    def final(self, metric: str = LINE_METRIC, rows: Sequence[int] | None = None) -> float:
        """The mean similarity once every step is random (in a cascade: every weight the
        picture passes through)."""
        return float(self.curve(metric, rows)[-1])

    def verdict(self) -> str:
        """The line's word for ``main_rows``: "depends on the weights" or "mostly image
        recovery"."""
        return verdict(self.final(rows=self.main_rows))

    def line(self) -> str:
        """One line: the similarity of ``main_rows`` at the last step, its word and the
        random networks' band."""
        rows = self.main_rows
        low, high = self.band(rows=rows)
        final = self.final(rows=rows)
        what = self.method.replace("_", " ") + (f" ({self.kinds[0]})" if self.kinds else "")
        return (f"{self.layer}: {what} similarity {final:.2f} once randomized "
                f"({_METRIC_NAMES[LINE_METRIC]}; random networks {low:.2f} to {high:.2f}): "
                f"{verdict(final)}")

    def to_dict(self) -> dict[str, Any]:
        """Plain numbers and names, for JSON: per metric, the steps' and the baseline's
        similarities (rows inside), the mean curve and the band."""
        metrics = {}
        for name in METRICS:
            metrics[name] = {
                "steps": _floats(self.similarity.metric(name)),
                "baseline": _floats(self.baseline_similarity.metric(name)),
                "curve": _floats(self.curve(name)), "band": list(self.band(name))}
        return {"method": self.method, "layer": self.layer, "rows": list(self.rows),
                "steps": list(self.steps), "changed": list(self.changed),
                "cascade": self.cascade, "seed": self.seed, "kept": list(self.kept),
                "kinds": list(self.kinds),
                "final": self.final(rows=self.main_rows), "verdict": self.verdict(),
                "threshold": IMAGE_RECOVERY, "line_metric": LINE_METRIC, "metrics": metrics}

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``sanity.pt`` (every tensor) and ``manifest.json`` (``to_dict``) into
        ``folder``, which is replaced whole."""
        folder = Path(folder)
        with atomic_path(folder) as staging:
            staging.mkdir()
            tensors = {"pictures": self.pictures.cpu(), "baseline": self.baseline.cpu()}
            if self.inputs is not None:
                tensors["inputs"] = self.inputs.cpu()
            for name in METRICS:
                tensors[f"similarity_{name}"] = self.similarity.metric(name)
                tensors[f"baseline_{name}"] = self.baseline_similarity.metric(name)
            save_tensors(tensors, staging / "sanity.pt")
            (staging / "manifest.json").write_text(json.dumps(self.to_dict(), indent=1))
        return folder


_METRIC_NAMES = {"spearman": "rank correlation", "spearman_abs": "rank correlation of |values|",
                 "ssim": "SSIM", "hog": "HOG similarity"}


def verdict(similarity: float) -> str:
    """The word for a similarity at the last randomization step (``IMAGE_RECOVERY``)."""
    if math.isnan(similarity):
        return "not measured (constant pictures)"
    return "mostly image recovery" if similarity >= IMAGE_RECOVERY else "depends on the weights"


def _metric(name: str) -> str:
    if name not in METRICS:
        raise BadArgument(f"unknown similarity {name!r}", f"use one of {', '.join(METRICS)}")
    return name


def _floats(values: torch.Tensor) -> list:
    return [None if isinstance(v, float) and math.isnan(v) else v for v in values.tolist()] \
        if values.dim() <= 1 else [_floats(row) for row in values]


# --------------------------------------------------------------------------- randomization


def randomizable(model: nn.Module) -> list[str]:
    """The modules a sanity check re-initializes, in ``named_modules`` order: every named
    module with a ``reset_parameters`` method (Quantus's rule)."""
    return [name for name, module in model.named_modules()
            if name and callable(getattr(module, "reset_parameters", None))]


def kept_parameters(model: nn.Module, names: Sequence[str]) -> tuple[str, ...]:
    """The parameters that no module of ``names`` holds directly: re-initialization keeps them."""
    covered = {f"{name}.{p}" for name in names
               for p, _ in resolve_layer(model, name).named_parameters(recurse=False)}
    return tuple(p for p, _ in model.named_parameters() if p not in covered)


def reset(module: nn.Module, seed: int) -> None:
    """``module.reset_parameters()`` with torch seeded by ``SEED_BASE + seed``; the caller's
    random state (CPU and CUDA) is restored after."""
    devices = sorted({p.device.index or 0 for p in module.parameters() if p.is_cuda})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(SEED_BASE + seed)
        module.reset_parameters()


def _randomized(model: nn.Module, steps: Sequence[str], cascade: bool, seed: int
                ) -> Iterator[nn.Module]:
    """One copy of ``model``, re-initialized one more module per step (or, without
    ``cascade``, only that step's module); yielded after each step."""
    copied = copy.deepcopy(model)
    trained = model.state_dict()
    for name in steps:
        if not cascade:
            copied.load_state_dict(trained)
        reset(resolve_layer(copied, name), seed)
        yield copied


def _all_random(model: nn.Module, names: Sequence[str], seed: int) -> nn.Module:
    copied = copy.deepcopy(model)
    for name in names:
        reset(resolve_layer(copied, name), seed)
    return copied


def _feeding(model: nn.Module, layer: str, names: Sequence[str], size: tuple[int, int],
             everything: bool) -> tuple[bool, ...]:
    """Per module of ``names``: does it run before ``layer``'s output is complete (or at all,
    with ``everything``)? One traced forward pass on a zero image."""
    traced = [call.name for call in trace_calls(model, size)]
    last = max(i for i, name in enumerate(traced) if name == layer)
    first = {}
    for i, name in enumerate(traced):
        first.setdefault(name, i)
    return tuple(name in first and (everything or first[name] <= last) for name in names)


# --------------------------------------------------------------------------- the methods


@dataclass(frozen=True)
class Pictures:
    """One method's pictures: ``draw(model) -> (R, C, h, w)``, with its rows and inputs."""

    draw: Callable[[nn.Module], torch.Tensor]
    rows: tuple[str, ...]
    inputs: torch.Tensor | None
    size: tuple[int, int]  # the model's input size, for the trace
    everything: bool  # every module can change the picture (a class score's map)
    kinds: tuple[str, ...] = ()  # per row, where a method draws two kinds of picture
    trained: torch.Tensor | None = None  # the trained network's, where setting up drew them

    def of_trained(self, model: nn.Module) -> torch.Tensor:
        """The trained network's pictures, drawn once."""
        return self.trained if self.trained is not None else self.draw(model)


def _strongest_channels(model: nn.Module, data: Any, layer: str, channels: Any, count: int,
                        k: int = 1):
    """The scan of ``layer`` over ``data`` (top-``k``), and the channels checked: those given,
    else the ``count`` with the strongest top unit."""
    from vizcnn.scan import scan_topk

    top = scan_topk(model, data, [layer], k=k, progress=False)
    values = top.values[layer]
    if values.dim() != 2:
        raise BadArgument(f"{layer!r} has no channels to check")
    if channels is None:
        wanted = values[:, 0].argsort(descending=True, stable=True)[:count]
    else:
        wanted = channel_indices(channels)
        check_channels(wanted, values.shape[0], layer)
    return top, [int(c) for c in wanted]


def deconv_pictures(model: nn.Module, x: torch.Tensor, layer: str, channels: Sequence[int],
                    image_rows: Sequence[int], positions: torch.Tensor | None,
                    labels: Sequence[str]) -> Pictures:
    """The deconvnet's pictures: the projection patch of each (channel, image) unit, with the
    unit's activation taken as 1 (the question is the picture the layers below draw, not
    whether a random layer happens to fire there).

    Args:
        x: (N, C, H, W) the images, on the model's device.
        channels: (P,) each projection's channel; ``image_rows``: (P,) its row of ``x``.
        positions: (P, 2) each unit's (y, x), or None: the strongest unit of the channel in
            the trained network (found once, kept for every step).
        labels: (P,) row names.
    """
    from vizcnn.deconv import Deconvnet

    channels_t = torch.tensor(list(channels), dtype=torch.long)
    rows = torch.tensor(list(image_rows), dtype=torch.long)
    if positions is None:
        positions = _strongest_positions(model, x, layer, channels_t, rows)
    ones = torch.ones(len(channels_t), device=x.device)

    def draw(network: nn.Module) -> torch.Tensor:
        return Deconvnet(network).project_patches(
            x, layer, channels_t, image_indices=rows, positions=positions,
            activations=ones).projections

    patches = Deconvnet(model).project_patches(x, layer, channels_t, image_indices=rows,
                                               positions=positions, activations=ones)
    return Pictures(draw, tuple(labels), patches.images, tuple(x.shape[-2:]), False,
                    trained=patches.projections)


def _strongest_positions(model: nn.Module, x: torch.Tensor, layer: str,
                         channels: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    from vizcnn.checks import feature_maps
    from vizcnn.hooks import activations, strongest_units

    maps = feature_maps(activations(model, x, [layer])[layer], layer)
    _, where = strongest_units(maps[rows, channels.to(maps.device)])
    return where


def _deconv_method(model, data, layer, channels, images, options) -> Pictures:
    from vizcnn.scan import images_at

    top, wanted = _strongest_channels(model, data, layer, channels, DEFAULT_CHANNELS, images)
    indices = top.indices[layer][wanted]
    positions = top.positions[layer][wanted]
    filled = indices >= 0
    distinct = sorted(set(indices[filled].tolist()))
    x = images_at(model, data, distinct).to(model_device(model))
    row_of = {index: row for row, index in enumerate(distinct)}
    pair_channels = [c for c, row in zip(wanted, filled, strict=True) for f in row if f]
    labels = [f"channel {c}, image {int(i)}" for c, row in zip(wanted, indices, strict=True)
              for i in row if int(i) >= 0]
    return deconv_pictures(model, x, layer, pair_channels,
                           [row_of[int(i)] for i in indices[filled]],
                           positions[filled].to(x.device), labels)


def _occlusion_method(model, data, layer, channels, images, options) -> Pictures:
    from vizcnn.models import model_info
    from vizcnn.probes.occlusion import occlusion
    from vizcnn.scan import images_at

    x = images_at(model, data, range(images)).to(model_device(model))
    side = min(x.shape[-2:])
    window = options.get("window") or max(2, side // 4)
    stride = options.get("stride") or max(1, window // 4)
    given = None
    if channels is not None:
        given = channel_indices(channels)
        if len(given) != 1:
            raise BadArgument("occlusion's sanity check maps one feature map per image",
                              "give one channel (--channels C)")
    keywords = {"window": window, "stride": stride, "layer": layer, "progress": False,
                "output": options.get("output"), "preprocessing": options.get("preprocessing")}
    trained = occlusion(model, x, channel=None if given is None else int(given[0]), **keywords)
    targets, picked = trained.target.tolist(), trained.channel.tolist()
    name = model_info(model).class_name

    def pictures(prob: torch.Tensor, activation: torch.Tensor) -> torch.Tensor:
        """(N, gy, gx) each -> (2N, 1, gy, gx): per image its class score's map, then its
        feature map's."""
        return torch.stack([prob, activation.to(prob.dtype)], 1).flatten(0, 1).unsqueeze(1)

    def draw(network: nn.Module) -> torch.Tensor:
        found = [occlusion(network, x[n:n + 1], target=targets[n], channel=picked[n],
                           **keywords) for n in range(len(x))]
        return pictures(torch.cat([f.prob for f in found]),
                        torch.cat([f.activation for f in found]))

    labels = [label for n in range(len(x)) for label in
              (f"image {n}: p({name(targets[n])})", f"image {n}: {layer} ch {picked[n]}")]
    return Pictures(draw, tuple(labels), x.repeat_interleave(2, 0), tuple(x.shape[-2:]), True,
                    ("class score", "feature map") * len(x),
                    pictures(trained.prob, trained.activation))


def _featvis_method(model, data, layer, channels, images, options) -> Pictures:
    from vizcnn.featvis import feature_visualization
    from vizcnn.models import model_info

    wanted = (_strongest_channels(model, data, layer, None, DEFAULT_CHANNELS)[1]
              if channels is None else channel_indices(channels).tolist())  # checked by featvis
    size = model_info(model).input_size
    if size is None:
        from vizcnn.scan import first_input

        size = tuple(first_input(model, data).shape[-2:])
    keywords = {"objective": "neuron", "steps": options.get("steps"), "seed": 0, "size": size,
                "preprocessing": options.get("preprocessing"), "progress": False}

    def draw(network: nn.Module) -> torch.Tensor:
        return feature_visualization(network, layer, wanted, **keywords).images[:, 0]

    return Pictures(draw, tuple(f"channel {c}" for c in wanted), None, tuple(size), False)


_METHODS = {"deconv": _deconv_method, "occlusion": _occlusion_method,
            "feature_visualization": _featvis_method}


# --------------------------------------------------------------------------- the check


def sanity_check(
    model: nn.Module,
    data: Any,
    layer: str,
    method: Method = "deconv",
    *,
    channels: int | Sequence[int] | None = None,
    images: int = 2,
    cascade: bool = True,
    seed: int = 0,
    baseline_models: int = BASELINE_MODELS,
    window: int | None = None,
    stride: int | None = None,
    steps: int | None = None,
    output: Any = None,
    preprocessing: Any = None,
    progress: bool = True,
) -> SanityCheck:
    """Does the picture ``method`` draws of ``layer`` depend on the weights? (Adebayo et al.)

    Args:
        model: the trained network; it is never changed (the work is on one copy of it).
        data: what ``scan_topk`` takes (images, a folder, ``"shapes:N"``).
        layer: a layer with weights (a conv layer, typically).
        method: "deconv": the projection patch of each channel's strongest unit in its top
            ``images`` images (the top-k's units); "occlusion": for the first ``images``
            images of ``data``, the occlusion map of the class score (the trained network's
            prediction) and of the feature map (``channels``: one channel, default each image's
            strongest); "feature_visualization": the optimized image of each channel (the
            gallery's "neuron" objective, seed 0).
        channels: the channels checked (default: the layer's ``DEFAULT_CHANNELS`` with the
            strongest units in ``data``).
        images: top images per channel (deconv) or images (occlusion).
        cascade: re-initialize from the top layer down, keeping each step random (True), or
            one layer at a time (False).
        seed: the seed of every re-initialization: the same seed gives the same numbers.
        baseline_models: networks with every weight random, for the band of chance.
        window: occlusion's window (default a quarter of the image's side).
        stride: occlusion's stride (default a quarter of the window).
        steps: feature visualization's optimization steps (default ``featvis.DEFAULT_STEPS``).
        output: selects the class scores of a model with a tuple or dict output (occlusion).
        preprocessing: the model's normalisation, where the model does not carry it
            (occlusion's fill and feature visualization need it).
        progress: a tqdm bar over the steps.

    Returns:
        ``SanityCheck``.
    """
    require_hookable(model)
    if method not in _METHODS:
        raise BadArgument(f"unknown method {method!r}", f"use one of {', '.join(METHODS)}")
    positive_int(images, "images")
    positive_int(baseline_models, "baseline_models")
    names = _checked_layer(model, layer)
    if method != "deconv":  # before the data is read: its images need the normalisation too
        from vizcnn.models import normalisation_of

        normalisation_of(model, preprocessing, method.replace("_", " "))
    options = {"window": window, "stride": stride, "steps": steps, "output": output,
               "preprocessing": preprocessing}
    pictures = _METHODS[method](model, data, layer, channels, images, options)
    return check_pictures(model, layer, method, pictures, names, cascade=cascade, seed=seed,
                          baseline_models=baseline_models, progress=progress)


def _checked_layer(model: nn.Module, layer: str) -> list[str]:
    """The randomizable modules, once ``layer`` is found to be one of them."""
    module = resolve_layer(model, layer)
    names = randomizable(model)
    if layer not in names or not any(True for _ in module.parameters()):
        with_weights = [n for n in names if any(True for _ in resolve_layer(model, n)
                                                .parameters())]
        raise BadArgument(f"{layer!r} ({type(module).__name__}) has no weights to re-initialize",
                          "check a layer with weights: " + ", ".join(with_weights[:6])
                          + (", ..." if len(with_weights) > 6 else ""))
    return names


def check_pictures(model: nn.Module, layer: str, method: str, pictures: Pictures,
                   names: Sequence[str], *, cascade: bool = True, seed: int = 0,
                   baseline_models: int = BASELINE_MODELS, progress: bool = False
                   ) -> SanityCheck:
    """Draw ``pictures`` with the trained network, each randomization step and the baseline's
    networks, and measure them against the trained ones."""
    order = list(reversed(names))  # top first
    changed = _feeding(model, layer, order, pictures.size, pictures.everything)
    total = 1 + sum(changed) + baseline_models
    with progress_bar(total=total, desc=f"sanity check {layer}", unit="picture",
                      disable=not progress) as bar, _quiet():
        trained = pictures.of_trained(model)
        bar.update()
        drawn = [trained]
        for feeds, network in zip(changed, _randomized(model, order, cascade, seed),
                                  strict=True):
            drawn.append(pictures.draw(network) if feeds else
                         (drawn[-1] if cascade else trained))
            bar.update(feeds)
        baseline = []
        for b in range(baseline_models):
            baseline.append(pictures.draw(_all_random(model, names, seed + 1 + b)))
            bar.update()
    steps = torch.stack(drawn)
    return SanityCheck(
        method, layer, pictures.rows, ("trained", *order), (False, *changed), cascade, seed,
        pictures.inputs, steps, torch.stack(baseline),
        stacked([similarities(trained, picture) for picture in drawn]),
        stacked([similarities(trained, picture) for picture in baseline]),
        kept_parameters(model, names), pictures.kinds)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The deconvnet's per-model rectification warning says nothing new for the copies."""
    import warnings

    from vizcnn.deconv import RectificationWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RectificationWarning)
        yield


# --------------------------------------------------------------------------- one line per layer


def line_units(values: torch.Tensor, indices: torch.Tensor, count: int = LINE_CHANNELS
               ) -> tuple[list[int], list[int]]:
    """The units of a layer's line: the ``count`` channels with the strongest (finite,
    positive) top unit, and the data-set index of each one's top image.

    Args:
        values: (C,) each channel's strongest activation over the data.
        indices: (C,) the data-set index of the image where it is reached.
    """
    usable = values.isfinite() & (values > 0)
    order = [int(c) for c in values.nan_to_num(-math.inf).argsort(descending=True, stable=True)
             if bool(usable[c])][:count]
    return order, [int(indices[c]) for c in order]


def _line_pictures(model: nn.Module, data: Any, layer: str, channels: Sequence[int],
                   indices: Sequence[int], positions: torch.Tensor | None) -> Pictures:
    from vizcnn.scan import images_at

    distinct = sorted(set(indices))
    x = images_at(model, data, distinct).to(model_device(model))
    rows = [distinct.index(i) for i in indices]
    labels = [f"channel {c}, image {i}" for c, i in zip(channels, indices, strict=True)]
    return deconv_pictures(model, x, layer, channels, rows, positions, labels)


def layer_sanity(model: nn.Module, data: Any, layer: str, channels: Sequence[int],
                 indices: Sequence[int], *, positions: torch.Tensor | None = None,
                 seed: int = 0, baseline_models: int = BASELINE_MODELS) -> SanityCheck | None:
    """The deconvnet's sanity check (the cascade) for given units of ``layer``: each
    channel's projection from its unit in the data-set image ``indices`` (at ``positions``
    (P, 2), default the channel's strongest unit there). None where ``layer`` has no weights
    or there is no unit."""
    if not channels or layer not in randomizable(model):
        return None
    return check_pictures(model, layer, "deconv",
                          _line_pictures(model, data, layer, channels, indices, positions),
                          randomizable(model), seed=seed, baseline_models=baseline_models)


def line_similarity(model: nn.Module, data: Any, layer: str, channels: Sequence[int],
                    indices: Sequence[int], *, positions: torch.Tensor | None = None,
                    seed: int = 0) -> float | None:
    """The number of a layer's line (the doctor's): the mean ``LINE_METRIC`` between the
    trained network's projections of the units (as ``layer_sanity``) and those of the network
    with every weight random, which is also the cascade's last step (``SanityCheck.final``).
    Two projections per unit. None where ``layer`` has no weights or there is no unit."""
    if not channels or layer not in randomizable(model):
        return None
    pictures = _line_pictures(model, data, layer, channels, indices, positions)
    trained = pictures.of_trained(model)
    with _quiet():
        every = pictures.draw(_all_random(model, randomizable(model), seed))
    return float(similarities(trained, every).metric(LINE_METRIC).nanmean())


def cascade_cost(model: nn.Module, layer: str, size: tuple[int, int], units: int,
                 baseline_models: int = BASELINE_MODELS) -> int:
    """Projections that ``layer_sanity``'s cascade computes for ``units`` units: the trained
    network's, one per step that can change them, and the baseline's (0: no weights)."""
    names = randomizable(model)
    if layer not in names:
        return 0
    return units * (1 + sum(_feeding(model, layer, names, size, False)) + baseline_models)
