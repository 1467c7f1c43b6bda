"""Selected fields of many profiles at once: as rows (read from the store, for preview
and as the reference) or as columns (from the field indexes, for exports)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from pyroaring import BitMap

from bitseg.index import types as T
from bitseg.index.errors import BitsegError
from bitseg.index.fields import RangeIndex, ValueIndex, bitmap_of, ids_of
from bitseg.index.keys import u32
from bitseg.index.profiles import HELD_KEY, decode_row, held_fields, held_values, with_held

if TYPE_CHECKING:
    from bitseg.index.engine import Engine


def check_fields(engine: Engine, fields: Sequence[str]) -> list[str]:
    """The requested profile fields, in order, without repeats; unknown ones are an error."""
    known = engine.schema.profiles
    out: list[str] = []
    for name in fields:
        if name == "id" or name in out:
            continue
        if name not in known:
            listed = ", ".join(sorted(known)) or "none"
            raise BitsegError(f"fields: unknown profile field {name!r} (known fields: {listed})")
        out.append(name)
    return out


def profile_rows(engine: Engine, dense: np.ndarray,
                 fields: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """{"id": …, field: display value} per dense id, in order; `fields` None means every
    field the profile has, a list means exactly those (a missing value is None)."""
    types = engine.schema.profiles
    names = engine.ids.externals(dense)
    rows: list[dict[str, Any]] = []
    index = engine.snapshot.fields
    with engine.store.read() as txn:
        held = held_fields(engine.store.get(txn, "meta", HELD_KEY.encode()))
        values = held_values(dense, held, index, types)
        for external, pid in zip(names, dense.tolist(), strict=True):
            raw = engine.store.get(txn, "rows", u32(pid))
            row = decode_row(raw, types) if raw is not None else {}
            with_held(row, pid, held, index, types, values)
            if fields is None:
                shown = {k: T.display(types[k], v) for k, v in row.items()}
            else:
                shown = {k: None if row.get(k) is None else T.display(types[k], row[k])
                         for k in fields}
            rows.append({"id": external, **shown})
    return rows


# ------------------------------------------------------------------ columns from the indexes
# An export reads its fields from the field indexes a block of ids at a time instead of
# decoding every row: a value field is one intersection per value, a range field one
# per bit slice. Values an index cannot give back exactly are read from the rows.

MAX_SET_WORDS = 32  # keywords fields with more values than 64 × this are read from rows
MAX_SPREAD = 16  # a position table when the block's ids span at most this × its size


class Block:
    """Sorted ids, their bitmap, and where in them any of them is."""

    def __init__(self, ids: np.ndarray) -> None:
        self.ids = ids
        self.bitmap = bitmap_of(ids)
        self.low = int(ids[0]) if len(ids) else 0
        span = int(ids[-1]) + 1 - self.low if len(ids) else 0
        self.table: np.ndarray | None = None
        if span <= MAX_SPREAD * len(ids) + 1024:  # a gather beats a binary search
            self.table = np.zeros(span, dtype=np.int32)  # half the memory to gather
            self.table[ids - self.low] = np.arange(len(ids), dtype=np.int32)

    def __len__(self) -> int:
        return len(self.ids)

    def positions(self, found: BitMap) -> np.ndarray:
        """The positions of these ids (all in the block) in it."""
        got = ids_of(found)
        if self.table is not None:
            return self.table[got - self.low]
        return np.searchsorted(self.ids, got)


def value_codes(index: ValueIndex, block: Block) -> tuple[np.ndarray, list[Any]]:
    """(code per id, -1 for none; the values the codes name) of a keyword or bool field."""
    codes = np.full(len(block), -1, dtype=np.int32)
    values: list[Any] = []
    for value, bitmap in index.values.items():
        found = bitmap & block.bitmap
        if found:
            codes[block.positions(found)] = len(values)
            values.append(value)
    return codes, values


def value_sets(index: ValueIndex, block: Block
               ) -> tuple[np.ndarray, list[tuple[str, ...]]] | None:
    """(code per id, -1 for none; the sorted value tuples the codes name) of a keywords
    field, or None when it has too many values to mark each in a bit set."""
    values = sorted(index.values)
    words = (len(values) + 63) // 64
    if words > MAX_SET_WORDS:
        return None
    bits = np.zeros((len(block), max(words, 1)), dtype="<u8")  # bit i: values[i]
    for i, value in enumerate(values):
        found = index.values[value] & block.bitmap
        if found:
            bits[block.positions(found), i >> 6] |= np.uint64(1) << np.uint64(i & 63)
    rows = np.ascontiguousarray(bits).view(np.dtype((np.void, bits.shape[1] * 8))).ravel()
    distinct, codes = np.unique(rows, return_inverse=True)
    sets: list[tuple[str, ...]] = []
    for raw in distinct.tolist():
        mask, found_values = int.from_bytes(raw, "little"), []
        while mask:
            low = mask & -mask
            found_values.append(values[low.bit_length() - 1])
            mask ^= low
        sets.append(tuple(found_values))
    codes = codes.astype(np.int32).ravel()
    if sets and not sets[0]:  # the empty set (ids without the field) sorts first
        codes -= 1
        sets = sets[1:]
    return codes, sets


def range_keys(index: RangeIndex, block: Block) -> tuple[np.ndarray, np.ndarray]:
    """(positions in the block having a value, their keys) of a range field, from the
    bit slices."""
    within = index.exists & block.bitmap
    stored = np.zeros(len(block), dtype=np.int64)
    for i, bits in enumerate(index.slices):
        found = bits & within
        if found:
            stored[block.positions(found)] += np.int64(1) << i
    where = block.positions(within)
    return where, stored[where] * index.unit + index.base


def float_values(index: RangeIndex, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(values, exact) of float keys: `exact` is False where the stored value may differ
    from the key — a rounded index, a key past 2**53, or a whole number (a float field
    keeps 5 and 5.0 apart in its rows, and the index cannot)."""
    digits = index.digits or 0
    scale = 10.0 ** digits
    values = keys / scale
    exact = (np.abs(keys) < 2**53) & (keys % 10**digits != 0) & (np.rint(values * scale) == keys)
    if index.rounded:
        exact[:] = False
    return values, exact
