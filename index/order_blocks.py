"""Order lines applied column-wise: the bulk path of OrderBatch (index/order_batch.py).

A RowBlock's table is checked column by column; the rows that are the common case
(a new order id, well-typed values, timestamps in one of the forms below) are applied
with numpy and pyarrow compute, without a Python call per row per field:

- order ids are looked up in LMDB in one call, profile ids too; the profiles nobody has
  seen yet are created through ensure_profile, in the order the row path creates them;
- each order's row (JSON with sorted keys, order_batch.py `_dump`) is assembled as text from
  the columns and written with the ids in one call per database;
- value codes, column writes, item ids and the derived qty_sum / distinct go into the
  batch's queues exactly as add() queues them.

The rows taken are always a prefix of the block: from the first row this path cannot
take (an id seen before, a value of another type, a null where a value is required, a
timestamp with a zone, a float that might have been written as an integer, …) every row
goes back to add(), in line order.  Order ids, item ids and new profiles are handed out
in arrival order, so only a prefix keeps them the row path's; add() also raises the
error of a bad row with its line and field.
"""

from __future__ import annotations

import functools
import operator
import re
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from bitseg.index import idhash
from bitseg.index import types as T
from bitseg.index.blocks import RowBlock, Taken, texts_of
from bitseg.index.compare import I64_MIN
from bitseg.index.keys import ORDER_IDS
from bitseg.index.order_keys import ITEM_RESERVED, MAX_ID_BYTES, RESERVED
from bitseg.index.order_queues import ValueQueue

if TYPE_CHECKING:
    from bitseg.index.order_batch import OrderBatch

SCALE = T.FLOAT_SCALE
MAX_INT_FLOAT = (T.MAX_KEY - 1) // SCALE  # an integer in a float field: key = x * SCALE
FAST_FLOAT = 2.0**26  # below: one 8-decimal number per double, so rint(x * 1e8) is its key
SMALL_FLOAT = 1e-5  # below: left to add() (orjson writes such floats with an exponent)
_CONTROL = "[\x00-\x1f]"
_INT_LITERAL = rb"\s*:\s*-?\d+\s*[,}\]]"  # after a key: an integer, not a float
_STRING = (pa.string(), pa.large_string())


class _Coded:
    """A column's values for the value indexes: (row, value code) pairs, a row's values
    distinct and sorted as the row path's tuples are; `values` are Python values."""

    __slots__ = ("rows", "codes", "values")

    def __init__(self, rows: np.ndarray, codes: np.ndarray, values: list) -> None:
        self.rows, self.codes, self.values = rows, codes, values


class _Conv:
    """One column (order field, or item key over all items) converted for its type."""

    __slots__ = ("valid", "bad", "json", "keys", "values")

    def __init__(self, valid: np.ndarray, bad: np.ndarray, json: tuple | None,
                 keys: np.ndarray | None = None, values: _Coded | None = None) -> None:
        self.valid, self.bad, self.json, self.keys, self.values = valid, bad, json, keys, values


@functools.lru_cache(maxsize=256, typed=True)
def _s(value: Any, type_: Any = None) -> pa.Scalar:
    """A pyarrow scalar (string unless typed): pyarrow.compute given a bare Python value
    looks for pandas each call, ~0.1 ms, more than the kernel costs on a block."""
    return pa.scalar(value, type_ or pa.string())


def _np(mask: Any) -> np.ndarray:
    """A boolean pyarrow array (nulls false) as numpy."""
    return pc.fill_null(mask, _s(False, pa.bool_())).to_numpy(zero_copy_only=False)


def _valid(arr: pa.Array) -> np.ndarray:
    return _np(pc.is_valid(arr))


def _join(*parts: Any) -> pa.Array:
    merged: list[Any] = []  # neighbouring strings as one scalar
    for part in parts:
        if isinstance(part, str) and merged and isinstance(merged[-1], str):
            merged[-1] += part
        else:
            merged.append(part)
    return pc.binary_join_element_wise(*(_s(p) if isinstance(p, str) else p for p in merged),
                                       _s(""))


def _members(convs: dict[str, _Conv], upto: int) -> tuple:
    """The parts of '"a":…,"b":…' for the columns (sorted by name) having a value in rows
    0 … upto-1, a row's missing values left out: joined in one pass when every row has
    them all (the common case), else one text per column joined with commas."""
    named = [(name, c) for name, c in sorted(convs.items())
             if c.json is not None and c.valid[:upto].any()]
    if named and all(c.valid[:upto].all() for _, c in named):
        parts: list[Any] = []
        for i, (name, c) in enumerate(named):
            parts.append(("," if i else "") + orjson.dumps(name).decode() + ":")
            parts.extend(p if isinstance(p, str) else p[:upto] for p in c.json)
        return tuple(parts)
    return (_joined([_text(orjson.dumps(name).decode() + ":", c.json, c.valid[:upto])
                     for name, c in named], upto),)


def prepare(block: RowBlock) -> None:
    """Made ahead of a block's turn, on a thread of its own (loaders/columnar.py): its
    lines as an array, which integer_literal searches. Their newline scan took ~18 ms
    of a 16 MiB block on the loading thread, 0.7 s of the 1M orders file; the rest of
    the block's conversions depend on the batch's types, and made ahead they cost more
    than they saved (the interpreter lock; columnar.PREPARE)."""
    if block.data and block.table is not None:
        block.prepared = {"lines": line_array(block.data)}


def line_array(data: bytes) -> pa.Array:
    """The lines of data (each with its newline) as a binary array over its bytes."""
    breaks = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 10) + 1
    ends = [] if data.endswith(b"\n") else [len(data)]
    offsets = np.concatenate(([0], breaks, ends)).astype(np.int32)
    return pa.Array.from_buffers(pa.binary(), len(offsets) - 1,
                                 [None, pa.py_buffer(offsets), pa.py_buffer(data)])


def _text_json(arr: pa.Array, plain: bool) -> tuple[tuple, np.ndarray]:
    """Strings as orjson writes them ("…" with \\ and " escaped), as the parts to join;
    rows holding a control character (escaped otherwise) or perhaps too long a string
    are bad.  `plain`: the block's text has no backslash, so no string needs escaping."""
    esc = arr
    bad = _np(pc.greater(pc.binary_length(arr), _s(T.MAX_VALUE_BYTES // 4, pa.int32())))
    if not plain:
        if _np(pc.match_substring(arr, "\\")).any():
            esc = pc.replace_substring(esc, "\\", "\\\\")
        if _np(pc.match_substring(arr, '"')).any():
            esc = pc.replace_substring(esc, '"', '\\"')
        bad |= _np(pc.match_substring_regex(arr, _CONTROL))
    return ('"', esc, '"'), bad


def _text(prefix: str, parts: tuple, valid: np.ndarray) -> pa.Array:
    """prefix + the joined parts (strings, and arrays cut to the length of `valid`), null
    where not valid (the arrays of numbers hold a stand-in there)."""
    upto = len(valid)
    parts = tuple(p if isinstance(p, str) else p[:upto] for p in parts)
    if isinstance(parts[0], str):
        parts = (prefix + parts[0],) + parts[1:]
    elif prefix:
        parts = (prefix,) + parts
    text = _join(*parts) if len(parts) > 1 else pc.cast(parts[0], pa.string())
    if valid.all():
        return text
    return pc.if_else(pa.array(valid, pa.bool_()), text, _s(None, pa.string()))


def _joined(texts: list[pa.Array], rows: int) -> pa.Array:
    """The texts of each row joined with commas, nulls left out ("" when all are)."""
    if not texts:
        return pa.array(np.full(rows, "", dtype=object), pa.string())
    if len(texts) == 1:
        return pc.fill_null(texts[0], _s(""))
    # pyarrow 26 drops the rows where every text is null: such rows get a lone ""
    some = np.zeros(rows, dtype=bool)
    for text in texts:
        some |= _valid(text)
    if some.all():
        return pc.binary_join_element_wise(*texts, _s(","), null_handling="skip")
    lead = pc.if_else(pa.array(some, pa.bool_()), _s(None, pa.string()), _s(""))
    return pc.binary_join_element_wise(lead, *texts, _s(","), null_handling="skip")


def _codes(arr: pa.Array, rows: np.ndarray) -> _Coded:
    """Value codes (first appearance order) of the non-null strings / bools of arr."""
    enc = pc.dictionary_encode(arr).combine_chunks() if isinstance(arr, pa.ChunkedArray) \
        else pc.dictionary_encode(arr)
    codes = pc.fill_null(enc.indices, _s(-1, enc.indices.type)).to_numpy(
        zero_copy_only=False).astype(np.int64)
    keep = codes >= 0
    return _Coded(rows[keep], codes[keep], enc.dictionary.to_pylist())


def _ints_json(keys: np.ndarray) -> pa.Array:
    return pc.cast(pa.array(keys, pa.int64()), pa.string())


def _floats_json(numbers: np.ndarray) -> pa.Array:
    """Floats (finite) as orjson writes them in a row, one string each: orjson formats
    the whole array in C (~2x faster than pyarrow's cast to string and its "1" -> "1.0" fix)."""
    if len(numbers) == 0:
        return pa.array([], pa.string())
    written = orjson.dumps(np.ascontiguousarray(numbers, dtype=np.float64),
                           option=orjson.OPT_SERIALIZE_NUMPY)[1:-1]
    texts = pc.list_flatten(pc.split_pattern(pa.array([written], pa.large_binary()), b","))
    return texts.cast(pa.binary()).cast(pa.string())


class _Converter:
    """Checks and converts the columns of one block against the batch's field types."""

    def __init__(self, batch: OrderBatch, block: RowBlock) -> None:
        self.batch, self.block, self.data = batch, block, block.data
        self.plain = bool(block.data) and b"\\" not in block.data
        self._line_array: pa.Array | None = None

    def integer_literal(self, key: str, rows: np.ndarray) -> bool:
        """Whether the block may give `key` an integer (not a float) literal on these
        table rows: then an integral double of that key may have been an int, which the
        row keeps as one.  Only those rows' lines are searched (RE2, no Python per line)
        unless they are most of the block (a Python regex over 16 MiB took ~20 ms)."""
        if not self.data:
            return True
        name = orjson.dumps(key)
        lines = self.block.lines()
        seen = np.zeros(int(lines[-1]) - self.block.first_line + 1, dtype=bool)
        seen[lines[rows] - self.block.first_line] = True  # (np.unique hashed: 8 ms a key)
        at = np.flatnonzero(seen)
        if len(at) * 2 > self.block.rows:
            return re.search(re.escape(name) + _INT_LITERAL, self.data) is not None
        literal = "".join(c if c.isalnum() or ord(c) > 127 else f"\\x{ord(c):02x}"
                          for c in name.decode())  # RE2 reads \xHH; re.escape's "\ " not
        found = pc.match_substring_regex(self._lines().take(pa.array(at)),
                                         literal + _INT_LITERAL.decode())
        return bool(_np(found).any())

    def _lines(self) -> pa.Array:
        """The block's lines (each with its newline) as a binary array over its bytes."""
        if self._line_array is None:
            made = (self.block.prepared or {}).get("lines")
            self._line_array = made if made is not None else line_array(self.data)
        return self._line_array

    def convert(self, arr: pa.Array, type_: str, key: str,
                owners: np.ndarray | None = None) -> _Conv:
        """A column of m values (nulls: absent) for a field of type_; bad values are
        marked, the others converted (json text, keys, value codes).  `owners`: the table
        row of each value (items: their order's), when not its own position."""
        m = len(arr)
        valid = _valid(arr)
        nothing = np.zeros(m, dtype=bool)
        rows = np.arange(m, dtype=np.int64)
        atype = arr.type
        if pa.types.is_null(atype):
            return _Conv(nothing, nothing, None)
        if type_ == T.KEYWORD and atype in _STRING:
            json, bad = _text_json(arr, self.plain)
            return _Conv(valid, bad & valid, json, values=_codes(arr, rows))
        if type_ == T.KEYWORDS and atype in _STRING:
            (_, esc, _), bad = _text_json(arr, self.plain)
            return _Conv(valid, bad & valid, ('["', esc, '"]'), values=_codes(arr, rows))
        if type_ == T.KEYWORDS and pa.types.is_list(atype) and \
                (atype.value_type in _STRING or pa.types.is_null(atype.value_type)):
            return self._keywords(arr, valid)
        if type_ == T.BOOL and pa.types.is_boolean(atype):
            json = (pc.if_else(arr, _s("true"), _s("false")),)
            return _Conv(valid, nothing, json, values=_codes(arr, rows))
        if type_ in (T.INT, T.FLOAT) and (pa.types.is_int64(atype) or pa.types.is_float64(atype)):
            return self._number(arr, valid, type_, key, owners)
        if type_ in (T.DATE, T.TIMESTAMP) and atype in _STRING:
            keys, ok = self.times(arr, type_)
            return _Conv(valid, valid & ~ok, (_ints_json(keys),), keys=keys)
        return _Conv(valid, valid.copy(), None)  # another type: add() says what is wrong

    def _keywords(self, arr: pa.Array, valid: np.ndarray) -> _Conv:
        m = len(arr)
        flat = pc.list_flatten(arr)
        parent = pc.list_parent_indices(arr).to_numpy(zero_copy_only=False).astype(np.int64)
        bad = np.zeros(m, dtype=bool)
        if pa.types.is_null(flat.type):
            bad[parent] = True  # [null, …]: not a list of strings
            flat = pa.array([""] * len(flat), pa.string())
        else:
            bad[parent[~_valid(flat)]] = True
            flat = pc.fill_null(flat, _s(""))
        order = pc.sort_indices(pa.table({"p": pa.array(parent, pa.int64()), "v": flat}),
                                sort_keys=[("p", "ascending"), ("v", "ascending")])
        order = order.to_numpy(zero_copy_only=False)
        parent, flat = parent[order], flat.take(order)
        if len(parent) > 1:  # a row's values distinct
            same = (parent[1:] == parent[:-1]) & _np(pc.equal(flat[1:], flat[:-1]))
            keep = np.concatenate(([True], ~same))
            parent, flat = parent[keep], flat.filter(pa.array(keep, pa.bool_()))
        text, text_bad = _text_json(flat, self.plain)
        text = _join(*text)
        bad[parent[text_bad]] = True
        offsets = np.zeros(m + 1, dtype=np.int32)
        np.cumsum(np.bincount(parent, minlength=m), out=offsets[1:])
        lists = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), text,
                                         mask=pa.array(~valid, pa.bool_()))
        json = ("[", pc.binary_join(lists, _s(",")), "]")
        return _Conv(valid, bad & valid, json, values=_codes(flat, parent))

    def _number(self, arr: pa.Array, valid: np.ndarray, type_: str, key: str,
                owners: np.ndarray | None) -> _Conv:
        if pa.types.is_int64(arr.type):
            x = pc.fill_null(arr, _s(0, pa.int64())).to_numpy(zero_copy_only=False)
            limit = MAX_INT_FLOAT if type_ == T.FLOAT else T.MAX_KEY - 1
            bad = valid & ((np.abs(x) > limit) | (x == I64_MIN))
            x = np.where(bad, 0, x)
            keys = x * SCALE if type_ == T.FLOAT else x
            return _Conv(valid, bad, (_ints_json(x),), keys=np.where(valid, keys, 0))
        v = pc.fill_null(arr, _s(0.0, pa.float64())).to_numpy(zero_copy_only=False)
        finite = np.isfinite(v)
        v = np.where(finite, v, 0.0)
        whole = v == np.floor(v)
        if type_ == T.INT:  # an integral double is the int; another one is an error
            bad = valid & ~(finite & whole & (np.abs(v) < float(T.MAX_KEY)))
            x = np.where(bad, 0, v).astype(np.int64)
            return _Conv(valid, bad, (_ints_json(x),), keys=np.where(valid, x, 0))
        size = np.abs(v)
        fits = finite & ((v == 0) | ((size >= SMALL_FLOAT) & (size < FAST_FLOAT)))
        k = np.rint(np.where(fits, v, 0.0) * SCALE)
        fits &= k / SCALE == v
        ints = np.flatnonzero(whole & valid)
        if len(ints) and self.integer_literal(key, ints if owners is None else owners[ints]):
            fits &= ~whole
        bad = valid & ~fits
        keys = np.where(valid & fits, k, 0).astype(np.int64)
        return _Conv(valid, bad, (_floats_json(v),), keys=keys)

    @staticmethod
    def times(arr: pa.Array, type_: str) -> tuple[np.ndarray, np.ndarray]:
        """Dates (days) or timestamps (µs) of strings in the plain forms: YYYY-MM-DD, and
        for timestamps also YYYY-MM-DDTHH:MM:SSZ; (keys, which ones were read)."""
        return fixed_times(arr, type_)


# A fixed-width form's separators (position: byte); its other bytes are digits.
_SEPARATORS = {10: {4: b"-", 7: b"-"},
               20: {4: b"-", 7: b"-", 10: b"T", 13: b":", 16: b":", 19: b"Z"}}
_MONTH_DAYS = np.array([0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31], dtype=np.int64)


def fixed_times(arr: pa.Array, type_: str) -> tuple[np.ndarray, np.ndarray]:
    """Dates (days) or timestamps (µs) of strings in the plain forms: YYYY-MM-DD, and
    for timestamps also YYYY-MM-DDTHH:MM:SSZ (months 01-12, days within their month,
    hours 00-23, minutes and seconds 00-59, years 0001-9999); (keys, which ones were
    read).  The forms have a fixed width, so each width's strings are read as a matrix
    of bytes in numpy (pyarrow's regex and strptime took ~2-8x as long)."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    m = len(arr)
    keys, ok = np.zeros(m, dtype=np.int64), np.zeros(m, dtype=bool)
    if m == 0:
        return keys, ok
    buffer, offsets = texts_of(arr)
    data = np.frombuffer(buffer, dtype=np.uint8)
    size = np.diff(offsets)
    present = _valid(arr)
    for width in (10, 20) if type_ == T.TIMESTAMP else (10,):
        fits = present & (size == width)
        if fits.all():  # every string of this width: their bytes are the matrix
            rows = slice(None)
            chars = data[offsets[0]:offsets[-1]].reshape(m, width)
        else:
            rows = np.flatnonzero(fits)
            if len(rows) == 0:
                continue
            chars = data[offsets[rows][:, None] + np.arange(width)]
        read, when = _fixed_time(chars, width)
        keys[rows] = when
        ok[rows] = read
    if type_ == T.DATE:
        keys = keys // 86_400
        ok &= (keys >= T.MIN_DAY) & (keys <= T.MAX_DAY)
    else:
        keys = keys * 1_000_000
        ok &= (keys >= T.MIN_US) & (keys <= T.MAX_US)
    return np.where(ok, keys, 0), ok


def _fixed_time(chars: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(read, seconds since the epoch, 0 where not read) of a matrix of `width` bytes a
    row in a form of _SEPARATORS."""
    separators = _SEPARATORS[width]
    at = np.array(sorted(separators))
    digits = np.delete(chars, at, axis=1) - np.uint8(ord("0"))  # a byte below "0" wraps
    read = (digits <= 9).all(axis=1)
    read &= (chars[:, at] == np.frombuffer(b"".join(separators[i] for i in at.tolist()),
                                           dtype=np.uint8)).all(axis=1)
    # year, month, day, [hour, minute, second]: 4, 2, 2, [2, 2, 2] digits, a column at a
    # time (a whole int64 matrix is a block of fresh pages under the load's mmap threshold)
    year = _number(digits, 0, 4)
    month, day = _number(digits, 4, 6), _number(digits, 6, 8)
    leap = (year % 4 == 0) & ((year % 100 != 0) | (year % 400 == 0))
    read &= (year >= 1) & (month >= 1) & (month <= 12) & (day >= 1)
    read &= day <= _MONTH_DAYS[np.where(read, month, 0)] + (leap & (month == 2))
    seconds = _civil_days(year, month, day) * 86_400
    if width == 20:
        hour, minute, second = _number(digits, 8, 10), _number(digits, 10, 12), \
            _number(digits, 12, 14)
        read &= (hour <= 23) & (minute <= 59) & (second <= 59)
        seconds += hour * 3600 + minute * 60 + second
    return read, np.where(read, seconds, 0)


def _number(digits: np.ndarray, first: int, last: int) -> np.ndarray:
    """The decimal number in columns first … last-1 of a matrix of digits (int64)."""
    value = digits[:, first].astype(np.int64)
    for at in range(first + 1, last):
        value = value * 10 + digits[:, at]
    return value


def _civil_days(year: np.ndarray, month: np.ndarray, day: np.ndarray) -> np.ndarray:
    """Days since 1970-01-01 of proleptic Gregorian dates (H. Hinnant's days_from_civil)."""
    year = year - (month <= 2)
    era = year // 400
    of_era = year - era * 400
    of_year = (153 * ((month + 9) % 12) + 2) // 5 + day - 1
    return era * 146_097 + of_era * 365 + of_era // 4 - of_era // 100 + of_year - 719_468


def _external(arr: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """Order or profile ids as strings; bad where add() refuses them."""
    m = len(arr)
    if pa.types.is_int64(arr.type):
        arr = pc.cast(arr, pa.string())
    elif arr.type not in _STRING:
        return pa.nulls(m, pa.string()), np.ones(m, dtype=bool)
    size = pc.binary_length(arr)
    bad = ~_np(pc.and_(pc.greater(size, _s(0, size.type)),
                       pc.less_equal(size, _s(MAX_ID_BYTES, size.type))))
    return pc.fill_null(arr, _s("")), bad


def _column(table: pa.Table, name: str) -> pa.Array:
    col = table.column(name)
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def _u32_keys(prefix: bytes, ids: np.ndarray) -> list[bytes]:
    """prefix + u32(id) for each id, made without a Python loop."""
    n, width = len(ids), len(prefix) + 4
    raw = np.empty((n, width), dtype=np.uint8)
    raw[:, :len(prefix)] = np.frombuffer(prefix, dtype=np.uint8)
    raw[:, len(prefix):] = ids.astype(">u4").view(np.uint8).reshape(n, 4)
    return raw.view(np.dtype(f"V{width}")).ravel().tolist()  # bytes each, 4x a slice loop


def _bytes_list(arr: pa.Array) -> list[bytes]:
    """The values of a string or binary array without nulls, as bytes (a binary array's
    to_pylist: ~2x slicing one bytes object per value, with this pyarrow)."""
    arr = pc.cast(arr, pa.binary())
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    return arr.to_pylist()


def take_block(batch: OrderBatch, block: RowBlock) -> Taken:
    """Apply the block's rows up to the first one add() must see (see the docstring)."""
    table = block.table
    n = table.num_rows
    if n == 0:
        return True
    names = table.column_names
    if any(name not in names for name in ("id", "profile", "ts")):
        return False
    if any(name.startswith("items.") for name in names):
        return False  # add() refuses such a key, even with a null value
    conv = _Converter(batch, block)
    oid_text, bad = _external(_column(table, "id"))
    x_json, x_bad = _text_json(oid_text, conv.plain)
    bad |= x_bad
    pid_text, pid_bad = _external(_column(table, "profile"))
    bad |= pid_bad
    ts_col = _column(table, "ts")
    if ts_col.type not in _STRING:
        return False
    ts, ts_ok = conv.times(ts_col, T.TIMESTAMP)
    bad |= ~ts_ok
    # first appearance of an id in the block, and not in the store
    enc = pc.dictionary_encode(oid_text)
    codes = enc.indices.to_numpy(zero_copy_only=False)
    if len(enc.dictionary) < n:  # some id given twice: its later lines go to add()
        _, first = np.unique(codes, return_index=True)
        is_first = np.zeros(n, dtype=bool)
        is_first[first] = True
        bad |= ~is_first
    fields = [name for name in names if name not in RESERVED]
    items = _column(table, "items") if "items" in names else None
    # types: known, or inferred from the first non-null value (read from its line)
    firsts: dict[str, int] = {}  # new field -> row of its first value
    item_arrays: dict[str, pa.Array] = {}
    item_parent = np.zeros(0, dtype=np.int64)
    n_items = np.zeros(n, dtype=np.int64)
    if items is not None:
        if pa.types.is_null(items.type):
            items = None
        elif not pa.types.is_list(items.type) or not (
                pa.types.is_struct(items.type.value_type)
                or pa.types.is_null(items.type.value_type)):
            bad |= _valid(items)
            items = None
    if items is not None:
        lengths = pc.list_value_length(items)
        n_items = pc.fill_null(lengths, _s(0, lengths.type)).to_numpy(
            zero_copy_only=False).astype(np.int64)
        flat = pc.list_flatten(items)
        item_parent = pc.list_parent_indices(items).to_numpy(
            zero_copy_only=False).astype(np.int64)
        if pa.types.is_struct(flat.type):
            bad[item_parent[~_valid(flat)]] = True  # an item that is not an object
            for i, child in enumerate(flat.flatten()):  # children at the items' offset
                key = flat.type.field(i).name
                if key in ITEM_RESERVED:
                    return False
                item_arrays[key] = child
        else:
            bad[item_parent] = True  # [null, …]
    for name in fields:
        if name not in batch.types:
            valid = _valid(_column(table, name))
            if valid.any():
                firsts[name] = int(np.argmax(valid))
    for key, arr in item_arrays.items():
        if "items." + key not in batch.types:
            valid = _valid(arr)
            if valid.any():
                firsts["items." + key] = int(item_parent[int(np.argmax(valid))])
    inferred: dict[str, str] = {}
    if firsts:
        rows = sorted(set(firsts.values()))
        lines = block.lines()
        wanted = {int(lines[r]): r for r in rows}
        for line, record in block.readable(set(wanted)).items():
            row = wanted[line]
            for name, value in _first_values(record):
                if firsts.get(name) != row or name in inferred:
                    continue
                try:
                    problem = T.name_problem(name)
                    inferred[name] = "" if problem else T.infer(value)
                except ValueError:
                    inferred[name] = ""
                if not inferred[name]:
                    bad[row] = True
        for name, row in firsts.items():
            if name not in inferred:  # not found as parsed: leave it to add()
                bad[row] = True
                inferred[name] = ""

    def type_of(name: str) -> str:
        return batch.types.get(name) or inferred.get(name, "")

    field_convs: dict[str, _Conv] = {}
    for name in fields:
        type_ = type_of(name)
        arr = _column(table, name)
        if not type_:
            continue  # all null, or its first value is bad (that row is bad)
        c = field_convs[name] = conv.convert(arr, type_, name)
        bad |= c.bad
    item_convs: dict[str, _Conv] = {}
    for key, arr in item_arrays.items():
        type_ = type_of("items." + key)
        if not type_:
            continue
        c = item_convs[key] = conv.convert(arr, type_, key, item_parent)
        bad[item_parent[c.bad]] = True
    # derived: qty_sum, distinct
    qty = item_convs.get("qty")
    qty_sum = np.zeros(n, dtype=np.int64)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(n_items, out=offsets[1:])
    if qty is not None and type_of("items.qty") in (T.INT, T.FLOAT):
        add = qty.keys
        if type_of("items.qty") == T.INT:
            big = qty.valid & (np.abs(qty.keys) > MAX_INT_FLOAT)
            bad[item_parent[big]] = True
            add = np.where(big, 0, qty.keys) * SCALE
        cs = np.concatenate(([0], np.cumsum(add)))
        qty_sum = cs[offsets[1:]] - cs[offsets[:-1]]  # modular: exact when it fits
        size = np.concatenate(([0.0], np.cumsum(np.abs(add).astype(np.float64))))
        bad |= (size[offsets[1:]] - size[offsets[:-1]]) >= 2.0**61
    sku = item_convs.get("sku")
    has_sku = np.zeros(len(item_parent), dtype=bool)
    if sku is not None and type_of("items.sku") != T.KEYWORD:
        bad[item_parent[sku.valid]] = True
    elif sku is not None:
        has_sku = sku.valid
    # the prefix taken
    hits = np.flatnonzero(bad)
    p0 = int(hits[0]) if len(hits) else n
    if p0 == 0:
        return False
    # ids already in the store (or in this batch)
    key_arr = pc.binary_join_element_wise(
        _s(ORDER_IDS, pa.binary()), pc.cast(oid_text[:p0], pa.binary()), _s(b"", pa.binary()))
    by_key = pc.sort_indices(key_arr).to_numpy(zero_copy_only=False)  # LMDB likes key order
    p0 = _claim_ids(batch, _bytes_list(key_arr.take(by_key)), by_key, p0)
    if p0 == 0:
        return False
    _apply(batch, p0, tuple(p if isinstance(p, str) else p[:p0] for p in x_json),
           pid_text[:p0], ts[:p0], field_convs, item_convs, inferred,
           firsts, fields, item_parent, offsets, qty_sum, has_sku, sku)
    return True if p0 == n else np.arange(p0, n, dtype=np.int64)


def _claim_ids(batch: OrderBatch, keys: list[bytes], by_key: np.ndarray, rows: int) -> int:
    """Put the id map's entries of the block's first `rows` rows (their id keys sorted,
    `keys`, of rows `by_key`), each row's order the next id in turn; how many rows, from
    the first, were taken: all of them, or up to the first whose id the store holds
    already (a later line of an order: the row path takes it). The entries of rows past
    that are taken back. Tried before it is known, as new ids are the common case: the
    store is then asked nothing more (one lookup of every id a block, 5 s at 10M)."""
    pairs = list(zip(keys, _u32_keys(b"", batch.next + by_key), strict=True))
    if batch.store.put_many(batch.txn, "orders", pairs) == len(pairs):
        return rows
    stored = dict(batch.store.present_items(batch.txn, "orders", keys))
    known = np.zeros(rows, dtype=bool)
    known[by_key] = [stored[key] != mine for key, mine in pairs]
    taken = int(np.argmax(known))
    for (key, mine), row in zip(pairs, by_key.tolist(), strict=True):
        if row >= taken and stored[key] == mine:
            batch.store.delete(batch.txn, "orders", key)
    return taken


def _first_values(record: Any) -> list[tuple[str, Any]]:
    """(name, value) of a record's non-null fields, then item keys, in add()'s order."""
    out = []
    if not isinstance(record, dict):
        return out
    for name, value in record.items():
        if name not in RESERVED and value is not None:
            out.append((name, value))
    for item in record.get("items") or ():
        if isinstance(item, dict):
            out += [("items." + key, value) for key, value in item.items() if value is not None]
    return out


def _apply(batch: OrderBatch, k: int,
           x_text: tuple,
           pid_text: pa.Array,
           ts: np.ndarray, field_convs: dict[str, _Conv], item_convs: dict[str, _Conv],
           inferred: dict[str, str], firsts: dict[str, int], fields: list[str],
           item_parent: np.ndarray, offsets: np.ndarray, qty_sum: np.ndarray,
           has_sku: np.ndarray, sku: _Conv | None) -> None:
    """Write rows 0 … k-1 of the block (all checked) into the batch."""
    _register(batch, inferred, firsts, k)
    # profiles: known ones in one lookup, new ones created in order of appearance
    pids = _profiles(batch, pid_text)
    oids = np.arange(batch.next, batch.next + k, dtype=np.int64)
    batch.next += k
    n_item = int(offsets[k])
    item_parent = item_parent[:n_item]
    i0 = batch.next_item + offsets[:k]
    iids = batch.next_item + np.arange(n_item, dtype=np.int64)
    batch.next_item += n_item
    # rows, assembled as text by the thread that packs them (pyarrow lets go of the lock)
    def rows() -> pa.Array:
        one = _join("{", *_members(item_convs, n_item), "}")
        lists = pa.ListArray.from_arrays(pa.array(offsets[:k + 1].astype(np.int32),
                                                  pa.int32()), one)
        it_text = pc.binary_join(lists, _s(","))
        return _join('{"f":{', *_members(field_convs, k), '},"i0":', _ints_json(i0),
                     ',"it":[', it_text, '],"p":', _ints_json(pids), ',"t":', _ints_json(ts),
                     ',"x":', *x_text, "}")

    batch.rows.append(int(oids[0]), rows)
    batch.created += k
    batch.live_added.frombytes(oids.astype(np.uint32).tobytes())
    # queues: owner, ts, fields, derived, items
    _set(batch._owner, oids, pids)
    _set(batch._ts, oids, ts)
    for name, c in field_convs.items():
        valid = c.valid[:k]
        if not valid.any():
            continue
        type_ = batch.types[name]
        if type_ in T.VALUE_TYPES:
            _push(batch.pending, name, c.values, oids, k)
        else:
            _set(batch._sets("f:" + name), oids[valid], c.keys[:k][valid])
    for key, c in item_convs.items():
        valid = c.valid[:n_item]
        if not valid.any():
            continue
        name = "items." + key
        if batch.types[name] in T.VALUE_TYPES:
            _push(batch.item_pending, name, c.values, iids, n_item)
            # the order's values: those of its items (a value twice adds one bit, as
            # add()'s distinct values do)
            v = c.values
            keep = v.rows < n_item
            _push(batch.pending, name, _Coded(item_parent[v.rows[keep]], v.codes[keep],
                                              v.values), oids, k)
        else:
            _set(batch._item_sets("g:" + name), iids[valid], c.keys[:n_item][valid])
    _set(batch._sets("f:items.qty_sum"), oids, qty_sum[:k])
    distinct = np.zeros(k, dtype=np.int64)
    if n_item:
        no_sku = ~has_sku[:n_item]
        distinct += np.bincount(item_parent[no_sku], minlength=k)
        if sku is not None and has_sku[:n_item].any():
            v = sku.values
            keep = v.rows < n_item
            width = max(1, len(v.values))
            # in order of the orders already: a stable sort only orders each one's items
            pairs = np.sort(item_parent[v.rows[keep]] * width + v.codes[keep], kind="stable")
            first = np.ones(len(pairs), dtype=bool)
            first[1:] = pairs[1:] != pairs[:-1]
            distinct += np.bincount(pairs[first] // width, minlength=k)
        _set(batch._item_owner, iids, oids[item_parent])
    _set(batch._sets("f:items.distinct"), oids, distinct)


def _register(batch: OrderBatch, inferred: dict[str, str], firsts: dict[str, int],
              k: int) -> None:
    """Record the inferred types of fields first given in the rows taken, in add()'s
    order (by row, then key position; the order was kept in `inferred`)."""
    for name, type_ in inferred.items():  # parsed row by row, each in key order
        if type_ and firsts[name] < k:
            batch.types[name] = batch.new_types[name] = type_


def _profiles(batch: OrderBatch, text: pa.Array) -> np.ndarray:
    """Dense profile ids; profiles new to the store are created in order of appearance.
    Found in the id map's table in memory where it can (idhash.found_live: at 1M, 0.84 s
    of LMDB lookups in an orders file), the rest in LMDB."""
    enc = pc.dictionary_encode(text)
    codes = enc.indices.to_numpy(zero_copy_only=False)
    names = pc.cast(enc.dictionary, pa.binary())
    dense = idhash.found_live(batch.id_map, batch.live, names)
    ask = np.flatnonzero(dense < 0)
    if len(ask):  # made earlier in this batch, new, or not in the table
        asked = names.take(pa.array(ask, pa.int64()))
        by_key = pc.sort_indices(asked).to_numpy(zero_copy_only=False)
        ordered = asked.take(by_key)
        found = batch.store.present_items(batch.txn, "ids", _bytes_list(ordered))  # key order
        values = np.frombuffer(b"".join(map(operator.itemgetter(1), found)), dtype=">u4")
        if len(found) == len(ask):
            dense[ask[by_key]] = values
        elif found:
            at = pc.index_in(ordered, value_set=pa.array([key for key, _ in found],
                                                         pa.binary()))
            hit = _valid(at)
            dense[ask[by_key[hit]]] = values
    for code in np.flatnonzero(dense < 0).tolist():  # dictionary order: first appearance
        dense[code] = batch.ensure_profile(enc.dictionary[code].as_py())
    return dense[codes]


def _set(sets: Any, ids: np.ndarray, keys: np.ndarray) -> None:
    sets.extend(ids, keys)


def _push(pending: dict, name: str, v: _Coded, ids: np.ndarray, limit: int) -> None:
    """Queue additions of values for the value index of `name` (codes mapped to the
    batch's own, which grow in first-appearance order)."""
    keep = v.rows < limit
    if not keep.any():
        return
    rows, codes = v.rows[keep], v.codes[keep]
    queue = pending.setdefault(name, ValueQueue())
    mine = np.fromiter((queue.code(value) for value in v.values), dtype=np.int64,
                       count=len(v.values))
    queue.extend(ids[rows], mine[codes])
