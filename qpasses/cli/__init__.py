"""The ``qpasses`` command: ``app`` (parser, main), ``commands`` (quantize, run, check, inspect...), ``amp``,
``inspection``."""

from qpasses.cli.app import main

__all__ = ["main"]
