"""Comparing two stores entry by entry: every bitmap, row, column and catalog entry.

The columnar bulk path must leave exactly the store the row path leaves.  Comparing the
LMDB databases key by key and byte by byte checks all of it at once, bitmaps, rows,
order columns, event blocks and counts, the schema and the id map, not only counts.
"""

from __future__ import annotations

from pathlib import Path

import lmdb

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
        return entries
    finally:
        env.close()


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
