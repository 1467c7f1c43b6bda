"""The in-memory index of events: the catalog of what is stored, read on demand.

For each stream (an event type, or a type with one keyword/bool property value) and
each UTC day and calendar month that has its events, a count index (event_counts) says
how many events every profile had in it. The raw rows are kept per (type, day) as a
columnar Block (numpy arrays: profile, ts, the version of the batch that wrote the row,
one column per property), in append-only parts; a reader ignores rows newer than its
snapshot, so reads stay consistent.

An EventIndex holds only the catalog; buckets and blocks are read from LMDB through the
snapshot's reader when a rule needs them, and decoded buckets kept in a BucketCache.
"""

from __future__ import annotations

import struct
import threading
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from itertools import chain
from typing import Any

import numpy as np
import orjson

from bitseg.index.errors import StoreError
from bitseg.index.event_counts import decode_counts
from bitseg.index.event_keys import packed, unpacked
from bitseg.index.fields import RangeIndex
from bitseg.index.keys import (
    BLOCKS,
    CATALOG,
    CATALOG_MARK,
    COUNTS,
    block_key,
    block_parts,
    catalog_key,
    catalog_parts,
    count_key,
    count_parts,
)
from bitseg.index.store import Store, Txn


# ------------------------------------------------------------------------ raw blocks
@dataclass(frozen=True)
class Block:
    """The raw rows of one event type on one day, as columns."""

    profile: np.ndarray  # uint32
    ts: np.ndarray  # int64 µs
    version: np.ndarray  # uint32: the batch that wrote the row
    props: Mapping[str, tuple[np.ndarray, np.ndarray]]  # name -> (int64 keys or codes, valid)
    words: Mapping[str, list[str]]  # keyword property -> its code table

    def __len__(self) -> int:
        return len(self.profile)

    def column(self, name: str) -> tuple[np.ndarray, np.ndarray] | None:
        return self.props.get(name)

    def encode(self) -> bytes:
        names = sorted(self.props)
        header = orjson.dumps({"n": len(self), "props": names,
                               "words": {k: self.words[k] for k in names if k in self.words}})
        arrays = [self.profile.astype("<u4"), self.ts.astype("<i8"), self.version.astype("<u4")]
        for name in names:
            values, valid = self.props[name]
            arrays += [values.astype("<i8"), valid.astype(np.uint8)]
        return struct.pack(">I", len(header)) + header + b"".join(a.tobytes() for a in arrays)

    @classmethod
    def decode(cls, raw: bytes) -> Block:
        header, pos = block_header(raw)
        n, buf = header["n"], memoryview(raw)

        def take(dtype: str, width: int) -> np.ndarray:
            nonlocal pos
            arr = np.frombuffer(buf[pos:pos + n * width], dtype=dtype)
            pos += n * width
            return arr

        profile, ts, version = take("<u4", 4), take("<i8", 8), take("<u4", 4)
        props = {}
        for name in header["props"]:
            values = take("<i8", 8)
            props[name] = (values, take("u1", 1).astype(bool))
        return cls(profile, ts, version, props, header["words"])

    @classmethod
    def join(cls, blocks: list[Block]) -> Block:
        """The rows of several blocks as one (each column concatenated once; keyword
        codes renumbered into one table per property)."""
        if len(blocks) == 1:
            return blocks[0]
        names = sorted({name for block in blocks for name in block.props})
        words: dict[str, list[str]] = {}
        props = {}
        for name in names:
            values, valid = [], []
            index: dict[str, int] | None = None
            for block in blocks:
                keys, ok = block._column_or_empty(name)
                if name in block.words:  # re-code this block's keywords into the joint table
                    index = {} if index is None else index
                    remap = np.array([index.setdefault(w, len(index))
                                      for w in block.words[name]] or [0], dtype=np.int64)
                    keys = np.where(ok, remap[np.clip(keys, 0, len(remap) - 1)], 0)
                values.append(keys)
                valid.append(ok)
            if index is not None:
                words[name] = list(index)
            props[name] = (np.concatenate(values), np.concatenate(valid))
        return cls(np.concatenate([b.profile for b in blocks]),
                   np.concatenate([b.ts for b in blocks]),
                   np.concatenate([b.version for b in blocks]), props, words)

    def _column_or_empty(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        col = self.props.get(name)
        if col is not None:
            return col
        return np.zeros(len(self), dtype=np.int64), np.zeros(len(self), dtype=bool)


def block_header(raw: bytes) -> tuple[dict[str, Any], int]:
    """An encoded block's header (its rows, property names and keyword tables) and where
    its columns start."""
    (size,) = struct.unpack_from(">I", raw, 0)
    return orjson.loads(memoryview(raw)[4:4 + size]), 4 + size


def join_encoded(raws: list[bytes]) -> bytes:
    """What Block.join of these encoded blocks encodes to, made from their bytes: each
    column's bytes concatenated as they are stored, and keyword codes renumbered into
    the joint tables in one numpy pass a property, with no Block made of any part. An
    events batch joins up to a part per flush for every day it touched (383,797 parts
    for the 10M events file's 4,017 days), where decoding each part and joining its
    columns one by one cost more than all the rest of writing them."""
    if len(raws) == 1:
        return raws[0]
    heads = [block_header(raw) for raw in raws]
    counts = [header["n"] for header, _ in heads]
    names = sorted({name for header, _ in heads for name in header["props"]})
    fixed: list[list[Any]] = [[], [], []]  # profile (4 bytes a row), ts (8), version (4)
    columns: dict[str, tuple[list[Any], list[Any]]] = {name: ([], []) for name in names}
    for raw, (header, pos), n in zip(raws, heads, counts, strict=True):
        view = memoryview(raw)
        for out, width in zip(fixed, (4, 8, 4), strict=True):
            out.append(view[pos:pos + width * n])
            pos += width * n
        present = set(header["props"])
        for name in names:  # sorted, as stored
            values, valid = columns[name]
            if name in present:
                values.append(view[pos:pos + 8 * n])
                valid.append(view[pos + 8 * n:pos + 9 * n])
                pos += 9 * n
            else:
                values.append(bytes(8 * n))
                valid.append(bytes(n))
    words: dict[str, list[str]] = {}
    parts = [b"".join(out) for out in fixed]
    for name in names:
        values, valid = columns[name]
        worded = [(k, header["words"][name]) for k, (header, _) in enumerate(heads)
                  if name in header["words"]]
        joined = b"".join(values)
        if worded:
            joined, words[name] = _recoded(joined, b"".join(valid), counts, worded)
        parts += [joined, b"".join(valid)]
    header = orjson.dumps({"n": sum(counts), "props": names, "words": words})
    return struct.pack(">I", len(header)) + header + b"".join(parts)


def _recoded(values: bytes, valid: bytes, counts: list[int],
             worded: list[tuple[int, list[str]]]) -> tuple[bytes, list[str]]:
    """A keyword column of joined parts renumbered into one table, as Block.join does:
    the words in the order the parts first give them (looked up in C: a day's parts
    repeat most of their words). `worded`: (part, its table) of the parts that have
    one; the other parts' codes stay as they are."""
    tables = [table for _, table in worded]
    given = list(chain.from_iterable(tables))
    joint = list(dict.fromkeys(given))
    index = {word: code for code, word in enumerate(joint)}
    remaps = np.fromiter(map(index.__getitem__, given), dtype=np.int64, count=len(given))
    lengths = np.array([len(table) for table in tables], dtype=np.int64)
    base = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    if not lengths.all():  # an empty table reads every code as 0, as Block.join's [0]
        remaps = np.insert(remaps, base[lengths == 0], 0)
        lengths = np.maximum(lengths, 1)
        base = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    starts = np.concatenate(([0], np.cumsum(counts)))
    which = np.array([k for k, _ in worded], dtype=np.int64)
    sizes = np.array(counts, dtype=np.int64)[which]
    rows = np.repeat(starts[which] - np.concatenate(([0], np.cumsum(sizes)[:-1])), sizes) + \
        np.arange(int(sizes.sum()), dtype=np.int64)
    keys = np.frombuffer(values, dtype="<i8").copy()
    ok = np.frombuffer(valid, dtype=np.uint8)[rows] != 0
    at = np.clip(keys[rows], 0, np.repeat(lengths - 1, sizes)) + np.repeat(base, sizes)
    keys[rows] = np.where(ok, remaps[at], 0)
    return keys.tobytes(), joint


# ------------------------------------------------------------------------ the index
BucketKey = tuple[bytes, str, int]  # (b"d" or b"m", stream, day or month)
CACHE_BYTES = 1 << 30  # decoded count buckets kept in memory, by their stored size
DERIVED_BYTES = 256 << 20  # blocks made in memory (event_windows), by their bitmaps' bytes


class LruCache:
    """Values (count indexes; a window's judged profiles) under (key, version), least
    recently used first out, bounded by the sizes they are put with."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self._entries: OrderedDict[tuple[Any, int], tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[Any, int]) -> Any:
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                return None
            self._entries.move_to_end(key)
            return found[0]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.size = 0

    def discard(self, test: Callable[[Any], bool]) -> None:
        """Drop the entries whose key (without its version) passes test."""
        with self._lock:
            for key in [k for k in self._entries if test(k[0])]:
                self.size -= self._entries.pop(key)[1]

    def put(self, key: tuple[Any, int], value: Any, size: int) -> None:
        with self._lock:
            if key in self._entries:
                return
            self._entries[key] = (value, size)
            self.size += size
            while self.size > self.limit and len(self._entries) > 1:
                _, (_, dropped) = self._entries.popitem(last=False)
                self.size -= dropped


class BucketCache(LruCache):
    """Decoded count buckets, bounded by their stored bytes, and (`derived`) the dyadic
    blocks summed from them and windows' whole-day sums and tests, bounded apart.

    Shared by every EventIndex of one open engine. An entry is keyed by the bucket and the
    version that wrote it (a derived block: the last write of its days), so an index never
    sees a value its snapshot does not hold; only committed values are put in (a batch
    that aborts may reuse its version number)."""

    def __init__(self, limit: int = CACHE_BYTES, derived: int | None = None) -> None:
        super().__init__(limit)
        self.derived = LruCache(DERIVED_BYTES if derived is None else derived)

    def clear(self) -> None:
        super().clear()
        self.derived.clear()


@dataclass(frozen=True)
class EventIndex:
    """Immutable: every batch makes a new one (sharing what it did not change).

    It holds only the catalog of what exists: which buckets each stream has (and the
    version that last wrote each), which days each type has raw rows on. The buckets and
    blocks themselves are read from LMDB when a rule needs them, through `reader`, which
    is pinned to this index's version, and decoded buckets are kept in `cache`."""

    reader: Any = None  # store.SnapshotReader once committed; a TxnReader inside a batch
    version: int = 0
    written: Mapping[BucketKey, int] = field(default_factory=dict)  # since open; else 0
    stream_days: Mapping[str, list[int]] = field(default_factory=dict)  # sorted
    stream_months: Mapping[str, list[int]] = field(default_factory=dict)
    type_days: Mapping[str, list[int]] = field(default_factory=dict)  # days with raw rows
    parts: Mapping[tuple[str, int], int] = field(default_factory=dict)  # blocks per type, day
    cache: BucketCache = field(default_factory=BucketCache)
    catalogued: bool = True  # the store holds the catalog (stores of older versions: not)

    @property
    def types(self) -> list[str]:
        return sorted(self.type_days)

    def pinned(self, reader: Any) -> EventIndex:
        """This index reading through another reader (the committed snapshot's)."""
        return replace(self, reader=reader)

    def bucket(self, kind: bytes, stream: str, bucket: int) -> RangeIndex:
        """The count index of one stream in one day (kind b"d") or month (b"m"); the
        bucket must be listed in stream_days / stream_months."""
        key = (kind, stream, bucket)
        written = self.written.get(key, 0)
        if self.reader is None:
            return RangeIndex()
        committed = self.reader.committed
        if committed:
            found = self.cache.get((key, written))
            if found is not None:
                return found
        raw = self.reader.get("events", count_key(kind, bucket, stream))
        if raw is None:
            raise StoreError(f"event count bucket {key!r} is missing from the store")
        index = decode_counts(raw)
        if committed:
            self.cache.put((key, written), index, len(raw))
        return index

    def block(self, event: str, day: int) -> Block | None:
        """The raw rows of a type and day as of this index's version.

        A day's rows are append-only parts; this index knows how many it may read, and
        the row versions guard against a part written after it."""
        parts = self.parts.get((event, day), 0)
        if self.reader is None or not parts:
            return None
        raws = [self.reader.get("events", block_key(event, day, seq)) for seq in range(parts)]
        blocks = [Block.decode(raw) for raw in raws if raw is not None]
        if not blocks:
            return None
        block = Block.join(blocks)
        if int(block.version.max(initial=0)) <= self.version:
            return block
        keep = block.version <= self.version
        return Block(block.profile[keep], block.ts[keep], block.version[keep],
                     {k: (v[keep], ok[keep]) for k, (v, ok) in block.props.items()}, block.words)

    def property_names(self, event: str) -> set[str]:
        """The properties some row of this type carries (from the block headers only)."""
        names: set[str] = set()
        if self.reader is None:
            return names
        for day in self.type_days.get(event, []):
            for seq in range(self.parts.get((event, day), 0)):
                raw = self.reader.get("events", block_key(event, day, seq))
                if raw is not None:
                    names.update(block_header(raw)[0]["props"])
        return names


def listed(sorted_buckets: list[int], bucket: int) -> bool:
    """Whether a sorted list of days or months holds this one."""
    i = bisect_left(sorted_buckets, bucket)
    return i < len(sorted_buckets) and sorted_buckets[i] == bucket


# ------------------------------------------------------------------------ the catalog
def write_catalog(store: Store, txn: Txn, index: EventIndex,
                  which: set[tuple[bytes, str]] | None = None) -> None:
    """Write the catalog entries of these (kind, stream or type) pairs, or of all."""
    if which is None:
        which = {(b"d", s) for s in index.stream_days} | \
            {(b"m", s) for s in index.stream_months} | {(b"t", e) for e in index.type_days}
    store.put(txn, "events", CATALOG_MARK, b"1")
    for kind, name in sorted(which):
        if kind == b"t":
            values = [x for day in index.type_days[name] for x in (day, index.parts[(name, day)])]
        else:
            values = (index.stream_days if kind == b"d" else index.stream_months)[name]
        store.put(txn, "events", catalog_key(kind, name), packed(values))


def load_events(store: Store, txn: Txn, version: int) -> EventIndex:
    """The catalog of the stored events (buckets and blocks stay in LMDB, read through
    the reader the index is then pinned to)."""
    stream_days: dict[str, list[int]] = {}
    stream_months: dict[str, list[int]] = {}
    type_days: dict[str, list[int]] = {}
    parts: dict[tuple[str, int], int] = {}
    catalogued = store.get(txn, "events", CATALOG_MARK) is not None
    if catalogued:
        for key, raw in store.items(txn, "events", CATALOG):
            kind, name = catalog_parts(bytes(key))
            values = unpacked(bytes(raw))
            if kind == b"t":
                type_days[name] = values[0::2]
                parts.update(((name, day), n) for day, n in zip(values[0::2], values[1::2],
                                                                 strict=True))
            else:
                (stream_days if kind == b"d" else stream_months)[name] = values
    else:  # a store written before the catalog: list the keys themselves
        for key in store.keys(txn, "events", COUNTS):
            kind, bucket, stream = count_parts(bytes(key))
            listing = stream_days if kind == b"d" else stream_months
            listing.setdefault(stream, []).append(bucket)
        for key in store.keys(txn, "events", BLOCKS):
            event, day, seq = block_parts(bytes(key))
            parts[(event, day)] = max(parts.get((event, day), 0), seq + 1)
        for event, day in parts:
            type_days.setdefault(event, []).append(day)
        for listing in (*stream_days.values(), *stream_months.values(), *type_days.values()):
            listing.sort()
    return EventIndex(None, version, {}, stream_days, stream_months, type_days,
                      parts, catalogued=catalogued)

