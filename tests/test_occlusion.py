"""Occlusion: both engines equal a naive loop; the demo's shapes are found; errors and hooks."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import assert_unchanged, hooks_left, snapshot
from torch import nn

import vizcnn
from vizcnn.data.shapes import HELD_OUT_SEED, ShapesDataset
from vizcnn.probes.occlusion import occlusion


def naive_loop(model, x, window, stride, target, layer=None, channel=None):
    """The reference: one occluded copy at a time through the whole model (fill 0)."""
    height, width = x.shape[-2:]
    tops = range(0, height - window[0] + 1, stride[0])
    lefts = range(0, width - window[1] + 1, stride[1])
    probs = torch.zeros(len(tops), len(lefts))
    labels = torch.zeros(len(tops), len(lefts), dtype=torch.long)
    totals = torch.zeros(len(tops), len(lefts), dtype=torch.float64)
    for i, top in enumerate(tops):
        for j, left in enumerate(lefts):
            occluded = x.clone()
            occluded[:, :, top:top + window[0], left:left + window[1]] = 0.0
            with vizcnn.capture(model, [layer] if layer else []) as captured, torch.no_grad():
                p = torch.softmax(model(occluded), dim=1)[0]
            probs[i, j] = p[target]
            labels[i, j] = p.argmax()
            if layer:
                totals[i, j] = captured[layer][0, channel].double().sum()
    return probs, labels, totals


def sharpened(model: nn.Module, last: str, factor: float) -> nn.Module:
    """A copy whose logits are scaled up, so random weights give probabilities that vary with
    the occluder (with near-uniform softmax outputs, a probability test could not fail)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        vizcnn.layers.resolve_layer(model, last).weight.mul_(factor)
    return model


CASES = [
    # (model, classifier layer and logit scale, input size, window, stride, layer for the
    # activation map)
    ("alexnet", ("classifier.6", 300.0), (100, 130), (20, 24), (13, 11), "features.10"),
    ("vgg16", ("classifier.6", 50.0), (64, 80), (12, 12), (10, 9), "features.17"),
    ("resnet18", ("fc", 20.0), (64, 80), (15, 15), (7, 13), "layer2"),
]


@pytest.mark.parametrize("engine", ["incremental", "naive"])
@pytest.mark.parametrize(("name", "last", "size", "window", "stride", "layer"), CASES)
def test_engines_equal_a_naive_loop(name, last, size, window, stride, layer, engine, request):
    model = sharpened(request.getfixturevalue(name), *last)
    torch.manual_seed(5)
    x = torch.randn(1, 3, *size)
    before = snapshot(model)
    maps = occlusion(model, x, fill=0.0, window=window, stride=stride, layer=layer, engine=engine,
                     progress=False)
    assert_unchanged(model, before)
    assert maps.engine == engine
    channel = int(maps.channel[0])
    probs, labels, totals = naive_loop(model, x, window, stride, int(maps.target[0]), layer,
                                       channel)
    assert probs.std() > 1e-3  # the maps are not flat: the test can fail
    assert (maps.prob[0] - probs).abs().max() <= 1e-5
    assert torch.equal(maps.label[0], labels)
    assert ((maps.activation[0] - totals).abs().max() <= 1e-4 * totals.abs().max())
    # the clean image's strongest feature map was chosen and reported
    clean = vizcnn.activations(model, x, [layer])[layer][0]
    assert channel == int(clean.amax(dim=(1, 2)).argmax())
    assert maps.positions[1, 1].tolist() == [stride[0], stride[1]]


def test_demo_network_both_engines_and_a_window_that_does_not_divide():
    model = vizcnn.load_model("demo")
    dataset = ShapesDataset(3, seed=HELD_OUT_SEED)
    x = torch.cat([vizcnn.preprocess(model, dataset.render(i).image) for i in range(3)])
    fast = occlusion(model, x, window=(11, 9), stride=(5, 7), layer="features.6", channel=3,
                     progress=False)
    assert fast.prob.shape == (3, 11, 8)  # range(0, 64 - 11 + 1, 5), range(0, 56, 7)
    for n in range(3):
        probs, labels, totals = naive_loop(model, x[n:n + 1], (11, 9), (5, 7),
                                           int(fast.target[n]), "features.6", 3)
        assert (fast.prob[n] - probs).abs().max() <= 1e-5
        assert torch.equal(fast.label[n], labels)
        assert (fast.activation[n] - totals).abs().max() <= 1e-4 * totals.abs().max()
    assert torch.equal(fast.target, fast.clean_label)


def test_the_occluder_that_hurts_most_covers_the_shape():
    """Ground truth: on 100 held-out demo images, the position that lowers the true class's
    probability most puts the occluder over the shape's bounding box in >= 90 % of them."""
    model = vizcnn.load_model("demo")
    dataset = ShapesDataset(100, seed=HELD_OUT_SEED)
    samples = [dataset.render(i) for i in range(100)]
    x = torch.cat([vizcnn.preprocess(model, s.image) for s in samples])
    window = 16
    maps = occlusion(model, x, fill=0.0, window=window, stride=6, target=[s.label for s in samples],
                     batch_size=256, progress=False)
    hits = 0
    for n, sample in enumerate(samples):
        top, left = maps.positions.view(-1, 2)[int(maps.prob[n].flatten().argmin())].tolist()
        box_top, box_left, box_bottom, box_right = sample.box
        hits += (top < box_bottom and top + window > box_top and left < box_right
                 and left + window > box_left)
    assert hits >= 90


def test_approximate_modes_report_their_deviation(alexnet):
    model = sharpened(alexnet, "classifier.6", 300.0)
    torch.manual_seed(6)
    x = torch.randn(1, 3, 112, 112)
    exact = occlusion(model, x, fill=0.0, window=16, stride=8, progress=False)
    capped = occlusion(model, x, fill=0.0, window=16, stride=8, approx=0.3, progress=False)
    assert capped.approx == 0.3 and capped.checked >= 8
    deviation = (capped.prob - exact.prob).abs()
    # the reported deviation is the true one on the positions it checked: a lower bound
    assert 0 <= capped.max_deviation <= deviation.max() + 1e-6
    assert deviation.max() > 0  # the cap does drop changes here: approximate, not exact
    drilled = occlusion(model, x, fill=0.0, window=16, stride=8, approx=True, progress=False)
    assert drilled.approx is None and drilled.computed < exact.prob.numel()
    # the positions of the coarse grid are exact
    assert torch.allclose(drilled.prob[0, ::2, ::2], exact.prob[0, ::2, ::2], atol=1e-5)


def test_drill_down_on_the_demo_finds_the_shape():
    """On the demo's clean maps the drill-down computes what the maps demand and no more,
    far fewer positions than the exact maps, with a small error."""
    model = vizcnn.load_model("demo")
    dataset = ShapesDataset(10, seed=HELD_OUT_SEED)
    samples = [dataset.render(i) for i in range(10)]
    x = torch.cat([vizcnn.preprocess(model, s.image) for s in samples])
    exact = occlusion(model, x, fill=0.0, window=16, stride=2, progress=False)
    approx = occlusion(model, x, fill=0.0, window=16, stride=2, approx=True, progress=False)
    # what the exact maps demand: the coarse grid, every cell whose corners disagree, and the
    # centre of every other cell (its check); the re-checks may add a few cells more
    demanded = sum(_drill_down_demand(exact.prob[n], exact.label[n]) for n in range(len(x)))
    assert demanded <= approx.computed <= 1.1 * demanded
    assert approx.computed < 0.7 * exact.prob.numel()
    assert (approx.prob - exact.prob).abs().mean() < 0.02


def _drill_down_demand(prob: torch.Tensor, label: torch.Tensor, tolerance: float = 0.05
                       ) -> int:
    """Positions the drill-down must compute on these exact maps (gy, gx), counted by hand."""
    height, width = prob.shape
    rows = sorted(set(range(0, height, 2)) | {height - 1})
    cols = sorted(set(range(0, width, 2)) | {width - 1})
    needed = torch.zeros(height, width, dtype=torch.bool)
    needed[torch.tensor(rows)[:, None], torch.tensor(cols)] = True
    for i in range(len(rows) - 1):
        for j in range(len(cols) - 1):
            corners = [(rows[i + a], cols[j + b]) for a in (0, 1) for b in (0, 1)]
            values = torch.stack([prob[c] for c in corners])
            if len({int(label[c]) for c in corners}) > 1 or values.max() - values.min() > \
                    tolerance:
                needed[rows[i]:rows[i + 1] + 1, cols[j]:cols[j + 1] + 1] = True
            else:
                needed[(rows[i] + rows[i + 1]) // 2, (cols[j] + cols[j + 1]) // 2] = True
    return int(needed.sum())


def test_save_writes_arrays_pngs_and_manifest(tmp_path):
    model = vizcnn.load_model("demo")
    x = vizcnn.preprocess(model, ShapesDataset(1, seed=HELD_OUT_SEED).render(0).image)
    maps = occlusion(model, x, fill=0.0, window=16, stride=8, layer="features.10", progress=False)
    folder = maps.save(tmp_path / "occ")
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["activation_0.png", "label_0.png", "manifest.json", "maps.pt", "prob_0.png"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["grid"] == [7, 7] and manifest["engine"] == "incremental"
    assert torch.equal(torch.load(folder / "maps.pt")["prob"], maps.prob)


def test_a_model_fx_cannot_trace_falls_back_and_says_so():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            x = self.conv(x)
            if x.mean() > 100:  # control flow on values: torch.fx cannot trace it
                x = x * 2
            return self.fc(x.mean(dim=(2, 3)))

    torch.manual_seed(0)
    model = DataDependent().eval()
    x = torch.randn(1, 3, 20, 20)
    maps = occlusion(model, x, fill=0.0, window=5, stride=5, progress=False)
    assert maps.engine == "naive" and "torch.fx cannot trace" in maps.engine_note
    probs, labels, _ = naive_loop(model, x, (5, 5), (5, 5), int(maps.target[0]))
    assert (maps.prob[0] - probs).abs().max() <= 1e-6
    with pytest.raises(vizcnn.BadArgument, match="incremental engine cannot run"):
        occlusion(model, x, fill=0.0, window=5, stride=5, engine="incremental", progress=False)


def test_bad_arguments_and_no_hooks(alexnet):
    x = torch.randn(1, 3, 64, 64)
    cases = [
        (dict(window=65, stride=4), "window 65x65 is larger than the image 64x64"),
        (dict(window=8, stride=0), "stride must be a positive integer"),
        (dict(window=8, stride=-2), "stride must be a positive integer"),
        (dict(window=0, stride=2), "window must be a positive integer"),
        (dict(window=8, stride=8, layer="features.10", channel=256), "channel 256 out of range"),
        (dict(window=8, stride=8, layer="classifier.1"), "has no spatial output"),
        (dict(window=8, stride=8, layer="features.99"), "did you mean"),
        (dict(window=8, stride=8, target=1000), "target class 1000 out of range"),
        (dict(window=8, stride=8, approx=1.5), "approx must be"),
        (dict(window=8, stride=8, channel=3), "a channel needs a layer"),
    ]
    for kwargs, message in cases:
        with pytest.raises(vizcnn.VizCNNError, match=message) as raised:
            occlusion(alexnet, x, fill=0.0, progress=False, **kwargs)
        assert "\n" not in str(raised.value)
    assert hooks_left(alexnet) == []


def test_concatenation_and_functional_ops_stay_exact():
    """Branches joined by torch.cat (not incremental: full tensors again) and functional
    relu / add (incremental) still give the naive loop's numbers."""

    class Branches(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 3, padding=1)
            self.left = nn.Conv2d(4, 3, 1)
            self.right = nn.Conv2d(4, 3, 3, padding=1)
            self.pool = nn.AvgPool2d(2)
            self.after = nn.Conv2d(6, 6, 3, padding=1)
            self.fc = nn.Linear(6, 5)

        def forward(self, x):
            x = torch.relu(self.stem(x))
            joined = torch.cat([self.left(x), self.right(x)], dim=1)
            y = self.pool(joined)
            y = torch.nn.functional.relu(self.after(y)) + y
            return self.fc(y.mean(dim=(2, 3))) * 3

    torch.manual_seed(3)
    model = Branches().eval()
    x = torch.randn(1, 3, 24, 28)
    maps = occlusion(model, x, fill=0.0, window=(6, 5), stride=(4, 3), layer="after",
                     engine="incremental", progress=False)
    assert maps.engine == "incremental"
    probs, labels, totals = naive_loop(model, x, (6, 5), (4, 3), int(maps.target[0]), "after",
                                       int(maps.channel[0]))
    assert probs.std() > 1e-3
    assert (maps.prob[0] - probs).abs().max() <= 1e-5
    assert torch.equal(maps.label[0], labels)
    assert (maps.activation[0] - totals).abs().max() <= 1e-4 * totals.abs().max()


def test_auto_races_the_engines_where_the_work_saved_is_small_and_stays_exact():
    """The demo network: the incremental engine saves ~40 % of the multiply-adds only, so
    "auto" times both engines on real batches and keeps the faster; every batch is exact
    whichever engine ran it. A large saving (VGG16, a small window) skips the race."""
    model = vizcnn.load_model("demo")
    dataset = ShapesDataset(6, seed=HELD_OUT_SEED)
    x = torch.cat([vizcnn.preprocess(model, dataset.render(i).image) for i in range(6)])
    auto = occlusion(model, x, window=16, stride=8, batch_size=16, layer="features.10",
                     progress=False)
    assert auto.engine in ("incremental", "naive")
    assert f"auto: {auto.engine}, the faster per position over 2 timed turns" in \
        auto.engine_note
    for engine in ("incremental", "naive"):
        other = occlusion(model, x, window=16, stride=8, layer="features.10", engine=engine,
                          progress=False)
        assert (auto.prob - other.prob).abs().max() <= 1e-5
        assert torch.equal(auto.label, other.label)
        assert (auto.activation - other.activation).abs().max() <= 1e-4 * \
            other.activation.abs().max()


def test_auto_skips_the_race_where_the_incremental_engine_saves_most(vgg16):
    torch.manual_seed(7)
    x = torch.randn(2, 3, 128, 128)
    maps = occlusion(vgg16, x, fill=0.0, window=4, stride=32, batch_size=4, progress=False)
    share = float(maps.engine_note.split("auto: incremental (")[1].split("%")[0])
    assert maps.engine == "incremental" and share <= 25 and "timed" not in maps.engine_note


def test_default_batch_keeps_the_largest_map_within_the_budget(demo, vgg16):
    from vizcnn.probes.occlusion import BATCH_BYTES, _batch_size

    assert _batch_size(demo, torch.zeros(1, 3, 64, 64)) == 256  # 48 x 32 x 32 floats: cap
    largest = 64 * 224 * 224 * 4  # VGG16's first convs at 224
    assert _batch_size(vgg16, torch.zeros(1, 3, 224, 224)) == BATCH_BYTES // largest


def test_drill_down_finds_a_dip_between_coarse_positions():
    """A map whose dip sits between four coarse positions that agree with each other: the
    corners alone would interpolate 0.67 there instead of 0.1; the centre checks find it and
    refine around it until the interpolation agrees everywhere within the tolerance."""
    from vizcnn.probes.occlusion import CHECK_TOLERANCE, _drill_down

    ys, xs = torch.meshgrid(torch.arange(13.0), torch.arange(13.0), indexing="ij")
    truth = 1 - 0.9 * torch.exp(-((ys - 5) ** 2 + (xs - 5) ** 2) / 2)
    asked = []

    def evaluate(indices):
        asked.append(len(indices))
        return truth.flatten()[indices], torch.zeros(len(indices), dtype=torch.long), None

    prob, _, _, computed = _drill_down(evaluate, (13, 13), 2, 0.05, "cpu")
    assert float(prob.view(13, 13)[5, 5]) == pytest.approx(0.1, abs=1e-6)
    assert (prob - truth.flatten()).abs().max() <= 2 * CHECK_TOLERANCE
    assert int(computed.sum()) == sum(asked) < 169  # some positions were interpolated


def test_an_unfinished_race_says_both_engines_ran():
    """One demo image, 49 positions: the first turn (32, incremental) and a naive one (17)
    use them all before the race can end; the result names the engine that did the most and
    says that both ran."""
    model = vizcnn.load_model("demo")
    x = vizcnn.preprocess(model, ShapesDataset(1, seed=HELD_OUT_SEED).render(0).image)
    maps = occlusion(model, x, fill=0.0, window=16, stride=8, progress=False)
    assert maps.engine == "incremental"
    assert "both engines ran (positions: incremental 32, naive 17" in maps.engine_note
    naive = occlusion(model, x, fill=0.0, window=16, stride=8, engine="naive", progress=False)
    assert (maps.prob - naive.prob).abs().max() <= 1e-5
