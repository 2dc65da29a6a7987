"""The daemon's state directory (the identity file's): the checks before the daemon uses it,
and ``NodeIdMemory``, the node ID the registry assigned last time, kept there.

Whoever can write the state directory can swap the key or plant links, so the daemon refuses
one (or an identity file) that another user owns or that others can write, and an identity
file others can read (like OpenSSH's StrictModes).
"""

from __future__ import annotations

import json
import logging
import os
import stat
from typing import Any, Callable

from . import fsutil
from .errors import StoreError
from .events import NODE_ID_CHANGED

log = logging.getLogger(__name__)

__all__ = [
    "NODE_FILE",
    "NodeIdMemory",
    "check_identity_mode",
    "prepare_state_directory",
]

# Beside the identity: the node ID the registry gave this key last time, and which registry.
NODE_FILE = "node.json"


class NodeIdMemory:
    """The node ID the registry assigned last time, kept in ``node.json`` beside the
    identity: a registry that forgot its nodes hands out IDs anew, and every trust record
    naming this node elsewhere then points at another machine, silently.

    Until the registry answers, the daemon goes by the remembered ID (``remembered``): a
    node restarted during a registry outage must still sign as itself, and check the
    signatures addressed to it (SPEC 4's challenge names the receiver), or it drops every
    message and its peers' answers are lost.

    ``check(registry, node_id)`` compares a fresh assignment with the remembered one of the
    same registry: a change is logged as an ERROR and published as ``node.id_changed``;
    the new ID is then remembered.
    """

    def __init__(self, path: str, publish: Callable[[str, dict[str, Any]], None]) -> None:
        """Read ``path`` (missing or unreadable: nothing remembered, the next check writes)."""
        self.path = path
        self._publish = publish
        self._registry, self._node_id = "", 0
        try:
            remembered = json.loads(fsutil.read_file(path))
            registry, node_id = remembered["registry"], remembered["node_id"]
        except FileNotFoundError:
            return
        except (OSError, ValueError, TypeError, KeyError, RecursionError) as exc:
            log.warning("ignoring %s: %s", path, exc)
            return
        if isinstance(registry, str) and type(node_id) is int:
            self._registry, self._node_id = registry, node_id

    def remembered(self, registry: str) -> int:
        """The ID ``registry`` gave this node last time; 0 when none is remembered."""
        return self._node_id if registry == self._registry else 0

    def check(self, registry: str, node_id: int) -> None:
        """Note that ``registry`` assigned ``node_id`` to this node."""
        old = self._node_id if registry == self._registry else 0
        if old == node_id:
            return
        if old:
            log.error(
                "registry %s gave this node ID %d, but it was node %d before: the registry "
                "lost its nodes (run it with a store), and peers that trusted node %d now "
                "name another machine by that ID",
                registry,
                node_id,
                old,
                old,
            )
            self._publish(NODE_ID_CHANGED, {"old": old, "new": node_id})
        self._registry, self._node_id = registry, node_id
        try:
            data = json.dumps({"registry": registry, "node_id": node_id}).encode()
            fsutil.write_atomically(self.path, data + b"\n")
        except OSError as exc:
            log.error("cannot remember node ID %d in %s: %s", node_id, self.path, exc)


def prepare_state_directory(identity: str) -> None:
    """Create the state directory (the identity file's) mode 0700 when missing, and refuse
    one, or an identity file, that another user owns or that others can write: whoever
    can write there can swap the key or plant links (like OpenSSH's StrictModes)."""
    directory = os.path.dirname(identity) or "."
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise StoreError(
            f"cannot create state directory {directory}: {exc}", path=directory
        ) from exc
    fsutil.check_private(directory, "state directory")
    fsutil.check_private(identity, "identity file")


def check_identity_mode(path: str) -> None:
    """Refuse an identity file others can read: its private key would not be private."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StoreError(f"{path}: cannot read identity: {exc}", path=path) from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise StoreError(
            f"identity file {path} is readable by group or others (mode "
            f"{stat.S_IMODE(mode):04o}); run: chmod 600 {path}",
            path=path,
        )
