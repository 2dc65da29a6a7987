"""The registry's signed strings (SPEC sections 4, 11 and 17): what a node signs for each
registry call, spelled once. No I/O; imports nothing.

``handshake_challenge`` (``request_handshake``'s string, shared with port 444's Go-style
signature) stays with the port-444 codec in ``messages``.
"""

from __future__ import annotations

__all__ = [
    "heartbeat_challenge",
    "poll_challenge",
    "register_challenge",
    "report_trust_challenge",
    "resolve_challenge",
    "respond_challenge",
    "revoke_trust_challenge",
    "set_hostname_challenge",
    "set_visibility_challenge",
]


def respond_challenge(node_id: int, peer_id: int) -> bytes:
    """``respond:<N>:<P>``: registry ``respond_handshake`` by N about requester P."""
    return f"respond:{node_id}:{peer_id}".encode()


def poll_challenge(node_id: int) -> bytes:
    """``poll_handshakes:<N>``: registry ``poll_handshakes`` by N."""
    return f"poll_handshakes:{node_id}".encode()


def heartbeat_challenge(node_id: int) -> bytes:
    """``heartbeat:<N>``: registry ``heartbeat`` by N."""
    return f"heartbeat:{node_id}".encode()


def report_trust_challenge(node_id: int, peer_id: int) -> bytes:
    """``report_trust:<N>:<P>``: registry ``report_trust`` of N with P."""
    return f"report_trust:{node_id}:{peer_id}".encode()


def revoke_trust_challenge(node_id: int, peer_id: int) -> bytes:
    """``revoke_trust:<N>:<P>``: registry ``revoke_trust`` of N with P."""
    return f"revoke_trust:{node_id}:{peer_id}".encode()


def resolve_challenge(requester_id: int, target_id: int) -> bytes:
    """``resolve:<Q>:<T>``: registry ``resolve`` of T by requester Q."""
    return f"resolve:{requester_id}:{target_id}".encode()


def set_visibility_challenge(node_id: int) -> bytes:
    """``set_visibility:<N>``: registry ``set_visibility`` by N."""
    return f"set_visibility:{node_id}".encode()


def set_hostname_challenge(node_id: int) -> bytes:
    """``set_hostname:<N>``: registry ``set_hostname`` by N."""
    return f"set_hostname:{node_id}".encode()


def register_challenge(public_key_b64: str, timestamp: int) -> bytes:
    """``register:<public key b64>:<timestamp>``: a signed registry ``register`` (SPEC 17)."""
    return f"register:{public_key_b64}:{timestamp}".encode()
