"""Segments at the engine level (index/segments.py, index/explain.py, index/export.py),
every answer compared with plain Python over the same profiles."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bitseg.index import segments as segments_module
from bitseg.index import types as T
from bitseg.index.engine import Engine
from bitseg.index.errors import AlreadyExists, BitsegError, NotFound, RuleError
from bitseg.index.explain import Node, explain
from bitseg.index.export import check_fields, profile_rows
from bitseg.index.segments import (
    RefreshScheduler,
    SegmentInUse,
    Segments,
    open_segments,
)

UTC = timezone.utc
T0 = datetime(2026, 3, 1, tzinfo=UTC)
SCHEMA = {"profiles": {"n": "int", "c": "keyword", "tags": "keywords"}}
N = 60


def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def make_profiles(n: int = N, seed: int = 1) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [{"id": f"p{i}", "n": rng.randint(0, 99), "c": rng.choice("ABC"),
             "tags": rng.sample(["x", "y", "z"], rng.randint(1, 2))} for i in range(n)]


@pytest.fixture()
def engine(tmp_path: Path) -> Iterator[Engine]:
    with Engine.open(tmp_path / "db") as eng:
        eng.declare_schema(SCHEMA)
        eng.upsert_profiles(make_profiles())
        yield eng


@pytest.fixture()
def segs(engine: Engine) -> Segments:
    return open_segments(engine)


def ids_where(engine: Engine, rule: Any, as_of: Any = None) -> set[str]:
    return set(engine.members(rule, as_of=as_of))


def changes_at(engine: Engine, name: str, event: str, at: datetime) -> set[str]:
    """The profiles with a `event` of segment `name` at exactly `at`."""
    rule = {"event": event, "where": {"field": "segment", "op": "eq", "value": name},
            "window": {"from": iso(at), "to": iso(at + timedelta(microseconds=1))}}
    return ids_where(engine, rule, as_of=at + timedelta(days=1))


def entered_count(name: str, op: str, n: int, days: int = 30) -> dict[str, Any]:
    return {"event": "segment_entered", "where": {"field": "segment", "op": "eq", "value": name},
            "window": {"last_days": days}, "having": {"agg": "count", "op": op, "value": n}}


# ---------------------------------------------------------------------- static
def test_static_from_ids_reports_unknown_and_creates_nobody(engine: Engine,
                                                            segs: Segments) -> None:
    total = engine.total()
    info, change = segs.create("vip", "static", ids=["p1", "p2", "ghost", "p2"], as_of=T0)
    assert (info.kind, info.size, change.entered) == ("static", 2, 2)
    assert change.unknown == ("ghost",)
    assert engine.total() == total  # an unknown id is not a new profile
    assert ids_where(engine, {"segment": "vip"}) == {"p1", "p2"}
    assert changes_at(engine, "vip", "segment_entered", T0) == {"p1", "p2"}


def test_static_empty_then_add_and_remove(engine: Engine, segs: Segments) -> None:
    info, _ = segs.create("s", "static")
    assert info.size == 0 and engine.count({"segment": "s"}) == 0
    added = segs.add("s", ["p3", "p4", "nobody", "p3"])
    assert (added.entered, added.size, added.unknown) == (2, 2, ("nobody",))
    again = segs.add("s", ["p3"])  # already in: no change, no event
    assert (again.entered, again.size) == (0, 2)
    removed = segs.remove("s", ["p3", "p9", "nobody"])  # p9 is not a member: no change
    assert (removed.exited, removed.size, removed.unknown) == (1, 1, ("nobody",))
    assert ids_where(engine, {"segment": "s"}) == {"p4"}
    assert [p.cause for p in segs.history("s")] == ["create", "add", "remove"]
    assert [p.size for p in segs.history("s")] == [0, 2, 1]
    exited = {"event": "segment_exited", "where": {"field": "segment", "op": "eq", "value": "s"}}
    assert ids_where(engine, exited) == {"p3"}


def test_static_from_a_rule_is_never_recounted(engine: Engine, segs: Segments) -> None:
    rule = {"field": "n", "op": "lt", "value": 50}
    want = ids_where(engine, rule)
    info, change = segs.create("low", "static", rule=rule, ids=["p0"])
    assert ids_where(engine, {"segment": "low"}) == want | {"p0"}
    assert info.rule == rule and change.entered == len(want | {"p0"})
    flipped = [{"id": f"p{i}", "n": 99 - 0} for i in range(N)]
    engine.upsert_profiles(flipped)  # now nobody has n < 50
    assert engine.count(rule) == 0
    assert ids_where(engine, {"segment": "low"}) == want | {"p0"}


def test_deleted_profiles_leave_static_segments(engine: Engine, segs: Segments) -> None:
    segs.create("s", "static", ids=["p1", "p2"])
    engine.delete_profiles(["p1"])
    assert ids_where(engine, {"segment": "s"}) == {"p2"}
    assert segs.get("s").size == 1
    assert segs.add("s", ["p1"]).unknown == ("p1",)


# ---------------------------------------------------------------------- dynamic
def test_dynamic_is_evaluated_at_call_time(engine: Engine, segs: Segments) -> None:
    rule = {"field": "c", "op": "eq", "value": "A"}
    segs.create("a", "dynamic", rule=rule)
    assert ids_where(engine, {"segment": "a"}) == ids_where(engine, rule)
    engine.upsert_profiles([{"id": "p0", "c": "A"}, {"id": "new", "c": "A"}])
    assert ids_where(engine, {"segment": "a"}) == ids_where(engine, rule)
    assert {"p0", "new"} <= ids_where(engine, {"segment": "a"})
    assert segs.get("a").size == engine.count(rule)


def test_dynamic_refers_to_other_segments(engine: Engine, segs: Segments) -> None:
    segs.create("s", "static", ids=["p0", "p1", "p2"])
    segs.create("a", "dynamic", rule={"field": "c", "op": "eq", "value": "A"})
    segs.create("both", "dynamic", rule={"and": [{"segment": "a"}, {"not": {"segment": "s"}}]})
    want = ids_where(engine, {"field": "c", "op": "eq", "value": "A"}) - {"p0", "p1", "p2"}
    assert ids_where(engine, {"segment": "both"}) == want


def test_cycles_are_refused_at_create_and_update(engine: Engine, segs: Segments) -> None:
    with pytest.raises(RuleError) as info:
        segs.create("me", "dynamic", rule={"or": [{"all": True}, {"segment": "me"}]})
    assert info.value.path == "$.or[1].segment" and "cycle" in str(info.value)
    segs.create("a", "dynamic", rule={"all": True})
    segs.create("b", "dynamic", rule={"not": {"segment": "a"}})
    with pytest.raises(RuleError) as info:
        segs.update("a", rule={"and": [{"all": True}, {"segment": "b"}]})
    assert info.value.path == "$.and[1].segment" and "a -> b -> a" in str(info.value)
    segs.create("m", "materialized", rule={"segment": "b"})
    with pytest.raises(RuleError):  # through a materialized segment's rule as well
        segs.update("a", rule={"segment": "m"})
    assert segs.get("a").rule == {"all": True}  # nothing changed
    with pytest.raises(NotFound):
        segs.create("c", "dynamic", rule={"segment": "nope"})
    with pytest.raises(RuleError) as info:
        segs.create("d", "dynamic", rule={"field": "c", "op": "gt", "value": "A"})
    assert info.value.path == "$.op"


def test_segments_named_inside_top_are_dependencies(engine: Engine, segs: Segments) -> None:
    """A top's `of` is walked like any child: a cycle through it is refused, and a segment
    it names cannot be deleted while used."""
    top_of = {"top": {"n": 5, "by": "n", "of": {"segment": "t"}}}
    with pytest.raises(RuleError) as info:
        segs.create("t", "dynamic", rule=top_of)
    assert info.value.path == "$.top.of.segment" and "cycle" in str(info.value)
    segs.create("base", "dynamic", rule={"field": "c", "op": "eq", "value": "A"})
    segs.create("best", "dynamic", rule={"top": {"n": 5, "by": "n", "of": {"segment": "base"}}})
    with pytest.raises(SegmentInUse):
        segs.delete("base")
    with pytest.raises(RuleError):
        segs.update("base", rule={"not": {"segment": "best"}})
    assert len(ids_where(engine, {"segment": "best"})) == 5


def test_a_used_segment_cannot_be_deleted(engine: Engine, segs: Segments) -> None:
    segs.create("base", "static", ids=["p1"])
    segs.create("user", "dynamic", rule={"segment": "base"})
    with pytest.raises(SegmentInUse):
        segs.delete("base")
    segs.delete("user")
    segs.delete("base")
    assert segs.list() == []
    with pytest.raises(NotFound):
        engine.count({"segment": "base"})


def test_names_kinds_and_errors(engine: Engine, segs: Segments) -> None:
    for bad in ("", "a b", "x/y", "é", "n" * 129):
        with pytest.raises(BitsegError):
            segs.create(bad, "static")
    segs.create("Ok_name-1.2:3", "static")
    segs.create("n" * 128, "static")
    with pytest.raises(AlreadyExists):
        segs.create("Ok_name-1.2:3", "dynamic", rule={"all": True})
    with pytest.raises(BitsegError):
        segs.create("d", "dynamic")  # no rule
    with pytest.raises(BitsegError):
        segs.create("d", "dynamic", rule={"all": True}, ids=["p1"])
    with pytest.raises(BitsegError):
        segs.create("d", "dynamic", rule={"all": True}, refresh_every=5)
    with pytest.raises(BitsegError):
        segs.create("d", "materialized", rule={"all": True}, refresh_every=0)
    with pytest.raises(BitsegError):
        segs.create("d", "nonsense")
    segs.create("d", "dynamic", rule={"all": True})
    for call in (lambda: segs.add("d", ["p1"]), lambda: segs.refresh("d"),
                 lambda: segs.update("Ok_name-1.2:3", rule={"all": True})):
        with pytest.raises(BitsegError):
            call()
    for call in (lambda: segs.get("zz"), lambda: segs.delete("zz"), lambda: segs.add("zz", []),
                 lambda: segs.refresh("zz"), lambda: segs.history("zz"),
                 lambda: segs.overlap(["d", "zz"])):
        with pytest.raises(NotFound):
            call()


# ---------------------------------------------------------------------- materialized
def test_refresh_records_entries_exits_and_history(engine: Engine, segs: Segments) -> None:
    rule = {"field": "n", "op": "gte", "value": 50}
    first = ids_where(engine, rule)
    _, change = segs.create("hi", "materialized", rule=rule, as_of=T0)
    assert change.entered == len(first) and changes_at(engine, "hi", "segment_entered",
                                                       T0) == first
    rng = random.Random(5)
    engine.upsert_profiles([{"id": f"p{i}", "n": rng.randint(0, 99)} for i in range(0, N, 2)]
                           + [{"id": "late", "n": 77}])
    assert ids_where(engine, {"segment": "hi"}) == first  # stored, not recounted
    second = ids_where(engine, rule)
    t1 = T0 + timedelta(days=1)
    change = segs.refresh("hi", as_of=t1)
    assert ids_where(engine, {"segment": "hi"}) == second
    assert changes_at(engine, "hi", "segment_entered", t1) == second - first
    assert changes_at(engine, "hi", "segment_exited", t1) == first - second
    assert (change.size, change.entered, change.exited) == (
        len(second), len(second - first), len(first - second))
    same = segs.refresh("hi", as_of=t1 + timedelta(hours=1))
    assert (same.entered, same.exited) == (0, 0)
    history = segs.history("hi")
    assert [(p.at, p.size, p.cause) for p in history] == [
        (T.parse_timestamp(iso(T0)), len(first), "create"),
        (T.parse_timestamp(iso(t1)), len(second), "refresh"),
        (T.parse_timestamp(iso(t1 + timedelta(hours=1))), len(second), "refresh")]


def test_update_rule_recounts_a_materialized_segment(engine: Engine, segs: Segments) -> None:
    segs.create("m", "materialized", rule={"field": "c", "op": "eq", "value": "A"}, as_of=T0)
    rule = {"field": "c", "op": "eq", "value": "B"}
    info, change = segs.update("m", rule=rule, refresh_every=60, as_of=T0 + timedelta(hours=1))
    assert info.rule == rule and info.refresh_every == 60
    assert ids_where(engine, {"segment": "m"}) == ids_where(engine, rule)
    assert change.entered == engine.count(rule)
    assert [p.cause for p in segs.history("m")] == ["create", "update"]
    info, _ = segs.update("m", clear_refresh_every=True)
    assert info.refresh_every is None


def test_exits_of_deleted_profiles_create_no_profile(engine: Engine, segs: Segments) -> None:
    segs.create("m", "materialized", rule={"field": "n", "op": "gte", "value": 0}, as_of=T0)
    engine.delete_profiles(["p1"])
    total = engine.total()
    change = segs.refresh("m", as_of=T0 + timedelta(days=1))
    assert change.exited == 1 and engine.total() == total
    with pytest.raises(NotFound):
        engine.is_member("p1", {"all": True})


def test_entered_twice_in_30_days_finds_exactly_those(engine: Engine, segs: Segments) -> None:
    segs.create("s", "static", ids=["p1", "p2", "p3"])
    segs.remove("s", ["p1", "p2"])
    segs.add("s", ["p1", "p2", "p4"])
    assert ids_where(engine, entered_count("s", "gte", 2)) == {"p1", "p2"}
    assert ids_where(engine, entered_count("s", "eq", 1)) == {"p3", "p4"}
    # a materialized segment, refreshed at chosen times: in, out, in again
    rule = {"field": "c", "op": "eq", "value": "A"}
    segs.create("m", "materialized", rule=rule, as_of=T0 - timedelta(days=40))
    old_in = ids_where(engine, rule)
    engine.upsert_profiles([{"id": pid, "c": "B"} for pid in old_in])
    segs.refresh("m", as_of=T0 - timedelta(days=20))
    engine.upsert_profiles([{"id": pid, "c": "A"} for pid in old_in])
    segs.refresh("m", as_of=T0 - timedelta(days=10))
    engine.upsert_profiles([{"id": pid, "c": "B"} for pid in old_in])
    segs.refresh("m", as_of=T0 - timedelta(days=5))
    engine.upsert_profiles([{"id": pid, "c": "A"} for pid in old_in])
    segs.refresh("m", as_of=T0)
    assert old_in and ids_where(engine, entered_count("m", "gte", 2), as_of=T0) == old_in
    assert ids_where(engine, entered_count("m", "gte", 3, days=60), as_of=T0) == old_in
    assert ids_where(engine, entered_count("m", "gte", 3), as_of=T0) == set()


def test_a_failed_refresh_changes_nothing(engine: Engine, segs: Segments,
                                          monkeypatch: pytest.MonkeyPatch,
                                          tmp_path: Path) -> None:
    rule = {"field": "n", "op": "gte", "value": 50}
    segs.create("m", "materialized", rule=rule, as_of=T0)
    before = ids_where(engine, {"segment": "m"})
    engine.upsert_profiles([{"id": f"p{i}", "n": 99} for i in range(N)])
    version = engine.snapshot.version

    def boom(*args: Any) -> Any:
        raise RuntimeError("disk full")

    monkeypatch.setattr(segments_module, "_put_point", boom)
    with pytest.raises(RuntimeError):
        segs.refresh("m", as_of=T0 + timedelta(days=1))
    assert engine.snapshot.version == version
    assert ids_where(engine, {"segment": "m"}) == before
    assert engine.count(entered_count("m", "gte", 1, days=3650), as_of=T0 + timedelta(days=2)) \
        == len(before)
    assert len(segs.history("m")) == 1


def test_scheduler_refreshes_due_segments(engine: Engine, segs: Segments) -> None:
    rule = {"field": "c", "op": "eq", "value": "Z"}
    segs.create("z", "materialized", rule=rule, refresh_every=1)
    segs.create("manual", "materialized", rule=rule)
    now = time.time_ns() // 1000
    assert segs.due(now) == [] and segs.due(now + 1_000_001) == ["z"]
    engine.upsert_profiles([{"id": "zed", "c": "Z"}])
    scheduler = RefreshScheduler(segs, tick=0.05).start()
    try:
        deadline = time.monotonic() + 10
        while engine.count({"segment": "z"}) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        scheduler.stop(timeout=10)
    assert ids_where(engine, {"segment": "z"}) == {"zed"}
    assert engine.count({"segment": "manual"}) == 0
    assert [p.cause for p in segs.history("z")][:2] == ["create", "refresh"]


def test_random_changes_match_a_python_model(engine: Engine, segs: Segments) -> None:
    """Adds, removes, data changes and refreshes against sets and per-profile counters."""
    rng = random.Random(17)
    rule = {"field": "n", "op": "gte", "value": 60}
    model_s: set[str] = set()
    model_m = ids_where(engine, rule)
    entered: dict[tuple[str, str], int] = {}
    exited: dict[tuple[str, str], int] = {}

    def note(counter: dict, name: str, pids: set[str]) -> None:
        for pid in pids:
            counter[(name, pid)] = counter.get((name, pid), 0) + 1

    segs.create("s", "static")
    segs.create("m", "materialized", rule=rule)
    note(entered, "m", model_m)
    everyone = [f"p{i}" for i in range(N)]
    for step in range(40):
        action = rng.choice(["add", "remove", "data", "refresh"])
        chosen = set(rng.sample(everyone, rng.randint(1, 8)))
        if action == "add":
            change = segs.add("s", sorted(chosen))
            note(entered, "s", chosen - model_s)
            assert change.entered == len(chosen - model_s)
            model_s |= chosen
        elif action == "remove":
            change = segs.remove("s", sorted(chosen))
            note(exited, "s", chosen & model_s)
            assert change.exited == len(chosen & model_s)
            model_s -= chosen
        elif action == "data":
            engine.upsert_profiles([{"id": pid, "n": rng.randint(0, 99)} for pid in chosen])
        else:
            now = ids_where(engine, rule)
            change = segs.refresh("m")
            note(entered, "m", now - model_m)
            note(exited, "m", model_m - now)
            assert (change.entered, change.exited) == (len(now - model_m), len(model_m - now))
            model_m = now
        assert ids_where(engine, {"segment": "s"}) == model_s, step
        assert ids_where(engine, {"segment": "m"}) == model_m, step
    for event, counter in (("segment_entered", entered), ("segment_exited", exited)):
        for name in ("s", "m"):
            for k in {v for (n, _), v in counter.items() if n == name}:
                rule_k = {"event": event, "where": {"field": "segment", "op": "eq",
                                                    "value": name},
                          "having": {"agg": "count", "op": "eq", "value": k}}
                want = {pid for (n, pid), v in counter.items() if n == name and v == k}
                assert ids_where(engine, rule_k) == want, (event, name, k)


def test_concurrent_changes_lose_nothing(engine: Engine, segs: Segments) -> None:
    import threading

    segs.create("s", "static")
    segs.create("m", "materialized", rule={"field": "c", "op": "eq", "value": "A"})
    errors: list[BaseException] = []

    def adder(part: int) -> None:
        try:
            for i in range(part, N, 4):
                segs.add("s", [f"p{i}"])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def churn() -> None:
        try:
            for k in range(10):
                engine.upsert_profiles([{"id": f"p{k}", "c": "ABC"[k % 3]}])
                segs.refresh("m")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=adder, args=(k,)) for k in range(4)]
    threads.append(threading.Thread(target=churn))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert ids_where(engine, {"segment": "s"}) == {f"p{i}" for i in range(N)}
    assert engine.count(entered_count("s", "eq", 1)) == N
    assert [p.size for p in segs.history("s")] == list(range(N + 1))
    segs.refresh("m")
    assert ids_where(engine, {"segment": "m"}) == ids_where(engine, {"field": "c", "op": "eq",
                                                                     "value": "A"})


# ---------------------------------------------------------------------- persistence
def test_every_kind_survives_a_restart(tmp_path: Path) -> None:
    db = tmp_path / "db"
    with Engine.open(db) as engine:
        engine.declare_schema(SCHEMA)
        engine.upsert_profiles(make_profiles(300))
        segs = open_segments(engine)
        segs.create("s", "static", ids=[f"p{i}" for i in range(0, 300, 3)])
        segs.create("d", "dynamic", rule={"and": [{"segment": "s"},
                                                  {"field": "c", "op": "eq", "value": "A"}]})
        segs.create("m", "materialized", rule={"field": "n", "op": "lt", "value": 30},
                    refresh_every=3600, as_of=T0)
        segs.record_size("d", as_of=T0)
        mover = next(p["id"] for p in make_profiles(300) if p["n"] >= 30)
        engine.upsert_profiles([{"id": mover, "n": 1}])  # m is not refreshed: keeps its set
        want = {name: ids_where(engine, {"segment": name}) for name in ("s", "d", "m")}
        infos = segs.list(as_of=T0)
        history = {name: segs.history(name) for name in ("s", "d", "m")}
    with Engine.open(db) as engine:
        with pytest.raises(NotFound):  # until the segments are opened
            engine.count({"segment": "s"})
        segs = open_segments(engine)
        assert segs.list(as_of=T0) == infos
        for name, members in want.items():
            assert ids_where(engine, {"segment": name}) == members
            assert segs.history(name) == history[name]
        assert mover not in want["m"]
        assert mover in ids_where(engine, {"field": "n", "op": "lt", "value": 30})
        segs.add("s", [mover])  # and it goes on from there
        segs.refresh("m", as_of=T0 + timedelta(days=1))
    with Engine.open(db) as engine:
        segs = open_segments(engine)
        assert mover in ids_where(engine, {"segment": "s"})
        assert mover in ids_where(engine, {"segment": "m"})
        assert [p.cause for p in segs.history("m")] == ["create", "refresh"]


# ---------------------------------------------------------------------- overlap, members of
def test_overlap_equals_pairwise_counts(engine: Engine, segs: Segments) -> None:
    rng = random.Random(9)
    segs.create("s1", "static", ids=rng.sample([f"p{i}" for i in range(N)], 25))
    segs.create("s2", "static", ids=rng.sample([f"p{i}" for i in range(N)], 30))
    segs.create("d", "dynamic", rule={"field": "tags", "op": "eq", "value": "x"})
    segs.create("m", "materialized", rule={"field": "n", "op": "between", "value": [20, 70]})
    segs.create("empty", "static")
    names = ["s1", "s2", "d", "m", "empty", "s1"]
    sets = [ids_where(engine, {"segment": name}) for name in names]
    found = segs.overlap(names)
    assert found.names == tuple(names)
    assert found.sizes == tuple(len(s) for s in sets)
    assert found.matrix == tuple(tuple(len(a & b) for b in sets) for a in sets)


def test_segments_of_a_profile(engine: Engine, segs: Segments) -> None:
    segs.create("s", "static", ids=["p1"])
    segs.create("d", "dynamic", rule={"field": "c", "op": "eq", "value": "A"})
    segs.create("m", "materialized", rule={"field": "n", "op": "gte", "value": 0})
    for pid in ("p0", "p1", "p2"):
        want = [name for name in ("d", "m", "s") if pid in ids_where(engine, {"segment": name})]
        assert segs.segments_of(pid) == want
    with pytest.raises(NotFound):
        segs.segments_of("ghost")


# ---------------------------------------------------------------------- explain
def _sub_rule(rule: Any, path: str) -> Any:
    """The node of a rule at a JSON path like $.and[1].not."""
    node = rule
    for part in path[2:].split(".") if path != "$" else []:
        key, _, index = part.partition("[")
        node = node[key]
        if index:
            node = node[int(index[:-1])]
    return node


def _nodes(node: Node) -> Iterator[Node]:
    yield node
    for child in node.children:
        yield from _nodes(child)


def test_explain_counts_equal_separate_counts(engine: Engine, segs: Segments) -> None:
    segs.create("churned", "static", ids=[f"p{i}" for i in range(0, N, 4)])
    engine.track_events([{"profile": f"p{i}", "event": "popup_opened", "popup": "spring",
                          "ts": iso(T0 - timedelta(days=i % 5, hours=j))}
                         for i in range(N) for j in range(i % 6)])
    rule = {"and": [
        {"field": "c", "op": "in", "value": ["A", "B"]},
        {"event": "popup_opened", "where": {"field": "popup", "op": "eq", "value": "spring"},
         "window": {"last_days": 30}, "having": {"agg": "count", "op": "gte", "value": 3}},
        {"not": {"segment": "churned"}},
        {"or": [{"field": "n", "op": "lt", "value": 40},
                {"not": {"field": "tags", "op": "eq", "value": "y"}}]}]}
    found = explain(engine.snapshot, rule, engine.parse(rule), T.parse_timestamp(iso(T0)))
    nodes = list(_nodes(found.root))
    assert len(nodes) == 9
    for node in nodes:
        assert node.count == engine.count(_sub_rule(rule, node.path), as_of=T0), node.path
    assert found.sentence == (
        "Profiles whose c is one of 'A' or 'B', who had at least 3 'popup_opened' events where "
        "popup is 'spring' in the last 30 days, who are not in segment 'churned' and "
        "(whose n is less than 40 or whose tags do not include 'y')")
    assert found.text.splitlines()[0] == f"all of: {found.root.count:,}"


@pytest.mark.parametrize(("rule", "words"), [
    ({"not": {"field": "c", "op": "eq", "value": "A"}},
     "Profiles whose c is not 'A' (or is unset)"),
    ({"not": {"and": [{"segment": "s"}, {"field": "n", "op": "gt", "value": 5}]}},
     "Profiles who are not in segment 's' or whose n is at most 5 (or is unset)"),
    ({"field": "n", "op": "exists"}, "Profiles whose n is set"),
    ({"all": True}, "All live profiles"),
    ({"event": "login", "having": {"agg": "count", "op": "eq", "value": 0}},
     "Profiles who did not have a 'login' event"),
    ({"orders": {"field": "status", "op": "eq", "value": "paid"}, "window": {"last_days": 180},
      "having": {"agg": "sum", "of": "amount", "op": "gt", "value": 300}},
     "Profiles who placed orders where status is 'paid' in the last 180 days with a total "
     "amount of more than 300"),
])
def test_explain_sentences(engine: Engine, segs: Segments, rule: Any, words: str) -> None:
    segs.create("s", "static")
    engine.declare_schema({"events": {"k": "keyword"}, "orders": {"status": "keyword",
                                                                   "amount": "float"}})
    found = explain(engine.snapshot, rule, engine.parse(rule), 0)
    assert found.sentence == words


def test_explain_a_segment_says_what_it_is(engine: Engine, segs: Segments) -> None:
    segs.create("a", "dynamic", rule={"field": "c", "op": "eq", "value": "A"})
    rule = {"segment": "a"}
    found = explain(engine.snapshot, rule, engine.parse(rule), 0)
    assert found.sentence == ("Profiles who are in segment 'a'; dynamic segment 'a' is: "
                              "Profiles whose c is 'A'")


# ---------------------------------------------------------------------- export
def test_profile_rows_with_fields(engine: Engine) -> None:
    engine.upsert_profiles([{"id": "p2", "tags": None}])
    dense = np.array([engine.dense_id("p1"), engine.dense_id("p2")], dtype=np.uint32)
    fields = check_fields(engine, ["tags", "id", "c", "tags"])
    assert fields == ["tags", "c"]
    rows = profile_rows(engine, dense, fields)
    assert rows[0] == {"id": "p1", "tags": engine.profile("p1")["tags"],
                       "c": engine.profile("p1")["c"]}
    assert rows[1]["tags"] is None
    assert profile_rows(engine, dense) == [engine.profile("p1"), engine.profile("p2")]
    with pytest.raises(BitsegError, match="unknown profile field 'nope'"):
        check_fields(engine, ["nope"])


# ---------------------------------------------------------------------- metrics
def test_metrics_equal_a_direct_computation(engine: Engine, segs: Segments) -> None:
    rng = random.Random(4)
    orders = []
    for k in range(400):
        pid = f"p{rng.randrange(N - 10)}"  # the last 10 profiles never order
        day = rng.randint(-60, 10)  # some orders are after as_of
        orders.append({"id": f"o{k}", "profile": pid, "ts": iso(T0 + timedelta(days=day)),
                       "amount": round(rng.uniform(1, 500), 2), "status": "paid",
                       "points": rng.randint(0, 9)})
    engine.add_orders(orders)
    segs.create("vip", "static", ids=[f"p{i}" for i in range(0, N, 3)])
    counted = [o for o in orders if o["ts"] <= iso(T0)]

    def direct(members: set[str]) -> tuple[int, int, Decimal]:
        mine = [o for o in counted if o["profile"] in members]
        total = sum((Decimal(repr(o["amount"])) for o in mine), Decimal(0))
        return len(mine), len({o["profile"] for o in mine}), total

    everyone = ids_where(engine, {"all": True})
    _, _, all_total = direct(everyone)
    for target in ({"segment": "vip"}, {"field": "c", "op": "eq", "value": "A"}, {"all": True}):
        members = ids_where(engine, target, as_of=T0)
        n_orders, customers, total = direct(members)
        m = segs.metrics(target, as_of=T0)
        assert (m.profiles, m.total_profiles) == (len(members), len(everyone))
        assert (m.orders, m.customers) == (n_orders, customers)
        assert Decimal(m.revenue.numerator) / m.revenue.denominator == total
        assert Decimal(m.total_revenue.numerator) / m.total_revenue.denominator == all_total
        assert m.share_of_profiles == type(m.revenue)(len(members), len(everyone))
        assert m.share_of_revenue == m.revenue / m.total_revenue
        assert m.average_order_value == m.revenue / n_orders
        points = segs.metrics(target, as_of=T0, amount_field="points")  # an int field
        assert points.revenue == sum(o["points"] for o in counted if o["profile"] in members)
    for bad in ("status", "nope"):
        with pytest.raises(BitsegError, match="amount_field"):
            segs.metrics({"all": True}, amount_field=bad)


def test_metrics_without_orders_have_no_averages(engine: Engine, segs: Segments) -> None:
    m = segs.metrics({"field": "c", "op": "eq", "value": "A"})
    assert m.orders == 0 and m.revenue == 0 and m.share_of_revenue is None
    assert m.average_order_value is None
    assert m.profiles == engine.count({"field": "c", "op": "eq", "value": "A"})
