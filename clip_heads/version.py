"""The package's version, in a module of its own so that any layer can record it without
importing the package (``clip_heads/__init__.py`` re-exports it as ``clip_heads.__version__``)."""
from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
