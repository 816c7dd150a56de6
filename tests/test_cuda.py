"""The same contracts on a GPU: everything follows the model's device. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

import vizcnn
from vizcnn.receptive import receptive_fields

pytestmark = pytest.mark.cuda


def test_load_capture_and_fields_on_cuda(photo):
    model = vizcnn.load_model("torchvision:alexnet", device="cuda")
    assert next(model.parameters()).is_cuda
    x = vizcnn.preprocess(model, photo)
    assert x.is_cuda
    with vizcnn.capture(model, ["features.0", "features.10"]) as acts, torch.no_grad():
        model(x)
    assert acts["features.0"].is_cuda and acts["features.0"].min() < 0
    cpu = vizcnn.activations(model, x, ["features.10"], to_cpu=True)
    assert cpu["features.10"].device.type == "cpu"
    assert torch.allclose(cpu["features.10"], acts["features.10"].cpu(), atol=1e-4)
    fields = receptive_fields(model, ["features.10", "features.12"], 224, method="gradient")
    assert fields["features.10"].size == (163, 163) and fields["features.12"].jump == (32, 32)


def test_resnet_gradient_field_on_cuda():
    model = vizcnn.load_model("torchvision:resnet18", device="cuda")
    field = vizcnn.receptive_field(model, "layer4", 224)
    assert field.size == (435, 435) and field.jump == (32, 32)
    assert all(not module._forward_hooks for module in model.modules())
