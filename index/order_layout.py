"""The live orders of an OrderIndex clustered by profile (CSR), derived in memory.

Order ids follow arrival, so a profile's orders are spread over the id range and a
per-profile sum over selected order ids scatters into one slot per profile id (at 10M
profiles an 80 MB array, a cache miss a row, and passes over every profile id after).
This layout sorts the live orders by (profile, ts, order id): position k holds order
`perm[k]`; a profile's orders are one contiguous run of positions, in time order.
`pos` maps an order id back to its position (NONE: deleted or unused).

An orders rule that does not depend on as_of selects the same orders at every call:
its rows are kept per layout in this order (`Kept`, the last KEPT_RULES rules): their
order ids, owners, ts, where each profile's run starts and, once aggregated, the
cumulative sums of the key column.  A call then reads only those arrays, in order: the
window is a mask over the kept ts, whose rows in a run are one stretch (a run is in
time order); the stretches' first and last rows are where the mask turns on and off
(two flatnonzero), so only profiles with a row in the window are grouped at all, and a
per-profile sum is the difference of the cumulative sums at a stretch's ends (or one
read of each row's sum to its run's end, when every stretch ends with its run); min / max
are one reduceat.  No scatter, and nothing sized by the largest profile id.

Memory: perm and pos, 8 bytes a live order; a kept rule 4 + 4 + 8 + 1 bytes a row it
selects, 8 more for each column aggregated over it (keys, or its sums to each run's end
for a sum or avg), 12 bytes a profile with such rows.  An items rule's lines: 4 + 8 + 1
+ 4 bytes a line, 8 for each summed value.

Nothing here is stored: a layout belongs to one immutable OrderIndex (a weak cache,
`layout_of`), made on first use and dropped with it.  A write publishes a new index,
whose layout is rebuilt from its columns the first time a rule asks (one stable sort by
time, cheap on orders that mostly arrive in time order, then one sort of packed
(profile, rank) keys): at 10M profiles (20M orders) ~8 s on the benchmark machine, so
large indexes build it on a thread and answer from rows meanwhile.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
from pyroaring import BitMap

from bitseg.index.fields import ids_of
from bitseg.index.order_index import NONE, OrderIndex

KEPT_RULES = 16  # orders rules whose rows a layout keeps (`kept`), the last used
KEPT_BYTES = 384 << 20  # and at most this many bytes of them (the last one always)
LOW = np.uint64(0xFFFFFFFF)


class Kept:
    """The live orders an as_of-independent orders rule selects, in layout order (by
    profile, then time), with what its evaluations read: their order ids, owners, ts,
    where each profile's run starts (`newrun`, and its bounds `bounds[g]` …
    `bounds[g + 1]`, profile `profiles[g]`) and, made on first use, the key columns
    aggregated over them."""

    def __init__(self, index: OrderIndex, ids: np.ndarray) -> None:
        self.index, self.ids = index, ids
        self.owners = owners = index.owner_buf.take(ids)
        self.newrun = np.concatenate(([True], owners[1:] != owners[:-1])) if len(ids) \
            else np.zeros(0, dtype=bool)
        starts = np.flatnonzero(self.newrun)
        self.bounds = np.append(starts, len(ids))
        self.profiles = owners.take(starts)
        self.ts = index.ts_buf.take(ids)
        self.latest = int(self.ts.max()) if len(ids) else None
        self.most = int(np.diff(self.bounds).max(initial=0))  # the longest run
        self._keys: dict[str, tuple[np.ndarray, np.ndarray | None] | None] = {}
        self._tail: dict[str, np.ndarray | None] = {}

    def __len__(self) -> int:
        return len(self.ids)

    def prefix(self, name: str) -> np.ndarray | None:
        """The cumulative sums of an order key column over these rows (int64, wrapping,
        a leading 0: the sum of rows a … b-1 is prefix[b] - prefix[a] whenever it fits
        int64), made when asked for (tail keeps what it needs); None without the column
        or when some row lacks a value."""
        col = self.index.columns.get(name)
        if col is None or not (col.complete or bool(col.valid.take(self.ids).all())):
            return None
        found = np.zeros(len(self.ids) + 1, dtype=np.int64)
        np.cumsum(col.keys.take(self.ids), out=found[1:])
        return found

    def bound(self, name: str) -> int:
        """A bound of |key| of a column's rows (0 without the column)."""
        col = self.index.columns.get(name)
        return 0 if col is None else col.bound

    def tail(self, name: str) -> np.ndarray | None:
        """Per row, the sum of an order key column from it to the end of its run (int64,
        exact whenever a run's sum fits int64), from the cumulative sums, made on first
        use and kept (the sum of a stretch a … b-1 of a run is tail[a] - tail[b], or
        tail[a] when b ends the run); None as for prefix."""
        if name not in self._tail:
            prefix = self.prefix(name)
            found = None
            if prefix is not None:
                run_ends = np.repeat(self.bounds[1:], np.diff(self.bounds))
                found = prefix.take(run_ends) - prefix[:-1]
            self._tail[name] = found
        return self._tail[name]

    def keys(self, name: str) -> tuple[np.ndarray, np.ndarray | None] | None:
        """(keys, validity or None when every row has a value) of an order key column
        for these rows, made on first use and kept; None without the column."""
        if name not in self._keys:
            col = self.index.columns.get(name)
            found = None
            if col is not None:
                valid = None if col.complete else col.valid.take(self.ids)
                found = col.keys.take(self.ids), None if valid is None or valid.all() else valid
            self._keys[name] = found
        return self._keys[name]

    def nbytes(self) -> int:
        """The bytes this kept rule holds (its ids shared with the layout when it keeps
        every live order)."""
        arrays = [self.ids, self.owners, self.newrun, self.bounds, self.profiles, self.ts]
        for found in self._keys.values():
            if found is not None:
                arrays.extend(a for a in found if a is not None)
        arrays.extend(a for a in self._tail.values() if a is not None)
        return sum(a.nbytes for a in arrays)


class OrderLayout:
    """The live orders of one OrderIndex sorted by (profile, ts, order id)."""

    def __init__(self, index: OrderIndex) -> None:
        self.index = index
        if len(index.live) == index.count:
            ids = np.arange(index.count, dtype=np.uint32)
        else:
            ids = ids_of(index.live)
        by_time = np.argsort(index.ts_buf.take(ids), kind="stable")  # timsort: runs of
        # ids already in time order are merged, not sorted again
        packed = index.owner_buf.take(ids).take(by_time).astype(np.uint64) << np.uint64(32)
        packed |= np.arange(len(ids), dtype=np.uint64)
        packed.sort()
        self.perm = ids.take(by_time.take((packed & LOW).astype(np.intp)))  # order ids
        del packed, by_time
        self.size = len(ids)
        self.pos = np.full(index.count, NONE, dtype=np.uint32)
        self.pos[self.perm] = np.arange(self.size, dtype=np.uint32)
        self._kept: dict[Any, Kept] = {}
        self._making: set[Any] = set()  # rules whose rows a thread is making
        self._lock = threading.Lock()

    def positions(self, orders: BitMap) -> np.ndarray:
        """The sorted positions (uint32) of these live order ids."""
        found = self.pos.take(ids_of(orders))
        found = found[found != NONE]
        found.sort()
        return found

    def kept(self, rule: Any, select: Callable[[], BitMap | Kept], wait: bool = True
             ) -> Kept | None:
        """The rows of an as_of-independent orders rule, kept for the last KEPT_RULES
        rules (select() gives its order ids when not kept, or the rows made: an items
        rule's KeptLines, see lines). Unless `wait`, rows not kept
        yet are made on a thread and None is returned (the caller answers from rows
        meanwhile): at 10M profiles a rule's first use on a new index takes seconds."""
        with self._lock:
            found = self._kept.pop(rule, None)
            if found is not None:
                self._kept[rule] = found  # the last used
                return found
            if not wait:
                if rule not in self._making:
                    self._making.add(rule)
                    threading.Thread(target=self._make, args=(rule, select),
                                     name="order-kept", daemon=True).start()
                return None
        return self._keep(rule, select)

    def _make(self, rule: Any, select: Callable[[], BitMap | Kept]) -> None:
        try:
            self._keep(rule, select)
        finally:
            with self._lock:
                self._making.discard(rule)

    def _keep(self, rule: Any, select: Callable[[], BitMap | Kept]) -> Kept:
        chosen = select()
        if isinstance(chosen, Kept):
            found = chosen
        else:
            positions = self.positions(chosen)
            ids = self.perm if len(positions) == self.size else self.perm.take(positions)
            found = Kept(self.index, ids)
        with self._lock:
            self._kept.pop(rule, None)
            total = self._own(found) + sum(self._own(k) for k in self._kept.values())
            while self._kept and (len(self._kept) >= KEPT_RULES or total > KEPT_BYTES):
                total -= self._own(self._kept.pop(next(iter(self._kept))))
            self._kept[rule] = found
        return found

    def lines(self, lines: np.ndarray, orders: BitMap) -> KeptLines:
        """KeptLines of these item ids (sorted) whose order is live and among `orders`:
        sorted by their order's position (stable: then by item id)."""
        index = self.index
        owner = index.item_owner_buf.take(lines)
        wanted = np.zeros(index.count, dtype=bool)
        wanted[ids_of(orders).astype(np.intp)] = True
        keep = owner != NONE
        keep[keep] = wanted.take(owner[keep].astype(np.intp))
        lines, owner = np.compress(keep, lines), np.compress(keep, owner)
        pos = self.pos.take(owner.astype(np.intp))
        live = pos != NONE
        lines, owner, pos = lines[live], owner[live], pos[live]
        by_position = np.argsort(pos, kind="stable")
        return KeptLines(index, owner.take(by_position), lines.take(by_position))

    def nbytes(self) -> int:
        """The bytes this layout holds now (its arrays and the kept rules' rows)."""
        return self.perm.nbytes + self.pos.nbytes + sum(map(self._own, self._kept.values()))

    def _own(self, kept: Kept) -> int:
        """A kept rule's bytes, less its ids when they are the layout's own."""
        return kept.nbytes() - (kept.ids.nbytes if kept.ids is self.perm else 0)


class KeptLines(Kept):
    """The current item lines an as_of-independent items rule selects of the live orders
    an as_of-independent orders rule selects, in layout order (by profile, then their
    order's time, then item id), for the `items` rule (index/items.py): owners and ts
    are each line's order's, `lines` the item ids (`ids`, their orders, not kept).  Its columns
    are line values: "qty", "price", "spend" (price × qty of the line's keys), 0 where a
    line lacks it, and "n:" + one of them, 1 where a line has it; only cumulative sums
    (prefix, tail) are read, never keys."""

    def __init__(self, index: OrderIndex, ids: np.ndarray, lines: np.ndarray) -> None:
        super().__init__(index, ids)
        self.ids, self.lines = ids[:0], lines  # 4 bytes a line less
        self._bounds: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.lines)

    def _values(self, name: str) -> np.ndarray | None:
        """The int64 values of a line column (see the class), None when a value could
        overflow int64; records the column's bound."""
        of = name[2:] if name.startswith("n:") else name
        names = ("items.qty", "items.price") if of == "spend" else ("items." + of,)
        cols = [self.index.item_columns.get(n) for n in names]
        lines = self.lines
        if any(col is None for col in cols):
            self._bounds[name] = 0
            return np.zeros(len(lines), dtype=np.int64)
        valid = None
        for col in cols:
            if not col.complete:
                mine = col.valid.take(lines)
                valid = mine if valid is None else valid & mine
        if name.startswith("n:"):
            self._bounds[name] = 1
            return np.ones(len(lines), np.int64) if valid is None else valid.astype(np.int64)
        bound = 1
        for col in cols:
            bound *= col.bound
        if bound >= 2**63:
            return None
        self._bounds[name] = bound
        values = cols[0].keys.take(lines)
        for col in cols[1:]:
            values = values * col.keys.take(lines)
        return values if valid is None else np.where(valid, values, 0)

    def prefix(self, name: str) -> np.ndarray | None:
        """Cumulative sums of a line column (see Kept.prefix); None when a value could
        overflow int64."""
        values = self._values(name)
        if values is None:
            return None
        found = np.zeros(len(values) + 1, dtype=np.int64)
        np.cumsum(values, out=found[1:])
        return found

    def bound(self, name: str) -> int:
        if name not in self._bounds:
            self.tail(name)
        return self._bounds.get(name, 2**63)

    def keys(self, name: str) -> tuple[np.ndarray, np.ndarray | None] | None:
        raise NotImplementedError("item lines are read by cumulative sums only")

    def nbytes(self) -> int:
        return super().nbytes() + self.lines.nbytes


_LAYOUTS: weakref.WeakKeyDictionary[OrderIndex, OrderLayout] = weakref.WeakKeyDictionary()
_BUILDING: weakref.WeakSet[OrderIndex] = weakref.WeakSet()
_BUILD = threading.Lock()


def layout_of(index: OrderIndex, wait: bool = True) -> OrderLayout | None:
    """The index's layout, made the first time it is asked for and kept while it lives.
    Unless `wait`, a layout not made yet is made on a thread and None is returned (the
    caller answers from rows meanwhile): at 10M profiles the sorts take seconds."""
    found = _LAYOUTS.get(index)
    if found is not None:
        return found
    if wait:
        with _BUILD:
            found = _LAYOUTS.get(index)
            if found is None:
                found = _LAYOUTS[index] = OrderLayout(index)
        return found
    with _BUILD:
        if index in _BUILDING or index in _LAYOUTS:
            return _LAYOUTS.get(index)
        _BUILDING.add(index)
    ref = weakref.ref(index)
    threading.Thread(target=_build, args=(ref,), name="order-layout", daemon=True).start()
    return None


def _build(ref: weakref.ref[OrderIndex]) -> None:
    index = ref()
    if index is not None:  # else the index was dropped before the thread ran
        layout_of(index, wait=True)
