"""``lrzoo-sweep PLAN``: run a tuned comparison (learning rate chosen on held-out training rows, then seeds).

    lrzoo-sweep recipes/sweeps/glue_tuned.yaml                      # everything, 2 runs at a time
    lrzoo-sweep recipes/sweeps/glue_tuned.yaml --only lora,dora --tasks glue/mrpc --dry-run
    lrzoo-sweep recipes/sweeps/glue_tuned.yaml --max-minutes 120    # launch nothing new after 2 hours

The sweep itself is :mod:`lrzoo.lab.sweep` (what runs when, stopping, the summary); the plan and its rules are
:mod:`lrzoo.lab.plan` and :mod:`lrzoo.lab.choice`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ..lab.plan import PlanError, load_plan
from ..lab.sweep import run_plan
from .errors import entry_point


@entry_point("lrzoo-sweep")  # a user error (lrzoo.errors.UserError...) is one line; --debug: the traceback
def main(argv: Optional[Sequence[str]] = None) -> None:
    """Console entry point of ``lrzoo-sweep``."""
    parser = argparse.ArgumentParser(prog="lrzoo-sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("plan", help="sweep plan (YAML), e.g. recipes/sweeps/glue_tuned.yaml")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2), one thread each")
    parser.add_argument("--only", default=None, help="comma-separated methods of the plan to run")
    parser.add_argument("--tasks", default=None, help="comma-separated tasks of the plan to run")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="start no run after this many minutes (the runs in flight finish)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands that would start now")
    parser.add_argument("--retry-failed", action="store_true", help="also re-run the runs recorded as diverged")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run (default 1)")
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.threads < 1:
        parser.error("--jobs and --threads must be at least 1")
    try:
        plan = load_plan(args.plan).filtered(args.only.split(",") if args.only else None,
                                             args.tasks.split(",") if args.tasks else None)
    except PlanError as err:
        parser.error(str(err))
    sys.exit(run_plan(plan, jobs=args.jobs, max_minutes=args.max_minutes, dry_run=args.dry_run,
                      retry_failed=args.retry_failed, threads=args.threads))


if __name__ == "__main__":
    main()
