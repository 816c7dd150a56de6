"""How alike two pictures are: the four measures of Adebayo et al.'s sanity checks.

Spearman's rank correlation (of the values, and of their absolute values) is computed here in
PyTorch, ties ranked by their average as scipy's ``spearmanr`` does. SSIM and the HOG
similarity are scikit-image's, on NumPy arrays: this module is the one place outside
``render/`` that converts to NumPy, because scikit-image computes them there.

SSIM and HOG compare the pictures as they are shown: each contrast-stretched on its own to
[0, 1] (``render.grid`` does the same). A constant picture has no rank order and no contrast:
its measures are NaN, never a made-up number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

METRICS = ("spearman", "spearman_abs", "ssim", "hog")


@dataclass(frozen=True)
class Similarities:
    """The four measures for a set of picture pairs, each a float64 tensor of the same shape.

    Attributes:
        spearman: Spearman's rank correlation of the two pictures' values.
        spearman_abs: the same of their absolute values (Adebayo et al. report both; Quantus's
            randomisation test defaults to it).
        ssim: structural similarity (scikit-image) of the two pictures as shown.
        hog: Pearson's correlation of their histograms of oriented gradients (scikit-image's
            ``hog`` of the shown pictures in gray).
    """

    spearman: torch.Tensor
    spearman_abs: torch.Tensor
    ssim: torch.Tensor
    hog: torch.Tensor

    def metric(self, name: str) -> torch.Tensor:
        """One measure by its name (one of ``METRICS``)."""
        return getattr(self, name)

    def mean(self, name: str, dim: int = -1) -> torch.Tensor:
        """The mean of one measure over ``dim``, NaN (constant pictures) left out."""
        return self.metric(name).nanmean(dim)


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """values: (R, D) -> (R, D) float64 ranks 1..D per row, tied values given their mean rank."""
    rows, count = values.shape
    ordered, order = values.sort(dim=1, stable=True)
    starts = torch.ones(ordered.shape, dtype=torch.bool, device=values.device)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]  # each row starts a group of its own
    group = starts.flatten().cumsum(0) - 1
    position = torch.arange(1, count + 1, dtype=torch.float64, device=values.device).repeat(rows)
    groups = int(group[-1]) + 1 if len(group) else 0
    total = position.new_zeros(groups).index_add_(0, group, position)
    size = position.new_zeros(groups).index_add_(0, group, torch.ones_like(position))
    mean_rank = (total / size)[group].view(rows, count)
    return torch.empty_like(mean_rank).scatter_(1, order, mean_rank)


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a, b: (R, ...) -> (R,) float64 rank correlation of each pair of rows (NaN where one row
    is constant)."""
    ra, rb = (average_ranks(t.reshape(len(t), -1)) for t in (a, b))
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    scale = (ra.square().sum(1) * rb.square().sum(1)).sqrt()
    return torch.where(scale > 0, (ra * rb).sum(1) / scale, torch.nan)


def shown(picture: np.ndarray) -> np.ndarray | None:
    """picture: (C, H, W) -> (H, W, C) float64 stretched to [0, 1]; None if constant."""
    low, high = float(picture.min()), float(picture.max())
    if not high > low:
        return None
    return np.moveaxis((picture.astype(np.float64) - low) / (high - low), 0, -1)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two shown pictures (H, W, C) in [0, 1]; the window shrinks to fit small maps
    (odd, at least 3; NaN below 3 pixels)."""
    from skimage.metrics import structural_similarity

    side = min(a.shape[0], a.shape[1])
    window = min(7, side if side % 2 else side - 1)
    if window < 3:
        return math.nan
    return float(structural_similarity(a, b, data_range=1.0, channel_axis=-1,
                                       win_size=window))


def hog_features(picture: np.ndarray) -> np.ndarray:
    """scikit-image's HOG of a shown picture (H, W, C) in gray: 9 orientations, cells of an
    eighth of the shorter side (at least 2 pixels), blocks of 2 x 2 cells."""
    from skimage.feature import hog

    cell = max(2, min(picture.shape[:2]) // 8)
    cells = min(2, min(picture.shape[:2]) // cell)
    return hog(picture.mean(-1), orientations=9, pixels_per_cell=(cell, cell),
               cells_per_block=(cells, cells), feature_vector=True)


def hog_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson's correlation of the HOG features of two shown pictures (NaN if one is flat)."""
    fa, fb = hog_features(a), hog_features(b)
    if fa.std() == 0 or fb.std() == 0:
        return math.nan
    return float(np.corrcoef(fa, fb)[0, 1])


def similarities(reference: torch.Tensor, other: torch.Tensor) -> Similarities:
    """reference, other: (R, C, H, W) pictures, row by row -> ``Similarities`` of shape (R,)."""
    rank = spearman(reference, other).cpu()
    rank_abs = spearman(reference.abs(), other.abs()).cpu()
    structural, gradients = [], []
    for a, b in zip(reference.detach().float().cpu().numpy(),
                    other.detach().float().cpu().numpy(), strict=True):
        sa, sb = shown(a), shown(b)
        structural.append(math.nan if sa is None or sb is None else ssim(sa, sb))
        gradients.append(math.nan if sa is None or sb is None else hog_similarity(sa, sb))
    return Similarities(rank, rank_abs, torch.tensor(structural, dtype=torch.float64),
                        torch.tensor(gradients, dtype=torch.float64))


def stacked(parts: list[Similarities]) -> Similarities:
    """Several ``Similarities`` of shape (R,) -> one of shape (len(parts), R)."""
    return Similarities(*(torch.stack([p.metric(name) for p in parts]) for name in METRICS))
