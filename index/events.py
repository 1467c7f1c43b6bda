"""Event rules evaluated: `count >= n` over a window and the other aggregates.

`count` over a window is answered in the bitmap domain: the window's whole days are a
signed sum of a few dyadic day blocks and months (event_windows), added and subtracted
with bitmap ripple-carry adders (event_counts), and compared like any range index; both
the sum and the comparison are cached per window. At most two partial days are counted
from their raw rows, and only the few profiles with such rows are summed again per call.

The raw rows (event_index.Block) answer the window edges, `where` clauses that no
stream covers, and sum/avg/min/max, grouped per profile and compared exactly (compare).
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator, Mapping
from fractions import Fraction
from typing import Any, NamedTuple

import numpy as np
from pyroaring import BitMap

from bitseg.index import types as T
from bitseg.index.compare import I64_MAX, I64_MIN, Groups, compare, compare_avg, summable
from bitseg.index.event_counts import at_least, counts_of, signed_sum
from bitseg.index.event_index import Block, EventIndex
from bitseg.index.event_keys import ANY, STREAM_TYPES
from bitseg.index.event_windows import (
    WindowSum,
    counts_at_days,
    judged_days,
    whole_days,
    window_counts,
    window_presence,
)
from bitseg.index.fields import EMPTY, RangeIndex, bitmap_of
from bitseg.index.keys import stream_key
from bitseg.index.recency import RECENCY_AGGS, recency_by_presence, recency_profiles
from bitseg.index.rules import All, And, Cond, DaysAgo, EventCond, Having, Not, Or, Rule
from bitseg.index.schema import Schema
from bitseg.index.timeline import day_of, plan

TS = "\x00ts"  # _rows's `of` for the rows' timestamps (no property has this name)


def evaluate_event(cond: EventCond, index: EventIndex, schema: Schema, live: BitMap,
                   as_of: int) -> BitMap:
    """The live profiles whose selected events satisfy `having`."""
    judged, seen = _judged(cond, index, schema, live, as_of)
    result = _bitmap(judged)
    if seen is not None:  # profiles without rows satisfy it too
        result = result | (live - _bitmap(seen))
    return result & live


def count_event(cond: EventCond, index: EventIndex, schema: Schema, live: BitMap,
                as_of: int) -> int:
    """len(evaluate_event(...)), its last operations cardinalities: |hit & live|, plus
    |live| - |seen & live| when profiles without rows satisfy it (hit lies in seen)."""
    result, seen = _judged(cond, index, schema, live, as_of)
    count = _count_in(result, live)
    if seen is not None:
        count += len(live) - _count_in(seen, live)
    return count


class Patched(NamedTuple):
    """(base - edge) | extra, extra the `keep` ones of edge's ids: a window's answer for
    its whole days with the profiles of its partial days judged again, kept in parts so
    that a count builds no bitmap as large as the window's, nor one of extra while every
    edge profile is live (at 10M, a warm 7-day page-view count built four of the first
    and two of the second, ~5 ms)."""

    base: BitMap
    edge: BitMap
    ids: np.ndarray  # edge's ids, ascending
    keep: np.ndarray  # bool, one per id

    def extra(self) -> BitMap:
        return self.edge if self.keep.all() else bitmap_of(self.ids[self.keep])

    def bitmap(self) -> BitMap:
        return (self.base - self.edge) | self.extra()

    def count_in(self, live: BitMap) -> int:
        """len(self.bitmap() & live), by cardinalities: (base - edge) and extra are
        disjoint, and base - edge has base's profiles less those it shares with edge.
        With every edge profile live (the usual case) extra's are its kept ids."""
        base = self.base.intersection_cardinality(live)
        if self.edge.intersection_cardinality(live) == len(self.edge):
            return (base - self.base.intersection_cardinality(self.edge)
                    + int(np.count_nonzero(self.keep)))
        return (base - (self.base & self.edge).intersection_cardinality(live)
                + self.extra().intersection_cardinality(live))


def _bitmap(judged: BitMap | Patched) -> BitMap:
    return judged.bitmap() if isinstance(judged, Patched) else judged


def _count_in(judged: BitMap | Patched, live: BitMap) -> int:
    if isinstance(judged, Patched):
        return judged.count_in(live)
    return judged.intersection_cardinality(live)


def _judged(cond: EventCond, index: EventIndex, schema: Schema, live: BitMap, as_of: int
            ) -> tuple[BitMap | Patched, BitMap | Patched | None]:
    """(profiles whose rows satisfy `having`, and None, or, when profiles without rows
    satisfy it as well, the profiles with rows): the answer, before `live`."""
    having = cond.having
    events = index.types if cond.event == ANY else [cond.event]
    events = [e for e in events if e in index.type_days]
    lo, hi = cond.window.bounds(as_of)
    if having.agg in RECENCY_AGGS:
        return _recency(cond, index, schema, events, lo, hi, as_of), None
    streams = _streams_for(cond, events) if having.agg == "count" else None
    presence = _presence_test(having) if streams is not None else None
    if presence is not None:  # count >= 1 or count == 0: who has any row, no sums
        seen = _present(cond, index, schema, events, streams, lo, hi, as_of) \
            if events else EMPTY
        return (seen, None) if presence else (EMPTY, seen)
    if streams is not None:
        return _count_judged(cond, index, schema, events, streams, lo, hi, as_of)
    result, seen = _aggregate_rows(cond, index, schema, events, lo, hi, as_of)
    return result, (seen if having.holds_for_no_rows() else None)


def _presence_test(having: Having) -> bool | None:
    """True when a count comparison means `count >= 1`, False when it means `count == 0`,
    None otherwise (counts are whole numbers >= 0)."""
    op, value = having.op, having.value
    if op in ("between", "in", "not_in"):
        return None
    if (op == "gte" and 0 < value <= 1) or (op == "gt" and 0 <= value < 1) or \
            (op == "ne" and value == 0):
        return True
    if (op == "lt" and 0 < value <= 1) or (op == "lte" and 0 <= value < 1) or \
            (op == "eq" and value == 0):
        return False
    return None


def _streams_for(cond: EventCond, events: list[str]) -> list[str] | None:
    """The streams whose counts add up to the rows `where` selects, or None."""
    where = cond.where
    if where is None or isinstance(where, All):
        return [stream_key(e) for e in events]
    if isinstance(where, Cond) and where.type in STREAM_TYPES and where.op in ("eq", "in"):
        values = (where.value,) if where.op == "eq" else tuple(dict.fromkeys(where.value))
        return [stream_key(e, where.field, v) for e in events for v in values]
    return None


def count_by_bitmaps(cond: EventCond, index: EventIndex, schema: Schema, events: list[str],
                      streams: list[str], lo: int | None, hi: int, as_of: int) -> RangeIndex:
    """Each profile's count of the selected events in [lo, hi): the whole days as a few
    dyadic and month blocks (event_windows), the partial days from their raw rows."""
    return signed_sum(*window_blocks(index, events, streams, lo, hi, cond.where,
                                     schema.events, as_of))


def window_blocks(index: EventIndex, events: list[str], streams: list[str], lo: int | None,
                  hi: int, where: Rule | None = None, types: Mapping[str, str] | None = None,
                  as_of: int = 0) -> tuple[list[RangeIndex], list[RangeIndex]]:
    """(count blocks to add, count blocks to subtract) whose signed sum is each profile's
    count of the selected events in [lo, hi): the whole days' blocks (event_windows), and
    both partial days' rows counted as one block."""
    first, end, inside, outside = window_days(index, events, lo, hi, where, types, as_of)
    plus, minus = window_counts(index, streams, first, end)
    if len(inside):
        plus.append(counts_of(inside))
    if len(outside):
        minus.append(counts_of(outside))
    return plus, minus


def _count_judged(cond: EventCond, index: EventIndex, schema: Schema, events: list[str],
                  streams: list[str], lo: int | None, hi: int, as_of: int
                  ) -> tuple[Patched, Patched | None]:
    """_judged of a count over streams, the edge days never summed into the whole days:
    with S the whole days' counts (event_windows.whole_days, cached per window) and D the
    few profiles with rows on a partial day, the answer is the profiles outside D that
    S alone passes (judged_days, cached too) and those in D whose S, read off its slices
    (or its table, counts_at_days), plus and minus their partial days' rows passes,
    compared exactly in numpy. A window asked again touches only D: its whole days are
    neither summed nor compared, and a count of it builds no bitmap of their size."""
    having = cond.having
    first, end, inside, outside = window_days(index, events, lo, hi, cond.where,
                                              schema.events, as_of)
    whole = whole_days(index, streams, first, end)
    hit = judged_days(index, streams, first, end, whole, ("count", having.op, having.value),
                      lambda counts: _compare_index(counts, having))
    ids, rows = _signed_counts(inside, outside)
    edge = bitmap_of(ids)
    totals = counts_at_days(index, streams, first, end, whole, ids, edge) + rows
    present = totals > 0  # (rows outside are in whole: never < 0)
    result = Patched(hit, edge, ids, compare(totals, having.op, having.value) & present)
    if not having.holds_for_no_rows():
        return result, None
    return result, Patched(whole.exists, edge, ids, present)


def _signed_counts(plus: np.ndarray, minus: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct profiles, each one's rows in plus less its rows in minus)."""
    if len(plus) + len(minus) == 0:
        return np.zeros(0, dtype=np.uint32), np.zeros(0, dtype=np.int64)
    # one sort of profile * 2 + (1 for minus): a plain sort, several times an argsort's
    # speed; in 32 bits while the ids allow (1.7x faster than 64 on 70k keys)
    top = max(int(plus.max(initial=0)), int(minus.max(initial=0)))
    kind = np.uint32 if top < 2**31 else np.uint64
    one = kind(1)
    keys = np.sort(np.concatenate([plus.astype(kind) << one,
                                   (minus.astype(kind) << one) | one]))
    profiles = (keys >> one).astype(np.uint32)
    starts = np.flatnonzero(np.r_[True, profiles[1:] != profiles[:-1]])
    signs = 1 - 2 * (keys & one).astype(np.int64)
    return profiles[starts], np.add.reduceat(signs, starts)


def window_days(index: EventIndex, events: list[str], lo: int | None, hi: int,
                where: Rule | None = None, types: Mapping[str, str] | None = None,
                as_of: int = 0) -> tuple[int, int, np.ndarray, np.ndarray]:
    """(first, end, inside, outside): the window [lo, hi) as its whole days [first, end)
    plus the profiles of the partial days' rows inside, less those of rows outside (the
    rows `where` selects, over these types' properties).

    A first partial day that holds most of its rows inside (a window from just after
    midnight) is taken in whole, less its rows outside: fewer blocks, a block that ended
    before it no longer subtracting it. The last partial day is always counted from its
    rows: with as_of "now" it is today, which takes writes all day, and a window whose
    whole days held it would be summed again (and its cached sum dropped) after each."""
    earliest = min((index.type_days[e][0] for e in events), default=day_of(hi))
    window = plan(lo, hi, earliest)
    first, end = window.days
    inside, outside = [], []  # rows counted, and rows to take from their day's bucket
    for edge_lo, edge_hi in window.edges:
        day = day_of(edge_lo)
        profiles, stamps = day_rows(index, events, day, where, types, as_of)
        chosen = (stamps >= edge_lo) & (stamps < edge_hi)
        if edge_lo == lo and 2 * int(np.count_nonzero(chosen)) > len(chosen):  # most of it
            first, end = (day, day + 1) if first == end else (min(first, day),
                                                              max(end, day + 1))
            outside.append(profiles[~chosen])
        else:
            inside.append(profiles[chosen])
    none = np.zeros(0, dtype=np.uint32)
    return (first, end, np.concatenate(inside) if inside else none,
            np.concatenate(outside) if outside else none)


def _recency(cond: EventCond, index: EventIndex, schema: Schema, events: list[str],
             lo: int | None, hi: int, as_of: int) -> BitMap:
    """first/last (index/recency.py): from the count buckets' presence when streams
    cover `where`, else from the raw rows' timestamps."""
    if not events:
        return EMPTY
    streams = _streams_for(cond, events)
    if streams is None:
        profiles, ts = _rows(cond, index, schema, events, lo, hi, as_of, TS)
        return recency_profiles(profiles, ts, cond.having, as_of)

    def present(a: int | None, b: int) -> BitMap:
        return _present(cond, index, schema, events, streams, a, b, as_of)

    return recency_by_presence(cond.having, as_of, lo, hi, present)


def _present(cond: EventCond, index: EventIndex, schema: Schema, events: list[str],
             streams: list[str], lo: int | None, hi: int, as_of: int) -> BitMap:
    """The profiles with a selected event in [lo, hi): the union of the `exists` of a
    few blocks covering the whole days, and the raw rows of the partial days."""
    earliest = min(index.type_days[e][0] for e in events)
    window = plan(lo, hi, earliest)
    parts = window_presence(index, streams, *window.days)
    for edge_lo, edge_hi in window.edges:
        profiles = _rows(cond, index, schema, events, edge_lo, edge_hi, as_of)[0]
        if len(profiles):
            parts.append(bitmap_of(profiles))
    return BitMap.union(*parts) if parts else EMPTY


def blocks_in(index: EventIndex, events: Iterable[str], lo: int | None, hi: int
              ) -> Iterator[tuple[Any, np.ndarray]]:
    """Each raw block of these event types with rows in [lo, hi) (lo None: from the
    first), with the mask of its rows in that range."""
    for event in events:
        days = index.type_days.get(event, [])
        start = 0 if lo is None else bisect_left(days, day_of(lo))
        for day in days[start:bisect_right(days, day_of(hi - 1))]:
            block = index.block(event, day)
            if block is None:
                continue
            keep = block.ts < hi
            if lo is not None:
                keep &= block.ts >= lo
            yield block, keep


def day_rows(index: EventIndex, events: Iterable[str], day: int, where: Rule | None = None,
             types: Mapping[str, str] | None = None, as_of: int = 0
             ) -> tuple[np.ndarray, np.ndarray]:
    """(profiles, timestamps) of the raw rows of these types on one day that `where`
    (over properties of these types) selects. A day's block holds that day's rows only, so
    none is masked by time, and one block's arrays come as they are, read-only: a
    window's partial day of page views at 10M is ~100k rows, copied twice before."""
    profiles, stamps = [], []
    for event in events:
        block = index.block(event, day)
        if block is None:
            continue
        if where is None:
            profiles.append(block.profile)
            stamps.append(block.ts)
        else:
            keep = row_mask(where, block, types or {}, as_of)
            profiles.append(block.profile[keep])
            stamps.append(block.ts[keep])
    if not profiles:
        return np.zeros(0, dtype=np.uint32), np.zeros(0, dtype=np.int64)
    if len(profiles) == 1:
        return profiles[0], stamps[0]
    return np.concatenate(profiles), np.concatenate(stamps)


def _rows(cond: EventCond, index: EventIndex, schema: Schema, events: list[str],
          lo: int | None, hi: int, as_of: int, of: str | None = None
          ) -> tuple[np.ndarray, np.ndarray]:
    """(profiles, values of `of`) of the raw rows in [lo, hi) that `where` selects
    (of TS: their timestamps)."""
    profiles, values = [], []
    for block, keep in blocks_in(index, events, lo, hi):
        if cond.where is not None:
            keep &= row_mask(cond.where, block, schema.events, as_of)
        if of == TS:
            values.append(block.ts[keep])
        elif of is not None:
            column = block.column(of)
            if column is None:
                continue
            keep &= column[1]
            values.append(column[0][keep])
        profiles.append(block.profile[keep])
    if not profiles:
        return np.zeros(0, dtype=np.uint32), np.zeros(0, dtype=np.int64)
    return np.concatenate(profiles), (np.concatenate(values) if of is not None else
                                      np.zeros(0, dtype=np.int64))


def _aggregate_rows(cond: EventCond, index: EventIndex, schema: Schema, events: list[str],
                    lo: int | None, hi: int, as_of: int) -> tuple[BitMap, BitMap]:
    """(profiles satisfying `having`, profiles with any selected row) from raw rows."""
    having = cond.having
    profiles, values = _rows(cond, index, schema, events, lo, hi, as_of, having.of)
    if len(profiles) == 0:
        return BitMap(), BitMap()
    groups = Groups(profiles)
    return groups.profiles(groups.has & _judge(groups, values, having)), \
        groups.profiles(groups.has)


def _judge(groups: Groups, values: np.ndarray, having: Having) -> np.ndarray:
    """Per group: whether its rows' count/sum/min/max/avg satisfies `having`, exactly
    (entries of groups without rows are don't-care)."""
    op, value = having.op, having.value
    if having.agg == "count":
        return compare(groups.counts, op, value)
    if having.agg == "min":
        return compare(groups.reduce(np.minimum, values, I64_MAX), op, value)
    if having.agg == "max":
        return compare(groups.reduce(np.maximum, values, I64_MIN), op, value)
    # values are keys below 2**62 in magnitude: a few of them can pass int64
    values = summable(values, int(np.abs(values).max(initial=0)),
                      int(groups.counts.max(initial=0)))
    if having.agg == "sum":
        return compare(groups.reduce(np.add, values, 0), op, value)
    return compare_avg(groups.reduce(np.add, values, 0), groups.counts, op, value)


def _compare_index(index: RangeIndex | WindowSum, having: Having) -> BitMap:
    """The profiles of a count index (event_counts) whose count passes `having`."""
    op, value = having.op, having.value
    if op in ("in", "not_in"):
        hit = BitMap.union(*(index.compare("eq", v) for v in value))
        return hit if op == "in" else index.exists - hit
    if op == "between":
        return at_least(index, math.ceil(value[0])) - at_least(index, math.floor(value[1]) + 1)
    if op == "ne":
        return index.exists - index.compare("eq", value)
    if op in ("gte", "gt", "lt", "lte"):
        # counts are whole: >= v is >= ceil(v), > v is >= floor(v) + 1; < and <= the rest
        n = math.ceil(value) if op in ("gte", "lt") else math.floor(value) + 1
        return at_least(index, n) if op in ("gte", "gt") else index.exists - at_least(index, n)
    return index.compare(op, value)


# ------------------------------------------------------------------------ where on rows
def row_mask(rule: Rule, block: Block, types: Mapping[str, str], as_of: int) -> np.ndarray:
    """Which rows of a block satisfy a `where` rule over event properties."""
    n = len(block)
    if isinstance(rule, All):
        return np.ones(n, dtype=bool)
    if isinstance(rule, And):
        mask = np.ones(n, dtype=bool)
        for child in rule.children:
            mask &= row_mask(child, block, types, as_of)
        return mask
    if isinstance(rule, Or):
        mask = np.zeros(n, dtype=bool)
        for child in rule.children:
            mask |= row_mask(child, block, types, as_of)
        return mask
    if isinstance(rule, Not):
        return ~row_mask(rule.child, block, types, as_of)
    if isinstance(rule, Cond):
        return _cond_mask(rule, block, as_of)
    raise TypeError(f"not allowed in where: {rule!r}")


def _cond_mask(cond: Cond, block: Block, as_of: int) -> np.ndarray:
    column = block.column(cond.field)
    n = len(block)
    if column is None:
        return np.full(n, cond.op == "not_exists")
    values, valid = column
    op = cond.op
    if op == "exists":
        return valid.copy()
    if op == "not_exists":
        return ~valid
    if cond.type == T.KEYWORD:
        table = {w: i for i, w in enumerate(block.words.get(cond.field, []))}
        wanted = (cond.value,) if op in ("eq", "ne") else cond.value
        codes = [table[w] for w in wanted if w in table]
        hit = valid & np.isin(values, codes)
        return hit if op in ("eq", "in") else valid & ~hit
    if cond.type == T.BOOL:
        hit = valid & (values == int(cond.value))
        return hit if op == "eq" else valid & ~hit

    def key(v: Any) -> Any:
        if isinstance(v, DaysAgo):
            moment = as_of - v.days * T.US_PER_DAY
            return moment // T.US_PER_DAY if cond.type == T.DATE else moment
        if cond.type == T.FLOAT:  # stored keys were rounded half-even: so is the constant
            return round(Fraction(v))
        return v

    if op in ("in", "not_in"):
        hit = np.zeros(n, dtype=bool)
        for v in cond.value:
            hit |= compare(values, "eq", key(v))
        return valid & (hit if op == "in" else ~hit)
    if op == "between":
        return valid & compare(values, "between", (key(cond.value[0]), key(cond.value[1])))
    return valid & compare(values, op, key(cond.value))

