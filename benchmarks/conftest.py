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
from bitseg.loaders.dataset import load_dataset
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
        with Engine.open(path) as engine:
            report = load_dataset(dataset, engine, progress=True)
        print(f"\nloaded {report}")
        (path / ".complete").write_text(str(report))
    return path


@pytest.fixture(scope="session")
def engine(store: Path):
    with Engine.open(store) as engine:
        yield engine
