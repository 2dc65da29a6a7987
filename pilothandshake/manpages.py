"""Man pages of the three programs, generated from their argparse parsers, so a page never
disagrees with ``--help``: ``python -m pilothandshake.manpages OUTDIR`` writes
``pilot-handshaked.1``, ``pilot-handshakectl.1`` and ``pilot-registryd.1``. setup.py runs it
when the package is built; the wheel installs the pages in ``share/man/man1`` of its prefix
(``man pilot-handshakectl`` finds them for a venv's ``bin`` on ``PATH``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ._version import __version__

__all__ = ["PROGRAMS", "render", "write_all"]

PROGRAMS = ("pilot-handshaked", "pilot-handshakectl", "pilot-registryd")


def _parsers() -> dict[str, argparse.ArgumentParser]:
    from .cli import _parser
    from .handshaked import build_parser
    from .registry.server import _parser as registry_parser

    return {
        "pilot-handshaked": build_parser(),
        "pilot-handshakectl": _parser(),
        "pilot-registryd": registry_parser(),
    }


def _escape(text: str) -> str:
    """``text`` safe in roff: backslashes, and a leading dot or quote."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(
        "\\&" + line if line.startswith((".", "'")) else line for line in text.splitlines()
    )


def _options(parser: argparse.ArgumentParser) -> list[str]:
    lines = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) or action.help == argparse.SUPPRESS:
            continue
        if action.option_strings:
            name = ", ".join(action.option_strings)
            if action.nargs != 0:
                name += " " + str(action.metavar or action.dest.upper())
        else:
            name = str(action.metavar or action.dest.upper())
            if action.choices:
                name = "{" + ",".join(map(str, action.choices)) + "}"
        text = str(action.help or "").replace("%(prog)s", parser.prog).replace("%%", "%")
        if "%(default)" in text:
            text = text.replace("%(default)s", str(action.default))
        lines += [".TP", f"\\fB{_escape(name)}\\fR", _escape(text)]
    return lines


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _arguments(parser: argparse.ArgumentParser) -> str:
    """The usage line after ``usage: PROG`` (a command's PROG is two words)."""
    words = parser.format_usage().split()[1:]
    return " ".join(words[len(parser.prog.split()) :])


def render(name: str, parser: argparse.ArgumentParser) -> str:
    """The man page (roff, section 1) of program ``name`` from its ``parser``."""
    description = parser.description or ""
    lines = [
        f'.TH {name.upper()} 1 "" "pilothandshake {__version__}" "User Commands"',
        ".SH NAME",
        f"{_escape(name)} \\- {_escape(description.rstrip('.'))}",
        ".SH SYNOPSIS",
        f"\\fB{_escape(name)}\\fR {_escape(_arguments(parser))}",
        ".SH DESCRIPTION",
        _escape(description),
        ".SH OPTIONS",
        *_options(parser),
    ]
    commands = _commands(parser)
    if commands:
        lines.append(".SH COMMANDS")
        for sub in commands.values():
            lines += [".SS " + _escape(f"{sub.prog} {_arguments(sub)}")]
            lines.append(_escape(sub.description or ""))
            lines += _options(sub)
            if sub.epilog:
                lines += [".PP", ".nf", _escape(sub.epilog), ".fi"]
    if parser.epilog:
        lines += [".SH NOTES", ".nf", _escape(parser.epilog), ".fi"]
    others = [f"\\fB{_escape(o)}\\fR(1)" for o in PROGRAMS if o != name]
    lines += [".SH SEE ALSO", ", ".join(others)]
    return "\n".join(lines) + "\n"


def write_all(directory: str) -> list[Path]:
    """Write the three pages into ``directory`` (created); returns their paths."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, parser in _parsers().items():
        path = out / f"{name}.1"
        path.write_text(render(name, parser), encoding="utf-8")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    """``python -m pilothandshake.manpages OUTDIR``."""
    args = argparse.ArgumentParser(
        prog="python -m pilothandshake.manpages",
        description="Write the man pages of the three programs into OUTDIR.",
    )
    args.add_argument("outdir", metavar="OUTDIR")
    for path in write_all(args.parse_args(argv).outdir):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
