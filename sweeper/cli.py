"""The ``sft-sweep`` command: the sweep itself (Hydra's grammar, as ``python train.py`` in a checkout)
and the commands beside it. Run it in the folder where outputs should go: ``outputs/`` (runs, sweeps,
``optuna.db``, caches) is made there.

    sft-sweep -m schedule=under,sweet,over                        # one study: 500 / 1500 / 3000 steps
    sft-sweep --config-dir ./conf -m schedule=under,sweet data=mydata   # your ./conf/data/mydata.yaml too
    sft-sweep plan schedule=under,sweet,over                      # steps <-> epochs <-> tokens, VRAM, fit
    sft-sweep report                                              # best step count per dataset, PNG + HTML
    sft-sweep status                                              # trials by state, running workers, SLURM jobs
    sft-sweep dashboard                                           # optuna-dashboard on 127.0.0.1:8080
    sft-sweep cp data/jsonl conf/data/mydata.yaml                 # an editable copy of a shipped option
    sft-sweep --help | --info plugins | --cfg job                 # Hydra's own flags

A first argument that is a word (no ``=``, no leading ``-``, ``+`` or ``~``) names a command; anything
else is the sweep's Hydra command line. ``python -m sweeper COMMAND`` runs the commands too.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import re
import sys
from typing import Any

__all__ = ["COMMANDS", "check_versions", "main", "run_command"]

COMMANDS = {
    "plan": "plan every run of a sweep without training",
    "report": "tables, diagnosis and the step count to train each dataset for",
    "status": "where each study stands: trials by state, running workers, SLURM jobs",
    "dashboard": "optuna-dashboard on the sweep's storage",
    "cp": "copy a shipped config option to an editable file of your own (e.g. data/jsonl conf/data/mydata.yaml)",
}
_CONFIG_DIR_HELP = "your config folder (group folders such as data/mydata.yaml), searched after the shipped groups"


def check_versions(requires: list[str] | None = None, requires_python: str | None = None) -> str | None:
    """Why this environment cannot run sft-sweep (one line), or None: this Python against
    ``requires_python`` and each installed dependency against ``requires`` (requirement strings; an
    extra's are skipped). By default both come from the installed package's metadata, i.e. the ranges
    of pyproject.toml (a bare checkout, not installed, is not checked)."""
    from importlib import metadata

    if requires is None:
        try:
            dist = metadata.distribution("sft-sweep")
        except metadata.PackageNotFoundError:
            return None
        requires, requires_python = dist.requires or [], dist.metadata.get("Requires-Python")
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    here = ".".join(map(str, sys.version_info[:3]))
    if requires_python and not SpecifierSet(requires_python).contains(here, prereleases=True):
        return f"sft-sweep needs Python {requires_python}, but this is Python {here} ({sys.executable})"
    for line in requires:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # an extra's requirement, or one for another platform
        try:
            found = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            return f"sft-sweep needs {req.name}{req.specifier}, which is not installed: pip install '{req}'"
        if req.specifier and not req.specifier.contains(Version(found).public, prereleases=True):
            return (f"sft-sweep needs {req.name}{req.specifier}, but {req.name} {found} is installed: "
                    f"pip install '{req.name}{req.specifier}'")
    return None


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    plan = sub.add_parser("plan", help=COMMANDS["plan"], description=COMMANDS["plan"])
    plan.add_argument("--config-dir", "-cd", help=_CONFIG_DIR_HELP)
    plan.add_argument("overrides", nargs="*", help="Hydra overrides, as for the sweep (`-m` not needed)")
    rep = sub.add_parser("report", help=COMMANDS["report"], description=COMMANDS["report"])
    rep.add_argument("--storage", help="storage URL (default: the sweeper's, from the config)")
    rep.add_argument("--study", action="append", help="study name (repeatable; default: every study)")
    rep.add_argument("--out", default=None, help="output folder (default: <paths.output_dir>/report)")
    rep.add_argument("--config-dir", "-cd", help=_CONFIG_DIR_HELP + " (for a storage set there)")
    dash = sub.add_parser("dashboard", help=COMMANDS["dashboard"], description=COMMANDS["dashboard"])
    dash.add_argument("--storage", help="storage URL (default: the sweeper's, from the config)")
    dash.add_argument("--host", default="127.0.0.1", help="interface to bind (default: this machine only)")
    dash.add_argument("--port", type=int, default=8080)
    dash.add_argument("--config-dir", "-cd", help=_CONFIG_DIR_HELP + " (for a storage set there)")
    stat = sub.add_parser("status", help=COMMANDS["status"], description=COMMANDS["status"])
    stat.add_argument("--storage", help="storage URL (default: the sweeper's, from the config)")
    stat.add_argument("--study", action="append", help="study name (repeatable; default: every study)")
    stat.add_argument("--config-dir", "-cd", help=_CONFIG_DIR_HELP + " (for a storage set there)")
    cp = sub.add_parser("cp", help=COMMANDS["cp"], description=COMMANDS["cp"] + "; its `name:` becomes the "
                        "file's stem. Options: " + _options_listing())
    cp.add_argument("source", help="a shipped option as group/option, e.g. data/jsonl, model/hub, schedule/sweet")
    cp.add_argument("dest", help="the new file, e.g. conf/data/mydata.yaml (never overwritten)")
    return parser


def _options_listing() -> str:
    from sweeper.userconf import shipped_options

    return "; ".join(f"{g}/{{{','.join(o)}}}" for g, o in shipped_options().items() if not g.startswith("hydra"))


# what a Ctrl-C leaves, per command (sweeper.interrupt: one line, exit code 130)
_INTERRUPTED = {
    "plan": "the plan stopped; it writes nothing but the data and model caches, which keep only finished "
            "entries; run it again",
    "report": "no report file was replaced (each is written whole, then moved into place); the study storage is "
              "only read; run it again",
    "status": "status only reads the study storage; nothing was changed",
    "dashboard": "the dashboard stopped; it only serves the study storage",
    "cp": "nothing was copied; run it again",
}


def run_command(argv: list[str], prog: str = "sft-sweep") -> int:
    """One of :data:`COMMANDS` (``argv[0]``) with its arguments; the exit status (130 after Ctrl-C, with one
    line saying what it left)."""
    from sweeper import interrupt

    try:
        return _run_command(argv, prog)
    except KeyboardInterrupt:
        print(interrupt.line(_INTERRUPTED.get(argv[0] if argv else "", "nothing was changed")), file=sys.stderr)
        return interrupt.EXIT_CODE


def _run_command(argv: list[str], prog: str) -> int:
    from sweeper import interrupt

    interrupt.honour()  # a Ctrl-C that a finalizer swallowed while Python imported: the command does not start
    args = _parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from sweeper import passwords

    passwords.install_log_filter(passwords.secret_values({}, getattr(args, "storage", None)))  # no password logged
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its CPU backend warns on import
    os.environ.setdefault("TQDM_DISABLE", "1")
    from sweeper import userconf

    if args.command == "cp":
        try:
            print(userconf.copy_option(args.source, args.dest))
        except (ValueError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    why = userconf.problem(args.config_dir)
    if why:
        print(f"error: {why}", file=sys.stderr)
        return 2
    if args.command == "plan":
        from sweeper.plan_command import main as plan_main

        return plan_main(args.overrides, args.config_dir)
    if args.command == "status":
        from sweeper.status_command import status

        return status(args.storage, args.study, args.config_dir)
    from sweeper.report_command import dashboard, report

    if args.command == "report":
        return report(args.storage, args.study, args.out, args.config_dir)
    return dashboard(args.storage, args.host, args.port, args.config_dir)


def _unknown(word: str) -> str:
    from sweeper.program import this_process

    prog = this_process().prog  # sft-sweep, or python train.py in a checkout
    near = difflib.get_close_matches(word, COMMANDS, n=1)
    hint = f"did you mean `{prog} {near[0]}`? " if near else ""
    return (f"unknown command {word!r}: {hint}the commands are {', '.join(COMMANDS)}; the sweep takes Hydra "
            f"overrides (key=value), e.g. {prog} -m schedule=under,sweet,over")


def _config_dir_arg(argv: list[str]) -> str | None:
    """``--config-dir`` as Hydra's own parser reads ``argv`` (None if absent or unparsable: Hydra says why)."""
    from hydra._internal.utils import get_args_parser

    try:
        args, _ = get_args_parser().parse_known_args(argv)
    except SystemExit:
        return None
    return args.config_dir


def main(argv: list[str] | None = None) -> None:
    """Entry of ``sft-sweep`` (and of a checkout's ``train.py``): a command, or the Hydra app. A Ctrl-C
    ends it with one line and exit code 130 (:mod:`sweeper.interrupt`); as the process's entry (``argv`` None),
    a Ctrl-C after the command is done is ignored (it could only interrupt the interpreter's teardown)."""
    from sweeper import interrupt

    entry, argv = argv is None, (sys.argv[1:] if argv is None else argv)
    if entry:  # the process is the command's: the optional packages its runs do not use may stay out of it
        from sweeper import extras

        extras.allow()
    try:
        with interrupt.remembered():  # a Ctrl-C that a finalizer swallowed is honoured later (the sweep's checks)
            _main(argv, entry)
    except KeyboardInterrupt:
        sweep = _is_sweep(argv)
        what = ("before the sweep opened its study: nothing was recorded; run the same command again to start it"
                if sweep else "the run stopped before it finished (a run without -m records no study); run the "
                "same command again to start it over")
        print(interrupt.line(what), file=sys.stderr)
        sys.exit(interrupt.EXIT_CODE)
    finally:
        if entry:  # the process's own entry (not a caller's): a Ctrl-C in its teardown would print a traceback
            interrupt.process_ending()


def _is_sweep(argv: list[str]) -> bool:
    return any(a in ("-m", "--multirun") or a.replace(" ", "").lower() == "hydra.mode=multirun" for a in argv)


def _prestart_data_check(argv: list[str]) -> None:
    """A sweep's own command on a machine with a GPU: start the data check's child before Hydra composes the
    config (:func:`sweeper.datacheck.prestart`); not for Hydra's flags that print and exit, nor in a worker
    process of a sweep (the command that started it checked the data)."""
    if not _is_sweep(argv) or any(a in ("--cfg", "-c", "--info", "-i", "--help", "-h", "--hydra-help")
                                  or a.startswith(("--cfg=", "--info=")) for a in argv):
        return
    from sweeper import gpu
    from sweeper.config import SWEEP_ID_ENV

    if SWEEP_ID_ENV in os.environ or not gpu.visible_gpus():
        return
    from sweeper import datacheck

    datacheck.prestart()


def _main(argv: list[str], entry: bool = False) -> None:
    why = check_versions()
    if why:
        sys.exit(f"error: {why}")
    first = argv[0] if argv else ""
    if first in COMMANDS:
        sys.exit(run_command(argv))
    if first and not first.startswith(("-", "+", "~")) and "=" not in first:
        sys.exit(f"error: {_unknown(first)}")
    from sweeper import userconf

    why = userconf.problem(_config_dir_arg(argv))
    if why:
        sys.exit(f"error: {why}")
    if entry:
        _prestart_data_check(argv)
    from sweeper.train import main as app

    sys.argv[1:] = argv
    stderr, stdout = sys.stderr, sys.stdout
    sys.stderr = _OneLineRefusals(stderr, argv)
    if any(a in ("--cfg", "-c", "--info", "-i") or a.startswith(("--cfg=", "--info=")) for a in argv):
        sys.stdout = _Masked(stdout, _command_secrets(argv))  # Hydra prints the config, the storage URL in it
    try:
        app()
    except ValueError as e:  # Hydra's own refusal of its flags, raised before its error report
        if not str(e).startswith("Only one of --run, --multirun"):
            raise
        sys.stderr.write(f"error: {e}; give one of them (--cfg and --info print the config without running)\n")
        raise SystemExit(2) from None
    finally:
        refusals = sys.stderr
        sys.stderr, sys.stdout = stderr, stdout
        if isinstance(refusals, _OneLineRefusals):
            refusals.end()


def _command_secrets(argv: list[str]) -> tuple[str, ...]:
    """The secrets on a command line: the storage URL's password, secret-named ``hydra.job.env_set`` values."""
    from sweeper import passwords

    _, env = passwords.split_secret_overrides(argv)
    storage = next((a.split("=", 1)[1].strip("'\"") for a in argv if a.lstrip("+").startswith("hydra.sweeper.storage=")),
                   None)
    return passwords.secret_values(env, storage)


class _Masked:
    """``sys.stdout`` while Hydra prints the config (``--cfg``, ``--info``): each write with its secrets masked
    (``sweeper.passwords.mask_secrets``)."""

    def __init__(self, stream: Any, values: tuple[str, ...]) -> None:
        self._stream, self._values = stream, values

    def write(self, text: str) -> int:
        from sweeper import passwords

        self._stream.write(passwords.mask_secrets(text, self._values))
        return len(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


_HYDRA_HINT = "\nSet the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace.\n"
# the openings of Hydra's composition errors and OmegaConf's, and OmegaConf's indented detail lines
_COMPOSE_ERROR = re.compile(r"^(Error merging override |Could not override |In '[^']*': |Could not find |Key '|"
                            r"Value '|Error parsing override )|\n    (full_key|object_type|reference_type)[:=]|\nSee https://hydra\.cc/")


def _bad_override(argv: list[str]) -> str | None:
    """The first override of the command line ``argv`` that Hydra's grammar cannot parse, or None."""
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        args, _ = get_args_parser().parse_known_args(argv)
    except SystemExit:
        return None
    parser = OverridesParser.create()
    for override in args.overrides or []:
        try:
            parser.parse_overrides([override])
        except Exception:
            return override
    return None


def name_override(line: str, argv: list[str]) -> str:
    """A grammar error of Hydra's that does not say which override it is in (``no viable alternative at input
    'interval(1e-3'``) with that override named first; a password in it masked (``sweeper.passwords``). Any
    other line as it is."""
    if "override_grammar" not in line or line.startswith("Error parsing override"):
        return line
    bad = _bad_override(argv)
    if bad is None:
        return line
    from sweeper import passwords

    secrets = passwords.secret_values({}, bad.split("=", 1)[-1].strip("'\""))
    return passwords.mask_secrets(f"Error parsing override '{bad}': {line}", secrets)


class _OneLineRefusals:
    """``sys.stderr`` for the Hydra app: Hydra follows the one line of a refusal (an ``InputError``, which it
    prints without a traceback) with a blank line and its ``HYDRA_FULL_ERROR`` hint; that hint is left out, so
    bad input is one line. Hydra's and OmegaConf's own composition errors (a value of the wrong type, a key or
    option that does not exist) span several lines; they are held until the hint and said in one
    (:func:`sweeper.config.one_line`). After a traceback (a bug, not bad input) everything passes as written, hint included."""

    def __init__(self, stream: Any, argv: list[str] | None = None) -> None:
        self._stream, self._traceback, self._held, self._job = stream, False, [], ""
        self._argv = list(argv or [])

    def write(self, text: str) -> int:
        from sweeper import passwords

        if text == _HYDRA_HINT and not self._traceback:
            if self._held:
                from sweeper.config import one_line

                line = name_override(one_line("".join(self._held)), self._argv)
                self._stream.write(passwords.mask_secrets(line, _command_secrets(self._argv)) + "\n")
                self._held = []
            self._job = ""  # a run's refusal names its option itself: Hydra's list of overrides is left out
            return len(text)
        if text.startswith("Error executing job with overrides:") and not self._traceback:
            self._job = text  # kept for a traceback, left out before a refusal
            return len(text)
        if "Traceback (most recent call last)" in text:
            self._traceback = True
            self._stream.write(self._job)
            self._job = ""
        if not self._traceback and text.endswith("\n") and _COMPOSE_ERROR.search(text):
            self._held.append(text)  # the hint follows: said in one line then
            return len(text)
        self.release()
        return self._stream.write(text)

    def release(self) -> None:
        """Write what is held as it came (no hint followed: not a refusal of Hydra's)."""
        if self._held:
            self._stream.write("".join(self._held))
            self._held = []

    def end(self) -> None:
        """At the app's end: whatever is still held, as it came."""
        self.release()
        if self._job:
            self._stream.write(self._job)
            self._job = ""

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)
