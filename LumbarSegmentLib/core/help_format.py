"""How ``--help`` reads in a terminal: defaults shown, no reST markup, documentation a user can reach.

Both commands (``lumbarseg``, ``lumbarseg-train``) build their parsers with
:class:`DefaultsFormatter` and call :func:`show_defaults` once the parser is complete,
so every option of every subcommand says its default, whether or not its help text
was written with one in mind.
"""
from __future__ import annotations

import argparse
import re

# Where a user of an installed wheel reads more: the docs travel with the source, not the wheel,
# so help texts name the page and say what it holds instead of pointing at a path they lack.
DOCS_NOTE = ("The user guide, the training guide and the validation results are the pages user_guide.md, "
             "training.md and validation.md in the docs folder of the LumbarSegment source.")

_DEFAULT_SAID = re.compile(r"\bdefault\b", re.IGNORECASE)
_RST_LITERAL = re.compile(r"``([^`]+)``")


def plain(text: str) -> str:
    """reST literals (````x````) as the terminal should show them: ``x``."""
    return _RST_LITERAL.sub(r"\1", text or "")


class DefaultsFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks and appends ``(default: X)`` where the help does not say it."""

    def _get_help_string(self, action):
        text = plain(action.help or "")
        default = action.default
        if (default is None or default is False or default is argparse.SUPPRESS or not action.option_strings
                or isinstance(action, (argparse._HelpAction, argparse._VersionAction))):
            return text
        if _DEFAULT_SAID.search(text):
            return text
        shown = ",".join(str(v) for v in default) if isinstance(default, (tuple, list)) else str(default)
        return f"{text} (default: {shown})".strip()


def show_defaults(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Give every option with a default a help line (argparse prints nothing for options without one).

    Walks the subcommands too; returns ``parser`` for chaining.
    """
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                show_defaults(sub)
        elif action.help is None and action.option_strings and action.default is not None \
                and action.default is not False and action.default is not argparse.SUPPRESS:
            action.help = "(default: %(default)s)"  # argparse prints nothing for an option without help
        if isinstance(action.help, str) and action.help is not argparse.SUPPRESS:
            action.help = plain(action.help)
    parser.formatter_class = DefaultsFormatter
    parser.description = plain(parser.description or "") or None
    parser.epilog = plain(parser.epilog or "") or None
    return parser


__all__ = ["DefaultsFormatter", "show_defaults", "plain", "DOCS_NOTE"]
