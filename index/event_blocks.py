"""Event rows of a RowBlock as checked columns: the bulk path of EventBatch.add_block.

`columns_of` converts a parsed block with pyarrow and numpy only (no Python per row):
the timestamps from their text, the event types and profile ids dictionary-encoded, each
property to the int64 keys or keyword codes the row path would give it. It returns None
for anything the row path might judge differently or refuse (a missing key, a value of
another type, a timestamp in a form it does not read, a property whose type would be
inferred from an integer written in a float column, …): the batch then hands the whole
block to the row path, which decides, and names the line and field of an error.

An `EventColumns` holds no Python object per row, and nothing of it is written until
the batch's flush merges it with its neighbours in line order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bitseg.index import types as T
from bitseg.index.blocks import RowBlock
from bitseg.index.event_keys import ANY, EVENT_KEYS, PROP_TYPES
from bitseg.index.keys import SEP_TEXT


@dataclass(frozen=True)
class Prop:
    """One property over the rows: int64 keys (keyword: codes into `words`), valid."""

    type_: str
    keys: np.ndarray
    valid: np.ndarray
    words: list[str] | None  # a keyword's values, in order of first appearance in its block


@dataclass(frozen=True)
class EventColumns:
    """Checked event rows of one block, or of a slice of one."""

    ts: np.ndarray  # int64 µs
    event_codes: np.ndarray  # int64 into event_names
    event_names: list[str]
    profile_codes: np.ndarray  # int64 into profile_ids
    profile_ids: pa.Array  # utf-8 (integers as their decimal text), each valid
    props: dict[str, Prop]
    block: RowBlock
    start: int  # the table row of this part's first row

    def __len__(self) -> int:
        return len(self.ts)

    @property
    def whole(self) -> bool:
        """Whether this is the whole block, not a slice: its keyword and profile codes
        are then their dictionaries' (pyarrow numbers values in order of first
        appearance, nulls left out), every one used."""
        return self.start == 0 and len(self) == self.block.rows

    def slice(self, a: int, b: int) -> EventColumns:
        props = {name: Prop(p.type_, p.keys[a:b], p.valid[a:b], p.words)
                 for name, p in self.props.items() if p.valid[a:b].any()}
        return EventColumns(self.ts[a:b], self.event_codes[a:b], self.event_names,
                            self.profile_codes[a:b], self.profile_ids, props, self.block,
                            self.start + a)

    def profiles_used(self) -> np.ndarray:
        """The codes of the part's distinct profile ids, in order of first appearance (a
        whole block's are its dictionary's order; a slice's may use fewer, in another)."""
        if self.whole:
            return np.arange(len(self.profile_ids), dtype=np.int64)
        n = len(self.profile_codes)
        first = np.full(len(self.profile_ids), n, dtype=np.int64)
        np.minimum.at(first, self.profile_codes, np.arange(n, dtype=np.int64))
        used = np.flatnonzero(first < n)
        if len(used) > 1 and not (np.diff(first[used]) > 0).all():
            used = used[np.argsort(first[used], kind="stable")]
        return used

    def prop_order(self, exact: bool = True) -> list[str]:
        """Property names in the order the row path meets them: by the first row with a
        value, and within one row in the order of its keys (which takes parsing that row
        again; not `exact`: by name instead)."""
        firsts = {name: int(np.argmax(p.valid)) for name, p in self.props.items()}
        rows = sorted(set(firsts.values()))
        tied = [r for r in rows if exact and sum(1 for f in firsts.values() if f == r) > 1]
        key_order: dict[int, list[str]] = {}
        if tied:  # several properties first met on one row: its keys decide
            lines = self.block.lines()
            wanted = np.array([self.start + r for r in tied], dtype=np.int64)
            by_line = dict(self.block.records_at(wanted))
            for r in tied:
                key_order[r] = list(by_line[int(lines[self.start + r])])
        return sorted(firsts, key=lambda name: (
            firsts[name], key_order[firsts[name]].index(name) if firsts[name] in key_order
            else 0, name))


def first_seen(codes: np.ndarray) -> np.ndarray:
    """The distinct codes in order of their first appearance."""
    used, first = np.unique(codes, return_index=True)
    return used[np.argsort(first)]


def columns_of(block: RowBlock, type_of: Callable[[str], str | None],
               refused: Iterable[str]) -> EventColumns | None:
    """The block's rows as checked columns, or None if the row path must take them.
    What `prepare` worked out ahead for the block is taken as it is, the rest made now."""
    table = block.table
    if any(key not in table.column_names or table.column(key).null_count
           for key in EVENT_KEYS):
        return None  # a key missing or null: "... is required"
    ready = block.prepared if block.prepared is not None else {}

    def made(key: Any, make: Callable[[], Any]) -> Any:
        return ready[key] if key in ready else make()

    ts = made("ts", lambda: iso_micros(_whole(table.column("ts"))))
    if ts is None:
        return None
    events = made("event", lambda: _encoded(table.column("event")))
    if events is None:
        return None
    event_codes, event_names = events
    refused = set(refused)
    if any(e == ANY or SEP_TEXT in e or T.name_problem(e) or e in refused for e in event_names):
        return None
    profiles = made("profile", lambda: _profile_ids(table.column("profile")))
    if profiles is None:
        return None
    props = {}
    for name in table.column_names:
        column = table.column(name)
        if name in EVENT_KEYS or column.null_count == len(column):
            continue  # the row path skips nulls
        type_ = type_of(name)
        if type_ is None:
            type_ = _inferred(block, name, column)
        prop = None
        if type_ in PROP_TYPES:
            prop = ready[(name, type_)] if (name, type_) in ready else _prop(type_, column)
        if prop is None:
            return None
        props[name] = prop
    return EventColumns(ts, event_codes, event_names, *profiles, props, block, 0)


_NATURAL = ((pa.types.is_string, T.KEYWORD), (pa.types.is_boolean, T.BOOL),
            (pa.types.is_int64, T.INT), (pa.types.is_float64, T.FLOAT))


def prepare(block: RowBlock) -> None:
    """Work out ahead what columns_of makes from an event block's table alone — the
    timestamps, the event types and profile ids encoded, each property's keys for the
    type its JSON values suggest — and keep it on the block (`prepared`). Meant for the
    file reader's thread: pyarrow and most of numpy run there without the interpreter
    lock, beside the loading thread building the index from the block before. Pure
    conversions only, so columns_of decides exactly as it would without; anything
    that fails here is left for it to make (and fail) again."""
    table = block.table
    if table is None or any(key not in table.column_names or table.column(key).null_count
                            for key in EVENT_KEYS):
        return  # columns_of hands such a block to the row path without looking further
    ready: dict[Any, Any] = {}
    try:
        ready["ts"] = iso_micros(_whole(table.column("ts")))
        ready["event"] = _encoded(table.column("event"))
        ready["profile"] = _profile_ids(table.column("profile"))
        for name in table.column_names:
            column = table.column(name)
            if name in EVENT_KEYS or column.null_count == len(column):
                continue
            type_ = next((t for test, t in _NATURAL if test(column.type)), None)
            if type_ is not None:
                ready[(name, type_)] = _prop(type_, column)
    except (pa.ArrowException, ValueError, TypeError):
        pass  # what is in `ready` is right; columns_of makes the rest
    block.prepared = ready


def _whole(column: pa.ChunkedArray) -> pa.Array:
    return column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)


def _encoded(column: pa.ChunkedArray) -> tuple[np.ndarray, list[str]] | None:
    """Codes (int64) and the distinct values of a text column without nulls."""
    if not pa.types.is_string(column.type):
        return None
    encoded = pc.dictionary_encode(_whole(column))
    return (encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64),
            encoded.dictionary.to_pylist())


def _profile_ids(column: pa.ChunkedArray) -> tuple[np.ndarray, pa.Array] | None:
    """Profile ids as codes and distinct texts (integers as their decimal text, as the
    row path names them); None for ids it refuses (empty, too long, other types)."""
    if pa.types.is_int64(column.type):
        column = pc.cast(column, pa.string())
    elif not pa.types.is_string(column.type):
        return None
    else:
        size = pc.min_max(pc.binary_length(column))
        if size["min"].as_py() == 0 or size["max"].as_py() > T.MAX_ID_BYTES:
            return None
    encoded = pc.dictionary_encode(_whole(column))
    return (encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64),
            encoded.dictionary)


def _longest(array: pa.Array) -> int:
    """The most bytes a value of a string array spans (a null's span counts: at worst
    the row path is asked)."""
    offsets = np.frombuffer(array.buffers()[1], dtype=np.int32, count=len(array) + 1,
                            offset=array.offset * 4)
    return int(np.diff(offsets).max(initial=0))


def _inferred(block: RowBlock, name: str, column: pa.ChunkedArray) -> str | None:
    """The type the row path infers from the property's first value (None: unsure)."""
    if T.name_problem(name):
        return None
    kind = column.type
    if pa.types.is_string(kind):
        return T.KEYWORD
    if pa.types.is_boolean(kind):
        return T.BOOL
    if pa.types.is_int64(kind):
        return T.INT
    if pa.types.is_float64(kind):  # pyarrow reads 3 as 3.0 in a float column: look
        row = int(np.argmax(_whole(column).is_valid().to_numpy(zero_copy_only=False)))
        record = block.readable({block.line_of(row)}).get(block.line_of(row))
        return T.FLOAT if record is not None and type(record[name]) is float else None
    return None


def _prop(type_: str, column: pa.ChunkedArray) -> Prop | None:
    """The property's keys as the row path's fast conversion gives them, or None."""
    array = _whole(column)
    kind = array.type
    valid = array.is_valid().to_numpy(zero_copy_only=False)
    if type_ == T.KEYWORD:
        if not pa.types.is_string(kind) or _longest(array) > T.MAX_VALUE_BYTES:
            return None
        encoded = pc.dictionary_encode(array)
        codes = pc.fill_null(encoded.indices, 0).to_numpy().astype(np.int64)
        return Prop(type_, codes, valid, encoded.dictionary.to_pylist())
    if type_ == T.BOOL:
        if not pa.types.is_boolean(kind):
            return None
        values = pc.fill_null(array, False).to_numpy(zero_copy_only=False)
        return Prop(type_, values.astype(np.int64), valid, None)
    if type_ == T.INT:
        if not pa.types.is_int64(kind):
            return None  # floats: the row path decides which are integers
        keys = pc.fill_null(array, 0).to_numpy()
        if not ((keys > -T.MAX_KEY) & (keys < T.MAX_KEY)).all():
            return None
        return Prop(type_, keys.astype(np.int64), valid, None)
    if not (pa.types.is_float64(kind) or pa.types.is_int64(kind)):
        return None
    floats = pc.fill_null(array, 0).to_numpy().astype(np.float64)
    if not (np.isfinite(floats) & (np.abs(floats) < T.MAX_KEY / T.FLOAT_SCALE)).all():
        return None
    keys = np.zeros(len(floats), dtype=np.int64)
    keys[valid] = T.float_keys(floats[valid], T.FLOAT_DIGITS)
    return Prop(type_, keys, valid, None)


# ------------------------------------------------------------------------ timestamps
_DIGITS = (0, 1, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18)
_MONTH_DAYS = np.array([31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31], dtype=np.int64)


def iso_micros(column: pa.Array) -> np.ndarray | None:
    """µs since the epoch of a text column whose every value reads
    YYYY-MM-DDTHH:MM:SS[.f…f][Z] (1-6 decimals, all of one width, valid date and time,
    years 0001-9999), the forms on which both of the row path's parsers agree; None
    for any other column (the row path reads it)."""
    n = len(column)
    if n == 0 or not pa.types.is_string(column.type) or column.null_count:
        return None
    offsets = np.frombuffer(column.buffers()[1], dtype=np.int32, count=n + 1,
                            offset=column.offset * 4)
    width = int(offsets[1] - offsets[0])
    if width < 19 or width > 27 or not (np.diff(offsets) == width).all():
        return None
    raw = np.frombuffer(column.buffers()[2], dtype=np.uint8)[offsets[0]:offsets[-1]]
    text = raw.reshape(n, width)
    zulu = text[:, -1] == ord("Z")
    if zulu.any() and not zulu.all():
        return None
    body = width - int(zulu[0])
    if body == 20 or body > 26:
        return None
    digits = list(_DIGITS) + list(range(20, body))
    signs = {4: "-", 7: "-", 10: "T", 13: ":", 16: ":"} | ({19: "."} if body > 19 else {})
    number = text[:, digits] - np.uint8(ord("0"))  # a byte below "0" wraps past 9
    if (number > 9).any():
        return None
    if any((text[:, at] != ord(sign)).any() for at, sign in signs.items()):
        return None

    def field(first: int, count: int) -> np.ndarray:
        value = number[:, first].astype(np.int32)
        for i in range(first + 1, first + count):
            value *= 10
            value += number[:, i]
        return value

    date = (field(0, 4) << 9) | (field(4, 2) << 5) | field(6, 2)  # year, month, day
    hour, minute, second = field(8, 2), field(10, 2), field(12, 2)
    if not ((hour < 24) & (minute < 60) & (second < 60)).all():
        return None
    low, high = int(date.min()), int(date.max())
    if high - low < max(n, 1 << 12):  # each date of the range once, not each row's
        days = _days_of(np.arange(low, high + 1, dtype=np.int64))[date - low]
    else:
        days = _days_of(date.astype(np.int64))
    if (days == _NO_DAY).any():
        return None
    seconds = (hour * 60 + minute) * 60 + second
    micros = (days * 86_400 + seconds) * 1_000_000
    if body > 19:
        micros += field(14, body - 20) * 10 ** (26 - body)
    return micros


_NO_DAY = np.iinfo(np.int64).min


def _days_of(code: np.ndarray) -> np.ndarray:
    """Days since 1970-01-01 of date codes (year << 9 | month << 5 | day, int64);
    _NO_DAY for a code that is no valid date (month 13, February 30, year 0)."""
    year, month, day = code >> 9, (code >> 5) & 15, code & 31
    ok = (year >= 1) & (month >= 1) & (month <= 12)
    leap = (year % 4 == 0) & ((year % 100 != 0) | (year % 400 == 0))
    longest = _MONTH_DAYS[np.clip(month, 1, 12) - 1] + ((month == 2) & leap)
    ok &= (day >= 1) & (day <= longest)
    return np.where(ok, _days_from_civil(year, month, day), _NO_DAY)


def _days_from_civil(year: np.ndarray, month: np.ndarray, day: np.ndarray) -> np.ndarray:
    """Days since 1970-01-01 of proleptic Gregorian dates (H. Hinnant's algorithm)."""
    y = year - (month <= 2)
    era = y // 400
    yoe = y - era * 400
    doy = (153 * ((month + 9) % 12) + 2) // 5 + day - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146_097 + doe - 719_468
