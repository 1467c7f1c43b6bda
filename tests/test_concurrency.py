"""Readers never see half a batch: many concurrent Count / IsMember / Members calls while
two clients stream UpsertProfiles batches.  Writer `a` streams batches k = 1..BATCHES,
each setting field `gen_a` of ALL the profiles to k (writer `b` likewise `gen_b`), so
every count of `gen_a == k` must be 0 or N, and a batch once seen is never unseen."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bitseg import Client, ClientError
from bitseg.index.engine import Engine
from bitseg.server.app import create_server

N = 300          # profiles
BATCHES = 30     # per writer
READERS = 8
MIN_READS = 20   # per reader, even if the writers finish first
FIELDS = ("gen_a", "gen_b")  # one per writer


def cond(field: str, op: str, k: int) -> dict[str, Any]:
    return {"field": field, "op": op, "value": k}


@pytest.fixture()
def served(tmp_path: Path) -> Iterator[str]:
    """An in-process server (create_server on port 0) over N profiles at generation 0."""
    engine = Engine.open(tmp_path / "store")
    engine.declare_schema({"profiles": {f: "int" for f in FIELDS}})
    engine.upsert_profiles({"id": f"c{i}", **{f: 0 for f in FIELDS}} for i in range(N))
    server, port = create_server(engine, "127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None).wait()
        engine.close()


def batches(field: str) -> Iterator[list[dict[str, Any]]]:
    for k in range(1, BATCHES + 1):
        yield [{"id": f"c{i}", field: k} for i in range(N)]
        time.sleep(0.005)  # let readers in between batches


def test_readers_see_whole_batches(served: str) -> None:
    writing = threading.Event()
    writing.set()
    failures: list[str] = []
    reads = [0] * READERS
    results: list[Any] = []

    def write(field: str) -> None:
        with Client(served, timeout=30) as client:
            results.append(client.upsert_profiles(batches(field)))

    def read(number: int) -> None:
        rng = random.Random(number)
        newest = dict.fromkeys(FIELDS, 0)  # the latest batch of each writer seen whole
        try:
            with Client(served, timeout=30) as client:
                while writing.is_set() or reads[number] < MIN_READS:
                    field, k = rng.choice(FIELDS), rng.randint(0, BATCHES)
                    count = client.count(cond(field, "eq", k))
                    if count not in (0, N):
                        failures.append(f"count({field} == {k}) = {count}")
                    if count == N:
                        newest[field] = max(newest[field], k)
                    floor = client.count(cond(field, "gte", newest[field]))
                    if floor != N:
                        failures.append(f"{field} went back below {newest[field]}: {floor}")
                    pid = f"c{rng.randrange(N)}"
                    if not client.is_member(pid, cond(field, "gte", 0)):
                        failures.append(f"{pid} lost {field}")
                    if rng.random() < 0.2:
                        got = list(client.members(cond(field, "eq", k), page_size=64))
                        if len(got) not in (0, N):
                            failures.append(f"members({field} == {k}) has {len(got)} ids")
                    reads[number] += 1
        except ClientError as exc:
            failures.append(f"reader {number}: {exc}")

    readers = [threading.Thread(target=read, args=(n,)) for n in range(READERS)]
    writers = [threading.Thread(target=write, args=(f,)) for f in FIELDS]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join(timeout=60)
    writing.clear()
    for t in readers:
        t.join(timeout=60)

    assert not failures, failures[:10]
    assert sum(reads) >= READERS * MIN_READS
    assert len(results) == len(FIELDS)
    for result in results:
        assert (result.batches, result.created, result.updated) == (BATCHES, 0, N * BATCHES)
    with Client(served) as client:
        assert client.count({"all": True}) == N
        for field in FIELDS:
            assert client.count(cond(field, "eq", BATCHES)) == N
