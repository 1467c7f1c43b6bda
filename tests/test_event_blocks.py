"""EventBatch.add_block: parsed blocks applied column-wise leave the row path's store.

test_columnar.py checks files of every kind against the row path; these tests aim at
what only the events' block path does: flushes that cut a block (FLUSH_ROWS made tiny),
blocks and add()'s rows in one flush, properties first met on one row in another key
order, types inferred from a block, timestamps read from their text, profiles created
in order of first appearance.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_columnar import assert_same_load, write

from bitseg.index import event_batch
from bitseg.index import types as T
from bitseg.index.engine import Engine
from bitseg.index.event_blocks import iso_micros
from bitseg.loaders import columnar
from bitseg.loaders.dataset import load_dataset
from bitseg.loaders.gen import generate

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])

TIMES = st.sampled_from([
    "2025-01-01T10:00:00Z", "2025-01-02T00:00:00Z", "2024-12-31T23:59:59Z",
    "2025-01-01T10:00:00", "2025-01-01T10:00:00.5Z", "2025-01-01T10:00:00.250000Z",
    "2024-02-29T12:00:00Z", "2025-02-29T12:00:00Z", "2025-01-01T24:00:00Z",
    "2025-01-01T10", "2025-01-01T12:00:00+02:00", "2025-01-03", "0001-01-01T00:00:00Z"])
CLEAN_TIMES = st.sampled_from(["2025-01-01T10:00:00Z", "2025-01-02T00:00:00Z",
                               "2024-12-31T23:59:59Z", "2025-03-01T08:30:00Z"])
PROPS = {"page": st.sampled_from(["/", "/cart", "Zürich", "東京", ""]),
         "price": st.sampled_from([1.5, 2.25, 3, 0.1, 1e12]),
         "n": st.sampled_from([1, 2, -3, 2**40]),
         "vip": st.booleans(),
         "misc": st.one_of(st.sampled_from(["x", "y"]), st.integers(0, 2), st.booleans())}


@st.composite
def event(draw: Any, clean: bool) -> dict[str, Any]:
    """One event line, its keys in a drawn order (the key order of a line decides the
    order properties first met on one line are met in)."""
    profile = draw(st.sampled_from(["u1", "u2", "ü3", 4, 5, "5"] + ([] if clean else [""])))
    name = draw(st.sampled_from(["view", "buy", "café"] +
                                ([] if clean else ["segment_entered"])))
    record = {"profile": profile, "event": name,
              "ts": draw(CLEAN_TIMES if clean else TIMES)}
    for prop, values in PROPS.items():
        if prop == "misc" and clean:
            continue
        if draw(st.integers(0, 2)) == 0:
            record[prop] = draw(st.one_of(values, st.none()))
    keys = draw(st.permutations(list(record)))
    return {key: record[key] for key in keys}


@pytest.fixture(autouse=True)
def tiny_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(columnar, "BLOCK_BYTES", 200)
    monkeypatch.setattr(event_batch, "FLUSH_ROWS", event_batch.FLUSH_ROWS)


@SETTINGS
@given(lines=st.lists(st.one_of(event(True), event(True), event(True), event(False)),
                      min_size=1, max_size=60),
       block=st.integers(60, 600), flush=st.integers(2, 30), declared=st.booleans())
def test_events_load_alike_across_flushes(tmp_path_factory: Any, lines: list, block: int,
                                          flush: int, declared: bool) -> None:
    """Mostly clean lines (so most blocks are taken column-wise), now and then one the
    row path must judge, with flushes every few rows, cutting blocks."""
    tmp = tmp_path_factory.mktemp("ev")
    columnar.BLOCK_BYTES = block
    event_batch.FLUSH_ROWS = flush
    folder = write(tmp / "data", {"profiles.jsonl": [{"id": "u2"}, {"id": "5"}],
                                  "events.jsonl": lines})
    if declared:
        (folder / "schema.json").write_text('{"events": {"page": "keyword", "n": "int"}}')
    assert_same_load(tmp, folder)


def _taken(folder: Path, store: Path) -> list[bool]:
    """What add_block answered for each block of a columnar load."""
    answers: list[bool] = []
    original = event_batch.EventBatch.add_block

    def spy(self: Any, block: Any) -> bool:
        answers.append(original(self, block))
        return answers[-1]

    event_batch.EventBatch.add_block = spy  # type: ignore[method-assign]
    try:
        with Engine.open(store) as engine:
            load_dataset(folder, engine)
    finally:
        event_batch.EventBatch.add_block = original  # type: ignore[method-assign]
    return answers


def test_the_generators_events_are_taken_column_wise(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    generate(folder, profiles=300, seed=4)
    columnar.BLOCK_BYTES = 8192
    event_batch.FLUSH_ROWS = 1000  # a flush inside some blocks
    answers = _taken(folder, tmp_path / "store")
    assert len(answers) > 5 and all(answers)
    assert assert_same_load(tmp_path / "cmp", folder) is None


def test_a_refused_block_goes_to_the_row_path_and_later_blocks_resume(tmp_path: Path) -> None:
    rows = [{"profile": f"u{i}", "event": "view", "ts": "2025-01-01T10:00:00Z", "n": i}
            for i in range(40)]
    rows[5]["n"] = 5.5  # a float in an int column: the row path says so
    folder = write(tmp_path / "data", {"profiles.jsonl": [], "events.jsonl": rows})
    (folder / "schema.json").write_text('{"events": {"n": "int"}}')
    columnar.BLOCK_BYTES = 400
    event_batch.FLUSH_ROWS = 12
    error = assert_same_load(tmp_path, folder)
    assert error is not None and "line 6, field 'n'" in error
    rows[5]["n"] = 5.0  # an integer after all: the rows load, partly through add()
    write(folder, {"events.jsonl": rows})
    answers = _taken(folder, tmp_path / "spied")
    assert False in answers and answers[-1] is True
    assert assert_same_load(tmp_path / "again", folder) is None


def test_unknown_profiles_are_created_in_order_of_first_appearance(tmp_path: Path) -> None:
    names = [f"p{i}" for i in range(50)]
    random.Random(7).shuffle(names)
    rows = [{"profile": p, "event": "view", "ts": "2025-01-01T10:00:00Z"} for p in names]
    folder = write(tmp_path / "data", {"profiles.jsonl": [], "events.jsonl": rows})
    for use_blocks in (False, True):
        with Engine.open(tmp_path / f"store-{use_blocks}") as engine:
            load_dataset(folder, engine, columnar=use_blocks)
            assert [engine.ids.lookup(p) for p in names] == list(range(50))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 9999), st.integers(1, 12), st.integers(1, 31),
                          st.integers(0, 24), st.integers(0, 60), st.integers(0, 60)),
                min_size=1, max_size=20),
       st.sampled_from(["", "Z"]), st.sampled_from(["", ".5", ".123456", ".000001"]))
def test_timestamps_read_from_their_text_as_the_row_path_reads_them(
        moments: list, zone: str, fraction: str) -> None:
    texts = [f"{y:04d}-{mo:02d}-{d:02d}T{h:02d}:{mi:02d}:{s:02d}{fraction}{zone}"
             for y, mo, d, h, mi, s in moments]
    try:
        expected = [T.parse_timestamp(text) for text in texts]
    except ValueError:
        expected = None
    got = iso_micros(pa.array(["padding", *texts]).slice(1))
    if expected is None:
        assert got is None  # the row path names the bad one
    else:
        assert got is not None and got.tolist() == expected
        with np.errstate(all="raise"):  # the row path's own numpy reading agrees
            plain = [t[:-1] if t.endswith("Z") else t for t in texts]
            assert np.array(plain, dtype="datetime64[us]").astype(np.int64).tolist() == expected


def test_a_float_past_the_key_range_is_an_error_naming_its_line(tmp_path: Path) -> None:
    """1e12 is past the fixed scale of float keys: a DataError, not an OverflowError."""
    rows = [{"profile": "u1", "event": "buy", "ts": "2025-01-01T10:00:00Z", "price": p}
            for p in (1.5, 2.0, 1e12)]
    folder = write(tmp_path / "data", {"profiles.jsonl": [], "events.jsonl": rows})
    error = assert_same_load(tmp_path, folder)
    assert error is not None and "line 3, field 'price'" in error and "out of range" in error
