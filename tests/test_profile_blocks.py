"""Profiles through the columnar bulk path (index/profile_blocks.py) against the row path.

The store-vs-store checks of tests/test_columnar.py, for what the profile block path
reads from the raw lines: each line's own key order, integers in a float column,
escapes and spacing, and where it stops taking rows (an id seen before).  Plus that it
does take the generator's rows, and ensure_profiles against ensure_profile.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from storecmp import differences
from test_columnar import assert_same_load, clean_profiles, write

from bitseg.index import profile_blocks
from bitseg.index.engine import Engine
from bitseg.index.ids import IdMap
from bitseg.index.profiles import ProfileBatch
from bitseg.loaders import columnar
from bitseg.loaders.columnar import parse_block
from bitseg.loaders.dataset import load_dataset
from bitseg.loaders.gen import generate


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(columnar, "BLOCK_BYTES", 300)


@pytest.fixture
def taken(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, Any]]:
    """(rows, what add_block returned) of every profile block applied."""
    seen: list[tuple[int, Any]] = []
    take = profile_blocks.take_block

    def spy(batch: Any, block: Any) -> Any:
        result = take(batch, block)
        seen.append((block.rows, result if isinstance(result, bool) else result.tolist()))
        return result

    monkeypatch.setattr("bitseg.index.profiles.take_block", spy)
    return seen


def lines_of(*texts: str) -> list[str]:
    return list(texts)


# ----------------------------------------------------------------------------- taking rows


def test_the_generator_profiles_are_taken_column_wise(tmp_path: Path, taken: list) -> None:
    folder = tmp_path / "data"
    generate(folder, profiles=300, seed=9)
    for name in ("events.jsonl", "orders.jsonl"):
        (folder / name).unlink()
    columnar.BLOCK_BYTES = 4096
    assert assert_same_load(tmp_path, folder) is None
    assert taken and all(result is True for _, result in taken)
    assert sum(rows for rows, _ in taken) == 300


def test_rows_from_an_id_seen_before_go_to_the_row_path(tmp_path: Path, taken: list) -> None:
    columnar.BLOCK_BYTES = 1 << 20
    folder = write(tmp_path / "data", {"profiles.jsonl": [
        {"id": "a", "n": 1}, {"id": "b", "n": 2}, {"id": "a", "n": None, "c": "x"},
        {"id": "c", "n": 3}]})
    assert assert_same_load(tmp_path, folder) is None
    assert taken == [(4, [2, 3])]  # the repeated id and every row after it


def test_each_line_keeps_its_own_key_order(tmp_path: Path, taken: list) -> None:
    columnar.BLOCK_BYTES = 1 << 20
    folder = write(tmp_path / "data", {"profiles.jsonl": lines_of(
        '{"id":"a","x":1,"y":"p"}', '{"id":"b","y":"q"}', '{"id":"c","x":2,"y":"r"}',
        '{"id":"d","y":"s","x":3}')})
    assert assert_same_load(tmp_path, folder) is None
    assert taken == [(4, [3])]  # "y" before "x" is not the order the other lines show
    with Engine.open(tmp_path / "columnar") as engine:
        assert engine.profile("d") == {"id": "d", "y": "s", "x": 3}


def test_an_integer_in_a_float_column_stays_an_integer(tmp_path: Path, taken: list) -> None:
    columnar.BLOCK_BYTES = 1 << 20
    folder = write(tmp_path / "data", {"profiles.jsonl": lines_of(
        '{"id":"a","ltv":1.5}', '{"id":"b","ltv":2.0}', '{"id":"c","ltv":3}',
        '{"id":"d","ltv":1e3}')})
    assert assert_same_load(tmp_path, folder) is None
    assert taken == [(4, [2, 3])]


def test_escapes_spaces_and_forms_load_alike(tmp_path: Path) -> None:
    folder = write(tmp_path / "data", {"profiles.jsonl": lines_of(
        '\ufeff{"id": "a", "name": "say \\"hi\\"\\n\\ttab\\\\", "t": ["z", "a", "z"]}',
        '{ "id" : 7 , "name" : "caf\\u00e9 \\u0001" , "t" : [] }',
        '{"id":"b","name":"x\\/y","born":"2000-02-29","seen":"2025-01-01T10:00:00Z"}',
        '{"id":"c","born":"2001-02-03","seen":"2025-01-01"}',
        '{"id":"d","seen":"2025-01-01T12:00:00+02:00","t":"solo"}',
        '{"id":"e","seen":"2025-01-01 10:00:00","n":-0.0,"big":4611686018427387904}',
        '{"id":"f"}', '{"id":"g","ok":true,"t":["only"]}')})
    error = assert_same_load(tmp_path, folder)
    assert error is not None and "line 6, field 'big'" in error
    lines = (folder / "profiles.jsonl").read_text().splitlines()
    write(folder, {"profiles.jsonl": [line for line in lines if "big" not in line]})
    assert assert_same_load(tmp_path / "again", folder) is None


def test_a_list_column_starting_with_a_null_item_is_left_to_the_row_path() -> None:
    # pyarrow builds such a column with offsets past its items (an invalid array)
    assert parse_block(b'{"id":"u1","tags":[null,"red"]}\n', "p.jsonl", 1).table is None


# ----------------------------------------------------------------------------- hypothesis

WORDS = st.sampled_from(["red", "blue", "Zürich", "東京", 'say "hi"', "back\\slash", "new\nline",
                         "tab\t", "bell\x07", "", "2024-02-29", "2025-01-01T10:00:00Z"])
VALUES = {"age": st.one_of(st.integers(-5, 99), st.just(2**62)),
          "ltv": st.sampled_from([0.0, 1.5, -2.25, 3, 1e20, 1e-7, 0.1]),
          "vip": st.booleans(), "city": WORDS, "tags": st.lists(WORDS, max_size=4),
          "born": st.sampled_from(["2000-01-01", "1999-12-31", "0001-01-01", "9999-12-31"]),
          "seen": st.sampled_from(["2025-01-01T10:00:00Z", "2024-12-31T23:59:59Z", "2025-06-01",
                                   "9999-12-31T23:59:59Z"])}


@st.composite
def shuffled_profile(draw: Any, ids: list[Any]) -> str:
    """One line: an id and some fields, keys mostly in one order, now and then shuffled,
    written compact or spaced."""
    record = {"id": draw(st.sampled_from(ids))}
    for name, values in VALUES.items():
        if draw(st.integers(0, 3)):
            record[name] = draw(st.one_of(values, values, values, st.none()))
    keys = list(record)
    if draw(st.integers(0, 5)) == 0:
        keys = draw(st.permutations(keys))
    if draw(st.booleans()):
        return orjson.dumps({key: record[key] for key in keys}).decode()
    # spaced, with \\u escapes: another writer's form
    return json.dumps({key: record[key] for key in keys})


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(base=st.lists(clean_profiles, max_size=5),
       lines=st.lists(shuffled_profile(["u1", "u2", 3, "u4", "u5", 6, "ü7", "u8", "u9"]),
                      min_size=1, max_size=30),
       block=st.integers(80, 600))
def test_shuffled_keys_escapes_and_upserts_load_alike(tmp_path_factory: Any, base: list,
                                                      lines: list, block: int) -> None:
    tmp = tmp_path_factory.mktemp("s")
    columnar.BLOCK_BYTES = block
    base_folder = write(tmp / "base", {"profiles.jsonl": base})
    assert_same_load(tmp, write(tmp / "data", {"profiles.jsonl": lines}), base=base_folder)


# ----------------------------------------------------------------------------- ensure_profiles


def test_ensure_profiles_is_ensure_profile_of_each(tmp_path: Path) -> None:
    wanted = ["b", "x", "a", "x", "7", "c", "b", "y"]
    results = []
    for vectorised in (False, True):
        store = tmp_path / f"s{vectorised}"
        with Engine.open(store) as engine:
            engine.upsert_profiles([{"id": "a"}, {"id": "b", "n": 1}])
            with engine.store.write() as txn:
                ids = IdMap.load(engine.store, txn).writer(txn)
                batch = ProfileBatch(engine.store, txn, engine.snapshot, ids)
                if vectorised:
                    names, ok = profile_blocks.profile_ids(pa.array(wanted))
                    assert ok.all()
                    dense = batch.ensure_profiles(names).tolist()
                else:
                    dense = [batch.ensure_profile(name) for name in wanted]
                results.append((dense, batch.created, ids.new_names,
                                np.frombuffer(batch.live_added, dtype=np.uint32).tolist()))
    assert results[0] == results[1]
    assert results[0][0] == [1, 2, 0, 2, 3, 4, 1, 5]
    assert differences(tmp_path / "sFalse", tmp_path / "sTrue") == []


def test_profile_ids_marks_what_the_row_path_refuses() -> None:
    names, ok = profile_blocks.profile_ids(pa.array(["a", "", None, "x" * 401, "ü"]))
    assert names is not None and ok.tolist() == [True, False, False, False, True]
    names, ok = profile_blocks.profile_ids(pa.array([7, -1, None]))
    assert names.to_pylist() == [b"7", b"-1", None] and ok.tolist() == [True, True, False]
    assert profile_blocks.profile_ids(pa.array([1.5]))[0] is None


def test_a_load_of_new_profiles_loads_the_same_with_blocks_of_any_size(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    generate(folder, profiles=120, seed=4)
    for name in ("events.jsonl", "orders.jsonl"):
        (folder / name).unlink()
    for size in (200, 5000):
        columnar.BLOCK_BYTES = size
        with Engine.open(tmp_path / f"s{size}") as engine:
            load_dataset(folder, engine)
    assert differences(tmp_path / "s200", tmp_path / "s5000") == []


def test_integers_out_of_range_fail_as_on_the_row_path(tmp_path: Path) -> None:
    for number in (-(2**63), 2**62, -(2**62), 2**62 - 1):
        folder = write(tmp_path / f"d{number}", {"profiles.jsonl": [
            {"id": "a", "n": 1}, {"id": "b", "n": number}]})
        error = assert_same_load(tmp_path / f"s{number}", folder)
        assert (error is None) == (abs(number) < 2**62)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(list(b" \t\r\n\x0b\x0cnul}{a\"")), max_size=30).map(bytes))
def test_a_plain_block_has_no_blank_line_and_no_top_level_null(data: bytes) -> None:
    # parse_block skips those two regular expressions (the reader thread's main cost
    # after the parse itself) when _plain_lines says so
    if columnar._plain_lines(data):
        assert not columnar._NULL_ROW.search(data) and not columnar._BLANK.search(data)
    assert columnar._plain_lines(b'{"a":1}\n{"a":null}\n')
    assert not columnar._plain_lines(b'{"a":1}\nnull\n')
    assert not columnar._plain_lines(b'{"a":1}\n\n{"a":2}')


def test_a_streamed_profiles_batch_is_taken_column_wise(tmp_path: Path, taken: list) -> None:
    texts = ['{"id":"a","n":1,"tags":["x","w","x"]}', '{"id":"7","n":2}', '{"id":"b"}',
             '{"id":"a","n":null}', '{"id":"c","n":3}']
    with Engine.open(tmp_path / "blocks") as engine:
        engine.upsert_profiles(columnar.texts_block(texts))
    with Engine.open(tmp_path / "rows") as engine:
        engine.upsert_profiles([orjson.loads(text) for text in texts])
    assert taken == [(5, [3, 4])]
    assert differences(tmp_path / "blocks", tmp_path / "rows") == []


def test_range_fields_built_on_two_threads_give_the_same_store(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch's large range fields are built on a pool (profiles.PARALLEL_FROM): the
    store is byte for byte the one built one field after another, before and after a
    second file changes them."""
    import threading

    from bitseg.index import fields, profiles
    folder = write(tmp_path / "data", {"profiles.jsonl": [
        {"id": f"u{i}", "age": 18 + i % 70, "points": i * 13 % 1000, "ltv": i * 1.25,
         "birthday": f"19{50 + i % 50}-{1 + i % 12:02d}-{1 + i % 28:02d}",
         "seen": f"2026-0{1 + i % 9}-1{i % 10}T0{i % 10}:00:00Z"} for i in range(400)]})
    more = write(tmp_path / "more", {"profiles.jsonl": [
        {"id": f"u{i}", "age": 17 + i % 60, "points": i * 7 - 300, "ltv": i / 8}
        for i in range(0, 500, 3)]})
    threads: list[str] = []
    real = fields.RangeWriter.finish

    def spy(self: Any) -> Any:
        threads.append(threading.current_thread().name)
        return real(self)

    monkeypatch.setattr(fields.RangeWriter, "finish", spy)
    for name, start in (("pool", 1), ("serial", 1 << 60)):
        monkeypatch.setattr(profiles, "PARALLEL_FROM", start)
        with Engine.open(tmp_path / name) as engine:
            load_dataset(folder, engine)
            load_dataset(more, engine)
        if name == "pool":
            assert sum(t.startswith("bitseg-fields") for t in threads) >= 4
    assert differences(tmp_path / "pool", tmp_path / "serial") == []
