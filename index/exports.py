"""Exports of an audience's members to CSV or JSON Lines files, and scheduled exports.

Only members having every required field are written: the audience is intersected with
the `exists` bitmap of each required field. The file's columns come from the field
indexes (encode_columns), not from the rows; encode_rows over export.profile_rows is
the row-reading reference they are tested against. A file is written
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
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
from pyroaring import BitMap

from bitseg.index import types as T
from bitseg.index.errors import BitsegError, NotFound, PartUnavailable
from bitseg.index.export import (
    Block,
    check_fields,
    float_values,
    profile_rows,
    range_keys,
    value_codes,
    value_sets,
)
from bitseg.index.fields import ids_of, unique
from bitseg.index.ids import ID_CHUNK, ID_CHUNK_BITS
from bitseg.index.snapshot import Snapshot
from bitseg.index.ticker import Ticker

if TYPE_CHECKING:
    from bitseg.index.engine import Engine

FORMATS = ("csv", "jsonl")
PAGE = 50_000  # rows read at a time by the reference path (encode_rows)
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


# ---------------------------------------------------------------------- from columns
# Cells are UTF-8 bytes from the start: bytes joins and formats twice as fast as str,
# which must widen a whole line for one non-Latin-1 character.
BLOCK = 100_000  # ids formatted at a time from the field indexes
ROWS_OVER = 4  # a keyword field with more values than this × the block is read from rows
_CSV_SPECIAL = re.compile(rb'[,"\r\n]')  # any character the csv module may quote is here
_JSON_SPECIAL = re.compile(rb'["\\\x00-\x1f]')  # what orjson escapes in a string
_NOWHERE = np.zeros(0, dtype=np.int64)


@dataclass(slots=True)
class _Cells:
    """One field's text in a block: `parts` columns that `form` (b"%s" each) puts
    together into a cell, and the positions whose cell the stored rows must give."""

    parts: list[list[bytes]]
    form: bytes = b"%s"
    from_rows: np.ndarray = field(default_factory=lambda: _NOWHERE)


def encode_columns(engine: Engine, dense: np.ndarray, fields: Sequence[str], fmt: str,
                   snap: Snapshot | None = None) -> Iterator[bytes]:
    """The bytes encode_rows writes for these ids' profile_rows, built column by column
    from the field indexes of `snap` (default: the engine's now), a block at a time."""
    snap = engine.snapshot if snap is None else snap
    if fmt == "csv":
        yield (",".join(_csv_cell(name) for name in ["id", *fields]) + "\n").encode()
    for start in range(0, len(dense), BLOCK):
        yield _block(engine, snap, Block(dense[start:start + BLOCK]), fields, fmt == "jsonl")


def _block(engine: Engine, snap: Snapshot, block: Block, fields: Sequence[str],
           json: bool) -> bytes:
    externals = external_bytes(engine.ids, block.ids)
    if not (_JSON_SPECIAL if json else _CSV_SPECIAL).search(b"".join(externals)):
        cells = [_Cells([externals], b'"%s"' if json else b"%s")]
    else:
        cells = [_Cells([[_json_text(x.decode()) if json else _csv_cell(x.decode()).encode()
                          for x in externals]])]
    for name in fields:
        cells.append(_field_cells(snap.field(name), snap.schema.profiles[name], block, json))
    if any(len(c.from_rows) for c in cells):
        _cells_from_rows(engine, block.ids, fields, cells, json)
    columns = [part for c in cells for part in c.parts]
    if json:
        keys = [_json_text(name).replace(b"%", b"%%") for name in ["id", *fields]]
        row = b"{" + b",".join(k + b":" + c.form for k, c in zip(keys, cells, strict=True)) + b"}"
    else:
        row = b",".join(c.form for c in cells)
    if row == b",".join([b"%s"] * len(columns)):
        lines = map(b",".join, zip(*columns, strict=True))
    else:
        lines = map(row.__mod__, zip(*columns, strict=True))
    return b"\n".join(lines) + b"\n"


def _field_cells(index: Any, type_: str, block: Block, json: bool) -> _Cells:
    """One field's cells for a block."""
    n = len(block)
    missing = b"null" if json else b""
    if type_ in T.VALUE_TYPES:
        if type_ == T.KEYWORDS:
            found = value_sets(index, block)
        elif type_ == T.KEYWORD and len(index.values) > ROWS_OVER * n:
            found = None
        else:
            found = value_codes(index, block)
        if found is None:
            return _Cells([[missing] * n], from_rows=np.arange(n))
        codes, values = found
        texts = [_value_text(type_, v, json) for v in values] + [missing]  # -1: the last
        cells = _Cells([np.array(texts, dtype=object)[codes].tolist()])
        if type_ == T.KEYWORDS and json:  # an empty list is in no bitmap: [] or null?
            cells.from_rows = np.flatnonzero(codes == -1)
        return cells
    where, keys = range_keys(index, block)
    q = b'"' if json else b""
    if type_ == T.TIMESTAMP and len(where) == n:  # every id has one: no other texts
        return _timestamp_parts(keys, q)
    from_rows = _NOWHERE
    if type_ == T.INT:
        texts: Any = keys.astype("S21").tolist()  # the decimal digits, as str() writes
    elif type_ == T.DATE:
        texts = _day_texts(keys, q, q)
    elif type_ == T.TIMESTAMP:
        parts = _timestamp_parts(keys, q)
        texts = parts.parts[0] if len(parts.parts) == 1 else \
            list(map(parts.form.__mod__, zip(*parts.parts, strict=True)))
    else:
        values, exact = float_values(index, keys)
        from_rows = where[~exact]
        where, values = where[exact], values[exact].tolist()
        if not values:
            texts = []
        elif json:
            texts = orjson.dumps(values)[1:-1].split(b",")
        else:
            texts = "\n".join(map(repr, values)).encode().split(b"\n")
    column = np.full(n, missing, dtype=object)
    column[where] = texts
    return _Cells([column.tolist()], from_rows=from_rows)


def _value_text(type_: str, value: Any, json: bool) -> bytes:
    if type_ == T.BOOL:
        return b"true" if value else b"false"
    if type_ == T.KEYWORDS:
        return _json_text(list(value)) if json else _csv_cell(LIST_SEP.join(value)).encode()
    return _json_text(value) if json else _csv_cell(value).encode()


def _day_texts(days: np.ndarray, head: bytes, tail: bytes) -> list[bytes]:
    """head + types.format_date(day) + tail for every day."""
    return _day_bytes(days, head, tail).tolist()


def _day_bytes(days: np.ndarray, head: bytes, tail: bytes) -> np.ndarray:
    """The same as a fixed-width bytes array, each distinct day formatted once: from a
    table over the days' span when it is short, else over the distinct days."""
    if not len(days):
        return np.zeros(0, dtype=f"S{10 + len(head) + len(tail)}")
    low, high = int(days.min()), int(days.max())
    if high - low <= 4 * len(days):
        table, at = np.arange(low, high + 1), days - low
    else:
        table, at = np.unique(days, return_inverse=True)
    texts = np.datetime_as_string(table.astype("datetime64[D]")).astype("S10")
    if head or tail:
        texts = np.array([head + t + tail for t in texts.tolist()],
                         dtype=f"S{10 + len(head) + len(tail)}")
    return texts[at]


@cache
def _clock() -> np.ndarray:
    """b"HH:MM:SS" of each second of a day, as a (86400, 8) uint8 array."""
    s = np.arange(86_400)
    digits = np.stack([s // 36000, s // 3600 % 10, s // 600 % 6, s // 60 % 10,
                       s % 60 // 10, s % 10], axis=1) + ord("0")
    out = np.full((86_400, 8), ord(":"), dtype=np.uint8)
    out[:, [0, 1, 3, 4, 6, 7]] = digits
    return out


def _timestamp_parts(keys: np.ndarray, q: bytes) -> _Cells:
    """types.format_timestamp of every key (q: the quote around it). Whole seconds are
    assembled as fixed-width bytes (day, "T", time of day, "Z"); with fractions, as the
    day and time and the fraction, put together by the row's form."""
    days, rest = np.divmod(keys, T.US_PER_DAY)
    seconds, micros = np.divmod(rest, US)
    day = _day_bytes(days, q, b"")
    width = day.itemsize
    if not micros.any():
        cells = np.empty((len(keys), width + 10 + len(q)), dtype=np.uint8)
        cells[:, :width] = day.view(np.uint8).reshape(len(keys), width)
        cells[:, width] = ord("T")
        cells[:, width + 1:width + 9] = _clock()[seconds]
        cells[:, width + 9:] = np.frombuffer(b"Z" + q, dtype=np.uint8)
        return _Cells([cells.view(f"S{cells.shape[1]}").ravel().tolist()])
    clock = _clock()[seconds].view("S8").ravel().tolist()
    distinct, at = np.unique(micros, return_inverse=True)
    ends = [(b".%06d" % f).rstrip(b"0") * (f > 0) + b"Z" + q for f in distinct.tolist()]
    return _Cells([day.tolist(), clock, np.array(ends, dtype=object)[at].tolist()],
                  b"%sT%s%s")


def external_bytes(ids: Any, dense: np.ndarray) -> list[bytes]:
    """The UTF-8 external ids of sorted dense ids, sliced from the id chunks' blobs
    (ids.IdMap.externals without decoding each)."""
    out: list[bytes] = []
    if not len(dense):
        return out
    dense = dense.astype(np.int64, copy=False)
    which = dense >> ID_CHUNK_BITS
    for part in np.split(dense, np.flatnonzero(np.diff(which)) + 1):
        chunk = ids.chunks[int(part[0]) >> ID_CHUNK_BITS]
        local = part & (ID_CHUNK - 1)
        blob = chunk.blob
        starts, ends = chunk.offsets[local].tolist(), chunk.offsets[local + 1].tolist()
        out.extend([blob[a:b] for a, b in zip(starts, ends, strict=True)])
    return out


def _cells_from_rows(engine: Engine, ids: np.ndarray, fields: Sequence[str],
                     cells: list[_Cells], json: bool) -> None:
    """Fill the cells the indexes cannot give exactly from the stored rows."""
    unsure = {i: c.from_rows for i, c in enumerate(cells) if len(c.from_rows)}
    wanted = unique(np.concatenate(list(unsure.values())))
    names = [fields[i - 1] for i in unsure]
    rows = profile_rows(engine, ids[wanted], names)
    at = {pos: row for pos, row in zip(wanted.tolist(), rows, strict=True)}
    for i, positions in unsure.items():
        name, column = fields[i - 1], cells[i].parts[0]
        for pos in positions.tolist():
            value = at[pos][name]
            column[pos] = _json_text(value) if json else _csv_cell(_cell(value)).encode()


def _json_text(value: Any) -> bytes:
    return orjson.dumps(value)


def _csv_cell(text: str) -> str:
    """A cell as csv.writer writes it among others (quoted only if it must be)."""
    if not _CSV_SPECIAL.search(text.encode()):
        return text
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow([text, ""])
    return buffer.getvalue()[:-2]  # without the empty cell's "," and the line's end


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
    write_atomically(path, encode_columns(engine, ids_of(kept), fields, fmt, snap))
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
        self._unreached: set[int] = set()  # schedules failing for a part not answering

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
            except PartUnavailable as exc:  # a shard's process died: tried next tick
                if schedule.id not in self._unreached:
                    self._unreached.add(schedule.id)
                    log.warning("scheduled export %d of segment %r failed: %s; trying "
                                "again", schedule.id, schedule.segment, exc)
                continue
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
            self._unreached.discard(schedule.id)
        return done
