"""Recency (CONTRACT §2.4a): `having` first / last, the earliest / latest ts of a
profile's selected rows, compared with an instant.

Four exact ways to answer it, for four shapes of data:
- From rows (`recency_profiles`): the rows' (profile, ts) columns, grouped per profile
  in one sort, min or max per group (`extremes`), compared vectorised.  Orders and item
  lines use this; so do events whose `where` no count stream covers.
- From presence (`recency_by_presence`): every comparison of first/last with an
  instant is a difference of two "has a selected row in [a, b)" sets.  With
  geq(t) = the profiles whose first/last is >= t:
      last:  geq(t) = has a row in [t, hi)          first: geq(t) = has - has a row in [lo, t)
  and gt t = geq(t + 1), lt t = has - geq(t), eq t = geq(t) - geq(t + 1),
  between [a, b] = geq(a) - geq(b + 1), ne / not_in = has minus eq / in.  For events
  "has a row in [a, b)" is a union of the per-day and per-month count buckets' `exists`
  bitmaps (plus raw rows at partial days), so no row is read for whole days.

- From each profile's first/last over all its rows (`recency_of_extremes`), kept per
  snapshot by the caller: exact when the window holds every row up to the latest one
  (its end is past the latest row) and, for first, starts at or before the earliest.
  Then a profile's last in the window is its overall last if that is >= the window's
  start (and it has none in the window otherwise), so one comparison per profile
  answers; no row is read.  Orders use this for `orders: {"all": true}`.
- From the rows in time order (`Timeline`), kept per snapshot by the caller: any
  window is a slice of positions, and each row knows the position of its profile's
  next and previous row, so a profile's last (first) row in the slice is the one whose
  next is past it (previous is before it).  Orders use this for `orders: {"all":
  true}` when the per-profile first/last does not apply (an as_of before the latest
  order, or first over a window starting after the earliest).

A profile with no selected rows has no first/last: false under every op (ne and not_in
included), which every way gives, since every set above is within `has`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from pyroaring import BitMap

from bitseg.index import types as T
from bitseg.index.compare import I64_MAX, I64_MIN
from bitseg.index.fields import EMPTY, bitmap_of

RECENCY_AGGS = ("first", "last")
_FLOOR, _CEIL = T.MIN_US - 1, T.MAX_US + 1  # beyond every row's ts: comparisons stay exact
NO_FIRST, NO_LAST = I64_MAX, I64_MIN  # the first / last of a profile without rows


def moment(value: Any, as_of_us: int) -> int:
    """An instant of a first/last condition in µs: a timestamp, or {"days_ago": n}
    (rules.DaysAgo) fixed against as_of; clamped just outside the instants rows have."""
    days = getattr(value, "days", None)
    micros = value if days is None else as_of_us - days * T.US_PER_DAY
    return min(max(micros, _FLOOR), _CEIL)


def resolved(having: Any, as_of_us: int) -> Any:
    """having.value with every instant in µs: an int, a tuple (in / not_in) or a pair
    (between)."""
    if isinstance(having.value, tuple):
        return tuple(moment(v, as_of_us) for v in having.value)
    return moment(having.value, as_of_us)


def extremes(profiles: np.ndarray, ts: np.ndarray, agg: str) -> tuple[np.ndarray, np.ndarray]:
    """(distinct profiles ascending, the earliest (first) or latest (last) ts of each) of
    rows given as two aligned columns: one sort, one ufunc.reduceat.  For another child
    collection (item lines) to reuse."""
    if len(profiles) == 0:
        return np.zeros(0, dtype=np.uint32), np.zeros(0, dtype=np.int64)
    order = np.argsort(profiles, kind="stable")
    grouped = profiles[order]
    starts = np.flatnonzero(np.concatenate(([True], grouped[1:] != grouped[:-1])))
    ufunc = np.minimum if agg == "first" else np.maximum
    return grouped[starts], ufunc.reduceat(ts[order].astype(np.int64, copy=False), starts)


def holds(values: np.ndarray, op: str, c: Any) -> np.ndarray:
    """values (int64 µs) op c (resolved: an int, a tuple, or a between pair)."""
    if op in ("in", "not_in"):
        hit = np.isin(values, np.array(c, dtype=np.int64))
        return hit if op == "in" else ~hit
    if op == "between":
        return (values >= c[0]) & (values <= c[1])
    return {"eq": np.equal, "ne": np.not_equal, "gt": np.greater, "gte": np.greater_equal,
            "lt": np.less, "lte": np.less_equal}[op](values, c)


def recency_profiles(profiles: np.ndarray, ts: np.ndarray, having: Any,
                     as_of_us: int) -> BitMap:
    """The profiles among the rows' owners whose first/last ts satisfies `having`."""
    ids, values = extremes(profiles, ts, having.agg)
    return bitmap_of(ids[holds(values, having.op, resolved(having, as_of_us))])


def recency_of_extremes(values: np.ndarray, having: Any, as_of_us: int,
                        lo: int | None) -> BitMap:
    """The profiles (positions in values) whose first/last satisfies `having`, given
    each one's earliest (first) or latest (last) ts over all its rows, NO_FIRST /
    NO_LAST for none.  The window [lo, hi) must end after the latest row and, for
    first, lo must be None or at most the earliest row."""
    if having.agg == "first":
        present = values != NO_FIRST
    else:  # a last before lo: no row in the window
        present = values >= lo if lo is not None else values != NO_LAST
    return bitmap_of(np.flatnonzero(present & holds(values, having.op,
                                                    resolved(having, as_of_us))))


class Timeline:
    """Rows in time order, for first/last over any window: a window is a slice
    [a, b) of positions, and a row at i is its profile's last in it when the profile's
    next row is at or after b (first: its previous row is before a).  So each profile
    is found at most once, and no grouping is done per query.  Memory: 20 bytes a row
    (ts 8, profile 4, next and previous position 4 each)."""

    __slots__ = ("ts", "profiles", "next", "prev")

    def __init__(self, profiles: np.ndarray, ts: np.ndarray) -> None:
        order = np.argsort(ts, kind="stable")  # timsort: fast over runs of rising ts
        self.ts = ts[order].astype(np.int64, copy=False)
        self.profiles = profiles[order].astype(np.uint32, copy=False)
        n = len(order)
        # group positions by profile, ascending within a profile: one sort of
        # (profile, position) packed in 64 bits
        packed = (self.profiles.astype(np.uint64) << np.uint64(32)) | \
            np.arange(n, dtype=np.uint64)
        packed.sort()
        pos = (packed & np.uint64(0xFFFFFFFF)).astype(np.intp)
        packed >>= np.uint64(32)  # now the profiles
        same = packed[1:] == packed[:-1]
        dtype = np.int32 if n < 2**31 - 1 else np.int64
        self.next = np.full(n, n, dtype=dtype)
        self.next[pos[:-1][same]] = pos[1:][same]
        self.prev = np.full(n, -1, dtype=dtype)
        self.prev[pos[1:][same]] = pos[:-1][same]

    def recency(self, having: Any, as_of_us: int, lo: int | None, hi: int) -> BitMap:
        """The profiles whose first/last ts over the rows in [lo, hi) satisfies
        `having`."""
        ts = self.ts
        a = 0 if lo is None else int(np.searchsorted(ts, lo))
        b = int(np.searchsorted(ts, hi))
        op, c = having.op, resolved(having, as_of_us)

        def at(t: int) -> int:  # the first position in [a, b] with ts >= t
            return min(max(int(np.searchsorted(ts, t)), a), b)

        x, y = a, b  # the op, where it is one range of ts, narrows the slice
        if op in ("gt", "gte"):
            x = at(c + 1 if op == "gt" else c)
        elif op in ("lt", "lte"):
            y = at(c + 1 if op == "lte" else c)
        elif op == "between":
            x, y = at(c[0]), max(at(c[0]), at(c[1] + 1))
        elif op == "eq":
            x, y = at(c), at(c + 1)
        if x >= y:
            return EMPTY
        ends = self.next[x:y] >= b if having.agg == "last" else self.prev[x:y] < a
        if op in ("ne", "in", "not_in"):
            ends &= holds(ts[x:y], op, c)
        found = self.profiles[x:y][ends]
        found.sort()
        return bitmap_of(found)


def recency_by_presence(having: Any, as_of_us: int, lo: int | None, hi: int,
                        present: Callable[[int | None, int], BitMap]) -> BitMap:
    """The profiles whose first/last ts over the rows in [lo, hi) satisfies `having`;
    present(a, b) gives the profiles with a selected row in [a, b) (a None: from the
    first row), and is called only with lo <= a < b <= hi."""
    def within(a: int | None, b: int) -> BitMap:
        a = lo if a is None or (lo is not None and a < lo) else a
        b = min(b, hi)
        return present(a, b) if a is None or a < b else EMPTY

    has = within(lo, hi)
    if not has:
        return EMPTY
    if having.agg == "last":
        def geq(t: int) -> BitMap:
            return within(t, hi)
    else:
        def geq(t: int) -> BitMap:
            return has - within(lo, t)

    def eq(t: int) -> BitMap:
        return geq(t) - geq(t + 1)

    op, c = having.op, resolved(having, as_of_us)
    if op == "gt":
        return geq(c + 1)
    if op == "gte":
        return geq(c)
    if op == "lt":
        return has - geq(c)
    if op == "lte":
        return has - geq(c + 1)
    if op == "between":
        return geq(c[0]) - geq(c[1] + 1) if c[0] <= c[1] else EMPTY
    if op == "eq":
        return eq(c)
    if op == "ne":
        return has - eq(c)
    hit = BitMap.union(*(eq(t) for t in c)) if c else EMPTY
    return hit if op == "in" else has - hit
