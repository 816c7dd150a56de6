"""The procedural shapes data set: coloured shapes on textured backgrounds, with ground truth.

Each image is drawn with OpenCV from a random generator seeded by ``(seed, index)`` alone, so
the same seed and index give the same image on any machine, in any order, in any process.
Every item carries the shape's class and its bounding box, which makes probes checkable: an
occluder over the box must matter more than one elsewhere.

Images are 64 x 64 RGB by default (``image_size``): big enough for a ZF-style network with a
7 x 7 stride-2 first layer and three overlapping pools, small enough to train on a CPU in minutes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from vizcnn.errors import BadArgument

__all__ = [
    "BACKGROUNDS",
    "HELD_OUT_SEED",
    "SHAPE_CLASSES",
    "SHAPE_CONCEPTS",
    "TRAIN_SEED",
    "ShapeSample",
    "ShapesDataset",
    "held_out_image",
    "parse_shapes_spec",
]

SHAPE_CLASSES = ("circle", "ring", "square", "frame", "triangle", "star", "cross", "crescent")
SHAPE_CONCEPTS = (*SHAPE_CLASSES, "background")  # what a concept mask of the shapes indexes
BACKGROUNDS = ("flat", "gradient", "noise", "stripes")
TRAIN_SEED = 0  # the demo network was trained on this seed only
HELD_OUT_SEED = 1  # never used in training: accuracy reports, `shapes:INDEX` in the CLI
_SHIFT = 4  # OpenCV sub-pixel bits: coordinates are drawn at 1/16 pixel
_MIN_CONTRAST = 110.0  # RGB distance between the shape's colour and each background colour


@dataclass(frozen=True)
class ShapeSample:
    """One drawn image and its ground truth.

    Attributes:
        image: uint8 (H, W, 3) RGB.
        label: index into ``SHAPE_CLASSES``.
        box: (top, left, bottom, right), ends exclusive: the smallest box holding every pixel
            the shape touches (as ``ReceptiveField.box``).
        mask: float32 (H, W) in [0, 1], the shape's coverage of each pixel (anti-aliased).
    """

    image: np.ndarray
    label: int
    box: tuple[int, int, int, int]
    mask: np.ndarray


class ShapesDataset(Dataset):
    """An indexable, seeded data set of shape images.

    ``dataset[i]`` is ``(image, label, box)``: image uint8 (3, H, W) (or what ``transform``
    makes of it), label an int, box a long tensor (top, left, bottom, right). With
    ``masks=True`` it is ``(image, label, mask)``: mask a long (H, W) map of concept indices
    into ``SHAPE_CONCEPTS`` (the shape's class where it covers at least half a pixel, else
    "background"), as Network Dissection (``vizcnn.dissect``) reads it.
    ``dataset.render(i)`` gives the full ``ShapeSample`` as NumPy arrays.

    Args:
        length: number of images.
        seed: the data set's seed; each image depends on (seed, index) only.
        image_size: side of the square images (at least 32).
        backgrounds: which of ``BACKGROUNDS`` to draw from.
        clutter: add up to three small distractor strokes and dots behind the shape.
        transform: applied to the uint8 (3, H, W) tensor, e.g. a model's preprocessing.
        masks: items carry a concept mask instead of the box.
    """

    classes = tuple(SHAPE_CLASSES)  # the name of each label

    def __init__(self, length: int = 2000, seed: int = TRAIN_SEED, image_size: int = 64,
                 backgrounds: Sequence[str] = BACKGROUNDS, clutter: bool = True,
                 transform: Callable[[torch.Tensor], Any] | None = None, masks: bool = False):
        unknown = [b for b in backgrounds if b not in BACKGROUNDS]
        if unknown or not backgrounds:
            raise BadArgument(f"unknown backgrounds {unknown}", f"use some of {BACKGROUNDS}")
        if image_size < 32:
            raise BadArgument(f"image_size must be at least 32, not {image_size}")
        if length < 0:
            raise BadArgument(f"length must be >= 0, not {length}")
        self.length, self.seed, self.image_size = length, seed, image_size
        self.backgrounds, self.clutter, self.transform = tuple(backgrounds), clutter, transform
        self.masks = masks

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        sample = self.render(index)
        image = torch.from_numpy(sample.image).permute(2, 0, 1).contiguous()
        if self.transform is not None:
            image = self.transform(image)
        if self.masks:
            concept = torch.full(sample.mask.shape, len(SHAPE_CLASSES), dtype=torch.long)
            concept[torch.from_numpy(sample.mask >= 0.5)] = sample.label
            return image, sample.label, concept
        return image, sample.label, torch.tensor(sample.box)

    def label(self, index: int) -> int:
        """The class of image ``index``, without drawing it (the first draw of its seed)."""
        self._check_index(index)
        return int(np.random.default_rng([self.seed, int(index)]).integers(len(SHAPE_CLASSES)))

    def _check_index(self, index: int) -> None:
        if not 0 <= int(index) < self.length:
            raise IndexError(f"shapes index {index} is outside 0..{self.length - 1}")

    def render(self, index: int) -> ShapeSample:
        """Draw image ``index`` (0 <= index < len)."""
        index = int(index)
        self._check_index(index)
        rng = np.random.default_rng([self.seed, index])
        size = self.image_size
        label = int(rng.integers(len(SHAPE_CLASSES)))
        colour = _bright_colour(rng)
        kind = self.backgrounds[rng.integers(len(self.backgrounds))]
        image = np.ascontiguousarray(_background(rng, kind, size, colour), np.float32)
        if self.clutter:
            _draw_clutter(rng, image)
        radius = rng.uniform(0.18, 0.34) * size
        margin = radius + 2
        centre = (rng.uniform(margin, size - margin), rng.uniform(margin, size - margin))
        angle = rng.uniform(0, 2 * math.pi)
        mask = _shape_mask(SHAPE_CLASSES[label], size, centre, radius, angle)
        alpha = mask[:, :, None]
        image = (image * (1 - alpha) + np.asarray(colour, np.float32) * alpha)
        rows, cols = np.nonzero(mask > 0)
        box = (int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1)
        return ShapeSample(np.clip(image.round(), 0, 255).astype(np.uint8), label, box, mask)


# --------------------------------------------------------------------------- drawing


def _bright_colour(rng: np.random.Generator) -> tuple[float, float, float]:
    hsv = np.array([[[rng.integers(180), rng.integers(150, 256), rng.integers(170, 256)]]],
                   np.uint8)
    return tuple(float(c) for c in cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0])


def _distant_colour(rng: np.random.Generator, avoid: tuple[float, ...]) -> np.ndarray:
    """A background colour at least _MIN_CONTRAST away from the shape's colour."""
    for _ in range(100):
        colour = rng.integers(0, 256, 3).astype(np.float32)
        if np.linalg.norm(colour - np.asarray(avoid, np.float32)) >= _MIN_CONTRAST:
            return colour
    return 255.0 - np.asarray(avoid, np.float32)  # the complement is always far enough


def _background(rng: np.random.Generator, kind: str, size: int,
                avoid: tuple[float, ...]) -> np.ndarray:
    """float32 (size, size, 3) in 0..255."""
    first, second = _distant_colour(rng, avoid), _distant_colour(rng, avoid)
    if kind == "flat":
        return np.broadcast_to(first, (size, size, 3)).astype(np.float32)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    angle = rng.uniform(0, 2 * math.pi)
    along = np.cos(angle) * xs + np.sin(angle) * ys
    if kind == "gradient":
        t = (along - along.min()) / (along.max() - along.min())
        return first * (1 - t[:, :, None]) + second * t[:, :, None]
    if kind == "stripes":
        period = rng.uniform(0.1, 0.25)
        on = (np.floor(along / period) % 2)[:, :, None]
        return first * (1 - on) + second * on
    noise = rng.normal(0, 1, (size, size)).astype(np.float32)  # "noise": blotchy texture
    noise = cv2.GaussianBlur(noise, (0, 0), rng.uniform(0.8, 2.5))
    noise = (noise - noise.min()) / (noise.max() - noise.min() + 1e-6)
    return first * (1 - noise[:, :, None]) + second * noise[:, :, None]


def _draw_clutter(rng: np.random.Generator, image: np.ndarray) -> None:
    size = image.shape[0]
    for _ in range(rng.integers(0, 4)):
        colour = tuple(float(c) for c in rng.integers(0, 256, 3))
        start = rng.uniform(0, size, 2)
        if rng.random() < 0.5:
            end = start + rng.uniform(-0.25, 0.25, 2) * size
            cv2.line(image, _fixed(start), _fixed(end), colour, int(rng.integers(1, 3)),
                     cv2.LINE_AA, _SHIFT)
        else:
            cv2.circle(image, _fixed(start), int(rng.uniform(1, 2.5) * 16), colour, -1,
                       cv2.LINE_AA, _SHIFT)


def _fixed(point) -> tuple[int, int]:
    """(x, y) floats -> OpenCV's fixed-point integer coordinates."""
    return int(round(point[0] * (1 << _SHIFT))), int(round(point[1] * (1 << _SHIFT)))


def _polygon(centre, radius: float, angle: float, radii: Sequence[float]) -> np.ndarray:
    """Vertices at equal angular steps, vertex k at radius * radii[k]."""
    count = len(radii)
    points = [(centre[0] + radius * r * math.cos(angle + 2 * math.pi * k / count),
               centre[1] + radius * r * math.sin(angle + 2 * math.pi * k / count))
              for k, r in enumerate(radii)]
    return np.array([_fixed(p) for p in points], np.int32)


def _cross(centre, radius: float, angle: float) -> np.ndarray:
    arm = 0.36
    outline = [(arm, 1), (arm, arm), (1, arm), (1, -arm), (arm, -arm), (arm, -1), (-arm, -1),
               (-arm, -arm), (-1, -arm), (-1, arm), (-arm, arm), (-arm, 1)]
    cos, sin = math.cos(angle), math.sin(angle)
    points = [(centre[0] + radius * (x * cos - y * sin), centre[1] + radius * (x * sin + y * cos))
              for x, y in outline]
    return np.array([_fixed(p) for p in points], np.int32)


def _shape_mask(name: str, size: int, centre, radius: float, angle: float) -> np.ndarray:
    """float32 (size, size) coverage in [0, 1] of one shape, anti-aliased."""
    mask = np.zeros((size, size), np.uint8)
    line = cv2.LINE_AA
    thickness = max(2, int(round(radius * 0.32)))
    r16 = int(round(radius * (1 << _SHIFT)))
    if name == "circle":
        cv2.circle(mask, _fixed(centre), r16, 255, -1, line, _SHIFT)
    elif name == "ring":
        inner = int(round((radius - thickness / 2) * (1 << _SHIFT)))
        cv2.circle(mask, _fixed(centre), inner, 255, thickness, line, _SHIFT)
    elif name == "square":
        cv2.fillPoly(mask, [_polygon(centre, radius, angle, [1] * 4)], 255, line, _SHIFT)
    elif name == "frame":
        outline = _polygon(centre, radius - thickness / 2 * math.sqrt(2), angle, [1] * 4)
        cv2.polylines(mask, [outline], True, 255, thickness, line, _SHIFT)
    elif name == "triangle":
        cv2.fillPoly(mask, [_polygon(centre, radius, angle, [1] * 3)], 255, line, _SHIFT)
    elif name == "star":
        cv2.fillPoly(mask, [_polygon(centre, radius, angle, [1, 0.42] * 5)], 255, line, _SHIFT)
    elif name == "cross":
        cv2.fillPoly(mask, [_cross(centre, radius * 0.85, angle)], 255, line, _SHIFT)
    elif name == "crescent":
        cv2.circle(mask, _fixed(centre), r16, 255, -1, line, _SHIFT)
        bite = (centre[0] + 0.5 * radius * math.cos(angle),
                centre[1] + 0.5 * radius * math.sin(angle))
        cv2.circle(mask, _fixed(bite), int(r16 * 0.85), 0, -1, line, _SHIFT)
    else:  # pragma: no cover - SHAPE_CLASSES and this function change together
        raise BadArgument(f"unknown shape {name!r}")
    return mask.astype(np.float32) / 255.0


def held_out_image(index: int) -> np.ndarray:
    """Image ``index`` of the held-out seed, uint8 (64, 64, 3): what ``shapes:INDEX`` means."""
    return ShapesDataset(index + 1, seed=HELD_OUT_SEED).render(index).image


def parse_shapes_spec(spec: str) -> int | None:
    """``"shapes:INDEX"`` -> INDEX (checked), other strings -> None."""
    if not spec.startswith("shapes:"):
        return None
    text = spec.removeprefix("shapes:")
    try:
        index = int(text)
    except ValueError:
        raise BadArgument(f"bad shapes image {spec!r}", "write shapes:INDEX, e.g. shapes:3"
                          ) from None
    if index < 0:
        raise BadArgument(f"shapes index must be >= 0, got {index}", "e.g. shapes:3")
    return index
