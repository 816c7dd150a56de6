"""The ``vizcnn`` command line: a thin layer over the API that parses, calls, and says where the
output went. A user's mistake prints one line to stderr and exits 2, never a traceback."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence

from vizcnn import __version__
from vizcnn.errors import VizCNNError

__all__ = [
    "EXAMPLES",
    "EXIT_INTERRUPTED",
    "EXIT_USER_ERROR",
    "build_parser",
    "main",
    "parse_channels",
]

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


def _add_workers_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, metavar="N", help="processes that decode a "
                        "folder's images while the model runs (default: the cores available "
                        "with a GPU --device, else 0: the main process decodes)")


def _add_output_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", metavar="INDEX|KEY",
                        help="for a model that returns a tuple or dict: which element holds "
                        "the (N, classes) class scores")


def _load(args: argparse.Namespace):
    """MODEL, loaded as the options say; --mean, --std and --size (where the command has them)
    go into its ModelInfo."""
    from vizcnn.models import load_model

    model = load_model(args.model, device=args.device, arch=args.arch,
                       num_classes=args.num_classes, trust_checkpoint=args.trust_checkpoint)
    return _with_input_options(model, args)


def _with_input_options(model, args: argparse.Namespace):
    """``model`` with --mean, --std and --size (where the command has them) in its
    ModelInfo."""
    from vizcnn.models import model_info, with_model_info, with_options

    known = model_info(model).preprocessing
    size = getattr(args, "size", None)
    given = with_options(known, size=tuple(size) if size else None,
                         mean=getattr(args, "mean", None), std=getattr(args, "std", None))
    if given is not known:  # an option was given
        with_model_info(model, preprocessing=given)
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


def _model_and_image(args: argparse.Namespace):
    """The set-up the figure commands share: check that --out can be written (before the slow
    part), load MODEL, read IMAGE. Returns (model, image)."""
    from vizcnn.render.figures import figure_path

    figure_path(args.out)
    return _load(args), _image(args.image)


def _write(panel, out: str) -> None:
    """Print a panel's notes, save its figure to ``out`` and say where it went."""
    from vizcnn.render.figures import save_figure

    for note in panel.notes:
        print(note)
    print(f"wrote {save_figure(panel.figure, out)}")


def _filters(args: argparse.Namespace) -> None:
    from vizcnn.render.figures import figure_path
    from vizcnn.render.panels import filters_panel

    figure_path(args.out)
    _write(filters_panel(_load(args), args.layer, mode=args.mode), args.out)


def _maps(args: argparse.Namespace) -> None:
    from vizcnn.render.panels import feature_maps_panel

    model, image = _model_and_image(args)
    _write(feature_maps_panel(model, [image], args.layer, scaling=args.scaling), args.out)


def _demo(args: argparse.Namespace) -> None:
    from vizcnn.demo import run_demo

    for path in run_demo(args.out):
        print(f"wrote {path}")


def _activations(args: argparse.Namespace) -> None:
    from vizcnn.hooks import activations
    from vizcnn.io import atomic_path, file_target, save_tensors
    from vizcnn.models import preprocess

    if args.out:
        file_target(args.out)
    model = _load(args)
    x = preprocess(model, _image(args.image))
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
            save_tensors(captured, tmp)
        print(f"wrote {args.out}")


def _deconv(args: argparse.Namespace) -> None:
    from vizcnn.render.panels import projection_panel

    model, image = _model_and_image(args)
    _write(projection_panel(model, image, args.layer, args.channel, mode=args.mode), args.out)


MAX_CHANNELS = 1 << 16  # more channels than any layer has: the bound of a --channels range


def parse_channels(spec: str | None, count: int | None, default: int = 16
                   ) -> list[int] | None:
    """``"0-15"``, ``"3,7,9-11"`` or ``"all"`` -> channel list, checked against ``count``;
    None gives the first ``default`` channels. With ``count`` None (several layers of
    different widths; each shows the channels it has), ``"all"`` and None give None, and a
    range may not pass ``MAX_CHANNELS``: the list is built, never a billion entries."""
    from vizcnn.checks import check_channels
    from vizcnn.errors import BadArgument

    if spec is None or spec == "all":
        if count is None:
            return None
        return list(range(count if spec == "all" else min(default, count)))
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
        if count is None and last >= MAX_CHANNELS:
            raise BadArgument(f"channel {last} in --channels {spec} is past {MAX_CHANNELS - 1}",
                              "no layer has that many channels; write e.g. 0-15 or all")
        channels += list(range(first, last + 1))
    if not channels:
        raise BadArgument(f"channel {spec} out of range: the layer has {count} channels "
                          f"(0-{count - 1})")
    if count is not None:
        check_channels(channels, count)
    return channels


def _join_torchrun() -> int:
    """Under ``torchrun`` (WORLD_SIZE > 1 in the environment) join the process group (gloo on
    the CPU, nccl on GPUs) so that the passes over the data split it; returns this process's
    rank."""
    import os

    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0
    if not dist.is_initialized():
        import datetime

        gpu = torch.cuda.is_available()
        if gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # the ranks wait for rank 0's own stages (the feature visualization, the index):
        # far longer than the default 30 minutes on a big model
        dist.init_process_group("nccl" if gpu else "gloo", timeout=datetime.timedelta(hours=12))
    return dist.get_rank()


def _topk(args: argparse.Namespace) -> None:
    from vizcnn.hooks import activations, require_hookable
    from vizcnn.io import atomic_path, check_outside, check_replaceable, writable_parent
    from vizcnn.render.figures import save_figure
    from vizcnn.render.panels import top_patches_panel
    from vizcnn.scan import (
        data_folder,
        discard_state,
        discarded_on_error,
        first_input,
        scan_topk,
    )

    check_outside(args.out, data_folder(args.data))
    out = check_replaceable(args.out, "topk/manifest.json", "top-k")
    writable_parent(out)
    model = _load(args)
    require_hookable(model)  # before anything is read: a TorchScript model takes no hooks
    data = args.data
    # check DATA, the layers and --channels on one image, before the long scan
    maps = activations(model, first_input(model, data), args.layer)
    channels = {layer: parse_channels(args.channels, maps[layer].shape[1])
                for layer in args.layer}
    state = out.parent / f".{out.name}.scan-state"
    if state.exists():
        print(f"resuming the scan saved in {state}")
    rank = _join_torchrun()
    try:
        top = scan_topk(model, data, args.layer, k=args.k, batch_size=args.batch_size,
                        state_path=state, workers=args.workers)
    except KeyboardInterrupt:
        print(f"scan state saved in {state}; run the same command again to resume",
              file=sys.stderr)
        raise
    if rank != 0:  # under torchrun every rank scans its shard; rank 0 writes
        return
    written = []
    with discarded_on_error(state), atomic_path(out) as staging:  # a failed run leaves none
        staging.mkdir()
        top.save(staging / "topk")
        for layer in args.layer:
            name = f"fig2_{layer}.{args.format}"
            save_figure(top_patches_panel(model, top, data, layer, channels[layer]).figure,
                        staging / name)
            written.append(name)
    discard_state(state)
    print(f"scanned {top.images} images ({len(top.skipped)} unreadable, left out)")
    for name in ["topk", *written]:
        print(f"wrote {out / name}")


def _occlusion(args: argparse.Namespace) -> None:
    from vizcnn.probes import parse_selector
    from vizcnn.render.panels import occlusion_panel

    model, image = _model_and_image(args)
    _write(occlusion_panel(model, [image], window=args.window, stride=args.stride,
                           target=args.target, layer=args.layer, channel=args.channel,
                           engine=args.engine,
                           approx=False if args.approx is None else args.approx,
                           output=parse_selector(args.output)), args.out)


def _gallery(args: argparse.Namespace) -> None:
    from pathlib import Path

    from vizcnn.render.gallery import write_gallery

    channels = parse_channels(args.channels, None)  # a narrower layer shows fewer
    model = _load(args)
    out = Path(args.out)
    state = out.parent / f".{out.name}.scan-state"
    rank = _join_torchrun()  # every rank reads its shard and writes its share of the pages
    if state.exists() and rank == 0:
        print(f"resuming the scan saved in {state}")
    try:
        index = write_gallery(model, args.data, out, layers=args.layer, k=args.k,
                              channels=channels, batch_size=args.batch_size,
                              masks=False if args.no_masks else args.masks,
                              workers=args.workers,
                              figures=not args.no_figures, command=args.command_line,
                              state_path=state, health=not args.no_health,
                              checkpoints=args.checkpoints,
                              checkpoint_options={"arch": args.arch,
                                                  "num_classes": args.num_classes,
                                                  "trust_checkpoint": args.trust_checkpoint},
                              feature_vis=False if args.no_feature_vis else None,
                              sanity=False if args.no_sanity else None,
                              feature_vis_steps=args.feature_vis_steps,
                              progress=rank == 0)
    except KeyboardInterrupt:
        if state.exists() and rank == 0:
            print(f"scan state saved in {state}; run the same command again to resume",
                  file=sys.stderr)
        raise
    if rank == 0:
        print(f"wrote {index}")


def _evolution(args: argparse.Namespace) -> None:
    from vizcnn.evolution import load_checkpoints
    from vizcnn.io import check_outside
    from vizcnn.layers import list_layers
    from vizcnn.render.figures import figure_path
    from vizcnn.render.panels import evolution_panel
    from vizcnn.scan import data_folder

    check_outside(args.out, data_folder(args.data))
    figure_path(args.out)
    loaded = load_checkpoints(args.checkpoints, arch=args.arch, num_classes=args.num_classes,
                              trust_checkpoint=args.trust_checkpoint, device=args.device)
    if [source for _, source, _ in loaded] != list(args.checkpoints):
        print("in epoch order: " + ", ".join(f"{source} (epoch {epoch})"
                                             for epoch, source, _ in loaded))
    final = loaded[-1][2]
    layers = args.layer or list_layers(final, "conv")
    # a layer narrower than the list is refused by name, with its channel count
    channels = "all" if args.channels == "all" else parse_channels(args.channels, None)
    rank = _join_torchrun()  # every rank reads its shard; rank 0 draws
    panel = evolution_panel({epoch: _with_input_options(model, args)
                             for epoch, _, model in loaded}, args.data, layers,
                            channels, progress=rank == 0, batch_size=args.batch_size)
    if rank == 0:
        _write(panel, args.out)


def _doctor(args: argparse.Namespace) -> None:
    from vizcnn.doctor import doctor
    from vizcnn.io import atomic_path, check_outside, file_target
    from vizcnn.scan import data_folder

    if args.json:
        check_outside(args.json, data_folder(args.data))
        file_target(args.json)
    model = _load(args)
    rank = _join_torchrun()  # every rank reads its shard; rank 0 reports
    report = doctor(model, args.data, args.layer, batch_size=args.batch_size,
                    progress=rank == 0, sanity=not args.no_sanity)
    if rank != 0:
        return
    print(report.text(), end="")
    if args.json:
        with atomic_path(args.json) as temporary:
            temporary.write_text(report.to_json())
        print(f"wrote {args.json}")


def _sanity(args: argparse.Namespace) -> None:
    import json

    from vizcnn.io import atomic_path, check_outside, file_target
    from vizcnn.probes import parse_selector
    from vizcnn.render.figures import figure_path
    from vizcnn.render.panels import drawn_sanity
    from vizcnn.sanity import METHODS, sanity_check
    from vizcnn.scan import data_folder

    figure_path(args.out)
    if args.json:
        check_outside(args.json, data_folder(args.data))
        file_target(args.json)
    model = _load(args)
    channels = parse_channels(args.channels, None) if args.channels else None
    checks = [sanity_check(model, args.data, args.layer, method, channels=channels,
                           images=args.images, cascade=not args.independent, seed=args.seed,
                           window=args.window, stride=args.stride, steps=args.steps,
                           output=parse_selector(args.output))
              for method in (args.method or METHODS)]
    panel = drawn_sanity(model, checks)
    _write(panel, args.out)
    if args.json:
        with atomic_path(args.json) as temporary:
            temporary.write_text(json.dumps([check.to_dict() for check in checks], indent=1))
        print(f"wrote {args.json}")


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


def _adversarial(args: argparse.Namespace) -> None:
    from vizcnn.probes import parse_selector
    from vizcnn.render.panels import adversarial_panel

    model, image = _model_and_image(args)
    _write(adversarial_panel(model, image, method=args.method, eps=_eps(args.eps),
                             steps=args.steps, target=args.target,
                             output=parse_selector(args.output)), args.out)


def _excite(args: argparse.Namespace) -> None:
    from vizcnn.render.panels import excite_panel

    model, image = _model_and_image(args)
    _write(excite_panel(model, image, args.layer, args.channel, eps=_eps(args.eps),
                        steps=args.steps), args.out)


def _visualize(args: argparse.Namespace) -> None:
    from vizcnn.errors import BadArgument
    from vizcnn.probes import parse_selector
    from vizcnn.render.figures import figure_path
    from vizcnn.render.panels import feature_visualization_panel

    figure_path(args.out)
    model = _load(args)
    if args.objective == "class":
        if args.class_ is None:
            raise BadArgument("--objective class needs --class NAME (or index)",
                              "give the class to visualize, e.g. --class circle")
        layer, channels, classes = None, None, [_class_argument(c) for c in args.class_]
    else:
        if args.layer is None:
            raise BadArgument(f"--objective {args.objective} needs --layer L",
                              "see `vizcnn summary MODEL` for the layer names")
        layer, channels, classes = args.layer, parse_channels(args.channels, None), None
    size = None if not args.size else args.size[0] if len(args.size) == 1 else tuple(args.size)
    _write(feature_visualization_panel(
        model, layer, channels, objective=args.objective, classes=classes,
        unit=tuple(args.unit) if args.unit else None, output=parse_selector(args.output),
        n=args.n, diversity=args.diversity, steps=args.steps, size=size, seed=args.seed),
        args.out)


def _class_argument(text: str) -> int | str:
    return int(text) if text.isdigit() else text


def _invariance(args: argparse.Namespace) -> None:
    from vizcnn.probes import parse_selector
    from vizcnn.render.panels import invariance_panel

    model, image = _model_and_image(args)
    _write(invariance_panel(model, [image], layers=args.layers, true_class=args.true_class,
                            output=parse_selector(args.output)), args.out)


def _train_demo(args: argparse.Namespace) -> None:
    from vizcnn.train import train_demo

    result = train_demo(args.out, epochs=args.epochs, per_epoch=args.per_epoch,
                        arch=args.arch)
    for epoch, path in sorted(result.checkpoints.items()):
        print(f"epoch {epoch:2d}: {path}")
    print(f"held-out accuracy {result.held_out_accuracy:.2%} on 2,000 fresh images "
          f"(seed never used in training); {result.seconds / 60:.1f} min")


# --------------------------------------------------------------------------- the parser
# Each subcommand: a function that adds its arguments, and examples that run as written from
# the repository (the demo network and its shapes images need nothing downloaded).

EXAMPLES = {
    "summary": ["vizcnn summary demo --input-size 64 64",
                "vizcnn summary torchvision:alexnet --layer features.10"],
    "activations": ["vizcnn activations demo shapes:3 --layer features.0 --layer features.11"],
    "filters": ["vizcnn filters demo --out filters.png"],
    "maps": ["vizcnn maps demo shapes:3 --layer features.4 --out maps.png"],
    "deconv": ["vizcnn deconv demo shapes:3 --layer features.10 --channel 9 --out deconv.png"],
    "topk": ["vizcnn topk demo shapes:200 --layer features.10 --channels 0-7 --out topk-out"],
    "occlusion": ["vizcnn occlusion demo shapes:1 --layer features.11 --out fig7.png",
                  "vizcnn occlusion demo shapes:2 --target star --approx --out approx.png"],
    "adversarial": ["vizcnn adversarial demo shapes:1 --method lbfgs --out adv.png",
                    "vizcnn adversarial demo shapes:0 --method pgd --eps 8/255 --out pgd.png"],
    "excite": ["vizcnn excite demo shapes:1 --layer features.6 --out excite.png"],
    "invariance": ["vizcnn invariance demo shapes:1 --out fig5.png"],
    "visualize": ["vizcnn visualize demo --layer features.6 --channels 0-15 --out fv.png",
                  "vizcnn visualize demo --layer features.10 --channels 3 --n 4 --diversity 0.5 "
                  "--out diverse.png",
                  "vizcnn visualize demo --objective class --class star --class ring "
                  "--steps 64 --out classes.png"],
    "gallery": ["vizcnn gallery demo shapes:200 --layer features.6 --layer features.8 "
                "--channels 0-15 --out site",
                "vizcnn gallery demo shapes:200 --layer features.0 --channels 0-7 "
                "--checkpoints demo:0 demo:2 demo:10 demo --out site"],
    "evolution": ["vizcnn evolution demo:0 demo:1 demo:2 demo:5 demo:10 demo shapes:500 "
                  "--layer features.0 --layer features.10 --channels 0-5 --out fig4.png"],
    "doctor": ["vizcnn doctor demo shapes:1000",
               "vizcnn doctor demo:1 shapes:1000 --json health.json"],
    "sanity": ["vizcnn sanity demo shapes:200 --layer features.6 --out sanity.png",
               "vizcnn sanity demo shapes:200 --layer features.3 --method deconv --channels 0-3 "
               "--json sanity.json --out deconv-sanity.png"],
    "demo": ["vizcnn demo --out demo-out"],
    "train-demo": ["vizcnn train-demo --epochs 2 --per-epoch 2000 --out runs/quick"],
}


def _command(commands, name: str, help: str, run: Callable) -> argparse.ArgumentParser:
    """A subcommand whose --help ends with its examples."""
    epilog = "examples:\n" + "\n".join(f"  {line}" for line in EXAMPLES[name])
    parser = commands.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".",
                                 epilog=epilog,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(run=run, parser=parser)
    return parser


def _figure_command(commands, name: str, help: str, run: Callable, *, image: bool = True
                    ) -> argparse.ArgumentParser:
    """A subcommand that takes MODEL (and IMAGE) and writes one figure to --out."""
    parser = _command(commands, name, help, run)
    _add_model_options(parser)
    if image:
        parser.add_argument("image", metavar="IMAGE", help=IMAGE_HELP)
        _add_input_options(parser)
    parser.add_argument("--out", required=True, help="figure file: .png, .pdf or .svg")
    return parser


def _add_summary(commands) -> None:
    summary = _command(commands, "summary", "per layer: type, output shape, receptive field, "
                       "jump, parameters", _summary)
    _add_model_options(summary)
    summary.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"),
                         help="input image size (default 224 224)")
    summary.add_argument("--layer", action="append", metavar="L",
                         help="show only this layer (repeatable)")


def _add_activations(commands) -> None:
    acts = _command(commands, "activations", "capture layer outputs for one image: statistics, "
                    "and the tensors with --out", _activations)
    _add_model_options(acts)
    acts.add_argument("image", metavar="IMAGE", help=IMAGE_HELP)
    _add_input_options(acts)
    acts.add_argument("--layer", action="append", required=True, metavar="L",
                      help="layer to capture (repeatable), see `vizcnn summary MODEL`")
    acts.add_argument("--out", help="save {layer: tensor} to this .pt file")


def _add_filters(commands) -> None:
    filters = _figure_command(commands, "filters", "a conv layer's filters as a grid figure",
                              _filters, image=False)
    filters.add_argument("--layer", metavar="L", help="conv layer (default: the first)")
    filters.add_argument("--mode", default="auto", choices=["auto", "rgb", "mean", "channels"],
                         help="rgb for 3-channel filters, mean or channels for deeper ones")


def _add_maps(commands) -> None:
    maps = _figure_command(commands, "maps", "one image's feature maps of a layer as a grid "
                           "figure", _maps)
    maps.add_argument("--layer", required=True, metavar="L", help="conv or pool layer")
    maps.add_argument("--scaling", default="tile", choices=["tile", "shared"],
                      help="each map its own range (tile) or one range for all (shared)")


def _add_deconv(commands) -> None:
    deconv = _figure_command(commands, "deconv", "deconvnet projection of one channel of a "
                             "layer back to the pixels of an image", _deconv)
    deconv.add_argument("--layer", required=True, metavar="L", help="layer to project from")
    deconv.add_argument("--channel", required=True, type=int, metavar="C",
                        help="feature map (channel) of the layer")
    deconv.add_argument("--mode", default="max", choices=["max", "map"],
                        help="max: the channel's strongest unit only (default); map: the whole "
                        "channel")


def _add_topk(commands) -> None:
    topk = _command(commands, "topk", "scan a data set for the top-k images of every channel; "
                    "Fig. 2 figures (projections beside image patches)", _topk)
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
    _add_workers_option(topk)
    topk.add_argument("--format", default="png", choices=["png", "pdf", "svg"],
                      help="figure format (default png)")
    topk.add_argument("--out", required=True, help="output folder: topk/ (the saved scan) and "
                      "fig2_<layer>.<format>")


def _add_occlusion(commands) -> None:
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


def _add_adversarial(commands) -> None:
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


def _add_excite(commands) -> None:
    exc = _figure_command(commands, "excite", "the pattern that, added within eps, excites one "
                          "feature map most", _excite)
    exc.add_argument("--layer", required=True, metavar="L")
    exc.add_argument("--channel", type=int, metavar="C",
                     help="feature map (default: the strongest in the image)")
    exc.add_argument("--eps", default="8/255", help="L-inf radius, 0-1 units or N/255")
    exc.add_argument("--steps", type=int, default=20)


def _add_visualize(commands) -> None:
    from vizcnn.featvis import DEFAULT_STEPS

    vis = _figure_command(commands, "visualize", "feature visualization: images optimized from "
                          "noise until each channel (one unit, a class) fires as strongly as "
                          "it can", _visualize, image=False)
    vis.add_argument("--layer", metavar="L", help="layer whose channels are visualized")
    vis.add_argument("--channels", metavar="LIST", help="e.g. 0-15, 3,7,9-11 or all "
                     "(default: all)")
    vis.add_argument("--objective", default="channel", choices=["channel", "neuron", "class"],
                     help="channel: the mean of the channel's map (default); neuron: one unit "
                     "(--unit, default the centre); class: a class score (--class)")
    vis.add_argument("--unit", type=int, nargs=2, metavar=("Y", "X"),
                     help="the unit of --objective neuron (default: the map's centre)")
    vis.add_argument("--class", dest="class_", action="append", metavar="NAME",
                     help="class name or index for --objective class (repeatable)")
    vis.add_argument("--n", type=int, default=1, help="images per channel (1)")
    vis.add_argument("--diversity", type=float, default=0.0, metavar="W",
                     help="weight of the penalty that pushes the --n images apart (0)")
    vis.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                     help=f"optimization steps ({DEFAULT_STEPS})")
    vis.add_argument("--size", type=int, nargs="+", metavar="N",
                     help="image size H W (one number: square; default: the model's input size)")
    vis.add_argument("--seed", type=int, default=0, help="the same seed gives the same images")
    vis.add_argument("--mean", type=float, nargs="+", metavar="M",
                     help="the model's input normalisation: mean per channel, of pixels in 0-1")
    vis.add_argument("--std", type=float, nargs="+", metavar="S",
                     help="standard deviation per channel, of pixels in 0-1")
    _add_output_option(vis)


def _add_invariance(commands) -> None:
    inv = _figure_command(commands, "invariance", "translate, scale and rotate an image: "
                          "feature distances and P(true class) (Fig. 5)", _invariance)
    inv.add_argument("--true-class", metavar="CLASS", help="index or name (default: the "
                     "clean prediction)")
    inv.add_argument("--layers", nargs=2, metavar=("LOW", "HIGH"),
                     help="layers compared (default: the first conv and the last hidden "
                     "linear layer)")
    _add_output_option(inv)


def _add_gallery(commands) -> None:
    gallery = _command(commands, "gallery", "a browsable static site of every layer and "
                       "channel: top-k projections and patches, statistics, concept labels",
                       _gallery)
    _add_model_options(gallery)
    gallery.add_argument("data", metavar="DATA", help="a folder of images, or shapes:N (with "
                         "concept masks: channels get Network Dissection labels)")
    _add_input_options(gallery)
    gallery.add_argument("--layer", action="append", metavar="L", help="layer to show "
                         "(repeatable; default: every conv layer, or every residual block)")
    gallery.add_argument("--channels", metavar="LIST", help="channels shown per layer, e.g. "
                         "0-15 or 3,7,9-11 (default: all; a layer shows those it has)")
    gallery.add_argument("--k", type=int, default=9, help="top images per channel (9)")
    gallery.add_argument("--batch-size", type=int, default=64)
    _add_workers_option(gallery)
    masks = gallery.add_mutually_exclusive_group()
    masks.add_argument("--masks", metavar="DIR", help="concept masks of a folder DATA, for "
                       "Network Dissection labels (default: DATA-masks beside it, if there); "
                       "laid out as below")
    masks.add_argument("--no-masks", action="store_true", help="no concept labels")
    gallery.add_argument("--no-figures", action="store_true",
                         help="leave the paper figures out of the index")
    gallery.add_argument("--no-health", action="store_true",
                         help="leave the health report (vizcnn doctor) out of the index")
    gallery.add_argument("--no-sanity", action="store_true", help="leave out each layer's "
                         "sanity check (how alike its projections stay once the weights are "
                         "random; on where it costs fewer projections than the layer's own)")
    vis = gallery.add_mutually_exclusive_group()
    vis.add_argument("--no-feature-vis", action="store_true", help="leave the feature "
                     "visualizations out (they are on where the model's normalisation is "
                     "known: its own, or --mean and --std)")
    vis.add_argument("--feature-vis-steps", type=int, metavar="N", help="optimization steps "
                     "per feature visualization: fewer is faster and weaker (default: as "
                     "vizcnn visualize)")
    gallery.add_argument("--checkpoints", nargs="+", metavar="CKPT",
                         help="earlier checkpoints of MODEL's training run (paths or demo:N; "
                         "see vizcnn evolution; MODEL is added as the last where it is not "
                         "among them): an evolution strip on every channel page")
    gallery.add_argument("--out", required=True, help="the site's folder (replaced whole)")
    from vizcnn.data import MASKS_LAYOUT

    gallery.epilog = f"concept masks of a folder of images:\n{MASKS_LAYOUT}\n\n{gallery.epilog}"


def _add_evolution(commands) -> None:
    evo = _command(commands, "evolution", "how each channel's strongest feature changes over "
                   "training checkpoints, and how settled each layer is (Fig. 4)", _evolution)
    evo.add_argument("checkpoints", metavar="CKPT", nargs="+", help="checkpoints of one "
                     "training run (paths, or demo:N for the demo's epochs 0, 1, 2, 5, 10, "
                     "20), put in epoch order: their epoch field, or the number in their name")
    evo.add_argument("data", metavar="DATA", help="a folder of images, or shapes:N")
    _add_input_options(evo)
    evo.add_argument("--arch", help="architecture of state_dict checkpoints")
    evo.add_argument("--num-classes", type=int, help="classifier size for --arch")
    evo.add_argument("--trust-checkpoint", action="store_true",
                     help="allow checkpoints holding pickled models (runs code from the file)")
    evo.add_argument("--device", default=None, help="cpu (default), cuda, ...")
    evo.add_argument("--layer", action="append", metavar="L",
                     help="layer to draw (repeatable; default: every conv layer)")
    evo.add_argument("--channels", metavar="LIST", help="channels drawn per layer, e.g. 0-7 "
                     "(default) or 3,7,9-11")
    evo.add_argument("--batch-size", type=int, default=64)
    evo.add_argument("--out", required=True, help="figure file: .png, .pdf or .svg")


def _add_doctor(commands) -> None:
    doc = _command(commands, "doctor", "a health report: dead and always-on channels, "
                   "near-duplicate filters, first-layer frequencies, aliasing (ZF section "
                   "4.1)", _doctor)
    _add_model_options(doc)
    doc.add_argument("data", metavar="DATA", help="a folder of images, or shapes:N")
    _add_input_options(doc)
    doc.add_argument("--layer", action="append", metavar="L",
                     help="layer to check (repeatable; default: every conv layer)")
    doc.add_argument("--batch-size", type=int, default=64)
    doc.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    doc.add_argument("--no-sanity", action="store_true", help="leave out each layer's sanity "
                     "line (how alike its projections stay once every weight is random)")


def _add_sanity(commands) -> None:
    from vizcnn.sanity import BASELINE_MODELS, METHODS

    san = _command(commands, "sanity", "does a picture depend on the weights? Each method's "
                   "pictures as the layers are re-initialized from the top (Adebayo et al.)",
                   _sanity)
    _add_model_options(san)
    san.add_argument("data", metavar="DATA", help="a folder of images, or shapes:N")
    _add_input_options(san)
    san.add_argument("--layer", required=True, metavar="L", help="a layer with weights")
    san.add_argument("--method", action="append", choices=METHODS,
                     help="repeatable (default: all three, side by side)")
    san.add_argument("--channels", metavar="LIST", help="e.g. 0-3 or 3,7 (default: the "
                     "layer's strongest three; occlusion: one channel, default each image's "
                     "strongest)")
    san.add_argument("--images", type=int, default=2, help="top images per channel (deconv) "
                     "or images (occlusion), default 2")
    san.add_argument("--independent", action="store_true", help="re-initialize one layer at "
                     "a time instead of cascading from the top")
    san.add_argument("--seed", type=int, default=0, help="seed of the re-initialization (0); "
                     f"the {BASELINE_MODELS} random networks of the band use the next seeds")
    san.add_argument("--window", type=int, help="occluder side (default a quarter of the "
                     "image)")
    san.add_argument("--stride", type=int, help="occluder step (default a quarter of the "
                     "window)")
    san.add_argument("--steps", type=int, help="feature visualization's steps")
    _add_output_option(san)
    san.add_argument("--out", required=True, help="figure file: .png, .pdf or .svg")
    san.add_argument("--json", metavar="FILE", help="also write every number as JSON")


def _add_demo(commands) -> None:
    demo = _command(commands, "demo", "figures and a report of the bundled demo network", _demo)
    demo.add_argument("--out", default="demo-out", help="output folder (default demo-out)")


def _add_train_demo(commands) -> None:
    train = _command(commands, "train-demo", "train the demo network (ZFNetMini) on the "
                     "shapes data set; checkpoints per chosen epoch", _train_demo)
    train.add_argument("--out", default="runs/demo", help="folder for the checkpoints")
    train.add_argument("--epochs", type=int, default=20)
    train.add_argument("--per-epoch", type=int, default=12_000, help="fresh images per epoch")
    train.add_argument("--arch", default="demo", choices=["demo", "demo_alexnet"],
                       help="demo: ZFNetMini; demo_alexnet: the same with AlexNet's 11x11 "
                       "stride-4 first layer (ZF's Fig. 6 comparison)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vizcnn", description="See what a trained convolutional network has "
                     "learned.", epilog="`vizcnn COMMAND --help` shows each command's options "
                     "and examples")
    parser.add_argument("--version", action="version", version=f"vizcnn {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True
    for add in (_add_summary, _add_activations, _add_filters, _add_maps, _add_deconv, _add_topk,
                _add_occlusion, _add_adversarial, _add_excite, _add_visualize, _add_invariance,
                _add_gallery,
                _add_evolution, _add_doctor, _add_sanity, _add_demo, _add_train_demo):
        add(commands)
    return parser


# Library messages name the options most commands have; a command whose option for the same
# thing is spelled otherwise gets its own name in the line it prints.
_SYNONYMS = {"--input-size": "--size", "--size": "--input-size", "--out": "--json"}


def in_own_words(message: str, options: set[str]) -> str:
    """``message`` with each ``--option`` that the command lacks replaced by the command's
    own option for the same thing (``--out`` is ``--json`` for doctor; ``--input-size`` is
    ``--size`` for the commands that read images), and an API parameter that a message starts
    with (``batch_size must be ...``) by the command's option for it (``--batch-size``)."""
    def own(match: re.Match) -> str:
        option = match.group(0)
        other = _SYNONYMS.get(option)
        return other if option not in options and other in options else option

    message = re.sub(r"(?<![\w-])--[a-z][a-z-]*", own, " ".join(message.split()))
    parameter = re.match(r"([a-z_]+) must be ", message)
    option = parameter and "--" + parameter.group(1).replace("_", "-")
    return option + message[parameter.end(1):] if option in options else message


def _options(args: argparse.Namespace) -> set[str]:
    """Every option string of the command that was run."""
    return {flag for action in args.parser._actions for flag in action.option_strings}


_NO_MEMORY = ("vizcnn: error: not enough memory; use a smaller input size, image, batch or "
              "k")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vizcnn`` console script; returns the exit code. Everything,
    the parsing included, runs inside the handlers: a mistake is one line and exit 2, Ctrl-C
    one line and exit 130, whenever it comes (the heavy imports happen in here, since
    ``import vizcnn`` is light)."""
    import shlex
    import warnings

    options: set[str] = set()

    def one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"vizcnn: warning: {in_own_words(str(message), options)}", file=sys.stderr)

    shown = warnings.showwarning
    warnings.showwarning = one_line_warning  # warnings as one line each, like errors
    try:
        args = build_parser().parse_args(argv)
        options.update(_options(args))
        args.command_line = "vizcnn " + shlex.join(sys.argv[1:] if argv is None else argv)
        args.run(args)
    except VizCNNError as error:
        print(f"vizcnn: error: {in_own_words(str(error), options)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except MemoryError:
        print(_NO_MEMORY, file=sys.stderr)
        return EXIT_USER_ERROR
    except RuntimeError as error:  # PyTorch's allocator says it so
        if "can't allocate memory" not in str(error) and "out of memory" not in str(error):
            raise
        print(_NO_MEMORY, file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("vizcnn: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        warnings.showwarning = shown
        # a failed run's frames may hold memory maps of the work files it removed: release
        # them (and their disk space) now, not at some later collection
        import gc

        gc.collect()
    return 0


if __name__ == "__main__":
    sys.exit(main())
