"""Random samples and control groups (CONTRACT §2.4d): a profile's bucket under a salt.

    bucket = int.from_bytes(blake2b((salt + "\\x1f" + id).encode(), digest_size=8)
                            .digest(), "big") % 10000

over the external id, so every server and shard agrees.  A sample rule keeps the
buckets [lo, hi).  Buckets never change: a dense id names one external id forever (ids
are append-only, never reused), so each salt's bucket column is hashed once per id and
only extended as ids are added; the bitmap of a bucket range is then one numpy pass.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Any

import numpy as np
from pyroaring import BitMap

from bitseg.index import types as T
from bitseg.index.errors import BitsegError, RuleError
from bitseg.index.fields import EMPTY, bitmap_of
from bitseg.index.ids import ID_CHUNK, ID_CHUNK_BITS, IdMap

BUCKETS = 10_000  # one bucket is 0.01 %
SALT_SEP = b"\x1f"
MAX_RANGES = 64  # (salt, lo, hi) bitmaps kept
MAX_SALTS = 16  # bucket columns kept (2 bytes a profile each)


@dataclass(frozen=True, slots=True)
class Sample:
    """The profiles whose bucket under `salt` is in [lo, hi) (bucket numbers, 0-10000)."""

    salt: str
    lo: int
    hi: int


def bucket(salt: str, external: str) -> int:
    """The contract's bucket of one profile id under one salt."""
    data = (salt + "\x1f" + external).encode("utf-8")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big") % BUCKETS


def buckets_of(salt: str, names: list[bytes]) -> np.ndarray:
    """The buckets (uint16) of many utf-8 ids: one hash each, the modulo vectorised."""
    prefix = salt.encode("utf-8") + SALT_SEP
    blake = hashlib.blake2b
    digests = b"".join(blake(prefix + name, digest_size=8).digest() for name in names)
    return (np.frombuffer(digests, dtype=">u8") % BUCKETS).astype(np.uint16)


# ---------------------------------------------------------------------- parsing
def parse_sample(obj: dict, path: str) -> Sample:
    """{"sample": {"salt": S, "percent": P}} or {"sample": {"salt": S, "from": F, "to": G}}."""
    extra = sorted(set(obj) - {"sample"})
    if extra:
        raise RuleError(f"{path}.{extra[0]}", f"unexpected key {extra[0]!r} (expected only "
                        "sample)")
    spec, here = obj["sample"], f"{path}.sample"
    if not isinstance(spec, dict):
        raise RuleError(here, 'expected {"salt": S, "percent": P} or '
                        '{"salt": S, "from": F, "to": G}')
    allowed = {"salt", "percent", "from", "to"}
    extra = sorted(set(spec) - allowed)
    if extra:
        raise RuleError(f"{here}.{extra[0]}", f"unexpected key {extra[0]!r} (expected salt "
                        "with percent, or salt with from and to)")
    if "salt" not in spec:
        raise RuleError(f"{here}.salt", "a sample needs a salt (a string)")
    salt = spec["salt"]
    if not isinstance(salt, str):
        raise RuleError(f"{here}.salt", f"expected a string, got {_kind(salt)}")
    problem = T.text_problem(salt)
    if problem is not None:
        raise RuleError(f"{here}.salt", problem)
    if "percent" in spec:
        for key in ("from", "to"):
            if key in spec:
                raise RuleError(f"{here}.{key}", f"percent and {key} do not go together "
                                "(percent P is from 0 to P)")
        return Sample(salt, 0, _percent(spec["percent"], f"{here}.percent"))
    for key in ("from", "to"):
        if key not in spec:
            raise RuleError(f"{here}.{key}", 'expected "percent", or both "from" and "to"')
    lo = _percent(spec["from"], f"{here}.from")
    hi = _percent(spec["to"], f"{here}.to")
    if lo > hi:
        raise RuleError(here, "expected from <= to")
    return Sample(salt, lo, hi)


def _percent(value: Any, path: str) -> int:
    """A percentage 0-100 with at most 2 decimals (by value: 10.50 is 10.5), in buckets."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RuleError(path, f"expected a percentage from 0 to 100, got {_kind(value)}")
    if value != value or not 0 <= value <= 100:
        raise RuleError(path, f"expected a percentage from 0 to 100, got {value!r}")
    buckets = Fraction(Decimal(repr(value))) * 100 if isinstance(value, float) \
        else Fraction(value) * 100
    if buckets.denominator != 1:
        raise RuleError(path, f"expected at most 2 decimals, got {value!r}")
    return int(buckets)


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return f"number {value!r}"
    if isinstance(value, str):
        return "a string"
    return "a list" if isinstance(value, list) else "an object"


# ---------------------------------------------------------------------- words
def sample_words(obj: dict, negated: bool = False) -> str:
    """A sample node as a clause: "whose bucket under salt 'spring' is in 0-10 %"."""
    spec = obj["sample"]
    if "percent" in spec:
        span = f"the first {_number(spec['percent'])} %"
    else:
        span = f"{_number(spec['from'])}-{_number(spec['to'])} %"
    where = "outside" if negated else "in"
    return f"{where} {span} of the sample with salt {_quoted(spec['salt'])}"


def _number(value: Any) -> str:
    return repr(int(value)) if float(value).is_integer() else repr(value)


def _quoted(text: str) -> str:
    return "'" + text.replace("'", "\\'") + "'"


# ---------------------------------------------------------------------- evaluation
class Buckets:
    """Bucket columns per salt and sample bitmaps per (salt, lo, hi), shared by every
    snapshot of one engine (a bucket never changes).  `names` gives the current id map,
    which covers every id of every published snapshot.  Thread-safe: the lock is held
    only to read and swap entries; hashing happens outside it."""

    def __init__(self, names: Callable[[], IdMap] | None = None) -> None:
        self._names = names
        self._lock = threading.Lock()
        self._columns: OrderedDict[str, np.ndarray] = OrderedDict()
        self._ranges: OrderedDict[tuple[str, int, int], tuple[int, BitMap, Any, BitMap]] = \
            OrderedDict()

    def _ids(self) -> IdMap:
        if self._names is None:
            raise BitsegError("sample rules need the id map of an engine")
        return self._names()

    def contains(self, sample: Sample, dense: int) -> bool:
        """One profile: one hash, no column."""
        return sample.lo <= bucket(sample.salt, self._ids().external(dense)) < sample.hi

    def column(self, salt: str, upto: int) -> np.ndarray:
        """The buckets of dense ids 0 … upto - 1 (at least), hashing only ids not seen."""
        with self._lock:
            have = self._columns.get(salt)
            if have is not None:
                self._columns.move_to_end(salt)
        if have is not None and len(have) >= upto:
            return have
        start = 0 if have is None else len(have)
        ids = self._ids()
        parts = [] if have is None else [have]
        for number in range(start >> ID_CHUNK_BITS, (upto + ID_CHUNK - 1) >> ID_CHUNK_BITS):
            names = ids.chunks[number].names()
            skip = max(start - (number << ID_CHUNK_BITS), 0)
            parts.append(buckets_of(salt, names[skip:]))
        grown = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)
        with self._lock:
            current = self._columns.get(salt)
            if current is None or len(current) < len(grown):
                self._columns[salt] = grown
                while len(self._columns) > MAX_SALTS:
                    self._columns.popitem(last=False)
        return grown

    def bitmap(self, sample: Sample, live: BitMap) -> BitMap:
        """The live profiles in the sample (owned by the cache: never mutate it)."""
        if sample.lo >= sample.hi or not live:
            return EMPTY
        if sample.lo == 0 and sample.hi == BUCKETS:
            return live
        upto = live.max() + 1
        key = (sample.salt, sample.lo, sample.hi)
        with self._lock:
            entry = self._ranges.get(key)
            if entry is not None:
                self._ranges.move_to_end(key)
        if entry is not None and entry[2] is live:
            return entry[3]
        if entry is not None and entry[0] >= upto:
            covered, every = entry[0], entry[1]
        else:
            start, every = (0, EMPTY) if entry is None else (entry[0], entry[1])
            column = self.column(sample.salt, upto)
            tail = column[start:]
            hits = np.flatnonzero((tail >= sample.lo) & (tail < sample.hi)) + start
            every = every | bitmap_of(hits)
            covered = len(column)
        found = every & live
        with self._lock:
            self._ranges[key] = (covered, every, live, found)
            while len(self._ranges) > MAX_RANGES:
                self._ranges.popitem(last=False)
        return found
