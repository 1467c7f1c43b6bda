"""Benchmark fixtures: one generated dataset, loaded once, shared by every suite.

Size: BITSEG_BENCH_PROFILES (default 1,000,000; `make bench-10m` sets 10,000,000).
The dataset and store are cached under .bench-data/ by size and seed, so a second run
skips generation and loading (delete the folder to rebuild).
"""

from __future__ import annotations

import os
import platform
import shutil
import time
from pathlib import Path

import pytest

from bitseg.index.engine import Engine
from bitseg.loaders.dataset import bulk_reserve, load_dataset
from bitseg.loaders.gen import generate

PROFILES = int(os.environ.get("BITSEG_BENCH_PROFILES", "1000000"))
SEED = 11
AS_OF = "2026-11-01T00:00:00Z"  # the generator's present
ROOT = Path(os.environ.get("BITSEG_BENCH_DIR", Path(__file__).resolve().parent.parent
                           / ".bench-data"))


def pytest_report_header(config: pytest.Config) -> list[str]:
    return [f"bitseg bench: {PROFILES:,} profiles, seed {SEED}, as_of {AS_OF}",
            f"machine: {platform.machine()} {os.cpu_count()} cpus, {platform.python_version()}"]


@pytest.fixture(scope="session")
def dataset() -> Path:
    folder = ROOT / f"data-{PROFILES}-{SEED}"
    if not (folder / ".complete").exists():
        shutil.rmtree(folder, ignore_errors=True)
        started = time.perf_counter()
        counts = generate(folder, profiles=PROFILES, seed=SEED, progress=True)
        print(f"\ngenerated {counts} in {time.perf_counter() - started:.1f} s")
        (folder / ".complete").write_text("ok")
    return folder


@pytest.fixture(scope="session")
def store(dataset: Path) -> Path:
    path = ROOT / f"store-{PROFILES}-{SEED}"
    if not (path / ".complete").exists():
        shutil.rmtree(path, ignore_errors=True)
        with Engine.open(path, bulk=bulk_reserve(dataset)) as engine:
            report = load_dataset(dataset, engine, progress=True)
        print(f"\nloaded {report}")
        (path / ".complete").write_text(str(report))
    return path


@pytest.fixture(scope="session")
def engine(store: Path):
    """The loaded store, with the result cache off: benchmarks measure evaluation.
    (A test that wants the cache turns it on for itself and off again.)"""
    from bitseg.index import cumulative, orders
    from bitseg.index.allocator import keep_freed_memory

    keep_freed_memory()  # as `bitseg serve` does: evaluation measured as a server runs it
    # Layouts a server builds on a thread at 10M (its rules answering the old way
    # meanwhile) are built by the first call here, so medians measure them, not the race.
    cumulative.BACKGROUND_IDS = 1 << 62
    orders.LAYOUT_BACKGROUND = 1 << 62
    with Engine.open(store) as engine:
        engine.cache_results = False
        yield engine


# ------------------------------------------------------------------ the end-of-session report
class BenchReport:
    """Numbers the suites print together at the end of the session, table by table."""

    def __init__(self) -> None:
        self.tables: dict[str, list[dict[str, str]]] = {}
        self.notes: list[str] = []

    def add(self, table: str, **columns: object) -> None:
        self.tables.setdefault(table, []).append({k: str(v) for k, v in columns.items()})

    def note(self, line: str) -> None:
        self.notes.append(line)

    def lines(self) -> list[str]:
        out: list[str] = []
        for title, rows in self.tables.items():
            headers = list(dict.fromkeys(k for row in rows for k in row))
            widths = [max(len(h), *(len(row.get(h, "")) for row in rows)) for h in headers]
            grid = [headers, ["-" * w for w in widths],
                    *([row.get(h, "") for h in headers] for row in rows)]
            out += ["", title]
            out += ["  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()
                    for cells in grid]
        return out + ([""] + self.notes if self.notes else [])


REPORT = pytest.StashKey[BenchReport]()


def fmt_seconds(seconds: float) -> str:
    """A duration in the unit that suits it: 12.3 µs, 4.56 ms, 7.89 s."""
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def median_of(benchmark, fn) -> float:
    """The median seconds per call the benchmark just measured (timed here when
    benchmarks are disabled, so the report still has a number)."""
    if benchmark.stats is not None:
        return benchmark.stats.stats.median
    from peers import median_seconds

    return median_seconds(fn)[0]


@pytest.fixture(scope="session")
def bench_report(pytestconfig: pytest.Config) -> BenchReport:
    """The session's report, printed by pytest_terminal_summary."""
    return pytestconfig.stash.setdefault(REPORT, BenchReport())


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's table: the last word
def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    import resource

    report = config.stash.get(REPORT, None)
    if report is None:
        return
    write = terminalreporter.write_line
    terminalreporter.section("bitseg bench report")
    write(f"{PROFILES:,} profiles, seed {SEED}, as_of {AS_OF}; {platform.machine()} "
          f"{os.cpu_count()} cpus, Python {platform.python_version()}, {platform.system()}")
    for line in report.lines():
        write(line)
    unit = 1024 * 1024 if platform.system() == "Darwin" else 1024  # ru_maxrss: bytes / KiB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / unit
    write("")
    write(f"peak RSS of this session: {peak:,.0f} MiB (generation, load, DuckDB and every "
          f"suite in one process; bitseg alone: see reopen)")
