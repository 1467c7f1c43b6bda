"""Cached parses and results are never stale and never mix up as_of."""

from __future__ import annotations

import pytest
from pyroaring import BitMap

from bitseg.index.cache import depends_on_time
from bitseg.index.engine import Engine
from bitseg.index.errors import RuleError
from bitseg.index.rules import parse_rule

DE = {"field": "country", "op": "eq", "value": "DE"}
OLDER = {"field": "seen", "op": "lt", "value": {"days_ago": 2}}


@pytest.fixture
def engine(tmp_path):
    with Engine.open(tmp_path / "s") as engine:
        engine.upsert_profiles([{"id": "a", "country": "DE", "seen": "2026-01-05T00:00:00Z"},
                                {"id": "b", "country": "FR", "seen": "2026-01-15T00:00:00Z"}])
        yield engine


def test_a_write_is_seen_by_the_next_count(engine):
    assert engine.count(DE) == 1 and engine.members(DE) == ["a"]
    engine.upsert_profiles([{"id": "b", "country": "DE"}])
    assert engine.count(DE) == 2 and engine.members(DE) == ["a", "b"]
    engine.delete_profiles(["a"])
    assert engine.count(DE) == 1 and engine.members(DE) == ["b"]


def test_as_of_is_part_of_the_key_only_when_it_matters(engine):
    early, late = "2026-01-10T00:00:00Z", "2026-01-20T00:00:00Z"
    assert engine.members(OLDER, as_of=early) == ["a"]
    assert engine.members(OLDER, as_of=late) == ["a", "b"]
    assert engine.count(OLDER, as_of=early) == 1
    assert engine.count(OLDER, as_of=late) == 2
    assert engine.count(DE, as_of=early) == engine.count(DE, as_of=late) == 1
    snap = engine.snapshot
    assert depends_on_time(parse_rule(OLDER, snap.schema), snap)
    assert not depends_on_time(parse_rule(DE, snap.schema), snap)
    event = {"event": "x", "window": {"last_days": 3}}
    assert depends_on_time(parse_rule(event, snap.schema), snap)


def test_a_changed_segment_is_seen(engine):
    class Lookup:
        def __init__(self, found):
            self.found = found

        def resolve(self, name):
            return self.found

    rule = {"segment": "s"}
    engine.set_segments(Lookup(BitMap([0])))
    assert engine.members(rule) == ["a"]
    engine.set_segments(Lookup(parse_rule(OLDER, engine.schema)))  # now dynamic and timed
    assert engine.members(rule, as_of="2026-01-20T00:00:00Z") == ["a", "b"]
    assert engine.members(rule, as_of="2026-01-10T00:00:00Z") == ["a"]


def test_a_rule_parsed_against_an_old_schema_is_parsed_again(engine):
    rule = {"field": "plan", "op": "eq", "value": "gold"}
    with pytest.raises(RuleError):
        engine.count(rule)
    engine.declare_schema({"profiles": {"plan": "keyword"}})
    assert engine.count(rule) == 0
    engine.upsert_profiles([{"id": "c", "plan": "gold"}])
    assert engine.count(rule) == 1
    assert engine.count('{"field": "plan", "op": "eq", "value": "gold"}') == 1  # as text
