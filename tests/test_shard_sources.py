"""{"sql": ...} rules over shards (server/shard_sources.py) against a real PostgreSQL
(tests/conftest_pg.py): 1, 2 and 3 shards answer as one plain store built from the same
records and asking the same table, for reads, segments and errors; and `bitseg serve
--shards 2 --sources F` answers the CLI.

The fronts here are in process (ShardSet.embedded): the calls, the answers the front
sends and a shard's request for one it lacks are the same on Ray; the end-to-end test
runs its 2 shards on Ray.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest_pg import postgres as pg_fixture  # noqa: F401  (the `postgres` fixture)
from test_shard_segments import events, records, sharded
from test_shards import AS_OF, Front

from bitseg import Client, ClientError
from bitseg.index.engine import Engine
from bitseg.index.segments import open_segments
from bitseg.index.sqlrule import NoSources
from bitseg.loaders.split import shard_folder
from bitseg.server.app import create_server
from bitseg.server.shards import ShardSet, start_ray
from bitseg.server.sources import Source, Sources

IDS = [str(r["id"]) for r in records()]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def source(postgres: Any) -> dict[str, Source]:
    return {"crm": Source("crm", postgres.readonly_dsn, connect_timeout=1.0, ttl=60.0)}


class Plain:
    """One plain store with the sources, served on port 0: the expected answers."""

    def __init__(self, path: Path, postgres: Any, clock: Clock) -> None:
        self.engine = Engine.open(path)
        self.engine.declare_schema({"profiles": {"n": "int", "x": "float"}})
        self.engine.upsert_profiles(records())
        self.engine.track_events(events())
        self.sources = Sources(source(postgres), lambda: self.engine.ids, clock)
        self.engine.set_external(self.sources)
        self.server, port = create_server(self.engine, "127.0.0.1:0",
                                          segments=open_segments(self.engine))
        self.server.start()
        self.client = Client(f"127.0.0.1:{port}", timeout=60)

    def close(self) -> None:
        self.client.close()
        self.server.stop(None)
        self.sources.close()
        self.engine.close()


@pytest.fixture()
def clock() -> Clock:
    return Clock()


@pytest.fixture()
def table(postgres: Any) -> Iterator[str]:
    name = f"crm_{secrets.token_hex(4)}"
    postgres.sql(f"CREATE TABLE {name} (id text, tier text)")
    rows = [(pid, "gold" if i % 3 == 0 else "silver") for i, pid in enumerate(IDS) if i % 2]
    rows += [("ghost", "gold"), ("p3", "gold"), ("8", "silver")]  # unknown; dup; number
    for pid, tier in rows:
        postgres.sql(f"INSERT INTO {name} (id, tier) VALUES (%s, %s)", pid, tier)
    yield name
    postgres.sql(f"DROP TABLE IF EXISTS {name}")


@pytest.fixture()
def plain(tmp_path: Path, postgres: Any, clock: Clock) -> Iterator[Plain]:
    found = Plain(tmp_path / "plain", postgres, clock)
    yield found
    found.close()


@pytest.fixture(params=[1, 2, 3])
def front(request: pytest.FixtureRequest, tmp_path: Path, postgres: Any,
          clock: Clock) -> Iterator[Front]:
    found = sharded(tmp_path, request.param)
    assert found.shards.count == request.param
    found.shards.sql.sources = Sources(source(postgres), lambda: None, clock)
    yield found
    found.shards.sql.close()
    found.close()


def sql(table: str, tier: str = "gold") -> dict[str, Any]:
    return {"sql": {"source": "crm", "query": f"SELECT id FROM {table} WHERE tier = %s",
                    "params": [tier]}}


def rules(table: str) -> list[dict[str, Any]]:
    gold = sql(table)
    return [gold,
            {"and": [gold, {"field": "n", "op": "gte", "value": 1}]},
            {"or": [sql(table, "silver"), {"event": "view"}]},
            {"not": gold},
            {"and": [{"not": gold}, sql(table, "silver")]},
            {"top": {"n": 4, "by": "n", "of": {"or": [gold, sql(table, "silver")]}}}]


def answers(client: Client, rule: Any = None, segment: str | None = None) -> dict[str, Any]:
    """Everything a client can ask about one rule or segment, order-free."""
    asked = {"rule": rule} if segment is None else {"segment": segment}
    explained = client.explain(**asked, as_of=AS_OF)
    return {"count": client.count(**asked, as_of=AS_OF),
            "members": sorted(client.members(**asked, as_of=AS_OF)),
            "is_member": [client.is_member(p, **asked, as_of=AS_OF) for p in IDS],
            "batch": client.is_member_many([*IDS, "nobody"], **asked, as_of=AS_OF).member,
            "explain": explained.text, "sentence": explained.sentence}


def failure(call: Any) -> tuple[str, str]:
    with pytest.raises(ClientError) as caught:
        call()
    return caught.value.code, caught.value.message


def test_reads_with_sql_leaves_answer_as_one_store(plain: Plain, front: Front,
                                                   table: str) -> None:
    for rule in rules(table):
        expected = answers(plain.client, rule)
        assert 0 < expected["count"] < len(IDS), rule
        assert answers(front.client, rule) == expected, rule
    assert front.client.sources() == plain.client.sources()
    assert [s.answers for s in front.client.sources()] == [True]


def test_one_query_answers_every_shard_of_one_call(front: Front, table: str,
                                                   clock: Clock) -> None:
    sources = front.shards.sql.sources
    ran: list[tuple[str, tuple[Any, ...]]] = []
    fetch = sources._fetch
    sources._fetch = lambda rule, *rest: ran.append((rule.query, rule.params)) or \
        fetch(rule, *rest)
    gold, silver = sql(table), sql(table, "silver")
    front.client.create_segment("dyn", "dynamic", {"and": [gold, {"event": "view"}]})
    front.client.create_segment("mat", "materialized", silver, as_of=AS_OF)
    asks = [lambda c: c.count({"or": [{"segment": "dyn"}, silver]}, as_of=AS_OF),
                lambda c: c.explain({"not": gold}, as_of=AS_OF),
                lambda c: list(c.members({"and": [gold, {"segment": "dyn"}]}, page_size=2)),
                lambda c: c.segments_of_many(IDS, as_of=AS_OF),
                lambda c: c.refresh_segment("mat", as_of=AS_OF)]
    for ask in asks:
        clock.now += 61  # every answer cached before lapses
        ran.clear()
        ask(front.client)
        assert sorted(ran) == sorted(set(ran)), (asks.index(ask), ran)  # once, every shard


def test_a_shard_maps_an_answer_once_and_asks_again_for_one_it_lost(
        plain: Plain, front: Front, table: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import bitseg.index.sqlrule as sqlrule

    mapped: list[int] = []
    resolve = sqlrule.resolve_ids
    monkeypatch.setattr(sqlrule, "resolve_ids",
                        lambda ids, idmap: mapped.append(len(ids)) or resolve(ids, idmap))
    rule = {"or": [sql(table), {"field": "n", "op": "eq", "value": 3}]}
    expected = plain.client.count(rule, as_of=AS_OF)
    mapped.clear()
    assert front.client.count(rule, as_of=AS_OF) == expected
    assert len(mapped) == front.shards.count  # each shard mapped its part
    mapped.clear()
    assert front.client.count(rule, as_of=AS_OF) == expected  # a new RPC, the same answer
    assert mapped == []  # sent by its number: nothing sent or mapped again
    for client in (plain.client, front.client):  # a new profile the table names
        client.upsert_profiles([{"id": "ghost", "n": 1}])
    expected = plain.client.count(rule, as_of=AS_OF)
    mapped.clear()
    assert front.client.count(rule, as_of=AS_OF) == expected
    assert sum(mapped) <= 1 + front.shards.count  # only the ids unknown before
    with monkeypatch.context() as lost:  # a shard that lost its answers (restarted)
        lost.setattr(sqlrule.KeptAnswers, "get", lambda self, number, ids: None)
        assert front.client.count(rule, as_of=AS_OF) == expected


def test_sql_segments_created_read_and_refreshed_as_one_store(plain: Plain, front: Front,
                                                              table: str, postgres: Any,
                                                              clock: Clock) -> None:
    dynamic = {"and": [sql(table), {"field": "n", "op": "gte", "value": 1}]}
    using = {"or": [{"segment": "dyn"}, {"field": "n", "op": "eq", "value": 0}]}

    def state(client: Client) -> dict[str, Any]:
        return {"dyn": answers(client, segment="dyn"), "mat": answers(client, segment="mat"),
                "best": answers(client, segment="best"),
                "using": answers(client, using),
                # an sql leaf beside dynamic top segments: one of an sql segment, one not
                "mixed": answers(client, {"and": [sql(table, "silver"), {"segment": "best"}]}),
                "beside": answers(client, {"or": [sql(table), {"segment": "topn"}]}),
                "sizes": {s.name: s.size for s in client.list_segments()},
                "of": client.segments_of_many(IDS, as_of=AS_OF).segments,
                "one": [client.segments_of(p, as_of=AS_OF) for p in IDS[:6]]}

    for client in (plain.client, front.client):
        client.create_segment("dyn", "dynamic", dynamic)
        made = client.create_segment("mat", "materialized", sql(table, "silver"), as_of=AS_OF)
        assert made.size > 0
        client.create_segment("uses", "dynamic", using)  # its answers through "dyn"
        client.create_segment("best", "dynamic", {"top": {"n": 3, "by": "n", "of": {
            "segment": "dyn"}}})  # top sets chosen over the shards, of an sql segment
        client.create_segment("topn", "dynamic", {"top": {"n": 4, "by": "n"}})
    assert state(front.client) == state(plain.client)
    postgres.sql(f"UPDATE {table} SET tier = 'silver' WHERE tier = 'gold' AND id LIKE '%1%'")
    postgres.sql(f"INSERT INTO {table} (id, tier) VALUES ('p2', 'silver'), ('p4', 'gold')")
    postgres.sql(f"DELETE FROM {table} WHERE id = 'p5'")
    before = state(plain.client)
    clock.now += 61  # past the ttl: the cached answers lapse on both
    after = state(plain.client)
    assert after["dyn"]["count"] != before["dyn"]["count"]
    n = {str(r["id"]): r.get("n") for r in records()}  # the top 3 by n of dyn, naively
    naive = sorted(after["dyn"]["members"], key=lambda p: (-n[p], p.encode()))[:3]
    assert after["best"]["members"] == sorted(naive), "one store's top of an sql segment"
    assert state(front.client) == after
    refreshed = [c.refresh_segment("mat", as_of=AS_OF) for c in (plain.client, front.client)]
    assert (refreshed[0].entered, refreshed[0].exited) != (0, 0)
    assert [(r.size, r.entered, r.exited) for r in refreshed[1:]] == \
        [(refreshed[0].size, refreshed[0].entered, refreshed[0].exited)]
    moved = [{"event": e, "where": {"field": "segment", "op": "eq", "value": "mat"}}
             for e in ("segment_entered", "segment_exited")]
    assert [sorted(front.client.members(m)) for m in moved] == \
        [sorted(plain.client.members(m)) for m in moved]
    assert state(front.client) == state(plain.client)
    acted = [c.bulk_action("set", "x", 9.5, rule={"or": [{"segment": "uses"}, sql(table)]},
                           as_of=AS_OF) for c in (plain.client, front.client)]
    assert [(a["members"], a["changed"]) for a in acted[1:]] == \
        [(acted[0]["members"], acted[0]["changed"])]
    assert answers(front.client, {"field": "x", "op": "eq", "value": 9.5}) == \
        answers(plain.client, {"field": "x", "op": "eq", "value": 9.5})


def test_errors_are_one_stores_words(plain: Plain, front: Front, table: str) -> None:
    clients = (plain.client, front.client)
    bad = [{"and": [{"field": "n", "op": "gte", "value": 0},
                    {"sql": {"source": "crm", "query": f"SELECT id, tier FROM {table}"}}]},
           {"or": [{"sql": {"source": "nope", "query": "SELECT 1"}}, sql(table)]},
           {"sql": {"source": "crm", "query": "SELECT id FROM no_such_table"}}]
    for rule in bad:
        said = [failure(lambda c=c, r=rule: c.count(r)) for c in clients]
        assert said[0][0] == "INVALID_ARGUMENT" and said[1] == said[0], said
    sources, ran = front.shards.sql.sources, []
    fetch = sources._fetch
    sources._fetch = lambda rule, *rest: ran.append(rule.query) or fetch(rule, *rest)
    refused = {"not": {"sql": {"source": "crm", "query": f"SELECT id FROM {table}; "
                                                          f"DELETE FROM {table}"}}}
    said = [failure(lambda c=c: c.count(refused)) for c in clients]
    assert said[0][0] == "INVALID_ARGUMENT" and said[1] == said[0], said
    assert ran == []  # refused by the parser's check: never sent to the database
    said = [failure(lambda c=c: c.create_segment("bad", "dynamic", bad[0])) for c in clients]
    assert said[0][0] == "INVALID_ARGUMENT" and said[1] == said[0], said
    # without --sources: the same words as a plain store without them
    plain.engine.set_external(NoSources())
    front.shards.sql.sources = None
    said = [failure(lambda c=c: c.count({"and": [{"all": True}, sql(table)]}))
            for c in clients]
    assert said[0][0] == "INVALID_ARGUMENT" and said[1] == said[0]
    assert front.client.sources() == [] == plain.client.sources()


@pytest.mark.parametrize("front", [3], indirect=True)
def test_a_source_down_is_unavailable_naming_it_and_changes_nothing(
        plain: Plain, front: Front, table: str, postgres: Any, clock: Clock) -> None:
    clients = (plain.client, front.client)
    for client in clients:
        client.create_segment("mat", "materialized", sql(table), as_of=AS_OF)
    sizes = [c.get_segment("mat").size for c in clients]
    clock.now += 61
    postgres.stop()
    try:
        for client in clients:
            code, message = failure(lambda c=client: c.count(sql(table)))
            assert code == "UNAVAILABLE" and "source 'crm' is unavailable" in message
            code, message = failure(lambda c=client: c.refresh_segment("mat", as_of=AS_OF))
            assert code == "UNAVAILABLE" and "source 'crm' is unavailable" in message
        assert [c.get_segment("mat").size for c in clients] == sizes  # nothing changed
        assert [s.answers for s in front.client.sources()] == [False]
    finally:
        postgres.start()
    assert answers(front.client, sql(table)) == answers(plain.client, sql(table))


@pytest.fixture(scope="module")
def ray_runtime() -> Iterator[Any]:
    import ray

    start_ray(ray, num_cpus=2)
    yield ray
    ray.shutdown()


def test_on_ray_as_one_store_and_by_the_fast_path_once_every_shard_holds_the_answer(
        tmp_path: Path, plain: Plain, table: str, postgres: Any, clock: Clock,
        ray_runtime: Any) -> None:
    sharded(tmp_path, 2).close()
    shards = ShardSet.on_ray([str(shard_folder(tmp_path / "db2", s)) for s in range(2)])
    front = Front(shards)
    shards.sql.sources = Sources(source(postgres), lambda: None, clock)
    try:
        rule = {"and": [sql(table), {"field": "n", "op": "gte", "value": 1}]}
        assert answers(front.client, rule) == answers(plain.client, rule)
        expected = plain.client.count(rule, as_of=AS_OF)
        sent = shards.fast.real.batches
        for _ in range(3):
            assert front.client.count(rule, as_of=AS_OF) == expected
        assert shards.fast.real.batches == sent + 3  # each by the fast path, by number
        for client in (plain.client, front.client):  # sql beside a dynamic top segment
            client.create_segment("topn", "dynamic", {"top": {"n": 4, "by": "n"}})
        mixed = {"or": [sql(table), {"segment": "topn"}]}
        assert answers(front.client, mixed) == answers(plain.client, mixed)
    finally:
        front.close()
        shards.sql.close()


def test_serve_shards_with_sources_answers_the_cli(tmp_path: Path, postgres: Any,
                                                   table: str) -> None:
    from conftest_grpc import ServerProcess, run_cli

    sharded(tmp_path, 2).close()
    config = tmp_path / "sources.json"
    config.write_text(json.dumps({"sources": {"crm": {"dsn_env": "BITSEG_TEST_SHARD_DSN",
                                                      "connect_timeout": 2}}}))
    os.environ["BITSEG_TEST_SHARD_DSN"] = postgres.readonly_dsn
    try:
        server = ServerProcess(tmp_path / "db2", ["--shards", "2", "--sources", str(config)])
    finally:
        del os.environ["BITSEG_TEST_SHARD_DSN"]
    try:
        rule = orjson.dumps({"and": [sql(table), {"field": "n", "op": "gte", "value": 1}]})
        expected = sum(1 for i, r in enumerate(records())
                       if i % 2 and i % 3 == 0 and r.get("n", 0) >= 1)
        counted = run_cli("count", "--rule", rule.decode(), "--addr", server.addr)
        assert (counted.returncode, counted.stdout.strip()) == (0, str(expected)), \
            counted.stderr + server.stderr()
        listed = run_cli("sources", "--addr", server.addr)
        assert listed.stdout == f"crm  127.0.0.1:{postgres.port}/postgres  answers\n"
    finally:
        server.stop()


def test_a_shard_that_keeps_asking_for_answers_fails_the_call_never_hangs_it(
        front: Front, table: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import bitseg.server.shard_sources as shard_sources

    asked: list[int] = []
    monkeypatch.setattr(shard_sources.FrontSql, "resolve",
                        lambda self, needed, shard: asked.append(shard))
    monkeypatch.setattr(shard_sources, "_needs",
                        lambda answer: [("crm", "SELECT 1", (), "$", False)])
    with pytest.raises(RuntimeError, match="still asked for sql answers"):
        front.shards.each("count", sql(table), AS_OF)
    assert len(asked) == shard_sources.ASK_ROUNDS * front.shards.count
