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


def test_both_routes_equal_captum_on_resnet18(resnet18):
    """Residual adds: the explicit route goes down the traced graph, the autograd route
    through the model's own backward pass; both equal Captum's."""
    torch.manual_seed(2)
    x = torch.randn(2, 3, 64, 80)
    net = Deconvnet(resnet18)
    for layer, channel in [("layer1", 3), ("layer2.1.conv1", 7), ("layer3", 11)]:
        reference = captum_projection(resnet18, x, layer, channel)
        assert reference.abs().max() > 0
        for route in ("explicit", "autograd"):
            assert_close(net.project(x, layer, channel, route=route), reference)
        assert_close(net.project(x, layer, channel, mode="map", route="explicit"),
                     net.project(x, layer, channel, mode="map", route="autograd"))
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


@pytest.mark.parametrize(("route", "label"), [("autograd", "autograd, cropped"),
                                              ("explicit", "explicit graph, each unit's cone")])
@pytest.mark.parametrize("net_name", ["resnet18", "branches"])
def test_cropped_projections_equal_captum(net_name, route, label, request):
    """Units at every border and inside, each projected on its receptive field's crop
    (autograd) or down its cone (the explicit route on the traced graph), equal Captum's
    whole-image projection; the result says which route ran."""
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
                                      positions=positions, route=route)
        assert patches.route == label
        whole = net.project_many(x, layer, channels, image_indices=images, positions=positions,
                                 route=route)
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
    patches = net.project_patches(x, "layer3", channels, image_indices=images,
                                  route="autograd")
    assert patches.route == "autograd, one forward pass per image"
    projected = net.project_many(x, "layer3", channels, image_indices=images, route="autograd")
    for p, (channel, image) in enumerate(zip(channels, images, strict=True)):
        assert_close(projected[p:p + 1], captum_projection(resnet18, x[image:image + 1],
                                                           "layer3", channel))
    whole = net.project_many(x, "layer3", channels, image_indices=images, mode="map",
                             route="autograd")
    alone = torch.cat([net.project(x[i:i + 1], "layer3", c, mode="map", route="autograd")
                       for c, i in zip(channels, images, strict=True)])
    assert_close(whole, alone)
    assert hooks_left(resnet18) == []


# --------------------------------------------------------------------------- the traced graph


class _Unlike(nn.Module):
    """Nothing like our networks: grouped and dilated convs, PReLU, a functional in-place
    leaky ReLU, GELU, batch norm, a padded ceil-mode max pool, a subtraction, scaling by
    numbers, an add of a map to itself, concatenations and eval-mode dropout."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 5, stride=2, padding=1), nn.BatchNorm2d(8),
                                  nn.PReLU(8))
        self.pool = nn.MaxPool2d(3, 2, padding=1, ceil_mode=True)
        self.grouped = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2)
        self.wide = nn.Conv2d(8, 4, 3, padding=1)
        self.gelu = nn.GELU()
        self.drop = nn.Dropout(0.5)
        self.out = nn.Conv2d(24, 6, 3, stride=2)

    def forward(self, x):
        stem = self.pool(self.stem(x))
        a = F.leaky_relu(self.grouped(stem), 0.1, inplace=True)
        b = self.gelu(self.wide(stem))
        return self.out(torch.cat([a - 0.5 * stem, b / 2, self.drop(b + b), a], dim=1))


def _randomised(model: nn.Module, seed: int) -> nn.Module:
    """The model in eval mode with random batch-norm statistics (not the identity)."""
    torch.manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
    return model.eval()


def test_graph_route_equals_autograd_on_a_network_unlike_ours():
    """Every op the explicit graph route knows, at units on every border of an odd-sized
    input, in both modes: the same numbers as the model's own rectified backward pass."""
    model = _randomised(_Unlike(), 12)
    torch.manual_seed(13)
    x = torch.randn(3, 3, 67, 53)
    net = Deconvnet(model)
    before = snapshot(model)
    height, width = vizcnn.activations(model, x[:1], ["out"])["out"].shape[-2:]
    units = [(0, 0), (0, width - 1), (height - 1, 0), (height - 1, width - 1),
             (height // 2, width // 2)]
    positions = torch.tensor(units * 3)
    images = [i for i in range(3) for _ in units]
    channels = [p % 6 for p in range(len(positions))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RectificationWarning)
        patches = net.project_patches(x, "out", channels, image_indices=images,
                                      positions=positions)
        assert patches.route == "explicit graph, each unit's cone"
        for mode, where in (("max", positions), ("map", None)):
            explicit = net.project_many(x, "out", channels, image_indices=images,
                                        positions=where, mode=mode, route="explicit")
            autograd = net.project_many(x, "out", channels, image_indices=images,
                                        positions=where, mode=mode, route="autograd")
            for p in range(len(channels)):
                assert autograd[p].abs().max() > 0
                assert_close(explicit[p], autograd[p])
        whole = net.project_many(x, "out", channels, image_indices=images, positions=positions)
    for p in range(len(channels)):
        top, left, bottom, right = patches.boxes[p].tolist()
        assert torch.equal(patches.projections[p], whole[p, :, top:bottom, left:right])
    assert_unchanged(model, before)
    assert hooks_left(model) == []


class _Gated(nn.Module):
    """Ops the explicit route cannot go down through: ``how`` picks one."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.GELU()
        self.gate = nn.Conv2d(4, 4, 1)
        self.out = nn.Conv2d(4, 4, 3)

    def forward(self, x):
        y = self.act(self.conv(x))
        if self.how == "avg":
            y = F.avg_pool2d(y, 2)
        elif self.how == "gate":  # a map times a map
            y = y * torch.sigmoid(self.gate(y))
        elif self.how == "slice":
            y = torch.cat([y[:, :2], y[:, 2:]], dim=1)
        return self.out(y)


@pytest.mark.parametrize(("how", "rectify", "blocker"), [
    ("avg", "all", "avg_pool2d"), ("gate", "all", "mul"), ("slice", "all", "__getitem__"),
    ("none", "captum", "gelu")])
def test_graph_route_names_what_it_cannot_take(how, rectify, blocker):
    """An op off the explicit route's list is named when the route is asked for, and "auto"
    then takes the autograd route, whose numbers the explicit route would have had to match."""
    model = _Gated(how).eval()
    x = torch.randn(1, 3, 20, 22)
    net = Deconvnet(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RectificationWarning)
        with pytest.raises(vizcnn.BadArgument, match=blocker):
            net.project(x, "out", 1, route="explicit", rectify=rectify)
        patches = net.project_patches(x, "out", [1], rectify=rectify)
        assert patches.route.startswith("autograd")
        assert_close(net.project(x, "out", 1, rectify=rectify),
                     net.project(x, "out", 1, rectify=rectify, route="autograd"))
    assert hooks_left(model) == []


@pytest.mark.parametrize("net_name", ["resnet18", "branches", "unlike"])
def test_graph_fields_equal_receptive_fields(net_name, request):
    """The traced graph's fields (which place the patches of its projections) are the
    receptive fields that ``receptive_fields`` measures: size, offset and jump."""
    from vizcnn.deconv_graph import record_graph
    from vizcnn.geometry import trace_calls
    from vizcnn.receptive import receptive_fields

    cases = {"resnet18": (lambda: request.getfixturevalue("resnet18"),
                          ["layer1.1", "layer2.1", "layer3.0"], (112, 128)),
             "branches": (lambda: _Branches().eval(), ["down"], (61, 70)),
             "unlike": (lambda: _randomised(_Unlike(), 12), ["out"], (67, 53))}
    make, layers, size = cases[net_name]
    model = make()
    names = [call.name for call in trace_calls(model, size)]
    for layer in layers:
        graph = record_graph(model, torch.zeros(1, 3, *size), layer, names, rectify_all=True)
        field = receptive_fields(model, [layer], size)[layer]
        (first, extent), (second, _) = graph.field((0, 0)), graph.field((1, 1))
        assert extent == field.size
        assert first == field.offset
        assert tuple(b - a for a, b in zip(first, second, strict=True)) == field.jump


@pytest.mark.parametrize("route", ["explicit", "autograd"])
def test_known_activations_give_the_same_projections(resnet18, route):
    """A top-k scan's activations given with its positions: the same projections as when
    the activations are recomputed, on both routes; on the explicit graph route no forward
    pass goes past the last max pool (layer1 never sees the batch)."""
    torch.manual_seed(14)
    x = torch.randn(3, 3, 64, 80)
    top = vizcnn.scan_topk(resnet18, x, ["layer3.0"], k=2, progress=False)
    channels = torch.arange(6).repeat_interleave(2)
    args = dict(image_indices=top.indices["layer3.0"][:6].flatten(),
                positions=top.positions["layer3.0"][:6].reshape(-1, 2), route=route)
    net = Deconvnet(resnet18)
    computed = net.project_many(x, "layer3.0", channels, **args)
    batches = []
    handle = resnet18.layer1.register_forward_hook(
        lambda module, inputs, output: batches.append(len(inputs[0])))
    try:
        known = net.project_many(x, "layer3.0", channels,
                                 activations=top.values["layer3.0"][:6].flatten(), **args)
    finally:
        handle.remove()
    for p in range(len(channels)):
        assert computed[p].abs().max() > 0
        assert_close(known[p], computed[p])
    if route == "explicit":
        assert batches and max(batches) == 1  # the trace and the probe, on one zero image
    else:
        assert max(batches) > 1


def test_bad_activations_are_refused(resnet18):
    x = torch.randn(2, 3, 64, 64)
    net = Deconvnet(resnet18)
    positions = torch.tensor([[0, 0], [1, 1]])
    for kwargs, match in [(dict(positions=positions, activations=[1.0]), "1 activations"),
                          (dict(positions=positions, activations=[1.0, float("nan")]),
                           "not a finite"),
                          (dict(activations=[1.0, 2.0]), "positions"),
                          (dict(positions=positions, activations=[1.0, 2.0], mode="map"),
                           "positions")]:
        with pytest.raises(vizcnn.BadArgument, match=match):
            net.project_many(x, "layer2", [0, 1], **kwargs)
    assert hooks_left(resnet18) == []


def test_top_patches_trusts_a_scan_of_these_weights_only(resnet18):
    """top_patches projects with the scan's activations when the scan saw these weights, and
    recomputes them otherwise: a TopK whose values were made up (another fingerprint) still
    gives the model's true projections."""
    import dataclasses

    torch.manual_seed(15)
    x = torch.randn(3, 3, 64, 64)
    top = vizcnn.scan_topk(resnet18, x, ["layer3.1"], k=2, progress=False)
    made_up = dataclasses.replace(top, fingerprint="someone else's",
                                  values={"layer3.1": top.values["layer3.1"] * 5})
    truth = vizcnn.top_patches(resnet18, top, x, "layer3.1", channels=[0, 3])
    for other in (vizcnn.top_patches(resnet18, made_up, x, "layer3.1", channels=[0, 3]),):
        assert_close(other.projections, truth.projections)
    reference = captum_at(resnet18, x[int(top.indices["layer3.1"][3, 0])][None], "layer3.1", 3,
                          *top.positions["layer3.1"][3, 0].tolist())
    top_, left, bottom, right = truth.boxes[1, 0].tolist()
    assert_close(truth.projections[1, 0], reference[0, :, top_:bottom, left:right])


@pytest.mark.parametrize("net_name", ["resnet18", "branches"])
def test_one_unit_in_several_images_equals_captum(net_name, request):
    """The same channel and position in several images: the images share the signal down to
    the first max pool (ResNet18's stem; in the branches net a pool inside one branch), then
    part; each projection still equals Captum's for its own image."""
    if net_name == "branches":
        torch.manual_seed(9)
        model, layer, size = _Branches().eval(), "down", (61, 70)
    else:
        model, layer, size = request.getfixturevalue("resnet18"), "layer3.0", (64, 80)
    torch.manual_seed(16)
    x = torch.randn(3, 3, *size)
    weakest = vizcnn.activations(model, x, [layer])[layer].amin(dim=0)  # (C, h, w)
    # strong units in all three images (a weak one's activation carries the rounding of the
    # forward pass at another batch size, larger than the tolerance in relative terms)
    strongest = weakest.flatten(1).max(dim=1)
    first, second, third = strongest.values.argsort(descending=True)[:3].tolist()
    width = weakest.shape[-1]

    def unit(channel: int) -> list[int]:
        return list(divmod(int(strongest.indices[channel]), width))

    channels, images = [first] * 3 + [second] * 2 + [third], [0, 1, 2, 0, 2, 1]
    positions = torch.tensor([unit(c) for c in channels])
    projected = Deconvnet(model).project_many(x, layer, channels, image_indices=images,
                                              positions=positions, route="explicit")
    for p, (y, x_) in enumerate(positions.tolist()):
        reference = captum_at(model, x[images[p]:images[p] + 1], layer, channels[p], y, x_)
        assert reference.abs().max() > 0
        assert_close(projected[p:p + 1], reference)
    assert not torch.allclose(projected[0], projected[1])  # the switches differ
