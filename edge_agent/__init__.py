"""The edge daemon: capture → segment → spool → upload → announce."""

from shared import __version__

__all__ = ["__version__"]
