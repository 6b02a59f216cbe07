"""The data check's child: TRL's preparation of a GPU sweep's data, checked in a process that sees no GPU.

    python train.py -m schedule=under,sweet,over data=gsm8k    # on a GPU box: the check runs beside the command

Building a trainer would initialise CUDA in the command's process before the sweeper pins its worker's GPU,
so with a GPU visible :mod:`sweeper.sweep.preflight` runs :func:`sweeper.sft.check_prepared_data` in a child
(``python -m sweeper.sft -``, ``CUDA_VISIBLE_DEVICES`` empty). The child spends most of its time importing
torch, transformers and TRL, so the command starts one as its first act (:func:`prestart`, from
:func:`sweeper.cli.main`), before Hydra composes the config: the child imports while the command composes and
checks its points, then reads the resolved config of the first data it checks from its stdin. A command that
needs no check (no GPU visible after all, SLURM trials, a refused override) ends that child unread
(:func:`drop`, also at the process's exit), and a child that has no config after
:data:`sweeper.sft.CONFIG_WAIT_S` ends itself; a check handed to a child that is gone counts as not done (each
trial checks its data). :class:`DataCheck` hands a config to the pre-started child, or to a new one (a second
dataset).
"""

from __future__ import annotations

import atexit
import logging
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

__all__ = ["DataCheck", "drop", "prestart"]

log = logging.getLogger(__name__)


class _Child:
    """``python -m sweeper.sft -``: it imports what the check needs, then waits for a config on its stdin."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.err = tempfile.TemporaryFile("w+")  # a file, not a pipe: a talkative child never blocks on it
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "sweeper.sft", "-"], stdin=subprocess.PIPE,
                                         stdout=subprocess.DEVNULL, stderr=self.err, text=True,
                                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
        except BaseException:
            self.err.close()
            raise

    def send(self, body: str) -> None:
        """The config to check; a child that is gone already reports its failure at :meth:`DataCheck.wait`."""
        try:
            self.proc.stdin.write(body)
            self.proc.stdin.close()
        except (BrokenPipeError, OSError, ValueError):
            pass

    def stop(self) -> None:
        """End it if it still runs; its stderr file goes."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for f in (self.proc.stdin, self.err):
            try:
                f.close()
            except (BrokenPipeError, OSError):
                pass


_ready: _Child | None = None


def prestart() -> None:
    """Start the data check's child now, before the command composes its config (its imports take most of its
    time); the first :class:`DataCheck` of this process hands it its config. Called by the sweep command's entry
    where a GPU is visible; a child no check takes is ended by :func:`drop` (at the latest, at exit)."""
    global _ready
    if _ready is None:
        _ready = _Child()
        atexit.register(drop)


def drop() -> None:
    """End the pre-started child if no check took it (the command needs none, or was refused)."""
    global _ready
    child, _ready = _ready, None
    if child is not None:
        child.stop()


class DataCheck:
    """:func:`sweeper.sft.check_prepared_data` of ``cfg`` in a child process that sees no GPU (the pre-started
    one, or a new one), so that TRL's preparation runs beside the caller's own checks; :meth:`wait` reads its
    verdict, :meth:`stop` ends it unread."""

    def __init__(self, cfg: Any) -> None:
        global _ready
        from omegaconf import OmegaConf

        body = OmegaConf.to_yaml(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)
        self.name = str(cfg.data.name)
        self.child, _ready = _ready or _Child(), None
        self.child.send(body)
        self.sent = time.perf_counter()

    def wait(self) -> None:
        """ValueError (the child's one line) when the data cannot be trained on; a warning when the child
        failed otherwise (each trial then checks its data itself). The child is gone afterwards, whatever
        happened (an interrupt included)."""
        waited = time.perf_counter()
        try:
            rc = self.child.proc.wait()
            self.child.err.seek(0)
            last = (self.child.err.read().strip().splitlines() or [""])[-1]
        finally:
            self.stop()
        if rc == 2:
            raise ValueError(last)
        if rc == 0:
            now = time.perf_counter()
            log.info("data %s: TRL's preparation checked in %.1f s (a child process, started %.1f s before it had "
                     "the config; the command waited %.1f s for it)", self.name, now - self.child.started,
                     self.sent - self.child.started, now - waited)
        else:
            log.warning("the data check before the sweep failed (%s); each trial checks its data itself", last)

    def stop(self) -> None:
        """End the child if it still runs."""
        self.child.stop()
