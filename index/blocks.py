"""A block of input rows as columns: what the columnar bulk path hands a batch writer.

A loader cuts a file into blocks of whole lines and parses each block into an Arrow
table with a native, multi-threaded parser.  A batch writer's ``add_block`` either
applies the whole block column-wise, or hands some or all of its rows back to be
applied one by one through ``add`` (the row path), which is the reference: a block
must leave the batch exactly as its rows would have, in the same order.

The row path is also how errors are found: when the parser refuses a block (a bad
line, a value of another type, a key given twice), ``table`` is None and every row of
the block goes through ``add``, which names the line and field.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from bitseg.index.errors import DataError


def texts_of(arr: pa.Array) -> tuple[Any, np.ndarray]:
    """A string or binary Arrow array's data buffer (b"" when it has none) and its
    len + 1 value offsets into it (int64), large types too, read where they are."""
    large = pa.types.is_large_string(arr.type) or pa.types.is_large_binary(arr.type)
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64 if large else np.int32,
                            count=len(arr) + 1, offset=arr.offset * (8 if large else 4))
    data = arr.buffers()[2]
    return (data if data is not None else b""), offsets.astype(np.int64)


# What add_block returns: True when it applied every row, False when it applied none
# (the caller applies them all through add), or the sorted positions of the rows it
# left for add — applied after the block's other rows, in line order.
Taken = bool | np.ndarray


@dataclass
class RowBlock:
    """Rows of one file (or one message) as an Arrow table, with the rows themselves."""

    table: Any  # a pyarrow.Table of the block's non-blank lines, or None if unparsed
    first_line: int  # line number of the block's first line in its file
    # (line, record) of every row, or of the rows on the given lines only
    records: Callable[[set[int] | None], Iterator[tuple[int, Any]]]
    _lines: Callable[[], np.ndarray] = field(repr=False, default=None)  # type: ignore[assignment]
    data: bytes = field(repr=False, default=b"")  # the block's raw lines, when read from a file
    _cached: np.ndarray | None = field(repr=False, default=None)
    # conversions of the table a batch writer made ahead, on the reader's thread (what
    # its add_block would make from the table alone; see event_blocks.prepare)
    prepared: dict | None = field(repr=False, default=None)

    @property
    def rows(self) -> int:
        return 0 if self.table is None else self.table.num_rows

    def lines(self) -> np.ndarray:
        """The line number of each table row (int64), for errors that name a line."""
        if self._cached is None:
            if self._lines is None:
                self._cached = np.arange(self.first_line, self.first_line + self.rows,
                                         dtype=np.int64)
            else:
                self._cached = self._lines()
        return self._cached

    def line_of(self, row: int) -> int:
        return int(self.lines()[row])

    def records_at(self, rows: np.ndarray) -> Iterator[tuple[int, Any]]:
        """(line, record) of the table rows at these sorted positions."""
        return self.records(set(self.lines()[rows].tolist()))

    def readable(self, lines: set[int]) -> dict[int, Any]:
        """line -> record for those of these lines the row path can read; a line it
        cannot (pyarrow takes a few things orjson refuses, like NaN) is left out, so a
        batch looking ahead at a line does not raise an error before an earlier line's."""
        try:
            return dict(self.records(lines))  # one pass over the block: the usual case
        except DataError:
            pass
        found = {}
        for line in sorted(lines):
            try:
                found.update(self.records({line}))
            except DataError:
                continue
        return found


def apply_block(batch: Any, block: RowBlock, add_row: Callable[[int, Any], None]) -> None:
    """Apply one block to a batch: column-wise where the batch can, else row by row
    through `add_row(line, record)` (which locates errors)."""
    add_block = getattr(batch, "add_block", None)
    taken: Taken = False
    if block.table is not None and add_block is not None:
        taken = add_block(block)
    if taken is True or (taken is not False and len(taken) == 0):
        return
    rows = block.records(None) if taken is False else block.records_at(taken)
    for line, record in rows:
        add_row(line, record)
