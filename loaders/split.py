"""Splitting a dataset folder (CONTRACT §1) by shard: one dataset folder per shard.

Every profile, event and order goes to the shard of its profile id
(index/shard_key.py): profiles by `id`, events and orders by `profile`. Each shard
folder gets a copy of schema.json, so every shard declares the same schema. Lines are
copied as they are (blank lines dropped): uncompressed (a .jsonl.gz input becomes a
.jsonl per shard), or with `compress` gzip'd at level 1 (a .jsonl.gz per shard, about a
fifth of the size, for a disk that cannot hold a second copy of the dataset). A CSV
profiles file is always copied as CSV.

A line whose JSON or profile id is bad is a DataError naming the original file, line
and field, found before anything is loaded. An error a shard's load finds later names
the shard's copy; `original_line` turns it back into the input's line.
"""

from __future__ import annotations

import csv
import gzip
import multiprocessing
import os
import shutil
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO

import orjson

from bitseg.index.errors import DataError
from bitseg.index.shard_key import shard_of, shard_of_bytes
from bitseg.loaders.dataset import (
    EVENT_FILES,
    ORDER_FILES,
    PROFILE_FILES,
    SCHEMA_FILE,
    _dataset_folder,
    _parse_line,
    _pick,
    _profiles_file,
)

BLOCK_BYTES = 8 << 20  # bytes of input split at a time (whole lines)
PARALLEL_BYTES = 64 << 20  # a file this large is split by worker processes
WORKERS = 4  # at most this many worker processes (and at most one per core)
KNOWN_IDS = 1 << 20  # ids whose shard a worker remembers (about 100 MB)
_KNOWN: dict[str, int] = {}  # a worker's: id -> shard (a worker splits one file)
_BOM = b"\xef\xbb\xbf"


def shard_folder(root: str | Path, shard: int) -> Path:
    return Path(root) / f"shard-{shard}"


@dataclass
class Split:
    """What a split wrote: the lines taken from each input file (by name), and the bytes
    each shard's copies hold uncompressed (what its load is sized by)."""

    lines: dict[str, int]
    shard_bytes: list[int]


def split_dataset(source: str | Path, shards: int, out: str | Path,
                  compress: bool = False) -> Split:
    """Write out/shard-0 .. out/shard-{shards-1}, each a dataset folder."""
    folder = _dataset_folder(source)
    profiles = _profiles_file(folder)
    inputs = [(profiles, "id")]
    for names in (EVENT_FILES, ORDER_FILES):
        found = _pick(folder, names)
        if found is not None:
            inputs.append((found, "profile"))
    targets = [shard_folder(out, s) for s in range(shards)]
    for target in targets:
        target.mkdir(parents=True, exist_ok=True)
        if (folder / SCHEMA_FILE).is_file():
            shutil.copyfile(folder / SCHEMA_FILE, target / SCHEMA_FILE)
    split = Split({}, [0] * shards)
    for file, key in inputs:
        if file.name.endswith(".csv"):
            split.lines[file.name] = _split_csv(file, shards, targets)
            for s, target in enumerate(targets):
                split.shard_bytes[s] += (target / file.name).stat().st_size
        else:
            split.lines[file.name] = _split_jsonl(file, key, shards, targets, compress,
                                                  split.shard_bytes)
    return split


def input_bytes(source: str | Path) -> int:
    """About how many bytes the dataset's files hold uncompressed (a .gz file counted at
    five times its size, what gzip makes of these files); what an uncompressed split
    writes."""
    folder = _dataset_folder(source)
    found = [_profiles_file(folder)] + [f for names in (EVENT_FILES, ORDER_FILES)
                                        if (f := _pick(folder, names)) is not None]
    return sum(f.stat().st_size * (5 if f.name.endswith(".gz") else 1) for f in found)


def copy_name(name: str, compress: bool = False) -> str:
    """The name of a shard's copy of a JSON Lines input file."""
    plain = name[:-3] if name.endswith(".gz") else name
    return plain + ".gz" if compress else plain


def _open(file: Path) -> BinaryIO:
    raw: BinaryIO = open(file, "rb")  # noqa: SIM115 -- closed by the caller's with
    return gzip.GzipFile(fileobj=raw) if file.name.endswith(".gz") else raw  # type: ignore[return-value]


def _split_jsonl(file: Path, key: str, shards: int, targets: list[Path],
                 compress: bool, written: list[int]) -> int:
    """Copy each non-blank line to its profile's shard, adding the bytes each shard got
    to `written`; the number of lines copied.

    The input is read in blocks of whole lines; each block is split (by `_split_block`,
    in worker processes for a large file) into one piece per shard, and the pieces are
    written in the input's order, so every copy holds its lines in the input's order.
    """
    outputs: list[BinaryIO] = [
        gzip.open(t / copy_name(file.name, True), "wb", compresslevel=1) if compress
        else open(t / copy_name(file.name), "wb") for t in targets]  # noqa: SIM115
    copied = 0
    try:
        with _open(file) as stream, _block_splitter(file, key, shards) as split_blocks:
            for block, first, (pieces, count, bad) in split_blocks(_blocks(stream)):
                if bad is not None:
                    _raise_at(block, first, bad, file.name, key, shards)
                copied += count
                for shard, piece in enumerate(pieces):
                    if piece:
                        outputs[shard].write(piece)
                        written[shard] += len(piece)
    finally:
        for output in outputs:
            output.close()
    return copied


Pieces = tuple[list[bytes], int, "int | None"]  # per shard bytes, lines copied, bad line


def _blocks(stream: BinaryIO) -> Iterator[tuple[bytes, int]]:
    """(block of whole lines, the number of its first line), BLOCK_BYTES at a time."""
    first, rest = 1, b""
    while True:
        chunk = stream.read(BLOCK_BYTES)
        if not chunk:
            break
        end = chunk.rfind(b"\n")
        if end < 0:
            rest += chunk
            continue
        block, rest = rest + chunk[:end + 1], chunk[end + 1:]
        yield block, first
        first += block.count(b"\n")
    if rest:
        yield rest, first


def _split_block(block: bytes, first: int, key: str, shards: int,
                 known: dict[str, int] | None = None) -> Pieces:
    """A block of lines (numbered from `first`) split by shard: each shard's lines
    joined, each ending in a newline; how many were copied; and the number of the first
    line the split refuses, if any (its error is told again by `_raise_at`, in the
    caller, by the line-at-a-time logic of `_keyed_line`). `known` holds the shards of
    string ids already hashed (a worker's own by default): the hash costs twice the
    parse, and every id comes back with its events and orders."""
    known = _KNOWN if known is None else known
    lines: list[list[bytes]] = [[] for _ in range(shards)]
    loads = orjson.loads
    last, last_shard = "", 0
    number = first - 1
    for line in block.split(b"\n"):
        number += 1
        if not line or line.isspace():
            continue
        if number == 1:  # a byte order mark: the line-at-a-time path says what it is
            try:
                shard, line = _keyed_line(line + b"\n", "", key, shards)
            except Exception:  # noqa: BLE001 -- told again, with its words, by _raise_at
                return [], 0, number
            lines[shard].append(line[:-1])
            continue
        try:
            record = loads(line)
        except orjson.JSONDecodeError:
            return [], 0, number
        if type(record) is not dict:
            return [], 0, number
        if shards == 1:
            lines[0].append(line)
            continue
        ident = record.get(key)
        kind = type(ident)
        if kind is str and ident:
            if ident != last:
                last_shard = known.get(ident, -1)
                if last_shard < 0:
                    try:
                        raw = ident.encode("utf-8")
                    except UnicodeEncodeError:  # a lone surrogate
                        return [], 0, number
                    last_shard = shard_of_bytes(raw, shards)
                    if len(known) >= KNOWN_IDS:
                        known.clear()
                    known[ident] = last_shard
                last = ident
            lines[last_shard].append(line)
        elif kind is int:  # an integer id is its decimal string (not a bool: type, not isinstance)
            lines[shard_of_bytes(str(ident).encode(), shards)].append(line)
        else:
            return [], 0, number
    pieces = [b"\n".join(shard_lines) + b"\n" if shard_lines else b""
              for shard_lines in lines]
    return pieces, sum(map(len, lines)), None


def _raise_at(block: bytes, first: int, bad: int, name: str, key: str,
              shards: int) -> None:
    """Raise the error of line `bad` of the block, as the line-at-a-time path tells it."""
    lines = block.split(b"\n")
    at = bad - first  # the block's last line has no newline only at the end of the file
    _keyed_line(lines[at] + (b"\n" if at < len(lines) - 1 else b""), name, key, shards, bad)
    raise AssertionError(f"{name}, line {bad}: refused by the block split only")


@contextmanager
def _block_splitter(file: Path, key: str, shards: int
                    ) -> Iterator[Callable[[Iterable[tuple[bytes, int]]],
                                           Iterator[tuple[bytes, int, Pieces]]]]:
    """A function from blocks to (block, first line, its pieces), in the blocks' order:
    in this process for a small file, else in worker processes (one per core, at most
    WORKERS), a few blocks ahead of the writes so memory stays a few blocks."""
    workers = min(WORKERS, len(os.sched_getaffinity(0)))
    if (workers < 2 or file.stat().st_size < PARALLEL_BYTES
            or "fork" not in multiprocessing.get_all_start_methods()):
        known: dict[str, int] = {}
        yield lambda blocks: ((block, first, _split_block(block, first, key, shards, known))
                              for block, first in blocks)
        return
    # forked: a worker runs only _split_block (no locks, no threads of the parent's) and
    # needs no `if __name__ == "__main__"` in the caller's script, as spawn would
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))

    def split_blocks(blocks: Iterable[tuple[bytes, int]]
                     ) -> Iterator[tuple[bytes, int, Pieces]]:
        ahead: deque[tuple[bytes, int, Future[Pieces]]] = deque()
        for block, first in blocks:
            ahead.append((block, first, pool.submit(_split_block, block, first, key,
                                                    shards)))
            if len(ahead) > 2 * workers:
                block, first, future = ahead.popleft()
                yield block, first, future.result()
        while ahead:
            block, first, future = ahead.popleft()
            yield block, first, future.result()

    try:
        yield split_blocks
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _keyed_lines(stream: BinaryIO, name: str, key: str, shards: int
                 ) -> Iterator[tuple[int, int, bytes]]:
    """(line number, shard, the line ending in a newline) of each non-blank line."""
    for number, line in enumerate(stream, 1):
        if line.isspace() or not line:
            continue
        shard, line = _keyed_line(line, name, key, shards, number)
        yield number, shard, line


def _keyed_line(line: bytes, name: str, key: str, shards: int, number: int = 1
                ) -> tuple[int, bytes]:
    """The shard of one non-blank line and the line as copied (ending in a newline); a
    DataError naming file, line and field if the split refuses it."""
    if number == 1 and line.startswith(_BOM):
        line = line[len(_BOM):]
    record = _parse_line(line, name, number)
    try:
        shard = shard_of(record.get(key), shards)
    except DataError as exc:
        raise DataError(exc.reason, field=key, file=name, line=number) from None
    return shard, line if line.endswith(b"\n") else line + b"\n"


def _split_csv(file: Path, shards: int, targets: list[Path]) -> int:
    """profiles.csv: the header to every shard, each record to its id's shard."""
    with open(file, encoding="utf-8-sig", newline="") as stream:
        reader = csv.reader(stream)
        header = next(reader, None)
        if header is None:
            raise DataError("no header row", file=file.name, line=1)
        names = [h.strip() for h in header]
        if "id" not in names:
            raise DataError("the header has no `id` column", file=file.name, line=1)
        at = names.index("id")
        outputs: list[IO[str]] = [open(t / file.name, "w", encoding="utf-8", newline="")
                                  for t in targets]  # noqa: SIM115
        try:
            writers = [csv.writer(o) for o in outputs]
            for writer in writers:
                writer.writerow(header)
            copied = 0
            for row in reader:
                if not any(cell.strip() for cell in row):
                    continue
                ident = row[at] if at < len(row) else ""
                if not ident:
                    raise DataError("expected a non-empty id", field="id", file=file.name,
                                    line=reader.line_num)
                writers[shard_of(ident, shards)].writerow(row)
                copied += 1
        finally:
            for output in outputs:
                output.close()
    return copied


def original_line(source: str | Path, shard: int, shards: int, name: str,
                  line: int) -> tuple[str, int] | None:
    """The input file and physical line that became line `line` of shard `shard`'s copy
    named `name` (a JSON Lines copy); None when it cannot be told. Read again from the
    input, so a successful load pays nothing for it."""
    folder = _dataset_folder(source)
    for names, key in ((PROFILE_FILES, "id"), (EVENT_FILES, "profile"),
                       (ORDER_FILES, "profile")):
        found = _pick(folder, names)
        if (found is None or found.name.endswith(".csv")
                or copy_name(found.name) != copy_name(name)):  # the copy, gzip'd or not
            continue
        seen = 0
        with _open(found) as stream:
            for number, at, _ in _keyed_lines(stream, found.name, key, shards):
                if at == shard:
                    seen += 1
                    if seen == line:
                        return found.name, number
    return None

