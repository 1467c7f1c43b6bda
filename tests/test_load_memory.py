"""A load holds a bounded number of bytes whatever its file's size (issue 14, item 3).

An events batch spills its count runs past event_batch.RUN_BYTES (tests/test_event_group.py
makes that budget tiny); an orders batch spills its queued column writes and value
changes past order_batch.QUEUE_BYTES: key columns in whole chunks into the transaction,
owner / ts / item_owner into its buffers, values into their bitmap writers. Here that
budget is tiny (a spill after every block, and every few lines on the row path), the
column chunks are 8 ids, and the orders file updates and replaces the items of orders
spilled before: the store must be the one a load without spills leaves, entry by entry,
and a bad last line must still leave nothing of the file.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import orjson
import pytest
from storecmp import differences, store_entries

from bitseg.index import order_batch, order_keys, profile_blocks
from bitseg.index.engine import Engine
from bitseg.index.errors import DataError
from bitseg.index.profiles import ProfileBatch
from bitseg.loaders import columnar
from bitseg.loaders.dataset import load_dataset
from bitseg.loaders.gen import generate

RULES = [{"orders": {"field": "amount", "op": "gt", "value": 50}},
         {"orders": {"field": "items.price", "op": "lt", "value": 30}},
         {"orders": {"field": "status", "op": "eq", "value": "paid"}},
         {"orders": {"field": "items.qty_sum", "op": "gte", "value": 3}}]


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(order_keys, "COL_BITS", 3)
    monkeypatch.setattr(order_keys, "COL_CHUNK", 8)
    monkeypatch.setattr(columnar, "BLOCK_BYTES", 4096)
    monkeypatch.setattr(order_batch, "QUEUE_BYTES", order_batch.QUEUE_BYTES)
    monkeypatch.setattr(order_batch, "SPILL_CHECK", order_batch.SPILL_CHECK)


def _dataset(folder: Path) -> Path:
    """The generator's data, its orders file followed by lines that update orders from
    its start: new fields, other items (their old items killed), and one removed field."""
    generate(folder, profiles=120, seed=14)
    lines = (folder / "orders.jsonl").read_bytes().splitlines()
    first = [orjson.loads(line) for line in lines[:40]]
    more = []
    for i, order in enumerate(first):
        update: dict[str, Any] = {"id": order["id"], "profile": order["profile"],
                                  "ts": order["ts"]}
        if i % 3 == 0:
            update["items"] = [{"sku": f"new-{i}", "price": 7.5 + i, "qty": 1 + i % 4}]
        if i % 3 == 1:
            update["amount"] = 1000 + i
        if i % 3 == 2:
            update["status"] = None
        more.append(orjson.dumps(update))
    (folder / "orders.jsonl").write_bytes(b"\n".join(lines + more) + b"\n")
    return folder


def _spills(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the spills of every orders batch."""
    calls: list[int] = []
    original = order_batch.OrderBatch.spill

    def spy(self: Any) -> None:
        calls.append(self.count)
        original(self)

    monkeypatch.setattr(order_batch.OrderBatch, "spill", spy)
    return calls


def _load(store: Path, folder: Path, columnar_path: bool) -> list[int]:
    """Load the folder into a new store; the counts of RULES on the engine that loaded."""
    with Engine.open(store) as engine:
        load_dataset(folder, engine, columnar=columnar_path)
        return [engine.count(rule) for rule in RULES]


@pytest.mark.parametrize("columnar_path", [True, False])
def test_orders_spilled_at_a_tiny_budget_leave_the_same_store(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, columnar_path: bool) -> None:
    folder = _dataset(tmp_path / "data")
    calls = _spills(monkeypatch)
    whole = _load(tmp_path / "whole", folder, columnar_path)
    assert calls == []
    order_batch.QUEUE_BYTES = 64
    order_batch.SPILL_CHECK = 5
    spilled = _load(tmp_path / "spilled", folder, columnar_path)
    assert len(calls) > 10
    assert differences(tmp_path / "whole", tmp_path / "spilled") == []
    assert spilled == whole and min(whole) > 0
    with Engine.open(tmp_path / "spilled") as engine:  # reopened: read from the store
        assert [engine.count(rule) for rule in RULES] == whole


def test_a_bad_last_line_after_order_spills_leaves_nothing_of_the_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _dataset(tmp_path / "data")
    orders = (folder / "orders.jsonl").read_bytes()
    (folder / "orders.jsonl").unlink()
    store = tmp_path / "store"
    with Engine.open(store) as engine:
        load_dataset(folder, engine)  # profiles and events only
    before = store_entries(store)
    (folder / "orders.jsonl").write_bytes(orders + b'{"id": "bad", "profile": "p1"}\n')
    calls = _spills(monkeypatch)
    order_batch.QUEUE_BYTES = 64
    with Engine.open(store) as engine:
        with pytest.raises(DataError, match="ts is required"):
            engine.add_orders(columnar.iter_blocks(folder / "orders.jsonl"),
                              file="orders.jsonl")
    assert len(calls) > 10
    assert store_entries(store) == before
    shutil.rmtree(store)


def test_profiles_flushed_at_a_tiny_budget_leave_the_same_store(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "data"
    generate(folder, profiles=300, seed=15, events_per_profile=0, orders_per_profile=0)
    rules = [{"field": "age", "op": "between", "value": [30, 50]},
             {"field": "country", "op": "eq", "value": "DE"},
             {"field": "tags", "op": "in", "value": ["vip", "newsletter"]}]
    flushes: list[int] = []
    original = ProfileBatch.flush

    def spy(self: Any) -> None:
        flushes.append(self.created)
        original(self)

    monkeypatch.setattr(ProfileBatch, "flush", spy)
    counts = {}
    for way, budget in (("whole", profile_blocks.QUEUE_BYTES), ("flushed", 64)):
        monkeypatch.setattr(profile_blocks, "QUEUE_BYTES", budget)
        flushes.clear()
        with Engine.open(tmp_path / way) as engine:
            load_dataset(folder, engine)
            counts[way] = [engine.count(rule) for rule in rules]
        counts[way + " flushes"] = [len(flushes)]
    assert counts.pop("flushed flushes")[0] > counts.pop("whole flushes")[0] + 10
    assert differences(tmp_path / "whole", tmp_path / "flushed") == []
    assert counts["flushed"] == counts["whole"] and min(counts["whole"]) > 0
