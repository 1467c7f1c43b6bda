"""Bulk actions and computed traits through the sharded front (issue 16,
server/shard_actions.py).

The same records written through 1, 2 and 3 shards and into one unsharded engine; the
same actions and traits refreshes on both give the same counts, audit entries
(ListActions), trait values per profile and segments over the traits. A refused action
or refresh changes no shard, also when only one shard refuses it; a front stopped
between the phases of the two-phase commit leaves an action everywhere or nowhere once
the store is open again.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from test_shard_writes import (
    Crash,
    Front,
    crash,
    in_process,
    new_sharded_store,
    ray_runtime,  # noqa: F401 -- a fixture, for the test on Ray
    state,
)
from test_traits import make_data

from bitseg import ClientError
from bitseg.index import bulk, traits
from bitseg.index.bulk import BulkAction
from bitseg.index.engine import Engine
from bitseg.index.segments import open_segments
from bitseg.index.traits import quintile_cuts, quintiles, scored
from bitseg.server import shard_actions
from bitseg.server.shard_actions import ShardTraitsScheduler
from bitseg.server.shard_writes import DECISIONS
from bitseg.server.shards import ShardSet

UTC = timezone.utc
AS_OF = "2026-06-01T12:00:00Z"  # test_traits' data is around it
T0 = datetime(2026, 6, 1, 12, tzinfo=UTC)
PLANS = ["free", "basic", "premium"]
SCHEMA = {"orders": {"amount": "float", "items.price": "float"}}
ACTIONS = [  # (action, field, value, rule): each run on both, in this order
    ("set", "plan", "gold", {"field": "age", "op": "gt", "value": 50}),
    ("add", "tags", "winback", {"event": "email_opened"}),
    ("add", "tags", "winback", {"all": True}),
    ("remove", "tags", "new", {"field": "age", "op": "lt", "value": 40}),
    ("unset", "age", None, {"field": "plan", "op": "eq", "value": "free"}),
    ("set", "vip", True, {"orders": {"all": True},
                          "having": {"agg": "sum", "of": "amount", "op": "gte", "value": 100}}),
    ("set", "score", 2.5, {"field": "plan", "op": "eq", "value": "gold"}),
    ("set", "nobody_has", 7, {"field": "age", "op": "gt", "value": 1000}),
]
RULES = [
    {"all": True},
    {"field": "plan", "op": "eq", "value": "gold"},
    {"field": "tags", "op": "eq", "value": "winback"},
    {"field": "tags", "op": "eq", "value": "new"},
    {"field": "age", "op": "exists"},
    {"field": "vip", "op": "eq", "value": True},
    {"field": "score", "op": "gt", "value": 2},
]
TRAIT_RULES = [
    {"field": "rfm_recency", "op": "eq", "value": 5},
    {"and": [{"field": "rfm_frequency", "op": "gte", "value": 4},
             {"field": "rfm_monetary", "op": "lte", "value": 2}]},
    {"field": "favourite_category", "op": "eq", "value": "shoes"},
    {"field": "best_send_hour", "op": "lt", "value": 12},
]


def records(seed: int, n: int = 60) -> dict[str, list[dict]]:
    """test_traits' profiles, events and orders (categories, statuses, email events),
    the profiles given a plan and tags."""
    profiles, events, orders = make_data(seed, n)
    for i, person in enumerate(profiles):
        person["plan"] = PLANS[i % 3]
        if i % 4:
            person["tags"] = ["new", "web"][:1 + i % 2]
    return {"profiles": profiles, "events": events, "orders": orders}


def write_both(front: Front, engine: Engine, data: dict[str, list[dict]]) -> None:
    front.shards.each("declare", {"profiles": {}, "events": {}, **SCHEMA})
    engine.declare_schema(SCHEMA)
    for kind, send, apply in (
            ("profiles", front.client.upsert_profiles, engine.upsert_profiles),
            ("events", front.client.track_events, engine.track_events),
            ("orders", front.client.add_orders, engine.add_orders)):
        send([data[kind]])
        apply(data[kind])


@pytest.fixture(params=[1, 2, 3])
def both(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Front, Engine]]:
    """A front over N shards in process and one engine, holding the same records."""
    front = Front(in_process(new_sharded_store(tmp_path / "db", request.param)))
    with Engine.open(tmp_path / "one") as engine:
        write_both(front, engine, records(seed=request.param))
        yield front, engine
    front.close()


def without_time(entry: dict[str, Any] | None) -> dict[str, Any] | None:
    """An audit entry without what differs by design: its time, and the version (the
    shards' versions summed, not one store's)."""
    return None if entry is None else {k: v for k, v in entry.items()
                                       if k not in ("time", "version")}


def assert_same(front: Front, engine: Engine, rules: list[dict] = RULES) -> None:
    for rule in rules:
        assert front.client.count(rule, as_of=AS_OF) == engine.count(rule, as_of=AS_OF), rule
    for pid in engine.members({"all": True}):
        assert front.client.profile(pid).as_dict() == engine.profile(pid), pid


# ---------------------------------------------------------------------- quintiles
def test_cut_points_score_as_quintiles_do() -> None:
    rng = np.random.default_rng(3)
    for _ in range(500):
        metric = rng.integers(-4, 5, size=int(rng.integers(1, 60))) * int(rng.integers(1, 9))
        values, counts = np.unique(metric, return_counts=True)
        assert scored(metric, quintile_cuts(values, counts)).tolist() == \
            quintiles(metric).tolist(), metric.tolist()
    assert quintile_cuts(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)) == []


# ---------------------------------------------------------------------- same answers
def test_bulk_actions_answer_as_one_store(both: tuple[Front, Engine]) -> None:
    front, engine = both
    client = front.client
    client.create_segment("older", "static", {"field": "age", "op": "gte", "value": 60},
                          as_of=AS_OF)
    open_segments(engine).create(
        "older", "static", rule={"field": "age", "op": "gte", "value": 60}, as_of=AS_OF)
    for action, field, value, rule in [*ACTIONS, ("add", "tags", "senior", None)]:
        target = {"rule": rule} if rule is not None else {"segment": "older"}
        asked = BulkAction(action, field, value, **target)
        dry = client.bulk_action(action, field, value, dry_run=True, as_of=AS_OF, **target)
        one_dry = bulk.run(engine, asked, as_of=AS_OF, dry_run=True)
        assert (dry["members"], dry["changed"], dry["entry"]) == \
            (one_dry.members, one_dry.changed, None), (action, field)
        done = client.bulk_action(action, field, value, as_of=AS_OF, **target)
        one = bulk.run(engine, asked, as_of=AS_OF)
        assert (done["members"], done["changed"]) == (one.members, one.changed), (action, field)
        assert without_time(done["entry"]) == without_time(one.entry)
    assert [without_time(e) for e in client.actions()] == \
        [without_time(e) for e in bulk.list_entries(engine)]
    assert [without_time(e) for e in client.actions(limit=3)] == \
        [without_time(e) for e in bulk.list_entries(engine, 3)]
    schemas = front.shards.each("schema")  # a field an action brought is on every shard
    assert all(s["profiles"] == engine.schema.to_json()["profiles"] for s in schemas)
    assert_same(front, engine)


def test_traits_refresh_answers_as_one_store(both: tuple[Front, Engine]) -> None:
    front, engine = both
    client = front.client
    for config in (None, {"rfm_monetary": {"statuses": ["paid", "delivered"]},
                          "rfm_recency": {"last_days": 30}, "favourite_category": {}}):
        sent = client.refresh_traits(as_of=AS_OF, config=config)
        one = traits.refresh(engine, config, as_of=AS_OF)
        assert (sent["profiles"], sent["changed"], sent["holders"]) == \
            (one.profiles, one.changed, one.holders), config
        assert_same(front, engine, TRAIT_RULES)
    for _ in range(2):  # the second time with nothing to change
        again = client.refresh_traits(as_of=AS_OF)
        assert again["profiles"] == traits.refresh(engine, None, as_of=AS_OF).profiles
    assert again["profiles"] == 0
    # the base changes: fewer buyers, so other cut points
    gone = sorted(engine.members({"orders": {"all": True}}))[::3]
    assert client.delete_profiles(gone) == engine.delete_profiles(gone)
    later = "2026-06-20T00:00:00Z"
    sent = client.refresh_traits(as_of=later)
    one = traits.refresh(engine, None, as_of=later)
    assert (sent["profiles"], sent["changed"], sent["holders"]) == \
        (one.profiles, one.changed, one.holders)
    assert_same(front, engine, TRAIT_RULES)
    client.create_segment("champions", "materialized", {"and": [
        {"field": "rfm_recency", "op": "gte", "value": 4},
        {"field": "rfm_frequency", "op": "gte", "value": 4}]}, as_of=later)
    assert client.get_segment("champions").size == engine.count({"and": [
        {"field": "rfm_recency", "op": "gte", "value": 4},
        {"field": "rfm_frequency", "op": "gte", "value": 4}]}, as_of=later)


def test_scheduled_traits_refresh_through_the_front(tmp_path: Path) -> None:
    front = Front(in_process(new_sharded_store(tmp_path / "db", 3)))
    try:
        with Engine.open(tmp_path / "one") as engine:
            write_both(front, engine, records(seed=11))
            ticker = ShardTraitsScheduler(front.shards, None, every=3600)
            now_us = (T0 - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
            report = ticker.run_once(now_us)
            one = traits.refresh(engine, None, as_of=now_us)
            assert report is not None and report.holders == one.holders
            assert report.profiles == one.profiles > 0
            assert_same(front, engine, TRAIT_RULES)
    finally:
        front.close()


# ---------------------------------------------------------------------- refusals
def test_a_refused_action_changes_no_shard(tmp_path: Path) -> None:
    front = Front(in_process(new_sharded_store(tmp_path / "db", 3)))
    try:
        client, shards = front.client, front.shards
        client.upsert_profiles([[{"id": f"r{i}", "plan": "free", "n": i} for i in range(30)]])
        before = state(shards)
        for args, code, words in (
                (("add", "plan", "x"), "INVALID_ARGUMENT", "keywords (multi-valued) field"),
                (("set", "n", "ten"), "INVALID_ARGUMENT", "expected an integer"),
                (("set", "id", "x"), "INVALID_ARGUMENT", "cannot be changed")):
            with pytest.raises(ClientError) as caught:
                client.bulk_action(*args, rule={"all": True})
            assert caught.value.code == code and words in caught.value.message
        with pytest.raises(ClientError) as caught:
            client.bulk_action("set", "plan", "gold", segment="ghost")
        assert caught.value.code == "NOT_FOUND"
        # a segment only shards 0 and 1 have: shard 2 refuses, 0 and 1 change nothing
        shards.these([0, 1], "segment_change", [
            ("create", {"name": "half", "kind": "dynamic", "rule": {"all": True}, "as_of": T0})
        ] * 2)
        before = state(shards)
        with pytest.raises(ClientError) as caught:
            client.bulk_action("set", "plan", "gold", segment="half")
        assert caught.value.code == "NOT_FOUND"
        assert state(shards) == before
        assert client.count({"field": "plan", "op": "eq", "value": "gold"}) == 0
        assert client.actions() == []
        # (an action on a top rule: the store's top, test_shard_tops.py)
        # a trait field of another type: refused on every shard, nothing written
        client.upsert_profiles([[{"id": "r1", "rfm_recency": "high"}]])
        before = state(shards)
        with pytest.raises(ClientError) as caught:
            client.refresh_traits(as_of=AS_OF)
        assert caught.value.code == "INVALID_ARGUMENT" and "rfm_recency" in caught.value.message
        assert state(shards) == before
        assert not list((tmp_path / "db" / DECISIONS).glob("*"))
    finally:
        front.close()


# ---------------------------------------------------------------------- crashes
@pytest.mark.parametrize("when", ["after_prepare", "after_decision"])
def test_a_front_stopped_between_the_phases_has_the_action_everywhere_or_nowhere(
        tmp_path: Path, when: str) -> None:
    paths = new_sharded_store(tmp_path / "db", 3)
    front = Front(in_process(paths))
    front.client.upsert_profiles([[{"id": f"c{i}", "plan": "free"} for i in range(30)]])
    front.client.bulk_action("set", "plan", "basic", rule={"all": True})
    setattr(front.writes, when, crash)
    with pytest.raises(Crash):
        shard_actions.bulk_action(front.shards, BulkAction("add", "tags", "lost?",
                                                           rule={"all": True}), T0, False)
    staged = [s for _, _, s in state(front.shards)]
    assert all(len(s) == 1 for s in staged)  # staged on every shard, applied on none
    assert not any("tags" in s["profiles"] for s in front.shards.each("schema"))
    front.close()
    again = Front(in_process(paths))  # the front's next start
    try:
        entries = again.client.actions()
        if when == "after_decision":
            assert again.client.count({"field": "tags", "op": "eq", "value": "lost?"}) == 30
            assert [(e["id"], e["members"], e["changed"]) for e in entries] == \
                [(2, 30, 30), (1, 30, 30)]
        else:
            assert not any("tags" in s["profiles"] for s in again.shards.each("schema"))
            assert [e["id"] for e in entries] == [1]
        assert [s for _, _, s in state(again.shards)] == [[], [], []]
        assert not list((tmp_path / "db" / DECISIONS).glob("*"))
        made = again.client.bulk_action("unset", "plan", rule={"all": True})
        assert made["entry"]["id"] == len(entries) + 1 and made["changed"] == 30
    finally:
        again.close()


def test_a_traits_refresh_decided_before_a_stop_is_applied_on_open(tmp_path: Path) -> None:
    paths = new_sharded_store(tmp_path / "db", 2)
    front = Front(in_process(paths))
    with Engine.open(tmp_path / "one") as engine:
        write_both(front, engine, records(seed=4, n=40))
        front.writes.after_decision = crash
        with pytest.raises(Crash):
            shard_actions.refresh_traits(front.shards, None, T0)
        assert not any("rfm_recency" in s["profiles"] for s in front.shards.each("schema"))
        front.close()
        again = Front(in_process(paths))
        try:
            traits.refresh(engine, None, as_of=AS_OF)
            assert_same(again, engine, TRAIT_RULES)
            assert again.client.refresh_traits(as_of=AS_OF)["profiles"] == 0
        finally:
            again.close()


# ---------------------------------------------------------------------- on Ray
def test_three_shards_on_ray_act_and_refresh_as_one_store(tmp_path: Path,
                                                          ray_runtime: Any  # noqa: F811
                                                          ) -> None:
    front = Front(ShardSet.on_ray(new_sharded_store(tmp_path / "db", 3)))
    try:
        with Engine.open(tmp_path / "one") as engine:
            write_both(front, engine, records(seed=9))
            for action, field, value, rule in ACTIONS[:3]:
                done = front.client.bulk_action(action, field, value, rule=rule, as_of=AS_OF)
                one = bulk.run(engine, BulkAction(action, field, value, rule=rule),
                               as_of=AS_OF)
                assert without_time(done["entry"]) == without_time(one.entry)
            sent = front.client.refresh_traits(as_of=AS_OF)
            one_report = traits.refresh(engine, None, as_of=AS_OF)
            assert (sent["profiles"], sent["holders"]) == \
                (one_report.profiles, one_report.holders)
            assert_same(front, engine, RULES[:4] + TRAIT_RULES)
            assert orjson.dumps([without_time(e) for e in front.client.actions()]) == \
                orjson.dumps([without_time(e) for e in bulk.list_entries(engine)])
    finally:
        front.close()


def test_serve_shards_refreshes_traits_on_a_schedule(tmp_path: Path) -> None:
    """`bitseg serve --shards 1 --traits-every S`: the front's scheduler writes the
    traits (one shard is served in process: the same front, without Ray's start)."""
    from conftest_grpc import ServerProcess, run_cli

    paths = new_sharded_store(tmp_path / "db", 1)
    front = Front(in_process(paths))
    with Engine.open(tmp_path / "one") as engine:
        write_both(front, engine, records(seed=2, n=30))
        front.close()
        server = ServerProcess(tmp_path / "db", ["--shards", "1", "--traits-every", "0.2"])
        try:
            deadline = time.monotonic() + 30
            while not any("traits refreshed" in line for line in server.lines):
                assert time.monotonic() < deadline, server.stderr()
                time.sleep(0.05)
            holders = traits.refresh(engine, None).holders["rfm_frequency"]
            done = run_cli("count", "--rule", '{"field": "rfm_frequency", "op": "exists"}',
                           "--addr", server.addr)
            assert done.returncode == 0, done.stderr
            assert int(done.stdout.strip().replace(",", "")) == holders > 0
        finally:
            assert server.stop() == 0


@pytest.mark.parametrize("when", ["after_prepare", "after_decision"])
def test_a_shard_killed_between_the_phases_applies_the_action_when_back(
        tmp_path: Path, ray_runtime: Any, when: str) -> None:  # noqa: F811
    front = Front(ShardSet.on_ray(new_sharded_store(tmp_path / "db", 3)))
    try:
        front.client.upsert_profiles([[{"id": f"k{i}", "plan": "free"} for i in range(20)]])
        pid = front.shards.call(1, "pid")
        setattr(front.writes, when, lambda txid: os.kill(pid, signal.SIGKILL))
        done = front.client.bulk_action("set", "plan", "gold", rule={"all": True})
        setattr(front.writes, when, None)
        assert (done["members"], done["changed"]) == (20, 20)  # acknowledged: every shard
        assert front.shards.call(1, "pid") != pid  # Ray restarted it, it applied the action
        assert front.client.count({"field": "plan", "op": "eq", "value": "gold"}) == 20
        assert [(e["id"], e["members"], e["changed"]) for e in front.client.actions()] == \
            [(1, 20, 20)]
        assert [s for _, _, s in state(front.shards)] == [[], [], []]
    finally:
        front.close()
