"""What Jupyter shows for each vizcnn result: a picture (PNG bytes) or a compact HTML table.

``png_of`` and ``html_of`` dispatch on the result's type; ``vizcnn.display.ShowsItself``
calls them from ``_repr_png_`` and ``_repr_html_``. Figures are drawn on matplotlib
``Figure`` objects, never through pyplot, so displaying a result changes no pyplot state (no
figure is opened, no backend chosen)."""

from __future__ import annotations

import html
import io
from collections.abc import Callable, Sequence
from typing import Any

from matplotlib.figure import Figure

from vizcnn.doctor import HealthReport
from vizcnn.evolution import FeatureEvolution
from vizcnn.featvis import FeatureVisualization
from vizcnn.probes.adversarial import AdversarialResult
from vizcnn.probes.invariance import InvarianceResult
from vizcnn.probes.occlusion import OcclusionMaps
from vizcnn.render import figures
from vizcnn.render.panels import Panel
from vizcnn.sanity import SanityCheck
from vizcnn.scan import TopK
from vizcnn.units import ChannelStats

__all__ = [
    "figure_png",
    "html_of",
    "png_of",
    "table_html",
]

NOTEBOOK_DPI = 80  # a figure's size in a notebook cell, not a print's


def figure_png(fig: Figure, dpi: int = NOTEBOOK_DPI) -> bytes:
    """The figure as PNG bytes (the figure itself is not changed or closed)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def table_html(caption: str, header: Sequence[str], rows: Sequence[Sequence[Any]],
               footer: Sequence[str] = ()) -> str:
    """A small HTML table, every cell escaped; ``footer`` lines follow it as a list."""
    cells = lambda row, tag: "".join(f"<{tag}>{html.escape(str(c))}</{tag}>" for c in row)
    body = "".join(f"<tr>{cells(row, 'td')}</tr>" for row in rows)
    notes = ("<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in footer) + "</ul>"
             if footer else "")
    return (f"<table><caption style='text-align:left'>{html.escape(caption)}</caption>"
            f"<thead><tr>{cells(header, 'th')}</tr></thead><tbody>{body}</tbody></table>"
            + notes)


def png_of(result: Any) -> bytes | None:
    """The picture Jupyter shows for ``result``, or None where it shows a table instead."""
    draw = _PICTURES.get(type(result))
    return figure_png(draw(result)) if draw else None


def html_of(result: Any) -> str | None:
    """The table Jupyter shows for ``result``, or None where it shows a picture instead."""
    draw = _TABLES.get(type(result))
    return draw(result) if draw else None


def _topk_table(top: Any) -> str:
    rows = []
    for layer in top.layers:
        values, indices = top.values[layer], top.indices[layer]
        best = int(values[:, 0].argmax())
        rows.append((layer, values.shape[0], f"{float(values[best, 0]):.4g}", best,
                     int((indices >= 0).sum(1).min())))
    skipped = f", {len(top.skipped)} left out" if top.skipped else ""
    source = top.source or "the data"
    return table_html(f"TopK: the {top.k} strongest images per channel of {source} "
                      f"({top.images:,} images{skipped})",
                      ("layer", "channels", "strongest unit", "its channel", "images kept"),
                      rows)


def _health_table(report: Any) -> str:
    rows = [(h.name, h.channels, len(h.dead), len(h.always_on), len(h.duplicates),
             len(h.dominant), "" if h.sanity is None else f"{h.sanity:.2f}: {h.sanity_word}")
            for h in report.layers]
    findings = [finding.sentence() for finding in report.findings] or ["no problem found"]
    return table_html(f"HealthReport of {report.model} over {report.data} "
                      f"({report.images:,} images)",
                      ("layer", "channels", "dead", "always on", "duplicates", "dominant",
                       "projections alike once random"), rows, findings)


def _adversarial_table(result: Any) -> str:
    rows = [(n, int(result.clean_label[n]), f"{float(result.clean_prob[n]):.3f}",
             int(result.label[n]), f"{float(result.prob[n]):.3f}", bool(result.success[n]),
             f"{float(result.rms[n]) * 255:.2f}", f"{float(result.linf[n]) * 255:.2f}")
            for n in range(len(result.x))]
    eps = "" if result.eps is None else f", eps {result.eps * 255:.3g} grey levels"
    return table_html(f"AdversarialResult ({result.method}{eps})",
                      ("image", "clean label", "p", "label", "p", "success",
                       "RMS (grey levels)", "L-inf (grey levels)"), rows)


def _stats_table(stats: Any) -> str:
    fire, dead, strongest = stats.fire_rate, stats.dead, stats.strongest()[0]
    rows = [(c, f"{float(strongest[c]):.4g}", f"{float(fire[c]):.1%}", bool(dead[c]))
            for c in range(min(stats.maxima.shape[1], 16))]
    more = stats.maxima.shape[1] - len(rows)
    return table_html(f"ChannelStats of {stats.layer} over {stats.maxima.shape[0]:,} images "
                      f"({int(stats.dead.sum())} dead channels)",
                      ("channel", "strongest", "fires on", "dead"), rows,
                      [f"... and {more} more channels"] if more > 0 else [])


def _occlusion_picture(maps: Any) -> Figure:
    """Per image, the map of the target class's probability (and of the feature map's
    activation where a layer was given), over the occluder's positions."""
    kinds = [("prob", "P(target class)")] + (
        [("activation", f"{maps.layer} activation")] if maps.activation is not None else [])
    count = len(maps.prob)
    fig = Figure(figsize=(2.4 * len(kinds), 2.3 * count), layout="constrained")
    axes = fig.subplots(count, len(kinds), squeeze=False)
    for n in range(count):
        for ax, (name, title) in zip(axes[n], kinds, strict=True):
            image = ax.imshow(getattr(maps, name)[n].detach().cpu().numpy(), cmap="viridis")
            fig.colorbar(image, ax=ax, shrink=0.8)
            ax.set_title(f"image {n}: {title}", fontsize=8)
            ax.set_axis_off()
    return fig


_PICTURES: dict[type, Callable[[Any], Figure]] = {
    Panel: lambda panel: panel.figure,
    OcclusionMaps: _occlusion_picture,
    FeatureVisualization: figures.feature_visualization_figure,
    FeatureEvolution: figures.evolution_figure,
    InvarianceResult: lambda result: figures.invariance_figure({result.transform: [result]}),
    SanityCheck: figures.sanity_figure,
}
_TABLES: dict[type, Callable[[Any], str]] = {
    TopK: _topk_table,
    HealthReport: _health_table,
    AdversarialResult: _adversarial_table,
    ChannelStats: _stats_table,
}
