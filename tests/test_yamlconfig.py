"""``FieldParser``: the field checks both configs share, raising the first problem or, while
``collecting``, noting every problem and going on with defaults."""

from __future__ import annotations

import pytest

from pilothandshake.errors import ConfigError
from pilothandshake.yamlconfig import FieldParser


def test_a_parser_raises_the_first_problem_naming_the_file_and_key() -> None:
    parser = FieldParser("/etc/x.yaml")
    with pytest.raises(ConfigError, match=r"^/etc/x.yaml: limits.bogus: unknown key"):
        parser.section({"a": 1, "bogus": 2}, "limits", ("a",))
    with pytest.raises(ConfigError, match=r"^/etc/x.yaml: limits.a: expected an integer"):
        parser.get({"a": "one"}, "limits", "a", 5, parser.count)
    assert parser.problems == []


def test_while_collecting_every_problem_is_noted_and_defaults_stand_in() -> None:
    parser = FieldParser("x.yaml")
    parser.collecting = True
    section = parser.section({"a": "one", "bogus": 2, "b": 3}, "limits", ("a", "b"))
    assert section == {"a": "one", "b": 3}
    assert parser.get(section, "limits", "a", 5, parser.count) == 5
    assert parser.get(section, "limits", "b", 5, parser.count) == 3
    assert parser.section([1], "trust", ("x",)) == {}
    assert parser.problems == [
        "x.yaml: limits.bogus: unknown key (expected one of: a, b)",
        "x.yaml: limits.a: expected an integer 1..2147483647, got 'one'",
        "x.yaml: trust: expected a mapping, got a list",
    ]
