"""Profile records of a RowBlock applied column-wise: the bulk path of ProfileBatch.

The row path (ProfileBatch.add) is the reference.  A block's rows are taken here from
the first row up to (not including) the first row this path cannot apply exactly as
the row path would; that row and every later one go back to the row path, in line
order, so nothing is reordered (a reordered upsert could change a range index's base
or a float field's scale).  A row is taken when:

- its id is new: not in the store (nor earlier in this batch) and not earlier in the
  block, so the row path would create it without reading or flushing anything;
- every value passes the field's check, in a form this path reads without Python per
  value: strings, lists of strings, booleans, integers, floats written with a point
  or an exponent (pyarrow reads `3` and `3.0` alike, orjson keeps them apart), dates
  `YYYY-MM-DD`, timestamps `YYYY-MM-DDTHH:MM:SSZ` (or a bare date);
- its keys come in the order the block's rows are written in (the row JSON keeps a
  record's key order), which one regular expression over the raw lines checks, along
  with the number and date forms above.

A field first seen in the block gets its type from its first non-null value, read
from that value's raw line with orjson, as the row path reads it.  Taken rows are
written with one LMDB call per database, and their values are queued on the batch's
fields exactly as the row path queues them (same ids, values and value codes, in the
same order).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from bitseg.index import types as T
from bitseg.index.blocks import RowBlock, Taken
from bitseg.index.errors import StoreError
from bitseg.index.keys import u32_keys

if TYPE_CHECKING:
    from bitseg.index.profiles import ProfileBatch, _Field

# The raw text of one top-level value, by what it may be (RE2 syntax).
_STRING = r'"(?:[^"\\]|\\.)*"'
_SCALAR = rf'(?:{_STRING}|-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?|true|false|null)'
_ANY = rf'(?:{_SCALAR}|\[\s*(?:{_SCALAR}\s*,?\s*)*\])'
_FLOAT = r'(?:-?\d+(?:\.\d+(?:[eE][+-]?\d+)?|[eE][+-]?\d+)|null)'  # a point or an exponent
_DATE = r'(?:"\d{4}-\d{2}-\d{2}"|null)'
_TIME = r'(?:"\d{4}-\d{2}-\d{2}(?:T\d{2}:\d{2}:\d{2}Z)?"|null)'
_OTHER_CONTROL = r'[\x00-\x07\x0b\x0e-\x1f]'  # orjson writes these as \u00XX: not mirrored
_ESCAPED = r'["\\\n\r\t\x08\x0c]'  # what orjson writes as a two-character escape
_ESCAPES = (("\\", "\\\\"), ('"', '\\"'), ("\n", "\\n"), ("\r", "\\r"), ("\t", "\\t"),
            ("\b", "\\b"), ("\f", "\\f"))
QUEUE_BYTES = 256 << 20  # field changes queued before they are applied (bound_queues)
_ORDER_SAMPLE = 64  # lines read with orjson to learn the order the block's keys come in
_US_PER = {"s": 10**6, "ms": 10**3, "us": 1}


def take_block(batch: ProfileBatch, block: RowBlock) -> Taken:
    """Apply the block's rows up to the first one the row path must apply; True when
    all were taken, False when none, else the positions left (all after the cut).
    What `prepare` made ahead for the block is taken where the batch's field types
    would make it the same, the rest made now."""
    table = block.table
    rows = table.num_rows
    if not block.data or rows == 0 or "id" not in table.column_names:
        return False
    ready = block.prepared if block.prepared is not None else {}
    lines = ready["lines"] if "lines" in ready else _Lines(block)
    order = ready["order"] if "order" in ready else _key_order(lines, table.column_names)
    if order is None:
        return False
    names, ok = ready["ids"] if "ids" in ready else \
        profile_ids(table.column("id").combine_chunks())
    if names is None:
        return False
    ok = ok.copy()
    plain = b"\\" not in block.data  # no escapes: no string needs checking or escaping
    made = ready.get("columns", {})
    columns = [_known_column(batch.types.get(name), made.get(name), name, table, lines, plain)
               for name in order if name != "id"]
    for column in columns:
        ok &= ~column.bad
    pattern = _line_pattern(order, columns)
    matched = ready.get("match")  # (the pattern it was made for, which lines match)
    ok &= matched[1] if matched is not None and matched[0] == pattern else lines.match(pattern)
    cut = _first_false(ok)
    first = batch.ids.assign(names.slice(0, cut).to_pylist()) if cut else None
    if first is None and cut:  # an id seen before: the rows up to the first such
        cut = _first_false(_new_ids(batch, names, cut))
        first = batch.ids.assign(names.slice(0, cut).to_pylist()) if cut else None
    if first is None:
        return False
    whole = ready.get("whole") if cut == rows and all(
        column.name in made and made[column.name].type == column.type
        for column in columns) else None
    _apply(batch, first, [c for c in columns if c.first < cut], cut, plain, whole)
    bound_queues(batch)
    return True if cut == rows else np.arange(cut, rows, dtype=np.int64)


def prepare(block: RowBlock) -> None:
    """Work out ahead what take_block makes from a profile block alone, and keep it on
    the block (`prepared`): its lines, key order and ids, each column checked for the
    type its first value suggests, the line check, and — when every row passes them —
    the rows' JSON and their values made ready to queue. Meant for the file reader's
    thread: pyarrow's kernels and its regular expressions run there without the
    interpreter lock, beside the loading thread applying the block before. Pure
    conversions only: take_block uses a column's only where the batch's type for the
    field is the one assumed here (or it has none), so it decides exactly as it would
    without; anything that fails here is left for it to make (and fail) again."""
    table = block.table
    if table is None or not block.data or table.num_rows == 0 or \
            "id" not in table.column_names:
        return
    ready: dict[str, Any] = {}
    try:
        lines = ready["lines"] = _Lines(block)
        order = ready["order"] = _key_order(lines, table.column_names)
        if order is not None:
            names, ok = ready["ids"] = profile_ids(table.column("id").combine_chunks())
            plain = b"\\" not in block.data
            columns = [_Column(None, name, table.column(name).combine_chunks(), lines, plain)
                       for name in order if name != "id"]
            ready["columns"] = {column.name: column for column in columns}
            pattern = _line_pattern(order, columns)
            match = lines.match(pattern)
            ready["match"] = (pattern, match)
            ok = ok & match
            for column in columns:
                ok &= ~column.bad
            rows = table.num_rows
            if names is not None and ok.all():
                ready["whole"] = _made([c for c in columns if c.first < rows], rows, plain)
    except (pa.ArrowException, ValueError, TypeError):
        pass  # what is in `ready` is right; take_block makes the rest
    block.prepared = ready


def bound_queues(batch: ProfileBatch) -> None:
    """Apply the batch's queued field changes to its writers (the flush the row path does
    before an update) once they hold more than QUEUE_BYTES: a batch then holds bitmaps
    and at most that many bytes of values, not every value of its file."""
    held = sum(len(a) * a.itemsize for field in batch.info.values()
               for a in (field.add_ids, field.add_vals, field.rm_ids, field.rm_vals))
    if held > QUEUE_BYTES:
        batch.flush()


# ----------------------------------------------------------------------------- reading


class _Lines:
    """The block's raw lines that are table rows (blank lines are not)."""

    def __init__(self, block: RowBlock) -> None:
        data = block.data
        ends = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 10) + 1
        bounds = np.concatenate(([0], ends)).astype(np.int64)
        if bounds[-1] != len(data):
            bounds = np.append(bounds, len(data))
        self.data = data
        self.row_line = block.lines() - block.first_line  # table row -> line in block
        self.starts = bounds[:-1][self.row_line]
        self.ends = bounds[1:][self.row_line]
        every = pa.LargeStringArray.from_buffers(len(bounds) - 1, pa.py_buffer(bounds),
                                                 pa.py_buffer(data))
        contiguous = len(self.row_line) == len(bounds) - 1
        self.text = every if contiguous else every.take(pa.array(self.row_line))

    def raw(self, row: int) -> bytes:
        return self.data[self.starts[row]:self.ends[row]]

    def match(self, pattern: str) -> np.ndarray:
        return pc.match_substring_regex(self.text, pattern).to_numpy(zero_copy_only=False)


def _key_order(lines: _Lines, columns: list[str]) -> list[str] | None:
    """The order the block's keys come in, learnt from its first lines: every key after
    the keys it follows on some line, else in the order first seen; None if unreadable."""
    seen: dict[str, int] = {}  # key -> when first seen
    after: dict[str, set[str]] = {}  # key -> the keys it follows directly on some line
    for row in range(min(_ORDER_SAMPLE, len(lines.starts))):
        try:
            record = orjson.loads(lines.raw(row))
        except orjson.JSONDecodeError:
            continue  # e.g. a byte-order mark; the line check will refuse that row
        if not isinstance(record, dict):
            return None
        before = None
        for key in record:
            seen.setdefault(key, len(seen))
            after.setdefault(key, set())
            if before is not None:
                after[key].add(before)
            before = key
    for name in columns:  # keys the sample never showed: last
        seen.setdefault(name, len(seen))
        after.setdefault(name, set())
    if sorted(seen) != sorted(columns):
        return None
    order: list[str] = []
    placed: set[str] = set()
    while len(order) < len(seen):
        ready = [key for key in seen if key not in placed and after[key] <= placed]
        if not ready:  # the sample's lines disagree: first seen first (rows may not fit)
            ready = [key for key in seen if key not in placed]
        key = min(ready, key=seen.__getitem__)
        order.append(key)
        placed.add(key)
    return order


def _line_pattern(order: list[str], columns: list[_Column]) -> str:
    """A line whose keys are a subsequence of `order`, each value in its column's form."""
    text = {column.name: column.text for column in columns}
    members = "".join(rf'(?:,?\s*"\Q{name}\E"\s*:\s*{text.get(name, _ANY)}\s*)?'
                      for name in order)
    return rf'^\s*\{{\s*{members}\}}\s*$'


def _first_false(mask: np.ndarray) -> int:
    found = np.flatnonzero(~mask)
    return int(found[0]) if len(found) else len(mask)


# ----------------------------------------------------------------------------- ids


def profile_ids(column: pa.Array) -> tuple[pa.Array | None, np.ndarray]:
    """A column of profile ids as utf-8 (binary; integers as their decimal text) and
    the rows whose id the row path takes (not null, empty or too long); (None, all
    False) for a column of another type."""
    if pa.types.is_integer(column.type):
        names = pc.cast(column, pa.string())
        ok = _valid(names)
    elif pa.types.is_string(column.type):
        names = column
        size = pc.binary_length(names).to_numpy(zero_copy_only=False)
        ok = _valid(names) & (np.nan_to_num(size) > 0) & (np.nan_to_num(size) <= T.MAX_ID_BYTES)
    else:
        return None, np.zeros(len(column), dtype=bool)
    return pc.cast(names, pa.binary()), ok


def ensure_profiles(batch: ProfileBatch, names: pa.Array) -> np.ndarray:
    """The dense id (uint32) of each profile id (utf-8, each one the row path takes: see
    profile_ids), creating the unknown ones with no fields, in the order they first
    appear: what ensure_profile of each in turn does."""
    if len(names) == 0:
        return np.zeros(0, dtype=np.uint32)
    encoded = pc.dictionary_encode(pc.cast(names, pa.binary()))
    distinct = encoded.dictionary.to_pylist()  # in the order of first appearance
    found = dict(batch.store.present_items(batch.txn, "ids", distinct))
    dense = np.empty(len(distinct), dtype=np.uint32)
    new = [at for at, name in enumerate(distinct) if name not in found]
    known = [at for at, name in enumerate(distinct) if name in found]
    if known:
        dense[known] = np.frombuffer(b"".join(found[distinct[at]] for at in known), ">u4")
    if new:
        first = batch.ids.assign([distinct[at] for at in new])
        if first is None:  # they were looked up just now
            raise StoreError("profile ids looked up as unknown were in the id map")
        dense[new] = np.arange(first, first + len(new), dtype=np.uint32)
        batch.store.put_many(batch.txn, "rows",
                             zip(u32_keys(first, len(new)), [b"{}"] * len(new), strict=True),
                             append=True)
        batch.created += len(new)
        batch.live_added.frombytes(dense[new].tobytes())
    return dense[encoded.indices.to_numpy(zero_copy_only=False)]


def _new_ids(batch: ProfileBatch, names: pa.Array, cut: int) -> np.ndarray:
    """Of the first `cut` rows, those whose id is neither in the store nor earlier in the
    block (the rows after the cut are not looked at, and come out False)."""
    fresh = np.zeros(len(names), dtype=bool)
    if cut == 0:
        return fresh
    head = names.slice(0, cut)
    codes = pc.dictionary_encode(head).indices.to_numpy(zero_copy_only=False)
    order = np.argsort(codes, kind="stable")
    repeat = np.zeros(cut, dtype=bool)
    repeat[order[1:]] = codes[order[1:]] == codes[order[:-1]]
    fresh[:cut] = ~repeat
    present = batch.store.present(batch.txn, "ids", head.to_pylist())
    if present:
        fresh[:cut] &= ~pc.is_in(head, value_set=pa.array(present, pa.binary())).to_numpy(
            zero_copy_only=False)
    return fresh


# ----------------------------------------------------------------------------- fields


def _valid(values: pa.Array) -> np.ndarray:
    return values.is_valid().to_numpy(zero_copy_only=False)


class _Column:
    """One field's column in a block: its type, the rows whose value this path refuses,
    and the raw form its values must have."""

    def __init__(self, known: str | None, name: str, values: pa.Array, lines: _Lines,
                 plain: bool) -> None:
        """`known`: the batch's type for the field (None: inferred from the block)."""
        self.name = name
        self.values = values
        self.present = _valid(values)
        rows = len(values)
        found = np.flatnonzero(self.present)
        self.first = int(found[0]) if len(found) else rows  # first non-null value's row
        self.text = _ANY
        self.bad = np.zeros(rows, dtype=bool)
        self.type = known
        self.inferred = False
        if self.first == rows:
            return
        if self.type is None:
            self.type = _infer(name, lines.raw(self.first))
            self.inferred = True
            if self.type is None:  # the row path raises there
                self.bad[self.first] = True
                return
        self._check(values, plain)

    def _check(self, values: pa.Array, plain: bool) -> None:
        kind, type_ = values.type, self.type
        if type_ in (T.KEYWORD, T.KEYWORDS) and pa.types.is_string(kind):
            self.bad = self.present & _bad_strings(values, plain)
        elif type_ == T.KEYWORDS and pa.types.is_list(kind) and \
                (pa.types.is_string(kind.value_type) or pa.types.is_null(kind.value_type)):
            items = pc.list_flatten(values)
            wrong = ~_valid(items) if pa.types.is_null(items.type) else \
                ~_valid(items) | _bad_strings(items, plain)
            self.bad = np.zeros(len(values), dtype=bool)
            parents = pc.list_parent_indices(values).to_numpy(zero_copy_only=False)
            self.bad[parents[wrong]] = True
        elif type_ == T.BOOL and pa.types.is_boolean(kind):
            pass
        elif type_ in (T.INT, T.FLOAT) and pa.types.is_int64(kind):
            numbers = _filled(values, 0)  # (no abs: -2**63 has none in int64)
            self.bad = self.present & ((numbers >= T.MAX_KEY) | (numbers <= -T.MAX_KEY))
        elif type_ == T.FLOAT and pa.types.is_float64(kind):
            numbers = _filled(values, 0.0)
            self.bad = self.present & ~(np.isfinite(numbers) & (np.abs(numbers) < T.MAX_KEY))
            self.text = _FLOAT
        elif type_ in T.TIME_TYPES and pa.types.is_timestamp(kind) and kind.tz is None \
                and kind.unit in _US_PER:
            self.text = _DATE if type_ == T.DATE else _TIME  # years 1-9999: pyarrow checks
        else:
            self.bad = self.present.copy()  # refused by the row path, or not mirrored here


def _known_column(known: str | None, ready: _Column | None, name: str, table: pa.Table,
                  lines: _Lines, plain: bool) -> _Column:
    """The field's column checked for the batch's type `known` (None: inferred): the one
    made ahead (`ready`, inferred from the block) when that is the same, else made now."""
    if ready is not None and known is None:
        return ready
    if ready is not None and known == ready.type:
        column = copy.copy(ready)
        column.inferred = False  # the same checks, for a field the batch has
        return column
    return _Column(known, name, table.column(name).combine_chunks(), lines, plain)


def _infer(name: str, raw_line: bytes) -> str | None:
    """The type the row path infers from this line's value of the field, or None when
    it refuses the name or the value (or the line is not plain JSON to orjson)."""
    if T.name_problem(name):
        return None
    try:
        return T.infer(orjson.loads(raw_line)[name])
    except (orjson.JSONDecodeError, ValueError, KeyError, TypeError):
        return None


def _bad_strings(values: pa.Array, plain: bool) -> np.ndarray:
    """Strings the row path refuses (too long) or orjson writes in a form not mirrored
    (`plain`: the block has no backslash, so no string holds a control character)."""
    size = pc.binary_length(values).to_numpy(zero_copy_only=False)
    bad = np.nan_to_num(size) > T.MAX_VALUE_BYTES
    if not plain:
        bad |= pc.fill_null(pc.match_substring_regex(values, _OTHER_CONTROL), False).to_numpy(
            zero_copy_only=False)
    return bad


def _filled(values: pa.Array, fill: Any) -> np.ndarray:
    return pc.fill_null(values, fill).to_numpy(zero_copy_only=False)


# ----------------------------------------------------------------------------- applying


def _apply(batch: ProfileBatch, first: int, columns: list[_Column], cut: int,
           plain: bool, whole: tuple[dict[str, _Parts], pa.Array] | None = None) -> None:
    """Create the first `cut` rows' profiles, whose ids got the dense ids from `first`
    on: rows and queued field values. `whole`: what _made gives for these columns and
    rows, made ahead."""
    dense = np.arange(first, first + cut, dtype=np.uint32)
    for column in sorted((c for c in columns if c.inferred), key=lambda c: c.first):
        batch.register(column.name, column.type)  # in the order the row path meets them
    parts, texts = whole if whole is not None else _made(columns, cut, plain)
    for column in columns:
        _queue(batch.info[column.name], parts[column.name], dense)
    batch.store.put_many(batch.txn, "rows",
                         zip(u32_keys(first, cut), texts.to_pylist(), strict=True), append=True)
    batch.created += cut
    batch.live_added.frombytes(dense.tobytes())


def _made(columns: list[_Column], cut: int, plain: bool
          ) -> tuple[dict[str, _Parts], pa.Array]:
    """The first `cut` rows' values of each column made ready to queue, and the rows'
    JSON (binary): what depends on the block and the columns' types alone."""
    parts = {}
    row = _RowTexts(cut)
    for column in columns:
        values = column.values.slice(0, cut)
        made = parts[column.name] = _parts(column.type, values, _valid(values), plain)
        row.add(orjson.dumps(column.name).decode() + ":" + made.before, made.text, made.after,
                made.present)
    return parts, row.texts()


class _RowTexts:
    """Rows as orjson writes them, `{"a":1,"b":"x"}`, assembled from each field's value
    texts by one pyarrow take: a row is a run of slots (a constant, or a field's text,
    null where it has none), so the taken strings' bytes are the rows, one after another."""

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self.constants = ["", "{}"]
        self.fields: list[pa.Array] = []
        self.slots: list[np.ndarray | int] = []  # constant numbers, or a field's number
        self.any = np.zeros(rows, dtype=bool)

    def add(self, before: str, text: pa.Array, after: str, present: np.ndarray) -> None:
        """A field's value texts (null where a row has none): ',' + before + text + after."""
        self.slots.append(np.where(present, self._constant("," + before), 0))
        self.slots.append(len(self.fields))
        self.fields.append(text)
        if after:
            self.slots.append(np.where(present, self._constant(after), 0))
        self.any |= present

    def texts(self) -> pa.Array:
        # "{}" for an empty row; any other starts with its first field's comma, which
        # becomes "{" below
        close = self._constant("}")
        slots = self._merged([np.where(self.any, 0, 1), *self.slots,
                              np.where(self.any, close, 0)])
        base, rows = len(self.constants), self.rows
        columns = [slot.astype(np.int32) if isinstance(slot, np.ndarray) else
                   np.arange(base + slot * rows, base + (slot + 1) * rows, dtype=np.int32)
                   for slot in slots]
        pool = pa.concat_arrays([pa.array(self.constants, pa.string()), *self.fields])
        taken = pool.take(pa.array(np.stack(columns, axis=1).ravel()))
        offsets = np.frombuffer(taken.buffers()[1], dtype=np.int32)
        bounds = np.ascontiguousarray(offsets[taken.offset::len(columns)][:rows + 1])
        data = np.frombuffer(taken.buffers()[2], dtype=np.uint8)[:bounds[-1]].copy()
        data[bounds[:-1][self.any]] = ord("{")
        return pa.BinaryArray.from_buffers(pa.binary(), rows, [
            None, pa.py_buffer(bounds), pa.py_buffer(data)])

    def _merged(self, slots: list[np.ndarray | int]) -> list[np.ndarray | int]:
        """The slots with neighbouring constants that are the same on every row (a field
        every row has) made one: fewer slots to take (a pool of <= 2**31 - 1 strings)."""
        merged: list[np.ndarray | int] = []
        for slot in slots:
            last = merged[-1] if merged else None
            if isinstance(slot, np.ndarray) and isinstance(last, np.ndarray) and \
                    len(slot) and (slot == slot[0]).all() and (last == last[0]).all():
                text = self.constants[int(last[0])] + self.constants[int(slot[0])]
                merged[-1] = np.full(self.rows, self._constant(text))
            else:
                merged.append(slot)
        return merged

    def _constant(self, text: str) -> int:
        self.constants.append(text)
        return len(self.constants) - 1


class _Parts:
    """A column's values as the row path queues them and writes them in a row, made from
    the column and its type alone: `keys` (a range field's, in row order), `items` (a
    keyword list's, sorted and distinct: their rows, word numbers and words) or
    `encoded` (another field's values: word numbers and words, in order of first
    appearance); and each row's value as JSON, before + text + after (text null where
    the row has none)."""

    __slots__ = ("present", "keys", "items", "encoded", "text", "before", "after")

    def __init__(self, present: np.ndarray) -> None:
        self.present = present
        self.keys: np.ndarray | None = None
        self.items: tuple[np.ndarray, np.ndarray, list[Any]] | None = None
        self.encoded: tuple[np.ndarray, list[Any]] | None = None
        self.text: pa.Array | None = None
        self.before = self.after = ""


def _parts(type_: str, values: pa.Array, present: np.ndarray, plain: bool) -> _Parts:
    """What _queue queues of a column and what its rows' JSON holds (see _Parts)."""
    made = _Parts(present)
    kind = values.type
    if type_ in T.RANGE_TYPES:
        if pa.types.is_timestamp(kind):
            keys = pc.multiply(values.cast(pa.int64()), _US_PER[kind.unit])
            if type_ == T.DATE:
                keys = pc.divide(keys, T.US_PER_DAY)  # whole days: the text was a date
            made.text = pc.cast(keys, pa.string())
        elif pa.types.is_float64(kind):
            keys = values
            made.text = _float_texts(values, present)
        else:
            keys = values
            made.text = pc.cast(values, pa.string())
        made.keys = pc.drop_null(keys).to_numpy()
    elif pa.types.is_list(kind):
        made.items = _sorted_items(values)
        made.text, made.before, made.after = _list_texts(values, present, made.items), "[", "]"
    else:
        made.encoded = _encoded(values)
        if pa.types.is_boolean(kind):
            made.text = pc.cast(values, pa.string())
        else:
            made.text, made.before, made.after = _json_strings(values, plain), '"', '"'
            if type_ == T.KEYWORDS:
                made.before, made.after = '["', '"]'
    return made


def _queue(field: _Field, made: _Parts, dense: np.ndarray) -> None:
    """Queue a column's values on its field as the row path would (the same ids, values
    and codes, in row order)."""
    if made.keys is not None:
        field.add_ids.frombytes(dense[made.present].tobytes())
        field.add_vals.frombytes(
            made.keys.astype(np.float64 if field.is_float else np.int64).tobytes())
    elif made.items is not None:
        parents, which, words = made.items
        field.add_ids.frombytes(dense[parents].tobytes())
        field.add_vals.frombytes(_word_codes(field, words, which)[which].tobytes())
    elif made.encoded is not None:
        field.add_ids.frombytes(dense[made.present].tobytes())
        field.add_vals.frombytes(_codes(field, *made.encoded).tobytes())


def _sorted_items(lists: pa.Array) -> tuple[np.ndarray, np.ndarray, list[Any]]:
    """Lists of keywords as the row path keeps them (sorted, distinct): the list (row)
    and word number of each item, row by row, and the block's few distinct words the
    items are sorted through."""
    items = pc.list_flatten(lists)
    if pa.types.is_null(items.type):  # only empty lists (a null item is refused)
        items = items.cast(pa.string())
    encoded = pc.dictionary_encode(items)
    words = encoded.dictionary.to_pylist()
    which = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    parents = pc.list_parent_indices(lists).to_numpy(zero_copy_only=False).astype(np.int64)
    rank = np.empty(len(words), dtype=np.int64)
    rank[sorted(range(len(words)), key=words.__getitem__)] = np.arange(len(words))
    key = parents * max(len(words), 1) + rank[which]
    order = np.argsort(key, kind="stable")
    key = key[order]
    order = order[np.concatenate(([True], key[1:] != key[:-1]))] if len(key) else order
    return parents[order], which[order], words


def _list_texts(lists: pa.Array, present: np.ndarray,
                items: tuple[np.ndarray, np.ndarray, list[Any]]) -> pa.Array:
    """Each list's items (_sorted_items) as JSON, joined by commas (null for no list)."""
    parents, which, words = items
    quoted = pa.array([orjson.dumps(word).decode() for word in words], pa.string())
    counts = np.bincount(parents, minlength=len(lists))
    offsets = np.concatenate(([0], np.cumsum(counts))).astype(np.int32)
    return pc.binary_join(pa.ListArray.from_arrays(pa.array(offsets), quoted.take(which),
                                                   mask=pa.array(~present)), ",")


def _word_codes(field: _Field, words: list[Any], which: np.ndarray) -> np.ndarray:
    """The field's code of each word (uint32), new words coded in the order `which`
    (word numbers, in row order) first shows them, as the row path codes them."""
    codes, known = field.codes, field.values
    lookup = np.zeros(len(words), dtype=np.uint32)
    shown, at = np.unique(which, return_index=True)
    for word in shown[np.argsort(at)].tolist():
        value = words[word]
        code = codes.get(value)
        if code is None:
            code = codes[value] = len(codes)
            known.append(value)
        lookup[word] = code
    return lookup


def _encoded(values: pa.Array) -> tuple[np.ndarray, list[Any]]:
    """The number of each non-null value of the column among its distinct values, and
    those values in the order they first appear."""
    encoded = pc.dictionary_encode(values)
    return pc.drop_null(encoded.indices).to_numpy(), encoded.dictionary.to_pylist()


def _codes(field: _Field, which: np.ndarray, distinct: list[Any]) -> np.ndarray:
    """The field's value code of each non-null value (uint32; `which` numbers them in
    `distinct`), new values coded in the order they first appear, as the row path
    codes them."""
    codes, known = field.codes, field.values
    lookup = np.empty(len(distinct), dtype=np.uint32)
    for at, value in enumerate(distinct):
        code = codes.get(value)
        if code is None:
            code = codes[value] = len(codes)
            known.append(value)
        lookup[at] = code
    return lookup[which]


def _json_strings(values: pa.Array, plain: bool) -> pa.Array:
    """Strings escaped as orjson escapes them, without the quotes (other control
    characters were refused before); `plain`: the block has no backslash, so none
    needs escaping."""
    if not plain and len(values) and pc.any(pc.match_substring_regex(values, _ESCAPED)).as_py():
        for raw, escaped in _ESCAPES:
            values = pc.replace_substring(values, raw, escaped)
    return values


def _float_texts(values: pa.Array, present: np.ndarray) -> pa.Array:
    """Floats as orjson writes them, one string each, null for null (orjson formats the
    whole array in C)."""
    if len(values) == 0:
        return pa.array([], pa.string())
    numbers = pc.fill_null(values, 0.0).to_numpy()
    written = orjson.dumps(numbers, option=orjson.OPT_SERIALIZE_NUMPY)[1:-1].decode()
    texts = pc.list_flatten(pc.split_pattern(pa.array([written], pa.large_string()), ","))
    return pc.if_else(pa.array(present), texts.cast(pa.string()), None)
