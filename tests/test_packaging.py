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
    """What a wheel installs into a venv (the package, the three scripts beside the venv's
    python), with no checkout near and the venv not activated: the programs are not on PATH
    (issue 19), the demo finds them beside sys.executable."""
    site, scripts = tmp_path / "site", tmp_path / "venv" / "bin"
    shutil.copytree(
        ROOT / "pilothandshake",
        site / "pilothandshake",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    scripts.mkdir(parents=True)
    python = scripts / "python"
    python.symlink_to(sys.executable)
    for program in PROGRAMS:
        target = scripts / program
        target.write_text(f"#!{python}\n" + (ROOT / "bin" / program).read_text())
        target.chmod(0o755)
    env = process_env()
    # The package from `site`; its dependencies from this interpreter's site-packages (a
    # path entry, so the editable install's finder there does not bring the checkout in).
    env["PYTHONPATH"] = os.pathsep.join([str(site), *sysconfig_paths()])
    env["PATH"] = "/usr/bin:/bin"  # neither the venv's bin nor this checkout's
    result = subprocess.run(
        [str(python), "-m", "pilothandshake.demo"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "demo OK" in result.stdout
    assert str(ROOT) not in result.stdout  # nothing came from the checkout


def sysconfig_paths() -> list[str]:
    import sysconfig

    return list(dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")]))


def test_the_demo_without_its_programs_names_where_it_looked(tmp_path: Path) -> None:
    site = tmp_path / "site"
    shutil.copytree(
        ROOT / "pilothandshake",
        site / "pilothandshake",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    python = tmp_path / "bin" / "python"
    python.parent.mkdir()
    python.symlink_to(sys.executable)
    env = process_env()
    env["PYTHONPATH"] = os.pathsep.join([str(site), *sysconfig_paths()])
    code = (
        "import sys, pilothandshake.demo as d; d.CHECKOUT = d.Path(sys.argv[1]); "
        "d._script_dirs = lambda: [d.Path(sys.executable).parent]; sys.exit(d.main([]))"
    )
    result = subprocess.run(
        [str(python), "-c", code, str(tmp_path / "no-checkout")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert f"cannot find pilot-handshakectl: it is in none of {python.parent}" in result.stderr
    assert f"{python} -m pip install pilothandshake" in result.stderr


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from this tree."""
    pytest.importorskip("build", reason="the `build` package (pip install -e '.[test]')")
    pytest.importorskip("wheel", reason="the `wheel` package builds wheels without isolation")
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run(
        [
            *(sys.executable, "-m", "build", "--wheel", "--outdir", str(out)),
            *("--no-isolation", "--skip-dependency-check"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (built,) = out.glob("pilothandshake-*.whl")
    return built


def test_the_wheel_ships_the_service_files_and_man_pages_made_from_the_parsers(
    wheel: Path,
) -> None:
    import zipfile

    from pilothandshake.cli import _parser
    from pilothandshake.handshaked import build_parser

    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        for name in ("pilot-handshaked.service", "pilot-handshake.sysusers", "example.yaml"):
            shipped = archive.read(f"pilothandshake/conf/{name}").decode()
            assert shipped == (ROOT / "conf" / name).read_text()
        data = f"pilothandshake-{pilothandshake.__version__}.data/data/share/man/man1"
        pages = {p: archive.read(f"{data}/{p}.1").decode() for p in PROGRAMS}
    assert "pilothandshake/conf/grafana-dashboard.json" in names
    # The pages say what --help says: every option of the parsers, every command.
    options = {a for a in build_parser()._actions for a in a.option_strings}
    assert options and all(o.replace("-", "\\-") in pages["pilot-handshaked"] for o in options)
    for command in ("status", "reload", "completion", "events"):
        assert f".SS pilot\\-handshakectl {command}" in pages["pilot-handshakectl"], command
    assert _parser().prog == "pilot-handshakectl"
    assert pages["pilot-registryd"].startswith(".TH PILOT-REGISTRYD 1")


def test_build_requires_are_the_install_requires() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    setup = (ROOT / "setup.py").read_text()
    install = re.search(r"^INSTALL_REQUIRES = (\[.*?\])$", setup, re.M)
    assert install is not None
    assert set(eval(install.group(1))) <= set(build)


def _helps() -> dict[str, str]:
    """Every --help text a user can print: the three programs, each command, the demo."""
    import argparse

    from pilothandshake.cli import _parser
    from pilothandshake.handshaked import build_parser
    from pilothandshake.registry.server import _parser as registry_parser

    ctl = _parser()
    texts = {
        "pilot-handshaked": build_parser().format_help(),
        "pilot-handshakectl": ctl.format_help(),
        "pilot-registryd": registry_parser().format_help(),
    }
    [commands] = [a for a in ctl._actions if isinstance(a, argparse._SubParsersAction)]
    for name, command in commands.choices.items():
        texts[f"pilot-handshakectl {name}"] = command.format_help()
    demo = subprocess.run(
        [sys.executable, "-m", "pilothandshake.demo", "--help"],
        env=process_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    texts["demo"] = demo.stdout
    return texts


def test_every_help_states_exit_codes_and_cites_no_spec_or_rst() -> None:
    for name, text in _helps().items():
        assert "exit codes" in text, name
        assert "SPEC" not in text, name
        assert "``" not in text, name


def test_control_error_is_importable_from_the_package_and_named_in_the_readme() -> None:
    from pilothandshake import ControlError, HandshakeError

    assert issubclass(ControlError, HandshakeError)
    readme = (ROOT / "README.md").read_text()
    assert "`ControlError`" in readme
