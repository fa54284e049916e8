"""Command-line interface: a thin skin over the Python API (``unbackdoor.cli.main``)."""
from unbackdoor.cli.main import main

__all__ = ["main"]
