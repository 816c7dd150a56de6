"""Crop and paste many boxes of one size at once: the bookkeeping of region-wise computation
(deconvnet crops, incremental occlusion). Boxes are given by their top-left corners in the full
map's coordinates and may reach past its border."""

from __future__ import annotations

import torch

__all__ = [
    "crop_batch",
    "paste_batch",
]


def crop_batch(x: torch.Tensor, rows: torch.Tensor, start: torch.Tensor, length: tuple[int, int],
               fill: float = 0.0) -> torch.Tensor:
    """Crops of ``length`` at ``start`` (P, 2) of images ``x[rows]``; outside the image:
    ``fill``.

    x: (N, C, H, W) -> (P, C, h, w). One slice copy per crop: cheaper than padding the whole
    batch or gathering with index tensors."""
    height, width = x.shape[-2:]
    crops = x.new_empty(len(rows), x.shape[1], *length)
    for p, (row, (top, left)) in enumerate(zip(rows.tolist(), start.tolist(), strict=True)):
        y0, x0 = max(top, 0), max(left, 0)
        y1, x1 = min(top + length[0], height), min(left + length[1], width)
        if (y1 - y0, x1 - x0) != length:
            crops[p].fill_(fill)
        if y1 > y0 and x1 > x0:
            crops[p, :, y0 - top:y1 - top, x0 - left:x1 - left] = x[row, :, y0:y1, x0:x1]
    return crops


def paste_batch(crops: torch.Tensor, starts: torch.Tensor, targets: torch.Tensor | tuple,
                out: torch.Tensor, *, add: bool = True) -> None:
    """Add (or, with ``add=False``, write) crops (P, C, h, w) that start at ``starts`` (P, 2)
    into ``out`` (P, C, H, W), whose items start at ``targets`` (P, 2) (or one shared start);
    all in the same coordinates. Parts outside ``out`` are left out."""
    count, _, height, width = crops.shape
    size = out.shape[-2:]
    targets = torch.as_tensor(targets, device=starts.device).expand(count, 2)
    for p, ((sy, sx), (ty, tx)) in enumerate(zip(starts.tolist(), targets.tolist(),
                                                 strict=True)):
        top, left = max(sy, ty), max(sx, tx)
        bottom, right = min(sy + height, ty + size[0]), min(sx + width, tx + size[1])
        if bottom > top and right > left:
            piece = crops[p, :, top - sy:bottom - sy, left - sx:right - sx]
            if add:
                out[p, :, top - ty:bottom - ty, left - tx:right - tx] += piece
            else:
                out[p, :, top - ty:bottom - ty, left - tx:right - tx] = piece
