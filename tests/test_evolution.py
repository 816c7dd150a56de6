"""vizcnn.feature_evolution (Fig. 4): checkpoints in epoch order, numbers against brute
force and against the top-k scan, the demo's shipped epochs, the CLI and its mistakes."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from helpers import check_links

import vizcnn
from vizcnn.cli import main
from vizcnn.evolution import load_checkpoints, settled_epoch
from vizcnn.models import DEMO_EPOCHS, demo_initialisation, demo_network
from vizcnn.render.gallery import write_gallery
from vizcnn.scan import images_at, open_data
from vizcnn.train import train_demo

DATA = "shapes:120"
LAYER = "features.3"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A short training run: epoch_00.pt, epoch_01.pt, epoch_02.pt and final.pt (epoch 3)."""
    folder = tmp_path_factory.mktemp("run")
    train_demo(folder, epochs=3, per_epoch=256, batch_size=64, held_out=64,
               save_epochs=(0, 1, 2), progress=False)
    return [str(folder / name) for name in
            ("epoch_00.pt", "epoch_01.pt", "epoch_02.pt", "final.pt")]


@pytest.fixture(scope="module")
def evolution(run):
    return vizcnn.feature_evolution(run, DATA, LAYER, [0, 3, 7], progress=False)


def brute_maxima(model, layer: str) -> torch.Tensor:
    """(N, C) each image's strongest activation, one image at a time with a plain hook."""
    kept = []
    handle = model.get_submodule(layer).register_forward_hook(
        lambda m, i, o: kept.append(o.detach().amax(dim=(2, 3)).clone()))
    try:
        with torch.no_grad():
            for image in images_at(model, DATA, range(len(open_data(DATA)))):
                model(image[None])
    finally:
        handle.remove()
    return torch.cat(kept)


def test_settledness_and_overlap_equal_brute_force(run, evolution):
    assert evolution.epochs == (0, 1, 2, 3)
    models = [vizcnn.load_model(path) for path in run]
    for layer in ("features.0", LAYER, "features.10"):
        maxima = [brute_maxima(m, layer).numpy().astype(np.float64) for m in models]
        final = maxima[-1]
        for e, mine in enumerate(maxima):
            correlations = [np.corrcoef(mine[:, c], final[:, c])[0, 1]
                            if mine[:, c].std() > 0 and final[:, c].std() > 0 else 0.0
                            for c in range(final.shape[1])]
            assert float(evolution.settledness[layer][e]) == pytest.approx(
                np.mean(correlations), abs=1e-4)
            overlaps = [len(set(np.argsort(-mine[:, c], kind="stable")[:9])
                            & set(np.argsort(-final[:, c], kind="stable")[:9])) / 9
                        for c in range(final.shape[1])]
            assert float(evolution.overlap[layer][e]) == pytest.approx(np.mean(overlaps),
                                                                       abs=0.02)
        assert float(evolution.settledness[layer][-1]) == pytest.approx(1.0)


def test_projections_are_the_top_scan_units_per_checkpoint(run, evolution):
    for e, path in enumerate(run):
        model = vizcnn.load_model(path)
        top = vizcnn.scan_topk(model, DATA, [LAYER], k=1, progress=False)
        patches = vizcnn.top_patches(model, top, DATA, LAYER, [0, 3, 7])
        assert evolution.indices[LAYER][e].tolist() == patches.indices[:, 0].tolist()
        torch.testing.assert_close(evolution.values[LAYER][e], patches.values[:, 0])
        torch.testing.assert_close(evolution.projections[LAYER][e],
                                   patches.projections[:, 0], rtol=1e-4, atol=1e-6)


def test_checkpoints_in_no_order_are_put_in_epoch_order(run, evolution):
    shuffled = run[:]
    random.Random(3).shuffle(shuffled)
    assert shuffled != run
    again = vizcnn.feature_evolution(shuffled, DATA, LAYER, [0, 3, 7], progress=False)
    assert again.epochs == evolution.epochs and again.sources == evolution.sources
    torch.testing.assert_close(again.settledness[LAYER], evolution.settledness[LAYER])
    models = {epoch: vizcnn.load_model(path) for epoch, path in zip((0, 1, 2, 3), run, strict=True)}
    assert [e for e, _, _ in load_checkpoints(dict(reversed(models.items())))] == [0, 1, 2, 3]


def test_settled_epoch():
    curve = torch.tensor([0.1, 0.95, 0.5, 0.92, 1.0])
    assert settled_epoch((0, 1, 2, 5, 10), curve) == 5  # it must stay there
    assert settled_epoch((0, 1, 2, 5, 10), curve, 0.4) == 1


def test_demo_layer1_settles_before_layer5():
    evolution = vizcnn.feature_evolution([f"demo:{e}" for e in DEMO_EPOCHS], "shapes:1000",
                                         ["features.0", "features.10"], [0],
                                         settle_layers=[], progress=False)
    assert evolution.epochs == DEMO_EPOCHS
    assert evolution.settled_epoch("features.0") < evolution.settled_epoch("features.10")


def test_demo_epochs_load_from_the_package():
    initial = vizcnn.load_model("demo:0")
    for name, value in demo_initialisation(0).state_dict().items():
        assert torch.equal(initial.state_dict()[name], value), name
    tenth, last = vizcnn.load_model("demo:10"), vizcnn.load_model("demo")
    assert vizcnn.model_info(tenth).classes == vizcnn.model_info(last).classes
    assert not torch.equal(tenth.features[0].weight, last.features[0].weight)
    assert tenth.features[0].weight.dtype == torch.float32
    with pytest.raises(vizcnn.BadArgument, match="ships epochs 0, 1, 2, 5, 10, 20"):
        vizcnn.load_model("demo:3")


def test_bad_checkpoints(run, tmp_path):
    other = tmp_path / "alexnet_07.pt"
    torch.save({"arch": "demo_alexnet", "epoch": 7,
                "state_dict": demo_network(arch="demo_alexnet").state_dict()}, other)
    with pytest.raises(vizcnn.BadCheckpoint, match="is not the architecture of"):
        load_checkpoints([*run, str(other)])
    nameless = tmp_path / "weights.pt"
    torch.save({"arch": "demo", "state_dict": demo_network().state_dict()}, nameless)
    with pytest.raises(vizcnn.BadArgument, match="cannot tell the epoch"):
        load_checkpoints([run[0], str(nameless)])
    with pytest.raises(vizcnn.BadArgument, match="both of epoch 0"):
        load_checkpoints([run[0], "demo:0"])
    with pytest.raises(vizcnn.BadArgument, match="at least 2 checkpoints"):
        load_checkpoints([run[0]])


def test_evolution_command(run, capsys, tmp_path):
    out = tmp_path / "fig4.png"
    code = main(["evolution", run[3], run[1], run[0], run[2], DATA, "--layer", LAYER,
                 "--layer", "features.0", "--channels", "0-3", "--out", str(out)])
    text, err = capsys.readouterr()
    assert code == 0, err
    assert "in epoch order:" in text and f"wrote {out}" in text
    assert "features.3     settledness" in text
    assert out.stat().st_size > 20_000


@pytest.mark.parametrize("case, expected", [
    ("other architecture", "is not the architecture of"),
    ("empty data", "no images in"),
    ("one checkpoint", "at least 2 checkpoints"),
    ("channel out of range", "channel 48 out of range"),
    ("unknown layer", "did you mean"),
    ("same epoch twice", "both of epoch"),
])
def test_evolution_mistakes(case, expected, run, capsys, tmp_path):
    other = tmp_path / "alexnet_07.pt"
    torch.save({"arch": "demo_alexnet", "epoch": 7,
                "state_dict": demo_network(arch="demo_alexnet").state_dict()}, other)
    (tmp_path / "empty").mkdir()
    argv = {"other architecture": [run[0], str(other), run[3], DATA],
            "empty data": [run[0], run[3], str(tmp_path / "empty")],
            "one checkpoint": [run[3], DATA],
            "channel out of range": [run[0], run[3], DATA, "--layer", "features.0",
                                     "--channels", "40-60"],
            "unknown layer": [run[0], run[3], DATA, "--layer", "features.33"],
            "same epoch twice": [run[0], run[0], DATA]}[case]
    out = tmp_path / "fig4.png"
    code = main(["evolution", *argv, "--out", str(out)])
    _, err = capsys.readouterr()
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and not out.exists()


def test_gallery_shows_evolution_strips_and_the_health_report(tmp_path):
    index = write_gallery(vizcnn.load_model("demo"), "shapes:60", tmp_path / "site",
                          layers=["features.0", "features.3"], channels=[0, 1],
                          checkpoints=["demo:0", "demo:5", "demo"], figures=False,
                          progress=False)
    page = (tmp_path / "site" / "layer2_features.3" / "1.html").read_text()
    assert "Evolution over training" in page
    for epoch in (0, 5, 20):
        assert f"epoch {epoch}" in page
    strips = sorted(p.name for p in (tmp_path / "site" / "img").rglob("e1_*"))
    assert len(strips) == 6  # channel 1 of both layers at 3 epochs
    text = index.read_text()
    assert "Health report" in text and 'id="health"' in text and "settledness" in text
    check_links(index.parent)
