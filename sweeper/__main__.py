"""Commands beside the sweep itself.

    python -m sweeper plan schedule=under,sweet,over          # steps <-> epochs <-> tokens, VRAM, fit
    python -m sweeper plan schedule=under,sweet,over data=banking77 model=qwen2.5-1.5b
    python -m sweeper report                                  # best step count per dataset, PNG + HTML
    python -m sweeper dashboard                               # optuna-dashboard on 127.0.0.1:8080
    python -m sweeper status                                  # trials by state, running workers, SLURM jobs
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sweeper", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    plan = sub.add_parser("plan", help="plan every run of a sweep without training")
    plan.add_argument("overrides", nargs="*", help="Hydra overrides, as for `python train.py -m`")
    rep = sub.add_parser("report", help="tables, diagnosis and the step count to train each dataset for")
    rep.add_argument("--storage", help="storage URL (default: the sweeper's, from conf/)")
    rep.add_argument("--study", action="append", help="study name (repeatable; default: every study)")
    rep.add_argument("--out", default=None, help="output folder (default: <paths.output_dir>/report)")
    dash = sub.add_parser("dashboard", help="optuna-dashboard on the sweep's storage")
    dash.add_argument("--storage", help="storage URL (default: the sweeper's, from conf/)")
    dash.add_argument("--host", default="127.0.0.1", help="interface to bind (default: this machine only)")
    dash.add_argument("--port", type=int, default=8080)
    stat = sub.add_parser("status", help="where each study stands: trials by state, running workers, SLURM jobs")
    stat.add_argument("--storage", help="storage URL (default: the sweeper's, from conf/)")
    stat.add_argument("--study", action="append", help="study name (repeatable; default: every study)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from sweeper import passwords

    passwords.install_log_filter(passwords.secret_values({}, getattr(args, "storage", None)))  # no password logged
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its CPU backend warns on import
    os.environ.setdefault("TQDM_DISABLE", "1")
    if args.command == "plan":
        from sweeper.plan_command import main as plan_main

        return plan_main(args.overrides)
    if args.command == "status":
        from sweeper.status_command import status

        return status(args.storage, args.study)
    from sweeper.report_command import dashboard, report

    if args.command == "report":
        return report(args.storage, args.study, args.out)
    return dashboard(args.storage, args.host, args.port)


if __name__ == "__main__":
    sys.exit(main())
