"""Hostile and extreme rule input (issue 11, items 2, 4, 5 and 8): deep rules, time at the
ends of the calendar, crafted cursors, huge lists and values.  Every answer is either
correct or a clear error naming the path (or file, line and field); never INTERNAL."""

from __future__ import annotations

import base64
import json
import struct
from typing import Any

import grpc
import orjson
import pytest
from conftest_grpc import ServerProcess
from hypothesis import given, settings
from hypothesis import strategies as st

from bitseg.index import types as T
from bitseg.index.engine import Engine
from bitseg.index.errors import BitsegError, DataError, RuleError
from bitseg.index.explain import explain
from bitseg.index.rules import MAX_LIST_VALUES, MAX_RULE_DEPTH, parse_rule
from bitseg.index.schema import Schema
from bitseg.index.timeline import civil, day_number
from bitseg.server import convert
from bitseg.v1 import bitseg_pb2 as pb
from bitseg.v1 import bitseg_pb2_grpc as pb_grpc

AS_OF = "2026-06-01T00:00:00Z"
LEAF = {"field": "age", "op": "gte", "value": 1}


# ---------------------------------------------------------------------- fixtures
def fill(engine: Engine) -> None:
    """Profiles, events and orders at both ends of the calendar and in between."""
    engine.upsert_profiles([
        {"id": "first", "age": 1, "bd": "0001-01-01", "seen": "0001-01-01T00:00:00Z"},
        {"id": "last", "age": 2, "bd": "9999-12-31", "seen": "9999-12-31T23:59:59.999999Z"},
        {"id": "mid", "age": 3, "bd": "2000-02-29", "seen": "2026-05-31T12:00:00Z"},
        {"id": "none"}])
    engine.track_events([
        {"profile": "first", "event": "x", "ts": "0001-01-01T00:00:00Z", "v": 1},
        {"profile": "last", "event": "x", "ts": "9999-12-31T23:59:59.999999Z", "v": 2},
        {"profile": "mid", "event": "x", "ts": "2026-05-31T12:00:00Z", "v": 3}])
    engine.add_orders([
        {"id": "o1", "profile": "first", "ts": "0001-01-01T00:00:00Z", "amount": 1.5},
        {"id": "o2", "profile": "last", "ts": "9999-12-31T23:59:59Z", "amount": 2.5},
        {"id": "o3", "profile": "mid", "ts": "2026-05-31T12:00:00Z", "amount": 2.5}])


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    with Engine.open(tmp_path_factory.mktemp("hard") / "store") as opened:
        fill(opened)
        yield opened


def nested(depth: int, kind: str) -> dict[str, Any]:
    """A rule `depth` nodes deep (the leaf included), nesting by `kind`."""
    rule: dict[str, Any] = LEAF
    for _ in range(depth - 1):
        if kind == "not":
            rule = {"not": rule}
        elif kind == "and":
            rule = {"and": [{"all": True}, rule]}
        elif kind == "or":
            rule = {"or": [rule, {"field": "age", "op": "eq", "value": 99}]}
        else:  # an event's where, wrapped in and: two levels a step
            rule = {"event": "x", "where": {"and": [{"field": "v", "op": "gte", "value": 0},
                                                    {"not": {"field": "v", "op": "eq",
                                                             "value": -1}}]}}
            return rule if depth <= 3 else {"and": [nested(depth - 1, "and"), rule]}
    return rule


def nested_text(depth: int) -> str:
    """JSON text of a not-chain `depth` nodes deep, without building it in Python."""
    return '{"not": ' * (depth - 1) + json.dumps(LEAF) + "}" * (depth - 1)


# ---------------------------------------------------------------------- depth
@pytest.mark.parametrize("kind", ["not", "and", "or"])
def test_rules_at_the_depth_limit_evaluate_and_explain(engine, kind):
    rule = nested(MAX_RULE_DEPTH, kind)
    expected = {"not": ({"first", "last", "mid"} if MAX_RULE_DEPTH % 2 else {"none"}),
                "and": {"first", "last", "mid"}, "or": {"first", "last", "mid"}}[kind]
    assert set(engine.members(rule, as_of=AS_OF)) == expected
    assert engine.count(orjson.dumps(rule), as_of=AS_OF) == len(expected)
    assert engine.is_member("mid", rule, as_of=AS_OF) == ("mid" in expected)
    found = explain(engine.snapshot, rule, engine.parse(rule), T.parse_timestamp(AS_OF))
    assert found.root.count == len(expected)
    assert convert.rule_to_json(convert.rule_from_json(rule)) == rule


@pytest.mark.parametrize("kind", ["not", "and", "or"])
def test_one_level_past_the_limit_is_refused_with_the_path(engine, kind):
    rule = nested(MAX_RULE_DEPTH + 1, kind)
    step = {"not": ".not", "and": ".and[1]", "or": ".or[0]"}[kind]
    first = {"not": ".not", "and": ".and[0]", "or": ".or[0]"}[kind]  # in document order
    with pytest.raises(RuleError) as caught:
        engine.count(rule, as_of=AS_OF)
    assert caught.value.path == "$" + step * (MAX_RULE_DEPTH - 1) + first
    assert str(MAX_RULE_DEPTH) in caught.value.reason
    with pytest.raises(RuleError) as as_text:
        engine.count(json.dumps(rule), as_of=AS_OF)
    assert as_text.value.path == caught.value.path


def test_where_and_orders_rules_count_towards_the_depth():
    schema = Schema.from_json({"events": {"v": "int"}, "orders": {"amount": "float"}})
    where: dict[str, Any] = {"field": "v", "op": "eq", "value": 1}
    for _ in range(MAX_RULE_DEPTH - 3):
        where = {"not": where}
    parse_rule({"not": {"event": "x", "where": where}}, schema)  # exactly at the limit
    with pytest.raises(RuleError) as caught:
        parse_rule({"not": {"not": {"event": "x", "where": where}}}, schema)
    assert caught.value.path == "$.not.not.where" + ".not" * (MAX_RULE_DEPTH - 3)
    orders: dict[str, Any] = {"all": True}
    for _ in range(MAX_RULE_DEPTH - 1):
        orders = {"not": orders}
    with pytest.raises(RuleError) as caught:
        parse_rule({"orders": orders}, schema)
    assert caught.value.path == "$.orders" + ".not" * (MAX_RULE_DEPTH - 1)


@pytest.mark.parametrize("depth", [1_025, 5_000, 100_000])
def test_rules_far_too_deep_for_any_json_reader_get_the_same_clean_error(engine, depth):
    path = "$" + ".not" * MAX_RULE_DEPTH
    with pytest.raises(RuleError) as as_text:
        engine.count(nested_text(depth), as_of=AS_OF)
    assert as_text.value.path == path
    deep: dict[str, Any] = LEAF
    for _ in range(depth - 1):
        deep = {"not": deep}
    with pytest.raises(RuleError) as as_dict:
        engine.count(deep, as_of=AS_OF)
    assert as_dict.value.path == path


def test_deeply_nested_values_are_refused_without_recursion(engine):
    text = '{"field": "age", "op": "in", "value": ' + "[" * 3000 + "]" * 3000 + "}"
    with pytest.raises(RuleError) as caught:
        engine.count(text, as_of=AS_OF)
    assert caught.value.path.startswith("$.value[0][0]")
    value: Any = [1]
    for _ in range(5000):
        value = [value]
    for rule in ({"field": "age", "op": "in", "value": value},
                 {"field": "seen", "op": "gt", "value": value},
                 {"event": "x", "window": {"from": value, "to": value}}):
        with pytest.raises(RuleError):
            engine.count(rule, as_of=AS_OF)


def test_protobuf_rules_past_the_limit_are_refused_before_converting():
    rule = pb.Rule(field=pb.Condition(field="age", op="exists"))
    for _ in range(MAX_RULE_DEPTH):
        rule = pb.Rule(**{"not": rule})
    with pytest.raises(RuleError) as caught:
        convert.rule_to_json(rule)
    assert caught.value.path == "$" + ".not" * MAX_RULE_DEPTH
    events = pb.Rule(event=pb.EventRule(event="x", where=rule))
    with pytest.raises(RuleError) as caught:
        convert.rule_to_json(pb.Rule(**{"and": pb.Rules(rules=[pb.Rule(all=True), events])}))
    assert caught.value.path == "$.and[1].where" + ".not" * (MAX_RULE_DEPTH - 2)


# ---------------------------------------------------------------------- time
EXTREME_DAYS = [1, 30, 739_949, 739_950, 2_900_000, 3_000_000, 10**18, 2**63, 10**40]
EXTREME_AS_OF = ["0001-01-01T00:00:00Z", "0001-01-02T00:00:00Z", AS_OF,
                 "9999-12-31T00:00:00Z", "9999-12-31T23:59:59.999999Z"]


def extreme_rules(n: int) -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = []
    for kind in ("last_days", "next_days"):
        rules += [{"event": "x", "window": {kind: n}},
                  {"event": "*", "window": {kind: n},
                   "having": {"agg": "sum", "of": "v", "op": "gte", "value": 1}},
                  {"orders": {"all": True}, "window": {kind: n}},
                  {"orders": {"all": True}, "window": {kind: n},
                   "having": {"agg": "max", "of": "amount", "op": "in", "value": [2.5]}}]
    rules += [{"field": "bd", "op": "anniversary_in", "value": {"next_days": n}},
              {"field": "seen", "op": "anniversary_in", "value": {"next_days": n}},
              {"orders": {"field": "ts", "op": "gt", "value": {"days_ago": n}}},
              {"orders": {"field": "ts", "op": "lt", "value": {"days_ago": -n}}}]
    for days in (n, -n):
        for field in ("bd", "seen"):
            rules += [{"field": field, "op": op, "value": {"days_ago": days}}
                      for op in ("gt", "eq", "lte", "ne")]
            rules += [{"field": field, "op": "in", "value": [{"days_ago": days}]},
                      {"field": field, "op": "between",
                       "value": [{"days_ago": days}, {"days_ago": days}]}]
    return rules


def naive_window(kind: str, n: int, as_of: str, ts: str) -> bool:
    """Is a row at ts inside the window? Exact integers, no calendar limits."""
    t, now = T.parse_timestamp(ts), T.parse_timestamp(as_of)
    if kind == "last_days":
        return now - n * T.US_PER_DAY < t <= now
    return now < t <= now + n * T.US_PER_DAY


@pytest.mark.parametrize("as_of", EXTREME_AS_OF)
def test_extreme_windows_and_relative_dates_evaluate(engine, as_of):
    rows = {"first": "0001-01-01T00:00:00Z", "last": "9999-12-31T23:59:59.999999Z",
            "mid": "2026-05-31T12:00:00Z"}
    for n in EXTREME_DAYS:
        for kind in ("last_days", "next_days"):
            expected = {p for p, ts in rows.items() if naive_window(kind, n, as_of, ts)}
            got = engine.members({"event": "x", "window": {kind: n}}, as_of=as_of)
            assert set(got) == expected, (kind, n, as_of)
        for rule in extreme_rules(n):
            members = set(engine.members(rule, as_of=as_of))
            assert engine.count(rule, as_of=as_of) == len(members)
            for pid in ("first", "last", "mid"):
                assert engine.is_member(pid, rule, as_of=as_of) == (pid in members), rule


def test_anniversaries_at_the_end_of_year_9999_wrap_into_january(engine):
    today = {"field": "bd", "op": "anniversary_in", "value": {"next_days": 1}}
    assert engine.members(today, as_of="9999-12-31T10:00:00Z") == ["last"]
    two = {"field": "bd", "op": "anniversary_in", "value": {"next_days": 2}}
    assert set(engine.members(two, as_of="9999-12-31T10:00:00Z")) == {"first", "last"}
    seen = {"field": "seen", "op": "anniversary_in", "value": {"next_days": 2}}
    assert set(engine.members(seen, as_of="9999-12-31T23:59:59Z")) == {"first", "last"}
    wide = {"field": "bd", "op": "anniversary_in", "value": {"next_days": 400}}
    assert set(engine.members(wide, as_of="9999-12-31T00:00:00Z")) == {"first", "last", "mid"}


def test_calendar_arithmetic_matches_datetime_and_goes_past_it():
    from datetime import date
    epoch = date(1970, 1, 1).toordinal()
    for ordinal in (1, 2, 59, 60, 365, 366, 719_163, 3_652_058, 3_652_059):
        d = date.fromordinal(ordinal)
        assert civil(ordinal - epoch) == (d.year, d.month, d.day)
        assert day_number(d.year, d.month, d.day) == ordinal - epoch
    assert civil(T.MAX_DAY + 1) == (10_000, 1, 1)
    assert civil(T.MIN_DAY - 1) == (0, 12, 31)


@pytest.mark.parametrize("ts", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00",
                                "0000-12-31T23:00:00Z", "0000-06-01T00:00:00"])
def test_timestamps_outside_years_1_to_9999_utc_are_refused(tmp_path, ts):
    ok = "2026-01-01T00:00:00Z"
    with Engine.open(tmp_path / "store") as engine:
        for write, records, field in (
                (engine.upsert_profiles, [{"id": "a", "t": ok}, {"id": "b", "t": ts}], "t"),
                (engine.track_events, [{"profile": "a", "event": "x", "ts": ok},
                                       {"profile": "a", "event": "x", "ts": ts}], "ts"),
                (engine.add_orders, [{"id": "o1", "profile": "a", "ts": ok},
                                     {"id": "o2", "profile": "a", "ts": ts}], "ts")):
            with pytest.raises(DataError) as caught:
                write(records, file="data.jsonl")
            assert (caught.value.file, caught.value.line, caught.value.field) == \
                ("data.jsonl", 2, field)
        assert engine.total() == 0


def test_year_1_is_shown_with_four_digits(engine):
    profile = engine.profile("first")
    assert profile["seen"] == "0001-01-01T00:00:00Z" and profile["bd"] == "0001-01-01"
    assert engine.profile("last")["seen"] == "9999-12-31T23:59:59.999999Z"


# ---------------------------------------------------------------------- cursors
def test_a_cursor_with_an_as_of_past_year_9999_is_refused():
    crafted = base64.urlsafe_b64encode(struct.pack(">BQIq", 1, 1, 5, 2**63 - 1)).decode()
    with pytest.raises(BitsegError, match="^cursor: "):
        convert.Cursor.decode(crafted)
    good = convert.Cursor(3, 7, T.parse_timestamp(AS_OF))
    assert convert.Cursor.decode(good.encode()) == good


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=40), st.binary(max_size=40).map(
    lambda b: base64.urlsafe_b64encode(b).decode().rstrip("=")),
    st.tuples(st.sampled_from([0, 1, 1, 1, 2, 255]), st.integers(0, 2**64 - 1),
              st.integers(0, 2**32 - 1), st.integers(-2**63, 2**63 - 1)).map(
        lambda t: base64.urlsafe_b64encode(struct.pack(">BQIq", *t)).decode())))
def test_any_cursor_text_decodes_or_is_a_clear_cursor_error(text):
    try:
        cursor = convert.Cursor.decode(text)
    except BitsegError as exc:
        assert str(exc).startswith("cursor: ")
        return
    assert T.MIN_US <= cursor.as_of_us <= T.MAX_US
    assert cursor.as_of.year >= 1


# ---------------------------------------------------------------------- sizes
def test_in_lists_over_the_limit_are_refused_with_the_path(engine):
    values = list(range(MAX_LIST_VALUES + 1))
    with pytest.raises(RuleError) as caught:
        engine.count({"and": [{"all": True}, {"field": "age", "op": "in", "value": values}]})
    assert caught.value.path == "$.and[1].value"
    assert f"{MAX_LIST_VALUES:,}" in caught.value.reason


@pytest.mark.parametrize("field, values, expected", [
    ("age", [*range(10, MAX_LIST_VALUES + 8), 2, 3], {"last", "mid"}),
    ("age", [x / 2 for x in range(MAX_LIST_VALUES)], {"first", "last", "mid"}),
    ("bd", ["2000-02-29", *(f"1{y:03d}-01-01" for y in range(1000))], {"mid"}),
])
def test_a_long_in_list_gives_the_same_answer_as_a_short_one(engine, field, values, expected):
    rule = {"field": field, "op": "in", "value": values}
    assert set(engine.members(rule)) == expected
    assert set(engine.members({**rule, "op": "not_in"})) == {"first", "last", "mid"} - expected


def test_string_values_over_the_limit_are_refused_in_data_and_rules(tmp_path):
    big = "é" * (T.MAX_VALUE_BYTES // 2 + 1)  # few characters, many bytes
    with Engine.open(tmp_path / "store") as engine:
        engine.upsert_profiles([{"id": "a", "k": "x" * T.MAX_VALUE_BYTES}])  # at the limit
        for write, record, field in (
                (engine.upsert_profiles, {"id": "b", "k": big}, "k"),
                (engine.upsert_profiles, {"id": "b", "tags": ["a", big]}, "tags"),
                (engine.track_events, {"profile": "b", "event": "x", "ts": AS_OF, "p": big},
                 "p"),
                (engine.add_orders, {"id": "o", "profile": "b", "ts": AS_OF, "s": big}, "s")):
            with pytest.raises(DataError, match="bytes") as caught:
                write([record], file="f.jsonl")
            assert (caught.value.file, caught.value.line, caught.value.field) == \
                ("f.jsonl", 1, field)
        assert engine.total() == 1
        for rule, path in (({"field": "k", "op": "eq", "value": big}, "$.value"),
                           ({"field": "k", "op": "in", "value": ["a", big]}, "$.value[1]"),
                           ({"segment": big}, "$.segment"),
                           ({"event": big}, "$.event")):
            with pytest.raises(RuleError) as refused:
                engine.count(rule)
            assert refused.value.path == path
            assert len(str(refused.value)) < 300


# ---------------------------------------------------------------------- a live server
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tmp_path_factory.mktemp("live") / "store"
    with Engine.open(path) as opened:
        fill(opened)
    process = ServerProcess(path)
    try:
        yield process
    finally:
        process.stop()


def test_a_live_server_answers_extreme_input_without_internal_errors(server):
    with grpc.insecure_channel(server.addr) as channel:
        stub = pb_grpc.SegmentsStub(channel)
        as_of = convert.to_timestamp(AS_OF)
        rules: list[Any] = [json.dumps(r) for n in (739_950, 10**40) for r in extreme_rules(n)]
        rules += [nested_text(MAX_RULE_DEPTH + 1), nested_text(2_000), nested_text(100_000),
                  json.dumps({"field": "age", "op": "in",
                              "value": list(range(MAX_LIST_VALUES + 1))})]
        for text in rules:
            try:
                stub.Count(pb.CountRequest(rule_json=text, as_of=as_of), timeout=30)
            except grpc.RpcError as exc:
                assert exc.code() is grpc.StatusCode.INVALID_ARGUMENT, (text[:200], exc)
        for edge in ("0001-01-01T00:00:00Z", "9999-12-31T23:59:59.999999Z"):
            stub.Count(pb.CountRequest(rule_json=json.dumps(extreme_rules(10**18)[0]),
                                       as_of=convert.to_timestamp(edge)), timeout=30)
        crafted = base64.urlsafe_b64encode(struct.pack(">BQIq", 1, 1, 5, 2**63 - 1)).decode()
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Members(pb.MembersRequest(rule_json='{"all": true}', cursor=crafted),
                              timeout=30))
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "cursor" in caught.value.details()
        deep = pb.Rule(field=pb.Condition(field="age", op="exists"))
        for _ in range(MAX_RULE_DEPTH):
            deep = pb.Rule(**{"not": deep})
        with pytest.raises(grpc.RpcError) as caught:
            stub.Count(pb.CountRequest(rule=deep), timeout=30)
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        first = stub.GetProfile(pb.GetProfileRequest(profile_id="first"), timeout=30)
        assert first.fields["seen"] == "0001-01-01T00:00:00Z"


# ---------------------------------------------------------------------- having in / not_in
@pytest.mark.parametrize("rule, expected", [
    ({"event": "x", "having": {"agg": "count", "op": "in", "value": [1, 3]}},
     {"first", "mid"}),
    ({"event": "x", "having": {"agg": "count", "op": "not_in", "value": [1, 3]}},
     {"last", "none"}),  # "last"'s row is after as_of; "none" has count 0
    ({"event": "*", "having": {"agg": "sum", "of": "v", "op": "in", "value": [0, 3]}},
     {"mid", "last", "none"}),
    ({"event": "x", "having": {"agg": "max", "of": "v", "op": "not_in", "value": [1]}},
     {"mid"}),  # no rows: no max, false
    ({"orders": {"all": True}, "having": {"agg": "avg", "of": "amount", "op": "in",
                                          "value": [2.5, 7]}}, {"mid"}),
    ({"orders": {"all": True}, "having": {"agg": "sum", "of": "amount", "op": "not_in",
                                          "value": [1.5]}}, {"mid", "last", "none"}),
])
def test_having_takes_in_and_not_in_also_as_protobuf(engine, rule, expected):
    assert set(engine.members(rule, as_of=AS_OF)) == expected
    assert engine.count(rule, as_of=AS_OF) == len(expected)
    assert all(engine.is_member(p, rule, as_of=AS_OF) == (p in expected)
               for p in ("first", "last", "mid", "none"))
    sent = convert.rule_from_json(rule)
    assert sent.WhichOneof("node") in ("event", "orders")
    assert set(engine.members(convert.rule_to_json(sent), as_of=AS_OF)) == expected
    words = explain(engine.snapshot, rule, engine.parse(rule), T.parse_timestamp(AS_OF))
    assert all(str(v) in words.sentence for v in rule["having"]["value"]), words.sentence


def test_having_in_needs_a_non_empty_list_of_numbers(engine):
    for value, path in (([], "$.having.value"), (5, "$.having.value"),
                        ([1, "a"], "$.having.value[1]")):
        with pytest.raises(RuleError) as caught:
            engine.count({"event": "x", "having": {"agg": "count", "op": "in", "value": value}})
        assert caught.value.path == path
