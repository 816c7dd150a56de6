"""The deconvnet: a hand-worked example, equality with Captum's NeuronDeconvolution, the two
paths against each other, cropping, functional ReLUs, hooks and errors."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from captum.attr import NeuronDeconvolution
from helpers import TinyChain, assert_unchanged, hooks_left, snapshot
from torch import nn

import vizcnn
import vizcnn.deconv as deconv_module
from vizcnn.data.shapes import held_out_image
from vizcnn.deconv import Deconvnet, RectificationWarning
from vizcnn.layers import resolve_layer

TOLERANCE = 1e-5  # of the projection's largest magnitude


def captum_projection(model: nn.Module, x: torch.Tensor, layer: str, channel: int
                      ) -> torch.Tensor:
    """The reference: per image, Captum's NeuronDeconvolution at the channel's strongest unit,
    times that unit's activation."""
    activation = vizcnn.activations(model, x, [layer])[layer]
    module = resolve_layer(model, layer)
    results = []
    for n in range(len(x)):
        channel_map = activation[n, channel]
        y, x_ = divmod(int(channel_map.flatten().argmax()), channel_map.shape[1])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Captum's note that it sets hooks on ReLUs
            gradient = NeuronDeconvolution(model, module).attribute(
                x[n:n + 1], neuron_selector=(channel, y, x_))
        results.append(gradient * channel_map[y, x_])
    return torch.cat(results)


def assert_close(result: torch.Tensor, reference: torch.Tensor) -> None:
    scale = reference.abs().max()
    assert (result - reference).abs().max() <= TOLERANCE * scale


# --------------------------------------------------------------------------- by hand


class TwoPools(nn.Module):
    """1 channel, width 11: 1x1 conv (weight 2) -> ReLU -> max pool (1x3, stride 2) -> max
    pool (1x3, stride 2). Both pools overlap: neighbouring windows share one column."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 1, 1, bias=False), nn.ReLU(),
                                      nn.MaxPool2d((1, 3), (1, 2)), nn.MaxPool2d((1, 3), (1, 2)))
        with torch.no_grad():
            self.features[0].weight.fill_(2.0)

    def forward(self, x):
        return self.features(x)


# Worked on paper:
#   x          = [0, 1, 3, 1, 0, 5, 0, 2, 4, 2, 1]
#   conv, relu = [0, 2, 6, 2, 0, 10, 0, 4, 8, 4, 2]
#   pool 1: windows 0-2, 2-4, 4-6, 6-8, 8-10 -> [6, 6, 10, 8, 8], switches [2, 2, 5, 8, 8]
#   pool 2: windows 0-2, 2-4 of that       -> [10, 10],          switches [2, 2]
# Projecting the whole map of pool 1: the first two windows share switch 2, so 6 + 6 = 12
# lands there, 10 at 5, 8 + 8 = 16 at 8; the transposed conv doubles it: 24, 20, 32.
# The whole map of pool 2: both units share switch 2 of pool 1 (10 + 10 = 20), whose switch
# is column 5: 40 there. The strongest unit of pool 2 (the first of the two 10s): 20 at 5.
HAND_INPUT = torch.tensor([0, 1, 3, 1, 0, 5, 0, 2, 4, 2, 1], dtype=torch.float32)


@pytest.mark.parametrize("route", ["explicit", "autograd"])
@pytest.mark.parametrize(("layer", "mode", "expected"), [
    ("features.2", "map", {2: 24.0, 5: 20.0, 8: 32.0}),
    ("features.3", "map", {5: 40.0}),
    ("features.3", "max", {5: 20.0}),
    ("features.2", "max", {5: 20.0}),
])
def test_hand_worked_overlapping_pools(layer, mode, expected, route):
    model = TwoPools().eval()
    x = HAND_INPUT.view(1, 1, 1, 11)
    result = Deconvnet(model).project(x, layer, 0, mode=mode, route=route).flatten()
    wanted = torch.zeros(11)
    for column, value in expected.items():
        wanted[column] = value
    assert torch.equal(result, wanted)


def test_rectification_is_on_the_signal_not_the_forward_mask():
    """A conv with a negative weight after a ReLU: the deconvnet rectifies the backward signal
    (unlike a gradient, which would be masked by where the forward ReLU was active)."""
    model = nn.Sequential(nn.Conv2d(1, 1, 1, bias=False), nn.ReLU(), nn.Conv2d(1, 1, 1, bias=False))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[2].weight.fill_(-1.0)
    x = torch.tensor([[[[-2.0, 3.0]]]])
    # layer 2 output: [-0, -3] -> strongest unit: column 0 (value 0 -> projection 0); map mode:
    # signal [0, -3] -> transposed conv (-1): [0, 3] -> rectify: [0, 3] -> transposed conv: [0, 3]
    result = Deconvnet(model).project(x, "2", 0, mode="map", route="explicit")
    assert torch.equal(result.flatten(), torch.tensor([0.0, 3.0]))
    assert torch.equal(Deconvnet(model).project(x, "2", 0, mode="map", route="autograd"), result)


# --------------------------------------------------------------------------- against Captum


def _zfnet_mini():
    return vizcnn.load_model("demo")


def _tiny_chain():
    torch.manual_seed(0)
    return TinyChain().eval()


CHAIN_CASES = [
    # (model fixture or builder, layers, input size): each layer right after an overlapping
    # 3x3/2 pool is included, and a non-square input
    ("alexnet", ["features.3", "features.10"], (200, 300)),
    ("vgg16", ["features.5", "features.28"], (64, 96)),
    ("zfnet_mini", ["features.3", "features.10", "features.12"], (64, 64)),
    ("tiny_chain", ["features.3"], (23, 31)),
]


def _model(name: str, request) -> nn.Module:
    if name == "zfnet_mini":
        return _zfnet_mini()
    if name == "tiny_chain":
        return _tiny_chain()
    return request.getfixturevalue(name)


@pytest.mark.parametrize(("name", "layers", "size"), CHAIN_CASES)
def test_equals_captum_on_chains(name, layers, size, request):
    model = _model(name, request)
    torch.manual_seed(1)
    x = torch.randn(2, 3, *size)
    if name == "zfnet_mini":  # its own kind of images: real activations, not noise
        x = torch.cat([vizcnn.preprocess(model, held_out_image(i)) for i in (0, 1)])
    net = Deconvnet(model)
    before = snapshot(model)
    for layer in layers:
        # the channel with the strongest activation in the batch: never a dead one
        maps = vizcnn.activations(model, x, [layer])[layer]
        channel = int(maps.amax(dim=(0, 2, 3)).argmax())
        reference = captum_projection(model, x, layer, channel)
        explicit = net.project(x, layer, channel, route="explicit")
        autograd = net.project(x, layer, channel, route="autograd")
        assert reference.abs().max() > 0
        assert_close(explicit, reference)
        assert_close(autograd, reference)
        assert_close(explicit, autograd)
        assert explicit.shape == x.shape
    assert_unchanged(model, before)


def test_autograd_path_equals_captum_on_resnet18(resnet18):
    torch.manual_seed(2)
    x = torch.randn(2, 3, 64, 80)
    net = Deconvnet(resnet18)
    for layer, channel in [("layer1", 3), ("layer2.1.conv1", 7), ("layer3", 11)]:
        with pytest.raises(vizcnn.BadArgument, match="chain"):
            net.project(x, layer, channel, route="explicit")
        assert_close(net.project(x, layer, channel), captum_projection(resnet18, x, layer,
                                                                        channel))
    assert hooks_left(resnet18) == []


def test_map_mode_paths_agree(alexnet):
    torch.manual_seed(3)
    x = torch.randn(2, 3, 96, 128)
    net = Deconvnet(alexnet)
    for layer in ["features.3", "features.8"]:
        explicit = net.project(x, layer, 4, mode="map", route="explicit")
        assert_close(explicit, net.project(x, layer, 4, mode="map", route="autograd"))
        # the whole map reaches further than its strongest unit alone
        strongest = net.project(x, layer, 4, mode="max")
        assert (explicit != 0).sum() > (strongest != 0).sum()


@pytest.mark.parametrize("whole_forward", [True, False])
def test_batched_projections_equal_single_ones(alexnet, monkeypatch, whole_forward):
    """project_many with given (image, channel, position) triples, on both ways of cropping
    (one whole forward pass per image, or one forward pass per receptive-field crop), equals
    one autograd projection per pair, border units included."""
    monkeypatch.setattr(deconv_module, "_cost",
                        (lambda steps, size: 0.0 if size != (1, 1) else 1.0) if whole_forward
                        else (lambda steps, size: 1.0 if size != (1, 1) else 0.0))
    torch.manual_seed(4)
    x = torch.randn(3, 3, 112, 144)
    layer = "features.6"
    channels = [0, 1, 2, 3, 4, 5]
    images = [0, 0, 1, 2, 2, 1]
    positions = torch.tensor([[0, 0], [5, 7], [5, 6], [0, 7], [5, 0], [3, 3]])
    net = Deconvnet(alexnet)
    batched = net.project_many(x, layer, channels, image_indices=images, positions=positions,
                               batch_size=4)
    for p in range(len(channels)):
        single = net.project_many(x[images[p]:images[p] + 1], layer, [channels[p]],
                                  positions=positions[p:p + 1], route="autograd")
        assert_close(batched[p:p + 1], single)
    patches = net.project_patches(x, layer, channels, image_indices=images, positions=positions)
    field = vizcnn.receptive_field(alexnet, layer, (112, 144))
    assert patches.projections.shape == (6, 3, *field.size)
    for p in range(len(channels)):
        top, left, bottom, right = patches.boxes[p].tolist()
        assert torch.equal(patches.projections[p], batched[p, :, top:bottom, left:right])
        assert torch.equal(patches.images[p], x[images[p], :, top:bottom, left:right])
        # nothing outside the patch: the unit sees only its receptive field
        outside = batched[p].clone()
        outside[:, top:bottom, left:right] = 0
        assert outside.abs().max() == 0


def test_demo_projections_concentrate_in_the_receptive_field():
    """The top-9 units of layer-2 channels (from a scan of held-out shapes), projected on the
    full image by the autograd path (no cropping): >= 90 % of the absolute mass lies in the
    unit's receptive-field box."""
    model = vizcnn.load_model("demo")
    layer = "features.3"
    top = vizcnn.scan_topk(model, "shapes:100", [layer], k=9, progress=False)
    field = vizcnn.receptive_field(model, layer, 64)
    from vizcnn.scan import images_at

    for channel in [1, 4, 9]:
        units = top.units(layer, channel)
        x = images_at(model, "shapes:100", [u[1] for u in units])
        positions = torch.tensor([[u[2], u[3]] for u in units])
        projections = Deconvnet(model).project_many(x, layer, [channel] * len(units),
                                                    positions=positions, route="autograd")
        for projection, (_, _, y, x_) in zip(projections, units, strict=True):
            top_, left, bottom, right = field.box(y, x_)
            mass = projection.abs()
            assert mass[:, top_:bottom, left:right].sum() >= 0.9 * mass.sum() > 0


# --------------------------------------------------------------------------- functional ReLUs


class FunctionalChain(nn.Module):
    """TinyChain's layers, with the ReLUs applied as F.relu."""

    def __init__(self, chain: nn.Module):
        super().__init__()
        self.conv1, self.pool, self.conv2 = chain.features[0], chain.features[2], chain.features[3]

    def forward(self, x):
        return F.relu(self.conv2(self.pool(F.relu(self.conv1(x), inplace=True))))


def test_functional_relus_are_rectified_and_warned_about():
    chain = _tiny_chain()
    functional = FunctionalChain(chain).eval()
    x = torch.randn(2, 3, 23, 31)
    with pytest.warns(RectificationWarning,
                      match=r"FunctionalChain: .*rectified its signal at F\.relu x1"):
        result = Deconvnet(functional).project(x, "conv2", 2)
    # the same layers with ReLU modules, through the explicit path: the paper's operations
    assert_close(result, Deconvnet(chain).project(x, "features.3", 2, route="explicit"))


def test_googlenet_warns_by_name():
    model = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=False).eval()
    with pytest.warns(RectificationWarning, match="GoogLeNet"):
        Deconvnet(model).project(torch.randn(1, 3, 64, 64), "inception3a", 3)
    assert hooks_left(model) == []


def test_module_relus_do_not_warn(alexnet):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RectificationWarning)
        Deconvnet(alexnet).project(torch.randn(1, 3, 64, 64), "features.3", 1, route="autograd")


# --------------------------------------------------------------------------- safety and errors


class Bomb(nn.Identity):
    """Passes its input on, and raises once armed: a forward pass that fails midway."""

    armed = False

    def forward(self, x):
        if self.armed:
            raise RuntimeError("boom")
        return x


@pytest.mark.parametrize("route", ["explicit", "autograd"])
def test_no_hook_left_and_model_unchanged_after_errors(route):
    model = copy.deepcopy(_tiny_chain()).train()
    model.features.insert(1, Bomb())
    before = snapshot(model)
    net = Deconvnet(model)
    x = torch.randn(1, 3, 23, 31)
    net.project(x, "features.4", 0, route=route)
    assert model.training and all(m.training for m in model.modules())
    assert_unchanged(model, before)
    Bomb.armed = True
    try:
        with pytest.raises(RuntimeError, match="boom"):
            net.project(x, "features.4", 0, route=route)
    finally:
        Bomb.armed = False
    assert_unchanged(model, before)


def test_bad_arguments_are_one_line_errors(alexnet):
    net = Deconvnet(alexnet)
    x = torch.randn(1, 3, 64, 64)
    with pytest.raises(vizcnn.LayerNotFound, match="did you mean 'features.10'"):
        net.project(x, "features.100", 0)
    with pytest.raises(vizcnn.BadArgument, match="channel 256 out of range.*256 channels"):
        net.project(x, "features.10", 256)
    with pytest.raises(vizcnn.BadArgument, match="channel -1 out of range"):
        net.project(x, "features.10", -1)
    with pytest.raises(vizcnn.BadArgument, match="mode must be 'max' or 'map'"):
        net.project(x, "features.10", 0, mode="mean")
    with pytest.raises(vizcnn.BadArgument, match="expected an image batch"):
        net.project(x[0], "features.10", 0)
    with pytest.raises(vizcnn.BadArgument, match="outside"):
        net.project_many(x, "features.10", [0], positions=torch.tensor([[3, 30]]))
    for error in (vizcnn.LayerNotFound("a", "b"), vizcnn.BadArgument("a", "b")):
        assert "\n" not in str(error)
    assert hooks_left(alexnet) == []


# --------------------------------------------------------------------------- cropped autograd


def captum_at(model: nn.Module, x: torch.Tensor, layer: str, channel: int, y: int, x_: int
              ) -> torch.Tensor:
    """Captum's NeuronDeconvolution at one given unit, times its activation."""
    activation = vizcnn.activations(model, x, [layer])[layer][0, channel, y, x_]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gradient = NeuronDeconvolution(model, resolve_layer(model, layer)).attribute(
            x, neuron_selector=(channel, y, x_))
    return gradient * activation


class _Branches(nn.Module):
    """Not ours: a strided stem, an inception-like concatenation of four branches (1x1, 3x3,
    5x5 convs and a 3x3 max pool, all keeping the size), a residual add around it and a
    strided 1x1 projection; ReLU modules only, so Captum's rule is the paper's."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 5, stride=2, padding=2), nn.ReLU())
        self.branches = nn.ModuleList([
            nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 3, padding=1), nn.Conv2d(8, 4, 5, padding=2),
            nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.Conv2d(8, 4, 1))])
        self.relu = nn.ReLU()
        self.down = nn.Conv2d(16, 12, 3, stride=2, padding=1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 5))

    def forward(self, x):
        stem = self.stem(x)
        mixed = torch.cat([branch(stem) for branch in self.branches], dim=1)
        return self.head(self.down(self.relu(mixed + torch.cat([stem, stem], dim=1))))


@pytest.mark.parametrize("net_name", ["resnet18", "branches"])
def test_cropped_autograd_projections_equal_captum(net_name, request):
    """Units at every border and inside, each projected on its receptive field's crop, equal
    Captum's whole-image projection; the result says the route was cropped."""
    if net_name == "branches":
        torch.manual_seed(9)
        model, layers, size = _Branches().eval(), ["down"], (61, 70)
    else:
        model, layers, size = request.getfixturevalue("resnet18"), ["layer1.1", "layer2.1"], \
            (112, 128)
    torch.manual_seed(10)
    x = torch.randn(2, 3, *size)
    net = Deconvnet(model)
    for layer in layers:
        height, width = vizcnn.activations(model, x[:1], [layer])[layer].shape[-2:]
        units = [(0, 0), (0, width - 1), (height - 1, 0), (height - 1, width - 1),
                 (height // 2, width // 2), (1, width // 2), (height // 2, width - 2)]
        positions = torch.tensor(units * 2)
        images = [0] * len(units) + [1] * len(units)
        channels = [(3 * p) % 12 for p in range(len(positions))]
        patches = net.project_patches(x, layer, channels, image_indices=images,
                                      positions=positions)
        assert patches.route == "autograd, cropped"
        whole = net.project_many(x, layer, channels, image_indices=images, positions=positions)
        for p, (y, x_) in enumerate(positions.tolist()):
            reference = captum_at(model, x[images[p]:images[p] + 1], layer, channels[p], y, x_)
            assert_close(whole[p:p + 1], reference)
            top, left, bottom, right = patches.boxes[p].tolist()
            assert torch.equal(patches.projections[p], whole[p, :, top:bottom, left:right])
    assert hooks_left(model) == []


def test_crops_are_refused_where_an_operation_is_not_local():
    from vizcnn.geometry import crop_blocker

    class Excite(nn.Module):  # squeeze-and-excitation: every unit sees the whole image
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(4, 4, 1), nn.Sigmoid())
            self.out = nn.Conv2d(4, 4, 3)

        def forward(self, x):
            y = self.conv(x)
            return self.out(y * self.gate(y))

    model = Excite().eval()
    assert crop_blocker(model, "conv", (40, 40)) is None
    assert crop_blocker(model, "out", (40, 40)) == "adaptive_avg_pool2d"
    ceil = nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(3, 2, ceil_mode=True),
                         nn.Conv2d(4, 4, 3)).eval()
    assert crop_blocker(ceil, "2", (41, 41)) == "a ceil-mode max_pool2d"
    x = torch.randn(1, 3, 40, 40)
    # Captum's rule here: the sigmoid keeps its gradient, as Captum leaves it unhooked
    with pytest.warns(RectificationWarning, match="Sigmoid x1"):
        patches = Deconvnet(model).project_patches(x, "out", [1], rectify="captum")
    assert patches.route == "autograd"
    strongest = vizcnn.activations(model, x, ["out"])["out"][0, 1]
    reference = captum_at(model, x, "out", 1, *divmod(int(strongest.flatten().argmax()),
                                                      strongest.shape[-1]))
    top, left, bottom, right = patches.boxes[0].tolist()
    assert_close(patches.projections[0:1], reference[:, :, top:bottom, left:right])


def test_projections_sharing_an_image_share_its_forward_pass(resnet18):
    """Fields wider than the image (layer3 at 64 x 80): no crop saves anything, so the
    projections of each image run from one forward pass, backward one by one; they equal
    Captum's, in both modes."""
    torch.manual_seed(11)
    x = torch.randn(2, 3, 64, 80)
    net = Deconvnet(resnet18)
    channels, images = [1, 5, 9, 2, 6], [0, 0, 0, 1, 1]
    patches = net.project_patches(x, "layer3", channels, image_indices=images)
    assert patches.route == "autograd, one forward pass per image"
    projected = net.project_many(x, "layer3", channels, image_indices=images)
    for p, (channel, image) in enumerate(zip(channels, images, strict=True)):
        assert_close(projected[p:p + 1], captum_projection(resnet18, x[image:image + 1],
                                                           "layer3", channel))
    whole = net.project_many(x, "layer3", channels, image_indices=images, mode="map")
    alone = torch.cat([net.project(x[i:i + 1], "layer3", c, mode="map")
                       for c, i in zip(channels, images, strict=True)])
    assert_close(whole, alone)
    assert hooks_left(resnet18) == []
