"""Issue 17, R2: Insights of a 5-leaf rule over 10 fields, and an export of 1M members
with 5 fields (server-side path, index/exports.export; at 10M a 10 % sample). Both only
read the store. Medians printed with -s."""

from __future__ import annotations

import statistics
import time

import pytest
from conftest import AS_OF, PROFILES, fmt_seconds
from peers import ATTR_NOT

from bitseg.index.engine import Engine, as_of_micros
from bitseg.index.exports import export
from bitseg.index.insights import field_insight, insights


@pytest.fixture(scope="module")
def engine(store):
    """The store opened read-only (these benches only read it), so they run beside a
    writer of the cached store, such as test_bench_analyst_r3 at 10M."""
    from bitseg.index import cumulative, orders

    cumulative.BACKGROUND_IDS = 1 << 62  # as conftest's engine: layouts built by the
    orders.LAYOUT_BACKGROUND = 1 << 62  # first call, not raced on a thread
    with Engine.open(store, readonly=True) as opened:
        opened.cache_results = False
        yield opened


def _fields(snap, n: int) -> list[str]:
    """The first n profile fields by name, leaving out the bench_* fields the 10M run of
    test_bench_analyst_r3 writes into the cached store."""
    return [name for name in sorted(snap.schema.profiles) if not name.startswith("bench_")][:n]


def _median(fn, rounds: int = 5) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def test_insights_of_a_5_leaf_rule_over_10_fields(engine):
    snap = engine.snapshot
    fields = _fields(snap, 10)
    as_of_us = as_of_micros(AS_OF)

    def run():
        audience = engine.bitmap(ATTR_NOT, as_of=AS_OF)
        return insights(snap, audience, as_of_us, fields)

    def fields_only():
        audience = engine.bitmap(ATTR_NOT, as_of=AS_OF) & snap.live
        outside = snap.live - audience
        return [field_insight(snap, name, audience, outside=outside) for name in fields]

    first = _median(run, 1)  # reads the indexes, makes what is kept per snapshot
    found = run()
    assert found.profiles == engine.count(ATTR_NOT, as_of=AS_OF)
    assert len(found.fields) == len(fields)
    assert tuple(fields_only()) == found.fields
    seconds = _median(run)
    alone = _median(fields_only)
    audience = engine.bitmap(ATTR_NOT, as_of=AS_OF)
    later = _median(lambda: insights(snap, audience, as_of_us + 3_600_000_000, fields), 1)
    print(f"\ninsights, 5-leaf rule ({found.profiles:,} of {len(snap.live):,} profiles): "
          f"{len(fields)} fields alone (the target's) {fmt_seconds(alone)}; "
          f"the whole call, {len(fields)} fields + {len(found.events)} event types x 3 "
          f"windows + orders, {fmt_seconds(seconds)} (medians of 5); the first call "
          f"{fmt_seconds(first)}; one at an as_of an hour later (its event windows "
          f"made anew) {fmt_seconds(later)}")


MEMBERS = 1_000_000


def test_export_of_1m_members_with_5_fields(engine, tmp_path):
    snap = engine.snapshot
    fields = _fields(snap, 5)
    percent = min(100, round(100 * MEMBERS / PROFILES, 2))
    rule = {"all": True} if percent == 100 else \
        {"sample": {"salt": "export-bench", "percent": percent}}
    out = tmp_path / "members.csv"
    done = export(engine, rule, out, fields, [], "csv", as_of=AS_OF)
    assert done.rows == done.members == engine.count(rule, as_of=AS_OF)
    assert sum(1 for _ in out.open("rb")) == done.rows + 1
    seconds = _median(lambda: export(engine, rule, out, fields, [], "csv", as_of=AS_OF), 3)
    print(f"\nexport of {done.rows:,} of {len(snap.live):,} members, 5 fields "
          f"({', '.join(fields)}), csv: {fmt_seconds(seconds)} median of 3 "
          f"({done.rows / seconds:,.0f} rows/s)")
