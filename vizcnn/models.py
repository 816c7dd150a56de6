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
import math
import os
import pickle
import pickletools
import re
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

from vizcnn.data.images import load_image, read_image
from vizcnn.errors import BadArgument, BadCheckpoint
from vizcnn.geometry import as_pair, input_channels
from vizcnn.hooks import model_device

__all__ = [
    "DEMO_PREPROCESSING",
    "IMAGENET_PREPROCESSING",
    "InputRecipe",
    "UNKNOWN_PREPROCESSING",
    "AssumedPreprocessingWarning",
    "ModelInfo",
    "Preprocessing",
    "ZFNetMini",
    "checkpoint_epoch",
    "demo_epoch",
    "demo_epoch_checkpoint",
    "demo_initialisation",
    "demo_network",
    "input_recipe",
    "load_model",
    "model_info",
    "normalisation_of",
    "preprocess",
    "torchvision_architectures",
    "with_model_info",
    "with_options",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class AssumedPreprocessingWarning(UserWarning):
    """``preprocess`` used a default for a model whose preprocessing vizcnn does not know."""


@dataclass(frozen=True)
class Preprocessing:
    """What vizcnn knows about a model's input: how an RGB image becomes the normalised batch
    the model expects. Part of a model's ``ModelInfo``: set by ``load_model`` where it is known
    and by the user for any model (``with_model_info``, or ``preprocessing=`` per call).

    Attributes:
        resize: shorter side is resized to this (an int), or the image to exactly (H, W);
            None keeps the size.
        crop: centre crop to this size (int or (H, W)); None keeps the resized image whole.
        mean, std: per-channel normalisation, applied to pixel values in ``value_range``;
            None: unknown (probes that need them refuse; ``preprocess`` warns and assumes
            ImageNet's).
        interpolation: "bilinear", "bicubic" or "nearest".
        value_range: the pixel values before normalisation: (0, 1) for torchvision models,
            (0, 255) for models trained on raw 8-bit values.
    """

    resize: int | tuple[int, int] | None = 256
    crop: int | tuple[int, int] | None = 224
    mean: tuple[float, ...] | None = IMAGENET_MEAN
    std: tuple[float, ...] | None = IMAGENET_STD
    interpolation: str = "bilinear"
    value_range: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self):
        for name in ("mean", "std"):
            values = getattr(self, name)
            if values is None:
                continue
            values = tuple(float(v) for v in values)
            if not values or not all(math.isfinite(v) for v in values):
                raise BadArgument(f"{name} must be one or more finite numbers, got {values!r}")
            object.__setattr__(self, name, values)
        if self.std is not None and min(self.std) <= 0:
            raise BadArgument(f"std must be > 0, got {_numbers(self.std)}",
                              "give the standard deviation of the model's training pixels "
                              "(CLI: --std)")
        if self.mean is not None and self.std is not None and len(self.mean) != len(self.std):
            raise BadArgument(f"mean and std need as many values each, got {len(self.mean)} "
                              f"and {len(self.std)}", "give one value for all channels or one "
                              "per channel (CLI: --mean and --std)")
        low, high = self.value_range
        if not high > low:
            raise BadArgument(f"value_range must be (low, high) with high > low, got "
                              f"{self.value_range}")
        if self.mean is not None and not all(low <= m <= high for m in self.mean):
            raise BadArgument(f"mean {_numbers(self.mean)} is not a mean of pixel values: "
                              f"pixels lie in [{low:g}, {high:g}] (value_range), and so does "
                              "their mean", "give the mean of the model's training pixels "
                              "on that scale, e.g. 0.485 0.456 0.406 for ImageNet (CLI: "
                              "--mean, in [0, 1])")

    @property
    def known(self) -> bool:
        """Whether the normalisation (mean and std) is known."""
        return self.mean is not None and self.std is not None

    def pixel_normalisation(self, channels: int | None = None
                            ) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) in units of pixels in [0, 1]: ``input = (pixel - mean) / std`` whatever
        the value range. Only for a known normalisation. With ``channels``, one value per
        channel (a single value is repeated; any other count is a one-line error)."""
        low, high = self.value_range
        span = high - low
        mean = tuple((m - low) / span for m in self.mean)  # type: ignore[union-attr]
        std = tuple(s / span for s in self.std)  # type: ignore[union-attr]
        if channels is None:
            return mean, std
        if len(mean) not in (1, channels):
            raise BadArgument(f"the preprocessing has {len(mean)} mean and std values for "
                              f"{channels}-channel images", "give one value or one per channel")
        repeat = channels // len(mean)
        return mean * repeat, std * repeat

    def geometry(self, image: torch.Tensor, interpolation: str | None = None) -> torch.Tensor:
        """The resize and the centre crop alone: (C, H, W) -> (C, h, w), with the record's
        interpolation or the one given ("nearest" for masks)."""
        exact = isinstance(self.resize, tuple) and tuple(image.shape[-2:]) == self.resize
        if self.resize is not None and not exact:  # resizing to the same size is not exact
            size = [self.resize] if isinstance(self.resize, int) else list(self.resize)
            mode = InterpolationMode(interpolation or self.interpolation)
            image = TF.resize(image, size, interpolation=mode, antialias=True)
        if self.crop is not None:
            image = TF.center_crop(image, [self.crop] if isinstance(self.crop, int)
                                   else list(self.crop))
        return image

    def mask(self, mask: torch.Tensor) -> torch.Tensor:
        """An (H, W) map of integer labels (a concept mask) at its image's size -> (h, w)
        long at the model input's size: the image's resize (nearest, so no label is blended
        with another) and crop."""
        # float32 holds every integer label below 2^24 exactly; integer resizing is patchy
        return self.geometry(mask[None].float(), "nearest")[0].round().long()

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """image: uint8 (C, H, W) -> float32 (C, h, w), normalised (mean and std must be
        known)."""
        image = self.geometry(image)
        if not self.known:
            raise BadArgument("this preprocessing does not know the model's mean and std",
                              "give mean= and std=, or use vizcnn.preprocess, which says what "
                              "it assumes")
        image = TF.convert_image_dtype(image, torch.float32)
        mean, std = self.pixel_normalisation(image.shape[0])
        return TF.normalize(image, list(mean), list(std))


def _numbers(values: tuple[float, ...]) -> str:
    return " ".join(f"{v:g}" for v in values)


IMAGENET_PREPROCESSING = Preprocessing()
UNKNOWN_PREPROCESSING = Preprocessing(resize=None, crop=None, mean=None, std=None)
# The shapes data set's own statistics (0.50 +- 0.27 in every channel on 3,000 images), so the
# gray of the data is zero after normalisation. Any image is resized to the 64 x 64 it knows.
DEMO_PREPROCESSING = Preprocessing(resize=(64, 64), crop=None, mean=(0.5, 0.5, 0.5),
                                   std=(0.27, 0.27, 0.27))
DEMO_CHECKPOINT = Path(__file__).parent / "assets" / "zfnet_mini.pt"
# "demo:N": the same training run's epochs (``demo_epoch_checkpoint``); "demo" is the last
DEMO_EPOCHS = (0, 1, 2, 5, 10, 20)
DEMO_ALEXNET_FIRST_LAYER = (11, 4, 5)  # AlexNet's conv1, 11x11 stride 4, at the demo's scale
DEMO_ARCHITECTURES = {"demo": (7, 2, 3), "demo_alexnet": DEMO_ALEXNET_FIRST_LAYER}


@dataclass(frozen=True)
class ModelInfo:
    """What vizcnn knows about a model, in one record (as torchvision's ``Weights.meta``).

    ``load_model`` sets it where it is known; ``with_model_info`` sets it for any model,
    loaded by vizcnn or not; ``model_info`` reads it. A model nobody described has an empty
    record: its preprocessing unknown (probes that need the normalisation refuse with one
    line), no class names (labels are shown as indices).

    Attributes:
        spec: how the model was loaded ("demo", "torchvision:alexnet:DEFAULT", a path), if
            vizcnn loaded it.
        preprocessing: how an image becomes the model's input (size, mean, std, value range).
        classes: the class names, in the order of the model's outputs.
    """

    spec: str | None = None
    preprocessing: Preprocessing = UNKNOWN_PREPROCESSING
    classes: tuple[str, ...] | None = None

    def __post_init__(self):
        if not isinstance(self.preprocessing, Preprocessing):
            raise BadArgument(f"preprocessing must be a vizcnn.Preprocessing, got "
                              f"{type(self.preprocessing).__name__}")
        if self.classes is not None:
            object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))

    @property
    def input_size(self) -> tuple[int, int] | None:
        """The (H, W) the model's input has after preprocessing, where it is fixed."""
        size = self.preprocessing.crop or self.preprocessing.resize
        if size is None or (self.preprocessing.crop is None and isinstance(size, int)):
            return None  # a shorter-side resize alone leaves the aspect ratio to the image
        return as_pair(size, "input size")

    def class_name(self, index: int) -> str:
        """The name of class ``index``, or the index as text where no name is known."""
        if self.classes is not None and 0 <= index < len(self.classes):
            return self.classes[index]
        return str(index)

    def class_index(self, name_or_index: str | int | None) -> int | None:
        """A class given as an index (``3``, ``"3"``) or by one of ``classes`` (``"circle"``);
        None stays None. An unknown name is a one-line error listing the known ones."""
        if name_or_index is None or isinstance(name_or_index, int):
            return name_or_index
        text = str(name_or_index)
        if text.lstrip("-").isdigit():
            return int(text)
        if self.classes is not None and text in self.classes:
            return self.classes.index(text)
        raise BadArgument(f"unknown class {text!r}", self._class_hint(text))

    def _class_hint(self, text: str) -> str:
        if not self.classes:
            return "give a class index"
        if len(self.classes) <= 12:
            return f"known classes: {', '.join(self.classes)}"
        close = difflib.get_close_matches(text, self.classes, n=3, cutoff=0.5)
        guess = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
        return f"{guess}give an index or one of the {len(self.classes)} class names"


_INFO_ATTRIBUTE = "_vizcnn_info"


def model_info(model_or_spec: nn.Module | str) -> ModelInfo:
    """What vizcnn knows about a model, or about a spec without loading it (an empty
    ``ModelInfo`` where it knows nothing)."""
    if isinstance(model_or_spec, nn.Module):
        return getattr(model_or_spec, _INFO_ATTRIBUTE, None) or ModelInfo()
    spec = str(model_or_spec)
    if spec == "demo" or spec.startswith("demo:"):
        from vizcnn.data.shapes import SHAPE_CLASSES

        return ModelInfo(spec, DEMO_PREPROCESSING, tuple(SHAPE_CLASSES))
    if spec.startswith("torchvision:"):
        parts = spec.split(":")
        if len(parts) == 3:
            weights = _torchvision_weights(*parts[1:])
            return ModelInfo(spec, _from_torchvision_transforms(weights.transforms()),
                             tuple(weights.meta.get("categories") or ()) or None)
        _check_architecture(parts[1])
        return ModelInfo(spec, IMAGENET_PREPROCESSING)
    return ModelInfo(spec)


def with_model_info(model: nn.Module, info: ModelInfo | None = None, **changes: Any
                    ) -> nn.Module:
    """Set what vizcnn knows about ``model``: a whole ``ModelInfo``, or some of its fields
    (``preprocessing=``, ``classes=``, ``spec=``) changed in the current record. Returns the
    model, so ``model = with_model_info(my_net(), preprocessing=...)`` reads as one line."""
    if info is not None and not isinstance(info, ModelInfo):
        raise BadArgument(f"info must be a vizcnn.ModelInfo, got {type(info).__name__}")
    unknown = sorted(set(changes) - {"spec", "preprocessing", "classes"})
    if unknown:
        raise BadArgument(f"ModelInfo has no field {unknown[0]!r}",
                          "give spec=, preprocessing= or classes=")
    record = replace(info or model_info(model), **changes)
    setattr(model, _INFO_ATTRIBUTE, record)  # an attribute: it survives copy.deepcopy
    return model


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
                 dropout: float = 0.3, first_layer: tuple[int, int, int] = (7, 2, 3),
                 input_size: int = 64):
        """``first_layer``: conv1's (kernel, stride, padding); ``DEMO_ALEXNET_FIRST_LAYER``
        gives AlexNet's 11x11 stride-4 first layer. The first linear layer is sized for
        ``input_size`` x ``input_size`` images."""
        super().__init__()
        c1, c2, c3, c4, c5 = widths
        kernel, stride, padding = first_layer
        self.features = nn.Sequential(
            nn.Conv2d(3, c1, kernel, stride=stride, padding=padding), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2),
            nn.Conv2d(c1, c2, 5, padding=2), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2),
            nn.Conv2d(c2, c3, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(c3, c4, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(c4, c5, 3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2),
        )
        side = (input_size + 2 * padding - kernel) // stride + 1
        for _ in range(3):  # the three 3/2 max pools
            side = (side - 3) // 2 + 1
        self.classifier = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(c5 * side * side, 256), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Linear(256, num_classes),
        )
        with torch.no_grad():
            # First-layer filters start at a tenth of PyTorch's default scale, so that what
            # training adds (edges, colour blobs), not the random start, shows in filter grids.
            self.features[0].weight.mul_(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, 3, 64, 64) normalised -> logits (N, num_classes)."""
        return self.classifier(torch.flatten(self.features(x), 1))


def demo_network(num_classes: int | None = None, arch: str = "demo") -> nn.Module:
    """An untrained ZFNetMini with the demo's preprocessing and class names attached;
    ``arch="demo_alexnet"``: the same with AlexNet's first layer (11x11, stride 4)."""
    from vizcnn.data.shapes import SHAPE_CLASSES

    if arch not in DEMO_ARCHITECTURES:
        raise BadArgument(f"unknown demo architecture {arch!r}",
                          f"choose {' or '.join(DEMO_ARCHITECTURES)}")
    model = ZFNetMini(num_classes or len(SHAPE_CLASSES), first_layer=DEMO_ARCHITECTURES[arch])
    return with_model_info(model, ModelInfo(arch, DEMO_PREPROCESSING, tuple(SHAPE_CLASSES)))


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
    categories = tuple(enum_value.meta.get("categories") or ()) or None
    return with_model_info(model, ModelInfo(f"torchvision:{arch}:{weights}",
                                            _from_torchvision_transforms(enum_value.transforms()),
                                            categories))


def _build_architecture(arch: str, num_classes: int | None) -> nn.Module:
    """An untrained model from ``"resnet18"``, ``"demo"`` or ``"package.module:callable"``."""
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if arch in DEMO_ARCHITECTURES:
        return demo_network(num_classes, arch)
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
    return with_model_info(model, ModelInfo(f"torchvision:{arch}", IMAGENET_PREPROCESSING))


# --------------------------------------------------------------------------- checkpoints


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


def _needs_code(path: Path, message: str) -> bool:
    """Whether a checkpoint that ``weights_only`` loading refused is a whole pickle that names
    Python objects (loadable with consent) rather than a damaged file. The raw pickle's
    opcodes are only parsed, never run."""
    if "safe_globals" in message or "Unsupported global" in message:
        return True
    if zipfile.is_zipfile(path):
        return False
    try:
        with open(path, "rb") as stream:
            for _ in pickletools.genops(stream):
                pass
    except Exception:  # noqa: BLE001 - any parse failure means a damaged file
        return False
    return True


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
        where = "is a folder, not a checkpoint file" if path.is_dir() else "not found"
        raise BadCheckpoint(f"checkpoint '{path}' {where}", hint)
    if _is_torchscript(path):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            try:
                return torch.jit.load(str(path), map_location="cpu")
            except RuntimeError as error:
                raise BadCheckpoint(f"cannot read TorchScript file '{path}': "
                                    f"{str(error).splitlines()[0]}") from None
    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols are not for users
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as error:
        if not trust and _needs_code(path, str(error)):
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
        if ":" in arch and not trust:  # code named inside the file: never without consent
            raise BadCheckpoint(
                f"'{path}' names its architecture as code to import and call ({arch!r}), and "
                "vizcnn runs nothing named inside a file without your consent",
                f"if you trust the file, pass trust_checkpoint=True (CLI: --trust-checkpoint), "
                f"or name the architecture yourself: arch={arch!r} (CLI: --arch {arch})")
    if arch is None:
        raise BadCheckpoint(f"'{path}' holds weights only (a state_dict)",
                            "name the architecture: arch='resnet18' (CLI: --arch resnet18)")
    model = _build_architecture(arch, num_classes)
    _fit_state_dict(model, state, path, arch)
    return model


def demo_epoch(spec: str) -> int:
    """The epoch of a ``"demo"`` (the last) or ``"demo:N"`` spec, one of ``DEMO_EPOCHS``."""
    if spec == "demo":
        return DEMO_EPOCHS[-1]
    text = spec.partition(":")[2]
    if not text.isdigit() or int(text) not in DEMO_EPOCHS:
        raise BadArgument(f"bad model spec {spec!r}: the demo network ships epochs "
                          f"{', '.join(map(str, DEMO_EPOCHS))}", "write e.g. demo:5, or demo")
    return int(text)


def demo_initialisation(seed: int | None = None, arch: str = "demo") -> nn.Module:
    """The untrained ZFNetMini (``arch="demo_alexnet"``: with AlexNet's first layer) exactly
    as ``train_demo(seed=seed, arch=arch)`` starts from (default seed: the training seed)."""
    from vizcnn.data.shapes import TRAIN_SEED

    torch.manual_seed(TRAIN_SEED if seed is None else seed)
    return demo_network(arch=arch)


def demo_epoch_checkpoint(epoch: int) -> Path:
    """The shipped file of the demo run's ``epoch`` (1 .. 20; epoch 0 has none: it is
    ``demo_initialisation()``). The earlier epochs are float16, one file each."""
    if epoch == DEMO_EPOCHS[-1]:
        return DEMO_CHECKPOINT
    return DEMO_CHECKPOINT.with_name(f"zfnet_mini_epoch_{epoch:02d}.pt")


def _demo_at(epoch: int) -> nn.Module:
    """The demo network after ``epoch`` epochs of its training run."""
    if epoch == 0:
        return demo_initialisation()
    path = demo_epoch_checkpoint(epoch)
    if not path.is_file():
        raise BadCheckpoint(f"the demo checkpoint {path} is missing",
                            "train it: vizcnn train-demo (see the README)")
    return _load_checkpoint(path, "demo", False, None)  # float16 weights load as float32


def checkpoint_epoch(spec: str | os.PathLike) -> int | None:
    """The training epoch of a model spec, where it can be told: ``demo:N``; a checkpoint
    that records it (vizcnn's ``epoch`` field), read without running code from the file; or
    the last number in the file's name (``epoch_05.pt``, ``ckpt-12.pth``). None otherwise."""
    text = str(spec)
    if text == "demo" or text.startswith("demo:"):
        return demo_epoch(text)
    path = Path(text)
    if path.is_file() and not _is_torchscript(path):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # a full pickled model, or no checkpoint at all: load_model says
            obj = None
        if isinstance(obj, Mapping) and isinstance(obj.get("epoch"), int):
            return int(obj["epoch"])
    numbers = re.findall(r"\d+", path.stem)
    return int(numbers[-1]) if numbers else None


# --------------------------------------------------------------------------- public API


def _device(device: str | torch.device | None) -> torch.device:
    """A device a model can run on here: the CPU, or an accelerator that is present."""
    try:
        device = torch.device(device or "cpu")
    except (RuntimeError, TypeError):
        raise BadArgument(f"unknown device {device!r}", "use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    backend = getattr(torch, device.type, None) if device.type in ("cuda", "mps", "xpu") else None
    if backend is None:
        raise BadArgument(f"a model cannot run on device {str(device)!r}",
                          "use cpu, cuda or cuda:N")
    if not backend.is_available():
        raise BadArgument(f"{device.type.upper()} is not available on this machine",
                          "use device='cpu'")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if device.index is not None and device.index >= count:
        raise BadArgument(f"device {str(device)!r} does not exist: this machine has {count}",
                          f"use {device.type}:0 to {device.type}:{count - 1}")
    return device


def _to_device(model: nn.Module, device: torch.device) -> nn.Module:
    try:
        return model.to(device)
    except RuntimeError as error:
        raise BadArgument(f"cannot move the model to {device}: "
                          f"{str(error).strip().splitlines()[0]}") from None


def load_model(
    spec: str | os.PathLike,
    *,
    weights: str | None = None,
    device: str | torch.device | None = None,
    arch: str | None = None,
    num_classes: int | None = None,
    trust_checkpoint: bool = False,
    preprocessing: Preprocessing | None = None,
) -> nn.Module:
    """Load a model by spec (see the module docstring), in eval mode on ``device``.

    Args:
        spec: "demo", "torchvision:<arch>[:<WEIGHTS>]" or a checkpoint path.
        weights: torchvision weights name for a "torchvision:<arch>" spec (or put it in the spec).
        device: "cpu" (default), "cuda", ... .
        arch: the architecture of a state_dict checkpoint: a torchvision name, "demo", or
            "package.module:callable".
        num_classes: classifier size when building ``arch`` for a state_dict.
        trust_checkpoint: allow a checkpoint that holds a pickled module, or whose ``arch``
            field names code to import (``package.module:callable``); both run code from the
            file.
        preprocessing: the model's ``Preprocessing``, where vizcnn does not know it (a model
            of your own) or knows it wrong.

    Returns:
        The model, in eval mode, with its ``ModelInfo`` (``model_info(model)``): the spec,
        and the preprocessing and class names where they are known or given.
    """
    device = _device(device)
    spec = str(spec)
    if spec == "demo" or spec.startswith("demo:"):
        model = _demo_at(demo_epoch(spec))
    elif spec.startswith("torchvision:"):
        parts = spec.split(":")
        if len(parts) > 3 or not parts[1]:
            raise BadArgument(f"bad model spec {spec!r}", "write torchvision:<arch>[:<WEIGHTS>]")
        model = _load_torchvision(parts[1], parts[2] if len(parts) == 3 else weights)
    else:
        model = _load_checkpoint(Path(spec), arch, trust_checkpoint, num_classes)
    with_model_info(model, spec=spec)
    if preprocessing is not None:
        with_model_info(model, preprocessing=preprocessing)
    return _to_device(model, device).eval()


def with_options(preprocessing: Preprocessing | None, *, size=None, mean=None, std=None
                 ) -> Preprocessing | None:
    """``preprocessing`` (None: unknown) with the given size ((H, W), or an int or (S,): square;
    the whole image resized to exactly that, no crop), mean and std put in; unchanged when none
    is given."""
    if size is None and mean is None and std is None:
        return preprocessing
    changes: dict[str, Any] = {}
    if size is not None:
        one = not isinstance(size, int) and len(size) == 1
        changes.update(resize=as_pair(size[0] if one else size, "size"), crop=None)
    if mean is not None:
        changes["mean"] = tuple(mean)
    if std is not None:
        changes["std"] = tuple(std)
    return replace(preprocessing or UNKNOWN_PREPROCESSING, **changes)  # checked as a whole


def normalisation_of(model: nn.Module, preprocessing: Preprocessing | None, what: str
                     ) -> Preprocessing:
    """The model's preprocessing (``preprocessing`` if given) when its mean and std are known;
    otherwise a one-line error saying that ``what`` needs them and how to give them."""
    given = preprocessing or model_info(model).preprocessing
    if not given.known:
        raise BadArgument(
            f"{what} needs the model's input normalisation (mean and std), which vizcnn does "
            f"not know for {type(model).__name__}",
            "give preprocessing=vizcnn.Preprocessing(mean=..., std=...) (CLI: --mean and "
            "--std, one value per channel)")
    return given


@dataclass(frozen=True)
class InputRecipe:
    """What ``preprocess`` does to one image, without the model: picklable, so worker
    processes can decode and preprocess the images of a scan.

    Attributes:
        preprocessing: the model's preprocessing, its normalisation known (or assumed).
        channels: the channels of the model's input (1: the image becomes grayscale).
        assumed: where the normalisation is assumed, the warning that says so (the caller
            that applies the recipe warns with it), else None.
    """

    preprocessing: Preprocessing
    channels: int = 3
    assumed: str | None = None

    def __call__(self, image: Any) -> torch.Tensor:
        """image (a path, array, PIL image or tensor) -> (C, H, W) float32 on the CPU."""
        if isinstance(image, (str, os.PathLike)):
            # a file's pixels stay interleaved (a channels-last view): the resize is ~20 %
            # faster on them than on a channels-first copy, with the same numbers
            image = torch.from_numpy(read_image(image)).permute(2, 0, 1)
        elif not (isinstance(image, torch.Tensor) and image.dtype == torch.uint8
                  and image.dim() == 3 and image.shape[0] == 3 and image.device.type == "cpu"):
            image = load_image(image)  # an 8-bit RGB tensor is used as it is
        if self.channels == 1:
            image = TF.rgb_to_grayscale(image)
        return self.preprocessing(image)


def input_recipe(model_or_spec: nn.Module | str, *, size: int | tuple[int, int] | None = None,
                 mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
                 preprocessing: Preprocessing | None = None) -> InputRecipe:
    """The ``InputRecipe`` of a model (arguments as in ``preprocess``); where the
    normalisation is unknown it assumes ImageNet's and says so in ``assumed``."""
    recipe = with_options(preprocessing or model_info(model_or_spec).preprocessing, size=size,
                         mean=mean, std=std)
    channels = input_channels(model_or_spec) if isinstance(model_or_spec, nn.Module) else 3
    if recipe.known:
        return InputRecipe(recipe, channels)
    assumed = (IMAGENET_MEAN, IMAGENET_STD) if channels != 1 else ((0.449,), (0.226,))
    name = (type(model_or_spec).__name__ if isinstance(model_or_spec, nn.Module)
            else str(model_or_spec))
    return InputRecipe(
        replace(recipe, mean=recipe.mean or assumed[0], std=recipe.std or assumed[1]), channels,
        f"vizcnn does not know how {name} normalises its input; preprocess assumed mean "
        f"{assumed[0]} and std {assumed[1]} on pixels in [0, 1] and kept the image size: give "
        "preprocessing=vizcnn.Preprocessing(...) (CLI: --mean, --std, --size)")


def preprocess(
    model_or_spec: nn.Module | str,
    image: Any,
    *,
    size: int | tuple[int, int] | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    preprocessing: Preprocessing | None = None,
) -> torch.Tensor:
    """Turn an image into the normalised batch the model expects.

    Args:
        model_or_spec: a loaded model or a spec string; its known preprocessing is used
            (torchvision weights' own transforms; ImageNet resize 256 / crop 224 otherwise).
            For a model whose preprocessing is unknown it warns once
            (``AssumedPreprocessingWarning``) and assumes ImageNet's mean and std on pixels in
            [0, 1], keeping the image's size.
        image: a path, a uint8 / uint16 / float HxW[xC] array, a PIL image, or a tensor
            (C, H, W) with values in [0, 1] (float) or 0..255 (uint8). Grayscale, RGBA and
            16-bit images are converted to 8-bit RGB, and to grayscale for a model whose first
            convolution takes one channel.
        size: resize the whole image to exactly this (H, W) (an int: square), no crop.
        mean: overrides the normalisation's mean.
        std: overrides the normalisation's standard deviation.
        preprocessing: the whole record, instead of the model's.

    Returns:
        (1, C, H, W) float32 on the model's device (CPU for a spec).
    """
    recipe = input_recipe(model_or_spec, size=size, mean=mean, std=std,
                          preprocessing=preprocessing)
    if recipe.assumed:
        warnings.warn(recipe.assumed, AssumedPreprocessingWarning, stacklevel=2)
    batch = recipe(image).unsqueeze(0)
    if isinstance(model_or_spec, nn.Module):
        batch = batch.to(model_device(model_or_spec))
    return batch
