"""The columnar export (field indexes, a block of ids at a time) writes exactly the bytes
of the row-decoding one (profile_rows + encode_rows), on random data: unicode ids and
values, csv and JSON specials, keywords lists, missing and removed values, floats
(including whole numbers in a float field and values the index rounds), dates and
timestamps across years 0001-9999."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bitseg.index import exports
from bitseg.index import types as T
from bitseg.index.engine import Engine
from bitseg.index.export import profile_rows
from bitseg.index.exports import encode_columns, encode_rows, with_required
from bitseg.index.fields import ids_of

SCHEMA = {"profiles": {"city": "keyword", "tags": "keywords", "vip": "bool", "age": "int",
                       "score": "float", "born": "date", "seen": "timestamp"}}
FIELDS = ["city", "tags", "vip", "age", "score", "born", "seen"]

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=6)
some_text = st.one_of(text, st.sampled_from(["", ",", '"', "a\nb", "x\ry", "%s", "é;ü",
                                             "\\", "\x00", "\u2028", "🙂"]))
floats = st.one_of(
    st.floats(-1e9, 1e9, allow_nan=False, allow_infinity=False),
    st.integers(-10**6, 10**6),  # kept as an int in a float field's row: "5", not "5.0"
    st.sampled_from([0.1, 1.5, -0.0, 0.0, 1e-7, 2.5e-5, 123456.789, 3.0, 1e9]),
    st.floats(1e15, 4e15))  # large: the index keeps fewer digits and rounds
values = {
    "city": some_text,
    "tags": st.lists(some_text, max_size=4),
    "vip": st.booleans(),
    "age": st.integers(-2**62 + 1, 2**62 - 1) | st.integers(-100, 100),
    "score": floats,
    "born": st.integers(T.MIN_DAY, T.MAX_DAY).map(T.format_date),
    "seen": st.one_of(st.integers(T.MIN_US, T.MAX_US),
                      st.integers(T.MIN_US // 10**6, T.MAX_US // 10**6).map(lambda s: s * 10**6),
                      ).map(T.format_timestamp),
}


@st.composite
def profiles(draw):
    """Profiles (some fields missing, some removed by a second upsert) and ids to delete."""
    n = draw(st.integers(1, 25))
    ids = draw(st.lists(st.one_of(some_text.filter(bool), st.integers(0, 999).map(str)),
                        min_size=n, max_size=n, unique=True))
    rows = []
    for pid in ids:
        row = {"id": pid}
        for name in draw(st.lists(st.sampled_from(FIELDS), unique=True)):
            row[name] = draw(values[name])
        rows.append(row)
    later = [{"id": r["id"], **{name: None for name in FIELDS[:3]}}
             for r in rows[: draw(st.integers(0, 3))]]
    gone = ids[-draw(st.integers(0, 2)):] if len(ids) > 2 else []
    return rows, later, gone


def _both(engine: Engine, rule, fields, require, fmt) -> tuple[bytes, bytes]:
    kept = with_required(engine.snapshot, engine.bitmap(rule), require)
    dense = ids_of(kept)
    by_rows = b"".join(encode_rows(profile_rows(engine, dense, fields), fields, fmt))
    by_columns = b"".join(encode_columns(engine, dense, fields, fmt))
    return by_rows, by_columns


@settings(max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=profiles(), fields=st.lists(st.sampled_from(FIELDS), unique=True),
       require=st.lists(st.sampled_from(FIELDS), max_size=2, unique=True),
       block=st.sampled_from([1, 3, 100_000]), set_words=st.sampled_from([0, 32]),
       rows_over=st.sampled_from([0, 4]))
def test_columns_write_the_bytes_rows_write(tmp_path_factory, monkeypatch, data, fields,
                                            require, block, set_words, rows_over):
    rows, later, gone = data
    monkeypatch.setattr(exports, "BLOCK", block)  # blocks of 1 and 3 ids: block edges
    monkeypatch.setattr(exports, "ROWS_OVER", rows_over)  # 0: keyword cells from the rows
    monkeypatch.setattr("bitseg.index.export.MAX_SET_WORDS", set_words)  # 0: keywords too
    with Engine.open(tmp_path_factory.mktemp("cols") / "s") as engine:
        engine.declare_schema(SCHEMA)
        engine.upsert_profiles(rows)
        if later:
            engine.upsert_profiles(later)
        if gone:
            engine.delete_profiles(gone)
        for fmt in ("csv", "jsonl"):
            by_rows, by_columns = _both(engine, {"all": True}, fields, require, fmt)
            assert by_columns == by_rows


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_an_empty_audience_writes_what_rows_write(tmp_path, fmt):
    with Engine.open(tmp_path / "s") as engine:
        engine.declare_schema(SCHEMA)
        engine.upsert_profiles([{"id": "a", "age": 3}])
        rule = {"field": "age", "op": "gt", "value": 10}
        by_rows, by_columns = _both(engine, rule, FIELDS, [], fmt)
        assert by_columns == by_rows == (b"id," + ",".join(FIELDS).encode() + b"\n"
                                         if fmt == "csv" else b"")


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_a_float_too_small_for_a_key_loads_and_exports_as_rows_do(tmp_path, fmt):
    """2.49e-293 divided the key range into infinity, and the upsert failed with
    OverflowError; it loads, and its export is what its row says."""
    with Engine.open(tmp_path / "s") as engine:
        engine.declare_schema(SCHEMA)
        engine.upsert_profiles([{"id": "0", "score": 2.4905009385182916e-293}])  # alone
        engine.upsert_profiles([{"id": "1", "score": 1.5}])
        by_rows, by_columns = _both(engine, {"all": True}, ["score"], [], fmt)
        assert by_columns == by_rows
        assert b"2.4905009385182916e-293" in by_rows
