"""Samples and control-group splits end to end: a real `bitseg serve` on port 0, the
protobuf and JSON forms of a sample rule, SplitSegment through the client, the asyncio
client and `bitseg segment split`; answers compared with the contract's formula."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest_grpc import ServerProcess, run_cli

from bitseg import Client, ClientError
from bitseg.aio import Client as AsyncClient
from bitseg.index.engine import Engine
from bitseg.server.convert import rule_from_json
from bitseg.v1 import bitseg_pb2 as pb

IDS = [f"p{i}" for i in range(400)]
AGE = {pid: i % 60 for i, pid in enumerate(IDS)}


def naive_bucket(salt: str, pid: str) -> int:
    digest = hashlib.blake2b((salt + "\x1f" + pid).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % 10000


def expected(salt: str, lo: float, hi: float, base: set[str]) -> set[str]:
    return {p for p in base if round(lo * 100) <= naive_bucket(salt, p) < round(hi * 100)}


ADULTS = {p for p in IDS if AGE[p] >= 18}


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    with Engine.open(tmp_path / "store") as engine:
        engine.declare_schema({"profiles": {"age": "int"}})
        engine.upsert_profiles([{"id": p, "age": AGE[p]} for p in IDS])
    proc = ServerProcess(tmp_path / "store")
    try:
        yield proc
    finally:
        assert proc.stop() == 0, proc.stderr()


def test_sample_rule_as_protobuf_and_json(server: ServerProcess) -> None:
    rule = {"and": [{"field": "age", "op": "gte", "value": 18},
                    {"sample": {"salt": "spring", "from": 10, "to": 55.5}}]}
    want = expected("spring", 10, 55.5, ADULTS)
    with Client(server.addr, timeout=20) as client:
        assert client.count(rule=rule_from_json(rule)) == len(want)
        assert client.count(rule=json.dumps(rule)) == len(want)
        assert set(client.members(rule=rule)) == want
        for pid in IDS[:20]:
            assert client.is_member(pid, rule=rule) == (pid in want)
        with pytest.raises(ClientError) as caught:
            client.count(rule={"sample": {"salt": "s", "percent": 10.005}})
        assert "$.sample.percent" in str(caught.value)
        bad = pb.Rule(sample=pb.SampleRule(salt="s", percent=5, to=6))
        with pytest.raises(ClientError) as caught:
            client.count(rule=bad)
        assert "$.sample.to" in str(caught.value)


def test_split_through_the_client(server: ServerProcess) -> None:
    with Client(server.addr, timeout=20) as client:
        client.create_segment("adults", "dynamic", rule={"field": "age", "op": "gte",
                                                         "value": 18})
        made = client.split_segment("adults", "spring", {"a": 45, "b": 45, "control": 10})
        assert [s.name for s in made] == ["adults-a", "adults-b", "adults-control"]
        groups = [expected("spring", lo, hi, ADULTS) for lo, hi in ((0, 45), (45, 90),
                                                                   (90, 100))]
        for segment, group in zip(made, groups, strict=True):
            assert segment.kind == "static"
            assert segment.size == segment.entered == len(group)
            assert set(client.members(segment=segment.name)) == group
            entered = {"event": "segment_entered",
                       "where": {"field": "segment", "op": "eq", "value": segment.name}}
            assert client.count(rule=entered) == len(group)
        assert set.union(*groups) == ADULTS
        # a clash with one piece: nothing is created
        client.create_segment("taken-b", "static", profile_ids=["p1"])
        with pytest.raises(ClientError) as caught:
            client.split_segment("adults", "s2", [("a", 50), ("b", 50)], prefix="taken")
        assert caught.value.code == "ALREADY_EXISTS"
        assert "taken-a" not in [s.name for s in client.list_segments()]
        with pytest.raises(ClientError) as caught:
            client.split_segment("adults", "s2", {"x": 60, "y": 50})
        assert caught.value.code == "INVALID_ARGUMENT"
        with pytest.raises(ClientError) as caught:
            client.split_segment("nobody", "s2", {"x": 60})
        assert caught.value.code == "NOT_FOUND"

    async def split_a_rule() -> list:
        async with AsyncClient(server.addr, timeout=20) as aio:
            return await aio.split_segment("young", "autumn", [("t", 30), ("c", 20)],
                                           rule={"field": "age", "op": "lt", "value": 18})

    young = set(IDS) - ADULTS
    made = asyncio.run(split_a_rule())
    assert [(s.name, s.size) for s in made] == [
        ("young-t", len(expected("autumn", 0, 30, young))),
        ("young-c", len(expected("autumn", 30, 50, young)))]


def test_cli_split(server: ServerProcess) -> None:
    done = run_cli("segment", "create", "all", "--dynamic", "--rule", '{"all": true}',
                   "--addr", server.addr)
    assert done.returncode == 0, done.stderr
    done = run_cli("segment", "split", "all", "--salt", "spring", "--into", "a:50,control:10",
                   "--addr", server.addr)
    assert done.returncode == 0, done.stderr
    sizes = [len(expected("spring", 0, 50, set(IDS))), len(expected("spring", 50, 60, set(IDS)))]
    assert done.stdout.splitlines() == [
        f"all-a: static, {sizes[0]:,} members (buckets 0-50 % of salt 'spring')",
        f"all-control: static, {sizes[1]:,} members (buckets 50-60 % of salt 'spring')"]
    done = run_cli("segment", "split", "all", "--salt", "spring", "--into", "a:50",
                   "--addr", server.addr)
    assert done.returncode != 0
    assert done.stderr.count("\n") == 1 and "all-a" in done.stderr
    done = run_cli("segment", "split", "all", "--salt", "x", "--into", "a:fifty",
                   "--addr", server.addr)
    assert done.returncode != 0 and "a:fifty" in done.stderr
