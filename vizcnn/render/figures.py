"""Matplotlib figures. Each function takes an optional ``ax``, returns the Figure, and never
calls ``plt.show()``; save with ``save_figure`` (PNG, PDF or SVG by the file's suffix).

Figures are built as ``matplotlib.figure.Figure`` objects, not through pyplot, so vizcnn needs
no display, leaves the user's backend alone, and keeps no figure alive in pyplot's registry."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import cv2
import matplotlib
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from vizcnn.data.images import load_image
from vizcnn.errors import BadArgument, BadOutput
from vizcnn.io import atomic_path, file_target
from vizcnn.receptive import ReceptiveField
from vizcnn.render.grid import (
    LABEL_PALETTE,
    feature_map_grid,
    filter_grid,
    image_tiles,
    projection_tiles,
    tile,
)

__all__ = [
    "FORMATS",
    "EVOLUTION_TILE",
    "adversarial_figure",
    "evolution_figure",
    "evolution_mosaic",
    "excite_figure",
    "feature_maps_figure",
    "feature_maps_rows",
    "feature_visualization_figure",
    "featvis_beside_top_figure",
    "figure_path",
    "filters_figure",
    "first_layers_figure",
    "invariance_figure",
    "occlusion_figure",
    "projection_figure",
    "receptive_field_boxes",
    "sanity_figure",
    "save_figure",
    "settledness_figure",
    "top_patches_figure",
]

FORMATS = (".png", ".pdf", ".svg")

if TYPE_CHECKING:  # results of the core, for the annotations only
    from vizcnn.deconv import TopPatches
    from vizcnn.evolution import FeatureEvolution
    from vizcnn.featvis import FeatureVisualization
    from vizcnn.probes.invariance import InvarianceResult
    from vizcnn.probes.occlusion import OcclusionMaps
    from vizcnn.sanity import SanityCheck

Pixels: TypeAlias = "torch.Tensor | np.ndarray"  # a tensor or an array of the shape given
Normalisation: TypeAlias = "Sequence[float] | None"  # the model's mean or std, per channel


def _as_rgb(image) -> np.ndarray:
    """uint8 (H, W, 3) from anything ``load_image`` takes."""
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3:
        return image
    return load_image(image).permute(1, 2, 0).numpy()


def receptive_field_boxes(
    image: Any,
    fields: Mapping[str, ReceptiveField],
    unit: tuple[float, float] = (0.5, 0.5),
    ax: Axes | None = None,
) -> Figure:
    """Draw, on the image, the box that one unit of each layer sees.

    Args:
        image: the input image at the size the fields were computed for, (H, W, 3) uint8 or
            anything ``load_image`` takes.
        fields: ``{layer: ReceptiveField}``, e.g. from ``receptive_fields``.
        unit: where the unit sits, as a fraction of the map (0.5, 0.5 = the centre unit).
        ax: draw into this axes instead of a new figure.
    """
    rgb = _as_rgb(image)
    fig, ax = _new_axes(4.2, 4.2 * rgb.shape[0] / rgb.shape[1] + 0.4, ax)
    ax.imshow(rgb)
    colours = matplotlib.colormaps["viridis"](np.linspace(0.0, 0.9, max(len(fields), 1)))
    for colour, (name, field) in zip(colours, fields.items(), strict=False):
        if field.input_size != rgb.shape[:2]:
            raise BadArgument(f"the field of {name} is for {field.input_size}, the image is "
                              f"{rgb.shape[:2]}")
        y, x = _unit_at(field, unit)
        top, left, bottom, right = field.box(y, x)
        size, _ = field.describe()
        ax.add_patch(Rectangle((left - 0.5, top - 0.5), right - left, bottom - top, fill=False,
                               lw=1.6, color=colour, label=f"{name}: {size} px"))
    ax.set_axis_off()
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, frameon=False)
    if unit == (0.5, 0.5):
        ax.set_title("receptive field of the centre unit", fontsize=9)
    return fig


def _new_axes(width: float, height: float, ax: Axes | None) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots()


def filters_figure(weight: Pixels, *, layer: str = "", mode: str = "auto", ax: Axes | None = None,
                   title: str | None = None) -> Figure:
    """A conv layer's filters as a grid (see ``grid.filter_grid``), titled with the layer.

    Args:
        weight: (out_channels, in_channels, kh, kw).
        layer: the layer's name, for the title.
    """
    grid = filter_grid(weight, mode=mode)
    fig, ax = _new_axes(4.5, 4.5 * grid.shape[0] / grid.shape[1] + 0.4, ax)
    ax.imshow(grid, interpolation="nearest")
    ax.set_axis_off()
    out_channels, in_channels, height, width = weight.shape
    if title is None:
        title = f"{layer} filters: {out_channels} x {in_channels} x {height} x {width}".strip()
    ax.set_title(title, fontsize=9)
    return fig


def feature_maps_figure(activations: Pixels, *, layer: str = "", image: Any = None,
                        scaling: str = "tile",
                        ax: Axes | None = None, title: str | None = None) -> Figure:
    """One tile per channel of a layer's output for one image (see ``grid.feature_map_grid``).

    Args:
        activations: (C, H, W) or (1, C, H, W).
        image: the input image, shown beside the grid when given and no ``ax`` is.
        scaling: "tile" (each channel its own range) or "shared".
    """
    grid = feature_map_grid(activations, scaling=scaling, colormap=cv2.COLORMAP_VIRIDIS)
    shape = tuple(activations.shape[-3:])
    if ax is None and image is not None:
        fig = Figure(figsize=(7.0, 4.6 * grid.shape[0] / grid.shape[1] + 0.6),
                     layout="constrained")
        image_ax, ax = fig.subplots(1, 2, width_ratios=[1, 2.2])
        image_ax.imshow(_as_rgb(image))
        image_ax.set_axis_off()
        image_ax.set_title("input", fontsize=9)
    else:
        fig, ax = _new_axes(4.5, 4.5 * grid.shape[0] / grid.shape[1] + 0.4, ax)
    ax.imshow(grid, interpolation="nearest")
    ax.set_axis_off()
    if title is None:
        size = " x ".join(map(str, shape))
        title = f"{layer} feature maps: {size} ({scaling} scaling)".strip()
    ax.set_title(title, fontsize=9)
    return fig


def feature_maps_rows(images: Sequence[Any], maps: Sequence[Pixels], *, layer: str = "",
                      titles: Sequence[str] | None = None, scaling: str = "tile") -> Figure:
    """One row per image: the image beside the feature-map grid of its ``maps``.

    Args:
        images: uint8 (N, H, W, 3), the model's inputs as shown.
        maps: (N, C, h, w) the layer's output for those images.
        titles: one title per image (default: "input").
    """
    count = len(images)
    titles = list(titles) if titles is not None else ["input"] * count
    fig = Figure(figsize=(6.4, 3.0 * count), layout="constrained")
    axes = fig.subplots(count, 2, width_ratios=[1, 1.6], squeeze=False)
    for row in range(count):
        axes[row, 0].imshow(images[row])
        axes[row, 0].set_axis_off()
        axes[row, 0].set_title(titles[row], fontsize=9)
        feature_maps_figure(maps[row], layer=layer, ax=axes[row, 1], scaling=scaling,
                            title=None if row == 0 else "")
    return fig


def _unit_at(field: ReceptiveField, unit: tuple[float, float]) -> tuple[int, int]:
    """The unit nearest to a fractional position of the map, from the field's geometry."""
    if field.is_global:
        return 0, 0
    position = []
    for axis in range(2):
        # the units whose box starts inside the image are 0 .. count - 1
        count = (field.input_size[axis] - 1 - field.offset[axis]) // field.jump[axis] + 1
        centre = unit[axis] * (field.input_size[axis] - 1)
        index = round((centre - field.offset[axis] - (field.size[axis] - 1) / 2)
                      / field.jump[axis])
        position.append(int(min(max(index, 0), max(count - 1, 0))))
    return position[0], position[1]


def figure_path(path: str | os.PathLike) -> str:
    """``path`` if a figure can be saved there (a .png, .pdf or .svg name that is not a
    folder, in a writable folder), else a one-line error: check it before long work."""
    suffix = os.path.splitext(str(path))[1].lower()
    if Path(path).is_dir():
        raise BadOutput(f"cannot save a figure as '{path}': it is a folder",
                          "give a file name ending in .png, .pdf or .svg")
    if suffix not in FORMATS:
        raise BadArgument(f"cannot save a figure as {suffix or 'a file without suffix'!r} "
                          f"('{path}')", "use .png, .pdf or .svg")
    return str(file_target(path))


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 200) -> str:
    """Save as PNG, PDF or SVG (by suffix), atomically. Returns the path."""
    suffix = os.path.splitext(figure_path(path))[1].lower()
    with atomic_path(path) as temporary:
        fig.savefig(temporary, format=suffix[1:], dpi=dpi, bbox_inches="tight")
    return str(path)



def top_patches_figure(patches: TopPatches, *, mean: Normalisation = None,
                       std: Normalisation = None, columns: int = 4,
                       ax: Axes | None = None, title: str | None = None) -> Figure:
    """Zeiler & Fergus Fig. 2 for one layer: per channel a block of its top-k projections
    (left, gray = zero) beside the image patches they came from (right), strongest first.

    Args:
        patches: a ``deconv.TopPatches`` (from ``top_patches``).
        mean: the model's normalisation, to show the image patches in their own colours
            (default: each patch stretched to its range).
        std: the same normalisation's standard deviation.
        columns: channel blocks per row.
    """

    count, k = patches.values.shape[:2]
    if count == 0:
        raise BadArgument("no channel to draw")
    side = math.ceil(math.sqrt(k))
    filled = patches.indices >= 0
    blocks = []
    for channel in range(count):
        projections = projection_tiles(patches.projections[channel])
        images = image_tiles(patches.images[channel], mean, std)
        projections[~filled[channel].numpy()] = 255
        images[~filled[channel].numpy()] = 255
        left = tile(projections, columns=side, padding=1, background=255)
        right = tile(images, columns=side, padding=1, background=255)
        gap = np.full((left.shape[0], max(2, left.shape[1] // 12), 3), 255, np.uint8)
        blocks.append(np.concatenate([left, gap, right], axis=1))
    columns = max(1, min(columns, count))
    spacing = max(4, blocks[0].shape[0] // 6)
    mosaic = tile(np.stack(blocks), columns=columns, padding=spacing, background=255)
    label_room = 0.22 * math.ceil(count / columns)
    width = 7.0 if count >= columns else 7.0 * count / columns
    fig, ax = _new_axes(width, width * mosaic.shape[0] / mosaic.shape[1] + label_room + 0.3, ax)
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_axis_off()
    height, block_width = blocks[0].shape[:2]
    for index, channel in enumerate(patches.channels):
        row, column = divmod(index, columns)
        ax.text(spacing + column * (block_width + spacing), spacing + row * (height + spacing)
                - 1, f"ch {channel}", fontsize=6, va="bottom", ha="left")
    if title is None:
        title = (f"{patches.layer}: top {k} projections (left) and image patches (right) "
                 "per channel")
    ax.set_title(title, fontsize=8)
    return fig


def feature_visualization_figure(result: FeatureVisualization, *, columns: int = 8,
                                 natural: torch.Tensor | None = None,
                                 title: str | None = None) -> Figure:
    """Feature visualizations, one tile per image: per channel its n images side by side,
    titled with the channel and the strongest unit the image reached (and, with ``natural``
    (K,), the channel's strongest natural unit). A channel that never fired shows a crossed
    grey tile saying so, never its grey picture.

    Args:
        result: a ``featvis.FeatureVisualization``.
        columns: channel blocks per row.
    """
    from vizcnn.render.grid import pixel_tiles

    count, n = result.images.shape[:2]
    columns = max(1, min(columns, count))
    rows = math.ceil(count / columns)
    fig = Figure(figsize=(min(7.0, 1.0 * columns * n), 1.15 * rows + 0.4), layout="constrained")
    axes = fig.subplots(rows, columns * n, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for k, channel in enumerate(result.channels.tolist()):
        row, column = divmod(k, columns)
        tiles = pixel_tiles(result.images[k])
        for i in range(n):
            ax = axes[row, column * n + i]
            if bool(result.failed[k]):
                ax.imshow(np.full_like(tiles[i], 200))
                ax.plot([0, tiles.shape[2] - 1], [0, tiles.shape[1] - 1], color="0.4", lw=0.8)
                ax.text(tiles.shape[2] / 2, tiles.shape[1] / 2, "never\nfired", ha="center",
                        va="center", fontsize=5)
            else:
                ax.imshow(tiles[i], interpolation="nearest")
            if i == 0:
                text = f"{channel}: {float(result.strongest[k].max()):.3g}"
                if natural is not None:
                    text += f" ({float(natural[k]):.3g})"
                ax.set_title(text, fontsize=5, pad=2)
    what = {"channel": "channel mean", "neuron": "one unit", "class": "class score"}
    fig.suptitle(title or f"{result.layer}: feature visualization ({what[result.recipe.objective]}"
                 f", {result.recipe.steps} steps); title: strongest unit reached"
                 + (" (strongest natural unit)" if natural is not None else ""), fontsize=7)
    return fig


def featvis_beside_top_figure(rows: Sequence[Mapping[str, Any]], *, mean: Normalisation = None,
                              std: Normalisation = None, title: str | None = None
                              ) -> Figure:
    """Zeiler & Fergus Fig. 2 with the third picture of the field: per channel its top-k
    projections, the image patches they came from, and its feature visualization (the image
    optimized until the channel's centre unit fires most, cropped to that unit's receptive
    field), one row of channels per layer.

    Args:
        rows: per layer ``(layer, patches, result, box)``: a ``deconv.TopPatches``, the
            ``featvis.FeatureVisualization`` of the same channels and the receptive field
            (top, left, bottom, right) of the optimized unit.
        mean: the model's normalisation, to show the patches in their own colours.
        std: the same normalisation's standard deviation.
    """
    from vizcnn.render.grid import pixel_tiles

    def square(rgb: np.ndarray) -> np.ndarray:
        """A tile mosaic or crop at ``side`` x ``side`` pixels: every layer's row the same
        height, small receptive fields enlarged pixel by pixel."""
        small = max(rgb.shape[:2]) < side
        return cv2.resize(np.ascontiguousarray(rgb), (side, side),
                          interpolation=cv2.INTER_NEAREST if small else cv2.INTER_AREA)

    side, label = 96, 16
    strips = []
    for _, patches, result, box in rows:
        k = patches.values.shape[1]
        columns = math.ceil(math.sqrt(k))
        top_, left, bottom, right = box
        crops = pixel_tiles(result.images[:, 0])[:, top_:bottom, left:right]
        blocks = []
        for c in range(len(patches.channels)):
            crop = square(crops[c])
            if bool(result.failed[c]):
                crop[:] = 200
            gap = np.full((side, 4, 3), 255, np.uint8)
            blocks.append(np.concatenate([
                square(tile(projection_tiles(patches.projections[c]), columns=columns)), gap,
                square(tile(image_tiles(patches.images[c], mean, std), columns=columns)), gap,
                crop], axis=1))
        strip = tile(np.stack(blocks), columns=len(blocks), padding=8)
        strips.append(np.pad(strip, ((label, 0), (0, 0), (0, 0)), constant_values=255))
    width = max(strip.shape[1] for strip in strips)
    strips = [np.pad(s, ((0, 0), (0, width - s.shape[1]), (0, 0)), constant_values=255)
              for s in strips]
    mosaic = np.concatenate(strips, axis=0)
    fig, ax = _new_axes(7.0, 7.0 * mosaic.shape[0] / mosaic.shape[1] + 0.4, None)
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_axis_off()
    for number, (layer, patches, _, _) in enumerate(rows):
        channels = ", ".join(str(int(c)) for c in patches.channels)
        ax.text(8, number * strips[0].shape[0] + label - 2, f"{layer}: channels {channels}",
                fontsize=6, va="bottom", ha="left")
    ax.set_title(title or "Top-9 projections, image patches and feature visualization "
                 "(receptive field of the optimized unit) per channel", fontsize=8)
    return fig


def projection_figure(image: Any, projection: Pixels, *, layer: str = "",
                      channel: int | None = None, box: tuple[int, int, int, int] | None = None,
                      title: str | None = None) -> Figure:
    """The input image beside its deconvnet projection (gray = zero), and with ``box`` (the
    projected unit's receptive field) drawn on both and the projection's patch enlarged.

    Args:
        image: the model's input image (H, W, 3) uint8, or anything ``load_image`` takes.
        projection: (C, H, W) or (1, C, H, W), from ``Deconvnet.project``.
        box: (top, left, bottom, right) of the unit's receptive field, ends exclusive.
    """

    rgb = _as_rgb(image)
    values = projection if projection.dim() == 4 else projection[None]
    shown = projection_tiles(values)[0]
    if shown.shape[:2] != rgb.shape[:2]:
        rgb = cv2.resize(rgb, shown.shape[1::-1], interpolation=cv2.INTER_AREA)
    panels = 3 if box is not None else 2
    fig = Figure(figsize=(2.6 * panels, 2.9), layout="constrained")
    axes = fig.subplots(1, panels)
    axes[0].imshow(rgb)
    axes[0].set_title("input", fontsize=9)
    axes[1].imshow(shown, interpolation="nearest")
    axes[1].set_title("projection", fontsize=9)
    if box is not None:
        top, left, bottom, right = box
        for ax in axes[:2]:
            ax.add_patch(Rectangle((left - 0.5, top - 0.5), right - left, bottom - top,
                                   fill=False, lw=1.2, color="orange"))
        axes[2].imshow(projection_tiles(values[..., top:bottom, left:right])[0],
                       interpolation="nearest")
        axes[2].set_title(f"receptive field {bottom - top}x{right - left}", fontsize=9)
    for ax in axes:
        ax.set_axis_off()
    if title is None:
        title = f"{layer} channel {channel}" if channel is not None else layer
    fig.suptitle(title, fontsize=10)
    return fig


def occlusion_figure(images: Pixels, maps: OcclusionMaps, *, projections: Pixels | None = None,
                     classes: Sequence[str] | None = None, mean: Normalisation = None,
                     std: Normalisation = None) -> Figure:
    """Zeiler & Fergus Fig. 7, one row per image: (a) the input, (b) the total activation of
    the chosen feature map for each occluder position, (c) that feature map's deconvnet
    projection on the clean image, (d) the probability of the target class, (e) the most
    probable class, with a legend. Panels (b) and (c) need ``maps.layer`` (and
    ``projections``).

    Args:
        images: (N, C, H, W) model input (normalised; shown with ``mean``/``std``) or uint8
            (N, H, W, 3) arrays.
        maps: ``OcclusionMaps`` of these images.
        projections: (N, C, H, W), e.g. ``Deconvnet(model).project(x, maps.layer, channel)``.
        classes: class names, indexed by label.
    """

    rgb = (np.asarray(images) if isinstance(images, np.ndarray) and images.dtype == np.uint8
           else image_tiles(images, mean, std))
    with_layer = maps.activation is not None
    panels = [_occluded_input] + ([_occlusion_activation] if with_layer else []) + \
        ([_occlusion_projection] if with_layer and projections is not None else []) + \
        [_occlusion_probability, _occlusion_label]
    fig = Figure(figsize=(2.3 * len(panels), 2.4 * len(rgb) + 0.3), layout="constrained")
    axes = fig.subplots(len(rgb), len(panels), squeeze=False)
    grid = _OcclusionGrid(maps, rgb.shape[1:3], list(classes) if classes is not None else None)
    for n in range(len(rgb)):
        for ax, draw in zip(axes[n], panels, strict=True):
            ax.set_axis_off()
            draw(ax, grid, n, rgb=rgb, projections=projections)
    return fig


class _OcclusionGrid:
    """Draws occlusion maps so that each cell sits where its occluder's centre lies, lined up
    with the input image."""

    def __init__(self, maps, image_size: tuple[int, int], names: list[str] | None):
        self.maps, self.names = maps, names
        self.height, self.width = image_size
        centres_y = maps.positions[:, 0, 0].cpu().numpy() + maps.window[0] / 2
        centres_x = maps.positions[0, :, 1].cpu().numpy() + maps.window[1] / 2
        step_y, step_x = maps.stride
        self.extent = (centres_x[0] - step_x / 2 - 0.5, centres_x[-1] + step_x / 2 - 0.5,
                       centres_y[-1] + step_y / 2 - 0.5, centres_y[0] - step_y / 2 - 0.5)

    def show(self, ax: Axes, values: np.ndarray, **kwargs):
        shown = ax.imshow(values, extent=self.extent, interpolation="nearest", **kwargs)
        ax.set_xlim(-0.5, self.width - 0.5)
        ax.set_ylim(self.height - 0.5, -0.5)
        return shown


def _occluded_input(ax: Axes, grid: _OcclusionGrid, n: int, *, rgb, **_) -> None:
    ax.imshow(rgb[n])
    box_height, box_width = grid.maps.window
    ax.add_patch(Rectangle((-0.5, -0.5), box_width, box_height, fill=True, alpha=0.6,
                           color="gray"))
    ax.set_title(f"(a) input, occluder {box_height}x{box_width}", fontsize=8)


def _occlusion_activation(ax: Axes, grid: _OcclusionGrid, n: int, **_) -> None:
    maps = grid.maps
    shown = grid.show(ax, maps.activation[n].cpu().numpy(), cmap="jet")
    ax.figure.colorbar(shown, ax=ax, shrink=0.75)
    ax.set_title(f"(b) {maps.layer} map {int(maps.channel[n])}", fontsize=8)


def _occlusion_projection(ax: Axes, grid: _OcclusionGrid, n: int, *, projections, **_
                          ) -> None:

    ax.imshow(projection_tiles(projections[n:n + 1])[0], interpolation="nearest")
    ax.set_title(f"(c) projection of map {int(grid.maps.channel[n])}", fontsize=8)


def _occlusion_probability(ax: Axes, grid: _OcclusionGrid, n: int, **_) -> None:
    shown = grid.show(ax, grid.maps.prob[n].cpu().numpy(), cmap="jet", vmin=0.0, vmax=1.0)
    ax.figure.colorbar(shown, ax=ax, shrink=0.75)
    ax.set_title(f"(d) p({_class_name(grid.names, int(grid.maps.target[n]))})", fontsize=8)


def _occlusion_label(ax: Axes, grid: _OcclusionGrid, n: int, **_) -> None:
    from matplotlib.colors import ListedColormap


    colours = np.array(LABEL_PALETTE) / 255.0
    labels = grid.maps.label[n].cpu().numpy()
    grid.show(ax, labels % len(LABEL_PALETTE), cmap=ListedColormap(colours), vmin=0,
              vmax=len(LABEL_PALETTE) - 1)
    present = [int(v) for v in np.unique(labels)]
    handles = [Rectangle((0, 0), 1, 1, color=colours[v % len(colours)]) for v in present]
    ax.legend(handles, [_class_name(grid.names, v) for v in present], fontsize=6,
              loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    ax.set_title("(e) most probable class", fontsize=8)


def _class_name(names: list[str] | None, index: int) -> str:
    return names[index] if names is not None and 0 <= index < len(names) else str(index)


def _magnified(perturbation) -> tuple[np.ndarray, float]:
    """A perturbation (C, H, W) in pixel units as a uint8 image around mid-gray, magnified so
    its largest change reaches the full range; returns the image and the factor."""
    values = perturbation.detach().cpu().float().numpy()
    largest = float(np.abs(values).max())
    factor = 0.5 / largest if largest > 0 else 1.0
    shown = np.clip((0.5 + values * factor) * 255.0, 0, 255).round().astype(np.uint8)
    shown = shown.transpose(1, 2, 0)
    return (np.repeat(shown, 3, axis=2) if shown.shape[2] == 1 else shown[..., :3]), factor


def adversarial_figure(clean_x, result, *, displacement=None, classes=None, mean=None,
                       std=None, index: int = 0) -> Figure:
    """The adversarial panel for one image of an ``AdversarialResult``: clean image (label,
    probability), the perturbation magnified (factor written on it), the adversarial image
    (label, probability) and, with ``displacement`` (from ``layer_displacement``), how far
    each layer moved."""
    names = list(classes) if classes is not None else None
    clean = image_tiles(clean_x[index:index + 1], mean, std)[0]
    adversarial = image_tiles(result.x[index:index + 1], mean, std)[0]
    shown, factor = _magnified(result.perturbation[index])
    panels = 4 if displacement is not None else 3
    fig = Figure(figsize=(2.6 * panels + (1.2 if displacement is not None else 0), 2.9),
                 layout="constrained")
    axes = fig.subplots(1, panels, width_ratios=[1, 1, 1, 1.6][:panels])
    clean_label = int(result.clean_label[index])
    axes[0].imshow(clean)
    axes[0].set_title(f"clean: {_class_name(names, clean_label)} "
                      f"({float(result.clean_prob[index]):.2f})", fontsize=8)
    axes[1].imshow(shown)
    axes[1].set_title(f"perturbation x{factor:.0f} (RMS {float(result.rms[index]) * 255:.2f}"
                      f"/255)", fontsize=8)
    axes[1].text(2, shown.shape[0] - 3, f"x{factor:.0f}", color="yellow", fontsize=9,
                 va="bottom")
    label = int(result.label[index])
    axes[2].imshow(adversarial)
    verdict = "success" if bool(result.success[index]) else "failed"
    axes[2].set_title(f"{result.method}: {_class_name(names, label)} "
                      f"({float(result.prob[index]):.2f}), {verdict}", fontsize=8)
    for ax in axes[:3]:
        ax.set_axis_off()
    if displacement is not None:
        ax = axes[3]
        layers = list(displacement)
        ax.plot(range(len(layers)), [float(displacement[name][index]) for name in layers],
                marker="o")
        ax.set_xticks(range(len(layers)), layers, rotation=60, fontsize=6)
        ax.set_ylabel("relative L2 change", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.set_title("layer displacement", fontsize=8)
    return fig


def excite_figure(clean_x, result, *, mean=None, std=None, index: int = 0) -> Figure:
    """The ``excite`` panel: clean image, the added pattern (magnified), the perturbed image,
    and the feature map's total activation before and after."""
    clean = image_tiles(clean_x[index:index + 1], mean, std)[0]
    perturbed = image_tiles(result.x[index:index + 1], mean, std)[0]
    shown, factor = _magnified(result.perturbation[index])
    fig = Figure(figsize=(7.8, 2.9), layout="constrained")
    axes = fig.subplots(1, 3)
    axes[0].imshow(clean)
    axes[0].set_title(f"clean: {float(result.before[index]):.1f}", fontsize=8)
    axes[1].imshow(shown)
    axes[1].set_title(f"added pattern x{factor:.0f} (eps {result.eps * 255:.0f}/255)",
                      fontsize=8)
    axes[2].imshow(perturbed)
    axes[2].set_title(f"perturbed: {float(result.after[index]):.1f}", fontsize=8)
    for ax in axes:
        ax.set_axis_off()
    fig.suptitle(f"{result.layer} feature map {result.channel}: total activation",
                 fontsize=9)
    return fig


def invariance_figure(results: Mapping[str, Sequence[InvarianceResult]], *,
                      classes: Sequence[str] | None = None) -> Figure:
    """Zeiler & Fergus Fig. 5: rows translation, scale, rotation; columns: low-layer
    distance, high-layer distance, P(true class); one curve per image.

    Args:
        results: {transform: [InvarianceResult, one per image]}.
    """
    names = list(classes) if classes is not None else None
    rows = [t for t in ("translate", "scale", "rotate") if t in results]
    fig = Figure(figsize=(8.4, 2.3 * len(rows) + 0.4), layout="constrained")
    axes = fig.subplots(len(rows), 3, squeeze=False)
    units = {"translate": "horizontal shift (px)", "scale": "scale factor",
             "rotate": "rotation (degrees)"}
    for row, transform in enumerate(rows):
        for result in results[transform]:
            low, high = result.layers
            label = _class_name(names, result.true_class)
            axes[row, 0].plot(result.values, result.distance[low].numpy(), marker=".",
                              label=label)
            axes[row, 1].plot(result.values, result.distance[high].numpy(), marker=".")
            axes[row, 2].plot(result.values, result.prob.numpy(), marker=".")
        first = results[transform][0]
        titles = [f"{first.layers[0]}: distance", f"{first.layers[1]}: distance",
                  "P(true class)"]
        for column in range(3):
            ax = axes[row, column]
            ax.set_xlabel(units[transform], fontsize=7)
            ax.tick_params(labelsize=6)
            ax.set_title(titles[column], fontsize=8)
        axes[row, 2].set_ylim(-0.02, 1.02)
    axes[0, 0].legend(fontsize=6, frameon=False)
    return fig


EVOLUTION_TILE = 40  # the side every layer's patches are drawn at in Fig. 4, in pixels


def evolution_mosaic(projections, side: int = EVOLUTION_TILE) -> np.ndarray:
    """One layer's block of Fig. 4: projections (E, C, 3, s, s) as a uint8 mosaic with one row
    per channel and one column per checkpoint, each tile resized to ``side``."""
    epochs, channels = projections.shape[:2]
    tiles = projection_tiles(projections.reshape(epochs * channels, *projections.shape[2:]))
    tiles = np.stack([cv2.resize(t, (side, side), interpolation=cv2.INTER_NEAREST
                                 if t.shape[0] < side else cv2.INTER_AREA) for t in tiles])
    ordered = tiles.reshape(epochs, channels, side, side, 3).transpose(1, 0, 2, 3, 4)
    return tile(ordered.reshape(-1, side, side, 3), columns=epochs, padding=2, background=255)


def settledness_figure(evolution, *, ax: Axes | None = None) -> Figure:
    """How settled each layer is at each checkpoint (see ``vizcnn.evolution``): one line per
    layer, correlation with the last checkpoint (solid) and top-9 overlap (dotted)."""
    fig, ax = _new_axes(5.0, 2.6, ax)
    positions = np.arange(len(evolution.epochs))
    for number, (name, curve) in enumerate(evolution.settledness.items()):
        colour = f"C{number % 10}"
        ax.plot(positions, curve.cpu().numpy(), marker="o", markersize=3, color=colour,
                label=name)
        ax.plot(positions, evolution.overlap[name].cpu().numpy(), linestyle=":",
                color=colour, linewidth=1)
    ax.axhline(0.9, color="0.6", linewidth=0.6)
    ax.set_xticks(positions, [str(e) for e in evolution.epochs])
    ax.set_xlabel("epoch", fontsize=7)
    ax.set_ylabel("settledness", fontsize=7)
    ax.set_ylim(min(-0.05, float(min(c.min() for c in evolution.settledness.values()))), 1.05)
    ax.tick_params(labelsize=6)
    ax.legend(fontsize=6, frameon=False, ncols=2)
    ax.set_title("correlation with the last checkpoint (solid), top-9 overlap (dotted)",
                 fontsize=7)
    return fig


def evolution_figure(evolution: FeatureEvolution, *,
                     channels: Mapping[str, Sequence[int]] | None = None) -> Figure:
    """Zeiler & Fergus Fig. 4: per drawn layer a block with one row per channel and one
    column per checkpoint (the strongest unit's projection over the data), labelled with the
    epoch; below, how settled each layer is (``settledness_figure``).

    Args:
        evolution: a ``FeatureEvolution``.
        channels: ``{layer: channels}`` to draw of those it holds (default: all).
    """
    layers = list(channels) if channels else list(evolution.layers)
    shown = {name: list(channels[name]) if channels else list(evolution.channels[name])
             for name in layers}
    for name in layers:
        missing = [c for c in shown[name] if c not in evolution.channels.get(name, ())]
        if missing:
            raise BadArgument(f"the evolution holds no channel {missing[0]} of {name!r}")
    mosaics = [evolution_mosaic(evolution.projections[name][
        :, [evolution.channels[name].index(c) for c in shown[name]]]) for name in layers]
    height = max(m.shape[0] for m in mosaics)
    width = sum(m.shape[1] for m in mosaics)
    figure_width = min(11.0, max(5.0, 0.0105 * width + 0.3 * len(layers)))
    blocks_height = figure_width * height / width + 0.5
    fig = Figure(figsize=(figure_width, blocks_height + 2.6), layout="constrained")
    grid = fig.add_gridspec(2, len(layers), height_ratios=[blocks_height, 2.4])
    side, pad = EVOLUTION_TILE, 2
    for column, (name, mosaic) in enumerate(zip(layers, mosaics, strict=True)):
        ax = fig.add_subplot(grid[0, column])
        ax.imshow(mosaic, interpolation="nearest")
        ax.set_xticks([pad + side / 2 + e * (side + pad) for e in range(len(evolution.epochs))],
                      [str(e) for e in evolution.epochs], fontsize=5)
        ax.set_yticks([pad + side / 2 + c * (side + pad) for c in range(len(shown[name]))],
                      [f"ch {c}" for c in shown[name]], fontsize=5)
        ax.tick_params(length=0, pad=1)
        for spine in ax.spines.values():
            spine.set_visible(False)
        ax.set_title(name, fontsize=7)
    settledness_figure(evolution, ax=fig.add_subplot(grid[1, :]))
    fig.suptitle("feature evolution over training: each channel's strongest projection "
                 "per epoch", fontsize=8)
    return fig


def first_layers_figure(rows: Sequence[Mapping]) -> Figure:
    """Zeiler & Fergus Fig. 6 for several networks, one row each: (a) the first-layer filters,
    (b) the second layer's features (each channel's strongest projection over the data, as
    tiles of one size), (c) the health numbers in words.

    Args:
        rows: per network ``{"name", "weight" (C, 3, k, k), "projections" (P, 3, s, s),
            "lines" (the text)}``.
    """
    fig = Figure(figsize=(10.5, 3.3 * len(rows)), layout="constrained")
    axes = fig.subplots(len(rows), 3, squeeze=False, width_ratios=[1, 1.5, 1.25])
    for ax, row in zip(axes, rows, strict=True):
        grid = filter_grid(row["weight"], mode="rgb")
        ax[0].imshow(grid, interpolation="nearest")
        shape = "x".join(map(str, row["weight"].shape[-2:]))
        ax[0].set_title(f"{row['name']}: first-layer filters ({shape})", fontsize=8)
        tiles = projection_tiles(row["projections"])
        side = max(tiles.shape[1], 24)
        tiles = np.stack([cv2.resize(t, (side, side), interpolation=cv2.INTER_NEAREST)
                          for t in tiles])
        ax[1].imshow(tile(tiles, columns=6, padding=2, background=255),
                     interpolation="nearest")
        ax[1].set_title(f"{row['name']}: second-layer features (strongest projection per "
                        "channel)", fontsize=8)
        ax[2].text(0.0, 1.0, "\n".join(row["lines"]), fontsize=7, va="top", ha="left",
                   family="monospace", transform=ax[2].transAxes)
        for a in ax:
            a.set_axis_off()
    return fig


# --------------------------------------------------------------------------- sanity checks

SANITY_ROWS = 6  # picture rows drawn per method (the curves average every row)
_METRIC_STYLE = {"spearman": ("rank corr.", "C0", "-"),
                 "spearman_abs": ("rank corr. |x|", "C1", "-"),
                 "ssim": ("SSIM", "C2", "--"), "hog": ("HOG", "C3", ":")}


def _sanity_tiles(check: SanityCheck, pictures) -> np.ndarray:
    """uint8 RGB tiles (R, h, w, 3) of one step's pictures, drawn as vizcnn draws them
    elsewhere: projections symmetric about zero, maps stretched in the viridis colours,
    feature visualizations as pixels."""
    from vizcnn.render.grid import pixel_tiles, stretch

    if check.method == "deconv":
        return projection_tiles(pictures)
    if check.method == "feature_visualization":
        return pixel_tiles(pictures)
    colours = matplotlib.colormaps["viridis"]
    gray = np.stack([stretch(p[0]) for p in pictures.float().cpu().numpy()])
    return (colours(gray)[..., :3] * 255).round().astype(np.uint8)


def _sanity_block(fig, check: SanityCheck, mean: Normalisation, std: Normalisation) -> None:
    """One method: its pictures (rows; columns: input, trained, each step that changed the
    picture, a random network) above its similarity curves and the band of chance."""
    from vizcnn.sanity import IMAGE_RECOVERY, LINE_METRIC

    shown = [s for s, changed in enumerate(check.changed) if s == 0 or changed]
    rows = min(len(check.rows), SANITY_ROWS)
    columns = [("input", None)] if check.inputs is not None else []
    columns += [("trained" if s == 0 else f"to {check.steps[s]}", check.pictures[s][:rows])
                for s in shown]
    columns.append(("random net", check.baseline[0][:rows]))
    grid = fig.add_gridspec(rows + 3, len(columns), hspace=0.08, wspace=0.05)
    for c, (title, pictures) in enumerate(columns):
        tiles = (image_tiles(check.inputs[:rows], mean, std) if pictures is None
                 else _sanity_tiles(check, pictures))
        for r in range(rows):
            ax = fig.add_subplot(grid[r, c])
            ax.imshow(tiles[r], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=5, pad=2, rotation=30 if c else 0)
            if c == 0:
                ax.set_ylabel(check.rows[r].replace(", ", "\n"), fontsize=4, rotation=0,
                              ha="right", va="center")
    ax = fig.add_subplot(grid[rows + 1:, :])
    steps = range(len(check.steps))
    kinds = list(dict.fromkeys(check.kinds))
    main = check.main_rows  # occlusion: the class score's maps
    for metric, (label, colour, style) in _METRIC_STYLE.items():
        ax.plot(steps, check.curve(metric, main).numpy(), style, color=colour, label=label,
                lw=1, marker="o", ms=2)
    for kind in kinds[1:]:
        ax.plot(steps, check.curve(LINE_METRIC, check.rows_of(kind)).numpy(), "-", color="0.6",
                lw=1, marker="s", ms=2, label=f"{kind}: {_METRIC_STYLE[LINE_METRIC][0]}")
    low, high = check.band(LINE_METRIC, main)
    ax.axhspan(low, high, color=_METRIC_STYLE[LINE_METRIC][1], alpha=0.15,
               label=f"random nets ({_METRIC_STYLE[LINE_METRIC][0]})")
    if check.method == "deconv":
        ax.axhline(IMAGE_RECOVERY, color="0.3", lw=0.6, ls=(0, (1, 2)))
    ax.set_xticks(list(steps), ["trained", *check.steps[1:]], rotation=45, ha="right",
                  fontsize=4)
    ax.tick_params(axis="y", labelsize=5)
    ax.set_ylim(-1.05, 1.05)
    ax.set_ylabel("similarity to trained", fontsize=5)
    ax.legend(fontsize=4, loc="lower left", ncol=2, frameon=False)
    what = {"deconv": "deconvnet", "occlusion": "occlusion", "feature_visualization":
            "feature visualization"}[check.method]
    final = f"{what}: {check.final(LINE_METRIC, main):.2f} once random" + (
        f" ({kinds[0]}; curves: its maps)" if kinds else "")
    fig.suptitle(f"{final}, {check.verdict()}" if check.method == "deconv" else final,
                 fontsize=6)


def sanity_figure(checks: SanityCheck | Sequence[SanityCheck], *, mean: Normalisation = None,
                  std: Normalisation = None, title: str | None = None) -> Figure:
    """Adebayo et al.'s Fig. 2 for vizcnn's pictures: per method, rows of pictures (channels
    or images; columns: the input, the trained network's picture, the picture after each
    cumulative randomization step that can change it, and a network with every weight
    random), and below them the similarity to the trained picture at every step (the mean
    over the rows, four measures) beside the band two unrelated pictures reach by chance.
    Several checks are drawn side by side.

    Args:
        checks: ``sanity.SanityCheck`` results (one or several).
        mean: the model's normalisation, to show the inputs in their own colours.
        std: the same normalisation's standard deviation.
        title: the figure's title (default: the layer and the randomization).
    """
    checks = [checks] if not isinstance(checks, Sequence) else list(checks)
    if not checks:
        raise BadArgument("no sanity check to draw")
    columns = [2 + sum(c.changed) + (c.inputs is not None) for c in checks]
    rows = max(min(len(c.rows), SANITY_ROWS) for c in checks)
    fig = Figure(figsize=(0.55 * sum(columns) + 0.8 * len(checks), 0.55 * rows + 2.4),
                 layout="constrained")
    blocks = fig.subfigures(1, len(checks), width_ratios=[c + 1.5 for c in columns])
    for sub, check in zip(np.atleast_1d(blocks), checks, strict=True):
        _sanity_block(sub, check, mean, std)
    how = "cascading" if checks[0].cascade else "independent"
    fig.suptitle(title or f"{checks[0].layer}: does the picture depend on the weights? "
                 f"({how} randomization from the top, seed {checks[0].seed})", fontsize=7)
    return fig
