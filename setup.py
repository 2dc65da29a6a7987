"""Packaging for pilothandshake: the Pilot Protocol trust handshake (port 444)."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
PROGRAMS = ("pilot-handshaked", "pilot-handshakectl", "pilot-registryd")
MAN_DIR = "build/man"
# conf/ files that `pilot-handshaked --install-systemd` installs (and the dashboard): the
# wheel carries them as pilothandshake/conf/ (pilothandshake/systemd.py reads them there).
SERVICE_FILES = (
    "pilot-handshaked.service",
    "pilot-handshake.sysusers",
    "example.yaml",
    "grafana-dashboard.json",
)
# Also the [build-system] requires of pyproject.toml: the man pages are made from the
# programs' parsers, whose modules import these (tests/test_packaging.py keeps both equal).
INSTALL_REQUIRES = ["pynacl>=1.5", "filelock>=3.12", "pyyaml>=6.0", "prometheus_client>=0.19"]


class BuildPy(build_py):
    """build_py, plus the man pages (``python -m pilothandshake.manpages``, from the same
    parsers as --help) and conf/'s service files as package data."""

    def run(self) -> None:
        super().run()
        env = dict(os.environ, PYTHONPATH=str(HERE))
        manpages = [sys.executable, "-m", "pilothandshake.manpages", str(HERE / MAN_DIR)]
        subprocess.run(manpages, cwd=HERE, env=env, check=True, stdout=subprocess.DEVNULL)
        target = Path(self.build_lib) / "pilothandshake" / "conf"
        target.mkdir(parents=True, exist_ok=True)
        for name in SERVICE_FILES:
            shutil.copyfile(HERE / "conf" / name, target / name)
# Read, not imported: importing the package would need its dependencies installed first.
VERSION = re.search(
    r'^__version__ = "([^"]+)"$',
    (HERE / "pilothandshake" / "_version.py").read_text(encoding="utf-8"),
    re.M,
).group(1)

setup(
    name="pilothandshake",
    version=VERSION,
    description="Pilot Protocol trust handshake (port 444): Python package and daemon",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    author="pilothandshake developers",
    # No home page: the project's public address is not decided yet, and none is invented.
    # The protocol it speaks is the Go original's (docs/PROTOCOL.md ships in the sdist).
    project_urls={"Pilot Protocol (Go)": "https://github.com/TeoSlayer/pilotprotocol"},
    license="Apache-2.0",
    license_files=["LICENSE"],
    classifiers=[
        "Development Status :: 4 - Beta",
        "Environment :: No Input/Output (Daemon)",
        "Intended Audience :: Developers",
        "Intended Audience :: System Administrators",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Programming Language :: Python :: 3.9",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: Python :: 3.13",
        "Topic :: Security :: Cryptography",
        "Topic :: System :: Networking",
        "Typing :: Typed",
    ],
    keywords=["pilot protocol", "trust", "handshake", "ed25519", "daemon"],
    python_requires=">=3.9",
    packages=find_packages(include=["pilothandshake", "pilothandshake.*"]),
    package_data={"pilothandshake": ["py.typed"]},
    include_package_data=True,
    scripts=[f"bin/{program}" for program in PROGRAMS],
    # Made by BuildPy; installed under the prefix (a venv's share/man/man1).
    data_files=[("share/man/man1", [f"{MAN_DIR}/{program}.1" for program in PROGRAMS])],
    cmdclass={"build_py": BuildPy},
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "test": [
            "pytest>=7",
            "pytest-timeout>=2.1",
            "hypothesis>=6.80",
            "ruff>=0.5",
            "mypy>=1.8",
            "types-PyYAML",
            # tests/test_packaging.py builds the sdist without isolation, with the installed
            # setuptools: venvs of Python 3.12 and later come without one.
            "build",
            "setuptools>=61",
        ],
        # Only the benchmarks' pictures need it (benchmarks/, BENCHMARKS.md).
        "bench": ["matplotlib"],
        # scripts/mutation.sh (RELIABILITY.md records the score).
        "mutation": ["mutmut>=3.2"],
    },
)
