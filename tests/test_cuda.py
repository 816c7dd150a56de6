"""The same contracts on a GPU: everything follows the model's device. Skipped without CUDA."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision

import vizcnn
from vizcnn.data.shapes import held_out_image
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


def test_deconv_and_scan_on_cuda():
    """The deconvnet and the scan follow the model's device and give the CPU's numbers."""
    cpu_model = vizcnn.load_model("demo")
    gpu_model = vizcnn.load_model("demo", device="cuda")
    x = torch.cat([vizcnn.preprocess(cpu_model, held_out_image(i)) for i in range(3)])
    for route in ("explicit", "autograd"):
        on_gpu = vizcnn.Deconvnet(gpu_model).project(x.cuda(), "features.6", 1, route=route)
        assert on_gpu.is_cuda
        on_cpu = vizcnn.Deconvnet(cpu_model).project(x, "features.6", 1, route=route)
        assert (on_gpu.cpu() - on_cpu).abs().max() <= 1e-4 * on_cpu.abs().max()
    top_gpu = vizcnn.scan_topk(gpu_model, "shapes:300", ["features.3", "features.10"],
                               progress=False)
    top_cpu = vizcnn.scan_topk(cpu_model, "shapes:300", ["features.3", "features.10"],
                               device="cuda", progress=False)  # a copy runs on the GPU
    assert next(cpu_model.parameters()).device.type == "cpu"
    for layer in ("features.3", "features.10"):
        assert torch.equal(top_gpu.indices[layer], top_cpu.indices[layer])
    patches = vizcnn.top_patches(gpu_model, top_gpu, "shapes:300", "features.3", [0, 1])
    assert patches.projections.is_cuda and patches.projections.shape[:2] == (2, 9)
    assert all(not module._forward_hooks for module in gpu_model.modules())


def test_residual_deconv_routes_on_cuda():
    """ResNet18 (random weights) on the GPU: the traced-graph and autograd routes follow the
    model's device and give the CPU's numbers."""
    torch.manual_seed(0)
    cpu_model = torchvision.models.resnet18().eval()
    gpu_model = copy.deepcopy(cpu_model).cuda()
    x = torch.randn(2, 3, 96, 112)
    positions = torch.tensor([[0, 0], [2, 3], [5, 6]])
    for route in ("explicit", "autograd"):
        on_gpu = vizcnn.Deconvnet(gpu_model).project_many(
            x.cuda(), "layer3", [1, 4, 4], image_indices=[0, 1, 0], positions=positions,
            route=route)
        assert on_gpu.is_cuda
        on_cpu = vizcnn.Deconvnet(cpu_model).project_many(
            x, "layer3", [1, 4, 4], image_indices=[0, 1, 0], positions=positions, route=route)
        assert (on_gpu.cpu() - on_cpu).abs().max() <= 1e-4 * on_cpu.abs().max()
    assert all(not module._forward_hooks for module in gpu_model.modules())


def test_folder_scan_with_workers_feeds_the_gpu(tmp_path):
    """A folder on the GPU: decoded by workers (the default there) into pinned batches; the
    same top-k as decoding in the main process on the CPU."""
    import cv2

    from vizcnn.scan import default_workers, input_batches

    for index in range(24):
        cv2.imwrite(str(tmp_path / f"{index:02d}.png"),
                    cv2.cvtColor(held_out_image(index), cv2.COLOR_RGB2BGR))
    gpu_model = vizcnn.load_model("demo", device="cuda")
    assert default_workers(gpu_model, str(tmp_path)) >= 1
    _, batch, _ = next(input_batches(gpu_model, str(tmp_path), 8))
    assert batch.is_pinned()
    on_gpu = vizcnn.scan_topk(gpu_model, str(tmp_path), ["features.10"], progress=False)
    on_cpu = vizcnn.scan_topk(vizcnn.load_model("demo"), str(tmp_path), ["features.10"],
                              workers=0, progress=False)
    assert torch.equal(on_gpu.indices["features.10"], on_cpu.indices["features.10"])


def test_feature_visualization_on_cuda_follows_the_cpu():
    cpu = vizcnn.load_model("demo")
    gpu = vizcnn.load_model("demo", device="cuda")
    on_cpu = vizcnn.feature_visualization(cpu, "features.6", [1, 2], steps=8, progress=False)
    on_gpu = vizcnn.feature_visualization(gpu, "features.6", [1, 2], steps=8, progress=False)
    assert on_gpu.images.is_cuda and not on_gpu.failed.any()
    # the same random streams (drawn on the CPU) and the same steps: the same images, to
    # the arithmetic's noise
    assert torch.allclose(on_gpu.images.cpu(), on_cpu.images, atol=5e-3)
    assert all(not module._forward_hooks for module in gpu.modules())


def test_sanity_check_on_cuda_keeps_the_model_and_repeats():
    """A sanity check on the GPU: the copies and the pictures on the model's device, the model
    as it was, the same seed the same numbers (to float noise: CUDA's unpooling adds
    atomically)."""
    model = vizcnn.load_model("demo", device="cuda")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    runs = [vizcnn.sanity_check(model, "shapes:40", "features.3", "deconv", channels=[1, 2],
                                baseline_models=1, progress=False) for _ in range(2)]
    assert runs[0].pictures.is_cuda
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not module._forward_hooks for module in model.modules())
    first, second = (run.similarity.spearman for run in runs)
    assert torch.allclose(first, second, atol=1e-4) and first.isfinite().all()
