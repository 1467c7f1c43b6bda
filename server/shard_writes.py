"""Writes through the sharded front: one batch over every shard, all of it or nothing.

A batch (a group of UpsertProfiles / TrackEvents / AddOrders messages, or the ids of a
DeleteProfiles) is split by profile id (index/shard_key.py) and written by a two-phase
commit, one batch at a time:

1. Prepare. Every shard (also one whose part is empty) checks its part by applying it
   in a write transaction that it then aborts (a dry run: the engine's own checks, so
   anything the real write would refuse is refused here), and stages the part in its
   own LMDB store (meta key `staged/<txid>`, one transaction). It answers the schema
   its store would have after the part. Any refusal, or a shard that does not answer:
   every shard drops what it staged and the client gets the error, naming the record
   by its number in the client's message (not in the shard's part). The shards'
   schemas must agree: a new field inferred as int on one shard and as float on
   another is refused (SchemaError), nothing changed.
2. Decide. The front writes DB/decisions/<txid>.json (the batch's merged schema) with
   fsync of the file and of the folder. The batch is committed from this moment: no
   decision file means it never was (presumed abort).
3. Apply. Every shard declares the merged schema (so a field the batch brings reaches
   every shard) and applies its staged part; the staged key is removed in the same
   transaction as the part (profiles, events, orders) or after it (deletes, which are
   applied again harmlessly: only the ids still live are deleted). A shard that dies
   meanwhile is asked again until Ray has restarted it (APPLY_PATIENCE); then the
   decision file is removed and the client is answered.

On open (`recover`, called by open_shards) and before each batch the front finishes
what a crash left: every staged batch with a decision file is applied, every other one
dropped, then the decision files are removed. So an acknowledged batch is never lost,
whether the front or a shard is killed between the shards' commits, and a batch is on
every shard or on none.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import orjson

from bitseg.index.errors import (
    DataError,
    NotFound,
    SchemaError,
    StoreError,
)
from bitseg.index.schema import SECTIONS
from bitseg.loaders.columnar import group_block, texts_block
from bitseg.server.service import COMMITTED_KEY, ShardUnavailable, _arrived

log = logging.getLogger("bitseg.server")

DECISIONS = "decisions"  # DB/decisions/<txid>.json: the batches decided to commit
STAGED = "staged/"  # a shard's meta key prefix for its staged parts
APPLIED = "applied/"  # and for the answers of the last parts it applied (by txid)
KEPT_APPLIED = 64  # answers kept: a front asks again only for the batch under way
DELETE = "delete"
KEYS = {"profiles": "id", "events": "profile", "orders": "profile"}  # the profile id's key
APPLY_PATIENCE = 60.0  # seconds the front asks a dead shard again to apply a batch
RETRY_SECONDS = 0.25


class Decided(ShardUnavailable):
    """A batch decided to commit that a shard has not applied yet: it will be applied
    (on the shard's return, or the front's next open); sending it again adds it twice."""


class _DryRun(Exception):
    """Ends a shard's dry run after every check passed, aborting its transaction."""

    def __init__(self, schema: dict[str, dict[str, str]]) -> None:
        super().__init__("dry run")
        self.schema = schema


# ---------------------------------------------------------------------- a shard's side
def prepare(engine: Any, txid: str, kind: str, payload: Any) -> dict[str, dict[str, str]]:
    """Check a shard's part (a dry run) and stage it durably; the schema it would give."""
    from bitseg.server import shard_actions

    if kind in shard_actions.KINDS:  # a bulk action or a traits refresh: the same payload
        schema = shard_actions.check(engine, kind, payload)
    elif kind == DELETE:
        for profile_id in payload:
            engine.dense_id(profile_id)  # NotFound names an unknown id
        schema = engine.schema.to_json()
    elif any(payload):
        schema = _dry_run(engine, kind, payload)
    else:
        schema = engine.schema.to_json()
    with engine.store.write() as txn:
        engine.store.put_json(txn, STAGED + txid, {"kind": kind, "payload": payload})
    return schema


def finish(engine: Any, txid: str, commit: bool, schema: dict[str, Any] | None) -> Any:
    """Apply (commit) or drop a staged part; (created, updated, version, rows: events,
    orders or profiles deleted), or an action's dict (shard_actions.apply). A part
    applied before answers as it did then when its answer is kept (APPLIED), else None;
    a part dropped, None."""
    key = STAGED + txid
    with engine.store.read() as txn:
        staged = engine.store.get_json(txn, key)
        answered = engine.store.get_json(txn, APPLIED + txid) if commit else None
    if staged is None:  # finished before: the answer it gave then, when it is kept
        return _answer(answered)
    if not commit:
        _unstage(engine, key)
        return None
    if schema:
        engine.declare_schema(schema, source="the batch's schema on every shard")
    answer = _finish(engine, key, staged["kind"], staged["payload"])
    _remember(engine, txid, answer)
    return answer


def _finish(engine: Any, key: str, kind: str, payload: Any) -> Any:
    """Apply a staged part, the staged key removed with it; its answer."""
    from bitseg.server import shard_actions

    if kind in shard_actions.KINDS:
        return shard_actions.apply(engine, key, kind, payload)
    if kind == DELETE:  # applied again after a crash: only the ids still live go
        live = [p for p in dict.fromkeys(payload) if _is_live(engine, p)]
        deleted = engine.delete_profiles(live) if live else 0
        _unstage(engine, key)
        return 0, 0, engine.snapshot.version, deleted
    if not any(payload):
        _unstage(engine, key)
        return 0, 0, engine.snapshot.version, 0

    def unstage(txn: Any, snapshot: Any) -> dict[str, Any]:
        engine.store.delete(txn, "meta", key.encode())  # with the part, in its transaction
        return {}

    report = _apply(engine, kind, payload, unstage)
    return report.created, report.updated, report.version, report.rows


def _remember(engine: Any, txid: str, answer: Any) -> None:
    """Keep a part's answer (the last KEPT_APPLIED), so a front asking again after this
    shard died before it answered learns the numbers, not nothing. In its own
    transaction just after the part's: a death between the two loses only the numbers."""
    prefix = APPLIED.encode()
    with engine.store.write() as txn:
        engine.store.put_json(txn, APPLIED + txid, answer)
        kept = list(engine.store.keys(txn, "meta", prefix))  # txids sort by time
        for old in kept[:max(0, len(kept) - KEPT_APPLIED)]:
            engine.store.delete(txn, "meta", bytes(old))


def _answer(kept: Any) -> Any:
    """A kept answer as finish gives it: a batch's numbers as a tuple, an action's dict."""
    return tuple(kept) if isinstance(kept, list) else kept


def staged(engine: Any) -> list[str]:
    """The txids of the parts this shard has staged and not finished, oldest first."""
    prefix = STAGED.encode()
    with engine.store.read() as txn:
        return sorted(bytes(k)[len(prefix):].decode()
                      for k in engine.store.keys(txn, "meta", prefix))


def _dry_run(engine: Any, kind: str, messages: list[list[str]]) -> dict[str, dict[str, str]]:
    return schema_after(lambda also: _apply(engine, kind, messages, also),
                        f"{kind}: the dry run of a batch")


def schema_after(write: Callable[[Callable[[Any, Any], Any]], Any], what: str
                 ) -> dict[str, dict[str, str]]:
    """Run `write(also)`, a write whose transaction calls `also(txn, snapshot)` once
    every check passed, and abort it there: the schema the shard would have after it."""
    def stop(txn: Any, snapshot: Any) -> dict[str, Any]:
        raise _DryRun(snapshot.schema.to_json())  # every check passed: abort, say the schema

    try:
        write(stop)
    except _DryRun as done:
        return done.schema
    raise StoreError(f"{what} was committed")  # never: stop raises


def _apply(engine: Any, kind: str, messages: list[list[str]],
           also: Callable[[Any, Any], dict[str, Any]]) -> Any:
    """One engine batch of the messages' records, `also` run in its transaction."""
    items = texts_block(messages[0]) if len(messages) == 1 else group_block(messages)
    if kind == "profiles":
        return engine.upsert_profiles(items, also=also)
    if kind == "events":
        return engine.track_events(items, also=also)
    return engine.add_orders(items, also=also)


def _unstage(engine: Any, key: str) -> None:
    with engine.store.write() as txn:
        engine.store.delete(txn, "meta", key.encode())


def _is_live(engine: Any, profile_id: str) -> bool:
    try:
        engine.dense_id(profile_id)
    except NotFound:
        return False
    return True


# ---------------------------------------------------------------------- the front's side
@dataclass(frozen=True)
class Split:
    """A batch split by shard: each shard's part, and for each of its records (or ids)
    its number in the client's batch (from 1)."""

    parts: list[Any]
    origin: list[list[int]]


def split_records(messages: Sequence[Sequence[str]], kind: str, shards: int) -> Split:
    """Each record text to its profile's shard; a text that does not parse or has no
    valid id goes to shard 0, whose engine refuses it with its own words."""
    key = KEYS[kind]
    parts: list[list[list[str]]] = [[[] for _ in messages] for _ in range(shards)]
    origin: list[list[int]] = [[] for _ in range(shards)]
    number = 0
    for m, texts in enumerate(messages):
        for text in texts:
            number += 1
            shard = _shard_of_text(text, key, shards)
            parts[shard][m].append(text)
            origin[shard].append(number)
    return Split(parts, origin)


def split_ids(profile_ids: Sequence[str], shards: int) -> Split:
    from bitseg.index.shard_key import shard_of

    parts: list[list[str]] = [[] for _ in range(shards)]
    origin: list[list[int]] = [[] for _ in range(shards)]
    for number, profile_id in enumerate(profile_ids, 1):
        shard = shard_of(profile_id, shards)
        parts[shard].append(profile_id)
        origin[shard].append(number)
    return Split(parts, origin)


def _shard_of_text(text: str, key: str, shards: int) -> int:
    from bitseg.index.shard_key import shard_of

    if shards == 1:
        return 0
    try:
        record = orjson.loads(text)
        return shard_of(record.get(key), shards) if isinstance(record, dict) else 0
    except (orjson.JSONDecodeError, DataError):
        return 0


_MADE = threading.Lock()


def writes_for(shards: Any) -> ShardWrites:
    """The one ShardWrites of a ShardSet, made on its first write; the decisions go in
    the sharded store's folder, beside its shard-i stores."""
    with _MADE:
        found = getattr(shards, "writes", None)
        if found is None:
            found = shards.writes = ShardWrites(shards, Path(shards.paths[0]).parent)
        return found


class ShardWrites:
    """The front's two-phase commit over a ShardSet (see the module doc); one batch at
    a time."""

    def __init__(self, shards: Any, db: str | Path) -> None:
        self.shards = shards
        self.decisions = Path(db) / DECISIONS
        self._lock = threading.RLock()  # reentrant: shard_actions holds it (held()) from
        # its reads of the shards through its write()
        self._pending: list[str] = []  # decided, not yet applied by every shard
        # test seams: called with the txid after every shard prepared / after the decision
        self.after_prepare: Callable[[str], None] | None = None
        self.after_decision: Callable[[str], None] | None = None

    def write(self, kind: str, split: Split) -> list[tuple[int, int, int, int]]:
        """Write one batch on every shard or none; each shard's (created, updated,
        version, rows)."""
        with self._lock:
            self.finish_pending()
            txid = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
            every = range(self.shards.count)
            found = self.shards.outcomes("prepare", [(txid, kind, split.parts[i])
                                                     for i in every])
            failures = {i: value for i, (ok, value) in enumerate(found) if not ok}
            schema = None
            if not failures:
                try:
                    schema = merged_schema([value for _, value in found])
                except SchemaError as exc:
                    failures = {0: exc}
            if failures:
                self._abort(txid)
                raise _first(failures, kind, split)
            if self.after_prepare is not None:
                self.after_prepare(txid)
            try:
                write_decision(self.decisions, txid, schema)
            except OSError as exc:
                self._abort(txid)
                raise StoreError(f"{self.decisions}: cannot record the batch's decision "
                                 f"({exc.strerror}); nothing was written") from None
            if self.after_decision is not None:
                self.after_decision(txid)
            return self._apply(txid, schema)

    def held(self) -> Any:
        """The lock a batch holds from prepare to apply: while it is held no batch is
        written (a segment counted with top sets chosen over the shards holds it)."""
        return self._lock

    def _abort(self, txid: str) -> None:
        """Every shard drops what it staged (presumed abort covers one that cannot)."""
        for i, (ok, value) in enumerate(self.shards.outcomes(
                "finish", [(txid, False, None)] * self.shards.count)):
            if not ok:
                log.warning("shard %d: dropping staged batch %s failed (%s); it is "
                            "dropped when the store opens next", i, txid, value)

    def _apply(self, txid: str, schema: dict[str, Any] | None
               ) -> list[tuple[int, int, int, int]]:
        results: list[Any] = [None] * self.shards.count
        todo = list(range(self.shards.count))
        deadline = time.monotonic() + APPLY_PATIENCE
        while True:
            found = self.shards.outcomes("finish", [(txid, True, schema)] * len(todo),
                                         indices=todo)
            left = []
            for i, (ok, value) in zip(todo, found, strict=True):
                if ok:
                    results[i] = value
                elif isinstance(value, ShardUnavailable):
                    left.append((i, value))
                else:  # not the batch's fault (its dry run passed): keep it to retry
                    self._keep(txid)
                    raise Decided(f"shard {i} could not apply a batch decided to commit "
                                  f"({value}); it is applied before the next write or "
                                  "when the store opens; do not send it again") from value
            if not left:
                break
            if time.monotonic() > deadline:
                self._keep(txid)
                shard, why = left[0]
                raise Decided(f"the batch is committed, shard {shard} has not applied it "
                              f"yet ({why}); it does when it is back, or when the store "
                              "opens; do not send the batch again")
            todo = [i for i, _ in left]
            time.sleep(RETRY_SECONDS)
        remove_decision(self.decisions, txid)
        return [r if r is not None else (0, 0, 0, 0) for r in results]

    def _keep(self, txid: str) -> None:
        if txid not in self._pending:
            self._pending.append(txid)

    def finish_pending(self) -> None:
        """Apply the batches a shard was away for; ShardUnavailable (this batch not
        written) while one still cannot be."""
        while self._pending:
            txid = self._pending[0]  # in order: a later batch may change the same profiles
            try:
                self._apply(txid, read_decision(self.decisions, txid))
                self._pending.pop(0)
            except Decided as exc:  # still first in _pending
                raise ShardUnavailable(f"this batch was not written: an earlier one is "
                                       f"committed and not yet applied everywhere ({exc}); "
                                       "send this one again later") from None


def _first(failures: dict[int, Exception], kind: str, split: Split) -> Exception:
    """The error to answer: the refused record (or id) that comes first in the client's
    batch, numbered as the client numbered it; else the first shard's error."""
    placed: list[tuple[float, int, Exception]] = []
    for shard, exc in failures.items():
        at, error = math.inf, exc
        if isinstance(exc, DataError) and exc.line is not None \
                and 0 < exc.line <= len(split.origin[shard]):
            at = split.origin[shard][exc.line - 1]
            error = DataError(exc.reason, field=exc.field, file=exc.file, line=int(at))
        elif kind == DELETE and isinstance(exc, NotFound) and exc.name in split.parts[shard]:
            at = split.origin[shard][split.parts[shard].index(exc.name)]
        placed.append((at, shard, error))
    return min(placed, key=lambda found: found[:2])[2]


def merged_schema(schemas: Sequence[dict[str, dict[str, str]]]) -> dict[str, dict[str, str]]:
    """The one schema of the shards' answers; SchemaError naming a field they give
    different types."""
    merged: dict[str, dict[str, str]] = {section: {} for section in SECTIONS}
    first: dict[tuple[str, str], tuple[int, str]] = {}
    for shard, schema in enumerate(schemas):
        for section, fields in schema.items():
            for name, type_ in fields.items():
                seen = first.setdefault((section, name), (shard, type_))
                if seen[1] != type_:
                    raise SchemaError(
                        f"{section}.{name}: this batch's records make it {seen[1]} on shard "
                        f"{seen[0]} and {type_} on shard {shard} (a new field's type is "
                        "inferred from the first value each shard sees); declare its type "
                        "in the schema first, or send values of one type; nothing was "
                        "written")
                merged[section][name] = type_
    return merged


# ---------------------------------------------------------------------- decisions on disk
def write_decision(folder: Path, txid: str, schema: Any) -> None:
    """Record durably that txid commits: the file and the folder's entry fsynced."""
    folder.mkdir(exist_ok=True)
    path = folder / f"{txid}.json"
    temporary = folder / f".{txid}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, orjson.dumps({"txid": txid, "schema": schema}))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)
    _sync_folder(folder)


def read_decision(folder: Path, txid: str) -> dict[str, Any] | None:
    """The schema of a batch decided to commit; None when it was not (no file)."""
    path = folder / f"{txid}.json"
    try:
        return orjson.loads(path.read_bytes())["schema"]
    except FileNotFoundError:
        return None


def has_decision(folder: Path, txid: str) -> bool:
    return (folder / f"{txid}.json").is_file()


def remove_decision(folder: Path, txid: str) -> None:
    try:
        os.unlink(folder / f"{txid}.json")
    except FileNotFoundError:
        pass


def _sync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def recover(shards: Any, db: str | Path) -> int:
    """Finish what a crash left: apply every staged batch decided to commit, drop every
    other, then remove the decisions; how many batches were applied."""
    folder = Path(db) / DECISIONS
    txids = sorted({t for found in shards.each("staged") for t in found})
    applied = 0
    for txid in txids:
        commit = has_decision(folder, txid)
        schema = read_decision(folder, txid) if commit else None
        shards.each("finish", txid, commit, schema)
        applied += commit
        if commit:
            log.info("batch %s: applied on open (decided before the last stop)", txid)
    if folder.is_dir():  # applied decisions, and temporaries a crash cut short
        for leftover in folder.glob("*"):  # (a half-written decision is no decision)
            leftover.unlink()
    return applied


# ---------------------------------------------------------------------- streams
def stream_batches(writes: ShardWrites, requests: Iterator[Any], field: str, kind: str,
                   context: grpc.ServicerContext
                   ) -> Iterator[tuple[int, list[tuple[int, int, int, int]]]]:
    """Write the streamed batches as service._batches does (group commit: the messages
    that arrived meanwhile in one batch; on a refusal one by one, to name the batch),
    each over every shard; yield (messages, each shard's result)."""
    committed = 0
    for group in _arrived(requests, field):
        if len(group) > 1:
            try:
                results = writes.write(kind, split_records(group, kind, writes.shards.count))
            except Decided:
                context.set_trailing_metadata(((COMMITTED_KEY, str(committed + len(group))),))
                raise
            except Exception:  # noqa: BLE001 -- nothing written; the batch at fault is named below
                results = None
            if results is not None:
                committed += len(group)
                yield len(group), results
                continue
        for texts in group:
            try:
                results = writes.write(kind, split_records([texts], kind,
                                                           writes.shards.count))
            except Decided:
                context.set_trailing_metadata(((COMMITTED_KEY, str(committed + 1)),))
                raise
            except DataError as exc:
                context.set_trailing_metadata(((COMMITTED_KEY, str(committed)),))
                raise DataError(f"batch {committed + 1} ({committed} before it committed): "
                                f"{exc}") from None
            except Exception:
                context.set_trailing_metadata(((COMMITTED_KEY, str(committed)),))
                raise
            committed += 1
            yield 1, results
