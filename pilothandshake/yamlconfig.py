"""Reading a YAML config file and checking its fields, with every error a ``ConfigError``
that names the file, the dotted key (for example ``trust.allowlist[1].public_key``) and what
was expected. ``bool`` is never accepted where an integer belongs; an integer is accepted
where a float belongs. Shared by the daemon's config (``config.py``) and ``pilot-registryd``'s
(``registry/config.py``), which define their sections on top of ``FieldParser``.
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable, NoReturn, TypeVar
from urllib.parse import urlsplit

import yaml

from .addresses import parse_address
from .constants import MAX_NODE_ID
from .errors import ConfigError

__all__ = ["FieldParser", "describe", "read_yaml"]

_HEX_FINGERPRINT = re.compile(r"[0-9a-f]{64}")
# Longest accepted duration (about 31 years): within threading.TIMEOUT_MAX everywhere.
_MAX_SECONDS = 1e9
# Largest accepted count (connections, replay entries): a C int everywhere it may go.
_MAX_COUNT = 2**31 - 1
_T = TypeVar("_T")


def read_yaml(path: str) -> object:
    """The YAML document in the file at ``path`` (None when empty).

    Every failure is a ``ConfigError`` naming the file: unreadable, not UTF-8, not YAML,
    nested too deeply, or holding an integer too long to convert.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config: {exc}") from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {_one_line(str(exc))}") from exc
    except RecursionError:
        # PyYAML composes recursively: a few thousand nested brackets exhaust the stack.
        raise ConfigError(f"{path}: invalid YAML: nested too deeply") from None
    except (ValueError, OverflowError) as exc:
        # PyYAML converts scalars with int() and datetime(): a 5,000-digit integer passes
        # Python's digit limit, 2026-13-45 is no date. Its message names no line.
        raise ConfigError(f"{path}: invalid YAML value: {_one_line(str(exc))[:200]}") from None


def _one_line(text: str) -> str:
    return " ".join(text.split())


def describe(value: object) -> str:
    """How a wrong value is shown in an error: scalars as written, containers by kind."""
    if value is None:
        return "null"
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        # repr() of a huge integer is long, and past 4,300 digits raises ValueError.
        return f"an integer of {value.bit_length()} bits"
    if isinstance(value, (bool, int, float, str)):
        text = repr(value)
        return text if len(text) <= 80 else text[:77] + "..."
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"a {type(value).__name__}"


class FieldParser:
    """Checks of config fields, each ``check(value, key)`` returning the value or raising
    ``ConfigError`` naming ``source`` (the file) and the dotted ``key``.

    While ``collecting`` (a whole file checked at once, ``check_config``), a problem found by
    ``get``, ``section``, ``noting`` or ``note`` is added to ``problems`` instead, and the
    parse goes on with the key's default, so one pass finds every problem."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.collecting = False
        self.problems: list[str] = []

    def fail(self, key: str, expected: str, got: str = "") -> NoReturn:
        suffix = f", got {got}" if got else ""
        raise ConfigError(f"{self.source}: {key}: expected {expected}{suffix}")

    def noting(self, default: _T, parse: Callable[..., _T], *args: Any) -> _T:
        """``parse(*args)``, or (while ``collecting``) ``default`` with its ``ConfigError``
        noted in ``problems``."""
        try:
            return parse(*args)
        except ConfigError as exc:
            if not self.collecting:
                raise
            self.problems.append(str(exc))
            return default

    def note(self, key: str, expected: str, got: str = "") -> None:
        """The problem of ``key`` that ``fail`` raises, noted (while ``collecting``)."""
        self.noting(None, self.fail, key, expected, got)

    def section(self, value: object, key: str, known: tuple[str, ...]) -> dict[str, Any]:
        """A mapping whose keys are all in ``known``; null counts as empty. While
        ``collecting``, a value that is not a mapping is noted (then: all defaults), and so
        is each unknown key (the parse goes on without it)."""
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.note(key or "(top level)", "a mapping", describe(value))
            return {}
        for name in value:
            if name not in known:
                dotted = f"{key}.{name}" if key else str(name)
                self.noting(None, self._unknown, dotted, known)
        return {name: item for name, item in value.items() if name in known}

    def _unknown(self, key: str, known: tuple[str, ...]) -> NoReturn:
        raise ConfigError(
            f"{self.source}: {key}: unknown key (expected one of: {', '.join(known)})"
        )

    def get(
        self,
        section: dict[str, Any],
        prefix: str,
        name: str,
        default: _T,
        check: Callable[[object, str], _T],
    ) -> _T:
        """``section[name]`` checked by ``check`` (errors name ``prefix.name``), or ``default``
        (also for a problem noted while ``collecting``)."""
        if name not in section:
            return default
        return self.noting(default, check, section[name], f"{prefix}.{name}" if prefix else name)

    def boolean(self, value: object, key: str) -> bool:
        if not isinstance(value, bool):
            self.fail(key, "true or false", describe(value))
        return value

    def integer(self, value: object, key: str, low: int, high: int | None = None) -> int:
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or value < low
            or (high is not None and value > high)
        ):
            bound = f"{low}..{high}" if high is not None else f">= {low}"
            self.fail(key, f"an integer {bound}", describe(value))
        return value

    def node_id(self, value: object, key: str) -> int:
        return self.integer(value, key, 0, MAX_NODE_ID)

    def count(self, value: object, key: str) -> int:
        return self.integer(value, key, 1, _MAX_COUNT)

    def seconds(self, value: object, key: str) -> float:
        # Compare before converting: float() of a huge YAML integer raises OverflowError.
        # The upper bound keeps every interval usable as a thread wait timeout.
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not 0 < value <= _MAX_SECONDS
        ):
            self.fail(key, f"a number of seconds > 0 and <= {_MAX_SECONDS:g}", describe(value))
        return float(value)

    def string(self, value: object, key: str) -> str:
        if not isinstance(value, str):
            self.fail(key, "a string", describe(value))
        return value

    def choice(self, choices: tuple[str, ...]) -> Callable[[object, str], str]:
        def check(value: object, key: str) -> str:
            if not isinstance(value, str) or value not in choices:
                self.fail(key, f"one of {', '.join(choices)}", describe(value))
            return value

        return check

    def address(self, value: object, key: str, *, allow_port_zero: bool = False) -> str:
        text = self.string(value, key)
        try:
            host, port = parse_address(text)
            # The socket layer refuses these hosts with TypeError / UnicodeError rather than
            # OSError, so catch them here instead of crashing the daemon at bind or dial.
            if "\x00" in host:
                raise ValueError(f"bad address {text!r}: NUL in host")
            host.encode("idna")
        except ValueError as exc:  # UnicodeError is a ValueError
            self.fail(key, "host:port", str(exc))
        if port == 0 and not allow_port_zero:
            self.fail(key, "host:port with a port 1..65535", describe(value))
        return text

    def listen(self, value: object, key: str) -> str:
        # Port 0 lets the kernel pick a free port: tests and ad-hoc fleets on one machine use it.
        return self.address(value, key, allow_port_zero=True)

    def fingerprint(self, value: object, key: str) -> str:
        text = self.string(value, key).replace(":", "").lower()
        if text and not _HEX_FINGERPRINT.fullmatch(text):
            self.fail(key, "64 hex digits of a SHA-256 (colons allowed) or empty", describe(value))
        return text

    def webhook(self, value: object, key: str) -> str:
        text = self.string(value, key)
        if text:
            try:
                parts = urlsplit(text)
            except ValueError:  # e.g. "http://[" (an unclosed IPv6 bracket)
                self.fail(key, "an http:// or https:// URL, or empty", describe(value))
            if parts.scheme not in ("http", "https") or not parts.netloc:
                self.fail(key, "an http:// or https:// URL, or empty", describe(value))
        return text

    def identity(self, value: object, key: str) -> str:
        text = self.string(value, key)
        if not text or "\x00" in text:
            # A NUL would make every later open() raise ValueError.
            self.fail(key, "a non-empty path without NUL", describe(value))
        path = os.path.expanduser(text)
        if not os.path.isabs(path):
            path = os.path.join(os.path.dirname(os.path.abspath(self.source)), path)
        return os.path.normpath(path)

    def items(self, value: object, key: str) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list):
            self.fail(key, "a list", describe(value))
        return value

    def optional_listen(self, value: object, key: str) -> str:
        return self.listen(value, key) if value != "" else ""

    def group(self, value: object, key: str) -> str:
        text = self.string(value, key)
        if "\x00" in text or text != text.strip():
            self.fail(key, "a group name (or empty for none)", describe(value))
        return text
