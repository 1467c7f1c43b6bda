"""What the commands print for people: thousands separators, the preview table, an empty
history, `check --quiet`, explain's sentences, and `serve` on a port already in use."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest_grpc import ServerProcess, run_cli

from bitseg.client import Client
from bitseg.index import types as T
from bitseg.index.engine import Engine
from bitseg.index.explain import explain
from bitseg.server.commands import port_problem, profile_table

N = 1_234


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    process = ServerProcess(tmp_path_factory.mktemp("cli") / "store")
    try:
        with Client(process.addr) as client:
            client.upsert_profiles([{"id": f"p{i}", "n": i, "c": "AB"[i % 2]}
                                    for i in range(N)])
            client.upsert_profiles([{"id": "long", "note": "x" * 80, "tags": ["a", "b"]}])
        yield process
    finally:
        process.stop()


def cli(server: ServerProcess, *args: str) -> Any:
    return run_cli(*args, "--addr", server.addr)


# ---------------------------------------------------------------------- numbers
def test_counts_and_sizes_have_thousands_separators(server: ServerProcess) -> None:
    everyone = '{"all": true}'
    assert cli(server, "count", "--rule", everyone).stdout == f"{N + 1:,}\n"
    assert json.loads(cli(server, "count", "--rule", everyone, "--json").stdout)["count"] \
        == N + 1
    created = cli(server, "segment", "create", "all", "--materialized", "--rule", everyone)
    assert created.stdout.splitlines()[0] == "all: materialized, 1,235 members"
    assert cli(server, "segment", "list").stdout == "all\tmaterialized\t1,235\n"
    refreshed = cli(server, "segment", "refresh", "all").stdout
    assert refreshed == "all: 1,235 members, 0 entered, 0 exited\n"
    assert cli(server, "segment", "history", "all").stdout.split("\t")[1] == "1,235"
    explained = cli(server, "explain", "--rule", '{"not": {"field": "n", "op": "lt", '
                    '"value": 10}}').stdout
    assert "\nnot: 1,225\n  n is less than 10: 10\n" in explained
    cli(server, "segment", "delete", "all")


def test_one_member_is_singular(server: ServerProcess) -> None:
    created = cli(server, "segment", "create", "one", "--static", "--ids", "p1")
    assert created.stdout.splitlines()[0] == "one: static, 1 member"
    assert cli(server, "segment", "add", "one", "p2").stdout == "added 1; 2 members now\n"
    assert cli(server, "segment", "remove", "one", "p2").stdout == "removed 1; 1 member now\n"
    cli(server, "segment", "delete", "one")


# ---------------------------------------------------------------------- history, check
def test_an_empty_history_says_so(server: ServerProcess) -> None:
    cli(server, "segment", "create", "dyn", "--dynamic", "--rule",
        '{"field": "c", "op": "eq", "value": "A"}')
    done = cli(server, "segment", "history", "dyn")
    assert (done.returncode, done.stdout) == (0, "no history points for segment dyn\n")
    assert json.loads(cli(server, "segment", "history", "dyn", "--json").stdout)["points"] == []


@pytest.mark.parametrize(("value", "status"), [("A", 0), ("B", 1)])
def test_check_quiet_answers_with_its_status(server: ServerProcess, value: str,
                                             status: int) -> None:
    rule = json.dumps({"field": "c", "op": "eq", "value": value})
    quiet = cli(server, "check", "p0", "--rule", rule, "--quiet")
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (status, "", "")
    loud = cli(server, "check", "p0", "--rule", rule)
    assert (loud.returncode, loud.stdout) == (0, ["true\n", "false\n"][status])


def test_check_quiet_errors_keep_their_status(server: ServerProcess) -> None:
    unknown = cli(server, "check", "p0", "--segment", "nope", "-q")
    assert unknown.returncode == 3 and unknown.stdout == "" and "nope" in unknown.stderr
    gone = run_cli("check", "p0", "--segment", "x", "-q", "--addr", "127.0.0.1:1",
                   "--timeout", "2")
    assert gone.returncode == 4 and gone.stdout == ""


# ---------------------------------------------------------------------- preview
def test_preview_prints_a_table(server: ServerProcess) -> None:
    out = cli(server, "preview", "--rule", '{"field": "n", "op": "lt", "value": 2}').stdout
    assert out.splitlines() == ["2 profiles; the first 2:",
                                "id  c  n",
                                "p0  A  0",
                                "p1  B  1"]
    out = cli(server, "preview", "--rule", '{"field": "note", "op": "exists"}').stdout
    header, row = out.splitlines()[1:]
    assert header.split() == ["id", "note", "tags"]
    assert row.split() == ["long", "x" * 23 + "…", "a|b"]


def test_profile_table_aligns_truncates_and_leaves_gaps() -> None:
    table = profile_table([{"id": "a", "n": 5, "s": "x"},
                           {"id": "bbb", "n": 1234, "s": "y\tz" * 3, "f": True},
                           {"id": "c", "s": "é" * 30}], width=8)
    assert table.splitlines() == ["id   f        n  s",
                                  "a             5  x",
                                  "bbb  true  1234  y zy zy…",
                                  "c                ééééééé…"]


# ---------------------------------------------------------------------- explain
@pytest.mark.parametrize(("rule", "words"), [
    ({"field": "bd", "op": "anniversary_in", "value": {"next_days": 7}},
     "Profiles whose bd's anniversary is in the next 7 days"),
    ({"field": "bd", "op": "anniversary_in", "value": {"next_days": 1}},
     "Profiles whose bd's anniversary is today"),
    ({"not": {"field": "bd", "op": "anniversary_in", "value": {"next_days": 7}}},
     "Profiles whose bd's anniversary is not in the next 7 days (or bd is unset)"),
    ({"not": {"orders": {"all": True}, "window": {"last_days": 90}}},
     "Profiles who did not place an order in the last 90 days"),
    ({"orders": {"all": True}}, "Profiles who placed an order"),
    ({"orders": {"all": True}, "having": {"agg": "count", "op": "gte", "value": 3}},
     "Profiles who placed at least 3 orders"),
    ({"not": {"orders": {"all": True}, "having": {"agg": "count", "op": "gte", "value": 3}}},
     "Profiles who placed fewer than 3 orders"),
    ({"event": "open", "window": {"last_days": 30},
      "having": {"agg": "count", "op": "eq", "value": 1}},
     "Profiles who had exactly 1 'open' event in the last 30 days"),
    ({"event": "add", "window": {"last_days": 1}},
     "Profiles who had an 'add' event in the last day"),
    ({"not": {"event": "*"}}, "Profiles who did not have an event of any type"),
    ({"event": "open", "where": {"not": {"field": "k", "op": "eq", "value": "x"}},
      "having": {"agg": "count", "op": "between", "value": [2, 4]}},
     "Profiles who had between 2 and 4 'open' events where k is not 'x' (or is unset)"),
    ({"not": {"event": "open", "having": {"agg": "count", "op": "between", "value": [2, 4]}}},
     "Profiles who had fewer than 2 or more than 4 'open' events"),
    ({"orders": {"all": True}, "having": {"agg": "count", "op": "in", "value": [1, 2]}},
     "Profiles who placed 1 or 2 orders"),
    ({"orders": {"all": True}, "having": {"agg": "avg", "of": "amount", "op": "gte",
                                          "value": 50}},
     "Profiles who placed orders with an average amount of at least 50"),
    ({"field": "tags", "op": "in", "value": ["vip"]}, "Profiles whose tags include 'vip'"),
    ({"not": {"field": "c", "op": "in", "value": ["DE"]}},
     "Profiles whose c is not 'DE' (or is unset)"),
    ({"or": [{"field": "c", "op": "eq", "value": "DE"}, {"field": "n", "op": "lt", "value": 3}]},
     "Profiles whose c is 'DE' or whose n is less than 3"),
    ({"field": "seen", "op": "lt", "value": {"days_ago": 0}},
     "Profiles whose seen is before the as_of time"),
])
def test_explain_reads_as_english(tmp_path: Path, rule: Any, words: str) -> None:
    with Engine.open(tmp_path / "store") as engine:
        engine.declare_schema({
            "profiles": {"bd": "date", "seen": "timestamp", "c": "keyword", "n": "int",
                         "tags": "keywords"},
            "events": {"k": "keyword"}, "orders": {"amount": "float"}})
        found = explain(engine.snapshot, rule, engine.parse(rule), T.parse_timestamp(
            "2026-11-29T00:00:00Z"))
    assert found.sentence == words


# ---------------------------------------------------------------------- serve
@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def test_serve_on_a_taken_port_prints_one_line_of_its_own(tmp_path: Path,
                                                          taken_port: int) -> None:
    done = run_cli("serve", "--db", str(tmp_path / "store"), "--create",
                   "--port", str(taken_port))
    assert done.returncode == 1
    assert done.stderr == (f"bitseg: cannot listen on 127.0.0.1:{taken_port}: the port is "
                           "already in use (is another server running?)\n")
    assert not (tmp_path / "store").exists()  # refused before the store was created


def test_port_problem(taken_port: int) -> None:
    assert port_problem("127.0.0.1", taken_port) is not None
    assert port_problem("127.0.0.1", 0) is None
    assert port_problem("no-such-host.invalid", 5) is not None
