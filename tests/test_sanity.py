"""Sanity checks (vizcnn.sanity, Adebayo et al.): the numbers against scipy, scikit-image and
Quantus; the demo's weight-dependent pictures fall to the random networks' band; the model
left as it was; networks unlike ours; bad input through the API and the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import quantus
import torch
from helpers import assert_unchanged, snapshot, tuple_net
from scipy.stats import spearmanr
from skimage.feature import hog
from skimage.metrics import structural_similarity
from test_hostile import refused
from test_trust import state_dict_file
from torch import nn

import vizcnn
from vizcnn import BadArgument, Deconvnet, Preprocessing, sanity_check, with_model_info
from vizcnn.cli import main
from vizcnn.sanity import SEED_BASE, Pictures, check_pictures, randomizable
from vizcnn.similarity import similarities

PLAIN = Preprocessing(resize=None, crop=None, mean=(0.5,) * 3, std=(0.25,) * 3)


def _shown(picture: np.ndarray) -> np.ndarray:
    """The independent stretch: (C, H, W) -> (H, W, C) in [0, 1]."""
    low, high = picture.min(), picture.max()
    return np.moveaxis((picture.astype(np.float64) - low) / (high - low), 0, -1)


def _hog(picture: np.ndarray) -> np.ndarray:
    cell = max(2, min(picture.shape[:2]) // 8)
    return hog(picture.mean(-1), orientations=9, pixels_per_cell=(cell, cell),
               cells_per_block=(2, 2))


# --------------------------------------------------------------------------- the measures


def test_the_measures_are_scipys_and_scikit_images():
    generator = torch.Generator().manual_seed(0)
    a = torch.randint(-3, 4, (4, 3, 20, 24), generator=generator).float()  # many ties
    b = a + 2 * torch.randn(a.shape, generator=generator)
    found = similarities(a, b)
    for r in range(len(a)):
        x, y = a[r].numpy(), b[r].numpy()
        assert float(found.spearman[r]) == pytest.approx(
            spearmanr(x.ravel(), y.ravel()).statistic, abs=1e-12)
        assert float(found.spearman_abs[r]) == pytest.approx(
            spearmanr(np.abs(x).ravel(), np.abs(y).ravel()).statistic, abs=1e-12)
        sx, sy = _shown(x), _shown(y)
        assert float(found.ssim[r]) == pytest.approx(
            structural_similarity(sx, sy, data_range=1.0, channel_axis=-1), abs=1e-6)
        assert float(found.hog[r]) == pytest.approx(np.corrcoef(_hog(sx), _hog(sy))[0, 1],
                                                    abs=1e-6)
    flat = similarities(torch.zeros(1, 1, 8, 8), torch.randn(1, 1, 8, 8))
    assert all(math.isnan(float(flat.metric(m)[0])) for m in ("spearman", "ssim", "hog"))


def test_a_check_measures_its_own_pictures():
    model = vizcnn.load_model("demo")
    check = sanity_check(model, "shapes:40", "features.3", "deconv", channels=[1, 2],
                         images=2, baseline_models=2, progress=False)
    assert check.steps == ("trained", "classifier.4", "classifier.1", "features.10",
                           "features.8", "features.6", "features.3", "features.0")
    assert check.changed == (False,) * 6 + (True, True)  # the layers above: not passed through
    for s in range(1, 6):
        assert torch.equal(check.pictures[s], check.pictures[0])
    trained = check.pictures[0].numpy()
    for s, r in [(6, 0), (7, 3), (7, 1)]:
        other = check.pictures[s, r].numpy()
        assert float(check.similarity.spearman[s, r]) == pytest.approx(
            spearmanr(trained[r].ravel(), other.ravel()).statistic, abs=1e-12)
        assert float(check.similarity.ssim[s, r]) == pytest.approx(structural_similarity(
            _shown(trained[r]), _shown(other), data_range=1.0, channel_axis=-1,
            win_size=min(7, trained.shape[-1] // 2 * 2 - 1)), abs=1e-6)
    baseline = check.baseline[1, 2].numpy()
    assert float(check.baseline_similarity.spearman_abs[1, 2]) == pytest.approx(
        spearmanr(np.abs(trained[2]).ravel(), np.abs(baseline).ravel()).statistic, abs=1e-12)
    assert check.kept == ()  # every parameter of the demo is re-initialized


# --------------------------------------------------------------------------- Quantus


def test_the_cascade_is_quantus_mprt():
    """Quantus's model parameter randomisation test (MPRT: top-down, cascading, Spearman per
    sample) on the same model, inputs and explanation gives the same numbers."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.PReLU(6),
        nn.MaxPool2d(3, 2, ceil_mode=True), nn.Conv2d(6, 8, 3), nn.GELU(),
        nn.Conv2d(8, 8, 3), nn.LeakyReLU(0.1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, 5)).eval()
    with torch.no_grad():  # a "trained" batch norm: its reset must show
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    x = torch.randn(4, 3, 23, 29)
    layer, channels = "4", torch.tensor([0, 3, 5, 7])
    with vizcnn.capture(model, [layer]) as seen:
        model(x)
    maps = seen[layer][torch.arange(4), channels]
    flat = maps.flatten(1).argmax(1)
    positions = torch.stack([flat // maps.shape[-1], flat % maps.shape[-1]], 1)

    def explain(model, inputs, targets=None, **kwargs) -> np.ndarray:
        return Deconvnet(model).project_many(
            torch.as_tensor(inputs), layer, channels, positions=positions,
            activations=torch.ones(4)).detach().numpy()

    pictures = Pictures(lambda network: torch.from_numpy(explain(network, x)),
                        tuple(map(str, range(4))), None, (23, 29), False)
    check = check_pictures(model, layer, "deconv", pictures, randomizable(model), seed=0,
                           baseline_models=1)
    for absolute in (True, False):
        metric = quantus.MPRT(abs=absolute, normalise=True, layer_order="top_down",
                              seed=SEED_BASE - 1, disable_warnings=True)
        scores = metric(model=model, x_batch=x.numpy(), y_batch=np.zeros(4, dtype=int),
                        a_batch=None, explain_func=explain, device="cpu")
        ours = check.similarity.spearman_abs if absolute else check.similarity.spearman
        assert list(scores)[1:] == list(check.steps[1:])
        for s, name in enumerate(check.steps[1:], 1):
            np.testing.assert_allclose(ours[s].numpy(), scores[name], atol=1e-6)


# --------------------------------------------------------------------------- on the demo


@pytest.mark.slow
def test_on_the_demo_the_weight_dependent_pictures_fall_to_chance():
    """Occlusion's class-score maps and the feature visualizations of features.6 fall into the
    random networks' band once the layer is re-initialized (the classifier's maps before:
    the class score passes through every layer). The deconvnet's numbers are reported in
    docs/sanity.md as they are; nothing is asserted of them."""
    model = vizcnn.load_model("demo")
    occlusion = sanity_check(model, "shapes:40", "features.6", "occlusion", images=4,
                             progress=False)
    classes = occlusion.rows_of("class score")
    assert len(classes) == 4
    at = occlusion.steps.index("features.6")
    for metric in ("spearman", "spearman_abs", "ssim"):
        low, high = occlusion.band(metric, classes)
        curve = occlusion.curve(metric, classes)
        assert float(curve[1]) < 0.7, metric  # the classifier's top layer alone moves it
        for s in range(at, len(curve)):
            assert low <= float(curve[s]) <= high, (metric, occlusion.steps[s], low, high)
    featvis = sanity_check(model, "shapes:40", "features.6", "feature_visualization",
                           channels=[2, 10], steps=256, progress=False)
    at = featvis.steps.index("features.6")
    for metric in ("spearman", "ssim"):
        low, high = featvis.band(metric)
        curve = featvis.curve(metric)
        assert (curve[:at] == 1).all()  # the layers above: never passed through
        for s in range(at, len(curve)):
            assert float(curve[s]) <= high + 0.05, (metric, featvis.steps[s], high)


# --------------------------------------------------------------------------- the model


def test_the_model_is_left_alone_and_the_seed_gives_the_numbers():
    model = with_model_info(tuple_net(), preprocessing=PLAIN)  # PReLU, GELU, ceil mode
    images = torch.rand(6, 3, 32, 32)
    before = snapshot(model)
    state = torch.get_rng_state()
    runs = [sanity_check(model, images, "conv2", method, channels=[1], images=2,
                         baseline_models=2, seed=seed, output=0, steps=3, progress=False)
            for method in ("deconv", "occlusion", "feature_visualization") for seed in (0, 0, 1)]
    assert_unchanged(model, before)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random stream untouched
    for same, again, other in zip(runs[::3], runs[1::3], runs[2::3], strict=True):
        for name in ("spearman", "ssim", "hog"):
            assert torch.equal(same.similarity.metric(name).nan_to_num(7),
                               again.similarity.metric(name).nan_to_num(7))
        assert not torch.equal(same.pictures[-1], other.pictures[-1])
    occlusion = runs[3]
    assert occlusion.steps == ("trained", "box", "classes", "conv2", "act", "conv1")
    assert occlusion.rows[0].startswith("image 0: p(") and occlusion.rows[1].endswith("ch 1")
    assert occlusion.kinds[:2] == ("class score", "feature map")
    assert occlusion.rows_of("feature map") == [1, 3]


def test_a_parameter_without_reset_is_kept_and_said():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.scale = nn.Parameter(torch.tensor(2.0))

        def forward(self, x):
            return self.conv(x) * self.scale

    check = sanity_check(Scaled().eval(), torch.rand(3, 3, 12, 12), "conv", "deconv",
                         baseline_models=1, progress=False)
    assert check.kept == ("scale",)
    assert check.to_dict()["kept"] == ["scale"]


def test_the_doctor_and_the_line_agree_with_the_cascade():
    """The doctor's line (trained against every weight random) is the cascade's last step for
    the same units."""
    model = vizcnn.load_model("demo")
    report = vizcnn.doctor(model, "shapes:60", ["features.0", "features.6"], progress=False)
    stats = vizcnn.channel_stats(model, "shapes:60", ["features.6"], progress=False)
    from vizcnn.sanity import layer_sanity, line_units

    values, rows = stats["features.6"].strongest()
    channels, indices = line_units(values, stats["features.6"].indices[rows])
    cascade = layer_sanity(model, "shapes:60", "features.6", channels, indices,
                           baseline_models=1)
    assert cascade.steps[-1] == "features.0" and cascade.changed[-1]
    line = report.layer("features.6").sanity
    assert line == pytest.approx(cascade.final(), abs=1e-9)
    assert "alike once random" in report.text()
    entry = json.loads(report.to_json())["layers"][1]["sanity"]
    assert entry["verdict"] == report.layer("features.6").sanity_word
    assert vizcnn.doctor(model, "shapes:20", ["features.0"], progress=False,
                         sanity=False).layer("features.0").sanity is None


# --------------------------------------------------------------------------- bad input


def test_bad_input_is_one_clear_error():
    model = with_model_info(tuple_net(), preprocessing=PLAIN)
    images = torch.rand(4, 3, 32, 32)
    with pytest.raises(BadArgument, match=r"'pool' \(MaxPool2d\) has no weights to "
                       r"re-initialize; check a layer with weights: conv1, act, conv2"):
        sanity_check(model, images, "pool", progress=False)
    with pytest.raises(BadArgument, match="unknown method 'gradcam'"):
        sanity_check(model, images, "conv2", "gradcam", progress=False)
    with pytest.raises(BadArgument, match="no spatial output"):
        sanity_check(model, images, "classes", "occlusion", output=0, progress=False)
    with pytest.raises(BadArgument, match="one channel"):
        sanity_check(model, images, "conv2", "occlusion", channels=[1, 2], output=0,
                     progress=False)
    unknown = tuple_net()  # vizcnn knows nothing of its input
    for method in ("occlusion", "feature_visualization"):
        with pytest.raises(BadArgument, match="needs the model's input normalisation"):
            sanity_check(unknown, images, "conv2", method, output=0, progress=False)


def test_the_cli_draws_the_check_and_refuses_bad_input(capfd, tmp_path):
    out, numbers = tmp_path / "sanity.png", tmp_path / "sanity.json"
    code = main(["sanity", "demo", "shapes:20", "--layer", "features.3", "--method", "deconv",
                 "--method", "occlusion", "--channels", "4", "--images", "1",
                 "--out", str(out), "--json", str(numbers)])
    printed = capfd.readouterr().out
    assert code == 0 and out.stat().st_size > 10_000
    saved = json.loads(numbers.read_text())
    assert [entry["method"] for entry in saved] == ["deconv", "occlusion"]
    assert f"similarity {saved[0]['final']:.2f}" in printed
    refused(capfd, "sanity", "demo", "shapes:4", "--layer", "features.1", "--out",
            tmp_path / "bad.png", expected="'features.1' (ReLU) has no weights",
            output=tmp_path / "bad.png")
    refused(capfd, "sanity", "demo", "shapes:4", "--layer", "classifier.1", "--method",
            "occlusion", "--out", tmp_path / "bad.png", expected="no spatial output",
            output=tmp_path / "bad.png")
    weights = state_dict_file(tmp_path, tuple_net())
    refused(capfd, "sanity", weights, "shapes:4", "--arch", "helpers:tuple_net", "--layer",
            "conv2", "--method", "feature_visualization", "--out", tmp_path / "bad.png",
            expected="--mean and --std", output=tmp_path / "bad.png")
    assert not Path(tmp_path / "bad.png").exists()
