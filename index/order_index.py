"""The in-memory order index: an immutable OrderIndex, its key Columns (read from LMDB
when first used), and load_orders, which rebuilds it from the "orders" database.

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
Field columns (`Columns`) are read from LMDB the first time a rule uses them, through a
reader pinned to the index's version: a store opens without reading what no rule asks
for, and an older snapshot still reads its own version.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import orjson
from pyroaring import BitMap

from bitseg.index.fields import EMPTY, ReadOnUse, ValueIndex
from bitseg.index.keys import (
    ORDER_BITMAPS,
    ORDER_COLUMNS,
    ORDER_NAMES,
    ORDERS_META,
    SEP,
    order_bitmap_prefix,
)
from bitseg.index.order_keys import ITEM_KINDS, assemble
from bitseg.index.schema import Schema
from bitseg.index.store import Store, Txn

NONE = np.uint32(0xFFFFFFFF)  # item_owner of a replaced item
MAX_RUNS = 4096


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


class Columns(ReadOnUse[Column]):
    """Key columns by field name (order or item fields), each read from LMDB the first
    time it is asked for."""

    def __init__(self, kind: bytes = b"o", rows: int = 0,
                 entries: dict[str, Column | None] | None = None, reader: Any = None) -> None:
        super().__init__(reader, entries if entries is not None else {})
        self.kind, self.rows = kind, rows

    def _read(self, name: str) -> Column:
        return _read_column(self.reader, self.kind + SEP + name.encode(), self.rows)


def _read_column(reader: Any, name: bytes, rows: int) -> Column:
    """One key column of `rows` ids from its stored chunks (ids past them: no value)."""
    keys, valid = assemble(lambda key: reader.get("orders", key), name, rows, np.int64, True)
    return _column_of(keys, valid)


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
                       item_columns=self.item_columns.pinned(reader),
                       values=_pinned(self.values, reader),
                       item_values=_pinned(self.item_values, reader))

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


def _pinned(values: Mapping[str, ValueIndex], reader: Any) -> Mapping[str, ValueIndex]:
    return values.pinned(reader) if isinstance(values, OrderValues) else values


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


class TxnView:
    """A write or read transaction read the way a snapshot's reader is (load_orders)."""

    def __init__(self, store: Store, txn: Txn) -> None:
        self.store, self.txn = store, txn

    def get(self, db: str, key: bytes) -> bytes | None:
        return self.store.get(self.txn, db, key)

    def items(self, db: str, prefix: bytes) -> Any:
        return self.store.items(self.txn, db, prefix)

    def key_at(self, db: str, key: bytes) -> bytes | None:
        cursor = self.txn.cursor(db=self.store.db[db])
        return bytes(cursor.key()) if cursor.set_range(key) else None


def load_orders(store: Store, txn: Txn, schema: Schema) -> OrderIndex:
    """Rebuild the OrderIndex from the "orders" db alone, read in this transaction."""
    return read_orders(TxnView(store, txn))


def orders_meta(reader: Any) -> dict[str, Any] | None:
    """The "orders" db's meta entry (None: no order was ever added)."""
    raw = reader.get("orders", ORDERS_META)
    return None if raw is None else orjson.loads(raw)


def _column_names(reader: Any) -> list[bytes]:
    """The names of the stored columns, skipping from one name's chunks to the next."""
    prefix, names = ORDER_COLUMNS, []
    key = reader.key_at("orders", prefix)
    while key is not None and key.startswith(prefix):
        name = bytes(key[2:-5])
        names.append(name)
        key = reader.key_at("orders", prefix + name + b"\x01")
    return names


def read_orders(reader: Any, item_owners: bool = True) -> OrderIndex:
    """Rebuild the OrderIndex from the "orders" db alone: owner, ts and item owners now
    (item_owners=False: none, for StoredOrders to read when first used), field columns
    and value bitmaps when first used (through the reader the index is then pinned to)."""
    meta = orders_meta(reader)
    if meta is None:
        return OrderIndex()
    count, item_count = meta["count"], meta["items"]
    names = _column_names(reader)

    def plain(name: bytes, n: int, dtype: Any) -> np.ndarray:
        return assemble(lambda key: reader.get("orders", key), name, n, dtype, False)[0]

    owner = plain(b"owner", count, np.uint32)
    ts = plain(b"ts", count, np.int64)
    item_owner = read_item_owner(reader, item_count) if item_owners else NO_IDS
    fields = {b"o": {}, b"i": {}}
    for name in names:
        kind, _, fname = name.partition(SEP)
        if kind in fields:
            fields[kind][fname.decode()] = None
    columns = Columns(b"o", count, fields[b"o"])  # readable once pinned to a reader
    item_columns = Columns(b"i", item_count, fields[b"i"])
    live = _read_bitmap(reader, order_bitmap_prefix(b"live"))
    long_names = _LongNames(reader)
    values = OrderValues(b"v", b"x", _exists_names(reader, b"x"), reader, long_names)
    item_values = OrderValues(ITEM_KINDS[0], ITEM_KINDS[1],
                              _exists_names(reader, ITEM_KINDS[1]), reader, long_names)
    return OrderIndex(count, item_count, live, owner, ts, compute_runs(ts), values,
                      columns, item_owner, item_columns, item_values=item_values,
                      items_indexed=bool(meta.get("item_values")))


def read_item_owner(reader: Any, item_count: int) -> np.ndarray:
    """The item -> order id column (NONE for a replaced item)."""
    get = functools.partial(reader.get, "orders")
    return assemble(get, b"item_owner", item_count, np.uint32, False)[0]


def _read_bitmap(reader: Any, prefix: bytes) -> BitMap:
    """A bitmap of "orders" from its chunks under prefix (empty if none)."""
    chunks = [BitMap.deserialize(raw) for _, raw in reader.items("orders", prefix)]
    return BitMap.union(*chunks) if chunks else EMPTY


def _exists_names(reader: Any, kind: bytes) -> list[str]:
    """The fields having an exists bitmap of this kind ("x" orders, "y" items), found
    by skipping from one bitmap's chunks to the next."""
    prefix, names = ORDER_BITMAPS + kind + SEP, []
    key = reader.key_at("orders", prefix)
    while key is not None and key.startswith(prefix):
        name = bytes(key[len(prefix):-5])
        names.append(name.decode())
        key = reader.key_at("orders", prefix + name + b"\x01")
    return names


class _LongNames:
    """The full names of the bitmaps stored under a digest ("#"…), read once, when a
    field's values are first read (few stores have any)."""

    def __init__(self, reader: Any) -> None:
        self._reader = reader
        self._names: list[tuple[bytes, bytes]] | None = None
        self._lock = threading.Lock()

    def under(self, prefix: bytes) -> list[tuple[bytes, bytes]]:
        """(short name, full name) of the long names starting with prefix."""
        with self._lock:
            if self._names is None:
                self._names = [(bytes(key[len(ORDER_NAMES):]), bytes(full)) for key, full
                               in self._reader.items("orders", ORDER_NAMES)]
        return [(short, full) for short, full in self._names if full.startswith(prefix)]


class OrderValues(ReadOnUse[ValueIndex]):
    """The ValueIndex of each value-typed order field (kinds "v"/"x") or item key
    ("w"/"y"), read from LMDB the first time the field is asked for."""

    def __init__(self, kind: bytes, exists_kind: bytes, names: list[str], reader: Any,
                 long_names: _LongNames) -> None:
        super().__init__(reader, dict.fromkeys(names))
        self.kind, self.exists_kind = kind, exists_kind
        self._long = long_names

    def pinned(self, reader: Any) -> OrderValues:
        twin = super().pinned(reader)
        twin._long = _LongNames(reader)
        return twin

    def _read(self, name: str) -> ValueIndex:
        field = name.encode()
        exists = _read_bitmap(self.reader,
                              order_bitmap_prefix(self.exists_kind + SEP + field))
        prefix = self.kind + SEP + field + SEP
        chunks: dict[bytes, list[BitMap]] = {}
        for key, raw in self.reader.items("orders", ORDER_BITMAPS + prefix):
            chunks.setdefault(key[len(ORDER_BITMAPS):-5], []).append(BitMap.deserialize(raw))
        values = {orjson.loads(full[len(prefix):]): BitMap.union(*found)
                  for full, found in chunks.items()}
        for short, full in self._long.under(prefix):
            bitmap = _read_bitmap(self.reader, order_bitmap_prefix(short))
            if bitmap:  # a name outlives its bitmap's last chunk
                values[orjson.loads(full[len(prefix):])] = bitmap
        return ValueIndex(values, exists)


_WHOLE = frozenset({"item_owner_buf", "item_owner", "pinned"})  # what needs item owners


class StoredOrders:
    """A store's OrderIndex, read through `reader` the first time anything of it is
    used, and then kept: a store opens without reading its orders, and a rule or batch
    on orders reads them (every attribute is the read OrderIndex's). The item owners
    (an id per item, 4 bytes each) are read only once an items rule or a batch needs
    them."""

    def __init__(self, reader: Any, items_indexed: bool = True) -> None:
        self._reader = reader
        self._index: OrderIndex | None = None
        self._whole = False  # _index has its item owners
        self._live: BitMap | None = None
        self._lock = threading.Lock()
        self.items_indexed = items_indexed

    def _base(self) -> OrderIndex:
        """The index, its item owners perhaps not read (never handed out as it is)."""
        index = self._index
        if index is None:
            with self._lock:
                if self._index is None:
                    self._index = read_orders(self._reader, False).pinned(self._reader)
                index = self._index
        return index

    def loaded(self) -> OrderIndex:
        """The whole index, item owners read."""
        index = self._base()
        if not self._whole:
            with self._lock:
                if not self._whole:
                    owners = read_item_owner(self._reader, index.item_count)
                    self._index = replace(index, item_owner_buf=owners)
                    self._whole = True
        return self._base()

    @property
    def live(self) -> BitMap:
        """The orders that exist; read alone (a few KB) while nothing else is (metrics
        and Describe count orders without reading their columns)."""
        index = self._index
        if index is not None:
            return index.live
        with self._lock:
            if self._live is None:
                self._live = _read_bitmap(self._reader, order_bitmap_prefix(b"live"))
            return self._live

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loaded() if name in _WHOLE else self._base(), name)


def orders_of(index: OrderIndex | StoredOrders) -> OrderIndex:
    """The OrderIndex itself (read now if it was not yet), for a batch that builds on it."""
    return index.loaded() if isinstance(index, StoredOrders) else index
