"""LMDB persistence: the only module that imports lmdb.

Named databases:
  meta     str key -> JSON (format, schema, counters, per-field index parameters)
  ids      external id (utf-8) -> dense id (uint32 big-endian)
  rids     chunk number -> the external ids of that chunk of dense ids (see ids.py)
  rows     dense id -> the profile's current values (JSON, canonical form)
  bitmaps  name \\x00 chunk -> portable roaring bitmap of the ids of that chunk
  segments, events, orders: see keys.py, which lays out every key of every database

A bitmap is split into chunks of 2**CHUNK_BITS ids, so a batch that touches a few
profiles rewrites a few small values, not whole bitmaps; put_chunks is the one writer
of such chunks, in any database. Every write is one LMDB transaction: it commits whole
or not at all, and is durable when write() returns.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import threading
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lmdb
import orjson
from pyroaring import BitMap

from bitseg.index.errors import StoreError, StoreFull
from bitseg.index.keys import bitmap_prefix, u32

# 2: a load packs order rows in compressed runs (order_rows.py), which a bitseg reading
# format 1 would not find. A format 1 store is read as it is (its rows are all keys of
# their own) and marked 2 when opened to write.
FORMAT = 2
READS = (1, 2)
CHUNK_BITS = 18
DATABASES = ("meta", "ids", "rids", "rows", "bitmaps", "segments", "events", "orders")
MAP_SIZE = 1 << 40  # address space only; the file grows as data does
BULK_HEADROOM = 1 << 26  # reserved beyond a bulk load's estimate (LMDB's own pages)
MIB = 1 << 20
FULL_BELOW = 16 * MIB  # an EIO with less than this free is a full disk (see _disk_full)
LOCK_FILE = "writer.lock"  # held (flock) by the one process that writes the store

Txn = Any  # an lmdb.Transaction; callers never import lmdb


def chunk_mask(chunk: int) -> BitMap:
    mask = BitMap()
    mask.add_range(chunk << CHUNK_BITS, (chunk + 1) << CHUNK_BITS)
    return mask


def chunks_of(ids: BitMap) -> set[int]:
    """The chunk numbers that these ids fall in."""
    if not ids:
        return set()
    return {chunk for chunk in range(ids.min() >> CHUNK_BITS, (ids.max() >> CHUNK_BITS) + 1)
            if ids.range_cardinality(chunk << CHUNK_BITS, (chunk + 1) << CHUNK_BITS)}


def take_writer_lock(path: Path) -> int:
    """Take the store's writer lock and write this process's PID into it; the descriptor.

    An flock belongs to the open file: closing it, or the process dying (even by kill -9),
    releases it, so a lock is never left stale. StoreError names the holder when taken."""
    lock_path = path / LOCK_FILE
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise StoreError(f"cannot open {lock_path} to lock the store: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = _holder(fd)
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise StoreError(f"cannot lock {lock_path}: {exc.strerror}") from None
        raise StoreError(f"store {path} is open for writing by another process (PID "
                         f"{holder}); one process writes a store at a time: stop it, or "
                         "load through its server with `bitseg load DATASET --addr A`") \
            from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _holder(fd: int) -> str:
    """The PID written into a lock file, as text ("unknown" when it has none yet)."""
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return text if text.isdigit() else "unknown"


def check_space(path: Path, needed: int) -> None:
    """StoreFull, naming the store and both sizes, unless the file system of path has
    `needed` bytes free: a write through the memory map to a page the disk cannot back
    kills the process with SIGBUS, so a bulk load must not start without the space."""
    free = _free_bytes(path)
    if free < needed:
        raise StoreFull(f"not enough disk space for this bulk load into {path}: it needs "
                        f"{_size(needed)} free, the file system has {_size(free)}; "
                        "nothing was written")


def bulk_space(bulk: int) -> int:
    """The free bytes a bulk load that reserves `bulk` bytes of map checks for: half the
    reserve (a load writes about 1.25x its JSON, the reserve is 4x) and BULK_HEADROOM."""
    return bulk // 2 + BULK_HEADROOM


def _size(n: int) -> str:
    return f"{n / MIB:,.1f} MiB"


class Store:
    """An LMDB environment holding one bitseg store."""

    def __init__(self, path: str | Path, *, readonly: bool = False,
                 bulk: int | None = None) -> None:
        """Open (or create) the store at path.

        bulk: open for a bulk load that may add about this many bytes. LMDB then writes
        straight into its memory map (MDB_WRITEMAP): a transaction of many gigabytes is
        held by the kernel's page cache, not in this process's memory. The map, and with
        it the file's apparent (sparse) size, is what is there plus `bulk`; a load that
        outgrows it fails whole with StoreError, changing nothing."""
        self.path = Path(path)
        self.readonly = readonly  # a reader beside the one writer: takes no lock, writes nothing
        if self.path.exists() and not self.path.is_dir():
            raise StoreError(f"{self.path} is a file, not a store directory")
        if self.path.is_dir() and not (self.path / "data.mdb").exists() \
                and any(p.name != LOCK_FILE for p in self.path.iterdir()):
            raise StoreError(f"{self.path} is not empty and holds no bitseg store")
        if readonly and not (self.path / "data.mdb").exists():
            raise StoreError(f"no bitseg store at {self.path}")
        created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock: int | None = None
        try:
            if not readonly:
                self._lock = take_writer_lock(self.path)
            self._open_env(readonly, bulk)
        except BaseException:
            self._release_lock()
            if created:  # a store that failed to come into being leaves no trace
                shutil.rmtree(self.path, ignore_errors=True)
            raise
        self._check_format()

    def _open_env(self, readonly: bool, bulk: int | None) -> None:
        map_size, writemap = MAP_SIZE, False
        if bulk is not None and not readonly:
            data = self.path / "data.mdb"
            used = data.stat().st_blocks * 512 if data.exists() else 0  # not the sparse size
            map_size, writemap = -(-(used + bulk + BULK_HEADROOM) // MIB) * MIB, True
            # The map reserves four times the input as address space; what a load really
            # writes is measured at about 1.25x its JSON (the 1M bench store), so half the
            # reserve must be free. Asking for all of it refused a 10M load (68 GB of 52 free).
            check_space(self.path, bulk_space(bulk))
        self.bulk = writemap
        try:
            self.env = lmdb.open(str(self.path), map_size=map_size, max_dbs=len(DATABASES),
                                 readonly=readonly, readahead=False, max_readers=1024,
                                 writemap=writemap)
        except lmdb.Error as exc:
            raise StoreError(f"cannot open store at {self.path}: {exc}") from None
        self.db = {name: self.env.open_db(name.encode(), create=not readonly)
                   for name in DATABASES}

    def _release_lock(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # closing the descriptor drops its flock
            self._lock = None

    def _check_format(self) -> None:
        with self.read() as txn:
            fmt = self.get_json(txn, "format")
        if fmt not in (None, *READS):
            raise StoreError(f"{self.path}: store format {fmt}, this bitseg reads "
                             f"{' and '.join(map(str, READS))}")
        if fmt != FORMAT and not self.readonly:
            with self.write() as txn:
                self.put_json(txn, "format", FORMAT)

    def close(self) -> None:
        self.env.close()
        self._release_lock()

    def used_bytes(self) -> int:
        """Bytes of data.mdb that hold pages (up to LMDB's last used page): not the map's
        reserve, which a bulk load leaves as a sparse tail."""
        return (self.env.info()["last_pgno"] + 1) * self.env.stat()["psize"]

    def reader(self) -> SnapshotReader:
        """A reader pinned to what is committed now: later commits do not show through it."""
        return SnapshotReader(self)

    @contextmanager
    def write(self) -> Iterator[Txn]:
        """One atomic, durable transaction: commits on success, aborts on any exception."""
        if self.readonly:
            raise StoreError(f"{self.path} was opened read-only; nothing was written")
        try:
            with self.env.begin(write=True) as txn:
                yield txn
        except lmdb.MapFullError:
            raise StoreFull(f"{self.path}: the batch outgrew the space this bulk load "
                            "reserved, and was not applied; load it again (the reserve "
                            "is computed from the input's size) or split the input") from None
        except lmdb.Error as exc:
            free = _free_bytes(self.path)
            if not _disk_full(exc, free):
                raise
            raise StoreFull(f"store is full: the file system of {self.path} has "
                            f"{_size(free)} free; the write was not applied") from None

    @contextmanager
    def read(self) -> Iterator[Txn]:
        with self.env.begin() as txn:
            yield txn

    # ---------------------------------------------------------------- key/value helpers
    def get(self, txn: Txn, db: str, key: bytes) -> bytes | None:
        return txn.get(key, db=self.db[db])

    def put(self, txn: Txn, db: str, key: bytes, value: bytes) -> None:
        txn.put(key, value, db=self.db[db])

    def delete(self, txn: Txn, db: str, key: bytes) -> None:
        txn.delete(key, db=self.db[db])

    def put_many(self, txn: Txn, db: str, items: Iterable[tuple[bytes, bytes]], *,
                 append: bool = False, overwrite: bool = False) -> int:
        """Put many new entries in one call (the loop runs in C); how many were added.
        An entry whose key is there already is left as it is and not counted (replaced,
        still not counted, with overwrite=True).

        append: the keys are ascending and past every key already there (new dense ids),
        which LMDB writes without searching; a key that is not is refused, not written."""
        return txn.cursor(db=self.db[db]).putmulti(items, overwrite=overwrite,
                                                   append=append)[1]

    def present(self, txn: Txn, db: str, keys: list[bytes]) -> list[bytes]:
        """Those of these keys that are in the database (looked up in one call)."""
        return [key for key, _ in self.present_items(txn, db, keys)]

    def present_items(self, txn: Txn, db: str, keys: list[bytes]) -> list[tuple[bytes, bytes]]:
        """(key, value) of those of these keys that are in the database, in one call."""
        return txn.cursor(db=self.db[db]).getmulti(keys)

    def items(self, txn: Txn, db: str, prefix: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        cursor = txn.cursor(db=self.db[db])
        if not cursor.set_range(prefix):
            return
        for key, value in cursor:
            if not key.startswith(prefix):
                return
            yield key, value

    def keys(self, txn: Txn, db: str, prefix: bytes = b"") -> Iterator[bytes]:
        cursor = txn.cursor(db=self.db[db])
        if not cursor.set_range(prefix):
            return
        for key in cursor.iternext(keys=True, values=False):
            if not key.startswith(prefix):
                return
            yield key

    def get_json(self, txn: Txn, key: str) -> Any:
        raw = txn.get(key.encode(), db=self.db["meta"])
        return None if raw is None else orjson.loads(raw)

    def put_json(self, txn: Txn, key: str, value: Any) -> None:
        txn.put(key.encode(), orjson.dumps(value), db=self.db["meta"])

    # ---------------------------------------------------------------- bitmaps
    def put_chunks(self, txn: Txn, db: str, prefix: bytes, bitmap: BitMap,
                   chunks: Iterable[int] | None) -> None:
        """Persist the given chunks of a bitmap in db, chunk k (ids k * 2**CHUNK_BITS and
        on, portable roaring, run-optimized) under prefix + u32(k); a chunk without ids is
        deleted. None: all of it, replacing whatever was under prefix."""
        handle = self.db[db]
        if chunks is None:
            self.delete_prefix(txn, db, prefix)
            chunks = chunks_of(bitmap)
        for chunk in chunks:
            part = bitmap & chunk_mask(chunk)
            key = prefix + u32(chunk)
            if part:
                part.run_optimize()
                txn.put(key, part.serialize(), db=handle)
            else:
                txn.delete(key, db=handle)

    def put_bitmap(self, txn: Txn, name: bytes, bitmap: BitMap,
                   chunks: Iterable[int] | None) -> None:
        """put_chunks for the profile bitmap `name` in "bitmaps"."""
        self.put_chunks(txn, "bitmaps", bitmap_prefix(name), bitmap, chunks)

    def delete_prefix(self, txn: Txn, db: str, prefix: bytes) -> None:
        """Delete every entry of db whose key starts with prefix."""
        cursor = txn.cursor(db=self.db[db])
        if not cursor.set_range(prefix):
            return
        while cursor.key().startswith(prefix):
            if not cursor.delete():
                return

    def delete_bitmaps(self, txn: Txn, prefix: bytes) -> None:
        """Delete every chunk in "bitmaps" whose key starts with prefix."""
        self.delete_prefix(txn, "bitmaps", prefix)

    def load_bitmaps(self, txn: Txn) -> dict[bytes, BitMap]:
        """Every stored bitmap by name, its chunks joined."""
        parts: dict[bytes, list[BitMap]] = {}
        for key, value in txn.cursor(db=self.db["bitmaps"]):
            parts.setdefault(bytes(key[:-5]), []).append(BitMap.deserialize(value))
        return {name: BitMap.union(*chunks) for name, chunks in parts.items()}



class TxnReader:
    """Reads through a transaction in progress (it sees that transaction's own writes)."""

    committed = False

    def __init__(self, store: Store, txn: Txn) -> None:
        self._store, self._txn = store, txn

    def get(self, db: str, key: bytes) -> bytes | None:
        raw = self._txn.get(key, db=self._store.db[db])
        return None if raw is None else bytes(raw)


class SnapshotReader:
    """A read transaction held open for one published version, so that data read lazily
    (event buckets and blocks) is exactly that version's even after later commits.

    LMDB keeps the pages of that version while the transaction lives; it ends when the
    reader is garbage-collected (the next version's snapshot replaces it) or the store
    closes. A lock makes one transaction safe to share between reading threads.
    """

    committed = True

    def __init__(self, store: Store) -> None:
        self._store = store
        self._txn = store.env.begin()
        self._lock = threading.Lock()
        weakref.finalize(self, _abort, self._txn)

    def get(self, db: str, key: bytes) -> bytes | None:
        with self._lock:
            try:
                raw = self._txn.get(key, db=self._store.db[db])
            except lmdb.Error as exc:
                raise StoreError(f"{self._store.path}: {exc}") from None
        return None if raw is None else bytes(raw)

    def items(self, db: str, prefix: bytes, batch: int = 256
              ) -> Iterator[tuple[bytes, bytes]]:
        """(key, value) of every entry under prefix, in key order, as of this version.
        The lock is held a batch at a time, so a long scan (a field read on first use)
        does not hold up other readers' lookups."""
        after: bytes | None = None
        while True:
            rows: list[tuple[bytes, bytes]] = []
            with self._lock:
                cursor = self._txn.cursor(db=self._store.db[db])
                found = cursor.set_range(after if after is not None else prefix)
                if found and after is not None and cursor.key() == after:
                    found = cursor.next()
                while found and len(rows) < batch:
                    key = bytes(cursor.key())
                    if not key.startswith(prefix):
                        break
                    rows.append((key, bytes(cursor.value())))
                    found = cursor.next()
            yield from rows
            if len(rows) < batch:
                return
            after = rows[-1][0]

    def key_at(self, db: str, key: bytes) -> bytes | None:
        """The first key at or after key (None past the last): names under a prefix are
        found by skipping from one to the next without reading their values."""
        with self._lock:
            cursor = self._txn.cursor(db=self._store.db[db])
            return bytes(cursor.key()) if cursor.set_range(key) else None


def _disk_full(exc: Exception, free: int) -> bool:
    """Whether an lmdb error comes of a full disk. LMDB reports a short write, which is
    what a full disk gives, as EIO: taken for a full disk when hardly any space is left
    after it (the failed write took what there was)."""
    text = str(exc)
    if os.strerror(errno.ENOSPC) in text:
        return True
    return os.strerror(errno.EIO) in text and free < FULL_BELOW


def _free_bytes(path: Path) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def _abort(txn: Txn) -> None:
    try:
        txn.abort()
    except lmdb.Error:  # the environment closed first, taking the transaction with it
        pass
