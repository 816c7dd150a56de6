"""Feature visualization (vizcnn.featvis): checked against closed forms (a single conv layer's
optimal image), hand-built nets whose rectifiers are all off, the same channel alone and in a
batch, and the usual contracts (model unchanged, no hook left, one-line refusals)."""

from __future__ import annotations

import json
import threading

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_unchanged, hooks_left, snapshot
from torch import nn

import vizcnn
from vizcnn.errors import BadArgument, LayerNotFound
from vizcnn.featvis import TransformRecipe, feature_visualization

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _described(model: nn.Module, size: int, mean, std) -> nn.Module:
    return vizcnn.with_model_info(model, preprocessing=vizcnn.Preprocessing(
        resize=(size, size), crop=None, mean=mean, std=std))


# --------------------------------------------------------------------------- closed form


@pytest.mark.parametrize("channels", [1, 3])
def test_single_conv_reaches_its_closed_form_optimum(channels):
    """The pixel image in [0, 1] that maximizes a unit of one conv layer is 1 where the
    filter's weight in pixel space (w / std) is positive and 0 where it is negative."""
    torch.manual_seed(0)
    conv = nn.Conv2d(channels, 4, 5)
    nn.init.normal_(conv.weight)
    mean, std = [0.5, 0.4, 0.6][:channels], [0.25, 0.2, 0.3][:channels]
    model = _described(nn.Sequential(conv), 9, mean, std)
    result = feature_visualization(model, "0", objective="neuron", transforms="none",
                                   steps=384, lr=0.1, decorrelate=False, progress=False)
    mean_t, std_t = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)
    w = conv.weight.detach() / std_t
    optimum = ((w.clamp_min(0) * (1 - mean_t)).sum((1, 2, 3))
               + (w.clamp_max(0) * (0 - mean_t)).sum((1, 2, 3)) + conv.bias.detach())
    reached = result.activation[:, 0]
    assert torch.all(reached <= optimum + 1e-4)  # nothing beats the closed form
    assert torch.all(reached >= 0.95 * optimum), (reached / optimum)
    # the image itself: bright where the weight is positive, dark where negative (the centre
    # unit of the 5x5 map sees pixels 2..6)
    seen = result.images[:, 0, :, 2:7, 2:7]
    strong = w.abs() > 0.3 * w.abs().amax()
    assert torch.all((seen > 0.5)[strong] == (w > 0)[strong])


# --------------------------------------------------------------------------- dead starts


class _AllOff(nn.Module):
    """conv -> ReLU -> conv, the first conv's bias -1: every rectifier is off on a grey
    image (and on the starting noise), so the ordinary gradient is exactly zero. Channel 0 of
    the second conv can fire (positive weights); channel 1 cannot (negative weights and
    bias on non-negative inputs)."""

    def __init__(self, functional: bool):
        super().__init__()
        self.functional = functional
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4, 2, 3, padding=1)
        with torch.no_grad():
            self.conv1.bias.fill_(-1.0)
            self.conv2.weight[0] = self.conv2.weight[0].abs()
            self.conv2.weight[1] = -self.conv2.weight[1].abs()
            self.conv2.bias.copy_(torch.tensor([-0.01, -0.01]))

    def forward(self, x):
        x = self.conv1(x)
        x = F.relu(x) if self.functional else self.relu(x)
        return self.conv2(x)


@pytest.mark.parametrize("functional", [False, True])
def test_redirected_gradient_wakes_channels_whose_rectifiers_are_all_off(functional):
    torch.manual_seed(1)
    model = _described(_AllOff(functional), 16, [0.5] * 3, [0.25] * 3)
    with torch.no_grad():  # all off on grey: the premise
        grey = torch.zeros(1, 3, 16, 16)
        assert model.conv1(grey).max() < 0
    plain = feature_visualization(model, "conv2", objective="neuron", steps=48,
                                  redirect_steps=0, progress=False)
    assert plain.failed.tolist() == [True, True]  # no gradient: nothing moved
    assert torch.allclose(plain.curve[:, 0], plain.curve[:, -1])
    woken = feature_visualization(model, "conv2", objective="neuron", steps=48,
                                  progress=False)
    assert woken.failed.tolist() == [False, True]  # channel 1 cannot fire, and says so
    assert woken.strongest[0, 0] > 0 >= woken.strongest[1, 0]


def test_a_failed_channel_is_drawn_as_failed_not_as_a_picture():
    from vizcnn.render.figures import feature_visualization_figure

    torch.manual_seed(1)
    model = _described(_AllOff(False), 16, [0.5] * 3, [0.25] * 3)
    result = feature_visualization(model, "conv2", objective="neuron", steps=24, progress=False)
    fig = feature_visualization_figure(result)
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert texts.count("never\nfired") == 1


# --------------------------------------------------------------------------- batches, seeds


def test_a_channel_alone_equals_the_same_channel_in_a_batch(demo):
    batch = feature_visualization(demo, "features.6", [3, 40, 77, 100], steps=24,
                                  progress=False)
    alone = feature_visualization(demo, "features.6", [77], steps=24, progress=False)
    assert torch.allclose(alone.images[0], batch.images[2], atol=2e-3)
    assert torch.allclose(alone.activation[0], batch.activation[2], rtol=1e-3, atol=1e-3)
    # and chunked in twos: the same again
    chunked = feature_visualization(demo, "features.6", [3, 40, 77, 100], steps=24,
                                    batch_size=2, progress=False)
    assert torch.allclose(chunked.images, batch.images, atol=2e-3)


def test_the_same_seed_gives_the_same_images_another_seed_others(demo):
    first = feature_visualization(demo, "features.3", [0, 5], steps=8, progress=False)
    again = feature_visualization(demo, "features.3", [0, 5], steps=8, progress=False)
    other = feature_visualization(demo, "features.3", [0, 5], steps=8, seed=1, progress=False)
    assert torch.equal(first.images, again.images)
    assert not torch.allclose(first.images, other.images)


def test_result_shapes_range_and_save(demo, tmp_path):
    result = feature_visualization(demo, "features.10", [1, 2], n=2, diversity=1.0, steps=8,
                                   progress=False)
    assert result.images.shape == (2, 2, 3, 64, 64)
    assert float(result.images.min()) >= 0 and float(result.images.max()) <= 1
    assert result.activation.shape == result.strongest.shape == (2, 2)
    assert result.curve.shape == (2, 8)
    assert not torch.allclose(result.images[:, 0], result.images[:, 1])
    folder = result.save(tmp_path / "fv")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["channels"] == [1, 2] and manifest["recipe"]["steps"] == 8
    assert sorted(p.name for p in folder.glob("*.png")) == [
        "image_1_0.png", "image_1_1.png", "image_2_0.png", "image_2_1.png"]
    assert (folder / "featvis.pt").exists()


def test_diversity_pushes_the_images_of_a_channel_apart(demo):
    def spread(weight: float) -> float:
        result = feature_visualization(demo, "features.8", [5], n=3, diversity=weight,
                                       steps=48, progress=False)
        images = result.images[0].flatten(1)
        return float(torch.cdist(images, images).sum())

    assert spread(20.0) > spread(0.0)


def test_transforms_scale_with_the_image_size():
    small, large = TransformRecipe.for_size((64, 64)), TransformRecipe.for_size((224, 224))
    assert large == TransformRecipe()  # Lucid's own numbers at 224 px
    assert small.pad == pytest.approx(12 * 64 / 224)
    assert small.jitter == pytest.approx(8 * 64 / 224)
    assert small.scale == large.scale and small.degrees == large.degrees


# --------------------------------------------------------------------------- networks unlike ours


class _Unlike(nn.Module):
    """PReLU, GELU (a function), LeakyReLU, a ceil-mode pool, 1 or 4 input channels."""

    def __init__(self, channels_in: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, 8, 5, stride=2, padding=2)
        self.act1 = nn.PReLU(8)
        self.pool = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1)
        self.conv3 = nn.Conv2d(12, 6, 3)
        self.act3 = nn.LeakyReLU(0.1)

    def forward(self, x):
        x = self.pool(self.act1(self.conv1(x)))
        return self.act3(self.conv3(F.gelu(self.conv2(x))))


@pytest.mark.parametrize("channels_in", [1, 4])
def test_networks_unlike_ours_odd_sizes_and_channel_counts(channels_in):
    torch.manual_seed(2)
    model = _described(_Unlike(channels_in), 37, [0.3] * channels_in, [0.2] * channels_in)
    result = feature_visualization(model, "conv3", steps=32, progress=False)
    assert result.images.shape == (6, 1, channels_in, 37, 37)
    assert not result.recipe.decorrelate
    grey = torch.zeros(1, channels_in, 37, 37)  # the grey image, normalised
    with torch.no_grad():
        start = (model.conv3(F.gelu(model.conv2(model.pool(model.act1(model.conv1(
            (grey + 0.5 - 0.3) / 0.2))))))).mean(dim=(2, 3))[0]
    assert torch.all(result.activation[:, 0] > start)  # every channel went up


def test_class_objective_with_a_tuple_output_and_class_names():
    from helpers import tuple_net

    model = vizcnn.with_model_info(tuple_net(), preprocessing=vizcnn.Preprocessing(
        resize=(32, 32), crop=None, mean=[0.5] * 3, std=[0.25] * 3),
        classes=tuple("abcdef"))
    before = snapshot(model)
    result = feature_visualization(model, None, objective="class", classes=["c", 5],
                                   output=0, steps=16, progress=False)
    assert result.channels.tolist() == [2, 5] and result.layer == "output"
    with torch.no_grad():
        scores = model((result.images[:, 0] - 0.5) / 0.25)[0]
        start = model(torch.zeros(1, 3, 32, 32))[0][0]
    assert torch.allclose(result.activation[:, 0], scores[[0, 1], [2, 5]], atol=1e-4)
    assert scores[0, 2] > start[2] and scores[1, 5] > start[5]
    assert_unchanged(model, before)


# --------------------------------------------------------------------------- the model as it was


class _Bomb(nn.Module):
    """Identity, until its ``calls``-th call, which raises ``error``."""

    def __init__(self, calls: int, error: BaseException):
        super().__init__()
        self.calls, self.error, self.seen = calls, error, 0

    def forward(self, x):
        self.seen += 1
        if self.seen == self.calls:
            raise self.error
        return x


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_model_unchanged_after_an_error_or_ctrl_c_mid_optimization(demo, error):
    model = vizcnn.load_model("demo")
    model.train()  # the user's mode must come back too
    model.features.insert(4, _Bomb(30, error))
    vizcnn.with_model_info(model, vizcnn.model_info(demo))
    before = snapshot(model)
    with pytest.raises(type(error)):
        feature_visualization(model, "features.7", [0, 1], steps=40, progress=False)
    assert_unchanged(model, before)
    assert not torch._C._is_torch_function_mode_enabled()


def test_ten_calls_leave_no_hook_and_the_model_bit_identical(demo):
    before = snapshot(demo)
    for _ in range(10):
        feature_visualization(demo, "features.3", [0], steps=2, progress=False)
    assert_unchanged(demo, before)
    assert hooks_left(demo) == []


def test_interrupted_save_leaves_nothing(demo, tmp_path, monkeypatch):
    import vizcnn.render.grid as grid

    result = feature_visualization(demo, "features.0", [0, 1], steps=2, progress=False)
    calls = threading.local()
    calls.n = 0

    def failing(path, rgb, quality=90):
        calls.n += 1
        if calls.n == 2:
            raise OSError(28, "No space left on device")
        return original(path, rgb, quality)

    original = grid.write_image
    monkeypatch.setattr(grid, "write_image", failing)
    with pytest.raises(OSError):
        result.save(tmp_path / "fv")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("call, expected", [
    (lambda m: feature_visualization(m, "features.99"), LayerNotFound),
    (lambda m: feature_visualization(m, "features.3", [96]), "channel 96 out of range"),
    (lambda m: feature_visualization(m, "features.3", steps=0), "steps must be"),
    (lambda m: feature_visualization(m, "features.3", n=0), "n must be"),
    (lambda m: feature_visualization(m, None, objective="class", classes=["hexagon"]),
     "hexagon"),
    (lambda m: feature_visualization(m, "features.3", objective="sharpness"),
     "unknown objective"),
    (lambda m: feature_visualization(m, "features.3", lr=float("nan")), "lr must be"),
    (lambda m: feature_visualization(m, "features.3", objective="neuron", unit=(40, 0)),
     "outside"),
])
def test_bad_arguments_are_one_line_errors(demo, call, expected):
    kind = expected if isinstance(expected, type) else BadArgument
    with pytest.raises(kind) as caught:
        call(demo)
    assert "\n" not in str(caught.value)
    if isinstance(expected, str):
        assert expected in str(caught.value)


def test_unknown_normalisation_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with pytest.raises(BadArgument, match="normalisation"):
        feature_visualization(model, "0", size=16)


def test_a_layer_without_channels_is_refused():
    class Pair(nn.Module):
        def forward(self, x):
            return x, x

    model = _described(nn.Sequential(nn.Conv2d(3, 4, 3), Pair()), 16, [0.5] * 3, [0.25] * 3)
    with pytest.raises(BadArgument, match="no spatial output"):
        feature_visualization(model, "1", steps=2)


def test_bad_input_through_the_cli_is_one_line_and_writes_nothing(capfd, tmp_path):
    from helpers import one_channel_net, pair_net
    from test_hostile import refused

    out = tmp_path / "fv.png"
    for argv, expected in [
        (["--layer", "features.3", "--channels", "200"], "channel 200 out of range"),
        (["--layer", "features.3", "--steps", "0"], "--steps must be a positive integer"),
        (["--layer", "features.3", "--n", "0"], "--n must be a positive integer"),
        (["--objective", "class", "--class", "hexagon"], "hexagon"),
        (["--objective", "class"], "--class"),
        (["--layer", "features.99"], "not found"),
    ]:
        refused(capfd, "visualize", "demo", *argv, "--out", out, expected=expected,
                output=out)
    weights = tmp_path / "gray.pth"
    torch.save(one_channel_net().state_dict(), weights)
    refused(capfd, "visualize", weights, "--arch", "helpers:one_channel_net", "--layer", "0",
            "--size", "32", "--out", out, expected="--mean and --std", output=out)
    weights = tmp_path / "pair.pth"
    torch.save(pair_net().state_dict(), weights)
    refused(capfd, "visualize", weights, "--arch", "helpers:pair_net", "--layer", "1",
            "--mean", "0.5", "--std", "0.25", "--size", "16", "--out", out,
            expected="no spatial output", output=out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gray.pth", "pair.pth"]


def test_the_cli_writes_png_pdf_and_svg(capsys, tmp_path):
    from vizcnn.cli import main

    for suffix in ("png", "pdf", "svg"):
        out = tmp_path / f"fv.{suffix}"
        assert main(["visualize", "demo", "--layer", "features.0", "--channels", "0-3",
                     "--steps", "4", "--out", str(out)]) == 0
        assert out.stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "4 feature visualization(s) of features.0, 4 steps" in printed


def test_in_place_activations_of_other_kinds_take_the_redirected_gradient():
    """LeakyReLU, ReLU6 (hardtanh) and ELU in place, the first conv's units all off at the
    start: the redirect runs them out of place (autograd keeps its inputs) and wakes them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU6(inplace=True), nn.Conv2d(8, 8, 3),
                          nn.LeakyReLU(0.1, inplace=True), nn.Conv2d(8, 8, 3),
                          nn.ELU(inplace=True), nn.Conv2d(8, 4, 3))
    with torch.no_grad():
        model[0].bias.fill_(-1.0)
        model[6].weight.abs_()
    model = _described(model, 24, [0.5] * 3, [0.25] * 3)
    before = snapshot(model)
    asleep = feature_visualization(model, "6", steps=48, redirect_steps=0, progress=False)
    woken = feature_visualization(model, "6", steps=48, progress=False)
    assert torch.all(woken.activation[:, 0] > asleep.activation[:, 0])
    assert_unchanged(model, before)
