"""One batch of profile upserts or deletes: from records to the next field indexes.

Records are streamed: each is checked, merged with the stored row (omitted keys kept,
null removes), written to the rows database, and its value changes are queued per
field as arrays.  Queued changes are applied to copy-on-write field writers in bulk
("flushed"); a flush also happens before an id comes back within the batch, so that
removals always see the values of the previous occurrence.
"""

from __future__ import annotations

from array import array
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
from pyroaring import BitMap

from bitseg.index import types as T
from bitseg.index.blocks import RowBlock, Taken
from bitseg.index.cumulative import carry
from bitseg.index.errors import DataError
from bitseg.index.fields import (
    RangeIndex,
    RangeWriter,
    ValueIndex,
    ValueWriter,
    bitmap_of,
    with_changes,
)
from bitseg.index.ids import IdWriter
from bitseg.index.keys import u32
from bitseg.index.profile_blocks import ensure_profiles, take_block
from bitseg.index.schema import Schema
from bitseg.index.snapshot import FieldIndex, Snapshot, empty_index
from bitseg.index.store import Store, Txn

Writer = ValueWriter | RangeWriter


def decode_row(raw: bytes, types: Mapping[str, str]) -> dict[str, Any]:
    row = orjson.loads(raw)
    for name, value in row.items():
        if types.get(name) == T.KEYWORDS:
            row[name] = tuple(value)
    return row


# ---------------------------------------------------------------------- index-held fields
# A bulk action or a traits refresh writes a field column-wise: its bitmaps only, not
# the rows of the profiles it changes (rewriting a million rows spread over the rows
# database is most of such a write).  The field is then "held" by its index: the meta
# key below lists it, and every reader of a row takes its value from the index, so the
# copy in a row may be stale.  Only fields whose index gives the value back exactly can
# be held: keyword, keywords, bool, int, date and timestamp (not float).  A held
# keywords field reads as its values in sorted order; an empty list reads as no value,
# as rules already see it.
HELD_KEY = "held-fields"
# Range fields with at least this many values to build are built on two threads at a
# batch's finish (their bit slices and month-day groups: numpy sorts and masks). The 1M
# profiles load: 3.19-3.36 s -> 2.85-3.15 s. Below it a pool costs more than it saves.
PARALLEL_FROM = 1 << 16
HOLDABLE = frozenset({T.KEYWORD, T.KEYWORDS, T.BOOL, T.INT, T.DATE, T.TIMESTAMP})


def held_fields(raw: bytes | None) -> tuple[str, ...]:
    """The held fields, from the stored value of the meta key HELD_KEY (None: none)."""
    return tuple(orjson.loads(raw)) if raw else ()


def hold_fields(store: Store, txn: Txn, names: Any) -> None:
    """Mark these fields as held by their index from this transaction on."""
    held = set(held_fields(store.get(txn, "meta", HELD_KEY.encode())))
    if not held.issuperset(names):
        store.put_json(txn, HELD_KEY, sorted(held.union(names)))


def index_value(index: FieldIndex | None, type_: str, dense: int) -> Any:
    """One profile's value of a held field as its index holds it (None: no value)."""
    if index is None:
        return None
    if isinstance(index, RangeIndex):
        return index.key_of(dense)
    if type_ == T.KEYWORDS:
        words = sorted(word for word, bitmap in index.values.items() if dense in bitmap)
        return tuple(words) or None
    if dense not in index.exists:
        return None
    return next((value for value, bitmap in index.values.items() if dense in bitmap), None)


def held_values(dense: np.ndarray, held: tuple[str, ...], fields: Mapping[str, FieldIndex],
                types: Mapping[str, str]) -> dict[str, dict[int, Any]]:
    """Each held field's values of these profiles ({dense id: value}, no value left out),
    one intersection per value bitmap rather than a lookup in each per profile."""
    block = bitmap_of(dense)
    out: dict[str, dict[int, Any]] = {}
    for name in held:
        index, found = fields.get(name), {}
        if isinstance(index, RangeIndex):
            found = {d: index.key_of(d) for d in index.exists & block}
        elif isinstance(index, ValueIndex) and types[name] == T.KEYWORDS:
            for word in sorted(index.values):
                for d in index.values[word] & block:
                    found.setdefault(d, []).append(word)
            found = {d: tuple(words) for d, words in found.items()}
        elif isinstance(index, ValueIndex):
            for value, bitmap in index.values.items():
                found.update(dict.fromkeys(bitmap & block, value))
        out[name] = found
    return out


def with_held(row: dict[str, Any], dense: int, held: tuple[str, ...],
              fields: Mapping[str, FieldIndex], types: Mapping[str, str],
              values: dict[str, dict[int, Any]] | None = None) -> dict[str, Any]:
    """A decoded row with each held field's value replaced by the index's (in place);
    values: held_values of a block of profiles this one is in, if known."""
    for name in held:
        value = index_value(fields.get(name), types[name], dense) if values is None \
            else values[name].get(dense)
        if value is None:
            row.pop(name, None)
        else:
            row[name] = value
    return row


def check_field_name(name: str) -> None:
    problem = T.name_problem(name)
    if problem:
        raise DataError(f"field names {problem}", field=str(name)[:100])


class _Field:
    """One field's checker and the value changes waiting for the next flush."""

    __slots__ = ("type", "check", "is_range", "is_float", "multi", "codes", "values",
                 "add_ids", "add_vals", "rm_ids", "rm_vals", "add")

    def __init__(self, type_: str) -> None:
        self.type = type_
        self.check = T.CHECKERS[type_]
        self.is_range = type_ in T.RANGE_TYPES
        self.is_float = type_ == T.FLOAT  # queued as floats: the index picks their scale
        self.multi = type_ == T.KEYWORDS
        self.codes: dict[Any, int] = {}
        self.values: list = []
        # add(dense, value): queue a value (the common case, split by kind for speed)
        self.add = self._add_range if self.is_range else \
            self._add_keywords if self.multi else self._add_value
        self.clear()

    def clear(self) -> None:
        code = "d" if self.is_float else "q" if self.is_range else "I"
        self.add_ids, self.add_vals = array("I"), array(code)
        self.rm_ids, self.rm_vals = array("I"), array(code)

    def _add_range(self, dense: int, value: Any) -> None:
        self.add_ids.append(dense)
        self.add_vals.append(value)

    def _add_value(self, dense: int, value: Any) -> None:
        # push() codes removed values the same way; kept inline here, the bulk-load path
        # (a shared helper call costs ~4% of a profile load)
        code = self.codes.get(value)
        if code is None:
            code = self.codes[value] = len(self.codes)
            self.values.append(value)
        self.add_ids.append(dense)
        self.add_vals.append(code)

    def _add_keywords(self, dense: int, value: Any) -> None:
        for item in value:
            self._add_value(dense, item)

    def push(self, dense: int, value: Any, removing: bool) -> None:
        if not removing:
            self.add(dense, value)
            return
        ids, vals = self.rm_ids, self.rm_vals
        if self.is_range:
            ids.append(dense)
            vals.append(value)
            return
        codes = self.codes
        for item in (value if self.multi else (value,)):
            code = codes.get(item)
            if code is None:
                code = codes[item] = len(codes)
                self.values.append(item)
            ids.append(dense)
            vals.append(code)


class FieldWriters:
    """The copy-on-write writers of the fields a batch changes."""

    def __init__(self, snapshot: Snapshot, schema: Schema) -> None:
        self.snap = snapshot
        self.schema = schema
        self.writers: dict[str, Writer] = {}

    def get(self, name: str) -> Writer:
        writer = self.writers.get(name)
        if writer is None:
            type_ = self.schema.profiles[name]
            index = self.snap.fields.get(name) or empty_index(type_)
            if isinstance(index, RangeIndex):
                writer = RangeWriter(index, type_)
            else:
                writer = ValueWriter(index)
            self.writers[name] = writer
        return writer

    def finish(self) -> Mapping[str, FieldIndex]:
        """The snapshot's fields with the changed ones replaced (those not read yet stay
        unread: see fields.StoredFields)."""
        large = [name for name, writer in self.writers.items()
                 if isinstance(writer, RangeWriter) and writer.pending() >= PARALLEL_FROM]
        changed: dict[str, FieldIndex] = {}
        if len(large) > 1:  # each writer's own state only; numpy lets go of the lock
            with ThreadPoolExecutor(2, thread_name_prefix="bitseg-fields") as pool:
                built = pool.map(lambda name: self.writers[name].finish(), large)
                changed.update(zip(large, built, strict=True))
        for name, writer in self.writers.items():
            if name not in changed:
                changed[name] = writer.finish()
            if isinstance(writer, RangeWriter):  # the next index keeps the range layout
                carry(writer.original, changed[name], writer.touched)  # called only if needed
        return with_changes(self.snap.fields, changed)


class ProfileBatch:
    """Applies profile records inside one write transaction."""

    def __init__(self, store: Store, txn: Txn, snapshot: Snapshot, ids: IdWriter) -> None:
        self.store = store
        self.txn = txn
        self.snap = snapshot
        self.ids = ids
        self.schema = snapshot.schema
        self.types = dict(self.schema.profiles)
        self.new_types: dict[str, str] = {}
        self.writers = FieldWriters(snapshot, self.schema)
        self.info = {name: _Field(type_) for name, type_ in self.types.items()}
        self.segment_start = ids.next  # ids created at or after this are in the open segment
        self.touched_old: set[int] = set()  # pre-existing ids touched in the open segment
        self.touched = BitMap()
        self.live_added: array = array("I")
        # held fields' values come from the snapshot's index for ids that existed before
        # the batch, until the batch writes their row (see with_held)
        self.held = held_fields(store.get(txn, "meta", HELD_KEY.encode()))
        self.first_new = ids.next
        self.rewritten = BitMap()
        self.created = 0
        self.updated = 0

    # ------------------------------------------------------------------ records
    def add(self, record: Any, line: int | None = None) -> None:
        """One profile record (line: where it came from; errors get it from the caller)."""
        if not isinstance(record, dict):
            raise DataError("expected a JSON object")
        external = record.get("id")
        if isinstance(external, int) and not isinstance(external, bool):
            external = str(external)
        if not isinstance(external, str) or not external:
            raise DataError("expected a non-empty string or integer id", field="id")
        if T.id_problem(external):
            raise DataError(T.id_problem(external), field="id")
        before = self.ids.next
        dense = self.ids.resolve(external)
        fresh = dense >= before
        if not fresh and (dense >= self.segment_start or dense in self.touched_old):
            self.flush()
        old = None if fresh else self._row(dense)
        new = self._merge(old, record)
        self.store.put(self.txn, "rows", u32(dense), orjson.dumps(new))
        if old is None:
            self.created += 1
            self.live_added.append(dense)
        else:
            self.updated += 1
        if dense < self.segment_start:
            self.touched_old.add(dense)
        self._queue_changes(dense, old or {}, new)

    def add_block(self, block: RowBlock) -> Taken:
        """A block of records, column-wise up to the first row that needs the row path
        (see profile_blocks.py)."""
        return take_block(self, block)

    def ensure_profiles(self, names: pa.Array) -> np.ndarray:
        """ensure_profile of many ids at once (utf-8, each valid: see
        profile_blocks.profile_ids): their dense ids, the unknown ones created."""
        return ensure_profiles(self, names)

    def ensure_profile(self, external: Any) -> int:
        """The dense id of a profile, creating it with no fields if it was never seen
        (an event or order for an unknown profile creates that profile)."""
        if isinstance(external, int) and not isinstance(external, bool):
            external = str(external)
        if not isinstance(external, str) or not external:
            raise DataError("expected a non-empty string or integer profile id", field="profile")
        if T.id_problem(external):
            raise DataError(T.id_problem(external), field="profile")
        before = self.ids.next
        dense = self.ids.resolve(external)
        if dense >= before:
            self.store.put(self.txn, "rows", u32(dense), b"{}")
            self.created += 1
            self.live_added.append(dense)
        return dense

    def _row(self, dense: int) -> dict[str, Any] | None:
        raw = self.store.get(self.txn, "rows", u32(dense))
        if raw is None:
            return None
        row = decode_row(raw, self.types)
        if self.held and dense < self.first_new and dense not in self.rewritten:
            self.rewritten.add(dense)  # the caller writes the row: from then on it is exact
            with_held(row, dense, self.held, self.snap.fields, self.types)
        return row

    def _merge(self, old: dict[str, Any] | None, record: dict) -> dict[str, Any]:
        new = dict(old) if old else {}
        info = self.info
        for name, value in record.items():
            if name == "id":
                continue
            if value is None:
                new.pop(name, None)
                continue
            field = info.get(name) or self._infer(name, value)
            try:
                new[name] = field.check(value)
            except ValueError as exc:
                raise DataError(str(exc), field=name) from None
        return new

    def _infer(self, name: str, value: Any) -> _Field:
        check_field_name(name)
        try:
            type_ = T.infer(value)
        except ValueError as exc:
            raise DataError(str(exc), field=name) from None
        return self.register(name, type_)

    def register(self, name: str, type_: str) -> _Field:
        """A field first seen in this batch, of the type inferred from its first value."""
        self.types[name] = self.new_types[name] = type_
        field = self.info[name] = _Field(type_)
        return field

    def _queue_changes(self, dense: int, old: dict, new: dict) -> None:
        info = self.info
        if not old:
            for name, value in new.items():
                info[name].add(dense, value)
            return
        for name, value in old.items():
            if new.get(name) != value:
                info[name].push(dense, value, True)
        for name, value in new.items():
            if old.get(name) != value:
                info[name].push(dense, value, False)

    # ------------------------------------------------------------------ flushing
    def flush(self) -> None:
        """Apply every queued change to the field writers."""
        if self.new_types:
            self.schema = self.schema.with_fields("profiles", self.new_types)
            self.writers.schema = self.schema
            self.new_types = {}
        for name, field in self.info.items():
            if not field.add_ids and not field.rm_ids:
                continue
            writer = self.writers.get(name)
            rm_ids = np.frombuffer(field.rm_ids, dtype=np.uint32)
            add_ids = np.frombuffer(field.add_ids, dtype=np.uint32)
            self.touched |= bitmap_of(rm_ids) | bitmap_of(add_ids)
            if isinstance(writer, RangeWriter):
                if len(rm_ids):
                    writer.remove(rm_ids)
                if len(add_ids) and field.is_float:
                    writer.add_floats(add_ids, np.frombuffer(field.add_vals, dtype=np.float64))
                elif len(add_ids):
                    writer.add(add_ids, np.frombuffer(field.add_vals, dtype=np.int64))
            else:
                if len(rm_ids):
                    writer.remove(rm_ids, np.frombuffer(field.rm_vals, dtype=np.uint32),
                                  field.values)
                if len(add_ids):
                    writer.add(add_ids, np.frombuffer(field.add_vals, dtype=np.uint32),
                               field.values)
            field.clear()
        self.segment_start = self.ids.next
        self.touched_old = set()

    def finish(self) -> tuple[Mapping[str, FieldIndex], BitMap, Schema]:
        """The next field indexes, live bitmap and schema."""
        self.flush()
        added = bitmap_of(np.frombuffer(self.live_added, dtype=np.uint32))
        self.touched |= added
        return self.writers.finish(), self.snap.live | added, self.schema


def delete_profiles(store: Store, txn: Txn, snapshot: Snapshot,
                    gone: BitMap) -> tuple[FieldWriters, Mapping[str, FieldIndex]]:
    """Remove these profiles from every field index and delete their rows."""
    writers = FieldWriters(snapshot, snapshot.schema)
    for name, index in snapshot.fields.items():
        if index.exists.intersect(gone):
            writer = writers.get(name)
            writer.drop(gone)
    for dense in gone:
        store.delete(txn, "rows", u32(dense))
    return writers, writers.finish()

