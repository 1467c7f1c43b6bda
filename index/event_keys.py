"""The names in event records and the values of the "events" catalog (its keys, with
every other key layout, are in keys.py)."""

from __future__ import annotations

import numpy as np

from bitseg.index import types as T

EVENT_KEYS = ("profile", "event", "ts")  # a record's own keys; the rest are properties
ANY = "*"  # the rule's "every type": no event type may be called this
PROP_TYPES = (T.KEYWORD, T.INT, T.FLOAT, T.BOOL)
STREAM_TYPES = (T.KEYWORD, T.BOOL)  # properties whose values get their own streams


def packed(values: list[int]) -> bytes:
    """A catalog value: int32s, little-endian."""
    return np.asarray(values, dtype="<i4").tobytes()


def unpacked(raw: bytes) -> list[int]:
    return np.frombuffer(raw, dtype="<i4").tolist()
