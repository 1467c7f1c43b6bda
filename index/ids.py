"""The id dictionary: external string ids <-> dense uint32 ids.

external -> dense is an LMDB lookup (the ids database), so 10M profiles cost no Python
objects.  dense -> external, which Members needs by the million, is in memory as
chunks of 2**16 ids, each one blob of utf-8 plus a numpy offsets array (Arrow-like),
persisted one LMDB value per chunk.  Dense ids are assigned in order and never reused.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bitseg.index.keys import MAX_KEY_BYTES, from_u32, u32, u32_keys
from bitseg.index.store import Store, Txn

ID_CHUNK_BITS = 16
ID_CHUNK = 1 << ID_CHUNK_BITS
MAX_IDS = 2**32 - 1


@dataclass(frozen=True, slots=True)
class IdChunk:
    offsets: np.ndarray  # uint64, len n + 1
    blob: bytes

    @property
    def size(self) -> int:
        return len(self.offsets) - 1

    def name(self, i: int) -> str:
        return self.blob[self.offsets[i]:self.offsets[i + 1]].decode()

    def names(self) -> list[bytes]:
        bounds = self.offsets.tolist()
        return [self.blob[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    @classmethod
    def of(cls, names: Sequence[bytes]) -> IdChunk:
        lengths = np.fromiter(map(len, names), dtype=np.uint64, count=len(names))
        offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.uint64)
        return cls(offsets, b"".join(names))

    def encode(self) -> bytes:
        return u32(self.size) + self.offsets.astype("<u8").tobytes() + self.blob

    @classmethod
    def decode(cls, raw: bytes) -> IdChunk:
        n = from_u32(raw[:4])
        end = 4 + 8 * (n + 1)
        return cls(np.frombuffer(raw[4:end], dtype="<u8").astype(np.uint64), bytes(raw[end:]))


class IdChunks(Sequence[IdChunk]):
    """The chunks of an IdMap, each decoded from the store the first time it is used.
    Every chunk but the last holds ID_CHUNK ids and never changes once written (dense
    ids are never reused), so an unread one reads the same through any transaction;
    the last, which later batches rewrite, is always read (or made) already."""

    def __init__(self, store: Store, entries: list[IdChunk | None]) -> None:
        self.store, self._entries = store, entries
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, number: int) -> IdChunk:  # type: ignore[override]
        chunk = self._entries[number]
        if chunk is None:
            with self._lock:
                chunk = self._entries[number]
                if chunk is None:
                    with self.store.read() as txn:
                        raw = self.store.get(txn, "rids", u32(number % len(self._entries)))
                    chunk = self._entries[number] = IdChunk.decode(raw)
        return chunk

    def entries(self) -> list[IdChunk | None]:
        """The chunks read so far (None: not yet), for the next IdMap to share."""
        return list(self._entries)


class IdMap:
    """Immutable once published; a batch's IdWriter makes the next one."""

    def __init__(self, store: Store, chunks: Sequence[IdChunk] = ()) -> None:
        self.store = store
        self.chunks = chunks if isinstance(chunks, IdChunks) else IdChunks(store, list(chunks))
        last = self.chunks[-1] if len(self.chunks) else None  # the others are full
        self.count = 0 if last is None else (len(self.chunks) - 1) * ID_CHUNK + last.size

    @classmethod
    def load(cls, store: Store, txn: Txn) -> IdMap:
        """The map of the store: its chunks are counted now and read when first used."""
        entries: list[IdChunk | None] = [None] * sum(1 for _ in store.keys(txn, "rids"))
        if entries:
            entries[-1] = IdChunk.decode(store.get(txn, "rids", u32(len(entries) - 1)))
        return cls(store, IdChunks(store, entries))

    def lookup(self, external: str, reader: Any = None) -> int | None:
        """The dense id of an external id, or None if it was never seen (read through a
        snapshot's reader, or else a read transaction of its own)."""
        if reader is not None:
            raw = reader.get("ids", external.encode()) if external else None
        else:
            with self.store.read() as txn:
                raw = self.store.get(txn, "ids", external.encode())
        return None if raw is None else from_u32(raw)

    def lookup_many(self, externals: Sequence[str], reader: Any) -> np.ndarray:
        """The dense id of each external id (int64; -1 for an id never seen, and for ids
        no profile could have: empty or too long), read through a snapshot's reader in
        key order: neighbouring keys share LMDB pages, so a batch of random ids reads
        fewer pages cold to the CPU (10,000 of 10M ids: ~49 ms in request order, ~39 ms
        sorted)."""
        keys = [external.encode() for external in externals]
        out = np.full(len(keys), -1, dtype=np.int64)
        get = reader.get
        for i in sorted(range(len(keys)), key=keys.__getitem__):
            key = keys[i]
            raw = get("ids", key) if 0 < len(key) <= MAX_KEY_BYTES else None
            if raw is not None:
                out[i] = from_u32(raw)
        return out

    def external(self, dense: int) -> str:
        return self.chunks[dense >> ID_CHUNK_BITS].name(dense & (ID_CHUNK - 1))

    def externals(self, dense: np.ndarray) -> list[str]:
        """External ids of many dense ids (sorted ascending), chunk by chunk."""
        out: list[str] = []
        if len(dense) == 0:
            return out
        dense = dense.astype(np.int64, copy=False)
        which = dense >> ID_CHUNK_BITS
        cuts = np.flatnonzero(np.diff(which)) + 1
        for part in np.split(dense, cuts):
            chunk = self.chunks[int(part[0]) >> ID_CHUNK_BITS]
            local = part & (ID_CHUNK - 1)
            starts = chunk.offsets[local].tolist()
            ends = chunk.offsets[local + 1].tolist()
            blob = chunk.blob
            out.extend(blob[a:b].decode() for a, b in zip(starts, ends, strict=True))
        return out

    def writer(self, txn: Txn) -> IdWriter:
        return IdWriter(self, txn)


class IdWriter:
    """Resolves and assigns ids inside one write transaction."""

    def __init__(self, ids: IdMap, txn: Txn) -> None:
        self.ids = ids
        self.txn = txn
        self.first_new = ids.count
        self.next = ids.count
        self.new_names: list[bytes] = []

    def resolve(self, external: str) -> int:
        """The dense id of an external id, assigning the next one if it is new."""
        raw = external.encode()
        got = self.ids.store.get(self.txn, "ids", raw)
        if got is not None:
            return from_u32(got)
        if self.next >= MAX_IDS:
            raise OverflowError("the store holds 2**32 - 1 profiles, its limit")
        dense = self.next
        self.next += 1
        self.ids.store.put(self.txn, "ids", raw, u32(dense))
        self.new_names.append(raw)
        return dense

    def assign(self, names: list[bytes]) -> int | None:
        """Give these external ids (utf-8) the next dense ids in order, in one write; the
        first of them.  None, assigning nothing, when one is in the map already or given
        twice (the write is tried first and undone then: new ids are the common case)."""
        first = self.next
        if first + len(names) > MAX_IDS:
            raise OverflowError("the store holds 2**32 - 1 profiles, its limit")
        dense = u32_keys(first, len(names))
        store = self.ids.store
        if store.put_many(self.txn, "ids", zip(names, dense, strict=True)) != len(names):
            for name, mine in zip(names, dense, strict=True):
                if store.get(self.txn, "ids", name) == mine:
                    store.delete(self.txn, "ids", name)
            return None
        self.next += len(names)
        self.new_names.extend(names)
        return first

    def known(self, externals: list[str]) -> list[int | None]:
        """The dense ids of external ids already in the map (None for the others, and for
        ids no profile could have: empty or too long); nothing is assigned."""
        get, db = self.txn.get, self.ids.store.db["ids"]
        out: list[int | None] = []
        for external in externals:
            raw = external.encode()
            found = get(raw, db=db) if 0 < len(raw) <= MAX_KEY_BYTES else None
            out.append(None if found is None else from_u32(found))
        return out

    def finish(self) -> IdMap:
        """Persist the new names' chunks; the IdMap to publish after commit."""
        if not self.new_names:
            return self.ids
        chunks = self.ids.chunks.entries()  # the last is read; the others may not be
        pending = self.new_names
        last = chunks[-1] if chunks else None
        if last is not None and last.size < ID_CHUNK:
            chunks.pop()
            pending = last.names() + pending
        store = self.ids.store
        fresh = [IdChunk.of(pending[start:start + ID_CHUNK])
                 for start in range(0, len(pending), ID_CHUNK)]
        for number, chunk in enumerate(fresh, len(chunks)):
            store.put(self.txn, "rids", u32(number), chunk.encode())
        return IdMap(store, IdChunks(store, [*chunks, *fresh]))

