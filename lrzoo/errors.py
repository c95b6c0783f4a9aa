"""The one error type for a mistake in what the user gave (a config key, a data file, a command-line flag).

Its message names the mistake and the fix in one line. The command-line entry points print that message
alone and exit non-zero (``--debug`` or ``HYDRA_FULL_ERROR=1`` shows the traceback); everything else still
ends in a traceback, because it is a bug. It is a ``ValueError``, so code that catches bad values keeps
catching it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Optional


class UserError(ValueError):
    """A mistake in the user's input, with a message that says how to fix it."""


def did_you_mean(word: str, choices: Iterable[str]) -> Optional[str]:
    """The closest of ``choices`` to ``word`` (a typo's likely intent), or None when none is close."""
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return close[0] if close else None
