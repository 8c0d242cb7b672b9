"""The shape docs/architecture.md promises, checked: no import cycles (imports inside functions
count), the import-linter contracts in ``.importlinter``, no product file over 500 lines, no
function over 80 lines or with more than 8 parameters (an explicit allow-list of those still being
split, which can only shrink), the rooms of the Lib and the training package in the top-level folder."""
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


# The size limits of product code (the Lib, the training package in training/, the web app, the Slicer module).
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 80  # argument-parser builders excepted: a name holding "parser" or starting with "_add_"
MAX_PARAMETERS = 8  # self and cls not counted; *args and **kwargs count as one each

# Still over a limit, each with its size at the time (none left today). An entry may only shrink (a larger number fails)
# and must go when its file or function is back under the limit (a stale entry fails too), so the list can only
# get shorter. Keys are repository paths, with ``:Class.function`` for functions.
FILES_OVER = {
}
FUNCTIONS_OVER = {
}
PARAMETERS_OVER = {
}


def _sized_files() -> dict[str, Path]:
    """Every product file once, named by its real place (the Lib's ``training`` link leads to training/)."""
    out = {}
    for p in [*_product_files(), *sorted((REPO / "training").glob("*.py"))]:
        real = p.resolve()
        out[str(real.relative_to(REPO.resolve()))] = real
    return out


def _functions(path: Path):
    """``(qualified name, lines, parameters)`` of every function in ``path``, nested ones included."""
    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = child.args
                names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
                names += [x.arg for x in (a.vararg, a.kwarg) if x is not None]
                params = len([n for n in names if n not in ("self", "cls")])
                yield prefix + child.name, child.end_lineno - child.lineno + 1, params
                yield from walk(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, f"{prefix}{child.name}.")
            else:
                yield from walk(child, prefix)
    yield from walk(ast.parse(path.read_text()), "")


def _is_parser_builder(name: str) -> bool:
    short = name.rsplit(".", 1)[-1]
    return "parser" in short or short.startswith("_add_")


def _over(measured: dict[str, int], limit: int, allowed: dict[str, int]) -> list[str]:
    """Problems: sizes over ``limit`` not in ``allowed``, allowed ones that grew, allowed ones no longer over."""
    problems = [f"{k}: {n} (limit {limit})" for k, n in sorted(measured.items()) if n > limit and k not in allowed]
    problems += [f"{k}: {measured[k]}, more than the {n} allowed; split it instead" for k, n in allowed.items()
                 if measured.get(k, 0) > n]
    problems += [f"{k}: now within the limit (or gone): remove it from the allow-list" for k in allowed
                 if measured.get(k, 0) <= limit]
    return problems


def test_no_product_file_over_500_lines():
    sizes = {name: len(p.read_text().splitlines()) for name, p in _sized_files().items()}
    assert _over(sizes, MAX_FILE_LINES, FILES_OVER) == []


def test_no_function_over_80_lines_or_8_parameters():
    lines, params = {}, {}
    for name, p in _sized_files().items():
        for qual, n_lines, n_params in _functions(p):
            key = f"{name}:{qual}"
            if not _is_parser_builder(qual):
                lines[key] = max(lines.get(key, 0), n_lines)
            params[key] = max(params.get(key, 0), n_params)
    assert _over(lines, MAX_FUNCTION_LINES, FUNCTIONS_OVER) == []
    assert _over(params, MAX_PARAMETERS, PARAMETERS_OVER) == []


def test_the_size_check_sees_what_it_should(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("class A:\n    def m(self, a, b, c, d, e, f, g, h, *rest, **kw):\n        def inner(x):\n"
                 "            return x\n        return inner\n\ndef build_parser():\n    pass\n")
    found = {q: (n, k) for q, n, k in _functions(f)}
    assert found == {"A.m": (4, 10), "A.m.inner": (2, 1), "build_parser": (2, 0)}
    assert _is_parser_builder("build_parser") and _is_parser_builder("X._add_train_args")
    assert not _is_parser_builder("parse_spacing") and not _is_parser_builder("add_segment")
    assert _over({"a": 9, "b": 3}, 8, {}) == ["a: 9 (limit 8)"]
    assert _over({"a": 9}, 8, {"a": 9}) == []
    assert len(_over({"a": 10}, 8, {"a": 9})) == 1 and len(_over({"a": 8}, 8, {"a": 9})) == 1


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
