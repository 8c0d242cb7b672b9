"""The shape docs/architecture.md promises, checked: no import cycles (imports inside functions
count), the import-linter contracts in ``.importlinter``, no product file over 600 lines, no
function over 120 lines, the rooms of the Lib and the training package in the top-level folder."""
from __future__ import annotations

import ast
import configparser
import logging
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PRODUCT = ["LumbarSegmentLib", "LumbarSegmentWeb", "LumbarSegment"]


def _product_files():
    for top in PRODUCT:
        root = REPO / top
        if root.is_dir():
            yield from sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on, stack, out, n = {}, {}, set(), [], [], [0]
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = n[0]
        n[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = n[0]
                    n[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(edges.get(w, ())))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_between_project_modules():
    grimp = pytest.importorskip("grimp", reason="grimp comes with import-linter (the test extra)")
    sys.path.insert(0, str(REPO))
    try:
        tops = [t for t in ("LumbarSegmentLib", "LumbarSegmentWeb") if (REPO / t).is_dir()]
        g = grimp.build_graph(*tops, include_external_packages=False)
    finally:
        sys.path.remove(str(REPO))
    edges = {m: {t for t in g.find_modules_directly_imported_by(m) if t != m} for m in g.modules}
    # a package imports its own submodules when it is imported: not a dependency of the package's idea
    for m in edges:
        edges[m] = {t for t in edges[m] if not t.startswith(m + ".")}
    assert _cycles(edges) == []


def test_import_linter_contracts_hold():
    pytest.importorskip("importlinter", reason="import-linter is part of the test extra")
    from importlinter.cli import lint_imports

    cfg = REPO / ".importlinter"
    assert cfg.is_file()
    parser = configparser.ConfigParser()
    parser.read(cfg)
    assert len([s for s in parser.sections() if s.startswith("importlinter:contract:")]) >= 3
    # lint-imports configures logging with disable_existing_loggers: keep the other tests' loggers alive
    loggers = [lg for lg in logging.root.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    enabled = [lg for lg in loggers if not lg.disabled]
    root_handlers, root_level = list(logging.root.handlers), logging.root.level
    sys.path.insert(0, str(REPO))
    try:
        assert lint_imports(config_filename=str(cfg)) == 0, "import-linter contracts are broken (run lint-imports)"
    finally:
        sys.path.remove(str(REPO))
        for lg in enabled:
            lg.disabled = False
        logging.root.handlers[:], logging.root.level = root_handlers, root_level


def test_no_product_file_over_600_lines():
    long = {str(p.relative_to(REPO)): n for p in _product_files() if (n := len(p.read_text().splitlines())) > 600}
    assert long == {}


def test_no_function_over_120_lines():
    long = {}
    for p in _product_files():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 120:
                    long[f"{p.relative_to(REPO)}:{node.name}"] = n
    assert long == {}


def test_training_package_lives_in_the_top_level_folder_under_the_projects_name():
    """The design card's layout: training/ at the top, installed as LumbarSegmentLib.training (never as a
    bare ``training`` that would clash with other projects); the Lib's link serves source-tree runs."""
    assert (REPO / "training" / "__init__.py").is_file()
    link = REPO / "LumbarSegmentLib" / "training"
    assert link.is_symlink() and link.resolve() == (REPO / "training").resolve()
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"LumbarSegmentLib.training" = "training"' in pyproject
    assert not re.search(r'packages = \[[^\]]*"training[".]', pyproject)


def test_the_lib_root_holds_rooms_not_modules():
    lib = REPO / "LumbarSegmentLib"
    modules = sorted(p.name for p in lib.glob("*.py"))
    assert len(modules) <= 8, modules
    rooms = {p.name for p in lib.iterdir() if (p / "__init__.py").is_file()}
    assert {"core", "formats", "registry", "inference", "dataset", "training", "slicer", "cli", "models"} <= rooms
    for room in rooms - {"training"}:
        doc = ast.get_docstring(ast.parse((lib / room / "__init__.py").read_text()))
        assert doc, f"LumbarSegmentLib/{room}/__init__.py should say what the room is for"
