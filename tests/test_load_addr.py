"""`bitseg load DATASET --addr A`: a dataset loaded into a running server through its
streaming calls, checked first, atomic per batch; and the event types only the server
may record (segment_entered / segment_exited) refused from clients and loads."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from conftest_grpc import ServerProcess, bitseg_command, run_cli

from bitseg.client import Client, ClientError

AS_OF = "2026-11-01T00:00:00Z"
RULES = [
    {"all": True},
    {"field": "country", "op": "eq", "value": "DE"},
    {"field": "ltv", "op": "gt", "value": 100},
    {"field": "tags", "op": "in", "value": ["vip"]},
    {"event": "*", "window": {"last_days": 90}},
    {"orders": {"all": True}, "having": {"agg": "sum", "of": "amount", "op": "gt",
                                         "value": 100}},
]


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path / "served")
    try:
        yield proc
    finally:
        assert proc.stop() == 0, proc.stderr()


def count(addr: str, rule: dict) -> int:
    with Client(addr, timeout=10) as client:
        return client.count(rule, as_of=AS_OF)


def write_lines(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))


def test_load_addr_gives_the_same_counts_as_load_db(tmp_path: Path,
                                                    server: ServerProcess) -> None:
    data = tmp_path / "data"
    assert run_cli("gen", str(data), "--profiles", "400", "--quiet").returncode == 0
    local = run_cli("load", str(data), "--db", str(tmp_path / "local"), "--quiet", "--json")
    assert local.returncode == 0, local.stderr
    remote = run_cli("load", str(data), "--addr", server.addr, "--batch-size", "150",
                     "--quiet", "--json")
    assert remote.returncode == 0, remote.stderr
    got, want = orjson.loads(remote.stdout), orjson.loads(local.stdout)
    for key in ("profiles_created", "profiles_updated", "events", "orders", "profiles_total"):
        assert got[key] == want[key], key
    local_server = ServerProcess(tmp_path / "local")
    try:
        for rule in RULES:
            assert count(server.addr, rule) == count(local_server.addr, rule), rule
    finally:
        assert local_server.stop() == 0


def test_a_bad_line_is_named_before_anything_is_sent(tmp_path: Path,
                                                     server: ServerProcess) -> None:
    data = tmp_path / "data"
    write_lines(data / "profiles.jsonl", [{"id": f"p{i}", "n": i} for i in range(30)])
    events = [{"profile": f"p{i}", "event": "open", "ts": AS_OF} for i in range(9)]
    events[6]["ts"] = "yesterday"
    write_lines(data / "events.jsonl", events)
    done = run_cli("load", str(data), "--addr", server.addr, "--quiet")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "events.jsonl" in lines[0] and "line 7" in lines[0] \
        and "'ts'" in lines[0], done.stderr
    assert count(server.addr, {"all": True}) == 0  # not even the good profiles file


def test_a_batch_the_server_refuses_names_the_line_and_the_batches_committed(
        tmp_path: Path, server: ServerProcess) -> None:
    with Client(server.addr, timeout=10) as client:  # the server knows m as an int
        client.upsert_profiles([{"id": "first", "m": 1}])
    data = tmp_path / "data"
    records = [{"id": f"p{i}", "n": i} for i in range(25)]
    records[21]["m"] = "many"  # fine in the file alone (a keyword); not to the server
    write_lines(data / "profiles.jsonl", records)
    done = run_cli("load", str(data), "--addr", server.addr, "--batch-size", "10", "--quiet")
    assert done.returncode == 2
    message = done.stderr.strip()
    assert "profiles.jsonl, line 22, field 'm'" in message, message
    assert "2 batch(es) of this file before it were committed" in message, message
    assert count(server.addr, {"all": True}) == 1 + 20


def test_kill_9_of_the_client_leaves_whole_batches(tmp_path: Path,
                                                   server: ServerProcess) -> None:
    total, size = 60_000, 500
    data = tmp_path / "data"
    write_lines(data / "profiles.jsonl",
                [{"id": f"p{i}", "n": i, "k": f"k{i % 7}"} for i in range(total)])
    load = subprocess.Popen([*bitseg_command(), "load", str(data), "--addr", server.addr,
                             "--batch-size", str(size), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while count(server.addr, {"all": True}) == 0 and load.poll() is None:
            assert time.monotonic() < deadline, "no batch arrived"
            time.sleep(0.01)
        seen = count(server.addr, {"all": True})
    finally:
        load.send_signal(signal.SIGKILL)
        load.wait()
    time.sleep(0.5)  # a batch the server was applying when the client died completes
    after = count(server.addr, {"all": True})
    assert after >= seen
    assert after % size == 0 or after == total, after
    with Client(server.addr, timeout=10) as client:
        assert client.health() == "SERVING"
        assert client.count({"field": "n", "op": "lt", "value": after}) == after


def test_db_and_addr_are_exclusive_and_one_is_required(tmp_path: Path) -> None:
    both = run_cli("load", str(tmp_path), "--db", str(tmp_path / "s"), "--addr", "x:1")
    neither = run_cli("load", str(tmp_path))
    assert both.returncode == 2 and "not allowed with" in both.stderr
    assert neither.returncode == 2 and "one of the arguments --db --addr" in neither.stderr


# ------------------------------------------------------------------ server-recorded events
@pytest.mark.parametrize("event", ["segment_entered", "segment_exited"])
def test_track_events_refuses_segment_events(server: ServerProcess, event: str) -> None:
    with Client(server.addr, timeout=10) as client:
        with pytest.raises(ClientError) as refused:
            client.track_events([{"profile": "a", "event": "click", "ts": AS_OF},
                                 {"profile": "a", "event": event, "ts": AS_OF,
                                  "segment": "vip"}])
        assert refused.value.code == "INVALID_ARGUMENT"
        assert "record 2, field 'event'" in refused.value.message
        assert event in refused.value.message
        assert client.count({"all": True}) == 0  # the batch left nothing


def test_load_refuses_segment_events(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_lines(data / "profiles.jsonl", [{"id": "a"}])
    write_lines(data / "events.jsonl", [
        {"profile": "a", "event": "click", "ts": AS_OF},
        {"profile": "a", "event": "segment_exited", "ts": AS_OF, "segment": "vip"}])
    done = run_cli("load", str(data), "--db", str(tmp_path / "s"), "--quiet")
    assert done.returncode == 2
    assert "events.jsonl, line 2, field 'event'" in done.stderr, done.stderr
