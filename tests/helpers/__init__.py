"""Helpers shared by the test modules (STYLE 18: shared test helpers live here, not in a test module)."""

from .cli import run_in_process, sweeper_in_process
from .hold import Hold
from .presets import fast
from .recorder import Recorder

__all__ = ["Hold", "Recorder", "fast", "run_in_process", "sweeper_in_process"]
