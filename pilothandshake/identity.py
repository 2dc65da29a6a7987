"""The node's Ed25519 identity and the strict key/signature codecs (SPEC section 4).

The identity file is the Go Pilot daemon's format, so an existing node identity can be
reused: JSON ``{"private_key": b64(seed32 + pub32), "public_key": b64(pub32)}``, mode 0600.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import tempfile

import nacl.exceptions
import nacl.signing

from . import fsutil
from .errors import StoreError
from .messages import decode_b64

__all__ = [
    "KEY_SIZE",
    "SIGNATURE_SIZE",
    "Identity",
    "b64encode",
    "decode_key",
    "decode_signature",
    "fingerprint",
    "full_fingerprint",
    "verify",
]

KEY_SIZE = 32
SIGNATURE_SIZE = 64
_SEED_SIZE = 32


def b64encode(data: bytes) -> str:
    """Standard padded base64 of ``data``, as text."""
    return base64.b64encode(data).decode("ascii")


def _decode_exact(text: object, size: int) -> bytes | None:
    raw = decode_b64(text)
    return raw if raw is not None and len(raw) == size else None


def decode_key(text: object) -> bytes | None:
    """The 32 key bytes of strict standard base64 ``text``; None for anything else."""
    return _decode_exact(text, KEY_SIZE)


def decode_signature(text: object) -> bytes | None:
    """The 64 signature bytes of strict standard base64 ``text``; None for anything else."""
    return _decode_exact(text, SIGNATURE_SIZE)


def fingerprint(public_key_b64: str) -> str:
    """First 16 hex digits of the SHA-256 of the key bytes (for tables); "" if not a key."""
    return full_fingerprint(public_key_b64)[:16]


def full_fingerprint(public_key_b64: str) -> str:
    """The hex SHA-256 of the key bytes (what ``approve --new-key`` names, SPEC 17); "" if
    not a key."""
    raw = decode_key(public_key_b64)
    return hashlib.sha256(raw).hexdigest() if raw is not None else ""


def verify(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is a valid Ed25519 signature of ``message`` by ``public_key``.

    Never raises: a wrong-length key or signature is simply not valid.
    """
    if len(public_key) != KEY_SIZE or len(signature) != SIGNATURE_SIZE:
        return False
    try:
        nacl.signing.VerifyKey(public_key).verify(message, signature)
    except (nacl.exceptions.CryptoError, ValueError, TypeError):
        return False
    return True


class Identity:
    """An Ed25519 signing identity, optionally backed by a file (``path``; "" in memory)."""

    def __init__(self, signing_key: nacl.signing.SigningKey, path: str = "") -> None:
        """Wrap ``signing_key``; ``path`` names the file it came from, "" for none."""
        self._signing_key = signing_key
        self.path = path
        self.public_key: bytes = bytes(signing_key.verify_key)
        self.public_key_b64 = b64encode(self.public_key)

    @classmethod
    def generate(cls) -> Identity:
        """A fresh in-memory identity."""
        return cls(nacl.signing.SigningKey.generate())

    @classmethod
    def load_or_create(cls, path: str) -> Identity:
        """Load the identity file at ``path``, creating it (and its directory, mode 0700)
        when missing. A file that exists but is malformed raises ``StoreError`` naming the
        path and the problem; it is never replaced, since that would change the node's key.
        """
        try:
            # Never through a link: a planted identity.json link must not pick the key.
            data = fsutil.read_file(path)
        except FileNotFoundError:
            return cls._create(path)
        except OSError as exc:
            raise StoreError(f"{path}: cannot read identity: {exc}", path=path) from exc
        return cls(_parse_identity(path, data), path)

    @classmethod
    def _create(cls, path: str) -> Identity:
        signing_key = nacl.signing.SigningKey.generate()
        public = bytes(signing_key.verify_key)
        content = json.dumps(
            {
                "private_key": b64encode(bytes(signing_key) + public),
                "public_key": b64encode(public),
            },
            indent=2,
        ).encode("ascii")
        directory = os.path.dirname(path) or "."
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            # mkstemp creates the file with mode 0600, so the key is never readable by others.
            fd, temp = tempfile.mkstemp(dir=directory, prefix=".identity-", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(content)
                    handle.flush()
                    os.fsync(handle.fileno())
                created = _publish(temp, path)
            finally:
                _remove_quietly(temp)
            fsutil.fsync_directory(directory)
        except OSError as exc:
            raise StoreError(f"{path}: cannot create identity: {exc}", path=path) from exc
        if not created:
            # Another process created it first: both must end up with the same key.
            return cls.load_or_create(path)
        return cls(signing_key, path)

    def sign(self, message: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``message``."""
        return bytes(self._signing_key.sign(message).signature)


def _parse_identity(path: str, data: bytes) -> nacl.signing.SigningKey:
    def bad(problem: str) -> StoreError:
        return StoreError(f"{path}: invalid identity file: {problem}", path=path)

    try:
        obj = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise bad(f"not JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise bad("not a JSON object")
    private = decode_b64(obj.get("private_key"))
    if private is None or len(private) != _SEED_SIZE + KEY_SIZE:
        raise bad("private_key must be base64 of 64 bytes (seed then public key)")
    public = decode_key(obj.get("public_key"))
    if public is None:
        raise bad("public_key must be base64 of 32 bytes")
    signing_key = nacl.signing.SigningKey(private[:_SEED_SIZE])
    derived = bytes(signing_key.verify_key)
    if derived != private[_SEED_SIZE:]:
        raise bad("private_key's public half does not match its seed")
    if derived != public:
        raise bad("public_key does not match private_key")
    return signing_key


def _publish(temp: str, path: str) -> bool:
    """Move ``temp`` to ``path`` unless ``path`` exists; False if it already did."""
    try:
        # link() never overwrites, so two first starts racing cannot swap keys under each other.
        os.link(temp, path)
    except FileExistsError:
        return False
    except OSError:
        # Filesystems without hard links: an atomic rename is the best left.
        os.replace(temp, path)
    return True


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
