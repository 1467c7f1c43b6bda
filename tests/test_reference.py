"""Hand-checked examples for the naive reference, so the oracle itself can be trusted.

Every expected set below was worked out by hand from CONTRACT §1/§2, not by running code.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

import pytest
import strategies as S
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import Reference, anniversary_matches
from test_rule_errors import AS_OF, CASES, PROFILES, SCHEMA, check_rule_error

from bitseg.index.errors import NotFound, RuleError

UTC = timezone.utc


def utc(*args) -> datetime:
    return datetime(*args, tzinfo=UTC)


@pytest.fixture
def ref() -> Reference:
    r = Reference({"country": "keyword", "tags": "keywords", "age": "int", "ltv": "float",
                   "subscribed": "bool", "birthday": "date", "created_at": "timestamp"})
    r.upsert([
        {"id": "u1", "country": "DE", "tags": ["vip", "newsletter", "vip"], "age": 34,
         "ltv": 0.3, "subscribed": True, "birthday": "1992-02-29",
         "created_at": "2024-03-01T10:00:00Z"},
        {"id": "u2", "country": "FR", "tags": ["newsletter"], "age": 20, "ltv": 0.1,
         "subscribed": False, "birthday": "2000-12-31", "created_at": "2024-03-01T00:00:00"},
        {"id": "u3", "country": "DE", "age": 50, "birthday": "1990-01-01",
         "created_at": "2024-02-29T23:30:00-02:00"},  # = 2024-03-01T01:30Z
        {"id": "u4"},
    ])
    r.upsert([{"id": "u3", "age": None, "ltv": 2}])  # null removes; omitted keys are kept
    return r


T0 = utc(2024, 6, 1, 12)


def m(ref, rule, as_of=T0, **kw):
    return ref.members(rule, as_of, **kw)


def test_upsert_semantics(ref):
    assert ref.profiles["u3"] == {"country": "DE", "birthday": "1990-01-01",
                                  "created_at": "2024-02-29T23:30:00-02:00", "ltv": 2}
    assert ref.profiles["u4"] == {}
    ref.upsert([{"id": 7, "age": 1}, {"id": "7", "age": 2, "country": "DE"}])
    assert ref.profiles["7"] == {"age": 2, "country": "DE"}
    assert list(ref.profiles) == ["u1", "u2", "u3", "u4", "7"]


def test_logic(ref):
    assert m(ref, {"all": True}) == {"u1", "u2", "u3", "u4"}
    assert m(ref, {"not": {"all": True}}) == set()
    assert m(ref, {"and": [{"field": "country", "op": "eq", "value": "DE"},
                           {"field": "age", "op": "exists"}]}) == {"u1"}
    assert m(ref, {"or": [{"field": "country", "op": "eq", "value": "FR"},
                          {"field": "age", "op": "gt", "value": 30}]}) == {"u1", "u2"}
    assert m(ref, {"not": {"not": {"field": "country", "op": "eq", "value": "DE"}}}) == {
        "u1", "u3"}


def test_keyword_ops(ref):
    assert m(ref, {"field": "country", "op": "eq", "value": "DE"}) == {"u1", "u3"}
    assert m(ref, {"field": "country", "op": "eq", "value": "de"}) == set()  # case-sensitive
    assert m(ref, {"field": "country", "op": "ne", "value": "DE"}) == {"u2"}  # u4 lacks it
    assert m(ref, {"not": {"field": "country", "op": "eq", "value": "DE"}}) == {"u2", "u4"}
    assert m(ref, {"field": "country", "op": "in", "value": ["FR", "XX"]}) == {"u2"}
    assert m(ref, {"field": "country", "op": "not_in", "value": ["FR"]}) == {"u1", "u3"}
    assert m(ref, {"field": "country", "op": "exists"}) == {"u1", "u2", "u3"}
    assert m(ref, {"field": "country", "op": "not_exists"}) == {"u4"}


def test_multi_keyword_ops(ref):
    assert m(ref, {"field": "tags", "op": "eq", "value": "newsletter"}) == {"u1", "u2"}
    assert m(ref, {"field": "tags", "op": "ne", "value": "vip"}) == {"u2"}
    assert m(ref, {"field": "tags", "op": "ne", "value": "xx"}) == {"u1", "u2"}
    assert m(ref, {"field": "tags", "op": "in", "value": ["vip", "xx"]}) == {"u1"}
    assert m(ref, {"field": "tags", "op": "not_in", "value": ["vip", "xx"]}) == {"u2"}
    assert m(ref, {"field": "tags", "op": "not_in", "value": ["newsletter"]}) == set()
    assert m(ref, {"field": "tags", "op": "has_all", "value": ["vip", "newsletter"]}) == {"u1"}
    assert m(ref, {"field": "tags", "op": "has_all", "value": ["newsletter"]}) == {"u1", "u2"}
    assert m(ref, {"field": "tags", "op": "has_all", "value": ["vip", "xx"]}) == set()
    assert m(ref, {"field": "tags", "op": "not_exists"}) == {"u3", "u4"}


def test_bool_ops(ref):
    assert m(ref, {"field": "subscribed", "op": "eq", "value": True}) == {"u1"}
    assert m(ref, {"field": "subscribed", "op": "eq", "value": False}) == {"u2"}
    assert m(ref, {"field": "subscribed", "op": "ne", "value": True}) == {"u2"}
    assert m(ref, {"not": {"field": "subscribed", "op": "eq", "value": True}}) == {
        "u2", "u3", "u4"}


def test_number_ops(ref):
    assert m(ref, {"field": "age", "op": "exists"}) == {"u1", "u2"}  # u3's age was nulled
    assert m(ref, {"field": "age", "op": "between", "value": [20, 34]}) == {"u1", "u2"}
    assert m(ref, {"field": "age", "op": "between", "value": [21, 34]}) == {"u1"}
    assert m(ref, {"field": "age", "op": "gt", "value": 20}) == {"u1"}
    assert m(ref, {"field": "age", "op": "gte", "value": 20}) == {"u1", "u2"}
    assert m(ref, {"field": "age", "op": "lt", "value": 100}) == {"u1", "u2"}
    assert m(ref, {"field": "age", "op": "ne", "value": 34}) == {"u2"}
    assert m(ref, {"field": "age", "op": "not_in", "value": [1, 2]}) == {"u1", "u2"}
    assert m(ref, {"field": "age", "op": "in", "value": [34, 50]}) == {"u1"}
    # floats compare by their decimal value: 0.1 + 0.2 != 0.3 in binary, but stored 0.3 == 0.3
    assert m(ref, {"field": "ltv", "op": "eq", "value": 0.3}) == {"u1"}
    assert m(ref, {"field": "ltv", "op": "eq", "value": 0.1 + 0.2}) == set()  # 0.30000000000000004
    assert m(ref, {"field": "ltv", "op": "gt", "value": 0.1}) == {"u1", "u3"}
    assert m(ref, {"field": "ltv", "op": "between", "value": [0.1, 0.3]}) == {"u1", "u2"}
    assert m(ref, {"field": "ltv", "op": "eq", "value": 2.0}) == {"u3"}
    assert m(ref, {"field": "ltv", "op": "lte", "value": 2}) == {"u1", "u2", "u3"}


def test_dates(ref):
    assert m(ref, {"field": "birthday", "op": "lt", "value": "1992-02-29"}) == {"u3"}
    assert m(ref, {"field": "birthday", "op": "between",
                   "value": ["1990-01-01", "1992-02-29"]}) == {"u1", "u3"}
    assert m(ref, {"field": "birthday", "op": "in", "value": ["2000-12-31"]}) == {"u2"}
    # days_ago on a date field: the UTC calendar date of as_of - n days.
    # 2001-01-01T00:30+02:00 is 2000-12-31T22:30Z, so days_ago 0 is 2000-12-31.
    local = datetime(2001, 1, 1, 0, 30, tzinfo=timezone(timedelta(hours=2)))
    assert m(ref, {"field": "birthday", "op": "eq", "value": {"days_ago": 0}}, local) == {"u2"}
    assert m(ref, {"field": "birthday", "op": "eq", "value": {"days_ago": 1}},
             utc(2001, 1, 1, 23, 59, 59)) == {"u2"}
    assert m(ref, {"field": "birthday", "op": "gte", "value": {"days_ago": 365}},
             utc(2001, 12, 31)) == {"u2"}
    assert m(ref, {"field": "birthday", "op": "gte", "value": {"days_ago": 366}},
             utc(2001, 12, 31)) == {"u2"}
    assert m(ref, {"field": "birthday", "op": "gt", "value": {"days_ago": 365}},
             utc(2001, 12, 31)) == set()


def test_timestamps(ref):
    # a plain date against a timestamp field is midnight UTC
    assert m(ref, {"field": "created_at", "op": "gte", "value": "2024-03-01"}) == {
        "u1", "u2", "u3"}
    assert m(ref, {"field": "created_at", "op": "eq", "value": "2024-03-01"}) == {"u2"}
    assert m(ref, {"field": "created_at", "op": "eq",
                   "value": "2024-03-01T03:30:00+02:00"}) == {"u3"}
    assert m(ref, {"field": "created_at", "op": "lt", "value": "2024-03-01T01:30:00Z"}) == {
        "u2"}
    assert m(ref, {"field": "created_at", "op": "between",
                   "value": ["2024-03-01T00:00:00Z", "2024-03-01T01:30:00"]}) == {"u2", "u3"}
    # days_ago on a timestamp field: exactly as_of - n days
    assert m(ref, {"field": "created_at", "op": "gte", "value": {"days_ago": 1}},
             utc(2024, 3, 2)) == {"u1", "u2", "u3"}
    assert m(ref, {"field": "created_at", "op": "gte", "value": {"days_ago": 1}},
             utc(2024, 3, 2, 1, 30)) == {"u1", "u3"}
    assert m(ref, {"field": "created_at", "op": "gt", "value": {"days_ago": 1}},
             utc(2024, 3, 2, 1, 30)) == {"u1"}
    assert m(ref, {"field": "created_at", "op": "between",
                   "value": [{"days_ago": 2}, {"days_ago": 0}]}, utc(2024, 3, 1, 5)) == {
        "u2", "u3"}


def test_anniversaries(ref):
    rule = {"field": "birthday", "op": "anniversary_in", "value": {"next_days": 1}}
    assert m(ref, rule, utc(2023, 2, 28, 12)) == {"u1"}  # Feb 29 counts as Feb 28 in 2023
    assert m(ref, rule, utc(2024, 2, 28, 12)) == set()  # ... but not in leap 2024
    assert m(ref, rule, utc(2024, 2, 29)) == {"u1"}
    assert m(ref, rule, utc(2025, 2, 28, 23, 59, 59)) == {"u1"}
    assert m(ref, rule, utc(2025, 3, 1)) == set()
    assert m(ref, rule, utc(2024, 12, 31, 23, 59, 59)) == {"u2"}
    # as_of 2025-01-01T01:00+02:00 is 2024-12-31T23:00Z: the window starts on Dec 31
    assert m(ref, rule, datetime(2025, 1, 1, 1, tzinfo=timezone(timedelta(hours=2)))) == {"u2"}
    two = {"field": "birthday", "op": "anniversary_in", "value": {"next_days": 2}}
    assert m(ref, two, utc(2024, 2, 28)) == {"u1"}
    assert m(ref, two, utc(2024, 12, 31)) == {"u2", "u3"}  # wraps into January
    assert m(ref, two, utc(2024, 12, 30)) == {"u2"}
    year = {"field": "birthday", "op": "anniversary_in", "value": {"next_days": 366}}
    assert m(ref, year, utc(2024, 3, 1)) == {"u1", "u2", "u3"}
    # timestamps use their UTC date: u3 is 2024-02-29 local but 2024-03-01 UTC
    ts = {"field": "created_at", "op": "anniversary_in", "value": {"next_days": 1}}
    assert m(ref, ts, utc(2025, 3, 1)) == {"u1", "u2", "u3"}
    assert m(ref, ts, utc(2025, 2, 28)) == set()


def test_anniversary_matches_directly():
    assert anniversary_matches(date(2000, 2, 29), date(2023, 2, 28), 1)
    assert not anniversary_matches(date(2000, 2, 29), date(2023, 3, 1), 300)
    # 365 days from 2023-03-01 end on 2024-02-28; in leap 2024 a Feb 29 date is Feb 29 only
    assert not anniversary_matches(date(2000, 2, 29), date(2023, 3, 1), 365)
    assert anniversary_matches(date(2000, 2, 29), date(2023, 3, 1), 366)
    assert anniversary_matches(date(2000, 3, 1), date(2024, 2, 28), 3)
    assert not anniversary_matches(date(2000, 3, 1), date(2024, 2, 28), 2)
    assert anniversary_matches(date(1999, 1, 1), date(2023, 12, 31), 2)
    assert not anniversary_matches(date(1999, 1, 2), date(2023, 12, 31), 2)


def test_delete_and_resurrect(ref):
    ref.delete(["u2"])
    assert m(ref, {"all": True}) == {"u1", "u3", "u4"}
    assert m(ref, {"not": {"field": "country", "op": "eq", "value": "DE"}}) == {"u4"}
    with pytest.raises(KeyError):
        ref.delete(["u1", "nope"])
    assert ref.live() == {"u1", "u3", "u4"}  # nothing deleted
    ref.upsert([{"id": "u2", "age": 5}])  # a new profile: its old values are gone
    assert ref.profiles["u2"] == {"age": 5}
    assert m(ref, {"field": "country", "op": "not_exists"}) == {"u2", "u4"}


def test_segments(ref):
    segs = {"s": {"u1", "u4"}}
    assert m(ref, {"segment": "s"}, segments=segs) == {"u1", "u4"}
    assert m(ref, {"not": {"segment": "s"}}, segments=segs) == {"u2", "u3"}
    assert m(ref, {"and": [{"segment": "s"}, {"field": "age", "op": "exists"}]},
             segments=segs) == {"u1"}
    with pytest.raises(NotFound):
        m(ref, {"segment": "nope"}, segments=segs)


def test_json_text_and_string_as_of(ref):
    assert ref.members('{"field": "country", "op": "eq", "value": "FR"}',
                       "2024-06-01T00:00:00") == {"u2"}


def test_display(ref):
    assert ref.display("u1") == {
        "id": "u1", "country": "DE", "tags": ["newsletter", "vip"], "age": 34, "ltv": 0.3,
        "subscribed": True, "birthday": "1992-02-29", "created_at": "2024-03-01T10:00:00Z"}
    assert ref.display("u3")["created_at"] == "2024-03-01T01:30:00Z"
    assert ref.display("u2")["created_at"] == "2024-03-01T00:00:00Z"


# ----------------------------------------------------------------------------- error table

@pytest.fixture(scope="module")
def error_ref() -> Reference:
    r = Reference(SCHEMA)
    r.upsert(PROFILES)
    return r


@pytest.mark.parametrize("case_id, rule, path, must, any_of", CASES, ids=[c[0] for c in CASES])
def test_reference_agrees_with_error_table(error_ref, case_id, rule, path, must, any_of):
    with pytest.raises(RuleError) as info:
        error_ref.members(rule, AS_OF)
    check_rule_error(info.value, path, must, any_of)


# ----------------------------------------------------------------------------- strategies

@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_generated_rules_are_valid_and_partition(data):
    """Sanity of the generators: rules validate, and r / not r partition the live set."""
    scenario = data.draw(S.scenarios())
    ref = Reference(scenario.schema)
    for kind, payload in scenario.steps:
        ref.upsert(payload) if kind == "upsert" else ref.delete(payload)
    assert ref.live() == set(scenario.live_after())
    rule = data.draw(S.rules(scenario.schema, scenario.values_seen()))
    as_of = data.draw(S.as_ofs())
    inside = ref.members(rule, as_of)
    outside = ref.members({"not": rule}, as_of)
    assert inside | outside == ref.live() and not inside & outside
