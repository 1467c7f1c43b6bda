"""Order rows in compressed runs and under keys of their own (index/order_rows.py),
against a plain dict of id -> row; and the store format that says which layout a
store may hold."""

from __future__ import annotations

from pathlib import Path

import lmdb
import orjson
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyroaring import BitMap
from test_columnar import write

from bitseg.index import order_rows
from bitseg.index import store as store_module
from bitseg.index.engine import Engine
from bitseg.index.errors import StoreError
from bitseg.index.keys import ORDER_ROWS, ORDER_RUNS
from bitseg.index.order_batch import OrderBatch
from bitseg.index.order_rows import OrderRows, pack, unpack
from bitseg.index.store import Store
from bitseg.loaders.dataset import load_dataset

ROW = st.text(min_size=1, max_size=40).map(str.encode)


@given(rows=st.lists(ROW, min_size=1, max_size=60), cut=st.integers(0, 5),
       large=st.booleans())
@settings(max_examples=150, deadline=None)
def test_a_run_unpacks_to_its_rows(rows: list[bytes], cut: int, large: bool) -> None:
    """Whatever the array's type and offset (a slice of a larger block)."""
    texts = pa.array([b"x" * 3] * cut + rows, pa.large_binary() if large else pa.binary())
    assert unpack(pack(texts.slice(cut))) == rows


def test_a_run_of_a_codec_this_bitseg_lacks_is_a_store_error() -> None:
    value = bytearray(pack(pa.array([b'{"x":"o1"}'], pa.binary())))
    assert unpack(bytes(value)) == [b'{"x":"o1"}']
    value[0] = 9
    with pytest.raises(StoreError, match="codec 9, which this bitseg does not read"):
        unpack(bytes(value))


# an operation: ("append", rows) new ids in one run; ("put", at, row) on an id at
# (mod the ids so far; or a new id past them); ("delete", at); ("commit",)
OPS = st.lists(st.one_of(
    st.tuples(st.just("append"), st.lists(ROW, min_size=1, max_size=9)),
    st.tuples(st.just("put"), st.integers(0, 40), ROW),
    st.tuples(st.just("delete"), st.integers(0, 40)),
    st.tuples(st.just("commit"))), max_size=30)


@given(ops=OPS)
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_rows_read_back_as_a_dict_holds_them(tmp_path_factory: pytest.TempPathFactory,
                                              monkeypatch: pytest.MonkeyPatch,
                                              ops: list) -> None:
    """Runs of 4 rows, so a few appends span several; a row's own key wins over its run,
    a deleted row is gone from both, across commits and a reopen."""
    monkeypatch.setattr(order_rows, "RUN_ROWS", 4)
    store = Store(tmp_path_factory.mktemp("rows"))
    model: dict[int, bytes] = {}
    next_id = 0
    try:
        txn_cm = store.write()
        txn = txn_cm.__enter__()
        rows = OrderRows(store, txn)
        for op in ops:
            if op[0] == "append":
                rows.append(next_id, lambda texts=op[1]: pa.array(texts, pa.binary()))
                model.update((next_id + i, row) for i, row in enumerate(op[1]))
                next_id += len(op[1])
            elif op[0] == "put":
                oid = op[1] % (next_id + 1)
                next_id = max(next_id, oid + 1)
                rows.put(oid, op[2])
                model[oid] = op[2]
            elif op[0] == "delete" and next_id:
                oid = op[1] % next_id
                rows.delete(oid)
                model.pop(oid, None)
            elif op[0] == "commit":
                rows.close()
                txn_cm.__exit__(None, None, None)
                txn_cm = store.write()
                txn = txn_cm.__enter__()
                rows = OrderRows(store, txn)
            _assert_same(rows, model, next_id)
        rows.close()
        txn_cm.__exit__(None, None, None)
        path = store.path
        store.close()
        store = Store(path)
        with store.write() as txn:
            _assert_same(OrderRows(store, txn), model, next_id)
    finally:
        store.close()


def _assert_same(rows: OrderRows, model: dict[int, bytes], ids: int) -> None:
    for oid in range(ids + 2):
        assert rows.get(oid) == model.get(oid), oid
    assert list(rows.items()) == sorted(model.items())


def test_a_load_packs_its_orders_in_runs_and_a_later_line_reads_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The block path writes runs, no key per row; an upsert of a loaded order and a
    profile's deletion read those rows back and leave the right ones."""
    monkeypatch.setattr(order_rows, "RUN_ROWS", 8)
    lines = [{"id": f"o{i}", "profile": f"u{i % 5}", "ts": "2025-01-01T10:00:00Z",
              "amount": 10.0 + i, "status": "paid", "items": [{"sku": f"s{i % 3}", "qty": 1}]}
             for i in range(40)]
    folder = write(tmp_path / "data", {"profiles.jsonl": [{"id": f"u{i}"} for i in range(5)],
                                       "orders.jsonl": lines})
    with Engine.open(tmp_path / "db") as engine:
        load_dataset(folder, engine, columnar=True)
        store = engine.store
        with store.read() as txn:
            assert len(list(store.items(txn, "orders", ORDER_RUNS))) == 5
            assert list(store.items(txn, "orders", ORDER_ROWS)) == []
        # o7 given again (its amount changes through add(), over its run's copy)
        engine.add_orders([{"id": "o7", "profile": "u2", "ts": "2025-01-02T10:00:00Z",
                            "amount": 99.5}])
        assert engine.count({"orders": {"field": "amount", "op": "gte", "value": 99}}) == 1
        # then profile u1's orders (o1, o6, o11, ...) dropped: marked gone over their runs
        snap = engine.snapshot
        with store.write() as txn:
            batch = OrderBatch(store, txn, snap.orders, snap.schema, lambda external: 0)
            batch.drop_profiles(BitMap([engine.dense_id("u1")]))
            batch.finish()
            live = dict(OrderRows(store, txn).items())
    assert len(live) == 40 - 8
    o7 = orjson.loads(live[7])
    assert o7["x"] == "o7" and o7["f"]["amount"] == 99.5 and o7["f"]["status"] == "paid"
    gone = {f"o{i}" for i in range(1, 40, 5)}
    assert not any(orjson.loads(row)["x"] in gone for row in live.values())


def test_a_format_1_store_is_read_and_marked_2_when_opened_to_write(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    with store.write() as txn:
        store.put_json(txn, "format", 1)
    store.close()
    reader = Store(tmp_path / "db", readonly=True)
    with reader.read() as txn:
        assert reader.get_json(txn, "format") == 1
    reader.close()
    store = Store(tmp_path / "db")
    with store.read() as txn:
        assert store.get_json(txn, "format") == store_module.FORMAT == 2
    store.close()


def test_a_store_of_a_later_format_is_refused_and_left_as_it_is(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    with store.write() as txn:
        store.put_json(txn, "format", 3)
    store.close()
    with pytest.raises(StoreError, match="store format 3, this bitseg reads 1 and 2"):
        Store(tmp_path / "db")
    env = lmdb.open(str(tmp_path / "db"), readonly=True, lock=False, max_dbs=16)
    with env.begin(db=env.open_db(b"meta", create=False)) as txn:
        assert orjson.loads(txn.get(b"format")) == 3
    env.close()
