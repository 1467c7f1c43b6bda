"""JSON Lines in blocks of whole lines, parsed into Arrow tables ahead of their use.

The bulk path of ``bitseg load``: a reader thread cuts the file (plain or gzipped)
into blocks of about BLOCK_BYTES at line ends and parses each with pyarrow's JSON
reader, which runs native threads without the interpreter lock, while the loading
thread builds the index from the block before.  At most PREFETCH parsed blocks wait,
so memory stays bounded whatever the file's size.

pyarrow is strict where it matters: a key given twice, a value whose JSON type
changes within a column, a line that is not an object, all refuse the block.  A
refused block keeps its bytes and goes through the row path (orjson per line), which
names the offending line and field, or applies the rows if they were fine after all
(say an int column given a float in a later block).

Each block also gets the conversions its batch writer makes from the block alone made
ahead, on a third thread while the reader parses the next block (PREPARE, by the kind
of file: event_blocks and profile_blocks each have a `prepare`; order_blocks only makes
its lines' array, as more measured slower), so they overlap the loading thread's work
too.  A prepared block holds those columns beside its table, a few times its text at
most, so the blocks waiting (PREFETCH, one more between the two stages) stay bounded by
BLOCK_BYTES as before.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.json as pj

from bitseg.index import event_blocks, order_blocks, profile_blocks
from bitseg.index.ahead import Ahead
from bitseg.index.blocks import RowBlock
from bitseg.index.errors import DataError
from bitseg.loaders.dataset import (
    EVENT_FILES,
    ORDER_FILES,
    PROFILE_FILES,
    _open_binary,
    _parse_line,
)

BLOCK_BYTES = 16 << 20  # 16 MiB parsed fastest in a 1M-profile events file (4, 16, 64 tried)
# Blocks ready ahead of the loading thread: it takes them in bursts (a flush of its
# batch holds it ~1 s, then it eats blocks faster than they are parsed), so a queue of
# 2 left the reader idle through each flush and the loader waiting after it. 4 and 6 made
# a 1M events file 7-10% faster (alternated runs); ~4 x 16 MiB of text, a few times that
# parsed, stays bounded whatever the file's size.
PREFETCH = 4

# A blank line after a newline, or as the first line. Patterns that start with a literal
# newline are searched line to line; "^" under re.M tried every byte (30x slower).
_BLANK = re.compile(rb"\n(?:[ \t\r\f\v]*\n|[ \t\r\f\v]+\Z)")
_BLANK_FIRST = re.compile(rb"[ \t\r\f\v]*(?:\n|\Z)")
# A \u escape of a UTF-16 surrogate: orjson refuses a lone one where pyarrow may not,
# so blocks holding any go through the row path, which decides.
_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")
# A top-level null: pyarrow reads it as a row of nulls (and crashes on a block of only
# such lines) where the row path refuses it, so such blocks never reach pyarrow.
# ("}null" on one line is two rows for one line, which parse_block refuses anyway.)
_NULL_ROW = re.compile(rb"\n[ \t\r\f\v]*null")
_NULL_FIRST = re.compile(rb"(?:\xef\xbb\xbf)?[ \t\r\f\v]*null")
_LINE_START = np.frombuffer(b" \t\r\x0b\x0c\nn", dtype=np.uint8)  # see _plain_lines
_AFTER_BRACE = np.frombuffer(b" \t\r\x0b\x0cn", dtype=np.uint8)
_READ_OPTIONS = pj.ReadOptions(use_threads=True, block_size=1 << 20)
# "ts" stays the text it was, so a batch parses it as its row path does: pyarrow's own
# timestamp inference takes forms the row path refuses (e.g. "2025-01-01T10").
_PARSE_OPTIONS = pj.ParseOptions(explicit_schema=pa.schema([("ts", pa.string())]),
                                 unexpected_field_behavior="infer")
_TS_KEY = re.compile(rb'"ts"[ \t\r\n]*:')
_PROFILE_OPTIONS = pj.ParseOptions(unexpected_field_behavior="infer")
# What the reader thread makes ahead of a block, by the kind of file it is from
# (orders: only their lines. Their conversions made ahead took a 1M orders file 13.3 s
# instead of 11.8 s, the process 19 s of CPU instead of 16 s, as the reader's Python
# contends for the interpreter lock)
PREPARE: dict[str, Callable[[RowBlock], None]] = {
    "profiles": profile_blocks.prepare, "events": event_blocks.prepare,
    "orders": order_blocks.prepare}
_KINDS = {**dict.fromkeys(PROFILE_FILES, "profiles"), **dict.fromkeys(EVENT_FILES, "events"),
          **dict.fromkeys(ORDER_FILES, "orders")}


def iter_blocks(path: str | Path, *, on_bytes: Callable[[int], object] | None = None,
                block_bytes: int | None = None, kind: str | None = None) -> Iterator[RowBlock]:
    """The file's RowBlocks in order, parsed on a reader thread ahead of their use.
    `kind` ("profiles", "events" or "orders"; by default the one a dataset's file of
    this name holds) says what PREPARE makes ahead of each block, on a thread of its
    own, so that one block is prepared while the next is parsed; nothing for another.
    At most PREFETCH blocks wait for the loading thread, and one for the preparing."""
    file = Path(path)
    block_bytes = block_bytes or BLOCK_BYTES
    kind = kind or _KINDS.get(file.name, "")
    prepare = PREPARE.get(kind)
    blocks = _blocks(file, on_bytes, block_bytes, kind)
    if prepare is None:
        return _ahead(blocks, PREFETCH, f"read {file.name}")
    parsed = _ahead(blocks, 1, f"read {file.name}")
    return _ahead(_each_prepared(parsed, prepare), PREFETCH, f"prepare {file.name}")


def _ahead(items: Generator[Any, None, None], depth: int, name: str
           ) -> Generator[Any, None, None]:
    """The items, made on a thread of this name (started at the first one taken) with at
    most `depth` waiting and one more being made. What making one raises is raised here,
    in its turn. Closing this stops the thread and closes `items` there."""
    with Ahead(items, depth + 1, name) as made:
        yield from made


def _blocks(file: Path, on_bytes: Callable[[int], object] | None, block_bytes: int,
            kind: str = "") -> Generator[RowBlock, None, None]:
    """RowBlocks of whole lines, read and parsed in this (the reader's) thread, as a
    file of this kind (parse_block)."""
    line = 1
    rest = b""  # the text after the last line end read (never holds one)
    with _open_binary(file, on_bytes) as stream:
        while True:
            chunk = stream.read(block_bytes)
            if not chunk:
                break
            cut = chunk.rfind(b"\n") + 1
            if cut == 0:  # one line longer than a block: keep reading it
                rest += chunk
                continue
            # the block's whole lines copied once (a join of a view, not slice then add)
            data = b"".join((rest, memoryview(chunk)[:cut]))
            rest = chunk[cut:]
            newlines = data.count(b"\n")
            yield parse_block(data, file.name, line, newlines, kind)
            line += newlines
    if rest:
        yield parse_block(rest, file.name, line, kind=kind)


def _each_prepared(blocks: Generator[RowBlock, None, None],
                   prepare: Callable[[RowBlock], None]) -> Generator[RowBlock, None, None]:
    """Each block with `prepare` run on it (closing this closes `blocks`)."""
    with closing(blocks):
        for block in blocks:
            yield _prepared(block, prepare)


def _prepared(block: RowBlock, prepare: Callable[[RowBlock], None] | None) -> RowBlock:
    """The block, with what its batch writer makes from it alone made ahead (`prepare`,
    of its file's kind), to overlap the loading thread's work."""
    if block.table is not None and prepare is not None:
        prepare(block)
    return block


def parse_block(data: bytes, name: str, first_line: int, newlines: int | None = None,
                kind: str = "") -> RowBlock:
    """One block of whole lines as a RowBlock; its table is None when pyarrow refuses
    it or when its rows would not be its non-blank lines one to one. `newlines`: the
    data's count of line ends, when the caller has it. `kind` "profiles": a profile
    file's block, whose "ts" is a field like any other (parsed without the schema that
    keeps an event's or order's "ts" a text, so no column is added to take off)."""
    table = None
    plain = _plain_lines(data)
    null_row = not plain and (_NULL_FIRST.match(data) or _NULL_ROW.search(data))
    # most blocks hold no backslash, which memchr finds in 0.2 ms of a 16 MiB block; the
    # escape searches below took 4-5 ms (a surrogate) and 13 ms (any \u) each
    escaped = b"\\" in data
    if not (escaped and _SURROGATE.search(data)) and not null_row:
        try:
            profiles = kind == "profiles"
            table = pj.read_json(io.BytesIO(data), read_options=_READ_OPTIONS,
                                 parse_options=_PROFILE_OPTIONS if profiles else _PARSE_OPTIONS)
            if not profiles and table.column("ts").null_count == table.num_rows and \
                    not _TS_KEY.search(data) and not (escaped and b"\\u" in data):
                table = table.drop_columns(["ts"])  # no line has it: the schema added it
            table.validate()  # a list column starting [null, "x"] gets offsets past its items
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, UnicodeDecodeError):
            table = None
    blanks = [] if plain else _blank_lines(data)
    if newlines is None:
        newlines = data.count(b"\n")
    lines = newlines + (0 if data.endswith(b"\n") else 1)
    if table is not None and table.num_rows != lines - len(blanks):
        table = None  # e.g. two objects on one line: the row path says what is wrong
    if first_line != 1 and data.startswith(b"\xef\xbb\xbf"):
        table = None  # pyarrow would skip a byte-order mark the row path only allows on line 1

    def records(wanted: set[int] | None) -> Iterator[tuple[int, Any]]:
        return _records(data, name, first_line, wanted)

    def line_numbers() -> np.ndarray:
        numbers = np.arange(first_line, first_line + lines, dtype=np.int64)
        if blanks:
            numbers = np.delete(numbers, blanks)
        return numbers

    return RowBlock(table, first_line, records, None if not blanks else line_numbers, data=data)


def texts_block(texts: Sequence[str], kind: str = "") -> list[Any]:
    """A streamed batch's JSON texts (records numbered from 1) as the items of one engine
    batch: one RowBlock, or the parsed (record, object) pairs when the texts cannot be
    lines of one block (a text holding a line break, or a blank one). Bad JSON is a
    DataError naming the record; the first one is found before anything is applied.
    `kind`: of the records, as parse_block takes it."""
    if not texts:
        return []
    data = _lines_of(texts)
    if data is None:
        return parse_texts(texts)

    parsed: list[tuple[int, Any]] = []  # every text, parsed once when first asked for

    def records(wanted: set[int] | None) -> Iterator[tuple[int, Any]]:
        if not parsed:
            parsed.extend(parse_texts(texts))
        return iter(parsed if wanted is None else [p for p in parsed if p[0] in wanted])

    block = parse_block(data, "", 1, kind=kind)
    return [RowBlock(block.table, 1, records, data=data)]  # data: what add_block may check


def group_block(batches: Sequence[Sequence[str]]) -> list[Any]:
    """Several streamed batches' texts as the items of one engine batch, one RowBlock
    whose records are numbered from 1 across them all (for a group commit, which on any
    error applies the batches one by one to name it). A record asked for parses its whole
    batch, as texts_block does, so the group fails wherever one of its batches would.
    The texts_block items of each batch, one after another, when the texts cannot be
    lines of one block."""
    texts = [text for batch in batches for text in batch]
    data = _lines_of(texts) if texts else None
    if data is None:
        return [item for batch in batches for item in texts_block(batch)]
    ends = np.cumsum([len(batch) for batch in batches])  # last record number of each batch
    parsed: dict[int, Any] = {}  # record number -> object, batch by batch

    def records(wanted: set[int] | None) -> Iterator[tuple[int, Any]]:
        numbers = range(1, len(texts) + 1) if wanted is None else \
            sorted(n for n in wanted if 1 <= n <= len(texts))
        for number in numbers:
            if number not in parsed:
                which = int(np.searchsorted(ends, number))
                first = 1 + (int(ends[which - 1]) if which else 0)
                for offset, item in parse_texts(batches[which]):
                    parsed[first + offset - 1] = item
            yield number, parsed[number]

    block = parse_block(data, "", 1)
    return [RowBlock(block.table, 1, records, data=data)]


def decoded(texts: Sequence[str], kind: str) -> list[Any]:
    """texts_block(texts), each block also prepared as the file reader prepares one of
    this kind (PREPARE): what a stream's reading thread makes of a message ahead of
    its turn (a profile batch parsed as a profile file's block is). Bad JSON raises as
    texts_block does."""
    items = texts_block(texts, kind)
    prepare = PREPARE.get(kind)
    for item in items:
        if isinstance(item, RowBlock):
            _prepared(item, prepare)
    return items


def numbered_on(batches: Sequence[tuple[int, list[Any]]]) -> list[Any]:
    """Several batches' texts_block (or decoded) items, each given with its number of
    records, as the items of one engine batch whose records are numbered from 1 across
    them all, as group_block numbers them: a block of a later batch reads its records
    and names its lines past those of the batches before it."""
    out: list[Any] = []
    before = 0
    for records, items in batches:
        out += [_shifted(item, before) for item in items]
        before += records
    return out


def _shifted(item: Any, by: int) -> Any:
    """A texts_block item with its record numbers `by` higher."""
    if by == 0:
        return item
    if not isinstance(item, RowBlock):
        line, record = item
        return line + by, record

    def records(wanted: set[int] | None) -> Iterator[tuple[int, Any]]:
        inner = None if wanted is None else {number - by for number in wanted}
        return ((number + by, record) for number, record in item.records(inner))

    lines = None if item._lines is None else (lambda: item.lines() + by)
    return RowBlock(item.table, item.first_line + by, records, lines, data=item.data,
                    prepared=item.prepared)


def _lines_of(texts: Sequence[str]) -> bytes | None:
    """The texts as the lines of one block, or None when they cannot be: a text with a
    line break inside, or a blank one. A line break ending a text (a file's line sent as
    it was read) is JSON whitespace, dropped with the whitespace around it; the records
    are still parsed from the texts as sent, so an error reads as it would."""
    data = _read_lines(texts)
    if data is not None:
        return data
    lines = texts
    data = "\n".join(lines).encode()
    if data.count(b"\n") != len(lines) - 1:
        lines = [text.rstrip(" \t\r\n") for text in texts]
        data = "\n".join(lines).encode()
        if data.count(b"\n") != len(lines) - 1:
            return None
    if not all(lines) or _blank_lines(data):  # (an empty last line is no line of a block)
        return None
    return data


def _read_lines(texts: Sequence[str]) -> bytes | None:
    """The texts joined as they are when each is an object on one line ending in its
    line break — a file's lines sent as read, the usual stream — checked in numpy (a
    third of _lines_of's general way); None for anything else."""
    joined = "".join(texts)
    data = joined.encode()
    if not texts or len(data) != len(joined):  # not ASCII: a length is not its bytes'
        return None
    chars = np.frombuffer(data, dtype=np.uint8)
    sizes = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
    ends = np.cumsum(sizes)
    starts = ends - sizes
    if not (sizes >= 2).all() or not (chars[ends - 1] == 10).all() or \
            not (chars[starts] == 123).all() or np.count_nonzero(chars == 10) != len(texts):
        return None  # a text with no line break at its end or one inside, or no "{" first
    return data


def parse_texts(texts: Iterable[str]) -> list[tuple[int, Any]]:
    """The JSON texts parsed and numbered from 1, or a DataError naming the record."""
    records = []
    for number, text in enumerate(texts, 1):
        try:
            records.append((number, orjson.loads(text)))
        except orjson.JSONDecodeError as exc:
            raise DataError(f"not valid JSON: {exc}", line=number) from None
    return records


def _plain_lines(data: bytes) -> bool:
    """Whether the block surely has no blank line and no top-level null (what _BLANK and
    _NULL_ROW find, at a tenth of their cost): no line starts with whitespace, a newline
    or "n", and no "}" is followed by whitespace other than a newline or by "n"."""
    chars = np.frombuffer(data, dtype=np.uint8)
    if len(chars) == 0 or chars[0] in _LINE_START:
        return False
    before, after = chars[:-1], chars[1:]
    return not (np.isin(after[before == 10], _LINE_START).any()
                or np.isin(after[before == 125], _AFTER_BRACE).any())


def _blank_lines(data: bytes) -> list[int]:
    """Offsets (0-based line numbers within the block) of its blank lines."""
    if not (_BLANK_FIRST.match(data) or _BLANK.search(data)):
        return []
    found = []
    for number, line in enumerate(data.split(b"\n")):
        if not line or line.isspace():
            found.append(number)
    if data.endswith(b"\n"):
        found.pop()  # the empty text after the last newline is not a line
    return found


def _records(data: bytes, name: str, first_line: int,
             wanted: set[int] | None) -> Iterator[tuple[int, Any]]:
    """(line, object) of the block's non-blank lines, parsed one by one (the row path)."""
    for offset, line in enumerate(data.split(b"\n")):  # as a file is read: at \n only
        number = first_line + offset
        if wanted is not None and number not in wanted:
            continue
        if not line or line.isspace():
            continue
        yield number, _parse_line(line, name, number)

