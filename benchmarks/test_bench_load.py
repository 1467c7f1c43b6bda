"""Issue 14: `bitseg load` against DuckDB's read_json of the same files, in the same run.

bitseg: the `bitseg load DATASET --db NEW --json` command in a child process, as a user
runs it; its report gives each file's time, and its own memory (RssAnon: the heap, not
LMDB's mapped file pages) is sampled every 0.2 s, and counted to the data file the
command opened last (its files are read one after another: a file's own peak includes
the end of its batch, after the file is closed).  Then the new store is reopened in
another child after the page cache is dropped (where the machine allows it; where not,
the row says so).

DuckDB: each file read by `read_json` with its explicit columns into a table of a new
DuckDB file (CREATE TABLE AS, as a DuckDB user loads it), on every core.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import orjson
import pytest
from conftest import PROFILES, fmt_seconds
from peers import EVENT_COLUMNS, ORDER_COLUMNS, PROFILE_COLUMNS, _read_json

TABLE = "Issue 14: bitseg load vs DuckDB read_json, file by file (one run)"
FILES = {"profiles.jsonl": PROFILE_COLUMNS, "events.jsonl": EVENT_COLUMNS,
         "orders.jsonl": ORDER_COLUMNS}
TARGET_RATE = {"profiles.jsonl": 1_000_000, "events.jsonl": 2_000_000,
               "orders.jsonl": 500_000}
REOPEN = """
import sys, time
started = time.perf_counter()
from bitseg.index.engine import Engine
with Engine.open(sys.argv[1]) as engine:
    n = engine.count({"field": "country", "op": "eq", "value": "DE"})
print(time.perf_counter() - started, n)
"""


def _own_memory(pid: int) -> int:
    """The process's anonymous resident memory in bytes (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _open_file(pid: int, names: tuple[str, ...], last: str) -> str:
    """Which of these file names the process has open (`last` when none is)."""
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            name = Path(os.readlink(fd)).name
            if name in names:
                return name
    except OSError:
        pass
    return last


def _run_sampled(args: list[str], per_file: dict[str, int] | None = None
                 ) -> tuple[subprocess.CompletedProcess, int]:
    """Run a child to its end, sampling its own memory; (result, peak bytes). With
    per_file, also each FILES name's peak, counted to the file opened last."""
    child = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak = [0]

    def sample() -> None:
        current = ""
        while child.poll() is None:
            own = _own_memory(child.pid)
            peak[0] = max(peak[0], own)
            if per_file is not None:
                current = _open_file(child.pid, tuple(FILES), current)
                if current:
                    per_file[current] = max(per_file.get(current, 0), own)
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = child.communicate()
    sampler.join()
    done = subprocess.CompletedProcess(args, child.returncode, out, err)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{err.decode()[-2000:]}")
    return done, peak[0]


def _drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def _duckdb_seconds(dataset: Path, folder: Path) -> dict[str, tuple[float, int]]:
    """Each file's read_json into a table of a new DuckDB file: (seconds, rows)."""
    import duckdb

    con = duckdb.connect(str(folder / "load.duckdb"))
    try:
        timed = {}
        for name, columns in FILES.items():
            started = time.perf_counter()
            con.execute(f"CREATE TABLE t_{name.split('.')[0]} AS SELECT * FROM "
                        f"{_read_json(dataset / name, columns)}")
            seconds = time.perf_counter() - started
            rows = con.execute(f"SELECT count(*) FROM t_{name.split('.')[0]}").fetchone()[0]
            timed[name] = (seconds, rows)
        return timed
    finally:
        con.close()


@pytest.mark.benchmark(group="load")
def test_load_against_duckdb(dataset: Path, tmp_path: Path, bench_report) -> None:
    size = sum((dataset / name).stat().st_size for name in FILES)
    free = shutil.disk_usage(tmp_path).free
    if free < 2 * size:
        raise AssertionError(f"the load bench needs ~{2 * size >> 30} GiB free in {tmp_path} "
                             f"for a new store; {free >> 30} GiB are")
    store = tmp_path / "store"
    started = time.perf_counter()
    per_file: dict[str, int] = {}
    done, peak = _run_sampled([sys.executable, "-m", "bitseg.server.cli", "load", str(dataset),
                               "--db", str(store), "--json", "--quiet"], per_file)
    bitseg_total = time.perf_counter() - started
    report = orjson.loads(done.stdout)
    rows = {"profiles.jsonl": report["profiles_created"] + report["profiles_updated"],
            "events.jsonl": report["events"], "orders.jsonl": report["orders"]}

    duck = _duckdb_seconds(dataset, tmp_path)
    duck_total = sum(seconds for seconds, _ in duck.values())

    for name in FILES:
        seconds = report["file_seconds"][name]
        assert rows[name] == duck[name][1], f"{name}: bitseg read {rows[name]:,} rows, " \
                                            f"DuckDB {duck[name][1]:,}"
        rate = rows[name] / seconds
        bench_report.add(TABLE, what=name, rows=f"{rows[name]:,}", bitseg=fmt_seconds(seconds),
                         rate=f"{rate / 1000:,.0f}k/s", duckdb=fmt_seconds(duck[name][0]),
                         ratio=f"{seconds / duck[name][0]:.2f}",
                         target=f"≥ {TARGET_RATE[name] // 1000:,}k/s, ratio ≤ 1.0")
    bench_report.add(TABLE, what="whole dataset (bitseg: the command, start to end)",
                     rows="", bitseg=fmt_seconds(bitseg_total), rate="",
                     duckdb=fmt_seconds(duck_total), ratio=f"{bitseg_total / duck_total:.2f}",
                     target="ratio ≤ 1.0")
    bench_report.add(TABLE, what=f"peak own memory (RssAnon) loading {PROFILES:,}", rows="",
                     bitseg=f"{peak / 2**30:.2f} GiB", rate="", duckdb="", ratio="",
                     target="≤ 3 GB at 10M")
    for name in FILES:
        bench_report.add(TABLE, what=f"  of which while loading {name}", rows="",
                         bitseg=f"{per_file[name] / 2**30:.2f} GiB" if name in per_file
                         else "not sampled (under 0.2 s)", rate="",
                         duckdb="", ratio="", target="")

    dropped = _drop_page_cache()
    reopen, _ = _run_sampled([sys.executable, "-c", REOPEN, str(store)])
    seconds = float(reopen.stdout.split()[0])
    bench_report.add(TABLE, what="reopen + first count" + ("" if dropped else
                                                          " (page cache NOT dropped)"),
                     rows="", bitseg=fmt_seconds(seconds), rate="", duckdb="", ratio="",
                     target="≤ 10 s at 10M, cache dropped")
    print(f"\nbitseg load {bitseg_total:.1f} s {report['file_seconds']}, peak own "
          f"{peak / 2**30:.2f} GiB "
          f"{ {k: round(v / 2**30, 2) for k, v in per_file.items()} }; DuckDB {duck_total:.1f} s "
          f"{ {k: round(v[0], 1) for k, v in duck.items()} }; reopen {seconds:.2f} s")
