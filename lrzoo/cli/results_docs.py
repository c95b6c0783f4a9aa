"""``make results-docs``: rewrite the generated parts of docs/ from the tuned sweeps' runs.

    python -m lrzoo.cli.results_docs            # runs/ and docs/ of the checkout

The rewriting itself is :mod:`lrzoo.lab.results_docs`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

from ..lab.plan import PlanError
from ..lab.results_docs import refresh


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lrzoo.cli.results_docs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkout", type=Path, default=Path("."), help="where runs/ and recipes/ are (default: .)")
    parser.add_argument("--docs", type=Path, default=None, help="the docs folder to rewrite (default: CHECKOUT/docs)")
    args = parser.parse_args(argv)
    docs = args.docs or args.checkout / "docs"
    try:
        changed = refresh(args.checkout, docs)
    except (PlanError, ValueError) as err:
        parser.error(str(err))
    print("[results-docs] " + (f"rewrote {', '.join(map(str, changed))}" if changed else "nothing changed"))


if __name__ == "__main__":
    main()
