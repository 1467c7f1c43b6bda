"""Property tests: the engine agrees with the naive reference (tests/reference.py).

Random schema over all seven types, several upsert batches (repeated ids, nulls, integer
ids), occasional deletes, then random valid rules at random as_of instants.
"""

from __future__ import annotations

import copy
import json
import tempfile
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import strategies as S
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import Reference

from bitseg.index.engine import Engine
from bitseg.index.errors import DataError, NotFound

PROPERTY = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                           HealthCheck.data_too_large],
)
FEWER = settings(PROPERTY, max_examples=60)
WIDE_AS_OF = datetime(2025, 1, 1, tzinfo=timezone.utc)


def build(path: Path, scenario: S.Scenario):
    """The same history applied to a fresh engine store and to the reference."""
    engine = Engine.open(path)
    engine.declare_schema({"profiles": dict(scenario.schema)})
    ref = Reference(scenario.schema)
    for kind, payload in scenario.steps:
        if kind == "upsert":
            engine.upsert_profiles(copy.deepcopy(payload))
            ref.upsert(copy.deepcopy(payload))
        else:
            engine.delete_profiles(list(payload))
            ref.delete(payload)
    return engine, ref


def explain(ref: Reference, rule: Any, as_of: Any, expected: set[str], got: set[str]) -> str:
    lines = [f"rule:  {json.dumps(rule)}", f"as_of: {as_of.isoformat()}"]
    for label, ids in (("missing (reference has, engine lacks)", expected - got),
                       ("extra (engine has, reference lacks)", got - expected)):
        for pid in sorted(ids):
            lines.append(f"{label}: {pid} {json.dumps(ref.profiles.get(pid))}")
    return "\n".join(lines)


def check_rule(engine, ref: Reference, rule: dict, as_of, data) -> set[str]:
    expected = ref.members(rule, as_of)
    # the engine takes the rule as a dict or as JSON text, as_of as datetime or ISO text
    rule_in = json.dumps(rule) if data.draw(st.integers(0, 4), label="json text") == 0 else rule
    as_of_in = as_of.isoformat() if data.draw(st.integers(0, 4), label="iso as_of") == 0 \
        else as_of
    got_list = engine.members(rule_in, as_of=as_of_in)
    assert len(got_list) == len(set(got_list)), f"duplicate ids in {got_list}"
    got = set(got_list)
    assert got == expected, explain(ref, rule, as_of, expected, got)
    assert engine.count(rule_in, as_of=as_of_in) == len(expected), explain(
        ref, rule, as_of, expected, got)
    live = sorted(ref.live())
    if live:
        for pid in data.draw(st.lists(st.sampled_from(live), max_size=3, unique=True),
                             label="is_member ids"):
            assert engine.is_member(pid, rule_in, as_of=as_of_in) == (pid in expected), (
                f"is_member({pid!r})\n" + explain(ref, rule, as_of, expected, got))
    return expected


@PROPERTY
@given(data=st.data())
def test_engine_matches_reference(tmp_path, data):
    scenario = data.draw(S.scenarios(), label="scenario")
    with tempfile.TemporaryDirectory(dir=tmp_path) as tmp:
        engine, ref = build(Path(tmp) / "x", scenario)
        try:
            assert engine.total() == ref.total()
            seen = scenario.values_seen()
            for _ in range(data.draw(st.integers(2, 5), label="rules")):
                rule = data.draw(S.rules(scenario.schema, seen), label="rule")
                as_of = data.draw(S.as_ofs(seen, scenario.schema), label="as_of")
                check_rule(engine, ref, rule, as_of, data)
        finally:
            engine.close()


@settings(PROPERTY, max_examples=15)
@given(data=st.data())
def test_bigger_stores_match_reference(tmp_path, data):
    """Up to ~250 profiles, so bitmaps and slices hold more than a handful of bits."""
    scenario = data.draw(S.scenarios(max_batches=5, max_batch=60, pool_size=300),
                         label="scenario")
    with tempfile.TemporaryDirectory(dir=tmp_path) as tmp:
        engine, ref = build(Path(tmp) / "x", scenario)
        try:
            assert engine.total() == ref.total()
            seen = scenario.values_seen()
            for _ in range(6):
                rule = data.draw(S.rules(scenario.schema, seen), label="rule")
                as_of = data.draw(S.as_ofs(seen, scenario.schema), label="as_of")
                check_rule(engine, ref, rule, as_of, data)
        finally:
            engine.close()


@FEWER
@given(data=st.data())
def test_wide_numbers_and_instants_match_reference(tmp_path, data):
    """Values far apart (|int| up to 2**50, cents up to 1e10, years 1900-2200 with ms)."""
    scenario = data.draw(S.wide_scenarios(), label="scenario")
    with tempfile.TemporaryDirectory(dir=tmp_path) as tmp:
        engine, ref = build(Path(tmp) / "x", scenario)
        try:
            seen = scenario.values_seen()
            for _ in range(4):
                rule = data.draw(S.wide_conditions(seen), label="rule")
                if data.draw(st.booleans(), label="negate"):
                    rule = {"not": rule}
                check_rule(engine, ref, rule, WIDE_AS_OF, data)
        finally:
            engine.close()


@FEWER
@given(data=st.data())
def test_not_partitions_the_live_profiles(tmp_path, data):
    scenario = data.draw(S.scenarios(), label="scenario")
    with tempfile.TemporaryDirectory(dir=tmp_path) as tmp:
        engine, ref = build(Path(tmp) / "x", scenario)
        try:
            live = ref.live()
            assert set(engine.members({"all": True}, as_of=S.AS_OF_LAST.isoformat())) == live
            for _ in range(3):
                rule = data.draw(S.rules(scenario.schema, scenario.values_seen()), label="rule")
                as_of = data.draw(S.as_ofs(scenario.values_seen(), scenario.schema),
                                  label="as_of")
                inside = set(engine.members(rule, as_of=as_of))
                outside = set(engine.members({"not": rule}, as_of=as_of))
                assert not inside & outside, f"{json.dumps(rule)}: both r and not r: " \
                                             f"{inside & outside}"
                assert inside | outside == live, f"{json.dumps(rule)}: neither r nor not r: " \
                                                 f"{live - inside - outside}"
                assert engine.count(rule, as_of=as_of) + engine.count(
                    {"not": rule}, as_of=as_of) == engine.total()
        finally:
            engine.close()


@FEWER
@given(data=st.data())
def test_reopened_store_gives_the_same_members(tmp_path, data):
    scenario = data.draw(S.scenarios(), label="scenario")
    seen = scenario.values_seen()
    checks = [(data.draw(S.rules(scenario.schema, seen), label="rule"),
               data.draw(S.as_ofs(), label="as_of")) for _ in range(3)]
    with tempfile.TemporaryDirectory(dir=tmp_path) as tmp:
        path = Path(tmp) / "x"
        engine, ref = build(path, scenario)
        try:
            before = [engine.members(rule, as_of=as_of) for rule, as_of in checks]
            total = engine.total()
        finally:
            engine.close()
        engine = Engine.open(path)
        try:
            assert engine.total() == total == ref.total()
            assert dict(engine.schema.profiles) == scenario.schema
            for (rule, as_of), old in zip(checks, before, strict=True):
                new = engine.members(rule, as_of=as_of)
                assert new == old, f"{json.dumps(rule)} at {as_of.isoformat()}: " \
                                   f"{old} before reopening, {new} after"
                assert set(new) == ref.members(rule, as_of), explain(
                    ref, rule, as_of, ref.members(rule, as_of), set(new))
        finally:
            engine.close()


@FEWER
@given(data=st.data())
def test_deleted_then_upserted_again_is_a_new_profile(tmp_path, data):
    """Deleted ids come back (resurrect=True): their old values must not come back with them."""
    scenario = data.draw(S.scenarios(resurrect=True), label="scenario")
    with tempfile.TemporaryDirectory(dir=tmp_path) as tmp:
        engine, ref = build(Path(tmp) / "x", scenario)
        try:
            assert engine.total() == ref.total()
            for pid in sorted(ref.live()):
                assert engine.profile(pid) == ref.display(pid)
            for _ in range(3):
                rule = data.draw(S.rules(scenario.schema, scenario.values_seen()), label="rule")
                as_of = data.draw(S.as_ofs(scenario.values_seen(), scenario.schema),
                                  label="as_of")
                check_rule(engine, ref, rule, as_of, data)
        finally:
            engine.close()


@FEWER
@given(data=st.data())
def test_profiles_read_back_as_loaded(tmp_path, data):
    """ENGINE_API display values after the upsert semantics of CONTRACT §1."""
    scenario = data.draw(S.scenarios(), label="scenario")
    with tempfile.TemporaryDirectory(dir=tmp_path) as tmp:
        engine, ref = build(Path(tmp) / "x", scenario)
        try:
            for pid in sorted(ref.live()):
                assert engine.profile(pid) == ref.display(pid), pid
            for pid in S.ID_POOL:
                if pid not in ref.live():
                    with pytest.raises(NotFound):
                        engine.is_member(pid, {"all": True}, as_of="2024-01-01T00:00:00Z")
        finally:
            engine.close()


@FEWER
@given(data=st.data())
def test_members_in_load_order_and_limit(tmp_path, data):
    """ENGINE_API: members() lists external ids in load order; limit keeps the first ones."""
    scenario = data.draw(S.scenarios(), label="scenario")
    with tempfile.TemporaryDirectory(dir=tmp_path) as tmp:
        engine, ref = build(Path(tmp) / "x", scenario)
        try:
            rule = data.draw(S.rules(scenario.schema, scenario.values_seen()), label="rule")
            as_of = data.draw(S.as_ofs(), label="as_of")
            expected = ref.in_load_order(ref.members(rule, as_of))
            assert engine.members(rule, as_of=as_of) == expected
            limit = data.draw(st.integers(0, 4), label="limit")
            assert engine.members(rule, as_of=as_of, limit=limit) == expected[:limit]
        finally:
            engine.close()


BAD_VALUES = {"keyword": [5, ["a"], True], "keywords": [[1], 3, [None]], "bool": ["yes", 1],
              "int": [1.5, "3", True], "float": ["x", True, [1.0]],
              "date": ["2024-02-30", "2024-1-1", 20240101],
              "timestamp": ["noon", "2024-13-01T00:00:00Z", 5]}


@FEWER
@given(data=st.data())
def test_a_bad_record_fails_the_whole_batch(tmp_path, data):
    """CONTRACT §1: a value that does not fit its type is a load error naming the line and
    the field; nothing of the failed batch is applied (and an unknown id deletes nothing)."""
    scenario = data.draw(S.scenarios(), label="scenario")
    with tempfile.TemporaryDirectory(dir=tmp_path) as tmp:
        engine, ref = build(Path(tmp) / "x", scenario)
        try:
            before = {pid: engine.profile(pid) for pid in ref.live()}
            good = data.draw(S.scenarios(scenario.schema, max_batches=1), label="next batch")
            batch = copy.deepcopy(good.steps[0][1])
            name = data.draw(st.sampled_from(sorted(scenario.schema)), label="bad field")
            bad_value = data.draw(st.sampled_from(BAD_VALUES[scenario.schema[name]]),
                                  label="bad value")
            at = data.draw(st.integers(0, len(batch)), label="position")
            bad_id = data.draw(st.sampled_from(S.ID_POOL + ["brand-new"]), label="bad id")
            batch.insert(at, {"id": bad_id, name: bad_value})
            with pytest.raises(DataError) as info:
                engine.upsert_profiles(batch, file="profiles.jsonl")
            assert info.value.field == name, str(info.value)
            assert info.value.line == at + 1, str(info.value)
            assert engine.total() == ref.total()
            assert {pid: engine.profile(pid) for pid in ref.live()} == before
            assert set(engine.members({"all": True}, as_of=WIDE_AS_OF)) == ref.live()
            live = sorted(ref.live())
            if live:
                with pytest.raises(NotFound):
                    engine.delete_profiles([live[0], "never-seen"])
                assert engine.total() == ref.total()
                assert set(engine.members({"all": True}, as_of=WIDE_AS_OF)) == ref.live()
        finally:
            engine.close()


@FEWER
@given(values=st.lists(
    st.tuples(st.integers(-(10**6), 10**6), st.integers(0, 12)).map(
        lambda kd: float(Decimal(kd[0]).scaleb(-kd[1]))),
    min_size=1, max_size=8))
def test_a_loaded_float_compares_equal_to_itself(tmp_path, values):
    """Whatever the precision kept, a profile matches its own loaded value: eq/in/gte/lte/
    between of it are true, ne/not_in/gt/lt are false (floats with 0-12 decimals)."""
    with tempfile.TemporaryDirectory(dir=tmp_path) as tmp:
        engine = Engine.open(Path(tmp) / "x")
        try:
            engine.declare_schema({"profiles": {"x": "float"}})
            engine.upsert_profiles([{"id": f"p{i}", "x": v} for i, v in enumerate(values)])
            for i, v in enumerate(values):
                pid = f"p{i}"
                for op, value, expected in [
                        ("eq", v, True), ("in", [v], True), ("gte", v, True), ("lte", v, True),
                        ("between", [v, v], True), ("ne", v, False), ("not_in", [v], False),
                        ("gt", v, False), ("lt", v, False)]:
                    rule = {"field": "x", "op": op, "value": value}
                    assert engine.is_member(pid, rule, as_of=WIDE_AS_OF) is expected, (
                        f"{pid} loaded with x={v!r}: {json.dumps(rule)} should be {expected}")
        finally:
            engine.close()


# ----------------------------------------------------------------------------- edge examples

EDGE_SCHEMA = {"ltv": "float", "age": "int", "birthday": "date", "seen": "timestamp",
               "tags": "keywords", "country": "keyword"}


@pytest.fixture
def edge(tmp_path):
    engine = Engine.open(tmp_path / "edge")
    engine.declare_schema({"profiles": EDGE_SCHEMA})
    ref = Reference(EDGE_SCHEMA)
    yield engine, ref
    engine.close()


def _load(edge, records):
    engine, ref = edge
    engine.upsert_profiles(copy.deepcopy(records))
    ref.upsert(copy.deepcopy(records))


def _same(edge, rule, as_of="2025-01-01T00:00:00Z"):
    engine, ref = edge
    as_of_dt = datetime.fromisoformat(as_of)
    expected = ref.members(rule, as_of_dt)
    got = set(engine.members(rule, as_of=as_of))
    assert got == expected, explain(ref, rule, as_of_dt, expected, got)
    return got


def test_floats_compare_with_the_precision_they_were_loaded_with(edge):
    """CONTRACT §1: floats compare with the precision they were loaded with."""
    _load(edge, [{"id": "a", "ltv": 0.1234567}, {"id": "b", "ltv": 0.123457},
                 {"id": "c", "ltv": 1520.5}, {"id": "d", "ltv": 0.30}])
    assert _same(edge, {"field": "ltv", "op": "eq", "value": 0.3}) == {"d"}
    assert _same(edge, {"field": "ltv", "op": "eq", "value": 1520.50}) == {"c"}
    assert _same(edge, {"field": "ltv", "op": "eq", "value": 0.123457}) == {"b"}
    assert _same(edge, {"field": "ltv", "op": "eq", "value": 0.1234567}) == {"a"}
    assert _same(edge, {"field": "ltv", "op": "lt", "value": 0.123457}) == {"a"}
    assert _same(edge, {"field": "ltv", "op": "gt", "value": 0.1234567}) == {"b", "c", "d"}


def test_floats_beyond_8_decimals_compare_exactly(edge):
    """CONTRACT §1 "floats compare with the precision they were loaded with": 9 decimals
    loaded, 9 decimals compared (the README's rounding to 8 places is a narrower reading)."""
    _load(edge, [{"id": "a", "ltv": 0.123456781}, {"id": "b", "ltv": 0.12345678},
                 {"id": "c", "ltv": 0.123456785}])
    assert _same(edge, {"field": "ltv", "op": "eq", "value": 0.123456781}) == {"a"}
    assert _same(edge, {"field": "ltv", "op": "eq", "value": 0.12345678}) == {"b"}
    assert _same(edge, {"field": "ltv", "op": "gt", "value": 0.12345678}) == {"a", "c"}
    assert _same(edge, {"field": "ltv", "op": "lt", "value": 0.123456785}) == {"a", "b"}


def test_rule_constants_finer_than_a_wide_float_field(edge):
    """A field spanning 4.5e10 with 8 decimals; constants with 9 decimals still compare
    exactly (a constant between two representable values must not be rounded onto one)."""
    _load(edge, [{"id": "big", "ltv": 44999999999.99}, {"id": "small", "ltv": 0.12345678},
                 {"id": "zero", "ltv": 0.0}, {"id": "tiny", "ltv": 0.00000001}])
    for op in ("gte", "gt", "lt", "lte", "eq", "ne"):
        for value in (0.000000005, 0.000000015, 0.123456775, 44999999999.985):
            _same(edge, {"field": "ltv", "op": op, "value": value})
    _same(edge, {"field": "ltv", "op": "between", "value": [0.000000005, 0.000000015]})
    _same(edge, {"field": "ltv", "op": "in", "value": [0.000000005, 0.0]})


def test_anniversary_leap_day_edges(edge):
    _load(edge, [{"id": "leap", "birthday": "2000-02-29"},
                 {"id": "mar1", "birthday": "1999-03-01"},
                 {"id": "dec31", "birthday": "1980-12-31"},
                 {"id": "jan1", "birthday": "1981-01-01"},
                 {"id": "ts", "seen": "2020-02-29T23:59:59Z"},
                 {"id": "ts-late", "seen": "2020-02-29T22:00:00-05:00"}])  # = Mar 1 UTC
    one = {"field": "birthday", "op": "anniversary_in", "value": {"next_days": 1}}
    two = {"field": "birthday", "op": "anniversary_in", "value": {"next_days": 2}}
    ts1 = {"field": "seen", "op": "anniversary_in", "value": {"next_days": 1}}
    assert _same(edge, one, "2023-02-28T00:00:00Z") == {"leap"}
    assert _same(edge, one, "2024-02-28T00:00:00Z") == set()
    assert _same(edge, one, "2024-02-29T23:59:59Z") == {"leap"}
    assert _same(edge, two, "2024-02-28T12:00:00Z") == {"leap"}
    assert _same(edge, two, "2023-02-28T12:00:00Z") == {"leap", "mar1"}
    assert _same(edge, two, "2023-12-31T12:00:00Z") == {"dec31", "jan1"}
    assert _same(edge, one, "2024-01-01T01:00:00+02:00") == {"dec31"}  # Dec 31 in UTC
    assert _same(edge, ts1, "2023-02-28T00:00:00Z") == {"ts"}
    assert _same(edge, ts1, "2023-03-01T00:00:00Z") == {"ts-late"}
    assert _same(edge, ts1, "2024-02-29T00:00:00Z") == {"ts"}
    big = {"field": "birthday", "op": "anniversary_in", "value": {"next_days": 100000}}
    assert _same(edge, big, "2024-03-01T00:00:00Z") == {"leap", "mar1", "dec31", "jan1"}


def test_relative_dates_at_day_boundaries(edge):
    _load(edge, [{"id": "mid", "seen": "2024-03-01T00:00:00Z", "birthday": "2024-03-01"},
                 {"id": "before", "seen": "2024-02-29T23:59:59Z", "birthday": "2024-02-29"}])
    gte_ts = {"field": "seen", "op": "gte", "value": {"days_ago": 1}}
    gte_d = {"field": "birthday", "op": "gte", "value": {"days_ago": 1}}
    eq_d = {"field": "birthday", "op": "eq", "value": {"days_ago": 1}}
    assert _same(edge, gte_ts, "2024-03-02T00:00:00Z") == {"mid"}
    assert _same(edge, gte_ts, "2024-03-01T23:59:59Z") == {"mid", "before"}
    assert _same(edge, gte_d, "2024-03-02T00:00:00Z") == {"mid"}
    assert _same(edge, gte_d, "2024-03-01T23:59:59Z") == {"mid", "before"}
    # as_of in another zone: its UTC calendar date decides
    assert _same(edge, eq_d, "2024-03-02T01:00:00+02:00") == {"before"}
    assert _same(edge, {"field": "seen", "op": "lt", "value": "2024-03-01"}) == {"before"}


def test_multi_keyword_negations(edge):
    _load(edge, [{"id": "a", "tags": ["x", "y"]}, {"id": "b", "tags": ["y"]}, {"id": "c"},
                 {"id": "d", "tags": ["z"]}, {"id": "e", "tags": ["x"]}, {"id": "e", "tags": None}])
    assert _same(edge, {"field": "tags", "op": "ne", "value": "x"}) == {"b", "d"}
    assert _same(edge, {"field": "tags", "op": "not_in", "value": ["x", "z"]}) == {"b"}
    assert _same(edge, {"field": "tags", "op": "has_all", "value": ["x", "y"]}) == {"a"}
    assert _same(edge, {"not": {"field": "tags", "op": "eq", "value": "x"}}) == {"b", "c", "d", "e"}
    assert _same(edge, {"field": "tags", "op": "not_exists"}) == {"c", "e"}


@pytest.mark.parametrize("always", [True, False], ids=["in place", "new bitmaps"])
@pytest.mark.parametrize(("test", "examples"), [
    (test_engine_matches_reference, 15), (test_not_partitions_the_live_profiles, 10)],
    ids=lambda v: getattr(v, "__name__", v))
def test_properties_with_differences_in_place_or_not(tmp_path, monkeypatch, always, test,
                                                     examples):
    """fields.in_place picks in-place or new-bitmap differences by a bitmap's density
    (which these small stores never reach): both ways give the same answers, updates
    (ValueWriter) included."""
    from bitseg.index import fields

    monkeypatch.setattr(fields, "in_place", lambda bitmap: always)
    inner = test.hypothesis.inner_test

    def again(tmp_path, data):  # a fresh function: hypothesis settings mark what they wrap
        inner(tmp_path, data)

    given(data=st.data())(settings(PROPERTY, max_examples=examples)(again))(tmp_path=tmp_path)


def test_in_place_only_for_bitmaps_dense_enough_for_bitsets():
    from pyroaring import BitMap

    from bitseg.index.fields import in_place

    assert not in_place(BitMap())
    assert in_place(BitMap(range(0, 65_536, 2)))  # 32,768 ids in one container
    assert in_place(BitMap(range(10_000_000, 10_000_000 + 4096 * 3)))
    assert not in_place(BitMap(range(0, 10_000_000, 100)))  # ~655 ids a container
    assert not in_place(BitMap([1, 5_000_000]))

