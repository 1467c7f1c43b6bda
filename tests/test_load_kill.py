"""kill -9 in the middle of `bitseg load`: each file is one transaction, so whatever the
moment, the reopened store holds the files before it whole and nothing of the file it was
in (CONTRACT §1 and §5).  Ten kills at random moments of loading a 200,000-profile dataset
over a store that already holds some of its profiles; each store after the kill is
compared entry by entry with the stores a clean load of each prefix of the files leaves.
"""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from storecmp import store_entries

from bitseg.index.engine import Engine
from bitseg.loaders.columnar import iter_blocks
from bitseg.loaders.dataset import load_dataset
from bitseg.loaders.gen import generate

TRIALS = 10
STARTUP = 1.0  # seconds a child takes to import bitseg and open the store, about
FILES = ["profiles.jsonl", "events.jsonl", "orders.jsonl"]


def _only(data: Path, name: str, tmp: Path) -> Path:
    """A dataset folder of data's schema.json and its one file `name`."""
    folder = tmp / f"only-{name}"
    folder.mkdir()
    shutil.copy(data / "schema.json", folder)
    (folder / name).symlink_to(data / name)
    return folder


def _load(store: Path, folder: Path) -> None:
    with Engine.open(store) as engine:
        load_dataset(folder, engine)


def _bitseg_load(folder: Path, store: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bitseg.server.cli", "load", str(folder),
                             "--db", str(store), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.slow
def test_kill_9_mid_load_leaves_whole_files_only(tmp_path: Path) -> None:
    data, base = tmp_path / "data", tmp_path / "base"
    generate(data, profiles=200_000, seed=21, events_per_profile=0.5, orders_per_profile=0.1)
    generate(base, profiles=2_000, seed=22, events_per_profile=1, orders_per_profile=0.5)
    before = tmp_path / "before"
    _load(before, base)  # ids u0…u1999 exist already: the profiles file updates them

    # The store after each prefix of the files: nothing, profiles, + events, + orders.
    states, whole = [before], 0.0
    for name, method in zip(FILES, ("upsert_profiles", "track_events", "add_orders"),
                            strict=True):
        state = tmp_path / f"after-{name}"
        shutil.copytree(states[-1], state)
        started = time.monotonic()
        with Engine.open(state) as engine:
            if name == FILES[0]:
                load_dataset(_only(data, name, tmp_path), engine)  # with schema.json
            else:
                getattr(engine, method)(iter_blocks(data / name), file=name)
        whole += time.monotonic() - started
        states.append(state)

    wanted = [store_entries(state) for state in states]  # every entry of every database
    rng = random.Random(2026)
    seen = []
    for trial in range(TRIALS):
        store = tmp_path / f"trial-{trial}"
        shutil.copytree(before, store)
        child = _bitseg_load(data, store)
        time.sleep(rng.uniform(0.3, STARTUP + whole))  # from start-up to past the end
        child.send_signal(signal.SIGKILL)
        child.wait()
        found = store_entries(store)
        matches = [n for n, state in enumerate(wanted) if found == state]
        assert matches, f"trial {trial}: the store is none of the whole-file states"
        seen.append(matches[0])
        shutil.rmtree(store)
    print(f"\nwhole load {whole:.1f} s; states after the kills: {seen}")
    assert len(set(seen)) > 1, f"every kill found the same state {seen}: move the moments"
