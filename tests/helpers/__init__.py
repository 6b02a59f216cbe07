"""Helpers shared by the test modules (STYLE 18: shared test helpers live here, not in a test module)."""

from .recorder import Recorder

__all__ = ["Recorder"]
