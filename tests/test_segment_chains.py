"""Segment chains (issue 11 item 3) and manual refreshes next to a schedule (issue 12
item 7): at the engine level, and end to end through a real `bitseg serve`."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest_grpc import ServerProcess

from bitseg import Client, ClientError
from bitseg.index import segments as segments_module
from bitseg.index.engine import Engine
from bitseg.index.errors import BitsegError, RuleError
from bitseg.index.evaluate import Evaluator
from bitseg.index.explain import explain
from bitseg.index.rules import MAX_RULE_DEPTH
from bitseg.index.segments import RefreshScheduler, Segments, open_segments

UTC = timezone.utc
LIMIT = 128  # the documented segment chain limit
LEAF = {"field": "n", "op": "gte", "value": 50}
N = 40
US = 1_000_000


def make_profiles() -> list[dict[str, Any]]:
    start = datetime.now(UTC) - timedelta(days=N)
    return [{"id": f"p{i}", "n": (i * 37) % 100, "since": iso(start + timedelta(days=i))}
            for i in range(N)]


def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def fill(path: Path) -> None:
    with Engine.open(path) as engine:
        engine.declare_schema({"profiles": {"n": "int", "since": "timestamp"}})
        engine.upsert_profiles(make_profiles())


@pytest.fixture()
def db(tmp_path: Path) -> Path:
    fill(tmp_path / "db")
    return tmp_path / "db"


@pytest.fixture()
def engine(db: Path) -> Iterator[Engine]:
    with Engine.open(db) as eng:
        yield eng


@pytest.fixture()
def segs(engine: Engine) -> Segments:
    return open_segments(engine)


def leaf_members() -> set[str]:
    return {p["id"] for p in make_profiles() if p["n"] >= 50}


def negated(name: str) -> dict[str, Any]:
    return {"not": {"segment": name}}


def build_chain(create: Callable[[str, dict[str, Any]], Any], prefix: str, top: int,
                link: Callable[[str], dict[str, Any]] = negated) -> int | None:
    """prefix0 = LEAF, prefix{i} = link(prefix{i-1}) for i <= top; the first i refused."""
    create(f"{prefix}0", LEAF)
    for i in range(1, top + 1):
        try:
            create(f"{prefix}{i}", link(f"{prefix}{i - 1}"))
        except (RuleError, ClientError):
            return i
    return None


def store_chain_as_an_old_version_did(path: Path, prefix: str, top: int) -> None:
    """Definitions written straight into the store, as versions without the chain limit
    kept them: prefix0 = LEAF, prefix{i} = not(prefix{i-1}), a materialized `m` over the
    top (due every second), and a dynamic `bad` whose rule names an unknown field."""
    now = time.time_ns() // 1000

    def definition(kind: str, rule: Any, every: int | None = None) -> bytes:
        return orjson.dumps({"format": 1, "kind": kind, "rule": rule, "created_at": now,
                             "refreshed_at": now if kind != "dynamic" else None,
                             "refresh_every": every, "points": 0})

    with Engine.open(path) as engine:
        store = engine.store
        with store.write() as txn:
            store.put(txn, "segments", f"d\0{prefix}0".encode(), definition("dynamic", LEAF))
            for i in range(1, top + 1):
                store.put(txn, "segments", f"d\0{prefix}{i}".encode(),
                          definition("dynamic", negated(f"{prefix}{i - 1}")))
            store.put(txn, "segments", b"d\0m",
                      definition("materialized", {"segment": f"{prefix}{top}"}, every=1))
            store.put(txn, "segments", b"d\0bad",
                      definition("dynamic", {"field": "gone", "op": "eq", "value": 1}))


# ---------------------------------------------------------------------- the limit
def test_a_196_deep_chain_is_refused_and_nothing_is_stored(db: Path) -> None:
    assert segments_module.MAX_CHAIN_DEPTH == LIMIT
    with Engine.open(db) as engine:
        segs = open_segments(engine)
        errors: list[RuleError] = []

        def create(name: str, rule: dict[str, Any]) -> None:
            try:
                segs.create(name, "dynamic", rule=rule)
            except RuleError as exc:
                errors.append(exc)
                raise

        refused = build_chain(create, "c", 196)
        # c{i} is 2i + 1 levels deep with its chain written in place: c63 = 127, c64 = 129
        assert refused == 64
        error = errors[0]
        assert error.path == "$.not.segment"
        assert f"limit is {LIMIT}" in str(error) and "129 levels" in str(error)
        assert "c64 -> c63 -> c62" in str(error) and "c0" in str(error)
        assert [s.name for s in segs.list()] == sorted(f"c{i}" for i in range(64))
        assert engine.count({"segment": "c63"}) == N - len(leaf_members())
    with Engine.open(db) as engine:  # nothing of the refused create was stored
        segs = open_segments(engine)
        assert "c64" not in {s.name for s in segs.list()} and len(segs.list()) == 64


def test_a_chain_at_the_limit_evaluates_everywhere(engine: Engine, segs: Segments) -> None:
    """The deepest construction for evaluation (AND nodes) at exactly the limit, named by
    a rule of the greatest depth allowed, in a thread as the server runs it: count,
    bitmap, is_member, explain, a materialized refresh."""
    def create(name: str, rule: dict[str, Any]) -> None:
        segs.create(name, "dynamic", rule=rule)

    build_chain(create, "a", 63, lambda prev: {"and": [{"segment": prev}, {"all": True}]})
    segs.create("top", "dynamic", rule={"segment": "a63"})  # 1 + 127 = 128 levels
    with pytest.raises(RuleError, match="129 levels"):
        segs.create("over", "dynamic", rule={"not": {"segment": "a63"}})
    rule: dict[str, Any] = {"segment": "top"}
    for _ in range(MAX_RULE_DEPTH - 1):
        rule = {"and": [rule, {"all": True}]}  # MAX_RULE_DEPTH, naming 128 more levels
    expected = leaf_members()
    answers: dict[str, Any] = {}

    def run() -> None:
        snap = engine.snapshot
        typed = engine.parse(rule, snap)
        answers["count"] = Evaluator(snap, 0).count(typed)  # not from the result cache
        answers["members"] = set(engine.members(rule))
        answers["is_member"] = {pid for pid in ("p0", "p2", "p3")
                                if engine.is_member(pid, rule)}
        answers["explain"] = explain(snap, rule, typed, 0).root.count
        answers["of"] = "top" in segs.segments_of(sorted(expected)[0])
        info, _ = segs.create("m", "materialized", rule={"segment": "a63"})
        answers["materialized"] = (info.size, segs.refresh("m").size)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    assert answers == {
        "count": len(expected), "members": expected,
        "is_member": expected & {"p0", "p2", "p3"}, "explain": len(expected), "of": True,
        "materialized": (len(expected), len(expected))}


def test_an_update_inside_a_chain_cannot_make_a_chain_above_it_too_deep(db: Path) -> None:
    with Engine.open(db) as engine:
        segs = open_segments(engine)
        build_chain(lambda name, rule: segs.create(name, "dynamic", rule=rule), "b", 100,
                    lambda prev: {"segment": prev})  # b{i} is i + 1 levels deep
        segs.create("top", "materialized", rule={"not": {"segment": "b100"}})  # 103
        before = segs.get("b10").rule

        def nots(k: int, inner: dict[str, Any]) -> dict[str, Any]:
            for _ in range(k):
                inner = {"not": inner}
            return inner

        with pytest.raises(RuleError) as info:  # b10 from 11 to 41 levels: top to 133
            segs.update("b10", rule=nots(30, {"segment": "b9"}))
        assert f"limit is {LIMIT}" in str(info.value)
        assert "'top'" in str(info.value) and "133 levels" in str(info.value)
        assert segs.get("b10").rule == before
        segs.update("b10", rule=nots(20, {"segment": "b9"}))  # top: 123, within
        assert segs.refresh("top").size == N - len(leaf_members())
    with Engine.open(db) as engine:
        assert open_segments(engine).get("b10").rule == nots(20, {"segment": "b9"})


# ---------------------------------------------------------------------- an old store
def test_a_chain_stored_too_deep_by_an_old_version_still_opens_and_lists(db: Path) -> None:
    store_chain_as_an_old_version_did(db, "d", 196)
    with Engine.open(db) as engine:
        segs = open_segments(engine)
        listed = {s.name: s for s in segs.list()}
        assert set(listed) == {f"d{i}" for i in range(197)} | {"m", "bad"}
        assert listed["d196"].rule == negated("d195") and listed["d196"].size == 0
        assert "limit" in (listed["d196"].problem or "")
        assert listed["bad"].rule["field"] == "gone" and "gone" in (listed["bad"].problem or "")
        assert listed["d10"].size == len(leaf_members()) and listed["d10"].problem is None
        assert segs.get("d196").name == "d196" and segs.get("bad").problem
        with pytest.raises(BitsegError, match=f"limit is {LIMIT}"):
            engine.count({"segment": "d196"})
        with pytest.raises(BitsegError, match="gone"):
            engine.count({"segment": "bad"})
        with pytest.raises(BitsegError, match=f"limit is {LIMIT}"):
            segs.refresh("m")
        member = sorted(leaf_members())[0]
        assert {"d0", "d2", "d62"} <= set(segs.segments_of(member))
        segs.update("d196", rule={"all": True})  # repaired: m can be counted again
        assert segs.refresh("m").size == N
        segs.update("bad", rule=LEAF)
        assert engine.count({"segment": "bad"}) == len(leaf_members())


def test_a_failing_scheduled_refresh_is_logged_once_then_backs_off(
        db: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    store_chain_as_an_old_version_did(db, "d", 196)
    with Engine.open(db) as engine:
        segs = open_segments(engine)
        attempts: list[int] = []
        real = segs.refresh_scheduled

        def counted(name: str, now_us: int) -> Any:
            attempts.append(now_us)
            return real(name, now_us)

        monkeypatch.setattr(segs, "refresh_scheduled", counted)
        scheduler = RefreshScheduler(segs, tick=1.0)
        start = time.time_ns() // 1000 + 2 * US
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="bitseg.segments"):
            for second in range(60):
                scheduler.run_once(start + second * US)
            failed = [r for r in caplog.records if r.levelno >= logging.WARNING]
            assert len(failed) == 1 and failed[0].exc_info is None
            assert "'m'" in failed[0].getMessage() and "limit is" in failed[0].getMessage()
            # tries after 2, 4, 8, 16, 32 s: 5 in 60 s
            assert [(t - start) // US for t in attempts] == [0, 2, 6, 14, 30]
            segs.update("d196", rule={"all": True})
            for second in range(60, 130):
                scheduler.run_once(start + second * US)
            assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1
            works = [r.getMessage() for r in caplog.records if "works again" in r.getMessage()]
            assert len(works) == 1 and "'m'" in works[0]
        assert segs.get("m").size == N


def test_an_unexpected_failure_logs_one_traceback(
        engine: Engine, segs: Segments, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    segs.create("m", "materialized", rule=LEAF, refresh_every=1)

    def boom(name: str, now_us: int) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(segs, "refresh_scheduled", boom)
    scheduler = RefreshScheduler(segs, tick=0.01).start()  # the thread, every 10 ms
    with caplog.at_level(logging.INFO, logger="bitseg.segments"):
        try:
            time.sleep(2.5)  # due once a second has passed; ticks every 10 ms after that
        finally:
            scheduler.stop(timeout=10)
    records = [r for r in caplog.records if r.name == "bitseg.segments"]
    assert len(records) == 1 and records[0].exc_info is not None
    assert "boom" in records[0].getMessage() or "boom" in str(records[0].exc_info[1])


def test_a_shard_that_does_not_answer_logs_a_warning_without_a_traceback(
        engine: Engine, segs: Segments, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Under `serve --shards` a refresh fails when a shard's process died (Ray restarts
    it): an operational failure, said in one line, not a bug's traceback."""
    from bitseg.server.service import ShardUnavailable

    segs.create("m", "materialized", rule=LEAF, refresh_every=1)

    def gone(name: str, now_us: int) -> Any:
        raise ShardUnavailable("shard 1 (/db/shard-1) is unavailable: actor died")

    monkeypatch.setattr(segs, "refresh_scheduled", gone)
    scheduler = RefreshScheduler(segs, tick=1.0)
    start = time.time_ns() // 1000 + 2 * US
    with caplog.at_level(logging.INFO, logger="bitseg.segments"):
        for second in range(10):
            scheduler.run_once(start + second * US)
    records = [r for r in caplog.records if r.name == "bitseg.segments"]
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    assert records[0].exc_info is None and "shard 1" in records[0].getMessage()


# ---------------------------------------------------------------------- as_of refreshes
def joined_by_as_of() -> dict[str, Any]:
    return {"field": "since", "op": "lte", "value": {"days_ago": 0}}


def test_a_manual_refresh_at_a_past_as_of_holds_until_the_next_due_time(
        engine: Engine, segs: Segments) -> None:
    now = time.time_ns() // 1000
    segs.create("joined", "materialized", rule=joined_by_as_of(), refresh_every=3600)
    assert segs.get("joined").size == N
    past = now - 20 * 86_400 * US  # half the profiles had joined then
    change = segs.refresh("joined", as_of=past)
    assert change.size == engine.count(joined_by_as_of(), as_of=datetime.fromtimestamp(
        past / US, UTC)) and 0 < change.size < N
    scheduler = RefreshScheduler(segs, tick=1.0)
    assert segs.due(now + 2 * US) == [] and scheduler.run_once(now + 2 * US) == []
    assert segs.get("joined").size == change.size  # not undone a second later
    assert scheduler.run_once(now + 3_602 * US) == ["joined"]  # the schedule resumes
    assert segs.get("joined").size == N


def test_history_is_in_recording_order_with_its_as_of(db: Path) -> None:
    with Engine.open(db) as engine:
        segs = open_segments(engine)
        now = time.time_ns() // 1000
        segs.create("joined", "materialized", rule=joined_by_as_of())
        past = now - 20 * 86_400 * US
        segs.refresh("joined", as_of=past)
        segs.record_size("joined", as_of=past - US)
        points = segs.history("joined")
        assert [p.cause for p in points] == ["create", "refresh", "record"]
        assert points[0].at >= now and points[1].at == past and points[2].at == past - US
        recorded = [p.recorded_at for p in points]
        assert all(r is not None and r >= now for r in recorded) and recorded == sorted(recorded)
        with engine.store.write() as txn:  # a point as older versions stored it
            key = b"h\0joined\0" + (past - 2 * US + 2**63).to_bytes(8, "big") \
                + (99).to_bytes(4, "big")
            engine.store.put(txn, "segments", key, orjson.dumps({"size": 7, "cause": "refresh"}))
    with Engine.open(db) as engine:
        points = open_segments(engine).history("joined")
        assert [p.cause for p in points] == ["create", "refresh", "record", "refresh"]
        assert (points[3].size, points[3].recorded_at) == (7, None)


# ---------------------------------------------------------------------- end to end
def test_a_deep_chain_through_the_server(db: Path) -> None:
    server = ServerProcess(db)
    try:
        with Client(server.addr, timeout=20) as client:
            errors: list[ClientError] = []

            def create(name: str, rule: dict[str, Any]) -> None:
                try:
                    client.create_segment(name, "dynamic", rule=rule)
                except ClientError as exc:
                    errors.append(exc)
                    raise

            assert build_chain(create, "c", 196) == 64
            assert errors[0].code == "INVALID_ARGUMENT"
            assert "$.not.segment" in errors[0].message
            assert f"limit is {LIMIT}" in errors[0].message
            assert len(client.list_segments()) == 64
        assert server.stop() == 0
        server = ServerProcess(db)
        with Client(server.addr, timeout=20) as client:
            names = {s.name for s in client.list_segments()}
            assert names == {f"c{i}" for i in range(64)}
        assert server.stop() == 0
        assert "Traceback" not in server.stderr()
    finally:
        server.kill()


def test_an_old_deep_chain_and_a_manual_refresh_through_the_server(db: Path) -> None:
    store_chain_as_an_old_version_did(db, "d", 196)
    server = ServerProcess(db)
    try:
        with Client(server.addr, timeout=20) as client:
            assert len(client.list_segments()) == 199
            assert client.get_segment("d196").rule == negated("d195")
            with pytest.raises(ClientError) as info:
                client.count(segment="d196")
            assert info.value.code == "INVALID_ARGUMENT" and "limit" in info.value.message
            client.create_segment("joined", "materialized", rule=joined_by_as_of(),
                                  refresh_every=3600)
            past = datetime.now(UTC) - timedelta(days=20)
            size = client.refresh_segment("joined", as_of=past).size
            assert 0 < size < N
            time.sleep(2.5)  # the scheduler looks every second; `m` fails at every look
            assert client.get_segment("joined").size == size
            history = client.segment_history("joined")
            assert [p.cause for p in history] == ["create", "refresh"]
            assert abs(history[1].time - past) < timedelta(milliseconds=1)
        assert server.stop() == 0
        log = server.stderr()
        assert log.count("scheduled refresh of segment 'm' failed") == 1, log
        assert "Traceback" not in log and "RecursionError" not in log
    finally:
        server.kill()
