"""External ids looked up in memory for batches: a 64-bit hash of every external id of an
IdMap, sorted, beside its dense id.

An LMDB lookup of one id among 10M costs ~4 µs (its B-tree pages are cold to the CPU),
so 10,000 ids a batch cost ~40 ms.  Here the batch's ids are hashed together (numpy, one
pass per byte position), found by one np.searchsorted, and each hit is checked against
the id's own name in the IdMap: a hash shared by two names, or an unknown id whose hash
happens to be some id's, is no hit and is looked up in LMDB instead.  So the answer is
LMDB's, exactly.

The table belongs to one IdMap (which is immutable; a write adding profiles publishes a
new one) and is made in a background thread the first time a batch asks for it, ~2 s
for 10M ids; until it is there, batches use LMDB.  About 30 bytes an id (hash 8, dense
id 4, name offset 8, the name's bytes, buckets): ~300 MB at 10M.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from pyroaring import BitMap

from bitseg.index.blocks import texts_of
from bitseg.index.fields import bitmap_of, ids_of
from bitseg.index.ids import MAX_KEY_BYTES, IdMap

SYNC = False  # make a missing table in the asking thread (tests), not in the background
_OFFSET, _PRIME = np.uint64(0xCBF29CE484222325), np.uint64(0x100000001B3)


def hashes(blob: bytes, offsets: np.ndarray) -> np.ndarray:
    """An FNV-1a style 64-bit hash of each name blob[offsets[i]:offsets[i + 1]], its length
    mixed in last (so no padding is confused with a byte): the names sorted longest first,
    so the names still having a byte at position j are a prefix, hashed in one step."""
    starts = offsets[:-1].astype(np.int64)
    lengths = np.diff(offsets.astype(np.int64))
    out = np.full(len(lengths), _OFFSET, dtype=np.uint64)
    if not len(lengths):
        return out
    order = np.argsort(-lengths, kind="stable")
    starts, lengths = starts[order], lengths[order]
    data = np.frombuffer(blob, dtype=np.uint8)
    h = out.copy()
    longer = -lengths  # ascending: the names longer than j are those with -length < -j
    for j in range(int(lengths[0])):
        k = int(np.searchsorted(longer, -j, side="left"))
        h[:k] = (h[:k] ^ data[starts[:k] + j].astype(np.uint64)) * _PRIME
    out[order] = (h ^ lengths.astype(np.uint64)) * _PRIME
    return out


class Table:
    """Every id of one IdMap: hashes sorted, the dense id of each, the start of each
    bucket of equal top bits (so a search reads one bucket, not the whole array), and
    every name's bytes by dense id (to check a hit exactly, vectorised)."""

    def __init__(self, ids: IdMap) -> None:
        parts = [hashes(chunk.blob, chunk.offsets) for chunk in ids.chunks]
        every = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64)
        order = np.argsort(every)
        self.hashes = every[order]
        self.dense = order.astype(np.uint32)
        n = len(every)
        self.bits = max(1, min(32, n.bit_length() - 3))  # ~8 hashes a bucket
        edges = np.arange(1 << self.bits, dtype=np.uint64) << np.uint64(64 - self.bits)
        self.starts = np.append(np.searchsorted(self.hashes, edges), n)
        self.blob = np.frombuffer(b"".join(chunk.blob for chunk in ids.chunks), np.uint8)
        ends = [chunk.offsets[1:].astype(np.int64) for chunk in ids.chunks]
        base = np.cumsum([0] + [len(chunk.blob) for chunk in ids.chunks])
        self.offsets = np.concatenate([[0]] + [e + b for e, b in zip(ends, base[:-1],
                                                                   strict=True)])

    def find(self, keys: list[bytes]) -> np.ndarray:
        """The dense id of each key (int64), -1 where no name is the key, when its hash
        is where the table has it; a key whose hash some other name shares is -1 too
        (the caller asks LMDB for every -1)."""
        lengths = np.fromiter((len(k) for k in keys), dtype=np.int64, count=len(keys))
        offsets = np.zeros(len(keys) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return self.find_packed(b"".join(keys), offsets)

    def find_packed(self, joined: Any, offsets: np.ndarray) -> np.ndarray:
        """find() of the keys joined[offsets[i]:offsets[i + 1]] (bytes or a uint8 buffer,
        e.g. an Arrow string array's data and offsets), without a Python object per key."""
        offsets = offsets.astype(np.int64, copy=False)
        lengths = np.diff(offsets)
        wanted = hashes(joined, offsets)
        out = np.full(len(lengths), -1, dtype=np.int64)
        n = len(self.hashes)
        if not n:
            return out
        bucket = (wanted >> np.uint64(64 - self.bits)).astype(np.intp)
        lo, hi = self.starts[bucket], self.starts[bucket + 1]
        while True:  # the first position in the bucket whose hash is >= the key's
            open_ = lo < hi
            if not open_.any():
                break
            mid = (lo + hi) // 2
            below = self.hashes[np.minimum(mid, n - 1)] < wanted
            lo = np.where(open_ & below, mid + 1, lo)
            hi = np.where(open_ & ~below, mid, hi)
        at = np.minimum(lo, n - 1)
        hit = np.flatnonzero(self.hashes[at] == wanted)
        dense = self.dense[at[hit]].astype(np.int64)
        same = self._named(dense, np.frombuffer(joined, np.uint8), offsets[hit],
                           lengths[hit])
        out[hit[same]] = dense[same]
        return out

    def _named(self, dense: np.ndarray, data: np.ndarray, starts: np.ndarray,
               lengths: np.ndarray) -> np.ndarray:
        """Whether the name of each dense id is the given bytes, compared vectorised."""
        mine = self.offsets[dense]
        same = self.offsets[dense + 1] - mine == lengths
        for j in range(int(lengths.max(initial=0))):
            longer = same & (lengths > j)
            same[longer] = self.blob[mine[longer] + j] == data[starts[longer] + j]
        return same


_TABLES: weakref.WeakKeyDictionary[IdMap, Table] = weakref.WeakKeyDictionary()
_BUILDING: weakref.WeakSet[IdMap] = weakref.WeakSet()
_LOCK = threading.Lock()


def table(ids: IdMap, wait: bool = False) -> Table | None:
    """The IdMap's table, or None while it is being made (started here if need be);
    `wait`: made here and now if it is not there yet (a caller with many ids to find:
    ~0.3 s for 1M ids)."""
    found = _TABLES.get(ids)
    if found is not None or SYNC or wait:
        if found is None:
            found = _TABLES[ids] = Table(ids)
        return found
    with _LOCK:
        if ids in _BUILDING:
            return None
        _BUILDING.add(ids)
    threading.Thread(target=_build, args=(weakref.ref(ids),), name="bitseg-id-hashes",
                     daemon=True).start()
    return None


def _build(ref: weakref.ref) -> None:
    ids = ref()
    if ids is None:
        return
    try:
        _TABLES[ids] = Table(ids)
    finally:
        with _LOCK:
            _BUILDING.discard(ids)


def found_live(ids: IdMap | None, live: BitMap | None, names: Any) -> np.ndarray:
    """The dense id of each of these distinct names (a string or binary Arrow array)
    found in ids' table and live (int64), -1 for the rest, which the caller looks up in
    LMDB (all of them while there is no table to ask). The table is made here when the
    names are 1/8 of its ids or more (one LMDB lookup costs more than its share of an
    id)."""
    found_table = None
    if ids is not None and live is not None and ids.count:
        found_table = table(ids, wait=len(names) * 8 >= ids.count)
    if found_table is None:
        return np.full(len(names), -1, dtype=np.int64)
    found = found_table.find_packed(*texts_of(names))
    found[~live_mask(live, found)] = -1
    return found


def live_mask(live: BitMap, dense: np.ndarray) -> np.ndarray:
    """Whether each dense id (int64; negative: none) is in `live`: the bitmap cut to the
    ids asked, one sorted search only when some of them are not live."""
    asked = dense >= 0
    wanted = bitmap_of(dense[asked])
    found = ids_of(live & wanted)
    if len(found) == len(wanted):
        return asked
    at = np.minimum(np.searchsorted(found, dense), max(len(found) - 1, 0))
    return asked & (found[at] == dense) if len(found) else np.zeros(len(dense), dtype=bool)


def lookup_many(ids: IdMap, externals: Sequence[str], reader: Any,
                current: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """The dense id of each external id (int64; -1 for an id never seen, empty or too
    long), as IdMap.lookup_many gives it: from the table when it is made, each hit checked
    against the id's name and by `current` (a vectorised test, e.g. live: an IdMap keeps
    the names of deleted profiles, and a name given again has a second dense id); what
    the table cannot settle, from LMDB."""
    found = table(ids)
    if found is None:
        return ids.lookup_many(externals, reader)
    keys = [external.encode() for external in externals]
    dense = found.find(keys)
    dense[~current(dense)] = -1
    misses = [i for i in np.flatnonzero(dense < 0).tolist()
              if 0 < len(keys[i]) <= MAX_KEY_BYTES]
    if misses:  # unknown, or a hash the table could not settle: as LMDB has it
        dense[misses] = ids.lookup_many([externals[i] for i in misses], reader)
    return dense

