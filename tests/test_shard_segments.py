"""Segments over shards (server/shard_segments.py): segments with a `top` rule created,
refreshed, updated and split over 2 and 3 shards as one plain store does them, and the
scheduled refresh run by the front.

The stores are in process (ShardSet.embedded): the front's logic is the same on Ray.
The values of `n` are few, so every top cut falls among tied profiles and the tie-break
(external id, ascending) decides across shards.
"""

from __future__ import annotations

import random
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import timedelta
from fractions import Fraction
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_shards import AS_OF, T0, Front, build_store, iso

from bitseg import Client, ClientError
from bitseg.index.engine import Engine
from bitseg.index.segments import RefreshScheduler, Segments, open_segments
from bitseg.index.templates import load_catalogue
from bitseg.loaders.split import shard_folder
from bitseg.server.app import create_server
from bitseg.server.console import Api, ConsoleServer
from bitseg.server.service import SegmentsServicer, ShardUnavailable
from bitseg.server.shard_reads import merge_top, resolve_tops
from bitseg.server.shard_segments import refresh_scheduler
from bitseg.server.shard_service import ShardedServicer
from bitseg.server.shards import ShardSet, start_ray

PROFILES = 48
BEST = {"top": {"n": 5, "by": "n"}}
# the 4 lowest `n` among viewers, then the best 3 of those by `x`, with others at the cut
NESTED = {"top": {"n": 3, "by": "x", "of": {"top": {"n": 9, "by": "n", "order": "asc",
                                                       "of": {"event": "view"}}}}}
LATER = iso(T0 + timedelta(days=1))


def records() -> list[dict[str, Any]]:
    """Profiles whose `n` takes 4 values (ties at every cut), ids text and numbers."""
    people = []
    for i in range(PROFILES):
        person: dict[str, Any] = {"id": i if i % 4 == 0 else f"p{i}"}
        if i % 7:
            person["n"] = (i * 5) % 4
            person["x"] = round(((i * 7) % 5) / 2, 1)
        people.append(person)
    return people


def events() -> list[dict[str, Any]]:
    return [{"profile": p["id"], "event": "view", "ts": iso(T0 - timedelta(hours=i + 1))}
            for i, p in enumerate(records()) if i % 3]


class Plain:
    """One plain store (no shards) served on port 0, for the expected answers."""

    def __init__(self, path: Path) -> None:
        self.engine = Engine.open(path)
        self.engine.upsert_profiles(records())
        self.engine.track_events(events())
        self.segments: Segments = open_segments(self.engine)
        self.server, port = create_server(self.engine, "127.0.0.1:0", segments=self.segments)
        self.server.start()
        self.client = Client(f"127.0.0.1:{port}", timeout=60)

    def close(self) -> None:
        self.client.close()
        self.server.stop(None)
        self.engine.close()


def sharded(root: Path, shards: int) -> Front:
    data = root / "data"
    data.mkdir(exist_ok=True)
    (data / "schema.json").write_bytes(orjson.dumps(
        {"profiles": {"n": "int", "x": "float"}, "events": {}}))
    for name, rows in (("profiles", records()), ("events", events())):
        (data / f"{name}.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    build_store(data, root / f"db{shards}", shards)
    front = Front(ShardSet.embedded([str(shard_folder(root / f"db{shards}", s))
                                     for s in range(shards)]))
    front.shards.unify_schema()
    return front


@pytest.fixture
def plain(tmp_path: Path) -> Iterator[Plain]:
    found = Plain(tmp_path / "plain")
    yield found
    found.close()


@pytest.fixture(params=[2, 3])
def front(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Front]:
    found = sharded(tmp_path, request.param)
    assert found.shards.count == request.param
    yield found
    found.close()


def state(client: Client, names: list[str]) -> dict[str, Any]:
    """Each segment's size and members, and the entries and exits recorded for it."""
    found = {}
    for name in names:
        moved = {event: client.count({"event": event, "where": {
            "field": "segment", "op": "eq", "value": name}}, as_of=LATER)
            for event in ("segment_entered", "segment_exited")}
        found[name] = (client.get_segment(name).size,
                       sorted(client.members(segment=name, as_of=LATER)), moved)
    return found


def test_the_cuts_fall_among_ties(plain: Plain) -> None:
    client = plain.client
    at_most = client.count({"field": "n", "op": "gt", "value": 2})
    assert client.count(BEST) == 5 < at_most  # the ids decide which 5 of the 3s
    low = client.count({"and": [{"event": "view"}, {"field": "n", "op": "lt", "value": 1}]})
    assert 4 < low < 9  # `low` cuts among the 0s, NESTED's inner top among the 1s


def test_top_segments_over_shards_are_one_stores(plain: Plain, front: Front) -> None:
    names = ["best", "low", "nested"]
    for client in (plain.client, front.client):
        made = client.create_segment("best", "materialized", BEST, as_of=AS_OF)
        assert (made.size, made.entered) == (5, 5)
        client.create_segment("low", "static", {"top": {"n": 4, "by": "n", "order": "asc",
                                                        "of": {"event": "view"}}},
                              profile_ids=["p1"], as_of=AS_OF)
        client.create_segment("nested", "materialized", {"and": [NESTED, {"not": BEST}]},
                              as_of=AS_OF)
    assert state(front.client, names) == state(plain.client, names)
    # writes that change who is in the top 5: raised, lowered, deleted
    changed = [{"id": "p2", "n": 3}, {"id": "p5", "n": 9}, {"id": 8, "n": -1},
               {"id": "p13", "n": 3}]
    for client in (plain.client, front.client):
        client.upsert_profiles(changed)
        client.delete_profiles(["p3"])
    found = {client: [client.refresh_segment(n, as_of=AS_OF) for n in ("best", "nested")]
             for client in (plain.client, front.client)}
    assert [(r.size, r.entered, r.exited) for r in found[front.client]] == \
        [(r.size, r.entered, r.exited) for r in found[plain.client]]
    assert found[plain.client][0].entered and found[plain.client][0].exited
    assert state(front.client, names) == state(plain.client, names)
    # an update to another top rule recounts at once; the summed change is one store's
    for client in (plain.client, front.client):
        client.update_segment("best", {"top": {"n": 7, "by": "x", "order": "asc"}},
                              as_of=AS_OF)
        client.update_segment("nested", NESTED, as_of=AS_OF)
    assert state(front.client, names) == state(plain.client, names)
    assert [p.size for p in front.client.segment_history("best")] == \
        [p.size for p in plain.client.segment_history("best")]


def test_a_split_of_a_top_rule_over_shards_is_one_stores(plain: Plain, front: Front
                                                         ) -> None:
    into = {"a": 50, "b": 30, "rest": 20}
    made = {}
    for client in (plain.client, front.client):
        pieces = client.split_segment("cohort", "s1", into, rule=NESTED, as_of=AS_OF)
        assert [p.name for p in pieces] == ["cohort-a", "cohort-b", "cohort-rest"]
        made[client] = [(p.size, p.entered) for p in pieces]
        client.create_segment("top12", "materialized", {"top": {"n": 12, "by": "n"}},
                              as_of=AS_OF)
        client.split_segment("top12", "s2", into, as_of=AS_OF)  # a top segment by name
    assert made[front.client] == made[plain.client]
    assert sum(size for size, _ in made[plain.client]) == 3
    names = ["cohort-a", "cohort-b", "cohort-rest", "top12-a", "top12-b", "top12-rest"]
    assert state(front.client, names) == state(plain.client, names)


def test_a_dynamic_top_segment_is_one_stores(plain: Plain, front: Front) -> None:
    """Created, and updated to a top rule (its reads: test_shard_tops.py)."""
    for client in (plain.client, front.client):
        client.create_segment("every", "dynamic", {"all": True})
        client.create_segment("dyn", "dynamic", BEST)
        client.update_segment("every", NESTED)
    for name in ("dyn", "every"):
        found, expected = (c.get_segment(name) for c in (front.client, plain.client))
        assert (found.kind, found.rule, found.size) == (expected.kind, expected.rule,
                                                        expected.size)
        assert sorted(front.client.members(segment=name)) == \
            sorted(plain.client.members(segment=name))


def test_a_failed_top_update_puts_every_shard_back(front: Front) -> None:
    client, shards = front.client, front.shards
    client.create_segment("best", "materialized", BEST, as_of=AS_OF)
    last = shards.count - 1
    sizes = [shards.call(i, "get_segment", "best", T0).size for i in range(last)]
    shards.call(last, "delete_segment", "best")  # as a crash could leave it: fails there
    with pytest.raises(ClientError) as caught:
        client.update_segment("best", {"top": {"n": 2, "by": "x"}}, as_of=AS_OF)
    assert caught.value.code == "NOT_FOUND"
    for i in range(last):  # updated, then put back with the old rule's top sets
        info = shards.call(i, "get_segment", "best", T0)
        assert (info.rule, info.size) == (BEST, sizes[i])


# ---------------------------------------------------------------------- the schedule
def wall_us() -> int:
    return time.time_ns() // 1000


def test_the_front_refreshes_due_segments_as_one_store(plain: Plain, front: Front) -> None:
    schedules = {plain.client: RefreshScheduler(plain.segments),
                 front.client: refresh_scheduler(front.shards, 1.0)}
    for client in schedules:
        client.create_segment("best", "materialized", BEST, refresh_every=5)
        client.create_segment("hourly", "materialized", {"event": "view"}, refresh_every=3600)
        client.create_segment("once", "materialized", {"event": "view"})
    now = wall_us()
    for client, scheduler in schedules.items():
        assert scheduler.run_once(now) == []  # refreshed at creation: none due yet
        client.upsert_profiles([{"id": "p2", "n": 9}, {"id": "p6", "n": 8}])
    for client, scheduler in schedules.items():  # a top rule, chosen over every shard
        assert scheduler.run_once(now + 6_000_000) == ["best"]
        assert {"p2", "p6"} <= set(client.members(segment="best"))
    names = ["best", "hourly", "once"]
    assert state(front.client, names) == state(plain.client, names)
    assert [(p.size, p.cause) for p in front.client.segment_history("best")] == \
        [(p.size, p.cause) for p in plain.client.segment_history("best")]
    # a schedule changed or removed by UpdateSegment, on every shard
    front.client.update_segment("hourly", refresh_every=1)
    front.client.update_segment("best", refresh_every=0)
    later = now + 7_000_000
    assert schedules[front.client].run_once(later) == ["hourly"]
    assert [s.refresh_every for s in front.shards.each("get_segment", "best", T0)] == \
        [None] * front.shards.count


def test_a_segment_due_on_one_shard_only_is_refreshed_on_every_shard(front: Front) -> None:
    client, shards = front.client, front.shards
    client.create_segment("best", "materialized", BEST, refresh_every=5)
    now = wall_us()
    # the last shard's refresh is older (as when it failed there): due there alone
    shards.call(shards.count - 1, "segment_change", "refresh_scheduled",
                {"name": "best", "now_us": now - 10_000_000}, BEST,
                resolve_tops(shards, BEST, AS_OF))  # (a shard never takes its own top)
    client.upsert_profiles([{"id": "p2", "n": 9}])
    assert refresh_scheduler(shards, 1.0).run_once(now) == ["best"]
    assert "p2" in set(client.members(segment="best"))
    assert client.get_segment("best").size == 5


def test_the_front_refreshes_on_its_own_clock(front: Front) -> None:
    client = front.client
    client.create_segment("best", "materialized", BEST, refresh_every=1)
    client.upsert_profiles([{"id": "p2", "n": 9}])
    scheduler = refresh_scheduler(front.shards, 0.05).start()
    try:
        deadline = time.monotonic() + 30
        while "p2" not in set(client.members(segment="best")):
            assert time.monotonic() < deadline, "no scheduled refresh in 30 s"
            time.sleep(0.05)
    finally:
        scheduler.stop()
    assert client.get_segment("best").size == 5


def test_serve_shards_refreshes_materialized_segments_on_schedule(tmp_path: Path) -> None:
    """`bitseg serve --shards 1` (in process: the same front, without Ray's start)."""
    from conftest_grpc import ServerProcess, run_cli

    sharded(tmp_path, 1).close()
    server = ServerProcess(tmp_path / "db1", ["--shards", "1"])
    try:
        addr = ["--addr", server.addr]
        made = run_cli("segment", "create", "best", "--materialized", "--refresh-every", "1",
                       "--rule", orjson.dumps(BEST).decode(), *addr)
        assert made.returncode == 0, made.stderr
        with Client(server.addr, timeout=60) as client:
            client.upsert_profiles([{"id": "p2", "n": 9}])
            deadline = time.monotonic() + 30
            while "p2" not in set(client.members(segment="best")):
                assert time.monotonic() < deadline, server.stderr()
                time.sleep(0.1)
    finally:
        assert server.stop() == 0


# ---------------------------------------------------------------------- --http, --metrics-port
def post(url: str, path: str, body: object) -> tuple[int, bytes]:
    """POST url+path with a JSON body: (status, the answer's bytes)."""
    request = urllib.request.Request(url + path, data=orjson.dumps(body), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def without_timing(answer: bytes) -> Any:
    found = orjson.loads(answer)
    found.pop("eval_micros", None)
    return found


def test_the_console_over_shards_answers_as_one_store(plain: Plain, front: Front) -> None:
    catalogue = load_catalogue(None)
    consoles = [ConsoleServer(Api(servicer), "127.0.0.1", 0).start() for servicer in (
        SegmentsServicer(plain.engine, plain.segments, catalogue),
        ShardedServicer(front.shards, catalogue))]
    try:
        one, many = (f"http://127.0.0.1:{c.port}/" for c in consoles)
        for rule in (BEST, NESTED, {"event": "view"}, {"not": {"field": "n", "op": "eq",
                                                              "value": 3}}):
            asked = {"rule_json": orjson.dumps(rule).decode(), "as_of": AS_OF}
            for method in ("Count", "Explain"):
                expected = post(one, "api/v1/" + method, asked)
                assert expected[0] == 200, expected
                found = post(many, "api/v1/" + method, asked)
                assert (found[0], without_timing(found[1])) == \
                    (200, without_timing(expected[1])), method
            members = [post(url, "export", {"rule_json": asked["rule_json"],
                                            "fields": ["n"], "format": "jsonl"})
                       for url in (one, many)]
            assert members[0][0] == members[1][0] == 200
            assert sorted(members[1][1].splitlines()) == sorted(members[0][1].splitlines())
        status, made = post(many, "api/v1/CreateSegment", {
            "name": "best", "kind": "SEGMENT_KIND_MATERIALIZED",
            "rule_json": orjson.dumps(BEST).decode()})
        assert status == 200 and int(orjson.loads(made)["size"]) == 5, made
    finally:
        for console in consoles:
            console.stop()


def test_serve_shards_with_the_console_and_metrics(tmp_path: Path) -> None:
    """`bitseg serve --shards 1 --http 0 --metrics-port 0`: the console's API and the
    front's call metrics (one shard is served in process: the same front)."""
    from conftest_grpc import ServerProcess

    sharded(tmp_path, 1).close()
    server = ServerProcess(tmp_path / "db1", ["--shards", "1", "--http", "0",
                                              "--metrics-port", "0"])
    try:
        console = re.search(r"bitseg console on (http://\S+/)", server.stderr())
        scraped = re.search(r"bitseg metrics on (http://\S+/metrics)", server.stderr())
        assert console and scraped, server.stderr()
        status, counted = post(console.group(1), "api/v1/Count",
                               {"rule_json": orjson.dumps(BEST).decode()})
        assert (status, int(orjson.loads(counted)["count"])) == (200, 5)
        with Client(server.addr, timeout=60) as client:
            assert client.count({"event": "view"}) == 32
        with urllib.request.urlopen(scraped.group(1), timeout=10) as page:
            samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                       for family in text_string_to_metric_families(page.read().decode())
                       for s in family.samples}
        count = ("bitseg_rpc_requests_total", (("code", "OK"), ("method", "Count"),
                                               ("service", "bitseg.v1.Segments")))
        assert samples[count] == 1  # the gRPC call; the console's calls are not gRPC's
        assert ("bitseg_evaluation_seconds_count", (("method", "Count"),)) in samples
        assert not any(name == "bitseg_profiles" for name, _ in samples)  # in the shards
    finally:
        assert server.stop() == 0


# ---------------------------------------------------------------------- on Ray
@pytest.mark.slow
def test_top_segments_on_ray_are_one_stores(plain: Plain, tmp_path: Path) -> None:
    """The same changes through 2 shard actors (what crosses to them is pickled)."""
    ray = pytest.importorskip("ray")  # the dev extra installs it (pyproject: shards)
    mine = not ray.is_initialized()  # another module's runtime may still be up
    if mine:
        start_ray(ray, num_cpus=2)
    try:
        sharded(tmp_path, 2).close()
        front = Front(ShardSet.on_ray([str(shard_folder(tmp_path / "db2", s))
                                       for s in range(2)]))
        try:
            names = ["best", "nested", "cohort-a", "cohort-b"]
            for client in (plain.client, front.client):
                client.create_segment("best", "materialized", BEST, as_of=AS_OF,
                                      refresh_every=60)
                client.create_segment("nested", "static", NESTED, as_of=AS_OF)
                client.split_segment("cohort", "s", {"a": 50, "b": 50}, rule=NESTED,
                                     as_of=AS_OF)
                client.upsert_profiles([{"id": "p2", "n": 9}])
                client.update_segment("best", {"top": {"n": 3, "by": "x"}}, as_of=AS_OF)
            assert state(front.client, names) == state(plain.client, names)
            later = wall_us() + 61_000_000
            assert refresh_scheduler(front.shards, 1.0).run_once(later) == ["best"]
            assert RefreshScheduler(plain.segments).run_once(later) == ["best"]
            assert state(front.client, names) == state(plain.client, names)
        finally:
            front.close()
    finally:
        if mine:
            ray.shutdown()


def test_a_shard_that_does_not_answer_skips_a_tick_of_the_schedule(front: Front) -> None:
    front.client.create_segment("best", "materialized", BEST, refresh_every=1)
    answering = front.shards

    class Away:
        count = answering.count

        def each(self, method: str, *args: object) -> object:
            raise ShardUnavailable("shard 1 (…/shard-1) is unavailable: restarting")

    scheduler = refresh_scheduler(Away(), 1.0)
    later = wall_us() + 2_000_000
    assert scheduler.run_once(later) == []  # no raise: the ticker's thread goes on
    scheduler.segments.shards = answering  # back
    assert scheduler.run_once(later) == ["best"]


def test_the_merge_of_top_candidates_is_exact_at_any_scale() -> None:
    """shard_reads.merge_top compares values as whole numbers at one scale (fast): the
    same ranking as the exact values, beyond a float's precision, ties by id."""
    rng = random.Random(5)
    big = 2**70
    found = [[(rng.choice([big + rng.randint(0, 3),
                           Fraction(big * 100 + rng.randint(0, 400), 100),
                           Fraction(rng.randint(-5, 5), rng.choice([1, 10, 1000])),
                           rng.randint(-5, 5)]), f"u{rng.randint(0, 9)}{i}", i)
              for i in range(60)] for _ in range(3)]
    every = [(value, external, shard, dense) for shard, rows in enumerate(found)
             for value, external, dense in rows]
    for order, n in (("desc", 1), ("desc", 25), ("asc", 40), ("asc", 500)):
        kept = sorted(every, key=lambda c: (-c[0] if order == "desc" else c[0], c[1]))[:n]
        expected = [sorted(d for _, _, s, d in kept if s == shard) for shard in range(3)]
        assert merge_top(found, n, order) == expected, (order, n)
