"""Results that show themselves in Jupyter.

A class that inherits ``ShowsItself`` is displayed by IPython as the picture or table that
``vizcnn.render.notebook`` draws for it (a ``TopK`` as a table per layer, ``OcclusionMaps``
as their maps). The drawing lives in ``render/``, the only place that turns tensors into
pictures, and is imported on first display, so the core stays free of matplotlib."""

from __future__ import annotations

__all__ = [
    "ShowsItself",
]


class ShowsItself:
    """Mixin: ``_repr_png_`` and ``_repr_html_`` for IPython's display formatter. Each returns
    None where ``render.notebook`` draws no such form for the class (IPython then skips it)."""

    __slots__ = ()

    def _repr_png_(self) -> bytes | None:
        from vizcnn.render.notebook import png_of

        return png_of(self)

    def _repr_html_(self) -> str | None:
        from vizcnn.render.notebook import html_of

        return html_of(self)
