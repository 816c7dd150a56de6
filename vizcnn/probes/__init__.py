"""Probes: occlusion, adversarial perturbations and invariance (Zeiler & Fergus section 4,
Szegedy et al. 2013)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from vizcnn.errors import BadArgument

__all__ = [
    "OutputSelector",
    "class_labels",
    "class_scores",
    "describe_output",
    "parse_selector",
]


def class_labels(value, logits: torch.Tensor, what: str = "target") -> torch.Tensor:
    """(N,) class indices from one index for every image or one per image, checked against
    the classifier's output ``logits`` (N, K)."""
    classes = logits.shape[1]
    labels = torch.as_tensor(value, dtype=torch.long, device=logits.device).flatten()
    labels = labels.expand(len(logits)) if labels.numel() == 1 else labels
    if len(labels) != len(logits):
        raise BadArgument(f"{len(labels)} {what} classes for {len(logits)} images",
                          "give one class for all images or one per image")
    bad = labels[(labels < 0) | (labels >= classes)]
    if len(bad):
        raise BadArgument(f"{what} class {int(bad[0])} out of range: the model has {classes} "
                          f"classes (0-{classes - 1})")
    return labels


OutputSelector = int | str | Callable[[Any], torch.Tensor] | None


def describe_output(output: Any) -> str:
    """A short account of a model's output structure, e.g. "a tuple of 2: [0] Tensor (1, 8),
    [1] Tensor (1, 4)", for error messages."""

    def one(value: Any) -> str:
        if isinstance(value, torch.Tensor):
            return f"Tensor {tuple(value.shape)}"
        return type(value).__name__

    if isinstance(output, (tuple, list)):
        items = ", ".join(f"[{i}] {one(v)}" for i, v in enumerate(output[:6]))
        return f"a {type(output).__name__} of {len(output)}: {items}"
    if isinstance(output, Mapping):
        items = ", ".join(f"{k!r} {one(v)}" for k, v in list(output.items())[:6])
        return f"a dict with {items}"
    return f"a {one(output)}"


def class_scores(output: Any, selector: OutputSelector = None) -> torch.Tensor:
    """The (N, classes) class scores in a model's output.

    Args:
        output: what the model returned: a tensor, a tuple or list, a dict, ...
        selector: None (the output itself must be an (N, classes) tensor), an index into a
            tuple or list, a key of a dict, or a callable from the output to the scores.

    Raises:
        BadArgument: the selection fails or is not (N, classes); the message names the
            output's structure and how to select from it.
    """
    how = ("select the class scores with output=INDEX, KEY or a callable (CLI: --output "
           "INDEX|KEY)")
    if selector is not None:
        try:
            output = selector(output) if callable(selector) else output[selector]
        except (IndexError, KeyError, TypeError) as error:
            raise BadArgument(f"cannot select {selector!r} from the model's output "
                              f"({describe_output(output)}): {error}", how) from None
    if not isinstance(output, torch.Tensor) or output.dim() != 2:
        what = "the selected output is" if selector is not None else "the model returns"
        raise BadArgument(f"this probe needs (N, classes) class scores, but {what} "
                          f"{describe_output(output)}", how)
    return output


def parse_selector(text: str | None) -> int | str | None:
    """``--output``: an integer index, or a dict key."""
    if text is None:
        return None
    return int(text) if text.lstrip("-").isdigit() else text
