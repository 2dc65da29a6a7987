"""The package's version: one place, read by ``setup.py`` (without importing the package),
``pilothandshake.__version__`` and the ``--version`` option of the three programs."""

__version__ = "0.1.0"
