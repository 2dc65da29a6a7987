"""fsutil: symlink-safe opens, atomic replace, stale temporaries, locks, StrictModes checks."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from pilothandshake import fsutil
from pilothandshake.errors import StoreError


def test_read_file_refuses_a_symbolic_link(tmp_path: Path) -> None:
    target = tmp_path / "secret"
    target.write_bytes(b"not yours")
    link = tmp_path / "identity.json"
    link.symlink_to(target)
    with pytest.raises(OSError, match="symbolic link"):
        fsutil.read_file(str(link))


def test_open_nofollow_does_not_create_or_chmod_through_a_link(tmp_path: Path) -> None:
    target = tmp_path / "victim"
    target.write_bytes(b"keep me")
    target.chmod(0o644)
    link = tmp_path / "trust.json.journal"
    link.symlink_to(target)
    with pytest.raises(OSError):
        fsutil.open_nofollow(str(link), os.O_RDWR | os.O_CREAT)
    assert target.read_bytes() == b"keep me"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_write_atomically_replaces_a_link_itself_not_its_target(tmp_path: Path) -> None:
    target = tmp_path / "victim"
    target.write_bytes(b"keep me")
    path = tmp_path / "trust.json"
    path.symlink_to(target)
    fsutil.write_atomically(str(path), b"{}")
    assert not path.is_symlink()
    assert path.read_bytes() == b"{}"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert target.read_bytes() == b"keep me"
    assert sorted(os.listdir(tmp_path)) == ["trust.json", "victim"]


def test_remove_stale_temporaries_removes_only_this_files_temporaries(tmp_path: Path) -> None:
    path = tmp_path / "trust.json"
    (tmp_path / ".trust.json.abc.tmp").write_bytes(b"x")
    (tmp_path / ".store.json.abc.tmp").write_bytes(b"x")
    fsutil.remove_stale_temporaries(str(path))
    assert sorted(os.listdir(tmp_path)) == [".store.json.abc.tmp"]


def test_hold_lock_second_holder_fails_naming_what_is_guarded(tmp_path: Path) -> None:
    path = str(tmp_path / "trust.json.lock")
    first = fsutil.hold_lock(path, f"identity directory {tmp_path}")
    try:
        with pytest.raises(StoreError, match=f"identity directory {tmp_path} is in use"):
            fsutil.hold_lock(path, f"identity directory {tmp_path}")
    finally:
        first.release()
    fsutil.hold_lock(path, "again").release()


def test_hold_lock_refuses_a_planted_link(tmp_path: Path) -> None:
    target = tmp_path / "victim"
    target.write_bytes(b"keep me")
    link = tmp_path / "trust.json.lock"
    link.symlink_to(target)
    with pytest.raises(StoreError, match="symbolic link"):
        fsutil.hold_lock(str(link), "x")
    assert target.read_bytes() == b"keep me"


def test_check_private_refuses_group_or_other_writable(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    fsutil.check_private(str(state), "state directory")
    state.chmod(0o777)
    with pytest.raises(StoreError) as caught:
        fsutil.check_private(str(state), "state directory")
    message = str(caught.value)
    assert f"state directory {state} is writable by group or others" in message
    assert f"chmod go-w {state}" in message


def test_check_private_checks_a_links_target(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    real.chmod(0o757)
    link = tmp_path / "state"
    link.symlink_to(real)
    with pytest.raises(StoreError, match="writable by group or others"):
        fsutil.check_private(str(link), "state directory")


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_check_private_refuses_another_owner(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.chown(state, 12345, -1)
    # Root may use its own files and root's; a file of uid 12345 is neither when we are root.
    with pytest.raises(StoreError, match=r"owned by uid 12345.*run: chown 0"):
        fsutil.check_private(str(state), "state directory")


def test_check_private_passes_a_missing_path(tmp_path: Path) -> None:
    fsutil.check_private(str(tmp_path / "absent"), "state directory")


def test_letting_go_of_a_lock_touches_it(tmp_path: Path) -> None:
    """``status --wait`` started just after a daemon exited counts from the release (the
    daemon's start may be long before on a loaded machine)."""
    path = str(tmp_path / "trust.json.lock")
    lock = fsutil.hold_lock(path, "test")
    os.utime(path, (1_000_000, 1_000_000))  # taken long ago
    fsutil.release_lock(lock)
    assert not lock.is_locked
    assert time.time() - os.stat(path).st_mtime < 60
