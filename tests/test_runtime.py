"""``runtime``: the one own-node check (``is_own_node``) that every part asks."""

from __future__ import annotations

import pytest

from pilothandshake.runtime import is_own_node


@pytest.mark.parametrize(
    ("node_id", "own", "expected"),
    [(7, 7, True), (8, 7, False), (0, 0, False), (7, 0, False)],
)
def test_a_node_is_ours_only_once_our_id_is_known(node_id: int, own: int, expected: bool) -> None:
    assert is_own_node(node_id, own) is expected
