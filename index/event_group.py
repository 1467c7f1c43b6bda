"""Per-profile row counts of event count buckets, grouped in numpy over a whole batch.

A count bucket is (kind, stream, bucket): a stream's rows in one day (kind b"d") or one
calendar month (b"m"). A batch names each bucket by one int64, `bucket_code`, and each
flush hands `BucketRuns.add` one (bucket code, profile) pair per row and stream. The
pairs are grouped at once into runs — (bucket, profile, rows) — kept as numpy arrays
until the batch writes its buckets at its end. When the runs outgrow a byte budget they
are merged and moved to a scratch file (a spill), and the end merges the files again a
range of buckets at a time, so each bucket is built and written once whatever the
number of spills. No Python runs per row or per bucket here.

A flush's pairs are grouped on a thread of their own (numpy's sort lets go of the
interpreter lock) while the loading thread goes on with the next rows; whatever reads
the runs waits for them first.
"""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import IO

import numpy as np

KIND_BITS = {b"d": 0, b"m": 1}  # b"d" sorts before b"m", as in the count keys
KIND_OF = {0: b"d", 1: b"m"}
BUCKET_OFFSET = 2**31  # days and months offset so they are >= 0, as in the count keys
GROUP_ASIDE = True  # a flush's pairs are grouped on the grouping thread (tests turn it off)
_grouping: ThreadPoolExecutor | None = None  # that thread, started on first use
_grouping_lock = threading.Lock()


def bucket_code(kind: int, streams: np.ndarray, buckets: np.ndarray) -> np.ndarray:
    """One int64 per (kind, stream number, day or month): kind, then stream, then bucket."""
    return (np.int64(kind) << 62) | (streams.astype(np.int64) << 32) | \
        (buckets.astype(np.int64) + BUCKET_OFFSET)


def bucket_parts(code: int) -> tuple[bytes, int, int]:
    """(kind, stream number, day or month) of a bucket code."""
    return KIND_OF[code >> 62], (code >> 32) & ((1 << 30) - 1), \
        (code & 0xFFFFFFFF) - BUCKET_OFFSET


def distinct(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """np.unique(values, return_inverse=True) of int64s, by a table instead of a sort
    when their range is small next to their number."""
    if not len(values):
        return values, values
    low, high = int(values.min()), int(values.max())
    if high - low > 4 * len(values) + 4096:
        return np.unique(values, return_inverse=True)
    shifted = values - low
    present = np.zeros(high - low + 1, dtype=bool)
    present[shifted] = True
    used = np.flatnonzero(present)
    number = np.zeros(len(present), dtype=np.int64)
    number[used] = np.arange(len(used))
    return used + low, number[shifted]


class BucketRuns:
    """Runs of (bucket, profile, rows) accumulated over a batch's flushes.

    Inside a batch every bucket code gets a small number (its gid, in order of first
    appearance), so that a run is one int64, gid << 32 | profile; a flush's runs are
    sorted, and merging the flushes is one stable sort that finds them sorted in parts.
    """

    def __init__(self) -> None:
        self.known = np.empty(0, dtype=np.int64)  # bucket codes seen, sorted
        self.known_gid = np.empty(0, dtype=np.int64)  # the gid of each
        self.code_of = np.empty(0, dtype=np.int64)  # gid -> bucket code
        self.parts: list[tuple[np.ndarray, np.ndarray]] = []  # (runs, rows), each sorted
        self.pending: list[tuple[Future, int]] = []  # parts being grouped, and their pairs
        self.merge: Future | None = None  # the runs held before, being merged (tend)
        self.size = 0  # runs held, over all parts
        self.spills: list[Spill] = []  # runs moved to scratch files, each merged

    def gids(self, codes: np.ndarray) -> np.ndarray:
        """The gid of each of these sorted, distinct bucket codes (new ones numbered)."""
        at = np.searchsorted(self.known, codes)
        hit = at < len(self.known)
        hit[hit] = self.known[at[hit]] == codes[hit]
        out = np.empty(len(codes), dtype=np.int64)
        out[hit] = self.known_gid[at[hit]]
        fresh = codes[~hit]
        if len(fresh):
            numbers = np.arange(len(self.code_of), len(self.code_of) + len(fresh),
                                dtype=np.int64)
            out[~hit] = numbers
            self.code_of = np.concatenate((self.code_of, fresh))
            known = np.concatenate((self.known, fresh))
            order = np.argsort(known, kind="stable")
            self.known = known[order]
            self.known_gid = np.concatenate((self.known_gid, numbers))[order]
        return out

    def add(self, gids: np.ndarray, profiles: np.ndarray) -> None:
        """Count one row per (gid, profile) pair (the arrays are the runs' from now on:
        they may still be read on the grouping thread)."""
        if not len(gids):
            return
        if GROUP_ASIDE:
            self.pending.append((_grouper().submit(_grouped, gids, profiles), len(gids)))
        else:
            self._held(_grouped(gids, profiles))

    def _held(self, part: tuple[np.ndarray, np.ndarray]) -> None:
        self.parts.append(part)
        self.size += len(part[0])

    def _settle(self) -> None:
        """Wait for what the grouping thread is making and hold it."""
        self._settle_merge()
        pending, self.pending = self.pending, []
        for future, _ in pending:
            self._held(future.result())

    def _settle_merge(self) -> None:
        """Wait for the merge under way, if any, and keep what it left."""
        merge, self.merge = self.merge, None
        if merge is not None:
            self._keep(merge.result())

    def _keep(self, made: tuple[np.ndarray, np.ndarray] | Spill) -> None:
        """Hold merged runs, or list their spill."""
        if isinstance(made, Spill):
            self.spills.append(made)
        else:
            self._held(made)

    def tend(self, limit: int, folder: str | Path | None = None) -> None:
        """Keep the runs within about `limit` bytes; called after each flush.

        Runs that may hold more (a run is at most a pair's 16 bytes) are merged — the
        same (bucket, profile) in several flushes becomes one run — and if the merge
        still holds over 3/4 of the limit it is spilled to a scratch file in `folder`.
        Both on the grouping thread, while the loading thread goes on (GROUP_ASIDE off:
        here). Merges and spills only move runs, so when they happen never changes
        what is written."""
        if self._held_bytes() + 16 * sum(pairs for _, pairs in self.pending) <= limit:
            return
        self._settle_merge()
        parts, self.parts = self.parts, []
        pending, self.pending = self.pending, []
        self.size = 0
        grouped = [future for future, _ in pending]
        if GROUP_ASIDE:
            self.merge = _grouper().submit(_merged_or_spilled, parts, grouped,
                                           limit * 3 // 4, folder)
        else:
            self._keep(_merged_or_spilled(parts, grouped, limit * 3 // 4, folder))

    @property
    def nbytes(self) -> int:
        """Bytes held in runs (16 a run), once the grouping thread's are in."""
        self._settle()
        return self._held_bytes()

    def _held_bytes(self) -> int:
        return sum(runs.nbytes + rows.nbytes for runs, rows in self.parts)

    def compact(self) -> None:
        """Merge the parts into one: runs of a (bucket, profile) in several flushes add up."""
        self._settle()
        if len(self.parts) < 2:
            return
        parts, self.parts = self.parts, []
        self.parts = [_merged(parts)]
        self.size = len(self.parts[0][0])

    def spill(self, folder: str | Path | None = None) -> None:
        """Merge the runs held and move them to a scratch file in `folder` (the system's
        temporary folder if None); `chunks` reads them back."""
        self.compact()
        if self.parts:
            runs, rows = self.parts.pop()
            self.spills.append(Spill(runs, rows, folder))
            self.size = 0

    def chunks(self, limit: int, folder: str | Path | None = None
               ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        """Take every run off, as `drain` gives them, in chunks of consecutive gids of
        about `limit` runs (a bucket's runs are never cut); the spills and the runs held
        merged a chunk at a time. Without spills: drain's one chunk."""
        if not self.spills:
            drained = self.drain()
            if drained is not None:
                yield drained
            return
        self.spill(folder)  # the runs held go too: a chunk then needs only its own runs
        spills, self.spills = self.spills, []
        try:
            edges = np.arange(len(self.code_of) + 1, dtype=np.int64) << 32
            at = [spill.positions(edges) for spill in spills]
            total = np.sum(at, axis=0)  # runs of all gids below each edge
            targets = np.arange(limit, int(total[-1]), max(limit, 1), dtype=np.int64)
            cuts = np.unique(np.concatenate(
                ([0, len(edges) - 1], np.searchsorted(total, targets, side="right") - 1)))
            for g0, g1 in zip(cuts[:-1].tolist(), cuts[1:].tolist(), strict=True):
                parts = [spill.take(int(a[g0]), int(a[g1]))
                         for spill, a in zip(spills, at, strict=True) if a[g1] > a[g0]]
                if parts:
                    runs, rows = _merged(parts)
                    yield _drained(runs, rows, self.code_of)
        finally:
            for spill in spills:
                spill.close()

    def drain(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
        """Take every run off: (bucket codes, bounds, profiles, rows) where the runs of
        bucket i are profiles[bounds[i]:bounds[i + 1]] (profiles ascending); None if
        there are none."""
        self.compact()
        if not self.parts:
            return None
        runs, rows = self.parts[0]
        self.parts = []
        self.size = 0
        return _drained(runs, rows, self.code_of)


def _grouped(gids: np.ndarray, profiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(runs, rows): the distinct (gid, profile) pairs as gid << 32 | profile, ascending,
    and how many times each was given."""
    runs, rows = np.unique(gids << 32 | profiles.astype(np.int64), return_counts=True)
    return runs, rows.astype(np.int64)


def _merged_or_spilled(parts: list[tuple[np.ndarray, np.ndarray]], pending: list[Future],
                       most: int, folder: str | Path | None
                       ) -> tuple[np.ndarray, np.ndarray] | Spill:
    """The parts and the pending ones' runs merged; spilled to a scratch file in `folder`
    when they hold over `most` bytes. (On the grouping thread, that thread has made the
    pending runs already: it takes its work in turn.)"""
    runs, rows = _merged([*parts, *(future.result() for future in pending)])
    if runs.nbytes + rows.nbytes > most:
        return Spill(runs, rows, folder)
    return runs, rows


def _grouper() -> ThreadPoolExecutor:
    global _grouping
    with _grouping_lock:
        if _grouping is None:
            _grouping = ThreadPoolExecutor(1, thread_name_prefix="bitseg-group")
        return _grouping


def _drained(runs: np.ndarray, rows: np.ndarray, code_of: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Merged runs as (bucket codes, bounds, profiles, rows); see BucketRuns.drain."""
    gid = runs >> 32
    starts = np.flatnonzero(np.concatenate(([True], gid[1:] != gid[:-1])))
    codes = code_of[gid[starts]]
    del gid
    bounds = np.append(starts, len(runs))
    runs &= 0xFFFFFFFF
    return codes, bounds, runs.astype(np.uint32), rows


def _merged(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Sorted parts of (runs, rows) as one, the rows of equal runs added up; the list is
    emptied as its parts are copied."""
    if len(parts) == 1:
        runs, rows = parts.pop()
    else:
        run_bits = max(int(p[0][-1]).bit_length() for p in parts)  # runs ascend
        row_bits = max(int(p[1].max()).bit_length() for p in parts)
        if run_bits + row_bits <= 63:
            # rows packed below their run into one array, sorted in place (timsort merges
            # the sorted parts): no argsort and no gather of two arrays, one allocation,
            # each part let go once copied (the packed array's pages are only touched as
            # it fills, so this holds about the parts' bytes, not half as much again)
            runs = np.empty(sum(len(p[0]) for p in parts), dtype=np.int64)
            at = 0
            parts.reverse()
            while parts:
                part_runs, part_rows = parts.pop()
                into = runs[at:at + len(part_runs)]
                np.left_shift(part_runs, row_bits, out=into)
                into |= part_rows
                at += len(part_runs)
                del part_runs, part_rows, into
            runs.sort(kind="stable")
            rows = runs & ((1 << row_bits) - 1)
            runs >>= row_bits
        else:
            runs = np.concatenate([p[0] for p in parts])
            rows = np.concatenate([p[1] for p in parts])
            parts.clear()
            order = np.argsort(runs, kind="stable")  # sorted parts: a merge
            runs = runs[order]
            rows = rows[order]
            del order
    starts = np.flatnonzero(np.concatenate(([True], runs[1:] != runs[:-1])))
    if len(starts) == len(runs):
        return runs, rows
    return runs[starts], np.add.reduceat(rows, starts)


class Spill:
    """Merged runs in an unnamed scratch file (gone with the process, even killed):
    each run with its rows packed below it where they fit in an int64, else the runs
    and then the rows. Read back through a memory map, a range at a time."""

    def __init__(self, runs: np.ndarray, rows: np.ndarray, folder: str | Path | None) -> None:
        self.count = len(runs)
        self.last = int(runs[-1])  # the largest run (they ascend)
        row_bits = int(rows.max()).bit_length() if len(rows) else 0
        self.row_bits = row_bits if int(runs[-1]).bit_length() + row_bits <= 63 else None
        self.file: IO[bytes] = tempfile.TemporaryFile(dir=folder, prefix="bitseg-runs-")
        if self.row_bits is not None:
            runs <<= self.row_bits  # in place: the caller lets the arrays go
            runs |= rows
            runs.tofile(self.file)
        else:
            runs.tofile(self.file)
            rows.astype(np.int64, copy=False).tofile(self.file)
        self.file.flush()
        self._map: np.ndarray | None = None

    def _mapped(self) -> np.ndarray:
        if self._map is None:
            size = self.count * (1 if self.row_bits is not None else 2)
            self._map = np.memmap(self.file, dtype=np.int64, mode="r", shape=(size,))
        return self._map

    def positions(self, runs: np.ndarray) -> np.ndarray:
        """Where each of these ascending run values would go among the spilled runs."""
        mapped = self._mapped()[:self.count]
        inside = int(np.searchsorted(runs, self.last, side="right"))  # past it: the end
        out = np.full(len(runs), self.count, dtype=np.int64)
        shift = self.row_bits or 0  # (a value past the last could overflow when shifted)
        out[:inside] = np.searchsorted(mapped, runs[:inside] << shift)
        return out

    def take(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(runs, rows) of the spilled runs a to b (copies)."""
        mapped = self._mapped()
        if self.row_bits is None:
            return np.array(mapped[a:b]), np.array(mapped[self.count + a:self.count + b])
        packed = np.array(mapped[a:b])
        rows = packed & ((1 << self.row_bits) - 1)
        packed >>= self.row_bits
        return packed, rows

    def close(self) -> None:
        self._map = None
        self.file.close()


# ------------------------------------------------------------------ encoded buckets
ARRAY_MAX = 4096  # the most ids a roaring array container holds (more: a bitset)
_NO_RUNS = 12346  # the portable format's cookie of a bitmap without run containers


def encoded_counts(bounds: np.ndarray, ids: np.ndarray, counts: np.ndarray,
                   fallback: Callable[[np.ndarray], bytes]) -> list[bytes]:
    """event_counts.encode_counts(count_index(group ids, counts)) of every group — group
    k is ids[bounds[k]:bounds[k + 1]] (ascending, distinct, counts >= 1) — byte for
    byte, written with numpy for all groups at once.

    Each part is a roaring bitmap in the portable format. A bitmap whose containers are
    all arrays that pyroaring keeps as arrays (≤ ARRAY_MAX ids, and no run container
    smaller: 2 + 4 x runs >= 2 x ids) is the no-run layout: cookie, container count,
    (key, ids - 1) per container, each container's offset, its ids as uint16. Any other
    bitmap (a bitset or a run container) is `fallback(ids)`'s bytes (pyroaring's)."""
    groups = len(bounds) - 1
    if groups <= 0:
        return []
    ids = ids.astype(np.int64)
    counts = counts.astype(np.int64)
    group_of = np.repeat(np.arange(groups, dtype=np.int64), np.diff(bounds))
    depth = np.frexp(np.maximum.reduceat(counts, bounds[:-1]).astype(np.float64))[1]
    base = np.concatenate(([0], np.cumsum(depth + 1)))  # a group's first bitmap: exists
    bitmaps = int(base[-1])
    # every member of every bitmap, bitmap by bitmap, ascending within each: a group's
    # ids (its "exists" bitmap), then those whose count has bit 0 set, bit 1, …
    layers = [(ids, group_of, 0)]  # (members, their groups, bitmap within the group)
    at = np.flatnonzero(counts & 1)
    layers.append((ids[at], group_of[at], 1))
    several = np.flatnonzero(counts > 1)  # only these have a higher bit (most are 1)
    counts, ids, group_of = counts[several], ids[several], group_of[several]
    for bit in range(1, int(depth.max())):
        at = np.flatnonzero((counts >> bit) & 1)
        layers.append((ids[at], group_of[at], 1 + bit))
    del ids, group_of, counts, several, at
    # each layer is in group order, so a member's place is its bitmap's first place
    # plus its rank in the layer past the group's first (no sort)
    member_count = np.zeros(bitmaps, dtype=np.int64)
    in_layer = []
    for _, owners, level in layers:
        sizes = np.bincount(owners, minlength=groups)
        member_count[(base[:-1] + level)[sizes > 0]] = sizes[sizes > 0]
        in_layer.append(np.concatenate(([0], np.cumsum(sizes)[:-1])))
    first_member = np.concatenate(([0], np.cumsum(member_count)))
    value = np.empty(int(first_member[-1]), dtype=np.int64)
    for (members, owners, level), before in zip(layers, in_layer, strict=True):
        first = first_member[np.minimum(base[:-1] + level, bitmaps - 1)] - before
        value[first[owners] + np.arange(len(members), dtype=np.int64)] = members
    del layers, in_layer
    bitmap = np.repeat(np.arange(bitmaps, dtype=np.int64), member_count)
    high = value >> 16
    new = np.ones(len(value), dtype=bool)
    new[1:] = (bitmap[1:] != bitmap[:-1]) | (high[1:] != high[:-1])
    starts = np.flatnonzero(new)  # containers
    cards = np.diff(np.append(starts, len(value)))
    breaks = np.ones(len(value), dtype=bool)
    breaks[1:] = new[1:] | (value[1:] != value[:-1] + 1)
    runs = np.add.reduceat(breaks, starts) if len(starts) else starts
    plain = (cards <= ARRAY_MAX) & (2 + 4 * runs >= 2 * cards)
    container_bitmap = bitmap[starts]
    per_bitmap = np.bincount(container_bitmap, minlength=bitmaps)
    ok = np.bincount(container_bitmap, weights=plain, minlength=bitmaps) == per_bitmap
    size = 8 + 8 * per_bitmap + 2 * member_count  # the no-run layout's bytes
    other: dict[int, bytes] = {}
    for b in np.flatnonzero(~ok).tolist():
        other[b] = fallback(value[first_member[b]:first_member[b + 1]])
        size[b] = len(other[b])
    start = np.concatenate(([0], np.cumsum(size + 4)))  # each bitmap after its length
    out = np.zeros(int(start[-1]), dtype=np.uint8)
    _put(out, start[:-1], size, 4, big=True)
    head = start[:-1] + 4
    fine = np.flatnonzero(ok)
    _put(out, head[fine], np.full(len(fine), _NO_RUNS), 4)
    _put(out, head[fine] + 4, per_bitmap[fine], 4)
    keep = ok[container_bitmap]  # the containers written here, and their place
    c_bitmap, c_start, c_card = container_bitmap[keep], starts[keep], cards[keep]
    c_first = np.concatenate(([0], np.cumsum(per_bitmap)))[c_bitmap]
    c_rank = np.flatnonzero(keep) - c_first  # the container's number in its bitmap
    c_head = head[c_bitmap]
    c_count = per_bitmap[c_bitmap]
    _put(out, c_head + 8 + 4 * c_rank, high[c_start] & 0xFFFF, 2)
    _put(out, c_head + 10 + 4 * c_rank, c_card - 1, 2)
    c_data = 8 + 8 * c_count + 2 * (c_start - first_member[c_bitmap])  # from the bitmap
    _put(out, c_head + 8 + 4 * c_count + 4 * c_rank, c_data, 4)
    # member i of bitmap b at data_at[b] + 2 i (first_member[b] ≤ i): its low 16 bits
    data_at = head + 8 + 8 * per_bitmap - 2 * first_member[:-1]
    if ok.all():
        low = value.astype("<u2")
        m_at = data_at[bitmap] + 2 * np.arange(len(value), dtype=np.int64)
    else:
        place = np.flatnonzero(ok[bitmap])
        low = value[place].astype("<u2")
        m_at = data_at[bitmap[place]] + 2 * place
    pairs = low.view(np.uint8)
    out[m_at] = pairs[0::2]
    out[m_at + 1] = pairs[1::2]
    for b, raw in other.items():
        out[head[b]:head[b] + len(raw)] = np.frombuffer(raw, dtype=np.uint8)
    data = out.tobytes()
    cut = start[base].tolist()
    return [data[cut[k]:cut[k + 1]] for k in range(groups)]


def _put(out: np.ndarray, at: np.ndarray, values: np.ndarray, width: int,
         big: bool = False) -> None:
    """Write each value as `width` bytes (little-endian, or big) at its offset."""
    values = np.asarray(values, dtype=np.int64)
    for byte in range(width):
        shift = 8 * (width - 1 - byte if big else byte)
        out[at + byte] = (values >> shift) & 0xFF
