"""`vizcnn demo`: what the bundled network has learned, from nothing but the package.

Writes into one folder (built in a temporary folder and renamed into place, so an interrupted
run leaves nothing half-written): the first-layer filters, feature-map grids of every conv layer
for a few held-out shapes images, Zeiler & Fergus Fig. 2 for every conv layer (the top-9
held-out images of 16 channels, their deconvnet projections beside the image patches), Fig. 7
(occlusion maps of three held-out images), an adversarial panel (L-BFGS), an excite panel,
Fig. 5 (invariance to translation, scale and rotation), and a text report with the held-out
accuracy and the layer summary.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from tqdm import tqdm

from vizcnn.data.shapes import HELD_OUT_SEED, SHAPE_CLASSES, held_out_image
from vizcnn.deconv import Deconvnet, top_patches
from vizcnn.hooks import activations as vizcnn_activations
from vizcnn.hooks import capture, preserved_state
from vizcnn.io import atomic_path, check_replaceable, writable_parent
from vizcnn.layers import list_layers, resolve_layer
from vizcnn.models import DEMO_PREPROCESSING, load_model, preprocess
from vizcnn.probes.occlusion import occlusion
from vizcnn.render.figures import (
    feature_maps_figure,
    filters_figure,
    occlusion_figure,
    save_figure,
    top_patches_figure,
)
from vizcnn.scan import scan_topk
from vizcnn.summary import format_summary, summarize
from vizcnn.train import predict, render_batch

DEMO_IMAGES = (0, 1, 2, 3)
HELD_OUT_SAMPLE = 1000
TOP_K_SCAN = "shapes:2000"  # the held-out images scanned for the Fig. 2 figures
TOP_K_CHANNELS = 16  # channels shown per layer
OCCLUSION_IMAGES = (0, 1, 2)  # held-out images of the Fig. 7 figure
OCCLUSION_LAYER = "features.11"  # conv5 after its ReLU: the paper's "layer 5" feature maps
PROBE_IMAGE = 1  # the held-out image of the adversarial and excite panels
INVARIANCE_IMAGES = (0, 1, 2, 3)
INVARIANCE_LAYERS = ("features.1", "classifier.2")  # layer 1 and the hidden FC layer, after ReLU


def maps_for_images(model, layer: str, images: list[np.ndarray]) -> Figure:
    """Rows of (input image | feature-map grid of ``layer``), one row per image."""
    batch = torch.cat([preprocess(model, image) for image in images])
    with (preserved_state(model, eval_mode=True), capture(model, [layer]) as captured,
          torch.no_grad()):
        predicted = model(batch).argmax(1).tolist()  # one pass: maps and predictions
    maps = captured[layer]
    fig = Figure(figsize=(6.4, 3.0 * len(images)), layout="constrained")
    axes = fig.subplots(len(images), 2, width_ratios=[1, 1.6], squeeze=False)
    classes = getattr(model, "vizcnn_classes", None) or [str(i) for i in range(10_000)]
    for row, image in enumerate(images):
        axes[row, 0].imshow(image)
        axes[row, 0].set_axis_off()
        axes[row, 0].set_title(f"predicted: {classes[predicted[row]]}", fontsize=9)
        feature_maps_figure(maps[row], layer=layer, ax=axes[row, 1],
                            title=None if row == 0 else "")
    return fig


def occlusion_for_images(model, images: list[np.ndarray]) -> Figure:
    """Zeiler & Fergus Fig. 7 for a few images: occluder 16 x 16, stride 2, the strongest
    feature map of ``OCCLUSION_LAYER`` and its projection."""
    x = torch.cat([preprocess(model, image) for image in images])
    maps = occlusion(model, x, window=16, stride=2, layer=OCCLUSION_LAYER, progress=False)
    net = Deconvnet(model)
    projections = torch.cat([net.project(x[n:n + 1], OCCLUSION_LAYER, int(maps.channel[n]))
                             for n in range(len(images))])
    return occlusion_figure(np.stack(images), maps, projections=projections,
                            classes=model.vizcnn_classes)


def probe_figures(model) -> list[tuple[str, Figure]]:
    """The adversarial panel (L-BFGS, with the layer displacement), the excite panel (the
    strongest layer-3 map) and Fig. 5 (invariance of four images)."""
    from vizcnn.probes.adversarial import excite, layer_displacement, lbfgs_adversarial
    from vizcnn.probes.invariance import TRANSFORMS, invariance
    from vizcnn.render.figures import adversarial_figure, excite_figure, invariance_figure

    mean, std = DEMO_PREPROCESSING.mean, DEMO_PREPROCESSING.std
    x = preprocess(model, held_out_image(PROBE_IMAGE))
    attack = lbfgs_adversarial(model, x)
    adversarial = adversarial_figure(x, attack, displacement=layer_displacement(model, x, attack.x),
                                     classes=model.vizcnn_classes, mean=mean, std=std)
    channel = int(vizcnn_activations(model, x, ["features.6"])["features.6"][0]
                  .amax(dim=(1, 2)).argmax())
    excited = excite_figure(x, excite(model, x, "features.6", channel, eps=8 / 255),
                            mean=mean, std=std)
    results = {t: [invariance(model, held_out_image(i), t, layers=INVARIANCE_LAYERS)
                   for i in INVARIANCE_IMAGES] for t in TRANSFORMS}
    return [("adversarial_lbfgs.png", adversarial), ("excite_features.6.png", excited),
            ("fig5_invariance.png", invariance_figure(results, classes=model.vizcnn_classes))]


def run_demo(out_dir: str | Path = "demo-out", *, progress: bool = True) -> list[Path]:
    """Write the demo's figures and report into ``out_dir``; returns the files written."""
    out_dir = Path(out_dir)
    writable_parent(check_replaceable(out_dir, "report.txt", "demo"))
    started = time.perf_counter()
    model = load_model("demo")
    conv_layers = list_layers(model, "conv")
    images = [held_out_image(i) for i in DEMO_IMAGES]
    # the bar is closed before any error or Ctrl-C message reaches the terminal
    with (tqdm(total=2 * len(conv_layers) + 8, desc="vizcnn demo", disable=not progress) as steps,
          atomic_path(out_dir) as staging):
        staging.mkdir()
        first = conv_layers[0]
        save_figure(filters_figure(resolve_layer(model, first).weight, layer=first),
                    staging / "filters_layer1.png")
        steps.update()
        for number, layer in enumerate(conv_layers, start=1):
            save_figure(maps_for_images(model, layer, images),
                        staging / f"maps_layer{number}_{layer}.png")
            steps.update()
        top = scan_topk(model, TOP_K_SCAN, conv_layers, k=9, progress=False)
        steps.update()
        for number, layer in enumerate(conv_layers, start=1):
            patches = top_patches(model, top, TOP_K_SCAN, layer, range(TOP_K_CHANNELS))
            save_figure(top_patches_figure(patches, mean=DEMO_PREPROCESSING.mean,
                                           std=DEMO_PREPROCESSING.std),
                        staging / f"fig2_layer{number}_{layer}.png")
            steps.update()
        save_figure(occlusion_for_images(model, [held_out_image(i) for i in OCCLUSION_IMAGES]),
                    staging / "fig7_occlusion.png")
        steps.update()
        for name, fig in probe_figures(model):
            save_figure(fig, staging / name)
            steps.update()
        test_images, test_labels = render_batch(HELD_OUT_SEED, 0, HELD_OUT_SAMPLE)
        predicted = predict(model, test_images)
        overall = (predicted == test_labels).float().mean().item()
        steps.update()
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
        (staging / "report.txt").write_text("\n".join(lines))
        steps.update()
        written = sorted(p.name for p in staging.iterdir())
    if progress:
        print(f"demo written in {time.perf_counter() - started:.1f} s")
    return [out_dir / name for name in written]

