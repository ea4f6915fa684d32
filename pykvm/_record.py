"""``repr``, ``==`` and ``hash`` for pykvm's plain record classes, written once.

The classes on ``pykvm run``'s import path are not dataclasses: the dataclasses
module imports ``inspect``, and ``@dataclass`` builds every class's methods with
``exec()``, which together cost a noticeable part of the VMM's start-up where
Python runs under emulation (the lab). Immutable value records are
``typing.NamedTuple`` classes; the others are plain classes with ``__slots__``
and a hand-written ``__init__``, which take their ``repr`` and ``==`` from here
and behave as the dataclass did:

    class Window:
        __slots__ = ("name", "base", "end")
        _repr_fields = _eq_fields = __slots__  # shown by repr / compared by ==, in order
        __repr__, __eq__ = record_repr, record_eq  # __eq__ without __hash__: unhashable

``record_eq`` compares records of the same class only (like a dataclass, a record
never equals a tuple or a record of another class); a frozen record adds
``__hash__ = record_hash`` over the same fields.
"""
from __future__ import annotations

from typing import Any, Tuple

__all__ = ["record_repr", "record_eq", "record_hash"]


def record_repr(self: Any) -> str:
    """``Name(field=value, ...)`` over ``_repr_fields``, as a dataclass shows itself."""
    names: Tuple[str, ...] = self._repr_fields
    return f"{type(self).__qualname__}({', '.join(f'{n}={getattr(self, n)!r}' for n in names)})"


def record_eq(self: Any, other: object) -> bool:
    """Equal when ``other`` is of the same class and every field in ``_eq_fields`` is equal."""
    if other.__class__ is not self.__class__:
        return NotImplemented
    names: Tuple[str, ...] = self._eq_fields
    return [getattr(self, n) for n in names] == [getattr(other, n) for n in names]


def record_hash(self: Any) -> int:
    """The hash of the ``_eq_fields`` values (for records that are never modified)."""
    return hash(tuple(getattr(self, n) for n in self._eq_fields))
