"""Loading a dataset folder (CONTRACT §1) into an Engine.

A dataset folder holds ``schema.json`` (optional), exactly one of ``profiles.jsonl``,
``profiles.jsonl.gz`` or ``profiles.csv``, and optionally ``events.jsonl(.gz)`` and
``orders.jsonl(.gz)``.  Each data file is one batch: a bad line anywhere in it means
nothing of that file is applied.  Files load in the order schema, profiles, events,
orders; a file that failed leaves the files before it loaded.

profiles.csv rules
------------------
- The file is UTF-8 (a leading byte-order mark is ignored), comma-separated, with
  standard CSV quoting (``"..."``, ``""`` for a quote inside; a quoted cell may span
  lines).  Line numbers in errors are physical lines of the file, the header being
  line 1; a record spanning several lines is reported at its first line.
- The first row is the header: it names the field of each column (surrounding spaces
  are dropped) and must include ``id``.  Column names must be distinct.
- An empty cell means the field is absent from that line: on an update the old value is
  kept.  (CSV cannot remove a value; use JSON Lines with ``null`` for that.)  A row with
  fewer cells than the header has its missing trailing cells empty; a row with more
  cells is an error.  Blank lines are skipped.
- ``id`` is taken verbatim as text (``007`` stays ``"007"``).
- A cell of a field with a known type (declared in schema.json, or already known to the
  store) is converted by that type:

  - ``int``: an integer, like ``-12``;
  - ``float``: a decimal number, like ``3``, ``1520.50``, ``-0.5`` or ``1e3``;
  - ``bool``: ``true``/``false``/``1``/``0``, in any letter case;
  - ``date`` (``YYYY-MM-DD``) and ``timestamp`` (ISO 8601): passed on as text and
    checked like JSON values;
  - ``keywords``: split on ``|`` (``vip|newsletter``), empty parts dropped (a cell
    of separators only, like ``|``, is empty);
  - ``keyword``: the text as is, ``|`` included.

  A cell that does not fit its type is an error naming the file, line and field.
- A field of unknown type gets its type from its first non-empty cell, and later cells
  of that column are then converted by that type, as if declared:
  ``true``/``false`` (any case) -> bool; an integer without leading zeros -> int
  (``007`` -> keyword); a number with a decimal point or exponent -> float;
  ``YYYY-MM-DD`` -> date; an ISO 8601 timestamp -> timestamp; text containing ``|``
  -> keywords; anything else -> keyword.  When the first value is not representative
  (say, a multi-valued column whose first cell has one value) declare the field in
  schema.json.
"""

from __future__ import annotations

import csv
import gzip
import io
import re
import sys
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import orjson
from tqdm import tqdm

from bitseg.index.allocator import bound_load_memory, pad_heaps, trim_heap
from bitseg.index.errors import BitsegError, DataError, SchemaError
from bitseg.index.schema import Schema
from bitseg.index.types import BOOL, DATE, FLOAT, INT, KEYWORD, KEYWORDS, TIMESTAMP, infer

SCHEMA_FILE = "schema.json"
PROFILE_FILES = ("profiles.jsonl", "profiles.jsonl.gz", "profiles.csv")
EVENT_FILES = ("events.jsonl", "events.jsonl.gz")
ORDER_FILES = ("orders.jsonl", "orders.jsonl.gz")

_BOM = b"\xef\xbb\xbf"
_READ_SIZE = 1 << 20
_INT_RE = re.compile(r"^[+-]?\d+$")
_PLAIN_INT_RE = re.compile(r"^[+-]?(0|[1-9]\d*)$")
_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
_DECIMAL_RE = re.compile(r"^[+-]?(\d+\.\d*|\.\d+|\d+[eE][+-]?\d+|\d+\.\d*[eE][+-]?\d+)$")
_BOOLS = {"true": True, "false": False, "1": True, "0": False}

Pairs = Iterator[tuple[int, dict[str, Any]]]


@dataclass
class LoadReport:
    """What one load_dataset call did."""

    profiles_created: int
    profiles_updated: int
    events: int
    orders: int
    seconds: float
    file_seconds: dict[str, float] = field(default_factory=dict)  # each file's own time


# --- the folder ---------------------------------------------------------------------


RESERVE_PER_BYTE = 4  # bytes of store reserved per byte of input (JSON Lines or CSV)


def bulk_reserve(path: str | Path) -> int:
    """Bytes to reserve in the store for loading this dataset: a generous multiple of its
    files' sizes (a stored event or order takes well under its JSON line's size); a .gz
    file is taken to hold ten times its size."""
    folder = _dataset_folder(path)
    total = 0
    for file in folder.iterdir():
        if file.suffix in (".jsonl", ".csv"):
            total += RESERVE_PER_BYTE * file.stat().st_size
        elif file.name.endswith(".gz"):
            total += 10 * RESERVE_PER_BYTE * file.stat().st_size
    return total


def load_dataset(path: str | Path, engine: Any, *, progress: bool = False,
                 columnar: bool = True) -> LoadReport:
    """Load a dataset folder into the engine: schema, then profiles, events, orders.

    JSON Lines files go through the columnar bulk path (loaders/columnar.py) unless
    `columnar` is False, which reads them line by line; both leave identical stores."""
    started = time.perf_counter()
    bound_load_memory()
    pad_heaps()
    folder = _dataset_folder(path)
    profiles = _profiles_file(folder)
    events = _pick(folder, EVENT_FILES)
    orders = _pick(folder, ORDER_FILES)
    # Checked before anything is written, so an unsupported file cannot half-load a folder.
    _check_supported(engine, events, "track_events", "events")
    _check_supported(engine, orders, "add_orders", "orders")
    # An engine that takes RowBlocks says so; any other gets (line, object) pairs.
    columnar = columnar and getattr(engine, "takes_blocks", False)
    _declare(engine, read_schema(folder / SCHEMA_FILE))
    timed: dict[str, float] = {}
    with _timed(timed, profiles):
        created, updated = _load_profiles(engine, profiles, progress, columnar)
    n_events = n_orders = 0
    if events:
        with _timed(timed, events):
            n_events = _load_rows(engine.track_events, events, progress, columnar)
    if orders:
        with _timed(timed, orders):
            n_orders = _load_rows(engine.add_orders, orders, progress, columnar)
    return LoadReport(created, updated, n_events, n_orders, time.perf_counter() - started,
                      timed)


@contextmanager
def _timed(into: dict[str, float], file: Path) -> Iterator[None]:
    """Record how long the block took under the file's name (and give the heap's free
    memory back to the system after it)."""
    started = time.perf_counter()
    try:
        yield
    finally:
        trim_heap()
    into[file.name] = round(time.perf_counter() - started, 3)


def _dataset_folder(path: str | Path) -> Path:
    """The dataset folder, or a clear error when there is none."""
    folder = Path(path)
    if not folder.exists():
        raise DataError(f"dataset folder {str(folder)!r} does not exist")
    if not folder.is_dir():
        raise DataError(f"dataset {str(folder)!r} is not a folder")
    return folder


def _profiles_file(folder: Path) -> Path:
    """The folder's one profiles file; an error when there is none."""
    found = _pick(folder, PROFILE_FILES)
    if found is None:
        raise DataError(f"dataset folder {str(folder)!r} has no profiles file (expected "
                        f"{', '.join(PROFILE_FILES[:-1])} or {PROFILE_FILES[-1]})")
    return found


def _pick(folder: Path, names: tuple[str, ...]) -> Path | None:
    """The one file of `names` present in the folder; None, or an error if ambiguous."""
    found = [folder / name for name in names if (folder / name).is_file()]
    if len(found) > 1:
        listed = " and ".join(p.name for p in found)
        raise DataError(f"dataset folder {str(folder)!r} has both {listed}; keep only one")
    return found[0] if found else None


def _check_supported(engine: Any, file: Path | None, method: str, what: str) -> None:
    """Refuse a data file the engine has no method for."""
    if file is not None and not callable(getattr(engine, method, None)):
        raise BitsegError(f"{file.name}: loading {what} is not supported yet")


def _declare(engine: Any, schema: dict | None) -> None:
    """Declare schema.json's fields; a conflict with the store names schema.json."""
    if schema is not None:
        engine.declare_schema(schema, source=SCHEMA_FILE)


def _load_profiles(engine: Any, file: Path, progress: bool, columnar: bool
                   ) -> tuple[int, int]:
    """Upsert one profiles file as one batch; (created, updated)."""
    with _progress_bar(file, progress) as on_bytes:
        if file.name.endswith(".csv"):
            pairs: Iterator[Any] = iter_profiles_csv(file, engine.schema.profiles,
                                                     on_bytes=on_bytes)
        else:
            pairs = _jsonl(file, on_bytes, columnar)
        with closing(pairs):  # the engine may stop early on a bad line; close the file now
            report = engine.upsert_profiles(pairs, file=file.name)
    return report.created, report.updated


def _load_rows(method: Callable[..., Any], file: Path, progress: bool, columnar: bool) -> int:
    """Pass one events/orders file to the engine as one batch; the number of rows."""
    counter = [0]
    with _progress_bar(file, progress) as on_bytes:
        with closing(_jsonl(file, on_bytes, columnar)) as rows:
            if not columnar:
                rows = _counted(rows, counter)
            report = method(rows, file=file.name)
    return report.rows if columnar else counter[0]


def _counted(pairs: Iterator[tuple[int, dict]], counter: list[int]) -> Pairs:
    """Pass pairs through, counting them in counter[0]."""
    for pair in pairs:
        counter[0] += 1
        yield pair


def _jsonl(file: Path, on_bytes: Callable[[int], object] | None, columnar: bool
           ) -> Iterator[Any]:
    """A JSON Lines file as RowBlocks (the bulk path) or as (line, object) pairs."""
    if columnar:
        from bitseg.loaders.columnar import iter_blocks  # it imports this module
        return iter_blocks(file, on_bytes=on_bytes)
    return iter_jsonl(file, on_bytes=on_bytes)


@contextmanager
def _progress_bar(file: Path, enabled: bool) -> Iterator[Callable[[int], object] | None]:
    """A byte-counting tqdm bar on stderr labelled with the file name (or None)."""
    if not enabled:
        yield None
        return
    with tqdm(total=file.stat().st_size, desc=file.name, unit="B", unit_scale=True,
              unit_divisor=1024, file=sys.stderr, leave=True) as bar:
        yield bar.update


# --- schema.json ---------------------------------------------------------------------


def read_schema(path: str | Path) -> dict | None:
    """schema.json (given as the file or its folder), checked; None when absent."""
    file = Path(path)
    if file.is_dir():
        file = file / SCHEMA_FILE
    if not file.exists():
        return None
    try:
        data = orjson.loads(file.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise SchemaError(f"{file.name}: not valid JSON: {exc}") from None
    Schema().declare(data, source=file.name)  # raises SchemaError naming the file
    return data


# --- JSON Lines ----------------------------------------------------------------------


def iter_jsonl(path: str | Path, *, on_bytes: Callable[[int], object] | None = None) -> Pairs:
    """(line number, object) for each non-blank line of a .jsonl or .jsonl.gz file."""
    name = Path(path).name
    with _open_binary(Path(path), on_bytes) as stream:
        for number, line in enumerate(stream, 1):
            if line.isspace():
                continue
            yield number, _parse_line(line, name, number)


def _parse_line(line: bytes, name: str, number: int) -> dict[str, Any]:
    """One JSON object from one line, or a DataError locating it."""
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        if number == 1 and line.startswith(_BOM):
            return _parse_line(line[len(_BOM):], name, number)
        raise DataError(f"not valid JSON: {exc.msg} (column {exc.colno})",
                        file=name, line=number) from None
    if not isinstance(value, dict):
        raise DataError(f"not valid JSON: expected an object, got {_json_kind(value)}",
                        file=name, line=number)
    return value


def _json_kind(value: Any) -> str:
    """How a non-object JSON value is called in messages."""
    if value is None:
        return "null"
    kinds = {bool: "a boolean", int: "a number", float: "a number", str: "a string",
             list: "an array"}
    return kinds.get(type(value), type(value).__name__)


# --- files and byte counting -----------------------------------------------------------


class _CountingReader(io.RawIOBase):
    """A raw file that reports how many bytes were read from it."""

    def __init__(self, raw: BinaryIO, on_bytes: Callable[[int], object]) -> None:
        self._raw = raw
        self._on_bytes = on_bytes

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        count = self._raw.readinto(buffer)
        if count:
            self._on_bytes(count)
        return count

    def close(self) -> None:
        self._raw.close()
        super().close()


@contextmanager
def _open_binary(path: Path, on_bytes: Callable[[int], object] | None) -> Iterator[BinaryIO]:
    """A buffered binary stream of the file, gunzipped for .gz, counting raw bytes read."""
    with ExitStack() as stack:
        raw: Any = stack.enter_context(open(path, "rb", buffering=0))
        if on_bytes is not None:
            raw = stack.enter_context(_CountingReader(raw, on_bytes))
        stream: Any = stack.enter_context(io.BufferedReader(raw, buffer_size=_READ_SIZE))
        if path.name.endswith(".gz"):
            gz = stack.enter_context(gzip.GzipFile(fileobj=stream, mode="rb"))
            stream = stack.enter_context(io.BufferedReader(gz, buffer_size=_READ_SIZE))
        try:
            yield stream
        except (OSError, EOFError, zlib.error) as exc:
            # A truncated or corrupt .gz, or a failing disk: no line to blame, only the file.
            raise DataError(f"cannot read the file: {exc}", file=path.name) from None


# --- CSV -----------------------------------------------------------------------------


def iter_profiles_csv(
    path: str | Path, types: Mapping[str, str], *,
    on_bytes: Callable[[int], object] | None = None,
) -> Pairs:
    """(line number, profile) for each record of a profiles.csv, cells typed (see above)."""
    name = Path(path).name
    known = dict(types)  # grows as undeclared columns get their type from a first cell
    with _open_binary(Path(path), on_bytes) as binary:
        text = io.TextIOWrapper(binary, encoding="utf-8-sig", newline="")
        rows = _csv_rows(csv.reader(text), name)
        first = next(rows, None)
        if first is None:
            return
        header = _check_header(first[1], name)
        for line, row in rows:
            yield line, _csv_record(header, row, known, name, line)


def _csv_rows(reader: Any, name: str) -> Iterator[tuple[int, list[str]]]:
    """(first physical line, cells) of each non-blank CSV record; DataError if unreadable."""
    start = 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except (csv.Error, UnicodeDecodeError) as exc:
            raise DataError(f"not valid CSV: {exc}", file=name, line=start) from None
        if row:
            yield start, row
        start = reader.line_num + 1


def _check_header(row: list[str], name: str) -> list[str]:
    """The column names of the header row, checked."""
    header = [cell.strip() for cell in row]
    seen: set[str] = set()
    for column in header:
        if not column:
            raise DataError("the header has an empty column name", file=name, line=1)
        if column in seen:
            raise DataError("column named twice in the header", file=name, line=1, field=column)
        seen.add(column)
    if "id" not in seen:
        raise DataError("the header must include an id column", file=name, line=1)
    return header


def _csv_record(
    header: list[str], row: list[str], known: dict[str, str], name: str, line: int,
) -> dict[str, Any]:
    """One CSV row as a profile dict: empty cells left out, other cells typed."""
    if len(row) > len(header):
        raise DataError(f"{len(row)} cells but the header has {len(header)} columns",
                        file=name, line=line)
    record: dict[str, Any] = {}
    for column, cell in zip(header, row, strict=False):  # short rows: trailing cells empty
        if cell == "":
            continue
        if column == "id":
            record["id"] = cell
            continue
        type_ = known.get(column)
        if type_ is None:
            type_ = known[column] = infer_text(cell)
        try:
            value = convert_text(type_, cell)
        except ValueError as exc:
            raise DataError(str(exc), file=name, line=line, field=column) from None
        if value != []:  # a keywords cell of separators only ("|") is empty too
            record[column] = value
    return record


def convert_text(type_: str, text: str) -> Any:
    """A CSV cell's text as a JSON-like value of the given type; ValueError if it does not fit."""
    if type_ == INT:
        if not _INT_RE.match(text):
            raise ValueError(f"expected an integer, got {text!r}")
        return int(text)
    if type_ == FLOAT:
        if not _FLOAT_RE.match(text):
            raise ValueError(f"expected a number, got {text!r}")
        return float(text)
    if type_ == BOOL:
        value = _BOOLS.get(text.lower())
        if value is None:
            raise ValueError(f"expected true, false, 1 or 0, got {text!r}")
        return value
    if type_ == KEYWORDS:
        return [part for part in text.split("|") if part]
    return text  # keyword, date and timestamp texts go to the engine as they are


def infer_text(text: str) -> str:
    """The type of a field first seen in a CSV cell with this (non-empty) text."""
    if text.lower() in ("true", "false"):
        return BOOL
    if _PLAIN_INT_RE.match(text):
        return INT
    if _DECIMAL_RE.match(text):
        return FLOAT
    string_type = infer(text)  # the engine's own date / timestamp patterns
    if string_type in (DATE, TIMESTAMP):
        return string_type
    return KEYWORDS if "|" in text else KEYWORD
