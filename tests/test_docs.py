"""The README is the front door: at most 200 lines, every Python snippet runs as written
from a fresh clone, imports only from ``vizcnn`` and ``vizcnn.render`` (besides torch and the
standard library), and every link points into the repository. The documentation site builds
offline in strict mode, with every example and the tutorial notebook executed, and its
references generated from the code."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import vizcnn

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
SNIPPETS = re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)
ALLOWED = {"vizcnn", "vizcnn.render", "torch", "numpy"}


def test_there_are_snippets():
    assert len(SNIPPETS) >= 1  # the README's example; the docs' examples run in the docs build


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


# the import levels of docs/architecture.md ("What each module may import")
LEVELS = {
    "errors": 1, "crops": 1, "progress": 1, "display": 1, "similarity": 1,
    "checks": 2, "layers": 2, "io": 2, "data.images": 2, "data.shapes": 2, "data": 2,
    "hooks": 3, "geometry": 3.5,
    "models": 4, "receptive": 4, "summary": 4,
    "deconv_graph": 4.5, "deconv": 5, "scan": 5, "datapass": 5, "units": 5, "probes": 5,
    "probes.occlusion": 5,
    "probes.adversarial": 5,
    "probes.invariance": 5, "featvis": 5, "train": 5, "doctor": 5.5, "evolution": 5.5,
    "sanity": 5.5,
    "render": 6, "render.grid": 6, "render.figures": 6, "render.panels": 6.5,
    "render.notebook": 6.6, "render.gallery": 6.7,
    "demo": 7, "cli": 7, "": 7,
}


def test_modules_import_only_lower_levels_at_load_time():
    for path in (ROOT / "vizcnn").rglob("*.py"):
        name = ".".join(path.relative_to(ROOT / "vizcnn").with_suffix("").parts)
        name = name.removesuffix("__init__").rstrip(".")
        for node in ast.parse(path.read_text()).body:  # module level only: not in functions
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vizcnn"):
                imported = node.module.removeprefix("vizcnn").lstrip(".")
                if path.name == "__init__.py" and name and (
                        imported == name or imported.startswith(name + ".")):
                    continue  # a package's own __init__ importing its modules
                assert LEVELS[imported] <= LEVELS[name], f"{name} imports {imported}"


def test_the_readme_is_a_front_door():
    assert len(README.splitlines()) <= 200


def _hooks():
    """scripts/docs_hooks.py, imported as MkDocs imports it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "scripts/docs_hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_rule_that_names_a_missing_test_fails_the_build(tmp_path):
    from mkdocs.exceptions import PluginError

    hooks = _hooks()
    (tmp_path / "rules.md").write_text("| a rule | [t](test:test_docs.py::test_no_such_test) |")
    with pytest.raises(PluginError, match="no test test_no_such_test"):
        hooks._tests_page({"docs_dir": str(tmp_path)})
    (tmp_path / "rules.md").write_text("[t](test:test_docs.py::test_there_are_snippets)")
    assert "def test_there_are_snippets" in hooks._tests_page({"docs_dir": str(tmp_path)})


def test_an_example_that_raises_fails_the_build(tmp_path):
    """A one-page site with the project's hooks: the page's example raises, and the strict
    build fails, naming it, though the examples' own output is held back from the terminal."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "index.md").write_text(
        '# Broken\n\n```python exec="on"\nimport sys\nprint("progress", file=sys.stderr)\n'
        'raise ValueError("this example is broken")\n```\n')
    (tmp_path / "mkdocs.yml").write_text(
        f"site_name: t\ndocs_dir: docs\nsite_dir: site\nplugins:\n  - markdown-exec\n"
        f"markdown_extensions:\n  - pymdownx.superfences\n"
        f"hooks:\n  - {ROOT / 'scripts' / 'docs_hooks.py'}\n")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "this example is broken" in result.stderr
    assert "Aborted with 1 warnings in strict mode" in result.stdout
    assert "progress\n" not in result.stderr  # held back


@pytest.mark.slow
def test_the_site_builds_offline_in_strict_mode(tmp_path):
    """Strict: a broken link, a docstring griffe cannot read, an example that raises or a
    notebook cell that fails each fail the build."""
    site = tmp_path / "site"
    sources = sorted(path.name for path in (ROOT / "docs").iterdir())
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict",
                             "-f", str(ROOT / "mkdocs.yml"), "-d", str(site)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-5000:]
    page = lambda name: (site / name).read_text()
    for name in ("filters-and-maps", "deconvnet", "occlusion", "probes",
                 "feature-visualization", "debugging"):
        assert "data:image/png;base64," in page(f"{name}.html"), name  # the example's figure
    api = page("api.html") + page("api-render.html")
    for name in vizcnn.__all__ + vizcnn.render.__all__:
        assert re.search(rf'id="vizcnn(\.\w+)*\.{name}"', api), name
    cli = page("cli.html")
    for command in ("summary", "topk", "occlusion", "gallery", "doctor", "demo"):
        assert f"usage: vizcnn {command}" in cli, command
    tutorial = page("tutorial.html")
    assert "TopK: the 9 strongest images" in tutorial  # the notebook ran: its outputs
    assert "HealthReport of demo" in tutorial and "data:image/png;base64," in tutorial
    assert "test_equals_brute_force" in page("tests.html")
    assert (site / "tutorial-gallery" / "index.html").is_file()  # the notebook's, linked
    # the examples and the notebook ran in a scratch folder, removed after the build: they
    # left nothing here, nor in the sources
    assert [path.name for path in tmp_path.iterdir()] == ["site"]
    assert sorted(path.name for path in (ROOT / "docs").iterdir()) == sources
