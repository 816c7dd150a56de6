"""Panels: the one recipe for each figure, from (model, images, options) to a ``Panel``.

The ``vizcnn`` command line, ``vizcnn demo`` and the gallery draw every figure through these
functions, so a figure means the same wherever it appears. A panel runs the probe, draws the
figure and says in a few lines what it found (``Panel.notes``, which the CLI prints).

Images are given as ``preprocess`` takes them (a path, an array, a PIL image, a tensor in
[0, 1]); each panel preprocesses them with the model's ``ModelInfo`` (see
``vizcnn.with_model_info``), and shows the model's input in its own colours where the
normalisation is known.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import nn

from vizcnn.checks import feature_maps
from vizcnn.display import ShowsItself
from vizcnn.errors import BadArgument
from vizcnn.hooks import activations, capture, preserved_state, run_forward, strongest_units
from vizcnn.layers import list_layers, resolve_layer
from vizcnn.models import model_info, normalisation_of, preprocess
from vizcnn.render import figures
from vizcnn.render.grid import image_tiles
from vizcnn.scan import first_input

__all__ = [
    "Panel",
    "adversarial_panel",
    "conv_layer",
    "display_normalisation",
    "drawn_evolution",
    "evolution_panel",
    "excite_panel",
    "feature_maps_panel",
    "feature_visualization_panel",
    "featvis_beside_top_panel",
    "filters_panel",
    "first_layers_panel",
    "invariance_panel",
    "occlusion_panel",
    "projection_panel",
    "sanity_panel",
    "top_patches_panel",
]


@dataclass(frozen=True)
class Panel(ShowsItself):
    """A figure and what it shows, in words.

    Attributes:
        figure: the matplotlib Figure (save it with ``figures.save_figure``).
        notes: one line each: the findings behind the figure (a label that flipped, the
            strongest unit, ...), as the CLI prints them.
        result: the probe's result the figure was drawn from (``OcclusionMaps``,
            ``AdversarialResult``, ...), or None.
    """

    figure: Figure
    notes: tuple[str, ...] = ()
    result: Any = None


def display_normalisation(model: nn.Module
                          ) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """(mean, std) of pixels in [0, 1] for showing the model's input in its own colours, or
    (None, None) where it is unknown (images are then stretched to their range)."""
    known = model_info(model).preprocessing
    return known.pixel_normalisation() if known.known else (None, None)


def _batch(model: nn.Module, images: Sequence[Any]) -> torch.Tensor:
    """(N, C, H, W): the model's input for each image."""
    if not len(images):
        raise BadArgument("no image given")
    return torch.cat([preprocess(model, image) for image in images])


def _shown(model: nn.Module, x: torch.Tensor):
    """uint8 (N, H, W, 3): the model input ``x`` as a person sees it."""
    return image_tiles(x, *display_normalisation(model))


def conv_layer(model: nn.Module, name: str | None = None) -> str:
    """``name`` if it is a conv layer (default: the model's first), else a one-line error that
    lists the conv layers."""
    convs = list_layers(model, "conv")
    if not convs:
        raise BadArgument("this model has no conv layer")
    if name is None:
        return convs[0]
    module = resolve_layer(model, name)
    if not isinstance(module, nn.Conv2d):
        raise BadArgument(f"layer {name!r} is a {type(module).__name__}, not a conv layer",
                          f"conv layers: {', '.join(convs[:8])}{' ...' if len(convs) > 8 else ''}")
    return name


# --------------------------------------------------------------------------- what layers hold


def filters_panel(model: nn.Module, layer: str | None = None, *, mode: str = "auto") -> Panel:
    """A conv layer's filters as a grid (default: the first conv layer, Fig. 6's view)."""
    layer = conv_layer(model, layer)
    weight = resolve_layer(model, layer).weight
    return Panel(figures.filters_figure(weight, layer=layer, mode=mode))


def feature_maps_panel(model: nn.Module, images: Sequence[Any], layer: str, *,
                       scaling: str = "tile", predictions: bool = False) -> Panel:
    """One row per image: the model's input beside the feature-map grid of ``layer``; with
    ``predictions`` the predicted class is written over each input (a full forward pass, so
    only for classifiers)."""
    x = _batch(model, images)
    if predictions:
        with (preserved_state(model, eval_mode=True), capture(model, [layer]) as captured,
              torch.no_grad()):
            predicted = run_forward(model, x).argmax(1).tolist()  # one pass: maps and labels
        maps = captured[layer]
        info = model_info(model)
        titles = [f"predicted: {info.class_name(p)}" for p in predicted]
    else:
        maps, titles = activations(model, x, [layer])[layer], ["input"] * len(x)
    feature_maps(maps, layer)
    return Panel(figures.feature_maps_rows(_shown(model, x), maps, layer=layer,
                                           titles=titles, scaling=scaling))


def projection_panel(model: nn.Module, image: Any, layer: str, channel: int, *,
                     mode: str = "max") -> Panel:
    """One channel's deconvnet projection beside the image; in "max" mode with the strongest
    unit's receptive field drawn and enlarged."""
    from vizcnn.deconv import Deconvnet
    from vizcnn.receptive import receptive_field

    x = _batch(model, [image])
    projection = Deconvnet(model).project(x, layer, channel, mode=mode)
    box, notes = None, []
    maps = activations(model, x, [layer])[layer]
    if mode == "max" and maps.dim() == 4:
        value, position = strongest_units(maps[0, channel])
        (y, x_), strongest = position.tolist(), float(value)
        box = receptive_field(model, layer, tuple(x.shape[-2:])).box(y, x_)
        notes.append(f"strongest unit of channel {channel}: ({y}, {x_}), activation "
                     f"{strongest:.4g}, receptive field box {box}")
        if strongest <= 0:
            notes.append("note: the channel does not fire anywhere in this image (its "
                         "strongest activation is not positive); try another channel or image")
    fig = figures.projection_figure(_shown(model, x)[0], projection[0], layer=layer,
                                    channel=channel, box=box,
                                    title=f"{layer} channel {channel} ({mode})")
    return Panel(fig, tuple(notes), projection)


def top_patches_panel(model: nn.Module, top: Any, data: Any, layer: str,
                      channels: Sequence[int] | None = None) -> Panel:
    """Zeiler & Fergus Fig. 2 for one layer: per channel its top-k projections beside the
    image patches they came from (``top`` from ``scan_topk`` over ``data``)."""
    from vizcnn.deconv import top_patches

    patches = top_patches(model, top, data, layer, channels)
    mean, std = display_normalisation(model)
    return Panel(figures.top_patches_figure(patches, mean=mean, std=std), result=patches)


# --------------------------------------------------------------------------- probes


def occlusion_panel(model: nn.Module, images: Sequence[Any], *, window: int = 16,
                    stride: int = 4, layer: str | None = None, channel: int | None = None,
                    target: int | str | None = None, engine: str = "auto",
                    approx: bool | float = False, output: Any = None,
                    progress: bool = True) -> Panel:
    """Zeiler & Fergus Fig. 7, one row per image: the class probability and label maps, and
    with ``layer`` the feature map's activation map and its deconvnet projection. ``target``
    is a class index or name (default: each clean image's prediction)."""
    from vizcnn.deconv import Deconvnet
    from vizcnn.probes.occlusion import occlusion

    info = model_info(model)
    normalisation_of(model, None, "occlusion's fill (the data's mean gray)")
    x = _batch(model, images)
    maps = occlusion(model, x, window=window, stride=stride, target=info.class_index(target),
                     layer=layer, channel=channel, engine=engine, approx=approx,
                     output=output, progress=progress)
    projections = None
    if maps.layer is not None:
        net = Deconvnet(model)
        projections = torch.cat([net.project(x[n:n + 1], maps.layer, int(maps.channel[n]))
                                 for n in range(len(x))])
    mean, std = display_normalisation(model)
    fig = figures.occlusion_figure(x, maps, projections=projections, classes=info.classes,
                                   mean=mean, std=std)
    return Panel(fig, _occlusion_notes(maps, info), maps)


def _occlusion_notes(maps: Any, info: Any) -> tuple[str, ...]:
    """What the occlusion maps of the first image say, in words."""
    clean, target = int(maps.clean_label[0]), int(maps.target[0])
    name = info.class_name
    notes = [f"clean image: {name(clean)} ({float(maps.clean_prob[0]):.3f} for {name(target)});"
             f" {maps.prob.shape[1]}x{maps.prob.shape[2]} positions, engine {maps.engine}"
             + (f" ({maps.engine_note})" if maps.engine_note else "")]
    worst = int(maps.prob[0].flatten().argmin())
    top, left = maps.positions.view(-1, 2)[worst].tolist()
    notes.append(f"lowest p({name(target)}) = {float(maps.prob[0].flatten()[worst]):.3f} with "
                 f"the occluder at y={top}, x={left}")
    if maps.max_deviation is not None:
        notes.append(f"approximate: largest deviation {maps.max_deviation:.2e} from exact on "
                     f"{maps.checked} re-checked positions")
    return tuple(notes)


def adversarial_panel(model: nn.Module, image: Any, *, method: str = "fgsm",
                      eps: float = 8 / 255, steps: int = 10, target: int | str | None = None,
                      output: Any = None) -> Panel:
    """The smallest change that flips the decision (FGSM, PGD or L-BFGS), magnified, with how
    far each layer's output moved."""
    from vizcnn.probes.adversarial import fgsm, layer_displacement, lbfgs_adversarial, pgd

    if method not in ("fgsm", "pgd", "lbfgs"):
        raise BadArgument(f"unknown method {method!r}", "use fgsm, pgd or lbfgs")
    info = model_info(model)
    normalisation_of(model, None, method)
    x = _batch(model, [image])
    target = info.class_index(target)
    if method == "fgsm":
        result = fgsm(model, x, eps, target=target, output=output)
    elif method == "pgd":
        result = pgd(model, x, eps, steps=steps, target=target, output=output)
    else:
        result = lbfgs_adversarial(model, x, target=target, output=output)
    note = (f"{method}: {info.class_name(int(result.clean_label[0]))} "
            f"({float(result.clean_prob[0]):.3f}) -> {info.class_name(int(result.label[0]))} "
            f"({float(result.prob[0]):.3f}), {'success' if result.success[0] else 'failed'}; "
            f"RMS {float(result.rms[0]) * 255:.2f}/255, max {float(result.linf[0]) * 255:.2f}"
            "/255")
    mean, std = display_normalisation(model)
    fig = figures.adversarial_figure(x, result, displacement=layer_displacement(model, x, result.x),
                                     classes=info.classes, mean=mean, std=std)
    return Panel(fig, (note,), result)


def excite_panel(model: nn.Module, image: Any, layer: str, channel: int | None = None, *,
                 eps: float = 8 / 255, steps: int = 20) -> Panel:
    """The pattern that, added within ``eps``, excites one feature map most (default: the
    map with the strongest activation in the image)."""
    from vizcnn.hooks import strongest_channels
    from vizcnn.probes.adversarial import excite

    normalisation_of(model, None, "excite")
    x = _batch(model, [image])
    if channel is None:
        maps = feature_maps(activations(model, x, [layer])[layer], layer)
        channel = int(strongest_channels(maps)[0])
    result = excite(model, x, layer, channel, eps, steps)
    note = (f"{layer} channel {channel}: total activation {float(result.before[0]):.4g} -> "
            f"{float(result.after[0]):.4g} (eps {result.eps:.4f})")
    mean, std = display_normalisation(model)
    return Panel(figures.excite_figure(x, result, mean=mean, std=std), (note,), result)


def feature_visualization_panel(model: nn.Module, layer: str | None,
                                channels: Sequence[int] | None = None, **options: Any) -> Panel:
    """Images optimized until each channel (unit, class) fires (``vizcnn.featvis``); the
    ``options`` go to ``feature_visualization``."""
    from vizcnn.featvis import describe, feature_visualization

    result = feature_visualization(model, layer, channels, **options)
    if result.recipe.objective == "class":
        info = model_info(model)
        names = [info.class_name(c) for c in result.channels.tolist()]
        notes = [f"class {name}: score {float(v.max()):.4g}"
                 for name, v in zip(names, result.activation, strict=True)]
    else:
        notes = [f"{result.layer} channel {c}: strongest unit {float(v.max()):.4g}"
                 + (" (never fired)" if bool(f) else "")
                 for c, v, f in zip(result.channels.tolist(), result.strongest, result.failed,
                                    strict=True)]
    return Panel(figures.feature_visualization_figure(result), (describe(result), *notes),
                 result)


def featvis_beside_top_panel(model: nn.Module, top: Any, data: Any, layers: Sequence[str],
                             per_layer: int = 4, *, visualized: Mapping[str, Any] | None = None,
                             **options: Any) -> Panel:
    """Per layer the ``per_layer`` channels with the strongest natural units: their top-k
    projections and patches (Fig. 2) beside their feature visualization (the centre unit's
    objective, cropped to its receptive field); ``options`` go to
    ``feature_visualization``. ``visualized``: ``{layer: FeatureVisualization}`` made
    already with that objective (a gallery's, ``Gallery.feature_vis``) that holds these
    channels: their rows are taken instead of optimizing them again."""
    from vizcnn.deconv import top_patches
    from vizcnn.featvis import feature_visualization
    from vizcnn.receptive import receptive_field

    rows, notes = [], []
    info = model_info(model)
    size = info.input_size or tuple(first_input(model, data).shape[-2:])
    for layer in layers:
        strongest = top.values[layer][:, 0]
        channels = sorted(strongest.argsort(descending=True)[:per_layer].tolist())
        patches = top_patches(model, top, data, layer, channels)
        made = (visualized or {}).get(layer)
        if (made is not None and made.recipe.objective == "neuron" and not options
                and tuple(made.images.shape[-2:]) == tuple(size)):
            result = made.select(channels)
        else:
            result = feature_visualization(model, layer, channels, objective="neuron",
                                           size=size, progress=False, **options)
        height, width = activations(model, torch.zeros(1, result.images.shape[2], *size),
                                    [layer])[layer].shape[-2:]
        box = receptive_field(model, layer, size).box(height // 2, width // 2)
        rows.append((layer, patches, result, box))
        notes.append(f"{layer}: channels {channels}, strongest unit reached "
                     + ", ".join(f"{float(v.max()):.3g}" for v in result.strongest)
                     + " (natural " + ", ".join(f"{float(strongest[c]):.3g}" for c in channels)
                     + ")")
    mean, std = display_normalisation(model)
    return Panel(figures.featvis_beside_top_figure(rows, mean=mean, std=std), tuple(notes),
                 rows)


def invariance_panel(model: nn.Module, images: Sequence[Any], *,
                     layers: tuple[str, str] | None = None,
                     true_class: int | str | None = None, output: Any = None) -> Panel:
    """Zeiler & Fergus Fig. 5: translate, scale and rotate each image; feature distances at a
    low and a high layer (default: ``invariance.default_layers``) and P(true class)."""
    from vizcnn.probes.invariance import TRANSFORMS, default_layers, invariance

    info = model_info(model)
    normalisation_of(model, None, "invariance")
    layers = tuple(layers) if layers else default_layers(model)
    true_class = info.class_index(true_class)
    results = {t: [invariance(model, image, t, layers=layers, true_class=true_class,
                              output=output) for image in images] for t in TRANSFORMS}
    notes = tuple(f"{t:<9} {layers[1]} distance up to {float(r[0].distance[layers[1]].max()):.3f};"
                  f" P(true class) from {float(r[0].prob.min()):.3f} to "
                  f"{float(r[0].prob.max()):.3f}" for t, r in results.items())
    return Panel(figures.invariance_figure(results, classes=info.classes), notes, results)


def evolution_panel(checkpoints: Any, data: Any, layers: str | Sequence[str],
                    channels: Sequence[int] | None = None, *, progress: bool = False,
                    **options: Any) -> Panel:
    """Zeiler & Fergus Fig. 4: each channel's strongest projection per checkpoint and how
    settled each layer is (``vizcnn.feature_evolution``; ``options`` go to it)."""
    from vizcnn.evolution import feature_evolution

    evolution = feature_evolution(checkpoints, data, layers, channels, progress=progress,
                                  **options)
    return drawn_evolution(evolution)


def drawn_evolution(evolution: Any, channels: Any = None) -> Panel:
    """The Fig. 4 panel of a ``FeatureEvolution`` computed already; ``channels``:
    ``{layer: channels}`` drawn of those it holds (default: all)."""
    notes = tuple(
        f"{name:<14} settledness {' '.join(f'{float(v):.2f}' for v in curve)} over epochs "
        f"{', '.join(map(str, evolution.epochs))}; 0.9 from epoch "
        f"{evolution.settled_epoch(name)}"
        for name, curve in evolution.settledness.items())
    return Panel(figures.evolution_figure(evolution, channels=channels), notes, evolution)


def first_layers_panel(models: Mapping[str, nn.Module], data: Any, *,
                       channels: Sequence[int] = range(24)) -> Panel:
    """Zeiler & Fergus Fig. 6 b-e for networks that differ in their first layer: each one's
    first-layer filters, second-layer features and health numbers (``vizcnn.doctor``);
    ``result``: {name: HealthReport}."""
    from vizcnn.deconv import top_patches
    from vizcnn.doctor import doctor
    from vizcnn.scan import scan_topk
    from vizcnn.units import accuracy

    rows, reports, notes = [], {}, []
    for name, model in models.items():
        first, second = list_layers(model, "conv")[:2]
        report = doctor(model, data, progress=False)  # every conv layer, the first two first
        top = scan_topk(model, data, [second], k=1, progress=False)
        count = top.values[second].shape[0]
        patches = top_patches(model, top, data, second, [c for c in channels if c < count])
        lines = _health_lines(report, accuracy(model, data, progress=False))
        rows.append({"name": name, "weight": resolve_layer(model, first).weight.detach(),
                     "projections": patches.projections[:, 0], "lines": lines})
        reports[name] = report
        notes.append(f"{name}: " + "; ".join(line.strip() for line in lines[1:4]))
    return Panel(figures.first_layers_figure(rows), tuple(notes), reports)


def _health_lines(report: Any, score: Any) -> list[str]:
    """The numbers of Fig. 6's comparison, one per line."""
    first, second = report.layers[0], report.layers[1]
    spectrum = first.spectrum
    bands = [int((spectrum.dominant_band == b).sum()) for b in range(3)]
    low, mid, high = spectrum.mean_shares
    lines = [f"accuracy {100 * score.fraction:.1f} % of {score.total:,}",
             f"layer 1 energy low/mid/high {low:.0%}/{mid:.0%}/{high:.0%}",
             f"filters mostly low/mid/high {bands[0]}/{bands[1]}/{bands[2]}",
             f"layer 1: {len(first.dead)} dead, {len(spectrum.flat)} flat, "
             f"{len(spectrum.noise)} noise"]
    if second.aliasing is not None:
        lines.append(f"layer 2 stride-{second.stride} grid power "
                     f"{float(second.aliasing.mean()):.1%} (flat {second.grid_fraction:.1%})")
    lines.append("dead per layer " + " ".join(str(len(h.dead)) for h in report.layers))
    lines.append(f"of {' '.join(str(h.channels) for h in report.layers)} channels")
    return lines


# --------------------------------------------------------------------------- sanity checks


def sanity_panel(model: nn.Module, data: Any, layer: str,
                 methods: str | Sequence[str] = ("deconv", "occlusion", "feature_visualization"),
                 **options: Any) -> Panel:
    """Adebayo et al.'s sanity check of the pictures vizcnn draws of ``layer``: each method's
    pictures under cascading randomization and their similarity to the trained network's,
    side by side (``figures.sanity_figure``). ``options`` are ``sanity.sanity_check``'s; the
    notes give each method's line; ``result`` is the list of ``SanityCheck``."""
    from vizcnn.sanity import sanity_check

    methods = [methods] if isinstance(methods, str) else list(methods)
    checks = [sanity_check(model, data, layer, method, **options) for method in methods]
    return drawn_sanity(model, checks)


def drawn_sanity(model: nn.Module, checks: Sequence[Any]) -> Panel:
    """The figure and notes of ``sanity_panel`` from checks made already."""
    mean, std = display_normalisation(model)
    return Panel(figures.sanity_figure(checks, mean=mean, std=std),
                 tuple(check.line() for check in checks), list(checks))
