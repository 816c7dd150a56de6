"""vizcnn.doctor: the health report, checked against planted defects and brute force."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

import vizcnn
from vizcnn.cli import main
from vizcnn.doctor import (
    BANDS,
    DUPLICATE_COSINE,
    FLAT_VARIATION,
    NOISE_FLATNESS,
    SPECTRUM_SIZE,
    LayerHealth,
    _findings,
    aliasing_share,
    duplicate_filters,
    filter_spectrum,
    grid_mask,
)
from vizcnn.scan import images_at

DATA = "shapes:300"
ZEROED = (3, 11, 20, 33, 41)  # first-layer filters zeroed
DUPLICATED = (("features.3", 5, 10), ("features.6", 7, 30), ("features.8", 9, 50))
ALWAYS_ON = ("features.6", 60)


def brute_extremes(model: nn.Module, data, layers: list[str]) -> dict[str, tuple]:
    """Per layer: (max, min) (N, C) of each image's activations, by a plain loop over the
    images with plain forward hooks."""
    images = images_at(model, data, range(len(vizcnn.scan.open_data(data))))
    out = {name: ([], []) for name in layers}
    handles = []
    for name in layers:
        def keep(module, inputs, output, name=name):
            out[name][0].append(output.detach().amax(dim=(2, 3)).clone())
            out[name][1].append(output.detach().amin(dim=(2, 3)).clone())
        handles.append(model.get_submodule(name).register_forward_hook(keep))
    try:
        with torch.no_grad():
            for image in images:
                model(image[None])
    finally:
        for handle in handles:
            handle.remove()
    return {name: (torch.cat(a), torch.cat(b)) for name, (a, b) in out.items()}


def brute_duplicates(weight: torch.Tensor) -> set[tuple[int, int]]:
    w = weight.detach().flatten(1).numpy().astype(np.float64)
    pairs = set()
    for i in range(len(w)):
        for j in range(i + 1, len(w)):
            ni, nj = np.linalg.norm(w[i]), np.linalg.norm(w[j])
            if ni > 0 and nj > 0 and w[i] @ w[j] / (ni * nj) >= DUPLICATE_COSINE:
                pairs.add((i, j))
    return pairs


def brute_shares(filter_: np.ndarray) -> tuple[float, float, float]:
    """Low, mid, high shares of one filter (C_in, k, k) by numpy's FFT and explicit radii."""
    power = sum(np.abs(np.fft.fft2(c, s=(SPECTRUM_SIZE, SPECTRUM_SIZE))) ** 2 for c in filter_)
    low = mid = high = 0.0
    for u in range(SPECTRUM_SIZE):
        for v in range(SPECTRUM_SIZE):
            fu = u / SPECTRUM_SIZE if u <= SPECTRUM_SIZE // 2 else u / SPECTRUM_SIZE - 1
            fv = v / SPECTRUM_SIZE if v <= SPECTRUM_SIZE // 2 else v / SPECTRUM_SIZE - 1
            radius = (fu * fu + fv * fv) ** 0.5
            if radius < BANDS[0]:
                low += power[u, v]
            elif radius < BANDS[1]:
                mid += power[u, v]
            else:
                high += power[u, v]
    total = low + mid + high
    return low / total, mid / total, high / total


@pytest.fixture(scope="module")
def planted(demo):
    model = copy.deepcopy(demo)
    with torch.no_grad():
        for channel in ZEROED:
            model.features[0].weight[channel] = 0
            model.features[0].bias[channel] = 0
        for name, source, target in DUPLICATED:
            conv = model.get_submodule(name)
            conv.weight[target] = conv.weight[source]
            conv.bias[target] = conv.bias[source]
        name, channel = ALWAYS_ON  # just enough bias to lift its lowest unit above 0
        lowest = brute_extremes(model, DATA, [name])[name][1][:, channel].min()
        model.get_submodule(name).bias[channel] -= lowest - 0.05
    return model


@pytest.fixture(scope="module")
def planted_report(planted):
    return vizcnn.doctor(planted, DATA, progress=False)


def test_planted_defects_are_found_and_nothing_brute_force_would_not_report(
        planted, planted_report):
    report = planted_report
    layers = [h.name for h in report.layers]
    assert layers == vizcnn.list_layers(planted, "conv")
    first = report.layer("features.0")
    assert set(ZEROED) <= set(first.dead) and set(ZEROED) == set(first.spectrum.flat)
    for name, source, target in DUPLICATED:
        assert (source, target) in {(i, j) for i, j, _ in report.layer(name).duplicates}
    assert ALWAYS_ON[1] in report.layer(ALWAYS_ON[0]).always_on
    kinds = {(f.layer, f.kind) for f in report.findings}
    assert {("features.0", "dead"), ("features.0", "flat filters"),
            ("features.6", "always-on")} <= kinds
    assert {(name, "duplicates") for name, _, _ in DUPLICATED} <= kinds
    # everything else it reports, a brute-force recomputation reports too (and vice versa)
    extremes = brute_extremes(planted, DATA, layers)
    for health in report.layers:
        maxima, minima = extremes[health.name]
        assert health.dead == tuple(torch.nonzero((maxima <= 0).all(dim=0)).flatten().tolist())
        assert health.always_on == tuple(
            torch.nonzero((minima > 0).all(dim=0)).flatten().tolist())
        assert {(i, j) for i, j, _ in health.duplicates} == brute_duplicates(
            planted.get_submodule(health.name).weight)
        torch.testing.assert_close(health.fire_rate, (maxima > 0).float().mean(dim=0))
    weight = planted.features[0].weight.detach().double()
    variation = [float((w - w.mean(dim=(1, 2), keepdim=True)).square().mean().sqrt())
                 for w in weight]
    flat = {c for c, v in enumerate(variation) if v < FLAT_VARIATION * np.median(variation)}
    assert flat == set(first.spectrum.flat)


def test_the_untouched_network_reports_no_planted_kind(demo, planted_report):
    report = vizcnn.doctor(demo, DATA, progress=False)
    kinds = {f.kind for f in report.findings}
    assert not {"duplicates", "always-on", "flat filters"} & kinds
    assert not set(ZEROED) & set(report.layer("features.0").dead)


def test_numbers_equal_brute_force(demo, planted_report):
    report = planted_report
    spectrum = report.layer("features.0").spectrum
    weight = demo.features[0].weight.detach().numpy().astype(np.float64)
    for channel in (0, 7, 19, 47):  # untouched by the planting
        expected = brute_shares(weight[channel])
        np.testing.assert_allclose(spectrum.shares[channel].numpy(), expected, atol=1e-5)
        power = sum(np.abs(np.fft.fft2(c)) ** 2 for c in weight[channel]).flatten()[1:]
        flatness = np.exp(np.log(power).mean()) / power.mean()
        assert abs(float(spectrum.flatness[channel]) - flatness) < 1e-5
    for name, source, target in DUPLICATED:
        cosine = dict(((i, j), c) for i, j, c in report.layer(name).duplicates)[(source, target)]
        assert cosine == pytest.approx(1.0, abs=1e-6)
    second = report.layer("features.3")
    assert second.aliasing is not None and second.stride == 2
    assert second.aliased == tuple(
        c for c in range(96) if float(second.aliasing[c]) >= second.grid_fraction)
    assert report.layer("features.6").aliasing is None


def test_cosines_equal_numpy_at_a_low_threshold(demo):
    weight = demo.features[6].weight.detach()
    found = duplicate_filters(weight, 0.4)
    assert len(found) >= 3  # enough pairs to compare
    w = weight.flatten(1).numpy().astype(np.float64)
    for i, j, cosine in found:
        expected = w[i] @ w[j] / (np.linalg.norm(w[i]) * np.linalg.norm(w[j]))
        assert cosine == pytest.approx(expected, abs=1e-6)
    unit = w / np.linalg.norm(w, axis=1, keepdims=True)
    pairs = {(i, j) for i in range(len(w)) for j in range(i + 1, len(w))
             if unit[i] @ unit[j] >= 0.4}
    assert {(i, j) for i, j, _ in found} == pairs


def test_aliasing_share_of_a_grid_and_of_a_smooth_blob():
    y, x = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    blob = torch.exp(-((y - 16) ** 2 + (x - 16) ** 2) / 40)
    grid = blob * ((y % 4 == 0) | (x % 4 == 0)).float()  # a stride-4 grid under the blob
    shares = aliasing_share(torch.stack([blob, grid])[:, None].expand(-1, 3, -1, -1), 4)
    assert shares[0] < 1e-3 and shares[1] > 0.3
    # brute force: numpy's FFT, the bins on the lines u or v in {8, 16, 24}
    g = grid.numpy() - grid.numpy().mean()
    power = np.abs(np.fft.fft2(g)) ** 2 * 3
    lines = np.zeros((32, 32), bool)
    lines[[8, 16, 24], :] = lines[:, [8, 16, 24]] = True
    assert float(shares[1]) == pytest.approx(power[lines].sum() / power.sum(), rel=1e-5)
    fraction = float(grid_mask(32, 32, 4).float().mean())
    assert fraction == pytest.approx(lines.mean())  # what a flat spectrum puts on the grid
    health = LayerHealth("x", torch.ones(2), (), (), (), torch.ones(2), (), None, shares, 4,
                         fraction)
    assert health.aliased == (1,)  # the grid, not the blob
    assert [f.kind for f in _findings(health)] == ["aliasing"]


def test_random_filters_are_noise_and_zero_filters_flat():
    torch.manual_seed(0)
    weight = torch.randn(20, 3, 11, 11)
    weight[:3] = 0
    spectrum = filter_spectrum(weight)
    assert spectrum.flat == (0, 1, 2)
    assert len(spectrum.noise) >= 15 and float(spectrum.flatness[3:].min()) > 0.5
    smooth = torch.ones(1, 3, 11, 11) * torch.linspace(-1, 1, 11)  # a ramp: one edge
    assert float(filter_spectrum(torch.cat([smooth, weight[3:]])).flatness[0]) < NOISE_FLATNESS


class _Unlike(nn.Module):
    """Not our network: stride-1 first layer with PReLU, LeakyReLU, ceil-mode pool, GELU."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3)
        self.act1 = nn.PReLU()
        self.pool = nn.MaxPool2d(2, ceil_mode=True)
        self.conv2 = nn.Conv2d(6, 5, 3, padding=1)
        self.act2 = nn.GELU()

    def forward(self, x):
        return self.act2(self.conv2(self.pool(self.act1(self.conv1(x))))).mean(dim=(2, 3))


def test_doctor_on_a_network_unlike_ours():
    torch.manual_seed(1)
    model = _Unlike().eval()
    with torch.no_grad():
        model.conv2.weight[4] = model.conv2.weight[1] * 2.0  # a scaled copy: cosine 1
        model.conv2.bias[3] = 100.0
    data = torch.randn(12, 3, 23, 19)
    report = vizcnn.doctor(model, data, progress=False)
    second = report.layer("conv2")
    assert (1, 4) in {(i, j) for i, j, _ in second.duplicates}
    assert 3 in second.always_on
    assert report.layer("conv1").aliasing is None and second.aliasing is None  # stride 1
    assert report.layer("conv1").spectrum is not None
    with torch.no_grad():
        outputs = model.conv2(model.pool(model.act1(model.conv1(data))))
    expected = (outputs.amax(dim=(2, 3)) > 0).float().mean(dim=0)
    torch.testing.assert_close(second.fire_rate, expected)


def test_report_saves_json_and_text(tmp_path, planted_report):
    folder = planted_report.save(tmp_path / "health")
    loaded = json.loads((folder / "health.json").read_text())
    assert loaded["images"] == 300
    assert [layer["name"] for layer in loaded["layers"]] == [
        h.name for h in planted_report.layers]
    assert loaded["layers"][0]["dead"] == list(planted_report.layers[0].dead)
    assert len(loaded["findings"]) == len(planted_report.findings)
    text = (folder / "health.txt").read_text()
    assert text == planted_report.text() and "Fix:" in text and "always on" in text


def test_doctor_command(capsys, tmp_path):
    out = tmp_path / "health.json"
    code = main(["doctor", "demo", "shapes:100", "--layer", "features.0", "--layer",
                 "features.3", "--json", str(out)])
    text, err = capsys.readouterr()
    assert code == 0, err
    assert "health report of demo" in text and "features.3" in text
    assert json.loads(out.read_text())["images"] == 100


@pytest.mark.parametrize("argv, expected", [
    (["demo", "EMPTY"], "no"),
    (["demo", "shapes:10", "--layer", "features.33"], "did you mean"),
    (["demo", "/no/such/folder"], "not a folder"),
    (["demo", "shapes:10", "--json", "FOLDER"], "is a folder"),
    (["no-such.pt", "shapes:10"], "not found"),
])
def test_doctor_mistakes(argv, expected, capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "folder").mkdir()
    argv = [str(tmp_path / "empty") if a == "EMPTY" else str(tmp_path / "folder")
            if a == "FOLDER" else a for a in argv]
    code = main(["doctor", *argv])
    _, err = capsys.readouterr()
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
