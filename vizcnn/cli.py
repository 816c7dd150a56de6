"""The ``vizcnn`` command line: a thin layer over the API that parses, calls, and says where the
output went. A user's mistake prints one line to stderr and exits 2, never a traceback."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from vizcnn import __version__
from vizcnn.errors import VizCNNError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
IMAGE_HELP = "an image file, or shapes:INDEX for a held-out image of the demo data set"


class _Parser(argparse.ArgumentParser):
    """argparse, with its two-line usage error folded into one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USER_ERROR, f"vizcnn: error: {message} (see `{self.prog} --help`)\n")


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL",
                        help="demo, torchvision:<arch>[:<WEIGHTS>], or a checkpoint path")
    parser.add_argument("--arch", help="architecture of a state_dict checkpoint "
                        "(torchvision name, demo, or package.module:callable)")
    parser.add_argument("--num-classes", type=int, help="classifier size for --arch")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="allow a checkpoint holding a pickled model (runs code from the file)")
    parser.add_argument("--device", default=None, help="cpu (default), cuda, cuda:1, ...")


def _add_input_options(parser: argparse.ArgumentParser) -> None:
    """The model's preprocessing, for commands that read images: where vizcnn does not know
    it (a model of your own) or knows it wrong."""
    parser.add_argument("--mean", type=float, nargs="+", metavar="M",
                        help="the model's input normalisation: mean per channel, of pixels in "
                        "0-1 (e.g. 0.485 0.456 0.406)")
    parser.add_argument("--std", type=float, nargs="+", metavar="S",
                        help="standard deviation per channel, of pixels in 0-1")
    parser.add_argument("--size", type=int, nargs="+", metavar="N",
                        help="resize images to exactly H W (one number: square), no crop")


def _add_output_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", metavar="INDEX|KEY",
                        help="for a model that returns a tuple or dict: which element holds "
                        "the (N, classes) class scores")


def _load(args: argparse.Namespace):
    """MODEL, loaded as the options say; --mean, --std and --size (where the command has them)
    go into its preprocessing record."""
    from vizcnn.models import load_model, preprocessing_for, with_options, with_preprocessing

    model = load_model(args.model, device=args.device, arch=args.arch,
                       num_classes=args.num_classes, trust_checkpoint=args.trust_checkpoint)
    known = preprocessing_for(model)
    size = getattr(args, "size", None)
    steps = with_options(known, size=tuple(size) if size else None,
                         mean=getattr(args, "mean", None), std=getattr(args, "std", None))
    if steps is not known:  # an option was given
        with_preprocessing(model, steps)
    return model


def _summary(args: argparse.Namespace) -> None:
    from vizcnn.summary import format_summary, summarize

    model = _load(args)
    size = args.input_size or [224, 224]
    print(f"{args.model} at input {size[0]}x{size[1]}")
    try:
        rows = summarize(model, tuple(size), layers=args.layer)
    except VizCNNError as error:
        if getattr(error, "rows", None):  # the layers before the one that rejects the size
            print(format_summary(error.rows))
        raise
    print(format_summary(rows))


def _image(spec: str):
    """An IMAGE argument: a file path, or ``shapes:INDEX`` for a held-out demo image."""
    from vizcnn.data.shapes import held_out_image, parse_shapes_spec

    index = parse_shapes_spec(spec)
    return spec if index is None else held_out_image(index)


def _model_and_input(args: argparse.Namespace, *, figure: bool = True,
                     needs_normalisation: str | None = None):
    """The set-up most commands share: check that --out can be written (a figure file, before
    the slow part), load MODEL, check that its normalisation is known if the command needs it
    (``needs_normalisation`` names the probe), read IMAGE and preprocess it. Returns (model,
    image, x (1, C, H, W))."""
    from vizcnn.io import file_target
    from vizcnn.models import normalisation_of, preprocess
    from vizcnn.render.figures import figure_path

    if getattr(args, "out", None) and figure:
        figure_path(args.out)
    elif getattr(args, "out", None):
        file_target(args.out)
    model = _load(args)
    if needs_normalisation:
        normalisation_of(model, None, needs_normalisation)
    image = _image(args.image)
    return model, image, preprocess(model, image)


def _conv_layer(model, name: str | None) -> str:
    """``name`` if it is a conv layer (default: the first one), else a clear error."""
    from torch import nn

    from vizcnn.errors import BadArgument
    from vizcnn.layers import list_layers, resolve_layer

    convs = list_layers(model, "conv")
    if not convs:
        raise BadArgument("this model has no conv layer")
    if name is None:
        return convs[0]
    module = resolve_layer(model, name)
    if not isinstance(module, nn.Conv2d):
        raise BadArgument(f"layer {name!r} is a {type(module).__name__}, not a conv layer",
                          f"conv layers: {', '.join(convs[:8])}{' ...' if len(convs) > 8 else ''}")
    return name


def _filters(args: argparse.Namespace) -> None:
    from vizcnn.layers import resolve_layer
    from vizcnn.render.figures import figure_path, filters_figure, save_figure

    figure_path(args.out)
    model = _load(args)
    layer = _conv_layer(model, args.layer)
    weight = resolve_layer(model, layer).weight
    print(f"wrote {save_figure(filters_figure(weight, layer=layer, mode=args.mode), args.out)}")


def _maps(args: argparse.Namespace) -> None:
    from vizcnn.errors import BadArgument
    from vizcnn.hooks import activations
    from vizcnn.render.figures import feature_maps_figure, save_figure

    model, image, x = _model_and_input(args)
    maps = activations(model, x, [args.layer])[args.layer]
    if not hasattr(maps, "dim") or maps.dim() != 4:
        raise BadArgument(f"layer {args.layer!r} gives no feature maps (output "
                          f"{tuple(getattr(maps, 'shape', ()))})", "pick a conv or pool layer")
    fig = feature_maps_figure(maps[0], layer=args.layer, image=image, scaling=args.scaling)
    print(f"wrote {save_figure(fig, args.out)}")


def _demo(args: argparse.Namespace) -> None:
    from vizcnn.demo import run_demo

    for path in run_demo(args.out):
        print(f"wrote {path}")


def _activations(args: argparse.Namespace) -> None:
    import torch

    from vizcnn.hooks import activations
    from vizcnn.io import atomic_path

    model, _, x = _model_and_input(args, figure=False)
    captured = activations(model, x, args.layer, to_cpu=True)
    print(f"{args.image} -> input {'x'.join(map(str, x.shape[1:]))}")
    print(f"{'layer':<20} {'shape':<16} {'min':>9} {'mean':>9} {'max':>9} {'active':>7}")
    for name, value in captured.items():
        shape = "x".join(map(str, value.shape[1:]))
        active = (value > 0).float().mean().item()
        print(f"{name:<20} {shape:<16} {value.min().item():9.3f} {value.mean().item():9.3f} "
              f"{value.max().item():9.3f} {active:7.1%}")
    if args.out:
        with atomic_path(args.out) as tmp:
            torch.save(captured, tmp)
        print(f"wrote {args.out}")


def _deconv(args: argparse.Namespace) -> None:
    from vizcnn.deconv import Deconvnet
    from vizcnn.hooks import activations
    from vizcnn.receptive import receptive_field
    from vizcnn.render.figures import projection_figure, save_figure
    from vizcnn.render.grid import image_tiles

    model, _, x = _model_and_input(args)
    projection = Deconvnet(model).project(x, args.layer, args.channel, mode=args.mode)
    box = None
    maps = activations(model, x, [args.layer])[args.layer]
    if args.mode == "max" and maps.dim() == 4:
        channel = maps[0, args.channel]
        y, x_ = divmod(int(channel.flatten().argmax()), channel.shape[1])
        field = receptive_field(model, args.layer, tuple(x.shape[-2:]))
        box = field.box(y, x_)
        print(f"strongest unit of channel {args.channel}: ({y}, {x_}), activation "
              f"{float(channel[y, x_]):.4g}, receptive field box {box}")
        if channel[y, x_] <= 0:
            print("note: the channel does not fire anywhere in this image (its strongest "
                  "activation is not positive); try another channel or image")
    shown = image_tiles(x, *_normalisation(model))[0]
    fig = projection_figure(shown, projection[0], layer=args.layer,
                            channel=args.channel, box=box,
                            title=f"{args.layer} channel {args.channel} ({args.mode})")
    print(f"wrote {save_figure(fig, args.out)}")


def parse_channels(spec: str | None, count: int, default: int = 16) -> list[int]:
    """``"0-15"``, ``"3,7,9-11"`` or ``"all"`` -> channel list, checked against ``count``;
    None gives the first ``default`` channels."""
    from vizcnn.errors import BadArgument

    if spec is None:
        return list(range(min(default, count)))
    if spec == "all":
        return list(range(count))
    channels: list[int] = []
    for part in spec.split(","):
        low, _, high = part.partition("-")
        try:
            first, last = int(low), int(high or low)
        except ValueError:
            raise BadArgument(f"bad channel list {spec!r}", "write e.g. 0-15 or 3,7,9-11 or all"
                              ) from None
        if last < first:
            raise BadArgument(f"reversed channel range {part!r} in {spec!r}",
                              f"write {last}-{first}")
        channels += list(range(first, last + 1))
    bad = [c for c in channels if not 0 <= c < count]
    if bad or not channels:
        raise BadArgument(f"channel {bad[0] if bad else spec} out of range: the layer has "
                          f"{count} channels (0-{count - 1})")
    return channels


def _join_torchrun() -> int:
    """Under ``torchrun`` (WORLD_SIZE > 1 in the environment) join the process group (gloo on
    the CPU, nccl on GPUs) so that scan_topk splits the data; returns this process's rank."""
    import os

    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank()


def _topk(args: argparse.Namespace) -> None:
    import shutil

    from vizcnn.deconv import top_patches
    from vizcnn.errors import BadArgument
    from vizcnn.hooks import activations
    from vizcnn.io import atomic_path, check_replaceable, writable_parent
    from vizcnn.render.figures import save_figure, top_patches_figure
    from vizcnn.scan import input_batches, scan_topk

    out = check_replaceable(args.out, "topk/manifest.json", "top-k")
    writable_parent(out)
    model = _load(args)
    data = args.data
    # check DATA, the layers and --channels on one image, before the long scan
    _, first, _ = next(input_batches(model, data, 1), (None, None, None))
    if first is None or not len(first):
        raise BadArgument(f"no readable image in {data}")
    maps = activations(model, first, args.layer)
    channels = {layer: parse_channels(args.channels, maps[layer].shape[1])
                for layer in args.layer}
    state = out.parent / f".{out.name}.scan-state"
    if state.exists():
        print(f"resuming the scan saved in {state}")
    rank = _join_torchrun()
    try:
        top = scan_topk(model, data, args.layer, k=args.k, batch_size=args.batch_size,
                        state_path=state)
    except KeyboardInterrupt:
        print(f"scan state saved in {state}; run the same command again to resume",
              file=sys.stderr)
        raise
    if rank != 0:  # under torchrun every rank scans its shard; rank 0 writes
        return
    mean, std = _normalisation(model)
    written = []
    with atomic_path(out) as staging:
        staging.mkdir()
        top.save(staging / "topk")
        for layer in args.layer:
            patches = top_patches(model, top, data, layer, channels[layer])
            fig = top_patches_figure(patches, mean=mean, std=std)
            name = f"fig2_{layer}.{args.format}"
            save_figure(fig, staging / name)
            written.append(name)
    shutil.rmtree(state, ignore_errors=True)
    print(f"scanned {top.count} images ({len(top.skipped)} unreadable, left out)")
    for name in ["topk", *written]:
        print(f"wrote {out / name}")


def _class_index(model, spec: str | None) -> int | None:
    """--target: a class index, or a class name the model knows (the demo's shapes)."""
    from vizcnn.errors import BadArgument

    if spec is None:
        return None
    if spec.lstrip("-").isdigit():
        return int(spec)
    names = list(getattr(model, "vizcnn_classes", None) or [])
    if spec in names:
        return names.index(spec)
    known = f"known classes: {', '.join(names)}" if names else "give a class index"
    raise BadArgument(f"unknown class {spec!r}", known)


def _occlusion(args: argparse.Namespace) -> None:
    from vizcnn.deconv import Deconvnet
    from vizcnn.probes import parse_selector
    from vizcnn.probes.occlusion import occlusion
    from vizcnn.render.figures import occlusion_figure, save_figure

    model, _, x = _model_and_input(
        args, needs_normalisation="occlusion's fill (the data's mean gray)")
    maps = occlusion(model, x, window=args.window, stride=args.stride,
                     target=_class_index(model, args.target), layer=args.layer,
                     channel=args.channel, engine=args.engine,
                     approx=False if args.approx is None else args.approx,
                     output=parse_selector(args.output))
    names = getattr(model, "vizcnn_classes", None)
    clean, target = int(maps.clean_label[0]), int(maps.target[0])

    def name(index: int) -> str:
        return names[index] if names and index < len(names) else str(index)

    print(f"clean image: {name(clean)} ({float(maps.clean_prob[0]):.3f} for {name(target)}); "
          f"{maps.prob.shape[1]}x{maps.prob.shape[2]} positions, engine {maps.engine}"
          + (f" ({maps.engine_note})" if maps.engine_note else ""))
    worst = int(maps.prob[0].flatten().argmin())
    top, left = maps.positions.view(-1, 2)[worst].tolist()
    print(f"lowest p({name(target)}) = {float(maps.prob[0].flatten()[worst]):.3f} with the "
          f"occluder at y={top}, x={left}")
    if maps.max_deviation is not None:
        print(f"approximate: largest deviation {maps.max_deviation:.2e} from exact on "
              f"{maps.checked} re-checked positions")
    projections = None
    if maps.layer is not None:
        projections = Deconvnet(model).project(x, maps.layer, int(maps.channel[0]))
    mean, std = _normalisation(model)
    fig = occlusion_figure(x, maps, projections=projections, classes=names, mean=mean, std=std)
    print(f"wrote {save_figure(fig, args.out)}")


def _eps(text: str) -> float:
    """--eps: a number in 0-1 pixel units, or N/255."""
    from vizcnn.errors import BadArgument

    try:
        if "/" in text:
            numerator, denominator = text.split("/")
            return float(numerator) / float(denominator)
        return float(text)
    except (ValueError, ZeroDivisionError):
        raise BadArgument(f"bad eps {text!r}", "write e.g. 0.03 or 8/255") from None


def _normalisation(model):
    """(mean, std) of pixels in [0, 1] for showing the model's input, or (None, None)."""
    from vizcnn.models import preprocessing_for

    steps = preprocessing_for(model)
    return steps.pixel_normalisation() if steps is not None and steps.known else (None, None)


def _adversarial(args: argparse.Namespace) -> None:
    from vizcnn.probes import parse_selector
    from vizcnn.probes.adversarial import fgsm, layer_displacement, lbfgs_adversarial, pgd
    from vizcnn.render.figures import adversarial_figure, save_figure

    model, _, x = _model_and_input(args, needs_normalisation=args.method)
    target = _class_index(model, args.target)
    eps = _eps(args.eps)
    output = parse_selector(args.output)
    if args.method == "fgsm":
        result = fgsm(model, x, eps, target=target, output=output)
    elif args.method == "pgd":
        result = pgd(model, x, eps, steps=args.steps, target=target, output=output)
    else:
        result = lbfgs_adversarial(model, x, target=target, output=output)
    names = getattr(model, "vizcnn_classes", None)

    def name(index: int) -> str:
        return names[index] if names and index < len(names) else str(index)

    print(f"{args.method}: {name(int(result.clean_label[0]))} "
          f"({float(result.clean_prob[0]):.3f}) -> {name(int(result.label[0]))} "
          f"({float(result.prob[0]):.3f}), {'success' if result.success[0] else 'failed'}; "
          f"RMS {float(result.rms[0]) * 255:.2f}/255, max {float(result.linf[0]) * 255:.2f}/255")
    displacement = layer_displacement(model, x, result.x)
    mean, std = _normalisation(model)
    fig = adversarial_figure(x, result, displacement=displacement, classes=names, mean=mean,
                             std=std)
    print(f"wrote {save_figure(fig, args.out)}")


def _excite(args: argparse.Namespace) -> None:
    from vizcnn.probes.adversarial import excite
    from vizcnn.render.figures import excite_figure, save_figure

    model, _, x = _model_and_input(args, needs_normalisation="excite")
    result = excite(model, x, args.layer, args.channel, _eps(args.eps), args.steps)
    print(f"{args.layer} channel {args.channel}: total activation {float(result.before[0]):.4g}"
          f" -> {float(result.after[0]):.4g} (eps {result.eps:.4f})")
    mean, std = _normalisation(model)
    print(f"wrote {save_figure(excite_figure(x, result, mean=mean, std=std), args.out)}")


def _invariance(args: argparse.Namespace) -> None:
    from vizcnn.probes import parse_selector
    from vizcnn.probes.invariance import TRANSFORMS, invariance
    from vizcnn.render.figures import invariance_figure, save_figure

    model, image, _ = _model_and_input(args, needs_normalisation="invariance")
    low, high = args.layers or _default_layers(model)
    results = {t: [invariance(model, image, t, layers=(low, high),
                              true_class=_class_index(model, args.true_class),
                              output=parse_selector(args.output))]
               for t in TRANSFORMS}
    for transform, (result,) in results.items():
        print(f"{transform:<9} {high} distance up to {float(result.distance[high].max()):.3f}; "
              f"P(true class) from {float(result.prob.min()):.3f} to "
              f"{float(result.prob.max()):.3f}")
    fig = invariance_figure(results, classes=getattr(model, "vizcnn_classes", None))
    print(f"wrote {save_figure(fig, args.out)}")


def _default_layers(model) -> tuple[str, str]:
    """Fig. 5's layer 1 and layer 7: the first conv's ReLU (or conv) and the penultimate
    linear layer's ReLU (or the last linear layer)."""
    from vizcnn.errors import BadArgument
    from vizcnn.layers import list_layers

    convs, linears = list_layers(model, "conv"), list_layers(model, "linear")
    if not convs or not linears:
        raise BadArgument("cannot choose default layers", "give --layers LOW HIGH")
    return convs[0], linears[-2] if len(linears) > 1 else linears[-1]


def _train_demo(args: argparse.Namespace) -> None:
    from vizcnn.train import train_demo

    result = train_demo(args.out, epochs=args.epochs, per_epoch=args.per_epoch)
    for epoch, path in sorted(result.checkpoints.items()):
        print(f"epoch {epoch:2d}: {path}")
    print(f"held-out accuracy {result.held_out_accuracy:.2%} on 2,000 fresh images "
          f"(seed never used in training); {result.seconds / 60:.1f} min")


def _figure_command(commands, name: str, help: str, run: Callable, *, image: bool = True
                    ) -> argparse.ArgumentParser:
    """A subcommand that takes MODEL (and IMAGE) and writes one figure to --out."""
    parser = commands.add_parser(name, help=help)
    _add_model_options(parser)
    if image:
        parser.add_argument("image", metavar="IMAGE", help=IMAGE_HELP)
        _add_input_options(parser)
    parser.add_argument("--out", required=True, help="figure file: .png, .pdf or .svg")
    parser.set_defaults(run=run)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vizcnn", description="See what a trained convolutional network has "
                     "learned.")
    parser.add_argument("--version", action="version", version=f"vizcnn {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    summary = commands.add_parser("summary", help="per layer: type, output shape, receptive "
                                  "field, jump, parameters")
    _add_model_options(summary)
    summary.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"),
                         help="input image size (default 224 224)")
    summary.add_argument("--layer", action="append", metavar="L",
                         help="show only this layer (repeatable)")
    summary.set_defaults(run=_summary)

    acts = commands.add_parser("activations", help="capture layer outputs for one image: "
                               "statistics, and the tensors with --out")
    _add_model_options(acts)
    acts.add_argument("image", metavar="IMAGE", help=IMAGE_HELP)
    _add_input_options(acts)
    acts.add_argument("--layer", action="append", required=True, metavar="L",
                      help="layer to capture (repeatable), see `vizcnn summary MODEL`")
    acts.add_argument("--out", help="save {layer: tensor} to this .pt file")
    acts.set_defaults(run=_activations)

    filters = _figure_command(commands, "filters", "a conv layer's filters as a grid figure",
                              _filters, image=False)
    filters.add_argument("--layer", metavar="L", help="conv layer (default: the first)")
    filters.add_argument("--mode", default="auto", choices=["auto", "rgb", "mean", "channels"],
                         help="rgb for 3-channel filters, mean or channels for deeper ones")

    maps = _figure_command(commands, "maps", "one image's feature maps of a layer as a grid "
                           "figure", _maps)
    maps.add_argument("--layer", required=True, metavar="L", help="conv or pool layer")
    maps.add_argument("--scaling", default="tile", choices=["tile", "shared"],
                      help="each map its own range (tile) or one range for all (shared)")

    deconv = _figure_command(commands, "deconv", "deconvnet projection of one channel of a "
                             "layer back to the pixels of an image", _deconv)
    deconv.add_argument("--layer", required=True, metavar="L", help="layer to project from")
    deconv.add_argument("--channel", required=True, type=int, metavar="C",
                        help="feature map (channel) of the layer")
    deconv.add_argument("--mode", default="max", choices=["max", "map"],
                        help="max: the channel's strongest unit only (default); map: the whole "
                        "channel")

    topk = commands.add_parser("topk", help="scan a data set for the top-k images of every "
                               "channel; Fig. 2 figures (projections beside image patches)")
    _add_model_options(topk)
    topk.add_argument("data", metavar="DATA", help="a folder of images (flat or one sub-folder "
                      "per class), or shapes:N for N held-out demo images")
    _add_input_options(topk)
    topk.add_argument("--layer", action="append", required=True, metavar="L",
                      help="layer to scan (repeatable)")
    topk.add_argument("--k", type=int, default=9, help="images kept per channel (default 9)")
    topk.add_argument("--channels", metavar="LIST", help="channels drawn in the figures, e.g. "
                      "0-15 (default), 3,7,9-11 or all; the scan keeps every channel")
    topk.add_argument("--batch-size", type=int, default=64)
    topk.add_argument("--format", default="png", choices=["png", "pdf", "svg"],
                      help="figure format (default png)")
    topk.add_argument("--out", required=True, help="output folder: topk/ (the saved scan) and "
                      "fig2_<layer>.<format>")
    topk.set_defaults(run=_topk)

    occ = _figure_command(commands, "occlusion", "slide an occluder over an image: class "
                          "probability, label and feature-map activation maps (Fig. 7)",
                          _occlusion)
    occ.add_argument("--window", type=int, default=16, help="occluder side in pixels (16)")
    occ.add_argument("--stride", type=int, default=4, help="step between positions (4)")
    occ.add_argument("--target", metavar="CLASS", help="class index or name (default: the "
                     "clean image's prediction)")
    occ.add_argument("--layer", metavar="L", help="layer for the activation map (panel b)")
    occ.add_argument("--channel", type=int, metavar="C", help="feature map of --layer "
                     "(default: the strongest in the clean image)")
    occ.add_argument("--approx", nargs="?", type=float, const=True, metavar="FRACTION",
                     help="approximate: adaptive drill-down (refine only where the coarse map "
                     "changes); with a FRACTION also cap the recomputed region at that "
                     "fraction of each map's side")
    occ.add_argument("--engine", default="auto", choices=["auto", "incremental", "naive"])
    _add_output_option(occ)

    adv = _figure_command(commands, "adversarial", "the smallest change that flips the "
                          "decision: FGSM, PGD or L-BFGS, with the layer displacement",
                          _adversarial)
    adv.add_argument("--method", default="fgsm", choices=["fgsm", "pgd", "lbfgs"])
    adv.add_argument("--eps", default="8/255", help="L-inf radius in 0-1 pixel units, or N/255 "
                     "(default 8/255; not used by lbfgs)")
    adv.add_argument("--steps", type=int, default=10, help="PGD steps (10)")
    adv.add_argument("--target", metavar="CLASS", help="class to aim at (index or name); "
                     "default: untargeted (lbfgs: the second most probable class)")
    _add_output_option(adv)

    exc = _figure_command(commands, "excite", "the pattern that, added within eps, excites one "
                          "feature map most", _excite)
    exc.add_argument("--layer", required=True, metavar="L")
    exc.add_argument("--channel", required=True, type=int, metavar="C")
    exc.add_argument("--eps", default="8/255", help="L-inf radius, 0-1 units or N/255")
    exc.add_argument("--steps", type=int, default=20)

    inv = _figure_command(commands, "invariance", "translate, scale and rotate an image: "
                          "feature distances and P(true class) (Fig. 5)", _invariance)
    inv.add_argument("--true-class", metavar="CLASS", help="index or name (default: the "
                     "clean prediction)")
    inv.add_argument("--layers", nargs=2, metavar=("LOW", "HIGH"),
                     help="layers compared (default: the first conv and the last hidden "
                     "linear layer)")
    _add_output_option(inv)

    demo = commands.add_parser("demo", help="figures and a report of the bundled demo network")
    demo.add_argument("--out", default="demo-out", help="output folder (default demo-out)")
    demo.set_defaults(run=_demo)

    train = commands.add_parser("train-demo", help="train the demo network (ZFNetMini) on the "
                                "shapes data set; checkpoints per chosen epoch")
    train.add_argument("--out", default="runs/demo", help="folder for the checkpoints")
    train.add_argument("--epochs", type=int, default=20)
    train.add_argument("--per-epoch", type=int, default=12_000, help="fresh images per epoch")
    train.set_defaults(run=_train_demo)
    return parser


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line each on stderr, like errors (no source line, no file name)."""
    print(f"vizcnn: warning: {' '.join(str(message).split())}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vizcnn`` console script; returns the exit code."""
    import warnings

    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], None] = args.run
    shown = warnings.showwarning
    warnings.showwarning = _one_line_warning
    try:
        run(args)
    except VizCNNError as error:
        print(f"vizcnn: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except MemoryError:
        print("vizcnn: error: not enough memory; use a smaller input size, image or batch",
              file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("vizcnn: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        warnings.showwarning = shown
    return 0


if __name__ == "__main__":
    sys.exit(main())
