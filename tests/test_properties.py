"""Property tests: the engine agrees with the naive reference (tests/reference.py).

Random schema over all seven types, several upsert batches (repeated ids, nulls, integer
ids), occasional deletes, then random valid rules at random as_of instants.
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import strategies as S
from bitseg.index.errors import NotFound
from reference import Reference

engine_mod = pytest.importorskip("bitseg.index.engine")
Engine = engine_mod.Engine

PROPERTY = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                           HealthCheck.data_too_large],
)
FEWER = settings(PROPERTY, max_examples=60)


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
                as_of = data.draw(S.as_ofs(), label="as_of")
                check_rule(engine, ref, rule, as_of, data)
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
                as_of = data.draw(S.as_ofs(), label="as_of")
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
            for (rule, as_of), old in zip(checks, before):
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
                as_of = data.draw(S.as_ofs(), label="as_of")
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
