"""`vizcnn demo`: what the bundled network has learned, from nothing but the package.

Writes into one folder (built in a temporary folder and renamed into place, so an interrupted
run leaves nothing half-written): the first-layer filters, feature-map grids of every conv layer
for a few held-out shapes images, Zeiler & Fergus Fig. 2 for every conv layer (the top-9
held-out images of 16 channels, their deconvnet projections beside the image patches), Fig. 7
(occlusion maps of three held-out images), an adversarial panel (L-BFGS), an excite panel,
Fig. 5 (invariance to translation, scale and rotation), a text report with the held-out
accuracy and the layer summary, Fig. 4 (feature evolution over the shipped checkpoints of
epochs 0, 1, 2, 5, 10 and 20, with how settled each layer is), the health report
(``health.txt``, ``health.json``), and the gallery (``gallery/index.html``): a page for every
channel of the 5 conv layers over 2,000 held-out images, with Network Dissection labels, its
evolution strip, and the health report on the index.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

from matplotlib.figure import Figure

from vizcnn.data.shapes import HELD_OUT_SEED, SHAPE_CLASSES, held_out_image
from vizcnn.doctor import doctor
from vizcnn.evolution import feature_evolution
from vizcnn.io import atomic_path, check_replaceable, writable_parent
from vizcnn.layers import list_layers
from vizcnn.models import DEMO_EPOCHS, load_model
from vizcnn.progress import progress_bar
from vizcnn.render import panels
from vizcnn.render.figures import save_figure
from vizcnn.render.gallery import write_gallery
from vizcnn.scan import scan_topk
from vizcnn.summary import format_summary, summarize
from vizcnn.train import predict, render_batch

__all__ = [
    "run_demo",
]

DEMO_IMAGES = (0, 1, 2, 3)
HELD_OUT_SAMPLE = 1000
TOP_K_SCAN = "shapes:2000"  # the held-out images scanned for the Fig. 2 figures
TOP_K_CHANNELS = 16  # channels shown per layer
FEATVIS_CHANNELS = 4  # channels per layer beside their feature visualization (the strongest)
# channels per layer whose feature visualization the demo's gallery computes (the strongest):
# 80 of 496 keep the demo at two minutes; `vizcnn gallery demo shapes:2000` computes all
GALLERY_FEATURE_VIS = 16
OCCLUSION_IMAGES = (0, 1, 2)  # held-out images of the Fig. 7 figure
OCCLUSION_LAYER = "features.11"  # conv5 after its ReLU: the paper's "layer 5" feature maps
PROBE_IMAGE = 1  # the held-out image of the adversarial and excite panels
EXCITE_LAYER = "features.6"  # conv3; the panel excites its strongest feature map
INVARIANCE_IMAGES = (0, 1, 2, 3)
INVARIANCE_LAYERS = ("features.1", "classifier.2")  # layer 1 and the hidden FC layer, after ReLU
GALLERY_DATA = "shapes:2000"  # the gallery: every channel of the 5 conv layers over these
EVOLUTION_CHECKPOINTS = tuple(f"demo:{epoch}" for epoch in DEMO_EPOCHS)
EVOLUTION_CHANNELS = 6  # channels per layer in the Fig. 4 figure (the gallery shows them all)


def _figures(model, conv_layers: list[str]) -> Iterator[tuple[str, Figure]]:
    """Every figure of the demo as (file name, figure), drawn one at a time, each by one
    panel: 2 per conv layer and 5 more."""
    images = [held_out_image(i) for i in DEMO_IMAGES]
    yield "filters_layer1.png", panels.filters_panel(model).figure
    for number, layer in enumerate(conv_layers, start=1):
        yield (f"maps_layer{number}_{layer}.png",
               panels.feature_maps_panel(model, images, layer, predictions=True).figure)
    top = scan_topk(model, TOP_K_SCAN, conv_layers, k=9, progress=False)
    for number, layer in enumerate(conv_layers, start=1):
        yield (f"fig2_layer{number}_{layer}.png",
               panels.top_patches_panel(model, top, TOP_K_SCAN, layer,
                                        range(TOP_K_CHANNELS)).figure)
    yield ("fig2_feature_visualization.png",
           panels.featvis_beside_top_panel(model, top, TOP_K_SCAN, conv_layers,
                                           FEATVIS_CHANNELS).figure)
    yield "fig7_occlusion.png", panels.occlusion_panel(
        model, [held_out_image(i) for i in OCCLUSION_IMAGES], window=16, stride=2,
        layer=OCCLUSION_LAYER, progress=False).figure
    probe = held_out_image(PROBE_IMAGE)
    yield ("adversarial_lbfgs.png",
           panels.adversarial_panel(model, probe, method="lbfgs").figure)
    yield f"excite_{EXCITE_LAYER}.png", panels.excite_panel(model, probe, EXCITE_LAYER).figure
    yield "fig5_invariance.png", panels.invariance_panel(
        model, [held_out_image(i) for i in INVARIANCE_IMAGES], layers=INVARIANCE_LAYERS).figure


def _report(model) -> str:
    """The text report: held-out accuracy per class and the layer summary."""
    test_images, test_labels = render_batch(HELD_OUT_SEED, 0, HELD_OUT_SAMPLE)
    predicted = predict(model, test_images)
    overall = (predicted == test_labels).float().mean().item()
    lines = [
        "vizcnn demo: ZFNetMini on the procedural shapes data set",
        "",
        f"held-out accuracy: {overall:.2%} on {HELD_OUT_SAMPLE} images of seed "
        f"{HELD_OUT_SEED}, never used in training",
    ]
    for label, name in enumerate(SHAPE_CLASSES):
        chosen = test_labels == label
        correct = (predicted[chosen] == label).float().mean().item()
        lines.append(f"  {name:<9} {correct:7.2%}  ({int(chosen.sum())} images)")
    lines += ["", "layers at 64 x 64:", format_summary(summarize(model, 64)), ""]
    return "\n".join(lines)


def run_demo(out_dir: str | Path = "demo-out", *, progress: bool = True) -> list[Path]:
    """Write the demo's figures and report into ``out_dir``; returns the files written."""
    out_dir = Path(out_dir)
    writable_parent(check_replaceable(out_dir, "report.txt", "demo"))
    started = time.perf_counter()
    model = load_model("demo")
    conv_layers = list_layers(model, "conv")
    # the bar is closed before any error or Ctrl-C message reaches the terminal
    with (progress_bar(total=2 * len(conv_layers) + 10, desc="vizcnn demo",
                       disable=not progress) as bar,
          atomic_path(out_dir) as staging):
        staging.mkdir()
        for name, figure in _figures(model, conv_layers):
            save_figure(figure, staging / name)
            bar.update()
        (staging / "report.txt").write_text(_report(model))
        bar.update()
        health = doctor(model, GALLERY_DATA, progress=False)
        (staging / "health.txt").write_text(health.text())
        (staging / "health.json").write_text(health.to_json())
        bar.update()
        evolution = feature_evolution(EVOLUTION_CHECKPOINTS, GALLERY_DATA, conv_layers,
                                      {name: "all" for name in conv_layers}, progress=False)
        save_figure(panels.drawn_evolution(evolution, {
            name: range(EVOLUTION_CHANNELS) for name in conv_layers}).figure,
            staging / "fig4_evolution.png")
        bar.update()
        write_gallery(model, GALLERY_DATA, staging / "gallery", progress=False,
                      command="vizcnn demo", health=health, checkpoints=evolution,
                      feature_vis_channels=GALLERY_FEATURE_VIS)
        bar.update()
        written = sorted(p.name for p in staging.iterdir())
    if progress:
        print(f"demo written in {time.perf_counter() - started:.1f} s")
    return [out_dir / name for name in written if name != "gallery"] + [
        out_dir / "gallery" / "index.html"]

