"""Load a model from a spec, and the preprocessing that goes with it.

Specs:
    "demo"                          the bundled demo network (ZFNetMini)
    "torchvision:<arch>"            a torchvision classification architecture, random weights
    "torchvision:<arch>:<WEIGHTS>"  with torchvision weights (e.g. DEFAULT, IMAGENET1K_V1);
                                    downloaded once into torch's hub cache by torchvision
    "<path>"                        a checkpoint: TorchScript, a state_dict (give ``arch``), or a
                                    full pickled module (only with ``trust_checkpoint=True``,
                                    because unpickling runs code from the file)
"""

from __future__ import annotations

import difflib
import importlib
import os
import pickle
import urllib.error
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from vizcnn.data.images import load_image
from vizcnn.errors import BadArgument, BadCheckpoint
from vizcnn.hooks import model_device

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """How an RGB image becomes the normalised batch a model expects.

    Attributes:
        resize: shorter side is resized to this (an int), or the image to exactly (H, W);
            None keeps the size.
        crop: centre crop to this size (int or (H, W)); None keeps the resized image whole.
        mean, std: per-channel normalisation of values in [0, 1].
        interpolation: "bilinear", "bicubic" or "nearest".
    """

    resize: int | tuple[int, int] | None = 256
    crop: int | tuple[int, int] | None = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """image: uint8 (3, H, W) -> float32 (3, h, w), normalised."""
        exact = isinstance(self.resize, tuple) and tuple(image.shape[-2:]) == self.resize
        if self.resize is not None and not exact:  # resizing to the same size is not exact
            size = [self.resize] if isinstance(self.resize, int) else list(self.resize)
            mode = InterpolationMode(self.interpolation)
            image = TF.resize(image, size, interpolation=mode, antialias=True)
        if self.crop is not None:
            image = TF.center_crop(image, [self.crop] if isinstance(self.crop, int)
                                   else list(self.crop))
        image = TF.convert_image_dtype(image, torch.float32)
        return TF.normalize(image, list(self.mean), list(self.std))


IMAGENET_PREPROCESSING = Preprocessing()
# The shapes data set's own statistics (0.50 +- 0.27 in every channel on 3,000 images), so the
# gray of the data is zero after normalisation. Any image is resized to the 64 x 64 it knows.
DEMO_PREPROCESSING = Preprocessing(resize=(64, 64), crop=None, mean=(0.5, 0.5, 0.5),
                                   std=(0.27, 0.27, 0.27))
DEMO_CHECKPOINT = Path(__file__).parent / "assets" / "zfnet_mini.pt"


class ZFNetMini(nn.Module):
    """ZF Net's shape at small scale, for 64 x 64 images (the shapes data set).

    Layer names follow torchvision's AlexNet, so the same dotted names work on both:
    ``features.0`` conv1 7x7/2 -> ``features.2`` max pool 3/2 -> ``features.3`` conv2 5x5 ->
    ``features.5`` max pool 3/2 -> ``features.6``, ``.8``, ``.10`` conv3-5 3x3 ->
    ``features.12`` max pool 3/2 -> ``classifier.1`` fc6, ``classifier.4`` fc7; every ReLU is
    an ``nn.ReLU`` module (not ``F.relu``), so hooks and the deconvnet see each one.

    Maps at 64 x 64: 48x32x32, 48x15x15, 96x15x15, 96x7x7, 128x7x7 (x2), 96x7x7, 96x3x3.
    """

    def __init__(self, num_classes: int = 8, widths: tuple[int, ...] = (48, 96, 128, 128, 96),
                 dropout: float = 0.3):
        super().__init__()
        c1, c2, c3, c4, c5 = widths
        self.features = nn.Sequential(
            nn.Conv2d(3, c1, 7, stride=2, padding=3), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2),
            nn.Conv2d(c1, c2, 5, padding=2), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2),
            nn.Conv2d(c2, c3, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(c3, c4, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(c4, c5, 3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2),
        )
        self.classifier = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(c5 * 3 * 3, 256), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Linear(256, num_classes),
        )
        with torch.no_grad():
            # First-layer filters start at a tenth of PyTorch's default scale, so that what
            # training adds (edges, colour blobs), not the random start, shows in filter grids.
            self.features[0].weight.mul_(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, 3, 64, 64) normalised -> logits (N, num_classes)."""
        return self.classifier(torch.flatten(self.features(x), 1))


def demo_network(num_classes: int | None = None) -> nn.Module:
    """An untrained ZFNetMini with the demo's preprocessing and class names attached."""
    from vizcnn.data.shapes import SHAPE_CLASSES

    model = ZFNetMini(num_classes or len(SHAPE_CLASSES))
    model.vizcnn_preprocessing = DEMO_PREPROCESSING
    model.vizcnn_classes = list(SHAPE_CLASSES)
    return model


def _from_torchvision_transforms(transforms: Any) -> Preprocessing:
    """The Preprocessing equal to torchvision's ``weights.transforms()``."""
    resize = transforms.resize_size
    crop = transforms.crop_size
    return Preprocessing(
        resize=resize[0] if len(resize) == 1 else tuple(resize),
        crop=crop[0] if len(crop) == 1 else tuple(crop),
        mean=tuple(transforms.mean),
        std=tuple(transforms.std),
        interpolation=transforms.interpolation.value,
    )


# --------------------------------------------------------------------------- torchvision


def torchvision_architectures() -> list[str]:
    """Names of torchvision's classification architectures ("alexnet", "resnet18", ...)."""
    return torchvision.models.list_models(module=torchvision.models)


def _check_architecture(arch: str) -> None:
    known = torchvision_architectures()
    if arch not in known:
        close = difflib.get_close_matches(arch, known, n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(close)}?" if close else "see torchvision.models"
        raise BadArgument(f"unknown torchvision architecture {arch!r}", hint)


def _torchvision_weights(arch: str, name: str) -> Any:
    _check_architecture(arch)
    enum = torchvision.models.get_model_weights(arch)
    if name not in enum.__members__:
        raise BadArgument(f"{arch} has no weights {name!r}",
                          f"choose one of: {', '.join(enum.__members__)}")
    return enum[name]


def _load_torchvision(arch: str, weights: str | None) -> nn.Module:
    if weights is None:
        return _build_architecture(arch, num_classes=None)
    enum_value = _torchvision_weights(arch, weights)
    try:
        model = torchvision.models.get_model(arch, weights=enum_value)
    except (urllib.error.URLError, OSError, RuntimeError) as error:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(enum_value.url)
        raise BadCheckpoint(
            f"could not get the {arch} weights {weights}: {error}",
            f"with no network, put the file from {enum_value.url} at {cached}",
        ) from None
    model.vizcnn_preprocessing = _from_torchvision_transforms(enum_value.transforms())
    return model


def _build_architecture(arch: str, num_classes: int | None) -> nn.Module:
    """An untrained model from ``"resnet18"``, ``"demo"`` or ``"package.module:callable"``."""
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if arch == "demo":
        return demo_network(num_classes)
    if ":" in arch:
        module_name, _, attribute = arch.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as error:
            raise BadArgument(f"cannot import architecture {arch!r}: {error}",
                              "give 'package.module:callable' of an importable module") from None
        return factory(**kwargs)
    _check_architecture(arch)
    model = torchvision.models.get_model(arch, weights=None, **kwargs)
    model.vizcnn_preprocessing = IMAGENET_PREPROCESSING
    return model


# --------------------------------------------------------------------------- checkpoints


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


def _state_dict_in(obj: Any) -> Mapping[str, torch.Tensor] | None:
    """The state_dict in a loaded checkpoint: the dict itself or one under a usual key."""
    if not isinstance(obj, Mapping):
        return None
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {k.removeprefix("module."): v for k, v in obj.items()}  # DataParallel prefix
    return None


def _fit_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path,
                    arch: str) -> None:
    """Load ``state`` into ``model`` strictly, or say exactly what does not fit."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k} {tuple(state[k].shape)} in file vs {tuple(v.shape)} in model"
                  for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = []
    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                        ("shape mismatch", mismatched)):
        if keys:
            more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
            problems.append(f"{label}: {', '.join(keys[:3])}{more}")
    if problems:
        raise BadCheckpoint(f"checkpoint '{path}' does not fit architecture {arch!r}: "
                            + "; ".join(problems),
                            "check --arch (and --num-classes for a retrained classifier)")
    model.load_state_dict(state)


def _load_checkpoint(path: Path, arch: str | None, trust: bool,
                     num_classes: int | None) -> nn.Module:
    if not path.is_file():
        hint = None
        if path.name in torchvision_architectures() or path.name == "demo":
            hint = f"for a torchvision architecture write torchvision:{path.name}"
        raise BadCheckpoint(f"checkpoint '{path}' not found", hint)
    if _is_torchscript(path):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            try:
                return torch.jit.load(str(path), map_location="cpu")
            except RuntimeError as error:
                raise BadCheckpoint(f"cannot read TorchScript file '{path}': "
                                    f"{str(error).splitlines()[0]}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as error:
        if "safe_globals" in str(error) and not trust:
            raise BadCheckpoint(
                f"'{path}' holds pickled Python objects (a full model?), and loading them runs "
                "code from the file",
                "if you trust it, pass trust_checkpoint=True (CLI: --trust-checkpoint)",
            ) from None
        raise BadCheckpoint(f"'{path}' is not a readable PyTorch checkpoint (corrupt?)") from None
    except Exception as error:  # torch.load raises many kinds for a damaged file
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise BadCheckpoint(f"'{path}' is not a readable PyTorch checkpoint: {reason}") from None
    if isinstance(obj, nn.Module):
        return obj
    state = _state_dict_in(obj)
    if state is None:
        raise BadCheckpoint(f"'{path}' holds neither a model nor a state_dict",
                            "save model.state_dict() or the model itself")
    if arch is None and isinstance(obj.get("arch"), str):  # vizcnn's own checkpoints say
        arch = obj["arch"]
    if arch is None:
        raise BadCheckpoint(f"'{path}' holds weights only (a state_dict)",
                            "name the architecture: arch='resnet18' (CLI: --arch resnet18)")
    model = _build_architecture(arch, num_classes)
    _fit_state_dict(model, state, path, arch)
    return model


# --------------------------------------------------------------------------- public API


def _device(device: str | torch.device | None) -> torch.device:
    try:
        device = torch.device(device or "cpu")
    except RuntimeError:
        raise BadArgument(f"unknown device {device!r}", "use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BadArgument("CUDA is not available on this machine", "use device='cpu'")
    return device


def load_model(
    spec: str | os.PathLike,
    *,
    weights: str | None = None,
    device: str | torch.device | None = None,
    arch: str | None = None,
    num_classes: int | None = None,
    trust_checkpoint: bool = False,
) -> nn.Module:
    """Load a model by spec (see the module docstring), in eval mode on ``device``.

    Args:
        spec: "demo", "torchvision:<arch>[:<WEIGHTS>]" or a checkpoint path.
        weights: torchvision weights name for a "torchvision:<arch>" spec (or put it in the spec).
        device: "cpu" (default), "cuda", ... .
        arch: the architecture of a state_dict checkpoint: a torchvision name, "demo", or
            "package.module:callable".
        num_classes: classifier size when building ``arch`` for a state_dict.
        trust_checkpoint: allow a checkpoint that holds a pickled module; unpickling runs code.

    Returns:
        The model, in eval mode, with ``model.vizcnn_preprocessing`` set where it is known.
    """
    device = _device(device)
    spec = str(spec)
    if spec == "demo":
        if not DEMO_CHECKPOINT.is_file():
            raise BadCheckpoint(f"the demo checkpoint {DEMO_CHECKPOINT} is missing",
                                "train it: vizcnn train-demo (see the README)")
        model = _load_checkpoint(DEMO_CHECKPOINT, "demo", False, None)
    elif spec.startswith("torchvision:"):
        parts = spec.split(":")
        if len(parts) > 3 or not parts[1]:
            raise BadArgument(f"bad model spec {spec!r}", "write torchvision:<arch>[:<WEIGHTS>]")
        model = _load_torchvision(parts[1], parts[2] if len(parts) == 3 else weights)
    else:
        model = _load_checkpoint(Path(spec), arch, trust_checkpoint, num_classes)
    return model.to(device).eval()


def preprocessing_for(model_or_spec: nn.Module | str) -> Preprocessing | None:
    """The preprocessing a model (or a spec, without loading it) expects; None if unknown."""
    if isinstance(model_or_spec, nn.Module):
        return getattr(model_or_spec, "vizcnn_preprocessing", None)
    spec = str(model_or_spec)
    if spec == "demo":
        return DEMO_PREPROCESSING
    if spec.startswith("torchvision:"):
        parts = spec.split(":")
        if len(parts) == 3:
            return _from_torchvision_transforms(_torchvision_weights(*parts[1:]).transforms())
        _check_architecture(parts[1])
        return IMAGENET_PREPROCESSING
    return None


def preprocess(
    model_or_spec: nn.Module | str,
    image: Any,
    *,
    size: int | tuple[int, int] | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
) -> torch.Tensor:
    """Turn an image into the normalised batch the model expects.

    Args:
        model_or_spec: a loaded model or a spec string; its known preprocessing is used
            (torchvision weights' own transforms; ImageNet resize 256 / crop 224 otherwise). For
            a model of unknown origin: ImageNet mean and std, size kept.
        image: a path, a uint8 / uint16 / float HxW[xC] array, a PIL image, or a tensor
            (C, H, W) with values in [0, 1] (float) or 0..255 (uint8). Grayscale, RGBA and
            16-bit images are converted to 8-bit RGB.
        size: resize the whole image to exactly this (H, W) (an int: square), no crop.
        mean, std: override the normalisation.

    Returns:
        (1, 3, H, W) float32 on the model's device (CPU for a spec).
    """
    steps = preprocessing_for(model_or_spec)
    if steps is None:
        steps = Preprocessing(resize=None, crop=None)
    if size is not None:
        size = (size, size) if isinstance(size, int) else tuple(size)
        if len(size) != 2 or min(size) < 1:
            raise BadArgument(f"size must be positive (H, W), got {size!r}")
        steps = replace(steps, resize=size, crop=None)
    if mean is not None:
        steps = replace(steps, mean=tuple(mean))
    if std is not None:
        steps = replace(steps, std=tuple(std))
    batch = steps(load_image(image)).unsqueeze(0)
    if isinstance(model_or_spec, nn.Module):
        batch = batch.to(model_device(model_or_spec))
    return batch
