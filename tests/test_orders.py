"""Orders (index/orders.py) against a brute-force Python evaluation of the same order dicts.

The reference below walks the JSON rule once per order with exact arithmetic; it shares
nothing with the engine except the rule's JSON.  Its choices are those documented in the
module docstring of index/orders.py (items.F = any item, ne/not_in = like keywords,
qty_each = every item and false without items, qty_sum / distinct = 0 without items).
"""

from __future__ import annotations

import dataclasses
import tempfile
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyroaring import BitMap

from bitseg.index import compare as compare_module
from bitseg.index import orders as orders_module
from bitseg.index import types as T
from bitseg.index.errors import DataError
from bitseg.index.order_batch import OrderBatch
from bitseg.index.order_index import OrderIndex, compute_runs, load_orders
from bitseg.index.orders import evaluate_orders
from bitseg.index.rules import parse_rule
from bitseg.index.schema import Schema
from bitseg.index.store import Store

UTC = timezone.utc
AS_OF = datetime(2026, 11, 1, 12, 30, 15, tzinfo=UTC)
AS_OF_US = T.parse_timestamp("2026-11-01T12:30:15Z")
DAY = timedelta(days=1)
US = timedelta(microseconds=1)

DECLARED = {"orders": {"status": "keyword", "source": "keyword", "amount": "float",
                       "items.brand": "keyword", "items.sku": "keyword", "items.qty": "int",
                       "items.price": "float"}}
SCHEMA = Schema().declare(DECLARED)


# ---------------------------------------------------------------------- harness


class Profiles:
    """A trivial ensure_profile: external -> dense, and the live bitmap."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}
        self.live = BitMap()

    def ensure(self, external: str) -> int:
        if external not in self.ids:
            self.ids[external] = len(self.ids)
            self.live.add(self.ids[external])
        return self.ids[external]

    def names(self, dense: BitMap) -> set[str]:
        back = {v: k for k, v in self.ids.items()}
        return {back[d] for d in dense}


class Orders:
    """Loads order lines into a real store, batch by batch, and evaluates rules."""

    def __init__(self, path: Path, schema: Schema = SCHEMA) -> None:
        self.path = path
        self.store = Store(path)
        self.schema = schema
        self.index = OrderIndex()
        self.profiles = Profiles()

    def load(self, lines: list[dict]) -> OrderBatch:
        with self.store.write() as txn:
            batch = OrderBatch(self.store, txn, self.index, self.schema, self.profiles.ensure)
            for line in lines:
                batch.add(line)
            self.index, self.schema = batch.finish()
        self.index = self.index.pinned(self.store.reader())  # as the engine does on commit
        return batch

    def reopen(self) -> OrderIndex:
        self.store.close()
        self.store = Store(self.path)
        with self.store.read() as txn:
            self.index = load_orders(self.store, txn, self.schema).pinned(self.store.reader())
        return self.index

    def members(self, rule: dict, index: OrderIndex | None = None,
                live: BitMap | None = None) -> set[str]:
        cond = parse_rule(rule, self.schema)
        live = self.profiles.live if live is None else live
        found = evaluate_orders(cond, index or self.index, live, AS_OF_US)
        assert found.issubset(live)
        # grouping by sort (few rows) and by bincount (many rows) agree, and with the
        # orders clustered by profile (index/order_layout.py), forced on these few orders
        saved = compare_module.DENSE_RATIO, orders_module.LAYOUT_MIN_ORDERS
        try:
            for ratio, least in ((0, 10**12), (10**12, 10**12), (0, 0)):
                compare_module.DENSE_RATIO, orders_module.LAYOUT_MIN_ORDERS = ratio, least
                assert evaluate_orders(cond, index or self.index, live, AS_OF_US) == found
        finally:
            compare_module.DENSE_RATIO, orders_module.LAYOUT_MIN_ORDERS = saved
        return self.profiles.names(found)

    def close(self) -> None:
        self.store.close()


@pytest.fixture
def orders(tmp_path: Path):
    o = Orders(tmp_path / "s")
    yield o
    o.close()


def iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# ---------------------------------------------------------------------- the reference


def merge(lines: list[dict]) -> dict[str, dict]:
    """Final state of every order after applying the lines in order."""
    state: dict[str, dict] = {}
    for line in lines:
        old = state.get(str(line["id"]), {})
        new = dict(old)
        for key, value in line.items():
            if value is None:
                new.pop(key, None)
            else:
                new[key] = value
        state[str(line["id"])] = new
    return state


def exact(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    return Fraction(Decimal(repr(value))) if isinstance(value, float) else Fraction(value)


def ts_of(value: Any) -> int:
    if isinstance(value, dict):
        return AS_OF_US - value["days_ago"] * T.US_PER_DAY
    return T.parse_timestamp(value)


def holds(op: str, x: Any, value: Any, conv=exact) -> bool:
    """One value against a condition (x present)."""
    if op == "eq":
        return x == conv(value)
    if op == "ne":
        return x != conv(value)
    if op == "in":
        return x in [conv(v) for v in value]
    if op == "not_in":
        return x not in [conv(v) for v in value]
    if op == "between":
        return conv(value[0]) <= x <= conv(value[1])
    c = conv(value)
    return {"gt": x > c, "gte": x >= c, "lt": x < c, "lte": x <= c}[op]


def qty_sum(order: dict) -> Fraction:
    return sum((exact(i["qty"]) for i in order.get("items") or [] if "qty" in i), Fraction(0))


def distinct(order: dict) -> int:
    items = order.get("items") or []
    return len({i["sku"] for i in items if "sku" in i}) + sum(1 for i in items if "sku" not in i)


def ref_cond(c: dict, order: dict) -> bool:
    name, op, value = c["field"], c["op"], c.get("value")
    items = order.get("items") or []
    if name == "ts":
        return holds(op, T.parse_timestamp(order["ts"]), value, ts_of) \
            if op not in ("exists", "not_exists") else op == "exists"
    if name == "items.qty_sum":
        return op == "exists" if op in ("exists", "not_exists") \
            else holds(op, qty_sum(order), value)
    if name == "items.distinct":
        return op == "exists" if op in ("exists", "not_exists") \
            else holds(op, Fraction(distinct(order)), value)
    if name == "items.qty_each":
        def one(item: dict) -> bool:
            if op == "exists":
                return "qty" in item
            if op == "not_exists":
                return "qty" not in item
            return "qty" in item and holds(op, exact(item["qty"]), value)
        return bool(items) and all(one(i) for i in items)
    if name.startswith("items."):
        key = name[6:]
        vals = [exact(i[key]) for i in items if key in i]
        if op == "exists":
            return bool(vals)
        if op == "not_exists":
            return not vals
        if op == "ne":
            return bool(vals) and exact(value) not in vals
        if op == "not_in":
            return bool(vals) and not any(exact(v) in vals for v in value)
        return any(holds(op, v, value) for v in vals)
    if op == "exists":
        return name in order
    if op == "not_exists":
        return name not in order
    return name in order and holds(op, exact(order[name]), value)


def ref_rule(rule: dict, order: dict) -> bool:
    if "and" in rule:
        return all(ref_rule(r, order) for r in rule["and"])
    if "or" in rule:
        return any(ref_rule(r, order) for r in rule["or"])
    if "not" in rule:
        return not ref_rule(rule["not"], order)
    if "all" in rule:
        return True
    return ref_cond(rule, order)


def in_window(window: dict | None, ts: int) -> bool:
    day = T.US_PER_DAY
    if window is None:
        return ts <= AS_OF_US
    if "last_days" in window:
        return AS_OF_US - window["last_days"] * day < ts <= AS_OF_US
    if "next_days" in window:
        return AS_OF_US < ts <= AS_OF_US + window["next_days"] * day
    return T.parse_timestamp(window["from"]) <= ts < T.parse_timestamp(window["to"])


def reference(rule: dict, state: dict[str, dict], profiles: set[str]) -> set[str]:
    having = rule.get("having", {"agg": "count", "op": "gte", "value": 1})
    rows: dict[str, list[dict]] = {p: [] for p in profiles}
    for order in state.values():
        if in_window(rule.get("window"), T.parse_timestamp(order["ts"])) \
                and ref_rule(rule["orders"], order):
            rows[order["profile"]].append(order)
    out = set()
    for profile, selected in rows.items():
        agg, op, value = having["agg"], having["op"], having["value"]
        if agg == "count":
            x = Fraction(len(selected))
        else:
            of = having["of"]
            if of == "items.qty_sum":
                vals = [qty_sum(o) for o in selected]
            elif of == "items.distinct":
                vals = [Fraction(distinct(o)) for o in selected]
            else:
                vals = [exact(o[of]) for o in selected if of in o]
            if agg == "sum":
                x = sum(vals, Fraction(0))
            elif not vals:
                continue
            else:
                x = {"avg": lambda v: sum(v, Fraction(0)) / len(v), "min": min,
                     "max": max}[agg](vals)
        if holds(op, x, value):
            out.add(profile)
    return out


# ---------------------------------------------------------------------- random data

STATUSES = ["paid", "delivered", "cancelled", "pending"]
BRANDS = ["acme", "zeta", "beta"]
SKUS = ["A", "B", "C", "D"]
SOURCES = ["direct", "email", "ads", "social"]
PROFILES = [f"u{i}" for i in range(6)]
EDGES = [0, 1, -1, 180 * 86_400_000_000, 180 * 86_400_000_000 - 1,
         180 * 86_400_000_000 + 1, 30 * 86_400_000_000, 7 * 86_400_000_000 + 5]

money = st.integers(0, 60_000).map(lambda c: float(Decimal(c) / 100))
moments = st.one_of(
    st.sampled_from(EDGES).map(lambda d: -d),
    st.integers(-200 * 86_400_000_000, 20 * 86_400_000_000),
    st.integers(-40 * 86_400_000_000, 0),
).map(lambda off: iso(AS_OF + off * US))
items = st.lists(st.fixed_dictionaries(
    {}, optional={"sku": st.sampled_from(SKUS), "brand": st.sampled_from(BRANDS),
                  "qty": st.integers(0, 4), "price": money}), max_size=4)


@st.composite
def order_lines(draw) -> list[dict]:
    n = draw(st.integers(1, 20))
    lines = []
    for _ in range(n):
        if lines and draw(st.integers(0, 3)) == 0:  # an update of an earlier order
            oid = draw(st.sampled_from([line["id"] for line in lines]))
            line = {"id": oid, "profile": draw(st.sampled_from(PROFILES[:3])), "ts": draw(moments)}
            for key, values in (("status", st.sampled_from(STATUSES)), ("amount", money),
                                ("source", st.sampled_from(SOURCES)), ("items", items)):
                choice = draw(st.integers(0, 3))
                if choice == 0:
                    line[key] = None
                elif choice == 1:
                    line[key] = draw(values)
            lines.append(line)
            continue
        line = {"id": f"o{len(lines)}", "profile": draw(st.sampled_from(PROFILES[:3])),
                "ts": draw(moments)}
        for key, values in (("status", st.sampled_from(STATUSES)), ("amount", money),
                            ("source", st.sampled_from(SOURCES)), ("items", items)):
            if draw(st.booleans()) or key == "status":
                line[key] = draw(values)
        lines.append(line)
    return lines


rule_money = st.integers(0, 60_000).map(lambda c: float(Decimal(c) / 100))


def pools(lines: list[dict]) -> tuple[Any, Any]:
    """Money and moment strategies biased towards the values in the data (to hit edges)."""
    amounts = sorted({v for line in lines for v in [line.get("amount")] + [
        i.get("price") for i in line.get("items") or []] if v is not None})
    stamps = sorted({line["ts"] for line in lines})
    money_ = st.one_of(st.sampled_from(amounts), rule_money) if amounts else rule_money
    moments_ = st.one_of(st.sampled_from(stamps), moments) if stamps else moments
    return money_, moments_


@st.composite
def leaves(draw, lines: list[dict]) -> dict:
    rule_money, moments = pools(lines)
    kind = draw(st.integers(0, 10))
    if kind == 0:
        op = draw(st.sampled_from(["eq", "ne", "in", "not_in", "exists", "not_exists"]))
        field = draw(st.sampled_from(["status", "source"]))
        pool = STATUSES if field == "status" else SOURCES
    elif kind == 1:
        op = draw(st.sampled_from(["eq", "ne", "in", "not_in", "exists", "not_exists"]))
        field = draw(st.sampled_from(["items.brand", "items.sku"]))
        pool = BRANDS if field == "items.brand" else SKUS
    else:
        field = draw(st.sampled_from(["amount", "items.price", "items.qty", "items.qty_sum",
                                      "items.qty_each", "items.distinct", "ts", "amount"]))
        ops = ["eq", "ne", "in", "not_in", "gt", "gte", "lt", "lte", "between"]
        if field not in ("items.qty_sum", "items.distinct"):
            ops += ["exists", "not_exists"]
        op = draw(st.sampled_from(ops))
        if field == "ts":
            scalar = draw(st.one_of(moments, st.integers(0, 200).map(lambda d: {"days_ago": d})))
            pair = sorted([draw(moments), draw(moments)])
            values = [draw(moments) for _ in range(2)]
        else:
            num = rule_money if field in ("amount", "items.price") else st.one_of(
                st.integers(0, 10), st.sampled_from([1.5, 2.0, 0.5]))
            scalar = draw(num)
            pair = sorted([draw(num), draw(num)])
            values = [draw(num) for _ in range(draw(st.integers(1, 3)))]
        cond = {"field": field, "op": op}
        if op in ("in", "not_in"):
            cond["value"] = values
        elif op == "between":
            cond["value"] = pair
        elif op not in ("exists", "not_exists"):
            cond["value"] = scalar
        return cond
    cond = {"field": field, "op": op}
    if op in ("in", "not_in"):
        cond["value"] = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=3))
    elif op in ("eq", "ne"):
        cond["value"] = draw(st.sampled_from(pool))
    return cond


def order_rules(lines: list[dict]) -> Any:
    return st.recursive(
        st.one_of(leaves(lines), st.just({"all": True})),
        lambda inner: st.one_of(
            st.lists(inner, min_size=1, max_size=3).map(lambda c: {"and": c}),
            st.lists(inner, min_size=1, max_size=3).map(lambda c: {"or": c}),
            inner.map(lambda c: {"not": c})),
        max_leaves=3)


def windows(lines: list[dict]) -> Any:
    _, moments = pools(lines)
    return st.one_of(
        st.none(),
        st.sampled_from([1, 7, 30, 180, 365]).map(lambda n: {"last_days": n}),
        st.sampled_from([30, 180]).map(lambda n: {"last_days": n}),
        st.sampled_from([1, 10]).map(lambda n: {"next_days": n}),
        st.tuples(moments, moments).map(lambda p: {"from": min(p), "to": max(p)}),
    )


@st.composite
def havings(draw, lines: list[dict]) -> dict | None:
    rule_money, _ = pools(lines)
    agg = draw(st.sampled_from(["none", "count", "sum", "avg", "min", "max"]))
    if agg == "none":
        return None
    op = draw(st.sampled_from(["eq", "ne", "gt", "gte", "lt", "lte", "between", "in",
                               "not_in"]))
    if agg == "count":
        num, of = st.integers(0, 3), None
    else:
        of = draw(st.sampled_from(["amount", "amount", "items.qty_sum", "items.distinct"]))
        num = rule_money if of == "amount" else st.one_of(st.integers(0, 8),
                                                          st.sampled_from([2.5, 0.5]))
    if op == "between":
        value = sorted([draw(num), draw(num)])
    elif op in ("in", "not_in"):
        value = draw(st.lists(num, min_size=1, max_size=3))
    else:
        value = draw(num)
    having = {"agg": agg, "op": op, "value": value}
    if of:
        having["of"] = of
    return having


@st.composite
def orders_rules(draw, lines: list[dict]) -> dict:
    rule = {"orders": draw(order_rules(lines))}
    window, having = draw(windows(lines)), draw(havings(lines))
    if window is not None:
        rule["window"] = window
    if having is not None:
        rule["having"] = having
    return rule


# ---------------------------------------------------------------------- properties


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(lines=order_lines(), data=st.data(), split=st.integers(0, 20))
def test_orders_match_brute_force(lines, data, split):
    rules = data.draw(st.lists(orders_rules(lines), min_size=1, max_size=8))
    with tempfile.TemporaryDirectory() as tmp:
        o = Orders(Path(tmp) / "s")
        try:
            o.load(lines[:split])
            first_index, first_live = o.index, BitMap(o.profiles.live)
            first_profiles = set(o.profiles.ids)
            first_answers = [o.members(r) for r in rules]
            for rule, before in zip(rules, first_answers, strict=True):
                assert before == reference(rule, merge(lines[:split]), first_profiles), rule
            o.load(lines[split:])
            state = merge(lines)
            profiles = set(o.profiles.ids)
            reopened = o.reopen()
            no_runs = dataclasses.replace(o.index, runs=None)
            assert np.array_equal(o.index.runs, compute_runs(o.index.ts))
            assert np.array_equal(reopened.runs, o.index.runs)
            for rule, before in zip(rules, first_answers, strict=True):
                expected = reference(rule, state, profiles)
                assert o.members(rule) == expected, rule
                assert o.members(rule, reopened) == expected, rule
                assert o.members(rule, no_runs) == expected, rule
                # the index published before the second batch is unchanged
                assert o.members(rule, first_index, first_live) == before, rule
        finally:
            o.close()



# ---------------------------------------------------------------------- seed use cases

SEED = [
    # u1: acme 250 (paid, 20 days ago) + acme 100 (delivered, 100 days ago) -> 350 > 300
    {"id": "a1", "profile": "u1", "ts": iso(AS_OF - 20 * DAY), "status": "paid", "amount": 250.0,
     "source": "ads", "items": [{"sku": "A1", "brand": "acme", "qty": 1, "price": 250.0}]},
    {"id": "a2", "profile": "u1", "ts": iso(AS_OF - 100 * DAY), "status": "delivered",
     "amount": 100.0, "source": "social",
     "items": [{"sku": "A2", "brand": "acme", "qty": 2, "price": 50.0}]},
    # u2: acme 400 but cancelled; zeta 500 paid -> no
    {"id": "b1", "profile": "u2", "ts": iso(AS_OF - 10 * DAY), "status": "cancelled",
     "amount": 400.0, "source": "ads", "items": [{"sku": "A1", "brand": "acme", "qty": 1}]},
    {"id": "b2", "profile": "u2", "ts": iso(AS_OF - 10 * DAY), "status": "paid", "amount": 500.0,
     "source": "email", "items": [{"sku": "Z1", "brand": "zeta", "qty": 1}]},
    # u3: acme 301 paid but 181 days ago (outside), + acme 0.01 inside -> no
    {"id": "c1", "profile": "u3", "ts": iso(AS_OF - 181 * DAY), "status": "paid", "amount": 301.0,
     "source": "ads", "items": [{"sku": "A1", "brand": "acme", "qty": 1}]},
    {"id": "c2", "profile": "u3", "ts": iso(AS_OF - DAY), "status": "paid", "amount": 0.01,
     "source": "direct", "items": [{"sku": "A3", "brand": "acme", "qty": 1}]},
    # u4: mixed basket with acme, 300.01 paid, exactly 180 days ago minus 1 µs (inside) -> yes
    {"id": "d1", "profile": "u4", "ts": iso(AS_OF - 180 * DAY + US), "status": "paid",
     "amount": 300.01, "source": "ads",
     "items": [{"sku": "Z1", "brand": "zeta", "qty": 1}, {"sku": "A1", "brand": "acme", "qty": 1}]},
    # u5: acme exactly 300.00 -> not > 300
    {"id": "e1", "profile": "u5", "ts": iso(AS_OF - 5 * DAY), "status": "delivered",
     "amount": 300.0, "source": "social", "items": [{"sku": "A1", "brand": "acme", "qty": 3}]},
    # u6: acme 350 paid exactly 180 days ago (the window is (as_of - 180d, as_of]) -> no
    {"id": "f1", "profile": "u6", "ts": iso(AS_OF - 180 * DAY), "status": "paid",
     "amount": 350.0, "source": "ads", "items": [{"sku": "A1", "brand": "acme", "qty": 1}]},
    # u7: a big spender, all sources paid
    {"id": "g1", "profile": "u7", "ts": iso(AS_OF - 40 * DAY), "status": "paid", "amount": 999.99,
     "source": "ads", "items": [{"sku": "Z2", "brand": "zeta", "qty": 1}]},
    {"id": "g2", "profile": "u7", "ts": iso(AS_OF - 400 * DAY), "status": "delivered",
     "amount": 0.02, "source": "social", "items": []},
    # u8: an order in the future only
    {"id": "h1", "profile": "u8", "ts": iso(AS_OF + DAY), "status": "pending", "amount": 50.0,
     "source": "ads"},
]
ACME = {"orders": {"and": [{"field": "status", "op": "in", "value": ["paid", "delivered"]},
                           {"field": "items.brand", "op": "eq", "value": "acme"}]},
        "window": {"last_days": 180},
        "having": {"agg": "sum", "of": "amount", "op": "gt", "value": 300}}


def test_bought_brand_over_300_in_6_months(orders):
    orders.load(SEED)
    assert orders.members(ACME) == {"u1", "u4"}
    assert orders.members(ACME) == reference(ACME, merge(SEED), set(orders.profiles.ids))
    # a status change moves u2's cancelled acme order in: 400 > 300
    orders.load([{"id": "b1", "profile": "u2", "ts": iso(AS_OF - 10 * DAY), "status": "paid"}])
    assert orders.members(ACME) == {"u1", "u2", "u4"}
    # replacing u1's items drops acme from a1: only 100 left
    orders.load([{"id": "a1", "profile": "u1", "ts": iso(AS_OF - 20 * DAY),
                  "items": [{"sku": "Z9", "brand": "zeta", "qty": 1}]}])
    assert orders.members(ACME) == {"u2", "u4"}
    assert orders.members(ACME, orders.reopen()) == {"u2", "u4"}


def test_columns_are_read_lazily_and_as_of_their_own_version(orders):
    """A reopened index reads a field column only when a rule needs it, and an index
    taken before a batch that rewrote that column still reads its own values."""
    orders.load(SEED)
    before = orders.reopen()
    assert not before.columns.loaded("amount")
    orders.load([{"id": "a1", "profile": "u1", "ts": iso(AS_OF - 20 * DAY), "amount": 1}])
    assert orders.members(ACME, before) == {"u1", "u4"}  # a1 at its old amount
    assert before.columns.loaded("amount")
    assert orders.members(ACME) == {"u4"}  # u1's a1 is worth 1 now


def spent(op: str, value: Any) -> dict:
    return {"orders": {"field": "status", "op": "in", "value": ["paid", "delivered"]},
            "having": {"agg": "sum", "of": "amount", "op": op, "value": value}}


def test_spending_tiers(orders):
    orders.load(SEED)
    # paid/delivered sums by as_of: u1 350, u2 500, u3 301.01, u4 300.01, u5 300, u6 350,
    # u7 1000.01 (999.99 + 0.02); u8 nothing (its order is in the future and pending)
    assert orders.members(spent("lt", 100)) == {"u8"}
    assert orders.members(spent("between", [100, 500])) == {"u1", "u2", "u3", "u4", "u5", "u6"}
    assert orders.members(spent("between", [500, 1000])) == {"u2"}
    assert orders.members(spent("gt", 1000)) == {"u7"}
    assert orders.members(spent("gt", 1000.01)) == set()
    assert orders.members(spent("gte", 1000.01)) == {"u7"}
    assert orders.members(spent("eq", 300.01)) == {"u4"}
    assert orders.members(spent("lte", 300)) == {"u5", "u8"}


def test_only_paid_sources_never_direct_or_email(orders):
    orders.load(SEED)
    has_orders = orders.members({"orders": {"all": True}})
    never = orders.members({"orders": {"field": "source", "op": "in", "value": ["direct", "email"]},
                            "having": {"agg": "count", "op": "eq", "value": 0}})
    assert has_orders == {"u1", "u2", "u3", "u4", "u5", "u6", "u7"}  # u8's is in the future
    assert never == {"u1", "u4", "u5", "u6", "u7", "u8"}
    assert has_orders & never == {"u1", "u4", "u5", "u6", "u7"}


def test_item_readings(orders):
    lines = [
        {"id": 1, "profile": "p1", "ts": iso(AS_OF - DAY), "items": [
            {"sku": "A", "qty": 2}, {"sku": "A", "qty": 3}, {"sku": "B", "qty": 2}]},
        {"id": 2, "profile": "p2", "ts": iso(AS_OF - DAY), "items": [{"qty": 1}, {"qty": 1}]},
        {"id": 3, "profile": "p3", "ts": iso(AS_OF - DAY), "items": []},
        {"id": 4, "profile": "p4", "ts": iso(AS_OF - DAY), "items": [{"sku": "C"}, {"sku": "D",
                                                                                   "qty": 5}]},
    ]
    orders.load(lines)

    def m(field, op, value=None):
        cond = {"field": field, "op": op}
        if value is not None:
            cond["value"] = value
        return orders.members({"orders": cond})

    assert m("items.qty_sum", "eq", 7) == {"p1"}
    assert m("items.qty_sum", "eq", 0) == {"p3"}
    assert m("items.qty_sum", "eq", 5) == {"p4"}
    assert m("items.distinct", "eq", 2) == {"p1", "p2", "p4"}
    assert m("items.distinct", "eq", 0) == {"p3"}
    assert m("items.qty", "eq", 3) == {"p1"}
    assert m("items.qty", "gte", 3) == {"p1", "p4"}
    assert m("items.qty", "between", [4, 9]) == {"p4"}
    assert m("items.qty", "ne", 2) == {"p2", "p4"}
    assert m("items.qty", "not_exists") == {"p3"}
    assert m("items.qty_each", "gte", 2) == {"p1"}
    assert m("items.qty_each", "lt", 2) == {"p2"}
    assert m("items.qty_each", "exists") == {"p1", "p2"}
    assert m("items.qty_each", "not_exists") == set()
    assert m("items.sku", "ne", "A") == {"p4"}
    assert m("items.sku", "not_exists") == {"p2", "p3"}
    for field, op, value in [("items.qty_sum", "gt", 4), ("items.qty_each", "ne", 2),
                             ("items.distinct", "lt", 2)]:
        rule = {"orders": {"field": field, "op": op, "value": value}}
        assert orders.members(rule) == reference(rule, merge(lines), set(orders.profiles.ids))


def test_window_edges_and_aggregates(orders):
    lines = [
        {"id": "x1", "profile": "p1", "ts": iso(AS_OF), "amount": 10.5},
        {"id": "x2", "profile": "p1", "ts": iso(AS_OF - 30 * DAY), "amount": 20.25},
        {"id": "x3", "profile": "p1", "ts": iso(AS_OF - 30 * DAY + US), "amount": 1.0},
        {"id": "x4", "profile": "p2", "ts": iso(AS_OF + US), "amount": 99.0},
        {"id": "x5", "profile": "p2", "ts": iso(AS_OF - 2 * DAY)},
        {"id": "x6", "profile": "p3", "ts": iso(AS_OF - 3 * DAY), "amount": 7.0},
    ]
    orders.load(lines)
    allrows = {"all": True}
    last30 = {"last_days": 30}
    assert orders.members({"orders": allrows, "window": last30,
                           "having": {"agg": "count", "op": "eq", "value": 2}}) == {"p1"}
    assert orders.members({"orders": allrows, "window": {"next_days": 1}}) == {"p2"}
    assert orders.members({"orders": allrows, "window": last30,
                           "having": {"agg": "avg", "of": "amount", "op": "eq",
                                      "value": 5.75}}) == {"p1"}
    assert orders.members({"orders": allrows, "having": {"agg": "min", "of": "amount",
                                                         "op": "lt", "value": 2}}) == {"p1"}
    assert orders.members({"orders": allrows, "having": {"agg": "max", "of": "amount",
                                                         "op": "gte", "value": 20.25}}) == {"p1"}
    # p2's only past order has no amount: sum 0, no avg / min / max
    assert orders.members({"orders": allrows, "having": {"agg": "sum", "of": "amount",
                                                         "op": "eq", "value": 0}}) == {"p2"}
    assert orders.members({"orders": allrows, "having": {"agg": "max", "of": "amount",
                                                         "op": "lt", "value": 1000}}) == {"p1",
                                                                                          "p3"}
    frm = {"from": iso(AS_OF - 30 * DAY), "to": iso(AS_OF)}
    assert orders.members({"orders": allrows, "window": frm,
                           "having": {"agg": "sum", "of": "amount", "op": "eq",
                                      "value": 21.25}}) == {"p1"}
    for rule in [{"orders": allrows, "window": frm, "having": {"agg": "count", "op": "lt",
                                                                "value": 2}},
                 {"orders": {"field": "ts", "op": "gte", "value": {"days_ago": 30}}}]:
        assert orders.members(rule) == reference(rule, merge(lines), set(orders.profiles.ids))


def test_huge_sums_stay_exact(orders):
    big = 40_000_000_000.25  # near the largest order value; three overflow int64 keys
    orders.load([{"id": i, "profile": "p1", "ts": iso(AS_OF - DAY), "amount": big}
                 for i in range(3)] + [{"id": 9, "profile": "p2", "ts": iso(AS_OF - DAY),
                                        "amount": 1.0}])

    def m(agg, op, value):
        return orders.members({"orders": {"all": True},
                               "having": {"agg": agg, "of": "amount", "op": op, "value": value}})

    assert m("sum", "eq", 120_000_000_000.75) == {"p1"}
    assert m("sum", "gt", 120_000_000_000.74) == {"p1"}
    assert m("sum", "lt", 120_000_000_000.75) == {"p2"}
    assert m("avg", "eq", big) == {"p1"}
    assert m("max", "eq", big) == {"p1"}
    with pytest.raises(DataError) as err:
        orders.load([{"id": 10, "profile": "p1", "ts": iso(AS_OF), "amount": 1e11}])
    assert err.value.field == "amount"


def test_inferred_fields_and_keywords(orders):
    orders.load([
        {"id": "k1", "profile": "p1", "ts": iso(AS_OF - DAY), "region": "EU", "gift": True,
         "tags": ["a", "b"], "items": [{"color": ["red", "blue"], "weight": 1.25}]},
        {"id": "k2", "profile": "p2", "ts": iso(AS_OF - DAY), "region": "NA", "gift": False,
         "items": [{"color": "green", "weight": 3}]},
    ])
    assert orders.schema.orders["region"] == "keyword"
    assert orders.schema.orders["tags"] == "keywords"
    assert orders.schema.orders["items.color"] == "keywords"
    assert orders.schema.orders["items.weight"] == "float"
    assert orders.members({"orders": {"field": "gift", "op": "eq", "value": True}}) == {"p1"}
    assert orders.members({"orders": {"field": "tags", "op": "has_all",
                                      "value": ["a", "b"]}}) == {"p1"}
    assert orders.members({"orders": {"field": "items.color", "op": "in",
                                      "value": ["blue", "green"]}}) == {"p1", "p2"}
    assert orders.members({"orders": {"field": "items.weight", "op": "gt",
                                      "value": 1.2}}) == {"p1", "p2"}
    assert orders.members({"orders": {"field": "items.weight", "op": "eq",
                                      "value": 1.25}}) == {"p1"}
    # null removes; a later line changes the profile
    orders.load([{"id": "k1", "profile": "p2", "ts": iso(AS_OF - DAY), "region": None,
                  "items": None}])
    assert orders.members({"orders": {"field": "region", "op": "exists"}}) == {"p2"}
    assert orders.members({"orders": {"field": "gift", "op": "eq", "value": True}}) == {"p2"}
    assert orders.members({"orders": {"field": "items.color", "op": "exists"}}) == {"p2"}
    assert orders.members({"orders": {"all": True},
                           "having": {"agg": "count", "op": "eq", "value": 0}}) == {"p1"}
    reopened = orders.reopen()
    assert orders.members({"orders": {"field": "gift", "op": "eq", "value": True}},
                          reopened) == {"p2"}


def test_long_values_and_ids(orders):
    long_value = "x" * 1000
    orders.load([{"id": "L" * 300, "profile": "p1", "ts": iso(AS_OF - DAY), "note": long_value,
                  "items": [{"brand": long_value + "!"}]}])
    rule = {"orders": {"field": "note", "op": "eq", "value": long_value}}
    item_rule = {"orders": {"field": "items.brand", "op": "eq", "value": long_value + "!"}}
    assert orders.members(rule) == orders.members(item_rule) == {"p1"}
    reopened = orders.reopen()
    assert orders.members(rule, reopened) == orders.members(item_rule, reopened) == {"p1"}
    with pytest.raises(DataError) as err:
        orders.load([{"id": "L" * 500, "profile": "p1", "ts": iso(AS_OF)}])
    assert err.value.field == "id"


def test_dates_in_orders_and_items(orders):
    orders.load([
        {"id": "d1", "profile": "p1", "ts": "2024-02-29T23:00:00Z", "due": "2026-11-03",
         "items": [{"made": "2020-11-01"}]},
        {"id": "d2", "profile": "p2", "ts": "2026-10-31T23:59:59.999999Z", "due": "2026-12-01",
         "items": [{"made": "2021-05-05"}, {"made": "2019-11-02"}]},
    ])
    assert orders.schema.orders["due"] == "date"
    assert orders.schema.orders["items.made"] == "date"

    def m(field, op, value):
        return orders.members({"orders": {"field": field, "op": op, "value": value}})

    assert m("due", "anniversary_in", {"next_days": 3}) == {"p1"}
    assert m("due", "lt", {"days_ago": -10}) == {"p1"}
    assert m("items.made", "anniversary_in", {"next_days": 1}) == {"p1"}
    assert m("items.made", "anniversary_in", {"next_days": 2}) == {"p1", "p2"}
    assert m("items.made", "between", ["2019-01-01", "2020-01-01"]) == {"p2"}
    assert m("ts", "anniversary_in", {"next_days": 1}) == set()
    assert m("ts", "anniversary_in", {"next_days": 365}) == {"p1", "p2"}
    assert m("ts", "gte", "2026-10-31T23:59:59.999999Z") == {"p2"}
    assert m("ts", "in", ["2026-10-31T23:59:59.999999Z"]) == {"p2"}
    assert m("ts", "ne", "2026-10-31T23:59:59.999999Z") == {"p1"}


@pytest.mark.parametrize("line, field", [
    ({"id": "z", "profile": "u", "amount": 1.0}, "ts"),
    ({"id": "z", "profile": "u", "ts": "yesterday"}, "ts"),
    ({"id": "z", "profile": "u", "ts": "2026-01-01", "amount": "12.5"}, "amount"),
    ({"id": "z", "profile": "u", "ts": "2026-01-01", "items": {"sku": "A"}}, "items"),
    ({"id": "z", "profile": "u", "ts": "2026-01-01", "items": ["A"]}, "items"),
    ({"id": "z", "profile": "u", "ts": "2026-01-01", "items": [{"qty": 1.5}]}, "items.qty"),
    ({"id": "z", "profile": "u", "ts": "2026-01-01", "items": [{"distinct": 1}]},
     "items.distinct"),
    ({"id": "z", "profile": "u", "ts": "2026-01-01", "items.x": 1}, "items.x"),
    ({"profile": "u", "ts": "2026-01-01"}, "id"),
    ({"id": "z", "ts": "2026-01-01"}, "profile"),
    ({"id": "z", "profile": "u", "ts": "2026-01-01", "extra": {"a": 1}}, "extra"),
])
def test_bad_lines_name_the_field_and_leave_nothing(orders, line, field):
    orders.load(SEED[:2])
    before = orders.members(ACME)
    with pytest.raises(DataError) as err:
        orders.load([SEED[2], line])
    assert err.value.field == field
    reopened = orders.reopen()
    assert reopened.count == 2
    assert orders.members(ACME, reopened) == before


def test_drop_profiles(orders):
    orders.load(SEED)
    gone = BitMap([orders.profiles.ids["u1"], orders.profiles.ids["u4"]])
    with orders.store.write() as txn:
        batch = OrderBatch(orders.store, txn, orders.index, orders.schema, orders.profiles.ensure)
        batch.drop_profiles(gone)
        orders.index, orders.schema = batch.finish()
    assert orders.members({"orders": {"all": True}, "window": {"last_days": 365}}) == {
        "u2", "u3", "u5", "u6", "u7"}
    assert orders.members(ACME, orders.reopen()) == set()
    # the order id is free again: a new line creates a new order
    orders.load([SEED[0]])
    assert orders.members(ACME) == set()
    assert orders.members({"orders": {"field": "amount", "op": "eq", "value": 250}}) == {"u1"}


def test_many_batches_append_in_place_and_reopen(orders):
    """Small batches (appends, updates, item replacement) keep old snapshots intact."""
    snapshots = []
    lines_so_far: list[dict] = []
    rule = {"orders": {"field": "items.qty", "op": "gte", "value": 2},
            "having": {"agg": "sum", "of": "amount", "op": "gte", "value": 10}}
    for k in range(30):
        line = {"id": f"n{k % 12}", "profile": f"u{k % 5}", "ts": iso(AS_OF - (30 - k) * DAY),
                "amount": float(k), "items": [{"sku": "A", "qty": k % 4}]}
        orders.load([line])
        lines_so_far.append(line)
        expected = reference(rule, merge(lines_so_far), set(orders.profiles.ids))
        snapshots.append((orders.index, expected))
    for index, expected in snapshots:
        assert orders.members(rule, index) == expected
    assert orders.members(rule, orders.reopen()) == snapshots[-1][1]


def test_order_totals_equal_a_direct_sum(tmp_path):
    from bitseg.index.engine import Engine
    from bitseg.index.orders import order_totals

    lines = [{"id": f"o{i}", "profile": f"p{i % 7}", "ts": f"2026-0{1 + i % 9}-01T00:00:00Z",
              "amount": round(i * 10.01, 2), "status": "paid"} for i in range(60)]
    lines.append({"id": "no-amount", "profile": "p1", "ts": "2026-01-01T00:00:00Z"})
    with Engine.open(tmp_path / "s") as engine:
        engine.declare_schema({"orders": {"amount": "float"}})
        engine.add_orders(lines)
        engine.add_orders([{"id": "o3", "profile": "p3", "ts": "2026-01-01T00:00:00Z",
                            "amount": 0.01}])  # an update replaces the amount
        lines[3]["amount"] = 0.01
        lines[3]["ts"] = "2026-01-01T00:00:00Z"
        chosen = {"p1", "p3", "p5"}
        profiles = BitMap(engine.dense_id(p) for p in chosen)
        as_of = T.parse_timestamp("2026-05-15T00:00:00Z")
        got = order_totals(engine.snapshot.orders, profiles, as_of)
        picked = [o for o in lines if o["profile"] in chosen
                  and T.parse_timestamp(o["ts"]) <= as_of]
        expected_total = sum(Fraction(str(o.get("amount", 0))) for o in picked)
        assert got == (len(picked), len({o["profile"] for o in picked}), expected_total)
        assert order_totals(engine.snapshot.orders, BitMap(), as_of) == (0, 0, 0)


def test_an_orders_rule_on_a_store_without_orders(tmp_path):
    from bitseg.index.engine import Engine

    with Engine.open(tmp_path / "s") as engine:
        engine.upsert_profiles([{"id": "a"}, {"id": "b"}])
        none = {"orders": {"all": True}, "having": {"agg": "count", "op": "eq", "value": 0}}
        some = {"orders": {"all": True}}
        assert sorted(engine.members(none)) == ["a", "b"]
        assert engine.members(some) == []
        assert engine.is_member("a", none) and not engine.is_member("a", some)
