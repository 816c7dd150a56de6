"""The gallery (vizcnn.render.gallery): a static site whose every link resolves inside it, whose
numbers and pictures are those of the API, on the demo network and on torchvision's."""

from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from helpers import check_links

import vizcnn
from vizcnn.render.gallery import write_gallery
from vizcnn.render.grid import image_tiles, projection_tiles


def _sanity_pages(site: Path) -> int:
    """The layers whose sanity page the gallery wrote (where it cost less than their own
    projections), as its gallery.json says."""
    return len(json.loads((site / "gallery.json").read_text())["sanity"])


def _png(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="module")
def demo_site(tmp_path_factory):
    demo = vizcnn.load_model("demo")
    out = tmp_path_factory.mktemp("gallery") / "site"
    index = write_gallery(demo, "shapes:80", out, layers=["features.3", "features.8"],
                          channels=list(range(6)), figures=False, progress=False)
    return demo, out, index


def test_demo_site_has_every_page_and_no_broken_link(demo_site):
    _, site, index = demo_site
    assert index == site / "index.html"
    # index, two layer pages, six channels each, each layer's sanity check (computed: it
    # costs 6 x (1 + 2 or 4 steps + 3 random nets) = 36 or 48 projections, under 6 x 9)
    assert check_links(site) == 1 + 2 + 2 * 6 + 2
    for number, name in ((1, "features.3"), (2, "features.8")):
        page = (site / f"layer{number}_{name}.html").read_text()
        assert "Sanity check: these projections" in page
        assert f'href="layer{number}_{name}/sanity.html"' in page
        assert f'href="layer{number}_{name}/sanity.html"' in index.read_text()  # health table
    text = index.read_text()
    assert "<td>demo</td>" in text and "features.3" in text and "features.8" in text
    assert not list(site.parent.glob(".site*"))  # no temporary folder left beside it


def test_channel_pages_show_the_apis_top_patches(demo_site):
    demo, site, _ = demo_site
    top = vizcnn.scan_topk(demo, "shapes:80", ["features.8"], progress=False)
    patches = vizcnn.top_patches(demo, top, "shapes:80", "features.8", [2, 5])
    mean, std = vizcnn.render.panels.display_normalisation(demo)
    folder = site / "img" / "layer2_features.8"
    for row, channel in enumerate((2, 5)):
        projections = projection_tiles(patches.projections[row])
        crops = image_tiles(patches.images[row], mean, std)
        for j in range(9):
            assert np.array_equal(_png(folder / f"p{channel}_{j}.png"), projections[j])
            assert np.array_equal(_png(folder / f"i{channel}_{j}.png"), crops[j])
        page = (site / "layer2_features.8" / f"{channel}.html").read_text()
        first = int(top.indices["features.8"][channel, 0])
        assert f"../img/data/{first}.png" in page


def test_cards_carry_the_statistics_of_a_brute_force_pass(demo_site):
    demo, site, _ = demo_site
    data = vizcnn.ShapesDataset(80, seed=1)
    x = torch.cat([vizcnn.preprocess(demo, data.render(i).image) for i in range(80)])
    maxima = torch.cat([vizcnn.activations(demo, x[n:n + 1], ["features.3"])["features.3"]
                        .amax((2, 3)) for n in range(80)])
    page = (site / "layer1_features.3.html").read_text()
    for channel in range(6):
        card = re.search(rf'data-channel="{channel}" data-strongest="([^"]+)" '
                         r'data-fires="([^"]+)"', page)
        assert float(card.group(1)) == pytest.approx(float(maxima[:, channel].max()), rel=1e-5)
        assert float(card.group(2)) == pytest.approx(float((maxima[:, channel] > 0)
                                                           .float().mean()), abs=1e-6)


def test_concept_labels_reach_the_index_and_the_cards(demo_site):
    _, site, index = demo_site
    text = index.read_text()
    assert "concept detectors" in text
    channel_page = (site / "layer2_features.8" / "0.html").read_text()
    assert "Network Dissection: best concept" in channel_page


@pytest.mark.parametrize("arch", ["alexnet", "resnet18"])
def test_torchvision_nets_build_and_pass_the_link_checker(arch, tmp_path, photo):
    model = vizcnn.load_model(f"torchvision:{arch}")
    vizcnn.with_model_info(model, preprocessing=vizcnn.Preprocessing(resize=(96, 96),
                                                                      crop=None))
    crops = [np.ascontiguousarray(photo[y:y + 150, x:x + 150]) for y in (0, 100, 200)
             for x in (0, 150, 300)]
    layers = None if arch == "resnet18" else ["features.3", "features.10"]
    index = write_gallery(model, crops, tmp_path / "site", layers=layers, k=3,
                          channels=[0, 1, 2], figures=False, progress=False)
    assert check_links(index.parent) >= 3
    if arch == "resnet18":  # the block outputs, where a residual net's features form
        assert (index.parent / "layer8_layer4.1.html").is_file()


def test_gallery_refuses_to_replace_a_foreign_folder(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(vizcnn.BadArgument, match="not a vizcnn gallery output"):
        write_gallery(vizcnn.load_model("demo"), "shapes:4", foreign, progress=False)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_interrupted_gallery_leaves_no_partial_site_and_resumes(tmp_path, capsys,
                                                                monkeypatch):
    from vizcnn.cli import main
    from vizcnn.render import gallery

    out = tmp_path / "site"
    argv = ["gallery", "demo", "shapes:40", "--layer", "features.3", "--channels", "0-2",
            "--no-figures", "--out", str(out)]
    original = gallery._Site._layer

    def interrupted(self, *args):
        original(self, *args)  # some pages are written, then Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(gallery._Site, "_layer", interrupted)
    assert main(argv) == 130
    assert "run the same command again to resume" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == [".site.scan-state"]  # no site part
    monkeypatch.setattr(gallery._Site, "_layer", original)
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "resuming the scan saved in" in printed and f"wrote {out / 'index.html'}" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site"]
    assert check_links(out) == 1 + 1 + 3 + _sanity_pages(out)


def test_channels_a_layer_lacks_are_refused_before_the_scan(tmp_path, capsys):
    from vizcnn.cli import main

    code = main(["gallery", "demo", "shapes:20", "--layer", "features.3", "--channels",
                 "500-501", "--no-figures", "--out", str(tmp_path / "site")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("vizcnn:")]  # past the bar
    assert code == 2 and len(lines) == 1 and "Traceback" not in err
    assert "'features.3' has none of the channels asked for: it has 96 channels" in err
    assert list(tmp_path.iterdir()) == []  # no site, no scan state


def test_a_folder_with_sibling_masks_gets_labels_accuracy_and_concepts(tmp_path, capsys):
    """A folder of shapes in class sub-folders (alphabetical: not the demo's class order)
    with ``shapes-masks`` beside it: the CLI finds the masks, the index gives the accuracy of
    a brute-force pass and the concepts, the channel pages name the classes by folder."""
    from helpers import shapes_folder

    from vizcnn.cli import main
    from vizcnn.data.shapes import SHAPE_CLASSES

    folder = shapes_folder(tmp_path / "shapes", 48)
    out = tmp_path / "site"
    assert main(["gallery", "demo", str(folder), "--layer", "features.8", "--channels", "0-3",
                 "--no-figures", "--out", str(out)]) == 0
    capsys.readouterr()
    demo = vizcnn.load_model("demo")
    paths = vizcnn.ImageFolder(folder).paths
    with torch.no_grad():
        predicted = [int(demo(vizcnn.preprocess(demo, p)).argmax()) for p in paths]
    correct = sum(p == SHAPE_CLASSES.index(path.parent.name)
                  for p, path in zip(predicted, paths, strict=True))
    text = (out / "index.html").read_text()
    assert f"{100 * correct / 48:.1f} % of 48 images" in text and "by name" in text
    assert "9 (circle, ring, square, frame" in text and "concept detectors" in text
    page = (out / "layer1_features.8" / "0.html").read_text()
    assert "Network Dissection: best concept" in page
    bar = '<span class="name">{}</span>'
    assert page.index(bar.format("circle")) < page.index(bar.format("star"))  # sorted folders
    assert check_links(out) == 1 + 1 + 4 + _sanity_pages(out)


def test_folder_mask_mistakes_are_one_line(tmp_path, capsys):
    from helpers import shapes_folder

    from vizcnn.cli import main

    folder = shapes_folder(tmp_path / "shapes", 6)
    elsewhere = tmp_path / "empty-masks"
    elsewhere.mkdir()
    sorted(folder.with_name("shapes-masks").rglob("*.png"))[0].unlink()
    for extra, message in ([[], "1 of 6 images have no mask"],
                           [["--masks", str(elsewhere)], "concepts.txt' not found"]):
        code = main(["gallery", "demo", str(folder), "--layer", "features.8", "--no-figures",
                     "--out", str(tmp_path / "site"), *extra])
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("vizcnn:")]
        assert code == 2 and len(lines) == 1 and message in lines[0], err
        assert "Traceback" not in err and not (tmp_path / "site").exists()
    assert main(["gallery", "demo", str(folder), "--layer", "features.8", "--no-figures",
                 "--no-masks", "--channels", "0", "--out", str(tmp_path / "site")]) == 0
    assert "concept detectors" not in (tmp_path / "site" / "index.html").read_text()
    with pytest.raises(vizcnn.BadArgument, match="masks folder .* goes with a folder of images"):
        write_gallery(vizcnn.load_model("demo"), "shapes:4", tmp_path / "other",
                      masks=tmp_path / "empty-masks", progress=False)


def test_a_killed_gallery_leaves_the_earlier_site_whole(tmp_path, capsys):
    """SIGKILL while the new site's pages are being written: the earlier site is untouched,
    byte for byte; the next run clears what the killed one left and writes the site."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from vizcnn.cli import main

    out = tmp_path / "site"
    argv = ["gallery", "demo", "shapes:40", "--layer", "features.3", "--layer", "features.8",
            "--no-figures", "--feature-vis-steps", "4", "--out", str(out)]
    assert main(argv) == 0
    capsys.readouterr()
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    root = Path(__file__).resolve().parents[1]
    child = subprocess.Popen([sys.executable, "-m", "vizcnn.cli", *argv],
                             env={**os.environ, "PYTHONPATH": str(root)},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob(".site.*.partial/layer1_features.3/*.html")):
        assert child.poll() is None and time.monotonic() < deadline  # still writing
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL
    assert list(tmp_path.glob(".site.*.partial"))  # the killed run's half site, apart
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert main(argv) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site"]
    assert check_links(out) == 1 + 2 + 96 + 128 + _sanity_pages(out)


# --------------------------------------------------------------------------- feature visualization


def test_channel_pages_show_the_apis_feature_visualization(demo_site):
    import json

    from vizcnn.featvis import feature_visualization
    from vizcnn.render.grid import pixel_tiles

    demo, site, index = demo_site
    record = json.loads((site / "gallery.json").read_text())["feature_visualization"]
    result = feature_visualization(demo, "features.8", [2, 5], objective="neuron",
                                   steps=record["steps"], progress=False)
    tiles = pixel_tiles(result.images[:, 0])
    for row, channel in enumerate((2, 5)):
        written = _png(site / "img" / "layer2_features.8" / f"v{channel}.png").astype(int)
        assert np.abs(written - tiles[row].astype(int)).max() <= 2  # the same, batch or not
        page = (site / "layer2_features.8" / f"{channel}.html").read_text()
        assert f"../img/layer2_features.8/vc{channel}.png" in page
        assert f"Its strongest unit: {float(result.strongest[row, 0]):.4g}" in page
    layer = (site / "layer2_features.8.html").read_text()
    assert 'id="show-vis"' in layer and layer.count('class="vis" hidden') == 6
    assert record["objective"] == "neuron" and record["layers"]["features.8"]["channels"] == 6
    assert "img/first_layer_feature_vis.png" in index.read_text()
    assert "feature visualization" in json.loads((site / "gallery.json").read_text())["seconds"]


def test_only_the_strongest_channels_and_none_without_a_normalisation(tmp_path):
    demo = vizcnn.load_model("demo")
    index = write_gallery(demo, "shapes:30", tmp_path / "some", layers=["features.6"],
                          channels=list(range(8)), figures=False, health=False,
                          feature_vis_channels=3, progress=False)
    top = vizcnn.scan_topk(demo, "shapes:30", ["features.6"], progress=False)
    strongest = top.values["features.6"][:8, 0].argsort(descending=True)[:3].tolist()
    folder = index.parent / "layer1_features.6"
    for channel in range(8):
        page = (folder / f"{channel}.html").read_text()
        assert ("not computed in this gallery" in page) == (channel not in strongest)
        assert (index.parent / "img" / "layer1_features.6" / f"v{channel}.png").exists() == (
            channel in strongest)
    plain = vizcnn.with_model_info(vizcnn.load_model("demo"),
                                   preprocessing=vizcnn.Preprocessing(resize=(64, 64), crop=None,
                                                                      mean=None, std=None))
    index = write_gallery(plain, "shapes:12", tmp_path / "plain", layers=["features.6"],
                          channels=[0], figures=False, health=False, progress=False)
    assert "normalisation is unknown" in index.read_text()
    assert "Feature visualization" not in (index.parent / "layer1_features.6" / "0.html"
                                           ).read_text()
    with pytest.raises(vizcnn.BadArgument, match="normalisation"):
        write_gallery(plain, "shapes:12", tmp_path / "refused", layers=["features.6"],
                      feature_vis=True, progress=False)
    assert not (tmp_path / "refused").exists()
