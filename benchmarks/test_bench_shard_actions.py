"""Issue 16 with issue 17's bulk actions and traits: one store in process against the
same data in 2 shards on a local Ray runtime, through the front (shard_actions), in
one run.

- a bulk set of a field on the members of issue 17's rule (every profile up to 1M),
  through the two-phase commit (each shard checks the action in an aborted
  transaction, then applies it), and its dry run;
- a traits refresh (the RFM quintiles cut over both shards' metrics) after the trait
  fields were emptied, and again with nothing to change.

Both write, so both stores are private: a copy of the cached store and a 2-shard store
loaded from the same dataset, in pytest's temporary folder (--basetemp), removed after
the module. Not at 10M: no 10M store may be copied or written here. The answers are
checked equal (members, changed, holders, a count over the traits).
"""

from __future__ import annotations

import shutil
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import AS_OF, PROFILES, fmt_seconds

from bitseg.index import bulk, traits
from bitseg.index.bulk import BulkAction
from bitseg.index.engine import Engine
from bitseg.loaders.split import shard_folder
from bitseg.server import shard_actions
from bitseg.server.shard_store import load_sharded
from bitseg.server.shards import ShardSet

MEMBERS = 1_000_000
ROUNDS = 3
RFM_TOP = {"and": [{"field": "rfm_recency", "op": "eq", "value": 5},
                   {"field": "rfm_monetary", "op": "gte", "value": 4}]}

pytestmark = pytest.mark.skipif(PROFILES > 1_000_000,
                                reason="writes private copies: 1M and below only")


@pytest.fixture(scope="module")
def pair(store: Path, dataset: Path, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[tuple[Engine, ShardSet]]:
    import ray

    root = tmp_path_factory.mktemp("shard-actions")
    shutil.copytree(store, root / "one", ignore=shutil.ignore_patterns("writer.lock"))
    load_sharded(dataset, root / "two", 2)
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False,
             log_to_driver=False)
    two = ShardSet.on_ray([str(shard_folder(root / "two", s)) for s in range(2)])
    two.unify_schema()
    try:
        with Engine.open(root / "one") as one:
            one.cache_results = False
            two.each("cache", False)
            yield one, two
    finally:
        two.close()
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)


def _median(runs: list[float]) -> str:
    return fmt_seconds(statistics.median(runs))


def _timed(ask: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    found = ask(*args, **kwargs)
    return time.perf_counter() - started, found


def test_bulk_set_through_two_shards(pair: tuple[Engine, ShardSet]) -> None:
    one, two = pair
    percent = min(100, round(100 * MEMBERS / PROFILES, 2))
    rule = {"sample": {"salt": "bulk-bench", "percent": percent}}
    times: dict[str, list[float]] = {"one": [], "two": [], "one dry": [], "two dry": []}
    for run in range(ROUNDS):  # a new value each round: every member changes every time
        action = BulkAction("set", "plan", f"bulk-bench-{run}", rule=rule)
        seconds, dry_one = _timed(bulk.run, one, action, as_of=AS_OF, dry_run=True)
        times["one dry"].append(seconds)
        seconds, dry_two = _timed(shard_actions.bulk_action, two, action, AS_OF, True)
        times["two dry"].append(seconds)
        seconds, done_one = _timed(bulk.run, one, action, as_of=AS_OF)
        times["one"].append(seconds)
        seconds, done_two = _timed(shard_actions.bulk_action, two, action, AS_OF, False)
        times["two"].append(seconds)
        assert (dry_one.members, dry_one.changed) == (dry_two.members, dry_two.changed)
        assert (done_one.members, done_one.changed) == (done_two.members, done_two.changed)
    ratio = statistics.median(times["two"]) / statistics.median(times["one"])
    print(f"\nbulk set plan on {done_one.members:,} members of {PROFILES:,} "
          f"(medians of {ROUNDS}): one store {_median(times['one'])}, 2 shards on Ray "
          f"{_median(times['two'])} ({ratio:.2f}x); dry run {_median(times['one dry'])} "
          f"and {_median(times['two dry'])}")


def test_traits_refresh_through_two_shards(pair: tuple[Engine, ShardSet]) -> None:
    one, two = pair
    times: dict[str, list[float]] = {"one": [], "two": []}
    for _ in range(ROUNDS):
        for name in traits.TYPES:  # emptied, untimed: every value is written again
            if name in one.snapshot.schema.profiles:
                unset = BulkAction("unset", name, rule={"all": True})
                bulk.run(one, unset, as_of=AS_OF)
                shard_actions.bulk_action(two, unset, AS_OF, False)
        seconds, first_one = _timed(traits.refresh, one, None, as_of=AS_OF)
        times["one"].append(seconds)
        seconds, first_two = _timed(shard_actions.refresh_traits, two, None, AS_OF)
        times["two"].append(seconds)
        assert (first_one.profiles, first_one.holders) == (first_two.profiles,
                                                           first_two.holders)
    again_one, _ = _timed(traits.refresh, one, None, as_of=AS_OF)
    again_two, report = _timed(shard_actions.refresh_traits, two, None, AS_OF)
    assert report.profiles == 0
    assert one.count(RFM_TOP, as_of=AS_OF) == sum(two.each("count", RFM_TOP, AS_OF))
    ratio = statistics.median(times["two"]) / statistics.median(times["one"])
    print(f"\ntraits refresh at {PROFILES:,} profiles ({first_one.profiles:,} written; "
          f"medians of {ROUNDS}): one store {_median(times['one'])}, 2 shards on Ray "
          f"{_median(times['two'])} ({ratio:.2f}x); nothing to change: "
          f"{fmt_seconds(again_one)} and {fmt_seconds(again_two)}")
