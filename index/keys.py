"""What every LMDB key layout shares: the separator between the parts of a name, and
the big-endian u32 that dense ids and chunk numbers are written as.

SEP (U+001F, the unit separator) is a control character, which no field, property or
event type name may hold (types.name_problem), so a key's parts split apart
unambiguously. Keys are bytes; names made as text (event streams) use SEP_TEXT, the
same character. A u32 is big-endian so that keys sort as their numbers do.
"""

from __future__ import annotations

import struct

import numpy as np

SEP = b"\x1f"
SEP_TEXT = SEP.decode()
_U32 = struct.Struct(">I")


def u32(n: int) -> bytes:
    return _U32.pack(n)


def from_u32(b: bytes) -> int:
    return _U32.unpack(b)[0]


def u32_keys(first: int, count: int) -> list[bytes]:
    """u32() of first, first + 1, …, first + count - 1, made without a Python loop."""
    return np.arange(first, first + count, dtype=">u4").view("V4").tolist()
