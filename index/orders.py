"""Orders: a child collection of profiles, and the `orders` rule (CONTRACT §1, §2.4):
its evaluation over an OrderIndex.  The keys of the "orders" database are in keys.py,
its columns and bitmaps in chunks in order_keys.py, the index in order_index.py, the
writer in order_batch.py.

A query {"orders": R, "window": W, "having": H} runs as: R becomes a bitmap of order ids
(bitmap algebra over the order field indexes; numeric conditions are numpy scans; item
conditions on numbers project item ids onto orders); AND the window (ranges of order ids
from `runs`); the selected ids are gathered into owner/of-columns and aggregated per
profile in exact int64: few rows are grouped by one sort (ufunc.reduceat), many by
np.bincount / ufunc.at over profile ids; the comparison with H (exact, against the
Fraction) picks the profiles.  No Python loop runs over orders at query time.

Choices where the contract is silent
- Every order line must carry `id`, `profile` and `ts` (also when it updates an order);
  ids are non-empty strings or integers (taken as their decimal string), at most 400
  bytes.  A later line for the same id replaces the keys it gives, keeps the ones it
  omits, removes the ones given as null; `items` given replaces all items, `items: null`
  removes them.  `profile` and `ts` may change.
- Order field names must not start with "items."; item keys must not be `qty_sum`,
  `qty_each` or `distinct` (they would shadow the derived readings).  A null item value
  means the item lacks that key.  Types come from schema.orders ("status",
  "items.brand", …) or are inferred from the first non-null value, as for profiles.
- `items.F` (any type): eq / in / gt / gte / lt / lte / between / anniversary_in are true
  when ANY item satisfies; exists when any item has F.  Like a keywords field, `ne X` is
  "some item has F and no item has X", `not_in` "some item has F and no item has any of
  them", not_exists "no item has F" (orders without items included).  Each condition is
  evaluated on its own: {"and": [items.brand eq acme, items.qty gt 2]} does not require
  the same item to satisfy both.
- `items.qty_each OP V`: the order has at least one item and every item satisfies
  `items.qty OP V` read per item (an item without qty satisfies nothing but not_exists).
  An order without items is false.  It needs a numeric (or date) items.qty.
- `items.qty_sum`: sum of qty over the order's items; items without qty add 0; an
  order without items has 0.  `items.distinct`: number of different products: distinct
  sku values among the items that have a sku, plus one per item without a sku; 0
  without items.  Both exist for every order, so `exists` is always true for them.
- Aggregations: orders whose `of` value is missing count for `count` only; sum/avg/min/
  max use the others (a profile whose selected orders all lack it has sum 0 and no avg/
  min/max).  Sums are exact (int64, or Python integers when int64 could overflow).
- Float order and item values are kept to FLOAT_DIGITS (8) decimal places, rounded
  half-even beyond, so sums are exact at one fixed scale; |value| < 4.6e10 (a larger
  one is a DataError).  Money to 2 decimals is exact.
- Deleting a profile should delete its orders (OrderBatch.drop_profiles), so a profile
  id that comes back later does not inherit them.
"""

from __future__ import annotations

import weakref
from fractions import Fraction
from typing import Any

import numpy as np
from pyroaring import BitMap

from bitseg.index import types as T
from bitseg.index.compare import I64_MAX, I64_MIN, Groups, compare, compare_avg, summable
from bitseg.index.fields import EMPTY, ValueIndex, bitmap_of, ids_of, month_days
from bitseg.index.order_index import NONE, OrderIndex
from bitseg.index.order_keys import DERIVED, QTY, QTY_EACH, SCALE
from bitseg.index.order_layout import Kept, OrderLayout, layout_of
from bitseg.index.recency import (
    NO_FIRST,
    NO_LAST,
    RECENCY_AGGS,
    Timeline,
    holds,
    recency_of_extremes,
    resolved,
)
from bitseg.index.rules import All, And, Cond, DaysAgo, Not, Or, OrdersCond, Rule


def _scaled(value: Any, factor: int) -> Any:
    if factor == 1 or value is None:
        return value
    if isinstance(value, tuple):
        return tuple(_scaled(v, factor) for v in value)
    return value * factor


class _Selector:
    """Evaluates the `orders` part of a rule to a bitmap of live order ids."""

    def __init__(self, index: OrderIndex, as_of_us: int) -> None:
        self.index = index
        self.as_of = as_of_us
        self.live = index.live
        self._alive_items: np.ndarray | None = None

    def bitmap(self, rule: Rule) -> BitMap:
        if isinstance(rule, Cond):
            return self._cond(rule)
        if isinstance(rule, And):
            positives = [self.bitmap(c) for c in rule.children if not isinstance(c, Not)]
            negatives = [self.bitmap(c.child) for c in rule.children if isinstance(c, Not)]
            positives.sort(key=len)
            result = positives[0] if positives else self.live
            for other in positives[1:]:
                result = result & other
            for other in negatives:
                result = result - other
            return result
        if isinstance(rule, Or):
            return BitMap.union(*(self.bitmap(c) for c in rule.children))
        if isinstance(rule, Not):
            return self.live - self.bitmap(rule.child)
        if isinstance(rule, All):
            return self.live
        raise TypeError(f"not an orders rule: {rule!r}")

    # -- conditions
    def _cond(self, cond: Cond) -> BitMap:
        name = cond.field
        if name == "ts":
            return self._ts(cond)
        if name == QTY_EACH:
            return self._each(cond)
        if cond.type in T.VALUE_TYPES:
            return self._value(cond, self.index.values.get(name) or ValueIndex())
        if name.startswith("items.") and name not in DERIVED:
            return self._any_item(cond)
        col = self.index.column(name)
        factor = SCALE.get(name, 1)
        if col is None:
            return self.live if cond.op == "not_exists" else EMPTY
        keys, valid = col
        if cond.op == "exists":
            return _bits(valid)
        if cond.op == "not_exists":
            return self.live - _bits(valid)
        return _bits(valid & self._holds(cond, keys, factor))

    def _value(self, cond: Cond, index: ValueIndex) -> BitMap:
        return index.select(cond.op, cond.value, self.live)

    def _resolve(self, cond: Cond, value: Any) -> Any:
        if isinstance(value, tuple):
            return tuple(self._resolve(cond, v) for v in value)
        if not isinstance(value, DaysAgo):
            return value
        moment = self.as_of - value.days * T.US_PER_DAY
        return moment // T.US_PER_DAY if cond.type == T.DATE else moment

    def _holds(self, cond: Cond, keys: np.ndarray, factor: int = 1) -> np.ndarray:
        """The per-row truth of a comparison op (eq, ne, in, not_in, gt…, between,
        anniversary_in) on keys; validity is the caller's."""
        op = cond.op
        value = _scaled(self._resolve(cond, cond.value), factor)
        if op == "anniversary_in":
            from bitseg.index.evaluate import anniversary_month_days
            wanted = np.array(sorted(anniversary_month_days(self.as_of, value)), dtype=np.int64)
            return np.isin(month_days(cond.type, keys), wanted)
        if op in ("in", "not_in"):
            exact = [int(v) for v in map(Fraction, value)
                     if v.denominator == 1 and I64_MIN <= v <= I64_MAX]
            hit = np.isin(keys, np.array(exact, dtype=np.int64))
            return hit if op == "in" else ~hit
        return compare(keys, op, value)

    def _ts(self, cond: Cond) -> BitMap:
        op = cond.op
        if op == "exists":
            return self.live
        if op == "not_exists":
            return EMPTY
        value = self._resolve(cond, cond.value)
        bounds = {"gt": lambda v: (v + 1, None), "gte": lambda v: (v, None),
                  "lt": lambda v: (None, v), "lte": lambda v: (None, v + 1),
                  "eq": lambda v: (v, v + 1), "between": lambda v: (v[0], v[1] + 1)}.get(op)
        if bounds is not None:
            return self.live & ts_range(self.index, *bounds(value))
        return self.live & _bits(self._holds(cond, self.index.ts))

    def _items_alive(self) -> np.ndarray:
        if self._alive_items is None:
            self._alive_items = self.index.item_owner != NONE
        return self._alive_items

    def _project(self, item_mask: np.ndarray) -> BitMap:
        return bitmap_of(self.index.item_owner[np.flatnonzero(item_mask)])

    def _any_item(self, cond: Cond) -> BitMap:
        col = self.index.item_column(cond.field)
        op = cond.op
        if col is None:
            return self.live if op == "not_exists" else EMPTY
        keys, valid = col
        if op == "exists":
            return self._project(valid)
        if op == "not_exists":
            return self.live - self._project(valid)
        if op in ("ne", "not_in"):  # like keywords: has the field, and no item has the value
            positive = Cond(cond.field, cond.type, "eq" if op == "ne" else "in", cond.value)
            return self._project(valid) - self._project(valid & self._holds(positive, keys))
        return self._project(valid & self._holds(cond, keys))

    def _each(self, cond: Cond) -> BitMap:
        """Orders with items, every one of which satisfies the op on its qty."""
        alive = self._items_alive()
        with_items = self._project(alive)
        col = self.index.item_column(QTY)
        if col is None:
            keys = np.zeros(self.index.item_count, dtype=np.int64)
            valid = np.zeros(self.index.item_count, dtype=bool)
        else:
            keys, valid = col
        op = cond.op
        if op == "exists":
            ok = valid
        elif op == "not_exists":
            ok = ~valid
        else:
            ok = valid & self._holds(cond, keys)
        return with_items - self._project(alive & ~ok)


def timeless(rule: Rule) -> bool:
    """Whether an orders rule's answer is the same at every as_of."""
    if isinstance(rule, (And, Or)):
        return all(timeless(c) for c in rule.children)
    if isinstance(rule, Not):
        return timeless(rule.child)
    if isinstance(rule, Cond):
        values = rule.value if isinstance(rule.value, tuple) else (rule.value,)
        return rule.op != "anniversary_in" and not any(isinstance(v, DaysAgo) for v in values)
    return isinstance(rule, All)


def _bits(mask: np.ndarray) -> BitMap:
    return bitmap_of(np.flatnonzero(mask))


def ts_range(index: OrderIndex, lo: int | None, hi: int | None) -> BitMap:
    """Order ids (live or not) with lo <= ts < hi (None: unbounded)."""
    lo = I64_MIN if lo is None else lo
    hi = I64_MAX if hi is None else hi
    ts = index.ts
    if lo >= hi or not len(ts):
        return EMPTY
    runs = index.runs
    if runs is None:
        return _bits((ts >= lo) & (ts < hi))
    ends = np.append(runs[1:], len(ts))
    first, last = ts[runs], ts[ends - 1]
    result = BitMap()
    overlapping = np.flatnonzero((last >= lo) & (first < hi))
    for r in overlapping.tolist():
        s, e = int(runs[r]), int(ends[r])
        a = s if first[r] >= lo else s + int(np.searchsorted(ts[s:e], lo, "left"))
        b = e if last[r] < hi else s + int(np.searchsorted(ts[s:e], hi, "left"))
        if a < b:
            result.add_range(a, b)
    return result


def select_orders(cond: OrdersCond, index: OrderIndex, as_of_us: int) -> np.ndarray:
    """The ids of the live orders matching the rule and window (sorted uint32)."""
    rows = _Selector(index, as_of_us).bitmap(cond.orders)
    if not rows:
        return np.zeros(0, dtype=np.uint32)
    lo, hi = cond.window.bounds(as_of_us)
    if index.runs is not None:
        return ids_of(rows & ts_range(index, lo, hi))
    ids = ids_of(rows)
    t = index.ts_buf[ids]
    mask = t < hi if lo is None else (t >= lo) & (t < hi)
    return ids[mask]


LAYOUT_MIN_ORDERS = 1 << 16  # from this many orders, rules go by the profile layout
LAYOUT_BACKGROUND = 1 << 22  # from this many, it is built on a thread (rows meanwhile)


def evaluate_orders(cond: OrdersCond, index: OrderIndex, live: BitMap,
                    as_of_us: int) -> BitMap:
    """The live profiles for which the orders rule holds."""
    having = cond.having
    if having.agg in RECENCY_AGGS and isinstance(cond.orders, All):
        found = recency_of_all(cond, index, as_of_us)
        if found is not None:
            return found & live
    rows: _Rows
    groups: Groups | _Runs
    by_profile = None
    if index.count >= LAYOUT_MIN_ORDERS and timeless(cond.orders):
        wait = index.count < LAYOUT_BACKGROUND
        layout = layout_of(index, wait=wait)
        if layout is not None:
            by_profile = _by_profile(cond, layout, as_of_us, wait)
    if by_profile is not None:
        rows, groups = by_profile
        if not len(rows):
            return live if having.holds_for_no_rows() else EMPTY
    else:
        sel = select_orders(cond, index, as_of_us)
        if not len(sel):
            return live if having.holds_for_no_rows() else EMPTY
        rows = _Ids(index, sel)
        groups = Groups(rows.owners())
    if having.agg == "count":
        ok = compare(groups.counts, having.op, having.value)
    elif having.agg in RECENCY_AGGS:
        ok = _recency(having, rows, groups, as_of_us)
    else:
        ok = _aggregate(having, rows, groups)
    if having.holds_for_no_rows():
        return live - groups.profiles(groups.has & ~ok)
    if having.agg == "sum" and not groups.sparse or having.agg in RECENCY_AGGS:
        # a profile without rows has sum 0 here, which fails the op; _recency masks by
        # has itself: ok implies has, and no bincount of the rows is needed
        return groups.profiles(ok) & live
    return groups.profiles(groups.has & ok) & live


class _Rows:
    """The selected orders of one evaluation, and their profile, ts and key columns in
    the order the groups reduce them."""

    def __len__(self) -> int:
        raise NotImplementedError

    def ts(self, fill: int) -> np.ndarray:
        """The rows' ts; fill where a row is outside the window (kept rows)."""
        raise NotImplementedError

    def keys(self, name: str) -> tuple[np.ndarray, np.ndarray | None, int] | None:
        """(keys, validity or None when every row has a value, bound of |key|) of an
        order key column for the rows; None without the column."""
        raise NotImplementedError


class _Ids(_Rows):
    """Rows as sorted order ids, grouped by compare.Groups (sort or scatter)."""

    def __init__(self, index: OrderIndex, sel: np.ndarray) -> None:
        self.index, self.sel = index, sel
        self.everything = len(sel) == index.count  # sorted and distinct: every id

    def __len__(self) -> int:
        return len(self.sel)

    def owners(self) -> np.ndarray:
        return self.index.owner if self.everything else self.index.owner_buf[self.sel]

    def ts(self, fill: int) -> np.ndarray:
        return self.index.ts if self.everything else self.index.ts_buf[self.sel]

    def keys(self, name: str) -> tuple[np.ndarray, np.ndarray | None, int] | None:
        col = self.index.columns.get(name)
        if col is None:
            return None
        n = self.index.count
        keys = col.keys[:n] if self.everything else col.keys[self.sel]
        valid = None
        if not col.complete:
            valid = col.valid[:n] if self.everything else col.valid[self.sel]
        return keys, valid, col.bound


class _Window(_Rows):
    """The rows a rule keeps in the profile layout (order_layout.Kept) inside the
    window: the window folded into each column's validity (_Runs.inside), so the groups
    reduce every kept row in place."""

    def __init__(self, runs: _Runs) -> None:
        self.kept, self.runs = runs.kept, runs

    def __len__(self) -> int:  # rows outside the window included: no pass over them
        return len(self.kept)

    def ts(self, fill: int) -> np.ndarray:
        inside = self.runs.inside
        return self.kept.ts if inside is None else np.where(inside, self.kept.ts, fill)

    def keys(self, name: str) -> tuple[np.ndarray, np.ndarray | None, int] | None:
        found = self.kept.keys(name)
        if found is None:
            return None
        keys, valid = found
        inside = self.runs.inside
        if inside is not None:
            valid = inside if valid is None else valid & inside
        return keys, valid, self.kept.index.columns[name].bound


class _Runs:
    """Groups (as compare.Groups) over kept rows that are one run per profile, in time
    order, so the rows of a run inside the window [lo, hi) are one stretch of it,
    first … last - 1.  Only runs with a row in the window are groups: the stretches
    start where the window mask turns on (or a run starts inside it) and end where it
    turns off (or the run ends), found by two flatnonzero over the mask, with no pass
    over the runs outside it.  Counts are last - first; a sum of a column without gaps
    is one read of the sums from each row to its run's end (Kept.tail) at first, less
    the one at last unless it ends the run: a window ending after the latest order
    (stretches ending with their runs) needs no `last`; others go
    over the stretches, the window also folded into the values' validity (`inside`);
    int64 sums by one cumulative sum, exact because int64 wraps and each stretch's own
    sum fits (which the callers check)."""

    sparse = False  # (see evaluate_orders) every group has rows; `has` says so

    def __init__(self, kept: Kept, lo: int | None, hi: int) -> None:
        self.kept, self.lo, self.hi = kept, lo, hi
        self.whole = len(kept) == 0 or (lo is None and kept.latest < hi)  # every row in
        self.to_end = self.whole or kept.latest < hi  # each stretch ends with its run
        self._inside: np.ndarray | None = None
        self._last: np.ndarray | None = None
        if self.whole:
            self.first, self._last = kept.bounds[:-1], kept.bounds[1:]
        else:
            inside, newrun = self.inside, kept.newrun
            starts = inside.copy()  # inside, and the first row or the one before is not
            starts[1:] &= newrun[1:] | ~inside[:-1]
            self.first = np.flatnonzero(starts)
        self.size = len(self.first)

    @property
    def last(self) -> np.ndarray:
        """Where each stretch ends (exclusive), made when asked for."""
        if self._last is None:
            inside, newrun = self.inside, self.kept.newrun
            ends = inside.copy()  # inside, and the last row or the one after is not
            ends[:-1] &= newrun[1:] | ~inside[1:]
            self._last = np.flatnonzero(ends) + 1
        return self._last

    @property
    def inside(self) -> np.ndarray | None:
        """Whether each kept row is inside the window (None: all are)."""
        if self._inside is None and not self.whole:
            ts, lo, hi = self.kept.ts, self.lo, self.hi
            self._inside = ts < hi if lo is None else \
                ts >= lo if self.kept.latest < hi else (ts >= lo) & (ts < hi)
        return self._inside

    @property
    def counts(self) -> np.ndarray:
        return self.last - self.first

    @property
    def has(self) -> np.ndarray:
        return self.last > self.first

    def profiles(self, mask: np.ndarray) -> BitMap:
        # compress, not first[mask]: numpy 2.4 indexes by a mask ~8x slower (2.5 vs
        # 0.3 ms for 300k entries)
        return bitmap_of(self.kept.owners.take(np.compress(mask, self.first)))

    def sums(self, name: str) -> np.ndarray | None:
        """Each stretch's sum of a column from its cumulative sums; None when the
        column has gaps among the kept rows or a sum could overflow int64."""
        kept = self.kept
        if kept.bound(name) * kept.most >= 2**63:  # a run's sum might not fit int64
            return None
        tail = kept.tail(name)
        if tail is None:
            return None
        sums = tail.take(self.first)
        if not self.to_end:  # less each stretch's rows after it in its run, if any
            last, n = self.last, len(kept)
            at_end = last == n
            after = np.where(at_end, 0, last)
            sums -= np.where(at_end | kept.newrun.take(after), 0, tail.take(after))
        return sums

    def reduce(self, ufunc: np.ufunc, values: np.ndarray, initial: Any) -> np.ndarray:
        if ufunc is np.add and values.dtype != object:
            total = np.zeros(len(values) + 1, dtype=values.dtype)
            np.cumsum(values, out=total[1:])
            return total.take(self.last) - total.take(self.first)
        if self.whole or not self.size:
            return ufunc.reduceat(values, self.first) if self.size else values[:0]
        bounds = np.empty(2 * self.size, dtype=np.intp)  # [first, last) pairs; a spare
        bounds[0::2], bounds[1::2] = self.first, self.last  # value so last < len
        return ufunc.reduceat(np.append(values, values[:1]), bounds)[0::2]


def _by_profile(cond: OrdersCond, layout: OrderLayout, as_of_us: int, wait: bool = True
                ) -> tuple[_Window, _Runs] | None:
    """The rows of an as_of-independent orders rule, by profile: the rule's rows kept
    by the layout, each profile's run cut to the window (None: not kept yet, and being
    made on a thread as `wait` is false)."""
    index = layout.index
    kept = layout.kept(cond.orders, lambda: _Selector(index, as_of_us).bitmap(cond.orders),
                       wait)
    if kept is None:
        return None
    runs = _Runs(kept, *cond.window.bounds(as_of_us))
    return _Window(runs), runs


def _aggregate(having: Any, rows: _Rows, groups: Groups | _Runs) -> np.ndarray:
    """Per group: whether sum/avg/min/max of `of` satisfies the op."""
    op, agg = having.op, having.agg
    value = _scaled(having.value, SCALE.get(having.of, 1))
    if agg in ("sum", "avg") and isinstance(groups, _Runs):
        sums = groups.sums(having.of)
        if sums is not None:  # from cumulative sums, no pass over the rows
            if agg == "sum":
                return compare(sums, op, value)
            return groups.has & compare_avg(sums, groups.counts, op, value)
    found = rows.keys(having.of)
    if found is None:
        zeros = np.zeros(groups.size, dtype=np.int64)
        return compare(zeros, op, value) if agg == "sum" else zeros.astype(bool)
    keys, valid, bound = found
    complete = valid is None or bool(valid.all())
    if agg == "sum":
        keys = summable(keys, bound, int(groups.counts.max(initial=0)))
        return compare(groups.reduce(np.add, keys if complete else np.where(valid, keys, 0),
                                      0), op, value)
    n = groups.counts if complete else groups.reduce(np.add, valid.astype(np.int64), 0)
    if agg == "avg":
        keys = summable(keys, bound, int(n.max(initial=0)))
        sums = groups.reduce(np.add, keys if complete else np.where(valid, keys, 0), 0)
        return (n > 0) & compare_avg(sums, n, op, value)
    fill = I64_MAX if agg == "min" else I64_MIN
    ufunc = np.minimum if agg == "min" else np.maximum
    extreme = groups.reduce(ufunc, keys if complete else np.where(valid, keys, fill), fill)
    return (n > 0) & compare(extreme, op, value)


def _recency(having: Any, rows: _Rows, groups: Groups | _Runs, as_of_us: int) -> np.ndarray:
    """Per group: whether it has rows and the earliest (first) / latest (last) order ts
    satisfies the op (index/recency.py)."""
    first = having.agg == "first"
    fill = NO_FIRST if first else NO_LAST  # no row ts is either
    ts = rows.ts(fill)
    extreme = groups.reduce(np.minimum if first else np.maximum, ts, fill)
    ok = holds(extreme, having.op, resolved(having, as_of_us))
    return ok if groups.sparse else ok & (extreme != fill)


class _Extremes:
    """Each profile's earliest and latest live order ts, by profile id (NO_FIRST /
    NO_LAST: none; 8 bytes per profile id each, made on first use), and the earliest
    and latest of all live orders."""

    __slots__ = ("_owner", "_ts", "_per_profile", "earliest", "latest")

    def __init__(self, owner: np.ndarray, ts: np.ndarray) -> None:
        self._owner, self._ts = owner, ts
        self._per_profile: dict[str, np.ndarray] = {}
        self.earliest, self.latest = int(ts.min()), int(ts.max())

    def per_profile(self, agg: str) -> np.ndarray:
        found = self._per_profile.get(agg)
        if found is None:
            first = agg == "first"
            found = np.full(int(self._owner.max()) + 1, NO_FIRST if first else NO_LAST,
                            dtype=np.int64)
            (np.minimum if first else np.maximum).at(found, self._owner, self._ts)
            self._per_profile[agg] = found
        return found


_EXTREMES: weakref.WeakKeyDictionary[OrderIndex, _Extremes] = weakref.WeakKeyDictionary()


def _live_rows(index: OrderIndex) -> tuple[np.ndarray, np.ndarray]:
    """(owner, ts) of the live orders; views when every id is live."""
    if len(index.live) == index.count:
        return index.owner, index.ts
    ids = ids_of(index.live)
    return index.owner_buf[ids], index.ts_buf[ids]


def _extremes_of(index: OrderIndex) -> _Extremes | None:
    """The snapshot's _Extremes (None without live orders), cached per index."""
    found = _EXTREMES.get(index)
    if found is None and index.live:
        found = _EXTREMES[index] = _Extremes(*_live_rows(index))
    return found


_TIMELINES: weakref.WeakKeyDictionary[OrderIndex, Timeline] = weakref.WeakKeyDictionary()
_ASKED: weakref.WeakSet[OrderIndex] = weakref.WeakSet()


def _timeline_of(index: OrderIndex, eager: bool) -> Timeline | None:
    """The snapshot's live orders in time order (index/recency.py), cached per index;
    None the first time a snapshot asks unless eager: building it costs about four
    answers from rows, so a snapshot asked once (between writes) does not pay it."""
    found = _TIMELINES.get(index)
    if found is None:
        if not eager and index not in _ASKED:
            _ASKED.add(index)
            return None
        found = _TIMELINES[index] = Timeline(*_live_rows(index))
    return found


def recency_of_all(cond: OrdersCond, index: OrderIndex, as_of_us: int,
                   by_extremes: bool = True, eager: bool = False) -> BitMap | None:
    """first/last over all orders (`orders: {"all": true}`), or None: then from rows.
    From each profile's first/last live order (index/recency.py) when the window ends
    after the latest order and, for first, starts at or before the earliest (built in
    one pass); else, or if not by_extremes, from the live orders in time order (built
    with two sorts, from the second such question on a snapshot, or the first if
    eager).  None without live orders.  The profiles returned may include deleted ones
    (the caller keeps the live)."""
    extremes = _extremes_of(index)
    if extremes is None:
        return None
    lo, hi = cond.window.bounds(as_of_us)
    first = cond.having.agg == "first"
    if by_extremes and hi > extremes.latest and \
            not (first and lo is not None and lo > extremes.earliest):
        return recency_of_extremes(extremes.per_profile(cond.having.agg), cond.having,
                                   as_of_us, None if first else lo)
    timeline = _timeline_of(index, eager)
    return None if timeline is None else timeline.recency(cond.having, as_of_us, lo, hi)


def order_totals(index: OrderIndex, profiles: BitMap, as_of_us: int | None = None,
                 amount_field: str = "amount", amount_type: str = T.FLOAT
                 ) -> tuple[int, int, Fraction]:
    """(orders, profiles with orders, exact total of amount_field) of these profiles'
    live orders placed by as_of (None: all); orders lacking the amount count, add 0."""
    if not index.count or not profiles:
        return 0, 0, Fraction(0)
    owner = index.owner
    member = np.zeros(max(int(owner.max()), profiles.max()) + 1, dtype=bool)
    member[ids_of(profiles)] = True
    mask = member[owner]
    if len(index.live) < index.count:  # some orders were deleted
        live = np.zeros(index.count, dtype=bool)
        live[ids_of(index.live)] = True
        mask &= live
    if as_of_us is not None:
        mask &= index.ts <= as_of_us
    buyers = np.zeros(len(member), dtype=bool)  # marking owners: no sort, unlike np.unique
    buyers[owner[mask]] = True
    total = 0
    col = index.columns.get(amount_field)
    if col is not None:
        keys = col.keys[:index.count]
        picked = keys[mask if col.complete else mask & col.valid[:index.count]]
        # the picked keys' own bound: a huge key elsewhere keeps the int64 sum
        most = max(-int(picked.min()), int(picked.max())) if len(picked) else 0
        if most * len(picked) < 2**63:  # no partial sum can overflow int64
            total = int(picked.sum(dtype=np.int64))
        else:
            total = int(picked.astype(object).sum())  # exact Python ints
    scale = T.FLOAT_SCALE if amount_type == T.FLOAT else 1
    return int(np.count_nonzero(mask)), int(np.count_nonzero(buyers)), Fraction(total, scale)
