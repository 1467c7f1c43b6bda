"""The names and LMDB keys of the "orders" database, and its columns and bitmaps stored
in chunks.

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
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import orjson
from pyroaring import BitMap

from bitseg.index import types as T
from bitseg.index.keys import SEP, u32
from bitseg.index.store import Store, Txn, chunk_mask

COL_BITS = 16
COL_CHUNK = 1 << COL_BITS
MAX_ID_BYTES = 400
MAX_NAME = 400  # longer bitmap names are stored under a digest

QTY, QTY_SUM, QTY_EACH, DISTINCT, SKU = (
    "items.qty", "items.qty_sum", "items.qty_each", "items.distinct", "items.sku")
DERIVED = (QTY_SUM, DISTINCT)
RESERVED = {"id", "profile", "ts", "items"}
ITEM_RESERVED = {"qty_sum", "qty_each", "distinct"}
SCALE = {QTY_SUM: T.FLOAT_SCALE}  # column keys per unit of the rule's value
ITEM_KINDS = (b"w", b"y")  # bitmap names of value-typed item keys per item: value, exists


def bitmap_key(name: bytes, chunk: int) -> bytes:
    return b"b" + SEP + name + b"\x00" + u32(chunk)


def column_key(name: bytes, chunk: int) -> bytes:
    return b"c" + SEP + name + b"\x00" + u32(chunk)


def value_name(store: Store, txn: Txn, fname: str, value: Any, kind: bytes = b"v") -> bytes:
    raw = orjson.dumps(value)
    name = kind + SEP + fname.encode() + SEP + raw
    if len(name) <= MAX_NAME:
        return name
    digest = b"#" + hashlib.blake2b(name, digest_size=20).hexdigest().encode()
    store.put(txn, "orders", b"n" + SEP + digest, name)
    return digest


def exists_name(fname: str, kind: bytes = b"x") -> bytes:
    return kind + SEP + fname.encode()


def put_bitmap(store: Store, txn: Txn, name: bytes, bitmap: BitMap,
                chunks: Iterable[int]) -> None:
    for chunk in chunks:
        part = bitmap & chunk_mask(chunk)
        key = bitmap_key(name, chunk)
        if part:
            part.run_optimize()
            store.put(txn, "orders", key, part.serialize())
        else:
            store.delete(txn, "orders", key)


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
    for chunk in dirty_chunks(ids):
        a, b = chunk << COL_BITS, min(rows, (chunk + 1) << COL_BITS)
        data, ok = np.zeros(b - a, dtype=np.int64), np.zeros(b - a, dtype=bool)
        raw = store.get(txn, "orders", column_key(name, chunk))
        if raw is not None:  # the ids before this batch's
            size = len(raw) // 9
            data[:size] = np.frombuffer(raw, dtype=np.int64, count=size)
            ok[:size] = np.frombuffer(raw, dtype=np.uint8, offset=size * 8, count=size)
        lo, hi = np.searchsorted(ids, [a, b])
        at = ids[lo:hi].astype(np.int64) - a
        data[at] = np.where(valid[lo:hi], keys[lo:hi], 0)
        ok[at] = valid[lo:hi]
        gone = kills[(kills >= a) & (kills < b)].astype(np.int64) - a
        data[gone], ok[gone] = 0, False
        store.put(txn, "orders", column_key(name, chunk), data.tobytes() + ok.astype(np.uint8)
                  .tobytes())


def dirty_chunks(ids: np.ndarray) -> list[int]:
    return np.unique(ids.astype(np.int64) >> COL_BITS).tolist() if len(ids) else []



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
