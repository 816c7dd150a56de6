"""Filter and feature-map grids: shapes, value ranges and tile contents, for any sizes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vizcnn.errors import BadArgument
from vizcnn.render.grid import feature_map_grid, filter_grid


def grid_size(count: int, height: int, width: int, columns: int, padding: int = 1):
    columns = min(columns, count)
    rows = math.ceil(count / columns)
    return rows * height + (rows + 1) * padding, columns * width + (columns + 1) * padding


def tile_at(grid: np.ndarray, index: int, height: int, width: int, columns: int, padding=1):
    row, column = divmod(index, columns)
    top, left = padding + row * (height + padding), padding + column * (width + padding)
    return grid[top:top + height, left:left + width]


def naive_stretch(values: np.ndarray) -> np.ndarray:
    """The linear map of [min, max] onto 0..255, in float64 (int16 result for comparisons)."""
    values = values.astype(np.float64)
    low, high = values.min(), values.max()
    if high <= low:
        return np.zeros(values.shape, np.int16)
    return np.round((values - low) / (high - low) * 255).astype(np.int16)


def assert_stretched(tile: np.ndarray, expected: np.ndarray, own_range: bool = True) -> None:
    """Equal up to rounding an x.5 the other way in float32; the ends are exact."""
    assert tile.dtype == np.uint8
    assert np.abs(tile.astype(np.int16) - expected).max() <= 1
    if own_range and expected.max() > 0:  # stretched on its own: spans the whole range
        assert tile.min() == 0 and tile.max() == 255


@settings(max_examples=40, deadline=None)
@given(out_channels=st.integers(1, 40), in_channels=st.sampled_from([1, 2, 3, 5]),
       kh=st.integers(1, 9), kw=st.integers(1, 9), seed=st.integers(0, 1000))
def test_filter_grid(out_channels, in_channels, kh, kw, seed):
    weight = torch.randn(out_channels, in_channels, kh, kw,
                         generator=torch.Generator().manual_seed(seed))
    grid = filter_grid(weight)
    columns = math.ceil(math.sqrt(out_channels))
    assert grid.dtype == np.uint8 and grid.shape == (*grid_size(out_channels, kh, kw, columns), 3)
    for index in range(out_channels):
        tile = tile_at(grid, index, kh, kw, columns)
        filt = weight[index].numpy()
        expected = (naive_stretch(filt.transpose(1, 2, 0)) if in_channels == 3
                    else np.repeat(naive_stretch(filt.mean(0))[:, :, None], 3, axis=2))
        assert_stretched(tile, expected)  # each tile stretched on its own
    channels = filter_grid(weight, mode="channels")
    assert channels.shape == (*grid_size(out_channels * in_channels, kh, kw, in_channels), 3)


@settings(max_examples=40, deadline=None)
@given(channels=st.integers(1, 70), height=st.integers(1, 20), width=st.integers(1, 20),
       seed=st.integers(0, 1000))
def test_feature_map_grid_tile_and_shared_scaling(channels, height, width, seed):
    maps = torch.randn(1, channels, height, width, generator=torch.Generator().manual_seed(seed))
    columns = math.ceil(math.sqrt(channels))
    per_tile = feature_map_grid(maps)
    shared = feature_map_grid(maps, scaling="shared")
    assert per_tile.shape == shared.shape == (*grid_size(channels, height, width, columns), 3)
    values = maps[0].numpy()
    for index in range(channels):
        assert_stretched(tile_at(per_tile, index, height, width, columns)[:, :, 0],
                         naive_stretch(values[index]))
    expected_shared = naive_stretch(values)  # one range over every channel
    for index in range(channels):
        assert_stretched(tile_at(shared, index, height, width, columns)[:, :, 0],
                         expected_shared[index], own_range=False)
    coloured = feature_map_grid(maps[0], colormap=2)  # cv2.COLORMAP_JET
    assert coloured.shape == per_tile.shape and coloured.dtype == np.uint8


def test_constant_maps_are_black_and_bad_shapes_are_refused():
    grid = feature_map_grid(torch.zeros(4, 3, 5), padding=0)
    assert grid.max() == 0
    with pytest.raises(BadArgument, match="out, in, kh, kw"):
        filter_grid(torch.zeros(4, 3, 5))
    with pytest.raises(BadArgument, match="3 input channels"):
        filter_grid(torch.zeros(4, 2, 3, 3), mode="rgb")
    with pytest.raises(BadArgument):
        feature_map_grid(torch.zeros(2, 4, 3, 5))
    with pytest.raises(BadArgument):
        feature_map_grid(torch.zeros(4, 3, 5), scaling="loud")
