"""Issue 16 at the bench size: one store against the same data in 2 shards on Ray.

`make bench-10m` runs it at 10M (the size the issue's targets name), `make bench` at 1M.

- The 2-shard store is built once with `load_sharded` into ROOT/shards2-PROFILES-SEED and
  kept, as the bench store is (delete the folder to rebuild); the build's seconds are
  kept in its `.complete` and reported.
- Count through gRPC, median of CALLS calls with every call evaluating (result caches
  off): the unsharded server (what `serve --db` runs) and the sharded front over 2 shard
  actors on a local Ray runtime, both in this process, the clients in it too.
- gRPC Count of the 5-leaf rule from CLIENTS threads of another process
  (grpc_clients.py), REQUESTS each: requests per second of each server.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import PROFILES, ROOT, SEED
from grpc_clients import run_clients
from peers import ALL, ATTR_NOT, POPUP_3_IN_30

from bitseg import Client
from bitseg.index.engine import Engine
from bitseg.loaders.split import shard_folder
from bitseg.server import app
from bitseg.server.shard_service import create_sharded_server
from bitseg.server.shard_store import load_sharded
from bitseg.server.shards import ShardSet

TABLE = "Issue 16 at the bench size: one store against 2 shards on Ray"
AS_OF = "2026-11-01T00:00:00Z"
MID_MONTH = "2026-10-17T13:45:00Z"
CALLS = 40
WARM_UP_SECONDS = 5
SETTLE_SECONDS = 60
CLIENTS = 8
REQUESTS = 200
ROWS = [("5 leaves", ATTR_NOT, AS_OF), ("popup 3 in 30, month start", POPUP_3_IN_30, AS_OF),
        ("popup 3 in 30, mid-month", POPUP_3_IN_30, MID_MONTH), ("all (fan-out)", ALL, AS_OF)]


@pytest.fixture(scope="module")
def two_shards(dataset: Path) -> tuple[Path, float]:
    """The 2-shard store of the bench dataset, and the seconds its load took."""
    db = ROOT / f"shards2-{PROFILES}-{SEED}"
    done = db / ".complete"
    if not done.exists():
        started = time.perf_counter()
        load_sharded(dataset, db, 2)
        done.write_text(f"{time.perf_counter() - started:.1f}")
    return db, float(done.read_text())


@pytest.fixture(scope="module")
def servers(store: Path, two_shards: tuple[Path, float]) -> Iterator[dict[str, Any]]:
    """name -> (address, client, shards) of the unsharded server (shards None) and the
    2-shard front."""
    import ray  # `make bench` installs it (the dev extra); a missing Ray fails loudly
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False,
             log_to_driver=False)
    made: list[tuple[Any, Client, Any]] = []
    try:
        plain = Engine.open(store, readonly=True)
        plain.cache_results = False
        server, port = app.create_server(plain, "127.0.0.1:0")
        server.start()
        found = {"1 store": f"127.0.0.1:{port}"}
        made.append((server, Client(found["1 store"], timeout=600), None))
        shards = ShardSet.on_ray([str(shard_folder(two_shards[0], s)) for s in range(2)])
        shards.each("cache", False)
        server, port = create_sharded_server(shards, "127.0.0.1:0")
        server.start()
        found["2 shards"] = f"127.0.0.1:{port}"
        made.append((server, Client(found["2 shards"], timeout=600), shards))
        # A range field's layout (index/cumulative.py) is built on a thread at this size,
        # its leaves answering from the bit slices meanwhile: every rule asked once on
        # both starts those builds, and the medians are taken once they are done.
        for _, rule, as_of in ROWS:
            for _, client, _ in made:
                client.count(rule, as_of=as_of)
        time.sleep(SETTLE_SECONDS)
        yield {name: (address, client, shards) for (name, address), (_, client, shards)
               in zip(found.items(), made, strict=True)}
    finally:
        for server, client, shards in made:
            client.close()
            server.stop(None)
            if shards is not None:
                shards.close()
        ray.shutdown()


def _median_ms(client: Client, rule: dict, as_of: str) -> float:
    """The median of CALLS Counts of a lone client calling steadily, after WARM_UP_SECONDS
    of such calls: over Ray shards that is long enough for the front to have built its
    compiled graph (server/shard_graph.py), which serves such a caller."""
    until = time.monotonic() + WARM_UP_SECONDS
    while time.monotonic() < until:
        client.count(rule, as_of=as_of)
    times = []
    for _ in range(CALLS):
        started = time.perf_counter()
        client.count(rule, as_of=as_of)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def test_counts_one_store_against_two_shards(servers: dict[str, Any],
                                             two_shards: tuple[Path, float],
                                             bench_report: Any) -> None:
    for name, rule, as_of in ROWS:
        answers = {k: client.count(rule, as_of=as_of)
                   for k, (_, client, _) in servers.items()}
        assert len(set(answers.values())) == 1, answers  # the same count, or no timing
        ms = {k: _median_ms(client, rule, as_of) for k, (_, client, _) in servers.items()}
        target = "<= +1 ms over 1 store" if rule is ALL else "<= 0.6x of 1 store at 10M"
        bench_report.add(TABLE, what=f"Count {name} (median of {CALLS})",
                         one_store=f"{ms['1 store']:.2f} ms", two_shards=f"{ms['2 shards']:.2f} ms",
                         ratio=f"{ms['2 shards'] / ms['1 store']:.2f}x",
                         difference=f"{ms['2 shards'] - ms['1 store']:+.2f} ms", target=target)
    bench_report.add(TABLE, what="load --shards 2 (when the store was built)",
                     two_shards=f"{two_shards[1]:.0f} s")


def test_grpc_throughput_one_store_against_two_shards(servers: dict[str, Any],
                                                      bench_report: Any) -> None:
    """Concurrent Counts over 2 shards go out in batches, one batch at a time, by actor
    tasks (shard_graph.FastReads); the same with batches switched off (a task per
    request and shard), in the same run."""
    rates = {}
    runs: list[tuple[str, str, Any]] = [(name, name, None) for name in servers]
    runs.append(("2 shards, a task per request", "2 shards", servers["2 shards"][2]))
    for label, name, unbatched in runs:
        address, client, _ = servers[name]
        expected = client.count(ATTR_NOT, as_of=AS_OF)
        fast = unbatched.fast if unbatched is not None else None
        if unbatched is not None:
            unbatched.fast = None
        try:
            wall, latencies = run_clients(address, CLIENTS, REQUESTS, ATTR_NOT, AS_OF,
                                          expected, timeout=900)
        finally:
            if unbatched is not None:
                unbatched.fast = fast
        assert len(latencies) == CLIENTS * REQUESTS
        rates[label] = len(latencies) / wall
        p99 = statistics.quantiles(latencies, n=100)[98]
        bench_report.add(TABLE, what=f"gRPC Count 5 leaves, {CLIENTS} clients x {REQUESTS}, "
                                     f"{label}", result=f"{rates[label]:,.0f} req/s, "
                                                        f"p99 {p99 * 1000:.1f} ms")
    for label in ("2 shards", "2 shards, a task per request"):
        bench_report.add(TABLE, what=f"gRPC req/s, {label} / 1 store",
                         ratio=f"{rates[label] / rates['1 store']:.2f}x",
                         target=">= 1.7x at 10M")
