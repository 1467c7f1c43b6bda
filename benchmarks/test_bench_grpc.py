"""The gRPC server end to end: a load test of Count and the Members stream's throughput.

The server runs in this process (create_server on port 0, over the session's Engine); the
Count clients are threads of another process (grpc_clients.py), as a service calling
bitseg would be, so the two sides do not share one interpreter's lock. The Members
stream is read from this process.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from conftest import AS_OF, fmt_seconds
from grpc_clients import run_clients
from peers import ATTR_NOT

from bitseg import Client
from bitseg.server.app import create_server

TABLE = "gRPC, server in this process, clients in another"
CLIENTS = 8
REQUESTS_PER_CLIENT = 250
MEMBERS_RULE = {"not": {"field": "country", "op": "eq", "value": "DE"}}  # ~70% of profiles
MEMBERS_ROUNDS = 3


@pytest.fixture(scope="module")
def address(engine):
    server, port = create_server(engine, "127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None).wait()


@pytest.fixture(params=[False, True], ids=["evaluated", "cached"])
def caching(request, engine):
    """Each call evaluated afresh, or answered from the result cache (same rule, same
    data, same as_of: what many services asking one campaign's count do)."""
    engine.cache_results = request.param
    try:
        yield request.param
    finally:
        engine.cache_results = False


def test_count_load(benchmark, engine, address, bench_report, caching):
    """CLIENTS threads of another process, each with its own channel, REQUESTS_PER_CLIENT
    Counts of ATTR_NOT each."""
    expected = engine.count(ATTR_NOT, as_of=AS_OF)
    runs: list[tuple[float, list[float]]] = []

    def load() -> None:
        runs.append(run_clients(address, CLIENTS, REQUESTS_PER_CLIENT, ATTR_NOT, AS_OF,
                                expected, timeout=600))

    benchmark.pedantic(load, rounds=1, iterations=1)
    wall, latencies = runs[-1]
    total = len(latencies)
    assert total == CLIENTS * REQUESTS_PER_CLIENT
    p50, p99 = np.percentile(latencies, [50, 99])
    rate = total / wall
    benchmark.extra_info.update(clients=CLIENTS, requests=total, seconds=wall,
                                req_per_s=rate, p50_s=p50, p99_s=p99)
    print(f"\ngRPC Count: {CLIENTS} clients x {REQUESTS_PER_CLIENT} requests in {wall:.2f} s: "
          f"{rate:,.0f} req/s, p50 {fmt_seconds(p50)}, p99 {fmt_seconds(p99)}")
    how = "result cache on" if caching else "evaluated every call"
    bench_report.add(TABLE, what=f"Count 5_leaves_not, {CLIENTS} clients x "
                                 f"{REQUESTS_PER_CLIENT}, {how}",
                     result=f"{rate:,.0f} req/s, p50 {fmt_seconds(p50)}, "
                            f"p99 {fmt_seconds(p99)}",
                     **{"target (10M)": ">= 2,000 req/s, p99 <= 10 ms"})


def test_members_stream(benchmark, engine, address, bench_report):
    """Every member of a rule matching ~70% of the profiles, streamed page by page."""
    expected = engine.count(MEMBERS_RULE, as_of=AS_OF)
    first = engine.members(MEMBERS_RULE, as_of=AS_OF, limit=1)
    times: list[float] = []

    with Client(address) as client:
        client.health()  # connect before timing

        def stream() -> None:
            began = time.perf_counter()
            n, head = 0, None
            for profile_id in client.members(MEMBERS_RULE, as_of=AS_OF):
                if head is None:
                    head = profile_id
                n += 1
            times.append(time.perf_counter() - began)
            assert (n, [head]) == (expected, first), f"streamed {n} ids, expected {expected}"

        benchmark.pedantic(stream, rounds=MEMBERS_ROUNDS, iterations=1)
    median = float(np.median(times))
    rate = expected / median
    benchmark.extra_info.update(ids=expected, ids_per_s=rate)
    print(f"\ngRPC Members: {expected:,} ids in {fmt_seconds(median)} (median of "
          f"{len(times)}): {rate:,.0f} ids/s")
    bench_report.add(TABLE, what=f"Members not_de, streamed ({expected:,} ids)",
                     result=f"{rate:,.0f} ids/s (median {fmt_seconds(median)})",
                     **{"target (10M)": ">= 2M ids/s"})
