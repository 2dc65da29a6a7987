"""Packaging for pilothandshake: the Pilot Protocol trust handshake (port 444)."""

from setuptools import find_packages, setup

setup(
    name="pilothandshake",
    version="0.1.0",
    description="Pilot Protocol trust handshake (port 444): Python package and daemon",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["pilothandshake", "pilothandshake.*"]),
    package_data={"pilothandshake": ["py.typed"]},
    include_package_data=True,
    scripts=["bin/pilot-handshaked", "bin/pilot-handshakectl", "bin/pilot-registryd"],
    install_requires=["pynacl>=1.5", "filelock>=3.12", "pyyaml>=6.0", "prometheus_client>=0.19"],
    extras_require={
        "test": [
            "pytest>=7",
            "pytest-timeout>=2.1",
            "hypothesis>=6.80",
            "ruff>=0.5",
            "mypy>=1.8",
            "types-PyYAML",
        ],
        # Only the benchmarks' pictures need it (benchmarks/, BENCHMARKS.md).
        "bench": ["matplotlib"],
    },
)
