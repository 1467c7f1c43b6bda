"""Blocks prepared on the reader thread against the same blocks unprepared.

loaders/columnar.py has each block's conversions made ahead (profile_blocks.prepare,
event_blocks.prepare; orders are not, as that measured slower) from the block alone,
before the batch that takes it has seen the blocks before it.  The batch uses what was
made only where its field types make it the same, so a file loads to the same store, entry by entry
(tests/storecmp.py), with blocks prepared or not, and as through the row path.  The
files here change field types under the blocks: a field a base store already has with
another type than a block's values suggest, one it has with the same type, one first
given in an earlier block of the same file.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import orjson
import pytest
from storecmp import differences

from bitseg.index.engine import Engine
from bitseg.loaders import columnar
from bitseg.loaders.columnar import iter_blocks
from bitseg.loaders.dataset import load_dataset
from bitseg.loaders.gen import generate


def _write(folder: Path, files: dict[str, list[Any]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, lines in files.items():
        (folder / name).write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))
    return folder


def _load(store: Path, base: Path | None, folder: Path, *, columnar_: bool = True) -> None:
    with Engine.open(store) as engine:
        if base is not None:
            load_dataset(base, engine, columnar=False)
        load_dataset(folder, engine, columnar=columnar_)


def _assert_prepared_alike(tmp: Path, folder: Path, monkeypatch: pytest.MonkeyPatch,
                           base: Path | None = None) -> None:
    """The folder loaded with blocks prepared, unprepared and row by row: equal stores."""
    _load(tmp / "prepared", base, folder)
    with monkeypatch.context() as patch:
        patch.setattr(columnar, "_prepared", lambda block, prepare: block)
        _load(tmp / "unprepared", base, folder)
    _load(tmp / "rows", base, folder, columnar_=False)
    assert differences(tmp / "prepared", tmp / "unprepared") == []
    assert differences(tmp / "prepared", tmp / "rows") == []


def test_generator_data_loads_alike_prepared_or_not(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "data"
    generate(folder, profiles=300, seed=7)
    monkeypatch.setattr(columnar, "BLOCK_BYTES", 4096)
    _assert_prepared_alike(tmp_path, folder, monkeypatch)


def test_the_reader_prepares_each_kind_of_block_and_no_other(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    folder = tmp_path / "data"
    generate(folder, profiles=200, seed=8)
    monkeypatch.setattr(columnar, "BLOCK_BYTES", 4096)
    for name, made in (("profiles.jsonl", "whole"), ("events.jsonl", "ts"),
                       ("orders.jsonl", "lines")):
        blocks = list(iter_blocks(folder / name))
        assert len(blocks) > 2
        assert all(made in block.prepared for block in blocks), name
    orders = list(iter_blocks(folder / "orders.jsonl"))
    assert all(set(block.prepared) == {"lines"} for block in orders)  # their lines only
    renamed = folder / "other.jsonl"
    (folder / "profiles.jsonl").rename(renamed)  # no kind: nothing made ahead
    assert all(block.prepared is None for block in iter_blocks(renamed))
    assert all("whole" in block.prepared for block in iter_blocks(renamed, kind="profiles"))


def test_blocks_are_parsed_and_prepared_on_two_threads_that_stop_when_closed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "data"
    generate(folder, profiles=200, seed=8)
    monkeypatch.setattr(columnar, "BLOCK_BYTES", 4096)
    made: dict[str, set[str]] = {"parse": set(), "prepare": set()}
    parse, prepare = columnar.parse_block, columnar.PREPARE["events"]

    def parsed(*args: Any) -> Any:
        made["parse"].add(threading.current_thread().name)
        return parse(*args)

    def prepared(block: Any) -> None:
        made["prepare"].add(threading.current_thread().name)
        prepare(block)

    monkeypatch.setattr(columnar, "parse_block", parsed)
    monkeypatch.setitem(columnar.PREPARE, "events", prepared)
    blocks = iter_blocks(folder / "events.jsonl")
    first = next(blocks)
    assert first.first_line == 1 and "ts" in first.prepared
    blocks.close()  # a load that stops at a bad line: both threads end, nothing left behind
    assert made == {"parse": {"read events.jsonl"}, "prepare": {"prepare events.jsonl"}}
    assert not [t for t in threading.enumerate() if t.name.endswith("events.jsonl")]


def _profile(i: int, **fields: Any) -> dict[str, Any]:
    return {"id": f"p{i}", **fields}


def test_profile_types_changing_under_prepared_blocks(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    base = _write(tmp_path / "base", {"profiles.jsonl": [
        _profile(0, score=1.5, born="2020-01-01", tags=["a"], plan="free")]})
    lines = []
    for i in range(1, 120):
        row = _profile(i, score=i % 7, born=f"2020-01-{1 + i % 28:02d}",
                       plan=["free", "pro"][i % 2])
        if i % 3 == 0:
            row["tags"] = ["b", "a", "b"][: 1 + i % 3]
        if i >= 20:  # first given in an early block, then known to the later ones
            row["city"] = ["Zürich", 'say "hi"', "東京"][i % 3]
            row["visits"] = i * 1.25
        lines.append(row)
    lines.append(_profile(3, score=2.5))  # an upsert: the row path takes it
    folder = _write(tmp_path / "data", {"profiles.jsonl": lines})
    monkeypatch.setattr(columnar, "BLOCK_BYTES", 900)
    _assert_prepared_alike(tmp_path, folder, monkeypatch, base=base)


def test_order_types_changing_under_prepared_blocks(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    base = _write(tmp_path / "base", {
        "profiles.jsonl": [_profile(i) for i in range(5)],
        "orders.jsonl": [{"id": "o0", "profile": "p0", "ts": "2025-01-01T10:00:00Z",
                          "total": 1.5, "channel": "web",
                          "items": [{"sku": "a", "qty": 1, "price": 2.5}]}]})
    lines = []
    for i in range(1, 150):
        row: dict[str, Any] = {"id": f"o{i}", "profile": f"p{i % 9}",
                               "ts": f"2025-01-{1 + i % 28:02d}T10:00:00Z",
                               "total": i % 5, "channel": ["web", "app"][i % 2],
                               "items": [{"sku": f"s{i % 4}", "qty": 1 + i % 3,
                                          "price": float(i % 6)}] * (1 + i % 2)}
        if i >= 30:  # first given in an early block, then known to the later ones
            row["coupon"] = ["X1", "Y2"][i % 2]
            row["weight"] = i * 0.5
        lines.append(row)
    lines.append({"id": "o7", "profile": "p1", "ts": "2025-02-01T10:00:00Z"})  # seen before
    folder = _write(tmp_path / "data", {"profiles.jsonl": [], "orders.jsonl": lines})
    monkeypatch.setattr(columnar, "BLOCK_BYTES", 1500)
    _assert_prepared_alike(tmp_path, folder, monkeypatch, base=base)
