"""A stand-in for the sweeper's ``TrialReporter``: collects what a job reports into its trial."""

from __future__ import annotations

from sweeper.reporter import NullReporter


class Recorder(NullReporter):
    """Collects what a job reports into its trial (the Optuna-backed reporter is tested via the CLI)."""

    def __init__(self):
        self.reports, self.attrs = [], {}

    def report(self, value, step):
        self.reports.append((step, value))

    def should_prune(self):
        return False

    def prune(self, step):  # pragma: no cover - never asked to
        raise AssertionError

    def set_attrs(self, attrs):
        self.attrs.update(attrs)
