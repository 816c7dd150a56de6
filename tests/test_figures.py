"""Figures: the receptive-field figure draws the boxes ReceptiveField.box gives, in all formats."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from matplotlib.patches import Rectangle

import vizcnn
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
