"""The columnar bulk path against the row path: the same files leave the same store.

Every test loads the same files twice, once through RowBlocks (loaders/columnar.py and
each batch's add_block) and once line by line (columnar=False, the reference), and
compares the two stores entry by entry (tests/storecmp.py): every bitmap, row, column,
event block and catalog entry, byte for byte.  Blocks are made tiny so that a file of
a few dozen lines crosses many of them.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from storecmp import differences

from bitseg.index.engine import Engine
from bitseg.index.errors import BitsegError, DataError
from bitseg.loaders import columnar
from bitseg.loaders.columnar import iter_blocks, parse_block, texts_block
from bitseg.loaders.dataset import load_dataset
from bitseg.loaders.gen import generate

# ----------------------------------------------------------------------------- helpers


def _load(store: Path, folder: Path, *, columnar: bool, base: Path | None = None) -> str | None:
    """Load `base` (row path) then `folder` into a new store; the error text, or None."""
    with Engine.open(store) as engine:
        if base is not None:
            load_dataset(base, engine, columnar=False)
        try:
            load_dataset(folder, engine, columnar=columnar)
        except BitsegError as exc:
            return str(exc)
    return None


def assert_same_load(tmp: Path, folder: Path, base: Path | None = None) -> str | None:
    """Load the folder both ways; both fail alike or both succeed, with equal stores."""
    fast = _load(tmp / "columnar", folder, columnar=True, base=base)
    slow = _load(tmp / "rows", folder, columnar=False, base=base)
    assert fast == slow
    assert differences(tmp / "columnar", tmp / "rows") == []
    return slow


def write(folder: Path, files: dict[str, list[Any]]) -> Path:
    """A dataset folder; a list item that is a str is written as the raw line."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, lines in files.items():
        data = b"".join((x.encode() if isinstance(x, str) else orjson.dumps(x)) + b"\n"
                        for x in lines)
        (folder / name).write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    return folder


@pytest.fixture(autouse=True)
def tiny_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of ~200 bytes: every file here crosses many block boundaries."""
    monkeypatch.setattr(columnar, "BLOCK_BYTES", 200)


# ----------------------------------------------------------------------------- blocks


def test_blocks_keep_line_numbers_across_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl"
    path.write_bytes(b'{"a":1}\n\n  \n{"a":2}\n' * 30 + b'{"a":3}')
    seen = []
    for block in iter_blocks(path):
        assert block.table is not None
        seen += list(zip(block.lines().tolist(), block.table.column("a").to_pylist(),
                         strict=True))
        assert [line for line, _ in block.records(None)] == block.lines().tolist()
    assert seen[:3] == [(1, 1), (4, 2), (5, 1)]
    assert seen[-1] == (121, 3) and len(seen) == 61


@pytest.mark.parametrize("data", [
    b'{"a":1,"a":2}\n', b'{"a":1}\n{"a":"x"}\n', b'{"a":1} {"a":2}\n', b'[1]\n',
    b'{"a":"\\ud800"}\n', b'{"a":1\n', b'null\n', b'{"a":1}\n  null\n', b'{"a":1}null\n',
])
def test_blocks_the_parser_refuses_go_to_the_row_path(data: bytes) -> None:
    assert parse_block(data, "f.jsonl", 7).table is None


def test_a_byte_order_mark_is_only_skipped_on_line_one() -> None:
    assert parse_block(b'\xef\xbb\xbf{"a":1}\n', "f", 1).table is not None
    assert parse_block(b'\xef\xbb\xbf{"a":1}\n', "f", 9).table is None


# ----------------------------------------------------------------------------- generator data


def test_generator_data_loads_to_the_same_store(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    generate(folder, profiles=400, seed=5)
    columnar.BLOCK_BYTES = 4096
    assert assert_same_load(tmp_path, folder) is None


def test_generator_data_gzipped_over_an_existing_store(tmp_path: Path) -> None:
    base, folder = tmp_path / "base", tmp_path / "data"
    generate(base, profiles=150, seed=1)
    generate(folder, profiles=300, seed=2, gzip=True)  # the same ids u0…: upserts
    columnar.BLOCK_BYTES = 2048
    assert assert_same_load(tmp_path, folder, base=base) is None


def test_a_bad_line_in_the_last_block_leaves_nothing_of_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    generate(folder, profiles=200, seed=3)
    events = folder / "events.jsonl"
    lines = events.read_bytes().count(b"\n")
    with events.open("ab") as out:
        out.write(b'{"profile":"u1","event":"page_view","ts":"not a time"}\n')
    columnar.BLOCK_BYTES = 4096
    error = assert_same_load(tmp_path, folder)
    assert error is not None and f"events.jsonl, line {lines + 1}, field 'ts'" in error
    events.unlink()  # the store holds the profiles and nothing of the events
    (folder / "orders.jsonl").unlink()
    _load(tmp_path / "profiles-only", folder, columnar=False)
    assert differences(tmp_path / "columnar", tmp_path / "profiles-only") == []


# ----------------------------------------------------------------------------- hypothesis

IDS = ["u1", "u2", "u3", "ü4", "u5", 6, 7, "7", ""]
TEXT = st.sampled_from(["red", "blue", "Zürich", "東京", "a|b", "", " x ", "\u00e9", "2024-02-29",
                        "2024-02-30", "2025-01-01T10:00:00Z", "2025-01-01T10:00:00+02:00",
                        "2025-01-01T10:00:00.123456Z", "2025-01-01 10:00:00", "true", "007"])
SCALAR = st.one_of(TEXT, st.integers(-3, 3), st.sampled_from([2**40, 2**63 - 1, -(2**63)]),
                   st.sampled_from([0.0, 1.0, 1.5, -2.25, 1e20]), st.booleans(), st.none())
VALUE = st.one_of(SCALAR, SCALAR, SCALAR, st.lists(TEXT, max_size=3),
                  st.lists(SCALAR, max_size=2), st.dictionaries(st.sampled_from("ab"), SCALAR,
                                                                max_size=1))
TIMES = st.sampled_from(["2025-01-01T10:00:00Z", "2025-01-02T00:00:00Z", "2024-12-31T23:59:59Z",
                         "2025-01-01T10:00:00.5Z", "2025-01-01T12:00:00+02:00", "2025-01-03",
                         "2025-13-01T00:00:00Z", "0000-01-01T00:00:00Z", 5, None])
RAW_LINES = st.sampled_from(["", "   ", "not json", "[1]", "{}", '{"id":"u1","age":1,"age":2}',
                             '{"id":"u2","age":99999999999999999999}',
                             '{"id":"u3","ltv":1e400}', '{"id":"u4","ltv":NaN}',
                             '{"profile":"u1","event":"view","ts":"2025-01-01T10:00:00Z",'
                             '"price":Infinity}',
                             '{"id":"o1","profile":"u1","ts":"2025-01-01T10:00:00Z","amount":NaN}',
                             '{"id":"u1"} {"id":"u2"}', '{"id":"u1","name":"\\ud800"}', "null"])


def _fields(names: list[str], clean: bool = False) -> st.SearchStrategy[dict[str, Any]]:
    """Mostly one type per field (so most files load), sometimes another; `clean`: always
    the field's own type, or null."""
    typed = {"age": st.integers(0, 99), "ltv": st.sampled_from([0.0, 1.5, 20.25, 3]),
             "vip": st.booleans(), "city": TEXT, "tags": st.lists(TEXT, max_size=3),
             "born": st.sampled_from(["2000-01-01", "1999-12-31", "2024-02-29"]),
             "seen": TIMES.filter(lambda t: isinstance(t, str))}
    if clean:
        words = st.sampled_from(["red", "blue", "Zürich", "東京", " x "])
        typed |= {"city": words, "tags": st.lists(words, max_size=3),
                  "ltv": st.sampled_from([0.0, 1.5, 20.25]),
                  "seen": st.sampled_from(["2025-01-01T10:00:00Z", "2024-12-31T23:59:59Z",
                                           "2025-01-01T12:00:00+02:00"])}
        value = {name: st.one_of(typed.get(name, words), st.none()) for name in names}
    else:
        value = {name: st.one_of(typed.get(name, TEXT), typed.get(name, TEXT),
                                 typed.get(name, TEXT), typed.get(name, TEXT), st.none(), VALUE)
                 for name in names}
    return st.fixed_dictionaries({}, optional=value)


def _lines(record: st.SearchStrategy[Any], *, clean: bool) -> st.SearchStrategy[list[Any]]:
    """A file's lines: records, and now and then a raw line (blank or bad)."""
    line = record if clean else st.one_of(record, record, record, record, record, RAW_LINES)
    return st.lists(line, min_size=1, max_size=40)


PROFILE_FIELDS = ["age", "ltv", "vip", "city", "tags", "born", "seen", "misc", "ts"]
profiles = st.builds(lambda i, f: {"id": i, **f}, st.sampled_from(IDS), _fields(PROFILE_FIELDS))
clean_profiles = st.builds(lambda i, f: {"id": i, **f}, st.sampled_from(IDS[:-1]),
                           _fields(PROFILE_FIELDS, clean=True))
events = st.builds(
    lambda p, e, t, f: {k: v for k, v in (("profile", p), ("event", e), ("ts", t)) if v != "-"}
    | f,
    st.sampled_from(IDS + ["-"]), st.sampled_from(["view", "buy", "café", "-", 3]), TIMES,
    _fields(["page", "price", "n", "vip", "seen", "misc"]))
items = st.lists(st.fixed_dictionaries({}, optional={
    "sku": TEXT, "brand": st.sampled_from(["acme", "zen", None, 3]), "qty": st.integers(0, 3),
    "price": st.sampled_from([1.5, 2, 0.25, "x"])}), max_size=3)
orders = st.builds(
    lambda i, p, t, f, it: {k: v for k, v in (("id", i), ("profile", p), ("ts", t),
                                              ("items", it)) if v != "-"} | f,
    st.sampled_from(["o1", "o2", "o3", 4, "-"]), st.sampled_from(IDS + ["-"]), TIMES,
    _fields(["status", "amount", "vip", "misc"]), st.one_of(items, st.just("-"), st.none()))

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


@SETTINGS
@given(base=_lines(clean_profiles, clean=True), lines=_lines(profiles, clean=False),
       block=st.integers(60, 400), gz=st.booleans())
def test_profiles_files_load_alike(tmp_path_factory: Any, base: list, lines: list, block: int,
                                   gz: bool) -> None:
    tmp = tmp_path_factory.mktemp("p")
    columnar.BLOCK_BYTES = block
    base_folder = write(tmp / "base", {"profiles.jsonl": base})
    folder = write(tmp / "data", {"profiles.jsonl.gz" if gz else "profiles.jsonl": lines})
    assert_same_load(tmp, folder, base=base_folder)


@pytest.mark.parametrize(("lines", "with_ts"), [
    ([{"id": "u1", "ts": None}, {"id": "u2", "ts": None}], []),  # every line's "ts" null
    ([{"id": "u1", "ts": "2025-01-01T10:00:00Z"}, {"id": "u2", "age": 3}], ["u1"]),
    (['{"id":"u2","\\u0074s":"x"}', {"id": "u3", "age": 2}], ["u1", "u2"]),  # an escape
    ([{"id": "u1", "age": 4}, {"id": "u3"}], ["u1"]),  # no line has it
])
def test_a_profile_field_named_ts_loads_as_the_row_path_loads_it(
        tmp_path: Path, lines: list, with_ts: list[str]) -> None:
    """A profile file is parsed without the schema that keeps an event's or order's "ts"
    a text: "ts" is a profile field like any other, and null removes it."""
    columnar.BLOCK_BYTES = 1 << 20
    base = write(tmp_path / "base", {"profiles.jsonl": [{"id": "u1", "ts": "kept"}]})
    folder = write(tmp_path / "data", {"profiles.jsonl": lines})
    assert assert_same_load(tmp_path, folder, base=base) is None
    with Engine.open(tmp_path / "columnar") as engine:
        assert sorted(engine.members({"field": "ts", "op": "exists"})) == with_ts


@SETTINGS
@given(people=_lines(clean_profiles, clean=True), lines=_lines(events, clean=False),
       block=st.integers(60, 400))
def test_events_files_load_alike(tmp_path_factory: Any, people: list, lines: list,
                                 block: int) -> None:
    assert_child_file_loads_alike(tmp_path_factory.mktemp("e"), people, "events.jsonl", lines,
                                  block)


@SETTINGS
@given(people=_lines(clean_profiles, clean=True), lines=_lines(orders, clean=False),
       block=st.integers(60, 400))
def test_orders_files_load_alike(tmp_path_factory: Any, people: list, lines: list,
                                 block: int) -> None:
    assert_child_file_loads_alike(tmp_path_factory.mktemp("o"), people, "orders.jsonl", lines,
                                  block)


def assert_child_file_loads_alike(tmp: Path, people: list, name: str, lines: list,
                                  block: int) -> None:
    """An events or orders file, over a store holding `people`, loads alike both ways."""
    columnar.BLOCK_BYTES = block
    base = write(tmp / "base", {"profiles.jsonl": people})
    folder = write(tmp / "data", {"profiles.jsonl": [], name: lines})
    assert_same_load(tmp, folder, base=base)


# ----------------------------------------------------------------------------- streamed batches


def test_a_streamed_batch_is_one_block_numbered_by_record() -> None:
    [block] = texts_block(['{"id":"a","n":1}', '{"id":"b","n":2}'])
    assert block.table.column("n").to_pylist() == [1, 2]
    assert block.lines().tolist() == [1, 2]
    assert list(block.records(None)) == [(1, {"id": "a", "n": 1}), (2, {"id": "b", "n": 2})]


def test_a_text_spanning_lines_stays_a_record() -> None:
    assert texts_block(['{"id":"a",\n"n":1}', '{"id":"b"}']) == [(1, {"id": "a", "n": 1}),
                                                                  (2, {"id": "b"})]


def test_bad_json_in_a_streamed_batch_names_the_record_before_anything_applies() -> None:
    [block] = texts_block(['{"id":"a"}', '{"id":', '{"id":"c"}'])
    assert block.table is None
    with pytest.raises(DataError, match=r"^record 2: not valid JSON"):
        list(block.records(None))
    with pytest.raises(DataError, match=r"^record 2: not valid JSON"):
        texts_block(['{"id":"a"}', '{"id":', "  "])


@pytest.mark.parametrize(("name", "lines", "error"), [
    ("orders.jsonl", ['{"id":"o1","profile":"u1","ts":"2025-01-01T10:00:00Z","items":[]}',
                      '{"id":"o1","profile":"u1","ts":"2025-01-01T10:00:00Z"}', "{}",
                      '{"id":"o2","profile":"u1","ts":"2025-01-01T10:00:00Z","x":NaN}'],
     "orders.jsonl, line 3, field 'id'"),
    ("events.jsonl", ['{"event":"v","ts":"2025-01-01T10:00:00Z"}',
                      '{"profile":"u1","event":"v","ts":"2025-01-01T10:00:00Z","p":NaN}'],
     "events.jsonl, line 1, field 'profile'"),
])
def test_a_line_only_pyarrow_reads_does_not_jump_ahead_of_an_earlier_error(
        tmp_path: Path, name: str, lines: list[str], error: str) -> None:
    """pyarrow reads NaN, orjson does not: a batch looking ahead at such a line must not
    report it before the earlier line the row path stops at."""
    columnar.BLOCK_BYTES = 1 << 20
    folder = write(tmp_path / "data", {"profiles.jsonl": ['{"id":"u1"}'], name: lines})
    found = assert_same_load(tmp_path, folder)
    assert found is not None and found.startswith(error)


@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.sampled_from([b'{"a":1}', b"", b"  ", b'{"id":"' + b"x" * 90 + b'"}',
                                       b'{"b":[1,2]}', b"null"]), max_size=40),
       final_newline=st.booleans(), block=st.integers(1, 130), gz=st.booleans())
def test_blocks_are_the_files_whole_lines_in_order(tmp_path: Path, lines: list[bytes],
                                                   final_newline: bool, block: int,
                                                   gz: bool) -> None:
    data = b"\n".join(lines) + (b"\n" if final_newline and lines else b"")
    path = tmp_path / ("f.jsonl.gz" if gz else "f.jsonl")
    path.write_bytes(gzip.compress(data) if gz else data)
    blocks = list(columnar._blocks(path, None, block))
    assert b"".join(b.data for b in blocks) == data
    assert all(b.data.endswith(b"\n") for b in blocks[:-1])  # whole lines, cut at line ends
    assert all(b.data for b in blocks)
    # each block's first line number is the count of line ends before it, plus one
    assert [b.first_line for b in blocks] == \
        [1 + sum(x.data.count(b"\n") for x in blocks[:k]) for k in range(len(blocks))]
    # each cut is at the last line end of what was read by then (reads of `block` bytes)
    seen = 0
    for b in blocks[:-1]:
        seen += len(b.data)
        assert b"\n" not in data[seen:-(-seen // block) * block]
