"""Rule evaluation: a pure function of (rule, snapshot, as_of).

Every result is a subset of the live profiles, and may be a bitmap owned by the index:
callers must not mutate it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from fractions import Fraction
from typing import Any

import numpy as np
from pyroaring import BitMap

from bitseg.index import types as T
from bitseg.index.cumulative import Layout, layout_of
from bitseg.index.errors import RuleError
from bitseg.index.events import count_event, evaluate_event
from bitseg.index.fields import EMPTY, RangeIndex, ValueIndex, bitmap_of, without
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
NEGATED = 4  # an AND subtracts up to this many negated bitmaps one by one, more as a union
LAYOUT_OPS = frozenset({"eq", "ne", "gt", "gte", "lt", "lte", "between", "in", "not_in"})
SINGLE_VALUED = frozenset({T.KEYWORD, T.BOOL})  # a profile has one value: `in` is disjoint
_UNKNOWN = 1 << 62  # the estimate of a range leaf without a layout: after every other
# One narrowing step of an AND: what it leaves of a bitmap (given whether the AND owns
# that bitmap, so may change it in place; with whether it owns the result), and how many
# that is.  The AND's first bitmap may be the index's, the steps' results are its own.
Apply = Callable[[BitMap, bool], tuple[BitMap, bool]]
Step = tuple[Apply, Callable[[BitMap], int]]


def _minus(other: BitMap) -> Step:
    """A step that takes `other` out of what is left (in place where it pays: without)."""
    def apply(within: BitMap, owned: bool) -> tuple[BitMap, bool]:
        return without(within, other, owned), True

    return apply, lambda within: within.difference_cardinality(other)


def _and_with(other: BitMap) -> Step:
    """A step that keeps only what is also in `other`."""
    def apply(within: BitMap, owned: bool) -> tuple[BitMap, bool]:
        if owned:
            within &= other
            return within, True
        return within & other, True

    return apply, other.intersection_cardinality


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
        # a rule's hash walks its whole tree (~2 µs for four leaves): none for an empty memo
        found = self._memo.get(rule) if self._memo else None
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
        """The first (smallest) positive child, then each further step within it."""
        result, steps = self._plan(children)
        owned = False  # the first bitmap may be the index's or a memo: never changed
        for apply, _ in steps:
            if not result:
                return EMPTY
            result, owned = apply(result, owned)
        return result

    def _plan(self, children: tuple[Rule, ...]) -> tuple[BitMap, list[Step]]:
        """An AND as a first bitmap and steps that narrow it: positive children smallest
        first by a free estimate (a built bitmap's len; a range leaf's from its layout,
        exact for the bins it covers whole), range leaves without a layout (slice
        operations, cheaper the fewer ids they run on) after them, negations last.  The
        first is a built bitmap when there is one: a range leaf runs within it in two
        operations (or two cardinalities, last in a Count) instead of being built."""
        ranked = sorted((self._estimate(child), i, child) for i, child in enumerate(children)
                        if not isinstance(child, Not))
        built = [r for r in ranked if not self._ranged(r[2])]
        if built and built[0] is not ranked[0]:
            ranked.remove(built[0])
            ranked.insert(0, built[0])
        negatives = []  # NOT (a OR b) is NOT a AND NOT b: each subtracted within the
        for c in children:  # result (a range leaf in two operations), no union built
            if isinstance(c, Not):
                negatives.extend(c.child.children if isinstance(c.child, Or) else (c.child,))
        if not ranked:  # only negations: live less one union of them, not a chain of
            # differences of the whole population
            return self.snap.live, self._minus_all(negatives)
        steps = [self._step(child) for _, _, child in ranked[1:]]
        steps += [self._minus_range(*r) for c in negatives if (r := self._ranged(c))]
        plain = [b for c in negatives if not self._ranged(c) for b in self._values(c)]
        if len(plain) > NEGATED:  # one difference with their union
            plain = [BitMap.union(*plain)]
        for other in plain:  # each subtracted within what is left (as the floor does)
            steps.append(_minus(other))
        return self.bitmap(ranked[0][2]), steps

    def _minus_all(self, negatives: list[Rule]) -> list[Step]:
        """Live less the union of what an AND of negations only negates, as one step (none
        when they negate nothing).  Its bitmap builds the union, a range leaf in it once
        over its bins.  Its count builds no range leaf that is whole bins, C[q] - C[p-1]:
        with A the union of the others, |live - (A | C[q] - C[p-1])| is
        |live - (A | C[q])| + |C[p-1] - A| (C[p-1] lies inside C[q] and inside live)."""
        counted, whole = next(((c, w) for c in negatives
                               if (w := self._whole_bins(c)) is not None), (None, None))
        plain = [b for c in negatives if c is not counted for b in self._values(c)]
        if whole is None and not plain:
            return []

        def apply(within: BitMap, owned: bool) -> tuple[BitMap, bool]:
            found = plain if counted is None else [*plain, self.bitmap(counted)]
            return within - BitMap.union(*found), True

        def count(within: BitMap) -> int:
            if whole is None:
                return within.difference_cardinality(BitMap.union(*plain))
            upto, below = whole
            if not plain:
                return within.difference_cardinality(upto) + (len(below) if below else 0)
            if len(plain) == 1:  # the index's bitmap: never changed
                outside = below.difference_cardinality(plain[0]) if below else 0
                return within.difference_cardinality(plain[0] | upto) + outside
            others = BitMap.union(*plain)
            outside = below.difference_cardinality(others) if below else 0
            others |= upto  # this count's own bitmap: changed in place
            return within.difference_cardinality(others) + outside

        return [(apply, count)]

    def _whole_bins(self, rule: Rule) -> tuple[BitMap, BitMap | None] | None:
        """A range leaf that is whole bins of its layout as (C[q], C[p-1] or None); None
        for anything else (no layout, a cut bin, no key in range, not a range leaf)."""
        ranged = self._ranged(rule)
        if ranged is None or ranged[0].op in ("ne", "in", "not_in"):
            return None
        cond, index = ranged
        layout = self._layout(cond, index)
        bounds = None if layout is None else self._bounds(cond, index)
        return None if bounds is None else layout.whole(*bounds)

    def _values(self, rule: Rule) -> list[BitMap]:
        """Bitmaps whose union is the rule's: a value field's `eq` or `in` as its values'
        bitmaps (subtracted in turn, no union of whole-population bitmaps is built)."""
        if isinstance(rule, Cond) and rule.op in ("eq", "in") and (
                not self._memo or rule not in self._memo):
            index = self.snap.field(rule.field)
            if isinstance(index, ValueIndex):
                values = (rule.value,) if rule.op == "eq" else tuple(dict.fromkeys(rule.value))
                return [found for v in values if (found := index.eq(v))]
        return [self.bitmap(rule)]

    def _estimate(self, rule: Rule) -> int:
        """A cheap upper bound of len(bitmap(rule)); _UNKNOWN when only evaluating tells."""
        if self._memo and rule in self._memo:
            return len(self._memo[rule])
        ranged = self._ranged(rule)
        if ranged is None:
            return len(self.bitmap(rule))
        cond, index = ranged
        layout = self._layout(cond, index)
        if layout is None:
            return _UNKNOWN
        if cond.op in ("ne", "in", "not_in"):
            return len(index.exists)
        bounds = self._bounds(cond, index)
        return 0 if bounds is None else layout.estimate(*bounds)

    def _step(self, rule: Rule) -> Step:
        ranged = self._ranged(rule)
        if ranged is not None:
            cond, index = ranged
            return (lambda within, owned: self._range_step(cond, index, within, owned),
                    lambda within: self._range_count(cond, index, within))
        return _and_with(self.bitmap(rule))

    def _minus_range(self, cond: Cond, index: RangeIndex) -> Step:
        def apply(within: BitMap, owned: bool) -> tuple[BitMap, bool]:
            return without(within, self._range(cond, index, within), owned), True

        return apply, lambda within: len(within) - self._range_count(cond, index, within)

    def _range_step(self, cond: Cond, index: RangeIndex, within: BitMap, owned: bool
                    ) -> tuple[BitMap, bool]:
        """A range leaf within what an AND has left: through the layout, in place on a
        bitmap the AND owns; (the result, whether the AND owns it)."""
        layout = self._layout(cond, index)
        if layout is None or cond.op in ("in", "not_in", "ne"):
            return self._range(cond, index, within), False
        bounds = self._bounds(cond, index)
        if bounds is None:
            return EMPTY, False
        found = layout.select(*bounds, index, within, self.snap.live, owned)
        # the layout's result is within itself (changed if owned), EMPTY or a new bitmap
        return found, found is not EMPTY and (owned or found is not within)

    def _ranged(self, rule: Rule) -> tuple[Cond, RangeIndex] | None:
        """A condition on a range index that compares keys (worth running within fewer
        ids), with that index; None for anything else."""
        if not (isinstance(rule, Cond) and rule.type in T.RANGE_TYPES
                and rule.op not in ("exists", "not_exists", "anniversary_in")):
            return None
        index = self.snap.field(rule.field)
        return (rule, index) if isinstance(index, RangeIndex) else None

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
        """len(bitmap(rule)), ending in a *_cardinality instead of the last bitmap."""
        live = self.snap.live
        found = self._memo.get(rule) if self._memo else None
        if found is not None:
            return len(found)
        if isinstance(rule, All):
            return len(live)
        if isinstance(rule, Not):
            return len(live) - self.count(rule.child)
        if isinstance(rule, EventCond):
            snap = self.snap
            return count_event(rule, snap.events, snap.schema, live, self.as_of)
        if isinstance(rule, And):
            result, steps = self._plan(rule.children)
            if not steps:
                return len(result)
            owned = False
            for apply, _ in steps[:-1]:
                if not result:
                    return 0
                result, owned = apply(result, owned)
            return steps[-1][1](result) if result else 0
        if isinstance(rule, Or) and len(rule.children) > 1:
            *rest, last = (self.bitmap(c) for c in rule.children)
            return (BitMap.union(*rest) if len(rest) > 1 else rest[0]).union_cardinality(last)
        if isinstance(rule, Cond):
            index = self.snap.field(rule.field)
            if rule.op == "not_exists":
                return len(live) - len(index.exists)
            if isinstance(index, RangeIndex) and self._ranged(rule):
                return self._range_count(rule, index, None)
            if rule.op == "in" and rule.type in SINGLE_VALUED:  # disjoint values: add up
                return sum(len(index.eq(v)) for v in set(rule.value))
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

    def _any_of(self, cond: Cond, index: RangeIndex, has: BitMap,
                layout: Layout | None = None) -> BitMap:
        """The ids of `has` whose value is one of the condition's list.  A short list
        costs a layout lookup or a few slice operations per value; a long one one decode
        of the index and one vectorised lookup of every key at once."""
        if len(cond.value) <= FEW_VALUES and layout is not None:
            found = [layout.select(*b, index, has, self.snap.live) for v in cond.value
                     if (b := self._bounds(cond, index, v)) is not None]
            return BitMap.union(*found) if found else EMPTY
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

    def _layout(self, cond: Cond, index: RangeIndex) -> Layout | None:
        """The field's range-encoded layout, for the ops it answers."""
        return layout_of(index, cond.type) if cond.op in LAYOUT_OPS else None

    def _bounds(self, cond: Cond, index: RangeIndex, value: Any = None
                ) -> tuple[int | None, int | None] | None:
        """The condition as keys a <= k <= b (None: unbounded); None when no key can
        satisfy it (eq a constant between two keys).  ne is eq's bounds."""
        op = cond.op
        value = cond.value if value is None else value
        if op == "between":
            lo = index.to_key(self._key(cond, value[0]))
            hi = index.to_key(self._key(cond, value[1]))
            return math.ceil(lo), math.floor(hi)
        t = index.to_key(self._key(cond, value))
        if op == "gt":
            return math.floor(t) + 1, None
        if op == "gte":
            return math.ceil(t), None
        if op == "lt":
            return None, math.ceil(t) - 1
        if op == "lte":
            return None, math.floor(t)
        if Fraction(t).denominator != 1:  # eq, ne, in: a constant no key can equal
            return None
        return int(t), int(t)

    def _range(self, cond: Cond, index: RangeIndex, within: BitMap | None = None) -> BitMap:
        """A range condition; only among `within` when given (then a subset of it).
        `within` is a result, so inside live: the layout may skip `& C[last]` (a range
        open above) when every live profile has a key."""
        op, value = cond.op, cond.value
        if op == "anniversary_in":
            found = index.on_month_days(anniversary_month_days(self.as_of, value))
            return found if within is None else found & within
        layout = self._layout(cond, index)
        if layout is not None:
            if op in ("in", "not_in"):
                has = index.exists if within is None else index.exists & within
                hits = self._any_of(cond, index, has, layout)
                return hits if op == "in" else has - hits
            bounds = self._bounds(cond, index)
            if op == "ne":
                has = index.exists if within is None else index.exists & within
                return has - layout.select(*bounds, index, has, self.snap.live) \
                    if bounds else has
            return layout.select(*bounds, index, within, self.snap.live) if bounds else EMPTY
        if op == "between":
            return index.between(self._key(cond, value[0]), self._key(cond, value[1]), within)
        has = index.exists if within is None else index.exists & within
        if op in ("in", "not_in"):
            hits = self._any_of(cond, index, has)
            return hits if op == "in" else has - hits
        if op == "ne":
            return has - index.compare("eq", self._key(cond, value), has)
        return index.compare(op, self._key(cond, value), within)

    def _range_count(self, cond: Cond, index: RangeIndex, within: BitMap | None) -> int:
        """len(_range(...)), from the layout's counts where it has them."""
        layout = self._layout(cond, index)
        if layout is None or cond.op in ("in", "not_in"):
            return len(self._range(cond, index, within))
        bounds = self._bounds(cond, index)
        if cond.op == "ne":
            has = len(index.exists) if within is None else index.exists.intersection_cardinality(
                within)
            return has - (layout.count(*bounds, index, within, self.snap.live) if bounds else 0)
        return layout.count(*bounds, index, within, self.snap.live) if bounds else 0
