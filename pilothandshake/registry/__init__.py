"""The Pilot registry: the wire-protocol client and the embedded server (SPEC section 11)."""

from .client import Client

__all__ = ["Client"]
