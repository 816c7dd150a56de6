"""Channel statistics and Network Dissection (vizcnn.units) against brute force: every
activation map of every image, counted in plain loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

import vizcnn
from vizcnn.data.shapes import HELD_OUT_SEED, SHAPE_CONCEPTS, ShapesDataset
from vizcnn.units import IOU_CUTOFF, channel_stats, dissect


def _all_maps(model, images: torch.Tensor, layer: str) -> torch.Tensor:
    """(N, C, h, w), one image at a time (no batching shared with the code under test)."""
    return torch.cat([vizcnn.activations(model, images[n:n + 1], [layer])[layer]
                      for n in range(len(images))])


def test_channel_stats_equal_brute_force(demo):
    data = ShapesDataset(48, seed=HELD_OUT_SEED)
    both = channel_stats(demo, data, ["features.3", "features.10"], batch_size=20,
                         progress=False)
    stats = both["features.10"]
    images = torch.cat([vizcnn.preprocess(demo, data.render(i).image) for i in range(48)])
    # conv2's maxima as the conv gives them, before the in-place ReLU that follows it runs
    conv2 = _all_maps(demo, images, "features.3").amax((2, 3))
    torch.testing.assert_close(both["features.3"].maxima, conv2, rtol=1e-5, atol=1e-5)
    assert bool((conv2 < 0).any())
    maps = _all_maps(demo, images, "features.10").numpy()
    maxima = maps.max(axis=(2, 3))  # (N, C)
    labels = np.array([data.render(i).label for i in range(48)])
    assert torch.equal(stats.indices, torch.arange(48))
    assert np.array_equal(stats.labels.numpy(), labels)
    np.testing.assert_allclose(stats.maxima.numpy(), maxima, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats.fire_rate.numpy(), (maxima > 0).mean(axis=0), atol=1e-6)
    assert np.array_equal(stats.dead.numpy(), ~(maxima > 0).any(axis=0))
    for channel in (0, 7, 50):
        means = [np.maximum(maxima[labels == k, channel], 0).mean() for k in range(8)]
        np.testing.assert_allclose(stats.class_means(8)[channel].numpy(), means, rtol=1e-5)
        top = max(means)
        rest = (sum(means) - top) / 7
        expected = 0.0 if top + rest == 0 else (top - rest) / (top + rest)
        assert float(stats.selectivity(8)[channel]) == pytest.approx(expected, rel=1e-5)


class _Unlabelled(Dataset):
    """The shapes with their masks' top rows and left columns unlabelled (255, PASCAL VOC's
    "void"), where a unit's upsampled map is often above its threshold."""

    def __init__(self, shapes: ShapesDataset):
        self.shapes = shapes

    def __len__(self):
        return len(self.shapes)

    def __getitem__(self, index):
        image, label, mask = self.shapes[index]
        mask = mask.clone()
        mask[:12], mask[:, :9] = 255, 255
        return image, label, mask


@pytest.mark.parametrize(("layer", "unlabelled"), [("features.3", False), ("features.8", False),
                                                   ("features.8", True)])
def test_dissection_equals_brute_force_iou(demo, layer, unlabelled):
    count = 32
    data = ShapesDataset(count, seed=HELD_OUT_SEED, masks=True)
    if unlabelled:
        data = _Unlabelled(data)
    # one image per pass, as the brute force runs: a unit within float noise of the
    # threshold must fall on the same side in both
    result = dissect(demo, data, [layer], SHAPE_CONCEPTS, batch_size=1, progress=False)[layer]
    images = torch.cat([vizcnn.preprocess(demo, data[i][0]) for i in range(count)])
    maps = _all_maps(demo, images, layer)
    # the threshold: the m-th largest of all activations of the channel, m = 0.5 % of them
    values = maps.transpose(0, 1).flatten(1).numpy()
    m = math.ceil(0.005 * values.shape[1])
    thresholds = -np.sort(-values, axis=1)[:, m - 1]
    np.testing.assert_array_equal(result.thresholds.numpy(), thresholds)
    masks = np.stack([data[i][2].numpy() for i in range(count)])
    kinds = len(SHAPE_CONCEPTS)
    for channel in (0, 5, 17):
        inter, union = np.zeros(kinds), np.zeros(kinds)
        for n in range(count):
            up = F.interpolate(maps[n:n + 1, channel:channel + 1], size=(64, 64),
                               mode="bilinear", align_corners=False)[0, 0].numpy()
            above = (up > thresholds[channel]) & (masks[n] != 255)  # unlabelled: nowhere
            for k in range(kinds):
                concept = masks[n] == k
                inter[k] += (above & concept).sum()
                union[k] += (above | concept).sum()
        expected = np.where(union > 0, inter / np.maximum(union, 1), 0)
        np.testing.assert_allclose(result.iou[channel].numpy(), expected, rtol=1e-5, atol=1e-7)
        name, value = result.label(channel)
        best = int(expected.argmax())
        assert name == (SHAPE_CONCEPTS[best] if expected[best] >= IOU_CUTOFF else "no concept")


def test_deep_demo_layers_have_shape_detectors(demo):
    """Layer 4 of the trained network holds channels whose top activations cover a shape
    (IoU >= 0.04), many more and better ones than layer 1 (whose units see 7 x 7 pixels)."""
    data = ShapesDataset(300, seed=HELD_OUT_SEED, masks=True)
    results = dissect(demo, data, ["features.0", "features.8"], SHAPE_CONCEPTS,
                      progress=False)
    shapes = set(SHAPE_CONCEPTS[:-1])
    deep = [results["features.8"].label(c)[0] for c in range(128)]
    shallow = [results["features.0"].label(c)[0] for c in range(48)]
    assert sum(label in shapes for label in deep) >= 5 * max(1, sum(label in shapes
                                                                    for label in shallow))
    assert results["features.0"].iou.max() < results["features.8"].iou.max() / 2


class _Items(Dataset):
    """A data set of (image tensor, label, mask) items, for a network unlike ours."""

    def __init__(self, count: int):
        generator = torch.Generator().manual_seed(5)
        self.images = torch.rand(count, 3, 29, 29, generator=generator)
        self.labels = torch.randint(0, 3, (count,), generator=generator)
        self.masks = torch.randint(0, 3, (count, 29, 29), generator=generator)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index], self.labels[index], self.masks[index]


def test_other_networks_labels_and_masks_from_items():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(3, 5, 3), nn.PReLU(5), nn.MaxPool2d(3, 2, ceil_mode=True),
                        nn.Conv2d(5, 4, 3), nn.GELU(), nn.Flatten(), nn.LazyLinear(3))
    net(torch.rand(1, 3, 29, 29))  # settle the lazy head
    data = _Items(20)
    stats = channel_stats(net, data, ["3"], batch_size=7, progress=False)["3"]
    assert torch.equal(stats.labels, data.labels)
    brute = torch.cat([net[:4](data.images[n:n + 1]).amax((2, 3)) for n in range(20)])
    torch.testing.assert_close(stats.maxima, brute.detach(), rtol=1e-5, atol=1e-6)
    result = dissect(net, data, ["3"], ["a", "b", "c"], progress=False)["3"]
    assert result.iou.shape == (4, 3) and bool((result.iou >= 0).all())


def test_dissection_mistakes(demo):
    plain = ShapesDataset(8, seed=HELD_OUT_SEED)  # items carry boxes, not masks
    with pytest.raises(vizcnn.BadArgument, match="items are \\(image, label, mask\\)"):
        dissect(demo, plain, ["features.3"], SHAPE_CONCEPTS, progress=False)
    masked = ShapesDataset(8, seed=HELD_OUT_SEED, masks=True)
    with pytest.raises(vizcnn.BadArgument,
                       match="holds value 3, which names no concept: 3 are named"):
        dissect(demo, masked, ["features.3"], ["a", "b", "c"], progress=False)
    with pytest.raises(vizcnn.BadArgument, match="quantile"):
        dissect(demo, masked, ["features.3"], SHAPE_CONCEPTS, quantile=2, progress=False)
    with pytest.raises(vizcnn.BadArgument, match="no spatial output"):
        dissect(demo, masked, ["classifier.1"], SHAPE_CONCEPTS, progress=False)
    with pytest.raises(vizcnn.BadArgument, match="no labels"):
        channel_stats(demo, torch.randn(4, 3, 64, 64), ["features.3"],
                      progress=False)["features.3"].class_means()


# --------------------------------------------------------------------------- folders with masks


def test_a_folder_with_masks_dissects_as_its_items(demo, tmp_path):
    """The same 32 shapes, once as (image, label, mask) items and once as PNG files with a
    sibling masks folder (another order: by class folder): the same thresholds and IoUs."""
    from helpers import shapes_folder

    folder = shapes_folder(tmp_path / "shapes", 32)
    masked = vizcnn.ImageFolder(folder, masks=vizcnn.scan.sibling_masks(folder))
    assert masked.concepts == tuple(SHAPE_CONCEPTS)
    items = ShapesDataset(32, seed=7, masks=True)
    layer = "features.6"
    ours = dissect(demo, masked, [layer], masked.concepts, batch_size=1, progress=False)[layer]
    theirs = dissect(demo, items, [layer], SHAPE_CONCEPTS, batch_size=1,
                     progress=False)[layer]
    torch.testing.assert_close(ours.thresholds, theirs.thresholds, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours.iou, theirs.iou, rtol=1e-6, atol=1e-7)
    assert float(ours.iou.max()) > 0


def test_masks_follow_their_images_resize_and_crop():
    """A 300 x 400 image of flat-coloured rectangles and its mask of rectangle indices,
    through ImageNet's resize (shorter side 256, bilinear) and centre crop (224): wherever
    the preprocessed image shows a rectangle's colour, the mask names that rectangle."""
    colours = np.array([[250, 10, 10], [10, 250, 10], [10, 10, 250], [250, 250, 10]])
    mask = np.zeros((300, 400), np.int64)
    mask[:, 130:] = 1
    mask[170:, :] = 2
    mask[40:120, 250:330] = 3
    image = colours[mask].astype(np.uint8)
    model = vizcnn.with_model_info(nn.Sequential(nn.Conv2d(3, 2, 3)),
                                   preprocessing=vizcnn.Preprocessing())
    x = vizcnn.preprocess(model, image)[0]
    resized = vizcnn.scan.input_mask(model, image, torch.from_numpy(mask))
    assert resized.shape == (224, 224) and resized.dtype == torch.long
    recipe = vizcnn.IMAGENET_PREPROCESSING
    mean, std = torch.tensor(recipe.mean), torch.tensor(recipe.std)
    pixels = ((x * std[:, None, None] + mean[:, None, None]) * 255).permute(1, 2, 0)
    distance = (pixels[:, :, None, :] - torch.tensor(colours).float()).norm(dim=-1)
    flat = distance.min(dim=-1).values < 3  # away from the blended edges
    assert flat.float().mean() > 0.9
    assert torch.equal(distance.argmin(dim=-1)[flat], resized[flat])
    assert set(resized.unique().tolist()) == {0, 1, 2, 3}


def test_folder_mask_mistakes(tmp_path):
    from helpers import shapes_folder

    folder = shapes_folder(tmp_path / "shapes", 4)
    masks = folder.with_name("shapes-masks")
    one = sorted(masks.rglob("*.png"))[0]
    (masks / "concepts.txt").write_text("\n")
    with pytest.raises(vizcnn.BadArgument, match="names no concept"):
        vizcnn.ImageFolder(folder, masks=masks)
    (masks / "concepts.txt").unlink()
    with pytest.raises(vizcnn.BadArgument, match="concepts.txt' not found"):
        vizcnn.ImageFolder(folder, masks=masks)
    (masks / "concepts.txt").write_text("\n".join(SHAPE_CONCEPTS))
    import cv2

    cv2.imwrite(str(one), np.zeros((10, 10, 3), np.uint8))
    with pytest.raises(vizcnn.BadArgument, match="holds RGB pixels, not one concept index"):
        vizcnn.ImageFolder(folder, masks=masks)[0]
    cv2.imwrite(str(one), np.zeros((10, 10), np.uint8))
    with pytest.raises(vizcnn.BadArgument, match=r"is \(10, 10\), its image \(64, 64\)"):
        vizcnn.ImageFolder(folder, masks=masks)[0]
    one.unlink()
    with pytest.raises(vizcnn.BadArgument, match="1 of 4 images have no mask"):
        vizcnn.ImageFolder(folder, masks=masks)


# --------------------------------------------------------------------------- accuracy, classes


def _predicted(model, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(images[n:n + 1]).argmax(1) for n in range(len(images))])


def test_accuracy_matches_folder_classes_to_the_models_by_name(demo, tmp_path):
    from helpers import shapes_folder

    from vizcnn.data.shapes import SHAPE_CLASSES

    folder = vizcnn.ImageFolder(shapes_folder(tmp_path / "shapes", 40))
    assert folder.classes != tuple(SHAPE_CLASSES)  # alphabetical, not the demo's order
    images = torch.cat([vizcnn.preprocess(demo, path) for path in folder.paths])
    truth = torch.tensor([SHAPE_CLASSES.index(p.parent.name) for p in folder.paths])
    result = vizcnn.accuracy(demo, folder, batch_size=16)
    assert (result.correct, result.total) == (int((_predicted(demo, images) == truth).sum()), 40)
    assert "by name" in result.matched
    shapes = ShapesDataset(40, seed=7)  # the same images, in the demo's class order
    labels = torch.tensor([shapes.label(i) for i in range(40)])
    drawn = torch.cat([vizcnn.preprocess(demo, shapes.render(i).image) for i in range(40)])
    direct = vizcnn.accuracy(demo, shapes)
    assert direct.correct == int((_predicted(demo, drawn) == labels).sum()) == result.correct
    assert direct.matched == "the data's classes are the model's"


def test_accuracy_mistakes(demo, tmp_path):
    (tmp_path / "cats").mkdir()
    (tmp_path / "dogs").mkdir()
    import cv2

    for name in ("cats/a.png", "dogs/b.png"):
        cv2.imwrite(str(tmp_path / name), np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(vizcnn.BadArgument, match="class 'cats' is not one of the model's 8"):
        vizcnn.accuracy(demo, str(tmp_path))
    with pytest.raises(vizcnn.BadArgument, match="no labels"):
        vizcnn.accuracy(demo, torch.randn(3, 3, 64, 64))


def test_selectivity_counts_only_the_classes_the_data_has():
    """Labels 0, 2 and 5 of 8 named classes: the other five classes have no mean, and do not
    count as zero in mu_rest."""
    maxima = torch.tensor([[1.0, 0.0], [3.0, -1.0], [2.0, 0.0], [6.0, 4.0]])
    labels = torch.tensor([0, 2, 2, 5])
    stats = vizcnn.units.ChannelStats("x", maxima, torch.arange(4), labels,
                                      tuple("abcdefgh"))
    assert stats.class_means().shape == (2, 8)
    present = [[1.0, 2.5, 6.0], [0.0, 0.0, 4.0]]  # rectified means of classes 0, 2, 5
    for channel, means in enumerate(present):
        top = max(means)
        rest = (sum(means) - top) / 2
        assert float(stats.selectivity()[channel]) == pytest.approx((top - rest) / (top + rest))
