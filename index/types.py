"""Field types: checking input values, their canonical form, inference and display.

Canonical forms (what rows store and indexes see):
keyword -> str, keywords -> sorted tuple of distinct str, bool -> bool, int -> int,
float -> float, date -> days since 1970-01-01 (int), timestamp -> microseconds since
1970-01-01T00:00:00Z (int).  Numbers, dates and timestamps also have an exact integer
"key" for the range index: floats become integer hundred-millionths (see float_key).
"""

from __future__ import annotations

import math
import re
import reprlib
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from fractions import Fraction
from typing import Any

import numpy as np

KEYWORD, KEYWORDS, BOOL, INT, FLOAT, DATE, TIMESTAMP = (
    "keyword", "keywords", "bool", "int", "float", "date", "timestamp",
)
TYPES = (KEYWORD, KEYWORDS, BOOL, INT, FLOAT, DATE, TIMESTAMP)
VALUE_TYPES = frozenset({KEYWORD, KEYWORDS, BOOL})  # one bitmap per value
RANGE_TYPES = frozenset({INT, FLOAT, DATE, TIMESTAMP})  # bit-sliced range index
TIME_TYPES = frozenset({DATE, TIMESTAMP})

FLOAT_DIGITS = 8  # floats keep this many decimal places, exactly (gcd units keep depth low)
FLOAT_SCALE = 10**FLOAT_DIGITS
MAX_NAME_BYTES = 200  # field, property and event type names (they are parts of LMDB keys)
MAX_ID_BYTES = 400  # profile and order ids (LMDB keys are at most 511 bytes)
MAX_VALUE_BYTES = 64 * 1024  # a string value (UTF-8); a profile must fit a gRPC reply


def name_problem(name: Any) -> str | None:
    """Why a field, property or event type name is unusable, or None if it is fine."""
    if not isinstance(name, str) or not name or any(ord(ch) < 32 for ch in name):
        return "must be non-empty and free of control characters"
    if len(name.encode()) > MAX_NAME_BYTES:
        return f"must be at most {MAX_NAME_BYTES} bytes long"
    return None


def id_problem(external: str) -> str | None:
    """Why a (non-empty string) profile or order id is unusable, or None."""
    if len(external.encode()) > MAX_ID_BYTES:
        return f"ids must be at most {MAX_ID_BYTES} bytes long"
    return None


MAX_KEY = 2**62  # |key| bound, so key differences fit a signed 64-bit slice index

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
ONE_US = timedelta(microseconds=1)
US_PER_DAY = 86_400 * 10**6
MIN_DAY = date.min.toordinal() - EPOCH_ORDINAL  # 0001-01-01
MAX_DAY = date.max.toordinal() - EPOCH_ORDINAL  # 9999-12-31
MIN_US = MIN_DAY * US_PER_DAY  # 0001-01-01T00:00:00Z: the earliest instant stored
MAX_US = (MAX_DAY + 1) * US_PER_DAY - 1  # 9999-12-31T23:59:59.999999Z: the latest

_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_TIMESTAMP_RE = re.compile(
    r"^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:?\d{2})?$")


def parse_date(text: str) -> int:
    """'1991-05-02' -> days since the epoch."""
    if not isinstance(text, str) or not _DATE_RE.match(text):
        raise ValueError(f"expected a date YYYY-MM-DD, got {show(text)}")
    return date.fromisoformat(text).toordinal() - EPOCH_ORDINAL


def parse_timestamp(text: str) -> int:
    """An ISO 8601 timestamp (UTC when it has no zone; a bare date is midnight) -> µs."""
    if not isinstance(text, str) or not (_TIMESTAMP_RE.match(text) or _DATE_RE.match(text)):
        raise ValueError(f"expected an ISO 8601 timestamp, got {show(text)}")
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    micros = (moment - EPOCH) // ONE_US  # aware subtraction: no out-of-range datetime
    if not MIN_US <= micros <= MAX_US:
        raise ValueError(f"timestamp {show(text)} is outside the years 0001-9999 in UTC")
    return micros


def format_date(days: int) -> str:
    return date.fromordinal(days + EPOCH_ORDINAL).isoformat()


def format_timestamp(micros: int) -> str:
    """µs -> 'YYYY-MM-DDTHH:MM:SS[.ffffff]Z', four-digit years (strftime gives '1' for 1)."""
    moment = EPOCH + timedelta(microseconds=micros)
    text = (f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}"
            f"T{moment.hour:02d}:{moment.minute:02d}:{moment.second:02d}")
    if moment.microsecond:
        text += f".{moment.microsecond:06d}".rstrip("0")
    return text + "Z"


def float_key(value: float | int) -> int:
    """A float as exact integer hundred-millionths of its shortest decimal text
    (rounded half-even): the fixed scale of event and order values."""
    scaled = Decimal(repr(value)) * FLOAT_SCALE if isinstance(value, float) else value * FLOAT_SCALE
    key = int(scaled.to_integral_value()) if isinstance(scaled, Decimal) else scaled
    if abs(key) >= MAX_KEY:  # event and order values are summed at this fixed scale
        raise ValueError(f"number {value!r} is out of range (|x| < 4.6e10)")
    return key


MORE_DIGITS = 18  # float_digits of a value 17 decimal places do not hold


def float_digits(values: np.ndarray) -> int:
    """The fewest decimal places that represent every float exactly; MORE_DIGITS when 17
    are not enough (2.49e-293, or 1.2345678901234567e-05 with its 21 places): a field
    keeps at most 17, so such a value marks it rounded (RangeWriter.add_floats)."""
    for digits in range(MORE_DIGITS):
        if np.array_equal(np.round(values, digits), values):
            return digits
    return MORE_DIGITS


def float_keys(values: np.ndarray, digits: int) -> np.ndarray:
    """Floats as integers of 10**-digits, rounded half-even from their shortest decimals."""
    scaled = values * 10.0**digits
    keys = np.rint(scaled).astype(np.int64)
    # From decimals where the double product may round otherwise: beyond exact double
    # arithmetic, or within its error of a tie (0.0009325811886973749 at 17 places is
    # 93258118869737.49, whose product is 93258118869737.5: rint made it ...738, where
    # the value, and a rule constant for it, round to ...737).
    near_tie = np.abs(np.abs(scaled - np.trunc(scaled)) - 0.5) <= np.abs(scaled) * 2.0**-50
    slow = np.flatnonzero((np.abs(scaled) >= 2.0**52) | near_tie)
    for i in slow.tolist():
        keys[i] = int(Decimal(repr(float(values[i]))).scaleb(digits).to_integral_value())
    return keys


def exact(value: float | int) -> Fraction:
    """The exact rational a JSON number stands for (0.1 -> 1/10, not the binary double)."""
    return Fraction(Decimal(repr(value))) if isinstance(value, float) else Fraction(value)


def text_problem(value: str) -> str | None:
    """Why a string value is too long to store or ask for, or None if it fits."""
    if len(value) * 4 <= MAX_VALUE_BYTES:  # cheap: no string of this length can exceed
        return None
    size = len(value.encode("utf-8", "surrogatepass"))
    if size <= MAX_VALUE_BYTES:
        return None
    return f"a string value is {size:,} bytes long; at most {MAX_VALUE_BYTES:,} are allowed"


def _keyword(value: Any) -> str:
    if type(value) is str:
        problem = text_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value
    raise ValueError(f"expected a string, got {show(value)}")


def _keywords(value: Any) -> tuple[str, ...]:
    if type(value) is str:
        return (_keyword(value),)
    if isinstance(value, list) and all(type(v) is str for v in value):
        for v in value:
            _keyword(v)
        return tuple(sorted(set(value)))
    raise ValueError(f"expected a list of strings, got {show(value)}")


def _bool(value: Any) -> bool:
    if type(value) is bool:
        return value
    raise ValueError(f"expected true or false, got {show(value)}")


def _int(value: Any) -> int:
    if type(value) is not int:
        if type(value) is not float:
            raise ValueError(f"expected an integer, got {show(value)}")
        if not value.is_integer():
            raise ValueError(f"expected an integer, got {value!r}")
        value = int(value)
    if not -MAX_KEY < value < MAX_KEY:
        raise ValueError(f"integer {value} is out of range (|x| < 2**62)")
    return value


def _float(value: Any) -> float | int:
    if type(value) is not float and type(value) is not int:
        raise ValueError(f"expected a number, got {show(value)}")
    if not math.isfinite(value) or abs(value) >= MAX_KEY:
        raise ValueError(f"number {value!r} is out of range")
    return value


CHECKERS = {KEYWORD: _keyword, KEYWORDS: _keywords, BOOL: _bool, INT: _int, FLOAT: _float,
            DATE: parse_date, TIMESTAMP: parse_timestamp}


def coerce(type_: str, value: Any) -> Any:
    """Check one non-null input value against a type; return its canonical form.

    Raises ValueError with a message saying what was expected.
    """
    checker = CHECKERS.get(type_)
    if checker is None:
        raise ValueError(f"unknown type {type_!r}")
    return checker(value)


def range_key(type_: str, canonical: Any) -> int:
    """The integer the range index keeps for a canonical number, date or timestamp."""
    return float_key(canonical) if type_ == FLOAT else canonical


def infer(value: Any) -> str:
    """The type of a field first seen with this (non-null) value."""
    if isinstance(value, bool):
        return BOOL
    if isinstance(value, int):
        return INT
    if isinstance(value, float):
        return FLOAT
    if isinstance(value, str):
        if _DATE_RE.match(value):
            return DATE
        if _TIMESTAMP_RE.match(value):
            return TIMESTAMP
        return KEYWORD
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return KEYWORDS
    raise ValueError(f"cannot store {show(value)}: expected a string, list of strings, "
                     "number, bool, date or timestamp")


def display(type_: str, canonical: Any) -> Any:
    """A canonical value as a user sees it in JSON output."""
    if type_ == DATE:
        return format_date(canonical)
    if type_ == TIMESTAMP:
        return format_timestamp(canonical)
    if type_ == KEYWORDS:
        return list(canonical)
    return canonical


_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 60  # nested or huge values stay short and finite
_SHORT.maxlevel = 3


def show(value: Any) -> str:
    text = _SHORT.repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
