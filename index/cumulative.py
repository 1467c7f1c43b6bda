"""Range-encoded bitmaps of a range field, derived in memory from its bit-sliced index.

A layout cuts the field's sorted keys into bins at edges e_0 < … < e_{m-1} (bin j holds
the keys in (e_{j-1}, e_j]) and keeps the cumulative bitmaps C[j] = profiles with key
≤ e_j.  A range of keys is then one difference, C[q] - C[p-1], over the bins it covers
whole, plus at most two edge bins it cuts.  A cut bin is answered from its kept keys,
cut into parts at key (or day) boundaries with a bitmap each, as a union of the parts
inside the range (a day-aligned bound never compares a key); or, a bin too big to keep,
by the bit-sliced index within that bin's profiles (C[j] - C[j-1]).  With one bin per
distinct key (ages, scores, dates) no range cuts a bin; timestamps get a bin per day
while they fit, so only a constant that is not at midnight cuts one; fields with more
distinct keys (or days) than bins get bins of about equal counts.

The RangeIndex stays the stored truth: a layout is built from it on first use (never at
open), cached on that immutable index, and carried to the next index a batch publishes
by updating only the bins the batch touched.  All layouts of the process share one
memory budget; a field whose layout does not fit keeps answering from its slices.
"""

from __future__ import annotations

import threading
import weakref
from bisect import bisect_left, bisect_right
from collections.abc import Callable

import numpy as np
from pyroaring import BitMap

from bitseg.index import types as T
from bitseg.index.fields import EMPTY, UNBUILT, RangeIndex, bitmap_of, ids_of, without
from bitseg.index.fields import unique as distinct

BUDGET_BYTES = 320 << 20  # every layout of the process (10M profiles: ~250 dense bins)
FIELD_BYTES = 64 << 20  # one field's layout (10M profiles: ~50 dense bins)
EDGE_SHARE = 8  # a layout keeps the sorted keys of cut bins up to 1/8 of its profiles
MIN_SHARE = 1 << 16  # (or up to this many ids, on a small field)
FEW_IDS = 4096  # a cut bin within fewer ids than this is answered by the slices
MAX_BINS = 256  # bins per field: a batch updates up to this many bitmaps
MIN_BINS = 8  # fewer would leave most of a range to the edge bins: keep the slices instead
PARTS = 64  # a kept edge bin in parts: its cut is whole parts plus at most two cut ones
HEADS = 8  # ... and as many running unions of its first parts (bitmaps of its ids ~4x)

SLICES = "slices"  # decided: this index answers from its slices (no layout fits)

class _Ledger:
    """The bytes every live layout holds, against BUDGET_BYTES."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.used = 0

    def room(self) -> int:
        with self.lock:
            return BUDGET_BYTES - self.used

    def change(self, delta: int) -> None:
        with self.lock:
            self.used += delta


LEDGER = _Ledger()
_BUILD = threading.Lock()  # one build at a time; readers of built layouts never wait


class _Lineage:
    """The layouts of one field carried batch to batch: charged once, at its newest size,
    and released when the last layout of the line is gone."""

    __slots__ = ("charged", "__weakref__")

    def __init__(self, charged: list[int]) -> None:
        self.charged = charged  # a one-element box the finalizer reads at release


def _release(charged: list[int]) -> None:
    LEDGER.change(-charged[0])


def _new_lineage(nbytes: int) -> _Lineage:
    box = [nbytes]
    LEDGER.change(nbytes)
    line = _Lineage(box)
    weakref.finalize(line, _release, box)
    return line


def bitmap_bytes(bitmap: BitMap) -> int:
    stats = bitmap.get_statistics()
    return 16 * stats["n_containers"] + stats["n_bytes_array_containers"] + \
        stats["n_bytes_run_containers"] + stats["n_bytes_bitset_containers"]


class Layout:
    """Cumulative bitmaps over bins; immutable once published."""

    __slots__ = ("edges", "lows", "cum", "sizes", "grain", "digits", "line", "nbytes",
                 "edge_keys", "checked", "_edges", "_lows")

    def __init__(self, edges: np.ndarray, lows: np.ndarray, cum: list[BitMap], grain: int,
                 digits: int | None) -> None:
        self.edges = edges  # int64, increasing: no key of bin j is above edges[j]
        self.lows = lows  # int64: no key of bin j is below lows[j] (a bound, maybe lower)
        # the same as lists: a bisect of a list costs a tenth of np.searchsorted's call on
        # a few hundred bins, and every range leaf looks its bounds up in both
        self._edges: list[int] = edges.tolist()
        self._lows: list[int] = lows.tolist()
        self.cum = cum
        self.sizes = np.array([len(c) for c in cum], dtype=np.int64)
        self.grain = grain  # 1, or US_PER_DAY for a timestamp's day bins
        self.digits = digits  # the float scale the keys are in
        self.nbytes = sum(bitmap_bytes(c) for c in cum)
        self.line: _Lineage | None = None
        # bin -> its ids and keys in key order and its parts: a cut bin answered by a
        # union of parts (its ids) or two binary searches (its count); filled by readers
        # (one dict assignment each), emptied when full
        self.edge_keys: dict[int, _Kept] = {}
        # (a live population, whether every profile of it has a key): asked once per
        # layout and live bitmap (one pass over both), replaced when another live comes
        self.checked: tuple[BitMap, bool] | None = None

    def __len__(self) -> int:
        return len(self.edges)

    # ------------------------------------------------------------------ queries
    def covers(self, live: BitMap) -> bool:
        """Whether every profile of `live` has a key (live <= C[last]); then `within &
        C[last]` is `within` itself for any within inside live."""
        checked = self.checked
        if checked is not None and checked[0] is live:
            return checked[1]
        last = self.cum[-1]
        found = len(live) <= len(last) and live.intersection_cardinality(last) == len(live)
        self.checked = (live, found)  # one tuple assignment: readers see old or new
        return found

    def _covered(self, q: int, live: BitMap | None) -> bool:
        """Whether C[q] holds every profile of `live` (q is the last bin and each has a
        key): then a bitmap inside live is inside C[q], no `& C[q]` needed."""
        return live is not None and q == len(self.cum) - 1 and self.covers(live)

    def _upto(self, q: int, within: BitMap | None, live: BitMap | None) -> BitMap:
        """C[q] among `within` (inside `live` when live is given)."""
        if within is None:
            return self.cum[q]
        return within if self._covered(q, live) else within & self.cum[q]

    def _cover(self, a: int | None, b: int | None) -> tuple[int, int, list[int]]:
        """(p, q, cut): bins p..q lie inside [a, b] whole; the bins in cut straddle it."""
        edges, lows = self._edges, self._lows
        m = len(edges)
        p = 0 if a is None else bisect_left(lows, a)
        q = m - 1 if b is None else bisect_right(edges, b) - 1
        cut = []
        if p > 0 and (a is None or edges[p - 1] >= a):
            cut.append(p - 1)
        if q + 1 < m and (b is None or lows[q + 1] <= b) and q + 1 != p - 1:
            cut.append(q + 1)
        return p, q, cut

    def whole(self, a: int | None, b: int | None) -> tuple[BitMap, BitMap | None] | None:
        """(C[q], C[p-1] or None when p is the first bin) when the range a <= key <= b is
        bins p..q whole, C[q] less C[p-1]; None when it cuts a bin or covers none."""
        if a is not None and b is not None and a > b:
            return None
        p, q, cut = self._cover(a, b)
        if cut or p > q:
            return None
        return self.cum[q], (self.cum[p - 1] if p else None)

    def _bin(self, j: int, within: BitMap | None) -> BitMap:
        upto = self.cum[j] if within is None else within & self.cum[j]
        return upto - self.cum[j - 1] if j else upto

    def _kept(self, j: int, index: RangeIndex) -> _Kept | None:
        """Bin j's ids and keys in key order, split into parts, kept while the bins kept
        hold at most 1/EDGE_SHARE of the profiles; None for a bin bigger than that."""
        found = self.edge_keys.get(j)
        if found is not None:
            return found
        share = max(int(self.sizes[-1]) // EDGE_SHARE, MIN_SHARE)
        size = int(self.sizes[j] - (self.sizes[j - 1] if j else 0))
        if size > share:
            return None
        if sum(len(kept.keys) for kept in self.edge_keys.values()) + size > share:
            self.edge_keys = {}  # readers holding the old dict keep using it
        members = self._bin(j, None)
        ids = ids_of(members)
        keys = _keys_among(index, ids, members)
        found = self.edge_keys[j] = _Kept(ids, keys, members, self.grain)
        return found

    def _kept_cuts(self, cut: list[int], index: RangeIndex, within: BitMap | None
                   ) -> list[_Kept] | None:
        """The cut bins' kept keys, or None when the slices should answer one of them."""
        if within is not None and len(within) < FEW_IDS and cut:
            return None
        kept = [self._kept(j, index) for j in cut]
        return None if None in kept else kept  # type: ignore[return-value]

    def _cut(self, j: int, a: int | None, b: int | None, index: RangeIndex,
             within: BitMap | None) -> BitMap:
        """The ids of bin j with a <= key <= b, only among `within` if given: a union of
        the bin's kept parts (or the bin less the others), or (a bin too big to keep, or
        few ids within) the bit slices run within the bin."""
        kept = None if within is not None and len(within) < FEW_IDS else self._kept(j, index)
        if kept is None:  # a few slice operations on a handful of ids, or no keys kept
            inside = self._bin(j, within)
            return index.interval(a, b, inside) if inside else EMPTY
        part = kept.select(a, b)
        return part & within if within is not None and part else part

    def _cut_count(self, j: int, a: int | None, b: int | None, index: RangeIndex,
                   within: BitMap | None) -> int:
        if within is not None and len(within) < FEW_IDS:
            inside = self._bin(j, within)
            return len(index.interval(a, b, inside)) if inside else 0
        kept = self._kept(j, index)
        if kept is None:
            inside = self._bin(j, within)
            return len(index.interval(a, b, inside)) if inside else 0
        if within is None:
            lo, hi = kept.span(a, b)
            return hi - lo
        return kept.select(a, b).intersection_cardinality(within)

    def select(self, a: int | None, b: int | None, index: RangeIndex,
               within: BitMap | None = None, live: BitMap | None = None,
               owned: bool = False) -> BitMap:
        """The ids with a <= key <= b (None: unbounded), only among `within` if given.
        live, if given, is a population `within` lies inside: when each of its profiles
        has a key, a range open above is within less what is below, no `& C[last]`.
        owned: `within` is the caller's to change, and may be changed into the result.
        With `within` given the result is `within` itself, EMPTY or a new bitmap."""
        if a is not None and b is not None and a > b:
            return EMPTY
        p, q, cut = self._cover(a, b)
        kept = self._kept_cuts(cut, index, within)
        if kept is not None:  # the bins it touches, less the cut bins' ids outside [a, b]
            top, bottom = max([q, *cut]), min([p, *cut])
            if bottom > top:
                return EMPTY
            found = self.cum[top] if within is None else within
            owned = owned and within is not None  # found is ours: change it in place
            if within is not None and not self._covered(top, live):
                if owned:
                    found &= self.cum[top]
                else:
                    found, owned = found & self.cum[top], True
            for other in ([self.cum[bottom - 1]] if bottom else []) + \
                    [part.outside(a, b) for part in kept]:
                if other and found:
                    found, owned = without(found, other, owned), True
            return found
        parts = []
        if p <= q:
            upto = self._upto(q, within, live)
            parts.append(upto - self.cum[p - 1] if p else upto)
        for j in cut:
            part = self._cut(j, a, b, index, within)
            if part:
                parts.append(part)
        if not parts:
            return EMPTY
        return parts[0] if len(parts) == 1 else BitMap.union(*parts)

    def count(self, a: int | None, b: int | None, index: RangeIndex,
              within: BitMap | None = None, live: BitMap | None = None) -> int:
        """len(select(...)) without building the covered part."""
        if a is not None and b is not None and a > b:
            return 0
        p, q, cut = self._cover(a, b)
        total = 0
        if p <= q:
            if within is None:
                total = int(self.sizes[q] - (self.sizes[p - 1] if p else 0))
            else:  # within & C[q] less within & C[p-1] (within alone: see _upto)
                total = len(within) if self._covered(q, live) else \
                    within.intersection_cardinality(self.cum[q])
                if p:
                    total -= within.intersection_cardinality(self.cum[p - 1])
        for j in cut:
            total += self._cut_count(j, a, b, index, within)
        return total

    def estimate(self, a: int | None, b: int | None) -> int:
        """An upper bound of the count, from the bins' sizes alone (exact with no cut bin)."""
        if a is not None and b is not None and a > b:
            return 0
        p, q, cut = self._cover(a, b)
        total = int(self.sizes[q] - (self.sizes[p - 1] if p else 0)) if p <= q else 0
        for j in cut:
            total += int(self.sizes[j] - (self.sizes[j - 1] if j else 0))
        return total


class _Kept:
    """One bin's ids in key order, cut into at most PARTS parts at unit boundaries (a key,
    or a timestamp's day), each part's ids a bitmap: the ids of the bin within [a, b]
    are the parts inside it whole plus the ids of at most two parts it cuts (or the
    whole bin less the others, when that is fewer ids), never a compare of every key."""

    __slots__ = ("keys", "ids", "bounds", "parts", "whole", "step", "heads")

    def __init__(self, ids: np.ndarray, keys: np.ndarray, whole: BitMap, grain: int) -> None:
        order = np.argsort(keys, kind="stable")
        self.keys = keys[order]  # sorted
        self.ids = ids[order]  # in key order (in id order within a key)
        n = len(order)
        units = self.keys if grain == 1 else np.floor_divide(self.keys, grain)
        starts = np.flatnonzero(np.diff(units)) + 1  # where each unit starts
        if len(starts) >= PARTS:  # about equal parts, each ending at a unit's end
            targets = np.arange(1, PARTS, dtype=np.int64) * n // PARTS
            starts = np.unique(starts[np.minimum(np.searchsorted(starts, targets, "left"),
                                                 len(starts) - 1)])
        self.bounds = np.concatenate(([0], starts, [n])).astype(np.int64)
        self.parts = [bitmap_of(self.ids[s:e]) for s, e in
                      zip(self.bounds[:-1].tolist(), self.bounds[1:].tolist(), strict=True)]
        self.whole = whole  # every id of the bin
        # heads[g]: the parts before (g + 1) * step as one bitmap, so the parts from the
        # bin's start (or, less from the whole, to its end) are one bitmap and < step parts
        k = len(self.parts)
        self.step = step = max(1, -(-k // HEADS))
        self.heads: list[BitMap] = []
        for g in range(0, k - step + 1, step):
            group = _union(self.parts[g:g + step])
            self.heads.append(self.heads[-1] | group if self.heads else group)

    def span(self, a: int | None, b: int | None) -> tuple[int, int]:
        """The positions [lo, hi) in key order of the keys within [a, b]."""
        lo = 0 if a is None else int(np.searchsorted(self.keys, a, "left"))
        hi = len(self.keys) if b is None else int(np.searchsorted(self.keys, b, "right"))
        return lo, max(lo, hi)

    def _pieces(self, lo: int, hi: int) -> list[BitMap]:
        """Bitmaps whose union is the ids at positions [lo, hi): whole parts, and the
        cut parts' ids made into bitmaps."""
        if lo >= hi:
            return []
        bounds = self.bounds
        f = int(np.searchsorted(bounds, lo, "left"))  # the first part starting at >= lo
        last = int(np.searchsorted(bounds, hi, "right")) - 1  # the last ending at <= hi
        if f > last:  # inside one part
            return [bitmap_of(self.ids[lo:hi])]
        step, heads = self.step, self.heads
        if f == 0 and last >= step:  # from the start: a head and fewer than step parts
            g = last // step
            out = [heads[g - 1], *self.parts[g * step:last]]
        elif last == len(self.parts) and f > 0 and f + step <= last:  # to the end
            g = -(-f // step)  # the whole less the head before it, then parts f.. g*step
            out = [*self.parts[f:g * step], self.whole - heads[g - 1]]
        else:
            out = self.parts[f:last]
        if lo < bounds[f]:
            out.append(bitmap_of(self.ids[lo:bounds[f]]))
        if bounds[last] < hi:
            out.append(bitmap_of(self.ids[bounds[last]:hi]))
        return out

    def outside(self, a: int | None, b: int | None) -> BitMap:
        """The bin's ids with a key below a or above b."""
        lo, hi = self.span(a, b)
        return self._select(lo, hi, inside=False)

    def select(self, a: int | None, b: int | None) -> BitMap:
        """The bin's ids with a <= key <= b."""
        lo, hi = self.span(a, b)
        return self._select(lo, hi, inside=True)

    def _select(self, lo: int, hi: int, inside: bool) -> BitMap:
        """The ids at positions [lo, hi) (inside), or at the others: a union of the pieces
        of the wanted positions, or the whole bin less the others' when they are fewer."""
        n = len(self.keys)
        spans = {True: [(lo, hi)], False: [(0, lo), (hi, n)]}
        size = hi - lo if inside else n - (hi - lo)
        if 2 * size <= n:
            return _union([p for s, e in spans[inside] for p in self._pieces(s, e)])
        rest = [p for s, e in spans[not inside] for p in self._pieces(s, e)]
        return self.whole - _union(rest) if rest else self.whole


def _union(bitmaps: list[BitMap]) -> BitMap:
    return EMPTY if not bitmaps else bitmaps[0] if len(bitmaps) == 1 else \
        BitMap.union(*bitmaps)


# ---------------------------------------------------------------------- choosing bins
def _grain_end(keys: np.ndarray, grain: int) -> np.ndarray:
    return keys if grain == 1 else (np.floor_divide(keys, grain) + 1) * grain - 1


def _first_of_containers(ids: np.ndarray) -> np.ndarray:
    """The sorted positions (ids in key order) where each 2**16-id container first shows."""
    seen = np.full((int(ids.max()) >> 16) + 1, len(ids), dtype=np.int64)
    np.minimum.at(seen, ids >> 16, np.arange(len(ids)))
    return np.sort(seen[seen < len(ids)])


def _estimate_bytes(first: np.ndarray, ends: np.ndarray) -> int:
    """About what cumulative bitmaps of ids[:end] take (ids in key order), as roaring keeps
    them: per 2**16-id container 2 bytes an id up to 8 KiB, plus its header."""
    containers = np.maximum(np.searchsorted(first, ends, "left"), 1)
    per = np.minimum(2 * ends / containers, 8192) + 16
    return int((containers * per).sum())


def _plan(ids: np.ndarray, keys: np.ndarray, type_: str) -> tuple[np.ndarray, int] | None:
    """(the end position in key order of each bin, grain), or None when no layout fits."""
    n = len(keys)
    room = min(FIELD_BYTES, LEDGER.room())
    grain = 1
    units = np.flatnonzero(np.diff(keys)) + 1  # where each distinct key starts
    if type_ == T.TIMESTAMP and len(units) + 1 > MAX_BINS:
        grain = T.US_PER_DAY
        days = np.floor_divide(keys, grain)
        units = np.flatnonzero(np.diff(days)) + 1
    unit_ends = np.append(units, n)  # the end position of every distinct key (or day)
    bins = min(MAX_BINS, len(unit_ends))
    first = _first_of_containers(ids)
    while bins >= min(MIN_BINS, len(unit_ends)) and bins > 0:
        if bins == len(unit_ends):
            ends = unit_ends
        else:  # about equal counts, each ending at a unit's end
            targets = (np.arange(1, bins + 1, dtype=np.int64) * n + bins - 1) // bins
            ends = np.unique(unit_ends[np.searchsorted(unit_ends, targets, "left")])
        if _estimate_bytes(first, ends) <= room:
            return ends, grain
        bins //= 2
    return None


def build(index: RangeIndex, type_: str) -> Layout | None:
    """The layout of an index, or None when none fits the budget."""
    ids, keys = index.decode()
    if not len(ids) or MAX_BINS < 1:
        return None
    stored = (keys - index.base) // index.unit
    if int(stored.max()) < 1 << 16:  # ages, scores: numpy sorts 16-bit ints by radix
        stored = stored.astype(np.uint16)
    order = np.argsort(stored, kind="stable")
    ids, keys = ids[order], keys[order]
    planned = _plan(ids, keys, type_)
    if planned is None:
        return None
    ends, grain = planned
    starts = np.concatenate(([0], ends[:-1]))
    cum, upto = [], EMPTY
    for a, b in zip(starts, ends, strict=True):
        upto = upto | bitmap_of(ids[a:b])
        upto.run_optimize()
        upto.shrink_to_fit()
        cum.append(upto)
    edges = _grain_end(keys[ends - 1], grain).astype(np.int64)
    layout = Layout(edges, keys[starts].astype(np.int64), cum, grain, index.digits)
    if layout.nbytes > min(FIELD_BYTES, LEDGER.room()):  # the estimate was short
        return None
    layout.line = _new_lineage(layout.nbytes)
    return layout


BACKGROUND_IDS = 1 << 21  # a field of this many profiles builds its layout on a thread
BUILDING = "building"  # a thread is building this index's layout: the slices answer


def layout_of(index: RangeIndex, type_: str) -> Layout | None:
    """The index's layout, built on first use; None when it answers from its slices.
    A field of BACKGROUND_IDS profiles or more is built on a thread (seconds at 10M), its
    slices answering until it is there, so a first Count never waits for it."""
    cell = index.cell
    state = cell.state
    if state is UNBUILT:
        if len(index.exists) >= BACKGROUND_IDS:
            with _STARTING:
                if cell.state is UNBUILT:
                    cell.state = BUILDING
                    threading.Thread(target=_build_into, args=(index, type_),
                                     name="range-layout", daemon=True).start()
            return None
        if not _BUILD.acquire(blocking=False):
            return None  # another field's build runs (seconds at 10M): the slices answer
        try:
            state = cell.state
            if state is UNBUILT:
                built = build(index, type_)
                state = cell.state = SLICES if built is None else built
        finally:
            _BUILD.release()
    return state if isinstance(state, Layout) else None


_STARTING = threading.Lock()


def _build_into(index: RangeIndex, type_: str) -> None:
    with _BUILD:
        try:
            built = build(index, type_)
        except BaseException:
            index.cell.state = SLICES  # answer from the slices; a reopen tries again
            raise
        index.cell.state = SLICES if built is None else built


# ---------------------------------------------------------------------- carrying over
def carry(old: RangeIndex, new: RangeIndex, touched: Callable[[], BitMap]) -> None:
    """Give the next index its layout: the old one's, updated for the ids the batch
    touched (their keys read from the new index), when the old index had one."""
    if new is old:
        return
    state = old.cell.state
    if state is SLICES:
        new.cell.state = SLICES  # still does not fit; a reopen decides again
    if not isinstance(state, Layout) or new.digits != state.digits:
        return  # built on first use (a float whose scale changed re-keys every value)
    new.cell.state = _update(state, new, touched())


def _keys_among(index: RangeIndex, ids: np.ndarray, among: BitMap) -> np.ndarray:
    """The keys of these ids (sorted, all in the index), reading only their bits."""
    stored = np.zeros(len(ids), dtype=np.int64)
    for i, s in enumerate(index.slices):
        hits = ids_of(s & among)
        if len(hits):
            stored[np.searchsorted(ids, hits)] += np.int64(1) << i
    return stored * index.unit + index.base


def _update(old: Layout, index: RangeIndex, touched: BitMap) -> Layout:
    """old with every touched id taken out, then put back in its new key's bins."""
    present = touched & index.exists
    ids = ids_of(present)
    keys = _keys_among(index, ids, present)
    edges, lows, bases = _with_new_bins(old, keys)
    order = np.argsort(keys, kind="stable")
    ids, keys = ids[order], keys[order]
    ends = np.searchsorted(keys, edges, "right")
    cum, upto, start = [], EMPTY, 0
    for base, end in zip(bases, ends, strict=True):
        if end > start:
            upto = upto | bitmap_of(ids[start:end])
            start = end
        if upto and base.intersection_cardinality(touched) == len(upto) and upto <= base:
            kept = base  # the touched ids it holds are those it held: shared, unchanged
        elif base.intersect(touched):
            kept = base - touched  # a new bitmap: add to it in place
            if upto:
                kept |= upto
        else:
            kept = base | upto if upto else base  # untouched bins stay shared
        cum.append(kept)
    layout = Layout(edges, lows, cum, old.grain, old.digits)
    line = layout.line = old.line
    if line is not None:
        LEDGER.change(layout.nbytes - line.charged[0])
        line.charged[0] = layout.nbytes
    return layout


def _with_new_bins(old: Layout, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, list]:
    """(edges, lows, the bitmap each bin starts from) once every key lies in a bin.  A key
    outside every bin gets a new bin (its own key, or its day) while MAX_BINS and the
    budget allow; otherwise, or when its day is already a bin, the nearest bin widens."""
    edges, lows = old.edges.copy(), old.lows.copy()
    bases = list(old.cum)
    unique = distinct(keys)
    last = len(edges) - 1
    j = np.searchsorted(edges, unique, "left")
    fresh = unique[(j > last) | (unique < lows[np.minimum(j, last)])]
    if not len(fresh):
        return edges, lows, bases
    ends = _grain_end(fresh, old.grain)
    at = np.searchsorted(edges, ends, "left")
    own = (at > last) | (ends < lows[np.minimum(at, last)])  # its bin ends before the next
    new_edges = distinct(ends[own])
    if len(new_edges) > _spare_bins(old):
        own[:] = False
        new_edges = new_edges[:0]
    widen = fresh[~own]  # into the bin whose edge is at or above it, or the last one
    w = np.searchsorted(edges, widen, "left")
    if (w > last).any():
        edges[last] = widen[w > last].max()
    np.minimum.at(lows, w[w <= last], widen[w <= last])
    if not len(new_edges):
        return edges, lows, bases
    at = np.searchsorted(edges, new_edges, "left")
    new_lows = np.array([fresh[own][ends[own] == e].min() for e in new_edges], dtype=np.int64)
    # no old key lies between the bin before and a new edge: start from that bin's C
    bases += [old.cum[a - 1] if a else EMPTY for a in at]
    order = np.argsort(np.concatenate((edges, new_edges)), kind="stable")
    return (np.concatenate((edges, new_edges))[order],
            np.concatenate((lows, new_lows))[order], [bases[i] for i in order])


def _spare_bins(old: Layout) -> int:
    """How many bins a layout may still add: MAX_BINS, and its share of the budget at the
    size of an average bin."""
    allowed = min(FIELD_BYTES, LEDGER.room() + (old.line.charged[0] if old.line else 0))
    per_bin = max(old.nbytes // max(len(old.edges), 1), 1)
    return max(0, min(MAX_BINS - len(old.edges), (allowed - old.nbytes) // per_bin))
