"""Bulk actions on the members of a segment or rule: set, unset, add or remove a keyword.

An action is planned column-wise on one snapshot: the members come from the rule, and
the members it would change are found with bitmaps (members minus those already holding
the value, members that have the field, ...), so a dry run reads no rows.  Applying it
is one profile batch (engine.upsert_profiles) over the changed members only, and the
audit entry is written in the same LMDB transaction: a crash leaves neither.

Why an audit entry rather than an event per changed profile: one small record explains
the whole action (who was targeted, what changed, how many) and costs nothing per
profile, where a million events would double the write.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import orjson
from pyroaring import BitMap

from bitseg.index import types as T
from bitseg.index.engine import Engine, as_of_micros
from bitseg.index.errors import BitsegError, DataError
from bitseg.index.evaluate import Evaluator
from bitseg.index.fields import RangeIndex, ValueIndex, ids_of
from bitseg.index.profiles import check_field_name, decode_row
from bitseg.index.snapshot import Snapshot
from bitseg.index.store import Store, Txn, u32

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
    holding = BitMap(members)  # keywords: those holding every value may hold exactly them
    for word in value:
        holding &= index.eq(word)
    exact = BitMap(d for d in holding if _row(snap, d).get(action.field) == value)
    return members - exact


def _row(snap: Snapshot, dense: int) -> dict[str, Any]:
    raw = snap.reader.get("rows", u32(dense))
    return {} if raw is None else decode_row(raw, snap.schema.profiles)


def _records(engine: Engine, action: BulkAction, snap: Snapshot, changed: BitMap,
             value: Any) -> Iterator[dict[str, Any]]:
    """One profile record per changed member (omitted keys keep their values)."""
    dense = ids_of(changed)
    externals = engine.ids.externals(dense)
    name = action.field
    if action.action in ("set", "unset"):  # the value as given: the batch checks it again
        for external in externals:
            yield {"id": external, name: action.value}
        return
    for d, external in zip(dense.tolist(), externals, strict=True):
        words = set(_row(snap, d).get(name) or ())
        if action.action == "add":
            words.add(value)
        else:
            words.discard(value)
        yield {"id": external, name: sorted(words) if words else None}


# ---------------------------------------------------------------------- running
def run(engine: Engine, action: BulkAction, *, as_of: Any = None,
        dry_run: bool = False) -> BulkResult:
    """Apply the action to every member in one transaction (or, dry, count the changes)."""
    as_of_us = as_of_micros(as_of)
    if dry_run:
        snap = engine.snapshot
        type_, value = _checked(action, snap)
        members = _members(engine, action, snap, as_of_us)
        changed = _changed(engine, action, snap, members, type_, value, as_of_us)
        return BulkResult(len(members), len(changed), True, None)
    found: dict[str, Any] = {}

    def records(snap: Snapshot) -> Iterator[dict[str, Any]]:
        type_, value = _checked(action, snap)
        members = _members(engine, action, snap, as_of_us)
        changed = _changed(engine, action, snap, members, type_, value, as_of_us)
        found.update(members=len(members), changed=len(changed))
        return _records(engine, action, snap, changed, value)

    def audit(txn: Txn, snap: Snapshot) -> dict[str, Any]:
        found["entry"] = record_entry(engine.store, txn, {
            "action": action.action, "field": action.field, "value": action.value,
            "rule": _as_json(action.rule), "segment": action.segment,
            "as_of": T.format_timestamp(as_of_us),
            "members": found["members"], "changed": found["changed"], "version": snap.version})
        return {}

    engine.upsert_profiles(records, file="bulk action", also=audit)
    return BulkResult(found["members"], found["changed"], False, found["entry"])


def _as_json(rule: Any) -> Any:
    """A rule given as JSON text is stored as the JSON it is (it parsed: it ran)."""
    return orjson.loads(rule) if isinstance(rule, (str, bytes)) else rule


def record_entry(store: Store, txn: Txn, entry: dict[str, Any]) -> dict[str, Any]:
    """Store an audit entry under the next id, stamped with the time; returns it."""
    number = (store.get_json(txn, NEXT_KEY) or 0) + 1
    now = datetime.now(timezone.utc).replace(microsecond=0)
    stored = {"id": number, "time": now.isoformat().replace("+00:00", "Z"), **entry}
    store.put_json(txn, NEXT_KEY, number)
    store.put_json(txn, f"{ENTRY_PREFIX}{number:012d}", stored)
    return stored


def list_entries(engine: Engine, limit: int = 0) -> list[dict[str, Any]]:
    """The stored audit entries, newest first (limit 0: all)."""
    store = engine.store
    with store.read() as txn:
        entries = [orjson.loads(raw) for _, raw in
                   store.items(txn, "meta", ENTRY_PREFIX.encode())]
    entries.reverse()
    return entries[:limit] if limit else entries
