"""The live orders of an OrderIndex clustered by profile (CSR), derived in memory.

Order ids follow arrival, so a profile's orders are spread over the id range and a
per-profile sum over selected order ids scatters into one slot per profile id.  This
layout sorts the live orders by (profile, ts, order id): position k of the layout holds
order `perm[k]`, of profile `owner[k]`; a profile's orders are one contiguous run of
positions, in time order.  Over sorted positions, a per-profile sum is one sequential
np.add.reduceat, and a time window is a check of `ts` in the same order.

- `pos` maps an order id to its position (NONE for a deleted or unused id), so a bitmap
  of order ids becomes sorted positions with one gather and one sort (`positions`).
- `ts` and the key columns in layout order are made the first time a rule needs them
  (8 bytes a live order for each), and kept.
- The selected orders of an orders rule that does not depend on as_of are kept per
  layout as a bitmap of positions (`rows`, the last KEPT_RULES rules): a call then only
  reads them, applies its window and reduces.

Nothing here is stored: a layout belongs to one immutable OrderIndex (a weak cache,
`layout_of`), made on first use and dropped with it.  A write publishes a new index,
whose layout is rebuilt from its columns the first time a rule asks (one time sort,
which is cheap on orders that mostly arrive in time order, and one sort of packed
(profile, rank) keys).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
from pyroaring import BitMap

from bitseg.index.fields import bitmap_of, ids_of
from bitseg.index.order_index import NONE, OrderIndex

KEPT_RULES = 16  # orders rules whose positions a layout keeps (`rows`)
LOW = np.uint64(0xFFFFFFFF)


class OrderLayout:
    """The live orders of one OrderIndex sorted by (profile, ts, order id)."""

    def __init__(self, index: OrderIndex) -> None:
        self.index = index
        if len(index.live) == index.count:
            ids = np.arange(index.count, dtype=np.uint32)
        else:
            ids = ids_of(index.live)
        ts = index.ts_buf.take(ids)
        by_time = np.argsort(ts, kind="stable")  # timsort: runs of ids already in order
        packed = index.owner_buf.take(ids).take(by_time).astype(np.uint64) << np.uint64(32)
        packed |= np.arange(len(ids), dtype=np.uint64)
        packed.sort()
        rank = (packed & LOW).astype(np.intp)
        self.perm = ids.take(by_time.take(rank))  # order id at each position
        self.owner = (packed >> np.uint64(32)).astype(np.uint32)  # profile at each position
        self.size = len(ids)
        self.pos = np.full(index.count, NONE, dtype=np.uint32)
        self.pos[self.perm] = np.arange(self.size, dtype=np.uint32)
        self.latest = int(ts.max()) if len(ts) else None
        self._ts: np.ndarray | None = None
        self._keys: dict[str, tuple[np.ndarray, np.ndarray | None] | None] = {}
        self._rows: dict[Any, BitMap] = {}
        self._lock = threading.Lock()

    @property
    def ts(self) -> np.ndarray:
        """The ts of each position (int64), made on first use."""
        if self._ts is None:
            self._ts = self.index.ts_buf.take(self.perm)
        return self._ts

    def keys(self, name: str) -> tuple[np.ndarray, np.ndarray | None] | None:
        """(keys, validity or None when every live order has a value) of an order key
        column in position order, made on first use; None without the column."""
        if name not in self._keys:
            col = self.index.columns.get(name)
            if col is None:
                found = None
            else:
                valid = None if col.complete else col.valid.take(self.perm)
                if valid is not None and valid.all():
                    valid = None
                found = col.keys.take(self.perm), valid
            with self._lock:
                self._keys[name] = found
        return self._keys[name]

    def positions(self, orders: BitMap) -> np.ndarray:
        """The sorted positions (uint32) of these live order ids."""
        found = self.pos.take(ids_of(orders))
        found = found[found != NONE]
        found.sort()
        return found

    def rows(self, rule: Any, select: Callable[[], BitMap]) -> BitMap:
        """The positions of the orders an as_of-independent rule selects, kept for the
        last KEPT_RULES rules (select() gives its order ids when not kept)."""
        found = self._rows.get(rule)
        if found is None:
            found = bitmap_of(self.positions(select()))
            with self._lock:
                while len(self._rows) >= KEPT_RULES:
                    self._rows.pop(next(iter(self._rows)))
                self._rows[rule] = found
        return found

    def nbytes(self) -> int:
        """The bytes this layout holds now (arrays and kept bitmaps)."""
        arrays = [self.perm, self.owner, self.pos]
        if self._ts is not None:
            arrays.append(self._ts)
        for found in self._keys.values():
            if found is not None:
                arrays.extend(a for a in found if a is not None)
        bitmaps = sum(len(b.serialize()) for b in self._rows.values())
        return sum(a.nbytes for a in arrays) + bitmaps


_LAYOUTS: weakref.WeakKeyDictionary[OrderIndex, OrderLayout] = weakref.WeakKeyDictionary()
_BUILD = threading.Lock()


def layout_of(index: OrderIndex) -> OrderLayout:
    """The index's layout, made the first time it is asked for and kept while it lives."""
    found = _LAYOUTS.get(index)
    if found is None:
        with _BUILD:
            found = _LAYOUTS.get(index)
            if found is None:
                found = _LAYOUTS[index] = OrderLayout(index)
    return found
