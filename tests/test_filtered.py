"""AND evaluates range leaves only within their cheaper siblings: check every op there.

The general property tests rarely draw an AND that mixes keyword leaves with range
leaves of every op and negated range leaves; this one always does.
"""

from __future__ import annotations

from datetime import datetime, timezone

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bitseg.index.engine import Engine
from tests.reference import Reference

SCHEMA = {"k": "keyword", "n": "int", "x": "float", "d": "date"}
AS_OF = datetime(2026, 6, 1, tzinfo=timezone.utc)

profiles = st.lists(st.fixed_dictionaries({
    "k": st.sampled_from(["a", "b", None]),
    "n": st.one_of(st.none(), st.integers(-3, 12)),
    "x": st.one_of(st.none(), st.integers(-300, 300).map(lambda c: c / 100)),
    "d": st.one_of(st.none(), st.dates(datetime(2026, 1, 1).date(),
                                       datetime(2026, 12, 31).date()).map(str)),
}), min_size=1, max_size=60)


def range_leaf(field: str) -> st.SearchStrategy[dict]:
    value = {"n": st.integers(-4, 13), "x": st.integers(-310, 310).map(lambda c: c / 100),
             "d": st.one_of(st.dates(datetime(2026, 1, 1).date(),
                                     datetime(2026, 12, 31).date()).map(str),
                            st.integers(-200, 200).map(lambda n: {"days_ago": n}))}[field]
    plain = {"n": st.integers(-4, 13), "x": st.integers(-310, 310).map(lambda c: c / 100),
             "d": st.dates(datetime(2026, 1, 1).date(),
                           datetime(2026, 12, 31).date()).map(str)}[field]
    return st.one_of(
        st.tuples(st.sampled_from(["eq", "ne", "gt", "gte", "lt", "lte"]), value).map(
            lambda t: {"field": field, "op": t[0], "value": t[1]}),
        st.tuples(st.sampled_from(["in", "not_in"]), st.lists(value, min_size=1, max_size=3))
        .map(lambda t: {"field": field, "op": t[0], "value": t[1]}),
        st.tuples(plain, plain).map(lambda t: {"field": field, "op": "between",
                                               "value": sorted(t)}),
    )


rules = st.builds(
    lambda cheap, ranges, negated: {"and": [cheap, *ranges, *({"not": r} for r in negated)]},
    st.sampled_from([{"field": "k", "op": "eq", "value": "a"},
                     {"field": "k", "op": "ne", "value": "b"},
                     {"field": "k", "op": "exists"}]),
    st.lists(st.sampled_from("nxd").flatmap(range_leaf), min_size=1, max_size=3),
    st.lists(st.sampled_from("nxd").flatmap(range_leaf), max_size=2),
)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=profiles, rule_list=st.lists(rules, min_size=1, max_size=5))
def test_filtered_and_matches_the_reference(tmp_path_factory, data, rule_list):
    records = [{"id": f"p{i}", **p} for i, p in enumerate(data)]
    ref = Reference(SCHEMA)
    ref.upsert(records)
    with Engine.open(tmp_path_factory.mktemp("f") / "s") as engine:
        engine.declare_schema({"profiles": SCHEMA})
        engine.upsert_profiles(records)
        for rule in rule_list:
            expected = ref.members(rule, AS_OF)
            assert set(engine.members(rule, as_of=AS_OF)) == expected, rule
            assert engine.count(rule, as_of=AS_OF) == len(expected), rule
