"""Shared fixtures: torchvision nets with random (seeded) weights, tiny hand-built nets, images.
Nothing here downloads anything."""

from __future__ import annotations

import os

import cv2
import numpy as np
import pytest
import torch
import torchvision
from helpers import TinyChain, TinyResidual
from torch import nn

import vizcnn


def pytest_configure(config):
    """Under pytest-xdist (``./test.sh`` runs a process per core) each process, and every
    program a test starts, computes on one thread: two processes of two threads each on two
    cores made OpenMP's threads wait on each other."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


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


@pytest.fixture(autouse=True)
def _few_feature_vis_steps(monkeypatch):
    """Feature visualizations at 4 steps unless a test asks for more: the gallery and the
    demo make them for every channel they show, and their tests are about the pages, not the
    pictures (test_featvis.py gives its steps, and checks what they reach)."""
    monkeypatch.setattr("vizcnn.featvis.DEFAULT_STEPS", 4)


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


@pytest.fixture(scope="session")
def demo() -> nn.Module:
    """The bundled demo network (ZFNetMini, trained)."""
    return vizcnn.load_model("demo")


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
