"""The names of event records and streams, and the LMDB keys of the "events" database.

Keys (every number big-endian u32, days and months offset by 2**31 so they sort):
- b"c" + kind + bucket + stream: a stream's count index in one day (kind b"d") or
  calendar month (b"m"), as event_counts.encode_counts;
- b"b" + type + SEP + day + seq: part `seq` of the raw rows of a type on a day
  (event_index.Block.encode);
- b"k" + kind + name: the catalog, b"d"/b"m" + stream: its sorted buckets, b"t" + type:
  its (day, parts) pairs, as `packed` int32s; CATALOG_MARK once it lists everything.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import orjson

from bitseg.index import types as T
from bitseg.index.keys import SEP, SEP_TEXT, u32

EVENT_KEYS = ("profile", "event", "ts")  # a record's own keys; the rest are properties
ANY = "*"  # the rule's "every type": no event type may be called this
PROP_TYPES = (T.KEYWORD, T.INT, T.FLOAT, T.BOOL)
STREAM_TYPES = (T.KEYWORD, T.BOOL)  # properties whose values get their own streams
MAX_STREAM_BYTES = 500  # a longer stream name has its value replaced by a digest (LMDB
# keys are at most 511 bytes: the count and catalog keys add 6 and 2 to the name)
CATALOG_MARK = b"v-catalog"  # present once the catalog lists everything


def stream_key(event: str, prop: str | None = None, value: Any = None) -> str:
    """The stream's name (part of LMDB keys: in a name too long for them, the value is
    replaced by its digest; names that fit are what they always were)."""
    if prop is None:
        return event
    text = orjson.dumps(value).decode()
    name = f"{event}{SEP_TEXT}{prop}{SEP_TEXT}{text}"
    if len(name.encode()) <= MAX_STREAM_BYTES:
        return name
    digest = hashlib.blake2b(text.encode(), digest_size=20).hexdigest()
    return f"{event}{SEP_TEXT}{prop}{SEP_TEXT}#{digest}"


def block_key(event: str, day: int, seq: int) -> bytes:
    return b"b" + event.encode() + SEP + u32(day + 2**31) + u32(seq)


def count_key(kind: bytes, bucket: int, stream: str) -> bytes:
    return b"c" + kind + u32(bucket + 2**31) + stream.encode()


def catalog_key(kind: bytes, name: str) -> bytes:
    """b"k" + b"d"/b"m" + stream: the stream's sorted buckets; b"k" + b"t" + event type:
    its (day, parts) pairs. Open reads these few values instead of every bucket's key."""
    return b"k" + kind + name.encode()


def packed(values: list[int]) -> bytes:
    """A catalog value: int32s, little-endian."""
    return np.asarray(values, dtype="<i4").tobytes()


def unpacked(raw: bytes) -> list[int]:
    return np.frombuffer(raw, dtype="<i4").tolist()
