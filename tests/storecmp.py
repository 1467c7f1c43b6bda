"""Comparing two stores entry by entry: every bitmap, row, column and catalog entry.

The columnar bulk path must leave exactly the store the row path leaves.  Comparing the
LMDB databases key by key and byte by byte checks all of it at once, bitmaps, rows,
order columns, event blocks and counts, the schema and the id map, not only counts.

Order rows are compared as rows: the block path packs them in compressed runs where the
row path gives each a key of its own (index/order_rows.py), so both are read back as
one key per live row first.
"""

from __future__ import annotations

from pathlib import Path

import lmdb

from bitseg.index.keys import ORDER_ROWS, ORDER_RUNS, from_u32, u32
from bitseg.index.order_rows import GONE, unpack
from bitseg.index.store import DATABASES


def store_entries(path: Path) -> dict[str, dict[bytes, bytes]]:
    """Every entry of every database of the store at path."""
    env = lmdb.open(str(path), readonly=True, lock=False, max_dbs=len(DATABASES))
    try:
        entries: dict[str, dict[bytes, bytes]] = {}
        with env.begin() as txn:
            for name in DATABASES:
                try:
                    db = env.open_db(name.encode(), txn=txn, create=False)
                except lmdb.NotFoundError:
                    entries[name] = {}
                    continue
                entries[name] = {bytes(k): bytes(v) for k, v in txn.cursor(db)}
        entries["orders"] = _rows_as_keys(entries["orders"])
        return entries
    finally:
        env.close()


def _rows_as_keys(orders: dict[bytes, bytes]) -> dict[bytes, bytes]:
    """The orders database with each live row under a key of its own, whether a run or
    its own key holds it (its own key wins; GONE there: no row)."""
    out = {k: v for k, v in orders.items() if not k.startswith(ORDER_RUNS)}
    for key, value in orders.items():
        if key.startswith(ORDER_RUNS):
            first = from_u32(key[len(ORDER_RUNS):])
            for i, row in enumerate(unpack(value)):
                out.setdefault(ORDER_ROWS + u32(first + i), row)
    return {k: v for k, v in out.items() if not (k.startswith(ORDER_ROWS) and v == GONE)}


def differences(a: Path, b: Path, limit: int = 10) -> list[str]:
    """What differs between the stores at a and b (at most `limit` lines); [] if equal."""
    left, right = store_entries(a), store_entries(b)
    found: list[str] = []
    for name in DATABASES:
        x, y = left[name], right[name]
        for key in sorted(x.keys() | y.keys()):
            if x.get(key) != y.get(key):
                found.append(f"{name}[{key!r}]: {_show(x.get(key))} != {_show(y.get(key))}")
                if len(found) >= limit:
                    return found
    return found


def _show(value: bytes | None) -> str:
    if value is None:
        return "missing"
    return repr(value[:60]) + ("…" if len(value) > 60 else "") + f" ({len(value)} B)"
