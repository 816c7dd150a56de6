"""Adversarial probes: how small a change of the pixels flips a decision (FGSM, PGD, the
box-constrained L-BFGS of Szegedy et al. 2013) or excites a feature map (``excite``), and how far
each layer's activations move (``layer_displacement``).

Units: every attack works in **pixel space with values in [0, 1]**, whatever the model's
normalisation. ``eps`` and distortions are in those units (8/255 is "8 grey levels"); inputs and
outputs are the model's normalised tensors, converted with the model's mean and std from its
preprocessing record (``preprocessing_for``, or ``preprocessing=``). Where vizcnn does not know
them, the probes refuse rather than guess: a wrong guess would make eps meaningless and the
clipping to [0, 1] wrong. Results always stay inside the eps-ball and the pixel range [0, 1].

FGSM and PGD are the closed-form sign steps, written here: every pixel moves by the step along
the sign of its loss gradient, however small the gradient (Captum's ``FGSM`` leaves pixels
whose |gradient| is at most 1e-6 unmoved, which on confident models skips whole images).
Models whose output is not one (N, classes) tensor take ``output=`` (see
``probes.class_scores``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vizcnn.checks import channel_index, check_channels, feature_maps, positive_int
from vizcnn.display import ShowsItself
from vizcnn.errors import BadArgument
from vizcnn.geometry import traced_names
from vizcnn.hooks import (
    capture,
    forward_to,
    model_device,
    preserved_state,
    require_batch,
    run_forward,
)
from vizcnn.layers import list_layers, resolve_layer
from vizcnn.models import Preprocessing, normalisation_of
from vizcnn.probes import OutputSelector, class_labels, class_scores

__all__ = [
    "AdversarialResult",
    "ExciteResult",
    "excite",
    "fgsm",
    "layer_displacement",
    "lbfgs_adversarial",
    "pgd",
]


# a class index for every image, one per image, or None (untargeted)
Classes: TypeAlias = int | Sequence[int] | torch.Tensor | None


@dataclass(frozen=True)
class AdversarialResult(ShowsItself):
    """A batch of adversarial images and what the model made of them.

    Attributes:
        x: (N, C, H, W) the adversarial images, normalised like the input.
        perturbation: (N, C, H, W) the change in pixel units ([0, 1] scale).
        clean_label, clean_prob: (N,) prediction and its probability on the clean images.
        label, prob: (N,) prediction and its probability on the adversarial images.
        target: (N,) the class aimed at (targeted) or moved away from (untargeted).
        targeted: whether the attack aimed at ``target``.
        success: (N,) bool: label == target (targeted) or label != target (untargeted).
        rms: (N,) root-mean-square of the perturbation over the pixels, pixel units.
        linf: (N,) largest absolute change, pixel units.
        method: "fgsm", "pgd" or "lbfgs"; eps: the L-inf radius (None for L-BFGS).
    """

    x: torch.Tensor
    perturbation: torch.Tensor
    clean_label: torch.Tensor
    clean_prob: torch.Tensor
    label: torch.Tensor
    prob: torch.Tensor
    target: torch.Tensor
    targeted: bool
    success: torch.Tensor
    rms: torch.Tensor
    linf: torch.Tensor
    method: str
    eps: float | None = None


# --------------------------------------------------------------------------- pixel space


def _normalisation(model: nn.Module, x: torch.Tensor, preprocessing: Preprocessing | None,
                   what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, C, 1, 1) mean and std that map pixels in [0, 1] to the model's input, from the
    model's preprocessing record (or ``preprocessing``); a one-line error naming ``what``
    when they are unknown."""
    known = normalisation_of(model, preprocessing, what)
    mean, std = known.pixel_normalisation(x.shape[1])
    return (torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1),
            torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1))


class _PixelModel(nn.Module):
    """The classifier seen from pixel space: ``forward(p)`` is the class scores (N, classes)
    of ``model((p - mean) / std)``, selected from its output by ``output``."""

    def __init__(self, model: nn.Module, mean: torch.Tensor, std: torch.Tensor,
                 output: OutputSelector = None):
        super().__init__()
        self.model, self.mean, self.std, self.output = model, mean, std, output

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return class_scores(run_forward(self.model, (pixels - self.mean) / self.std),
                            self.output)


@contextlib.contextmanager
def _attacking(model: nn.Module) -> Iterator[None]:
    """Eval mode, no parameter gradients, everything restored afterwards."""
    with preserved_state(model, eval_mode=True):
        for param in model.parameters():
            param.requires_grad_(False)
        yield


def _check_eps(eps: float, what: str = "eps") -> float:
    if not isinstance(eps, (int, float)) or not np.isfinite(eps) or eps < 0:
        raise BadArgument(f"{what} must be a number >= 0, got {eps!r}")
    if eps > 1:
        raise BadArgument(f"{what} = {eps} is more than the whole pixel range: {what} is in "
                          "0-1 pixel units", f"for 0-255 units divide by 255 (8/255 = "
                          f"{8 / 255:.4f})")
    return float(eps)


def _result(pixel_model, pixels, adversarial, clean_logits, target, targeted, method, eps
            ) -> AdversarialResult:
    with torch.no_grad():
        logits = pixel_model(adversarial)
    clean_p = torch.softmax(clean_logits, 1)
    p = torch.softmax(logits, 1)
    label = p.argmax(1)
    rows = torch.arange(len(p), device=p.device)
    perturbation = adversarial - pixels
    success = label == target if targeted else label != target
    return AdversarialResult(
        x=(adversarial - pixel_model.mean) / pixel_model.std, perturbation=perturbation,
        clean_label=clean_p.argmax(1), clean_prob=clean_p.max(1).values, label=label,
        prob=p[rows, label], target=target, targeted=targeted, success=success,
        rms=perturbation.pow(2).flatten(1).mean(1).sqrt(),
        linf=perturbation.abs().flatten(1).amax(1), method=method, eps=eps)


def _to_pixels(model, x, preprocessing, what, output=None
               ) -> tuple[torch.Tensor, _PixelModel, torch.Tensor]:
    """x on the model's device, the pixel-space model, and x's pixels in [0, 1]."""
    x = require_batch(x).to(model_device(model))
    mean_t, std_t = _normalisation(model, x, preprocessing, what)
    return (x, _PixelModel(model, mean_t, std_t, output),
            (x * std_t + mean_t).clamp(0.0, 1.0).detach())


def _into_ball(perturbed: torch.Tensor, pixels: torch.Tensor, eps: float) -> torch.Tensor:
    """Project onto the L-inf ball of radius eps around ``pixels`` and the box [0, 1]."""
    return torch.minimum(torch.maximum(perturbed, pixels - eps), pixels + eps).clamp(0.0, 1.0)


def _setup(model, x, target, preprocessing, output, what):
    x, pixel_model, pixels = _to_pixels(model, x, preprocessing, what, output)
    with torch.no_grad():
        clean_logits = class_scores(run_forward(model, x), output)
    targeted = target is not None
    labels = class_labels(target if targeted else clean_logits.argmax(1), clean_logits)
    return pixel_model, pixels, clean_logits, labels, targeted


def _ascent_sign(pixel_model: _PixelModel, pixels: torch.Tensor, labels: torch.Tensor,
                 targeted: bool) -> torch.Tensor:
    """(N, C, H, W) sign of the cross-entropy's gradient at ``pixels``: up the loss of the
    clean class (untargeted), down the loss of the target (targeted). Every pixel whose
    gradient is not exactly zero gets +-1, however small the gradient."""
    current = pixels.detach().clone().requires_grad_(True)
    loss = F.cross_entropy(pixel_model(current), labels, reduction="sum")
    (grad,) = torch.autograd.grad(loss, current)
    return -grad.sign() if targeted else grad.sign()


# --------------------------------------------------------------------------- FGSM, PGD


def fgsm(model: nn.Module, x: torch.Tensor, eps: float, *, target: Classes = None,
         preprocessing: Preprocessing | None = None, output: OutputSelector = None
         ) -> AdversarialResult:
    """The fast gradient sign method: one step of ``eps`` (pixel units) along the sign of the
    loss gradient, on every pixel, then clipped to [0, 1]. Untargeted (away from the clean
    prediction) unless ``target`` gives the class(es) to aim at.

    Args:
        x: (N, C, H, W) normalised images. eps: in [0, 1] pixel units.
        target: class index for all images or one per image; None: untargeted.
        preprocessing: the model's normalisation, where the model does not carry it.
        output: selects the class scores from a model that returns a tuple or dict.
    """
    eps = _check_eps(eps)
    with _attacking(model):
        pixel_model, pixels, clean_logits, labels, targeted = _setup(
            model, x, target, preprocessing, output, "fgsm")
        sign = _ascent_sign(pixel_model, pixels, labels, targeted)
        adversarial = (pixels + eps * sign).clamp(0.0, 1.0)
        return _result(pixel_model, pixels, adversarial, clean_logits, labels, targeted,
                       "fgsm", eps)


def pgd(model: nn.Module, x: torch.Tensor, eps: float, *, steps: int = 10,
        step_size: float | None = None, random_start: bool = False, target: Classes = None,
        preprocessing: Preprocessing | None = None, output: OutputSelector = None
        ) -> AdversarialResult:
    """Projected gradient descent in the L-inf ball of radius ``eps`` (pixel units): ``steps``
    sign steps of ``step_size`` (default eps / 4), each projected back into the ball and [0, 1];
    ``random_start`` begins at a uniform point of the ball. Arguments as for ``fgsm``."""
    eps = _check_eps(eps)
    positive_int(steps, "steps")
    step_size = eps / 4 if step_size is None else _check_eps(step_size, "step_size")
    with _attacking(model):
        pixel_model, pixels, clean_logits, labels, targeted = _setup(
            model, x, target, preprocessing, output, "pgd")
        current = pixels
        if random_start:
            current = _into_ball(pixels + torch.empty_like(pixels).uniform_(-eps, eps),
                                 pixels, eps)
        for _ in range(steps):
            sign = _ascent_sign(pixel_model, current, labels, targeted)
            current = _into_ball(current + step_size * sign, pixels, eps)
        return _result(pixel_model, pixels, current, clean_logits, labels, targeted,
                       "pgd", eps)


# --------------------------------------------------------------------------- L-BFGS


def lbfgs_adversarial(model: nn.Module, x: torch.Tensor, *, target: Classes = None,
                      preprocessing: Preprocessing | None = None,
                      output: OutputSelector = None, searches: int = 5,
                      max_iterations: int = 20, c_range=(1e-3, 1e2),
                      batch_size: int = 50) -> AdversarialResult:
    """Szegedy et al.'s search for the smallest perturbation that makes the model say
    ``target``: minimise ``c * |r|^2 + CE(model(x + r), target)`` subject to ``x + r`` in the
    pixel box [0, 1], with scipy's box-constrained L-BFGS-B, and a bisection over ``c`` (in log
    space, ``searches`` times) for the largest c (smallest perturbation) that still succeeds.

    Args:
        target: class(es) to aim at; default: each image's second most probable class.
        preprocessing: as for ``fgsm``.
        output: as for ``fgsm``.
        searches: bisection steps over c.
        max_iterations: L-BFGS-B iterations per c.
        batch_size: images optimised together (their objectives are independent sums).

    Returns:
        ``AdversarialResult`` with the smallest successful perturbation per image (``success``
        False and the last attempt where none succeeded); ``rms`` is the paper's distortion.
    """
    if not isinstance(searches, int) or searches < 1 or not isinstance(max_iterations, int) \
            or max_iterations < 1:
        raise BadArgument("searches and max_iterations must be positive integers")
    with _attacking(model):
        pixel_model, pixels, clean_logits, labels, _ = _setup(
            model, x, target, preprocessing, output, "lbfgs_adversarial")
        if target is None:  # the runner-up class of the clean image
            labels = clean_logits.topk(2, dim=1).indices[:, 1]
        best = pixels.clone()
        for start in range(0, len(pixels), batch_size):
            chunk = slice(start, start + batch_size)
            best[chunk] = _lbfgs_chunk(pixel_model, pixels[chunk], labels[chunk], searches,
                                       max_iterations, c_range)
        return _result(pixel_model, pixels, best, clean_logits, labels, True, "lbfgs", None)


def _lbfgs_chunk(pixel_model, pixels, labels, searches, max_iterations, c_range):
    """Bisection over log c for a chunk of images, one joint L-BFGS-B run per c: the first
    run uses the smallest c, later ones halve the interval between the largest c known to
    succeed and the smallest known to fail."""
    from scipy.optimize import minimize

    count = len(pixels)
    low = torch.full((count,), float(np.log(c_range[0])))  # small c: the loss dominates
    high = torch.full((count,), float(np.log(c_range[1])))  # large c: |r| dominates
    found = pixels.clone()
    succeeded = torch.zeros(count, dtype=torch.bool)
    best_norm = torch.full((count,), float("inf"))
    shape, device, dtype = pixels.shape, pixels.device, pixels.dtype
    origin = pixels.detach().cpu().double().numpy().ravel()
    bounds = list(zip(-origin, 1.0 - origin, strict=True))
    for search in range(searches):
        # first the smallest c (the loss dominates: success if anything succeeds), then bisect
        log_c = low.clone() if search == 0 else (low + high) / 2
        c = torch.exp(log_c).to(device, dtype).view(-1, 1, 1, 1)

        def objective(flat, c=c):
            r = torch.tensor(flat, dtype=dtype, device=device).view(shape).requires_grad_(True)
            logits = pixel_model(pixels + r)
            loss = (c * r.pow(2)).sum() + F.cross_entropy(logits, labels, reduction="sum")
            (grad,) = torch.autograd.grad(loss, r)
            return float(loss.detach()), grad.detach().cpu().double().numpy().ravel()

        solution = minimize(objective, np.zeros_like(origin), jac=True, method="L-BFGS-B",
                            bounds=bounds, options={"maxiter": max_iterations})
        r = torch.tensor(solution.x, dtype=dtype, device=device).view(shape)
        candidate = (pixels + r).clamp(0.0, 1.0)
        with torch.no_grad():
            hit = (pixel_model(candidate).argmax(1) == labels).cpu()
        norms = r.pow(2).flatten(1).sum(1).cpu()
        better = hit & (norms < best_norm)
        found[better.to(device)] = candidate[better.to(device)]
        best_norm = torch.where(better, norms, best_norm)
        succeeded |= hit
        never = ~succeeded
        found[never.to(device)] = candidate[never.to(device)]  # the last try, for the record
        # success: try a larger c (a smaller perturbation); failure: a smaller c
        low = torch.where(hit, log_c, low)
        high = torch.where(hit, high, log_c)
    return found


# --------------------------------------------------------------------------- excite


@dataclass(frozen=True)
class ExciteResult:
    """What ``excite`` added to an image to excite one feature map.

    Attributes:
        x: (N, C, H, W) the perturbed images, normalised.
        perturbation: (N, C, H, W) pixel units, inside the eps-ball.
        before, after: (N,) the feature map's total activation on the clean and perturbed
            images.
        layer, channel, eps: what was asked.
    """

    x: torch.Tensor
    perturbation: torch.Tensor
    before: torch.Tensor
    after: torch.Tensor
    layer: str
    channel: int
    eps: float


def excite(model: nn.Module, x: torch.Tensor, layer: str, channel: int, eps: float = 8 / 255,
           steps: int = 20, *, step_size: float | None = None,
           preprocessing: Preprocessing | None = None) -> ExciteResult:
    """Gradient ascent in the L-inf eps-ball (pixel units) on the total activation of one
    feature map: what pattern, added to this image, excites the map most.

    Args:
        layer: the feature map's layer.
        channel: the feature map.
        eps: ball radius in [0, 1] pixel units.
        steps: sign-gradient steps of ``step_size`` (default eps / 4), each projected back into
            the ball and [0, 1]; the best iterate (highest activation) is returned.
        preprocessing: the model's normalisation, where the model does not carry it.
    """
    eps = _check_eps(eps)
    channel = channel_index(channel)
    positive_int(steps, "steps")
    step_size = eps / 4 if step_size is None else _check_eps(step_size, "step_size")
    resolve_layer(model, layer)
    with _attacking(model):
        x, pixel_model, pixels = _to_pixels(model, x, preprocessing, "excite")
        traced = traced_names(model, tuple(x.shape[-2:]), [layer])
        mean_t, std_t = pixel_model.mean, pixel_model.std

        def total(p: torch.Tensor) -> torch.Tensor:
            output = feature_maps(forward_to(model, (p - mean_t) / std_t, [layer],
                                             traced)[layer], layer)
            check_channels(channel, output.shape[1], layer)
            return output[:, channel].sum(dim=(1, 2))

        with torch.no_grad():
            before = total(pixels)
        best, best_value = pixels.clone(), before.clone()
        current = pixels.clone()
        for _ in range(steps):
            current.requires_grad_(True)
            value = total(current)
            (grad,) = torch.autograd.grad(value.sum(), current)
            with torch.no_grad():
                current = current + step_size * grad.sign()
                current = _into_ball(current, pixels, eps)
                value = total(current)
                improved = value > best_value
                best[improved] = current[improved]
                best_value = torch.where(improved, value, best_value)
        return ExciteResult((best - mean_t) / std_t, best - pixels, before.double(),
                            best_value.double(), layer, channel, eps)


# --------------------------------------------------------------------------- displacement


def layer_displacement(model: nn.Module, clean: torch.Tensor, perturbed: torch.Tensor,
                       layers: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """How far each layer's activations move between clean and perturbed images: per layer
    ``|a(perturbed) - a(clean)| / |a(clean)|`` (L2 over each image's activations), (N,).

    Args:
        clean: (N, C, H, W) normalised images.
        perturbed: (N, C, H, W) the same, changed.
        layers: default every conv and linear layer, in order.
    """
    names = list(layers) if layers is not None else (list_layers(model, "conv")
                                                    + list_layers(model, "linear"))
    order = {name: i for i, name in enumerate(n for n, _ in model.named_modules())}
    names.sort(key=lambda n: order.get(n, 0))
    device = model_device(model)
    with preserved_state(model, eval_mode=True), torch.no_grad():
        with capture(model, names) as a:
            run_forward(model, require_batch(clean).to(device))
        with capture(model, names) as b:
            run_forward(model, require_batch(perturbed).to(device))
    return {name: ((b[name] - a[name]).flatten(1).norm(dim=1)
                   / a[name].flatten(1).norm(dim=1).clamp_min(1e-12)) for name in names}
