"""Trials held at a known step (``sweeper.inject``'s ``SFT_SWEEP_INJECT_HOLD_AT_STEP``), so that a test acts on a
running trial at that point rather than when a poll happens to see it."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

__all__ = ["Hold"]


class Hold:
    """``env`` makes the processes of a command stop at optimizer step ``step`` of their trials until released;
    with ``until=K``, until K processes have reached it (the workers of a sweep each run a trial)."""

    def __init__(self, folder: Path, step: int, until: int | None = None) -> None:
        self.folder, self.step, self.until = Path(folder), step, until
        self.folder.mkdir(parents=True, exist_ok=True)

    @property
    def env(self) -> dict[str, str]:
        env = {"SFT_SWEEP_INJECT_HOLD_AT_STEP": str(self.step), "SFT_SWEEP_INJECT_HOLD_DIR": str(self.folder)}
        return {**env, "SFT_SWEEP_INJECT_HOLD_FOR": str(self.until)} if self.until else env

    def held(self) -> list[int]:
        """The pids of the processes that reached the step (held, or released since)."""
        return sorted(int(p.name.split("-", 1)[1]) for p in self.folder.glob("held-*"))

    def wait(self, n: int = 1, proc: subprocess.Popen | None = None, timeout: float = 300) -> list[int]:
        """The pids once ``n`` processes are held; AssertionError when ``proc`` ends first or time runs out."""
        deadline = time.time() + timeout
        while len(self.held()) < n:
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"the command ended (exit {proc.returncode}) before {n} trial(s) reached "
                                     f"step {self.step}")
            if time.time() > deadline:
                raise AssertionError(f"{len(self.held())} of {n} trial(s) reached step {self.step} in {timeout} s")
            time.sleep(0.05)
        return self.held()

    def release(self, pid: int | None = None) -> None:
        """Let ``pid`` go on (and any later trial of it that reaches the step); every process when None."""
        (self.folder / ("release" if pid is None else f"release-{pid}")).touch()
