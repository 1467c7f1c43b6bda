"""The server's edges under pressure: bounded caches, deadlines, stream limits and idle
timeouts, and shutdown within the grace period."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
import tracemalloc

import grpc
import orjson
import pytest
from conftest_grpc import ServerProcess
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bitseg.client import Client, ClientError
from bitseg.index import cache
from bitseg.index.engine import Engine
from bitseg.server.app import Options, create_server
from bitseg.v1 import bitseg_pb2 as pb
from bitseg.v1 import bitseg_pb2_grpc as pb_grpc

MB = 1024 * 1024


def _big_in(tag: int, n: int = 20_000) -> dict:
    return {"field": "country", "op": "in", "value": [f"v{tag}-{j}" for j in range(n)]}


@pytest.mark.parametrize("budget", [2 * MB])
def test_distinct_large_rules_stay_within_the_cache_bounds(tmp_path, monkeypatch, budget):
    monkeypatch.setattr(cache, "PARSE_BYTES", budget)
    monkeypatch.setattr(cache, "RESULT_BYTES", budget)
    with Engine.open(tmp_path / "s") as engine:
        engine.upsert_profiles([{"id": str(i), "country": "DE"} for i in range(100)])
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            for tag in range(12):  # each rule holds ~1.4 MB once parsed
                assert engine.count(_big_in(tag)) == 0
                assert engine.members(_big_in(tag)) == []
            grown = tracemalloc.get_traced_memory()[0] - base
        finally:
            tracemalloc.stop()
    assert grown < 3 * budget, f"{grown / MB:.1f} MB still held by the caches"


def test_the_size_estimate_of_a_parsed_rule_is_close_to_what_it_holds(tmp_path):
    with Engine.open(tmp_path / "s") as engine:
        engine.upsert_profiles([{"id": "a", "country": "DE"}])
        rule = orjson.dumps(_big_in(1)).decode()  # as the server gets it: text
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            typed = engine.parse(rule)
            held = tracemalloc.get_traced_memory()[0] - base
        finally:
            tracemalloc.stop()
        estimate = cache.estimate_size(typed)
    assert held / 2 < estimate < held * 2, (estimate, held)


def test_an_lru_drops_the_oldest_entries_beyond_its_bytes_and_skips_a_giant():
    lru = cache.LRU(100, max_bytes=1000, weigh=lambda key, value: value)
    for key in range(5):
        lru.put(key, 300)
    assert sorted(lru.items) == [2, 3, 4] and lru.bytes == 900
    lru.put("giant", 5000)
    assert lru.get("giant") is None and lru.bytes == 900


# ------------------------------------------------------------------ a live server
BIG = 200_000  # profiles: Members of all of them is 2,000 pages of 100


@pytest.fixture(scope="module")
def big_engine(tmp_path_factory):
    with Engine.open(tmp_path_factory.mktemp("big") / "s") as engine:
        engine.upsert_profiles([{"id": f"p{i}", "n": i % 1000} for i in range(BIG)])
        yield engine


@contextlib.contextmanager
def serving(engine, **options):
    server, port = create_server(engine, "127.0.0.1:0", options=Options(**options))
    server.start()
    try:
        # without BDP probing, flow control stops a stream after 64 KB nobody reads
        with grpc.insecure_channel(f"127.0.0.1:{port}",
                                   options=[("grpc.http2.bdp_probe", 0)]) as channel:
            yield channel, f"127.0.0.1:{port}"
    finally:
        server.stop(0).wait()


ALL = pb.Rule(all=True)


def _members(stub, timeout=None, page_size=100):
    return stub.Members(pb.MembersRequest(rule=ALL, page_size=page_size), timeout=timeout)


def test_members_past_its_deadline_ends_with_deadline_exceeded_never_ok(big_engine):
    with serving(big_engine) as (channel, _):
        stub = pb_grpc.SegmentsStub(channel)
        outcomes = set()
        for timeout in (0.02, 0.05, 0.1, 0.2, 0.3, 0.5):
            ids, done = 0, False
            try:
                for page in _members(stub, timeout):
                    ids += len(page.ids)
                    done = page.done
            except grpc.RpcError as exc:
                outcomes.add(exc.code())
                assert exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED, exc
                continue
            outcomes.add(grpc.StatusCode.OK)
            assert (ids, done) == (BIG, True), f"OK after {ids:,} of {BIG:,} ids"
    assert grpc.StatusCode.DEADLINE_EXCEEDED in outcomes


def _idle_upload(stub, release: threading.Event, tag: str):
    """An UpsertProfiles stream that sends one batch, then nothing until released."""
    def batches():
        yield pb.ProfileBatch(profiles_json=[orjson.dumps({"id": tag}).decode()])
        release.wait()
    return stub.UpsertProfiles.future(batches())


def _wait_for(predicate, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def test_idle_and_unread_streams_leave_count_and_health_answering(tmp_path, big_engine):
    release = threading.Event()
    with serving(big_engine, max_streams=20, stream_idle=30.0) as (channel, _):
        stub = pb_grpc.SegmentsStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        before = big_engine.total()
        uploads = [_idle_upload(stub, release, f"idle{i}") for i in range(10)]
        _wait_for(lambda: big_engine.total() == before + 10)  # each sent its batch
        unread = [_members(stub) for _ in range(10)]
        for stream in unread:
            next(stream)  # it runs; from now on nobody reads it
        refused = [_idle_upload(stub, release, f"more{i}") for i in range(10)]
        refused_members = [_members(stub) for _ in range(10)]
        for call in refused:
            with pytest.raises(grpc.RpcError) as caught:
                call.result(timeout=5)
            assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "at most 20 streaming calls" in caught.value.details()
        for stream in refused_members:
            with pytest.raises(grpc.RpcError) as caught:
                next(stream)
            assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        count = stub.Count(pb.CountRequest(rule=ALL), timeout=1.0)
        assert count.count == big_engine.total()
        status = health.Check(health_pb2.HealthCheckRequest(), timeout=1.0).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        release.set()
        for call in uploads:
            assert call.result(timeout=5).batches == 1
        for stream in unread:
            stream.cancel()
    big_engine.delete_profiles([f"idle{i}" for i in range(10)])


def test_a_stream_idle_past_the_timeout_is_ended_and_frees_its_slot(big_engine):
    release = threading.Event()
    with serving(big_engine, max_streams=2, stream_idle=0.5) as (channel, _):
        stub = pb_grpc.SegmentsStub(channel)
        upload = _idle_upload(stub, release, "sleepy")
        unread = _members(stub)
        next(unread)
        with pytest.raises(grpc.RpcError) as caught:
            upload.result(timeout=10)
        assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert "no message from the client for 0.5 s" in caught.value.details()
        with pytest.raises(grpc.RpcError) as caught:
            for _ in unread:
                time.sleep(0.01)  # it reads again, too late: the server gave up on it
        assert caught.value.code() is grpc.StatusCode.CANCELLED
        release.set()
        pages = list(_members(stub, page_size=100_000))  # both slots are free again
        assert pages[-1].done
    big_engine.delete_profiles(["sleepy"])


def test_sigterm_during_a_long_count_exits_within_the_grace_period(tmp_path):
    server = ServerProcess(tmp_path / "s", ["--grace", "0.5"])
    try:
        with Client(server.addr) as client:
            client.upsert_profiles([{"id": str(i), "n": i} for i in range(1000)])
        # slow by construction: 40 lists of 100,000 values (the most a list may hold) take
        # tens of seconds to parse and evaluate
        values = list(range(100_000))
        slow = orjson.dumps({"or": [{"field": "n", "op": "in", "value": values}] * 40})
        outcome: list[object] = []

        def count() -> None:
            try:
                with Client(server.addr, timeout=120) as client:
                    outcome.append(client.count(slow.decode()))
            except ClientError as exc:
                outcome.append(exc.code)

        caller = threading.Thread(target=count)
        caller.start()
        time.sleep(1.5)  # the server is busy evaluating
        assert not outcome
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=15) == 0  # the evaluation alone takes longer
        caller.join(timeout=10)
        assert outcome and outcome[0] in ("UNAVAILABLE", "CANCELLED"), outcome
        assert "call(s) still running after the" in server.stderr()
    finally:
        server.kill()
