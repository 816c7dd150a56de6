"""Speed of vizcnn against its references, as ratios measured in one process.

    python scripts/bench.py                       # every section
    python scripts/bench.py --section deconv      # or scan; --quick for a short run

Sections:
    deconv  top-9 projections of every channel of AlexNet features.10 (and features.3): vizcnn's
            batched deconvnet against a loop of Captum's NeuronDeconvolution (one call per
            channel, its 9 images as one batch), same numbers checked on every projection.
    scan    scan_topk over N images against a bare no-grad forward pass to the same layer, on
            the same batches; and the peak memory of a scan of 200 and of 2,000 images (each in
            a fresh process).
    occlusion  exact incremental, approximate and naive occlusion against Captum's Occlusion
            at its best perturbations_per_eval, AlexNet and VGG16 at 224, window 16.
    adversarial  FGSM / PGD success at 2, 4, 8 grey levels and L-BFGS success and distortion on
            200 correctly classified demo images; the demo model's invariance numbers.

    featvis  feature visualization of the demo network's features.6 (64 px): vizcnn, all
            channels batched, against Lucent's ``render_vis`` with its own recipe, one call
            per channel as a Lucent user writes it, at the same size and steps; channel-steps
            per second and the activation each image reached (the strongest unit of the map
            on the untransformed image, both sides measured alike). Needs torch-lucent:
            ``pip install --no-deps torch-lucent==0.1.8 kornia decorator ipython`` (a bench
            dependency only; two kornia functions it calls by their old names get aliases
            here, in the bench).

    featvis-quality  for every live channel of the demo network's 5 conv layers (its
            strongest natural unit over shapes:2000 above 0), whether its feature
            visualization (neuron objective, the map's centre unit) reaches that natural
            unit, per layer, at 64, 128, 256 and 512 steps (--quick: the default steps only);
            and the same at the default steps on a network unlike ours (PReLU, GELU as a
            function, a ceil-mode pool, LeakyReLU, its own normalisation, 57 px inputs),
            trained here (8 epochs of 6,000 shapes, under a minute).

    gallery-scale  the demo gallery over 2,000, 8,000 and 20,000 shapes: seconds per stage,
            peak memory, images decoded, forward passes, the data pass against a bare decode
            + forward pass; 1 and 2 processes under torchrun.

Weights are random (seeded): nothing is downloaded, and speed does not depend on the weights.
The images are crops of scikit-image's and scikit-learn's photographs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torchvision

import vizcnn
from vizcnn.data.shapes import HELD_OUT_SEED
from vizcnn.deconv import Deconvnet
from vizcnn.layers import resolve_layer
from vizcnn.models import IMAGENET_PREPROCESSING, Preprocessing


def photo_batch(count: int, size: int = 224, seed: int = 0) -> torch.Tensor:
    """``count`` normalised (3, size, size) crops of real photographs, randomly placed and
    flipped: (count, 3, size, size)."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    photos = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee(),
              skimage.data.rocket(), *load_sample_images().images]
    rng = np.random.default_rng(seed)
    imagenet = IMAGENET_PREPROCESSING
    crops = []
    for _ in range(count):
        photo = photos[rng.integers(len(photos))]
        scale = rng.uniform(0.5, 1.0)
        side = int(min(photo.shape[:2]) * scale)
        top = rng.integers(photo.shape[0] - side + 1)
        left = rng.integers(photo.shape[1] - side + 1)
        crop = photo[top:top + side, left:left + side]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        tensor = torch.tensor(np.ascontiguousarray(crop)).permute(2, 0, 1)
        crops.append(Preprocessing(resize=(size, size), crop=None, mean=imagenet.mean,
                                   std=imagenet.std)(tensor))
    return torch.stack(crops)


def _alexnet() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.alexnet().eval()


def _timed(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


# --------------------------------------------------------------------------- deconv


def bench_deconv(quick: bool, image_counts: tuple[int, ...] = (64, 512)) -> None:
    model = _alexnet()
    print(f"deconv: AlexNet (random weights), top-9 of N photo crops at 224 x 224, "
          f"{torch.get_num_threads()} threads")
    _deconv_header()
    for count in (24,) if quick else image_counts:
        images = photo_batch(count)
        for layer in ["features.3", "features.10"]:
            _deconv_layer(model, images, layer, 32 if quick else None)
    _deconv_legend()
    _bench_deconv_residual(quick)


def _deconv_header() -> None:
    print(f"{'layer':<12} {'N':>4} {'distinct':>8} {'channels':>8} {'vizcnn s':>9} "
          f"{'patches s':>9} {'captum s':>9} {'+fwd s':>7} {'speed-up':>8} {'vs +fwd':>7} "
          f"{'patches':>7} {'max rel diff':>12}")


def _deconv_legend() -> None:
    print("  vizcnn: full-size projections (project_many, 16 channels per call) and patches: "
          "receptive-field patches only (project_patches, all channels in one call, what "
          "Fig. 2 draws), both given the scan's activations, as top_patches does. captum: "
          "NeuronDeconvolution per channel (its 9 images as one batch) times the scan's "
          "activations; +fwd: plus the forward pass that recomputes them (the reference as "
          "first measured). speed-up: captum / vizcnn; vs +fwd: (captum + fwd) / vizcnn; "
          "patches: captum / patches. distinct: images among the top-9 lists")


def _bench_deconv_residual(quick: bool) -> None:
    """Residual networks (random weights): top-9 of 16 channels of block outputs, N photo
    crops at 224, against the same Captum loop; the route each layer took is printed."""
    images = photo_batch(24 if quick else 64)
    cases = [("resnet18", ["layer2.0", "layer2.1", "layer3.0", "layer3.1", "layer4.0",
                           "layer4.1"]),
             ("resnet50", ["layer2.3", "layer3.0", "layer3.5"])]
    for arch, layers in cases[:1] if quick else cases:
        torch.manual_seed(0)
        model = torchvision.models.get_model(arch).eval()
        print(f"deconv: {arch} (random weights), top-9 of 16 channels, {len(images)} photo "
              "crops at 224 x 224")
        _deconv_header()
        for layer in layers:
            _deconv_layer(model, images, layer, 16)
    print("  routes: 'autograd, cropped' runs each unit's forward and backward pass on its "
          "receptive field's crop; 'explicit graph, each unit's cone' goes down the traced "
          "graph, each transposed conv on the unit's cone alone")


def _deconv_layer(model, images, layer: str, channels: int | None) -> None:
    top = vizcnn.scan_topk(model, images, [layer], k=9, progress=False)
    channels = min(channels or 10**9, top.values[layer].shape[0])
    indices = top.indices[layer][:channels]  # (C, 9)
    positions = top.positions[layer][:channels]  # (C, 9, 2)
    values = top.values[layer][:channels]  # (C, 9)
    pair_channels = torch.arange(channels).repeat_interleave(9)
    net = Deconvnet(model)
    net.project_many(images[:2], layer, [0, 1])  # the first call's one-off costs, untimed
    patches, patch_seconds = _timed(net.project_patches, images, layer, pair_channels,
                                    image_indices=indices.flatten(),
                                    positions=positions.view(-1, 2),
                                    activations=values.flatten())
    captum = _captum(model, layer)
    vizcnn_seconds = captum_seconds = forward_seconds = 0.0
    worst = 0.0
    for start in range(0, channels, 16):
        chunk = slice(start, min(start + 16, channels))
        ours, seconds = _timed(net.project_many, images, layer,
                               pair_channels[chunk.start * 9:chunk.stop * 9],
                               image_indices=indices[chunk].flatten(),
                               positions=positions[chunk].reshape(-1, 2),
                               activations=values[chunk].flatten())
        vizcnn_seconds += seconds
        for row, channel in enumerate(range(chunk.start, chunk.stop)):
            x = images[indices[channel]]
            gradient, seconds = _timed(captum, x, channel, positions[channel])
            captum_seconds += seconds
            with torch.no_grad():  # what the reference first paid to know the activations
                _, seconds = _timed(vizcnn.activations, model, x, [layer])
            forward_seconds += seconds
            reference = gradient * values[channel].view(-1, 1, 1, 1)
            mine = ours[row * 9:(row + 1) * 9]
            scale = reference.abs().amax(dim=(1, 2, 3)).clamp_min(1e-30)
            worst = max(worst, float(((mine - reference).abs().amax(dim=(1, 2, 3))
                                      / scale).max()))
    distinct = len(set(indices.flatten().tolist()))
    with_forward = captum_seconds + forward_seconds
    print(f"{layer:<12} {len(images):>4} {distinct:>8} {channels:>8} {vizcnn_seconds:>9.2f} "
          f"{patch_seconds:>9.2f} {captum_seconds:>9.2f} {forward_seconds:>7.2f} "
          f"{captum_seconds / vizcnn_seconds:>7.1f}x {with_forward / vizcnn_seconds:>6.1f}x "
          f"{captum_seconds / patch_seconds:>6.1f}x {worst:>12.1e}   {patches.route}")


def _captum(model, layer):
    """Captum's NeuronDeconvolution at given units (one per image): the deconvnet image of
    each unit, which the reference multiplies by the unit's activation."""
    from captum.attr import NeuronDeconvolution

    deconvolution = NeuronDeconvolution(model, resolve_layer(model, layer))

    def project(x, channel, positions):
        rows = torch.arange(len(x))

        def unit(output):
            return output[rows, channel, positions[:, 0], positions[:, 1]]

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return deconvolution.attribute(x, neuron_selector=unit)

    return project


# --------------------------------------------------------------------------- scan


def bench_scan(quick: bool) -> None:
    cases = [("AlexNet features.10", _alexnet(), photo_batch(64 if quick else 256),
              "features.10", 32),
             ("ZFNetMini features.10", vizcnn.load_model("demo"),
              _shapes(1000 if quick else 4000), "features.10", 128)]
    print(f"scan: scan_topk against a bare no-grad forward pass to the layer, same batches, "
          f"{torch.get_num_threads()} threads")
    print(f"{'model':<22} {'images':>6} {'scan s':>8} {'forward s':>9} {'ratio':>6} "
          f"{'images/s':>9}")
    for label, model, images, layer, batch in cases:
        prefix = _prefix(model, layer)
        scan_seconds, forward_seconds = [], []
        for _ in range(3):  # best of three: the machine is shared
            _, seconds = _timed(vizcnn.scan_topk, model, images, [layer], k=9,
                                batch_size=batch, progress=False)
            scan_seconds.append(seconds)
            _, seconds = _timed(_bare_forward, prefix, images, batch)
            forward_seconds.append(seconds)
        scan, forward = min(scan_seconds), min(forward_seconds)
        print(f"{label:<22} {len(images):>6} {scan:>8.2f} {forward:>9.2f} "
              f"{scan / forward:>5.2f}x {len(images) / scan:>9.0f}")
    _bench_folder(quick)
    small, large = (_peak_memory(n) for n in (200, 2000))
    print(f"peak memory (VmHWM) of scan_topk(demo, 'shapes:N', 5 conv layers) in a fresh "
          f"process: N=200 {small / 2**20:.0f} MiB, N=2000 {large / 2**20:.0f} MiB "
          f"(+{(large / small - 1) * 100:.1f} %)")


def _bench_folder(quick: bool) -> None:
    """A folder of JPEG photographs (500 x 375): decoding alone with 0, 1 and 2 worker
    processes, and the folder scan of AlexNet's features.10 against the forward pass on the
    same images decoded beforehand."""
    import tempfile

    import cv2

    from vizcnn.scan import input_batches

    count = 100 if quick else 400
    model = vizcnn.with_model_info(_alexnet(), preprocessing=IMAGENET_PREPROCESSING)
    with tempfile.TemporaryDirectory() as folder:
        rng = np.random.default_rng(1)
        for i, crop in enumerate(photo_batch(count, size=375, seed=1)):
            pixels = (crop * torch.tensor(IMAGENET_PREPROCESSING.std).view(3, 1, 1)
                      + torch.tensor(IMAGENET_PREPROCESSING.mean).view(3, 1, 1))
            image = (pixels.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
            image = cv2.resize(image, (500, 375))[:, ::-1 if rng.random() < 0.5 else 1]
            cv2.imwrite(f"{folder}/{i:04d}.jpg", cv2.cvtColor(np.ascontiguousarray(image),
                                                              cv2.COLOR_RGB2BGR))
        decode = {}
        for workers in (0, 1, 2):
            _, seconds = _timed(lambda w=workers: [len(i) for i, _, _ in
                                                   input_batches(model, folder, 32, workers=w)])
            decode[workers] = count / seconds
        print(f"folder of {count} JPEG photos (500 x 375), decoding only: "
              + ", ".join(f"{w} workers {rate:.0f} img/s" for w, rate in decode.items())
              + f"; 2 workers / 0: {decode[2] / decode[0]:.2f}x")
        scans = {}
        for workers in (0, 2):
            _, seconds = _timed(vizcnn.scan_topk, model, folder, ["features.10"], k=9,
                                batch_size=32, workers=workers, progress=False)
            scans[workers] = count / seconds
        decoded = torch.cat([x for _, x, _ in input_batches(model, folder, 32, workers=0)])
        _, seconds = _timed(_bare_forward, _prefix(model, "features.10"), decoded, 32)
        print(f"  folder scan, AlexNet features.10: 0 workers {scans[0]:.0f} img/s, 2 workers "
              f"{scans[2]:.0f} img/s; forward alone on the decoded images {count / seconds:.0f} "
              "img/s (on 2 cores decoding and the forward share the cores; on a GPU the "
              "workers feed it)")


def _shapes(count: int) -> torch.Tensor:
    from vizcnn.train import render_batch

    images, _ = render_batch(HELD_OUT_SEED, 0, count)
    return images


def _prefix(model, layer: str) -> torch.nn.Module:
    """The model's ``features`` up to and including ``layer``: the bare forward pass."""
    index = int(layer.split(".")[1])
    return model.features[:index + 1]


def _bare_forward(prefix, images, batch: int) -> None:
    with torch.no_grad():
        for start in range(0, len(images), batch):
            prefix(images[start:start + batch])


def _peak_memory(count: int) -> int:
    """Max RSS in bytes of a fresh process that scans ``count`` shapes images."""
    # VmHWM, not ru_maxrss: a child's ru_maxrss can report the parent's peak from the fork
    code = ("import vizcnn; m = vizcnn.load_model('demo'); "
            f"vizcnn.scan_topk(m, 'shapes:{count}', vizcnn.list_layers(m, 'conv'), "
            "progress=False); print(next(line.split()[1] for line in open('/proc/self/status')"
            " if line.startswith('VmHWM')))")
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True).stdout
    return int(output.split()[-1]) * 1024  # VmHWM is in KiB


# --------------------------------------------------------------------------- occlusion


def bench_occlusion(quick: bool) -> None:
    """vizcnn's occlusion (exact incremental, approximate, naive) against Captum's Occlusion
    at its best perturbations_per_eval, window 16 at 224 x 224. The stride equals the window,
    so each pixel lies under one occluder and Captum's attribution there is exactly
    clean probability - occluded probability: the numbers are compared position by position."""
    from captum.attr import Occlusion
    from skimage.metrics import structural_similarity

    from vizcnn.probes.occlusion import occlusion

    window = stride = 16
    print(f"occlusion: window {window}, stride {stride}, 224 x 224 photo crop, classifier "
          f"logits scaled x50 so that random weights give varied probabilities, "
          f"{torch.get_num_threads()} threads")
    print(f"{'model':<8} {'captum s':>9} {'ppe':>4} {'exact s':>8} {'speed-up':>8} "
          f"{'max |dp|':>9} {'approx s':>8} {'speed-up':>8} {'SSIM':>6} {'max |dp|':>9} "
          f"{'naive s':>8}")
    for arch in ["alexnet", "vgg16"]:
        torch.manual_seed(0)
        model = torchvision.models.get_model(arch).eval()
        with torch.no_grad():
            model.classifier[6].weight.mul_(50.0)
        x = photo_batch(1, seed=3)
        exact, exact_seconds = _timed(occlusion, model, x, window=window, stride=stride,
                                      fill=0.0, progress=False)
        approx, approx_seconds = _timed(occlusion, model, x, window=window, stride=stride,
                                        fill=0.0, approx=True, progress=False)
        naive, naive_seconds = _timed(occlusion, model, x, window=window, stride=stride,
                                      fill=0.0, engine="naive", progress=False)
        target = int(exact.target[0])
        best = None
        for per_eval in (1, 16, 64) if not quick else (16,):
            attribution, seconds = _timed(_captum_occlusion, Occlusion, model, x, window,
                                          target, per_eval)
            if best is None or seconds < best[0]:
                best = (seconds, per_eval, attribution)
        captum_seconds, per_eval, attribution = best
        tops = exact.positions[:, 0, 0]
        lefts = exact.positions[0, :, 1]
        captum_prob = exact.clean_prob[0] - attribution[0, 0][tops][:, lefts]
        exact_error = float((exact.prob[0] - captum_prob).abs().max())
        ssim = structural_similarity(exact.prob[0].numpy(), approx.prob[0].numpy(),
                                     data_range=1.0, win_size=7)
        approx_error = float((approx.prob[0] - exact.prob[0]).abs().max())
        print(f"{arch:<8} {captum_seconds:>9.2f} {per_eval:>4} {exact_seconds:>8.2f} "
              f"{captum_seconds / exact_seconds:>7.1f}x {exact_error:>9.1e} "
              f"{approx_seconds:>8.2f} {captum_seconds / approx_seconds:>7.1f}x {ssim:>6.3f} "
              f"{approx_error:>9.1e} {naive_seconds:>8.2f}")
        naive_error = float((naive.prob - exact.prob).abs().max())
        print(f"  {arch}: naive vs exact max |dp| {naive_error:.1e}; approximate computed "
              f"{approx.computed} of {approx.prob.numel()} positions, reported deviation "
              f"{approx.max_deviation:.1e} on {approx.checked} re-checked")
        ceiling = float(exact.engine_note.split("a ceiling of ")[1].split("x")[0])
        print(f"  {arch}: exact engine {exact.engine_note}; against the naive engine it is "
              f"{naive_seconds / exact_seconds:.1f}x, {naive_seconds / exact_seconds / ceiling:.0%}"
              f" of that ceiling")
    bench_occlusion_prelu()
    bench_occlusion_demo(quick)


def bench_occlusion_prelu() -> None:
    """AlexNet with every ReLU replaced by a PReLU (a network unlike ours): the incremental
    engine treats PReLU as pointwise, so it keeps its lead over re-running the model."""
    from vizcnn.probes.occlusion import occlusion

    torch.manual_seed(0)
    model = torchvision.models.alexnet().eval()
    for parent in (model.features, model.classifier):
        for index, module in enumerate(parent):
            if isinstance(module, torch.nn.ReLU):
                parent[index] = torch.nn.PReLU()
    x = photo_batch(1, seed=3)
    exact, exact_seconds = _timed(occlusion, model, x, window=16, stride=16, fill=0.0,
                                  progress=False)
    naive, naive_seconds = _timed(occlusion, model, x, window=16, stride=16, fill=0.0,
                                  engine="naive", progress=False)
    print(f"  alexnet with PReLU: exact {exact_seconds:.2f} s, naive {naive_seconds:.2f} s "
          f"({naive_seconds / exact_seconds:.1f}x), max |dp| "
          f"{float((exact.prob - naive.prob).abs().max()):.1e}")


def bench_occlusion_demo(quick: bool) -> None:
    """The trained demo network on held-out shapes (window 16, stride 4, overlapping windows):
    speed against Captum's Occlusion, exactness against vizcnn's naive engine (a plain re-run
    of the model), and the approximate mode's SSIM, which needs a trained network's maps."""
    from captum.attr import Occlusion
    from skimage.metrics import structural_similarity

    from vizcnn.probes.occlusion import occlusion

    model = vizcnn.load_model("demo")
    count = 5 if quick else 20
    x = _shapes(count)
    exact, exact_seconds = _timed(occlusion, model, x, window=16, stride=4, progress=False)
    approx, approx_seconds = _timed(occlusion, model, x, window=16, stride=4, approx=True,
                                    progress=False)
    naive = occlusion(model, x, window=16, stride=4, engine="naive", progress=False)
    captum_seconds = min(
        _timed(lambda per_eval: [_captum_occlusion(Occlusion, model, x[n:n + 1], 16,
                                                   int(exact.target[n]), per_eval, stride=4)
                                 for n in range(count)], per_eval)[1]
        for per_eval in ((16,) if quick else (1, 16, 64)))
    ssim = [structural_similarity(exact.prob[n].numpy(), approx.prob[n].numpy(),
                                  data_range=1.0, win_size=7) for n in range(count)]
    print(f"demo: ZFNetMini, {count} held-out shapes at 64 x 64, window 16, stride 4 "
          f"({exact.prob[0].numel()} positions each)")
    print(f"  engine: {exact.engine_note}")
    print(f"  Captum best {captum_seconds:.2f} s; exact {exact_seconds:.2f} s "
          f"({captum_seconds / exact_seconds:.1f}x), max |dp| against the naive engine "
          f"{float((exact.prob - naive.prob).abs().max()):.1e}; approximate "
          f"{approx_seconds:.2f} s ({captum_seconds / approx_seconds:.1f}x), computed "
          f"{approx.computed} of {approx.prob.numel()}, SSIM mean {np.mean(ssim):.3f} "
          f"min {np.min(ssim):.3f}, reported deviation {approx.max_deviation:.1e}")


def _captum_occlusion(occlusion_class, model, x, window: int, target: int, per_eval: int,
                      stride: int | None = None):
    stride = stride or window

    def probabilities(batch):
        return torch.softmax(model(batch), dim=1)

    with torch.no_grad():
        return occlusion_class(probabilities).attribute(
            x, sliding_window_shapes=(3, window, window), strides=(3, stride, stride),
            baselines=0.0, target=target, perturbations_per_eval=per_eval)


# --------------------------------------------------------------------------- adversarial


def bench_adversarial(quick: bool) -> None:
    """Attack strength on correctly classified held-out demo images, and the demo model's
    invariance numbers (Zeiler & Fergus Fig. 5) over 50 images."""
    from vizcnn.data.shapes import ShapesDataset
    from vizcnn.probes.adversarial import fgsm, lbfgs_adversarial, pgd
    from vizcnn.probes.invariance import invariance

    model = vizcnn.load_model("demo")
    wanted = 40 if quick else 200
    dataset = ShapesDataset(2 * wanted, seed=HELD_OUT_SEED)
    samples = [dataset.render(i) for i in range(2 * wanted)]
    x = torch.cat([vizcnn.preprocess(model, s.image) for s in samples])
    labels = torch.tensor([s.label for s in samples])
    with torch.no_grad():
        correct = (model(x).argmax(1) == labels).nonzero().flatten()[:wanted]
    x, labels = x[correct], labels[correct]
    print(f"adversarial: ZFNetMini on {len(x)} correctly classified held-out shapes, "
          f"untargeted L-inf (eps in 0-255 grey levels), PGD 10 steps of eps/4")
    print(f"{'eps':>6} {'FGSM':>7} {'PGD':>7}")
    for levels in (2, 4, 8):
        eps = levels / 255
        one = fgsm(model, x, eps).success.float().mean()
        many = pgd(model, x, eps, steps=10).success.float().mean()
        print(f"{levels:>4}/255 {float(one):>6.1%} {float(many):>6.1%}")
    result, seconds = _timed(lbfgs_adversarial, model, x)
    rms = result.rms[result.success] * 255
    success = float(result.success.float().mean())
    print(f"L-BFGS (target: the runner-up class): success {success:.1%}, RMS distortion mean "
          f"{float(rms.mean()):.2f}/255, median {float(rms.median()):.2f}/255 ({seconds:.0f} s)")
    count = 10 if quick else 50
    layers = ("features.1", "classifier.2")
    shifts, angles = (-4, -2, 2, 4), (30, 60, 90, 180)
    low, high, rotated = [], [], []
    for sample in samples[:count]:
        moved = invariance(model, sample.image, "translate", shifts, layers=layers,
                           true_class=sample.label)
        low.append(moved.distance[layers[0]].mean())
        high.append(moved.distance[layers[1]].mean())
        turned = invariance(model, sample.image, "rotate", angles, layers=layers,
                            true_class=sample.label)
        rotated.append(turned.prob)
    rotated = torch.stack(rotated).mean(0)
    print(f"invariance over {count} images: shifts of {shifts} px move {layers[0]} by "
          f"{float(torch.stack(low).mean()):.3f} and {layers[1]} by "
          f"{float(torch.stack(high).mean()):.3f} (relative L2, mean); P(true class) after "
          + ", ".join(f"{a} deg: {float(p):.3f}" for a, p in zip(angles, rotated, strict=True)))


# --------------------------------------------------------------------------- gallery


def bench_gallery(quick: bool) -> None:
    """The whole gallery of the demo network (5 conv layers, 2,000 images) and of AlexNet
    (5 conv layers, 500 photo crops at 224, random weights): seconds per stage, the site's
    size, and the share of the page-writing stages."""
    import json
    import tempfile

    from vizcnn.render.gallery import write_gallery

    alexnet = vizcnn.with_model_info(_alexnet(), preprocessing=IMAGENET_PREPROCESSING)
    runs = [("demo, shapes:2000", vizcnn.load_model("demo"), "shapes:2000" if not quick
             else "shapes:300"),
            ("AlexNet, photo crops", alexnet, photo_batch(100 if quick else 500))]
    print(f"gallery: every channel of every conv layer, {torch.get_num_threads()} threads")
    print(f"{'model, data':<22} {'total s':>8}  {'seconds per stage':<70} {'MB':>6} "
          f"{'KB/ch':>6} {'pages %':>7}")
    for label, model, data in runs:
        with tempfile.TemporaryDirectory() as scratch:
            index, seconds = _timed(write_gallery, model, data, Path(scratch) / "site",
                                    progress=False)
            site = index.parent
            report = json.loads((site / "gallery.json").read_text())
            size = sum(p.stat().st_size for p in site.rglob("*") if p.is_file())
        stages = report["seconds"]
        pages = stages.get("pages", 0.0) + stages.get("figures", 0.0)
        text = " ".join(f"{name} {value:.1f}" for name, value in stages.items())
        print(f"{label:<22} {seconds:8.1f}  {text:<70} {size / 2**20:6.1f} "
              f"{size / 2**10 / report['channels']:6.1f} {100 * pages / seconds:6.0f}%")
    print("  pages %: the share of figures + pages (rendering and writing) in the total")


def _lucent():
    """Lucent's optvis, or None where it is not installed; its two renamed kornia calls
    aliased (bench only)."""
    try:
        import kornia
        import kornia.geometry.transform as kornia_transform
    except ImportError:
        return None
    kornia.get_rotation_matrix2d = getattr(kornia, "get_rotation_matrix2d",
                                           kornia_transform.get_rotation_matrix2d)
    kornia.warp_affine = getattr(kornia, "warp_affine", kornia_transform.warp_affine)
    try:
        from lucent.optvis import param, render, transform
    except ImportError:
        return None
    return param, render, transform


def _strongest(model, images: torch.Tensor, layer: str, channels: list[int]) -> torch.Tensor:
    """(C,) the strongest unit of each channel's map on its own image, pixels (C, 3, H, W)."""
    from vizcnn.hooks import activations

    mean, std = vizcnn.model_info(model).preprocessing.pixel_normalisation(3)
    x = (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    maps = activations(model, x, [layer])[layer]
    return maps[torch.arange(len(channels)), torch.tensor(channels)].flatten(1).amax(1)


def bench_featvis(quick: bool, layer: str = "features.6", steps: int | None = None) -> None:
    """vizcnn's batched feature visualization against Lucent's one call per channel, at
    vizcnn's default steps."""
    import copy

    from torchvision.transforms import Normalize

    from vizcnn.featvis import DEFAULT_STEPS, feature_visualization

    steps = steps or DEFAULT_STEPS
    lucent = _lucent()
    model = vizcnn.load_model("demo")
    width = resolve_layer(model, layer).out_channels
    channels = list(range(0, width, width // (4 if quick else 32)))
    print(f"feature visualization, demo {layer} at 64 px, {steps} steps, "
          f"{torch.get_num_threads()} threads")
    for objective in ("channel", "neuron"):
        for label, wanted in ((f"{len(channels)} channels", channels),
                              (f"all {width} channels", list(range(width)))):
            if quick and wanted is not channels:
                continue
            result, seconds = _timed(feature_visualization, model, layer, wanted,
                                     objective=objective, steps=steps, progress=False)
            print(f"  vizcnn {objective:<8} {label:<16} {len(wanted) * steps / seconds:8.0f} "
                  f"channel-steps/s  ({seconds:.1f} s)")
            if wanted is channels and objective == "channel":
                ours = result.strongest[:, 0]
    times = [_timed(feature_visualization, model, layer, channels[:4], steps=8,
                    progress=False)[1] for _ in range(10)]
    print(f"  10 calls in a row on one model: first {times[0]:.2f} s, last {times[-1]:.2f} s, "
          f"hooks left {sum(len(m._forward_hooks) for m in model.modules())}")
    if lucent is None:
        print("  Lucent: not installed (see the module docstring); no comparison")
        return
    param, render, transform = lucent
    mean, std = vizcnn.model_info(model).preprocessing.pixel_normalisation(3)
    transforms = [*transform.standard_transforms, Normalize(mean, std)]
    images, started = [], time.perf_counter()
    for channel in channels:
        torch.manual_seed(channel)
        fresh = copy.deepcopy(model)  # Lucent never removes its hooks (lucent issue 45)
        final = render.render_vis(fresh, f"{layer.replace('.', '_')}:{channel}",
                                  lambda: param.image(64), transforms=transforms,
                                  thresholds=(steps,), preprocess=False, progress=False,
                                  show_image=False, fixed_image_size=64)
        images.append(torch.from_numpy(final[-1]).permute(0, 3, 1, 2))
    seconds = time.perf_counter() - started
    theirs = _strongest(model, torch.cat(images), layer, channels)
    rate = len(channels) * steps / seconds
    print(f"  Lucent channel   {len(channels)} channels, one call each {rate:8.0f} "
          f"channel-steps/s  ({seconds:.1f} s; its best: our normalisation, fixed_image_size"
          "=64, a fresh model copy per call)")
    print(f"  activation reached (strongest unit), channel objective: vizcnn >= Lucent on "
          f"{int((ours >= theirs).sum())} of {len(channels)} channels; median vizcnn "
          f"{float(ours.median()):.2f}, Lucent {float(theirs.median()):.2f}")
    print("  per channel (vizcnn / Lucent): " + ", ".join(
        f"{c}: {float(a):.1f}/{float(b):.1f}" for c, a, b in zip(channels, ours, theirs,
                                                                   strict=True)))


class _Unlike(torch.nn.Module):
    """Not our network: PReLU, GELU as a function, ceil-mode pools, LeakyReLU, and a
    fixed-size head for 57 px inputs."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.conv1 = nn.Conv2d(3, 32, 5, stride=2, padding=2)  # 57 -> 29
        self.act1 = nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)  # 29 -> 14
        self.conv2 = nn.Conv2d(32, 48, 3, padding=1)
        self.pool2 = nn.MaxPool2d(2, 2, ceil_mode=True)  # 14 -> 7
        self.conv3 = nn.Conv2d(48, 64, 3, padding=1)
        self.act3 = nn.LeakyReLU(0.1)
        self.head = nn.Linear(64 * 7 * 7, 8)

    def forward(self, x):
        x = self.pool1(self.act1(self.conv1(x)))
        x = self.pool2(torch.nn.functional.gelu(self.conv2(x)))
        return self.head(self.act3(self.conv3(x)).flatten(1))


def _trained_unlike(images: int = 6000, epochs: int = 8) -> torch.nn.Module:
    """``_Unlike`` with its own normalisation, trained on the shapes (training seed) at
    57 px with Adam: about a minute on 2 cores."""
    from vizcnn.data.shapes import TRAIN_SEED, ShapesDataset

    preprocessing = Preprocessing(resize=(57, 57), crop=None, mean=(0.45, 0.5, 0.55),
                                  std=(0.2, 0.25, 0.3))
    torch.manual_seed(0)
    model = vizcnn.with_model_info(_Unlike(), preprocessing=preprocessing)
    data = ShapesDataset(images, seed=TRAIN_SEED, transform=preprocessing)
    x = torch.stack([data[i][0] for i in range(images)])
    y = torch.tensor([data[i][1] for i in range(images)])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        for batch in torch.randperm(images).split(64):
            loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def _reached(model, layers: list[str], steps: int, top) -> str:
    """Per layer: live channels whose feature visualization reaches the strongest natural
    unit, and the ratio's 5th percentile and median."""
    from vizcnn.featvis import feature_visualization

    parts, started = [], time.perf_counter()
    for layer in layers:
        natural = top.values[layer][:, 0]
        result = feature_visualization(model, layer, objective="neuron", steps=steps,
                                       progress=False)
        live = natural > 0
        ratio = (result.strongest.amax(1) / natural)[live]
        parts.append(f"{layer} {int((ratio >= 1).sum())}/{int(live.sum())} "
                     f"({100 * float((ratio >= 1).float().mean()):.1f} %, q05 "
                     f"{float(ratio.quantile(0.05)):.2f}, median {float(ratio.median()):.2f}"
                     f", failed {int(result.failed.sum())})")
    return f"{time.perf_counter() - started:6.1f} s  " + "; ".join(parts)


def bench_featvis_quality(quick: bool) -> None:
    """The feature visualizations' activation against the data's strongest unit."""
    from vizcnn.featvis import DEFAULT_STEPS

    demo = vizcnn.load_model("demo")
    layers = vizcnn.list_layers(demo, "conv")
    top = vizcnn.scan_topk(demo, "shapes:2000", layers, k=1, progress=False)
    print("feature visualization (neuron objective) against the strongest natural unit over "
          f"shapes:2000: live channels reached, {torch.get_num_threads()} threads")
    for steps in (DEFAULT_STEPS,) if quick else (64, 128, 256, 512):
        print(f"  demo, {steps:3d} steps: {_reached(demo, layers, steps, top)}")
    unlike = _trained_unlike(2000 if quick else 6000)
    accuracy = vizcnn.accuracy(unlike, "shapes:2000", progress=False).fraction
    layers = ["conv1", "conv2", "conv3"]
    top = vizcnn.scan_topk(unlike, "shapes:2000", layers, k=1, progress=False)
    print(f"  unlike ours ({100 * accuracy:.0f} % held-out accuracy), {DEFAULT_STEPS} steps: "
          f"{_reached(unlike, layers, DEFAULT_STEPS, top)}")


# --------------------------------------------------------------------------- gallery at scale

_SCALE_RUN = """
import json, sys, threading, time
import vizcnn
from vizcnn.demo import EVOLUTION_CHECKPOINTS
from vizcnn.render.gallery import write_gallery

peak = [0]
def sample():  # resident anonymous memory: a memory map's file pages are the page cache's
    while True:
        for line in open('/proc/self/status'):
            if line.startswith('RssAnon'):
                peak[0] = max(peak[0], int(line.split()[1]) * 1024)
        time.sleep(0.02)
threading.Thread(target=sample, daemon=True).start()
count, out, checkpoints = int(sys.argv[1]), sys.argv[2], sys.argv[3] == 'yes'
started = time.perf_counter()
write_gallery(vizcnn.load_model('demo'), f'shapes:{count}', out, progress=False, figures=False,
              feature_vis=False, checkpoints=EVOLUTION_CHECKPOINTS if checkpoints else None)
total = time.perf_counter() - started
hwm = next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM'))
print(json.dumps({'total': total, 'anon': peak[0], 'hwm': hwm,
                  **json.load(open(out + '/gallery.json'))}))
"""


def _bare_pass(count: int) -> tuple[float, float]:
    """Seconds of a bare decode (vizcnn's own, as the gallery's: images, labels and concept
    masks) and of a no-grad forward pass of the whole demo model over ``shapes:count``,
    batches of 64: (decode + forward, forward alone)."""
    from vizcnn.data.shapes import ShapesDataset
    from vizcnn.scan import input_batches, open_data

    model = vizcnn.load_model("demo").eval()
    shapes = open_data(f"shapes:{count}")
    masked = ShapesDataset(shapes.length, seed=shapes.seed, image_size=shapes.image_size,
                           masks=True)
    forward = 0.0
    started = time.perf_counter()
    with torch.no_grad():
        for parts in input_batches(model, masked, 64, whole=True):
            forward += _timed(model, parts[1])[1]
    return time.perf_counter() - started, forward


def _scale_run(count: int, checkpoints: bool, folder: Path) -> dict:
    import json

    out = folder / f"site{count}{'e' if checkpoints else ''}"
    done = subprocess.run([sys.executable, "-c", _SCALE_RUN, str(count), str(out),
                           "yes" if checkpoints else "no"], capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _torchrun_gallery(count: int, ranks: int, folder: Path) -> tuple[float, dict]:
    import json
    import os

    out = folder / f"ranks{ranks}_{count}"
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, torch.get_num_threads() // ranks))}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc-per-node", str(ranks), "-m", "vizcnn.cli", "gallery", "demo",
                    f"shapes:{count}", "--no-figures", "--no-feature-vis", "--out", str(out)],
                   check=True, capture_output=True, env=env)
    return time.perf_counter() - started, json.loads((out / "gallery.json").read_text())


def bench_gallery_scale(quick: bool) -> None:
    """The demo gallery (every channel of the 5 conv layers, no figures, no feature
    visualization) over 2,000, 8,000 and 20,000 shapes, each in a fresh process: seconds per
    stage, peak resident anonymous memory (a memory map's file pages aside: the cache of
    decoded inputs and the per-image tables are read through them) and peak RSS, images
    decoded, forward passes, and the data pass against a bare decode + forward pass of the
    whole model over the same images; with the 5 training checkpoints' evolution strips; and
    the same gallery under torchrun with 1 and 2 processes."""
    import tempfile

    counts = (500, 2000) if quick else (2000, 8000, 20000)
    print(f"gallery at scale: demo network, {torch.get_num_threads()} threads")
    print(f"{'images':>7} {'evo':>4} {'total s':>8} {'pass s':>7} {'bare s':>7} {'ratio':>6} "
          f"{'anon MB':>8} {'RSS MB':>7} {'decoded':>8} {'forward':<32} stages")
    with tempfile.TemporaryDirectory(dir=".") as scratch:
        for count in counts:
            bare, forward = _bare_pass(count)
            for checkpoints in (False, True):
                run = _scale_run(count, checkpoints, Path(scratch))
                stages = run["seconds"]
                text = " ".join(f"{name} {value:.1f}" for name, value in stages.items())
                reference = bare + forward * (len(run["forward_passes"]) - 1)
                print(f"{count:>7} {'yes' if checkpoints else 'no':>4} {run['total']:8.1f} "
                      f"{stages['data pass']:7.1f} {reference:7.1f} "
                      f"{stages['data pass'] / reference:5.2f}x "
                      f"{run['anon'] / 2**20:8.0f} {run['hwm'] / 2**20:7.0f} "
                      f"{run['images_decoded']:>8} {json.dumps(run['forward_passes']):<32} "
                      f"{text}")
        print("  bare s: one decode + a forward pass of the whole model per model the pass "
              "runs (with evo: the model and 4 earlier checkpoints)")
        for count in counts[-1:]:
            for ranks in (1, 2):
                seconds, report = _torchrun_gallery(count, ranks, Path(scratch))
                text = " ".join(f"{n} {v:.1f}" for n, v in report["seconds"].items())
                print(f"torchrun --nproc-per-node {ranks}: {count} images {seconds:.1f} s "
                      f"(rank 0's stages: {text})")


# ImageNet at 50,000 images: what a ResNet50 gallery costs, from per-unit costs measured here
IMAGENET_IMAGES = 50_000
GPU_FORWARD_IMAGES_PER_S = 2_000  # an assumption: ResNet50 fp32 at 224, one A100/H100-class card
DECODE_WORKERS_PER_GPU = 12  # the 16-core machine the device tool lends, less the main processes


def _jpeg_folder(folder: Path, count: int) -> Path:
    """``count`` JPEGs at ImageNet's typical 500 x 375, cut from real photographs."""
    import cv2

    images = photo_batch(count, size=375)  # normalised crops: back to pixels
    mean, std = IMAGENET_PREPROCESSING.pixel_normalisation(3)
    for i, image in enumerate(images):
        pixels = image * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
        array = (pixels.clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        array = cv2.resize(array, (500, 375), interpolation=cv2.INTER_AREA)
        (folder / "photo").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / "photo" / f"{i:04d}.jpg"), array[:, :, ::-1],
                    [cv2.IMWRITE_JPEG_QUALITY, 90])
    return folder


def bench_gallery_cost(quick: bool) -> None:
    """The per-unit costs of a ResNet50 gallery (random weights, all 16 block outputs), each
    measured here: decoding a 500 x 375 JPEG to a 224 input, the forward pass, the gallery's
    data pass beside a bare forward pass, and the projections and pages per channel; then
    those costs carried to 50,000 images and every channel (15,104), on this machine and on 1
    and 8 GPUs under the stated assumptions (GPU_FORWARD_IMAGES_PER_S, the GPU's speed-up
    over this machine applied alike to the forward pass, the statistics and the
    projections; DECODE_WORKERS_PER_GPU decoding processes per GPU)."""
    import json
    import tempfile

    from vizcnn.render.gallery import write_gallery
    from vizcnn.scan import ImageFolder, input_batches
    from vizcnn.summary import summarize

    torch.manual_seed(0)
    model = vizcnn.with_model_info(torchvision.models.resnet50().eval(),
                                   preprocessing=IMAGENET_PREPROCESSING)
    layers = [f"layer{i}.{j}" for i, blocks in enumerate((3, 4, 6, 3), 1)
              for j in range(blocks)]
    channels = sum(row.output_shape[0] for row in summarize(model, 224, layers))
    count, shown = (16, 2) if quick else (64, 4)
    images = photo_batch(count)
    with tempfile.TemporaryDirectory(dir=".") as scratch:
        folder = _jpeg_folder(Path(scratch) / "jpegs", count)
        started = time.perf_counter()
        for _ in input_batches(model, ImageFolder(folder), 32, workers=0):
            pass
        decode = (time.perf_counter() - started) / count
        with torch.no_grad():
            model(images[:4])
            forward = _timed(lambda: [model(images[i:i + 32]) for i in range(0, count, 32)]
                             )[1] / count
        site = Path(scratch) / "site"
        write_gallery(model, images, site, layers=layers, channels=list(range(shown)),
                      k=9, figures=False, feature_vis=False, progress=False)
        report = json.loads((site / "gallery.json").read_text())
        size = sum(p.stat().st_size for p in site.rglob("*") if p.is_file())
    stages = report["seconds"]
    pass_s = stages["data pass"] / count
    drawn = shown * len(layers)
    projection = stages["projections"] / drawn
    pages = (stages["pages"] + stages.get("health", 0.0)) / drawn
    per_channel = size / drawn
    print(f"gallery cost: ResNet50 (random weights), {len(layers)} block outputs "
          f"({channels} channels), {count} photo crops at 224, {torch.get_num_threads()} "
          "threads")
    print(f"  measured: decode {1e3 * decode:.1f} ms/image (500 x 375 JPEG, one process), "
          f"forward {1e3 * forward:.0f} ms/image, data pass {1e3 * pass_s:.0f} ms/image "
          f"({pass_s / forward:.2f}x the forward pass), projections "
          f"{projection:.2f} s/channel (top-9), pages {1e3 * pages:.0f} ms/channel, site "
          f"{per_channel / 2**10:.0f} KB/channel")
    speedup = GPU_FORWARD_IMAGES_PER_S * forward
    print(f"  {IMAGENET_IMAGES} images, {channels} channels; a GPU taken as "
          f"{GPU_FORWARD_IMAGES_PER_S} images/s forward ({speedup:.0f}x this machine)")
    print(f"  {'where':<18} {'decode h':>9} {'pass h':>7} {'projections h':>14} "
          f"{'pages h':>8} {'total h':>8}")
    for where, gpus in (("this machine", 0), ("1 GPU", 1), ("8 GPUs", 8)):
        ranks, faster = max(1, gpus), speedup if gpus else 1.0
        workers = DECODE_WORKERS_PER_GPU * ranks if gpus else torch.get_num_threads()
        decode_h = IMAGENET_IMAGES * decode / workers / 3600
        pass_h = IMAGENET_IMAGES * pass_s / faster / ranks / 3600
        projections_h = channels * projection / faster / ranks / 3600
        pages_h = channels * pages / ranks / 3600  # on CPUs, split by channel
        # the decoding workers run beside the pass: the slower of the two sets its pace
        total = max(decode_h, pass_h) + projections_h + pages_h
        print(f"  {where:<18} {decode_h:9.2f} {pass_h:7.2f} {projections_h:14.2f} "
              f"{pages_h:8.2f} {total:8.2f}")
    print(f"  site: {channels * per_channel / 2**30:.1f} GB for every channel; cache of "
          f"decoded inputs {IMAGENET_IMAGES * 3 * 224 * 224 * 4 / 2**30:.0f} GB while it runs")


def bench_sanity(quick: bool) -> None:
    """The demo's sanity checks (vizcnn.sanity) per layer and method: each measure's mean
    once every weight is random, beside the random networks' mean (the band's centre), and
    the check's time, also per picture drawn (the trained network's, one per step that can
    change it, the random networks')."""
    import vizcnn.sanity as sanity
    from vizcnn.similarity import METRICS

    model = vizcnn.load_model("demo")
    layers = ["features.6"] if quick else ["features.0", "features.3", "features.6",
                                            "features.8", "features.10"]
    print("\n== sanity checks of the demo network: similarity to the trained pictures once "
          "every weight is random (random networks' mean) ==")
    print(f"{'layer':<12} {'method':<22} " + " ".join(f"{m:>16}" for m in METRICS)
          + "    check  per picture")
    for layer in layers:
        for method, options in (("deconv", {"images": 2}), ("occlusion", {"images": 4}),
                                ("feature_visualization", {})):
            sanity.DEFAULT_CHANNELS = 8 if method == "deconv" else 3
            check, seconds = _timed(sanity.sanity_check, model, "shapes:500", layer, method,
                                    progress=False, **options)
            rows = (check.rows_of("class score") if method == "occlusion"
                    else list(range(len(check.rows))))
            chance = {m: float(check.baseline_similarity.metric(m)[:, rows].nanmean())
                      for m in METRICS}
            numbers = " ".join(f"{check.final(m, rows):>7.2f} ({chance[m]:5.2f})"
                               for m in METRICS)
            drawn = 1 + sum(check.changed) + check.baseline.shape[0]
            print(f"{layer:<12} {method:<22} {numbers} {seconds:6.1f} s {seconds / drawn:6.2f} s",
                  flush=True)
    sanity.DEFAULT_CHANNELS = 3


SECTIONS = {"deconv": bench_deconv, "scan": bench_scan, "occlusion": bench_occlusion,
            "gallery": bench_gallery, "featvis": bench_featvis,
            "featvis-quality": bench_featvis_quality, "gallery-scale": bench_gallery_scale,
            "gallery-cost": bench_gallery_cost,
            "adversarial": bench_adversarial, "sanity": bench_sanity}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--section", action="append", choices=list(SECTIONS),
                        help="run only this section (repeatable); default: all")
    parser.add_argument("--quick", action="store_true", help="fewer images and channels")
    args = parser.parse_args(argv)
    for name in args.section or list(SECTIONS):
        SECTIONS[name](args.quick)
        print()


if __name__ == "__main__":
    main()
