"""The order and item field names, and the columns and bitmaps of the "orders" database
stored in chunks (its keys, with every other key layout, are in keys.py).

Everything is written in the caller's write transaction (a failed batch leaves nothing):
"meta" {"count": orders, "items": item ids, "item_values": true once the per-item bitmaps
cover every item (index_items builds them at open for a store written before they
existed)}, each order's id and row, the columns in chunks of 2**16 ids and the bitmaps in
chunks of 2**18, so a batch rewrites only the chunks it touched, and load_orders rebuilds
from LMDB alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from pyroaring import BitMap

from bitseg.index import types as T
from bitseg.index.keys import (
    ORDER_NAME_BYTES,
    order_bitmap_prefix,
    order_column_prefix,
    order_name_key,
    order_short_name,
    order_value_name,
    u32,
)
from bitseg.index.store import Store, Txn

COL_BITS = 16
COL_CHUNK = 1 << COL_BITS
MAX_ID_BYTES = T.MAX_ID_BYTES  # order ids, as profile ids

QTY, QTY_SUM, QTY_EACH, DISTINCT, SKU = (
    "items.qty", "items.qty_sum", "items.qty_each", "items.distinct", "items.sku")
DERIVED = (QTY_SUM, DISTINCT)
RESERVED = {"id", "profile", "ts", "items"}
ITEM_RESERVED = {"qty_sum", "qty_each", "distinct"}
SCALE = {QTY_SUM: T.FLOAT_SCALE}  # column keys per unit of the rule's value
ITEM_KINDS = (b"w", b"y")  # bitmap names of value-typed item keys per item: value, exists


def column_key(name: bytes, chunk: int) -> bytes:
    return order_column_prefix(name) + u32(chunk)


def value_name(store: Store, txn: Txn, fname: str, value: Any, kind: bytes = b"v") -> bytes:
    """The name of a value's bitmap; past ORDER_NAME_BYTES its digest, with the full
    name kept under order_name_key (names that fit are what they always were)."""
    name = order_value_name(fname, value, kind)
    if len(name) <= ORDER_NAME_BYTES:
        return name
    short = order_short_name(name)
    store.put(txn, "orders", order_name_key(short), name)
    return short


def put_bitmap(store: Store, txn: Txn, name: bytes, bitmap: BitMap,
               chunks: Iterable[int]) -> None:
    """Store.put_chunks for the orders bitmap `name`."""
    store.put_chunks(txn, "orders", order_bitmap_prefix(name), bitmap, chunks)


def put_column(store: Store, txn: Txn, name: bytes, data: np.ndarray,
                valid: np.ndarray | None, count: int, chunks: Iterable[int]) -> None:
    for chunk in chunks:
        a, b = chunk << COL_BITS, min(count, (chunk + 1) << COL_BITS)
        if a >= b:
            continue
        raw = data[a:b].tobytes()
        if valid is not None:
            raw += valid[a:b].astype(np.uint8).tobytes()
        store.put(txn, "orders", column_key(name, chunk), raw)


def append_column(store: Store, txn: Txn, name: bytes, rows: int, ids: np.ndarray,
                  keys: np.ndarray, valid: np.ndarray, kills: np.ndarray) -> None:
    """put_column for a key column a batch only appended to (every id written, and every
    id killed, is new), without the column in memory: each chunk written is its stored
    part read back, then the batch's values.  `ids` are sorted; the bytes are
    put_column's."""
    ids = ids.astype(np.int64)  # uint32 ids: each searchsorted below would copy them whole
    chunks = ids >> COL_BITS  # sorted, as the ids are: each chunk's first id starts a run
    first = np.ones(len(chunks), dtype=bool)
    first[1:] = chunks[1:] != chunks[:-1]
    for chunk in chunks[first].tolist():
        a, b = chunk << COL_BITS, min(rows, (chunk + 1) << COL_BITS)
        data, ok = np.zeros(b - a, dtype=np.int64), np.zeros(b - a, dtype=bool)
        raw = store.get(txn, "orders", column_key(name, chunk))
        if raw is not None:  # the ids before this batch's
            size = len(raw) // 9
            data[:size] = np.frombuffer(raw, dtype=np.int64, count=size)
            ok[:size] = np.frombuffer(raw, dtype=np.uint8, offset=size * 8, count=size)
        lo, hi = np.searchsorted(ids, [a, b])
        at = ids[lo:hi] - a
        data[at] = np.where(valid[lo:hi], keys[lo:hi], 0)
        ok[at] = valid[lo:hi]
        gone = kills[(kills >= a) & (kills < b)].astype(np.int64) - a
        data[gone], ok[gone] = 0, False
        store.put(txn, "orders", column_key(name, chunk), data.tobytes() + ok.astype(np.uint8)
                  .tobytes())


def dirty_chunks(ids: np.ndarray) -> list[int]:
    """The column chunks holding these ids (ids >= 0), ascending: counted per chunk, not
    np.unique's hash of every id (~5x slower at a few million ids)."""
    if not len(ids):
        return []
    return np.flatnonzero(np.bincount(ids.astype(np.int64) >> COL_BITS)).tolist()



def assemble(get: Callable[[bytes], bytes | None], name: bytes, rows: int, dtype: Any,
              with_valid: bool) -> tuple[np.ndarray, np.ndarray]:
    """A stored column of `rows` ids from its chunks (put_column's layout: the values,
    then a validity byte each when with_valid); ids past the stored chunks are zero and
    invalid. Without validity, the second array is empty."""
    data = np.zeros(rows, dtype=dtype)
    valid = np.zeros(rows if with_valid else 0, dtype=bool)
    width = data.itemsize + (1 if with_valid else 0)
    for chunk in range((rows + COL_CHUNK - 1) >> COL_BITS):
        raw = get(column_key(name, chunk))
        if raw is None:
            continue
        size, a = len(raw) // width, chunk << COL_BITS
        data[a:a + size] = np.frombuffer(raw, dtype=dtype, count=size)
        if with_valid:
            valid[a:a + size] = np.frombuffer(raw, dtype=np.uint8, offset=size * data.itemsize,
                                              count=size)
    return data, valid
