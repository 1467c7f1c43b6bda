"""The orders bulk load's shortcuts (index/order_blocks.py, order_queues.py) against the
row path: each input here is built so a shortcut is taken, and both stores must still be
equal byte for byte (tests/storecmp.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from storecmp import store_entries
from test_columnar import assert_same_load, write

from bitseg.index.order_queues import SetQueue, ValueQueue
from bitseg.loaders import columnar


@pytest.fixture(autouse=True)
def one_block(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each file here is one block (BLOCK_BYTES is put back after the test)."""
    monkeypatch.setattr(columnar, "BLOCK_BYTES", 1 << 20)


def _order(i: int, amount: float | str, price: float | str = 1.5) -> str:
    return (f'{{"id":"o{i}","profile":"u{i % 7}","ts":"2025-01-01T10:00:00Z",'
            f'"amount":{amount},"items":[{{"sku":"s{i % 3}","price":{price}}},'
            f'{{"sku":"t","price":0.25}}]}}')


def test_a_few_integral_values_are_looked_up_on_their_own_lines(tmp_path: Path) -> None:
    # 200 rows, two of them whole: the search for an integer literal reads those two
    # lines only; one wrote its value as an integer, the other as a float
    lines = [_order(i, 1.5 + i, 2.75) for i in range(200)]
    lines[37] = _order(37, 3)  # an int: the row keeps 3
    lines[150] = _order(150, "4.0", "6")  # floats written as such, but an int item price
    lines[151] = _order(151, "12.5", "7.0")
    folder = write(tmp_path / "data", {"profiles.jsonl": [], "orders.jsonl": lines})
    assert assert_same_load(tmp_path, folder) is None
    rows = store_entries(tmp_path / "columnar")["orders"]
    raw = {i: rows[b"r\x1f" + i.to_bytes(4, "big")] for i in (37, 150, 151)}
    assert b'"amount":3}' in raw[37] and b'"amount":4.0}' in raw[150]
    assert b'"price":6,' in raw[150] and b'"price":7.0,' in raw[151]


def test_an_integer_literal_of_another_row_does_not_matter(tmp_path: Path) -> None:
    # "amount":9 on row 3 is an int column value there; row 60's 5.0 stays a float
    lines = [_order(i, 0.5 + i) for i in range(100)]
    lines[3] = _order(3, 9)
    lines[60] = _order(60, "5.0")
    folder = write(tmp_path / "data", {"profiles.jsonl": [], "orders.jsonl": lines})
    assert assert_same_load(tmp_path, folder) is None
    rows = store_entries(tmp_path / "columnar")["orders"]
    assert b'"amount":5.0}' in rows[b"r\x1f" + (60).to_bytes(4, "big")]


def test_many_integral_values_search_the_whole_block(tmp_path: Path) -> None:
    lines = [_order(i, f"{i}.0" if i % 2 else str(i)) for i in range(64)]
    folder = write(tmp_path / "data", {"profiles.jsonl": [], "orders.jsonl": lines})
    assert assert_same_load(tmp_path, folder) is None


def test_set_queue_keeps_row_and_array_writes_in_order() -> None:
    queue = SetQueue()
    queue.set(5, 50)
    queue.extend(np.array([1, 5, 7]), np.array([10, 51, 70]))
    queue.set(7, 0, False)
    queue.set(2, 20)
    queue.extend(np.array([9], dtype=np.int64), np.array([90]))
    assert queue.written().tolist() == [5, 1, 5, 7, 7, 2, 9]
    ids, keys, valid = queue.arrays()
    got = dict(zip(ids.tolist(), zip(keys.tolist(), valid.tolist(), strict=True),
                   strict=True))
    assert got == {1: (10, True), 2: (20, True), 5: (51, True), 7: (0, False), 9: (90, True)}
    assert queue.arrays()[0].tolist() == ids.tolist()  # asked twice: the same


@pytest.mark.parametrize("removing", [False, True])
def test_value_queue_joins_pushes_and_arrays(removing: bool) -> None:
    queue = ValueQueue()
    queue.push(3, ("a", "b"), removing)
    queue.extend(np.array([4, 5]), np.array([queue.code("c"), queue.code("a")]))
    queue.push(6, ("c",), removing)
    ids, codes = queue.removed() if removing else queue.added()
    named = sorted(zip(ids.tolist(), [queue.values[c] for c in codes.tolist()],
                       strict=True))
    expect = [(3, "a"), (3, "b"), (4, "c"), (5, "a"), (6, "c")]
    if removing:  # extend only adds
        assert named == [(3, "a"), (3, "b"), (6, "c")]
        assert queue.added()[0].tolist() == [4, 5]
    else:
        assert named == expect
    assert not queue.empty
    queue.clear()
    assert queue.empty and queue.added()[0].tolist() == []


def test_each_keys_integer_literals_are_found_apart(tmp_path: Path) -> None:
    # every amount and price is whole, so the whole block is searched, key by key:
    # price is given as an integer on one line, amount never is
    lines = [_order(i, f"{i}.0", f"{i % 5 + 1}.0") for i in range(40)]
    lines[25] = _order(25, "25.0", "3")
    folder = write(tmp_path / "data", {"profiles.jsonl": [], "orders.jsonl": lines})
    assert assert_same_load(tmp_path, folder) is None
    rows = store_entries(tmp_path / "columnar")["orders"]
    assert b'"amount":7.0}' in rows[b"r\x1f" + (7).to_bytes(4, "big")]
    assert b'"price":3,' in rows[b"r\x1f" + (25).to_bytes(4, "big")]


def _batches() -> list[list[dict]]:
    """Orders in batches that cross column chunks of 8 ids, with a field first given late,
    an order replacing its own items in the batch that made it, and an old order updated."""
    out = []
    for b in range(5):
        batch = []
        for i in range(b * 11, b * 11 + 11):
            line: dict = {"id": f"o{i}", "profile": f"u{i % 4}", "ts": "2025-01-01T10:00:00Z"}
            if i % 3:
                line["amount"] = i + 0.5
            if b >= 2 and i % 2:
                line["weight"] = i
            if i % 5:
                line["items"] = [{"sku": f"s{i % 3}", "qty": i % 4 + 1, "price": 1.25 * i}]
            batch.append(line)
        batch.append({"id": f"o{b * 11}", "profile": "u1", "ts": "2025-01-02T10:00:00Z",
                      "items": [{"sku": "z", "qty": 9}]})  # replaces its own new items
        if b == 3:
            batch.append({"id": "o4", "profile": "u2", "ts": "2025-01-03T10:00:00Z",
                          "amount": 99.5})  # an old order: the column is read and copied
        out.append(batch)
    return out


def test_appending_batches_leave_unread_columns_unread_with_the_same_bytes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from storecmp import differences

    from bitseg.index import order_keys
    from bitseg.index.engine import Engine

    monkeypatch.setattr(order_keys, "COL_BITS", 3)
    monkeypatch.setattr(order_keys, "COL_CHUNK", 8)
    rules = [{"orders": {"field": "amount", "op": "gt", "value": 20}},
             {"orders": {"field": "weight", "op": "gte", "value": 30}},
             {"orders": {"field": "items.price", "op": "lt", "value": 30}},
             {"orders": {"field": "items.qty_sum", "op": "gte", "value": 3}}]
    counts = {}
    for way in ("lazy", "read"):
        path = tmp_path / way
        for batch in _batches():
            with Engine.open(path) as engine:  # reopened: no column read yet
                orders = engine.snapshot.orders
                if way == "read":
                    for columns in (orders.columns, orders.item_columns):
                        for name in list(columns):
                            columns[name]
                engine.add_orders(batch)
                after = engine.snapshot.orders
                if way == "lazy" and orders.count:
                    assert not any(after.columns.loaded(n) for n in after.columns
                                   if n != "amount")  # amount: copied for the update
        with Engine.open(path) as engine:
            counts[way] = [engine.count(rule) for rule in rules]
    assert differences(tmp_path / "lazy", tmp_path / "read") == []
    assert counts["lazy"] == counts["read"] and counts["lazy"][0] > 0


@pytest.mark.parametrize("key", ["a b", 'q"x', "back\\Eslash", "Zürich", "$x-y"])
def test_integer_literals_are_found_whatever_the_key(tmp_path: Path, key: str) -> None:
    # few whole values: their lines are searched by RE2, which must read the key as is
    import orjson
    name = orjson.dumps(key).decode()
    lines = [f'{{"id":"o{i}","profile":"u1","ts":"2025-01-01","amount":1.5,{name}:{i}.5}}'
             for i in range(40)]
    lines[9] = f'{{"id":"o9","profile":"u1","ts":"2025-01-01","amount":1.5,{name} : 7 }}'
    lines[30] = f'{{"id":"o30","profile":"u1","ts":"2025-01-01","amount":1.5,{name}:8.0}}'
    folder = write(tmp_path / "data", {"profiles.jsonl": [], "orders.jsonl": lines})
    assert assert_same_load(tmp_path, folder) is None
    rows = store_entries(tmp_path / "columnar")["orders"]
    seven = rows[b"r\x1f" + (9).to_bytes(4, "big")]
    assert f"{name}:7".encode() in seven and f"{name}:7.".encode() not in seven
    assert f"{name}:8.0".encode() in rows[b"r\x1f" + (30).to_bytes(4, "big")]


def test_value_bitmaps_of_every_chunk_a_batch_touches_are_stored(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bitseg.index import store as store_module
    from bitseg.index.engine import Engine

    monkeypatch.setattr(store_module, "CHUNK_BITS", 3)  # bitmap chunks of 8 ids
    statuses = ["new", "paid", "sent"]
    batches = [[{"id": f"o{i}", "profile": f"u{i % 5}", "ts": "2025-01-01",
                 "status": statuses[i % 3 if i % 7 else 0],
                 "items": [{"sku": f"s{i % 4}"}]} for i in range(a, a + 13)]
               for a in (0, 13, 26)]
    batches[2].append({"id": "o3", "profile": "u3", "ts": "2025-01-01", "status": "sent",
                       "items": [{"sku": "s9"}]})  # an update: removals in an old chunk
    rules = [{"orders": {"field": "status", "op": "eq", "value": v}} for v in statuses] + \
            [{"orders": {"field": "items.sku", "op": "eq", "value": f"s{k}"}} for k in (0, 3, 9)]
    with Engine.open(tmp_path / "s") as engine:
        for batch in batches:
            engine.add_orders(batch)
        live = [engine.count(rule) for rule in rules]
    with Engine.open(tmp_path / "s") as engine:
        assert [engine.count(rule) for rule in rules] == live
    final = {line["id"]: line for batch in batches for line in batch}  # the later line wins
    expect = [len({o["profile"] for o in final.values() if o["status"] == v}) for v in statuses]
    expect += [len({o["profile"] for o in final.values() if o["items"][0]["sku"] == f"s{k}"})
               for k in (0, 3, 9)]
    assert live == expect


@pytest.mark.parametrize("gap", [None, 3])
def test_rows_with_every_field_are_written_in_one_join(tmp_path: Path, gap: int | None) -> None:
    # every row has every field and every item every key (one join), or row `gap` lacks
    # some (a text per column): the rows are the row path's bytes either way
    lines = [{"id": f"o{i}", "profile": f"u{i % 3}", "ts": "2025-01-01T10:00:00Z",
              "status": 'pa"id' if i % 2 else "new", "tags": ["b", "a", "b"], "vip": i % 2 == 0,
              "amount": i + 0.25, "n": i * 1000,
              "items": [{"sku": f"s\\{i}", "qty": i + 1, "price": 2.5}, {"sku": "ü", "qty": 1,
                                                                      "price": 0.5}]}
             for i in range(12)]
    if gap is not None:
        del lines[gap]["status"], lines[gap]["tags"]
        del lines[gap]["items"][1]["price"]
    folder = write(tmp_path / "data", {"profiles.jsonl": [], "orders.jsonl": lines})
    assert assert_same_load(tmp_path, folder) is None
