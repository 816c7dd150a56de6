"""MkDocs hooks for vizcnn's documentation site (``mkdocs.yml`` names this file).

What they add to a plain MkDocs build, so that the site cannot drift from the code:

- the examples run in a scratch folder (``gallery/`` linked in, as in a clone), not in the
  repository, and ``docs_show.figure_markdown`` puts the figures they save into the page;
- ``gallery/`` (the README's pictures) is served at ``gallery/`` of the site;
- each notebook runs in a fresh ipykernel (nbclient) in the scratch folder, and the site
  renders the executed copy (mkdocs-jupyter) with what it wrote beside it;
- ``<!-- vizcnn: cli -->`` becomes the help of the ``vizcnn`` parser and of every command;
- ``<!-- vizcnn: api NAME -->`` becomes one mkdocstrings entry per name ``NAME`` exports;
- a link ``(test:FILE::NAME)`` becomes a link to that test on the generated tests page, and
  ``<!-- vizcnn: tests -->`` that page: each test named by a link, with its source. A name
  that does not exist fails the build.
"""

from __future__ import annotations

import ast
import importlib
import io
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.plugins import event_priority
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent
TEST_LINK = re.compile(r"\(test:([\w/]+\.py)::(\w+)\)")
_state: dict = {}


def on_config(config):
    sys.path.insert(0, str(ROOT / "scripts"))  # docs_show, for the examples
    os.environ.setdefault("MPLBACKEND", "Agg")
    os.environ["COLUMNS"] = "100"  # the CLI reference's line width
    _state["cwd"] = os.getcwd()
    scratch = Path(tempfile.mkdtemp(prefix="vizcnn-docs-"))
    (scratch / "gallery").symlink_to(ROOT / "gallery")
    os.chdir(scratch)
    _state["scratch"] = scratch
    return config


@event_priority(-100)  # after mkdocs-jupyter has taken the notebooks as its pages
def on_files(files, config):
    _add_folder(files, config, ROOT, "gallery")
    for file in list(files):
        if file.src_uri.endswith(".ipynb"):
            file.abs_src_path = str(_executed(Path(file.abs_src_path), files, config))
    return files


def _add_folder(files, config, root: Path, folder: str) -> None:
    """Serve every file under ``root / folder`` at ``folder/`` of the site."""
    for path in sorted((root / folder).rglob("*")):
        if path.is_file():
            files.append(File(str(path.relative_to(root)), str(root), config["site_dir"],
                              config["use_directory_urls"]))


def _executed(notebook: Path, files, config) -> Path:
    """The notebook run top to bottom in a fresh ipykernel (nbclient), in a folder of the
    scratch space: the executed copy, which the site renders. What the notebook writes
    there (its gallery) is served beside its page, so its links work in the site."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    work = _state["scratch"] / notebook.stem
    work.mkdir()
    book = nbformat.read(notebook, as_version=4)
    try:
        NotebookClient(book, timeout=900, kernel_name="python3",
                       extra_arguments=["--IPKernelApp.log_level=ERROR"],
                       resources={"metadata": {"path": str(work)}}).execute()
    except CellExecutionError as error:
        raise PluginError(f"docs: {notebook.name} failed: {error}") from None
    for folder in sorted(path.name for path in work.iterdir() if path.is_dir()):
        _add_folder(files, config, work, folder)
    executed = work / notebook.name
    nbformat.write(book, executed)
    return executed


def on_page_markdown(markdown, page, config, files):
    # the examples' progress bars would fill the terminal: they go to a buffer until the
    # page's examples have run (MkDocs' own messages, an example's failure among them, still
    # reach the terminal through its logging handler)
    _state["stderr"] = sys.stderr
    sys.stderr = io.StringIO()
    markdown = TEST_LINK.sub(lambda m: f"({_test_anchor(m[1], m[2])})", markdown)
    markdown = markdown.replace("<!-- vizcnn: cli -->", _cli_reference())
    markdown = re.sub(r"<!-- vizcnn: api ([\w.]+) -->", lambda m: _api_reference(m[1]),
                      markdown)
    return markdown.replace("<!-- vizcnn: tests -->", _tests_page(config))


def on_page_content(html, page, config, files):
    sys.stderr = _state.pop("stderr", sys.stderr)
    return html


def on_post_build(config):
    os.chdir(_state.pop("cwd", ROOT))
    shutil.rmtree(_state.pop("scratch", ""), ignore_errors=True)


def on_build_error(error):
    sys.stderr = _state.pop("stderr", sys.stderr)
    on_post_build({})


def _test_anchor(file: str, name: str) -> str:
    return f"tests.md#{Path(file).stem}-{name}".replace("_", "-")


def _cli_reference() -> str:
    from vizcnn.cli import build_parser

    parser = build_parser()
    commands = next(action for action in parser._actions if action.dest == "command").choices
    parts = ["## vizcnn", "", "```text", parser.format_help().rstrip(), "```", ""]
    for name, command in commands.items():
        parts += [f"## vizcnn {name}", "", "```text", command.format_help().rstrip(), "```", ""]
    return "\n".join(parts)


def _api_reference(package: str) -> str:
    """One ``::: module.name`` entry per exported name, grouped by the module that defines
    it, in the order of the package's ``__all__`` within each module."""
    module = importlib.import_module(package)
    groups: dict[str, list[str]] = {}
    for name in module.__all__:
        value = getattr(module, name)
        if isinstance(value, type(module)):
            where, target = value.__name__, value.__name__
        else:
            where = getattr(value, "__module__", None)
            if where is None or not hasattr(importlib.import_module(where), name):
                where = _defining_module(package, name)
            target = f"{where}.{name}"
        groups.setdefault(where, []).append(target)
    parts = []
    for where, targets in sorted(groups.items()):
        parts += [f"## `{where}`", ""] + [f"::: {target}\n" for target in targets]
    return "\n".join(parts)


def _defining_module(package: str, name: str) -> str:
    """The module of ``package`` whose source assigns ``name`` (constants carry no
    ``__module__``)."""
    for path in sorted((ROOT / package.replace(".", "/")).rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            targets = node.targets if isinstance(node, ast.Assign) else (
                [node.target] if isinstance(node, ast.AnnAssign) else [])
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return ".".join(path.relative_to(ROOT).with_suffix("").parts)
    raise PluginError(f"docs: cannot find where {package}.{name} is defined")


def _referenced_tests(config) -> dict[str, list[str]]:
    wanted: dict[str, list[str]] = {}
    for page in sorted(Path(config["docs_dir"]).glob("*.md")):
        for file, name in TEST_LINK.findall(page.read_text()):
            if name not in wanted.setdefault(file, []):
                wanted[file].append(name)
    return wanted


def _tests_page(config) -> str:
    parts = []
    for file, names in sorted(_referenced_tests(config).items()):
        path = ROOT / "tests" / file
        if not path.exists():
            raise PluginError(f"docs: tests/{file} does not exist")
        source = path.read_text()
        found = {node.name: node for node in ast.walk(ast.parse(source))
                 if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)}
        parts += [f"## tests/{file}", ""]
        for name in names:
            if name not in found:
                raise PluginError(f"docs: tests/{file} has no test {name}")
            node = found[name]
            anchor = _test_anchor(file, name).split("#")[1]
            doc = ast.get_docstring(node) or ""
            code = ast.get_source_segment(source, node, padded=True)
            parts += [f"### `{name}` {{#{anchor}}}", "", doc, "",
                      '??? note "source"', "", "    ```python"]
            parts += ["    " + line if line else "" for line in code.splitlines()]
            parts += ["    ```", ""]
    return "\n".join(parts)
