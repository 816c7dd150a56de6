"""load_model and preprocess: specs, checkpoints, torchvision weights (from a local file),
image conversion, and their errors."""

from __future__ import annotations

import copy
import os
import urllib.error

import cv2
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

import vizcnn
from vizcnn.data.images import load_image, read_image


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory, resnet18):
    path = tmp_path_factory.mktemp("ckpt") / "resnet18.pth"
    torch.save(resnet18.state_dict(), path)
    return path


def test_state_dict_with_arch_gives_the_same_logits(resnet18, resnet18_file):
    model = vizcnn.load_model(resnet18_file, arch="resnet18")
    assert not model.training
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), resnet18(x), atol=1e-6)


def test_nested_and_data_parallel_state_dicts_load(resnet18, tmp_path):
    path = tmp_path / "trainer.pt"
    state = {f"module.{k}": v for k, v in resnet18.state_dict().items()}
    torch.save({"epoch": 3, "state_dict": state}, path)
    model = vizcnn.load_model(path, arch="torchvision.models:resnet18")
    assert torch.equal(model.fc.weight, resnet18.fc.weight)


def test_state_dict_for_another_architecture_names_the_keys(resnet18_file):
    with pytest.raises(vizcnn.BadCheckpoint, match=r"missing keys: .*layer1\.2") as caught:
        vizcnn.load_model(resnet18_file, arch="resnet34")
    assert "resnet34" in str(caught.value)
    with pytest.raises(vizcnn.BadCheckpoint, match="unexpected keys: conv1.weight"):
        vizcnn.load_model(resnet18_file, arch="alexnet")
    with pytest.raises(vizcnn.BadCheckpoint, match=r"shape mismatch: fc.weight \(1000, 512\)"):
        vizcnn.load_model(resnet18_file, arch="resnet18", num_classes=10)
    with pytest.raises(vizcnn.BadCheckpoint, match="--arch"):
        vizcnn.load_model(resnet18_file)


def test_full_pickled_module_needs_explicit_trust(tmp_path, tiny_chain):
    path = tmp_path / "full.pt"
    torch.save(tiny_chain, path)
    with pytest.raises(vizcnn.BadCheckpoint, match="trust_checkpoint"):
        vizcnn.load_model(path)
    model = vizcnn.load_model(path, trust_checkpoint=True)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), tiny_chain(x))


def test_torchscript_file_loads(tmp_path, tiny_chain):
    path = tmp_path / "scripted.pt"
    with pytest.warns(FutureWarning):  # TorchScript is deprecated, but files exist
        torch.jit.save(torch.jit.trace(tiny_chain, torch.randn(1, 3, 32, 32)), str(path))
    model = vizcnn.load_model(path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), tiny_chain(x), atol=1e-6)
    with pytest.raises(vizcnn.BadArgument, match="TorchScript"):  # it runs, but takes no hooks
        vizcnn.activations(model, x, ["features.0"])


@pytest.mark.parametrize("content", [b"", b"not a checkpoint" * 50, b"PK\x03\x04broken zip"])
def test_corrupt_checkpoint(tmp_path, content):
    path = tmp_path / "broken.pt"
    path.write_bytes(content)
    with pytest.raises(vizcnn.BadCheckpoint, match="not a readable PyTorch checkpoint"):
        vizcnn.load_model(path, arch="resnet18")


def test_missing_checkpoint_and_bad_specs():
    with pytest.raises(vizcnn.BadCheckpoint, match="not found"):
        vizcnn.load_model("no/such/file.pt")
    with pytest.raises(vizcnn.BadCheckpoint, match="torchvision:alexnet"):
        vizcnn.load_model("alexnet")
    with pytest.raises(vizcnn.BadArgument, match="did you mean resnet18"):
        vizcnn.load_model("torchvision:resnet81")
    with pytest.raises(vizcnn.BadArgument, match="IMAGENET1K_V1"):
        vizcnn.load_model("torchvision:alexnet:IMAGENET2K")
    with pytest.raises(vizcnn.BadArgument):
        vizcnn.load_model("torchvision:")


def test_arch_import_error_is_reported(resnet18_file):
    with pytest.raises(vizcnn.BadArgument, match="cannot import"):
        vizcnn.load_model(resnet18_file, arch="no_such_module:make")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a CPU-only machine")
def test_cuda_request_without_gpu():
    with pytest.raises(vizcnn.BadArgument, match="CUDA is not available"):
        vizcnn.load_model("torchvision:alexnet", device="cuda")


def test_torchvision_weights_load_from_the_local_cache(tmp_path, monkeypatch, resnet18):
    """Real torchvision weight loading, fed a file built here instead of a download."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    cached = tmp_path / "hub" / "checkpoints" / os.path.basename(weights.url)
    cached.parent.mkdir(parents=True)
    torch.save(resnet18.state_dict(), cached)
    model = vizcnn.load_model("torchvision:resnet18:IMAGENET1K_V1")
    assert torch.equal(model.conv1.weight, resnet18.conv1.weight)
    same = vizcnn.load_model("torchvision:resnet18", weights="IMAGENET1K_V1")
    assert torch.equal(same.fc.bias, resnet18.fc.bias)


def test_torchvision_weights_without_network_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(vizcnn.BadCheckpoint, match="put the file from https://"):
        vizcnn.load_model("torchvision:alexnet:DEFAULT")


# --------------------------------------------------------------------------- preprocess


def test_preprocess_matches_torchvision_weight_transforms(photo, photo_path):
    expected = torchvision.models.ResNet50_Weights.IMAGENET1K_V2.transforms()(
        torch.from_numpy(photo).permute(2, 0, 1))
    batch = vizcnn.preprocess("torchvision:resnet50:IMAGENET1K_V2", photo_path)
    assert batch.shape == (1, 3, 224, 224)
    assert torch.allclose(batch[0], expected, atol=1e-6)
    inception = vizcnn.model_info("torchvision:inception_v3:DEFAULT").preprocessing
    assert (inception.resize, inception.crop) == (342, 299)


def test_preprocess_accepts_paths_arrays_pil_and_tensors(alexnet, photo, photo_path):
    known = vizcnn.model_info("torchvision:alexnet").preprocessing
    vizcnn.with_model_info(alexnet, preprocessing=known)
    reference = vizcnn.preprocess(alexnet, photo_path)
    for image in (photo, Image.fromarray(photo), torch.from_numpy(photo).permute(2, 0, 1),
                  torch.from_numpy(photo).permute(2, 0, 1).float() / 255):
        assert torch.allclose(vizcnn.preprocess(alexnet, image), reference, atol=1e-6)
    exact = vizcnn.preprocess(alexnet, photo, size=(100, 150), mean=(0, 0, 0), std=(1, 1, 1))
    assert exact.shape == (1, 3, 100, 150) and exact.min() >= 0 and exact.max() <= 1


def test_model_of_unknown_origin_keeps_its_size(tiny_chain, photo):
    batch = vizcnn.preprocess(tiny_chain, photo)
    assert batch.shape == (1, 3, *photo.shape[:2])


def test_gray_rgba_and_16_bit_images_are_converted(tmp_path, photo):
    gray = cv2.cvtColor(photo, cv2.COLOR_RGB2GRAY)
    cv2.imwrite(str(tmp_path / "gray.png"), gray)
    assert np.array_equal(read_image(tmp_path / "gray.png"), np.stack([gray] * 3, axis=2))

    rgba = np.dstack([photo, np.full(photo.shape[:2], 128, np.uint8)])
    cv2.imwrite(str(tmp_path / "rgba.png"), cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
    assert np.array_equal(read_image(tmp_path / "rgba.png"), photo)

    deep = photo.astype(np.uint16) * 257  # the same picture in 16 bits
    cv2.imwrite(str(tmp_path / "deep.png"), cv2.cvtColor(deep, cv2.COLOR_RGB2BGR))
    assert cv2.imread(str(tmp_path / "deep.png"), cv2.IMREAD_UNCHANGED).dtype == np.uint16
    assert np.array_equal(read_image(tmp_path / "deep.png"), photo)
    assert torch.equal(load_image(gray), load_image(np.stack([gray] * 3, axis=2)))


@pytest.mark.parametrize("kind", ["missing", "folder", "empty", "garbage", "truncated"])
def test_unreadable_images(tmp_path, photo, kind):
    path = tmp_path / "image.png"
    if kind == "folder":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(b"\x00\x01 definitely not an image" * 20)
    elif kind == "truncated":
        ok, encoded = cv2.imencode(".png", photo)
        path.write_bytes(encoded.tobytes()[: len(encoded) // 3])
    with pytest.raises(vizcnn.BadImage):
        vizcnn.preprocess("torchvision:alexnet", path)


def test_bad_arrays():
    with pytest.raises(vizcnn.BadImage):
        load_image(np.zeros((4, 4, 7)))
    with pytest.raises(vizcnn.BadImage):
        load_image(np.full((4, 4), np.nan))
    with pytest.raises(vizcnn.BadImage):
        load_image({"not": "an image"})


def test_loaded_model_is_in_eval_mode_on_the_cpu():
    model = vizcnn.load_model("torchvision:resnet18")
    assert not any(m.training for m in model.modules())
    assert next(model.parameters()).device.type == "cpu"
    assert isinstance(model, nn.Module)


# --------------------------------------------------------------------------- ModelInfo


def test_model_info_of_each_kind_of_model(tmp_path, monkeypatch, resnet18, tiny_chain):
    """One record per model, with what is known and nothing made up."""
    demo = vizcnn.model_info(vizcnn.load_model("demo"))
    assert demo.spec == "demo" and demo.preprocessing == vizcnn.DEMO_PREPROCESSING
    assert demo.input_size == (64, 64) and demo.class_name(2) == "square"
    assert demo.class_index("star") == 5 and demo.class_index("3") == 3

    # torchvision weights bring their transforms and their 1,000 class names
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    cached = tmp_path / "hub" / "checkpoints" / os.path.basename(weights.url)
    cached.parent.mkdir(parents=True)
    torch.save(resnet18.state_dict(), cached)
    loaded = vizcnn.model_info(vizcnn.load_model("torchvision:resnet18:IMAGENET1K_V1"))
    assert loaded.classes == tuple(weights.meta["categories"]) and loaded.class_name(0) == "tench"
    assert loaded.input_size == (224, 224)
    assert vizcnn.model_info("torchvision:resnet18:IMAGENET1K_V1") == loaded  # without loading

    # a TorchScript file: only its spec is known, and it can be told the rest
    path = tmp_path / "scripted.pt"
    with pytest.warns(FutureWarning):
        torch.jit.save(torch.jit.trace(tiny_chain, torch.randn(1, 3, 32, 32)), str(path))
    scripted = vizcnn.load_model(path)
    info = vizcnn.model_info(scripted)
    assert info.spec == str(path) and not info.preprocessing.known and info.classes is None
    assert info.input_size is None and info.class_name(1) == "1"
    vizcnn.with_model_info(scripted, classes=["cat", "dog"])
    assert vizcnn.model_info(scripted).classes == ("cat", "dog")
    assert vizcnn.model_info(scripted).spec == str(path)  # the rest of the record is kept

    # a module vizcnn never saw: an empty record; set, it survives a deep copy
    assert vizcnn.model_info(tiny_chain) == vizcnn.ModelInfo()
    vizcnn.with_model_info(tiny_chain, preprocessing=vizcnn.DEMO_PREPROCESSING)
    assert vizcnn.model_info(copy.deepcopy(tiny_chain)).preprocessing.known


def test_model_info_refuses_what_it_cannot_hold(tiny_chain):
    with pytest.raises(vizcnn.BadArgument, match="no field 'mean'"):
        vizcnn.with_model_info(tiny_chain, mean=(0.5,))
    with pytest.raises(vizcnn.BadArgument, match="must be a vizcnn.Preprocessing"):
        vizcnn.with_model_info(tiny_chain, preprocessing=(0.5, 0.5))
    with pytest.raises(vizcnn.BadArgument, match="unknown class 'kitten'.*circle"):
        vizcnn.model_info("demo").class_index("kitten")
    assert vizcnn.model_info(tiny_chain) == vizcnn.ModelInfo()  # nothing half-set


def test_an_unknown_class_among_many_gets_a_short_hint():
    info = vizcnn.ModelInfo(classes=[f"class {n}" for n in range(999)] + ["tabby cat"])
    with pytest.raises(vizcnn.BadArgument, match="did you mean 'tabby cat'") as raised:
        info.class_index("taby cat")
    assert len(str(raised.value)) < 200  # not all 1,000 names on one line
