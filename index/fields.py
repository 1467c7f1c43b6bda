"""Bitmap indexes of one field: a bitmap per value, or a bit-sliced range index.

Published indexes are never mutated: a writer copies each bitmap before its first
change, so a reader holding the old index keeps a consistent view without locks.
"""

from __future__ import annotations

import copy
import math
import threading
from array import array
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Any, Generic, TypeVar

import numpy as np
from pyroaring import BitMap

from bitseg.index import types as T

EMPTY = BitMap()  # shared; never mutated


def bitmap_of(ids: np.ndarray | array) -> BitMap:
    """A bitmap from an array of ids (any order), without a Python loop."""
    if isinstance(ids, np.ndarray):
        ids = array("I", ids.astype(np.uint32, copy=False).tobytes())
    return BitMap(ids)


def unique(values: np.ndarray) -> np.ndarray:
    """np.unique(values) by a sort.  numpy 2.4's plain np.unique goes through a hash table,
    ~15x slower than sorting at a million distinct values (3.3 s against 0.2 s)."""
    if len(values) < 2:
        return np.array(values, copy=True)
    ordered = np.sort(values)
    keep = np.empty(len(ordered), dtype=bool)
    keep[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=keep[1:])
    return ordered[keep]


def in_place(bitmap: BitMap) -> bool:
    """Whether `bitmap -= other` beats `bitmap - other`: only where most of its 65,536-id
    containers hold 4,096 ids or more (bitsets). pyroaring 1.2's in-place difference on
    array containers took ~10x the new bitmap's time (4.3 ms against 0.42 for 600k ids
    spread over 10M), while on bitsets it saves the copy (0.03 ms against 0.08 for 5M)."""
    if not bitmap:
        return False
    span = (bitmap.max() >> 16) - (bitmap.min() >> 16) + 1
    return len(bitmap) >= 4096 * span


def without(bitmap: BitMap, other: BitMap, owned: bool) -> BitMap:
    """bitmap - other: in place when the caller owns `bitmap` (nothing else holds it) and
    that pays (in_place), else a new bitmap."""
    if owned and in_place(bitmap):
        bitmap -= other
        return bitmap
    return bitmap - other


def ids_of(bitmap: BitMap) -> np.ndarray:
    """The sorted ids of a bitmap as a uint32 array."""
    return np.frombuffer(bitmap.to_array(), dtype=np.uint32)


def group_ids(ids: np.ndarray, codes: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(code, ids having it) for every distinct code, via one stable sort."""
    if len(ids) == 0:
        return
    order = np.argsort(codes, kind="stable")
    sorted_codes = codes[order]
    starts = np.flatnonzero(np.diff(sorted_codes)) + 1
    bounds = np.concatenate(([0], starts, [len(order)]))
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        yield int(sorted_codes[a]), ids[order[a:b]]


def month_days(type_: str, keys: np.ndarray) -> np.ndarray:
    """month * 100 + day (UTC) of each date (days) or timestamp (µs) key."""
    days = keys if type_ == T.DATE else np.floor_divide(keys, T.US_PER_DAY)
    dates = days.astype("datetime64[D]")
    months = dates.astype("datetime64[M]")
    month = months.astype(np.int64) % 12 + 1
    day = (dates - months.astype("datetime64[D]")).astype(np.int64) + 1
    return month * 100 + day


# --------------------------------------------------------------------------- value index


@dataclass(frozen=True, slots=True)
class ValueIndex:
    """keyword, keywords and bool fields: the profiles having each value."""

    values: Mapping[Any, BitMap] = field(default_factory=dict)
    exists: BitMap = EMPTY

    def eq(self, value: Any) -> BitMap:
        return self.values.get(value, EMPTY)

    def any_of(self, values: tuple) -> BitMap:
        found = [self.values[v] for v in values if v in self.values]
        return BitMap.union(*found) if found else EMPTY

    def select(self, op: str, value: Any, universe: BitMap) -> BitMap:
        """The ids a condition holds for (universe: every id, for not_exists)."""
        if op == "exists":
            return self.exists
        if op == "not_exists":
            return universe - self.exists
        if op == "eq":
            return self.eq(value)
        if op == "ne":
            return self.exists - self.eq(value)
        if op == "in":
            return self.any_of(value)
        if op == "not_in":
            return self.exists - self.any_of(value)
        if op == "has_all":
            result = self.eq(value[0])
            for v in value[1:]:
                result = result & self.eq(v)
            return result
        raise ValueError(f"op {op!r} does not apply to a value index")


class ValueWriter:
    """Builds the next ValueIndex from batched removals and additions."""

    def __init__(self, index: ValueIndex) -> None:
        self.values = dict(index.values)
        self.exists = index.exists
        self.owned: set[Any] = set()
        self.dirty: set[Any] = set()  # changed values; "exists" is always dirty

    def _own(self, value: Any) -> BitMap:
        if value not in self.owned:
            self.values[value] = BitMap(self.values[value]) if value in self.values else BitMap()
            self.owned.add(value)
        self.dirty.add(value)
        return self.values[value]

    def _take(self, value: Any, ids: BitMap) -> None:
        """Take ids off a value's bitmap: a new one (no copy first), or in place on this
        writer's own copy where that pays (in_place)."""
        bitmap = self.values.get(value)
        if bitmap is None:
            return
        self.values[value] = without(bitmap, ids, value in self.owned)
        self.owned.add(value)
        self.dirty.add(value)

    def remove(self, ids: np.ndarray, codes: np.ndarray, values: list) -> None:
        """Take each id off the value its code names."""
        for code, members in group_ids(ids, codes):
            self._take(values[code], bitmap_of(members))
        self.exists = self.exists - bitmap_of(ids)

    def add(self, ids: np.ndarray, codes: np.ndarray, values: list) -> None:
        for code, members in group_ids(ids, codes):
            self._own(values[code]).update(bitmap_of(members))
        self.exists = self.exists | bitmap_of(ids)

    def drop(self, ids: BitMap) -> None:
        """Remove these ids from every value (profile deletion)."""
        for value, bitmap in list(self.values.items()):
            if bitmap.intersect(ids):
                self._take(value, ids)
        self.exists = self.exists - ids

    def finish(self) -> ValueIndex:
        values = {v: b for v, b in self.values.items() if b}
        return ValueIndex(values, self.exists)


# --------------------------------------------------------------------------- range index
UNBUILT = None  # a LayoutCell's state before first use


class LayoutCell:
    """What an immutable RangeIndex derives from itself on first use (index/cumulative.py
    keeps its range-encoded layout here); each index object has its own."""

    __slots__ = ("state",)

    def __init__(self) -> None:
        self.state: object = UNBUILT



@dataclass(frozen=True, slots=True)
class RangeIndex:
    """Numbers, dates and timestamps as a bit-sliced index (O'Neil & Quass).

    A key k is kept as stored = (k - base) // unit, bit i of it in slices[i]; every key
    is base + a multiple of unit, so comparisons against any constant are exact.
    monthdays (dates and timestamps only) maps month*100+day to its profiles.

    Float fields keep value * 10**digits as keys, with digits the fewest decimal places
    their values need (so they compare with the precision they were loaded with);
    `rounded` says some value had more digits than 62 bits hold and was rounded, and
    then rule constants are rounded the same way.  Rule constants for floats arrive in
    types.FLOAT_SCALE units; to_key converts them.
    """

    base: int = 0
    unit: int = 1
    slices: tuple[BitMap, ...] = ()
    exists: BitMap = EMPTY
    monthdays: Mapping[int, BitMap] = field(default_factory=dict)
    digits: int | None = None  # floats only
    rounded: bool = False
    cell: LayoutCell = field(default_factory=LayoutCell, init=False, repr=False,
                             compare=False)

    def to_key(self, constant: Fraction | int) -> Fraction | int:
        """A rule constant in this index's key units."""
        if self.digits is None:
            return constant
        key = Fraction(constant) * Fraction(10) ** (self.digits - T.FLOAT_DIGITS)
        return round(key) if self.rounded else key

    # -- comparisons against an exact constant (in rule units, see to_key)
    def compare(self, op: str, constant: Fraction | int, within: BitMap | None = None
                ) -> BitMap:
        """The ids whose value satisfies op constant; only among `within` if given, which
        keeps every slice operation on the smaller bitmap."""
        base = self.exists if within is None else self.exists & within
        t = Fraction(self.to_key(constant) - self.base, self.unit)
        if op == "gt":
            return self._gt(math.floor(t), base)
        if op == "gte":
            return self._gt(math.ceil(t) - 1, base)
        if op == "lt":
            return self._lt(math.ceil(t), base)
        if op == "lte":
            return self._lt(math.floor(t) + 1, base)
        if op == "eq":
            return self._eq(int(t), base) if t.denominator == 1 else EMPTY
        raise ValueError(op)

    def interval(self, a: int | None, b: int | None, within: BitMap) -> BitMap:
        """The ids of `within` whose key k has a <= k <= b (None: unbounded)."""
        base = self.exists & within
        if a is not None:
            base = self._gt(-((self.base - a) // self.unit) - 1, base) if base else base
        if b is not None:
            base = self._lt((b - self.base) // self.unit + 1, base) if base else base
        return base

    def between(self, lo: Fraction | int, hi: Fraction | int,
                within: BitMap | None = None) -> BitMap:
        low = self.compare("gte", lo, within)
        return self.compare("lte", hi, low) if low else EMPTY

    @property
    def top(self) -> int:
        """The largest storable value at the current depth."""
        return (1 << len(self.slices)) - 1

    def _gt(self, k: int, base: BitMap) -> BitMap:
        if k < 0:
            return base
        if k >= self.top:
            return EMPTY
        gt, eq = BitMap(), base
        for i in range(len(self.slices) - 1, -1, -1):
            s = self.slices[i]
            if (k >> i) & 1:
                eq = eq & s
            else:
                gt |= eq & s
                eq = eq - s
            if not eq:
                break
        return gt

    def _lt(self, k: int, base: BitMap) -> BitMap:
        if k <= 0:
            return EMPTY
        if k > self.top:
            return base
        lt, eq = BitMap(), base
        for i in range(len(self.slices) - 1, -1, -1):
            s = self.slices[i]
            if (k >> i) & 1:
                lt |= eq - s
                eq = eq & s
            else:
                eq = eq - s
            if not eq:
                break
        return lt

    def _eq(self, k: int, base: BitMap) -> BitMap:
        if k < 0 or k > self.top:
            return EMPTY
        eq = base
        for i in range(len(self.slices) - 1, -1, -1):
            eq = eq & self.slices[i] if (k >> i) & 1 else eq - self.slices[i]
            if not eq:
                break
        return eq

    def on_month_days(self, mds: set[int]) -> BitMap:
        found = [self.monthdays[md] for md in mds if md in self.monthdays]
        return BitMap.union(*found) if found else EMPTY

    # -- one profile, without building bitmaps
    def key_of(self, pid: int) -> int | None:
        if pid not in self.exists:
            return None
        stored = 0
        for i, s in enumerate(self.slices):
            if pid in s:
                stored |= 1 << i
        return self.base + stored * self.unit

    def decode(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, keys) of every profile that has a value."""
        ids = ids_of(self.exists)
        if len(ids) and int(ids[-1]) < 4 * len(ids):  # dense ids: one slot per id is cheaper
            by_id = np.zeros(int(ids[-1]) + 1, dtype=np.int64)  # than a search per bit
            for i, s in enumerate(self.slices):
                by_id[ids_of(s)] += np.int64(1) << i
            return ids, by_id[ids] * self.unit + self.base
        stored = np.zeros(len(ids), dtype=np.int64)
        for i, s in enumerate(self.slices):
            if s:
                stored[np.searchsorted(ids, ids_of(s))] += np.int64(1) << i
        return ids, stored * self.unit + self.base


def round_half_even(keys: np.ndarray, divisor: int) -> np.ndarray:
    """keys / divisor rounded to the nearest integer, ties to even."""
    q, r = np.divmod(keys, divisor)
    up = (2 * r > divisor) | ((2 * r == divisor) & (q % 2 == 1))
    return q + up


class RangeWriter:
    """Builds the next RangeIndex; rebuilds when a key falls outside base/unit.

    Changes apply in order: a removal first materialises the additions queued before it.
    """

    def __init__(self, index: RangeIndex, type_: str) -> None:
        if type_ == T.FLOAT and index.digits is None:  # keys from types.float_key
            index = replace(index, digits=T.FLOAT_DIGITS, rounded=True)
        self.index = index
        self.type = type_
        self.add_ids: list[np.ndarray] = []
        self.add_keys: list[np.ndarray] = []
        self.rebuilt = False
        self.dirty_monthdays: set[int] = set()
        self.original = index
        self.changed: list[BitMap | np.ndarray] = []  # ids removed or added (for a layout)

    def touched(self) -> BitMap:
        """The ids this batch removed or gave a value."""
        found = [c if isinstance(c, BitMap) else bitmap_of(c) for c in self.changed]
        return BitMap.union(*found) if found else BitMap()

    def remove(self, ids: np.ndarray) -> None:
        self.drop(bitmap_of(ids))

    def drop(self, ids: BitMap) -> None:
        self.changed.append(ids)
        self._materialise()
        if self.index.exists.intersect(ids):
            self.index = self._without(self.index, ids)

    def add(self, ids: np.ndarray, keys: np.ndarray) -> None:
        self.changed.append(ids)
        self.add_ids.append(ids)
        self.add_keys.append(keys)

    def add_floats(self, ids: np.ndarray, values: np.ndarray) -> None:
        """Add float values at the precision they need, refining the scale if it must."""
        self._materialise()
        index = self.index
        known = index.digits if index.exists else None
        digits = T.float_digits(values)
        if known is not None:
            digits = max(digits, known)
        peak = float(np.abs(values).max(initial=0.0))
        if index.exists:
            peak = max(peak, abs(index.base) / 10.0**known,
                       abs(index.base + index.top * index.unit) / 10.0**known)
        # The decimals the largest value leaves room for; 17 (all a float has) when it is
        # that tiny (e.g. 1e-300: the ratio overflows to inf, which floor() refused).
        room = (T.MAX_KEY - 1) / peak if peak else math.inf
        fits = 17 if room >= 1e17 else int(math.floor(math.log10(room)))
        rounded = index.rounded if known is not None else False
        if digits > fits:
            digits, rounded = fits, True
        if known is not None and digits < known:  # a larger value: coarsen what is stored
            self.rebuilt = True
            old_ids, old_keys = index.decode()
            self.index = RangeIndex(digits=digits, rounded=True)
            self.add(old_ids, round_half_even(old_keys, 10 ** (known - digits)))
            self.add(ids, T.float_keys(values, digits))
            return
        if known is None:
            index = replace(index, digits=digits, rounded=rounded)
        elif digits > known:  # finer keys: the stored offsets are unchanged
            self.rebuilt = True  # the range metadata changes; persist it whole
            factor = 10 ** (digits - known)
            index = replace(index, base=index.base * factor, unit=index.unit * factor,
                            digits=digits, rounded=rounded)
        elif rounded != index.rounded:
            index = replace(index, rounded=rounded)
        self.index = index
        self.add(ids, T.float_keys(values, digits))

    def finish(self) -> RangeIndex:
        self._materialise()
        return self.index

    def pending(self) -> int:
        """Values added and not yet built into the index (finish builds them)."""
        return sum(len(ids) for ids in self.add_ids)

    def _materialise(self) -> None:
        if not self.add_ids:
            return
        ids = np.concatenate(self.add_ids)
        keys = np.concatenate(self.add_keys)
        self.add_ids, self.add_keys = [], []
        old = self.index
        if not old.exists:
            self.rebuilt = True
            self.index = self._build(ids, keys)
            return
        low = int(keys.min())
        unit = math.gcd(old.unit, int(np.gcd.reduce(keys - old.base)))
        if low < old.base or unit != old.unit:
            self.rebuilt = True
            old_ids, old_keys = old.decode()
            self.index = self._build(np.concatenate([old_ids, ids]),
                                     np.concatenate([old_keys, keys]))
        else:
            self.index = self._extend(old, ids, keys)

    def _without(self, index: RangeIndex, ids: BitMap) -> RangeIndex:
        monthdays = dict(index.monthdays)
        for md, b in index.monthdays.items():
            if b.intersect(ids):
                monthdays[md] = b - ids
                self.dirty_monthdays.add(md)
        return replace(index, slices=tuple(s - ids for s in index.slices),
                       exists=index.exists - ids, monthdays=monthdays)

    def _build(self, ids: np.ndarray, keys: np.ndarray) -> RangeIndex:
        base = int(keys.min())
        unit = int(np.gcd.reduce(keys - base)) or 1
        stored = (keys - base) // unit
        depth = int(stored.max()).bit_length()
        slices = tuple(bitmap_of(ids[mask]) for mask in _bit_masks(stored, depth))
        return replace(self.index, base=base, unit=unit, slices=slices, exists=bitmap_of(ids),
                       monthdays=self._monthdays({}, ids, keys))

    def _extend(self, old: RangeIndex, ids: np.ndarray, keys: np.ndarray) -> RangeIndex:
        stored = (keys - old.base) // old.unit
        depth = max(len(old.slices), int(stored.max()).bit_length())
        slices = []
        for i, mask in enumerate(_bit_masks(stored, depth)):
            s = old.slices[i] if i < len(old.slices) else EMPTY
            fresh = ids[mask]
            slices.append(s | bitmap_of(fresh) if len(fresh) else s)
        monthdays = self._monthdays(dict(old.monthdays), ids, keys)
        return replace(old, slices=tuple(slices), exists=old.exists | bitmap_of(ids),
                       monthdays=monthdays)

    def _monthdays(self, into: dict[int, BitMap], ids: np.ndarray, keys: np.ndarray) -> dict:
        if self.type not in T.TIME_TYPES:
            return into
        for md, members in group_ids(ids, month_days(self.type, keys)):
            into[md] = into.get(md, EMPTY) | bitmap_of(members)
            self.dirty_monthdays.add(md)
        return into


def _bit_masks(stored: np.ndarray, depth: int) -> Iterator[np.ndarray]:
    """Which keys have bit i set, for i < depth: one mask, reused (read it before the
    next), made in two buffers rather than three new arrays a bit (~2x less zeroing of
    fresh pages, a million keys a slice)."""
    bit = np.empty(len(stored), dtype=stored.dtype)
    mask = np.empty(len(stored), dtype=bool)
    for i in range(depth):
        np.right_shift(stored, i, out=bit)
        np.bitwise_and(bit, 1, out=bit)
        np.not_equal(bit, 0, out=mask)
        yield mask


# --------------------------------------------------------------------------- read on use
V = TypeVar("V")


class ReadOnUse(Mapping[str, V], Generic[V]):
    """Entries read from the store the first time each is asked for (`_read`), through
    `reader`, and then kept: a store opens without reading what no rule asks for.

    `entries` maps every name to its value, or None while unread.  `pinned` shares the
    entries already read and reads the rest through another (a later version's) reader."""

    def __init__(self, reader: Any, entries: dict[str, V | None]) -> None:
        self.reader, self._entries = reader, entries
        self._lock = threading.Lock()

    def _read(self, name: str) -> V:
        raise NotImplementedError

    def __getitem__(self, name: str) -> V:
        value = self._entries[name]
        if value is None:
            with self._lock:
                value = self._entries[name]
                if value is None:
                    value = self._entries[name] = self._read(name)
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def loaded(self, name: str) -> bool:
        return self._entries.get(name) is not None

    def pinned(self, reader: Any) -> ReadOnUse[V]:
        twin = copy.copy(self)
        twin.reader, twin._entries, twin._lock = reader, dict(self._entries), threading.Lock()
        return twin


class StoredFields(ReadOnUse["ValueIndex | RangeIndex"]):
    """The profile field indexes of a snapshot, each read with `read(reader, name)` the
    first time it is used.

    A field's stored bitmaps change only when a batch changes that field, and then the
    batch's index replaces the entry (`changed`), so an unread entry reads the same
    bitmaps through any later version's reader (`pinned`)."""

    def __init__(self, read: Any, reader: Any,
                 entries: dict[str, ValueIndex | RangeIndex | None]) -> None:
        super().__init__(reader, entries)
        self._read_field = read

    def _read(self, name: str) -> ValueIndex | RangeIndex:
        return self._read_field(self.reader, name)

    def changed(self, indexes: Mapping[str, ValueIndex | RangeIndex]) -> StoredFields:
        """These fields with some replaced by a batch's indexes (the rest shared)."""
        return StoredFields(self._read_field, self.reader, {**self._entries, **indexes})


def with_changes(fields: Mapping[str, ValueIndex | RangeIndex],
                 indexes: Mapping[str, ValueIndex | RangeIndex]
                 ) -> Mapping[str, ValueIndex | RangeIndex]:
    """A snapshot's fields with a batch's changed indexes in place of theirs."""
    if isinstance(fields, StoredFields):
        return fields.changed(indexes)
    return {**fields, **indexes}


def fields_pinned(fields: Mapping[str, ValueIndex | RangeIndex], reader: Any
                  ) -> Mapping[str, ValueIndex | RangeIndex]:
    """Fields to publish with a new version: unread ones read through its reader."""
    return fields.pinned(reader) if isinstance(fields, StoredFields) else fields
