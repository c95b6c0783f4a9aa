"""A name→thing table: the one shape of lrzoo's registries (adapters, optimizers, procedures, kernels, tasks,
metrics, loggers, models).

Every table refuses a second entry under a name it holds and answers an unknown name with one line that
names the closest known one (:func:`lrzoo.errors.did_you_mean`) and lists them all, as a
:class:`lrzoo.errors.UserError`: a typo in a config or a call is the user's to fix, not a traceback.

A :class:`Table` is a ``dict`` (read it, iterate it, ``in`` it as one), so code that only reads a table
needs nothing new; it adds :meth:`Table.add`, :meth:`Table.lookup` and :meth:`Table.names`. It is a leaf:
it imports nothing of lrzoo but :mod:`lrzoo.errors`, so ``kernels/`` and ``tasks/`` may use it.
"""

from __future__ import annotations

from typing import Iterable, Optional, TypeVar

from .errors import UserError, did_you_mean

T = TypeVar("T")


class Table(dict[str, T]):
    """Names (lower-case identifiers or paths such as ``"glue/sst2"``) → things, in registration order.

    Args:
        kind: what one entry is, for messages (``"adapter"``, ``"optimizer method"``).
        plural: its plural (default ``kind + "s"``).
        hint: a sentence appended to the unknown-name message (how to add one).
        entries: initial ``(name, thing)`` pairs or mapping, added with :meth:`add`.
    """

    def __init__(self, kind: str, *, plural: Optional[str] = None, hint: str = "",
                 entries: Optional[Iterable[tuple[str, T]] | dict[str, T]] = None):
        super().__init__()
        self.kind, self.plural, self.hint = kind, plural or f"{kind}s", hint
        for name, thing in (entries.items() if isinstance(entries, dict) else entries or ()):
            self.add(name, thing)

    def refuse_taken(self, name: str) -> None:
        """Fail as :meth:`add` would if ``name`` is taken (for a registration with side effects to do first)."""
        if name in self:
            raise ValueError(f"A {self.kind} named {name!r} is already registered.")

    def add(self, name: str, thing: T, *, replace: bool = False) -> T:
        """Register ``thing`` under ``name``; a name already taken is refused unless ``replace``."""
        if not replace:
            self.refuse_taken(name)
        self[name] = thing
        return thing

    def lookup(self, name: str) -> T:
        """The thing registered as ``name``; an unknown name fails with the closest known one and the list."""
        try:
            return self[name]
        except (KeyError, TypeError):
            raise UserError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        """``Unknown <kind> 'x'. Did you mean 'y'? Known <plural>: a, b, c. <hint>`` (one line)."""
        close = did_you_mean(name, self)
        guess = f" Did you mean {close!r}?" if close else ""
        return (f"Unknown {self.kind} {name!r}.{guess} Known {self.plural}: {', '.join(self.names(sort=True))}."
                + (f" {self.hint}" if self.hint else ""))

    def names(self, *, sort: bool = False) -> list[str]:
        """The registered names, in registration order (``sort=True``: alphabetical)."""
        return sorted(self) if sort else list(self)

    def __reduce__(self):  # a dict subclass with attributes: pickle/deepcopy keep both
        return (self.__class__, (self.kind,), {"plural": self.plural, "hint": self.hint}, None, iter(self.items()))


__all__ = ["Table"]
