"""Per-profile event counts as bit-sliced count indexes, and their arithmetic.

A count index is a RangeIndex with base 0 and unit 1: slice i holds the profiles whose
count has bit i set, `exists` those with any count. Sums over a window are made in the
bitmap domain (a ripple-carry adder); no profile's count is ever read one by one.
"""

from __future__ import annotations

import os
import struct
import threading
from array import array
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import numpy as np
from pyroaring import BitMap

from bitseg.index import native_roaring
from bitseg.index.fields import EMPTY, RangeIndex, bitmap_of, ids_of

if TYPE_CHECKING:
    from bitseg.index.event_windows import WindowSum


def count_index(ids: np.ndarray, counts: np.ndarray) -> RangeIndex:
    """A bit-sliced index of per-profile counts (ids distinct, counts >= 1)."""
    if len(ids) == 0:
        return RangeIndex()
    depth = int(counts.max()).bit_length()
    slices = tuple(bitmap_of(ids[(counts >> i) & 1 == 1]) for i in range(depth))
    return RangeIndex(0, 1, slices, bitmap_of(ids))


def count_indexes(bounds: np.ndarray, ids: np.ndarray, counts: np.ndarray,
                  order: list[int] | None = None) -> Iterator[RangeIndex]:
    """count_index of many groups at once: group k is ids[bounds[k]:bounds[k + 1]]
    (ascending and distinct within the group, at least one id) with those counts; the
    groups come in `order` (default: as they are), each built only when it is asked for.

    The same indexes as one count_index per group, without a mask per slice per group:
    one pass per bit over all the runs picks the ids with that bit set (still ascending
    within each group), so each group's slice is a contiguous range of that pick, found
    by a binary search of the bounds. Python only builds the bitmaps. Most counts are
    1, so where every count of a group is odd its slice 0 is a copy of `exists`. (Not
    `exists` less the even ones: a difference may leave other containers, other bytes.)"""
    if len(bounds) < 2:
        return
    top = np.maximum.reduceat(counts, bounds[:-1])
    depth = np.frexp(top.astype(np.float64))[1].tolist()  # bit_length of each largest
    ids = ids.astype(np.uint32, copy=False)
    whole = array("I", ids.tobytes())
    cut = bounds.tolist()
    # bit 0 from the low byte (one byte a run, not two int64 temporaries); the higher
    # bits only among the few runs counting more than 1
    at = np.flatnonzero(counts.astype(np.uint8) & 1)
    picks, cuts = [array("I", ids[at].tobytes())], [np.searchsorted(at, bounds).tolist()]
    more = np.flatnonzero(counts > 1)
    higher = counts[more]
    for bit in range(1, max(depth)):
        at = more[np.flatnonzero((higher >> bit) & 1)]
        picks.append(array("I", ids[at].tobytes()))
        cuts.append(np.searchsorted(at, bounds).tolist())
    odd, odd_cut = picks[0], cuts[0]
    for k in range(len(depth)) if order is None else order:
        exists = BitMap(whole[cut[k]:cut[k + 1]])
        a, b = odd_cut[k], odd_cut[k + 1]
        first = exists.copy() if b - a == cut[k + 1] - cut[k] else BitMap(odd[a:b])
        rest = (BitMap(picks[i][cuts[i][k]:cuts[i][k + 1]]) for i in range(1, depth[k]))
        yield RangeIndex(0, 1, (first, *rest), exists)


def add_counts(a: RangeIndex, b: RangeIndex) -> RangeIndex:
    """The per-profile sum of two count indexes: a ripple-carry adder over bitmaps."""
    if not a.exists:
        return b
    if not b.exists:
        return a
    return RangeIndex(0, 1, _added(a.slices, b.slices), a.exists | b.exists)


def sub_counts(a: RangeIndex, b: RangeIndex) -> RangeIndex:
    """The per-profile difference a - b of two count indexes, where every count of b is
    at most a's (b counts a subset of a's rows): a ripple-borrow subtractor."""
    if not b.exists:
        return a
    return of_slices(_taken(a.slices, b.slices))


def signed_sum(plus: list[RangeIndex], minus: list[RangeIndex]) -> RangeIndex:
    """sub_counts(sum_counts(plus), sum_counts(minus)) (the minus blocks count a subset
    of the plus blocks' rows, as a window's signed blocks do) without the `exists` of
    either sum, which only the result needs: at 10M, 7.6 ms against 8.9 for a mid-month
    window's five blocks."""
    if not any(m.exists for m in minus):
        return sum_counts(plus)
    return of_slices(signed_slices(plus, minus))


def signed_slices(plus: list[RangeIndex], minus: list[RangeIndex]) -> tuple[BitMap, ...]:
    """The slices of signed_sum(plus, minus), and no `exists` at all: a `count >= n`
    reads only the slices (at_least), and the union of a 10M window's slices is ~0.7 ms."""
    return _signed([p.slices for p in plus if p.exists], [m.slices for m in minus if m.exists])


def _signed(plus: list[tuple[Any, ...]], minus: list[tuple[Any, ...]], empty: Any = EMPTY
            ) -> tuple[Any, ...]:
    """The slices of the plus counts' sum less the minus counts' sum (slices of BitMaps,
    or of native_roaring.Natives with `empty` one of them)."""
    total = _summed(plus, empty)
    taken = _summed(minus, empty)
    return _taken(total, taken, empty) if taken else total


def split_signed_slices(plus: list[tuple[tuple[BitMap, ...], tuple[BitMap, ...]]],
                        minus: list[tuple[tuple[BitMap, ...], tuple[BitMap, ...]]]
                        ) -> tuple[BitMap, ...]:
    """signed_slices of counts given as (slices of the ids below a split, slices of those
    above): each range summed on a thread of its own, without the interpreter lock
    (native_roaring), then each slice's two halves joined."""
    empty = native_roaring.borrow(EMPTY)

    def summed(half: int) -> tuple[Any, ...]:
        return _signed([[native_roaring.borrow(b) for b in block[half]] for block in plus],
                       [[native_roaring.borrow(b) for b in block[half]] for block in minus],
                       empty)

    try:
        future = _helper().submit(summed, 1)
    except RuntimeError:  # the interpreter is shutting down: no new thread, sum it here
        future = None
    low = summed(0)
    high = future.result() if future is not None else summed(1)
    out = [native_roaring.joined(low[i] if i < len(low) else empty,
                                 high[i] if i < len(high) else empty)
           for i in range(max(len(low), len(high)))]
    while out and not out[-1]:
        out.pop()
    return tuple(out)


_HELPER: list[ThreadPoolExecutor] = []  # the one thread split_signed_slices hands a half
_HELPER_LOCK = threading.Lock()
# a forked child has the list but not the thread: it makes its own (submit would wait
# forever for a thread that is not there)
os.register_at_fork(after_in_child=_HELPER.clear)


def _helper() -> ThreadPoolExecutor:
    with _HELPER_LOCK:
        if not _HELPER:
            _HELPER.append(ThreadPoolExecutor(1, thread_name_prefix="bitseg-sum"))
        return _HELPER[0]


def moved(slices: tuple[BitMap, ...], gone: list[RangeIndex], new: list[RangeIndex]
          ) -> tuple[BitMap, ...]:
    """The slices of a count less the `gone` counts (each at most the count's own: rows it
    counted) plus the `new` ones: a window's sum from one whose ends were a day off."""
    for counts in gone:
        if counts.exists:
            slices = _taken(slices, counts.slices)
    for counts in new:
        if counts.exists:
            slices = _added(slices, counts.slices)
    return slices


def of_slices(slices: tuple[BitMap, ...]) -> RangeIndex:
    """The count index of these slices (its `exists`: their union)."""
    return RangeIndex(0, 1, slices, BitMap.union(*slices) if slices else BitMap())


def _added(x: tuple[BitMap, ...], y: tuple[BitMap, ...], empty: Any = EMPTY
           ) -> tuple[BitMap, ...]:
    """The slices of the sum of two counts' slices (either may be empty): a ripple-carry
    adder, the carry out of bit i (a & b) | (carry & (a ^ b))."""
    if not x or not y:
        return x or y
    if len(x) < len(y):
        x, y = y, x
    out, carry = _ripple(x, y, lambda a, b, ab, carry: (a & b) | (carry & ab) if carry
                         else a & b, empty)
    if carry:
        out.append(carry)
    return tuple(out)


def _taken(x: tuple[BitMap, ...], y: tuple[BitMap, ...], empty: Any = EMPTY
           ) -> tuple[BitMap, ...]:
    """The slices of x - y, every count of y at most x's, empty top slices dropped: a
    ripple-borrow subtractor, the borrow out of bit i (b - a) | (borrow - (a ^ b))."""
    out, _ = _ripple(x, y, lambda a, b, ab, borrow: (b - a) | (borrow - ab) if borrow
                     else b - a, empty)
    while out and not out[-1]:
        out.pop()
    return tuple(out)


def _ripple(x: tuple[BitMap, ...], y: tuple[BitMap, ...],
            carry_out: Callable[[BitMap, BitMap, BitMap, BitMap], BitMap], empty: Any
            ) -> tuple[list[BitMap], BitMap]:
    """Bit i of x ± y is a ^ b ^ carry (a, b: bit i of x and y); carry_out gives the next
    carry (or borrow) from a, b, a ^ b and the carry in. (The slices, the last carry.)"""
    out, carry = [], empty
    for i in range(max(len(x), len(y))):
        a = x[i] if i < len(x) else empty
        if i >= len(y) and not carry:  # nothing left to add or take: x's slices as they are
            out += x[i:]
            break
        b = y[i] if i < len(y) else empty
        ab = a ^ b
        out.append(ab ^ carry if carry else ab)
        carry = carry_out(a, b, ab, carry)
    return out, carry


def _summed(parts: list[tuple[BitMap, ...]], empty: Any = EMPTY) -> tuple[BitMap, ...]:
    """The slices of many counts' sum, smallest first, each added to the sum of those
    before it: the large ones meet once, at the end. (Pairs, then pairs of pairs, added
    two large blocks early and their sum again later: at 10M, summing a 30-day window's
    six blocks took 5.0 ms in pairs and 4.7 this way, its five signed ones 5.8 and 5.6.)"""
    if not parts:
        return ()
    parts = sorted(parts, key=lambda slices: len(slices[0]))
    total = parts[0]
    for part in parts[1:]:
        total = _added(total, part, empty)
    return total


def at_least(counts: RangeIndex | WindowSum, n: int) -> BitMap:
    """The profiles whose count is n or more (a new bitmap).

    A count index's slices shrink fast (slice i holds counts of 2**i or more), and every
    profile of `exists` counts at least 1. So the slices above n - 1's top bit are
    unioned whole (each of their counts passes), and only the profiles with that top bit
    and none higher are compared bit by bit. RangeIndex.compare walks down from `exists`
    instead, subtracting each high slice from it: a copy of every profile with a count
    per slice (~2 ms of a 10M-profile window's `count >= 3`, against ~0.2 ms here)."""
    if n <= 1:
        return BitMap(counts.exists)
    slices, k = counts.slices, n - 1  # count > k
    top = k.bit_length()  # slices top, top + 1, ... are bits k has not: set, count > k
    if top > len(slices):
        return BitMap()
    gt = BitMap.union(*slices[top:]) if top < len(slices) else BitMap()
    eq = slices[top - 1] - gt  # k's bits from its top one up, no more
    # (not in place: pyroaring's -= took 1.3 ms where - took 0.2, at 10M)
    for i in range(top - 2, -1, -1):
        if not eq:
            break
        if (k >> i) & 1:
            eq = eq & slices[i]
        else:
            gt = gt | (eq & slices[i])
            if i:
                eq = eq - slices[i]
    return gt


def counts_at(counts: RangeIndex | WindowSum, ids: np.ndarray, within: BitMap
              ) -> np.ndarray:
    """The counts of these profiles (sorted distinct ids, `within` their bitmap), 0 where
    none: one intersection a slice, cheap when they are few, as the profiles with rows on
    a window's partial days."""
    out = np.zeros(len(ids), dtype=np.int64)
    table = len(ids) >= max(POSITIONS_FROM, 1)
    with _POSITIONS.lock if table else nullcontext():
        if table:
            positions = _POSITIONS.at_least(int(ids[-1]) + 1)
            positions[ids] = np.arange(len(ids), dtype=np.int32)
        for i, bits in enumerate(counts.slices):
            found = ids_of(bits & within)
            if len(found):
                out[positions[found] if table else np.searchsorted(ids, found)] += 1 << i
    return out


POSITIONS_FROM = 4096  # counts_at of this many ids or more looks positions up in a table


def count_table(slices: tuple[BitMap, ...], limit: int | None = None) -> np.ndarray | None:
    """Every profile's count, indexed by id up to the largest one counted: a byte each
    while the counts fit in 8 bits (slices), 2 or 4 or 8 bytes past that. None, making
    nothing, when that would take more than `limit` bytes."""
    top = max((bits.max() for bits in slices if bits), default=-1)
    kind = next(t for t in (np.uint8, np.uint16, np.uint32, np.uint64)
                if len(slices) <= 8 * np.dtype(t).itemsize)
    if limit is not None and (top + 1) * np.dtype(kind).itemsize > limit:
        return None
    table = np.zeros(top + 1, dtype=kind)
    for i, bits in enumerate(slices):
        table[ids_of(bits)] |= kind(1 << i)  # a slice's ids are distinct: no add.at
    return table


def counts_in(table: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """counts_at, read off a count_table: these profiles' counts (sorted ids; 0 past
    the table's end)."""
    out = np.zeros(len(ids), dtype=np.int64)
    within = int(np.searchsorted(ids, len(table)))
    out[:within] = table[ids[:within]]
    return out


class _Positions:
    """counts_at's table from a profile id to its position among the call's ids: each
    call writes its own ids' positions, then a slice's ids are one gather, where a
    binary search of each was ~3x slower (10M, the 196k profiles of a 7-day window's
    partial days: 3.2 ms against 10.9 for all slices). One table for the process, grown
    to the largest id asked (4 bytes an id: 40 MB at 10M), used under a lock (numpy lets
    go of the interpreter lock while it indexes)."""

    def __init__(self) -> None:
        self.table = np.empty(0, dtype=np.int32)
        self.lock = threading.Lock()

    def at_least(self, size: int) -> np.ndarray:
        if len(self.table) < size:
            self.table = np.empty(max(size, 2 * len(self.table)), dtype=np.int32)
        return self.table


_POSITIONS = _Positions()


def sum_counts(parts: list[RangeIndex]) -> RangeIndex:
    """Sum many count indexes pairwise, so carries stay short."""
    parts = [p for p in parts if p.exists]
    return _pairwise(parts, add_counts) if parts else RangeIndex()


def _pairwise(parts: list[Any], add: Callable[[Any, Any], Any]) -> Any:
    """add over the parts (at least one), in pairs, then pairs of those, and so on."""
    while len(parts) > 1:
        paired = [add(parts[i], parts[i + 1]) for i in range(0, len(parts) - 1, 2)]
        if len(parts) % 2:
            paired.append(parts[-1])
        parts = paired
    return parts[0]


def counts_of(profiles: np.ndarray) -> RangeIndex:
    """How many rows each profile has, as a count index."""
    ids, counts = np.unique(profiles, return_counts=True)
    return count_index(ids, counts.astype(np.int64))


def encode_counts(index: RangeIndex) -> bytes:
    parts = [index.exists.serialize(), *(s.serialize() for s in index.slices)]
    return b"".join(struct.pack(">I", len(p)) + p for p in parts)


def decode_counts(raw: bytes) -> RangeIndex:
    parts, pos = [], 0
    while pos < len(raw):
        (n,) = struct.unpack_from(">I", raw, pos)
        parts.append(BitMap.deserialize(raw[pos + 4:pos + 4 + n]))
        pos += 4 + n
    return RangeIndex(0, 1, tuple(parts[1:]), parts[0])

