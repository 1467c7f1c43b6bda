"""Exports of an audience's members to CSV or JSON Lines files, and scheduled exports.

Only members having every required field are written: the audience is intersected with
the `exists` bitmap of each required field before any row is read. A file is written
as PATH.tmp, flushed to disk, then renamed over PATH, so a reader (or a crash) sees
the previous file or the new one whole, never a part.

Scheduled exports of a segment are kept in the store (meta keys "export:<id>", JSON),
so they survive a restart; ExportScheduler, a thread of the server, runs the due ones.
Numbered files are SEGMENT-000001.csv, -000002, …; a rotating one is SEGMENT.csv,
replaced each time.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from pyroaring import BitMap

from bitseg.index.errors import BitsegError, NotFound
from bitseg.index.export import check_fields, profile_rows
from bitseg.index.fields import ids_of
from bitseg.index.snapshot import Snapshot
from bitseg.index.ticker import Ticker

if TYPE_CHECKING:
    from bitseg.index.engine import Engine

FORMATS = ("csv", "jsonl")
PAGE = 50_000  # rows read and written at a time
KEY_PREFIX = b"export:"
NEXT_ID = "export_next_id"
US = 1_000_000
LIST_SEP = ";"  # keywords values in one CSV cell

log = logging.getLogger("bitseg.exports")


# ---------------------------------------------------------------------- one export
def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise BitsegError(f"format: expected csv or jsonl, got {fmt!r}")
    return fmt


def with_required(snap: Snapshot, audience: BitMap, require: Sequence[str]) -> BitMap:
    """The members of the audience having a value of every required field."""
    kept = audience & snap.live
    for name in require:
        if name not in snap.schema.profiles:
            listed = ", ".join(sorted(snap.schema.profiles)) or "none"
            raise BitsegError(f"require: unknown profile field {name!r} (known fields: "
                              f"{listed})")
        kept &= snap.field(name).exists
    return kept


def encode_rows(rows: Iterable[dict[str, Any]], fields: Sequence[str], fmt: str
                ) -> Iterator[bytes]:
    """Rows ({"id", field: shown value or None}) as CSV (header first) or JSON Lines."""
    if fmt == "jsonl":
        for row in rows:
            yield orjson.dumps(row) + b"\n"
        return
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["id", *fields])
    for row in rows:
        writer.writerow([row["id"], *(_cell(row[f]) for f in fields)])
        if buffer.tell() > 1 << 20:
            yield buffer.getvalue().encode()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue().encode()


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return LIST_SEP.join(str(v) for v in value)
    return str(value)


def write_atomically(path: str | Path, chunks: Iterable[bytes]) -> None:
    """Write PATH.tmp, fsync it, rename it over PATH (the previous file stays whole
    until then); on any failure the temporary file is removed."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as out:
            for chunk in chunks:
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class Exported:
    rows: int  # members written
    members: int  # members of the audience
    path: str


def export(engine: Engine, rule: Any, path: str | Path, fields: Sequence[str],
           require: Sequence[str] = (), fmt: str = "csv", as_of: Any = None) -> Exported:
    """Write the audience's members having every required field to `path`."""
    check_format(fmt)
    fields = check_fields(engine, fields)
    snap = engine.snapshot
    audience = engine.bitmap(rule, as_of=as_of)
    kept = with_required(snap, audience, require)
    dense = ids_of(kept)

    def rows() -> Iterator[dict[str, Any]]:
        for start in range(0, len(dense), PAGE):
            yield from profile_rows(engine, dense[start:start + PAGE], fields)

    write_atomically(path, encode_rows(rows(), fields, fmt))
    return Exported(len(kept), len(audience & snap.live), str(path))


# ---------------------------------------------------------------------- schedules
@dataclass(frozen=True)
class Schedule:
    id: int
    segment: str
    every: int  # seconds
    fields: tuple[str, ...]
    require: tuple[str, ...]
    format: str
    out: str  # a directory
    rotate: bool
    runs: int = 0
    last_file: str = ""
    last_rows: int = 0
    last_error: str = ""
    last_run: int | None = None  # µs, wall clock

    def file_for(self, run: int) -> Path:
        stem = self.segment if self.rotate else f"{self.segment}-{run:06d}"
        return Path(self.out) / f"{stem}.{self.format}"

    def due(self, now_us: int) -> bool:
        return self.last_run is None or now_us - self.last_run >= self.every * US


def _key(schedule_id: int) -> bytes:
    return KEY_PREFIX + str(schedule_id).encode()


class Exports:
    """The scheduled exports of one engine's store."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def create(self, segment: str, every: int, fields: Sequence[str], require: Sequence[str],
               fmt: str, out: str, rotate: bool = False) -> Schedule:
        from bitseg.index.segments import _segments_of

        if segment not in _segments_of(self.engine.snapshot):
            raise NotFound("segment", segment)
        if every < 1:
            raise BitsegError(f"every: expected at least 1 second, got {every}")
        check_format(fmt)
        fields = check_fields(self.engine, fields)
        with_required(self.engine.snapshot, BitMap(), require)  # names checked
        if not out or not Path(out).is_absolute():
            raise BitsegError(f"out: expected an absolute directory on the server, got {out!r}")
        store = self.engine.store
        with store.write() as txn:
            next_id = store.get_json(txn, NEXT_ID) or 1
            made = Schedule(next_id, segment, every, tuple(fields), tuple(dict.fromkeys(require)),
                            fmt, out, rotate)
            store.put_json(txn, NEXT_ID, next_id + 1)
            store.put(txn, "meta", _key(made.id), orjson.dumps(asdict(made)))
        return made

    def list(self) -> list[Schedule]:
        store = self.engine.store
        with store.read() as txn:
            found = [_schedule(raw) for _, raw in store.items(txn, "meta", KEY_PREFIX)]
        return sorted(found, key=lambda s: s.id)

    def get(self, schedule_id: int) -> Schedule:
        store = self.engine.store
        with store.read() as txn:
            raw = store.get(txn, "meta", _key(schedule_id))
        if raw is None:
            raise NotFound("export schedule", str(schedule_id))
        return _schedule(raw)

    def delete(self, schedule_id: int) -> None:
        store = self.engine.store
        with store.write() as txn:
            if store.get(txn, "meta", _key(schedule_id)) is None:
                raise NotFound("export schedule", str(schedule_id))
            store.delete(txn, "meta", _key(schedule_id))

    def run(self, schedule: Schedule, now_us: int) -> Schedule:
        """Write the schedule's next file and record the run (or its failure)."""
        path = schedule.file_for(schedule.runs + 1)
        try:
            Path(schedule.out).mkdir(parents=True, exist_ok=True)
            done = export(self.engine, {"segment": schedule.segment}, path, schedule.fields,
                          schedule.require, schedule.format)
            after = replace(schedule, runs=schedule.runs + 1, last_file=str(path),
                            last_rows=done.rows, last_error="", last_run=now_us)
        except (BitsegError, OSError) as exc:
            after = replace(schedule, last_error=str(exc), last_run=now_us)
        self._record(after)
        return after

    def _record(self, schedule: Schedule) -> None:
        """Store a run's outcome, unless the schedule was deleted meanwhile."""
        store = self.engine.store
        with store.write() as txn:
            if store.get(txn, "meta", _key(schedule.id)) is not None:
                store.put(txn, "meta", _key(schedule.id), orjson.dumps(asdict(schedule)))


def _schedule(raw: bytes) -> Schedule:
    data = orjson.loads(raw)
    data["fields"], data["require"] = tuple(data["fields"]), tuple(data["require"])
    return Schedule(**data)


class ExportScheduler(Ticker):
    """A daemon thread that runs the due scheduled exports every `tick` seconds."""

    def __init__(self, exports: Exports, tick: float = 1.0) -> None:
        super().__init__(tick, "bitseg-exports")
        self.exports = exports

    def run_once(self, now_us: int | None = None) -> list[int]:
        """Run every due schedule; the ids that wrote a file. One failure (logged once
        per schedule until it works again) never stops the others."""
        now_us = time.time_ns() // 1000 if now_us is None else now_us
        done = []
        for schedule in self.exports.list():
            if not schedule.due(now_us) or self.stopping():
                continue
            try:
                after = self.exports.run(schedule, now_us)
            except Exception:  # one schedule must not stop the others
                log.exception("scheduled export %d of segment %r failed unexpectedly",
                              schedule.id, schedule.segment)
                continue
            if after.last_error:
                if after.last_error != schedule.last_error:
                    log.warning("scheduled export %d of segment %r failed: %s", schedule.id,
                                schedule.segment, after.last_error)
            else:
                done.append(schedule.id)
        return done
