"""The one error type for a mistake in what the user gave (a config key, a data file, a command-line flag).

Its message names the mistake and the fix in one line. The command-line entry points print that message
alone and exit non-zero (``--debug`` or ``HYDRA_FULL_ERROR=1`` shows the traceback); everything else still
ends in a traceback, because it is a bug. It is a ``ValueError``, so code that catches bad values keeps
catching it.
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Iterable, Iterator
from typing import Optional


class UserError(ValueError):
    """A mistake in the user's input, with a message that says how to fix it."""


def did_you_mean(word: str, choices: Iterable[str]) -> Optional[str]:
    """The closest of ``choices`` to ``word`` (a typo's likely intent), or None when none is close."""
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return close[0] if close else None


# A user error is a UserError, or any ValueError/TypeError/OSError/ImportError raised while a run checks and loads
# what it was given (input_phase: the config, the data, the model, the adapter's options, the checkpoint to
# resume): every check there raises one of those with a message naming the bad input. The exception keeps its
# type (library callers and tests still catch FileNotFoundError...); it is only marked.
INPUT_ERRORS: tuple[type[BaseException], ...] = (ValueError, TypeError, OSError, ImportError)
USER_ERROR_MARK = "lrzoo_user_error"


@contextlib.contextmanager
def input_phase(*also: type[BaseException]) -> Iterator[None]:
    """Mark errors of :data:`INPUT_ERRORS` (and ``also``) raised inside as the user's input errors."""
    try:
        yield
    except (*INPUT_ERRORS, *also) as err:
        with contextlib.suppress(AttributeError):
            setattr(err, USER_ERROR_MARK, True)
        raise


def is_user_error(err: BaseException) -> bool:
    return isinstance(err, UserError) or getattr(err, USER_ERROR_MARK, False)


def message(err: BaseException) -> str:
    """The error's own words (its first lines; an empty message gives its type)."""
    text = str(err).strip()
    if isinstance(err, KeyError) and text.startswith(("'", '"')):
        text = text[1:-1]
    return text or type(err).__name__
