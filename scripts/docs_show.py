"""For the documentation's executed examples: put a figure an example saved into the page."""

from __future__ import annotations

import base64
from pathlib import Path

_TYPES = {".png": "image/png", ".svg": "image/svg+xml"}


def figure_markdown(path: str, alt: str = "") -> str:
    """A Markdown image of the PNG or SVG at ``path``, inlined as a data URI; an example
    prints it (markdown-exec captures the example's own ``print``) to put it in the page."""
    path = Path(path)
    data = base64.b64encode(path.read_bytes()).decode()
    return f"![{alt or path.stem}](data:{_TYPES[path.suffix]};base64,{data})"
