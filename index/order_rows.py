"""Where an order's row lives: packed in a compressed run, or as a key of its own.

An order's row (its external id, profile, time, fields and items, as JSON) is read back
only when the order is given again (a later line wins, its old values come off the
index), when its profile is deleted, and when an older store's items are indexed once.
Yet it was the largest thing a load wrote: ~340 bytes an order, as much as the JSON
file, so the 10M dataset's orders load spent a quarter of its time in LMDB's puts of
them (benchmarks/RESULTS.md, session 15).

So the block path (order_blocks._apply), which writes new orders in runs of
consecutive ids, packs them RUN_ROWS at a time and compresses the run with zstd
(pyarrow's codec, on a helper thread: it lets go of the interpreter lock): the key
ORDER_RUNS + u32(first id) holds them, about a seventh of their bytes. A row written one
at a time (add(): an upsert, or an order the block path leaves to it) keeps a key of
its own, ORDER_ROWS + u32(id), which wins over a run's copy; an empty value there says
the order was deleted. A run is never rewritten, so a decoded one can be kept while
its rows are looked up.

A run's value: a byte naming its codec (CODECS), u32 rows, u32 unpacked bytes
(little-endian), then the compressed bytes of the rows' end offsets (u32 each)
followed by the rows themselves.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pyarrow as pa

from bitseg.index.blocks import texts_of
from bitseg.index.errors import StoreError
from bitseg.index.keys import ORDER_ROWS, ORDER_RUNS, from_u32, u32
from bitseg.index.store import Store, Txn

# rows a run holds. The 1M dataset's orders (668 MB of rows): 64 a run, 100 MB and
# 22 us to unpack one; 256, 89 MB and 52 us; 1024, 87 MB and 240 us; 16, 135 MB and
# still 23 us (a call's own cost). An update of a loaded order unpacks its run.
RUN_ROWS = 64
CACHED = 32  # runs kept unpacked by an OrderRows (updates of nearby orders reuse them)
LEVEL = 1  # zstd's level: 3 made the 1M orders' rows 0.3% smaller and 20% slower
# by the byte a run's value starts with. lz4 halved what an update of a loaded order
# pays to unpack its run (100k random updates at 1M: 11.5 s with zstd, 10.0 with lz4,
# 9.2 before runs), for 20% more bytes; zstd is kept for a large load's writes.
CODECS = {1: ("zstd", LEVEL), 2: ("lz4", None)}
CODEC = 1
PENDING = 2  # blocks' runs being compressed before the writer waits for the oldest
GONE = b""  # an order's own key with this value: deleted, whatever a run holds
_HEAD = struct.Struct("<BII")  # codec, rows, unpacked bytes
_codecs: dict[int, pa.Codec] = {}


def codec(number: int) -> pa.Codec:
    """The codec a run's first byte names (a StoreError for one this bitseg lacks)."""
    if number not in _codecs:
        if number not in CODECS:
            raise StoreError(f"an order run is packed with codec {number}, which this "
                             f"bitseg does not read (it reads {sorted(CODECS)})")
        name, level = CODECS[number]
        _codecs[number] = pa.Codec(name, compression_level=level)
    return _codecs[number]


def pack(texts: pa.Array) -> bytes:
    """One run's value from a string or binary array of its rows (no nulls)."""
    data, offsets = texts_of(texts)
    start, stop = int(offsets[0]), int(offsets[-1])
    ends = (offsets[1:] - start).astype("<u4").tobytes()
    raw = ends + bytes(memoryview(data)[start:stop])
    return _HEAD.pack(CODEC, len(texts), len(raw)) + codec(CODEC).compress(raw, asbytes=True)


def unpack(value: bytes) -> list[bytes]:
    """The rows of a run's value, in id order."""
    run = _Run(value)
    return [run.row(i) for i in range(len(run))]


class _Run:
    """A run's rows unpacked into one buffer, cut out one at a time."""

    __slots__ = ("raw", "ends", "base")

    def __init__(self, value: bytes) -> None:
        number, n, size = _HEAD.unpack_from(value)
        self.raw = codec(number).decompress(memoryview(value)[_HEAD.size:],
                                            decompressed_size=size, asbytes=True)
        self.ends = np.frombuffer(self.raw, dtype="<u4", count=n)
        self.base = 4 * n

    def __len__(self) -> int:
        return len(self.ends)

    def row(self, i: int) -> bytes:
        start = int(self.ends[i - 1]) if i else 0
        return self.raw[self.base + start:self.base + int(self.ends[i])]


class OrderRows:
    """The order rows of one transaction: looked up, written, deleted, and appended in
    runs. Runs given to `append` are compressed on a helper thread and put in id order;
    every read and write settles them first, so nothing is seen out of order."""

    def __init__(self, store: Store, txn: Txn) -> None:
        self.store, self.txn = store, txn
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []
        self._runs: OrderedDict[int, _Run] = OrderedDict()  # by first id, last used last

    # ---------------------------------------------------------------- one row
    def get(self, oid: int) -> bytes | None:
        """The order's row, None if it has none (never given, or deleted)."""
        self.settle()
        own = self.store.get(self.txn, "orders", ORDER_ROWS + u32(oid))
        if own is not None:
            return None if len(own) == 0 else bytes(own)
        return self._in_run(oid)

    def put(self, oid: int, row: bytes) -> None:
        self.settle()
        self.store.put(self.txn, "orders", ORDER_ROWS + u32(oid), row)

    def delete(self, oid: int) -> None:
        """The order's row is gone: its own key deleted, or marked GONE over a run."""
        self.settle()
        if self._in_run(oid) is None:
            self.store.delete(self.txn, "orders", ORDER_ROWS + u32(oid))
        else:
            self.store.put(self.txn, "orders", ORDER_ROWS + u32(oid), GONE)

    def _in_run(self, oid: int) -> bytes | None:
        """The row a run holds for oid, if one does."""
        cursor = self.txn.cursor(db=self.store.db["orders"])
        key = ORDER_RUNS + u32(oid)
        found = cursor.set_range(key)
        if not (found and cursor.key() == key):
            found = cursor.prev() if found else cursor.last()
        if not found or not cursor.key().startswith(ORDER_RUNS):
            return None
        first = from_u32(cursor.key()[len(ORDER_RUNS):])
        run = self._runs.get(first)
        if run is None:
            run = self._runs[first] = _Run(cursor.value())
            if len(self._runs) > CACHED:
                self._runs.popitem(last=False)
        else:
            self._runs.move_to_end(first)
        return run.row(oid - first) if oid - first < len(run) else None

    # ---------------------------------------------------------------- runs
    def append(self, first: int, rows: Callable[[], pa.Array]) -> None:
        """The rows of new orders first, first + 1, … (past every stored id), made by
        `rows` and packed RUN_ROWS at a time on the helper thread; put by a later call.
        `rows` runs there, so what it reads must not change until then."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="bitseg-order-rows")
        self._put_done(wait=len(self._pending) - PENDING + 1)
        self._pending.append(self._pool.submit(_packed, first, rows))

    def settle(self) -> None:
        """Put every run given to append (waiting for its compression)."""
        self._put_done(wait=len(self._pending))

    def close(self) -> None:
        """Settle, and let the helper thread go."""
        self.settle()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def _put_done(self, wait: int) -> None:
        """Put the oldest `wait` blocks' runs, waiting for them, then any others whose
        compression is done, in order."""
        while self._pending and (wait > 0 or self._pending[0].done()):
            pairs = self._pending.pop(0).result()
            store, txn = self.store, self.txn
            # new ids are past every stored one, and runs are the last key prefix
            if store.put_many(txn, "orders", pairs, append=True) < len(pairs):
                store.put_many(txn, "orders", pairs)
            wait -= 1

    # ---------------------------------------------------------------- every row
    def items(self) -> Iterator[tuple[int, bytes]]:
        """(id, row) of every order with a row, in id order: a row's own key wins over
        its run's copy."""
        self.settle()
        own = ((from_u32(bytes(k[len(ORDER_ROWS):])), bytes(v))
               for k, v in self.store.items(self.txn, "orders", ORDER_ROWS))
        runs = self._run_rows()
        mine, theirs = next(own, None), next(runs, None)
        while mine is not None or theirs is not None:
            if theirs is None or (mine is not None and mine[0] <= theirs[0]):
                if theirs is not None and theirs[0] == mine[0]:
                    theirs = next(runs, None)
                if mine[1]:
                    yield mine
                mine = next(own, None)
            else:
                if theirs[1]:
                    yield theirs
                theirs = next(runs, None)

    def _run_rows(self) -> Iterator[tuple[int, bytes]]:
        for key, value in self.store.items(self.txn, "orders", ORDER_RUNS):
            first = from_u32(bytes(key[len(ORDER_RUNS):]))
            for i, row in enumerate(unpack(bytes(value))):
                yield first + i, row


def _packed(first: int, make: Callable[[], pa.Array]) -> list[tuple[bytes, bytes]]:
    """The (key, value) of each run of the rows `make` gives, RUN_ROWS at a time."""
    rows = make()
    return [(ORDER_RUNS + u32(first + at), pack(rows.slice(at, RUN_ROWS)))
            for at in range(0, len(rows), RUN_ROWS)]
