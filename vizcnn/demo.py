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

The gallery runs first: its one pass over the data (each image decoded once, the network and
its five earlier epochs run once per batch) gives the top-9 of the Fig. 2 figures, the health
report and the evolution of Fig. 4, and its feature visualizations are the ones drawn beside
the top-9. The demo's networks are its own copies in the channels-last layout, which oneDNN's
convolutions run about twice as fast on the CPU.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch import nn

from vizcnn.data.shapes import HELD_OUT_SEED, SHAPE_CLASSES, held_out_image
from vizcnn.io import atomic_path, check_replaceable, writable_parent
from vizcnn.layers import list_layers
from vizcnn.models import DEMO_EPOCHS, load_model
from vizcnn.progress import progress_bar
from vizcnn.render import panels
from vizcnn.render.figures import save_figure
from vizcnn.render.gallery import Gallery, make_gallery
from vizcnn.sanity import sanity_check
from vizcnn.summary import format_summary, summarize
from vizcnn.train import predict, render_batch

__all__ = [
    "run_demo",
]

DEMO_IMAGES = (0, 1, 2, 3)
HELD_OUT_SAMPLE = 1000
TOP_K_CHANNELS = 16  # channels shown per layer
FEATVIS_CHANNELS = 4  # channels per layer beside their feature visualization (the strongest)
# channels per layer whose feature visualization the demo's gallery computes (the strongest):
# 80 of 496 keep the demo near a minute and a half; `vizcnn gallery demo shapes:2000`
# computes all
GALLERY_FEATURE_VIS = 16
OCCLUSION_IMAGES = (0, 1, 2)  # held-out images of the Fig. 7 figure
OCCLUSION_LAYER = "features.11"  # conv5 after its ReLU: the paper's "layer 5" feature maps
PROBE_IMAGE = 1  # the held-out image of the adversarial and excite panels
EXCITE_LAYER = "features.6"  # conv3; the panel excites its strongest feature map
INVARIANCE_IMAGES = (0, 1, 2, 3)
INVARIANCE_LAYERS = ("features.1", "classifier.2")  # layer 1 and the hidden FC layer, after ReLU
GALLERY_DATA = "shapes:2000"  # the gallery: every channel of the 5 conv layers over these
EVOLUTION_CHANNELS = 6  # channels per layer in the Fig. 4 figure (the gallery shows them all)
SANITY_LAYER = "features.6"  # conv3: the sanity figure of all three pictures (Adebayo et al.)
SANITY_DATA = "shapes:500"  # the images its deconvnet and occlusion rows come from
# (method, images): the deconvnet's top 2 images per channel; occlusion's first 4 images, as
# many as keep its class-score maps' band (3 random networks x 4 maps) from being a lucky few
SANITY_METHODS = (("deconv", 2), ("occlusion", 4), ("feature_visualization", 1))


def _demo_network(spec: str) -> nn.Module:
    """The demo network (or one of its epochs) in the channels-last layout: oneDNN's
    convolutions take it on the CPU, and the demo's passes over the data run up to twice as
    fast. These are the demo's own copies; their numbers differ from the default layout's by
    float rounding only."""
    return load_model(spec).to(memory_format=torch.channels_last)


def _figures(model, conv_layers: list[str], gallery: Gallery) -> Iterator[tuple[str, Figure]]:
    """Every figure of the demo as (file name, figure), drawn one at a time, each by one
    panel: 2 per conv layer and 7 more. The top-9, the feature visualizations and the
    evolution are the gallery's: one pass over the data feeds them all."""
    images = [held_out_image(i) for i in DEMO_IMAGES]
    yield "filters_layer1.png", panels.filters_panel(model).figure
    for number, layer in enumerate(conv_layers, start=1):
        yield (f"maps_layer{number}_{layer}.png",
               panels.feature_maps_panel(model, images, layer, predictions=True).figure)
    for number, layer in enumerate(conv_layers, start=1):
        yield (f"fig2_layer{number}_{layer}.png",
               panels.top_patches_panel(model, gallery.top, GALLERY_DATA, layer,
                                        range(TOP_K_CHANNELS)).figure)
    yield ("fig2_feature_visualization.png",
           panels.featvis_beside_top_panel(model, gallery.top, GALLERY_DATA, conv_layers,
                                           FEATVIS_CHANNELS,
                                           visualized=gallery.feature_vis).figure)
    yield "fig4_evolution.png", panels.drawn_evolution(gallery.evolution, {
        name: range(EVOLUTION_CHANNELS) for name in conv_layers}).figure
    yield "fig7_occlusion.png", panels.occlusion_panel(
        model, [held_out_image(i) for i in OCCLUSION_IMAGES], window=16, stride=2,
        layer=OCCLUSION_LAYER, progress=False).figure
    probe = held_out_image(PROBE_IMAGE)
    yield ("adversarial_lbfgs.png",
           panels.adversarial_panel(model, probe, method="lbfgs").figure)
    yield f"excite_{EXCITE_LAYER}.png", panels.excite_panel(model, probe, EXCITE_LAYER).figure
    yield "fig5_invariance.png", panels.invariance_panel(
        model, [held_out_image(i) for i in INVARIANCE_IMAGES], layers=INVARIANCE_LAYERS).figure
    checks = [sanity_check(model, SANITY_DATA, SANITY_LAYER, method, images=images,
                           progress=False) for method, images in SANITY_METHODS]
    yield f"sanity_{SANITY_LAYER}.png", panels.drawn_sanity(model, checks).figure


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
    model = _demo_network("demo")
    conv_layers = list_layers(model, "conv")
    # the bar is closed before any error or Ctrl-C message reaches the terminal
    with (progress_bar(total=2 * len(conv_layers) + 11, desc="vizcnn demo",
                       disable=not progress) as bar,
          atomic_path(out_dir) as staging):
        staging.mkdir()
        # the gallery first: its one pass over the data gives the top-9, the health report
        # and the checkpoints' evolution that the figures and the report draw on
        bar.set_postfix_str("the gallery: one pass over the data, then its pages")
        gallery = make_gallery(model, GALLERY_DATA, staging / "gallery", progress=False,
                               command="vizcnn demo",
                               checkpoints={epoch: _demo_network(f"demo:{epoch}")
                                            for epoch in DEMO_EPOCHS},
                               feature_vis_channels=GALLERY_FEATURE_VIS)
        (staging / "health.txt").write_text(gallery.health.text())
        (staging / "health.json").write_text(gallery.health.to_json())
        bar.update(2)
        bar.set_postfix_str("the figures")
        for name, figure in _figures(model, conv_layers, gallery):
            save_figure(figure, staging / name)
            bar.update()
        (staging / "report.txt").write_text(_report(model))
        bar.update()
        written = sorted(p.name for p in staging.iterdir())
    if progress:
        print(f"demo written in {time.perf_counter() - started:.1f} s")
    return [out_dir / name for name in written if name != "gallery"] + [
        out_dir / "gallery" / "index.html"]

