"""Issue 16: shards. One shard in process against two on a local Ray runtime, in one run.

- `bitseg load --shards N` of the bench dataset, N = 1 and 2 (both split first);
- Count through gRPC of the 5-leaf rule, the popup rule and {"all": true}, with every
  call evaluating (result caches off): the unsharded server, 1 shard, 2 shards on Ray
  through Ray's compiled graph (shard_graph, built before the timed calls) and through
  plain actor tasks (the graph switched off), in the same run.

The sharded stores are built in a temporary folder and removed after the module.
"""

from __future__ import annotations

import shutil
import statistics
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from peers import ALL, ATTR_NOT, POPUP_3_IN_30

from bitseg import Client
from bitseg.index.engine import Engine
from bitseg.loaders.split import shard_folder
from bitseg.server import app
from bitseg.server.shard_service import create_sharded_server
from bitseg.server.shard_store import load_sharded
from bitseg.server.shards import ShardSet

AS_OF = "2026-11-01T00:00:00Z"
CALLS = 100
RULES = {"5 leaves": ATTR_NOT, "popup 3 in 30": POPUP_3_IN_30, "all": ALL}


@pytest.fixture(scope="module")
def sharded(dataset: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[tuple[Path, dict[int, float]]]:
    root = tmp_path_factory.mktemp("shards")
    seconds = {}
    for n in (1, 2):
        started = time.perf_counter()
        load_sharded(dataset, root / f"s{n}", n)
        seconds[n] = time.perf_counter() - started
    yield root, seconds
    shutil.rmtree(root, ignore_errors=True)


def _medians_ms(asks: dict[str, Callable[[], Any]]) -> dict[str, float]:
    """Each ask's median time, the asks taken in turn (a load that comes and goes on
    the machine falls on every one alike)."""
    times: dict[str, list[float]] = {name: [] for name in asks}
    for _ in range(CALLS):
        for name, ask in asks.items():
            started = time.perf_counter()
            ask()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(found) * 1000 for name, found in times.items()}


def _plainly(client: Client, shards: ShardSet, rule: dict) -> Callable[[], Any]:
    """A Count through the same shards with every call a plain actor task (no graph)."""
    def ask() -> Any:
        graph, shards.fast.graph = shards.fast.graph, None
        try:
            return client.count(rule, as_of=AS_OF)
        finally:
            shards.fast.graph = graph
    return ask


def _graph_built(client: Client, shards: ShardSet) -> None:
    """Count until the compiled graph is built (on a second Count, in its own thread)."""
    deadline = time.monotonic() + 60
    while not shards.graph.ready:
        assert time.monotonic() < deadline, "the compiled graph was not built in 60 s"
        client.count(ALL, as_of=AS_OF)
        time.sleep(0.05)


def _serve(server: Any, port: int) -> Client:
    server.start()
    return Client(f"127.0.0.1:{port}", timeout=600)


def test_shards_load_and_count(sharded: tuple[Path, dict[int, float]], store: Path,
                               bench_report: Any) -> None:
    ray = pytest.importorskip("ray")
    root, load_seconds = sharded
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False,
             log_to_driver=False)
    fronts: dict[str, Any] = {}
    try:
        plain = Engine.open(store, readonly=True)
        plain.cache_results = False
        server, port = app.create_server(plain, "127.0.0.1:0")
        fronts["unsharded"] = (server, _serve(server, port), None)
        for name, shards in (
                ("1 shard", ShardSet.embedded([str(shard_folder(root / "s1", 0))])),
                ("2 shards, Ray", ShardSet.on_ray([str(shard_folder(root / "s2", s))
                                                   for s in range(2)]))):
            shards.each("cache", False)
            server, port = create_sharded_server(shards, "127.0.0.1:0")
            fronts[name] = (server, _serve(server, port), shards)
        _, two, two_shards = fronts["2 shards, Ray"]
        rows = []
        for rule_name, rule in RULES.items():
            counts = {name: f[1].count(rule, as_of=AS_OF) for name, f in fronts.items()}
            assert len(set(counts.values())) == 1, counts
            asks: dict[str, Callable[[], Any]] = {
                name: partial(f[1].count, rule, as_of=AS_OF) for name, f in fronts.items()}
            asks["2 shards, Ray tasks"] = _plainly(two, two_shards, rule)
            for ask in asks.values():
                ask()  # the first call builds what later ones reuse
            _graph_built(two, two_shards)
            built = two_shards.graph.built
            ms = _medians_ms(asks)
            assert two_shards.graph.built == built, "the graph was torn down while timed"
            rows.append({"rule": rule_name, **{k: f"{v:.2f} ms" for k, v in ms.items()},
                         "2 shards / 1": f"{ms['2 shards, Ray'] / ms['1 shard']:.2f}x",
                         "2 shards - unsharded":
                             f"{ms['2 shards, Ray'] - ms['unsharded']:+.2f} ms",
                         "Ray tasks - unsharded":
                             f"{ms['2 shards, Ray tasks'] - ms['unsharded']:+.2f} ms"})
        rows.append({"rule": "load --shards N", "1 shard": f"{load_seconds[1]:.1f} s",
                     "2 shards, Ray": f"{load_seconds[2]:.1f} s",
                     "2 shards / 1": f"{load_seconds[2] / load_seconds[1]:.2f}x"})
        for row in rows:
            bench_report.add("issue 16: shards (gRPC Count median, every call evaluating)",
                             **row)
    finally:
        for server, client, shards in fronts.values():
            client.close()
            server.stop(None)
            if shards is not None:
                shards.close()
        ray.shutdown()
