"""Stored count buckets read back as runs, so a batch adds its own runs to them in numpy.

A batch that writes to buckets already in the store (every transaction of a stream of
events after the first touches most of the days and months it touched before) used to
decode each one into bitmaps, add its counts with the ripple-carry adder and encode the
sum, a few dozen microseconds of Python per bucket. Here the stored bytes of many
buckets are read at once into (profile, count) runs, merged with the batch's runs by one
sort, and encoded again by event_group.encoded_counts: the bytes one batch holding all
of those rows would have written.

The bytes are event_counts.encode_counts': parts of a 4-byte big-endian length and a
roaring bitmap in the portable format, `exists` first, then slice 0, 1, … of the counts.
A bitmap of the no-run layout whose containers are all arrays (what encoded_counts
writes for small buckets) is read with numpy; any other (bitset or run containers) is
read by pyroaring.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pyroaring import BitMap

from bitseg.index.errors import StoreError

NO_RUNS = 12346  # the portable format's cookie of a bitmap without run containers
ARRAY_MAX = 4096  # the most ids an array container holds


def stored_runs(raws: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(bounds, ids, counts) of encoded count indexes: bucket k's profiles are
    ids[bounds[k]:bounds[k + 1]] (ascending, uint32 values in int64) with their counts."""
    count = len(raws)
    lengths = np.fromiter(map(len, raws), dtype=np.int64, count=count)
    data = b"".join(raws)
    buf = np.frombuffer(data, dtype=np.uint8)
    ends = np.cumsum(lengths)
    pos = ends - lengths
    bucket_of, rank_of, start_of, size_of = [], [], [], []
    live = np.flatnonzero(pos < ends)
    rank = 0
    while len(live):  # part `rank` of every bucket that has one: a few rounds
        at = pos[live]
        size = _uint(buf, at, 4, big=True)
        bucket_of.append(live)
        rank_of.append(np.full(len(live), rank, dtype=np.int64))
        start_of.append(at + 4)
        size_of.append(size)
        pos[live] = at + 4 + size
        live = live[pos[live] < ends[live]]
        rank += 1
    if not bucket_of:
        return np.zeros(count + 1, dtype=np.int64), np.empty(0, np.int64), \
            np.empty(0, np.int64)
    part_bucket, part_rank = np.concatenate(bucket_of), np.concatenate(rank_of)
    part_start, part_size = np.concatenate(start_of), np.concatenate(size_of)
    if int(part_start[-1] + part_size[-1]) > len(buf) or (pos != ends).any():
        raise StoreError("a stored event count bucket's parts overrun its bytes")
    member_part, ids = _members(data, buf, part_start, part_size)
    keys = (part_bucket[member_part] << 32) | ids
    rank = part_rank[member_part]
    exists = np.sort(keys[rank == 0], kind="stable")  # bucket by bucket, ids ascending
    counts = np.zeros(len(exists), dtype=np.int64)
    for bit in range(1, int(part_rank.max(initial=0)) + 1):
        where = np.searchsorted(exists, keys[rank == bit])  # a slice is within exists
        counts[where] += 1 << (bit - 1)
    bounds = np.searchsorted(exists >> 32, np.arange(count + 1, dtype=np.int64))
    return bounds, exists & 0xFFFFFFFF, counts


def merged(bounds_a: np.ndarray, ids_a: np.ndarray, counts_a: np.ndarray,
           bounds_b: np.ndarray, ids_b: np.ndarray, counts_b: np.ndarray
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two sets of runs over the same groups (group k: ids[bounds[k]:bounds[k + 1]],
    ascending and distinct) as one, the counts of a profile in both added."""
    groups = len(bounds_a) - 1
    keys = np.concatenate((_keyed(bounds_a, ids_a), _keyed(bounds_b, ids_b)))
    values = np.concatenate((counts_a.astype(np.int64), counts_b.astype(np.int64)))
    order = np.argsort(keys, kind="stable")  # two sorted runs: timsort merges them
    keys = keys[order]
    starts = np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1]))) \
        if len(keys) else np.empty(0, np.int64)
    counts = np.add.reduceat(values[order], starts) if len(starts) else values
    keys = keys[starts]
    bounds = np.searchsorted(keys >> 32, np.arange(groups + 1, dtype=np.int64))
    return bounds, keys & 0xFFFFFFFF, counts


def _keyed(bounds: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """group << 32 | id of every run."""
    group = np.repeat(np.arange(len(bounds) - 1, dtype=np.int64), np.diff(bounds))
    return (group << 32) | ids.astype(np.int64)


def _members(data: bytes, buf: np.ndarray, start: np.ndarray, size: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray]:
    """(part, id) of every member of the roaring bitmaps at buf[start:start + size],
    each bitmap's ids ascending (int64s)."""
    parts = len(start)
    plain = size >= 8
    cookie = np.zeros(parts, dtype=np.int64)
    containers = np.zeros(parts, dtype=np.int64)
    cookie[plain] = _uint(buf, start[plain], 4)
    plain &= cookie == NO_RUNS
    containers[plain] = _uint(buf, start[plain] + 4, 4)
    plain &= size >= 8 + 8 * containers
    c_part = np.repeat(np.flatnonzero(plain), containers[plain])
    c_rank = np.arange(len(c_part), dtype=np.int64) - \
        np.repeat(np.cumsum(containers[plain]) - containers[plain], containers[plain])
    head = start[c_part] + 8 + 4 * c_rank
    high = _uint(buf, head, 2)
    card = _uint(buf, head + 2, 2) + 1
    offset = _uint(buf, start[c_part] + 8 + 4 * containers[c_part] + 4 * c_rank, 4)
    other = np.zeros(parts, dtype=bool)  # a bitset container, or one past the bitmap
    other[c_part[(card > ARRAY_MAX) | (offset + 2 * card > size[c_part])]] = True
    other |= ~plain
    keep = ~other[c_part]
    c_part, high, card, offset = c_part[keep], high[keep], card[keep], offset[keep]
    first = np.cumsum(card) - card  # each container's first member, over them all
    at = np.repeat(start[c_part] + offset - 2 * first, card) + \
        2 * np.arange(int(card.sum()), dtype=np.int64)  # each member's two bytes
    owner = [np.repeat(c_part, card)]
    values = [np.repeat(high << 16, card) | buf[at] | (buf[at + 1].astype(np.int64) << 8)]
    for k in np.flatnonzero(other).tolist():  # not read here: pyroaring reads it
        a, b = int(start[k]), int(start[k] + size[k])
        found = BitMap.deserialize(data[a:b]).to_array()
        values.append(np.frombuffer(found, dtype=np.uint32).astype(np.int64))
        owner.append(np.full(len(values[-1]), k, dtype=np.int64))
    return np.concatenate(owner), np.concatenate(values)


def _uint(buf: np.ndarray, at: np.ndarray, width: int, big: bool = False) -> np.ndarray:
    """The unsigned integers of `width` bytes at each offset (little-endian, or big)."""
    value = np.zeros(len(at), dtype=np.int64)
    for byte in range(width):
        shift = 8 * (width - 1 - byte if big else byte)
        value |= buf[at + byte].astype(np.int64) << shift
    return value
