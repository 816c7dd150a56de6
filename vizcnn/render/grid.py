"""Tile filters and feature maps into one uint8 image (pure: arrays in, an array out).

Layout: tiles row by row, ``columns`` per row (default: the smallest count that makes the grid
about square), ``padding`` pixels of ``background`` between and around tiles.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import torch

from vizcnn.errors import BadArgument, BadOutput

__all__ = [
    "LABEL_PALETTE",
    "feature_map_grid",
    "filter_grid",
    "image_tiles",
    "occlusion_map_png",
    "pixel_tiles",
    "projection_tiles",
    "stretch",
    "tile",
    "write_image",
]

Scaling = Literal["tile", "shared"]


def _numpy(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().to("cpu", torch.float32).numpy()
    return np.asarray(values, dtype=np.float32)


def stretch(values: np.ndarray, low: float | None = None, high: float | None = None) -> np.ndarray:
    """Map [low, high] (default: the values' own range) linearly onto 0..255 as uint8; a
    constant input gives zeros."""
    low = float(values.min()) if low is None else low
    high = float(values.max()) if high is None else high
    if not high > low:
        return np.zeros(values.shape, np.uint8)
    scaled = (values - low) * (255.0 / (high - low))
    return np.clip(scaled.round(), 0, 255).astype(np.uint8)


def tile(tiles: np.ndarray, columns: int | None = None, padding: int = 1,
         background: int = 255) -> np.ndarray:
    """Arrange uint8 tiles (N, h, w, 3) into one (H, W, 3) image.

    H = rows * h + (rows + 1) * padding with rows = ceil(N / columns), likewise W.
    """
    count, height, width = tiles.shape[:3]
    if count == 0:
        raise BadArgument("nothing to draw: zero tiles")
    if padding < 0:
        raise BadArgument(f"padding must be >= 0, not {padding}")
    columns = columns or math.ceil(math.sqrt(count))
    if columns < 1:
        raise BadArgument(f"columns must be >= 1, not {columns}")
    columns = min(columns, count)
    rows = math.ceil(count / columns)
    canvas = np.full((rows * height + (rows + 1) * padding,
                      columns * width + (columns + 1) * padding, 3), background, np.uint8)
    for index in range(count):
        row, column = divmod(index, columns)
        top = padding + row * (height + padding)
        left = padding + column * (width + padding)
        canvas[top:top + height, left:left + width] = tiles[index]
    return canvas


def filter_grid(
    weight: torch.Tensor | np.ndarray,
    *,
    mode: Literal["auto", "rgb", "mean", "channels"] = "auto",
    columns: int | None = None,
    padding: int = 1,
) -> np.ndarray:
    """A conv layer's filters as one uint8 RGB image, each tile contrast-stretched on its own.

    Args:
        weight: (out_channels, in_channels, kh, kw), tensor or array.
        mode: "rgb" shows each filter of a 3-input-channel layer in colour (the first layer);
            "mean" shows each filter's mean over its input channels in gray; "channels" shows
            every (filter, input channel) slice in gray, one row per filter (``columns`` is then
            the number of input channels). "auto" is "rgb" for 3 inputs, else "mean".
        columns: layout, see ``tile``.
        padding: layout, see ``tile``.

    Returns:
        uint8 (H, W, 3).
    """
    weight = _numpy(weight)
    if weight.ndim != 4:
        raise BadArgument(f"filter weights must be (out, in, kh, kw), got shape {weight.shape}",
                          "pick a Conv2d layer")
    out_channels, in_channels = weight.shape[:2]
    if mode == "auto":
        mode = "rgb" if in_channels == 3 else "mean"
    if mode == "rgb":
        if in_channels != 3:
            raise BadArgument(f"mode 'rgb' needs 3 input channels, this layer has {in_channels}",
                              "use mode 'mean' or 'channels'")
        tiles = np.stack([stretch(f.transpose(1, 2, 0)) for f in weight])
    elif mode == "mean":
        tiles = np.stack([_gray(stretch(f.mean(axis=0))) for f in weight])
    elif mode == "channels":
        tiles = np.stack([_gray(stretch(s)) for f in weight for s in f])
        columns = in_channels
    else:
        raise BadArgument(f"unknown filter mode {mode!r}", "use auto, rgb, mean or channels")
    return tile(tiles, columns, padding)


def feature_map_grid(
    activations: torch.Tensor | np.ndarray,
    *,
    scaling: Scaling = "tile",
    columns: int | None = None,
    padding: int = 1,
    colormap: int | None = None,
) -> np.ndarray:
    """One tile per channel of a layer's output, as a uint8 RGB image.

    Args:
        activations: (C, H, W) or (1, C, H, W), tensor or array.
        scaling: "tile" stretches each channel to its own range (shows the pattern of weak
            channels); "shared" uses one range for all (shows which channels are strong).
        columns: layout, see ``tile``.
        padding: layout, see ``tile``.
        colormap: an OpenCV colour map (e.g. ``cv2.COLORMAP_VIRIDIS``); None for gray.

    Returns:
        uint8 (H', W', 3).
    """
    maps = _numpy(activations)
    if maps.ndim == 4 and maps.shape[0] == 1:
        maps = maps[0]
    if maps.ndim != 3:
        raise BadArgument(f"feature maps must be (C, H, W) or (1, C, H, W), got {maps.shape}",
                          "capture a conv or pool layer of one image")
    if scaling not in ("tile", "shared"):
        raise BadArgument(f"unknown scaling {scaling!r}", "use 'tile' or 'shared'")
    low, high = (float(maps.min()), float(maps.max())) if scaling == "shared" else (None, None)
    tiles = []
    for channel in maps:
        gray = stretch(channel, low, high)
        if colormap is None:
            tiles.append(_gray(gray))
        else:
            tiles.append(cv2.cvtColor(cv2.applyColorMap(gray, colormap), cv2.COLOR_BGR2RGB))
    return tile(np.stack(tiles), columns, padding)


def _gray(values: np.ndarray) -> np.ndarray:
    return np.repeat(values[:, :, None], 3, axis=2)


def projection_tiles(projections) -> np.ndarray:
    """Deconvnet projections (N, C, h, w) as uint8 RGB tiles (N, h, w, 3): each tile scaled on
    its own, symmetric about zero, so zero is mid-gray and the sign of the signal shows
    (the paper's look). The scale is the 99.5th percentile of |value| (a few extreme pixels
    would leave the rest gray), clipped beyond. One-channel projections are gray."""
    values = _numpy(projections)
    if values.ndim != 4:
        raise BadArgument(f"expected projections (N, C, h, w), got shape {values.shape}")
    if len(values) == 0:
        return np.zeros((0, *values.shape[2:], 3), np.uint8)
    scale = np.percentile(np.abs(values).reshape(len(values), -1), 99.5, axis=1)
    scale[scale == 0] = 1.0
    scaled = 127.5 + 127.5 * values / scale[:, None, None, None]
    tiles = np.clip(scaled.round(), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    return np.repeat(tiles, 3, axis=3) if tiles.shape[3] == 1 else tiles[..., :3]


def image_tiles(images, mean=None, std=None) -> np.ndarray:
    """Normalised model inputs (N, C, h, w) back to uint8 RGB tiles (N, h, w, 3): undo
    ``mean`` / ``std`` when given, else stretch each tile to its own range."""
    values = _numpy(images)
    if values.ndim != 4:
        raise BadArgument(f"expected images (N, C, h, w), got shape {values.shape}")
    if mean is not None and std is not None:
        mean = np.asarray(mean, np.float32)[None, :, None, None]
        std = np.asarray(std, np.float32)[None, :, None, None]
        tiles = np.clip(((values * std + mean) * 255.0).round(), 0, 255).astype(np.uint8)
    else:
        tiles = np.stack([stretch(v) for v in values]) if len(values) else values.astype(np.uint8)
    tiles = tiles.transpose(0, 2, 3, 1)
    return np.repeat(tiles, 3, axis=3) if tiles.shape[3] == 1 else tiles[..., :3]


def pixel_tiles(pixels) -> np.ndarray:
    """Pixels in [0, 1] (N, C, h, w) as uint8 RGB tiles (N, h, w, 3); one channel is gray."""
    return image_tiles(pixels, mean=[0.0] * pixels.shape[1], std=[1.0] * pixels.shape[1])


def occlusion_map_png(values, path, *, low: float | None = None, high: float | None = None,
                      categorical: bool = False, min_side: int = 256) -> None:
    """Write one occlusion map (gy, gx) as a colour PNG, enlarged (nearest) to at least
    ``min_side`` pixels: jet for values (``low``/``high`` fix the range), a fixed palette
    of distinct colours for class labels (``categorical``)."""
    array = _numpy(values)
    if categorical:
        palette = (np.array(LABEL_PALETTE, np.uint8))
        rgb = palette[array.astype(np.int64) % len(palette)]
    else:
        rgb = cv2.applyColorMap(stretch(array, low, high), cv2.COLORMAP_JET)[..., ::-1]
    scale = max(1, math.ceil(min_side / max(array.shape)))
    rgb = cv2.resize(np.ascontiguousarray(rgb), (array.shape[1] * scale, array.shape[0] * scale),
                     interpolation=cv2.INTER_NEAREST)
    write_image(path, rgb)


def write_image(path, rgb: np.ndarray, quality: int = 90) -> None:
    """An RGB uint8 array (H, W, 3) as an image file, PNG or JPEG (``quality``) by the
    suffix. Encoded in memory, then written: a full disk is an ``OSError`` with its errno
    (``cv2.imwrite`` only returns False, and libpng prints on stderr)."""
    suffix = os.path.splitext(str(path))[1].lower()
    options = [cv2.IMWRITE_JPEG_QUALITY, quality] if suffix in (".jpg", ".jpeg") else []
    ok, encoded = cv2.imencode(suffix, cv2.cvtColor(np.ascontiguousarray(rgb),
                                                    cv2.COLOR_RGB2BGR), options)
    if not ok:
        raise BadOutput(f"cannot encode '{path}' as {suffix or 'an image'}")
    Path(path).write_bytes(encoded.tobytes())


# Distinct colours for class labels (matplotlib's tab20, as uint8 RGB).
LABEL_PALETTE = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
    (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213),
    (196, 156, 148), (247, 182, 210), (199, 199, 199), (219, 219, 141), (158, 218, 229),
]
