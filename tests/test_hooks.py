"""capture / activations: hooks live only inside the call, outputs are clones, the model comes
back exactly as it was."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_unchanged, hooks_left, snapshot
from torch import nn

import vizcnn
from vizcnn.hooks import preserved_state

LAYERS = {
    "alexnet": ["features.0", "features.10", "classifier.6"],
    "vgg16": ["features.0", "features.28", "features.30"],
    "resnet18": ["conv1", "layer1.0.relu", "layer4", "fc"],
}


def name_of(model: nn.Module) -> str:
    return {"AlexNet": "alexnet", "VGG": "vgg16", "ResNet": "resnet18"}[type(model).__name__]


def test_capture_and_activations_leave_no_trace(big_net):
    layers = LAYERS[name_of(big_net)]
    # a model a user left in training mode, with one frozen parameter
    big_net.train()
    first_param = next(big_net.parameters())
    first_param.requires_grad_(False)
    try:
        before = snapshot(big_net)
        x = torch.randn(2, 3, 96, 96)
        with vizcnn.capture(big_net, layers) as acts, torch.no_grad(), \
                preserved_state(big_net, eval_mode=True):
            big_net(x)
        assert set(acts) == set(layers)
        assert_unchanged(big_net, before)
        outputs = vizcnn.activations(big_net, x, layers)
        assert_unchanged(big_net, before)
        for name in layers:  # activations runs in eval mode, as the capture above did
            assert torch.equal(outputs[name], acts[name])
    finally:
        first_param.requires_grad_(True)
        big_net.eval()


def test_no_hook_left_when_the_forward_pass_raises(big_net):
    layers = LAYERS[name_of(big_net)]
    before = snapshot(big_net)
    wrong_channels = torch.randn(1, 5, 96, 96)
    with pytest.raises(RuntimeError), vizcnn.capture(big_net, layers), torch.no_grad():
        big_net(wrong_channels)
    assert_unchanged(big_net, before)
    with pytest.raises(RuntimeError):
        vizcnn.activations(big_net, wrong_channels, layers)
    assert_unchanged(big_net, before)
    with pytest.raises(vizcnn.BadArgument):
        if name_of(big_net) == "resnet18":  # traced, then refused: not a chain
            vizcnn.receptive_field(big_net, "layer4", 64, method="analytic")
        else:  # the forward pass fails: too small for the network
            vizcnn.receptive_field(big_net, layers[1], 8)
    assert_unchanged(big_net, before)


def test_receptive_field_leaves_no_trace(big_net):
    before = snapshot(big_net)
    for method in ("auto", "gradient"):
        vizcnn.receptive_field(big_net, LAYERS[name_of(big_net)][1], 96, method=method)
    assert_unchanged(big_net, before)


def test_unknown_layer_adds_no_hook(alexnet):
    with pytest.raises(vizcnn.LayerNotFound), vizcnn.capture(alexnet, ["features.0", "nope"]):
        pass
    assert hooks_left(alexnet) == []


def test_captured_conv_output_survives_inplace_relu(alexnet):
    x = torch.randn(1, 3, 96, 96)
    outputs = vizcnn.activations(alexnet, x, ["features.0", "features.1"])
    conv = alexnet.features[0]
    expected = F.conv2d(x, conv.weight, conv.bias, stride=4, padding=2)  # independent answer
    assert torch.allclose(outputs["features.0"], expected, atol=1e-5)
    assert outputs["features.0"].min() < 0  # the in-place ReLU did not overwrite the clone
    assert torch.allclose(outputs["features.1"], expected.relu(), atol=1e-5)


def test_module_called_twice_keeps_every_call_on_request(resnet18):
    x = torch.randn(1, 3, 64, 64)
    block = resnet18.layer1[0]
    with torch.no_grad():
        stem = resnet18.maxpool(resnet18.relu(resnet18.bn1(resnet18.conv1(x))))
        first = F.relu(block.bn1(block.conv1(stem)))  # the block's first use of `relu`
        second = F.relu(block.bn2(block.conv2(first)) + stem)  # the second, after the add
    both = vizcnn.activations(resnet18, x, ["layer1.0.relu", "layer1.0"], calls="all")
    assert len(both["layer1.0.relu"]) == 2
    assert torch.allclose(both["layer1.0.relu"][0], first, atol=1e-5)
    assert torch.allclose(both["layer1.0.relu"][1], second, atol=1e-5)
    last = vizcnn.activations(resnet18, x, "layer1.0.relu")
    assert torch.allclose(last["layer1.0.relu"], second, atol=1e-5)
    earliest = vizcnn.activations(resnet18, x, "layer1.0.relu", calls="first")
    assert torch.allclose(earliest["layer1.0.relu"], first, atol=1e-5)


def test_capture_options(alexnet):
    x = torch.randn(1, 3, 96, 96, requires_grad=True)
    with vizcnn.capture(alexnet, "features.3", detach=False) as acts:
        alexnet(x)
    acts["features.3"].sum().backward()  # still in the graph
    assert x.grad is not None and x.grad.abs().sum() > 0
    cpu = vizcnn.activations(alexnet, x.detach(), ["features.3"], to_cpu=True)
    assert cpu["features.3"].device.type == "cpu"
    with pytest.raises(vizcnn.BadArgument), vizcnn.capture(alexnet, "features.3", calls="every"):
        pass


def test_activations_rejects_a_non_tensor(alexnet, photo):
    with pytest.raises(vizcnn.BadArgument, match="preprocess"):
        vizcnn.activations(alexnet, photo, ["features.0"])


def test_too_small_input_names_the_layer(alexnet):
    with pytest.raises(vizcnn.BadArgument, match="too small .* at layer 'features.5'"):
        vizcnn.activations(alexnet, torch.randn(1, 3, 20, 20), ["features.10"])
    assert hooks_left(alexnet) == []


def test_wrong_channels_and_small_maps_are_found_before_pytorch_words_them(alexnet,
                                                                           monkeypatch):
    """The common failures are checked on the shapes before the layer runs, so they do not
    depend on the wording of PyTorch's messages (which the fallback patterns read)."""
    from vizcnn import hooks

    def no_patterns(*args):
        raise AssertionError("the message patterns were needed")

    monkeypatch.setattr(hooks, "_model_error", no_patterns)
    with pytest.raises(vizcnn.BadArgument, match="too small .* at layer 'features.5'"):
        vizcnn.activations(alexnet, torch.randn(1, 3, 20, 20), ["features.10"])
    with pytest.raises(vizcnn.ModelError, match="takes 3-channel input, the image has 1 "
                                                "channels at layer 'features.0'"):
        vizcnn.activations(alexnet, torch.randn(1, 1, 64, 64), ["features.3"])
    assert hooks_left(alexnet) == []
