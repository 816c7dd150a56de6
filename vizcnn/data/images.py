"""Read and convert images: whatever comes in (a file, an array, a PIL image, a tensor) leaves as
an 8-bit RGB tensor (3, H, W). Grayscale, RGBA and 16-bit images are converted, not rejected."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image

from vizcnn.errors import BadArgument, BadImage

__all__ = [
    "IMAGE_SUFFIXES",
    "load_image",
    "read_image",
    "UNLABELLED",
    "foreign_mask_value",
    "image_size",
    "read_mask",
    "to_rgb_uint8",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file with OpenCV as uint8 RGB, (H, W, 3).

    Raises:
        BadImage: the file is missing, a folder, empty, corrupt or of an unknown kind.
    """
    path = Path(path)
    if not path.exists():
        if path.is_symlink():  # to a missing file, or in a loop
            raise BadImage(f"image '{path}' is a broken link (to '{os.readlink(path)}')")
        raise BadImage(f"image '{path}' not found")
    if not path.is_file():
        raise BadImage(f"'{path}' is not an image file")
    # imdecode reads the bytes ourselves, so the error is ours to word, and any path works.
    data = np.fromfile(path, dtype=np.uint8)
    image = _decode(data) if data.size else None
    if image is None:
        raise BadImage(f"cannot read image '{path}': corrupt or not an image",
                       f"use one of {', '.join(IMAGE_SUFFIXES)}")
    if image.ndim == 3 and image.shape[2] >= 3:
        code = cv2.COLOR_BGRA2RGBA if image.shape[2] == 4 else cv2.COLOR_BGR2RGB
        image = cv2.cvtColor(image, code)
    return to_rgb_uint8(image, name=str(path))


def read_mask(path: str | os.PathLike) -> torch.Tensor:
    """Read a concept mask: a PNG whose every pixel is the index of the concept it shows,
    stored as a single-channel 8- or 16-bit image or as a palette image (the indices, as
    PASCAL VOC ships its masks; the palette's colours are only for viewing); returns (H, W)
    long.

    Raises:
        BadArgument: the file is missing, unreadable, or holds colours (RGB) rather than one
            index per pixel (not ``BadImage``: a scan skips an unreadable image, but a mask
            is the user's labelling, so a bad one stops the work).
    """
    path = Path(path)
    if not path.is_file():
        raise BadArgument(f"mask '{path}' not found",
                          "every image needs a mask of the same name")
    try:
        with Image.open(path) as image:
            mode, mask = image.mode, np.asarray(image)
    except (OSError, ValueError, Image.DecompressionBombError):
        raise BadArgument(f"cannot read mask '{path}': corrupt or not an image",
                          "write masks as single-channel PNG files") from None
    if mode not in _INDEX_MODES or mask.ndim != 2:
        raise BadArgument(f"mask '{path}' holds {mode} pixels, not one concept index per "
                          "pixel", "write a grayscale (8- or 16-bit) or palette PNG whose "
                          "values are the concepts' indices")
    return torch.from_numpy(mask.astype(np.int64))


# PIL modes that hold one integer per pixel: bilevel, 8-bit gray, palette indices, 16 and 32 bit
_INDEX_MODES = ("1", "L", "P", "I", "I;16", "I;16B", "I;16L")

# PASCAL VOC's "void" (and the usual ignore index): a mask pixel of this value, where fewer
# concepts are named, is unlabelled: it counts in no concept's area and in no unit's
UNLABELLED = 255


def foreign_mask_value(mask: torch.Tensor, concepts: int) -> int | None:
    """A value of ``mask`` that is neither a concept index (0 .. concepts - 1) nor
    ``UNLABELLED`` (where that is not a concept), or None where every value is one."""
    low, high = int(mask.min()), int(mask.max())
    if low >= 0 and high < concepts:
        return None
    values = torch.unique(mask)
    bad = values[(values < 0) | ((values >= concepts) & ((values != UNLABELLED)
                                                          | (concepts > UNLABELLED)))]
    return int(bad[0]) if len(bad) else None


def image_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """(H, W) of an image file from its header (no decoding), or None where PIL cannot tell
    (the scan then reports the file if it cannot read it either)."""
    try:
        with Image.open(path) as image:
            return image.height, image.width
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def _decode(data: np.ndarray) -> np.ndarray | None:
    """``cv2.imdecode`` with OpenCV's own log silenced: a truncated file is our error to word
    (one line), not OpenCV's "[ WARN:0 ...]" on stderr before it."""
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    try:
        return cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    finally:
        cv2.utils.logging.setLogLevel(level)


def to_rgb_uint8(array: np.ndarray, name: str = "array") -> np.ndarray:
    """Convert an RGB-ordered array to uint8 RGB (H, W, 3).

    Accepts (H, W) grayscale, (H, W, 1), (H, W, 3) and (H, W, 4) (alpha dropped); uint8,
    uint16 (scaled by 1/257), bool, and float (taken as [0, 1] when its maximum is at most 1,
    else as 0..255).
    """
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4) or min(array.shape[:2]) < 1:
        raise BadImage(f"{name} has shape {array.shape}, not an image",
                       "give (H, W), (H, W, 3) or (H, W, 4)")
    array = array[:, :, :3]
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if array.dtype == np.uint16:
        return (array.astype(np.float32) / 257.0).round().astype(np.uint8)
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer):
        values = array.astype(np.float32)
        if not np.isfinite(values).all():
            raise BadImage(f"{name} has NaN or infinite values")
        scale = 255.0 if np.issubdtype(array.dtype, np.floating) and values.max() <= 1.0 else 1.0
        return np.clip(values * scale, 0, 255).round().astype(np.uint8)
    raise BadImage(f"{name} has unsupported dtype {array.dtype}")


def load_image(image: Any) -> torch.Tensor:
    """Any supported image as a uint8 RGB tensor (3, H, W) on the CPU.

    Args:
        image: a path; an array (H, W[, C]); a PIL image; or a tensor (C, H, W) or
            (1, C, H, W) with values in [0, 1] (float) or 0..255 (uint8).
    """
    if isinstance(image, (str, os.PathLike)):
        array = read_image(image)
    elif isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
        if tensor.dim() == 4 and tensor.shape[0] == 1:
            tensor = tensor[0]
        if tensor.dim() == 3 and tensor.shape[0] in (1, 3, 4):
            tensor = tensor.permute(1, 2, 0)
        array = to_rgb_uint8(tensor.numpy(), name="tensor")
    elif hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image
        array = to_rgb_uint8(np.asarray(image.convert("RGBA" if "A" in image.mode else "RGB")),
                             name="PIL image")
    elif isinstance(image, np.ndarray):
        array = to_rgb_uint8(image)
    else:
        raise BadImage(f"cannot use a {type(image).__name__} as an image",
                       "give a path, an array, a PIL image or a tensor")
    return torch.tensor(array).permute(2, 0, 1).contiguous()  # a copy: arrays may be read-only
