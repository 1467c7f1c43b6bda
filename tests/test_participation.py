"""The segment-participation operators of a segment builder (Altcraft's), each written as
an ordinary rule over the segment_entered / segment_exited events the server records
(CONTRACT §2.5), shown on a static and a materialized segment; the rules are the ones
docs/rules.md gives."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from conftest_grpc import ServerProcess

from bitseg import Client
from bitseg.index.engine import Engine
from bitseg.index.segments import Segments, open_segments

UTC = timezone.utc
PIDS = [f"p{i}" for i in range(6)]


def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def entered(name: str, **more: Any) -> dict:
    return {"event": "segment_entered",
            "where": {"field": "segment", "op": "eq", "value": name}, **more}


def operators(name: str, period: tuple[datetime, datetime]) -> dict[str, dict]:
    """Each operator as a rule, as docs/rules.md writes it."""
    return {
        "currently in": {"segment": name},
        "entered at least once": entered(name),
        "never entered": {"not": entered(name)},
        "not in now, but entered before": {"and": [entered(name),
                                                   {"not": {"segment": name}}]},
        "entered at least 2 times in the last 60 days": entered(
            name, window={"last_days": 60}, having={"agg": "count", "op": "gte", "value": 2}),
        "entered in the period": entered(
            name, window={"from": iso(period[0]), "to": iso(period[1])}),
        "not entered in the last 10 days": {"not": entered(name,
                                                           window={"last_days": 10})},
    }


@pytest.fixture()
def world() -> Iterator[tuple[Engine, Segments, datetime]]:
    with tempfile.TemporaryDirectory() as tmp, Engine.open(tmp) as engine:
        yield engine, open_segments(engine), datetime.now(UTC)


def test_on_a_materialized_segment(world: tuple[Engine, Segments, datetime]) -> None:
    engine, segments, now = world
    engine.declare_schema({"profiles": {"score": "int"}})

    def scores(**given: int) -> None:
        engine.upsert_profiles([{"id": p, "score": s} for p, s in given.items()])

    scores(p0=9, p1=9, p2=1, p3=1, p4=1, p5=1)
    t0, t1, t2, t3 = (now - timedelta(days=d) for d in (40, 20, 2, 1))
    segments.create("hot", "materialized", rule={"field": "score", "op": "gte", "value": 5},
                    as_of=t0)
    scores(p1=1, p2=9)
    segments.refresh("hot", as_of=t1)  # p1 exits, p2 enters
    scores(p1=9)
    segments.refresh("hot", as_of=t2)  # p1 enters again
    scores(p2=1)
    segments.refresh("hot", as_of=t3)  # p2 exits
    as_of = now + timedelta(minutes=1)
    found = {label: set(engine.members(rule, as_of=as_of))
             for label, rule in operators("hot", (t0 - timedelta(days=1), t1)).items()}
    assert found == {
        "currently in": {"p0", "p1"},
        "entered at least once": {"p0", "p1", "p2"},
        "never entered": {"p3", "p4", "p5"},
        "not in now, but entered before": {"p2"},
        "entered at least 2 times in the last 60 days": {"p1"},
        "entered in the period": {"p0", "p1"},  # [t0 - 1 day, t1): p2 entered at t1
        "not entered in the last 10 days": {"p0", "p2", "p3", "p4", "p5"},
    }


def test_on_a_static_segment(world: tuple[Engine, Segments, datetime]) -> None:
    engine, segments, now = world
    engine.upsert_profiles([{"id": p} for p in PIDS])
    t0 = now - timedelta(days=30)
    segments.create("vip", "static", ids=["p0", "p1", "p2"], as_of=t0)
    segments.remove("vip", ["p1"])  # the edits of a static segment happen now
    segments.add("vip", ["p3"])
    segments.remove("vip", ["p2"])
    segments.add("vip", ["p2"])
    as_of = now + timedelta(minutes=1)
    period = (t0, t0 + timedelta(days=1))
    found = {label: set(engine.members(rule, as_of=as_of))
             for label, rule in operators("vip", period).items()}
    assert found == {
        "currently in": {"p0", "p2", "p3"},
        "entered at least once": {"p0", "p1", "p2", "p3"},
        "never entered": {"p4", "p5"},
        "not in now, but entered before": {"p1"},
        "entered at least 2 times in the last 60 days": {"p2"},
        "entered in the period": {"p0", "p1", "p2"},
        "not entered in the last 10 days": {"p0", "p1", "p4", "p5"},
    }


def test_through_the_server(tmp_path: Path) -> None:
    with Engine.open(tmp_path / "store") as engine:
        engine.upsert_profiles([{"id": p} for p in PIDS])
    proc = ServerProcess(tmp_path / "store")
    try:
        with Client(proc.addr, timeout=20) as client:
            client.create_segment("vip", "static", profile_ids=["p0", "p1"])
            client.remove_from_segment("vip", ["p1"])
            client.add_to_segment("vip", ["p1", "p2"])
            client.remove_from_segment("vip", ["p2"])
            now = datetime.now(UTC)
            rules = operators("vip", (now - timedelta(hours=1), now + timedelta(hours=1)))
            got = {label: set(client.members(rule=rule)) for label, rule in rules.items()}
        assert got == {
            "currently in": {"p0", "p1"},
            "entered at least once": {"p0", "p1", "p2"},
            "never entered": {"p3", "p4", "p5"},
            "not in now, but entered before": {"p2"},
            "entered at least 2 times in the last 60 days": {"p1"},
            "entered in the period": {"p0", "p1", "p2"},
            "not entered in the last 10 days": {"p3", "p4", "p5"},
        }
    finally:
        assert proc.stop() == 0, proc.stderr()
