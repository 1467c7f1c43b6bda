"""Samples (CONTRACT §2.4d) against a naive reference: plain Python over the raw rows,
hashing each id with hashlib.blake2b exactly as the contract writes the formula."""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bitseg.index.engine import Engine
from bitseg.index.errors import RuleError
from bitseg.index.explain import explain
from bitseg.index.rules import parse_rule
from bitseg.index.sample import Sample, bucket
from bitseg.index.schema import Schema
from bitseg.index.segments import open_segments

AS_OF = "2026-11-01T12:00:00Z"


def naive_bucket(salt: str, pid: str) -> int:
    digest = hashlib.blake2b((salt + "\x1f" + pid).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % 10000


@contextmanager
def engine() -> Iterator[Engine]:
    with tempfile.TemporaryDirectory() as tmp, Engine.open(tmp) as eng:
        yield eng


# ---------------------------------------------------------------------- the formula
# Computed once, by hand, with hashlib.blake2b outside bitseg; any implementation of the
# contract must give these.
FIXED = [
    ("spring", "u42", 2681),
    ("spring", "u1", 6984),
    ("", "0", 1550),
    ("control-2026", "customer:ü-7", 9148),
    ("a\x1fb", "c", 6830),
    ("x", "", 5500),
]


@pytest.mark.parametrize(("salt", "pid", "expected"), FIXED)
def test_bucket_of_fixed_ids(salt: str, pid: str, expected: int) -> None:
    assert bucket(salt, pid) == expected
    assert naive_bucket(salt, pid) == expected


def test_the_engine_puts_fixed_ids_in_those_buckets() -> None:
    with engine() as eng:
        eng.upsert_profiles([{"id": "u42"}, {"id": "u1"}])
        # u42 is bucket 2681 and u1 6984 under "spring": edges either side of each
        assert eng.members({"sample": {"salt": "spring", "from": 26.81, "to": 26.82}}) == ["u42"]
        assert eng.members({"sample": {"salt": "spring", "from": 26.8, "to": 26.81}}) == []
        assert eng.members({"sample": {"salt": "spring", "from": 26.82, "to": 69.84}}) == []
        assert eng.members({"sample": {"salt": "spring", "from": 26.81, "to": 69.85}}) \
            == ["u42", "u1"]
        assert eng.members({"sample": {"salt": "spring", "percent": 69.84}}) == ["u42"]


# ---------------------------------------------------------------------- validation
SCHEMA = Schema().declare({"profiles": {"age": "int"}})
INVALID = [
    ({"sample": []}, "$.sample"),
    ({"sample": {"percent": 10}}, "$.sample.salt"),
    ({"sample": {"salt": 7, "percent": 10}}, "$.sample.salt"),
    ({"sample": {"salt": None, "percent": 10}}, "$.sample.salt"),
    ({"sample": {"salt": "s"}}, "$.sample.from"),
    ({"sample": {"salt": "s", "from": 1}}, "$.sample.to"),
    ({"sample": {"salt": "s", "to": 1}}, "$.sample.from"),
    ({"sample": {"salt": "s", "percent": 10, "from": 0}}, "$.sample.from"),
    ({"sample": {"salt": "s", "percent": 10.005}}, "$.sample.percent"),
    ({"sample": {"salt": "s", "percent": 0.001}}, "$.sample.percent"),
    ({"sample": {"salt": "s", "percent": -1}}, "$.sample.percent"),
    ({"sample": {"salt": "s", "percent": 100.01}}, "$.sample.percent"),
    ({"sample": {"salt": "s", "percent": "10"}}, "$.sample.percent"),
    ({"sample": {"salt": "s", "percent": True}}, "$.sample.percent"),
    ({"sample": {"salt": "s", "from": 50, "to": 40}}, "$.sample"),
    ({"sample": {"salt": "s", "from": 0, "to": 101}}, "$.sample.to"),
    ({"sample": {"salt": "s", "percent": 5, "seed": 1}}, "$.sample.seed"),
    ({"sample": {"salt": "s", "percent": 5}, "why": 1}, "$.why"),
    ({"and": [{"all": True}, {"not": {"sample": {"salt": "s", "to": 5}}}]},
     "$.and[1].not.sample.from"),
    ({"event": "x", "where": {"sample": {"salt": "s", "percent": 5}}}, "$.where.sample"),
]


@pytest.mark.parametrize(("rule", "path"), INVALID)
def test_invalid_samples_are_refused_with_their_path(rule: Any, path: str) -> None:
    with pytest.raises(RuleError) as caught:
        parse_rule(rule, SCHEMA)
    assert caught.value.path == path


@pytest.mark.parametrize(("spec", "lo", "hi"), [
    ({"percent": 10.50}, 0, 1050),
    ({"percent": 0}, 0, 0),
    ({"percent": 100}, 0, 10000),
    ({"from": 0.07, "to": 99.99}, 7, 9999),
    ({"from": 55, "to": 55}, 5500, 5500),
])
def test_valid_samples_parse_to_bucket_ranges(spec: dict, lo: int, hi: int) -> None:
    assert parse_rule({"sample": {"salt": "s", **spec}}, SCHEMA) == Sample("s", lo, hi)


# ---------------------------------------------------------------------- the reference
class Naive:
    """Profiles as dicts; a rule checked profile by profile."""

    def __init__(self) -> None:
        self.profiles: dict[str, dict[str, Any]] = {}

    def holds(self, rule: dict, pid: str) -> bool:
        if "and" in rule:
            return all(self.holds(r, pid) for r in rule["and"])
        if "or" in rule:
            return any(self.holds(r, pid) for r in rule["or"])
        if "not" in rule:
            return not self.holds(rule["not"], pid)
        if "all" in rule:
            return True
        if "sample" in rule:
            spec = rule["sample"]
            lo, hi = (0, spec["percent"]) if "percent" in spec else (spec["from"], spec["to"])
            return round(lo * 100) <= naive_bucket(spec["salt"], pid) < round(hi * 100)
        age = self.profiles[pid].get("age")
        return age is not None and age >= rule["value"]

    def members(self, rule: dict) -> set[str]:
        return {pid for pid in self.profiles if self.holds(rule, pid)}


ids = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1,
              max_size=6)
percents = st.integers(0, 10000).map(lambda b: b / 100)
salts = st.sampled_from(["spring", "", "ü", "a\x1fb"])


def samples() -> st.SearchStrategy[dict]:
    ranged = st.tuples(percents, percents).map(sorted)
    return st.one_of(
        st.builds(lambda s, p: {"sample": {"salt": s, "percent": p}}, salts, percents),
        st.builds(lambda s, r: {"sample": {"salt": s, "from": r[0], "to": r[1]}}, salts, ranged),
    )


leaves = st.one_of(samples(), samples(), st.just({"all": True}),
                   st.builds(lambda v: {"field": "age", "op": "gte", "value": v},
                             st.integers(0, 100)))
rules = st.recursive(leaves, lambda kids: st.one_of(
    st.lists(kids, min_size=1, max_size=3).map(lambda k: {"and": k}),
    st.lists(kids, min_size=1, max_size=3).map(lambda k: {"or": k}),
    kids.map(lambda k: {"not": k})), max_leaves=6)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(profiles=st.dictionaries(ids, st.one_of(st.none(), st.integers(0, 100)), max_size=30),
       event_only=st.lists(ids, max_size=5), deleted=st.lists(ids, max_size=5),
       later=st.lists(ids, max_size=10), asked=st.lists(rules, min_size=1, max_size=3))
def test_samples_match_the_reference(profiles: dict, event_only: list, deleted: list,
                                     later: list, asked: list) -> None:
    naive = Naive()
    with engine() as eng:
        eng.declare_schema({"profiles": {"age": "int"}})
        eng.upsert_profiles([{"id": p, "age": a} for p, a in profiles.items()])
        for p, a in profiles.items():
            naive.profiles[p] = {"age": a}
        eng.track_events([{"profile": p, "event": "x", "ts": AS_OF} for p in event_only])
        for p in event_only:
            naive.profiles.setdefault(p, {})
        gone = [p for p in dict.fromkeys(deleted) if p in naive.profiles]
        eng.delete_profiles(gone)
        for p in gone:
            del naive.profiles[p]
        for step in range(2):  # the cached columns and bitmaps, then after new ids
            for rule in asked:
                expected = naive.members(rule)
                assert set(eng.members(rule, as_of=AS_OF)) == expected
                assert eng.count(rule, as_of=AS_OF) == len(expected)
                for pid in list(naive.profiles)[:5]:
                    assert eng.is_member(pid, rule, as_of=AS_OF) == (pid in expected)
            if step == 0:
                eng.upsert_profiles([{"id": p} for p in later])
                for p in later:
                    naive.profiles.setdefault(p, {})


def test_groups_from_cumulative_ranges_partition_the_base() -> None:
    with engine() as eng:
        eng.upsert_profiles([{"id": f"c{i}", "age": i % 70} for i in range(3000)])
        base = {"field": "age", "op": "gte", "value": 18}
        groups = [set(eng.members({"and": [base, {"sample": {"salt": "spring", "from": lo,
                                                              "to": hi}}]}))
                  for lo, hi in ((0, 10), (10, 55), (55, 100))]
        assert set.union(*groups) == set(eng.members(base))
        assert sum(len(g) for g in groups) == eng.count(base)
        assert 200 < len(groups[0]) < 340  # about 10 % of 2,700


def test_sample_in_segments_and_explain() -> None:
    with engine() as eng:
        segments = open_segments(eng)
        eng.upsert_profiles([{"id": f"p{i}"} for i in range(500)])
        rule = {"sample": {"salt": "spring", "percent": 20}}
        expected = {f"p{i}" for i in range(500) if naive_bucket("spring", f"p{i}") < 2000}
        segments.create("dyn", "dynamic", rule=rule)
        segments.create("mat", "materialized", rule=rule)
        for name in ("dyn", "mat"):
            assert set(eng.members({"segment": name})) == expected
        eng.upsert_profiles([{"id": "late"}])  # a new id joins the dynamic segment only
        late = naive_bucket("spring", "late") < 2000
        assert ("late" in eng.members({"segment": "dyn"})) == late
        assert "late" not in eng.members({"segment": "mat"})
        typed = eng.parse({"not": rule})
        told = explain(eng.snapshot, {"not": rule}, typed, 0)
        assert told.sentence == ("Profiles who are outside the first 20 % of the sample "
                                 "with salt 'spring'")
        assert told.root.children[0].count == len(expected) + late
        assert told.root.count == 501 - len(expected) - late
