"""Per-profile row counts of event count buckets, grouped in numpy over a whole batch.

A count bucket is (kind, stream, bucket): a stream's rows in one day (kind b"d") or one
calendar month (b"m"). A batch names each bucket by one int64, `bucket_code`, and each
flush hands `BucketRuns.add` one (bucket code, profile) pair per row and stream. The
pairs are grouped at once into runs — (bucket, profile, rows) — kept as numpy arrays
until the batch writes its buckets at its end. When the runs outgrow a byte budget they
are merged and moved to a scratch file (a spill), and the end merges the files again a
range of buckets at a time, so each bucket is built and written once whatever the
number of spills. No Python runs per row or per bucket here.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import numpy as np

KIND_BITS = {b"d": 0, b"m": 1}  # b"d" sorts before b"m", as in the count keys
KIND_OF = {0: b"d", 1: b"m"}
BUCKET_OFFSET = 2**31  # days and months offset so they are >= 0, as in the count keys


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
        """Count one row per (gid, profile) pair."""
        if not len(gids):
            return
        runs, rows = np.unique(gids << 32 | profiles.astype(np.int64), return_counts=True)
        self.parts.append((runs, rows.astype(np.int64)))
        self.size += len(runs)

    @property
    def nbytes(self) -> int:
        """Bytes held in runs (16 a run)."""
        return sum(runs.nbytes + rows.nbytes for runs, rows in self.parts)

    def compact(self) -> None:
        """Merge the parts into one: runs of a (bucket, profile) in several flushes add up."""
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
