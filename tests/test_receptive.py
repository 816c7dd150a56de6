"""Receptive fields: the chain formula, the gradient method, and hand-worked answers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import vizcnn
from vizcnn import receptive
from vizcnn.layers import list_layers
from vizcnn.receptive import receptive_fields


def geometry(field):
    return field.size, field.jump, field.offset


@pytest.mark.parametrize("net", ["alexnet", "vgg16"])
def test_analytic_equals_gradient_at_every_conv_and_pool(net, request):
    model = request.getfixturevalue(net)
    layers = list_layers(model, "conv") + list_layers(model, "pool")
    analytic = receptive_fields(model, layers, 224, method="analytic")
    gradient = receptive_fields(model, layers, 224, method="gradient")
    for name in layers:
        assert analytic[name].method == "analytic" and gradient[name].method == "gradient"
        assert geometry(analytic[name]) == geometry(gradient[name]), name


@pytest.mark.parametrize("net, layer, size, jump", [
    ("alexnet", "features.10", 163, 16),  # conv5
    ("alexnet", "features.0", 11, 4),
    ("alexnet", "features.12", 195, 32),  # pool5
    ("vgg16", "features.28", 196, 16),  # conv5_3
    ("vgg16", "features.30", 212, 32),  # pool5, after the last max pool
])
def test_published_fields(net, layer, size, jump, request):
    field = vizcnn.receptive_field(request.getfixturevalue(net), layer, 224)
    assert field.size == (size, size) and field.jump == (jump, jump)
    assert field.method == "analytic"


# ResNet18 worked by hand: conv1 7x7/2 and maxpool 3x3/2 give 11 with jump 4; each 3x3 conv adds
# 2 x jump; the first conv of layer2/3/4 doubles the jump after adding; every layer pads k // 2,
# so each field is centred on its unit: offset = -(size - 1) / 2.
RESNET18 = {
    "conv1": (7, 2), "maxpool": (11, 4),
    "layer1.0.conv1": (19, 4), "layer1.0.conv2": (27, 4), "layer1.1.conv1": (35, 4),
    "layer1.1.conv2": (43, 4), "layer1": (43, 4),
    "layer2.0.conv1": (51, 8), "layer2.0.conv2": (67, 8), "layer2.0.downsample.0": (43, 8),
    "layer2.1.conv1": (83, 8), "layer2.1.conv2": (99, 8), "layer2": (99, 8),
    "layer3.0.conv1": (115, 16), "layer3.0.conv2": (147, 16), "layer3.1.conv1": (179, 16),
    "layer3.1.conv2": (211, 16), "layer3": (211, 16),
    "layer4.0.conv1": (243, 32), "layer4.0.conv2": (307, 32), "layer4.1.conv1": (371, 32),
    "layer4.1.conv2": (435, 32), "layer4": (435, 32),
}


def test_resnet18_gradient_fields_match_the_hand_worked_ones(resnet18):
    fields = receptive_fields(resnet18, list(RESNET18), 224, method="gradient")
    for name, (size, jump) in RESNET18.items():
        offset = -(size - 1) // 2
        assert geometry(fields[name]) == ((size, size), (jump, jump), (offset, offset)), name
    auto = receptive_fields(resnet18, ["layer1.0.conv2", "layer2.1.conv1", "avgpool", "fc"], 224)
    assert auto["layer1.0.conv2"].method == "analytic"  # a chain from the input up to there
    assert auto["layer2.1.conv1"].method == "gradient"  # behind a residual add
    assert auto["avgpool"].is_global and auto["fc"].is_global


def test_tiny_chain_by_hand(tiny_chain):
    # conv3 p1: size 3, jump 1, offset -1; pool 3/2: 3 + 2 = 5, jump 2; conv5/2: 5 + 4*2 = 13, 4
    fields = receptive_fields(tiny_chain, ["features.0", "features.2", "features.3"], 32)
    assert geometry(fields["features.0"]) == ((3, 3), (1, 1), (-1, -1))
    assert geometry(fields["features.2"]) == ((5, 5), (2, 2), (-1, -1))
    conv = fields["features.3"]
    assert geometry(conv) == ((13, 13), (4, 4), (-1, -1))
    assert conv.box(0, 0) == (0, 0, 12, 12)  # (-1..11) clipped at the top-left
    assert conv.box(1, 2) == (3, 7, 16, 20)
    assert conv.box(6, 6) == (23, 23, 32, 32)  # clipped at the bottom-right of 32 x 32


def test_tiny_residual_by_hand_and_in_place_add_is_no_chain(tiny_residual):
    fields = receptive_fields(tiny_residual, ["conv1", "conv2", "skip", "relu"], 32)
    assert geometry(fields["conv1"]) == ((5, 5), (1, 1), (-2, -2))
    assert fields["conv1"].method == "analytic"
    assert geometry(fields["skip"]) == ((3, 3), (1, 1), (-1, -1))
    # `out += skip(x)` happens in place on conv2's output: the last relu call is behind an add
    assert fields["relu"].method == "gradient"
    assert geometry(fields["relu"]) == ((7, 7), (1, 1), (-3, -3))
    with pytest.raises(vizcnn.BadArgument, match="not on a chain"):
        vizcnn.receptive_field(tiny_residual, "relu", 32, method="analytic")


class DeepResidual(nn.Module):
    """45 3x3 convs with a skip around them: the far corner of the field is reached by one path
    whose gradient, (1/9)^45 ~ 1e-43, underflows float32."""

    def __init__(self, depth: int = 45):
        super().__init__()
        self.first = nn.Conv2d(3, 2, 1)
        self.body = nn.Sequential(*[nn.Conv2d(2, 2, 3, padding=1) for _ in range(depth)])

    def forward(self, x):
        x = self.first(x)
        return self.body(x) + x


def test_deep_graph_falls_back_to_float64(monkeypatch):
    dtypes = []
    original = receptive._gradient

    def spy(model, names, input_size, dtype=torch.float32):
        dtypes.append(dtype)
        return original(model, names, input_size, dtype)

    monkeypatch.setattr(receptive, "_gradient", spy)
    model = DeepResidual().eval()
    field = vizcnn.receptive_field(model, "body", 64, method="gradient")
    assert field.size == (91, 91) and field.jump == (1, 1) and field.offset == (-45, -45)
    assert dtypes == [torch.float32, torch.float64]


def test_non_square_input_and_global_layers(alexnet):
    field = vizcnn.receptive_field(alexnet, "features.10", (96, 160))
    assert field.input_size == (96, 160)
    height, width = 5, 9  # conv5 map at 96 x 160
    top, left, bottom, right = field.box(height - 1, width - 1)
    assert (top, left, bottom, right) == (0, (width - 1) * 16 - 66, 96, 160)
    head = vizcnn.receptive_field(alexnet, "classifier.6", (96, 160))
    assert head.is_global and head.box(0, 0) == (0, 0, 96, 160)
    assert head.describe() == ("global", "-")


def test_bad_arguments(alexnet):
    with pytest.raises(vizcnn.LayerNotFound, match="features.10"):
        vizcnn.receptive_field(alexnet, "features.100", 224)
    with pytest.raises(vizcnn.BadArgument):
        vizcnn.receptive_field(alexnet, "features.10", (224, -1))
    with pytest.raises(vizcnn.BadArgument):
        vizcnn.receptive_field(alexnet, "features.10", 224, method="magic")
    # at 31 x 31 conv5 still has a 1 x 1 map (the trace stops there), the last pool has none
    assert vizcnn.receptive_field(alexnet, "features.10", 31).size == (163, 163)
    with pytest.raises(vizcnn.BadArgument, match="too small.*features.12"):
        vizcnn.receptive_field(alexnet, "features.12", 31)


def test_a_global_mean_on_the_way_makes_the_field_global():
    """A squeeze-and-excitation gate written as ``y.mean(dim=(2, 3))`` (not an adaptive pool):
    every unit after it sees the whole input, and the layers before it keep their fields; the
    deconvnet's patches then hold the whole image and equal the whole projection."""
    import torch.nn.functional as F

    class MeanGate(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.gate = nn.Conv2d(4, 4, 1)
            self.out = nn.Conv2d(4, 4, 3)

        def forward(self, x):
            y = F.gelu(self.conv(x))
            return self.out(y * torch.sigmoid(self.gate(y.mean(dim=(2, 3), keepdim=True))))

    torch.manual_seed(17)
    model = MeanGate().eval()
    fields = vizcnn.receptive_fields(model, ["conv", "out"], (20, 22))
    assert fields["out"].is_global and fields["out"].size == (20, 22)
    assert not fields["conv"].is_global and fields["conv"].size == (3, 3)
    x = torch.randn(1, 3, 20, 22)
    patches = vizcnn.Deconvnet(model).project_patches(x, "out", [1])
    whole = vizcnn.Deconvnet(model).project_many(x, "out", [1])
    assert patches.projections.shape[-2:] == (20, 22)
    assert torch.equal(patches.projections, whole)
