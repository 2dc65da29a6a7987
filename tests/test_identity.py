"""The Ed25519 identity file (Go format) and the strict key/signature codecs (SPEC 4)."""

from __future__ import annotations

import base64
import json
import os
import stat
import threading
from pathlib import Path

import pytest

from pilothandshake.errors import StoreError
from pilothandshake.identity import (
    Identity,
    b64encode,
    decode_key,
    decode_signature,
    fingerprint,
    verify,
)

# RFC 8032 section 7.1, test 1: a known seed, its public key and its signature of b"".
RFC_SEED = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
RFC_PUBLIC = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
RFC_SIGNATURE = bytes.fromhex(
    "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
)


def write_identity(path: Path, private: bytes, public: bytes) -> None:
    path.write_text(
        json.dumps({"private_key": b64encode(private), "public_key": b64encode(public)})
    )


def test_load_or_create_creates_a_go_format_file_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "new" / "dir" / "identity.json"
    ident = Identity.load_or_create(str(path))
    assert ident.path == str(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    content = json.loads(path.read_text())
    assert set(content) == {"private_key", "public_key"}
    private = base64.b64decode(content["private_key"], validate=True)
    assert len(private) == 64 and private[32:] == ident.public_key
    assert base64.b64decode(content["public_key"], validate=True) == ident.public_key
    assert ident.public_key_b64 == content["public_key"]
    assert [p.name for p in path.parent.iterdir()] == ["identity.json"]  # no temp file left


def test_load_or_create_loads_the_same_identity_again(tmp_path: Path) -> None:
    path = str(tmp_path / "identity.json")
    first = Identity.load_or_create(path)
    before = Path(path).read_bytes()
    second = Identity.load_or_create(path)
    assert second.public_key == first.public_key
    assert Path(path).read_bytes() == before
    signature = second.sign(b"msg")
    assert verify(first.public_key, b"msg", signature)


def test_load_reads_an_existing_go_identity_and_signs_like_ed25519(tmp_path: Path) -> None:
    path = tmp_path / "identity.json"
    write_identity(path, RFC_SEED + RFC_PUBLIC, RFC_PUBLIC)
    ident = Identity.load_or_create(str(path))
    assert ident.public_key == RFC_PUBLIC
    assert ident.sign(b"") == RFC_SIGNATURE


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"{not json", "not JSON"),
        (b"", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[]", "not a JSON object"),
        (b'{"public_key": "AAAA"}', "private_key must be base64 of 64 bytes"),
        (
            json.dumps({"private_key": b64encode(RFC_SEED), "public_key": b64encode(RFC_PUBLIC)}),
            "private_key must be base64 of 64 bytes",
        ),
        (
            json.dumps({"private_key": "not base64", "public_key": b64encode(RFC_PUBLIC)}),
            "private_key must be base64 of 64 bytes",
        ),
        (
            json.dumps({"private_key": b64encode(RFC_SEED + RFC_PUBLIC), "public_key": "AAAA"}),
            "public_key must be base64 of 32 bytes",
        ),
        (
            json.dumps({"private_key": b64encode(RFC_SEED + RFC_PUBLIC)}),
            "public_key must be base64 of 32 bytes",
        ),
        (
            json.dumps(
                {"private_key": b64encode(RFC_SEED + bytes(32)), "public_key": b64encode(bytes(32))}
            ),
            "public half does not match its seed",
        ),
        (
            json.dumps(
                {
                    "private_key": b64encode(RFC_SEED + RFC_PUBLIC),
                    "public_key": b64encode(Identity.generate().public_key),
                }
            ),
            "public_key does not match private_key",
        ),
    ],
)
def test_malformed_identity_raises_store_error_naming_path_and_is_kept(
    tmp_path: Path, content: bytes | str, problem: str
) -> None:
    path = tmp_path / "identity.json"
    raw = content.encode() if isinstance(content, str) else content
    path.write_bytes(raw)
    with pytest.raises(StoreError) as caught:
        Identity.load_or_create(str(path))
    assert str(path) in str(caught.value)
    assert problem in str(caught.value)
    assert path.read_bytes() == raw  # never regenerated


def test_unreadable_identity_raises_store_error_naming_path(tmp_path: Path) -> None:
    path = tmp_path / "identity.json"
    path.mkdir()  # a directory where the file should be
    with pytest.raises(StoreError, match="cannot read identity"):
        Identity.load_or_create(str(path))


def test_uncreatable_identity_raises_store_error_naming_path(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    path = blocker / "identity.json"  # parent is a regular file
    with pytest.raises(StoreError) as caught:
        Identity.load_or_create(str(path))
    assert str(path) in str(caught.value) and "cannot" in str(caught.value)


def test_generate_is_in_memory_and_fresh() -> None:
    first, second = Identity.generate(), Identity.generate()
    assert first.path == ""
    assert len(first.public_key) == 32 and first.public_key != second.public_key


def test_sign_and_verify() -> None:
    ident, other = Identity.generate(), Identity.generate()
    signature = ident.sign(b"handshake:1:2")
    assert len(signature) == 64
    assert verify(ident.public_key, b"handshake:1:2", signature)
    assert not verify(ident.public_key, b"handshake:1:3", signature)
    assert not verify(other.public_key, b"handshake:1:2", signature)
    flipped = bytes([signature[0] ^ 1]) + signature[1:]
    assert not verify(ident.public_key, b"handshake:1:2", flipped)


@pytest.mark.parametrize(
    ("key", "signature"),
    [(bytes(31), bytes(64)), (bytes(32), bytes(63)), (b"", b""), (bytes(32), bytes(64))],
)
def test_verify_returns_false_for_malformed_input(key: bytes, signature: bytes) -> None:
    assert verify(key, b"msg", signature) is False


def test_decode_key_and_signature_require_exact_length_strict_base64() -> None:
    key, sig = bytes(range(32)), bytes(range(64))
    assert decode_key(b64encode(key)) == key
    assert decode_signature(b64encode(sig)) == sig
    assert decode_key(b64encode(sig)) is None
    assert decode_signature(b64encode(key)) is None
    for bad in ["", b64encode(key).rstrip("="), b64encode(key) + "\n", "!" * 44, None, 32]:
        assert decode_key(bad) is None
        assert decode_signature(bad) is None


def test_fingerprint_is_short_hex_of_the_key_bytes_and_empty_for_non_keys() -> None:
    ident = Identity.generate()
    print_ = fingerprint(ident.public_key_b64)
    assert len(print_) == 16 and int(print_, 16) >= 0
    assert print_ != fingerprint(Identity.generate().public_key_b64)
    assert fingerprint("") == "" and fingerprint("AAAA") == ""


def test_created_file_is_private_even_with_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        path = tmp_path / "identity.json"
        Identity.load_or_create(str(path))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_concurrent_first_starts_agree_on_one_identity(tmp_path: Path) -> None:
    path = str(tmp_path / "identity.json")
    keys: list[bytes] = []
    barrier = threading.Barrier(8, timeout=5)

    def start() -> None:
        barrier.wait()
        keys.append(Identity.load_or_create(path).public_key)

    threads = [threading.Thread(target=start) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=5)
    assert len(keys) == 8 and set(keys) == {Identity.load_or_create(path).public_key}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["identity.json"]
