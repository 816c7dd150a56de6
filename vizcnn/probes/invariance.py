"""Invariance probes (Zeiler & Fergus, Fig. 5): translate, scale or rotate an image and watch
how far the feature vectors of a low and a high layer move, and the true class's probability.

Transforms are OpenCV affine warps of the uint8 image (bilinear), about the image centre, with
``cv2.BORDER_REPLICATE`` at the border: the uncovered margin repeats the edge pixels instead of
showing a black frame the network would react to. The identity value (shift 0, scale 1,
angle 0) uses the image itself, so its distance is exactly 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn

from vizcnn.display import ShowsItself
from vizcnn.errors import BadArgument
from vizcnn.hooks import capture, model_device, preserved_state, run_forward
from vizcnn.layers import list_layers, resolve_layer
from vizcnn.models import Preprocessing, normalisation_of, preprocess
from vizcnn.probes import OutputSelector, class_labels, class_scores

__all__ = [
    "DEFAULT_VALUES",
    "TRANSFORMS",
    "InvarianceResult",
    "default_layers",
    "invariance",
    "transform_image",
]

TRANSFORMS = ("translate", "scale", "rotate")
DEFAULT_VALUES = {
    "translate": tuple(range(-12, 13, 2)),  # pixels, horizontal
    "scale": (0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4),
    "rotate": tuple(range(0, 361, 30)),  # degrees, counter-clockwise
}
_IDENTITY = {"translate": 0, "scale": 1.0, "rotate": 0}


@dataclass(frozen=True)
class InvarianceResult(ShowsItself):
    """One image under one transform (one curve of each column of Fig. 5).

    Attributes:
        transform: "translate" (pixels, horizontal), "scale" (factor) or "rotate" (degrees).
        values: the transform's parameter per point.
        layers: (low, high) layer names.
        distance: {layer: (V,)} |f(T x) - f(x)| / |f(x)| of the layer's flattened output.
        prob: (V,) probability of ``true_class``.
        label: (V,) the most probable class.
        true_class: the class whose probability is tracked.
    """

    transform: str
    values: tuple[float, ...]
    layers: tuple[str, str]
    distance: dict[str, torch.Tensor]
    prob: torch.Tensor
    label: torch.Tensor
    true_class: int


def _check_transform(transform: str) -> None:
    if transform not in TRANSFORMS:
        raise BadArgument(f"unknown transform {transform!r}", f"use one of {', '.join(TRANSFORMS)}")


def default_layers(model: nn.Module) -> tuple[str, str]:
    """Fig. 5's layer 1 and layer 7 for any model: the first conv layer and the penultimate
    linear layer (or the last one, if there is only one)."""
    convs, linears = list_layers(model, "conv"), list_layers(model, "linear")
    if not convs or not linears:
        raise BadArgument("cannot choose default layers: the model needs a conv and a linear "
                          "layer", "give the layers (CLI: --layers LOW HIGH)")
    return convs[0], linears[-2] if len(linears) > 1 else linears[-1]


def transform_image(image: np.ndarray, transform: str, value: float) -> np.ndarray:
    """The uint8 (H, W, 3) image translated right by ``value`` pixels, scaled by ``value`` or
    rotated by ``value`` degrees about its centre (OpenCV, bilinear, edges replicated)."""
    _check_transform(transform)
    if value == _IDENTITY[transform]:
        return image.copy()
    height, width = image.shape[:2]
    centre = ((width - 1) / 2, (height - 1) / 2)
    if transform == "translate":
        matrix = np.float32([[1, 0, value], [0, 1, 0]])
    elif transform == "scale":
        if value <= 0:
            raise BadArgument(f"a scale factor must be > 0, got {value}")
        matrix = cv2.getRotationMatrix2D(centre, 0.0, float(value))
    else:
        matrix = cv2.getRotationMatrix2D(centre, float(value), 1.0)
    return cv2.warpAffine(image, matrix, (width, height), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REPLICATE)


def invariance(model: nn.Module, image: Any, transform: str = "translate",
               values: Sequence[float] | None = None, *, layers: tuple[str, str],
               true_class: int | None = None, preprocessing: Preprocessing | None = None,
               output: OutputSelector = None) -> InvarianceResult:
    """Fig. 5 for one image and one transform.

    Args:
        model: a classifier; left as it was.
        image: a uint8 (H, W, 3) RGB image (or anything ``load_image`` takes).
        transform: "translate", "scale" or "rotate".
        values: parameters (default ``DEFAULT_VALUES[transform]``).
        layers: (low, high) layers whose feature vectors are compared, e.g. layer 1 and 7.
        true_class: default: the model's prediction for the untransformed image.
        preprocessing: how the image becomes model input (default: the model's record; the
            normalisation must be known: a guessed one would change what is compared).
        output: selects the class scores from a model that returns a tuple or dict.
    """
    from vizcnn.data.images import load_image

    _check_transform(transform)
    values = tuple(DEFAULT_VALUES[transform] if values is None else values)
    if not values:
        raise BadArgument("no transform values given")
    if len(layers) != 2:
        raise BadArgument(f"layers must be (low, high), got {layers!r}")
    for layer in layers:
        resolve_layer(model, layer)
    known = normalisation_of(model, preprocessing, "invariance")
    rgb = np.ascontiguousarray(load_image(image).permute(1, 2, 0).numpy())
    batch = torch.cat([preprocess(model, rgb, preprocessing=known)] + [
        preprocess(model, transform_image(rgb, transform, v), preprocessing=known)
        for v in values])
    with preserved_state(model, eval_mode=True), capture(model, list(layers)) as outputs, \
            torch.no_grad():
        logits = class_scores(run_forward(model, batch.to(model_device(model))), output)
    probabilities = torch.softmax(logits, dim=1)
    true_class = int(probabilities[0].argmax() if true_class is None
                     else class_labels(true_class, probabilities[:1], "true")[0])
    distance = {}
    for layer in layers:
        features = outputs[layer].flatten(1).double()
        distance[layer] = ((features[1:] - features[0]).norm(dim=1)
                           / features[0].norm().clamp_min(1e-12))
    return InvarianceResult(transform, values, tuple(layers), distance,
                            probabilities[1:, true_class], probabilities[1:].argmax(1),
                            true_class)
