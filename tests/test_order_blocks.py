"""Orders through the columnar bulk path (index/order_blocks.py) against the row path.

test_columnar.py's order files are mostly dirty, so most of their blocks go back to the
row path; these files are mostly clean, so most rows are taken column-wise, and the two
stores must still be equal byte for byte (tests/storecmp.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from storecmp import differences, store_entries
from test_columnar import assert_same_load, write

from bitseg.index import order_blocks
from bitseg.index.engine import Engine
from bitseg.loaders import columnar
from bitseg.loaders.dataset import load_dataset
from bitseg.loaders.gen import generate


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of ~300 bytes (a test may set columnar.BLOCK_BYTES; it is put back)."""
    monkeypatch.setattr(columnar, "BLOCK_BYTES", 300)


@pytest.fixture
def taken(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """What each call of the bulk path returned."""
    seen: list[Any] = []
    real = order_blocks.take_block

    def spy(batch: Any, block: Any) -> Any:
        got = real(batch, block)
        seen.append(got)
        return got

    monkeypatch.setattr(order_blocks, "take_block", spy)
    monkeypatch.setattr("bitseg.index.order_batch.take_block", spy)
    return seen


def test_generator_orders_are_taken_column_wise(tmp_path: Path, taken: list[Any]) -> None:
    folder = tmp_path / "data"
    generate(folder, profiles=300, seed=7)
    columnar.BLOCK_BYTES = 8192
    assert assert_same_load(tmp_path, folder) is None
    assert len(taken) > 3 and all(got is True for got in taken)


def test_a_repeated_id_hands_back_the_rest_of_its_block(tmp_path: Path,
                                                        taken: list[Any]) -> None:
    lines = [{"id": f"o{i}", "profile": f"u{i % 3}", "ts": "2025-01-01T10:00:00Z",
              "amount": 1.5, "items": [{"sku": "a", "qty": 1}]} for i in range(6)]
    lines[4] = {"id": "o1", "profile": "u9", "ts": "2025-01-02T10:00:00Z", "status": "paid"}
    folder = write(tmp_path / "data", {"profiles.jsonl": [], "orders.jsonl": lines})
    columnar.BLOCK_BYTES = 1 << 20  # one block
    assert assert_same_load(tmp_path, folder) is None
    assert len(taken) == 1 and taken[0].tolist() == [4, 5]


def test_an_id_an_earlier_block_gave_hands_back_the_rest_of_its_block(
        tmp_path: Path, taken: list[Any]) -> None:
    """The bulk path puts a block's order ids before it knows whether the store has them
    (new ids are the common case): a block repeating an order of an earlier one takes
    its rows up to that one, and takes back the ids it put of the rows after it."""
    def order(i: Any, **fields: Any) -> dict:
        return {"id": f"o{i}", "profile": "u1", "ts": "2025-01-01T10:00:00Z", **fields}

    first = [order(i, amount=1.5) for i in range(4)]
    second = [order(7), order(8), order(2, status="paid", profile="u2"), order(9)]
    folder = write(tmp_path / "data", {"profiles.jsonl": [], "orders.jsonl": first + second})
    columnar.BLOCK_BYTES = sum(len(orjson.dumps(line)) + 1 for line in first)  # 2 blocks
    assert assert_same_load(tmp_path, folder) is None
    assert taken[0] is True and taken[1].tolist() == [2, 3] and len(taken) == 2
    with Engine.open(tmp_path / "columnar") as engine:
        assert engine.members({"orders": {"field": "status", "op": "eq",
                                          "value": "paid"}}) == ["u2"]
        assert engine.members({"orders": {"all": True}}) == ["u1", "u2"]


def test_an_integer_in_a_float_column_keeps_its_row_as_written(tmp_path: Path) -> None:
    lines = [{"id": "o1", "profile": "u1", "ts": "2025-01-01", "amount": 2.5},
             '{"id":"o2","profile":"u1","ts":"2025-01-01","amount":3}',
             '{"id":"o3","profile":"u1","ts":"2025-01-01","amount":3.0}']
    folder = write(tmp_path / "data", {"profiles.jsonl": [], "orders.jsonl": lines})
    assert assert_same_load(tmp_path, folder) is None
    rows = store_entries(tmp_path / "columnar")["orders"]
    raw = [rows[b"r\x1f" + i.to_bytes(4, "big")] for i in range(3)]
    assert [b'"amount":2.5' in raw[0], b'"amount":3}' in raw[1], b'"amount":3.0' in raw[2]] \
        == [True, True, True]


WORDS = st.sampled_from(["acme", "zen", "Zürich", "東京", 'a"b', "back\\slash", "x y", "😀", ""])
ITEM = st.fixed_dictionaries({}, optional={
    "sku": WORDS, "brand": st.one_of(WORDS, st.none()), "qty": st.integers(0, 5),
    "price": st.sampled_from([1.5, 2.0, 0.25, 19.99, 0.0, 3, 1e-7, 123456789.5]),
    "tags": st.lists(WORDS, max_size=3), "gift": st.booleans(),
    "made": st.sampled_from(["2024-02-29", "2023-12-31"])})
FIELDS = {"status": st.one_of(WORDS, st.none()), "amount": st.sampled_from([0.5, 10.0, 7, 99.99]),
          "paid": st.booleans(), "n": st.integers(-5, 2**40), "tags": st.lists(WORDS, max_size=3),
          "due": st.sampled_from(["2025-03-01", "2024-02-29"]),
          "seen": st.sampled_from(["2025-01-01T10:00:00Z", "2025-01-01",
                                   "2025-01-01T10:00:00+02:00", "2025-02-30T00:00:00Z",
                                   "2025-01-01T10:00"])}
CLEAN = st.builds(
    lambda i, p, f, it: {"id": i, "profile": p, "ts": "2025-01-01T10:00:00Z", **f, "items": it},
    st.sampled_from(["o1", "o2", 3, "ö4"]), st.sampled_from(["u1", "u2", 4]),
    st.fixed_dictionaries({}, optional={"status": FIELDS["status"], "tags": FIELDS["tags"],
                                        "amount": st.sampled_from([0.5, 99.99])}),
    st.lists(ITEM.filter(lambda item: "price" not in item or item["price"] != 3), max_size=2))
ORDER = st.builds(
    lambda i, p, t, f, it: {"id": i, "profile": p, "ts": t, **f} | ({} if it == "-" else
                                                                     {"items": it}),
    st.one_of(st.sampled_from(["o1", "o2", 3, "ö4", 'q"5']), st.integers(10, 10**6).map(str)),
    st.sampled_from(["u1", "u2", "u3", 4, "ü5"]),
    st.sampled_from(["2025-01-01T10:00:00Z", "2024-12-31T23:59:59Z", "2025-01-02",
                     "2025-01-01T10:00:00.5Z", "2024-02-30T00:00:00Z"]),
    st.fixed_dictionaries({}, optional=FIELDS),
    st.one_of(st.lists(ITEM, max_size=4), st.just("-"), st.none()))


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(base=st.lists(CLEAN, max_size=4), lines=st.lists(ORDER, min_size=1, max_size=40),
       block=st.integers(150, 3000))
def test_clean_order_files_load_alike(tmp_path_factory: Any, base: list, lines: list,
                                      block: int) -> None:
    tmp = tmp_path_factory.mktemp("o")
    columnar.BLOCK_BYTES = block
    base_folder = write(tmp / "base", {"profiles.jsonl": [{"id": "u1"}], "orders.jsonl": base})
    folder = write(tmp / "data", {"profiles.jsonl": [], "orders.jsonl": lines})
    assert_same_load(tmp, folder, base=base_folder)


def test_a_fresh_store_takes_whole_blocks(tmp_path: Path, taken: list[Any]) -> None:
    rng = np.random.default_rng(3)
    lines = [{"id": f"o{i}", "profile": f"u{int(rng.integers(50))}",
              "ts": "2025-01-01T10:00:00Z", "status": ["paid", "new"][i % 2],
              "items": [{"sku": f"s{int(rng.integers(9))}", "qty": int(rng.integers(1, 4)),
                         "price": float(rng.integers(1, 999)) / 100}]} for i in range(300)]
    folder = write(tmp_path / "data", {"profiles.jsonl": [], "orders.jsonl": lines})
    columnar.BLOCK_BYTES = 4096
    assert assert_same_load(tmp_path, folder) is None
    assert taken and all(got is True for got in taken)
    assert differences(tmp_path / "columnar", tmp_path / "rows") == []


def test_fields_some_rows_lack_leave_those_rows_without_them(tmp_path: Path,
                                                             taken: list[Any]) -> None:
    lines = [{"id": "o1", "profile": "u1", "ts": "2025-01-01", "amount": 1.5, "n": 3,
              "items": [{"sku": "a", "qty": 2}, {"sku": "b"}]},
             {"id": "o2", "profile": "u2", "ts": "2025-01-01"},
             {"id": "o3", "profile": "u1", "ts": "2025-01-01", "paid": False,
              "items": [{"price": 2.5}, {}]}]
    folder = write(tmp_path / "data", {"profiles.jsonl": [], "orders.jsonl": lines})
    columnar.BLOCK_BYTES = 1 << 20
    assert assert_same_load(tmp_path, folder) is None
    assert taken == [True]
    rows = store_entries(tmp_path / "columnar")["orders"]
    assert rows[b"r\x1f\x00\x00\x00\x01"] == \
        b'{"f":{},"i0":2,"it":[],"p":1,"t":1735689600000000,"x":"o2"}'


@given(lines=st.lists(st.binary(max_size=8).map(lambda b: b.replace(b"\n", b"")),
                      min_size=1, max_size=12), last=st.booleans())
@settings(max_examples=100, deadline=None)
def test_a_blocks_line_array_cuts_its_bytes_at_each_newline(lines: list[bytes],
                                                            last: bool) -> None:
    data = b"\n".join(lines) + (b"\n" if last else b"")
    assert order_blocks.line_array(data).to_pylist() == _cut(data)


def _cut(data: bytes) -> list[bytes]:
    """data's lines, each with its newline, cut at b"\n" only (a last one without)."""
    *whole, rest = data.split(b"\n")
    return [line + b"\n" for line in whole] + ([rest] if rest or not whole else [])


def test_an_orders_files_blocks_come_with_their_lines_made_ahead(tmp_path: Path) -> None:
    """iter_blocks runs order_blocks.prepare on each orders block: the line array
    integer_literal searches is made off the loading thread."""
    lines = [{"id": f"o{i}", "profile": "u1", "ts": "2025-01-01", "amount": 2.0 + i}
             for i in range(40)]
    folder = write(tmp_path / "data", {"orders.jsonl": lines})
    blocks = list(columnar.iter_blocks(folder / "orders.jsonl"))
    assert len(blocks) > 3
    for block in blocks:
        assert block.prepared["lines"].to_pylist() == _cut(block.data)


def test_profiles_are_found_in_the_id_table_and_a_deleted_one_is_made_anew(
        tmp_path: Path, taken: list[Any]) -> None:
    """The block path finds known profiles in the id map's table (idhash); a deleted
    profile's id is in the map but not live, so it is a new profile, as on the row path,
    and new ones are made in order of first appearance."""
    base = write(tmp_path / "base", {"profiles.jsonl": [{"id": f"u{i}"} for i in range(1, 6)]})
    lines = [{"id": f"o{i}", "profile": p, "ts": "2025-01-01T10:00:00Z", "amount": 1.5}
             for i, p in enumerate(["u9", "u1", "u2", "u9", "u3", "u10", "u2", 7])]
    folder = write(tmp_path / "data", {"profiles.jsonl": [], "orders.jsonl": lines})
    for name, fast in (("columnar", True), ("rows", False)):
        with Engine.open(tmp_path / name) as engine:
            load_dataset(base, engine, columnar=False)
            assert engine.delete_profiles(["u2"]) == 1
            load_dataset(folder, engine, columnar=fast)
            members = engine.members({"orders": {"all": True}})
            ids = {p: engine.dense_id(p) for p in ("u1", "u2", "u3", "u9", "u10", "7")}
        assert sorted(members) == ["7", "u1", "u10", "u2", "u3", "u9"]
        assert ids["u1"] == 0 and ids["u3"] == 2
        assert [ids["u9"], ids["u2"], ids["u10"], ids["7"]] == [5, 6, 7, 8]
    assert taken and all(got is True for got in taken)
    assert differences(tmp_path / "columnar", tmp_path / "rows") == []
