"""What a user gets from `pip install` or the source distribution works on its own.

The sdist holds the tests and what they need, the docs the README links to, the configs and
the license, with the metadata a package index shows; its tests pass unpacked, away from
this checkout; the demo runs from the installed package alone (no ``conf/`` beside it);
every program answers ``--version``.
"""

from __future__ import annotations

import email.parser
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml
from integration.conftest import process_env

import pilothandshake
from pilothandshake.demo import NODES, node_config

ROOT = Path(__file__).resolve().parents[1]
PROGRAMS = ("pilot-handshaked", "pilot-handshakectl", "pilot-registryd")
# Always in the sdist: the suite's shared modules and data, the docs, configs and license.
REQUIRED = {
    "LICENSE",
    "README.md",
    "BENCHMARKS.md",
    "RELIABILITY.md",
    "pyproject.toml",
    "setup.py",
    "docs/PROTOCOL.md",
    "docs/DESIGN.md",
    "conf/example.yaml",
    "conf/demo-node-a.yaml",
    "conf/demo-node-b.yaml",
    "conf/demo-registry.yaml",
    "tests/conftest.py",
    "tests/fakeruntime.py",
    "tests/strategies.py",
    "tests/fixtures/go_trust.json",
    "tests/integration/__init__.py",
    "tests/integration/conftest.py",
    "scripts/crash-trials.py",
    "pilothandshake/py.typed",
    *(f"bin/{program}" for program in PROGRAMS),
}
# Tracked files under these folders must all ship (checked when this is a git checkout).
SHIPPED_FOLDERS = ("tests", "docs", "conf", "bin", "scripts")
# Not copied to build the sdist from: version control, virtualenvs, caches, build output.
NOT_COPIED = (".git", ".venv*", "__pycache__", ".*_cache", ".hypothesis", "*.egg-info", "dist")


@pytest.fixture(scope="module")
def sdist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the sdist from this tree and unpack it; returns the unpacked directory."""
    pytest.importorskip("build", reason="the `build` package (pip install -e '.[test]')")
    out = tmp_path_factory.mktemp("sdist")
    # From a copy of this tree: building writes pilothandshake.egg-info into the tree, and
    # scripts/test.sh runs this test on several Pythons at once.
    tree = tmp_path_factory.mktemp("tree") / "pilothandshake"
    shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(*NOT_COPIED))
    # --no-isolation: build with the setuptools already installed, offline and fast; an
    # sdist needs no `wheel`, which the build dependencies list for the wheel.
    result = subprocess.run(
        [
            *(sys.executable, "-m", "build", "--sdist", "--outdir", str(out)),
            *("--no-isolation", "--skip-dependency-check"),
        ],
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (archive,) = out.glob("pilothandshake-*.tar.gz")
    with tarfile.open(archive) as tar:
        # Our own archive, just built; the "data" filter where this Python has it (3.12+,
        # and 3.9-3.11 security releases), whose default changes in 3.14.
        if hasattr(tarfile, "data_filter"):
            tar.extractall(out, filter="data")
        else:
            tar.extractall(out)
    (unpacked,) = (p for p in out.iterdir() if p.is_dir())
    return unpacked


def _files(directory: Path) -> set[str]:
    return {
        p.relative_to(directory).as_posix()
        for p in directory.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_sdist_holds_the_tests_docs_configs_and_license(sdist: Path) -> None:
    assert _files(sdist) >= REQUIRED, sorted(REQUIRED - _files(sdist))


def test_sdist_holds_every_tracked_file_of_the_shipped_folders(sdist: Path) -> None:
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout (an unpacked sdist is its own file list)")
    tracked = subprocess.run(
        ["git", "ls-files", "--", *SHIPPED_FOLDERS],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.split()
    missing = set(tracked) - _files(sdist)
    assert not missing, sorted(missing)


def test_every_file_the_readme_links_to_is_in_the_sdist(sdist: Path) -> None:
    links = re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", (ROOT / "README.md").read_text())
    assert "docs/PROTOCOL.md" in links
    assert set(links) <= _files(sdist), sorted(set(links) - _files(sdist))


def test_sdist_metadata_names_license_author_urls_and_classifiers(sdist: Path) -> None:
    meta = email.parser.Parser().parsestr((sdist / "PKG-INFO").read_text(encoding="utf-8"))
    assert meta["Version"] == pilothandshake.__version__
    license_text = meta["License-Expression"] or meta["License"]
    assert license_text == "Apache-2.0"
    assert meta["Author"] == "pilothandshake developers"
    assert meta["Home-page"] or meta.get_all("Project-URL")
    assert any("pilotprotocol" in url for url in meta.get_all("Project-URL") or [])
    classifiers = meta.get_all("Classifier") or []
    assert "Programming Language :: Python :: 3.9" in classifiers
    assert "Typing :: Typed" in classifiers
    assert "Apache License" in (sdist / "LICENSE").read_text()


def test_the_unpacked_sdists_own_tests_pass(sdist: Path) -> None:
    env = process_env()
    env["PYTHONPATH"] = str(sdist)  # the sdist's code, not this checkout's
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-x",
            "-p",
            "no:cacheprovider",
            "tests/test_protocol_doc.py",
            "tests/test_config.py",
            "tests/test_service.py",
            "tests/integration/test_direct.py::test_wait_exits_0_when_trust_arrives_and_1_on_timeout",
        ],
        cwd=sdist,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"\d+ passed", result.stdout)
    assert " failed" not in result.stdout and " skipped" not in result.stdout


@pytest.mark.parametrize("program", PROGRAMS)
def test_every_program_prints_its_version(program: str) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "bin" / program), "--version"],
        env=process_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{program} {pilothandshake.__version__}"


def test_demo_configs_in_conf_match_the_ones_the_demo_makes() -> None:
    for name in NODES:
        shipped = yaml.safe_load((ROOT / "conf" / f"demo-node-{name}.yaml").read_text())
        made = node_config(name, Path("/x"), shipped["listen"], shipped["registry"]["address"])
        # Only where the state lives differs: relative to the copied config, or the demo's.
        assert shipped.pop("identity") == f"node-{name}/identity.json"
        made.pop("identity")
        assert shipped == made


def test_demo_runs_from_the_installed_package_alone(tmp_path: Path) -> None:
    """What a wheel installs (the package and the three scripts), with no checkout near."""
    site, scripts = tmp_path / "site", tmp_path / "bin"
    shutil.copytree(
        ROOT / "pilothandshake",
        site / "pilothandshake",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    scripts.mkdir()
    for program in PROGRAMS:
        target = scripts / program
        target.write_text(f"#!{sys.executable}\n" + (ROOT / "bin" / program).read_text())
        target.chmod(0o755)
    env = process_env()
    env["PYTHONPATH"] = str(site)
    env["PATH"] = os.pathsep.join([str(scripts), env.get("PATH", "")])
    result = subprocess.run(
        [sys.executable, "-m", "pilothandshake.demo"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "demo OK" in result.stdout
    assert str(ROOT) not in result.stdout  # nothing came from the checkout
