"""Describe, Values, Explain's notes and the batch calls, against plain Python over the
loaded rows; and end to end through a real server and the CLI."""

from __future__ import annotations

import math
import random
from collections import Counter
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest
from conftest_grpc import ServerProcess, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from random_profiles import SCHEMA, nearest_rank, random_profiles

from bitseg import Client
from bitseg.errors import InvalidArgumentError
from bitseg.index import batch, describe
from bitseg.index.engine import Engine, as_of_micros
from bitseg.index.errors import BitsegError
from bitseg.index.explain import explain
from bitseg.index.fields import RangeIndex, bitmap_of

AS_OF = "2025-06-01T00:00:00Z"
Q = {"p25": 0.25, "p50": 0.5, "p75": 0.75, "p90": 0.9, "p99": 0.99}



def make_data(seed: int, n: int = 60):
    rng = random.Random(seed)
    profiles = random_profiles(rng, n, ltv_decimals=3)
    events = [{"profile": f"u{rng.randrange(n)}", "event": rng.choice(["open", "click"]),
               "ts": f"2025-0{rng.randint(1, 5)}-1{rng.randint(0, 9)}T10:00:00Z",
               "popup": rng.choice(["spring", "summer", "winter"]), "n": rng.randint(1, 5)}
              for _ in range(rng.randint(0, 150))]
    return profiles, events


def open_engine(path: Path, profiles: list, events: list) -> Engine:
    engine = Engine.open(path)
    engine.declare_schema(SCHEMA)
    engine.upsert_profiles(profiles)
    if events:
        engine.track_events(events)
    return engine


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10**6), deleted=st.integers(0, 10))
def test_describe_matches_the_rows(tmp_path_factory, seed, deleted):
    profiles, events = make_data(seed)
    engine = open_engine(tmp_path_factory.mktemp("d"), profiles, events)
    try:
        gone = {f"u{i}" for i in range(deleted)}
        if gone:
            engine.delete_profiles(sorted(gone))
        rows = [p for p in profiles if p["id"] not in gone]
        found = describe.describe(engine.snapshot, top=2)
        assert found.profiles == len(rows)
        by_name = {f.name: f for f in found.fields}
        for name, info in by_name.items():
            present = [p[name] for p in rows if name in p]
            assert info.count == len(present), name
            if info.type in ("keyword", "keywords", "bool"):
                counted = Counter(v for x in present for v in (x if isinstance(x, list) else [x]))
                ranked = sorted(counted.items(), key=lambda vn: (-vn[1], str(vn[0])))
                assert info.distinct == len(counted)
                assert list(info.top) == ranked[:2], name
            elif present:
                raw = [Decimal(repr(x)) if name == "ltv" else x for x in present]
                shown = (lambda v: v) if name != "ltv" else Decimal
                assert shown(info.min) == min(raw) and shown(info.max) == max(raw)
                for label, value in info.quantiles:
                    assert shown(value) == nearest_rank(raw, Q[label]), (name, label)
        live_events = [e for e in events if e["profile"] not in gone]
        assert [e.name for e in found.events] == sorted({e["event"] for e in events})
        for info in found.events:
            mine = [e for e in live_events if e["event"] == info.name]
            assert info.count == len(mine)
            assert info.profiles == len({e["profile"] for e in mine})
            props = {p.name: p for p in info.properties}
            assert set(props) == {"popup", "n"}
            assert props["n"].type == "int" and props["popup"].type == "keyword"
            counted = Counter(e["popup"] for e in mine)
            assert props["popup"].count == len(mine)
            assert props["popup"].distinct == len(counted)
            assert list(props["popup"].top) == sorted(counted.items(),
                                                      key=lambda vn: (-vn[1], vn[0]))[:2]
    finally:
        engine.close()


def test_quantiles_equal_numpy_inverted_cdf():
    rng = np.random.default_rng(7)
    keys = rng.integers(-1000, 10**6, 5000)
    index = _range_index(keys)
    ordered = np.sort(keys)
    for k in (1, 2, 17, 2500, 4999, 5000):
        assert describe.kth_smallest(index, k) == ordered[k - 1]
    for q in Q.values():
        rank = max(1, math.ceil(q * len(keys)))
        assert describe.kth_smallest(index, rank) == np.quantile(keys, q, method="inverted_cdf")


def _range_index(keys: np.ndarray) -> RangeIndex:
    base = int(keys.min())
    stored = keys - base
    ids = np.arange(len(keys))
    slices = tuple(bitmap_of(ids[(stored >> i) & 1 == 1])
                   for i in range(int(stored.max()).bit_length()))
    return RangeIndex(base, 1, slices, bitmap_of(ids))


def test_values_ties_by_value_and_limit(tmp_path):
    profiles = [{"id": f"u{i}", "country": c} for i, c in enumerate("BBAACCD")]
    engine = open_engine(tmp_path, profiles, [])
    try:
        info = describe.values(engine.snapshot, "country", 3)
        assert info.top == (("A", 2), ("B", 2), ("C", 2))  # ties in text order
        assert info.distinct == 4 and info.count == 7
        with pytest.raises(BitsegError, match="'age' is a int field"):
            describe.values(engine.snapshot, "age")
        with pytest.raises(BitsegError, match="field 'nope' not found"):
            describe.values(engine.snapshot, "nope")
    finally:
        engine.close()


def test_explain_notes_name_missing_values(tmp_path):
    profiles, events = make_data(3)
    engine = open_engine(tmp_path, profiles, events)
    try:
        rule = {"and": [{"field": "country", "op": "in", "value": ["DE", "Deu"]},
                        {"event": "opne"},
                        {"event": "open", "where": {"field": "popup", "op": "eq",
                                                    "value": "sprng"}},
                        {"field": "tags", "op": "eq", "value": "vip"}]}
        found = explain(engine.snapshot, rule, engine.parse(rule), as_of_micros(AS_OF))
        notes = [c.note for c in found.root.children]
        assert notes[0] == "no profile has country 'Deu'; did you mean 'DE'?"
        assert notes[1] == "no profile has an event of type 'opne'; did you mean 'open'?"
        assert notes[2] == "no 'open' event has popup 'sprng'; did you mean 'spring'?"
        assert notes[3] == "" and found.root.note == ""
        assert "    note: no profile has an event of type 'opne'" in found.text
    finally:
        engine.close()


def test_levenshtein_and_closest():
    assert describe.levenshtein("kitten", "sitting") == 3
    assert describe.levenshtein("", "abc") == 3
    assert describe.closest("germany", {"DE": 5, "FR": 9, "GERMAN": 1}) == ["GERMAN"]
    assert describe.closest("xyz", {"ab": 1}) == []  # nothing in common: no suggestion


@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10**6), size=st.sampled_from([3, 40, 200]))
def test_batch_is_member_equals_one_by_one(tmp_path_factory, seed, size):
    profiles, events = make_data(seed)
    engine = open_engine(tmp_path_factory.mktemp("b"), profiles, events)
    try:
        rng = random.Random(seed)
        ids = [f"u{rng.randrange(80)}" for _ in range(size)] + ["", "ghost"]
        rule = {"or": [{"field": "country", "op": "eq", "value": "DE"},
                       {"event": "open", "window": {"last_days": 200}}]}
        found = batch.is_member_many(engine, ids, rule, as_of=AS_OF)
        known = {p["id"] for p in profiles}
        expect = [i in known and engine.is_member(i, rule, as_of=AS_OF) for i in ids]
        assert found.member == expect
        assert found.unknown == [i for i in ids if i not in known]
    finally:
        engine.close()


def test_batch_ids_deleted_long_and_repeated(tmp_path):
    """The batch's lookup (in key order, not request order) and live test (vectorised):
    answers and unknown ids stay in request order; a deleted profile, an id longer than
    any key and an empty id are unknown; repeated ids answer each time."""
    engine = open_engine(tmp_path, [{"id": f"u{i}", "country": "DE" if i % 3 else "FR"}
                                    for i in range(100)], [])
    try:
        engine.delete_profiles(["u4", "u9"])
        ids = [f"u{i}" for i in range(99, -1, -1)] + ["u4", "x" * 600, "", "u3", "u3", "u9"]
        found = batch.is_member_many(engine, ids, {"field": "country", "op": "eq",
                                                   "value": "DE"})
        gone = {"u4", "u9", "x" * 600, ""}
        assert found.member == [i not in gone and int(i[1:]) % 3 != 0 for i in ids]
        assert found.unknown == [i for i in ids if i in gone]
        assert batch.dense_ids(engine, engine.snapshot, ["u9", "u1", "nope"]) == \
            [None, engine.ids.lookup("u1"), None]
    finally:
        engine.close()


def test_batch_limit(tmp_path):
    engine = open_engine(tmp_path, [{"id": "u1"}], [])
    try:
        with pytest.raises(BitsegError, match="at most 10,000 ids per call, got 10,001"):
            batch.is_member_many(engine, ["u1"] * 10_001, {"all": True})
        assert batch.is_member_many(engine, ["u1"] * 10_000, {"all": True}).member[-1]
    finally:
        engine.close()


def test_end_to_end(tmp_path):
    profiles, events = make_data(11, n=120)
    server = ServerProcess(tmp_path / "db")
    try:
        with Client(server.addr, timeout=20) as client:
            client.upsert_profiles(profiles)
            client.track_events(events)
            client.create_segment("de", "dynamic",
                                  rule={"field": "country", "op": "eq", "value": "DE"})
            client.create_segment("vip", "static", profile_ids=["u1", "u2", "u3"])
            found = client.describe(top=3)
            assert found.profiles == 120
            age = next(f for f in found.fields if f.name == "age")
            ages = [p["age"] for p in profiles if "age" in p]
            assert (age.min, age.max) == (str(min(ages)), str(max(ages)))
            assert age.quantiles["p50"] == str(nearest_rank(ages, 0.5))
            countries = Counter(p["country"] for p in profiles if "country" in p)
            top = client.values("country", limit=2)
            assert top.top == sorted(countries.items(), key=lambda vn: (-vn[1], vn[0]))[:2]
            ids = [f"u{i}" for i in range(0, 130, 2)] + ["nobody"]
            many = client.is_member_many(ids, segment="de", as_of=AS_OF)
            assert many.unknown == [i for i in ids if i in ("nobody",) or int(i[1:]) >= 120]
            for i in ids[:10]:
                alone = i not in many.unknown and client.is_member(i, segment="de")
                assert many.member[i] == alone
            segs = client.segments_of_many(["u1", "u2", "zz"])
            assert segs.unknown == ["zz"] and segs.segments["zz"] == []
            for i in ("u1", "u2"):
                assert sorted(segs.segments[i]) == sorted(client.segments_of(i))
            with pytest.raises(InvalidArgumentError, match="at most 10,000"):
                client.is_member_many(["u1"] * 10_001, rule={"all": True})
            note = client.explain({"field": "country", "op": "eq", "value": "DEU"}).root.note
            assert note == "no profile has country 'DEU'; did you mean 'DE'?"
        out = run_cli("describe", "--addr", server.addr)
        assert out.returncode == 0, out.stderr
        assert f"age (int): {len(ages)}; min {min(ages)} " in out.stdout
        out = run_cli("values", "country", "--limit", "1", "--addr", server.addr)
        best, n = sorted(countries.items(), key=lambda vn: (-vn[1], vn[0]))[0]
        assert out.stdout.split() == [best, str(n)]
        out = run_cli("explain", "--addr", server.addr, "--rule",
                      '{"field": "country", "op": "eq", "value": "DEU"}')
        assert "  note: no profile has country 'DEU'; did you mean 'DE'?" in out.stdout
    finally:
        server.stop()
