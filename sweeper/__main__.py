"""The commands beside the sweep, as ``python -m sweeper COMMAND`` (the same as ``sft-sweep COMMAND``,
see :mod:`sweeper.cli`).

    python -m sweeper plan schedule=under,sweet,over          # steps <-> epochs <-> tokens, VRAM, fit
    python -m sweeper plan schedule=under,sweet,over data=banking77 model=qwen2.5-1.5b
    python -m sweeper report                                  # best step count per dataset, PNG + HTML
    python -m sweeper dashboard                               # optuna-dashboard on 127.0.0.1:8080
    python -m sweeper status                                  # trials by state, running workers, SLURM jobs
    python -m sweeper cp data/jsonl conf/data/mydata.yaml     # an editable copy of a shipped option
"""

from __future__ import annotations

import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    from sweeper import interrupt  # light: the Ctrl-C handling is in place before anything heavy is imported

    with interrupt.remembered():  # from here a Ctrl-C that a finalizer swallows prints nothing and is honoured
        try:
            from sweeper.cli import check_versions, run_command

            why = check_versions()
        except KeyboardInterrupt:  # Ctrl-C while Python imports: one line, as every command ends on Ctrl-C
            print(interrupt.line("nothing was changed"), file=sys.stderr)
            return interrupt.EXIT_CODE
        if why:
            print(f"error: {why}", file=sys.stderr)
            return 2
        return run_command(sys.argv[1:] if argv is None else argv, prog="python -m sweeper")


if __name__ == "__main__":
    try:
        code = main()
    finally:
        from sweeper.interrupt import process_ending

        process_ending()  # a Ctrl-C in the interpreter's teardown would print a traceback
    sys.exit(code)
