"""Items as rows (CONTRACT §2.4b, index/items.py) against a plain-Python reference.

The reference walks the order dicts as loaded (the last line of an order id wins) and
the JSON rule, with exact Decimal arithmetic; it shares nothing with the engine but the
rule's JSON.  Its choices are those of index/items.py's docstring: a line without the
`of` value (spend: without price or qty) counts for count and first/last only.
"""

from __future__ import annotations

import contextlib
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scratch import scratch_folder

from bitseg.index import compare as compare_module
from bitseg.index import items as items_module
from bitseg.index import orders as orders_module
from bitseg.index import types as T
from bitseg.index.engine import Engine
from bitseg.index.errors import RuleError

UTC = timezone.utc
AS_OF = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
AS_OF_TEXT = "2026-11-01T12:00:00Z"
SCHEMA = {"orders": {"status": "keyword", "amount": "float", "items.brand": "keyword",
                     "items.tags": "keywords", "items.qty": "int", "items.price": "float"}}
PROFILES = [f"p{i}" for i in range(6)]
BRANDS = ["acme", "zed", "umbra"]
TAGS = ["sale", "new", "gift"]


def _engine(orders: list[dict]) -> Engine:
    engine = Engine.open(scratch_folder())
    engine.declare_schema(SCHEMA)
    engine.upsert_profiles([{"id": p} for p in PROFILES])
    if orders:
        engine.add_orders(orders)
    return engine


# ---------------------------------------------------------------------- reference


def _ts(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _cond(c: dict, row: dict) -> bool:
    """One condition on one item (or order) dict."""
    op, has = c["op"], row.get(c["field"]) is not None
    got = row.get(c["field"])
    values = set(got) if isinstance(got, list) else ({got} if has else set())
    if op == "exists":
        return has
    if op == "not_exists":
        return not has
    if not has:
        return False
    want = c["value"]
    if op == "eq":
        return want in values
    if op == "ne":
        return want not in values
    if op == "in":
        return bool(values & set(want))
    if op == "not_in":
        return not values & set(want)
    if op == "has_all":
        return set(want) <= values
    x, v = Decimal(str(got)), Decimal(str(want)) if op != "between" else None
    if op == "between":
        return Decimal(str(want[0])) <= x <= Decimal(str(want[1]))
    return {"gt": x > v, "gte": x >= v, "lt": x < v, "lte": x <= v}[op]


def _match(rule: dict, row: dict) -> bool:
    if "and" in rule:
        return all(_match(r, row) for r in rule["and"])
    if "or" in rule:
        return any(_match(r, row) for r in rule["or"])
    if "not" in rule:
        return not _match(rule["not"], row)
    if "all" in rule:
        return True
    return _cond(rule, row)


def _in_window(ts: datetime, window: dict | None) -> bool:
    if window is None:
        return ts <= AS_OF
    if "last_days" in window:
        return AS_OF - timedelta(days=window["last_days"]) < ts <= AS_OF
    return _ts(window["from"]) <= ts < _ts(window["to"])


def _compare(x: Any, op: str, v: Any) -> bool:
    if op == "between":
        return v[0] <= x <= v[1]
    if op in ("in", "not_in"):
        return (x in v) == (op == "in")
    return {"eq": x == v, "ne": x != v, "gt": x > v, "gte": x >= v, "lt": x < v,
            "lte": x <= v}[op]


def _dec(v: Any) -> Any:
    if isinstance(v, list):
        return [_dec(x) for x in v]
    if isinstance(v, dict):
        return AS_OF - timedelta(days=v["days_ago"])
    if isinstance(v, str):
        return _ts(v)
    return Decimal(str(v))


def reference(orders: list[dict], rule: dict, profile: str) -> bool:
    current: dict[str, dict] = {}
    for o in orders:
        current[o["id"]] = o
    lines = []
    for o in current.values():
        if o["profile"] != profile or not _in_window(_ts(o["ts"]), rule.get("window")):
            continue
        if "orders" in rule and not _match(rule["orders"], o):
            continue
        for item in o.get("items") or []:
            if _match(rule["items"], item):
                lines.append((item, _ts(o["ts"])))
    having = rule.get("having", {"agg": "count", "op": "gte", "value": 1})
    agg, op, value = having["agg"], having["op"], _dec(having["value"])
    if agg == "count":
        return _compare(Decimal(len(lines)), op, value)
    if agg in ("first", "last"):
        if not lines:
            return False
        stamps = [t for _, t in lines]
        return _compare(min(stamps) if agg == "first" else max(stamps), op, value)
    of = having["of"]
    got = []
    for item, _ in lines:
        if of == "spend":
            if item.get("price") is not None and item.get("qty") is not None:
                got.append(Decimal(str(item["price"])) * item["qty"])
        elif item.get(of) is not None:
            got.append(Decimal(str(item[of])))
    if agg == "sum":
        return _compare(sum(got, Decimal(0)), op, value)
    if not got:
        return False
    x = {"avg": lambda: sum(got, Decimal(0)) / len(got), "min": lambda: min(got),
         "max": lambda: max(got)}[agg]()
    return _compare(x, op, value)


# ---------------------------------------------------------------------- strategies

prices = st.sampled_from([None, 0, 0.01, 19.99, 5.5, 120, 300.01])
quantities = st.sampled_from([None, 1, 2, 3, 7])
items = st.fixed_dictionaries({}, optional={
    "brand": st.sampled_from(BRANDS), "qty": quantities, "price": prices,
    "tags": st.lists(st.sampled_from(TAGS), min_size=1, max_size=2, unique=True)})
days = st.integers(0, 400)


@st.composite
def order_lists(draw: Any) -> list[dict]:
    out = []
    replacing = draw(st.booleans())  # else distinct ids: item ids follow order ids
    for n in range(draw(st.integers(0, 10))):
        oid = f"o{draw(st.integers(0, n))}" if replacing else f"o{n}"  # a later line
        # replaces an order of the same id
        order = {"id": oid, "profile": draw(st.sampled_from(PROFILES)),
                 "ts": (AS_OF - timedelta(days=draw(days), hours=draw(st.integers(0, 23)))
                        ).isoformat().replace("+00:00", "Z"),
                 "status": draw(st.sampled_from(["paid", "new"])),
                 "items": draw(st.lists(items, max_size=4))}
        out.append(order)
    return out


item_conds = st.one_of(
    st.builds(lambda v: {"field": "brand", "op": "eq", "value": v}, st.sampled_from(BRANDS)),
    st.builds(lambda v: {"field": "brand", "op": "ne", "value": v}, st.sampled_from(BRANDS)),
    st.builds(lambda v: {"field": "brand", "op": "in", "value": v},
              st.lists(st.sampled_from(BRANDS), min_size=1, max_size=2, unique=True)),
    st.builds(lambda v: {"field": "tags", "op": "has_all", "value": v},
              st.lists(st.sampled_from(TAGS), min_size=1, max_size=2, unique=True)),
    st.builds(lambda v: {"field": "tags", "op": "not_in", "value": [v]}, st.sampled_from(TAGS)),
    st.builds(lambda op, v: {"field": "qty", "op": op, "value": v},
              st.sampled_from(["gt", "lte", "eq"]), st.integers(0, 4)),
    st.builds(lambda op, v: {"field": "price", "op": op, "value": v},
              st.sampled_from(["gte", "lt"]), st.sampled_from([0.01, 19.99, 100])),
    st.sampled_from([{"field": "price", "op": "exists"}, {"field": "qty", "op": "not_exists"},
                     {"all": True}]),
)
item_rules = st.recursive(item_conds, lambda kids: st.one_of(
    st.builds(lambda c: {"and": c}, st.lists(kids, min_size=1, max_size=2)),
    st.builds(lambda c: {"or": c}, st.lists(kids, min_size=1, max_size=2)),
    st.builds(lambda c: {"not": c}, kids)), max_leaves=3)
havings = st.one_of(
    st.none(),
    st.builds(lambda op, v: {"agg": "count", "op": op, "value": v},
              st.sampled_from(["gte", "eq", "lt"]), st.integers(0, 3)),
    st.builds(lambda agg, of, op, v: {"agg": agg, "of": of, "op": op, "value": v},
              st.sampled_from(["sum", "avg", "min", "max"]),
              st.sampled_from(["qty", "price", "spend"]),
              st.sampled_from(["gt", "lte", "eq", "between"]),
              st.sampled_from([0, 3, 19.99, 59.97, 300])).map(
        lambda h: {**h, "value": [h["value"], 400]} if h["op"] == "between" else h),
    st.builds(lambda agg, op, n: {"agg": agg, "op": op, "value": {"days_ago": n}},
              st.sampled_from(["first", "last"]), st.sampled_from(["gt", "lte"]),
              st.integers(0, 300)),
)
windows = st.one_of(st.none(), st.builds(lambda n: {"last_days": n}, st.integers(1, 400)),
                    st.just({"from": "2026-03-01T00:00:00Z", "to": "2026-09-01T00:00:00Z"}))


@st.composite
def rules(draw: Any) -> dict:
    rule: dict[str, Any] = {"items": draw(item_rules)}
    if draw(st.booleans()):
        rule["orders"] = {"field": "status", "op": "eq", "value": "paid"}
    for key, strategy in (("window", windows), ("having", havings)):
        value = draw(strategy)
        if value is not None:
            rule[key] = value
    return rule


# ---------------------------------------------------------------------- properties


LAYOUTS = {  # index/items.py's paths, each forced on the small data of these tests
    "fast": [],  # float64 bincount sums, items cut to the window's order ranges
    # every sum as if beyond float64: the int64 (or Python int) path of _judge
    "exact": [(items_module, "EXACT", 0)],
    "uncut": [(items_module, "WINDOW_RUNS", -1)],  # no cut to the window: the mask alone
    # cut to the window, but each line's order checked by the mask, not kept order lines
    "masked": [(items_module, "ORDER_LINE_RULES", 0)],
    # the float sums two lines a step: local order masks and bincounts, several steps
    "steps": [(items_module, "CHUNK", 2), (items_module, "ORDER_LINE_RULES", 0)],
    # one line a step, each "wider" than SPAN × CHUNK: the whole-order mask and one
    # bincount of every line at the end
    "wide": [(items_module, "CHUNK", 1), (items_module, "SPAN", 0),
             (items_module, "ORDER_LINE_RULES", 0)],
    # as if the rows were few: groups by sorting, one entry per profile with rows
    "sorted": [(items_module, "DENSE_RATIO", 10**9), (compare_module, "DENSE_RATIO", 10**9)],
    # count / sum / avg by the profile layout's kept lines and cumulative sums
    "layout": [(orders_module, "LAYOUT_MIN_ORDERS", 0)],
}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(order_lists(), rules(), st.booleans())
def test_matches_reference(orders: list[dict], rule: dict, wrap: bool) -> None:
    engine = _engine(orders)
    engine.cache_results = False  # each layout evaluates
    try:
        for layout, patches in LAYOUTS.items():
            with contextlib.ExitStack() as forced:
                for module, name, value in patches:
                    forced.enter_context(mock.patch.object(module, name, value))
                _check_reference(engine, orders, rule, wrap, layout)
    finally:
        engine.close()


@st.composite
def sum_rules(draw: Any) -> dict:
    """A rule with `having: sum`, the aggregate _dense_sum answers in steps."""
    rule = draw(rules())
    rule["having"] = {"agg": "sum", "of": draw(st.sampled_from(["qty", "price", "spend"])),
                      "op": draw(st.sampled_from(["gt", "lte", "eq"])),
                      "value": draw(st.sampled_from([0, 3, 19.99, 59.97, 300]))}
    return rule


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(order_lists(), sum_rules(), st.booleans())
def test_sums_in_steps_match_reference(orders: list[dict], rule: dict, wrap: bool) -> None:
    """The float sums in steps, the orders checked by a mask over each step's order ids
    or by one mask over all, the profiles summed locally or at the end."""
    engine = _engine(orders)
    engine.cache_results = False
    try:
        for layout in ("fast", "masked", "steps", "wide", "layout"):
            with contextlib.ExitStack() as forced:
                for module, name, value in LAYOUTS[layout]:
                    forced.enter_context(mock.patch.object(module, name, value))
                _check_reference(engine, orders, rule, wrap, layout)
    finally:
        engine.close()


@st.composite
def layout_rules(draw: Any) -> dict:
    """A rule with `having` count, sum or avg: the aggregates the profile layout
    answers."""
    rule = draw(rules())
    agg = draw(st.sampled_from(["count", "sum", "avg"]))
    op = draw(st.sampled_from(["gt", "lte", "eq", "lt"]))
    if agg == "count":
        rule["having"] = {"agg": "count", "op": op, "value": draw(st.integers(0, 3))}
    else:
        rule["having"] = {"agg": agg, "of": draw(st.sampled_from(["qty", "price", "spend"])),
                          "op": op, "value": draw(st.sampled_from([0, 3, 19.99, 59.97, 300]))}
    return rule


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(order_lists(), layout_rules(), st.booleans())
def test_layout_counts_sums_and_averages_match_reference(orders: list[dict], rule: dict,
                                                         wrap: bool) -> None:
    """count / sum / avg by the profile layout's kept lines (forced on few orders)."""
    engine = _engine(orders)
    engine.cache_results = False
    try:
        with mock.patch.object(orders_module, "LAYOUT_MIN_ORDERS", 0):
            _check_reference(engine, orders, rule, wrap, "layout")
    finally:
        engine.close()


def _check_reference(engine: Engine, orders: list[dict], rule: dict, wrap: bool,
                     layout: str) -> None:
    if wrap:  # inside and / not with a profile-level rule
        rule_used = {"and": [{"all": True}, {"not": rule}]}
        want = {p for p in PROFILES if not reference(orders, rule, p)}
    else:
        rule_used = rule
        want = {p for p in PROFILES if reference(orders, rule, p)}
    assert set(engine.members(rule_used, as_of=AS_OF_TEXT)) == want, layout
    assert engine.count(rule_used, as_of=AS_OF_TEXT) == len(want), layout
    for p in PROFILES:
        assert engine.is_member(p, rule_used, as_of=AS_OF_TEXT) == (p in want), (p, layout)


# ---------------------------------------------------------------------- named cases

CONTRACT_EXAMPLE = {"items": {"field": "brand", "op": "eq", "value": "acme"},
                    "orders": {"field": "status", "op": "in", "value": ["paid", "delivered"]},
                    "window": {"last_days": 180},
                    "having": {"agg": "sum", "of": "spend", "op": "gt", "value": 300}}


def _order(oid: str, profile: str, days_ago: int, status: str, *lines: dict) -> dict:
    ts = (AS_OF - timedelta(days=days_ago)).isoformat().replace("+00:00", "Z")
    return {"id": oid, "profile": profile, "ts": ts, "status": status, "items": list(lines)}


def test_contract_example_spend_on_a_brand() -> None:
    """Acme spend, not the whole order amount: p0's order is 1000 of which acme is 3 ×
    19.99; p1 bought acme for 320 over two orders; p2's acme order is not paid; p3's is
    too old."""
    orders = [
        _order("a", "p0", 10, "paid", {"brand": "acme", "qty": 3, "price": 19.99},
               {"brand": "zed", "qty": 1, "price": 940.03}),
        _order("b", "p1", 10, "paid", {"brand": "acme", "qty": 2, "price": 100}),
        _order("c", "p1", 100, "delivered", {"brand": "acme", "qty": 1, "price": 120},
               {"brand": "zed", "price": 5}),
        _order("d", "p2", 10, "new", {"brand": "acme", "qty": 10, "price": 100}),
        _order("e", "p3", 200, "paid", {"brand": "acme", "qty": 10, "price": 100}),
    ]
    engine = _engine(orders)
    try:
        assert engine.members(CONTRACT_EXAMPLE, as_of=AS_OF_TEXT) == ["p1"]
        for p in PROFILES:
            assert engine.is_member(p, CONTRACT_EXAMPLE, as_of=AS_OF_TEXT) == (p == "p1")
    finally:
        engine.close()


def test_spend_is_exact_to_the_cent() -> None:
    """3 × 19.99 on 1,000 lines is 59,970.00 exactly, in floats it would not be."""
    lines = [{"brand": "acme", "qty": 3, "price": 19.99}] * 1000
    engine = _engine([_order("a", "p0", 1, "paid", *lines)])
    try:
        def sum_is(op: str, value: float) -> list[str]:
            rule = {"items": {"all": True},
                    "having": {"agg": "sum", "of": "spend", "op": op, "value": value}}
            return engine.members(rule, as_of=AS_OF_TEXT)

        assert sum_is("eq", 59970) == ["p0"]
        assert sum_is("gt", 59969.99) == ["p0"]
        assert sum_is("lt", 59970.01) == PROFILES  # the others have sum 0
        assert sum_is("lt", 59970) == PROFILES[1:]
        avg = {"items": {"all": True},
               "having": {"agg": "avg", "of": "spend", "op": "eq", "value": 59.97}}
        assert engine.members(avg, as_of=AS_OF_TEXT) == ["p0"]
    finally:
        engine.close()


def test_zero_rows_count_zero_sum_zero_avg_false() -> None:
    engine = _engine([_order("a", "p0", 1, "paid", {"brand": "zed", "qty": 1, "price": 5})])
    try:
        def members(having: dict) -> list[str]:
            rule = {"items": {"field": "brand", "op": "eq", "value": "acme"}, "having": having}
            return engine.members(rule, as_of=AS_OF_TEXT)

        assert members({"agg": "count", "op": "eq", "value": 0}) == PROFILES
        assert members({"agg": "sum", "of": "spend", "op": "lte", "value": 10}) == PROFILES
        assert members({"agg": "avg", "of": "qty", "op": "lte", "value": 10}) == []
        assert members({"agg": "last", "op": "lte", "value": {"days_ago": 0}}) == []
        assert engine.is_member("p0", {"items": {"all": True}}, as_of=AS_OF_TEXT)
        assert not engine.is_member("p1", {"items": {"all": True}}, as_of=AS_OF_TEXT)
    finally:
        engine.close()


def test_count_is_lines_not_units_and_avg_is_per_line() -> None:
    engine = _engine([_order("a", "p0", 1, "paid", {"brand": "acme", "qty": 5, "price": 1},
                             {"brand": "acme", "qty": 1, "price": 3})])
    try:
        def members(having: dict) -> list[str]:
            return engine.members({"items": {"field": "brand", "op": "eq", "value": "acme"},
                                   "having": having}, as_of=AS_OF_TEXT)

        assert members({"agg": "count", "op": "eq", "value": 2}) == ["p0"]
        assert members({"agg": "avg", "of": "qty", "op": "eq", "value": 3}) == ["p0"]
        assert members({"agg": "avg", "of": "price", "op": "eq", "value": 2}) == ["p0"]
        assert members({"agg": "sum", "of": "spend", "op": "eq", "value": 8}) == ["p0"]
        assert members({"agg": "max", "of": "spend", "op": "eq", "value": 5}) == ["p0"]
    finally:
        engine.close()


def test_replaced_items_and_reopen() -> None:
    """An order's items replaced by a later line no longer count, also after reopening."""
    path = scratch_folder()
    engine = Engine.open(path)
    engine.declare_schema(SCHEMA)
    engine.add_orders([_order("a", "p0", 1, "paid", {"brand": "acme", "tags": ["sale"]})])
    engine.add_orders([_order("a", "p0", 1, "paid", {"brand": "zed", "tags": ["new"]})])
    acme = {"items": {"field": "brand", "op": "eq", "value": "acme"}}
    new = {"items": {"field": "tags", "op": "eq", "value": "new"}}
    assert engine.members(acme, as_of=AS_OF_TEXT) == []
    assert engine.members(new, as_of=AS_OF_TEXT) == ["p0"]
    engine.close()
    engine = Engine.open(path)
    try:
        assert engine.members(acme, as_of=AS_OF_TEXT) == []
        assert engine.members(new, as_of=AS_OF_TEXT) == ["p0"]
        assert engine.snapshot.orders.items_indexed
    finally:
        engine.close()


def test_window_cut_and_float_sums_on_lines_that_follow_orders() -> None:
    """A load without replaced lines: items are cut to the window's order ranges (orders
    in three ts runs here) and sums are float64 bincounts, exact to the key; `_judge` (the
    general path) is not called."""
    orders = [_order("a", "p0", 10, "paid", {"brand": "acme", "qty": 3, "price": 19.99}),
              _order("b", "p1", 300, "paid", {"brand": "acme", "qty": 2, "price": 100}),
              _order("c", "p2", 5, "paid", {"brand": "acme", "qty": 2, "price": 100.01}),
              _order("d", "p2", 200, "paid", {"brand": "acme", "qty": 1, "price": 7})]
    engine = _engine(orders)
    engine.cache_results = False
    try:
        index = engine.snapshot.orders
        assert items_module._lines_follow_orders(index) and len(index.runs) == 3
        lo, hi = index.ts[[0, 2]].min(), index.ts[[0, 2]].max() + 1  # a and c only
        every = items_module.alive_items(index)
        assert list(items_module._in_window(every, index, lo, hi)) == [0, 2]
        with mock.patch.object(items_module, "_judge", side_effect=AssertionError("_judge")):
            def members(value: float, op: str = "eq") -> list[str]:
                return engine.members({"items": {"all": True}, "window": {"last_days": 100},
                                       "having": {"agg": "sum", "of": "spend", "op": op,
                                                  "value": value}}, as_of=AS_OF_TEXT)

            assert members(59.97) == ["p0"]
            assert members(200.02) == ["p2"]
            assert members(200.01, "gt") == ["p2"]
            assert members(200.02, "gt") == []
            assert members(0) == ["p1", "p3", "p4", "p5"]
            # thresholds beyond 2**53 key units (1e8 a unit of spend), compared as floats
            assert members(10**9, "lt") == PROFILES
            assert members(10**9 + 0.01, "gte") == []
            assert members(-(10**9), "gt") == PROFILES
            assert members(90071992.54740993) == []  # (2**53 + 1) key units
    finally:
        engine.close()


def test_replaced_lines_are_not_cut_by_window_and_huge_sums_stay_exact() -> None:
    """Once a line is replaced, item ids no longer follow order ids: no window cut.  A
    spend beyond 2**53 key units is summed exactly by the general path."""
    engine = _engine([_order("a", "p0", 1, "paid", {"brand": "acme", "qty": 1, "price": 5}),
                      _order("b", "p1", 1, "paid", {"brand": "acme", "qty": 3,
                                                    "price": 1000000000.01})])
    engine.add_orders([_order("a", "p0", 1, "paid", {"brand": "acme", "qty": 2, "price": 5})])
    engine.cache_results = False
    try:
        index = engine.snapshot.orders
        assert not items_module._lines_follow_orders(index)
        every = items_module.alive_items(index)
        assert items_module._in_window(every, index, None, 2**62) is every
        assert items_module._float_values(index, "spend") is None  # 3e17 key units

        def members(op: str, value: float) -> list[str]:
            return engine.members({"items": {"all": True}, "window": {"last_days": 30},
                                   "having": {"agg": "sum", "of": "spend", "op": op,
                                              "value": value}}, as_of=AS_OF_TEXT)

        assert members("eq", 10) == ["p0"]
        assert members("eq", 3000000000.03) == ["p1"]
        assert members("gt", 3000000000.02) == ["p1"]
        assert members("lt", 3000000000.03) == ["p0", "p2", "p3", "p4", "p5"]
    finally:
        engine.close()


def test_a_store_from_before_gets_its_item_bitmaps_at_open() -> None:
    """Remove what an older bitseg did not write; opening builds it again, once."""
    from bitseg.index.keys import SEP
    from bitseg.index.order_keys import ITEM_KINDS

    path = scratch_folder()
    engine = Engine.open(path)
    engine.declare_schema(SCHEMA)
    engine.add_orders([_order("a", "p0", 1, "paid", {"brand": "acme", "qty": 2}),
                       _order("b", "p1", 1, "paid", {"brand": "zed"})])
    engine.add_orders([_order("b", "p1", 1, "paid", {"brand": "acme"})])
    store = engine.store
    with store.write() as txn:
        for key in [bytes(k) for k in store.keys(txn, "orders", b"b" + SEP)]:
            if key[2:3] in ITEM_KINDS:
                store.delete(txn, "orders", key)
        meta = T_json(store.get(txn, "orders", b"meta"))
        del meta["item_values"]
        store.put(txn, "orders", b"meta", T_dump(meta))
    engine.close()
    engine = Engine.open(path)
    try:
        acme = {"items": {"field": "brand", "op": "eq", "value": "acme"}}
        assert engine.members(acme, as_of=AS_OF_TEXT) == ["p0", "p1"]
    finally:
        engine.close()


def T_json(raw: Any) -> dict:
    import orjson
    return orjson.loads(bytes(raw))


def T_dump(obj: Any) -> bytes:
    import orjson
    return orjson.dumps(obj)


# ---------------------------------------------------------------------- invalid forms


@pytest.mark.parametrize("rule, path, words", [
    ({"items": {"field": "items.brand", "op": "eq", "value": "acme"}}, "$.items.field",
     "without the 'items.' prefix"),
    ({"items": {"field": "colour", "op": "eq", "value": "red"}}, "$.items.field",
     "unknown field 'colour'"),
    ({"items": {"field": "brand", "op": "gt", "value": "a"}}, "$.items.op", "does not apply"),
    ({"items": {"all": True}, "having": {"agg": "sum", "of": "amount", "op": "gt",
                                         "value": 1}}, "$.having.of", "price, qty, spend"),
    ({"items": {"all": True}, "having": {"agg": "median", "of": "qty", "op": "gt",
                                         "value": 1}}, "$.having.agg", "expected one of"),
    ({"items": {"all": True}, "having": {"agg": "count", "of": "qty", "op": "gt",
                                         "value": 1}}, "$.having.of", "no 'of'"),
    ({"items": {"all": True}, "orders": {"field": "colour", "op": "exists"}},
     "$.orders.field", "unknown field"),
    ({"items": {"all": True}, "extra": 1}, "$.extra", "unexpected key"),
    ({"items": {"event": "x"}}, "$.items.event", "not allowed in an items rule"),
    ({"and": [{"items": {"all": True}, "window": {"last_days": 0}}]},
     "$.and[0].window.last_days", "whole number"),
])
def test_invalid_forms_name_their_path(rule: dict, path: str, words: str) -> None:
    engine = _engine([])
    try:
        with pytest.raises(RuleError) as caught:
            engine.count(rule)
        assert caught.value.path == path
        assert words in str(caught.value)
    finally:
        engine.close()


def test_spend_needs_numeric_price_and_qty() -> None:
    engine = Engine.open(scratch_folder())
    engine.declare_schema({"orders": {"items.brand": "keyword", "items.price": "float"}})
    try:
        with pytest.raises(RuleError) as caught:
            engine.count({"items": {"all": True},
                          "having": {"agg": "sum", "of": "spend", "op": "gt", "value": 1}})
        assert caught.value.path == "$.having.of" and "numeric fields: price" in str(
            caught.value)
    finally:
        engine.close()


def test_float_qty_spend_exact() -> None:
    engine = Engine.open(scratch_folder())
    engine.declare_schema({"orders": {"items.qty": "float", "items.price": "float"}})
    try:
        engine.add_orders([_order("a", "p0", 1, "paid", *[{"qty": 0.5, "price": 19.99}] * 7)])
        rule = {"items": {"all": True},
                "having": {"agg": "sum", "of": "spend", "op": "eq", "value": 69.965}}
        assert engine.members(rule, as_of=AS_OF_TEXT) == ["p0"]
        assert engine.is_member("p0", rule, as_of=AS_OF_TEXT)
        assert T.FLOAT_SCALE == 10**8  # what the scale of spend here (10**16) builds on
    finally:
        engine.close()


# ---------------------------------------------------------------------- end to end


def test_through_a_real_server_json_proto_and_cli(tmp_path: Any) -> None:
    """rule_json and the protobuf ItemsRule give the same answers as the engine; the
    CLI counts it; an invalid form comes back with its path."""
    import json

    from conftest_grpc import ServerProcess, run_cli

    from bitseg import Client, ClientError
    from bitseg.server.convert import rule_from_json, rule_to_json

    orders = [
        _order("a", "p0", 10, "paid", {"brand": "acme", "qty": 3, "price": 19.99},
               {"brand": "zed", "qty": 1, "price": 940.03}),
        _order("b", "p1", 10, "paid", {"brand": "acme", "qty": 2, "price": 100}),
        _order("c", "p1", 100, "delivered", {"brand": "acme", "qty": 1, "price": 120}),
    ]
    path = tmp_path / "store"
    with Engine.open(path) as engine:
        engine.declare_schema(SCHEMA)
        engine.upsert_profiles([{"id": p} for p in PROFILES])
        engine.add_orders(orders)
    proto = rule_from_json(CONTRACT_EXAMPLE)
    assert proto.WhichOneof("node") == "items"
    assert rule_to_json(proto) == CONTRACT_EXAMPLE
    proc = ServerProcess(path)
    try:
        with Client(proc.addr, timeout=20) as client:
            for rule in (CONTRACT_EXAMPLE, proto):
                assert client.count(rule, as_of=AS_OF_TEXT) == 1
                assert list(client.members(rule, as_of=AS_OF_TEXT)) == ["p1"]
                assert client.is_member("p1", rule, as_of=AS_OF_TEXT)
                assert not client.is_member("p0", rule, as_of=AS_OF_TEXT)
            bad = {"and": [{"all": True}, {"items": {"field": "items.brand", "op": "eq",
                                                     "value": "acme"}}]}
            with pytest.raises(ClientError) as caught:
                client.count(rule_from_json(bad))
            assert "$.and[1].items.field" in str(caught.value)
        done = run_cli("count", "--rule", json.dumps(CONTRACT_EXAMPLE), "--as-of", AS_OF_TEXT,
                       "--addr", proc.addr)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip().startswith("1")
    finally:
        assert proc.stop() == 0, proc.stderr()


def test_explain_says_item_lines_with_a_count() -> None:
    from bitseg.index.explain import explain

    engine = _engine([_order("a", "p1", 10, "paid", {"brand": "acme", "qty": 3, "price": 120})])
    try:
        rule = {"not": CONTRACT_EXAMPLE}
        found = explain(engine.snapshot, rule, engine.parse(rule, engine.snapshot),
                        T.parse_timestamp(AS_OF_TEXT))
        child = found.root.children[0]
        assert child.count == 1 and child.path == "$.not"
        assert "bought item lines where brand is 'acme' in orders where status" in child.text
        assert "with a total spend of more than 300" in child.text
    finally:
        engine.close()
