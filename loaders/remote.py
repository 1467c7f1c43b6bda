"""Loading a dataset folder into a running server, through its streaming ingest calls
(`bitseg load DATASET --addr A`).

First the whole dataset is checked by loading it into a temporary local store with
load_dataset, the code `bitseg load --db` runs: a bad line is named by file, line and
field before anything is sent. Then profiles, events and orders are streamed, one call
per file and `batch_size` records per message; the server applies each message all or
nothing (the messages that arrive while it applies one share its next transaction: group
commit). So what is atomic is one batch: a call that fails (or a client that dies)
leaves the batches before it committed and nothing of the rest.
"""

from __future__ import annotations

import re
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bitseg.index.errors import BitsegError
from bitseg.index.schema import Schema
from bitseg.index.types import FLOAT, KEYWORDS
from bitseg.loaders import dataset
from bitseg.loaders.dataset import EVENT_FILES, ORDER_FILES, Pairs

BATCH_SIZE = 10_000
KEPT_BATCHES = 256  # line numbers kept for naming the line of a batch the server refuses
_FAILED_AT = re.compile(r"batch (\d+) \((\d+) before it committed\): record (\d+)(.*)$",
                        re.DOTALL)


@dataclass
class RemoteReport:
    """What one load_remote call sent and the server committed."""

    profiles_created: int
    profiles_updated: int
    events: int
    orders: int
    batches: int
    seconds: float


class RemoteLoadError(BitsegError):
    """The server refused a file part way (or went away); `code` is the gRPC status."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


def load_remote(path: str | Path, client: Any, *, batch_size: int = BATCH_SIZE,
                progress: bool = False) -> RemoteReport:
    """Check the dataset locally, then stream it to the server: profiles, events, orders."""
    if batch_size < 1:
        raise BitsegError("--batch-size must be at least 1")
    started = time.perf_counter()
    folder = dataset._dataset_folder(path)
    schema = check_dataset(folder)
    profiles = dataset._profiles_file(folder)
    events = dataset._pick(folder, EVENT_FILES)
    orders = dataset._pick(folder, ORDER_FILES)
    sent = _Sender(batch_size, progress)
    reply = sent.file(profiles, schema.profiles, client.upsert_profiles)
    n_events = sent.file(events, schema.events, client.track_events) if events else 0
    n_orders = sent.file(orders, schema.orders, client.add_orders) if orders else 0
    return RemoteReport(reply.created, reply.updated, n_events, n_orders, sent.batches,
                        time.perf_counter() - started)


def check_dataset(folder: Path) -> Schema:
    """Load the dataset into a throwaway store (DataError naming file, line and field);
    the schema it ends with: declared by schema.json or inferred from first values."""
    from bitseg.index.engine import Engine

    with tempfile.TemporaryDirectory(prefix="bitseg-check-") as scratch:
        with Engine.open(Path(scratch) / "store", bulk=dataset.bulk_reserve(folder)) as engine:
            dataset.load_dataset(folder, engine)
            return engine.schema


class _Sender:
    """Streams files batch by batch, remembering the line numbers of recent batches."""

    def __init__(self, batch_size: int, progress: bool) -> None:
        self.batch_size = batch_size
        self.progress = progress
        self.batches = 0  # sent, over all files (all committed once the calls returned)

    def file(self, file: Path, types: Any, call: Callable[..., Any]) -> Any:
        """Send one file through `call` (a Client ingest method); its reply."""
        sent = _Sent()
        with dataset._progress_bar(file, self.progress) as on_bytes:
            if file.name.endswith(".csv"):
                pairs = dataset.iter_profiles_csv(file, types, on_bytes=on_bytes)
            else:
                pairs = dataset.iter_jsonl(file, on_bytes=on_bytes)
            with closing(pairs):
                try:
                    reply = call(self._batches(pairs, types, sent), batch_size=self.batch_size)
                except BitsegError:
                    raise
                except Exception as exc:  # ClientError: the server refused or went away
                    raise _failure(file, exc, sent) from None
        self.batches += sent.count
        return reply

    def _batches(self, pairs: Pairs, types: Any, sent: _Sent) -> Iterator[list[dict[str, Any]]]:
        batch: list[dict[str, Any]] = []
        numbers: list[int] = []
        for line, record in pairs:
            batch.append(_typed(record, types))
            numbers.append(line)
            if len(batch) == self.batch_size:
                sent.add(numbers)
                yield batch
                batch, numbers = [], []
        if batch:
            sent.add(numbers)
            yield batch


class _Sent:
    """How many batches of a file went out, and the line numbers of the latest ones."""

    def __init__(self) -> None:
        self.count = 0
        self.lines: dict[int, list[int]] = {}

    def add(self, numbers: list[int]) -> None:
        self.count += 1
        self.lines[self.count] = numbers
        self.lines.pop(self.count - KEPT_BATCHES, None)


def _failure(file: Path, exc: Exception, sent: _Sent) -> RemoteLoadError:
    """The error of a refused call, naming the file's line when the server named the record."""
    message, code = getattr(exc, "message", str(exc)), getattr(exc, "code", "UNKNOWN")
    found = _FAILED_AT.search(message)
    if found is None:
        return RemoteLoadError(f"{file.name}: {code}: {message} (of the {sent.count:,} "
                               "batches of this file sent, those before the failure may "
                               "have committed, each whole; none after it)", code)
    batch, committed, record, rest = (int(found.group(1)), int(found.group(2)),
                                      int(found.group(3)), found.group(4))
    numbers = sent.lines.get(batch) or []
    where = f"line {numbers[record - 1]}" if record <= len(numbers) else \
        f"batch {batch}, record {record}"
    return RemoteLoadError(f"{file.name}, {where}{rest}; {committed:,} batch(es) of this file "
                           "before it were committed, nothing after", code)


def _typed(record: dict[str, Any], types: Any) -> dict[str, Any]:
    """The record with values shaped so that the server infers the type the check found
    (schema.json is not sent: the API has no call to declare fields): whole numbers of a
    float field as floats, a single keyword of a keywords field as a list."""
    changed: dict[str, Any] | None = None
    for key, value in record.items():
        fixed = _shaped(types.get(key), value)
        if key == "items" and isinstance(value, list):
            fixed = [{k: _shaped(types.get(f"items.{k}"), v) for k, v in item.items()}
                     if isinstance(item, dict) else item for item in value]
        if fixed is not value:
            changed = changed if changed is not None else dict(record)
            changed[key] = fixed
    return record if changed is None else changed


def _shaped(type_: str | None, value: Any) -> Any:
    if type_ == FLOAT and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type_ == KEYWORDS and isinstance(value, str):
        return [value]
    return value
