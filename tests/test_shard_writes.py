"""Writes through the sharded front (issue 16, server/shard_writes.py).

The same writes through 3 shards (on one local Ray runtime for the module, and in
process) and into one unsharded engine give the same answers; a refusal on any shard
changes nothing on any shard; a shard killed between the phases of the two-phase commit,
or a front that stops after (or before) its decision, leaves each batch on every shard
or on none once the store is open again; `bitseg load --addr` writes through
`bitseg serve --shards 2`.
"""

from __future__ import annotations

import os
import random
import signal
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson
import pytest
from test_shards import Front as ShardsFront

from bitseg import Client, ClientError
from bitseg.index.engine import Engine
from bitseg.index.shard_key import shard_of
from bitseg.loaders.columnar import texts_block
from bitseg.loaders.split import shard_folder
from bitseg.server.shard_store import Manifest, write_manifest
from bitseg.server.shard_writes import DECISIONS, recover, split_records, writes_for
from bitseg.server.shards import ShardSet, start_ray

UTC = timezone.utc
AS_OF = "2026-11-01T00:00:00Z"
T0 = datetime(2026, 11, 1, tzinfo=UTC)
RULES = [
    {"all": True},
    {"field": "kw", "op": "in", "value": ["a", "b"]},
    {"field": "n", "op": "gt", "value": 3},
    {"field": "late", "op": "exists"},
    {"event": "view", "having": {"agg": "count", "op": "gte", "value": 2}},
    {"orders": {"field": "status", "op": "eq", "value": "paid"},
     "having": {"agg": "sum", "of": "amount", "op": "gt", "value": 50}},
    {"orders": {"all": True}, "having": {"agg": "count", "op": "gte", "value": 2}},
    {"and": [{"event": "buy"}, {"not": {"field": "kw", "op": "eq", "value": "c"}}]},
]


def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def random_batches(seed: int, profiles: int = 80) -> dict[str, list[list[dict]]]:
    """Profiles, events and orders in a few batches each (ids strings and integers)."""
    rng = random.Random(seed)
    ids: list[Any] = [i if i % 7 == 0 else f"p{i}" for i in range(profiles)]
    people = [{"id": pid, "kw": rng.choice("abc"), "n": rng.randint(0, 9)} for pid in ids]
    people += [{"id": rng.choice(ids), "n": rng.randint(0, 9)} for _ in range(20)]  # updates
    events = [{"profile": rng.choice(ids + ["new1", "new2"]),
               "event": rng.choice(["view", "buy"]),
               "ts": iso(T0 - timedelta(hours=rng.randint(1, 500)))} for _ in range(300)]
    orders = [{"id": f"o{k}", "profile": rng.choice(ids), "ts": iso(T0 - timedelta(days=k % 9)),
               "status": rng.choice(["paid", "open"]), "amount": rng.randint(1, 90) * 1.5}
              for k in range(120)]
    orders += [{**orders[3], "status": "open"}]  # a later line updates the order

    def cut(rows: list[dict], size: int) -> list[list[dict]]:
        return [rows[i:i + size] for i in range(0, len(rows), size)]

    return {"profiles": cut(people, 30), "events": cut(events, 70), "orders": cut(orders, 50)}


def new_sharded_store(db: Path, shards: int) -> list[str]:
    """An empty sharded store (manifest and N empty stores); the shards' paths."""
    paths = [shard_folder(db, s) for s in range(shards)]
    for path in paths:
        Engine.open(path).close()
    write_manifest(db, Manifest(shards))
    return [str(p.resolve()) for p in paths]


class Front(ShardsFront):
    """test_shards' front (a real gRPC server and a client), and its servicer's writes."""

    @property
    def writes(self) -> Any:
        return writes_for(self.shards)  # the servicer's own


def in_process(paths: list[str]) -> ShardSet:
    """The shards in this process, opened as `open_shards` does (recovery first)."""
    shards = ShardSet.embedded(paths)
    recover(shards, Path(paths[0]).parent)
    shards.unify_schema()
    return shards


def write_all(client: Client, batches: dict[str, list[list[dict]]]) -> None:
    client.upsert_profiles(batches["profiles"])
    client.track_events(batches["events"])
    client.add_orders(batches["orders"])


def write_engine(engine: Engine, batches: dict[str, list[list[dict]]]) -> None:
    for kind, apply in (("profiles", engine.upsert_profiles), ("events", engine.track_events),
                        ("orders", engine.add_orders)):
        for batch in batches[kind]:
            apply(texts_block([orjson.dumps(r).decode() for r in batch]))


def same_writes(client: Client, engine: Engine, batches: dict[str, list[list[dict]]]
                ) -> None:
    """The batches, some deletes and a new field through the front and into the engine;
    then the same answers from both."""
    write_all(client, batches)
    write_engine(engine, batches)
    deleted = ["p1", "p2", "0", "new1"]
    assert client.delete_profiles(deleted) == engine.delete_profiles(deleted)
    late = [{"id": f"p{i}", "late": iso(T0 - timedelta(days=i))} for i in range(3, 9)]
    sent, report = client.upsert_profiles(late), engine.upsert_profiles(late)
    assert (sent.created, sent.updated) == (report.created, report.updated) == (1, 5)
    assert_same(client, engine)


def assert_same(client: Client, engine: Engine, rules: list[dict] = RULES) -> None:
    for rule in rules:
        assert client.count(rule, as_of=AS_OF) == engine.count(rule, as_of=AS_OF), rule
        assert set(client.members(rule, as_of=AS_OF)) == \
            set(engine.members(rule, as_of=AS_OF)), rule
    for pid in engine.members({"all": True}):
        assert client.profile(pid).as_dict() == engine.profile(pid), pid


def state(shards: ShardSet) -> list[tuple[int, int, list[str]]]:
    """Each shard's (version, profiles, staged batches)."""
    return [(v, n, s) for v, n, s in zip(shards.each("version"),
                                         shards.each("count", {"all": True}, T0),
                                         shards.each("staged"), strict=True)]


@pytest.fixture(scope="module")
def ray_runtime() -> Iterator[Any]:
    ray = pytest.importorskip("ray")  # the dev extra installs it (pyproject: shards)
    start_ray(ray, num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture()
def three(tmp_path: Path) -> Iterator[Front]:
    """Three shards in this process over a new sharded store."""
    front = Front(in_process(new_sharded_store(tmp_path / "db", 3)))
    yield front
    front.close()


# ---------------------------------------------------------------------- same answers
def test_writes_through_three_shards_on_ray_answer_as_one_engine(
        tmp_path: Path, ray_runtime: Any) -> None:
    batches = random_batches(seed=3)
    front = Front(ShardSet.on_ray(new_sharded_store(tmp_path / "db", 3)))
    try:
        with Engine.open(tmp_path / "one") as engine:
            same_writes(front.client, engine, batches)
            # the new field reached every shard, also those none of its records went to
            schemas = front.shards.each("schema")
            assert all(s["profiles"].get("late") == "timestamp" for s in schemas)
            assert [s for _, _, s in state(front.shards)] == [[], [], []]
            assert not list((tmp_path / "db" / DECISIONS).glob("*"))
    finally:
        front.close()


def test_one_shard_in_process_answers_as_one_engine(tmp_path: Path) -> None:
    batches = random_batches(seed=5, profiles=40)
    front = Front(in_process(new_sharded_store(tmp_path / "db", 1)))
    try:
        with Engine.open(tmp_path / "one") as engine:
            same_writes(front.client, engine, batches)
    finally:
        front.close()


# ---------------------------------------------------------------------- refusals
def test_a_bad_line_in_the_last_shards_part_changes_nothing(three: Front) -> None:
    good = [{"id": f"q{i}", "kw": "a", "n": i} for i in range(30)]
    three.client.upsert_profiles(good)
    before = state(three.shards)
    rows = [{"id": f"r{i}", "kw": "b", "n": i, "fresh": "x"} for i in range(20)]
    last = max(i for i, r in enumerate(rows) if shard_of(r["id"], 3) == 2)
    rows[last]["n"] = "not a number"
    with pytest.raises(ClientError) as caught:
        three.client.upsert_profiles([rows])
    assert caught.value.code == "INVALID_ARGUMENT"
    assert f"batch 1 (0 before it committed): record {last + 1}, field 'n'" \
        in caught.value.message, caught.value.message
    assert state(three.shards) == before  # the other shards' dry runs left nothing either
    assert all("fresh" not in s["profiles"] for s in three.shards.each("schema"))
    assert three.client.count({"field": "kw", "op": "eq", "value": "a"}) == 30
    assert three.client.profile("q3").as_dict() == {"id": "q3", "kw": "a", "n": 3}


def test_refused_events_and_orders_leave_the_shards_as_they_were(three: Front,
                                                                 tmp_path: Path) -> None:
    """The shards whose dry runs passed aborted them: their next batch is written as if
    the refused one had never been sent (the same answers as one engine given only the
    good batches)."""
    ids = [f"v{i}" for i in range(24)]
    last = max(i for i, p in enumerate(ids) if shard_of(p, 3) == 2)
    events = [{"profile": p, "event": "view", "ts": AS_OF, "where_from": "mail"} for p in ids]
    orders = [{"id": f"o{i}", "profile": p, "ts": AS_OF, "amount": 2.5 * i, "status": "paid"}
              for i, p in enumerate(ids)]
    bad_events = [dict(e) for e in events]
    bad_events[last]["ts"] = "soon"
    bad_orders = [dict(o, amount=o["amount"] + 1) for o in orders]
    bad_orders[last]["amount"] = "lots"
    batches = {"profiles": [[{"id": p, "n": i} for i, p in enumerate(ids)]],
               "events": [events], "orders": [orders]}
    with Engine.open(tmp_path / "one") as engine:
        three.client.upsert_profiles(batches["profiles"])
        for send, bad in ((three.client.track_events, bad_events),
                          (three.client.add_orders, bad_orders)):
            with pytest.raises(ClientError) as caught:
                send([bad])
            assert f"record {last + 1}" in caught.value.message, caught.value.message
        assert [s for _, _, s in state(three.shards)] == [[], [], []]
        three.client.track_events([events])
        three.client.add_orders([orders])
        write_engine(engine, batches)
        assert_same(three.client, engine, [
            {"all": True}, {"field": "n", "op": "gt", "value": 3},
            {"event": "view", "where": {"field": "where_from", "op": "eq", "value": "mail"}},
            {"orders": {"field": "amount", "op": "gt", "value": 20}},
            {"orders": {"all": True}, "having": {"agg": "sum", "of": "amount", "op": "gt",
                                                 "value": 30}}])


def test_a_group_with_a_bad_batch_names_it_and_keeps_the_ones_before(three: Front) -> None:
    events = [[{"profile": f"e{b}-{i}", "event": "view", "ts": AS_OF} for i in range(9)]
              for b in range(4)]
    events[2][5]["ts"] = "yesterday"
    with pytest.raises(ClientError) as caught:
        three.client.track_events(events)
    assert "batch 3 (2 before it committed): record 6, field 'ts'" in caught.value.message
    assert three.client.count({"event": "view"}, as_of=AS_OF) == 18


def test_a_new_field_of_two_types_on_two_shards_is_refused(three: Front) -> None:
    rows = [{"id": f"t{i}"} for i in range(12)]
    shard_a = next(r for r in rows if shard_of(r["id"], 3) == 0)
    shard_b = next(r for r in rows if shard_of(r["id"], 3) == 1)
    shard_a["score"], shard_b["score"] = 5, 5.5
    before = state(three.shards)
    with pytest.raises(ClientError) as caught:
        three.client.upsert_profiles([rows])
    assert caught.value.code == "INVALID_ARGUMENT"
    assert "profiles.score" in caught.value.message and "int" in caught.value.message
    assert state(three.shards) == before


def test_deleting_an_unknown_id_on_the_last_shard_deletes_nothing(three: Front) -> None:
    three.client.upsert_profiles([{"id": f"d{i}"} for i in range(12)])
    last = next(f"x{i}" for i in range(100) if shard_of(f"x{i}", 3) == 2)
    with pytest.raises(ClientError) as caught:
        three.client.delete_profiles(["d1", "d2", "d3", last])
    assert caught.value.code == "NOT_FOUND" and repr(last) in caught.value.message
    assert three.client.count({"all": True}) == 12
    assert three.client.delete_profiles(["d1", "d2", "d3", "d4", "d1"]) == 4
    assert three.client.count({"all": True}) == 8
    assert [s for _, _, s in state(three.shards)] == [[], [], []]


# ---------------------------------------------------------------------- crashes
class Crash(BaseException):
    """The front stopping where it is (nothing after it runs, as under kill -9)."""


def crash(txid: str) -> None:
    raise Crash(txid)


def test_a_front_stopped_after_its_decision_has_the_batch_everywhere_on_open(
        tmp_path: Path) -> None:
    paths = new_sharded_store(tmp_path / "db", 3)
    front = Front(in_process(paths))
    front.client.upsert_profiles([{"id": f"a{i}", "n": 1} for i in range(10)])
    writes = front.writes
    writes.after_decision = crash
    rows = [orjson.dumps({"id": f"b{i}", "n": 2, "brand_new": True}).decode()
            for i in range(15)]
    with pytest.raises(Crash):
        writes.write("profiles", split_records([rows], "profiles", 3))
    assert sum(front.shards.each("count", {"all": True}, T0)) == 10  # staged, not applied
    assert len(list((tmp_path / "db" / DECISIONS).glob("*.json"))) == 1
    front.close()
    again = Front(in_process(paths))  # the front's next start
    try:
        assert again.client.count({"all": True}) == 25
        assert again.client.count({"field": "brand_new", "op": "eq", "value": True}) == 15
        assert [s for _, _, s in state(again.shards)] == [[], [], []]
        assert not list((tmp_path / "db" / DECISIONS).glob("*"))
    finally:
        again.close()


@pytest.mark.parametrize("cut_short", [False, True])
def test_a_front_stopped_before_its_decision_has_the_batch_nowhere_on_open(
        tmp_path: Path, cut_short: bool) -> None:
    paths = new_sharded_store(tmp_path / "db", 3)
    front = Front(in_process(paths))
    front.client.upsert_profiles([{"id": f"a{i}"} for i in range(10)])
    front.writes.after_prepare = crash
    events = [orjson.dumps({"profile": f"a{i}", "event": "view", "ts": AS_OF}).decode()
              for i in range(10)]
    with pytest.raises(Crash):
        front.writes.write("events", split_records([events], "events", 3))
    staged = [s for _, _, s in state(front.shards)]
    assert all(len(s) == 1 for s in staged)  # staged everywhere
    front.close()
    decisions = tmp_path / "db" / DECISIONS
    if cut_short:  # killed while writing its decision: the temporary, never renamed
        decisions.mkdir(exist_ok=True)
        (decisions / f".{staged[0][0]}.tmp").write_bytes(b'{"txid": "')
    again = Front(in_process(paths))
    try:
        assert again.client.count({"event": "view"}, as_of=AS_OF) == 0
        assert [s for _, _, s in state(again.shards)] == [[], [], []]
        assert not decisions.is_dir() or not list(decisions.glob("*"))
        again.client.track_events([{"profile": "a1", "event": "view", "ts": AS_OF}])
        assert again.client.count({"event": "view"}, as_of=AS_OF) == 1
    finally:
        again.close()


@pytest.mark.parametrize("when", ["after_prepare", "after_decision"])
def test_a_shard_killed_between_the_phases_applies_the_batch_when_back(
        tmp_path: Path, ray_runtime: Any, when: str) -> None:
    front = Front(ShardSet.on_ray(new_sharded_store(tmp_path / "db", 3)))
    try:
        front.client.upsert_profiles([{"id": f"k{i}"} for i in range(20)])
        pid = front.shards.call(1, "pid")
        setattr(front.writes, when, lambda txid: os.kill(pid, signal.SIGKILL))
        orders = [{"id": f"o{i}", "profile": f"k{i}", "ts": AS_OF, "amount": 10.0 + i}
                  for i in range(20)]
        assert front.client.add_orders(orders) == 20  # acknowledged once every shard has it
        setattr(front.writes, when, None)
        assert front.shards.call(1, "pid") != pid  # Ray restarted it, it applied the batch
        assert front.client.count({"orders": {"all": True}}) == 20
        assert [s for _, _, s in state(front.shards)] == [[], [], []]
    finally:
        front.close()


def test_a_shard_away_after_the_decision_gets_the_batch_before_the_next_one(
        three: Front, monkeypatch: pytest.MonkeyPatch) -> None:
    from bitseg.server import shard_writes
    from bitseg.server.service import ShardUnavailable

    monkeypatch.setattr(shard_writes, "APPLY_PATIENCE", 0.3)
    monkeypatch.setattr(shard_writes, "RETRY_SECONDS", 0.05)
    shards, away = three.shards, {"on": False}
    submit, wait = shards._submit, shards._wait

    def maybe_away(index: int, method: str, args: tuple) -> Any:
        return "away" if away["on"] and index == 1 else submit(index, method, args)

    def answer(index: int, handle: Any) -> Any:
        if handle == "away":
            raise ShardUnavailable("shard 1 is away")
        return wait(index, handle)

    monkeypatch.setattr(shards, "_submit", maybe_away)
    monkeypatch.setattr(shards, "_wait", answer)
    three.writes.after_decision = lambda txid: away.update(on=True)
    first = [{"id": f"w{i}", "n": 1} for i in range(12)]
    with pytest.raises(ClientError) as caught:
        three.client.upsert_profiles([first])
    assert caught.value.code == "UNAVAILABLE" and "is committed" in caught.value.message
    three.writes.after_decision = None
    with pytest.raises(ClientError) as caught:  # shard 1 still away: nothing written
        three.client.upsert_profiles([[{"id": f"w{i}", "n": 2} for i in range(12)]])
    assert "this batch was not written" in caught.value.message
    away["on"] = False
    three.client.upsert_profiles([[{"id": f"w{i}", "n": 3} for i in range(6)]])
    assert three.client.count({"all": True}) == 12  # the first batch, then this one
    assert three.client.count({"field": "n", "op": "eq", "value": 3}) == 6
    assert three.client.count({"field": "n", "op": "eq", "value": 1}) == 6
    assert [s for _, _, s in state(shards)] == [[], [], []]


# ---------------------------------------------------------------------- definitions
def test_definition_changes_reach_every_shard_or_none(three: Front) -> None:
    client, shards = three.client, three.shards
    client.upsert_profiles([{"id": f"s{i}", "n": i} for i in range(30)])
    client.create_segment("big", "materialized", {"field": "n", "op": "gt", "value": 20},
                          as_of=AS_OF)
    made = client.update_segment("big", {"field": "n", "op": "gt", "value": 10}, as_of=AS_OF)
    assert made.size == 19
    assert all(i.rule == {"field": "n", "op": "gt", "value": 10}
               for i in shards.each("get_segment", "big", T0))
    assert client.add_tags("big", ["x", "y"]).tags == ["x", "y"]
    assert client.remove_tags("big", ["x"]).tags == ["y"]
    assert all(i.tags == ("y",) for i in shards.each("get_segment", "big", T0))
    point = client.record_segment_size("big", as_of=AS_OF)
    assert point.size == 19 and point.cause == "record"
    # a segment shard 2 lacks (as a crash between create and its rollback could leave):
    # the change reaches shards 0 and 1, fails on 2, and 0 and 1 are put back
    shards.these([0, 1], "segment_change", [
        ("create", {"name": "half", "kind": "dynamic", "rule": {"all": True}, "as_of": T0})] * 2)
    with pytest.raises(ClientError) as caught:
        client.update_segment("half", {"field": "n", "op": "lt", "value": 15})
    assert caught.value.code == "NOT_FOUND"
    assert [i.rule for i in shards.these([0, 1], "get_segment", [("half", T0)] * 2)] == \
        [{"all": True}] * 2
    with pytest.raises(ClientError):
        client.add_tags("half", ["z"])
    assert [i.tags for i in shards.these([0, 1], "get_segment", [("half", T0)] * 2)] == \
        [(), ()]
    with pytest.raises(ClientError) as caught:  # a bad rule fails on shard 0, alone
        client.update_segment("big", {"field": "n", "op": "nope", "value": 1})
    assert caught.value.code == "INVALID_ARGUMENT"
    assert all(i.rule == {"field": "n", "op": "gt", "value": 10}
               for i in shards.each("get_segment", "big", T0))


# ---------------------------------------------------------------------- end to end
def test_load_addr_through_serve_two_shards(tmp_path: Path, ray_runtime: Any,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import conftest_grpc
    from conftest_grpc import ServerProcess, run_cli

    data = tmp_path / "data"
    assert run_cli("gen", str(data), "--profiles", "300", "--quiet").returncode == 0
    local = run_cli("load", str(data), "--db", str(tmp_path / "local"), "--quiet", "--json")
    assert local.returncode == 0, local.stderr
    new_sharded_store(tmp_path / "db", 2)
    monkeypatch.setattr(conftest_grpc, "START_SECONDS", 120.0)  # Ray starts in seconds
    sharded = ServerProcess(tmp_path / "db", ["--shards", "2"])
    plain = ServerProcess(tmp_path / "local")
    try:
        remote = run_cli("load", str(data), "--addr", sharded.addr, "--batch-size", "120",
                         "--quiet", "--json", timeout=120)
        assert remote.returncode == 0, remote.stderr
        got, want = orjson.loads(remote.stdout), orjson.loads(local.stdout)
        for key in ("profiles_created", "profiles_updated", "events", "orders",
                    "profiles_total"):
            assert got[key] == want[key], key
        with Client(sharded.addr, timeout=30) as one, Client(plain.addr, timeout=30) as two:
            assert replace(one.describe(5), version=0, eval_micros=0) == \
                replace(two.describe(5), version=0, eval_micros=0)
            assert set(one.members({"all": True})) == set(two.members({"all": True}))
    finally:
        assert plain.stop() == 0
        assert sharded.stop() == 0
    assert not list((tmp_path / "db" / DECISIONS).glob("*"))


def test_add_orders_runs_also_in_its_transaction(tmp_path: Path) -> None:
    """Engine.add_orders takes `also` as the other writes do (the front stages an orders
    part with it): it runs inside the batch's transaction, and its failure undoes it."""
    seen = []

    def also(txn: Any, snapshot: Any) -> dict[str, Any]:
        seen.append(snapshot.orders.count)
        return {}

    def fails(txn: Any, snapshot: Any) -> dict[str, Any]:
        raise Crash("after the orders")

    line = {"id": "o1", "profile": "p1", "ts": AS_OF, "amount": 2.5}
    with Engine.open(tmp_path / "e") as engine:
        report = engine.add_orders([line], also=also)
        assert seen == [1] and report.rows == 1
        with pytest.raises(Crash):
            engine.add_orders([{**line, "id": "o2"}], also=fails)
        assert engine.count({"orders": {"all": True}}, as_of=AS_OF) == 1
    with Engine.open(tmp_path / "e") as engine:  # and nothing of it was stored
        assert engine.snapshot.orders.count == 1


def read_cmdline(pid: int) -> bytes | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None


def descendants(pid: int) -> dict[int, bytes]:
    """The processes below `pid` (Linux /proc), with their command lines."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = {}, list(children.get(pid, []))
    while todo:
        child = todo.pop()
        cmdline = read_cmdline(child)
        if cmdline is not None:
            found[child] = cmdline
        todo.extend(children.get(child, []))
    return found


def test_a_front_killed_mid_stream_keeps_every_acknowledged_batch_whole(
        tmp_path: Path, ray_runtime: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """kill -9 of `bitseg serve --shards 2` while a client streams batches of profiles:
    once served again, every acknowledged batch is there, and every batch is on both
    shards or on neither (each shard holds all of its part of a batch, or none)."""
    import threading

    import conftest_grpc
    from conftest_grpc import ServerProcess

    size = 300  # profiles a batch, so a kill often lands inside one
    db = tmp_path / "db"
    paths = new_sharded_store(db, 2)
    monkeypatch.setattr(conftest_grpc, "START_SECONDS", 120.0)
    front = ServerProcess(db, ["--shards", "2"])
    acked: list[int] = []
    failed: list[BaseException] = []

    def batch(k: int) -> list[dict[str, Any]]:
        return [{"id": f"b{k}-{j}", "batch": k} for j in range(size)]

    def stream() -> None:
        with Client(front.addr, timeout=30) as client:
            for k in range(10_000):
                try:
                    client.upsert_profiles([batch(k)])
                except ClientError as exc:
                    failed.append(exc)
                    return
                acked.append(k)

    writer = threading.Thread(target=stream, daemon=True)
    try:
        writer.start()
        for _ in range(600):  # until 6 batches are acknowledged (at most 60 s)
            if len(acked) >= 6 or not writer.is_alive():
                break
            writer.join(0.1)
        left = descendants(front.proc.pid)  # its Ray runtime, which it no longer stops
        front.proc.send_signal(signal.SIGKILL)
        front.proc.wait()
        writer.join(30)
        for pid, cmdline in left.items():  # Ray's agents outlive a killed driver
            if read_cmdline(pid) == cmdline:
                os.kill(pid, signal.SIGKILL)
        assert not writer.is_alive() and failed and len(acked) >= 6
        front = ServerProcess(db, ["--shards", "2"])
        sent = len(acked) + 1  # the last one may have been cut short
        with Client(front.addr, timeout=30) as client:
            found = [client.count({"field": "batch", "op": "eq", "value": k})
                     for k in range(sent + 1)]
        assert found[:len(acked)] == [size] * len(acked)
        assert found[len(acked)] in (0, size) and found[sent] == 0
        assert front.stop() == 0
    finally:
        front.kill()
    assert not list((db / DECISIONS).glob("*"))
    for s, path in enumerate(paths):  # each shard: all of its part of a batch, or none
        with Engine.open(path) as engine:
            for k in range(sent):
                mine = sum(shard_of(f"b{k}-{j}", 2) == s for j in range(size))
                held = engine.count({"field": "batch", "op": "eq", "value": k})
                assert held == (mine if found[k] else 0), (s, k)


# ---------------------------------------------------------------------- answers kept
def test_a_part_applied_before_answers_again_as_it_did(tmp_path: Path) -> None:
    """A shard that applied its part and died before answering is asked again: it gives
    the numbers it gave then (the last KEPT_APPLIED parts' answers), not nothing."""
    from bitseg.server import shard_writes

    with Engine.open(tmp_path / "s") as engine:
        answers = []
        for k in range(shard_writes.KEPT_APPLIED + 3):
            txid = f"{k:020d}-t"
            payload = [[orjson.dumps({"id": f"p{k}-{i}"}).decode() for i in range(3)]]
            shard_writes.prepare(engine, txid, "profiles", payload)
            answers.append(shard_writes.finish(engine, txid, True, None))
            assert answers[-1][:2] == (3, 0)
            assert shard_writes.finish(engine, txid, True, None) == answers[-1]
        first, last = f"{0:020d}-t", f"{shard_writes.KEPT_APPLIED + 2:020d}-t"
        assert shard_writes.finish(engine, first, True, None) is None  # no longer kept
        assert shard_writes.finish(engine, last, True, None) == answers[-1]
        assert shard_writes.finish(engine, last, False, None) is None  # a drop: nothing
        with engine.store.read() as txn:
            kept = list(engine.store.keys(txn, "meta", shard_writes.APPLIED.encode()))
        assert len(kept) == shard_writes.KEPT_APPLIED


def test_a_shard_that_died_after_applying_still_counts_in_the_reply(
        three: Front, monkeypatch: pytest.MonkeyPatch) -> None:
    from bitseg.server.service import ShardUnavailable

    shards, lost = three.shards, {"left": 1}
    wait = shards._wait

    def answer_lost(index: int, handle: Any) -> Any:
        found = wait(index, handle)  # shard 1 applied its part ...
        if index == 1 and lost["left"] and getattr(handle, "method", None) == "finish":
            lost["left"] -= 1
            raise ShardUnavailable("shard 1 died before it answered")  # ... then died
        return found

    monkeypatch.setattr(shards, "_wait", answer_lost)
    done = three.client.upsert_profiles([[{"id": f"a{i}"} for i in range(30)]])
    assert lost["left"] == 0, "the finish of shard 1 was never cut"
    assert (done.created, done.updated) == (30, 0)
    assert three.client.count({"all": True}) == 30
