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
from typing import Any

import numpy as np
import orjson
from pyroaring import BitMap

from bitseg.index import types as T
from bitseg.index.errors import DataError
from bitseg.index.fields import RangeIndex, RangeWriter, ValueIndex, ValueWriter, bitmap_of
from bitseg.index.ids import IdWriter
from bitseg.index.schema import Schema
from bitseg.index.snapshot import FieldIndex, Snapshot, empty_index
from bitseg.index.store import Store, Txn, u32

Writer = ValueWriter | RangeWriter


def decode_row(raw: bytes, types: Mapping[str, str]) -> dict[str, Any]:
    row = orjson.loads(raw)
    for name, value in row.items():
        if types.get(name) == T.KEYWORDS:
            row[name] = tuple(value)
    return row


def check_field_name(name: str) -> None:
    if not name or any(ord(ch) < 32 for ch in name):
        raise DataError("field names must be non-empty and free of control characters",
                        field=name)


class _Queue:
    """The value changes of one field waiting for the next flush."""

    __slots__ = ("add_ids", "add_vals", "rm_ids", "rm_vals")

    def __init__(self, range_field: bool) -> None:
        code = "q" if range_field else "I"
        self.add_ids, self.add_vals = array("I"), array(code)
        self.rm_ids, self.rm_vals = array("I"), array(code)


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

    def finish(self) -> dict[str, FieldIndex]:
        fields = dict(self.snap.fields)
        for name, writer in self.writers.items():
            fields[name] = writer.finish()
        return fields


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
        self.queues: dict[str, _Queue] = {}
        self.codes: dict[str, dict[Any, int]] = {}
        self.values: dict[str, list] = {}
        self.segment_start = ids.next  # ids created at or after this are in the open segment
        self.touched_old: set[int] = set()  # pre-existing ids touched in the open segment
        self.touched = BitMap()
        self.live_added: array = array("I")
        self.created = 0
        self.updated = 0

    # ------------------------------------------------------------------ records
    def add(self, record: Any) -> None:
        if not isinstance(record, dict):
            raise DataError("expected a JSON object")
        external = record.get("id")
        if isinstance(external, int) and not isinstance(external, bool):
            external = str(external)
        if not isinstance(external, str) or not external:
            raise DataError("expected a non-empty string or integer id", field="id")
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

    def _row(self, dense: int) -> dict[str, Any] | None:
        raw = self.store.get(self.txn, "rows", u32(dense))
        return None if raw is None else decode_row(raw, self.types)

    def _merge(self, old: dict[str, Any] | None, record: dict) -> dict[str, Any]:
        new = dict(old) if old else {}
        for name, value in record.items():
            if name == "id":
                continue
            if value is None:
                new.pop(name, None)
                continue
            type_ = self.types.get(name) or self._infer(name, value)
            new[name] = T.check_value(type_, value, field=name)
        return new

    def _infer(self, name: str, value: Any) -> str:
        check_field_name(name)
        try:
            type_ = T.infer(value)
        except ValueError as exc:
            raise DataError(str(exc), field=name) from None
        self.types[name] = self.new_types[name] = type_
        return type_

    def _queue_changes(self, dense: int, old: dict, new: dict) -> None:
        for name, value in old.items():
            if new.get(name) != value:
                self._queue(name, dense, value, removing=True)
        for name, value in new.items():
            if old.get(name) != value:
                self._queue(name, dense, value, removing=False)

    def _queue(self, name: str, dense: int, value: Any, *, removing: bool) -> None:
        queue = self.queues.get(name)
        type_ = self.types[name]
        if queue is None:
            queue = self.queues[name] = _Queue(type_ in T.RANGE_TYPES)
        ids, vals = (queue.rm_ids, queue.rm_vals) if removing else (queue.add_ids, queue.add_vals)
        if type_ in T.RANGE_TYPES:
            ids.append(dense)
            vals.append(T.range_key(type_, value))
            return
        codes = self.codes.get(name)
        if codes is None:
            codes = self.codes[name] = {}
            self.values[name] = []
        for item in (value if type_ == T.KEYWORDS else (value,)):
            code = codes.get(item)
            if code is None:
                code = codes[item] = len(codes)
                self.values[name].append(item)
            ids.append(dense)
            vals.append(code)

    # ------------------------------------------------------------------ flushing
    def flush(self) -> None:
        """Apply every queued change to the field writers."""
        if self.new_types:
            self.schema = self.schema.with_fields("profiles", self.new_types)
            self.writers.schema = self.schema
            self.new_types = {}
        for name, queue in self.queues.items():
            writer = self.writers.get(name)
            rm_ids = np.frombuffer(queue.rm_ids, dtype=np.uint32)
            add_ids = np.frombuffer(queue.add_ids, dtype=np.uint32)
            self.touched |= bitmap_of(rm_ids) | bitmap_of(add_ids)
            if isinstance(writer, RangeWriter):
                if len(rm_ids):
                    writer.remove(rm_ids)
                if len(add_ids):
                    writer.add(add_ids, np.frombuffer(queue.add_vals, dtype=np.int64))
            else:
                values = self.values[name]
                if len(rm_ids):
                    writer.remove(rm_ids, np.frombuffer(queue.rm_vals, dtype=np.uint32), values)
                if len(add_ids):
                    writer.add(add_ids, np.frombuffer(queue.add_vals, dtype=np.uint32), values)
        self.queues = {}
        self.segment_start = self.ids.next
        self.touched_old = set()

    def finish(self) -> tuple[dict[str, FieldIndex], BitMap, Schema]:
        """The next field indexes, live bitmap and schema."""
        self.flush()
        added = bitmap_of(np.frombuffer(self.live_added, dtype=np.uint32))
        self.touched |= added
        return self.writers.finish(), self.snap.live | added, self.schema


def delete_profiles(store: Store, txn: Txn, snapshot: Snapshot,
                    gone: BitMap) -> tuple[FieldWriters, dict[str, FieldIndex]]:
    """Remove these profiles from every field index and delete their rows."""
    writers = FieldWriters(snapshot, snapshot.schema)
    for name, index in snapshot.fields.items():
        if index.exists.intersect(gone):
            writer = writers.get(name)
            writer.drop(gone)
    for dense in gone:
        store.delete(txn, "rows", u32(dense))
    return writers, writers.finish()


def is_value_index(index: FieldIndex) -> bool:
    return isinstance(index, ValueIndex)
