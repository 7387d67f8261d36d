"""The benchmark tool's version (a module of its own so that importing it runs no package code)."""

__version__ = "0.1.0"
