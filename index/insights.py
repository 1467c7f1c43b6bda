"""Insights of an audience (a rule's or segment's profiles) next to the whole base.

Everything is a cardinality over one snapshot's indexes; no member row is read:
- keyword, keywords and bool fields: per value, |value ∩ audience| and |value ∩ live|;
  share = count / audience, base share = base count / live, lift = share / base share;
- numbers, dates and timestamps: BUCKETS equal-width buckets between the base's
  smallest and largest value (in the bit-sliced index's stored units, so every bucket
  holds whole keys: [low, next low), the last one up to the maximum included), each
  counted in the audience and the base by a bit-sliced "less than" walk restricted to
  them; the audience's min, max and quantiles (nearest rank, as Describe) by the k-th
  smallest walk restricted to the audience;
- events: per type and window of the last 7, 30 and 90 days, the count blocks that
  make up the window (EventWindow; no per-profile sum over the base): the audience's
  events are the sum over blocks of ±2**i * |slice i ∩ audience|, its members with
  one or more |present ∩ audience|; the window, who of the base is present (those in
  a plus block less the few a minus block takes to zero) and the base's events are
  the same for every audience, so kept per snapshot and as_of (at 10M ~25 MB);
- orders: orders, buyers, revenue and average order value, as Metrics computes them.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np
from pyroaring import BitMap

from bitseg.index import types as T
from bitseg.index.describe import QUANTILES, _order, _shown
from bitseg.index.errors import BitsegError
from bitseg.index.event_counts import signed_sum
from bitseg.index.event_index import EventIndex
from bitseg.index.events import window_blocks
from bitseg.index.fields import RangeIndex, ValueIndex, ids_of
from bitseg.index.keys import stream_key
from bitseg.index.order_index import OrderIndex
from bitseg.index.orders import order_totals
from bitseg.index.rules import Window
from bitseg.index.segments import Metrics
from bitseg.index.snapshot import Snapshot
from bitseg.index.timeline import day_of

DEFAULT_TOP = 10  # values shown per keyword field
MAX_TOP = 1000
BUCKETS = 10  # histogram buckets per numeric or date field
MAX_BUCKETS = 100
WINDOWS = (7, 30, 90)  # days of event activity
MAX_BASE_TOTALS = 64  # base order totals kept per snapshot (by as_of, amount field)
MAX_KEPT_ACTIVITY = 96  # event windows kept per snapshot (by event, days, as_of)
NARROW = 3  # a count block of more slices is cut down to the audience's ids first


@dataclass(frozen=True, slots=True)
class ValueShare:
    value: Any
    count: int  # audience members having it
    base_count: int  # live profiles having it
    share: Fraction | None  # count / audience (None for an empty audience)
    base_share: Fraction | None  # base_count / live
    lift: Fraction | None  # share / base_share


@dataclass(frozen=True, slots=True)
class Bucket:
    low: Any  # included, as a user sees it
    high: Any  # excluded, except in the last bucket, whose high is the base maximum
    count: int
    base_count: int


@dataclass(frozen=True, slots=True)
class FieldInsight:
    name: str
    type: str
    count: int  # audience members having a value
    base_count: int  # live profiles having a value
    values: tuple[ValueShare, ...] = ()  # keyword, keywords, bool: the top ones
    distinct: int = 0  # values present in the audience
    buckets: tuple[Bucket, ...] = ()  # numbers, dates, timestamps
    min: Any = None  # of the audience
    max: Any = None
    quantiles: tuple[tuple[str, Any], ...] = ()  # of the audience


@dataclass(frozen=True, slots=True)
class Activity:
    days: int  # the window: the last `days` days up to as_of
    events: int  # events of the audience in it
    profiles: int  # audience members with at least one
    base_events: int
    base_profiles: int


@dataclass(frozen=True, slots=True)
class EventInsight:
    event: str
    windows: tuple[Activity, ...]


@dataclass(frozen=True, slots=True)
class Insights:
    profiles: int
    total_profiles: int
    fields: tuple[FieldInsight, ...]
    events: tuple[EventInsight, ...]
    orders: Metrics


def insights(snap: Snapshot, audience: BitMap, as_of_us: int,
             fields: Sequence[str] | None = None, top: int = DEFAULT_TOP,
             buckets: int = BUCKETS, amount_field: str = "amount") -> Insights:
    """The audience's fields (all, or those named), event activity and orders."""
    live = snap.live
    audience = audience & live
    names = _fields(snap, fields)
    top = _bounded("top", top, MAX_TOP)
    buckets = _bounded("buckets", buckets, MAX_BUCKETS)
    outside = live - audience  # shared by the fields counted from the complement
    found = tuple(field_insight(snap, name, audience, top, buckets, outside)
                  for name in names)
    events = tuple(event_insight(snap, event, audience, as_of_us) for event in snap.events.types)
    return Insights(len(audience), len(live), found, events,
                    _orders(snap, audience, as_of_us, amount_field))


def _fields(snap: Snapshot, fields: Sequence[str] | None) -> list[str]:
    known = snap.schema.profiles
    if not fields:
        return sorted(known)
    out: list[str] = []
    for name in fields:
        if name not in known:
            listed = ", ".join(sorted(known)) or "none"
            raise BitsegError(f"fields: unknown profile field {name!r} (known fields: {listed})")
        if name not in out:
            out.append(name)
    return out


def _bounded(what: str, n: int, limit: int) -> int:
    if n < 1 or n > limit:
        raise BitsegError(f"{what}: expected 1 to {limit}, got {n}")
    return n


def _ratio(a: int, b: int) -> Fraction | None:
    return Fraction(a, b) if b else None


# ---------------------------------------------------------------------- fields
def field_insight(snap: Snapshot, name: str, audience: BitMap, top: int = DEFAULT_TOP,
                  buckets: int = BUCKETS, outside: BitMap | None = None) -> FieldInsight:
    """One field's insight; `outside` is live - audience when the caller has it."""
    type_ = snap.schema.profiles[name]
    index = snap.field(name)
    live = snap.live
    count = index.exists.intersection_cardinality(audience)
    base_count = index.exists.intersection_cardinality(live)
    if isinstance(index, ValueIndex):
        values, distinct = _value_shares(name, index, audience, live, top, outside)
        return FieldInsight(name, type_, count, base_count, values, distinct)
    if not base_count:
        return FieldInsight(name, type_, 0, 0)
    in_audience = _Descent(index, index.exists & audience)
    hist = _histogram(type_, name, index, in_audience, live, base_count, buckets)
    if not count:
        return FieldInsight(name, type_, 0, base_count, buckets=hist)
    ranks = [1, count] + [max(1, math.ceil(q * count)) for _, q in QUANTILES]
    low, high, *marks = (_shown(type_, index, _key(index, in_audience.kth(k)))
                         for k in ranks)
    return FieldInsight(name, type_, count, base_count, buckets=hist, min=low, max=high,
                        quantiles=tuple((label, v) for (label, _), v
                                        in zip(QUANTILES, marks, strict=True)))


def _value_shares(name: str, index: ValueIndex, audience: BitMap, live: BitMap, top: int,
                  outside: BitMap | None) -> tuple[tuple[ValueShare, ...], int]:
    """Each value's |value ∩ audience|, the top ones with their base counts. With many
    values and a large audience, as |value ∩ live| - |value ∩ (live - audience)|: the
    base's counts are kept (base_values), and the complement is dense, so each value
    costs a probe per id of the value instead of a pass over the audience's ids."""
    size, total = len(audience), len(live)
    base = base_values(name, index, live)
    if len(index.values) * size > len(index.exists):
        rest = live - audience if outside is None else outside
        counted = [(v, base[v] - b.intersection_cardinality(rest))
                   for v, b in index.values.items()]
    else:
        counted = [(v, b.intersection_cardinality(audience)) for v, b in index.values.items()]
    counted = [(v, n) for v, n in counted if n]
    counted.sort(key=lambda vn: (-vn[1], _order(vn[0])))
    shares = []
    for value, n in counted[:top]:
        share, base_share = _ratio(n, size), _ratio(base[value], total)
        lift = share / base_share if share is not None and base_share else None
        shares.append(ValueShare(value, n, base[value], share, base_share, lift))
    return tuple(shares), len(counted)


@dataclass(frozen=True, slots=True)
class _BaseValues:
    """A keyword, keywords or bool field's |value ∩ live| per value: the same for every
    audience, so kept per field index and live profiles (per snapshot)."""

    index: ValueIndex  # held, so `is` cannot meet a new index at a reused address
    live: BitMap
    counts: dict[Any, int]


_base_values: dict[str, _BaseValues] = {}  # by field


def base_values(name: str, index: ValueIndex, live: BitMap) -> dict[Any, int]:
    with _buckets_lock:
        kept = _base_values.get(name)
    if kept is not None and kept.index is index and kept.live is live:
        return kept.counts
    counts = {v: b.intersection_cardinality(live) for v, b in index.values.items()}
    with _buckets_lock:
        _base_values[name] = _BaseValues(index, live, counts)
    return counts


@dataclass(frozen=True, slots=True)
class _BaseBuckets:
    """A range field's bucket edges and cumulative counts over the live base: the same
    for every audience, so kept per field index and live profiles (per snapshot)."""

    index: RangeIndex  # held, so `is` cannot meet a new index at a reused address
    live: BitMap
    highest: int
    edges: tuple[int, ...]
    cumulative: tuple[int, ...]


_base_buckets: dict[tuple[str, int], _BaseBuckets] = {}  # by field and bucket count
_buckets_lock = threading.Lock()  # held only to read or store an entry


def base_buckets(name: str, index: RangeIndex, live: BitMap, base_count: int, n: int
                 ) -> _BaseBuckets:
    """n equal-width buckets of whole stored keys between the base's min and max (fewer
    when the span has fewer keys), with the base's cumulative counts at their edges."""
    with _buckets_lock:
        kept = _base_buckets.get((name, n))
    if kept is not None and kept.index is index and kept.live is live:
        return kept
    in_base = _Descent(index, index.exists & live)
    lowest, highest = in_base.kth(1), in_base.kth(base_count)
    width = max(1, -(-(highest - lowest + 1) // n))  # ceil: n buckets cover the span
    edges = (*range(lowest, highest + 1, width), highest + 1)
    below = [in_base.below(e) for e in edges[1:-1]]
    made = _BaseBuckets(index, live, highest, edges, (0, *below, base_count))
    with _buckets_lock:
        _base_buckets[(name, n)] = made
    return made


def _histogram(type_: str, name: str, index: RangeIndex, in_audience: _Descent,
               live: BitMap, base_count: int, n: int) -> tuple[Bucket, ...]:
    """The audience's counts in the base's buckets (base_buckets), next to the base's."""
    base = base_buckets(name, index, live, base_count, n)
    edges, highest, cum_b = base.edges, base.highest, base.cumulative
    below_a = [in_audience.below(e) for e in edges[1:-1]]
    cum_a = [0, *below_a, in_audience.total]
    out = []
    for i in range(len(edges) - 1):
        high = edges[i + 1] if i + 2 < len(edges) else highest
        out.append(Bucket(_shown(type_, index, _key(index, edges[i])),
                          _shown(type_, index, _key(index, high)),
                          cum_a[i + 1] - cum_a[i], cum_b[i + 1] - cum_b[i]))
    return tuple(out)


def _stored(index: RangeIndex, key: int) -> int:
    return (key - index.base) // index.unit


def _key(index: RangeIndex, stored: int) -> int:
    return index.base + stored * index.unit


class _Descent:
    """Bit-sliced "less than" counts and k-th smallest keys over one set of ids, asked
    many times (a field's bucket edges and quantiles). The ids whose stored keys share
    their top bits are one node, made once from its parent (`parent & slice` for a 1
    bit, `parent - slice` for a 0) and shared by every question that passes through it:
    the questions part ways only in the lower slices, where the nodes are small, so
    the whole set costs about one walk instead of one each. A node's size is kept too;
    its sibling's is then the parent's less it, with no bitmap operation."""

    def __init__(self, index: RangeIndex, within: BitMap) -> None:
        self.slices = index.slices
        self.depth = len(index.slices)
        self.total = len(within)
        self.made: dict[tuple[int, int], BitMap] = {(self.depth, 0): within}
        self.sizes: dict[tuple[int, int], int] = {(self.depth, 0): self.total}

    def _node(self, j: int, prefix: int) -> BitMap:
        """The ids whose stored key >> j is prefix (j = depth: all of them)."""
        found = self.made.get((j, prefix))
        if found is None:
            parent = self._node(j + 1, prefix >> 1)
            known = self.sizes.get((j, prefix))
            if known == len(parent):  # counted already: the slice splits none off, so
                found = parent  # the same ids (a skewed field's long runs of 0 bits)
            elif known == 0:
                found = BitMap()
            else:
                s = self.slices[j]
                found = parent & s if prefix & 1 else parent - s
            self.made[(j, prefix)] = found
            self.sizes[(j, prefix)] = n = len(found)
            self.sizes[(j, prefix ^ 1)] = self.sizes[(j + 1, prefix >> 1)] - n
        return found

    def _size(self, j: int, prefix: int, make: bool) -> int:
        """The node's size; made as a bitmap if `make` (the walk goes on below it), else
        only counted when not known."""
        n = self.sizes.get((j, prefix))
        if n is not None:
            return n
        if make:
            return len(self._node(j, prefix))
        parent = self._node(j + 1, prefix >> 1)
        ones = parent.intersection_cardinality(self.slices[j])
        self.sizes[(j, prefix | 1)] = ones
        self.sizes[(j, prefix & ~1)] = len(parent) - ones
        return self.sizes[(j, prefix)]

    def below(self, k: int) -> int:
        """|{ids whose stored key < k}|: where k has a 1 bit, the ids equal to k above it
        and with a 0 there are below."""
        if k <= 0:
            return 0
        if k >> self.depth:
            return self.total
        count = 0
        for j in range(self.depth - 1, -1, -1):
            prefix = k >> j
            left = self._size(j, prefix, make=j > 0)
            if prefix & 1:
                count += self._size(j, prefix - 1, make=False)
            if not left:
                break
        return count

    def kth(self, k: int) -> int:
        """The k-th smallest stored key (1 <= k <= the ids' count)."""
        prefix = 0
        for j in range(self.depth - 1, -1, -1):
            zeros = self._size(j, 2 * prefix, make=False)
            if k <= zeros:
                prefix = 2 * prefix
            else:
                k -= zeros
                prefix = 2 * prefix + 1
        return prefix


# ---------------------------------------------------------------------- events
def event_insight(snap: Snapshot, event: str, audience: BitMap, as_of_us: int,
                  windows: Sequence[int] = WINDOWS) -> EventInsight:
    within = _Within(audience)  # the windows share blocks: the 30 days' is in the 90's
    return EventInsight(event, tuple(_activity(snap, event, within, as_of_us, days)
                                     for days in windows))


def _activity(snap: Snapshot, event: str, audience: _Within, as_of_us: int,
              days: int) -> Activity:
    window, present, base_events = _kept_window(snap, event, days, as_of_us)
    return Activity(days, window.events(audience), present.intersection_cardinality(
        audience.ids), base_events, len(present))


class _Within:
    """A set of profiles and their events per count block asked about (sum of
    2**i * |slice i ∩ them|), so a block met again in another window is not counted
    again. A block of several slices is first cut down to its profiles in the set:
    fewer ids to test against each slice."""

    def __init__(self, ids: BitMap) -> None:
        self.ids = ids
        self.seen: dict[int, tuple[RangeIndex, int]] = {}  # by id(block), the block held

    def events(self, counts: RangeIndex) -> int:
        found = self.seen.get(id(counts))
        if found is None:
            ids = counts.exists & self.ids if len(counts.slices) > NARROW else self.ids
            found = self.seen[id(counts)] = (counts, sum(
                s.intersection_cardinality(ids) << i for i, s in enumerate(counts.slices)))
        return found[1]


@dataclass(frozen=True, slots=True)
class EventWindow:
    """One event type's last `days` days up to as_of as the count blocks that make it up
    (event_windows: dyadic and month blocks; the partial days from their raw rows), as
    count_by_bitmaps splits a window: each profile's count there is its count in the
    `plus` blocks less that in the `minus` ones (every row of a minus block is in a
    plus one). No per-profile sum over the whole base is made:
    - the events of a set of profiles are sum over blocks of ±2**i * |slice i ∩ set|;
    - who has one is who is in a plus block, less those whose minus blocks take all of
      their count: those are among the minus blocks' profiles, so only these are summed
      (the adder over the blocks cut down to them)."""

    plus: tuple[RangeIndex, ...] = ()
    minus: tuple[RangeIndex, ...] = ()

    def events(self, within: _Within) -> int:
        return sum(within.events(b) for b in self.plus) - \
            sum(within.events(b) for b in self.minus)

    def present(self, live: BitMap) -> BitMap:
        """The live profiles with at least one of the window's events."""
        if not self.plus:
            return BitMap()
        inside = BitMap.union(*(b.exists for b in self.plus)) & live
        if not self.minus:
            return inside
        taken = BitMap.union(*(b.exists for b in self.minus)) & live
        left = signed_sum([_cut(b, taken) for b in self.plus],
                          [_cut(b, taken) for b in self.minus])
        return inside - (taken - left.exists)


def _cut(counts: RangeIndex, ids: BitMap) -> RangeIndex:
    """A count index kept only for these ids."""
    exists = counts.exists & ids
    if not exists:
        return RangeIndex()
    slices = [s & ids for s in counts.slices]
    while slices and not slices[-1]:
        slices.pop()
    return RangeIndex(0, 1, tuple(slices), exists)


def event_window(snap: Snapshot, event: str, days: int, as_of_us: int) -> EventWindow:
    """The blocks of `event` in the last `days` days up to as_of, as a rule's count reads
    them (events.window_blocks): whole days from the stored and derived blocks, the
    partial days from their rows."""
    events = snap.events
    if event not in events.type_days:
        return EventWindow()
    lo, hi = Window("last_days", days).bounds(as_of_us)
    if lo is not None and day_of(lo) > events.type_days[event][-1]:
        return EventWindow()  # nothing that recent
    plus, minus = window_blocks(events, [event], [stream_key(event)], lo, hi)
    return EventWindow(tuple(plus), tuple(minus))


@dataclass(slots=True)
class _KeptActivity:
    """Per (event, days, as_of): the window's blocks, who of the base has one of its
    events and the base's events there; the same for every audience, so kept per events
    index and live profiles (per snapshot). A new as_of makes its windows anew."""

    events: EventIndex  # held, so `is` cannot meet a new index at a reused address
    live: BitMap
    found: dict[tuple[str, int, int], tuple[EventWindow, BitMap, int]]


_kept_activity: list[_KeptActivity] = []  # the last snapshot's
_activity_lock = threading.Lock()  # held only to read or store an entry


def _kept_window(snap: Snapshot, event: str, days: int, as_of_us: int
                 ) -> tuple[EventWindow, BitMap, int]:
    """(the window, the live profiles with one of its events, the base's events)."""
    with _activity_lock:
        kept = _kept_activity[0] if _kept_activity else None
    if kept is None or kept.events is not snap.events or kept.live is not snap.live:
        kept = _KeptActivity(snap.events, snap.live, {})
        with _activity_lock:
            _kept_activity[:] = [kept]
    key = (event, days, as_of_us)
    found = kept.found.get(key)
    if found is None:
        window = event_window(snap, event, days, as_of_us)
        found = (window, window.present(snap.live), window.events(_Within(snap.live)))
        with _activity_lock:
            if len(kept.found) >= MAX_KEPT_ACTIVITY:  # as_of values come and go
                kept.found.clear()
            kept.found[key] = found
    return found


# ---------------------------------------------------------------------- orders
def _orders(snap: Snapshot, audience: BitMap, as_of_us: int, amount_field: str) -> Metrics:
    amount_type = snap.schema.orders.get(amount_field)
    if amount_type is None and amount_field != "amount":
        raise BitsegError(f"amount_field: unknown order field {amount_field!r}")
    if amount_type not in (None, T.INT, T.FLOAT):
        raise BitsegError(f"amount_field: {amount_field!r} is a {amount_type} field, "
                          "not a number")
    kind = amount_type or T.FLOAT
    total = base_total(snap, as_of_us, amount_field, kind)  # first: it keeps _latest
    per = per_profile(snap.orders, amount_field) if as_of_us >= _latest(snap.orders) else None
    if per is None:
        orders, buyers, revenue = order_totals(snap.orders, audience, as_of_us,
                                               amount_field, kind)
    else:
        orders, buyers, revenue = per.totals(audience, kind)
    return Metrics(len(audience), len(snap.live), orders, buyers, revenue, total)


class PerProfile:
    """Each profile's live orders and exact sum of an amount field's keys, over every
    order (an as_of at or after the latest order): dense arrays by profile id, the same
    for every audience, so made once per orders index and amount field (at 10M profiles
    and 20M orders ~2 s at load ~9 on the shared 2-core machine, and 95 MB) and kept
    while the index lives.
    An audience's orders, buyers and revenue are then a gather over its ids, not a pass
    over every order's owner."""

    def __init__(self, index: OrderIndex, amount_field: str) -> None:
        owner = index.owner
        live = None if len(index.live) == index.count else ids_of(index.live)
        owners = owner if live is None else owner.take(live)
        counts = np.bincount(owners, minlength=1)
        self.counts = counts.astype(np.min_scalar_type(int(counts.max())))
        self.sums: np.ndarray | None = np.zeros(len(counts), dtype=np.int64)
        self.most = 0  # the largest |key|: a sum of n keys fits int64 while most * n < 2**63
        col = index.columns.get(amount_field)
        if col is None:
            return
        keys = col.keys[:index.count] if live is None else col.keys.take(live)
        if not col.complete:
            valid = col.valid[:index.count] if live is None else col.valid.take(live)
            keys = np.where(valid, keys, 0)
        self.most = max(-int(keys.min()), int(keys.max())) if len(keys) else 0
        if self.most * int(counts.max()) < 2**53:  # each profile's float64 partial sums
            # are whole numbers below 2**53, so exact
            self.sums = np.bincount(owners, weights=keys, minlength=len(counts)
                                    ).astype(np.int64)
        else:
            self.sums = None  # order_totals sums them exactly instead

    def totals(self, profiles: BitMap, kind: str) -> tuple[int, int, Fraction]:
        """(orders, buyers, total) of these profiles, as order_totals with as_of None."""
        assert self.sums is not None
        ids = ids_of(profiles)
        ids = ids[ids < len(self.counts)]
        counts = self.counts.take(ids)
        orders = int(counts.sum(dtype=np.int64))
        sums = self.sums.take(ids)
        if self.most * orders < 2**63:  # no partial sum can overflow int64
            total = int(sums.sum())
        else:
            total = int(sums.astype(object).sum())  # exact Python ints
        scale = T.FLOAT_SCALE if kind == T.FLOAT else 1
        return orders, int(np.count_nonzero(counts)), Fraction(total, scale)


_per_profile: weakref.WeakKeyDictionary[OrderIndex, dict[str, PerProfile]] = \
    weakref.WeakKeyDictionary()


def per_profile(index: OrderIndex, amount_field: str) -> PerProfile | None:
    """The index's PerProfile for this amount field (made on first use); None without
    orders or where its sums could lose precision."""
    if not index.count:
        return None
    with _base_lock:
        found = _per_profile.get(index, {}).get(amount_field)
    if found is None:
        found = PerProfile(index, amount_field)
        with _base_lock:
            _per_profile.setdefault(index, {})[amount_field] = found
    return found if found.sums is not None else None


def _latest(index: OrderIndex) -> int:
    """The latest order's ts (0 without orders), kept with the base totals."""
    with _base_lock:
        entry = _base_totals.get(index)
    if entry is None:
        return int(index.ts.max()) if index.count else 0
    return entry.latest


@dataclass(slots=True)
class _BaseTotals:
    live: BitMap  # the live profiles they are of (held, so `is` cannot meet a reused id)
    latest: int  # the latest order's ts: any as_of from then on sees every order
    totals: dict[tuple[int | None, str, str], Fraction]


_base_totals: weakref.WeakKeyDictionary[OrderIndex, _BaseTotals] = weakref.WeakKeyDictionary()
_base_lock = threading.Lock()  # held only to read or store an entry


def base_total(snap: Snapshot, as_of_us: int, amount_field: str, kind: str) -> Fraction:
    """The live base's order total at as_of: the same for every audience, so computed
    once per orders index and live profiles (that is, per snapshot) and kept with it."""
    index = snap.orders
    with _base_lock:
        entry = _base_totals.get(index)
    if entry is None or entry.live is not snap.live:
        latest = int(index.ts.max()) if index.count else 0
        entry = _BaseTotals(snap.live, latest, {})
        with _base_lock:
            _base_totals[index] = entry
    key = (None if as_of_us >= entry.latest else as_of_us, amount_field, kind)
    total = entry.totals.get(key)
    if total is None:
        total = order_totals(index, snap.live, key[0], amount_field, kind)[2]
        with _base_lock:
            if len(entry.totals) >= MAX_BASE_TOTALS:  # as_of values before the latest order
                entry.totals.clear()
            entry.totals[key] = total
    return total


__all__ = ["Activity", "Bucket", "EventInsight", "FieldInsight", "Insights",
           "ValueShare", "event_window", "insights"]
