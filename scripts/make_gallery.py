"""Write the committed pictures in gallery/ (importable: ``make_gallery(out_dir)``).

- ``gallery/demo/``: the figures and the report that ``vizcnn demo`` writes (first-layer
  filters, feature maps of every conv layer, Fig. 2 of every conv layer, Fig. 7, the
  adversarial, excite and Fig. 5 panels, the sanity checks of layer 3) for the bundled demo
  network. The demo's gallery site
  itself (about 10,000 files) is not committed: three screenshots of it are,
  ``gallery/gallery_index.png``, ``gallery_layer.png`` and ``gallery_channel.png``, taken by
  headless Chromium (Debian's ``chromium`` and ``chromium-driver``, through Selenium).
- ``gallery/fig6_first_layers.png`` and ``gallery/first_layers.txt``: Zeiler & Fergus's
  first-layer experiment (section 4.1, Fig. 6) on the demo world: ZFNetMini (7x7, stride 2)
  beside the same network with AlexNet's first layer (11x11, stride 4), trained with the same
  recipe and seed (``vizcnn train-demo --arch demo_alexnet``, about 13 minutes on 2 cores; a
  run folder given with ``--alexnet-run`` is used as it is), with both health reports.
- ``gallery/receptive_fields.png``: the receptive fields of AlexNet (analytic, a chain) and
  ResNet18 (gradient, a residual graph) on scikit-image's photograph of Chelsea the cat. Fields
  do not depend on the weights, so no weights are downloaded.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
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
SHOWN_LAYER = "layer4_features.8"  # the gallery pages in the screenshots
SHOWN_CHANNEL = 82  # a ring detector of layer 4 (Network Dissection: ring)
EXPERIMENT_DATA = "shapes:2000"  # held-out images the two first layers are compared on


def first_layer_experiment(out_dir: Path, alexnet_run: Path) -> list[str]:
    """Fig. 6 on the demo world: the demo network beside its AlexNet-first-layer twin."""
    from vizcnn.render.panels import first_layers_panel
    from vizcnn.train import train_demo

    if not (alexnet_run / "final.pt").is_file():
        train_demo(alexnet_run, arch="demo_alexnet")
    models = {"ZFNetMini 7x7/2": vizcnn.load_model("demo"),
              "AlexNet-shaped 11x11/4": vizcnn.load_model(alexnet_run / "final.pt")}
    panel = first_layers_panel(models, EXPERIMENT_DATA)
    written = [save_figure(panel.figure, out_dir / "fig6_first_layers.png", dpi=150)]
    text = "\n\n".join(f"== {name} ==\n{report.text()}" for name, report in panel.result.items())
    (out_dir / "first_layers.txt").write_text(text)
    return [*written, str(out_dir / "first_layers.txt")]


def make_gallery(out_dir: str | Path = "gallery", alexnet_run: str | Path = "runs/alexnet",
                 experiment: bool = True) -> list[str]:
    out_dir = Path(out_dir)
    photo = cv2.resize(skimage.data.chelsea(), (224, 224), interpolation=cv2.INTER_AREA)
    fig = Figure(figsize=(8.6, 3.4), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, (arch, layers) in zip(axes, LAYERS.items(), strict=True):
        model = vizcnn.load_model(f"torchvision:{arch}")
        fields = vizcnn.receptive_fields(model, layers, 224)
        receptive_field_boxes(photo, fields, ax=ax)
        method = {field.method for field in fields.values()}
        ax.set_title(f"{arch}: centre unit per layer ({'/'.join(sorted(method))})", fontsize=9)
    written = [save_figure(fig, out_dir / "receptive_fields.png", dpi=150)]
    with tempfile.TemporaryDirectory() as scratch:
        files = run_demo(Path(scratch) / "demo", progress=False)
        shutil.rmtree(out_dir / "demo", ignore_errors=True)
        (out_dir / "demo").mkdir(parents=True)
        for path in files:
            if path.name != "index.html":
                shutil.copy(path, out_dir / "demo" / path.name)
                written.append(str(out_dir / "demo" / path.name))
        written += screenshots(Path(scratch) / "demo" / "gallery", out_dir)
    if not experiment:  # its committed files stay as they are
        return written
    return written + first_layer_experiment(out_dir, Path(alexnet_run))


def screenshots(site: Path, out_dir: Path) -> list[str]:
    """The gallery's index, a layer page and a channel page, as a person sees them."""
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options,
                              service=webdriver.ChromeService(shutil.which("chromedriver")))
    pages = {"gallery_index.png": site / "index.html",
             "gallery_layer.png": site / f"{SHOWN_LAYER}.html",
             "gallery_channel.png": site / SHOWN_LAYER / f"{SHOWN_CHANNEL}.html"}
    try:
        for name, page in pages.items():
            driver.get(page.as_uri())
            driver.save_screenshot(str(out_dir / name))
    finally:
        driver.quit()
    return [str(out_dir / name) for name in pages]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gallery")
    parser.add_argument("--alexnet-run", default="runs/alexnet", help="the AlexNet-shaped "
                        "network's training run (trained there when missing)")
    parser.add_argument("--only-experiment", action="store_true",
                        help="write only the first-layer experiment")
    parser.add_argument("--skip-experiment", action="store_true",
                        help="write everything but the first-layer experiment")
    args = parser.parse_args()
    paths = (first_layer_experiment(Path(args.out), Path(args.alexnet_run))
             if args.only_experiment else make_gallery(args.out, args.alexnet_run,
                                                      not args.skip_experiment))
    for path in paths:
        print(f"wrote {path}")
