"""OrderBatch, the writer of orders: it applies order lines (one by one, or a block's
columns through order_blocks.py) inside one write transaction and builds the next
OrderIndex.  What a line may hold is in orders.py ("Choices where the contract is
silent"); the keys it writes are laid out in keys.py."""

from __future__ import annotations

from array import array
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson
from pyroaring import BitMap

from bitseg.index import keys as K
from bitseg.index import order_keys
from bitseg.index import store as store_module
from bitseg.index import types as T
from bitseg.index.blocks import RowBlock, Taken
from bitseg.index.errors import DataError
from bitseg.index.fields import ValueIndex, ValueWriter, bitmap_of, ids_of
from bitseg.index.ids import IdMap
from bitseg.index.keys import SEP, from_u32, order_exists_name, u32
from bitseg.index.order_blocks import take_block
from bitseg.index.order_index import (
    MAX_RUNS,
    NO_IDS,
    NO_KEYS,
    NO_VALID,
    NONE,
    Column,
    Columns,
    OrderIndex,
    _read_column,
    compute_runs,
)
from bitseg.index.order_keys import (
    DERIVED,
    DISTINCT,
    ITEM_KINDS,
    ITEM_RESERVED,
    MAX_ID_BYTES,
    QTY,
    QTY_SUM,
    RESERVED,
    append_column,
    dirty_chunks,
    put_bitmap,
    put_column,
    value_name,
)
from bitseg.index.order_queues import SetQueue, ValueQueue
from bitseg.index.order_rows import OrderRows
from bitseg.index.schema import Schema
from bitseg.index.store import Store, Txn, TxnReader, chunks_of

# Bytes of queued column writes and value changes (13 a column write, 8 a value) held
# before they are written (a spill): key columns in whole chunks into LMDB, owner / ts /
# item_owner into the batch's buffers of them, value changes into their bitmap writers.
# So what a batch holds does not grow with its file; it commits as one transaction still.
QUEUE_BYTES = 256 << 20
SPILL_CHECK = 1 << 16  # add() looks at the queues' size every this many lines


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
                 ensure_profile: Callable[[str], int], *, id_map: IdMap | None = None,
                 live: BitMap | None = None) -> None:
        self.store = store
        self.id_map = id_map  # the committed ids, looked up in memory by the block path
        self.live = live  # (idhash), with the live profiles they are current for
        self.txn = txn
        self.rows = OrderRows(store, txn)
        self.index = index
        self.schema = schema
        self.ensure_profile = ensure_profile
        self.types: dict[str, str] = dict(schema.orders)
        self.new_types: dict[str, str] = {}
        self.next = index.count
        self.next_item = index.item_count
        self.segment_start = index.count  # ids created at or after this: in the open segment
        self.touched_old: set[int] = set()  # older ids touched in the open segment
        self.pending: dict[str, ValueQueue] = {}
        self.writers: dict[str, ValueWriter] = {}
        self.touched_values = BitMap()  # the first id of each chunk whose value bitmaps changed
        self.item_pending: dict[str, ValueQueue] = {}  # value-typed item keys, per item id
        self.item_writers: dict[str, ValueWriter] = {}
        self.touched_item_values = BitMap()
        self.reindexing = False  # index_items: every stored item is being queued
        self.sets: dict[str, SetQueue] = {}  # order columns: "owner", "ts", fields, derived
        self.item_sets: dict[str, SetQueue] = {}  # item columns: "item_owner", item fields
        self.killed_items = array("I")
        self.live_added = array("I")
        self.live_removed = BitMap()
        self.created = 0
        self.updated = 0
        self._sinks: dict[str, tuple[bool, Any, str]] = {}
        self._item_sinks: dict[str, tuple[SetQueue, str] | None] = {}
        self._owner, self._ts = self._sets("owner"), self._sets("ts")
        self._item_owner = self._item_sets("item_owner")
        self.spilled: set[str] = set()  # key column queues whose whole chunks are in LMDB
        # owner / ts / item_owner spilled: (buffer, rows applied, dirty chunks, a write
        # below the snapshot's rows made it the batch's own copy)
        self.applied: dict[bytes, tuple[np.ndarray, int, set[int], bool]] = {}

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
        self.rows.put(oid, _dump(row))
        if fresh:
            self.created += 1
            self.live_added.append(oid)
        else:
            self.updated += 1
        if oid < self.segment_start:
            self.touched_old.add(oid)
        self._queue(oid, old, row, items is not None or old is None)
        if not self.count % SPILL_CHECK:
            self._bound_queues()

    def add_block(self, block: RowBlock) -> Taken:
        """Order lines of a RowBlock, column-wise where they are the common case
        (index/order_blocks.py); the rows it leaves go through add()."""
        taken = take_block(self, block)
        self._bound_queues()
        return taken

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
            self.rows.delete(oid)
            self.store.delete(self.txn, "orders", K.order_id_key(row["x"]))
            self._queue(oid, row, None, True)
        self.live_removed |= found
        self.flush()

    def _resolve(self, external: str) -> tuple[int, bool]:
        key = K.order_id_key(external)
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
        raw = self.rows.get(oid)
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
                    pending = self.item_pending.setdefault(name, ValueQueue())
                    pending.push(iid, _as_tuple(value), removing)

    def _sink(self, name: str) -> tuple[bool, Any, str]:
        """Where changes of an order-level name go: (is a value field, queue, type)."""
        sink = self._sinks.get(name)
        if sink is None:
            type_ = T.INT if name in DERIVED else self.types[name]
            if type_ in T.VALUE_TYPES:
                sink = (True, self.pending.setdefault(name, ValueQueue()), type_)
            else:
                sink = (False, self._sets("f:" + name), type_)
            self._sinks[name] = sink
        return sink

    def _item_sink(self, key: str) -> tuple[SetQueue, str] | None:
        """The item column of a numeric / date item key (None for value-typed keys)."""
        if key in self._item_sinks:
            return self._item_sinks[key]
        name = "items." + key
        type_ = self.types[name]
        sink = (self._item_sets("g:" + name), type_) if type_ in T.RANGE_TYPES else None
        self._item_sinks[key] = sink
        return sink

    def _sets(self, name: str) -> SetQueue:
        found = self.sets.get(name)
        if found is None:
            found = self.sets[name] = SetQueue()
        return found

    def _item_sets(self, name: str) -> SetQueue:
        found = self.item_sets.get(name)
        if found is None:
            found = self.item_sets[name] = SetQueue()
        return found

    # ------------------------------------------------------------------ spilling
    def _bound_queues(self) -> None:
        """Spill the queues when they hold more than QUEUE_BYTES."""
        writes = sum(len(q) for q in self.sets.values()) + \
            sum(len(q) for q in self.item_sets.values())
        values = sum(len(q.adds) + len(q.removals) for q in self.pending.values()) + \
            sum(len(q.adds) + len(q.removals) for q in self.item_pending.values())
        if 13 * writes + 8 * values > QUEUE_BYTES:
            self.spill()

    def spill(self) -> None:
        """Write what the queues hold into the transaction (or the batch's buffers), so
        that finish() writes the same entries as if nothing had been spilled."""
        self.flush()
        old = self.index
        self._spill_plain(b"owner", self._owner, old.owner_buf, old.count, self.next, 0)
        self._spill_plain(b"ts", self._ts, old.ts_buf, old.count, self.next, 0)
        self._spill_plain(b"item_owner", self._item_owner, old.item_owner_buf,
                          old.item_count, self.next_item, NONE)
        for kind, prefix, sets, rows in ((b"o", "f:", self.sets, self.next),
                                         (b"i", "g:", self.item_sets, self.next_item)):
            bits = order_keys.COL_BITS  # read when used, as the column writers do
            whole = rows >> bits << bits  # ids below: in chunks no later id reaches
            for name, queue in sets.items():
                if not name.startswith(prefix) or not len(queue):
                    continue
                ids, keys, valid = queue.arrays()
                cut = int(np.searchsorted(ids, whole))
                if cut:
                    append_column(self.store, self.txn, kind + SEP + name[2:].encode(),
                                  whole, ids[:cut], keys[:cut], valid[:cut], NO_IDS)
                    queue.keep(ids[cut:], keys[cut:], valid[cut:])
                    self.spilled.add(name)

    def _spill_plain(self, name: bytes, queue: SetQueue, buf: np.ndarray, old: int,
                     new: int, default: Any) -> None:
        """Apply an owner / ts / item_owner queue to the batch's buffer of that column."""
        ids, keys, _ = queue.arrays()
        start, dirty, below = old, set(), False
        state = self.applied.get(name)
        if state is not None:
            buf, start, dirty, below = state
        low = _below(ids, old)
        buf = _grow(buf, start, new, low and not below, default)
        buf[ids] = keys.astype(buf.dtype)
        dirty.update(dirty_chunks(ids))
        queue.keep(NO_IDS, NO_KEYS, NO_VALID)
        self.applied[name] = (buf, new, dirty, below or low)

    # ------------------------------------------------------------------ flushing
    def flush(self) -> None:
        """Apply the queued value changes to the bitmap writers."""
        for name, pending in self.pending.items():
            if pending.empty:
                continue
            writer = self.writers.get(name)
            if writer is None:
                writer = self.writers[name] = ValueWriter(self.index.values.get(name)
                                                          or ValueIndex())
            self.touched_values |= _apply_queue(writer, pending)
        for name, pending in self.item_pending.items():
            if pending.empty:
                continue
            writer = self.item_writers.get(name)
            if writer is None:
                writer = self.item_writers[name] = ValueWriter(
                    self.index.item_values.get(name) or ValueIndex())
            self.touched_item_values |= _apply_queue(writer, pending)
        self.segment_start = self.next
        self.touched_old = set()

    def finish(self) -> tuple[OrderIndex, Schema]:
        """Write every change into the transaction; the next index and schema."""
        self.rows.close()
        self.flush()
        store, txn, old = self.store, self.txn, self.index
        schema = self.schema
        if self.new_types:
            schema = schema.with_fields("orders", self.new_types)
        count, item_count = self.next, self.next_item
        # live
        added = bitmap_of(np.frombuffer(self.live_added, dtype=np.uint32))
        live = (old.live | added) - self.live_removed
        put_bitmap(store, txn, b"live", live, chunks_of(added | self.live_removed))
        # value bitmaps
        values = dict(old.values)
        chunks = chunks_of(self.touched_values)
        for name, writer in self.writers.items():
            index = values[name] = writer.finish()
            for value in writer.dirty:
                put_bitmap(store, txn, value_name(store, txn, name, value), index.eq(value),
                            chunks)
            put_bitmap(store, txn, order_exists_name(name), index.exists, chunks)
        values = {k: v for k, v in values.items() if v.exists or v.values}
        item_values = dict(old.item_values)
        chunks = chunks_of(self.touched_item_values)
        for name, writer in self.item_writers.items():
            index = item_values[name] = writer.finish()
            for value in writer.dirty:
                put_bitmap(store, txn, value_name(store, txn, name, value, ITEM_KINDS[0]),
                            index.eq(value), chunks)
            put_bitmap(store, txn, order_exists_name(name, ITEM_KINDS[1]), index.exists,
                       chunks)
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
        store.put(txn, "orders", K.ORDERS_META, orjson.dumps({"count": count, "items": item_count,
                                                        "item_values": indexed}))
        runs = self._runs(ts_buf[:count])
        index = OrderIndex(count, item_count, live, owner_buf, ts_buf, runs, values, columns,
                           item_owner_buf, item_columns, item_values=item_values,
                           items_indexed=indexed)
        return index, schema

    def _columns(self, kind: bytes, old: Columns, prefix: str, sets: dict[str, SetQueue],
                 old_rows: int, rows: int, kills: np.ndarray) -> Columns:
        """The next key columns of one kind: the changed ones rebuilt, those nobody has
        read yet and this batch leaves alone, or only appends to, still left in LMDB (so
        the batch costs what it adds, not a read of the whole column)."""
        names = {n[len(prefix):] for n in sets if n.startswith(prefix)}
        kills_old = bool((kills < old_rows).any()) if len(kills) else False
        entries: dict[str, Column | None] = {}
        for name in names | set(old):
            if prefix + name in self.spilled:
                entries[name] = self._spilled(kind + SEP + name.encode(), rows,
                                              sets[prefix + name], kills)
                continue
            if not kills_old and not old.loaded(name) and old_rows:
                if name in names:
                    written = sets[prefix + name].arrays()
                    if _below(written[0], old_rows):
                        entries[name] = self._column(kind + SEP + name.encode(),
                                                     old.get(name), old_rows, rows,
                                                     sets[prefix + name], kills)
                        continue
                    append_column(self.store, self.txn, kind + SEP + name.encode(), rows,
                                  *written, kills)
                entries[name] = None
                continue
            entries[name] = self._column(kind + SEP + name.encode(), old.get(name),
                                         old_rows, rows, sets.get(prefix + name), kills)
        return Columns(kind, rows, entries, TxnReader(self.store, self.txn))

    def _spilled(self, name: bytes, rows: int, queue: SetQueue, kills: np.ndarray
                 ) -> Column | None:
        """A key column whose whole chunks a spill wrote: the rest of its writes appended
        (the column left in LMDB, read when first used); when items were killed, read back
        through the transaction and rebuilt, so every chunk holding one is rewritten."""
        if not len(kills):
            append_column(self.store, self.txn, name, rows, *queue.arrays(), NO_IDS)
            return None
        column = _read_column(TxnReader(self.store, self.txn), name, rows)
        return self._column(name, column, rows, rows, queue, kills)

    def _runs(self, ts: np.ndarray) -> np.ndarray | None:
        """The runs of the new ts column; when only appended, from the old runs."""
        old = self.index
        ts_ids = self._ts.written()
        spilled = self.applied.get(b"ts")
        if _below(ts_ids, old.count) or (spilled is not None and spilled[3]) or \
                old.runs is None or not old.count:
            return compute_runs(ts)
        if len(ts) == old.count:
            return old.runs
        tail = ts[old.count - 1:]
        breaks = np.flatnonzero(tail[1:] < tail[:-1]) + old.count
        if len(old.runs) + len(breaks) > MAX_RUNS:
            return None
        return np.concatenate((old.runs, breaks)).astype(np.int64)

    def _plain(self, name: bytes, buf: np.ndarray, old: int, new: int, sets: SetQueue | None,
               default: Any, kills: np.ndarray = None) -> np.ndarray:
        """owner / ts / item_owner: apply the queued writes (then the kills), persist."""
        ids, keys, _ = sets.arrays() if sets else (NO_IDS, NO_KEYS, None)
        kills = NO_IDS if kills is None else kills
        start, spilled, own = old, set(), False  # a spill's buffer, dirty chunks, copy
        state = self.applied.get(name)
        if state is not None:
            buf, start, spilled, own = state
        elif not len(ids) and not len(kills) and old == new:
            return buf
        copy = not own and (_below(ids, old) or _below(kills, old))
        buf = _grow(buf, start, new, copy, default)
        buf[ids] = keys.astype(buf.dtype)
        if len(kills):
            buf[kills] = NONE
        dirty = sorted(spilled | set(dirty_chunks(ids)) | set(dirty_chunks(kills[kills < old])))
        put_column(self.store, self.txn, name, buf, None, new, dirty)
        return buf

    def _column(self, name: bytes, col: Column | None, old: int, new: int, sets: SetQueue | None,
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
        dirty = sorted(set(dirty_chunks(ids)) | set(dirty_chunks(old_kills)))
        put_column(self.store, self.txn, name, keys_buf, valid_buf, new, dirty)
        bound = max(col.bound, int(np.abs(keys).max(initial=0)))
        if copy:
            complete = bool(valid_buf[:new].all())
        else:  # appended: the old ids are as they were (scanning them cost O(store))
            complete = (col.complete or old == 0) and bool(valid_buf[old:new].all())
        return Column(keys_buf, valid_buf, bound, complete)


def _apply_queue(writer: ValueWriter, pending: ValueQueue) -> BitMap:
    """Apply a field's queued removals, then additions, to its writer; the first id of
    each store chunk touched (all that chunks_of needs, without a bitmap of every id)."""
    touched = BitMap()
    for removing, (ids, codes) in ((True, pending.removed()), (False, pending.added())):
        if not len(ids):
            continue
        bits = store_module.CHUNK_BITS  # read when used, as chunks_of does
        chunks = np.flatnonzero(np.bincount(ids >> bits)).astype(np.uint32)
        touched |= bitmap_of(chunks << bits)
        if len(pending.values) <= 1 << 16:  # numpy sorts 16-bit codes by radix, ~3x faster
            codes = codes.astype(np.uint16)
        (writer.remove if removing else writer.add)(ids, codes, pending.values)
    pending.clear()
    return touched


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


def index_items(store: Store, txn: Txn, index: OrderIndex, schema: Schema) -> OrderIndex:
    """For a store written before item_values existed: build them once from the stored
    rows (in the caller's write transaction) and mark the store as indexed."""
    batch = OrderBatch(store, txn, index, schema, lambda external: 0)
    batch.reindexing = True
    for oid, raw in batch.rows.items():
        row = orjson.loads(raw)
        if row.get("it") and index.item_owner[row["i0"]] == oid:
            batch.queue_item_values(row["i0"], row["it"], removing=False)
    return batch.finish()[0]
