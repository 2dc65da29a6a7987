"""Trust records kept in step with the registry (SPEC 6, issue 11 item 7).

A trust record without a valid key gets the key the registry binds (backfill); a record
whose node ID the registry now binds to another key is in conflict: it neither trusts nor
pins until the operator approves the node again or removes it. ``Reconcile`` looks at every
record once at start (``check_records``), at a keyless record after its grant
(``backfill``), and at a node's record whenever a lookup is checked against it
(``checked``, for ``Intake``). What it finds changes state only through ``decide_backfill``
and ``decide_conflict``, decided like everything else (decide, apply, commit, announce).
Registry calls are made without the lock (SPEC 16).
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from ..identity import decode_key
from ..runtime import RegistryClient, Runtime
from .binding import Binding, Checked, answer_key
from .decide import Decision, decide_backfill, decide_conflict
from .state import State

__all__ = ["Reconcile"]

log = logging.getLogger(__name__)


class Reconcile:
    """Compares the trust records of ``state`` with ``runtime``'s registry, through the
    Manager's ``binding`` (cache and re-ask throttle); ``decide`` is the Manager's."""

    def __init__(
        self,
        runtime: Runtime,
        state: State,
        binding: Binding,
        decide: Callable[..., Decision | None],
    ) -> None:
        """Reconcile for the Manager that owns these."""
        self._rt = runtime
        self._state = state
        self._binding = binding
        self._decide = decide

    def checked(self, registry: RegistryClient, node: int, key: bytes | None) -> Checked:
        """The registry's answer for ``node``, re-asked when it differs from ``key`` or the
        trust record (SPEC 5); a record the registry still contradicts becomes a conflict."""
        record_key = self._record_key(node)
        checked = self._binding.checked(registry, node, key, record_key)
        if checked.conflict is not None and record_key is not None:
            self._decide(decide_conflict, node, record_key, checked.conflict)
        return checked

    def _record_key(self, node: int) -> bytes | None:
        """The valid key of ``node``'s trust record not in conflict, else None."""
        with self._state.lock:
            view = self._state.view()
            record = view.state.trusted.get(node)
            if record is None or node in view.conflicts:
                return None
            return decode_key(record.public_key)

    def backfill(self, node: int) -> None:
        """Fill in the key of a trust record that has none from the registry (SPEC 6)."""
        registry = self._rt.registry()
        if registry is None:
            return
        # Fresh: a cached answer is likely the very one that had no key.
        key = answer_key(self._binding.lookup(registry, node, fresh=True))
        if key is None:
            log.debug("no key to backfill for node %d", node)
            return
        self._decide(decide_backfill, node, key)

    def check_records(self, stopping: threading.Event) -> None:
        """At start, with a registry: backfill the keys of keyless trust records, and look
        up every other record for a conflict with the registry's binding, until
        ``stopping`` is set."""
        registry = self._rt.registry()
        if registry is None:
            return
        with self._state.lock:
            trusted = self._state.view().state.trusted
            records = [(n, decode_key(r.public_key)) for n, r in trusted.items()]
        for node, key in records:
            if stopping.is_set():
                return
            if key is None:
                self.backfill(node)
            else:
                self.checked(registry, node, None)
