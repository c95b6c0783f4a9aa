"""``lrzoo-report DIR``: aggregate the ``results.json`` of runs under DIR into tables and a plot.

    lrzoo-report runs/ --out runs/report

The tables are :mod:`lrzoo.lab.table` and :mod:`lrzoo.lab.report` (what each column means).

``lrzoo-report DIR --plan PLAN`` reports an ``lrzoo-sweep`` plan instead: the tuned comparison of
:mod:`lrzoo.lab.tuned` (the chosen learning rate per cell, bootstrap intervals, ties with the best,
missing cells); for a pre-training plan, the perplexity table of :mod:`lrzoo.lab.perplexity`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

from ..lab.plan import PlanError, load_plan
from ..lab.report import write_plain_report
from ..lab.table import REPORT_CSV, REPORT_MD, REPORT_PNG, collect
from ..lab.tuned import write_report
from ..runs.files import RESULTS_FILE
from .errors import entry_point


@entry_point("lrzoo-report")  # a user error (lrzoo.errors.UserError...) is one line; --debug: the traceback
def main(argv: Optional[Sequence[str]] = None) -> None:
    """Console entry point of ``lrzoo-report``."""
    parser = argparse.ArgumentParser(prog="lrzoo-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help=f"directory searched recursively for {RESULTS_FILE}")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: ROOT)")
    parser.add_argument("--select", choices=("final", "best"), default="final",
                        help="score of each run: its final evaluation or its best one (GLUE protocol)")
    parser.add_argument("--plan", type=Path, default=None,
                        help="an lrzoo-sweep plan: report its tuned comparison (chosen lr, bootstrap intervals, "
                             "ties with the best, missing cells) instead (lrzoo/lab/tuned.py)")
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        parser.error(f"{args.root} is not a directory")
    out = args.out or args.root
    written = f"{out / REPORT_MD}, {out / REPORT_CSV}, {out / REPORT_PNG}"
    if args.plan is not None:
        try:
            plan = load_plan(args.plan)
        except PlanError as err:
            parser.error(str(err))
        print(write_report(args.root, plan, out).text)
        print(f"wrote {written} (plan {args.plan})")
        return
    rows = collect(args.root, args.select)
    if not rows:
        parser.error(f"no finished runs ({RESULTS_FILE}) under {args.root}; run lrzoo-train first")
    print(write_plain_report(rows, out))
    n_runs = len({row["run"] for row in rows})
    print(f"wrote {written} ({n_runs} run{'s' if n_runs != 1 else ''}, {len(rows)} scores)")


if __name__ == "__main__":
    main()
