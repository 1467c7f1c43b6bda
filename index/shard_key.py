"""Which shard a profile lives on: a stable hash of its external id.

A profile's shard is

    int.from_bytes(blake2b(ID.encode("utf-8"), digest_size=8).digest(), "big") % N

with ID the id's canonical string form (an integer id is its decimal string, as the
loaders take it: CONTRACT §1), so `42` and `"42"` land on the same shard. The function
never changes: a store split into N shards is read back with the same N (the manifest
says which N and which hash, see server/shards.py).
"""

from __future__ import annotations

from hashlib import blake2b
from typing import Any

from bitseg.index.errors import DataError

HASH_NAME = "blake2b-64-mod"  # written in a sharded store's manifest


def canonical_id(external: Any, field: str = "id") -> str:
    """The string form of a profile id as the loaders take it; DataError otherwise."""
    if isinstance(external, int) and not isinstance(external, bool):
        return str(external)
    if not isinstance(external, str) or not external:
        raise DataError("expected a non-empty string or integer id", field=field)
    return external


def shard_of(external: Any, shards: int) -> int:
    """The shard (0 .. shards-1) of the profile with this external id."""
    if shards < 1:
        raise ValueError(f"shards: expected at least 1, got {shards}")
    if shards == 1:
        return 0
    return shard_of_bytes(canonical_id(external).encode("utf-8"), shards)


def shard_of_bytes(raw: bytes, shards: int) -> int:
    """The shard of the id whose canonical form, UTF-8 encoded, is `raw` (the hash
    itself, for a caller that has checked and encoded the id already)."""
    return int.from_bytes(blake2b(raw, digest_size=8).digest(), "big") % shards
