"""Orders clustered by profile (index/order_layout.py): the layout's order, and rules
evaluated through it (forced on a few orders) across writes that move, change and delete
orders, each published index with its own layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pyroaring import BitMap

from bitseg.index import orders as orders_module
from bitseg.index.order_batch import OrderBatch
from bitseg.index.order_layout import layout_of
from test_orders import AS_OF, DAY, Orders, iso, merge, reference

PAID_BAND = {"orders": {"field": "status", "op": "eq", "value": "paid"},
             "having": {"agg": "sum", "of": "amount", "op": "between", "value": [100, 300]}}
RECENT = {"orders": {"field": "status", "op": "in", "value": ["paid", "delivered"]},
          "window": {"last_days": 30},
          "having": {"agg": "count", "op": "gte", "value": 2}}
BIGGEST = {"orders": {"all": True}, "window": {"last_days": 400},
           "having": {"agg": "max", "of": "amount", "op": "gte", "value": 200}}
RULES = (PAID_BAND, RECENT, BIGGEST)


def line(oid: str, profile: str, days_ago: float, status: str, amount: float) -> dict:
    return {"id": oid, "profile": profile, "ts": iso(AS_OF - days_ago * DAY),
            "status": status, "amount": amount}


FIRST = [line("o1", "u1", 3, "paid", 150.0), line("o2", "u2", 40, "paid", 90.0),
         line("o3", "u1", 1, "delivered", 20.0), line("o4", "u3", 10, "paid", 250.0),
         line("o5", "u2", 2, "paid", 5.0), line("o6", "u3", 5, "delivered", 60.0)]


@pytest.fixture
def orders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(orders_module, "LAYOUT_MIN_ORDERS", 0)  # every rule by the layout
    o = Orders(tmp_path / "s")
    yield o
    o.close()


def check(orders: Orders, lines: list[dict]) -> dict[str, set[str]]:
    answers = {}
    for n, rule in enumerate(RULES):
        got = orders.members(rule)
        assert got == reference(rule, merge(lines), set(orders.profiles.ids)), rule
        answers[str(n)] = got
    return answers


def test_positions_run_by_profile_then_time(orders):
    orders.load(FIRST)
    layout = layout_of(orders.index)
    index = orders.index
    owner, ts = index.owner[layout.perm], index.ts[layout.perm]
    assert np.array_equal(owner, layout.owner)
    keys = list(zip(owner.tolist(), ts.tolist(), layout.perm.tolist(), strict=True))
    assert keys == sorted(keys)  # by profile, then time, then order id
    assert np.array_equal(layout.pos[layout.perm], np.arange(len(FIRST)))
    assert layout_of(index) is layout  # kept while the index lives


def test_writes_publish_indexes_with_their_own_layout(orders):
    orders.load(FIRST)
    first_index, first_live = orders.index, BitMap(orders.profiles.live)
    before = check(orders, FIRST)
    assert before["0"] == {"u1", "u3"} and before["1"] == {"u1", "u3"}
    # an upsert moves o4 to u1 and changes its amount; o5 becomes pending; a new order
    later = [line("o4", "u1", 10, "paid", 120.0), line("o5", "u2", 2, "pending", 5.0),
             line("o7", "u2", 4, "paid", 150.0)]
    orders.load(later)
    assert layout_of(orders.index) is not layout_of(first_index)
    after = check(orders, FIRST + later)
    assert after["0"] == {"u1", "u2"} and after["1"] == {"u1"}
    # the index published before is unchanged, its layout too
    assert orders.members(PAID_BAND, first_index, first_live) == before["0"]
    # deleting u2's orders: a layout of the orders left
    with orders.store.write() as txn:
        batch = OrderBatch(orders.store, txn, orders.index, orders.schema,
                           orders.profiles.ensure)
        batch.drop_profiles(BitMap([orders.profiles.ids["u2"]]))
        orders.index, orders.schema = batch.finish()
    left = {oid: o for oid, o in merge(FIRST + later).items() if o["profile"] != "u2"}
    assert layout_of(orders.index).size == len(orders.index.live) == len(left) == 4
    assert orders.members(PAID_BAND) == {"u1"}  # 150 + 120
    for rule in RULES:
        assert orders.members(rule) == reference(rule, left, set(orders.profiles.ids)), rule
