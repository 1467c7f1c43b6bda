"""What an OrderBatch queues before it writes: value changes of a value-typed field
(ValueQueue) and writes to a key column (SetQueue).  The row path appends one value at
a time; the bulk path (order_blocks.py) appends whole numpy arrays, kept as they are
and joined once when the batch flushes (copying them into the row path's array.array
cost a realloc and a copy per block, ~2 s of a 2M-order load)."""

from __future__ import annotations

from array import array
from collections.abc import Iterable
from typing import Any

import numpy as np


class _Parts:
    """Parallel columns appended to row by row (array.array) or an array at a time, in
    order; joined into numpy arrays on demand."""

    __slots__ = ("dtypes", "rows", "parts")

    def __init__(self, *codes: str) -> None:
        self.dtypes = [np.dtype(code) for code in codes]
        self.rows = tuple(array(code) for code in codes)
        self.parts: list[tuple[np.ndarray, ...]] = []

    def __len__(self) -> int:
        return len(self.rows[0]) + sum(len(part[0]) for part in self.parts)

    def extend(self, *columns: np.ndarray) -> None:
        if not len(columns[0]):
            return
        self._close_rows()
        self.parts.append(tuple(np.ascontiguousarray(c, dtype=t)
                                for c, t in zip(columns, self.dtypes, strict=True)))

    def arrays(self) -> tuple[np.ndarray, ...]:
        """Everything appended, in order (joined once, then kept as one part)."""
        self._close_rows()
        if not self.parts:
            return tuple(np.zeros(0, dtype=t) for t in self.dtypes)
        if len(self.parts) > 1:
            self.parts = [tuple(np.concatenate(cols) for cols in zip(*self.parts, strict=True))]
        return self.parts[0]

    def _close_rows(self) -> None:
        if len(self.rows[0]):
            self.parts.append(tuple(np.frombuffer(r, dtype=t).copy()
                                    for r, t in zip(self.rows, self.dtypes, strict=True)))
            self.rows = tuple(array(r.typecode) for r in self.rows)


class ValueQueue:
    """Queued additions and removals of one value-typed field (flushed in order)."""

    __slots__ = ("codes", "values", "adds", "removals")

    def __init__(self) -> None:
        self.codes: dict[Any, int] = {}
        self.values: list = []
        self.clear()

    def clear(self) -> None:
        self.adds, self.removals = _Parts("I", "I"), _Parts("I", "I")

    @property
    def empty(self) -> bool:
        return not len(self.adds) and not len(self.removals)

    def code(self, value: Any) -> int:
        """The queue's code of a value (new values get the next one)."""
        code = self.codes.get(value)
        if code is None:
            code = self.codes[value] = len(self.codes)
            self.values.append(value)
        return code

    def push(self, oid: int, items: Iterable, removing: bool) -> None:
        ids, codes = (self.removals if removing else self.adds).rows
        for item in items:
            ids.append(oid)
            codes.append(self.code(item))

    def extend(self, ids: np.ndarray, codes: np.ndarray) -> None:
        """Queue additions: ids[i] gets the value of code codes[i]."""
        self.adds.extend(ids, codes)

    def added(self) -> tuple[np.ndarray, np.ndarray]:
        return self.adds.arrays()  # type: ignore[return-value]

    def removed(self) -> tuple[np.ndarray, np.ndarray]:
        return self.removals.arrays()  # type: ignore[return-value]


class SetQueue:
    """Queued writes to one column: (id, key, valid); the last write of an id wins."""

    __slots__ = ("parts",)

    def __init__(self) -> None:
        self.parts = _Parts("I", "q", "b")

    def __len__(self) -> int:
        return len(self.parts)

    def set(self, i: int, key: int, valid: bool = True) -> None:
        ids, keys, valids = self.parts.rows
        ids.append(i)
        keys.append(key)
        valids.append(valid)

    def extend(self, ids: np.ndarray, keys: np.ndarray) -> None:
        """Queue valid values: keys[i] for ids[i]."""
        self.parts.extend(ids, keys, np.ones(len(ids), dtype=np.int8))

    def written(self) -> np.ndarray:
        """The ids written, in order, each as often as written."""
        return self.parts.arrays()[0]

    def keep(self, ids: np.ndarray, keys: np.ndarray, valid: np.ndarray) -> None:
        """Hold only these writes (the rest written out by a spill, OrderBatch)."""
        self.parts = _Parts("I", "q", "b")
        self.parts.extend(ids, keys, valid.astype(np.int8))

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ids, keys, valid8 = self.parts.arrays()
        valid = valid8.astype(bool)
        if len(ids) > 1 and not (ids[1:] > ids[:-1]).all():  # keep each id's last write
            rev = ids[::-1]
            _, first = np.unique(rev, return_index=True)
            pick = len(ids) - 1 - first
            ids, keys, valid = ids[pick], keys[pick], valid[pick]
        return ids, keys, valid
