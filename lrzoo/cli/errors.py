"""What the command-line entry points print for a mistake in their input: its message, one line, and a
non-zero exit, never a traceback (``--debug`` or ``HYDRA_FULL_ERROR=1`` shows it).

What counts as a user error is :func:`lrzoo.errors.is_user_error` (a :class:`~lrzoo.errors.UserError`, or an
input error marked by :func:`lrzoo.errors.input_phase` while a run checks and loads what it was given).
Anything else, and anything raised once training has started, is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any, Callable, Optional, Sequence

from ..errors import is_user_error, message

DEBUG_FLAG = "--debug"


def debugging() -> bool:
    """``--debug`` was given (it sets ``HYDRA_FULL_ERROR=1``) or ``HYDRA_FULL_ERROR`` is set: show tracebacks."""
    return os.environ.get("HYDRA_FULL_ERROR", "").strip().lower() not in ("", "0", "false", "no")


def take_debug_flag(argv: list[str]) -> list[str]:
    """``argv`` without ``--debug``; when it was there, ``HYDRA_FULL_ERROR=1`` (Hydra's own switch for full
    tracebacks, which :func:`debugging` reads)."""
    if DEBUG_FLAG in argv:
        os.environ["HYDRA_FULL_ERROR"] = "1"
    return [arg for arg in argv if arg != DEBUG_FLAG]


def entry_point(prog: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate the ``main(argv=None)`` of an argparse command: ``--debug`` is taken out of its arguments, and a
    user error (:func:`is_user_error`) is printed as ``<prog>: error: <message>`` with exit status 2, as
    argparse does for a bad flag."""

    def decorate(main: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(main)
        def run(argv: Optional[Sequence[str]] = None) -> Any:
            args = take_debug_flag(list(sys.argv[1:] if argv is None else argv))
            try:
                return main(args)
            except Exception as err:
                if not is_user_error(err) or debugging():
                    raise
                print(f"{prog}: error: {message(err)}", file=sys.stderr)
                sys.exit(2)

        return run

    return decorate
