"""The ``qpasses`` command: ``commands`` (quantize, run, check, inspect...), ``amp``, ``inspection``."""

from qpasses.cli.commands import main

__all__ = ["main"]
