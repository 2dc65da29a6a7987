"""Installing ``pilot-handshaked`` as a systemd service: ``pilot-handshaked --install-systemd``.

The unit, the sysusers file and the example config ship inside the package (setup.py copies
them from the checkout's ``conf/`` into ``pilothandshake/conf/`` of the wheel). ``install``
writes them where systemd and the unit look, under ``prefix`` (``/`` on a real system, a
scratch directory to try it out):

- ``etc/systemd/system/pilot-handshaked.service``, its ``ExecStart`` pointing at the
  ``pilot-handshaked`` of this installation (the one beside ``sys.executable``, e.g. a venv's);
- ``etc/sysusers.d/pilot-handshake.conf``, the system user the unit runs as;
- ``etc/pilot-handshake/config.yaml``, the example config, only when there is none: an
  operator's config is never overwritten;
- ``usr/local/bin/pilot-handshakectl`` and ``pilot-handshaked``, links to this
  installation's, so operators find them on their PATH (left alone when something else that
  is not a link is there).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .constants import DEFAULT_CONFIG_PATH

__all__ = ["UNIT_NAME", "install", "shipped_file"]

UNIT_NAME = "pilot-handshaked.service"
SYSUSERS_NAME = "pilot-handshake.sysusers"
EXAMPLE_NAME = "example.yaml"
# The ExecStart of the shipped unit: the path the README's recipe installs to.
SHIPPED_EXEC = "/opt/pilot-handshake/bin/pilot-handshaked"


def shipped_file(name: str) -> Path:
    """A file of ``conf/`` as installed with the package: in the wheel it is package data;
    in a checkout (an editable install, or ``bin/`` run from the source) it is ``conf/``."""
    packaged = Path(__file__).resolve().parent / "conf" / name
    if packaged.is_file():
        return packaged
    return Path(__file__).resolve().parents[1] / "conf" / name


def _under(prefix: str, path: str) -> Path:
    return Path(prefix) / path.lstrip("/")


def _write(path: Path, text: str, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    temporary.chmod(mode)
    os.replace(temporary, path)


def install(prefix: str = "/", bindir: str | None = None) -> list[str]:
    """Install the unit, the sysusers file, the example config (unless a config exists) and
    the links to the programs under ``prefix``; returns one line per file saying what
    was done. ``bindir`` holds this installation's scripts (default: beside
    ``sys.executable``). Raises ``OSError`` when a file cannot be written."""
    scripts = Path(bindir) if bindir is not None else Path(sys.executable).parent
    daemon = scripts / "pilot-handshaked"
    done = []

    unit = _under(prefix, f"/etc/systemd/system/{UNIT_NAME}")
    text = shipped_file(UNIT_NAME).read_text(encoding="utf-8")
    _write(unit, text.replace(f"ExecStart={SHIPPED_EXEC} ", f"ExecStart={daemon} "), 0o644)
    done.append(f"installed {unit} (ExecStart={daemon})")

    sysusers = _under(prefix, "/etc/sysusers.d/pilot-handshake.conf")
    _write(sysusers, shipped_file(SYSUSERS_NAME).read_text(encoding="utf-8"), 0o644)
    done.append(f"installed {sysusers}")

    config = _under(prefix, DEFAULT_CONFIG_PATH)
    if config.exists():
        done.append(f"kept {config} (it exists; the example is {shipped_file(EXAMPLE_NAME)})")
    else:
        _write(config, shipped_file(EXAMPLE_NAME).read_text(encoding="utf-8"), 0o644)
        done.append(f"installed {config} (the example config: edit it)")

    for program in ("pilot-handshakectl", "pilot-handshaked"):
        link = _under(prefix, f"/usr/local/bin/{program}")
        target = scripts / program
        if link.is_symlink() or not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            if link.is_symlink():
                link.unlink()
            link.symlink_to(target)
            done.append(f"linked {link} -> {target}")
        else:
            done.append(f"kept {link} (not a link; this installation's is {target})")
    return done
