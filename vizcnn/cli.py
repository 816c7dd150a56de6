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


def _load(args: argparse.Namespace):
    from vizcnn.models import load_model

    return load_model(args.model, device=args.device, arch=args.arch,
                      num_classes=args.num_classes, trust_checkpoint=args.trust_checkpoint)


def _summary(args: argparse.Namespace) -> None:
    from vizcnn.summary import format_summary, summarize

    model = _load(args)
    size = args.input_size or [224, 224]
    rows = summarize(model, tuple(size), layers=args.layer)
    print(f"{args.model} at input {size[0]}x{size[1]}")
    print(format_summary(rows))


def _activations(args: argparse.Namespace) -> None:
    import torch

    from vizcnn.hooks import activations
    from vizcnn.io import atomic_path, writable_parent
    from vizcnn.models import preprocess

    if args.out:
        writable_parent(args.out)
    model = _load(args)
    x = preprocess(model, args.image)
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
    acts.add_argument("image", metavar="IMAGE", help="an image file")
    acts.add_argument("--layer", action="append", required=True, metavar="L",
                      help="layer to capture (repeatable), see `vizcnn summary MODEL`")
    acts.add_argument("--out", help="save {layer: tensor} to this .pt file")
    acts.set_defaults(run=_activations)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vizcnn`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], None] = args.run
    try:
        run(args)
    except VizCNNError as error:
        print(f"vizcnn: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("vizcnn: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
