"""A health report of a trained CNN: what Zeiler & Fergus (2013, section 4.1) looked for when
they used their visualizations to fix AlexNet.

``doctor(model, data)`` checks, per conv layer:

- **dead** channels, never above 0 at any position of any image of the data, and **always-on**
  channels, above 0 at every position of every image: the rectifier after them never acts,
  so they select nothing (both from one pass, ``units.channel_stats``);
- **near-duplicate filters**: pairs whose flattened weights have a cosine similarity of at
  least ``DUPLICATE_COSINE`` (filters of zero norm are left out: they have no direction);
- **dominant filters**: an RMS above ``DOMINANT_RMS`` times the layer's median, the case ZF
  fixed by renormalising every filter whose RMS exceeds a fixed radius to that radius;
- for the **first layer**, each filter's frequency content: the share of its spectral energy
  at low (below 1/8 cycle per pixel, the mean included), mid (1/8 to 1/4) and high (above
  1/4) spatial frequencies, from its DFT zero-padded to ``SPECTRUM_SIZE``; **flat** filters,
  whose spatial variation (the RMS left after removing each colour's mean) is below
  ``FLAT_VARIATION`` of the layer's median; and **noise** filters, whose power spectrum
  (the k x k DFT without its mean, summed over colours) is as flat as white noise's: a
  spectral flatness (geometric over arithmetic mean) of at least ``NOISE_FLATNESS``;
- **aliasing**, where the first layer is strided: the deconvnet projection of the next conv
  layer's channels (each at its strongest unit over the data) is what ZF's Fig. 6 (d) shows,
  and a stride s leaves a grid of period s in it. The measure is the share of the
  projection's power (without its mean) on the grid's frequencies: every frequency whose
  vertical or horizontal part is m / s cycles per pixel, m = 1 .. s - 1. A flat (white)
  spectrum puts the grid's share of the frequency bins there (``grid_fraction``, 9 % for
  s = 4 on 64 x 64); a smooth projection far less, a grid pattern more. A channel is
  reported where its share is at least ``ALIASING_EXCESS`` times the grid's fraction.

Each finding says what it means and the fix the paper made.

Weights that hold NaN or infinity, and activations that turn NaN or infinite on the data, are
findings of their own, reported first as the cause: the channels they break are left out of
every other finding (a NaN channel is not "dead"), and the first layer whose activations break
names the later ones that follow from it. No NaN reaches the JSON report (``null`` instead).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vizcnn.checks import describe_non_finite, non_finite_weights
from vizcnn.deconv import Deconvnet
from vizcnn.display import ShowsItself
from vizcnn.errors import BadArgument
from vizcnn.hooks import model_device, require_hookable
from vizcnn.io import atomic_path, writable_parent
from vizcnn.layers import list_layers, resolve_layer
from vizcnn.models import model_info
from vizcnn.scan import images_at, open_data
from vizcnn.units import ChannelStats, channel_stats

__all__ = [
    "DOMINANT_RMS",
    "DUPLICATE_COSINE",
    "FLAT_VARIATION",
    "NOISE_FLATNESS",
    "ALIASING_EXCESS",
    "Finding",
    "FilterSpectrum",
    "HealthReport",
    "LayerHealth",
    "aliasing_share",
    "doctor",
    "duplicate_filters",
    "filter_spectrum",
    "grid_mask",
    "health_report",
]

DUPLICATE_COSINE = 0.95
DOMINANT_RMS = 4.0
FLAT_VARIATION = 0.05
NOISE_FLATNESS = 0.6
ALIASING_EXCESS = 1.0
SPECTRUM_SIZE = 32
BANDS = (1 / 8, 1 / 4)  # cycles per pixel: low below the first, high from the second


@dataclass(frozen=True)
class Finding:
    """One problem found: where, which channels, the numbers, what it means, the fix."""

    layer: str
    kind: str
    channels: tuple[int, ...]
    detail: str
    meaning: str
    fix: str

    def sentence(self) -> str:
        return f"{self.layer}: {self.detail}. {self.meaning} Fix: {self.fix}"


@dataclass(frozen=True)
class FilterSpectrum:
    """Frequency content of a first layer's filters.

    Attributes:
        shares: (C, 3) each filter's share of spectral energy at low, mid, high frequency.
        flatness: (C,) spectral flatness of each filter (1: white noise's flat spectrum).
        variation: (C,) RMS of each filter after removing each colour's mean.
        flat: filters whose variation is below ``FLAT_VARIATION`` of the median.
        noise: filters whose flatness is at least ``NOISE_FLATNESS`` (flat ones left out).
    """

    shares: torch.Tensor
    flatness: torch.Tensor
    variation: torch.Tensor
    flat: tuple[int, ...]
    noise: tuple[int, ...]

    @property
    def mean_shares(self) -> tuple[float, float, float]:
        """(low, mid, high) over the filters that are not flat."""
        kept = [c for c in range(len(self.shares)) if c not in self.flat]
        mean = self.shares[kept].mean(dim=0) if kept else self.shares.new_zeros(3)
        return tuple(float(v) for v in mean)  # type: ignore[return-value]

    @property
    def dominant_band(self) -> torch.Tensor:
        """(C,) long: 0, 1 or 2 for the band holding most of each filter's energy."""
        return self.shares.argmax(dim=1)


@dataclass(frozen=True)
class LayerHealth:
    """The numbers of one layer.

    Attributes:
        name: the layer.
        fire_rate: (C,) fraction of images where the channel is above 0 somewhere.
        dead, always_on: channels never above 0 / above 0 at every unit of every image.
        duplicates: (i, j, cosine) for each near-duplicate pair of filters, i < j.
        filter_rms: (C,) the RMS of each filter's weights; empty for a layer without filters.
        dominant: filters whose RMS is above ``DOMINANT_RMS`` times the median.
        spectrum: for the model's first layer, its filters' frequency content.
        aliasing: (C,) for the conv layer after a strided first layer, each channel's share
            of projection power on the stride's grid; None elsewhere.
        stride: the first layer's stride where ``aliasing`` is measured.
        grid_fraction: the share of the DFT bins on that stride's grid (what a flat
            spectrum puts there).
        non_finite: (C,) long, on how many images each channel's activations hold a NaN or
            an infinity.
        broken_weights: ``(tensor, NaN count, inf count, size)`` of the layer's own
            parameters and buffers that hold NaN or infinity; the filter measures (duplicates,
            RMS, dominance, spectrum) are left out where there are any.
        sanity: the deconvnet's sanity line (``vizcnn.sanity``): how alike the projections
            of the layer's strongest units stay once every weight is random (mean rank
            correlation, ``sanity.LINE_METRIC``); None where not measured.
    """

    name: str
    fire_rate: torch.Tensor
    dead: tuple[int, ...]
    always_on: tuple[int, ...]
    duplicates: tuple[tuple[int, int, float], ...]
    filter_rms: torch.Tensor
    dominant: tuple[int, ...]
    spectrum: FilterSpectrum | None = None
    aliasing: torch.Tensor | None = None
    stride: int | None = None
    grid_fraction: float | None = None
    non_finite: torch.Tensor | None = None
    broken_weights: tuple[tuple[str, int, int, int], ...] = ()
    sanity: float | None = None

    @property
    def sanity_word(self) -> str | None:
        """"depends on the weights" or "mostly image recovery" (see ``vizcnn.sanity``)."""
        from vizcnn.sanity import verdict

        return None if self.sanity is None else verdict(self.sanity)

    @property
    def broken(self) -> tuple[int, ...]:
        """Channels whose activations are NaN or infinite on some image."""
        return () if self.non_finite is None else _indices(self.non_finite > 0)

    @property
    def aliased(self) -> tuple[int, ...]:
        """Channels whose grid share is at least ``ALIASING_EXCESS`` x ``grid_fraction``."""
        if self.aliasing is None:
            return ()
        limit = ALIASING_EXCESS * self.grid_fraction
        return tuple(int(c) for c in torch.nonzero(self.aliasing >= limit).flatten())

    @property
    def channels(self) -> int:
        return len(self.fire_rate)


@dataclass(frozen=True)
class HealthReport(ShowsItself):
    """What ``doctor`` found: the numbers per layer and the findings, worst first."""

    model: str
    data: str
    images: int
    layers: tuple[LayerHealth, ...]
    findings: tuple[Finding, ...]
    skipped: int = 0

    def layer(self, name: str) -> LayerHealth:
        for health in self.layers:
            if health.name == name:
                return health
        raise BadArgument(f"the report has no layer {name!r}",
                          f"its layers: {', '.join(h.name for h in self.layers)}")

    def text(self) -> str:
        """The summary the CLI prints: a table per layer, then one paragraph per finding."""
        left_out = f", {self.skipped:,} unreadable" if self.skipped else ""
        lines = [f"health report of {self.model} over {self.data} ({self.images:,} images"
                 f"{left_out})", "",
                 f"{'layer':<16} {'channels':>8} {'dead':>5} {'always on':>9} "
                 f"{'duplicates':>10} {'dominant':>8}  notes"]
        for h in self.layers:
            notes = []
            if h.spectrum is not None:
                low, mid, high = h.spectrum.mean_shares
                notes.append(f"energy low/mid/high {low:.0%}/{mid:.0%}/{high:.0%}, "
                             f"{len(h.spectrum.flat)} flat, {len(h.spectrum.noise)} noise")
            if h.aliasing is not None:
                notes.append(f"stride-{h.stride} grid {float(h.aliasing.mean()):.1%} of "
                             f"projection power (flat spectrum {h.grid_fraction:.1%})")
            if h.sanity is not None:
                notes.append(f"projections {h.sanity:.2f} alike once random: {h.sanity_word}")
            if h.broken_weights:
                notes.append("NaN/inf weights")
            if h.broken:
                notes.append(f"NaN/inf activations in {len(h.broken)} channels")
            lines.append(f"{h.name:<16} {h.channels:>8} {len(h.dead):>5} {len(h.always_on):>9} "
                         f"{len(h.duplicates):>10} {len(h.dominant):>8}  {'; '.join(notes)}")
        lines.append("")
        if not self.findings:
            lines.append("no problem found")
        for finding in self.findings:
            lines.append(f"- {finding.sentence()}")
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict[str, Any]:
        """Plain numbers and lists, for JSON."""
        def layer(h: LayerHealth) -> dict[str, Any]:
            entry: dict[str, Any] = {
                "name": h.name, "channels": h.channels, "fire_rate": _floats(h.fire_rate),
                "dead": list(h.dead), "always_on": list(h.always_on),
                "duplicates": [list(pair) for pair in h.duplicates],
                "filter_rms": _floats(h.filter_rms), "dominant": list(h.dominant),
                "non_finite_images": [] if h.non_finite is None else h.non_finite.tolist(),
                "non_finite_weights": [{"tensor": name, "nan": nan, "inf": inf, "size": size}
                                       for name, nan, inf, size in h.broken_weights]}
            if h.spectrum is not None:
                entry["spectrum"] = {
                    "bands_cycles_per_pixel": list(BANDS),
                    "shares_low_mid_high": [_floats(row) for row in h.spectrum.shares],
                    "mean_shares_low_mid_high": list(h.spectrum.mean_shares),
                    "flatness": _floats(h.spectrum.flatness), "flat": list(h.spectrum.flat),
                    "noise": list(h.spectrum.noise)}
            if h.aliasing is not None:
                entry["aliasing"] = {"stride": h.stride, "share": _floats(h.aliasing),
                                     "mean": float(h.aliasing.mean()),
                                     "grid_fraction": h.grid_fraction,
                                     "aliased": list(h.aliased)}
            if h.sanity is not None:
                entry["sanity"] = _sanity_entry(h.sanity)
            return entry

        return {"model": self.model, "data": self.data, "images": self.images,
                "skipped": self.skipped,
                "layers": [layer(h) for h in self.layers],
                "findings": [{"layer": f.layer, "kind": f.kind, "channels": list(f.channels),
                              "detail": f.detail, "meaning": f.meaning, "fix": f.fix}
                             for f in self.findings]}

    def to_json(self) -> str:
        """The report as JSON; valid JSON always (a number that is not finite is null)."""
        return json.dumps(self.to_dict(), indent=1, allow_nan=False)

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``health.json`` and ``health.txt`` into ``folder`` (whole or not at all)."""
        folder = Path(folder)
        writable_parent(folder)
        with atomic_path(folder) as staging:
            staging.mkdir()
            (staging / "health.json").write_text(self.to_json())
            (staging / "health.txt").write_text(self.text())
        return folder


def _sanity_entry(similarity: float) -> dict[str, Any]:
    from vizcnn.sanity import IMAGE_RECOVERY, LINE_METRIC, verdict

    return {"similarity": None if math.isnan(similarity) else similarity,
            "verdict": verdict(similarity), "metric": LINE_METRIC, "threshold": IMAGE_RECOVERY,
            "compared_with": "the same units' projections with every weight random"}


def _floats(values: torch.Tensor) -> list[float | None]:
    """Plain numbers for JSON: None (null) where a value is NaN or infinite."""
    return [round(float(v), 6) if math.isfinite(float(v)) else None for v in values]


# --------------------------------------------------------------------------- the measures


def duplicate_filters(weight: torch.Tensor, threshold: float = DUPLICATE_COSINE
                      ) -> tuple[tuple[int, int, float], ...]:
    """Pairs (i, j, cosine), i < j, of filters ``weight`` (C, ...) whose flattened weights
    have a cosine similarity of at least ``threshold``; zero filters are left out."""
    flat = weight.detach().flatten(1).double()
    norms = flat.norm(dim=1)
    kept = torch.nonzero(norms > 0).flatten()
    unit = flat[kept] / norms[kept, None]
    cosine = unit @ unit.T
    i, j = torch.triu_indices(len(kept), len(kept), offset=1, device=cosine.device)
    close = cosine[i, j] >= threshold
    return tuple((int(kept[a]), int(kept[b]), round(float(cosine[a, b]), 6))
                 for a, b in zip(i[close], j[close], strict=True))


def _radial_frequency(size: int, device) -> torch.Tensor:
    """(size, size) cycles per pixel of each bin of a size x size DFT."""
    f = torch.fft.fftfreq(size, device=device, dtype=torch.float64)
    return (f[:, None] ** 2 + f[None, :] ** 2).sqrt()


def filter_spectrum(weight: torch.Tensor) -> FilterSpectrum:
    """Frequency content of first-layer filters ``weight`` (C, C_in, k, k)."""
    w = weight.detach().double()
    power = torch.fft.fft2(w, s=(SPECTRUM_SIZE, SPECTRUM_SIZE)).abs().square().sum(dim=1)
    radius = _radial_frequency(SPECTRUM_SIZE, w.device)
    bands = [radius < BANDS[0], (radius >= BANDS[0]) & (radius < BANDS[1]), radius >= BANDS[1]]
    total = power.sum(dim=(1, 2))
    shares = torch.stack([(power * band).sum(dim=(1, 2)) for band in bands], dim=1)
    shares = shares / total.clamp_min(1e-300)[:, None]
    variation = (w - w.mean(dim=(2, 3), keepdim=True)).square().mean(dim=(1, 2, 3)).sqrt()
    own = torch.fft.fft2(w).abs().square().sum(dim=1).flatten(1)[:, 1:]  # without the mean
    flatness = own.clamp_min(1e-300).log().mean(dim=1).exp() / own.mean(dim=1).clamp_min(1e-300)
    median = float(variation.median())
    flat = tuple(int(c) for c in torch.nonzero(variation < FLAT_VARIATION * median).flatten())
    noise = tuple(int(c) for c in torch.nonzero(flatness >= NOISE_FLATNESS).flatten()
                  if int(c) not in flat)
    return FilterSpectrum(shares.float(), flatness.float(), variation.float(), flat, noise)


def grid_mask(height: int, width: int, stride: int, device=None) -> torch.Tensor:
    """(height, width) bool: the DFT bins whose vertical or horizontal frequency is m / stride
    cycles per pixel, m = 1 .. stride - 1 (height and width multiples of ``stride``)."""
    rows = torch.zeros(height, dtype=torch.bool, device=device)
    cols = torch.zeros(width, dtype=torch.bool, device=device)
    rows[height // stride::height // stride] = True
    cols[width // stride::width // stride] = True
    return rows[:, None] | cols[None, :]


def aliasing_share(projections: torch.Tensor, stride: int) -> torch.Tensor:
    """(P,) the share of each projection's power (P, C, H, W), its mean left out, on the
    grid of period ``stride`` (see ``grid_mask``). The maps are cut to multiples of the
    stride from the top left."""
    height = projections.shape[-2] // stride * stride
    width = projections.shape[-1] // stride * stride
    x = projections[..., :height, :width].double()
    power = torch.fft.fft2(x - x.mean(dim=(-2, -1), keepdim=True)).abs().square().sum(dim=1)
    grid = grid_mask(height, width, stride, x.device)
    total = power.sum(dim=(1, 2))
    return ((power * grid).sum(dim=(1, 2)) / total.clamp_min(1e-300)).float()


# --------------------------------------------------------------------------- doctor


def doctor(model: nn.Module, data: Any, layers: Sequence[str] | None = None, *,
           batch_size: int = 64, progress: bool = True, sanity: bool = True) -> HealthReport:
    """Check a trained network on ``data`` (anything ``scan_topk`` takes).

    Args:
        model: the network (left as it was).
        data: the images its activations are measured on.
        layers: the layers checked (default: every conv layer). The first-layer spectrum is
            measured where the model's first conv layer is among them, the aliasing where the
            conv layer after a strided first layer is.
        batch_size: images per forward pass.
        progress: show a tqdm bar over the data.
        sanity: give each layer its sanity line (``LayerHealth.sanity``): two deconvnet
            projections of its ``sanity.LINE_CHANNELS`` strongest units, with the trained
            weights and with every weight random.

    Returns:
        HealthReport.
    """
    require_hookable(model)  # a TorchScript model: say so, not "no conv layer"
    names = list(layers) if layers else list_layers(model, "conv")
    if not names:
        raise BadArgument("the model has no conv layer (nn.Conv2d) to check",
                          "name the layers to check (--layer)")
    for name in names:
        resolve_layer(model, name)
    opened = open_data(data)
    stats = channel_stats(model, opened, names, batch_size=batch_size, progress=progress)
    return health_report(model, opened, names, stats, str(data) if isinstance(
        data, (str, os.PathLike)) else type(data).__name__, sanity=sanity)


def health_report(model: nn.Module, data: Any, names: Sequence[str],
                  stats: dict[str, ChannelStats], source: str | None = None, *,
                  sanity: bool | Mapping[str, float] = True) -> HealthReport:
    """The report of ``doctor`` from statistics gathered already (``channel_stats`` of
    ``names`` over ``data``), e.g. by the gallery; ``sanity``: True (measure each layer's
    line), False, or the lines measured already ({layer: similarity})."""
    convs = list_layers(model, "conv")
    first = convs[0] if convs else None
    stride = _stride(resolve_layer(model, first)) if first else 1
    after = convs[1] if stride > 1 and len(convs) > 1 else None
    healths = []
    for name in names:
        # the projections of a layer whose activations break are NaN: nothing to measure
        measured = name == after and not bool(stats[name].non_finite.any())
        aliasing, fraction = _aliasing(model, data, name, stats[name], stride) \
            if measured else (None, None)
        health = _layer_health(model, name, stats[name], name == first, aliasing,
                               stride if measured else None, fraction)
        similarity = (sanity.get(name) if isinstance(sanity, Mapping) else
                      _sanity_line(model, data, name, stats[name]) if sanity else None)
        healths.append(replace(health, sanity=similarity))
    findings = (*_non_finite_findings(model, healths),
                *(f for h in healths for f in _findings(h)))
    info = model_info(model)
    some = next(iter(stats.values()))
    return HealthReport(info.spec or type(model).__name__, source or type(data).__name__,
                        len(some.indices), tuple(healths), findings, len(some.skipped))


def _sanity_line(model: nn.Module, data: Any, name: str, stats: ChannelStats) -> float | None:
    """The layer's sanity line (``vizcnn.sanity.line_similarity``), None where it has no
    weights, no unit fires or its activations break."""
    from vizcnn.sanity import line_similarity, line_units

    if bool(stats.non_finite.any()):
        return None
    values, rows = stats.strongest()
    channels, indices = line_units(values, stats.indices[rows])
    return line_similarity(model, data, name, channels, indices)


def _stride(module: nn.Module) -> int:
    stride = getattr(module, "stride", 1)
    return max(stride) if isinstance(stride, tuple) else int(stride)


def _layer_health(model: nn.Module, name: str, stats: ChannelStats, first: bool,
                  aliasing: torch.Tensor | None, stride: int | None,
                  grid_fraction: float | None) -> LayerHealth:
    module = resolve_layer(model, name)
    weight = getattr(module, "weight", None)
    channels = stats.maxima.shape[1]
    broken_weights = tuple((f"{name}.{tensor}", *counts)
                           for tensor, *counts in non_finite_weights(module))
    has_filters = isinstance(weight, torch.Tensor) and weight.dim() >= 2 \
        and weight.shape[0] == channels and not broken_weights
    duplicates, rms, dominant, spectrum = (), stats.maxima.new_zeros(0), (), None
    if has_filters:
        duplicates = duplicate_filters(weight)
        rms = weight.detach().flatten(1).square().mean(dim=1).sqrt()
        median = float(rms.median())
        dominant = tuple(int(c) for c in torch.nonzero(rms > DOMINANT_RMS * median).flatten())
        if first and weight.dim() == 4:
            spectrum = filter_spectrum(weight)
    intact = stats.non_finite == 0
    return LayerHealth(name, stats.fire_rate, _indices(stats.dead),
                       _indices(stats.always_on & intact), duplicates, rms, dominant, spectrum,
                       aliasing, stride, grid_fraction, stats.non_finite, broken_weights)


def _indices(mask: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(c) for c in torch.nonzero(mask).flatten())


def _aliasing(model: nn.Module, data: Any, name: str, stats: ChannelStats, stride: int
              ) -> tuple[torch.Tensor, float]:
    """(C,) the grid share of each channel's projection at its strongest unit over the data
    (channels that never fire: 0), and the grid's share of the frequency bins."""
    values, rows = stats.strongest()  # (C,) and the row of each channel's best image
    live = torch.nonzero(values > 0).flatten()
    shares = torch.zeros(len(values))
    if not len(live):
        return shares, 0.0
    images = images_at(model, data, stats.indices[rows[live]].tolist())
    projections = Deconvnet(model).project_many(images.to(model_device(model)), name,
                                                live.tolist())
    shares[live] = aliasing_share(projections, stride).cpu()
    height, width = (side // stride * stride for side in images.shape[-2:])
    return shares, float(grid_mask(height, width, stride).float().mean())


def _count(items: Sequence[Any], noun: str, verb: str = "") -> str:
    """'1 channel is', '3 channels are' (verb "is"), '2 filters have' (verb "has")."""
    one = len(items) == 1
    verb = verb if one else {"is": "are", "has": "have"}.get(verb, verb)
    return f"{len(items)} {noun}{'' if one else 's'} {verb}".rstrip()


def _listed(channels: Sequence[int], limit: int = 12) -> str:
    shown = ", ".join(map(str, channels[:limit]))
    return shown + (f" and {len(channels) - limit} more" if len(channels) > limit else "")


# what each kind of finding means, and the fix Zeiler & Fergus made (or the usual one)
_ADVICE = {
    "non-finite weights": ("Every activation computed from them is NaN or infinite, so the "
                           "numbers of this layer and of those after it are consequences, "
                           "not findings.",
                           "go back to a checkpoint from before the training diverged; lower "
                           "the learning rate or clip the gradients"),
    "non-finite activations": ("The forward pass breaks here (an overflow, or NaN weights "
                               "before it): these channels' statistics say nothing, and they "
                               "are left out of every other finding.",
                               "look for weights that are NaN, infinite or huge at or before "
                               "this layer (see above), or inputs far outside the "
                               "normalisation the model was trained with"),
    "dead": ("They pass nothing to the next layer, so their filters are wasted capacity.",
             "reinitialise them or lower the learning rate; ZF renormalised every filter whose "
             "RMS exceeded a fixed radius to that radius, so that none dominates"),
    "always-on": ("The rectifier after them never acts, so they are linear and select "
                  "nothing; often a bias grown too large.",
                  "check their biases and reinitialise them"),
    "duplicates": ("Each pair detects the same pattern twice: redundant capacity.",
                   "prune one of each pair, or reinitialise it and train on"),
    "dominant": ("A few large filters dominate the layer's output.",
                 "renormalise every filter whose RMS exceeds a fixed radius to that radius, as "
                 "ZF did (section 3)"),
    "aliasing": ("Their features show the grid of a too-large first-layer stride, ZF's "
                 "aliasing artifacts (Fig. 6 d).",
                 "a smaller first-layer stride (ZF went from 4 to 2)"),
    "flat filters": ("They see colour at best and no structure: ZF's 'dead' first-layer "
                     "filters.",
                     "smaller first-layer filters (ZF went from 11x11 to 7x7) and "
                     "renormalising filters whose RMS exceeds a fixed radius"),
    "noise filters": ("They have not learned a pattern: untrained, or too large for what the "
                      "data teaches.",
                      "train longer, or use smaller first-layer filters (ZF: 7x7 instead of "
                      "11x11)"),
    "high frequency": ("ZF found AlexNet's first layer a mix of extremely high and low "
                       "frequencies with little in between.",
                       "smaller first-layer filters and a smaller stride (ZF: 11x11/4 to "
                       "7x7/2)"),
}


def _non_finite_findings(model: nn.Module, healths: list[LayerHealth]) -> list[Finding]:
    """The cause first: each module whose weights hold NaN or infinity (checked or not), and
    the first checked layer whose activations turn NaN or infinite, naming the later ones."""
    by_module: dict[str, list[tuple[str, int, int, int]]] = {}
    for tensor, *counts in non_finite_weights(model):
        by_module.setdefault(tensor.rpartition(".")[0] or "(model)", []).append(
            (tensor, *counts))
    findings = [Finding(module, "non-finite weights", (), describe_non_finite(found),
                        *_ADVICE["non-finite weights"]) for module, found in by_module.items()]
    broken = [h for h in healths if h.broken]
    if broken:
        first, images = broken[0], int(broken[0].non_finite.max())
        later = [h.name for h in broken[1:]]
        findings.append(Finding(
            first.name, "non-finite activations", first.broken,
            f"{len(first.broken)} of {first.channels} channels "
            f"{'gives' if len(first.broken) == 1 else 'give'} NaN or infinite activations "
            f"(on up to {images:,} images): {_listed(first.broken)}"
            + (f"; so do later layers, from it: {', '.join(later)}" if later else ""),
            *_ADVICE["non-finite activations"]))
    return findings


def _findings(h: LayerHealth) -> list[Finding]:
    """Every finding of one layer, in ``_ADVICE``'s words; a kind with no channel is left
    out."""
    details: list[tuple[str, tuple[int, ...], str]] = [
        ("dead", h.dead, f"{len(h.dead)} of {_count(range(h.channels), 'channel')} "
         f"{'is' if len(h.dead) == 1 else 'are'} dead (never above 0 on the data): "
         f"{_listed(h.dead)}"),
        ("always-on", h.always_on, f"{_count(h.always_on, 'channel', 'is')} always on (above 0 "
         f"at every position of every image): {_listed(h.always_on)}"),
        ("duplicates", tuple(sorted({c for i, j, _ in h.duplicates for c in (i, j)})),
         f"{_count(h.duplicates, 'pair')} of near-duplicate filters (cosine >= "
         f"{DUPLICATE_COSINE}): {_listed([f'{i}~{j} ({c:.3f})' for i, j, c in h.duplicates], 8)}"),
        ("dominant", h.dominant, f"{_count(h.dominant, 'filter', 'has')} an RMS above "
         f"{DOMINANT_RMS:g}x the layer's median: {_listed(h.dominant)}")]
    if h.spectrum is not None:
        details += _spectrum_details(h.spectrum)
    if h.aliased:
        details.append(("aliasing", h.aliased, f"{len(h.aliased)} of {h.channels} channels put "
                        f"more of their projection's power on the grid of the first layer's "
                        f"stride {h.stride} than a flat spectrum would ({h.grid_fraction:.1%}; "
                        f"the layer's mean {float(h.aliasing.mean()):.1%}): "
                        f"{_listed(h.aliased)}"))
    return [Finding(h.name, kind, channels, detail, *_ADVICE[kind])
            for kind, channels, detail in details if channels]


def _spectrum_details(spectrum: FilterSpectrum) -> list[tuple[str, tuple[int, ...], str]]:
    """(kind, filters, detail) of the first layer's frequency findings."""
    band = spectrum.dominant_band
    high = tuple(int(c) for c in torch.nonzero(band == 2).flatten()
                 if int(c) not in spectrum.flat)
    mid = int((band == 1).sum())
    low_, mid_, high_ = spectrum.mean_shares
    return [
        ("flat filters", spectrum.flat, f"{_count(spectrum.flat, 'first-layer filter', 'is')} "
         f"nearly flat (spatial variation below {FLAT_VARIATION:.0%} of the median): "
         f"{_listed(spectrum.flat)}"),
        ("noise filters", spectrum.noise, f"{_count(spectrum.noise, 'first-layer filter', 'is')}"
         f" nearly pure noise (spectral flatness >= {NOISE_FLATNESS}): "
         f"{_listed(spectrum.noise)}"),
        ("high frequency", high if len(high) > mid else (),
         f"{len(high)} first-layer filters hold most of their energy above {BANDS[1]:g} cycle "
         f"per pixel, more than the {mid} at mid frequencies (energy low/mid/high "
         f"{low_:.0%}/{mid_:.0%}/{high_:.0%})")]
