"""A window's whole days as a handful of count blocks: dyadic day blocks and months.

The blocks:
- dyadic: block k of level j covers days [k * 2**j, (k + 1) * 2**j), j = 0..MAX_LEVEL.
  Level 0 is the stored day bucket; a higher level is the per-profile sum of its two
  halves, made in memory on first use and kept in the BucketCache's `derived` part
  (event_index.DERIVED_BYTES, least recently used first out); nothing new is stored;
- calendar months: the stored month buckets.

Walking from day boundary a to day boundary b, taking a block [s, e) forwards (s to e,
adding it) or backwards (e to s, subtracting it), always sums to exactly [a, b): the
terms telescope. So the fewest blocks for a window is a shortest path over boundaries;
[1, 31) is +[0, 32) - [0, 1) - [31, 32), one add and one subtract instead of 29 adds.
The positive blocks' sum minus the negative ones' is each profile's count in the window,
never below zero (every day subtracted is also counted by a positive block).

A derived block is cached under its days' last writes (EventIndex.written; 0 for a day
not written since open): a batch that writes one of its days gives it a new key, so an
index never reads a block made from other days than its own.

A window's whole-day sum is cached the same way (whole_days), and so is a comparison of
it (judged_days): as_of "now" moves a window's whole days once a day, so a window asked
again sums nothing; only its two partial days are counted from rows on each call. Both
live in the same bounded `derived` part, under the window and its days' last writes.
When the day rolls over, the new window's sum is the day before's, cached, less its
first day plus the new last one (_rolled), not its blocks summed again.
"""

from __future__ import annotations

import heapq
from bisect import bisect_left
from collections.abc import Callable, Hashable
from fractions import Fraction
from functools import lru_cache

import numpy as np
from pyroaring import BitMap

from bitseg.index import native_roaring
from bitseg.index.event_counts import (
    add_counts,
    count_table,
    counts_at,
    counts_in,
    moved,
    of_slices,
    signed_slices,
    signed_sum,
    split_signed_slices,
    sum_counts,
)
from bitseg.index.event_index import EventIndex
from bitseg.index.fields import RangeIndex
from bitseg.index.timeline import first_day, month_of

MAX_LEVEL = 8  # the largest derived block: 2**8 = 256 days
USE_MONTHS = True  # month buckets are blocks too (tests turn them off to force dyadic)
FROM_MONTHS = 6  # a block of 64 days or more is first made from months and ...
PIECES = 4  # ... blocks of at most 16 days
MONTH = -1  # a Term's level for a calendar month
WINDOW_CACHE = True  # whole_days and judged_days keep what they made (tests turn it off)
Term = tuple[int, int, int]  # (sign +1 / -1, level or MONTH, block number or month)


def terms(first: int, end: int, signed: bool = True) -> tuple[Term, ...]:
    """Blocks whose signed sum is the days [first, end): of the fewest blocks and the
    fewest added-only ones, those cheaper to sum (_cheaper). signed False: the fewest
    added-only blocks, which also give who has any event there as a union of `exists`."""
    if first >= end:
        return ()
    if not signed:
        return _shortest(first, end, False, MAX_LEVEL, USE_MONTHS)
    return _cheaper(first, end, MAX_LEVEL, USE_MONTHS)


MAX_BLOCKS = 9  # at most 8 operations a window, whichever path is cheaper
SUM_STEP = 3.0  # one add's own cost, in days of profiles (DAY_SPREAD)
DAY_SPREAD = 0.8  # a block of d days holds about d**0.8 days' profiles


@lru_cache(maxsize=4096)
def _cheaper(first: int, end: int, top: int, months: bool) -> tuple[Term, ...]:
    """The fewest blocks, or the fewest that are only added when they are at most
    MAX_BLOCKS, whichever _cost says sums faster. Fewest is not fastest: subtracting
    is one more add over the whole window, and where the subtracted blocks are large
    that loses more than the blocks saved."""
    fewest = _shortest(first, end, True, top, months)
    added = _shortest(first, end, False, top, months)
    if len(added) > MAX_BLOCKS:
        return fewest
    return added if _cost(added) < _cost(fewest) else fewest


def _cost(path: tuple[Term, ...]) -> float:
    """The work of summing these blocks as event_counts.signed_slices does, from their
    days alone. A block of d days holds about d**DAY_SPREAD days' profiles (the same
    profiles come back on other days); adding one to the sum of the smaller ones costs
    both sizes plus SUM_STEP (its ~20 slice operations, most small). The constants were
    fitted at 10M on 24 windows of 7, 14, 30 and 90 days over four event types: choosing
    by them was within 0.45 ms of the faster path in sum, always the fewest 12.5 ms."""
    def chain(sizes: list[float]) -> tuple[float, float]:
        sizes.sort()
        cost, total = 0.0, sizes[0] if sizes else 0.0
        for size in sizes[1:]:
            cost += SUM_STEP + total + size
            total += size
        return cost, total

    def size(term: Term) -> float:
        _, level, number = term
        days = first_day(number + 1) - first_day(number) if level == MONTH else 1 << level
        return days ** DAY_SPREAD

    cost, total = chain([size(t) for t in path if t[0] > 0])
    minus, taken = chain([size(t) for t in path if t[0] < 0])
    return cost + (minus + SUM_STEP + total + taken if taken else 0.0)


@lru_cache(maxsize=4096)
def _shortest(first: int, end: int, signed: bool, top: int, months: bool,
              making: bool = False) -> tuple[Term, ...]:
    """The cheapest path over the day boundaries it can use: each side and each month
    start in the span rounded down and up to every level, and the top level's boundaries
    between. A block costs 1 (making a block, a derived one of level j costs 1 + j: it
    may have to be made itself, where a month or a day is one stored bucket)."""
    lo, hi = first >> top << top, -(-end >> top << top)
    nodes = {lo + i * (1 << top) for i in range((hi - lo) >> top)} | {hi, end}
    starts: dict[int, int] = {}  # month start day -> month
    if months:
        m = month_of(lo)
        while (day := first_day(m)) <= hi:
            if day >= lo:
                starts[day] = m
            m += 1
    for j in range(top + 1):
        for x in (first, end, *starts):
            nodes.update((x >> j << j, -(-x >> j << j)))
    nodes = {x for x in nodes if lo <= x <= hi}
    came: dict[int, tuple[int, Term]] = {}
    best = {first: 0}
    heap = [(0, first)]
    while heap:
        cost, x = heapq.heappop(heap)
        if x == end:
            break
        if cost > best[x]:
            continue
        for y, term in _steps(x, top, starts, signed):
            step = 1 + term[1] if making and term[1] > 0 else 1
            if y in nodes and cost + step < best.get(y, cost + step + 1):
                best[y] = cost + step
                came[y] = (x, term)
                heapq.heappush(heap, (cost + step, y))
    path: list[Term] = []
    x = end
    while x != first:
        x, term = came[x]
        path.append(term)
    return tuple(reversed(path))


def _steps(x: int, top: int, starts: dict[int, int], signed: bool
           ) -> list[tuple[int, Term]]:
    """The blocks that start (or, signed, end) at boundary x, biggest first."""
    out = []
    month = starts.get(x)
    if month is not None:  # the month starting at x (used when its end is a node too)
        out.append((first_day(month + 1), (1, MONTH, month)))
    for j in range(top, -1, -1):
        if x % (1 << j) == 0:
            out.append((x + (1 << j), (1, j, x >> j)))
    if signed:
        for j in range(top, -1, -1):
            if x % (1 << j) == 0:
                out.append((x - (1 << j), (-1, j, (x >> j) - 1)))
        if month is not None:
            out.append((first_day(month - 1), (-1, MONTH, month - 1)))
    return out


def window_counts(index: EventIndex, streams: list[str], first: int, end: int
                  ) -> tuple[list[RangeIndex], list[RangeIndex]]:
    """(blocks to add, blocks to subtract) whose difference is each profile's count of
    the streams' events on days [first, end)."""
    first, end = _present_span(index, streams, first, end)
    plus: list[RangeIndex] = []
    minus: list[RangeIndex] = []
    for sign, level, number in terms(first, end):
        for stream in streams:
            block = _block(index, stream, level, number)
            if block.exists:
                (plus if sign > 0 else minus).append(block)
    return plus, minus


class WindowSum:
    """A window's whole-day counts as a count index whose `exists`, the union of its
    slices, is made on first use: a `count >= n` reads only the slices (at_least,
    counts_at), and that union of a 10M window's is ~0.7 ms. compare() is RangeIndex's."""

    __slots__ = ("slices", "_index", "asked")

    def __init__(self, slices: tuple[BitMap, ...]) -> None:
        self.slices = slices
        self._index: RangeIndex | None = None
        self.asked = 0  # how often its profiles' counts were read (counts_at_days)

    @property
    def index(self) -> RangeIndex:
        if self._index is None:
            self._index = of_slices(self.slices)
        return self._index

    @property
    def exists(self) -> BitMap:
        return self.index.exists

    def compare(self, op: str, constant: Fraction | int) -> BitMap:
        return self.index.compare(op, constant)


def whole_days(index: EventIndex, streams: list[str], first: int, end: int) -> WindowSum:
    """Each profile's count of the streams' events on days [first, end): window_counts'
    blocks summed, kept in the derived cache under the window and its days' last writes
    (its bytes counted twice over slice 0's, for the `exists` it may make)."""
    key = _window_key(index, streams, first, end, None)
    found = index.cache.derived.get(key) if key is not None else None
    if found is None:
        found = _rolled(index, streams, first, end) if key is not None else None
        if found is None:
            found = WindowSum(_window_slices(index, *window_counts(index, streams, first, end)))
        if key is not None:
            size = sum(_bytes(bitmap) for bitmap in found.slices)
            index.cache.derived.put(key, found, size + (_bytes(found.slices[0])
                                                        if found.slices else 0))
    return found


SPLIT_FROM = 200_000  # blocks to add holding this many profiles (slice 0s) are summed ...
SPLIT_STEP = 1 << 20  # ... in two id ranges at once, split at a multiple of this


def _window_slices(index: EventIndex, plus: list[RangeIndex], minus: list[RangeIndex]
                   ) -> tuple[BitMap, ...]:
    """signed_slices(plus, minus); when the blocks are large (and their halves may be
    cached: as derived blocks, not inside a batch), the ids below and above a split summed
    on the two cores at once (split_signed_slices; at 10M a mid-month 30-day popup
    window's seven blocks: 3.1 ms against 5.2)."""
    added = [block for block in plus if block.exists]
    if not _committed(index) or not added or not native_roaring.AVAILABLE or \
            sum(len(block.slices[0]) for block in added) < SPLIT_FROM:
        return signed_slices(plus, minus)
    top = max(block.exists.max() for block in added)
    split = max(1, round(top / (2 * SPLIT_STEP))) * SPLIT_STEP
    return split_signed_slices([_halves(index, block, split) for block in added],
                               [_halves(index, block, split) for block in minus if block.exists])


def _halves(index: EventIndex, block: RangeIndex, split: int
            ) -> tuple[tuple[BitMap, ...], tuple[BitMap, ...]]:
    """The block's slices of the ids below `split` and of those above, kept in the derived
    cache beside it (splitting a window's blocks on every ask would cost what it saves).
    The entry holds the block itself, so no other object can take its id while it lives."""
    key = ((b"h", id(block), split), 0)
    cache = index.cache.derived
    found = cache.get(key)
    if found is None:
        below = BitMap(range(split))
        found = (block, tuple(bits & below for bits in block.slices),
                 tuple(bits - below for bits in block.slices))
        cache.put(key, found, 2 * size_of(block))
    return found[1], found[2]


# Where a window's cached neighbour may start and end, from its own first and end day,
# fewest one-day steps first: a day earlier (the rollover at midnight), and a first
# partial day that joined the whole days or not, that day or the day before.
NEIGHBOURS = ((-1, 0), (1, 0), (0, -1), (-1, -1), (1, -1), (-2, -1))


def _rolled(index: EventIndex, streams: list[str], first: int, end: int
            ) -> WindowSum | None:
    """This window's sum from a cached one (under its days' last writes, so as this index
    holds them) whose ends are at most a day off, its extra days taken off and the missing
    ones added; None when there is none. as_of "now" moves a window's whole days on by a
    day at midnight (and a first partial day holding most of its rows joins them, which
    moves the start alone), and the day before's sum then makes today's in a step or two
    of one day, ~1 ms each at 10M, where summing the blocks of a 30-day window mid-month
    is ~4-5 ms; where _cost says the blocks are cheaper, None as well."""
    if first >= end:
        return None
    cache = index.cache.derived
    for start, stop in NEIGHBOURS:
        a, b = first + start, end + stop
        earlier = cache.get(_window_key(index, streams, a, b, None)) if a < b else None
        if earlier is not None:
            break
    else:
        return None
    gone = range(a, first)  # days of [a, b) not in [first, end) (b is never past end)
    new = [*range(first, a), *range(b, end)]
    # a one-day step is an add over the whole window: cheaper than its blocks mid-month
    # (at 10M, 5.4 against 7.8 ms for the first ask), not at a month start (2.8 against
    # 1.6: a month less a day is one step already)
    step = SUM_STEP + (end - first) ** DAY_SPREAD + 1
    if (len(gone) + len(new)) * step >= _cost(terms(first, end)):
        return None
    slices = earlier.slices
    for stream in streams:
        slices = moved(slices, [_block(index, stream, 0, d) for d in gone],
                       [_block(index, stream, 0, d) for d in new])
    return WindowSum(slices)


def judged_days(index: EventIndex, streams: list[str], first: int, end: int,
                whole: WindowSum, test: Hashable, judge: Callable[[WindowSum], BitMap]
                ) -> BitMap:
    """judge(whole), whole being whole_days(index, streams, first, end): the profiles
    whose whole-day count passes `test` (which names what judge does), kept in the
    derived cache beside the sum (never mutate it)."""
    key = _window_key(index, streams, first, end, test)
    found = index.cache.derived.get(key) if key is not None else None
    if found is None:
        found = judge(whole)
        if key is not None:
            index.cache.derived.put(key, found, _bytes(found))
    return found


TABLE_FROM = 4096  # a window asked again for this many profiles' counts reads a table
TABLE_SHARE = 8  # ... that is at most this share of the derived cache (32 MB of 256)
TABLE = "table"  # the test the table is cached under beside the window's sum


def counts_at_days(index: EventIndex, streams: list[str], first: int, end: int,
                   whole: WindowSum, ids: np.ndarray, edge: BitMap) -> np.ndarray:
    """counts_at(whole, ids, edge), whole being whole_days(index, streams, first, end):
    the whole-day counts of these profiles (those with rows on the partial days).

    A window asked again for TABLE_FROM profiles or more reads them from a table of every
    profile's count (event_counts.count_table: a byte an id at 10M while counts fit in 8
    bits), made from the sum's slices on its second ask and kept beside it in the derived
    cache: with as_of "now" the partial days move on every call and the whole days once
    a day. At 10M, the 196k profiles on a 7-day page-view window's two partial days took
    ~4.3 ms through counts_at's slice intersections on every call; the first ask stays
    there, since making the table reads every slice whole."""
    whole.asked += 1
    key = _window_key(index, streams, first, end, TABLE) if len(ids) >= TABLE_FROM else None
    if key is None:
        return counts_at(whole, ids, edge)
    cache = index.cache.derived
    table = cache.get(key)
    if table is None:
        if whole.asked > 1:
            table = count_table(whole.slices, cache.limit // TABLE_SHARE)
        if table is None:  # the first ask, or a table too large for the cache
            return counts_at(whole, ids, edge)
        cache.put(key, table, table.nbytes)
    return counts_in(table, ids)


def _window_key(index: EventIndex, streams: list[str], first: int, end: int,
                test: Hashable) -> tuple | None:
    """The cache key of a window's sum (test None) or of a test of it: the streams, the
    days and the last write of any of those days; None when nothing may be cached (the
    cache off, or an index inside a batch, as _cached)."""
    if not WINDOW_CACHE or not _committed(index):
        return None
    stamp, written = 0, index.written
    if written:
        for stream in streams:
            present = index.stream_days.get(stream, [])
            for day in present[bisect_left(present, first):bisect_left(present, end)]:
                stamp = max(stamp, written.get((b"d", stream, day), 0))
    return (b"w", tuple(streams), first, end, test), stamp


def _committed(index: EventIndex) -> bool:
    """Whether what is made from this index's days may be cached: it reads a committed
    snapshot (inside a batch, a version number may be reused by one that aborts)."""
    return index.reader is not None and index.reader.committed


def is_window(key: tuple) -> bool:
    """Whether a derived cache key is a window's (whole_days, judged_days), not a block's
    (a bench drops them to time a window's first ask)."""
    return key[0] == b"w"


def window_presence(index: EventIndex, streams: list[str], first: int, end: int
                    ) -> list[BitMap]:
    """Bitmaps whose union is who has any of the streams' events on days [first, end)."""
    first, end = _present_span(index, streams, first, end)
    out = []
    for _, level, number in terms(first, end, signed=False):
        for stream in streams:
            block = _block(index, stream, level, number)
            if block.exists:
                out.append(block.exists)
    return out


def _present_span(index: EventIndex, streams: list[str], first: int, end: int
                  ) -> tuple[int, int]:
    """[first, end) narrowed to the days some stream has (an empty span when none)."""
    lo = min((index.stream_days[s][0] for s in streams if index.stream_days.get(s)),
             default=end)
    hi = max((index.stream_days[s][-1] + 1 for s in streams if index.stream_days.get(s)),
             default=end)
    first, end = max(first, lo), min(end, hi)
    return (first, end) if first < end else (0, 0)


def _block(index: EventIndex, stream: str, level: int, number: int) -> RangeIndex:
    """One stream's counts in a month or dyadic block."""
    found = _cached(index, stream, level, number, make=True)
    assert found is not None  # made when missing
    return found


def _cached(index: EventIndex, stream: str, level: int, number: int, make: bool
            ) -> RangeIndex | None:
    """A block, or None when it is a derived one not made yet and `make` is False."""
    if level == MONTH:
        months = index.stream_months.get(stream, [])
        i = bisect_left(months, number)
        if i < len(months) and months[i] == number:
            return index.bucket(b"m", stream, number)
        return RangeIndex()
    present = index.stream_days.get(stream, [])
    lo, hi = number << level, (number + 1) << level
    i, k = bisect_left(present, lo), bisect_left(present, hi)
    if i == k:
        return RangeIndex()
    if k - i == 1:  # one day with events: its own bucket
        return index.bucket(b"d", stream, present[i])
    if index.reader is None:  # not pinned to a snapshot: nothing to read (as bucket())
        return RangeIndex()
    if not index.reader.committed:  # inside a batch: nothing cached, the days summed
        return sum_counts([index.bucket(b"d", stream, d) for d in present[i:k]])
    written = index.written
    stamp = max((written.get((b"d", stream, d), 0) for d in present[i:k]), default=0) \
        if written else 0
    key = ((b"y%d" % level, stream, number), stamp)
    cache = index.cache.derived
    found = cache.get(key)
    if found is None and make:
        found = _make(index, stream, level, number)
        cache.put(key, found, size_of(found))
    return found


def _make(index: EventIndex, stream: str, level: int, number: int) -> RangeIndex:
    """A derived block: the sum of its two halves; a block of 2**FROM_MONTHS days or more
    whose halves are not both made yet, from months and blocks of at most 2**PIECES days
    instead (a few stored buckets read, not every day: the first count after open of a
    year-long window)."""
    halves = [_cached(index, stream, level - 1, 2 * number + h, make=level < FROM_MONTHS)
              for h in (0, 1)]
    if halves[0] is not None and halves[1] is not None:
        return add_counts(halves[0], halves[1])
    plus: list[RangeIndex] = []
    minus: list[RangeIndex] = []
    for sign, j, n in _shortest(number << level, (number + 1) << level, True, PIECES,
                                USE_MONTHS, making=True):
        block = _block(index, stream, j, n)
        if block.exists:
            (plus if sign > 0 else minus).append(block)
    return signed_sum(plus, minus)


def size_of(counts: RangeIndex) -> int:
    """The bytes a count index's bitmaps hold (their containers, as roaring counts them)."""
    return sum(_bytes(bitmap) for bitmap in (counts.exists, *counts.slices))


def _bytes(bitmap: BitMap) -> int:
    stats = bitmap.get_statistics()
    return stats["n_bytes_array_containers"] + stats["n_bytes_run_containers"] + \
        stats["n_bytes_bitset_containers"]
