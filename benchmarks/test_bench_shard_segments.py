"""Issue 16: a materialized segment with a `top` rule refreshed through the sharded front
(2 shards on a local Ray runtime: top sets chosen over both, then each shard counts its
part) against one store's refresh, in one run, both through gRPC.

The stores hold the bench dataset's profiles alone (a top rule reads one profile field;
the events would only cost disk), built in a temporary folder and removed after. Before
each timed refresh the same 100 profiles get a new `ltv` on both (untimed), so every
refresh moves profiles in and out; the two stores' sizes, entries and exits must agree.
"""

from __future__ import annotations

import shutil
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bitseg import Client
from bitseg.index.engine import Engine
from bitseg.loaders.dataset import load_dataset
from bitseg.loaders.split import shard_folder
from bitseg.server.app import create_server
from bitseg.server.shard_service import create_sharded_server
from bitseg.server.shard_store import load_sharded
from bitseg.server.shards import ShardSet

AS_OF = "2026-11-01T00:00:00Z"
ROUNDS = 15
MOVED = 100  # profiles given a new ltv before each refresh
RULES = {"top 10,000 by ltv": {"top": {"n": 10_000, "by": "ltv"}},
         "top 1,000 by age of the top 100,000 by ltv":
             {"top": {"n": 1_000, "by": "age", "of": {"top": {"n": 100_000, "by": "ltv"}}}}}


@pytest.fixture(scope="module")
def profiles_only(dataset: Path, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("top-segments")
    data = root / "data"
    data.mkdir()
    shutil.copy(dataset / "schema.json", data / "schema.json")
    (data / "profiles.jsonl").symlink_to(dataset / "profiles.jsonl")
    with Engine.open(root / "one") as engine:
        load_dataset(data, engine)
    load_sharded(data, root / "s2", 2)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _moved(round_: int) -> list[dict[str, Any]]:
    """New ltv values for MOVED profiles: high enough to enter the top, then to leave."""
    return [{"id": f"u{round_ * MOVED + k}", "ltv": 100_000.0 + round_ * MOVED + k}
            for k in range(MOVED)]


def test_top_segment_refresh_one_store_against_two_shards(profiles_only: Path) -> None:
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False,
             log_to_driver=False)
    engine = Engine.open(profiles_only / "one")
    shards = ShardSet.on_ray([str(shard_folder(profiles_only / "s2", s)) for s in range(2)])
    servers = [create_server(engine, "127.0.0.1:0"),
               create_sharded_server(shards, "127.0.0.1:0")]
    for server, _ in servers:
        server.start()
    clients = {"one store": Client(f"127.0.0.1:{servers[0][1]}", timeout=600),
               "2 shards, Ray": Client(f"127.0.0.1:{servers[1][1]}", timeout=600)}
    try:
        print()
        for label, rule in RULES.items():
            times: dict[str, list[float]] = {name: [] for name in clients}
            made = {name: client.create_segment("top", "materialized", rule, as_of=AS_OF)
                    for name, client in clients.items()}
            assert len({m.size for m in made.values()}) == 1, made
            entered = 0
            for round_ in range(ROUNDS):
                found = {}
                for name, client in clients.items():
                    client.upsert_profiles(_moved(round_))
                    started = time.perf_counter()
                    found[name] = client.refresh_segment("top", as_of=AS_OF)
                    times[name].append(time.perf_counter() - started)
                moves = {(r.size, r.entered, r.exited) for r in found.values()}
                assert len(moves) == 1, found  # the same members moved in both
                entered += next(iter(moves))[1]
            medians = {name: statistics.median(t) * 1000 for name, t in times.items()}
            ratio = medians["2 shards, Ray"] / medians["one store"]
            print(f"refresh of {label}: " + ", ".join(
                f"{name} {ms:.1f} ms" for name, ms in medians.items())
                + f" (median of {ROUNDS}, {entered:,} entries in all); 2 shards / one "
                f"store = {ratio:.2f}")
            for client in clients.values():
                client.delete_segment("top")
    finally:
        for client in clients.values():
            client.close()
        for server, _ in servers:
            server.stop(None)
        shards.close()
        engine.close()
        ray.shutdown()
