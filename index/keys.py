"""Every LMDB key layout of a bitseg store: the separator, the numbers, the digest that
stands in for a name too long for a key, each layout's name limit, and the functions
and prefixes that build the keys (store.py opens the databases).

Parts: SEP is U+001F, a control character no field, property or event type name may
hold (types.name_problem), so a name's parts split apart unambiguously; names made as
text (event streams) use SEP_TEXT, the same character. Numbers are big-endian u32, so
keys sort as their numbers do; days and buckets are offset by 2**31 to be unsigned.
"0" below is one zero byte; `json` is orjson's text of a value.

Database   key                                     value
meta       "format", "schema", "version"           JSON (store.py, engine.py)
           "range:" field                          JSON: a range field's slicing parameters
           "value:" digest(json)                   json of a value whose bitmap name is long
           "action:" 12 digits, "action-next"      the audit log (bulk.py)
           "export:" id, "export_next_id"          export schedules (exports.py)
ids        external profile id (UTF-8)             u32 dense id
rids       u32(k)                                  the external ids of dense ids k * 2**16 …
rows       u32(dense id)                           the profile's row (JSON)
bitmaps    name 0 u32(k)                           chunk k (2**18 ids) of a profile bitmap
  names:   "live"                                  the live profiles
           "p" SEP field SEP "x"                   has a value
           "p" SEP field SEP "v" SEP json          equals a keyword / bool value
           "p" SEP field SEP "h" SEP digest(json)  the same, when the "v" name is too long
           "p" SEP field SEP "s" SEP bit           bit slice of a range field
           "p" SEP field SEP "m" SEP mmdd          month-day of a date field
events     "c" kind u32(bucket + 2**31) stream     a stream's count index in a day ("d") or
                                                   month ("m") (event_counts.py)
           "b" type SEP u32(day + 2**31) u32(seq)  part seq of a type's raw rows on a day
           "k" kind name                           the catalog: "d"/"m" + stream: its buckets,
                                                   "t" + type: its (day, parts) (int32s)
           "v-catalog"                             present once the catalog lists everything
  streams: type, or type SEP prop SEP json, or type SEP prop SEP "#" digest(json) when that
           name is too long
orders     "meta"                                  JSON {"count", "items", "item_values"}
           "i" SEP external order id               u32 dense order id
           "r" SEP u32(order id)                   the order's row (JSON) written alone;
                                                   empty: deleted (wins over a run's copy)
           "s" SEP u32(first order id)             a load's run of rows, zstd (order_rows.py)
           "c" SEP column 0 u32(k)                 chunk k (2**16 ids) of a numpy column
           "b" SEP name 0 u32(k)                   chunk k (2**18 ids) of an orders bitmap
           "n" SEP "#" digest(name)                the full name of a digested bitmap name
  columns: "owner", "ts", "item_owner", "o" SEP field (orders), "i" SEP field (items)
  names:   "live"; "x"/"y" SEP field (has a value: orders / items); "v"/"w" SEP field SEP
           json (equals a value: orders / items); "#" digest(name) when a name is too long
segments   "d" 0 name                              the definition (JSON)
           "m" 0 name 0 u32(k)                     chunk k (2**18 ids) of its membership
           "h" 0 name 0 u64(t + 2**63) u32(seq)    a point of its size history

Lengths: an LMDB key is at most MAX_KEY_BYTES. Names (1-200 bytes, types.MAX_NAME_BYTES)
and ids (1-400 bytes, types.MAX_ID_BYTES) always fit; a value's JSON may not, so each
layout that puts values in keys has a name limit, its key's fixed bytes less than
MAX_KEY_BYTES, beyond which digest() stands in for the value. The limits are what
stores were written with: a different one would change which names are digests.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Any

import numpy as np
import orjson

SEP = b"\x1f"
SEP_TEXT = SEP.decode()
_U32 = struct.Struct(">I")

MAX_KEY_BYTES = 511  # LMDB's limit (mdb_env_get_maxkeysize with the default build)
CHUNK_KEY_BYTES = 5  # 0 u32(k): what a chunked value adds to its name
# "bitmaps": name 0 u32(k): every byte left is the name's.
BITMAP_NAME_BYTES = MAX_KEY_BYTES - CHUNK_KEY_BYTES  # 506
# "events": the count key adds "c" kind u32(bucket) (6 bytes) to a stream; 5 more were
# left spare when streams were first digested.
STREAM_NAME_BYTES = MAX_KEY_BYTES - 6 - 5  # 500
# "orders": "b" SEP name 0 u32(k) adds 7 bytes; the first orders store digested names
# past 400 bytes, well within the key.
ORDER_NAME_BYTES = MAX_KEY_BYTES - 7 - 104  # 400


def u32(n: int) -> bytes:
    return _U32.pack(n)


def from_u32(b: bytes) -> int:
    return _U32.unpack(b)[0]


def u32_keys(first: int, count: int) -> list[bytes]:
    """u32() of first, first + 1, …, first + count - 1, made without a Python loop."""
    return np.arange(first, first + count, dtype=">u4").view("V4").tolist()


def digest(data: bytes) -> bytes:
    """What stands in for data too long for a key: BLAKE2b-160, as 40 hex digits."""
    return hashlib.blake2b(data, digest_size=20).hexdigest().encode()


def chunk_key(prefix: bytes, chunk: int) -> bytes:
    """The key of chunk `chunk` of a value stored in chunks under prefix."""
    return prefix + u32(chunk)


# ---------------------------------------------------------------- "bitmaps" (profiles)
def bitmap_prefix(name: bytes) -> bytes:
    """Where the chunks of the profile bitmap `name` are: name 0."""
    return name + b"\x00"


def field_prefix(field: str) -> bytes:
    return b"p" + SEP + field.encode() + SEP


def value_name(field: str, text: bytes) -> bytes:
    """The bitmap name of a field's value (text: its JSON) when it is at most
    BITMAP_NAME_BYTES long; else long_value_name(field, digest(text))."""
    return field_prefix(field) + b"v" + SEP + text


def long_value_name(field: str, hashed: bytes) -> bytes:
    return field_prefix(field) + b"h" + SEP + hashed


def long_value_key(hashed: bytes) -> bytes:
    """The "meta" key holding the JSON of the value digested as `hashed`."""
    return b"value:" + hashed


def exists_name(field: str) -> bytes:
    return field_prefix(field) + b"x"


def slice_name(field: str, bit: int) -> bytes:
    return field_prefix(field) + b"s" + SEP + str(bit).encode()


def monthday_name(field: str, md: int) -> bytes:
    return field_prefix(field) + b"m" + SEP + str(md).encode()


def range_meta_key(field: str) -> str:
    return f"range:{field}"


# ---------------------------------------------------------------- "events"
COUNTS, BLOCKS, CATALOG = b"c", b"b", b"k"  # the prefixes of the three kinds of key
CATALOG_MARK = b"v-catalog"  # present once the catalog lists everything


def stream_key(event: str, prop: str | None = None, value: Any = None) -> str:
    """The stream's name (part of "events" keys): the event type, or type, property and
    value; past STREAM_NAME_BYTES the value is replaced by "#" and its digest."""
    if prop is None:
        return event
    text = orjson.dumps(value).decode()
    name = f"{event}{SEP_TEXT}{prop}{SEP_TEXT}{text}"
    if len(name.encode()) <= STREAM_NAME_BYTES:
        return name
    return f"{event}{SEP_TEXT}{prop}{SEP_TEXT}#{digest(text.encode()).decode()}"


def stream_digested(stream: str) -> bool:
    """Whether a stream's name holds its value's digest, not the value (no JSON text
    starts with "#", and no name holds SEP)."""
    return SEP_TEXT + "#" in stream


def block_key(event: str, day: int, seq: int) -> bytes:
    return BLOCKS + event.encode() + SEP + u32(day + 2**31) + u32(seq)


def block_parts(key: bytes) -> tuple[str, int, int]:
    """(event type, day, seq) of a block_key."""
    return key[1:-9].decode(), from_u32(key[-8:-4]) - 2**31, from_u32(key[-4:])


def count_key(kind: bytes, bucket: int, stream: str) -> bytes:
    return COUNTS + kind + u32(bucket + 2**31) + stream.encode()


def count_parts(key: bytes) -> tuple[bytes, int, str]:
    """(kind, bucket, stream) of a count_key."""
    return key[1:2], from_u32(key[2:6]) - 2**31, key[6:].decode()


def catalog_key(kind: bytes, name: str) -> bytes:
    """b"k" + b"d"/b"m" + stream: the stream's sorted buckets; b"k" + b"t" + event type:
    its (day, parts) pairs. Open reads these few values instead of every bucket's key."""
    return CATALOG + kind + name.encode()


def catalog_parts(key: bytes) -> tuple[bytes, str]:
    """(kind, name) of a catalog_key."""
    return key[1:2], key[2:].decode()


# ---------------------------------------------------------------- "orders"
ORDERS_META = b"meta"
ORDER_IDS, ORDER_ROWS, ORDER_COLUMNS, ORDER_BITMAPS, ORDER_NAMES = (
    b"i" + SEP, b"r" + SEP, b"c" + SEP, b"b" + SEP, b"n" + SEP)
# runs of rows packed and compressed by a load (order_rows.py): the last prefix, so a
# load's new runs are appended
ORDER_RUNS = b"s" + SEP


def order_id_key(external: str) -> bytes:
    return ORDER_IDS + external.encode()


def order_bitmap_prefix(name: bytes) -> bytes:
    """Where the chunks of the orders bitmap `name` are: "b" SEP name 0."""
    return ORDER_BITMAPS + name + b"\x00"


def order_column_prefix(name: bytes) -> bytes:
    return ORDER_COLUMNS + name + b"\x00"


def order_value_name(field: str, value: Any, kind: bytes = b"v") -> bytes:
    """The full name of an orders bitmap of one value (kind "v" orders, "w" items): used
    when at most ORDER_NAME_BYTES long, else order_short_name of it."""
    return kind + SEP + field.encode() + SEP + orjson.dumps(value)


def order_short_name(name: bytes) -> bytes:
    """The name a too-long orders bitmap name is stored under: "#" digest(name)."""
    return b"#" + digest(name)


def order_name_key(short: bytes) -> bytes:
    """The key keeping the full name of the bitmap named `short`."""
    return ORDER_NAMES + short


def order_exists_name(field: str, kind: bytes = b"x") -> bytes:
    return kind + SEP + field.encode()


# ---------------------------------------------------------------- "segments"
_POINT = struct.Struct(">QI")


def segment_key(name: str) -> bytes:
    return b"d\0" + name.encode()


def members_prefix(name: str) -> bytes:
    return b"m\0" + name.encode() + b"\0"


def history_prefix(name: str) -> bytes:
    return b"h\0" + name.encode() + b"\0"


def history_key(name: str, at: int, seq: int) -> bytes:
    return history_prefix(name) + _POINT.pack(at + 2**63, seq)


def history_point(key: bytes, prefix: bytes) -> tuple[int, int]:
    """(as_of, seq) of a history key under prefix."""
    at, seq = _POINT.unpack(key[len(prefix):])
    return at - 2**63, seq
