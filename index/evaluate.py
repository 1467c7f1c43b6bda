"""Rule evaluation: a pure function of (rule, snapshot, as_of).

Every result is a subset of the live profiles, and may be a bitmap owned by the index:
callers must not mutate it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from fractions import Fraction
from typing import Any

import numpy as np
from pyroaring import BitMap

from bitseg.index import types as T
from bitseg.index.errors import RuleError
from bitseg.index.events import evaluate_event
from bitseg.index.fields import EMPTY, RangeIndex, bitmap_of
from bitseg.index.items import contains_items, evaluate_items
from bitseg.index.orders import evaluate_orders
from bitseg.index.rules import (
    All,
    And,
    Cond,
    DaysAgo,
    EventCond,
    ItemsCond,
    Not,
    Or,
    OrdersCond,
    Rule,
    SegmentRef,
    SequenceCond,
)
from bitseg.index.sample import Sample
from bitseg.index.sequence import evaluate_sequence, sequence_contains
from bitseg.index.snapshot import Snapshot
from bitseg.index.sqlrule import SqlRule, evaluate_sql
from bitseg.index.timeline import civil
from bitseg.index.top import Top, evaluate_top

FEW_VALUES = 8  # in-lists up to this long are looked up value by value


def _integer_keys(index: RangeIndex, constants: list[Fraction | int]) -> list[int]:
    """The constants that can equal a key, as keys: index.to_key of each, in integer
    arithmetic (a Fraction operation per value costs ten times more)."""
    shift = 0 if index.digits is None else index.digits - T.FLOAT_DIGITS
    up, down = 10 ** max(shift, 0), 10 ** max(-shift, 0)
    keys = []
    for c in constants:
        num, den = c.numerator * up, c.denominator * down
        q, r = divmod(num, den)
        if r and index.rounded:  # half to even, as to_key's round()
            q += 2 * r > den or (2 * r == den and q % 2 == 1)
        elif r:
            continue  # not a whole key: equals no stored value
        keys.append(q)
    return keys


def anniversary_month_days(as_of_us: int, days: int) -> set[int]:
    """month*100+day of the UTC days as_of … as_of + days - 1; Feb 29 counts as Feb 28
    in non-leap years.  Calendar arithmetic on day numbers: total, also past 9999."""
    start = as_of_us // T.US_PER_DAY
    found = set()
    for k in range(min(days, 366)):
        year, month, day = civil(start + k)
        found.add(month * 100 + day)
        if month == 2 and day == 28 and not _leap(year):
            found.add(229)
    return found


def _leap(year: int) -> bool:
    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)


def _month_day(type_: str, key: int) -> int:
    _, month, day = civil(key if type_ == T.DATE else key // T.US_PER_DAY)
    return month * 100 + day


class Evaluator:
    """Evaluates rules against one snapshot at one as_of (microseconds since the epoch)."""

    def __init__(self, snapshot: Snapshot, as_of_us: int) -> None:
        self.snap = snapshot
        self.as_of = as_of_us
        self._memo: dict[Rule, BitMap] = {}
        self._resolving: list[str] = []

    # ------------------------------------------------------------------ bitmaps
    def bitmap(self, rule: Rule) -> BitMap:
        found = self._memo.get(rule)
        if found is None:
            found = self._memo[rule] = self._bitmap(rule)
        return found

    def _bitmap(self, rule: Rule) -> BitMap:
        if isinstance(rule, Cond):
            return self._condition(rule)
        if isinstance(rule, And):
            return self._and(rule.children)
        if isinstance(rule, Or):
            return BitMap.union(*(self.bitmap(c) for c in rule.children))
        if isinstance(rule, Not):
            return self.snap.live - self.bitmap(rule.child)
        if isinstance(rule, All):
            return self.snap.live
        if isinstance(rule, SegmentRef):
            return self._segment(rule)
        if isinstance(rule, EventCond):
            snap = self.snap
            return evaluate_event(rule, snap.events, snap.schema, snap.live, self.as_of)
        if isinstance(rule, OrdersCond):
            return evaluate_orders(rule, self.snap.orders, self.snap.live, self.as_of)
        if isinstance(rule, ItemsCond):
            return evaluate_items(rule, self.snap.orders, self.snap.live, self.as_of)
        if isinstance(rule, SequenceCond):
            return evaluate_sequence(rule, self.snap, self.as_of, self.bitmap)
        if isinstance(rule, Sample):
            return self.snap.samples.bitmap(rule, self.snap.live)
        if isinstance(rule, Top):
            return evaluate_top(rule, self.snap, self.as_of, self.bitmap)
        if isinstance(rule, SqlRule):
            return evaluate_sql(rule, self.snap)
        raise TypeError(f"not a rule: {rule!r}")

    def _and(self, children: tuple[Rule, ...]) -> BitMap:
        """Cheap children intersected smallest first; range leaves (tens of slice
        operations each) then evaluated only within that result; negations subtracted."""
        ranged = [c for c in children if self._is_range(c)]
        if not ranged:
            positives, negatives = self._split(children)
            if not positives:
                return self.snap.live - BitMap.union(*negatives)
            result = positives[0]
            for other in positives[1:]:
                result = result & other
                if not result:
                    return EMPTY
            for other in negatives:
                result = result - other
            return result
        cheap = [c for c in children if not isinstance(c, Not) and not self._is_range(c)]
        if cheap:
            result = self._and(tuple(cheap))
        else:
            result = self._range(ranged[0], self.snap.field(ranged[0].field))
            ranged = ranged[1:]
        for cond in ranged:
            if not result:
                return EMPTY
            result = self._range(cond, self.snap.field(cond.field), result)
        for neg in (c.child for c in children if isinstance(c, Not)):
            if not result:
                return EMPTY
            inside = (self._range(neg, self.snap.field(neg.field), result)
                      if self._is_range(neg) else self.bitmap(neg))
            result = result - inside
        return result

    def _is_range(self, rule: Rule) -> bool:
        """A condition on a range index that costs slice operations (worth filtering)."""
        return (isinstance(rule, Cond) and rule.type in T.RANGE_TYPES
                and rule.op not in ("exists", "not_exists", "anniversary_in"))

    def _split(self, children: tuple[Rule, ...]) -> tuple[list[BitMap], list[BitMap]]:
        """AND children as bitmaps: the positive ones smallest first, and the negated ones."""
        positives = [self.bitmap(c) for c in children if not isinstance(c, Not)]
        negatives = [self.bitmap(c.child) for c in children if isinstance(c, Not)]
        positives.sort(key=len)
        return positives, negatives

    def _segment(self, ref: SegmentRef) -> BitMap:
        found = self.snap.segments.resolve(ref.name)
        if isinstance(found, BitMap):
            return found & self.snap.live
        with self._inside(ref):
            return self.bitmap(found)

    @contextmanager
    def _inside(self, ref: SegmentRef) -> Iterator[None]:
        """Evaluate a dynamic segment's rule, refusing a segment that reaches itself."""
        if ref.name in self._resolving:
            cycle = " -> ".join([*self._resolving, ref.name])
            raise RuleError(ref.path, f"segments refer to each other in a cycle: {cycle}")
        self._resolving.append(ref.name)
        try:
            yield
        finally:
            self._resolving.pop()

    # ------------------------------------------------------------------ count
    def count(self, rule: Rule) -> int:
        """len(bitmap(rule)), without building the last (often largest) bitmap."""
        live = self.snap.live
        if isinstance(rule, All):
            return len(live)
        if isinstance(rule, Not):
            return len(live) - self.count(rule.child)
        if isinstance(rule, And) and rule not in self._memo \
                and not any(self._is_range(c) for c in rule.children):
            positives, negatives = self._split(rule.children)
            if not positives:
                return len(live) - len(BitMap.union(*negatives))
            last = None if negatives else positives.pop()
            result = positives[0] if positives else last
            for other in positives[1:]:
                result = result & other
                if not result:
                    return 0
            if last is not None:
                return len(last) if result is last else result.intersection_cardinality(last)
            minus = negatives[0] if len(negatives) == 1 else BitMap.union(*negatives)
            return result.difference_cardinality(minus)
        if isinstance(rule, Or) and len(rule.children) == 2:
            a, b = (self.bitmap(c) for c in rule.children)
            return a.union_cardinality(b)
        if isinstance(rule, Cond) and rule.op == "not_exists":
            return len(live) - len(self.snap.field(rule.field).exists)
        return len(self.bitmap(rule))

    # ------------------------------------------------------------------ one profile
    def contains(self, rule: Rule, pid: int) -> bool:
        """Whether one live profile satisfies the rule: `in` checks, no bitmap algebra."""
        if isinstance(rule, Cond):
            return self._holds(rule, pid)
        if isinstance(rule, And):
            return all(self.contains(c, pid) for c in rule.children)
        if isinstance(rule, Or):
            return any(self.contains(c, pid) for c in rule.children)
        if isinstance(rule, Not):
            return not self.contains(rule.child, pid)
        if isinstance(rule, All):
            return pid in self.snap.live
        if isinstance(rule, SegmentRef):
            found = self.snap.segments.resolve(rule.name)
            if isinstance(found, BitMap):
                return pid in found
            with self._inside(rule):
                return self.contains(found, pid)
        if isinstance(rule, (EventCond, OrdersCond)):
            return pid in self.bitmap(rule)
        if isinstance(rule, ItemsCond):
            return pid in self.snap.live and contains_items(rule, self.snap.orders, pid,
                                                            self.as_of)
        if isinstance(rule, SequenceCond):
            return sequence_contains(rule, self.snap, self.as_of, pid)
        if isinstance(rule, (Top, SqlRule)):  # a set computed (or cached) once per evaluator
            return pid in self.bitmap(rule)
        if isinstance(rule, Sample):
            return pid in self.snap.live and self.snap.samples.contains(rule, pid)
        raise TypeError(f"not a rule: {rule!r}")

    def _holds(self, cond: Cond, pid: int) -> bool:
        index = self.snap.field(cond.field)
        op, value = cond.op, cond.value
        if op == "exists":
            return pid in index.exists
        if op == "not_exists":
            return pid not in index.exists
        if not isinstance(index, RangeIndex):
            if op == "eq":
                return pid in index.eq(value)
            if op == "ne":
                return pid in index.exists and pid not in index.eq(value)
            if op == "in":
                return any(pid in index.eq(v) for v in value)
            if op == "not_in":
                return pid in index.exists and not any(pid in index.eq(v) for v in value)
            if op == "has_all":
                return all(pid in index.eq(v) for v in value)
            raise TypeError(op)
        key = index.key_of(pid)
        if key is None:
            return False
        if op == "anniversary_in":
            return _month_day(cond.type, key) in anniversary_month_days(self.as_of, value)
        def constant(v: Any) -> Fraction | int:
            return index.to_key(self._key(cond, v))

        if op == "between":
            return constant(value[0]) <= key <= constant(value[1])
        if op in ("in", "not_in"):
            hit = any(key == constant(v) for v in value)
            return hit if op == "in" else not hit
        c = constant(value)
        return {"eq": key == c, "ne": key != c, "gt": key > c, "gte": key >= c,
                "lt": key < c, "lte": key <= c}[op]

    def _any_of(self, cond: Cond, index: RangeIndex, has: BitMap) -> BitMap:
        """The ids of `has` whose value is one of the condition's list.  A short list
        costs a few slice operations per value; a long one one decode of the index and
        one vectorised lookup of every key at once."""
        if len(cond.value) <= FEW_VALUES:
            return BitMap.union(*(index.compare("eq", self._key(cond, v), has)
                                  for v in cond.value))
        wanted = _integer_keys(index, [self._key(cond, v) for v in cond.value])
        if not wanted or not has:
            return EMPTY
        ids, keys = index.decode()
        low, high = int(keys.min(initial=0)), int(keys.max(initial=0))
        wanted = [w for w in wanted if low <= w <= high]  # the rest match nothing; fit int64
        found = bitmap_of(ids[np.isin(keys, np.array(wanted, dtype=np.int64))])
        return found if has is index.exists else found & has

    # ------------------------------------------------------------------ leaves
    def _key(self, cond: Cond, value: Any) -> Fraction | int:
        """A condition's constant in the field's key units, fixing relative dates."""
        if not isinstance(value, DaysAgo):
            return value
        moment = self.as_of - value.days * T.US_PER_DAY
        return moment // T.US_PER_DAY if cond.type == T.DATE else moment

    def _condition(self, cond: Cond) -> BitMap:
        index = self.snap.field(cond.field)
        op, value = cond.op, cond.value
        if op == "exists":
            return index.exists
        if op == "not_exists":
            return self.snap.live - index.exists
        if isinstance(index, RangeIndex):
            return self._range(cond, index)
        return index.select(op, value, self.snap.live)

    def _range(self, cond: Cond, index: RangeIndex, within: BitMap | None = None) -> BitMap:
        """A range condition; only among `within` when given (then a subset of it)."""
        op, value = cond.op, cond.value
        if op == "anniversary_in":
            found = index.on_month_days(anniversary_month_days(self.as_of, value))
            return found if within is None else found & within
        if op == "between":
            return index.between(self._key(cond, value[0]), self._key(cond, value[1]), within)
        has = index.exists if within is None else index.exists & within
        if op in ("in", "not_in"):
            hits = self._any_of(cond, index, has)
            return hits if op == "in" else has - hits
        if op == "ne":
            return has - index.compare("eq", self._key(cond, value), has)
        return index.compare(op, self._key(cond, value), within)
