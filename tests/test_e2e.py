"""End to end: a real `bitseg serve` process on port 0, driven through the Python Client
and the `bitseg` CLI, its answers compared with plain Python over the same profiles."""

from __future__ import annotations

import json
import random
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import grpc
import orjson
import pytest
from conftest_grpc import ServerProcess, run_cli
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from bitseg import Client, ClientError
from bitseg.client import Profile as ProfileResult
from bitseg.index.engine import Engine
from bitseg.server import convert

N_PROFILES = 400
AS_OF = "2025-06-01T00:00:00Z"
AS_OF_DT = datetime(2025, 6, 1, tzinfo=timezone.utc)
SCHEMA = {"profiles": {"country": "keyword", "tags": "keywords", "age": "int", "ltv": "float",
                       "subscribed": "bool", "birthday": "date", "created_at": "timestamp"}}
BAD_RULE = {"and": [{"field": "age", "op": "gte", "value": 30},
                    {"field": "country", "op": "gt", "value": "DE"}]}
BAD_PATH = "$.and[1].op"

Profile = dict[str, Any]


# ------------------------------------------------------------------ the dataset
def make_profiles(n: int, seed: int) -> list[Profile]:
    """Seeded random profiles; every field is sometimes absent."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p: Profile = {"id": f"u{i}"}
        if i % 97 == 5:
            p["id"] = f"odd,id \"{i}\" ü"  # needs CSV quoting, and is not ASCII
        if rng.random() < 0.9:
            p["country"] = rng.choice(["DE", "FR", "US", "ES", "IT"])
        if rng.random() < 0.8:
            p["tags"] = rng.sample(["vip", "newsletter", "churned", "beta"], rng.randint(1, 3))
        if rng.random() < 0.85:
            p["age"] = rng.randint(16, 90)
        if rng.random() < 0.7:
            p["ltv"] = round(rng.uniform(0, 2000), 2)
        if rng.random() < 0.9:
            p["subscribed"] = rng.random() < 0.4
        if rng.random() < 0.6:
            p["birthday"] = (date(1950, 1, 1) + timedelta(days=rng.randint(0, 25000))).isoformat()
        if rng.random() < 0.9:
            moment = AS_OF_DT - timedelta(seconds=rng.randint(0, 120 * 86400))
            p["created_at"] = moment.strftime("%Y-%m-%dT%H:%M:%SZ")
        out.append(p)
    return out


def _ts(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# (name, rule, the same rule in plain Python); evaluated at AS_OF.
RULES: list[tuple[str, dict[str, Any], Callable[[Profile], bool]]] = [
    ("all", {"all": True}, lambda p: True),
    ("eq", {"field": "country", "op": "eq", "value": "DE"},
     lambda p: p.get("country") == "DE"),
    ("not", {"not": {"field": "country", "op": "eq", "value": "DE"}},
     lambda p: p.get("country") != "DE"),
    ("and", {"and": [{"field": "age", "op": "gte", "value": 30},
                     {"field": "tags", "op": "eq", "value": "vip"}]},
     lambda p: p.get("age", -1) >= 30 and "vip" in p.get("tags", [])),
    ("or", {"or": [{"field": "subscribed", "op": "eq", "value": True},
                   {"field": "country", "op": "in", "value": ["FR", "ES"]}]},
     lambda p: p.get("subscribed") is True or p.get("country") in ("FR", "ES")),
    ("between", {"field": "ltv", "op": "between", "value": [100.5, 900.25]},
     lambda p: "ltv" in p and 100.5 <= p["ltv"] <= 900.25),
    ("relative", {"field": "created_at", "op": "gte", "value": {"days_ago": 30}},
     lambda p: "created_at" in p and _ts(p["created_at"]) >= AS_OF_DT - timedelta(days=30)),
    ("not-exists", {"field": "birthday", "op": "not_exists"}, lambda p: "birthday" not in p),
    ("none", {"field": "age", "op": "gt", "value": 1000}, lambda p: False),
]
RULE_IDS = [name for name, _, _ in RULES]


@pytest.fixture(scope="session")
def profiles() -> list[Profile]:
    return make_profiles(N_PROFILES, seed=7)


@pytest.fixture(scope="session")
def store(tmp_path_factory: pytest.TempPathFactory, profiles: list[Profile]) -> Path:
    """A store loaded from a profiles.jsonl written here, by the Engine, then closed."""
    base = tmp_path_factory.mktemp("e2e")
    dataset = base / "profiles.jsonl"
    dataset.write_bytes(b"".join(orjson.dumps(p) + b"\n" for p in profiles))
    db = base / "store"
    with Engine.open(db) as engine, dataset.open("rb") as lines:
        engine.declare_schema(SCHEMA)
        report = engine.upsert_profiles(((n, orjson.loads(line)) for n, line in
                                         enumerate(lines, 1)), file=str(dataset))
        assert report.created == len(profiles)
    return db


@pytest.fixture(scope="session")
def server(store: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(store)
    try:
        yield proc
        assert proc.stop() == 0, proc.stderr()
    finally:
        proc.kill()


@pytest.fixture(scope="session")
def client(server: ServerProcess) -> Iterator[Client]:
    with Client(server.addr, timeout=10) as c:
        yield c


def expected(profiles: list[Profile], predicate: Callable[[Profile], bool]) -> list[str]:
    """The ids a rule should give, in load order."""
    return [p["id"] for p in profiles if predicate(p)]


def _code_of(call: Callable[[], Any]) -> ClientError:
    with pytest.raises(ClientError) as info:
        call()
    return info.value


# ------------------------------------------------------------------ the client
def test_health_is_serving(client: Client) -> None:
    assert client.health() == "SERVING"
    assert client.health("bitseg.v1.Segments") == "SERVING"


def test_reflection_lists_the_service(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.addr) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        reply = next(iter(stub.ServerReflectionInfo(iter([request]), timeout=10)))
    names = {s.name for s in reply.list_services_response.service}
    assert {"bitseg.v1.Segments", "grpc.health.v1.Health"} <= names


@pytest.mark.parametrize(("name", "rule", "predicate"), RULES, ids=RULE_IDS)
def test_count_and_members_match_python(client: Client, profiles: list[Profile], name: str,
                                        rule: dict[str, Any],
                                        predicate: Callable[[Profile], bool]) -> None:
    want = expected(profiles, predicate)
    assert client.count(rule, as_of=AS_OF) == len(want)
    assert client.count(json.dumps(rule), as_of=AS_OF_DT) == len(want)  # JSON text
    assert client.count(convert.rule_from_json(rule), as_of=AS_OF) == len(want)  # proto tree
    assert list(client.members(rule, as_of=AS_OF)) == want


def test_rule_tree_round_trips_through_protobuf() -> None:
    for _, rule, _ in RULES:
        assert convert.rule_to_json(convert.rule_from_json(rule)) == rule
    assert convert.rule_to_json(convert.rule_from_json(BAD_RULE)) == BAD_RULE


def test_count_reports_time_and_as_of(client: Client) -> None:
    result = client.count_result({"all": True}, as_of=AS_OF)
    assert result.count == N_PROFILES
    assert result.eval_micros >= 0
    assert result.as_of == AS_OF_DT
    now = datetime.now(timezone.utc)
    assert abs(client.count_result({"all": True}).as_of - now) < timedelta(minutes=1)


def test_members_pages_every_id_exactly_once(client: Client, profiles: list[Profile]) -> None:
    want = [p["id"] for p in profiles]
    pages = list(client.pages({"all": True}, page_size=7))
    assert [len(p.ids) for p in pages[:-1]] == [7] * (len(pages) - 1)
    assert [i for p in pages for i in p.ids] == want
    assert [p.done for p in pages] == [False] * (len(pages) - 1) + [True]
    assert all(p.total == len(want) for p in pages)


def test_members_resume_from_a_cursor(client: Client, profiles: list[Profile]) -> None:
    rule = RULES[3][1]
    want = expected(profiles, RULES[3][2])
    first = list(client.pages(rule, as_of=AS_OF, page_size=5, limit=12))
    assert [len(p.ids) for p in first] == [5, 5, 2]
    assert not first[-1].done
    seen = [i for p in first for i in p.ids]
    assert seen == want[:12]
    rest = list(client.members(rule, cursor=first[-1].cursor, page_size=5))  # as_of: cursor's
    assert seen + rest == want
    middle = list(client.members(rule, cursor=first[0].cursor, limit=3))
    assert middle == want[5:8]


def test_members_limit_and_empty_result(client: Client, profiles: list[Profile]) -> None:
    assert list(client.members({"all": True}, limit=10)) == [p["id"] for p in profiles[:10]]
    pages = list(client.pages({"field": "age", "op": "gt", "value": 1000}))
    assert len(pages) == 1
    assert pages[0].ids == [] and pages[0].done and pages[0].total == 0


def test_is_member_agrees_with_members(client: Client, profiles: list[Profile]) -> None:
    sample = random.Random(3).sample([p["id"] for p in profiles], 25)
    for _, rule, _ in RULES[1:6]:
        members = set(client.members(rule, as_of=AS_OF))
        for pid in sample:
            assert client.is_member(pid, rule, as_of=AS_OF) == (pid in members), (pid, rule)


def test_bad_rule_is_invalid_argument_with_its_path(client: Client) -> None:
    calls = [lambda: client.count(BAD_RULE),
             lambda: client.count(convert.rule_from_json(BAD_RULE)),
             lambda: list(client.members(BAD_RULE)),
             lambda: client.is_member("u1", BAD_RULE),
             lambda: client.explain(BAD_RULE)]
    for call in calls:
        error = _code_of(call)
        assert error.code == "INVALID_ARGUMENT"
        assert BAD_PATH in error.message
    error = _code_of(lambda: client.count("{not json"))
    assert error.code == "INVALID_ARGUMENT" and "$" in error.message
    error = _code_of(lambda: client.count({"and": []}))
    assert error.code == "INVALID_ARGUMENT" and "$.and" in error.message
    assert client.health() == "SERVING"  # and the server is still there


def test_bad_cursor_and_as_of_are_invalid_argument(client: Client) -> None:
    assert _code_of(lambda: list(client.members({"all": True}, cursor="nope"))).code \
        == "INVALID_ARGUMENT"
    assert _code_of(lambda: client.count({"all": True}, as_of="yesterday")).code \
        == "INVALID_ARGUMENT"


def test_unknown_profile_and_segment_are_not_found(client: Client) -> None:
    for call in (lambda: client.is_member("nobody", {"all": True}),
                 lambda: client.profile("nobody"),
                 lambda: client.delete_profiles(["u1", "nobody"]),
                 lambda: client.count(segment="no-such-segment")):
        assert _code_of(call).code == "NOT_FOUND"
    assert client.is_member("u1", {"all": True})  # u1 was not deleted: all or none


def test_a_store_without_segments(client: Client) -> None:
    # segments themselves are tested in test_segments_e2e.py (this server only reads)
    assert client.list_segments() == []
    assert client.segments_of("u1") == []
    assert _code_of(lambda: client.get_segment("vip")).code == "NOT_FOUND"


def test_explain_counts_every_node(client: Client, profiles: list[Profile]) -> None:
    rule = {"and": [RULES[1][1], {"not": RULES[5][1]}]}
    result = client.explain(rule, as_of=AS_OF)
    root = result.root
    both = expected(profiles, lambda p: RULES[1][2](p) and not RULES[5][2](p))
    assert root.count == len(both) == client.count(rule, as_of=AS_OF)
    de, not_between = root.children
    assert (de.path, de.count) == ("$.and[0]", len(expected(profiles, RULES[1][2])))
    assert not_between.path == "$.and[1]"
    assert not_between.children[0].count == len(expected(profiles, RULES[5][2]))
    assert "DE" in result.text and "between" in result.text


def test_profile(client: Client, profiles: list[Profile]) -> None:
    got = client.profile(profiles[1]["id"]).as_dict()
    for key, value in profiles[1].items():
        assert got[key] == (sorted(set(value)) if key == "tags" else value)


# ------------------------------------------------------------------ the CLI
def test_cli_count_members_check(server: ServerProcess, profiles: list[Profile]) -> None:
    name, rule, predicate = RULES[4]
    want = expected(profiles, predicate)
    text = json.dumps(rule)
    done = run_cli("count", "--addr", server.addr, "--rule", text, "--as-of", AS_OF)
    assert (done.returncode, done.stdout, done.stderr) == (0, f"{len(want)}\n", "")
    done = run_cli("count", "--addr", server.addr, "--rule", "-", "--json", stdin=text)
    assert done.returncode == 0 and json.loads(done.stdout)["count"] == len(want)
    done = run_cli("members", "--addr", server.addr, "--rule", text)
    assert done.returncode == 0 and done.stdout.splitlines() == want
    done = run_cli("members", "--addr", server.addr, "--rule", text, "--format", "jsonl",
                   "--limit", "5", "--page-size", "2")
    assert [json.loads(line)["id"] for line in done.stdout.splitlines()] == want[:5]
    done = run_cli("check", want[0], "--addr", server.addr, "--rule", text)
    assert (done.returncode, done.stdout) == (0, "true\n")
    outsider = next(p["id"] for p in profiles if not predicate(p))
    done = run_cli("check", outsider, "--addr", server.addr, "--rule", text)
    assert (done.returncode, done.stdout) == (0, "false\n")


def test_cli_members_csv_quotes_ids(server: ServerProcess, profiles: list[Profile],
                                    tmp_path: Path) -> None:
    import csv
    rule_file = tmp_path / "rule.json"
    rule_file.write_text(json.dumps({"all": True}))
    done = run_cli("members", "--addr", server.addr, "--rule", str(rule_file),
                   "--format", "csv")
    rows = list(csv.reader(done.stdout.splitlines()))
    assert rows == [["id"]] + [[p["id"]] for p in profiles]


@pytest.mark.parametrize(("args", "status", "words"), [
    (["count", "--rule", json.dumps(BAD_RULE)], 2, ["invalid rule", BAD_PATH]),
    (["check", "nobody", "--rule", '{"all": true}'], 3, ["nobody", "not found"]),
    (["count", "--rule", "no/such/rule.json"], 2, ["no such file"]),
    (["segment", "get", "nope"], 3, ["segment 'nope' not found"]),
], ids=["bad-rule", "unknown-profile", "no-rule-file", "unknown-segment"])
def test_cli_errors_are_one_line(server: ServerProcess, args: list[str], status: int,
                                 words: list[str]) -> None:
    done = run_cli(*args, "--addr", server.addr)
    assert done.returncode == status
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("bitseg: "), done.stderr
    assert all(w in lines[0] for w in words), lines[0]


def test_cli_unreachable_server() -> None:
    done = run_cli("count", "--addr", "127.0.0.1:1", "--rule", '{"all": true}')
    assert done.returncode == 4
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and "cannot reach" in lines[0], done.stderr


# ------------------------------------------------------------------ writes (own server)
@pytest.fixture()
def writable(tmp_path: Path) -> Iterator[Client]:
    """A client of a server of its own, over an empty store with a small schema."""
    db = tmp_path / "store"
    with Engine.open(db) as engine:
        engine.declare_schema({"profiles": {"n": "int", "kind": "keyword"}})
    proc = ServerProcess(db)
    try:
        with Client(proc.addr, timeout=10) as c:
            yield c
    finally:
        assert proc.stop() == 0, proc.stderr()


def test_upsert_and_delete_through_the_server(writable: Client) -> None:
    c = writable
    rows = [{"id": f"w{i}", "n": i, "kind": "a" if i % 2 else "b"} for i in range(50)]
    result = c.upsert_profiles(rows, batch_size=20)
    assert (result.batches, result.created, result.updated) == (3, 50, 0)
    result = c.upsert_profiles([[{"id": "w1", "kind": "b"}], [{"id": "w99", "n": 1}]])
    assert (result.batches, result.created, result.updated) == (2, 1, 1)
    assert c.count({"field": "kind", "op": "eq", "value": "b"}) == 26
    # a bad second batch: the first stays, nothing of the second is applied
    bad = [[{"id": "x1", "n": 1}], [{"id": "x2", "n": 2}, {"id": "x3", "n": "three"}]]
    error = _code_of(lambda: c.upsert_profiles(bad))
    assert error.code == "INVALID_ARGUMENT"
    assert "batch 2" in error.message and "record 2" in error.message
    assert "'n'" in error.message
    assert c.count({"all": True}) == 52
    assert c.is_member("x1", {"all": True})
    assert _code_of(lambda: c.is_member("x2", {"all": True})).code == "NOT_FOUND"
    assert c.delete_profiles(["w0", "w2"]) == 2
    assert c.count({"all": True}) == 50
    assert c.profile("w1") == ProfileResult("w1", {"n": 1, "kind": "b"})


def test_track_events_then_count_them(writable: Client) -> None:
    c = writable
    c.upsert_profiles([{"id": "p1", "n": 1}, {"id": "p2", "n": 2}])
    events = [{"profile": "p1", "event": "open", "ts": "2025-05-30T10:00:00Z"},
              {"profile": "p1", "event": "open", "ts": "2025-05-31T10:00:00Z"},
              {"profile": "p3", "event": "open", "ts": "2025-05-31T11:00:00Z"}]  # new profile
    assert c.track_events(events, batch_size=2) == 3
    twice = {"event": "open", "window": {"last_days": 7},
             "having": {"agg": "count", "op": "gte", "value": 2}}
    assert list(c.members(twice, as_of=AS_OF)) == ["p1"]
    assert list(c.members(convert.rule_from_json(twice), as_of=AS_OF)) == ["p1"]
    assert c.count({"all": True}) == 3
    assert "open" in c.explain(twice, as_of=AS_OF).text


# ------------------------------------------------------------------ shutdown
def test_sigterm_lets_calls_finish_and_the_store_reopens(store: Path, tmp_path: Path,
                                                         profiles: list[Profile]) -> None:
    db = tmp_path / "copy"
    shutil.copytree(store, db)  # the session server only reads `store`
    proc = ServerProcess(db)
    served = {}
    try:
        with Client(proc.addr, timeout=10) as c:
            for name, rule, _ in RULES:
                served[name] = c.count(rule, as_of=AS_OF)
            stream = c.pages({"all": True}, page_size=50)
            ids = list(next(stream).ids)
            proc.proc.send_signal(signal.SIGTERM)  # while the stream is in flight
            ids += [i for page in stream for i in page.ids]
        assert ids == [p["id"] for p in profiles]
        assert proc.proc.wait(timeout=20) == 0, proc.stderr()  # signalled once, above
    finally:
        proc.kill()
    with Engine.open(db) as engine:
        for name, rule, predicate in RULES:
            assert engine.count(rule, as_of=AS_OF) == served[name] \
                == len(expected(profiles, predicate))
        assert engine.members({"all": True}) == [p["id"] for p in profiles]


# ------------------------------------------------------------------ unexpected failures
class _BrokenEngine:
    """Fails the way a bug would."""

    def count(self, rule: Any, *, as_of: Any = None) -> int:
        raise ZeroDivisionError("a bug")

    def total(self) -> int:
        return 0


def test_unexpected_errors_are_internal_and_the_server_goes_on(
        caplog: pytest.LogCaptureFixture) -> None:
    from bitseg.server.app import create_server

    server, port = create_server(_BrokenEngine(), "127.0.0.1:0")  # type: ignore[arg-type]
    server.start()
    try:
        with Client(f"127.0.0.1:{port}", timeout=10) as c:
            for _ in range(3):
                error = _code_of(lambda: c.count({"all": True}))
                assert error.code == "INTERNAL" and "a bug" not in error.message
            assert c.health() == "SERVING"
    finally:
        server.stop(None).wait()
    assert "ZeroDivisionError: a bug" in caplog.text  # the traceback is in the log


def test_a_deadline_ends_a_stream_and_the_server_goes_on(client: Client,
                                                          profiles: list[Profile]) -> None:
    """Deadlines are honoured: a reader that stalls past its deadline gets
    DEADLINE_EXCEEDED, and the server keeps answering."""
    stream = client.pages({"all": True}, page_size=1, timeout=0.3)
    first = next(stream)
    assert len(first.ids) == 1
    time.sleep(0.5)  # past the deadline, with pages still to come
    with pytest.raises(ClientError) as info:
        for _ in stream:
            pass
    assert info.value.code == "DEADLINE_EXCEEDED"
    assert client.count({"all": True}) == len(profiles)
