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
"""

from __future__ import annotations

import heapq
from bisect import bisect_left
from collections.abc import Callable, Hashable
from functools import lru_cache

from pyroaring import BitMap

from bitseg.index.event_counts import add_counts, signed_sum, sum_counts
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
    """The fewest blocks whose signed sum is the days [first, end) (signed False: only
    added blocks, which also give who has any event there as a union of `exists`)."""
    if first >= end:
        return ()
    return _shortest(first, end, signed, MAX_LEVEL, USE_MONTHS)


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


def whole_days(index: EventIndex, streams: list[str], first: int, end: int) -> RangeIndex:
    """Each profile's count of the streams' events on days [first, end): window_counts'
    blocks summed, kept in the derived cache under the window and its days' last writes."""
    key = _window_key(index, streams, first, end, None)
    found = index.cache.derived.get(key) if key is not None else None
    if found is None:
        plus, minus = window_counts(index, streams, first, end)
        found = signed_sum(plus, minus)
        if key is not None:
            index.cache.derived.put(key, found, size_of(found))
    return found


def judged_days(index: EventIndex, streams: list[str], first: int, end: int,
                whole: RangeIndex, test: Hashable, judge: Callable[[RangeIndex], BitMap]
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


def _window_key(index: EventIndex, streams: list[str], first: int, end: int,
                test: Hashable) -> tuple | None:
    """The cache key of a window's sum (test None) or of a test of it: the streams, the
    days and the last write of any of those days; None when nothing may be cached (the
    cache off, or an index inside a batch, as _cached)."""
    if not WINDOW_CACHE or index.reader is None or not index.reader.committed:
        return None
    stamp, written = 0, index.written
    if written:
        for stream in streams:
            present = index.stream_days.get(stream, [])
            for day in present[bisect_left(present, first):bisect_left(present, end)]:
                stamp = max(stamp, written.get((b"d", stream, day), 0))
    return (b"w", tuple(streams), first, end, test), stamp


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
