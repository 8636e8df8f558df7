"""Personalized representations from personalized generation: the library (no Ray, nothing runs at import)."""

__version__ = "0.1.0"
