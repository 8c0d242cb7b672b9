"""What a newcomer reads first: --help, error lines for common slips, `lumbarseg models`, report charts.

All in-process (argparse and the catalogue), so each test takes well under a second.
"""
from __future__ import annotations

import argparse
import io
import json
import re
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from LumbarSegmentLib.cli import main as cli
from LumbarSegmentLib.core.help_format import DefaultsFormatter, plain, show_defaults
from LumbarSegmentLib.training import cli as train_cli

ROOT = Path(__file__).resolve().parents[1]


def _help(parser: argparse.ArgumentParser, *path: str) -> str:
    for name in path:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return parser.format_help()


def _subcommands(parser):
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return list(sub.choices)


def test_train_help_has_no_rest_markup_and_names_readable_docs():
    text = _help(train_cli.build_parser())
    assert "``" not in text
    assert "docs/" not in text  # a wheel user has no docs folder; the note says where the pages live
    for name in _subcommands(train_cli.build_parser()):
        assert "``" not in _help(train_cli.build_parser(), name), name


@pytest.mark.parametrize("make, name", [(train_cli.build_parser, n) for n in
                                        ("train", "cv", "finetune", "evaluate", "publish", "holdout", "export",
                                         "soup")] + [(cli.build_parser, "segment")])
def test_every_option_with_a_default_shows_it(make, name):
    parser = make()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    body = sub.format_help().split("\n\n", 1)[1]  # after the usage block
    entries = {}  # option -> its help entry (the option's line and the indented lines below it)
    for block in re.split(r"\n(?=  -)", "\n" + body):
        head = block.strip().split("  ")[0]
        for flag in re.findall(r"--?[\w-]+", head):
            entries[flag] = " ".join(block.split())
    for action in sub._actions:
        if (not action.option_strings or action.default is None or action.default is False
                or action.default is argparse.SUPPRESS or action.help is argparse.SUPPRESS):
            continue
        flag = action.option_strings[-1]
        assert "default" in entries[flag].lower(), f"{name} {flag}: no default in {entries[flag]!r}"


def test_finetune_epochs_default_is_what_help_and_docs_say():
    sub = next(a for a in train_cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    ft = sub.choices["finetune"]
    epochs = next(a for a in ft._actions if "--epochs" in a.option_strings).default
    assert f"(default: {epochs})" in " ".join(ft.format_help().split())
    doc = (ROOT / "docs" / "training.md").read_text()
    assert f"`--epochs` default {epochs}" in doc or f"default {epochs} epochs" in doc


def test_defaults_formatter_keeps_a_default_the_help_already_states():
    p = argparse.ArgumentParser(formatter_class=DefaultsFormatter)
    p.add_argument("--a", default=3, help="already says (default 3)")
    p.add_argument("--b", default=0.0)
    show_defaults(p)
    text = p.format_help()
    assert text.count("default") == 2 and "(default: 0.0)" in text
    assert plain("use ``--x`` here") == "use --x here"


def test_preview_that_swallowed_the_input_is_explained(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["segment", "-o", "x.nii.gz", "--preview", "in.mha"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--preview took in.mha as its own file name" in err and "put the inputs first" in err


def test_missing_input_without_a_swallowing_option_keeps_argparse_message(capsys):
    with pytest.raises(SystemExit):
        cli.main(["segment", "-o", "x.nii.gz"])
    err = capsys.readouterr().err
    assert "required: inputs" in err and "took" not in err


def _models(*args) -> tuple[int, str]:
    out = io.StringIO()
    with redirect_stdout(out), redirect_stderr(io.StringIO()):
        code = cli.main(["models", *args])
    return code, out.getvalue()


def test_models_marks_parents_that_are_not_installed():
    code, text = _models()
    assert code == 0
    rows = json.loads(_models("--json")[1])
    refs = {r["ref"] for r in rows}
    for r in rows:
        if r["parent"]:
            assert r["parent_installed"] == (r["parent"] in refs)
            line = next(ln for ln in text.splitlines() if ln.startswith(r["ref"] + " "))
            assert ("(not installed)" in line) == (r["parent"] not in refs), line


def test_models_json_shows_real_metrics_or_none():
    rows = json.loads(_models("--json")[1])
    assert any("metrics" in r for r in rows)  # the shipped default records its validation
    for r in rows:
        if "metrics" in r:
            assert r["metrics"], r["ref"]  # never an empty dict
            assert 0 < r["metrics"]["mean_dice_fg"] <= 1


def test_models_json_into_a_closed_pipe_exits_cleanly():
    # `lumbarseg models --json | head -1`: the reader stops early; no "Broken pipe" error
    proc = subprocess.run(f"'{sys.executable}' -m LumbarSegmentLib.cli.main models --json | head -c 10 >/dev/null",
                          shell=True, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**__import__('os').environ, "PYTHONPATH": str(ROOT)})
    assert "Broken pipe" not in proc.stderr and "Errno 32" not in proc.stderr, proc.stderr


def test_web_hint_names_the_installed_wheel(monkeypatch):
    from LumbarSegmentLib.core import install_hint

    monkeypatch.setattr(install_hint, "installed_from", lambda: ("wheel", "/dl/lumbarsegment-0.1.0-py3-none-any.whl"))
    assert "pip install '/dl/lumbarsegment-0.1.0-py3-none-any.whl[web]'" in install_hint.extra_install_hint()
    monkeypatch.setattr(install_hint, "installed_from", lambda: None)
    hint = install_hint.extra_install_hint()
    assert "trame-slicer==2.0.0" in hint and "lumbarsegment[web]" not in hint


def test_reports_without_matplotlib_write_tables(tmp_path, monkeypatch, caplog):
    from LumbarSegmentLib.core.schema import load_schema
    from LumbarSegmentLib.training import report

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.setattr(report, "_warned", False)
    schema = load_schema("starter")
    val = {"dice": {c: 0.8 for c in schema.ids}, "iou": {c: 0.7 for c in schema.ids},
           "mean_dice_fg": 0.8, "mean_iou_fg": 0.7, "mean_dice": 0.8, "mean_iou": 0.7}
    history = [{"epoch": 1, "step": 10, "loss": 0.5, "lr": 1e-3, "val": val}]
    with caplog.at_level("WARNING"):
        report.write_run_report(tmp_path, history, val, {}, schema, name="m")
    assert (tmp_path / "metrics.md").is_file() and (tmp_path / "history.csv").is_file()
    assert not list(tmp_path.glob("*.png"))
    assert "pip install matplotlib" in caplog.text
