"""The fields of a registry request: each read with its check, refusing with the reason.

``Refused`` carries why a request is refused; client-supplied values appear in the reason
only through ``quote`` (escaped, cut short), so a reason is safe in a log line.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, NoReturn

from ..addresses import format_address, parse_address
from ..messages import MAX_NODE_ID
from .ratelimit import quote

__all__ = [
    "FAILED",
    "Refused",
    "address_text",
    "bool_field",
    "hostname_problem",
    "node_field",
    "real_addr",
    "refuse",
    "str_field",
]

FAILED = "request failed"
_MAX_ADDR_LEN = 512
_HOSTNAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_RESERVED_HOSTNAMES = frozenset({"localhost", "backbone", "broadcast"})
# A host others dial: an IP literal or DNS-name characters (never a newline or a space).
_HOST = re.compile(r"[A-Za-z0-9._-]{1,253}")


class Refused(Exception):
    """A request the registry refuses: ``cause`` is logged; ``answer`` (default: the
    cause) is what the client reads."""

    def __init__(self, cause: str, answer: str = "") -> None:
        super().__init__(cause)
        self.answer = answer or cause


def refuse(cause: str, answer: str = "") -> NoReturn:
    """Refuse the request being handled (see ``Refused``)."""
    raise Refused(cause, answer)


def hostname_problem(name: str) -> str:
    """Why ``name`` cannot be a hostname (SPEC 11), or "" when it can."""
    if not _HOSTNAME.fullmatch(name):
        return (
            f"hostname {quote(name)} is invalid: 1-63 lowercase letters, digits and hyphens, "
            "starting and ending with a letter or digit"
        )
    if name in _RESERVED_HOSTNAMES:
        return f"hostname {name!r} is reserved"
    return ""


def node_field(request: dict[str, Any], name: str) -> int:
    """``request[name]`` as a node ID 1..MAX_NODE_ID."""
    value = request.get(name)
    if type(value) is not int or not 0 < value <= MAX_NODE_ID:
        refuse(f"field {name!r} is not a node ID: {quote(value)}")
    return value


def str_field(request: dict[str, Any], name: str, default: str | None = None) -> str:
    """``request[name]`` as a string (``default`` when absent, if given)."""
    value = request.get(name, default)
    if not isinstance(value, str):
        refuse(f"field {name!r} is not a string: {quote(value)}")
    return value


def bool_field(request: dict[str, Any], name: str) -> bool:
    """``request[name]`` as a boolean."""
    value = request.get(name)
    if not isinstance(value, bool):
        refuse(f"field {name!r} is not a boolean: {quote(value)}")
    return value


def real_addr(listen_addr: str, source: str) -> str:
    """The address others dial: ``listen_addr``, with an unspecified host replaced by the
    connection's source address (a node listening on 0.0.0.0 is reachable where it came
    from)."""
    if len(listen_addr) > _MAX_ADDR_LEN:
        refuse("listen_addr is too long")
    # Go nodes send ":port" for "all interfaces"; parse_address wants a host.
    text = "0.0.0.0" + listen_addr if listen_addr.startswith(":") else listen_addr
    try:
        host, port = parse_address(text)
    except ValueError:
        refuse(f"listen_addr {quote(listen_addr)} is not host:port")
    try:
        unspecified = ipaddress.ip_address(host).is_unspecified
    except ValueError:
        if not _HOST.fullmatch(host):
            refuse(f"listen_addr {quote(listen_addr)} has an invalid host")
        unspecified = False
    return format_address((source if unspecified else host, port))


def address_text(node_id: int) -> str:
    """The Pilot virtual address of a node on the backbone: ``0:0000.XXXX.XXXX``."""
    return f"0:0000.{node_id >> 16:04X}.{node_id & 0xFFFF:04X}"
