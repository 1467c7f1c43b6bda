"""Orders clustered by profile (index/order_layout.py): the layout's order, and rules
evaluated through it (forced on a few orders) across writes that move, change and delete
orders, each published index with its own layout."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pyroaring import BitMap
from scratch import scratch_folder
from test_orders import AS_OF, AS_OF_US, DAY, Orders, iso, merge, reference
from test_top_recency import AS_OF as RECENCY_AS_OF
from test_top_recency import SETTINGS, WINDOWS, histories, naive_recency, recency_havings

from bitseg.index import order_layout
from bitseg.index import orders as orders_module
from bitseg.index.engine import Engine
from bitseg.index.order_batch import OrderBatch
from bitseg.index.order_layout import layout_of
from bitseg.index.orders import evaluate_orders
from bitseg.index.rules import parse_rule

PAID_BAND = {"orders": {"field": "status", "op": "eq", "value": "paid"},
             "having": {"agg": "sum", "of": "amount", "op": "between", "value": [100, 300]}}
RECENT = {"orders": {"field": "status", "op": "in", "value": ["paid", "delivered"]},
          "window": {"last_days": 30},
          "having": {"agg": "count", "op": "gte", "value": 2}}
BIGGEST = {"orders": {"all": True}, "window": {"last_days": 400},
           "having": {"agg": "max", "of": "amount", "op": "gte", "value": 200}}
WEEK = {"orders": {"field": "status", "op": "ne", "value": "pending"},
        "window": {"last_days": 7}, "having": {"agg": "sum", "of": "amount", "op": "gt",
                                                "value": 100}}
RULES = (PAID_BAND, RECENT, BIGGEST, WEEK)


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
    index = orders.index
    layout = layout_of(index)
    owner, ts = index.owner[layout.perm], index.ts[layout.perm]
    keys = list(zip(owner.tolist(), ts.tolist(), layout.perm.tolist(), strict=True))
    assert keys == sorted(keys)  # by profile, then time, then order id
    assert np.array_equal(layout.pos[layout.perm], np.arange(len(FIRST)))
    assert layout_of(index) is layout  # kept while the index lives
    # a rule's rows: in layout order, one run per profile
    paid = BitMap([2, 0, 4, 1, 3])
    kept = layout.kept("paid", lambda: paid)
    assert kept.ids.tolist() == [i for i in layout.perm.tolist() if i in paid]
    assert layout.kept("paid", lambda: BitMap()) is kept
    runs = np.split(index.owner[kept.ids], kept.bounds[1:-1])
    assert [set(r.tolist()) for r in runs] == [{p} for p in kept.profiles.tolist()]
    assert np.array_equal(kept.ts, index.ts[kept.ids])


def test_writes_publish_indexes_with_their_own_layout(orders):
    orders.load(FIRST)
    first_index, first_live = orders.index, BitMap(orders.profiles.live)
    before = check(orders, FIRST)
    assert before["0"] == {"u1", "u3"} and before["1"] == {"u1", "u3"}
    assert before["3"] == {"u1"}  # 150 + 20; u3's 250 is 10 days old
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


PAID = ("orders", {"field": "status", "op": "eq", "value": "paid"}, None)


@SETTINGS
@given(histories(), WINDOWS, st.data())
def test_first_and_last_of_a_rules_orders_by_the_layout(history, window, data) -> None:
    """first / last over the paid orders in a window, through the layout (the window as
    ts filled in outside it), against the raw rows (test_top_recency's reference)."""
    pids, _, orders = history
    having = data.draw(recency_havings([o["ts"] for o in orders]), label="having")
    rule: dict[str, Any] = {"orders": PAID[1], "having": having}
    if window is not None:
        rule["window"] = window
    engine = Engine.open(scratch_folder("bitseg-layout-"))
    try:
        engine.cache_results = False
        engine.declare_schema({"orders": {"status": "keyword"}})
        engine.upsert_profiles([{"id": p} for p in pids])
        if orders:
            engine.add_orders(orders)
        expected = naive_recency(pids, [], orders, PAID, window, having)
        with mock.patch.object(orders_module, "LAYOUT_MIN_ORDERS", 0):
            assert set(engine.members(rule, as_of=RECENCY_AS_OF)) == expected, rule
    finally:
        engine.close()


def test_a_large_index_builds_its_layout_on_a_thread(orders, monkeypatch):
    """Above LAYOUT_BACKGROUND orders the first question is answered from rows while a
    thread builds the layout, the next from rows while a thread keeps the rule's rows
    (seconds at 10M: a write must not make the next count wait for them); later ones use
    them."""
    monkeypatch.setattr(orders_module, "LAYOUT_BACKGROUND", 0)
    orders.load(FIRST)
    index = orders.index
    assert order_layout._LAYOUTS.get(index) is None
    built = threading.Event()
    real = order_layout.OrderLayout

    def slow(index):  # held until the first answer is in
        assert built.wait(10)
        return real(index)

    monkeypatch.setattr(order_layout, "OrderLayout", slow)
    cond = parse_rule(PAID_BAND, orders.schema)
    want = reference(PAID_BAND, merge(FIRST), set(orders.profiles.ids))
    first = evaluate_orders(cond, index, orders.profiles.live, AS_OF_US)
    assert orders.profiles.names(first) == want
    built.set()
    layout = layout_of(index)  # waits for the thread's build
    assert layout is layout_of(index, wait=False)
    kept = threading.Event()
    real_keep = layout._keep

    def slow_keep(rule, select):  # held until the second answer is in
        assert kept.wait(10)
        return real_keep(rule, select)

    monkeypatch.setattr(layout, "_keep", slow_keep)
    assert orders.profiles.names(evaluate_orders(cond, index, orders.profiles.live,
                                                 AS_OF_US)) == want
    assert not layout._kept  # answered from rows: the rule's rows are still being made
    kept.set()
    for _ in range(1000):
        if not layout._making:
            break
        time.sleep(0.01)
    assert len(layout._kept) == 1
    assert orders.profiles.names(evaluate_orders(cond, index, orders.profiles.live,
                                                 AS_OF_US)) == want


def test_kept_rules_are_the_last_used_within_their_byte_budget(orders, monkeypatch):
    orders.load(FIRST)
    layout = layout_of(orders.index)
    everything = layout.kept("all", lambda: orders.index.live)
    assert everything.ids is layout.perm  # every live order: the layout's own ids
    assert layout.nbytes() == layout.perm.nbytes + layout.pos.nbytes + \
        everything.nbytes() - everything.ids.nbytes
    monkeypatch.setattr(order_layout, "KEPT_RULES", 2)
    for name in ("a", "b", "a", "c"):  # "a" used again: "b" is the oldest
        layout.kept(name, lambda: BitMap([0, 1]))
    assert list(layout._kept) == ["a", "c"]
    monkeypatch.setattr(order_layout, "KEPT_BYTES", 0)
    layout.kept("d", lambda: BitMap([2]))
    assert list(layout._kept) == ["d"]  # over the budget alone: kept, the others dropped


def _kept_of(owners: list[int], ts: list[int], amounts: list[int | None]) -> order_layout.Kept:
    """A Kept over hand-made order columns (ids sorted by owner, then ts, as a layout's)."""
    from types import SimpleNamespace
    keys = np.array([0 if a is None else a for a in amounts], dtype=np.int64)
    valid = np.array([a is not None for a in amounts], dtype=bool)
    col = SimpleNamespace(keys=keys, valid=valid, complete=bool(valid.all()),
                          bound=int(np.abs(keys).max(initial=0)))
    index = SimpleNamespace(owner_buf=np.array(owners, dtype=np.uint32),
                            ts_buf=np.array(ts, dtype=np.int64), columns={"amount": col})
    order = sorted(range(len(owners)), key=lambda i: (owners[i], ts[i], i))
    return order_layout.Kept(index, np.array(order, dtype=np.uint32))  # type: ignore[arg-type]


@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 12),
                          st.one_of(st.none(), st.integers(-50, 50))), max_size=30),
       st.one_of(st.none(), st.integers(-1, 14)), st.integers(-1, 14))
def test_window_groups_are_the_profiles_with_rows_in_it(rows, lo, hi):
    """_Runs groups exactly the profiles with a kept row in [lo, hi): each group's
    stretch holds its rows there (counts, sums from cumulative sums and by reduce, min),
    whatever the window cuts (run starts, ends, middles, ties in ts, adjacent runs)."""
    kept = _kept_of([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])
    runs = orders_module._Runs(kept, lo, hi)
    inside = [r for r in rows if (lo is None or r[1] >= lo) and r[1] < hi]
    want = sorted({r[0] for r in inside})
    assert list(runs.profiles(np.ones(runs.size, dtype=bool))) == want
    assert runs.has.all()
    mine = {p: [r[2] for r in inside if r[0] == p] for p in want}
    assert runs.counts.tolist() == [len(mine[p]) for p in want]
    amounts = {p: [a for a in mine[p] if a is not None] for p in want}
    keys, valid = kept.keys("amount")
    values = keys if valid is None else np.where(valid, keys, 0)
    assert runs.reduce(np.add, values, 0).tolist() == [sum(amounts[p]) for p in want]
    assert runs.sums("amount") is None or all(r[2] is not None for r in rows)
    full = _kept_of([r[0] for r in rows], [r[1] for r in rows], [r[2] or 0 for r in rows])
    sums = orders_module._Runs(full, lo, hi).sums("amount")  # no gaps: cumulative sums
    assert sums.tolist() == [sum(amounts[p]) for p in want]
    big = np.iinfo(np.int64).max
    least = runs.reduce(np.minimum, values if valid is None else np.where(valid, keys, big),
                        big)
    assert least.tolist() == [min(amounts[p], default=big) for p in want]
    ones = runs.reduce(np.add, np.ones(len(kept), dtype=object), 0)  # object: reduceat
    assert ones.tolist() == [len(mine[p]) for p in want]
