"""Top N (CONTRACT §2.4e) and first / last (§2.4a) against naive references over the
raw rows, the contract's examples, every invalid form with its path, and end to end."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from conftest_grpc import ServerProcess, run_cli
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from scratch import scratch_folder

from bitseg.client import Client
from bitseg.index.engine import Engine, as_of_micros
from bitseg.index.errors import RuleError
from bitseg.index.orders import recency_of_all
from bitseg.index.recency import NO_FIRST, NO_LAST, Timeline, recency_of_extremes
from bitseg.index.rules import Having, parse_rule
from bitseg.server import convert
from bitseg.v1 import bitseg_pb2 as pb
from bitseg.v1 import bitseg_pb2_grpc as pb_grpc

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SCHEMA = {"profiles": {"score": "int", "ltv": "float", "born": "date", "seen": "timestamp",
                       "country": "keyword"}}
AS_OF = datetime(2026, 6, 1, 12, tzinfo=timezone.utc)
IDS = ["a", "b", "B", "aa", "a0", "é", "z", "10", "9", "ü", "Ω", "ab", "A", "0", "zz", "ä"]
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------- top: reference
def profile_values(type_: str) -> st.SearchStrategy[Any]:
    if type_ == "int":
        return st.integers(-5, 5) | st.integers(-(2**40), 2**40)
    if type_ == "float":
        return st.sampled_from([-2.5, -0.01, 0.0, 0.1, 0.25, 1.0, 3.14, 99.99, -1e6, 1e6])
    if type_ == "date":
        return st.dates(datetime(1960, 1, 1).date(), datetime(1963, 1, 1).date()).map(str)
    return st.integers(0, 200).map(lambda h: _iso(AS_OF - timedelta(hours=h * 7)))


@st.composite
def populations(draw) -> list[dict[str, Any]]:
    ids = draw(st.lists(st.sampled_from(IDS), min_size=1, max_size=len(IDS), unique=True))
    out = []
    for pid in ids:
        row: dict[str, Any] = {"id": pid}
        for name, type_ in SCHEMA["profiles"].items():
            if type_ == "keyword":
                value = draw(st.sampled_from(["DE", "FR", None]))
            else:
                value = draw(st.none() | profile_values(type_))
            if value is not None:
                row[name] = value
        out.append(row)
    return out


OF_RULES = st.sampled_from([
    None,
    {"all": True},
    {"field": "country", "op": "eq", "value": "DE"},
    {"not": {"field": "country", "op": "eq", "value": "DE"}},
    {"field": "score", "op": "gt", "value": 0},
    {"or": [{"field": "country", "op": "eq", "value": "FR"},
            {"field": "score", "op": "lte", "value": -1}]},
    {"and": [{"field": "ltv", "op": "exists"}, {"not": {"field": "score", "op": "exists"}}]},
])


def naive_of(rule: Any, row: dict[str, Any]) -> bool:
    if rule is None or "all" in rule:
        return True
    if "not" in rule:
        return not naive_of(rule["not"], row)
    if "and" in rule:
        return all(naive_of(r, row) for r in rule["and"])
    if "or" in rule:
        return any(naive_of(r, row) for r in rule["or"])
    value = row.get(rule["field"])
    if rule["op"] == "exists":
        return value is not None
    if value is None:
        return False
    return {"eq": value == rule["value"], "gt": value > rule["value"],
            "lte": value <= rule["value"]}[rule["op"]]


def naive_top(rows: list[dict[str, Any]], n: int, by: str, order: str, of: Any) -> set[str]:
    """Sort by value (exact decimals for floats), ties by the id's UTF-8 bytes."""
    pool = [r for r in rows if r.get(by) is not None and naive_of(of, r)]
    key = (lambda r: Decimal(repr(r[by]))) if by == "ltv" else (lambda r: r[by])
    pool.sort(key=lambda r: r["id"].encode("utf-8"))
    pool.sort(key=key, reverse=order == "desc")  # stable: ties keep the id order
    return {r["id"] for r in pool[:n]}


def _engine(rows: list[dict[str, Any]]) -> Engine:
    engine = Engine.open(scratch_folder("bitseg-top-"))
    engine.declare_schema(SCHEMA)
    engine.upsert_profiles(rows)
    return engine


@SETTINGS
@given(populations(), st.integers(1, 8), st.sampled_from(["score", "ltv", "born", "seen"]),
       st.sampled_from(["desc", "asc", None]), OF_RULES, st.booleans())
def test_top_matches_a_sort(rows, n, by, order, of, negate) -> None:
    engine = _engine(rows)
    try:
        params: dict[str, Any] = {"n": n, "by": by}
        if order is not None:
            params["order"] = order
        if of is not None:
            params["of"] = of
        rule: dict[str, Any] = {"top": params}
        expected = naive_top(rows, n, by, order or "desc", of)
        if negate:
            rule = {"not": rule}
            expected = {r["id"] for r in rows} - expected
        assert set(engine.members(rule)) == expected, json.dumps(rule)
        assert engine.count(rule) == len(expected)
        for row in rows[:4]:
            assert engine.is_member(row["id"], rule) == (row["id"] in expected)
        mixed = {"and": [rule, {"field": "country", "op": "eq", "value": "DE"}]}
        assert set(engine.members(mixed)) == {r["id"] for r in rows if r["id"] in expected
                                              and r.get("country") == "DE"}
    finally:
        engine.close()


def test_ties_at_the_cut_go_to_the_smaller_id_in_both_orders() -> None:
    rows = [{"id": "b", "score": 5}, {"id": "é", "score": 5}, {"id": "a", "score": 5},
            {"id": "Z", "score": 9}, {"id": "c", "score": 1}]
    engine = _engine(rows)
    try:
        assert engine.members({"top": {"n": 3, "by": "score"}}) == ["b", "a", "Z"] or \
            set(engine.members({"top": {"n": 3, "by": "score"}})) == {"Z", "a", "b"}
        assert set(engine.members({"top": {"n": 3, "by": "score", "order": "asc"}})) == \
            {"c", "a", "b"}
        assert set(engine.members({"top": {"n": 10, "by": "score"}})) == \
            {"a", "b", "é", "Z", "c"}  # fewer than N: all of them
    finally:
        engine.close()


def test_top_is_recounted_after_a_write_and_deletes_drop_out() -> None:
    engine = _engine([{"id": f"u{i}", "score": i} for i in range(10)])
    try:
        rule = {"top": {"n": 2, "by": "score"}}
        assert set(engine.members(rule)) == {"u9", "u8"}
        assert engine.is_member("u9", rule)
        engine.upsert_profiles([{"id": "new", "score": 100}])
        assert set(engine.members(rule)) == {"new", "u9"}
        assert not engine.is_member("u8", rule)
        engine.delete_profiles(["new"])
        assert set(engine.members(rule)) == {"u9", "u8"}
    finally:
        engine.close()


@pytest.mark.parametrize(("top", "path", "words"), [
    ([1], "$.top", "expected"),
    ({"by": "score"}, "$.top.n", "1 to 1,000,000"),
    ({"n": 0, "by": "score"}, "$.top.n", "1 to 1,000,000"),
    ({"n": 1_000_001, "by": "score"}, "$.top.n", "1 to 1,000,000"),
    ({"n": True, "by": "score"}, "$.top.n", "whole number"),
    ({"n": 2.5, "by": "score"}, "$.top.n", "whole number"),
    ({"n": 3}, "$.top.by", "profile field"),
    ({"n": 3, "by": "country"}, "$.top.by", "keyword field"),
    ({"n": 3, "by": "nope"}, "$.top.by", "unknown field"),
    ({"n": 3, "by": "score", "order": "up"}, "$.top.order", '"desc" or "asc"'),
    ({"n": 3, "by": "score", "of": {"field": "x", "op": "eq", "value": 1}},
     "$.top.of.field", "unknown field"),
    ({"n": 3, "by": "score", "limit": 3}, "$.top.limit", "unexpected key"),
])
def test_invalid_top_forms_name_their_path(top, path, words) -> None:
    engine = _engine([{"id": "u1", "score": 1}])
    try:
        with pytest.raises(RuleError) as info:
            engine.count({"and": [{"all": True}, {"top": top}]})
        assert info.value.path == path.replace("$", "$.and[1]", 1)
        assert words in str(info.value)
    finally:
        engine.close()


def test_a_top_of_counts_toward_the_rule_depth() -> None:
    engine = _engine([{"id": "u1", "score": 1}])
    try:
        rule: dict[str, Any] = {"all": True}
        for _ in range(31):
            rule = {"top": {"n": 1, "by": "score", "of": rule}}
        assert engine.count(rule) == 1  # 32 levels
        with pytest.raises(RuleError) as info:
            engine.count({"top": {"n": 1, "by": "score", "of": rule}})
        assert info.value.path == "$" + ".top.of" * 32
        with pytest.raises(RuleError):
            convert.rule_to_json(convert.rule_from_json({"top": {"n": 1, "by": "score",
                                                                 "of": rule}}))
    finally:
        engine.close()


# ---------------------------------------------------------------------- first / last
INSTANTS = [AS_OF - timedelta(days=d, hours=h) for d, h in
            ((0, 0), (0, 5), (1, 0), (40, 0), (90, 0), (90, 5), (200, 0))]


@st.composite
def histories(draw):
    pids = [f"p{i}" for i in range(draw(st.integers(1, 6)))]
    events = [{"profile": draw(st.sampled_from(pids)), "event": draw(st.sampled_from(["v", "w"])),
               "ts": _iso(draw(st.sampled_from(INSTANTS))), "k": draw(st.sampled_from(["x", "y"]))}
              for _ in range(draw(st.integers(0, 12)))]
    orders = [{"id": f"o{i}", "profile": draw(st.sampled_from(pids)),
               "ts": _iso(draw(st.sampled_from(INSTANTS))),
               "status": draw(st.sampled_from(["paid", "new"]))}
              for i in range(draw(st.integers(0, 10)))]
    return pids, events, orders


MOMENTS = st.sampled_from(INSTANTS).map(_iso) | st.integers(0, 200).map(
    lambda d: {"days_ago": d})
WINDOWS = st.sampled_from([None, {"last_days": 1}, {"last_days": 90}, {"last_days": 365},
                           {"from": _iso(AS_OF - timedelta(days=90)), "to": _iso(AS_OF)}])
SELECTIONS = st.sampled_from([("event", "v", None), ("event", "*", None),
                              ("event", "v", {"field": "k", "op": "eq", "value": "x"}),
                              ("event", "*", {"field": "k", "op": "ne", "value": "x"}),
                              ("orders", {"all": True}, None),
                              ("orders", {"field": "status", "op": "eq", "value": "paid"}, None)])


@st.composite
def recency_havings(draw, used: list[str]) -> dict[str, Any]:
    """A first/last condition; its instants are mostly those of the rows (ties)."""
    moments = st.one_of(st.sampled_from(used), st.sampled_from(used), MOMENTS) if used \
        else MOMENTS
    op = draw(st.sampled_from(["eq", "ne", "in", "not_in", "gt", "gte", "lt", "lte",
                               "between"]))
    if op in ("in", "not_in"):
        value: Any = draw(st.lists(moments, min_size=1, max_size=3))
    elif op == "between":
        pair = draw(st.lists(moments.filter(lambda m: isinstance(m, str)), min_size=2,
                             max_size=2))
        value = sorted(pair)
    else:
        value = draw(moments)
    return {"agg": draw(st.sampled_from(["first", "last"])), "op": op, "value": value}


def _micros(moment: Any) -> datetime:
    if isinstance(moment, dict):
        return AS_OF - timedelta(days=moment["days_ago"])
    return datetime.fromisoformat(moment.replace("Z", "+00:00"))


def naive_recency(pids, events, orders, selection, window, having) -> set[str]:
    kind, what, where = selection
    if window is None:
        inside = lambda t: t <= AS_OF  # noqa: E731
    elif "last_days" in window:
        inside = lambda t: AS_OF - timedelta(days=window["last_days"]) < t <= AS_OF  # noqa: E731
    else:
        inside = lambda t: _micros(window["from"]) <= t < _micros(window["to"])  # noqa: E731
    rows = []
    if kind == "event":
        for e in events:
            if what != "*" and e["event"] != what:
                continue
            if where is not None and (e["k"] == "x") != (where["op"] == "eq"):
                continue
            rows.append((e["profile"], _micros(e["ts"])))
    else:
        for o in orders:
            if "field" in what and o["status"] != "paid":
                continue
            rows.append((o["profile"], _micros(o["ts"])))
    times: dict[str, list[datetime]] = {}
    for pid, t in rows:
        if inside(t):
            times.setdefault(pid, []).append(t)
    out = set()
    op, value = having["op"], having["value"]
    for pid, ts in times.items():
        x = min(ts) if having["agg"] == "first" else max(ts)
        if op == "between":
            ok = _micros(value[0]) <= x <= _micros(value[1])
        elif op in ("in", "not_in"):
            ok = (x in {_micros(v) for v in value}) == (op == "in")
        else:
            c = _micros(value)
            ok = {"eq": x == c, "ne": x != c, "gt": x > c, "gte": x >= c, "lt": x < c,
                  "lte": x <= c}[op]
        if ok:
            out.add(pid)
    return out


@SETTINGS
@given(histories(), SELECTIONS, WINDOWS, st.data(), st.booleans())
def test_first_and_last_match_the_rows(history, selection, window, data, negate) -> None:
    pids, events, orders = history
    having = data.draw(recency_havings([r["ts"] for r in events + orders]), label="having")
    engine = Engine.open(scratch_folder("bitseg-recency-"))
    try:
        engine.declare_schema({"profiles": {"score": "int"}, "events": {"k": "keyword"},
                               "orders": {"status": "keyword"}})
        engine.upsert_profiles([{"id": p, "score": i} for i, p in enumerate(pids)])
        if events:
            engine.track_events(events)
        if orders:
            engine.add_orders(orders)
        kind, what, where = selection
        rule: dict[str, Any] = {kind: what, "having": having}
        if where is not None:
            rule["where"] = where
        if window is not None:
            rule["window"] = window
        expected = naive_recency(pids, events, orders, selection, window, having)
        if negate:
            rule = {"not": rule}
            expected = set(pids) - expected
        mixed = {"or": [rule, {"field": "score", "op": "eq", "value": 0}]}
        assert set(engine.members(rule, as_of=AS_OF)) == expected, json.dumps(rule)
        assert set(engine.members(mixed, as_of=AS_OF)) == expected | {pids[0]}
        for pid in pids[:3]:
            assert engine.is_member(pid, rule, as_of=AS_OF) == (pid in expected)
    finally:
        engine.close()


def test_last_order_more_than_90_days_ago() -> None:
    engine = Engine.open(scratch_folder("bitseg-recency-"))
    try:
        engine.upsert_profiles([{"id": p} for p in ("old", "recent", "edge", "none")])
        engine.add_orders([
            {"id": "1", "profile": "old", "ts": _iso(AS_OF - timedelta(days=200))},
            {"id": "2", "profile": "old", "ts": _iso(AS_OF - timedelta(days=95))},
            {"id": "3", "profile": "recent", "ts": _iso(AS_OF - timedelta(days=200))},
            {"id": "4", "profile": "recent", "ts": _iso(AS_OF - timedelta(days=3))},
            {"id": "5", "profile": "edge", "ts": _iso(AS_OF - timedelta(days=90))}])
        rule = {"orders": {"all": True},
                "having": {"agg": "last", "op": "lt", "value": {"days_ago": 90}}}
        assert engine.members(rule, as_of=AS_OF) == ["old"]  # edge: exactly 90 days, not lt
        # no orders: no last, false under ne and not_in too
        for op, value in (("ne", _iso(AS_OF)), ("not_in", [_iso(AS_OF)])):
            got = engine.members({"orders": {"all": True},
                                  "having": {"agg": "last", "op": op, "value": value}},
                                 as_of=AS_OF)
            assert "none" not in got and set(got) == {"old", "recent", "edge"}
    finally:
        engine.close()


ALL_ORDER_WINDOWS = st.sampled_from([None, {"last_days": 1}, {"last_days": 90},
                                     {"last_days": 365}, {"next_days": 30},
                                     {"from": _iso(AS_OF - timedelta(days=90)),
                                      "to": _iso(AS_OF)},
                                     {"from": _iso(AS_OF - timedelta(days=900)),
                                      "to": _iso(AS_OF + timedelta(days=1))}])


@SETTINGS
@given(histories(), ALL_ORDER_WINDOWS, st.data(), st.integers(0, 2))
def test_first_and_last_of_all_orders_from_each_profiles_extremes(history, window, data,
                                                                   deleted) -> None:
    """`orders: {"all": true}` (recency_of_all), also after deletes: from each profile's
    first/last when the window allows it, and from the time-ordered orders, forced for
    every window, both match the raw rows."""
    pids, _, orders = history
    having = data.draw(recency_havings([o["ts"] for o in orders]), label="having")
    gone = set(pids[:deleted])
    engine = Engine.open(scratch_folder("bitseg-recency-"))
    try:
        engine.declare_schema({"orders": {"status": "keyword"}})
        engine.upsert_profiles([{"id": p} for p in pids])
        if orders:
            engine.add_orders(orders)
        engine.delete_profiles(sorted(gone))
        rule: dict[str, Any] = {"orders": {"all": True}, "having": having}
        if window is not None:
            rule["window"] = window
        kept = [o for o in orders if o["profile"] not in gone]
        if window is not None and "next_days" in window:
            expected = set()  # (as_of, as_of + 30 d]: every instant is at or before as_of
        else:
            expected = naive_recency(pids, [], kept, ("orders", {"all": True}, None), window,
                                     having)
        snap = engine.snapshot
        cond = parse_rule(rule, snap.schema)
        for by_extremes in (True, False):  # False: from the time-ordered orders, always
            found = recency_of_all(cond, snap.orders, as_of_micros(AS_OF), by_extremes,
                                   eager=True)
            # None only without orders (a deleted profile's orders stay, unseen)
            assert (found is None) == (not orders)
            if found is not None:
                assert len(found & snap.live) == len(expected), (by_extremes, rule)
        assert set(engine.members(rule, as_of=AS_OF)) == expected, json.dumps(rule)
    finally:
        engine.close()


def _plainly_holds(x: int, op: str, value: Any) -> bool:
    if op in ("in", "not_in"):
        return (x in value) == (op == "in")
    if op == "between":
        return value[0] <= x <= value[1]
    return {"eq": x == value, "ne": x != value, "gt": x > value, "gte": x >= value,
            "lt": x < value, "lte": x <= value}[op]


RECENCY_OPS = ["eq", "ne", "in", "not_in", "gt", "gte", "lt", "lte", "between"]


@settings(SETTINGS, max_examples=300)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 20)), max_size=30),
       st.sampled_from(["first", "last"]), st.sampled_from(RECENCY_OPS),
       st.lists(st.integers(-1, 22), min_size=1, max_size=3),
       st.none() | st.integers(-1, 22), st.integers(-1, 23))
@example([(0, 5), (0, 10)], "first", "gt", [7], None, 23)  # the 2nd row is not a first
@example([(0, 5), (0, 10), (1, 12)], "last", "lt", [7], None, 11)  # nor the 1st a last
@example([(0, 5), (1, 5), (0, 10)], "first", "ne", [5], 5, 11)
def test_the_time_ordered_rows_and_the_extremes_match_a_scan(rows, agg, op, values, lo,
                                                             hi) -> None:
    """recency.Timeline over any window [lo, hi), and recency_of_extremes where it
    applies, against a scan of (profile, ts) rows (ts in µs, ties included)."""
    value: Any = tuple(values) if op in ("in", "not_in") else \
        (min(values), max(values)) if op == "between" else values[0]
    having = Having(agg, None, None, op, value)
    times: dict[int, list[int]] = {}
    for pid, ts in rows:
        if (lo is None or ts >= lo) and ts < hi:
            times.setdefault(pid, []).append(ts)
    expected = set()
    for pid, ts in times.items():
        if _plainly_holds(min(ts) if agg == "first" else max(ts), op, value):
            expected.add(pid)
    profiles = np.array([r[0] for r in rows], dtype=np.uint32)
    stamps = np.array([r[1] for r in rows], dtype=np.int64)
    assert set(Timeline(profiles, stamps).recency(having, 0, lo, hi)) == expected
    if rows and hi > stamps.max() and (agg == "last" or lo is None or lo <= stamps.min()):
        fill = NO_FIRST if agg == "first" else NO_LAST
        per_profile = np.full(6, fill, dtype=np.int64)
        (np.minimum if agg == "first" else np.maximum).at(per_profile, profiles, stamps)
        got = recency_of_extremes(per_profile, having, 0, None if agg == "first" else lo)
        assert set(got) == expected


def test_last_order_is_recomputed_after_a_new_order() -> None:
    engine = Engine.open(scratch_folder("bitseg-recency-"))
    engine.cache_results = False  # each members call evaluates
    try:
        engine.add_orders([{"id": "1", "profile": "u", "ts": _iso(AS_OF - timedelta(days=200))},
                           {"id": "2", "profile": "v", "ts": _iso(AS_OF - timedelta(days=100))}])
        rule = {"orders": {"all": True},
                "having": {"agg": "last", "op": "lt", "value": {"days_ago": 90}}}
        assert engine.members(rule, as_of=AS_OF) == ["u", "v"]
        # u's last is before the window: u has no last in it
        assert engine.members(dict(rule, window={"last_days": 150}), as_of=AS_OF) == ["v"]
        first = {"orders": {"all": True}, "window": {"last_days": 365},
                 "having": {"agg": "first", "op": "lt", "value": {"days_ago": 150}}}
        assert engine.members(first, as_of=AS_OF) == ["u"]
        engine.add_orders([{"id": "3", "profile": "u", "ts": _iso(AS_OF - timedelta(days=1))}])
        assert engine.members(rule, as_of=AS_OF) == ["v"]
        # as_of before the latest order: from the rows (asked once on this snapshot),
        # then from the time-ordered orders; both ignore the later order
        for _ in range(2):
            assert engine.members(rule, as_of=AS_OF - timedelta(days=2)) == ["u", "v"]
        engine.add_orders([{"id": "2", "profile": "v", "ts": _iso(AS_OF - timedelta(days=5))}])
        assert engine.members(rule, as_of=AS_OF) == []  # order 2 replaced: v's last moved
        for _ in range(2):
            assert engine.members(rule, as_of=AS_OF - timedelta(days=2)) == ["u"]
        engine.delete_profiles(["u"])
        assert engine.members(rule, as_of=AS_OF - timedelta(days=2)) == []
    finally:
        engine.close()


@pytest.mark.parametrize(("having", "path", "words"), [
    ({"agg": "last", "of": "amount", "op": "lt", "value": {"days_ago": 1}}, "$.having.of",
     "takes no 'of'"),
    ({"agg": "first", "op": "lt", "value": "2026-01-01"}, "$.having.value", "date"),
    ({"agg": "first", "op": "in", "value": ["2026-01-01T00:00:00Z", "2026-01-02"]},
     "$.having.value[1]", "date"),
    ({"agg": "last", "op": "between", "value": ["2026-01-01", "2026-02-01T00:00:00Z"]},
     "$.having.value[0]", "date"),
    ({"agg": "last", "op": "lt", "value": 5}, "$.having.value", "timestamp"),
    ({"agg": "last", "op": "lt", "value": {"days": 5}}, "$.having.value", "days_ago"),
    ({"agg": "last", "op": "between", "value": ["2026-02-01T00:00:00Z",
                                                "2026-01-01T00:00:00Z"]},
     "$.having.value", "lo <= hi"),
    ({"agg": "last", "op": "between", "value": [{"days_ago": 1}, {"days_ago": 5}]},
     "$.having.value", "lo <= hi"),  # 1 day ago is later than 5 days ago
    ({"agg": "last", "op": "exists"}, "$.having.op", "expected one of"),
    ({"agg": "last", "op": "lt"}, "$.having.value", "needs a value"),
    ({"agg": "latest", "op": "lt", "value": {"days_ago": 1}}, "$.having.agg", "first, last"),
])
@pytest.mark.parametrize("kind", ["event", "orders"])
def test_invalid_first_last_forms_name_their_path(kind, having, path, words) -> None:
    engine = Engine.open(scratch_folder("bitseg-recency-"))
    try:
        engine.add_orders([{"id": "1", "profile": "u", "ts": "2026-01-01T00:00:00Z",
                            "amount": 1.5}])
        rule = {kind: "x" if kind == "event" else {"all": True}, "having": having}
        with pytest.raises(RuleError) as info:
            engine.count(rule)
        assert info.value.path == path
        assert words in str(info.value)
    finally:
        engine.close()


# ---------------------------------------------------------------------- end to end
def test_top_and_last_through_grpc_and_the_cli(tmp_path: Path) -> None:
    db = tmp_path / "store"
    with Engine.open(db) as engine:
        engine.declare_schema(SCHEMA)
        engine.upsert_profiles([{"id": f"u{i}", "ltv": i / 4 - 1, "country": "DE"}
                                for i in range(8)])
        engine.add_orders([{"id": "o1", "profile": "u1", "ts": "2025-01-01T00:00:00Z"},
                           {"id": "o2", "profile": "u2", "ts": "2026-05-30T00:00:00Z"}])
    top = {"top": {"n": 3, "by": "ltv", "order": "asc",
                   "of": {"field": "country", "op": "eq", "value": "DE"}}}
    last = {"orders": {"all": True},
            "having": {"agg": "last", "op": "lt", "value": {"days_ago": 90}}}
    server = ServerProcess(db)
    try:
        with Client(server.addr, timeout=10) as client:
            assert client.count(top) == 3
            assert client.is_member("u0", top)
            assert not client.is_member("u3", top)
            assert client.count(last, as_of=AS_OF) == 1
        with grpc.insecure_channel(server.addr) as channel:
            stub = pb_grpc.SegmentsStub(channel)
            reply = stub.Count(pb.CountRequest(rule=convert.rule_from_json(top)))
            assert reply.count == 3
            bad = convert.rule_from_json({"top": {"n": 3, "by": "country"}})
            with pytest.raises(grpc.RpcError) as info:
                stub.Count(pb.CountRequest(rule=bad))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "$.top.by" in info.value.details()
        done = run_cli("members", "--addr", server.addr, "--rule", json.dumps(top))
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["u0", "u1", "u2"]
        done = run_cli("count", "--addr", server.addr, "--rule", json.dumps(last),
                       "--as-of", AS_OF.isoformat(), "--json")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["count"] == 1
        done = run_cli("explain", "--addr", server.addr, "--rule", json.dumps(top))
        assert done.returncode == 0, done.stderr
        assert "the 3 with the lowest 'ltv'" in done.stdout
    finally:
        assert server.stop() == 0, server.stderr()
