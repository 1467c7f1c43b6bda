"""The engine: a store, its published snapshot, and the operations on them.

Readers take the current snapshot (one reference) and never wait; writers run one at a
time, build the next snapshot inside an LMDB transaction and publish it only after the
commit, so a reader sees a batch entirely or not at all.
"""

from __future__ import annotations

import copy
import functools
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson
from pyroaring import BitMap

from bitseg.index import keys as K
from bitseg.index import types as T
from bitseg.index.blocks import RowBlock, apply_block
from bitseg.index.cache import LRU, CacheStats, ResultCache, canonical, parsed_weight
from bitseg.index.errors import BitsegError, DataError, NotFound, StoreError
from bitseg.index.evaluate import Evaluator
from bitseg.index.event_batch import EventBatch
from bitseg.index.event_index import load_events, write_catalog
from bitseg.index.fields import (
    RangeIndex,
    RangeWriter,
    StoredFields,
    ValueIndex,
    fields_pinned,
    ids_of,
)
from bitseg.index.ids import IdMap
from bitseg.index.keys import SEP, u32
from bitseg.index.order_batch import OrderBatch, index_items
from bitseg.index.order_index import (
    StoredOrders,
    TxnView,
    load_orders,
    orders_meta,
    orders_of,
)
from bitseg.index.profiles import (
    HELD_KEY,
    FieldWriters,
    ProfileBatch,
    decode_row,
    delete_profiles,
    held_fields,
    with_held,
)
from bitseg.index.rules import RULE_TYPES, Rule, parse_rule
from bitseg.index.sample import Buckets
from bitseg.index.schema import Schema
from bitseg.index.snapshot import FieldIndex, SegmentLookup, Snapshot
from bitseg.index.store import Store, Txn, chunks_of
from bitseg.index.top import TopSets

LIVE = b"live"
PARSED_RULES = 4096
Also = Callable[[Txn, Snapshot], dict[str, Any]]
SERVER_EVENTS = frozenset({"segment_entered", "segment_exited"})  # CONTRACT §2.5


@dataclass(frozen=True)
class BatchReport:
    created: int  # profiles created (for events and orders: profiles seen for the first time)
    updated: int
    version: int
    rows: int = 0  # events or orders added


_timestamp = functools.lru_cache(maxsize=1024)(T.parse_timestamp)  # callers repeat as_of


def as_of_micros(as_of: datetime | str | int | None) -> int:
    """Evaluation time as µs since the epoch: None is now; naive datetimes are UTC."""
    if as_of is None:
        as_of = datetime.now(timezone.utc)
    if isinstance(as_of, int) and not isinstance(as_of, bool):
        return as_of
    if isinstance(as_of, str):
        try:
            return _timestamp(as_of)
        except ValueError as exc:
            raise BitsegError(f"as_of: {exc}") from None
    if isinstance(as_of, datetime):
        if as_of.tzinfo is None:
            as_of = as_of.replace(tzinfo=timezone.utc)
        return (as_of - T.EPOCH) // T.ONE_US
    raise BitsegError(f"as_of: expected a timestamp, got {as_of!r}")


# ---------------------------------------------------------------------- bitmap names
def _value_name(store: Store, txn: Txn, field: str, value: Any) -> bytes:
    """The name of a value's bitmap; a name too long for an LMDB key names the value by
    its digest instead, the value kept in meta (names that fit are what they always were)."""
    text = orjson.dumps(value)
    name = K.value_name(field, text)
    if len(name) <= K.BITMAP_NAME_BYTES:
        return name
    hashed = K.digest(text)
    store.put(txn, "meta", K.long_value_key(hashed), text)
    return K.long_value_name(field, hashed)


def persist_fields(store: Store, txn: Txn, writers: FieldWriters,
                   fields: Mapping[str, FieldIndex], chunks: set[int]) -> None:
    """Write the bitmaps the writers changed, for the touched chunks (or wholly if rebuilt)."""
    for name, writer in writers.writers.items():
        index = fields[name]
        if isinstance(index, ValueIndex):
            for value in writer.dirty:
                store.put_bitmap(txn, _value_name(store, txn, name, value), index.eq(value),
                                 chunks)
            store.put_bitmap(txn, K.exists_name(name), index.exists, chunks)
            continue
        assert isinstance(writer, RangeWriter) and isinstance(index, RangeIndex)
        scope: set[int] | None = chunks
        if writer.rebuilt:
            store.delete_bitmaps(txn, K.field_prefix(name))
            scope = None
        for bit, bitmap in enumerate(index.slices):
            store.put_bitmap(txn, K.slice_name(name, bit), bitmap, scope)
        store.put_bitmap(txn, K.exists_name(name), index.exists, scope)
        mds = index.monthdays.keys() if writer.rebuilt else writer.dirty_monthdays
        for md in mds:
            store.put_bitmap(txn, K.monthday_name(name, md), index.monthdays.get(md, BitMap()),
                             scope)
        store.put_json(txn, K.range_meta_key(name),
                       {"base": index.base, "unit": index.unit, "depth": len(index.slices),
                        "digits": index.digits, "rounded": index.rounded})


def read_field(reader: Any, name: str, type_: str) -> FieldIndex:
    """A profile field's index from its stored bitmaps, read through a snapshot's reader
    (its chunks joined)."""
    prefix = K.field_prefix(name)
    chunks: dict[bytes, list[BitMap]] = {}
    for key, raw in reader.items("bitmaps", prefix):
        part = key[len(prefix):-K.CHUNK_KEY_BYTES]  # the kind, and its value or number
        chunks.setdefault(part, []).append(BitMap.deserialize(raw))
    exists = BitMap()
    values: dict[Any, BitMap] = {}
    slices: dict[int, BitMap] = {}
    monthdays: dict[int, BitMap] = {}
    for part, found in chunks.items():
        bitmap = BitMap.union(*found)
        kind, _, rest = part.partition(SEP)
        if kind == b"x":
            exists = bitmap
        elif kind == b"v":
            values[orjson.loads(rest)] = bitmap
        elif kind == b"h":  # a long value, named by its digest
            values[orjson.loads(reader.get("meta", K.long_value_key(rest)))] = bitmap
        elif kind == b"s":
            slices[int(rest)] = bitmap
        elif kind == b"m":
            monthdays[int(rest)] = bitmap
    if type_ not in T.RANGE_TYPES:  # values are single keywords or bools, never lists
        return ValueIndex(values, exists)
    raw = reader.get("meta", K.range_meta_key(name).encode())
    meta = orjson.loads(raw) if raw is not None else {"base": 0, "unit": 1, "depth": 0}
    return RangeIndex(meta["base"], meta["unit"],
                      tuple(slices.get(i, BitMap()) for i in range(meta["depth"])), exists,
                      monthdays, meta.get("digits"), meta.get("rounded", False))


def stored_fields(reader: Any, schema: Schema) -> StoredFields:
    """The fields of the schema that have stored bitmaps, each read on first use."""
    types = dict(schema.profiles)
    present = []
    for name in types:
        prefix = K.field_prefix(name)
        key = reader.key_at("bitmaps", prefix)
        if key is not None and key.startswith(prefix):
            present.append(name)
    return StoredFields(lambda at, name: read_field(at, name, types[name]), reader,
                        dict.fromkeys(present))


def read_live(reader: Any) -> BitMap:
    """The live profiles: the chunks of the LIVE bitmap joined."""
    found = reader.items("bitmaps", K.bitmap_prefix(LIVE))
    chunks = [BitMap.deserialize(raw) for _, raw in found]
    return BitMap.union(*chunks) if chunks else BitMap()


def _event_type(record: Any) -> str | None:
    """A record's event type when it is a string (other shapes are the batch's to refuse)."""
    event = record.get("event") if isinstance(record, dict) else None
    return event if isinstance(event, str) else None


class Engine:
    """One open store. Thread-safe: any number of readers, one writer at a time."""

    takes_blocks = True  # batches also take RowBlocks (index/blocks.py), the bulk path

    def __init__(self, store: Store, ids: IdMap, snapshot: Snapshot) -> None:
        self.store = store
        self._ids = ids
        self._snapshot = replace(snapshot, samples=Buckets(lambda: self._ids),
                                 tops=TopSets(lambda: self._ids))
        self._write_lock = threading.Lock()
        self._parsed = LRU(PARSED_RULES, weigh=parsed_weight)
        self._results = ResultCache()
        self.cache_results = True  # benchmarks turn it off to measure evaluation itself

    @classmethod
    def open(cls, path: str | Path, *, segments: SegmentLookup | None = None,
             bulk: int | None = None, readonly: bool = False) -> Engine:
        """Open the store at path (created if missing). `bulk`: open for a bulk load that
        may add about this many bytes (see Store; loaders.dataset.bulk_reserve).
        `readonly`: open an existing store beside its writer (another process, e.g. a
        benchmark or a report) without taking the writer lock; every write then fails
        with StoreError and changes nothing. It answers from what was committed when it
        opened."""
        store = Store(path, bulk=bulk, readonly=readonly)
        try:  # what every rule needs now; field bitmaps and orders when first used
            with store.read() as txn:
                schema = Schema.from_json(store.get_json(txn, "schema") or {})
                version = store.get_json(txn, "version") or 0
                ids = IdMap.load(store, txn)
                events = load_events(store, txn, version)
                meta = orders_meta(TxnView(store, txn)) or {}
            upgrade = bool(meta) and not meta.get("item_values")
            if readonly and upgrade:
                raise StoreError(f"{path}: this store needs a one-time upgrade (per-item "
                                 "values); open it once for writing first")
            if upgrade:  # once, for a store from before per-item values
                with store.write() as txn:
                    index_items(store, txn, load_orders(store, txn, schema), schema)
            if not events.catalogued and events.type_days and not readonly:  # once, from before
                with store.write() as txn:
                    write_catalog(store, txn, events)
                events = replace(events, catalogued=True)
            reader = store.reader()
            live, fields = read_live(reader), stored_fields(reader, schema)
        except BaseException:
            store.close()
            raise
        snapshot = Snapshot(version, live, schema, fields, events=events.pinned(reader),
                            orders=StoredOrders(reader), reader=reader)
        if segments is not None:
            snapshot = replace(snapshot, segments=segments)
        return cls(store, ids, snapshot)

    def close(self) -> None:
        with self._write_lock:
            self.store.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ reading
    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    @property
    def schema(self) -> Schema:
        return self._snapshot.schema

    @property
    def ids(self) -> IdMap:
        return self._ids

    def total(self) -> int:
        return len(self._snapshot.live)

    def cache_stats(self) -> CacheStats:
        """The result cache's hits and misses since open, and its size now."""
        return self._results.stats()

    def parse(self, rule: Any, snapshot: Snapshot | None = None) -> Rule:
        """A rule in JSON form (dict or text) -> the typed tree; typed rules pass through.
        Parsed rules are cached by their canonical JSON and the schema."""
        if isinstance(rule, RULE_TYPES):
            return rule
        schema = (snapshot or self._snapshot).schema
        text = canonical(rule)
        found = self._parsed.get(text) if text is not None else None
        if found is not None and found[0] is schema:
            return found[1]
        typed = parse_rule(rule, schema)
        if text is not None:
            self._parsed.put(text, (schema, typed))
        return typed

    def _answer(self, kind: str, rule: Any, as_of: Any) -> Any:
        """The rule's count or member bitmap on the current snapshot, from the result
        cache when the same question was asked since the last write (never mutate it)."""
        snap = self._snapshot
        typed, as_of_us = self.parse(rule, snap), as_of_micros(as_of)
        evaluator = Evaluator(snap, as_of_us)
        compute = evaluator.count if kind == "count" else evaluator.bitmap
        if not self.cache_results:
            return compute(typed)
        key = self._results.key(typed, snap, as_of_us)
        found = self._results.get(kind, snap, key)
        if found is None:
            found = compute(typed)
            if snap is self._snapshot:
                self._results.put(kind, snap, key, found)
        return found

    def _bitmap(self, rule: Any, as_of: Any) -> BitMap:
        return self._answer("bitmap", rule, as_of)

    def bitmap(self, rule: Any, *, as_of: datetime | str | None = None) -> BitMap:
        """The rule's members, shared with the result cache: never mutate it."""
        return self._answer("bitmap", rule, as_of)

    def evaluate(self, rule: Any, *, as_of: datetime | str | None = None) -> BitMap:
        return BitMap(self._bitmap(rule, as_of))

    def count(self, rule: Any, *, as_of: datetime | str | None = None) -> int:
        return self._answer("count", rule, as_of)

    def members(self, rule: Any, *, as_of: datetime | str | None = None,
                limit: int | None = None) -> list[str]:
        dense = ids_of(self._bitmap(rule, as_of))
        return self._ids.externals(dense if limit is None else dense[:limit])

    def dense_id(self, profile_id: str, snapshot: Snapshot | None = None) -> int:
        """The dense id of a live profile (in the current snapshot, or the one given);
        NotFound otherwise."""
        snap = snapshot or self._snapshot
        dense = self._ids.lookup(profile_id, reader=snap.reader)
        if dense is None or dense not in snap.live:
            raise NotFound("profile", profile_id)
        return dense

    def is_member(self, profile_id: str, rule: Any, *,
                  as_of: datetime | str | None = None) -> bool:
        snap = self._snapshot
        parsed = self.parse(rule, snap)
        dense = self.dense_id(profile_id, snap)
        return Evaluator(snap, as_of_micros(as_of)).contains(parsed, dense)

    def profile(self, profile_id: str) -> dict[str, Any]:
        """A profile's current values as a user sees them."""
        snap = self._snapshot
        dense = self.dense_id(profile_id, snap)
        types = snap.schema.profiles
        raw = snap.reader.get("rows", u32(dense))
        row = decode_row(raw, types) if raw is not None else {}
        held = held_fields(snap.reader.get("meta", HELD_KEY.encode()))
        with_held(row, dense, held, snap.fields, types)
        return {"id": profile_id, **{k: T.display(types[k], v) for k, v in row.items()}}

    def reading(self, snapshot: Snapshot) -> Engine:
        """A read-only view of this engine answering on `snapshot` (this engine's, with a
        part replaced: a sharded store's top sets chosen over every shard), without the
        result cache, whose answers are the current snapshot's. Never write through it."""
        view = copy.copy(self)
        view._snapshot = snapshot
        view.cache_results = False
        return view

    # ------------------------------------------------------------------ writing
    def set_segments(self, segments: SegmentLookup) -> None:
        """Plug in the segment lookup that {"segment": name} resolves through."""
        with self._write_lock:
            self._snapshot = replace(self._snapshot, segments=segments)

    def set_external(self, external: Any) -> None:
        """Plug in the provider of {"sql": ...} rules' ids (index/sqlrule.ExternalIds)."""
        with self._write_lock:
            self._snapshot = replace(self._snapshot, external=external)

    def declare_schema(self, declared: Any, *, source: str = "schema") -> Schema:
        with self._write_lock:
            snap = self._snapshot
            schema = snap.schema.declare(declared, source=source)
            if schema != snap.schema:
                if not self.store.readonly:  # read-only: declared for this process alone
                    with self.store.write() as txn:
                        self.store.put_json(txn, "schema", schema.to_json())
                self._snapshot = replace(snap, schema=schema)
            return schema

    def upsert_profiles(self, records: Iterable[Any] | Callable[[Snapshot], Iterable[Any]], *,
                        file: str | None = None, also: Also | None = None) -> BatchReport:
        """Apply a batch of profile records atomically (see docs/ENGINE_API.md); `records`
        and `also` as for track_events (bulk actions and traits record an audit entry in
        the same transaction)."""
        return self._batch(records, file, None, also)

    def track_events(self, records: Iterable[Any] | Callable[[Snapshot], Iterable[Any]], *,
                     file: str | None = None, also: Also | None = None,
                     server_events: bool = False) -> BatchReport:
        """Append a batch of events atomically; unknown profiles are created empty.

        The types the server records itself (SERVER_EVENTS) are a DataError, so no client
        can forge a segment entry or exit; only the segments module passes
        `server_events=True`.

        `records` may also be a function of the snapshot the batch builds on (called
        under the write lock), for changes computed from the data they change.
        `also(txn, snapshot)`, if given, runs inside the same transaction after the events
        are written (so a segment refresh and its entered/exited events commit together)
        and returns attributes of the Snapshot to publish with the batch (e.g. segments).
        """
        return self._batch(records, file, "events", also,
                           frozenset() if server_events else SERVER_EVENTS)

    def add_orders(self, records: Iterable[Any], *, file: str | None = None,
                   also: Also | None = None) -> BatchReport:
        """Apply a batch of order lines atomically; unknown profiles are created empty, and
        a later line with the same order id updates that order. `also` as for
        track_events (the sharded front stages a two-phase commit's batch with it)."""
        return self._batch(records, file, "orders", also)

    def _batch(self, records: Iterable[Any], file: str | None, child: str | None,
               also: Also | None = None, refused: frozenset[str] = frozenset()
               ) -> BatchReport:
        """One write transaction: profile changes, plus events or orders when `child` says;
        an event whose type is in `refused` fails the batch."""
        with self._write_lock:
            snap = self._snapshot
            version = snap.version + 1
            with self.store.write() as txn:
                ids = self._ids.writer(txn)
                profiles = ProfileBatch(self.store, txn, snap, ids)
                batch: Any = profiles
                if child == "events":
                    batch = EventBatch(self.store, txn, snap.events, snap.schema,
                                       profiles.ensure_profile, version, ids.known,
                                       id_map=self._ids, live=snap.live)
                elif child == "orders":
                    batch = OrderBatch(self.store, txn, orders_of(snap.orders),
                                       snap.schema, profiles.ensure_profile,
                                       id_map=self._ids, live=snap.live)
                batch.refused = refused  # add_block leaves an event of these types to add
                if callable(records):
                    records = records(snap)

                def add_row(line: int, record: Any) -> None:
                    try:
                        if refused and _event_type(record) in refused:
                            raise DataError(f"event type {record['event']!r} is recorded by "
                                            "the server itself and cannot be sent",
                                            field="event")
                        batch.add(record, line)
                    except DataError as exc:  # a columnar batch may name an earlier line
                        raise exc.located(file, line if exc.line is None else exc.line) \
                            from None

                for position, item in enumerate(records, 1):
                    if isinstance(item, RowBlock):
                        try:
                            apply_block(batch, item, add_row)
                        except DataError as exc:
                            raise exc.located(file, exc.line) from None
                        continue
                    line, record = item if isinstance(item, tuple) else (position, item)
                    add_row(line, record)
                changes: dict[str, Any] = {}
                if child is not None:  # first: its last rows may still create profiles
                    try:
                        changes[child], child_schema = batch.finish()
                    except DataError as exc:
                        raise exc.located(file, exc.line) from None
                fields, live, schema = profiles.finish()
                if child is not None:
                    schema = replace(schema, **{child: child_schema.section(child)})
                chunks = chunks_of(profiles.touched)
                persist_fields(self.store, txn, profiles.writers, fields, chunks)
                self.store.put_bitmap(txn, LIVE, live, chunks)
                if schema != snap.schema:
                    self.store.put_json(txn, "schema", schema.to_json())
                self.store.put_json(txn, "version", version)
                new_ids = ids.finish()
                if also is not None:
                    changes.update(also(txn, replace(snap, version=version, live=live,
                                                     schema=schema, fields=fields, **changes)))
            reader = self.store.reader()  # committed: lazy reads and lookups as of it
            for child_name in ("events", "orders"):
                if child_name in changes:
                    changes[child_name] = changes[child_name].pinned(reader)
            self._ids = new_ids
            self._snapshot = replace(snap, version=version, live=live, schema=schema,
                                     fields=fields_pinned(fields, reader), reader=reader,
                                     **changes)
            rows = batch.count if child is not None else 0
            return BatchReport(profiles.created, profiles.updated, version, rows)

    def write_columns(self, build: Callable[[Txn, Snapshot], tuple[FieldWriters, Schema,
                                                                     BitMap]],
                      also: Also | None = None) -> int:
        """One write transaction in which `build` changes rows and field writers directly
        (column-wise, for changes to many existing profiles at once, e.g. bulk actions);
        it returns the writers, the schema and the ids it touched, or None when there is
        nothing to change. Persisted and published like a batch; returns the new version
        (the current one when nothing changed: readers' caches stay valid)."""
        with self._write_lock:
            snap = self._snapshot
            version = snap.version + 1
            changes: dict[str, Any] = {}
            with self.store.write() as txn:
                built = build(txn, snap)
                if built is None:
                    return snap.version
                writers, schema, touched = built
                fields = writers.finish()
                persist_fields(self.store, txn, writers, fields, chunks_of(touched))
                if schema != snap.schema:
                    self.store.put_json(txn, "schema", schema.to_json())
                self.store.put_json(txn, "version", version)
                if also is not None:
                    changes = also(txn, replace(snap, version=version, schema=schema,
                                                fields=fields))
            reader = self.store.reader()
            self._snapshot = replace(snap, version=version, schema=schema,
                                     fields=fields_pinned(fields, reader), reader=reader,
                                     **changes)
            return version

    def delete_profiles(self, profile_ids: Iterable[str]) -> int:
        """Delete profiles by id, all or none: NotFound names the first unknown id."""
        with self._write_lock:
            snap = self._snapshot
            gone, names = BitMap(), []
            for external in profile_ids:
                dense = self._ids.lookup(external, reader=snap.reader)
                if dense is None or dense not in snap.live:
                    raise NotFound("profile", external)
                gone.add(dense)
                names.append(external)
            if not gone:
                return 0
            with self.store.write() as txn:
                for external in names:  # a re-created profile gets a new dense id, so its
                    self.store.delete(txn, "ids", external.encode())  # old events stay apart
                writers, fields = delete_profiles(self.store, txn, snap, gone)
                chunks = chunks_of(gone)
                persist_fields(self.store, txn, writers, fields, chunks)
                live = snap.live - gone
                self.store.put_bitmap(txn, LIVE, live, chunks)
                version = snap.version + 1
                self.store.put_json(txn, "version", version)
            reader = self.store.reader()
            self._snapshot = replace(snap, version=version, live=live,
                                     fields=fields_pinned(fields, reader), reader=reader)
            return len(gone)
