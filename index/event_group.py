"""Per-profile row counts of event count buckets, grouped in numpy over a whole batch.

A count bucket is (kind, stream, bucket): a stream's rows in one day (kind b"d") or one
calendar month (b"m"). A batch names each bucket by one int64, `bucket_code`, and each
flush hands `BucketRuns.add` one (bucket code, profile) pair per row and stream. The
pairs are grouped at once into runs — (bucket, profile, rows) — kept as numpy arrays
until the batch writes its buckets: at the end of the batch, or earlier when the runs
outgrow a byte budget (a spill). No Python runs per row or per bucket here.
"""

from __future__ import annotations

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
        run_bits = max(int(p[0][-1]).bit_length() for p in self.parts)  # runs ascend
        row_bits = max(int(p[1].max()).bit_length() for p in self.parts)
        if run_bits + row_bits <= 63:
            # rows packed below their run into one array, sorted in place (timsort merges
            # the sorted parts): no argsort and no gather of two arrays, one allocation,
            # each part let go once copied (the packed array's pages are only touched as
            # it fills, so this holds about the parts' bytes, not half as much again)
            runs = np.empty(self.size, dtype=np.int64)
            at = 0
            parts, self.parts = self.parts[::-1], []
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
            runs = np.concatenate([p[0] for p in self.parts])
            rows = np.concatenate([p[1] for p in self.parts])
            self.parts = []
            order = np.argsort(runs, kind="stable")  # sorted parts: a merge
            runs = runs[order]
            rows = rows[order]
            del order
        starts = np.flatnonzero(np.concatenate(([True], runs[1:] != runs[:-1])))
        self.parts = [(runs[starts], np.add.reduceat(rows, starts))]
        self.size = len(starts)

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
        gid = runs >> 32
        starts = np.flatnonzero(np.concatenate(([True], gid[1:] != gid[:-1])))
        codes = self.code_of[gid[starts]]
        del gid
        bounds = np.append(starts, len(runs))
        runs &= 0xFFFFFFFF
        return codes, bounds, runs.astype(np.uint32), rows
