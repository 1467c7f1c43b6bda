"""Issue 17, R2: Insights of a 5-leaf rule over 10 fields, and an export of 1M members
with 5 fields (server-side path, index/exports.export; at 10M a 10 % sample). Both only
read the store. Medians printed with -s."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import pytest
from conftest import AS_OF, PROFILES, ROOT, SEED, fmt_seconds
from peers import ATTR_NOT, PAIRS, open_duckdb

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


@pytest.fixture(scope="module")
def duck(dataset):
    con = open_duckdb(dataset, ROOT / f"duck-{PROFILES}-{SEED}.duckdb")
    yield con
    con.close()


KEYWORDS = ("city", "country", "gender", "plan", "subscribed")  # of the bench's 10 fields
RANGES = ("age", "birthday", "created_at", "ltv", "points")


def _as_number(name: str) -> str:
    """The field as a number DuckDB can bucket (days for a date, seconds for a time)."""
    return {"birthday": "(birthday - DATE '1970-01-01')",
            "created_at": "epoch(created_at)"}.get(name, name)


def _duck_fields(duck) -> Callable[[], object]:
    """The 10 fields' audience side in DuckDB, as a yardstick measured in the same run
    (the machine is shared, so absolute times drift): the top values of the keyword and
    bool fields (one GROUPING SETS query), count, min, max and the 5 quantiles of the
    range fields (one query), and their 10 buckets between the base's min and max
    (found beforehand, untimed; one query). Each query evaluates the 5-leaf rule."""
    pair = next(p for p in PAIRS if p.rule == ATTR_NOT)
    audience = pair.query(AS_OF).replace("SELECT count(*) FROM profiles",
                                         "SELECT * FROM profiles", 1)
    values = (f"WITH a AS ({audience}) SELECT {', '.join(KEYWORDS)}, count(*) FROM a "
              f"GROUP BY GROUPING SETS ({', '.join(f'({k})' for k in KEYWORDS)})")
    summary = ", ".join(f"count({r}), min({r}), max({r}), "
                        f"quantile_disc({r}, [0.25, 0.5, 0.75, 0.9, 0.99])" for r in RANGES)
    summary = f"WITH a AS ({audience}) SELECT {summary} FROM a"
    ends = duck.execute("SELECT " + ", ".join(
        f"min({_as_number(r)}), max({_as_number(r)})" for r in RANGES) + " FROM profiles"
    ).fetchone()
    parts = []
    for i, r in enumerate(RANGES):
        low, high = float(ends[2 * i]), float(ends[2 * i + 1])
        parts.append(f"SELECT '{r}' AS f, least(9, floor(({_as_number(r)} - {low}) * 10 / "
                     f"({high - low} + 1e-9))) AS b, count(*) FROM a "
                     f"WHERE {r} IS NOT NULL GROUP BY b")
    buckets = f"WITH a AS ({audience}) " + " UNION ALL ".join(parts)

    def run() -> None:
        for sql in (values, summary, buckets):
            duck.execute(sql).fetchall()
    return run


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


def test_insights_of_a_5_leaf_rule_over_10_fields(engine, duck):
    snap = engine.snapshot
    fields = _fields(snap, 10)
    assert set(fields) == {*KEYWORDS, *RANGES}
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
    peer = _duck_fields(duck)
    peer()  # warm
    duck_seconds = _median(peer)
    print(f"\ninsights, 5-leaf rule ({found.profiles:,} of {len(snap.live):,} profiles): "
          f"{len(fields)} fields alone (the target's) {fmt_seconds(alone)}; "
          f"the whole call, {len(fields)} fields + {len(found.events)} event types x 3 "
          f"windows + orders, {fmt_seconds(seconds)} (medians of 5); the first call "
          f"{fmt_seconds(first)}; one at an as_of an hour later (its event windows "
          f"made anew) {fmt_seconds(later)}; DuckDB's audience side of the 10 fields "
          f"{fmt_seconds(duck_seconds)} ({duck_seconds / alone:.1f}x the fields alone)")


MEMBERS = 1_000_000


def test_export_of_1m_members_with_5_fields(engine, duck, tmp_path):
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
    # DuckDB, as a yardstick in the same run: the same members (their ids given as a
    # table, untimed) with the same fields copied to a CSV file
    import pyarrow as pa

    duck.register("members", pa.table({"id": engine.members(rule, as_of=AS_OF)}))
    peer_out = tmp_path / "duck.csv"
    copy = (f"COPY (SELECT p.id, {', '.join('p.' + f for f in fields)} FROM profiles p "
            f"SEMI JOIN members m ON p.id = m.id) TO '{peer_out}' (FORMAT csv, HEADER)")
    duck.execute(copy)
    assert sum(1 for _ in peer_out.open("rb")) == done.rows + 1
    duck_seconds = _median(lambda: duck.execute(copy), 3)
    duck.unregister("members")
    print(f"\nexport of {done.rows:,} of {len(snap.live):,} members, 5 fields "
          f"({', '.join(fields)}), csv: {fmt_seconds(seconds)} median of 3 "
          f"({done.rows / seconds:,.0f} rows/s); DuckDB copying the same members' "
          f"fields to CSV {fmt_seconds(duck_seconds)} ({done.rows / duck_seconds:,.0f} "
          f"rows/s; bitseg {duck_seconds / seconds:.2f}x its rate)")
