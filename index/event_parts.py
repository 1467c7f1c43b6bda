"""The raw-row parts an events batch makes of each (event type, day), held until its end.

Each flush of an EventBatch (FLUSH_ROWS rows) sorts its rows by type and day and makes
one part of each (type, day) it holds: an encoded event_index.Block. A file that is not
in one time order (the generator's, a concatenation of exports) touches every day in
every flush, so its days end the batch in as many parts as there were flushes, and the
store keeps one part a day: the batch joins them at its end.

Written into LMDB as they were made, joined, then deleted, the parts of the 10M events
file (383,797 of them for 4,017 days) cost 13 s of LMDB's gets, puts and deletes at the
batch's end (the deletes 8.9 s: each part frees overflow pages in one large write
transaction), besides their puts in each flush. A PartStash keeps them in an unnamed
scratch file instead (gone with the process, even killed), and the batch writes each
day once: its one part as it was made, or its parts joined.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

PartKey = tuple[str, int]  # (event type, day)


class PartStash:
    """Encoded parts by (event type, day), in a scratch file made on the first one."""

    def __init__(self, folder: str | Path | None) -> None:
        self.folder = folder
        self.file: IO[bytes] | None = None
        self.size = 0  # bytes written
        self.parts: dict[PartKey, list[tuple[int, int]]] = {}  # (offset, length), in order

    def __contains__(self, key: PartKey) -> bool:
        return key in self.parts

    def __len__(self) -> int:
        return len(self.parts)

    def add(self, key: PartKey, raw: bytes) -> None:
        """Keep one more part of this (type, day), after those it has."""
        if self.file is None:
            self.file = tempfile.TemporaryFile(dir=self.folder, prefix="bitseg-parts-")
        self.file.write(raw)
        self.parts.setdefault(key, []).append((self.size, len(raw)))
        self.size += len(raw)

    def items(self) -> Iterator[tuple[PartKey, list[bytes]]]:
        """Each (type, day) with its parts' bytes in the order they were added, the
        (type, day)s in the order of their first part."""
        if self.file is None:
            return
        self.file.flush()
        fd = self.file.fileno()
        for key, spans in self.parts.items():
            yield key, [_read(fd, offset, length) for offset, length in spans]

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        self.parts = {}


def _read(fd: int, offset: int, length: int) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) != length:
        raise OSError(f"scratch file of event parts cut short at byte {offset + len(data)}")
    return data
