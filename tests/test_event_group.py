"""Event count buckets grouped over a whole batch (index/event_group.py), and the spill.

A batch keeps the per-profile counts of its buckets as numpy runs and writes each bucket
at the end of the batch, or earlier when the runs pass RUN_BYTES (a spill: the bucket is
read back and added to). These tests make the limit tiny so that a small file spills
many times, and check that both paths still leave the same store, that a spilled load
counts what an unspilled one counts, and that a bad last line still leaves nothing.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from storecmp import store_entries
from test_columnar import _load, assert_same_load

from bitseg.index import event_batch, event_group
from bitseg.index.engine import Engine
from bitseg.index.event_counts import decode_counts
from bitseg.index.event_group import BucketRuns, bucket_code, bucket_parts
from bitseg.loaders import columnar
from bitseg.loaders.gen import generate


@pytest.fixture(autouse=True)
def small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(columnar, "BLOCK_BYTES", 4096)
    monkeypatch.setattr(event_batch, "FLUSH_ROWS", 700)
    monkeypatch.setattr(event_batch, "RUN_BYTES", event_batch.RUN_BYTES)


def _spills(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Records the runs of each spill (a scratch file of runs made while loading)."""
    calls: list[int] = []
    original = event_group.Spill.__init__

    def spy(self: Any, runs: np.ndarray, *args: Any) -> None:
        calls.append(len(runs))
        original(self, runs, *args)

    monkeypatch.setattr(event_group.Spill, "__init__", spy)
    return calls


def _counts(store: Path) -> dict[bytes, list[list[int]]]:
    """Every count bucket as lists of ids (exists, then each bit slice)."""
    events = store_entries(store)["events"]
    out = {}
    for key, raw in events.items():
        if key.startswith(b"c"):
            index = decode_counts(raw)
            out[key] = [list(index.exists), *(list(s) for s in index.slices)]
    return out


def test_buckets_spilled_many_times_load_alike_and_count_the_same(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "data"
    generate(folder, profiles=300, seed=6)
    calls = _spills(monkeypatch)
    assert assert_same_load(tmp_path / "whole", folder) is None
    assert calls == []  # each path's events batch writes its buckets once, at its end
    whole = _counts(tmp_path / "whole" / "rows")
    calls.clear()
    # 64 runs: a spill after every other flush (a merge of the runs is judged at the next)
    event_batch.RUN_BYTES = 64 * 16
    assert assert_same_load(tmp_path / "spilled", folder) is None
    assert len(calls) > 4  # two or more in each path's load
    assert _counts(tmp_path / "spilled" / "rows") == whole
    rest = {name: entries for name, entries in store_entries(tmp_path / "whole" / "rows").items()}
    spilled = store_entries(tmp_path / "spilled" / "rows")
    rest["events"] = {k: v for k, v in rest["events"].items() if not k.startswith(b"c")}
    spilled["events"] = {k: v for k, v in spilled["events"].items() if not k.startswith(b"c")}
    assert spilled == rest  # raw rows, catalog, ids: nothing else depends on the spills


def test_a_bad_last_line_after_spills_leaves_nothing_of_the_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "data"
    generate(folder, profiles=200, seed=3)
    (folder / "orders.jsonl").unlink()
    events = folder / "events.jsonl"
    lines = events.read_bytes().count(b"\n")
    with events.open("ab") as out:
        out.write(b'{"profile":"u1","event":"page_view","ts":"2025-01-01T00:00:00Z","n":[1]}\n')
    calls = _spills(monkeypatch)
    event_batch.RUN_BYTES = 64 * 16
    event_batch.FLUSH_ROWS = 350
    error = assert_same_load(tmp_path, folder)
    assert error is not None and f"events.jsonl, line {lines + 1}, field 'n'" in error
    assert len(calls) > 2  # runs were spilled before the bad line was met
    events.unlink()
    _load(tmp_path / "profiles-only", folder, columnar=False)
    assert store_entries(tmp_path / "columnar") == store_entries(tmp_path / "profiles-only")


def test_buckets_encoded_in_many_groups_on_threads_are_the_same_bytes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "data"
    generate(folder, profiles=300, seed=6)
    assert _load(tmp_path / "whole", folder, columnar=True) is None
    threads: set[str] = set()
    original = event_batch.encoded_counts

    def spy(*args: Any) -> list[bytes]:
        threads.add(threading.current_thread().name)
        return original(*args)

    monkeypatch.setattr(event_batch, "encoded_counts", spy)
    monkeypatch.setattr(event_batch, "ENCODE_RUNS", 16)  # groups of a few buckets
    assert _load(tmp_path / "groups", folder, columnar=True) is None
    assert {name.split("_")[0] for name in threads} == {"bitseg-encode"}
    assert store_entries(tmp_path / "groups") == store_entries(tmp_path / "whole")


def _threads_of_a_load_alike(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                             run_bytes: int | None, switch: tuple[Any, str, Any, Any],
                             spied: tuple[Any, str]) -> set[str]:
    """Load a generated dataset with `switch` (module, name, off, on) off, then on with
    `spied` (module, function) noting the threads it runs on; both loads leave the same
    bytes. The threads' names, their numbers cut off."""
    folder = tmp_path / "data"
    generate(folder, profiles=300, seed=8)
    if run_bytes is not None:
        event_batch.RUN_BYTES = run_bytes  # spills: many chunks, runs still being grouped
    module, name, off, on = switch
    monkeypatch.setattr(module, name, off)
    assert _load(tmp_path / "off", folder, columnar=True) is None
    threads: set[str] = set()
    where, function = spied
    original = getattr(where, function)

    def spy(*args: Any) -> Any:
        threads.add(threading.current_thread().name.split("_")[0])
        return original(*args)

    monkeypatch.setattr(where, function, spy)
    monkeypatch.setattr(module, name, on)
    assert _load(tmp_path / "on", folder, columnar=True) is None
    assert store_entries(tmp_path / "on") == store_entries(tmp_path / "off")
    return threads


@pytest.mark.parametrize("run_bytes", [64 * 16, None], ids=["spilled", "whole"])
def test_chunks_merged_ahead_at_a_large_batchs_end_are_the_same_bytes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_bytes: int | None) -> None:
    threads = _threads_of_a_load_alike(tmp_path, monkeypatch, run_bytes,
                                       (event_batch, "AHEAD_FROM", 1 << 62, 0),
                                       (event_group, "_merged"))
    assert "bitseg-chunks" in threads
    assert not any(t.name == "bitseg-chunks" for t in threading.enumerate())


def test_a_failed_write_of_a_chunk_stops_the_merging_and_leaves_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "data"
    generate(folder, profiles=300, seed=9)
    (folder / "orders.jsonl").unlink()
    events = tmp_path / "events.jsonl"
    (folder / "events.jsonl").rename(events)
    assert _load(tmp_path / "store", folder, columnar=True) is None  # profiles only
    before = store_entries(tmp_path / "store")
    event_batch.RUN_BYTES = 64 * 16
    monkeypatch.setattr(event_batch, "AHEAD_FROM", 0)
    closed: list[int] = []
    spills: list[int] = []
    original_close, original_init = event_group.Spill.close, event_group.Spill.__init__

    def init(self: Any, *args: Any) -> None:
        spills.append(id(self))
        original_init(self, *args)

    def close(self: Any) -> None:
        closed.append(id(self))
        original_close(self)

    written: list[int] = []

    def write_chunk(self: Any, *chunk: Any) -> None:
        written.append(len(chunk[0]))
        if len(written) == 2:
            raise OSError("the disk went away")

    monkeypatch.setattr(event_group.Spill, "__init__", init)
    monkeypatch.setattr(event_group.Spill, "close", close)
    monkeypatch.setattr(event_batch.EventBatch, "_write_chunk", write_chunk)
    with pytest.raises(OSError, match="the disk went away"), \
            Engine.open(tmp_path / "store") as engine:
        engine.track_events(columnar.iter_blocks(events), file=events.name)
    assert len(written) == 2
    assert spills and set(spills) <= set(closed)  # every scratch file of runs let go
    assert not any(t.name == "bitseg-chunks" for t in threading.enumerate())
    assert store_entries(tmp_path / "store") == before


@pytest.mark.parametrize("run_bytes", [64 * 16, None], ids=["spilled", "whole"])
def test_pairs_grouped_on_their_thread_are_the_same_bytes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_bytes: int | None) -> None:
    threads = _threads_of_a_load_alike(tmp_path, monkeypatch, run_bytes,
                                       (event_group, "GROUP_ASIDE", False, True),
                                       (event_group, "_grouped"))
    assert threads == {"bitseg-group"}


def test_runs_add_up_across_parts_and_keep_their_buckets() -> None:
    runs = BucketRuns()
    day = bucket_code(0, np.array([3, 3, 1]), np.array([-5, 7, 7]))
    month = bucket_code(1, np.array([2]), np.array([-1]))
    assert [bucket_parts(int(c)) for c in [*day, *month]] == \
        [(b"d", 3, -5), (b"d", 3, 7), (b"d", 1, 7), (b"m", 2, -1)]
    first = runs.gids(np.sort(day))
    runs.add(first[[0, 0, 1, 2]], np.array([9, 9, 4, 9], dtype=np.uint32))
    again = runs.gids(np.sort(np.concatenate((day[:1], month))))
    assert again[0] == first[np.searchsorted(np.sort(day), day[0])]
    runs.add(again[[0, 1, 1]], np.array([9, 2, 2], dtype=np.uint32))
    codes, bounds, profiles, rows = runs.drain()
    got = {(bucket_parts(int(codes[i])), int(p), int(r))
           for i in range(len(codes))
           for p, r in zip(profiles[bounds[i]:bounds[i + 1]], rows[bounds[i]:bounds[i + 1]],
                           strict=True)}
    assert got == {((b"d", 1, 7), 9, 2), ((b"d", 3, -5), 4, 1), ((b"d", 3, -5), 9, 1),
                   ((b"d", 3, 7), 9, 1), ((b"m", 2, -1), 2, 2)}
    assert runs.size == 0 and runs.drain() is None


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 2**32 - 1),
                                   st.sampled_from([1, 1, 2, 3, 5000, 2**20, 2**40])),
                         max_size=25), min_size=1, max_size=5))
def test_compacting_parts_adds_their_rows_per_bucket_and_profile(
        flushes: list[list[tuple[int, int, int]]]) -> None:
    """compact merges sorted parts into one (packing rows beside the run when they fit,
    a stable argsort when not); the sums are exact either way."""
    runs = BucketRuns()
    runs.code_of = np.arange(41, dtype=np.int64)
    expected: dict[tuple[int, int], int] = {}
    for flush in flushes:
        pairs = {}
        for gid, profile, rows in flush:
            pairs[(gid, profile)] = pairs.get((gid, profile), 0) + rows
            expected[(gid, profile)] = expected.get((gid, profile), 0) + rows
        keys = sorted(pairs)
        if not keys:  # add() keeps no empty part
            continue
        runs.parts.append((np.array([g << 32 | p for g, p in keys], dtype=np.int64),
                           np.array([pairs[k] for k in keys], dtype=np.int64)))
        runs.size += len(keys)
    runs.compact()
    assert runs.size == len(expected)
    drained = runs.drain()
    if not expected:
        assert drained is None
        return
    codes, bounds, profiles, rows = drained
    got = {(int(codes[i]), int(p)): int(r)
           for i in range(len(codes))
           for p, r in zip(profiles[bounds[i]:bounds[i + 1]], rows[bounds[i]:bounds[i + 1]],
                           strict=True)}
    assert got == expected
    assert all(np.all(np.diff(profiles[bounds[i]:bounds[i + 1]].astype(np.int64)) > 0)
               for i in range(len(codes)))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 2**32 - 1),
                                   st.sampled_from([1, 1, 2, 3, 5000, 2**20, 2**40])),
                         max_size=25), min_size=1, max_size=6),
       st.integers(1, 30), st.integers(1, 3))
def test_spilled_runs_come_back_in_chunks_that_add_up_like_one_drain(
        tmp_path_factory: pytest.TempPathFactory, flushes: list[list[tuple[int, int, int]]],
        limit: int, every: int) -> None:
    """Runs moved to scratch files every few flushes (packed beside their rows where they
    fit, runs then rows where not) come back in chunks of whole buckets, in gid order,
    with the rows of a (bucket, profile) added up over every spill; no file is left."""
    folder = tmp_path_factory.mktemp("spills")
    runs = BucketRuns()
    runs.code_of = np.arange(41, dtype=np.int64) * 7
    expected: dict[tuple[int, int], int] = {}
    for number, flush in enumerate(flushes, 1):
        if flush:
            gids = np.array([g for g, _, _ in flush], dtype=np.int64)
            profiles = np.array([p for _, p, _ in flush], dtype=np.uint32)
            weights = [r for _, _, r in flush]
            for gid, profile, rows in flush:
                expected[(gid * 7, profile)] = expected.get((gid * 7, profile), 0) + rows
            # add() counts one row a pair: repeat each pair its rows' worth, up to 3, and
            # put the larger counts in as a part of their own, as a compacted flush is
            runs.add(np.repeat(gids, [min(w, 3) for w in weights]),
                     np.repeat(profiles, [min(w, 3) for w in weights]))
            big = [(g << 32 | p, w - 3) for g, p, w in flush if w > 3]
            if big:
                merged: dict[int, int] = {}
                for run, w in big:
                    merged[run] = merged.get(run, 0) + w
                keys = sorted(merged)
                runs.parts.append((np.array(keys, dtype=np.int64),
                                   np.array([merged[k] for k in keys], dtype=np.int64)))
                runs.size += len(keys)
        if number % every == 0:
            runs.spill(folder)
    chunks = list(runs.chunks(limit, folder))
    got: dict[tuple[int, int], int] = {}
    last_code = -1
    for codes, bounds, profiles, rows in chunks:
        assert codes[0] > last_code and np.all(np.diff(codes) > 0)  # whole buckets, in order
        last_code = int(codes[-1])
        for i in range(len(codes)):
            block = profiles[bounds[i]:bounds[i + 1]].astype(np.int64)
            assert len(block) and np.all(np.diff(block) > 0)
            for p, r in zip(block.tolist(), rows[bounds[i]:bounds[i + 1]].tolist(), strict=True):
                got[(int(codes[i]), p)] = r
    assert got == expected
    assert not runs.spills and not runs.parts and list(folder.iterdir()) == []


def _roaring(ids: np.ndarray) -> bytes:
    from array import array

    from pyroaring import BitMap
    return BitMap(array("I", ids.astype(np.uint32).tobytes())).serialize()


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(
    st.sampled_from(["few", "consecutive", "dense", "wide", "mixed"]),
    st.integers(0, 2**32 - 70_000), st.integers(1, 9_000), st.randoms(use_true_random=False)),
    min_size=1, max_size=12))
def test_buckets_encoded_at_once_are_the_bytes_of_one_count_index_each(
        groups: list[tuple[str, int, int, Any]]) -> None:
    """encoded_counts writes the no-run roaring layout itself and asks pyroaring only for
    bitmaps holding a bitset (> 4,096 ids in a container) or a run container; every
    bucket's bytes equal encode_counts(count_index(...)) of its own runs."""
    from bitseg.index.event_counts import count_index, encode_counts
    from bitseg.index.event_group import encoded_counts
    bounds, ids, counts = [0], [], []
    for shape, low, size, rng in groups:
        if shape == "few":
            chosen = {low + rng.randrange(200_000) for _ in range(min(size, 8))}
        elif shape == "consecutive":
            chosen = set(range(low, low + min(size, 40)))
        elif shape == "dense":
            chosen = {low + rng.randrange(70_000) for _ in range(size)}
        elif shape == "wide":
            chosen = {rng.randrange(2**32) for _ in range(min(size, 60))}
        else:
            chosen = set(range(low, low + 6)) | {low + rng.randrange(5_000) for _ in range(20)}
        group = sorted(v for v in chosen if v < 2**32)
        ids += group
        counts += [rng.choice([1, 1, 1, 2, 3, 7, 300, 2**20]) for _ in group]
        bounds.append(len(ids))
    ids_array = np.array(ids, dtype=np.uint32)
    counts_array = np.array(counts, dtype=np.int64)
    got = encoded_counts(np.array(bounds), ids_array, counts_array, _roaring)
    assert got == [encode_counts(count_index(ids_array[a:b], counts_array[a:b]))
                   for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
