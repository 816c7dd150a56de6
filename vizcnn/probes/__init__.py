"""Probes: occlusion, adversarial perturbations and invariance (Zeiler & Fergus section 4,
Szegedy et al. 2013)."""

from __future__ import annotations

import torch

from vizcnn.errors import BadArgument


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
