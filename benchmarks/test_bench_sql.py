"""Issue 18: a {"sql": ...} leaf against a real PostgreSQL, in the same run as the store.

A table of 1,000,000 profile ids (u50000 … u1049999: at 1M profiles the first 50,000
profiles are not in it and its last 50,000 ids are unknown to the store) is queried
through the `bitseg_reader` role, as a source of server/sources.py. Two numbers:

- cold: every call re-runs the query (Sources.fresh(), what a materialized refresh does),
  so it is the query, the fetch of 1M rows, the mapping of 1M ids to dense ids and the
  bitmap, end to end through Engine.count;
- cached: the source's answer is kept for its ttl, so a call is the bitmap of the cached
  answer intersected with the live profiles, next to a bitmap leaf of the store.

Every count is checked against the ids the table holds, computed here without bitseg.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from conftest import AS_OF, PROFILES, fmt_seconds, median_of
from peers import ATTR_NOT, median_seconds

from bitseg.index.sqlrule import NoSources, parse_sql, resolve_ids
from bitseg.server.sources import Source, Sources

# The PostgreSQL fixture is the tests' (one server per session, stopped at its end).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest_pg import postgres as pg_fixture  # noqa: E402, F401  (the `postgres` fixture)

TABLE = "Issue 18: SQL leaves, median per call"
FIRST, ROWS = 50_000, 1_000_000
SQL_LEAF = {"sql": {"source": "crm", "query": "SELECT id FROM bench_crm WHERE tier = %s",
                    "params": ["gold"]}}
BITMAP_LEAF = {"field": "country", "op": "eq", "value": "DE"}


def known(pid: str) -> bool:
    """Whether a store profile id is in the table (ids are u0 … u{PROFILES - 1})."""
    return FIRST <= int(pid[1:]) < FIRST + ROWS


@pytest.fixture(scope="module")
def crm(postgres, engine):
    """The table, and the engine asking it through a Sources provider."""
    started = time.perf_counter()
    postgres.sql("DROP TABLE IF EXISTS bench_crm")
    postgres.sql("CREATE TABLE bench_crm (id text NOT NULL, tier text NOT NULL)")
    postgres.sql("INSERT INTO bench_crm SELECT 'u' || g, 'gold' "
                 "FROM generate_series(%s::int, %s::int) AS g", FIRST, FIRST + ROWS - 1)
    postgres.sql("VACUUM ANALYZE bench_crm")
    print(f"\nPostgreSQL up in {postgres.startup_seconds:.2f} s, table of {ROWS:,} ids "
          f"in {time.perf_counter() - started:.2f} s")
    sources = Sources({"crm": Source("crm", postgres.readonly_dsn)}, lambda: engine.ids)
    try:
        yield sources
    finally:
        engine.set_external(NoSources())
        sources.close()
        postgres.sql("DROP TABLE bench_crm")


def expected_count() -> int:
    return max(0, min(PROFILES, FIRST + ROWS) - FIRST)


def _row(report, what: str, count: int, seconds: float, target: str, met: str,
         note: str = "") -> None:
    report.add(TABLE, what=what, count=f"{count:,}", bitseg=fmt_seconds(seconds),
               target=target, met=met, note=note)


def test_sql_leaf_cold(benchmark, engine, crm, bench_report):
    """Query + fetch + id mapping + bitmap, every call."""
    engine.set_external(crm.fresh())
    counts: list[int] = []

    def cold() -> None:
        counts.append(engine.count(SQL_LEAF, as_of=AS_OF))

    benchmark.pedantic(cold, rounds=5, iterations=1, warmup_rounds=1)
    cold_s = median_of(benchmark, cold)
    ids = [f"u{i}" for i in range(FIRST, FIRST + ROWS)]
    mapping_s, _ = median_seconds(lambda: resolve_ids(ids, engine.ids), min_rounds=3,
                                  budget=0.0)
    members, unknown = resolve_ids(ids, engine.ids)
    benchmark.extra_info.update(count=counts[-1], cold_s=cold_s, mapping_s=mapping_s)
    _row(bench_report, "sql leaf of 1M ids, cold", counts[-1], cold_s, "<= 2 s",
         "yes" if cold_s <= 2 else "no", f"{len(unknown):,} unknown ids ignored")
    _row(bench_report, "  of which id mapping (resolve_ids)", len(members), mapping_s, "", "",
         "1M LMDB lookups in one read transaction")
    assert set(counts) == {expected_count()}, counts


def test_sql_leaf_cached_costs_a_bitmap_leaf(benchmark, engine, crm, bench_report):
    engine.set_external(crm)
    first = engine.count(SQL_LEAF, as_of=AS_OF)  # fills the source's cache

    def cached() -> int:
        return engine.count(SQL_LEAF, as_of=AS_OF)

    got = benchmark(cached)
    cached_s = median_of(benchmark, cached)
    leaf_s, _ = median_seconds(lambda: engine.count(BITMAP_LEAF, as_of=AS_OF))
    leaf_count = engine.count(BITMAP_LEAF, as_of=AS_OF)
    ratio = cached_s / leaf_s
    # Both are per-call overheads of a few µs, not work that grows with the rows: "same
    # order" is within 3x of the bitmap leaf.
    _row(bench_report, "sql leaf, cached", got, cached_s, "a bitmap leaf's cost",
         "same order" if ratio <= 3 else "no", f"{ratio:.2f}x the bitmap leaf")
    _row(bench_report, "  bitmap leaf country = DE", leaf_count, leaf_s, "", "")
    parsed = parse_sql(SQL_LEAF, "$")
    lookup_s, _ = median_seconds(lambda: crm.answer(parsed))
    answer = crm.answer(parsed)
    and_live_s, _ = median_seconds(lambda: answer.members & engine.snapshot.live)
    _row(bench_report, "  of which the source's cache lookup", len(answer.members), lookup_s,
         "", "", f"and the bitmap: members & live {fmt_seconds(and_live_s)}")

    combined = {"and": [ATTR_NOT, SQL_LEAF]}
    both = engine.count(combined, as_of=AS_OF)
    both_s, _ = median_seconds(lambda: engine.count(combined, as_of=AS_OF))
    alone_s, _ = median_seconds(lambda: engine.count(ATTR_NOT, as_of=AS_OF))
    with_leaf = {"and": [ATTR_NOT, BITMAP_LEAF]}
    with_leaf_s, _ = median_seconds(lambda: engine.count(with_leaf, as_of=AS_OF))
    _row(bench_report, "5 leaves AND sql leaf, cached", both, both_s, "", "",
         f"5 leaves alone {fmt_seconds(alone_s)}, AND country = DE "
         f"{fmt_seconds(with_leaf_s)}")
    benchmark.extra_info.update(count=got, cached_s=cached_s, bitmap_leaf_s=leaf_s,
                                lookup_s=lookup_s, and_5_leaves_s=both_s)

    assert first == got == expected_count()
    naive = sum(1 for pid in engine.members(ATTR_NOT, as_of=AS_OF) if known(pid))
    assert both == naive, f"5 leaves AND sql: bitseg {both}, the ids in the table {naive}"
    assert 0 < both < engine.count(ATTR_NOT, as_of=AS_OF)
