"""Write the committed pictures in gallery/ (importable: ``make_gallery(out_dir)``).

- ``gallery/demo/``: what ``vizcnn demo`` writes (first-layer filters, feature maps of every
  conv layer, Fig. 2 (top-9 projections and patches) of every conv layer, Fig. 7, the
  adversarial, excite and Fig. 5 panels, the report) for the bundled demo network;
- ``gallery/receptive_fields.png``: the receptive fields of AlexNet (analytic, a chain) and
  ResNet18 (gradient, a residual graph) on scikit-image's photograph of Chelsea the cat. Fields
  do not depend on the weights, so no weights are downloaded.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import skimage.data
from matplotlib.figure import Figure

import vizcnn
from vizcnn.demo import run_demo
from vizcnn.render import receptive_field_boxes, save_figure

LAYERS = {
    "alexnet": ["features.0", "features.3", "features.6", "features.10", "features.12"],
    "resnet18": ["conv1", "layer1", "layer2", "layer3", "layer4"],
}


def make_gallery(out_dir: str | Path = "gallery") -> list[str]:
    photo = cv2.resize(skimage.data.chelsea(), (224, 224), interpolation=cv2.INTER_AREA)
    fig = Figure(figsize=(8.6, 3.4), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, (arch, layers) in zip(axes, LAYERS.items(), strict=True):
        model = vizcnn.load_model(f"torchvision:{arch}")
        fields = vizcnn.receptive_fields(model, layers, 224)
        receptive_field_boxes(photo, fields, ax=ax)
        method = {field.method for field in fields.values()}
        ax.set_title(f"{arch}: centre unit per layer ({'/'.join(sorted(method))})", fontsize=9)
    written = [save_figure(fig, Path(out_dir) / "receptive_fields.png", dpi=150)]
    return written + [str(path) for path in run_demo(Path(out_dir) / "demo", progress=False)]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gallery")
    for path in make_gallery(parser.parse_args().out):
        print(f"wrote {path}")
