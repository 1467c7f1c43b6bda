"""Segments end to end: a real `bitseg serve` on port 0, driven by the Client and the CLI,
restarted on the same store; answers compared with plain Python sets."""

from __future__ import annotations

import csv
import io
import json
import random
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from conftest_grpc import ServerProcess, run_cli

from bitseg import Client, ClientError
from bitseg.client import ExplainNode, MembershipChange, Profile
from bitseg.index.engine import Engine

UTC = timezone.utc
T0 = datetime(2026, 3, 1, tzinfo=UTC)
SCHEMA = {"profiles": {"n": "int", "c": "keyword", "tags": "keywords"}}
N = 120


def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def make_profiles(n: int = N) -> list[dict[str, Any]]:
    rng = random.Random(11)
    out = []
    for i in range(n):
        p: dict[str, Any] = {"id": f"p{i}", "n": rng.randint(0, 99), "c": rng.choice("ABC")}
        if rng.random() < 0.7:
            p["tags"] = rng.sample(["x", "y", "z"], rng.randint(1, 2))
        out.append(p)
    return out


@pytest.fixture()
def db(tmp_path: Path) -> Path:
    path = tmp_path / "store"
    with Engine.open(path) as engine:
        engine.declare_schema(SCHEMA)
        engine.upsert_profiles(make_profiles())
    return path


class Running:
    """A server over `db` that can be restarted; its client."""

    def __init__(self, db: Path) -> None:
        self.db = db
        self.proc = ServerProcess(db)
        self.client = Client(self.proc.addr, timeout=20)

    def restart(self) -> None:
        self.stop()
        self.proc = ServerProcess(self.db)
        self.client = Client(self.proc.addr, timeout=20)

    def stop(self) -> None:
        self.client.close()
        assert self.proc.stop() == 0, self.proc.stderr()

    @property
    def addr(self) -> str:
        return self.proc.addr


@pytest.fixture()
def server(db: Path) -> Iterator[Running]:
    running = Running(db)
    try:
        yield running
        running.stop()
    finally:
        running.proc.kill()


def members(c: Client, **target: Any) -> set[str]:
    return set(c.members(**target))


def entered(name: str, op: str = "gte", n: int = 1, days: int = 30) -> dict[str, Any]:
    return {"event": "segment_entered", "where": {"field": "segment", "op": "eq", "value": name},
            "window": {"last_days": days}, "having": {"agg": "count", "op": op, "value": n}}


def _error(call: Any) -> ClientError:
    with pytest.raises(ClientError) as info:
        call()
    return info.value


# ---------------------------------------------------------------------- each kind
def test_each_kind_through_grpc_survives_a_restart(server: Running) -> None:
    c = server.client
    ids = [f"p{i}" for i in range(0, N, 5)]
    static = c.create_segment("picked", "static", profile_ids=[*ids, "ghost"])
    assert (static.kind, static.size, static.entered) == ("static", len(ids), len(ids))
    assert static.unknown_ids == ["ghost"]
    assert c.add_to_segment("picked", ["p1", "ghost2"]) == MembershipChange(
        changed=1, size=len(ids) + 1, unknown_ids=["ghost2"])
    assert c.remove_from_segment("picked", ["p0"]).changed == 1
    picked = set(ids) - {"p0"} | {"p1"}
    assert members(c, segment="picked") == picked

    rule_a = {"field": "c", "op": "eq", "value": "A"}
    dynamic = c.create_segment("a", "dynamic", rule=rule_a)
    assert dynamic.size == c.count(rule_a) and dynamic.rule == rule_a
    both = {"and": [{"segment": "a"}, {"segment": "picked"}]}
    c.create_segment("a-picked", "dynamic", rule=both)

    rule_hi = {"field": "n", "op": "gte", "value": 50}
    first = members(c, rule=rule_hi)
    mat = c.create_segment("hi", "materialized", rule=rule_hi, as_of=iso(T0),
                           refresh_every=86400)
    assert (mat.size, mat.entered, mat.refresh_every) == (len(first), len(first), 86400)

    changes = [{"id": f"p{i}", "n": (i * 37) % 100, "c": "A"} for i in range(0, N, 2)]
    c.upsert_profiles(changes)
    assert members(c, segment="hi") == first  # stored until refreshed
    assert members(c, segment="a") == members(c, rule=rule_a)  # dynamic: now
    second = members(c, rule=rule_hi)
    t1 = T0 + timedelta(days=1)
    refreshed = c.refresh_segment("hi", as_of=iso(t1))
    assert (refreshed.size, refreshed.entered, refreshed.exited) == (
        len(second), len(second - first), len(first - second))
    window = {"from": iso(t1), "to": iso(t1 + timedelta(seconds=1))}
    for event, want in (("segment_entered", second - first), ("segment_exited", first - second)):
        rule = {"event": event, "where": {"field": "segment", "op": "eq", "value": "hi"},
                "window": window}
        assert members(c, rule=rule, as_of=iso(t1 + timedelta(days=1))) == want
    c.record_segment_size("a", as_of=iso(t1))

    before = {s.name: s for s in c.list_segments()}
    history = {name: c.segment_history(name) for name in before}
    sets = {name: members(c, segment=name) for name in before}
    assert [p.cause for p in history["hi"]] == ["create", "refresh"]
    assert [p.size for p in history["hi"]] == [len(first), len(second)]
    assert [p.cause for p in history["picked"]] == ["create", "add", "remove"]
    assert [(p.time, p.size) for p in history["a"]] == [(t1, c.count(rule_a,
                                                                            as_of=iso(t1)))]
    assert sets["a-picked"] == sets["a"] & picked

    server.restart()
    c = server.client
    after = {s.name: s for s in c.list_segments()}
    assert after == before
    for name in before:
        assert members(c, segment=name) == sets[name]
        assert c.segment_history(name) == history[name]
    assert c.segments_of("p1") == sorted(n for n, s in sets.items() if "p1" in s)


def test_entered_twice_through_the_server(server: Running) -> None:
    c = server.client
    c.create_segment("s", "static", profile_ids=["p1", "p2", "p3"])
    c.remove_from_segment("s", ["p1", "p2"])
    c.add_to_segment("s", ["p1", "p2", "p4"])
    assert members(c, rule=entered("s", "gte", 2)) == {"p1", "p2"}
    assert c.count(entered("s", "eq", 1)) == 2


def test_scheduled_refresh(server: Running) -> None:
    c = server.client
    rule = {"field": "c", "op": "eq", "value": "Q"}
    c.create_segment("q", "materialized", rule=rule, refresh_every=1)
    c.upsert_profiles([{"id": "newbie", "c": "Q"}])
    deadline = time.monotonic() + 15
    while c.count(segment="q") == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert members(c, segment="q") == {"newbie"}
    assert [p.cause for p in c.segment_history("q")][:2] == ["create", "refresh"]
    c.update_segment("q", refresh_every=0)
    assert c.get_segment("q").refresh_every is None


def test_overlap_and_explain_through_the_server(server: Running) -> None:
    c = server.client
    c.create_segment("s", "static", profile_ids=[f"p{i}" for i in range(0, N, 3)])
    c.create_segment("d", "dynamic", rule={"field": "tags", "op": "eq", "value": "x"})
    c.create_segment("m", "materialized", rule={"field": "n", "op": "lt", "value": 40})
    names = ["s", "d", "m"]
    sets = [members(c, segment=n) for n in names]
    found = c.overlap(names)
    assert found.sizes == [len(s) for s in sets]
    assert found.matrix == [[len(a & b) for b in sets] for a in sets]

    rule = {"and": [{"segment": "d"}, {"not": {"segment": "s"}},
                    {"or": [{"field": "c", "op": "eq", "value": "A"}, {"segment": "m"}]}]}
    result = c.explain(rule)
    assert result.sentence.startswith("Profiles who are in segment 'd', who are not in "
                                         "segment 's' and (whose c is 'A' or who are")

    def walk(node: ExplainNode, sub: Any) -> int:
        assert node.count == c.count(sub), node.path
        kids = sub.get("and") or sub.get("or") or ([sub["not"]] if "not" in sub else [])
        return 1 + sum(walk(k, s) for k, s in zip(node.children, kids, strict=True))

    assert walk(result.root, rule) == 7


def test_members_with_fields_and_preview(server: Running) -> None:
    c = server.client
    chosen = ["p3", "p4", "p5"]
    c.create_segment("few", "static", profile_ids=chosen)
    rows = list(c.rows(["c", "tags"], segment="few"))
    assert rows == [Profile(pid, {"c": c.profile(pid).fields["c"],
                                  "tags": c.profile(pid).fields.get("tags")})
                    for pid in chosen]
    preview = c.preview(segment="few", limit=2)
    assert preview.total == 3 and preview.profiles == [c.profile("p3"), c.profile("p4")]
    assert _error(lambda: list(c.rows(["nope"], segment="few"))).code == "INVALID_ARGUMENT"


def test_segment_errors(server: Running) -> None:
    c = server.client
    c.create_segment("a", "dynamic", rule={"all": True})
    c.create_segment("b", "dynamic", rule={"segment": "a"})
    assert _error(lambda: c.create_segment("a", "static")).code == "ALREADY_EXISTS"
    for call in (lambda: c.get_segment("zz"), lambda: c.delete_segment("zz"),
                 lambda: c.add_to_segment("zz", ["p1"]), lambda: c.refresh_segment("zz"),
                 lambda: c.segment_history("zz"), lambda: c.overlap(["a", "zz"]),
                 lambda: c.segments_of("ghost"),
                 lambda: c.create_segment("x", "dynamic", rule={"segment": "zz"})):
        assert _error(call).code == "NOT_FOUND"
    error = _error(lambda: c.update_segment("a", rule={"not": {"segment": "b"}}))
    assert error.code == "INVALID_ARGUMENT" and "$.not.segment" in error.message
    assert "cycle" in error.message
    error = _error(lambda: c.create_segment(
        "x", "materialized", rule={"and": [{"all": True}, {"field": "c", "op": "gt",
                                                            "value": "A"}]}))
    assert error.code == "INVALID_ARGUMENT" and "$.and[1].op" in error.message
    for call in (lambda: c.create_segment("bad name", "static"),
                 lambda: c.add_to_segment("a", ["p1"]),
                 lambda: c.refresh_segment("a")):
        assert _error(call).code == "INVALID_ARGUMENT"
    assert _error(lambda: c.delete_segment("a")).code == "FAILED_PRECONDITION"
    assert {s.name for s in c.list_segments()} == {"a", "b"}
    assert c.health() == "SERVING"


def test_metrics_through_the_server(server: Running) -> None:
    c = server.client
    rng = random.Random(2)
    lines = [{"id": f"o{k}", "profile": f"p{rng.randrange(N)}",
              "amount": round(rng.uniform(1, 99), 2),
              "ts": iso(T0 - timedelta(days=rng.randint(0, 90)))} for k in range(300)]
    c.add_orders(lines)
    c.create_segment("s", "static", profile_ids=[f"p{i}" for i in range(0, N, 2)])
    chosen = members(c, segment="s")
    mine = [o for o in lines if o["profile"] in chosen]
    revenue = sum((Decimal(repr(o["amount"])) for o in mine), Decimal(0))
    total = sum((Decimal(repr(o["amount"])) for o in lines), Decimal(0))
    m = c.metrics(segment="s", as_of=iso(T0))
    assert (m.profiles, m.total_profiles) == (len(chosen), N)
    assert (m.orders, m.customers) == (len(mine), len({o["profile"] for o in mine}))
    assert (m.revenue, m.total_revenue) == (revenue, total)
    assert m.average_order_value == (revenue / len(mine)).quantize(Decimal("0.000001"))
    assert m.share_of_revenue_pct == (revenue * 100 / total).quantize(Decimal("0.000001"))
    out = json.loads(cli(server, "segment", "metrics", "s", "--as-of", iso(T0), "--json"))
    assert (out["revenue"], out["orders"]) == (str(revenue), len(mine))
    out = cli(server, "segment", "metrics", "--rule", '{"all": true}', "--as-of", iso(T0))
    cents = f"{total.quantize(Decimal('0.01')):,}"
    assert f"revenue              {cents} (100.00% of {cents})" in out


# ---------------------------------------------------------------------- the CLI
def cli(server: Running, *args: str, stdin: str | None = None) -> str:
    done = run_cli(*args, "--addr", server.addr, stdin=stdin)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    return done.stdout


def test_cli_segment_commands(server: Running, tmp_path: Path) -> None:
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("p1\np2\n\np3\n")
    out = cli(server, "segment", "create", "vip", "--static", "--ids", str(ids_file), "p9,ghost")
    assert out.splitlines()[0] == "vip: static, 4 members"
    assert "unknown ids, ignored (1): ghost" in out
    rule = json.dumps({"field": "c", "op": "eq", "value": "A"})
    cli(server, "segment", "create", "a", "--dynamic", "--rule", rule)
    out = cli(server, "segment", "create", "m", "--materialized", "--rule", "-",
              "--refresh-every", "3600", "--json", stdin=rule)
    assert json.loads(out)["refresh_every"] == 3600
    assert cli(server, "segment", "add", "vip", "p4", "--ids", "p5,p1") \
        == "added 2; 6 members now\n"
    assert cli(server, "segment", "remove", "vip", "p1") == "removed 1; 5 members now\n"
    listed = cli(server, "segment", "list").splitlines()
    assert [line.split("\t")[:2] for line in listed] == [
        ["a", "dynamic"], ["m", "materialized"], ["vip", "static"]]
    got = json.loads(cli(server, "segment", "get", "vip", "--json"))
    assert (got["name"], got["size"]) == ("vip", 5)
    assert cli(server, "count", "--segment", "vip") == "5\n"
    refreshed = cli(server, "segment", "refresh", "m")
    assert refreshed.startswith("m: ") and "entered" in refreshed
    history = cli(server, "segment", "history", "vip").splitlines()
    assert [line.split("\t")[2] for line in history] == ["create", "add", "remove"]
    recorded = json.loads(cli(server, "segment", "history", "a", "--record", "--json"))
    assert [p["cause"] for p in recorded["points"]] == ["record"]
    overlap = json.loads(cli(server, "segment", "overlap", "vip", "a", "--json"))
    assert overlap["matrix"][0][0] == 5 and overlap["matrix"][0][1] == overlap["matrix"][1][0]
    table = cli(server, "segment", "overlap", "vip", "a").splitlines()
    assert table[0].split() == ["vip", "a"] and table[1].split()[:2] == ["vip", "5"]
    mine = cli(server, "segments", "p2").split()
    assert "vip" in mine and all(n in ("a", "m", "vip") for n in mine)
    cli(server, "segment", "delete", "vip")
    done = run_cli("segment", "get", "vip", "--addr", server.addr)
    assert done.returncode == 3 and "not found" in done.stderr


def test_cli_members_fields_preview_explain(server: Running) -> None:
    cli(server, "segment", "create", "few", "--static", "--ids", "p3,p4,p5")
    out = cli(server, "members", "--segment", "few", "--fields", "c,tags", "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["id"] for r in rows] == ["p3", "p4", "p5"]
    with Client(server.addr) as c:
        for row in rows:
            profile = c.profile(row["id"]).fields
            assert row["c"] == profile["c"]
            assert row["tags"] == "|".join(profile.get("tags", []))
    out = cli(server, "members", "--segment", "few", "--fields", "n", "--format", "jsonl")
    assert [set(json.loads(line)) for line in out.splitlines()] == [{"id", "n"}] * 3
    out = cli(server, "preview", "--segment", "few", "--limit", "2")
    lines = out.splitlines()
    assert lines[0] == "3 profiles; the first 2:" and lines[1].split()[0] == "id"
    assert lines[2].split()[0] == "p3" and len(lines) == 4
    assert json.loads(cli(server, "members", "--segment", "few", "--preview", "1",
                          "--json"))["total"] == 3
    rule = json.dumps({"and": [{"segment": "few"}, {"field": "n", "op": "gte", "value": 0}]})
    out = cli(server, "explain", "--rule", rule)
    assert out.startswith("Profiles who are in segment 'few' and whose n is at least 0\n")
    assert "in segment 'few': 3" in out


@pytest.mark.parametrize(("args", "status", "words"), [
    (["segment", "create", "x", "--dynamic"], 2, ["needs --rule"]),
    (["segment", "create", "bad name", "--static"], 2, ["segment name"]),
    (["segment", "create", "x", "--dynamic", "--rule", '{"segment": "x"}'], 2, ["cycle"]),
    (["segment", "refresh", "nope"], 3, ["'nope' not found"]),
    (["segment", "metrics"], 2, ["NAME or --rule"]),
], ids=["no-rule", "bad-name", "cycle", "unknown", "metrics-target"])
def test_cli_segment_errors_are_one_line(server: Running, args: list[str], status: int,
                                         words: list[str]) -> None:
    done = run_cli(*args, "--addr", server.addr)
    assert done.returncode == status and done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("bitseg: "), done.stderr
    assert all(w in lines[0] for w in words), lines[0]


def test_cli_in_use_and_duplicate(server: Running) -> None:
    cli(server, "segment", "create", "a", "--dynamic", "--rule", '{"all": true}')
    cli(server, "segment", "create", "b", "--dynamic", "--rule", '{"segment": "a"}')
    done = run_cli("segment", "create", "a", "--static", "--addr", server.addr)
    assert done.returncode == 5 and "already exists" in done.stderr
    done = run_cli("segment", "delete", "a", "--addr", server.addr)
    assert done.returncode == 2 and "used by" in done.stderr
