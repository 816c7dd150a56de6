"""Feature visualization by optimization: images optimized from noise until a channel, one of
its units or a class score is as high as it gets (Olah, Mordvintsev & Schubert, "Feature
Visualization", Distill 2017; Erhan et al. 2009; Simonyan et al. 2013 for classes).

The recipe is Lucid's (and Lucent's, ``lucent/optvis``), with these constants taken from there:

- **Parameterization** (``param/spatial.py``): each image is a Fourier spectrum, scaled by
  1/f (``decay_power`` 1, frequencies floored at 1/max(H, W)), started at ``sd`` 0.01 noise,
  turned into pixels by an orthonormal inverse real FFT and divided by Lucid's "magic" 4.
- **Colour** (``param/color.py``): for 3-channel models the three channels are mixed by the
  square root of ImageNet's colour correlation (``COLOR_CORRELATION_SVD_SQRT``, normalised by
  its largest column norm), so that each parameter moves a decorrelated colour; other channel
  counts (grayscale, 4 channels) are left unmixed. A sigmoid maps to pixels in [0, 1].
- **Transforms** (``transform.standard_transforms``): pad 12 (grey 0.5), jitter 8, scale
  0.90-1.10, rotate -10..10 degrees (0 five times as likely as any other angle), jitter 4; Adam
  with lr 0.05. Lucid chose the pixel amounts for 224 px inputs; here they are **scaled to the
  image size** (``TransformRecipe.for_size``), so a 64 px model gets the same relative padding
  and jitter as a 224 px one. All five are composed into one affine resampling per image and
  step (one ``grid_sample`` for the batch), whose output has the optimized image's size (as
  Lucent's ``fixed_image_size``).
- **Dead starts**: Lucid's redirected ReLU gradient (``misc/redirected_relu_grad.py``) for the
  first ``redirect_steps`` steps (16), and after them, up to half of the steps, for as long
  as some image of the batch has not yet made its channel fire or the last redirected step
  still found an image whose gradient was blocked: at every elementwise
  nonlinearity (module or function, ``layers.ACTIVATION_FUNCTIONS``), where the ordinary
  gradient of an image is zero everywhere, the gradient passes unchanged, except where it would
  push a negative input lower.
  Without it a channel whose units are all off on the starting grey gets exactly zero gradient
  and stays grey.

Pixels go through the model's own normalisation (its ``ModelInfo``, or ``preprocessing=``);
where vizcnn does not know it, feature visualization refuses, like the other probes.

Many channels optimize as one batch, one row per image, each row its own objective and its own
random stream (seeded by ``seed``, the channel and the image's number, so a channel gives the
same image alone as in a batch); the forward pass stops at the layer. A channel whose image
never makes it fire (its strongest unit stays <= 0) is reported in ``failed``, never passed off
as a picture.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from vizcnn.checks import channel_indices, check_channels, feature_maps, positive_int
from vizcnn.display import ShowsItself
from vizcnn.errors import BadArgument
from vizcnn.geometry import as_pair, input_channels, last_call, trace_calls
from vizcnn.hooks import forward_to, model_device, preserved_state, run_forward
from vizcnn.io import atomic_path, save_tensors
from vizcnn.layers import ACTIVATION_FUNCTIONS, resolve_layer
from vizcnn.models import Preprocessing, model_info, normalisation_of
from vizcnn.probes import OutputSelector, class_scores
from vizcnn.progress import progress_bar

__all__ = [
    "COLOR_CORRELATION_SVD_SQRT",
    "DEFAULT_STEPS",
    "FeatureVisualization",
    "Recipe",
    "TransformRecipe",
    "describe",
    "feature_visualization",
]

Objective = Literal["channel", "neuron", "class"]

# Lucid's param/color.py: the square root of ImageNet's RGB correlation (from its SVD)
COLOR_CORRELATION_SVD_SQRT = ((0.26, 0.09, 0.02), (0.27, 0.00, -0.05), (0.27, -0.09, 0.03))
DEFAULT_STEPS = 256  # from the activation reached against steps on the demo (docs/featvis.md)
LUCID_SIZE = 224  # the input size Lucid's transform amounts were chosen for
_MAGIC = 4.0  # Lucid's fft_image divides the image by 4 ("reduces saturation")
_CHUNK_BYTES = 512 * 2**20  # activation memory one chunk of rows may take, roughly


@dataclass(frozen=True)
class TransformRecipe:
    """The random transforms applied before every step, in pixels of the optimized image.

    Attributes:
        pad: grey border added on each side. jitter: the first random shift's range (a crop of
            ``jitter`` pixels). scale: (low, high) zoom. degrees: the largest rotation.
        jitter_after: the last random shift's range.
    """

    pad: float = 12.0
    jitter: float = 8.0
    scale: tuple[float, float] = (0.9, 1.1)
    degrees: float = 10.0
    jitter_after: float = 4.0

    @staticmethod
    def for_size(size: tuple[int, int], kind: str = "standard") -> TransformRecipe:
        """Lucid's standard transforms scaled from 224 px to ``size`` (its shorter side), or
        none at all (``kind="none"``)."""
        if kind == "none":
            return TransformRecipe(0.0, 0.0, (1.0, 1.0), 0.0, 0.0)
        if kind != "standard":
            raise BadArgument(f"unknown transforms {kind!r}", "use 'standard' or 'none'")
        factor = min(size) / LUCID_SIZE
        base = TransformRecipe()
        return replace(base, pad=base.pad * factor, jitter=base.jitter * factor,
                       jitter_after=base.jitter_after * factor)


@dataclass(frozen=True)
class Recipe:
    """Everything that decides a feature visualization, as recorded in its manifest."""

    objective: str
    steps: int
    lr: float
    size: tuple[int, int]
    transforms: TransformRecipe
    decorrelate: bool
    redirect_steps: int
    diversity: float
    seed: int
    sd: float = 0.01
    decay_power: float = 1.0


@dataclass(frozen=True)
class FeatureVisualization(ShowsItself):
    """Images optimized until channels (units, classes) fire.

    Attributes:
        images: (K, n, C, H, W) pixels in [0, 1], n images for each of the K channels.
        activation: (K, n) the objective on the untransformed image (mean of the map for
            "channel", the unit for "neuron", the class score for "class").
        strongest: (K, n) the strongest unit of the channel's map on the untransformed image
            (the scan's measure; the class score for "class").
        curve: (K, steps) the objective per step, on the transformed images, mean over n.
        failed: (K,) bool: no image of the channel made it fire (its strongest unit <= 0);
            always False for "class".
        layer: the layer ("output" for classes). channels: (K,) the channels (or classes).
        recipe: how the images were made.
    """

    images: torch.Tensor
    activation: torch.Tensor
    strongest: torch.Tensor
    curve: torch.Tensor
    failed: torch.Tensor
    layer: str
    channels: torch.Tensor
    recipe: Recipe

    def select(self, channels: Sequence[int]) -> FeatureVisualization:
        """The rows of ``channels`` (each must be one of ``self.channels``), in that order:
        what a call for those channels alone gives, to float rounding (each row has its own
        random stream)."""
        held = self.channels.tolist()
        missing = [c for c in channels if c not in held]
        if missing:
            raise BadArgument(f"channels {missing} were not visualized",
                              f"these were: {held}")
        rows = torch.tensor([held.index(c) for c in channels], dtype=torch.long)
        return replace(self, images=self.images[rows], activation=self.activation[rows],
                       strongest=self.strongest[rows], curve=self.curve[rows],
                       failed=self.failed[rows], channels=self.channels[rows])

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``images_<channel>_<i>.png`` per image, ``featvis.pt`` (every tensor) and
        ``manifest.json`` into ``folder``, which is replaced whole."""
        from vizcnn.render.grid import pixel_tiles, write_image

        folder = Path(folder)
        with atomic_path(folder) as staging:
            staging.mkdir()
            for row, channel in enumerate(self.channels.tolist()):
                for i, tile in enumerate(pixel_tiles(self.images[row])):
                    write_image(staging / f"image_{channel}_{i}.png", tile)
            tensors = {name: getattr(self, name).cpu() for name in
                       ("images", "activation", "strongest", "curve", "failed", "channels")}
            save_tensors(tensors, staging / "featvis.pt")
            manifest = {
                "layer": self.layer, "channels": self.channels.tolist(),
                "activation": self.activation.tolist(), "strongest": self.strongest.tolist(),
                "failed": self.failed.tolist(), "recipe": asdict(self.recipe),
            }
            (staging / "manifest.json").write_text(json.dumps(manifest, indent=1))
        return folder


# --------------------------------------------------------------------------- parameterization


def _frequencies(size: tuple[int, int]) -> torch.Tensor:
    """(H, W // 2 + 1) spatial frequency magnitudes of ``rfft2`` (cycles per pixel)."""
    height, width = size
    fy = torch.fft.fftfreq(height)[:, None]
    fx = torch.fft.rfftfreq(width)[None, :]
    return (fx * fx + fy * fy).sqrt()


class _FourierImages:
    """A batch of images parameterized as 1/f-scaled spectra, decorrelated colours, sigmoid.

    ``spectrum`` (N, C, H, W // 2 + 1, 2) is the parameter; ``pixels()`` (N, C, H, W) in
    [0, 1]."""

    def __init__(self, spectrum: torch.Tensor, size: tuple[int, int], decorrelate: bool,
                 decay_power: float):
        self.spectrum = spectrum
        self.size = size
        freqs = _frequencies(size).to(spectrum.device)
        self.scale = (1.0 / freqs.clamp_min(1.0 / max(size)) ** decay_power)[..., None]
        self.mix = None
        if decorrelate:
            root = torch.tensor(COLOR_CORRELATION_SVD_SQRT, device=spectrum.device)
            self.mix = root / root.norm(dim=0).max()

    def pixels(self) -> torch.Tensor:
        spectrum = torch.view_as_complex(self.spectrum * self.scale)
        image = torch.fft.irfft2(spectrum, s=self.size, norm="ortho") / _MAGIC
        if self.mix is not None:
            image = torch.einsum("nchw,dc->ndhw", image, self.mix)
        return torch.sigmoid(image)


# --------------------------------------------------------------------------- transforms


def _random_affines(generator: torch.Generator, steps: int, recipe: TransformRecipe
                    ) -> torch.Tensor:
    """(steps, 4) per step: shift y, shift x (pixels), scale, angle (radians), drawn as
    Lucid's transforms draw them (integer jitters, 11 scales, 21 angles with 0 six times)."""
    def shift(amount: float) -> torch.Tensor:
        whole = int(round(amount))
        return (torch.randint(0, whole + 1, (steps, 2), generator=generator).float()
                - whole / 2) if whole else torch.zeros(steps, 2)

    low, high = recipe.scale
    scales = torch.linspace(low, high, 11)[torch.randint(0, 11, (steps,), generator=generator)]
    degrees = int(round(recipe.degrees))
    angles = torch.tensor([*range(-degrees, degrees + 1), *[0] * 5], dtype=torch.float)
    angle = angles[torch.randint(0, len(angles), (steps,), generator=generator)]
    moved = shift(recipe.jitter) + shift(recipe.jitter_after)
    return torch.cat([moved, scales[:, None], torch.deg2rad(angle)[:, None]], dim=1)


def _transform(pixels: torch.Tensor, draws: torch.Tensor, recipe: TransformRecipe
               ) -> torch.Tensor:
    """Pad (grey), shift, zoom, rotate and shift again, as one affine resampling per image.

    Args:
        pixels: (N, C, H, W) in [0, 1]. draws: (N, 4) from ``_random_affines``.

    Returns:
        (N, C, H, W): the transformed frame, resized back to H x W (as Lucent's
        ``fixed_image_size``); the padding shows as grey 0.5.
    """
    height, width = pixels.shape[-2:]
    frame = (height + 2 * recipe.pad - recipe.jitter - recipe.jitter_after,
             width + 2 * recipe.pad - recipe.jitter - recipe.jitter_after)
    shift_y, shift_x, scale, angle = draws.to(pixels).unbind(1)
    cos, sin = angle.cos() / scale, angle.sin() / scale
    # output offsets (normalised) -> frame pixels -> rotated, zoomed -> image (normalised)
    fy, fx = frame[0] / height, frame[1] / width
    theta = torch.stack([
        torch.stack([cos * fx, -sin * frame[0] / width, shift_x * 2 / width], 1),
        torch.stack([sin * frame[1] / height, cos * fy, shift_y * 2 / height], 1),
    ], 1)
    grid = F.affine_grid(theta, list(pixels.shape), align_corners=False)
    return F.grid_sample(pixels - 0.5, grid, align_corners=False) + 0.5


# --------------------------------------------------------------------------- redirected gradient


_RECTIFIERS = frozenset({"relu", "relu_"})  # their ordinary gradient is grad * (x > 0)


def _out_of_place(function):
    """``torch.relu_`` -> ``torch.relu`` (and so on): the forward must leave its input as it
    is, since the backward needs it."""
    name = function.__name__
    if name.endswith("_") and not name.startswith("_"):
        return getattr(torch, name[:-1], None) or getattr(F, name[:-1])
    return function


class _Redirected(torch.autograd.Function):
    """A nonlinearity's forward; its backward is the ordinary gradient for every image
    (batch row) where that is not zero everywhere, else Lucid's redirected gradient: the
    incoming gradient, except where it would push a negative input lower."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, function, args: tuple, kwargs: dict,
                mode: _Redirecting) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.function, ctx.args, ctx.kwargs, ctx.mode = function, args, kwargs, mode
        return function(x, *args, **kwargs)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        if ctx.function.__name__ in _RECTIFIERS:
            ordinary = torch.where(x > 0, grad, 0.0)
        else:
            with torch.enable_grad():
                inner = x.detach().requires_grad_(True)
                (ordinary,) = torch.autograd.grad(ctx.function(inner, *ctx.args, **ctx.kwargs),
                                                  inner, grad)
        blocked = ordinary.flatten(1).eq(0).all(1)
        if not bool(blocked.any()):
            return ordinary, None, None, None, None
        ctx.mode.blocked = True
        # ``grad`` is d(loss)/d(output) for a loss to minimize: > 0 pushes the input lower
        redirected = torch.where((x < 0) & (grad > 0), 0.0, grad)
        blocked = blocked.view(-1, *[1] * (grad.dim() - 1))
        return torch.where(blocked, redirected, ordinary), None, None, None, None


class _Redirecting(TorchFunctionMode):
    """While active, every elementwise nonlinearity's call goes through ``_Redirected``;
    ``blocked`` says whether a backward pass through them found a row whose ordinary
    gradient was zero everywhere (and redirected it)."""

    def __init__(self):
        super().__init__()
        self.blocked = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", None)
        if (name in ACTIVATION_FUNCTIONS and args and isinstance(args[0], torch.Tensor)
                and args[0].requires_grad and args[0].dim() >= 2):
            kwargs = {k: v for k, v in kwargs.items() if k != "inplace"}
            return _Redirected.apply(args[0], _out_of_place(func), args[1:], kwargs, self)
        return func(*args, **kwargs)


# --------------------------------------------------------------------------- objectives


@dataclass(frozen=True)
class _Target:
    """What the rows of one chunk maximize: ``channels`` (R,) per row (classes for
    "class"), the ``unit`` (y, x) for "neuron", ``group`` (R,) the channel each row belongs
    to (for the diversity penalty)."""

    objective: str
    channels: torch.Tensor
    unit: tuple[int, int] | None
    group: torch.Tensor


def _per_row(maps: torch.Tensor, target: _Target) -> tuple[torch.Tensor, torch.Tensor]:
    """(R,) the objective and (R,) the strongest unit of each row's channel, from the layer's
    output ``maps`` (R, C, h, w) or, for "class", the class scores (R, K)."""
    rows = torch.arange(len(maps), device=maps.device)
    if target.objective == "class":
        score = maps[rows, target.channels]
        return score, score
    if maps.dim() == 2:
        maps = maps[:, :, None, None]
    own = maps[rows, target.channels]  # (R, h, w)
    strongest = own.flatten(1).amax(1)
    if target.objective == "neuron":
        y, x = target.unit if target.unit is not None else (own.shape[1] // 2, own.shape[2] // 2)
        return own[:, y, x], strongest
    return own.flatten(1).mean(1), strongest


def _diversity_penalty(maps: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Sum over pairs of rows in the same group of the cosine similarity of their Gram
    matrices (Olah 2017; Lucent's ``objectives.diversity``): (,)."""
    flat = maps.flatten(2) if maps.dim() == 4 else maps[:, :, None]
    gram = F.normalize(torch.bmm(flat, flat.transpose(1, 2)).flatten(1), dim=1)
    similarity = gram @ gram.T
    same = (group[:, None] == group[None, :]) & ~torch.eye(len(group), dtype=torch.bool,
                                                            device=group.device)
    return (similarity * same).sum()


# --------------------------------------------------------------------------- the optimization


class _Model:
    """The model seen from pixels: ``outputs(pixels)`` is the layer's output (stopping the
    forward pass there) or the class scores."""

    def __init__(self, model: nn.Module, layer: str | None, output: OutputSelector,
                 mean: torch.Tensor, std: torch.Tensor, size: tuple[int, int]):
        self.model, self.layer, self.output = model, layer, output
        self.mean, self.std = mean, std
        self.calls = trace_calls(model, size)  # one trace: the stop and the chunk size
        if layer is not None:
            last_call(self.calls, layer)  # the layer runs at this size, or one line says why
        self.traced = [call.name for call in self.calls]

    def outputs(self, pixels: torch.Tensor) -> torch.Tensor:
        x = (pixels - self.mean) / self.std
        if x.device.type == "cpu":
            # channels-last inputs take oneDNN's faster convolutions on the CPU: the "neuron"
            # objective (the gallery's) ran 16 % faster on the demo's features.6, the
            # "channel" objective as fast as before (scripts/bench.py --section featvis; the
            # model is not touched: only this batch's layout changes, every row alike)
            x = x.contiguous(memory_format=torch.channels_last)
        if self.layer is None:
            return class_scores(run_forward(self.model, x), self.output)
        out = forward_to(self.model, x, [self.layer], self.traced)[self.layer]
        return feature_maps(out, self.layer, flat_ok=True)


def _row_generator(seed: int, channel: int, image: int) -> torch.Generator:
    """A row's own random stream, the same whatever else is in the batch."""
    return torch.Generator().manual_seed((seed * 1_000_003 + channel) * 1_009 + image)


def _optimize(seen: _Model, target: _Target, recipe: Recipe, images_per_channel: int,
              channels_in: int, bar) -> tuple[torch.Tensor, torch.Tensor]:
    """Optimize one chunk of rows. Returns the pixels (R, C, H, W) and the objective per
    step (steps, R) on the transformed images."""
    device = seen.mean.device
    rows = len(target.channels)
    height, width = recipe.size
    spectra, draws = [], []
    for channel, image in zip(target.channels.tolist(),
                              [r % images_per_channel for r in range(rows)], strict=True):
        generator = _row_generator(recipe.seed, channel, image)
        spectra.append(torch.randn(channels_in, height, width // 2 + 1, 2,
                                   generator=generator) * recipe.sd)
        draws.append(_random_affines(generator, recipe.steps, recipe.transforms))
    spectrum = torch.stack(spectra).to(device).requires_grad_(True)
    draws_t = torch.stack(draws, 1).to(device)  # (steps, R, 4)
    images = _FourierImages(spectrum, recipe.size, recipe.decorrelate, recipe.decay_power)
    optimizer = torch.optim.Adam([spectrum], lr=recipe.lr)
    curve = torch.empty(recipe.steps, rows, device=device)
    fired = torch.zeros(rows, dtype=torch.bool, device=device)
    blocked = True  # whether the last redirected step found a row with no gradient
    for step in range(recipe.steps):
        # redirected for the first steps, and after them, up to half of the steps, for as
        # long as some row has never fired or the last redirected step found one blocked
        redirect = step < recipe.redirect_steps or (
            recipe.redirect_steps > 0 and step < recipe.steps // 2
            and (blocked or not bool(fired.all())))
        mode = _Redirecting() if redirect else None
        with mode or contextlib.nullcontext():
            transformed = _transform(images.pixels(), draws_t[step], recipe.transforms)
            maps = seen.outputs(transformed)
            value, strongest = _per_row(maps, target)
            fired |= strongest.detach() > 0
            loss = -value.sum()
            if recipe.diversity:
                loss = loss + recipe.diversity * _diversity_penalty(maps, target.group)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        blocked = mode.blocked if mode is not None else blocked
        optimizer.step()
        curve[step] = value.detach()
        bar.update(rows)
    return images.pixels().detach(), curve


def _chunk_rows(seen: _Model, requested: int | None) -> int:
    """Rows per chunk: ``requested``, or as many as keep the forward pass's activations near
    ``_CHUNK_BYTES`` (measured on one image: every module output up to the layer)."""
    if requested is not None:
        return positive_int(requested, "batch_size")
    calls = seen.calls
    stop = max((i for i, call in enumerate(calls) if call.name == seen.layer),
               default=len(calls) - 1)
    per_row = sum(call.output.numel() * call.output.element_size()
                  for call in calls[1:stop + 1] if isinstance(call.output, torch.Tensor))
    return max(1, int(_CHUNK_BYTES // max(3 * per_row, 1)))


def _check_arguments(model: nn.Module, layer: str | None, objective: str, steps: int, n: int,
                     lr: float, diversity: float, size) -> tuple[int, int] | None:
    if objective not in ("channel", "neuron", "class"):
        raise BadArgument(f"unknown objective {objective!r}", "use channel, neuron or class")
    positive_int(steps, "steps")
    positive_int(n, "n")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise BadArgument(f"lr must be a number > 0, got {lr!r}")
    if not (isinstance(diversity, (int, float)) and math.isfinite(diversity) and diversity >= 0):
        raise BadArgument(f"diversity must be a number >= 0, got {diversity!r}")
    if objective != "class":
        if layer is None:
            raise BadArgument(f"the {objective} objective needs a layer", "give layer=")
        resolve_layer(model, layer)
    return None if size is None else as_pair(size, "size")


def feature_visualization(
    model: nn.Module,
    layer: str | None,
    channels: int | Sequence[int] | torch.Tensor | None = None,
    *,
    objective: Objective = "channel",
    unit: tuple[int, int] | None = None,
    classes: int | str | Sequence[int | str] | None = None,
    output: OutputSelector = None,
    n: int = 1,
    diversity: float = 0.0,
    size: int | tuple[int, int] | None = None,
    steps: int | None = None,
    lr: float = 0.05,
    seed: int = 0,
    transforms: str = "standard",
    redirect_steps: int = 16,
    decorrelate: bool | None = None,
    preprocessing: Preprocessing | None = None,
    batch_size: int | None = None,
    progress: bool = True,
) -> FeatureVisualization:
    """Optimize images from noise until each channel of ``layer`` fires as strongly as it can.

    Args:
        model: any image model; it comes back bit-identical, with no hook left.
        layer: dotted name; None for the "class" objective.
        channels: channels of the layer (default: all of them).
        objective: "channel" (mean of the channel's map), "neuron" (one unit, ``unit`` (y, x),
            default the map's centre), or "class" (a class score before the softmax, Simonyan
            et al. 2013; the classes in ``classes``, as indices or names; ``output`` selects
            the scores from a tuple or dict output).
        n: images per channel; ``diversity`` > 0 pushes them apart (Gram-matrix penalty).
        size: (H, W) of the images (default: the model's input size).
        steps: Adam's steps (default ``DEFAULT_STEPS``).
        lr: Adam's learning rate.
        seed: the same seed gives the same images on the same machine.
        transforms: "standard" (Lucid's, scaled to ``size``) or "none".
        redirect_steps: the first steps with the redirected rectifier gradient (0: never;
            see the module docstring).
        decorrelate: mix the colours through ImageNet's colour correlation (default: for
            3-channel models). It makes natural colours easy and saturated ones slow: a
            single conv layer's optimum (every pixel 0 or 1) is reached to 90-97 % in 512
            steps with it, 99 % without.
        preprocessing: the model's normalisation, where the model does not carry it.
        batch_size: rows per optimization (default: by memory).

    Returns:
        FeatureVisualization with images (K, n, C, H, W) in [0, 1].
    """
    steps = DEFAULT_STEPS if steps is None else steps
    size = _check_arguments(model, layer, objective, steps, n, lr, diversity, size)
    info = model_info(model)
    size = size or info.input_size
    if size is None:
        raise BadArgument(f"vizcnn does not know {type(model).__name__}'s input size",
                          "give size= (CLI: --size)")
    known = normalisation_of(model, preprocessing, "feature visualization")
    channels_in = input_channels(model)
    device = model_device(model)
    mean, std = (torch.tensor(v, device=device).view(1, -1, 1, 1)
                 for v in known.pixel_normalisation(channels_in))
    if isinstance(redirect_steps, bool) or not isinstance(redirect_steps, int) \
            or redirect_steps < 0:
        raise BadArgument(f"redirect_steps must be an integer >= 0, got {redirect_steps!r}")
    if decorrelate and channels_in != 3:
        raise BadArgument(f"colour decorrelation needs a 3-channel model; this one takes "
                          f"{channels_in}", "leave decorrelate out")
    recipe = Recipe(objective, steps, float(lr), size, TransformRecipe.for_size(size, transforms),
                    channels_in == 3 if decorrelate is None else bool(decorrelate),
                    min(redirect_steps, steps), float(diversity), int(seed))
    with preserved_state(model, eval_mode=True):
        for param in model.parameters():
            param.requires_grad_(False)
        seen = _Model(model, None if objective == "class" else layer, output, mean, std, size)
        with torch.no_grad():
            probe = seen.outputs(torch.full((1, channels_in, *size), 0.5, device=device))
        wanted = _wanted(model, info, probe, layer, channels, classes, objective, unit)
        return _run(seen, wanted, objective, unit, recipe, n, channels_in,
                    _chunk_rows(seen, batch_size), progress,
                    "output" if objective == "class" else layer)


def _wanted(model, info, probe: torch.Tensor, layer, channels, classes, objective, unit
            ) -> torch.Tensor:
    """(K,) the channels (or classes) to visualize, checked against the layer's output."""
    if objective == "class":
        if classes is None:
            raise BadArgument("the class objective needs the classes to visualize",
                              "give classes= (CLI: --class NAME)")
        given = [classes] if isinstance(classes, (int, str)) else list(classes)
        indices = torch.tensor([info.class_index(c) for c in given], dtype=torch.long)
        check_channels(indices, probe.shape[1], "the model's output")
        return indices
    count = probe.shape[1]
    wanted = torch.arange(count) if channels is None else channel_indices(channels)
    check_channels(wanted, count, layer)
    if objective == "neuron" and unit is not None:
        height, width = (probe.shape[2:] if probe.dim() == 4 else (1, 1))
        y, x = unit
        if not (0 <= y < height and 0 <= x < width):
            raise BadArgument(f"unit {tuple(unit)} is outside {layer!r}'s {height}x{width} map")
    return wanted


def _run(seen: _Model, wanted: torch.Tensor, objective: str, unit, recipe: Recipe, n: int,
         channels_in: int, chunk: int, progress: bool, layer: str) -> FeatureVisualization:
    rows = wanted.repeat_interleave(n)
    group = torch.arange(len(wanted)).repeat_interleave(n)
    chunk = max(n, chunk // n * n)  # a channel's n images stay in one chunk (diversity)
    pixels, curves, values, strongest = [], [], [], []
    with progress_bar(total=len(rows) * recipe.steps, unit="image-step", disable=not progress,
                      desc=f"feature visualization {layer}") as bar:
        for start in range(0, len(rows), chunk):
            part = slice(start, start + chunk)
            target = _Target(objective, rows[part].to(seen.mean.device), unit,
                             group[part].to(seen.mean.device))
            images, curve = _optimize(seen, target, recipe, n, channels_in, bar)
            with torch.no_grad():
                value, best = _per_row(seen.outputs(images), target)
            pixels.append(images)
            curves.append(curve)
            values.append(value)
            strongest.append(best)
    images = torch.cat(pixels).view(len(wanted), n, channels_in, *recipe.size)
    strongest_t = torch.cat(strongest).view(len(wanted), n)
    curve = torch.cat(curves, 1).view(recipe.steps, len(wanted), n).mean(2).T
    failed = (strongest_t <= 0).all(1) if objective != "class" else torch.zeros(
        len(wanted), dtype=torch.bool)
    return FeatureVisualization(images, torch.cat(values).view(len(wanted), n), strongest_t,
                                curve, failed.cpu(), layer, wanted, recipe)


def describe(result: FeatureVisualization) -> str:
    """One line: what was optimized and how many channels failed."""
    failed = int(result.failed.sum())
    count = len(result.channels)
    text = f"{count} feature visualization(s) of {result.layer}, {result.recipe.steps} steps"
    return text + (f"; {failed} of {count} never fired" if failed else "")
