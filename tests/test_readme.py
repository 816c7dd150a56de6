"""The README is the front door: every Python snippet runs as written from a fresh clone,
imports only from ``vizcnn`` and ``vizcnn.render`` (besides torch and the standard library),
and every link points into the repository."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
SNIPPETS = re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)
ALLOWED = {"vizcnn", "vizcnn.render", "torch", "numpy"}


def test_there_are_snippets():
    assert len(SNIPPETS) >= 4


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_snippet_imports_only_the_public_surface(index):
    for node in ast.walk(ast.parse(SNIPPETS[index])):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module]
        else:
            continue
        for name in names:
            assert name in ALLOWED or name.startswith("torch."), name


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_snippet_runs_as_written(index, tmp_path):
    (tmp_path / "gallery").symlink_to(ROOT / "gallery")  # the snippets read gallery/ images
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, "-c", SNIPPETS[index]], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def test_links_stay_inside_the_repository():
    targets = re.findall(r"\]\(([^)]+)\)", README)
    assert targets
    for target in targets:
        assert not target.startswith(("http:", "https:", "/", "..")), target
        assert (ROOT / target.split("#")[0]).exists(), target


def test_architecture_page_names_every_module_and_only_real_ones():
    page = (ROOT / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`(vizcnn/[\w/]+\.py)`", page))
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "vizcnn").rglob("*.py")}
    assert named - modules == set()  # a reader finds each module the page names
    assert modules - named - {"vizcnn/data/__init__.py", "vizcnn/render/__init__.py"} == set()
