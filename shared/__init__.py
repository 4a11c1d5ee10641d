"""Code both daemons use: manifest model and signing, queue, keys, settings and logging."""

__version__ = "0.1.0"
