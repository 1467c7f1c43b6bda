"""The orders bulk path's vectorised pieces (index/order_blocks.py) against plain Python:
the fixed-width time reader against re + datetime, and the float texts against orjson's
text of each float."""

from __future__ import annotations

import re
from datetime import datetime, timezone

import numpy as np
import orjson
import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from bitseg.index import order_blocks
from bitseg.index import types as T

_FORM = re.compile(r"(\d{4})-(\d{2})-(\d{2})(?:T(\d{2}):(\d{2}):(\d{2})Z)?", re.ASCII)
EDGES = ["2024-02-29", "2023-02-29", "1900-02-29", "2000-02-29", "0000-01-01", "0001-01-01",
         "9999-12-31", "9999-12-31T23:59:59Z", "0001-01-01T00:00:00Z", "2024-04-31",
         "2024-13-01", "2024-00-10", "2024-01-00", "2024-01-32", "2024-06-30T24:00:00Z",
         "2024-06-30T23:60:00Z", "2024-06-30T23:59:60Z", "2024-06-30T23:59:59", "2024-6-30",
         "２０２４-01-01", "2024-01-01T00:00:00+01:00", "2024/01/01", " 2024-01-01", "",
         "1969-12-31T23:59:59Z", "1970-01-01", "2024-01-01 00:00:00Z", "2024-01-01TAA:00:00Z"]


def reference(text: str | None, type_: str) -> int | None:
    """The key the row path gives a date / timestamp in the bulk path's forms, else None."""
    if text is None:
        return None
    found = _FORM.fullmatch(text)
    if found is None or (type_ == T.DATE and found.group(4) is not None):
        return None
    try:
        when = datetime(*(int(part) for part in found.groups() if part is not None),
                        tzinfo=timezone.utc)
    except ValueError:
        return None
    days = when.date().toordinal() - T.EPOCH_ORDINAL
    if type_ == T.DATE:
        return days
    return (days * 86_400 + when.hour * 3600 + when.minute * 60 + when.second) * 1_000_000


def check_times(texts: list[str | None], type_: str, kind: pa.DataType) -> None:
    keys, ok = order_blocks.fixed_times(pa.array(texts, kind), type_)
    want = [reference(text, type_) for text in texts]
    assert ok.tolist() == [key is not None for key in want], texts
    assert keys.tolist() == [key or 0 for key in want], texts


def test_time_edges() -> None:
    for type_ in (T.DATE, T.TIMESTAMP):
        for kind in (pa.string(), pa.large_string()):
            check_times(EDGES + [None], type_, kind)
    for width in (10, 20):  # a column all of one form (read as one matrix)
        check_times([text for text in EDGES if len(text) == width], T.TIMESTAMP, pa.string())
    sliced = pa.array(["x", *EDGES], pa.string()).slice(1)  # an array at an offset
    keys, ok = order_blocks.fixed_times(sliced, T.TIMESTAMP)
    assert ok.tolist() == [reference(text, T.TIMESTAMP) is not None for text in EDGES]


digit = st.sampled_from("0123456789")
stamp = st.builds(
    lambda y, mo, d, h, mi, s, t: f"{y}-{mo}-{d}" + (f"T{h}:{mi}:{s}Z" if t else ""),
    st.text(digit, min_size=4, max_size=4), st.text(digit, min_size=2, max_size=2),
    st.text(digit, min_size=2, max_size=2), st.text(digit, min_size=2, max_size=2),
    st.text(digit, min_size=2, max_size=2), st.text(digit, min_size=2, max_size=2),
    st.booleans())
valid_stamp = st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31)).map(
    lambda when: when.strftime("%Y-%m-%dT%H:%M:%SZ"))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(stamp, valid_stamp, valid_stamp.map(lambda s: s[:10]),
                          st.sampled_from(EDGES), st.none(), st.text(max_size=21)),
                max_size=40))
def test_times_as_python_reads_them(texts: list[str | None]) -> None:
    for type_ in (T.DATE, T.TIMESTAMP):
        check_times(texts, type_, pa.string())


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(allow_nan=False, allow_infinity=False), max_size=40))
def test_float_texts_as_orjson_writes_them(numbers: list[float]) -> None:
    got = order_blocks._floats_json(np.array(numbers, dtype=np.float64)).to_pylist()
    assert got == [orjson.dumps(number).decode() for number in numbers]
