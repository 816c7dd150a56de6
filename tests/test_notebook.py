"""Results show themselves in Jupyter: through IPython's own display formatter, a Panel is
its figure, a TopK or a HealthReport a table of its numbers, OcclusionMaps their maps; no
pyplot state is touched. The tutorial notebook is stored without outputs (the docs build
executes it: tests/test_docs.py)."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from IPython.core.formatters import DisplayFormatter
from PIL import Image

import vizcnn
from vizcnn.render import panels

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def shown():
    """Display a result as a notebook cell does; checks that pyplot was not touched."""
    import matplotlib.pyplot as plt

    backend, figures = matplotlib.get_backend(), plt.get_fignums()
    formatter = DisplayFormatter()

    def show(result) -> dict:
        data, _ = formatter.format(result)
        assert plt.get_fignums() == figures and matplotlib.get_backend() == backend
        return data

    return show


def _png(data: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data["image/png"])))


def _cells(html: str) -> list[list[str]]:
    rows = re.findall(r"<tr>(.*?)</tr>", html)
    return [re.findall(r"<t[dh]>(.*?)</t[dh]>", row) for row in rows]


def test_a_panel_shows_its_figure(demo, shown):
    panel = panels.filters_panel(demo)
    picture = _png(shown(panel))
    width, height = panel.figure.get_size_inches() * 80  # the notebook's dpi
    assert picture.shape[:2] == (round(height), round(width))
    assert picture.std() > 10  # a drawing, not a blank canvas


def test_a_topk_shows_a_table_of_its_numbers(demo, shown):
    top = vizcnn.scan_topk(demo, "shapes:40", ["features.3", "features.6"], k=3,
                           progress=False)
    data = shown(top)
    assert "image/png" not in data
    header, *rows = _cells(data["text/html"])
    assert header[0] == "layer" and [row[0] for row in rows] == ["features.3", "features.6"]
    for row in rows:
        values = top.values[row[0]][:, 0]  # each channel's strongest unit, by hand
        assert int(row[1]) == len(values)
        assert float(row[2]) == pytest.approx(float(values.max()), rel=1e-3)
        assert int(row[3]) == int(values.argmax())
    assert "40 images" in data["text/html"]


def test_a_health_report_shows_its_table_and_findings(demo, shown):
    report = vizcnn.doctor(demo, "shapes:40", progress=False)
    html = shown(report)["text/html"]
    header, *rows = _cells(html)
    assert header[:3] == ["layer", "channels", "dead"]
    for row, layer in zip(rows, report.layers, strict=True):
        assert row[0] == layer.name and int(row[2]) == len(layer.dead)
        assert row[6] == f"{layer.sanity:.2f}: {layer.sanity_word}"
    for finding in report.findings:
        assert finding.sentence().split()[0] in html


def test_occlusion_maps_show_a_map_per_image(demo, shown):
    x = vizcnn.preprocess(demo, vizcnn.held_out_image(0))
    maps = vizcnn.occlusion(demo, x, window=16, stride=16, layer="features.11",
                            progress=False)
    picture = _png(shown(maps))
    assert picture.ndim == 3 and picture.std() > 10


def test_a_sanity_check_shows_its_figure(demo, shown):
    check = vizcnn.sanity_check(demo, "shapes:20", "features.3", "deconv", channels=[1],
                                images=1, baseline_models=1, progress=False)
    picture = _png(shown(check))
    width, height = vizcnn.render.sanity_figure(check).get_size_inches() * 80
    assert picture.shape[:2] == (round(height), round(width)) and picture.std() > 10


def test_a_result_without_a_picture_shows_no_png(demo, shown):
    x = vizcnn.preprocess(demo, vizcnn.held_out_image(1))
    data = shown(vizcnn.fgsm(demo, x, 2 / 255))
    assert "image/png" not in data and "<table>" in data["text/html"]


def test_the_tutorial_is_stored_without_outputs():
    notebook = json.loads((ROOT / "docs" / "tutorial.ipynb").read_text())
    code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert code and all(not cell["outputs"] and cell["execution_count"] is None
                        for cell in code)
