"""``ConnectionSlots``: the one set of connection caps of port 444, pilot-registryd and the
control socket (SPEC 15, 17)."""

from __future__ import annotations

import threading
from collections.abc import Iterable

from pilothandshake.connection_slots import SOURCE_CAP, TOTAL_CAP, ConnectionSlots


def test_a_source_gets_at_most_its_cap_and_others_still_get_in() -> None:
    slots: ConnectionSlots[str] = ConnectionSlots(total=10, per_source=2)
    assert slots.take("a1", "10.0.0.1").admitted
    assert slots.take("a2", "10.0.0.1").admitted
    refused = slots.take("a3", "10.0.0.1")
    assert refused.refused == SOURCE_CAP and refused.from_source == 2 and refused.active == 2
    admitted = slots.take("b1", "10.0.1.1")
    assert admitted.admitted and admitted.active == 3 and admitted.from_source == 1
    slots.release("a1")
    assert slots.take("a3", "10.0.0.1").admitted


def test_the_total_cap_refuses_without_a_victim() -> None:
    slots: ConnectionSlots[int] = ConnectionSlots(total=2)
    assert slots.take(1).admitted and slots.take(2).admitted
    answer = slots.take(3)
    assert answer.refused == TOTAL_CAP and answer.evicted is None and len(slots) == 2


def test_at_the_total_cap_a_victim_gives_up_its_slot() -> None:
    slots: ConnectionSlots[str] = ConnectionSlots(total=2, per_source=5)
    slots.take("old", "10.0.0.1")
    slots.take("new", "10.0.1.1")
    seen: list[list[str]] = []

    def oldest(held: Iterable[str]) -> str | None:
        seen.append(list(held))
        return seen[-1][0]

    answer = slots.take("newcomer", "10.0.2.1", oldest)
    assert answer.admitted and answer.evicted == "old"
    assert seen == [["old", "new"]]  # offered oldest first
    slots.release("old")  # the victim's handler ends later: nothing more to give back
    assert len(slots) == 2
    assert slots.take("x", "10.0.0.1", lambda held: None).refused == TOTAL_CAP


def test_a_slot_is_given_back_once() -> None:
    slots: ConnectionSlots[str] = ConnectionSlots(total=5, per_source=1)
    slots.take("a", "s")
    slots.release("a")
    slots.release("a")
    slots.release("never taken")
    assert len(slots) == 0
    assert slots.take("b", "s").from_source == 1


def test_a_slot_set_aside_is_free_for_others_and_taken_again_above_the_cap() -> None:
    slots: ConnectionSlots[str] = ConnectionSlots(total=1, per_source=1)
    slots.take("poll", "s")
    with slots.set_aside("poll"):
        assert len(slots) == 0
        assert slots.take("other", "s").admitted
    assert len(slots) == 2  # above the cap: the held poll came back
    assert slots.take("third", "t").refused == TOTAL_CAP


def test_caps_changed_live_apply_to_the_next_connection() -> None:
    slots: ConnectionSlots[int] = ConnectionSlots(total=1, per_source=1)
    slots.take(1, "s")
    slots.total, slots.per_source = 3, 2
    assert slots.take(2, "s").admitted


def test_wait_empty_returns_when_the_last_slot_is_given_back() -> None:
    slots: ConnectionSlots[int] = ConnectionSlots(total=4)
    slots.take(1)
    assert not slots.wait_empty(0.05)
    timer = threading.Timer(0.1, slots.release, (1,))
    timer.start()
    try:
        assert slots.wait_empty(30.0)
    finally:
        timer.cancel()
