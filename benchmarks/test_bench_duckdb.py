"""bitseg against DuckDB: the same generated dataset, the same rules, in the same run.

Each test counts one audience with both engines, asserts the counts are equal, and
reports both medians and their ratio (DuckDB time / bitseg time).  The rules and their
SQL are in peers.py, side by side.
"""

from __future__ import annotations

import pytest
from conftest import AS_OF, PROFILES, ROOT, SEED, fmt_seconds, median_of
from peers import PAIRS, Pair, median_seconds, open_duckdb

TABLE = "bitseg vs DuckDB: Count, median per call (ratio = DuckDB / bitseg)"


@pytest.fixture(scope="module")
def duck(dataset, bench_report):
    import duckdb

    con = open_duckdb(dataset, ROOT / f"duck-{PROFILES}-{SEED}.duckdb")
    threads = con.execute("SELECT current_setting('threads')").fetchone()[0]
    bench_report.note(f"DuckDB {duckdb.__version__} with {threads} threads (its default); "
                      f"bitseg evaluates a rule on one thread.")
    yield con
    con.close()


@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: p.name)
def test_bitseg_vs_duckdb(benchmark, engine, duck, bench_report, pair: Pair):
    sql = pair.query(AS_OF)
    expected = duck.execute(sql).fetchone()[0]

    def count() -> int:
        return engine.count(pair.rule, as_of=AS_OF)

    got = benchmark(count)
    bitseg_s = median_of(benchmark, count)
    duck_s, rounds = median_seconds(lambda: duck.execute(sql).fetchone())
    ratio = duck_s / bitseg_s
    benchmark.extra_info.update(count=got, duckdb_count=expected, bitseg_median_s=bitseg_s,
                                duckdb_median_s=duck_s, duckdb_rounds=rounds, ratio=ratio)
    bench_report.add(TABLE, rule=pair.name,
                     count=got if got == expected else f"MISMATCH bitseg {got} duckdb {expected}",
                     bitseg=fmt_seconds(bitseg_s), duckdb=fmt_seconds(duck_s),
                     ratio=f"{ratio:,.1f}x", **{"target (10M)": pair.target})
    assert got == expected, (f"{pair.name}: bitseg counts {got}, DuckDB {expected}\n"
                             f"rule: {pair.rule}\nsql: {sql}")
    if pair.target:
        assert got > 0, f"{pair.name}: an empty audience measures nothing; pick another rule"
