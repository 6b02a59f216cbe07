"""Ctrl-C (SIGINT) in any command: one line on stderr saying what was stopped and what state is left,
then exit code 130 (the shell's code for SIGINT), never a traceback.

    python train.py -m schedule=under,sweet      # Ctrl-C while the data is prepared: nothing recorded
    python -m sweeper report                     # Ctrl-C while it writes: the old report files stay whole

Who catches it: :func:`sweeper.cli.main` (the sweep before its sweeper starts, and a single run),
:func:`sweeper.cli.run_command` (``plan``, ``report``, ``status``, ``dashboard``, ``cp``), and the sweeper
plugin (:func:`sweep_stopped`, once the sweeper runs). A Ctrl-C while a trial trains is the sweeper's own
(``sweeper.sweep.loop``: that trial is recorded FAIL and queued to resume from its checkpoint).

- :func:`deferred`: hold Ctrl-C until a short block of storage writes is done (a claimed trial is never
  left RUNNING without its worker recorded).
- :func:`release_claimed`: trials this process claimed but did not start go back to WAITING.
- :func:`process_ending`: once a command's process has done its work, a Ctrl-C is ignored (it could only
  land in the interpreter's teardown, which prints it as a traceback).
- :func:`remembered` and :func:`honour`: a Ctrl-C that Python swallowed still stops the command. Python drops
  an exception raised inside a finalizer (a ``datasets.Dataset.__del__`` run by the garbage collector, say: it
  prints "Exception ignored in ..." and carries on), so a KeyboardInterrupt that lands there is lost; the
  press is remembered and honoured: by a command before it starts (``python -m sweeper`` remembers from its
  first import), by the report before it moves its files into place, by the sweep before it opens its queue
  and before each trial it claims, and by a training run after each step (:func:`training_callback`).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
from typing import Any, Iterator

from sweeper import records

__all__ = ["EXIT_CODE", "deferred", "honour", "ignored", "line", "note", "process_ending", "release_claimed",
           "remembered", "sweep_stopped", "training_callback"]

EXIT_CODE = 130  # 128 + SIGINT, as a shell reports a process that Ctrl-C stopped

log = logging.getLogger(__name__)

_pressed = False  # a Ctrl-C came since :func:`remembered` began (whether or not its KeyboardInterrupt got through)


def line(what: str) -> str:
    """The one line printed for a Ctrl-C: ``interrupted (Ctrl-C): <what>``."""
    return f"interrupted (Ctrl-C): {what}"


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def note(signum: int) -> None:
    """Remember a stop signal (a handler of this process calls it before it raises): only Ctrl-C is kept."""
    global _pressed
    if signum == signal.SIGINT:
        _pressed = True


def _remembering_handler(signum: int, frame: Any) -> None:
    note(signum)
    raise KeyboardInterrupt


@contextlib.contextmanager
def remembered() -> Iterator[None]:
    """Within the block, Ctrl-C raises KeyboardInterrupt as Python's own handler does, and is also remembered
    for :func:`honour`; one that a finalizer swallows prints nothing. A no-op off the main thread or where
    Ctrl-C is ignored."""
    global _pressed
    _pressed = False
    if not _main_thread() or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    signal.signal(signal.SIGINT, _remembering_handler)
    hook = sys.unraisablehook
    sys.unraisablehook = _quiet_swallowed(hook)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.unraisablehook = hook
        _pressed = False


def _quiet_swallowed(hook: Any) -> Any:
    """``sys.unraisablehook`` that keeps quiet about a KeyboardInterrupt Python swallowed in a finalizer (it
    would print "Exception ignored in ..." and a traceback): the press is remembered, and :func:`honour` raises
    it where the command can stop cleanly. Anything else goes to ``hook``."""
    def quiet(unraisable: Any) -> None:
        if not (isinstance(unraisable.exc_value, KeyboardInterrupt) and _pressed):
            hook(unraisable)
    return quiet


def process_ending() -> None:
    """The command has done its work and its process ends: from now on Ctrl-C is ignored. A KeyboardInterrupt
    raised in the interpreter's teardown (a weakref callback, an atexit hook) is printed by Python as
    "Exception ignored in ..." with a traceback, and nothing is left to stop. Process entry points only."""
    if _main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def honour() -> None:
    """Raise the KeyboardInterrupt of a Ctrl-C that came in :func:`remembered` but was swallowed on its way."""
    if _pressed:
        raise KeyboardInterrupt


def training_callback() -> Any:
    """A TrainerCallback that calls :func:`honour` after every optimizer step and evaluation batch: a Ctrl-C that a
    finalizer swallowed while a run trains stops it within a step (a sweep's trial is then recorded FAIL and
    queued to resume from its checkpoint, as after any Ctrl-C), not once the whole run has ended."""
    from transformers import TrainerCallback

    class HonourCtrlC(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            honour()

        def on_prediction_step(self, args, state, control, **kwargs):
            honour()

    return HonourCtrlC()


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Run the block to its end even if Ctrl-C comes meanwhile; then raise the KeyboardInterrupt it held
    (through the handler that was in place). A no-op off the main thread or where Ctrl-C is ignored."""
    if not _main_thread() or signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        yield
        return
    held: list[Any] = []
    old = signal.signal(signal.SIGINT, lambda signum, frame: held.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
        if held:
            if callable(old):
                old(signal.SIGINT, held[0])
            raise KeyboardInterrupt


@contextlib.contextmanager
def ignored() -> Iterator[None]:
    """Ctrl-C is ignored in the block (the clean-up after a first Ctrl-C must not be cut short by a second)."""
    if not _main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def release_claimed(urls: list[str]) -> list[str]:
    """Trials left RUNNING by this process (its ``host:pid:`` starts their ``worker_process`` system attr) in
    the storages ``urls``, claimed but never started, go back to WAITING: the next command runs them. Returns
    ``study: trial N`` for each one."""
    import os
    import socket

    import optuna

    from sweeper.storage import open_storage

    mine = f"{socket.gethostname()}:{os.getpid()}:"

    released = []
    for url in urls:
        storage = open_storage(url)
        for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
            study = optuna.load_study(study_name=summary.study_name, storage=storage)
            for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
                if records.worker_process_of(t).startswith(mine):
                    records.set_state(study, records.trial_id(t), optuna.trial.TrialState.WAITING)
                    released.append(f"{summary.study_name}: trial {t.number}")
    return released


def sweep_stopped() -> SystemExit:
    """After a Ctrl-C escaped the sweeper (outside a running trial): release what this process claimed,
    print the one line, and return the SystemExit(130) to raise."""
    from sweeper.storage import mask_url, opened_urls

    urls = opened_urls()
    with ignored():
        try:
            released = release_claimed(urls)
        except Exception as e:  # noqa: BLE001 - the line must still come; the next command reclaims them
            released = []
            log.debug("could not release this process's claimed trials: %s", e)
        if not urls:
            what = ("before the sweep opened its study: nothing was recorded; run the same command again to "
                    "start it")
        else:
            where = ", ".join(mask_url(u) for u in urls)
            what = (f"no trial was training; finished trials are kept in {where}"
                    + (f", and {', '.join(released)} (claimed, not started) {'is' if len(released) == 1 else 'are'} "
                       "queued again" if released else "")
                    + "; run the same command again to resume")
        print(line(what), file=sys.stderr, flush=True)
    return SystemExit(EXIT_CODE)
