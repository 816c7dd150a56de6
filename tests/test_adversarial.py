"""Adversarial and invariance probes: closed forms, Captum, bounds (property-based), strength,
the model left as it was, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from captum.robust import FGSM
from helpers import assert_unchanged, hooks_left, snapshot
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import vizcnn
from vizcnn.cli import main
from vizcnn.data.shapes import HELD_OUT_SEED, ShapesDataset
from vizcnn.probes.adversarial import excite, fgsm, layer_displacement, lbfgs_adversarial, pgd
from vizcnn.probes.invariance import invariance, transform_image


class Tiny(nn.Module):
    def __init__(self, classes: int = 4):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(),
                                      nn.MaxPool2d(2))
        self.head = nn.Linear(6, classes)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


def tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Tiny().eval()


@pytest.fixture(scope="module")
def shapes_batch(demo):
    dataset = ShapesDataset(60, seed=HELD_OUT_SEED)
    return torch.cat([vizcnn.preprocess(demo, dataset.render(i).image) for i in range(60)])


def normalised(mean, std) -> vizcnn.Preprocessing:
    """A model's normalisation record (mean and std of pixels in [0, 1]), size kept."""
    return vizcnn.Preprocessing(resize=None, crop=None, mean=tuple(mean), std=tuple(std))


@pytest.mark.parametrize("targeted", [False, True])
def test_fgsm_is_the_closed_form_sign_step(targeted):
    model = tiny()
    torch.manual_seed(1)
    pixels = torch.rand(3, 3, 12, 10)
    mean, std = torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.3, 0.25])
    x = (pixels - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    eps = 0.05
    labels = torch.tensor([1, 2, 3]) if targeted else model(x).argmax(1)
    p = pixels.clone().requires_grad_(True)
    loss = F.cross_entropy(model((p - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)), labels)
    (grad,) = torch.autograd.grad(loss, p)
    step = -eps * grad.sign() if targeted else eps * grad.sign()
    expected = (pixels + step).clamp(0, 1)
    result = fgsm(model, x, eps, target=labels if targeted else None,
                  preprocessing=normalised(mean.tolist(), std.tolist()))
    assert torch.allclose(result.perturbation + pixels, expected, atol=1e-6)
    assert torch.allclose(result.x * std.view(1, 3, 1, 1) + mean.view(1, 3, 1, 1), expected,
                          atol=1e-5)


def test_fgsm_equals_captum_on_an_unnormalised_model():
    model = tiny(3)
    torch.manual_seed(2)
    pixels = torch.rand(4, 3, 9, 9)
    labels = model(pixels).argmax(1)
    reference = FGSM(model, loss_func=lambda out, t: F.cross_entropy(out, t, reduction="none"),
                     lower_bound=0.0, upper_bound=1.0).perturb(
                         pixels.clone().requires_grad_(True), 0.03, labels)
    result = fgsm(model, pixels, 0.03, preprocessing=normalised((0.0,) * 3, (1.0,) * 3))
    assert torch.allclose(result.x, reference, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(eps=st.floats(0.0, 0.2), height=st.integers(4, 14), width=st.integers(4, 14),
       mean=st.lists(st.floats(0.0, 1.0), min_size=3, max_size=3),
       std=st.lists(st.floats(0.05, 1.0), min_size=3, max_size=3),
       targeted=st.booleans(), seed=st.integers(0, 10))
def test_results_stay_in_the_ball_and_the_pixel_range(eps, height, width, mean, std, targeted,
                                                      seed):
    model = tiny(seed)
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.rand(2, 3, height, width, generator=generator)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    x = (pixels - m) / s
    target = 1 if targeted else None
    steps = normalised(mean, std)
    for result in (fgsm(model, x, eps, target=target, preprocessing=steps),
                   pgd(model, x, eps, steps=3, random_start=True, target=target,
                       preprocessing=steps)):
        adversarial = result.x * s + m
        assert (adversarial >= -1e-5).all() and (adversarial <= 1 + 1e-5).all()
        assert ((adversarial - pixels).abs() <= eps + 1e-5).all()
        assert (result.linf <= eps + 1e-6).all()


def test_pgd_is_at_least_as_strong_as_fgsm(demo, shapes_batch):
    before = snapshot(demo)
    for eps in (2 / 255, 4 / 255, 8 / 255):
        one_step = fgsm(demo, shapes_batch, eps).success.float().mean()
        iterated = pgd(demo, shapes_batch, eps, steps=10).success.float().mean()
        assert iterated >= one_step
    assert_unchanged(demo, before)


def test_lbfgs_finds_small_targeted_perturbations(demo, shapes_batch):
    x = shapes_batch[:3]
    target = demo(x).topk(2, dim=1).indices[:, 1]  # the default: the runner-up class
    result = lbfgs_adversarial(demo, x)
    assert result.success.all() and torch.equal(result.label, target)
    pixels = x * 0.27 + 0.5
    adversarial = result.x * 0.27 + 0.5
    assert (adversarial >= -1e-5).all() and (adversarial <= 1 + 1e-5).all()
    assert torch.allclose(result.rms, (adversarial - pixels).pow(2).flatten(1).mean(1).sqrt(),
                          atol=1e-5)
    assert (result.rms > 0).all() and (result.rms < 0.05).all()  # small: a few grey levels
    hard = lbfgs_adversarial(demo, x[2:], target=0)  # an unlikely class still works
    assert hard.success.all() and int(hard.label[0]) == 0


def test_excite_raises_the_feature_map_inside_the_ball(demo, shapes_batch):
    model = demo.train()  # a model in training mode comes back in training mode
    before = snapshot(model)
    try:
        x = shapes_batch[:6]
        for layer, channel in [("features.3", 7), ("features.6", 20), ("features.10", 5)]:
            result = excite(model, x, layer, channel, eps=4 / 255, steps=10)
            assert (result.after > result.before).all()
            assert (result.perturbation.abs() <= 4 / 255 + 1e-6).all()
            maps = vizcnn.activations(model, result.x, [layer])[layer][:, channel]
            assert torch.allclose(maps.double().sum((1, 2)), result.after, rtol=1e-4)
        assert_unchanged(model, before)
    finally:
        model.eval()


def test_layer_displacement(demo, shapes_batch):
    x = shapes_batch[:4]
    same = layer_displacement(demo, x, x.clone())
    assert list(same) == ["features.0", "features.3", "features.6", "features.8", "features.10",
                          "classifier.1", "classifier.4"]
    assert all(float(v.max()) == 0.0 for v in same.values())
    moved = layer_displacement(demo, x, pgd(demo, x, 8 / 255).x)
    assert all((v > 0).all() for v in moved.values())


@pytest.mark.parametrize("transform", ["translate", "scale", "rotate"])
def test_invariance_identity_is_exact(demo, transform):
    image = ShapesDataset(1, seed=HELD_OUT_SEED).render(0).image
    identity = {"translate": 0, "scale": 1.0, "rotate": 0}[transform]
    result = invariance(demo, image, transform, values=[identity, identity],
                        layers=("features.1", "classifier.2"))
    assert all(float(d.abs().max()) == 0.0 for d in result.distance.values())
    p = torch.softmax(demo(vizcnn.preprocess(demo, image)), dim=1)[0].detach()
    assert result.true_class == int(p.argmax())
    assert torch.allclose(result.prob, p[result.true_class].expand(2), atol=1e-6)
    assert hooks_left(demo) == []


def test_translation_moves_pixels():
    image = np.zeros((8, 8, 3), np.uint8)
    image[2, 2] = 255
    shifted = transform_image(image, "translate", 3)
    assert shifted[2, 5, 0] == 255 and shifted[2, 2, 0] == 0


def test_bad_arguments(demo, shapes_batch):
    x = shapes_batch[:1]
    with pytest.raises(vizcnn.BadArgument, match="eps must be a number >= 0"):
        fgsm(demo, x, -0.1)
    with pytest.raises(vizcnn.BadArgument, match="more than the whole pixel range"):
        pgd(demo, x, 8)
    with pytest.raises(vizcnn.BadArgument, match="target class 8 out of range"):
        fgsm(demo, x, 0.01, target=8)
    with pytest.raises(vizcnn.BadArgument, match="steps must be a positive integer"):
        pgd(demo, x, 0.01, steps=0)
    with pytest.raises(vizcnn.BadArgument, match="steps must be a positive integer"):
        excite(demo, x, "features.3", 0, steps=-1)
    with pytest.raises(vizcnn.LayerNotFound):
        excite(demo, x, "features.33", 0)
    with pytest.raises(vizcnn.BadArgument, match="unknown transform"):
        invariance(demo, np.zeros((64, 64, 3), np.uint8), "shear", layers=("features.1",
                                                                          "classifier.2"))
    assert hooks_left(demo) == []


@pytest.mark.parametrize("argv, expected", [
    (["adversarial", "demo", "shapes:1", "--eps", "-0.1"], "eps must be a number >= 0"),
    (["adversarial", "demo", "shapes:1", "--eps", "2"], "more than the whole pixel range"),
    (["adversarial", "demo", "shapes:1", "--target", "12"], "target class 12 out of range"),
    (["adversarial", "demo", "shapes:1", "--method", "pgd", "--steps", "0"],
     "steps must be a positive integer"),
    (["excite", "demo", "shapes:1", "--layer", "features.6", "--channel", "1", "--steps", "0"],
     "steps must be a positive integer"),
    (["invariance", "demo", "shapes:1", "--true-class", "9"], "true class 9 out of range"),
])
def test_cli_mistakes(argv, expected, capsys, tmp_path):
    out = tmp_path / "x.png"
    code = main([*argv, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_cli_unknown_method_exits_2(capsys, tmp_path):
    with pytest.raises(SystemExit) as exited:
        main(["adversarial", "demo", "shapes:1", "--method", "gauss", "--out",
              str(tmp_path / "x.png")])
    assert exited.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_cli_commands_write_figures(capsys, tmp_path):
    for argv in (["adversarial", "demo", "shapes:1", "--method", "fgsm"],
                 ["excite", "demo", "shapes:1", "--layer", "features.6", "--channel", "1"],
                 ["invariance", "demo", "shapes:1"]):
        out = tmp_path / f"{argv[0]}.png"
        assert main([*argv, "--out", str(out)]) == 0
        assert out.stat().st_size > 10_000
    assert "wrote" in capsys.readouterr().out


def test_every_probe_leaves_the_model_as_it_was(shapes_batch):
    model = vizcnn.load_model("demo").train()  # training mode, parameters requiring grad
    for param in model.parameters():
        param.requires_grad_(True)
    before = snapshot(model)
    x = shapes_batch[:2]
    fgsm(model, x, 0.02)
    pgd(model, x, 0.02, steps=2)
    lbfgs_adversarial(model, x[:1], searches=1, max_iterations=3)
    excite(model, x, "features.3", 1, eps=0.02, steps=2)
    layer_displacement(model, x, x)
    invariance(model, ShapesDataset(1, seed=HELD_OUT_SEED).render(0).image, "rotate", [0, 90],
               layers=("features.1", "classifier.2"))
    assert_unchanged(model, before)
    assert model.training and all(p.grad is None for p in model.parameters())
