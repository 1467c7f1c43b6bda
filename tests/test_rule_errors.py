"""Every malformed rule raises RuleError naming the JSON path of the offending node (CONTRACT §5).

Table-driven: (rule, exact expected path, words that must all appear, words of which at
least one must appear).  The same table is run against the naive reference in
test_reference.py, so the table itself is checked even without the engine.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from bitseg.index.engine import Engine
from bitseg.index.errors import NotFound, RuleError

SCHEMA = {"country": "keyword", "tags": "keywords", "age": "int", "ltv": "float",
          "subscribed": "bool", "birthday": "date", "created_at": "timestamp"}

PROFILES = [
    {"id": "u1", "country": "DE", "tags": ["vip"], "age": 30, "ltv": 1.5, "subscribed": True,
     "birthday": "1990-05-02", "created_at": "2024-03-01T10:00:00Z"},
    {"id": "u2", "country": "FR"},
]

AS_OF = "2025-01-01T00:00:00Z"

OK = {"field": "age", "op": "gte", "value": 1}

# (id, rule, path, must-contain (all), any-of (at least one)); matching is case-insensitive.
# The word lists name what was expected (CONTRACT §5: "and what was expected"), in any
# reasonable wording: a list, a date, a string, a non-empty list, two values, ...
# A path names the offending value literal: a list element is its own node ($.value[1]),
# while {"days_ago": n} and {"next_days": n} are single value literals ($.value).
CASES: list[tuple[str, Any, str, list[str], list[str]]] = [
    # --- unknown field
    ("unknown-field", {"field": "nope", "op": "eq", "value": "x"},
     "$.field", ["nope"], ["unknown", "not declared", "undeclared", "no such", "not a field"]),
    ("unknown-field-nested", {"and": [OK, {"field": "nope", "op": "eq", "value": "x"}]},
     "$.and[1].field", ["nope"], ["unknown", "not declared", "undeclared", "no such",
                                  "not a field"]),
    ("field-not-string", {"field": 5, "op": "eq", "value": 1},
     "$.field", [], ["field", "string", "name"]),
    # --- ops that do not fit the type
    ("gt-on-keyword", {"field": "country", "op": "gt", "value": "DE"},
     "$.op", ["gt"], ["keyword"]),
    ("gt-on-keyword-nested", {"and": [{"field": "country", "op": "gt", "value": "DE"}]},
     "$.and[0].op", ["gt"], ["keyword"]),
    ("between-on-keyword", {"field": "country", "op": "between", "value": ["A", "B"]},
     "$.op", ["between"], ["keyword"]),
    ("lt-on-keywords", {"or": [OK, {"field": "tags", "op": "lt", "value": "vip"}]},
     "$.or[1].op", ["lt"], ["keyword"]),
    ("has_all-on-keyword", {"field": "country", "op": "has_all", "value": ["DE"]},
     "$.op", ["has_all"], ["keyword"]),
    ("has_all-on-int", {"field": "age", "op": "has_all", "value": [1]},
     "$.op", ["has_all"], ["int"]),
    ("in-on-bool", {"field": "subscribed", "op": "in", "value": [True]},
     "$.op", ["in"], ["bool"]),
    ("gt-on-bool", {"field": "subscribed", "op": "gt", "value": False},
     "$.op", ["gt"], ["bool"]),
    ("anniversary-on-int", {"field": "age", "op": "anniversary_in", "value": {"next_days": 3}},
     "$.op", ["anniversary_in"], ["int", "date"]),
    ("anniversary-on-keyword", {"not": {"field": "country", "op": "anniversary_in",
                                        "value": {"next_days": 3}}},
     "$.not.op", ["anniversary_in"], ["keyword", "date"]),
    # --- unknown / missing op
    ("unknown-op", {"field": "age", "op": "bigger", "value": 1},
     "$.op", ["bigger"], ["unknown", "not an op", "no such", "invalid", "expected"]),
    ("unknown-op-nested", {"or": [OK, {"and": [OK, {"field": "age", "op": "~", "value": 1}]}]},
     "$.or[1].and[1].op", ["~"], ["unknown", "not an op", "no such", "invalid", "expected"]),
    ("op-not-string", {"field": "age", "op": 5, "value": 1},
     "$.op", [], ["op"]),
    ("missing-op", {"field": "age", "value": 3},
     "$.op", [], ["op"]),
    # --- logic nodes
    ("empty-and", {"and": []},
     "$.and", [], ["empty", "at least one", "non-empty", "nonempty"]),
    ("empty-or", {"or": []},
     "$.or", [], ["empty", "at least one", "non-empty", "nonempty"]),
    ("empty-or-under-not", {"not": {"or": []}},
     "$.not.or", [], ["empty", "at least one", "non-empty", "nonempty"]),
    ("empty-and-nested", {"and": [OK, {"or": [OK, {"and": []}]}]},
     "$.and[1].or[1].and", [], ["empty", "at least one", "non-empty", "nonempty"]),
    ("and-not-a-list", {"and": {"all": True}},
     "$.and", [], ["list", "array"]),
    ("not-with-list", {"not": [OK]},
     "$.not", [], ["object", "single", "one rule", "a rule", "not a list", "list"]),
    ("not-with-number", {"not": 5},
     "$.not", [], ["object", "rule"]),
    ("no-recognisable-key", {"foo": 1},
     "$", [], ["and", "field", "or", "unknown", "recogni"]),
    ("no-recognisable-key-nested", {"or": [OK, {}]},
     "$.or[1]", [], ["and", "field", "or", "unknown", "recogni", "empty"]),
    ("two-logic-keys", {"and": [OK], "or": [OK]},
     "$", [], ["one", "both", "only", "exactly", "multiple", "more than", "ambiguous"]),
    ("two-logic-keys-nested", {"not": {"not": OK, "all": True}},
     "$.not", [], ["one", "both", "only", "exactly", "multiple", "more than", "ambiguous"]),
    ("rule-is-list", [OK],
     "$", [], ["object"]),
    ("rule-is-number", 42,
     "$", [], ["object"]),
    ("rule-is-bool", True,
     "$", [], ["object"]),
    ("rule-is-null", None,
     "$", [], ["object", "null", "none", "empty"]),
    ("json-text-not-object", "[1, 2]",
     "$", [], ["object"]),
    ("invalid-json", '{"and": [',
     "$", ["json"], []),
    ("invalid-json-garbage", "and(country=DE)",
     "$", ["json"], []),
    # --- between
    ("between-one-element", {"field": "age", "op": "between", "value": [1]},
     "$.value", [], ["two", "2", "[lo, hi]", "pair"]),
    ("between-three-elements", {"field": "age", "op": "between", "value": [1, 2, 3]},
     "$.value", [], ["two", "2", "[lo, hi]", "pair"]),
    ("between-scalar", {"field": "ltv", "op": "between", "value": 5},
     "$.value", [], ["two", "2", "[lo, hi]", "pair", "list"]),
    ("between-lo-gt-hi", {"field": "age", "op": "between", "value": [10, 1]},
     "$.value", [], ["lo", "greater", "order", "<=", "≤", "exceed", "before", "larger"]),
    ("between-lo-gt-hi-float", {"and": [OK, {"field": "ltv", "op": "between",
                                             "value": [0.3, 0.1]}]},
     "$.and[1].value", [], ["lo", "greater", "order", "<=", "≤", "exceed", "before", "larger"]),
    ("between-lo-gt-hi-dates", {"field": "birthday", "op": "between",
                                "value": ["2024-02-01", "2024-01-01"]},
     "$.value", [], ["lo", "greater", "order", "<=", "≤", "exceed", "before", "after", "larger"]),
    ("between-lo-gt-hi-days-ago", {"field": "created_at", "op": "between",
                                   "value": [{"days_ago": 1}, {"days_ago": 5}]},
     "$.value", [], ["lo", "greater", "order", "<=", "≤", "exceed", "before", "after", "larger"]),
    ("between-bad-element", {"field": "birthday", "op": "between",
                             "value": ["2024-01-01", "someday"]},
     "$.value[1]", [], ["date", "yyyy"]),
    # --- bad dates and timestamps
    ("bad-date", {"field": "birthday", "op": "eq", "value": "2024-13-45"},
     "$.value", [], ["date", "yyyy"]),
    ("bad-date-word", {"field": "birthday", "op": "gt", "value": "yesterday"},
     "$.value", [], ["date", "yyyy"]),
    ("bad-date-under-not", {"not": {"field": "birthday", "op": "lt", "value": "2024-02-30"}},
     "$.not.value", [], ["date", "yyyy"]),
    ("date-as-number", {"field": "birthday", "op": "eq", "value": 20240101},
     "$.value", [], ["date", "yyyy"]),
    ("bad-timestamp", {"field": "created_at", "op": "gt", "value": "not a time"},
     "$.value", [], ["timestamp", "iso", "date", "time"]),
    ("bad-date-in-list", {"field": "birthday", "op": "in", "value": ["2024-01-01", "nope"]},
     "$.value[1]", [], ["date", "yyyy"]),
    ("days_ago-not-int", {"field": "birthday", "op": "gt", "value": {"days_ago": "ten"}},
     "$.value", ["days_ago"], ["integer", "int", "number"]),
    ("relative-wrong-key", {"field": "created_at", "op": "gt", "value": {"weeks_ago": 2}},
     "$.value", [], ["days_ago", "date", "timestamp"]),
    ("relative-on-int", {"field": "age", "op": "gt", "value": {"days_ago": 3}},
     "$.value", [], ["number", "integer", "int"]),
    # --- value types
    ("keyword-eq-number", {"field": "country", "op": "eq", "value": 5},
     "$.value", [], ["string", "keyword", "text"]),
    ("keyword-eq-list", {"field": "country", "op": "eq", "value": ["DE"]},
     "$.value", [], ["string", "keyword", "text", "scalar", "single"]),
    ("keywords-eq-number", {"field": "tags", "op": "eq", "value": 1},
     "$.value", [], ["string", "keyword", "text"]),
    ("keyword-in-number-element", {"field": "country", "op": "in", "value": ["DE", 3]},
     "$.value[1]", [], ["string", "keyword", "text"]),
    ("in-non-list", {"field": "country", "op": "in", "value": "DE"},
     "$.value", [], ["list", "array"]),
    ("not_in-non-list", {"field": "age", "op": "not_in", "value": 3},
     "$.value", [], ["list", "array"]),
    ("in-empty-list", {"field": "country", "op": "in", "value": []},  # README's choice
     "$.value", [], ["empty", "non-empty", "at least one", "nonempty"]),
    ("has_all-empty-list", {"not": {"field": "tags", "op": "has_all", "value": []}},
     "$.not.value", [], ["empty", "non-empty", "at least one", "nonempty"]),
    ("has_all-non-list", {"or": [OK, {"and": [OK, {"not": {"field": "tags", "op": "has_all",
                                                           "value": "vip"}}]}]},
     "$.or[1].and[1].not.value", [], ["list", "array"]),
    ("bool-eq-number", {"field": "subscribed", "op": "eq", "value": 1},
     "$.value", [], ["bool", "true"]),
    ("bool-eq-string", {"field": "subscribed", "op": "ne", "value": "true"},
     "$.value", [], ["bool", "true"]),
    ("int-eq-bool", {"field": "age", "op": "eq", "value": True},
     "$.value", [], ["number", "integer", "int"]),
    ("int-gt-string", {"field": "age", "op": "gt", "value": "30"},
     "$.value", [], ["number", "integer", "int"]),
    ("float-eq-string", {"field": "ltv", "op": "eq", "value": "1.5"},
     "$.value", [], ["number", "float", "decimal"]),
    ("missing-value", {"field": "age", "op": "eq"},
     "$.value", [], ["value"]),
    # --- anniversary_in
    ("anniversary-empty-object", {"field": "birthday", "op": "anniversary_in", "value": {}},
     "$.value", ["next_days"], []),
    ("anniversary-no-value", {"field": "birthday", "op": "anniversary_in"},
     "$.value", [], ["next_days", "value"]),
    ("anniversary-number", {"field": "birthday", "op": "anniversary_in", "value": 7},
     "$.value", ["next_days"], []),
    ("anniversary-zero", {"field": "birthday", "op": "anniversary_in",
                          "value": {"next_days": 0}},
     "$.value", ["next_days"], [">= 1", ">=1", "at least 1", "positive", "≥ 1", "≥1",
                                "at least one", "> 0"]),
    ("anniversary-negative", {"and": [OK, {"field": "created_at", "op": "anniversary_in",
                                           "value": {"next_days": -3}}]},
     "$.and[1].value", ["next_days"], [">= 1", ">=1", "at least 1", "positive", "≥ 1", "≥1",
                                       "at least one", "> 0"]),
    ("anniversary-string-n", {"field": "birthday", "op": "anniversary_in",
                              "value": {"next_days": "7"}},
     "$.value", ["next_days"], ["integer", "int", "number"]),
]


def _show(rule: Any) -> str:
    return rule if isinstance(rule, str) else json.dumps(rule)


def check_rule_error(exc: RuleError, path: str, must: list[str], any_of: list[str]) -> None:
    text = str(exc).lower()
    assert exc.path == path, f"path {exc.path!r}, expected {path!r} (message: {exc})"
    for word in must:
        assert word.lower() in text, f"{word!r} not in message {str(exc)!r}"
    if any_of:
        assert any(w.lower() in text for w in any_of), (
            f"none of {any_of} in message {str(exc)!r}")


# ----------------------------------------------------------------------------- engine

@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    eng = Engine.open(tmp_path_factory.mktemp("rule_errors") / "store")
    eng.declare_schema({"profiles": SCHEMA})
    eng.upsert_profiles(PROFILES)
    yield eng
    eng.close()


@pytest.mark.parametrize("case_id, rule, path, must, any_of", CASES, ids=[c[0] for c in CASES])
def test_count_rejects(engine, case_id, rule, path, must, any_of):
    with pytest.raises(RuleError) as info:
        engine.count(rule, as_of=AS_OF)
    check_rule_error(info.value, path, must, any_of)


@pytest.mark.parametrize("case_id, rule, path, must, any_of", CASES, ids=[c[0] for c in CASES])
def test_members_and_is_member_reject(engine, case_id, rule, path, must, any_of):
    with pytest.raises(RuleError) as info:
        engine.members(rule, as_of=AS_OF)
    check_rule_error(info.value, path, must, any_of)
    with pytest.raises(RuleError) as info:
        engine.is_member("u1", rule, as_of=AS_OF)
    check_rule_error(info.value, path, must, any_of)


@pytest.mark.parametrize("case_id, rule, path, must, any_of",
                         [c for c in CASES if not isinstance(c[1], str)],
                         ids=[c[0] for c in CASES if not isinstance(c[1], str)])
def test_json_text_form_rejects_the_same(engine, case_id, rule, path, must, any_of):
    """The JSON text of a bad rule is rejected with the same path."""
    with pytest.raises(RuleError) as info:
        engine.count(json.dumps(rule), as_of=AS_OF)
    check_rule_error(info.value, path, must, any_of)


def test_unknown_segment_is_an_error(engine):
    """CONTRACT §2.3: an unknown segment name is an error (NOT_FOUND per §5), never empty."""
    with pytest.raises((NotFound, RuleError)) as info:
        engine.count({"or": [OK, {"segment": "no-such-segment"}]}, as_of=AS_OF)
    assert "no-such-segment" in str(info.value)


def test_errors_change_nothing(engine):
    before = sorted(engine.members({"all": True}, as_of=AS_OF))
    for _, rule, *_ in CASES:
        with pytest.raises(RuleError):
            engine.count(rule, as_of=AS_OF)
    assert sorted(engine.members({"all": True}, as_of=AS_OF)) == before
    assert engine.count(OK, as_of=AS_OF) == 1


def test_valid_neighbours_of_the_bad_rules_are_accepted(engine):
    """Guard against an over-eager validator: the near-misses of the table are fine."""
    good = [
        {"field": "country", "op": "in", "value": ["DE", "XX"]},
        {"field": "tags", "op": "has_all", "value": ["vip"]},
        {"field": "age", "op": "between", "value": [1, 1]},
        {"field": "ltv", "op": "between", "value": [0.1, 0.1]},
        {"field": "ltv", "op": "eq", "value": 2},
        {"field": "birthday", "op": "between", "value": ["2024-01-01", "2024-01-01"]},
        {"field": "birthday", "op": "gt", "value": {"days_ago": 10}},
        {"field": "created_at", "op": "gt", "value": "2024-01-01"},
        {"field": "created_at", "op": "lte", "value": "2024-01-01T10:00:00+02:00"},
        {"field": "created_at", "op": "anniversary_in", "value": {"next_days": 1}},
        {"field": "birthday", "op": "anniversary_in", "value": {"next_days": 1}},
        {"field": "subscribed", "op": "ne", "value": False},
        {"field": "age", "op": "exists"},
        {"field": "country", "op": "not_exists"},
        {"not": {"all": True}},
        {"or": [{"all": True}]},
    ]
    for rule in good:
        assert isinstance(engine.count(rule, as_of=AS_OF), int), rule
