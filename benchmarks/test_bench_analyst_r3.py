"""Issue 17, R3: a bulk set of a field on 1M members (target <= 10 s at 10M) and a
computed traits refresh (target <= 60 s at 10M), on a copy of the cached store (both
write). Times printed with -s; the counts are checked against the rule and the data."""

from __future__ import annotations

import shutil
import time

import pytest
from conftest import AS_OF, PROFILES, fmt_seconds

from bitseg.index import bulk, traits
from bitseg.index.bulk import BulkAction
from bitseg.index.engine import Engine

MEMBERS = 1_000_000


@pytest.fixture(scope="module")
def writable(store, tmp_path_factory):
    """A private copy of the cached store: these benchmarks change it."""
    copy = tmp_path_factory.mktemp("r3") / "store"
    shutil.copytree(store, copy, ignore=shutil.ignore_patterns("writer.lock"))
    with Engine.open(copy) as engine:
        engine.cache_results = False
        yield engine


def test_bulk_set_of_a_field_on_1m_members(writable):
    percent = min(100, round(100 * MEMBERS / PROFILES, 2))
    rule = {"sample": {"salt": "bulk-bench", "percent": percent}}
    members = writable.count(rule, as_of=AS_OF)
    action = BulkAction("set", "plan", "bulk-bench", rule=rule)
    start = time.perf_counter()
    dry = bulk.run(writable, action, as_of=AS_OF, dry_run=True)
    dry_seconds = time.perf_counter() - start
    start = time.perf_counter()
    done = bulk.run(writable, action, as_of=AS_OF)
    seconds = time.perf_counter() - start
    assert dry.changed == done.changed and done.members == members
    assert writable.count({"field": "plan", "op": "eq", "value": "bulk-bench"}) == members
    print(f"\nbulk set plan on {done.members:,} members ({done.changed:,} changed) of "
          f"{PROFILES:,}: {fmt_seconds(seconds)}, dry run {fmt_seconds(dry_seconds)}")


def test_traits_refresh(writable):
    start = time.perf_counter()
    first = traits.refresh(writable, as_of=AS_OF)
    seconds = time.perf_counter() - start
    start = time.perf_counter()
    again = traits.refresh(writable, as_of=AS_OF)
    again_seconds = time.perf_counter() - start
    assert again.profiles == 0 and again.holders == first.holders
    assert writable.count({"field": "rfm_recency", "op": "exists"}) == first.holders["rfm_recency"]
    print(f"\ntraits refresh at {PROFILES:,} profiles: {fmt_seconds(seconds)} "
          f"({first.profiles:,} profiles written, holders {first.holders}); "
          f"again with nothing changed: {fmt_seconds(again_seconds)}")
