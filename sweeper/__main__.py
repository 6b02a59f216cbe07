"""Commands beside the sweep itself.

    python -m sweeper plan schedule=under,sweet,over          # steps <-> epochs <-> tokens, VRAM, fit
    python -m sweeper plan schedule=under,sweet,over data=banking77 model=qwen2.5-1.5b
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sweeper", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    plan = sub.add_parser("plan", help="plan every run of a sweep without training")
    plan.add_argument("overrides", nargs="*", help="Hydra overrides, as for `python train.py -m`")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its CPU backend warns on import
    os.environ.setdefault("TQDM_DISABLE", "1")
    if args.command == "plan":
        from sweeper.plan_command import main as plan_main

        return plan_main(args.overrides)
    return 2  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
