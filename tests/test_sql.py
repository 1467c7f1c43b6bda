"""{"sql": ...} rules against a real PostgreSQL (tests/conftest_pg.py): the rule as a leaf
of and/or/not next to a naive evaluation, bound params, the single-SELECT check, the
READ ONLY transaction, timeouts and row limits, an outage and its end, the ttl cache and
its refresher, materialized SQL segments, and a real server with --sources and the CLI."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest_grpc import ServerProcess, run_cli
from conftest_pg import postgres as pg_fixture  # noqa: F401  (the `postgres` fixture)

from bitseg.index.engine import Engine
from bitseg.index.errors import RuleError, SourceUnavailable
from bitseg.index.explain import explain
from bitseg.index.rules import parse_rule
from bitseg.index.schema import Schema
from bitseg.index.segments import open_segments
from bitseg.index.sqlrule import NoSources
from bitseg.server.service import status_of
from bitseg.server.sources import Source, Sources, load_sources

SCHEMA = {"profiles": {"n": "int", "c": "keyword"}}
N = 60
AS_OF = "2026-03-01T00:00:00Z"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
def table(postgres) -> Iterator[str]:
    """A fresh table of profile ids (with a tier) that the reader role can select."""
    name = f"vip_{secrets.token_hex(4)}"
    postgres.sql(f"CREATE TABLE {name} (id text, tier text, num bigint)")
    yield name
    postgres.sql(f"DROP TABLE IF EXISTS {name}")


@pytest.fixture()
def engine(tmp_path: Path) -> Iterator[Engine]:
    with Engine.open(tmp_path / "db") as eng:
        eng.declare_schema(SCHEMA)
        eng.upsert_profiles([{"id": f"p{i}", "n": i, "c": "ABC"[i % 3]} for i in range(N)])
        yield eng


@pytest.fixture()
def clock() -> Clock:
    return Clock()


def plug(engine: Engine, postgres: Any, clock: Clock, **settings: Any) -> Sources:
    dsn = settings.pop("dsn", postgres.readonly_dsn)
    source = Source("crm", dsn, **{"connect_timeout": 2.0, **settings})
    sources = Sources({"crm": source}, lambda: engine.ids, clock)
    engine.set_external(sources)
    return sources


@pytest.fixture()
def sources(engine, postgres, clock) -> Iterator[Sources]:
    found = plug(engine, postgres, clock)
    yield found
    found.close()


def fill(postgres: Any, table: str, rows: list[tuple[str, str]]) -> None:
    for pid, tier in rows:
        postgres.sql(f"INSERT INTO {table} (id, tier) VALUES (%s, %s)", pid, tier)


def sql(table: str, where: str = "", params: list[Any] | None = None) -> dict[str, Any]:
    query = f"SELECT id FROM {table}" + (f" WHERE {where}" if where else "")
    return {"sql": {"source": "crm", "query": query, "params": params or []}}


def test_rule_combines_like_a_leaf_against_a_naive_evaluation(engine, sources, postgres,
                                                              table):
    gold = {f"p{i}" for i in range(0, N, 4)}
    fill(postgres, table, [(p, "gold") for p in sorted(gold)]
         + [("p1", "silver"), ("p1", "silver"), ("stranger", "gold"), ("p59", "gold")])
    engine.delete_profiles(["p59"])  # returned, but no longer a live profile
    profiles = {f"p{i}": i for i in range(N - 1)}
    leaf = sql(table, "tier = %s", ["gold"])
    expected_leaf = gold & set(profiles)
    small = {"field": "n", "op": "lt", "value": 30}
    is_b = {"field": "c", "op": "eq", "value": "B"}
    cases = [
        (leaf, expected_leaf),
        ({"not": leaf}, set(profiles) - expected_leaf),
        ({"and": [leaf, small]}, {p for p in expected_leaf if profiles[p] < 30}),
        ({"or": [leaf, is_b]}, expected_leaf | {p for p, n in profiles.items() if n % 3 == 1}),
        ({"and": [small, {"not": leaf}]}, {p for p, n in profiles.items() if n < 30}
         - expected_leaf),
        ({"not": {"or": [leaf, small]}}, {p for p, n in profiles.items() if n >= 30}
         - expected_leaf),
        ({"and": [sql(table), {"not": leaf}]}, {"p1"}),
    ]
    for rule, expected in cases:
        assert set(engine.members(rule, as_of=AS_OF)) == expected, rule
        assert engine.count(rule, as_of=AS_OF) == len(expected), rule
    typed = engine.parse(leaf)
    text = explain(engine.snapshot, leaf, typed, 0).text
    # 17 distinct ids: 15 gold live profiles, 'stranger' and the deleted p59
    assert text.splitlines()[0].endswith(f": {len(expected_leaf)}")
    assert "returned 17 distinct ids, 2 of them not live profiles (ignored)" in text
    assert "answer 0.0 s old" in text


def test_params_with_quotes_and_unicode_are_bound_not_formatted(engine, sources, postgres,
                                                                table):
    tricky = "gold'; DROP TABLE " + table + "; --"
    engine.upsert_profiles([{"id": "o'brien"}, {"id": 'ü"ñ 名'}])
    fill(postgres, table, [("o'brien", tricky), ('ü"ñ 名', "ünï'code"), ("p1", "gold")])
    assert set(engine.members(sql(table, "tier = %s", [tricky]))) == {"o'brien"}
    assert set(engine.members(sql(table, "tier = %s OR tier = %s",
                                  ["ünï'code", "nothing"]))) == {'ü"ñ 名'}
    assert set(engine.members(sql(table, "id LIKE %s", ["o'%%"]))) == {"o'brien"}
    assert postgres.sql(f"SELECT count(*) FROM {table}") == [(3,)]  # nothing dropped


def test_integer_ids_are_decimal_strings(engine, sources, postgres, table):
    postgres.sql(f"INSERT INTO {table} (num) VALUES (7), (12), (123456789012)")
    engine.upsert_profiles([{"id": 7}, {"id": 123456789012}])
    rule = {"sql": {"source": "crm", "query": f"SELECT num FROM {table} WHERE num IS NOT NULL"}}
    assert set(engine.members(rule)) == {"7", "123456789012"}
    with pytest.raises(RuleError, match=r"\$\.sql\.query: source 'crm': the query must "
                       r"return one column of profile ids, it returns 2"):
        engine.count({"sql": {"source": "crm", "query": f"SELECT id, tier FROM {table}"}})
    postgres.sql(f"INSERT INTO {table} (id) VALUES ('p1')")
    with pytest.raises(RuleError, match="profile ids as text or integers, got float"):
        engine.count({"sql": {"source": "crm", "query": "SELECT 1.5::float8"}})


@pytest.mark.parametrize("query, message", [
    ("DELETE FROM vip", "expected a SELECT query, got a statement starting with DELETE"),
    ("SELECT id FROM vip; DELETE FROM vip", "found statements separated by ';'"),
    ("select 1; select 2", "found statements separated by ';'"),
    ("WITH x AS (SELECT 1) DELETE FROM vip", "expected WITH … SELECT, got WITH … DELETE"),
    ("WITH x AS (SELECT 1) INSERT INTO vip SELECT * FROM x", "got WITH … INSERT"),
    ("/* select */ UPDATE vip SET id = 'x'", "starting with UPDATE"),
    ("-- select\nTRUNCATE vip", "starting with TRUNCATE"),
    ("SELECT 'a", "unterminated string literal"),
    ("   ", "expected a SELECT query (a non-empty string)"),
])
def test_a_query_that_is_not_one_select_is_refused_at_parse_time(query, message):
    rule = {"and": [{"all": True}, {"sql": {"source": "crm", "query": query}}]}
    with pytest.raises(RuleError) as caught:
        parse_rule(rule, Schema())
    assert caught.value.path == "$.and[1].sql.query"
    assert message in caught.value.reason


@pytest.mark.parametrize("query", [
    "select ';' as id from vip",
    "SELECT id FROM vip -- trailing; comment",
    "SELECT id FROM vip /* ; */ WHERE id <> $$;$$;",
    "WITH a AS (SELECT id FROM vip), b AS (SELECT id FROM a) SELECT id FROM b",
    "(SELECT id FROM vip) UNION (SELECT 'x')",
    'SELECT "weird;name" FROM vip',
    "SELECT E'it\\'s;' FROM vip",
])
def test_single_selects_pass_the_check(query):
    parse_rule({"sql": {"source": "crm", "query": query}}, Schema())


def test_other_malformed_sql_nodes_name_their_path():
    def reason(obj: Any) -> tuple[str, str]:
        with pytest.raises(RuleError) as caught:
            parse_rule(obj, Schema())
        return caught.value.path, caught.value.reason

    assert reason({"sql": "SELECT 1"})[0] == "$.sql"
    assert reason({"sql": {"query": "SELECT 1"}})[0] == "$.sql.source"
    assert reason({"sql": {"source": "crm", "query": "SELECT 1", "x": 1}})[0] == "$.sql.x"
    assert reason({"sql": {"source": "crm", "query": "SELECT 1", "params": [{"a": 1}]}}
                  )[0] == "$.sql.params[0]"
    path, why = reason({"sql": {"source": "crm", "query": "SELECT %s", "params": [1, 2]}})
    assert (path, why) == ("$.sql.params", "the query has 1 %s placeholder and 2 params were "
                           "given (with params, write a literal % as %%)")


def test_unknown_source_and_no_sources(engine, sources, table):
    with pytest.raises(RuleError) as caught:
        engine.count({"not": {"sql": {"source": "erp", "query": f"SELECT id FROM {table}"}}})
    assert caught.value.path == "$.not.sql.source"
    assert "unknown source 'erp' (known sources: crm)" in caught.value.reason
    engine.set_external(NoSources())
    with pytest.raises(RuleError, match=r"\$\.sql\.source: unknown source 'crm': no SQL "
                       r"sources are configured \(start the server with --sources FILE\)"):
        engine.count(sql(table))


def test_an_insert_through_a_cte_is_refused_by_the_read_only_transaction(
        engine, postgres, clock, table):
    # the superuser's DSN: only the READ ONLY transaction stands in the way
    sources = plug(engine, postgres, clock, dsn=postgres.dsn)
    try:
        rule = {"sql": {"source": "crm", "query": f"WITH x AS (INSERT INTO {table} (id) "
                        f"VALUES ('p1') RETURNING id) SELECT id FROM x"}}
        with pytest.raises(RuleError) as caught:
            engine.count(rule)
        assert caught.value.path == "$.sql.query"
        assert caught.value.reason.startswith("source 'crm': refused by the READ ONLY "
                                              "transaction sql queries run in: cannot execute")
        code, message = status_of(caught.value)
        assert code is grpc.StatusCode.INVALID_ARGUMENT and "source 'crm'" in message
        assert postgres.sql(f"SELECT count(*) FROM {table}") == [(0,)]
    finally:
        sources.close()


def test_statement_timeout_and_row_limit(engine, postgres, clock, table):
    sources = plug(engine, postgres, clock, statement_timeout=0.2, row_limit=5)
    try:
        fill(postgres, table, [(f"p{i}", "gold") for i in range(6)])
        slow = {"sql": {"source": "crm", "query": f"SELECT id FROM {table} "
                        "WHERE pg_sleep(2) IS NOT NULL"}}
        with pytest.raises(RuleError, match=r"\$\.sql\.query: source 'crm': the query ran "
                           "longer than the source's statement_timeout of 0.2 s"):
            engine.count(slow)
        with pytest.raises(RuleError, match="more than its row limit of 5 rows"):
            engine.count(sql(table))
        assert engine.count(sql(table, "id <> %s", ["p0"])) == 5  # exactly the limit: fine
    finally:
        sources.close()


def test_a_source_down_mid_run_is_unavailable_and_answers_when_back(engine, postgres, clock,
                                                                    table):
    sources = plug(engine, postgres, clock, ttl=5.0, connect_timeout=1.0)
    try:
        fill(postgres, table, [("p1", "gold"), ("p2", "gold")])
        assert engine.count(sql(table)) == 2
        clock.now += 10  # the cached answer has expired
        postgres.stop()
        try:
            with pytest.raises(SourceUnavailable) as caught:
                engine.count({"and": [{"field": "n", "op": "gt", "value": 0}, sql(table)]})
            assert caught.value.source == "crm"
            code, message = status_of(caught.value)
            assert code is grpc.StatusCode.UNAVAILABLE
            assert message.startswith("source 'crm' is unavailable: ")
            assert engine.count({"field": "n", "op": "gt", "value": 0}) == N - 1  # goes on
            assert not sources.status()[0].answers
            time.sleep(4)  # the pool now waits seconds between its reconnect tries
        finally:
            postgres.start()
        assert engine.count(sql(table)) == 2  # at once, not at the pool's next try
        status = sources.status()[0]
        assert (status.name, status.host, status.database, status.answers) == (
            "crm", f"127.0.0.1:{postgres.port}", "postgres", True)
        assert postgres.password not in repr(status)
    finally:
        sources.close()


def test_cache_ttl_and_background_refresh(engine, postgres, clock, table):
    sources = plug(engine, postgres, clock, ttl=10.0)
    try:
        fill(postgres, table, [("p1", "gold")])
        rule = sql(table)
        assert engine.count(rule) == 1
        fill(postgres, table, [("p2", "gold")])
        clock.now += 5
        assert engine.count(rule) == 1  # cached for the ttl (the result cache keeps nothing)
        typed = engine.parse(rule)
        assert "answer 5.0 s old" in explain(engine.snapshot, rule, typed, 0).text
        clock.now += 5  # the ttl has passed: asked again, the query runs again
        assert engine.count(rule) == 2
        fill(postgres, table, [("p3", "gold")])
        clock.now += 7  # under 80 % of the ttl: not yet refreshed
        assert sources.refresh_due() == 0
        clock.now += 1  # 80 %: the refresher re-runs it before it expires
        assert sources.refresh_due() == 1
        assert engine.count(rule) == 3
        assert "answer 0.0 s old" in explain(engine.snapshot, rule, typed, 0).text
        clock.now += 30  # not asked within a ttl: no longer refreshed
        assert sources.refresh_due() == 0
    finally:
        sources.close()


def test_profiles_added_after_the_answer_are_found_without_a_query(engine, sources, postgres,
                                                                   table):
    fill(postgres, table, [("p1", "gold"), ("late", "gold")])
    rule = sql(table)
    assert engine.count(rule) == 1
    engine.upsert_profiles([{"id": "late"}])
    assert set(engine.members(rule)) == {"p1", "late"}


def test_materialized_sql_segment_history_and_events(engine, sources, postgres, clock, table):
    segments = open_segments(engine)
    fill(postgres, table, [("p1", "gold"), ("p2", "gold")])
    segments.create("vip", "materialized", rule=sql(table), as_of="2026-03-01T00:00:00Z")
    postgres.sql(f"DELETE FROM {table} WHERE id = 'p1'")
    fill(postgres, table, [("p3", "gold"), ("p4", "gold")])
    assert engine.count(sql(table)) == 2  # the cached answer, within its ttl
    change = segments.refresh("vip", as_of="2026-03-02T00:00:00Z")  # re-runs the query
    assert (change.size, change.entered, change.exited) == (3, 2, 1)
    assert set(engine.members({"segment": "vip"})) == {"p2", "p3", "p4"}
    assert [(p.size, p.cause) for p in segments.history("vip")] == [(2, "create"),
                                                                     (3, "refresh")]
    entered = {"event": "segment_entered",
               "where": {"field": "segment", "op": "eq", "value": "vip"}}
    exited = {**entered, "event": "segment_exited"}
    assert set(engine.members(entered, as_of="2026-03-03T00:00:00Z")) == {"p1", "p2", "p3",
                                                                          "p4"}
    assert set(engine.members(exited, as_of="2026-03-03T00:00:00Z")) == {"p1"}


def test_sources_file(tmp_path, monkeypatch):
    path = tmp_path / "sources.toml"
    path.write_text('[sources.crm]\ndsn_env = "CRM_DSN"\nttl = 30\n\n'
                    '[sources.erp]\ndsn = "host=db.example port=5433 dbname=erp user=x '
                    'password=hunter2"\nrow_limit = 1000\n')
    found = load_sources(path, environ={"CRM_DSN": "postgresql://u:pw@crm.example/crm"})
    assert found["crm"] == Source("crm", "postgresql://u:pw@crm.example/crm", ttl=30.0)
    assert found["crm"].where() == ("crm.example", "crm")
    assert found["erp"].where() == ("db.example:5433", "erp")
    assert found["erp"].row_limit == 1000 and found["erp"].statement_timeout == 10.0
    from bitseg.server.gate import ConfigError

    bad = tmp_path / "bad.json"
    for text, message in [
        ('{"sources": {"crm": {"dsn_env": "NOPE"}}}', "sources.crm.dsn_env: the environment "
         "variable 'NOPE' is not set"),
        ('{"sources": {"crm": {"dsn": "x", "ttl": 0}}}', "sources.crm.ttl: expected a number "
         "of seconds > 0"),
        ('{"sources": {"crm": {"dsn": "x", "pasword": "y"}}}', "sources.crm.pasword: unknown"),
        ('{"crm": {}}', 'expected {"sources"'),
    ]:
        bad.write_text(text)
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            load_sources(bad, environ={})


def test_end_to_end_through_a_server_with_sources_and_the_cli(tmp_path, postgres, table):
    fill(postgres, table, [("p1", "gold"), ("p2", "silver"), ("ghost", "gold")])
    config = tmp_path / "sources.json"
    config.write_text(json.dumps({"sources": {"crm": {
        "dsn_env": "BITSEG_TEST_CRM_DSN", "ttl": 60, "connect_timeout": 3}}}))
    import os

    os.environ["BITSEG_TEST_CRM_DSN"] = postgres.readonly_dsn
    try:
        server = ServerProcess(tmp_path / "db", ["--sources", str(config)])
    finally:
        del os.environ["BITSEG_TEST_CRM_DSN"]
    try:
        data = tmp_path / "data"
        data.mkdir()
        (data / "profiles.jsonl").write_text("".join(
            json.dumps({"id": f"p{i}", "n": i}) + "\n" for i in range(5)))
        assert run_cli("load", str(data), "--addr", server.addr, "--quiet").returncode == 0
        listed = run_cli("sources", "--addr", server.addr)
        assert listed.returncode == 0, listed.stderr
        assert listed.stdout == f"crm  127.0.0.1:{postgres.port}/postgres  answers\n"
        assert postgres.password not in run_cli("sources", "--addr", server.addr,
                                                "--json").stdout
        rule = json.dumps({"and": [sql(table, "tier = %s", ["gold"]),
                                   {"field": "n", "op": "lt", "value": 3}]})
        counted = run_cli("count", "--rule", rule, "--addr", server.addr)
        assert (counted.returncode, counted.stdout.strip()) == (0, "1"), counted.stderr
        explained = run_cli("explain", "--rule", rule, "--addr", server.addr)
        assert "1 of them not live profiles (ignored)" in explained.stdout
        refused = run_cli("count", "--rule", json.dumps(
            {"sql": {"source": "crm", "query": "DELETE FROM x"}}), "--addr", server.addr)
        assert refused.returncode != 0 and "$.sql.query" in refused.stderr
        postgres.stop()
        try:
            down = run_cli("count", "--rule", json.dumps(sql(table, "tier <> %s", ["x"])),
                           "--addr", server.addr)
            assert down.returncode != 0
            assert "source 'crm' is unavailable" in down.stderr
            assert "crm" in run_cli("sources", "--addr", server.addr).stdout  # still serving
        finally:
            postgres.start()
        again = run_cli("count", "--rule", json.dumps(sql(table, "tier <> %s", ["x"])),
                        "--addr", server.addr)
        assert (again.returncode, again.stdout.strip()) == (0, "2"), again.stderr
    finally:
        server.stop()
