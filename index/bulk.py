"""Bulk actions on the members of a segment or rule: set, unset, add or remove a keyword.

An action is planned column-wise on one snapshot: the members come from the rule, and
the members it would change are found with bitmaps (members minus those already holding
the value, members that have the field, ...), so a dry run reads no rows.  Applying it
is one write transaction (engine.write_columns) that changes the field's bitmaps from
the changed set alone (the new value's bitmap gains it, the old values' bitmaps lose
it), and the audit entry is written in the same transaction: a crash leaves neither.
The rows are not rewritten: the field becomes held by its index (profiles.with_held),
except a float field, whose rows are rewritten too (its index rounds to a scale).

Why an audit entry rather than an event per changed profile: one small record explains
the whole action (who was targeted, what changed, how many) and costs nothing per
profile, where a million events would double the write.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import orjson
from pyroaring import BitMap

from bitseg.index import types as T
from bitseg.index.engine import Also, Engine, as_of_micros
from bitseg.index.errors import BitsegError, DataError
from bitseg.index.evaluate import Evaluator
from bitseg.index.fields import RangeIndex, RangeWriter, ValueIndex, ValueWriter, ids_of
from bitseg.index.keys import u32
from bitseg.index.profiles import HOLDABLE, FieldWriters, check_field_name, hold_fields
from bitseg.index.schema import Schema
from bitseg.index.snapshot import Snapshot
from bitseg.index.store import Store, Txn

ACTIONS = ("set", "unset", "add", "remove")
ENTRY_PREFIX = "action:"  # meta key of an audit entry: action:<12-digit id>
NEXT_KEY = "action-next"


@dataclass(frozen=True)
class BulkAction:
    """What to do (`action` on `field` with `value`) to whom (`rule` JSON or `segment`)."""

    action: str
    field: str
    value: Any = None
    rule: Any = None
    segment: str | None = None

    def target(self) -> Any:
        if (self.rule is None) == (self.segment is None):
            raise BitsegError("a bulk action needs exactly one of a rule or a segment")
        return {"segment": self.segment} if self.segment is not None else self.rule


@dataclass(frozen=True)
class BulkResult:
    members: int  # profiles the rule or segment holds
    changed: int  # of them, those whose row the action changes (dry run: would change)
    dry_run: bool
    entry: dict[str, Any] | None  # the audit entry written (None on a dry run)


# ---------------------------------------------------------------------- checking
def _checked(action: BulkAction, snap: Snapshot) -> tuple[str | None, Any]:
    """(the field's type or None if new, the value in its stored form)."""
    if action.action not in ACTIONS:
        raise BitsegError(f"action: expected one of {', '.join(ACTIONS)}, got {action.action!r}")
    name = action.field
    if name == "id":
        raise DataError("the id of a profile cannot be changed by a bulk action", field="id")
    check_field_name(name)
    type_ = snap.schema.profiles.get(name)
    if action.action == "unset":
        if action.value is not None:
            raise DataError("unset takes no value", field=name)
        return type_, None
    if action.value is None:
        raise DataError(f"{action.action} needs a value", field=name)
    if action.action in ("add", "remove"):
        if type_ not in (None, T.KEYWORDS):
            raise DataError(f"{action.action} needs a keywords (multi-valued) field, "
                            f"and {name!r} is {type_}", field=name)
        if type(action.value) is not str:
            raise DataError(f"{action.action} takes one keyword (a string), "
                            f"got {T.show(action.value)}", field=name)
        return T.KEYWORDS, T.CHECKERS[T.KEYWORD](action.value)
    try:
        checker = T.CHECKERS[type_ or T.infer(action.value)]
        return type_, checker(action.value)
    except ValueError as exc:
        raise DataError(str(exc), field=name) from None


def _members(engine: Engine, action: BulkAction, snap: Snapshot, as_of_us: int) -> BitMap:
    return Evaluator(snap, as_of_us).bitmap(engine.parse(action.target(), snap))


def _changed(engine: Engine, action: BulkAction, snap: Snapshot, members: BitMap,
             type_: str | None, value: Any, as_of_us: int) -> BitMap:
    """The members whose row the action would change, from the field's bitmaps."""
    index = snap.fields.get(action.field)
    if type_ is None or index is None:  # nobody has the field yet
        return BitMap() if action.action in ("unset", "remove") else BitMap(members)
    if action.action == "unset":
        return members & index.exists
    if action.action == "add":
        assert isinstance(index, ValueIndex)
        return members - index.eq(value)
    if action.action == "remove":
        assert isinstance(index, ValueIndex)
        return members & index.eq(value)
    if isinstance(index, RangeIndex):  # set: everyone not already equal to the value
        same = {"field": action.field, "op": "eq", "value": action.value}
        return members - Evaluator(snap, as_of_us).bitmap(engine.parse(same, snap))
    if type_ != T.KEYWORDS:
        return members - index.eq(value)
    assert isinstance(index, ValueIndex)  # keywords: those holding exactly the values
    return members - (_holding_all(index, members, value) - _others(index, value))


def _holding_all(index: ValueIndex, members: BitMap, words: Any) -> BitMap:
    holding = BitMap(members)
    for word in words:
        holding &= index.eq(word)
    return holding


def _others(index: ValueIndex, words: Any) -> BitMap:
    """The profiles holding some keyword other than these."""
    other = [bitmap for word, bitmap in index.values.items() if word not in words]
    return BitMap.union(*other) if other else BitMap()


def _rewrite_rows(store: Store, txn: Txn, changed: BitMap, action: BulkAction,
                  value: Any) -> None:
    """Set or unset a float field in the changed members' rows, in one pass."""
    name = action.field
    for dense in changed:
        key = u32(dense)
        raw = store.get(txn, "rows", key)
        row = orjson.loads(raw) if raw is not None else {}
        if action.action == "set":
            row[name] = value
        else:
            row.pop(name, None)
        store.put(txn, "rows", key, orjson.dumps(row))


def _update_index(writers: FieldWriters, snap: Snapshot, type_: str, action: BulkAction,
                  value: Any, changed: BitMap, emptied: BitMap) -> None:
    """The field's bitmaps after the action, from the changed set alone."""
    writer = writers.get(action.field)
    ids = ids_of(changed)
    one = np.zeros(len(ids), dtype=np.uint32)  # every id takes code 0 of a one-value table
    if isinstance(writer, RangeWriter):
        writer.remove(ids)  # set or unset: the old value goes
        if action.action == "set" and type_ == T.FLOAT:
            writer.add_floats(ids, np.full(len(ids), value, dtype=np.float64))
        elif action.action == "set":
            writer.add(ids, np.full(len(ids), T.range_key(type_, value), dtype=np.int64))
        return
    assert isinstance(writer, ValueWriter)
    if action.action == "add":
        writer.add(ids, one, [value])
        return
    if action.action == "remove":
        writer.remove(ids, one, [value])
        writer.exists = writer.exists | (changed - emptied)  # other keywords remain
        return
    old = snap.fields.get(action.field)
    if isinstance(old, ValueIndex):  # set or unset: every old value goes
        for word, bitmap in old.values.items():
            gone = ids_of(bitmap & changed)
            if len(gone):
                writer.remove(gone, np.zeros(len(gone), dtype=np.uint32), [word])
    if action.action == "set":
        for word in (value if type_ == T.KEYWORDS else (value,)):
            writer.add(ids, one, [word])


# ---------------------------------------------------------------------- running
def run(engine: Engine, action: BulkAction, *, as_of: Any = None, dry_run: bool = False,
        stamp: dict[str, Any] | None = None, also: Also | None = None) -> BulkResult:
    """Apply the action to every member in one transaction (or, dry, count the changes).
    The sharded front gives every shard the entry's `stamp` (its id and time) and runs
    `also` in the transaction after the entry (it unstages the action, or aborts a
    check by raising)."""
    as_of_us = as_of_micros(as_of)
    if dry_run:
        snap = engine.snapshot
        type_, value = _checked(action, snap)
        members = _members(engine, action, snap, as_of_us)
        changed = _changed(engine, action, snap, members, type_, value, as_of_us)
        return BulkResult(len(members), len(changed), True, None)
    found: dict[str, Any] = {}

    def build(txn: Txn, snap: Snapshot) -> tuple[FieldWriters, Schema, BitMap]:
        type_, value = _checked(action, snap)
        members = _members(engine, action, snap, as_of_us)
        changed = _changed(engine, action, snap, members, type_, value, as_of_us)
        found.update(members=len(members), changed=len(changed))
        schema = snap.schema
        if action.field not in schema.profiles and action.action != "unset" and changed:
            type_ = type_ or T.infer(action.value)  # a new field (add: keywords)
            schema = schema.with_fields("profiles", {action.field: type_})
        writers = FieldWriters(snap, schema)
        if changed and (type_ or T.KEYWORD) in HOLDABLE:  # the bitmaps only: see with_held
            hold_fields(engine.store, txn, [action.field])
            emptied = changed - _others(snap.fields[action.field], (value,)) \
                if action.action == "remove" else BitMap()
            _update_index(writers, snap, type_ or T.KEYWORD, action, value, changed, emptied)
        elif changed:  # a float field (set or unset): its rows hold its values too
            _rewrite_rows(engine.store, txn, changed, action, value)
            _update_index(writers, snap, T.FLOAT, action, value, changed, BitMap())
        return writers, schema, changed

    def audit(txn: Txn, snap: Snapshot) -> dict[str, Any]:
        found["entry"] = record_entry(engine.store, txn, {
            "action": action.action, "field": action.field, "value": action.value,
            "rule": _as_json(action.rule), "segment": action.segment,
            "as_of": T.format_timestamp(as_of_us),
            "members": found["members"], "changed": found["changed"], "version": snap.version},
            stamp)
        return also(txn, snap) if also is not None else {}

    engine.write_columns(build, also=audit)
    return BulkResult(found["members"], found["changed"], False, found["entry"])


def _as_json(rule: Any) -> Any:
    """A rule given as JSON text is stored as the JSON it is (it parsed: it ran)."""
    return orjson.loads(rule) if isinstance(rule, (str, bytes)) else rule


def record_entry(store: Store, txn: Txn, entry: dict[str, Any],
                 stamp: dict[str, Any] | None = None) -> dict[str, Any]:
    """Store an audit entry under the next id, stamped with the time (or under the
    stamp's id and time); returns it."""
    last = store.get_json(txn, NEXT_KEY) or 0
    if stamp is None:
        now = datetime.now(timezone.utc).replace(microsecond=0)
        stamp = {"id": last + 1, "time": now.isoformat().replace("+00:00", "Z")}
    number = stamp["id"]
    stored = {"id": number, "time": stamp["time"], **entry}
    store.put_json(txn, NEXT_KEY, max(last, number))
    store.put_json(txn, f"{ENTRY_PREFIX}{number:012d}", stored)
    return stored


def last_entry_id(engine: Engine) -> int:
    """The id of the latest audit entry (0: none yet)."""
    with engine.store.read() as txn:
        return int(engine.store.get_json(txn, NEXT_KEY) or 0)


def entry_of(engine: Engine, number: int) -> dict[str, Any] | None:
    """The audit entry of that id, or None."""
    with engine.store.read() as txn:
        return engine.store.get_json(txn, f"{ENTRY_PREFIX}{number:012d}")


def list_entries(engine: Engine, limit: int = 0) -> list[dict[str, Any]]:
    """The stored audit entries, newest first (limit 0: all)."""
    store = engine.store
    with store.read() as txn:
        entries = [orjson.loads(raw) for _, raw in
                   store.items(txn, "meta", ENTRY_PREFIX.encode())]
    entries.reverse()
    return entries[:limit] if limit else entries
