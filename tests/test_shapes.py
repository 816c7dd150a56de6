"""The procedural shapes data set: determinism, classes, and boxes that hold the shape."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from vizcnn.data.shapes import (
    BACKGROUNDS,
    SHAPE_CLASSES,
    ShapesDataset,
    held_out_image,
    parse_shapes_spec,
)
from vizcnn.errors import BadArgument


def test_same_seed_and_index_give_the_same_image_in_any_order():
    first = ShapesDataset(50, seed=5)
    forward = [first.render(i).image for i in range(50)]
    np.random.seed(123)  # global random state must not matter
    torch.manual_seed(123)
    second = ShapesDataset(50, seed=5)
    for i in reversed(range(50)):
        assert np.array_equal(second.render(i).image, forward[i])
    other_seed = ShapesDataset(50, seed=6)
    assert not np.array_equal(other_seed.render(0).image, forward[0])


def test_same_image_in_another_process():
    code = ("from vizcnn.data.shapes import ShapesDataset; import hashlib; "
            "print(hashlib.sha256(ShapesDataset(20, seed=9).render(17).image.tobytes())"
            ".hexdigest())")
    digest = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True).stdout.strip()
    import hashlib

    assert digest == hashlib.sha256(ShapesDataset(20, seed=9).render(17).image.tobytes()
                                    ).hexdigest()


def test_every_class_and_background_appears():
    assert len(SHAPE_CLASSES) >= 8 and len(BACKGROUNDS) >= 4
    dataset = ShapesDataset(300, seed=0)
    labels = {dataset.render(i).label for i in range(300)}
    assert labels == set(range(len(SHAPE_CLASSES)))


@pytest.mark.parametrize("index", range(40))
def test_box_encloses_every_pixel_the_shape_changed(index):
    """On a flat background without clutter, every pixel that differs from the background
    belongs to the shape: all of them must lie inside the box, and the box must be tight."""
    sample = ShapesDataset(40, seed=3, backgrounds=["flat"], clutter=False).render(index)
    background = sample.image[0, 0].astype(int)  # corners are never covered (2 px margin)
    changed = np.abs(sample.image.astype(int) - background).sum(axis=2) > 0
    rows, cols = np.nonzero(changed)
    top, left, bottom, right = sample.box
    assert rows.min() >= top and rows.max() < bottom and cols.min() >= left and cols.max() < right
    # tight: the shape's coverage reaches every side of the box
    assert sample.mask[top].any() and sample.mask[bottom - 1].any()
    assert sample.mask[:, left].any() and sample.mask[:, right - 1].any()


def test_items_are_tensors_and_indices_are_checked():
    dataset = ShapesDataset(10, seed=0)
    image, label, box = dataset[3]
    assert image.dtype == torch.uint8 and image.shape == (3, 64, 64)
    assert 0 <= label < len(SHAPE_CLASSES) and box.shape == (4,)
    assert torch.equal(image.permute(1, 2, 0), torch.from_numpy(dataset.render(3).image))
    for bad in (-1, 10):
        with pytest.raises(IndexError):
            dataset.render(bad)
    big = ShapesDataset(2, image_size=128).render(1)
    assert big.image.shape == (128, 128, 3)


def test_bad_arguments_and_specs():
    with pytest.raises(BadArgument):
        ShapesDataset(5, backgrounds=["plaid"])
    with pytest.raises(BadArgument):
        ShapesDataset(5, image_size=16)
    assert parse_shapes_spec("cat.png") is None
    assert parse_shapes_spec("shapes:3") == 3
    for bad in ("shapes:-1", "shapes:x", "shapes:"):
        with pytest.raises(BadArgument):
            parse_shapes_spec(bad)
    assert held_out_image(3).shape == (64, 64, 3)
