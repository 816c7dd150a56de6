"""The bundled demo network: accuracy on fresh data, learned (not random) first-layer filters,
few dead filters, reproducible training, and the `vizcnn demo` output."""

from __future__ import annotations

import pytest
import torch
from helpers import check_links

import vizcnn
from vizcnn.data.shapes import SHAPE_CLASSES
from vizcnn.demo import run_demo
from vizcnn.models import DEMO_CHECKPOINT, DEMO_EPOCHS, demo_epoch_checkpoint, demo_initialisation
from vizcnn.train import accuracy, render_batch, train_demo

FRESH_SEED = 424242  # used neither in training (seed 0) nor for the training script's report


@pytest.fixture(scope="module")
def fresh():
    return render_batch(FRESH_SEED, 0, 600)


def test_bundled_model_classifies_fresh_images(demo, fresh):
    images, labels = fresh
    assert accuracy(demo, images, labels) >= 0.95
    assert vizcnn.model_info(demo).classes == tuple(SHAPE_CLASSES)
    assert DEMO_CHECKPOINT.stat().st_size < 5 * 2**20
    earlier = [demo_epoch_checkpoint(epoch).stat().st_size for epoch in DEMO_EPOCHS[1:-1]]
    assert sum(earlier) < 8 * 2**20  # the budget for the earlier epochs


def spatial_autocorrelation(weight: torch.Tensor) -> float:
    """Mean lag-1 correlation between neighbouring taps of each filter (x and y)."""
    centred = weight - weight.mean(dim=(1, 2, 3), keepdim=True)
    energy = (centred ** 2).sum(dim=(1, 2, 3))
    horizontal = (centred[..., :, 1:] * centred[..., :, :-1]).sum(dim=(1, 2, 3))
    vertical = (centred[..., 1:, :] * centred[..., :-1, :]).sum(dim=(1, 2, 3))
    return float(((horizontal + vertical) / (2 * energy)).mean())


def test_first_layer_filters_are_learned_structure(demo):
    seed = torch.load(DEMO_CHECKPOINT)["seed"]
    initial = demo_initialisation(seed).features[0].weight.detach()
    trained = demo.features[0].weight.detach()
    assert abs(spatial_autocorrelation(initial)) < 0.15  # white noise: neighbours unrelated
    assert spatial_autocorrelation(trained) > spatial_autocorrelation(initial) + 0.3
    assert (trained - initial).norm() > initial.norm()  # training moved them far


def test_few_dead_first_layer_filters(demo, fresh):
    images, _ = fresh
    weight = demo.features[0].weight.detach()
    norms = weight.flatten(1).norm(dim=1)
    tiny = norms < 1e-3 * norms.median()
    relu = vizcnn.activations(demo, images[:500], ["features.1"])["features.1"]
    never_active = relu.amax(dim=(0, 2, 3)) <= 0
    assert (tiny | never_active).float().mean() <= 0.10


def test_training_is_reproducible_and_writes_checkpoints(tmp_path):
    kwargs = dict(epochs=2, per_epoch=256, batch_size=64, held_out=64, save_epochs=(0, 1),
                  progress=False)
    first = train_demo(tmp_path / "a", **kwargs)
    second = train_demo(tmp_path / "b", **kwargs)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "epoch_00.pt", "epoch_01.pt", "final.pt"]
    a, b = torch.load(first.checkpoints[2]), torch.load(second.checkpoints[2])
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    assert a["held_out_accuracy"] == first.held_out_accuracy
    initial = torch.load(first.checkpoints[0])["state_dict"]["features.0.weight"]
    assert torch.equal(initial, demo_initialisation(0).features[0].weight)
    model = vizcnn.load_model(first.checkpoints[2])  # arch comes from the checkpoint
    assert vizcnn.model_info(model).classes == tuple(SHAPE_CLASSES)


def _small_gallery(model, data, out, **options):
    """The demo's gallery call, over a few images and channels."""
    from vizcnn.render.gallery import make_gallery

    return make_gallery(model, "shapes:20", out, **{**options, "layers": ["features.0"],
                                                     "channels": [0, 1],
                                                     "feature_vis": False})


@pytest.mark.slow
def test_demo_writes_figures_and_report(tmp_path, monkeypatch):
    files = run_demo(tmp_path / "demo", progress=False)
    names = sorted(p.name for p in files)
    assert "filters_layer1.png" in names and "report.txt" in names
    assert len([n for n in names if n.startswith("maps_layer")]) == 5  # every conv layer
    assert [n for n in names if n.startswith("fig2_")] == [
        "fig2_feature_visualization.png", "fig2_layer1_features.0.png",
        "fig2_layer2_features.3.png", "fig2_layer3_features.6.png",
        "fig2_layer4_features.8.png", "fig2_layer5_features.10.png"]
    assert "fig7_occlusion.png" in names and "fig4_evolution.png" in names
    health = (tmp_path / "demo" / "health.txt").read_text()
    assert "health report of demo" in health and "features.10" in health
    assert "features.0" in (tmp_path / "demo" / "health.json").read_text()
    for name in ("adversarial_lbfgs.png", "excite_features.6.png", "fig5_invariance.png",
                 "sanity_features.6.png"):
        assert name in names
    index = tmp_path / "demo" / "gallery" / "index.html"
    assert index in files
    # a page for every channel of the 5 conv layers (48 + 96 + 128 + 128 + 96), one per
    # layer and its sanity check, the index; every link inside the site
    assert check_links(index.parent) == 496 + 5 + 5 + 1
    layer = (index.parent / "layer3_features.6.html").read_text()
    assert "Sanity check: these projections" in layer
    assert 'href="layer3_features.6/sanity.html"' in layer
    assert "alike once random" in health
    assert "concept detectors" in index.read_text()
    assert "Health report" in index.read_text() and "settledness" in index.read_text()
    channel = (index.parent / "layer5_features.10" / "3.html").read_text()
    assert "Evolution over training" in channel and "epoch 10" in channel
    report = (tmp_path / "demo" / "report.txt").read_text()
    assert "held-out accuracy" in report and "features.10" in report
    # replaces its own earlier output: the drawing stubbed (the run above checked it), the
    # replacing real
    monkeypatch.setattr("vizcnn.demo.make_gallery", _small_gallery)
    monkeypatch.setattr("vizcnn.demo._figures", lambda *args: iter(()))
    (tmp_path / "demo" / "mine.txt").write_text("left by the first run")
    run_demo(tmp_path / "demo", progress=False)
    assert not (tmp_path / "demo" / "mine.txt").exists()
    assert (tmp_path / "demo" / "report.txt").is_file() and (tmp_path / "demo" / "gallery").is_dir()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(vizcnn.BadArgument, match="not a vizcnn demo output"):
        run_demo(tmp_path / "mine", progress=False)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"
