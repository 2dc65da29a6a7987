"""Network addresses as text: ``host:port``, with an IPv6 host in brackets (``[v6]:port``).

``format_address`` writes what ``parse_address`` reads back; config files, the registry's
records and log lines all use this one spelling.
"""

from __future__ import annotations

__all__ = ["format_address", "parse_address"]


def format_address(address: tuple[str, int]) -> str:
    """``host:port`` of ``(host, port)``, with an IPv6 host in brackets: what
    ``parse_address`` reads back."""
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_address(text: str) -> tuple[str, int]:
    """Split ``"host:port"`` (or ``"[v6]:port"``) into ``(host, port)``; port 0..65535.

    Raises ``ValueError`` saying what is wrong.
    """
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"bad address {text!r}: expected [host]:port")
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"bad address {text!r}: expected host:port")
        if ":" in host:
            raise ValueError(f"bad address {text!r}: write an IPv6 host as [host]:port")
    if not host:
        raise ValueError(f"bad address {text!r}: empty host")
    if not port_text.isascii() or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"bad address {text!r}: port must be a number 0..65535")
    return host, int(port_text)
