"""Event blocks find their profile ids in the id map's hash table (index/idhash.py) and
leave exactly the store the row path leaves: known, deleted, re-created and unknown ids,
unicode ids, ids given as integers, and ids whose hashes collide (forced, as the idhash
tests force them), over several flushes and blocks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from storecmp import differences

from bitseg.index import event_batch, idhash
from bitseg.index.engine import Engine
from bitseg.loaders import columnar
from bitseg.loaders.columnar import iter_blocks
from bitseg.loaders.dataset import iter_jsonl

PEOPLE = [f"u{i}" for i in range(40)] + ["é-ü", "日本", "42", "-7", "a\x00b", "x" * 200]
ASKED = PEOPLE + ["u7", "u8", "new1", "ü-é", "本日", "43", "x" * 201, "u40", "a"]


def _zero(blob: Any, offsets: np.ndarray) -> np.ndarray:
    return np.zeros(len(offsets) - 1, dtype=np.uint64)


def _first_byte(blob: Any, offsets: np.ndarray) -> np.ndarray:
    """A hash many names share: their first byte and length."""
    data = np.frombuffer(blob, dtype=np.uint8)
    starts, lengths = offsets[:-1].astype(np.int64), np.diff(offsets.astype(np.int64))
    first = np.where(lengths > 0, data[np.minimum(starts, max(len(data) - 1, 0))]
                     if len(data) else 0, 0)
    return (first.astype(np.uint64) << np.uint64(56)) | lengths.astype(np.uint64)


HASHES = {"real": idhash.hashes, "all alike": _zero, "first byte": _first_byte}


def _load(store: Path, events: Path, *, blocks: bool) -> None:
    with Engine.open(store) as engine:
        engine.declare_schema({"profiles": {"n": "int"}, "events": {"page": "keyword"}})
        engine.upsert_profiles([{"id": name, "n": i} for i, name in enumerate(PEOPLE)])
        engine.delete_profiles(["u7", "u8"])
        engine.upsert_profiles([{"id": "u8", "n": 8}])  # u8 again: a second dense id
        rows = iter_blocks(events) if blocks else iter_jsonl(events)
        engine.track_events(rows, file=events.name)


def _event(profile: Any, i: int) -> dict[str, Any]:
    return {"profile": profile, "event": "view", "ts": f"2026-01-{1 + i % 28:02d}T10:00:00Z",
            "page": f"/p{i % 3}"}


def _assert_alike(tmp: Path, events: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch,
                  hashes: str) -> None:
    file = tmp / "events.jsonl"
    file.write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in events))
    resolved: list[int] = []
    resolve = event_batch.EventBatch._resolve

    def spy(self: Any, names: Any) -> np.ndarray:
        resolved.append(len(names))
        return resolve(self, names)

    idhash._TABLES.clear()
    with monkeypatch.context() as m:
        m.setattr(idhash, "hashes", HASHES[hashes])
        m.setattr(event_batch.EventBatch, "_resolve", spy)
        _load(tmp / "blocks", file, blocks=True)
    idhash._TABLES.clear()
    _load(tmp / "rows", file, blocks=False)
    assert resolved, "the blocks took the row path"
    assert differences(tmp / "blocks", tmp / "rows") == []


@pytest.fixture(autouse=True)
def small(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of ~300 bytes, flushes of 7 rows, a cache of 3 ids: ids made by one flush
    are met again by the next, in a block sliced across flushes."""
    monkeypatch.setattr(columnar, "BLOCK_BYTES", 300)
    monkeypatch.setattr(event_batch, "FLUSH_ROWS", 7)
    monkeypatch.setattr(event_batch, "DENSE_CACHE", 3)


@pytest.mark.parametrize("hashes", sorted(HASHES))
def test_known_deleted_recreated_unknown_and_unicode_ids(tmp_path: Path, hashes: str,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    asked = [name for name in ASKED if len(name.encode()) <= 200]  # longer: the row path
    events = [_event(asked[(i * 7) % len(asked)], i) for i in range(120)]
    _assert_alike(tmp_path, events, monkeypatch, hashes)


@pytest.mark.parametrize("hashes", ["real", "all alike"])
def test_ids_given_as_integers(tmp_path: Path, hashes: str,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    """42 is the profile "42"; 43 and -8 are new ones, made in order of first appearance."""
    events = [_event([42, 43, -7, -8, 42, 0][i % 6], i) for i in range(40)]
    _assert_alike(tmp_path, events, monkeypatch, hashes)


def test_without_a_table_lmdb_answers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While the table is being made (a small batch of a large map), LMDB is asked."""
    monkeypatch.setattr(idhash, "table", lambda ids, wait=False: None)
    events = [_event(ASKED[i % 50], i) for i in range(60)]
    _assert_alike(tmp_path, events, monkeypatch, "real")


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(picks=st.lists(st.one_of(st.sampled_from(ASKED[:-3]), st.integers(0, 60).map(
    lambda i: f"u{i}"), st.text(min_size=1, max_size=4)), min_size=1, max_size=60),
       hashes=st.sampled_from(sorted(HASHES)))
def test_any_ids_load_alike(tmp_path_factory: pytest.TempPathFactory, picks: list[str],
                            hashes: str, monkeypatch: pytest.MonkeyPatch) -> None:
    tmp = tmp_path_factory.mktemp("ids")
    _assert_alike(tmp, [_event(p, i) for i, p in enumerate(picks)], monkeypatch, hashes)
