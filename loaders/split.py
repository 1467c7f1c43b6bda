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
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO

from bitseg.index.errors import DataError
from bitseg.index.shard_key import shard_of
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

FLUSH_BYTES = 1 << 20  # bytes a shard's output buffer holds before it is written
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
    to `written`; the number of lines copied."""
    outputs: list[BinaryIO] = [
        gzip.open(t / copy_name(file.name, True), "wb", compresslevel=1) if compress
        else open(t / copy_name(file.name), "wb") for t in targets]  # noqa: SIM115
    buffers: list[list[bytes]] = [[] for _ in targets]
    sizes = [0] * shards
    copied = 0
    try:
        with _open(file) as stream:
            for _, shard, line in _keyed_lines(stream, file.name, key, shards):
                buffers[shard].append(line)
                sizes[shard] += len(line)
                written[shard] += len(line)
                copied += 1
                if sizes[shard] >= FLUSH_BYTES:
                    outputs[shard].writelines(buffers[shard])
                    buffers[shard], sizes[shard] = [], 0
        for output, buffer in zip(outputs, buffers, strict=True):
            output.writelines(buffer)
    finally:
        for output in outputs:
            output.close()
    return copied


def _keyed_lines(stream: BinaryIO, name: str, key: str, shards: int
                 ) -> Iterator[tuple[int, int, bytes]]:
    """(line number, shard, the line ending in a newline) of each non-blank line."""
    for number, line in enumerate(stream, 1):
        if line.isspace() or not line:
            continue
        if number == 1 and line.startswith(_BOM):
            line = line[len(_BOM):]
        record = _parse_line(line, name, number)
        try:
            shard = shard_of(record.get(key), shards)
        except DataError as exc:
            raise DataError(exc.reason, field=key, file=name, line=number) from None
        yield number, shard, line if line.endswith(b"\n") else line + b"\n"


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

