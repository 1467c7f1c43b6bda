"""Issue 16: an {"sql": ...} rule through the sharded front (server/shard_sources.py)
against one store, in one run, both through gRPC, asking the same PostgreSQL table.

200,000 profiles of their own (id and one int field: the cost measured is the sql
node's, not the data's) and a table of 100,000 of their ids. The rule is
`{"and": [sql, n < 50]}`; next to it the same rule without the sql node, on the same
server. The front's answer is cached (the source's ttl), so each call is: the front
names the answer by its number, each shard takes its mapped part, and counts. One
store, 2 shards in process, then 2 shards on a local Ray runtime; every count checked.
"""

from __future__ import annotations

import shutil
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from bitseg import Client
from bitseg.index.engine import Engine
from bitseg.index.segments import open_segments
from bitseg.loaders.dataset import load_dataset
from bitseg.loaders.split import shard_folder
from bitseg.server.app import create_server
from bitseg.server.shard_service import create_sharded_server
from bitseg.server.shard_store import load_sharded
from bitseg.server.shards import ShardSet, start_ray
from bitseg.server.sources import Source, Sources

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest_pg import postgres as pg_fixture  # noqa: E402, F401  (the `postgres` fixture)

PROFILES, IN_TABLE, CALLS = 200_000, 100_000, 200
SQL_RULE = {"and": [{"sql": {"source": "crm", "query": "SELECT id FROM bench_shard_crm"}},
                    {"field": "n", "op": "lt", "value": 50}]}
PLAIN_RULE = {"field": "n", "op": "lt", "value": 50}


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory, postgres: Any) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("shard-sources")
    data = root / "data"
    data.mkdir()
    (data / "profiles.jsonl").write_bytes(b"".join(
        orjson.dumps({"id": f"p{i}", "n": i % 100}) + b"\n" for i in range(PROFILES)))
    with Engine.open(root / "one") as engine:
        load_dataset(data, engine)
    load_sharded(data, root / "s2", 2)
    postgres.sql("DROP TABLE IF EXISTS bench_shard_crm")
    postgres.sql("CREATE TABLE bench_shard_crm (id text NOT NULL)")
    postgres.sql("INSERT INTO bench_shard_crm SELECT 'p' || g FROM generate_series(0, %s) g",
                 IN_TABLE - 1)
    yield root
    postgres.sql("DROP TABLE IF EXISTS bench_shard_crm")
    shutil.rmtree(root, ignore_errors=True)


def _medians_ms(client: Client) -> dict[str, float]:
    """The median of each rule's Count, asked in turn (a load that comes and goes falls
    on both alike); the counts checked against the table."""
    asks: dict[str, Callable[[], int]] = {
        "sql rule": lambda: client.count(SQL_RULE),
        "without the sql node": lambda: client.count(PLAIN_RULE)}
    expected = {"sql rule": IN_TABLE // 2, "without the sql node": PROFILES // 2}
    times: dict[str, list[float]] = {name: [] for name in asks}
    for name, ask in asks.items():  # the query run once, the answer cached
        assert ask() == expected[name], name
    for _ in range(CALLS):
        for name, ask in asks.items():
            started = time.perf_counter()
            assert ask() == expected[name]
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(found) * 1000 for name, found in times.items()}


def _sharded_medians(shards: ShardSet, source: dict[str, Source]) -> dict[str, float]:
    """The medians through a sharded front over `shards` (closed after)."""
    server, port = create_sharded_server(shards, "127.0.0.1:0")
    shards.sql.sources = Sources(source, lambda: None)
    server.start()
    try:
        with Client(f"127.0.0.1:{port}", timeout=120) as sharded:
            return _medians_ms(sharded)
    finally:
        server.stop(None)
        shards.sql.close()
        shards.close()


def test_sql_rule_count_one_store_against_two_shards(stores: Path, postgres: Any) -> None:
    source = {"crm": Source("crm", postgres.readonly_dsn, ttl=3600)}
    found: dict[str, dict[str, float]] = {}
    with Engine.open(stores / "one") as engine:
        sources = Sources(source, lambda: engine.ids)
        engine.set_external(sources)
        server, port = create_server(engine, "127.0.0.1:0", segments=open_segments(engine))
        server.start()
        with Client(f"127.0.0.1:{port}", timeout=120) as client:
            paths = [str(shard_folder(stores / "s2", s)) for s in range(2)]
            found["one store"] = _medians_ms(client)
            found["2 shards in process"] = _sharded_medians(ShardSet.embedded(paths), source)
            import ray

            start_ray(ray, num_cpus=2)
            try:
                found["2 shards on Ray"] = _sharded_medians(ShardSet.on_ray(paths), source)
                found["one store, again"] = _medians_ms(client)
            finally:
                ray.shutdown()
        server.stop(None)
        sources.close()
    print(f"\nCount at {PROFILES:,} profiles, sql answer of {IN_TABLE:,} ids (cached), "
          f"median of {CALLS} calls each, through gRPC:")
    for name, medians in found.items():
        print(f"  {name:22} " + "  ".join(f"{rule}: {ms:.2f} ms"
                                          for rule, ms in medians.items()))
