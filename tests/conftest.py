"""Shared fixtures: torchvision nets with random (seeded) weights, tiny hand-built nets, images.
Nothing here downloads anything."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torchvision
from torch import nn


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; run `pytest -m cuda` on a GPU machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def _torchvision(arch: str) -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.get_model(arch, weights=None).eval()


@pytest.fixture(scope="session")
def alexnet() -> nn.Module:
    return _torchvision("alexnet")


@pytest.fixture(scope="session")
def vgg16() -> nn.Module:
    return _torchvision("vgg16")


@pytest.fixture(scope="session")
def resnet18() -> nn.Module:
    return _torchvision("resnet18")


@pytest.fixture(params=["alexnet", "vgg16", "resnet18"])
def big_net(request) -> nn.Module:
    return request.getfixturevalue(request.param)


class TinyChain(nn.Module):
    """conv 3x3 p1 -> relu -> maxpool 3/2 -> conv 5x5 s2 p0 -> relu: fields worked by hand."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2), nn.Conv2d(4, 6, 5, stride=2), nn.ReLU(inplace=True),
        )
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        x = self.features(x)
        return self.head(x.mean(dim=(2, 3)))


class TinyResidual(nn.Module):
    """stem conv 3x3 -> [conv 3x3, conv 3x3] + 1x1 skip, all stride 1: a residual graph whose
    field is worked by hand (3, then 3 + 2 + 2 = 7 through the main branch)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.skip = nn.Conv2d(4, 4, 1)
        self.relu = nn.ReLU()

    def forward(self, x):
        x = self.relu(self.stem(x))
        out = self.relu(self.conv1(x))
        out = self.conv2(out)
        out += self.skip(x)  # in place: a chain test must not be fooled by it
        return self.relu(out)


@pytest.fixture
def tiny_chain() -> nn.Module:
    torch.manual_seed(0)
    return TinyChain().eval()


@pytest.fixture
def tiny_residual() -> nn.Module:
    torch.manual_seed(0)
    return TinyResidual().eval()


@pytest.fixture(scope="session")
def photo_path(tmp_path_factory) -> str:
    """A real photograph (scikit-image's chelsea the cat) written as a PNG."""
    import skimage.data

    path = tmp_path_factory.mktemp("images") / "chelsea.png"
    cv2.imwrite(str(path), cv2.cvtColor(skimage.data.chelsea(), cv2.COLOR_RGB2BGR))
    return str(path)


@pytest.fixture(scope="session")
def photo() -> np.ndarray:
    import skimage.data

    return skimage.data.chelsea()
