"""Figures: the receptive-field figure draws the boxes ReceptiveField.box gives, in all formats."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from matplotlib.patches import Rectangle

import vizcnn
import vizcnn.data.shapes
from vizcnn.receptive import receptive_fields
from vizcnn.render.figures import receptive_field_boxes, save_figure


def test_boxes_drawn_are_the_field_boxes(tiny_chain, tmp_path):
    image = np.zeros((32, 32, 3), np.uint8)
    fields = receptive_fields(tiny_chain, ["features.0", "features.3"], 32)
    fig = receptive_field_boxes(image, fields)
    drawn = [p for p in fig.axes[0].patches if isinstance(p, Rectangle)]
    assert len(drawn) == 2
    # centre pixel 15.5: features.0 unit 16 (box 15..17), features.3 unit 3 (box 11..23)
    expected = [fields["features.0"].box(16, 16), fields["features.3"].box(3, 3)]
    for patch, (top, left, bottom, right) in zip(drawn, expected, strict=True):
        assert patch.get_xy() == (left - 0.5, top - 0.5)
        assert (patch.get_width(), patch.get_height()) == (right - left, bottom - top)
    for suffix in (".png", ".pdf", ".svg"):
        path = tmp_path / f"fields{suffix}"
        save_figure(receptive_field_boxes(image, fields), path)
        assert path.stat().st_size > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fields.pdf", "fields.png",
                                                          "fields.svg"]


def test_bad_figure_requests(tiny_chain, tmp_path):
    fields = receptive_fields(tiny_chain, ["features.0"], 32)
    with pytest.raises(vizcnn.BadArgument, match="is for"):
        receptive_field_boxes(np.zeros((40, 32, 3), np.uint8), fields)
    fig = receptive_field_boxes(np.zeros((32, 32, 3), np.uint8), fields)
    with pytest.raises(vizcnn.BadArgument, match=".png"):
        save_figure(fig, tmp_path / "fields.jpg")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("suffix", [".png", ".pdf", ".svg"])
def test_filter_and_feature_map_figures_in_every_format(tmp_path, suffix):
    import torch

    from vizcnn.render.figures import feature_maps_figure, filters_figure

    weight = torch.randn(12, 3, 7, 7)
    maps = torch.randn(1, 10, 9, 13)  # non-square maps
    image = np.zeros((64, 64, 3), np.uint8)
    for name, fig in (("filters", filters_figure(weight, layer="conv1")),
                      ("maps", feature_maps_figure(maps, layer="conv2", image=image)),
                      ("maps_shared", feature_maps_figure(maps[0], scaling="shared"))):
        path = save_figure(fig, tmp_path / f"{name}{suffix}")
        header = Path(path).read_bytes()[:8]
        assert {".png": b"\x89PNG", ".pdf": b"%PDF", ".svg": b"<?xml"}[suffix] in header
    assert fig.axes[0].get_title() == "feature maps: 10 x 9 x 13 (shared scaling)"


def test_fig2_and_projection_figures(tmp_path):
    """Fig. 2: one block per channel; the drawn projections are the patches' own pixels."""
    from vizcnn.deconv import top_patches
    from vizcnn.models import DEMO_PREPROCESSING as steps
    from vizcnn.render.figures import projection_figure, top_patches_figure
    from vizcnn.render.grid import image_tiles, projection_tiles

    model = vizcnn.load_model("demo")
    top = vizcnn.scan_topk(model, "shapes:30", ["features.3"], k=4, progress=False)
    patches = top_patches(model, top, "shapes:30", "features.3", [1, 4, 9])
    assert patches.projections.shape == (3, 4, 3, 27, 27)
    fig = top_patches_figure(patches, mean=steps.mean, std=steps.std)
    labels = [t.get_text() for t in fig.axes[0].texts]
    assert labels == ["ch 1", "ch 4", "ch 9"]
    mosaic = fig.axes[0].images[0].get_array()
    first = projection_tiles(patches.projections[0])[0]
    import cv2

    match = cv2.matchTemplate(np.ascontiguousarray(mosaic), first, cv2.TM_SQDIFF)
    assert match.min() == 0  # the tile is drawn pixel for pixel
    tiles = image_tiles(patches.images[0], steps.mean, steps.std)
    index = int(patches.indices[0, 0])
    top_, left, bottom, right = patches.boxes[0, 0].tolist()
    image = vizcnn.data.shapes.held_out_image(index)
    assert np.abs(tiles[0].astype(int) - image[top_:bottom, left:right]).max() <= 1
    for suffix in (".png", ".pdf", ".svg"):
        path = tmp_path / f"fig2{suffix}"
        save_figure(fig, path)
        assert path.stat().st_size > 1000
    x = vizcnn.preprocess(model, image)
    projection = vizcnn.Deconvnet(model).project(x, "features.3", 4)
    fig = projection_figure(image, projection[0], layer="features.3", channel=4,
                            box=(0, 0, 27, 27))
    assert len(fig.axes) == 3 and "features.3 channel 4" in fig._suptitle.get_text()
    save_figure(fig, tmp_path / "projection.png")


def test_fig7_panels_line_up_with_the_image(tmp_path):
    from vizcnn.probes.occlusion import occlusion
    from vizcnn.render.figures import occlusion_figure

    model = vizcnn.load_model("demo")
    image = vizcnn.data.shapes.held_out_image(2)
    x = vizcnn.preprocess(model, image)
    maps = occlusion(model, x, window=16, stride=8, layer="features.11", progress=False)
    projection = vizcnn.Deconvnet(model).project(x, "features.11", int(maps.channel[0]))
    fig = occlusion_figure(image[None], maps, projections=projection,
                           classes=vizcnn.model_info(model).classes)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert [t[:3] for t in titles] == ["(a)", "(b)", "(c)", "(d)", "(e)"]
    prob_axes = next(ax for ax in fig.axes if ax.get_title().startswith("(d)"))
    # the first cell is centred on the first occluder's centre (8, 8), 8 pixels wide
    assert prob_axes.images[0].get_extent() == [3.5, 59.5, 59.5, 3.5]
    for suffix in (".png", ".pdf", ".svg"):
        save_figure(fig, tmp_path / f"fig7{suffix}")
        assert (tmp_path / f"fig7{suffix}").stat().st_size > 1000
