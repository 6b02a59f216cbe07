"""Older import path of the sweeper, kept for callers: the code lives in the ``sweeper.sweep`` package.

    from sweeper.study import StudySweeper, TrialReporter      # the same classes as sweeper.sweep.plugin / .handle

``open_storage``, ``mask_url`` (``sweeper.storage``), ``SYSTEM_ATTRS`` and ``is_branch`` (``sweeper.records``),
``make_pruner`` and ``make_sampler`` (``sweeper.samplers``) stay importable from here too.
"""

from __future__ import annotations

from sweeper.records import SYSTEM_ATTRS, is_branch
from sweeper.samplers import make_pruner, make_sampler
from sweeper.storage import mask_url, open_storage
from sweeper.sweep.handle import TrialReporter
from sweeper.sweep.plugin import StudySweeper

__all__ = ["SYSTEM_ATTRS", "StudySweeper", "TrialReporter", "is_branch", "make_pruner", "make_sampler", "mask_url",
           "open_storage"]
