"""What the command-line entry points print for a mistake in their input: its message, one line, and a
non-zero exit, never a traceback (``--debug`` or ``HYDRA_FULL_ERROR=1`` shows it).

A user error is a :class:`lrzoo.errors.UserError`, or any ``ValueError``/``TypeError``/``OSError``/
``ImportError`` raised while an entry point checks and loads what it was given (:func:`input_phase`: the
config, the data, the model, the adapter's options, the checkpoint to resume): every check there raises one
of those with a message naming the bad input. The exception keeps its type (library callers and tests
still catch ``FileNotFoundError``...); it is only marked. Anything else, and anything raised once training
has started, is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from typing import Any, Callable, Iterator, Optional, Sequence

from ..errors import UserError

INPUT_ERRORS: tuple[type[BaseException], ...] = (ValueError, TypeError, OSError, ImportError)
_MARK = "lrzoo_user_error"
DEBUG_FLAG = "--debug"


@contextlib.contextmanager
def input_phase(*also: type[BaseException]) -> Iterator[None]:
    """Mark errors of :data:`INPUT_ERRORS` (and ``also``) raised inside as the user's input errors."""
    try:
        yield
    except (*INPUT_ERRORS, *also) as err:
        with contextlib.suppress(AttributeError):
            setattr(err, _MARK, True)
        raise


def is_user_error(err: BaseException) -> bool:
    return isinstance(err, UserError) or getattr(err, _MARK, False)


def debugging() -> bool:
    """``--debug`` was given (it sets ``HYDRA_FULL_ERROR=1``) or ``HYDRA_FULL_ERROR`` is set: show tracebacks."""
    return os.environ.get("HYDRA_FULL_ERROR", "").strip().lower() not in ("", "0", "false", "no")


def take_debug_flag(argv: list[str]) -> list[str]:
    """``argv`` without ``--debug``; when it was there, ``HYDRA_FULL_ERROR=1`` (Hydra's own switch for full
    tracebacks, which :func:`debugging` reads)."""
    if DEBUG_FLAG in argv:
        os.environ["HYDRA_FULL_ERROR"] = "1"
    return [arg for arg in argv if arg != DEBUG_FLAG]


def message(err: BaseException) -> str:
    """The error's own words (its first lines; an empty message gives its type)."""
    text = str(err).strip()
    if isinstance(err, KeyError) and text.startswith(("'", '"')):
        text = text[1:-1]
    return text or type(err).__name__


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
