"""Events: time-bucketed count bitmaps, and the raw rows behind them.

A *stream* is what a count is kept for: an event type ("popup_opened"), or an event type
with one keyword/bool property value ("popup_opened\\x1fpopup\\x1f\\"spring\\""). For each
stream and each UTC day and calendar month that has events, a bit-sliced count index
(RangeIndex with base 0, unit 1) holds how many events every profile had in it.

`count >= n` over a window is answered in the bitmap domain: the window is split into
whole months, whole days and at most two partial days (timeline.plan); the bucket
indexes are summed with a bitmap ripple-carry adder, the partial days are counted from
their raw rows, and the total is compared like any range index.

Raw rows are kept per (type, day) as a columnar block (numpy arrays: profile, ts, the
version of the batch that wrote the row, one column per property). They answer the
window edges, `where` clauses that no stream covers, and sum/avg/min/max. Blocks are
append-only; a reader ignores rows newer than its snapshot, so reads stay consistent.
"""

from __future__ import annotations

import hashlib
import math
import struct
import threading
import warnings
from bisect import bisect_left, bisect_right, insort
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Any, NoReturn

import numpy as np
import orjson
from pyroaring import BitMap

from bitseg.index import types as T
from bitseg.index.blocks import RowBlock
from bitseg.index.errors import DataError, StoreError
from bitseg.index.event_blocks import EventColumns, columns_of, first_seen
from bitseg.index.fields import EMPTY, RangeIndex, bitmap_of
from bitseg.index.recency import RECENCY_AGGS, recency_by_presence, recency_profiles
from bitseg.index.rules import All, And, Cond, DaysAgo, EventCond, Having, Not, Or, Rule
from bitseg.index.schema import Schema
from bitseg.index.store import Store, Txn, TxnReader, from_u32, u32
from bitseg.index.timeline import day_of, first_day, month_of, plan

SEP = "\x1f"
ANY = "*"
PROP_TYPES = {T.KEYWORD, T.INT, T.FLOAT, T.BOOL}
STREAM_TYPES = {T.KEYWORD, T.BOOL}  # properties whose values get their own streams
DENSE_CACHE = 1 << 21
EVENT_KEYS = ("profile", "event", "ts")
MAX_STREAM_BYTES = 500  # a longer stream name has its value replaced by a digest (LMDB
# keys are at most 511 bytes: the count and catalog keys add 6 and 2 to the name)
TS = "\x00ts"  # _rows's `of` for the rows' timestamps (no property has this name)
FLUSH_ROWS = 1 << 20  # rows held in Python objects before they are written as a block part


def stream_key(event: str, prop: str | None = None, value: Any = None) -> str:
    """The stream's name (part of LMDB keys: in a name too long for them, the value is
    replaced by its digest; names that fit are what they always were)."""
    if prop is None:
        return event
    text = orjson.dumps(value).decode()
    name = f"{event}{SEP}{prop}{SEP}{text}"
    if len(name.encode()) <= MAX_STREAM_BYTES:
        return name
    return f"{event}{SEP}{prop}{SEP}#{hashlib.blake2b(text.encode(), digest_size=20).hexdigest()}"


# ------------------------------------------------------------------------ count indexes
def count_index(ids: np.ndarray, counts: np.ndarray) -> RangeIndex:
    """A bit-sliced index of per-profile counts (ids distinct, counts >= 1)."""
    if len(ids) == 0:
        return RangeIndex()
    depth = int(counts.max()).bit_length()
    slices = tuple(bitmap_of(ids[(counts >> i) & 1 == 1]) for i in range(depth))
    return RangeIndex(0, 1, slices, bitmap_of(ids))


def add_counts(a: RangeIndex, b: RangeIndex) -> RangeIndex:
    """The per-profile sum of two count indexes: a ripple-carry adder over bitmaps."""
    if not a.exists:
        return b
    if not b.exists:
        return a
    out, carry = [], BitMap()
    for i in range(max(len(a.slices), len(b.slices))):
        x = a.slices[i] if i < len(a.slices) else EMPTY
        y = b.slices[i] if i < len(b.slices) else EMPTY
        xy = x ^ y
        out.append(xy ^ carry if carry else xy)
        carry = (x & y) | (carry & xy) if carry else x & y
    if carry:
        out.append(carry)
    return RangeIndex(0, 1, tuple(out), a.exists | b.exists)


def sub_counts(a: RangeIndex, b: RangeIndex) -> RangeIndex:
    """The per-profile difference a - b of two count indexes, where every count of b is
    at most a's (b counts a subset of a's rows): a ripple-borrow subtractor."""
    if not b.exists:
        return a
    out, borrow = [], BitMap()
    for i in range(max(len(a.slices), len(b.slices))):
        x = a.slices[i] if i < len(a.slices) else EMPTY
        y = b.slices[i] if i < len(b.slices) else EMPTY
        xy = x ^ y
        out.append(xy ^ borrow if borrow else xy)
        borrow = (y - x) | (borrow - xy) if borrow else y - x
    while out and not out[-1]:
        out.pop()
    return RangeIndex(0, 1, tuple(out), BitMap.union(*out) if out else BitMap())


def sum_counts(parts: list[RangeIndex]) -> RangeIndex:
    """Sum many count indexes pairwise, so carries stay short."""
    parts = [p for p in parts if p.exists]
    if not parts:
        return RangeIndex()
    while len(parts) > 1:
        paired = [add_counts(parts[i], parts[i + 1]) for i in range(0, len(parts) - 1, 2)]
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
        (size,) = struct.unpack_from(">I", raw, 0)
        header = orjson.loads(raw[4:4 + size])
        n, pos, buf = header["n"], 4 + size, memoryview(raw)

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


def _block_prefix(event: str, day: int) -> bytes:
    return b"b" + event.encode() + SEP.encode() + u32(day + 2**31)


def _block_props(props: Mapping[str, tuple[np.ndarray, np.ndarray, list | None]],
                 rows: np.ndarray) -> tuple[dict, dict]:
    """The property columns of some rows, keyword codes renumbered to their own table."""
    columns, words = {}, {}
    for name, (keys, valid, table) in props.items():
        ok = valid[rows]
        if not ok.any():
            continue
        values = keys[rows]
        if table is not None:
            used, local = np.unique(values[ok], return_inverse=True)
            values = np.zeros(len(rows), dtype=np.int64)
            values[ok] = local
            words[name] = [table[i] for i in used.tolist()]
        columns[name] = (values, ok)
    return columns, words


def _block_key(event: str, day: int, seq: int) -> bytes:
    return _block_prefix(event, day) + u32(seq)


def _count_key(kind: bytes, bucket: int, stream: str) -> bytes:
    return b"c" + kind + u32(bucket + 2**31) + stream.encode()


# ------------------------------------------------------------------------ the index
BucketKey = tuple[bytes, str, int]  # (b"d" or b"m", stream, day or month)
CACHE_BYTES = 1 << 30  # decoded count buckets kept in memory, by their stored size


class BucketCache:
    """Decoded count buckets, least recently used first out, bounded by stored bytes.

    Shared by every EventIndex of one open engine. An entry is keyed by the bucket and the
    version that wrote it, so an index never sees a value its snapshot does not hold; only
    committed values are put in (a batch that aborts may reuse its version number)."""

    def __init__(self, limit: int = CACHE_BYTES) -> None:
        self.limit = limit
        self.size = 0
        self._entries: OrderedDict[tuple[BucketKey, int], tuple[RangeIndex, int]] = \
            OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[BucketKey, int]) -> RangeIndex | None:
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

    def put(self, key: tuple[BucketKey, int], value: RangeIndex, size: int) -> None:
        with self._lock:
            if key in self._entries:
                return
            self._entries[key] = (value, size)
            self.size += size
            while self.size > self.limit and len(self._entries) > 1:
                _, (_, dropped) = self._entries.popitem(last=False)
                self.size -= dropped


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
        raw = self.reader.get("events", _count_key(kind, bucket, stream))
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
        raws = [self.reader.get("events", _block_key(event, day, seq)) for seq in range(parts)]
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
                raw = self.reader.get("events", _block_key(event, day, seq))
                if raw is not None:
                    (size,) = struct.unpack_from(">I", raw, 0)
                    names.update(orjson.loads(bytes(raw[4:4 + size]))["props"])
        return names


CATALOG_MARK = b"v-catalog"  # present once the catalog lists everything


def _catalog_key(kind: bytes, name: str) -> bytes:
    """b"k" + b"d"/b"m" + stream: the stream's sorted buckets; b"k" + b"t" + event type:
    its (day, parts) pairs. Open reads these few values instead of every bucket's key."""
    return b"k" + kind + name.encode()


def _packed(values: list[int]) -> bytes:
    return np.asarray(values, dtype="<i4").tobytes()


def _unpacked(raw: bytes) -> list[int]:
    return np.frombuffer(raw, dtype="<i4").tolist()


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
        store.put(txn, "events", _catalog_key(kind, name), _packed(values))


def load_events(store: Store, txn: Txn, version: int) -> EventIndex:
    """The catalog of the stored events (buckets and blocks stay in LMDB, read through
    the reader the index is then pinned to)."""
    stream_days: dict[str, list[int]] = {}
    stream_months: dict[str, list[int]] = {}
    type_days: dict[str, list[int]] = {}
    parts: dict[tuple[str, int], int] = {}
    catalogued = store.get(txn, "events", CATALOG_MARK) is not None
    if catalogued:
        for key, raw in store.items(txn, "events", b"k"):
            kind, name = key[1:2], bytes(key[2:]).decode()
            values = _unpacked(bytes(raw))
            if kind == b"t":
                type_days[name] = values[0::2]
                parts.update(((name, day), n) for day, n in zip(values[0::2], values[1::2],
                                                                 strict=True))
            else:
                (stream_days if kind == b"d" else stream_months)[name] = values
    else:  # a store written before the catalog: list the keys themselves
        for key in store.keys(txn, "events", b"c"):
            kind, bucket, stream = key[1:2], from_u32(key[2:6]) - 2**31, key[6:].decode()
            listing = stream_days if kind == b"d" else stream_months
            listing.setdefault(stream, []).append(bucket)
        for key in store.keys(txn, "events", b"b"):
            event, day = key[1:-9].decode(), from_u32(key[-8:-4]) - 2**31
            parts[(event, day)] = max(parts.get((event, day), 0), from_u32(key[-4:]) + 1)
        for event, day in parts:
            type_days.setdefault(event, []).append(day)
        for listing in (*stream_days.values(), *stream_months.values(), *type_days.values()):
            listing.sort()
    return EventIndex(None, version, {}, stream_days, stream_months, type_days,
                      parts, catalogued=catalogued)


# ------------------------------------------------------------------------ writing
class EventBatch:
    """Collects the event records of one batch as columns, and writes them in parts.

    add() only appends raw values (about a microsecond a row); every FLUSH_ROWS rows,
    and at finish, the columns are checked and converted with numpy — timestamps,
    profile ids, property types — and a bad value is found again row by row so that
    its error names the line and the field.

    add_block() takes a parsed block whose rows are checked column-wise (event_blocks)
    as EventColumns parts, held like add()'s rows until the same flush, which merges
    them in line order: the stored bytes are those of the rows added one by one.
    """

    def __init__(self, store: Store, txn: Txn, index: EventIndex, schema: Schema,
                 ensure_profile: Callable[[Any], int], version: int,
                 known_profiles: Callable[[list[str]], list[int | None]]) -> None:
        self.store = store
        self.txn = txn
        self.index = index
        self.schema = schema
        self.types = dict(schema.events)
        self.ensure_profile = ensure_profile
        self.known_profiles = known_profiles
        self.version = version
        self.dense: dict[str, int] = {}  # profile ids seen in this batch (bounded)
        self.count = 0
        self.reader = TxnReader(store, txn)
        self.pending: dict[BucketKey, list[np.ndarray]] = {}  # rows' profiles, not written
        self.touched: set[BucketKey] = set()  # by the rows being flushed now
        self.written = dict(index.written)
        self.stream_days = {k: list(v) for k, v in index.stream_days.items()}
        self.stream_months = {k: list(v) for k, v in index.stream_months.items()}
        self.type_days = {k: list(v) for k, v in index.type_days.items()}
        self.parts = dict(index.parts)
        self.relisted: set[tuple[bytes, str]] = set()  # catalog entries to rewrite
        self.first_part: dict[tuple[str, int], int] = {}  # the first part this batch wrote
        self.refused: frozenset[str] = frozenset()  # event types add_block leaves to add
        self._clear()

    def _clear(self) -> None:
        self.columns: list[EventColumns] = []  # add_block's rows, before add()'s
        self.held = 0  # rows in self.columns
        self.c_profile: list[Any] = []
        self.c_event: list[Any] = []
        self.c_ts: list[Any] = []
        self.c_line: list[int | None] = []
        self.c_props: dict[str, tuple[list[int], list[Any]]] = {}

    def add(self, record: Any, line: int | None = None) -> None:
        if type(record) is not dict:
            raise DataError("expected a JSON object")
        get = record.get
        profile, event, ts = get("profile"), get("event"), get("ts")
        if profile is None or event is None or ts is None:
            missing = next(k for k in EVENT_KEYS if get(k) is None)
            raise DataError(f"{missing!r} is required", field=missing)
        row = len(self.c_ts)
        self.c_profile.append(profile)
        self.c_event.append(event)
        self.c_ts.append(ts)
        self.c_line.append(line)
        if len(record) > 3:
            columns = self.c_props
            for name, value in record.items():
                if value is None or name in EVENT_KEYS:
                    continue
                column = columns.get(name)
                if column is None:
                    column = columns[name] = ([], [])
                column[0].append(row)
                column[1].append(value)
        self.count += 1
        if self.held + row + 1 >= FLUSH_ROWS:
            self._flush()

    def add_block(self, block: RowBlock) -> bool:
        """Take a parsed block column-wise (True), or none of it (False): the row path
        then adds its rows. A block waits for the flush after rows of add(), so that a
        flush's parts are always block rows first, then add()'s rows, in line order."""
        if self.c_ts:
            return False
        part = columns_of(block, self._type_of, self.refused)
        if part is None:
            return False
        start = 0
        while start < len(part):  # flush at the row counts the row path flushes at
            end = min(len(part), start + FLUSH_ROWS - self.held)
            self.columns.append(part if (start, end) == (0, len(part))
                                else part.slice(start, end))
            self.held += end - start
            self.count += end - start
            start = end
            if self.held >= FLUSH_ROWS:
                self._flush()
        return True

    def _type_of(self, name: str) -> str | None:
        """A property's type as the next flush will see it: known, or inferred from
        the first held block that has it."""
        known = self.types.get(name)
        if known is not None:
            return known
        return next((part.props[name].type_ for part in self.columns
                     if name in part.props), None)

    def _fail(self, row: int, message: str, field: str) -> NoReturn:
        raise DataError(message, field=field, line=self.c_line[row])

    # ------------------------------------------------------------------ columns
    def _timestamps(self) -> np.ndarray:
        raw = self.c_ts
        if all(type(s) is str and len(s) >= 10 and s[4] == "-" and s[7] == "-" for s in raw):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("error")  # e.g. zone offsets: the careful path
                    parsed = np.array([s[:-1] if s[-1] == "Z" else s for s in raw],
                                      dtype="datetime64[us]")
                micros = parsed.astype(np.int64)  # NaT is the smallest int64
                if ((micros >= T.MIN_US) & (micros <= T.MAX_US)).all():  # years 1-9999
                    return micros
            except (ValueError, Warning):
                pass
        out = np.empty(len(raw), dtype=np.int64)
        for row, text in enumerate(raw):
            try:
                out[row] = T.parse_timestamp(text)
            except ValueError as exc:
                self._fail(row, str(exc), "ts")
        return out

    def _event_types(self) -> tuple[list[str], np.ndarray]:
        names = set(self.c_event) if all(type(e) is str for e in self.c_event) else None
        if names is None or not all(e != ANY and SEP not in e and T.name_problem(e) is None
                                    for e in names):
            for row, e in enumerate(self.c_event):
                if type(e) is not str or e == ANY or SEP in e or T.name_problem(e):
                    self._fail(row, 'expected an event type name (a non-empty string of at '
                               f'most {T.MAX_NAME_BYTES} bytes, not "*")', "event")
        for part in self.columns:
            names.update(part.event_names)
        ordered = sorted(names)
        code = {name: i for i, name in enumerate(ordered)}
        codes = [np.array([code[e] for e in part.event_names], dtype=np.int64)[part.event_codes]
                 for part in self.columns]
        codes.append(np.fromiter((code[e] for e in self.c_event), dtype=np.int64,
                                 count=len(self.c_event)))
        return ordered, np.concatenate(codes)

    def _profiles(self) -> np.ndarray:
        raw = self.c_profile
        if not all(type(p) is str for p in raw):  # ints are fine; find anything else
            for row, p in enumerate(raw):
                if type(p) is not str and type(p) is not int:
                    self._fail(row, "expected a non-empty string or integer profile id",
                               "profile")
        if len(self.dense) > DENSE_CACHE:  # keep the cache bounded
            self.dense = {}
        seen: dict[Any, None] = {}  # first appearance decides the order new ones are made
        for part in self.columns:
            seen.update(dict.fromkeys(part.profiles_in_order()))
        seen.update(dict.fromkeys(raw))
        missing = [p for p in seen if p not in self.dense]
        known = self.known_profiles([p if type(p) is str else str(p) for p in missing])
        for p, found in zip(missing, known, strict=True):
            if found is not None:  # an existing profile: one lookup, no Python per-id work
                self.dense[p] = found
                continue
            try:
                self._dense_of(p)
            except DataError as exc:
                self._fail(raw.index(p), exc.reason, "profile")
        dense = self.dense
        out = []
        for part in self.columns:
            used = np.unique(part.profile_codes)
            table = np.zeros(len(part.profile_ids), dtype=np.uint32)
            ids = part.profile_ids
            table[used] = np.fromiter((dense[ids[c]] for c in used.tolist()), dtype=np.uint32,
                                      count=len(used))
            out.append(table[part.profile_codes])
        out.append(np.fromiter((dense[p] for p in raw), dtype=np.uint32, count=len(raw)))
        return np.concatenate(out)

    def _dense_of(self, profile: Any) -> int:
        found = self.dense.get(profile)
        if found is None:
            found = self.ensure_profile(profile)
            self.dense[profile] = found
        return found

    def _properties(self, n: int) -> dict[str, tuple[np.ndarray, np.ndarray, list | None]]:
        """name -> (int64 keys or keyword codes, valid, keyword table) over the chunk:
        the held blocks' rows, then add()'s, each property in the order the rows meet
        it (which orders inferred types in the schema, and decides which error is first)."""
        out = {}
        order: dict[str, None] = {}
        # The order among properties first met on one line only matters for types still
        # to infer and for errors among add()'s rows; else no line is parsed again for it.
        exact = bool(self.c_props) or any(name not in self.types for part in self.columns
                                          for name in part.props)
        for part in self.columns:
            order.update(dict.fromkeys(part.prop_order(exact)))
        order.update(dict.fromkeys(self.c_props))
        for name in order:
            type_ = self.types.get(name)
            if type_ is None:
                type_ = self._type_of(name)
                if type_ is not None:
                    self.types[name] = type_  # from a held block (its name was checked)
            keys = np.zeros(n, dtype=np.int64)
            valid = np.zeros(n, dtype=bool)
            table: dict[str, int] = {}
            offset = 0
            for part in self.columns:
                prop = part.props.get(name)
                if prop is not None:
                    valid[offset:offset + len(part)] = prop.valid
                    keys[offset:offset + len(part)] = self._part_keys(prop, table)
                offset += len(part)
            words = list(table) if type_ == T.KEYWORD else None
            if name not in self.c_props:
                out[name] = (keys, valid, words)
                continue
            rows, values = self.c_props[name]
            if type_ is None:
                try:
                    type_ = self._infer(name, values[0])
                except DataError as exc:
                    self._fail(rows[0], exc.reason, name)
            at = np.array(rows, dtype=np.int64) + offset
            valid[at] = True
            converted = self._fast(type_, values)
            if converted is None:
                converted = self._careful(type_, name, rows, values)
            if type_ == T.KEYWORD:
                converted = np.fromiter((table.setdefault(v, len(table)) for v in converted),
                                        dtype=np.int64, count=len(values))
                words = list(table)
            keys[at] = converted
            out[name] = (keys, valid, words)
        return out

    @staticmethod
    def _part_keys(prop: Any, table: dict[str, int]) -> np.ndarray:
        """A held part's keys; keyword codes renumbered into the chunk's table in order
        of first appearance, as add()'s rows number theirs."""
        if prop.words is None:
            return prop.keys
        codes = prop.keys[prop.valid]
        remap = np.zeros(max(len(prop.words), 1), dtype=np.int64)
        for code in first_seen(codes).tolist():
            remap[code] = table.setdefault(prop.words[code], len(table))
        return np.where(prop.valid, remap[prop.keys], 0)

    @staticmethod
    def _fast(type_: str, values: list) -> Any:
        """The values converted with numpy when they plainly fit the type, else None."""
        if type_ == T.KEYWORD:
            short = T.MAX_VALUE_BYTES // 4  # longer strings go value by value (size check)
            return values if all(type(v) is str and len(v) <= short for v in values) else None
        if type_ == T.BOOL:
            return np.array(values, dtype=np.int64) if all(
                type(v) is bool for v in values) else None
        if type_ == T.INT and all(type(v) is int for v in values):
            if all(-T.MAX_KEY < v < T.MAX_KEY for v in values):
                return np.array(values, dtype=np.int64)
            return None
        if type_ == T.FLOAT and all(type(v) is float or type(v) is int for v in values):
            floats = np.array(values, dtype=np.float64)
            if not (np.isfinite(floats) & (np.abs(floats) < T.MAX_KEY / T.FLOAT_SCALE)).all():
                return None  # checked first: float_keys of 1e12 overflows int64
            return T.float_keys(floats, T.FLOAT_DIGITS)
        return None

    def _careful(self, type_: str, name: str, rows: list[int], values: list) -> Any:
        """Value by value, so the first bad one is reported with its line."""
        out = []
        for row, value in zip(rows, values, strict=True):
            try:
                canonical = T.coerce(type_, value)
                out.append(T.range_key(type_, canonical) if type_ in T.RANGE_TYPES
                           else canonical)
            except ValueError as exc:
                self._fail(row, str(exc), name)
        if type_ == T.KEYWORD:
            return out
        return np.array([int(v) for v in out], dtype=np.int64)

    # ------------------------------------------------------------------ writing
    def _flush(self) -> None:
        """Check and convert the queued columns; write them as new block parts and add
        their counts to the buckets (in memory)."""
        n = self.held + len(self.c_ts)
        if not n:
            return
        ts = np.concatenate([part.ts for part in self.columns] + [self._timestamps()])
        names, codes = self._event_types()
        props = self._properties(n)
        dense = self._profiles()
        days = np.floor_divide(ts, T.US_PER_DAY)
        order = np.lexsort((days, codes))
        key = codes[order] * (1 << 32) + (days[order] + 2**31)
        starts = np.concatenate(([0], np.flatnonzero(np.diff(key)) + 1, [n]))
        version = np.full(n, self.version, dtype=np.uint32)
        by_month: dict[tuple[str, int], list[np.ndarray]] = {}
        for a, b in zip(starts[:-1].tolist(), starts[1:].tolist(), strict=True):
            rows = order[a:b]
            event, day = names[int(codes[rows[0]])], int(days[rows[0]])
            block = Block(dense[rows], ts[rows], version[:b - a],
                          *_block_props(props, rows))
            seq = self.parts.get((event, day), 0)
            self.store.put(self.txn, "events", _block_key(event, day, seq), block.encode())
            self.parts[(event, day)] = seq + 1
            self.first_part.setdefault((event, day), seq)
            self.relisted.add((b"t", event))
            if seq == 0:
                insort(self.type_days.setdefault(event, []), day)
            for stream, profiles in self._streams(event, block):
                self._add(b"d", day, stream, profiles)
                by_month.setdefault((stream, month_of(day)), []).append(profiles)
        for (stream, month), parts in by_month.items():  # each month once per flush
            self._add(b"m", month, stream, np.concatenate(parts))
        self._clear()
        self._write_pending(keep=self.touched)
        self.touched = set()

    def _add(self, kind: bytes, bucket: int, stream: str, profiles: np.ndarray) -> None:
        """Queue the profiles of some rows of one bucket (one entry per row). They are
        counted, and added to the stored counts, once, when the bucket is written: an
        input of many time-sorted runs touches the same buckets flush after flush."""
        key = (kind, stream, bucket)
        queued = self.pending.get(key)
        if queued is None:
            queued = self.pending[key] = []
            listing = (self.stream_days if kind == b"d" else self.stream_months
                       ).setdefault(stream, [])
            if not _listed(listing, bucket):
                insort(listing, bucket)
                self.relisted.add((kind, stream))
        queued.append(profiles)
        if len(queued) >= 16:  # a bounded number of small arrays per bucket
            queued[:] = [np.concatenate(queued)]
        self.touched.add(key)

    def _stored(self, key: BucketKey) -> RangeIndex | None:
        """The bucket's counts as stored now (None if it has none yet)."""
        kind, stream, bucket = key
        written = self.written.get(key)
        if written == self.version:  # written by an earlier eviction of this batch
            return decode_counts(self.reader.get("events", _count_key(kind, bucket, stream)))
        listing = (self.index.stream_days if kind == b"d" else self.index.stream_months
                   ).get(stream, [])
        if _listed(listing, bucket):  # committed before this batch
            return self.index.bucket(*key)
        return None

    def _write_pending(self, keep: set[BucketKey]) -> None:
        """Count the queued rows of the buckets the last flush did not touch, add them to
        the stored counts and write those into the transaction: input in time order
        holds only its recent days in memory."""
        keys = sorted(self.pending.keys() - keep)
        for key, fresh in zip(keys, self._counted(keys), strict=True):
            kind, stream, bucket = key
            current = self._stored(key)
            counts = add_counts(current, fresh) if current is not None else fresh
            self.store.put(self.txn, "events", _count_key(kind, bucket, stream),
                           encode_counts(counts))
            self.written[key] = self.version

    def _counted(self, keys: list[BucketKey]) -> Iterator[RangeIndex]:
        """counts_of the queued profiles of each key (taken off the queue), grouped by
        (key, profile) in one sort rather than one np.unique per bucket."""
        if not keys:
            return
        queued = [np.concatenate(self.pending.pop(key)) for key in keys]
        owner = np.repeat(np.arange(len(keys), dtype=np.int64), [len(q) for q in queued])
        joined = owner << 32 | np.concatenate(queued).astype(np.int64)
        joined.sort()
        starts = np.flatnonzero(np.concatenate(([True], joined[1:] != joined[:-1])))
        counts = np.diff(np.append(starts, len(joined)))
        runs = joined[starts]
        ids = (runs & 0xFFFFFFFF).astype(np.uint32)
        bounds = np.searchsorted(runs >> 32, np.arange(len(keys) + 1)).tolist()
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            yield count_index(ids[a:b], counts[a:b])

    def finish(self) -> tuple[EventIndex, Schema]:
        """Write the rest of the rows and every changed count bucket into the transaction;
        the next index (reading through the transaction until the engine pins it to the
        committed snapshot) and schema."""
        self._flush()
        self._write_pending(keep=set())
        self._compact()
        self._write_catalog()
        schema = self.schema
        added = {k: v for k, v in self.types.items() if k not in schema.events}
        if added:
            schema = schema.with_fields("events", added)
        index = EventIndex(self.reader, self.version, self.written, self.stream_days,
                           self.stream_months, self.type_days, self.parts, self.index.cache)
        return index, schema

    def _compact(self) -> None:
        """Join the parts this batch wrote for a day into one: input that is not in one
        time order (several sorted runs) would otherwise leave a part per flush, and
        every read of that day would decode them all. Older parts stay as they are, so
        a snapshot from before this batch reads what it always read."""
        for (event, day), first in self.first_part.items():
            end = self.parts[(event, day)]
            if end - first < 2:
                continue
            keys = [_block_key(event, day, seq) for seq in range(first, end)]
            joined = Block.join([Block.decode(self.reader.get("events", key)) for key in keys])
            self.store.put(self.txn, "events", keys[0], joined.encode())
            for key in keys[1:]:
                self.store.delete(self.txn, "events", key)
            self.parts[(event, day)] = first + 1

    def _write_catalog(self) -> None:
        """Rewrite the catalog entries of the streams and types this batch listed anew
        (Engine.open gives a store from before the catalog a whole one)."""
        if self.relisted:
            index = EventIndex(None, self.version, {}, self.stream_days, self.stream_months,
                               self.type_days, self.parts)
            write_catalog(self.store, self.txn, index, self.relisted)

    def _infer(self, name: str, value: Any) -> str:
        problem = T.name_problem(name)
        if problem:
            raise DataError(f"property names {problem}", field=str(name)[:100])
        if isinstance(value, bool):
            type_ = T.BOOL
        elif isinstance(value, int):
            type_ = T.INT
        elif isinstance(value, float):
            type_ = T.FLOAT
        elif isinstance(value, str):
            type_ = T.KEYWORD
        else:
            raise DataError("event properties are keywords, numbers or bools", field=name)
        self.types[name] = type_
        return type_

    def _streams(self, event: str, block: Block):
        """(stream, profiles of its rows) for the type and each keyword/bool value."""
        yield stream_key(event), block.profile
        for name, (values, valid) in block.props.items():
            type_ = self.types[name]
            if type_ not in STREAM_TYPES:
                continue
            table = block.words.get(name)
            for code in np.unique(values[valid]).tolist():
                value = table[code] if table is not None else bool(code)
                yield stream_key(event, name, value), block.profile[valid & (values == code)]


# ------------------------------------------------------------------------ evaluation
def evaluate_event(cond: EventCond, index: EventIndex, schema: Schema, live: BitMap,
                   as_of: int) -> BitMap:
    """The live profiles whose selected events satisfy `having`."""
    having = cond.having
    events = index.types if cond.event == ANY else [cond.event]
    events = [e for e in events if e in index.type_days]
    lo, hi = cond.window.bounds(as_of)
    if having.agg in RECENCY_AGGS:
        return _recency(cond, index, schema, events, lo, hi, as_of) & live
    streams = _streams_for(cond, events) if having.agg == "count" else None
    if streams is not None:
        per_profile = _count_by_bitmaps(cond, index, schema, events, streams, lo, hi, as_of)
        result = _compare_index(per_profile, having)
        seen = per_profile.exists
    else:
        result, seen = _aggregate_rows(cond, index, schema, events, lo, hi, as_of)
    if having.holds_for_no_rows():
        result = result | (live - seen)
    return result & live


def _streams_for(cond: EventCond, events: list[str]) -> list[str] | None:
    """The streams whose counts add up to the rows `where` selects, or None."""
    where = cond.where
    if where is None or isinstance(where, All):
        return [stream_key(e) for e in events]
    if isinstance(where, Cond) and where.type in STREAM_TYPES and where.op in ("eq", "in"):
        values = (where.value,) if where.op == "eq" else tuple(dict.fromkeys(where.value))
        return [stream_key(e, where.field, v) for e in events for v in values]
    return None


def _count_by_bitmaps(cond: EventCond, index: EventIndex, schema: Schema, events: list[str],
                      streams: list[str], lo: int | None, hi: int, as_of: int) -> RangeIndex:
    earliest = min((index.type_days[e][0] for e in events), default=day_of(hi))
    window = plan(lo, hi, earliest)
    parts, minus = [], []
    for stream in streams:
        months = index.stream_months.get(stream, [])
        present = index.stream_days.get(stream, [])
        for month in _in_range(months, window.months):
            parts.append(index.bucket(b"m", stream, month))
        for month, inside in _by_month(window.whole_days(present)):
            # most of a month inside the window: its bucket minus the days outside
            first, end = first_day(month), first_day(month + 1)
            outside = [d for d in _in_range(present, range(first, end)) if d not in inside]
            if len(outside) < len(inside) - 1 and _listed(months, month):
                parts.append(index.bucket(b"m", stream, month))
                minus += [index.bucket(b"d", stream, d) for d in outside]
            else:
                parts += [index.bucket(b"d", stream, d) for d in inside]
    for edge_lo, edge_hi in window.edges:
        rows = _rows(cond, index, schema, events, edge_lo, edge_hi, as_of)
        if len(rows[0]):
            parts.append(counts_of(rows[0]))
    return sub_counts(sum_counts(parts), sum_counts(minus))


def _recency(cond: EventCond, index: EventIndex, schema: Schema, events: list[str],
             lo: int | None, hi: int, as_of: int) -> BitMap:
    """first/last (index/recency.py): from the count buckets' presence when streams
    cover `where`, else from the raw rows' timestamps."""
    if not events:
        return EMPTY
    streams = _streams_for(cond, events)
    if streams is None:
        profiles, ts = _rows(cond, index, schema, events, lo, hi, as_of, TS)
        return recency_profiles(profiles, ts, cond.having, as_of)

    def present(a: int | None, b: int) -> BitMap:
        return _present(cond, index, schema, events, streams, a, b, as_of)

    return recency_by_presence(cond.having, as_of, lo, hi, present)


def _present(cond: EventCond, index: EventIndex, schema: Schema, events: list[str],
             streams: list[str], lo: int | None, hi: int, as_of: int) -> BitMap:
    """The profiles with a selected event in [lo, hi): the union of the `exists` of the
    whole months' and days' count buckets, and the raw rows of the partial days."""
    earliest = min(index.type_days[e][0] for e in events)
    window = plan(lo, hi, earliest)
    parts = []
    for stream in streams:
        months = index.stream_months.get(stream, [])
        parts += [index.bucket(b"m", stream, m).exists for m in _in_range(months, window.months)]
        parts += [index.bucket(b"d", stream, d).exists
                  for d in window.whole_days(index.stream_days.get(stream, []))]
    for edge_lo, edge_hi in window.edges:
        profiles = _rows(cond, index, schema, events, edge_lo, edge_hi, as_of)[0]
        if len(profiles):
            parts.append(bitmap_of(profiles))
    return BitMap.union(*parts) if parts else EMPTY


def _by_month(days: list[int]) -> list[tuple[int, set[int]]]:
    """Sorted days grouped by calendar month: (month, its days)."""
    groups: dict[int, set[int]] = {}
    for day in days:
        groups.setdefault(month_of(day), set()).add(day)
    return sorted(groups.items())


def _listed(sorted_buckets: list[int], bucket: int) -> bool:
    i = bisect_left(sorted_buckets, bucket)
    return i < len(sorted_buckets) and sorted_buckets[i] == bucket


def _in_range(sorted_buckets: list[int], buckets: range) -> list[int]:
    if not buckets:
        return []
    return sorted_buckets[bisect_left(sorted_buckets, buckets.start):
                          bisect_left(sorted_buckets, buckets.stop)]


def blocks_in(index: EventIndex, events: Iterable[str], lo: int | None, hi: int
              ) -> Iterator[tuple[Any, np.ndarray]]:
    """Each raw block of these event types with rows in [lo, hi) (lo None: from the
    first), with the mask of its rows in that range."""
    for event in events:
        days = index.type_days.get(event, [])
        start = 0 if lo is None else bisect_left(days, day_of(lo))
        for day in days[start:bisect_right(days, day_of(hi - 1))]:
            block = index.block(event, day)
            if block is None:
                continue
            keep = block.ts < hi
            if lo is not None:
                keep &= block.ts >= lo
            yield block, keep


def _rows(cond: EventCond, index: EventIndex, schema: Schema, events: list[str],
          lo: int | None, hi: int, as_of: int, of: str | None = None
          ) -> tuple[np.ndarray, np.ndarray]:
    """(profiles, values of `of`) of the raw rows in [lo, hi) that `where` selects
    (of TS: their timestamps)."""
    profiles, values = [], []
    for block, keep in blocks_in(index, events, lo, hi):
        if cond.where is not None:
            keep &= row_mask(cond.where, block, schema.events, as_of)
        if of == TS:
            values.append(block.ts[keep])
        elif of is not None:
            column = block.column(of)
            if column is None:
                continue
            keep &= column[1]
            values.append(column[0][keep])
        profiles.append(block.profile[keep])
    if not profiles:
        return np.zeros(0, dtype=np.uint32), np.zeros(0, dtype=np.int64)
    return np.concatenate(profiles), (np.concatenate(values) if of is not None else
                                      np.zeros(0, dtype=np.int64))


def _aggregate_rows(cond: EventCond, index: EventIndex, schema: Schema, events: list[str],
                    lo: int | None, hi: int, as_of: int) -> tuple[BitMap, BitMap]:
    """(profiles satisfying `having`, profiles with any selected row) from raw rows."""
    having = cond.having
    profiles, values = _rows(cond, index, schema, events, lo, hi, as_of, having.of)
    if len(profiles) == 0:
        return BitMap(), BitMap()
    ids, verdict = aggregate(profiles, values, having)
    return bitmap_of(ids[verdict]), bitmap_of(ids)


def aggregate(profiles: np.ndarray, values: np.ndarray, having: Having
              ) -> tuple[np.ndarray, np.ndarray]:
    """Per distinct profile: (ids, whether its rows satisfy `having`), exactly."""
    order = np.argsort(profiles, kind="stable")
    sorted_ids = profiles[order]
    starts = np.concatenate(([0], np.flatnonzero(np.diff(sorted_ids)) + 1))
    ids = sorted_ids[starts]
    counts = np.diff(np.concatenate((starts, [len(sorted_ids)])))
    if having.agg == "count":
        return ids, compare_array(counts, having.op, having.value)
    vals = values[order]
    if having.agg == "sum":
        return ids, compare_array(np.add.reduceat(vals, starts), having.op, having.value)
    if having.agg == "min":
        return ids, compare_array(np.minimum.reduceat(vals, starts), having.op, having.value)
    if having.agg == "max":
        return ids, compare_array(np.maximum.reduceat(vals, starts), having.op, having.value)
    sums = np.add.reduceat(vals, starts)  # avg op v  <=>  sum op v * count (count > 0)
    return ids, _compare_avg(sums, counts, having.op, having.value)


def _compare_avg(sums: np.ndarray, counts: np.ndarray, op: str, value: Any) -> np.ndarray:
    if op in ("in", "not_in"):  # having: any of the listed values
        hit = np.zeros(len(sums), dtype=bool)
        for v in value:
            hit |= _compare_avg(sums, counts, "eq", v)
        return hit if op == "in" else ~hit
    if op == "between":
        return _compare_avg(sums, counts, "gte", value[0]) & \
            _compare_avg(sums, counts, "lte", value[1])
    v = Fraction(value)
    left = sums.astype(object) * v.denominator
    right = counts.astype(object) * v.numerator
    return np.array(_OPS[op](left, right), dtype=bool)


_OPS = {"eq": np.equal, "ne": np.not_equal, "gt": np.greater, "gte": np.greater_equal,
        "lt": np.less, "lte": np.less_equal}


def compare_array(keys: np.ndarray, op: str, value: Any) -> np.ndarray:
    """keys (int64) op an exact constant (Fraction), without rounding errors."""
    if op in ("in", "not_in"):  # having: any of the listed values
        hit = np.zeros(len(keys), dtype=bool)
        for v in value:
            hit |= compare_array(keys, "eq", v)
        return hit if op == "in" else ~hit
    if op == "between":
        return compare_array(keys, "gte", value[0]) & compare_array(keys, "lte", value[1])
    c = Fraction(value)
    if op == "eq":
        return keys == int(c) if c.denominator == 1 else np.zeros(len(keys), dtype=bool)
    if op == "ne":
        return keys != int(c) if c.denominator == 1 else np.ones(len(keys), dtype=bool)
    if op == "gt":
        return keys > math.floor(c)
    if op == "gte":
        return keys >= math.ceil(c)
    if op == "lt":
        return keys < math.ceil(c)
    return keys <= math.floor(c)


def _compare_index(index: RangeIndex, having: Having) -> BitMap:
    if having.op in ("in", "not_in"):
        hit = BitMap.union(*(index.compare("eq", v) for v in having.value))
        return hit if having.op == "in" else index.exists - hit
    if having.op == "between":
        return index.between(*having.value)
    if having.op == "ne":
        return index.exists - index.compare("eq", having.value)
    return index.compare(having.op, having.value)


# ------------------------------------------------------------------------ where on rows
def row_mask(rule: Rule, block: Block, types: Mapping[str, str], as_of: int) -> np.ndarray:
    """Which rows of a block satisfy a `where` rule over event properties."""
    n = len(block)
    if isinstance(rule, All):
        return np.ones(n, dtype=bool)
    if isinstance(rule, And):
        mask = np.ones(n, dtype=bool)
        for child in rule.children:
            mask &= row_mask(child, block, types, as_of)
        return mask
    if isinstance(rule, Or):
        mask = np.zeros(n, dtype=bool)
        for child in rule.children:
            mask |= row_mask(child, block, types, as_of)
        return mask
    if isinstance(rule, Not):
        return ~row_mask(rule.child, block, types, as_of)
    if isinstance(rule, Cond):
        return _cond_mask(rule, block, as_of)
    raise TypeError(f"not allowed in where: {rule!r}")


def _cond_mask(cond: Cond, block: Block, as_of: int) -> np.ndarray:
    column = block.column(cond.field)
    n = len(block)
    if column is None:
        return np.full(n, cond.op == "not_exists")
    values, valid = column
    op = cond.op
    if op == "exists":
        return valid.copy()
    if op == "not_exists":
        return ~valid
    if cond.type == T.KEYWORD:
        table = {w: i for i, w in enumerate(block.words.get(cond.field, []))}
        wanted = (cond.value,) if op in ("eq", "ne") else cond.value
        codes = [table[w] for w in wanted if w in table]
        hit = valid & np.isin(values, codes)
        return hit if op in ("eq", "in") else valid & ~hit
    if cond.type == T.BOOL:
        hit = valid & (values == int(cond.value))
        return hit if op == "eq" else valid & ~hit

    def key(v: Any) -> Any:
        if isinstance(v, DaysAgo):
            moment = as_of - v.days * T.US_PER_DAY
            return moment // T.US_PER_DAY if cond.type == T.DATE else moment
        if cond.type == T.FLOAT:  # stored keys were rounded half-even: so is the constant
            return round(Fraction(v))
        return v

    if op in ("in", "not_in"):
        hit = np.zeros(n, dtype=bool)
        for v in cond.value:
            hit |= compare_array(values, "eq", key(v))
        return valid & (hit if op == "in" else ~hit)
    if op == "between":
        return valid & compare_array(values, "between", (key(cond.value[0]), key(cond.value[1])))
    return valid & compare_array(values, op, key(cond.value))

