"""What an OrderBatch queues before it writes: value changes of a value-typed field
(ValueQueue) and writes to a key column (SetQueue).  The bulk path (order_blocks.py)
appends to the same queues."""

from __future__ import annotations

from array import array
from collections.abc import Iterable
from typing import Any

import numpy as np


class ValueQueue:
    """Queued additions and removals of one value-typed field (flushed in order)."""

    __slots__ = ("codes", "values", "add_ids", "add_codes", "rm_ids", "rm_codes")

    def __init__(self) -> None:
        self.codes: dict[Any, int] = {}
        self.values: list = []
        self.clear()

    def clear(self) -> None:
        self.add_ids, self.add_codes = array("I"), array("I")
        self.rm_ids, self.rm_codes = array("I"), array("I")

    def push(self, oid: int, items: Iterable, removing: bool) -> None:
        ids, codes = (self.rm_ids, self.rm_codes) if removing else (self.add_ids, self.add_codes)
        for item in items:
            code = self.codes.get(item)
            if code is None:
                code = self.codes[item] = len(self.codes)
                self.values.append(item)
            ids.append(oid)
            codes.append(code)


class SetQueue:
    """Queued writes to one column: (id, key, valid); the last write of an id wins."""

    __slots__ = ("ids", "keys", "valid")

    def __init__(self) -> None:
        self.ids, self.keys, self.valid = array("I"), array("q"), array("b")

    def set(self, i: int, key: int, valid: bool = True) -> None:
        self.ids.append(i)
        self.keys.append(key)
        self.valid.append(valid)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ids = np.frombuffer(self.ids, dtype=np.uint32)
        keys = np.frombuffer(self.keys, dtype=np.int64)
        valid = np.frombuffer(self.valid, dtype=np.int8).astype(bool)
        if len(ids) > 1 and not (ids[1:] > ids[:-1]).all():  # keep each id's last write
            rev = ids[::-1]
            _, first = np.unique(rev, return_index=True)
            pick = len(ids) - 1 - first
            ids, keys, valid = ids[pick], keys[pick], valid[pick]
        return ids, keys, valid
