"""Orders: a child collection of profiles, and the `orders` rule (CONTRACT §1, §2.4).

Data layout (in memory; an OrderIndex is immutable once published)
- Every order gets a dense order id (0, 1, 2, … in arrival order, never reused).
  `owner` (uint32: order -> dense profile id) and `ts` (int64 µs) are numpy columns.
- keyword / keywords / bool order fields: a ValueIndex over order ids (bitmap per value).
- int / float / date / timestamp order fields: an int64 key column (floats as exact
  integers of 10**-FLOAT_DIGITS, types.float_key, the scale rule constants arrive in)
  plus a bool validity column.  Conditions on them are one vectorised scan;
  aggregations (sum/avg/min/max) gather from the column.
- Items: a keyword / keywords / bool item key F is a multi-valued field "items.F" of the
  order (ValueIndex over order ids: the orders having an item with that value).  A
  numeric / date item key is kept per item: items get their own dense ids, an
  `item_owner` column (item -> order id, NONE once the item is replaced) and key
  columns, so "any item" and "every item" are exact for every op.  Value-typed item keys
  are also kept per item (`item_values`: a ValueIndex over item ids, bitmap names "w" /
  "y" + SEP + "items.F"), for items as rows (index/items.py).
- Per-order derived columns "items.qty_sum" (at the float scale, whatever the type of
  items.qty) and "items.distinct".
- `runs`: the starts of the maximal runs of order ids whose ts does not decrease.
  Orders mostly arrive in time order, so a time window is a union of a few id ranges
  (a bitmap built with add_range), found by binary search per run.  With more than
  MAX_RUNS runs the window is applied by gathering ts of the candidate orders.
Arrays are kept in buffers with spare capacity: a batch that only appends writes past
the published count in place (readers never look there); a batch that changes an
existing order copies the columns it changes (copy-on-write), as bitmaps are copied.

Persistence: the LMDB db "orders" holds everything, written in the caller's write
transaction (a failed batch leaves nothing):
  b"meta"                         JSON {"count": orders, "items": item ids,
                                  "item_values": true once the per-item bitmaps below
                                  cover every item (index_items builds them at open
                                  for a store written before they existed)}
  b"i\\x1f" + external order id     u32 dense order id
  b"r\\x1f" + u32(order id)         the order's current row (JSON, canonical values)
  b"c\\x1f" + column + 0 + u32(k)   chunk k (2**16 ids) of a numpy column, raw bytes
  b"b\\x1f" + bitmap + 0 + u32(k)   chunk k (2**18 ids) of a bitmap, portable roaring
  b"n\\x1f" + digest               the value of a bitmap whose name would be too long
so a batch rewrites only the chunks it touched, and load_orders rebuilds from LMDB alone.
Field columns (`Columns`) are read from LMDB the first time a rule uses them, through a
reader pinned to the index's version: a store opens without reading what no rule asks
for, and an older snapshot still reads its own version.

A query {"orders": R, "window": W, "having": H} runs as: R becomes a bitmap of order ids
(bitmap algebra over the order field indexes; numeric conditions are numpy scans; item
conditions on numbers project item ids onto orders); AND the window (ranges of order ids
from `runs`); the selected ids are gathered into owner/of-columns and aggregated per
profile in exact int64: few rows are grouped by one sort (ufunc.reduceat), many by
np.bincount / ufunc.at over profile ids; the comparison with H (exact, against the
Fraction) picks the profiles.  No Python loop runs over orders at query time.

Choices where the contract is silent
- Every order line must carry `id`, `profile` and `ts` (also when it updates an order);
  ids are non-empty strings or integers (taken as their decimal string), at most 400
  bytes.  A later line for the same id replaces the keys it gives, keeps the ones it
  omits, removes the ones given as null; `items` given replaces all items, `items: null`
  removes them.  `profile` and `ts` may change.
- Order field names must not start with "items."; item keys must not be `qty_sum`,
  `qty_each` or `distinct` (they would shadow the derived readings).  A null item value
  means the item lacks that key.  Types come from schema.orders ("status",
  "items.brand", …) or are inferred from the first non-null value, as for profiles.
- `items.F` (any type): eq / in / gt / gte / lt / lte / between / anniversary_in are true
  when ANY item satisfies; exists when any item has F.  Like a keywords field, `ne X` is
  "some item has F and no item has X", `not_in` "some item has F and no item has any of
  them", not_exists "no item has F" (orders without items included).  Each condition is
  evaluated on its own: {"and": [items.brand eq acme, items.qty gt 2]} does not require
  the same item to satisfy both.
- `items.qty_each OP V`: the order has at least one item and every item satisfies
  `items.qty OP V` read per item (an item without qty satisfies nothing but not_exists).
  An order without items is false.  It needs a numeric (or date) items.qty.
- `items.qty_sum`: sum of qty over the order's items; items without qty add 0; an
  order without items has 0.  `items.distinct`: number of different products: distinct
  sku values among the items that have a sku, plus one per item without a sku; 0
  without items.  Both exist for every order, so `exists` is always true for them.
- Aggregations: orders whose `of` value is missing count for `count` only; sum/avg/min/
  max use the others (a profile whose selected orders all lack it has sum 0 and no avg/
  min/max).  Sums are exact (int64, or Python integers when int64 could overflow).
- Float order and item values are kept to FLOAT_DIGITS (8) decimal places, rounded
  half-even beyond, so sums are exact at one fixed scale; |value| < 4.6e10 (a larger
  one is a DataError).  Money to 2 decimals is exact.
- Deleting a profile should delete its orders (OrderBatch.drop_profiles), so a profile
  id that comes back later does not inherit them.
"""

from __future__ import annotations

import hashlib
import threading
import weakref
from array import array
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Any

import numpy as np
import orjson
from pyroaring import BitMap

from bitseg.index import types as T
from bitseg.index.blocks import RowBlock, Taken
from bitseg.index.compare import Groups, compare, compare_avg
from bitseg.index.errors import DataError
from bitseg.index.fields import EMPTY, ValueIndex, ValueWriter, bitmap_of, ids_of, month_days
from bitseg.index.keys import SEP
from bitseg.index.order_blocks import take_block
from bitseg.index.recency import (
    NO_FIRST,
    NO_LAST,
    RECENCY_AGGS,
    Timeline,
    holds,
    recency_of_extremes,
    resolved,
)
from bitseg.index.rules import All, And, Cond, DaysAgo, Not, Or, OrdersCond, Rule
from bitseg.index.schema import Schema
from bitseg.index.store import Store, Txn, TxnReader, chunk_mask, chunks_of, from_u32, u32

COL_BITS = 16
COL_CHUNK = 1 << COL_BITS
NONE = np.uint32(0xFFFFFFFF)  # item_owner of a replaced item
MAX_RUNS = 4096
MAX_ID_BYTES = 400
MAX_NAME = 400  # longer bitmap names are stored under a digest
I64_MIN, I64_MAX = -(2**63), 2**63 - 1

QTY, QTY_SUM, QTY_EACH, DISTINCT, SKU = (
    "items.qty", "items.qty_sum", "items.qty_each", "items.distinct", "items.sku")
DERIVED = (QTY_SUM, DISTINCT)
RESERVED = {"id", "profile", "ts", "items"}
ITEM_RESERVED = {"qty_sum", "qty_each", "distinct"}
SCALE = {QTY_SUM: T.FLOAT_SCALE}  # column keys per unit of the rule's value
ITEM_KINDS = (b"w", b"y")  # bitmap names of value-typed item keys per item: value, exists


# ---------------------------------------------------------------------- the index


@dataclass(frozen=True, slots=True, eq=False)
class Column:
    """int64 keys and their validity; buffers may be longer than the ids in use."""

    keys: np.ndarray
    valid: np.ndarray
    bound: int = 0  # >= every |key| (sums of n keys fit int64 while bound * n < 2**63)
    complete: bool = False  # every id in use has a value (valid need not be read)


def _empty(dtype: Any) -> np.ndarray:
    return np.zeros(0, dtype=dtype)


NO_IDS, NO_KEYS, NO_VALID = _empty(np.uint32), _empty(np.int64), _empty(bool)


class Columns(Mapping[str, Column]):
    """Key columns by field name (order or item fields), each read from LMDB the first
    time it is asked for, through `reader`, and then kept."""

    def __init__(self, kind: bytes = b"o", rows: int = 0,
                 entries: dict[str, Column | None] | None = None, reader: Any = None) -> None:
        self.kind, self.rows, self.reader = kind, rows, reader
        self._entries: dict[str, Column | None] = entries if entries is not None else {}
        self._lock = threading.Lock()

    def __getitem__(self, name: str) -> Column:
        col = self._entries[name]
        if col is None:
            with self._lock:
                col = self._entries[name]
                if col is None:
                    col = self._entries[name] = _read_column(
                        self.reader, self.kind + SEP + name.encode(), self.rows)
        return col

    def __iter__(self):
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def loaded(self, name: str) -> bool:
        return self._entries.get(name) is not None

    def pinned(self, reader: Any) -> Columns:
        """The same columns (sharing those already read) reading through another reader."""
        return Columns(self.kind, self.rows, dict(self._entries), reader)


def _read_column(reader: Any, name: bytes, rows: int) -> Column:
    """One key column of `rows` ids from its stored chunks (ids past them: no value)."""
    keys, valid = _assemble(lambda key: reader.get("orders", key), name, rows, np.int64, True)
    return _column_of(keys, valid)


def _assemble(get: Callable[[bytes], bytes | None], name: bytes, rows: int, dtype: Any,
              with_valid: bool) -> tuple[np.ndarray, np.ndarray]:
    """A stored column of `rows` ids from its chunks (_put_column's layout: the values,
    then a validity byte each when with_valid); ids past the stored chunks are zero and
    invalid. Without validity, the second array is empty."""
    data = np.zeros(rows, dtype=dtype)
    valid = np.zeros(rows if with_valid else 0, dtype=bool)
    width = data.itemsize + (1 if with_valid else 0)
    for chunk in range((rows + COL_CHUNK - 1) >> COL_BITS):
        raw = get(_column_key(name, chunk))
        if raw is None:
            continue
        size, a = len(raw) // width, chunk << COL_BITS
        data[a:a + size] = np.frombuffer(raw, dtype=dtype, count=size)
        if with_valid:
            valid[a:a + size] = np.frombuffer(raw, dtype=np.uint8, offset=size * data.itemsize,
                                              count=size)
    return data, valid


@dataclass(frozen=True, eq=False)
class OrderIndex:
    """An immutable snapshot of every order; OrderIndex() is empty."""

    count: int = 0  # order ids in use: 0 … count-1
    item_count: int = 0  # item ids in use
    live: BitMap = EMPTY  # the orders that exist
    owner_buf: np.ndarray = field(default_factory=lambda: _empty(np.uint32))
    ts_buf: np.ndarray = field(default_factory=lambda: _empty(np.int64))
    runs: np.ndarray | None = field(default_factory=lambda: _empty(np.int64))
    values: Mapping[str, ValueIndex] = field(default_factory=dict)
    columns: Columns = field(default_factory=Columns)  # over order ids
    item_owner_buf: np.ndarray = field(default_factory=lambda: _empty(np.uint32))
    item_columns: Columns = field(default_factory=lambda: Columns(b"i"))  # over item ids
    # keyword / keywords / bool item keys per item (index/items.py): bitmaps over item ids
    item_values: Mapping[str, ValueIndex] = field(default_factory=dict)
    items_indexed: bool = True  # False: a store from before item_values (see index_items)

    def pinned(self, reader: Any) -> OrderIndex:
        """This index reading its columns through another reader (the committed one's)."""
        return replace(self, columns=self.columns.pinned(reader),
                       item_columns=self.item_columns.pinned(reader))

    @property
    def owner(self) -> np.ndarray:
        return self.owner_buf[:self.count]

    @property
    def ts(self) -> np.ndarray:
        return self.ts_buf[:self.count]

    @property
    def item_owner(self) -> np.ndarray:
        return self.item_owner_buf[:self.item_count]

    def column(self, name: str) -> tuple[np.ndarray, np.ndarray] | None:
        col = self.columns.get(name)
        return None if col is None else (col.keys[:self.count], col.valid[:self.count])

    def item_column(self, name: str) -> tuple[np.ndarray, np.ndarray] | None:
        col = self.item_columns.get(name)
        n = self.item_count
        return None if col is None else (col.keys[:n], col.valid[:n])


def _column_of(keys: np.ndarray, valid: np.ndarray) -> Column:
    return Column(keys, valid, int(np.abs(keys).max(initial=0)), bool(valid.all()))


def compute_runs(ts: np.ndarray) -> np.ndarray | None:
    """Starts of the runs of ids over which ts does not decrease; None if too many."""
    if len(ts) == 0:
        return _empty(np.int64)
    breaks = np.flatnonzero(ts[1:] < ts[:-1]) + 1
    if len(breaks) >= MAX_RUNS:
        return None
    return np.concatenate(([0], breaks)).astype(np.int64)


# ---------------------------------------------------------------------- persistence


def _bitmap_key(name: bytes, chunk: int) -> bytes:
    return b"b" + SEP + name + b"\x00" + u32(chunk)


def _column_key(name: bytes, chunk: int) -> bytes:
    return b"c" + SEP + name + b"\x00" + u32(chunk)


def _value_name(store: Store, txn: Txn, fname: str, value: Any, kind: bytes = b"v") -> bytes:
    raw = orjson.dumps(value)
    name = kind + SEP + fname.encode() + SEP + raw
    if len(name) <= MAX_NAME:
        return name
    digest = b"#" + hashlib.blake2b(name, digest_size=20).hexdigest().encode()
    store.put(txn, "orders", b"n" + SEP + digest, name)
    return digest


def _exists_name(fname: str, kind: bytes = b"x") -> bytes:
    return kind + SEP + fname.encode()


def _put_bitmap(store: Store, txn: Txn, name: bytes, bitmap: BitMap,
                chunks: Iterable[int]) -> None:
    for chunk in chunks:
        part = bitmap & chunk_mask(chunk)
        key = _bitmap_key(name, chunk)
        if part:
            part.run_optimize()
            store.put(txn, "orders", key, part.serialize())
        else:
            store.delete(txn, "orders", key)


def _put_column(store: Store, txn: Txn, name: bytes, data: np.ndarray,
                valid: np.ndarray | None, count: int, chunks: Iterable[int]) -> None:
    for chunk in chunks:
        a, b = chunk << COL_BITS, min(count, (chunk + 1) << COL_BITS)
        if a >= b:
            continue
        raw = data[a:b].tobytes()
        if valid is not None:
            raw += valid[a:b].astype(np.uint8).tobytes()
        store.put(txn, "orders", _column_key(name, chunk), raw)


def _dirty_chunks(ids: np.ndarray) -> list[int]:
    return np.unique(ids.astype(np.int64) >> COL_BITS).tolist() if len(ids) else []


def load_orders(store: Store, txn: Txn, schema: Schema) -> OrderIndex:
    """Rebuild the OrderIndex from the "orders" db alone: owner, ts and item owners now,
    field columns when first used (through the reader the index is then pinned to)."""
    meta_raw = store.get(txn, "orders", b"meta")
    if meta_raw is None:
        return OrderIndex()
    meta = orjson.loads(meta_raw)
    count, item_count = meta["count"], meta["items"]
    names: set[bytes] = {bytes(key[2:-5]) for key in store.keys(txn, "orders", b"c" + SEP)}

    def plain(name: bytes, n: int, dtype: Any) -> np.ndarray:
        return _assemble(lambda key: store.get(txn, "orders", key), name, n, dtype, False)[0]

    owner = plain(b"owner", count, np.uint32)
    ts = plain(b"ts", count, np.int64)
    item_owner = plain(b"item_owner", item_count, np.uint32)
    fields = {b"o": {}, b"i": {}}
    for name in names:
        kind, _, fname = name.partition(SEP)
        if kind in fields:
            fields[kind][fname.decode()] = None
    columns = Columns(b"o", count, fields[b"o"])  # readable once pinned to a reader
    item_columns = Columns(b"i", item_count, fields[b"i"])
    # bitmaps
    parts: dict[bytes, list[BitMap]] = {}
    for key, value in store.items(txn, "orders", b"b" + SEP):
        parts.setdefault(bytes(key[2:-5]), []).append(BitMap.deserialize(value))
    live = EMPTY
    values: dict[str, dict[Any, BitMap]] = {}
    exists: dict[str, BitMap] = {}
    item_values: dict[str, dict[Any, BitMap]] = {}  # kinds w / y: per item (ITEM_KINDS)
    item_exists: dict[str, BitMap] = {}
    for name, chunks in parts.items():
        bitmap = BitMap.union(*chunks)
        if name.startswith(b"#"):
            name = bytes(store.get(txn, "orders", b"n" + SEP + name))
        kind, _, rest = name.partition(SEP)
        if name == b"live":
            live = bitmap
        elif kind == b"x":
            exists[rest.decode()] = bitmap
        elif kind == b"v":
            fname, _, raw = rest.partition(SEP)
            values.setdefault(fname.decode(), {})[orjson.loads(raw)] = bitmap
        elif kind == ITEM_KINDS[1]:
            item_exists[rest.decode()] = bitmap
        elif kind == ITEM_KINDS[0]:
            fname, _, raw = rest.partition(SEP)
            item_values.setdefault(fname.decode(), {})[orjson.loads(raw)] = bitmap
    value_indexes = {name: ValueIndex(values.get(name, {}), bitmap)
                     for name, bitmap in exists.items()}
    item_indexes = {name: ValueIndex(item_values.get(name, {}), bitmap)
                    for name, bitmap in item_exists.items()}
    return OrderIndex(count, item_count, live, owner, ts, compute_runs(ts), value_indexes,
                      columns, item_owner, item_columns, item_values=item_indexes,
                      items_indexed=bool(meta.get("item_values")))


def index_items(store: Store, txn: Txn, index: OrderIndex, schema: Schema) -> OrderIndex:
    """For a store written before item_values existed: build them once from the stored
    rows (in the caller's write transaction) and mark the store as indexed."""
    batch = OrderBatch(store, txn, index, schema, lambda external: 0)
    batch.reindexing = True
    for key, raw in store.items(txn, "orders", b"r" + SEP):
        oid = from_u32(bytes(key[2:]))
        row = orjson.loads(raw)
        if row.get("it") and index.item_owner[row["i0"]] == oid:
            batch.queue_item_values(row["i0"], row["it"], removing=False)
    return batch.finish()[0]


# ---------------------------------------------------------------------- batches


class _Values:
    """Queued additions and removals of one value-typed field (flushed in order)."""

    __slots__ = ("codes", "values", "add_ids", "add_codes", "rm_ids", "rm_codes")

    def __init__(self) -> None:
        self.codes: dict[Any, int] = {}
        self.values: list = []
        self.clear()

    def clear(self) -> None:
        self.add_ids, self.add_codes = array("I"), array("I")
        self.rm_ids, self.rm_codes = array("I"), array("I")

    def push(self, oid: int, items: Iterable, removing: bool) -> None:
        ids, codes = (self.rm_ids, self.rm_codes) if removing else (self.add_ids, self.add_codes)
        for item in items:
            code = self.codes.get(item)
            if code is None:
                code = self.codes[item] = len(self.codes)
                self.values.append(item)
            ids.append(oid)
            codes.append(code)


class _Sets:
    """Queued writes to one column: (id, key, valid); the last write of an id wins."""

    __slots__ = ("ids", "keys", "valid")

    def __init__(self) -> None:
        self.ids, self.keys, self.valid = array("I"), array("q"), array("b")

    def set(self, i: int, key: int, valid: bool = True) -> None:
        self.ids.append(i)
        self.keys.append(key)
        self.valid.append(valid)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ids = np.frombuffer(self.ids, dtype=np.uint32)
        keys = np.frombuffer(self.keys, dtype=np.int64)
        valid = np.frombuffer(self.valid, dtype=np.int8).astype(bool)
        if len(ids) > 1 and not (ids[1:] > ids[:-1]).all():  # keep each id's last write
            rev = ids[::-1]
            _, first = np.unique(rev, return_index=True)
            pick = len(ids) - 1 - first
            ids, keys, valid = ids[pick], keys[pick], valid[pick]
        return ids, keys, valid


def _grow(buf: np.ndarray, old: int, new: int, copy: bool, default: Any) -> np.ndarray:
    """A buffer holding ids 0 … new-1: reuses buf when only appending within its capacity,
    else a copy (with spare capacity); ids old … new-1 are reset to default."""
    if copy or new > len(buf):
        cap = max(new, len(buf)) if not new > len(buf) else max(new, len(buf) * 3 // 2 + 1024)
        fresh = np.empty(cap, dtype=buf.dtype)
        fresh[:old] = buf[:old]
        buf = fresh
    buf[old:new] = default
    return buf


def _as_tuple(value: Any) -> tuple:
    return value if isinstance(value, tuple) else (value,)


class OrderBatch:
    """Applies order lines inside one write transaction (see the module docstring)."""

    def __init__(self, store: Store, txn: Txn, index: OrderIndex, schema: Schema,
                 ensure_profile: Callable[[str], int]) -> None:
        self.store = store
        self.txn = txn
        self.index = index
        self.schema = schema
        self.ensure_profile = ensure_profile
        self.types: dict[str, str] = dict(schema.orders)
        self.new_types: dict[str, str] = {}
        self.next = index.count
        self.next_item = index.item_count
        self.segment_start = index.count  # ids created at or after this: in the open segment
        self.touched_old: set[int] = set()  # older ids touched in the open segment
        self.pending: dict[str, _Values] = {}
        self.writers: dict[str, ValueWriter] = {}
        self.touched_values = BitMap()  # order ids whose value bitmaps changed
        self.item_pending: dict[str, _Values] = {}  # value-typed item keys, per item id
        self.item_writers: dict[str, ValueWriter] = {}
        self.touched_item_values = BitMap()
        self.reindexing = False  # index_items: every stored item is being queued
        self.sets: dict[str, _Sets] = {}  # order columns: "owner", "ts", fields, derived
        self.item_sets: dict[str, _Sets] = {}  # item columns: "item_owner", item fields
        self.killed_items = array("I")
        self.live_added = array("I")
        self.live_removed = BitMap()
        self.created = 0
        self.updated = 0
        self._sinks: dict[str, tuple[bool, Any, str]] = {}
        self._item_sinks: dict[str, tuple[_Sets, str] | None] = {}
        self._owner, self._ts = self._sets("owner"), self._sets("ts")
        self._item_owner = self._item_sets("item_owner")

    @property
    def count(self) -> int:
        """Order lines applied so far (created + updated)."""
        return self.created + self.updated

    # ------------------------------------------------------------------ records
    def add(self, record: Any, line: int | None = None) -> None:
        """One order line; DataError(reason, field=…) if it does not fit."""
        if not isinstance(record, dict):
            raise DataError("expected a JSON object")
        external = _external_id(record.get("id"), "id", "order")
        profile = _external_id(record.get("profile"), "profile", "profile")
        if record.get("ts") is None:
            raise DataError("ts is required", field="ts")
        ts = self._check(T.TIMESTAMP, record["ts"], "ts")
        given: dict[str, Any] = {}
        for name, value in record.items():
            if name in RESERVED:
                continue
            if name.startswith("items."):
                raise DataError("order fields must not start with 'items.' (item keys are "
                                "given in the items list)", field=name)
            if value is None:
                given[name] = None
                continue
            given[name] = self._value(name, value)
        items = None
        if "items" in record:
            items = self._items(record["items"])

        oid, fresh = self._resolve(external)
        pid = self.ensure_profile(profile)
        old = None if fresh else self._row(oid)
        if not fresh and (oid >= self.segment_start or oid in self.touched_old):
            self.flush()
        new_fields = dict(old["f"]) if old else {}
        for name, value in given.items():
            if value is None:
                new_fields.pop(name, None)
            else:
                new_fields[name] = value
        row: dict[str, Any] = {"x": external, "p": pid, "t": ts, "f": new_fields}
        if items is None and old is not None:
            row["it"], row["i0"] = old.get("it", []), old.get("i0", 0)
        else:
            row["it"], row["i0"] = items or [], self.next_item
        self.store.put(self.txn, "orders", b"r" + SEP + u32(oid), _dump(row))
        if fresh:
            self.created += 1
            self.live_added.append(oid)
        else:
            self.updated += 1
        if oid < self.segment_start:
            self.touched_old.add(oid)
        self._queue(oid, old, row, items is not None or old is None)

    def add_block(self, block: RowBlock) -> Taken:
        """Order lines of a RowBlock, column-wise where they are the common case
        (index/order_blocks.py); the rows it leaves go through add()."""
        return take_block(self, block)

    def drop_profiles(self, gone: BitMap) -> None:
        """Delete every order of these profiles (when the profiles are deleted).  Orders
        added earlier in the same batch are not seen: call it in a batch of its own."""
        self.flush()
        index = self.index
        if not gone or not index.count:
            return
        mine = np.isin(index.owner, ids_of(gone))
        found = bitmap_of(np.flatnonzero(mine)) & index.live
        found.difference_update(self.live_removed)
        for oid in found:
            row = self._row(oid)
            if row is None:
                continue
            self.store.delete(self.txn, "orders", b"r" + SEP + u32(oid))
            self.store.delete(self.txn, "orders", b"i" + SEP + row["x"].encode())
            self._queue(oid, row, None, True)
        self.live_removed |= found
        self.flush()

    def _resolve(self, external: str) -> tuple[int, bool]:
        key = b"i" + SEP + external.encode()
        got = self.store.get(self.txn, "orders", key)
        if got is not None:
            return from_u32(got), False
        if self.next >= 2**32 - 1:
            raise OverflowError("the store holds 2**32 - 1 orders, its limit")
        oid = self.next
        self.next += 1
        self.store.put(self.txn, "orders", key, u32(oid))
        return oid, True

    def _row(self, oid: int) -> dict[str, Any] | None:
        raw = self.store.get(self.txn, "orders", b"r" + SEP + u32(oid))
        if raw is None:
            return None
        row = orjson.loads(raw)
        for name, value in row["f"].items():
            if isinstance(value, list):
                row["f"][name] = tuple(value)
        for item in row.get("it", ()):
            for key, value in item.items():
                if isinstance(value, list):
                    item[key] = tuple(value)
        return row

    # ------------------------------------------------------------------ checking
    def _check(self, type_: str, value: Any, name: str, where: str = "") -> Any:
        try:
            canonical = T.coerce(type_, value)
            if type_ == T.FLOAT:
                T.float_key(canonical)  # order values are kept at the fixed float scale
            return canonical
        except ValueError as exc:
            raise DataError(where + str(exc), field=name) from None

    def _type(self, name: str, value: Any) -> str:
        type_ = self.types.get(name)
        if type_ is None:
            problem = T.name_problem(name)
            if problem:
                raise DataError(f"field names {problem}", field=str(name)[:100])
            try:
                type_ = T.infer(value)
            except ValueError as exc:
                raise DataError(str(exc), field=name) from None
            self.types[name] = self.new_types[name] = type_
        return type_

    def _value(self, name: str, value: Any, where: str = "") -> Any:
        return self._check(self._type(name, value), value, name, where)

    def _items(self, items: Any) -> list[dict[str, Any]]:
        if items is None:
            return []
        if not isinstance(items, list):
            raise DataError("expected a list of item objects", field="items")
        out = []
        for position, item in enumerate(items, 1):
            if not isinstance(item, dict):
                raise DataError(f"item {position}: expected an object", field="items")
            canonical = {}
            for key, value in item.items():
                name = "items." + key
                if key in ITEM_RESERVED:
                    raise DataError(f"item key {key!r} is reserved ({name} is derived)",
                                    field=name)
                if value is None:
                    continue
                canonical[key] = self._value(name, value, f"item {position}: ")
            out.append(canonical)
        return out

    # ------------------------------------------------------------------ queueing
    def _view(self, row: dict[str, Any] | None) -> dict[str, Any]:
        """Everything order-level that the indexes keep, by field name."""
        if row is None:
            return {}
        view = dict(row["f"])
        items = row.get("it", ())
        multi: dict[str, set] = {}
        qty_numeric = self.types.get(QTY) in (T.INT, T.FLOAT)
        qty_sum, skus, no_sku = 0, set(), 0
        for item in items:
            for key, value in item.items():
                name = "items." + key
                if self.types[name] in T.VALUE_TYPES:
                    multi.setdefault(name, set()).update(_as_tuple(value))
            if qty_numeric and "qty" in item:
                qty = item["qty"]
                qty_sum += T.float_key(qty) if isinstance(qty, float) else qty * T.FLOAT_SCALE
            if "sku" in item:
                skus.add(item["sku"])
            else:
                no_sku += 1
        if not -T.MAX_KEY < qty_sum < T.MAX_KEY:
            raise DataError("the sum of item quantities is out of range", field=QTY)
        for name, found in multi.items():
            view[name] = tuple(sorted(found))
        view[QTY_SUM] = qty_sum
        view[DISTINCT] = len(skus) + no_sku
        return view

    def _queue(self, oid: int, old: dict | None, new: dict | None, items_changed: bool) -> None:
        if new is not None:
            if old is None or old["p"] != new["p"]:
                self._owner.set(oid, new["p"])
            if old is None or old["t"] != new["t"]:
                self._ts.set(oid, new["t"])
        before = self._view(old) if old is not None else {}
        after = self._view(new) if new is not None else {}
        for name in (before.keys() | after.keys()) if before else after:
            a, b = before.get(name), after.get(name)
            if a == b:
                continue
            is_value, target, type_ = self._sink(name)
            if is_value:
                if a is not None:
                    target.push(oid, _as_tuple(a), True)
                if b is not None:
                    target.push(oid, _as_tuple(b), False)
            elif b is None:
                target.set(oid, 0, False)
            else:
                target.set(oid, _key(type_, b))
        if items_changed:
            if old is not None and old.get("it"):
                first = old["i0"]
                self.killed_items.extend(range(first, first + len(old["it"])))
                self.queue_item_values(first, old["it"], removing=True)
            if new is not None and new["it"]:
                self.queue_item_values(self.next_item, new["it"], removing=False)
                item_owner = self._item_owner
                for item in new["it"]:
                    iid = self.next_item
                    self.next_item += 1
                    item_owner.set(iid, oid)
                    for key, value in item.items():
                        sink = self._item_sink(key)
                        if sink is not None:
                            sink[0].set(iid, _key(sink[1], value))

    def queue_item_values(self, first: int, items: list, removing: bool) -> None:
        """Queue the value-typed keys of items first, first+1, … for the per-item bitmaps."""
        for iid, item in enumerate(items, first):
            for key, value in item.items():
                name = "items." + key
                if self.types[name] in T.VALUE_TYPES:
                    pending = self.item_pending.setdefault(name, _Values())
                    pending.push(iid, _as_tuple(value), removing)

    def _sink(self, name: str) -> tuple[bool, Any, str]:
        """Where changes of an order-level name go: (is a value field, queue, type)."""
        sink = self._sinks.get(name)
        if sink is None:
            type_ = T.INT if name in DERIVED else self.types[name]
            if type_ in T.VALUE_TYPES:
                sink = (True, self.pending.setdefault(name, _Values()), type_)
            else:
                sink = (False, self._sets("f:" + name), type_)
            self._sinks[name] = sink
        return sink

    def _item_sink(self, key: str) -> tuple[_Sets, str] | None:
        """The item column of a numeric / date item key (None for value-typed keys)."""
        if key in self._item_sinks:
            return self._item_sinks[key]
        name = "items." + key
        type_ = self.types[name]
        sink = (self._item_sets("g:" + name), type_) if type_ in T.RANGE_TYPES else None
        self._item_sinks[key] = sink
        return sink

    def _sets(self, name: str) -> _Sets:
        found = self.sets.get(name)
        if found is None:
            found = self.sets[name] = _Sets()
        return found

    def _item_sets(self, name: str) -> _Sets:
        found = self.item_sets.get(name)
        if found is None:
            found = self.item_sets[name] = _Sets()
        return found

    # ------------------------------------------------------------------ flushing
    def flush(self) -> None:
        """Apply the queued value changes to the bitmap writers."""
        for name, pending in self.pending.items():
            if not pending.add_ids and not pending.rm_ids:
                continue
            writer = self.writers.get(name)
            if writer is None:
                writer = self.writers[name] = ValueWriter(self.index.values.get(name)
                                                          or ValueIndex())
            rm_ids = np.frombuffer(pending.rm_ids, dtype=np.uint32)
            add_ids = np.frombuffer(pending.add_ids, dtype=np.uint32)
            if len(rm_ids):
                self.touched_values |= bitmap_of(rm_ids)
                writer.remove(rm_ids, np.frombuffer(pending.rm_codes, dtype=np.uint32),
                              pending.values)
            if len(add_ids):
                self.touched_values |= bitmap_of(add_ids)
                writer.add(add_ids, np.frombuffer(pending.add_codes, dtype=np.uint32),
                           pending.values)
            pending.clear()
        for name, pending in self.item_pending.items():
            if not pending.add_ids and not pending.rm_ids:
                continue
            writer = self.item_writers.get(name)
            if writer is None:
                writer = self.item_writers[name] = ValueWriter(
                    self.index.item_values.get(name) or ValueIndex())
            for removing, ids, codes in ((True, pending.rm_ids, pending.rm_codes),
                                         (False, pending.add_ids, pending.add_codes)):
                if ids:
                    id_arr = np.frombuffer(ids, dtype=np.uint32)
                    self.touched_item_values |= bitmap_of(id_arr)
                    apply = writer.remove if removing else writer.add
                    apply(id_arr, np.frombuffer(codes, dtype=np.uint32), pending.values)
            pending.clear()
        self.segment_start = self.next
        self.touched_old = set()

    def finish(self) -> tuple[OrderIndex, Schema]:
        """Write every change into the transaction; the next index and schema."""
        self.flush()
        store, txn, old = self.store, self.txn, self.index
        schema = self.schema
        if self.new_types:
            schema = schema.with_fields("orders", self.new_types)
        count, item_count = self.next, self.next_item
        # live
        added = bitmap_of(np.frombuffer(self.live_added, dtype=np.uint32))
        live = (old.live | added) - self.live_removed
        _put_bitmap(store, txn, b"live", live, chunks_of(added | self.live_removed))
        # value bitmaps
        values = dict(old.values)
        chunks = chunks_of(self.touched_values)
        for name, writer in self.writers.items():
            index = values[name] = writer.finish()
            for value in writer.dirty:
                _put_bitmap(store, txn, _value_name(store, txn, name, value), index.eq(value),
                            chunks)
            _put_bitmap(store, txn, _exists_name(name), index.exists, chunks)
        values = {k: v for k, v in values.items() if v.exists or v.values}
        item_values = dict(old.item_values)
        chunks = chunks_of(self.touched_item_values)
        for name, writer in self.item_writers.items():
            index = item_values[name] = writer.finish()
            for value in writer.dirty:
                _put_bitmap(store, txn, _value_name(store, txn, name, value, ITEM_KINDS[0]),
                            index.eq(value), chunks)
            _put_bitmap(store, txn, _exists_name(name, ITEM_KINDS[1]), index.exists, chunks)
        item_values = {k: v for k, v in item_values.items() if v.exists or v.values}
        # order columns
        owner_buf = self._plain(b"owner", old.owner_buf, old.count, count,
                                self.sets.get("owner"), 0)
        ts_buf = self._plain(b"ts", old.ts_buf, old.count, count, self.sets.get("ts"), 0)
        columns = self._columns(b"o", old.columns, "f:", self.sets, old.count, count, NO_IDS)
        # item columns
        killed = np.frombuffer(self.killed_items, dtype=np.uint32)
        item_owner_buf = self._plain(b"item_owner", old.item_owner_buf, old.item_count,
                                     item_count, self.item_sets.get("item_owner"), NONE, killed)
        item_columns = self._columns(b"i", old.item_columns, "g:", self.item_sets,
                                     old.item_count, item_count, killed)
        indexed = old.items_indexed or self.reindexing or not any(
            name.startswith("items.") and type_ in T.VALUE_TYPES
            for name, type_ in self.schema.orders.items())  # else: old items lack them
        store.put(txn, "orders", b"meta", orjson.dumps({"count": count, "items": item_count,
                                                        "item_values": indexed}))
        runs = self._runs(ts_buf[:count])
        index = OrderIndex(count, item_count, live, owner_buf, ts_buf, runs, values, columns,
                           item_owner_buf, item_columns, item_values=item_values,
                           items_indexed=indexed)
        return index, schema

    def _columns(self, kind: bytes, old: Columns, prefix: str, sets: dict[str, _Sets],
                 old_rows: int, rows: int, kills: np.ndarray) -> Columns:
        """The next key columns of one kind: the changed ones rebuilt, those this batch
        leaves alone and nobody has read yet still left in LMDB."""
        names = {n[len(prefix):] for n in sets if n.startswith(prefix)}
        kills_old = bool((kills < old_rows).any()) if len(kills) else False
        entries: dict[str, Column | None] = {}
        for name in names | set(old):
            if name not in names and not kills_old and not old.loaded(name):
                entries[name] = None
                continue
            entries[name] = self._column(kind + SEP + name.encode(), old.get(name),
                                         old_rows, rows, sets.get(prefix + name), kills)
        return Columns(kind, rows, entries, TxnReader(self.store, self.txn))

    def _runs(self, ts: np.ndarray) -> np.ndarray | None:
        """The runs of the new ts column; when only appended, from the old runs."""
        old = self.index
        ts_ids = np.frombuffer(self._ts.ids, dtype=np.uint32)
        if _below(ts_ids, old.count) or old.runs is None or not old.count:
            return compute_runs(ts)
        if len(ts) == old.count:
            return old.runs
        tail = ts[old.count - 1:]
        breaks = np.flatnonzero(tail[1:] < tail[:-1]) + old.count
        if len(old.runs) + len(breaks) > MAX_RUNS:
            return None
        return np.concatenate((old.runs, breaks)).astype(np.int64)

    def _plain(self, name: bytes, buf: np.ndarray, old: int, new: int, sets: _Sets | None,
               default: Any, kills: np.ndarray = None) -> np.ndarray:
        """owner / ts / item_owner: apply the queued writes (then the kills), persist."""
        ids, keys, _ = sets.arrays() if sets else (NO_IDS, NO_KEYS, None)
        kills = NO_IDS if kills is None else kills
        if not len(ids) and not len(kills) and old == new:
            return buf
        copy = _below(ids, old) or _below(kills, old)
        buf = _grow(buf, old, new, copy, default)
        buf[ids] = keys.astype(buf.dtype)
        if len(kills):
            buf[kills] = NONE
        dirty = sorted(set(_dirty_chunks(ids)) | set(_dirty_chunks(kills[kills < old])))
        _put_column(self.store, self.txn, name, buf, None, new, dirty)
        return buf

    def _column(self, name: bytes, col: Column | None, old: int, new: int, sets: _Sets | None,
                kills: np.ndarray) -> Column:
        """A key column: apply the queued writes, then invalidate the killed ids; persist."""
        if col is None:  # a new field: no values before this batch
            col = Column(np.zeros(old, dtype=np.int64), np.zeros(old, dtype=bool))
        ids, keys, valid = sets.arrays() if sets else (NO_IDS, NO_KEYS, NO_VALID)
        old_kills = kills[kills < old]
        old_kills = old_kills[col.valid[old_kills]]  # only those that had a value
        kills = np.concatenate((old_kills, kills[kills >= old]))
        if not len(ids) and not len(old_kills) and old == new:
            return col
        copy = _below(ids, old) or len(old_kills) > 0
        keys_buf = _grow(col.keys, old, new, copy, 0)
        valid_buf = _grow(col.valid, old, new, copy, False)
        keys_buf[ids] = np.where(valid, keys, 0)
        valid_buf[ids] = valid
        keys_buf[kills] = 0
        valid_buf[kills] = False
        dirty = sorted(set(_dirty_chunks(ids)) | set(_dirty_chunks(old_kills)))
        _put_column(self.store, self.txn, name, keys_buf, valid_buf, new, dirty)
        bound = max(col.bound, int(np.abs(keys).max(initial=0)))
        return Column(keys_buf, valid_buf, bound, bool(valid_buf[:new].all()))


def _dump(row: dict[str, Any]) -> bytes:
    """An order's stored row: keys sorted at every level, so the bulk path, which has
    columns and not the line's key order, writes the same bytes (order_blocks.py)."""
    return orjson.dumps(row, option=orjson.OPT_SORT_KEYS)


def _below(ids: np.ndarray, old: int) -> bool:
    return bool(len(ids)) and int(ids.min()) < old


def _external_id(value: Any, field_name: str, what: str) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value:
        raise DataError(f"expected a non-empty string or integer {what} id", field=field_name)
    if len(value.encode()) > MAX_ID_BYTES:
        raise DataError(f"{what} ids are at most {MAX_ID_BYTES} bytes", field=field_name)
    return value


def _key(type_: str, value: Any) -> int:
    return T.float_key(value) if type_ == T.FLOAT else value


# ---------------------------------------------------------------------- evaluation


def _scaled(value: Any, factor: int) -> Any:
    if factor == 1 or value is None:
        return value
    if isinstance(value, tuple):
        return tuple(_scaled(v, factor) for v in value)
    return value * factor


class _Selector:
    """Evaluates the `orders` part of a rule to a bitmap of live order ids."""

    def __init__(self, index: OrderIndex, as_of_us: int) -> None:
        self.index = index
        self.as_of = as_of_us
        self.live = index.live
        self._alive_items: np.ndarray | None = None

    def bitmap(self, rule: Rule) -> BitMap:
        if isinstance(rule, Cond):
            return self._cond(rule)
        if isinstance(rule, And):
            positives = [self.bitmap(c) for c in rule.children if not isinstance(c, Not)]
            negatives = [self.bitmap(c.child) for c in rule.children if isinstance(c, Not)]
            positives.sort(key=len)
            result = positives[0] if positives else self.live
            for other in positives[1:]:
                result = result & other
            for other in negatives:
                result = result - other
            return result
        if isinstance(rule, Or):
            return BitMap.union(*(self.bitmap(c) for c in rule.children))
        if isinstance(rule, Not):
            return self.live - self.bitmap(rule.child)
        if isinstance(rule, All):
            return self.live
        raise TypeError(f"not an orders rule: {rule!r}")

    # -- conditions
    def _cond(self, cond: Cond) -> BitMap:
        name = cond.field
        if name == "ts":
            return self._ts(cond)
        if name == QTY_EACH:
            return self._each(cond)
        if cond.type in T.VALUE_TYPES:
            return self._value(cond, self.index.values.get(name) or ValueIndex())
        if name.startswith("items.") and name not in DERIVED:
            return self._any_item(cond)
        col = self.index.column(name)
        factor = SCALE.get(name, 1)
        if col is None:
            return self.live if cond.op == "not_exists" else EMPTY
        keys, valid = col
        if cond.op == "exists":
            return _bits(valid)
        if cond.op == "not_exists":
            return self.live - _bits(valid)
        return _bits(valid & self._holds(cond, keys, factor))

    def _value(self, cond: Cond, index: ValueIndex) -> BitMap:
        return index.select(cond.op, cond.value, self.live)

    def _resolve(self, cond: Cond, value: Any) -> Any:
        if isinstance(value, tuple):
            return tuple(self._resolve(cond, v) for v in value)
        if not isinstance(value, DaysAgo):
            return value
        moment = self.as_of - value.days * T.US_PER_DAY
        return moment // T.US_PER_DAY if cond.type == T.DATE else moment

    def _holds(self, cond: Cond, keys: np.ndarray, factor: int = 1) -> np.ndarray:
        """The per-row truth of a comparison op (eq, ne, in, not_in, gt…, between,
        anniversary_in) on keys; validity is the caller's."""
        op = cond.op
        value = _scaled(self._resolve(cond, cond.value), factor)
        if op == "anniversary_in":
            from bitseg.index.evaluate import anniversary_month_days
            wanted = np.array(sorted(anniversary_month_days(self.as_of, value)), dtype=np.int64)
            return np.isin(month_days(cond.type, keys), wanted)
        if op in ("in", "not_in"):
            exact = [int(v) for v in map(Fraction, value)
                     if v.denominator == 1 and I64_MIN <= v <= I64_MAX]
            hit = np.isin(keys, np.array(exact, dtype=np.int64))
            return hit if op == "in" else ~hit
        return compare(keys, op, value)

    def _ts(self, cond: Cond) -> BitMap:
        op = cond.op
        if op == "exists":
            return self.live
        if op == "not_exists":
            return EMPTY
        value = self._resolve(cond, cond.value)
        bounds = {"gt": lambda v: (v + 1, None), "gte": lambda v: (v, None),
                  "lt": lambda v: (None, v), "lte": lambda v: (None, v + 1),
                  "eq": lambda v: (v, v + 1), "between": lambda v: (v[0], v[1] + 1)}.get(op)
        if bounds is not None:
            return self.live & ts_range(self.index, *bounds(value))
        return self.live & _bits(self._holds(cond, self.index.ts))

    def _items_alive(self) -> np.ndarray:
        if self._alive_items is None:
            self._alive_items = self.index.item_owner != NONE
        return self._alive_items

    def _project(self, item_mask: np.ndarray) -> BitMap:
        return bitmap_of(self.index.item_owner[np.flatnonzero(item_mask)])

    def _any_item(self, cond: Cond) -> BitMap:
        col = self.index.item_column(cond.field)
        op = cond.op
        if col is None:
            return self.live if op == "not_exists" else EMPTY
        keys, valid = col
        if op == "exists":
            return self._project(valid)
        if op == "not_exists":
            return self.live - self._project(valid)
        if op in ("ne", "not_in"):  # like keywords: has the field, and no item has the value
            positive = Cond(cond.field, cond.type, "eq" if op == "ne" else "in", cond.value)
            return self._project(valid) - self._project(valid & self._holds(positive, keys))
        return self._project(valid & self._holds(cond, keys))

    def _each(self, cond: Cond) -> BitMap:
        """Orders with items, every one of which satisfies the op on its qty."""
        alive = self._items_alive()
        with_items = self._project(alive)
        col = self.index.item_column(QTY)
        if col is None:
            keys = np.zeros(self.index.item_count, dtype=np.int64)
            valid = np.zeros(self.index.item_count, dtype=bool)
        else:
            keys, valid = col
        op = cond.op
        if op == "exists":
            ok = valid
        elif op == "not_exists":
            ok = ~valid
        else:
            ok = valid & self._holds(cond, keys)
        return with_items - self._project(alive & ~ok)


def _bits(mask: np.ndarray) -> BitMap:
    return bitmap_of(np.flatnonzero(mask))


def ts_range(index: OrderIndex, lo: int | None, hi: int | None) -> BitMap:
    """Order ids (live or not) with lo <= ts < hi (None: unbounded)."""
    lo = I64_MIN if lo is None else lo
    hi = I64_MAX if hi is None else hi
    ts = index.ts
    if lo >= hi or not len(ts):
        return EMPTY
    runs = index.runs
    if runs is None:
        return _bits((ts >= lo) & (ts < hi))
    ends = np.append(runs[1:], len(ts))
    first, last = ts[runs], ts[ends - 1]
    result = BitMap()
    overlapping = np.flatnonzero((last >= lo) & (first < hi))
    for r in overlapping.tolist():
        s, e = int(runs[r]), int(ends[r])
        a = s if first[r] >= lo else s + int(np.searchsorted(ts[s:e], lo, "left"))
        b = e if last[r] < hi else s + int(np.searchsorted(ts[s:e], hi, "left"))
        if a < b:
            result.add_range(a, b)
    return result


def select_orders(cond: OrdersCond, index: OrderIndex, as_of_us: int) -> np.ndarray:
    """The ids of the live orders matching the rule and window (sorted uint32)."""
    rows = _Selector(index, as_of_us).bitmap(cond.orders)
    if not rows:
        return _empty(np.uint32)
    lo, hi = cond.window.bounds(as_of_us)
    if index.runs is not None:
        return ids_of(rows & ts_range(index, lo, hi))
    ids = ids_of(rows)
    t = index.ts_buf[ids]
    mask = t < hi if lo is None else (t >= lo) & (t < hi)
    return ids[mask]


def evaluate_orders(cond: OrdersCond, index: OrderIndex, live: BitMap,
                    as_of_us: int) -> BitMap:
    """The live profiles for which the orders rule holds."""
    having = cond.having
    if having.agg in RECENCY_AGGS and isinstance(cond.orders, All):
        found = recency_of_all(cond, index, as_of_us)
        if found is not None:
            return found & live
    sel = select_orders(cond, index, as_of_us)
    if not len(sel):
        return live if having.holds_for_no_rows() else EMPTY
    everything = len(sel) == index.count  # sel is sorted and distinct: then it is all ids
    groups = Groups(index.owner if everything else index.owner_buf[sel])
    if having.agg == "count":
        ok = compare(groups.counts, having.op, having.value)
    elif having.agg in RECENCY_AGGS:
        ok = _recency(having, index, sel, everything, groups, as_of_us)
    else:
        ok = _aggregate(having, index, sel, everything, groups)
    if having.holds_for_no_rows():
        return live - groups.profiles(groups.has & ~ok)
    if having.agg == "sum" and not groups.sparse or having.agg in RECENCY_AGGS:
        # a profile without rows has sum 0 here, which fails the op; _recency masks by
        # has itself: ok implies has, and no bincount of the rows is needed
        return groups.profiles(ok) & live
    return groups.profiles(groups.has & ok) & live


def _aggregate(having: Any, index: OrderIndex, sel: np.ndarray, everything: bool,
               groups: Groups) -> np.ndarray:
    """Per group: whether sum/avg/min/max of `of` satisfies the op."""
    op, agg = having.op, having.agg
    value = _scaled(having.value, SCALE.get(having.of, 1))
    col = index.columns.get(having.of)
    if col is None:
        zeros = np.zeros(groups.size, dtype=np.int64)
        return compare(zeros, op, value) if agg == "sum" else zeros.astype(bool)
    keys = col.keys[:index.count] if everything else col.keys[sel]
    complete = col.complete
    if not complete:
        valid = col.valid[:index.count] if everything else col.valid[sel]
        complete = bool(valid.all())
    if agg == "sum":
        if col.bound * len(keys) >= 2**63 and \
                col.bound * int(groups.counts.max(initial=0)) >= 2**63:  # could overflow
            keys = keys.astype(object)  # exact Python ints
        return compare(groups.reduce(np.add, keys if complete else np.where(valid, keys, 0),
                                      0), op, value)
    n = groups.counts if complete else groups.reduce(np.add, valid.astype(np.int64), 0)
    if agg == "avg":
        if col.bound * int(n.max(initial=0)) >= 2**63:  # could overflow: exact Python ints
            keys = keys.astype(object)
        sums = groups.reduce(np.add, keys if complete else np.where(valid, keys, 0), 0)
        return (n > 0) & compare_avg(sums, n, op, value)
    fill = I64_MAX if agg == "min" else I64_MIN
    ufunc = np.minimum if agg == "min" else np.maximum
    extreme = groups.reduce(ufunc, keys if complete else np.where(valid, keys, fill), fill)
    return (n > 0) & compare(extreme, op, value)


def _recency(having: Any, index: OrderIndex, sel: np.ndarray, everything: bool,
             groups: Groups, as_of_us: int) -> np.ndarray:
    """Per group: whether it has rows and the earliest (first) / latest (last) order ts
    satisfies the op (index/recency.py)."""
    ts = index.ts if everything else index.ts_buf[sel]
    first = having.agg == "first"
    fill = NO_FIRST if first else NO_LAST  # no row ts is either
    extreme = groups.reduce(np.minimum if first else np.maximum, ts, fill)
    ok = holds(extreme, having.op, resolved(having, as_of_us))
    return ok if groups.sparse else ok & (extreme != fill)


class _Extremes:
    """Each profile's earliest and latest live order ts, by profile id (NO_FIRST /
    NO_LAST: none; 8 bytes per profile id each, made on first use), and the earliest
    and latest of all live orders."""

    __slots__ = ("_owner", "_ts", "_per_profile", "earliest", "latest")

    def __init__(self, owner: np.ndarray, ts: np.ndarray) -> None:
        self._owner, self._ts = owner, ts
        self._per_profile: dict[str, np.ndarray] = {}
        self.earliest, self.latest = int(ts.min()), int(ts.max())

    def per_profile(self, agg: str) -> np.ndarray:
        found = self._per_profile.get(agg)
        if found is None:
            first = agg == "first"
            found = np.full(int(self._owner.max()) + 1, NO_FIRST if first else NO_LAST,
                            dtype=np.int64)
            (np.minimum if first else np.maximum).at(found, self._owner, self._ts)
            self._per_profile[agg] = found
        return found


_EXTREMES: weakref.WeakKeyDictionary[OrderIndex, _Extremes] = weakref.WeakKeyDictionary()


def _live_rows(index: OrderIndex) -> tuple[np.ndarray, np.ndarray]:
    """(owner, ts) of the live orders; views when every id is live."""
    if len(index.live) == index.count:
        return index.owner, index.ts
    ids = ids_of(index.live)
    return index.owner_buf[ids], index.ts_buf[ids]


def _extremes_of(index: OrderIndex) -> _Extremes | None:
    """The snapshot's _Extremes (None without live orders), cached per index."""
    found = _EXTREMES.get(index)
    if found is None and index.live:
        found = _EXTREMES[index] = _Extremes(*_live_rows(index))
    return found


_TIMELINES: weakref.WeakKeyDictionary[OrderIndex, Timeline] = weakref.WeakKeyDictionary()
_ASKED: weakref.WeakSet[OrderIndex] = weakref.WeakSet()


def _timeline_of(index: OrderIndex, eager: bool) -> Timeline | None:
    """The snapshot's live orders in time order (index/recency.py), cached per index;
    None the first time a snapshot asks unless eager: building it costs about four
    answers from rows, so a snapshot asked once (between writes) does not pay it."""
    found = _TIMELINES.get(index)
    if found is None:
        if not eager and index not in _ASKED:
            _ASKED.add(index)
            return None
        found = _TIMELINES[index] = Timeline(*_live_rows(index))
    return found


def recency_of_all(cond: OrdersCond, index: OrderIndex, as_of_us: int,
                   by_extremes: bool = True, eager: bool = False) -> BitMap | None:
    """first/last over all orders (`orders: {"all": true}`), or None: then from rows.
    From each profile's first/last live order (index/recency.py) when the window ends
    after the latest order and, for first, starts at or before the earliest (built in
    one pass); else, or if not by_extremes, from the live orders in time order (built
    with two sorts, from the second such question on a snapshot, or the first if
    eager).  None without live orders.  The profiles returned may include deleted ones
    (the caller keeps the live)."""
    extremes = _extremes_of(index)
    if extremes is None:
        return None
    lo, hi = cond.window.bounds(as_of_us)
    first = cond.having.agg == "first"
    if by_extremes and hi > extremes.latest and \
            not (first and lo is not None and lo > extremes.earliest):
        return recency_of_extremes(extremes.per_profile(cond.having.agg), cond.having,
                                   as_of_us, None if first else lo)
    timeline = _timeline_of(index, eager)
    return None if timeline is None else timeline.recency(cond.having, as_of_us, lo, hi)


def order_totals(index: OrderIndex, profiles: BitMap, as_of_us: int | None = None,
                 amount_field: str = "amount", amount_type: str = T.FLOAT
                 ) -> tuple[int, int, Fraction]:
    """(orders, profiles with orders, exact total of amount_field) of these profiles'
    live orders placed by as_of (None: all); orders lacking the amount count, add 0."""
    if not index.count or not profiles:
        return 0, 0, Fraction(0)
    owner = index.owner
    member = np.zeros(max(int(owner.max()), profiles.max()) + 1, dtype=bool)
    member[ids_of(profiles)] = True
    mask = member[owner]
    if len(index.live) < index.count:  # some orders were deleted
        live = np.zeros(index.count, dtype=bool)
        live[ids_of(index.live)] = True
        mask &= live
    if as_of_us is not None:
        mask &= index.ts <= as_of_us
    buyers = np.zeros(len(member), dtype=bool)  # marking owners: no sort, unlike np.unique
    buyers[owner[mask]] = True
    total = 0
    col = index.columns.get(amount_field)
    if col is not None:
        keys = col.keys[:index.count]
        picked = keys[mask if col.complete else mask & col.valid[:index.count]]
        # the picked keys' own bound: a huge key elsewhere keeps the int64 sum
        most = max(-int(picked.min()), int(picked.max())) if len(picked) else 0
        if most * len(picked) < 2**63:  # no partial sum can overflow int64
            total = int(picked.sum(dtype=np.int64))
        else:
            total = int(picked.astype(object).sum())  # exact Python ints
    scale = T.FLOAT_SCALE if amount_type == T.FLOAT else 1
    return int(np.count_nonzero(mask)), int(np.count_nonzero(buyers)), Fraction(total, scale)
