"""Structures of arrays that keep their own columns in step.

The simulator holds its state as tables: one row per user slot, per cloudlet or
per migration in flight, one numpy array per column. Kept by hand, every new
column is one more array that each insertion, removal and growth must remember;
forgetting one leaves rows misaligned with no error. A `Columns` dataclass
declares its columns once (`field(metadata=column(fill, dtype))`), and growing,
filtering and appending rows act on all of them together, always vectorised:
the only Python loop runs over the columns, never over the rows.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Self

import numpy as np
from numpy.typing import NDArray


@dataclass(frozen=True)
class _Spec:
    name: str
    fill: Any  # the value of a row that `grow` adds
    dtype: Any
    shape: tuple[int, ...]  # a row's shape: () for a scalar, (2,) for a position


def column(fill: Any, dtype: Any, shape: tuple[int, ...] = ()) -> dict[str, Any]:
    """The metadata of a `Columns` field: its rows' dtype and shape, and the value
    of a new row."""
    return {"fill": fill, "dtype": dtype, "shape": shape}


_SPECS: dict[type[Any], tuple[_Spec, ...]] = {}


def _specs(cls: type[Any]) -> tuple[_Spec, ...]:
    """The columns of a table class, read from its dataclass fields once."""
    got = _SPECS.get(cls)
    if got is None:
        got = _SPECS[cls] = tuple(
            _Spec(f.name, f.metadata["fill"], f.metadata["dtype"], f.metadata["shape"])
            for f in fields(cls))
    return got


@dataclass(eq=False)
class Columns:
    """A table whose dataclass fields are its columns, all as long as the table."""

    @classmethod
    def empty(cls, rows: int = 0) -> Self:
        """A table of `rows` rows, each column at its fill."""
        return cls(**{s.name: np.full((rows, *s.shape), s.fill, dtype=s.dtype)
                      for s in _specs(cls)})

    def __len__(self) -> int:
        first: NDArray[Any] = getattr(self, _specs(type(self))[0].name)
        return len(first)

    def grow(self, rows: int) -> None:
        """At least `rows` rows: new ones at the end, at each column's fill."""
        have = len(self)
        if have >= rows:
            return
        for s in _specs(type(self)):
            a: NDArray[Any] = getattr(self, s.name)
            extra = np.full((rows - have, *a.shape[1:]), s.fill, dtype=a.dtype)
            setattr(self, s.name, np.concatenate([a, extra]))

    def keep(self, rows: NDArray[np.bool_]) -> None:
        """Keep only the rows where `rows` is true, in order."""
        for s in _specs(type(self)):
            setattr(self, s.name, getattr(self, s.name)[rows])

    def extend(self, more: Self) -> None:
        """Append the rows of `more` (a table of the same columns and row shapes)."""
        for s in _specs(type(self)):
            setattr(self, s.name, np.concatenate([getattr(self, s.name), getattr(more, s.name)]))
